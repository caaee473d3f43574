using ISCSISnap.Target.Scsi;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary>Unit attention conditions per I_T nexus (SAM-5 §5.14, SPC-4 §5.14 / §6.39 REQUEST SENSE).</summary>
public sealed class UnitAttentionTests
{
    [Fact]
    public async Task A_new_nexus_gets_power_on_reset_once_and_then_runs_normally()
    {
        await using var lu = LuHarness.Create();
        var nexus = LuHarness.Nexus("iqn.2026-11.test:ua");
        var first = await lu.RunAsync(nexus, Cdb.TestUnitReady());
        first.AssertSense(SenseKey.UnitAttention, 0x29, 0x00);
        Assert.False(first.DescriptorFormat);
        (await lu.RunAsync(nexus, Cdb.TestUnitReady())).AssertGood();
        (await lu.RunAsync(nexus, Cdb.TestUnitReady())).AssertGood();
    }

    [Fact]
    public async Task The_unit_attention_fails_the_media_command_that_reports_it()
    {
        await using var lu = LuHarness.Create();
        var nexus = LuHarness.Nexus("iqn.2026-11.test:ua");
        var data = LuHarness.Pattern(512, 1);
        (await lu.RunAsync(nexus, Cdb.Write10(0, 1), data)).AssertSense(SenseCode.PowerOnResetOccurred);
        Assert.All(await lu.ReadAsync(nexus, 0, 1), b => Assert.Equal(0, b));   // the reported WRITE did not happen
    }

    [Fact]
    public async Task Inquiry_and_report_luns_neither_report_nor_clear_it()
    {
        await using var lu = LuHarness.Create();
        var nexus = LuHarness.Nexus("iqn.2026-11.test:ua");
        var inquiry = await lu.RunAsync(nexus, Cdb.Inquiry());
        inquiry.AssertGood();
        Assert.Equal(96, inquiry.DataIn.Length);
        var luns = await lu.RunAsync(nexus, Cdb.ReportLuns());
        luns.AssertGood();
        Assert.Equal(16, luns.DataIn.Length);
        (await lu.RunAsync(nexus, Cdb.TestUnitReady())).AssertSense(SenseCode.PowerOnResetOccurred);
    }

    [Fact]
    public async Task Persistent_reserve_in_neither_reports_nor_clears_it()
    {
        await using var lu = LuHarness.Create();
        var nexus = LuHarness.Nexus("iqn.2026-11.test:ua");
        (await lu.RunAsync(nexus, ScsiCdb.PersistentReserveIn(0x00))).AssertGood();
        (await lu.RunAsync(nexus, Cdb.TestUnitReady())).AssertSense(SenseCode.PowerOnResetOccurred);
    }

    [Fact]
    public async Task Request_sense_returns_the_unit_attention_and_clears_it()
    {
        await using var lu = LuHarness.Create();
        var nexus = LuHarness.Nexus("iqn.2026-11.test:ua");
        var sense = await lu.RunAsync(nexus, Cdb.RequestSense());
        sense.AssertGood();
        Assert.Equal(18, sense.DataIn.Length);
        Assert.Equal(0x70, sense.DataIn[0]);
        Assert.Equal(0x06, sense.DataIn[2]);
        Assert.Equal((0x29, 0x00), (sense.DataIn[12], sense.DataIn[13]));

        (await lu.RunAsync(nexus, Cdb.TestUnitReady())).AssertGood();
        var again = await lu.RunAsync(nexus, Cdb.RequestSense());
        again.AssertGood();
        Assert.Equal(0x00, again.DataIn[2]);   // NO SENSE
        Assert.Equal((0, 0), (again.DataIn[12], again.DataIn[13]));
    }

    [Fact]
    public async Task Request_sense_with_desc_returns_descriptor_format()
    {
        await using var lu = LuHarness.Create();
        var nexus = LuHarness.Nexus("iqn.2026-11.test:ua");
        var sense = await lu.RunAsync(nexus, [0x03, 0x01, 0, 0, 252, 0]);
        sense.AssertGood();
        Assert.Equal(new byte[] { 0x72, 0x06, 0x29, 0x00, 0, 0, 0, 0 }, sense.DataIn);
    }

    [Fact]
    public async Task Request_sense_honours_a_short_allocation_length()
    {
        await using var lu = LuHarness.Create();
        var nexus = LuHarness.Nexus("iqn.2026-11.test:ua");
        var sense = await lu.RunAsync(nexus, Cdb.RequestSense(8));
        sense.AssertGood();
        Assert.Equal(8, sense.DataIn.Length);
        Assert.Equal(0x06, sense.DataIn[2]);
    }

