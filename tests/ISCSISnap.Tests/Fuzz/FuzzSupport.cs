using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;
using System.Threading.Channels;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Integrity;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Scsi;
using ISCSISnap.Tests.Support;
using Microsoft.Extensions.Logging;
using Xunit;

namespace ISCSISnap.Tests.Fuzz;

/// <summary>Builds PDUs byte by byte, digests included, so tests can send exactly what they mean (lies included).</summary>
internal static class FuzzPdu
{
    /// <summary>
    /// Frames <paramref name="header"/> (48 bytes), optional AHS and data: fills TotalAHSLength and DataSegmentLength
    /// unless told not to, pads the data, and appends the digests asked for (optionally wrong).
    /// </summary>
    public static byte[] Frame(byte[] header, ReadOnlySpan<byte> data = default, ReadOnlySpan<byte> ahs = default,
        bool headerDigest = false, bool dataDigest = false, bool badHeaderDigest = false, bool badDataDigest = false,
        bool setLengths = true)
    {
        if (header.Length != 48) throw new ArgumentException("a BHS is 48 bytes", nameof(header));
        if (ahs.Length % 4 != 0) throw new ArgumentException("AHS comes in 4-byte words", nameof(ahs));
        if (setLengths)
        {
            header[4] = (byte)(ahs.Length / 4);
            SetDataSegmentLength(header, data.Length);
        }
        int padded = (data.Length + 3) & ~3;
        var bytes = new List<byte>(48 + ahs.Length + 8 + padded);
        bytes.AddRange(header);
        bytes.AddRange(ahs.ToArray());
        if (headerDigest)
        {
            uint crc = Crc32C.Compute(bytes.ToArray());
            if (badHeaderDigest) crc ^= 0x5A5A5A5A;
            AddLittleEndian(bytes, crc);
        }
        if (data.Length > 0)
        {
            var payload = new byte[padded];
            data.CopyTo(payload);
            bytes.AddRange(payload);
            if (dataDigest)
            {
                uint crc = Crc32C.Compute(payload);
                if (badDataDigest) crc ^= 0x00FF00FF;
                AddLittleEndian(bytes, crc);
            }
        }
        return bytes.ToArray();
    }

    public static void SetDataSegmentLength(byte[] header, int length)
    {
        header[5] = (byte)(length >> 16);
        header[6] = (byte)(length >> 8);
        header[7] = (byte)length;
    }

    private static void AddLittleEndian(List<byte> bytes, uint value)
    {
        Span<byte> four = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(four, value);
        bytes.AddRange(four.ToArray());
    }

