using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Disks;

namespace ISCSISnap.Web.Appliance;

/// <summary>
/// Disk operations as the API and CLI ask for them: refusals become <see cref="ApplianceError"/>s (problem+json)
/// and are logged with the file and fault; long work runs as jobs; LUNs serving a changed disk get their unit
/// attentions.
/// </summary>
public sealed class DiskService
{
    private readonly DiskManager _disks;
    private readonly TargetService _targets;
    private readonly JobService _jobs;
    private readonly ILogger<DiskService> _log;

    public DiskService(TargetService targets, JobService jobs, ILogger<DiskService> log)
    {
        _targets = targets;
        _disks = targets.Disks;
        _jobs = jobs;
        _log = log;
    }

    public IReadOnlyList<DiskInfo> List() => _disks.Disks;

    public DiskInfo Get(string idOrName) => _disks.FindDisk(idOrName) ?? throw ApplianceError.NotFound($"no disk '{idOrName}'");

    /// <summary>The LUN serving a disk, as "target/lun", if any.</summary>
    public (string Target, int Lun)? LunOf(Guid diskId) => _targets.LunOfDisk(diskId) is { } l ? (l.Target.Name, l.Record.Lun) : null;

    public Task<DiskInfo> CreateAsync(string? name, long? sizeBytes, int? blockSize, int? sectorSize, string? image)
    {
        if (string.IsNullOrWhiteSpace(name)) throw ApplianceError.Invalid("name", "name is required");
        if ((sizeBytes is null) == (image is null))
            throw ApplianceError.Invalid(sizeBytes is null ? "sizeBytes" : "image",
                "give either sizeBytes (a new empty disk) or image (an existing VHDX, raw image or the newest .avhdx of a checkpoint chain)");
        if (image is not null && blockSize is not null) throw ApplianceError.Invalid("blockSize", "blockSize applies to a new disk, not an import");
        return RunAsync(image is not null ? "image" : "sizeBytes", () => image is not null
            ? _disks.ImportAsync(name, image, sectorSize ?? 512)
            : _disks.CreateAsync(name, sizeBytes!.Value, sectorSize ?? 512, blockSize));
    }

    public Task DeleteAsync(string idOrName)
    {
        var disk = Get(idOrName);
        if (LunOf(disk.Id) is { } lun)
            throw ApplianceError.Conflict($"disk '{disk.Name}' is served by LUN {lun.Lun} of {lun.Target}; delete the LUN first");
        return RunAsync(null, async () =>
        {
            await _disks.DeleteDiskAsync(disk.Id);
            return true;
        });
    }

    public async Task<DiskInfo> GrowAsync(string idOrName, long sizeBytes)
    {
        var disk = Get(idOrName);
        var grown = await RunAsync("sizeBytes", () => _disks.GrowAsync(disk.Id, sizeBytes));
        if (grown.SizeBytes != disk.SizeBytes) _targets.NotifyDiskChanged(disk.Id, capacityChanged: true, contentReplaced: false);
        return grown;
    }

    /// <summary>Compares the disk's chain map with one rebuilt from its images (a consistency check).</summary>
    public async Task<long?> CheckMapAsync(string idOrName)
    {
        var disk = Get(idOrName);
        return await RunAsync(null, () => _disks.FindMapDisagreementAsync(disk.Id));
    }

    public IReadOnlyList<SnapshotInfo> Snapshots(string idOrName) => _disks.Snapshots(Get(idOrName).Id);

    public SnapshotInfo GetSnapshot(string idOrName, Guid snapshotId) =>
        Snapshots(idOrName).FirstOrDefault(s => s.Id == snapshotId)
        ?? throw ApplianceError.NotFound($"disk '{idOrName}' has no snapshot {snapshotId}");

    public Task<SnapshotInfo> SnapshotAsync(string idOrName, string? name)
    {
        var disk = Get(idOrName);
        return RunAsync("name", () => _disks.SnapshotAsync(disk.Id, name));
    }

    public Task<DiskInfo> CloneAsync(string idOrName, Guid snapshotId, string? name)
    {
        GetSnapshot(idOrName, snapshotId);
        if (string.IsNullOrWhiteSpace(name)) throw ApplianceError.Invalid("name", "name (of the new disk) is required");
        return RunAsync("name", () => _disks.CloneAsync(snapshotId, name));
    }

