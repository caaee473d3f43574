using System.Collections.Immutable;
using System.Text.Json;
using ISCSISnap.Storage.Filters;
using ISCSISnap.Storage.Filters.Configuration;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Disks;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Scsi;
using ISCSISnap.Web.Catalog;
using ISCSISnap.Web.Configuration;

namespace ISCSISnap.Web.Appliance;

/// <summary>
/// Owns the live targets and LUNs: loads them from the catalog at start, applies appliance.json declarations,
/// and carries out management requests so the catalog and the running target never disagree. Every LUN serves
/// a disk of the <see cref="DiskManager"/> (a snapshot chain); the LUN's device is the disk's attached chain.
/// Threading: management operations are serialised by one lock; the iSCSI data path never takes it.
/// </summary>
public sealed class TargetService : IAsyncDisposable
{
    private readonly ApplianceCatalog _catalog;
    private readonly DiskManager _disks;
    private readonly ISCSISnap.Storage.Filters.KernelContext _kernel;
    private readonly ISCSISnap.Storage.Filters.IFilterObserver _filterObserver;
    private readonly TargetRegistry _registry;
    private readonly IscsiPortal _portal;
    private readonly ApplianceOptions _options;
    private readonly ILogger<TargetService> _log;
    private readonly SemaphoreSlim _lock = new(1, 1);
    private readonly Dictionary<string, LunRecord> _lunRecords = new();
    private readonly CopyTargetResolver _copyTargets;
    private readonly FilterFactory _filterFactory;
    private readonly ISCSISnap.Storage.Filters.Cache.MemoryBlockCache? _blockCache;   // shared by every LUN: clones share cached base blocks

    public TargetService(ApplianceCatalog catalog, DiskManager disks, ISCSISnap.Storage.Filters.KernelContext kernel, ISCSISnap.Storage.Filters.IFilterObserver filterObserver,
        TargetRegistry registry, IscsiPortal portal, ApplianceOptions options, ILogger<TargetService> log)
    {
        _filterObserver = filterObserver;
        _catalog = catalog;
        _disks = disks;
        _kernel = kernel;
        _registry = registry;
        _portal = portal;
        _options = options;
        _log = log;
        _copyTargets = new CopyTargetResolver(registry);
        _blockCache = options.Filters.CacheBytes > 0 ? new ISCSISnap.Storage.Filters.Cache.MemoryBlockCache(options.Filters.CacheBytes) : null;
        _filterFactory = new FilterFactory(new FilterPluginLoader(Path.Combine(options.DataDirectory, options.Filters.PluginDirectory)),
            Path.Combine(options.DataDirectory, "checksums"));
    }

    public FilterFactory FilterFactory => _filterFactory;

    public TargetRegistry Registry => _registry;
    public DiskManager Disks => _disks;

    /// <summary>Brings up every catalogued target and LUN, creating the demo target on a new catalog and applying declared targets.</summary>
    public async Task LoadAsync()
    {
        // Checksums of layers merged or deleted since they were written go before any filter opens a store.
        foreach (var file in ISCSISnap.Storage.Filters.BuiltIn.ChecksumStore.RemoveOrphans(_filterFactory.ChecksumDirectory, _disks.LayerIds))
            Log.ChecksumsRemoved(_log, file);
        if (_catalog.IsNew && _options.DemoTarget is { } demo && _catalog.FindTarget(demo.Name) is null)
        {
            var target = new TargetRecord { Id = demo.Name.ToLowerInvariant(), Name = demo.Name, Alias = demo.Alias, CreatedAt = DateTime.UtcNow };
            _catalog.SaveTarget(target);
            var lun = await NewDiskLunAsync(target.Id, 0, demo.SizeBytes, 512);
            _catalog.SaveLun(lun);
            Log.DemoTargetCreated(_log, demo.Name, demo.SizeBytes);
        }
        foreach (var declared in _options.Targets) await ApplyDeclarationAsync(declared);

        foreach (var record in _catalog.Targets())
        {
            var target = new IscsiTarget(record.Name, record.Alias, AccessOf(record));
            _registry.TryAdd(target);
            foreach (var lun in _catalog.Luns(record.Id))
            {
                try
                {
                    if (lun.DiskId == Guid.Empty) await MigrateAsync(lun);
                    await AttachLunAsync(target, lun);
                }
                catch (Exception e) when (e is StorageException or DiskException)
                {
                    // One broken image must not keep the others offline; the log says which and why.
                    Log.LunUnavailable(_log, record.Name, lun.Lun, e.Message);
                }
            }
        }
    }

