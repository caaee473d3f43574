namespace ISCSISnap.Storage.Disks;

public enum DiskFault
{
    /// <summary>The request itself is wrong (a bad size, a name in use, a path that cannot be used).</summary>
    Invalid,
    /// <summary>The disk or snapshot named does not exist.</summary>
    NotFound,
    /// <summary>The request is valid but the disk's state forbids it now (in use, merging, has dependants).</summary>
    Conflict,
}

/// <summary>A disk operation refused; <see cref="Field"/> names the request field at fault when there is one.</summary>
public sealed class DiskException(DiskFault fault, string message, string? field = null) : Exception(message)
{
    public DiskFault Fault { get; } = fault;
    public string? Field { get; } = field;

    public static DiskException Invalid(string field, string message) => new(DiskFault.Invalid, message, field);
    public static DiskException NotFound(string message) => new(DiskFault.NotFound, message);
    public static DiskException Conflict(string message, string? field = null) => new(DiskFault.Conflict, message, field);
}
