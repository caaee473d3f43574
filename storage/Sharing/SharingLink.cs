using System.Runtime.CompilerServices;
using Microsoft.Extensions.Logging;

namespace ISCSISnap.Storage.Sharing;

/// <summary>Settings of a link; validated when the link is made.</summary>
public sealed record SharingLinkOptions
{
    /// <summary>Handles that can be granted at once; each costs 64 bytes of the shared handle table.</summary>
    public int HandleSlots { get; init; } = 4096;

    /// <summary>How long the region hand-over may take before the link is refused.</summary>
    public TimeSpan HandshakeTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>The clock that spaces refusal log lines (at most one per peer per second).</summary>
    public TimeProvider Time { get; init; } = TimeProvider.System;

    internal void Validate()
    {
        if (HandleSlots is < 1 or > 1 << 20)
            throw new ArgumentOutOfRangeException(nameof(HandleSlots), HandleSlots, "a link needs between 1 and 1,048,576 handle slots");
        if (HandshakeTimeout <= TimeSpan.Zero)
            throw new ArgumentOutOfRangeException(nameof(HandshakeTimeout), HandshakeTimeout, "the hand-over timeout must be positive");
    }
}

/// <summary>
/// One side of a link between two processes that share memory: the regions it maps and the handle table that says
/// which parts of them each handle opens. Both sides turn handles into memory only through
/// <see cref="TryResolve(SharedHandle, HandleRights, long, int, out Span{byte}, out SharingCheck)"/>, which checks the
/// handle against the table. Threading: resolving is thread-safe; see the subclasses for the rest.
/// </summary>
public abstract class SharingLink : IDisposable
{
    private readonly SharedRegion[] _regions;
    private readonly SharedRegion _tableRegion;
    private protected readonly HandleTable Table;
    private protected readonly ILogger Logger;
    private readonly TimeProvider _time;
    private readonly long[] _refusals = new long[Enum.GetValues<SharingCheck>().Length];
    private long _lastLogged;
    private long _unlogged;
    private protected volatile bool Closed;

    private protected SharingLink(uint peerId, PeerCredentials other, SharedRegion tableRegion, SharedRegion[] regions, HandleTable table, SharingLinkOptions options, ILogger logger)
    {
        PeerId = peerId;
        Other = other;
        _tableRegion = tableRegion;
        _regions = regions;
        Table = table;
        Logger = logger;
        _time = options.Time;
        _lastLogged = _time.GetTimestamp() - _time.TimestampFrequency;
    }

    /// <summary>The peer's number within its owner; every handle granted on this link carries it.</summary>
    public uint PeerId { get; }

    /// <summary>The process at the other end, as SO_PEERCRED gave it.</summary>
    public PeerCredentials Other { get; }

    public int RegionCount => _regions.Length;

    public long RegionLength(int region) => _regions[region].Length;

    public PeerAccess RegionAccess(int region) => _regions[region].Access;

    /// <summary>Refusals this side has made, by the check that failed.</summary>
    public long Refusals(SharingCheck check) => Interlocked.Read(ref _refusals[(int)check]);

    public long TotalRefusals
    {
        get
        {
            long total = 0;
            for (int i = 1; i < _refusals.Length; i++) total += Interlocked.Read(ref _refusals[i]);
            return total;
        }
    }

    /// <summary>
    /// Turns <paramref name="length"/> bytes at <paramref name="offset"/> within a handle's range into memory, if
    /// the handle allows <paramref name="rights"/> there now; otherwise names the check that refused it (and counts
    /// it). The memory is valid while the handle is; the owner must not revoke a handle whose memory is in use.
    /// </summary>
    public bool TryResolve(SharedHandle handle, HandleRights rights, long offset, int length, out Span<byte> memory, out SharingCheck refusal)
        => length >= 0 ? TryResolveCore(handle, rights, offset, length, out memory, out refusal) : Refuse(SharingCheck.Range, handle, out memory, out refusal);

    /// <summary>The whole range of a handle; see <see cref="TryResolve(SharedHandle, HandleRights, long, int, out Span{byte}, out SharingCheck)"/>.</summary>
    public bool TryResolve(SharedHandle handle, HandleRights rights, out Span<byte> memory, out SharingCheck refusal)
        => TryResolveCore(handle, rights, 0, -1, out memory, out refusal);

    /// <summary>A negative <paramref name="length"/> means to the end of the handle's range.</summary>
    private unsafe bool TryResolveCore(SharedHandle handle, HandleRights rights, long offset, long length, out Span<byte> memory, out SharingCheck refusal)
    {
        if (Closed) return Refuse(SharingCheck.Closed, handle, out memory, out refusal);
        var check = Table.Check(handle, rights, offset, length, out byte* pointer, out int resolved);
        if (check != SharingCheck.None) return Refuse(check, handle, out memory, out refusal);
        memory = new Span<byte>(pointer, resolved);
        refusal = SharingCheck.None;
        return true;
    }

