using System.Buffers.Binary;

namespace ISCSISnap.Storage.Sharing;

/// <summary>What a handle lets its peer do with the memory it names.</summary>
[Flags]
public enum HandleRights : byte
{
    None = 0,
    Read = 1,
    Write = 2,
    ReadWrite = Read | Write,
}

/// <summary>
/// A grant of one range of one shared region to one peer, as it travels in messages: 16 bytes that name a slot of
/// the owner's handle table, the generation the slot had when it was granted, and the peer it was granted to. The
/// range, rights, expiry and one-shot flag live in the table, where only the owner can change them, so a forged or
/// stale handle is refused by the checked API rather than trusted.
/// </summary>
public readonly record struct SharedHandle(ulong Generation, uint Slot, uint Peer)
{
    /// <summary>Bytes a handle occupies in a message.</summary>
    public const int Size = 16;

    public void WriteTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(destination, Generation);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[8..], Slot);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[12..], Peer);
    }

    public static SharedHandle ReadFrom(ReadOnlySpan<byte> source) => new(
        BinaryPrimitives.ReadUInt64LittleEndian(source),
        BinaryPrimitives.ReadUInt32LittleEndian(source[8..]),
        BinaryPrimitives.ReadUInt32LittleEndian(source[12..]));

    public override string ToString() => $"handle {Slot}:{Generation} of peer {Peer}";
}
