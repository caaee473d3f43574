using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using ISCSISnap.Target.Iscsi.Connections;
using ISCSISnap.Target.Iscsi.Login;
using ISCSISnap.Target.Iscsi.Pdus;
using ISCSISnap.Target.Iscsi.Sessions;
using ISCSISnap.Target.Scsi;
using Microsoft.Extensions.Logging;

namespace ISCSISnap.Target.Hosting;

/// <summary>A live session as the management API shows it.</summary>
public sealed record SessionInfo(
    ushort Tsih,
    string InitiatorName,
    string InitiatorPort,
    string? InitiatorAlias,
    string? TargetName,
    string Type,
    IReadOnlyList<string> Connections,
    DateTimeOffset Since,
    bool HeaderDigest,
    bool DataDigest,
    int MaxBurstLength,
    int CommandsInFlight);

/// <summary>
/// The iSCSI service: listens on the portal, runs connections, owns the session table, and carries out what
/// spans sessions (task management across nexuses, session reinstatement, resets, shutdown).
/// Threading: thread-safe.
/// </summary>
public sealed class IscsiPortal : IAsyncDisposable
{
    private readonly ILoggerFactory _loggers;
    private readonly ILogger _log;
    private readonly ConcurrentDictionary<long, (IscsiConnection Connection, Task Run)> _connections = new();
    private readonly CancellationTokenSource _stopping = new();
    private Socket? _listener;
    private Task? _acceptLoop;
    private Timer? _timer;
    private long _nextConnectionId;

    public IscsiPortal(IscsiPortalOptions options, TargetRegistry targets, ILoggerFactory loggers, ITargetMetrics? metrics = null)
    {
        var errors = options.Validate();
        if (errors.Count > 0) throw new ArgumentException("invalid iSCSI options: " + string.Join("; ", errors));
        Options = options;
        Targets = targets;
        Metrics = metrics ?? NullTargetMetrics.Instance;
        _loggers = loggers;
        _log = loggers.CreateLogger("ISCSISnap.Target.Portal");
        Sessions = new SessionManager(options.MaxSessions);
    }

    public IscsiPortalOptions Options { get; }
    public TargetRegistry Targets { get; }
    public ITargetMetrics Metrics { get; }
    internal SessionManager Sessions { get; }
    internal ChallengeReplayCache ChallengeReplays { get; } = new();
    internal ushort RelativeTargetPortId => 1;
    /// <summary>Connections whose socket is still held (in login, full feature, or waiting for the initiator to close).</summary>
    public int ConnectionCount => _connections.Count;
    /// <summary>Where the portal listens once started (the real port when 0 was asked for).</summary>
    public IPEndPoint? LocalEndPoint { get; private set; }

    internal string? TargetAlias(IscsiTarget target) => target.Alias;

