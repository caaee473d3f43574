using System.Buffers;
using System.Globalization;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Iscsi.Login;
using ISCSISnap.Target.Iscsi.Pdus;
using ISCSISnap.Target.Iscsi.Sessions;
using ISCSISnap.Target.Iscsi.Text;
using ISCSISnap.Target.Scsi;

namespace ISCSISnap.Target.Iscsi.Connections;

internal sealed partial class IscsiConnection
{
    private const int StageSecurity = 0, StageOperational = 1, StageFullFeature = 3;
    private const int MaxLoginText = 64 * 1024;

    private LoginState? _login;

    /// <summary>Everything one login phase accumulates before the session exists.</summary>
    private sealed class LoginState
    {
        public bool First = true;
        public int Stage;
        public uint Itt;
        public ulong Isid;
        public ushort Tsih;
        public ushort Cid;
        public uint CmdSN;
        public string? InitiatorName;
        public string? InitiatorAlias;
        public SessionType Type;
        public IscsiTarget? Target;
        public bool AuthenticationRequired;
        public bool Authenticated;
        public bool AuthMethodChosen;
        public ChapAuthenticator? Chap;
        public NegotiatedParameters Parameters = new();
        public OperationalNegotiator Negotiator = null!;
        public ArrayBufferWriter<byte>? PartialText;
        public bool DeclaredOurLimits;
        public bool SentPortalGroupTag;
        public IscsiSession? ExistingSession;
    }

    private ValueTask HandleLoginAsync(IncomingPdu pdu)
    {
        ref readonly var h = ref pdu.Header;
        _login ??= new LoginState { Negotiator = null! };
        var login = _login;

        byte flags = h.Flags;
        bool transit = (flags & 0x80) != 0;
        bool @continue = (flags & 0x40) != 0;
        int csg = (flags >> 2) & 3;
        int nsg = flags & 3;

        if (login.First)
        {
            login.Isid = ReadIsid(h);
            login.Tsih = h.U16(14);
            login.Itt = h.InitiatorTaskTag;
            login.Cid = h.U16(20);
            login.CmdSN = h.CmdSN;
            _statSN = h.ExpStatSN;   // the first login response starts StatSN where the initiator expects it
            Cid = login.Cid;
            login.Stage = csg;
            login.Negotiator = new OperationalNegotiator(_portal.Options, login.Parameters);
            byte versionMax = h[2], versionMin = h[3];
            if (versionMin > 0 || versionMax < versionMin)
                return FailLogin(LoginStatus.UnsupportedVersion, $"version range {versionMin}-{versionMax} does not include 0");
        }
        login.Itt = h.InitiatorTaskTag;

        if (!h.Immediate)
            return FailLogin(LoginStatus.InitiatorError, "login request without the immediate bit");
        if (csg is not (StageSecurity or StageOperational) || csg != login.Stage)
            return FailLogin(LoginStatus.InitiatorError, $"login request for stage {csg} while in stage {login.Stage}");
        if (transit && (nsg == 2 || nsg <= csg))
            return FailLogin(LoginStatus.InitiatorError, $"invalid transition from stage {csg} to {nsg}");
        if (transit && @continue)
            return FailLogin(LoginStatus.InitiatorError, "both T and C set");

        // Text may span several PDUs (C bit): answer each partial PDU with an empty response.
        if (@continue || login.PartialText is not null)
        {
            login.PartialText ??= new ArrayBufferWriter<byte>();
            if (login.PartialText.WrittenCount + pdu.Data.Length > MaxLoginText)
                return FailLogin(LoginStatus.InitiatorError, "login text too long");
            foreach (var segment in pdu.Data) login.PartialText.Write(segment.Span);
            if (@continue)
            {
                SendLoginResponse(login, transit: false, csg, nsg, LoginStatus.Success, null);
                return default;
            }
        }

        TextParameters request;
        string? fault;
        bool parsed = login.PartialText is { } assembled
            ? TextParameters.TryParse(assembled.WrittenSpan, out request, out fault)
            : TextParameters.TryParse(pdu.Data.IsSingleSegment ? pdu.Data.FirstSpan : pdu.Data.ToArray(), out request, out fault);
        login.PartialText = null;
        if (!parsed)
            return FailLogin(LoginStatus.InitiatorError, fault!);

        var response = new TextParameters();
        if (login.First)
        {
            login.First = false;
            var status = IdentifyInitiator(login, request, response);
            if (status != LoginStatus.Success)
                return FailLogin(status, _loginFault ?? "login refused");
        }
        else if (request["InitiatorName"] is not null || request["TargetName"] is not null || request["SessionType"] is not null)
        {
            return FailLogin(LoginStatus.InitiatorError, "login identity keys repeated");
        }
        if (request["InitiatorAlias"] is { } alias) login.InitiatorAlias = alias;

        bool mayTransit = transit;
        if (csg == StageSecurity)
        {
            var status = HandleSecurityKeys(login, request, response, ref mayTransit);
            if (status != LoginStatus.Success)
                return FailLogin(status, _loginFault ?? "authentication failed");
        }
        else
        {
            if (login.AuthenticationRequired && !login.Authenticated)
                return FailLogin(LoginStatus.AuthenticationFailure, "operational negotiation before authentication");
            if (request["AuthMethod"] is not null || HasChapKeys(request))
                return FailLogin(LoginStatus.InitiatorError, "security keys in operational negotiation");
        }

        // Operational keys may arrive in either stage.
        login.Negotiator.Discovery = login.Type == SessionType.Discovery;
        login.Negotiator.Negotiate(request, response);
        if (login.Negotiator.ProtocolFault is { } negotiationFault)
            return FailLogin(LoginStatus.InitiatorError, negotiationFault);

        if (csg == StageOperational || (transit && nsg == StageOperational) || (transit && nsg == StageFullFeature))
            DeclareTargetLimits(login, response);

        if (mayTransit && nsg == StageFullFeature)
        {
            if (login.Negotiator.OfferStricterDefaults(response) || login.Negotiator.HasPendingOffers)
                mayTransit = false;   // the initiator must answer our offers first
        }

        if (!mayTransit)
        {
            SendLoginResponse(login, transit: false, csg, nsg, LoginStatus.Success, response);
            return default;
        }

        if (nsg == StageOperational)
        {
            login.Stage = StageOperational;
            SendLoginResponse(login, transit: true, csg, nsg, LoginStatus.Success, response);
            return default;
        }

        return CompleteLoginAsync(login, csg, response);
    }

