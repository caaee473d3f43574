using System.Buffers;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Buffers;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Files;
using ISCSISnap.Storage.Vhdx;

namespace ISCSISnap.Storage.Disks;

public sealed partial class DiskManager
{
    // A merge copies one window at a time; writes to the head wait only while their window is being copied.
    private const int MergeWindowBytes = 8 << 20;
    private const int ExportPieceBytes = 8 << 20;

    private readonly Dictionary<Guid, int> _pinned = new();

    /// <summary>
    /// Deletes a snapshot. A snapshot with no children is removed; one with a single child is merged into it
    /// (online when the child is a disk's head: its sectors the child lacks are copied up while IO runs), then
    /// the child is relinked to the snapshot's parent and the snapshot's file removed. Crash-safe and resumable:
    /// the merge is recorded first, copies are idempotent, and the host calls this again for
    /// <see cref="PendingMerges"/> after a restart.
    /// </summary>
    public async Task DeleteSnapshotAsync(Guid snapshotId, IProgress<double>? progress = null, CancellationToken cancellationToken = default)
    {
        MergePlan? plan;
        await _lock.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            plan = await PlanMergeAsync(snapshotId).ConfigureAwait(false);
            if (plan is null)
            {
                progress?.Report(1);
                return;
            }
        }
        finally
        {
            _lock.Release();
        }

