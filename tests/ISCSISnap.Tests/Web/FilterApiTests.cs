using System.Text.Json;
using ISCSISnap.Tests.Support;
using Xunit;
using static ISCSISnap.Tests.Web.WebTest;

namespace ISCSISnap.Tests.Web;

/// <summary>
/// LUN filter stacks on the real executable: configured through the REST API and appliance.json, kept in the
/// catalog across restarts, plugins loaded from the plugin directory, and stacks changed under a real initiator's IO.
/// </summary>
public sealed class FilterApiTests
{
    private const string PluginFile = "ISCSISnap.SamplePlugin.dll";

    /// <summary>The sample plugin as built beside the tests (tests/ISCSISnap.SamplePlugin/bin/{configuration}/net10.0).</summary>
    private static string SamplePluginPath
    {
        get
        {
            var testOutput = new DirectoryInfo(AppContext.BaseDirectory);   // tests/ISCSISnap.Tests/bin/{configuration}/net10.0/
            string configuration = testOutput.Parent!.Name;
            string path = Path.Combine(testOutput.Parent!.Parent!.Parent!.Parent!.FullName, "ISCSISnap.SamplePlugin", "bin", configuration, "net10.0", PluginFile);
            Assert.True(File.Exists(path), $"the sample plugin was not built: {path}");
            return path;
        }
    }

    private static void InstallSamplePlugin(string dataDirectory)
    {
        string plugins = Path.Combine(dataDirectory, "plugins");
        Directory.CreateDirectory(plugins);
        File.Copy(SamplePluginPath, Path.Combine(plugins, PluginFile), overwrite: true);
    }

    private static object Xor(int key, int? position = null) => new
    {
        type = "plugin", assembly = PluginFile, typeName = "ISCSISnap.SamplePlugin.XorFilter", settings = new Dictionary<string, string> { ["key"] = key.ToString() }, position,
    };

    private static async Task<List<string>> StackAsync(ApplianceProcess appliance, string target) =>
        (await GetJsonAsync(appliance.Http, $"/api/v1/targets/{target}/luns/0/filters")).EnumerateArray().Select(f => f.Str("name")!).ToList();

