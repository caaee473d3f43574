using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Vhdx;
using ISCSISnap.Tests.Support;
using Xunit;
using static ISCSISnap.Tests.Vhdx.VhdxTestSupport;

namespace ISCSISnap.Tests.Vhdx;

public sealed class VhdxRoundTripTests
{
    [Theory]
    [InlineData(1, 24L << 20, 11)]
    [InlineData(2, 40L << 20, 12)]
    [InlineData(32, 100L << 20, 13)]
    [InlineData(256, 600L << 20, 14)]   // the last block is partial (600 = 2 × 256 + 88)
    public async Task Random_operations_round_trip_through_qemu_img(int blockMiB, long size, int seed)
    {
        using var dir = new TempDirectory();
        string path = Path.Combine(dir.Path, "disk.vhdx");
        using var expected = new ExpectedDisk(Path.Combine(dir.Path, "expected.raw"), size);
        var diskId = Guid.NewGuid();
        using (var vhdx = VhdxFile.Create(path, new VhdxCreateOptions { VirtualSize = size, BlockSize = blockMiB << 20, DiskId = diskId, LogSize = 1 << 20 }))
        {
            Assert.Equal(diskId, vhdx.DiskId);
            Assert.True(vhdx.IsWritable);
            Assert.False(vhdx.IsDifferencing);
            Assert.Empty(vhdx.ParentLocator);
            Assert.Equal(blockMiB << 20, vhdx.BlockSize);
            await RandomOperations(vhdx, expected, seed, 80, blockMiB << 20);
            await AssertContentEquals(vhdx, expected);
        }
        await AssertQemuCheckClean(path);
        await AssertQemuIdentical(path, expected.Path);
        using (var reopened = VhdxFile.Open(path, diskId, writable: false))
        {
            Assert.False(reopened.IsWritable);
            await AssertContentEquals(reopened, expected);
        }
        // A second writable session on the same file, then QEMU again.
        using (var again = VhdxFile.Open(path, diskId, writable: true))
            await RandomOperations(again, expected, seed + 100, 40, blockMiB << 20);
        await AssertQemuCheckClean(path);
        await AssertQemuIdentical(path, expected.Path);
    }

    [Fact]
    public async Task A_fresh_file_reads_zero_and_enumerates_absent_and_has_its_options()
    {
        using var dir = new TempDirectory();
        string path = Path.Combine(dir.Path, "new.vhdx");
        var page83 = Guid.NewGuid();
        Guid dataWrite;
        using (var vhdx = VhdxFile.Create(path, new VhdxCreateOptions { VirtualSize = 8L << 20, BlockSize = 1 << 20, Page83Id = page83, PhysicalSectorSize = 512 }))
        {
            Assert.Equal(8L << 20, vhdx.VirtualSize);
            Assert.Equal(512, vhdx.LogicalSectorSize);
            Assert.Equal(512, vhdx.PhysicalSectorSize);
            Assert.Equal(page83, vhdx.Page83Id);
            var runs = new List<(long, long, SectorState)>();
            vhdx.Enumerate(0, 16384, (s, n, st) => runs.Add((s, n, st)));
            Assert.Equal([(0L, 16384L, SectorState.Absent)], runs);
            var buffer = new byte[4096];
            Array.Fill(buffer, (byte)1);
            Assert.Equal(IoStatus.Ok, await vhdx.ReadAsync(4096, buffer));
            Assert.All(buffer, b => Assert.Equal(0, b));
            Assert.Equal(IoStatus.OutOfRange, await vhdx.ReadAsync(8L << 20, buffer));
            Assert.Equal(IoStatus.Misaligned, await vhdx.ReadAsync(100, buffer));
            dataWrite = vhdx.DataWriteGuid;
        }
        await AssertQemuCheckClean(path);
        // A session that never writes leaves the headers (and the DataWriteGuid) alone.
        using (var again = VhdxFile.Open(path, Guid.Empty, writable: true))
            Assert.Equal(dataWrite, again.DataWriteGuid);
        using (var again = VhdxFile.Open(path, Guid.Empty, writable: false))
            Assert.Equal(dataWrite, again.DataWriteGuid);
        var ex = Assert.Throws<StorageException>(() => VhdxFile.Create(path, new VhdxCreateOptions { VirtualSize = 1 << 20 }));
        Assert.Contains("exists", ex.Message);
    }

    [Fact]
    public async Task Writes_change_the_DataWriteGuid_once_per_session_unless_preserved()
    {
        using var dir = new TempDirectory();
        string path = Path.Combine(dir.Path, "g.vhdx");
        Guid first;
        using (var vhdx = VhdxFile.Create(path, new VhdxCreateOptions { VirtualSize = 4L << 20, BlockSize = 1 << 20 }))
        {
            first = vhdx.DataWriteGuid;
            await WriteAsync(vhdx, 0, new byte[4096]);
            Guid second = vhdx.DataWriteGuid;
            Assert.NotEqual(first, second);
            await WriteAsync(vhdx, 8192, new byte[4096]);
            Assert.Equal(second, vhdx.DataWriteGuid);
            first = second;
        }
        using (var vhdx = VhdxFile.Open(path, Guid.Empty, writable: true, preserveDataWriteGuid: true))
        {
            await WriteAsync(vhdx, 0, new byte[4096]);
            Assert.Equal(first, vhdx.DataWriteGuid);
        }
        using (var vhdx = VhdxFile.Open(path, Guid.Empty, writable: false))
            Assert.Equal(first, vhdx.DataWriteGuid);
    }

