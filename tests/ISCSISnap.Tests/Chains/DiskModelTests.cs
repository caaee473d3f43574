using System.Buffers;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Disks;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Chains;

/// <summary>
/// Disks checked against the obviously right answer: a flat byte array per disk (and per snapshot) and, per sector,
/// the disk ID of the layer that last wrote it. Random writes, zeroing, snapshots, merges, reverts, clones and
/// reattaches are applied to both; every read must give the model's bytes and the model's origin.
/// </summary>
public sealed class DiskModelTests : IDisposable
{
    private const int Sector = 512;
    private readonly TempDirectory _directory = new();

    public void Dispose() => _directory.Dispose();

    /// <summary>The expected state of one disk.</summary>
    private sealed class Model(long size)
    {
        public byte[] Bytes = new byte[size];
        public Guid[] Origins = new Guid[size / Sector];

        public Model Copy() => new(Bytes.Length) { Bytes = (byte[])Bytes.Clone(), Origins = (Guid[])Origins.Clone() };

        public void Write(long offset, ReadOnlySpan<byte> data, Guid layer)
        {
            data.CopyTo(Bytes.AsSpan((int)offset));
            Origins.AsSpan((int)(offset / Sector), data.Length / Sector).Fill(layer);
        }

        public void Zero(long offset, long length, Guid layer)
        {
            Bytes.AsSpan((int)offset, (int)length).Clear();
            Origins.AsSpan((int)(offset / Sector), (int)(length / Sector)).Fill(layer);
        }

        public void Retire(Guid layer, Guid into)
        {
            for (int i = 0; i < Origins.Length; i++) if (Origins[i] == layer) Origins[i] = into;
        }
    }

    /// <summary>
    /// The base of a chain is a dynamic VHDX: it stores whole blocks, so sectors never written but inside a block it
    /// allocated come from it (as zeros), and a block it zeroed may simply be unallocated again. Below the base there
    /// is nothing, so "from the base" and "never written" are the same zeros (the content is checked separately).
    /// </summary>
    private static bool SameOrigin(Guid expected, Guid actual, ChainDevice device) =>
        expected == actual
        || (expected == Guid.Empty && actual == device.Layers[0].DiskId)
        || (expected == device.Layers[0].DiskId && actual == Guid.Empty);

    private static async Task AssertContentAsync(ChainDevice device, Model model, string when, Random? random = null, int samples = 0, bool checkOrigins = true)
    {
        Assert.Equal(model.Bytes.Length, device.Length);
        var buffer = new byte[4 << 20];
        var origins = new List<OwnedRun>();
        IEnumerable<(long Offset, int Length)> ranges = random is null
            ? Enumerable.Range(0, model.Bytes.Length / buffer.Length).Select(i => ((long)i * buffer.Length, buffer.Length))
            : Enumerable.Range(0, samples).Select(_ =>
            {
                long offset = random.NextInt64(model.Bytes.Length / Sector) * Sector;
                int length = (int)Math.Min(model.Bytes.Length - offset, random.Next(1, 513) * Sector);
                return (offset, length);
            });
        foreach (var (offset, length) in ranges)
        {
            origins.Clear();
            Assert.Equal(IoStatus.Ok, await device.ReadAsync(offset, buffer.AsMemory(0, length), origins));
            if (!buffer.AsSpan(0, length).SequenceEqual(model.Bytes.AsSpan((int)offset, length)))
            {
                int at = buffer.AsSpan(0, length).CommonPrefixLength(model.Bytes.AsSpan((int)offset, length));
                Assert.Fail($"{when}: byte {offset + at} (sector {(offset + at) / Sector}) differs from the model");
            }
            long expectedOffset = offset;
            foreach (var run in checkOrigins ? origins : [])
            {
                Assert.Equal(expectedOffset, run.Offset);
                for (long s = run.Offset / Sector; s < (run.Offset + run.Length) / Sector; s++)
                    if (!SameOrigin(model.Origins[s], run.DiskId, device))
                        Assert.Fail($"{when}: sector {s} came from layer {run.DiskId}, the model says {model.Origins[s]}; chain {string.Join(" ", device.Layers.Select(l => l.DiskId.ToString()[..8]))}");
                expectedOffset += run.Length;
            }
            if (checkOrigins) Assert.Equal(offset + length, expectedOffset);
        }
    }

    /// <summary>Seeds 1-4; ISCSISNAP_MODEL_SEEDS=N runs seeds 1..N instead (longer runs by hand).</summary>
    public static IEnumerable<object[]> Seeds() =>
        Enumerable.Range(1, int.TryParse(Environment.GetEnvironmentVariable("ISCSISNAP_MODEL_SEEDS"), out int n) ? n : 4).Select(seed => new object[] { seed });

