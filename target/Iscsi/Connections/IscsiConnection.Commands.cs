using System.Buffers;
using System.Runtime.CompilerServices;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Iscsi.Pdus;
using ISCSISnap.Target.Iscsi.Sessions;
using ISCSISnap.Target.Scsi;

namespace ISCSISnap.Target.Iscsi.Connections;

internal sealed partial class IscsiConnection
{
    private uint _nextTargetTransferTag = (uint)Random.Shared.Next();

    private ValueTask HandleScsiCommandAsync(IncomingPdu pdu)
    {
        var session = Session!;
        ref readonly var h = ref pdu.Header;
        if (session.Type == SessionType.Discovery)
        {
            // No SCSI in discovery sessions; the rejected command still used its CmdSN, like every other.
            if (!h.Immediate && session.Admit(h.CmdSN, false) == IscsiSession.Admission.Accept) session.AdvanceWindow();
            SendReject(h, RejectReason.ProtocolError);
            return default;
        }
        bool immediate = h.Immediate;
        if (session.Admit(h.CmdSN, immediate) == IscsiSession.Admission.Ignore)
        {
            Log.CommandOutsideWindow(_log, Remote, h.CmdSN, session.ExpCmdSN, session.MaxCmdSN);
            _portal.Metrics.ProtocolError("cmdsn-window");
            return default;
        }

        var task = session.AllocateTask(h.InitiatorTaskTag, immediate, out var cause);
        if (task is null)
        {
            SendReject(h, cause switch
            {
                RejectCause.TaskInProgress => RejectReason.TaskInProgress,
                RejectCause.ImmediateLimit => RejectReason.ImmediateCommandRejected,
                _ => RejectReason.OutOfResources,
            });
            if (!immediate) session.AdvanceWindow();   // its CmdSN was consumed without taking a slot
            return default;
        }

        task.Connection = this;
        task.CmdSN = h.CmdSN;
        task.LunField = h.Lun;
        task.Phase = TaskPhase.Executing;
        task.StartTicks = System.Diagnostics.Stopwatch.GetTimestamp();
        var command = task.Command;
        byte flags = h.Flags;
        command.Nexus = session.Nexus!;
        command.Attribute = (TaskAttribute)(flags & 0x07);
        command.ExpectedTransferLength = h.ExpectedDataTransferLength;
        command.TransportRead = (flags & 0x40) != 0;
        command.TransportWrite = (flags & 0x20) != 0;
        command.Lun = LunAddressing.Decode(h.Lun, out bool lunValid);

        if (!TryLoadCdb(pdu, command, out var cdbFault))
        {
            command.SetCdb(h.AsReadOnlySpan().Slice(32, 16));
            command.CompleteCheckCondition(cdbFault, descriptorFormat: false);
        }
        else if (command.TransportRead && command.TransportWrite)
        {
            // Bidirectional commands (and the AHS they need) are not supported.
            command.CompleteCheckCondition(SenseCode.InvalidFieldInCdb, descriptorFormat: false);
        }
        else
        {
            var unit = lunValid ? session.Target!.GetLun(command.Lun) : null;
            task.Unit = unit;
            try
            {
                if (unit is null) MissingLogicalUnit.Handle(command, session.Target!);
                else unit.Begin(command);
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                // A fault in one command ends that command, never the connection.
                Log.CommandFailed(_log, e, Remote, command.Opcode);
                command.CompleteCheckCondition(SenseCode.InternalTargetFailure, unit?.DescriptorSense ?? false);
            }
        }

        if (!command.TransportWrite)
        {
            // Immediate data on a command that sends none is ignored; it never reaches the medium.
            return ExecuteAsync(task, kick: false);
        }
        return StartDataOutAsync(task, pdu);
    }

