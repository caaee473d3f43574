using System.Buffers.Binary;
using System.Security.Cryptography;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Vhdx;
using ISCSISnap.Tests.Support;
using Xunit;
using static ISCSISnap.Tests.Vhdx.VhdxTestSupport;

namespace ISCSISnap.Tests.Vhdx;

/// <summary>
/// Crash simulation: the file is copied at chosen instants while its writer is live (the copy is what a crash would
/// leave, given that everything the writer synced is in the copy), and the copy must open, replay, and hold every write
/// that was acknowledged durable. The instant "log entry durable, nothing applied in place" comes from a test hook.
/// </summary>
public sealed class VhdxCrashTests
{
    private const long Size = 24L << 20;

    private static async Task<byte[]> ReadAll(IChainLayer layer, IChainLayer? parent)
    {
        var result = new byte[layer.VirtualSize];
        var runs = new List<(long, long, SectorState)>();
        layer.Enumerate(0, layer.VirtualSize / 512, (s, n, st) => runs.Add((s, n, st)));
        foreach (var (s, n, st) in runs)
        {
            var target = result.AsMemory((int)(s * 512), (int)(n * 512));
            var source = st == SectorState.Absent ? parent : layer;
            if (source is not null) Assert.Equal(IoStatus.Ok, await source.ReadAsync(s * 512, target));
        }
        return result;
    }

    private static bool Same(byte[] a, byte[] b) => a.AsSpan().SequenceEqual(b);

    private static async Task VerifyCopy(string copy, ExpectedDisk expected, VhdxFile? parent, bool logPending, string dir)
    {
        byte[] want = expected.Read(0, (int)Size);
        if (parent is null && logPending)
            Assert.NotEqual(0, (await QemuImg("info", "-f", "vhdx", copy)).ExitCode);   // the log really needs replay
        // Read-only: replayed in memory, the file left untouched.
        byte[] before = SHA256.HashData(File.ReadAllBytes(copy));
        using (var ro = VhdxFile.Open(copy, Guid.Empty, writable: false))
            Assert.True(Same(want, await ReadAll(ro, parent)), $"{copy}: read-only replay lost acknowledged data");
        Assert.Equal(before, SHA256.HashData(File.ReadAllBytes(copy)));
        // Writable: replayed to disk; the file is clean afterwards.
        string second = Path.Combine(dir, "rw-" + Path.GetFileName(copy));
        File.Copy(copy, second);
        using (var rw = VhdxFile.Open(second, Guid.Empty, writable: true))
            Assert.True(Same(want, await ReadAll(rw, parent)), $"{second}: replay lost acknowledged data");
        using (var again = VhdxFile.Open(second, Guid.Empty, writable: false))
            Assert.True(Same(want, await ReadAll(again, parent)));
        if (parent is null)
        {
            await AssertQemuCheckClean(second);
            await AssertQemuIdentical(second, expected.Path);
        }
    }

    [Theory]
    [InlineData(false, 1)]
    [InlineData(false, 2)]
    [InlineData(true, 3)]
    [InlineData(true, 4)]
    public async Task Acknowledged_writes_survive_crashes_at_many_instants(bool differencing, int seed)
    {
        using var dir = new TempDirectory();
        using var expected = new ExpectedDisk(Path.Combine(dir.Path, "expected.raw"), Size);
        VhdxFile? parent = null;
        VhdxParent? link = null;
        string path = Path.Combine(dir.Path, "disk.vhdx");
        if (differencing)
        {
            string basePath = Path.Combine(dir.Path, "base.vhdx");
            using (var b = VhdxFile.Create(basePath, new VhdxCreateOptions { VirtualSize = Size, BlockSize = 1 << 20 }))
                await RandomOperations(b, expected, seed * 31, 30, 1 << 20);
            parent = VhdxFile.Open(basePath, Guid.Empty, writable: false);
            link = VhdxParent.For(path, basePath, parent.DataWriteGuid);
        }
        try
        {
            // A 1 MiB log so the ring restarts (new LogGuid) several times during the run.
            var vhdx = VhdxFile.Create(path, new VhdxCreateOptions { VirtualSize = Size, BlockSize = 1 << 20, LogSize = 1 << 20, Parent = link });
            for (int phase = 0; phase < 5; phase++)
            {
                await RandomOperations(vhdx, expected, seed * 100 + phase, 30, 1 << 20);
                Assert.Equal(IoStatus.Ok, await vhdx.FlushAsync());
                string copy = Path.Combine(dir.Path, $"phase{phase}.vhdx");
                File.Copy(path, copy);   // log entry durable and applied in place (not yet synced): LogGuid set
                await VerifyCopy(copy, expected, parent, logPending: true, dir.Path);
                File.Delete(copy);
            }
            // The instant between the durable log entry and the in-place application.
            await RandomOperations(vhdx, expected, seed * 100 + 9, 40, 1 << 20);
            vhdx.StopBeforeApplyForTest = true;
            Assert.Equal(IoStatus.Ok, await vhdx.FlushAsync());
            string last = Path.Combine(dir.Path, "crash.vhdx");
            File.Copy(path, last);
            vhdx.Dispose();
            await VerifyCopy(last, expected, parent, logPending: true, dir.Path);
        }
        finally
        {
            parent?.Dispose();
        }
    }

