using System.Buffers;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Disks;
using ISCSISnap.Storage.Filters;
using ISCSISnap.Storage.Filters.BuiltIn;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Filters;

/// <summary>The checksum filter over real VHDX chains: verification, corruption found on disk, snapshots, races, crashes, range changes.</summary>
public sealed class ChecksumFilterTests : DiskManagerTest
{
    private const int Sector = 512;
    private const long Size = 64L << 20;
    private string CrcDirectory => Path.Combine(_directory.Path, "crc");
    private static readonly FilterOptions Strict = new() { OnFault = FailurePolicy.Fail, FailureStatus = IoStatus.NotReady };

    private async Task<(Guid DiskId, ChainDevice Device)> NewDiskAsync(string name = "d")
    {
        var disk = await _manager.CreateAsync(name, Size, Sector, blockSize: 1 << 20);
        return (disk.Id, await _manager.AttachAsync(disk.Id));
    }

    private (FilterEngine Engine, ChecksumFilter Filter, FilterSlot Slot) NewEngine(ChainDevice device, KernelContext? kernel = null, string lun = "lun0")
    {
        var engine = new FilterEngine(device, lun, kernel: kernel);
        var filter = new ChecksumFilter(CrcDirectory, device, checkpointInterval: TimeSpan.Zero);
        var slot = engine.Add(filter, Strict);
        return (engine, filter, slot);
    }

    private static RequestContext Request(IoOperation op, long offset, int length) =>
        new("lun0", "iqn.test:init", "nexus", op, offset, length, DateTimeOffset.UtcNow.AddSeconds(30));

    private static ValueTask<IoStatus> WriteAsync(FilterEngine engine, long offset, byte[] data) =>
        engine.WriteAsync(Request(IoOperation.Write, offset, data.Length), new ReadOnlySequence<byte>(data), WriteFlags.None);

    private static async Task<(IoStatus Status, byte[] Data)> ReadAsync(FilterEngine engine, long offset, int length)
    {
        var buffer = new byte[length];
        var status = await engine.ReadAsync(Request(IoOperation.Read, offset, length), buffer);
        return (status, buffer);
    }

    private static long Counter(FilterSlot slot, string name) => slot.Counters.GetValueOrDefault(name);

    private static byte[] Pattern(int length, int seed)
    {
        var data = new byte[length];
        new Random(seed).NextBytes(data);
        return data;
    }

    /// <summary>Flips a byte of <paramref name="data"/>'s copy in the layer file (found by its content) behind the stack's back.</summary>
    private static void CorruptInFile(string path, byte[] data, int at)
    {
        var bytes = File.ReadAllBytes(path);
        int found = bytes.AsSpan().IndexOf(data.AsSpan(0, 256));
        Assert.True(found >= 0, $"the data is not in {path}");
        Assert.Equal(-1, bytes.AsSpan(found + 1).IndexOf(data.AsSpan(0, 256)));   // one copy only
        using var file = File.Open(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite);
        file.Position = found + at;
        int b = file.ReadByte();
        file.Position = found + at;
        file.WriteByte((byte)(b ^ 0x40));
    }

    [Fact]
    public async Task A_write_read_round_trip_is_verified_and_unwritten_sectors_are_not()
    {
        var (_, device) = await NewDiskAsync();
        var (engine, filter, slot) = NewEngine(device);
        var data = Pattern(8192, 1);
        Assert.Equal(IoStatus.Ok, await WriteAsync(engine, 4096, data));
        var (status, read) = await ReadAsync(engine, 4096, 8192);
        Assert.Equal(IoStatus.Ok, status);
        Assert.Equal(data, read);
        Assert.Equal(16, Counter(slot, "verified"));
        Assert.Equal(0, Counter(slot, "unverified"));

        Assert.Equal(IoStatus.Ok, (await ReadAsync(engine, 1 << 20, 4096)).Status);
        Assert.Equal(8, Counter(slot, "unverified"));
        Assert.Equal(0, Counter(slot, "mismatch"));
        Assert.Equal(0, slot.Faults);
        await filter.DisposeAsync();
    }

