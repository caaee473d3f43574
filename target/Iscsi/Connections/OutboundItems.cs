using ISCSISnap.Target.Iscsi.Pdus;
using ISCSISnap.Target.Iscsi.Sessions;
using ISCSISnap.Target.Scsi;

namespace ISCSISnap.Target.Iscsi.Connections;

/// <summary>
/// Something queued for a connection's send loop. Sequence numbers (StatSN, ExpCmdSN, MaxCmdSN, DataSN) are
/// stamped when the PDU is built, so they are always in send order and current.
/// </summary>
internal abstract class OutboundItem
{
    /// <summary>Writes PDUs into <paramref name="batch"/>; false when the batch filled up first (call again with the next batch).</summary>
    public abstract bool Emit(SendBatch batch, IscsiConnection connection);

    /// <summary>The bytes went to the transport (<paramref name="sent"/>) or the connection died before.</summary>
    public abstract void OnSent(IscsiConnection connection, bool sent);

    /// <summary>
    /// Memory this item holds while queued, for the connection's outbound backlog: its header, plus any payload it
    /// copied. Data-In lives in the command's buffer, charged to the I/O memory budget instead. Constant while queued.
    /// </summary>
    public virtual int QueuedBytes => Bhs.Size;

    /// <summary>The connection's final PDU: the send side is shut down after it and nothing queued later goes out.</summary>
    public bool EndsConnection { get; set; }
}

/// <summary>Ends a connection's stream without a PDU (a connection dropped before its login completed).</summary>
internal sealed class EndOfStreamItem : OutboundItem
{
    public override bool Emit(SendBatch batch, IscsiConnection connection) => true;
    public override void OnSent(IscsiConnection connection, bool sent) { }
    public override int QueuedBytes => 0;
}

/// <summary>Data-In PDUs (status collapsed into the last when possible) and/or the SCSI Response of one task.</summary>
internal sealed class TaskResponseItem : OutboundItem
{
    private readonly IscsiTask _task;

    public TaskResponseItem(IscsiTask task) => _task = task;

    public override bool Emit(SendBatch batch, IscsiConnection connection)
    {
        var task = _task;
        var command = task.Command;
        var parameters = connection.Parameters;

        ComputeResidual(task, out byte residualFlags, out uint residualCount, out int dataInToSend);
        bool collapse = command.Status == ScsiStatus.Good && dataInToSend > 0;

        while (task.DataInSent < dataInToSend)
        {
            if (!batch.HasRoom) return false;
            int burst = parameters.MaxBurstLength;
            int burstLeft = burst - task.DataInSent % burst;
            int length = Math.Min(Math.Min(dataInToSend - task.DataInSent, parameters.InitiatorMaxRecvDataSegmentLength), burstLeft);
            bool last = task.DataInSent + length == dataInToSend;
            var h = batch.NewHeader();
            h[0] = (byte)Opcode.ScsiDataIn;
            byte flags = 0;
            if (last || length == burstLeft) flags |= 0x80;                 // F: end of a sequence
            if (last && collapse)
            {
                flags |= (byte)(0x01 | residualFlags);                      // S, O/U
                h[3] = (byte)command.Status;
                HeaderWriter.U32(h, 24, connection.NextStatSN());
                HeaderWriter.U32(h, 44, residualCount);
            }
            h[1] = flags;
            HeaderWriter.U64(h, 8, task.LunField);
            HeaderWriter.U32(h, 16, task.Itt);
            HeaderWriter.U32(h, 20, 0xFFFFFFFF);
            connection.StampCmdSN(h);
            HeaderWriter.U32(h, 36, task.DataInSN++);
            HeaderWriter.U32(h, 40, (uint)task.DataInSent);
            batch.Commit(new ArraySegment<byte>(command.Buffer!, task.DataInSent, length));
            task.DataInSent += length;
        }

        if (!collapse)
        {
            if (!batch.HasRoom) return false;
            var h = batch.NewHeader();
            h[0] = (byte)Opcode.ScsiResponse;
            h[1] = (byte)(0x80 | residualFlags);
            h[2] = 0x00;                                                    // command completed at target
            h[3] = (byte)command.Status;
            HeaderWriter.U32(h, 16, task.Itt);
            HeaderWriter.U32(h, 24, connection.NextStatSN());
            connection.StampCmdSN(h);
            HeaderWriter.U32(h, 36, command.TransportWrite ? task.NextR2TSN : task.DataInSN);
            HeaderWriter.U32(h, 44, residualCount);
            var sense = command.Sense;
            if (sense.Length > 0)
            {
                var payload = batch.SmallPayload(2 + sense.Length);
                payload.AsSpan()[0] = (byte)(sense.Length >> 8);
                payload.AsSpan()[1] = (byte)sense.Length;
                sense.CopyTo(payload.AsSpan(2));
                batch.Commit(payload);
            }
            else
            {
                batch.Commit(default);
            }
        }
        return true;
    }

