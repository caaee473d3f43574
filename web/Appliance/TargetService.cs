using System.Collections.Immutable;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Scsi;
using ISCSISnap.Web.Catalog;
using ISCSISnap.Web.Configuration;

namespace ISCSISnap.Web.Appliance;

/// <summary>
/// Owns the live targets and LUNs: loads them from the catalog at start, applies appliance.json declarations,
/// and carries out management requests so the catalog and the running target never disagree.
/// Threading: management operations are serialised by one lock; the iSCSI data path never takes it.
/// </summary>
public sealed class TargetService : IAsyncDisposable
{
    private readonly ApplianceCatalog _catalog;
    private readonly TargetRegistry _registry;
    private readonly IscsiPortal _portal;
    private readonly ApplianceOptions _options;
    private readonly ILogger<TargetService> _log;
    private readonly SemaphoreSlim _lock = new(1, 1);
    private readonly Dictionary<string, LunRecord> _lunRecords = new();
    private readonly CopyTargetResolver _copyTargets;

    public TargetService(ApplianceCatalog catalog, TargetRegistry registry, IscsiPortal portal, ApplianceOptions options, ILogger<TargetService> log)
    {
        _catalog = catalog;
        _registry = registry;
        _portal = portal;
        _options = options;
        _log = log;
        _copyTargets = new CopyTargetResolver(registry);
        ImagesDirectory = System.IO.Path.Combine(options.DataDirectory, "images");
    }

    public string ImagesDirectory { get; }
    public TargetRegistry Registry => _registry;

    /// <summary>Brings up every catalogued target and LUN, creating the demo target on a new catalog and applying declared targets.</summary>
    public async Task LoadAsync()
    {
        Directory.CreateDirectory(ImagesDirectory);
        if (_catalog.IsNew && _options.DemoTarget is { } demo && _catalog.FindTarget(demo.Name) is null)
        {
            var target = new TargetRecord { Id = demo.Name.ToLowerInvariant(), Name = demo.Name, Alias = demo.Alias, CreatedAt = DateTime.UtcNow };
            _catalog.SaveTarget(target);
            var lun = CreateManagedImage(target.Id, 0, demo.SizeBytes, 512);
            _catalog.SaveLun(lun);
            Log.DemoTargetCreated(_log, demo.Name, demo.SizeBytes);
        }
        foreach (var declared in _options.Targets) ApplyDeclaration(declared);

        foreach (var record in _catalog.Targets())
        {
            var target = new IscsiTarget(record.Name, record.Alias, AccessOf(record));
            _registry.TryAdd(target);
            foreach (var lun in _catalog.Luns(record.Id))
            {
                try
                {
                    AttachLun(target, lun);
                }
                catch (StorageException e)
                {
                    // One broken image must not keep the others offline; the log says which and why.
                    Log.LunUnavailable(_log, record.Name, lun.Lun, e.Message);
                }
            }
        }
        await Task.CompletedTask;
    }