    [Fact]
    public async Task A_byte_corrupted_in_the_layer_file_fails_the_read_with_a_medium_error()
    {
        var (diskId, device) = await NewDiskAsync();
        var (engine, filter, slot) = NewEngine(device);
        var logs = new List<string>();
        var data = Pattern(4096, 2);
        Assert.Equal(IoStatus.Ok, await WriteAsync(engine, 64 * 1024, data));
        Assert.Equal(IoStatus.Ok, await device.FlushAsync());
        CorruptInFile(device.Head!.Path, data, 1000);

        var (status, _) = await ReadAsync(engine, 64 * 1024, 4096);
        Assert.Equal(IoStatus.ReadError, status);   // MEDIUM ERROR, unrecovered read error (03/11/00)
        Assert.Equal(1, Counter(slot, "mismatch"));   // sector 1000/512 of the eight
        Assert.Equal(7, Counter(slot, "verified"));
        Assert.Equal(1, slot.SyscallCount("log"));
        // The sectors around it still read.
        Assert.Equal(IoStatus.Ok, (await ReadAsync(engine, 64 * 1024, 512)).Status);
        Assert.Equal(IoStatus.Ok, (await ReadAsync(engine, 64 * 1024 + 1024, 3072)).Status);
        await filter.DisposeAsync();
    }

    [Fact]
    public async Task Corruption_of_a_frozen_snapshot_layer_is_still_found_through_the_new_head()
    {
        var (diskId, device) = await NewDiskAsync();
        var (engine, filter, slot) = NewEngine(device);
        var data = Pattern(4096, 3);
        Assert.Equal(IoStatus.Ok, await WriteAsync(engine, 1 << 20, data));
        var snapshot = await _manager.SnapshotAsync(diskId, "s1");
        Assert.NotEqual(snapshot.Id, device.Head!.DiskId);

        // Read through the new head: the sectors resolve to the frozen layer, whose CRCs are under its (unchanged) ID.
        Assert.Equal(IoStatus.Ok, (await ReadAsync(engine, 1 << 20, 4096)).Status);
        Assert.Equal(8, Counter(slot, "verified"));
        var frozen = device.Layers.Single(l => l.DiskId == snapshot.Id);
        CorruptInFile(frozen.Path, data, 3000);
        Assert.Equal(IoStatus.ReadError, (await ReadAsync(engine, 1 << 20, 4096)).Status);
        Assert.Equal(1, Counter(slot, "mismatch"));

        // A write over it in the new head is verified against the head's store.
        var fresh = Pattern(4096, 4);
        Assert.Equal(IoStatus.Ok, await WriteAsync(engine, 1 << 20, fresh));
        long verified = Counter(slot, "verified");
        var (status, read) = await ReadAsync(engine, 1 << 20, 4096);
        Assert.Equal(IoStatus.Ok, status);
        Assert.Equal(fresh, read);
        Assert.Equal(verified + 8, Counter(slot, "verified"));
        await filter.DisposeAsync();
    }