    [Theory]
    [MemberData(nameof(Seeds))]
    public async Task Random_operations_on_disks_snapshots_and_clones_match_the_model(int seed)
    {
        const long size = 32L << 20;
        var random = new Random(seed);
        await using var manager = DiskManager.Open(Path.Combine(_directory.Path, "disks"));
        var disk = await manager.CreateAsync("model", size, Sector, blockSize: 1 << 20);
        var device = await manager.AttachAsync(disk.Id);
        var model = new Model(size);
        var snapshots = new Dictionary<Guid, Model>();   // frozen content of each snapshot
        var data = new byte[1 << 20];
        int merges = 0;

        for (int step = 0; step < 200; step++)
        {
            int op = random.Next(100);
            Guid head = device.Head!.DiskId;
            if (op < 50)
            {
                int length = random.Next(1, random.Next(2) == 0 ? 9 : 2049) * Sector;
                long offset = random.NextInt64((size - length) / Sector + 1) * Sector;
                random.NextBytes(data.AsSpan(0, length));
                var flags = random.Next(4) == 0 ? WriteFlags.ForceUnitAccess : WriteFlags.None;
                Assert.Equal(IoStatus.Ok, await device.WriteAsync(offset, new ReadOnlySequence<byte>(data, 0, length), flags));
                model.Write(offset, data.AsSpan(0, length), head);
            }
            else if (op < 62)
            {
                long length = random.Next(1, 4096) * (long)Sector;
                long offset = random.NextInt64((size - length) / Sector + 1) * Sector;
                Assert.Equal(IoStatus.Ok, await device.WriteZeroesAsync(offset, length, deallocate: random.Next(2) == 0, WriteFlags.None));
                model.Zero(offset, length, head);
            }
            else if (op < 72)
            {
                var snapshot = await manager.SnapshotAsync(disk.Id, $"s{step}");
                Assert.Equal(head, snapshot.Id);   // the frozen head keeps its disk ID
                snapshots[snapshot.Id] = model.Copy();
                // Flat copies are big: follow at most eight snapshots (the others stay on disk, unchecked).
                if (snapshots.Count > 8) snapshots.Remove(snapshots.Keys.First());
                Assert.NotEqual(head, device.Head!.DiskId);
            }
            else if (op < 80 && snapshots.Count > 0)
            {
                // Delete a snapshot: removed outright or merged into its only child; the disk's content stays.
                var all = manager.Snapshots(disk.Id);
                var inChain = all.Where(x => x.InChain).ToList();
                var victim = inChain.Count > 0 && random.Next(3) > 0 ? inChain[random.Next(inChain.Count)] : all[random.Next(all.Count)];
                try
                {
                    await manager.DeleteSnapshotAsync(victim.Id);
                    if (victim.InChain) merges++;
                    var info = manager.GetDisk(disk.Id);
                    Assert.DoesNotContain(victim.Id, info.Chain);
                    // Sectors it held now come from the child it merged into: the next layer of the chain, or an
                    // off-chain snapshot above it (merged into within a clone's chain).
                    Guid? childOfVictim = all.FirstOrDefault(s => s.ParentId == victim.Id)?.Id ?? (victim.InChain ? info.HeadId : null);
                    if (childOfVictim is { } into)
                    {
                        model.Retire(victim.Id, into);
                        foreach (var m in snapshots.Values) m.Retire(victim.Id, into);
                    }
                    snapshots.Remove(victim.Id);
                }
                catch (DiskException e) when (e.Fault == DiskFault.Conflict)
                {
                    // A base, or a snapshot with clones on it: refused, nothing changed.
                }
            }
            else if (op < 86 && snapshots.Count > 0)
            {
                var target = snapshots.Keys.ElementAt(random.Next(snapshots.Count));
                await manager.RevertAsync(disk.Id, target);
                model = snapshots[target].Copy();
                // Sectors the old head owned in the snapshot's time are the snapshot's (the old head is the snapshot).
                await AssertContentAsync(device, model, $"step {step}: after revert to {target}", random, 64);
            }
            else if (op < 91 && snapshots.Count > 0)
            {
                var source = snapshots.Keys.ElementAt(random.Next(snapshots.Count));
                var clone = await manager.CloneAsync(source, $"clone{step}");
                var cloneDevice = await manager.AttachAsync(clone.Id);
                await AssertContentAsync(cloneDevice, snapshots[source], $"step {step}: clone of {source}", random, 64);
                // Writing to the clone changes neither the disk nor the snapshot.
                random.NextBytes(data.AsSpan(0, Sector));
                Assert.Equal(IoStatus.Ok, await cloneDevice.WriteAsync(0, new ReadOnlySequence<byte>(data, 0, Sector), WriteFlags.None));
                await manager.DetachAsync(clone.Id);
            }
            else if (op < 95)
            {
                await manager.DetachAsync(disk.Id);
                device = await manager.AttachAsync(disk.Id);
                await AssertContentAsync(device, model, $"step {step}: after reattach", random, 64);
                Assert.Null(await manager.FindMapDisagreementAsync(disk.Id));
            }
            else
            {
                await AssertContentAsync(device, model, $"step {step}", random, 32);
                // The map kept up by writes, merges and zeroing equals one rebuilt from the images.
                long? disagreement = await manager.FindMapDisagreementAsync(disk.Id);
                Assert.True(disagreement is null, $"step {step}: the chain map disagrees with the images at sector {disagreement}");
            }
        }
        if (merges == 0)
        {
            // Every run merges at least once: a fresh snapshot has one child (the head) and no clones.
            var last = await manager.SnapshotAsync(disk.Id, "last");
            await manager.DeleteSnapshotAsync(last.Id);
            model.Retire(last.Id, device.Head!.DiskId);
            foreach (var m in snapshots.Values) m.Retire(last.Id, device.Head!.DiskId);
            Assert.Null(await manager.FindMapDisagreementAsync(disk.Id));
        }
        await AssertContentAsync(device, model, "the end");
        await manager.DetachAsync(disk.Id);

        // A new manager (a restart) sees the same disk, its snapshots and their content.
        await using var reopened = DiskManager.Open(Path.Combine(_directory.Path, "disks"));
        var again = await reopened.AttachAsync(disk.Id);
        await AssertContentAsync(again, model, "after reopening the store");
        foreach (var (id, expected) in snapshots.Where(s => reopened.Snapshots(disk.Id).Any(x => x.Id == s.Key && x.InChain)).Take(2))
        {
            string path = Path.Combine(_directory.Path, $"export-{id:N}.raw");
            await reopened.ExportAsync(id, path, LayerFormat.Raw);
            Assert.True(File.ReadAllBytes(path).AsSpan().SequenceEqual(expected.Bytes), $"export of snapshot {id}");
        }
    }

