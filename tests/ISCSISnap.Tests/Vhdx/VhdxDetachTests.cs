using System.Buffers.Binary;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Vhdx;
using ISCSISnap.Tests.Support;
using Xunit;
using static ISCSISnap.Tests.Vhdx.VhdxTestSupport;

namespace ISCSISnap.Tests.Vhdx;

/// <summary>
/// DetachParent: the last step of merging a chain's base into its only child. The child has had every sector the base
/// holds copied into it (copy-up), so its parent may be replaced by zeros, and it becomes a standalone dynamic file.
/// </summary>
public sealed class VhdxDetachTests
{
    private const int Sector = 512;
    private static readonly Guid BatRegion = new("2DC27766-F623-4200-9D64-115E9BFD4A08");

    // ------------------------------------------------------------------ helpers

    /// <summary>The on-disk BAT entries of a closed (clean) file, parsed independently of VhdxFile.</summary>
    private static ulong[] ReadBat(string path, long entries)
    {
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        var table = new byte[65536];
        RandomAccess.Read(stream.SafeFileHandle, table, 0x30000);
        long batOffset = -1;
        for (int i = 0; i < BinaryPrimitives.ReadInt32LittleEndian(table.AsSpan(8)); i++)
            if (new Guid(table.AsSpan(16 + i * 32, 16)) == BatRegion) batOffset = BinaryPrimitives.ReadInt64LittleEndian(table.AsSpan(16 + i * 32 + 16));
        Assert.True(batOffset > 0);
        var bytes = new byte[entries * 8];
        RandomAccess.Read(stream.SafeFileHandle, bytes, batOffset);
        var bat = new ulong[entries];
        for (long i = 0; i < entries; i++) bat[i] = BinaryPrimitives.ReadUInt64LittleEndian(bytes.AsSpan((int)(i * 8)));
        return bat;
    }

    private static long ChunkRatio(int blockSize) => (1L << 23) * Sector / blockSize;
    private static long BatIndex(long block, int blockSize) => block + block / ChunkRatio(blockSize);

    private static List<(long Start, long Count, SectorState State)> Runs(IChainLayer layer, long first, long count)
    {
        var runs = new List<(long, long, SectorState)>();
        layer.Enumerate(first, count, (s, n, st) => runs.Add((s, n, st)));
        return runs;
    }

    /// <summary>
    /// Fills the unmapped sectors (bitmap bit 0) of every partially present block of a closed differencing file with
    /// 0xEE on disk: bytes no reader may ever see. Returns the blocks touched.
    /// </summary>
    private static List<long> ScribbleUnmappedSectors(string path, int blockSize)
    {
        var absent = new List<(long Start, long Count)>();
        long size;
        using (var f = VhdxFile.Open(path, Guid.Empty, writable: false))
        {
            size = f.VirtualSize;
            foreach (var (s, n, st) in Runs(f, 0, size / Sector))
                if (st == SectorState.Absent) absent.Add((s, n));
        }
        long blocks = (size + blockSize - 1) / blockSize;
        var bat = ReadBat(path, BatIndex(blocks - 1, blockSize) + 1);
        var touched = new List<long>();
        using var stream = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
        int perBlock = blockSize / Sector;
        foreach (var (start, count) in absent)
        {
            for (long s = start; s < start + count;)
            {
                long block = s / perBlock;
                long n = Math.Min(start + count - s, (block + 1) * perBlock - s);
                ulong entry = bat[BatIndex(block, blockSize)];
                if ((entry & 7) == 7)
                {
                    var garbage = new byte[n * Sector];
                    Array.Fill(garbage, (byte)0xEE);
                    RandomAccess.Write(stream.SafeFileHandle, garbage, (long)(entry & 0xFFFF_FFFF_FFF0_0000) + (s - block * perBlock) * Sector);
                    if (!touched.Contains(block)) touched.Add(block);
                }
                s += n;
            }
        }
        stream.Flush(flushToDisk: true);
        return touched;
    }

