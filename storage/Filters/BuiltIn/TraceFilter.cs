using System.Diagnostics;

namespace ISCSISnap.Storage.Filters.BuiltIn;

/// <summary>One traced IO. <see cref="LatencyMicroseconds"/> is from the IO path taking the request to the data
/// coming back up through this filter (reads; null for writes, which this filter sees only on the way down).</summary>
public readonly record struct TraceRecord(
    DateTimeOffset At, string Lun, string Initiator, IoOperation Operation, long Offset, int Length, double? LatencyMicroseconds);

/// <summary>
/// Samples every <c>sampleEvery</c>-th IO into a bounded ring (the newest <c>capacity</c> records) for the console
/// to show. It never changes an IO: reads pass on the way down and are recorded on the way up. Threading: thread-safe.
/// </summary>
public sealed class TraceFilter : IIoFilter
{
    private readonly TraceRecord[] _ring;
    private readonly int _sampleEvery;
    private long _seen, _written;
    private readonly object _lock = new();

    public TraceFilter(int sampleEvery = 1, int capacity = 4096)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(sampleEvery, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(capacity, 1 << 20);
        _sampleEvery = sampleEvery;
        _ring = new TraceRecord[capacity];
    }

    public string Name => "trace";

    /// <summary>The records kept, oldest first.</summary>
    public IReadOnlyList<TraceRecord> Records
    {
        get
        {
            lock (_lock)
            {
                int count = (int)Math.Min(_written, _ring.Length);
                var records = new TraceRecord[count];
                for (int i = 0; i < count; i++) records[i] = _ring[(_written - count + i) % _ring.Length];
                return records;
            }
        }
    }

    public ValueTask<FilterVerdict> OnReadAsync(Upcall upcall)
    {
        if (upcall.Phase == FilterPhase.Before) return new(Sampled() ? FilterVerdict.Transform : FilterVerdict.Pass);
        var request = upcall.Request;
        double? latency = request.Issued == 0 ? null : Stopwatch.GetElapsedTime(request.Issued).TotalMicroseconds;
        Record(new TraceRecord(DateTimeOffset.UtcNow, request.Lun, request.Initiator, request.Operation, request.Offset, request.Length, latency));
        return new(FilterVerdict.Pass);
    }

    public ValueTask<FilterVerdict> OnWriteAsync(Upcall upcall)
    {
        if (Sampled())
        {
            var request = upcall.Request;
            Record(new TraceRecord(DateTimeOffset.UtcNow, request.Lun, request.Initiator, request.Operation, request.Offset, request.Length, null));
        }
        return new(FilterVerdict.Pass);
    }

    private bool Sampled() => Interlocked.Increment(ref _seen) % _sampleEvery == 0;

    private void Record(TraceRecord record)
    {
        lock (_lock) _ring[_written++ % _ring.Length] = record;
    }
}
