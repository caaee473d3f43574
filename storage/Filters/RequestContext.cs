namespace ISCSISnap.Storage.Filters;

public enum IoOperation : byte
{
    Read,
    Write,
}

/// <summary>When a filter is called for a request.</summary>
public enum FilterPhase : byte
{
    /// <summary>On the way down: before the layers below have seen the request.</summary>
    Before,
    /// <summary>On the way up, for a read whose filter asked to <see cref="VerdictKind.Transform"/> it: the data is in the buffer.</summary>
    AfterRead,
    /// <summary>After a write whose filter gave <see cref="VerdictKind.Transform"/> without replacing its data landed below (record-keeping, e.g. checksums).</summary>
    AfterWrite,
}

/// <summary>What a filter may do through its syscalls.</summary>
[Flags]
public enum FilterRights : byte
{
    None = 0,
    /// <summary>Read the request's own range from the device below and from chain layers.</summary>
    Read = 1,
    /// <summary>Write the request's own range to the device below.</summary>
    Write = 2,
    /// <summary>Use the snapshot cache.</summary>
    Cache = 4,
    All = Read | Write | Cache,
}

/// <summary>
/// The request as the kernel context sees it; an upcall's second stack starts from a copy of it. Offsets and
/// lengths are in bytes of the LUN; <see cref="Issued"/> is a <see cref="System.Diagnostics.Stopwatch"/> timestamp
/// of when the IO path took the request (0 when unknown); <see cref="Flags"/> are a write's (FUA), which writes a
/// filter makes below on the request's behalf carry too.
/// </summary>
public sealed record RequestContext(
    string Lun,
    string Initiator,
    string Nexus,
    IoOperation Operation,
    long Offset,
    int Length,
    DateTimeOffset Deadline,
    long Issued = 0,
    ISCSISnap.Storage.BlockDevices.WriteFlags Flags = ISCSISnap.Storage.BlockDevices.WriteFlags.None);
