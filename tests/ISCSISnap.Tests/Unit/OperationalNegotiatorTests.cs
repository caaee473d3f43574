using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Iscsi.Login;
using ISCSISnap.Target.Iscsi.Sessions;
using ISCSISnap.Target.Iscsi.Text;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary><see cref="OperationalNegotiator"/> against the result functions of RFC 7143 §13.</summary>
public sealed class OperationalNegotiatorTests
{
    private sealed class Negotiation
    {
        public Negotiation(Action<IscsiPortalOptions>? configure = null, bool discovery = false, bool fullFeaturePhase = false)
        {
            configure?.Invoke(Options);
            Negotiator = new OperationalNegotiator(Options, Parameters, fullFeaturePhase) { Discovery = discovery };
        }

        public IscsiPortalOptions Options { get; } = new();
        public NegotiatedParameters Parameters { get; } = new();
        public OperationalNegotiator Negotiator { get; }

        public TextParameters Send(params (string Key, string Value)[] pairs)
        {
            var request = new TextParameters();
            foreach (var (key, value) in pairs) request.Add(key, value);
            var response = new TextParameters();
            Negotiator.Negotiate(request, response);
            return response;
        }

        public string? Answer(string key, string value) => Send((key, value))[key];
    }

    // ---------------------------------------------------------------- list keys: digests

    [Theory]
    [InlineData("CRC32C,None", "CRC32C", true)]
    [InlineData("None,CRC32C", "None", false)]
    [InlineData("CRC32C", "CRC32C", true)]
    [InlineData("None", "None", false)]
    [InlineData("X-Fancy,CRC32C", "CRC32C", true)]    // unknown values are skipped, not fatal
    public void Digest_is_the_first_value_of_the_initiators_list_the_target_supports(string offered, string expected, bool crc)
    {
        var header = new Negotiation();
        Assert.Equal(expected, header.Answer("HeaderDigest", offered));
        Assert.Equal(crc, header.Parameters.HeaderDigest);

        var data = new Negotiation();
        Assert.Equal(expected, data.Answer("DataDigest", offered));
        Assert.Equal(crc, data.Parameters.DataDigest);
    }

    [Fact]
    public void Digest_falls_to_the_next_supported_value_when_the_first_is_disabled()
    {
        var n = new Negotiation(o => { o.HeaderDigests = ["None"]; o.DataDigests = ["CRC32C"]; });
        Assert.Equal("None", n.Answer("HeaderDigest", "CRC32C,None"));
        Assert.False(n.Parameters.HeaderDigest);
        Assert.Equal("CRC32C", n.Answer("DataDigest", "None,CRC32C"));
        Assert.True(n.Parameters.DataDigest);
    }

    [Fact]
    public void Digest_with_no_value_in_common_is_rejected()
    {
        var n = new Negotiation(o => o.HeaderDigests = ["CRC32C"]);
        Assert.Equal("Reject", n.Answer("HeaderDigest", "None"));
        Assert.False(n.Parameters.HeaderDigest);
    }

    // ---------------------------------------------------------------- numeric keys

    [Theory]
    [InlineData("MaxBurstLength", 1048576, "262144", "262144")]
    [InlineData("MaxBurstLength", 65536, "16777215", "65536")]
    [InlineData("MaxBurstLength", 65536, "0x20000", "65536")]     // hex numbers are numbers too
    [InlineData("MaxBurstLength", 1048576, "0x8000", "32768")]
    [InlineData("MaxConnections", 1, "4", "1")]
    [InlineData("MaxOutstandingR2T", 4, "16", "4")]
    [InlineData("MaxOutstandingR2T", 4, "2", "2")]
    [InlineData("DefaultTime2Retain", 0, "20", "0")]
    [InlineData("DefaultTime2Retain", 30, "20", "20")]
    public void Minimum_keys_take_the_smaller_value(string key, int ours, string theirs, string expected)
    {
        var n = new Negotiation(o =>
        {
            switch (key)
            {
                case "MaxBurstLength": o.MaxBurstLength = ours; o.FirstBurstLength = Math.Min(o.FirstBurstLength, ours); break;
                case "MaxConnections": o.MaxConnections = ours; break;
                case "MaxOutstandingR2T": o.MaxOutstandingR2T = ours; break;
                case "DefaultTime2Retain": o.DefaultTime2Retain = ours; break;
            }
        });
        Assert.Equal(expected, n.Answer(key, theirs));
        int result = int.Parse(expected);
        Assert.Equal(result, key switch
        {
            "MaxBurstLength" => n.Parameters.MaxBurstLength,
            "MaxConnections" => n.Parameters.MaxConnections,
            "MaxOutstandingR2T" => n.Parameters.MaxOutstandingR2T,
            _ => n.Parameters.DefaultTime2Retain,
        });
    }

