using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Files;

namespace ISCSISnap.Storage.Chains;

/// <summary>
/// A raw image as the base of a chain: every sector up to the file's length is present. It is only read.
/// Threading: thread-safe.
/// </summary>
public sealed class RawLayer : IChainLayer
{
    private readonly ImageFile _file;

    private RawLayer(ImageFile file, Guid diskId, long length, int sectorSize)
    {
        _file = file;
        DiskId = diskId;
        VirtualSize = length;
        LogicalSectorSize = sectorSize;
        DataWriteGuid = diskId;
    }

    public static RawLayer Open(string path, Guid diskId, int sectorSize)
    {
        var file = ImageFile.Open(path, readOnly: true);
        long length = file.Length;
        if (length <= 0 || length % sectorSize != 0)
        {
            file.Dispose();
            throw new StorageException(path, $"a raw image must be a non-empty multiple of {sectorSize} bytes (it is {length})");
        }
        return new RawLayer(file, diskId, length, sectorSize);
    }

    public Guid DiskId { get; }
    public string Path => _file.Path;
    public long VirtualSize { get; }
    public int LogicalSectorSize { get; }
    public bool IsWritable => false;
    public Guid DataWriteGuid { get; }

    public void Enumerate(long sector, long count, Action<long, long, SectorState> visit)
    {
        long sectors = VirtualSize / LogicalSectorSize;
        long present = Math.Clamp(sectors - sector, 0, count);
        if (present > 0) visit(sector, present, SectorState.Data);
        if (count > present) visit(sector + present, count - present, SectorState.Absent);
    }

    public ValueTask<IoStatus> ReadAsync(long offset, Memory<byte> destination) => _file.ReadAsync(offset, destination);

    public void Dispose() => _file.Dispose();
}
