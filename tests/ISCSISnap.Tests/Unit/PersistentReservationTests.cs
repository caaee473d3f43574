using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Text;
using ISCSISnap.Target.Scsi;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary>PERSISTENT RESERVE IN/OUT (SPC-4 §5.13, §6.16, §6.17) driven through a real logical unit.</summary>
public sealed class PersistentReservationTests
{
    private const byte Register = 0x00, Reserve = 0x01, Release = 0x02, Clear = 0x03, Preempt = 0x04, RegisterAndIgnore = 0x06;
    private const byte ReadKeys = 0x00, ReadReservation = 0x01, ReportCapabilities = 0x02, ReadFullStatus = 0x03;

    /// <summary>Test double for the catalog's APTPL store (the catalog itself is tested elsewhere).</summary>
    private sealed class MemoryStore : IPersistentReservationStore
    {
        public readonly ConcurrentDictionary<Guid, PersistedReservations?> Saved = new();
        public int Saves;

        public PersistedReservations? Load(Guid unitId) => Saved.TryGetValue(unitId, out var state) ? state : null;

        public void Save(Guid unitId, PersistedReservations? state)
        {
            Interlocked.Increment(ref Saves);
            Saved[unitId] = state;
        }
    }

    private sealed class Setup : IAsyncDisposable
    {
        private Setup(LuHarness lu, ItNexus a, ItNexus b, ItNexus c)
        {
            Lu = lu;
            A = a;
            B = b;
            C = c;
        }

        public LuHarness Lu { get; }
        /// <summary>Three initiator ports; tests register A and B and leave C unregistered unless they say otherwise.</summary>
        public ItNexus A { get; }
        public ItNexus B { get; }
        public ItNexus C { get; }

        public static async Task<Setup> CreateAsync(IPersistentReservationStore? store = null)
        {
            var lu = LuHarness.Create(store: store);
            return new Setup(lu, await lu.ReadyNexusAsync("iqn.2026-11.test:a"), await lu.ReadyNexusAsync("iqn.2026-11.test:b"),
                await lu.ReadyNexusAsync("iqn.2026-11.test:c"));
        }

        public Task<ScsiResult> Out(ItNexus nexus, byte action, ulong key, ulong serviceActionKey = 0,
            PersistentReservationType type = PersistentReservationType.None, bool aptpl = false) =>
            Lu.RunAsync(nexus, ScsiCdb.PersistentReserveOut(action, type), ScsiCdb.PrParameters(key, serviceActionKey, aptpl));

        public async Task<byte[]> In(ItNexus nexus, byte action)
        {
            var result = await Lu.RunAsync(nexus, ScsiCdb.PersistentReserveIn(action));
            result.AssertGood();
            return result.DataIn;
        }

        public async Task<(uint Generation, ulong[] Keys)> KeysAsync()
        {
            var d = await In(A, ReadKeys);
            uint length = BinaryPrimitives.ReadUInt32BigEndian(d.AsSpan(4));
            Assert.Equal(8 + (int)length, d.Length);
            var keys = new ulong[length / 8];
            for (int i = 0; i < keys.Length; i++) keys[i] = BinaryPrimitives.ReadUInt64BigEndian(d.AsSpan(8 + 8 * i));
            Array.Sort(keys);   // the order of the key list is not specified
            return (BinaryPrimitives.ReadUInt32BigEndian(d), keys);
        }

        /// <summary>Asserts READ KEYS returns this generation and exactly these keys (in any order).</summary>
        public async Task AssertKeysAsync(uint generation, params ulong[] keys)
        {
            var (actualGeneration, actualKeys) = await KeysAsync();
            Assert.Equal(generation, actualGeneration);
            Assert.Equal(keys.Order().ToArray(), actualKeys);
        }

