using System.Collections.Concurrent;
using System.IO.Pipelines;
using System.Net;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Iscsi.Connections;
using ISCSISnap.Tests.Fuzz;
using ISCSISnap.Tests.Support;
using ISCSISnap.Tests.Web;
using Xunit;

namespace ISCSISnap.Tests.Protocol;

/// <summary>How connections end: a final PDU always reaches the initiator before the target closes.</summary>
public sealed class ConnectionCloseTests
{
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(15);

    /// <summary>
    /// The cause of a Logout that failed with "connection closed" under load: the response before the Logout
    /// Response was sent from another thread, whose send loop had handed its bytes to the kernel but not yet let
    /// go of the sender when the Logout Request arrived. The Logout Response was queued behind it, and the receive
    /// loop, done with the connection, tore the transport down before that send loop came back to send it. Here
    /// the send loop is held after SYNCHRONIZE CACHE's response reached the initiator, as a preempted thread would.
    /// </summary>
    [Fact]
    public async Task The_logout_response_is_sent_when_the_send_loop_is_busy_as_the_logout_arrives()
    {
        await using var target = await InProcessTarget.StartAsync();
        var transport = new StallingTransport();
        var run = target.Portal.Accept(transport);
        var initiator = TestInitiator.FromPipes(transport.ClientInput, transport.ClientOutput);
        try
        {
            Assert.True((await initiator.LoginAsync(new LoginOptions { TargetName = InProcessTarget.TargetName }).WaitAsync(Bound)).Succeeded);
            await initiator.ClearUnitAttentionsAsync().WaitAsync(Bound);

            transport.StallNextSend(TimeSpan.FromMilliseconds(300));
            Assert.True((await initiator.ExecuteAsync(Cdb.SynchronizeCache10()).WaitAsync(Bound)).Good);
            Assert.Equal(0, await initiator.LogoutAsync().WaitAsync(Bound));

            await Expect.UntilAsync(() => initiator.Closed, Bound, "the end of the stream after the Logout Response");
            Assert.False(initiator.Reset, "the target reset the connection instead of closing it");
        }
        finally
        {
            await initiator.DisposeAsync();
        }
        await run.WaitAsync(Bound);
    }

    /// <summary>
    /// The same race over real sockets against the appliance, whose commands complete on its IO workers, as the
    /// failing test met it: sessions log in, write, synchronize and log out at once, again and again, while spinning
    /// threads keep every core busy so send loops get preempted. (Before the fix, 8 x 400 rounds of this lost a
    /// Logout Response in one run out of three.)
    /// </summary>
    [Fact]
    public async Task Logouts_right_after_a_command_always_get_their_response_under_cpu_load()
    {
        await using var appliance = await ApplianceProcess.StartAsync();
        using var hog = new CpuHog(2 * Environment.ProcessorCount);
        var failures = new List<string>();
        var sessions = Enumerable.Range(0, 8).Select(s => Task.Run(async () =>
        {
            for (int i = 0; i < 60; i++)
            {
                var initiator = await WebTest.LoginAsync(appliance, ApplianceProcess.DemoTarget);
                await using (initiator)
                {
                    Assert.True((await initiator.ExecuteAsync(Cdb.Write10((uint)(s * 64), 8), dataOut: new byte[4096]).WaitAsync(Bound)).Good);
                    Assert.True((await initiator.ExecuteAsync(Cdb.SynchronizeCache10()).WaitAsync(Bound)).Good);
                    try
                    {
                        Assert.Equal(0, await initiator.LogoutAsync().WaitAsync(Bound));
                        await Expect.UntilAsync(() => initiator.Closed, Bound, "the end of the stream after the Logout Response");
                        if (initiator.Reset) lock (failures) failures.Add($"session {s}, round {i}: reset after the Logout Response");
                    }
                    catch (IOException e)
                    {
                        lock (failures) failures.Add($"session {s}, round {i}: {e.Message}");
                    }
                }
            }
        })).ToArray();
        await Task.WhenAll(sessions);
        Assert.Empty(failures);
    }

