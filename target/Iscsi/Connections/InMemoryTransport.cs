using System.Buffers;
using System.IO.Pipelines;
using System.Net;

namespace ISCSISnap.Target.Iscsi.Connections;

/// <summary>
/// A transport over two in-process pipes, for protocol tests and benchmarks without sockets.
/// <see cref="ClientInput"/>/<see cref="ClientOutput"/> are the initiator's ends.
/// </summary>
public sealed class InMemoryTransport : IIscsiTransport
{
    private readonly Pipe _toTarget = new(new PipeOptions(useSynchronizationContext: false, pauseWriterThreshold: 64 << 20, resumeWriterThreshold: 32 << 20));
    private readonly Pipe _toInitiator = new(new PipeOptions(useSynchronizationContext: false, pauseWriterThreshold: 0));
    private int _aborted;

    public PipeReader Input => _toTarget.Reader;
    public PipeWriter ClientOutput => _toTarget.Writer;
    public PipeReader ClientInput => _toInitiator.Reader;
    public EndPoint? LocalEndPoint { get; } = new IPEndPoint(IPAddress.Loopback, 3260);
    public EndPoint? RemoteEndPoint { get; } = new IPEndPoint(IPAddress.Loopback, 50000);

    public async ValueTask SendAsync(IList<ArraySegment<byte>> buffers)
    {
        if (Volatile.Read(ref _aborted) != 0) throw new IOException("connection aborted");
        for (int i = 0; i < buffers.Count; i++)   // indexed: foreach over IList would box its enumerator per send
            _toInitiator.Writer.Write(buffers[i].AsSpan());
        await _toInitiator.Writer.FlushAsync().ConfigureAwait(false);
    }

    public void ShutdownSend() => _toInitiator.Writer.Complete();

    /// <summary>The initiator's reads fail, as a TCP reset makes them.</summary>
    public void Abort()
    {
        if (Interlocked.Exchange(ref _aborted, 1) != 0) return;
        _toTarget.Reader.CancelPendingRead();
        _toInitiator.Writer.Complete(new IOException("connection reset by the target"));
    }

    public ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _aborted, 1) == 0)
        {
            _toTarget.Reader.CancelPendingRead();
            _toInitiator.Writer.Complete();
        }
        return ValueTask.CompletedTask;
    }
}
