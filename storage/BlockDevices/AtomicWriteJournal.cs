using System.Buffers.Binary;
using ISCSISnap.Storage.Files;
using ISCSISnap.Storage.Integrity;

namespace ISCSISnap.Storage.BlockDevices;

/// <summary>
/// A one-record redo journal beside a device that makes a bounded write all-or-nothing across crashes:
/// the record (header, data, checksums) is made durable, then the data is written in place durably (through
/// the device's own write path, so a chain maps it like any other write), then the record is invalidated
/// durably. Opening replays a valid record left by a crash.
/// Threading: one atomic write at a time (an internal semaphore).
/// </summary>
internal sealed class AtomicWriteJournal : IDisposable
{
    public const int MaxDataBytes = 1 << 20;
    private const int HeaderSize = 4096;
    private static ReadOnlySpan<byte> Magic => "ISNPAJ01"u8;

    private readonly ImageFile _journal;
    private readonly Func<long, ReadOnlyMemory<byte>, ValueTask<IoStatus>> _applyDurably;
    private readonly SemaphoreSlim _one = new(1, 1);
    private readonly byte[] _record = GC.AllocateUninitializedArray<byte>(HeaderSize + MaxDataBytes, pinned: true);
    private ulong _sequence;

    private AtomicWriteJournal(ImageFile journal, Func<long, ReadOnlyMemory<byte>, ValueTask<IoStatus>> applyDurably)
    {
        _journal = journal;
        _applyDurably = applyDurably;
    }

    public string Path => _journal.Path;

    /// <summary>Opens (creating if needed) the journal of an image file and replays a committed record into it.</summary>
    public static AtomicWriteJournal Open(string imagePath, ImageFile image) =>
        Open(imagePath + ".atomic", (offset, data) =>
        {
            int errno = image.Write(offset, data.Span);
            if (errno == 0) errno = image.SyncDataNow();
            return new(ImageFile.MapWriteError(errno));
        });

    /// <summary>
    /// Opens (creating if needed) the journal at <paramref name="path"/> and replays a committed record through
    /// <paramref name="applyDurably"/>, which must write the data and make it durable before completing.
    /// </summary>
    public static AtomicWriteJournal Open(string path, Func<long, ReadOnlyMemory<byte>, ValueTask<IoStatus>> applyDurably)
    {
        var file = File.Exists(path) ? ImageFile.Open(path, readOnly: false) : ImageFile.Create(path, 0);
        var journal = new AtomicWriteJournal(file, applyDurably);
        try
        {
            journal.Replay();
        }
        catch
        {
            journal.Dispose();
            throw;
        }
        return journal;
    }

    private void Replay()
    {
        var header = new byte[HeaderSize];
        if (_journal.Length < HeaderSize || _journal.ReadExact(0, header) != IoStatus.Ok || !header.AsSpan(0, 8).SequenceEqual(Magic)) return;
        uint headerCrc = BinaryPrimitives.ReadUInt32LittleEndian(header.AsSpan(36));
        if (Crc32C.Compute(header.AsSpan(0, 36)) != headerCrc) return;   // torn header: never committed
        _sequence = BinaryPrimitives.ReadUInt64LittleEndian(header.AsSpan(8));
        long offset = BinaryPrimitives.ReadInt64LittleEndian(header.AsSpan(16));
        int length = BinaryPrimitives.ReadInt32LittleEndian(header.AsSpan(24));
        uint dataCrc = BinaryPrimitives.ReadUInt32LittleEndian(header.AsSpan(28));
        if (length <= 0 || length > MaxDataBytes || offset < 0)
            throw new StorageException(Path, "atomic-write journal header is inconsistent");
        var data = new byte[length];
        if (_journal.Length < HeaderSize + length || _journal.ReadExact(HeaderSize, data) != IoStatus.Ok || Crc32C.Compute(data) != dataCrc)
            return;   // the record was never fully committed: the in-place data was not touched
        var applied = _applyDurably(offset, data).AsTask().GetAwaiter().GetResult();
        if (applied != IoStatus.Ok) throw new StorageException(Path, $"replaying the atomic-write journal failed ({applied})");
        int errno = Invalidate();
        if (errno != 0) throw new StorageException(Path, $"retiring the atomic-write journal failed (errno {errno})");
    }

    public async ValueTask<IoStatus> WriteAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        if (data.Length > MaxDataBytes) return IoStatus.OutOfRange;
        await _one.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            // The record is written and synced off the caller's I/O thread.
            int errno = await Task.Run(() => Record(offset, data), CancellationToken.None).ConfigureAwait(false);
            if (errno != 0) return ImageFile.MapWriteError(errno);
            var status = await _applyDurably(offset, data).ConfigureAwait(false);
            if (status != IoStatus.Ok) return status;
            // the record retired, durable (a stale record must never be replayed over later writes)
            return ImageFile.MapWriteError(await Task.Run(Invalidate, CancellationToken.None).ConfigureAwait(false));
        }
        finally
        {
            _one.Release();
        }
    }

    private int Record(long offset, ReadOnlyMemory<byte> data)
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

        // the redo record, durable, before the data is touched in place
        int errno = _journal.Write(0, record);
        return errno == 0 ? _journal.SyncDataNow() : errno;
    }

    private int Invalidate()
    {
        int errno = _journal.Write(0, new byte[64]);
        return errno != 0 ? errno : _journal.SyncDataNow();
    }

    public void Dispose()
    {
        _journal.Dispose();
        _one.Dispose();
    }
}

/// <summary>
/// A device's atomic-write journal, opened at the first atomic write (most devices never see one) or at open when
/// a crash left one to finish. Threading: thread-safe.
/// </summary>
internal sealed class LazyAtomicJournal(Func<AtomicWriteJournal> open) : IDisposable
{
    private readonly object _lock = new();
    private AtomicWriteJournal? _journal;

    /// <summary>Opens the journal now: one a crash left behind is applied before the device serves IO.</summary>
    public void OpenNow()
    {
        lock (_lock) _journal ??= open();
    }

    public ValueTask<IoStatus> WriteAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        AtomicWriteJournal journal;
        lock (_lock)
        {
            try
            {
                journal = _journal ??= open();
            }
            catch (Exception e) when (e is IOException or StorageException or UnauthorizedAccessException)
            {
                return new(IoStatus.WriteError);
            }
        }
        return journal.WriteAsync(offset, data, cancellationToken);
    }

    public void Dispose()
    {
        lock (_lock) _journal?.Dispose();
    }
}
