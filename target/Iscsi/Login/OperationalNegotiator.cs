using System.Globalization;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Iscsi.Sessions;
using ISCSISnap.Target.Iscsi.Text;

namespace ISCSISnap.Target.Iscsi.Login;

/// <summary>
/// Answers operational keys with RFC 7143 §6 and §13 semantics: list keys pick the first value of the
/// initiator's list we support; numeric keys take min or max; booleans AND or OR; declaratives are recorded.
/// Unknown keys are answered NotUnderstood, bad values Reject, keys not applying Irrelevant. A key negotiated
/// twice in one login is a protocol error. Threading: one instance per login or per text negotiation.
/// </summary>
public sealed class OperationalNegotiator
{
    private readonly IscsiPortalOptions _options;
    private readonly NegotiatedParameters _parameters;
    private readonly HashSet<string> _seen = new(StringComparer.Ordinal);
    private readonly HashSet<string> _offered = new(StringComparer.Ordinal);
    private readonly bool _fullFeaturePhase;

    public OperationalNegotiator(IscsiPortalOptions options, NegotiatedParameters parameters, bool fullFeaturePhase = false)
    {
        _options = options;
        _parameters = parameters;
        _fullFeaturePhase = fullFeaturePhase;
    }

    public bool Discovery { get; set; }
    /// <summary>Set when the initiator broke a rule that fails the login (repeated key, for instance).</summary>
    public string? ProtocolFault { get; private set; }

    /// <summary>Keys handled outside this class (login identity and authentication).</summary>
    public static bool IsLoginIdentityKey(string key) =>
        key is "InitiatorName" or "TargetName" or "SessionType" or "InitiatorAlias" or "AuthMethod" || ChapAuthenticator.IsChapKey(key);

    /// <summary>Answers each operational key of <paramref name="request"/> into <paramref name="response"/>.</summary>
    public void Negotiate(TextParameters request, TextParameters response)
    {
        // FirstBurstLength depends on InitialR2T, ImmediateData and MaxBurstLength, whatever their order.
        string? firstBurst = null;
        foreach (var (key, value) in request.Pairs)
        {
            if (IsLoginIdentityKey(key)) continue;
            if (_offered.Remove(key))
            {
                AcceptAnswerToOffer(key, value);
                continue;
            }
            if (value is "NotUnderstood" or "Irrelevant" or "Reject")
                continue;   // nothing to negotiate
            if (!_seen.Add(key))
            {
                ProtocolFault = $"key {key} negotiated twice";
                return;
            }
            if (key == "FirstBurstLength")
            {
                firstBurst = value;
                continue;
            }
            Answer(key, value, response);
        }
        if (firstBurst is not null) Answer("FirstBurstLength", firstBurst, response);
    }

    /// <summary>
    /// Before leaving operational negotiation: offers the keys the initiator left at their RFC defaults where our
    /// settings are stricter. Returns true when something was offered (the login must not transit yet).
    /// </summary>
    public bool OfferStricterDefaults(TextParameters response)
    {
        if (Discovery) return false;
        void Offer(string key, string value)
        {
            if (_seen.Contains(key) || !_offered.Add(key)) return;
            _seen.Add(key);
            response.Add(key, value);
        }
        var p = _parameters;
        if (!_options.ImmediateData && p.ImmediateData) { p.ImmediateData = false; Offer("ImmediateData", "No"); }
        if (_options.MaxBurstLength < p.MaxBurstLength) { p.MaxBurstLength = _options.MaxBurstLength; Offer("MaxBurstLength", Invariant(p.MaxBurstLength)); }
        int firstBurst = Math.Min(_options.FirstBurstLength, p.MaxBurstLength);
        if (firstBurst < p.FirstBurstLength && !(p.InitialR2T && !p.ImmediateData)) { p.FirstBurstLength = firstBurst; Offer("FirstBurstLength", Invariant(firstBurst)); }
        if (_options.DefaultTime2Wait > p.DefaultTime2Wait) { p.DefaultTime2Wait = _options.DefaultTime2Wait; Offer("DefaultTime2Wait", Invariant(p.DefaultTime2Wait)); }
        if (_options.DefaultTime2Retain < p.DefaultTime2Retain) { p.DefaultTime2Retain = _options.DefaultTime2Retain; Offer("DefaultTime2Retain", Invariant(p.DefaultTime2Retain)); }
        if (_options.MaxOutstandingR2T < p.MaxOutstandingR2T) { p.MaxOutstandingR2T = _options.MaxOutstandingR2T; Offer("MaxOutstandingR2T", Invariant(p.MaxOutstandingR2T)); }
        return _offered.Count > 0;
    }

    /// <summary>True while an offer of ours awaits the initiator's answer.</summary>
    public bool HasPendingOffers => _offered.Count > 0;

