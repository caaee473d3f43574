using System.Buffers;
using BenchmarkDotNet.Attributes;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Disks;

namespace ISCSISnap.Benchmarks;

/// <summary>
/// Random 4 KiB reads through snapshot chains of depth 1, 8, 32 and 64 where every layer owns an interleaved slice
/// of the blocks (block b was last written by layer b mod depth), so each read resolves to a different layer. The
/// chain map makes the cost independent of depth; the data sits in the page cache so the lookup is what differs.
/// </summary>
[MemoryDiagnoser]
public class ChainReadBenchmarks
{
    private const long DiskBytes = 256L << 20;
    private const int BlockBytes = 4096;
    private const int Reads = 1024;

    [Params(1, 8, 32, 64)]
    public int Depth { get; set; }

    private string _directory = null!;
    private DiskManager _manager = null!;
    private ChainDevice _device = null!;
    private readonly byte[] _buffer = GC.AllocateArray<byte>(BlockBytes, pinned: true);
    private long[] _offsets = null!;

    [GlobalSetup]
    public void Setup()
    {
        _directory = Path.Combine(Path.GetTempPath(), "iscsisnap-chain-bench-" + Guid.NewGuid().ToString("N")[..8]);
        _manager = DiskManager.Open(_directory);
        var disk = _manager.CreateAsync("bench", DiskBytes, 512, blockSize: 2 << 20).GetAwaiter().GetResult();
        _device = _manager.AttachAsync(disk.Id).GetAwaiter().GetResult();
        var data = new byte[BlockBytes];
        new Random(1).NextBytes(data);
        long blocks = DiskBytes / BlockBytes;
        for (int layer = 0; layer < Depth; layer++)
        {
            for (long block = layer; block < blocks; block += Depth)
            {
                var status = _device.WriteAsync(block * BlockBytes, new ReadOnlySequence<byte>(data), WriteFlags.None).AsTask().GetAwaiter().GetResult();
                if (status != IoStatus.Ok) throw new InvalidOperationException($"setup write failed: {status}");
            }
            if (layer < Depth - 1) _manager.SnapshotAsync(disk.Id, $"layer {layer}").GetAwaiter().GetResult();
        }
        if (_manager.GetDisk(disk.Id).Chain.Count != Depth) throw new InvalidOperationException("unexpected chain depth");
        var random = new Random(2);
        _offsets = Enumerable.Range(0, Reads).Select(_ => random.NextInt64(blocks) * BlockBytes).ToArray();
        foreach (var offset in _offsets) _device.ReadAsync(offset, _buffer).AsTask().GetAwaiter().GetResult();   // warm the page cache
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _manager.DisposeAsync().AsTask().GetAwaiter().GetResult();
        Directory.Delete(_directory, recursive: true);
    }

    /// <summary>One random 4 KiB read at a time (queue depth 1); the time is per read.</summary>
    [Benchmark(Description = "random 4 KiB read through the chain", OperationsPerInvoke = Reads)]
    public async Task RandomRead4K()
    {
        foreach (var offset in _offsets)
        {
            var status = await _device.ReadAsync(offset, _buffer);
            if (status != IoStatus.Ok) throw new InvalidOperationException($"read failed: {status}");
        }
    }
}

/// <summary>
/// Taking a snapshot of a disk with data in it, at 1 GiB and 1 TiB virtual size: flush, freeze the head, create the
/// new head, commit the records, save the chain map. Each iteration starts from a fresh single-layer disk.
/// </summary>
public class SnapshotBenchmarks
{
    [Params(1L << 30, 1L << 40)]
    public long VirtualSize { get; set; }

    private string _directory = null!;
    private DiskManager _manager = null!;
    private Guid _disk;

    [IterationSetup]
    public void Setup()
    {
        _directory = Path.Combine(Path.GetTempPath(), "iscsisnap-snap-bench-" + Guid.NewGuid().ToString("N")[..8]);
        _manager = DiskManager.Open(_directory);
        _disk = _manager.CreateAsync("bench", VirtualSize, 512).GetAwaiter().GetResult().Id;
        var device = _manager.AttachAsync(_disk).GetAwaiter().GetResult();
        var data = new byte[64 << 10];
        new Random(1).NextBytes(data);
        // Data spread over the disk so the map and the head's metadata are not trivial.
        for (int i = 0; i < 64; i++)
            device.WriteAsync(VirtualSize / 64 * i, new ReadOnlySequence<byte>(data), WriteFlags.None).AsTask().GetAwaiter().GetResult();
    }

    [IterationCleanup]
    public void Cleanup()
    {
        _manager.DisposeAsync().AsTask().GetAwaiter().GetResult();
        Directory.Delete(_directory, recursive: true);
    }

    [Benchmark(Description = "snapshot (online, IO quiesced)")]
    public Task Snapshot() => _manager.SnapshotAsync(_disk, "bench");
}
