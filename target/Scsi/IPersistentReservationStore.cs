namespace ISCSISnap.Target.Scsi;

/// <summary>One registration as persisted for APTPL.</summary>
public sealed record PersistedRegistration(string InitiatorPortName, string TargetPortName, string InitiatorName, ulong Isid, ushort RelativeTargetPortId, ulong Key);

/// <summary>Persistent reservation state as persisted for APTPL (SPC-4 §5.13.3: activate persist through power loss).</summary>
public sealed record PersistedReservations(
    uint Generation,
    IReadOnlyList<PersistedRegistration> Registrations,
    string? HolderNexusKey,
    byte Type,
    byte Scope);

/// <summary>Durable storage for persistent reservations of units whose initiators asked for APTPL. Threading: thread-safe.</summary>
public interface IPersistentReservationStore
{
    PersistedReservations? Load(Guid unitId);
    /// <summary>Saves durably before returning (the PR OUT command completes after this); null clears.</summary>
    void Save(Guid unitId, PersistedReservations? state);
}
