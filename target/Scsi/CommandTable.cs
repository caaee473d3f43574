namespace ISCSISnap.Target.Scsi;

/// <summary>How a command is treated while another I_T nexus holds a reservation (SPC-4 §5.13, SBC-3 §4.17).</summary>
public enum ReservationClass : byte
{
    /// <summary>Never conflicts (INQUIRY, REPORT LUNS, REQUEST SENSE, PR IN/OUT, TEST UNIT READY, READ CAPACITY, ...).</summary>
    Allowed,
    /// <summary>Reads the medium or configuration: conflicts under exclusive-access types.</summary>
    Read,
    /// <summary>Changes the medium or configuration: conflicts under every type for non-holders.</summary>
    Write,
    /// <summary>RESERVE/RELEASE(6/10): conflict while a persistent reservation exists.</summary>
    LegacyReservation,
}

/// <summary>One supported operation (opcode and, where the opcode has them, service action).</summary>
public sealed record CommandInfo(
    byte Opcode,
    ushort ServiceAction,
    bool HasServiceAction,
    string Name,
    byte[] Usage,
    ReservationClass Reservation,
    bool ExemptFromUnitAttention = false,
    int NominalTimeoutSeconds = 0,
    int RecommendedTimeoutSeconds = 30)
{
    public int CdbLength => Usage.Length;
}

/// <summary>
/// Every command the logical unit implements, with its CDB usage data (the bits it examines). The same table
/// answers REPORT SUPPORTED OPERATION CODES and decides reservation and unit-attention handling, so the two
/// never disagree.
/// </summary>
public static class CommandTable
{
    private static readonly Dictionary<int, CommandInfo> s_byKey = new();
    private static readonly HashSet<byte> s_opcodesWithServiceActions = new();

    public static IReadOnlyList<CommandInfo> All { get; }