    /// <summary>A Login Request header: flags carry T, C, CSG and NSG; the immediate bit is set unless told otherwise.</summary>
    public static byte[] LoginHeader(byte flags, uint itt = 0x1000, byte versionMax = 0, byte versionMin = 0, bool immediate = true,
        ushort tsih = 0, ulong isid = 0x400000ABCDEFUL, uint cmdSN = 1, ushort cid = 0)
    {
        var h = new byte[48];
        h[0] = (byte)(0x03 | (immediate ? 0x40 : 0));
        h[1] = flags;
        h[2] = versionMax;
        h[3] = versionMin;
        for (int i = 0; i < 6; i++) h[8 + i] = (byte)(isid >> (40 - 8 * i));
        BinaryPrimitives.WriteUInt16BigEndian(h.AsSpan(14), tsih);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(16), itt);
        BinaryPrimitives.WriteUInt16BigEndian(h.AsSpan(20), cid);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(24), cmdSN);
        return h;
    }

    /// <summary>Login flags: T (transit), C (continue), CSG, NSG.</summary>
    public static byte LoginFlags(bool transit, int csg, int nsg, bool @continue = false) =>
        (byte)((transit ? 0x80 : 0) | (@continue ? 0x40 : 0) | ((csg & 3) << 2) | (nsg & 3));

    public static byte[] Text(params string[] pairs)
    {
        var bytes = new List<byte>();
        foreach (var pair in pairs)
        {
            bytes.AddRange(Encoding.UTF8.GetBytes(pair));
            bytes.Add(0);
        }
        return bytes.ToArray();
    }

    public const string FuzzInitiator = "iqn.2026-11.io.iscsisnap.test:fuzz";

    /// <summary>The keys of a first login PDU that would succeed.</summary>
    public static string[] GoodLoginKeys => ["InitiatorName=" + FuzzInitiator, "SessionType=Normal", "TargetName=" + InProcessTarget.TargetName];

    /// <summary>A SCSI Command header (no lengths yet) with the CDB in place.</summary>
    public static byte[] ScsiCommand(TestInitiator initiator, uint itt, byte[] cdb, uint expectedLength, bool read = false, bool write = false,
        bool final = true, bool immediate = false, ulong lun = 0)
    {
        var h = initiator.NewHeader(0x01, (byte)((final ? 0x80 : 0) | (read ? 0x40 : 0) | (write ? 0x20 : 0) | 0x01), itt, immediate);
        BinaryPrimitives.WriteUInt64BigEndian(h.AsSpan(8), TestInitiator.EncodeLun(lun));
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(20), expectedLength);
        cdb.CopyTo(h.AsSpan(32));
        return h;
    }

    /// <summary>A SCSI Data-Out header.</summary>
    public static byte[] DataOut(TestInitiator initiator, uint itt, uint ttt, uint dataSN, uint offset, bool final = true, ulong lun = 0)
    {
        var h = new byte[48];
        h[0] = 0x05;
        h[1] = (byte)(final ? 0x80 : 0);
        BinaryPrimitives.WriteUInt64BigEndian(h.AsSpan(8), TestInitiator.EncodeLun(lun));
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(16), itt);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(20), ttt);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(28), initiator.ExpStatSN);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(36), dataSN);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(40), offset);
        return h;
    }

    public static byte[] Pattern(int seed, int length)
    {
        var bytes = new byte[length];
        new Random(seed).NextBytes(bytes);
        return bytes;
    }
}

/// <summary>
/// A bare TCP connection to the portal for the phase before login, where <see cref="TestInitiator"/> has no
/// receive loop: sends raw bytes, and a background reader frames what comes back (no digests before login).
/// </summary>
internal sealed class RawConnection : IAsyncDisposable
{
    private readonly Socket _socket;
    private readonly Channel<ReceivedPdu> _received = Channel.CreateUnbounded<ReceivedPdu>();
    private readonly Task _reader;

    private RawConnection(Socket socket)
    {
        _socket = socket;
        _reader = Task.Run(ReadLoopAsync);
    }

    public static async Task<RawConnection> ConnectAsync(IPEndPoint endPoint)
    {
        var socket = new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        await socket.ConnectAsync(endPoint);
        return new RawConnection(socket);
    }

    /// <summary>True once the target closed (or reset) the connection.</summary>
    public bool Closed => _reader.IsCompleted;

    /// <summary>True when the connection ended with a reset (or another error) instead of the target's FIN.</summary>
    public bool Reset { get; private set; }

    /// <summary>Sends everything; false when the target has already gone away.</summary>
    public async Task<bool> SendAsync(ReadOnlyMemory<byte> bytes)
    {
        try
        {
            while (!bytes.IsEmpty)
            {
                int n = await _socket.SendAsync(bytes, SocketFlags.None);
                bytes = bytes[n..];
            }
            return true;
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
            return false;
        }
    }

