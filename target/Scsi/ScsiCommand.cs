using System.Buffers.Binary;
using ISCSISnap.Storage.Buffers;

namespace ISCSISnap.Target.Scsi;

/// <summary>How a command's Data-Out is delivered to the logical unit.</summary>
public enum DataOutMode : byte
{
    /// <summary>The command takes no data from the initiator.</summary>
    None,
    /// <summary>Data is written to the medium as it arrives (WRITE family): no staging buffer.</summary>
    Stream,
    /// <summary>Data is collected into <see cref="ScsiCommand.Buffer"/> before the command executes (parameter lists, COMPARE AND WRITE).</summary>
    Buffered,
}

/// <summary>
/// One SCSI command as the logical unit sees it: CDB, nexus, data buffers and the result (status, sense, Data-In).
/// Instances are pooled by the transport and reused; <see cref="Reset"/> prepares one for the next command.
/// Threading: owned by one command at a time; the transport hands it to the LU and takes it back on completion.
/// </summary>
public sealed class ScsiCommand
{
    public const int MaxCdbLength = 260;
    public const int MaxSenseLength = 96;

    private readonly byte[] _cdb = new byte[MaxCdbLength];
    private readonly byte[] _sense = new byte[MaxSenseLength];

    public int CdbLength { get; private set; }
    public ReadOnlySpan<byte> Cdb => _cdb.AsSpan(0, CdbLength);
    public byte Opcode => _cdb[0];

    public ItNexus Nexus { get; set; } = null!;
    public ulong Lun { get; set; }
    public TaskAttribute Attribute { get; set; }
    /// <summary>Expected data transfer length the initiator announced (bytes).</summary>
    public uint ExpectedTransferLength { get; set; }
    public bool TransportRead { get; set; }
    public bool TransportWrite { get; set; }

    // Set by the logical unit when the command arrives.
    public DataOutMode DataOutMode { get; set; }
    /// <summary>Bytes of Data-Out the command needs (may differ from the expected transfer length).</summary>
    public int DataOutLength { get; set; }

    /// <summary>
    /// The share of the I/O memory budget this command's session may use (besides the appliance-wide
    /// <see cref="MemoryBudget.Shared"/>), so one session's large transfers cannot starve the others.
    /// </summary>
    public MemoryBudget? SessionBudget { get; set; }

    /// <summary>Pooled pinned buffer holding Data-In to send, or buffered Data-Out received.</summary>
    public byte[]? Buffer { get; private set; }
    /// <summary>Bytes of Data-In the command produced, from the start of <see cref="Buffer"/>.</summary>
    public int DataInLength { get; set; }

    public ScsiStatus Status { get; private set; }
    public bool Completed { get; private set; }
    public ReadOnlySpan<byte> Sense => _sense.AsSpan(0, SenseLength);
    public int SenseLength { get; private set; }
    /// <summary>Bytes of a buffered Data-Out the transport delivered into <see cref="Buffer"/>.</summary>
    public int DataOutReceived { get; set; }
    /// <summary>Per-command scratch for the logical unit (streaming write state).</summary>
    internal long StreamedBytes;
    internal int CarryLength;
    internal SenseCode? DeferredError;
    internal LogicalUnit? Unit;
    internal bool HoldsTaskSet;

    public void SetCdb(ReadOnlySpan<byte> cdb)
    {
        cdb.CopyTo(_cdb);
        CdbLength = cdb.Length;
    }

    public void Reset()
    {
        CdbLength = 0;
        Nexus = null!;
        Lun = 0;
        Attribute = TaskAttribute.Simple;
        ExpectedTransferLength = 0;
        TransportRead = TransportWrite = false;
        DataOutMode = DataOutMode.None;
        DataOutLength = 0;
        ReleaseBuffer();
        DataInLength = 0;
        Status = ScsiStatus.Good;
        Completed = false;
        SenseLength = 0;
        StreamedBytes = 0;
        CarryLength = 0;
        DataOutReceived = 0;
        DeferredError = null;
        Unit = null;
        HoldsTaskSet = false;
    }

    /// <summary>Makes sure <see cref="Buffer"/> holds at least <paramref name="length"/> bytes (contents undefined).</summary>
    public byte[] EnsureBuffer(int length)
    {
        if (Buffer is { } existing && existing.Length >= length) return existing;
        if (!TryEnsureBuffer(length)) throw new InsufficientMemoryException($"I/O buffer budget exhausted ({length} bytes)");
        return Buffer!;
    }

