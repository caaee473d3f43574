using System.Buffers;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary><see cref="FileBlockDevice"/> over real sparse files in a temporary directory.</summary>
public sealed class FileBlockDeviceTests : IDisposable
{
    private const long Size = 4L << 20;
    private readonly TempDirectory _directory = new();

    private string ImagePath(string name = "disk.img") => Path.Combine(_directory.Path, name);

    public void Dispose() => _directory.Dispose();

    // ---------------------------------------------------------------- create / open

    [Fact]
    public async Task Create_makes_a_sparse_file_of_the_requested_length()
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        Assert.Equal(Size, new FileInfo(ImagePath()).Length);
        Assert.Equal(Size, device.Length);
        Assert.Equal(512, device.LogicalBlockSize);
        Assert.False(device.IsReadOnly);
        Assert.True(device.SupportsDeallocation);
        Assert.Equal(0, device.AllocatedBytes);
    }

    [Fact]
    public void Create_refuses_an_existing_file_and_leaves_it_alone()
    {
        var original = new byte[1024];
        new Random(1).NextBytes(original);
        File.WriteAllBytes(ImagePath(), original);
        var e = Assert.Throws<StorageException>(() => FileBlockDevice.Create(ImagePath(), Size));
        Assert.Equal(ImagePath(), e.Path);
        Assert.Contains(ImagePath(), e.Message);
        Assert.Contains("exists", e.Fault);
        Assert.Equal(original, File.ReadAllBytes(ImagePath()));
    }

    [Theory]
    [InlineData(0L)]
    [InlineData(1000L)]
    [InlineData(-512L)]
    public void Create_refuses_bad_geometry(long length)
    {
        var e = Assert.Throws<StorageException>(() => FileBlockDevice.Create(ImagePath(), length));
        Assert.Equal(ImagePath(), e.Path);
        Assert.False(File.Exists(ImagePath()));
    }

    [Fact]
    public void Create_refuses_a_block_size_other_than_512_or_4096() =>
        Assert.Throws<StorageException>(() => FileBlockDevice.Create(ImagePath(), Size, logicalBlockSize: 1024));

    [Theory]
    [InlineData(1000, 512)]     // not a multiple of 512
    [InlineData(4608, 4096)]    // a multiple of 512 but not of 4096
    public void Open_refuses_a_length_that_is_not_a_multiple_of_the_block_size_and_names_the_file(int length, int blockSize)
    {
        File.WriteAllBytes(ImagePath(), new byte[length]);
        var e = Assert.Throws<StorageException>(() => FileBlockDevice.Open(ImagePath(), blockSize));
        Assert.Equal(ImagePath(), e.Path);
        Assert.StartsWith(ImagePath() + ":", e.Message);
        Assert.Contains(length.ToString(), e.Fault);
    }

    [Fact]
    public void Open_refuses_an_empty_file_and_names_it()
    {
        File.WriteAllBytes(ImagePath(), []);
        var e = Assert.Throws<StorageException>(() => FileBlockDevice.Open(ImagePath()));
        Assert.Equal(ImagePath(), e.Path);
        Assert.Contains("empty", e.Fault);
    }

    [Fact]
    public void Open_of_a_missing_file_names_it()
    {
        var e = Assert.Throws<StorageException>(() => FileBlockDevice.Open(ImagePath("missing.img")));
        Assert.Equal(ImagePath("missing.img"), e.Path);
        Assert.Contains("not found", e.Fault);
    }

    [Fact]
    public async Task Open_of_a_valid_image_sees_its_contents()
    {
        var contents = LuHarness.Pattern(8192, 3);
        File.WriteAllBytes(ImagePath(), contents);
        await using var device = FileBlockDevice.Open(ImagePath(), 4096);
        Assert.Equal(8192, device.Length);
        Assert.Equal(4096, device.LogicalBlockSize);
        var read = new byte[8192];
        Assert.Equal(IoStatus.Ok, await device.ReadAsync(0, read));
        Assert.Equal(contents, read);
    }

    // ---------------------------------------------------------------- range checks

    [Theory]
    [InlineData(100L, 512)]      // offset not aligned
    [InlineData(512L, 100)]      // length not aligned
    [InlineData(4096L, 513)]
    public async Task Misaligned_io_is_refused_with_misaligned(long offset, int length)
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        Assert.Equal(IoStatus.Misaligned, await device.ReadAsync(offset, new byte[length]));
        Assert.Equal(IoStatus.Misaligned, await device.WriteAsync(offset, new ReadOnlySequence<byte>(new byte[length]), WriteFlags.None));
        Assert.Equal(IoStatus.Misaligned, await device.WriteZeroesAsync(offset, length, deallocate: true, WriteFlags.None));
        Assert.Equal(IoStatus.Misaligned, await device.WriteAtomicAsync(offset, new byte[length], WriteFlags.None));
        Assert.Equal(0, device.AllocatedBytes);
    }

    [Theory]
    [InlineData(Size, 512)]                 // starts at the end
    [InlineData(Size - 512, 1024)]          // runs past the end
    [InlineData(-512L, 512)]                // negative offset
    [InlineData(long.MaxValue - 511, 512)]  // offset + length would overflow
    public async Task Out_of_range_io_is_refused_with_out_of_range(long offset, int length)
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        Assert.Equal(IoStatus.OutOfRange, await device.ReadAsync(offset, new byte[length]));
        Assert.Equal(IoStatus.OutOfRange, await device.WriteAsync(offset, new ReadOnlySequence<byte>(new byte[length]), WriteFlags.None));
        Assert.Equal(IoStatus.OutOfRange, await device.WriteZeroesAsync(offset, length, deallocate: false, WriteFlags.None));
        Assert.Equal(IoStatus.OutOfRange, await device.WriteAtomicAsync(offset, new byte[length], WriteFlags.None));
        Assert.Equal(Size, new FileInfo(ImagePath()).Length);   // nothing was written past the end
    }

    [Fact]
    public async Task The_last_block_is_in_range()
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        var block = LuHarness.Pattern(512, 9);
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(Size - 512, new ReadOnlySequence<byte>(block), WriteFlags.None));
        var read = new byte[512];
        Assert.Equal(IoStatus.Ok, await device.ReadAsync(Size - 512, read));
        Assert.Equal(block, read);
    }

    // ---------------------------------------------------------------- data

    [Fact]
    public async Task Unwritten_space_reads_as_zeros()
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        var buffer = Enumerable.Repeat((byte)0xCC, 64 * 1024).ToArray();
        Assert.Equal(IoStatus.Ok, await device.ReadAsync(1 << 20, buffer));
        Assert.All(buffer, b => Assert.Equal(0, b));
    }

    [Fact]
    public async Task Multi_segment_writes_land_in_order()
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        var data = LuHarness.Pattern(3 * 4096, 4);
        // Segment boundaries that ignore block boundaries.
        var sequence = Sequences.FromPieces(data[..100], data[100..700], data[700..5000], data[5000..]);
        Assert.False(sequence.IsSingleSegment);
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(8192, sequence, WriteFlags.None));
        var read = new byte[data.Length + 1024];
        Assert.Equal(IoStatus.Ok, await device.ReadAsync(8192 - 512, read));
        Assert.All(read[..512], b => Assert.Equal(0, b));
        Assert.Equal(data, read[512..^512]);
        Assert.All(read[^512..], b => Assert.Equal(0, b));
    }

    [Fact]
    public async Task A_forced_unit_access_write_completes_and_reads_back()
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        var data = LuHarness.Pattern(4096, 5);
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(0, new ReadOnlySequence<byte>(data), WriteFlags.ForceUnitAccess));
        Assert.Equal(data, File.ReadAllBytes(ImagePath()).AsSpan(0, 4096).ToArray());
    }

    [Fact]
    public async Task Flush_succeeds_and_concurrent_flushes_all_complete()
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(0, new ReadOnlySequence<byte>(new byte[4096]), WriteFlags.None));
        Assert.Equal(IoStatus.Ok, await device.FlushAsync());
        var flushes = Enumerable.Range(0, 16).Select(_ => device.FlushAsync().AsTask()).ToArray();
        Assert.All(await Task.WhenAll(flushes), s => Assert.Equal(IoStatus.Ok, s));
    }

    // ---------------------------------------------------------------- zeroing, deallocation, allocation state

    [Fact]
    public async Task Write_zeroes_with_deallocate_punches_a_hole_and_allocation_reports_it()
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        var data = LuHarness.Pattern(64 * 1024, 6);
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(0, new ReadOnlySequence<byte>(data), WriteFlags.None));

        Assert.Equal(IoStatus.Ok, await device.WriteZeroesAsync(16 * 1024, 16 * 1024, deallocate: true, WriteFlags.None));

        var read = new byte[64 * 1024];
        Assert.Equal(IoStatus.Ok, await device.ReadAsync(0, read));
        Assert.Equal(data[..(16 * 1024)], read[..(16 * 1024)]);
        Assert.All(read[(16 * 1024)..(32 * 1024)], b => Assert.Equal(0, b));
        Assert.Equal(data[(32 * 1024)..], read[(32 * 1024)..]);

        Assert.Equal((IoStatus.Ok, new AllocationExtent(0, 16 * 1024, true)), await device.GetAllocationAsync(0));
        Assert.Equal((IoStatus.Ok, new AllocationExtent(16 * 1024, 16 * 1024, false)), await device.GetAllocationAsync(16 * 1024));
        Assert.Equal((IoStatus.Ok, new AllocationExtent(32 * 1024, 32 * 1024, true)), await device.GetAllocationAsync(32 * 1024));
        Assert.Equal((IoStatus.Ok, new AllocationExtent(64 * 1024, Size - 64 * 1024, false)), await device.GetAllocationAsync(64 * 1024));
    }

    [Fact]
    public async Task Allocation_extents_start_exactly_at_the_requested_offset()
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(0, new ReadOnlySequence<byte>(LuHarness.Pattern(64 * 1024, 7)), WriteFlags.None));
        Assert.Equal(IoStatus.Ok, await device.WriteZeroesAsync(16 * 1024, 16 * 1024, deallocate: true, WriteFlags.None));

        // Inside a mapped run, inside a hole, and inside the unwritten tail: each extent begins at the offset asked for.
        Assert.Equal((IoStatus.Ok, new AllocationExtent(512, 16 * 1024 - 512, true)), await device.GetAllocationAsync(512));
        Assert.Equal((IoStatus.Ok, new AllocationExtent(16 * 1024 + 512, 16 * 1024 - 512, false)), await device.GetAllocationAsync(16 * 1024 + 512));
        Assert.Equal((IoStatus.Ok, new AllocationExtent(40 * 1024 + 1536, 24 * 1024 - 1536, true)), await device.GetAllocationAsync(40 * 1024 + 1536));
        Assert.Equal((IoStatus.Ok, new AllocationExtent(Size - 512, 512, false)), await device.GetAllocationAsync(Size - 512));
    }

    [Fact]
    public async Task Allocation_query_past_the_end_is_out_of_range()
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        Assert.Equal(IoStatus.OutOfRange, (await device.GetAllocationAsync(Size)).Status);
        Assert.Equal(IoStatus.OutOfRange, (await device.GetAllocationAsync(-512)).Status);
    }

    [Fact]
    public async Task Write_zeroes_without_deallocate_leaves_the_range_mapped()
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(0, new ReadOnlySequence<byte>(LuHarness.Pattern(32 * 1024, 8)), WriteFlags.None));
        Assert.Equal(IoStatus.Ok, await device.WriteZeroesAsync(8 * 1024, 8 * 1024, deallocate: false, WriteFlags.None));
        var read = new byte[8 * 1024];
        Assert.Equal(IoStatus.Ok, await device.ReadAsync(8 * 1024, read));
        Assert.All(read, b => Assert.Equal(0, b));
        Assert.Equal((IoStatus.Ok, new AllocationExtent(0, 32 * 1024, true)), await device.GetAllocationAsync(0));
    }

    [Fact]
    public async Task Deallocating_a_partial_granule_still_reads_zeros_there()
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        var data = LuHarness.Pattern(8192, 10);
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(0, new ReadOnlySequence<byte>(data), WriteFlags.None));
        Assert.Equal(IoStatus.Ok, await device.WriteZeroesAsync(1024, 1024, deallocate: true, WriteFlags.None));
        var read = new byte[8192];
        Assert.Equal(IoStatus.Ok, await device.ReadAsync(0, read));
        Assert.Equal(data[..1024], read[..1024]);
        Assert.All(read[1024..2048], b => Assert.Equal(0, b));
        Assert.Equal(data[2048..], read[2048..]);
    }

    [Fact]
    public async Task Large_write_zeroes_beyond_the_inline_buffer_zeroes_everything()
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        var data = LuHarness.Pattern(3 << 20, 11);
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(0, new ReadOnlySequence<byte>(data), WriteFlags.None));
        Assert.Equal(IoStatus.Ok, await device.WriteZeroesAsync(512, (3 << 20) - 1024, deallocate: false, WriteFlags.ForceUnitAccess));
        var read = new byte[3 << 20];
        Assert.Equal(IoStatus.Ok, await device.ReadAsync(0, read));
        Assert.Equal(data[..512], read[..512]);
        Assert.DoesNotContain(read[512..^512], b => b != 0);
        Assert.Equal(data[^512..], read[^512..]);
    }

    [Fact]
    public async Task Allocated_bytes_grow_with_writes_and_shrink_with_deallocation()
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        Assert.Equal(0, device.AllocatedBytes);
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(0, new ReadOnlySequence<byte>(LuHarness.Pattern(1 << 20, 12)), WriteFlags.None));
        long written = device.AllocatedBytes;
        Assert.True(written >= 1 << 20, $"allocated {written} after writing 1 MiB");
        Assert.True(written < Size, $"allocated {written}: the file is not sparse");

        Assert.Equal(IoStatus.Ok, await device.WriteZeroesAsync(0, 512 * 1024, deallocate: true, WriteFlags.None));
        long punched = device.AllocatedBytes;
        Assert.True(punched <= written - 512 * 1024, $"allocated {punched} after freeing 512 KiB of {written}");
    }

    // ---------------------------------------------------------------- grow, read-only, disposal

    [Fact]
    public async Task Grow_extends_the_device_and_the_new_space_reads_zeros()
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        Assert.Equal(IoStatus.Ok, await device.GrowAsync(2 * Size));
        Assert.Equal(2 * Size, device.Length);
        Assert.Equal(2 * Size, new FileInfo(ImagePath()).Length);
        var read = Enumerable.Repeat((byte)1, 4096).ToArray();
        Assert.Equal(IoStatus.Ok, await device.ReadAsync(2 * Size - 4096, read));
        Assert.All(read, b => Assert.Equal(0, b));
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(2 * Size - 512, new ReadOnlySequence<byte>(new byte[512]), WriteFlags.None));
    }

    [Fact]
    public async Task Grow_refuses_to_shrink_or_to_misalign()
    {
        await using var device = FileBlockDevice.Create(ImagePath(), Size);
        Assert.Equal(IoStatus.OutOfRange, await device.GrowAsync(Size - 512));
        Assert.Equal(IoStatus.OutOfRange, await device.GrowAsync(Size + 100));
        Assert.Equal(Size, device.Length);
        Assert.Equal(Size, new FileInfo(ImagePath()).Length);
        Assert.Equal(IoStatus.Ok, await device.GrowAsync(Size));   // same size: nothing to do
    }

    [Fact]
    public async Task A_read_only_device_refuses_every_write()
    {
        var contents = LuHarness.Pattern(64 * 1024, 13);
        File.WriteAllBytes(ImagePath(), contents);
        await using var device = FileBlockDevice.Open(ImagePath(), readOnly: true);
        Assert.True(device.IsReadOnly);
        Assert.True(device.SupportsDeallocation);   // the medium can deallocate; writes are refused separately (below)
        Assert.Equal(0, device.MaxAtomicWriteBytes);
        Assert.Equal(IoStatus.WriteProtected, await device.WriteAsync(0, new ReadOnlySequence<byte>(new byte[512]), WriteFlags.None));
        Assert.Equal(IoStatus.WriteProtected, await device.WriteZeroesAsync(0, 4096, deallocate: true, WriteFlags.None));
        Assert.Equal(IoStatus.WriteProtected, await device.WriteAtomicAsync(0, new byte[512], WriteFlags.None));
        Assert.Equal(IoStatus.WriteProtected, await device.GrowAsync(2 * contents.Length));
        var read = new byte[contents.Length];
        Assert.Equal(IoStatus.Ok, await device.ReadAsync(0, read));
        Assert.Equal(contents, read);
        Assert.Equal(contents, File.ReadAllBytes(ImagePath()));
        Assert.False(File.Exists(ImagePath() + ".atomic"));
    }

    [Fact]
    public async Task A_disposed_device_reports_not_ready()
    {
        var device = FileBlockDevice.Create(ImagePath(), Size);
        await device.DisposeAsync();
        Assert.Equal(IoStatus.NotReady, await device.ReadAsync(0, new byte[512]));
        Assert.Equal(IoStatus.NotReady, await device.WriteAsync(0, new ReadOnlySequence<byte>(new byte[512]), WriteFlags.None));
    }
}
