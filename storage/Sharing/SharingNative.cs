using System.Runtime.InteropServices;
using ISCSISnap.Storage.Native;

namespace ISCSISnap.Storage.Sharing;

/// <summary>
/// P/Invoke for the Linux calls the sharing layer needs and .NET does not expose: memfd with seals, shared
/// mappings, descriptor passing (SCM_RIGHTS), pidfd. Layouts are those of x86-64 and arm64 Linux (LP64).
/// </summary>
internal static unsafe partial class SharingNative
{
    public const int EINTR = 4, EAGAIN = 11, EACCES = 13, EBUSY = 16, EPERM = 1, ESRCH = 3;

    public const uint MFD_CLOEXEC = 0x1, MFD_ALLOW_SEALING = 0x2;
    public const int F_ADD_SEALS = 1033, F_GET_SEALS = 1034;
    public const int F_SEAL_SEAL = 0x1, F_SEAL_SHRINK = 0x2, F_SEAL_GROW = 0x4, F_SEAL_WRITE = 0x8, F_SEAL_FUTURE_WRITE = 0x10;

    public const int PROT_NONE = 0, PROT_READ = 0x1, PROT_WRITE = 0x2;
    public const int MAP_SHARED = 0x1, MAP_PRIVATE = 0x2, MAP_FIXED = 0x10, MAP_ANONYMOUS = 0x20;
    public static readonly nint MapFailed = -1;

    public const int SOL_SOCKET = 1, SCM_RIGHTS = 1, SO_PEERCRED = 17;
    public const int MSG_CTRUNC = 0x8, MSG_DONTWAIT = 0x40, MSG_NOSIGNAL = 0x4000, MSG_CMSG_CLOEXEC = 0x40000000;

    public const short POLLIN = 0x1;
    public const int EFD_CLOEXEC = 0x80000;
    public const int SEEK_END = 2;

    [StructLayout(LayoutKind.Sequential)]
    public struct MsgHdr
    {
        public void* Name;
        public uint NameLength;
        public LinuxFile.IoVec* Iov;
        public nuint IovLength;
        public void* Control;
        public nuint ControlLength;
        public int Flags;
    }

    /// <summary>struct cmsghdr; its data follows at <see cref="CmsgHeaderSize"/> (aligned to 8 on LP64).</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct CmsgHdr
    {
        public nuint Length;
        public int Level;
        public int Type;
    }

    public static readonly int CmsgHeaderSize = sizeof(CmsgHdr);

    /// <summary>CMSG_SPACE for <paramref name="dataBytes"/>: header plus data rounded up to the word size.</summary>
    public static int CmsgSpace(int dataBytes) => CmsgHeaderSize + ((dataBytes + 7) & ~7);

    [StructLayout(LayoutKind.Sequential)]
    public struct PollFd
    {
        public int Fd;
        public short Events;
        public short REvents;
    }

    [LibraryImport("libc", EntryPoint = "memfd_create", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    public static partial int MemfdCreate(string name, uint flags);

    [LibraryImport("libc", EntryPoint = "fcntl", SetLastError = true)]
    public static partial int Fcntl(int fd, int command, int argument);

    [LibraryImport("libc", EntryPoint = "ftruncate", SetLastError = true)]
    public static partial int FTruncate(int fd, long length);

    [LibraryImport("libc", EntryPoint = "lseek", SetLastError = true)]
    public static partial long LSeek(int fd, long offset, int whence);

    [LibraryImport("libc", EntryPoint = "mmap", SetLastError = true)]
    public static partial nint MMap(nint address, nuint length, int protection, int flags, int fd, long offset);

    [LibraryImport("libc", EntryPoint = "munmap", SetLastError = true)]
    public static partial int MUnmap(nint address, nuint length);

    [LibraryImport("libc", EntryPoint = "mprotect", SetLastError = true)]
    public static partial int MProtect(nint address, nuint length, int protection);

    [LibraryImport("libc", EntryPoint = "pwrite", SetLastError = true)]
    public static partial nint PWrite(int fd, byte* buffer, nuint count, long offset);

    [LibraryImport("libc", EntryPoint = "fallocate", SetLastError = true)]
    public static partial int FAllocate(int fd, int mode, long offset, long length);

    public const int O_RDWR = 0x2, O_CLOEXEC = 0x80000;

    [LibraryImport("libc", EntryPoint = "open", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    public static partial int Open(string path, int flags);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    public static partial int Close(int fd);

    [LibraryImport("libc", EntryPoint = "sendmsg", SetLastError = true)]
    public static partial nint SendMsg(int socket, MsgHdr* message, int flags);

    [LibraryImport("libc", EntryPoint = "recvmsg", SetLastError = true)]
    public static partial nint RecvMsg(int socket, MsgHdr* message, int flags);

    [LibraryImport("libc", EntryPoint = "pidfd_open", SetLastError = true)]
    public static partial int PidfdOpen(int pid, uint flags);

    [LibraryImport("libc", EntryPoint = "eventfd", SetLastError = true)]
    public static partial int EventFd(uint initial, int flags);

    [LibraryImport("libc", EntryPoint = "write", SetLastError = true)]
    public static partial nint Write(int fd, byte* buffer, nuint count);

    [LibraryImport("libc", EntryPoint = "poll", SetLastError = true)]
    public static partial int Poll(PollFd* fds, nuint count, int timeoutMilliseconds);

    [LibraryImport("libc", EntryPoint = "getuid")]
    public static partial uint GetUid();

    [LibraryImport("libc", EntryPoint = "getgid")]
    public static partial uint GetGid();

    public static int LastError => Marshal.GetLastPInvokeError();
}
