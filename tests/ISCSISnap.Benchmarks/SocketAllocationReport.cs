using System.Diagnostics;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Scsi;
using Microsoft.Extensions.Logging.Abstractions;

namespace ISCSISnap.Benchmarks;

/// <summary>
/// <c>alloc-socket [seconds] [iscsi-perf arguments...]</c>: serves a LUN from an in-process portal on a loopback
/// port, drives it with libiscsi's <c>iscsi-perf</c> (default: random 4 KiB reads, 32 in flight) and prints the
/// bytes this process allocated per SCSI command on the real socket path.
/// </summary>
public static class SocketAllocationReport
{
    private sealed class Counting : ITargetMetrics
    {
        public long Commands;
        public void CommandCompleted(CommandKind kind, long bytes, double seconds, bool failed) => Interlocked.Increment(ref Commands);
        public void LoginAttempt(bool succeeded, string reason) { }
        public void SessionOpened() { }
        public void SessionClosed() { }
        public void ProtocolError(string kind) { }
        public void TaskManagement(string function) { }
        public void ConnectionClosed(string how) { }
    }

    public static int Run(ReadOnlySpan<string> args)
    {
        int seconds = args.Length > 0 && int.TryParse(args[0], out int s) ? s : 5;
        string[] perf = args.Length > 1 ? args[1..].ToArray() : ["-r", "-m", "32", "-b", "8"];
        return RunAsync(seconds, perf).GetAwaiter().GetResult();
    }

    private static async Task<int> RunAsync(int seconds, string[] perfArguments)
    {
        string directory = Path.Combine(Path.GetTempPath(), "iscsisnap-alloc-" + Guid.NewGuid().ToString("N")[..12]);
        Directory.CreateDirectory(directory);
        var device = FileBlockDevice.Create(Path.Combine(directory, "lun0.img"), 256L << 20);
        var fill = new byte[1 << 20];
        new Random(1).NextBytes(fill);
        for (long offset = 0; offset < device.Length; offset += fill.Length)
            await device.WriteAsync(offset, new(fill), WriteFlags.None);
        var registry = new TargetRegistry();
        var target = new IscsiTarget("iqn.2026-11.io.iscsisnap.bench:socket", null, TargetAccess.Open);
        registry.TryAdd(target);
        var metrics = new Counting();
        await using var portal = new IscsiPortal(new IscsiPortalOptions { Portal = "127.0.0.1:0" }, registry, NullLoggerFactory.Instance, metrics);
        target.AddLun(0, new LogicalUnit(new LogicalUnitIdentity(Guid.NewGuid()), device) { TargetName = target.Name });
        portal.Start();
        string url = $"iscsi://127.0.0.1:{portal.LocalEndPoint!.Port}/{target.Name}/0";

        await RunPerf(1, perfArguments, url);   // warm-up: tiered compilation, pools
        long commandsBefore = Interlocked.Read(ref metrics.Commands);
        long allocatedBefore = GC.GetTotalAllocatedBytes(precise: true);
        int gen0Before = GC.CollectionCount(0);
        string output = await RunPerf(seconds, perfArguments, url);
        long allocated = GC.GetTotalAllocatedBytes(precise: true) - allocatedBefore;
        long commands = Interlocked.Read(ref metrics.Commands) - commandsBefore;
        Console.WriteLine(output.Trim().Split('\n').LastOrDefault(l => l.Contains("iops", StringComparison.OrdinalIgnoreCase)) ?? output);
        Console.WriteLine($"socket: {commands} commands in {seconds} s, {(double)allocated / Math.Max(1, commands):F1} B/command allocated " +
            $"({allocated} B in all, {GC.CollectionCount(0) - gen0Before} gen0 collections)");
        try { Directory.Delete(directory, recursive: true); } catch (IOException) { }
        return 0;
    }

    private static async Task<string> RunPerf(int seconds, string[] arguments, string url)
    {
        var start = new ProcessStartInfo("iscsi-perf") { RedirectStandardOutput = true, RedirectStandardError = true };
        start.ArgumentList.Add("-t");
        start.ArgumentList.Add(seconds.ToString());
        foreach (var a in arguments) start.ArgumentList.Add(a);
        start.ArgumentList.Add(url);
        using var process = Process.Start(start)!;
        string output = await process.StandardOutput.ReadToEndAsync() + await process.StandardError.ReadToEndAsync();
        await process.WaitForExitAsync();
        return output;
    }
}
