using System.Buffers;
using System.Buffers.Binary;
using System.Numerics;
using System.Runtime.InteropServices;

namespace ISCSISnap.Storage.Integrity;

/// <summary>CRC-32C (Castagnoli) as iSCSI digests use it: seed and final XOR 0xFFFFFFFF, sent least significant byte first.</summary>
public static class Crc32C
{
    public const uint Seed = 0xFFFFFFFF;

    public static uint Compute(ReadOnlySpan<byte> data) => Append(Seed, data) ^ Seed;

    public static uint Compute(in ReadOnlySequence<byte> data)
    {
        uint crc = Seed;
        foreach (var segment in data) crc = Append(crc, segment.Span);
        return crc ^ Seed;
    }

    /// <summary>Continues a running (unfinalised) CRC over <paramref name="data"/>; uses the SSE4.2/ARM CRC instructions.</summary>
    public static uint Append(uint crc, ReadOnlySpan<byte> data)
    {
        var longs = MemoryMarshal.Cast<byte, ulong>(data);
        foreach (ulong value in longs)
            crc = BitOperations.Crc32C(crc, BitConverter.IsLittleEndian ? value : BinaryPrimitives.ReverseEndianness(value));
        for (int i = longs.Length * 8; i < data.Length; i++)
            crc = BitOperations.Crc32C(crc, data[i]);
        return crc;
    }
}