    [Fact]
    public async Task A_chain_reads_the_same_at_depth_one_and_depth_forty_and_the_map_file_is_reused_or_rebuilt()
    {
        const long size = 16L << 20;
        await using var manager = DiskManager.Open(Path.Combine(_directory.Path, "disks"));
        var disk = await manager.CreateAsync("deep", size, Sector);
        var device = await manager.AttachAsync(disk.Id);
        var model = new Model(size);
        var data = new byte[64 << 10];
        var random = new Random(7);
        for (int layer = 0; layer < 40; layer++)
        {
            // Each layer owns its own slice plus some random overwrites.
            long offset = layer * (size / 40) / Sector * Sector;
            random.NextBytes(data);
            Assert.Equal(IoStatus.Ok, await device.WriteAsync(offset, new ReadOnlySequence<byte>(data), WriteFlags.None));
            model.Write(offset, data, device.Head!.DiskId);
            await manager.SnapshotAsync(disk.Id, $"layer {layer}");
        }
        Assert.Equal(41, manager.GetDisk(disk.Id).Chain.Count);
        await AssertContentAsync(device, model, "depth 41");
        await manager.DetachAsync(disk.Id);

        string map = Directory.GetFiles(Path.Combine(_directory.Path, "disks"), "*.map").Single();
        var stamp = File.GetLastWriteTimeUtc(map);
        device = await manager.AttachAsync(disk.Id);
        Assert.Equal(stamp, File.GetLastWriteTimeUtc(map));   // reused as it was
        await AssertContentAsync(device, model, "map file reused");
        await manager.DetachAsync(disk.Id);

        File.Delete(map);
        device = await manager.AttachAsync(disk.Id);
        Assert.True(File.Exists(map), "a missing map is rebuilt from the images and saved");
        await AssertContentAsync(device, model, "map rebuilt");
        await manager.DetachAsync(disk.Id);

        // A damaged map (a flipped byte) is detected by its checksum and rebuilt, never trusted.
        var bytes = File.ReadAllBytes(map);
        bytes[bytes.Length / 2] ^= 0x5A;
        File.WriteAllBytes(map, bytes);
        device = await manager.AttachAsync(disk.Id);
        await AssertContentAsync(device, model, "damaged map rebuilt");
        await manager.DetachAsync(disk.Id);
    }

    [Fact]
    public async Task Unmap_in_the_head_hides_the_parents_data_and_reports_deallocated()
    {
        const long size = 8L << 20;
        await using var manager = DiskManager.Open(Path.Combine(_directory.Path, "disks"));
        var disk = await manager.CreateAsync("thin", size, Sector, blockSize: 1 << 20);
        var device = await manager.AttachAsync(disk.Id);
        var data = new byte[4 << 20];
        new Random(3).NextBytes(data);
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(0, new ReadOnlySequence<byte>(data), WriteFlags.None));
        await manager.SnapshotAsync(disk.Id, "full");
        // The head's blocks are 2 MiB: unmapping one whole block deallocates it; a partial one is written with zeros.
        Assert.Equal(IoStatus.Ok, await device.WriteZeroesAsync(2 << 20, 2 << 20, deallocate: true, WriteFlags.None));
        Assert.Equal(IoStatus.Ok, await device.WriteZeroesAsync(1 << 20, 4096, deallocate: true, WriteFlags.None));