    private static bool TryLoadCdb(in IncomingPdu pdu, ScsiCommand command, out SenseCode fault)
    {
        fault = default;
        var cdb16 = pdu.Header.AsReadOnlySpan().Slice(32, 16);
        if (pdu.AdditionalHeaders.IsEmpty)
        {
            command.SetCdb(cdb16);
            return true;
        }
        // Extended CDB AHS (type 1): AHSLength(2) type(1) reserved(1) then CDB bytes 16 onwards.
        Span<byte> ahs = stackalloc byte[(int)Math.Min(pdu.AdditionalHeaders.Length, 1024)];
        pdu.AdditionalHeaders.Slice(0, ahs.Length).CopyTo(ahs);
        int offset = 0;
        bool loaded = false;
        Span<byte> cdb = stackalloc byte[ScsiCommand.MaxCdbLength];
        while (offset + 4 <= ahs.Length)
        {
            int length = (ahs[offset] << 8) | ahs[offset + 1];
            byte type = ahs[offset + 2];
            if (offset + 3 + length > ahs.Length) break;
            if (type == 1 && length >= 1 && !loaded)
            {
                int extra = length - 1;
                if (16 + extra > ScsiCommand.MaxCdbLength)
                {
                    fault = SenseCode.InvalidFieldInCdb;
                    return false;
                }
                cdb16.CopyTo(cdb);
                ahs.Slice(offset + 4, extra).CopyTo(cdb.Slice(16));
                command.SetCdb(cdb.Slice(0, 16 + extra));
                loaded = true;
            }
            else if (type == 2)
            {
                fault = SenseCode.InvalidFieldInCdb;   // bidirectional read length: not supported
                return false;
            }
            offset += (3 + length + 3) & ~3;
        }
        if (!loaded) command.SetCdb(cdb16);
        return true;
    }

    private ValueTask StartDataOutAsync(IscsiTask task, in IncomingPdu pdu)
    {
        var command = task.Command;
        var parameters = Parameters;
        int expected = (int)Math.Min(command.ExpectedTransferLength, int.MaxValue);
        int immediateLength = (int)pdu.Data.Length;
        bool final = pdu.Header.Final;

        if (immediateLength > 0 && !parameters.ImmediateData)
            return DataPhaseViolation(task, pdu.Header, "immediate data although ImmediateData=No");
        if (!final && parameters.InitialR2T)
            return DataPhaseViolation(task, pdu.Header, "unsolicited Data-Out announced although InitialR2T=Yes");
        int firstBurst = Math.Min(expected, parameters.FirstBurstLength);
        if (immediateLength > firstBurst)
            return DataPhaseViolation(task, pdu.Header, $"{immediateLength} bytes of immediate data exceed the first burst of {firstBurst}");

        task.DataOutTotal = expected;
        task.DataOutUseful = command.Completed || command.DataOutMode == DataOutMode.None
            ? 0
            : Math.Min(expected, command.DataOutLength);
        task.AwaitingUnsolicited = !final;
        task.UnsolicitedEnd = final ? immediateLength : firstBurst;
        task.BurstEnd = task.UnsolicitedEnd;
        task.SolicitNext = task.UnsolicitedEnd;
        task.SolicitEnd = Math.Max(task.UnsolicitedEnd, task.DataOutUseful);

        if (immediateLength > 0)
        {
            var delivered = DeliverDataAsync(task, 0, pdu.Data);
            if (!delivered.IsCompletedSuccessfully) return FinishImmediateDataAsync(delivered, task);
        }
        return AfterDataAsync(task);

        async ValueTask FinishImmediateDataAsync(ValueTask delivered, IscsiTask t)
        {
            await delivered.ConfigureAwait(false);
            await AfterDataAsync(t).ConfigureAwait(false);
        }
    }

    /// <summary>After some Data-Out arrived: solicit more, or run the command once everything is in.</summary>
    private ValueTask AfterDataAsync(IscsiTask task)
    {
        // Solicit only after the unsolicited burst is in: sequences then arrive in offset order even from
        // initiators that answer an R2T as soon as it arrives.
        if (!task.AwaitingUnsolicited) IssueR2Ts(task);
        if (task.DataOutComplete) return ExecuteAsync(task, kick: false);
        task.Phase = TaskPhase.ReceivingData;
        return default;
    }

    private void IssueR2Ts(IscsiTask task)
    {
        var parameters = Parameters;
        int limit = Math.Min(parameters.MaxOutstandingR2T, IscsiTask.MaxR2TPerTask);
        while (task.OutstandingR2T < limit && task.SolicitNext < task.SolicitEnd)
        {
            var r2t = task.FreeR2T();
            if (r2t is null) break;
            if (task.TargetTransferTag == 0xFFFFFFFF)
            {
                uint ttt = _nextTargetTransferTag++;
                if (ttt == 0xFFFFFFFF) ttt = _nextTargetTransferTag++;
                task.TargetTransferTag = ttt;
            }
            int length = Math.Min(parameters.MaxBurstLength, task.SolicitEnd - task.SolicitNext);
            r2t.InUse = true;
            r2t.Generation = task.Generation;
            r2t.R2TSN = task.NextR2TSN++;
            r2t.Offset = task.SolicitNext;
            r2t.Length = length;
            task.SolicitNext += length;
            task.OutstandingR2T++;
            r2t.Queued = true;
            Enqueue(r2t, kick: false);
        }
    }

