using ISCSISnap.Target.Scsi;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary><see cref="LunAddressing"/>: SAM-5 §4.7 single-level LUN structures.</summary>
public sealed class LunAddressingTests
{
    [Theory]
    [InlineData(0ul, 0x0000_0000_0000_0000ul)]
    [InlineData(1ul, 0x0001_0000_0000_0000ul)]
    [InlineData(255ul, 0x00FF_0000_0000_0000ul)]       // peripheral device addressing up to 255
    [InlineData(256ul, 0x4100_0000_0000_0000ul)]       // flat space addressing from 256: 01b method
    [InlineData(4660ul, 0x5234_0000_0000_0000ul)]
    [InlineData(16383ul, 0x7FFF_0000_0000_0000ul)]
    public void Encode_uses_peripheral_then_flat_space_addressing(ulong lun, ulong field)
    {
        Assert.Equal(field, LunAddressing.Encode(lun));
        Assert.Equal(lun, LunAddressing.Decode(field, out bool valid));
        Assert.True(valid);
    }

    [Theory]
    [InlineData(16384ul)]
    [InlineData(ulong.MaxValue)]
    public void Encode_refuses_luns_beyond_flat_space(ulong lun) =>
        Assert.Throws<ArgumentOutOfRangeException>(() => LunAddressing.Encode(lun));

    [Fact]
    public void Flat_space_may_also_name_a_small_lun()
    {
        Assert.Equal(5ul, LunAddressing.Decode(0x4005_0000_0000_0000ul, out bool valid));
        Assert.True(valid);
    }

    [Theory]
    [InlineData(0x8001_0000_0000_0000ul)]   // logical unit addressing method (10b)
    [InlineData(0xC000_0000_0000_0000ul)]   // extended logical unit addressing (11b)
    public void Other_addressing_methods_are_invalid(ulong field)
    {
        Assert.Equal(ulong.MaxValue, LunAddressing.Decode(field, out bool valid));
        Assert.False(valid);
    }

    [Theory]
    [InlineData(0x0105_0000_0000_0000ul)]   // peripheral addressing with bus identifier 1
    [InlineData(0x0005_0000_0000_0001ul)]   // second-level addressing present
    [InlineData(0x4005_0001_0000_0000ul)]
    public void Hierarchical_or_bus_addressed_luns_are_invalid(ulong field)
    {
        LunAddressing.Decode(field, out bool valid);
        Assert.False(valid);
    }

    [Fact]
    public void Every_lun_round_trips()
    {
        for (ulong lun = 0; lun <= LunAddressing.MaxLun; lun++)
        {
            Assert.Equal(lun, LunAddressing.Decode(LunAddressing.Encode(lun), out bool valid));
            Assert.True(valid);
        }
    }
}
