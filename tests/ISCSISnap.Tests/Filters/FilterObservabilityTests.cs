using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Filters;
using ISCSISnap.Tests.Support;
using ISCSISnap.Web.Observability;
using Microsoft.Extensions.Logging.Abstractions;
using Prometheus;
using Xunit;

namespace ISCSISnap.Tests.Filters;

/// <summary>What the engine reports reaches /metrics: upcalls by verdict, faults, quarantines and latency per LUN and filter.</summary>
public sealed class FilterObservabilityTests
{
    private sealed class Flaky : IIoFilter
    {
        private int _calls;
        public string Name => "flaky";
        public ValueTask<FilterVerdict> OnReadAsync(Upcall upcall) =>
            Interlocked.Increment(ref _calls) % 2 == 0 ? throw new InvalidOperationException("every other call") : ValueTask.FromResult(FilterVerdict.Pass);
        public ValueTask<FilterVerdict> OnWriteAsync(Upcall upcall) => ValueTask.FromResult(FilterVerdict.Pass);
    }

    [Fact]
    public async Task Upcalls_faults_and_quarantines_are_counted_per_lun_and_filter()
    {
        using var directory = new TempDirectory();
        string path = Path.Combine(directory.Path, "disk.img");
        File.WriteAllBytes(path, new byte[1 << 20]);
        await using var device = FileBlockDevice.Open(path);
        var registry = Metrics.NewCustomRegistry();
        var metrics = new FilterMetrics(Metrics.WithCustomRegistry(registry), NullLogger<FilterMetrics>.Instance);
        var engine = new FilterEngine(device, "iqn.test:t/0", observer: metrics);
        engine.Add(new Flaky(), new FilterOptions { QuarantineAfterFaults = 2 });
        for (int i = 0; i < 6; i++)
            Assert.Equal(IoStatus.Ok, await engine.ReadAsync(new RequestContext("iqn.test:t/0", "i", "n", IoOperation.Read, 0, 4096, DateTimeOffset.MaxValue), new byte[4096]));

        using var stream = new MemoryStream();
        await registry.CollectAndExportAsTextAsync(stream);
        string text = System.Text.Encoding.UTF8.GetString(stream.ToArray());
        Assert.Contains("iscsisnap_filter_upcalls_total{lun=\"iqn.test:t/0\",filter=\"flaky\",verdict=\"pass\"} 2", text);
        Assert.Contains("iscsisnap_filter_faults_total{lun=\"iqn.test:t/0\",filter=\"flaky\"} 2", text);
        Assert.Contains("iscsisnap_filter_quarantines_total{lun=\"iqn.test:t/0\",filter=\"flaky\"} 1", text);
        Assert.Contains("iscsisnap_filter_upcall_duration_seconds_count{lun=\"iqn.test:t/0\",filter=\"flaky\"} 2", text);
        Assert.True(engine.Filters[0].IsQuarantined);
    }
}
