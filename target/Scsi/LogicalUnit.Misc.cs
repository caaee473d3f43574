using System.Buffers.Binary;
using ISCSISnap.Storage.BlockDevices;

namespace ISCSISnap.Target.Scsi;

public sealed partial class LogicalUnit
{
    private ValueTask TestUnitReady(ScsiCommand command)
    {
        command.CompleteGood();
        return ValueTask.CompletedTask;
    }

    private ValueTask RequestSense(ScsiCommand command)
    {
        var cdb = command.Cdb;
        bool descriptor = (cdb[1] & 0x01) != 0;
        int allocation = cdb[4];
        var state = StateFor(command.Nexus);
        var code = new SenseCode(SenseKey.NoSense, 0, 0);
        if (state.PendingCount != 0 && TakeUnitAttention(state, out var attention)) code = attention;
        var buffer = command.EnsureBuffer(252);
        int length = ScsiCommand.WriteSense(buffer, code, descriptor);
        command.CompleteGood(Math.Min(length, allocation));
        return ValueTask.CompletedTask;
    }

    private ValueTask FormatUnit(ScsiCommand command)
    {
        // A virtual disk has no medium to format; the defaults (FMTDATA=0) are already in effect.
        command.CompleteGood();
        return ValueTask.CompletedTask;
    }

    private ValueTask StartStopUnit(ScsiCommand command)
    {
        var cdb = command.Cdb;
        int powerCondition = cdb[4] >> 4;
        bool loadEject = (cdb[4] & 0x02) != 0;
        if (powerCondition == 0 && loadEject)
        {
            FailField(command, 4, 1);   // the medium is not removable
            return ValueTask.CompletedTask;
        }
        // The unit is always ready: a stop request does not take it offline for other initiators.
        command.CompleteGood();
        return ValueTask.CompletedTask;
    }

    private async ValueTask SendDiagnostic(ScsiCommand command)
    {
        // Self-test: the first block must be readable.
        var status = await ReadRangeAsync(0, BlockSize, null).ConfigureAwait(false);
        if (status.Status == IoStatus.Ok) command.CompleteGood();
        else Fail(command, new SenseCode(SenseKey.HardwareError, 0x3E, 0x03));   // logical unit failed self-test
    }

    private ValueTask PreventAllow(ScsiCommand command)
    {
        // Not removable: nothing to lock, the request is accepted.
        command.CompleteGood();
        return ValueTask.CompletedTask;
    }

