using System.Text.Json;
using ISCSISnap.Storage.BlockDevices;

namespace ISCSISnap.Storage.Disks;

/// <summary>
/// disks.json: the disks and the layer tree, replaced atomically (temporary file, fsync, rename, directory fsync),
/// so a crash leaves either the old or the new document, never a torn one.
/// </summary>
internal static class DiskStoreFile
{
    public const string FileName = "disks.json";

    public static DiskStoreDocument Load(string directory)
    {
        string path = Path.Combine(directory, FileName);
        if (!File.Exists(path)) return new DiskStoreDocument();
        DiskStoreDocument? document;
        try
        {
            document = JsonSerializer.Deserialize(File.ReadAllBytes(path), DiskStoreJson.Default.DiskStoreDocument);
        }
        catch (JsonException e)
        {
            throw new StorageException(path, $"not a valid disk store ({e.Message})", e);
        }
        if (document is null) throw new StorageException(path, "the disk store is empty");
        Validate(path, document);
        return document;
    }

    /// <summary>Structural checks: unique IDs, existing parents and heads, no parent loops.</summary>
    public static void Validate(string path, DiskStoreDocument document)
    {
        if (document.Version != 1) throw new StorageException(path, $"disk store version {document.Version} is not supported (this appliance reads version 1)");
        var layers = new Dictionary<Guid, LayerRecord>();
        foreach (var layer in document.Layers)
        {
            if (layer is null || layer.Id == Guid.Empty) throw new StorageException(path, "a layer has no ID");
            if (!layers.TryAdd(layer.Id, layer)) throw new StorageException(path, $"layer {layer.Id} is listed twice");
            if (string.IsNullOrEmpty(layer.Path) || !System.IO.Path.IsPathFullyQualified(layer.Path))
                throw new StorageException(path, $"layer {layer.Id} has no absolute path");
        }
        foreach (var layer in document.Layers)
        {
            if (layer.ParentId is { } parent && !layers.ContainsKey(parent))
                throw new StorageException(path, $"layer {layer.Id} names a parent {parent} that is not in the store");
            // Walk up: a loop would make every read of the chain spin.
            var seen = new HashSet<Guid>();
            for (var current = layer; current is not null; current = current.ParentId is { } p ? layers[p] : null)
                if (!seen.Add(current.Id)) throw new StorageException(path, $"the parents of layer {layer.Id} form a loop");
        }
        var disks = new HashSet<Guid>();
        var heads = new HashSet<Guid>();
        foreach (var disk in document.Disks)
        {
            if (disk is null || disk.Id == Guid.Empty) throw new StorageException(path, "a disk has no ID");
            if (!disks.Add(disk.Id)) throw new StorageException(path, $"disk {disk.Id} is listed twice");
            if (!layers.ContainsKey(disk.HeadId)) throw new StorageException(path, $"disk {disk.Id} ({disk.Name}) has a head {disk.HeadId} that is not in the store");
            if (!heads.Add(disk.HeadId)) throw new StorageException(path, $"layer {disk.HeadId} is the head of two disks");
            if (disk.SectorSize is not (512 or 4096)) throw new StorageException(path, $"disk {disk.Id} has sector size {disk.SectorSize}");
        }
    }

    public static void Save(string directory, DiskStoreDocument document)
    {
        string path = Path.Combine(directory, FileName);
        string temporary = path + ".tmp";
        byte[] bytes = JsonSerializer.SerializeToUtf8Bytes(document, DiskStoreJson.Default.DiskStoreDocument);
        using (var stream = new FileStream(temporary, FileMode.Create, FileAccess.Write, FileShare.None))
        {
            stream.Write(bytes);
            stream.Flush(flushToDisk: true);
        }
        File.Move(temporary, path, overwrite: true);
        Native.LinuxFile.SyncDirectory(directory);
    }
}
