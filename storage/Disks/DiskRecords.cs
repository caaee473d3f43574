using System.Text.Json.Serialization;

namespace ISCSISnap.Storage.Disks;

[JsonConverter(typeof(JsonStringEnumConverter<LayerFormat>))]
public enum LayerFormat
{
    Vhdx,
    Raw,
}

/// <summary>
/// One image of the layer tree. Its <see cref="Id"/> is the layer's stable disk ID (what caches key blocks by).
/// A layer with children is frozen and never written again; the head of a disk is the only writable layer.
/// </summary>
public sealed class LayerRecord
{
    public Guid Id { get; set; }
    /// <summary>Absolute path of the image.</summary>
    public string Path { get; set; } = "";
    public LayerFormat Format { get; set; }
    /// <summary>Logical sector size (a raw image does not record its own).</summary>
    public int SectorSize { get; set; } = 512;
    public Guid? ParentId { get; set; }
    /// <summary>An imported file: read, never written, never deleted by the appliance.</summary>
    public bool External { get; set; }
    /// <summary>The disk whose head this layer was (its snapshots are listed under that disk).</summary>
    public Guid OriginDiskId { get; set; }
    /// <summary>Set once the layer is frozen as a snapshot (null for a head).</summary>
    public string? SnapshotName { get; set; }
    public DateTimeOffset CreatedAt { get; set; }
    public DateTimeOffset? FrozenAt { get; set; }
}

/// <summary>A merge in progress: <see cref="SnapshotId"/>'s sectors are being copied into its only child <see cref="IntoId"/>.</summary>
public sealed class MergeRecord
{
    public Guid SnapshotId { get; set; }
    public Guid IntoId { get; set; }
    public DateTimeOffset StartedAt { get; set; }
}

/// <summary>A disk: a chain of layers from a base to its writable head.</summary>
public sealed class DiskRecord
{
    public Guid Id { get; set; }
    public string Name { get; set; } = "";
    public Guid HeadId { get; set; }
    public int SectorSize { get; set; } = 512;
    /// <summary>Virtual size of the head (kept here so listing disks opens no file).</summary>
    public long SizeBytes { get; set; }
    public DateTimeOffset CreatedAt { get; set; }
    public MergeRecord? Merge { get; set; }
}

/// <summary>The whole store as written to disks.json.</summary>
public sealed class DiskStoreDocument
{
    public int Version { get; set; } = 1;
    public List<DiskRecord> Disks { get; set; } = [];
    public List<LayerRecord> Layers { get; set; } = [];
}

[JsonSourceGenerationOptions(WriteIndented = true, PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
[JsonSerializable(typeof(DiskStoreDocument))]
internal sealed partial class DiskStoreJson : JsonSerializerContext;
