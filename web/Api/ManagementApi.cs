using System.Text.Json;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Scsi;
using ISCSISnap.Web.Appliance;
using ISCSISnap.Web.Catalog;
using ISCSISnap.Web.Configuration;

namespace ISCSISnap.Web.Api;

public sealed record ChapUserDto(string UserName);
public sealed record LunDto(int Lun, long SizeBytes, int BlockSize, Guid Disk, string? Image, bool Managed, bool ReadOnly, string Naa, string Serial);
public sealed record TargetDto(string Name, string? Alias, IReadOnlyList<string> AllowedInitiators, ChapUserDto? Chap, ChapUserDto? MutualChap, IReadOnlyList<LunDto> Luns, int Sessions);
public sealed record CreateTargetRequest(string? Name, string? Alias, List<string>? AllowedInitiators, ChapCredentials? Chap, ChapCredentials? MutualChap);
public sealed record CreateLunRequest(int? Lun, long? SizeBytes, string? Image, string? Disk, int? BlockSize, bool? ReadOnly);
public sealed record UpdateLunRequest(long? SizeBytes);
public sealed record FilterDto(int Position, string Name, string? Type, string OnFault, bool Quarantined, long Upcalls, long Faults,
    IReadOnlyDictionary<string, long> Verdicts, IReadOnlyDictionary<string, long> Syscalls, IReadOnlyDictionary<string, long> Counters,
    ISCSISnap.Storage.Filters.Configuration.FilterSpec? Spec);

/// <summary>A filter to add: its spec and where (0 = top of the stack; absent = bottom).</summary>
public sealed class AddFilterRequest : ISCSISnap.Storage.Filters.Configuration.FilterSpec
{
    public int? Position { get; set; }
}

public sealed record TraceRecordDto(DateTimeOffset At, string Initiator, string Operation, long Offset, int Length, double? LatencyMicroseconds, string Verdicts);
public sealed record AclDto(List<string>? AllowedInitiators);
public sealed record ChapRequest(ChapCredentials? Chap, ChapCredentials? MutualChap);
public sealed record ChapDto(ChapUserDto? Chap, ChapUserDto? MutualChap);