    [Fact]
    public async Task Each_nexus_has_its_own_unit_attention()
    {
        await using var lu = LuHarness.Create();
        var a = LuHarness.Nexus("iqn.2026-11.test:a");
        var b = LuHarness.Nexus("iqn.2026-11.test:a", isid: 0x23D000000002);   // same initiator, another port
        (await lu.RunAsync(a, Cdb.TestUnitReady())).AssertSense(SenseCode.PowerOnResetOccurred);
        (await lu.RunAsync(a, Cdb.TestUnitReady())).AssertGood();
        (await lu.RunAsync(b, Cdb.TestUnitReady())).AssertSense(SenseCode.PowerOnResetOccurred);
    }

    [Fact]
    public async Task A_reinstated_session_object_with_the_same_identity_shares_the_state()
    {
        await using var lu = LuHarness.Create();
        await lu.ReadyNexusAsync("iqn.2026-11.test:a");
        var again = LuHarness.Nexus("iqn.2026-11.test:a");   // a new ItNexus object, same I_T nexus
        (await lu.RunAsync(again, Cdb.TestUnitReady())).AssertGood();
    }

    [Fact]
    public async Task A_lost_nexus_starts_afresh_with_power_on_reset()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync("iqn.2026-11.test:a");
        lu.Unit.OnNexusLost(nexus);
        (await lu.RunAsync(LuHarness.Nexus("iqn.2026-11.test:a"), Cdb.TestUnitReady())).AssertSense(SenseCode.PowerOnResetOccurred);
    }

    [Fact]
    public async Task Logical_unit_reset_raises_power_on_reset_for_every_nexus()
    {
        await using var lu = LuHarness.Create();
        var a = await lu.ReadyNexusAsync("iqn.2026-11.test:a");
        var b = await lu.ReadyNexusAsync("iqn.2026-11.test:b");
        lu.Unit.Reset();
        (await lu.RunAsync(a, Cdb.TestUnitReady())).AssertSense(SenseCode.PowerOnResetOccurred);
        (await lu.RunAsync(b, Cdb.TestUnitReady())).AssertSense(SenseCode.PowerOnResetOccurred);
        (await lu.RunAsync(a, Cdb.TestUnitReady())).AssertGood();
    }

    [Fact]
    public async Task Queued_unit_attentions_are_reported_oldest_first_and_a_reset_supersedes_them()
    {
        await using var lu = LuHarness.Create();
        var a = await lu.ReadyNexusAsync("iqn.2026-11.test:a");
        lu.Unit.RaiseUnitAttentionForAll(SenseCode.CapacityDataChanged);
        lu.Unit.RaiseUnitAttentionForAll(SenseCode.ReportedLunsDataChanged);
        lu.Unit.RaiseUnitAttentionForAll(SenseCode.CapacityDataChanged);   // duplicates are not queued twice
        (await lu.RunAsync(a, Cdb.TestUnitReady())).AssertSense(SenseCode.CapacityDataChanged);
        (await lu.RunAsync(a, Cdb.TestUnitReady())).AssertSense(SenseCode.ReportedLunsDataChanged);
        (await lu.RunAsync(a, Cdb.TestUnitReady())).AssertGood();

        lu.Unit.RaiseUnitAttentionForAll(SenseCode.CapacityDataChanged);
        lu.Unit.Reset();
        (await lu.RunAsync(a, Cdb.TestUnitReady())).AssertSense(SenseCode.PowerOnResetOccurred);
        (await lu.RunAsync(a, Cdb.TestUnitReady())).AssertGood();
    }

    [Fact]
    public async Task Report_luns_clears_only_reported_luns_data_changed()
    {
        await using var lu = LuHarness.Create();
        var a = await lu.ReadyNexusAsync("iqn.2026-11.test:a");
        lu.Unit.RaiseUnitAttentionForAll(SenseCode.ReportedLunsDataChanged);
        (await lu.RunAsync(a, Cdb.ReportLuns())).AssertGood();
        (await lu.RunAsync(a, Cdb.TestUnitReady())).AssertGood();

        lu.Unit.RaiseUnitAttentionForAll(SenseCode.CapacityDataChanged);
        (await lu.RunAsync(a, Cdb.ReportLuns())).AssertGood();
        (await lu.RunAsync(a, Cdb.TestUnitReady())).AssertSense(SenseCode.CapacityDataChanged);
    }
}