    /// <summary>What the merge does before detaching: every sector the child lacks and the parent holds is copied up.</summary>
    private static async Task CopyUp(VhdxFile child, VhdxFile parent)
    {
        var copies = new List<(long Start, long Count)>();
        foreach (var (s, n, st) in Runs(child, 0, child.VirtualSize / Sector))
        {
            if (st != SectorState.Absent) continue;
            foreach (var (ps, pn, pst) in Runs(parent, s, n))
                if (pst == SectorState.Data) copies.Add((ps, pn));
        }
        var buffer = new byte[4 << 20];
        foreach (var (start, count) in copies)
        {
            for (long done = 0; done < count; done += buffer.Length / Sector)
            {
                int n = (int)Math.Min(buffer.Length / Sector, count - done);
                var part = buffer.AsMemory(0, n * Sector);
                Assert.Equal(IoStatus.Ok, await parent.ReadAsync((start + done) * Sector, part));
                Assert.Equal(IoStatus.Ok, await child.WriteAsync((start + done) * Sector, new System.Buffers.ReadOnlySequence<byte>(part), false));
            }
        }
    }

    /// <summary>The layer's content with a parent of zeros under it: Absent sectors read zero whatever the layer holds.</summary>
    private static async Task<byte[]> ReadOverZeros(IChainLayer layer, long offset, int length)
    {
        var result = new byte[length];
        foreach (var (s, n, st) in Runs(layer, offset / Sector, length / Sector))
        {
            if (st == SectorState.Absent) continue;
            var target = result.AsMemory((int)(s * Sector - offset), (int)(n * Sector));
            Assert.Equal(IoStatus.Ok, await layer.ReadAsync(s * Sector, target));
        }
        return result;
    }

    private static async Task AssertOverZerosEquals(IChainLayer layer, ExpectedDisk expected, long offset, long length, string what)
    {
        const int chunk = 4 << 20;
        for (long at = offset; at < offset + length; at += chunk)
        {
            int n = (int)Math.Min(chunk, offset + length - at);
            var got = await ReadOverZeros(layer, at, n);
            var want = expected.Read(at, n);
            if (!got.AsSpan().SequenceEqual(want))
            {
                int i = got.AsSpan().CommonPrefixLength(want);
                Assert.Fail($"{what}: content differs at virtual offset {at + i}: {got[i]:x2} instead of {want[i]:x2}");
            }
        }
    }

    // ------------------------------------------------------------------ tests