    [Fact]
    public async Task Revert_and_clone_keep_verifying_the_snapshots_data()
    {
        var (diskId, device) = await NewDiskAsync();
        var (engine, filter, slot) = NewEngine(device);
        var baseData = Pattern(8192, 5);
        Assert.Equal(IoStatus.Ok, await WriteAsync(engine, 2 << 20, baseData));
        var snapshot = await _manager.SnapshotAsync(diskId, "s1");
        Assert.Equal(IoStatus.Ok, await WriteAsync(engine, 2 << 20, Pattern(8192, 6)));   // the head's own version

        await _manager.RevertAsync(diskId, snapshot.Id);
        var (status, read) = await ReadAsync(engine, 2 << 20, 8192);
        Assert.Equal(IoStatus.Ok, status);
        Assert.Equal(baseData, read);
        Assert.Equal(16, Counter(slot, "verified"));   // the snapshot's CRCs, not the discarded head's
        Assert.Equal(0, Counter(slot, "mismatch"));

        var clone = await _manager.CloneAsync(snapshot.Id, "c1");
        var cloneDevice = await _manager.AttachAsync(clone.Id);
        var (cloneEngine, cloneFilter, cloneSlot) = NewEngine(cloneDevice, lun: "lun1");
        (status, read) = await ReadAsync(cloneEngine, 2 << 20, 8192);
        Assert.Equal(IoStatus.Ok, status);
        Assert.Equal(baseData, read);
        Assert.Equal(16, Counter(cloneSlot, "verified"));

        // Both LUNs see the snapshot's corruption (they share its store).
        CorruptInFile(device.Layers.Single(l => l.DiskId == snapshot.Id).Path, baseData, 100);
        Assert.Equal(IoStatus.ReadError, (await ReadAsync(cloneEngine, 2 << 20, 8192)).Status);
        Assert.Equal(IoStatus.ReadError, (await ReadAsync(engine, 2 << 20, 8192)).Status);
        await cloneFilter.DisposeAsync();
        await _manager.DetachAsync(clone.Id);
        await filter.DisposeAsync();
    }

    [Fact]
    public async Task Concurrent_overlapping_writes_and_reads_never_give_a_false_mismatch()
    {
        using var kernel = new KernelContext(workers: 2, name: "crc-io");
        var (_, device) = await NewDiskAsync();
        var (engine, filter, slot) = NewEngine(device, kernel);
        const int Hot = 64 * 1024;   // a small area, so writes overlap often
        var failures = new List<string>();
        var tasks = Enumerable.Range(0, 8).Select(t => Task.Run(async () =>
        {
            var random = new Random(100 + t);
            for (int i = 0; i < 150; i++)
            {
                int length = random.Next(1, 33) * Sector;
                long offset = random.Next((Hot - length) / Sector + 1) * (long)Sector;
                IoStatus status;
                if (random.Next(2) == 0) status = await WriteAsync(engine, offset, Pattern(length, random.Next()));
                else status = (await ReadAsync(engine, offset, length)).Status;
                if (status != IoStatus.Ok) lock (failures) failures.Add($"task {t} op {i} at {offset}+{length}: {status}");
            }
        })).ToArray();
        await Task.WhenAll(tasks);
        Assert.Empty(failures);
        Assert.Equal(0, Counter(slot, "mismatch"));
        Assert.Equal(0, slot.Faults);

        // Quiet now: everything reads back verified or (after a conflict) unverified, never mismatched.
        Assert.Equal(IoStatus.Ok, (await ReadAsync(engine, 0, Hot)).Status);
        Assert.Equal(0, Counter(slot, "mismatch"));
        Assert.True(Counter(slot, "verified") > 0);
        await filter.DisposeAsync();
    }

    [Fact]
    public async Task After_a_crash_dirty_regions_are_unrecorded_and_clean_regions_still_verify()
    {
        var (_, device) = await NewDiskAsync();
        var (engine, filter, _) = NewEngine(device);
        var clean = Pattern(4096, 7);
        var dirty = Pattern(4096, 8);
        long cleanAt = 16L << 20, dirtyAt = 0;   // different 8 MiB regions
        Assert.Equal(IoStatus.Ok, await WriteAsync(engine, cleanAt, clean));
        Assert.Equal(IoStatus.Ok, await WriteAsync(engine, dirtyAt, dirty));
        await filter.CheckpointAsync();
        var headStore = await filter.StoreOfAsync(device.Head!.DiskId);
        Assert.Equal(0, headStore.DirtyRegions);

        // A new write marks its region; no checkpoint follows (the crash), and the data changes behind our back.
        Assert.Equal(IoStatus.Ok, await WriteAsync(engine, dirtyAt, Pattern(4096, 9)));
        Assert.Equal(1, headStore.DirtyRegions);
        filter.Abandon();
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(dirtyAt, new ReadOnlySequence<byte>(Pattern(4096, 10)), WriteFlags.None));
        Assert.Equal(IoStatus.Ok, await device.FlushAsync());
        CorruptInFile(device.Head!.Path, clean, 10);