    /// <summary>A LUN catalogued before disks existed served a raw image: that image becomes the base of a disk.</summary>
    private async Task MigrateAsync(LunRecord lun)
    {
        var disk = await _disks.ImportAsync(FreeDiskName(lun.TargetId, lun.Lun), lun.ImagePath, lun.BlockSize);
        lun.DiskId = disk.Id;
        _catalog.SaveLun(lun);
        Log.LunMigrated(_log, lun.TargetId, lun.Lun, lun.ImagePath, disk.Name);
    }

    private async Task ApplyDeclarationAsync(TargetDeclaration declared)
    {
        string id = declared.Name.ToLowerInvariant();
        var record = _catalog.FindTarget(id) ?? new TargetRecord { Id = id, Name = declared.Name, CreatedAt = DateTime.UtcNow };
        record.Alias = declared.Alias;
        record.AllowedInitiators = declared.AllowedInitiators.ToList();
        record.ChapUserName = declared.Chap?.UserName;
        record.ChapSecret = declared.Chap?.Secret;
        record.MutualChapUserName = declared.MutualChap?.UserName;
        record.MutualChapSecret = declared.MutualChap?.Secret;
        _catalog.SaveTarget(record);
        var existing = _catalog.Luns(id).ToDictionary(l => l.Lun);
        foreach (var lun in declared.Luns)
        {
            if (!existing.TryGetValue(lun.Lun, out var lunRecord))
            {
                lunRecord = lun.Image is { } image
                    ? await ImportedDiskLunAsync(id, lun.Lun, image, lun.BlockSize, lun.ReadOnly)
                    : await NewDiskLunAsync(id, lun.Lun, lun.SizeBytes, lun.BlockSize, lun.ReadOnly);
            }
            // A declared filter stack is the LUN's at every start; undeclared, the API's changes stand.
            if (lun.Filters is { } filters) lunRecord.FiltersJson = JsonSerializer.Serialize(filters, ConfigurationLoader.Json);
            _catalog.SaveLun(lunRecord);
        }
    }

    private static TargetAccess AccessOf(TargetRecord record) => new(
        record.AllowedInitiators.ToImmutableArray(),
        record.ChapUserName is { } user ? new ChapCredentials(user, record.ChapSecret!) : null,
        record.MutualChapUserName is { } mutual ? new ChapCredentials(mutual, record.MutualChapSecret!) : null);

    /// <summary>A disk name for a LUN's own disk: the target's short name and the LUN ("demo-lun0"), made unique.</summary>
    private string FreeDiskName(string targetId, int lun)
    {
        int colon = targetId.LastIndexOf(':');
        string stem = $"{(colon >= 0 ? targetId[(colon + 1)..] : targetId)}-lun{lun}";
        string name = stem;
        for (int i = 2; _disks.FindDisk(name) is not null; i++) name = $"{stem}-{i}";
        return name;
    }

    private async Task<LunRecord> NewDiskLunAsync(string targetId, int lun, long sizeBytes, int blockSize, bool readOnly = false)
    {
        var disk = await _disks.CreateAsync(FreeDiskName(targetId, lun), sizeBytes, blockSize);
        return NewLunRecord(targetId, lun, disk, image: "", managed: true, blockSize, readOnly);
    }

    private async Task<LunRecord> ImportedDiskLunAsync(string targetId, int lun, string image, int blockSize, bool readOnly)
    {
        var disk = await _disks.ImportAsync(FreeDiskName(targetId, lun), System.IO.Path.GetFullPath(image), blockSize);
        return NewLunRecord(targetId, lun, disk, System.IO.Path.GetFullPath(image), managed: true, blockSize, readOnly);
    }

    private static LunRecord NewLunRecord(string targetId, int lun, DiskInfo disk, string image, bool managed, int blockSize, bool readOnly) => new()
    {
        Id = LunRecord.KeyOf(targetId, lun), TargetId = targetId, Lun = lun, UnitId = Guid.NewGuid(), DiskId = disk.Id, ImagePath = image,
        Managed = managed, SizeBytes = disk.SizeBytes, BlockSize = blockSize, ReadOnly = readOnly, CreatedAt = DateTime.UtcNow,
    };

