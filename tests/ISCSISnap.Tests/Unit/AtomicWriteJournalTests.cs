using System.Buffers;
using System.Buffers.Binary;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Integrity;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary>
/// The atomic-write journal through <see cref="FileBlockDevice.WriteAtomicAsync"/> and crash recovery in
/// <see cref="FileBlockDevice.Open"/>. Crashes are simulated by writing the journal record file by hand in the
/// format documented in storage/BlockDevices/AtomicWriteJournal.cs: a 4096-byte header ("ISNPAJ01", u64 sequence
/// at 8, i64 offset at 16, i32 length at 24, u32 data CRC-32C at 28, u32 CRC-32C of bytes 0-35 at 36, all little
/// endian) followed by the data.
/// </summary>
public sealed class AtomicWriteJournalTests : IDisposable
{
    private const long Size = 1L << 20;
    private const int HeaderSize = 4096;
    private readonly TempDirectory _directory = new();

    private string ImagePath => Path.Combine(_directory.Path, "disk.img");
    private string JournalPath => ImagePath + ".atomic";

    public void Dispose() => _directory.Dispose();

    [Fact]
    public async Task An_atomic_write_lands_and_leaves_no_committed_record()
    {
        await using (var device = FileBlockDevice.Create(ImagePath, Size))
        {
            Assert.Equal(1 << 20, device.MaxAtomicWriteBytes);
            var data = LuHarness.Pattern(8192, 1);
            Assert.Equal(IoStatus.Ok, await device.WriteAtomicAsync(4096, data, WriteFlags.None));
            var read = new byte[8192];
            Assert.Equal(IoStatus.Ok, await device.ReadAsync(4096, read));
            Assert.Equal(data, read);
            Assert.Equal(IoStatus.Ok, await device.WriteAtomicAsync(4096, LuHarness.Pattern(512, 2), WriteFlags.ForceUnitAccess));
        }
        Assert.True(File.Exists(JournalPath));
        Assert.False(HasMagic(File.ReadAllBytes(JournalPath)), "the record was not retired after the write completed");
    }

    [Fact]
    public async Task An_atomic_write_larger_than_the_journal_is_refused()
    {
        await using var device = FileBlockDevice.Create(ImagePath, 4L << 20);
        Assert.Equal(IoStatus.OutOfRange, await device.WriteAtomicAsync(0, new byte[(1 << 20) + 512], WriteFlags.None));
    }

    [Fact]
    public async Task A_committed_record_left_by_a_crash_is_replayed_on_open_and_then_retired()
    {
        var old = LuHarness.Pattern((int)Size, 3);
        File.WriteAllBytes(ImagePath, old);
        var data = LuHarness.Pattern(12 * 1024, 4);
        File.WriteAllBytes(JournalPath, Record(sequence: 7, offset: 64 * 1024, data));

        await using (var device = FileBlockDevice.Open(ImagePath))
        {
            var read = new byte[Size];
            Assert.Equal(IoStatus.Ok, await device.ReadAsync(0, read));
            Assert.Equal(old[..(64 * 1024)], read[..(64 * 1024)]);
            Assert.Equal(data, read[(64 * 1024)..(76 * 1024)]);
            Assert.Equal(old[(76 * 1024)..], read[(76 * 1024)..]);
        }
        Assert.False(HasMagic(File.ReadAllBytes(JournalPath)), "the replayed record was not invalidated");

        // A later ordinary write must survive the next open: the retired record is never replayed again.
        var later = LuHarness.Pattern(12 * 1024, 5);
        await using (var device = FileBlockDevice.Open(ImagePath))
            Assert.Equal(IoStatus.Ok, await device.WriteAsync(64 * 1024, new ReadOnlySequence<byte>(later), WriteFlags.ForceUnitAccess));
        await using (var device = FileBlockDevice.Open(ImagePath))
        {
            var read = new byte[later.Length];
            Assert.Equal(IoStatus.Ok, await device.ReadAsync(64 * 1024, read));
            Assert.Equal(later, read);
        }
    }