    [Fact]
    public async Task Filters_are_added_used_listed_and_removed_through_the_api_and_survive_a_restart()
    {
        using var dir = new TempDirectory();
        string data = Path.Combine(dir.Path, "data");
        InstallSamplePlugin(data);
        string target = UniqueTarget("filters");
        var pattern = Pattern(10, 3, 8);
        var appliance = await ApplianceProcess.StartAsync(dataDirectory: data);
        await using (appliance)
        {
            var http = appliance.Http;
            await appliance.CreateTargetAsync(target, 8L << 20);
            string filters = $"/api/v1/targets/{target}/luns/0/filters";

            var trace = await JsonAsync(await PostAsync(http, filters, new { type = "trace", sampleEvery = 1, capacity = 64 }), 201);
            Assert.Equal("trace", trace.Str("name"));
            Assert.Equal(0, trace.GetProperty("position").GetInt32());
            var xor = await JsonAsync(await PostAsync(http, filters, Xor(90)), 201);
            Assert.Equal("xor", xor.Str("name"));
            Assert.Equal(["trace", "xor"], await StackAsync(appliance, target));

            // Refusals: clear answers, nothing changed.
            await AssertProblemAsync(await PostAsync(http, filters, new { type = "trace" }), 409, "type");
            await AssertProblemAsync(await PostAsync(http, filters, new { type = "gzip" }), 400, "filter");
            await AssertProblemAsync(await PostAsync(http, filters, new { type = "trace", iopsPerLun = 5 }), 400, "filter");
            await AssertProblemAsync(await PostAsync(http, filters, new { type = "plugin", assembly = "missing.dll", typeName = "X" }), 400, "assembly");
            await AssertProblemAsync(await PostAsync(http, filters, new { type = "plugin", assembly = "../../etc/passwd.dll", typeName = "X" }), 400, "filter");
            await AssertProblemAsync(await PostAsync(http, filters, new { type = "plugin", assembly = PluginFile, typeName = "ISCSISnap.SamplePlugin.Nope" }), 400, "typeName");
            await AssertProblemAsync(await PostAsync(http, filters, Xor(0)), 400, "settings");
            await AssertProblemAsync(await PostAsync(http, $"/api/v1/targets/{target}/luns/7/filters", new { type = "trace" }), 404);
            Assert.Equal(["trace", "xor"], await StackAsync(appliance, target));

            var initiator = await LoginAsync(appliance, target);
            await using (initiator)
            {
                await initiator.WriteAsync(10, pattern);
                Assert.Equal(pattern, await initiator.ReadAsync(10, 8));
                await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
            }
            var listed = (await GetJsonAsync(http, filters)).EnumerateArray().ToList();
            Assert.Equal(4096, listed[1].GetProperty("counters").GetProperty("scrambled_bytes").GetInt64());
            Assert.Equal("plugin", listed[1].Str("type"));
            var records = (await GetJsonAsync(http, $"/api/v1/targets/{target}/luns/0/trace?limit=10")).EnumerateArray().ToList();
            Assert.Contains(records, r => r.Str("operation") == "write" && r.GetProperty("offset").GetInt64() == 10 * 512 && r.Str("verdicts") == "xor:transform");
            Assert.Contains(records, r => r.Str("operation") == "read" && r.Str("verdicts") == "xor:transform" && r.GetProperty("latencyMicroseconds").GetDouble() > 0);
            Assert.Equal(0, await appliance.StopAsync());
        }

        // The stack is the catalog's: back in the same order after a restart, and the data still reads through it.
        appliance = await ApplianceProcess.StartAsync(dataDirectory: data);
        await using (appliance)
        {
            Assert.Equal(["trace", "xor"], await StackAsync(appliance, target));
            var initiator = await LoginAsync(appliance, target);
            await using (initiator)
            {
                Assert.Equal(pattern, await initiator.ReadAsync(10, 8));
                // Taken off the live LUN, the plugin no longer unscrambles: the blocks at rest were XORed with its key.
                await JsonAsync(await SendAsync(appliance.Http, HttpMethod.Delete, $"/api/v1/targets/{target}/luns/0/filters/xor"), 204);
                Assert.Equal(pattern.Select(b => (byte)(b ^ 90)).ToArray(), await initiator.ReadAsync(10, 8));
                await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
            }
            await AssertProblemAsync(await SendAsync(appliance.Http, HttpMethod.Delete, $"/api/v1/targets/{target}/luns/0/filters/xor"), 404);
            Assert.Equal(["trace"], await StackAsync(appliance, target));
            Assert.True(await EventuallyAsync(() => Task.FromResult(LogLines(data).Any(line => line.Contains("removed from LUN") && line.Contains("\"Filter\":\"xor\"")))), "the removal is logged");
        }
    }

