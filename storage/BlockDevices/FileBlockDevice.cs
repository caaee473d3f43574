using System.Buffers;
using ISCSISnap.Storage.Files;

namespace ISCSISnap.Storage.BlockDevices;

/// <summary>
/// A block device over a (sparse) raw image file: the LBA is the file offset. FUA and flushes share a
/// group-committed fdatasync; deallocation punches holes; allocation state comes from SEEK_DATA/SEEK_HOLE;
/// WRITE ATOMIC goes through a redo journal beside the image.
/// Threading: thread-safe (see <see cref="ImageFile"/>).
/// </summary>
public sealed class FileBlockDevice : IBlockDevice
{
    private const int ZeroInlineLimit = 1 << 20;

    private readonly ImageFile _file;
    private long _length;
    private readonly LazyAtomicJournal _journal;

    private FileBlockDevice(ImageFile file, long length, int logicalBlockSize)
    {
        _file = file;
        _journal = new LazyAtomicJournal(() => AtomicWriteJournal.Open(file.Path, file));
        _length = length;
        LogicalBlockSize = logicalBlockSize;
    }

    public string Path => _file.Path;
    public int LogicalBlockSize { get; }
    public int PhysicalBlockSize => Math.Max(LogicalBlockSize, ImageFile.HoleGranularity);
    public long Length => Volatile.Read(ref _length);
    public bool IsReadOnly => _file.IsReadOnly;
    public long AllocatedBytes => _file.AllocatedBytes;
    public bool SupportsDeallocation => _file.SupportsPunch;
    public int DeallocationGranularity => ImageFile.HoleGranularity;

    /// <summary>Creates a new sparse file of <paramref name="length"/> bytes; refuses to overwrite an existing file.</summary>
    public static FileBlockDevice Create(string path, long length, int logicalBlockSize = 512)
    {
        ValidateGeometry(path, length, logicalBlockSize);
        var file = ImageFile.Create(path, length);
        try
        {
            file.SyncNow();
            Native.LinuxFile.SyncDirectory(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!);
        }
        catch
        {
            file.Dispose();
            throw;
        }
        return new FileBlockDevice(file, length, logicalBlockSize);
    }

    /// <summary>Opens an existing image file. Its length must be a non-zero multiple of the logical block size.</summary>
    public static FileBlockDevice Open(string path, int logicalBlockSize = 512, bool readOnly = false)
    {
        if (logicalBlockSize is not (512 or 4096))
            throw new StorageException(path, $"logical block size {logicalBlockSize} is not 512 or 4096");
        var file = ImageFile.Open(path, readOnly);
        try
        {
            long length = file.Length;
            ValidateGeometry(path, length, logicalBlockSize);
            var device = new FileBlockDevice(file, length, logicalBlockSize);
            // A crash may have left a committed atomic write to finish.
            if (!readOnly && File.Exists(path + ".atomic")) device._journal.OpenNow();
            return device;
        }
        catch
        {
            file.Dispose();
            throw;
        }
    }

    private static void ValidateGeometry(string path, long length, int logicalBlockSize)
    {
        if (logicalBlockSize is not (512 or 4096))
            throw new StorageException(path, $"logical block size {logicalBlockSize} is not 512 or 4096");
        if (length <= 0)
            throw new StorageException(path, "the image is empty");
        if (length % logicalBlockSize != 0)
            throw new StorageException(path, $"length {length} is not a multiple of the {logicalBlockSize}-byte block size");
    }

