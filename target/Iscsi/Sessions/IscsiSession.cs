using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Iscsi.Connections;
using ISCSISnap.Target.Scsi;

namespace ISCSISnap.Target.Iscsi.Sessions;

public enum SessionType : byte
{
    Normal,
    Discovery,
}

/// <summary>
/// An iSCSI session: its identity (initiator name, ISID, TSIH), the negotiated parameters, the CmdSN window and
/// the pool of command slots. Threading: the CmdSN state is advanced by the receiving connection under
/// <see cref="_sequenceLock"/>; slot release may come from any sender thread.
/// </summary>
internal sealed class IscsiSession
{
    private readonly object _sequenceLock = new();
    private readonly object _taskLock = new();
    private readonly IscsiTask[] _slots;
    private readonly Stack<IscsiTask> _free;
    private readonly Dictionary<uint, IscsiTask> _byItt;
    private readonly List<IscsiConnection> _connections = new();
    private uint _expCmdSN;
    private uint _maxCmdSN;
    private int _immediateInFlight;
    private readonly int _immediateSlots;

    public IscsiSession(ushort tsih, string initiatorName, ulong isid, SessionType type, IscsiTarget? target,
        NegotiatedParameters parameters, uint initialCmdSN, int queueDepth, ItNexus? nexus)
    {
        Tsih = tsih;
        InitiatorName = initiatorName;
        Isid = isid;
        Type = type;
        Target = target;
        Parameters = parameters;
        Nexus = nexus;
        QueueDepth = queueDepth;
        _immediateSlots = Math.Max(4, queueDepth / 8);
        int total = queueDepth + _immediateSlots;
        _slots = new IscsiTask[total];
        _free = new Stack<IscsiTask>(total);
        _byItt = new Dictionary<uint, IscsiTask>(total);
        for (int i = total - 1; i >= 0; i--)
        {
            _slots[i] = new IscsiTask(this, i);
            _free.Push(_slots[i]);
        }
        _expCmdSN = initialCmdSN;
        _maxCmdSN = initialCmdSN + (uint)queueDepth - 1;
        CreatedAt = DateTimeOffset.UtcNow;
    }

    /// <summary>At most this share of the appliance-wide I/O memory budget goes to one session's buffers.</summary>
    public const long BufferBudgetBytes = 256L << 20;

    /// <summary>This session's share of I/O buffer memory (commands in flight hold their transfer buffers).</summary>
    public Storage.Buffers.MemoryBudget Buffers { get; } = new(BufferBudgetBytes);

    public ushort Tsih { get; }
    public string InitiatorName { get; }
    public ulong Isid { get; }
    public SessionType Type { get; }
    public IscsiTarget? Target { get; }
    public NegotiatedParameters Parameters { get; }
    public ItNexus? Nexus { get; }
    public int QueueDepth { get; }
    public DateTimeOffset CreatedAt { get; }
    public string? InitiatorAlias { get; set; }
    public bool Closed { get; private set; }

    public uint ExpCmdSN => Volatile.Read(ref _expCmdSN);
    public uint MaxCmdSN => Volatile.Read(ref _maxCmdSN);

    /// <summary>Writes ExpCmdSN and MaxCmdSN at offsets 28 and 32. Lock-free: MaxCmdSN only grows, so reading ExpCmdSN first keeps MaxCmdSN &gt;= ExpCmdSN - 1.</summary>
    public void StampWindow(Span<byte> header)
    {
        uint exp = Volatile.Read(ref _expCmdSN);
        uint max = Volatile.Read(ref _maxCmdSN);
        Pdus.HeaderWriter.U32(header, 28, exp);
        Pdus.HeaderWriter.U32(header, 32, max);
    }

    public IReadOnlyList<IscsiConnection> Connections
    {
        get { lock (_connections) return _connections.ToArray(); }
    }

    public void AddConnection(IscsiConnection connection)
    {
        lock (_connections) _connections.Add(connection);
    }