    [Fact]
    public async Task A_faulting_plugin_is_contained_by_its_policy_and_quarantined()
    {
        using var dir = new TempDirectory();
        string data = Path.Combine(dir.Path, "data");
        InstallSamplePlugin(data);
        string target = UniqueTarget("thrower");
        var appliance = await ApplianceProcess.StartAsync(dataDirectory: data);
        await using (appliance)
        {
            await appliance.CreateTargetAsync(target, 8L << 20);
            string filters = $"/api/v1/targets/{target}/luns/0/filters";
            await JsonAsync(await PostAsync(appliance.Http, filters,
                new { type = "plugin", assembly = PluginFile, typeName = "ISCSISnap.SamplePlugin.ThrowingFilter", onFault = "fail", failureStatus = "mediumError", quarantineAfterFaults = 3 }), 201);
            var initiator = await LoginAsync(appliance, target);
            await using (initiator)
            {
                for (int i = 0; i < 4; i++)
                {
                    var read = await initiator.RunAsync(Cdb.Read10(0, 1), 0, 512);
                    Assert.Equal((byte)3, read.SenseKey);           // MEDIUM ERROR, by the declared policy
                    Assert.Equal((ushort)0x1100, read.AscAscq);
                }
                var listed = (await GetJsonAsync(appliance.Http, filters)).EnumerateArray().Single();
                Assert.True(listed.GetProperty("quarantined").GetBoolean());
                Assert.Equal(3, listed.GetProperty("faults").GetInt64());   // quarantined after 3; the 4th never reached it
                await JsonAsync(await SendAsync(appliance.Http, HttpMethod.Delete, $"{filters}/thrower"), 204);
                Assert.True((await initiator.RunAsync(Cdb.Read10(0, 1), 0, 512)).Good);
                await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
            }
            Assert.True(await EventuallyAsync(() => Task.FromResult(LogLines(data).Any(line => line.Contains("faulted") && line.Contains("\"Filter\":\"thrower\"") && line.Contains("always throws")))),
                "the fault is logged");
        }
    }

    [Fact]
    public async Task Declared_filters_come_from_appliance_json_and_bad_ones_are_refused_at_start()
    {
        using var dir = new TempDirectory();
        string target = UniqueTarget("declared");
        string config = Path.Combine(dir.Path, "appliance.json");
        await File.WriteAllTextAsync(config, JsonSerializer.Serialize(new
        {
            targets = new object[] { new { name = target, luns = new object[] { new { lun = 0, sizeBytes = 8L << 20, filters = new object[] { new { type = "trace", sampleEvery = 4 } } } } } },
        }));
        var appliance = await ApplianceProcess.StartAsync(dataDirectory: Path.Combine(dir.Path, "data"), configFile: config);
        await using (appliance)
        {
            var stack = (await GetJsonAsync(appliance.Http, $"/api/v1/targets/{target}/luns/0/filters")).EnumerateArray().Single();
            Assert.Equal("trace", stack.Str("name"));
            Assert.Equal(4, stack.GetProperty("spec").GetProperty("sampleEvery").GetInt32());
        }

        await File.WriteAllTextAsync(config, JsonSerializer.Serialize(new
        {
            targets = new object[] { new { name = target, luns = new object[] { new { lun = 0, sizeBytes = 8L << 20, filters = new object[] { new { type = "trace", capacity = 0 } } } } } },
        }));
        var refused = await RunApplianceAsync("--config", config, "--data", Path.Combine(dir.Path, "data2"), "--portal", "127.0.0.1:0", "--web", "http://127.0.0.1:0");
        Assert.NotEqual(0, refused.ExitCode);
        Assert.Contains("targets[0].luns[0].filters[0].capacity 0 must be 1-1048576", refused.StdErr + refused.StdOut);
        Assert.Contains(config, refused.StdErr + refused.StdOut);
    }

