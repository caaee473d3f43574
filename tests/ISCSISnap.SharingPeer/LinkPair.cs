using System.Net.Sockets;
using ISCSISnap.Storage.Sharing;
using Microsoft.Extensions.Logging;

namespace ISCSISnap.SharingPeer;

/// <summary>Both ends of a link in this process, over a real Unix domain socket. For tests and benchmarks.</summary>
public sealed class LinkPair : IAsyncDisposable
{
    private readonly string _directory;

    private LinkPair(string directory, Socket ownerSocket, Socket peerSocket, OwnerLink owner, PeerLink peer)
    {
        _directory = directory;
        OwnerSocket = ownerSocket;
        PeerSocket = peerSocket;
        Owner = owner;
        Peer = peer;
    }

    public Socket OwnerSocket { get; }
    public Socket PeerSocket { get; }
    public OwnerLink Owner { get; }
    public PeerLink Peer { get; }

    /// <summary>Connected sockets: the owner's end (accepted) and the peer's end (connecting).</summary>
    public static async Task<(string Directory, Socket Owner, Socket Peer)> ConnectAsync()
    {
        string directory = Directory.CreateTempSubdirectory("iscsisnap-link-").FullName;
        string path = Path.Combine(directory, "s");
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen(1);
        var peer = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        var connecting = peer.ConnectAsync(new UnixDomainSocketEndPoint(path));
        var owner = await listener.AcceptAsync();
        await connecting;
        return (directory, owner, peer);
    }

    public static async Task<LinkPair> CreateAsync(IReadOnlyList<RegionSpec> regions, SharingLinkOptions? options = null, ILogger? ownerLogger = null, ILogger? peerLogger = null)
    {
        var (directory, ownerSocket, peerSocket) = await ConnectAsync();
        var self = new ExpectedPeer(Environment.ProcessId, PeerCredentials.Current.Uid);
        var accepting = PeerLink.AcceptAsync(peerSocket, self, options, peerLogger);
        var owner = await OwnerLink.OfferAsync(ownerSocket, self, regions, options, ownerLogger);
        return new LinkPair(directory, ownerSocket, peerSocket, owner, await accepting);
    }

    public ValueTask DisposeAsync()
    {
        Peer.Dispose();
        Owner.Dispose();
        OwnerSocket.Dispose();
        PeerSocket.Dispose();
        Directory.Delete(_directory, recursive: true);
        return ValueTask.CompletedTask;
    }
}
