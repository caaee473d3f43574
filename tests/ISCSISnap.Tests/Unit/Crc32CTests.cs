using System.Buffers;
using ISCSISnap.Storage.Integrity;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary>CRC-32C against the iSCSI test vectors of RFC 3720 Appendix B.4 (RFC 7143 keeps the same digest).</summary>
public sealed class Crc32CTests
{
    [Fact]
    public void Thirty_two_zero_bytes_give_the_rfc_vector() =>
        Assert.Equal(0x8A9136AAu, Crc32C.Compute(new byte[32]));

    [Fact]
    public void Thirty_two_ff_bytes_give_the_rfc_vector() =>
        Assert.Equal(0x62A8AB43u, Crc32C.Compute(Enumerable.Repeat((byte)0xFF, 32).ToArray()));

    [Fact]
    public void Ascending_bytes_give_the_rfc_vector() =>
        Assert.Equal(0x46DD794Eu, Crc32C.Compute(Enumerable.Range(0, 32).Select(i => (byte)i).ToArray()));

    [Fact]
    public void Descending_bytes_give_the_rfc_vector() =>
        Assert.Equal(0x113FDB5Cu, Crc32C.Compute(Enumerable.Range(0, 32).Select(i => (byte)(31 - i)).ToArray()));

    [Fact]
    public void The_rfc_read_command_pdu_gives_its_vector()
    {
        // RFC 3720 B.4: an iSCSI SCSI Read (10) Command PDU; CRC bytes 56 3a 96 d9 on the wire (LSB first).
        byte[] pdu =
        [
            0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x18,
            0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        Assert.Equal(0xD9963A56u, Crc32C.Compute(pdu));
    }

    [Fact]
    public void Check_string_gives_the_castagnoli_check_value() =>
        Assert.Equal(0xE3069283u, Crc32C.Compute("123456789"u8));

    [Fact]
    public void Empty_input_gives_zero() => Assert.Equal(0u, Crc32C.Compute(ReadOnlySpan<byte>.Empty));

    [Theory]
    [InlineData(1)]
    [InlineData(7)]
    [InlineData(8)]
    [InlineData(9)]
    [InlineData(4099)]
    public void Multi_segment_sequence_equals_the_single_span(int length)
    {
        var data = new byte[length];
        new Random(length).NextBytes(data);
        uint expected = Crc32C.Compute(data);
        // Segments of awkward sizes, so 8-byte words straddle segment boundaries.
        foreach (int segmentSize in new[] { 1, 3, 5, 13, 1000 })
        {
            var sequence = Sequences.Split(data, segmentSize);
            Assert.True(sequence.IsSingleSegment == (length <= segmentSize));
            Assert.Equal(expected, Crc32C.Compute(sequence));
        }
    }

    [Fact]
    public void Append_continues_a_running_crc()
    {
        var data = new byte[333];
        new Random(5).NextBytes(data);
        uint running = Crc32C.Append(Crc32C.Seed, data.AsSpan(0, 101));
        running = Crc32C.Append(running, data.AsSpan(101));
        Assert.Equal(Crc32C.Compute(data), running ^ Crc32C.Seed);
    }

    [Fact]
    public void A_single_flipped_bit_changes_the_crc()
    {
        var data = new byte[64];
        uint clean = Crc32C.Compute(data);
        data[37] ^= 0x10;
        Assert.NotEqual(clean, Crc32C.Compute(data));
    }
}
