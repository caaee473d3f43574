using System.Buffers.Binary;
using System.Text;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Fuzz;

/// <summary>
/// Bad input before login completes: the target answers with a Login Response carrying the failure status and
/// closes, or (for what cannot be a login at all) just closes. A bystander session logged in beforehand must not
/// notice, and the portal must keep accepting logins.
/// </summary>
public sealed class LoginPhaseFuzzTests
{
    private static readonly TimeSpan Prompt = TimeSpan.FromSeconds(5);

    private static byte OperationalToFull => FuzzPdu.LoginFlags(transit: true, csg: 1, nsg: 3);

    /// <summary>Sends <paramref name="pdu"/> on a new connection; expects one Login Response with <paramref name="status"/>, then the close.</summary>
    private static async Task<ReceivedPdu> ExpectLoginFailureAsync(FuzzEnvironment env, byte[] pdu, ushort status)
    {
        await using var raw = await RawConnection.ConnectAsync(env.EndPoint);
        Assert.True(await raw.SendAsync(pdu));
        var pdus = await raw.WaitForCloseAsync(Prompt);
        Assert.True(pdus.Count == 1, $"expected exactly one Login Response before the close, got {pdus.Count}");
        var response = pdus[0];
        Assert.Equal(0x23, response.Opcode);
        ushort actual = BinaryPrimitives.ReadUInt16BigEndian(response.Header.AsSpan(36));
        Assert.True(actual == status, $"expected login status {status:x4}, got {actual:x4}");
        Assert.Equal(0, response.Header[1] & 0x80);   // no transit on a failure
        Assert.Equal(BinaryPrimitives.ReadUInt32BigEndian(pdu.AsSpan(16)), response.Itt);
        return response;
    }

    private static async Task AssertPortalHealthyAsync(FuzzEnvironment env)
    {
        await env.AssertFreshLoginWorksAsync();
        await env.AssertBystanderUndisturbedAsync();
        await env.WaitForSessionCountAsync(1);
    }

