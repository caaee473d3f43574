using System.Diagnostics;
using System.Diagnostics.Tracing;
using ISCSISnap.Benchmarks.Support;
using Microsoft.Diagnostics.NETCore.Client;
using Microsoft.Diagnostics.Tracing.Etlx;
using Microsoft.Diagnostics.Tracing.Parsers.Clr;

namespace ISCSISnap.Benchmarks;

/// <summary>
/// <c>alloc-report [read|batch|write] [operations] [--stacks]</c>: runs one in-process round trip outside
/// BenchmarkDotNet, warms it up, and prints the bytes allocated per operation on all threads. With
/// <c>--stacks</c> it then repeats the run under an in-process EventPipe session (GC AllocationTick, one sample
/// about every 100 KB, with call stacks) and prints the sampled allocations by type and by managed call stack.
/// </summary>
public static class AllocationReport
{
    public static int Run(ReadOnlySpan<string> args)
    {
        string kind = args.Length > 0 && !args[0].StartsWith('-') ? args[0] : "read";
        int operations = args.Length > 1 && int.TryParse(args[1], out int n) ? n : 200_000;
        bool stacks = args.Contains("--stacks");
        return RunAsync(kind, operations, stacks).GetAwaiter().GetResult();
    }

    private static async Task<int> RunAsync(string kind, int operations, bool stacks)
    {
        await using var target = await BenchTarget.StartAsync();
        var initiator = target.Initiator;
        var data = new byte[4096];
        if (kind is not ("read" or "batch" or "write")) throw new ArgumentException($"unknown kind '{kind}' (read, batch, write)");
        int perCall = kind == "batch" ? 32 : 1;
        const uint cached = 8192;   // the first 4 MiB, in 512-byte blocks
        uint lba = 0;

        // One loop, no per-call async wrapper: this method's state machine is allocated once, so whatever is
        // allocated per operation is the target's (and the in-memory transport's).
        async Task Loop(int count)
        {
            for (int i = 0; i < count; i++)
            {
                if (kind == "read") await initiator.ReadAsync(lba, 4096);
                else if (kind == "batch") await initiator.ReadBatchAsync(lba, 4096, 32, cached);
                else await initiator.WriteAsync(cached + lba, data);
                lba = (lba + 8 * (uint)perCall) % cached;
            }
        }

        // Warm up past tiered compilation (tier-1 with PGO), then measure.
        await Loop(30_000 / perCall + 1000);
        await Task.Delay(500);
        await Loop(5_000);

        int calls = Math.Max(1, operations / perCall);
        long before = GC.GetTotalAllocatedBytes(precise: true);
        var watch = Stopwatch.StartNew();
        await Loop(calls);
        watch.Stop();
        long allocated = GC.GetTotalAllocatedBytes(precise: true) - before;
        int total = calls * perCall;
        Console.WriteLine($"login: {initiator.LoginPdus} Login PDU(s)");
        Console.WriteLine($"{kind}: {total} operations, {watch.Elapsed.TotalMicroseconds / total:F2} us/op, " +
            $"{(double)allocated / total:F1} B/op allocated ({allocated} B on all threads)");
        if (!stacks) return 0;

        string trace = Path.Combine(Path.GetTempPath(), $"iscsisnap-alloc-{Environment.ProcessId}.nettrace");
        var providers = new[]
        {
            // GC (AllocationTick) at verbose; Loader and JIT so managed frames resolve to method names.
            new EventPipeProvider("Microsoft-Windows-DotNETRuntime", EventLevel.Verbose, 0x1 | 0x8 | 0x10),
        };
        var client = new DiagnosticsClient(Environment.ProcessId);
        using (var session = client.StartEventPipeSession(providers, requestRundown: true, circularBufferMB: 256))
        {
            var copy = Task.Run(async () =>
            {
                await using var file = File.Create(trace);
                await session.EventStream.CopyToAsync(file);
            });
            await Loop(calls);
            await session.StopAsync(CancellationToken.None);
            await copy;
        }
        Summarize(trace, allocated / (double)total);
        return 0;
    }

    private static void Summarize(string nettrace, double bytesPerOperation)
    {
        string etlx = TraceLog.CreateFromEventPipeDataFile(nettrace);
        using var log = new TraceLog(etlx);
        var byType = new Dictionary<string, (int Samples, long Bytes)>();
        var byStack = new Dictionary<string, int>();
        int samples = 0;
        foreach (var e in log.Events)
        {
            if (e is not GCAllocationTickTraceData tick) continue;
            samples++;
            var type = tick.TypeName ?? "?";
            byType[type] = byType.GetValueOrDefault(type) is var (s, b) ? (s + 1, b + tick.AllocationAmount64) : (1, 0);
            var frames = new List<string>();
            for (var frame = e.CallStack(); frame is not null && frames.Count < 14; frame = frame.Caller)
            {
                string name = frame.CodeAddress.FullMethodName;
                if (string.IsNullOrEmpty(name)) name = $"{frame.CodeAddress.ModuleName}!0x{frame.CodeAddress.Address:x}";
                frames.Add(name);
            }
            string key = $"{type}\n      " + string.Join("\n      ", frames);
            byStack[key] = byStack.GetValueOrDefault(key) + 1;
        }
        Console.WriteLine($"\n{samples} AllocationTick samples; share of the {bytesPerOperation:F1} B/op by type:");
        foreach (var (type, (count, _)) in byType.OrderByDescending(t => t.Value.Samples))
            Console.WriteLine($"  {100.0 * count / samples,5:F1}%  ~{bytesPerOperation * count / samples,6:F1} B/op  {type}");
        Console.WriteLine("\nby allocating stack (innermost first):");
        foreach (var (stack, count) in byStack.OrderByDescending(s => s.Value).Take(12))
            Console.WriteLine($"  {100.0 * count / samples,5:F1}%  {stack}\n");
        File.Delete(nettrace);
        File.Delete(etlx);
    }
}
