using System.Collections.Immutable;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Protocol;

/// <summary>Login, negotiation and the data phases over a real loopback socket to an in-process portal.</summary>
public sealed class LoginAndDataTests
{
    [Theory]
    [InlineData("None", "None")]
    [InlineData("CRC32C", "None")]
    [InlineData("CRC32C", "CRC32C")]
    [InlineData("None", "CRC32C")]
    public async Task Writes_and_reads_round_trip_with_each_digest_combination(string headerDigest, string dataDigest)
    {
        await using var target = await InProcessTarget.StartAsync();
        await using var initiator = await target.LoginAsync(new LoginOptions
        {
            TargetName = InProcessTarget.TargetName, HeaderDigest = headerDigest, DataDigest = dataDigest,
        });
        Assert.Equal(headerDigest, initiator.NegotiatedKeys["HeaderDigest"]);
        Assert.Equal(dataDigest, initiator.NegotiatedKeys["DataDigest"]);

        var data = RandomBytes(300 * 512);   // beyond the first burst: immediate, unsolicited and solicited data
        Assert.True((await initiator.ExecuteAsync(Cdb.Write10(10, 300), dataOut: data)).Good);
        var read = await initiator.ExecuteAsync(Cdb.Read10(10, 300), expectedDataIn: data.Length);
        Assert.True(read.Good);
        Assert.Equal(data, read.DataIn);
    }

    [Theory]
    [InlineData(true, false)]    // InitialR2T=Yes, ImmediateData=No: everything solicited
    [InlineData(true, true)]     // immediate data, then R2T
    [InlineData(false, false)]   // unsolicited Data-Out, then R2T
    [InlineData(false, true)]
    public async Task Every_data_out_mode_writes_exactly_the_data(bool initialR2T, bool immediateData)
    {
        await using var target = await InProcessTarget.StartAsync();
        await using var initiator = await target.LoginAsync(new LoginOptions
        {
            TargetName = InProcessTarget.TargetName, InitialR2T = initialR2T, ImmediateData = immediateData,
            FirstBurstLength = 8192, MaxBurstLength = 65536, MaxRecvDataSegmentLength = 8192,
        });
        var data = RandomBytes(1 << 20);
        Assert.True((await initiator.ExecuteAsync(Cdb.Write16(2048, 2048), dataOut: data)).Good);
        var read = await initiator.ExecuteAsync(Cdb.Read16(2048, 2048), expectedDataIn: data.Length);
        Assert.Equal(data, read.DataIn);
    }

    [Fact]
    public async Task Many_commands_in_flight_complete()
    {
        await using var target = await InProcessTarget.StartAsync();
        await using var initiator = await target.LoginAsync();
        var writes = Enumerable.Range(0, 200).Select(i => initiator.ExecuteAsync(Cdb.Write10((uint)(i * 8), 8), dataOut: Pattern(i, 4096))).ToArray();
        Assert.All(await Task.WhenAll(writes), r => Assert.True(r.Good));
        var reads = Enumerable.Range(0, 200).Select(i => initiator.ExecuteAsync(Cdb.Read10((uint)(i * 8), 8), expectedDataIn: 4096)).ToArray();
        var results = await Task.WhenAll(reads);
        for (int i = 0; i < results.Length; i++) Assert.Equal(Pattern(i, 4096), results[i].DataIn);
    }

    [Fact]
    public async Task Target_declares_its_limits_and_tpgt_and_honours_the_negotiated_burst()
    {
        await using var target = await InProcessTarget.StartAsync(o => { o.MaxRecvDataSegmentLength = 16384; o.MaxBurstLength = 65536; o.FirstBurstLength = 65536; });
        await using var initiator = await target.LoginAsync(new LoginOptions
        {
            TargetName = InProcessTarget.TargetName, MaxBurstLength = 1 << 20, FirstBurstLength = 1 << 20,
        });
        Assert.Equal("16384", initiator.NegotiatedKeys["MaxRecvDataSegmentLength"]);
        Assert.Equal("65536", initiator.NegotiatedKeys["MaxBurstLength"]);
        Assert.Equal("65536", initiator.NegotiatedKeys["FirstBurstLength"]);   // never above MaxBurstLength
        Assert.Equal("1", initiator.NegotiatedKeys["TargetPortalGroupTag"]);
        var data = RandomBytes(256 * 1024);
        Assert.True((await initiator.ExecuteAsync(Cdb.Write10(0, 512), dataOut: data)).Good);
    }