    /// <summary>The next PDU; null when the connection closed first. Throws <see cref="TimeoutException"/> when nothing happens.</summary>
    public async Task<ReceivedPdu?> ReadAsync(TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            if (await _received.Reader.WaitToReadAsync(cts.Token) && _received.Reader.TryRead(out var pdu)) return pdu;
            return null;
        }
        catch (OperationCanceledException)
        {
            throw new TimeoutException($"no PDU and no close within {timeout.TotalSeconds} s");
        }
    }

    /// <summary>Waits for the target to close; returns the PDUs it sent meanwhile, or throws on timeout.</summary>
    public async Task<List<ReceivedPdu>> WaitForCloseAsync(TimeSpan timeout)
    {
        var pdus = new List<ReceivedPdu>();
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await foreach (var pdu in _received.Reader.ReadAllAsync(cts.Token)) pdus.Add(pdu);
        }
        catch (OperationCanceledException)
        {
            throw new TimeoutException($"the target did not close the connection within {timeout.TotalSeconds} s " +
                $"(received {pdus.Count} PDU(s): {string.Join(", ", pdus.Select(p => $"0x{p.Opcode:x2}"))})");
        }
        return pdus;
    }

    /// <summary>Half-closes: the target sees end of stream after what was sent.</summary>
    public void ShutdownSend()
    {
        try { _socket.Shutdown(SocketShutdown.Send); } catch (SocketException) { } catch (ObjectDisposedException) { }
    }

    private async Task ReadLoopAsync()
    {
        var buffer = new byte[1 << 16];
        int count = 0;
        try
        {
            while (true)
            {
                if (count == buffer.Length) Array.Resize(ref buffer, buffer.Length * 2);
                int n = await _socket.ReceiveAsync(buffer.AsMemory(count), SocketFlags.None);
                if (n == 0) break;
                count += n;
                while (count >= 48)
                {
                    int ahs = buffer[4] * 4;
                    int length = (buffer[5] << 16) | (buffer[6] << 8) | buffer[7];
                    int total = 48 + ahs + ((length + 3) & ~3);
                    if (count < total) break;
                    var header = buffer.AsSpan(0, 48).ToArray();
                    var data = buffer.AsSpan(48 + ahs, length).ToArray();
                    _received.Writer.TryWrite(new ReceivedPdu(header, data));
                    Buffer.BlockCopy(buffer, total, buffer, 0, count - total);
                    count -= total;
                }
            }
        }
        catch (SocketException)
        {
            Reset = true;
        }
        catch (ObjectDisposedException)
        {
        }
        _received.Writer.TryComplete();
    }

    public async ValueTask DisposeAsync()
    {
        _socket.Dispose();
        try { await _reader; } catch { }
    }
}

/// <summary>
/// Records what the target logs. Anything at Error or above (a connection that crashed, a command that threw, a
/// timer that failed) means the target met input it did not handle, which a fuzz test must never see.
/// </summary>
internal sealed class LogCapture : ILoggerFactory
{
    private readonly ConcurrentQueue<string> _failures = new();
    private readonly ConcurrentQueue<string> _recent = new();

    public ILogger CreateLogger(string categoryName) => new Logger(this, categoryName);
    public void AddProvider(ILoggerProvider provider) { }
    public void Dispose() { }

    public IReadOnlyCollection<string> Failures => _failures;

    /// <summary>The last messages, for failure reports.</summary>
    public string Recent => string.Join("\n", _recent.TakeLast(60));

    public void AssertNoFailures(string context = "")
    {
        if (!_failures.IsEmpty)
            Assert.Fail($"{context}the target logged {_failures.Count} failure(s):\n{string.Join("\n---\n", _failures.Take(5))}");
    }

    private void Record(LogLevel level, string category, EventId id, string message, Exception? exception)
    {
        string line = $"{level} {category} [{id.Id}] {message}";
        _recent.Enqueue(line);
        while (_recent.Count > 400) _recent.TryDequeue(out _);
        if (level >= LogLevel.Error) _failures.Enqueue(line + (exception is null ? "" : "\n" + exception));
    }

    private sealed class Logger(LogCapture owner, string category) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => logLevel >= LogLevel.Information;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            if (IsEnabled(logLevel)) owner.Record(logLevel, category, eventId, formatter(state, exception), exception);
        }
    }
}

/// <summary>
/// A session that must not notice the fuzzing: it keeps a block pattern on its LUN and must read it back intact,
/// write and read new data, answer a ping and stay connected whatever the other connections do.
/// </summary>
internal sealed class BystanderSession(TestInitiator initiator, uint lba, ushort blocks)
{
    private byte[] _expected = [];
    private int _round;

    public TestInitiator Initiator => initiator;

    public async Task WritePatternAsync(string context = "")
    {
        var data = FuzzPdu.Pattern((int)lba + 0xB0 + _round++, blocks * 512);
        var write = await initiator.ExecuteAsync(Cdb.Write10(lba, blocks), dataOut: data).WaitAsync(FuzzEnvironment.Patience);
        Assert.True(write.Good, $"{context}bystander write failed: status {write.Status}, sense {write.SenseKey:x}/{write.AscAscq:x4}, rejected {write.Rejected}");
        _expected = data;
    }

