namespace ISCSISnap.Storage.BlockDevices;

/// <summary>One run of blocks that share an allocation state, as GET LBA STATUS reports it.</summary>
/// <param name="Offset">Byte offset where the run starts.</param>
/// <param name="Length">Length of the run in bytes (at least one logical block).</param>
/// <param name="Mapped">True when backing storage holds the run; false when it is deallocated (reads zeros).</param>
public readonly record struct AllocationExtent(long Offset, long Length, bool Mapped);