    private void ApplyDeclaration(TargetDeclaration declared)
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
        var existing = _catalog.Luns(id).Select(l => l.Lun).ToHashSet();
        foreach (var lun in declared.Luns.Where(l => !existing.Contains(l.Lun)))
        {
            var lunRecord = lun.Image is { } image
                ? ExternalImage(id, lun.Lun, image, lun.BlockSize, lun.ReadOnly)
                : CreateManagedImage(id, lun.Lun, lun.SizeBytes, lun.BlockSize, lun.ReadOnly);
            _catalog.SaveLun(lunRecord);
        }
    }

    private static TargetAccess AccessOf(TargetRecord record) => new(
        record.AllowedInitiators.ToImmutableArray(),
        record.ChapUserName is { } user ? new ChapCredentials(user, record.ChapSecret!) : null,
        record.MutualChapUserName is { } mutual ? new ChapCredentials(mutual, record.MutualChapSecret!) : null);

    private LunRecord CreateManagedImage(string targetId, int lun, long sizeBytes, int blockSize, bool readOnly = false)
    {
        var unitId = Guid.NewGuid();
        string path = System.IO.Path.Combine(ImagesDirectory, $"{unitId:N}.img");
        using (FileBlockDevice.Create(path, sizeBytes, blockSize).AsDisposable()) { }
        return new LunRecord
        {
            Id = LunRecord.KeyOf(targetId, lun), TargetId = targetId, Lun = lun, UnitId = unitId, ImagePath = System.IO.Path.GetFullPath(path),
            Managed = true, SizeBytes = sizeBytes, BlockSize = blockSize, ReadOnly = readOnly, CreatedAt = DateTime.UtcNow,
        };
    }

    private static LunRecord ExternalImage(string targetId, int lun, string image, int blockSize, bool readOnly)
    {
        string path = System.IO.Path.GetFullPath(image);
        using var probe = FileBlockDevice.Open(path, blockSize, readOnly: true).AsDisposable();
        return new LunRecord
        {
            Id = LunRecord.KeyOf(targetId, lun), TargetId = targetId, Lun = lun, UnitId = Guid.NewGuid(), ImagePath = path,
            Managed = false, SizeBytes = probe.Device.Length, BlockSize = blockSize, ReadOnly = readOnly, CreatedAt = DateTime.UtcNow,
        };
    }

    private LogicalUnit AttachLun(IscsiTarget target, LunRecord record)
    {
        var device = FileBlockDevice.Open(record.ImagePath, record.BlockSize, record.ReadOnly);
        var unit = new LogicalUnit(new LogicalUnitIdentity(record.UnitId), device,
            new LogicalUnitOptions { MaxTransferBytes = _options.Iscsi.MaxTransferBytes, ReadOnly = record.ReadOnly },
            _catalog, new LunDirectory(target), _copyTargets)
        {
            TargetName = target.Name,
            TargetPortGroup = _options.Iscsi.PortalGroupTag,
        };
        unit.AbortTasksOfNexuses = (u, nexuses) => _portal.AbortTasksOfNexusesAsync(u, nexuses);
        target.AddLun((ulong)record.Lun, unit);
        _lunRecords[record.Id] = record;
        return unit;
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

    public async Task<(LogicalUnit Unit, LunRecord Record)> AddLunAsync(string targetName, int lun, long? sizeBytes, string? image, int blockSize, bool readOnly)
    {
        if (lun is < 0 or > 16383) throw ApplianceError.Invalid("lun", $"LUN {lun} must be 0-16383");
        if (blockSize is not (512 or 4096)) throw ApplianceError.Invalid("blockSize", "blockSize must be 512 or 4096");
        if (image is null && (sizeBytes is not { } size || !Names.IsValidLunSize(size)))
            throw ApplianceError.Invalid("sizeBytes", "sizeBytes must be a positive multiple of 4096 up to 64 TiB (or give an existing image)");
        if (image is not null && sizeBytes is not null)
            throw ApplianceError.Invalid("sizeBytes", "give either sizeBytes (a new thin disk) or image (an existing file), not both");
        await _lock.WaitAsync();
        try
        {
            var target = GetTarget(targetName);
            if (target.GetLun((ulong)lun) is not null) throw ApplianceError.Conflict($"LUN {lun} already exists on {target.Name}", "lun");
            string targetId = target.Name.ToLowerInvariant();
            LunRecord record;
            try
            {
                record = image is not null
                    ? ExternalImage(targetId, lun, image, blockSize, readOnly)
                    : CreateManagedImage(targetId, lun, sizeBytes!.Value, blockSize, readOnly);
            }
            catch (StorageException e)
            {
                throw ApplianceError.Invalid(image is not null ? "image" : "sizeBytes", e.Message);
            }
            if (image is not null && _lunRecords.Values.Any(r => string.Equals(r.ImagePath, record.ImagePath, StringComparison.Ordinal)))
                throw ApplianceError.Conflict($"{record.ImagePath} is already served by another LUN", "image");
            _catalog.SaveLun(record);
            var unit = AttachLun(target, record);
            Log.LunCreated(_log, target.Name, lun, record.ImagePath, record.SizeBytes);
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
            var status = await unit.Device.GrowAsync(sizeBytes);
            if (status != IoStatus.Ok) throw ApplianceError.Conflict($"cannot grow {record.ImagePath}: {status}", "sizeBytes");
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
        string key = LunRecord.KeyOf(target.Name.ToLowerInvariant(), (int)lun);
        if (_lunRecords.Remove(key, out var record))
        {
            _catalog.DeleteLun(key);
            await unit.Device.FlushAsync();
            await unit.DisposeAsync();
            if (record.Managed)
            {
                File.Delete(record.ImagePath);
                File.Delete(record.ImagePath + ".atomic");
            }
        }
        else await unit.DisposeAsync();
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
                var status = await unit.Device.FlushAsync();
                if (status != IoStatus.Ok) Log.FlushFailed(_log, target.Name, unit.ToString(), status.ToString());
                await unit.DisposeAsync();
            }
        }
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

internal static class DeviceDisposal
{
    public readonly struct Handle(FileBlockDevice device) : IDisposable
    {
        public FileBlockDevice Device => device;
        public void Dispose() => device.DisposeAsync().AsTask().GetAwaiter().GetResult();
    }

    public static Handle AsDisposable(this FileBlockDevice device) => new(device);
}
