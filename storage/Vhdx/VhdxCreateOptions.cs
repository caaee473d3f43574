namespace ISCSISnap.Storage.Vhdx;

/// <summary>What <see cref="VhdxFile.Create"/> makes. Validated by Create; a bad value is a <see cref="BlockDevices.StorageException"/>.</summary>
public sealed record VhdxCreateOptions
{
    /// <summary>Bytes; a multiple of <see cref="LogicalSectorSize"/>, at most 64 TiB. A differencing file must match its parent.</summary>
    public required long VirtualSize { get; init; }

    /// <summary>Payload block size, a power of two from 1 to 256 MiB; null means 32 MiB (dynamic) or 2 MiB (differencing).</summary>
    public int? BlockSize { get; init; }

    /// <summary>512 (the only size QEMU 7.2 opens) or 4096. A differencing file must match its parent.</summary>
    public int LogicalSectorSize { get; init; } = 512;

    public int PhysicalSectorSize { get; init; } = 4096;

    /// <summary>The layer's identity in the chain (<see cref="Chains.IChainLayer.DiskId"/>); empty means a new GUID.</summary>
    public Guid DiskId { get; init; }

    /// <summary>
    /// The Virtual Disk ID metadata item (SCSI page 0x83 identity). Empty means a new GUID; a differencing file should
    /// carry its parent's (the spec copies this item on fork).
    /// </summary>
    public Guid Page83Id { get; init; }

    /// <summary>Makes a differencing file of this parent.</summary>
    public VhdxParent? Parent { get; init; }

    /// <summary>Log region size, a multiple of 1 MiB from 1 to 256 MiB. Bigger logs restart their ring (two header updates) less often.</summary>
    public int LogSize { get; init; } = 4 << 20;
}

/// <summary>The parent a differencing file names: its DataWriteGuid (parent_linkage) and where to find it.</summary>
public sealed record VhdxParent(Guid DataWriteGuid, string? RelativePath, string? AbsoluteWin32Path = null, string? VolumePath = null)
{
    /// <summary>
    /// A parent entry for <paramref name="parentPath"/> as seen from a child at <paramref name="childPath"/>: relative_path in
    /// the spec's form (backslashes, relative to the child's directory). No absolute_win32_path: a Linux path has none.
    /// </summary>
    public static VhdxParent For(string childPath, string parentPath, Guid parentDataWriteGuid)
    {
        string childDirectory = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(childPath))!;
        string relative = System.IO.Path.GetRelativePath(childDirectory, System.IO.Path.GetFullPath(parentPath));
        return new VhdxParent(parentDataWriteGuid, relative.Replace('/', '\\'));
    }

    /// <summary>The parent locator key/value pairs, in the order they are written.</summary>
    public IReadOnlyList<KeyValuePair<string, string>> ToLocatorEntries()
    {
        var entries = new List<KeyValuePair<string, string>>
        {
            new("parent_linkage", DataWriteGuid.ToString("B")),
        };
        if (RelativePath is not null) entries.Add(new("relative_path", RelativePath));
        if (VolumePath is not null) entries.Add(new("volume_path", VolumePath));
        if (AbsoluteWin32Path is not null) entries.Add(new("absolute_win32_path", AbsoluteWin32Path));
        return entries;
    }
}
