using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace ISCSISnap.Storage.Sharing;

/// <summary>
/// The owner's side of a link: it creates the regions, checks the peer's credentials, hands the regions over once,
/// then grants and revokes handles to parts of them. It watches the peer process (pidfd): when the peer exits,
/// every handle is revoked and the regions are reclaimed. Threading: granting, revoking and resolving are
/// thread-safe and lock-free; <see cref="Dispose"/> must not race a use of memory resolved from this link.
/// </summary>
public sealed class OwnerLink : SharingLink
{
    private static int s_nextPeerId;
    private readonly int _pidfd;
    private readonly int _wakeFd;
    private readonly Thread _watcher;
    private readonly TaskCompletionSource _ended = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly object _lifecycle = new();
    private bool _disposed;

    private OwnerLink(uint peerId, PeerCredentials peer, SharedRegion tableRegion, SharedRegion[] regions, HandleTable table,
        SharingLinkOptions options, ILogger logger, int pidfd, int wakeFd)
        : base(peerId, peer, tableRegion, regions, table, options, logger)
    {
        _pidfd = pidfd;
        _wakeFd = wakeFd;
        _watcher = new Thread(WatchPeer, 64 * 1024) { IsBackground = true, Name = $"shm-peer-{peerId}" };
        _watcher.Start();
    }

    /// <summary>Completes when the link ends: its peer exited (<see cref="PeerExited"/>) or it was disposed.</summary>
    public Task Ended => _ended.Task;

    /// <summary>True once the peer process has exited and the link was closed for it.</summary>
    public bool PeerExited { get; private set; }

    /// <summary>
    /// Makes a link over a connected Unix domain socket: checks with SO_PEERCRED that the process at the other end
    /// is <paramref name="expected"/> (nothing is created or sent otherwise), creates and seals the regions, sends
    /// them with SCM_RIGHTS and waits for the peer to acknowledge them. The socket stays the caller's, free for its
    /// own messages once this returns. Refusals throw <see cref="SharingException"/>.
    /// </summary>
    public static async Task<OwnerLink> OfferAsync(Socket socket, ExpectedPeer expected, IReadOnlyList<RegionSpec> regions,
        SharingLinkOptions? options = null, ILogger? logger = null, CancellationToken cancellation = default)
    {
        options ??= new SharingLinkOptions();
        options.Validate();
        logger ??= NullLogger.Instance;
        if (regions.Count is < 1 or > RegionHandover.MaxRegions)
            throw new ArgumentOutOfRangeException(nameof(regions), regions.Count, $"a link shares between 1 and {RegionHandover.MaxRegions} regions");

        var peer = PeerCredentials.Of(socket);
        if (!expected.Matches(peer))
        {
            SharingLog.CredentialsRefused(logger, peer, expected);
            throw new SharingException(SharingCheck.Credentials, $"the process at the other end is {peer}, not the expected {expected}; no region was sent");
        }
        int pidfd = SharingNative.PidfdOpen(peer.Pid, 0);
        if (pidfd < 0)
            throw new SharingException(SharingCheck.Credentials, $"the peer {peer} cannot be watched (pidfd_open: errno {SharingNative.LastError}); it may have exited");

        uint peerId = (uint)Interlocked.Increment(ref s_nextPeerId);
        var created = new List<SharedRegion>();
        int wakeFd = -1;
        try
        {
            var tableRegion = SharedRegion.Create($"iscsisnap-share-{peerId}-table", new RegionSpec(HandleTable.BytesFor(options.HandleSlots), PeerAccess.Read));
            created.Add(tableRegion);
            for (int i = 0; i < regions.Count; i++)
                created.Add(SharedRegion.Create($"iscsisnap-share-{peerId}-{i}", regions[i]));
            var shared = created.Skip(1).ToArray();
            var table = HandleTable.CreateForOwner(tableRegion, (uint)options.HandleSlots, peerId, shared);

            using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellation);
            timeout.CancelAfter(options.HandshakeTimeout);
            var offer = new RegionHandover.Offer(peerId, (uint)options.HandleSlots, created.Select(r => (r.Length, r.Access)).ToArray());
            try
            {
                await RegionHandover.SendOfferAsync(socket, offer, created.Select(r => r.Descriptor).ToArray(), timeout.Token);
                await RegionHandover.ReceiveAckAsync(socket, peerId, timeout.Token);
            }
            catch (OperationCanceledException) when (!cancellation.IsCancellationRequested)
            {
                throw new SharingException(SharingCheck.Handshake, $"the peer {peer} did not take the regions within {options.HandshakeTimeout.TotalSeconds:0.#} s");
            }
            catch (SocketException e)
            {
                throw new SharingException(SharingCheck.Handshake, $"the socket failed during the region hand-over: {e.Message}");
            }
            // The peer holds its own references now; the mappings keep the memory, so the descriptors can go.
            foreach (var region in created) region.CloseDescriptor();

            wakeFd = SharingNative.EventFd(0, SharingNative.EFD_CLOEXEC);
            if (wakeFd < 0) throw new IOException($"eventfd failed: errno {SharingNative.LastError}");
            SharingLog.Linked(logger, peerId, peer, shared.Length, created.Sum(r => r.Length));
            return new OwnerLink(peerId, peer, tableRegion, shared, table, options, logger, pidfd, wakeFd);
        }
        catch (SharingException e)
        {
            SharingLog.HandoverFailed(logger, peer, e.Message);
            Cleanup();
            throw;
        }
        catch
        {
            Cleanup();
            throw;
        }

