using System.Buffers;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;

namespace ISCSISnap.Storage.Disks;

/// <summary>
/// The disks of an appliance and their layer tree: create, import, snapshot, clone, revert, merge (delete a
/// snapshot), export, grow and delete, online for disks attached to LUNs. The store (disks.json), the layer
/// images and each disk's chain map live in one directory.
/// Crash safety: every change creates its new files first, then commits disks.json atomically, then removes
/// what the change made obsolete; files left behind by a crash in between are unreferenced and removed at open.
/// A merge records itself in disks.json and resumes after a crash (<see cref="PendingMerges"/>).
/// Threading: structural changes are serialised; the copy phases of merges and exports run outside that lock,
/// with the disks and layers they use marked busy.
/// </summary>
public sealed partial class DiskManager : IAsyncDisposable
{
    public const long MaxVirtualSize = 64L << 40;

    private readonly SemaphoreSlim _lock = new(1, 1);
    private readonly Dictionary<Guid, ChainDevice> _attached = new();
    private readonly Dictionary<Guid, string> _busy = new();
    private DiskStoreDocument _document;

    private DiskManager(string directory, DiskStoreDocument document)
    {
        Directory = directory;
        _document = document;
    }

    /// <summary>The directory holding disks.json, the images the appliance made and the chain maps.</summary>
    public string Directory { get; }

    /// <summary>Files removed at open because no record referenced them (left by a crash mid-change).</summary>
    public IReadOnlyList<string> RemovedLeftovers { get; private set; } = [];

    /// <summary>Opens (creating when absent) the disk store in <paramref name="directory"/>.</summary>
    public static DiskManager Open(string directory)
    {
        directory = Path.GetFullPath(directory);
        System.IO.Directory.CreateDirectory(directory);
        var manager = new DiskManager(directory, DiskStoreFile.Load(directory));
        manager.RemoveLeftovers();
        return manager;
    }

    private void RemoveLeftovers()
    {
        var referenced = new HashSet<string>(_document.Layers.Select(l => l.Path), StringComparer.Ordinal);
        var disks = _document.Disks.Select(d => d.Id).ToHashSet();
        var removed = new List<string>();
        foreach (var file in System.IO.Directory.EnumerateFiles(Directory))
        {
            string name = Path.GetFileName(file);
            string stem = Path.GetFileNameWithoutExtension(name);
            if (!Guid.TryParseExact(stem, "N", out var id)) continue;   // only names this class gives
            string extension = Path.GetExtension(name);
            bool leftover = extension switch
            {
                ".vhdx" or ".raw" => !referenced.Contains(file),
                ".map" or ".atomic" => !disks.Contains(id),
                ".partial" => true,
                _ => false,
            };
            if (!leftover) continue;
            File.Delete(file);
            removed.Add(file);
        }
        RemovedLeftovers = removed;
    }

    // ---------------------------------------------------------------- queries

    public IReadOnlyList<DiskInfo> Disks
    {
        get
        {
            lock (_attached) return _document.Disks.OrderBy(d => d.Name, StringComparer.Ordinal).Select(InfoOf).ToList();
        }
    }

    /// <summary>The disk ID of every layer the manager knows (heads, snapshots, imported bases).</summary>
    public IReadOnlySet<Guid> LayerIds
    {
        get
        {
            lock (_attached) return _document.Layers.Select(l => l.Id).ToHashSet();
        }
    }

    public DiskInfo GetDisk(Guid id)
    {
        lock (_attached) return InfoOf(DiskRecordOf(id));
    }

    /// <summary>A disk by ID or by name.</summary>
    public DiskInfo? FindDisk(string idOrName)
    {
        lock (_attached)
        {
            var disk = Guid.TryParse(idOrName, out var id)
                ? _document.Disks.FirstOrDefault(d => d.Id == id)
                : _document.Disks.FirstOrDefault(d => string.Equals(d.Name, idOrName, StringComparison.Ordinal));
            return disk is null ? null : InfoOf(disk);
        }
    }