    private string? _loginFault;

    private static ulong ReadIsid(in Bhs h)
    {
        ulong isid = 0;
        for (int i = 8; i < 14; i++) isid = (isid << 8) | h[i];
        return isid;
    }

    private static bool HasChapKeys(TextParameters request)
    {
        foreach (var pair in request.Pairs)
            if (ChapAuthenticator.IsChapKey(pair.Key)) return true;
        return false;
    }

    private ushort IdentifyInitiator(LoginState login, TextParameters request, TextParameters response)
    {
        var initiatorName = request["InitiatorName"];
        if (string.IsNullOrWhiteSpace(initiatorName))
            return Refuse(LoginStatus.MissingParameter, "InitiatorName is missing");
        if (initiatorName.Length > 223)
            return Refuse(LoginStatus.InitiatorError, "InitiatorName longer than 223 bytes");
        login.InitiatorName = initiatorName;

        var sessionType = request["SessionType"] ?? "Normal";
        if (sessionType == "Discovery") login.Type = SessionType.Discovery;
        else if (sessionType == "Normal") login.Type = SessionType.Normal;
        else return Refuse(LoginStatus.SessionTypeNotSupported, $"SessionType '{sessionType}' is not supported");

        if (login.Type == SessionType.Normal)
        {
            var targetName = request["TargetName"];
            if (string.IsNullOrWhiteSpace(targetName))
                return Refuse(LoginStatus.MissingParameter, "TargetName is missing");
            var target = _portal.Targets.Find(targetName);
            if (target is null)
                return Refuse(LoginStatus.NotFound, $"no target named '{Truncate(targetName)}'");
            if (!target.Access.Allows(initiatorName))
                return Refuse(LoginStatus.AuthorizationFailure, $"initiator '{initiatorName}' is not in the ACL of {target.Name}");
            login.Target = target;
            login.AuthenticationRequired = target.Access.Chap is not null;
        }
        else
        {
            login.AuthenticationRequired = _portal.Options.DiscoveryChap is not null;
        }

        if (login.Tsih != 0)
        {
            // Adding a connection to (or reinstating a connection of) an existing session.
            var existing = _portal.Sessions.Find(login.Tsih);
            if (existing is null || existing.Closed
                || !string.Equals(existing.InitiatorName, initiatorName, StringComparison.OrdinalIgnoreCase)
                || existing.Isid != login.Isid)
                return Refuse(LoginStatus.SessionDoesNotExist, $"no session with TSIH {login.Tsih}");
            bool reinstatesConnection = existing.Connections.Any(c => c.Cid == login.Cid);
            if (!reinstatesConnection && existing.Connections.Count >= existing.Parameters.MaxConnections)
                return Refuse(LoginStatus.TooManyConnections, $"session {login.Tsih} already has {existing.Parameters.MaxConnections} connection(s)");
            login.ExistingSession = existing;
        }

        if (login.Stage == StageOperational && login.AuthenticationRequired)
            return Refuse(LoginStatus.AuthenticationFailure, "the target requires CHAP but the initiator skipped security negotiation");

        if (login.Type == SessionType.Normal && !login.SentPortalGroupTag)
        {
            response.Add("TargetPortalGroupTag", _portal.Options.PortalGroupTag.ToString(CultureInfo.InvariantCulture));
            login.SentPortalGroupTag = true;
        }
        return LoginStatus.Success;
    }

