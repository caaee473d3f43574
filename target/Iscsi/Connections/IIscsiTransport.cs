using System.IO.Pipelines;
using System.Net;

namespace ISCSISnap.Target.Iscsi.Connections;

/// <summary>
/// The byte transport under one iSCSI connection: a pipe of received bytes and a gather send.
/// Threading: <see cref="Input"/> has a single reader; <see cref="SendAsync"/> is never called concurrently
/// (the connection's send loop is single-flight); <see cref="Abort"/> may be called from any thread.
/// </summary>
public interface IIscsiTransport : IAsyncDisposable
{
    PipeReader Input { get; }

    /// <summary>Sends every buffer, in order, completely. Throws <see cref="IOException"/> when the peer is gone.</summary>
    ValueTask SendAsync(IList<ArraySegment<byte>> buffers);

    EndPoint? LocalEndPoint { get; }
    EndPoint? RemoteEndPoint { get; }

    /// <summary>Tears the connection down: pending reads complete, pending sends fail.</summary>
    void Abort();
}
