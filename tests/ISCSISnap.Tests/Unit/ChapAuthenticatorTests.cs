using System.Globalization;
using System.Security.Cryptography;
using System.Text;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Iscsi.Login;
using ISCSISnap.Target.Iscsi.Text;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary>
/// Target-side CHAP (RFC 7143 §12.1.3, RFC 1994): the expected responses are computed here independently with
/// System.Security.Cryptography as H(CHAP_I || secret || CHAP_C).
/// </summary>
public sealed class ChapAuthenticatorTests
{
    private static readonly ChapCredentials Initiator = new("initiator-user", "initiator-secret-1");
    private static readonly ChapCredentials Target = new("target-user", "target-secret-22");

    private static byte[] Hash(int algorithm, byte[] input) => algorithm switch
    {
        5 => MD5.HashData(input),
        6 => SHA1.HashData(input),
        7 => SHA256.HashData(input),
        8 => SHA3_256.HashData(input),
        _ => throw new ArgumentOutOfRangeException(nameof(algorithm)),
    };

    private static byte[] Expected(int algorithm, byte identifier, string secret, byte[] challenge) =>
        Hash(algorithm, [identifier, .. Encoding.UTF8.GetBytes(secret), .. challenge]);

    private static TextParameters Keys(params (string Key, string Value)[] pairs)
    {
        var p = new TextParameters();
        foreach (var (k, v) in pairs) p.Add(k, v);
        return p;
    }

    private static string Hex(byte[] bytes) => "0x" + Convert.ToHexStringLower(bytes);

    private sealed class Exchange
    {
        public Exchange(ChapCredentials? target = null, IReadOnlyList<ChapAlgorithm>? allowed = null, ChallengeReplayCache? cache = null)
        {
            Authenticator = new ChapAuthenticator(Initiator, target, allowed ?? ChapAlgorithm.All, cache ?? new ChallengeReplayCache());
        }

        public ChapAuthenticator Authenticator { get; }
        public int Algorithm { get; private set; }
        public byte Identifier { get; private set; }
        public byte[] Challenge { get; private set; } = [];

        /// <summary>The first step: the initiator's CHAP_A; returns the target's answer.</summary>
        public TextParameters Offer(string algorithms)
        {
            var response = new TextParameters();
            var step = Authenticator.Process(Keys(("CHAP_A", algorithms)), response);
            if (step == ChapStep.Continue)
            {
                Algorithm = int.Parse(response["CHAP_A"]!, CultureInfo.InvariantCulture);
                Identifier = byte.Parse(response["CHAP_I"]!, CultureInfo.InvariantCulture);
                Assert.True(ChapAuthenticator.TryDecodeBinary(response["CHAP_C"]!, out var challenge));
                Challenge = challenge;
            }
            else Assert.Equal(ChapStep.Failed, step);
            return response;
        }

        public ChapStep Respond(TextParameters request, out TextParameters response)
        {
            response = new TextParameters();
            return Authenticator.Process(request, response);
        }

        public string CorrectResponse => Hex(Expected(Algorithm, Identifier, Initiator.Secret, Challenge));
    }

    public static TheoryData<int> Algorithms => new() { 5, 6, 7, 8 };