    private ushort Refuse(ushort status, string reason)
    {
        _loginFault = reason;
        return status;
    }

    private static string Truncate(string s) => s.Length <= 100 ? s : s[..100] + "…";

    private ushort HandleSecurityKeys(LoginState login, TextParameters request, TextParameters response, ref bool mayTransit)
    {
        var authMethod = request["AuthMethod"];
        if (authMethod is not null)
        {
            if (login.AuthMethodChosen)
                return Refuse(LoginStatus.InitiatorError, "AuthMethod negotiated twice");
            login.AuthMethodChosen = true;
            var offered = authMethod.Split(',').Select(m => m.Trim()).ToList();
            if (login.AuthenticationRequired)
            {
                if (!offered.Contains("CHAP"))
                    return Refuse(LoginStatus.AuthenticationFailure, $"the target requires CHAP; initiator offered AuthMethod={authMethod}");
                response.Add("AuthMethod", "CHAP");
                var (chap, mutual) = CredentialsFor(login);
                var algorithms = _portal.Options.ChapAlgorithms.Select(ChapAlgorithm.FromName).OfType<ChapAlgorithm>().ToList();
                login.Chap = new ChapAuthenticator(chap!, mutual, algorithms, _portal.ChallengeReplays);
            }
            else if (offered.Contains("None"))
            {
                response.Add("AuthMethod", "None");
                login.Authenticated = true;
            }
            else
            {
                response.Add("AuthMethod", "Reject");
                return Refuse(LoginStatus.AuthenticationFailure, $"no acceptable AuthMethod in {authMethod}");
            }
        }

        if (login.Chap is { } authenticator)
        {
            if (HasChapKeys(request))
            {
                switch (authenticator.Process(request, response))
                {
                    case ChapStep.Failed:
                        return Refuse(LoginStatus.AuthenticationFailure, authenticator.FailureReason ?? "CHAP failed");
                    case ChapStep.Succeeded:
                        login.Authenticated = true;
                        break;
                }
            }
        }
        else if (HasChapKeys(request))
        {
            return Refuse(LoginStatus.InitiatorError, "CHAP keys without AuthMethod=CHAP");
        }

        if (!login.AuthMethodChosen && login.AuthenticationRequired && mayTransit)
            return Refuse(LoginStatus.AuthenticationFailure, "the target requires CHAP; the initiator did not negotiate AuthMethod");
        if (!login.AuthMethodChosen && !login.AuthenticationRequired)
            login.Authenticated = true;
        if (!login.Authenticated) mayTransit = false;   // stay in security negotiation until CHAP completes
        return LoginStatus.Success;
    }

    private (ChapCredentials? Chap, ChapCredentials? Mutual) CredentialsFor(LoginState login) =>
        login.Type == SessionType.Discovery
            ? (_portal.Options.DiscoveryChap, null)
            : (login.Target!.Access.Chap, login.Target.Access.MutualChap);

    private void DeclareTargetLimits(LoginState login, TextParameters response)
    {
        if (login.DeclaredOurLimits) return;
        login.DeclaredOurLimits = true;
        login.Parameters.TargetMaxRecvDataSegmentLength = _portal.Options.MaxRecvDataSegmentLength;
        response.Add("MaxRecvDataSegmentLength", _portal.Options.MaxRecvDataSegmentLength.ToString(CultureInfo.InvariantCulture));
        if (login.Type == SessionType.Normal && _portal.TargetAlias(login.Target!) is { } alias)
            response.Add("TargetAlias", alias);
    }