    /// <summary>
    /// Like <see cref="EnsureBuffer"/> for transfer-sized buffers, charged to the shared memory budget; false
    /// when the budget is exhausted (the command then ends with TASK SET FULL and the initiator retries).
    /// </summary>
    public bool TryEnsureBuffer(int length)
    {
        if (Buffer is { } existing && existing.Length >= length) return true;
        ReleaseBuffer();
        var size = Math.Max(length, 1);
        var array = PinnedBufferPool.Shared.Rent(size);
        if (SessionBudget is { } session && !session.TryReserve(array.Length))
        {
            PinnedBufferPool.Shared.Return(array);
            return false;
        }
        if (!MemoryBudget.Shared.TryReserve(array.Length))
        {
            SessionBudget?.Release(array.Length);
            PinnedBufferPool.Shared.Return(array);
            return false;
        }
        Buffer = array;
        return true;
    }

    public void ReleaseBuffer()
    {
        if (Buffer is { } buffer)
        {
            Buffer = null;
            MemoryBudget.Shared.Release(buffer.Length);
            SessionBudget?.Release(buffer.Length);
            PinnedBufferPool.Shared.Return(buffer);
        }
    }

    /// <summary>Completes with GOOD status, transferring <paramref name="dataInLength"/> bytes of <see cref="Buffer"/>.</summary>
    public void CompleteGood(int dataInLength = 0)
    {
        DataInLength = dataInLength;
        Status = ScsiStatus.Good;
        Completed = true;
    }

    public void Complete(ScsiStatus status)
    {
        DataInLength = 0;
        Status = status;
        Completed = true;
    }

    /// <summary>Completes with CHECK CONDITION and sense data in the format the LU's control mode page selects.</summary>
    public void CompleteCheckCondition(SenseCode code, bool descriptorFormat, uint? information = null, SenseKeySpecific? keySpecific = null)
    {
        DataInLength = 0;
        Status = ScsiStatus.CheckCondition;
        SenseLength = SenseData.Build(_sense, code, descriptorFormat, information, keySpecific);
        Completed = true;
    }

    /// <summary>Writes sense data into <paramref name="destination"/> (REQUEST SENSE) and returns its length.</summary>
    public static int WriteSense(Span<byte> destination, SenseCode code, bool descriptorFormat) =>
        SenseData.Build(destination, code, descriptorFormat, null, null);
}

/// <summary>SPC-4 sense-key-specific field pointer: which CDB or parameter byte (and bit) was at fault.</summary>
public readonly record struct SenseKeySpecific(bool InCdb, ushort FieldPointer, byte? BitPointer = null);

/// <summary>Builds fixed (70h) or descriptor (72h) format sense data (SPC-4 §4.5).</summary>
public static class SenseData
{
    public static int Build(Span<byte> sense, SenseCode code, bool descriptorFormat, uint? information, SenseKeySpecific? keySpecific)
    {
        if (descriptorFormat)
        {
            int length = 8;
            sense.Slice(0, 8).Clear();
            sense[0] = 0x72;
            sense[1] = (byte)code.Key;
            sense[2] = code.Asc;
            sense[3] = code.Ascq;
            if (information is { } info)
            {
                var d = sense.Slice(length, 12);
                d.Clear();
                d[0] = 0x00;        // information descriptor
                d[1] = 0x0A;
                d[2] = 0x80;        // VALID
                BinaryPrimitives.WriteUInt64BigEndian(d.Slice(4), info);
                length += 12;
            }
            if (keySpecific is { } ks)
            {
                var d = sense.Slice(length, 8);
                d.Clear();
                d[0] = 0x02;        // sense key specific descriptor
                d[1] = 0x06;
                WriteKeySpecific(d.Slice(4, 3), ks);
                length += 8;
            }
            sense[7] = (byte)(length - 8);
            return length;
        }
        else
        {
            var s = sense.Slice(0, 18);
            s.Clear();
            s[0] = 0x70;
            s[2] = (byte)code.Key;
            if (information is { } info)
            {
                s[0] |= 0x80;       // VALID
                BinaryPrimitives.WriteUInt32BigEndian(s.Slice(3), info);
            }
            s[7] = 10;
            s[12] = code.Asc;
            s[13] = code.Ascq;
            if (keySpecific is { } ks) WriteKeySpecific(s.Slice(15, 3), ks);
            return 18;
        }
    }

    private static void WriteKeySpecific(Span<byte> field, SenseKeySpecific ks)
    {
        field[0] = (byte)(0x80 | (ks.InCdb ? 0x40 : 0) | (ks.BitPointer is { } bit ? 0x08 | (bit & 7) : 0));
        BinaryPrimitives.WriteUInt16BigEndian(field.Slice(1), ks.FieldPointer);
    }
}
