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
    private int _senderActive;
    private bool _digestsOn;   // owned by the send loop
    private uint _statSN;
    private FramingLimits _limits;
    private volatile ConnectionState _state = ConnectionState.Login;
    private long _lastReceiveTicks = Environment.TickCount64;
    private int _closeStarted;
    private bool _loginTimerArmed = true;   // owned by the receive loop
    private long _outboundBytes;
    private TaskCompletionSource? _drainWaiter;

    /// <summary>
    /// Above this many bytes of queued responses the receive loop stops taking PDUs until the sender is down to
    /// <see cref="OutboundLowWater"/>: a peer that sends requests (NOP-Outs with data, say) but never reads the
    /// answers gets TCP backpressure instead of growing the target's memory, and is dropped by the NOP-In timeout.
    /// </summary>
    internal const long OutboundHighWater = 4 << 20, OutboundLowWater = 1 << 20;

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
    public bool IsClosed => _state >= ConnectionState.Closing;
    internal ConnectionState State => _state;
    public CancellationToken Lifetime => _lifetime.Token;

    // ---------------------------------------------------------------- receive side

    public async Task RunAsync()
    {
        var input = _transport.Input;
        using var loginTimer = new Timer(static s => ((IscsiConnection)s!).OnLoginTimeout(), this,
            TimeSpan.FromSeconds(_portal.Options.LoginTimeoutSeconds), Timeout.InfiniteTimeSpan);
        try
        {
            while (_state < ConnectionState.Closing)
            {
                var result = await input.ReadAsync().ConfigureAwait(false);
                if (result.IsCanceled) break;
                var buffer = result.Buffer;
                try
                {
                    while (_state < ConnectionState.Closing)
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
                        if (_state == ConnectionState.FullFeature && _loginTimerArmed)
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
                    if (!buffer.IsEmpty && _state < ConnectionState.Closing)
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
        }
        finally
        {
            await CloseAsync("receive loop ended").ConfigureAwait(false);
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
        if (_state == ConnectionState.Login)
        {
            Log.LoginTimedOut(_log, Remote);
            _portal.Metrics.LoginAttempt(false, "timeout");
            Abort();
        }
    }

    private ValueTask HandlePduAsync(IncomingPdu pdu)
    {
        var opcode = pdu.Header.Opcode;
        if (_state == ConnectionState.Login)
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
        if (_state == ConnectionState.FullFeature && !fault.StartsWith("header digest", StringComparison.Ordinal))
        {
            // The header itself is sound: tell the initiator why before closing.
            var reject = BuildReject(header, RejectReason.ProtocolError);
            reject.AfterSend = static (c, _) => c.Abort();
            Enqueue(reject);
            _state = ConnectionState.Closing;
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
        if (_state == ConnectionState.Closed)
        {
            item.OnSent(this, false);
            return;
        }
        Interlocked.Add(ref _outboundBytes, item.QueuedBytes);
        _outbound.Enqueue(item);
        if (kick) KickSender();
    }

    public void KickSender()
    {
        if (_outbound.IsEmpty && _partial is null) return;
        if (Interlocked.CompareExchange(ref _senderActive, 1, 0) == 0)
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
                FillBatch(batch);
                if (batch.IsEmpty)
                {
                    Volatile.Write(ref _senderActive, 0);
                    if ((_outbound.IsEmpty && _partial is null) || Interlocked.CompareExchange(ref _senderActive, 1, 0) != 0)
                        return;
                    continue;
                }
                await _transport.SendAsync(batch.Segments).ConfigureAwait(false);
                long sentBytes = 0;
                foreach (var item in batch.Finished)
                {
                    sentBytes += item.QueuedBytes;
                    item.OnSent(this, true);
                }
                if (Interlocked.Add(ref _outboundBytes, -sentBytes) <= OutboundLowWater)
                    Volatile.Read(ref _drainWaiter)?.TrySetResult();
            }
        }
        catch (Exception e)
        {
            Log.SendFailed(_log, Remote, e.Message);
            Abort();
            // Nothing more will be sent: release everything queued (task slots, buffers) before letting go.
            foreach (var item in batch.Finished) item.OnSent(this, false);
            if (_partial is { } partial) { _partial = null; partial.OnSent(this, false); }
            while (_outbound.TryDequeue(out var item)) item.OnSent(this, false);
            Volatile.Write(ref _senderActive, 0);
            while (_outbound.TryDequeue(out var late)) late.OnSent(this, false);
        }
    }

    private void FillBatch(SendBatch batch)
    {
        while (true)
        {
            var item = _partial;
            if (item is null && !_outbound.TryDequeue(out item)) return;
            _partial = null;
            // Login responses go out before digests switch on; the transition is stamped on the item itself.
            if (item is ControlPduItem { ChangesFraming: true } && !batch.IsEmpty)
            {
                _partial = item;
                return;
            }
            if (!item.Emit(batch, this))
            {
                _partial = item;
                return;
            }
            batch.Finished.Add(item);
            if (item is ControlPduItem { ChangesFraming: true })
            {
                _digestsOn = true;   // every PDU after the final login response carries the negotiated digests
                return;
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

    /// <summary>Drops the transport at once; the receive loop then runs the orderly cleanup.</summary>
    public void Abort()
    {
        if (_state < ConnectionState.Closing) _state = ConnectionState.Closing;
        _lifetime.Cancel();
        _transport.Abort();
    }

    private async Task CloseAsync(string reason)
    {
        if (Interlocked.Exchange(ref _closeStarted, 1) != 0) return;
        _state = ConnectionState.Closing;
        _lifetime.Cancel();
        _transport.Abort();
        if (Session is { } session)
            await _portal.OnConnectionClosedAsync(this, session).ConfigureAwait(false);
        _state = ConnectionState.Closed;
        // Whatever is still queued will never be sent: release it.
        if (Interlocked.CompareExchange(ref _senderActive, 1, 0) == 0)
        {
            if (_partial is { } partial) { _partial = null; partial.OnSent(this, false); }
            while (_outbound.TryDequeue(out var item)) item.OnSent(this, false);
        }
        await _transport.DisposeAsync().ConfigureAwait(false);
        _portal.OnConnectionEnded(this);
        Log.ConnectionClosed(_log, Remote, reason);
    }

    public bool IdleLongerThan(TimeSpan span) => Environment.TickCount64 - Volatile.Read(ref _lastReceiveTicks) > span.TotalMilliseconds;
}
