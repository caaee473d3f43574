using System.Collections.Concurrent;
using System.Diagnostics;
using System.Runtime.CompilerServices;
using ISCSISnap.Storage.BlockDevices;

namespace ISCSISnap.Storage.Filters.BuiltIn;

/// <summary>Caps for <see cref="QosFilter"/>; 0 means unlimited.</summary>
public sealed record QosLimits
{
    public int IopsPerLun { get; init; }
    public long BytesPerSecondPerLun { get; init; }
    public int IopsPerInitiator { get; init; }
    public long BytesPerSecondPerInitiator { get; init; }
    /// <summary>How much unused allowance may pile up, as a fraction of a second of the cap (a burst).</summary>
    public double BurstSeconds { get; init; } = 0.1;

    public bool IsUnlimited => IopsPerLun == 0 && BytesPerSecondPerLun == 0 && IopsPerInitiator == 0 && BytesPerSecondPerInitiator == 0;
    internal bool LimitsInitiators => IopsPerInitiator > 0 || BytesPerSecondPerInitiator > 0;
}

/// <summary>
/// Limits IOPS and bandwidth per LUN and per initiator with token buckets. A request over a cap reserves its tokens
/// at once (the bucket goes into debt) and is deferred until the debt ahead of it and its own are paid, so waiting
/// requests are served one after another at the cap's pace instead of all retrying together, and the long-run
/// rate is the cap however late the engine's retries come. Belongs at the top of a stack (position 0): filters
/// above it that read below would be counted twice. Limits can change while IO runs. Threading: thread-safe.
/// </summary>
public sealed class QosFilter : IIoFilter
{
    /// <summary>Longest single deferral: a request waiting longer retries this often, so new limits apply soon.</summary>
    private const int MaxDeferMilliseconds = 100;

    private QosLimits _limits;
    private readonly Bucket _lunOps = new(), _lunBytes = new();
    private readonly ConcurrentDictionary<string, InitiatorBuckets> _initiators = new();
    // Deferred requests' reservations, by upcall (the engine calls the filter again with the same one).
    private readonly ConditionalWeakTable<Upcall, Reservation> _reservations = new();

    public QosFilter(QosLimits limits)
    {
        Validate(limits);
        _limits = limits;
    }

    public string Name => "qos";

    /// <summary>The caps in force; setting them applies to requests from now on and to those already deferred.</summary>
    public QosLimits Limits
    {
        get => Volatile.Read(ref _limits);
        set => SetLimits(value);
    }

    public void SetLimits(QosLimits limits)
    {
        Validate(limits);
        Volatile.Write(ref _limits, limits);
    }

    private static void Validate(QosLimits limits)
    {
        ArgumentNullException.ThrowIfNull(limits);
        ArgumentOutOfRangeException.ThrowIfNegative(limits.IopsPerLun);
        ArgumentOutOfRangeException.ThrowIfNegative(limits.BytesPerSecondPerLun);
        ArgumentOutOfRangeException.ThrowIfNegative(limits.IopsPerInitiator);
        ArgumentOutOfRangeException.ThrowIfNegative(limits.BytesPerSecondPerInitiator);
        if (!(limits.BurstSeconds is > 0 and <= 60)) throw new ArgumentOutOfRangeException(nameof(limits), "BurstSeconds is over 0 and at most 60");
    }

    public ValueTask<FilterVerdict> OnReadAsync(Upcall upcall) => new(Admit(upcall));
    public ValueTask<FilterVerdict> OnWriteAsync(Upcall upcall) => new(Admit(upcall));

    private FilterVerdict Admit(Upcall upcall)
    {
        var limits = Volatile.Read(ref _limits);
        if (limits.IsUnlimited) return FilterVerdict.Pass;   // no lock, no allocation: the common case

        if (_reservations.TryGetValue(upcall, out var reservation))
        {
            long now = Stopwatch.GetTimestamp();
            if (ReferenceEquals(reservation.Limits, limits) && now < reservation.Due) return Defer(reservation.Due - now);
            _reservations.Remove(upcall);
            // Its turn came (its tokens are taken): go. Otherwise the limits changed, whose buckets forgave the
            // debt, or it held no tokens: reserve again.
            if (now >= reservation.Due && reservation.HoldsTokens) return FilterVerdict.Pass;
        }
        return Reserve(upcall, limits);
    }