    /// <summary>
    /// Residuals (RFC 7143 §11.4.5): U when less than the expected data transfer length moved, O when the
    /// command wanted more than it.
    /// </summary>
    internal static void ComputeResidual(IscsiTask task, out byte flags, out uint count, out int dataInToSend)
    {
        var command = task.Command;
        long expected = command.ExpectedTransferLength;
        bool good = command.Status is ScsiStatus.Good or ScsiStatus.ConditionMet;
        long transferred;
        dataInToSend = 0;
        if (command.TransportWrite)
        {
            // What the command needed from the initiator, whatever became of it.
            transferred = command.DataOutMode != DataOutMode.None ? command.DataOutLength : 0;
        }
        else
        {
            transferred = good ? command.DataInLength : 0;
            if (good && command.TransportRead) dataInToSend = (int)Math.Min(transferred, expected);
        }
        if (transferred < expected)
        {
            flags = 0x02;   // U: less than the expected data transfer length moved
            count = (uint)(expected - transferred);
        }
        else if (transferred > expected)
        {
            flags = 0x04;   // O: the command wanted more than the expected data transfer length
            count = (uint)(transferred - expected);
        }
        else
        {
            flags = 0;
            count = 0;
        }
    }

    public override void OnSent(IscsiConnection connection, bool sent) => _task.Session.ReleaseTask(_task);
}

/// <summary>One Ready To Transfer PDU soliciting a burst of a write's data.</summary>
internal sealed class R2TItem : OutboundItem
{
    private readonly IscsiTask _task;

    public R2TItem(IscsiTask task) => _task = task;

    public bool InUse;
    /// <summary>In the connection's send queue: set when queued, cleared once sent or dropped.</summary>
    public volatile bool Queued;
    public int Generation;
    public uint R2TSN;
    public int Offset;
    public int Length;

    public override bool Emit(SendBatch batch, IscsiConnection connection)
    {
        if (Generation != _task.Generation || _task.Aborted) return true;   // the task went away: nothing to solicit
        if (!batch.HasRoom) return false;
        var h = batch.NewHeader();
        h[0] = (byte)Opcode.ReadyToTransfer;
        h[1] = 0x80;
        HeaderWriter.U64(h, 8, _task.LunField);
        HeaderWriter.U32(h, 16, _task.Itt);
        HeaderWriter.U32(h, 20, _task.TargetTransferTag);
        HeaderWriter.U32(h, 24, connection.PeekStatSN());
        connection.StampCmdSN(h);
        HeaderWriter.U32(h, 36, R2TSN);
        HeaderWriter.U32(h, 40, (uint)Offset);
        HeaderWriter.U32(h, 44, (uint)Length);
        batch.Commit(default);
        return true;
    }

    public override void OnSent(IscsiConnection connection, bool sent) => Queued = false;
}

/// <summary>
/// A control PDU (login, text, NOP-In, TMF, logout, reject, async): its header is prepared by the producer; the
/// sender stamps StatSN (advancing it or not) and the CmdSN window.
/// </summary>
internal sealed class ControlPduItem : OutboundItem
{
    public readonly byte[] Header = new byte[Bhs.Size];
    public byte[]? Data { get; private set; }
    public int DataLength { get; private set; }
    /// <summary>Stamp the connection's StatSN at offset 24 and advance it (a status PDU).</summary>
    public bool AdvancesStatSN = true;
    /// <summary>Stamp StatSN without advancing it (NOP-In pings, Async messages carry the next StatSN).</summary>
    public bool StampsStatSN = true;
    /// <summary>The final login response: PDUs after it use the negotiated digests.</summary>
    public bool ChangesFraming;

    public ControlPduItem(Opcode opcode, byte flags = 0x80)
    {
        Header[0] = (byte)opcode;
        Header[1] = flags;
    }

    /// <summary>The PDU's data segment, copied to the pinned object heap (see <see cref="SendBatch"/>).</summary>
    public void SetData(ReadOnlySpan<byte> data)
    {
        if (data.IsEmpty)
        {
            Data = null;
            DataLength = 0;
            return;
        }
        var pinned = GC.AllocateUninitializedArray<byte>(data.Length, pinned: true);
        data.CopyTo(pinned);
        Data = pinned;
        DataLength = data.Length;
    }

    public override bool Emit(SendBatch batch, IscsiConnection connection)
    {
        if (!batch.HasRoom) return false;
        var h = batch.NewHeader();
        Header.CopyTo(h);
        if (AdvancesStatSN) HeaderWriter.U32(h, 24, connection.NextStatSN());
        else if (StampsStatSN) HeaderWriter.U32(h, 24, connection.PeekStatSN());
        connection.StampCmdSN(h);
        batch.Commit(Data is null ? default : new ArraySegment<byte>(Data, 0, DataLength));
        return true;
    }

    public override void OnSent(IscsiConnection connection, bool sent) { }

    public override int QueuedBytes => Bhs.Size + DataLength;
}
