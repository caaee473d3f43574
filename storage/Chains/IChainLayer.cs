using ISCSISnap.Storage.BlockDevices;

namespace ISCSISnap.Storage.Chains;

/// <summary>What a layer says about a run of sectors.</summary>
public enum SectorState : byte
{
    /// <summary>Not in this layer: the layers below decide.</summary>
    Absent,
    /// <summary>This layer's file holds the data.</summary>
    Data,
    /// <summary>Reads as zeros and hides the layers below (an unmapped or zeroed block).</summary>
    Zero,
}

/// <summary>
/// One image of a snapshot chain: a raw base or a VHDX (dynamic or differencing). Layers below the head are
/// never written. Threading: reads are thread-safe.
/// </summary>
public interface IChainLayer : IDisposable
{
    /// <summary>Stable identity of this layer's contents: the key a cache uses for its blocks.</summary>
    Guid DiskId { get; }
    string Path { get; }
    long VirtualSize { get; }
    int LogicalSectorSize { get; }
    bool IsWritable { get; }
    /// <summary>Changes whenever the layer's data changes (VHDX DataWriteGuid); parents are validated against it.</summary>
    Guid DataWriteGuid { get; }

    /// <summary>Reports, in order, the runs of [sector, sector+count) with their state.</summary>
    void Enumerate(long sector, long count, Action<long, long, SectorState> visit);

    /// <summary>
    /// Reads [offset, offset+destination.Length), which the caller knows to be Data or Zero in this layer
    /// (the chain map says so); zero-state parts read as zeros.
    /// </summary>
    ValueTask<IoStatus> ReadAsync(long offset, Memory<byte> destination);
}
