using System.Buffers.Binary;
using ISCSISnap.Target.Scsi;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary>Thin provisioning: UNMAP, WRITE SAME with and without UNMAP, GET LBA STATUS (SBC-3 §4.7, §5.20, §5.28, §5.42-5.44).</summary>
public sealed class ProvisioningTests
{
    private const string Initiator = "iqn.2026-11.test:thin";

    private static async Task<List<(ulong Lba, uint Blocks, byte Status)>> LbaStatusAsync(LuHarness lu, ItNexus nexus, ulong lba, uint allocation = 1024)
    {
        var result = await lu.RunAsync(nexus, ScsiCdb.GetLbaStatus(lba, allocation));
        result.AssertGood();
        var d = result.DataIn;
        uint parameterLength = BinaryPrimitives.ReadUInt32BigEndian(d);
        Assert.Equal(0u, (parameterLength - 4) % 16);   // 4 reserved bytes, then 16-byte descriptors
        Assert.Equal(d.Length, Math.Min((int)parameterLength + 4, (int)allocation));
        var list = new List<(ulong, uint, byte)>();
        for (int offset = 8; offset + 16 <= d.Length; offset += 16)
            list.Add((BinaryPrimitives.ReadUInt64BigEndian(d.AsSpan(offset)), BinaryPrimitives.ReadUInt32BigEndian(d.AsSpan(offset + 8)), (byte)(d[offset + 12] & 0x0F)));
        return list;
    }

