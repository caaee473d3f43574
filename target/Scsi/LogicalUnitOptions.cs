namespace ISCSISnap.Target.Scsi;

/// <summary>Per-LU SCSI settings; fixed when the unit is created.</summary>
public sealed class LogicalUnitOptions
{
    /// <summary>Initial WCE bit of the caching mode page: true means SYNCHRONIZE CACHE/FUA give durability; false makes every write durable.</summary>
    public bool WriteCacheEnabled { get; init; } = true;
    /// <summary>Largest READ/WRITE transfer in bytes (VPD B0 MAXIMUM TRANSFER LENGTH).</summary>
    public int MaxTransferBytes { get; init; } = 32 << 20;
    /// <summary>MAXIMUM COMPARE AND WRITE LENGTH in blocks (1-255).</summary>
    public int MaxCompareAndWriteBlocks { get; init; } = 255;
    /// <summary>MAXIMUM WRITE SAME LENGTH in blocks.</summary>
    public uint MaxWriteSameBlocks { get; init; } = 0x10000;
    /// <summary>MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.</summary>
    public int MaxUnmapDescriptors { get; init; } = 256;
    /// <summary>MAXIMUM ATOMIC TRANSFER LENGTH in blocks (WRITE ATOMIC(16)).</summary>
    public int MaxAtomicTransferBlocks { get; init; } = 256;
    /// <summary>INQUIRY VERSION: 0x06 (SPC-4) by default.</summary>
    public byte InquiryVersion { get; init; } = 0x06;
    /// <summary>Reported as write-protected, whatever the device allows.</summary>
    public bool ReadOnly { get; init; }
    /// <summary>ALUA access state reported by REPORT TARGET PORT GROUPS: active/optimized unless set.</summary>
    public bool NonOptimized { get; init; }
}
