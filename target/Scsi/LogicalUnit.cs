using System.Buffers;
using ISCSISnap.Storage.Concurrency;
using System.Buffers.Binary;
using System.Collections.Concurrent;
using ISCSISnap.Storage.BlockDevices;

namespace ISCSISnap.Target.Scsi;

/// <summary>
/// A SCSI direct-access logical unit (SPC-4/SBC-3) over an <see cref="IBlockDevice"/>. The transport calls
/// <see cref="Begin"/> when a command arrives (in CmdSN order), streams or buffers its Data-Out, then calls
/// <see cref="ExecuteAsync"/>, and finally <see cref="Release"/> once the response is gone. Results are status
/// and sense data on the command, never exceptions.
/// Threading: every entry point is thread-safe; mode, reservation and unit-attention state change under
/// <see cref="_stateLock"/>, which the per-command fast path avoids.
/// </summary>
public sealed partial class LogicalUnit : IAsyncDisposable
{
    private static int s_nextOrdinal;

    private readonly object _stateLock = new();
    private readonly ConcurrentDictionary<string, NexusLunState> _nexusStates = new();
    private readonly SharedExclusiveGate _taskSet = new();
    private readonly SharedExclusiveGate _writeGate = new();
    private readonly IPersistentReservationStore? _reservationStore;

    public LogicalUnit(LogicalUnitIdentity identity, IBlockDevice device, LogicalUnitOptions? options = null,
        IPersistentReservationStore? reservationStore = null, ILunDirectory? directory = null, ICopyTargetResolver? copyTargets = null)
    {
        Identity = identity;
        Device = device;
        Options = options ?? new LogicalUnitOptions();
        Directory = directory;
        CopyTargets = copyTargets;
        _reservationStore = reservationStore;
        Ordinal = Interlocked.Increment(ref s_nextOrdinal);
        BlockSize = device.LogicalBlockSize;
        BlockShift = System.Numerics.BitOperations.Log2((uint)BlockSize);
        _writeCacheEnabled = Options.WriteCacheEnabled;
        MaxTransferBlocks = (uint)(Options.MaxTransferBytes / BlockSize);
        LoadPersistentReservations();
    }

    public LogicalUnitIdentity Identity { get; }
    public IBlockDevice Device { get; }

    /// <summary>
    /// The LUN's IO filter stack: READ data and streamed WRITE data pass through it by upcalls; empty (or null) it
    /// steps aside and the device is called directly.
    /// </summary>
    public ISCSISnap.Storage.Filters.FilterEngine? Filters { get; set; }

    private static readonly TimeSpan FilteredRequestDeadline = TimeSpan.FromSeconds(30);

    private ValueTask<IoStatus> FilteredReadAsync(ScsiCommand command, long offset, Memory<byte> destination)
    {
        var filters = Filters;
        if (filters is null || filters.IsEmpty) return Device.ReadAsync(offset, destination);
        return filters.ReadAsync(RequestOf(filters, command, ISCSISnap.Storage.Filters.IoOperation.Read, offset, destination.Length), destination);
    }

    private ValueTask<IoStatus> FilteredWriteAsync(ScsiCommand command, long offset, System.Buffers.ReadOnlySequence<byte> data)
    {
        var filters = Filters;
        if (filters is null || filters.IsEmpty) return Device.WriteAsync(offset, data, WriteFlags.None);
        return filters.WriteAsync(RequestOf(filters, command, ISCSISnap.Storage.Filters.IoOperation.Write, offset, (int)data.Length), data, WriteFlags.None);
    }

    private static ISCSISnap.Storage.Filters.RequestContext RequestOf(ISCSISnap.Storage.Filters.FilterEngine filters, ScsiCommand command,
        ISCSISnap.Storage.Filters.IoOperation operation, long offset, int length) =>
        new(filters.Lun, command.Nexus.InitiatorName, command.Nexus.Key, operation, offset, length, DateTimeOffset.UtcNow + FilteredRequestDeadline,
            System.Diagnostics.Stopwatch.GetTimestamp());
    public LogicalUnitOptions Options { get; }
    public ILunDirectory? Directory { get; set; }
    public ICopyTargetResolver? CopyTargets { get; set; }
    /// <summary>Small process-unique number used to index per-nexus caches.</summary>
    public int Ordinal { get; }
    public int BlockSize { get; }
    public int BlockShift { get; }
    public uint MaxTransferBlocks { get; }
    public long BlockCount => Device.Length >> BlockShift;
    public bool Thin => Device.SupportsDeallocation;
    public bool WriteProtected => Options.ReadOnly || Device.IsReadOnly || _softwareWriteProtect;

    /// <summary>Relative target port identifier and target port group reported in VPD 0x83 and REPORT TARGET PORT GROUPS.</summary>
    public ushort RelativeTargetPortId { get; set; } = 1;
    public ushort TargetPortGroup { get; set; } = 1;
    public string? TargetName { get; set; }

