using System.Buffers;
using System.Buffers.Binary;
using ISCSISnap.Storage.Integrity;
using ISCSISnap.Target.Iscsi.Pdus;

namespace ISCSISnap.Benchmarks.Support;

/// <summary>Builds initiator PDUs (headers, padding, digests) into byte arrays for the framing benchmarks.</summary>
public static class Pdus
{
    /// <summary>A SCSI Command PDU (READ(10) of <paramref name="blocks"/> 512-byte blocks, no data segment).</summary>
    public static byte[] ScsiRead10(uint itt, uint cmdSN, uint lba, ushort blocks, bool headerDigest = false)
    {
        var pdu = new byte[Bhs.Size + (headerDigest ? 4 : 0)];
        var h = pdu.AsSpan(0, Bhs.Size);
        h[0] = (byte)Opcode.ScsiCommand;
        h[1] = 0x80 | 0x40 | 0x01;   // F, R, SIMPLE
        HeaderWriter.U32(h, 16, itt);
        HeaderWriter.U32(h, 20, (uint)blocks * 512);
        HeaderWriter.U32(h, 24, cmdSN);
        Cdb.Read10(h.Slice(32, 16), lba, blocks);
        if (headerDigest) BinaryPrimitives.WriteUInt32LittleEndian(pdu.AsSpan(Bhs.Size), Crc32C.Compute(h));
        return pdu;
    }

    /// <summary>A solicited Data-Out PDU carrying <paramref name="payload"/>, with optional header and data digests.</summary>
    public static byte[] DataOut(uint itt, uint ttt, uint dataSN, uint offset, ReadOnlySpan<byte> payload, bool headerDigest, bool dataDigest)
    {
        int padded = (payload.Length + 3) & ~3;
        int headerLength = Bhs.Size + (headerDigest ? 4 : 0);
        var pdu = new byte[headerLength + padded + (dataDigest && payload.Length > 0 ? 4 : 0)];
        var h = pdu.AsSpan(0, Bhs.Size);
        h[0] = (byte)Opcode.ScsiDataOut;
        h[1] = 0x80;   // F
        HeaderWriter.DataSegmentLength(h, payload.Length);
        HeaderWriter.U32(h, 16, itt);
        HeaderWriter.U32(h, 20, ttt);
        HeaderWriter.U32(h, 36, dataSN);
        HeaderWriter.U32(h, 40, offset);
        if (headerDigest) BinaryPrimitives.WriteUInt32LittleEndian(pdu.AsSpan(Bhs.Size), Crc32C.Compute(h));
        payload.CopyTo(pdu.AsSpan(headerLength));
        if (dataDigest && payload.Length > 0)
            BinaryPrimitives.WriteUInt32LittleEndian(pdu.AsSpan(headerLength + padded), Crc32C.Compute(pdu.AsSpan(headerLength, padded)));
        return pdu;
    }

    /// <summary>
    /// <paramref name="bytes"/> as a ReadOnlySequence of two segments (separate arrays) split at
    /// <paramref name="splitAt"/>, the way a pipe hands over a PDU that straddles two receive blocks.
    /// </summary>
    public static ReadOnlySequence<byte> TwoSegments(byte[] bytes, int splitAt)
    {
        var first = new Segment(bytes.AsMemory(0, splitAt).ToArray(), 0);
        var second = first.Append(bytes.AsMemory(splitAt).ToArray());
        return new ReadOnlySequence<byte>(first, 0, second, second.Memory.Length);
    }

    private sealed class Segment : ReadOnlySequenceSegment<byte>
    {
        public Segment(ReadOnlyMemory<byte> memory, long runningIndex)
        {
            Memory = memory;
            RunningIndex = runningIndex;
        }

        public Segment Append(ReadOnlyMemory<byte> memory)
        {
            var next = new Segment(memory, RunningIndex + Memory.Length);
            Next = next;
            return next;
        }
    }
}

/// <summary>CDB writers.</summary>
public static class Cdb
{
    public static void Read10(Span<byte> cdb, uint lba, ushort blocks) => Ten(cdb, 0x28, lba, blocks);
    public static void Write10(Span<byte> cdb, uint lba, ushort blocks) => Ten(cdb, 0x2A, lba, blocks);

    private static void Ten(Span<byte> cdb, byte opcode, uint lba, ushort blocks)
    {
        cdb.Slice(0, 10).Clear();
        cdb[0] = opcode;
        BinaryPrimitives.WriteUInt32BigEndian(cdb.Slice(2), lba);
        BinaryPrimitives.WriteUInt16BigEndian(cdb.Slice(7), blocks);
    }
}