    [Fact]
    public async Task After_a_logout_response_the_target_sends_fin_reads_on_and_lets_go_once_the_initiator_closes()
    {
        var metrics = new RecordingMetrics();
        await using var target = await InProcessTarget.StartAsync(o => o.CloseWaitMilliseconds = 60_000, metrics: metrics);
        var initiator = await target.LoginAsync();
        initiator.CloseOnEndOfStream = false;
        try
        {
            Assert.Equal(0, await initiator.LogoutAsync().WaitAsync(Bound));
            await Expect.UntilAsync(() => initiator.Closed, Bound, "the target's FIN");
            Assert.False(initiator.Reset);
            Assert.Empty(target.Portal.GetSessions());   // the session is gone at once

            // The initiator has not closed its side: the target holds the socket and keeps reading (and dropping)
            // what still comes, instead of answering it with a reset.
            await initiator.SendRawAsync(new byte[4096]);
            await initiator.SendRawAsync(new byte[48]);
            Assert.Equal(1, target.Portal.ConnectionCount);
            Assert.Empty(metrics.Closes);
        }
        finally
        {
            await initiator.DisposeAsync();
        }
        await Expect.UntilAsync(() => target.Portal.ConnectionCount == 0, Bound, "the socket to be released once the initiator closed");
        Assert.Equal(["graceful"], metrics.Closes);
    }

    [Fact]
    public async Task An_initiator_that_never_closes_its_side_is_let_go_after_the_close_wait()
    {
        var metrics = new RecordingMetrics();
        await using var target = await InProcessTarget.StartAsync(o => o.CloseWaitMilliseconds = 300, metrics: metrics);
        var initiator = await target.LoginAsync();
        initiator.CloseOnEndOfStream = false;
        try
        {
            Assert.Equal(0, await initiator.LogoutAsync().WaitAsync(Bound));
            await Expect.UntilAsync(() => target.Portal.ConnectionCount == 0, Bound, "the socket to be released after the close wait");
            Assert.Equal(["graceful-timeout"], metrics.Closes);
            Assert.True(initiator.Closed);
            Assert.False(initiator.Reset);
        }
        finally
        {
            await initiator.DisposeAsync();
        }
    }

    [Fact]
    public async Task A_refused_login_gets_its_response_then_an_orderly_end_of_stream()
    {
        var metrics = new RecordingMetrics();
        await using var target = await InProcessTarget.StartAsync(metrics: metrics);
        await using var raw = await RawConnection.ConnectAsync(target.EndPoint);
        var keys = FuzzPdu.Text("InitiatorName=" + FuzzPdu.FuzzInitiator, "SessionType=Normal", "TargetName=iqn.2026-11.io.iscsisnap.test:nobody");
        Assert.True(await raw.SendAsync(FuzzPdu.Frame(FuzzPdu.LoginHeader(FuzzPdu.LoginFlags(true, 1, 3)), keys)));
        var response = await raw.ReadAsync(Bound);
        Assert.NotNull(response);
        Assert.Equal(0x23, response.Opcode);
        Assert.Equal(0x0203, (response.Header[36] << 8) | response.Header[37]);   // TARGET NOT FOUND
        Assert.Empty(await raw.WaitForCloseAsync(Bound));
        Assert.False(raw.Reset, "the target reset the connection after the login response");

        raw.ShutdownSend();
        await Expect.UntilAsync(() => target.Portal.ConnectionCount == 0, Bound, "the socket to be released");
        Assert.Equal(["graceful"], metrics.Closes);
    }

    [Fact]
    public async Task Session_reinstatement_tells_the_old_connection_and_never_waits_for_it_to_close()
    {
        var metrics = new RecordingMetrics();
        await using var target = await InProcessTarget.StartAsync(o => o.CloseWaitMilliseconds = 60_000, metrics: metrics);
        var options = new LoginOptions { TargetName = InProcessTarget.TargetName, Isid = 0x400000123456UL };
        var old = await target.LoginAsync(options);
        old.CloseOnEndOfStream = false;
        try
        {
            var again = await target.LoginAsync(options);
            await using (again)
            {
                // The new session runs while the old connection still waits for its initiator to close.
                Assert.True((await again.ExecuteAsync(Cdb.TestUnitReady()).WaitAsync(Bound)).Status is 0 or 2);
                Assert.Equal(2, target.Portal.ConnectionCount);
                Assert.Single(target.Portal.GetSessions());

                var notice = await Expect.NextAsync(old, Bound);
                Assert.NotNull(notice);
                Assert.Equal(0x32, notice.Opcode);                 // Async Message
                Assert.Equal(IscsiConnection.AsyncEventDropSession, notice.Header[36]);
                await Expect.UntilAsync(() => old.Closed, Bound, "the old connection's end of stream");
                Assert.False(old.Reset);
                await old.DisposeAsync();
                await Expect.UntilAsync(() => target.Portal.ConnectionCount == 1, Bound, "the old socket to be released");
                Assert.Equal(0, await again.LogoutAsync().WaitAsync(Bound));
            }
        }
        finally
        {
            await old.DisposeAsync();
        }
        await Expect.UntilAsync(() => target.Portal.ConnectionCount == 0, Bound, "every socket to be released");
        Assert.Equal(["graceful", "graceful"], metrics.Closes);
    }

