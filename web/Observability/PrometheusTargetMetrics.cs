using ISCSISnap.Target.Hosting;
using Prometheus;

namespace ISCSISnap.Web.Observability;

/// <summary>
/// Target observations as Prometheus metrics. Label children are resolved once, so the per-command path is a
/// few interlocked adds. Threading: thread-safe.
/// </summary>
public sealed class PrometheusTargetMetrics : ITargetMetrics
{
    private static readonly string[] s_kinds = ["read", "write", "other"];

    private readonly Counter.Child[] _commands = new Counter.Child[3];
    private readonly Counter.Child[] _failures = new Counter.Child[3];
    private readonly Counter.Child[] _bytes = new Counter.Child[3];
    private readonly Histogram.Child[] _latency = new Histogram.Child[3];
    private readonly Counter _logins;
    private readonly Gauge _sessions;
    private readonly Counter _protocolErrors;
    private readonly Counter _taskManagement;
    private readonly Counter _connectionsClosed;

    public PrometheusTargetMetrics(IMetricFactory factory)
    {
        var commands = factory.CreateCounter("iscsisnap_scsi_commands_total", "SCSI commands completed, by kind.", ["kind"]);
        var failures = factory.CreateCounter("iscsisnap_scsi_command_failures_total", "SCSI commands completed with a status other than GOOD, by kind.", ["kind"]);
        var bytes = factory.CreateCounter("iscsisnap_scsi_bytes_total", "Bytes read or written by SCSI commands, by kind.", ["kind"]);
        var latency = factory.CreateHistogram("iscsisnap_scsi_command_duration_seconds", "Time from command arrival to completion, by kind.",
            new HistogramConfiguration { LabelNames = ["kind"], Buckets = Histogram.ExponentialBuckets(0.00001, 2, 20) });
        for (int i = 0; i < 3; i++)
        {
            _commands[i] = commands.WithLabels(s_kinds[i]);
            _failures[i] = failures.WithLabels(s_kinds[i]);
            _bytes[i] = bytes.WithLabels(s_kinds[i]);
            _latency[i] = latency.WithLabels(s_kinds[i]);
        }
        _logins = factory.CreateCounter("iscsisnap_iscsi_logins_total", "iSCSI login attempts by outcome.", ["outcome", "reason"]);
        _sessions = factory.CreateGauge("iscsisnap_iscsi_sessions", "iSCSI sessions currently logged in.");
        _protocolErrors = factory.CreateCounter("iscsisnap_iscsi_protocol_errors_total", "iSCSI protocol errors by kind.", ["kind"]);
        _taskManagement = factory.CreateCounter("iscsisnap_iscsi_task_management_total", "Task management functions received.", ["function"]);
        _connectionsClosed = factory.CreateCounter("iscsisnap_iscsi_connections_closed_total",
            "iSCSI connections ended, by how: graceful (final PDU, FIN, the initiator closed), graceful-timeout (the initiator did not close in time), reset (protocol violation or dead peer), by-initiator.", ["how"]);
    }

    public void CommandCompleted(CommandKind kind, long bytes, double seconds, bool failed)
    {
        int i = (int)kind;
        _commands[i].Inc();
        if (failed) _failures[i].Inc();
        if (bytes > 0) _bytes[i].Inc(bytes);
        _latency[i].Observe(seconds);
    }

    public void LoginAttempt(bool succeeded, string reason) => _logins.WithLabels(succeeded ? "success" : "failure", reason).Inc();
    public void SessionOpened() => _sessions.Inc();
    public void SessionClosed() => _sessions.Dec();
    public void ProtocolError(string kind) => _protocolErrors.WithLabels(kind).Inc();
    public void TaskManagement(string function) => _taskManagement.WithLabels(function).Inc();
    public void ConnectionClosed(string how) => _connectionsClosed.WithLabels(how).Inc();
}
