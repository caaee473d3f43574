using System.Buffers.Binary;
using ISCSISnap.Target.Scsi;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary>MODE SENSE / MODE SELECT (SPC-4 §6.11-6.14, §7.5; SBC-3 §6.4: caching, control, informational exceptions).</summary>
public sealed class ModePageTests
{
    private const string Initiator = "iqn.2026-11.test:mode";

    /// <summary>MODE SELECT(6) of the control mode page with the given D_SENSE and SWP.</summary>
    internal static async Task SetControlPageAsync(LuHarness lu, ItNexus nexus, bool dsense, bool swp)
    {
        byte[] parameters = [0, 0, 0, 0, 0x0A, 0x0A, (byte)(dsense ? 0x04 : 0), 0, (byte)(swp ? 0x08 : 0), 0, 0, 0, 0, 0, 0, 0];
        (await lu.RunAsync(nexus, ScsiCdb.ModeSelect6(parameters.Length), parameters)).AssertGood();
    }

    private static byte[] CachingPage(bool wce) => [0x08, 0x12, (byte)(wce ? 0x04 : 0), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

    private static async Task<byte[]> SenseAsync(LuHarness lu, ItNexus nexus, byte[] cdb)
    {
        var result = await lu.RunAsync(nexus, cdb);
        result.AssertGood();
        return result.DataIn;
    }

    // ---------------------------------------------------------------- MODE SENSE layouts

    [Fact]
    public async Task Mode_sense6_caching_page_with_block_descriptor()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var d = await SenseAsync(lu, nexus, ScsiCdb.ModeSense6(0x08));
        Assert.Equal(4 + 8 + 20, d.Length);
        Assert.Equal(d.Length - 1, d[0]);     // MODE DATA LENGTH excludes itself
        Assert.Equal(0x00, d[1]);             // medium type
        Assert.Equal(0x10, d[2]);             // WP=0, DPOFUA=1
        Assert.Equal(8, d[3]);                // BLOCK DESCRIPTOR LENGTH
        Assert.Equal(0, d[4]);                // density code
        Assert.Equal(32768, (d[5] << 16) | (d[6] << 8) | d[7]);
        Assert.Equal(512, (d[9] << 16) | (d[10] << 8) | d[11]);
        Assert.Equal(CachingPage(wce: true), d[12..]);
    }

