using System.Buffers.Binary;
using ISCSISnap.Target.Scsi;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary>
/// <see cref="CommandTable"/> consistency (SPC-4 §4.2.5 CDB groups, service actions in byte 1) and REPORT SUPPORTED
/// OPERATION CODES (SPC-4 §6.35), which answers from the same table.
/// </summary>
public sealed class CommandTableTests
{
    public static TheoryData<string> Commands()
    {
        var data = new TheoryData<string>();
        foreach (var info in CommandTable.All) data.Add(info.Name);
        return data;
    }

    private static CommandInfo Named(string name) => CommandTable.All.Single(c => c.Name == name);

    [Theory]
    [MemberData(nameof(Commands))]
    public void Usage_data_starts_with_the_opcode_and_ends_with_a_control_byte_without_naca_or_link(string name)
    {
        var info = Named(name);
        Assert.Equal(info.Opcode, info.Usage[0]);
        Assert.Equal(0, info.Usage[^1] & 0x05);
    }

    [Theory]
    [MemberData(nameof(Commands))]
    public void Cdb_length_matches_the_opcode_group(string name)
    {
        var info = Named(name);
        int expected = (info.Opcode >> 5) switch
        {
            0 => 6,
            1 or 2 => 10,
            4 => 16,
            5 => 12,
            _ => -1,   // groups 3, 6 and 7 have no fixed length: none belongs in this table
        };
        Assert.Equal(expected, info.CdbLength);
    }

    [Theory]
    [MemberData(nameof(Commands))]
    public void Service_action_entries_carry_the_service_action_in_byte_1(string name)
    {
        var info = Named(name);
        Assert.Equal(info.HasServiceAction, CommandTable.HasServiceActions(info.Opcode));
        if (info.HasServiceAction) Assert.Equal(info.ServiceAction, info.Usage[1] & 0x1F);
        else Assert.Equal(0, info.ServiceAction);
    }

    [Theory]
    [MemberData(nameof(Commands))]
    public void Lookup_of_the_usage_data_finds_the_entry(string name)
    {
        var info = Named(name);
        var cdb = new byte[info.CdbLength];
        cdb[0] = info.Opcode;
        cdb[1] = (byte)(info.HasServiceAction ? info.ServiceAction : 0);
        Assert.Same(info, CommandTable.Lookup(cdb, out bool known));
        Assert.True(known);
        Assert.Same(info, CommandTable.Find(info.Opcode, info.ServiceAction));
    }

    [Fact]
    public void Opcode_and_service_action_pairs_are_unique_and_every_opcode_has_one_layout()
    {
        Assert.Equal(CommandTable.All.Count, CommandTable.All.Select(c => (c.Opcode, c.ServiceAction)).Distinct().Count());
        Assert.Equal(CommandTable.All.Count, CommandTable.All.Select(c => c.Name).Distinct().Count());
        foreach (var group in CommandTable.All.GroupBy(c => c.Opcode))
        {
            Assert.Single(group.Select(c => c.HasServiceAction).Distinct());
            Assert.Single(group.Select(c => c.CdbLength).Distinct());
            Assert.True(group.Count() == 1 || group.First().HasServiceAction, $"opcode {group.Key:X2} listed twice without service actions");
        }
    }

    [Theory]
    [InlineData(0x07)]   // REASSIGN BLOCKS
    [InlineData(0x48)]   // SANITIZE
    [InlineData(0xC0)]   // vendor specific
    [InlineData(0x7F)]   // variable-length CDBs
    public void An_unknown_opcode_is_not_known(byte opcode)
    {
        var cdb = new byte[16];
        cdb[0] = opcode;
        Assert.Null(CommandTable.Lookup(cdb, out bool known));
        Assert.False(known);
    }

    [Theory]
    [InlineData(0x9E, 0x11)]   // SERVICE ACTION IN(16) without that action
    [InlineData(0x5E, 0x04)]
    [InlineData(0x5F, 0x08)]
    [InlineData(0xA3, 0x05)]
    public void An_unknown_service_action_of_a_known_opcode_is_known_opcode(byte opcode, byte serviceAction)
    {
        var cdb = new byte[16];
        cdb[0] = opcode;
        cdb[1] = serviceAction;
        Assert.Null(CommandTable.Lookup(cdb, out bool known));
        Assert.True(known);
    }

    [Fact]
    public void Service_action_bits_above_bit_4_do_not_change_the_lookup()
    {
        byte[] cdb = [0x9E, 0xE0 | 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0];
        Assert.Equal("READ CAPACITY(16)", CommandTable.Lookup(cdb, out _)!.Name);
    }

