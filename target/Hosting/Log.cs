using Microsoft.Extensions.Logging;

namespace ISCSISnap.Target;

/// <summary>Source-generated log messages of the iSCSI target, with fixed event ids (1xxx). Secrets never appear here.</summary>
internal static partial class Log
{
    [LoggerMessage(1001, LogLevel.Information, "iSCSI portal listening on {EndPoint}")]
    public static partial void PortalListening(ILogger logger, string endPoint);

    [LoggerMessage(1002, LogLevel.Information, "iSCSI portal stopped")]
    public static partial void PortalStopped(ILogger logger);

    [LoggerMessage(1003, LogLevel.Warning, "accept failed: {Reason}")]
    public static partial void AcceptFailed(ILogger logger, string reason);

    [LoggerMessage(1004, LogLevel.Debug, "connection from {Remote}")]
    public static partial void ConnectionAccepted(ILogger logger, string remote);

    [LoggerMessage(1005, LogLevel.Debug, "connection {Remote} closed ({How}): {Reason}")]
    public static partial void ConnectionClosed(ILogger logger, string remote, string reason, string how);

    [LoggerMessage(1006, LogLevel.Information, "connection {Remote} failed: {Reason}")]
    public static partial void ConnectionFailed(ILogger logger, string remote, string reason);

    [LoggerMessage(1007, LogLevel.Error, "connection {Remote} crashed")]
    public static partial void ConnectionCrashed(ILogger logger, Exception exception, string remote);

    [LoggerMessage(1008, LogLevel.Warning, "connection {Remote} sent a truncated PDU ({Bytes} bytes) before closing")]
    public static partial void TruncatedPdu(ILogger logger, string remote, long bytes);

    [LoggerMessage(1009, LogLevel.Information, "connection {Remote}: send failed: {Reason}")]
    public static partial void SendFailed(ILogger logger, string remote, string reason);

    [LoggerMessage(1010, LogLevel.Warning, "timer failed for connection {Remote}")]
    public static partial void TimerFailed(ILogger logger, Exception exception, string remote);

    [LoggerMessage(1011, LogLevel.Information, "dropping connection {Remote}: {Reason}")]
    public static partial void Dropping(ILogger logger, string remote, string reason);

    [LoggerMessage(1101, LogLevel.Information, "login from {Remote}: {Initiator} -> {Target}, TSIH {Tsih}, header digest {HeaderDigest}, data digest {DataDigest}, auth {Auth}")]
    public static partial void LoginSucceeded(ILogger logger, string remote, string initiator, string target, ushort tsih, bool headerDigest, bool dataDigest, string auth);

    [LoggerMessage(1102, LogLevel.Warning, "login from {Remote} ({Initiator}) refused with status {Status:x4}: {Reason}")]
    public static partial void LoginFailed(ILogger logger, string remote, string initiator, ushort status, string reason);

    [LoggerMessage(1103, LogLevel.Warning, "login from {Remote} timed out")]
    public static partial void LoginTimedOut(ILogger logger, string remote);

    [LoggerMessage(1104, LogLevel.Information, "{Initiator} ISID {Isid:x12} logged in again: session {Tsih} is reinstated")]
    public static partial void SessionReinstated(ILogger logger, string initiator, ulong isid, ushort tsih);

    [LoggerMessage(1105, LogLevel.Information, "session {Tsih} of {Initiator} ended: {Reason}")]
    public static partial void SessionEnded(ILogger logger, string initiator, ushort tsih, string reason);

    [LoggerMessage(1106, LogLevel.Information, "{Remote} ({Initiator}) logged out (reason {Reason})")]
    public static partial void LoggedOut(ILogger logger, string remote, string initiator, int reason);

    [LoggerMessage(1201, LogLevel.Warning, "{Remote}: protocol violation: {Reason}")]
    public static partial void ProtocolViolation(ILogger logger, string remote, string reason);

    [LoggerMessage(1202, LogLevel.Warning, "{Remote}: framing error, closing: {Reason}")]
    public static partial void FramingError(ILogger logger, string remote, string reason);

    [LoggerMessage(1203, LogLevel.Warning, "{Remote}: data digest error in {Opcode}")]
    public static partial void DataDigestError(ILogger logger, string remote, string opcode);

    [LoggerMessage(1204, LogLevel.Information, "{Remote}: rejected {Opcode}: {Reason}")]
    public static partial void Rejected(ILogger logger, string remote, string opcode, string reason);

    [LoggerMessage(1205, LogLevel.Debug, "{Remote}: command CmdSN {CmdSN} outside window [{ExpCmdSN}, {MaxCmdSN}] ignored")]
    public static partial void CommandOutsideWindow(ILogger logger, string remote, uint cmdSN, uint expCmdSN, uint maxCmdSN);

    [LoggerMessage(1206, LogLevel.Debug, "{Remote}: Data-Out for unknown task 0x{Itt:x8} discarded")]
    public static partial void DataOutForUnknownTask(ILogger logger, string remote, uint itt);

    [LoggerMessage(1207, LogLevel.Warning, "{Remote}: no NOP-In answer within {Seconds} s, dropping the connection")]
    public static partial void PingTimedOut(ILogger logger, string remote, int seconds);

    [LoggerMessage(1301, LogLevel.Information, "{Remote}: task management {Function} on LUN {Lun} (task 0x{Itt:x8})")]
    public static partial void TaskManagement(ILogger logger, string remote, string function, ulong lun, uint itt);

    [LoggerMessage(1302, LogLevel.Error, "{Remote}: command 0x{Opcode:x2} failed unexpectedly")]
    public static partial void CommandFailed(ILogger logger, Exception exception, string remote, byte opcode);
}

/// <summary>Which metrics family a SCSI opcode belongs to.</summary>
internal static class CommandKinds
{
    public static Hosting.CommandKind Classify(byte opcode) => opcode switch
    {
        0x08 or 0x28 or 0xA8 or 0x88 => Hosting.CommandKind.Read,
        0x0A or 0x2A or 0xAA or 0x8A or 0x2E or 0xAE or 0x8E => Hosting.CommandKind.Write,
        _ => Hosting.CommandKind.Other,
    };
}