    private ValueTask HandleDataOutAsync(IncomingPdu pdu, bool digestFailed = false)
    {
        ref readonly var h = ref pdu.Header;
        var session = Session!;
        var task = session.FindTask(h.InitiatorTaskTag);
        if (task is null || task.Connection != this || task.Phase != TaskPhase.ReceivingData)
        {
            // Data for a task that ended (aborted, failed early) or never existed: discard it.
            Log.DataOutForUnknownTask(_log, Remote, h.InitiatorTaskTag);
            return default;
        }
        if (task.Claim == 1)
        {
            // Aborted from another session while it waited for data: it ends here, silently.
            session.ReleaseTask(task);
            return default;
        }
        uint ttt = h.TargetTransferTag;
        int offset = (int)Math.Min(h.BufferOffset, int.MaxValue);
        int length = (int)pdu.Data.Length;
        bool unsolicited = ttt == 0xFFFFFFFF;

        if (unsolicited ? !task.AwaitingUnsolicited : ttt != task.TargetTransferTag)
            return DataPhaseViolation(task, h, unsolicited ? "unsolicited Data-Out after the first burst" : $"Data-Out with unknown TTT 0x{ttt:x8}");
        if (h.DataSN != task.ExpectedDataSN)
            return DataPhaseViolation(task, h, $"DataSN {h.DataSN}, expected {task.ExpectedDataSN}");
        if (offset != task.Received)
            return DataPhaseViolation(task, h, $"buffer offset {offset}, expected {task.Received} (DataPDUInOrder=Yes)");
        long end = (long)offset + length;
        int limit = unsolicited ? task.UnsolicitedEnd : OutstandingBurstEnd(task);
        if (end > limit || end > task.DataOutTotal)
            return DataPhaseViolation(task, h, $"Data-Out [{offset}, {end}) beyond the burst end {limit}");

        if (digestFailed)
        {
            task.DataDigestFailed = true;
            task.Received = (int)end;
            task.ExpectedDataSN++;
            return AfterDataOutPdu(task, h.Final, unsolicited);
        }

        var delivered = DeliverDataAsync(task, offset, pdu.Data);
        task.ExpectedDataSN++;
        if (!delivered.IsCompletedSuccessfully) return AwaitDelivery(delivered, task, h.Final, unsolicited);
        return AfterDataOutPdu(task, h.Final, unsolicited);

        async ValueTask AwaitDelivery(ValueTask pending, IscsiTask t, bool final, bool unsol)
        {
            await pending.ConfigureAwait(false);
            await AfterDataOutPdu(t, final, unsol).ConfigureAwait(false);
        }
    }

    private static int OutstandingBurstEnd(IscsiTask task)
    {
        // Solicited data arrives in R2T order; the furthest outstanding R2T bounds it.
        int end = task.UnsolicitedEnd;
        foreach (var r2t in task.R2Ts)
            if (r2t.InUse && r2t.Generation == task.Generation)
                end = Math.Max(end, r2t.Offset + r2t.Length);
        return end;
    }

    private ValueTask AfterDataOutPdu(IscsiTask task, bool final, bool unsolicited)
    {
        if (final)
        {
            task.ExpectedDataSN = 0;   // the next sequence (burst) numbers from zero
            if (unsolicited)
            {
                task.AwaitingUnsolicited = false;
            }
            else
            {
                // The R2T whose range ends here is satisfied.
                foreach (var r2t in task.R2Ts)
                {
                    if (r2t.InUse && r2t.Generation == task.Generation && r2t.Offset + r2t.Length == task.Received)
                    {
                        r2t.InUse = false;
                        task.OutstandingR2T--;
                        break;
                    }
                }
            }
        }
        else if (!unsolicited)
        {
            // Sequences must end with F=1; a sequence filled without it is still complete when its R2T range is.
            foreach (var r2t in task.R2Ts)
            {
                if (r2t.InUse && r2t.Generation == task.Generation && r2t.Offset + r2t.Length == task.Received)
                {
                    r2t.InUse = false;
                    task.OutstandingR2T--;
                    task.ExpectedDataSN = 0;
                    break;
                }
            }
        }
        return AfterDataAsync(task);
    }