    [Fact]
    public void Reservation_classes_follow_spc4_for_core_commands()
    {
        Assert.Equal(ReservationClass.Read, Named("READ(10)").Reservation);
        Assert.Equal(ReservationClass.Write, Named("WRITE(10)").Reservation);
        Assert.Equal(ReservationClass.Allowed, Named("INQUIRY").Reservation);
        Assert.Equal(ReservationClass.Allowed, Named("REPORT LUNS").Reservation);
        Assert.Equal(ReservationClass.LegacyReservation, Named("RESERVE(6)").Reservation);
        Assert.True(Named("INQUIRY").ExemptFromUnitAttention);
        Assert.True(Named("REPORT LUNS").ExemptFromUnitAttention);
        Assert.True(Named("REQUEST SENSE").ExemptFromUnitAttention);
        Assert.False(Named("TEST UNIT READY").ExemptFromUnitAttention);
        Assert.False(Named("READ(10)").ExemptFromUnitAttention);
    }

    // ---------------------------------------------------------------- the logical unit implements the table

    [Theory]
    [MemberData(nameof(Commands))]
    public async Task Every_listed_command_is_implemented_by_the_logical_unit(string name)
    {
        var info = Named(name);
        await using var lu = LuHarness.Create(bytes: 1 << 20);
        var nexus = await lu.ReadyNexusAsync("iqn.2026-11.test:table");
        var cdb = new byte[info.CdbLength];
        cdb[0] = info.Opcode;
        cdb[1] = (byte)(info.HasServiceAction ? info.ServiceAction : 0);
        var result = await lu.RunAsync(nexus, cdb);
        Assert.False(result.Status == ScsiStatus.CheckCondition && result.Asc == 0x20,
            $"{name} is listed but the logical unit answers INVALID COMMAND OPERATION CODE");
    }

    [Fact]
    public async Task Unknown_opcode_and_unknown_service_action_get_their_own_sense()
    {
        await using var lu = LuHarness.Create(bytes: 1 << 20);
        var nexus = await lu.ReadyNexusAsync("iqn.2026-11.test:table");

        var opcode = await lu.RunAsync(nexus, [0xC0, 0, 0, 0, 0, 0]);
        opcode.AssertSense(SenseKey.IllegalRequest, 0x20, 0x00);
        Assert.Equal(0x80 | 0x40 | 0x08 | 7, opcode.Sense[15]);   // field pointer: CDB byte 0, bit 7
        Assert.Equal(0, BinaryPrimitives.ReadUInt16BigEndian(opcode.Sense.AsSpan(16)));

        var action = await lu.RunAsync(nexus, [0x9E, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]);
        action.AssertSense(SenseKey.IllegalRequest, 0x24, 0x00);
        Assert.Equal(0x80 | 0x40 | 0x08 | 4, action.Sense[15]);   // CDB byte 1, bit 4: the SERVICE ACTION field
        Assert.Equal(1, BinaryPrimitives.ReadUInt16BigEndian(action.Sense.AsSpan(16)));
    }

    // ---------------------------------------------------------------- REPORT SUPPORTED OPERATION CODES

    [Theory]
    [InlineData(0x28)]   // READ(10)
    [InlineData(0x2A)]   // WRITE(10)
    [InlineData(0x12)]   // INQUIRY
    [InlineData(0x89)]   // COMPARE AND WRITE
    [InlineData(0xA0)]   // REPORT LUNS
    public async Task One_command_format_returns_the_cdb_usage_data(byte opcode)
    {
        await using var lu = LuHarness.Create(bytes: 1 << 20);
        var nexus = await lu.ReadyNexusAsync("iqn.2026-11.test:rsoc");
        var info = CommandTable.Find(opcode, 0)!;
        var result = await lu.RunAsync(nexus, ScsiCdb.ReportSupportedOperationCodes(1, opcode));
        result.AssertGood();
        Assert.Equal(4 + info.CdbLength, result.DataIn.Length);
        Assert.Equal(0, result.DataIn[0]);
        Assert.Equal(0x03, result.DataIn[1]);   // CTDP=0, SUPPORT=011b: supported in conformance with the standard
        Assert.Equal(info.CdbLength, BinaryPrimitives.ReadUInt16BigEndian(result.DataIn.AsSpan(2)));
        Assert.Equal(info.Usage, result.DataIn[4..]);
        Assert.Equal(opcode, result.DataIn[4]);
    }

    [Fact]
    public async Task One_command_format_for_read10_matches_sbc3()
    {
        await using var lu = LuHarness.Create(bytes: 1 << 20);
        var nexus = await lu.ReadyNexusAsync("iqn.2026-11.test:rsoc");
        var result = await lu.RunAsync(nexus, ScsiCdb.ReportSupportedOperationCodes(1, 0x28));
        result.AssertGood();
        // 00 03 00 0A, then READ(10) usage: DPO|FUA|FUA_NV (no RDPROTECT: no protection information), LBA, group, length, control.
        Assert.Equal(new byte[] { 0x00, 0x03, 0x00, 0x0A, 0x28, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x00 }, result.DataIn);
    }

