using System.Buffers.Binary;
using System.Text;

namespace ISCSISnap.Target.Scsi;

/// <summary>Persistent reservation types (SPC-4 Table 173).</summary>
public enum PersistentReservationType : byte
{
    None = 0,
    WriteExclusive = 1,
    ExclusiveAccess = 3,
    WriteExclusiveRegistrantsOnly = 5,
    ExclusiveAccessRegistrantsOnly = 6,
    WriteExclusiveAllRegistrants = 7,
    ExclusiveAccessAllRegistrants = 8,
}

public sealed partial class LogicalUnit
{
    private sealed class Registration
    {
        public required string NexusKey;
        public required string InitiatorPortName;
        public required string TargetPortName;
        public required string InitiatorName;
        public required ulong Isid;
        public required ushort RelativeTargetPortId;
        public ulong Key;
    }

    // All guarded by _stateLock.
    private string? _legacyHolder;                                   // SPC-2 RESERVE(6/10)
    private readonly Dictionary<string, Registration> _registrations = new();
    private uint _prGeneration;
    private string? _prHolder;                                       // null for all-registrants types
    private PersistentReservationType _prType;
    private bool _aptpl;
    private volatile bool _reservationsActive;
    /// <summary>PERSISTENT RESERVE OUT runs one at a time, so a failed APTPL save can be rolled back exactly.</summary>
    private readonly SemaphoreSlim _reservationOut = new(1, 1);
    /// <summary>Unit attentions a PERSISTENT RESERVE OUT establishes, raised only once its change is durable.</summary>
    private List<(string NexusKey, SenseCode Code)>? _deferredAttentions;

    /// <summary>Aborts the tasks of the given nexuses on this unit (PREEMPT AND ABORT); set by the transport.</summary>
    public Func<LogicalUnit, IReadOnlyCollection<string>, Task>? AbortTasksOfNexuses { get; set; }

    private static bool AllRegistrants(PersistentReservationType type) =>
        type is PersistentReservationType.WriteExclusiveAllRegistrants or PersistentReservationType.ExclusiveAccessAllRegistrants;

    private void UpdateReservationsActive() => _reservationsActive = _legacyHolder is not null || _prType != PersistentReservationType.None;

    private bool IsPersistentHolder(string nexusKey) =>
        _prType != PersistentReservationType.None &&
        (AllRegistrants(_prType) ? _registrations.ContainsKey(nexusKey) : _prHolder == nexusKey);

    /// <summary>Whether the command conflicts with a reservation held through another I_T nexus (SPC-4 Table 52, SBC-3 Table 13).</summary>
    private bool ReservationConflict(ScsiCommand command, CommandInfo info)
    {
        string key = command.Nexus.Key;
        lock (_stateLock)
        {
            if (_legacyHolder is { } holder)
            {
                if (holder == key) return false;
                return info.Opcode switch
                {
                    0x12 or 0xA0 or 0x03 or 0x5E or 0xA3 or 0x00 => false,   // INQUIRY, REPORT LUNS, REQUEST SENSE, PR IN, MAINTENANCE IN, TUR
                    0x17 or 0x57 => false,                                   // RELEASE from a non-holder: GOOD, no effect
                    _ => true,
                };
            }
            if (_prType == PersistentReservationType.None) return false;
            if (info.Reservation == ReservationClass.LegacyReservation) return true;   // compatible reservation handling
            if (info.Reservation == ReservationClass.Allowed) return false;
            if (IsPersistentHolder(key)) return false;
            bool write = info.Reservation == ReservationClass.Write;
            bool registrant = _registrations.ContainsKey(key);
            return _prType switch
            {
                PersistentReservationType.WriteExclusive => write,
                PersistentReservationType.ExclusiveAccess => true,
                PersistentReservationType.WriteExclusiveRegistrantsOnly or PersistentReservationType.WriteExclusiveAllRegistrants => write && !registrant,
                _ => !registrant,
            };
        }
    }

    // ---------------------------------------------------------------- SPC-2 RESERVE / RELEASE

    private ValueTask Reserve(ScsiCommand command)
    {
        lock (_stateLock)
        {
            if (_legacyHolder is not null && _legacyHolder != command.Nexus.Key)
            {
                command.Complete(ScsiStatus.ReservationConflict);
                return ValueTask.CompletedTask;
            }
            _legacyHolder = command.Nexus.Key;
            UpdateReservationsActive();
        }
        command.CompleteGood();
        return ValueTask.CompletedTask;
    }