    [Theory]
    [InlineData(1 << 20)]
    [InlineData(2 << 20)]
    public async Task Detach_turns_a_copied_up_child_into_a_dynamic_file_with_the_flattened_content(int blockSize)
    {
        const long size = 24L << 20;
        using var dir = new TempDirectory();
        string basePath = Path.Combine(dir.Path, "base.vhdx"), childPath = Path.Combine(dir.Path, "child.vhdx");
        using var expected = new ExpectedDisk(Path.Combine(dir.Path, "expected.raw"), size);
        var random = new Random(blockSize);

        // Base: data over [0, 10 MiB) and 4 KiB inside block 12 (the rest of that block is allocated zeros).
        Guid baseGuid;
        using (var b = VhdxFile.Create(basePath, new VhdxCreateOptions { VirtualSize = size, BlockSize = 1 << 20 }))
        {
            var data = new byte[10 << 20];
            random.NextBytes(data);
            await WriteAsync(b, 0, data);
            expected.Write(0, data);
            var small = new byte[4096];
            random.NextBytes(small);
            await WriteAsync(b, (12L << 20) + 8192, small);
            expected.Write((12L << 20) + 8192, small);
            baseGuid = b.DataWriteGuid;
        }

        // Child: partial writes over base data and over nothing, whole-block and partial zeroing, untouched blocks.
        long B = blockSize;
        using (var c = VhdxFile.Create(childPath, new VhdxCreateOptions { VirtualSize = size, BlockSize = blockSize, Parent = VhdxParent.For(childPath, basePath, baseGuid) }))
        {
            async Task Write(long offset, int length)
            {
                var data = new byte[length];
                random.NextBytes(data);
                await WriteAsync(c, offset, data);
                expected.Write(offset, data);
            }
            async Task Zero(long offset, long length, bool deallocate)
            {
                Assert.Equal(IoStatus.Ok, await c.ZeroAsync(offset, length, deallocate, false));
                expected.Zero(offset, length);
            }
            await Write(3 * Sector, Sector);                   // one sector over base data
            await Write(B + 1024, 7 * Sector);                 // mid-block over base data
            await Zero(2 * B, B, deallocate: true);            // whole block: ZERO over base data
            await Zero(3 * B + 4096, 8192, deallocate: false); // partial zero over base data
            await Write(4 * B, (int)B);                        // a whole block: fully present
            await Write(6 * B - Sector, 2 * Sector);           // across a block edge
            await Write((15L << 20) + 5 * Sector, 9 * Sector); // over nothing: stays partially present
            await Zero((16L << 20) + Sector, 2 * Sector, deallocate: false);   // partial zero over nothing
            await Write((17L << 20) + 4096, 4096);
            await Write((13L << 20) - 4096, 4096);             // the end of base block 12
            await Zero(18L << 20, 2L << 20, deallocate: false); // whole blocks over nothing
            // [20 MiB, 24 MiB) untouched, base empty: NOT_PRESENT throughout.
            Assert.Equal(IoStatus.Ok, c.Seal());
        }
        expected.Flush();
        var scribbled = ScribbleUnmappedSectors(childPath, blockSize);
        Assert.Contains(scribbled, block => block * B >= 14L << 20);   // some garbage lies where the base has nothing

        using var parent = VhdxFile.Open(basePath, Guid.Empty, writable: false);
        using (var child = VhdxFile.Open(childPath, Guid.Empty, writable: true, preserveDataWriteGuid: true))
        {
            Guid dataWrite = child.DataWriteGuid;
            await CopyUp(child, parent);
            Assert.True(child.IsDifferencing);
            await AssertOverZerosEquals(child, expected, 0, size, "after copy-up, over a zero parent");

            Assert.Equal(IoStatus.Ok, child.DetachParent());   // the copy-up's BAT and bitmap changes are still unflushed here
            Assert.False(child.IsDifferencing);
            Assert.Empty(child.ParentLocator);
            Assert.Equal(dataWrite, child.DataWriteGuid);
            // Dynamic semantics: every sector that is Absent or Zero reads zeros, with no parent at all.
            foreach (var (s, n, st) in Runs(child, 0, size / Sector))
                if (st != SectorState.Data)
                    Assert.True(expected.Read(s * Sector, (int)(n * Sector)).AsSpan().IndexOfAnyExcept((byte)0) < 0, $"sectors {s}+{n} are {st} but the flattened disk has data there");
            Assert.Equal(SectorState.Data, Runs(child, (15L << 20) / Sector, 1)[0].State);    // a formerly unmapped sector
            Assert.Equal(SectorState.Zero, Runs(child, 2 * B / Sector, 1)[0].State);
            Assert.Equal(SectorState.Absent, Runs(child, (21L << 20) / Sector, 1)[0].State);
            await AssertContentEquals(child, expected);

            // It behaves as a dynamic file from now on: a write to an untouched block allocates a whole block.
            var tail = new byte[4096];
            random.NextBytes(tail);
            await WriteAsync(child, (21L << 20) + 4096, tail);
            expected.Write((21L << 20) + 4096, tail);
            Assert.Equal(IoStatus.Ok, await child.ZeroAsync((22L << 20) + Sector, Sector, false, false));   // over NOT_PRESENT: nothing to do
            await AssertContentEquals(child, expected);
            Assert.Equal(IoStatus.Ok, child.Seal());
        }
        expected.Flush();

        var bat = ReadBat(childPath, ChunkRatio(blockSize) + 1);   // the first chunk, its bitmap entry included
        for (long i = 0; i < bat.Length; i++)
        {
            bool bitmapEntry = (i + 1) % (ChunkRatio(blockSize) + 1) == 0;
            if (bitmapEntry) Assert.Equal(0ul, bat[i]);
            else Assert.NotEqual(7ul, bat[i] & 7);
        }
        await AssertQemuCheckClean(childPath);
        await AssertQemuIdentical(childPath, expected.Path);
        using (var reopened = VhdxFile.Open(childPath, Guid.Empty, writable: false))
        {
            Assert.False(reopened.IsDifferencing);
            Assert.Empty(reopened.ParentLocator);
            await AssertContentEquals(reopened, expected);
        }
    }

