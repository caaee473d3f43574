using System.Buffers;
using System.Globalization;
using System.Net;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Iscsi.Login;
using ISCSISnap.Target.Iscsi.Pdus;
using ISCSISnap.Target.Iscsi.Sessions;
using ISCSISnap.Target.Iscsi.Text;
using ISCSISnap.Target.Scsi;

namespace ISCSISnap.Target.Iscsi.Connections;

internal sealed partial class IscsiConnection
{
    private const int MaxTextRequestBytes = 64 * 1024;
    private ArrayBufferWriter<byte>? _partialText;
    private byte[]? _pendingTextResponse;
    private int _pendingTextOffset;
    private uint _pendingTextTtt = 0xFFFFFFFF;
    private uint _nextTextTtt = 1;
    private uint _pingTtt = 0xFFFFFFFF;
    private long _pingSentTicks;
    private uint _nextPingTtt = 0x10000;

    // ---------------------------------------------------------------- NOP

    private void HandleNopOut(in IncomingPdu pdu)
    {
        ref readonly var h = ref pdu.Header;
        var session = Session!;
        uint itt = h.InitiatorTaskTag;
        if (itt == 0xFFFFFFFF)
        {
            // The answer to our ping (or a NOP-Out that wants no answer).
            if (h.TargetTransferTag == _pingTtt) _pingTtt = 0xFFFFFFFF;
            return;
        }
        if (!h.Immediate)
        {
            if (session.Admit(h.CmdSN, false) == IscsiSession.Admission.Ignore) return;
            session.AdvanceWindow();
        }
        var item = new ControlPduItem(Opcode.NopIn);
        HeaderWriter.U64(item.Header, 8, h.Lun);
        HeaderWriter.U32(item.Header, 16, itt);
        HeaderWriter.U32(item.Header, 20, 0xFFFFFFFF);
        int echo = (int)Math.Min(pdu.Data.Length, Parameters.InitiatorMaxRecvDataSegmentLength);
        if (echo > 0) item.SetData(pdu.Data.Slice(0, echo).ToArray());
        Enqueue(item, kick: false);
    }

    /// <summary>Called about once a second: pings an idle connection and drops one whose ping went unanswered.</summary>
    public void OnTimer()
    {
        if (State != ConnectionState.FullFeature) return;
        var options = _portal.Options;
        long now = Environment.TickCount64;
        if (_pingTtt != 0xFFFFFFFF)
        {
            if (now - _pingSentTicks > options.NopInTimeoutSeconds * 1000L)
            {
                Log.PingTimedOut(_log, Remote, options.NopInTimeoutSeconds);
                _portal.Metrics.ProtocolError("nop-timeout");
                Abort();
            }
            return;
        }
        if (options.NopInIntervalSeconds == 0 || !IdleLongerThan(TimeSpan.FromSeconds(options.NopInIntervalSeconds))) return;
        uint ttt = _nextPingTtt++;
        if (ttt == 0xFFFFFFFF) ttt = _nextPingTtt++;
        _pingTtt = ttt;
        _pingSentTicks = now;
        var item = new ControlPduItem(Opcode.NopIn) { AdvancesStatSN = false };
        HeaderWriter.U32(item.Header, 16, 0xFFFFFFFF);
        HeaderWriter.U32(item.Header, 20, ttt);
        Enqueue(item);
    }

    /// <summary>Shutdown: Async Message "logout requested" (event 1) with <paramref name="seconds"/> to comply.</summary>
    public void RequestLogout(int seconds)
    {
        if (State != ConnectionState.FullFeature || Session?.Type != SessionType.Normal) return;
        var item = new ControlPduItem(Opcode.AsyncMessage);
        HeaderWriter.U32(item.Header, 16, 0xFFFFFFFF);
        item.Header[36] = 1;
        HeaderWriter.U16(item.Header, 42, (ushort)Math.Clamp(seconds, 1, 3600));
        Enqueue(item);
    }

    // ---------------------------------------------------------------- text

