using ISCSISnap.Storage.Integrity;
using System.Buffers;
using System.Buffers.Binary;

namespace ISCSISnap.Target.Iscsi.Pdus;

/// <summary>Per-connection framing limits: negotiated digests and the largest data segment this side accepts.</summary>
public readonly record struct FramingLimits(bool HeaderDigest, bool DataDigest, int MaxDataSegmentLength, int MaxAhsLength = FramingLimits.MaxUsefulAhsLength)
{
    /// <summary>
    /// The most AHS a PDU can usefully carry: an extended CDB AHS for a 260-byte CDB (4 + 244 bytes) and a
    /// bidirectional read length AHS (8). TotalAHSLength can announce up to 1020 bytes; more than this is refused.
    /// </summary>
    public const int MaxUsefulAhsLength = 256;
}

public enum FrameResult
{
    /// <summary>A whole PDU was framed.</summary>
    Complete,
    /// <summary>The buffer holds only part of a PDU; read more and try again.</summary>
    NeedMoreData,
    /// <summary>The header digest failed, or a length exceeds the limits: the byte stream cannot be trusted further.</summary>
    Invalid,
}

/// <summary>A framed PDU: its header by value; AHS and data as slices of the receive buffer (valid until it is advanced).</summary>
public struct IncomingPdu
{
    public Bhs Header;
    public ReadOnlySequence<byte> AdditionalHeaders;
    public ReadOnlySequence<byte> Data;
    /// <summary>False when the data digest did not match (the PDU is framed correctly but its payload is not to be trusted).</summary>
    public bool DataDigestOk;
    /// <summary>Where the PDU ends in the buffer it was framed from.</summary>
    public SequencePosition End;
}

/// <summary>
/// Splits a byte stream into iSCSI PDUs without copying payloads: it returns <see cref="FrameResult.NeedMoreData"/>
/// until a whole PDU (header, AHS, digests, padded data) is buffered.
/// </summary>
public static class PduFramer
{
    public static FrameResult TryFrame(in ReadOnlySequence<byte> buffer, in FramingLimits limits, out IncomingPdu pdu, out string? fault)
    {
        pdu = default;
        fault = null;
        if (buffer.Length < Bhs.Size) return FrameResult.NeedMoreData;

        buffer.Slice(0, Bhs.Size).CopyTo(pdu.Header.AsSpan());
        int ahsLength = pdu.Header.TotalAhsLength;
        int dataLength = pdu.Header.DataSegmentLength;
        if (ahsLength > limits.MaxAhsLength)
        {
            fault = $"AHS length {ahsLength} exceeds {limits.MaxAhsLength}";
            return FrameResult.Invalid;
        }
        if (dataLength > limits.MaxDataSegmentLength)
        {
            fault = $"data segment length {dataLength} exceeds the negotiated {limits.MaxDataSegmentLength}";
            return FrameResult.Invalid;
        }

        int headerDigest = limits.HeaderDigest ? 4 : 0;
        int dataDigest = limits.DataDigest && dataLength > 0 ? 4 : 0;
        int paddedData = (dataLength + 3) & ~3;
        long total = Bhs.Size + ahsLength + headerDigest + paddedData + dataDigest;
        if (buffer.Length < total) return FrameResult.NeedMoreData;

        if (limits.HeaderDigest)
        {
            uint crc = Crc32C.Compute(buffer.Slice(0, Bhs.Size + ahsLength));
            if (crc != ReadDigest(buffer.Slice(Bhs.Size + ahsLength, 4)))
            {
                fault = "header digest mismatch";
                return FrameResult.Invalid;
            }
        }

        pdu.AdditionalHeaders = buffer.Slice(Bhs.Size, ahsLength);
        long dataStart = Bhs.Size + ahsLength + headerDigest;
        pdu.Data = buffer.Slice(dataStart, dataLength);
        pdu.DataDigestOk = true;
        if (dataDigest != 0)
        {
            uint crc = Crc32C.Compute(buffer.Slice(dataStart, paddedData));
            pdu.DataDigestOk = crc == ReadDigest(buffer.Slice(dataStart + paddedData, 4));
        }
        pdu.End = buffer.GetPosition(total);
        return FrameResult.Complete;
    }

    private static uint ReadDigest(ReadOnlySequence<byte> bytes)
    {
        Span<byte> digest = stackalloc byte[4];
        bytes.CopyTo(digest);
        return BinaryPrimitives.ReadUInt32LittleEndian(digest);
    }
}
