using BenchmarkDotNet.Attributes;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Filters;

namespace ISCSISnap.Benchmarks;

/// <summary>
/// A 4 KiB read (page-cache hit) through the filter engine: no filter (the engine steps aside), one pass-through
/// filter on the kernel context's IO workers, and one run on the caller's flow. The difference is an upcall's cost
/// (per read; each invocation is 64 reads in a row, so the hop onto a worker is paid once per 64).
/// </summary>
[MemoryDiagnoser]
public class FilterEngineBenchmarks
{
    private sealed class PassThrough : IIoFilter
    {
        public string Name => "pass";
        public ValueTask<FilterVerdict> OnReadAsync(Upcall upcall) => ValueTask.FromResult(FilterVerdict.Pass);
        public ValueTask<FilterVerdict> OnWriteAsync(Upcall upcall) => ValueTask.FromResult(FilterVerdict.Pass);
    }

    private string _path = null!;
    private FileBlockDevice _device = null!;
    private KernelContext _kernel = null!;
    private FilterEngine _empty = null!, _onWorkers = null!, _inline = null!;
    private readonly byte[] _buffer = GC.AllocateArray<byte>(4096, pinned: true);
    private long _offset;

    [GlobalSetup]
    public void Setup()
    {
        _path = Path.Combine(Path.GetTempPath(), "iscsisnap-filter-bench-" + Guid.NewGuid().ToString("N")[..8]);
        var data = new byte[4 << 20];
        new Random(1).NextBytes(data);
        File.WriteAllBytes(_path, data);
        _device = FileBlockDevice.Open(_path);
        _kernel = new KernelContext(workers: 2);
        _empty = new FilterEngine(_device, "lun0", kernel: _kernel);
        _onWorkers = new FilterEngine(_device, "lun0", kernel: _kernel);
        _onWorkers.Add(new PassThrough());
        _inline = new FilterEngine(_device, "lun0");
        _inline.Add(new PassThrough());
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _kernel.Dispose();
        _device.DisposeAsync().AsTask().GetAwaiter().GetResult();
        File.Delete(_path);
    }

    private RequestContext Next()
    {
        long offset = _offset;
        _offset = (offset + 4096) % (4 << 20);
        return new RequestContext("lun0", "iqn.bench:init", "nexus", IoOperation.Read, offset, 4096, DateTimeOffset.MaxValue);
    }

    private const int Batch = 64;

    /// <summary>64 reads one after another (queue depth 1) as an IO flow does: after the first hop it stays on its worker.</summary>
    private async Task ReadBatch(FilterEngine engine)
    {
        for (int i = 0; i < Batch; i++)
        {
            var status = await engine.ReadAsync(Next(), _buffer);
            if (status != IoStatus.Ok) throw new InvalidOperationException($"read failed: {status}");
        }
    }

    [Benchmark(Baseline = true, Description = "4 KiB read, empty filter stack", OperationsPerInvoke = Batch)]
    public Task Empty() => ReadBatch(_empty);

    [Benchmark(Description = "4 KiB read, pass-through filter on an IO worker", OperationsPerInvoke = Batch)]
    public Task PassOnWorker() => ReadBatch(_onWorkers);

    [Benchmark(Description = "4 KiB read, pass-through filter on the caller's flow", OperationsPerInvoke = Batch)]
    public Task PassInline() => ReadBatch(_inline);
}
