namespace ISCSISnap.Storage.Filters;

/// <summary>A filter in a LUN's stack with its options and counters. Threading: counters are updated concurrently.</summary>
public sealed class FilterSlot
{
    private long _upcalls, _faults;
    private readonly long[] _verdicts = new long[5];
    /// <summary>Every syscall by name; counts are kept in an array by this order (no dictionary on the IO path).</summary>
    internal static readonly string[] SyscallNames =
        ["read_below", "write_below", "flush_below", "resolve_owner", "read_layer", "allocate", "free", "replace_write_data", "sleep", "log", "count",
         "cache_get", "cache_put", "cache_invalidate"];
    private readonly long[] _syscalls = new long[SyscallNames.Length];
    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, long> _counters = new();
    private volatile bool _quarantined;

    public FilterSlot(IIoFilter filter, FilterOptions? options = null)
    {
        Filter = filter;
        Options = options ?? new FilterOptions();
    }

    public IIoFilter Filter { get; }
    internal IUpcallMeter? Meter { get; init; }
    public FilterOptions Options { get; }
    public string Name => Filter.Name;
    public bool IsQuarantined => _quarantined;
    public long Upcalls => Interlocked.Read(ref _upcalls);
    public long Faults => Interlocked.Read(ref _faults);
    public long VerdictCount(VerdictKind kind) => Interlocked.Read(ref _verdicts[(int)kind]);
    public long SyscallCount(string syscall) => Array.IndexOf(SyscallNames, syscall) is >= 0 and var i ? Interlocked.Read(ref _syscalls[i]) : 0;

    /// <summary>Syscalls made so far, by name (those made at least once).</summary>
    public IReadOnlyDictionary<string, long> Syscalls =>
        SyscallNames.Select((name, i) => (name, count: Interlocked.Read(ref _syscalls[i]))).Where(p => p.count > 0).ToDictionary(p => p.name, p => p.count);
    /// <summary>Counters the filter itself keeps through the Count syscall.</summary>
    public IReadOnlyDictionary<string, long> Counters => _counters;

    internal void Record(VerdictKind verdict)
    {
        Interlocked.Increment(ref _upcalls);
        Interlocked.Increment(ref _verdicts[(int)verdict]);
    }

    internal void CountSyscall(string name)
    {
        int index = Array.IndexOf(SyscallNames, name);   // names are literals: found by reference at once
        if (index < 0) throw new ArgumentException($"unknown syscall {name}", nameof(name));
        Interlocked.Increment(ref _syscalls[index]);
    }
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
