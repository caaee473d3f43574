using System.Text;
using ISCSISnap.Target.Iscsi.Text;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary><see cref="TextParameters"/>: RFC 7143 §6.1 key=value text, UTF-8, each pair NUL-terminated.</summary>
public sealed class TextParametersTests
{
    private static bool Parse(string text, out TextParameters parameters, out string? fault) =>
        TextParameters.TryParse(Encoding.UTF8.GetBytes(text), out parameters, out fault);

    [Fact]
    public void Pairs_are_parsed_in_order()
    {
        Assert.True(Parse("InitiatorName=iqn.1991-05.com.example:host\0SessionType=Normal\0HeaderDigest=CRC32C,None\0", out var p, out var fault));
        Assert.Null(fault);
        Assert.Equal(3, p.Count);
        Assert.Equal(["InitiatorName", "SessionType", "HeaderDigest"], p.Pairs.Select(x => x.Key));
        Assert.Equal("CRC32C,None", p["HeaderDigest"]);
        Assert.Equal("iqn.1991-05.com.example:host", p["InitiatorName"]);
        Assert.Null(p["DataDigest"]);
    }

    [Fact]
    public void Encode_writes_nul_terminated_utf8_pairs_and_round_trips()
    {
        var p = new TextParameters();
        p.Add("TargetAlias", "Bücher-Platte");
        p.Add("MaxRecvDataSegmentLength", "262144");
        p.Add("X-com.example.Empty", "");
        var bytes = p.Encode();
        Assert.Equal(Encoding.UTF8.GetBytes("TargetAlias=Bücher-Platte\0MaxRecvDataSegmentLength=262144\0X-com.example.Empty=\0"), bytes);

        Assert.True(TextParameters.TryParse(bytes, out var back, out _));
        Assert.Equal(p.Pairs, back.Pairs);
        Assert.Equal(bytes, back.Encode());
    }

    [Fact]
    public void Repeated_keys_are_kept_so_the_negotiator_can_see_them()
    {
        Assert.True(Parse("MaxBurstLength=512\0MaxBurstLength=1024\0", out var p, out _));
        Assert.Equal(2, p.Count);
        Assert.Equal("512", p["MaxBurstLength"]);   // the indexer returns the first
    }

    [Fact]
    public void Values_may_contain_equals_signs()
    {
        // Base64 CHAP values end in '=' padding.
        Assert.True(Parse("CHAP_C=0bAAECAw==\0", out var p, out _));
        Assert.Equal("0bAAECAw==", p["CHAP_C"]);
    }

    [Fact]
    public void Trailing_nul_padding_is_ignored()
    {
        Assert.True(TextParameters.TryParse("A=1\0\0\0\0"u8, out var p, out var fault));
        Assert.Null(fault);
        Assert.Single(p.Pairs);
        Assert.Equal("1", p["A"]);
    }

    [Fact]
    public void An_unterminated_last_pair_is_tolerated()
    {
        Assert.True(TextParameters.TryParse("A=1\0B=2"u8, out var p, out _));
        Assert.Equal("2", p["B"]);
    }

    [Fact]
    public void Empty_text_has_no_pairs()
    {
        Assert.True(TextParameters.TryParse(ReadOnlySpan<byte>.Empty, out var p, out _));
        Assert.Equal(0, p.Count);
        Assert.Empty(p.Encode());
    }

    [Theory]
    [InlineData("HeaderDigest\0")]            // no '='
    [InlineData("A=1\0NoEquals\0")]
    [InlineData("=value\0")]                  // empty key
    public void Malformed_pairs_are_refused(string text)
    {
        Assert.False(Parse(text, out _, out var fault));
        Assert.Contains("malformed", fault);
    }

    [Theory]
    [InlineData("Bad Key=1\0")]
    [InlineData("Key!=1\0")]
    [InlineData("Key:x=1\0")]
    [InlineData("Ключ=1\0")]
    public void Keys_with_characters_outside_the_rfc_set_are_refused(string text)
    {
        Assert.False(Parse(text, out _, out var fault));
        Assert.Contains("invalid character", fault);
    }

    [Fact]
    public void Keys_may_use_every_allowed_character()
    {
        Assert.True(Parse("Az09.-+@_=1\0", out var p, out _));
        Assert.Equal("1", p["Az09.-+@_"]);
    }

    [Fact]
    public void A_key_of_64_bytes_is_refused_and_63_accepted()
    {
        Assert.True(Parse(new string('K', 63) + "=1\0", out _, out _));
        Assert.False(Parse(new string('K', 64) + "=1\0", out _, out var fault));
        Assert.Contains("63", fault);
    }

    [Fact]
    public void An_over_long_value_is_refused_and_the_maximum_accepted()
    {
        Assert.True(Parse("CHAP_R=" + new string('a', TextParameters.MaxValueLength) + "\0", out var p, out _));
        Assert.Equal(TextParameters.MaxValueLength, p["CHAP_R"]!.Length);
        Assert.False(Parse("CHAP_R=" + new string('a', TextParameters.MaxValueLength + 1) + "\0", out _, out var fault));
        Assert.Contains("CHAP_R", fault);
    }

    [Fact]
    public void Invalid_utf8_in_a_value_is_refused()
    {
        byte[] text = [.. "TargetAlias="u8, 0xC3, 0x28, 0];   // 0xC3 must be followed by a continuation byte
        Assert.False(TextParameters.TryParse(text, out _, out var fault));
        Assert.Contains("UTF-8", fault);
    }

    [Fact]
    public void An_overlong_utf8_encoding_is_refused()
    {
        byte[] text = [.. "TargetAlias="u8, 0xC0, 0xAF, 0];   // '/' encoded in two bytes
        Assert.False(TextParameters.TryParse(text, out _, out _));
    }
}