    public async Task AssertUndisturbedAsync(string context = "")
    {
        Assert.False(initiator.Closed, $"{context}the bystander session was disconnected");
        var read = await initiator.ExecuteAsync(Cdb.Read10(lba, blocks), expectedDataIn: _expected.Length).WaitAsync(FuzzEnvironment.Patience);
        Assert.True(read.Good, $"{context}bystander read failed: status {read.Status}, sense {read.SenseKey:x}/{read.AscAscq:x4}");
        Assert.True(_expected.AsSpan().SequenceEqual(read.DataIn), $"{context}the bystander's blocks changed");
        await WritePatternAsync(context);
        var again = await initiator.ExecuteAsync(Cdb.Read10(lba, blocks), expectedDataIn: _expected.Length).WaitAsync(FuzzEnvironment.Patience);
        Assert.True(again.Good && _expected.AsSpan().SequenceEqual(again.DataIn), $"{context}the bystander's new data did not read back");
        var echo = FuzzPdu.Pattern(_round, 64);
        Assert.Equal(echo, await initiator.PingAsync(echo).WaitAsync(FuzzEnvironment.Patience));
    }
}

/// <summary>
/// An in-process portal for bad-input tests, with a <see cref="BystanderSession"/> logged in before any fuzzing
/// (on the same target and LUN as the fuzzed sessions, blocks apart).
/// </summary>
internal sealed class FuzzEnvironment : IAsyncDisposable
{
    public const string BystanderName = "iqn.2026-11.io.iscsisnap.test:bystander";
    /// <summary>The bystander's blocks: far from anything the fuzzing sessions write.</summary>
    public const uint BystanderLba = 120_000;
    public const ushort BystanderBlocks = 64;
    public static readonly TimeSpan Patience = TimeSpan.FromSeconds(10);

    private BystanderSession _bystander = null!;

    private FuzzEnvironment(InProcessTarget target, LogCapture logs)
    {
        Target = target;
        Logs = logs;
    }

    public InProcessTarget Target { get; }
    public LogCapture Logs { get; }
    public TestInitiator Bystander => _bystander.Initiator;
    public IPEndPoint EndPoint => Target.EndPoint;

    public static async Task<FuzzEnvironment> StartAsync(Action<IscsiPortalOptions>? configure = null)
    {
        var logs = new LogCapture();
        var target = await InProcessTarget.StartAsync(configure, loggers: logs);
        var environment = new FuzzEnvironment(target, logs);
        var initiator = await target.LoginAsync(new LoginOptions { TargetName = InProcessTarget.TargetName, InitiatorName = BystanderName });
        environment._bystander = new BystanderSession(initiator, BystanderLba, BystanderBlocks);
        await environment._bystander.WritePatternAsync();
        return environment;
    }

    /// <summary>A session that will be fed bad input.</summary>
    public Task<TestInitiator> LoginAsync(LoginOptions? options = null) =>
        Target.LoginAsync(options ?? new LoginOptions { TargetName = InProcessTarget.TargetName });

    /// <summary>The bystander is undisturbed and the target logged no crash.</summary>
    public async Task AssertBystanderUndisturbedAsync(string context = "")
    {
        await _bystander.AssertUndisturbedAsync(context);
        Logs.AssertNoFailures(context);
    }

    /// <summary>A new connection still logs in, runs a command and logs out.</summary>
    public async Task AssertFreshLoginWorksAsync(string context = "")
    {
        await using var fresh = await TestInitiator.ConnectAsync(EndPoint);
        var login = await fresh.LoginAsync(new LoginOptions { TargetName = InProcessTarget.TargetName, InitiatorName = "iqn.2026-11.io.iscsisnap.test:fresh" })
            .WaitAsync(Patience);
        Assert.True(login.Succeeded, $"{context}a fresh login failed with status {login.Status:x4}");
        var inquiry = await fresh.ExecuteAsync(Cdb.Inquiry(), expectedDataIn: 255).WaitAsync(Patience);
        Assert.True(inquiry.Good, $"{context}INQUIRY on a fresh session failed: status {inquiry.Status}");
        Assert.Equal(0, await fresh.LogoutAsync().WaitAsync(Patience));
    }

