using ISCSISnap.Storage.BlockDevices;

namespace ISCSISnap.Storage.Filters;

public enum VerdictKind : byte
{
    /// <summary>Go on down the stack (the next filter, then the device).</summary>
    Pass,
    /// <summary>The filter answered the request itself (a read's buffer holds the data: a cache hit).</summary>
    Complete,
    /// <summary>The request fails with <see cref="FilterVerdict.Status"/> (turned into sense data by the SCSI layer).</summary>
    Fail,
    /// <summary>Run this filter again after <see cref="FilterVerdict.DeferMilliseconds"/> (throttling).</summary>
    Defer,
    /// <summary>
    /// Go on down the stack with the data the filter rewrote in place (a write encrypted, say); for reads the filter
    /// is called again once the data is in (<see cref="FilterPhase.AfterRead"/>) to transform or check it on its way
    /// up; for a write that kept its data, once the write is done (<see cref="FilterPhase.AfterWrite"/>).
    /// </summary>
    Transform,
}

/// <summary>What a filter decided for one request.</summary>
public readonly record struct FilterVerdict(VerdictKind Kind, IoStatus Status = IoStatus.Ok, int DeferMilliseconds = 0)
{
    public static FilterVerdict Pass => new(VerdictKind.Pass);
    public static FilterVerdict Complete => new(VerdictKind.Complete);
    public static FilterVerdict Transform => new(VerdictKind.Transform);
    public static FilterVerdict Fail(IoStatus status) =>
        status == IoStatus.Ok ? throw new ArgumentException("a failure needs a failing status", nameof(status)) : new(VerdictKind.Fail, status);
    public static FilterVerdict Defer(int milliseconds) =>
        milliseconds is < 1 or > 60_000 ? throw new ArgumentOutOfRangeException(nameof(milliseconds)) : new(VerdictKind.Defer, DeferMilliseconds: milliseconds);
}
