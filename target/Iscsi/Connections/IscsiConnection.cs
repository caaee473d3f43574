using System.Buffers;
using System.Collections.Concurrent;
using System.IO.Pipelines;
using System.Runtime.CompilerServices;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Iscsi.Pdus;
using ISCSISnap.Target.Iscsi.Sessions;
using Microsoft.Extensions.Logging;

namespace ISCSISnap.Target.Iscsi.Connections;

internal enum ConnectionState : byte
{
    Login,
    FullFeature,
    Closing,
    Closed,
}

/// <summary>
/// One iSCSI connection: a receive loop that frames PDUs in place and dispatches them (login, SCSI commands,
/// Data-Out, task management, text, NOP, logout), and a single-flight send loop that gathers queued responses
/// into vectored sends. Threading: the receive loop runs on one thread at a time; responses may be queued from
/// any thread; <see cref="Abort"/> is thread-safe.
/// </summary>
internal sealed partial class IscsiConnection
{
    private readonly IscsiPortal _portal;
    private readonly IIscsiTransport _transport;
    private readonly ILogger _log;
    private readonly ConcurrentQueue<OutboundItem> _outbound = new();
    private readonly SendBatch _batch = new();
    private readonly CancellationTokenSource _lifetime = new();
    private OutboundItem? _partial;
    private int _sender;   // SenderIdle, SenderActive or SenderRetired
    private bool _digestsOn;   // owned by the send loop
    private uint _statSN;
    private FramingLimits _limits;
    private int _stateValue = (int)ConnectionState.Login;   // a ConnectionState; moves forward only (see MarkClosing)
    private long _lastReceiveTicks = Environment.TickCount64;
    private int _closeStarted;
    private int _closeMode;   // CloseMode: who ends the connection, and how
    private TaskCompletionSource? _finalSent;
    private string _closeReason = "the initiator ended the connection";
    private bool _loginTimerArmed = true;   // owned by the receive loop
    private long _outboundBytes;
    private TaskCompletionSource? _drainWaiter;

    /// <summary>
    /// Above this many bytes of queued responses the receive loop stops taking PDUs until the sender is down to
    /// <see cref="OutboundLowWater"/>: a peer that sends requests (NOP-Outs with data, say) but never reads the
    /// answers gets TCP backpressure instead of growing the target's memory, and is dropped by the NOP-In timeout.
    /// </summary>
    internal const long OutboundHighWater = 4 << 20, OutboundLowWater = 1 << 20;

    private const int SenderIdle = 0, SenderActive = 1, SenderRetired = 2;

    private enum CloseMode
    {
        /// <summary>Not closing, or the peer ended the stream (or broke it) first.</summary>
        None,
        /// <summary>The target closes after a final PDU: FIN, then the peer's FIN or the close wait.</summary>
        Graceful,
        /// <summary>A reset: protocol violations and dead peers.</summary>
        Abortive,
    }

    public IscsiConnection(IscsiPortal portal, IIscsiTransport transport, ILogger log, long id)
    {
        _portal = portal;
        _transport = transport;
        _log = log;
        Id = id;
        Parameters = new NegotiatedParameters();
        _limits = new FramingLimits(false, false, LoginDataSegmentLimit);
        Remote = transport.RemoteEndPoint?.ToString() ?? "?";
    }

    /// <summary>RFC 7143: data segments of login PDUs are at most 8192 bytes.</summary>
    public const int LoginDataSegmentLimit = 8192;

    public long Id { get; }
    public string Remote { get; }
    public ushort Cid { get; private set; }
    public IscsiSession? Session { get; private set; }
    /// <summary>Connection-scoped values plus a copy of the session-scoped ones, fixed once login completes.</summary>
    public NegotiatedParameters Parameters { get; private set; }
    /// <summary>Moves from <paramref name="from"/> to <paramref name="to"/>; false when another thread moved the state first.</summary>
    private bool TryMoveState(ConnectionState from, ConnectionState to) =>
        Interlocked.CompareExchange(ref _stateValue, (int)to, (int)from) == (int)from;

    /// <summary>Login or full feature phase becomes Closing; a connection already closing or closed stays as it is.</summary>
    private void MarkClosing()
    {
        var state = State;
        while (state < ConnectionState.Closing && !TryMoveState(state, ConnectionState.Closing)) state = State;
    }

    public bool IsClosed => State >= ConnectionState.Closing;
    internal ConnectionState State => (ConnectionState)Volatile.Read(ref _stateValue);
    public CancellationToken Lifetime => _lifetime.Token;

