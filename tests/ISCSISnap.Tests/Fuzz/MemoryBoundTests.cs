using System.Buffers.Binary;
using System.Diagnostics;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Fuzz;

/// <summary>
/// The target never waits for, nor buffers, more than the limits allow: oversized announcements are refused from
/// the header alone, connections that stall mid-PDU are dropped by the login timeout (before login) or the NOP-In
/// timeout (after), and a peer that does not read its answers is held back by TCP backpressure, not buffered.
/// </summary>
[Collection(ISCSISnap.Tests.Support.ProcessWideMeasurements.Name)]
public sealed class MemoryBoundTests
{
    private const int SixteenMiBMinusOne = (16 << 20) - 1;

    [Fact]
    public async Task Data_segment_of_16_MiB_is_refused_from_the_header_alone_after_login()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync();
        var header = victim.NewHeader(0x01, 0xA1, victim.NextItt());   // WRITE with 16 MiB of immediate data announced
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), SixteenMiBMinusOne);
        Cdb.Write10(0, 0x7FFF).CopyTo(header.AsSpan(32));
        FuzzPdu.SetDataSegmentLength(header, SixteenMiBMinusOne);
        var clock = Stopwatch.StartNew();
        await victim.SendRawAsync(header);   // the header only: a target that waited for the data would hang here
        await Expect.RejectAsync(victim, 0x04, header, TimeSpan.FromSeconds(2));
        await Expect.ClosedAsync(victim, TimeSpan.FromSeconds(2));
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(2), $"took {clock.Elapsed.TotalMilliseconds:F0} ms");
        await env.WaitForSessionCountAsync(1);
        await env.AssertFreshLoginWorksAsync();
        await env.AssertBystanderUndisturbedAsync();
    }

    [Theory]
    [InlineData(0x00)]   // NOP-Out
    [InlineData(0x04)]   // Text
    [InlineData(0x05)]   // Data-Out
    [InlineData(0x1C)]   // unknown
    public async Task Data_segment_of_16_MiB_is_refused_for_other_opcodes(byte opcode)
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync();
        var header = victim.NewHeader(opcode, 0x80, victim.NextItt(), immediate: opcode != 0x05);
        FuzzPdu.SetDataSegmentLength(header, SixteenMiBMinusOne);
        await victim.SendRawAsync(header);
        await Expect.RejectAsync(victim, 0x04, header, TimeSpan.FromSeconds(2));
        await Expect.ClosedAsync(victim, TimeSpan.FromSeconds(2));
        await env.WaitForSessionCountAsync(1);
        await env.AssertBystanderUndisturbedAsync();
    }

    [Fact]
    public async Task Data_segment_of_16_MiB_is_refused_from_the_header_alone_before_login()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var raw = await RawConnection.ConnectAsync(env.EndPoint);
        var header = FuzzPdu.LoginHeader(FuzzPdu.LoginFlags(true, 1, 3));
        FuzzPdu.SetDataSegmentLength(header, SixteenMiBMinusOne);
        var clock = Stopwatch.StartNew();
        await raw.SendAsync(header);
        Assert.Empty(await raw.WaitForCloseAsync(TimeSpan.FromSeconds(2)));
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(2));
        await env.AssertFreshLoginWorksAsync();
        await env.AssertBystanderUndisturbedAsync();
    }

    [Theory]
    [InlineData("nothing")]               // connects and never speaks
    [InlineData("partial-header")]        // 20 bytes of a header, then silence
    [InlineData("dribble")]               // one byte every 150 ms, never a whole header
    [InlineData("header-without-data")]   // announces 8 KiB of login text, sends 100 bytes
    [InlineData("unfinished-login")]      // a complete first login PDU that does not transit, then silence
    public async Task Slow_loris_before_login_is_dropped_by_the_login_timeout(string kind)
    {
        await using var env = await FuzzEnvironment.StartAsync(o => o.LoginTimeoutSeconds = 1);
        await using var raw = await RawConnection.ConnectAsync(env.EndPoint);
        var login = FuzzPdu.Frame(FuzzPdu.LoginHeader(FuzzPdu.LoginFlags(false, 1, 3)), FuzzPdu.Text(FuzzPdu.GoodLoginKeys));
        var clock = Stopwatch.StartNew();
        using var stop = new CancellationTokenSource();
        Task dribbling = Task.CompletedTask;
        switch (kind)
        {
            case "partial-header":
                await raw.SendAsync(login.AsMemory(0, 20));
                break;
            case "dribble":
                dribbling = Task.Run(async () =>
                {
                    for (int i = 0; i < 47 && !stop.IsCancellationRequested; i++)
                    {
                        if (!await raw.SendAsync(login.AsMemory(i, 1))) return;
                        await Task.Delay(150);
                    }
                });
                break;
            case "header-without-data":
            {
                var header = FuzzPdu.LoginHeader(FuzzPdu.LoginFlags(true, 1, 3));
                FuzzPdu.SetDataSegmentLength(header, 8192);
                await raw.SendAsync(header);
                await raw.SendAsync(new byte[100]);
                break;
            }
            case "unfinished-login":
                await raw.SendAsync(login);
                break;
        }
        var pdus = await raw.WaitForCloseAsync(TimeSpan.FromSeconds(6));
        stop.Cancel();
        await dribbling;
        Assert.True(clock.Elapsed >= TimeSpan.FromMilliseconds(800), $"closed after {clock.Elapsed.TotalMilliseconds:F0} ms, before the timeout");
        Assert.True(pdus.All(p => p.Opcode == 0x23 && (p.Header[1] & 0x80) == 0), "only non-final login responses may precede the timeout");
        Assert.Equal(kind == "unfinished-login" ? 1 : 0, pdus.Count);
        await env.AssertBystanderUndisturbedAsync();   // logged in long before: the login timeout is not for it
        await env.AssertFreshLoginWorksAsync();
    }

    [Fact]
    public async Task Many_stalled_connections_are_all_dropped_and_hold_no_memory()
    {
        await using var env = await FuzzEnvironment.StartAsync(o => o.LoginTimeoutSeconds = 1);
        long before = GC.GetTotalMemory(forceFullCollection: true);
        var connections = new List<RawConnection>();
        try
        {
            for (int i = 0; i < 64; i++)
            {
                var raw = await RawConnection.ConnectAsync(env.EndPoint);
                connections.Add(raw);
                var header = FuzzPdu.LoginHeader(FuzzPdu.LoginFlags(true, 1, 3), itt: (uint)i);
                FuzzPdu.SetDataSegmentLength(header, 8192);
                await raw.SendAsync(header);
                await raw.SendAsync(new byte[8000]);   // 192 bytes short, forever
            }
            foreach (var raw in connections) Assert.Empty(await raw.WaitForCloseAsync(TimeSpan.FromSeconds(8)));
        }
        finally
        {
            foreach (var raw in connections) await raw.DisposeAsync();
        }
        long after = GC.GetTotalMemory(forceFullCollection: true);
        Assert.True(after - before < 200L << 20, $"managed heap grew by {(after - before) >> 20} MiB");   // generous: other tests run alongside
        await env.AssertBystanderUndisturbedAsync();
        await env.AssertFreshLoginWorksAsync();
    }

    [Fact]
    public async Task Slow_loris_after_login_is_dropped_by_the_nop_in_timeout()
    {
        await using var env = await FuzzEnvironment.StartAsync(o => { o.NopInIntervalSeconds = 1; o.NopInTimeoutSeconds = 2; });
        await using var victim = await env.LoginAsync();
        victim.AnswerPings = false;   // a stalled peer answers nothing, but keeps dribbling a header
        var header = FuzzPdu.ScsiCommand(victim, victim.NextItt(), Cdb.TestUnitReady(), 0);
        var clock = Stopwatch.StartNew();
        for (int i = 0; i < 47 && !victim.Closed; i++)
        {
            try { await victim.SendRawAsync(header.AsMemory(i, 1)); } catch (IOException) { break; }
            await Task.Delay(150);
        }
        await Expect.UntilAsync(() => victim.Closed, TimeSpan.FromSeconds(10), "the stalled connection to be dropped");
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(8), $"dropped only after {clock.Elapsed.TotalSeconds:F1} s");
        await env.WaitForSessionCountAsync(1);
        Assert.False(env.Bystander.Closed);   // it answers its pings
        await env.AssertBystanderUndisturbedAsync();
    }

    private static byte[] NopOut(TestInitiator initiator, byte[] data)
    {
        var header = initiator.NewHeader(0x00, 0x80, initiator.NextItt(), immediate: true);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), 0xFFFFFFFF);
        return FuzzPdu.Frame(header, data);
    }

    [Fact]
    public async Task A_client_that_never_reads_its_answers_is_held_back_not_buffered()
    {
        // Each NOP-Out carries 256 KiB the target must echo. Unread echoes may fill the socket buffers and a few MiB
        // of queue; after that the target must stop reading (TCP backpressure) instead of queueing them all, and
        // the NOP-In timeout ends the connection, since its ping cannot get through either.
        await using var env = await FuzzEnvironment.StartAsync(o => { o.NopInIntervalSeconds = 1; o.NopInTimeoutSeconds = 2; });
        await using var client = await PausableInitiator.ConnectAsync(env.EndPoint);
        var victim = client.Initiator;
        Assert.True((await victim.LoginAsync(new LoginOptions { TargetName = InProcessTarget.TargetName })).Succeeded);
        Assert.Equal("262144", victim.NegotiatedKeys["MaxRecvDataSegmentLength"]);
        client.PauseReading();
        await Task.Delay(50);

        long heapBefore = GC.GetTotalMemory(forceFullCollection: true);
        var payload = new byte[262144];
        long accepted = 0;
        var clock = Stopwatch.StartNew();
        while (accepted < (512L << 20) && clock.Elapsed < TimeSpan.FromSeconds(20))
        {
            var send = victim.SendRawAsync(NopOut(victim, payload));
            try
            {
                if (await Task.WhenAny(send, Task.Delay(1000)) != send) break;   // held back: what we wanted
                await send;
            }
            catch (Exception e) when (e is IOException or InvalidOperationException or ObjectDisposedException or System.Net.Sockets.SocketException)
            {
                break;
            }
            accepted += payload.Length + 48;
        }
        long heapGrowth = GC.GetTotalMemory(forceFullCollection: false) - heapBefore;
        Assert.True(accepted < 64L << 20, $"the target took {accepted >> 20} MiB of requests whose answers were never read");
        Assert.True(heapGrowth < 200L << 20, $"the managed heap grew by {heapGrowth >> 20} MiB");   // generous: other tests run alongside

        await env.WaitForSessionCountAsync(1);   // dropped by the NOP-In timeout
        await env.AssertBystanderUndisturbedAsync();
        await env.AssertFreshLoginWorksAsync();
    }

    [Fact]
    public async Task A_slow_reader_gets_every_answer_once_it_reads_again()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var client = await PausableInitiator.ConnectAsync(env.EndPoint);
        var victim = client.Initiator;
        Assert.True((await victim.LoginAsync(new LoginOptions { TargetName = InProcessTarget.TargetName })).Succeeded);
        client.PauseReading();
        var payloads = Enumerable.Range(0, 48).Select(i => FuzzPdu.Pattern(i, 262144)).ToArray();   // 12 MiB of echoes
        var pings = payloads.Select(p => victim.PingAsync(p)).ToArray();
        await Task.Delay(500);
        client.ResumeReading();
        var echoes = await Task.WhenAll(pings).WaitAsync(FuzzEnvironment.Patience);
        for (int i = 0; i < payloads.Length; i++) Assert.Equal(payloads[i], echoes[i]);
        Assert.True((await victim.ExecuteAsync(Cdb.TestUnitReady()).WaitAsync(FuzzEnvironment.Patience)).Status is 0 or 2);
        await env.AssertBystanderUndisturbedAsync();
    }
}
