using System.Globalization;
using System.Security.Cryptography;
using System.Text;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Iscsi.Text;

namespace ISCSISnap.Target.Iscsi.Login;

public enum ChapStep
{
    /// <summary>More login PDUs are needed.</summary>
    Continue,
    /// <summary>The initiator proved its identity (and, for mutual CHAP, we answered its challenge).</summary>
    Succeeded,
    /// <summary>Authentication failed: the login ends with status 0201.</summary>
    Failed,
}

/// <summary>
/// Target side of CHAP (RFC 7143 §12.1.3, RFC 1994): choose the strongest algorithm in the initiator's CHAP_A
/// list, challenge it, check CHAP_N/CHAP_R in constant time, and answer a mutual-CHAP challenge. Refuses
/// reflected, short, over-long and replayed initiator challenges. Threading: one instance per login.
/// </summary>
public sealed class ChapAuthenticator
{
    public const int MinimumInitiatorChallengeLength = 16;
    public const int MaximumChallengeLength = 1024;

    private readonly ChapCredentials _initiatorCredentials;
    private readonly ChapCredentials? _targetCredentials;
    private readonly IReadOnlyList<ChapAlgorithm> _allowed;
    private readonly ChallengeReplayCache _replayCache;
    private ChapAlgorithm? _algorithm;
    private byte _identifier;
    private byte[]? _challenge;
    private State _state = State.AwaitingAlgorithm;

    private enum State { AwaitingAlgorithm, AwaitingResponse, Done }

    public ChapAuthenticator(ChapCredentials initiatorCredentials, ChapCredentials? targetCredentials,
        IReadOnlyList<ChapAlgorithm> allowed, ChallengeReplayCache replayCache)
    {
        _initiatorCredentials = initiatorCredentials;
        _targetCredentials = targetCredentials;
        _allowed = allowed.Where(a => a.IsSupported).ToList();
        _replayCache = replayCache;
    }

    /// <summary>Why the last step failed (for the log; never contains secrets).</summary>
    public string? FailureReason { get; private set; }
    public ChapAlgorithm? Algorithm => _algorithm;

    /// <summary>The CHAP keys this implementation consumes.</summary>
    public static bool IsChapKey(string key) => key is "CHAP_A" or "CHAP_I" or "CHAP_C" or "CHAP_N" or "CHAP_R";