    private async Task<LogicalUnit> AttachLunAsync(IscsiTarget target, LunRecord record)
    {
        var device = await _disks.AttachAsync(record.DiskId, record.ReadOnly);
        var unit = new LogicalUnit(new LogicalUnitIdentity(record.UnitId), device,
            new LogicalUnitOptions { MaxTransferBytes = _options.Iscsi.MaxTransferBytes, ReadOnly = record.ReadOnly },
            _catalog, new LunDirectory(target), _copyTargets)
        {
            TargetName = target.Name,
            TargetPortGroup = _options.Iscsi.PortalGroupTag,
        };
        unit.AbortTasksOfNexuses = (u, nexuses) => _portal.AbortTasksOfNexusesAsync(u, nexuses);
        // Every LUN's data path goes through its filter stack (empty until filters are configured).
        unit.Filters = new ISCSISnap.Storage.Filters.FilterEngine(device, $"{target.Name}/{record.Lun}", _options.Filters.MaxDepth, _filterObserver, _kernel, _blockCache);
        InstallFilters(unit.Filters, record);
        target.AddLun((ulong)record.Lun, unit);
        _lunRecords[record.Id] = record;
        return unit;
    }

    /// <summary>The LUN serving <paramref name="diskId"/>, if any.</summary>
    public (IscsiTarget Target, LogicalUnit Unit, LunRecord Record)? LunOfDisk(Guid diskId)
    {
        foreach (var record in _lunRecords.Values.ToList())
        {
            if (record.DiskId != diskId) continue;
            var target = _registry.All.FirstOrDefault(t => string.Equals(t.Name, record.TargetId, StringComparison.OrdinalIgnoreCase));
            if (target?.GetLun((ulong)record.Lun) is { } unit) return (target, unit, record);
        }
        return null;
    }

    /// <summary>Whether any initiator is logged in to the target serving <paramref name="diskId"/>.</summary>
    public bool DiskHasSessions(Guid diskId) =>
        LunOfDisk(diskId) is { } lun && _portal.GetSessions().Any(s => string.Equals(s.TargetName, lun.Target.Name, StringComparison.OrdinalIgnoreCase));

    /// <summary>The disk under a LUN changed size or content: tell every nexus (unit attention).</summary>
    public void NotifyDiskChanged(Guid diskId, bool capacityChanged, bool contentReplaced)
    {
        if (LunOfDisk(diskId) is not { } lun) return;
        if (contentReplaced) lun.Unit.RaiseUnitAttentionForAll(SenseCode.MediumMayHaveChanged);
        if (capacityChanged) _portal.NotifyCapacityChanged(lun.Unit);
        lun.Record.SizeBytes = lun.Unit.Device.Length;
        _catalog.SaveLun(lun.Record);
    }

    // ---------------------------------------------------------------- management operations

    public IReadOnlyList<IscsiTarget> Targets => _registry.All.ToList();

    public IscsiTarget GetTarget(string name) =>
        _registry.Find(name) ?? throw ApplianceError.NotFound($"no target named '{name}'");

    public LunRecord? LunRecordOf(IscsiTarget target, ulong lun) =>
        _lunRecords.GetValueOrDefault(LunRecord.KeyOf(target.Name.ToLowerInvariant(), (int)lun));

    public TargetRecord RecordOf(IscsiTarget target) => _catalog.FindTarget(target.Name) ?? throw ApplianceError.NotFound($"no target named '{target.Name}'");

    public async Task<IscsiTarget> CreateTargetAsync(string name, string? alias)
    {
        if (!Names.IsValidTargetName(name))
            throw ApplianceError.Invalid("name", $"'{name}' is not a valid iSCSI name: use iqn.YYYY-MM.reversed.domain[:identifier], eui.<16 hex> or naa.<16 or 32 hex>");
        if (alias is { Length: > 255 }) throw ApplianceError.Invalid("alias", "alias is longer than 255 characters");
        await _lock.WaitAsync();
        try
        {
            if (_catalog.FindTarget(name) is not null) throw ApplianceError.Conflict($"target '{name}' already exists", "name");
            var record = new TargetRecord { Id = name.ToLowerInvariant(), Name = name, Alias = alias, CreatedAt = DateTime.UtcNow };
            _catalog.SaveTarget(record);
            var target = new IscsiTarget(name, alias, TargetAccess.Open);
            _registry.TryAdd(target);
            Log.TargetCreated(_log, name);
            return target;
        }
        finally
        {
            _lock.Release();
        }
    }