    static CommandTable()
    {
        var list = new List<CommandInfo>
        {
            C(0x00, "TEST UNIT READY", ReservationClass.Allowed, "00 00 00 00 00 00"),
            C(0x03, "REQUEST SENSE", ReservationClass.Allowed, "03 01 00 00 FF 00", exempt: true),
            C(0x04, "FORMAT UNIT", ReservationClass.Write, "04 18 00 00 00 00", timeout: 600),
            C(0x08, "READ(6)", ReservationClass.Read, "08 1F FF FF FF 00"),
            C(0x0A, "WRITE(6)", ReservationClass.Write, "0A 1F FF FF FF 00"),
            C(0x12, "INQUIRY", ReservationClass.Allowed, "12 01 FF FF FF 00", exempt: true),
            C(0x15, "MODE SELECT(6)", ReservationClass.Write, "15 11 00 00 FF 00"),
            C(0x16, "RESERVE(6)", ReservationClass.LegacyReservation, "16 00 00 00 00 00"),
            C(0x17, "RELEASE(6)", ReservationClass.LegacyReservation, "17 00 00 00 00 00"),
            C(0x1A, "MODE SENSE(6)", ReservationClass.Read, "1A 08 FF FF FF 00"),
            C(0x1B, "START STOP UNIT", ReservationClass.Write, "1B 01 00 0F F7 00"),
            C(0x1D, "SEND DIAGNOSTIC", ReservationClass.Write, "1D 04 00 00 00 00"),
            C(0x1E, "PREVENT ALLOW MEDIUM REMOVAL", ReservationClass.Write, "1E 00 00 00 03 00"),
            C(0x25, "READ CAPACITY(10)", ReservationClass.Allowed, "25 00 00 00 00 00 00 00 00 00"),
            C(0x28, "READ(10)", ReservationClass.Read, "28 1A FF FF FF FF 1F FF FF 00"),
            C(0x2A, "WRITE(10)", ReservationClass.Write, "2A 1A FF FF FF FF 1F FF FF 00"),
            C(0x2E, "WRITE AND VERIFY(10)", ReservationClass.Write, "2E 12 FF FF FF FF 1F FF FF 00"),
            C(0x2F, "VERIFY(10)", ReservationClass.Read, "2F 12 FF FF FF FF 1F FF FF 00"),
            C(0x34, "PRE-FETCH(10)", ReservationClass.Read, "34 02 FF FF FF FF 1F FF FF 00"),
            C(0x35, "SYNCHRONIZE CACHE(10)", ReservationClass.Write, "35 06 FF FF FF FF 1F FF FF 00"),
            C(0x37, "READ DEFECT DATA(10)", ReservationClass.Read, "37 00 1F 00 00 00 00 FF FF 00"),
            C(0x41, "WRITE SAME(10)", ReservationClass.Write, "41 18 FF FF FF FF 1F FF FF 00"),
            C(0x42, "UNMAP", ReservationClass.Write, "42 01 00 00 00 00 1F FF FF 00"),
            C(0x55, "MODE SELECT(10)", ReservationClass.Write, "55 11 00 00 00 00 00 FF FF 00"),
            C(0x56, "RESERVE(10)", ReservationClass.LegacyReservation, "56 00 00 00 00 00 00 00 00 00"),
            C(0x57, "RELEASE(10)", ReservationClass.LegacyReservation, "57 00 00 00 00 00 00 00 00 00"),
            C(0x5A, "MODE SENSE(10)", ReservationClass.Read, "5A 18 FF FF 00 00 00 FF FF 00"),
            S(0x5E, 0x00, "PERSISTENT RESERVE IN / READ KEYS", ReservationClass.Allowed, "5E 1F 00 00 00 00 00 FF FF 00", exempt: true),
            S(0x5E, 0x01, "PERSISTENT RESERVE IN / READ RESERVATION", ReservationClass.Allowed, "5E 1F 00 00 00 00 00 FF FF 00", exempt: true),
            S(0x5E, 0x02, "PERSISTENT RESERVE IN / REPORT CAPABILITIES", ReservationClass.Allowed, "5E 1F 00 00 00 00 00 FF FF 00", exempt: true),
            S(0x5E, 0x03, "PERSISTENT RESERVE IN / READ FULL STATUS", ReservationClass.Allowed, "5E 1F 00 00 00 00 00 FF FF 00", exempt: true),
            S(0x5F, 0x00, "PERSISTENT RESERVE OUT / REGISTER", ReservationClass.Allowed, "5F 1F FF 00 00 FF FF FF FF 00"),
            S(0x5F, 0x01, "PERSISTENT RESERVE OUT / RESERVE", ReservationClass.Allowed, "5F 1F FF 00 00 FF FF FF FF 00"),
            S(0x5F, 0x02, "PERSISTENT RESERVE OUT / RELEASE", ReservationClass.Allowed, "5F 1F FF 00 00 FF FF FF FF 00"),
            S(0x5F, 0x03, "PERSISTENT RESERVE OUT / CLEAR", ReservationClass.Allowed, "5F 1F FF 00 00 FF FF FF FF 00"),
            S(0x5F, 0x04, "PERSISTENT RESERVE OUT / PREEMPT", ReservationClass.Allowed, "5F 1F FF 00 00 FF FF FF FF 00"),
            S(0x5F, 0x05, "PERSISTENT RESERVE OUT / PREEMPT AND ABORT", ReservationClass.Allowed, "5F 1F FF 00 00 FF FF FF FF 00"),
            S(0x5F, 0x06, "PERSISTENT RESERVE OUT / REGISTER AND IGNORE EXISTING KEY", ReservationClass.Allowed, "5F 1F FF 00 00 FF FF FF FF 00"),
            S(0x5F, 0x07, "PERSISTENT RESERVE OUT / REGISTER AND MOVE", ReservationClass.Allowed, "5F 1F FF 00 00 FF FF FF FF 00"),
            S(0x83, 0x00, "EXTENDED COPY(LID1)", ReservationClass.Write, "83 1F 00 00 00 00 00 00 00 00 FF FF FF FF 00 00", timeout: 600),
            S(0x84, 0x00, "RECEIVE COPY RESULTS / COPY STATUS", ReservationClass.Read, "84 1F FF 00 00 00 00 00 00 00 FF FF FF FF 00 00"),
            S(0x84, 0x03, "RECEIVE COPY RESULTS / OPERATING PARAMETERS", ReservationClass.Read, "84 1F FF 00 00 00 00 00 00 00 FF FF FF FF 00 00"),
            C(0x88, "READ(16)", ReservationClass.Read, "88 1A FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"),
            C(0x89, "COMPARE AND WRITE", ReservationClass.Write, "89 1A FF FF FF FF FF FF FF FF 00 00 00 FF 1F 00"),
            C(0x8A, "WRITE(16)", ReservationClass.Write, "8A 1A FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"),
            C(0x8B, "ORWRITE(16)", ReservationClass.Write, "8B 1A FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"),
            C(0x8E, "WRITE AND VERIFY(16)", ReservationClass.Write, "8E 12 FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"),
            C(0x8F, "VERIFY(16)", ReservationClass.Read, "8F 12 FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"),
            C(0x90, "PRE-FETCH(16)", ReservationClass.Read, "90 02 FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"),
            C(0x91, "SYNCHRONIZE CACHE(16)", ReservationClass.Write, "91 06 FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"),
            C(0x93, "WRITE SAME(16)", ReservationClass.Write, "93 19 FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"),
            C(0x9C, "WRITE ATOMIC(16)", ReservationClass.Write, "9C 18 FF FF FF FF FF FF FF FF 00 00 FF FF 1F 00"),
            S(0x9E, 0x10, "READ CAPACITY(16)", ReservationClass.Allowed, "9E 1F 00 00 00 00 00 00 00 00 FF FF FF FF 00 00"),
            S(0x9E, 0x12, "GET LBA STATUS", ReservationClass.Read, "9E 1F FF FF FF FF FF FF FF FF FF FF FF FF 00 00"),
            C(0xA0, "REPORT LUNS", ReservationClass.Allowed, "A0 00 FF 00 00 00 FF FF FF FF 00 00", exempt: true),
            S(0xA3, 0x0A, "REPORT TARGET PORT GROUPS", ReservationClass.Allowed, "A3 FF 00 00 00 00 FF FF FF FF 00 00"),
            S(0xA3, 0x0C, "REPORT SUPPORTED OPERATION CODES", ReservationClass.Allowed, "A3 1F 87 FF FF FF FF FF FF FF 00 00"),
            S(0xA3, 0x0D, "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS", ReservationClass.Allowed, "A3 1F 80 00 00 00 FF FF FF FF 00 00"),
            C(0xA8, "READ(12)", ReservationClass.Read, "A8 1A FF FF FF FF FF FF FF FF 1F 00"),
            C(0xAA, "WRITE(12)", ReservationClass.Write, "AA 1A FF FF FF FF FF FF FF FF 1F 00"),
            C(0xAE, "WRITE AND VERIFY(12)", ReservationClass.Write, "AE 12 FF FF FF FF FF FF FF FF 1F 00"),
            C(0xAF, "VERIFY(12)", ReservationClass.Read, "AF 12 FF FF FF FF FF FF FF FF 1F 00"),
            C(0xB7, "READ DEFECT DATA(12)", ReservationClass.Read, "B7 1F 00 00 00 00 FF FF FF FF 00 00"),
        };
        All = list;
        foreach (var info in list)
        {
            s_byKey[Key(info.Opcode, info.HasServiceAction ? info.ServiceAction : (ushort)0)] = info;
            if (info.HasServiceAction) s_opcodesWithServiceActions.Add(info.Opcode);
        }
    }