/// <summary>
/// The management REST API (/api/v1): targets, LUNs, ACLs, CHAP and sessions. JSON in and out; every error is
/// application/problem+json naming the field at fault.
/// </summary>
public static class ManagementApi
{
    public static void Map(WebApplication app)
    {
        var api = app.MapGroup("/api/v1");

        api.MapGet("/targets", (TargetService targets, IscsiPortal portal) =>
            Results.Ok(targets.Targets.Select(t => ToDto(t, targets, portal))));

        api.MapPost("/targets", async (HttpRequest request, TargetService targets, IscsiPortal portal) =>
        {
            var body = await ReadBodyAsync<CreateTargetRequest>(request);
            if (string.IsNullOrWhiteSpace(body.Name)) throw ApplianceError.Invalid("name", "name is required");
            var target = await targets.CreateTargetAsync(body.Name, body.Alias);
            try
            {
                if (body.AllowedInitiators is not null || body.Chap is not null || body.MutualChap is not null)
                    await targets.SetAccessAsync(target.Name, body.AllowedInitiators, body.Chap, body.MutualChap,
                        updateAcl: body.AllowedInitiators is not null, updateChap: body.Chap is not null || body.MutualChap is not null);
            }
            catch (ApplianceError)
            {
                await targets.DeleteTargetAsync(target.Name);   // all or nothing
                throw;
            }
            return Results.Created($"/api/v1/targets/{Uri.EscapeDataString(target.Name)}", ToDto(target, targets, portal));
        });

        api.MapGet("/targets/{iqn}", (string iqn, TargetService targets, IscsiPortal portal) =>
            Results.Ok(ToDto(targets.GetTarget(iqn), targets, portal)));

        api.MapDelete("/targets/{iqn}", async (string iqn, TargetService targets) =>
        {
            await targets.DeleteTargetAsync(iqn);
            return Results.NoContent();
        });

        api.MapGet("/targets/{iqn}/luns", (string iqn, TargetService targets) =>
        {
            var target = targets.GetTarget(iqn);
            return Results.Ok(target.Luns.Select(l => ToDto(l.Key, l.Value, targets.LunRecordOf(target, l.Key))));
        });

        api.MapPost("/targets/{iqn}/luns", async (string iqn, HttpRequest request, TargetService targets) =>
        {
            var body = await ReadBodyAsync<CreateLunRequest>(request);
            if (body.Lun is not { } lun) throw ApplianceError.Invalid("lun", "lun is required (0-16383)");
            var (unit, record) = await targets.AddLunAsync(iqn, lun, body.SizeBytes, body.Image, body.Disk, body.BlockSize ?? 512, body.ReadOnly ?? false);
            var target = targets.GetTarget(iqn);
            return Results.Created($"/api/v1/targets/{Uri.EscapeDataString(target.Name)}/luns/{lun}", ToDto((ulong)lun, unit, record));
        });

        api.MapGet("/targets/{iqn}/luns/{lun:int}", (string iqn, int lun, TargetService targets) =>
        {
            var target = targets.GetTarget(iqn);
            var unit = target.GetLun((ulong)lun) ?? throw ApplianceError.NotFound($"no LUN {lun} on {target.Name}");
            return Results.Ok(ToDto((ulong)lun, unit, targets.LunRecordOf(target, (ulong)lun)));
        });

        api.MapMethods("/targets/{iqn}/luns/{lun:int}", ["PATCH"], async (string iqn, int lun, HttpRequest request, TargetService targets) =>
        {
            var body = await ReadBodyAsync<UpdateLunRequest>(request);
            if (body.SizeBytes is not { } size) throw ApplianceError.Invalid("sizeBytes", "sizeBytes is required");
            await targets.GrowLunAsync(iqn, lun, size);
            var target = targets.GetTarget(iqn);
            return Results.Ok(ToDto((ulong)lun, target.GetLun((ulong)lun)!, targets.LunRecordOf(target, (ulong)lun)));
        });

        api.MapGet("/targets/{iqn}/luns/{lun:int}/filters", (string iqn, int lun, TargetService targets) =>
        {
            var (slots, specs) = targets.FiltersOf(iqn, lun);
            return Results.Ok(slots.Select((slot, i) => ToDto(slot, i, specs)));
        });

        api.MapPost("/targets/{iqn}/luns/{lun:int}/filters", async (string iqn, int lun, HttpRequest request, TargetService targets) =>
        {
            var body = await ReadBodyAsync<AddFilterRequest>(request);
            var slot = await targets.AddFilterAsync(iqn, lun, ToSpec(body), body.Position);
            var (slots, specs) = targets.FiltersOf(iqn, lun);
            var target = targets.GetTarget(iqn);
            return Results.Created($"/api/v1/targets/{Uri.EscapeDataString(target.Name)}/luns/{lun}/filters/{Uri.EscapeDataString(slot.Name)}",
                ToDto(slot, slots.ToList().IndexOf(slot), specs));
        });

        api.MapGet("/targets/{iqn}/luns/{lun:int}/filters/{name}", (string iqn, int lun, string name, TargetService targets) =>
        {
            var (slots, specs) = targets.FiltersOf(iqn, lun);
            int index = slots.ToList().FindIndex(s => s.Name == name);
            if (index < 0) throw ApplianceError.NotFound($"no filter {name} on LUN {lun} of {iqn}");
            return Results.Ok(ToDto(slots[index], index, specs));
        });

        api.MapMethods("/targets/{iqn}/luns/{lun:int}/filters/qos", ["PATCH"], async (string iqn, int lun, HttpRequest request, TargetService targets) =>
        {
            var body = await ReadBodyAsync<ISCSISnap.Storage.Filters.Configuration.FilterSpec>(request);
            if (body.Type is { Length: > 0 } && body.Type != "qos") throw ApplianceError.Invalid("type", "only a qos filter's caps can be changed in place");
            if (body.OnFault is not null || body.FailureStatus is not null || body.UpcallDeadlineMs is not null || body.MaxSyscallsPerUpcall is not null
                || body.MaxScratchBytes is not null || body.QuarantineAfterFaults is not null || body.SampleEvery is not null || body.Capacity is not null
                || body.Assembly is not null || body.TypeName is not null || body.Settings is not null || body.Name is not null)
                throw ApplianceError.Invalid("filter", "only iopsPerLun, bytesPerSecondPerLun, iopsPerInitiator and bytesPerSecondPerInitiator can be changed in place");
            var slot = await targets.SetQosLimitsAsync(iqn, lun, body);
            var (slots, specs) = targets.FiltersOf(iqn, lun);
            return Results.Ok(ToDto(slot, slots.ToList().IndexOf(slot), specs));
        });

        api.MapDelete("/targets/{iqn}/luns/{lun:int}/filters/{name}", async (string iqn, int lun, string name, TargetService targets) =>
        {
            await targets.RemoveFilterAsync(iqn, lun, name);
            return Results.NoContent();
        });

        api.MapPost("/targets/{iqn}/luns/{lun:int}/filters/{name}/release", (string iqn, int lun, string name, TargetService targets) =>
        {
            var (slots, specs) = targets.FiltersOf(iqn, lun);
            int index = slots.ToList().FindIndex(s => s.Name == name);
            if (index < 0) throw ApplianceError.NotFound($"no filter {name} on LUN {lun} of {iqn}");
            slots[index].Release();
            return Results.Ok(ToDto(slots[index], index, specs));
        });

        api.MapGet("/targets/{iqn}/luns/{lun:int}/trace", (string iqn, int lun, int? limit, TargetService targets) =>
        {
            if (limit is < 1 or > 1 << 20) throw ApplianceError.Invalid("limit", "limit must be 1-1048576");
            var (slots, _) = targets.FiltersOf(iqn, lun);
            var trace = slots.Select(s => s.Filter).OfType<ISCSISnap.Storage.Filters.BuiltIn.TraceFilter>().FirstOrDefault()
                ?? throw ApplianceError.NotFound($"LUN {lun} of {iqn} has no trace filter (add one: POST .../filters {{\"type\":\"trace\"}})");
            return Results.Ok(trace.Newest(limit ?? 256).Select(r =>
                new TraceRecordDto(r.At, r.Initiator, r.Operation.ToString().ToLowerInvariant(), r.Offset, r.Length, r.LatencyMicroseconds, r.Verdicts)));
        });

        api.MapDelete("/targets/{iqn}/luns/{lun:int}", async (string iqn, int lun, TargetService targets) =>
        {
            await targets.DeleteLunAsync(iqn, lun);
            return Results.NoContent();
        });

        api.MapGet("/targets/{iqn}/acl", (string iqn, TargetService targets) =>
            Results.Ok(new AclDto(targets.GetTarget(iqn).Access.AllowedInitiators.ToList())));

        api.MapPut("/targets/{iqn}/acl", async (string iqn, HttpRequest request, TargetService targets) =>
        {
            var body = await ReadBodyAsync<AclDto>(request);
            if (body.AllowedInitiators is null) throw ApplianceError.Invalid("allowedInitiators", "allowedInitiators is required ([] allows every initiator)");
            await targets.SetAccessAsync(iqn, body.AllowedInitiators, null, null, updateAcl: true, updateChap: false);
            return Results.Ok(new AclDto(targets.GetTarget(iqn).Access.AllowedInitiators.ToList()));
        });

        api.MapGet("/targets/{iqn}/chap", (string iqn, TargetService targets) => Results.Ok(ChapOf(targets.GetTarget(iqn))));

        api.MapPut("/targets/{iqn}/chap", async (string iqn, HttpRequest request, TargetService targets) =>
        {
            var body = await ReadBodyAsync<ChapRequest>(request);
            if (body.Chap is null) throw ApplianceError.Invalid("chap", "chap {userName, secret} is required (DELETE turns CHAP off)");
            var target = targets.GetTarget(iqn);
            await targets.SetAccessAsync(iqn, target.Access.AllowedInitiators, body.Chap, body.MutualChap, updateAcl: false, updateChap: true);
            return Results.Ok(ChapOf(target));
        });

        api.MapDelete("/targets/{iqn}/chap", async (string iqn, TargetService targets) =>
        {
            var target = targets.GetTarget(iqn);
            await targets.SetAccessAsync(iqn, target.Access.AllowedInitiators, null, null, updateAcl: false, updateChap: true);
            return Results.NoContent();
        });

        api.MapGet("/sessions", (IscsiPortal portal) => Results.Ok(portal.GetSessions()));
    }

