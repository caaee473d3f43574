using System.Buffers;
using System.Runtime.InteropServices;
using ISCSISnap.Storage.Native;
using Microsoft.Win32.SafeHandles;

namespace ISCSISnap.Storage.BlockDevices;

/// <summary>
/// A block device backed by a (sparse) regular file on Linux. Reads that the page cache can serve complete
/// inline (preadv2 with RWF_NOWAIT) and the rest go to the thread pool; buffered writes are inline gather
/// writes; FUA and flushes share a group-committed fdatasync; deallocation punches holes.
/// Threading: thread-safe; the file handle is reference-counted per operation, so disposal never lets an
/// operation touch a reused descriptor.
/// </summary>
public sealed class FileBlockDevice : IBlockDevice
{
    private const int HoleGranularity = 4096;
    private static readonly byte[] s_zeros = GC.AllocateArray<byte>(1 << 20, pinned: true);

    private readonly SafeFileHandle _handle;
    private readonly int _fd;
    private readonly FlushCoalescer _flush;
    private long _length;
    private volatile bool _noWaitReads = true;
    private volatile bool _punchSupported = true;
    private AtomicWriteJournal? _journal;
    private readonly object _journalLock = new();

    private FileBlockDevice(string path, SafeFileHandle handle, long length, int logicalBlockSize, bool readOnly)
    {
        Path = path;
        _handle = handle;
        _fd = (int)handle.DangerousGetHandle();
        _length = length;
        LogicalBlockSize = logicalBlockSize;
        IsReadOnly = readOnly;
        _flush = new FlushCoalescer(SyncData);
    }

    public string Path { get; }
    public int LogicalBlockSize { get; }
    public int PhysicalBlockSize => Math.Max(LogicalBlockSize, HoleGranularity);
    public long Length => Volatile.Read(ref _length);
    public bool IsReadOnly { get; }

    public long AllocatedBytes
    {
        get
        {
            if (!Enter()) return -1;
            try { return LinuxFile.AllocatedBytes(_fd); }
            finally { Exit(); }
        }
    }

    public bool SupportsDeallocation => _punchSupported;
    public int DeallocationGranularity => HoleGranularity;