    public async Task DeleteTargetAsync(string name)
    {
        await _lock.WaitAsync();
        try
        {
            var target = GetTarget(name);
            if (_portal.GetSessions().Any(s => string.Equals(s.TargetName, target.Name, StringComparison.OrdinalIgnoreCase)))
                throw ApplianceError.Conflict($"target '{target.Name}' has logged-in sessions; log them out first");
            _registry.Remove(target.Name);
            foreach (var (lun, unit) in target.Luns)
            {
                target.RemoveLun(lun);
                await CloseUnitAsync(target, lun, unit);
            }
            _catalog.DeleteTarget(target.Name.ToLowerInvariant());
            Log.TargetDeleted(_log, target.Name);
        }
        finally
        {
            _lock.Release();
        }
    }

    /// <summary>
    /// Adds a LUN serving a new empty disk (<paramref name="sizeBytes"/>), a disk imported from <paramref name="image"/>
    /// (its files are never written: a new head goes on top), or an existing disk (<paramref name="disk"/>, ID or name).
    /// </summary>
    public async Task<(LogicalUnit Unit, LunRecord Record)> AddLunAsync(string targetName, int lun, long? sizeBytes, string? image, string? disk, int blockSize, bool readOnly)
    {
        if (lun is < 0 or > 16383) throw ApplianceError.Invalid("lun", $"LUN {lun} must be 0-16383");
        if (blockSize is not (512 or 4096)) throw ApplianceError.Invalid("blockSize", "blockSize must be 512 or 4096");
        int sources = (sizeBytes is null ? 0 : 1) + (image is null ? 0 : 1) + (disk is null ? 0 : 1);
        if (sources != 1)
            throw ApplianceError.Invalid(sources == 0 ? "sizeBytes" : image is not null ? "image" : "disk",
                "give exactly one of sizeBytes (a new thin disk), image (an existing VHDX, raw image or newest .avhdx of a checkpoint chain) or disk (an existing disk)");
        if (sizeBytes is { } size && !Names.IsValidLunSize(size))
            throw ApplianceError.Invalid("sizeBytes", "sizeBytes must be a positive multiple of 4096 up to 64 TiB");
        await _lock.WaitAsync();
        try
        {
            var target = GetTarget(targetName);
            if (target.GetLun((ulong)lun) is not null) throw ApplianceError.Conflict($"LUN {lun} already exists on {target.Name}", "lun");
            string targetId = target.Name.ToLowerInvariant();
            LunRecord record;
            if (image is not null)
            {
                string full = System.IO.Path.GetFullPath(image);
                if (_lunRecords.Values.Any(r => string.Equals(r.ImagePath, full, StringComparison.Ordinal)))
                    throw ApplianceError.Conflict($"{full} is already served by another LUN", "image");
            }
            try
            {
                if (disk is not null)
                {
                    var found = _disks.FindDisk(disk) ?? throw ApplianceError.NotFound($"no disk '{disk}'");
                    if (found.SectorSize != blockSize && blockSize != 512)
                        throw ApplianceError.Invalid("blockSize", $"disk '{found.Name}' has {found.SectorSize}-byte sectors");
                    record = NewLunRecord(targetId, lun, found, "", managed: false, found.SectorSize, readOnly);
                }
                else
                {
                    record = image is not null
                        ? await ImportedDiskLunAsync(targetId, lun, image, blockSize, readOnly)
                        : await NewDiskLunAsync(targetId, lun, sizeBytes!.Value, blockSize, readOnly);
                }
            }
            catch (StorageException e)
            {
                throw ApplianceError.Invalid(image is not null ? "image" : "sizeBytes", e.Message);
            }
            catch (DiskException e)
            {
                throw DiskErrors.ToApplianceError(e, image is not null ? "image" : disk is not null ? "disk" : "sizeBytes");
            }
            LogicalUnit unit;
            try
            {
                unit = await AttachLunAsync(target, record);
            }
            catch (Exception e) when (e is StorageException or DiskException)
            {
                if (record.Managed) await _disks.DeleteDiskAsync(record.DiskId);
                throw e is DiskException d ? DiskErrors.ToApplianceError(d, "disk") : ApplianceError.Invalid(image is not null ? "image" : "disk", e.Message);
            }
            _catalog.SaveLun(record);
            Log.LunCreated(_log, target.Name, lun, _disks.GetDisk(record.DiskId).HeadPath, record.SizeBytes);
            return (unit, record);
        }
        finally
        {
            _lock.Release();
        }
    }