        var read = new byte[4 << 20];
        Assert.Equal(IoStatus.Ok, await device.ReadAsync(0, read));
        var expected = (byte[])data.Clone();
        expected.AsSpan(2 << 20).Clear();
        expected.AsSpan(1 << 20, 4096).Clear();
        Assert.True(read.AsSpan().SequenceEqual(expected), "unmapped sectors read zeros though the parent has data");

        var (status, extent) = await device.GetAllocationAsync(2 << 20);
        Assert.Equal(IoStatus.Ok, status);
        Assert.False(extent.Mapped);
        Assert.Equal(2 << 20, extent.Length);
        (status, extent) = await device.GetAllocationAsync(0);
        Assert.True(extent.Mapped);
        (status, extent) = await device.GetAllocationAsync(4 << 20);
        Assert.False(extent.Mapped);   // never written anywhere in the chain

        // The head's file gave the unmapped block's space back (it holds at most the 2 MiB partial block and metadata).
        Assert.True(device.Head!.AllocatedBytes < (3L << 20) + (8L << 20), $"{device.Head.AllocatedBytes} bytes allocated");
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task An_interrupted_merge_is_recorded_and_resumes_after_a_restart(bool mergeTheBase)
    {
        const long size = 64L << 20;
        string store = Path.Combine(_directory.Path, "disks");
        var model = new Model(size);
        var random = new Random(5);
        var data = new byte[size];
        Guid diskId, victim;
        await using (var manager = DiskManager.Open(store))
        {
            var disk = await manager.CreateAsync("resumable", size, Sector, blockSize: 1 << 20);
            diskId = disk.Id;
            var device = await manager.AttachAsync(disk.Id);
            var layers = new List<Guid>();
            for (int layer = 0; layer < 3; layer++)
            {
                // Each layer writes scattered pieces all over the disk, so the merge has many windows to copy.
                for (int piece = 0; piece < 64; piece++)
                {
                    int length = random.Next(1, 64) * Sector;
                    long offset = random.NextInt64((size - length) / Sector) * Sector;
                    random.NextBytes(data.AsSpan(0, length));
                    Assert.Equal(IoStatus.Ok, await device.WriteAsync(offset, new ReadOnlySequence<byte>(data, 0, length), WriteFlags.None));
                    model.Write(offset, data.AsSpan(0, length), device.Head!.DiskId);
                }
                layers.Add((await manager.SnapshotAsync(disk.Id, $"layer {layer}")).Id);
            }
            victim = mergeTheBase ? layers[0] : layers[1];

            // The merge stops at its first progress report, as a shutdown would stop it.
            using var stop = new CancellationTokenSource();
            await Assert.ThrowsAnyAsync<OperationCanceledException>(() =>
                manager.DeleteSnapshotAsync(victim, new SyncProgress(() => stop.Cancel()), stop.Token));
            Assert.Equal([(diskId, victim)], manager.PendingMerges);
            Assert.NotNull(manager.GetDisk(diskId).Merge);
            // Windows already copied come from the child now: only the bytes are checked until the merge ends.
            await AssertContentAsync(device, model, "while the merge is pending", checkOrigins: false);
        }

        await using (var reopened = DiskManager.Open(store))
        {
            Assert.Equal([(diskId, victim)], reopened.PendingMerges);
            var device = await reopened.AttachAsync(diskId);
            await AssertContentAsync(device, model, "after the restart, before resuming", checkOrigins: false);
            await reopened.DeleteSnapshotAsync(victim);
            Assert.Empty(reopened.PendingMerges);
            Assert.DoesNotContain(victim, reopened.GetDisk(diskId).Chain);
            model.Retire(victim, reopened.GetDisk(diskId).Chain[mergeTheBase ? 0 : 1]);
            await AssertContentAsync(device, model, "after the resumed merge");
            Assert.Null(await reopened.FindMapDisagreementAsync(diskId));
            await reopened.DetachAsync(diskId);
            device = await reopened.AttachAsync(diskId);
            await AssertContentAsync(device, model, "after reattaching");
        }
    }

    /// <summary>Reports progress synchronously (Progress&lt;T&gt; posts to the thread pool, too late to stop a window).</summary>
    private sealed class SyncProgress(Action report) : IProgress<double>
    {
        public void Report(double value) => report();
    }
}
