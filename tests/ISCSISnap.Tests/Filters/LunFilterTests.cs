using System.Collections.Concurrent;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Filters;
using ISCSISnap.Target.Scsi;
using ISCSISnap.Tests.Support;
using ISCSISnap.Tests.Unit;
using Xunit;

namespace ISCSISnap.Tests.Filters;

/// <summary>A LUN's READ and WRITE data pass through its filter stack, with the initiator of the command in the request.</summary>
public sealed class LunFilterTests
{
    private sealed class Recorder(Func<Upcall, FilterVerdict> decide) : IIoFilter
    {
        public ConcurrentQueue<RequestContext> Seen { get; } = new();
        public string Name => "recorder";
        public ValueTask<FilterVerdict> OnReadAsync(Upcall upcall) { Seen.Enqueue(upcall.Request); return ValueTask.FromResult(decide(upcall)); }
        public ValueTask<FilterVerdict> OnWriteAsync(Upcall upcall) { Seen.Enqueue(upcall.Request); return ValueTask.FromResult(decide(upcall)); }
    }

    [Fact]
    public async Task Reads_and_writes_of_a_lun_reach_its_filters_with_the_initiator_and_the_range()
    {
        await using var lu = LuHarness.Create();
        using var kernel = new KernelContext(workers: 2);
        var engine = new FilterEngine(lu.Device, "target/0", kernel: kernel);
        lu.Unit.Filters = engine;
        var nexus = await lu.ReadyNexusAsync("iqn.2026-11.test:filtered");
        var recorder = new Recorder(u => u.Request.Operation == IoOperation.Read && u.Request.Offset == 100 * 512
            ? CompleteWith(u, 0x5A)
            : FilterVerdict.Pass);
        engine.Add(recorder);

        var data = LuHarness.Pattern(8 * 512, 3);
        await lu.WriteAsync(nexus, 10, data);
        Assert.Equal(data, await lu.ReadAsync(nexus, 10, 8));
        // The filter answers this range itself (a cache hit, say): the device is not asked.
        Assert.All(await lu.ReadAsync(nexus, 100, 2), b => Assert.Equal(0x5A, b));

        var seen = recorder.Seen.ToList();
        Assert.Contains(seen, r => r.Operation == IoOperation.Write && r.Offset == 10 * 512 && r.Length == 8 * 512);
        Assert.Contains(seen, r => r.Operation == IoOperation.Read && r.Offset == 10 * 512 && r.Length == 8 * 512);
        Assert.All(seen, r => Assert.Equal("iqn.2026-11.test:filtered", r.Initiator));
        Assert.All(seen, r => Assert.Equal("target/0", r.Lun));

        // A failing verdict is a CHECK CONDITION with the status's sense (MEDIUM ERROR for a read error).
        engine.Remove("recorder");
        engine.Add(new Recorder(_ => FilterVerdict.Fail(IoStatus.ReadError)));
        var refused = await lu.RunAsync(nexus, Cdb.Read16(10, 1));
        Assert.Equal(ScsiStatus.CheckCondition, refused.Status);
        Assert.Equal(SenseKey.MediumError, refused.Key);

        // With the filter gone the LUN reads its data straight from the device again.
        engine.Remove("recorder");
        Assert.Equal(data, await lu.ReadAsync(nexus, 10, 8));
    }

    private static FilterVerdict CompleteWith(Upcall upcall, byte value)
    {
        upcall.ReadBuffer.Span.Fill(value);
        return FilterVerdict.Complete;
    }
}