    public async Task DeleteLunAsync(string targetName, int lun)
    {
        await _lock.WaitAsync();
        try
        {
            var target = GetTarget(targetName);
            var unit = target.RemoveLun((ulong)lun) ?? throw ApplianceError.NotFound($"no LUN {lun} on {target.Name}");
            await CloseUnitAsync(target, (ulong)lun, unit);
            Log.LunDeleted(_log, target.Name, lun);
        }
        finally
        {
            _lock.Release();
        }
    }

    public async Task<LunRecord> GrowLunAsync(string targetName, int lun, long sizeBytes)
    {
        await _lock.WaitAsync();
        try
        {
            var target = GetTarget(targetName);
            var unit = target.GetLun((ulong)lun) ?? throw ApplianceError.NotFound($"no LUN {lun} on {target.Name}");
            var record = LunRecordOf(target, (ulong)lun)!;
            if (!Names.IsValidLunSize(sizeBytes)) throw ApplianceError.Invalid("sizeBytes", "sizeBytes must be a positive multiple of 4096 up to 64 TiB");
            if (sizeBytes < unit.Device.Length) throw ApplianceError.Invalid("sizeBytes", $"LUNs only grow: {sizeBytes} is below the current {unit.Device.Length} bytes");
            if (sizeBytes == unit.Device.Length) return record;
            try
            {
                await _disks.GrowAsync(record.DiskId, sizeBytes);
            }
            catch (DiskException e)
            {
                throw DiskErrors.ToApplianceError(e, "sizeBytes");
            }
            record.SizeBytes = sizeBytes;
            _catalog.SaveLun(record);
            _portal.NotifyCapacityChanged(unit);
            Log.LunGrown(_log, target.Name, lun, sizeBytes);
            return record;
        }
        finally
        {
            _lock.Release();
        }
    }

    public async Task SetAccessAsync(string targetName, IReadOnlyList<string>? allowedInitiators, ChapCredentials? chap, ChapCredentials? mutualChap, bool updateAcl, bool updateChap)
    {
        await _lock.WaitAsync();
        try
        {
            var target = GetTarget(targetName);
            var record = RecordOf(target);
            if (updateAcl)
            {
                foreach (var initiator in allowedInitiators ?? [])
                    if (!Names.IsValidInitiatorName(initiator)) throw ApplianceError.Invalid("allowedInitiators", $"'{initiator}' is not a valid iSCSI name");
                record.AllowedInitiators = (allowedInitiators ?? []).Distinct(StringComparer.OrdinalIgnoreCase).ToList();
            }
            if (updateChap)
            {
                if (chap is not null) foreach (var e in chap.Validate("chap")) throw ApplianceError.Invalid("chap", e);
                if (mutualChap is not null)
                {
                    if (chap is null) throw ApplianceError.Invalid("mutualChap", "mutual CHAP needs one-way CHAP credentials as well");
                    foreach (var e in mutualChap.Validate("mutualChap")) throw ApplianceError.Invalid("mutualChap", e);
                    if (mutualChap.Secret == chap.Secret) throw ApplianceError.Invalid("mutualChap.secret", "the mutual CHAP secret must differ from the initiator's secret");
                }
                record.ChapUserName = chap?.UserName;
                record.ChapSecret = chap?.Secret;
                record.MutualChapUserName = mutualChap?.UserName;
                record.MutualChapSecret = mutualChap?.Secret;
            }
            _catalog.SaveTarget(record);
            target.Access = AccessOf(record);
        }
        finally
        {
            _lock.Release();
        }
    }

    private async Task CloseUnitAsync(IscsiTarget target, ulong lun, LogicalUnit unit)
    {
        // Commands already running on the unit finish before its device closes.
        await _portal.DrainUnitAsync(unit);
        if (unit.Filters is { } filters) await filters.ClearAsync();
        string key = LunRecord.KeyOf(target.Name.ToLowerInvariant(), (int)lun);
        if (_lunRecords.Remove(key, out var record))
        {
            _catalog.DeleteLun(key);
            await unit.Device.FlushAsync();
            await _disks.DetachAsync(record.DiskId);
            await unit.DisposeAsync();
            // The LUN's own disk goes with it unless snapshots were taken of it (they stay, under /disks).
            if (record.Managed && _disks.Snapshots(record.DiskId).All(snapshot => snapshot.External))
            {
                try
                {
                    await _disks.DeleteDiskAsync(record.DiskId);
                }
                catch (DiskException e)
                {
                    // Snapshots of it carry clones, or a job uses it: the disk stays, listed under /disks.
                    Log.DiskKept(_log, record.DiskId.ToString(), e.Message);
                }
            }
        }
        else await unit.DisposeAsync();
    }

