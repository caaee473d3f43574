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

    [LoggerMessage(2109, LogLevel.Information, "LUN {Lun} of {Target} served {Image} directly; it is now the base of disk {Disk}")]
    public static partial void LunMigrated(ILogger logger, string target, int lun, string image, string disk);

    [LoggerMessage(2110, LogLevel.Information, "kept disk {Disk} after deleting its LUN: {Reason}")]
    public static partial void DiskKept(ILogger logger, string disk, string reason);

    [LoggerMessage(2301, LogLevel.Information, "job {Job} started: {Kind}, {Description}")]
    public static partial void JobStarted(ILogger logger, Guid job, string kind, string description);

    [LoggerMessage(2302, LogLevel.Information, "job {Job} ({Kind}) ended {State} {Error}")]
    public static partial void JobFinished(ILogger logger, Guid job, string kind, string state, string error);

    [LoggerMessage(2303, LogLevel.Information, "resuming the interrupted merge of snapshot {Snapshot} of disk {Disk}")]
    public static partial void MergeResumed(ILogger logger, string disk, Guid snapshot);

    [LoggerMessage(2304, LogLevel.Warning, "refused {File}: {Fault}")]
    public static partial void DiskRefused(ILogger logger, string file, string fault);

    [LoggerMessage(2401, LogLevel.Warning, "filter {Filter} of LUN {Lun} faulted: {Reason} (quarantined: {Quarantined})")]
    public static partial void FilterFault(ILogger logger, string lun, string filter, string reason, bool quarantined);

    [LoggerMessage(2402, LogLevel.Information, "filter {Filter} of LUN {Lun}: {Message}")]
    public static partial void FilterMessage(ILogger logger, string lun, string filter, string message);

    [LoggerMessage(2403, LogLevel.Information, "filter {Filter} added to LUN {Lun} at position {Position}")]
    public static partial void FilterAdded(ILogger logger, string lun, string filter, int position);

    [LoggerMessage(2404, LogLevel.Information, "filter {Filter} removed from LUN {Lun}")]
    public static partial void FilterRemoved(ILogger logger, string lun, string filter);

    [LoggerMessage(2405, LogLevel.Error, "filter {Type} of LUN {Lun} could not be set up, the LUN runs without it: {Reason}")]
    public static partial void FilterUnavailable(ILogger logger, string lun, string type, string reason);

    [LoggerMessage(2406, LogLevel.Information, "removed {File}: the checksums of a layer that no longer exists")]
    public static partial void ChecksumsRemoved(ILogger logger, string file);

    [LoggerMessage(2201, LogLevel.Warning, "refused a management request from {Remote}: the API is loopback-only until authentication arrives")]
    public static partial void NonLoopbackRefused(ILogger logger, string remote);
}