        try
        {
            await CopyUpAsync(plan, progress, cancellationToken).ConfigureAwait(false);
            await _lock.WaitAsync(cancellationToken).ConfigureAwait(false);
            try
            {
                await FinishMergeAsync(plan).ConfigureAwait(false);
            }
            finally
            {
                _lock.Release();
            }
        }
        finally
        {
            await ReleaseMergeAsync(plan).ConfigureAwait(false);
        }
        progress?.Report(1);
    }

    private sealed class MergePlan
    {
        public required DiskRecord Disk;
        public required LayerRecord Snapshot;
        public required LayerRecord Child;
        public required ChainDevice Device;
        public bool TemporaryDevice;
        public int SnapshotIndex;
        public int ChildIndex;
        public bool ChildIsHead;
        /// <summary>The child reopened for writing (a frozen child only); sealed when the merge ends.</summary>
        public IWritableLayer? ReopenedChild;
    }

    /// <summary>Checks the request and prepares the merge (null when the snapshot was simply removed). Runs under the lock.</summary>
    private async Task<MergePlan?> PlanMergeAsync(Guid snapshotId)
    {
        var snapshot = LayerOf(snapshotId);
        if (IsHead(snapshotId)) throw DiskException.Invalid("snapshot", $"{snapshotId} is the head of a disk, not a snapshot");
        if (_pinned.ContainsKey(snapshotId)) throw DiskException.Conflict($"snapshot {snapshotId} is being exported; try again when that is done");
        var children = _document.Layers.Where(l => l.ParentId == snapshotId).ToList();
        if (children.Count == 0)
        {
            Commit(d => d.Layers.RemoveAll(l => l.Id == snapshotId));
            if (!snapshot.External) File.Delete(snapshot.Path);
            return null;
        }
        if (children.Count > 1)
            throw DiskException.Conflict($"snapshot '{snapshot.SnapshotName}' has {children.Count} children (snapshots or clones: {string.Join(", ", children.Select(c => c.Id))}); only a snapshot with one child can be merged away");
        var child = children[0];
        if (child.External)
            throw DiskException.Conflict($"snapshot '{snapshot.SnapshotName}' would merge into the imported file {child.Path}, which the appliance never writes; delete the snapshot above it first or export the disk");
        var disks = DisksThrough(child.Id).ToList();
        if (disks.Count > 1)
            throw DiskException.Conflict($"snapshot '{snapshot.SnapshotName}' is shared by disks {string.Join(", ", disks.Select(d => d.Name))}; delete the clones first");
        if (disks.Count == 0)
            throw DiskException.Conflict($"the child of snapshot '{snapshot.SnapshotName}' ({child.Id}) is itself a snapshot no disk uses; delete that one first");
        var disk = disks[0];
        if (disk.Merge is { } running && running.SnapshotId != snapshotId)
            throw DiskException.Conflict($"disk '{disk.Name}' is merging snapshot {running.SnapshotId}; one merge at a time");
        CheckNotBusy(disk.Id);
        _pinned.TryGetValue(child.Id, out int childPins);
        if (childPins > 0) throw DiskException.Conflict($"layer {child.Id} is being exported; try again when that is done");

        ChainDevice? device;
        lock (_attached) _attached.TryGetValue(disk.Id, out device);
        bool temporary = device is null;
        device ??= OpenChain(disk, readOnly: false);
        var plan = new MergePlan
        {
            Disk = disk, Snapshot = snapshot, Child = child, Device = device, TemporaryDevice = temporary,
            SnapshotIndex = device.IndexOf(snapshotId), ChildIndex = device.IndexOf(child.Id), ChildIsHead = child.Id == disk.HeadId,
        };
        _busy[disk.Id] = $"merging snapshot '{snapshot.SnapshotName}'";
        try
        {
            if (device.IsReadOnly) throw DiskException.Conflict($"disk '{disk.Name}' is attached read-only; a merge writes to it");
            if (disk.Merge is null)
            {
                var now = DateTimeOffset.UtcNow;
                Commit(d => d.Disks.First(x => x.Id == disk.Id).Merge = new MergeRecord { SnapshotId = snapshotId, IntoId = child.Id, StartedAt = now });
            }
            if (!plan.ChildIsHead)
            {
                // The frozen child takes the copies: reopen it writable, keeping its DataWriteGuid (its content as seen
                // through the chain does not change, so the layers above stay linked to it).
                var reopened = LayerFiles.OpenForMerge(child);
                plan.ReopenedChild = reopened;
                IChainLayer? old = null;
                await device.QuiesceAsync(q =>
                {
                    old = q.Layers[plan.ChildIndex - 1];
                    q.ReplaceLayer(plan.ChildIndex, reopened);
                    return ValueTask.FromResult(true);
                }).ConfigureAwait(false);
                old?.Dispose();
            }
        }
        catch
        {
            _busy.Remove(disk.Id);
            if (temporary) await device.DisposeAsync().ConfigureAwait(false);
            throw;
        }
        return plan;
    }

    /// <summary>Copies every sector the snapshot holds and the child lacks into the child, window by window.</summary>
    private async Task CopyUpAsync(MergePlan plan, IProgress<double>? progress, CancellationToken cancellationToken)
    {
        var device = plan.Device;
        var source = device.Layers.First(l => l.DiskId == plan.Snapshot.Id);
        var target = (IWritableLayer)device.Layers.First(l => l.DiskId == plan.Child.Id);
        int sectorSize = device.LogicalBlockSize;
        long limit = Math.Min(source.VirtualSize, target.VirtualSize);
        ushort from = (ushort)plan.SnapshotIndex, into = (ushort)plan.ChildIndex;
        bool sourceIsBase = plan.Snapshot.ParentId is null;
        byte[] buffer = PinnedBufferPool.Shared.Rent(MergeWindowBytes);
        try
        {
            for (long window = 0; window < limit; window += MergeWindowBytes)
            {
                cancellationToken.ThrowIfCancellationRequested();
                long length = Math.Min(MergeWindowBytes, limit - window);
                if (sourceIsBase)
                {
                    // A chain's base reads zeros where it holds nothing; the map may still name it there (a zeroing
                    // that needed no block): nobody owns those sectors.
                    foreach (var (sector, count, state) in Runs(source, window / sectorSize, length / sectorSize))
                        if (state == SectorState.Absent) device.Map.SetOwner(sector, count, 0, owner => owner == from);
                }
                if (HasContent(source, window / sectorSize, length / sectorSize))
                {
                    async ValueTask<bool> CopyWindow()
                    {
                        // Enumerate inside the fence: a write that landed in the child just before wins over the copy.
                        foreach (var (sector, count, state) in Runs(source, window / sectorSize, length / sectorSize))
                        {
                            if (state == SectorState.Absent) continue;
                            foreach (var (gap, gapCount, childState) in Runs(target, sector, count))
                            {
                                if (childState != SectorState.Absent) continue;
                                long offset = gap * sectorSize, bytes = gapCount * sectorSize;
                                IoStatus status;
                                if (state == SectorState.Zero)
                                {
                                    status = await target.ZeroAsync(offset, bytes, deallocate: true, forceUnitAccess: false).ConfigureAwait(false);
                                }
                                else
                                {
                                    int n = (int)bytes;   // at most one window
                                    status = await source.ReadAsync(offset, buffer.AsMemory(0, n)).ConfigureAwait(false);
                                    if (status == IoStatus.Ok)
                                        status = await target.WriteAsync(offset, new ReadOnlySequence<byte>(buffer, 0, n), forceUnitAccess: false).ConfigureAwait(false);
                                }
                                if (status != IoStatus.Ok) throw new StorageException(target.Path, $"copying sectors {gap}-{gap + gapCount - 1} from {source.Path} failed ({status})");
                            }
                            // Whatever the snapshot owned in this run the child now holds (copied now or before a crash).
                            device.Map.SetOwner(sector, count, into, owner => owner == from);
                        }
                        return true;
                    }
                    if (plan.ChildIsHead) await device.FenceAsync(window, length, CopyWindow, cancellationToken).ConfigureAwait(false);
                    else await CopyWindow().ConfigureAwait(false);
                }
                progress?.Report(Math.Min(0.99, (double)(window + length) / limit));
            }
            var flushed = await target.FlushAsync().ConfigureAwait(false);
            if (flushed != IoStatus.Ok) throw new StorageException(target.Path, $"flushing the merged layer failed ({flushed})");
        }
        finally
        {
            PinnedBufferPool.Shared.Return(buffer);
        }
    }

    private static bool HasContent(IChainLayer layer, long sector, long count)
    {
        bool any = false;
        layer.Enumerate(sector, count, (_, _, state) => any |= state != SectorState.Absent);
        return any;
    }

    private static List<(long Sector, long Count, SectorState State)> Runs(IChainLayer layer, long sector, long count)
    {
        var runs = new List<(long, long, SectorState)>();
        layer.Enumerate(sector, count, (s, c, state) => runs.Add((s, c, state)));
        return runs;
    }

    /// <summary>
    /// Relinks the child to the snapshot's parent (or, when the snapshot was the chain's base, makes the child a
    /// standalone dynamic VHDX), drops the snapshot from the chain and the records, removes its file.
    /// </summary>
    private async Task FinishMergeAsync(MergePlan plan)
    {
        var device = plan.Device;
        var child = (IWritableLayer)device.Layers.First(l => l.DiskId == plan.Child.Id);
        if (plan.Snapshot.ParentId is { } parentId)
        {
            var parentRecord = LayerOf(parentId);
            var parent = device.Layers.First(l => l.DiskId == parentRecord.Id);
            LayerFiles.Relink(child, parentRecord, parent);
        }
        IChainLayer? retired = null;
        await device.QuiesceAsync(q =>
        {
            if (plan.Snapshot.ParentId is null && child is VhdxFile { IsDifferencing: true } vhdx)
            {
                // Every sector the base held is in the child now and the rest read zeros: the child stands alone.
                var detached = vhdx.DetachParent();
                if (detached != IoStatus.Ok) throw new StorageException(vhdx.Path, $"making the merged layer standalone failed ({detached})");
                // Standalone, its blocks are present end to end: sectors nobody owned inside them are its zeros now.
                ushort into = (ushort)plan.ChildIndex;
                vhdx.Enumerate(0, q.Map.SectorCount, (sector, count, state) =>
                {
                    if (state != SectorState.Absent) q.Map.SetOwner(sector, count, into, owner => owner == 0);
                });
            }
            retired = q.Layers.First(l => l.DiskId == plan.Snapshot.Id);
            q.RemoveLayer(plan.SnapshotIndex);
            return ValueTask.FromResult(true);
        }).ConfigureAwait(false);
        retired?.Dispose();
        Commit(d =>
        {
            d.Layers.First(l => l.Id == plan.Child.Id).ParentId = plan.Snapshot.ParentId;
            d.Layers.RemoveAll(l => l.Id == plan.Snapshot.Id);
            d.Disks.First(x => x.Id == plan.Disk.Id).Merge = null;
        });
        if (!plan.Snapshot.External) File.Delete(plan.Snapshot.Path);
        // The frozen prefix changed: the next open rebuilds the map from the images.
        File.Delete(MapPath(plan.Disk.Id));
    }

    private async Task ReleaseMergeAsync(MergePlan plan)
    {
        await _lock.WaitAsync().ConfigureAwait(false);
        try
        {
            _busy.Remove(plan.Disk.Id);
            if (plan.ReopenedChild is { } reopened) reopened.Seal();   // frozen again, with the log applied
            if (plan.TemporaryDevice) await plan.Device.DisposeAsync().ConfigureAwait(false);
        }
        finally
        {
            _lock.Release();
        }
    }

    // ---------------------------------------------------------------- export

    /// <summary>
    /// Writes the content of a disk (as it is while the export runs) or of a snapshot (fixed) to a new standalone
    /// file: a dynamic VHDX or a sparse raw image. The file appears under its name only when complete.
    /// </summary>
    public async Task ExportAsync(Guid sourceId, string path, LayerFormat format, IProgress<double>? progress = null, CancellationToken cancellationToken = default)
    {
        if (string.IsNullOrWhiteSpace(path) || !Path.IsPathFullyQualified(path)) throw DiskException.Invalid("path", "path must be an absolute file path");
        path = Path.GetFullPath(path);
        string? directory = Path.GetDirectoryName(path);
        if (directory is null || !System.IO.Directory.Exists(directory)) throw DiskException.Invalid("path", $"{directory}: no such directory");
        if (File.Exists(path)) throw DiskException.Conflict($"{path} already exists; the export does not overwrite files", "path");

        ChainDevice device;
        bool temporary;
        List<Guid> pins = [];
        await _lock.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            var disk = _document.Disks.FirstOrDefault(d => d.Id == sourceId);
            if (disk is not null)
            {
                ChainDevice? attached;
                lock (_attached) _attached.TryGetValue(disk.Id, out attached);
                temporary = attached is null;
                device = attached ?? OpenChain(disk, readOnly: true);
                pins = ChainOf(disk).Select(l => l.Id).ToList();
            }
            else
            {
                var snapshot = LayerOf(sourceId);
                var chain = new List<LayerRecord>();
                for (LayerRecord? layer = snapshot; layer is not null; layer = layer.ParentId is { } p ? LayerOf(p) : null) chain.Add(layer);
                chain.Reverse();
                var layers = OpenLayers(chain, writableTop: false, merge: null);
                var top = layers[^1];
                var map = new ChainMap(top.VirtualSize, top.LogicalSectorSize);
                device = ChainDevice.Open(layers, readOnly: true, map, mappedLayers: 0);
                temporary = true;
                pins = chain.Select(l => l.Id).ToList();
            }
            foreach (var id in pins) _pinned[id] = _pinned.GetValueOrDefault(id) + 1;
        }
        finally
        {
            _lock.Release();
        }

        try
        {
            await CopyOutAsync(device, path, format, progress, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            await _lock.WaitAsync(CancellationToken.None).ConfigureAwait(false);
            try
            {
                foreach (var id in pins)
                    if (--CollectionsMarshalHelper.Ref(_pinned, id) == 0) _pinned.Remove(id);
                if (temporary) await device.DisposeAsync().ConfigureAwait(false);
            }
            finally
            {
                _lock.Release();
            }
        }
    }

    private static async Task CopyOutAsync(ChainDevice device, string path, LayerFormat format, IProgress<double>? progress, CancellationToken cancellationToken)
    {
        string partial = path + ".partial";
        long length = device.Length;
        IWritableLayer? vhdx = null;
        ImageFile? raw = null;
        try
        {
            if (format == LayerFormat.Vhdx) vhdx = LayerFiles.CreateDynamic(partial, Guid.NewGuid(), length, device.LogicalBlockSize, blockSize: null);
            else raw = ImageFile.Create(partial, length);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw DiskException.Invalid("path", $"{partial}: {e.Message}");
        }
        byte[] buffer = PinnedBufferPool.Shared.Rent(ExportPieceBytes);
        bool done = false;
        try
        {
            for (long offset = 0; offset < length;)
            {
                cancellationToken.ThrowIfCancellationRequested();
                var (status, extent) = await device.GetAllocationAsync(offset, cancellationToken).ConfigureAwait(false);
                if (status != IoStatus.Ok) throw new StorageException(path, $"reading the allocation at byte {offset} failed ({status})");
                long end = offset + extent.Length;
                if (extent.Mapped)
                {
                    for (long at = offset; at < end;)
                    {
                        int n = (int)Math.Min(ExportPieceBytes, end - at);
                        status = await device.ReadAsync(at, buffer.AsMemory(0, n), cancellationToken).ConfigureAwait(false);
                        if (status != IoStatus.Ok) throw new StorageException(path, $"reading the source at byte {at} failed ({status})");
                        // All-zero pieces stay unallocated in the output.
                        if (buffer.AsSpan(0, n).IndexOfAnyExcept((byte)0) >= 0)
                        {
                            if (vhdx is not null)
                            {
                                status = await vhdx.WriteAsync(at, new ReadOnlySequence<byte>(buffer, 0, n), forceUnitAccess: false).ConfigureAwait(false);
                                if (status != IoStatus.Ok) throw new StorageException(path, $"writing byte {at} failed ({status})");
                            }
                            else
                            {
                                int errno = raw!.Write(at, buffer.AsSpan(0, n));
                                if (errno != 0) throw new StorageException(path, $"writing byte {at} failed ({ImageFile.MapWriteError(errno)})");
                            }
                        }
                        at += n;
                    }
                }
                offset = end;
                progress?.Report(Math.Min(0.99, (double)offset / length));
            }
            if (vhdx is not null)
            {
                var status = await vhdx.FlushAsync().ConfigureAwait(false);
                if (status == IoStatus.Ok) status = vhdx.Seal();
                if (status != IoStatus.Ok) throw new StorageException(path, $"finishing the VHDX failed ({status})");
            }
            else if (raw!.SyncNow() is int errno && errno != 0)
            {
                throw new StorageException(path, $"syncing the image failed ({ImageFile.MapWriteError(errno)})");
            }
            done = true;
        }
        finally
        {
            PinnedBufferPool.Shared.Return(buffer);
            vhdx?.Dispose();
            raw?.Dispose();
            if (!done) File.Delete(partial);
        }
        File.Move(partial, path, overwrite: false);
        Native.LinuxFile.SyncDirectory(Path.GetDirectoryName(path)!);
    }
}

internal static class CollectionsMarshalHelper
{
    public static ref int Ref(Dictionary<Guid, int> dictionary, Guid key) =>
        ref System.Runtime.InteropServices.CollectionsMarshal.GetValueRefOrAddDefault(dictionary, key, out _);
}
