using System.IO.Pipelines;
using System.Net;
using System.Net.Sockets;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Threading.Tasks.Sources;
using ISCSISnap.Storage.Buffers;

namespace ISCSISnap.Target.Iscsi.Connections;

/// <summary>
/// TCP transport: a receive loop fills a pipe straight from the socket (pinned pool blocks, inline scheduling,
/// so the PDU parser runs on the receiving thread), and sends are vectored sendmsg calls through one reusable
/// <see cref="SocketAsyncEventArgs"/>. Threading: see <see cref="IIscsiTransport"/>.
/// </summary>
public sealed partial class SocketTransport : IIscsiTransport
{
    private readonly Socket _socket;
    private readonly Pipe _pipe;
    private readonly Sender _sender = new();
    private readonly Task _receiving;
    private int _aborted;

    public SocketTransport(Socket socket, int maxPduSize)
    {
        _socket = socket;
        _socket.NoDelay = true;
        LocalEndPoint = socket.LocalEndPoint;
        RemoteEndPoint = socket.RemoteEndPoint;
        long pause = Math.Max(1 << 20, 2L * maxPduSize);
        _pipe = new Pipe(new PipeOptions(
            pool: PinnedBlockMemoryPool.Default,
            readerScheduler: PipeScheduler.Inline,
            writerScheduler: PipeScheduler.Inline,
            pauseWriterThreshold: pause,
            resumeWriterThreshold: pause / 2,
            minimumSegmentSize: PinnedBlockMemoryPool.Default.MaxBufferSize,
            useSynchronizationContext: false));
        _receiving = ReceiveLoopAsync();
    }

    public PipeReader Input => _pipe.Reader;
    public EndPoint? LocalEndPoint { get; }
    public EndPoint? RemoteEndPoint { get; }

    private async Task ReceiveLoopAsync()
    {
        await Task.Yield();
        var writer = _pipe.Writer;
        Exception? error = null;
        try
        {
            while (true)
            {
                var memory = writer.GetMemory(PinnedBlockMemoryPool.Default.MaxBufferSize / 2);
                int received = await _socket.ReceiveAsync(memory, SocketFlags.None).ConfigureAwait(false);
                if (received == 0) break;
                writer.Advance(received);
                var flush = await writer.FlushAsync().ConfigureAwait(false);
                if (flush.IsCompleted || flush.IsCanceled) break;
            }
        }
        catch (SocketException e) when (IsConnectionGone(e.SocketErrorCode)) { }
        catch (ObjectDisposedException) { }
        catch (Exception e)
        {
            error = e;
        }
        await writer.CompleteAsync(error).ConfigureAwait(false);
    }

    private static bool IsConnectionGone(SocketError error) =>
        error is SocketError.ConnectionReset or SocketError.ConnectionAborted or SocketError.OperationAborted
            or SocketError.Shutdown or SocketError.Interrupted or SocketError.TimedOut or SocketError.NetworkReset;

    public ValueTask SendAsync(IList<ArraySegment<byte>> buffers)
    {
        if (Volatile.Read(ref _aborted) != 0) return ValueTask.FromException(new IOException("connection aborted"));
        // Fast path: one sendmsg on this thread with the iovecs on the stack (the SocketAsyncEventArgs path
        // allocates pin handles and iovec arrays for more than 8 buffers). What the kernel cannot take at once
        // goes through the asynchronous sender.
        long sent = TrySendDirect(buffers, out int errno);
        if (sent < 0)
        {
            return errno == EAGAIN
                ? _sender.SendAsync(_socket, buffers)
                : ValueTask.FromException(new IOException($"send failed: errno {errno}"));
        }
        long total = 0;
        for (int i = 0; i < buffers.Count; i++) total += buffers[i].Count;
        if (sent == total) return ValueTask.CompletedTask;
        return _sender.SendAsync(_socket, Remaining(buffers, sent));
    }

    private const int EAGAIN = 11, EINTR = 4, MSG_NOSIGNAL = 0x4000, MaxIovecs = 1024;

