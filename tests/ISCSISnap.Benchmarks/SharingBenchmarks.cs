using BenchmarkDotNet.Attributes;
using ISCSISnap.SharingPeer;
using ISCSISnap.Storage.Sharing;

namespace ISCSISnap.Benchmarks;

/// <summary>
/// The handle operations on their own, both ends of a link in this process: a grant and its revocation, a
/// resolution by the peer and by the owner, and the whole cycle a request makes (grant, peer resolves, revoke).
/// None may allocate; each must stay under 1 µs median.
/// </summary>
[MemoryDiagnoser]
[MedianColumn]
public class SharingHandleBenchmarks
{
    private LinkPair _pair = null!;
    private SharedHandle _live;

    [GlobalSetup]
    public void Setup()
    {
        _pair = LinkPair.CreateAsync([new(1 << 20, PeerAccess.Read), new(1 << 20, PeerAccess.ReadWrite)]).GetAwaiter().GetResult();
        _live = _pair.Owner.Grant(0, 0, 65536, HandleRights.Read);
    }

    [GlobalCleanup]
    public void Cleanup() => _pair.DisposeAsync().AsTask().GetAwaiter().GetResult();

    [Benchmark]
    public bool GrantAndRevoke()
    {
        var handle = _pair.Owner.Grant(1, 65536, 65536, HandleRights.Write, TimeSpan.FromSeconds(5), oneShot: true);
        return _pair.Owner.Revoke(handle);
    }

    [Benchmark]
    public int PeerResolves() => _pair.Peer.TryResolve(_live, HandleRights.Read, 4096, 4096, out var memory, out _) ? memory.Length : -1;

    [Benchmark]
    public int OwnerResolves() => _pair.Owner.TryResolve(_live, HandleRights.Read, out var memory, out _) ? memory.Length : -1;

    [Benchmark]
    public int GrantResolveRevoke()
    {
        var handle = _pair.Owner.Grant(1, 0, 65536, HandleRights.Write, TimeSpan.FromSeconds(5), oneShot: true);
        int length = _pair.Peer.TryResolve(handle, HandleRights.Write, out var memory, out _) ? memory.Length : -1;
        _pair.Owner.Revoke(handle);
        return length;
    }
}

/// <summary>
/// A 64 KiB block moved from this process to a peer process (ISCSISnap.SharingPeer) and acknowledged, two ways:
/// through a handle (a 31-byte command on the socket; the peer resolves it and copies the block out of shared
/// memory into its own buffer), with the block already in the region or copied in first by the owner; and over the
/// socket itself (the peer receives the 64 KiB into its own buffer). Each invocation is one round trip; a round trip
/// that moves no data shows what of it is the two process wake-ups rather than the block.
/// </summary>
[MemoryDiagnoser]
[MedianColumn]
public class SharingTransferBenchmarks
{
    private const int BlockBytes = 64 * 1024;
    private PeerProcess _peer = null!;
    private OwnerLink _link = null!;
    private readonly byte[] _block = new byte[BlockBytes];

    [GlobalSetup]
    public void Setup()
    {
        new Random(1).NextBytes(_block);
        _peer = PeerProcess.LaunchAsync().GetAwaiter().GetResult();
        _link = _peer.OfferAsync([new(16 * BlockBytes, PeerAccess.Read)]).GetAwaiter().GetResult();
        _block.CopyTo(_link.GetRegionMemory(0, 0, BlockBytes));
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _peer.SendAsync(PeerCommand.Exit).GetAwaiter().GetResult();
        _peer.DisposeAsync().AsTask().GetAwaiter().GetResult();
    }

    [Benchmark]
    public async Task<byte> RoundTripWithoutData() => (await _peer.SendAsync(PeerCommand.Ping)).Status;

    [Benchmark(Baseline = true)]
    public async Task<byte> OverTheSocket() => (await _peer.SendBytesAsync(_block)).Status;

    [Benchmark]
    public async Task<byte> ThroughAHandle()
    {
        var handle = _link.Grant(0, 0, BlockBytes, HandleRights.Read, oneShot: true);
        var reply = await _peer.SendAsync(PeerCommand.CopyOut, handle);
        _link.Revoke(handle);
        return reply.Status;
    }

    [Benchmark]
    public async Task<byte> ThroughAHandleCopiedIn()
    {
        _block.CopyTo(_link.GetRegionMemory(0, BlockBytes, BlockBytes));
        var handle = _link.Grant(0, BlockBytes, BlockBytes, HandleRights.Read, oneShot: true);
        var reply = await _peer.SendAsync(PeerCommand.CopyOut, handle);
        _link.Revoke(handle);
        return reply.Status;
    }
}