    private static FilterDto ToDto(ISCSISnap.Storage.Filters.FilterSlot slot, int position, IReadOnlyList<ISCSISnap.Storage.Filters.Configuration.FilterSpec> specs)
    {
        var spec = specs.FirstOrDefault(s => (s.Name ?? s.Type) == slot.Name);
        return new FilterDto(position, slot.Name, spec?.Type, slot.Options.OnFault.ToString().ToLowerInvariant(), slot.IsQuarantined, slot.Upcalls, slot.Faults,
            Enum.GetValues<ISCSISnap.Storage.Filters.VerdictKind>().ToDictionary(k => k.ToString().ToLowerInvariant(), slot.VerdictCount),
            slot.Syscalls, slot.Counters.ToDictionary(), spec);
    }

    /// <summary>The spec part of a request (stored without the request's position).</summary>
    private static ISCSISnap.Storage.Filters.Configuration.FilterSpec ToSpec(AddFilterRequest body) =>
        System.Text.Json.JsonSerializer.Deserialize<ISCSISnap.Storage.Filters.Configuration.FilterSpec>(
            System.Text.Json.JsonSerializer.Serialize<ISCSISnap.Storage.Filters.Configuration.FilterSpec>(body, ConfigurationLoader.Json), ConfigurationLoader.Json)!;

