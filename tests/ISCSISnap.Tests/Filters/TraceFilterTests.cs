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
        Assert.Null(records[^1].LatencyMicroseconds);
        var reads = records.Where(r => r.Operation == IoOperation.Read).ToList();
        // Every second IO is sampled: reads 1, 3, ..., 39 and the second write; the newest 8 are reads 27-39 and that write.
        Assert.Equal(new long[] { 27, 29, 31, 33, 35, 37, 39 }.Select(i => i * 4096L), reads.Select(r => r.Offset));
        Assert.All(reads, r => Assert.True(r.LatencyMicroseconds > 0));
        Assert.All(reads, r => Assert.Equal("iqn.test:reader", r.Initiator));
    }
}
