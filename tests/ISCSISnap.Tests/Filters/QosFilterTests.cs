using System.Diagnostics;
using System.Runtime.CompilerServices;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Filters;
using ISCSISnap.Storage.Filters.BuiltIn;
using ISCSISnap.Tests.Support;
using Xunit;
using Xunit.Abstractions;

namespace ISCSISnap.Tests.Filters;

/// <summary>
/// The QoS filter holds IOPS and bandwidth to their caps (within 10%, the spec) by deferral, per LUN and per
/// initiator, on a kernel context's workers while the rest of the test host runs beside it.
/// </summary>
public sealed class QosFilterTests(ITestOutputHelper output) : IAsyncLifetime
{
    private const int Size = 8 << 20;
    private readonly TempDirectory _directory = new();
    private readonly KernelContext _kernel = new(workers: 2, maxDepth: 8, name: "qos-io");
    private FileBlockDevice _device = null!;

    public Task InitializeAsync()
    {
        string path = Path.Combine(_directory.Path, "disk.img");
        File.WriteAllBytes(path, new byte[Size]);
        _device = FileBlockDevice.Open(path);
        return Task.CompletedTask;
    }

    public async Task DisposeAsync()
    {
        await _device.DisposeAsync();
        _kernel.Dispose();
        _directory.Dispose();
    }

    private (FilterEngine Engine, QosFilter Qos) NewEngine(QosLimits limits)
    {
        var engine = new FilterEngine(_device, "lun0", kernel: _kernel);
        var qos = new QosFilter(limits);
        engine.Add(qos);
        return (engine, qos);
    }

    private static RequestContext Read(string initiator, long offset, int length, TimeSpan deadline) =>
        new("lun0", initiator, initiator, IoOperation.Read, offset, length, DateTimeOffset.UtcNow + deadline);

    /// <summary>
    /// Keeps <paramref name="readersEach"/> reads per initiator in flight (an initiator's queue depth) and counts,
    /// per initiator, the reads completed in a window of <paramref name="seconds"/> after a warm-up that spends
    /// the buckets' initial burst and lets the readers settle onto the workers.
    /// </summary>
    private static async Task<Dictionary<string, int>> LoadAsync(FilterEngine engine, string[] initiators, int readersEach, int length, double seconds, double warmUp = 0.5)
    {
        var counts = initiators.ToDictionary(i => i, _ => new StrongBox<int>());
        var clock = Stopwatch.StartNew();
        var readers = initiators.SelectMany(initiator => Enumerable.Range(0, readersEach).Select(r => Task.Run(async () =>
        {
            var buffer = new byte[length];
            var counted = counts[initiator];
            for (long i = r; clock.Elapsed.TotalSeconds < warmUp + seconds; i += readersEach)
            {
                var request = Read(initiator, i * length % Size, length, TimeSpan.FromSeconds(30));
                Assert.Equal(IoStatus.Ok, await engine.ReadAsync(request, buffer));
                double at = clock.Elapsed.TotalSeconds;
                if (at >= warmUp && at < warmUp + seconds) Interlocked.Increment(ref counted.Value);
            }
        }))).ToArray();
        await Task.WhenAll(readers);
        return counts.ToDictionary(c => c.Key, c => c.Value.Value);
    }

    private void AssertRate(double cap, int completed, double seconds, string what)
    {
        double rate = completed / seconds;
        output.WriteLine($"{what}: {rate:F1}/s against a cap of {cap}/s ({rate / cap:P1})");
        Assert.True(rate >= cap * 0.9 && rate <= cap * 1.1, $"{what}: {rate:F1}/s against a cap of {cap}/s ({completed} in {seconds} s)");
    }

    [Fact]
    public async Task Iops_per_lun_are_held_to_the_cap()
    {
        var (engine, _) = NewEngine(new QosLimits { IopsPerLun = 400 });
        var counts = await LoadAsync(engine, ["iqn.test:a"], readersEach: 16, length: 4096, seconds: 2);
        AssertRate(400, counts["iqn.test:a"], 2, "LUN IOPS");
        Assert.True(engine.Filters[0].VerdictCount(VerdictKind.Defer) > 0);
        Assert.True(engine.Filters[0].Counters.GetValueOrDefault("deferred") > 0);
    }

    [Fact]
    public async Task Bandwidth_per_lun_is_held_to_the_cap()
    {
        var (engine, _) = NewEngine(new QosLimits { BytesPerSecondPerLun = 4 << 20 });
        var counts = await LoadAsync(engine, ["iqn.test:a"], readersEach: 16, length: 64 << 10, seconds: 2);
        AssertRate(4 << 20, counts["iqn.test:a"] * (64 << 10), 2, "LUN bytes/s in 64 KiB reads");
    }

