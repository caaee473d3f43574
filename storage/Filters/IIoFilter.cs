using ISCSISnap.Storage.BlockDevices;

namespace ISCSISnap.Storage.Filters;

/// <summary>What the engine does with a request when its filter faults (throws, overruns, exceeds a budget) or is quarantined.</summary>
public enum FailurePolicy : byte
{
    /// <summary>The request goes on as if the filter had passed it.</summary>
    Bypass,
    /// <summary>The request fails with <see cref="FilterOptions.FailureStatus"/>.</summary>
    Fail,
}

/// <summary>Limits and behaviour of one filter on one LUN, fixed when it is added.</summary>
public sealed record FilterOptions
{
    public FailurePolicy OnFault { get; init; } = FailurePolicy.Bypass;
    public IoStatus FailureStatus { get; init; } = IoStatus.ReadError;
    /// <summary>Longest an upcall may run (syscalls included) before it counts as a fault.</summary>
    public TimeSpan UpcallDeadline { get; init; } = TimeSpan.FromSeconds(5);
    /// <summary>Syscalls one upcall may make.</summary>
    public int MaxSyscallsPerUpcall { get; init; } = 1024;
    /// <summary>Scratch bytes (syscall buffers) one upcall may hold at once.</summary>
    public int MaxScratchBytes { get; init; } = 4 << 20;
    /// <summary>Faults after which the filter is quarantined (skipped by its failure policy).</summary>
    public int QuarantineAfterFaults { get; init; } = 5;
    public FilterRights Rights { get; init; } = FilterRights.All;
}

/// <summary>
/// A filter function: called by upcall for each request passing its place in a LUN's stack. It touches the system
/// only through <see cref="Upcall.Syscalls"/>. Threading: called concurrently for different requests.
/// </summary>
public interface IIoFilter
{
    /// <summary>A short stable name (metrics label, logs, API).</summary>
    string Name { get; }

    ValueTask<FilterVerdict> OnReadAsync(Upcall upcall);

    ValueTask<FilterVerdict> OnWriteAsync(Upcall upcall);
}

/// <summary>
/// Optional for a filter: told when a range of the LUN changes by a command whose data does not pass through the
/// stack (UNMAP, WRITE SAME, EXTENDED COPY, COMPARE AND WRITE, ...), before the change (which waits for it: the
/// filter may make its own state durable first) and again once it is done, so state the filter keeps about those
/// blocks (checksums, cached data) can be dropped. Called on the command's flow, not by upcall: it must only touch
/// the filter's own state, and every OnRangeChangingAsync is followed by one OnRangeChanged.
/// </summary>
public interface IRangeChangeListener
{
    ValueTask OnRangeChangingAsync(long offset, long length);
    void OnRangeChanged(long offset, long length);
}