    [Fact]
    public async Task Unflushed_writes_may_be_lost_but_the_file_opens_and_keeps_flushed_data()
    {
        using var dir = new TempDirectory();
        string path = Path.Combine(dir.Path, "disk.vhdx");
        using var expected = new ExpectedDisk(Path.Combine(dir.Path, "expected.raw"), Size);
        using var vhdx = VhdxFile.Create(path, new VhdxCreateOptions { VirtualSize = Size, BlockSize = 1 << 20, LogSize = 1 << 20 });
        await RandomOperations(vhdx, expected, 8, 40, 1 << 20);
        Assert.Equal(IoStatus.Ok, await vhdx.FlushAsync());
        byte[] flushed = expected.Read(0, (int)Size);
        // Writes to fresh blocks after the flush: their BAT entries are only in memory when the copy is taken.
        var data = new byte[3 << 20];
        new Random(1).NextBytes(data);
        await WriteAsync(vhdx, 20L << 20, data);
        string copy = Path.Combine(dir.Path, "copy.vhdx");
        File.Copy(path, copy);
        using (var reopened = VhdxFile.Open(copy, Guid.Empty, writable: true))
        {
            var all = await ReadAll(reopened, null);
            Assert.True(Same(all[..(20 << 20)], flushed[..(20 << 20)]));
        }
        await AssertQemuCheckClean(copy);
    }

    [Fact]
    public async Task A_corrupt_log_that_must_be_replayed_is_refused_naming_the_log()
    {
        using var dir = new TempDirectory();
        string path = Path.Combine(dir.Path, "disk.vhdx");
        using var expected = new ExpectedDisk(Path.Combine(dir.Path, "expected.raw"), Size);
        var vhdx = VhdxFile.Create(path, new VhdxCreateOptions { VirtualSize = Size, BlockSize = 1 << 20, LogSize = 1 << 20 });
        await RandomOperations(vhdx, expected, 12, 20, 1 << 20);
        vhdx.StopBeforeApplyForTest = true;
        Assert.Equal(IoStatus.Ok, await vhdx.ZeroAsync(0, 1 << 20, deallocate: true, forceUnitAccess: false));
        await WriteAsync(vhdx, 0, new byte[4096]);   // a fresh block: the flush has a BAT page to log
        Assert.Equal(IoStatus.Ok, await vhdx.FlushAsync());
        vhdx.Dispose();
        Assert.NotEqual(0, (await QemuImg("info", "-f", "vhdx", path)).ExitCode);   // the log needs replay
        // Damage every data sector in the log (1 MiB at 1 MiB): no entry can be valid any more.
        var bytes = File.ReadAllBytes(path);
        int damaged = 0;
        for (int at = 1 << 20; at < 2 << 20; at += 4096)
        {
            if (BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan(at)) is 0x61746164 /* data */ or 0x65676F6C /* loge */)
            {
                bytes[at + 200] ^= 0x5A;
                damaged++;
            }
        }
        Assert.True(damaged > 0);
        File.WriteAllBytes(path, bytes);
        foreach (bool writable in new[] { false, true })
        {
            var ex = Assert.Throws<StorageException>(() => VhdxFile.Open(path, Guid.Empty, writable));
            Assert.Contains(path, ex.Message);
            Assert.Contains("log", ex.Message);
        }
    }
}