    /// <summary>The snapshots of a disk: the frozen layers of its chain and those it froze that later left it (after a revert).</summary>
    public IReadOnlyList<SnapshotInfo> Snapshots(Guid diskId)
    {
        lock (_attached)
        {
            var disk = DiskRecordOf(diskId);
            var chain = ChainOf(disk);
            var inChain = chain.Select(l => l.Id).ToHashSet();
            return _document.Layers
                .Where(l => l.Id != disk.HeadId && (inChain.Contains(l.Id) || (l.OriginDiskId == diskId && !IsHead(l.Id))))
                .OrderBy(l => l.FrozenAt ?? l.CreatedAt)
                .Select(l => SnapshotOf(l, inChain.Contains(l.Id)))
                .ToList();
        }
    }

    public SnapshotInfo GetSnapshot(Guid snapshotId)
    {
        lock (_attached)
        {
            var layer = LayerOf(snapshotId);
            if (IsHead(layer.Id)) throw DiskException.NotFound($"{snapshotId} is the head of a disk, not a snapshot");
            return SnapshotOf(layer, inChain: true);
        }
    }

    /// <summary>Merges interrupted by a crash or shutdown; the host resumes each with <see cref="DeleteSnapshotAsync"/>.</summary>
    public IReadOnlyList<(Guid DiskId, Guid SnapshotId)> PendingMerges
    {
        get
        {
            lock (_attached) return _document.Disks.Where(d => d.Merge is not null).Select(d => (d.Id, d.Merge!.SnapshotId)).ToList();
        }
    }

    private DiskInfo InfoOf(DiskRecord disk)
    {
        var chain = ChainOf(disk);
        var head = chain[^1];
        long size = _attached.TryGetValue(disk.Id, out var device) ? device.Length : disk.SizeBytes;
        return new DiskInfo(disk.Id, disk.Name, size, disk.SectorSize, disk.HeadId, head.Path, chain.Select(l => l.Id).ToList(),
            _attached.ContainsKey(disk.Id), disk.CreatedAt,
            disk.Merge is { } m ? new MergeInfo(m.SnapshotId, m.IntoId, m.StartedAt) : null);
    }

    private SnapshotInfo SnapshotOf(LayerRecord layer, bool inChain) => new(
        layer.Id, layer.SnapshotName ?? Path.GetFileName(layer.Path), layer.ParentId, layer.OriginDiskId, layer.Path, layer.Format,
        layer.External, layer.CreatedAt, layer.FrozenAt,
        _document.Layers.Where(l => l.ParentId == layer.Id).Select(l => l.Id).ToList(),
        _document.Disks.Where(d => LayerOf(d.HeadId).ParentId == layer.Id).Select(d => d.Id).ToList(),
        inChain);

    private DiskRecord DiskRecordOf(Guid id) =>
        _document.Disks.FirstOrDefault(d => d.Id == id) ?? throw DiskException.NotFound($"no disk {id}");

    private LayerRecord LayerOf(Guid id) =>
        _document.Layers.FirstOrDefault(l => l.Id == id) ?? throw DiskException.NotFound($"no snapshot or layer {id}");

    private bool IsHead(Guid layerId) => _document.Disks.Any(d => d.HeadId == layerId);

    /// <summary>The layers of a disk from its base to its head.</summary>
    private List<LayerRecord> ChainOf(DiskRecord disk)
    {
        var chain = new List<LayerRecord>();
        for (LayerRecord? layer = LayerOf(disk.HeadId); layer is not null; layer = layer.ParentId is { } p ? LayerOf(p) : null)
            chain.Add(layer);
        chain.Reverse();
        return chain;
    }

    private IEnumerable<DiskRecord> DisksThrough(Guid layerId) => _document.Disks.Where(d => ChainOf(d).Any(l => l.Id == layerId));

    private void CheckNotBusy(Guid diskId)
    {
        if (_busy.TryGetValue(diskId, out var what)) throw DiskException.Conflict($"disk {diskId} is busy: {what}");
    }

    private void Commit(Action<DiskStoreDocument> change)
    {
        // Change a copy so that a failed save leaves the records as they are on disk.
        var copy = System.Text.Json.JsonSerializer.Deserialize(
            System.Text.Json.JsonSerializer.SerializeToUtf8Bytes(_document, DiskStoreJson.Default.DiskStoreDocument),
            DiskStoreJson.Default.DiskStoreDocument)!;
        change(copy);
        DiskStoreFile.Validate(Path.Combine(Directory, DiskStoreFile.FileName), copy);
        DiskStoreFile.Save(Directory, copy);
        lock (_attached) _document = copy;
    }