    // ---------------------------------------------------------------- filters

    private static List<FilterSpec> SpecsOf(LunRecord record) =>
        string.IsNullOrEmpty(record.FiltersJson) ? [] : JsonSerializer.Deserialize<List<FilterSpec>>(record.FiltersJson, ConfigurationLoader.Json) ?? [];

    /// <summary>The LUN's configured stack. A filter that cannot be made (a plugin gone, say) is logged and left out; its spec stays for the next start.</summary>
    private void InstallFilters(FilterEngine engine, LunRecord record)
    {
        foreach (var spec in SpecsOf(record))
        {
            try
            {
                engine.Add(_filterFactory.Create(spec, engine.Device), spec.ToOptions());
            }
            catch (Exception e) when (e is FilterConfigurationException or ArgumentException or IOException or UnauthorizedAccessException)
            {
                Log.FilterUnavailable(_log, engine.Lun, spec.Type, e.Message);
            }
        }
    }

    private (LogicalUnit Unit, LunRecord Record) LunOf(string targetName, int lun)
    {
        var target = GetTarget(targetName);
        var unit = target.GetLun((ulong)lun) ?? throw ApplianceError.NotFound($"no LUN {lun} on {target.Name}");
        var record = LunRecordOf(target, (ulong)lun) ?? throw ApplianceError.NotFound($"no LUN {lun} on {target.Name}");
        return (unit, record);
    }

    public (IReadOnlyList<FilterSlot> Slots, IReadOnlyList<FilterSpec> Specs) FiltersOf(string targetName, int lun)
    {
        var (unit, record) = LunOf(targetName, lun);
        return (unit.Filters?.Filters ?? [], SpecsOf(record));
    }

    /// <summary>Adds a filter to a live LUN at <paramref name="position"/> (0 = top; null = bottom) and records it in the catalog.</summary>
    public async Task<FilterSlot> AddFilterAsync(string targetName, int lun, FilterSpec spec, int? position)
    {
        if (spec.Validate("filter") is { Count: > 0 } errors) throw ApplianceError.Invalid("filter", string.Join("; ", errors));
        if (position is < 0) throw ApplianceError.Invalid("position", "position must be 0 (top) or more");
        await _lock.WaitAsync();
        try
        {
            var (unit, record) = LunOf(targetName, lun);
            var engine = unit.Filters ?? throw ApplianceError.Conflict("the LUN has no filter engine");
            if (spec.Type != FilterSpec.Plugin && engine.Filters.Any(s => s.Name == spec.Type))
                throw ApplianceError.Conflict($"LUN {lun} of {targetName} already has a {spec.Type} filter", "type");
            IIoFilter filter;
            try
            {
                filter = _filterFactory.Create(spec, engine.Device);
            }
            catch (FilterConfigurationException e)
            {
                throw ApplianceError.Invalid(e.Field, e.Message);
            }
            if (spec.Type == FilterSpec.Plugin) spec.Name = filter.Name;
            FilterSlot slot;
            try
            {
                slot = engine.Add(filter, spec.ToOptions(), position);
            }
            catch (ArgumentException e)
            {
                if (filter is IAsyncDisposable asyncDisposable) await asyncDisposable.DisposeAsync();
                else (filter as IDisposable)?.Dispose();
                throw ApplianceError.Conflict(e.Message, "type");
            }
            // The catalog keeps the stack's order: the specs of the filters now running, in their places.
            var specs = SpecsOf(record);
            var running = engine.Filters.ToList();
            int at = running.IndexOf(slot);
            int next = at + 1 < running.Count ? specs.FindIndex(s => (s.Name ?? s.Type) == running[at + 1].Name) : -1;
            specs.Insert(next >= 0 ? next : specs.Count, spec);
            record.FiltersJson = JsonSerializer.Serialize(specs, ConfigurationLoader.Json);
            _catalog.SaveLun(record);
            Log.FilterAdded(_log, engine.Lun, slot.Name, at);
            return slot;
        }
        finally
        {
            _lock.Release();
        }
    }

