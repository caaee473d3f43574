using System.Net.Sockets;
using ISCSISnap.SharingPeer;
using ISCSISnap.Storage.Sharing;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Sharing;

/// <summary>The region hand-over refuses anything it cannot trust, and leaks no descriptor doing so.</summary>
[Collection(ProcessWideMeasurements.Name)]   // counts this process's descriptors
public sealed class HandoverTests
{
    private static readonly ExpectedPeer Self = new(Environment.ProcessId, PeerCredentials.Current.Uid);

    [Fact]
    public async Task A_peer_refuses_a_region_not_sealed_against_resizing_or_writing_and_keeps_no_descriptor()
    {
        var (directory, ownerSocket, peerSocket) = await LinkPair.ConnectAsync();
        using var _ = ownerSocket;
        using var __ = peerSocket;
        // A table that is fine, and a "read-only" region with no seals: an owner that could truncate it under the
        // peer's mapping (SIGBUS) or keep a way to write what the peer was told is read-only.
        using var table = SharedRegion.Create("handover-table", new RegionSpec(HandleTable.BytesFor(16), PeerAccess.Read));
        int unsealed = SharingNative.MemfdCreate("handover-unsealed", SharingNative.MFD_CLOEXEC);
        Assert.True(unsealed >= 0);
        Assert.Equal(0, SharingNative.FTruncate(unsealed, 4096));
        try
        {
            var accepting = PeerLink.AcceptAsync(peerSocket, Self);
            await RegionHandover.SendOfferAsync(ownerSocket, new RegionHandover.Offer(1, 16, [(table.Length, PeerAccess.Read), (4096, PeerAccess.Read)]),
                [table.Descriptor, unsealed], default);
            var refused = await Assert.ThrowsAsync<SharingException>(() => accepting);
            Assert.Equal(SharingCheck.Seals, refused.Check);
            // The owner hears why at once, not at its hand-over timeout.
            var told = await Assert.ThrowsAsync<SharingException>(() => RegionHandover.ReceiveAckAsync(ownerSocket, 1, default).WaitAsync(TimeSpan.FromSeconds(30)));
            Assert.Equal(SharingCheck.Handshake, told.Check);
            Assert.Contains("Seals check failed", told.Message);
            Assert.Equal(1, ProcessResources.DescriptorsTo("memfd:handover-unsealed"));   // the sender's own, only
            Assert.Equal(1, ProcessResources.DescriptorsTo("memfd:handover-table"));
            Assert.Equal(0, ProcessResources.Mappings("memfd:handover-unsealed"));
        }
        finally
        {
            SharingNative.Close(unsealed);
            Directory.Delete(directory, recursive: true);
        }
    }

    [Fact]
    public async Task A_peer_refuses_a_malformed_hand_over_and_an_owner_refuses_a_peer_that_does_not_acknowledge()
    {
        var (directory, ownerSocket, peerSocket) = await LinkPair.ConnectAsync();
        try
        {
            var accepting = PeerLink.AcceptAsync(peerSocket, Self);
            await ownerSocket.SendAsync(new byte[] { (byte)'G', (byte)'E', (byte)'T', (byte)' ', 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12 }, SocketFlags.None);
            Assert.Equal(SharingCheck.Handshake, (await Assert.ThrowsAsync<SharingException>(() => accepting)).Check);

            var silent = await Assert.ThrowsAsync<SharingException>(() => OwnerLink.OfferAsync(peerSocket, Self, [new(4096, PeerAccess.Read)],
                new SharingLinkOptions { HandshakeTimeout = TimeSpan.FromMilliseconds(200) }));
            Assert.Equal(SharingCheck.Handshake, silent.Check);
            Assert.Equal(0, ProcessResources.DescriptorsTo("memfd:iscsisnap-share"));
            Assert.Equal(0, ProcessResources.Mappings("memfd:iscsisnap-share"));

            var owner = PeerLink.AcceptAsync(ownerSocket, new ExpectedPeer(null, PeerCredentials.Current.Uid + 1));
            Assert.Equal(SharingCheck.Credentials, (await Assert.ThrowsAsync<SharingException>(() => owner)).Check);
        }
        finally
        {
            ownerSocket.Dispose();
            peerSocket.Dispose();
            Directory.Delete(directory, recursive: true);
        }
    }
}