    private string NewLayerPath(Guid id, LayerFormat format = LayerFormat.Vhdx) =>
        Path.Combine(Directory, id.ToString("N") + (format == LayerFormat.Vhdx ? ".vhdx" : ".raw"));

    private string MapPath(Guid diskId) => Path.Combine(Directory, diskId.ToString("N") + ".map");
    private string AtomicJournalPath(Guid diskId) => Path.Combine(Directory, diskId.ToString("N") + ".atomic");

    private static void ValidateName(string? name)
    {
        if (string.IsNullOrWhiteSpace(name) || name.Length > 128 || name.Any(char.IsControl))
            throw DiskException.Invalid("name", "a name is 1-128 printable characters");
    }

    private void ValidateNewDiskName(string name)
    {
        ValidateName(name);
        if (Guid.TryParse(name, out _)) throw DiskException.Invalid("name", "a disk name must not look like an ID");
        if (_document.Disks.Any(d => string.Equals(d.Name, name, StringComparison.Ordinal)))
            throw DiskException.Conflict($"a disk named '{name}' already exists", "name");
    }

    private async Task<T> LockedAsync<T>(Func<T> action)
    {
        await _lock.WaitAsync().ConfigureAwait(false);
        try
        {
            return action();
        }
        finally
        {
            _lock.Release();
        }
    }

    private async Task<T> LockedAsync<T>(Func<Task<T>> action)
    {
        await _lock.WaitAsync().ConfigureAwait(false);
        try
        {
            return await action().ConfigureAwait(false);
        }
        finally
        {
            _lock.Release();
        }
    }

    // ---------------------------------------------------------------- create and import

    /// <summary>Creates an empty disk: one dynamic VHDX layer.</summary>
    public Task<DiskInfo> CreateAsync(string name, long sizeBytes, int sectorSize = 512, int? blockSize = null) => LockedAsync(() =>
    {
        ValidateNewDiskName(name);
        ValidateGeometry(sizeBytes, sectorSize, blockSize);
        var diskId = Guid.NewGuid();
        var layerId = Guid.NewGuid();
        string path = NewLayerPath(layerId);
        LayerFiles.CreateDynamic(path, layerId, sizeBytes, sectorSize, blockSize).Dispose();
        var now = DateTimeOffset.UtcNow;
        try
        {
            Commit(d =>
            {
                d.Layers.Add(new LayerRecord { Id = layerId, Path = path, Format = LayerFormat.Vhdx, SectorSize = sectorSize, OriginDiskId = diskId, CreatedAt = now });
                d.Disks.Add(new DiskRecord { Id = diskId, Name = name, HeadId = layerId, SectorSize = sectorSize, SizeBytes = sizeBytes, CreatedAt = now });
            });
        }
        catch
        {
            File.Delete(path);
            throw;
        }
        return GetDisk(diskId);
    });

    private static void ValidateGeometry(long sizeBytes, int sectorSize, int? blockSize)
    {
        if (sectorSize is not (512 or 4096)) throw DiskException.Invalid("sectorSize", "sectorSize must be 512 or 4096");
        if (sizeBytes <= 0 || sizeBytes > MaxVirtualSize || sizeBytes % 4096 != 0)
            throw DiskException.Invalid("sizeBytes", "sizeBytes must be a positive multiple of 4096 up to 64 TiB");
        if (blockSize is { } b && (b < (1 << 20) || b > (256 << 20) || (b & (b - 1)) != 0))
            throw DiskException.Invalid("blockSize", "blockSize must be a power of two from 1 MiB to 256 MiB");
    }