    [Fact]
    public async Task A_torn_record_with_a_bad_data_crc_is_not_replayed()
    {
        var old = LuHarness.Pattern((int)Size, 6);
        File.WriteAllBytes(ImagePath, old);
        var record = Record(sequence: 1, offset: 8192, LuHarness.Pattern(4096, 7));
        record[HeaderSize + 100] ^= 0xFF;   // the data did not fully reach the journal
        File.WriteAllBytes(JournalPath, record);

        await using (var device = FileBlockDevice.Open(ImagePath))
        {
            var read = new byte[Size];
            Assert.Equal(IoStatus.Ok, await device.ReadAsync(0, read));
            Assert.Equal(old, read);
        }
        Assert.Equal(old, File.ReadAllBytes(ImagePath));
    }

    [Fact]
    public async Task A_record_with_missing_data_is_not_replayed()
    {
        var old = LuHarness.Pattern((int)Size, 8);
        File.WriteAllBytes(ImagePath, old);
        var record = Record(sequence: 1, offset: 8192, LuHarness.Pattern(8192, 9));
        File.WriteAllBytes(JournalPath, record[..(HeaderSize + 4096)]);   // crash half-way through the record

        await using (var device = FileBlockDevice.Open(ImagePath)) { }
        Assert.Equal(old, File.ReadAllBytes(ImagePath));
    }

    [Fact]
    public async Task A_record_with_a_bad_header_crc_is_not_replayed()
    {
        var old = LuHarness.Pattern((int)Size, 10);
        File.WriteAllBytes(ImagePath, old);
        var record = Record(sequence: 1, offset: 8192, LuHarness.Pattern(4096, 11));
        record[16] ^= 0x01;   // the offset changed after the header CRC was computed
        File.WriteAllBytes(JournalPath, record);

        await using (var device = FileBlockDevice.Open(ImagePath)) { }
        Assert.Equal(old, File.ReadAllBytes(ImagePath));
    }

    [Fact]
    public void A_record_whose_checked_header_is_inconsistent_fails_the_open_naming_the_journal()
    {
        File.WriteAllBytes(ImagePath, new byte[Size]);
        var record = Record(sequence: 1, offset: 0, new byte[512]);
        BinaryPrimitives.WriteInt32LittleEndian(record.AsSpan(24), (1 << 20) + 1);   // longer than any record can be
        BinaryPrimitives.WriteUInt32LittleEndian(record.AsSpan(36), Crc32C.Compute(record.AsSpan(0, 36)));
        File.WriteAllBytes(JournalPath, record);

        var e = Assert.Throws<StorageException>(() => FileBlockDevice.Open(ImagePath));
        Assert.Equal(JournalPath, e.Path);
    }

    [Fact]
    public async Task A_read_only_open_never_touches_the_image_or_the_journal()
    {
        var old = LuHarness.Pattern((int)Size, 12);
        File.WriteAllBytes(ImagePath, old);
        var record = Record(sequence: 1, offset: 0, LuHarness.Pattern(4096, 13));
        File.WriteAllBytes(JournalPath, record);

        await using (var device = FileBlockDevice.Open(ImagePath, readOnly: true)) { }
        Assert.Equal(old, File.ReadAllBytes(ImagePath));
        Assert.Equal(record, File.ReadAllBytes(JournalPath));
    }

    /// <summary>A committed journal record exactly as AtomicWriteJournal.Commit lays it out.</summary>
    private static byte[] Record(ulong sequence, long offset, byte[] data)
    {
        var record = new byte[HeaderSize + data.Length];
        "ISNPAJ01"u8.CopyTo(record);
        BinaryPrimitives.WriteUInt64LittleEndian(record.AsSpan(8), sequence);
        BinaryPrimitives.WriteInt64LittleEndian(record.AsSpan(16), offset);
        BinaryPrimitives.WriteInt32LittleEndian(record.AsSpan(24), data.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(record.AsSpan(28), Crc32C.Compute(data));
        BinaryPrimitives.WriteUInt32LittleEndian(record.AsSpan(36), Crc32C.Compute(record.AsSpan(0, 36)));
        data.CopyTo(record, HeaderSize);
        return record;
    }

    private static bool HasMagic(byte[] journal) => journal.Length >= 8 && journal.AsSpan(0, 8).SequenceEqual("ISNPAJ01"u8);
}