    private static int Key(byte opcode, ushort serviceAction) => (opcode << 16) | serviceAction;

    /// <summary>True when the opcode carries a service action in CDB byte 1 (bits 4:0).</summary>
    public static bool HasServiceActions(byte opcode) => s_opcodesWithServiceActions.Contains(opcode);

    /// <summary>The command for this CDB, or null. <paramref name="knownOpcode"/> tells an unknown opcode (20/00) from an unknown service action (24/00).</summary>
    public static CommandInfo? Lookup(ReadOnlySpan<byte> cdb, out bool knownOpcode)
    {
        byte opcode = cdb[0];
        ushort sa = 0;
        if (s_opcodesWithServiceActions.Contains(opcode))
        {
            sa = (ushort)(cdb[1] & 0x1F);
            knownOpcode = true;
        }
        else knownOpcode = s_byKey.ContainsKey(Key(opcode, 0));
        return s_byKey.GetValueOrDefault(Key(opcode, sa));
    }

    public static CommandInfo? Find(byte opcode, ushort serviceAction) =>
        s_byKey.GetValueOrDefault(Key(opcode, HasServiceActions(opcode) ? serviceAction : (ushort)0));

    private static CommandInfo C(byte opcode, string name, ReservationClass reservation, string usage, bool exempt = false, int timeout = 30) =>
        new(opcode, 0, false, name, Parse(usage), reservation, exempt, 0, timeout);

    private static CommandInfo S(byte opcode, ushort sa, string name, ReservationClass reservation, string usage, int timeout = 30, bool exempt = false)
    {
        var bytes = Parse(usage);
        bytes[1] = (byte)((bytes[1] & 0xE0) | sa);
        return new(opcode, sa, true, name, bytes, reservation, exempt, 0, timeout);
    }

    private static byte[] Parse(string hex) => hex.Split(' ').Select(b => Convert.ToByte(b, 16)).ToArray();
}
