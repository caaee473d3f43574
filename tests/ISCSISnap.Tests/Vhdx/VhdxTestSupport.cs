using System.Buffers;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Vhdx;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Vhdx;

/// <summary>
/// The expected contents of a virtual disk as a sparse raw file (what qemu-img compare checks against), driven by the
/// same seeded operations as the VHDX under test.
/// </summary>
internal sealed class ExpectedDisk : IDisposable
{
    private readonly FileStream _raw;

    public ExpectedDisk(string path, long size)
    {
        Path = path;
        _raw = new FileStream(path, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.Read);
        _raw.SetLength(size);
    }

    public string Path { get; }
    public long Size => _raw.Length;

    public void Write(long offset, ReadOnlySpan<byte> data) => RandomAccess.Write(_raw.SafeFileHandle, data, offset);

    public void Zero(long offset, long length)
    {
        var zeros = new byte[Math.Min(length, 1 << 20)];
        for (long done = 0; done < length; done += zeros.Length)
            RandomAccess.Write(_raw.SafeFileHandle, zeros.AsSpan(0, (int)Math.Min(zeros.Length, length - done)), offset + done);
    }

    public byte[] Read(long offset, int length)
    {
        var buffer = new byte[length];
        RandomAccess.Read(_raw.SafeFileHandle, buffer, offset);
        return buffer;
    }

    public void Flush() => _raw.Flush(flushToDisk: false);

    public void Grow(long size) => _raw.SetLength(size);

    public void Dispose() => _raw.Dispose();
}

internal static class VhdxTestSupport
{
    public static async Task<Tool.Result> QemuImg(params string[] args) => await Tool.RunAsync("qemu-img", args);

    /// <summary>qemu-img check must exit 0 and report no errors.</summary>
    public static async Task AssertQemuCheckClean(string path)
    {
        var check = await QemuImg("check", "-f", "vhdx", path);
        Assert.True(check.ExitCode == 0, $"qemu-img check {path} exited {check.ExitCode}: {check.Output}");
        Assert.Contains("No errors were found", check.Output);
    }

    public static async Task AssertQemuIdentical(string vhdx, string raw)
    {
        var compare = await QemuImg("compare", "-f", "vhdx", "-F", "raw", vhdx, raw);
        Assert.True(compare.ExitCode == 0, $"qemu-img compare {vhdx} {raw} exited {compare.ExitCode}: {compare.Output}");
    }

    public static async Task WriteAsync(IWritableLayer layer, long offset, byte[] data, bool fua = false)
    {
        // Two segments when possible, so the gather path is exercised.
        ReadOnlySequence<byte> sequence = data.Length >= 1024 ? TwoSegments(data) : new ReadOnlySequence<byte>(data);
        var status = await layer.WriteAsync(offset, sequence, fua);
        Assert.Equal(IoStatus.Ok, status);
    }

    public static ReadOnlySequence<byte> TwoSegments(byte[] data)
    {
        int split = data.Length / 2 / 512 * 512;
        var first = new Segment(data.AsMemory(0, split));
        var last = first.Append(data.AsMemory(split));
        return new ReadOnlySequence<byte>(first, 0, last, last.Memory.Length);
    }

    private sealed class Segment : ReadOnlySequenceSegment<byte>
    {
        public Segment(ReadOnlyMemory<byte> memory) => Memory = memory;
        public Segment Append(ReadOnlyMemory<byte> memory)
        {
            var next = new Segment(memory) { RunningIndex = RunningIndex + Memory.Length };
            Next = next;
            return next;
        }
    }

    /// <summary>Compares the whole layer (reading Data and Zero and Absent runs as the chain would: absent = zeros at the bottom) with the expectation.</summary>
    public static async Task AssertContentEquals(VhdxFile file, ExpectedDisk expected)
    {
        Assert.Equal(expected.Size, file.VirtualSize);
        const int chunk = 4 << 20;
        var buffer = new byte[chunk];
        for (long offset = 0; offset < file.VirtualSize; offset += chunk)
        {
            int n = (int)Math.Min(chunk, file.VirtualSize - offset);
            Assert.Equal(IoStatus.Ok, await file.ReadAsync(offset, buffer.AsMemory(0, n)));
            var want = expected.Read(offset, n);
            if (!buffer.AsSpan(0, n).SequenceEqual(want))
            {
                int at = 0;
                while (buffer[at] == want[at]) at++;
                Assert.Fail($"{file.Path}: content differs at virtual offset {offset + at}: {buffer[at]:x2} instead of {want[at]:x2}");
            }
        }
    }

    /// <summary>Seeded random writes, partial and whole-block zeroing, FUA and flushes, mirrored into the expectation.</summary>
    public static async Task RandomOperations(IWritableLayer layer, ExpectedDisk expected, int seed, int operations, int blockSize)
    {
        var random = new Random(seed);
        long size = layer.VirtualSize;
        int sector = layer.LogicalSectorSize;
        for (int i = 0; i < operations; i++)
        {
            int kind = random.Next(10);
            if (kind < 7)
            {
                long sectors = random.Next(1, random.Next(3) == 0 ? (3 << 20) / sector : 64);
                long offset = (long)(random.NextDouble() * (size / sector - sectors)) * sector;
                if (random.Next(4) == 0) offset = Math.Clamp(((offset / blockSize) + 1) * blockSize - sector * random.Next(1, 8), 0, size - sector);   // across a block edge
                sectors = Math.Min(sectors, (size - offset) / sector);
                var data = new byte[sectors * sector];
                random.NextBytes(data);
                await WriteAsync(layer, offset, data, fua: random.Next(8) == 0);
                expected.Write(offset, data);
            }
            else if (kind < 9)
            {
                bool whole = random.Next(2) == 0;
                long offset, length;
                if (whole)
                {
                    long blocks = (size + blockSize - 1) / blockSize;
                    long block = random.Next((int)Math.Max(1, blocks - 1));
                    offset = block * blockSize;
                    length = Math.Min(blockSize * (long)random.Next(1, 3), size - offset) / sector * sector;
                }
                else
                {
                    length = random.Next(1, 200) * (long)sector;
                    offset = (long)(random.NextDouble() * ((size - length) / sector)) * sector;
                }
                Assert.Equal(IoStatus.Ok, await layer.ZeroAsync(offset, length, deallocate: random.Next(2) == 0, forceUnitAccess: random.Next(8) == 0));
                expected.Zero(offset, length);
            }
            else
            {
                Assert.Equal(IoStatus.Ok, await layer.FlushAsync());
            }
        }
        expected.Flush();
    }
}
