using System.IO.Pipelines;
using System.Net;

namespace ISCSISnap.Target.Iscsi.Connections;

/// <summary>
/// The byte transport under one iSCSI connection: a pipe of received bytes and a gather send.
/// Threading: <see cref="Input"/> has a single reader; <see cref="SendAsync"/> is never called concurrently
/// (the connection's send loop is single-flight); <see cref="ShutdownSend"/> is called by the send loop after its
/// last send; <see cref="Abort"/> may be called from any thread.
/// </summary>
public interface IIscsiTransport : IAsyncDisposable
{
    PipeReader Input { get; }

    /// <summary>Sends every buffer, in order, completely. Throws <see cref="IOException"/> when the peer is gone.</summary>
    ValueTask SendAsync(IList<ArraySegment<byte>> buffers);

    EndPoint? LocalEndPoint { get; }
    EndPoint? RemoteEndPoint { get; }

    /// <summary>
    /// The first half of a graceful close: the peer gets everything sent so far, then the end of the stream (TCP FIN).
    /// <see cref="Input"/> keeps delivering what the peer still sends, until it closes its side.
    /// </summary>
    void ShutdownSend();

    /// <summary>
    /// An abortive close (TCP reset), for protocol violations and dead peers: pending reads complete, pending sends
    /// fail, and whatever the peer has not read yet may be lost.
    /// </summary>
    void Abort();

    // DisposeAsync releases the connection: an orderly close when the peer has closed its side, else as the OS sees fit.
}
