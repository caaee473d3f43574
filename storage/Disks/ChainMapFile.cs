using System.Buffers.Binary;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Integrity;

namespace ISCSISnap.Storage.Disks;

/// <summary>
/// The chain map file beside a disk's images: the owner map of its frozen layers, stamped with the disk ID and
/// DataWriteGuid of every layer it was built from. A file whose stamp differs from the layers being opened is
/// stale and ignored (the map is rebuilt from the images). The head is never in the file: its own VHDX metadata
/// (crash-safe through the VHDX log) is overlaid at open and the in-memory map follows its writes.
/// Layout: "ISNPCMF1", layer count (int32), per layer disk ID and DataWriteGuid (16 + 16 bytes), the serialised
/// map (<see cref="ChainMap.Serialize"/>), CRC-32C of everything before it.
/// </summary>
internal static class ChainMapFile
{
    private static ReadOnlySpan<byte> Magic => "ISNPCMF1"u8;
    private const int MaxFileBytes = 1 << 30;

    /// <summary>The map stored for exactly <paramref name="frozenLayers"/> (bottom to top); null when missing, damaged or stale.</summary>
    public static ChainMap? TryLoad(string path, IReadOnlyList<IChainLayer> frozenLayers, long virtualSize, int sectorSize)
    {
        byte[] bytes;
        try
        {
            var info = new FileInfo(path);
            if (!info.Exists || info.Length < 16 || info.Length > MaxFileBytes) return null;
            bytes = File.ReadAllBytes(path);
        }
        catch (IOException)
        {
            return null;
        }
        var span = bytes.AsSpan();
        if (!span.StartsWith(Magic)) return null;
        if (BinaryPrimitives.ReadUInt32LittleEndian(span[^4..]) != Crc32C.Compute(span[..^4])) return null;
        int count = BinaryPrimitives.ReadInt32LittleEndian(span[8..]);
        if (count != frozenLayers.Count) return null;
        int offset = 12;
        if (span.Length < offset + count * 32L + 4) return null;
        for (int i = 0; i < count; i++, offset += 32)
        {
            if (new Guid(span.Slice(offset, 16)) != frozenLayers[i].DiskId) return null;
            if (new Guid(span.Slice(offset + 16, 16)) != frozenLayers[i].DataWriteGuid) return null;
        }
        return ChainMap.Deserialize(span[offset..^4], virtualSize, sectorSize, (ushort)count);
    }

    public static void Save(string path, IReadOnlyList<IChainLayer> frozenLayers, ChainMap map) => Save(path, frozenLayers, map.Serialize());

    /// <summary>Writes the file atomically (temporary file, fsync, rename, directory fsync).</summary>
    public static void Save(string path, IReadOnlyList<IChainLayer> frozenLayers, byte[] mapBytes)
    {
        var bytes = new byte[12 + frozenLayers.Count * 32 + mapBytes.Length + 4];
        Magic.CopyTo(bytes);
        BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(8), frozenLayers.Count);
        int offset = 12;
        foreach (var layer in frozenLayers)
        {
            layer.DiskId.TryWriteBytes(bytes.AsSpan(offset, 16));
            layer.DataWriteGuid.TryWriteBytes(bytes.AsSpan(offset + 16, 16));
            offset += 32;
        }
        mapBytes.CopyTo(bytes.AsSpan(offset));
        BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan(bytes.Length - 4), Crc32C.Compute(bytes.AsSpan(0, bytes.Length - 4)));

        string temporary = path + ".tmp";
        using (var stream = new FileStream(temporary, FileMode.Create, FileAccess.Write, FileShare.None))
        {
            stream.Write(bytes);
            stream.Flush(flushToDisk: true);
        }
        File.Move(temporary, path, overwrite: true);
        Native.LinuxFile.SyncDirectory(Path.GetDirectoryName(path)!);
    }
}