    [Fact]
    public async Task Filters_added_and_removed_under_a_real_initiators_writes_and_reads_lose_no_data()
    {
        string qemuImg = Tool.Require("qemu-img");
        using var dir = new TempDirectory();
        string data = Path.Combine(dir.Path, "data");
        InstallSamplePlugin(data);
        string source = Path.Combine(dir.Path, "source.img");
        var content = new byte[96 << 20];
        new Random(41).NextBytes(content);
        await File.WriteAllBytesAsync(source, content);
        string target = UniqueTarget("live");
        var appliance = await ApplianceProcess.StartAsync(dataDirectory: data);
        await using (appliance)
        {
            await appliance.CreateTargetAsync(target, 96L << 20);
            string filters = $"/api/v1/targets/{target}/luns/0/filters";
            string url = appliance.Url(target, 0);
            int changes = 0;
            using var stop = new CancellationTokenSource();
            // Filters that leave data alone go on and off the stack, at the top and the bottom, while the initiator works.
            var churn = Task.Run(async () =>
            {
                while (!stop.IsCancellationRequested)
                {
                    await JsonAsync(await PostAsync(appliance.Http, filters, new { type = "trace", position = 0 }), 201);
                    await JsonAsync(await PostAsync(appliance.Http, filters,
                        new { type = "plugin", assembly = PluginFile, typeName = "ISCSISnap.SamplePlugin.ThrowingFilter", quarantineAfterFaults = 1_000_000 }), 201);
                    await Task.Delay(15);
                    await JsonAsync(await SendAsync(appliance.Http, HttpMethod.Delete, $"{filters}/trace"), 204);
                    await Task.Delay(15);
                    await JsonAsync(await SendAsync(appliance.Http, HttpMethod.Delete, $"{filters}/thrower"), 204);
                    Interlocked.Add(ref changes, 4);
                }
            });
            var write = await Tool.RunAsync(qemuImg, ["convert", "-n", "-f", "raw", "-O", "raw", "-t", "none", source, url], TimeSpan.FromMinutes(3));
            Assert.True(write.ExitCode == 0, write.Output);
            int duringWrite = Volatile.Read(ref changes);
            var compare = await Tool.RunAsync(qemuImg, ["compare", "-f", "raw", "-F", "raw", source, url], TimeSpan.FromMinutes(3));
            stop.Cancel();
            await churn;
            Assert.True(compare.ExitCode == 0, compare.Output);
            Assert.True(duringWrite >= 8, $"only {duringWrite} stack changes while qemu-img wrote");
            Assert.True(Volatile.Read(ref changes) > duringWrite, "no stack change while qemu-img compared");
        }
    }

    [Fact]
    public async Task A_qos_cap_holds_for_a_real_initiator_within_ten_percent_and_changes_live()
    {
        string qemuImg = Tool.Require("qemu-img");
        using var dir = new TempDirectory();
        string target = UniqueTarget("qos");
        var appliance = await ApplianceProcess.StartAsync(dataDirectory: Path.Combine(dir.Path, "data"));
        await using (appliance)
        {
            await appliance.CreateTargetAsync(target, 64L << 20);
            string filters = $"/api/v1/targets/{target}/luns/0/filters";
            await JsonAsync(await PostAsync(appliance.Http, filters, new { type = "qos", iopsPerLun = 250 }), 201);
            const int reads = 1000;   // 4 s at the cap
            var bench = await Tool.RunAsync(qemuImg, ["bench", "-f", "raw", "-c", reads.ToString(), "-d", "16", "-s", "4k", "-t", "none", appliance.Url(target, 0)], TimeSpan.FromMinutes(2));
            Assert.True(bench.ExitCode == 0, bench.Output);
            // qemu-img times its reads alone: its start and its login, which a loaded machine can stretch by a second
            // or more, are not the filter's doing. 25 of the reads go at once (a burst of 0.1 s at the cap).
            double iops = reads / BenchSeconds(bench);
            Assert.InRange(iops, 225, 275);
            var qos = (await GetJsonAsync(appliance.Http, filters)).EnumerateArray().Single();
            Assert.True(qos.GetProperty("counters").GetProperty("deferred").GetInt64() > reads / 2, "most reads waited their turn");

            // Raised live: the catalog and the filter both take the new cap.
            var patched = await JsonAsync(await PatchAsync(appliance.Http, $"{filters}/qos", new { iopsPerLun = 0, bytesPerSecondPerLun = 1L << 30 }), 200);
            Assert.Equal(0, patched.GetProperty("spec").GetProperty("iopsPerLun").GetInt32());
            Assert.Equal(1L << 30, patched.GetProperty("spec").GetProperty("bytesPerSecondPerLun").GetInt64());
            await AssertProblemAsync(await PatchAsync(appliance.Http, $"{filters}/qos", new { iopsPerLun = -1 }), 400, "filter");
            await AssertProblemAsync(await PatchAsync(appliance.Http, $"{filters}/qos", new { sampleEvery = 2 }), 400, "filter");
            bench = await Tool.RunAsync(qemuImg, ["bench", "-f", "raw", "-c", reads.ToString(), "-d", "16", "-s", "4k", "-t", "none", appliance.Url(target, 0)], TimeSpan.FromMinutes(2));
            Assert.True(bench.ExitCode == 0, bench.Output);
            Assert.True(reads / BenchSeconds(bench) > 500, $"uncapped reads ran at {reads / BenchSeconds(bench):F0} IOPS");
        }
    }

