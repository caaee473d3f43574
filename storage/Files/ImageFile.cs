using System.Buffers;
using System.Runtime.InteropServices;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Native;
using Microsoft.Win32.SafeHandles;

namespace ISCSISnap.Storage.Files;

/// <summary>
/// An open image file on Linux with the I/O the appliance's devices and chain layers share: reads that the page
/// cache can serve complete inline (preadv2 RWF_NOWAIT) and the rest go to the thread pool; gather writes at
/// explicit offsets; hole punching; SEEK_DATA/SEEK_HOLE; a group-committed fdatasync that fails stop after an
/// error. Threading: thread-safe; the handle is reference-counted per call, so closing never lets a call touch a
/// reused descriptor.
/// </summary>
public sealed class ImageFile : IDisposable
{
    public const int HoleGranularity = 4096;
    private static readonly byte[] s_zeros = GC.AllocateArray<byte>(1 << 20, pinned: true);

    private readonly SafeFileHandle _handle;
    private readonly int _fd;
    private readonly FlushCoalescer _flush;
    private volatile bool _noWaitReads = true;
    private volatile bool _punchSupported = true;

    private ImageFile(string path, SafeFileHandle handle, bool readOnly)
    {
        Path = path;
        _handle = handle;
        _fd = (int)handle.DangerousGetHandle();
        IsReadOnly = readOnly;
        _flush = new FlushCoalescer(SyncData);
    }

    public string Path { get; }
    public bool IsReadOnly { get; }
    public bool SupportsPunch => _punchSupported;
    /// <summary>0 until a data sync failed; then the errno, forever (the kernel reports a writeback error once).</summary>
    public int FailedSyncErrno => _flush.FailedErrno;

    /// <summary>Opens an existing file; the message of a <see cref="StorageException"/> names the file and the fault.</summary>
    public static ImageFile Open(string path, bool readOnly)
    {
        try
        {
            var handle = File.OpenHandle(path, FileMode.Open, readOnly ? FileAccess.Read : FileAccess.ReadWrite, FileShare.Read);
            return new ImageFile(path, handle, readOnly);
        }
        catch (FileNotFoundException e) { throw new StorageException(path, "file not found", e); }
        catch (DirectoryNotFoundException e) { throw new StorageException(path, "directory not found", e); }
        catch (UnauthorizedAccessException e) { throw new StorageException(path, "permission denied", e); }
        catch (IOException e) { throw new StorageException(path, e.Message, e); }
    }

    /// <summary>Creates a new file of <paramref name="length"/> bytes (sparse); refuses to overwrite an existing one.</summary>
    public static ImageFile Create(string path, long length)
    {
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
        var file = new ImageFile(path, handle, readOnly: false);
        if (length > 0 && file.SetLength(length) is var errno and not 0)
        {
            file.Dispose();
            throw new StorageException(path, $"cannot size the file to {length} bytes (errno {errno})");
        }
        return file;
    }

    public long Length => RandomAccess.GetLength(_handle);

    public long AllocatedBytes
    {
        get
        {
            if (!Enter()) return -1;
            try { return LinuxFile.AllocatedBytes(_fd); }
            finally { Exit(); }
        }
    }

    // ---------------------------------------------------------------- reads

