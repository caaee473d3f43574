using System.Buffers;
using System.Buffers.Binary;
using ISCSISnap.Storage.Integrity;
using ISCSISnap.Target.Iscsi.Pdus;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary><see cref="PduFramer.TryFrame"/>: RFC 7143 §11 PDU layout (BHS, AHS, header digest, padded data, data digest).</summary>
public sealed class PduFramerTests
{
    private static readonly FramingLimits NoDigests = new(false, false, 8192);
    private static readonly FramingLimits BothDigests = new(true, true, 8192);

    /// <summary>A PDU on the wire: 48-byte BHS, AHS, optional header digest, data padded to 4, optional data digest.</summary>
    private static byte[] Pdu(int ahsWords, byte[] data, bool headerDigest, bool dataDigest, byte opcode = 0x01, uint itt = 0x12345678)
    {
        var header = new byte[48 + 4 * ahsWords];
        header[0] = opcode;
        header[1] = 0x80;
        header[4] = (byte)ahsWords;
        header[5] = (byte)(data.Length >> 16);
        header[6] = (byte)(data.Length >> 8);
        header[7] = (byte)data.Length;
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(16), itt);
        for (int i = 48; i < header.Length; i++) header[i] = (byte)(0xA0 + i);
        var pdu = new List<byte>(header);
        if (headerDigest) pdu.AddRange(Digest(header));
        var padded = new byte[(data.Length + 3) & ~3];
        data.CopyTo(padded, 0);
        pdu.AddRange(padded);
        if (dataDigest && data.Length > 0) pdu.AddRange(Digest(padded));
        return pdu.ToArray();
    }

    private static byte[] Digest(byte[] bytes)
    {
        var digest = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(digest, Crc32C.Compute(bytes));
        return digest;
    }

    private static FrameResult Frame(byte[] bytes, FramingLimits limits, out IncomingPdu pdu, out string? fault) =>
        PduFramer.TryFrame(new ReadOnlySequence<byte>(bytes), limits, out pdu, out fault);

    [Fact]
    public void A_partial_header_needs_more_data()
    {
        var pdu = Pdu(0, [], false, false);
        for (int length = 0; length < 48; length += 7)
            Assert.Equal(FrameResult.NeedMoreData, Frame(pdu[..length], NoDigests, out _, out _));
    }

    [Fact]
    public void Every_truncation_of_a_full_pdu_needs_more_data()
    {
        // BHS, 2 AHS words, header digest, 5 data bytes + 3 padding, data digest: every prefix is incomplete.
        var pdu = Pdu(2, [1, 2, 3, 4, 5], true, true);
        Assert.Equal(48 + 8 + 4 + 8 + 4, pdu.Length);
        for (int length = 0; length < pdu.Length; length++)
            Assert.Equal(FrameResult.NeedMoreData, Frame(pdu[..length], BothDigests, out _, out _));
        Assert.Equal(FrameResult.Complete, Frame(pdu, BothDigests, out _, out _));
    }

    [Fact]
    public void A_complete_pdu_exposes_header_ahs_and_unpadded_data_and_ends_exactly()
    {
        byte[] data = [10, 20, 30, 40, 50, 60, 70];
        var pdu = Pdu(1, data, false, false, opcode: 0x05, itt: 0xCAFEF00D);
        Assert.Equal(48 + 4 + 8, pdu.Length);
        var next = Pdu(0, [], false, false, opcode: 0x00);
        var stream = pdu.Concat(next).ToArray();
        var buffer = new ReadOnlySequence<byte>(stream);

        Assert.Equal(FrameResult.Complete, PduFramer.TryFrame(buffer, NoDigests, out var framed, out var fault));
        Assert.Null(fault);
        Assert.Equal(Opcode.ScsiDataOut, framed.Header.Opcode);
        Assert.Equal(0xCAFEF00Du, framed.Header.InitiatorTaskTag);
        Assert.Equal(7, framed.Header.DataSegmentLength);
        Assert.Equal(4, framed.Header.TotalAhsLength);
        Assert.Equal(pdu[48..52], framed.AdditionalHeaders.ToArray());
        Assert.Equal(data, framed.Data.ToArray());
        Assert.True(framed.DataDigestOk);
        Assert.Equal(pdu.Length, buffer.Slice(0, framed.End).Length);
        Assert.Equal(next, buffer.Slice(framed.End).ToArray());
    }

    [Theory]
    [InlineData(1, 4)]
    [InlineData(2, 4)]
    [InlineData(3, 4)]
    [InlineData(4, 4)]
    [InlineData(5, 8)]
    [InlineData(0, 0)]
    public void Data_is_padded_to_a_multiple_of_four(int dataLength, int padded)
    {
        var pdu = Pdu(0, Enumerable.Range(1, dataLength).Select(i => (byte)i).ToArray(), false, false);
        Assert.Equal(48 + padded, pdu.Length);
        Assert.Equal(FrameResult.NeedMoreData, Frame(pdu[..^1], NoDigests, out _, out _));
        Assert.Equal(FrameResult.Complete, Frame(pdu, NoDigests, out var framed, out _));
        Assert.Equal(dataLength, framed.Data.Length);
        Assert.Equal(48 + padded, new ReadOnlySequence<byte>(pdu).Slice(0, framed.End).Length);
    }

    [Fact]
    public void With_digests_the_pdu_is_complete_and_checked()
    {
        var data = LuHarness.Pattern(1001, 1);
        var pdu = Pdu(1, data, true, true);
        Assert.Equal(48 + 4 + 4 + 1004 + 4, pdu.Length);
        Assert.Equal(FrameResult.Complete, Frame(pdu, BothDigests, out var framed, out var fault));
        Assert.Null(fault);
        Assert.True(framed.DataDigestOk);
        Assert.Equal(data, framed.Data.ToArray());
        Assert.Equal(pdu.Length, new ReadOnlySequence<byte>(pdu).Slice(0, framed.End).Length);
    }

    [Fact]
    public void No_data_digest_is_expected_when_there_is_no_data()
    {
        var pdu = Pdu(0, [], true, true);
        Assert.Equal(52, pdu.Length);
        Assert.Equal(FrameResult.Complete, Frame(pdu, BothDigests, out var framed, out _));
        Assert.Equal(52, new ReadOnlySequence<byte>(pdu).Slice(0, framed.End).Length);
        Assert.True(framed.DataDigestOk);
    }

    [Theory]
    [InlineData(0)]     // in the BHS
    [InlineData(50)]    // in the AHS
    [InlineData(52)]    // in the digest itself
    public void A_header_digest_mismatch_is_invalid(int corruptAt)
    {
        var pdu = Pdu(1, [1, 2, 3, 4], true, true);
        pdu[corruptAt] ^= 0x01;
        Assert.Equal(FrameResult.Invalid, Frame(pdu, BothDigests, out _, out var fault));
        Assert.Contains("header digest", fault);
    }

    [Theory]
    [InlineData(0)]       // a data byte
    [InlineData(1003)]    // a padding byte: the digest covers the padding too
    [InlineData(1005)]    // the digest itself
    public void A_data_digest_mismatch_frames_the_pdu_but_flags_the_data(int corruptInData)
    {
        var pdu = Pdu(0, LuHarness.Pattern(1001, 2), true, true);
        pdu[48 + 4 + corruptInData] ^= 0x80;
        Assert.Equal(FrameResult.Complete, Frame(pdu, BothDigests, out var framed, out var fault));
        Assert.Null(fault);
        Assert.False(framed.DataDigestOk);
        Assert.Equal(pdu.Length, new ReadOnlySequence<byte>(pdu).Slice(0, framed.End).Length);
    }

    [Fact]
    public void Digests_are_not_checked_when_not_negotiated()
    {
        // The same bytes framed without digests: the digest words are simply not part of the PDU.
        var pdu = Pdu(0, [1, 2, 3, 4], false, false);
        Assert.Equal(FrameResult.Complete, Frame(pdu, NoDigests, out var framed, out _));
        Assert.Equal(52, new ReadOnlySequence<byte>(pdu).Slice(0, framed.End).Length);
    }

    [Fact]
    public void A_data_segment_above_the_limit_is_invalid_even_before_it_arrives()
    {
        var header = Pdu(0, [], false, false);
        header[5] = 0x00; header[6] = 0x20; header[7] = 0x01;   // 8193 bytes announced
        Assert.Equal(FrameResult.Invalid, Frame(header, NoDigests, out _, out var fault));
        Assert.Contains("8193", fault);

        header[7] = 0x00;   // exactly 8192: legal, so more data is needed
        Assert.Equal(FrameResult.NeedMoreData, Frame(header, NoDigests, out _, out _));
    }

    [Fact]
    public void An_ahs_above_the_limit_is_invalid()
    {
        var limits = new FramingLimits(false, false, 8192, MaxAhsLength: 16);
        var header = Pdu(0, [], false, false);
        header[4] = 5;   // 20 bytes of AHS
        Assert.Equal(FrameResult.Invalid, Frame(header, limits, out _, out var fault));
        Assert.Contains("AHS", fault);
        header[4] = 4;   // 16 bytes: allowed
        Assert.Equal(FrameResult.NeedMoreData, Frame(header, limits, out _, out _));
    }

    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    [InlineData(47)]
    [InlineData(50)]
    public void Multi_segment_buffers_frame_like_contiguous_ones(int segmentSize)
    {
        var data = LuHarness.Pattern(333, 3);
        var first = Pdu(2, data, true, true, itt: 1);
        var second = Pdu(0, [9, 8, 7], true, true, itt: 2);
        var buffer = Sequences.Split(first.Concat(second).ToArray(), segmentSize);

        Assert.Equal(FrameResult.Complete, PduFramer.TryFrame(buffer, BothDigests, out var one, out _));
        Assert.True(one.DataDigestOk);
        Assert.Equal(1u, one.Header.InitiatorTaskTag);
        Assert.Equal(first[48..56], one.AdditionalHeaders.ToArray());
        Assert.Equal(data, one.Data.ToArray());
        Assert.Equal(first.Length, buffer.Slice(0, one.End).Length);

        var rest = buffer.Slice(one.End);
        Assert.Equal(FrameResult.Complete, PduFramer.TryFrame(rest, BothDigests, out var two, out _));
        Assert.Equal(2u, two.Header.InitiatorTaskTag);
        Assert.Equal(new byte[] { 9, 8, 7 }, two.Data.ToArray());
        Assert.True(two.DataDigestOk);
        Assert.Equal(0, rest.Slice(two.End).Length);

        // A corrupted data byte behind a segment boundary is still caught.
        var corrupted = first.ToArray();
        corrupted[48 + 8 + 4 + 200] ^= 1;
        Assert.Equal(FrameResult.Complete, PduFramer.TryFrame(Sequences.Split(corrupted, segmentSize), BothDigests, out var bad, out _));
        Assert.False(bad.DataDigestOk);
    }
}