    [Fact]
    public async Task One_command_format_with_service_action_reports_the_service_action()
    {
        await using var lu = LuHarness.Create(bytes: 1 << 20);
        var nexus = await lu.ReadyNexusAsync("iqn.2026-11.test:rsoc");
        var result = await lu.RunAsync(nexus, ScsiCdb.ReportSupportedOperationCodes(2, 0x9E, 0x10));
        result.AssertGood();
        Assert.Equal(0x03, result.DataIn[1] & 0x07);
        Assert.Equal(16, BinaryPrimitives.ReadUInt16BigEndian(result.DataIn.AsSpan(2)));
        Assert.Equal(0x9E, result.DataIn[4]);
        Assert.Equal(0x10, result.DataIn[5] & 0x1F);
    }

    [Fact]
    public async Task One_command_format_refuses_an_opcode_with_service_actions_and_vice_versa()
    {
        await using var lu = LuHarness.Create(bytes: 1 << 20);
        var nexus = await lu.ReadyNexusAsync("iqn.2026-11.test:rsoc");
        (await lu.RunAsync(nexus, ScsiCdb.ReportSupportedOperationCodes(1, 0x9E))).AssertSense(SenseCode.InvalidFieldInCdb);
        (await lu.RunAsync(nexus, ScsiCdb.ReportSupportedOperationCodes(2, 0x28))).AssertSense(SenseCode.InvalidFieldInCdb);
    }

    [Theory]
    [InlineData(1, 0x07, 0)]     // REASSIGN BLOCKS
    [InlineData(2, 0x9E, 0x11)]  // an unsupported service action
    [InlineData(3, 0x28, 5)]     // a service action for an opcode that has none
    public async Task Unsupported_commands_report_support_001b(byte options, byte opcode, ushort serviceAction)
    {
        await using var lu = LuHarness.Create(bytes: 1 << 20);
        var nexus = await lu.ReadyNexusAsync("iqn.2026-11.test:rsoc");
        var result = await lu.RunAsync(nexus, ScsiCdb.ReportSupportedOperationCodes(options, opcode, serviceAction));
        result.AssertGood();
        Assert.Equal(0x01, result.DataIn[1] & 0x07);
        Assert.Equal(0, BinaryPrimitives.ReadUInt16BigEndian(result.DataIn.AsSpan(2)));
    }

    [Fact]
    public async Task One_command_format_with_timeouts_appends_the_timeouts_descriptor()
    {
        await using var lu = LuHarness.Create(bytes: 1 << 20);
        var nexus = await lu.ReadyNexusAsync("iqn.2026-11.test:rsoc");
        var result = await lu.RunAsync(nexus, ScsiCdb.ReportSupportedOperationCodes(1, 0x04, timeouts: true));   // FORMAT UNIT
        result.AssertGood();
        Assert.Equal(0x83, result.DataIn[1]);   // CTDP | supported
        Assert.Equal(4 + 6 + 12, result.DataIn.Length);
        var timeouts = result.DataIn.AsSpan(10);
        Assert.Equal(0x0A, BinaryPrimitives.ReadUInt16BigEndian(timeouts));
        Assert.Equal(600u, BinaryPrimitives.ReadUInt32BigEndian(timeouts.Slice(8)));
    }

    [Fact]
    public async Task All_commands_format_lists_every_table_entry()
    {
        await using var lu = LuHarness.Create(bytes: 1 << 20);
        var nexus = await lu.ReadyNexusAsync("iqn.2026-11.test:rsoc");
        var result = await lu.RunAsync(nexus, ScsiCdb.ReportSupportedOperationCodes(0, allocation: 65536));
        result.AssertGood();
        int count = CommandTable.All.Count;
        Assert.Equal(8 * count, (int)BinaryPrimitives.ReadUInt32BigEndian(result.DataIn));
        Assert.Equal(4 + 8 * count, result.DataIn.Length);
        for (int i = 0; i < count; i++)
        {
            var d = result.DataIn.AsSpan(4 + 8 * i, 8);
            var info = CommandTable.Find(d[0], BinaryPrimitives.ReadUInt16BigEndian(d.Slice(2)));
            Assert.NotNull(info);
            Assert.Equal(info.HasServiceAction, (d[5] & 0x01) != 0);   // SERVACTV
            Assert.Equal(info.CdbLength, BinaryPrimitives.ReadUInt16BigEndian(d.Slice(6)));
        }
    }

    [Fact]
    public async Task The_allocation_length_truncates_the_answer()
    {
        await using var lu = LuHarness.Create(bytes: 1 << 20);
        var nexus = await lu.ReadyNexusAsync("iqn.2026-11.test:rsoc");
        var result = await lu.RunAsync(nexus, ScsiCdb.ReportSupportedOperationCodes(1, 0x28, allocation: 6));
        result.AssertGood();
        Assert.Equal(new byte[] { 0x00, 0x03, 0x00, 0x0A, 0x28, 0x1A }, result.DataIn);
    }
}