    [Fact]
    public async Task Unknown_keys_are_not_understood_and_bad_values_rejected()
    {
        await using var target = await InProcessTarget.StartAsync();
        await using var initiator = await TestInitiator.ConnectAsync(target.EndPoint);
        var result = await initiator.LoginAsync(new LoginOptions
        {
            TargetName = InProcessTarget.TargetName,
            ExtraKeys = [("X-com.example.Feature", "Yes"), ("DefaultTime2Wait", "99999"), ("IFMarker", "No")],
        });
        Assert.True(result.Succeeded);
        Assert.Equal("NotUnderstood", result.Keys["X-com.example.Feature"]);
        Assert.Equal("Reject", result.Keys["DefaultTime2Wait"]);
        Assert.Equal("No", result.Keys["IFMarker"]);
    }

    [Theory]
    [InlineData("7,6,5", 7)]
    [InlineData("5,6,7,8", 8)]
    [InlineData("5", 5)]
    [InlineData("6", 6)]
    public async Task Chap_picks_the_strongest_offered_algorithm(string offered, int expected)
    {
        var access = new TargetAccess(ImmutableArray<string>.Empty, new ChapCredentials("user", "initiator-secret-1"), null);
        await using var target = await InProcessTarget.StartAsync(access: access);
        await using var initiator = await TestInitiator.ConnectAsync(target.EndPoint);
        var result = await initiator.LoginAsync(new LoginOptions
        {
            TargetName = InProcessTarget.TargetName, ChapUser = "user", ChapSecret = "initiator-secret-1", ChapAlgorithms = offered,
        });
        Assert.True(result.Succeeded, $"status {result.Status:x4}");
        Assert.Equal(expected.ToString(), result.Keys["CHAP_A"]);
        Assert.True((await initiator.ExecuteAsync(Cdb.TestUnitReady())).Status is 0 or 2);
    }

    [Fact]
    public async Task Wrong_chap_secret_and_missing_chap_are_refused()
    {
        var access = new TargetAccess(ImmutableArray<string>.Empty, new ChapCredentials("user", "initiator-secret-1"), null);
        await using var target = await InProcessTarget.StartAsync(access: access);
        await using (var wrong = await TestInitiator.ConnectAsync(target.EndPoint))
        {
            var result = await wrong.LoginAsync(new LoginOptions { TargetName = InProcessTarget.TargetName, ChapUser = "user", ChapSecret = "not-the-secret!" });
            Assert.Equal(0x0201, result.Status);
        }
        await using (var none = await TestInitiator.ConnectAsync(target.EndPoint))
        {
            var result = await none.LoginAsync(new LoginOptions { TargetName = InProcessTarget.TargetName });
            Assert.Equal(0x0201, result.Status);
        }
    }

    [Fact]
    public async Task Mutual_chap_proves_the_target()
    {
        var access = new TargetAccess(ImmutableArray<string>.Empty, new ChapCredentials("user", "initiator-secret-1"), new ChapCredentials("target", "target-secret-22"));
        await using var target = await InProcessTarget.StartAsync(access: access);
        await using var initiator = await TestInitiator.ConnectAsync(target.EndPoint);
        var result = await initiator.LoginAsync(new LoginOptions
        {
            TargetName = InProcessTarget.TargetName, ChapUser = "user", ChapSecret = "initiator-secret-1", ChapAlgorithms = "7,5",
            MutualChapUser = "target", MutualChapSecret = "target-secret-22",
        });
        Assert.True(result.Succeeded, $"status {result.Status:x4}");
    }

