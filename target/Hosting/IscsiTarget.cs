using System.Collections.Immutable;
using ISCSISnap.Target.Scsi;

namespace ISCSISnap.Target.Hosting;

/// <summary>Who may log in to a target and how they authenticate.</summary>
/// <param name="AllowedInitiators">Initiator names allowed to log in; empty allows all.</param>
/// <param name="Chap">Credentials the initiator must prove (one-way CHAP); null for no authentication.</param>
/// <param name="MutualChap">Credentials the target proves back to the initiator (mutual CHAP); null for one-way.</param>
public sealed record TargetAccess(ImmutableArray<string> AllowedInitiators, ChapCredentials? Chap, ChapCredentials? MutualChap)
{
    public static TargetAccess Open { get; } = new(ImmutableArray<string>.Empty, null, null);

    public bool Allows(string initiatorName) =>
        AllowedInitiators.IsDefaultOrEmpty || AllowedInitiators.Any(n => string.Equals(n, initiatorName, StringComparison.OrdinalIgnoreCase));
}

/// <summary>
/// An iSCSI target: a name, an access policy and a map of LUN numbers to logical units.
/// Threading: lookups read an immutable snapshot; changes swap it atomically and raise
/// REPORTED LUNS DATA HAS CHANGED on the remaining units.
/// </summary>
public sealed class IscsiTarget
{
    private volatile ImmutableSortedDictionary<ulong, LogicalUnit> _luns = ImmutableSortedDictionary<ulong, LogicalUnit>.Empty;
    private volatile TargetAccess _access;
    private readonly object _update = new();

    public IscsiTarget(string name, string? alias, TargetAccess access)
    {
        Name = name;
        Alias = alias;
        _access = access;
    }

    public string Name { get; }
    public string? Alias { get; }
    public TargetAccess Access { get => _access; set => _access = value; }
    public ImmutableSortedDictionary<ulong, LogicalUnit> Luns => _luns;

    public LogicalUnit? GetLun(ulong lun) => _luns.TryGetValue(lun, out var unit) ? unit : null;

    public void AddLun(ulong lun, LogicalUnit unit)
    {
        lock (_update)
        {
            if (_luns.ContainsKey(lun)) throw new InvalidOperationException($"LUN {lun} already exists on {Name}");
            _luns = _luns.Add(lun, unit);
            foreach (var other in _luns.Values)
                if (other != unit) other.RaiseUnitAttentionForAll(SenseCode.ReportedLunsDataChanged);
        }
    }

    public LogicalUnit? RemoveLun(ulong lun)
    {
        lock (_update)
        {
            if (!_luns.TryGetValue(lun, out var unit)) return null;
            _luns = _luns.Remove(lun);
            foreach (var other in _luns.Values)
                other.RaiseUnitAttentionForAll(SenseCode.ReportedLunsDataChanged);
            return unit;
        }
    }
}

/// <summary>All targets of the appliance by name (iSCSI names compare case-insensitively). Threading: thread-safe.</summary>
public sealed class TargetRegistry
{
    private volatile ImmutableDictionary<string, IscsiTarget> _targets =
        ImmutableDictionary.Create<string, IscsiTarget>(StringComparer.OrdinalIgnoreCase);
    private readonly object _update = new();

    public IEnumerable<IscsiTarget> All => _targets.Values.OrderBy(t => t.Name, StringComparer.Ordinal);

    public IscsiTarget? Find(string name) => _targets.TryGetValue(name, out var target) ? target : null;

    public bool TryAdd(IscsiTarget target)
    {
        lock (_update)
        {
            if (_targets.ContainsKey(target.Name)) return false;
            _targets = _targets.Add(target.Name, target);
            return true;
        }
    }

    public IscsiTarget? Remove(string name)
    {
        lock (_update)
        {
            if (!_targets.TryGetValue(name, out var target)) return null;
            _targets = _targets.Remove(name);
            return target;
        }
    }

    /// <summary>The logical unit whose NAA designator equals <paramref name="designator"/> (EXTENDED COPY target lookup).</summary>
    public LogicalUnit? FindByDesignator(ReadOnlySpan<byte> designator)
    {
        foreach (var target in _targets.Values)
            foreach (var unit in target.Luns.Values)
                if (unit.Identity.NaaDesignator.AsSpan().SequenceEqual(designator)) return unit;
        return null;
    }
}
