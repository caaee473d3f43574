namespace ISCSISnap.Storage.Buffers;

/// <summary>
/// A byte budget for I/O buffers held by commands in flight, so many initiators issuing large transfers
/// cannot grow memory without bound. Threading: lock-free, thread-safe.
/// </summary>
public sealed class MemoryBudget
{
    private long _available;

    public MemoryBudget(long bytes)
    {
        Capacity = bytes;
        _available = bytes;
    }

    public static MemoryBudget Shared { get; } = new(1L << 30);

    public long Capacity { get; }
    public long Available => Volatile.Read(ref _available);

    /// <summary>Takes <paramref name="bytes"/> if that many are available.</summary>
    public bool TryReserve(long bytes)
    {
        long current = Volatile.Read(ref _available);
        while (true)
        {
            if (current < bytes) return false;
            long seen = Interlocked.CompareExchange(ref _available, current - bytes, current);
            if (seen == current) return true;
            current = seen;
        }
    }

    public void Release(long bytes) => Interlocked.Add(ref _available, bytes);
}