    // ---------------------------------------------------------------- receive side

    public async Task RunAsync()
    {
        var input = _transport.Input;
        using var loginTimer = new Timer(static s => ((IscsiConnection)s!).OnLoginTimeout(), this,
            TimeSpan.FromSeconds(_portal.Options.LoginTimeoutSeconds), Timeout.InfiniteTimeSpan);
        try
        {
            while (State < ConnectionState.Closing)
            {
                var result = await input.ReadAsync().ConfigureAwait(false);
                if (result.IsCanceled) break;
                var buffer = result.Buffer;
                try
                {
                    while (State < ConnectionState.Closing)
                    {
                        var framing = PduFramer.TryFrame(buffer, _limits, out var pdu, out var fault);
                        if (framing == FrameResult.NeedMoreData) break;
                        if (framing == FrameResult.Invalid)
                        {
                            FramingViolation(pdu.Header, fault!);
                            break;
                        }
                        Volatile.Write(ref _lastReceiveTicks, Environment.TickCount64);
                        var handled = HandlePduAsync(pdu);
                        if (!handled.IsCompletedSuccessfully) await handled.ConfigureAwait(false);
                        buffer = buffer.Slice(pdu.End);
                        if (State == ConnectionState.FullFeature && _loginTimerArmed)
                        {
                            _loginTimerArmed = false;
                            loginTimer.Change(Timeout.Infinite, Timeout.Infinite);
                        }
                        if (Volatile.Read(ref _outboundBytes) > OutboundHighWater)
                            await WaitForOutboundDrainAsync().ConfigureAwait(false);
                    }
                }
                finally
                {
                    input.AdvanceTo(buffer.Start, buffer.End);
                }
                KickSender();
                if (result.IsCompleted)
                {
                    if (!buffer.IsEmpty && State < ConnectionState.Closing)
                        Log.TruncatedPdu(_log, Remote, buffer.Length);
                    break;
                }
            }
        }
        catch (Exception e) when (e is IOException or OperationCanceledException or InvalidOperationException)
        {
            Log.ConnectionFailed(_log, Remote, e.Message);
        }
        catch (Exception e)
        {
            Log.ConnectionCrashed(_log, e, Remote);
            Abort();
        }
        finally
        {
            await CloseAsync().ConfigureAwait(false);
        }
    }

    /// <summary>Waits until the queued responses are down to the low-water mark (or the connection ends).</summary>
    private async Task WaitForOutboundDrainAsync()
    {
        var waiter = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        Interlocked.Exchange(ref _drainWaiter, waiter);   // a full fence: the sender sees it, or we see its progress
        KickSender();
        try
        {
            if (Volatile.Read(ref _outboundBytes) > OutboundLowWater)
                await waiter.Task.WaitAsync(_lifetime.Token).ConfigureAwait(false);
        }
        finally
        {
            Interlocked.CompareExchange(ref _drainWaiter, null, waiter);
        }
    }

    private void OnLoginTimeout()
    {
        if (State == ConnectionState.Login)
        {
            Log.LoginTimedOut(_log, Remote);
            _portal.Metrics.LoginAttempt(false, "timeout");
            Abort();
        }
    }

    private ValueTask HandlePduAsync(IncomingPdu pdu)
    {
        var opcode = pdu.Header.Opcode;
        if (State == ConnectionState.Login)
        {
            if (opcode != Opcode.LoginRequest)
            {
                Log.ProtocolViolation(_log, Remote, $"{opcode} before login completed");
                _portal.Metrics.ProtocolError("not-logged-in");
                Abort();
                return default;
            }
            return HandleLoginAsync(pdu);
        }

        if (!pdu.DataDigestOk)
            return HandleDataDigestError(pdu);

        switch (opcode)
        {
            case Opcode.ScsiCommand:
                return HandleScsiCommandAsync(pdu);
            case Opcode.ScsiDataOut:
                return HandleDataOutAsync(pdu);
            case Opcode.NopOut:
                HandleNopOut(pdu);
                return default;
            case Opcode.TaskManagementRequest:
                return HandleTaskManagementAsync(pdu);
            case Opcode.TextRequest:
                HandleTextRequest(pdu);
                return default;
            case Opcode.LogoutRequest:
                return HandleLogoutAsync(pdu);
            case Opcode.LoginRequest:
                // A login PDU in full feature phase is a protocol error (RFC 7143 §6.2).
                SendReject(pdu.Header, RejectReason.ProtocolError);
                return default;
            case Opcode.Snack:
                // ErrorRecoveryLevel 0: no SNACK support.
                SendReject(pdu.Header, RejectReason.CommandNotSupported);
                return default;
            default:
                Log.ProtocolViolation(_log, Remote, $"unknown opcode 0x{(byte)opcode:x2}");
                _portal.Metrics.ProtocolError("unknown-opcode");
                SendReject(pdu.Header, RejectReason.CommandNotSupported);
                return default;
        }
    }

