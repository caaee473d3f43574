using System.Buffers.Binary;
using ISCSISnap.Target.Scsi;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary><see cref="SenseData"/>: SPC-4 §4.5 fixed (70h) and descriptor (72h) sense data.</summary>
public sealed class SenseDataTests
{
    private static byte[] Build(SenseCode code, bool descriptor, uint? information = null, SenseKeySpecific? keySpecific = null)
    {
        var buffer = Enumerable.Repeat((byte)0xEE, 252).ToArray();   // garbage that must not leak into the sense
        int length = SenseData.Build(buffer, code, descriptor, information, keySpecific);
        return buffer[..length];
    }

    [Fact]
    public void Fixed_format_is_18_bytes_with_key_asc_and_ascq_in_place()
    {
        var s = Build(SenseCode.LbaOutOfRange, descriptor: false);
        Assert.Equal(18, s.Length);
        Assert.Equal(0x70, s[0]);                 // current error, VALID clear
        Assert.Equal(0x05, s[2]);                 // ILLEGAL REQUEST
        Assert.Equal(new byte[4], s[3..7]);       // no information
        Assert.Equal(10, s[7]);                   // additional sense length: 18 - 8
        Assert.Equal(0x21, s[12]);
        Assert.Equal(0x00, s[13]);
        Assert.Equal(new byte[3], s[15..18]);     // SKSV clear
        Assert.Equal(0, s[1]);
        Assert.Equal(new byte[4], s[8..12]);
        Assert.Equal(0, s[14]);
    }

    [Fact]
    public void Fixed_format_information_sets_valid()
    {
        var s = Build(SenseCode.MiscompareDuringVerify, descriptor: false, information: 0x01020304);
        Assert.Equal(0xF0, s[0]);                 // VALID | 70h
        Assert.Equal(0x0E, s[2]);
        Assert.Equal(0x01020304u, BinaryPrimitives.ReadUInt32BigEndian(s.AsSpan(3)));
        Assert.Equal((0x1D, 0x00), (s[12], s[13]));
    }

    [Fact]
    public void Fixed_format_field_pointer_in_cdb_with_bit_pointer()
    {
        var s = Build(SenseCode.InvalidFieldInCdb, descriptor: false, keySpecific: new SenseKeySpecific(true, 0x0102, 5));
        Assert.Equal(0x80 | 0x40 | 0x08 | 5, s[15]);   // SKSV, C/D=1 (CDB), BPV, bit 5
        Assert.Equal(0x0102, BinaryPrimitives.ReadUInt16BigEndian(s.AsSpan(16)));
        Assert.Equal((0x24, 0x00), (s[12], s[13]));
    }

    [Fact]
    public void Fixed_format_field_pointer_in_parameter_list_without_bit_pointer()
    {
        var s = Build(SenseCode.InvalidFieldInParameterList, descriptor: false, keySpecific: new SenseKeySpecific(false, 20));
        Assert.Equal(0x80, s[15]);                // SKSV only: C/D=0 (parameter data), BPV clear
        Assert.Equal(20, BinaryPrimitives.ReadUInt16BigEndian(s.AsSpan(16)));
    }

    [Fact]
    public void Descriptor_format_without_descriptors_is_8_bytes()
    {
        var s = Build(SenseCode.PowerOnResetOccurred, descriptor: true);
        Assert.Equal(new byte[] { 0x72, 0x06, 0x29, 0x00, 0, 0, 0, 0 }, s);
    }

    [Fact]
    public void Descriptor_format_carries_information_and_sense_key_specific_descriptors()
    {
        var s = Build(SenseCode.InvalidFieldInCdb, descriptor: true, information: 0xDEADBEEF, keySpecific: new SenseKeySpecific(true, 7, 3));
        Assert.Equal(8 + 12 + 8, s.Length);
        Assert.Equal(0x72, s[0]);
        Assert.Equal(0x05, s[1]);
        Assert.Equal((0x24, 0x00), (s[2], s[3]));
        Assert.Equal(20, s[7]);                   // additional sense length

        var info = s[8..20];                       // information descriptor (type 00h, length 0Ah, VALID)
        Assert.Equal(0x00, info[0]);
        Assert.Equal(0x0A, info[1]);
        Assert.Equal(0x80, info[2]);
        Assert.Equal(0, info[3]);
        Assert.Equal(0xDEADBEEFul, BinaryPrimitives.ReadUInt64BigEndian(info.AsSpan(4)));

        var ks = s[20..28];                        // sense key specific descriptor (type 02h, length 06h)
        Assert.Equal(0x02, ks[0]);
        Assert.Equal(0x06, ks[1]);
        Assert.Equal(new byte[2], ks[2..4]);
        Assert.Equal(0x80 | 0x40 | 0x08 | 3, ks[4]);
        Assert.Equal(7, BinaryPrimitives.ReadUInt16BigEndian(ks.AsSpan(5)));
        Assert.Equal(0, ks[7]);
    }

    [Fact]
    public void Descriptor_format_with_only_a_field_pointer()
    {
        var s = Build(SenseCode.InvalidFieldInParameterList, descriptor: true, keySpecific: new SenseKeySpecific(false, 300));
        Assert.Equal(16, s.Length);
        Assert.Equal(8, s[7]);
        Assert.Equal(0x02, s[8]);
        Assert.Equal(0x80, s[12]);
        Assert.Equal(300, BinaryPrimitives.ReadUInt16BigEndian(s.AsSpan(13)));
    }

    [Fact]
    public void Completing_a_command_with_check_condition_records_the_sense()
    {
        var command = new ScsiCommand();
        command.Reset();
        command.CompleteCheckCondition(SenseCode.WriteProtected, descriptorFormat: false);
        Assert.True(command.Completed);
        Assert.Equal(ScsiStatus.CheckCondition, command.Status);
        Assert.Equal(18, command.SenseLength);
        Assert.Equal((0x07, 0x27, 0x00), (command.Sense[2], command.Sense[12], command.Sense[13]));
        Assert.Equal(0, command.DataInLength);
    }
}
