using ISCSISnap.Target.Iscsi.Connections;
using ISCSISnap.Target.Scsi;

namespace ISCSISnap.Target.Iscsi.Sessions;

internal enum TaskPhase : byte
{
    Free,
    /// <summary>Waiting for Data-Out (unsolicited or solicited by R2T).</summary>
    ReceivingData,
    /// <summary>The logical unit is executing it.</summary>
    Executing,
    /// <summary>Its response is queued or being sent.</summary>
    Responding,
}

/// <summary>
/// The iSCSI side of one command slot: tags, sequence numbers, Data-Out accounting and Data-In progress around
/// a pooled <see cref="ScsiCommand"/>. Threading: the receiving connection owns it until the response is queued;
/// then its sender owns it until release.
/// </summary>
internal sealed class IscsiTask
{
    public const int MaxR2TPerTask = 16;

    public IscsiTask(IscsiSession session, int slot)
    {
        Session = session;
        Slot = slot;
        Response = new TaskResponseItem(this);
        for (int i = 0; i < R2Ts.Length; i++) R2Ts[i] = new R2TItem(this);
    }

    public IscsiSession Session { get; }
    public int Slot { get; }
    public ScsiCommand Command { get; } = new();
    public TaskResponseItem Response { get; }
    public R2TItem[] R2Ts { get; } = new R2TItem[MaxR2TPerTask];

    public IscsiConnection Connection = null!;
    public LogicalUnit? Unit;
    public uint Itt;
    public uint CmdSN;
    public bool Immediate;
    public ulong LunField;
    public int Generation;
    public TaskPhase Phase;
    /// <summary>Set by task management: the response is suppressed and the slot released once execution stops.</summary>
    public volatile bool Aborted;
    /// <summary>Set when a TMF from another nexus aborted it with TAS=1: answer TASK ABORTED instead of nothing.</summary>
    public bool AbortedWithStatus;
    /// <summary>Who decides the task's fate: 0 nobody yet, 1 task management (no response), 2 the response (already on its way).</summary>
    public int Claim;
    public long StartTicks;

    // Data-Out accounting (byte offsets within the command's buffer).
    /// <summary>Total bytes the initiator will send (its expected data transfer length, for a write).</summary>
    public int DataOutTotal;
    /// <summary>Bytes that matter to the SCSI command: min(expected length, what the command needs).</summary>
    public int DataOutUseful;
    /// <summary>Next buffer offset expected (Data-Out must arrive in order).</summary>
    public int Received;
    /// <summary>Unsolicited Data-Out PDUs are still to come (the command PDU had F=0).</summary>
    public bool AwaitingUnsolicited;
    public int UnsolicitedEnd;
    public uint ExpectedDataSN;
    /// <summary>End offset of the burst (unsolicited or R2T sequence) now arriving.</summary>
    public int BurstEnd;
    public int SolicitNext;
    public int SolicitEnd;
    public int OutstandingR2T;
    public uint NextR2TSN;
    public uint TargetTransferTag;
    public bool DataDigestFailed;

    // Data-In progress (sender side).
    public int DataInSent;
    public uint DataInSN;

    public void ResetForCommand()
    {
        Command.Reset();
        Unit = null;
        Aborted = false;
        AbortedWithStatus = false;
        Claim = 0;
        DataOutTotal = DataOutUseful = Received = UnsolicitedEnd = BurstEnd = SolicitNext = SolicitEnd = OutstandingR2T = 0;
        AwaitingUnsolicited = false;
        ExpectedDataSN = 0;
        NextR2TSN = 0;
        TargetTransferTag = 0xFFFFFFFF;
        DataDigestFailed = false;
        DataInSent = 0;
        DataInSN = 0;
        Generation++;
    }

    /// <summary>True once every Data-Out byte the initiator will send has arrived.</summary>
    public bool DataOutComplete => !AwaitingUnsolicited && OutstandingR2T == 0 && SolicitNext >= SolicitEnd && Received >= Math.Min(UnsolicitedEnd, DataOutTotal);

    /// <summary>
    /// An R2T item this command can use. Items of an earlier command in this slot (one that ended while its R2Ts
    /// were outstanding: broken data sequence, ABORT TASK) count as free; one still waiting in the send queue is
    /// left there (it emits nothing for a stale generation) and replaced, so it is never queued twice.
    /// </summary>
    public R2TItem? FreeR2T()
    {
        for (int i = 0; i < R2Ts.Length; i++)
        {
            var r2t = R2Ts[i];
            if (r2t.InUse && r2t.Generation == Generation) continue;
            if (r2t.Queued) R2Ts[i] = r2t = new R2TItem(this);
            return r2t;
        }
        return null;
    }
}