    /// <summary>Changes a live QoS filter's caps (requests already waiting included) and records them.</summary>
    public async Task<FilterSlot> SetQosLimitsAsync(string targetName, int lun, FilterSpec caps)
    {
        await _lock.WaitAsync();
        try
        {
            var (unit, record) = LunOf(targetName, lun);
            var slot = unit.Filters?.Filters.FirstOrDefault(s => s.Filter is ISCSISnap.Storage.Filters.BuiltIn.QosFilter)
                ?? throw ApplianceError.NotFound($"LUN {lun} of {targetName} has no qos filter");
            var specs = SpecsOf(record);
            var spec = specs.FirstOrDefault(s => s.Type == FilterSpec.Qos) ?? new FilterSpec { Type = FilterSpec.Qos };
            spec.IopsPerLun = caps.IopsPerLun ?? spec.IopsPerLun;
            spec.BytesPerSecondPerLun = caps.BytesPerSecondPerLun ?? spec.BytesPerSecondPerLun;
            spec.IopsPerInitiator = caps.IopsPerInitiator ?? spec.IopsPerInitiator;
            spec.BytesPerSecondPerInitiator = caps.BytesPerSecondPerInitiator ?? spec.BytesPerSecondPerInitiator;
            if (spec.Validate("filter") is { Count: > 0 } errors) throw ApplianceError.Invalid("filter", string.Join("; ", errors));
            ((ISCSISnap.Storage.Filters.BuiltIn.QosFilter)slot.Filter).SetLimits(FilterFactory.QosLimitsOf(spec));
            if (!specs.Contains(spec)) specs.Add(spec);
            record.FiltersJson = JsonSerializer.Serialize(specs, ConfigurationLoader.Json);
            _catalog.SaveLun(record);
            return slot;
        }
        finally
        {
            _lock.Release();
        }
    }

    /// <summary>Takes a filter off a live LUN (waiting for the requests that use it) and out of the catalog.</summary>
    public async Task RemoveFilterAsync(string targetName, int lun, string name)
    {
        await _lock.WaitAsync();
        try
        {
            var (unit, record) = LunOf(targetName, lun);
            var specs = SpecsOf(record);
            int index = specs.FindIndex(s => (s.Name ?? s.Type) == name);
            bool running = unit.Filters is { } engine && await engine.RemoveAsync(name);
            if (!running && index < 0) throw ApplianceError.NotFound($"no filter {name} on LUN {lun} of {targetName}");
            if (index >= 0)
            {
                specs.RemoveAt(index);
                record.FiltersJson = specs.Count == 0 ? "" : JsonSerializer.Serialize(specs, ConfigurationLoader.Json);
                _catalog.SaveLun(record);
            }
            Log.FilterRemoved(_log, unit.Filters?.Lun ?? $"{targetName}/{lun}", name);
        }
        finally
        {
            _lock.Release();
        }
    }

    private int _disposed;

    /// <summary>Shutdown: every device is flushed, then closed (once, however often the host asks).</summary>
    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
        foreach (var target in _registry.All)
        {
            foreach (var unit in target.Luns.Values)
            {
                // Filters close first: what they keep (checksums) is written out after the data it covers.
                if (unit.Filters is { } filters) await filters.ClearAsync();
                var status = await unit.Device.FlushAsync();
                if (status != IoStatus.Ok) Log.FlushFailed(_log, target.Name, unit.ToString(), status.ToString());
            }
        }
        await _disks.DisposeAsync();
        _kernel.Dispose();
    }

    private sealed class LunDirectory(IscsiTarget target) : ILunDirectory
    {
        public IEnumerable<ulong> LunNumbers => target.Luns.Keys;
    }

    private sealed class CopyTargetResolver(TargetRegistry registry) : ICopyTargetResolver
    {
        public LogicalUnit? FindByDesignator(ReadOnlySpan<byte> naa) => registry.FindByDesignator(naa);
    }
}

/// <summary>Disk refusals as API problems.</summary>
public static class DiskErrors
{
    public static ApplianceError ToApplianceError(DiskException e, string? defaultField = null) => e.Fault switch
    {
        DiskFault.NotFound => ApplianceError.NotFound(e.Message),
        DiskFault.Conflict => ApplianceError.Conflict(e.Message, e.Field),
        _ => ApplianceError.Invalid(e.Field ?? defaultField ?? "body", e.Message),
    };
}
