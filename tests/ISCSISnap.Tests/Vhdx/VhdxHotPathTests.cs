using System.Buffers;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Vhdx;
using ISCSISnap.Tests.Support;
using Xunit;
using static ISCSISnap.Tests.Vhdx.VhdxTestSupport;

namespace ISCSISnap.Tests.Vhdx;

public sealed class VhdxHotPathTests
{
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Reads_and_overwrites_of_allocated_sectors_do_not_allocate(bool differencing)
    {
        using var dir = new TempDirectory();
        string path = Path.Combine(dir.Path, "hot.vhdx");
        VhdxParent? link = null;
        if (differencing)
        {
            string basePath = Path.Combine(dir.Path, "base.vhdx");
            using (VhdxFile.Create(basePath, new VhdxCreateOptions { VirtualSize = 8L << 20, BlockSize = 1 << 20 })) { }
            link = VhdxParent.For(path, basePath, Guid.NewGuid());
        }
        using var vhdx = VhdxFile.Create(path, new VhdxCreateOptions { VirtualSize = 8L << 20, BlockSize = 1 << 20, Parent = link });
        var data = new byte[8192];
        new Random(1).NextBytes(data);
        // Partially present in the differencing case: the first 16 sectors of block 1 only.
        await WriteAsync(vhdx, 1 << 20, data);
        var sequence = TwoSegments(data);
        var buffer = new byte[8192];
        for (int i = 0; i < 50; i++)   // warm up (JIT, tiering, page cache)
        {
            Assert.Equal(IoStatus.Ok, await vhdx.WriteAsync(1 << 20, sequence, false));
            Assert.Equal(IoStatus.Ok, await vhdx.ReadAsync(1 << 20, buffer));
        }
        // A per-IO allocation shows in every round; a one-off (the runtime re-jitting a method, say, which a loaded
        // CI machine makes likelier) in one round only: the quietest of three rounds is the figure.
        var rounds = new List<long>();
        for (int round = 0; round < 3; round++)
        {
            long before = GC.GetAllocatedBytesForCurrentThread();
            for (int i = 0; i < 1000; i++)
            {
                var w = vhdx.WriteAsync(1 << 20, sequence, false);
                Assert.True(w.IsCompletedSuccessfully && w.Result == IoStatus.Ok);
                var r = vhdx.ReadAsync(1 << 20, buffer);
                Assert.True(r.IsCompletedSuccessfully && r.Result == IoStatus.Ok);
            }
            rounds.Add(GC.GetAllocatedBytesForCurrentThread() - before);
        }
        Assert.True(rounds.Min() < 1024, $"{string.Join(", ", rounds)} bytes allocated by rounds of 1000 reads and overwrites");
        Assert.Equal(data, buffer);
    }
}
