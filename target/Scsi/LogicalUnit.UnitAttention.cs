namespace ISCSISnap.Target.Scsi;

public sealed partial class LogicalUnit
{
    private const int MaxQueuedAttentions = 8;

    /// <summary>The unit's state for a nexus; a nexus seen for the first time starts with POWER ON/RESET (29h/00h).</summary>
    internal NexusLunState StateFor(ItNexus nexus)
    {
        var cached = nexus.CachedState(Ordinal);
        if (cached is not null) return cached;
        var state = _nexusStates.GetOrAdd(nexus.Key, static key =>
        {
            var fresh = new NexusLunState(key);
            fresh.UnitAttentions.Enqueue(SenseCode.PowerOnResetOccurred);
            fresh.PendingCount = 1;
            return fresh;
        });
        nexus.CacheState(Ordinal, state);
        return state;
    }

    private bool TakeUnitAttention(NexusLunState state, out SenseCode attention)
    {
        lock (_stateLock)
        {
            if (state.UnitAttentions.TryDequeue(out attention))
            {
                state.PendingCount = state.UnitAttentions.Count;
                return true;
            }
            state.PendingCount = 0;
            return false;
        }
    }

    /// <summary>Establishes a unit attention for every nexus that has used this unit (except <paramref name="except"/>).</summary>
    public void RaiseUnitAttentionForAll(SenseCode code, string? except = null)
    {
        lock (_stateLock)
        {
            foreach (var state in _nexusStates.Values)
                if (state.NexusKey != except) Enqueue(state, code);
        }
    }

    internal void RaiseUnitAttention(string nexusKey, SenseCode code)
    {
        lock (_stateLock)
        {
            var state = _nexusStates.GetOrAdd(nexusKey, static key => new NexusLunState(key));
            Enqueue(state, code);
        }
    }

    private static void Enqueue(NexusLunState state, SenseCode code)
    {
        // One of each kind is enough, and the queue stays bounded.
        if (state.UnitAttentions.Contains(code)) return;
        if (code.Asc == 0x29)
        {
            // A reset supersedes whatever was pending before it.
            state.UnitAttentions.Clear();
        }
        if (state.UnitAttentions.Count >= MaxQueuedAttentions) state.UnitAttentions.Dequeue();
        state.UnitAttentions.Enqueue(code);
        state.PendingCount = state.UnitAttentions.Count;
    }

    internal void ClearUnitAttention(ItNexus nexus, SenseCode code)
    {
        var state = nexus.CachedState(Ordinal);
        if (state is null || state.PendingCount == 0) return;
        lock (_stateLock)
        {
            if (!state.UnitAttentions.Contains(code)) return;
            var keep = state.UnitAttentions.Where(c => c != code).ToList();
            state.UnitAttentions.Clear();
            foreach (var c in keep) state.UnitAttentions.Enqueue(c);
            state.PendingCount = state.UnitAttentions.Count;
        }
    }

    /// <summary>
    /// The nexus is gone (logout, connection loss, reinstatement): its SPC-2 reservation and per-nexus state are
    /// dropped; a later login starts afresh with POWER ON/RESET. Persistent registrations survive.
    /// </summary>
    public void OnNexusLost(ItNexus nexus)
    {
        lock (_stateLock)
        {
            _nexusStates.TryRemove(nexus.Key, out _);
            _copyResults.TryRemove(nexus.Key, out _);
            if (_legacyHolder == nexus.Key)
            {
                _legacyHolder = null;
                UpdateReservationsActive();
            }
        }
    }

    /// <summary>LOGICAL UNIT RESET (also part of target resets): SPC-2 reservation released, mode pages back to defaults, unit attention 29h/00h to every nexus.</summary>
    public void Reset()
    {
        lock (_stateLock)
        {
            _legacyHolder = null;
            _writeCacheEnabled = Options.WriteCacheEnabled;
            _descriptorSense = false;
            _softwareWriteProtect = false;
            UpdateReservationsActive();
            foreach (var state in _nexusStates.Values) Enqueue(state, SenseCode.PowerOnResetOccurred);
        }
    }
}