    public ValueTask<IoStatus> ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default)
    {
        var status = CheckRange(offset, destination.Length);
        return status != IoStatus.Ok ? new(status) : _file.ReadAsync(offset, destination, cancellationToken);
    }

    public ValueTask<IoStatus> WriteAsync(long offset, ReadOnlySequence<byte> data, WriteFlags flags, CancellationToken cancellationToken = default)
    {
        var status = CheckWrite(offset, data.Length);
        if (status != IoStatus.Ok) return new(status);
        int errno = _file.Write(offset, data);
        if (errno != 0) return new(ImageFile.MapWriteError(errno));
        return (flags & WriteFlags.ForceUnitAccess) != 0 ? FlushAsync(cancellationToken) : new(IoStatus.Ok);
    }

    public ValueTask<IoStatus> FlushAsync(CancellationToken cancellationToken = default)
    {
        var pending = _file.FlushAsync(cancellationToken);
        if (pending.IsCompletedSuccessfully) return new(ImageFile.MapWriteError(pending.Result));
        return AwaitFlush(pending);

        static async ValueTask<IoStatus> AwaitFlush(ValueTask<int> pending) => ImageFile.MapWriteError(await pending.ConfigureAwait(false));
    }

    public ValueTask<IoStatus> WriteZeroesAsync(long offset, long length, bool deallocate, WriteFlags flags, CancellationToken cancellationToken = default)
    {
        var status = CheckWrite(offset, length);
        if (status != IoStatus.Ok) return new(status);
        if (length == 0) return new(IoStatus.Ok);
        if (length > ZeroInlineLimit) return WriteZeroesOffloadedAsync(offset, length, deallocate, flags, cancellationToken);
        status = ImageFile.MapWriteError(_file.WriteZeroes(offset, length, deallocate));
        if (status != IoStatus.Ok) return new(status);
        return (flags & WriteFlags.ForceUnitAccess) != 0 ? FlushAsync(cancellationToken) : new(IoStatus.Ok);
    }

    private async ValueTask<IoStatus> WriteZeroesOffloadedAsync(long offset, long length, bool deallocate, WriteFlags flags, CancellationToken cancellationToken)
    {
        // Large ranges (a whole-disk WRITE SAME, say) run off the caller's I/O thread.
        int errno = await Task.Run(() => _file.WriteZeroes(offset, length, deallocate), cancellationToken).ConfigureAwait(false);
        if (errno != 0) return ImageFile.MapWriteError(errno);
        return (flags & WriteFlags.ForceUnitAccess) != 0 ? await FlushAsync(cancellationToken).ConfigureAwait(false) : IoStatus.Ok;
    }

    public ValueTask<(IoStatus Status, AllocationExtent Extent)> GetAllocationAsync(long offset, CancellationToken cancellationToken = default)
    {
        long length = Length;
        if (offset < 0 || offset >= length || offset % LogicalBlockSize != 0)
            return new((IoStatus.OutOfRange, default));
        var (data, end) = _file.Probe(offset, length, LogicalBlockSize);
        return new((IoStatus.Ok, new AllocationExtent(offset, Math.Max(end, offset + LogicalBlockSize) - offset, data)));
    }

    public int MaxAtomicWriteBytes => IsReadOnly ? 0 : AtomicWriteJournal.MaxDataBytes;

    public ValueTask<IoStatus> WriteAtomicAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken = default)
    {
        var status = CheckWrite(offset, data.Length);
        if (status != IoStatus.Ok) return new(status);
        if (data.Length > MaxAtomicWriteBytes) return new(IoStatus.OutOfRange);
        if (data.IsEmpty) return new(IoStatus.Ok);
        return _journal.WriteAsync(offset, data, cancellationToken);
    }

    public ValueTask<IoStatus> GrowAsync(long newLength, CancellationToken cancellationToken = default)
    {
        if (IsReadOnly) return new(IoStatus.WriteProtected);
        if (newLength < Length || newLength % LogicalBlockSize != 0) return new(IoStatus.OutOfRange);
        int errno = _file.SetLength(newLength);
        if (errno != 0) return new(ImageFile.MapWriteError(errno));
        _file.SyncNow();
        Volatile.Write(ref _length, newLength);
        return new(IoStatus.Ok);
    }

    private IoStatus CheckRange(long offset, long count)
    {
        if (((offset | count) & (LogicalBlockSize - 1)) != 0) return IoStatus.Misaligned;
        if (offset < 0 || count < 0 || offset > Length - count) return IoStatus.OutOfRange;
        return IoStatus.Ok;
    }

    private IoStatus CheckWrite(long offset, long count)
    {
        if (IsReadOnly) return IoStatus.WriteProtected;
        if (_file.FailedSyncErrno != 0) return IoStatus.WriteError;   // a failed sync may have lost data: fail stop
        return CheckRange(offset, count);
    }

    public ValueTask DisposeAsync()
    {
        _journal.Dispose();
        _file.Dispose();
        return ValueTask.CompletedTask;
    }
}