    /// <summary>Fills <paramref name="destination"/> from <paramref name="offset"/>; bytes past end of file read as zeros.</summary>
    public ValueTask<IoStatus> ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default)
    {
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

    /// <summary>Synchronous read for metadata (headers, tables): all bytes or an error.</summary>
    public IoStatus ReadExact(long offset, Span<byte> destination)
    {
        if (!Enter()) return IoStatus.NotReady;
        try
        {
            int done = VectoredIo.Read(_fd, offset, destination, 0, out int errno);
            return done == destination.Length ? IoStatus.Ok : errno != 0 ? IoStatus.ReadError : IoStatus.Ok;
        }
        finally
        {
            Exit();
        }
    }

    // ---------------------------------------------------------------- writes

    /// <summary>Writes the (possibly multi-segment) data at <paramref name="offset"/>; 0 or an errno.</summary>
    public int Write(long offset, ReadOnlySequence<byte> data)
    {
        if (IsReadOnly) return LinuxFile.EROFS;
        if (_flush.FailedErrno != 0) return _flush.FailedErrno;   // a failed sync may have lost data: fail stop
        if (!Enter()) return Closed;
        try
        {
            return VectoredIo.WriteAll(_fd, offset, data, 0);
        }
        finally
        {
            Exit();
        }
    }

    public int Write(long offset, ReadOnlySpan<byte> data)
    {
        if (IsReadOnly) return LinuxFile.EROFS;
        if (_flush.FailedErrno != 0) return _flush.FailedErrno;
        if (!Enter()) return Closed;
        try
        {
            return VectoredIo.WriteAll(_fd, offset, data, 0);
        }
        finally
        {
            Exit();
        }
    }

    /// <summary>Sets [offset, offset+length) to zeros; with <paramref name="deallocate"/> whole filesystem blocks are freed.</summary>
    public int WriteZeroes(long offset, long length, bool deallocate)
    {
        if (IsReadOnly) return LinuxFile.EROFS;
        if (!Enter()) return Closed;
        try
        {
            if (deallocate && _punchSupported)
            {
                if (LinuxFile.FAllocate(_fd, LinuxFile.FALLOC_FL_PUNCH_HOLE | LinuxFile.FALLOC_FL_KEEP_SIZE, offset, length) == 0) return 0;
                int errno = Marshal.GetLastPInvokeError();
                if (errno != LinuxFile.EOPNOTSUPP) return errno;
                _punchSupported = false;
            }
            while (length > 0)
            {
                int chunk = (int)Math.Min(length, s_zeros.Length);
                int errno = VectoredIo.WriteAll(_fd, offset, new ReadOnlyMemory<byte>(s_zeros, 0, chunk), 0);
                if (errno != 0) return errno;
                offset += chunk;
                length -= chunk;
            }
            return 0;
        }
        finally
        {
            Exit();
        }
    }

    public int SetLength(long length)
    {
        if (!Enter()) return Closed;
        try
        {
            return LinuxFile.FTruncate(_fd, length) == 0 ? 0 : Marshal.GetLastPInvokeError();
        }
        finally
        {
            Exit();
        }
    }

    // ---------------------------------------------------------------- durability

    /// <summary>fdatasync, shared by concurrent callers (group commit); 0 or the errno (sticky after a failure).</summary>
    public ValueTask<int> FlushAsync(CancellationToken cancellationToken = default) =>
        IsReadOnly ? new(0) : _flush.FlushAsync(cancellationToken);

    /// <summary>fsync now, on this thread (metadata creation paths).</summary>
    public int SyncNow()
    {
        if (!Enter()) return Closed;
        try
        {
            return LinuxFile.FSync(_fd) == 0 ? 0 : Marshal.GetLastPInvokeError();
        }
        finally
        {
            Exit();
        }
    }

    /// <summary>fdatasync now, on this thread (journal commits that are already off the I/O path).</summary>
    public int SyncDataNow() => SyncData();

    private int SyncData()
    {
        if (!Enter()) return Closed;
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

    // ---------------------------------------------------------------- allocation

    /// <summary>
    /// The run starting at <paramref name="offset"/> (up to <paramref name="end"/>) that is all data (true) or all
    /// hole (false), aligned out to <paramref name="granularity"/>. A file system without SEEK_DATA reports data.
    /// </summary>
    public (bool Data, long RunEnd) Probe(long offset, long end, int granularity)
    {
        if (!Enter()) return (true, end);
        try
        {
            long data = LinuxFile.LSeek(_fd, offset, LinuxFile.SEEK_DATA);
            if (data < 0)
            {
                int errno = Marshal.GetLastPInvokeError();
                return errno == LinuxFile.ENXIO ? (false, end) : (true, end);
            }
            if (data > offset)
            {
                long holeEnd = Math.Min(data - data % granularity, end);
                if (holeEnd > offset) return (false, holeEnd);
            }
            long hole = LinuxFile.LSeek(_fd, offset, LinuxFile.SEEK_HOLE);
            if (hole < 0) hole = end;
            long dataEnd = Math.Min((hole + granularity - 1) / granularity * granularity, end);
            return (true, Math.Max(dataEnd, Math.Min(offset + granularity, end)));
        }
        finally
        {
            Exit();
        }
    }

    /// <summary>The errno the write helpers return once the file is closed (EBADF).</summary>
    public const int Closed = 9;

    internal static IoStatus MapWriteError(int errno) => errno switch
    {
        0 => IoStatus.Ok,
        Closed => IoStatus.NotReady,
        LinuxFile.ENOSPC or 122 /* EDQUOT */ => IoStatus.NoSpace,
        LinuxFile.EROFS => IoStatus.WriteProtected,
        _ => IoStatus.WriteError,
    };

    internal int Descriptor => _fd;

    internal bool Enter()
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

    internal void Exit() => _handle.DangerousRelease();

    public void Dispose() => _handle.Dispose();
}