        var engine2 = new FilterEngine(device, "lun0");
        var reopened = new ChecksumFilter(CrcDirectory, device, checkpointInterval: TimeSpan.Zero);
        var slot2 = engine2.Add(reopened, Strict);
        Assert.Equal(1, (await reopened.StoreOfAsync(device.Head!.DiskId)).RegionsResetAtOpen);
        Assert.Equal(IoStatus.Ok, (await ReadAsync(engine2, dirtyAt, 4096)).Status);
        Assert.Equal(8, Counter(slot2, "unverified"));
        Assert.Equal(IoStatus.ReadError, (await ReadAsync(engine2, cleanAt, 4096)).Status);
        Assert.Equal(1, Counter(slot2, "mismatch"));
        await reopened.DisposeAsync();
    }

    [Fact]
    public async Task A_clean_close_leaves_no_region_marked()
    {
        var (_, device) = await NewDiskAsync();
        var (engine, filter, _) = NewEngine(device);
        var data = Pattern(4096, 11);
        Assert.Equal(IoStatus.Ok, await WriteAsync(engine, 0, data));
        Assert.Equal(IoStatus.Ok, await WriteAsync(engine, 40L << 20, data));
        Assert.Equal(2, (await filter.StoreOfAsync(device.Head!.DiskId)).DirtyRegions);
        await filter.DisposeAsync();

        var (engine2, reopened, slot2) = NewEngine(device);
        Assert.Equal(0, (await reopened.StoreOfAsync(device.Head!.DiskId)).RegionsResetAtOpen);
        Assert.Equal(IoStatus.Ok, (await ReadAsync(engine2, 40L << 20, 4096)).Status);
        Assert.Equal(8, Counter(slot2, "verified"));   // the CRCs were made durable, not dropped
        await reopened.DisposeAsync();
    }

    [Fact]
    public async Task Range_changes_announced_to_the_filter_never_give_false_errors_and_unannounced_ones_do()
    {
        var (_, device) = await NewDiskAsync();
        var (engine, filter, slot) = NewEngine(device);
        var data = Pattern(65536, 12);
        Assert.Equal(IoStatus.Ok, await WriteAsync(engine, 0, data));

        // UNMAP of part of it, announced.
        await engine.RangeChangingAsync(4096, 8192);
        Assert.Equal(IoStatus.Ok, await device.WriteZeroesAsync(4096, 8192, deallocate: true, WriteFlags.None));
        engine.RangeChanged(4096, 8192);
        // WRITE SAME of a pattern (data not passing through the stack), announced.
        var same = Pattern(Sector, 13);
        await engine.RangeChangingAsync(16384, 4096);
        for (int i = 0; i < 8; i++) Assert.Equal(IoStatus.Ok, await device.WriteAsync(16384 + i * Sector, new ReadOnlySequence<byte>(same), WriteFlags.None));
        engine.RangeChanged(16384, 4096);

        var (status, read) = await ReadAsync(engine, 0, 65536);
        Assert.Equal(IoStatus.Ok, status);
        Assert.All(read.AsSpan(4096, 8192).ToArray(), b => Assert.Equal(0, b));
        Assert.Equal(0, Counter(slot, "mismatch"));
        Assert.Equal(24, Counter(slot, "unverified"));
        Assert.Equal(128 - 24, Counter(slot, "verified"));

        // The same change unannounced is what the filter is there to catch.
        for (int i = 0; i < 8; i++) Assert.Equal(IoStatus.Ok, await device.WriteAsync(32768 + i * Sector, new ReadOnlySequence<byte>(same), WriteFlags.None));
        Assert.Equal(IoStatus.ReadError, (await ReadAsync(engine, 32768, 4096)).Status);
        await filter.DisposeAsync();
    }
}
