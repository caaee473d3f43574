using ISCSISnap.Target.Scsi;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary>SPC-2 RESERVE/RELEASE(6/10) between two I_T nexuses (SPC-2 §5.5.1, §7.21-7.24).</summary>
public sealed class ReserveReleaseTests
{
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task The_holder_has_access_and_the_other_nexus_conflicts_until_release(bool ten)
    {
        await using var lu = LuHarness.Create();
        var holder = await lu.ReadyNexusAsync("iqn.2026-11.test:holder");
        var other = await lu.ReadyNexusAsync("iqn.2026-11.test:other");
        var reserve = ten ? ScsiCdb.Reserve10() : ScsiCdb.Reserve6();
        var release = ten ? ScsiCdb.Release10() : ScsiCdb.Release6();

        (await lu.RunAsync(holder, reserve)).AssertGood();
        await lu.WriteAsync(holder, 0, LuHarness.Pattern(512, 1));
        await lu.ReadAsync(holder, 0, 1);

        Assert.Equal(ScsiStatus.ReservationConflict, (await lu.RunAsync(other, Cdb.Read10(0, 1))).Status);
        Assert.Equal(ScsiStatus.ReservationConflict, (await lu.RunAsync(other, Cdb.Write10(0, 1), new byte[512])).Status);
        Assert.Equal(ScsiStatus.ReservationConflict, (await lu.RunAsync(other, ScsiCdb.ModeSense6(0x08))).Status);
        Assert.Equal(ScsiStatus.ReservationConflict, (await lu.RunAsync(other, reserve)).Status);

        (await lu.RunAsync(holder, release)).AssertGood();
        (await lu.RunAsync(other, Cdb.Read10(0, 1))).AssertGood();
        (await lu.RunAsync(other, reserve)).AssertGood();   // now the other nexus can reserve
        Assert.Equal(ScsiStatus.ReservationConflict, (await lu.RunAsync(holder, Cdb.Read10(0, 1))).Status);
    }

    [Fact]
    public async Task Inquiry_report_luns_request_sense_and_test_unit_ready_are_allowed_for_others()
    {
        await using var lu = LuHarness.Create();
        var holder = await lu.ReadyNexusAsync("iqn.2026-11.test:holder");
        var other = await lu.ReadyNexusAsync("iqn.2026-11.test:other");
        (await lu.RunAsync(holder, ScsiCdb.Reserve6())).AssertGood();
        (await lu.RunAsync(other, Cdb.Inquiry())).AssertGood();
        (await lu.RunAsync(other, Cdb.ReportLuns())).AssertGood();
        (await lu.RunAsync(other, Cdb.RequestSense())).AssertGood();
        (await lu.RunAsync(other, Cdb.TestUnitReady())).AssertGood();
    }

    [Fact]
    public async Task Release_from_a_non_holder_is_good_and_leaves_the_reservation()
    {
        await using var lu = LuHarness.Create();
        var holder = await lu.ReadyNexusAsync("iqn.2026-11.test:holder");
        var other = await lu.ReadyNexusAsync("iqn.2026-11.test:other");
        (await lu.RunAsync(holder, ScsiCdb.Reserve6())).AssertGood();
        (await lu.RunAsync(other, ScsiCdb.Release6())).AssertGood();
        Assert.Equal(ScsiStatus.ReservationConflict, (await lu.RunAsync(other, Cdb.Read10(0, 1))).Status);
    }

    [Fact]
    public async Task Reserving_again_from_the_holder_is_good()
    {
        await using var lu = LuHarness.Create();
        var holder = await lu.ReadyNexusAsync("iqn.2026-11.test:holder");
        (await lu.RunAsync(holder, ScsiCdb.Reserve6())).AssertGood();
        (await lu.RunAsync(holder, ScsiCdb.Reserve10())).AssertGood();
    }

    [Fact]
    public async Task A_second_port_of_the_same_initiator_is_another_nexus()
    {
        await using var lu = LuHarness.Create();
        var holder = await lu.ReadyNexusAsync("iqn.2026-11.test:host", isid: 1);
        var sibling = await lu.ReadyNexusAsync("iqn.2026-11.test:host", isid: 2);
        (await lu.RunAsync(holder, ScsiCdb.Reserve6())).AssertGood();
        Assert.Equal(ScsiStatus.ReservationConflict, (await lu.RunAsync(sibling, Cdb.Read10(0, 1))).Status);
    }

    [Fact]
    public async Task Losing_the_holders_nexus_or_a_reset_releases_the_reservation()
    {
        await using var lu = LuHarness.Create();
        var holder = await lu.ReadyNexusAsync("iqn.2026-11.test:holder");
        var other = await lu.ReadyNexusAsync("iqn.2026-11.test:other");
        (await lu.RunAsync(holder, ScsiCdb.Reserve6())).AssertGood();
        lu.Unit.OnNexusLost(holder);
        (await lu.RunAsync(other, Cdb.Read10(0, 1))).AssertGood();

        (await lu.RunAsync(other, ScsiCdb.Reserve6())).AssertGood();
        lu.Unit.Reset();
        var fresh = LuHarness.Nexus("iqn.2026-11.test:holder");
        (await lu.RunAsync(fresh, Cdb.TestUnitReady())).AssertSense(SenseCode.PowerOnResetOccurred);
        (await lu.RunAsync(fresh, Cdb.Read10(0, 1))).AssertGood();
    }

    [Fact]
    public async Task Third_party_reservations_are_refused()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync("iqn.2026-11.test:holder");
        var cdb = ScsiCdb.Reserve10();
        cdb[1] = 0x10;   // 3RDPTY
        (await lu.RunAsync(nexus, cdb)).AssertSense(SenseCode.InvalidFieldInCdb);
    }

    [Fact]
    public async Task Reserve_conflicts_while_a_persistent_reservation_exists()
    {
        await using var lu = LuHarness.Create();
        var nexus = await lu.ReadyNexusAsync("iqn.2026-11.test:holder");
        (await lu.RunAsync(nexus, ScsiCdb.PersistentReserveOut(0x00), ScsiCdb.PrParameters(0, 0xAA))).AssertGood();
        (await lu.RunAsync(nexus, ScsiCdb.PersistentReserveOut(0x01, PersistentReservationType.WriteExclusive), ScsiCdb.PrParameters(0xAA))).AssertGood();
        Assert.Equal(ScsiStatus.ReservationConflict, (await lu.RunAsync(nexus, ScsiCdb.Reserve6())).Status);
    }
}