    [Fact]
    public async Task Fua_write_is_present_after_reopen_without_flush_or_close()
    {
        using var dir = new TempDirectory();
        string path = Path.Combine(dir.Path, "fua.vhdx");
        var data = new byte[8192];
        new Random(5).NextBytes(data);
        var vhdx = VhdxFile.Create(path, new VhdxCreateOptions { VirtualSize = 16L << 20, BlockSize = 1 << 20 });
        await WriteAsync(vhdx, 3L << 20, data, fua: true);
        // Simulate losing the process right after the FUA completed: copy the file as it is now, while the LogGuid is set.
        string copy = Path.Combine(dir.Path, "copy.vhdx");
        File.Copy(path, copy);
        vhdx.StopBeforeApplyForTest = true;   // make the live object inert so Dispose changes nothing more
        await vhdx.FlushAsync();
        vhdx.Dispose();
        using var reopened = VhdxFile.Open(copy, Guid.Empty, writable: true);
        var back = new byte[8192];
        Assert.Equal(IoStatus.Ok, await reopened.ReadAsync(3L << 20, back));
        Assert.Equal(data, back);
        reopened.Dispose();
        await AssertQemuCheckClean(copy);
    }

    [Fact]
    public async Task Logical_sector_4096_files_round_trip_through_our_reader()
    {
        using var dir = new TempDirectory();
        string path = Path.Combine(dir.Path, "4k.vhdx");
        long size = 48L << 20;
        using var expected = new ExpectedDisk(Path.Combine(dir.Path, "expected.raw"), size);
        using (var vhdx = VhdxFile.Create(path, new VhdxCreateOptions { VirtualSize = size, BlockSize = 2 << 20, LogicalSectorSize = 4096 }))
        {
            Assert.Equal(IoStatus.Misaligned, await vhdx.WriteAsync(512, new System.Buffers.ReadOnlySequence<byte>(new byte[512]), false));
            await RandomOperations(vhdx, expected, 77, 60, 2 << 20);
        }
        using (var reopened = VhdxFile.Open(path, Guid.Empty, writable: false))
        {
            Assert.Equal(4096, reopened.LogicalSectorSize);
            await AssertContentEquals(reopened, expected);
        }
    }

    [Fact]
    public async Task Grow_extends_in_place_and_by_relocating_the_BAT()
    {
        using var dir = new TempDirectory();
        string path = Path.Combine(dir.Path, "grow.vhdx");
        long size = 16L << 20, largest = 200L << 30;
        using var expected = new ExpectedDisk(Path.Combine(dir.Path, "expected.raw"), size);
        long BatOffset()
        {
            using var f = File.OpenRead(path);
            var table = new byte[65536];
            f.Position = 0x30000;
            f.ReadExactly(table);
            return VhdxRegionTable.TryParse(table, out _)!.Single(r => r.Id == VhdxFormat.BatRegion).FileOffset;
        }
        long initialBat;
        using (var vhdx = VhdxFile.Create(path, new VhdxCreateOptions { VirtualSize = size, BlockSize = 1 << 20 }))
        {
            initialBat = BatOffset();
            await RandomOperations(vhdx, expected, 3, 30, 1 << 20);
            Assert.Equal(IoStatus.OutOfRange, await vhdx.GrowAsync(size - (1 << 20)));
            Assert.Equal(IoStatus.Misaligned, await vhdx.GrowAsync(size + 100));
            // 16 MiB → 1 GiB fits the 1 MiB BAT (131072 entries); 200 GiB (204800 blocks) needs a bigger one, moved to the end.
            foreach (long next in new[] { 1L << 30, largest })
            {
                Assert.Equal(IoStatus.Ok, await vhdx.GrowAsync(next));
                Assert.Equal(next, vhdx.VirtualSize);
                expected.Grow(next);
                var data = new byte[1 << 20];
                new Random((int)(next >> 20)).NextBytes(data);
                await WriteAsync(vhdx, next - data.Length - 4096, data);
                expected.Write(next - data.Length - 4096, data);
            }
        }
        Assert.NotEqual(initialBat, BatOffset());
        expected.Flush();
        await AssertQemuCheckClean(path);
        var info = await QemuImg("info", "-f", "vhdx", path);
        Assert.Contains("200 GiB", info.Output);
        using (var reopened = VhdxFile.Open(path, Guid.Empty, writable: false))
        {
            Assert.Equal(largest, reopened.VirtualSize);
            foreach (long at in new[] { 0L, (1L << 30) - (2 << 20), largest - (2 << 20) })
            {
                var back = new byte[2 << 20];
                Assert.Equal(IoStatus.Ok, await reopened.ReadAsync(at, back));
                Assert.Equal(expected.Read(at, back.Length), back);
            }
            var small = new byte[16 << 20];
            Assert.Equal(IoStatus.Ok, await reopened.ReadAsync(0, small));
            Assert.Equal(expected.Read(0, small.Length), small);
        }
    }
}
