using ISCSISnap.Storage.Filters;
using Prometheus;

namespace ISCSISnap.Web.Observability;

/// <summary>
/// Filter engine observations: per LUN and filter, upcalls by verdict, faults, quarantines and upcall latency on
/// /metrics; faults and filter log lines as structured log events. Threading: thread-safe.
/// </summary>
public sealed class FilterMetrics : IFilterObserver
{
    private readonly Counter _upcalls;
    private readonly Counter _faults;
    private readonly Counter _quarantines;
    private readonly Histogram _latency;
    private readonly ILogger<FilterMetrics> _log;

    public FilterMetrics(IMetricFactory factory, ILogger<FilterMetrics> log)
    {
        _log = log;
        _upcalls = factory.CreateCounter("iscsisnap_filter_upcalls_total", "Filter upcalls, by LUN, filter and verdict.", ["lun", "filter", "verdict"]);
        _faults = factory.CreateCounter("iscsisnap_filter_faults_total", "Filter faults (threw, overran its deadline, broke a budget or a syscall rule).", ["lun", "filter"]);
        _quarantines = factory.CreateCounter("iscsisnap_filter_quarantines_total", "Filters put in quarantine after repeated faults.", ["lun", "filter"]);
        _latency = factory.CreateHistogram("iscsisnap_filter_upcall_duration_seconds", "Time an upcall took, syscalls included.",
            new HistogramConfiguration { LabelNames = ["lun", "filter"], Buckets = Histogram.ExponentialBuckets(0.000001, 2, 24) });
    }

    public IUpcallMeter MeterFor(string lun, string filter) => new Meter(
        Enum.GetValues<VerdictKind>().Select(v => _upcalls.WithLabels(lun, filter, v.ToString().ToLowerInvariant())).ToArray(),
        _latency.WithLabels(lun, filter));

    /// <summary>The label children of one filter on one LUN, looked up once.</summary>
    private sealed class Meter(Counter.Child[] byVerdict, Histogram.Child latency) : IUpcallMeter
    {
        public void OnUpcall(VerdictKind verdict, double seconds)
        {
            byVerdict[(int)verdict].Inc();
            latency.Observe(seconds);
        }
    }

    public void OnFault(string lun, string filter, string reason, bool quarantined)
    {
        _faults.WithLabels(lun, filter).Inc();
        if (quarantined) _quarantines.WithLabels(lun, filter).Inc();
        Log.FilterFault(_log, lun, filter, reason, quarantined);
    }

    public void OnFilterLog(string lun, string filter, string message) => Log.FilterMessage(_log, lun, filter, message);
}