    [Fact]
    public async Task Acl_refuses_other_initiators()
    {
        var access = new TargetAccess(["iqn.2026-11.example:allowed"], null, null);
        await using var target = await InProcessTarget.StartAsync(access: access);
        await using var refused = await TestInitiator.ConnectAsync(target.EndPoint);
        Assert.Equal(0x0202, (await refused.LoginAsync(new LoginOptions { TargetName = InProcessTarget.TargetName, InitiatorName = "iqn.2026-11.example:other" })).Status);
        await using var allowed = await TestInitiator.ConnectAsync(target.EndPoint);
        Assert.True((await allowed.LoginAsync(new LoginOptions { TargetName = InProcessTarget.TargetName, InitiatorName = "iqn.2026-11.example:allowed" })).Succeeded);
    }

    [Fact]
    public async Task Unknown_target_is_not_found()
    {
        await using var target = await InProcessTarget.StartAsync();
        await using var initiator = await TestInitiator.ConnectAsync(target.EndPoint);
        Assert.Equal(0x0203, (await initiator.LoginAsync(new LoginOptions { TargetName = "iqn.2026-11.example:nothing" })).Status);
    }

    [Fact]
    public async Task Discovery_session_lists_targets()
    {
        await using var target = await InProcessTarget.StartAsync();
        await using var initiator = await TestInitiator.ConnectAsync(target.EndPoint);
        Assert.True((await initiator.LoginAsync(new LoginOptions { TargetName = null })).Succeeded);
        var keys = await initiator.TextAsync([("SendTargets", "All")]);
        Assert.Contains(keys, k => k.Key == "TargetName" && k.Value == InProcessTarget.TargetName);
        Assert.Contains(keys, k => k.Key == "TargetAddress" && k.Value == $"127.0.0.1:{target.EndPoint.Port},1");
        Assert.Equal(0, await initiator.LogoutAsync());
    }

    [Fact]
    public async Task Nop_out_is_echoed_and_logout_closes()
    {
        await using var target = await InProcessTarget.StartAsync();
        await using var initiator = await target.LoginAsync();
        var payload = RandomBytes(1000);
        Assert.Equal(payload, await initiator.PingAsync(payload));
        Assert.Equal(payload, await initiator.PingAsync(payload, immediate: false));
        Assert.Equal(0, await initiator.LogoutAsync());
    }

    [Fact]
    public async Task Idle_connection_is_pinged()
    {
        await using var target = await InProcessTarget.StartAsync(o => { o.NopInIntervalSeconds = 1; o.NopInTimeoutSeconds = 5; });
        await using var initiator = await target.LoginAsync();
        for (int i = 0; i < 50 && initiator.PingsReceived == 0; i++) await Task.Delay(100);
        Assert.True(initiator.PingsReceived > 0);
        Assert.True((await initiator.ExecuteAsync(Cdb.TestUnitReady())).Status is 0 or 2);   // still alive after answering
    }

    [Fact]
    public async Task Unanswered_pings_drop_the_connection()
    {
        await using var target = await InProcessTarget.StartAsync(o => { o.NopInIntervalSeconds = 1; o.NopInTimeoutSeconds = 1; });
        await using var initiator = await target.LoginAsync();
        initiator.AnswerPings = false;
        for (int i = 0; i < 60 && !initiator.Closed; i++) await Task.Delay(100);
        Assert.True(initiator.Closed);
    }

    internal static byte[] RandomBytes(int length)
    {
        var bytes = new byte[length];
        Random.Shared.NextBytes(bytes);
        return bytes;
    }

    internal static byte[] Pattern(int seed, int length)
    {
        var bytes = new byte[length];
        new Random(seed).NextBytes(bytes);
        return bytes;
    }
}