    [Fact]
    public async Task Mode_sense6_with_dbd_has_no_block_descriptor()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var d = await SenseAsync(lu, nexus, ScsiCdb.ModeSense6(0x08, dbd: true));
        Assert.Equal(4 + 20, d.Length);
        Assert.Equal(23, d[0]);
        Assert.Equal(0, d[3]);
        Assert.Equal(0x08, d[4]);
    }

    [Fact]
    public async Task Mode_sense6_caps_the_block_count_at_ffffff()
    {
        await using var lu = LuHarness.Create(bytes: 8L << 30);   // 2^24 blocks: one more than the field holds
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var d = await SenseAsync(lu, nexus, ScsiCdb.ModeSense6(0x08));
        Assert.Equal(0xFFFFFF, (d[5] << 16) | (d[6] << 8) | d[7]);
        var ten = await SenseAsync(lu, nexus, ScsiCdb.ModeSense10(0x08));
        Assert.Equal(1u << 24, BinaryPrimitives.ReadUInt32BigEndian(ten.AsSpan(8)));
    }

    [Fact]
    public async Task Mode_sense10_all_pages_lists_every_page_in_order()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var d = await SenseAsync(lu, nexus, ScsiCdb.ModeSense10(0x3F, dbd: true));
        Assert.Equal(8 + 12 + 20 + 12 + 12, d.Length);
        Assert.Equal(d.Length - 2, BinaryPrimitives.ReadUInt16BigEndian(d));
        Assert.Equal(0x10, d[3]);
        Assert.Equal(0, d[4]);                                       // LONGLBA
        Assert.Equal(0, BinaryPrimitives.ReadUInt16BigEndian(d.AsSpan(6)));
        var pages = new List<(byte Code, byte Length)>();
        for (int offset = 8; offset < d.Length; offset += d[offset + 1] + 2)
            pages.Add(((byte)(d[offset] & 0x3F), d[offset + 1]));
        Assert.Equal([(0x01, 0x0A), (0x08, 0x12), (0x0A, 0x0A), (0x1C, 0x0A)], pages);
        Assert.Equal(0x08, d[8 + 12 + 20 + 12 + 2]);                 // informational exceptions: DEXCPT
    }

    [Fact]
    public async Task Mode_sense6_all_pages_with_subpage_ff_is_accepted()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var d = await SenseAsync(lu, nexus, ScsiCdb.ModeSense6(0x3F, dbd: true, subpage: 0xFF));
        Assert.Equal(4 + 56, d.Length);
    }

    [Fact]
    public async Task Mode_sense10_short_and_long_lba_block_descriptors()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);

        var shortForm = await SenseAsync(lu, nexus, ScsiCdb.ModeSense10(0x0A));
        Assert.Equal(8 + 8 + 12, shortForm.Length);
        Assert.Equal(8, BinaryPrimitives.ReadUInt16BigEndian(shortForm.AsSpan(6)));
        Assert.Equal(0, shortForm[4] & 0x01);
        Assert.Equal(32768u, BinaryPrimitives.ReadUInt32BigEndian(shortForm.AsSpan(8)));
        Assert.Equal(512, (shortForm[13] << 16) | (shortForm[14] << 8) | shortForm[15]);
        Assert.Equal(0x0A, shortForm[16]);

        var longForm = await SenseAsync(lu, nexus, ScsiCdb.ModeSense10(0x0A, llbaa: true));
        Assert.Equal(8 + 16 + 12, longForm.Length);
        Assert.Equal(0x01, longForm[4] & 0x01);                       // LONGLBA
        Assert.Equal(16, BinaryPrimitives.ReadUInt16BigEndian(longForm.AsSpan(6)));
        Assert.Equal(32768ul, BinaryPrimitives.ReadUInt64BigEndian(longForm.AsSpan(8)));
        Assert.Equal(512u, BinaryPrimitives.ReadUInt32BigEndian(longForm.AsSpan(8 + 12)));
        Assert.Equal(0x0A, longForm[24]);

        var longNoDescriptor = await SenseAsync(lu, nexus, ScsiCdb.ModeSense10(0x0A, dbd: true, llbaa: true));
        Assert.Equal(0, longNoDescriptor[4] & 0x01);                  // no descriptor: LONGLBA clear
        Assert.Equal(8 + 12, longNoDescriptor.Length);
    }

    [Fact]
    public async Task Changeable_values_mark_exactly_wce_d_sense_and_swp()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var d = await SenseAsync(lu, nexus, ScsiCdb.ModeSense10(0x3F, pageControl: 1, dbd: true));
        var rwErrorRecovery = d[8..20];
        var caching = d[20..40];
        var control = d[40..52];
        var exceptions = d[52..64];
        Assert.All(rwErrorRecovery[2..], b => Assert.Equal(0, b));
        Assert.Equal(CachingPage(wce: true), caching);
        Assert.Equal(new byte[] { 0x0A, 0x0A, 0x04, 0, 0x08, 0, 0, 0, 0, 0, 0, 0 }, control);
        Assert.All(exceptions[2..], b => Assert.Equal(0, b));
    }

    [Fact]
    public async Task Default_values_stay_while_current_values_change()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        byte[] parameters = [0, 0, 0, 0, .. CachingPage(wce: false)];
        (await lu.RunAsync(nexus, ScsiCdb.ModeSelect6(parameters.Length), parameters)).AssertGood();
        Assert.Equal(0, (await SenseAsync(lu, nexus, ScsiCdb.ModeSense6(0x08, pageControl: 0, dbd: true)))[6]);
        Assert.Equal(0x04, (await SenseAsync(lu, nexus, ScsiCdb.ModeSense6(0x08, pageControl: 2, dbd: true)))[6]);
    }

    [Fact]
    public async Task Saved_values_are_not_supported()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        (await lu.RunAsync(nexus, ScsiCdb.ModeSense6(0x08, pageControl: 3))).AssertSense(SenseKey.IllegalRequest, 0x39, 0x00);
    }

    [Theory]
    [InlineData(0x19)]
    [InlineData(0x00)]
    [InlineData(0x02)]
    public async Task An_unsupported_page_is_invalid_field_in_cdb_pointing_at_the_page_code(byte page)
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var result = await lu.RunAsync(nexus, ScsiCdb.ModeSense6(page));
        result.AssertSense(SenseCode.InvalidFieldInCdb);
        Assert.Equal(0x80 | 0x40 | 0x08 | 5, result.Sense[15]);
        Assert.Equal(2, BinaryPrimitives.ReadUInt16BigEndian(result.Sense.AsSpan(16)));
    }

    [Fact]
    public async Task A_short_allocation_length_truncates_but_keeps_the_full_mode_data_length()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var d = await SenseAsync(lu, nexus, ScsiCdb.ModeSense6(0x08, allocation: 4));
        Assert.Equal(new byte[] { 31, 0, 0x10, 8 }, d);
    }

    [Fact]
    public async Task A_read_only_unit_sets_wp()
    {
        await using var lu = LuHarness.Create(options: new LogicalUnitOptions { ReadOnly = true });
        var nexus = await lu.ReadyNexusAsync(Initiator);
        Assert.Equal(0x90, (await SenseAsync(lu, nexus, ScsiCdb.ModeSense6(0x08)))[2]);
        Assert.Equal(0x90, (await SenseAsync(lu, nexus, ScsiCdb.ModeSense10(0x08)))[3]);
    }

    // ---------------------------------------------------------------- MODE SELECT

    [Fact]
    public async Task Mode_select_changes_wce_and_raises_mode_parameters_changed_only_for_other_nexuses()
    {
        await using var lu = LuHarness.Create();
        var a = await lu.ReadyNexusAsync("iqn.2026-11.test:a");
        var b = await lu.ReadyNexusAsync("iqn.2026-11.test:b");
        byte[] parameters = [0, 0, 0, 0, .. CachingPage(wce: false)];
        (await lu.RunAsync(a, ScsiCdb.ModeSelect6(parameters.Length), parameters)).AssertGood();

        Assert.Equal(0, (await SenseAsync(lu, a, ScsiCdb.ModeSense6(0x08, dbd: true)))[6]);
        (await lu.RunAsync(a, Cdb.TestUnitReady())).AssertGood();
        (await lu.RunAsync(b, Cdb.TestUnitReady())).AssertSense(SenseKey.UnitAttention, 0x2A, 0x01);
        (await lu.RunAsync(b, Cdb.TestUnitReady())).AssertGood();

        // Writes still work with the cache off (each is made durable before GOOD).
        var data = LuHarness.Pattern(1024, 1);
        (await lu.RunAsync(b, Cdb.Write10(0, 2), data)).AssertGood();
        Assert.Equal(data, await lu.ReadAsync(a, 0, 2));
    }

    [Fact]
    public async Task Mode_select_that_changes_nothing_raises_no_unit_attention()
    {
        await using var lu = LuHarness.Create();
        var a = await lu.ReadyNexusAsync("iqn.2026-11.test:a");
        var b = await lu.ReadyNexusAsync("iqn.2026-11.test:b");
        byte[] parameters = [0, 0, 0, 0, .. CachingPage(wce: true)];
        (await lu.RunAsync(a, ScsiCdb.ModeSelect6(parameters.Length), parameters)).AssertGood();
        (await lu.RunAsync(b, Cdb.TestUnitReady())).AssertGood();
    }

    [Fact]
    public async Task Mode_select10_with_a_block_descriptor_that_restates_the_geometry()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        byte[] header = [0, 0, 0, 0, 0, 0, 0, 8];
        byte[] descriptor = [0, 0, 0x80, 0, 0, 0, 0x02, 0x00];   // 32768 blocks of 512 bytes
        byte[] parameters = [.. header, .. descriptor, .. CachingPage(wce: false)];
        (await lu.RunAsync(nexus, ScsiCdb.ModeSelect10(parameters.Length), parameters)).AssertGood();
        Assert.Equal(0, (await SenseAsync(lu, nexus, ScsiCdb.ModeSense10(0x08, dbd: true)))[10]);

        descriptor[6] = 0x10;   // 4096-byte blocks: the geometry cannot change
        parameters = [.. header, .. descriptor, .. CachingPage(wce: true)];
        var refused = await lu.RunAsync(nexus, ScsiCdb.ModeSelect10(parameters.Length), parameters);
        refused.AssertSense(SenseCode.InvalidFieldInParameterList);
        Assert.Equal(0x80, refused.Sense[15] & 0xC0);   // SKSV, C/D=0: a parameter-list byte
        Assert.Equal(8 + 5, BinaryPrimitives.ReadUInt16BigEndian(refused.Sense.AsSpan(16)));
        Assert.Equal(0, (await SenseAsync(lu, nexus, ScsiCdb.ModeSense10(0x08, dbd: true)))[10]);   // unchanged
    }

    [Theory]
    [InlineData(2, 0x01)]   // RCD
    [InlineData(2, 0x80)]   // IC
    [InlineData(12, 0x20)]  // FSW/LBCSS/DRA/NV_DIS byte
    public async Task Mode_select_refuses_changes_to_bits_that_are_not_changeable(int pageByte, byte bit)
    {
        await using var lu = LuHarness.Create();
        var a = await lu.ReadyNexusAsync("iqn.2026-11.test:a");
        var b = await lu.ReadyNexusAsync("iqn.2026-11.test:b");
        var page = CachingPage(wce: false);
        page[pageByte] |= bit;
        byte[] parameters = [0, 0, 0, 0, .. page];
        var result = await lu.RunAsync(a, ScsiCdb.ModeSelect6(parameters.Length), parameters);
        result.AssertSense(SenseCode.InvalidFieldInParameterList);
        Assert.Equal(0x80, result.Sense[15]);
        Assert.Equal(4 + pageByte, BinaryPrimitives.ReadUInt16BigEndian(result.Sense.AsSpan(16)));
        // All or nothing: the changeable WCE bit in the same page was not applied either, and nobody was told.
        Assert.Equal(0x04, (await SenseAsync(lu, a, ScsiCdb.ModeSense6(0x08, dbd: true)))[6]);
        (await lu.RunAsync(b, Cdb.TestUnitReady())).AssertGood();
    }

    [Fact]
    public async Task Mode_select_refuses_a_wrong_page_length_and_an_unknown_page()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        byte[] shortPage = [0, 0, 0, 0, 0x08, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        var result = await lu.RunAsync(nexus, ScsiCdb.ModeSelect6(shortPage.Length), shortPage);
        result.AssertSense(SenseCode.InvalidFieldInParameterList);
        Assert.Equal(5, BinaryPrimitives.ReadUInt16BigEndian(result.Sense.AsSpan(16)));

        byte[] unknown = [0, 0, 0, 0, 0x19, 0x02, 0, 0];
        var refused = await lu.RunAsync(nexus, ScsiCdb.ModeSelect6(unknown.Length), unknown);
        refused.AssertSense(SenseCode.InvalidFieldInParameterList);
        Assert.Equal(4, BinaryPrimitives.ReadUInt16BigEndian(refused.Sense.AsSpan(16)));
    }

    [Fact]
    public async Task Mode_select_refuses_save_pages_and_vendor_page_format()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        byte[] parameters = [0, 0, 0, 0, .. CachingPage(wce: false)];
        var save = await lu.RunAsync(nexus, ScsiCdb.ModeSelect6(parameters.Length, savePages: true), parameters);
        save.AssertSense(SenseCode.InvalidFieldInCdb);
        Assert.Equal(0x80 | 0x40 | 0x08 | 0, save.Sense[15]);
        var vendor = await lu.RunAsync(nexus, ScsiCdb.ModeSelect6(parameters.Length, pageFormat: false), parameters);
        vendor.AssertSense(SenseCode.InvalidFieldInCdb);
        Assert.Equal(0x04, (await SenseAsync(lu, nexus, ScsiCdb.ModeSense6(0x08, dbd: true)))[6]);
    }

    [Fact]
    public async Task Mode_select_with_a_truncated_parameter_list_is_a_parameter_list_length_error()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        byte[] parameters = [0, 0, 0, 8, 0, 0];   // announces an 8-byte block descriptor that is not there
        (await lu.RunAsync(nexus, ScsiCdb.ModeSelect6(parameters.Length), parameters)).AssertSense(SenseKey.IllegalRequest, 0x1A, 0x00);
    }

    // ---------------------------------------------------------------- D_SENSE and SWP

    [Fact]
    public async Task D_sense_switches_sense_data_to_descriptor_format_and_back()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        await SetControlPageAsync(lu, nexus, dsense: true, swp: false);
        Assert.Equal(0x04, (await SenseAsync(lu, nexus, ScsiCdb.ModeSense6(0x0A, dbd: true)))[6]);

        var result = await lu.RunAsync(nexus, Cdb.Read10((uint)lu.BlockCount, 1));
        Assert.True(result.DescriptorFormat);
        Assert.Equal(new byte[] { 0x72, 0x05, 0x21, 0x00 }, result.Sense[..4]);
        Assert.Equal(result.Sense.Length - 8, result.Sense[7]);

        var field = await lu.RunAsync(nexus, ScsiCdb.ModeSense6(0x19));
        Assert.True(field.DescriptorFormat);
        Assert.Equal(16, field.Sense.Length);   // with a sense key specific descriptor
        Assert.Equal(0x02, field.Sense[8]);
        Assert.Equal(2, BinaryPrimitives.ReadUInt16BigEndian(field.Sense.AsSpan(13)));

        await SetControlPageAsync(lu, nexus, dsense: false, swp: false);
        var back = await lu.RunAsync(nexus, Cdb.Read10((uint)lu.BlockCount, 1));
        Assert.False(back.DescriptorFormat);
        Assert.Equal(0x70, back.Sense[0]);
        back.AssertSense(SenseCode.LbaOutOfRange);
    }

    [Fact]
    public async Task D_sense_also_formats_unit_attentions_of_other_nexuses()
    {
        await using var lu = LuHarness.Create();
        var a = await lu.ReadyNexusAsync("iqn.2026-11.test:a");
        var b = await lu.ReadyNexusAsync("iqn.2026-11.test:b");
        await SetControlPageAsync(lu, a, dsense: true, swp: false);
        var ua = await lu.RunAsync(b, Cdb.TestUnitReady());
        Assert.Equal(new byte[] { 0x72, 0x06, 0x2A, 0x01, 0, 0, 0, 0 }, ua.Sense);
    }

    [Fact]
    public async Task Software_write_protect_fails_writes_with_data_protect_27_02_until_cleared()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        var before = LuHarness.Pattern(512, 2);
        await lu.WriteAsync(nexus, 0, before);
        await SetControlPageAsync(lu, nexus, dsense: false, swp: true);

        (await lu.RunAsync(nexus, Cdb.Write10(0, 1), new byte[512])).AssertSense(SenseKey.DataProtect, 0x27, 0x02);
        (await lu.RunAsync(nexus, Cdb.Write16(0, 1), new byte[512])).AssertSense(SenseKey.DataProtect, 0x27, 0x02);
        (await lu.RunAsync(nexus, ScsiCdb.WriteSame16(0, 8), new byte[512])).AssertSense(SenseKey.DataProtect, 0x27, 0x02);
        var unmap = ScsiCdb.UnmapParameters((0, 8));
        (await lu.RunAsync(nexus, ScsiCdb.Unmap(unmap.Length), unmap)).AssertSense(SenseKey.DataProtect, 0x27, 0x02);
        Assert.Equal(0x90, (await SenseAsync(lu, nexus, ScsiCdb.ModeSense6(0x0A)))[2]);   // WP now set
        Assert.Equal(before, await lu.ReadAsync(nexus, 0, 1));

        await SetControlPageAsync(lu, nexus, dsense: false, swp: false);
        (await lu.RunAsync(nexus, Cdb.Write10(0, 1), new byte[512])).AssertGood();
        Assert.Equal(0x10, (await SenseAsync(lu, nexus, ScsiCdb.ModeSense6(0x0A)))[2]);
    }

    [Fact]
    public async Task Logical_unit_reset_restores_the_default_mode_parameters()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync(Initiator);
        await SetControlPageAsync(lu, nexus, dsense: true, swp: true);
        lu.Unit.Reset();
        (await lu.RunAsync(nexus, Cdb.TestUnitReady())).AssertSense(SenseCode.PowerOnResetOccurred);
        var control = await SenseAsync(lu, nexus, ScsiCdb.ModeSense6(0x0A, dbd: true));
        Assert.Equal(0, control[6]);
        Assert.Equal(0, control[8]);
        (await lu.RunAsync(nexus, Cdb.Write10(0, 1), new byte[512])).AssertGood();
    }
}