    /// <summary>Bytes sendmsg accepted (possibly fewer than all), or -1 with <paramref name="errno"/>.</summary>
    private unsafe long TrySendDirect(IList<ArraySegment<byte>> buffers, out int errno)
    {
        errno = 0;
        int count = buffers.Count;
        if (count > MaxIovecs)
        {
            errno = EAGAIN;   // let the asynchronous sender split it
            return -1;
        }
        var handle = _socket.SafeHandle;
        bool added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            var iov = stackalloc Native.IoVec[count];
            for (int i = 0; i < count; i++)
            {
                var segment = buffers[i];
                // Every array a send batch references lives on the pinned object heap (see SendBatch).
                iov[i].Base = Unsafe.AsPointer(ref Unsafe.Add(ref MemoryMarshal.GetArrayDataReference(segment.Array!), segment.Offset));
                iov[i].Length = (nuint)segment.Count;
            }
            var message = new Native.MessageHeader { Iov = iov, IovLength = (nuint)count };
            while (true)
            {
                nint n = Native.SendMessage((int)handle.DangerousGetHandle(), &message, MSG_NOSIGNAL);
                if (n >= 0) return n;
                errno = Marshal.GetLastPInvokeError();
                if (errno != EINTR) return -1;
            }
        }
        catch (ObjectDisposedException)
        {
            errno = 9;   // EBADF
            return -1;
        }
        finally
        {
            if (added) handle.DangerousRelease();
        }
    }

    /// <summary>The part of <paramref name="buffers"/> after its first <paramref name="sent"/> bytes.</summary>
    private static List<ArraySegment<byte>> Remaining(IList<ArraySegment<byte>> buffers, long sent)
    {
        var rest = new List<ArraySegment<byte>>(buffers.Count);
        foreach (var segment in buffers)
        {
            if (sent >= segment.Count)
            {
                sent -= segment.Count;
                continue;
            }
            rest.Add(sent > 0 ? segment.Slice((int)sent) : segment);
            sent = 0;
        }
        return rest;
    }

    private static unsafe partial class Native
    {
        [StructLayout(LayoutKind.Sequential)]
        public struct IoVec
        {
            public void* Base;
            public nuint Length;
        }

        [StructLayout(LayoutKind.Sequential)]
        public struct MessageHeader
        {
            public void* Name;
            public uint NameLength;
            public IoVec* Iov;
            public nuint IovLength;
            public void* Control;
            public nuint ControlLength;
            public int Flags;
        }

        [LibraryImport("libc", EntryPoint = "sendmsg", SetLastError = true)]
        public static partial nint SendMessage(int fd, MessageHeader* message, int flags);
    }

    public void ShutdownSend()
    {
        if (Volatile.Read(ref _aborted) != 0) return;
        // FIN goes out after the bytes already queued in the kernel; the receive loop goes on until the peer's FIN.
        try { _socket.Shutdown(SocketShutdown.Send); } catch (SocketException) { } catch (ObjectDisposedException) { }
    }

    public void Abort()
    {
        if (Interlocked.Exchange(ref _aborted, 1) != 0) return;
        // SO_LINGER 0: close() resets the connection at once instead of leaving unsent data (for a peer that stopped
        // reading) to the kernel for minutes.
        try { _socket.LingerState = new LingerOption(true, 0); } catch (SocketException) { } catch (ObjectDisposedException) { }
        _socket.Close();
        _pipe.Reader.CancelPendingRead();
    }

    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _aborted, 1) == 0)
        {
            // After a graceful close the peer's FIN has ended the receive loop and close() only releases the socket.
            // Otherwise the pending receive is unblocked first (a shutdown when ShutdownSend ran, else a reset).
            _socket.Close();
            _pipe.Reader.CancelPendingRead();
        }
        try { await _receiving.ConfigureAwait(false); } catch { /* the loop reports through the pipe */ }
        _sender.Dispose();
    }

    /// <summary>A reusable awaitable send: no allocation per send, completes inline when the kernel takes the bytes at once.</summary>
    private sealed class Sender : SocketAsyncEventArgs, IValueTaskSource
    {
        private ManualResetValueTaskSourceCore<bool> _core = new() { RunContinuationsAsynchronously = false };

        public Sender() : base(unsafeSuppressExecutionContextFlow: true) { }

        public ValueTask SendAsync(Socket socket, IList<ArraySegment<byte>> buffers)
        {
            _core.Reset();
            if (buffers.Count == 1)
            {
                BufferList = null;
                SetBuffer(buffers[0].AsMemory());
            }
            else
            {
                SetBuffer(null, 0, 0);
                BufferList = buffers;
            }
            try
            {
                if (socket.SendAsync(this)) return new ValueTask(this, _core.Version);
            }
            catch (ObjectDisposedException)
            {
                return ValueTask.FromException(new IOException("connection closed"));
            }
            return SocketError == SocketError.Success
                ? ValueTask.CompletedTask
                : ValueTask.FromException(new IOException($"send failed: {SocketError}"));
        }

        protected override void OnCompleted(SocketAsyncEventArgs e)
        {
            if (SocketError == SocketError.Success) _core.SetResult(true);
            else _core.SetException(new IOException($"send failed: {SocketError}"));
        }

        void IValueTaskSource.GetResult(short token) => _core.GetResult(token);
        ValueTaskSourceStatus IValueTaskSource.GetStatus(short token) => _core.GetStatus(token);
        void IValueTaskSource.OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
            _core.OnCompleted(continuation, state, token, flags);
    }
}