    [Theory]
    [InlineData("2")]
    [InlineData("1")]
    [InlineData("0")]
    public void ErrorRecoveryLevel_is_the_minimum_with_the_targets_zero(string theirs)
    {
        var n = new Negotiation();
        Assert.Equal("0", n.Answer("ErrorRecoveryLevel", theirs));
        Assert.Equal(0, n.Parameters.ErrorRecoveryLevel);
    }

    [Theory]
    [InlineData(2, "0", "2")]
    [InlineData(2, "10", "10")]
    [InlineData(5, "3", "5")]
    public void DefaultTime2Wait_takes_the_larger_value(int ours, string theirs, string expected)
    {
        var n = new Negotiation(o => o.DefaultTime2Wait = ours);
        Assert.Equal(expected, n.Answer("DefaultTime2Wait", theirs));
        Assert.Equal(int.Parse(expected), n.Parameters.DefaultTime2Wait);
    }

    [Theory]
    [InlineData("MaxBurstLength", "511")]           // below the RFC range 512..2^24-1
    [InlineData("MaxBurstLength", "16777216")]      // above it
    [InlineData("MaxBurstLength", "-1")]
    [InlineData("MaxBurstLength", "+4096")]
    [InlineData("MaxBurstLength", "1e6")]
    [InlineData("MaxBurstLength", "")]
    [InlineData("MaxBurstLength", "0x")]
    [InlineData("MaxBurstLength", "99999999999999999999")]
    [InlineData("FirstBurstLength", "100")]
    [InlineData("MaxConnections", "0")]
    [InlineData("MaxConnections", "65536")]
    [InlineData("MaxOutstandingR2T", "0")]
    [InlineData("DefaultTime2Wait", "3601")]
    [InlineData("DefaultTime2Retain", "3601")]
    [InlineData("ErrorRecoveryLevel", "3")]
    [InlineData("MaxRecvDataSegmentLength", "511")]
    [InlineData("MaxRecvDataSegmentLength", "lots")]
    [InlineData("InitialR2T", "yes")]               // booleans are case-sensitive "Yes"/"No"
    [InlineData("ImmediateData", "true")]
    [InlineData("DataPDUInOrder", "1")]
    [InlineData("DataSequenceInOrder", "Maybe")]
    public void Out_of_range_or_garbage_values_are_rejected(string key, string value)
    {
        var n = new Negotiation();
        var before = n.Parameters.CloneSessionScope();
        Assert.Equal("Reject", n.Answer(key, value));
        Assert.Null(n.Negotiator.ProtocolFault);
        Assert.Equal(before.MaxBurstLength, n.Parameters.MaxBurstLength);
        Assert.Equal(before.FirstBurstLength, n.Parameters.FirstBurstLength);
        Assert.Equal(before.MaxConnections, n.Parameters.MaxConnections);
        Assert.Equal(before.InitiatorMaxRecvDataSegmentLength, n.Parameters.InitiatorMaxRecvDataSegmentLength);
        Assert.Equal(before.InitialR2T, n.Parameters.InitialR2T);
    }

    [Fact]
    public void MaxRecvDataSegmentLength_is_declarative_and_gets_no_answer()
    {
        var n = new Negotiation();
        var response = n.Send(("MaxRecvDataSegmentLength", "65536"));
        Assert.Null(response["MaxRecvDataSegmentLength"]);
        Assert.Equal(65536, n.Parameters.InitiatorMaxRecvDataSegmentLength);
    }

    // ---------------------------------------------------------------- boolean keys

    [Theory]
    [InlineData(false, "No", "No")]
    [InlineData(false, "Yes", "Yes")]
    [InlineData(true, "No", "Yes")]
    [InlineData(true, "Yes", "Yes")]
    public void InitialR2T_is_the_or_of_both_sides(bool ours, string theirs, string expected)
    {
        var n = new Negotiation(o => o.InitialR2T = ours);
        Assert.Equal(expected, n.Answer("InitialR2T", theirs));
        Assert.Equal(expected == "Yes", n.Parameters.InitialR2T);
    }

    [Theory]
    [InlineData(true, "Yes", "Yes")]
    [InlineData(true, "No", "No")]
    [InlineData(false, "Yes", "No")]
    [InlineData(false, "No", "No")]
    public void ImmediateData_is_the_and_of_both_sides(bool ours, string theirs, string expected)
    {
        var n = new Negotiation(o => o.ImmediateData = ours);
        Assert.Equal(expected, n.Answer("ImmediateData", theirs));
        Assert.Equal(expected == "Yes", n.Parameters.ImmediateData);
    }

