using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Filters;
using ISCSISnap.Storage.Filters.BuiltIn;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Filters;

/// <summary>The trace filter samples IOs into a bounded ring without changing them.</summary>
public sealed class TraceFilterTests
{
    [Fact]
    public async Task Sampled_ios_are_kept_newest_last_in_a_bounded_ring_and_reads_are_unchanged()
    {
        using var directory = new TempDirectory();
        string path = Path.Combine(directory.Path, "disk.img");
        var content = new byte[1 << 20];
        new Random(4).NextBytes(content);
        File.WriteAllBytes(path, content);
        await using var device = FileBlockDevice.Open(path);
        var engine = new FilterEngine(device, "t/0");
        var trace = new TraceFilter(sampleEvery: 2, capacity: 8);
        engine.Add(trace);

        var buffer = new byte[4096];
        for (int i = 0; i < 40; i++)
        {
            long offset = i * 4096L;
            var request = new RequestContext("t/0", "iqn.test:reader", "n", IoOperation.Read, offset, 4096, DateTimeOffset.MaxValue, System.Diagnostics.Stopwatch.GetTimestamp());
            Assert.Equal(IoStatus.Ok, await engine.ReadAsync(request, buffer));
            Assert.True(buffer.AsSpan().SequenceEqual(content.AsSpan((int)offset, 4096)));
        }
        var write = new RequestContext("t/0", "iqn.test:writer", "n", IoOperation.Write, 0, 4096, DateTimeOffset.MaxValue);
        Assert.Equal(IoStatus.Ok, await engine.WriteAsync(write, new System.Buffers.ReadOnlySequence<byte>(new byte[4096]), WriteFlags.None));
        Assert.Equal(IoStatus.Ok, await engine.WriteAsync(write, new System.Buffers.ReadOnlySequence<byte>(new byte[4096]), WriteFlags.None));

        var records = trace.Records;
        Assert.Equal(8, records.Count);
        Assert.Equal(IoOperation.Write, records[^1].Operation);
        Assert.Null(records[^1].LatencyMicroseconds);   // the write came with no timestamp
        var reads = records.Where(r => r.Operation == IoOperation.Read).ToList();
        // Every second IO is sampled: reads 1, 3, ..., 39 and the second write; the newest 8 are reads 27-39 and that write.
        Assert.Equal(new long[] { 27, 29, 31, 33, 35, 37, 39 }.Select(i => i * 4096L), reads.Select(r => r.Offset));
        Assert.All(reads, r => Assert.True(r.LatencyMicroseconds > 0));
        Assert.All(reads, r => Assert.Equal("iqn.test:reader", r.Initiator));
    }
}

/// <summary>A traced IO carries its latency and the verdicts of the filters below the trace filter.</summary>
public sealed class TraceVerdictTests
{
    private sealed class DeferOnce(string name) : IIoFilter
    {
        private int _calls;
        public string Name => name;
        public ValueTask<FilterVerdict> OnReadAsync(Upcall upcall) => new(Interlocked.Increment(ref _calls) % 2 == 1 ? FilterVerdict.Defer(1) : FilterVerdict.Pass);
        public ValueTask<FilterVerdict> OnWriteAsync(Upcall upcall) => new(FilterVerdict.Pass);
    }

    [Fact]
    public async Task Records_show_the_verdicts_below_and_writes_get_a_latency()
    {
        using var directory = new TempDirectory();
        string path = Path.Combine(directory.Path, "disk.img");
        File.WriteAllBytes(path, new byte[1 << 20]);
        await using var device = FileBlockDevice.Open(path);
        var engine = new FilterEngine(device, "t/0");
        var trace = new TraceFilter();
        engine.Add(trace);
        engine.Add(new DeferOnce("throttle"));

        var read = new RequestContext("t/0", "iqn.test:i", "n", IoOperation.Read, 0, 4096, DateTimeOffset.MaxValue, System.Diagnostics.Stopwatch.GetTimestamp());
        Assert.Equal(IoStatus.Ok, await engine.ReadAsync(read, new byte[4096]));
        var write = read with { Operation = IoOperation.Write, Issued = System.Diagnostics.Stopwatch.GetTimestamp() };
        Assert.Equal(IoStatus.Ok, await engine.WriteAsync(write, new System.Buffers.ReadOnlySequence<byte>(new byte[4096]), WriteFlags.None));

        var records = trace.Records;
        Assert.Equal(2, records.Count);
        Assert.Equal("throttle:defer throttle:pass", records[0].Verdicts);
        Assert.Equal("throttle:pass", records[1].Verdicts);
        Assert.True(records[1].LatencyMicroseconds > 0);
        Assert.Equal(IoOperation.Write, records[1].Operation);
    }
}