    private ValueTask ReadDefectData(ScsiCommand command)
    {
        var cdb = command.Cdb;
        bool twelve = cdb[0] == 0xB7;
        byte flags = (byte)((twelve ? cdb[1] : cdb[2]) & 0x1F);   // REQ_PLIST, REQ_GLIST, list format
        int allocation = twelve ? (int)BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(6)) : BinaryPrimitives.ReadUInt16BigEndian(cdb.Slice(7));
        int length = twelve ? 8 : 4;
        var buffer = command.EnsureBuffer(length);
        buffer.AsSpan(0, length).Clear();
        buffer[1] = flags;   // empty defect lists in the requested format
        command.CompleteGood(Math.Min(length, allocation));
        return ValueTask.CompletedTask;
    }

    private ValueTask ReportTargetPortGroups(ScsiCommand command)
    {
        var cdb = command.Cdb;
        bool extended = (cdb[1] >> 5) == 0x01;
        int allocation = (int)BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(6));
        int header = extended ? 8 : 4;
        int length = header + 8 + 4;
        var d = command.EnsureBuffer(length);
        d.AsSpan(0, length).Clear();
        BinaryPrimitives.WriteUInt32BigEndian(d, (uint)(length - 4));
        if (extended) d[4] = 0x10;                       // format type: extended header; implicit transition time 0
        var g = d.AsSpan(header);
        g[0] = (byte)(0x80 | (Options.NonOptimized ? 0x01 : 0x00));   // PREF; active/optimized or active/non-optimized
        g[1] = 0x03;                                     // supports AO and AN only: never standby
        BinaryPrimitives.WriteUInt16BigEndian(g.Slice(2), TargetPortGroup);
        g[7] = 1;                                        // one target port
        BinaryPrimitives.WriteUInt16BigEndian(g.Slice(10), RelativeTargetPortId);
        command.CompleteGood(Math.Min(length, allocation));
        return ValueTask.CompletedTask;
    }

    private ValueTask ReportSupportedTaskManagementFunctions(ScsiCommand command)
    {
        var cdb = command.Cdb;
        bool extended = (cdb[2] & 0x80) != 0;
        int allocation = (int)BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(6));
        if (allocation < 4)
        {
            FailField(command, 6);
            return ValueTask.CompletedTask;
        }
        int length = extended ? 16 : 4;
        var d = command.EnsureBuffer(length);
        d.AsSpan(0, length).Clear();
        d[0] = 0x80 | 0x40 | 0x10 | 0x08 | 0x02;   // ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET
        if (extended) d[3] = 0x0C;
        command.CompleteGood(Math.Min(length, allocation));
        return ValueTask.CompletedTask;
    }

    private ValueTask ReportSupportedOperationCodes(ScsiCommand command)
    {
        var cdb = command.Cdb;
        bool timeouts = (cdb[2] & 0x80) != 0;
        int options = cdb[2] & 0x07;
        byte requestedOpcode = cdb[3];
        ushort requestedAction = BinaryPrimitives.ReadUInt16BigEndian(cdb.Slice(4));
        uint allocation = BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(6));
        byte[] data;
        switch (options)
        {
            case 0:
            {
                var all = CommandTable.All;
                int entry = 8 + (timeouts ? 12 : 0);
                data = new byte[4 + entry * all.Count];
                BinaryPrimitives.WriteUInt32BigEndian(data, (uint)(entry * all.Count));
                int offset = 4;
                foreach (var info in all)
                {
                    var d = data.AsSpan(offset, entry);
                    d[0] = info.Opcode;
                    BinaryPrimitives.WriteUInt16BigEndian(d.Slice(2), info.HasServiceAction ? info.ServiceAction : (ushort)0);
                    d[5] = (byte)((timeouts ? 0x02 : 0) | (info.HasServiceAction ? 0x01 : 0));
                    BinaryPrimitives.WriteUInt16BigEndian(d.Slice(6), (ushort)info.CdbLength);
                    if (timeouts) WriteTimeouts(d.Slice(8), info);
                    offset += entry;
                }
                break;
            }
            case 1:
            case 2:
            case 3:
            {
                bool hasActions = CommandTable.HasServiceActions(requestedOpcode);
                if ((options == 1 && hasActions) || (options == 2 && !hasActions))
                {
                    FailField(command, 2, 0);
                    return ValueTask.CompletedTask;
                }
                var info = options == 1 ? CommandTable.Find(requestedOpcode, 0)
                    : hasActions ? CommandTable.Find(requestedOpcode, requestedAction) : CommandTable.Find(requestedOpcode, 0);
                if (options == 3 && !hasActions && requestedAction != 0) info = null;
                if (info is null)
                {
                    data = new byte[4];
                    data[1] = 0x01;   // not supported
                    break;
                }
                int length = 4 + info.CdbLength + (timeouts ? 12 : 0);
                data = new byte[length];
                data[1] = (byte)((timeouts ? 0x80 : 0) | 0x03);   // supported, in conformance with the standard
                BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(2), (ushort)info.CdbLength);
                info.Usage.CopyTo(data, 4);
                if (timeouts) WriteTimeouts(data.AsSpan(4 + info.CdbLength), info);
                break;
            }
            default:
                FailField(command, 2, 2);
                return ValueTask.CompletedTask;
        }
        var buffer = command.EnsureBuffer(data.Length);
        data.CopyTo(buffer, 0);
        command.CompleteGood((int)Math.Min(data.Length, allocation));
        return ValueTask.CompletedTask;

        static void WriteTimeouts(Span<byte> d, CommandInfo info)
        {
            d.Slice(0, 12).Clear();
            BinaryPrimitives.WriteUInt16BigEndian(d, 0x0A);
            BinaryPrimitives.WriteUInt32BigEndian(d.Slice(4), (uint)info.NominalTimeoutSeconds);
            BinaryPrimitives.WriteUInt32BigEndian(d.Slice(8), (uint)info.RecommendedTimeoutSeconds);
        }
    }
}