    /// <summary>
    /// Imports an existing image as a disk: a raw image, a VHDX, or the newest differencing file of a Hyper-V
    /// checkpoint chain (its parents are found through the parent locators and checked against their linkage).
    /// The imported files are never written: a new head goes on top.
    /// </summary>
    public Task<DiskInfo> ImportAsync(string name, string imagePath, int sectorSize = 512) => LockedAsync(() =>
    {
        ValidateNewDiskName(name);
        if (string.IsNullOrWhiteSpace(imagePath) || !Path.IsPathFullyQualified(imagePath))
            throw DiskException.Invalid("image", "image must be an absolute path");
        imagePath = Path.GetFullPath(imagePath);
        if (!File.Exists(imagePath)) throw DiskException.Invalid("image", $"{imagePath}: no such file");

        // The chain from the given file down to its base (validated), newest first.
        var found = LayerFiles.DiscoverChain(imagePath, sectorSize);
        var known = new Dictionary<string, LayerRecord>(StringComparer.Ordinal);
        foreach (var layer in _document.Layers) known.TryAdd(layer.Path, layer);
        foreach (var file in found)
            if (known.TryGetValue(file.Path, out var existing) && !existing.External)
                throw DiskException.Conflict($"{file.Path} is a layer the appliance manages; clone its snapshot instead", "image");

        var diskId = Guid.NewGuid();
        var headId = Guid.NewGuid();
        var now = DateTimeOffset.UtcNow;
        var records = new List<LayerRecord>();
        Guid? parentId = null;
        // Base first; a file imported before (by another disk) is shared, not recorded twice.
        for (int i = found.Count - 1; i >= 0; i--)
        {
            var file = found[i];
            if (known.TryGetValue(file.Path, out var existing) && existing.ParentId == parentId)
            {
                parentId = existing.Id;
                continue;
            }
            var record = new LayerRecord
            {
                Id = Guid.NewGuid(), Path = file.Path, Format = file.Format, SectorSize = file.SectorSize, ParentId = parentId, External = true, OriginDiskId = diskId,
                SnapshotName = "imported " + Path.GetFileName(file.Path), CreatedAt = now, FrozenAt = now,
            };
            records.Add(record);
            parentId = record.Id;
        }
        var top = found[0];
        string headPath = NewLayerPath(headId);
        Guid topId = parentId!.Value;
        LayerFiles.CreateChild(headPath, headId, top.Path, top.Format == LayerFormat.Raw ? topId : top.DataWriteGuid,
            top.VirtualSize, top.SectorSize, blockSize: null).Dispose();
        try
        {
            Commit(d =>
            {
                d.Layers.AddRange(records);
                d.Layers.Add(new LayerRecord { Id = headId, Path = headPath, Format = LayerFormat.Vhdx, SectorSize = top.SectorSize, ParentId = topId, OriginDiskId = diskId, CreatedAt = now });
                d.Disks.Add(new DiskRecord { Id = diskId, Name = name, HeadId = headId, SectorSize = top.SectorSize, SizeBytes = top.VirtualSize, CreatedAt = now });
            });
        }
        catch
        {
            File.Delete(headPath);
            throw;
        }
        return GetDisk(diskId);
    });

    // ---------------------------------------------------------------- attach (serve through a LUN)

    /// <summary>
    /// Opens a disk's chain as a block device (validating every layer and its linkage) and keeps it attached until
    /// <see cref="DetachAsync"/>. One attachment per disk.
    /// </summary>
    public Task<ChainDevice> AttachAsync(Guid diskId, bool readOnly = false) => LockedAsync(() =>
    {
        var disk = DiskRecordOf(diskId);
        if (_attached.ContainsKey(diskId)) throw DiskException.Conflict($"disk '{disk.Name}' is already attached to a LUN");
        var device = OpenChain(disk, readOnly);
        lock (_attached) _attached[diskId] = device;
        return device;
    });

    public async Task DetachAsync(Guid diskId)
    {
        ChainDevice? device;
        await _lock.WaitAsync().ConfigureAwait(false);
        try
        {
            lock (_attached)
            {
                if (!_attached.Remove(diskId, out device)) return;
            }
        }
        finally
        {
            _lock.Release();
        }
        await device.DisposeAsync().ConfigureAwait(false);
    }

    public bool IsAttached(Guid diskId)
    {
        lock (_attached) return _attached.ContainsKey(diskId);
    }