    // ---------------------------------------------------------------- the command pipeline

    /// <summary>
    /// First look at an arriving command: reservation conflicts, unit attentions, CDB checks, and how its
    /// Data-Out is to be delivered. Completes the command on any error, so the transport only has to drain data.
    /// </summary>
    public void Begin(ScsiCommand command)
    {
        command.Unit = this;
        var cdb = command.Cdb;
        var info = CommandTable.Lookup(cdb, out bool knownOpcode);
        if (info is null)
        {
            if (knownOpcode) command.CompleteCheckCondition(SenseCode.InvalidFieldInCdb, DescriptorSense, keySpecific: new SenseKeySpecific(true, 1, 4));
            else command.CompleteCheckCondition(SenseCode.InvalidOpcode, DescriptorSense, keySpecific: new SenseKeySpecific(true, 0, 7));
            return;
        }

        if (_reservationsActive && ReservationConflict(command, info))
        {
            command.Complete(ScsiStatus.ReservationConflict);
            return;
        }

        var nexusState = StateFor(command.Nexus);
        if (nexusState.PendingCount != 0 && !info.ExemptFromUnitAttention && TakeUnitAttention(nexusState, out var attention))
        {
            command.CompleteCheckCondition(attention, DescriptorSense);
            return;
        }

        if (command.Attribute == TaskAttribute.Aca)
        {
            command.CompleteCheckCondition(SenseCode.InvalidMessageError, DescriptorSense);
            return;
        }

        // Control byte: NACA (bit 2) and LINK (bit 0) are not supported.
        if ((cdb[info.CdbLength - 1] & 0x05) != 0 && cdb.Length >= info.CdbLength)
        {
            command.CompleteCheckCondition(SenseCode.InvalidFieldInCdb, DescriptorSense, keySpecific: new SenseKeySpecific(true, (ushort)(info.CdbLength - 1), 2));
            return;
        }

        Prepare(command, cdb);
    }

    /// <summary>Runs a command whose Data-Out (if any) has arrived. Always completes <paramref name="command"/>.</summary>
    public ValueTask ExecuteAsync(ScsiCommand command)
    {
        if (command.Completed) return ValueTask.CompletedTask;
        if (command.Attribute == TaskAttribute.HeadOfQueue) return Dispatch(command);
        if (command.Attribute == TaskAttribute.Ordered) return ExecuteOrderedAsync(command);
        if (_taskSet.TryEnterShared())
        {
            command.HoldsTaskSet = true;
            return Dispatch(command);
        }
        return ExecuteAfterOrderedAsync(command);
    }

    private async ValueTask ExecuteOrderedAsync(ScsiCommand command)
    {
        await _taskSet.EnterExclusiveAsync().ConfigureAwait(false);
        try
        {
            await Dispatch(command).ConfigureAwait(false);
        }
        finally
        {
            _taskSet.ExitExclusive();
        }
    }

    private async ValueTask ExecuteAfterOrderedAsync(ScsiCommand command)
    {
        await _taskSet.EnterSharedAsync().ConfigureAwait(false);
        command.HoldsTaskSet = true;
        await Dispatch(command).ConfigureAwait(false);
    }

    /// <summary>Releases what a command held (gates, buffers). Called exactly once per command by the transport.</summary>
    public void Release(ScsiCommand command)
    {
        if (command.HoldsTaskSet)
        {
            command.HoldsTaskSet = false;
            _taskSet.ExitShared();
        }
    }

