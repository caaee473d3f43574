using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Files;
using ISCSISnap.Storage.Vhdx;

namespace ISCSISnap.Storage.Disks;

/// <summary>An image found while importing: where, what, and what a child must link to.</summary>
internal sealed record FoundLayer(string Path, LayerFormat Format, Guid DataWriteGuid, long VirtualSize, int SectorSize);

/// <summary>Opening, creating and linking the image files of layers (VHDX or raw).</summary>
internal static class LayerFiles
{
    /// <summary>Default block sizes: Hyper-V's (32 MiB for a dynamic disk, 2 MiB for a differencing one).</summary>
    public const int DynamicBlockSize = 32 << 20, DifferencingBlockSize = 2 << 20;

    public static IWritableLayer CreateDynamic(string path, Guid id, long size, int sectorSize, int? blockSize) =>
        VhdxFile.Create(path, new VhdxCreateOptions
        {
            VirtualSize = size, LogicalSectorSize = sectorSize, BlockSize = blockSize ?? DynamicBlockSize, DiskId = id,
        });

    /// <summary>A new differencing head over the image at <paramref name="parentPath"/>, linked to <paramref name="parentLinkage"/>.</summary>
    public static IWritableLayer CreateChild(string path, Guid id, string parentPath, Guid parentLinkage, long size, int sectorSize, int? blockSize) =>
        VhdxFile.Create(path, new VhdxCreateOptions
        {
            VirtualSize = size, LogicalSectorSize = sectorSize, BlockSize = blockSize ?? DifferencingBlockSize, DiskId = id,
            Parent = VhdxParent.For(path, parentPath, parentLinkage),
        });

    public static IChainLayer Open(LayerRecord record, bool writable) => record.Format switch
    {
        LayerFormat.Raw when writable => throw new StorageException(record.Path, "a raw image is only a chain base; it is never written"),
        LayerFormat.Raw => RawLayer.Open(record.Path, record.Id, record.SectorSize),
        _ => VhdxFile.Open(record.Path, record.Id, writable),
    };

    /// <summary>A frozen layer opened to take a merge's copies: writable, but keeping its DataWriteGuid.</summary>
    public static IWritableLayer OpenForMerge(LayerRecord record) =>
        record.Format == LayerFormat.Vhdx
            ? VhdxFile.Open(record.Path, record.Id, writable: true, preserveDataWriteGuid: true)
            : throw new StorageException(record.Path, "a raw image cannot take a merge");

    public static (Guid DataWriteGuid, long VirtualSize, int SectorSize) Describe(LayerRecord record)
    {
        using var layer = Open(record, writable: false);
        return (record.Format == LayerFormat.Raw ? record.Id : layer.DataWriteGuid, layer.VirtualSize, layer.LogicalSectorSize);
    }

    /// <summary>What a child of <paramref name="parent"/> must carry as parent_linkage.</summary>
    public static Guid LinkageOf(LayerRecord parentRecord, IChainLayer parent) =>
        parentRecord.Format == LayerFormat.Raw ? parentRecord.Id : parent.DataWriteGuid;

    /// <summary>
    /// Checks that <paramref name="layer"/> is linked to <paramref name="parent"/> (or, during a merge that already
    /// relinked it, to <paramref name="mergedInto"/>): a differencing file exactly when the records give it a parent,
    /// and a parent_linkage equal to the parent's DataWriteGuid. Returns whether the file's parent paths are stale.
    /// </summary>
    public static bool CheckLinkage(IChainLayer layer, LayerRecord record, IChainLayer? parent, LayerRecord? parentRecord,
        IChainLayer? mergedInto, LayerRecord? mergedIntoRecord, bool detachedByMerge = false)
    {
        if (layer is not VhdxFile vhdx)
        {
            if (parent is not null) throw new StorageException(record.Path, "a raw image cannot have a parent");
            return false;
        }
        if (!vhdx.IsDifferencing)
        {
            // A merge of the chain's base that got past detaching its child: the child stands alone already.
            if (parent is not null && !detachedByMerge) throw new StorageException(record.Path, $"is not a differencing VHDX, but its parent should be {parentRecord!.Path}");
            return false;
        }
        if (parent is null) throw new StorageException(record.Path, "is a differencing VHDX whose parent is not known");
        var linkage = LocatorValue(vhdx, "parent_linkage");
        var linkage2 = LocatorValue(vhdx, "parent_linkage2");
        Guid expected = LinkageOf(parentRecord!, parent);
        bool Links(Guid guid) => SameGuid(linkage, guid) || SameGuid(linkage2, guid);
        if (Links(expected)) return !PointsAt(vhdx, record.Path, parentRecord!.Path);
        if (mergedInto is not null && Links(LinkageOf(mergedIntoRecord!, mergedInto))) return false;
        throw new StorageException(record.Path,
            $"parent_linkage {linkage ?? "(none)"} does not match the DataWriteGuid {expected:B} of its parent {parentRecord!.Path}: the parent changed after this child was made");
    }

    /// <summary>Whether <paramref name="child"/> names <paramref name="linkage"/> as its parent_linkage.</summary>
    public static bool LinksTo(IChainLayer child, Guid linkage) =>
        child is VhdxFile vhdx && (SameGuid(LocatorValue(vhdx, "parent_linkage"), linkage) || SameGuid(LocatorValue(vhdx, "parent_linkage2"), linkage));

    private static string? LocatorValue(VhdxFile vhdx, string key)
    {
        foreach (var (k, v) in vhdx.ParentLocator) if (string.Equals(k, key, StringComparison.OrdinalIgnoreCase)) return v;
        return null;
    }

