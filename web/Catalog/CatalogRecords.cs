namespace ISCSISnap.Web.Catalog;

/// <summary>A target as stored in the catalog. CHAP secrets are kept because CHAP needs them in clear; they never leave through the API or logs.</summary>
public sealed class TargetRecord
{
    /// <summary>Lower-case target name (iSCSI names compare case-insensitively).</summary>
    public string Id { get; set; } = "";
    public string Name { get; set; } = "";
    public string? Alias { get; set; }
    public List<string> AllowedInitiators { get; set; } = [];
    public string? ChapUserName { get; set; }
    public string? ChapSecret { get; set; }
    public string? MutualChapUserName { get; set; }
    public string? MutualChapSecret { get; set; }
    public DateTime CreatedAt { get; set; }
}

/// <summary>A LUN: a target, a number and the disk (snapshot chain) it serves.</summary>
public sealed class LunRecord
{
    /// <summary>"{target id}|{lun}".</summary>
    public string Id { get; set; } = "";
    public string TargetId { get; set; } = "";
    public int Lun { get; set; }
    public Guid UnitId { get; set; }
    /// <summary>The disk served; empty only in catalogs written before disks existed (migrated at load).</summary>
    public Guid DiskId { get; set; }
    /// <summary>The file the LUN was made from when it was given by path (an imported base), else empty.</summary>
    public string ImagePath { get; set; } = "";
    /// <summary>True when the disk was made for this LUN (it is deleted with the LUN); false for an existing disk.</summary>
    public bool Managed { get; set; }
    public long SizeBytes { get; set; }
    public int BlockSize { get; set; } = 512;
    public bool ReadOnly { get; set; }
    public DateTime CreatedAt { get; set; }
    /// <summary>The LUN's filter stack, top first, as a JSON array of filter specs ("" = none).</summary>
    public string FiltersJson { get; set; } = "";

    public static string KeyOf(string targetId, int lun) => $"{targetId}|{lun}";
}

/// <summary>Persistent reservations of a unit whose initiators set APTPL.</summary>
public sealed class ReservationRecord
{
    public Guid Id { get; set; }
    public string StateJson { get; set; } = "";
}

public sealed class CatalogInfo
{
    public string Id { get; set; } = "catalog";
    public int Version { get; set; } = 1;
    public DateTime CreatedAt { get; set; }
}