    [Theory]
    [InlineData(0)]   // each flush fits one log entry
    [InlineData(2)]   // at most two pages per entry: the block conversion spans several entries
    public async Task A_crash_at_any_step_of_a_detach_leaves_the_old_differencing_file_or_the_new_dynamic_one(int pagesPerEntry)
    {
        // 2 GiB with 1 MiB blocks: the payload entries span four BAT pages, the chunk's bitmap entry is on a fifth.
        const long size = 2L << 30;
        const int blockSize = 1 << 20;
        long[] blocks = [3, 4, 600, 1100, 1700, 2047];
        using var dir = new TempDirectory();
        string basePath = Path.Combine(dir.Path, "base.vhdx"), childPath = Path.Combine(dir.Path, "child.vhdx");
        using var expected = new ExpectedDisk(Path.Combine(dir.Path, "expected.raw"), size);
        var random = new Random(7);
        async Task Write(IWritableLayer layer, long offset, int length)
        {
            var data = new byte[length];
            random.NextBytes(data);
            await WriteAsync(layer, offset, data);
            expected.Write(offset, data);
        }

        Guid baseGuid;
        using (var b = VhdxFile.Create(basePath, new VhdxCreateOptions { VirtualSize = size, BlockSize = blockSize }))
        {
            foreach (long block in new long[] { 3, 600, 1700 }) await Write(b, block * blockSize + 65536, 131072);
            baseGuid = b.DataWriteGuid;
        }
        using (var c = VhdxFile.Create(childPath, new VhdxCreateOptions { VirtualSize = size, BlockSize = blockSize, Parent = VhdxParent.For(childPath, basePath, baseGuid) }))
        {
            foreach (long block in blocks)
            {
                await Write(c, block * blockSize + 4096 * (block % 7), 8192);
                Assert.Equal(IoStatus.Ok, await c.ZeroAsync(block * blockSize + 300 * Sector, 3 * Sector, false, false));
                expected.Zero(block * blockSize + 300 * Sector, 3 * Sector);
            }
        }
        expected.Flush();
        Assert.Equal(3, ScribbleUnmappedSectors(childPath, blockSize).Count(block => block is 4 or 1100 or 2047));
        using (var parent = VhdxFile.Open(basePath, Guid.Empty, writable: false))
        using (var child = VhdxFile.Open(childPath, Guid.Empty, writable: true, preserveDataWriteGuid: true))
        {
            await CopyUp(child, parent);
            Assert.Equal(IoStatus.Ok, child.Seal());
        }

        // Copy the file at every step boundary and at every instant "log entry durable, not yet applied".
        var copies = new List<(string Path, string Instant)>();
        void Snapshot(string instant)
        {
            string copy = Path.Combine(dir.Path, $"crash{copies.Count}.vhdx");
            File.Copy(childPath, copy);
            copies.Add((copy, instant));
        }
        Snapshot("before");
        using (var child = VhdxFile.Open(childPath, Guid.Empty, writable: true, preserveDataWriteGuid: true))
        {
            child.MaxPagesPerLogEntryForTest = pagesPerEntry;
            child.LogEntryDurableForTest = () => Snapshot("log entry durable");
            child.DetachStepForTest = step => Snapshot(step);
            Assert.Equal(IoStatus.Ok, child.DetachParent());
            Assert.Equal(IoStatus.Ok, child.Seal());
        }
        Snapshot("sealed");
        int entries = copies.Count(c => c.Instant == "log entry durable");
        Assert.True(entries >= (pagesPerEntry == 0 ? 3 : 4), $"{entries} log entries");

        int differencing = 0, dynamic = 0;
        foreach (var (copy, instant) in copies)
        {
            string what = $"{Path.GetFileName(copy)} ({instant})";
            bool isDifferencing;
            using (var ro = VhdxFile.Open(copy, Guid.Empty, writable: false))   // replays any log in memory
            {
                isDifferencing = ro.IsDifferencing;
                Assert.Equal(isDifferencing, ro.ParentLocator.Count > 0);
                await AssertCrashCopy(ro, what);
            }
            if (isDifferencing) differencing++;
            else dynamic++;
            string replayed = copy + ".rw";
            File.Copy(copy, replayed);
            using (var rw = VhdxFile.Open(replayed, Guid.Empty, writable: true, preserveDataWriteGuid: true))   // replays to disk
            {
                Assert.Equal(isDifferencing, rw.IsDifferencing);
                await AssertCrashCopy(rw, what + " replayed");
                Assert.Equal(IoStatus.Ok, rw.Seal());
            }
            if (!isDifferencing) await AssertQemuCheckClean(replayed);
        }
        Assert.True(differencing >= 4 && dynamic >= 2, $"{differencing} differencing and {dynamic} dynamic copies");
        Assert.Equal("detached", copies[^2].Instant);
        await AssertQemuCheckClean(childPath);

        async Task AssertCrashCopy(VhdxFile file, string what)
        {
            // Outside the touched blocks nothing is data; inside, the content over a zero parent is the flattened disk.
            foreach (var (s, n, st) in Runs(file, 0, size / Sector))
            {
                if (st != SectorState.Data) continue;
                for (long block = s * Sector / blockSize; block <= ((s + n) * Sector - 1) / blockSize; block++)
                    Assert.True(blocks.Contains(block), $"{what}: block {block} holds data");
            }
            foreach (long block in blocks)
                await AssertOverZerosEquals(file, expected, block * blockSize, blockSize, what);
        }
    }