    private void AcceptAnswerToOffer(string key, string value)
    {
        // The initiator computed the same function on our offer; take its result when it is a legal value no
        // looser than what we offered. If it refused the offer, the RFC default stays in force on both sides.
        if (value is "Reject" or "NotUnderstood" or "Irrelevant")
        {
            var defaults = new NegotiatedParameters();
            switch (key)
            {
                case "ImmediateData": _parameters.ImmediateData = defaults.ImmediateData; break;
                case "MaxBurstLength": _parameters.MaxBurstLength = defaults.MaxBurstLength; break;
                case "FirstBurstLength": _parameters.FirstBurstLength = defaults.FirstBurstLength; break;
                case "DefaultTime2Wait": _parameters.DefaultTime2Wait = defaults.DefaultTime2Wait; break;
                case "DefaultTime2Retain": _parameters.DefaultTime2Retain = defaults.DefaultTime2Retain; break;
                case "MaxOutstandingR2T": _parameters.MaxOutstandingR2T = defaults.MaxOutstandingR2T; break;
            }
            return;
        }
        switch (key)
        {
            case "ImmediateData": if (value == "No") _parameters.ImmediateData = false; break;
            case "MaxBurstLength": if (TryNumber(value, 512, _parameters.MaxBurstLength, out int mbl)) _parameters.MaxBurstLength = mbl; break;
            case "FirstBurstLength": if (TryNumber(value, 512, _parameters.FirstBurstLength, out int fbl)) _parameters.FirstBurstLength = fbl; break;
            case "DefaultTime2Wait": if (TryNumber(value, _parameters.DefaultTime2Wait, 3600, out int t2w)) _parameters.DefaultTime2Wait = t2w; break;
            case "DefaultTime2Retain": if (TryNumber(value, 0, _parameters.DefaultTime2Retain, out int t2r)) _parameters.DefaultTime2Retain = t2r; break;
            case "MaxOutstandingR2T": if (TryNumber(value, 1, _parameters.MaxOutstandingR2T, out int r2t)) _parameters.MaxOutstandingR2T = r2t; break;
        }
    }

    private static string Invariant(int value) => value.ToString(CultureInfo.InvariantCulture);

    private void Answer(string key, string value, TextParameters response)
    {
        if (_fullFeaturePhase && key != "MaxRecvDataSegmentLength")
        {
            // Only MaxRecvDataSegmentLength may be redeclared after login; every other known key is login-only.
            response.Add(key, IsKnownKey(key) ? "Reject" : "NotUnderstood");
            return;
        }
        switch (key)
        {
            case "HeaderDigest":
                response.Add(key, SelectDigest(value, _options.HeaderDigests, out bool headerCrc));
                _parameters.HeaderDigest = headerCrc;
                break;
            case "DataDigest":
                response.Add(key, SelectDigest(value, _options.DataDigests, out bool dataCrc));
                _parameters.DataDigest = dataCrc;
                break;
            case "MaxRecvDataSegmentLength":
                if (TryNumber(value, 512, 16777215, out int mrdsl))
                {
                    _parameters.InitiatorMaxRecvDataSegmentLength = mrdsl;
                    // Declarative: the initiator states its own limit; ours goes out separately.
                }
                else response.Add(key, "Reject");
                break;
            case "MaxConnections":
                if (Discovery) response.Add(key, "Irrelevant");
                else NumericMin(key, value, 1, 65535, _options.MaxConnections, v => _parameters.MaxConnections = v, response);
                break;
            case "InitialR2T":
                if (Discovery) response.Add(key, "Irrelevant");
                else BooleanOr(key, value, _options.InitialR2T, v => _parameters.InitialR2T = v, response);
                break;
            case "ImmediateData":
                if (Discovery) response.Add(key, "Irrelevant");
                else BooleanAnd(key, value, _options.ImmediateData, v => _parameters.ImmediateData = v, response);
                break;
            case "MaxBurstLength":
                if (Discovery) response.Add(key, "Irrelevant");
                else NumericMin(key, value, 512, 16777215, _options.MaxBurstLength, v => _parameters.MaxBurstLength = v, response);
                break;
            case "FirstBurstLength":
                if (Discovery || (_parameters.InitialR2T && !_parameters.ImmediateData)) response.Add(key, "Irrelevant");
                else NumericMin(key, value, 512, 16777215, Math.Min(_options.FirstBurstLength, _parameters.MaxBurstLength),
                    v => _parameters.FirstBurstLength = v, response);
                break;
            case "DefaultTime2Wait":
                NumericMax(key, value, 0, 3600, _options.DefaultTime2Wait, v => _parameters.DefaultTime2Wait = v, response);
                break;
            case "DefaultTime2Retain":
                NumericMin(key, value, 0, 3600, _options.DefaultTime2Retain, v => _parameters.DefaultTime2Retain = v, response);
                break;
            case "MaxOutstandingR2T":
                if (Discovery) response.Add(key, "Irrelevant");
                else NumericMin(key, value, 1, 65535, _options.MaxOutstandingR2T, v => _parameters.MaxOutstandingR2T = v, response);
                break;
            case "DataPDUInOrder":
                if (Discovery) response.Add(key, "Irrelevant");
                else BooleanOr(key, value, true, v => _parameters.DataPduInOrder = v, response);
                break;
            case "DataSequenceInOrder":
                if (Discovery) response.Add(key, "Irrelevant");
                else BooleanOr(key, value, true, v => _parameters.DataSequenceInOrder = v, response);
                break;
            case "ErrorRecoveryLevel":
                NumericMin(key, value, 0, 2, 0, v => _parameters.ErrorRecoveryLevel = v, response);
                break;
            case "IFMarker":
            case "OFMarker":
                // Markers were removed by RFC 7143; answering No keeps RFC 3720 initiators working.
                if (value is "Yes" or "No") response.Add(key, "No");
                else response.Add(key, "Reject");
                break;
            case "IFMarkInt":
            case "OFMarkInt":
                response.Add(key, "Irrelevant");
                break;
            case "TaskReporting":
                response.Add(key, value.Split(',').Contains("RFC3720") ? "RFC3720" : "Reject");
                break;
            case "iSCSIProtocolLevel":
                if (TryNumber(value, 0, 31, out int level)) response.Add(key, Math.Min(level, 1).ToString(CultureInfo.InvariantCulture));
                else response.Add(key, "Reject");
                break;
            case "TargetAlias":
            case "TargetAddress":
            case "TargetPortalGroupTag":
                // Target-declared keys: an initiator must not send them.
                response.Add(key, "Reject");
                break;
            case "SendTargets":
                response.Add(key, "Irrelevant");
                break;
            default:
                response.Add(key, "NotUnderstood");
                break;
        }
    }