    private static bool SameGuid(string? text, Guid guid) => text is not null && Guid.TryParse(text, out var parsed) && parsed == guid;

    /// <summary>Whether the child's relative_path resolves to <paramref name="parentPath"/>.</summary>
    private static bool PointsAt(VhdxFile vhdx, string childPath, string parentPath)
    {
        var relative = LocatorValue(vhdx, "relative_path");
        if (relative is null) return false;
        string resolved = Path.GetFullPath(Path.Combine(Path.GetDirectoryName(childPath)!, relative.Replace('\\', '/')));
        return string.Equals(resolved, Path.GetFullPath(parentPath), StringComparison.Ordinal);
    }

    /// <summary>Rewrites a closed file's parent locator so its paths name <paramref name="parentPath"/> (the data is untouched).</summary>
    public static void RewriteParentPaths(string childPath, string parentPath, Guid linkage) =>
        VhdxFile.RewriteParentLocator(childPath, VhdxParent.For(childPath, parentPath, linkage).ToLocatorEntries());

    /// <summary>Points an open layer at a new parent (the end of a merge).</summary>
    public static void Relink(IWritableLayer child, LayerRecord parentRecord, IChainLayer parent)
    {
        if (child is not VhdxFile vhdx) throw new StorageException(child.Path, "only a VHDX layer can be relinked");
        vhdx.SetParentLocator(VhdxParent.For(child.Path, parentRecord.Path, LinkageOf(parentRecord, parent)).ToLocatorEntries());
    }

    /// <summary>Whether the file starts with the VHDX file identifier.</summary>
    public static bool IsVhdx(string path)
    {
        using var file = ImageFile.Open(path, readOnly: true);
        Span<byte> signature = stackalloc byte[8];
        return file.Length >= 8 && file.ReadExact(0, signature) == IoStatus.Ok && signature.SequenceEqual("vhdxfile"u8);
    }

    /// <summary>
    /// The chain that ends at <paramref name="path"/>, newest first: each differencing file's parent is found through
    /// its locator (relative_path, then absolute_win32_path and volume_path by file name beside the child) and must
    /// carry the DataWriteGuid the child links to. Loops, missing parents and mismatched linkage are refused naming the file.
    /// </summary>
    public static List<FoundLayer> DiscoverChain(string path, int rawSectorSize)
    {
        var found = new List<FoundLayer>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        Guid? expectedLinkage = null;
        string? childPath = null;
        for (string? current = path; current is not null;)
        {
            if (!seen.Add(current))
                throw new StorageException(childPath ?? path, $"its parent chain loops back to {current}");
            if (found.Count >= 1024) throw new StorageException(path, "the parent chain is deeper than 1024 layers");
            if (!IsVhdx(current))
            {
                if (expectedLinkage is not null)
                    throw new StorageException(childPath!, $"its parent {current} is not a VHDX (a raw base is only usable as the appliance's own chain base)");
                using var raw = RawLayer.Open(current, Guid.Empty, rawSectorSize);
                found.Add(new FoundLayer(current, LayerFormat.Raw, Guid.Empty, raw.VirtualSize, rawSectorSize));
                break;
            }
            using var vhdx = VhdxFile.Open(current, Guid.Empty, writable: false);
            if (expectedLinkage is { } linkage && vhdx.DataWriteGuid != linkage)
                throw new StorageException(childPath!,
                    $"parent_linkage {linkage:B} does not match the DataWriteGuid {vhdx.DataWriteGuid:B} of its parent {current}: the parent changed after this child was made");
            if (found.Count > 0 && vhdx.LogicalSectorSize != found[0].SectorSize)
                throw new StorageException(current, $"its {vhdx.LogicalSectorSize}-byte sectors differ from its child's {found[0].SectorSize}-byte sectors");
            found.Add(new FoundLayer(current, LayerFormat.Vhdx, vhdx.DataWriteGuid, vhdx.VirtualSize, vhdx.LogicalSectorSize));
            if (!vhdx.IsDifferencing) break;
            var linkageText = LocatorValue(vhdx, "parent_linkage");
            if (linkageText is null || !Guid.TryParse(linkageText, out var parsed))
                throw new StorageException(current, "its parent locator has no valid parent_linkage");
            expectedLinkage = parsed;
            childPath = current;
            current = ResolveParent(vhdx, current);
        }
        return found;
    }

    private static string ResolveParent(VhdxFile vhdx, string childPath)
    {
        string directory = Path.GetDirectoryName(childPath)!;
        var tried = new List<string>();
        if (LocatorValue(vhdx, "relative_path") is { } relative)
        {
            string candidate = Path.GetFullPath(Path.Combine(directory, relative.Replace('\\', '/')));
            if (File.Exists(candidate)) return candidate;
            tried.Add(candidate);
        }
        foreach (var key in new[] { "absolute_win32_path", "volume_path" })
        {
            if (LocatorValue(vhdx, key) is not { } windowsPath) continue;
            // A Windows path cannot be opened here; a Hyper-V chain copied over keeps its files side by side.
            string name = windowsPath.Replace('\\', '/').Split('/').Last();
            if (name.Length == 0) continue;
            string candidate = Path.Combine(directory, name);
            if (File.Exists(candidate)) return candidate;
            tried.Add($"{candidate} (from {key} {windowsPath})");
        }
        throw new StorageException(childPath, tried.Count == 0
            ? "its parent locator names no path"
            : $"its parent is missing: tried {string.Join(", ", tried)}");
    }
}
