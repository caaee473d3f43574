namespace ISCSISnap.Target.Iscsi.Sessions;

/// <summary>
/// Live sessions of the portal: TSIH allocation, lookup for session reinstatement (same initiator name, ISID and
/// target), and the session limit. Threading: thread-safe.
/// </summary>
internal sealed class SessionManager
{
    private readonly Dictionary<ushort, IscsiSession> _byTsih = new();
    private readonly int _maxSessions;
    private ushort _nextTsih = (ushort)Random.Shared.Next(1, 0xFFFF);

    public SessionManager(int maxSessions) => _maxSessions = maxSessions;

    public IReadOnlyList<IscsiSession> Sessions
    {
        get { lock (_byTsih) return _byTsih.Values.ToArray(); }
    }

    public IscsiSession? Find(ushort tsih)
    {
        lock (_byTsih) return _byTsih.GetValueOrDefault(tsih);
    }

    /// <summary>An existing session with the same I_T identity: the new login reinstates (replaces) it.</summary>
    public IscsiSession? FindForReinstatement(string initiatorName, ulong isid, string? targetName)
    {
        lock (_byTsih)
        {
            foreach (var session in _byTsih.Values)
                if (session.Isid == isid
                    && string.Equals(session.InitiatorName, initiatorName, StringComparison.OrdinalIgnoreCase)
                    && string.Equals(session.Target?.Name, targetName, StringComparison.OrdinalIgnoreCase))
                    return session;
            return null;
        }
    }

    /// <summary>Reserves a fresh non-zero TSIH, or 0 when the session limit is reached.</summary>
    public ushort ReserveTsih()
    {
        lock (_byTsih)
        {
            if (_byTsih.Count >= _maxSessions) return 0;
            for (int i = 0; i < 0x10000; i++)
            {
                ushort candidate = _nextTsih++;
                if (candidate == 0) continue;
                if (!_byTsih.ContainsKey(candidate)) return candidate;
            }
            return 0;
        }
    }

    public bool Add(IscsiSession session)
    {
        lock (_byTsih)
        {
            if (_byTsih.Count >= _maxSessions || _byTsih.ContainsKey(session.Tsih)) return false;
            _byTsih.Add(session.Tsih, session);
            return true;
        }
    }

    public void Remove(IscsiSession session)
    {
        lock (_byTsih)
        {
            if (_byTsih.TryGetValue(session.Tsih, out var existing) && existing == session) _byTsih.Remove(session.Tsih);
        }
    }
}