    /// <summary>
    /// Points a disk back at a snapshot. A disk whose LUN has logged-in initiators is refused unless
    /// <paramref name="force"/>: their view of the medium changes under them (they get 28/00 MEDIUM MAY HAVE CHANGED).
    /// </summary>
    public async Task<DiskInfo> RevertAsync(string idOrName, Guid? snapshotId, bool force)
    {
        var disk = Get(idOrName);
        if (snapshotId is not { } id) throw ApplianceError.Invalid("snapshot", "snapshot (the ID to revert to) is required");
        GetSnapshot(idOrName, id);
        if (!force && _targets.DiskHasSessions(disk.Id))
            throw ApplianceError.Conflict($"disk '{disk.Name}' is in use by logged-in initiators; log them out, or revert with force (they see MEDIUM MAY HAVE CHANGED)", "force");
        var reverted = await RunAsync("snapshot", () => _disks.RevertAsync(disk.Id, id));
        _targets.NotifyDiskChanged(disk.Id, capacityChanged: reverted.SizeBytes != disk.SizeBytes, contentReplaced: true);
        return reverted;
    }

    /// <summary>Deletes a snapshot (merging it into its child when it has one) as a job.</summary>
    public JobInfo DeleteSnapshot(string idOrName, Guid snapshotId)
    {
        var disk = Get(idOrName);
        var snapshot = GetSnapshot(idOrName, snapshotId);
        return StartMerge(disk, snapshot.Id, snapshot.Name);
    }

    /// <summary>Resumes the merges a crash or shutdown interrupted.</summary>
    public void ResumePendingMerges()
    {
        foreach (var (diskId, snapshotId) in _disks.PendingMerges)
        {
            var disk = _disks.GetDisk(diskId);
            Log.MergeResumed(_log, disk.Name, snapshotId);
            StartMerge(disk, snapshotId, snapshotId.ToString());
        }
    }

    private JobInfo StartMerge(DiskInfo disk, Guid snapshotId, string snapshotName) =>
        _jobs.Start("delete-snapshot", $"delete snapshot '{snapshotName}' of disk '{disk.Name}'", disk.Id, snapshotId, async (progress, token) =>
        {
            try
            {
                await _disks.DeleteSnapshotAsync(snapshotId, progress, token);
            }
            catch (StorageException e)
            {
                Log.DiskRefused(_log, e.Path, e.Fault);
                throw;
            }
        });

    public JobInfo Export(string idOrName, string? path, string? format, Guid? snapshotId)
    {
        var disk = Get(idOrName);
        if (string.IsNullOrWhiteSpace(path)) throw ApplianceError.Invalid("path", "path (an absolute file path for the export) is required");
        var layerFormat = (format ?? "vhdx").ToLowerInvariant() switch
        {
            "vhdx" => LayerFormat.Vhdx,
            "raw" => LayerFormat.Raw,
            _ => throw ApplianceError.Invalid("format", $"format '{format}' is not vhdx or raw"),
        };
        if (snapshotId is { } sid) GetSnapshot(idOrName, sid);
        if (!Path.IsPathFullyQualified(path)) throw ApplianceError.Invalid("path", "path must be an absolute file path");
        string full = Path.GetFullPath(path);
        string? directory = Path.GetDirectoryName(full);
        if (directory is null || !Directory.Exists(directory)) throw ApplianceError.Invalid("path", $"{directory}: no such directory");
        if (File.Exists(full)) throw ApplianceError.Conflict($"{full} already exists; an export does not overwrite files", "path");
        Guid source = snapshotId ?? disk.Id;
        string what = snapshotId is { } s ? $"snapshot {s} of disk '{disk.Name}'" : $"disk '{disk.Name}'";
        return _jobs.Start("export", $"export {what} to {full} ({layerFormat})", disk.Id, snapshotId,
            (progress, token) => _disks.ExportAsync(source, full, layerFormat, progress, token));
    }

    /// <summary>Runs a disk operation, turning refusals into API errors and logging damaged files.</summary>
    private async Task<T> RunAsync<T>(string? field, Func<Task<T>> operation)
    {
        try
        {
            return await operation();
        }
        catch (DiskException e)
        {
            throw DiskErrors.ToApplianceError(e, field);
        }
        catch (StorageException e)
        {
            // A file the appliance cannot use: the message names it and the fault.
            Log.DiskRefused(_log, e.Path, e.Fault);
            throw ApplianceError.Invalid(field ?? "image", e.Message);
        }
    }
}