    /// <summary>Waits until the portal holds exactly <paramref name="count"/> sessions (closed connections are cleaned up).</summary>
    public async Task WaitForSessionCountAsync(int count, string context = "")
    {
        var deadline = Stopwatch.StartNew();
        while (Target.Portal.GetSessions().Count != count && deadline.Elapsed < Patience) await Task.Delay(10);
        Assert.True(Target.Portal.GetSessions().Count == count,
            $"{context}expected {count} session(s), the portal has {Target.Portal.GetSessions().Count}");
    }

    public async ValueTask DisposeAsync()
    {
        await Bystander.DisposeAsync();
        await Target.DisposeAsync();
    }
}

/// <summary>Waiting helpers for what the target sends a fuzzed session.</summary>
internal static class Expect
{
    /// <summary>The next PDU the session did not ask for, skipping the target's NOP-In pings; null when closed first.</summary>
    public static async Task<ReceivedPdu?> NextAsync(TestInitiator initiator, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            var left = timeout - clock.Elapsed;
            if (left <= TimeSpan.Zero) throw new TimeoutException($"nothing from the target within {timeout.TotalSeconds} s");
            var pdu = await initiator.NextUnsolicitedAsync(left);
            if (pdu is null)
            {
                if (initiator.Closed) return null;
                continue;
            }
            if (pdu.Opcode == 0x20 && pdu.Itt == 0xFFFFFFFF) continue;   // a ping, answered by the initiator
            return pdu;
        }
    }

    /// <summary>A Reject with <paramref name="reason"/> that echoes <paramref name="header"/>.</summary>
    public static async Task<ReceivedPdu> RejectAsync(TestInitiator initiator, byte reason, byte[] header, TimeSpan? timeout = null)
    {
        var pdu = await NextAsync(initiator, timeout ?? TimeSpan.FromSeconds(5))
            ?? throw new Xunit.Sdk.XunitException($"the connection closed instead of a Reject (reason 0x{reason:x2})");
        Assert.True(pdu.Opcode == 0x3F, $"expected a Reject, got opcode 0x{pdu.Opcode:x2}");
        Assert.True(pdu.Header[2] == reason, $"expected Reject reason 0x{reason:x2}, got 0x{pdu.Header[2]:x2}");
        Assert.Equal(0xFFFFFFFFu, pdu.Itt);
        Assert.Equal(48, pdu.Data.Length);
        Assert.Equal(header[..48], pdu.Data);
        return pdu;
    }

    /// <summary>Nothing at all comes back within <paramref name="quiet"/> (the PDU was silently ignored).</summary>
    public static async Task SilenceAsync(TestInitiator initiator, TimeSpan quiet)
    {
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < quiet)
        {
            var pdu = await initiator.NextUnsolicitedAsync(quiet - clock.Elapsed);
            if (pdu is null)
            {
                Assert.False(initiator.Closed, "the target closed the connection instead of ignoring the PDU");
                continue;
            }
            if (pdu.Opcode == 0x20 && pdu.Itt == 0xFFFFFFFF) continue;
            Assert.Fail($"expected no answer, got opcode 0x{pdu.Opcode:x2} (ITT 0x{pdu.Itt:x8}, byte 2 0x{pdu.Header[2]:x2}, byte 3 0x{pdu.Header[3]:x2})");
        }
    }

    /// <summary>The target closes the connection within <paramref name="timeout"/> without sending anything but what <paramref name="allowed"/> accepts.</summary>
    public static async Task ClosedAsync(TestInitiator initiator, TimeSpan timeout, Func<ReceivedPdu, bool>? allowed = null)
    {
        var clock = Stopwatch.StartNew();
        while (!initiator.Closed)
        {
            var left = timeout - clock.Elapsed;
            Assert.True(left > TimeSpan.Zero, $"the target did not close the connection within {timeout.TotalSeconds} s");
            var pdu = await initiator.NextUnsolicitedAsync(left);
            if (pdu is null) continue;
            if (pdu.Opcode == 0x20 && pdu.Itt == 0xFFFFFFFF) continue;
            Assert.True(allowed?.Invoke(pdu) ?? false, $"unexpected PDU before the close: opcode 0x{pdu.Opcode:x2}, byte 2 0x{pdu.Header[2]:x2}");
        }
    }

    public static async Task UntilAsync(Func<bool> condition, TimeSpan timeout, string what)
    {
        var clock = Stopwatch.StartNew();
        while (!condition())
        {
            Assert.True(clock.Elapsed < timeout, $"timed out after {timeout.TotalSeconds} s waiting for {what}");
            await Task.Delay(10);
        }
    }
}