    [Theory]
    [InlineData("DataPDUInOrder")]
    [InlineData("DataSequenceInOrder")]
    public void In_order_keys_are_or_with_the_targets_yes(string key)
    {
        var n = new Negotiation();
        Assert.Equal("Yes", n.Answer(key, "No"));
        Assert.Equal("Yes", new Negotiation().Answer(key, "Yes"));
        Assert.True(key == "DataPDUInOrder" ? n.Parameters.DataPduInOrder : n.Parameters.DataSequenceInOrder);
    }

    // ---------------------------------------------------------------- FirstBurstLength

    [Fact]
    public void FirstBurstLength_never_exceeds_the_negotiated_MaxBurstLength_whatever_the_key_order()
    {
        foreach (var order in new[] { true, false })
        {
            var n = new Negotiation(o => { o.MaxBurstLength = 1 << 20; o.FirstBurstLength = 256 * 1024; });
            (string, string) mbl = ("MaxBurstLength", "65536"), fbl = ("FirstBurstLength", "262144");
            var response = order ? n.Send(mbl, fbl) : n.Send(fbl, mbl);
            Assert.Equal("65536", response["MaxBurstLength"]);
            Assert.Equal("65536", response["FirstBurstLength"]);
            Assert.Equal(65536, n.Parameters.FirstBurstLength);
            Assert.True(n.Parameters.FirstBurstLength <= n.Parameters.MaxBurstLength);
        }
    }

    [Fact]
    public void FirstBurstLength_is_the_minimum_of_both_offers()
    {
        var n = new Negotiation(o => { o.MaxBurstLength = 1 << 20; o.FirstBurstLength = 256 * 1024; });
        var response = n.Send(("MaxBurstLength", "1048576"), ("FirstBurstLength", "8192"));
        Assert.Equal("8192", response["FirstBurstLength"]);
        Assert.Equal(8192, n.Parameters.FirstBurstLength);
    }

    [Fact]
    public void FirstBurstLength_is_irrelevant_with_InitialR2T_yes_and_ImmediateData_no_in_any_order()
    {
        var n = new Negotiation(o => { o.InitialR2T = false; o.ImmediateData = true; });
        var response = n.Send(("FirstBurstLength", "8192"), ("InitialR2T", "Yes"), ("ImmediateData", "No"));
        Assert.Equal("Yes", response["InitialR2T"]);
        Assert.Equal("No", response["ImmediateData"]);
        Assert.Equal("Irrelevant", response["FirstBurstLength"]);
        Assert.Equal(65536, n.Parameters.FirstBurstLength);   // untouched default
    }

    [Fact]
    public void FirstBurstLength_matters_when_only_one_of_the_two_conditions_holds()
    {
        var n = new Negotiation(o => { o.InitialR2T = false; o.ImmediateData = true; });
        var response = n.Send(("InitialR2T", "Yes"), ("ImmediateData", "Yes"), ("FirstBurstLength", "8192"));
        Assert.Equal("8192", response["FirstBurstLength"]);
    }

    // ---------------------------------------------------------------- discovery, unknown, repeated

    [Theory]
    [InlineData("MaxConnections", "1")]
    [InlineData("InitialR2T", "Yes")]
    [InlineData("ImmediateData", "Yes")]
    [InlineData("MaxBurstLength", "65536")]
    [InlineData("FirstBurstLength", "8192")]
    [InlineData("MaxOutstandingR2T", "1")]
    [InlineData("DataPDUInOrder", "Yes")]
    [InlineData("DataSequenceInOrder", "Yes")]
    public void Discovery_sessions_answer_session_keys_irrelevant(string key, string value)
    {
        var n = new Negotiation(discovery: true);
        Assert.Equal("Irrelevant", n.Answer(key, value));
    }

    [Fact]
    public void Discovery_sessions_still_negotiate_connection_and_timing_keys()
    {
        var n = new Negotiation(discovery: true);
        var response = n.Send(("HeaderDigest", "CRC32C,None"), ("DefaultTime2Wait", "0"), ("ErrorRecoveryLevel", "0"));
        Assert.Equal("CRC32C", response["HeaderDigest"]);
        Assert.Equal("2", response["DefaultTime2Wait"]);
        Assert.Equal("0", response["ErrorRecoveryLevel"]);
        var offers = new TextParameters();
        Assert.False(n.Negotiator.OfferStricterDefaults(offers));
        Assert.Equal(0, offers.Count);
    }