    private async ValueTask CompleteLoginAsync(LoginState login, int csg, TextParameters response)
    {
        IscsiSession session;
        if (login.ExistingSession is { } existing)
        {
            // Connection reinstatement: the old connection with this CID goes away first.
            foreach (var old in existing.Connections.Where(c => c.Cid == login.Cid))
                old.Drop(AsyncEventDropConnection, "reinstated by a new login");
            session = existing;
            Parameters = MergeConnectionParameters(existing.Parameters, login.Parameters);
        }
        else
        {
            if (login.Type == SessionType.Normal
                && _portal.Sessions.FindForReinstatement(login.InitiatorName!, login.Isid, login.Target!.Name) is { } previous)
            {
                // Session reinstatement (RFC 7143 §6.3.5): the old session's tasks end before the new one starts.
                Log.SessionReinstated(_log, login.InitiatorName!, login.Isid, previous.Tsih);
                await _portal.TerminateSessionAsync(previous, "reinstated by a new login").ConfigureAwait(false);
            }
            ushort tsih = _portal.Sessions.ReserveTsih();
            if (tsih == 0)
            {
                await FailLogin(LoginStatus.OutOfResources, "session limit reached").ConfigureAwait(false);
                return;
            }
            ItNexus? nexus = login.Type == SessionType.Normal
                ? new ItNexus(login.InitiatorName!, login.Isid, login.Target!.Name, _portal.Options.PortalGroupTag, _portal.RelativeTargetPortId)
                : null;
            session = new IscsiSession(tsih, login.InitiatorName!, login.Isid, login.Type, login.Target, login.Parameters,
                login.CmdSN, _portal.Options.QueueDepth, nexus) { InitiatorAlias = login.InitiatorAlias };
            if (!_portal.Sessions.Add(session))
            {
                await FailLogin(LoginStatus.OutOfResources, "session limit reached").ConfigureAwait(false);
                return;
            }
            _portal.Metrics.SessionOpened();
            Parameters = login.Parameters;
        }
        session.AddConnection(this);
        Session = session;
        login.Tsih = session.Tsih;

        var item = BuildLoginResponse(login, transit: true, csg, StageFullFeature, LoginStatus.Success, response);
        item.ChangesFraming = true;
        TryMoveState(ConnectionState.Login, ConnectionState.FullFeature);   // unless dropped meanwhile: then it closes after this PDU
        _limits = new FramingLimits(Parameters.HeaderDigest, Parameters.DataDigest, Parameters.TargetMaxRecvDataSegmentLength);
        Enqueue(item, kick: false);
        _portal.Metrics.LoginAttempt(true, "ok");
        Log.LoginSucceeded(_log, Remote, login.InitiatorName!, login.Target?.Name ?? "(discovery)", session.Tsih,
            Parameters.HeaderDigest, Parameters.DataDigest, login.Chap?.Algorithm?.Name ?? "None");
        _login = null;
    }

    private static NegotiatedParameters MergeConnectionParameters(NegotiatedParameters session, NegotiatedParameters connection)
    {
        var merged = session.CloneSessionScope();
        merged.HeaderDigest = connection.HeaderDigest;
        merged.DataDigest = connection.DataDigest;
        merged.InitiatorMaxRecvDataSegmentLength = connection.InitiatorMaxRecvDataSegmentLength;
        merged.TargetMaxRecvDataSegmentLength = connection.TargetMaxRecvDataSegmentLength;
        return merged;
    }

    private ValueTask FailLogin(ushort status, string reason)
    {
        var login = _login!;
        Log.LoginFailed(_log, Remote, login.InitiatorName ?? "?", status, reason);
        _portal.Metrics.LoginAttempt(false, StatusName(status));
        CloseAfter(BuildLoginResponse(login, transit: false, login.Stage, login.Stage, status, null), "login refused");
        return default;
    }

    private static string StatusName(ushort status) => status switch
    {
        LoginStatus.AuthenticationFailure => "authentication",
        LoginStatus.AuthorizationFailure => "authorization",
        LoginStatus.NotFound => "not-found",
        LoginStatus.MissingParameter => "missing-parameter",
        LoginStatus.UnsupportedVersion => "version",
        LoginStatus.TooManyConnections => "too-many-connections",
        LoginStatus.SessionDoesNotExist => "no-session",
        LoginStatus.OutOfResources => "out-of-resources",
        _ => "protocol",
    };

    private void SendLoginResponse(LoginState login, bool transit, int csg, int nsg, ushort status, TextParameters? response) =>
        Enqueue(BuildLoginResponse(login, transit, csg, nsg, status, response), kick: false);

    private ControlPduItem BuildLoginResponse(LoginState login, bool transit, int csg, int nsg, ushort status, TextParameters? response)
    {
        byte flags = (byte)((transit ? 0x80 : 0) | (csg << 2) | (transit ? nsg : 0));
        var item = new ControlPduItem(Opcode.LoginResponse, flags);
        var h = item.Header.AsSpan();
        h[2] = 0x00;   // version-max
        h[3] = 0x00;   // version-active
        ulong isid = login.Isid;
        for (int i = 13; i >= 8; i--) { h[i] = (byte)isid; isid >>= 8; }
        HeaderWriter.U16(h, 14, transit && nsg == StageFullFeature ? login.Tsih : (login.ExistingSession?.Tsih ?? 0));
        HeaderWriter.U32(h, 16, login.Itt);
        h[36] = (byte)(status >> 8);
        h[37] = (byte)status;
        if (response is { Count: > 0 }) item.SetData(response.Encode());
        return item;
    }
}
