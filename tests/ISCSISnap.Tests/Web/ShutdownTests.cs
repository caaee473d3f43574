using System.Collections.Concurrent;
using System.Diagnostics;
using System.Text.Json;
using ISCSISnap.Tests.Support;
using Xunit;
using Xunit.Abstractions;
using static ISCSISnap.Tests.Web.WebTest;

namespace ISCSISnap.Tests.Web;

/// <summary>SIGTERM and SIGKILL of the real executable: nothing acknowledged is lost, the catalog opens again.</summary>
public sealed class ShutdownTests(ITestOutputHelper output)
{
    [Fact]
    public async Task Sigterm_during_writes_exits_0_within_seconds_and_every_acknowledged_write_reads_back()
    {
        using var data = new TempDirectory();
        string name = UniqueTarget("sigterm");
        const long lunBytes = 1L << 30;   // room for writers to keep going until the shutdown cuts them off
        const uint blocks = (uint)(lunBytes / 512);
        ulong seed = (ulong)Random.Shared.NextInt64();
        var acknowledged = new ConcurrentDictionary<uint, byte>();
        int failedAfterSignal = 0;
        TimeSpan stopping;
        int exitCode;

        var first = await ApplianceProcess.StartAsync(dataDirectory: data.Path);
        try
        {
            await first.CreateTargetAsync(name, lunBytes);
            var initiator = await LoginAsync(first, name);
            await using (initiator)
            {
                int next = -1;
                async Task WriterAsync()
                {
                    while (true)
                    {
                        uint lba = (uint)Interlocked.Increment(ref next);
                        if (lba >= blocks) return;
                        ScsiResult result;
                        try
                        {
                            result = await initiator.ExecuteAsync(Cdb.Write10(lba, 1), dataOut: Pattern(lba, seed)).WaitAsync(TimeSpan.FromSeconds(20));
                        }
                        catch (Exception)
                        {
                            // Connection closed by the shutdown: this write was never acknowledged.
                            Interlocked.Increment(ref failedAfterSignal);
                            return;
                        }
                        if (!result.Good)
                        {
                            Interlocked.Increment(ref failedAfterSignal);
                            return;
                        }
                        acknowledged[lba] = 0;
                    }
                }
                var writers = Enumerable.Range(0, 8).Select(_ => Task.Run(WriterAsync)).ToArray();
                Assert.True(await EventuallyAsync(() => Task.FromResult(acknowledged.Count >= 500)), "writes should be flowing before the signal");
                Assert.False(writers.Any(w => w.IsCompleted), "every writer should still be writing when SIGTERM arrives");

                int beforeSignal = acknowledged.Count;
                var clock = Stopwatch.StartNew();
                exitCode = await first.StopAsync(TimeSpan.FromSeconds(25));
                stopping = clock.Elapsed;
                await Task.WhenAll(writers).WaitAsync(TimeSpan.FromSeconds(30));
                output.WriteLine($"{beforeSignal} writes acknowledged before SIGTERM, {acknowledged.Count} in all, {failedAfterSignal} writers cut off; exit {exitCode} after {stopping.TotalSeconds:F2} s");
            }
        }
        finally
        {
            await first.DisposeAsync();
        }
        Assert.True(exitCode == 0, $"exit code {exitCode}:\n{first.Output}");
        Assert.True(stopping < TimeSpan.FromSeconds(8), $"the appliance took {stopping.TotalSeconds:F1} s to stop:\n{first.Output}");
        Assert.True(acknowledged.Count < blocks, "the writers should have been cut off by the shutdown, not have run out of LBAs");

        var second = await ApplianceProcess.StartAsync(dataDirectory: data.Path);
        await using (second)
        {
            var initiator = await LoginAsync(second, name);
            await using (initiator)
            {
                uint last = acknowledged.Keys.Max();
                var lost = new List<uint>();
                for (uint start = 0; start <= last; start += 256)
                {
                    int count = (int)Math.Min(256, last + 1 - start);
                    var read = await initiator.ReadAsync(start, count);
                    for (int i = 0; i < count; i++)
                    {
                        uint lba = start + (uint)i;
                        if (acknowledged.ContainsKey(lba) && !read.AsSpan(i * 512, 512).SequenceEqual(Pattern(lba, seed))) lost.Add(lba);
                    }
                }
                Assert.True(lost.Count == 0,
                    $"{lost.Count} of {acknowledged.Count} acknowledged writes did not survive the SIGTERM restart, e.g. LBA {string.Join(", ", lost.Take(10))}");
                await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
            }
        }
    }

