namespace ISCSISnap.Target.Hosting;

/// <summary>SCSI command families counted separately in metrics.</summary>
public enum CommandKind : byte
{
    Read,
    Write,
    Other,
}

/// <summary>
/// Observations the target reports; the host exports them (Prometheus). Implementations must be cheap and
/// thread-safe: <see cref="CommandCompleted"/> runs once per command.
/// </summary>
public interface ITargetMetrics
{
    void CommandCompleted(CommandKind kind, long bytes, double seconds, bool failed);
    void LoginAttempt(bool succeeded, string reason);
    void SessionOpened();
    void SessionClosed();
    void ProtocolError(string kind);
    void TaskManagement(string function);
    /// <summary>A connection ended: graceful, graceful-timeout (the initiator did not close in time), reset, by-initiator.</summary>
    void ConnectionClosed(string how);
}

/// <summary>Metrics sink that records nothing (tests, benchmarks).</summary>
public sealed class NullTargetMetrics : ITargetMetrics
{
    public static NullTargetMetrics Instance { get; } = new();
    public void CommandCompleted(CommandKind kind, long bytes, double seconds, bool failed) { }
    public void LoginAttempt(bool succeeded, string reason) { }
    public void SessionOpened() { }
    public void SessionClosed() { }
    public void ProtocolError(string kind) { }
    public void TaskManagement(string function) { }
    public void ConnectionClosed(string how) { }
}
