using System.Buffers;
using System.Security.Cryptography;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Disks;
using ISCSISnap.Storage.Vhdx;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Chains;

/// <summary>
/// Disks made from existing files: raw images, VHDX files QEMU made, and Hyper-V style checkpoint chains found
/// through their parent locators. The imported files are read, never written. Broken chains are refused naming
/// the file and the fault.
/// </summary>
public sealed class DiskImportTests : IDisposable
{
    private readonly TempDirectory _directory = new();
    private string Store => Path.Combine(_directory.Path, "store");

    public void Dispose() => _directory.Dispose();

    private static byte[] Random(int seed, int length)
    {
        var bytes = new byte[length];
        new Random(seed).NextBytes(bytes);
        return bytes;
    }

    private static async Task<byte[]> ReadAllAsync(ChainDevice device)
    {
        var bytes = new byte[device.Length];
        for (long offset = 0; offset < bytes.Length; offset += 4 << 20)
        {
            int n = (int)Math.Min(4 << 20, bytes.Length - offset);
            Assert.Equal(IoStatus.Ok, await device.ReadAsync(offset, bytes.AsMemory((int)offset, n)));
        }
        return bytes;
    }

    private static async Task WriteAsync(VhdxFile file, long offset, byte[] data)
    {
        Assert.Equal(IoStatus.Ok, await file.WriteAsync(offset, new ReadOnlySequence<byte>(data), forceUnitAccess: false));
    }

    /// <summary>base.vhdx ← mid.avhdx ← top.avhdx, each writing a slice; returns the flattened content.</summary>
    private async Task<byte[]> MakeCheckpointChainAsync(string directory, long size = 8L << 20)
    {
        Directory.CreateDirectory(directory);
        var expected = new byte[size];
        string basePath = Path.Combine(directory, "base.vhdx"), midPath = Path.Combine(directory, "mid.avhdx"), topPath = Path.Combine(directory, "top.avhdx");
        Guid linkage;
        using (var vhdx = VhdxFile.Create(basePath, new VhdxCreateOptions { VirtualSize = size, BlockSize = 1 << 20 }))
        {
            var data = Random(1, 3 << 20);
            await WriteAsync(vhdx, 0, data);
            data.CopyTo(expected, 0);
            Assert.Equal(IoStatus.Ok, vhdx.Seal());
            linkage = vhdx.DataWriteGuid;
        }
        using (var vhdx = VhdxFile.Create(midPath, new VhdxCreateOptions { VirtualSize = size, Parent = VhdxParent.For(midPath, basePath, linkage) }))
        {
            var data = Random(2, 1536 * 512);   // partial blocks: the sector bitmap decides
            await WriteAsync(vhdx, (2 << 20) + 512, data);
            data.CopyTo(expected, (2 << 20) + 512);
            Assert.Equal(IoStatus.Ok, vhdx.Seal());
            linkage = vhdx.DataWriteGuid;
        }
        using (var vhdx = VhdxFile.Create(topPath, new VhdxCreateOptions { VirtualSize = size, Parent = VhdxParent.For(topPath, midPath, linkage) }))
        {
            var data = Random(3, 4096);
            await WriteAsync(vhdx, 5 << 20, data);
            data.CopyTo(expected, 5 << 20);
            Assert.Equal(IoStatus.Ok, await vhdx.ZeroAsync(0, 1 << 20, deallocate: true, forceUnitAccess: false));
            expected.AsSpan(0, 1 << 20).Clear();
            Assert.Equal(IoStatus.Ok, vhdx.Seal());
        }
        return expected;
    }

