namespace ISCSISnap.Web;

/// <summary>Source-generated log messages of the appliance host (event ids 2xxx). Secrets never appear here.</summary>
internal static partial class Log
{
    [LoggerMessage(2001, LogLevel.Information, "ISCSISnap starting: data {DataDirectory}, iSCSI portal {Portal}, web {Web}")]
    public static partial void Starting(ILogger logger, string dataDirectory, string portal, string web);

    [LoggerMessage(2002, LogLevel.Information, "ISCSISnap ready: {Targets} target(s), {Luns} LUN(s)")]
    public static partial void Ready(ILogger logger, int targets, int luns);

    [LoggerMessage(2003, LogLevel.Information, "ISCSISnap stopping")]
    public static partial void Stopping(ILogger logger);

    [LoggerMessage(2004, LogLevel.Information, "ISCSISnap stopped; all devices flushed")]
    public static partial void Stopped(ILogger logger);

    [LoggerMessage(2101, LogLevel.Information, "created the demo target {Target} with a {SizeBytes}-byte thin LUN 0")]
    public static partial void DemoTargetCreated(ILogger logger, string target, long sizeBytes);

    [LoggerMessage(2102, LogLevel.Information, "created target {Target}")]
    public static partial void TargetCreated(ILogger logger, string target);

    [LoggerMessage(2103, LogLevel.Information, "deleted target {Target}")]
    public static partial void TargetDeleted(ILogger logger, string target);

    [LoggerMessage(2104, LogLevel.Information, "created LUN {Lun} on {Target}: {Image}, {SizeBytes} bytes")]
    public static partial void LunCreated(ILogger logger, string target, int lun, string image, long sizeBytes);

    [LoggerMessage(2105, LogLevel.Information, "deleted LUN {Lun} of {Target}")]
    public static partial void LunDeleted(ILogger logger, string target, int lun);

    [LoggerMessage(2106, LogLevel.Information, "grew LUN {Lun} of {Target} to {SizeBytes} bytes")]
    public static partial void LunGrown(ILogger logger, string target, int lun, long sizeBytes);

    [LoggerMessage(2107, LogLevel.Error, "LUN {Lun} of {Target} is unavailable: {Reason}")]
    public static partial void LunUnavailable(ILogger logger, string target, int lun, string reason);

    [LoggerMessage(2108, LogLevel.Critical, "flushing {Unit} of {Target} at shutdown failed: {Status}")]
    public static partial void FlushFailed(ILogger logger, string target, string unit, string status);

    [LoggerMessage(2201, LogLevel.Warning, "refused a management request from {Remote}: the API is loopback-only until authentication arrives")]
    public static partial void NonLoopbackRefused(ILogger logger, string remote);
}
