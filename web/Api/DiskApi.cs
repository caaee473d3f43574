using ISCSISnap.Storage.Disks;
using ISCSISnap.Web.Appliance;

namespace ISCSISnap.Web.Api;

public sealed record LunRefDto(string Target, int Lun);
public sealed record DiskDto(Guid Id, string Name, long SizeBytes, int SectorSize, Guid HeadId, string HeadPath, IReadOnlyList<Guid> Chain,
    LunRefDto? ServedBy, DateTimeOffset CreatedAt, MergeInfo? Merge);
public sealed record SnapshotDto(Guid Id, string Name, Guid? ParentId, string Path, string Format, bool External, bool InChain,
    DateTimeOffset CreatedAt, DateTimeOffset? FrozenAt, IReadOnlyList<Guid> Children, IReadOnlyList<Guid> Disks);
public sealed record CreateDiskRequest(string? Name, long? SizeBytes, int? BlockSize, int? SectorSize, string? Image);
public sealed record UpdateDiskRequest(long? SizeBytes);
public sealed record CreateSnapshotRequest(string? Name);
public sealed record CloneRequest(string? Name);
public sealed record RevertRequest(Guid? Snapshot, bool? Force);
public sealed record ExportRequest(string? Path, string? Format, Guid? Snapshot);

/// <summary>
/// /api/v1/disks: disks (snapshot chains), their snapshots, clones, revert, export; /api/v1/jobs for long work.
/// A disk is named by its ID or its name.
/// </summary>
public static class DiskApi
{
    public static void Map(WebApplication app)
    {
        var api = app.MapGroup("/api/v1");

        api.MapGet("/disks", (DiskService disks) => Results.Ok(disks.List().Select(d => ToDto(d, disks))));

        api.MapPost("/disks", async (HttpRequest request, DiskService disks) =>
        {
            var body = await ManagementApi.ReadBodyAsync<CreateDiskRequest>(request);
            var disk = await disks.CreateAsync(body.Name, body.SizeBytes, body.BlockSize, body.SectorSize, body.Image);
            return Results.Created($"/api/v1/disks/{disk.Id}", ToDto(disk, disks));
        });

        api.MapGet("/disks/{disk}", (string disk, DiskService disks) => Results.Ok(ToDto(disks.Get(disk), disks)));

        api.MapMethods("/disks/{disk}", ["PATCH"], async (string disk, HttpRequest request, DiskService disks) =>
        {
            var body = await ManagementApi.ReadBodyAsync<UpdateDiskRequest>(request);
            if (body.SizeBytes is not { } size) throw ApplianceError.Invalid("sizeBytes", "sizeBytes is required");
            return Results.Ok(ToDto(await disks.GrowAsync(disk, size), disks));
        });

        api.MapDelete("/disks/{disk}", async (string disk, DiskService disks) =>
        {
            await disks.DeleteAsync(disk);
            return Results.NoContent();
        });

        api.MapPost("/disks/{disk}/check", async (string disk, DiskService disks) =>
        {
            long? sector = await disks.CheckMapAsync(disk);
            return Results.Ok(new { mapAgreesWithImages = sector is null, firstDisagreeingSector = sector });
        });

        api.MapGet("/disks/{disk}/snapshots", (string disk, DiskService disks) =>
            Results.Ok(disks.Snapshots(disk).Select(ToDto)));

        api.MapPost("/disks/{disk}/snapshots", async (string disk, HttpRequest request, DiskService disks) =>
        {
            var body = request.ContentLength is 0 ? new CreateSnapshotRequest(null) : await ManagementApi.ReadBodyAsync<CreateSnapshotRequest>(request);
            var snapshot = await disks.SnapshotAsync(disk, body.Name);
            return Results.Created($"/api/v1/disks/{disk}/snapshots/{snapshot.Id}", ToDto(snapshot));
        });

        api.MapGet("/disks/{disk}/snapshots/{snapshot:guid}", (string disk, Guid snapshot, DiskService disks) =>
            Results.Ok(ToDto(disks.GetSnapshot(disk, snapshot))));

        api.MapDelete("/disks/{disk}/snapshots/{snapshot:guid}", (string disk, Guid snapshot, DiskService disks) =>
        {
            var job = disks.DeleteSnapshot(disk, snapshot);
            return Results.Accepted($"/api/v1/jobs/{job.Id}", job);
        });

        api.MapPost("/disks/{disk}/snapshots/{snapshot:guid}/clone", async (string disk, Guid snapshot, HttpRequest request, DiskService disks) =>
        {
            var body = await ManagementApi.ReadBodyAsync<CloneRequest>(request);
            var clone = await disks.CloneAsync(disk, snapshot, body.Name);
            return Results.Created($"/api/v1/disks/{clone.Id}", ToDto(clone, disks));
        });

        api.MapPost("/disks/{disk}/revert", async (string disk, HttpRequest request, DiskService disks) =>
        {
            var body = await ManagementApi.ReadBodyAsync<RevertRequest>(request);
            return Results.Ok(ToDto(await disks.RevertAsync(disk, body.Snapshot, body.Force ?? false), disks));
        });

        api.MapPost("/disks/{disk}/export", async (string disk, HttpRequest request, DiskService disks) =>
        {
            var body = await ManagementApi.ReadBodyAsync<ExportRequest>(request);
            var job = disks.Export(disk, body.Path, body.Format, body.Snapshot);
            return Results.Accepted($"/api/v1/jobs/{job.Id}", job);
        });

        api.MapGet("/jobs", (JobService jobs) => Results.Ok(jobs.All));

        api.MapGet("/jobs/{id:guid}", (Guid id, JobService jobs) =>
            Results.Ok(jobs.Get(id) ?? throw ApplianceError.NotFound($"no job {id}")));
    }

    private static DiskDto ToDto(DiskInfo disk, DiskService disks) => new(
        disk.Id, disk.Name, disk.SizeBytes, disk.SectorSize, disk.HeadId, disk.HeadPath, disk.Chain,
        disks.LunOf(disk.Id) is { } lun ? new LunRefDto(lun.Target, lun.Lun) : null, disk.CreatedAt, disk.Merge);

    private static SnapshotDto ToDto(SnapshotInfo s) => new(
        s.Id, s.Name, s.ParentId, s.Path, s.Format.ToString().ToLowerInvariant(), s.External, s.InChain, s.CreatedAt, s.FrozenAt, s.Children, s.DisksOnTop);
}