    private void HandleTextRequest(in IncomingPdu pdu)
    {
        ref readonly var h = ref pdu.Header;
        var session = Session!;
        if (!h.Immediate)
        {
            if (session.Admit(h.CmdSN, false) == IscsiSession.Admission.Ignore) return;
            session.AdvanceWindow();
        }
        uint itt = h.InitiatorTaskTag;
        uint ttt = h.TargetTransferTag;
        bool @continue = (h.Flags & 0x40) != 0;

        if (ttt != 0xFFFFFFFF)
        {
            if (ttt == _pendingTextTtt && _pendingTextResponse is not null)
            {
                SendTextChunk(itt);
                return;
            }
            SendReject(h, RejectReason.InvalidPduField);
            return;
        }
        _pendingTextResponse = null;
        _pendingTextTtt = 0xFFFFFFFF;

        if (@continue || _partialText is not null)
        {
            _partialText ??= new ArrayBufferWriter<byte>();
            if (_partialText.WrittenCount + pdu.Data.Length > MaxTextRequestBytes)
            {
                _partialText = null;
                SendReject(h, RejectReason.ProtocolError);
                return;
            }
            foreach (var segment in pdu.Data) _partialText.Write(segment.Span);
            if (@continue)
            {
                var ack = new ControlPduItem(Opcode.TextResponse, 0x00);
                HeaderWriter.U32(ack.Header, 16, itt);
                HeaderWriter.U32(ack.Header, 20, 0xFFFFFFFF);
                Enqueue(ack, kick: false);
                return;
            }
        }
        byte[] text = _partialText is { } partial ? partial.WrittenSpan.ToArray() : pdu.Data.ToArray();
        _partialText = null;
        if (!TextParameters.TryParse(text, out var request, out var fault))
        {
            Log.ProtocolViolation(_log, Remote, fault!);
            SendReject(h, RejectReason.ProtocolError);
            return;
        }
        var response = new TextParameters();
        var operational = new TextParameters();
        foreach (var (key, value) in request.Pairs)
        {
            if (key == "SendTargets") AnswerSendTargets(session, value, response);
            else operational.Add(key, value);
        }
        if (operational.Count > 0)
        {
            var negotiator = new OperationalNegotiator(_portal.Options, Parameters, fullFeaturePhase: true) { Discovery = session.Type == SessionType.Discovery };
            negotiator.Negotiate(operational, response);
        }
        _pendingTextResponse = response.Encode();
        _pendingTextOffset = 0;
        SendTextChunk(itt);
    }

    private void AnswerSendTargets(IscsiSession session, string value, TextParameters response)
    {
        IEnumerable<IscsiTarget> targets = session.Type == SessionType.Discovery && value == "All"
            ? _portal.Targets.All.Where(t => t.Access.Allows(session.InitiatorName))
            : session.Target is { } own && (value.Length == 0 || value == "All" || string.Equals(value, own.Name, StringComparison.OrdinalIgnoreCase))
                ? [own]
                : value.Length > 0 && _portal.Targets.Find(value) is { } named && named.Access.Allows(session.InitiatorName) && session.Type == SessionType.Discovery
                    ? [named]
                    : [];
        string address = FormatAddress(_transport.LocalEndPoint);
        foreach (var target in targets)
        {
            response.Add("TargetName", target.Name);
            response.Add("TargetAddress", $"{address},{_portal.Options.PortalGroupTag}");
        }
    }

    private static string FormatAddress(EndPoint? endPoint) => endPoint switch
    {
        IPEndPoint { Address.AddressFamily: System.Net.Sockets.AddressFamily.InterNetworkV6 } v6 when !v6.Address.IsIPv4MappedToIPv6 => $"[{v6.Address}]:{v6.Port}",
        IPEndPoint v4 => $"{(v4.Address.IsIPv4MappedToIPv6 ? v4.Address.MapToIPv4() : v4.Address)}:{v4.Port}",
        _ => "127.0.0.1:3260",
    };

    /// <summary>Sends the next piece of a text response; more than one piece is chained with C=1 and a target transfer tag.</summary>
    private void SendTextChunk(uint itt)
    {
        var data = _pendingTextResponse!;
        int limit = Parameters.InitiatorMaxRecvDataSegmentLength;
        int remaining = data.Length - _pendingTextOffset;
        int length = Math.Min(remaining, limit);
        bool last = length == remaining;
        var item = new ControlPduItem(Opcode.TextResponse, last ? (byte)0x80 : (byte)0x40);
        HeaderWriter.U32(item.Header, 16, itt);
        if (last)
        {
            HeaderWriter.U32(item.Header, 20, 0xFFFFFFFF);
            _pendingTextResponse = null;
            _pendingTextTtt = 0xFFFFFFFF;
        }
        else
        {
            _pendingTextTtt = _nextTextTtt++;
            HeaderWriter.U32(item.Header, 20, _pendingTextTtt);
        }
        if (length > 0) item.SetData(data.AsSpan(_pendingTextOffset, length));
        _pendingTextOffset += length;
        Enqueue(item, kick: false);
    }

    // ---------------------------------------------------------------- logout