    /// <summary>Binds the portal and starts accepting connections.</summary>
    public void Start()
    {
        var endPoint = Options.ParsePortal();
        var listener = new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            listener.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
            listener.Bind(endPoint);
            listener.Listen(512);
        }
        catch (SocketException e)
        {
            listener.Dispose();
            throw new InvalidOperationException($"cannot listen on iSCSI portal {Options.Portal}: {e.Message}", e);
        }
        _listener = listener;
        LocalEndPoint = (IPEndPoint)listener.LocalEndPoint!;
        _timer = new Timer(_ => OnTimer(), null, 1000, 1000);
        _acceptLoop = AcceptLoopAsync(listener);
        Log.PortalListening(_log, LocalEndPoint.ToString());
    }

    private async Task AcceptLoopAsync(Socket listener)
    {
        while (!_stopping.IsCancellationRequested)
        {
            Socket socket;
            try
            {
                socket = await listener.AcceptAsync(_stopping.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException) { break; }
            catch (ObjectDisposedException) { break; }
            catch (SocketException e)
            {
                Log.AcceptFailed(_log, e.Message);
                await Task.Delay(100).ConfigureAwait(false);
                continue;
            }
            int maxPdu = Bhs.Size + 1024 + 8 + Options.MaxRecvDataSegmentLength + 4;
            _ = Accept(new SocketTransport(socket, maxPdu));
        }
    }

    /// <summary>Runs an iSCSI connection over any transport (the in-memory one in tests); the task ends with the connection.</summary>
    public Task Accept(IIscsiTransport transport)
    {
        long id = Interlocked.Increment(ref _nextConnectionId);
        var connection = new IscsiConnection(this, transport, _loggers.CreateLogger("ISCSISnap.Target.Connection"), id);
        var run = Task.Run(connection.RunAsync);
        _connections[id] = (connection, run);
        Log.ConnectionAccepted(_log, connection.Remote);
        return run;
    }

    internal void OnConnectionEnded(IscsiConnection connection) => _connections.TryRemove(connection.Id, out _);

    private void OnTimer()
    {
        foreach (var (connection, _) in _connections.Values)
        {
            try { connection.OnTimer(); }
            catch (Exception e) { Log.TimerFailed(_log, e, connection.Remote); }
        }
    }

    public IReadOnlyList<SessionInfo> GetSessions() => Sessions.Sessions.Select(s => new SessionInfo(
        s.Tsih,
        s.InitiatorName,
        s.Nexus?.InitiatorPortName ?? $"{s.InitiatorName},i,0x{s.Isid:x12}",
        s.InitiatorAlias,
        s.Target?.Name,
        s.Type.ToString(),
        s.Connections.Select(c => c.Remote).ToList(),
        s.CreatedAt,
        s.Connections.FirstOrDefault()?.Parameters.HeaderDigest ?? false,
        s.Connections.FirstOrDefault()?.Parameters.DataDigest ?? false,
        s.Parameters.MaxBurstLength,
        s.ActiveTaskCount)).ToList();

    // ---------------------------------------------------------------- session lifetime

    internal async Task OnConnectionClosedAsync(IscsiConnection connection, IscsiSession session)
    {
        // Tasks still waiting for this connection's Data-Out will never get it.
        foreach (var task in session.ActiveTasks())
            if (task.Connection == connection && task.Phase == TaskPhase.ReceivingData && Interlocked.CompareExchange(ref task.Claim, 1, 0) != 2)
                session.ReleaseTask(task);
        if (session.RemoveConnection(connection)) await EndSessionAsync(session, "connection closed").ConfigureAwait(false);
    }

    /// <summary>The session is over (last connection gone, logout, reinstatement): the nexus is lost for every unit of its target.</summary>
    private Task EndSessionAsync(IscsiSession session, string reason)
    {
        if (!session.TryMarkEnded()) return Task.CompletedTask;
        Sessions.Remove(session);
        if (session.Nexus is { } nexus && session.Target is { } target)
            foreach (var unit in target.Luns.Values) unit.OnNexusLost(nexus);
        if (session.Type == SessionType.Normal || session.Type == SessionType.Discovery) Metrics.SessionClosed();
        Log.SessionEnded(_log, session.InitiatorName, session.Tsih, reason);
        return Task.CompletedTask;
    }

    /// <summary>Logout: lets the session's commands finish, then ends it, all before the Logout Response goes out.</summary>
    internal async Task QuiesceSessionAsync(IscsiSession session, IscsiConnection connection)
    {
        foreach (var task in session.ActiveTasks())
            if (task.Phase == TaskPhase.ReceivingData && Interlocked.CompareExchange(ref task.Claim, 1, 0) == 0)
                session.ReleaseTask(task);
        await WaitForTasksAsync(() => session.ActiveTasks().Any(t => t.Phase == TaskPhase.Executing), TimeSpan.FromSeconds(30)).ConfigureAwait(false);
        await EndSessionAsync(session, "logout").ConfigureAwait(false);
    }

    /// <summary>Session reinstatement: the old session's connections are dropped and its end is awaited.</summary>
    internal async Task TerminateSessionAsync(IscsiSession session, string reason)
    {
        foreach (var connection in session.Connections) connection.Drop(IscsiConnection.AsyncEventDropSession, reason);
        await WaitForTasksAsync(() => !session.Ended, TimeSpan.FromSeconds(10)).ConfigureAwait(false);
        await EndSessionAsync(session, reason).ConfigureAwait(false);
        await WaitForTasksAsync(() => session.ActiveTasks().Any(t => t.Phase == TaskPhase.Executing), TimeSpan.FromSeconds(30)).ConfigureAwait(false);
    }

    /// <summary>Every connection of <paramref name="target"/> is told (Async Message) and closed gracefully.</summary>
    internal void DropTargetConnections(IscsiTarget target, string reason)
    {
        foreach (var session in Sessions.Sessions.Where(s => s.Target == target))
            foreach (var connection in session.Connections)
                connection.Drop(IscsiConnection.AsyncEventDropSession, reason);
    }

    // ---------------------------------------------------------------- task management across sessions

    /// <summary>ABORT TASK: true when the task was aborted (its response will never be sent), false when it had already completed.</summary>
    internal async Task<bool> AbortTaskAsync(IscsiTask task)
    {
        int generation = task.Generation;
        if (Interlocked.CompareExchange(ref task.Claim, 1, 0) != 0) return false;
        task.Aborted = true;
        if (task.Phase == TaskPhase.ReceivingData)
        {
            task.Session.ReleaseTask(task);
            return true;
        }
        await WaitForTasksAsync(() => task.Generation == generation && task.Phase == TaskPhase.Executing, TimeSpan.FromSeconds(30)).ConfigureAwait(false);
        return true;
    }

    /// <summary>
    /// Aborts every task matching <paramref name="match"/> in every session and waits until none is executing.
    /// Tasks of other nexuses end silently and, with <paramref name="otherNexusesNotified"/>, their nexus gets
    /// COMMANDS CLEARED BY ANOTHER INITIATOR.
    /// </summary>
    internal async Task AbortTasksAsync(Func<IscsiTask, bool> match, bool otherNexusesNotified, IscsiSession? issuer = null)
    {
        var waiting = new List<(IscsiTask Task, int Generation)>();
        foreach (var session in Sessions.Sessions)
        {
            foreach (var task in session.ActiveTasks())
            {
                if (!match(task)) continue;
                int generation = task.Generation;
                if (Interlocked.CompareExchange(ref task.Claim, 1, 0) != 0) continue;
                task.Aborted = true;
                if (otherNexusesNotified && session != issuer && task.Unit is { } unit && session.Nexus is { } nexus)
                    unit.RaiseUnitAttention(nexus.Key, SenseCode.CommandsClearedByAnotherInitiator);
                if (task.Phase == TaskPhase.ReceivingData)
                {
                    // Only the owning connection's receive loop touches a task waiting for data; it releases it
                    // when more data comes or the connection ends. Tasks of this connection are released here.
                    continue;
                }
                waiting.Add((task, generation));
            }
        }
        await WaitForTasksAsync(() => waiting.Any(w => w.Task.Generation == w.Generation && w.Task.Phase == TaskPhase.Executing),
            TimeSpan.FromSeconds(30)).ConfigureAwait(false);
    }

    private static async Task WaitForTasksAsync(Func<bool> busy, TimeSpan limit)
    {
        var deadline = DateTime.UtcNow + limit;
        while (busy() && DateTime.UtcNow < deadline)
            await Task.Delay(2).ConfigureAwait(false);
    }

    /// <summary>PREEMPT AND ABORT: ends the tasks of the preempted nexuses on <paramref name="unit"/>.</summary>
    public Task AbortTasksOfNexusesAsync(LogicalUnit unit, IReadOnlyCollection<string> nexusKeys) =>
        AbortTasksAsync(t => t.Unit == unit && t.Session.Nexus is { } n && nexusKeys.Contains(n.Key), otherNexusesNotified: false);

    /// <summary>
    /// A unit leaves its target: commands waiting for its Data-Out are aborted, running ones are waited for
    /// (up to 30 s), so its device can close under nobody.
    /// </summary>
    public async Task DrainUnitAsync(LogicalUnit unit)
    {
        foreach (var session in Sessions.Sessions)
            foreach (var task in session.ActiveTasks())
                if (task.Unit == unit && task.Phase == TaskPhase.ReceivingData && Interlocked.CompareExchange(ref task.Claim, 1, 0) == 0)
                    task.Aborted = true;
        await WaitForTasksAsync(() => Sessions.Sessions.Any(s => s.ActiveTasks().Any(t => t.Unit == unit && t.Phase == TaskPhase.Executing)),
            TimeSpan.FromSeconds(30)).ConfigureAwait(false);
    }

    /// <summary>After a unit grows: every nexus learns through CAPACITY DATA HAS CHANGED.</summary>
    public void NotifyCapacityChanged(LogicalUnit unit) => unit.RaiseUnitAttentionForAll(SenseCode.CapacityDataChanged);

    // ---------------------------------------------------------------- shutdown

    /// <summary>
    /// Stops accepting, asks initiators to log out (Async Message "logout requested"), waits up to
    /// <paramref name="drain"/> for them, then drops what is left. Commands in flight finish or are discarded
    /// unanswered; nothing acknowledged is lost because devices are flushed by their owner afterwards.
    /// </summary>
    public async Task StopAsync(TimeSpan drain)
    {
        if (_stopping.IsCancellationRequested) return;
        _stopping.Cancel();
        _listener?.Dispose();
        if (_acceptLoop is not null) await _acceptLoop.ConfigureAwait(false);
        if (_timer is not null) await _timer.DisposeAsync().ConfigureAwait(false);

        foreach (var (connection, _) in _connections.Values)
            connection.RequestLogout((int)Math.Ceiling(drain.TotalSeconds));
        var deadline = DateTime.UtcNow + drain;
        while (!_connections.IsEmpty && DateTime.UtcNow < deadline)
            await Task.Delay(20).ConfigureAwait(false);

        // Those still here are told and closed gracefully; whoever does not close its side in time is reset.
        foreach (var (connection, _) in _connections.Values) connection.Drop(IscsiConnection.AsyncEventDropSession, "the portal is stopping");
        var runs = _connections.Values.Select(c => c.Run).ToArray();
        await Task.WhenAny(Task.WhenAll(runs), Task.Delay(Options.CloseWaitMilliseconds)).ConfigureAwait(false);
        foreach (var (connection, _) in _connections.Values) connection.Abort();
        await Task.WhenAny(Task.WhenAll(runs), Task.Delay(TimeSpan.FromSeconds(10))).ConfigureAwait(false);
        // Commands still executing finish on their own; give them a moment before storage is closed.
        await WaitForTasksAsync(() => Sessions.Sessions.Any(s => s.ActiveTaskCount > 0), TimeSpan.FromSeconds(10)).ConfigureAwait(false);
        Log.PortalStopped(_log);
    }

    public async ValueTask DisposeAsync()
    {
        await StopAsync(TimeSpan.Zero).ConfigureAwait(false);
        _stopping.Dispose();
    }
}