    [Fact]
    public async Task Stopping_the_portal_asks_for_a_logout_then_drops_the_connection_gracefully()
    {
        var metrics = new RecordingMetrics();
        await using var target = await InProcessTarget.StartAsync(metrics: metrics);
        var initiator = await target.LoginAsync();
        Task stopping;
        try
        {
            stopping = target.Portal.StopAsync(TimeSpan.FromMilliseconds(300));
            var request = await Expect.NextAsync(initiator, Bound);
            Assert.Equal((byte)0x32, request?.Opcode);
            Assert.Equal(1, request!.Header[36]);                    // logout requested: this initiator ignores it
            var drop = await Expect.NextAsync(initiator, Bound);
            Assert.Equal((byte)0x32, drop?.Opcode);
            Assert.Equal(IscsiConnection.AsyncEventDropSession, drop!.Header[36]);
            await Expect.UntilAsync(() => initiator.Closed, Bound, "the end of stream");
            Assert.False(initiator.Reset);
        }
        finally
        {
            await initiator.DisposeAsync();
        }
        await stopping.WaitAsync(Bound);
        Assert.Equal(0, target.Portal.ConnectionCount);
        Assert.Equal(["graceful"], metrics.Closes);
    }

    [Fact]
    public async Task A_pdu_before_login_is_a_protocol_violation_answered_with_a_reset()
    {
        var metrics = new RecordingMetrics();
        await using var target = await InProcessTarget.StartAsync(metrics: metrics);
        await using var raw = await RawConnection.ConnectAsync(target.EndPoint);
        var command = new byte[48];
        command[0] = 0x01;   // SCSI Command
        Assert.True(await raw.SendAsync(command));
        Assert.Empty(await raw.WaitForCloseAsync(Bound));
        Assert.True(raw.Reset, "a protocol violation before login should reset the connection");
        await Expect.UntilAsync(() => target.Portal.ConnectionCount == 0, Bound, "the socket to be released");
        Assert.Equal(["reset"], metrics.Closes);
    }

    [Fact]
    public async Task Unanswered_pings_reset_the_connection_of_a_dead_peer()
    {
        var metrics = new RecordingMetrics();
        await using var target = await InProcessTarget.StartAsync(o => { o.NopInIntervalSeconds = 1; o.NopInTimeoutSeconds = 1; }, metrics: metrics);
        await using var initiator = await target.LoginAsync();
        initiator.AnswerPings = false;
        await Expect.UntilAsync(() => initiator.Closed, Bound, "the dead peer to be dropped");
        Assert.True(initiator.Reset);
        await Expect.UntilAsync(() => target.Portal.ConnectionCount == 0, Bound, "the socket to be released");
        Assert.Empty(target.Portal.GetSessions());
        Assert.Equal(["reset"], metrics.Closes);
    }

    [Fact]
    public async Task A_framing_error_in_full_feature_phase_gets_a_reject_then_an_orderly_close()
    {
        var metrics = new RecordingMetrics();
        await using var target = await InProcessTarget.StartAsync(o => o.MaxRecvDataSegmentLength = 8192, metrics: metrics);
        var initiator = await target.LoginAsync();
        try
        {
            var nop = initiator.NewHeader(0x00, 0x80, initiator.NextItt(), immediate: true);
            FuzzPdu.SetDataSegmentLength(nop, 1 << 20);   // beyond what the target declared: the header is sound, the stream is not
            await initiator.SendRawAsync(nop);
            var reject = await Expect.NextAsync(initiator, Bound);
            Assert.Equal((byte)0x3F, reject?.Opcode);
            await Expect.UntilAsync(() => initiator.Closed, Bound, "the end of stream after the Reject");
            Assert.False(initiator.Reset);
            Assert.Empty(target.Portal.GetSessions());
        }
        finally
        {
            await initiator.DisposeAsync();
        }
        await Expect.UntilAsync(() => target.Portal.ConnectionCount == 0, Bound, "the socket to be released");
        Assert.Equal(["graceful"], metrics.Closes);
    }