    [Fact]
    public async Task Sigkill_after_fua_writes_and_synchronize_cache_loses_nothing_acknowledged()
    {
        using var data = new TempDirectory();
        string name = UniqueTarget("sigkill");
        ulong seed = (ulong)Random.Shared.NextInt64();
        const byte fua = 0x08;

        var first = await ApplianceProcess.StartAsync(dataDirectory: data.Path);
        try
        {
            await first.CreateTargetAsync(name, 16L << 20);
            await JsonAsync(await PutAsync(first.Http, $"/api/v1/targets/{name}/acl", new { allowedInitiators = new[] { Initiator } }), 200);
            var initiator = await LoginAsync(first, name);
            await using (initiator)
            {
                for (uint i = 0; i < 64; i++)
                    await initiator.WriteAsync(i * 8, Pattern(i * 8, seed, 8), flags: fua);           // WRITE(10) FUA
                for (uint i = 0; i < 64; i++)
                    await initiator.WriteAsync(8192 + i * 8, Pattern(8192 + i * 8, seed, 8));          // cached ...
                var sync = await initiator.RunAsync(Cdb.SynchronizeCache10());                          // ... then synchronized
                Assert.True(sync.Good, $"SYNCHRONIZE CACHE: status {sync.Status}");
                await initiator.WriteAsync(20000, Pattern(20000, seed, 8), flags: fua);                // the last thing before the kill
                await first.KillAsync();
            }
        }
        finally
        {
            await first.DisposeAsync();
        }

        var second = await ApplianceProcess.StartAsync(dataDirectory: data.Path);
        await using (second)
        {
            Assert.Equal("ok", (await GetJsonAsync(second.Http, "/healthz")).Str("status"));
            var target = await GetJsonAsync(second.Http, $"/api/v1/targets/{name}");
            var lun = Assert.Single(target.GetProperty("luns").EnumerateArray());
            Assert.Equal(16L << 20, lun.GetProperty("sizeBytes").GetInt64());
            Assert.Equal([Initiator], target.GetProperty("allowedInitiators").EnumerateArray().Select(e => e.GetString()));
            Assert.Contains((await GetJsonAsync(second.Http, "/api/v1/targets")).EnumerateArray(), t => t.Str("name") == ApplianceProcess.DemoTarget);

            var initiator = await LoginAsync(second, name);
            await using (initiator)
            {
                var fuaData = await initiator.ReadAsync(0, 512);
                for (uint i = 0; i < 64; i++)
                    Assert.True(fuaData.AsSpan((int)i * 8 * 512, 8 * 512).SequenceEqual(Pattern(i * 8, seed, 8)), $"FUA write at LBA {i * 8} lost");
                var synced = await initiator.ReadAsync(8192, 512);
                for (uint i = 0; i < 64; i++)
                    Assert.True(synced.AsSpan((int)i * 8 * 512, 8 * 512).SequenceEqual(Pattern(8192 + i * 8, seed, 8)), $"synchronized write at LBA {8192 + i * 8} lost");
                Assert.Equal(Pattern(20000, seed, 8), await initiator.ReadAsync(20000, 8));
                await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
            }
            // The catalog is writable again after the crash.
            string next = UniqueTarget("after-kill");
            await second.CreateTargetAsync(next, 1L << 20);
            Assert.Equal(next, (await GetJsonAsync(second.Http, $"/api/v1/targets/{next}")).Str("name"));
        }
    }

    [Fact]
    public async Task A_clean_sigterm_shutdown_flushes_and_logs_no_errors()
    {
        using var data = new TempDirectory();
        string name = UniqueTarget("clean");
        var appliance = await ApplianceProcess.StartAsync(dataDirectory: data.Path);
        try
        {
            await appliance.CreateTargetAsync(name, 4L << 20);
            var initiator = await LoginAsync(appliance, name);
            await using (initiator)
            {
                await initiator.WriteAsync(0, Pattern(0, 5, 8));
                await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
            }
            Assert.Equal(0, await appliance.StopAsync(TimeSpan.FromSeconds(20)));
        }
        finally
        {
            await appliance.DisposeAsync();
        }
        var lines = LogLines(data.Path);
        Assert.Contains(lines, l => l.Contains("ISCSISnap stopped; all devices flushed", StringComparison.Ordinal));
        var bad = lines.Where(l => JsonDocument.Parse(l).RootElement.Str("@l") is "Error" or "Fatal").ToList();
        Assert.True(bad.Count == 0, "a clean shutdown logged errors:\n" + string.Join("\n", bad));
        Assert.DoesNotContain(" FTL] ", appliance.Output);
        Assert.DoesNotContain(" ERR] ", appliance.Output);
    }
}
