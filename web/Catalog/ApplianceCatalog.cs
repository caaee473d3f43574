using ISCSISnap.Target.Scsi;
using LiteDB;

namespace ISCSISnap.Web.Catalog;

/// <summary>
/// The appliance's durable catalog (LiteDB, one file in the data directory): targets, LUNs, ACLs, CHAP and
/// APTPL reservations. Threading: thread-safe (LiteDB serialises writers); every call is one transaction.
/// </summary>
public sealed class ApplianceCatalog : IPersistentReservationStore, IDisposable
{
    private readonly LiteDatabase _db;
    private readonly ILiteCollection<TargetRecord> _targets;
    private readonly ILiteCollection<LunRecord> _luns;
    private readonly ILiteCollection<ReservationRecord> _reservations;

    public ApplianceCatalog(string path)
    {
        Path = path;
        bool existed = File.Exists(path);
        var mapper = new BsonMapper();
        mapper.Entity<TargetRecord>().Id(t => t.Id);
        mapper.Entity<LunRecord>().Id(l => l.Id);
        mapper.Entity<ReservationRecord>().Id(r => r.Id);
        mapper.Entity<CatalogInfo>().Id(c => c.Id);
        try
        {
            _db = new LiteDatabase(new ConnectionString { Filename = path, Connection = ConnectionType.Direct }, mapper);
        }
        catch (Exception e) when (e is LiteException or IOException)
        {
            throw new InvalidOperationException($"{path}: cannot open the catalog: {e.Message}", e);
        }
        _targets = _db.GetCollection<TargetRecord>("targets");
        _luns = _db.GetCollection<LunRecord>("luns");
        _luns.EnsureIndex(l => l.TargetId);
        _reservations = _db.GetCollection<ReservationRecord>("reservations");
        var info = _db.GetCollection<CatalogInfo>("info");
        IsNew = !existed || info.FindById("catalog") is null;
        if (IsNew) info.Upsert(new CatalogInfo { CreatedAt = DateTime.UtcNow });
    }

    public string Path { get; }
    /// <summary>The catalog was created by this start (first start with an empty data directory).</summary>
    public bool IsNew { get; }

    public IReadOnlyList<TargetRecord> Targets() => _targets.FindAll().OrderBy(t => t.Name, StringComparer.Ordinal).ToList();
    public TargetRecord? FindTarget(string name) => _targets.FindById(name.ToLowerInvariant());
    public void SaveTarget(TargetRecord record) => _targets.Upsert(record);

    public IReadOnlyList<LunRecord> Luns(string targetId) => _luns.Find(l => l.TargetId == targetId).OrderBy(l => l.Lun).ToList();
    public IReadOnlyList<LunRecord> AllLuns() => _luns.FindAll().ToList();
    public void SaveLun(LunRecord record) => _luns.Upsert(record);
    public void DeleteLun(string id) => _luns.Delete(id);

    /// <summary>Removes a target and its LUN records in one transaction.</summary>
    public void DeleteTarget(string targetId)
    {
        _db.BeginTrans();
        try
        {
            _luns.DeleteMany(l => l.TargetId == targetId);
            _targets.Delete(targetId);
            _db.Commit();
        }
        catch
        {
            _db.Rollback();
            throw;
        }
    }

    public PersistedReservations? Load(Guid unitId)
    {
        var record = _reservations.FindById(unitId);
        return record is null ? null : System.Text.Json.JsonSerializer.Deserialize<PersistedReservations>(record.StateJson);
    }

    public void Save(Guid unitId, PersistedReservations? state)
    {
        if (state is null) _reservations.Delete(unitId);
        else _reservations.Upsert(new ReservationRecord { Id = unitId, StateJson = System.Text.Json.JsonSerializer.Serialize(state) });
        _db.Checkpoint();
    }

    public void Dispose() => _db.Dispose();
}
