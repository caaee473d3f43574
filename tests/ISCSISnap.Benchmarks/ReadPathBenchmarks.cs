using BenchmarkDotNet.Attributes;
using ISCSISnap.Benchmarks.Support;

namespace ISCSISnap.Benchmarks;

/// <summary>
/// The SCSI READ (and WRITE) path end to end inside one process, without sockets: a <see cref="RawInitiator"/>
/// drives an <see cref="Target.Hosting.IscsiPortal"/> connection over an
/// <see cref="Target.Iscsi.Connections.InMemoryTransport"/>; LUN 0 is a sparse file whose first 4 MiB are written
/// and cached, so READs are page-cache hits served inline (preadv2 RWF_NOWAIT).
/// Allocated bytes count every thread (the target runs on the thread pool), per READ/WRITE.
/// </summary>
[MemoryDiagnoser]
public class ReadPathBenchmarks
{
    private const int TransferBytes = 4096;
    private const int Batch = 32;
    private const uint Blocks = TransferBytes / BenchTarget.BlockSize;
    /// <summary>READs cycle through the cached first 4 MiB; WRITEs go to the 4 MiB after it.</summary>
    private const uint CachedBlocks = (4 << 20) / BenchTarget.BlockSize;

    private BenchTarget _target = null!;
    private RawInitiator _initiator = null!;
    private readonly byte[] _writeData = new byte[TransferBytes];
    private uint _nextLba;

    [GlobalSetup]
    public void Setup()
    {
        new Random(3).NextBytes(_writeData);
        _target = BenchTarget.StartAsync().GetAwaiter().GetResult();
        _initiator = _target.Initiator;
    }

    [GlobalCleanup]
    public void Cleanup() => _target.DisposeAsync().AsTask().GetAwaiter().GetResult();

    private uint NextLba()
    {
        uint lba = _nextLba;
        _nextLba = (lba + Blocks) % CachedBlocks;
        return lba;
    }

    [Benchmark(Description = "READ(10) 4 KiB round trip")]
    public ValueTask Read4K() => _initiator.ReadAsync(NextLba(), TransferBytes);

    /// <summary>32 READs sent in one flush and completed; Mean and Allocated are per READ (OperationsPerInvoke = 32).</summary>
    [Benchmark(Description = "READ(10) 4 KiB, 32 outstanding (per READ)", OperationsPerInvoke = Batch)]
    public ValueTask Read4KBatch32()
    {
        uint first = _nextLba;
        _nextLba = (first + Batch * Blocks) % CachedBlocks;
        return _initiator.ReadBatchAsync(first, TransferBytes, Batch, CachedBlocks);
    }

    [Benchmark(Description = "WRITE(10) 4 KiB immediate data round trip")]
    public ValueTask Write4KImmediate() => _initiator.WriteAsync(CachedBlocks + NextLba(), _writeData);
}