    private ValueTask HandleDataDigestError(in IncomingPdu pdu)
    {
        // RFC 7143 §7.8: reject, discard the payload. A Data-Out's command can no longer complete correctly.
        Log.DataDigestError(_log, Remote, pdu.Header.Opcode.ToString());
        _portal.Metrics.ProtocolError("data-digest");
        SendReject(pdu.Header, RejectReason.DataDigestError);
        if (pdu.Header.Opcode == Opcode.ScsiDataOut)
            return HandleDataOutAsync(pdu, digestFailed: true);
        if (pdu.Header.Opcode == Opcode.ScsiCommand && !pdu.Header.Immediate && Session is { } session)
        {
            // The command is dropped; its CmdSN must not stall the window.
            if (session.Admit(pdu.Header.CmdSN, false) == IscsiSession.Admission.Accept) session.AdvanceWindow();
        }
        return default;
    }

    private void FramingViolation(in Bhs header, string fault)
    {
        Log.FramingError(_log, Remote, fault);
        _portal.Metrics.ProtocolError("framing");
        if (State == ConnectionState.FullFeature && !fault.StartsWith("header digest", StringComparison.Ordinal))
        {
            // The header itself is sound: tell the initiator why before closing.
            CloseAfter(BuildReject(header, RejectReason.ProtocolError), "framing error");
        }
        else
        {
            Abort();
        }
    }

    // ---------------------------------------------------------------- sequence numbers

    public uint NextStatSN() => _statSN++;
    public uint PeekStatSN() => _statSN;

    /// <summary>Writes ExpCmdSN/MaxCmdSN (offsets 28, 32) from the session, or from the login in progress.</summary>
    public void StampCmdSN(Span<byte> header)
    {
        if (Session is { } session) session.StampWindow(header);
        else if (_login is { } login)
        {
            HeaderWriter.U32(header, 28, login.CmdSN);
            HeaderWriter.U32(header, 32, login.CmdSN + (uint)_portal.Options.QueueDepth - 1);
        }
    }

    // ---------------------------------------------------------------- send side

    /// <summary>Queues a PDU source. With <paramref name="kick"/> false the receive loop batches it with others and kicks once.</summary>
    public void Enqueue(OutboundItem item, bool kick = true)
    {
        if (State == ConnectionState.Closed)
        {
            item.OnSent(this, false);
            return;
        }
        Interlocked.Add(ref _outboundBytes, item.QueuedBytes);
        _outbound.Enqueue(item);
        // Once no send loop can run again (closed, or retired after the final PDU), what is queued is released here.
        if (Volatile.Read(ref _sender) == SenderRetired || State == ConnectionState.Closed) ReleaseQueued();
        else if (kick) KickSender();
    }