        void Cleanup()
        {
            foreach (var region in created) region.Dispose();
            SharingNative.Close(pidfd);
            if (wakeFd >= 0) SharingNative.Close(wakeFd);
        }
    }

    /// <summary>The owner's own access to its region, unchecked: fill what a handle will open, read what the peer wrote.</summary>
    public Span<byte> GetRegionMemory(int region, long offset, int length) => RegionSpan(region, offset, length);

    /// <summary>
    /// Grants the peer <paramref name="rights"/> to <paramref name="length"/> bytes at <paramref name="offset"/> of a
    /// region, for <paramref name="lifetime"/> (null: until revoked), once only if <paramref name="oneShot"/>. False
    /// when every handle slot is granted. Asking for more than the region allows is a programming error and throws.
    /// </summary>
    public bool TryGrant(int region, long offset, int length, HandleRights rights, TimeSpan? lifetime, bool oneShot, out SharedHandle handle)
    {
        if ((uint)region >= (uint)RegionCount)
            throw new ArgumentOutOfRangeException(nameof(region), region, $"the link has {RegionCount} regions");
        if (length <= 0 || (ulong)offset > (ulong)RegionLength(region) || (ulong)length > (ulong)(RegionLength(region) - offset))
            throw new ArgumentOutOfRangeException(nameof(length), $"{length} bytes at {offset} are not a range of region {region} ({RegionLength(region)} bytes)");
        if (rights == HandleRights.None || (rights & ~HandleRights.ReadWrite) != 0)
            throw new ArgumentOutOfRangeException(nameof(rights), rights, "a handle carries read, write or both");
        if ((rights & HandleRights.Write) != 0 && RegionAccess(region) != PeerAccess.ReadWrite)
            throw new ArgumentException($"region {region} is shared {RegionAccess(region)}: the peer cannot be given write access to it", nameof(rights));
        if (lifetime is { } span && span <= TimeSpan.Zero)
            throw new ArgumentOutOfRangeException(nameof(lifetime), lifetime, "a handle's lifetime must be positive");

        long expiresAt = lifetime is { } life ? HandleTable.MonotonicNanoseconds() + (long)(life.Ticks * 100) : long.MaxValue;
        if (Closed || !Table.TryGrant((uint)region, offset, length, rights, expiresAt, oneShot, out handle))
        {
            handle = default;
            return false;
        }
        if (Closed)
        {
            // The peer went away while this grant was being made: it must not outlive the revocation.
            Table.Revoke(handle);
            handle = default;
            return false;
        }
        return true;
    }

    /// <summary>As <see cref="TryGrant"/>, throwing <see cref="SharingException"/> when the table is full or the link closed.</summary>
    public SharedHandle Grant(int region, long offset, int length, HandleRights rights, TimeSpan? lifetime = null, bool oneShot = false)
    {
        if (TryGrant(region, offset, length, rights, lifetime, oneShot, out var handle)) return handle;
        var check = Closed ? SharingCheck.Closed : SharingCheck.TableFull;
        Refused(check, default);
        throw new SharingException(check, Closed
            ? $"no handle can be granted to peer {PeerId}: the link is closed"
            : $"no handle can be granted to peer {PeerId}: all {Table.Slots} slots are granted");
    }

    /// <summary>Ends a grant at once, for the peer too. False if it had ended already.</summary>
    public bool Revoke(SharedHandle handle) => Table.Revoke(handle);

    /// <summary>Ends every grant of this peer; returns how many were live.</summary>
    public int RevokeAll() => Table.RevokeAll();

    private unsafe void WatchPeer()
    {
        var fds = stackalloc SharingNative.PollFd[2];
        fds[0] = new SharingNative.PollFd { Fd = _pidfd, Events = SharingNative.POLLIN };
        fds[1] = new SharingNative.PollFd { Fd = _wakeFd, Events = SharingNative.POLLIN };
        while (SharingNative.Poll(fds, 2, -1) < 0 && SharingNative.LastError == SharingNative.EINTR) { }
        if (fds[0].REvents == 0) return;   // woken by Dispose

        int revoked;
        lock (_lifecycle)
        {
            if (_disposed) return;
            Closed = true;
            PeerExited = true;
            revoked = Table.RevokeAll();
            ReclaimRegions();
        }
        SharingLog.PeerExited(Logger, PeerId, Other.Pid, revoked);
        _ended.TrySetResult();
    }

    /// <summary>Revokes every handle, stops watching the peer, and unmaps the regions.</summary>
    public override unsafe void Dispose()
    {
        lock (_lifecycle)
        {
            if (_disposed) return;
            _disposed = true;
            Closed = true;
            Table.RevokeAll();
        }
        long one = 1;
        SharingNative.Write(_wakeFd, (byte*)&one, sizeof(long));
        if (Thread.CurrentThread != _watcher) _watcher.Join();
        UnmapRegions();
        SharingNative.Close(_pidfd);
        SharingNative.Close(_wakeFd);
        _ended.TrySetResult();
    }
}