        public async Task<(ulong Key, byte Type)?> ReservationAsync()
        {
            var d = await In(A, ReadReservation);
            uint length = BinaryPrimitives.ReadUInt32BigEndian(d.AsSpan(4));
            if (length == 0)
            {
                Assert.Equal(8, d.Length);
                return null;
            }
            Assert.Equal(16u, length);
            Assert.Equal(24, d.Length);
            Assert.Equal(0, d[21] >> 4);   // LU_SCOPE
            return (BinaryPrimitives.ReadUInt64BigEndian(d.AsSpan(8)), (byte)(d[21] & 0x0F));
        }

        public async Task RegisterAsync(ItNexus nexus, ulong key) => (await Out(nexus, Register, 0, key)).AssertGood();

        public async Task<bool> CanReadAsync(ItNexus nexus) => Allowed(await Lu.RunAsync(nexus, Cdb.Read10(0, 1)));

        public async Task<bool> CanWriteAsync(ItNexus nexus) => Allowed(await Lu.RunAsync(nexus, Cdb.Write10(0, 1), new byte[512]));

        private static bool Allowed(ScsiResult result)
        {
            if (result.Status == ScsiStatus.ReservationConflict) return false;
            result.AssertGood();
            return true;
        }

        public ValueTask DisposeAsync() => Lu.DisposeAsync();
    }

    // ---------------------------------------------------------------- REGISTER and PRgeneration

    [Fact]
    public async Task Register_and_register_and_ignore_count_generations()
    {
        await using var s = await Setup.CreateAsync();
        await s.AssertKeysAsync(0u);

        await s.RegisterAsync(s.A, 0xA1);
        await s.AssertKeysAsync(1u, 0xA1);
        await s.RegisterAsync(s.B, 0xB1);
        Assert.Equal(2u, (await s.KeysAsync()).Generation);

        (await s.Out(s.A, Register, 0xA1, 0xA2)).AssertGood();              // change the key, proving the old one
        await s.AssertKeysAsync(3u, 0xA2, 0xB1);

        (await s.Out(s.A, RegisterAndIgnore, 0x1234, 0xA3)).AssertGood();   // the reservation key is ignored
        await s.AssertKeysAsync(4u, 0xA3, 0xB1);

        (await s.Out(s.C, RegisterAndIgnore, 0, 0xC1)).AssertGood();        // registers an unregistered nexus too
        Assert.Equal(5u, (await s.KeysAsync()).Generation);

        (await s.Out(s.C, Register, 0xC1, 0)).AssertGood();                 // service action key 0 unregisters
        await s.AssertKeysAsync(6u, 0xA3, 0xB1);
    }