    [Fact]
    public async Task Detach_refuses_a_read_only_file_and_a_file_without_a_parent()
    {
        const long size = 8L << 20;
        using var dir = new TempDirectory();
        string basePath = Path.Combine(dir.Path, "base.vhdx"), childPath = Path.Combine(dir.Path, "child.vhdx");
        Guid baseGuid;
        using (var b = VhdxFile.Create(basePath, new VhdxCreateOptions { VirtualSize = size, BlockSize = 1 << 20 }))
        {
            await WriteAsync(b, 0, new byte[4096]);
            baseGuid = b.DataWriteGuid;
            Assert.Throws<InvalidOperationException>(() => b.DetachParent());   // dynamic, writable
        }
        using (var c = VhdxFile.Create(childPath, new VhdxCreateOptions { VirtualSize = size, BlockSize = 1 << 20, Parent = VhdxParent.For(childPath, basePath, baseGuid) }))
            await WriteAsync(c, 512, new byte[512]);
        byte[] before = File.ReadAllBytes(childPath);
        using (var ro = VhdxFile.Open(childPath, Guid.Empty, writable: false))
        {
            Assert.Equal(IoStatus.WriteProtected, ro.DetachParent());
            Assert.True(ro.IsDifferencing);
            Assert.NotEmpty(ro.ParentLocator);
        }
        Assert.Equal(before, File.ReadAllBytes(childPath));
        using (var ro = VhdxFile.Open(basePath, Guid.Empty, writable: false))
            Assert.Throws<InvalidOperationException>(() => ro.DetachParent());   // not differencing wins over read-only
    }
}
