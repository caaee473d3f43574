using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace ISCSISnap.Storage.Native;

/// <summary>Gather writes and scatter reads of whole buffers at explicit offsets, retrying short transfers and EINTR.</summary>
internal static unsafe class VectoredIo
{
    private const int MaxVectors = 32;

    [InlineArray(MaxVectors)]
    private struct Pins
    {
        private MemoryHandle _element;
    }

    /// <summary>Writes all of <paramref name="data"/> at <paramref name="offset"/>. Returns 0 or an errno.</summary>
    public static int WriteAll(int fd, long offset, ReadOnlySequence<byte> data, int flags)
    {
        if (data.IsSingleSegment)
            return WriteAll(fd, offset, data.First, flags);

        var iov = stackalloc LinuxFile.IoVec[MaxVectors];
        var pins = new Pins();
        while (!data.IsEmpty)
        {
            int count = 0;
            long batchBytes = 0;
            foreach (var segment in data)
            {
                if (segment.IsEmpty) continue;
                pins[count] = segment.Pin();
                iov[count].Base = pins[count].Pointer;
                iov[count].Length = (nuint)segment.Length;
                batchBytes += segment.Length;
                if (++count == MaxVectors) break;
            }
            try
            {
                nint n = LinuxFile.PWriteV2(fd, iov, count, offset, flags);
                if (n < 0)
                {
                    int errno = Marshal.GetLastPInvokeError();
                    if (errno == LinuxFile.EINTR) continue;
                    return errno;
                }
                if (n == 0) return LinuxFile.EIO;
                offset += n;
                data = data.Slice(n);
            }
            finally
            {
                for (int i = 0; i < count; i++) pins[i].Dispose();
            }
        }
        return 0;
    }

    /// <summary>Writes all of <paramref name="data"/> at <paramref name="offset"/>. Returns 0 or an errno.</summary>
    public static int WriteAll(int fd, long offset, ReadOnlyMemory<byte> data, int flags)
    {
        using var pin = data.Pin();
        return WriteAll(fd, offset, new ReadOnlySpan<byte>(pin.Pointer, data.Length), flags);
    }

    /// <summary>Writes all of <paramref name="data"/> at <paramref name="offset"/>. Returns 0 or an errno.</summary>
    public static int WriteAll(int fd, long offset, ReadOnlySpan<byte> data, int flags)
    {
        fixed (byte* p = data)
        {
            int done = 0;
            while (done < data.Length)
            {
                var v = new LinuxFile.IoVec { Base = p + done, Length = (nuint)(data.Length - done) };
                nint n = LinuxFile.PWriteV2(fd, &v, 1, offset + done, flags);
                if (n < 0)
                {
                    int errno = Marshal.GetLastPInvokeError();
                    if (errno == LinuxFile.EINTR) continue;
                    return errno;
                }
                if (n == 0) return LinuxFile.EIO;
                done += (int)n;
            }
            return 0;
        }
    }

    /// <summary>
    /// Reads into <paramref name="destination"/> at <paramref name="offset"/> with preadv2 flags; bytes past end of file
    /// read as zeros. Returns the bytes filled (all of them unless an error stopped it) and the errno that stopped it.
    /// </summary>
    public static int Read(int fd, long offset, Span<byte> destination, int flags, out int errno)
    {
        errno = 0;
        fixed (byte* p = destination)
        {
            int done = 0;
            while (done < destination.Length)
            {
                var v = new LinuxFile.IoVec { Base = p + done, Length = (nuint)(destination.Length - done) };
                nint n = LinuxFile.PReadV2(fd, &v, 1, offset + done, flags);
                if (n > 0) { done += (int)n; continue; }
                if (n == 0)
                {
                    destination.Slice(done).Clear();   // past end of file: the device reads zeros
                    return destination.Length;
                }
                errno = Marshal.GetLastPInvokeError();
                if (errno == LinuxFile.EINTR) continue;
                return done;
            }
            return done;
        }
    }
}