    [Fact]
    public async Task A_new_thin_unit_is_entirely_deallocated()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        Assert.Equal([(0ul, 32768u, (byte)1)], await LbaStatusAsync(lu, nexus, 0));
        Assert.Equal([(1000ul, 31768u, (byte)1)], await LbaStatusAsync(lu, nexus, 1000));
    }

    [Fact]
    public async Task Unmap_deallocates_and_get_lba_status_reports_it_from_the_requested_lba()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var data = LuHarness.Pattern(1 << 20, 1);   // LBAs 0-2047
        await lu.WriteAsync(nexus, 0, data);
        Assert.Equal([(0ul, 2048u, (byte)0), (2048ul, 30720u, (byte)1)], await LbaStatusAsync(lu, nexus, 0));

        var unmap = ScsiCdb.UnmapParameters((256, 256));
        (await lu.RunAsync(nexus, ScsiCdb.Unmap(unmap.Length), unmap)).AssertGood();

        Assert.Equal([(256ul, 256u, (byte)1), (512ul, 1536u, (byte)0), (2048ul, 30720u, (byte)1)], await LbaStatusAsync(lu, nexus, 256));
        Assert.Equal([(300ul, 212u, (byte)1), (512ul, 1536u, (byte)0), (2048ul, 30720u, (byte)1)], await LbaStatusAsync(lu, nexus, 300));
        Assert.Equal((100ul, 156u, (byte)0), (await LbaStatusAsync(lu, nexus, 100))[0]);
        Assert.All(await lu.ReadAsync(nexus, 256, 256), b => Assert.Equal(0, b));
        Assert.Equal(data[..(256 * 512)], await lu.ReadAsync(nexus, 0, 256));
        Assert.Equal(data[(512 * 512)..], await lu.ReadAsync(nexus, 512, 1536));
    }

    [Fact]
    public async Task Unmap_takes_several_descriptors_and_frees_storage()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        await lu.WriteAsync(nexus, 0, LuHarness.Pattern(1 << 20, 2));
        long before = lu.Device.AllocatedBytes;
        var unmap = ScsiCdb.UnmapParameters((0, 512), (1024, 512), (4096, 0));
        (await lu.RunAsync(nexus, ScsiCdb.Unmap(unmap.Length), unmap)).AssertGood();
        Assert.True(lu.Device.AllocatedBytes <= before - 512 * 1024, $"allocated {lu.Device.AllocatedBytes} of {before}");
        Assert.Equal([(0ul, 512u, (byte)1), (512ul, 512u, (byte)0), (1024ul, 512u, (byte)1), (1536ul, 512u, (byte)0), (2048ul, 30720u, (byte)1)],
            await LbaStatusAsync(lu, nexus, 0));
    }

    [Fact]
    public async Task Unmap_is_all_or_nothing_when_a_descriptor_is_out_of_range()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var data = LuHarness.Pattern(8 * 512, 3);
        await lu.WriteAsync(nexus, 0, data);
        var unmap = ScsiCdb.UnmapParameters((0, 8), ((ulong)lu.BlockCount - 1, 2));
        (await lu.RunAsync(nexus, ScsiCdb.Unmap(unmap.Length), unmap)).AssertSense(SenseCode.LbaOutOfRange);
        Assert.Equal(data, await lu.ReadAsync(nexus, 0, 8));
        var overflow = ScsiCdb.UnmapParameters((ulong.MaxValue, 1));
        (await lu.RunAsync(nexus, ScsiCdb.Unmap(overflow.Length), overflow)).AssertSense(SenseCode.LbaOutOfRange);
    }

    [Fact]
    public async Task Unmap_refuses_malformed_parameter_lists()
    {
        await using var lu = LuHarness.Create(options: new LogicalUnitOptions { MaxUnmapDescriptors = 2 });
        var nexus = await lu.ReadyNexusAsync(Initiator);

        var tooMany = ScsiCdb.UnmapParameters((0, 1), (8, 1), (16, 1));
        var result = await lu.RunAsync(nexus, ScsiCdb.Unmap(tooMany.Length), tooMany);
        result.AssertSense(SenseCode.InvalidFieldInParameterList);

        var lying = ScsiCdb.UnmapParameters((0, 1));
        BinaryPrimitives.WriteUInt16BigEndian(lying.AsSpan(2), 32);   // claims two descriptors, carries one
        (await lu.RunAsync(nexus, ScsiCdb.Unmap(lying.Length), lying)).AssertSense(SenseKey.IllegalRequest, 0x1A, 0x00);

        (await lu.RunAsync(nexus, ScsiCdb.Unmap(4), new byte[4])).AssertSense(SenseKey.IllegalRequest, 0x1A, 0x00);

        var anchor = ScsiCdb.Unmap(lying.Length);
        anchor[1] = 0x01;
        (await lu.RunAsync(nexus, anchor, lying)).AssertSense(SenseCode.InvalidFieldInCdb);
    }

    [Fact]
    public async Task Unmap_with_no_parameter_list_no_descriptors_or_zero_blocks_is_good()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var data = LuHarness.Pattern(4096, 10);
        await lu.WriteAsync(nexus, 0, data);
        (await lu.RunAsync(nexus, ScsiCdb.Unmap(0))).AssertGood();
        var none = ScsiCdb.UnmapParameters();
        (await lu.RunAsync(nexus, ScsiCdb.Unmap(none.Length), none)).AssertGood();
        // Zero blocks: nothing is unmapped, not even at the first LBA past the end (SBC-3: not an error).
        var zero = ScsiCdb.UnmapParameters((0, 0), ((ulong)lu.BlockCount, 0));
        (await lu.RunAsync(nexus, ScsiCdb.Unmap(zero.Length), zero)).AssertGood();
        Assert.Equal(data, await lu.ReadAsync(nexus, 0, 8));
    }

    [Fact]
    public async Task Get_lba_status_beyond_the_last_lba_is_out_of_range()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        (await lu.RunAsync(nexus, ScsiCdb.GetLbaStatus((ulong)lu.BlockCount))).AssertSense(SenseCode.LbaOutOfRange);
        (await lu.RunAsync(nexus, ScsiCdb.GetLbaStatus(ulong.MaxValue))).AssertSense(SenseCode.LbaOutOfRange);
        Assert.Equal([((ulong)lu.BlockCount - 1, 1u, (byte)1)], await LbaStatusAsync(lu, nexus, (ulong)lu.BlockCount - 1));
    }

    [Fact]
    public async Task Get_lba_status_returns_as_many_descriptors_as_fit()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        await lu.WriteAsync(nexus, 0, LuHarness.Pattern(8 * 512, 4));
        var one = await LbaStatusAsync(lu, nexus, 0, allocation: 24);
        Assert.Equal([(0ul, 8u, (byte)0)], one);
    }

    // ---------------------------------------------------------------- WRITE SAME

    [Fact]
    public async Task Write_same_with_unmap_deallocates_the_range()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var data = LuHarness.Pattern(1 << 20, 5);
        await lu.WriteAsync(nexus, 0, data);
        (await lu.RunAsync(nexus, ScsiCdb.WriteSame16(512, 512, unmap: true), new byte[512])).AssertGood();
        Assert.Equal([(512ul, 512u, (byte)1), (1024ul, 1024u, (byte)0), (2048ul, 30720u, (byte)1)], await LbaStatusAsync(lu, nexus, 512));
        Assert.All(await lu.ReadAsync(nexus, 512, 512), b => Assert.Equal(0, b));
        Assert.Equal(data[..(512 * 512)], await lu.ReadAsync(nexus, 0, 512));
    }

    [Fact]
    public async Task Write_same10_with_unmap_deallocates_the_range()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        await lu.WriteAsync(nexus, 0, LuHarness.Pattern(64 * 1024, 6));
        (await lu.RunAsync(nexus, ScsiCdb.WriteSame10(0, 64, unmap: true), new byte[512])).AssertGood();
        Assert.Equal((0ul, 64u, (byte)1), (await LbaStatusAsync(lu, nexus, 0))[0]);
    }

    [Fact]
    public async Task Write_same_without_a_data_out_buffer_and_unmap_deallocates()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        await lu.WriteAsync(nexus, 0, LuHarness.Pattern(64 * 1024, 7));
        (await lu.RunAsync(nexus, ScsiCdb.WriteSame16(0, 64, unmap: true, noDataOut: true))).AssertGood();
        Assert.Equal((0ul, 64u, (byte)1), (await LbaStatusAsync(lu, nexus, 0))[0]);
        Assert.All(await lu.ReadAsync(nexus, 0, 64), b => Assert.Equal(0, b));
    }

    [Fact]
    public async Task Write_same_without_unmap_writes_the_block_to_every_lba()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var block = LuHarness.Pattern(512, 8);
        block[0] = 0x5A;   // certainly not all zeros
        // 3000 blocks: more than one 1 MiB chunk; LBAs 96-3095 are whole 4 KiB filesystem blocks.
        (await lu.RunAsync(nexus, ScsiCdb.WriteSame16(96, 3000), block)).AssertGood();
        var read = await lu.ReadAsync(nexus, 95, 3002);
        Assert.All(read[..512], b => Assert.Equal(0, b));
        for (int i = 1; i <= 3000; i++) Assert.Equal(block, read[(i * 512)..((i + 1) * 512)]);
        Assert.All(read[(3001 * 512)..], b => Assert.Equal(0, b));
        Assert.Equal([(0ul, 96u, (byte)1), (96ul, 3000u, (byte)0), (3096ul, 32768u - 3096, (byte)1)], await LbaStatusAsync(lu, nexus, 0));
    }

    [Fact]
    public async Task Write_same_of_zeros_without_unmap_leaves_the_blocks_mapped()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        await lu.WriteAsync(nexus, 0, LuHarness.Pattern(64 * 1024, 9));
        (await lu.RunAsync(nexus, ScsiCdb.WriteSame10(0, 64), new byte[512])).AssertGood();
        Assert.Equal((0ul, 128u, (byte)0), (await LbaStatusAsync(lu, nexus, 0))[0]);
        Assert.All(await lu.ReadAsync(nexus, 0, 64), b => Assert.Equal(0, b));
    }

    [Fact]
    public async Task Write_same_with_zero_blocks_runs_to_the_end_of_the_medium()
    {
        await using var lu = LuHarness.Create(bytes: 1 << 20, options: new LogicalUnitOptions { MaxWriteSameBlocks = 0 });
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var block = Enumerable.Repeat((byte)0x33, 512).ToArray();
        (await lu.RunAsync(nexus, ScsiCdb.WriteSame16(2000, 0), block)).AssertGood();
        var read = await lu.ReadAsync(nexus, 1999, 49);
        Assert.All(read[..512], b => Assert.Equal(0, b));
        Assert.All(read[512..], b => Assert.Equal(0x33, b));
    }

    [Fact]
    public async Task Write_same_checks_its_fields()
    {
        await using var lu = LuHarness.Create(options: new LogicalUnitOptions { MaxWriteSameBlocks = 1024 });
        var nexus = await lu.ReadyNexusAsync(Initiator);
        (await lu.RunAsync(nexus, ScsiCdb.WriteSame16(0, 1025), new byte[512])).AssertSense(SenseCode.InvalidFieldInCdb);
        (await lu.RunAsync(nexus, ScsiCdb.WriteSame16((ulong)lu.BlockCount - 1, 2), new byte[512])).AssertSense(SenseCode.LbaOutOfRange);
        (await lu.RunAsync(nexus, ScsiCdb.WriteSame16(0, 8), new byte[1024])).AssertSense(SenseCode.InvalidFieldInCdb);   // two blocks of data-out
        var anchor = ScsiCdb.WriteSame16(0, 8, unmap: true);
        anchor[1] |= 0x10;
        (await lu.RunAsync(nexus, anchor, new byte[512])).AssertSense(SenseCode.InvalidFieldInCdb);
        Assert.Equal(0, lu.Device.AllocatedBytes);
    }
}