    private bool Refuse(SharingCheck check, SharedHandle handle, out Span<byte> memory, out SharingCheck refusal)
    {
        memory = default;
        refusal = check;
        Refused(check, handle);
        return false;
    }

    /// <summary>As <see cref="TryResolve(SharedHandle, HandleRights, long, int, out Span{byte}, out SharingCheck)"/>, throwing <see cref="SharingException"/> on refusal.</summary>
    public Span<byte> Resolve(SharedHandle handle, HandleRights rights, long offset, int length)
    {
        if (!TryResolve(handle, rights, offset, length, out var memory, out var refusal)) throw Refusal(refusal, handle, rights, $"{length} bytes at {offset}");
        return memory;
    }

    /// <summary>The whole range of a handle, throwing <see cref="SharingException"/> on refusal.</summary>
    public Span<byte> Resolve(SharedHandle handle, HandleRights rights)
    {
        if (!TryResolve(handle, rights, out var memory, out var refusal)) throw Refusal(refusal, handle, rights, "its whole range");
        return memory;
    }

    private static SharingException Refusal(SharingCheck check, SharedHandle handle, HandleRights rights, string range)
    {
        string why = check switch
        {
            SharingCheck.Range => "reaches outside the handle's range",
            SharingCheck.Rights => "asks for a right the handle does not carry",
            SharingCheck.Expiry => "comes after the handle expired",
            SharingCheck.Revoked => "uses a handle that was revoked or never granted",
            SharingCheck.OneShot => "uses a one-shot handle a second time",
            SharingCheck.Peer => "uses a handle granted to another peer",
            SharingCheck.Slot => "names a slot outside the handle table",
            SharingCheck.Closed => "comes after the link closed",
            _ => $"was refused ({check})",
        };
        return new SharingException(check, $"{rights} of {range} through {handle} {why}");
    }

    /// <summary>Counts a refusal and logs it, at most once per second for this link, with the refusals since the last line.</summary>
    [MethodImpl(MethodImplOptions.NoInlining)]
    private protected void Refused(SharingCheck check, SharedHandle handle)
    {
        Interlocked.Increment(ref _refusals[(int)check]);
        Interlocked.Increment(ref _unlogged);
        long now = _time.GetTimestamp();
        long last = Volatile.Read(ref _lastLogged);
        if (now - last < _time.TimestampFrequency || Interlocked.CompareExchange(ref _lastLogged, now, last) != last) return;
        long count = Interlocked.Exchange(ref _unlogged, 0);
        SharingLog.Refused(Logger, PeerId, Other.Pid, check, handle.ToString(), count);
    }

    /// <summary>Releases the regions now (their pages go back to the kernel once the other side unmaps them too); a stale span reads zeros rather than faulting.</summary>
    private protected void ReclaimRegions()
    {
        _tableRegion.Reclaim();
        foreach (var region in _regions) region.Reclaim();
    }

    private protected void UnmapRegions()
    {
        _tableRegion.Dispose();
        foreach (var region in _regions) region.Dispose();
    }

    /// <summary>Owner: the region's own bytes, unchecked (they are its memory).</summary>
    private protected unsafe Span<byte> RegionSpan(int region, long offset, int length)
    {
        var target = _regions[region];
        if ((ulong)offset > (ulong)target.Length || (ulong)length > (ulong)(target.Length - offset))
            throw new ArgumentOutOfRangeException(nameof(length), $"{length} bytes at {offset} reach outside region {region} ({target.Length} bytes)");
        return new Span<byte>(target.Pointer + offset, length);
    }

    public abstract void Dispose();
}

internal static partial class SharingLog
{
    [LoggerMessage(EventId = 5001, Level = LogLevel.Warning,
        Message = "Shared memory: refused {Check} for peer {PeerId} (pid {Pid}), {Handle}; {Count} refusal(s) since the last report")]
    public static partial void Refused(ILogger logger, uint peerId, int pid, SharingCheck check, string handle, long count);

    [LoggerMessage(EventId = 5002, Level = LogLevel.Warning,
        Message = "Shared memory: refused a link with {Actual}: expected {Expected}; no region was sent")]
    public static partial void CredentialsRefused(ILogger logger, PeerCredentials actual, ExpectedPeer expected);

    [LoggerMessage(EventId = 5003, Level = LogLevel.Information,
        Message = "Shared memory: linked peer {PeerId} ({Peer}) with {Regions} region(s), {Bytes} bytes")]
    public static partial void Linked(ILogger logger, uint peerId, PeerCredentials peer, int regions, long bytes);

    [LoggerMessage(EventId = 5004, Level = LogLevel.Information,
        Message = "Shared memory: peer {PeerId} (pid {Pid}) exited; revoked {Handles} handle(s) and reclaimed its regions")]
    public static partial void PeerExited(ILogger logger, uint peerId, int pid, int handles);

    [LoggerMessage(EventId = 5005, Level = LogLevel.Warning,
        Message = "Shared memory: the region hand-over with {Peer} failed: {Reason}")]
    public static partial void HandoverFailed(ILogger logger, PeerCredentials peer, string reason);
}