    /// <summary>The time <c>qemu-img bench</c> reports for its requests ("Run completed in 4.012 seconds.").</summary>
    private static double BenchSeconds(Tool.Result bench)
    {
        var match = System.Text.RegularExpressions.Regex.Match(bench.Output, @"Run completed in ([0-9.]+) seconds");
        Assert.True(match.Success, $"qemu-img bench did not report its run time:\n{bench.Output}");
        return double.Parse(match.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);
    }

    [Fact]
    public async Task The_checksum_filter_fails_a_read_of_a_corrupted_layer_file_with_medium_error_and_keeps_serving_the_rest()
    {
        using var dir = new TempDirectory();
        string target = UniqueTarget("crc");
        var appliance = await ApplianceProcess.StartAsync(dataDirectory: Path.Combine(dir.Path, "data"));
        await using (appliance)
        {
            var http = appliance.Http;
            await appliance.CreateTargetAsync(target, 16L << 20);
            string filters = $"/api/v1/targets/{target}/luns/0/filters";
            await JsonAsync(await PostAsync(http, filters, new { type = "checksum" }), 201);
            var lun = await GetJsonAsync(http, $"/api/v1/targets/{target}/luns/0");
            var disk = await GetJsonAsync(http, $"/api/v1/disks/{lun.Str("disk")}");
            var before = Pattern(2048, 11, 8);
            var initiator = await LoginAsync(appliance, target);
            await using (initiator)
            {
                await initiator.WriteAsync(2048, before);
                Assert.True((await initiator.RunAsync(Cdb.SynchronizeCache10(), 0)).Good);
                Assert.Equal(before, await initiator.ReadAsync(2048, 8));

                // Snapshot: the written blocks now live in a frozen layer, whose file is corrupted behind the appliance's back.
                await JsonAsync(await PostAsync(http, $"/api/v1/disks/{disk.Str("id")}/snapshots", new { name = "s" }), 201);
                string layer = disk.Str("headPath")!;
                var bytes = await File.ReadAllBytesAsync(layer);
                int at = bytes.AsSpan().IndexOf(before.AsSpan(512 * 3, 512));
                Assert.True(at > 0, "the written sector is in the layer file");
                using (var file = new FileStream(layer, FileMode.Open, FileAccess.Write, FileShare.ReadWrite))
                {
                    file.Position = at + 100;
                    file.WriteByte((byte)(bytes[at + 100] ^ 0x01));
                }

                // Commands whose data does not pass through the stack (UNMAP, WRITE SAME) leave no stale CRC behind.
                await initiator.WriteAsync(4096, Pattern(4096, 12, 16));
                var unmapList = new byte[24];
                unmapList[1] = 22; unmapList[3] = 16;                                     // data length, descriptor length
                System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(unmapList.AsSpan(8), 4096);
                System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(unmapList.AsSpan(16), 8);
                Assert.True((await initiator.RunAsync([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], 0, dataOut: unmapList)).Good);
                Assert.Equal(new byte[8 * 512], await initiator.ReadAsync(4096, 8));
                var writeSame = new byte[16];
                writeSame[0] = 0x93;
                System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(writeSame.AsSpan(2), 4100);
                System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(writeSame.AsSpan(10), 8);
                var block = Pattern(1, 13);
                Assert.True((await initiator.RunAsync(writeSame, 0, dataOut: block)).Good);
                var same = await initiator.ReadAsync(4096, 16);
                Assert.Equal(new byte[4 * 512], same.AsSpan(0, 4 * 512).ToArray());
                for (int i = 4; i < 12; i++) Assert.Equal(block, same.AsSpan(i * 512, 512).ToArray());
                Assert.Equal(Pattern(4096, 12, 16).AsSpan(12 * 512).ToArray(), same.AsSpan(12 * 512).ToArray());

                var read = await initiator.RunAsync(Cdb.Read10(2048, 8), 0, 8 * 512);
                Assert.Equal((byte)0x02, read.Status);                 // CHECK CONDITION
                Assert.Equal((byte)3, read.SenseKey);                  // MEDIUM ERROR
                Assert.Equal((ushort)0x1100, read.AscAscq);            // UNRECOVERED READ ERROR
                Assert.Equal(before.AsSpan(0, 3 * 512).ToArray(), await initiator.ReadAsync(2048, 3));   // the sectors before it still read
                Assert.Equal(before.AsSpan(4 * 512).ToArray(), await initiator.ReadAsync(2052, 4));
                await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
            }
            var checksum = (await GetJsonAsync(http, filters)).EnumerateArray().Single();
            Assert.True(checksum.GetProperty("counters").GetProperty("mismatch").GetInt64() >= 1);
            Assert.True(checksum.GetProperty("counters").GetProperty("verified").GetInt64() >= 8 + 7);
            var metrics = await ScrapeAsync(appliance);
            Assert.Contains("iscsisnap_filter_upcalls_total", metrics.Text);
        }
    }

