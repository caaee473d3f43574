using System.Text.Json;
using ISCSISnap.Tests.Support;
using ISCSISnap.Tests.Web;
using Xunit;
using Xunit.Abstractions;
using static ISCSISnap.Tests.Web.WebTest;

namespace ISCSISnap.Tests.Clients;

/// <summary>
/// SIGKILL at random moments while an initiator writes with FUA and SYNCHRONIZE CACHE into a chain (and snapshots
/// are being taken): after each restart every acknowledged write is there, the chain map agrees with the images,
/// and after a clean stop qemu-img finds the dynamic layers clean. ISCSISNAP_CRASH_ITERATIONS sets the number of
/// kills (tests/crash-test.sh runs many).
/// </summary>
public sealed class CrashTests(ITestOutputHelper output)
{
    private const int Blocks = 16384;   // 8 MiB LUN of 512-byte blocks
    private const int MaxBlocksPerWrite = 64;

    [Fact]
    public async Task Acknowledged_writes_survive_sigkill_of_the_appliance()
    {
        string qemuImg = Tool.Require("qemu-img");
        int iterations = int.TryParse(Environment.GetEnvironmentVariable("ISCSISNAP_CRASH_ITERATIONS"), out int n) ? n : 4;
        int seed = int.TryParse(Environment.GetEnvironmentVariable("ISCSISNAP_CRASH_SEED"), out int s) ? s : Environment.TickCount;
        output.WriteLine($"seed {seed}, {iterations} kills");
        var random = new Random(seed);
        using var dir = new TempDirectory();
        string data = Path.Combine(dir.Path, "data");
        string target = UniqueTarget("crash");

        // The durable content, per block: the seed of the pattern last acknowledged (0 = never written: zeros),
        // and for the one write in flight at the kill, the seed that may or may not have landed.
        var acknowledged = new ulong[Blocks];
        var inFlight = new Dictionary<int, ulong>();
        ulong nextSeed = 1;
        string diskId;

        var appliance = await ApplianceProcess.StartAsync(dataDirectory: data);
        try
        {
            await JsonAsync(await PostAsync(appliance.Http, "/api/v1/targets", new { name = target }), 201);
            var lun = await JsonAsync(await PostAsync(appliance.Http, $"/api/v1/targets/{target}/luns", new { lun = 0, sizeBytes = (long)Blocks * 512 }), 201);
            diskId = lun.Str("disk")!;
            // Every read of the check passes the checksum filter (a false MEDIUM ERROR after a kill fails the test).
            await JsonAsync(await PostAsync(appliance.Http, $"/api/v1/targets/{target}/luns/0/filters", new { type = "checksum", onFault = "fail" }), 201);
            for (int iteration = 0; iteration < iterations; iteration++)
            {
                await VerifyAsync(appliance, target, diskId, acknowledged, inFlight, $"before kill {iteration}");
                inFlight.Clear();
                // Writes run until the kill; snapshots are taken meanwhile so kills also land around them.
                var initiator = await LoginAsync(appliance, target);
                using var stop = new CancellationTokenSource();
                var writer = Task.Run(async () =>
                {
                    while (!stop.IsCancellationRequested)
                    {
                        int blocks = random.Next(1, MaxBlocksPerWrite + 1);
                        int lba = random.Next(0, Blocks - blocks + 1);
                        bool fua = random.Next(2) == 0;
                        ulong seedOfWrite = nextSeed++;
                        var pattern = new byte[blocks * 512];
                        for (int b = 0; b < blocks; b++) Pattern((ulong)(lba + b), seedOfWrite).CopyTo(pattern, b * 512);
                        for (int b = 0; b < blocks; b++) inFlight[lba + b] = seedOfWrite;
                        try
                        {
                            var result = await initiator.RunAsync(Cdb.Write10((uint)lba, (ushort)blocks, fua ? (byte)0x08 : (byte)0), dataOut: pattern);
                            if (result.Status != 0) throw new InvalidOperationException($"WRITE failed with status {result.Status}");
                            if (!fua)
                            {
                                // Acknowledged but volatile until SYNCHRONIZE CACHE returns.
                                var sync = await initiator.RunAsync(Cdb.SynchronizeCache10());
                                if (sync.Status != 0) throw new InvalidOperationException($"SYNCHRONIZE CACHE failed with status {sync.Status}");
                            }
                        }
                        catch (Exception) when (stop.IsCancellationRequested)
                        {
                            return;
                        }
                        for (int b = 0; b < blocks; b++) acknowledged[lba + b] = seedOfWrite;
                        inFlight.Clear();
                    }
                });
                int delay = random.Next(150, 1500);
                int action = random.Next(3);
                await Task.Delay(delay / 2);
                if (action == 0)
                {
                    using var snapshot = await PostAsync(appliance.Http, $"/api/v1/disks/{diskId}/snapshots", new { name = $"crash {iteration}" });
                }
                else if (action == 1)
                {
                    // Merge the oldest snapshot away while the writes go on; the kill may land in the middle of it.
                    var snapshots = await GetJsonAsync(appliance.Http, $"/api/v1/disks/{diskId}/snapshots");
                    if (snapshots.GetArrayLength() > 0)
                        using (await SendAsync(appliance.Http, HttpMethod.Delete, $"/api/v1/disks/{diskId}/snapshots/{snapshots[0].Str("id")}")) { }
                }
                await Task.Delay(delay / 2);
                Assert.False(writer.IsFaulted, writer.Exception?.ToString());
                stop.Cancel();
                await appliance.KillAsync();
                await writer.WaitAsync(TimeSpan.FromSeconds(30));
                await initiator.DisposeAsync();
                output.WriteLine($"kill {iteration} after {delay} ms{(action == 0 ? ", snapshot taken" : action == 1 ? ", merge started" : "")}, {nextSeed - 1} writes so far");
                appliance = await ApplianceProcess.StartAsync(dataDirectory: data);
            }
            await VerifyAsync(appliance, target, diskId, acknowledged, inFlight, "after the last kill");
            var checksum = (await GetJsonAsync(appliance.Http, $"/api/v1/targets/{target}/luns/0/filters")).EnumerateArray().Single();
            Assert.Equal("checksum", checksum.Str("name"));   // reinstalled from the catalog at every restart
            Assert.Equal(0, checksum.GetProperty("faults").GetInt64());
            Assert.False(checksum.GetProperty("counters").TryGetProperty("mismatch", out _), checksum.ToString());
            output.WriteLine($"checksum filter after the last restart: {checksum.GetProperty("counters")}");
            Assert.Equal(0, await appliance.StopAsync());
        }
        finally
        {
            await appliance.DisposeAsync();
        }

        // After a clean stop every dynamic layer (no parent) passes qemu-img check.
        foreach (var file in Directory.GetFiles(Path.Combine(data, "disks"), "*.vhdx"))
        {
            var info = await Tool.RunAsync(qemuImg, ["info", "--output=json", file]);
            if (info.ExitCode != 0) continue;   // QEMU cannot open differencing files
            var check = await Tool.RunAsync(qemuImg, ["check", "-f", "vhdx", file]);
            Assert.True(check.ExitCode == 0, $"{file}: {check.Output}");
        }
    }