    [Fact]
    public async Task Each_initiator_gets_its_own_cap()
    {
        var (engine, _) = NewEngine(new QosLimits { IopsPerInitiator = 150, BytesPerSecondPerInitiator = 2 << 20 });
        var counts = await LoadAsync(engine, ["iqn.test:a", "iqn.test:b"], readersEach: 8, length: 4096, seconds: 2);
        AssertRate(150, counts["iqn.test:a"], 2, "initiator a");
        AssertRate(150, counts["iqn.test:b"], 2, "initiator b");
    }

    [Fact]
    public async Task Initiators_under_a_lun_cap_share_it_evenly_within_their_own_caps()
    {
        // Each initiator may do 300, the LUN only 400: the LUN cap decides and its queue serves both in turn.
        var (engine, _) = NewEngine(new QosLimits { IopsPerLun = 400, IopsPerInitiator = 300 });
        var counts = await LoadAsync(engine, ["iqn.test:a", "iqn.test:b"], readersEach: 8, length: 4096, seconds: 2);
        AssertRate(400, counts.Values.Sum(), 2, "LUN IOPS");
        AssertRate(200, counts["iqn.test:a"], 2, "initiator a's share");
        AssertRate(200, counts["iqn.test:b"], 2, "initiator b's share");
    }

    [Fact]
    public async Task Limits_changed_while_io_runs_apply_to_the_requests_already_waiting()
    {
        var (engine, qos) = NewEngine(new QosLimits { IopsPerLun = 100 });
        var counts = await LoadAsync(engine, ["iqn.test:a"], readersEach: 16, length: 4096, seconds: 1, warmUp: 0.3);
        AssertRate(100, counts["iqn.test:a"], 1, "before the change");

        // The readers' debt at 100 IOPS (16 waiting) would hold them for 160 ms; new limits forgive it.
        qos.Limits = qos.Limits with { IopsPerLun = 400 };
        counts = await LoadAsync(engine, ["iqn.test:a"], readersEach: 16, length: 4096, seconds: 1, warmUp: 0.3);
        AssertRate(400, counts["iqn.test:a"], 1, "after raising the cap");

        long deferred = engine.Filters[0].VerdictCount(VerdictKind.Defer);
        qos.SetLimits(new QosLimits());
        await LoadAsync(engine, ["iqn.test:a"], readersEach: 4, length: 4096, seconds: 0.2, warmUp: 0);
        Assert.Equal(deferred, engine.Filters[0].VerdictCount(VerdictKind.Defer));
    }

    [Fact]
    public async Task Without_caps_nothing_is_deferred()
    {
        var (engine, _) = NewEngine(new QosLimits());
        var counts = await LoadAsync(engine, ["iqn.test:a", "iqn.test:b"], readersEach: 2, length: 4096, seconds: 0.2, warmUp: 0);
        Assert.True(counts.Values.Sum() > 0);
        Assert.Equal(0, engine.Filters[0].VerdictCount(VerdictKind.Defer));
        Assert.Empty(engine.Filters[0].Counters);
    }

    [Fact]
    public async Task A_request_whose_deadline_passes_while_deferred_fails_not_ready_and_gives_its_turn_back()
    {
        // One IO a second: the first goes at once (the burst), the next would wait about a second.
        var (engine, _) = NewEngine(new QosLimits { IopsPerLun = 1 });
        var buffer = new byte[4096];
        Assert.Equal(IoStatus.Ok, await engine.ReadAsync(Read("iqn.test:a", 0, 4096, TimeSpan.FromSeconds(30)), buffer));
        Assert.Equal(IoStatus.NotReady, await engine.ReadAsync(Read("iqn.test:a", 4096, 4096, TimeSpan.FromMilliseconds(150)), buffer));
        var slot = engine.Filters[0];
        Assert.Equal(1, slot.Counters.GetValueOrDefault("past_deadline"));
        Assert.Equal(0, slot.Counters.GetValueOrDefault("deferred"));

        // The failed request's tokens were given back: the next waits for the first one's second only, not for two.
        Assert.Equal(IoStatus.Ok, await engine.ReadAsync(Read("iqn.test:a", 8192, 4096, TimeSpan.FromSeconds(30)), buffer));
        Assert.Equal(1, slot.Counters.GetValueOrDefault("deferred"));
        Assert.InRange(slot.Counters.GetValueOrDefault("deferred_ms"), 1, 1000);
    }

    [Fact]
    public void Limits_are_checked()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => new QosFilter(new QosLimits { IopsPerLun = -1 }));
        var qos = new QosFilter(new QosLimits());
        Assert.Throws<ArgumentOutOfRangeException>(() => qos.SetLimits(new QosLimits { BurstSeconds = 0 }));
        Assert.True(qos.Limits.IsUnlimited);
    }
}