    public void KickSender()
    {
        if (_outbound.IsEmpty && _partial is null) return;
        if (Interlocked.CompareExchange(ref _sender, SenderActive, SenderIdle) == SenderIdle)
            _ = SendLoopAsync();
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask SendLoopAsync()
    {
        var batch = _batch;
        try
        {
            while (true)
            {
                batch.Reset();
                batch.HeaderDigest = _digestsOn && Parameters.HeaderDigest;
                batch.DataDigest = _digestsOn && Parameters.DataDigest;
                bool final = FillBatch(batch);
                if (batch.IsEmpty && !final)
                {
                    Volatile.Write(ref _sender, SenderIdle);
                    if ((_outbound.IsEmpty && _partial is null) || Interlocked.CompareExchange(ref _sender, SenderActive, SenderIdle) != SenderIdle)
                        return;
                    continue;
                }
                if (!batch.IsEmpty) await _transport.SendAsync(batch.Segments).ConfigureAwait(false);
                long sentBytes = 0;
                foreach (var item in batch.Finished)
                {
                    sentBytes += item.QueuedBytes;
                    item.OnSent(this, true);
                }
                if (Interlocked.Add(ref _outboundBytes, -sentBytes) <= OutboundLowWater)
                    Volatile.Read(ref _drainWaiter)?.TrySetResult();
                if (final)
                {
                    // The final PDU is with the transport: the peer reads it, then the end of the stream. Nothing after it goes out.
                    _transport.ShutdownSend();
                    Retire();
                    _finalSent?.TrySetResult();
                    return;
                }
            }
        }
        catch (Exception e)
        {
            Log.SendFailed(_log, Remote, e.Message);
            Abort();
            // Nothing more will be sent: release everything queued (task slots, buffers) before letting go.
            foreach (var item in batch.Finished) item.OnSent(this, false);
            Retire();
        }
    }

    /// <summary>The send loop stops for good; it releases its own partial item and whatever is queued.</summary>
    private void Retire()
    {
        if (_partial is { } partial) { _partial = null; partial.OnSent(this, false); }
        Interlocked.Exchange(ref _sender, SenderRetired);   // a full fence: an Enqueue either sees it or is drained below
        ReleaseQueued();
    }

    /// <summary>
    /// Releases what is queued (task slots, buffers) once no send loop can run again: the sender is retired, or idle
    /// and retired here (then its partial item is ours too).
    /// </summary>
    private void ReleaseQueued()
    {
        int was = Interlocked.CompareExchange(ref _sender, SenderRetired, SenderIdle);
        if (was == SenderActive) return;   // the running loop releases everything when it retires or fails
        if (was == SenderIdle && _partial is { } partial) { _partial = null; partial.OnSent(this, false); }
        while (_outbound.TryDequeue(out var item)) item.OnSent(this, false);
    }

    /// <summary>Fills <paramref name="batch"/> from the queue; true when it ends with the connection's final PDU.</summary>
    private bool FillBatch(SendBatch batch)
    {
        while (true)
        {
            var item = _partial;
            if (item is null && !_outbound.TryDequeue(out item)) return false;
            _partial = null;
            // Login responses go out before digests switch on; the transition is stamped on the item itself.
            if (item is ControlPduItem { ChangesFraming: true } && !batch.IsEmpty)
            {
                _partial = item;
                return false;
            }
            if (!item.Emit(batch, this))
            {
                _partial = item;
                return false;
            }
            batch.Finished.Add(item);
            if (item.EndsConnection) return true;
            if (item is ControlPduItem { ChangesFraming: true })
            {
                _digestsOn = true;   // every PDU after the final login response carries the negotiated digests
                return false;
            }
        }
    }

    // ---------------------------------------------------------------- reject and teardown

    internal ControlPduItem BuildReject(in Bhs header, RejectReason reason)
    {
        var item = new ControlPduItem(Opcode.Reject);
        item.Header[2] = (byte)reason;
        HeaderWriter.U32(item.Header, 16, 0xFFFFFFFF);
        item.SetData(header.AsReadOnlySpan());
        return item;
    }

    internal void SendReject(in Bhs header, RejectReason reason, bool kick = false)
    {
        Log.Rejected(_log, Remote, header.Opcode.ToString(), reason.ToString());
        _portal.Metrics.ProtocolError("reject-" + reason);
        Enqueue(BuildReject(header, reason), kick);
    }

    /// <summary>
    /// A close the target starts, in order: <paramref name="final"/> goes out after everything queued before it (PDUs
    /// queued after it are dropped), then the send side is shut down (FIN), and the socket is let go when the
    /// initiator closes its side or the close wait passes. The session's state is cleaned up at once either way.
    /// A connection already closing keeps its first close. Thread-safe.
    /// </summary>
    internal void CloseAfter(OutboundItem final, string reason)
    {
        final.EndsConnection = true;
        // The first close wins; its completion is published before the mode, so whoever sees Graceful finds it.
        var sent = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        if (Volatile.Read(ref _closeStarted) != 0
            || Interlocked.CompareExchange(ref _finalSent, sent, null) is not null
            || Interlocked.CompareExchange(ref _closeMode, (int)CloseMode.Graceful, (int)CloseMode.None) != (int)CloseMode.None)
        {
            final.OnSent(this, false);
            return;
        }
        _closeReason = reason;
        MarkClosing();
        Enqueue(final);
        // Wake the receive loop when another thread closes the connection, waiting for input or for the backlog to drain.
        _transport.Input.CancelPendingRead();
        Volatile.Read(ref _drainWaiter)?.TrySetResult();
    }

    /// <summary>
    /// The target drops the connection on its own (shutdown, reinstatement, a cold reset): in full feature phase an
    /// Async Message says so first (<paramref name="asyncEvent"/> 2: this connection, 3: every connection of the
    /// session), then it closes gracefully. Thread-safe.
    /// </summary>
    internal void Drop(byte asyncEvent, string reason)
    {
        OutboundItem final = new EndOfStreamItem();
        if (State == ConnectionState.FullFeature && Session?.Type == SessionType.Normal)
        {
            var notice = new ControlPduItem(Opcode.AsyncMessage);
            HeaderWriter.U32(notice.Header, 16, 0xFFFFFFFF);
            notice.Header[36] = asyncEvent;
            if (asyncEvent == AsyncEventDropConnection) HeaderWriter.U16(notice.Header, 38, Cid);   // Parameter1: the CID
            HeaderWriter.U16(notice.Header, 40, (ushort)_portal.Options.DefaultTime2Wait);         // Parameter2: Time2Wait
            HeaderWriter.U16(notice.Header, 42, (ushort)_portal.Options.DefaultTime2Retain);       // Parameter3: Time2Retain
            final = notice;
        }
        Log.Dropping(_log, Remote, reason);
        CloseAfter(final, reason);
    }

    /// <summary>RFC 7143 §11.9.1 AsyncEvent codes for <see cref="Drop"/>.</summary>
    internal const byte AsyncEventDropConnection = 2, AsyncEventDropSession = 3;

    /// <summary>An abortive close (reset), for protocol violations and dead peers; the receive loop then cleans up.</summary>
    public void Abort()
    {
        if (Interlocked.Exchange(ref _closeMode, (int)CloseMode.Abortive) != (int)CloseMode.Abortive) _closeReason = "reset by the target";
        MarkClosing();
        _lifetime.Cancel();
        _transport.Abort();
    }

    private async Task CloseAsync()
    {
        if (Interlocked.Exchange(ref _closeStarted, 1) != 0) return;
        MarkClosing();
        var mode = (CloseMode)Volatile.Read(ref _closeMode);
        if (mode != CloseMode.Graceful)
        {
            // The peer ended the stream, broke it, or the connection was aborted: a send loop still running fails
            // once the transport is disposed below, and releases what it holds.
            _lifetime.Cancel();
        }
        // The session lets go of this connection first: a reinstating login never waits for the linger below.
        if (Session is { } session)
            await _portal.OnConnectionClosedAsync(this, session).ConfigureAwait(false);
        bool finalSent = false, peerClosed = false;
        if (mode == CloseMode.Graceful)
        {
            (finalSent, peerClosed) = await LingerAsync().ConfigureAwait(false);
            if (!finalSent) _transport.Abort();   // the initiator did not take the final PDU in time: a dead peer
            _lifetime.Cancel();
        }
        string how = mode == CloseMode.None ? "by-initiator"
            : mode == CloseMode.Abortive || !finalSent || Volatile.Read(ref _closeMode) == (int)CloseMode.Abortive ? "reset"
            : peerClosed ? "graceful" : "graceful-timeout";
        Volatile.Write(ref _stateValue, (int)ConnectionState.Closed);
        ReleaseQueued();
        await _transport.DisposeAsync().ConfigureAwait(false);
        _portal.OnConnectionEnded(this);
        _portal.Metrics.ConnectionClosed(how);
        Log.ConnectionClosed(_log, Remote, _closeReason, how);
    }

    /// <summary>
    /// A graceful close's wait: the final PDU goes out (the send loop then shuts the send side down), and what the
    /// initiator still sends is read and dropped until it closes its side, all within the close wait.
    /// </summary>
    private async Task<(bool FinalSent, bool PeerClosed)> LingerAsync()
    {
        var finalSent = _finalSent!.Task;
        bool peerClosed = false;
        var input = _transport.Input;
        using var bound = CancellationTokenSource.CreateLinkedTokenSource(_lifetime.Token);
        bound.CancelAfter(_portal.Options.CloseWaitMilliseconds);
        try
        {
            while (true)
            {
                var result = await input.ReadAsync(bound.Token).ConfigureAwait(false);
                input.AdvanceTo(result.Buffer.End);
                if (result.IsCompleted)
                {
                    peerClosed = true;
                    break;
                }
                if (result.IsCanceled && Volatile.Read(ref _closeMode) == (int)CloseMode.Abortive) break;
                // Otherwise a stale wake-up (CloseAfter's): keep reading.
            }
            await finalSent.WaitAsync(bound.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) { }
        catch (Exception e) when (e is not OutOfMemoryException) { /* the stream broke: the peer is gone */ }
        return (finalSent.IsCompletedSuccessfully, peerClosed);
    }

    public bool IdleLongerThan(TimeSpan span) => Environment.TickCount64 - Volatile.Read(ref _lastReceiveTicks) > span.TotalMilliseconds;
}
