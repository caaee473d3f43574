using BenchmarkDotNet.Running;

namespace ISCSISnap.Benchmarks;

/// <summary>
/// Runs the benchmarks through BenchmarkDotNet's command line, for example
/// <c>dotnet run -c Release --project tests/ISCSISnap.Benchmarks -- --filter '*'</c>, with <c>--job short</c> for a
/// quick pass or <c>--list flat</c> to see them. <c>-- alloc-report</c> instead runs the in-process READ and
/// WRITE round trips outside BenchmarkDotNet and prints what they allocate, by type (see <see cref="AllocationReport"/>);
/// <c>-- alloc-socket</c> measures allocation per command on the real socket path under iscsi-perf (see <see cref="SocketAllocationReport"/>);
/// <c>-- chain-depth</c> compares read latency through chains of depth 1-64 in alternating rounds (see <see cref="ChainDepthReport"/>).
/// </summary>
public static class Program
{
    public static int Main(string[] args)
    {
        if (args.Length > 0 && args[0] == "alloc-report")
            return AllocationReport.Run(args.AsSpan(1));
        if (args.Length > 0 && args[0] == "alloc-socket")
            return SocketAllocationReport.Run(args.AsSpan(1));
        if (args.Length > 0 && args[0] == "chain-depth")
            return ChainDepthReport.Run(args.AsSpan(1));
        BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
        return 0;
    }
}
