using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Vhdx;
using ISCSISnap.Tests.Support;
using Xunit;
using static ISCSISnap.Tests.Vhdx.VhdxTestSupport;

namespace ISCSISnap.Tests.Vhdx;

/// <summary>Files made and written by QEMU are read and written by VhdxFile, and QEMU still accepts them afterwards.</summary>
public sealed class VhdxQemuInteropTests
{
    private static async Task QemuIo(string path, params string[] commands)
    {
        var args = new List<string> { "-f", "vhdx" };
        foreach (var c in commands) { args.Add("-c"); args.Add(c); }
        args.Add(path);
        var result = await Tool.RunAsync("qemu-io", args);
        Assert.True(result.ExitCode == 0 && !result.Output.Contains("failed", StringComparison.OrdinalIgnoreCase), $"qemu-io: {result.Output}");
    }

    private static void Pattern(ExpectedDisk expected, long offset, int length, byte value)
    {
        var data = new byte[length];
        Array.Fill(data, value);
        expected.Write(offset, data);
    }

    [Theory]
    [InlineData("block_size=1M,subformat=dynamic", 1)]
    [InlineData("block_size=8M,subformat=dynamic", 8)]
    [InlineData("block_size=32M,subformat=dynamic", 32)]
    [InlineData("block_size=8M,subformat=dynamic,block_state_zero=off", 8)]
    [InlineData("block_size=8M,subformat=fixed", 8)]
    [InlineData("block_size=8M,subformat=fixed,block_state_zero=off", 8)]
    public async Task Qemu_created_files_are_read_written_and_still_valid_for_qemu(string options, int blockMiB)
    {
        using var dir = new TempDirectory();
        string path = Path.Combine(dir.Path, "q.vhdx");
        long size = 48L << 20;
        var create = await QemuImg("create", "-f", "vhdx", "-o", options, path, size.ToString());
        Assert.True(create.ExitCode == 0, create.Output);
        using var expected = new ExpectedDisk(Path.Combine(dir.Path, "expected.raw"), size);
        await QemuIo(path, "write -P 0xab 0 1M", "write -P 0xcd 5M 4k", "write -P 0x11 40M 512", "write -P 0x22 47M 1M");
        Pattern(expected, 0, 1 << 20, 0xab);
        Pattern(expected, 5 << 20, 4096, 0xcd);
        Pattern(expected, 40 << 20, 512, 0x11);
        Pattern(expected, 47 << 20, 1 << 20, 0x22);

        using (var ro = VhdxFile.Open(path, Guid.Empty, writable: false))
        {
            Assert.Equal(blockMiB << 20, ro.BlockSize);
            Assert.Equal(512, ro.LogicalSectorSize);
            await AssertContentEquals(ro, expected);
        }
        using (var rw = VhdxFile.Open(path, Guid.Empty, writable: true))
        {
            await RandomOperations(rw, expected, blockMiB * 7 + options.Length, 50, blockMiB << 20);
            await AssertContentEquals(rw, expected);
        }
        await AssertQemuCheckClean(path);
        await AssertQemuIdentical(path, expected.Path);

        // QEMU writes again after our session (our BAT and headers are acceptable to its writer), then we read it.
        await QemuIo(path, "write -P 0x77 2M 64k", "write -P 0x78 30M 3M");
        Pattern(expected, 2 << 20, 64 << 10, 0x77);
        Pattern(expected, 30 << 20, 3 << 20, 0x78);
        expected.Flush();
        await AssertQemuCheckClean(path);
        await AssertQemuIdentical(path, expected.Path);
        using (var ro = VhdxFile.Open(path, Guid.Empty, writable: false))
            await AssertContentEquals(ro, expected);
    }

    [Fact]
    public async Task Qemu_cannot_make_4096_byte_sector_vhdx_so_we_make_and_check_our_own()
    {
        // qemu-img 7.2 has no logical_sector_size option for vhdx (and cannot open such files); the round trip with
        // 4096-byte sectors is VhdxRoundTripTests.Logical_sector_4096_files_round_trip_through_our_reader.
        var help = await QemuImg("create", "-f", "vhdx", "-o", "help");
        Assert.DoesNotContain("logical_sector_size", help.Output);
    }

    [Fact]
    public async Task Qemu_replays_a_log_we_left_dirty()
    {
        using var dir = new TempDirectory();
        string path = Path.Combine(dir.Path, "dirty.vhdx");
        long size = 32L << 20;
        using var expected = new ExpectedDisk(Path.Combine(dir.Path, "expected.raw"), size);
        var vhdx = VhdxFile.Create(path, new VhdxCreateOptions { VirtualSize = size, BlockSize = 1 << 20, LogSize = 1 << 20 });
        await RandomOperations(vhdx, expected, 21, 40, 1 << 20);
        vhdx.StopBeforeApplyForTest = true;
        var more = new byte[3 << 20];
        new Random(4).NextBytes(more);
        await WriteAsync(vhdx, 20L << 20, more);
        expected.Write(20L << 20, more);
        expected.Flush();
        Assert.Equal(IoStatus.Ok, await vhdx.FlushAsync());   // durable through the log, not yet applied in place
        vhdx.Dispose();

        var info = await QemuImg("info", "-f", "vhdx", path);
        Assert.NotEqual(0, info.ExitCode);   // QEMU refuses read-only opens of a file whose log needs replay
        var repair = await QemuImg("check", "-r", "all", "-f", "vhdx", path);
        Assert.True(repair.ExitCode == 0, repair.Output);
        await AssertQemuCheckClean(path);
        await AssertQemuIdentical(path, expected.Path);
    }
}