    private FilterVerdict Reserve(Upcall upcall, QosLimits limits)
    {
        var request = upcall.Request;
        double burst = limits.BurstSeconds;
        long due = Math.Max(_lunOps.Take(1, limits.IopsPerLun, burst, limits), _lunBytes.Take(request.Length, limits.BytesPerSecondPerLun, burst, limits));
        InitiatorBuckets? initiator = null;
        if (limits.LimitsInitiators)
        {
            initiator = _initiators.GetOrAdd(request.Initiator, static _ => new InitiatorBuckets());
            due = Math.Max(due, Math.Max(
                initiator.Ops.Take(1, limits.IopsPerInitiator, burst, limits),
                initiator.Bytes.Take(request.Length, limits.BytesPerSecondPerInitiator, burst, limits)));
        }
        long now = Stopwatch.GetTimestamp();
        if (due <= now) return FilterVerdict.Pass;

        double wait = (double)(due - now) / Stopwatch.Frequency;
        if (wait > (request.Deadline - DateTimeOffset.UtcNow).TotalSeconds)
        {
            // It would fail at its deadline anyway: give the tokens back, or every request queued behind it would
            // wait for an IO that never happens and the rate would sink below the cap. The engine fails it then.
            _lunOps.Refund(1, limits);
            _lunBytes.Refund(request.Length, limits);
            initiator?.Ops.Refund(1, limits);
            initiator?.Bytes.Refund(request.Length, limits);
            _reservations.AddOrUpdate(upcall, new Reservation(due, limits, HoldsTokens: false));
            upcall.Syscalls.Count("past_deadline");
            return Defer(due - now);
        }
        _reservations.AddOrUpdate(upcall, new Reservation(due, limits, HoldsTokens: true));
        upcall.Syscalls.Count("deferred");
        upcall.Syscalls.Count("deferred_ms", (long)Math.Ceiling(wait * 1000));
        return Defer(due - now);
    }

    private static FilterVerdict Defer(long ticks) =>
        FilterVerdict.Defer((int)Math.Clamp(Math.Ceiling(ticks * 1000.0 / Stopwatch.Frequency), 1, MaxDeferMilliseconds));

    /// <summary>A deferred request's turn: when it may go, under which limits, and whether it took its tokens.</summary>
    private sealed record Reservation(long Due, QosLimits Limits, bool HoldsTokens);

    private sealed class InitiatorBuckets
    {
        public readonly Bucket Ops = new(), Bytes = new();
    }

    /// <summary>
    /// A token bucket refilled continuously at its rate, holding at most a burst; takes go into debt. It is
    /// configured from the limits each take passes: new limits forgive the debt (the requests that ran it up
    /// reserve again under them) and a cap newly set starts with a full burst.
    /// </summary>
    private sealed class Bucket
    {
        private readonly object _lock = new();
        private QosLimits? _configuredFrom;
        private double _rate, _capacity, _tokens;
        private long _stamp;

        /// <summary>Takes <paramref name="amount"/> tokens; returns when (a stopwatch timestamp) the debt is paid, 0 when there is none or no cap.</summary>
        public long Take(double amount, double rate, double burstSeconds, QosLimits limits)
        {
            if (rate <= 0) return 0;
            lock (_lock)
            {
                long now = Refill(rate, burstSeconds, limits);
                _tokens -= amount;
                return _tokens >= 0 ? 0 : now + (long)Math.Ceiling(-_tokens / _rate * Stopwatch.Frequency);
            }
        }

        /// <summary>Gives back tokens taken by a request that will not run (under the same limits only).</summary>
        public void Refund(double amount, QosLimits limits)
        {
            lock (_lock)
            {
                if (ReferenceEquals(_configuredFrom, limits)) _tokens = Math.Min(_capacity, _tokens + amount);
            }
        }

        private long Refill(double rate, double burstSeconds, QosLimits limits)
        {
            long now = Stopwatch.GetTimestamp();
            if (_rate > 0) _tokens = Math.Min(_capacity, _tokens + (double)(now - _stamp) / Stopwatch.Frequency * _rate);
            _stamp = now;
            if (!ReferenceEquals(_configuredFrom, limits))
            {
                bool fresh = _rate <= 0 || _configuredFrom is null;
                _configuredFrom = limits;
                _rate = rate;
                // A burst of at least one: an idle LUN's first IO goes at once even under a cap below one per burst.
                _capacity = Math.Max(1, rate * burstSeconds);
                _tokens = fresh ? _capacity : Math.Clamp(_tokens, 0, _capacity);
            }
            return now;
        }
    }
}
