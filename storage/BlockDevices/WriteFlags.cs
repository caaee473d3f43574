namespace ISCSISnap.Storage.BlockDevices;

[Flags]
public enum WriteFlags : byte
{
    None = 0,
    /// <summary>Force unit access: the data is durable on the medium before the write completes.</summary>
    ForceUnitAccess = 1,
}
