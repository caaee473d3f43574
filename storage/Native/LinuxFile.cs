using System.Runtime.InteropServices;

namespace ISCSISnap.Storage.Native;

/// <summary>Thin P/Invoke layer over the Linux file calls .NET does not expose (vectored I/O with flags, hole punching, SEEK_DATA).</summary>
internal static unsafe partial class LinuxFile
{
    public const int EINTR = 4, EIO = 5, ENXIO = 6, EAGAIN = 11, ENOSPC = 28, EROFS = 30, EOPNOTSUPP = 95;
    public const int RWF_DSYNC = 0x2, RWF_NOWAIT = 0x8;
    public const int FALLOC_FL_KEEP_SIZE = 0x1, FALLOC_FL_PUNCH_HOLE = 0x2, FALLOC_FL_ZERO_RANGE = 0x10;
    public const int SEEK_DATA = 3, SEEK_HOLE = 4;

    [StructLayout(LayoutKind.Sequential)]
    public struct IoVec
    {
        public void* Base;
        public nuint Length;
    }

    [LibraryImport("libc", EntryPoint = "preadv2", SetLastError = true)]
    public static partial nint PReadV2(int fd, IoVec* iov, int iovcnt, long offset, int flags);

    [LibraryImport("libc", EntryPoint = "pwritev2", SetLastError = true)]
    public static partial nint PWriteV2(int fd, IoVec* iov, int iovcnt, long offset, int flags);

    [LibraryImport("libc", EntryPoint = "pread", SetLastError = true)]
    public static partial nint PRead(int fd, byte* buffer, nuint count, long offset);

    [LibraryImport("libc", EntryPoint = "pwrite", SetLastError = true)]
    public static partial nint PWrite(int fd, byte* buffer, nuint count, long offset);

    [LibraryImport("libc", EntryPoint = "fallocate", SetLastError = true)]
    public static partial int FAllocate(int fd, int mode, long offset, long length);

    [LibraryImport("libc", EntryPoint = "lseek", SetLastError = true)]
    public static partial long LSeek(int fd, long offset, int whence);

    [LibraryImport("libc", EntryPoint = "ftruncate", SetLastError = true)]
    public static partial int FTruncate(int fd, long length);

    [LibraryImport("libc", EntryPoint = "fstat", SetLastError = true)]
    private static partial int FStat(int fd, byte* buffer);

    /// <summary>Bytes of storage a file occupies (st_blocks × 512), which for sparse files is less than its length.</summary>
    public static long AllocatedBytes(int fd)
    {
        // struct stat is 144 bytes on x86-64 and 128 on arm64; st_blocks sits at offset 64 on both.
        byte* buffer = stackalloc byte[256];
        if (FStat(fd, buffer) != 0) return -1;
        return *(long*)(buffer + 64) * 512;
    }

    [LibraryImport("libc", EntryPoint = "fdatasync", SetLastError = true)]
    public static partial int FDataSync(int fd);

    [LibraryImport("libc", EntryPoint = "fsync", SetLastError = true)]
    public static partial int FSync(int fd);

    [LibraryImport("libc", EntryPoint = "open", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    public static partial int Open(string path, int flags, int mode);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    public static partial int Close(int fd);

    public const int O_RDONLY = 0, O_DIRECTORY = 0x10000;

    /// <summary>Makes a directory entry durable (after creating or renaming a file in it).</summary>
    public static void SyncDirectory(string directory)
    {
        int fd = Open(directory, O_RDONLY | O_DIRECTORY, 0);
        if (fd < 0) return;
        FSync(fd);
        Close(fd);
    }
}