    [Fact]
    public async Task Target_cold_reset_answers_then_closes_every_connection_of_the_target_gracefully()
    {
        var metrics = new RecordingMetrics();
        await using var target = await InProcessTarget.StartAsync(metrics: metrics);
        var resetting = await target.LoginAsync();
        var other = await target.LoginAsync();
        try
        {
            Assert.Equal(0, await resetting.TaskManagementAsync(7, 0).WaitAsync(Bound));   // TARGET COLD RESET: function complete
            await Expect.UntilAsync(() => resetting.Closed, Bound, "the end of stream after the TMF response");
            Assert.False(resetting.Reset);

            var notice = await Expect.NextAsync(other, Bound);
            Assert.Equal((byte)0x32, notice?.Opcode);
            Assert.Equal(IscsiConnection.AsyncEventDropSession, notice!.Header[36]);
            await Expect.UntilAsync(() => other.Closed, Bound, "the other session's end of stream");
            Assert.False(other.Reset);
            Assert.Empty(target.Portal.GetSessions());
        }
        finally
        {
            await resetting.DisposeAsync();
            await other.DisposeAsync();
        }
        await Expect.UntilAsync(() => target.Portal.ConnectionCount == 0, Bound, "every socket to be released");
        Assert.Equal(["graceful", "graceful"], metrics.Closes);
    }

    private sealed class RecordingMetrics : ITargetMetrics
    {
        private readonly ConcurrentQueue<string> _closes = new();
        public IReadOnlyList<string> Closes => _closes.ToArray();
        public void CommandCompleted(CommandKind kind, long bytes, double seconds, bool failed) { }
        public void LoginAttempt(bool succeeded, string reason) { }
        public void SessionOpened() { }
        public void SessionClosed() { }
        public void ProtocolError(string kind) { }
        public void TaskManagement(string function) { }
        public void ConnectionClosed(string how) => _closes.Enqueue(how);
    }

    /// <summary>An in-memory transport whose next send, once its bytes reached the initiator, holds the send loop for a while.</summary>
    private sealed class StallingTransport : IIscsiTransport
    {
        private readonly InMemoryTransport _inner = new();
        private long _stallTicks;

        public PipeReader ClientInput => _inner.ClientInput;
        public PipeWriter ClientOutput => _inner.ClientOutput;
        public PipeReader Input => _inner.Input;
        public EndPoint? LocalEndPoint => _inner.LocalEndPoint;
        public EndPoint? RemoteEndPoint => _inner.RemoteEndPoint;

        public void StallNextSend(TimeSpan stall) => Interlocked.Exchange(ref _stallTicks, stall.Ticks);

        public async ValueTask SendAsync(IList<ArraySegment<byte>> buffers)
        {
            await _inner.SendAsync(buffers);
            long stall = Interlocked.Exchange(ref _stallTicks, 0);
            if (stall > 0) await Task.Delay(TimeSpan.FromTicks(stall));
        }

        public void ShutdownSend() => _inner.ShutdownSend();
        public void Abort() => _inner.Abort();
        public ValueTask DisposeAsync() => _inner.DisposeAsync();
    }
}

/// <summary>Threads that spin until disposed, to load the machine's cores.</summary>
public sealed class CpuHog : IDisposable
{
    private volatile bool _stop;
    private readonly Thread[] _threads;

    public CpuHog(int threads)
    {
        _threads = Enumerable.Range(0, threads).Select(_ => new Thread(() =>
        {
            double x = 1;
            while (!_stop) x = Math.Sqrt(x + 1);
            GC.KeepAlive(x);
        }) { IsBackground = true, Priority = ThreadPriority.Normal }).ToArray();
        foreach (var t in _threads) t.Start();
    }

    public void Dispose()
    {
        _stop = true;
        foreach (var t in _threads) t.Join();
    }
}
