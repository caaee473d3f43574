using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace ISCSISnap.Storage.Sharing;

/// <summary>
/// The peer's side of a link: it receives the owner's regions once, checks that the kernel enforces what the owner
/// declared (size fixed; a region it may only read is sealed against writes and mapped read-only), and turns the
/// handles the owner sends into memory through the checked API. Threading: resolving is thread-safe;
/// <see cref="Dispose"/> must not race a use of resolved memory.
/// </summary>
public sealed class PeerLink : SharingLink
{
    private int _disposed;
    private readonly int[]? _keptDescriptors;

    private PeerLink(uint peerId, PeerCredentials owner, SharedRegion tableRegion, SharedRegion[] regions, HandleTable table,
        SharingLinkOptions options, ILogger logger, int[]? keptDescriptors)
        : base(peerId, owner, tableRegion, regions, table, options, logger)
    {
        _keptDescriptors = keptDescriptors;
    }

    /// <summary>
    /// Takes the regions an owner offers on a connected Unix domain socket, after checking the owner's credentials
    /// against <paramref name="expectedOwner"/>. Anything malformed, or a region the kernel does not protect as
    /// declared, refuses the link: every descriptor received is closed and the socket gets no acknowledgement.
    /// </summary>
    public static Task<PeerLink> AcceptAsync(Socket socket, ExpectedPeer expectedOwner, SharingLinkOptions? options = null,
        ILogger? logger = null, CancellationToken cancellation = default)
        => AcceptAsync(socket, expectedOwner, options, logger, keepDescriptors: false, cancellation);

    /// <summary>
    /// <paramref name="keepDescriptors"/> keeps the received memfds open (see <see cref="Descriptor"/>), so that tests
    /// can attack them the way a hostile peer would; a real peer has no use for them once mapped.
    /// </summary>
    internal static async Task<PeerLink> AcceptAsync(Socket socket, ExpectedPeer expectedOwner, SharingLinkOptions? options,
        ILogger? logger, bool keepDescriptors, CancellationToken cancellation)
    {
        options ??= new SharingLinkOptions();
        options.Validate();
        logger ??= NullLogger.Instance;
        var owner = PeerCredentials.Of(socket);
        if (!expectedOwner.Matches(owner))
        {
            SharingLog.CredentialsRefused(logger, owner, expectedOwner);
            throw new SharingException(SharingCheck.Credentials, $"the process offering regions is {owner}, not the expected {expectedOwner}");
        }

        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellation);
        timeout.CancelAfter(options.HandshakeTimeout);
        RegionHandover.Offer offer;
        int[] descriptors;
        try
        {
            (offer, descriptors) = await RegionHandover.ReceiveOfferAsync(socket, timeout.Token);
        }
        catch (OperationCanceledException) when (!cancellation.IsCancellationRequested)
        {
            throw new SharingException(SharingCheck.Handshake, $"no regions arrived within {options.HandshakeTimeout.TotalSeconds:0.#} s");
        }

        var mapped = new List<SharedRegion>();
        try
        {
            if (offer.Slots is < 1 or > 1 << 20)
                throw new SharingException(SharingCheck.Handshake, $"the hand-over declares {offer.Slots} handle slots");
            if (offer.Regions[0].Access != PeerAccess.Read || offer.Regions[0].Length < HandleTable.BytesFor((int)offer.Slots))
                throw new SharingException(SharingCheck.Handshake, "the hand-over's handle table is not a read-only region of the declared size");
            for (int i = 0; i < descriptors.Length; i++)
            {
                int fd = descriptors[i];
                descriptors[i] = -1;   // taken over by MapReceived, which closes it on failure
                mapped.Add(SharedRegion.MapReceived(fd, offer.Regions[i].Length, offer.Regions[i].Access));
            }
            var regions = mapped.Skip(1).ToArray();
            var table = HandleTable.OpenForPeer(mapped[0], offer.Slots, offer.Peer, regions);
            await RegionHandover.SendAckAsync(socket, offer.Peer, timeout.Token);
            int[]? kept = keepDescriptors ? mapped.Select(r => r.Descriptor).ToArray() : null;
            if (!keepDescriptors)
                foreach (var region in mapped) region.CloseDescriptor();
            return new PeerLink(offer.Peer, owner, mapped[0], regions, table, options, logger, kept);
        }
        catch (Exception e)
        {
            foreach (int fd in descriptors)
                if (fd >= 0) SharingNative.Close(fd);
            foreach (var region in mapped) region.Dispose();
            SharingLog.HandoverFailed(logger, owner, e.Message);
            if (e is SharingException refusal)
            {
                try { await RegionHandover.SendRefusalAsync(socket, refusal.Check, timeout.Token); }
                catch (Exception) { }   // the owner is gone or not listening: it will time out, the refusal stands
            }
            if (e is OperationCanceledException && !cancellation.IsCancellationRequested)
                throw new SharingException(SharingCheck.Handshake, "the acknowledgement could not be sent in time");
            throw;
        }
    }

    /// <summary>Tests only: the memfd of a region (index 0 is the handle table), when kept.</summary>
    internal int Descriptor(int index) => _keptDescriptors?[index] ?? -1;

    public override void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
        Closed = true;
        UnmapRegions();
    }
}
