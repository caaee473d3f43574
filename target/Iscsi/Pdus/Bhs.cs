using System.Buffers.Binary;
using System.Diagnostics.CodeAnalysis;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace ISCSISnap.Target.Iscsi.Pdus;

/// <summary>
/// A 48-byte Basic Header Segment held by value, with big-endian accessors at the RFC 7143 offsets.
/// Copying 48 bytes out of the receive buffer lets the pipe release its segment while the fields stay readable.
/// </summary>
[InlineArray(Size)]
public struct Bhs
{
    public const int Size = 48;
    private byte _first;

    public readonly Opcode Opcode => (Opcode)(this[0] & 0x3f);
    public readonly bool Immediate => (this[0] & 0x40) != 0;
    public readonly bool Final => (this[1] & 0x80) != 0;
    public readonly byte Flags => this[1];
    public readonly int TotalAhsLength => this[4] * 4;
    public readonly int DataSegmentLength => (this[5] << 16) | (this[6] << 8) | this[7];
    public readonly ulong Lun => BinaryPrimitives.ReadUInt64BigEndian(AsReadOnlySpan().Slice(8, 8));
    public readonly uint InitiatorTaskTag => U32(16);
    public readonly uint TargetTransferTag => U32(20);
    public readonly uint CmdSN => U32(24);
    public readonly uint ExpStatSN => U32(28);
    public readonly uint ExpectedDataTransferLength => U32(20);   // SCSI Command
    public readonly uint DataSN => U32(36);                        // Data-Out
    public readonly uint BufferOffset => U32(40);                  // Data-Out

    public readonly uint U32(int offset) => BinaryPrimitives.ReadUInt32BigEndian(AsReadOnlySpan().Slice(offset, 4));
    public readonly ushort U16(int offset) => BinaryPrimitives.ReadUInt16BigEndian(AsReadOnlySpan().Slice(offset, 2));

    [UnscopedRef]
    public readonly ReadOnlySpan<byte> AsReadOnlySpan() => MemoryMarshal.CreateReadOnlySpan(in _first, Size);

    [UnscopedRef]
    public Span<byte> AsSpan() => MemoryMarshal.CreateSpan(ref _first, Size);
}

/// <summary>Big-endian field writers for building outgoing headers in place.</summary>
public static class HeaderWriter
{
    public static void U32(Span<byte> header, int offset, uint value) => BinaryPrimitives.WriteUInt32BigEndian(header.Slice(offset, 4), value);
    public static void U16(Span<byte> header, int offset, ushort value) => BinaryPrimitives.WriteUInt16BigEndian(header.Slice(offset, 2), value);
    public static void U64(Span<byte> header, int offset, ulong value) => BinaryPrimitives.WriteUInt64BigEndian(header.Slice(offset, 8), value);

    public static void DataSegmentLength(Span<byte> header, int length)
    {
        header[4] = 0;
        header[5] = (byte)(length >> 16);
        header[6] = (byte)(length >> 8);
        header[7] = (byte)length;
    }
}
