using System.Buffers.Binary;
using ISCSISnap.Target.Scsi;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary>READ/WRITE range and length checks, streamed writes, COMPARE AND WRITE, VERIFY and friends (SBC-3 §5).</summary>
public sealed class ReadWriteTests
{
    private const string Initiator = "iqn.2026-11.test:rw";

    // ---------------------------------------------------------------- LBA range

    [Fact]
    public async Task Reads_and_writes_round_trip_at_both_ends_of_the_medium()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var head = LuHarness.Pattern(4096, 1);
        var tail = LuHarness.Pattern(4096, 2);
        await lu.WriteAsync(nexus, 0, head);
        await lu.WriteAsync(nexus, (ulong)lu.BlockCount - 8, tail);
        Assert.Equal(head, await lu.ReadAsync(nexus, 0, 8));
        Assert.Equal(tail, await lu.ReadAsync(nexus, (ulong)lu.BlockCount - 8, 8));
    }

    [Fact]
    public async Task A_unit_with_4096_byte_blocks_addresses_whole_4096_byte_blocks()
    {
        await using var lu = LuHarness.Create(bytes: 4L << 20, blockSize: 4096);
        var nexus = await lu.ReadyNexusAsync(Initiator);
        Assert.Equal(1024, lu.BlockCount);
        var data = LuHarness.Pattern(2 * 4096, 16);
        await lu.WriteAsync(nexus, 1022, data);
        Assert.Equal(data, await lu.ReadAsync(nexus, 1022, 2));
        Assert.Equal(data, File.ReadAllBytes(lu.ImagePath)[(1022 * 4096)..]);
        (await lu.RunAsync(nexus, Cdb.Read16(1023, 2))).AssertSense(SenseCode.LbaOutOfRange);

        var capacity = await lu.RunAsync(nexus, Cdb.ReadCapacity16());
        capacity.AssertGood();
        Assert.Equal(1023ul, BinaryPrimitives.ReadUInt64BigEndian(capacity.DataIn));          // last LBA
        Assert.Equal(4096u, BinaryPrimitives.ReadUInt32BigEndian(capacity.DataIn.AsSpan(8)));  // block length
    }

    [Fact]
    public async Task Reading_or_writing_past_the_last_block_is_lba_out_of_range()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        uint last = (uint)lu.BlockCount - 1;
        (await lu.RunAsync(nexus, Cdb.Read10(last, 2))).AssertSense(SenseKey.IllegalRequest, 0x21, 0x00);
        var write = await lu.RunAsync(nexus, Cdb.Write10(last, 2), new byte[1024]);
        write.AssertSense(SenseKey.IllegalRequest, 0x21, 0x00);
        Assert.True(write.CompletedInBegin);
        (await lu.RunAsync(nexus, Cdb.Read10(last + 1, 1))).AssertSense(SenseKey.IllegalRequest, 0x21, 0x00);
        (await lu.RunAsync(nexus, Cdb.Read10(last, 1))).AssertGood();
    }

    [Theory]
    [InlineData(1u)]            // one past the end
    [InlineData(0x80000000u)]   // 2^31
    [InlineData(0xFFFFFFFFu)]   // -1
    public async Task A_zero_length_read10_beyond_the_end_is_lba_out_of_range(uint beyond)
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        uint lba = beyond == 1 ? (uint)lu.BlockCount + 1 : beyond;
        (await lu.RunAsync(nexus, Cdb.Read10(lba, 0))).AssertSense(SenseCode.LbaOutOfRange);
    }

    [Fact]
    public async Task A_zero_length_read_inside_the_medium_is_good_and_transfers_nothing()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var result = await lu.RunAsync(nexus, Cdb.Read10(100, 0));
        result.AssertGood();
        Assert.Empty(result.DataIn);
    }

    [Theory]
    [InlineData(ulong.MaxValue, 1u)]          // lba + blocks wraps to 0
    [InlineData(ulong.MaxValue, 0u)]
    [InlineData(ulong.MaxValue - 1, 2u)]      // wraps to exactly 0 too
    [InlineData(0x8000_0000_0000_0000ul, 1u)]
    [InlineData(1ul, 0xFFFF_FFFFu)]           // the length alone is beyond the medium
    public async Task Overflow_prone_read16_and_write16_ranges_are_lba_out_of_range(ulong lba, uint blocks)
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        (await lu.RunAsync(nexus, Cdb.Read16(lba, blocks))).AssertSense(SenseCode.LbaOutOfRange);
        var write = await lu.RunAsync(nexus, Cdb.Write16(lba, blocks), new byte[512]);
        write.AssertSense(SenseCode.LbaOutOfRange);
        Assert.True(write.CompletedInBegin, "the range was not checked before asking for Data-Out");
        Assert.Equal(0, lu.Device.AllocatedBytes);   // nothing reached the medium
    }

    [Fact]
    public async Task Read6_with_transfer_length_zero_reads_256_blocks()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var data = LuHarness.Pattern(256 * 512, 3);
        await lu.WriteAsync(nexus, 10, data);
        var result = await lu.RunAsync(nexus, ScsiCdb.Read6(10, 0));
        result.AssertGood();
        Assert.Equal(data, result.DataIn);
    }

    // ---------------------------------------------------------------- transfer length limit

    [Fact]
    public async Task A_transfer_length_beyond_the_maximum_is_invalid_field_in_cdb_pointing_at_the_length()
    {
        await using var lu = LuHarness.Create(options: new LogicalUnitOptions { MaxTransferBytes = 64 * 1024 });
        var nexus = await lu.ReadyNexusAsync(Initiator);
        Assert.Equal(128u, lu.Unit.MaxTransferBlocks);

        var read10 = await lu.RunAsync(nexus, Cdb.Read10(0, 129));
        read10.AssertSense(SenseCode.InvalidFieldInCdb);
        Assert.Equal(0xC0, read10.Sense[15] & 0xC8);                                 // SKSV, C/D=1, no bit pointer
        Assert.Equal(7, BinaryPrimitives.ReadUInt16BigEndian(read10.Sense.AsSpan(16)));   // TRANSFER LENGTH of READ(10)

        var read16 = await lu.RunAsync(nexus, Cdb.Read16(0, 129));
        read16.AssertSense(SenseCode.InvalidFieldInCdb);
        Assert.Equal(10, BinaryPrimitives.ReadUInt16BigEndian(read16.Sense.AsSpan(16)));

        var write = await lu.RunAsync(nexus, Cdb.Write10(0, 129), new byte[129 * 512]);
        write.AssertSense(SenseCode.InvalidFieldInCdb);
        Assert.True(write.CompletedInBegin);
        Assert.Equal(0, lu.Device.AllocatedBytes);

        var maximum = await lu.RunAsync(nexus, Cdb.Read10(0, 128));
        maximum.AssertGood();
        Assert.Equal(64 * 1024, maximum.DataIn.Length);
    }

    [Fact]
    public async Task Protection_information_fields_are_refused()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var read = await lu.RunAsync(nexus, Cdb.Read10(0, 1, flags: 0x20));   // RDPROTECT=001b
        read.AssertSense(SenseCode.InvalidFieldInCdb);
        Assert.Equal(0x80 | 0x40 | 0x08 | 7, read.Sense[15]);
        Assert.Equal(1, BinaryPrimitives.ReadUInt16BigEndian(read.Sense.AsSpan(16)));
        (await lu.RunAsync(nexus, Cdb.Write10(0, 1, flags: 0x40), new byte[512])).AssertSense(SenseCode.InvalidFieldInCdb);
    }

    [Fact]
    public async Task Naca_or_link_in_the_control_byte_is_refused()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var cdb = Cdb.Read10(0, 1);
        cdb[9] = 0x04;   // NACA
        var result = await lu.RunAsync(nexus, cdb);
        result.AssertSense(SenseCode.InvalidFieldInCdb);
        Assert.Equal(9, BinaryPrimitives.ReadUInt16BigEndian(result.Sense.AsSpan(16)));
    }

    // ---------------------------------------------------------------- streamed writes

    [Fact]
    public async Task A_streamed_write_split_inside_blocks_lands_intact()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var data = LuHarness.Pattern(8 * 512, 4);
        // Pieces that start and end inside blocks, one smaller than a block, one spanning several.
        var result = await lu.RunAsync(nexus, Cdb.Write10(20, 8), data, streamPieces: [700, 100, 300, 1500, 1, 1495]);
        result.AssertGood();
        Assert.Equal(data, await lu.ReadAsync(nexus, 20, 8));
        Assert.All(await lu.ReadAsync(nexus, 19, 1), b => Assert.Equal(0, b));
        Assert.All(await lu.ReadAsync(nexus, 28, 1), b => Assert.Equal(0, b));
    }

    [Theory]
    [InlineData(0x08)]   // FUA
    [InlineData(0x10)]   // DPO
    [InlineData(0x18)]
    public async Task Writes_with_fua_or_dpo_complete(byte flags)
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var data = LuHarness.Pattern(1024, flags);
        (await lu.RunAsync(nexus, Cdb.Write10(5, 2, flags), data)).AssertGood();
        Assert.Equal(data, await lu.ReadAsync(nexus, 5, 2));
        (await lu.RunAsync(nexus, Cdb.SynchronizeCache10())).AssertGood();
    }

    [Fact]
    public async Task A_read_only_unit_refuses_writes_with_write_protected()
    {
        await using var lu = LuHarness.Create(options: new LogicalUnitOptions { ReadOnly = true });
        var nexus = await lu.ReadyNexusAsync(Initiator);
        (await lu.RunAsync(nexus, Cdb.Write10(0, 1), new byte[512])).AssertSense(SenseKey.DataProtect, 0x27, 0x00);
        (await lu.RunAsync(nexus, Cdb.Read10(0, 1))).AssertGood();
    }

    // ---------------------------------------------------------------- COMPARE AND WRITE

    [Fact]
    public async Task Compare_and_write_writes_when_the_compare_data_matches()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var current = LuHarness.Pattern(1024, 5);
        var replacement = LuHarness.Pattern(1024, 6);
        await lu.WriteAsync(nexus, 30, current);
        (await lu.RunAsync(nexus, Cdb.CompareAndWrite(30, 2), [.. current, .. replacement])).AssertGood();
        Assert.Equal(replacement, await lu.ReadAsync(nexus, 30, 2));
    }

    [Fact]
    public async Task Compare_and_write_miscompare_reports_the_offset_of_the_first_differing_byte_and_leaves_the_medium()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var current = LuHarness.Pattern(1024, 7);
        await lu.WriteAsync(nexus, 30, current);
        var compare = current.ToArray();
        compare[612] ^= 0x01;   // second block, byte 100
        compare[900] ^= 0x01;
        var result = await lu.RunAsync(nexus, Cdb.CompareAndWrite(30, 2), [.. compare, .. LuHarness.Pattern(1024, 8)]);
        result.AssertSense(SenseKey.Miscompare, 0x1D, 0x00);
        Assert.Equal(0xF0, result.Sense[0]);                                               // VALID: the INFORMATION field is set
        Assert.Equal(612u, BinaryPrimitives.ReadUInt32BigEndian(result.Sense.AsSpan(3)));  // offset into the Data-Out buffer
        Assert.Equal(current, await lu.ReadAsync(nexus, 30, 2));
    }

    [Fact]
    public async Task Compare_and_write_miscompare_in_descriptor_format_carries_the_information_descriptor()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        await ModePageTests.SetControlPageAsync(lu, nexus, dsense: true, swp: false);
        var result = await lu.RunAsync(nexus, Cdb.CompareAndWrite(0, 1), [.. Enumerable.Repeat((byte)0xAB, 512), .. new byte[512]]);
        result.AssertSense(SenseKey.Miscompare, 0x1D, 0x00);
        Assert.True(result.DescriptorFormat);
        Assert.Equal(0x00, result.Sense[8]);   // information descriptor
        Assert.Equal(0x80, result.Sense[10]);  // VALID
        Assert.Equal(0ul, BinaryPrimitives.ReadUInt64BigEndian(result.Sense.AsSpan(12)));
    }

    [Fact]
    public async Task Compare_and_write_needs_exactly_twice_the_blocks_of_data_out()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var result = await lu.RunAsync(nexus, Cdb.CompareAndWrite(0, 1), new byte[512], expectedTransferLength: 512);
        result.AssertSense(SenseCode.InvalidFieldInCdb);
        Assert.Equal(13, BinaryPrimitives.ReadUInt16BigEndian(result.Sense.AsSpan(16)));
    }

    [Fact]
    public async Task Compare_and_write_refuses_more_blocks_than_its_maximum_and_ranges_past_the_end()
    {
        await using var lu = LuHarness.Create(options: new LogicalUnitOptions { MaxCompareAndWriteBlocks = 1 });
        var nexus = await lu.ReadyNexusAsync(Initiator);
        (await lu.RunAsync(nexus, Cdb.CompareAndWrite(0, 2), new byte[2048])).AssertSense(SenseCode.InvalidFieldInCdb);
        (await lu.RunAsync(nexus, Cdb.CompareAndWrite((ulong)lu.BlockCount, 1), new byte[1024])).AssertSense(SenseCode.LbaOutOfRange);
    }

    [Fact]
    public async Task Compare_and_write_with_zero_blocks_is_good_and_changes_nothing()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        (await lu.RunAsync(nexus, Cdb.CompareAndWrite(0, 0))).AssertGood();
        Assert.Equal(0, lu.Device.AllocatedBytes);
    }

    // ---------------------------------------------------------------- VERIFY, WRITE AND VERIFY, ORWRITE, WRITE ATOMIC

    [Fact]
    public async Task Verify_with_bytchk_1_compares_the_data_out_with_the_medium()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var data = LuHarness.Pattern(2048, 10);
        await lu.WriteAsync(nexus, 40, data);
        (await lu.RunAsync(nexus, ScsiCdb.Verify10(40, 4, byteCheck: 1), data)).AssertGood();

        var different = data.ToArray();
        different[1500] ^= 0xFF;
        (await lu.RunAsync(nexus, ScsiCdb.Verify10(40, 4, byteCheck: 1), different)).AssertSense(SenseKey.Miscompare, 0x1D, 0x00);
        Assert.Equal(data, await lu.ReadAsync(nexus, 40, 4));
    }

    [Fact]
    public async Task Verify_with_bytchk_3_compares_one_block_against_every_block()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var block = LuHarness.Pattern(512, 11);
        await lu.WriteAsync(nexus, 50, [.. block, .. block, .. block]);
        (await lu.RunAsync(nexus, ScsiCdb.Verify10(50, 3, byteCheck: 3), block)).AssertGood();
        (await lu.RunAsync(nexus, ScsiCdb.Verify10(50, 4, byteCheck: 3), block)).AssertSense(SenseKey.Miscompare, 0x1D, 0x00);
    }

    [Fact]
    public async Task Verify_without_bytchk_checks_the_medium_and_bytchk_2_is_refused()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        (await lu.RunAsync(nexus, ScsiCdb.Verify10(0, 16, byteCheck: 0))).AssertGood();
        (await lu.RunAsync(nexus, ScsiCdb.Verify10(0, 1, byteCheck: 2), new byte[512])).AssertSense(SenseCode.InvalidFieldInCdb);
        (await lu.RunAsync(nexus, ScsiCdb.Verify10((uint)lu.BlockCount, 1, byteCheck: 0))).AssertSense(SenseCode.LbaOutOfRange);
    }

    [Fact]
    public async Task Write_and_verify_writes_the_data()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var data = LuHarness.Pattern(1536, 12);
        byte[] cdb = [0x2E, 0x02, 0, 0, 0, 60, 0, 0, 3, 0];   // WRITE AND VERIFY(10), BYTCHK=1, LBA 60, 3 blocks
        (await lu.RunAsync(nexus, cdb, data)).AssertGood();
        Assert.Equal(data, await lu.ReadAsync(nexus, 60, 3));
    }

    [Fact]
    public async Task Orwrite_ors_the_data_into_the_medium()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var current = LuHarness.Pattern(1024, 13);
        var mask = LuHarness.Pattern(1024, 14);
        await lu.WriteAsync(nexus, 70, current);
        var cdb = Cdb.Read16(70, 2);
        cdb[0] = 0x8B;   // ORWRITE(16)
        (await lu.RunAsync(nexus, cdb, mask)).AssertGood();
        Assert.Equal(current.Zip(mask, (a, b) => (byte)(a | b)).ToArray(), await lu.ReadAsync(nexus, 70, 2));
    }

    [Fact]
    public async Task Write_atomic_writes_the_data()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var data = LuHarness.Pattern(4096, 15);
        var cdb = new byte[16];
        cdb[0] = 0x9C;
        BinaryPrimitives.WriteUInt64BigEndian(cdb.AsSpan(2), 80);
        BinaryPrimitives.WriteUInt16BigEndian(cdb.AsSpan(12), 8);
        (await lu.RunAsync(nexus, cdb, data)).AssertGood();
        Assert.Equal(data, await lu.ReadAsync(nexus, 80, 8));

        BinaryPrimitives.WriteUInt16BigEndian(cdb.AsSpan(12), 257);   // beyond MAXIMUM ATOMIC TRANSFER LENGTH (256)
        (await lu.RunAsync(nexus, cdb, new byte[257 * 512])).AssertSense(SenseCode.InvalidFieldInCdb);
    }
}
