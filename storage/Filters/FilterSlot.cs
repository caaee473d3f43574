namespace ISCSISnap.Storage.Filters;

/// <summary>A filter in a LUN's stack with its options and counters. Threading: counters are updated concurrently.</summary>
public sealed class FilterSlot
{
    private long _upcalls, _faults;
    private readonly long[] _verdicts = new long[5];
    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, long> _syscalls = new();
    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, long> _counters = new();
    private volatile bool _quarantined;

    public FilterSlot(IIoFilter filter, FilterOptions? options = null)
    {
        Filter = filter;
        Options = options ?? new FilterOptions();
    }

    public IIoFilter Filter { get; }
    public FilterOptions Options { get; }
    public string Name => Filter.Name;
    public bool IsQuarantined => _quarantined;
    public long Upcalls => Interlocked.Read(ref _upcalls);
    public long Faults => Interlocked.Read(ref _faults);
    public long VerdictCount(VerdictKind kind) => Interlocked.Read(ref _verdicts[(int)kind]);
    public long SyscallCount(string syscall) => _syscalls.GetValueOrDefault(syscall);
    /// <summary>Counters the filter itself keeps through the Count syscall.</summary>
    public IReadOnlyDictionary<string, long> Counters => _counters;

    internal void Record(VerdictKind verdict)
    {
        Interlocked.Increment(ref _upcalls);
        Interlocked.Increment(ref _verdicts[(int)verdict]);
    }

    internal void CountSyscall(string name) => _syscalls.AddOrUpdate(name, 1, (_, n) => n + 1);
    internal void Count(string name, long by) => _counters.AddOrUpdate(name, by, (_, n) => n + by);

    /// <summary>Counts a fault; returns true when this fault put the filter in quarantine.</summary>
    internal bool Fault()
    {
        Interlocked.Increment(ref _upcalls);
        long faults = Interlocked.Increment(ref _faults);
        if (_quarantined || faults < Options.QuarantineAfterFaults) return false;
        _quarantined = true;
        return true;
    }

    /// <summary>Lets a quarantined filter run again (an operator's decision).</summary>
    public void Release() => _quarantined = false;
}