    private ValueTask ReleaseReservation(ScsiCommand command)
    {
        lock (_stateLock)
        {
            if (_legacyHolder == command.Nexus.Key)
            {
                _legacyHolder = null;
                UpdateReservationsActive();
            }
        }
        command.CompleteGood();
        return ValueTask.CompletedTask;
    }

    // ---------------------------------------------------------------- PERSISTENT RESERVE IN

    private ValueTask PersistentReserveIn(ScsiCommand command)
    {
        var cdb = command.Cdb;
        int allocation = BinaryPrimitives.ReadUInt16BigEndian(cdb.Slice(7));
        int action = cdb[1] & 0x1F;
        byte[] data;
        lock (_stateLock)
        {
            data = action switch
            {
                0x00 => ReadKeys(),
                0x01 => ReadReservation(),
                0x02 => ReportCapabilities(),
                _ => ReadFullStatus(),
            };
        }
        var buffer = command.EnsureBuffer(Math.Max(data.Length, 1));
        data.CopyTo(buffer, 0);
        command.CompleteGood(Math.Min(data.Length, allocation));
        return ValueTask.CompletedTask;
    }

    private byte[] ReadKeys()
    {
        var data = new byte[8 + 8 * _registrations.Count];
        BinaryPrimitives.WriteUInt32BigEndian(data, _prGeneration);
        BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(4), (uint)(8 * _registrations.Count));
        int offset = 8;
        foreach (var registration in _registrations.Values)
        {
            BinaryPrimitives.WriteUInt64BigEndian(data.AsSpan(offset), registration.Key);
            offset += 8;
        }
        return data;
    }

    private byte[] ReadReservation()
    {
        bool reserved = _prType != PersistentReservationType.None;
        var data = new byte[reserved ? 24 : 8];
        BinaryPrimitives.WriteUInt32BigEndian(data, _prGeneration);
        if (reserved)
        {
            BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(4), 16);
            ulong key = !AllRegistrants(_prType) && _prHolder is { } holder && _registrations.TryGetValue(holder, out var r) ? r.Key : 0;
            BinaryPrimitives.WriteUInt64BigEndian(data.AsSpan(8), key);
            data[21] = (byte)_prType;   // scope 0 (LU_SCOPE)
        }
        return data;
    }

    private byte[] ReportCapabilities()
    {
        var data = new byte[8];
        BinaryPrimitives.WriteUInt16BigEndian(data, 8);
        data[2] = 0x10 | 0x04 | 0x01;                  // CRH, ATP_C, PTPL_C
        data[3] = (byte)(0x80 | (_aptpl ? 0x01 : 0));   // TMV, PTPL_A
        BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(4), 0xEA01);   // WE, EA, WERO, EARO, WEAR, EAAR
        return data;
    }

    private byte[] ReadFullStatus()
    {
        var descriptors = new List<byte[]>();
        foreach (var registration in _registrations.Values)
        {
            var transportId = TransportId(registration.InitiatorPortName);
            var d = new byte[24 + transportId.Length];
            BinaryPrimitives.WriteUInt64BigEndian(d, registration.Key);
            bool holder = IsPersistentHolder(registration.NexusKey);
            d[12] = (byte)(0x02 | (holder ? 0x01 : 0));   // ALL_TG_PT (one target port), R_HOLDER
            if (holder) d[13] = (byte)_prType;
            BinaryPrimitives.WriteUInt16BigEndian(d.AsSpan(18), registration.RelativeTargetPortId);
            BinaryPrimitives.WriteUInt32BigEndian(d.AsSpan(20), (uint)transportId.Length);
            transportId.CopyTo(d, 24);
            descriptors.Add(d);
        }
        int length = descriptors.Sum(d => d.Length);
        var data = new byte[8 + length];
        BinaryPrimitives.WriteUInt32BigEndian(data, _prGeneration);
        BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(4), (uint)length);
        int offset = 8;
        foreach (var d in descriptors)
        {
            d.CopyTo(data, offset);
            offset += d.Length;
        }
        return data;
    }

    /// <summary>iSCSI TransportID, format 01b: initiator port name "name,i,0xISID" (SPC-4 §7.6.4.6).</summary>
    private static byte[] TransportId(string initiatorPortName)
    {
        int nameLength = Encoding.UTF8.GetByteCount(initiatorPortName) + 1;
        int padded = Math.Max(20, (nameLength + 3) & ~3);
        var id = new byte[4 + padded];
        id[0] = 0x40 | 0x05;
        BinaryPrimitives.WriteUInt16BigEndian(id.AsSpan(2), (ushort)padded);
        Encoding.UTF8.GetBytes(initiatorPortName, id.AsSpan(4));
        return id;
    }

    // ---------------------------------------------------------------- PERSISTENT RESERVE OUT

    private async ValueTask PersistentReserveOut(ScsiCommand command)
    {
        var cdb = command.Cdb;
        int action = cdb[1] & 0x1F;
        int scope = cdb[2] >> 4;
        var type = (PersistentReservationType)(cdb[2] & 0x0F);
        int length = command.DataOutLength;
        if (action == 0x07 ? length < 24 : length != 24)
        {
            Fail(command, SenseCode.ParameterListLengthError);
            return;
        }
        if (command.DataOutReceived < length)
        {
            Fail(command, SenseCode.ParameterListLengthError);
            return;
        }
        await _reservationOut.WaitAsync().ConfigureAwait(false);
        try
        {
            await ReserveOutSerializedAsync(command, action, scope, type, length).ConfigureAwait(false);
        }
        finally
        {
            _reservationOut.Release();
        }
    }

    private async ValueTask ReserveOutSerializedAsync(ScsiCommand command, int action, int scope, PersistentReservationType type, int length)
    {
        var data = command.Buffer.AsSpan(0, length);
        ulong key = BinaryPrimitives.ReadUInt64BigEndian(data);
        ulong serviceActionKey = BinaryPrimitives.ReadUInt64BigEndian(data.Slice(8));
        var nexus = command.Nexus;
        HashSet<string>? abort = null;
        bool persist = false;
        PersistedReservations? snapshot = null;
        ReservationState before;
        var attentions = new List<(string NexusKey, SenseCode Code)>();

        lock (_stateLock)
        {
            before = CaptureReservations();
            _deferredAttentions = attentions;
            try
            {
                if (action != 0x07)
                {
                    byte flags = data[20];
                    if ((flags & 0x08) != 0)
                    {
                        FailParameter(command, 20);    // SPEC_I_PT is not supported (SIP_C=0)
                        return;
                    }
                    if ((flags & 0x01) != 0 && action is not (0x00 or 0x06))
                    {
                        FailParameter(command, 20);    // APTPL only with a registration
                        return;
                    }
                }
                _registrations.TryGetValue(nexus.Key, out var own);

                switch (action)
                {
                    case 0x00:   // REGISTER
                    case 0x06:   // REGISTER AND IGNORE EXISTING KEY
                    {
                        if (action == 0x00 && (own is null ? key != 0 : key != own.Key))
                        {
                            command.Complete(ScsiStatus.ReservationConflict);
                            return;
                        }
                        if (own is null && serviceActionKey == 0)
                        {
                            command.CompleteGood();
                            return;
                        }
                        if (serviceActionKey == 0) Unregister(own!);
                        else if (own is not null) own.Key = serviceActionKey;
                        else
                        {
                            _registrations[nexus.Key] = new Registration
                            {
                                NexusKey = nexus.Key,
                                InitiatorPortName = nexus.InitiatorPortName,
                                TargetPortName = nexus.TargetPortName,
                                InitiatorName = nexus.InitiatorName,
                                Isid = nexus.Isid,
                                RelativeTargetPortId = nexus.RelativeTargetPortId,
                                Key = serviceActionKey,
                            };
                        }
                        _aptpl = (data[20] & 0x01) != 0;
                        _prGeneration++;
                        persist = true;
                        break;
                    }
                    case 0x01:   // RESERVE
                    {
                        if (own is null || own.Key != key)
                        {
                            command.Complete(ScsiStatus.ReservationConflict);
                            return;
                        }
                        if (scope != 0 || !ValidType(type))
                        {
                            FailField(command, 2);
                            return;
                        }
                        if (_prType != PersistentReservationType.None)
                        {
                            if (!IsPersistentHolder(nexus.Key) || _prType != type) command.Complete(ScsiStatus.ReservationConflict);
                            else command.CompleteGood();
                            return;
                        }
                        _prType = type;
                        _prHolder = AllRegistrants(type) ? null : nexus.Key;
                        persist = true;
                        break;
                    }
                    case 0x02:   // RELEASE
                    {
                        if (own is null || own.Key != key)
                        {
                            command.Complete(ScsiStatus.ReservationConflict);
                            return;
                        }
                        if (_prType == PersistentReservationType.None || !IsPersistentHolder(nexus.Key))
                        {
                            command.CompleteGood();
                            return;
                        }
                        if (scope != 0 || type != _prType)
                        {
                            Fail(command, SenseCode.InvalidReleaseOfPersistentReservation);
                            return;
                        }
                        var released = _prType;
                        ReleasePersistentReservation();
                        if (released is not (PersistentReservationType.WriteExclusive or PersistentReservationType.ExclusiveAccess))
                            foreach (var other in _registrations.Keys.Where(k => k != nexus.Key))
                                DeferAttention(other, SenseCode.ReservationsReleased);
                        persist = true;
                        break;
                    }
                    case 0x03:   // CLEAR
                    {
                        if (own is null || own.Key != key)
                        {
                            command.Complete(ScsiStatus.ReservationConflict);
                            return;
                        }
                        foreach (var other in _registrations.Keys.Where(k => k != nexus.Key))
                            DeferAttention(other, SenseCode.ReservationsPreempted);
                        _registrations.Clear();
                        ReleasePersistentReservation();
                        _prGeneration++;
                        persist = true;
                        break;
                    }
                    case 0x04:   // PREEMPT
                    case 0x05:   // PREEMPT AND ABORT
                    {
                        if (own is null || own.Key != key)
                        {
                            command.Complete(ScsiStatus.ReservationConflict);
                            return;
                        }
                        var outcome = Preempt(nexus.Key, serviceActionKey, scope, type, out var preempted);
                        if (outcome == PreemptOutcome.InvalidParameter)
                        {
                            FailParameter(command, 8);
                            return;
                        }
                        if (outcome == PreemptOutcome.InvalidType)
                        {
                            FailField(command, 2);
                            return;
                        }
                        if (outcome == PreemptOutcome.Conflict)
                        {
                            command.Complete(ScsiStatus.ReservationConflict);
                            return;
                        }
                        if (action == 0x05 && preempted.Count > 0) abort = preempted;
                        persist = true;
                        break;
                    }
                    case 0x07:   // REGISTER AND MOVE
                    {
                        if (!RegisterAndMove(command, own, key, serviceActionKey, scope, type, data)) return;
                        persist = true;
                        break;
                    }
                    default:
                        FailField(command, 1);
                        return;
                }
                UpdateReservationsActive();
                if (persist) snapshot = _aptpl ? Snapshot() : null;
            }
            finally
            {
                _deferredAttentions = null;
            }
        }

        if (persist && _reservationStore is not null && (snapshot is not null || before.Aptpl))
        {
            try
            {
                // APTPL: the state is durable before the command completes; otherwise any stale copy is dropped.
                await Task.Run(() => _reservationStore.Save(Identity.UnitId, snapshot)).ConfigureAwait(false);
            }
            catch (Exception)
            {
                // The change did not become durable: it did not happen (SPC-4: PRgeneration unchanged on error).
                lock (_stateLock) RestoreReservations(before);
                Fail(command, SenseCode.InsufficientRegistrationResources);
                return;
            }
        }
        foreach (var (nexusKey, code) in attentions) RaiseUnitAttention(nexusKey, code);
        if (abort is not null && AbortTasksOfNexuses is { } aborter)
            await aborter(this, abort).ConfigureAwait(false);
        command.CompleteGood();
    }

    private void DeferAttention(string nexusKey, SenseCode code)
    {
        if (_deferredAttentions is { } deferred) deferred.Add((nexusKey, code));
        else RaiseUnitAttention(nexusKey, code);
    }

    private sealed record ReservationState(uint Generation, List<Registration> Registrations, string? Holder, PersistentReservationType Type, bool Aptpl);

    private ReservationState CaptureReservations() => new(
        _prGeneration,
        _registrations.Values.Select(r => new Registration
        {
            NexusKey = r.NexusKey, InitiatorPortName = r.InitiatorPortName, TargetPortName = r.TargetPortName,
            InitiatorName = r.InitiatorName, Isid = r.Isid, RelativeTargetPortId = r.RelativeTargetPortId, Key = r.Key,
        }).ToList(),
        _prHolder, _prType, _aptpl);

    private void RestoreReservations(ReservationState state)
    {
        _prGeneration = state.Generation;
        _registrations.Clear();
        foreach (var r in state.Registrations) _registrations[r.NexusKey] = r;
        _prHolder = state.Holder;
        _prType = state.Type;
        _aptpl = state.Aptpl;
        UpdateReservationsActive();
    }

    private static bool ValidType(PersistentReservationType type) => type is PersistentReservationType.WriteExclusive
        or PersistentReservationType.ExclusiveAccess or PersistentReservationType.WriteExclusiveRegistrantsOnly
        or PersistentReservationType.ExclusiveAccessRegistrantsOnly or PersistentReservationType.WriteExclusiveAllRegistrants
        or PersistentReservationType.ExclusiveAccessAllRegistrants;

    private void ReleasePersistentReservation()
    {
        _prType = PersistentReservationType.None;
        _prHolder = null;
    }

    private void Unregister(Registration registration)
    {
        _registrations.Remove(registration.NexusKey);
        if (_prType == PersistentReservationType.None) return;
        if (AllRegistrants(_prType))
        {
            if (_registrations.Count == 0) ReleasePersistentReservation();
        }
        else if (_prHolder == registration.NexusKey)
        {
            var released = _prType;
            ReleasePersistentReservation();
            if (released is PersistentReservationType.WriteExclusiveRegistrantsOnly or PersistentReservationType.ExclusiveAccessRegistrantsOnly)
                foreach (var other in _registrations.Keys)
                    DeferAttention(other, SenseCode.ReservationsReleased);
        }
    }

    private enum PreemptOutcome { Done, Conflict, InvalidParameter, InvalidType }

    /// <summary>PREEMPT (SPC-4 §5.13.11.2): removes the registrations holding <paramref name="victimKey"/> and takes over their reservation.</summary>
    private PreemptOutcome Preempt(string nexusKey, ulong victimKey, int scope, PersistentReservationType type, out HashSet<string> preempted)
    {
        preempted = new HashSet<string>();
        bool reserved = _prType != PersistentReservationType.None;
        if (reserved && AllRegistrants(_prType) && victimKey == 0)
        {
            // All-registrants reservation: key 0 preempts everyone else and establishes the new reservation.
            if (scope != 0 || !ValidType(type)) return PreemptOutcome.InvalidType;
            foreach (var other in _registrations.Values.Where(r => r.NexusKey != nexusKey).ToList())
            {
                _registrations.Remove(other.NexusKey);
                preempted.Add(other.NexusKey);
                DeferAttention(other.NexusKey, SenseCode.RegistrationsPreempted);
            }
            _prType = type;
            _prHolder = AllRegistrants(type) ? null : nexusKey;
            _prGeneration++;
            return PreemptOutcome.Done;
        }

        string? holderKey = reserved && !AllRegistrants(_prType) ? _prHolder : null;
        ulong holderRegistrationKey = holderKey is not null && _registrations.TryGetValue(holderKey, out var h) ? h.Key : 0;
        bool preemptsReservation = holderKey is not null && holderRegistrationKey == victimKey;

        if (!preemptsReservation && victimKey == 0)
            return PreemptOutcome.InvalidParameter;   // without a reservation to preempt, key 0 names nobody
        if (preemptsReservation && (scope != 0 || !ValidType(type)))
            return PreemptOutcome.InvalidType;

        var victims = _registrations.Values.Where(r => r.Key == victimKey && r.NexusKey != nexusKey).ToList();
        if (victims.Count == 0 && !preemptsReservation)
            return PreemptOutcome.Conflict;
        foreach (var victim in victims)
        {
            _registrations.Remove(victim.NexusKey);
            preempted.Add(victim.NexusKey);
            DeferAttention(victim.NexusKey, SenseCode.RegistrationsPreempted);
        }
        if (preemptsReservation)
        {
            var previousType = _prType;
            _prType = type;
            _prHolder = AllRegistrants(type) ? null : nexusKey;
            if (previousType != type)
                foreach (var other in _registrations.Keys.Where(k => k != nexusKey))
                    DeferAttention(other, SenseCode.ReservationsReleased);
        }
        _prGeneration++;
        return PreemptOutcome.Done;
    }

    private bool RegisterAndMove(ScsiCommand command, Registration? own, ulong key, ulong serviceActionKey, int scope, PersistentReservationType type, ReadOnlySpan<byte> data)
    {
        if (own is null || own.Key != key || _prType == PersistentReservationType.None || AllRegistrants(_prType) || _prHolder != own.NexusKey)
        {
            command.Complete(ScsiStatus.ReservationConflict);
            return false;
        }
        if (serviceActionKey == 0)
        {
            FailParameter(command, 8);
            return false;
        }
        bool unregister = (data[17] & 0x02) != 0;
        _aptpl = (data[17] & 0x01) != 0;
        ushort relativePort = BinaryPrimitives.ReadUInt16BigEndian(data.Slice(18));
        int idLength = (int)BinaryPrimitives.ReadUInt32BigEndian(data.Slice(20));
        if (24 + idLength > data.Length || idLength < 24)
        {
            Fail(command, SenseCode.ParameterListLengthError);
            return false;
        }
        var id = data.Slice(24, idLength);
        if ((id[0] & 0x0F) != 0x05 || (id[0] >> 6) != 0x01)
        {
            FailParameter(command, 24);   // only iSCSI TransportIDs with an ISID (format 01b) name one I_T nexus
            return false;
        }
        int nameLength = BinaryPrimitives.ReadUInt16BigEndian(id.Slice(2));
        var nameBytes = id.Slice(4, Math.Min(nameLength, id.Length - 4));
        int nul = nameBytes.IndexOf((byte)0);
        string initiatorPort = Encoding.UTF8.GetString(nul >= 0 ? nameBytes.Slice(0, nul) : nameBytes);
        int marker = initiatorPort.IndexOf(",i,0x", StringComparison.OrdinalIgnoreCase);
        if (marker <= 0 || !ulong.TryParse(initiatorPort.AsSpan(marker + 5), System.Globalization.NumberStyles.HexNumber, null, out ulong isid))
        {
            FailParameter(command, 28);
            return false;
        }
        string initiatorName = initiatorPort[..marker];
        string destinationKey = $"{initiatorName},i,0x{isid:x12}|{own.TargetPortName}";
        if (destinationKey == own.NexusKey)
        {
            FailParameter(command, 24);
            return false;
        }
        if (!_registrations.TryGetValue(destinationKey, out var destination))
        {
            destination = new Registration
            {
                NexusKey = destinationKey,
                InitiatorPortName = $"{initiatorName},i,0x{isid:x12}",
                TargetPortName = own.TargetPortName,
                InitiatorName = initiatorName,
                Isid = isid,
                RelativeTargetPortId = relativePort,
                Key = serviceActionKey,
            };
            _registrations[destinationKey] = destination;
        }
        else destination.Key = serviceActionKey;
        _prHolder = destinationKey;
        _prType = type != PersistentReservationType.None && ValidType(type) ? type : _prType;
        if (unregister) _registrations.Remove(own.NexusKey);
        _prGeneration++;
        return true;
    }

    private PersistedReservations Snapshot() => new(
        _prGeneration,
        _registrations.Values.Select(r => new PersistedRegistration(r.InitiatorPortName, r.TargetPortName, r.InitiatorName, r.Isid, r.RelativeTargetPortId, r.Key)).ToList(),
        _prHolder,
        (byte)_prType,
        0);

    private void LoadPersistentReservations()
    {
        var state = _reservationStore?.Load(Identity.UnitId);
        if (state is null) return;
        lock (_stateLock)
        {
            _prGeneration = state.Generation;
            foreach (var r in state.Registrations)
            {
                string nexusKey = r.InitiatorPortName + "|" + r.TargetPortName;
                _registrations[nexusKey] = new Registration
                {
                    NexusKey = nexusKey,
                    InitiatorPortName = r.InitiatorPortName,
                    TargetPortName = r.TargetPortName,
                    InitiatorName = r.InitiatorName,
                    Isid = r.Isid,
                    RelativeTargetPortId = r.RelativeTargetPortId,
                    Key = r.Key,
                };
            }
            _prType = (PersistentReservationType)state.Type;
            _prHolder = state.HolderNexusKey;
            _aptpl = true;
            UpdateReservationsActive();
        }
    }
}