    private static string Sha(string path) => Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(path)));

    [Fact]
    public async Task A_raw_image_becomes_a_read_only_base_under_a_new_head()
    {
        string image = Path.Combine(_directory.Path, "disk.raw");
        var content = Random(9, 4 << 20);
        File.WriteAllBytes(image, content);
        await using var manager = DiskManager.Open(Store);
        var disk = await manager.ImportAsync("raw", image);
        Assert.Equal(4L << 20, disk.SizeBytes);
        Assert.Equal(2, disk.Chain.Count);
        var device = await manager.AttachAsync(disk.Id);
        Assert.Equal(content, await ReadAllAsync(device));
        var write = Random(10, 8192);
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(4096, new ReadOnlySequence<byte>(write), WriteFlags.ForceUnitAccess));
        write.CopyTo(content, 4096);
        Assert.Equal(content, await ReadAllAsync(device));
        await manager.DetachAsync(disk.Id);
        Assert.Equal(Random(9, 4 << 20), File.ReadAllBytes(image));   // the imported file is never written

        // Deleting the disk forgets the imported file, never deletes it.
        await manager.DeleteDiskAsync(disk.Id);
        Assert.True(File.Exists(image));
    }

    [Fact]
    public async Task A_vhdx_made_by_qemu_is_imported_and_served_with_its_content()
    {
        string qemuImg = Tool.Require("qemu-img");
        string raw = Path.Combine(_directory.Path, "source.raw"), vhdx = Path.Combine(_directory.Path, "qemu.vhdx");
        var content = Random(11, 16 << 20);
        content.AsSpan(4 << 20, 4 << 20).Clear();
        File.WriteAllBytes(raw, content);
        var converted = await Tool.RunAsync(qemuImg, ["convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic,block_size=8M", raw, vhdx]);
        Assert.True(converted.ExitCode == 0, converted.Output);
        string before = Sha(vhdx);

        await using var manager = DiskManager.Open(Store);
        var disk = await manager.ImportAsync("qemu", vhdx);
        var device = await manager.AttachAsync(disk.Id);
        Assert.Equal(content, await ReadAllAsync(device));
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(0, new ReadOnlySequence<byte>(new byte[512]), WriteFlags.None));
        await manager.DetachAsync(disk.Id);
        Assert.Equal(before, Sha(vhdx));
    }

    [Fact]
    public async Task A_checkpoint_chain_is_found_through_its_locators_even_after_the_folder_moves()
    {
        string original = Path.Combine(_directory.Path, "vm");
        var expected = await MakeCheckpointChainAsync(original);
        string moved = Path.Combine(_directory.Path, "moved-vm");
        Directory.Move(original, moved);

        await using var manager = DiskManager.Open(Store);
        var disk = await manager.ImportAsync("hyperv", Path.Combine(moved, "top.avhdx"));
        Assert.Equal(4, disk.Chain.Count);   // base, mid, top and the appliance's new head
        var device = await manager.AttachAsync(disk.Id);
        Assert.Equal(expected, await ReadAllAsync(device));
        Assert.Equal(3, manager.Snapshots(disk.Id).Count(s => s.External));
    }

    [Fact]
    public async Task A_parent_named_only_by_a_windows_path_is_found_beside_the_child()
    {
        string vm = Path.Combine(_directory.Path, "vm");
        var expected = await MakeCheckpointChainAsync(vm);
        string top = Path.Combine(vm, "top.avhdx");
        Guid linkage;
        using (var mid = VhdxFile.Open(Path.Combine(vm, "mid.avhdx"), Guid.Empty, writable: false)) linkage = mid.DataWriteGuid;
        VhdxFile.RewriteParentLocator(top, new VhdxParent(linkage, RelativePath: null, AbsoluteWin32Path: @"\\?\C:\Hyper-V\Disks\mid.avhdx").ToLocatorEntries());

        await using var manager = DiskManager.Open(Store);
        var disk = await manager.ImportAsync("windows-paths", top);
        Assert.Equal(expected, await ReadAllAsync(await manager.AttachAsync(disk.Id)));
    }

    [Fact]
    public async Task A_missing_parent_is_refused_naming_the_child_and_the_paths_tried()
    {
        string vm = Path.Combine(_directory.Path, "vm");
        await MakeCheckpointChainAsync(vm);
        File.Delete(Path.Combine(vm, "base.vhdx"));
        await using var manager = DiskManager.Open(Store);
        var e = await Assert.ThrowsAsync<StorageException>(() => manager.ImportAsync("broken", Path.Combine(vm, "top.avhdx")));
        Assert.Contains("mid.avhdx", e.Message);
        Assert.Contains("missing", e.Message);
        Assert.Contains("base.vhdx", e.Message);
        Assert.Empty(manager.Disks);
    }

    [Fact]
    public async Task A_parent_changed_after_its_child_was_made_is_refused_by_its_linkage()
    {
        string vm = Path.Combine(_directory.Path, "vm");
        await MakeCheckpointChainAsync(vm);
        using (var mid = VhdxFile.Open(Path.Combine(vm, "mid.avhdx"), Guid.Empty, writable: true))
        {
            await WriteAsync(mid, 0, new byte[512]);   // a write gives the parent a new DataWriteGuid
        }
        await using var manager = DiskManager.Open(Store);
        var e = await Assert.ThrowsAsync<StorageException>(() => manager.ImportAsync("stale", Path.Combine(vm, "top.avhdx")));
        Assert.Contains("top.avhdx", e.Message);
        Assert.Contains("parent_linkage", e.Message);
        Assert.Empty(manager.Disks);
    }

    [Fact]
    public async Task A_parent_chain_that_loops_is_refused()
    {
        string vm = Path.Combine(_directory.Path, "vm");
        await MakeCheckpointChainAsync(vm);
        string mid = Path.Combine(vm, "mid.avhdx"), top = Path.Combine(vm, "top.avhdx");
        Guid topGuid, midGuid;
        using (var f = VhdxFile.Open(top, Guid.Empty, writable: false)) topGuid = f.DataWriteGuid;
        using (var f = VhdxFile.Open(mid, Guid.Empty, writable: false)) midGuid = f.DataWriteGuid;
        // mid now names top as its parent: top → mid → top.
        VhdxFile.RewriteParentLocator(mid, VhdxParent.For(mid, top, topGuid).ToLocatorEntries());
        using (var f = VhdxFile.Open(mid, Guid.Empty, writable: false)) Assert.Equal(midGuid, f.DataWriteGuid);   // a path fix is not a data change
        await using var manager = DiskManager.Open(Store);
        var e = await Assert.ThrowsAsync<StorageException>(() => manager.ImportAsync("loop", top));
        Assert.Contains("loops", e.Message);
        Assert.Empty(manager.Disks);
    }

    [Fact]
    public async Task A_truncated_or_corrupt_file_is_refused_naming_it()
    {
        string vm = Path.Combine(_directory.Path, "vm");
        await MakeCheckpointChainAsync(vm);
        string top = Path.Combine(vm, "top.avhdx");
        await using var manager = DiskManager.Open(Store);

        var bytes = File.ReadAllBytes(top);
        File.WriteAllBytes(top, bytes.AsSpan(0, 200_000).ToArray());
        var e = await Assert.ThrowsAsync<StorageException>(() => manager.ImportAsync("truncated", top));
        Assert.Contains(top, e.Message);

        // Both headers damaged: no valid header is left.
        var damaged = (byte[])bytes.Clone();
        damaged[0x10000 + 100] ^= 1;
        damaged[0x20000 + 100] ^= 1;
        File.WriteAllBytes(top, damaged);
        e = await Assert.ThrowsAsync<StorageException>(() => manager.ImportAsync("bad-crc", top));
        Assert.Contains(top, e.Message);
        Assert.Empty(manager.Disks);
    }

    [Fact]
    public async Task Exports_are_standalone_files_qemu_reads_back_as_the_disk_content()
    {
        string qemuImg = Tool.Require("qemu-img");
        string vm = Path.Combine(_directory.Path, "vm");
        var expected = await MakeCheckpointChainAsync(vm);
        await using var manager = DiskManager.Open(Store);
        var disk = await manager.ImportAsync("exported", Path.Combine(vm, "top.avhdx"));
        var device = await manager.AttachAsync(disk.Id);
        var write = Random(12, 1 << 20);
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(6 << 20, new ReadOnlySequence<byte>(write), WriteFlags.None));
        write.CopyTo(expected, 6 << 20);

        string raw = Path.Combine(_directory.Path, "flat.raw"), vhdx = Path.Combine(_directory.Path, "flat.vhdx");
        await manager.ExportAsync(disk.Id, raw, LayerFormat.Raw);
        await manager.ExportAsync(disk.Id, vhdx, LayerFormat.Vhdx);
        Assert.Equal(expected, File.ReadAllBytes(raw));
        var check = await Tool.RunAsync(qemuImg, ["check", "-f", "vhdx", vhdx]);
        Assert.True(check.ExitCode == 0, check.Output);
        var compare = await Tool.RunAsync(qemuImg, ["compare", "-f", "vhdx", "-F", "raw", vhdx, raw]);
        Assert.True(compare.ExitCode == 0, compare.Output);

        // An existing file is never overwritten.
        await Assert.ThrowsAsync<DiskException>(() => manager.ExportAsync(disk.Id, raw, LayerFormat.Raw));
    }
}