    [Theory]
    [InlineData(0x00)]   // NOP-Out
    [InlineData(0x01)]   // SCSI Command
    [InlineData(0x02)]   // Task Management
    [InlineData(0x04)]   // Text
    [InlineData(0x05)]   // Data-Out
    [InlineData(0x06)]   // Logout
    [InlineData(0x10)]   // SNACK
    [InlineData(0x1C)]   // vendor specific
    [InlineData(0x3F)]   // a target opcode (Reject)
    public async Task Non_login_opcode_before_login_closes_the_connection(byte opcode)
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var raw = await RawConnection.ConnectAsync(env.EndPoint);
        var header = FuzzPdu.LoginHeader(FuzzPdu.LoginFlags(true, 1, 3));
        header[0] = (byte)(0x40 | opcode);
        await raw.SendAsync(FuzzPdu.Frame(header, FuzzPdu.Text(FuzzPdu.GoodLoginKeys)));
        var pdus = await raw.WaitForCloseAsync(Prompt);
        Assert.Empty(pdus);
        await AssertPortalHealthyAsync(env);
    }

    public static TheoryData<string> MalformedLoginTexts => new()
    {
        "binary-junk", "pair-without-equals", "empty-key", "key-with-space", "key-of-64-bytes", "value-not-utf8",
        "initiator-name-of-300-bytes", "lone-equals",
    };

    private static byte[] MalformedText(string kind) => kind switch
    {
        "binary-junk" => [0x01, 0x02, 0xFF, 0xFE, 0x80, 0x7F, 0x00, 0x13, 0x37, 0x00],
        "pair-without-equals" => FuzzPdu.Text("InitiatorName=" + FuzzPdu.FuzzInitiator, "TargetName", "SessionType=Normal"),
        "empty-key" => FuzzPdu.Text("=" + FuzzPdu.FuzzInitiator, "TargetName=" + InProcessTarget.TargetName),
        "key-with-space" => FuzzPdu.Text("Initiator Name=" + FuzzPdu.FuzzInitiator, "TargetName=" + InProcessTarget.TargetName),
        "key-of-64-bytes" => FuzzPdu.Text([.. FuzzPdu.GoodLoginKeys, new string('K', 64) + "=1"]),
        "value-not-utf8" => [.. Encoding.ASCII.GetBytes("InitiatorName="), 0xC3, 0x28, 0xFF, 0x00, .. FuzzPdu.Text("TargetName=" + InProcessTarget.TargetName)],
        "initiator-name-of-300-bytes" => FuzzPdu.Text("InitiatorName=iqn.2026-11.x:" + new string('n', 300), "TargetName=" + InProcessTarget.TargetName),
        "lone-equals" => FuzzPdu.Text([.. FuzzPdu.GoodLoginKeys, "="]),
        _ => throw new ArgumentOutOfRangeException(nameof(kind)),
    };

    [Theory]
    [MemberData(nameof(MalformedLoginTexts))]
    public async Task Malformed_login_text_fails_with_initiator_error(string kind)
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await ExpectLoginFailureAsync(env, FuzzPdu.Frame(FuzzPdu.LoginHeader(OperationalToFull), MalformedText(kind)), 0x0200);
        await AssertPortalHealthyAsync(env);
    }

    [Fact]
    public async Task Login_text_without_nul_delimiters_fails()
    {
        // Without delimiters the keys run together into one pair: the target cannot see TargetName and refuses
        // the login with an initiator-class status, whichever detail it picks.
        await using var env = await FuzzEnvironment.StartAsync();
        var text = Encoding.ASCII.GetBytes(string.Join("", FuzzPdu.GoodLoginKeys));
        await using var raw = await RawConnection.ConnectAsync(env.EndPoint);
        await raw.SendAsync(FuzzPdu.Frame(FuzzPdu.LoginHeader(OperationalToFull), text));
        var pdus = await raw.WaitForCloseAsync(Prompt);
        Assert.Single(pdus);
        Assert.Equal(0x23, pdus[0].Opcode);
        Assert.Equal(0x02, pdus[0].Header[36]);   // status class 2: initiator error
        await AssertPortalHealthyAsync(env);
    }

    [Fact]
    public async Task Missing_initiator_name_fails_with_missing_parameter()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        var text = FuzzPdu.Text("SessionType=Normal", "TargetName=" + InProcessTarget.TargetName);
        await ExpectLoginFailureAsync(env, FuzzPdu.Frame(FuzzPdu.LoginHeader(OperationalToFull), text), 0x0207);
        await ExpectLoginFailureAsync(env, FuzzPdu.Frame(FuzzPdu.LoginHeader(OperationalToFull), []), 0x0207);
        await ExpectLoginFailureAsync(env, FuzzPdu.Frame(FuzzPdu.LoginHeader(OperationalToFull), FuzzPdu.Text("InitiatorName=" + FuzzPdu.FuzzInitiator)), 0x0207);
        await AssertPortalHealthyAsync(env);
    }

    [Theory]
    [InlineData(1, 1)]
    [InlineData(0xFF, 0x01)]
    [InlineData(0x00, 0x02)]   // max below min
    public async Task Unsupported_version_fails_with_0205(byte versionMax, byte versionMin)
    {
        await using var env = await FuzzEnvironment.StartAsync();
        var header = FuzzPdu.LoginHeader(OperationalToFull, versionMax: versionMax, versionMin: versionMin);
        await ExpectLoginFailureAsync(env, FuzzPdu.Frame(header, FuzzPdu.Text(FuzzPdu.GoodLoginKeys)), 0x0205);
        await AssertPortalHealthyAsync(env);
    }

    [Theory]
    [InlineData(true, 1, 1, false, true)]    // transit to the stage it is in
    [InlineData(true, 0, 0, false, true)]
    [InlineData(true, 1, 0, false, true)]    // backwards
    [InlineData(false, 2, 0, false, true)]   // reserved current stage
    [InlineData(true, 3, 3, false, true)]    // full feature as the current stage
    [InlineData(true, 0, 2, false, true)]    // reserved next stage
    [InlineData(true, 1, 2, false, true)]
    [InlineData(true, 0, 1, true, true)]     // T and C together
    [InlineData(true, 1, 3, false, false)]   // no immediate bit
    public async Task Invalid_stage_transitions_fail_with_initiator_error(bool transit, int csg, int nsg, bool @continue, bool immediate)
    {
        await using var env = await FuzzEnvironment.StartAsync();
        var header = FuzzPdu.LoginHeader(FuzzPdu.LoginFlags(transit, csg, nsg, @continue), immediate: immediate);
        await ExpectLoginFailureAsync(env, FuzzPdu.Frame(header, FuzzPdu.Text([.. FuzzPdu.GoodLoginKeys, "AuthMethod=None"])), 0x0200);
        await AssertPortalHealthyAsync(env);
    }

    [Fact]
    public async Task Going_back_to_the_security_stage_fails()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var raw = await RawConnection.ConnectAsync(env.EndPoint);
        await raw.SendAsync(FuzzPdu.Frame(FuzzPdu.LoginHeader(FuzzPdu.LoginFlags(true, 0, 1)), FuzzPdu.Text([.. FuzzPdu.GoodLoginKeys, "AuthMethod=None"])));
        var first = await raw.ReadAsync(Prompt);
        Assert.NotNull(first);
        Assert.Equal(0, BinaryPrimitives.ReadUInt16BigEndian(first.Header.AsSpan(36)));
        Assert.Equal(0x81, first.Header[1]);   // T=1, CSG=0, NSG=1

        await raw.SendAsync(FuzzPdu.Frame(FuzzPdu.LoginHeader(FuzzPdu.LoginFlags(true, 0, 1)), FuzzPdu.Text("AuthMethod=None")));
        var pdus = await raw.WaitForCloseAsync(Prompt);
        Assert.Single(pdus);
        Assert.Equal(0x0200, BinaryPrimitives.ReadUInt16BigEndian(pdus[0].Header.AsSpan(36)));
        await AssertPortalHealthyAsync(env);
    }

    [Fact]
    public async Task Repeated_identity_keys_fail()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var raw = await RawConnection.ConnectAsync(env.EndPoint);
        await raw.SendAsync(FuzzPdu.Frame(FuzzPdu.LoginHeader(FuzzPdu.LoginFlags(false, 0, 0)), FuzzPdu.Text([.. FuzzPdu.GoodLoginKeys, "AuthMethod=None"])));
        var first = await raw.ReadAsync(Prompt);
        Assert.NotNull(first);
        Assert.Equal(0, BinaryPrimitives.ReadUInt16BigEndian(first.Header.AsSpan(36)));
        await raw.SendAsync(FuzzPdu.Frame(FuzzPdu.LoginHeader(FuzzPdu.LoginFlags(true, 0, 1)), FuzzPdu.Text("InitiatorName=iqn.2026-11.x:someone-else")));
        var pdus = await raw.WaitForCloseAsync(Prompt);
        Assert.Single(pdus);
        Assert.Equal(0x0200, BinaryPrimitives.ReadUInt16BigEndian(pdus[0].Header.AsSpan(36)));
        await AssertPortalHealthyAsync(env);
    }

    [Fact]
    public async Task Unknown_tsih_and_session_type_are_refused()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        var existing = env.Target.Portal.GetSessions().Single().Tsih;
        // A TSIH that exists, but for another initiator: no session to join.
        await ExpectLoginFailureAsync(env, FuzzPdu.Frame(FuzzPdu.LoginHeader(OperationalToFull, tsih: existing), FuzzPdu.Text(FuzzPdu.GoodLoginKeys)), 0x020A);
        await ExpectLoginFailureAsync(env, FuzzPdu.Frame(FuzzPdu.LoginHeader(OperationalToFull, tsih: (ushort)(existing ^ 0x5555)), FuzzPdu.Text(FuzzPdu.GoodLoginKeys)), 0x020A);
        await ExpectLoginFailureAsync(env, FuzzPdu.Frame(FuzzPdu.LoginHeader(OperationalToFull),
            FuzzPdu.Text("InitiatorName=" + FuzzPdu.FuzzInitiator, "SessionType=Bogus")), 0x0209);
        await AssertPortalHealthyAsync(env);
    }

    [Fact]
    public async Task Login_data_segment_over_8192_bytes_closes_before_the_data_arrives()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var raw = await RawConnection.ConnectAsync(env.EndPoint);
        var header = FuzzPdu.LoginHeader(OperationalToFull);
        FuzzPdu.SetDataSegmentLength(header, 8193);
        await raw.SendAsync(header);   // only the header: the length alone must be enough to refuse
        Assert.Empty(await raw.WaitForCloseAsync(Prompt));
        await AssertPortalHealthyAsync(env);
    }

    [Fact]
    public async Task Login_data_segment_of_exactly_8192_bytes_is_accepted()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var raw = await RawConnection.ConnectAsync(env.EndPoint);
        var text = new byte[8192];
        FuzzPdu.Text(FuzzPdu.GoodLoginKeys).CopyTo(text, 0);   // the rest is NUL padding
        await raw.SendAsync(FuzzPdu.Frame(FuzzPdu.LoginHeader(OperationalToFull), text));
        var response = await raw.ReadAsync(Prompt);
        Assert.NotNull(response);
        Assert.Equal(0x23, response.Opcode);
        Assert.Equal(0, BinaryPrimitives.ReadUInt16BigEndian(response.Header.AsSpan(36)));
        await raw.DisposeAsync();   // the login may have completed: end its session before counting
        await AssertPortalHealthyAsync(env);
    }

    [Fact]
    public async Task Login_text_continued_past_64_KiB_fails()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var raw = await RawConnection.ConnectAsync(env.EndPoint);
        var chunk = Encoding.ASCII.GetBytes(new string('a', 8192));
        int answered = 0;
        for (int i = 0; i < 9; i++)
        {
            if (!await raw.SendAsync(FuzzPdu.Frame(FuzzPdu.LoginHeader(FuzzPdu.LoginFlags(false, 1, 0, @continue: true), itt: 0x77), chunk))) break;
            if (i < 8)
            {
                var partial = await raw.ReadAsync(Prompt);
                Assert.NotNull(partial);
                Assert.Equal(0, BinaryPrimitives.ReadUInt16BigEndian(partial.Header.AsSpan(36)));
                answered++;
            }
        }
        Assert.Equal(8, answered);   // 64 KiB buffered, and not a byte more
        var pdus = await raw.WaitForCloseAsync(Prompt);
        Assert.Single(pdus);
        Assert.Equal(0x0200, BinaryPrimitives.ReadUInt16BigEndian(pdus[0].Header.AsSpan(36)));
        await AssertPortalHealthyAsync(env);
    }

    [Fact]
    public async Task Continued_login_text_with_a_value_over_the_limit_fails()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var raw = await RawConnection.ConnectAsync(env.EndPoint);
        var text = Encoding.ASCII.GetBytes("InitiatorName=" + new string('v', 20000) + "\0");
        for (int offset = 0; offset < text.Length; offset += 8192)
        {
            int n = Math.Min(8192, text.Length - offset);
            bool last = offset + n == text.Length;
            await raw.SendAsync(FuzzPdu.Frame(FuzzPdu.LoginHeader(FuzzPdu.LoginFlags(false, 1, 0, @continue: !last), itt: 0x78), text.AsSpan(offset, n)));
            if (!last) Assert.NotNull(await raw.ReadAsync(Prompt));
        }
        var pdus = await raw.WaitForCloseAsync(Prompt);
        Assert.Single(pdus);
        Assert.Equal(0x0200, BinaryPrimitives.ReadUInt16BigEndian(pdus[0].Header.AsSpan(36)));
        await AssertPortalHealthyAsync(env);
    }

    [Theory]
    [InlineData(20)]    // part of a header
    [InlineData(48)]    // a header whose data never comes
    [InlineData(60)]    // part of the data
    public async Task Truncated_pdu_then_close_leaves_the_portal_working(int bytes)
    {
        await using var env = await FuzzEnvironment.StartAsync();
        var pdu = FuzzPdu.Frame(FuzzPdu.LoginHeader(OperationalToFull), FuzzPdu.Text(FuzzPdu.GoodLoginKeys));
        for (int round = 0; round < 3; round++)
        {
            await using var raw = await RawConnection.ConnectAsync(env.EndPoint);
            await raw.SendAsync(pdu.AsMemory(0, bytes));
            raw.ShutdownSend();
            Assert.Empty(await raw.WaitForCloseAsync(Prompt));
        }
        await AssertPortalHealthyAsync(env);
    }
}
