namespace ISCSISnap.Storage.Disks;

/// <summary>A disk as the API shows it.</summary>
public sealed record DiskInfo(
    Guid Id,
    string Name,
    long SizeBytes,
    int SectorSize,
    Guid HeadId,
    string HeadPath,
    IReadOnlyList<Guid> Chain,
    bool Attached,
    DateTimeOffset CreatedAt,
    MergeInfo? Merge);

public sealed record MergeInfo(Guid SnapshotId, Guid IntoId, DateTimeOffset StartedAt);

/// <summary>A frozen layer (a snapshot, or an imported image) as the API shows it.</summary>
public sealed record SnapshotInfo(
    Guid Id,
    string Name,
    Guid? ParentId,
    Guid OriginDiskId,
    string Path,
    LayerFormat Format,
    bool External,
    DateTimeOffset CreatedAt,
    DateTimeOffset? FrozenAt,
    IReadOnlyList<Guid> Children,
    IReadOnlyList<Guid> DisksOnTop,
    bool InChain);