    private static bool IsKnownKey(string key) => key is "HeaderDigest" or "DataDigest" or "MaxConnections" or "InitialR2T"
        or "ImmediateData" or "MaxBurstLength" or "FirstBurstLength" or "DefaultTime2Wait" or "DefaultTime2Retain"
        or "MaxOutstandingR2T" or "DataPDUInOrder" or "DataSequenceInOrder" or "ErrorRecoveryLevel" or "IFMarker"
        or "OFMarker" or "IFMarkInt" or "OFMarkInt" or "TaskReporting" or "iSCSIProtocolLevel" or "TargetAlias"
        or "TargetAddress" or "TargetPortalGroupTag" or "InitiatorName" or "TargetName" or "SessionType"
        or "InitiatorAlias" or "AuthMethod";

    private static string SelectDigest(string offered, List<string> allowed, out bool crc)
    {
        crc = false;
        foreach (var item in offered.Split(','))
        {
            var value = item.Trim();
            if (allowed.Contains(value, StringComparer.Ordinal))
            {
                crc = value == "CRC32C";
                return value;
            }
        }
        return "Reject";
    }

    internal static bool TryNumber(string value, int min, int max, out int result)
    {
        result = 0;
        long parsed;
        if (value.StartsWith("0x", StringComparison.OrdinalIgnoreCase))
        {
            if (!long.TryParse(value.AsSpan(2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out parsed)) return false;
        }
        else if (!long.TryParse(value, NumberStyles.None, CultureInfo.InvariantCulture, out parsed)) return false;
        if (parsed < min || parsed > max) return false;
        result = (int)parsed;
        return true;
    }

    private static void NumericMin(string key, string value, int min, int max, int ours, Action<int> set, TextParameters response)
    {
        if (!TryNumber(value, min, max, out int theirs))
        {
            response.Add(key, "Reject");
            return;
        }
        int result = Math.Min(theirs, ours);
        set(result);
        response.Add(key, result.ToString(CultureInfo.InvariantCulture));
    }

    private static void NumericMax(string key, string value, int min, int max, int ours, Action<int> set, TextParameters response)
    {
        if (!TryNumber(value, min, max, out int theirs))
        {
            response.Add(key, "Reject");
            return;
        }
        int result = Math.Max(theirs, ours);
        set(result);
        response.Add(key, result.ToString(CultureInfo.InvariantCulture));
    }

    private static void BooleanOr(string key, string value, bool ours, Action<bool> set, TextParameters response)
    {
        if (value is not ("Yes" or "No"))
        {
            response.Add(key, "Reject");
            return;
        }
        bool result = value == "Yes" || ours;
        set(result);
        response.Add(key, result ? "Yes" : "No");
    }

    private static void BooleanAnd(string key, string value, bool ours, Action<bool> set, TextParameters response)
    {
        if (value is not ("Yes" or "No"))
        {
            response.Add(key, "Reject");
            return;
        }
        bool result = value == "Yes" && ours;
        set(result);
        response.Add(key, result ? "Yes" : "No");
    }
}