    [Theory]
    [InlineData("X-com.example.Feature")]
    [InlineData("X#vendor.thing")]
    [InlineData("FancyNewKey")]
    public void Unknown_keys_are_not_understood(string key)
    {
        var n = new Negotiation();
        Assert.Equal("NotUnderstood", n.Answer(key, "whatever"));
        Assert.Null(n.Negotiator.ProtocolFault);
    }

    [Fact]
    public void Login_identity_keys_are_left_to_the_login_and_get_no_answer()
    {
        var n = new Negotiation();
        var response = n.Send(("InitiatorName", "iqn.1991-05.com.example:h"), ("SessionType", "Normal"), ("AuthMethod", "None"), ("CHAP_A", "5"));
        Assert.Equal(0, response.Count);
    }

    [Theory]
    [InlineData("TargetAlias")]
    [InlineData("TargetAddress")]
    [InlineData("TargetPortalGroupTag")]
    public void Target_declared_keys_from_an_initiator_are_rejected(string key)
    {
        Assert.Equal("Reject", new Negotiation().Answer(key, "1"));
    }

    [Fact]
    public void A_key_repeated_in_one_request_is_a_protocol_fault()
    {
        var n = new Negotiation();
        n.Send(("MaxBurstLength", "65536"), ("MaxBurstLength", "65536"));
        Assert.NotNull(n.Negotiator.ProtocolFault);
        Assert.Contains("MaxBurstLength", n.Negotiator.ProtocolFault);
    }

    [Fact]
    public void A_key_repeated_in_a_later_login_pdu_is_a_protocol_fault()
    {
        var n = new Negotiation();
        n.Send(("HeaderDigest", "None"));
        Assert.Null(n.Negotiator.ProtocolFault);
        n.Send(("HeaderDigest", "CRC32C"));
        Assert.NotNull(n.Negotiator.ProtocolFault);
        Assert.False(n.Parameters.HeaderDigest);   // the repeat did not renegotiate
    }

    // ---------------------------------------------------------------- the target's own offers

    [Fact]
    public void Stricter_target_settings_are_offered_for_keys_the_initiator_did_not_send()
    {
        var n = new Negotiation(o =>
        {
            o.MaxBurstLength = 65536; o.FirstBurstLength = 8192; o.ImmediateData = false;
            o.DefaultTime2Retain = 0; o.DefaultTime2Wait = 5; o.MaxOutstandingR2T = 4;
        });
        // InitialR2T=No keeps FirstBurstLength relevant once ImmediateData=No is offered.
        n.Send(("HeaderDigest", "None"), ("InitialR2T", "No"));
        var offers = new TextParameters();
        Assert.True(n.Negotiator.OfferStricterDefaults(offers));
        Assert.True(n.Negotiator.HasPendingOffers);
        Assert.Equal("No", offers["ImmediateData"]);
        Assert.Equal("65536", offers["MaxBurstLength"]);
        Assert.Equal("8192", offers["FirstBurstLength"]);
        Assert.Equal("0", offers["DefaultTime2Retain"]);
        Assert.Equal("5", offers["DefaultTime2Wait"]);
        Assert.Null(offers["MaxOutstandingR2T"]);   // 4 is looser than the RFC default 1: nothing to offer
        Assert.Null(offers["HeaderDigest"]);
        Assert.Equal(5, offers.Count);
        Assert.Equal(65536, n.Parameters.MaxBurstLength);
        Assert.False(n.Parameters.ImmediateData);
    }

    [Fact]
    public void Keys_the_initiator_sent_are_never_offered_again()
    {
        var n = new Negotiation(o => { o.MaxBurstLength = 65536; o.DefaultTime2Retain = 0; });
        n.Send(("MaxBurstLength", "262144"), ("DefaultTime2Retain", "20"));
        var offers = new TextParameters();
        bool offered = n.Negotiator.OfferStricterDefaults(offers);
        Assert.Null(offers["MaxBurstLength"]);
        Assert.Null(offers["DefaultTime2Retain"]);
        Assert.Equal(offered, offers.Count > 0);
        Assert.Equal(65536, n.Parameters.MaxBurstLength);
        Assert.Equal(0, n.Parameters.DefaultTime2Retain);
    }

    [Fact]
    public void Looser_target_settings_are_not_offered()
    {
        var n = new Negotiation(o =>
        {
            o.MaxBurstLength = 1 << 20; o.FirstBurstLength = 256 * 1024; o.ImmediateData = true;
            o.DefaultTime2Retain = 20; o.DefaultTime2Wait = 2; o.MaxOutstandingR2T = 4;
        });
        var offers = new TextParameters();
        Assert.False(n.Negotiator.OfferStricterDefaults(offers));
        Assert.Equal(0, offers.Count);
        Assert.False(n.Negotiator.HasPendingOffers);
    }

