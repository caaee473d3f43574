namespace ISCSISnap.Target.Scsi;

/// <summary>
/// An I_T nexus: one initiator port (iSCSI initiator name + ISID) talking to one target port (target name +
/// portal group). Reservations, registrations and unit attentions are kept per nexus identity, which
/// survives session reinstatement; the object also caches per-LU state for the hot path.
/// Threading: the identity is immutable; the per-LU cache is only grown under its own lock.
/// </summary>
public sealed class ItNexus
{
    private NexusLunState?[] _lunStates = new NexusLunState?[8];
    private readonly object _grow = new();

    public ItNexus(string initiatorName, ulong isid, string targetName, ushort portalGroupTag, ushort relativeTargetPortId)
    {
        InitiatorName = initiatorName;
        Isid = isid;
        TargetName = targetName;
        PortalGroupTag = portalGroupTag;
        RelativeTargetPortId = relativeTargetPortId;
        InitiatorPortName = $"{initiatorName},i,0x{isid:x12}";
        TargetPortName = $"{targetName},t,0x{portalGroupTag:x4}";
        Key = InitiatorPortName + "|" + TargetPortName;
    }

    public string InitiatorName { get; }
    public ulong Isid { get; }
    public string TargetName { get; }
    public ushort PortalGroupTag { get; }
    public ushort RelativeTargetPortId { get; }
    /// <summary>SCSI initiator port name: iSCSI name, ",i,0x", ISID in hex (RFC 7143 §10.1 / SPC-4 TransportID).</summary>
    public string InitiatorPortName { get; }
    public string TargetPortName { get; }
    /// <summary>Identity used as a dictionary key for per-nexus state.</summary>
    public string Key { get; }

    internal NexusLunState? CachedState(int lunOrdinal)
    {
        var states = Volatile.Read(ref _lunStates);
        return (uint)lunOrdinal < (uint)states.Length ? states[lunOrdinal] : null;
    }

    internal void CacheState(int lunOrdinal, NexusLunState state)
    {
        lock (_grow)
        {
            var states = _lunStates;
            if (lunOrdinal >= states.Length)
            {
                Array.Resize(ref states, Math.Max(lunOrdinal + 1, states.Length * 2));
            }
            states[lunOrdinal] = state;
            Volatile.Write(ref _lunStates, states);
        }
    }

    public override string ToString() => InitiatorPortName;
}

/// <summary>Per (logical unit, I_T nexus) state: pending unit attentions. Threading: guarded by the LU's attention lock except for the volatile count.</summary>
internal sealed class NexusLunState
{
    public NexusLunState(string nexusKey) => NexusKey = nexusKey;

    public string NexusKey { get; }
    public readonly Queue<SenseCode> UnitAttentions = new();
    /// <summary>Read without the lock on the hot path: zero means no unit attention is pending.</summary>
    public volatile int PendingCount;
}