    /// <summary>Creates a new sparse file of <paramref name="length"/> bytes; refuses to overwrite an existing file.</summary>
    public static FileBlockDevice Create(string path, long length, int logicalBlockSize = 512)
    {
        ValidateGeometry(path, length, logicalBlockSize);
        SafeFileHandle handle;
        try
        {
            handle = File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.Read);
        }
        catch (IOException e)
        {
            throw new StorageException(path, File.Exists(path) ? "file already exists" : e.Message, e);
        }
        catch (UnauthorizedAccessException e)
        {
            throw new StorageException(path, "permission denied", e);
        }
        try
        {
            if (LinuxFile.FTruncate((int)handle.DangerousGetHandle(), length) != 0)
                throw new StorageException(path, $"cannot size the file to {length} bytes (errno {Marshal.GetLastPInvokeError()})");
            LinuxFile.FSync((int)handle.DangerousGetHandle());
            LinuxFile.SyncDirectory(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
        return new FileBlockDevice(path, handle, length, logicalBlockSize, readOnly: false);
    }

    /// <summary>Opens an existing image file. Its length must be a non-zero multiple of the logical block size.</summary>
    public static FileBlockDevice Open(string path, int logicalBlockSize = 512, bool readOnly = false)
    {
        if (logicalBlockSize is not (512 or 4096))
            throw new StorageException(path, $"logical block size {logicalBlockSize} is not 512 or 4096");
        SafeFileHandle handle;
        try
        {
            handle = File.OpenHandle(path, FileMode.Open, readOnly ? FileAccess.Read : FileAccess.ReadWrite, FileShare.Read);
        }
        catch (FileNotFoundException e) { throw new StorageException(path, "file not found", e); }
        catch (DirectoryNotFoundException e) { throw new StorageException(path, "directory not found", e); }
        catch (UnauthorizedAccessException e) { throw new StorageException(path, "permission denied", e); }
        catch (IOException e) { throw new StorageException(path, e.Message, e); }
        long length = RandomAccess.GetLength(handle);
        try
        {
            ValidateGeometry(path, length, logicalBlockSize);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
        var device = new FileBlockDevice(path, handle, length, logicalBlockSize, readOnly);
        if (!readOnly && File.Exists(path + ".atomic"))
        {
            try
            {
                // A crash may have left a committed atomic write to finish.
                device._journal = AtomicWriteJournal.Open(path, device._fd);
            }
            catch
            {
                handle.Dispose();
                throw;
            }
        }
        return device;
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
        if (status != IoStatus.Ok) return new(status);
        if (destination.IsEmpty) return new(IoStatus.Ok);
        if (!Enter()) return new(IoStatus.NotReady);
        int done = 0;
        try
        {
            if (_noWaitReads)
            {
                done = VectoredIo.Read(_fd, offset, destination.Span, LinuxFile.RWF_NOWAIT, out int errno);
                if (done == destination.Length) return new(IoStatus.Ok);
                if (errno is not (LinuxFile.EAGAIN or 0))
                {
                    if (errno is LinuxFile.EOPNOTSUPP or 22 /* EINVAL: kernel without RWF_NOWAIT */) _noWaitReads = false;
                    else return new(IoStatus.ReadError);
                }
            }
        }
        finally
        {
            Exit();
        }
        return ReadBlockingAsync(offset + done, destination.Slice(done), cancellationToken);
    }

    private async ValueTask<IoStatus> ReadBlockingAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        if (!Enter()) return IoStatus.NotReady;
        try
        {
            while (!destination.IsEmpty)
            {
                int n = await RandomAccess.ReadAsync(_handle, destination, offset, cancellationToken).ConfigureAwait(false);
                if (n == 0)
                {
                    destination.Span.Clear();
                    break;
                }
                offset += n;
                destination = destination.Slice(n);
            }
            return IoStatus.Ok;
        }
        catch (IOException)
        {
            return IoStatus.ReadError;
        }
        finally
        {
            Exit();
        }
    }

    public ValueTask<IoStatus> WriteAsync(long offset, ReadOnlySequence<byte> data, WriteFlags flags, CancellationToken cancellationToken = default)
    {
        var status = CheckWrite(offset, data.Length);
        if (status != IoStatus.Ok) return new(status);
        if (!Enter()) return new(IoStatus.NotReady);
        int errno;
        try
        {
            errno = VectoredIo.WriteAll(_fd, offset, data, 0);
        }
        finally
        {
            Exit();
        }
        if (errno != 0) return new(MapWriteError(errno));
        return (flags & WriteFlags.ForceUnitAccess) != 0 ? FlushAsync(cancellationToken) : new(IoStatus.Ok);
    }

    public ValueTask<IoStatus> FlushAsync(CancellationToken cancellationToken = default)
    {
        if (IsReadOnly) return new(IoStatus.Ok);
        var pending = _flush.FlushAsync(cancellationToken);
        if (pending.IsCompletedSuccessfully)
            return new(pending.Result == 0 ? IoStatus.Ok : MapWriteError(pending.Result));
        return AwaitFlush(pending);

        static async ValueTask<IoStatus> AwaitFlush(ValueTask<int> pending)
        {
            int errno = await pending.ConfigureAwait(false);
            return errno == 0 ? IoStatus.Ok : MapWriteError(errno);
        }
    }

    private int SyncData()
    {
        if (!Enter()) return LinuxFile.EIO;
        try
        {
            while (true)
            {
                if (LinuxFile.FDataSync(_fd) == 0) return 0;
                int errno = Marshal.GetLastPInvokeError();
                if (errno != LinuxFile.EINTR) return errno;
            }
        }
        finally
        {
            Exit();
        }
    }

    public ValueTask<IoStatus> WriteZeroesAsync(long offset, long length, bool deallocate, WriteFlags flags, CancellationToken cancellationToken = default)
    {
        var status = CheckWrite(offset, length);
        if (status != IoStatus.Ok) return new(status);
        if (length == 0) return new(IoStatus.Ok);
        if (length <= s_zeros.Length)
        {
            status = WriteZeroesInline(offset, length, deallocate);
            if (status != IoStatus.Ok) return new(status);
            return (flags & WriteFlags.ForceUnitAccess) != 0 ? FlushAsync(cancellationToken) : new(IoStatus.Ok);
        }
        return WriteZeroesOffloadedAsync(offset, length, deallocate, flags, cancellationToken);
    }

    private async ValueTask<IoStatus> WriteZeroesOffloadedAsync(long offset, long length, bool deallocate, WriteFlags flags, CancellationToken cancellationToken)
    {
        // Large ranges (a whole-disk WRITE SAME, say) run off the caller's I/O thread.
        var status = await Task.Run(() => WriteZeroesInline(offset, length, deallocate), cancellationToken).ConfigureAwait(false);
        if (status != IoStatus.Ok) return status;
        return (flags & WriteFlags.ForceUnitAccess) != 0 ? await FlushAsync(cancellationToken).ConfigureAwait(false) : IoStatus.Ok;
    }

    private IoStatus WriteZeroesInline(long offset, long length, bool deallocate)
    {
        if (!Enter()) return IoStatus.NotReady;
        try
        {
            if (deallocate && _punchSupported)
            {
                // Punching zeroes partial filesystem blocks and frees whole ones.
                if (LinuxFile.FAllocate(_fd, LinuxFile.FALLOC_FL_PUNCH_HOLE | LinuxFile.FALLOC_FL_KEEP_SIZE, offset, length) == 0)
                    return IoStatus.Ok;
                int errno = Marshal.GetLastPInvokeError();
                if (errno != LinuxFile.EOPNOTSUPP) return MapWriteError(errno);
                _punchSupported = false;
            }
            while (length > 0)
            {
                int chunk = (int)Math.Min(length, s_zeros.Length);
                int errno = VectoredIo.WriteAll(_fd, offset, new ReadOnlyMemory<byte>(s_zeros, 0, chunk), 0);
                if (errno != 0) return MapWriteError(errno);
                offset += chunk;
                length -= chunk;
            }
            return IoStatus.Ok;
        }
        finally
        {
            Exit();
        }
    }

    public ValueTask<(IoStatus Status, AllocationExtent Extent)> GetAllocationAsync(long offset, CancellationToken cancellationToken = default)
    {
        long length = Length;
        if (offset < 0 || offset >= length || offset % LogicalBlockSize != 0)
            return new((IoStatus.OutOfRange, default));
        if (!Enter()) return new((IoStatus.NotReady, default));
        try
        {
            long data = LinuxFile.LSeek(_fd, offset, LinuxFile.SEEK_DATA);
            if (data < 0)
            {
                int errno = Marshal.GetLastPInvokeError();
                if (errno == LinuxFile.ENXIO)   // no data at or after offset: one hole to the end
                    return new((IoStatus.Ok, new AllocationExtent(offset, length - offset, Mapped: false)));
                // No SEEK_DATA support: report everything mapped, which is always truthful.
                return new((IoStatus.Ok, new AllocationExtent(offset, length - offset, Mapped: true)));
            }
            if (data > offset)
            {
                long end = Math.Min(AlignDown(data), length);
                if (end > offset)
                    return new((IoStatus.Ok, new AllocationExtent(offset, end - offset, Mapped: false)));
            }
            long hole = LinuxFile.LSeek(_fd, offset, LinuxFile.SEEK_HOLE);
            if (hole < 0) hole = length;
            long mappedEnd = Math.Min(AlignUp(hole), length);
            if (mappedEnd <= offset) mappedEnd = Math.Min(offset + LogicalBlockSize, length);
            return new((IoStatus.Ok, new AllocationExtent(offset, mappedEnd - offset, Mapped: true)));
        }
        finally
        {
            Exit();
        }
    }

    public int MaxAtomicWriteBytes => IsReadOnly ? 0 : AtomicWriteJournal.MaxDataBytes;

    public async ValueTask<IoStatus> WriteAtomicAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken = default)
    {
        var status = CheckWrite(offset, data.Length);
        if (status != IoStatus.Ok) return status;
        if (data.Length > MaxAtomicWriteBytes) return IoStatus.OutOfRange;
        if (data.IsEmpty) return IoStatus.Ok;
        AtomicWriteJournal journal;
        lock (_journalLock)
        {
            try
            {
                journal = _journal ??= AtomicWriteJournal.Open(Path, _fd);
            }
            catch (Exception e) when (e is IOException or StorageException or UnauthorizedAccessException)
            {
                return IoStatus.WriteError;
            }
        }
        if (!Enter()) return IoStatus.NotReady;
        try
        {
            int errno = await journal.WriteAsync(_fd, offset, data, cancellationToken).ConfigureAwait(false);
            return errno == 0 ? IoStatus.Ok : MapWriteError(errno);
        }
        finally
        {
            Exit();
        }
    }