    /// <summary>Removes a connection; returns true when it was the last one (the session is over).</summary>
    public bool RemoveConnection(IscsiConnection connection)
    {
        lock (_connections)
        {
            _connections.Remove(connection);
            if (_connections.Count == 0) Closed = true;
            return _connections.Count == 0;
        }
    }

    public enum Admission
    {
        Accept,
        /// <summary>Outside the window or a duplicate: silently ignore (RFC 7143 §4.2.2.1).</summary>
        Ignore,
    }

    /// <summary>
    /// Checks a command's CmdSN. A non-immediate command must carry ExpCmdSN (TCP keeps one connection's
    /// commands in order); it then advances the window. Immediate commands do not advance it.
    /// </summary>
    public Admission Admit(uint cmdSN, bool immediate)
    {
        lock (_sequenceLock)
        {
            if (immediate) return Admission.Accept;
            if (cmdSN != _expCmdSN) return Admission.Ignore;
            if ((int)(Volatile.Read(ref _maxCmdSN) - cmdSN) < 0) return Admission.Ignore;
            Volatile.Write(ref _expCmdSN, cmdSN + 1);
            return Admission.Accept;
        }
    }

    /// <summary>Opens the window by one: a non-immediate command finished (or needed no slot).</summary>
    public void AdvanceWindow() => Interlocked.Increment(ref _maxCmdSN);

    /// <summary>Takes a free slot for ITT <paramref name="itt"/>; null with a reason when it cannot.</summary>
    public IscsiTask? AllocateTask(uint itt, bool immediate, out RejectCause cause)
    {
        lock (_taskLock)
        {
            if (_byItt.ContainsKey(itt))
            {
                cause = RejectCause.TaskInProgress;
                return null;
            }
            if (immediate && _immediateInFlight >= _immediateSlots)
            {
                cause = RejectCause.ImmediateLimit;
                return null;
            }
            if (!_free.TryPop(out var task))
            {
                cause = RejectCause.OutOfResources;
                return null;
            }
            task.ResetForCommand();
            task.Command.SessionBudget = Buffers;
            task.Itt = itt;
            task.Immediate = immediate;
            if (immediate) _immediateInFlight++;
            _byItt.Add(itt, task);
            cause = RejectCause.None;
            return task;
        }
    }

    public IscsiTask? FindTask(uint itt)
    {
        lock (_taskLock) return _byItt.GetValueOrDefault(itt);
    }

    /// <summary>Returns a slot to the pool; a non-immediate command also opens the CmdSN window by one.</summary>
    public void ReleaseTask(IscsiTask task)
    {
        bool immediate;
        lock (_taskLock)
        {
            if (task.Phase == TaskPhase.Free) return;
            task.Phase = TaskPhase.Free;
            _byItt.Remove(task.Itt);
            immediate = task.Immediate;
            if (immediate) _immediateInFlight--;
        }
        // Gates and buffers go back before the slot can be reused.
        task.Unit?.Release(task.Command);
        task.Command.ReleaseBuffer();
        lock (_taskLock) _free.Push(task);
        if (!immediate) AdvanceWindow();
    }

    /// <summary>A snapshot of the tasks in use (task management walks it).</summary>
    public List<IscsiTask> ActiveTasks()
    {
        lock (_taskLock) return _byItt.Values.ToList();
    }

    public int ActiveTaskCount
    {
        get { lock (_taskLock) return _byItt.Count; }
    }

    public void MarkClosed() => Closed = true;

    private int _ended;
    public bool Ended => Volatile.Read(ref _ended) != 0;

    /// <summary>True for the one caller that gets to run the end-of-session cleanup.</summary>
    public bool TryMarkEnded()
    {
        Closed = true;
        return Interlocked.Exchange(ref _ended, 1) == 0;
    }
}

internal enum RejectCause
{
    None,
    TaskInProgress,
    ImmediateLimit,
    OutOfResources,
}