    /// <summary>Opens the chain of <paramref name="disk"/> (its head writable unless <paramref name="readOnly"/>).</summary>
    private ChainDevice OpenChain(DiskRecord disk, bool readOnly)
    {
        var chain = ChainOf(disk);
        var layers = OpenLayers(chain, writableTop: !readOnly, disk.Merge);
        try
        {
            var (map, mapped) = LoadOrBuildMap(disk.Id, layers, frozen: layers.Count - 1);
            return ChainDevice.Open(layers, readOnly, map, mapped, readOnly ? null : AtomicJournalPath(disk.Id));
        }
        catch
        {
            foreach (var layer in layers) layer.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Opens <paramref name="chain"/> (base first), checking each child's parent linkage against its parent's
    /// DataWriteGuid and rewriting stale parent paths in the appliance's own files.
    /// </summary>
    private List<IChainLayer> OpenLayers(List<LayerRecord> chain, bool writableTop, MergeRecord? merge)
    {
        var opened = new List<IChainLayer>();
        try
        {
            for (int i = 0; i < chain.Count; i++)
            {
                var record = chain[i];
                bool writable = writableTop && i == chain.Count - 1;
                var layer = LayerFiles.Open(record, writable);
                try
                {
                    var parent = i > 0 ? opened[i - 1] : null;
                    // A merge that got past relinking its child already points the child at the merged layer's parent.
                    bool relinkedByMerge = merge is not null && i >= 2 && chain[i - 1].Id == merge.SnapshotId;
                    bool detachedByMerge = merge is not null && i == 1 && chain[0].Id == merge.SnapshotId;
                    bool stale = LayerFiles.CheckLinkage(layer, record, parent, i > 0 ? chain[i - 1] : null,
                        relinkedByMerge ? opened[i - 2] : null, relinkedByMerge ? chain[i - 2] : null, detachedByMerge);
                    if (stale && !record.External)
                    {
                        // The files moved: point the child at where its parent is now (data and DataWriteGuid untouched).
                        var linkage = LayerFiles.LinkageOf(chain[i - 1], parent!);
                        if (layer is IWritableLayer { IsWritable: true } head)
                        {
                            LayerFiles.Relink(head, chain[i - 1], parent!);
                        }
                        else
                        {
                            layer.Dispose();
                            LayerFiles.RewriteParentPaths(record.Path, chain[i - 1].Path, linkage);
                            layer = LayerFiles.Open(record, writable: false);
                        }
                    }
                }
                catch
                {
                    layer.Dispose();
                    throw;
                }
                opened.Add(layer);
            }
            return opened;
        }
        catch
        {
            foreach (var layer in opened) layer.Dispose();
            throw;
        }
    }

    /// <summary>
    /// The chain map of the frozen layers (the first <paramref name="frozen"/>), from the disk's map file when it was
    /// written for exactly these layers and their DataWriteGuids, else rebuilt from the images and saved.
    /// </summary>
    private (ChainMap Map, int Mapped) LoadOrBuildMap(Guid diskId, List<IChainLayer> layers, int frozen)
    {
        var top = layers[^1];
        var map = ChainMapFile.TryLoad(MapPath(diskId), layers.Take(frozen).ToList(), top.VirtualSize, top.LogicalSectorSize);
        if (map is not null) return (map, frozen);
        map = new ChainMap(top.VirtualSize, top.LogicalSectorSize);
        for (int i = 0; i < frozen; i++) ChainDevice.Overlay(map, layers[i], (ushort)(i + 1));
        ChainMapFile.Save(MapPath(diskId), layers.Take(frozen).ToList(), map);
        return (map, frozen);
    }

    /// <summary>Runs <paramref name="action"/> on the disk's attached device, or on one opened for the occasion.</summary>
    private async Task<T> WithDeviceAsync<T>(DiskRecord disk, Func<ChainDevice, Task<T>> action)
    {
        ChainDevice? device;
        lock (_attached) _attached.TryGetValue(disk.Id, out device);
        if (device is not null) return await action(device).ConfigureAwait(false);
        var temporary = OpenChain(disk, readOnly: false);
        try
        {
            return await action(temporary).ConfigureAwait(false);
        }
        finally
        {
            await temporary.DisposeAsync().ConfigureAwait(false);
        }
    }

    /// <summary>
    /// Checks the disk's chain map (as loaded from its map file and kept up to date by writes) against a map built
    /// from the images alone; returns the first sector where they disagree, or null when they agree.
    /// </summary>
    public Task<long?> FindMapDisagreementAsync(Guid diskId) => LockedAsync(async () =>
    {
        var disk = DiskRecordOf(diskId);
        return await WithDeviceAsync(disk, async device => await device.QuiesceAsync(q =>
        {
            var fresh = new ChainMap(q.Map.VirtualSize, q.Map.SectorSize);
            for (int i = 0; i < q.Layers.Count; i++) ChainDevice.Overlay(fresh, q.Layers[i], (ushort)(i + 1));
            long? first = null;
            foreach (var (sector, count, owner) in fresh.Runs())
            {
                for (long s = sector; s < sector + count && first is null;)
                {
                    ushort got = q.Map.Lookup(s, out int run);
                    if (got != owner) first = s;
                    s += Math.Max(1, run);
                }
                if (first is not null) break;
            }
            return ValueTask.FromResult(first);
        }).ConfigureAwait(false)).ConfigureAwait(false);
    });

    // ---------------------------------------------------------------- snapshot, clone, revert

    /// <summary>
    /// Freezes the disk's head as a snapshot and puts a new empty head on it. In-flight IO is quiesced for the
    /// few file syncs this takes; no data is copied.
    /// </summary>
    public Task<SnapshotInfo> SnapshotAsync(Guid diskId, string? name) => LockedAsync(async () =>
    {
        var disk = DiskRecordOf(diskId);
        CheckNotBusy(diskId);
        if (disk.Merge is not null) throw DiskException.Conflict($"disk '{disk.Name}' is merging a snapshot; try again when it is done");
        name ??= $"snapshot {DateTimeOffset.UtcNow:yyyy-MM-dd HH:mm:ss}";
        ValidateName(name);
        var frozenId = disk.HeadId;
        var newHeadId = Guid.NewGuid();
        string newHeadPath = NewLayerPath(newHeadId);
        var frozenRecord = LayerOf(frozenId);
        await WithDeviceAsync(disk, async device =>
        {
            var head = device.Head ?? throw DiskException.Conflict($"disk '{disk.Name}' is attached read-only");
            // Outside the quiesced window: flush most of what is pending and make the new head's file. Its
            // parent_linkage is the head's DataWriteGuid, fixed for the session once the head has been written.
            var status = await head.FlushAsync().ConfigureAwait(false);
            if (status != IoStatus.Ok) throw new StorageException(head.Path, $"flushing the head before the snapshot failed ({status})");
            var child = LayerFiles.CreateChild(newHeadPath, newHeadId, head.Path, head.DataWriteGuid, head.VirtualSize, head.LogicalSectorSize, blockSize: null);
            bool pushed = false;
            byte[]? mapBytes = null;
            List<IChainLayer>? frozenLayers = null;
            try
            {
                await device.QuiesceAsync(async q =>
                {
                    if (!ReferenceEquals(q.Head, head)) throw new InvalidOperationException("the head changed while the disk was locked");
                    status = await head.FlushAsync().ConfigureAwait(false);
                    if (status != IoStatus.Ok) throw new StorageException(head.Path, $"flushing the head before the snapshot failed ({status})");
                    if (!LayerFiles.LinksTo(child, head.DataWriteGuid))
                    {
                        // The head's first write of its session came in meanwhile (a new DataWriteGuid): make the file again.
                        child.Dispose();
                        File.Delete(newHeadPath);
                        child = LayerFiles.CreateChild(newHeadPath, newHeadId, head.Path, head.DataWriteGuid, head.VirtualSize, head.LogicalSectorSize, blockSize: null);
                    }
                    status = head.Seal();
                    if (status != IoStatus.Ok) throw new StorageException(head.Path, $"freezing the head failed ({status})");
                    var now = DateTimeOffset.UtcNow;
                    try
                    {
                        Commit(d =>
                        {
                            var frozen = d.Layers.First(l => l.Id == frozenId);
                            frozen.SnapshotName = name;
                            frozen.FrozenAt = now;
                            d.Layers.Add(new LayerRecord { Id = newHeadId, Path = newHeadPath, Format = LayerFormat.Vhdx, SectorSize = frozenRecord.SectorSize, ParentId = frozenId, OriginDiskId = diskId, CreatedAt = now });
                            d.Disks.First(x => x.Id == diskId).HeadId = newHeadId;
                        });
                    }
                    catch
                    {
                        // The records still name the old head: make it writable again.
                        q.ReplaceLayer(q.Layers.Count, LayerFiles.Open(frozenRecord, writable: true));
                        head.Dispose();
                        throw;
                    }
                    q.PushHead(child);
                    pushed = true;
                    // The map now covers exactly the frozen layers: it is the next open's starting point.
                    mapBytes = q.Map.Serialize();
                    frozenLayers = q.Layers.Take(q.Layers.Count - 1).ToList();
                    return true;
                }).ConfigureAwait(false);
            }
            finally
            {
                if (!pushed)
                {
                    child.Dispose();
                    File.Delete(newHeadPath);
                }
            }
            ChainMapFile.Save(MapPath(diskId), frozenLayers!, mapBytes!);
            return true;
        }).ConfigureAwait(false);
        return GetSnapshot(frozenId);
    });

    /// <summary>Creates an empty head file on <paramref name="snapshot"/> (closed again); returns the geometry it took.</summary>
    private static (long Size, int SectorSize) CreateHeadOn(LayerRecord snapshot, Guid headId, string headPath)
    {
        var (dataWriteGuid, size, sectorSize) = LayerFiles.Describe(snapshot);
        var linkage = snapshot.Format == LayerFormat.Raw ? snapshot.Id : dataWriteGuid;
        LayerFiles.CreateChild(headPath, headId, snapshot.Path, linkage, size, sectorSize, blockSize: null).Dispose();
        return (size, sectorSize);
    }

    /// <summary>A new disk whose head sits on <paramref name="snapshotId"/> (a linked clone: the layers below are shared).</summary>
    public Task<DiskInfo> CloneAsync(Guid snapshotId, string name) => LockedAsync(() =>
    {
        ValidateNewDiskName(name);
        var snapshot = LayerOf(snapshotId);
        if (IsHead(snapshotId)) throw DiskException.Invalid("snapshot", $"{snapshotId} is the head of a disk; take a snapshot first");
        var diskId = Guid.NewGuid();
        var headId = Guid.NewGuid();
        string headPath = NewLayerPath(headId);
        var (size, sectorSize) = CreateHeadOn(snapshot, headId, headPath);
        var now = DateTimeOffset.UtcNow;
        try
        {
            Commit(d =>
            {
                d.Layers.Add(new LayerRecord { Id = headId, Path = headPath, Format = LayerFormat.Vhdx, SectorSize = sectorSize, ParentId = snapshotId, OriginDiskId = diskId, CreatedAt = now });
                d.Disks.Add(new DiskRecord { Id = diskId, Name = name, HeadId = headId, SectorSize = sectorSize, SizeBytes = size, CreatedAt = now });
            });
        }
        catch
        {
            File.Delete(headPath);
            throw;
        }
        return GetDisk(diskId);
    });

    /// <summary>
    /// Points the disk back at a snapshot: a new empty head on <paramref name="snapshotId"/>; the old head's data is
    /// discarded. Snapshots taken after it stay (listed, clonable, deletable).
    /// </summary>
    public Task<DiskInfo> RevertAsync(Guid diskId, Guid snapshotId) => LockedAsync(async () =>
    {
        var disk = DiskRecordOf(diskId);
        CheckNotBusy(diskId);
        if (disk.Merge is not null) throw DiskException.Conflict($"disk '{disk.Name}' is merging a snapshot; try again when it is done");
        var snapshot = LayerOf(snapshotId);
        if (IsHead(snapshotId)) throw DiskException.Invalid("snapshot", $"{snapshotId} is the head of a disk, not a snapshot");
        bool ours = ChainOf(disk).Any(l => l.Id == snapshotId) || snapshot.OriginDiskId == diskId;
        if (!ours) throw DiskException.Invalid("snapshot", $"snapshot {snapshotId} does not belong to disk '{disk.Name}'; clone it instead");
        var oldHead = LayerOf(disk.HeadId);
        if (_pinned.ContainsKey(oldHead.Id)) throw DiskException.Conflict($"disk '{disk.Name}' is being exported; try again when that is done");
        var newHeadId = Guid.NewGuid();
        string newHeadPath = NewLayerPath(newHeadId);
        var (size, sectorSize) = CreateHeadOn(snapshot, newHeadId, newHeadPath);
        var now = DateTimeOffset.UtcNow;
        try
        {
            Commit(d =>
            {
                d.Layers.Add(new LayerRecord { Id = newHeadId, Path = newHeadPath, Format = LayerFormat.Vhdx, SectorSize = sectorSize, ParentId = snapshotId, OriginDiskId = diskId, CreatedAt = now });
                var target = d.Disks.First(x => x.Id == diskId);
                target.HeadId = newHeadId;
                target.SizeBytes = size;
                d.Layers.RemoveAll(l => l.Id == oldHead.Id);
            });
        }
        catch
        {
            File.Delete(newHeadPath);
            throw;
        }
        ChainDevice? device;
        lock (_attached) _attached.TryGetValue(diskId, out device);
        if (device is not null)
        {
            var updated = DiskRecordOf(diskId);
            var chain = ChainOf(updated);
            var layers = OpenLayers(chain, writableTop: !device.IsReadOnly, merge: null);
            var (map, mapped) = LoadOrBuildMap(diskId, layers, frozen: layers.Count - 1);
            for (int i = mapped + 1; i <= layers.Count; i++) ChainDevice.Overlay(map, layers[i - 1], (ushort)i);
            IReadOnlyList<IChainLayer> retired = [];
            await device.QuiesceAsync(q =>
            {
                retired = q.Layers;
                q.ReplaceChain(layers, map);
                return ValueTask.FromResult(true);
            }).ConfigureAwait(false);
            foreach (var layer in retired) layer.Dispose();
        }
        else
        {
            // Not attached: the next attach rebuilds the map for the new chain.
            File.Delete(MapPath(diskId));
        }
        File.Delete(oldHead.Path);
        return GetDisk(diskId);
    });

    // ---------------------------------------------------------------- grow and delete

    /// <summary>Grows the disk (its head) to <paramref name="sizeBytes"/>.</summary>
    public Task<DiskInfo> GrowAsync(Guid diskId, long sizeBytes) => LockedAsync(async () =>
    {
        var disk = DiskRecordOf(diskId);
        CheckNotBusy(diskId);
        ValidateGeometry(sizeBytes, disk.SectorSize, null);
        await WithDeviceAsync(disk, async device =>
        {
            if (sizeBytes < device.Length) throw DiskException.Invalid("sizeBytes", $"disks only grow: {sizeBytes} is below the current {device.Length} bytes");
            var status = await device.GrowAsync(sizeBytes).ConfigureAwait(false);
            if (status != IoStatus.Ok) throw DiskException.Conflict($"cannot grow disk '{disk.Name}': {status}", "sizeBytes");
            return true;
        }).ConfigureAwait(false);
        // The head file holds the new size already; the record follows (a crash in between is corrected at attach).
        Commit(d => d.Disks.First(x => x.Id == diskId).SizeBytes = sizeBytes);
        return GetDisk(diskId);
    });

    /// <summary>
    /// Deletes a disk: its head and those of its snapshots nothing else depends on (layers under other disks'
    /// chains stay). Imported files are never deleted, only forgotten.
    /// </summary>
    public Task DeleteDiskAsync(Guid diskId) => LockedAsync(() =>
    {
        var disk = DiskRecordOf(diskId);
        CheckNotBusy(diskId);
        if (IsAttached(diskId)) throw DiskException.Conflict($"disk '{disk.Name}' is served by a LUN; remove the LUN first");
        // Walk down from the head while the layer has no other child and no other disk on it.
        var doomed = new List<LayerRecord>();
        var remaining = _document.Layers.ToList();
        var others = _document.Disks.Where(d => d.Id != diskId).SelectMany(ChainOf).Select(l => l.Id).ToHashSet();
        for (LayerRecord? layer = LayerOf(disk.HeadId); layer is not null;)
        {
            if (others.Contains(layer.Id)) break;
            var current = layer;
            if (remaining.Any(l => l.ParentId == current.Id && !doomed.Contains(l))) break;
            if (current.OriginDiskId != diskId && current.Id != disk.HeadId && !current.External) break;
            doomed.Add(current);
            layer = current.ParentId is { } p ? LayerOf(p) : null;
        }
        if (doomed.FirstOrDefault(l => _pinned.ContainsKey(l.Id)) is { } exporting)
            throw DiskException.Conflict($"layer {exporting.Id} of disk '{disk.Name}' is being exported; try again when that is done");
        var ids = doomed.Select(l => l.Id).ToHashSet();
        Commit(d =>
        {
            d.Disks.RemoveAll(x => x.Id == diskId);
            d.Layers.RemoveAll(l => ids.Contains(l.Id));
        });
        foreach (var layer in doomed.Where(l => !l.External)) File.Delete(layer.Path);
        File.Delete(MapPath(diskId));
        File.Delete(AtomicJournalPath(diskId));
        return true;
    });

    public async ValueTask DisposeAsync()
    {
        List<ChainDevice> devices;
        lock (_attached)
        {
            devices = _attached.Values.ToList();
            _attached.Clear();
        }
        foreach (var device in devices) await device.DisposeAsync().ConfigureAwait(false);
    }
}