    public ValueTask<IoStatus> GrowAsync(long newLength, CancellationToken cancellationToken = default)
    {
        if (IsReadOnly) return new(IoStatus.WriteProtected);
        if (newLength < Length || newLength % LogicalBlockSize != 0) return new(IoStatus.OutOfRange);
        if (!Enter()) return new(IoStatus.NotReady);
        try
        {
            if (LinuxFile.FTruncate(_fd, newLength) != 0) return MapWriteErrorValue(Marshal.GetLastPInvokeError());
            LinuxFile.FSync(_fd);
            Volatile.Write(ref _length, newLength);
            return new(IoStatus.Ok);
        }
        finally
        {
            Exit();
        }

        static ValueTask<IoStatus> MapWriteErrorValue(int errno) => new(MapWriteError(errno));
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
        if (_flush.FailedErrno != 0) return IoStatus.WriteError;   // a failed sync may have lost data: fail stop
        return CheckRange(offset, count);
    }

    private static IoStatus MapWriteError(int errno) => errno switch
    {
        LinuxFile.ENOSPC or 122 /* EDQUOT */ => IoStatus.NoSpace,
        LinuxFile.EROFS => IoStatus.WriteProtected,
        _ => IoStatus.WriteError,
    };

    private long AlignDown(long value) => value - value % LogicalBlockSize;
    private long AlignUp(long value) => AlignDown(value + LogicalBlockSize - 1);

    private bool Enter()
    {
        bool added = false;
        try
        {
            _handle.DangerousAddRef(ref added);
        }
        catch (ObjectDisposedException)
        {
            return false;
        }
        return added;
    }

    private void Exit() => _handle.DangerousRelease();

    public ValueTask DisposeAsync()
    {
        _journal?.Dispose();
        _handle.Dispose();
        return ValueTask.CompletedTask;
    }
}