    private static async Task VerifyAsync(ApplianceProcess appliance, string target, string diskId, ulong[] acknowledged, Dictionary<int, ulong> inFlight, string when)
    {
        // A merge the kill interrupted resumes at start; the map is compared once it is done.
        Assert.True(await EventuallyAsync(async () =>
            (await GetJsonAsync(appliance.Http, "/api/v1/jobs")).EnumerateArray().All(j => j.Str("state") != "Running"), TimeSpan.FromSeconds(60)),
            $"{when}: a merge did not finish");
        var disk = await GetJsonAsync(appliance.Http, $"/api/v1/disks/{diskId}");
        Assert.True(disk.GetProperty("merge").ValueKind == JsonValueKind.Null, $"{when}: a merge is still pending: {disk}");
        var check = await JsonAsync(await SendAsync(appliance.Http, HttpMethod.Post, $"/api/v1/disks/{diskId}/check"), 200);
        Assert.True(check.GetProperty("mapAgreesWithImages").GetBoolean(), $"{when}: the chain map disagrees with the images at sector {check.GetProperty("firstDisagreeingSector")}");
        var initiator = await LoginAsync(appliance, target);
        await using (initiator)
        {
            for (int lba = 0; lba < Blocks; lba += 256)
            {
                var bytes = await initiator.ReadAsync((uint)lba, 256);
                for (int b = 0; b < 256; b++)
                {
                    var block = bytes.AsSpan(b * 512, 512);
                    ulong expected = acknowledged[lba + b];
                    bool matches = expected == 0 ? block.IndexOfAnyExcept((byte)0) < 0 : block.SequenceEqual(Pattern((ulong)(lba + b), expected));
                    if (!matches && inFlight.TryGetValue(lba + b, out var maybe) && block.SequenceEqual(Pattern((ulong)(lba + b), maybe)))
                    {
                        // The write in flight at the kill landed: from now on it is what the block holds.
                        acknowledged[lba + b] = maybe;
                        matches = true;
                    }
                    Assert.True(matches, $"{when}: block {lba + b} lost its acknowledged write (seed {expected})");
                }
            }
            await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
        }
    }
}