    private static ChapDto ChapOf(IscsiTarget target) => new(
        target.Access.Chap is { } chap ? new ChapUserDto(chap.UserName) : null,
        target.Access.MutualChap is { } mutual ? new ChapUserDto(mutual.UserName) : null);

    private static TargetDto ToDto(IscsiTarget target, TargetService targets, IscsiPortal portal) => new(
        target.Name,
        target.Alias,
        target.Access.AllowedInitiators.ToList(),
        target.Access.Chap is { } chap ? new ChapUserDto(chap.UserName) : null,
        target.Access.MutualChap is { } mutual ? new ChapUserDto(mutual.UserName) : null,
        target.Luns.Select(l => ToDto(l.Key, l.Value, targets.LunRecordOf(target, l.Key))).ToList(),
        portal.GetSessions().Count(s => string.Equals(s.TargetName, target.Name, StringComparison.OrdinalIgnoreCase)));

    private static LunDto ToDto(ulong lun, LogicalUnit unit, LunRecord? record) => new(
        (int)lun, unit.Device.Length, unit.BlockSize, record?.DiskId ?? Guid.Empty, record?.ImagePath is { Length: > 0 } image ? image : null, record?.Managed ?? false,
        unit.WriteProtected, unit.Identity.NaaHex, unit.Identity.Serial);

    /// <summary>Reads a JSON body; malformed JSON becomes a 400 naming the path at fault.</summary>
    internal static async Task<T> ReadBodyAsync<T>(HttpRequest request) where T : class
    {
        if (request.ContentType is null || !request.ContentType.StartsWith("application/json", StringComparison.OrdinalIgnoreCase))
            throw new ApplianceError(415, "Unsupported media type", "send the body as application/json");
        try
        {
            return await JsonSerializer.DeserializeAsync<T>(request.Body, ConfigurationLoader.Json, request.HttpContext.RequestAborted)
                ?? throw ApplianceError.Invalid("body", "the body is empty");
        }
        catch (JsonException e)
        {
            string field = e.Path is { Length: > 2 } path ? path.TrimStart('$', '.') : "body";
            string message = e.Message;
            int cut = message.IndexOf(" Path:", StringComparison.Ordinal);
            throw ApplianceError.Invalid(field, cut > 0 ? message[..cut] : message);
        }
    }
}
