namespace ISCSISnap.SharingPeer;

/// <summary>
/// What the owner asks the peer process to do. A command is <see cref="PeerProtocol.CommandBytes"/> bytes:
/// u8 command, 16-byte handle, u8 rights, i64 offset, i32 length (-1 at offset 0: the whole range), u8 argument
/// (a region index or fill byte).
/// The reply is u8 status, i32 value, i32 payload length, then the payload.
/// </summary>
public enum PeerCommand : byte
{
    /// <summary>Resolve through the checked API and send the bytes back. Status: the <c>SharingCheck</c>.</summary>
    Read = 1,
    /// <summary>Resolve through the checked API and fill with the argument byte. Status: the <c>SharingCheck</c>.</summary>
    Write = 2,
    /// <summary>Hostile: mmap region (argument) PROT_READ|PROT_WRITE, MAP_SHARED. Value: errno, 0 if the kernel allowed it.</summary>
    MapWritable = 3,
    /// <summary>Hostile: map region (argument) read-only, then mprotect it writable. Value: errno, 0 if allowed.</summary>
    ProtectWritable = 4,
    /// <summary>Hostile: pwrite one byte into region (argument) through its memfd. Value: errno, 0 if allowed.</summary>
    WriteDescriptor = 5,
    /// <summary>Hostile: ftruncate region (argument) to half its size. Value: errno, 0 if allowed.</summary>
    Shrink = 6,
    /// <summary>Hostile: ftruncate region (argument) to twice its size. Value: errno, 0 if allowed.</summary>
    Grow = 7,
    /// <summary>Hostile: punch a hole in region (argument) through its memfd. Value: errno, 0 if allowed.</summary>
    PunchHole = 8,
    /// <summary>Value: open descriptors; payload: i32 memfd mappings, i64 refusals counted by the peer's link.</summary>
    Stats = 9,
    /// <summary>Resolve for reading and copy the bytes into the peer's own buffer (the benchmark's "move"). Status: the check.</summary>
    CopyOut = 10,
    /// <summary>Receive <c>length</c> bytes on the socket into the peer's own buffer (the benchmark's socket move).</summary>
    ReceiveBytes = 11,
    /// <summary>Reply, then exit with code 0.</summary>
    Exit = 12,
    /// <summary>Hostile: reopen region (argument) through /proc/self/fd read-write and map that writable. Value: errno, 0 if allowed.</summary>
    ReopenWritable = 13,
    /// <summary>Hostile: add F_SEAL_WRITE to region (argument), which would stop the owner's writes. Value: errno, 0 if allowed.</summary>
    AddSeal = 14,
    /// <summary>Only reply: the cost of a round trip with no data, for the benchmarks.</summary>
    Ping = 15,
}

public static class PeerProtocol
{
    public const int CommandBytes = 31;
    public const int ReplyHeaderBytes = 9;
    /// <summary>Exit code of a peer that was refused the regions (or refused them).</summary>
    public const int RefusedExitCode = 3;
}