    [Theory]
    [MemberData(nameof(Algorithms))]
    public void Each_algorithm_authenticates_a_correct_response(int code)
    {
        var exchange = new Exchange(allowed: [ChapAlgorithm.FromCode(code)!]);
        var answer = exchange.Offer(code.ToString(CultureInfo.InvariantCulture));
        if (code == 8 && !SHA3_256.IsSupported)
        {
            // Without SHA3 in the platform crypto library the algorithm cannot be offered at all.
            Assert.Equal("Reject", answer["CHAP_A"]);
            return;
        }
        Assert.Equal(code, exchange.Algorithm);
        var digestLength = Hash(code, []).Length;
        Assert.True(exchange.Challenge.Length >= Math.Max(16, digestLength), $"challenge of {exchange.Challenge.Length} bytes");
        Assert.Equal(ChapStep.Succeeded, exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", exchange.CorrectResponse)), out var response));
        Assert.Equal(0, response.Count);
        Assert.Equal(code, exchange.Authenticator.Algorithm!.Code);
    }

    [Fact]
    public void Challenges_are_fresh_for_every_login()
    {
        var a = new Exchange();
        var b = new Exchange();
        a.Offer("7");
        b.Offer("7");
        Assert.NotEqual(a.Challenge, b.Challenge);
    }

    [Theory]
    [InlineData("5,6,7,8", 8)]
    [InlineData("8,7,6,5", 8)]
    [InlineData("5,7,6", 7)]
    [InlineData("6,5", 6)]
    [InlineData("5", 5)]
    [InlineData("99,5,bogus", 5)]
    public void The_strongest_allowed_algorithm_wins_whatever_the_initiators_order(string offered, int expected)
    {
        if (expected == 8 && !SHA3_256.IsSupported) expected = 7;
        var exchange = new Exchange();
        exchange.Offer(offered);
        Assert.Equal(expected, exchange.Algorithm);
    }

    [Fact]
    public void Algorithms_the_target_does_not_allow_are_not_chosen()
    {
        var exchange = new Exchange(allowed: [ChapAlgorithm.Sha256, ChapAlgorithm.Md5]);
        exchange.Offer("6,5,8");
        Assert.Equal(5, exchange.Algorithm);
    }

    [Theory]
    [InlineData("6")]
    [InlineData("1,2,3")]
    [InlineData("")]
    public void No_acceptable_algorithm_fails_with_a_reject(string offered)
    {
        var exchange = new Exchange(allowed: [ChapAlgorithm.Sha256, ChapAlgorithm.Md5]);
        var answer = exchange.Offer(offered);
        Assert.Equal("Reject", answer["CHAP_A"]);
        Assert.Null(answer["CHAP_C"]);
        Assert.NotNull(exchange.Authenticator.FailureReason);
    }

    [Fact]
    public void A_response_before_the_challenge_fails()
    {
        var exchange = new Exchange();
        Assert.Equal(ChapStep.Failed, exchange.Respond(Keys(("CHAP_A", "5"), ("CHAP_N", "u"), ("CHAP_R", "0x00")), out _));
    }

    [Fact]
    public void A_wrong_name_fails()
    {
        var exchange = new Exchange();
        exchange.Offer("7");
        Assert.Equal(ChapStep.Failed, exchange.Respond(Keys(("CHAP_N", "someone-else"), ("CHAP_R", exchange.CorrectResponse)), out _));
    }

    [Fact]
    public void A_wrong_response_fails()
    {
        var exchange = new Exchange();
        exchange.Offer("7");
        var wrong = Expected(7, exchange.Identifier, "not-the-secret-xx", exchange.Challenge);
        Assert.Equal(ChapStep.Failed, exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", Hex(wrong))), out _));
        Assert.Contains(Initiator.UserName, exchange.Authenticator.FailureReason);
        Assert.DoesNotContain(Initiator.Secret, exchange.Authenticator.FailureReason);
    }

    [Fact]
    public void A_response_with_the_wrong_identifier_fails()
    {
        var exchange = new Exchange();
        exchange.Offer("7");
        var wrong = Expected(7, (byte)(exchange.Identifier + 1), Initiator.Secret, exchange.Challenge);
        Assert.Equal(ChapStep.Failed, exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", Hex(wrong))), out _));
    }

    [Theory]
    [InlineData(16)]   // an MD5-sized answer to a SHA-256 challenge
    [InlineData(33)]
    public void A_response_of_the_wrong_length_fails(int length)
    {
        var exchange = new Exchange();
        exchange.Offer("7");
        var correct = Expected(7, exchange.Identifier, Initiator.Secret, exchange.Challenge);
        var resized = new byte[length];
        correct.AsSpan(0, Math.Min(length, correct.Length)).CopyTo(resized);
        Assert.Equal(ChapStep.Failed, exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", Hex(resized))), out _));
    }

    [Fact]
    public void A_base64_response_is_accepted()
    {
        var exchange = new Exchange();
        exchange.Offer("7");
        var correct = Expected(7, exchange.Identifier, Initiator.Secret, exchange.Challenge);
        Assert.Equal(ChapStep.Succeeded, exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", "0b" + Convert.ToBase64String(correct))), out _));
    }

    [Fact]
    public void An_uppercase_hex_response_is_accepted()
    {
        var exchange = new Exchange();
        exchange.Offer("5");
        var correct = Expected(5, exchange.Identifier, Initiator.Secret, exchange.Challenge);
        Assert.Equal(ChapStep.Succeeded, exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", "0X" + Convert.ToHexString(correct))), out _));
    }

    [Fact]
    public void An_odd_length_hex_response_fails()
    {
        var exchange = new Exchange();
        exchange.Offer("7");
        var odd = exchange.CorrectResponse[..^1];
        Assert.Equal(ChapStep.Failed, exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", odd)), out _));
    }

    [Theory]
    [InlineData("0x0102", new byte[] { 1, 2 })]
    [InlineData("0XaBcD", new byte[] { 0xAB, 0xCD })]
    [InlineData("0bAQID", new byte[] { 1, 2, 3 })]
    [InlineData("0BAQI=", new byte[] { 1, 2 })]
    public void Binary_values_decode_from_hex_and_base64(string text, byte[] expected)
    {
        Assert.True(ChapAuthenticator.TryDecodeBinary(text, out var bytes));
        Assert.Equal(expected, bytes);
    }

    [Theory]
    [InlineData("0x123")]      // odd number of hex digits
    [InlineData("0xzz")]
    [InlineData("0b!!!!")]
    [InlineData("0x")]
    [InlineData("1234")]       // no prefix: decimal is not a binary value
    [InlineData("")]
    public void Malformed_binary_values_are_refused(string text) =>
        Assert.False(ChapAuthenticator.TryDecodeBinary(text, out _));

    // ---------------------------------------------------------------- mutual CHAP

    [Fact]
    public void Mutual_chap_answers_the_initiators_challenge_with_the_target_secret()
    {
        var exchange = new Exchange(target: Target);
        exchange.Offer("7");
        var challenge = RandomNumberGenerator.GetBytes(32);
        var step = exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", exchange.CorrectResponse),
            ("CHAP_I", "77"), ("CHAP_C", Hex(challenge))), out var response);
        Assert.Equal(ChapStep.Succeeded, step);
        Assert.Equal(Target.UserName, response["CHAP_N"]);
        Assert.True(ChapAuthenticator.TryDecodeBinary(response["CHAP_R"]!, out var answer));
        Assert.Equal(Expected(7, 77, Target.Secret, challenge), answer);
    }

    [Fact]
    public void Mutual_chap_accepts_a_base64_challenge()
    {
        var exchange = new Exchange(target: Target);
        exchange.Offer("6");
        var challenge = RandomNumberGenerator.GetBytes(20);
        var step = exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", exchange.CorrectResponse),
            ("CHAP_I", "0"), ("CHAP_C", "0b" + Convert.ToBase64String(challenge))), out var response);
        Assert.Equal(ChapStep.Succeeded, step);
        Assert.True(ChapAuthenticator.TryDecodeBinary(response["CHAP_R"]!, out var answer));
        Assert.Equal(Expected(6, 0, Target.Secret, challenge), answer);
    }

    [Fact]
    public void A_reflected_challenge_is_refused()
    {
        var exchange = new Exchange(target: Target);
        exchange.Offer("7");
        var step = exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", exchange.CorrectResponse),
            ("CHAP_I", exchange.Identifier.ToString(CultureInfo.InvariantCulture)), ("CHAP_C", Hex(exchange.Challenge))), out var response);
        Assert.Equal(ChapStep.Failed, step);
        Assert.Null(response["CHAP_R"]);
        Assert.Contains("reflected", exchange.Authenticator.FailureReason);
    }

    [Theory]
    [InlineData(15, false)]
    [InlineData(16, true)]
    [InlineData(1024, true)]
    [InlineData(1025, false)]
    public void Initiator_challenges_must_be_16_to_1024_bytes(int length, bool accepted)
    {
        var exchange = new Exchange(target: Target);
        exchange.Offer("7");
        var step = exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", exchange.CorrectResponse),
            ("CHAP_I", "1"), ("CHAP_C", Hex(RandomNumberGenerator.GetBytes(length)))), out var response);
        Assert.Equal(accepted ? ChapStep.Succeeded : ChapStep.Failed, step);
        Assert.Equal(accepted, response["CHAP_R"] is not null);
    }

    [Fact]
    public void A_replayed_initiator_challenge_is_refused()
    {
        var cache = new ChallengeReplayCache();
        var challenge = RandomNumberGenerator.GetBytes(32);
        ChapStep Login()
        {
            var exchange = new Exchange(target: Target, cache: cache);
            exchange.Offer("7");
            return exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", exchange.CorrectResponse),
                ("CHAP_I", "9"), ("CHAP_C", Hex(challenge))), out _);
        }
        Assert.Equal(ChapStep.Succeeded, Login());
        Assert.Equal(ChapStep.Failed, Login());
    }

    [Fact]
    public void The_replay_cache_forgets_the_oldest_challenge_beyond_its_capacity()
    {
        var cache = new ChallengeReplayCache(capacity: 2);
        byte[] a = [1], b = [2], c = [3];
        Assert.True(cache.TryRecord(a));
        Assert.False(cache.TryRecord(a));
        Assert.True(cache.TryRecord(b));
        Assert.True(cache.TryRecord(c));   // evicts a
        Assert.False(cache.TryRecord(c));
        Assert.False(cache.TryRecord(b));
        Assert.True(cache.TryRecord(a));
    }

    [Fact]
    public void Mutual_chap_without_target_credentials_fails()
    {
        var exchange = new Exchange(target: null);
        exchange.Offer("7");
        Assert.Equal(ChapStep.Failed, exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", exchange.CorrectResponse),
            ("CHAP_I", "1"), ("CHAP_C", Hex(RandomNumberGenerator.GetBytes(16)))), out _));
    }

    [Fact]
    public void A_target_that_requires_mutual_chap_fails_a_one_way_login()
    {
        var exchange = new Exchange(target: Target);
        exchange.Offer("7");
        Assert.Equal(ChapStep.Failed, exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", exchange.CorrectResponse)), out _));
    }

    [Theory]
    [InlineData("256")]
    [InlineData("-1")]
    [InlineData("x")]
    public void A_mutual_identifier_outside_0_to_255_fails(string identifier)
    {
        var exchange = new Exchange(target: Target);
        exchange.Offer("7");
        Assert.Equal(ChapStep.Failed, exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", exchange.CorrectResponse),
            ("CHAP_I", identifier), ("CHAP_C", Hex(RandomNumberGenerator.GetBytes(16)))), out _));
    }

    [Fact]
    public void Mutual_chap_with_the_same_secret_both_ways_fails()
    {
        var exchange = new Exchange(target: new ChapCredentials("target-user", Initiator.Secret));
        exchange.Offer("7");
        Assert.Equal(ChapStep.Failed, exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", exchange.CorrectResponse),
            ("CHAP_I", "1"), ("CHAP_C", Hex(RandomNumberGenerator.GetBytes(16)))), out var response));
        Assert.Null(response["CHAP_R"]);
    }

    [Fact]
    public void Keys_after_completion_fail()
    {
        var exchange = new Exchange();
        exchange.Offer("7");
        Assert.Equal(ChapStep.Succeeded, exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", exchange.CorrectResponse)), out _));
        Assert.Equal(ChapStep.Failed, exchange.Respond(Keys(("CHAP_N", Initiator.UserName), ("CHAP_R", exchange.CorrectResponse)), out _));
    }
}