    [Fact]
    public void FirstBurstLength_is_not_offered_when_it_is_irrelevant()
    {
        var n = new Negotiation(o => { o.FirstBurstLength = 8192; o.MaxBurstLength = 65536; });
        n.Send(("InitialR2T", "Yes"), ("ImmediateData", "No"));
        var offers = new TextParameters();
        n.Negotiator.OfferStricterDefaults(offers);
        Assert.Null(offers["FirstBurstLength"]);
        Assert.Equal("65536", offers["MaxBurstLength"]);
    }

    [Fact]
    public void The_initiators_answer_to_an_offer_is_accepted_without_a_repeat_fault()
    {
        var n = new Negotiation(o => { o.MaxBurstLength = 65536; o.FirstBurstLength = 8192; });
        var offers = new TextParameters();
        Assert.True(n.Negotiator.OfferStricterDefaults(offers));
        Assert.Equal(["MaxBurstLength", "FirstBurstLength", "DefaultTime2Retain"], offers.Pairs.Select(p => p.Key));
        var response = n.Send(("MaxBurstLength", "32768"), ("FirstBurstLength", "8192"), ("DefaultTime2Retain", "0"));
        Assert.Null(n.Negotiator.ProtocolFault);
        Assert.Equal(0, response.Count);   // an answer is not answered again
        Assert.Equal(32768, n.Parameters.MaxBurstLength);
        Assert.False(n.Negotiator.HasPendingOffers);
    }

    [Fact]
    public void An_answer_looser_than_the_offer_is_ignored()
    {
        var n = new Negotiation(o => { o.MaxBurstLength = 65536; o.FirstBurstLength = 8192; });
        n.Negotiator.OfferStricterDefaults(new TextParameters());
        n.Send(("MaxBurstLength", "262144"));
        Assert.Equal(65536, n.Parameters.MaxBurstLength);
    }

    [Fact]
    public void A_rejected_offer_leaves_the_rfc_default()
    {
        var n = new Negotiation(o => { o.MaxBurstLength = 65536; o.FirstBurstLength = 8192; });
        n.Negotiator.OfferStricterDefaults(new TextParameters());
        n.Send(("MaxBurstLength", "Reject"));
        Assert.Equal(new NegotiatedParameters().MaxBurstLength, n.Parameters.MaxBurstLength);
    }

    // ---------------------------------------------------------------- full feature phase

    [Fact]
    public void Full_feature_phase_only_renegotiates_MaxRecvDataSegmentLength()
    {
        var n = new Negotiation(fullFeaturePhase: true);
        var response = n.Send(("MaxRecvDataSegmentLength", "131072"), ("MaxBurstLength", "4096"), ("HeaderDigest", "CRC32C"), ("X-com.example.Key", "1"));
        Assert.Equal(131072, n.Parameters.InitiatorMaxRecvDataSegmentLength);
        Assert.Null(response["MaxRecvDataSegmentLength"]);
        Assert.Equal("Reject", response["MaxBurstLength"]);
        Assert.Equal("Reject", response["HeaderDigest"]);
        Assert.Equal("NotUnderstood", response["X-com.example.Key"]);
        Assert.Equal(262144, n.Parameters.MaxBurstLength);
        Assert.False(n.Parameters.HeaderDigest);
    }

    [Fact]
    public void Full_feature_phase_rejects_an_out_of_range_MaxRecvDataSegmentLength()
    {
        var n = new Negotiation(fullFeaturePhase: true);
        Assert.Equal("Reject", n.Answer("MaxRecvDataSegmentLength", "16777216"));
        Assert.Equal(8192, n.Parameters.InitiatorMaxRecvDataSegmentLength);
    }

    // ---------------------------------------------------------------- legacy keys

    [Fact]
    public void Legacy_keys_get_rfc_7143_answers()
    {
        var n = new Negotiation();
        var response = n.Send(("IFMarker", "Yes"), ("OFMarker", "No"), ("OFMarkInt", "2048~8192"), ("TaskReporting", "RFC3720,ResponseFence"), ("iSCSIProtocolLevel", "2"));
        Assert.Equal("No", response["IFMarker"]);
        Assert.Equal("No", response["OFMarker"]);
        Assert.Equal("Irrelevant", response["OFMarkInt"]);
        Assert.Equal("RFC3720", response["TaskReporting"]);
        Assert.Equal("1", response["iSCSIProtocolLevel"]);
    }
}
