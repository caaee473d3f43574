using System.Diagnostics;

namespace ISCSISnap.Storage.Filters.BuiltIn;

/// <summary>
/// One traced IO. <see cref="LatencyMicroseconds"/> runs from the IO path taking the request to the request coming
/// back up through this filter (null when the IO path gave no timestamp). <see cref="Verdicts"/> lists what the
/// filters below this one decided ("checksum:transform qos:defer qos:pass"), in order.
/// </summary>
public readonly record struct TraceRecord(
    DateTimeOffset At, string Lun, string Initiator, IoOperation Operation, long Offset, int Length, double? LatencyMicroseconds, string Verdicts);

/// <summary>
/// Samples every <c>sampleEvery</c>-th IO into a bounded ring (the newest <c>capacity</c> records) for the console
/// to show. It never changes an IO: a sampled request passes on the way down (a transform verdict that leaves the
/// data alone) and is recorded on the way up, with its latency and the verdicts of the filters below. Put it on top
/// of the stack to see every filter's verdict. Threading: thread-safe.
/// </summary>
public sealed class TraceFilter : IIoFilter
{
    private readonly TraceRecord[] _ring;
    private long _seen, _written;
    private readonly object _lock = new();

    public TraceFilter(int sampleEvery = 1, int capacity = 4096)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(sampleEvery, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(capacity, 1 << 20);
        SampleEvery = sampleEvery;
        _ring = new TraceRecord[capacity];
    }

    public string Name => "trace";
    public int SampleEvery { get; }
    public int Capacity => _ring.Length;
    /// <summary>IOs seen, sampled or not.</summary>
    public long Seen => Interlocked.Read(ref _seen);

    /// <summary>The newest <paramref name="limit"/> records kept, oldest first.</summary>
    public IReadOnlyList<TraceRecord> Newest(int limit = int.MaxValue)
    {
        lock (_lock)
        {
            int count = (int)Math.Min(Math.Min(_written, _ring.Length), Math.Max(0, limit));
            var records = new TraceRecord[count];
            for (int i = 0; i < count; i++) records[i] = _ring[(_written - count + i) % _ring.Length];
            return records;
        }
    }

    /// <summary>Every record kept, oldest first.</summary>
    public IReadOnlyList<TraceRecord> Records => Newest();

    public ValueTask<FilterVerdict> OnReadAsync(Upcall upcall) => new(Trace(upcall));

    public ValueTask<FilterVerdict> OnWriteAsync(Upcall upcall) => new(Trace(upcall));

    private FilterVerdict Trace(Upcall upcall)
    {
        if (upcall.Phase == FilterPhase.Before) return Sampled() ? FilterVerdict.Transform : FilterVerdict.Pass;
        var request = upcall.Request;
        double? latency = request.Issued == 0 ? null : Stopwatch.GetElapsedTime(request.Issued).TotalMicroseconds;
        Record(new TraceRecord(DateTimeOffset.UtcNow, request.Lun, request.Initiator, request.Operation, request.Offset, request.Length, latency,
            VerdictsBelow(upcall.Verdicts)));
        return FilterVerdict.Pass;
    }

    /// <summary>The verdicts after this filter's own (which is always the first "trace:transform" of a sampled IO).</summary>
    private string VerdictsBelow(IReadOnlyList<(string Filter, VerdictKind Verdict)> verdicts)
    {
        int start = 0;
        for (int i = 0; i < verdicts.Count; i++)
            if (verdicts[i].Filter == Name) { start = i + 1; break; }
        if (start >= verdicts.Count) return "";
        var text = new System.Text.StringBuilder();
        for (int i = start; i < verdicts.Count; i++)
        {
            if (text.Length > 0) text.Append(' ');
            text.Append(verdicts[i].Filter).Append(':').Append(VerdictName(verdicts[i].Verdict));
        }
        return text.ToString();
    }

    private static string VerdictName(VerdictKind kind) => kind switch
    {
        VerdictKind.Pass => "pass",
        VerdictKind.Complete => "complete",
        VerdictKind.Fail => "fail",
        VerdictKind.Defer => "defer",
        _ => "transform",
    };

    private bool Sampled() => Interlocked.Increment(ref _seen) % SampleEvery == 0;

    private void Record(TraceRecord record)
    {
        lock (_lock) _ring[_written++ % _ring.Length] = record;
    }
}