    [Fact]
    public async Task The_cli_manages_a_luns_filter_stack_and_reports_refusals()
    {
        using var dir = new TempDirectory();
        string target = UniqueTarget("cli");
        var appliance = await ApplianceProcess.StartAsync(dataDirectory: Path.Combine(dir.Path, "data"));
        await using (appliance)
        {
            await appliance.CreateTargetAsync(target, 8L << 20);
            string web = $"http://127.0.0.1:{appliance.WebPort}";
            var added = await RunApplianceAsync("filter", "--web", web, "add", target, "0", "trace", "sampleEvery=2", "capacity=32");
            Assert.True(added.ExitCode == 0, added.ToString());
            added = await RunApplianceAsync("filter", "--web", web, "add", target, "0", "qos", "iopsPerLun=5000", "--position", "0");
            Assert.True(added.ExitCode == 0, added.ToString());
            var list = await RunApplianceAsync("filter", "--web", web, "list", target, "0");
            Assert.True(list.ExitCode == 0, list.ToString());
            var rows = list.StdOut.Split('\n', StringSplitOptions.RemoveEmptyEntries);
            Assert.Contains(" qos ", rows[1]);
            Assert.Contains(" trace ", rows[2]);
            var changed = await RunApplianceAsync("filter", "--web", web, "qos", target, "0", "iopsPerLun=7000");
            Assert.True(changed.ExitCode == 0, changed.ToString());
            var stack = await GetJsonAsync(appliance.Http, $"/api/v1/targets/{target}/luns/0/filters");
            Assert.Equal(7000, stack[0].GetProperty("spec").GetProperty("iopsPerLun").GetInt32());
            Assert.Equal(2, stack[1].GetProperty("spec").GetProperty("sampleEvery").GetInt32());

            var refused = await RunApplianceAsync("filter", "--web", web, "add", target, "0", "trace");
            Assert.Equal(1, refused.ExitCode);
            Assert.Contains("409", refused.StdErr);
            refused = await RunApplianceAsync("filter", "--web", web, "add", target, "0", "qos", "sampleEvery=3");
            Assert.Equal(1, refused.ExitCode);
            Assert.Contains("sampleEvery does not apply to a qos filter", refused.StdErr);
            var usage = await RunApplianceAsync("filter", "--web", web, "add", target, "zero", "qos");
            Assert.Equal(2, usage.ExitCode);
            Assert.Contains("LUN 'zero' is not a number", usage.StdErr);

            var removed = await RunApplianceAsync("filter", "--web", web, "remove", target, "0", "qos");
            Assert.True(removed.ExitCode == 0, removed.ToString());
            var trace = await RunApplianceAsync("filter", "--web", web, "trace", target, "0", "--limit", "5");
            Assert.True(trace.ExitCode == 0, trace.ToString());
            Assert.StartsWith("AT", trace.StdOut);
            Assert.Single((await GetJsonAsync(appliance.Http, $"/api/v1/targets/{target}/luns/0/filters")).EnumerateArray());
        }
    }