    public ChapStep Process(TextParameters request, TextParameters response)
    {
        switch (_state)
        {
            case State.AwaitingAlgorithm:
            {
                var offered = request["CHAP_A"];
                if (offered is null)
                    return Fail("the initiator did not send CHAP_A");
                if (request["CHAP_N"] is not null || request["CHAP_R"] is not null)
                    return Fail("CHAP_N/CHAP_R arrived before the challenge");
                var codes = new HashSet<int>();
                foreach (var item in offered.Split(','))
                    if (int.TryParse(item, NumberStyles.None, CultureInfo.InvariantCulture, out int code)) codes.Add(code);
                // Strongest we allow among those offered, whatever order the initiator listed them in.
                _algorithm = _allowed.FirstOrDefault(a => codes.Contains(a.Code));
                if (_algorithm is null)
                {
                    response.Add("CHAP_A", "Reject");
                    return Fail($"no acceptable CHAP algorithm in CHAP_A={offered}");
                }
                _identifier = (byte)RandomNumberGenerator.GetInt32(256);
                _challenge = RandomNumberGenerator.GetBytes(Math.Max(16, _algorithm.DigestLength));
                response.Add("CHAP_A", _algorithm.Code.ToString(CultureInfo.InvariantCulture));
                response.Add("CHAP_I", _identifier.ToString(CultureInfo.InvariantCulture));
                response.Add("CHAP_C", "0x" + Convert.ToHexStringLower(_challenge));
                _state = State.AwaitingResponse;
                return ChapStep.Continue;
            }
            case State.AwaitingResponse:
            {
                var name = request["CHAP_N"];
                var responseText = request["CHAP_R"];
                if (name is null || responseText is null)
                    return Fail("CHAP_N and CHAP_R are required");
                if (!TryDecodeBinary(responseText, out var received) || received.Length != _algorithm!.DigestLength)
                    return Fail("CHAP_R is malformed or has the wrong length");
                var expected = _algorithm.Response(_identifier, Encoding.UTF8.GetBytes(_initiatorCredentials.Secret), _challenge);
                bool nameOk = CryptographicOperations.FixedTimeEquals(Encoding.UTF8.GetBytes(name), Encoding.UTF8.GetBytes(_initiatorCredentials.UserName));
                bool responseOk = CryptographicOperations.FixedTimeEquals(received, expected);
                if (!(nameOk & responseOk))
                    return Fail($"wrong CHAP credentials for user '{Truncate(name)}'");

                var mutualIdentifier = request["CHAP_I"];
                var mutualChallenge = request["CHAP_C"];
                if (mutualIdentifier is null && mutualChallenge is null)
                {
                    if (_targetCredentials is not null)
                        return Fail("the target requires mutual CHAP but the initiator sent no challenge");
                    _state = State.Done;
                    return ChapStep.Succeeded;
                }
                if (mutualIdentifier is null || mutualChallenge is null)
                    return Fail("mutual CHAP needs both CHAP_I and CHAP_C");
                if (_targetCredentials is null)
                    return Fail("the initiator asked for mutual CHAP but no target credentials are configured");
                if (!int.TryParse(mutualIdentifier, NumberStyles.None, CultureInfo.InvariantCulture, out int id) || id > 255)
                    return Fail("CHAP_I is not 0-255");
                if (!TryDecodeBinary(mutualChallenge, out var challenge))
                    return Fail("CHAP_C is malformed");
                if (challenge.Length < MinimumInitiatorChallengeLength || challenge.Length > MaximumChallengeLength)
                    return Fail($"initiator challenge of {challenge.Length} bytes refused (must be {MinimumInitiatorChallengeLength}-{MaximumChallengeLength})");
                if (CryptographicOperations.FixedTimeEquals(challenge, _challenge))
                    return Fail("initiator reflected the target's challenge");
                if (!_replayCache.TryRecord(challenge))
                    return Fail("initiator challenge replayed");
                if (_targetCredentials.Secret == _initiatorCredentials.Secret)
                    return Fail("mutual CHAP secrets must differ in each direction");
                var answer = _algorithm.Response((byte)id, Encoding.UTF8.GetBytes(_targetCredentials.Secret), challenge);
                response.Add("CHAP_N", _targetCredentials.UserName);
                response.Add("CHAP_R", "0x" + Convert.ToHexStringLower(answer));
                _state = State.Done;
                return ChapStep.Succeeded;
            }
            default:
                return Fail("CHAP keys after authentication completed");
        }
    }

    private ChapStep Fail(string reason)
    {
        FailureReason = reason;
        _state = State.Done;
        return ChapStep.Failed;
    }

    private static string Truncate(string s) => s.Length <= 64 ? s : s[..64] + "…";

    /// <summary>Decodes a CHAP binary value: 0x-prefixed hex or 0b-prefixed base64 (RFC 7143 §6.1).</summary>
    public static bool TryDecodeBinary(string text, out byte[] bytes)
    {
        bytes = [];
        if (text.Length < 3) return false;
        var body = text.AsSpan(2);
        try
        {
            if (text[0] == '0' && (text[1] == 'x' || text[1] == 'X'))
            {
                if (body.Length % 2 != 0) return false;
                bytes = Convert.FromHexString(body);
                return true;
            }
            if (text[0] == '0' && (text[1] == 'b' || text[1] == 'B'))
            {
                bytes = Convert.FromBase64String(body.ToString());
                return true;
            }
        }
        catch (FormatException)
        {
        }
        return false;
    }
}

/// <summary>Remembers recent mutual-CHAP challenges so a recorded exchange cannot be replayed. Threading: thread-safe.</summary>
public sealed class ChallengeReplayCache
{
    private readonly int _capacity;
    private readonly Queue<string> _order = new();
    private readonly HashSet<string> _seen = new();

    public ChallengeReplayCache(int capacity = 4096) => _capacity = capacity;

    public bool TryRecord(byte[] challenge)
    {
        var key = Convert.ToBase64String(SHA256.HashData(challenge));
        lock (_seen)
        {
            if (!_seen.Add(key)) return false;
            _order.Enqueue(key);
            if (_order.Count > _capacity) _seen.Remove(_order.Dequeue());
            return true;
        }
    }
}