    private async ValueTask HandleLogoutAsync(IncomingPdu pdu)
    {
        var h = pdu.Header;
        var session = Session!;
        if (!h.Immediate)
        {
            if (session.Admit(h.CmdSN, false) == IscsiSession.Admission.Ignore) return;
            session.AdvanceWindow();
        }
        int reason = h.Flags & 0x7F;
        ushort cid = h.U16(20);
        byte response;
        bool closeThis = false;
        switch (reason)
        {
            case 0:   // close the session
                await _portal.QuiesceSessionAsync(session, this).ConfigureAwait(false);
                response = 0;
                closeThis = true;
                break;
            case 1:   // close a connection
                if (cid == Cid)
                {
                    if (session.Connections.Count == 1) await _portal.QuiesceSessionAsync(session, this).ConfigureAwait(false);
                    response = 0;
                    closeThis = true;
                }
                else if (session.Connections.FirstOrDefault(c => c.Cid == cid) is { } other)
                {
                    other.Drop(AsyncEventDropConnection, $"logged out by connection {Cid}");
                    response = 0;
                }
                else response = 1;   // CID not found
                break;
            case 2:   // remove the connection for recovery: ErrorRecoveryLevel 0 has no recovery
                response = 2;
                break;
            default:
                SendReject(h, RejectReason.InvalidPduField, kick: true);
                return;
        }
        var item = new ControlPduItem(Opcode.LogoutResponse);
        item.Header[2] = response;
        HeaderWriter.U32(item.Header, 16, h.InitiatorTaskTag);
        HeaderWriter.U16(item.Header, 40, 0);   // Time2Wait
        HeaderWriter.U16(item.Header, 42, 0);   // Time2Retain
        if (closeThis)
        {
            Log.LoggedOut(_log, Remote, session.InitiatorName, reason);
            CloseAfter(item, "logout");
        }
        else Enqueue(item);
    }

    // ---------------------------------------------------------------- task management

    private async ValueTask HandleTaskManagementAsync(IncomingPdu pdu)
    {
        var h = pdu.Header;
        var session = Session!;
        if (!h.Immediate)
        {
            if (session.Admit(h.CmdSN, false) == IscsiSession.Admission.Ignore) return;
            session.AdvanceWindow();
        }
        if (session.Type == SessionType.Discovery)
        {
            SendReject(h, RejectReason.ProtocolError);
            return;
        }
        var function = (TaskManagementFunction)(h.Flags & 0x7F);
        ulong lun = LunAddressing.Decode(h.Lun, out bool lunValid);
        uint referencedItt = h.U32(20);
        var target = session.Target!;
        var unit = lunValid ? target.GetLun(lun) : null;
        _portal.Metrics.TaskManagement(function.ToString());
        Log.TaskManagement(_log, Remote, function.ToString(), lun, referencedItt);

        TaskManagementResponse response;
        bool dropAllAfterwards = false;
        switch (function)
        {
            case TaskManagementFunction.AbortTask:
            {
                var task = session.FindTask(referencedItt);
                response = task is not null && await _portal.AbortTaskAsync(task).ConfigureAwait(false)
                    ? TaskManagementResponse.FunctionComplete
                    : TaskManagementResponse.TaskDoesNotExist;
                break;
            }
            case TaskManagementFunction.AbortTaskSet:
                if (unit is null) { response = TaskManagementResponse.LunDoesNotExist; break; }
                await _portal.AbortTasksAsync(t => t.Session == session && t.Unit == unit, otherNexusesNotified: false).ConfigureAwait(false);
                response = TaskManagementResponse.FunctionComplete;
                break;
            case TaskManagementFunction.ClearTaskSet:
                if (unit is null) { response = TaskManagementResponse.LunDoesNotExist; break; }
                await _portal.AbortTasksAsync(t => t.Unit == unit, otherNexusesNotified: true, issuer: session).ConfigureAwait(false);
                response = TaskManagementResponse.FunctionComplete;
                break;
            case TaskManagementFunction.ClearAca:
                response = unit is null ? TaskManagementResponse.LunDoesNotExist : TaskManagementResponse.FunctionComplete;
                break;
            case TaskManagementFunction.LogicalUnitReset:
                if (unit is null) { response = TaskManagementResponse.LunDoesNotExist; break; }
                await _portal.AbortTasksAsync(t => t.Unit == unit, otherNexusesNotified: false).ConfigureAwait(false);
                unit.Reset();
                response = TaskManagementResponse.FunctionComplete;
                break;
            case TaskManagementFunction.TargetWarmReset:
            case TaskManagementFunction.TargetColdReset:
                await _portal.AbortTasksAsync(t => t.Session.Target == target, otherNexusesNotified: false).ConfigureAwait(false);
                foreach (var each in target.Luns.Values) each.Reset();
                response = TaskManagementResponse.FunctionComplete;
                dropAllAfterwards = function == TaskManagementFunction.TargetColdReset;
                break;
            case TaskManagementFunction.TaskReassign:
                response = TaskManagementResponse.TaskAllegianceReassignmentNotSupported;
                break;
            default:
                response = TaskManagementResponse.NotSupported;
                break;
        }

        var item = new ControlPduItem(Opcode.TaskManagementResponse);
        item.Header[2] = (byte)response;
        HeaderWriter.U32(item.Header, 16, h.InitiatorTaskTag);
        if (dropAllAfterwards)
        {
            // TARGET COLD RESET: this connection ends after its answer, every other one of the target after an Async Message.
            CloseAfter(item, "target cold reset");
            _portal.DropTargetConnections(target, "target cold reset");
        }
        else Enqueue(item);
    }
}