    [Fact]
    public async Task Checksums_of_a_merged_snapshot_are_removed_at_the_next_start()
    {
        using var dir = new TempDirectory();
        string data = Path.Combine(dir.Path, "data"), checksums = Path.Combine(data, "checksums");
        string target = UniqueTarget("orphans");
        string snapshotId, headId;
        var appliance = await ApplianceProcess.StartAsync(dataDirectory: data);
        await using (appliance)
        {
            var http = appliance.Http;
            await appliance.CreateTargetAsync(target, 16L << 20);
            await JsonAsync(await PostAsync(http, $"/api/v1/targets/{target}/luns/0/filters", new { type = "checksum" }), 201);
            string diskId = (await GetJsonAsync(http, $"/api/v1/targets/{target}/luns/0")).Str("disk")!;
            var initiator = await LoginAsync(appliance, target);
            await using (initiator)
            {
                await initiator.WriteAsync(0, Pattern(0, 1, 8));
                snapshotId = (await JsonAsync(await PostAsync(http, $"/api/v1/disks/{diskId}/snapshots", new { name = "s" }), 201)).Str("id")!;
                await initiator.WriteAsync(100, Pattern(100, 2, 8));
                await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
            }
            headId = (await GetJsonAsync(http, $"/api/v1/disks/{diskId}")).Str("headId")!;
            var job = await JsonAsync(await SendAsync(http, HttpMethod.Delete, $"/api/v1/disks/{diskId}/snapshots/{snapshotId}"), 202);
            Assert.True(await EventuallyAsync(async () => (await GetJsonAsync(http, $"/api/v1/jobs/{job.Str("id")}")).Str("state") == "Succeeded", TimeSpan.FromSeconds(60)));
            Assert.Equal(0, await appliance.StopAsync());
        }
        Assert.True(File.Exists(Path.Combine(checksums, $"{snapshotId}.crc")), "the merged snapshot's checksums outlive it until the next start");
        Assert.True(File.Exists(Path.Combine(checksums, $"{headId}.crc")));

        appliance = await ApplianceProcess.StartAsync(dataDirectory: data);
        await using (appliance)
        {
            Assert.False(File.Exists(Path.Combine(checksums, $"{snapshotId}.crc")));
            Assert.True(File.Exists(Path.Combine(checksums, $"{headId}.crc")));
            var initiator = await LoginAsync(appliance, target);
            await using (initiator)
            {
                Assert.Equal(Pattern(0, 1, 8), await initiator.ReadAsync(0, 8));       // merged into the head: unverified, intact
                Assert.Equal(Pattern(100, 2, 8), await initiator.ReadAsync(100, 8));   // written to the head: verified
                await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
            }
            var counters = (await GetJsonAsync(appliance.Http, $"/api/v1/targets/{target}/luns/0/filters")).EnumerateArray().Single().GetProperty("counters");
            Assert.Equal(8, counters.GetProperty("verified").GetInt64());
        }
    }
}
