using System.Buffers.Binary;
using ISCSISnap.Storage.Integrity;
using System.Runtime.InteropServices;
using ISCSISnap.Storage.Native;
using Microsoft.Win32.SafeHandles;

namespace ISCSISnap.Storage.BlockDevices;

/// <summary>
/// A one-record redo journal beside an image that makes a bounded write all-or-nothing across crashes:
/// the record (header, data, checksums) is made durable, then the data is written in place and made durable,
/// then the record is invalidated durably. Opening replays a valid record left by a crash.
/// Threading: one atomic write at a time (an internal semaphore).
/// </summary>
internal sealed class AtomicWriteJournal : IDisposable
{
    public const int MaxDataBytes = 1 << 20;
    private const int HeaderSize = 4096;
    private static ReadOnlySpan<byte> Magic => "ISNPAJ01"u8;

    private readonly SafeFileHandle _journal;
    private readonly int _journalFd;
    private readonly SemaphoreSlim _one = new(1, 1);
    private readonly byte[] _record = GC.AllocateUninitializedArray<byte>(HeaderSize + MaxDataBytes, pinned: true);
    private ulong _sequence;

    private AtomicWriteJournal(string path, SafeFileHandle journal)
    {
        Path = path;
        _journal = journal;
        _journalFd = (int)journal.DangerousGetHandle();
    }

    public string Path { get; }

    /// <summary>Opens (creating if needed) the journal of an image and replays a committed record into it.</summary>
    public static AtomicWriteJournal Open(string imagePath, int imageFd)
    {
        string path = imagePath + ".atomic";
        var handle = File.OpenHandle(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.Read);
        var journal = new AtomicWriteJournal(path, handle);
        try
        {
            journal.Replay(imageFd);
        }
        catch
        {
            journal.Dispose();
            throw;
        }
        return journal;
    }

    private void Replay(int imageFd)
    {
        var header = new byte[HeaderSize];
        int read = RandomAccess.Read(_journal, header, 0);
        if (read < HeaderSize || !header.AsSpan(0, 8).SequenceEqual(Magic)) return;
        uint headerCrc = BinaryPrimitives.ReadUInt32LittleEndian(header.AsSpan(36));
        if (Crc32C.Compute(header.AsSpan(0, 36)) != headerCrc) return;   // torn header: never committed
        _sequence = BinaryPrimitives.ReadUInt64LittleEndian(header.AsSpan(8));
        long offset = BinaryPrimitives.ReadInt64LittleEndian(header.AsSpan(16));
        int length = BinaryPrimitives.ReadInt32LittleEndian(header.AsSpan(24));
        uint dataCrc = BinaryPrimitives.ReadUInt32LittleEndian(header.AsSpan(28));
        if (length <= 0 || length > MaxDataBytes || offset < 0)
            throw new StorageException(Path, "atomic-write journal header is inconsistent");
        var data = new byte[length];
        if (RandomAccess.Read(_journal, data, HeaderSize) != length || Crc32C.Compute(data) != dataCrc)
            return;   // the record was never fully committed: the in-place data was not touched
        int errno = VectoredIo.WriteAll(imageFd, offset, data, 0);
        if (errno != 0 || LinuxFile.FDataSync(imageFd) != 0)
            throw new StorageException(Path, $"replaying the atomic-write journal failed (errno {(errno != 0 ? errno : Marshal.GetLastPInvokeError())})");
        Invalidate();
    }

    public async ValueTask<int> WriteAsync(int imageFd, long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        if (data.Length > MaxDataBytes) return LinuxFile.EIO;
        await _one.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            return await Task.Run(() => Commit(imageFd, offset, data), CancellationToken.None).ConfigureAwait(false);
        }
        finally
        {
            _one.Release();
        }
    }

    private int Commit(int imageFd, long offset, ReadOnlyMemory<byte> data)
    {
        var record = _record.AsSpan(0, HeaderSize + data.Length);
        record.Slice(0, HeaderSize).Clear();
        Magic.CopyTo(record);
        BinaryPrimitives.WriteUInt64LittleEndian(record.Slice(8), ++_sequence);
        BinaryPrimitives.WriteInt64LittleEndian(record.Slice(16), offset);
        BinaryPrimitives.WriteInt32LittleEndian(record.Slice(24), data.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(record.Slice(28), Crc32C.Compute(data.Span));
        BinaryPrimitives.WriteUInt32LittleEndian(record.Slice(36), Crc32C.Compute(record.Slice(0, 36)));
        data.Span.CopyTo(record.Slice(HeaderSize));

        // 1. the redo record, durable
        int errno = VectoredIo.WriteAll(_journalFd, 0, new ReadOnlyMemory<byte>(_record, 0, record.Length), 0);
        if (errno != 0) return errno;
        if (LinuxFile.FDataSync(_journalFd) != 0) return Marshal.GetLastPInvokeError();
        // 2. the data in place, durable
        errno = VectoredIo.WriteAll(imageFd, offset, data, 0);
        if (errno != 0) return errno;
        if (LinuxFile.FDataSync(imageFd) != 0) return Marshal.GetLastPInvokeError();
        // 3. the record retired, durable (a stale record must never be replayed over later writes)
        return Invalidate();
    }

    private int Invalidate()
    {
        var zeros = new byte[64];
        int errno = VectoredIo.WriteAll(_journalFd, 0, zeros, 0);
        if (errno != 0) return errno;
        return LinuxFile.FDataSync(_journalFd) == 0 ? 0 : Marshal.GetLastPInvokeError();
    }

    public void Dispose()
    {
        _journal.Dispose();
        _one.Dispose();
    }
}