    /// <summary>Hands Data-Out bytes at <paramref name="offset"/> to the logical unit; bytes past what the command needs are dropped.</summary>
    private ValueTask DeliverDataAsync(IscsiTask task, int offset, ReadOnlySequence<byte> data)
    {
        var command = task.Command;
        task.Received = offset + (int)data.Length;
        if (command.Completed || task.DataDigestFailed || offset >= task.DataOutUseful) return default;
        if (offset + data.Length > task.DataOutUseful) data = data.Slice(0, task.DataOutUseful - offset);
        if (command.DataOutMode == DataOutMode.Buffered)
        {
            data.CopyTo(command.Buffer.AsSpan(offset));
            command.DataOutReceived = Math.Max(command.DataOutReceived, offset + (int)data.Length);
            return default;
        }
        return task.Unit!.WriteStreamAsync(command, data);
    }

    private ValueTask DataPhaseViolation(IscsiTask task, in Bhs header, string reason)
    {
        // The data sequence of this task is broken (DataSN, offset, tag or burst length). Reject the PDU, which
        // tells the initiator the command failed, and drop the task without a response; the connection and the
        // other tasks carry on. Later Data-Out for the task finds no task and is discarded.
        Log.ProtocolViolation(_log, Remote, reason);
        _portal.Metrics.ProtocolError("data-sequence");
        SendReject(header, RejectReason.ProtocolError);
        if (Interlocked.CompareExchange(ref task.Claim, 1, 0) == 0)
        {
            task.Aborted = true;
            task.Session.ReleaseTask(task);
        }
        return default;
    }

    /// <summary>Runs the command on the logical unit (unless it already completed) and queues its response.</summary>
    private ValueTask ExecuteAsync(IscsiTask task, bool kick)
    {
        task.Phase = TaskPhase.Executing;
        var command = task.Command;
        if (task.DataDigestFailed && !command.Completed)
            command.CompleteCheckCondition(SenseCode.ProtocolServiceCrcError, task.Unit?.DescriptorSense ?? false);
        if (command.Completed || task.Unit is null)
        {
            OnExecuted(task, kick);
            return default;
        }
        ValueTask running;
        try
        {
            running = task.Unit.ExecuteAsync(command);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            running = ValueTask.FromException(e);
        }
        if (running.IsCompletedSuccessfully)
        {
            OnExecuted(task, kick);
            return default;
        }
        _ = AwaitExecutionAsync(running, task);
        return default;
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask AwaitExecutionAsync(ValueTask running, IscsiTask task)
    {
        try
        {
            await running.ConfigureAwait(false);
        }
        catch (Exception e)
        {
            Log.CommandFailed(_log, e, Remote, task.Command.Opcode);
            task.Command.CompleteCheckCondition(SenseCode.InternalTargetFailure, task.Unit?.DescriptorSense ?? false);
        }
        OnExecuted(task, kick: true);
    }

    private void OnExecuted(IscsiTask task, bool kick)
    {
        var command = task.Command;
        if (!command.Completed)
            command.CompleteCheckCondition(SenseCode.InternalTargetFailure, task.Unit?.DescriptorSense ?? false);
        var kind = CommandKinds.Classify(command.Opcode);
        long bytes = kind == CommandKind.Read ? command.DataInLength : kind == CommandKind.Write ? command.DataOutLength : 0;
        _portal.Metrics.CommandCompleted(kind, bytes,
            System.Diagnostics.Stopwatch.GetElapsedTime(task.StartTicks).TotalSeconds, command.Status != ScsiStatus.Good);

        if (Interlocked.CompareExchange(ref task.Claim, 2, 0) != 0)
        {
            // Task management got here first: the task ends without a response.
            task.Phase = TaskPhase.Responding;
            task.Session.ReleaseTask(task);
            return;
        }
        task.Phase = TaskPhase.Responding;
        Enqueue(task.Response, kick);
    }
}