/// <summary>A second target with its own LUN on the same portal (a bystander there shares nothing with the fuzzed target but the portal).</summary>
internal sealed class SecondTarget : IAsyncDisposable
{
    public const string Name = "iqn.2026-11.io.iscsisnap.test:other";

    private SecondTarget(LogicalUnit unit) => Unit = unit;

    public LogicalUnit Unit { get; }

    public static SecondTarget Add(InProcessTarget portal, long bytes = 16L << 20)
    {
        var target = new IscsiTarget(Name, "second target", TargetAccess.Open);
        string path = Path.Combine(portal.Directory, $"other-{Guid.NewGuid():N}.img");
        var unit = new LogicalUnit(new LogicalUnitIdentity(Guid.NewGuid()), FileBlockDevice.Create(path, bytes, 512), null, null, new Luns(target))
        {
            TargetName = Name,
        };
        target.AddLun(0, unit);
        Assert.True(portal.Registry.TryAdd(target));
        return new SecondTarget(unit);
    }

    public async ValueTask DisposeAsync() => await Unit.DisposeAsync();

    private sealed class Luns(IscsiTarget target) : ILunDirectory
    {
        public IEnumerable<ulong> LunNumbers => target.Luns.Keys;
    }
}

/// <summary>
/// A <see cref="TestInitiator"/> whose socket reads can be paused: it keeps sending while the target's answers
/// pile up unread, like an initiator that never reads (or reads slowly).
/// </summary>
internal sealed class PausableInitiator : IAsyncDisposable
{
    private readonly Socket _socket;
    private readonly Task _pump;
    private volatile TaskCompletionSource _resumed = NewGate(open: true);

    private PausableInitiator(Socket socket, TestInitiator initiator, Task pump)
    {
        _socket = socket;
        Initiator = initiator;
        _pump = pump;
    }

    public TestInitiator Initiator { get; }

    public static async Task<PausableInitiator> ConnectAsync(IPEndPoint endPoint)
    {
        var socket = new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        await socket.ConnectAsync(endPoint);
        var stream = new NetworkStream(socket, ownsSocket: false);
        var pipe = new System.IO.Pipelines.Pipe();
        PausableInitiator? self = null;
        var started = new TaskCompletionSource<PausableInitiator>(TaskCreationOptions.RunContinuationsAsynchronously);
        var pump = Task.Run(async () =>
        {
            var me = await started.Task;
            var buffer = new byte[1 << 16];
            try
            {
                while (true)
                {
                    await me._resumed.Task;
                    int n = await stream.ReadAsync(buffer);
                    if (n == 0) break;
                    await pipe.Writer.WriteAsync(buffer.AsMemory(0, n));
                }
            }
            catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException) { }
            await pipe.Writer.CompleteAsync();
        });
        var initiator = TestInitiator.FromPipes(pipe.Reader, System.IO.Pipelines.PipeWriter.Create(stream));
        self = new PausableInitiator(socket, initiator, pump);
        started.SetResult(self);
        return self;
    }

    private static TaskCompletionSource NewGate(bool open)
    {
        var gate = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        if (open) gate.SetResult();
        return gate;
    }

    /// <summary>Stops reading from the socket (after at most one read already under way).</summary>
    public void PauseReading() => _resumed = NewGate(open: false);

    public void ResumeReading() => _resumed.TrySetResult();

    public async ValueTask DisposeAsync()
    {
        _resumed.TrySetResult();
        _socket.Dispose();
        await Initiator.DisposeAsync();
        try { await _pump; } catch { }
    }
}