    [Fact]
    public async Task Register_with_the_wrong_key_conflicts_and_does_not_count()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        Assert.Equal(ScsiStatus.ReservationConflict, (await s.Out(s.A, Register, 0xBAD, 0xA2)).Status);      // registered: wrong key
        Assert.Equal(ScsiStatus.ReservationConflict, (await s.Out(s.B, Register, 0x1, 0xB1)).Status);        // unregistered: key must be 0
        await s.AssertKeysAsync(1u, 0xA1);
    }

    [Fact]
    public async Task Reserve_and_release_do_not_count_generations()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        (await s.Out(s.A, Reserve, 0xA1, type: PersistentReservationType.WriteExclusive)).AssertGood();
        (await s.Out(s.A, Release, 0xA1, type: PersistentReservationType.WriteExclusive)).AssertGood();
        Assert.Equal(1u, (await s.KeysAsync()).Generation);
    }

    [Fact]
    public async Task Parameter_list_must_be_24_bytes()
    {
        await using var s = await Setup.CreateAsync();
        var result = await s.Lu.RunAsync(s.A, ScsiCdb.PersistentReserveOut(Register, length: 20), new byte[20]);
        result.AssertSense(SenseKey.IllegalRequest, 0x1A, 0x00);
    }

    [Fact]
    public async Task Spec_i_pt_is_refused_and_aptpl_only_goes_with_register()
    {
        await using var s = await Setup.CreateAsync();
        var parameters = ScsiCdb.PrParameters(0, 0xA1);
        parameters[20] = 0x08;   // SPEC_I_PT
        var specIpt = await s.Lu.RunAsync(s.A, ScsiCdb.PersistentReserveOut(Register), parameters);
        specIpt.AssertSense(SenseCode.InvalidFieldInParameterList);
        Assert.Equal(20, BinaryPrimitives.ReadUInt16BigEndian(specIpt.Sense.AsSpan(16)));

        await s.RegisterAsync(s.A, 0xA1);
        (await s.Out(s.A, Reserve, 0xA1, type: PersistentReservationType.WriteExclusive, aptpl: true)).AssertSense(SenseCode.InvalidFieldInParameterList);
    }

    // ---------------------------------------------------------------- RESERVE

    [Fact]
    public async Task Reserve_needs_a_registration_with_the_matching_key()
    {
        await using var s = await Setup.CreateAsync();
        Assert.Equal(ScsiStatus.ReservationConflict, (await s.Out(s.A, Reserve, 0, type: PersistentReservationType.WriteExclusive)).Status);
        await s.RegisterAsync(s.A, 0xA1);
        Assert.Equal(ScsiStatus.ReservationConflict, (await s.Out(s.A, Reserve, 0xA2, type: PersistentReservationType.WriteExclusive)).Status);
        Assert.Null(await s.ReservationAsync());
    }

    [Fact]
    public async Task Reserve_conflicts_with_another_holder_and_with_a_type_change()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        await s.RegisterAsync(s.B, 0xB1);
        (await s.Out(s.A, Reserve, 0xA1, type: PersistentReservationType.WriteExclusive)).AssertGood();
        (await s.Out(s.A, Reserve, 0xA1, type: PersistentReservationType.WriteExclusive)).AssertGood();   // same again: GOOD
        Assert.Equal(ScsiStatus.ReservationConflict, (await s.Out(s.A, Reserve, 0xA1, type: PersistentReservationType.ExclusiveAccess)).Status);
        Assert.Equal(ScsiStatus.ReservationConflict, (await s.Out(s.B, Reserve, 0xB1, type: PersistentReservationType.WriteExclusive)).Status);
        Assert.Equal((0xA1ul, (byte)1), await s.ReservationAsync());
    }

    [Theory]
    [InlineData(0)]
    [InlineData(2)]
    [InlineData(4)]
    [InlineData(9)]
    public async Task Reserve_with_an_invalid_type_is_invalid_field_in_cdb(byte type)
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        var result = await s.Out(s.A, Reserve, 0xA1, type: (PersistentReservationType)type);
        result.AssertSense(SenseCode.InvalidFieldInCdb);
        Assert.Equal(2, BinaryPrimitives.ReadUInt16BigEndian(result.Sense.AsSpan(16)));
    }

    // ---------------------------------------------------------------- access rules per type

    /// <summary>
    /// SPC-4 Table 52 (and SBC-3 Table 13) for READ and WRITE from a nexus other than the one that reserved:
    /// registered (B) and unregistered (C).
    /// </summary>
    [Theory]
    [InlineData(PersistentReservationType.WriteExclusive, true, false, true, false)]
    [InlineData(PersistentReservationType.ExclusiveAccess, false, false, false, false)]
    [InlineData(PersistentReservationType.WriteExclusiveRegistrantsOnly, true, true, true, false)]
    [InlineData(PersistentReservationType.ExclusiveAccessRegistrantsOnly, true, true, false, false)]
    [InlineData(PersistentReservationType.WriteExclusiveAllRegistrants, true, true, true, false)]
    [InlineData(PersistentReservationType.ExclusiveAccessAllRegistrants, true, true, false, false)]
    public async Task Access_for_registered_and_unregistered_other_nexuses(PersistentReservationType type,
        bool registeredRead, bool registeredWrite, bool unregisteredRead, bool unregisteredWrite)
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        await s.RegisterAsync(s.B, 0xB1);
        (await s.Out(s.A, Reserve, 0xA1, type: type)).AssertGood();
        Assert.Equal(type, (PersistentReservationType)(await s.ReservationAsync())!.Value.Type);

        Assert.True(await s.CanReadAsync(s.A));
        Assert.True(await s.CanWriteAsync(s.A));
        Assert.Equal(registeredRead, await s.CanReadAsync(s.B));
        Assert.Equal(registeredWrite, await s.CanWriteAsync(s.B));
        Assert.Equal(unregisteredRead, await s.CanReadAsync(s.C));
        Assert.Equal(unregisteredWrite, await s.CanWriteAsync(s.C));

        // Commands that never conflict.
        (await s.Lu.RunAsync(s.C, Cdb.Inquiry())).AssertGood();
        (await s.Lu.RunAsync(s.C, Cdb.TestUnitReady())).AssertGood();
        (await s.Lu.RunAsync(s.C, Cdb.ReportLuns())).AssertGood();
        (await s.Lu.RunAsync(s.C, Cdb.ReadCapacity16())).AssertGood();
    }

    [Fact]
    public async Task All_registrants_reservations_are_held_by_every_registrant()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        await s.RegisterAsync(s.B, 0xB1);
        (await s.Out(s.A, Reserve, 0xA1, type: PersistentReservationType.ExclusiveAccessAllRegistrants)).AssertGood();
        Assert.Equal((0ul, (byte)8), await s.ReservationAsync());   // all-registrants: reservation key 0
        // B holds it too: it may release it.
        (await s.Out(s.B, Release, 0xB1, type: PersistentReservationType.ExclusiveAccessAllRegistrants)).AssertGood();
        Assert.Null(await s.ReservationAsync());
    }

    [Fact]
    public async Task Unregistering_the_holder_releases_the_reservation()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        (await s.Out(s.A, Reserve, 0xA1, type: PersistentReservationType.ExclusiveAccess)).AssertGood();
        Assert.False(await s.CanReadAsync(s.C));
        (await s.Out(s.A, Register, 0xA1, 0)).AssertGood();
        Assert.Null(await s.ReservationAsync());
        Assert.True(await s.CanReadAsync(s.C));
    }

    // ---------------------------------------------------------------- RELEASE, CLEAR

    [Fact]
    public async Task Release_with_the_wrong_type_is_invalid_release()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        (await s.Out(s.A, Reserve, 0xA1, type: PersistentReservationType.WriteExclusive)).AssertGood();
        (await s.Out(s.A, Release, 0xA1, type: PersistentReservationType.ExclusiveAccess)).AssertSense(SenseKey.IllegalRequest, 0x26, 0x04);
        Assert.Equal((0xA1ul, (byte)1), await s.ReservationAsync());
    }

    [Fact]
    public async Task Release_from_a_registered_non_holder_is_good_and_changes_nothing()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        await s.RegisterAsync(s.B, 0xB1);
        (await s.Out(s.A, Reserve, 0xA1, type: PersistentReservationType.WriteExclusive)).AssertGood();
        (await s.Out(s.B, Release, 0xB1, type: PersistentReservationType.WriteExclusive)).AssertGood();
        Assert.Equal((0xA1ul, (byte)1), await s.ReservationAsync());
        Assert.Equal(ScsiStatus.ReservationConflict, (await s.Out(s.C, Release, 0)).Status);   // unregistered
    }

    [Fact]
    public async Task Releasing_a_registrants_only_reservation_tells_the_other_registrants()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        await s.RegisterAsync(s.B, 0xB1);
        (await s.Out(s.A, Reserve, 0xA1, type: PersistentReservationType.WriteExclusiveRegistrantsOnly)).AssertGood();
        (await s.Out(s.A, Release, 0xA1, type: PersistentReservationType.WriteExclusiveRegistrantsOnly)).AssertGood();
        (await s.Lu.RunAsync(s.B, Cdb.TestUnitReady())).AssertSense(SenseKey.UnitAttention, 0x2A, 0x04);
        (await s.Lu.RunAsync(s.A, Cdb.TestUnitReady())).AssertGood();
        (await s.Lu.RunAsync(s.C, Cdb.TestUnitReady())).AssertGood();
    }

    [Fact]
    public async Task Clear_removes_every_registration_and_the_reservation()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        await s.RegisterAsync(s.B, 0xB1);
        (await s.Out(s.A, Reserve, 0xA1, type: PersistentReservationType.ExclusiveAccess)).AssertGood();
        Assert.Equal(ScsiStatus.ReservationConflict, (await s.Out(s.C, Clear, 0)).Status);   // only a registrant may clear

        (await s.Out(s.B, Clear, 0xB1)).AssertGood();
        await s.AssertKeysAsync(3u);
        Assert.Null(await s.ReservationAsync());
        (await s.Lu.RunAsync(s.A, Cdb.TestUnitReady())).AssertSense(SenseKey.UnitAttention, 0x2A, 0x03);
        (await s.Lu.RunAsync(s.B, Cdb.TestUnitReady())).AssertGood();
        Assert.True(await s.CanWriteAsync(s.C));
    }

    // ---------------------------------------------------------------- PREEMPT

    [Fact]
    public async Task Preempt_of_the_holder_removes_its_registration_and_takes_over_the_reservation()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        await s.RegisterAsync(s.B, 0xB1);
        (await s.Out(s.A, Reserve, 0xA1, type: PersistentReservationType.WriteExclusive)).AssertGood();

        (await s.Out(s.B, Preempt, 0xB1, 0xA1, PersistentReservationType.ExclusiveAccess)).AssertGood();
        await s.AssertKeysAsync(3u, 0xB1);
        Assert.Equal((0xB1ul, (byte)3), await s.ReservationAsync());

        Assert.False(await s.CanReadAsync(s.A));   // A is no longer registered, and EA excludes it
        (await s.Lu.RunAsync(s.A, Cdb.TestUnitReady())).AssertSense(SenseKey.UnitAttention, 0x2A, 0x05);
        Assert.True(await s.CanWriteAsync(s.B));
    }

    [Fact]
    public async Task Preempt_without_a_reservation_removes_the_named_registrations_only()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        await s.RegisterAsync(s.B, 0x77);
        await s.RegisterAsync(s.C, 0x77);
        (await s.Out(s.A, Preempt, 0xA1, 0x77, PersistentReservationType.WriteExclusive)).AssertGood();
        await s.AssertKeysAsync(4u, 0xA1);
        Assert.Null(await s.ReservationAsync());
        (await s.Lu.RunAsync(s.B, Cdb.TestUnitReady())).AssertSense(SenseKey.UnitAttention, 0x2A, 0x05);
        (await s.Lu.RunAsync(s.C, Cdb.TestUnitReady())).AssertSense(SenseKey.UnitAttention, 0x2A, 0x05);
    }

    [Fact]
    public async Task Preempt_with_service_action_key_zero_and_no_reservation_is_invalid_field_in_parameter_list()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        await s.RegisterAsync(s.B, 0xB1);
        var result = await s.Out(s.A, Preempt, 0xA1, 0, PersistentReservationType.WriteExclusive);
        result.AssertSense(SenseKey.IllegalRequest, 0x26, 0x00);
        Assert.Equal(0x80, result.Sense[15]);   // SKSV, C/D=0
        Assert.Equal(8, BinaryPrimitives.ReadUInt16BigEndian(result.Sense.AsSpan(16)));   // SERVICE ACTION RESERVATION KEY
        await s.AssertKeysAsync(2u, 0xA1, 0xB1);
    }

    [Fact]
    public async Task Preempt_of_a_key_nobody_holds_conflicts()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        Assert.Equal(ScsiStatus.ReservationConflict, (await s.Out(s.A, Preempt, 0xA1, 0x999, PersistentReservationType.WriteExclusive)).Status);
        Assert.Equal(ScsiStatus.ReservationConflict, (await s.Out(s.C, Preempt, 0, 0xA1, PersistentReservationType.WriteExclusive)).Status);
        await s.AssertKeysAsync(1u, 0xA1);
    }

    [Fact]
    public async Task Preempt_with_key_zero_under_an_all_registrants_reservation_removes_everyone_else()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        await s.RegisterAsync(s.B, 0xB1);
        await s.RegisterAsync(s.C, 0xC1);
        (await s.Out(s.A, Reserve, 0xA1, type: PersistentReservationType.WriteExclusiveAllRegistrants)).AssertGood();
        (await s.Out(s.A, Preempt, 0xA1, 0, PersistentReservationType.WriteExclusive)).AssertGood();
        await s.AssertKeysAsync(4u, 0xA1);
        Assert.Equal((0xA1ul, (byte)1), await s.ReservationAsync());
        Assert.False(await s.CanWriteAsync(s.B));
    }

    // ---------------------------------------------------------------- PERSISTENT RESERVE IN layouts

    [Fact]
    public async Task Read_reservation_without_a_reservation_is_just_the_header()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        var d = await s.In(s.B, ReadReservation);
        Assert.Equal(new byte[] { 0, 0, 0, 1, 0, 0, 0, 0 }, d);
    }

    [Fact]
    public async Task Read_reservation_layout()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0x0102030405060708);
        (await s.Out(s.A, Reserve, 0x0102030405060708, type: PersistentReservationType.WriteExclusiveRegistrantsOnly)).AssertGood();
        var d = await s.In(s.B, ReadReservation);
        Assert.Equal(
            new byte[] { 0, 0, 0, 1, 0, 0, 0, 16, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0x05, 0, 0 },
            d);
    }

    [Fact]
    public async Task Read_keys_honours_the_allocation_length()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        await s.RegisterAsync(s.B, 0xB1);
        var result = await s.Lu.RunAsync(s.C, ScsiCdb.PersistentReserveIn(ReadKeys, allocation: 12));
        result.AssertGood();
        Assert.Equal(new byte[] { 0, 0, 0, 2, 0, 0, 0, 16, 0, 0, 0, 0 }, result.DataIn);
    }

    [Fact]
    public async Task Report_capabilities_layout()
    {
        await using var s = await Setup.CreateAsync();
        var d = await s.In(s.A, ReportCapabilities);
        Assert.Equal(8, d.Length);
        Assert.Equal(8, BinaryPrimitives.ReadUInt16BigEndian(d));
        Assert.Equal(0x15, d[2]);   // CRH | ATP_C | PTPL_C; SIP_C=0 (SPEC_I_PT not supported)
        Assert.Equal(0x80, d[3]);   // TMV, PTPL_A=0
        Assert.Equal(0xEA, d[4]);   // WR_EX_AR | EX_AC_RO | WR_EX_RO | EX_AC | WR_EX
        Assert.Equal(0x01, d[5]);   // EX_AC_AR

        await s.RegisterAsync(s.A, 0xA1);
        (await s.Out(s.A, Register, 0xA1, 0xA1, aptpl: true)).AssertGood();
        Assert.Equal(0x81, (await s.In(s.A, ReportCapabilities))[3]);   // PTPL_A
    }

    [Fact]
    public async Task Read_full_status_layout()
    {
        await using var s = await Setup.CreateAsync();
        await s.RegisterAsync(s.A, 0xA1);
        await s.RegisterAsync(s.B, 0xB1);
        (await s.Out(s.A, Reserve, 0xA1, type: PersistentReservationType.ExclusiveAccess)).AssertGood();
        var d = await s.In(s.C, ReadFullStatus);
        Assert.Equal(2u, BinaryPrimitives.ReadUInt32BigEndian(d));
        Assert.Equal(d.Length - 8, (int)BinaryPrimitives.ReadUInt32BigEndian(d.AsSpan(4)));

        var descriptors = new Dictionary<ulong, byte[]>();
        for (int offset = 8; offset < d.Length;)
        {
            int idLength = (int)BinaryPrimitives.ReadUInt32BigEndian(d.AsSpan(offset + 20));
            var descriptor = d[offset..(offset + 24 + idLength)];
            descriptors[BinaryPrimitives.ReadUInt64BigEndian(descriptor)] = descriptor;
            offset += 24 + idLength;
        }
        Assert.Equal([0xA1ul, 0xB1ul], descriptors.Keys.Order());

        var a = descriptors[0xA1];
        Assert.Equal(0x01, a[12] & 0x01);   // R_HOLDER
        Assert.Equal(0x03, a[13]);          // scope 0, type EA
        Assert.Equal(1, BinaryPrimitives.ReadUInt16BigEndian(a.AsSpan(18)));   // relative target port identifier
        AssertTransportId(a[24..], s.A.InitiatorPortName);
        Assert.Equal("iqn.2026-11.test:a,i,0x23d000000001", s.A.InitiatorPortName);

        var b = descriptors[0xB1];
        Assert.Equal(0x00, b[12] & 0x01);
        Assert.Equal(0x00, b[13]);
        AssertTransportId(b[24..], s.B.InitiatorPortName);
    }

    /// <summary>iSCSI TransportID, format 01b (SPC-4 §7.6.4.6): 45h, length (multiple of 4, at least 20), NUL-terminated port name.</summary>
    private static void AssertTransportId(byte[] id, string initiatorPortName)
    {
        Assert.Equal(0x45, id[0]);
        int length = BinaryPrimitives.ReadUInt16BigEndian(id.AsSpan(2));
        Assert.Equal(id.Length - 4, length);
        Assert.Equal(0, length % 4);
        Assert.True(length >= 20);
        var name = Encoding.UTF8.GetBytes(initiatorPortName);
        Assert.Equal(name, id[4..(4 + name.Length)]);
        Assert.All(id[(4 + name.Length)..], b => Assert.Equal(0, b));
        Assert.True(length >= name.Length + 1);
    }

    // ---------------------------------------------------------------- APTPL

    [Fact]
    public async Task Aptpl_state_is_persisted_and_restored_by_a_new_logical_unit()
    {
        var store = new MemoryStore();
        var unitId = Guid.NewGuid();
        using var directory = new TempDirectory();
        string image = Path.Combine(directory.Path, "aptpl.img");
        ItNexus a = LuHarness.Nexus("iqn.2026-11.test:a"), b = LuHarness.Nexus("iqn.2026-11.test:b"), c = LuHarness.Nexus("iqn.2026-11.test:c");

        await using (var lu = LuHarness.Open(CreateImage(image), unitId, store))
        {
            foreach (var n in new[] { a, b, c }) await lu.RunAsync(n, Cdb.TestUnitReady());
            (await lu.RunAsync(a, ScsiCdb.PersistentReserveOut(Register), ScsiCdb.PrParameters(0, 0xA1, aptpl: true))).AssertGood();
            (await lu.RunAsync(b, ScsiCdb.PersistentReserveOut(Register), ScsiCdb.PrParameters(0, 0xB1, aptpl: true))).AssertGood();
            (await lu.RunAsync(a, ScsiCdb.PersistentReserveOut(Reserve, PersistentReservationType.WriteExclusiveRegistrantsOnly), ScsiCdb.PrParameters(0xA1))).AssertGood();
        }
        var saved = store.Load(unitId);
        Assert.NotNull(saved);
        Assert.Equal(2u, saved.Generation);
        Assert.Equal((byte)PersistentReservationType.WriteExclusiveRegistrantsOnly, saved.Type);
        Assert.Equal(a.Key, saved.HolderNexusKey);
        Assert.Equal([0xA1ul, 0xB1ul], saved.Registrations.Select(r => r.Key).Order());

        await using (var lu = LuHarness.Open(image, unitId, store))   // "power cycle": a new unit over the same image
        {
            foreach (var n in new[] { a, b, c }) await lu.RunAsync(n, Cdb.TestUnitReady());
            var keys = await lu.RunAsync(c, ScsiCdb.PersistentReserveIn(ReadKeys));
            Assert.Equal(2u, BinaryPrimitives.ReadUInt32BigEndian(keys.DataIn));
            Assert.Equal(16u, BinaryPrimitives.ReadUInt32BigEndian(keys.DataIn.AsSpan(4)));
            var reservation = await lu.RunAsync(c, ScsiCdb.PersistentReserveIn(ReadReservation));
            Assert.Equal(0xA1ul, BinaryPrimitives.ReadUInt64BigEndian(reservation.DataIn.AsSpan(8)));
            Assert.Equal(0x05, reservation.DataIn[21]);
            Assert.Equal(0x81, (await lu.RunAsync(c, ScsiCdb.PersistentReserveIn(ReportCapabilities))).DataIn[3]);

            // The restored reservation is enforced, and the restored holder still holds it.
            Assert.Equal(ScsiStatus.ReservationConflict, (await lu.RunAsync(c, Cdb.Write10(0, 1), new byte[512])).Status);
            (await lu.RunAsync(b, Cdb.Write10(0, 1), new byte[512])).AssertGood();
            (await lu.RunAsync(a, ScsiCdb.PersistentReserveOut(Release, PersistentReservationType.WriteExclusiveRegistrantsOnly), ScsiCdb.PrParameters(0xA1))).AssertGood();
            (await lu.RunAsync(c, Cdb.Write10(0, 1), new byte[512])).AssertGood();
        }
    }

    [Fact]
    public async Task Registering_without_aptpl_drops_the_persisted_state()
    {
        var store = new MemoryStore();
        await using var s = await Setup.CreateAsync(store);
        var unitId = s.Lu.Unit.Identity.UnitId;
        (await s.Out(s.A, Register, 0, 0xA1, aptpl: true)).AssertGood();
        Assert.NotNull(store.Load(unitId));
        (await s.Out(s.A, Register, 0xA1, 0xA2, aptpl: false)).AssertGood();
        Assert.True(store.Saved.ContainsKey(unitId));
        Assert.Null(store.Load(unitId));
        Assert.Equal(0x80, (await s.In(s.A, ReportCapabilities))[3]);
    }

    [Fact]
    public async Task A_failing_store_fails_the_command()
    {
        await using var s = await Setup.CreateAsync(new FailingStore());
        var result = await s.Out(s.A, Register, 0, 0xA1, aptpl: true);
        result.AssertSense(SenseKey.IllegalRequest, 0x55, 0x04);
    }

    [Fact]
    public async Task A_register_that_fails_to_persist_changes_nothing()
    {
        // SPC-4 §6.16.2: PRgeneration is not incremented by a PERSISTENT RESERVE OUT command that is terminated
        // due to an error; a registration the command reports as failed must not be in force either.
        await using var s = await Setup.CreateAsync(new FailingStore());
        (await s.Out(s.A, Register, 0, 0xA1, aptpl: true)).AssertSense(SenseKey.IllegalRequest, 0x55, 0x04);
        await s.AssertKeysAsync(0u);
    }

    private sealed class FailingStore : IPersistentReservationStore
    {
        public PersistedReservations? Load(Guid unitId) => null;
        public void Save(Guid unitId, PersistedReservations? state) => throw new IOException("disk full");
    }

    private static string CreateImage(string path)
    {
        using (var stream = File.Create(path)) stream.SetLength(1 << 20);
        return path;
    }
}
