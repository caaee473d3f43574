namespace ISCSISnap.Storage.BlockDevices;

/// <summary>
/// Outcome of a block-device operation. The storage boundary reports faults as codes, not exceptions;
/// the SCSI layer turns each code into sense data.
/// </summary>
public enum IoStatus : byte
{
    Ok = 0,
    /// <summary>The range lies (partly) outside the device.</summary>
    OutOfRange,
    /// <summary>An offset or length is not a multiple of the logical block size.</summary>
    Misaligned,
    /// <summary>The medium could not be read (EIO and friends).</summary>
    ReadError,
    /// <summary>The medium could not be written.</summary>
    WriteError,
    /// <summary>No space left to allocate backing storage for a thin device.</summary>
    NoSpace,
    /// <summary>The device is read-only.</summary>
    WriteProtected,
    /// <summary>The device is closed or being torn down.</summary>
    NotReady,
}