    private ValueTask Dispatch(ScsiCommand command)
    {
        var cdb = command.Cdb;
        switch (cdb[0])
        {
            case 0x00: return TestUnitReady(command);
            case 0x03: return RequestSense(command);
            case 0x04: return FormatUnit(command);
            case 0x08: case 0x28: case 0xA8: case 0x88:
                return ReadAsync(command);
            case 0x0A: case 0x2A: case 0xAA: case 0x8A:
                return FinishStreamedWriteAsync(command);
            case 0x12: return Inquiry(command);
            case 0x15: case 0x55: return ModeSelect(command);
            case 0x16: case 0x56: return Reserve(command);
            case 0x17: case 0x57: return ReleaseReservation(command);
            case 0x1A: case 0x5A: return ModeSense(command);
            case 0x1B: return StartStopUnit(command);
            case 0x1D: return SendDiagnostic(command);
            case 0x1E: return PreventAllow(command);
            case 0x25: return ReadCapacity10(command);
            case 0x2E: case 0xAE: case 0x8E: return WriteAndVerifyAsync(command);
            case 0x2F: case 0xAF: case 0x8F: return VerifyAsync(command);
            case 0x34: case 0x90: return PreFetch(command);
            case 0x35: case 0x91: return SynchronizeCacheAsync(command);
            case 0x37: case 0xB7: return ReadDefectData(command);
            case 0x41: case 0x93: return WriteSameAsync(command);
            case 0x42: return UnmapAsync(command);
            case 0x5E: return PersistentReserveIn(command);
            case 0x5F: return PersistentReserveOut(command);
            case 0x83: return ExtendedCopyAsync(command);
            case 0x84: return ReceiveCopyResults(command);
            case 0x89: return CompareAndWriteAsync(command);
            case 0x8B: return OrWriteAsync(command);
            case 0x9C: return WriteAtomicAsync(command);
            case 0x9E:
                return (cdb[1] & 0x1F) == 0x10 ? ReadCapacity16(command) : GetLbaStatusAsync(command);
            case 0xA0:
                ClearUnitAttention(command.Nexus, SenseCode.ReportedLunsDataChanged);
                ReportLuns.Execute(command, Directory?.LunNumbers ?? [0]);
                return ValueTask.CompletedTask;
            case 0xA3:
                return (cdb[1] & 0x1F) switch
                {
                    0x0A => ReportTargetPortGroups(command),
                    0x0C => ReportSupportedOperationCodes(command),
                    _ => ReportSupportedTaskManagementFunctions(command),
                };
            default:
                command.CompleteCheckCondition(SenseCode.InvalidOpcode, DescriptorSense);
                return ValueTask.CompletedTask;
        }
    }

    // ---------------------------------------------------------------- helpers shared by handlers

    internal bool DescriptorSense => _descriptorSense;

    internal void Fail(ScsiCommand command, SenseCode code, uint? information = null) =>
        command.CompleteCheckCondition(code, DescriptorSense, information);

    internal void FailField(ScsiCommand command, int cdbByte, int? bit = null, SenseCode? code = null) =>
        command.CompleteCheckCondition(code ?? SenseCode.InvalidFieldInCdb, DescriptorSense,
            keySpecific: new SenseKeySpecific(true, (ushort)cdbByte, bit is { } b ? (byte)b : null));

    internal void FailParameter(ScsiCommand command, int parameterByte, SenseCode? code = null) =>
        command.CompleteCheckCondition(code ?? SenseCode.InvalidFieldInParameterList, DescriptorSense,
            keySpecific: new SenseKeySpecific(false, (ushort)parameterByte));

    internal static SenseCode MapStatus(IoStatus status, bool write) => status switch
    {
        IoStatus.OutOfRange => SenseCode.LbaOutOfRange,
        IoStatus.WriteProtected => SenseCode.WriteProtected,
        IoStatus.NoSpace => SenseCode.SpaceAllocationFailedWriteProtect,
        IoStatus.NotReady => SenseCode.NotReadyCauseNotReportable,
        IoStatus.ReadError => SenseCode.UnrecoveredReadError,
        IoStatus.Misaligned => SenseCode.InvalidFieldInCdb,
        _ => write ? SenseCode.WriteError : SenseCode.UnrecoveredReadError,
    };

    /// <summary>Completes <paramref name="command"/> from a storage status: GOOD with Data-In, or the matching sense.</summary>
    internal void CompleteFrom(ScsiCommand command, IoStatus status, bool write, int dataInLength = 0)
    {
        if (status == IoStatus.Ok) command.CompleteGood(dataInLength);
        else Fail(command, MapStatus(status, write));
    }

    /// <summary>Checks an LBA range without overflow: lba + blocks must not exceed the capacity.</summary>
    internal bool RangeValid(ulong lba, ulong blocks)
    {
        ulong capacity = (ulong)BlockCount;
        return lba <= capacity && blocks <= capacity - lba;
    }

    internal static ulong ReadLba(ReadOnlySpan<byte> cdb) => cdb[0] switch
    {
        0x08 or 0x0A => (ulong)(((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]),
        >= 0x80 and < 0xA0 => BinaryPrimitives.ReadUInt64BigEndian(cdb.Slice(2)),
        _ => BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(2)),
    };

    internal static uint ReadTransferLength(ReadOnlySpan<byte> cdb) => cdb[0] switch
    {
        0x08 or 0x0A => cdb[4] == 0 ? 256u : cdb[4],
        >= 0x80 and < 0xA0 => BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(10)),
        >= 0xA0 => BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(6)),
        _ => BinaryPrimitives.ReadUInt16BigEndian(cdb.Slice(7)),
    };

    /// <summary>Allocation length of commands that carry one (INQUIRY, MODE SENSE, ...), by CDB layout.</summary>
    internal static int ClampAllocation(long available, long allocation) => (int)Math.Min(available, allocation);

    public async ValueTask DisposeAsync()
    {
        await Device.DisposeAsync().ConfigureAwait(false);
    }

    public override string ToString() => $"LU {Identity.NaaHex} ({BlockCount} x {BlockSize})";
}
