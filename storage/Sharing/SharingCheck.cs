namespace ISCSISnap.Storage.Sharing;

/// <summary>The check that refused a use of shared memory. <see cref="None"/> means it was allowed.</summary>
public enum SharingCheck
{
    None = 0,
    /// <summary>The bytes asked for reach outside the handle's range.</summary>
    Range,
    /// <summary>The handle does not carry the right asked for (read or write).</summary>
    Rights,
    /// <summary>The handle's lifetime has passed.</summary>
    Expiry,
    /// <summary>The handle's generation is no longer its slot's: revoked, or never granted (forged or stale).</summary>
    Revoked,
    /// <summary>A one-shot handle was used a second time.</summary>
    OneShot,
    /// <summary>The handle was granted to another peer.</summary>
    Peer,
    /// <summary>The handle names a slot beyond the handle table.</summary>
    Slot,
    /// <summary>Every slot of the handle table is granted.</summary>
    TableFull,
    /// <summary>The process at the other end of the socket is not the one expected (SO_PEERCRED).</summary>
    Credentials,
    /// <summary>The region hand-over was malformed, truncated or timed out.</summary>
    Handshake,
    /// <summary>A received region lacks the seals or size that make it safe to map.</summary>
    Seals,
    /// <summary>The link is closed: its peer exited or it was disposed.</summary>
    Closed,
}

/// <summary>A refused use of shared memory; <see cref="Check"/> names the check that failed.</summary>
public sealed class SharingException(SharingCheck check, string message) : Exception(message)
{
    public SharingCheck Check { get; } = check;
}
