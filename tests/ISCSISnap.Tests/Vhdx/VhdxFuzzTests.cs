using System.Buffers;
using System.Buffers.Binary;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Vhdx;
using ISCSISnap.Tests.Support;
using Xunit;
using static ISCSISnap.Tests.Vhdx.VhdxTestSupport;

namespace ISCSISnap.Tests.Vhdx;

/// <summary>
/// Damaged files: Open either succeeds (and then every read returns a status, never throws) or throws a
/// StorageException that names the file and the fault. Nothing else, and no hang.
/// </summary>
public sealed class VhdxFuzzTests
{
    private sealed record Sample(string Name, byte[] Bytes, long BatOffset, long BatLength, long MetadataOffset, long LogOffset, long LogLength);

    private static Sample Describe(string name, byte[] bytes)
    {
        var regions = VhdxRegionTable.TryParse(bytes.AsSpan(0x30000, 65536), out _)!;
        var bat = regions.Single(r => r.Id == VhdxFormat.BatRegion);
        var metadata = regions.Single(r => r.Id == VhdxFormat.MetadataRegion);
        var h1 = VhdxHeader.TryParse(bytes.AsSpan(0x10000, 4096), out _);
        var h2 = VhdxHeader.TryParse(bytes.AsSpan(0x20000, 4096), out _);
        var h = h1 is null ? h2!.Value : h2 is null ? h1.Value : h1.Value.SequenceNumber > h2.Value.SequenceNumber ? h1.Value : h2.Value;
        return new Sample(name, bytes, bat.FileOffset, bat.Length, metadata.FileOffset, (long)h.LogOffset, h.LogLength);
    }

    private static async Task<List<Sample>> MakeSamples(string dir)
    {
        var samples = new List<Sample>();
        long size = 8L << 20;
        string dyn = Path.Combine(dir, "dyn.vhdx");
        using (var e = new ExpectedDisk(Path.Combine(dir, "e1.raw"), size))
        using (var v = VhdxFile.Create(dyn, new VhdxCreateOptions { VirtualSize = size, BlockSize = 1 << 20, LogSize = 1 << 20 }))
            await RandomOperations(v, e, 1, 25, 1 << 20);
        samples.Add(Describe("dynamic", File.ReadAllBytes(dyn)));

        string child = Path.Combine(dir, "child.vhdx");
        using (var e = new ExpectedDisk(Path.Combine(dir, "e2.raw"), size))
        using (var v = VhdxFile.Create(child, new VhdxCreateOptions { VirtualSize = size, BlockSize = 1 << 20, LogSize = 1 << 20, Parent = VhdxParent.For(child, dyn, Guid.NewGuid()) }))
            await RandomOperations(v, e, 2, 25, 1 << 20);
        samples.Add(Describe("differencing", File.ReadAllBytes(child)));

        string dirty = Path.Combine(dir, "dirty.vhdx");
        using (var e = new ExpectedDisk(Path.Combine(dir, "e3.raw"), size))
        {
            var v = VhdxFile.Create(dirty, new VhdxCreateOptions { VirtualSize = size, BlockSize = 1 << 20, LogSize = 1 << 20, Parent = VhdxParent.For(dirty, dyn, Guid.NewGuid()) });
            await RandomOperations(v, e, 3, 25, 1 << 20);
            v.StopBeforeApplyForTest = true;
            Assert.Equal(IoStatus.Ok, await v.ZeroAsync(0, 1 << 20, true, false));
            await WriteAsync(v, 512, new byte[4096]);
            Assert.Equal(IoStatus.Ok, await v.FlushAsync());
            v.Dispose();
        }
        samples.Add(Describe("dirty log", File.ReadAllBytes(dirty)));

        string qemu = Path.Combine(dir, "qemu.vhdx");
        Assert.Equal(0, (await QemuImg("create", "-f", "vhdx", "-o", "block_size=1M", qemu, "8M")).ExitCode);
        Assert.Equal(0, (await Tool.RunAsync("qemu-io", ["-f", "vhdx", "-c", "write -P 0x5a 0 3M", "-c", "write -P 0x11 6M 4k", qemu])).ExitCode);
        samples.Add(Describe("qemu", File.ReadAllBytes(qemu)));
        return samples;
    }

    private static void WriteSparse(string path, byte[] bytes, long length)
    {
        using var f = new FileStream(path, FileMode.Create, FileAccess.Write);
        f.SetLength(length);
        const int chunk = 64 << 10;
        for (long at = 0; at < Math.Min(length, bytes.Length); at += chunk)
        {
            int n = (int)Math.Min(chunk, Math.Min(length, bytes.Length) - at);
            if (bytes.AsSpan((int)at, n).IndexOfAnyExcept((byte)0) < 0) continue;
            f.Position = at;
            f.Write(bytes, (int)at, n);
        }
    }

    private static void Reseal(byte[] bytes, int offset, int length) =>
        BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan(offset + 4), VhdxFormat.Checksum(bytes.AsSpan(offset, length), 4));

    /// <summary>Opens the file and uses it; returns the refusal message, or null if it opened.</summary>
    private static async Task<string?> Exercise(string path, bool writable, Random random)
    {
        VhdxFile file;
        try
        {
            file = VhdxFile.Open(path, Guid.Empty, writable);
        }
        catch (StorageException e)
        {
            Assert.StartsWith(path + ": ", e.Message);
            Assert.DoesNotContain("unexpected structure fault", e.Message);
            return e.Message;
        }
        using (file)
        {
            long sectors = file.VirtualSize / file.LogicalSectorSize;
            try
            {
                file.Enumerate(0, Math.Min(sectors, 1L << 20), (_, _, _) => { });
            }
            catch (StorageException e)
            {
                Assert.StartsWith(path + ": ", e.Message);   // an unreadable sector bitmap
            }
            var buffer = new byte[file.BlockSize];
            // Every block of small disks; a sample of blocks of large ones (a fuzzed size can be 64 TiB).
            long blocks = (file.VirtualSize + file.BlockSize - 1) / file.BlockSize;
            for (long i = 0; i < Math.Min(blocks, 64); i++)
            {
                long block = blocks <= 64 ? i : (long)(random.NextDouble() * blocks);
                long offset = block * file.BlockSize;
                int n = (int)Math.Min(file.BlockSize, file.VirtualSize - offset);
                _ = await file.ReadAsync(offset, buffer.AsMemory(0, n));
            }
            if (writable)
            {
                long at = (long)(random.NextDouble() * (sectors - 8)) * file.LogicalSectorSize;
                _ = await file.WriteAsync(Math.Max(0, at), new ReadOnlySequence<byte>(new byte[4096]), forceUnitAccess: true);
                _ = file.Seal();
            }
        }
        return null;
    }

    [Fact]
    public async Task Seeded_mutations_open_cleanly_or_are_refused_with_a_StorageException()
    {
        using var dir = new TempDirectory();
        var samples = await MakeSamples(dir.Path);
        // VHDX_FUZZ_SEED / VHDX_FUZZ_ITERATIONS widen a local run; the default is fixed and fast.
        int seed = int.TryParse(Environment.GetEnvironmentVariable("VHDX_FUZZ_SEED"), out int s) ? s : 20261125;
        int iterations = int.TryParse(Environment.GetEnvironmentVariable("VHDX_FUZZ_ITERATIONS"), out int n) ? n : 300;
        var random = new Random(seed);
        int refused = 0, opened = 0;
        var run = Task.Run(async () =>
        {
            for (int iteration = 0; iteration < iterations; iteration++)
            {
                var sample = samples[iteration % samples.Count];
                var bytes = (byte[])sample.Bytes.Clone();
                long length = bytes.Length;
                int kind = random.Next(9);
                string what;
                switch (kind)
                {
                    case 0:
                    {
                        int header = random.Next(2) == 0 ? 0x10000 : 0x20000;
                        int at = header + random.Next(80);
                        bytes[at] ^= (byte)random.Next(1, 256);
                        if (random.Next(3) > 0) Reseal(bytes, header, 4096);
                        what = $"header byte 0x{at:x}";
                        break;
                    }
                    case 1:
                    {
                        int at = 0x30000 + random.Next(16 + 3 * 32);
                        if (random.Next(2) == 0) bytes[at] ^= (byte)random.Next(1, 256);
                        else BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan(at & ~3), (uint)random.Next());
                        Reseal(bytes, 0x30000, 65536);
                        if (random.Next(2) == 0) Array.Copy(bytes, 0x30000, bytes, 0x40000, 65536);
                        what = $"region table byte 0x{at:x}";
                        break;
                    }
                    case 2:
                    {
                        int at = (int)sample.MetadataOffset + random.Next(32 + 6 * 32);
                        if (random.Next(2) == 0) bytes[at] ^= (byte)(1 << random.Next(8));
                        else BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan(at & ~3), random.Next(3) == 0 ? uint.MaxValue : (uint)random.Next(0, 0x200000));
                        what = $"metadata table byte 0x{at:x}";
                        break;
                    }
                    case 3:
                    {
                        // Items (file parameters, size, ID, sector sizes, parent locator) start at 64 KiB into the region.
                        int at = (int)sample.MetadataOffset + 0x10000 + random.Next(sample.Name.Contains("diff") || sample.Name.Contains("dirty") ? 300 : 40);
                        if (random.Next(2) == 0) bytes[at] ^= (byte)(1 << random.Next(8));
                        else BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan(at & ~3), (uint)random.Next());
                        what = $"metadata item byte 0x{at:x}";
                        break;
                    }
                    case 4:
                    case 5:
                    {
                        int entry = random.Next(random.Next(2) == 0 ? 10 : 4200);
                        int at = (int)sample.BatOffset + entry * 8;
                        ulong value = random.Next(4) switch
                        {
                            0 => (uint)random.Next(8),
                            1 => ((ulong)random.NextInt64(0, 1L << 44) << 20) | (uint)random.Next(8),
                            2 => ((ulong)(bytes.Length + random.Next(0, 64 << 20)) & ~0xFFFFFUL) | 6,
                            _ => BinaryPrimitives.ReadUInt64LittleEndian(bytes.AsSpan(at)) ^ (1UL << random.Next(64)),
                        };
                        BinaryPrimitives.WriteUInt64LittleEndian(bytes.AsSpan(at), value);
                        what = $"BAT entry {entry} = 0x{value:x}";
                        break;
                    }
                    case 6:
                    {
                        int at = (int)sample.LogOffset + random.Next(random.Next(2) == 0 ? 128 : 16384);
                        bytes[at] ^= (byte)random.Next(1, 256);
                        if (random.Next(2) == 0)
                        {
                            // Re-seal the first entry so the damage reaches the descriptor checks.
                            int entryLength = (int)BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan((int)sample.LogOffset + 8));
                            if (entryLength > 0 && entryLength <= sample.LogLength && entryLength % 4096 == 0)
                                Reseal(bytes, (int)sample.LogOffset, entryLength);
                        }
                        what = $"log byte 0x{at:x}";
                        break;
                    }
                    case 7:
                    {
                        length = random.Next(3) == 0 ? random.Next(0, 1 << 21) : random.NextInt64(0, bytes.Length);
                        what = $"truncated to {length}";
                        break;
                    }
                    default:
                    {
                        int at = random.Next(0x10000, (int)Math.Min(bytes.Length - 8, sample.BatOffset + 65536)) & ~3;
                        BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan(at), (uint)random.Next());
                        what = $"int at 0x{at:x}";
                        break;
                    }
                }
                string path = Path.Combine(dir.Path, $"fuzz{iteration}.vhdx");
                WriteSparse(path, bytes, length);
                try
                {
                    string? message = await Exercise(path, writable: iteration % 3 == 0, random);
                    if (message is null) opened++; else refused++;
                }
                catch (Exception e) when (e is not Xunit.Sdk.XunitException)
                {
                    Assert.Fail($"iteration {iteration} ({sample.Name}, {what}): {e.GetType().Name}: {e.Message}\n{e.StackTrace}");
                }
                File.Delete(path);
            }
        });
        var finished = await Task.WhenAny(run, Task.Delay(TimeSpan.FromMinutes(3 + iterations / 300)));
        Assert.True(finished == run, "fuzzing hung");
        await run;
        Assert.True(refused > 50 && opened > 50, $"refused {refused}, opened {opened}: the mutations should do both");
    }

    // ------------------------------------------------------------------ named faults

    private static async Task<(string Path, Sample Sample)> Fresh(TempDirectory dir)
    {
        string path = Path.Combine(dir.Path, "named.vhdx");
        using (var e = new ExpectedDisk(Path.Combine(dir.Path, "named.raw"), 8L << 20))
        using (var v = VhdxFile.Create(path, new VhdxCreateOptions { VirtualSize = 8L << 20, BlockSize = 1 << 20, LogSize = 1 << 20 }))
        {
            var data = new byte[3 << 20];
            new Random(3).NextBytes(data);
            await WriteAsync(v, 1 << 20, data);
        }
        return (path, Describe("named", File.ReadAllBytes(path)));
    }

    private static string Refusal(string path, byte[] bytes, long? length = null)
    {
        WriteSparse(path, bytes, length ?? bytes.Length);
        foreach (bool writable in new[] { false, true })
        {
            var ex = Assert.Throws<StorageException>(() => VhdxFile.Open(path, Guid.Empty, writable));
            Assert.StartsWith(path + ": ", ex.Message);
            if (!writable) return ex.Message;
        }
        throw new InvalidOperationException();
    }

    [Fact]
    public async Task Truncated_files_are_refused()
    {
        using var dir = new TempDirectory();
        var (path, sample) = await Fresh(dir);
        Assert.Contains("shorter than the 1 MiB", Refusal(path, sample.Bytes, 300_000));
        Assert.Contains("past the end of the file", Refusal(path, sample.Bytes, sample.Bytes.Length - (512 << 10)));
        Assert.Contains("BAT entry", Refusal(path, sample.Bytes, sample.Bytes.Length - (512 << 10)));
        Assert.Contains("not 'vhdxfile'", Refusal(path, new byte[2 << 20]));
    }

    [Fact]
    public async Task Bad_CRCs_in_both_headers_are_refused_but_one_is_tolerated()
    {
        using var dir = new TempDirectory();
        var (path, sample) = await Fresh(dir);
        var bytes = (byte[])sample.Bytes.Clone();
        bytes[0x10000 + 40] ^= 1;
        WriteSparse(path, bytes, bytes.Length);
        using (VhdxFile.Open(path, Guid.Empty, writable: false)) { }
        bytes[0x20000 + 40] ^= 1;
        string message = Refusal(path, bytes);
        Assert.Contains("no valid header", message);
        Assert.Contains("CRC-32C", message);
    }

    [Fact]
    public async Task Overlapping_regions_are_refused()
    {
        using var dir = new TempDirectory();
        var (path, sample) = await Fresh(dir);
        var bytes = (byte[])sample.Bytes.Clone();
        var table = bytes.AsSpan(0x30000, 65536);
        int metadataEntry = new Guid(table.Slice(16, 16)) == VhdxFormat.MetadataRegion ? 16 : 48;
        BinaryPrimitives.WriteUInt64LittleEndian(table[(metadataEntry + 16)..], (ulong)sample.BatOffset);
        Reseal(bytes, 0x30000, 65536);
        Array.Copy(bytes, 0x30000, bytes, 0x40000, 65536);
        string message = Refusal(path, bytes);
        Assert.Contains("overlaps", message);
        Assert.Contains("region", message);
    }

    [Fact]
    public async Task A_BAT_entry_past_the_end_of_the_file_is_refused()
    {
        using var dir = new TempDirectory();
        var (path, sample) = await Fresh(dir);
        var bytes = (byte[])sample.Bytes.Clone();
        long past = VhdxFormat.RoundUp(bytes.Length, 1 << 20) + (100L << 20);
        BinaryPrimitives.WriteUInt64LittleEndian(bytes.AsSpan((int)sample.BatOffset + 5 * 8), (ulong)past | 6);
        string message = Refusal(path, bytes);
        Assert.Contains("BAT entry 5", message);
        Assert.Contains($"0x{past:x}", message);
        Assert.Contains("past the end of the file", message);
    }

    [Fact]
    public async Task An_unknown_required_region_is_refused()
    {
        using var dir = new TempDirectory();
        var (path, sample) = await Fresh(dir);
        var bytes = (byte[])sample.Bytes.Clone();
        var table = bytes.AsSpan(0x30000, 65536);
        var unknown = Guid.NewGuid();
        BinaryPrimitives.WriteUInt32LittleEndian(table[8..], 3);
        unknown.TryWriteBytes(table.Slice(16 + 64, 16));
        BinaryPrimitives.WriteUInt64LittleEndian(table[(16 + 64 + 16)..], (ulong)(bytes.Length - (1 << 20)) / (1 << 20) * (1 << 20));
        BinaryPrimitives.WriteUInt32LittleEndian(table[(16 + 64 + 24)..], 1 << 20);
        BinaryPrimitives.WriteUInt32LittleEndian(table[(16 + 64 + 28)..], 1);
        Reseal(bytes, 0x30000, 65536);
        Array.Copy(bytes, 0x30000, bytes, 0x40000, 65536);
        string message = Refusal(path, bytes);
        Assert.Contains("unknown required region", message);
        Assert.Contains(unknown.ToString(), message);
    }

    [Fact]
    public async Task A_block_size_that_is_not_a_power_of_two_is_refused()
    {
        using var dir = new TempDirectory();
        var (path, sample) = await Fresh(dir);
        var bytes = (byte[])sample.Bytes.Clone();
        // Find the file parameters item through the metadata table.
        var meta = bytes.AsSpan((int)sample.MetadataOffset);
        int count = BinaryPrimitives.ReadUInt16LittleEndian(meta[10..]);
        int item = -1;
        for (int i = 0; i < count; i++)
            if (new Guid(meta.Slice(32 + i * 32, 16)) == VhdxFormat.FileParametersItem)
                item = (int)BinaryPrimitives.ReadUInt32LittleEndian(meta[(32 + i * 32 + 16)..]);
        Assert.True(item > 0);
        BinaryPrimitives.WriteUInt32LittleEndian(meta[item..], 3 << 20);
        string message = Refusal(path, bytes);
        Assert.Contains("block size 3145728", message);
        Assert.Contains("power of two", message);
    }
}
