using System.Buffers;
using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.IO.Pipelines;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text;
using ISCSISnap.Storage.Integrity;

namespace ISCSISnap.Tests.Support;

/// <summary>How a test initiator logs in.</summary>
public sealed record LoginOptions
{
    public string InitiatorName { get; init; } = "iqn.2026-11.io.iscsisnap.test:initiator";
    /// <summary>Null for a discovery session.</summary>
    public string? TargetName { get; init; }
    public ulong Isid { get; init; } = 0x400000000000UL | (uint)Random.Shared.Next(1, 0xFFFFFF);
    public ushort Tsih { get; init; }
    public ushort Cid { get; init; }
    public string HeaderDigest { get; init; } = "None";
    public string DataDigest { get; init; } = "None";
    public bool ImmediateData { get; init; } = true;
    public bool InitialR2T { get; init; }
    public int MaxRecvDataSegmentLength { get; init; } = 262144;
    public int MaxBurstLength { get; init; } = 262144;
    public int FirstBurstLength { get; init; } = 65536;
    public int MaxOutstandingR2T { get; init; } = 1;
    public string? ChapUser { get; init; }
    public string? ChapSecret { get; init; }
    /// <summary>CHAP_A list the initiator offers, e.g. "7,6,5".</summary>
    public string ChapAlgorithms { get; init; } = "5";
    public string? MutualChapUser { get; init; }
    public string? MutualChapSecret { get; init; }
    /// <summary>Extra operational keys sent in the operational stage.</summary>
    public IReadOnlyList<(string Key, string Value)> ExtraKeys { get; init; } = [];
}

public sealed record LoginResult(ushort Status, IReadOnlyDictionary<string, string> Keys, ushort Tsih)
{
    public bool Succeeded => Status == 0;
}

/// <summary>The outcome of a SCSI command seen from the initiator.</summary>
public sealed record ScsiResult(byte Status, byte[] Sense, byte[] DataIn, byte Flags, uint Residual, bool Rejected, byte RejectReason)
{
    public bool Good => !Rejected && Status == 0;
    public byte SenseKey => Sense.Length == 0 ? (byte)0 : Sense[0] is 0x72 or 0x73 ? (byte)(Sense[1] & 0x0F) : (byte)(Sense[2] & 0x0F);
    public ushort AscAscq => Sense.Length == 0 ? (ushort)0 : Sense[0] is 0x72 or 0x73 ? (ushort)((Sense[2] << 8) | Sense[3]) : (ushort)((Sense[12] << 8) | Sense[13]);
    public bool Overflow => (Flags & 0x04) != 0;
    public bool Underflow => (Flags & 0x02) != 0;
}

/// <summary>One PDU as received, for tests that look at the wire.</summary>
public sealed record ReceivedPdu(byte[] Header, byte[] Data)
{
    public byte Opcode => (byte)(Header[0] & 0x3F);
    public uint Itt => BinaryPrimitives.ReadUInt32BigEndian(Header.AsSpan(16));
    public uint StatSN => BinaryPrimitives.ReadUInt32BigEndian(Header.AsSpan(24));
}

/// <summary>
/// A small iSCSI initiator for tests and benchmarks: login (digests, CHAP, mutual CHAP), SCSI commands with
/// immediate, unsolicited and solicited data, task management, NOP, text and logout, plus raw PDUs for
/// fuzzing. Responses are matched by ITT on a background receive loop.
/// </summary>
public sealed class TestInitiator : IAsyncDisposable
{
    private readonly PipeReader _input;
    private readonly PipeWriter _output;
    private readonly Socket? _socket;
    private readonly SemaphoreSlim _sendLock = new(1, 1);
    /// <summary>Non-immediate commands take their CmdSN and go on the wire one at a time, in call order.</summary>
    private readonly SemaphoreSlim _commandOrder = new(1, 1);
    private readonly ConcurrentDictionary<uint, PendingCommand> _pending = new();
    private readonly ConcurrentQueue<ReceivedPdu> _unsolicited = new();
    private readonly SemaphoreSlim _unsolicitedSignal = new(0);
    private readonly CancellationTokenSource _stop = new();
    private Task? _receiveLoop;
    private uint _itt = (uint)Random.Shared.Next(1, 1 << 20);
    private uint _cmdSN;
    private uint _expStatSN;
    private bool _headerDigest, _dataDigest;
    private int _targetMaxRecv = 8192;
    private LoginOptions _options = new();

    private TestInitiator(PipeReader input, PipeWriter output, Socket? socket)
    {
        _input = input;
        _output = output;
        _socket = socket;
    }

    public uint MaxCmdSN { get; private set; }
    public uint ExpCmdSN { get; private set; }
    public IReadOnlyDictionary<string, string> NegotiatedKeys { get; private set; } = new Dictionary<string, string>();
    /// <summary>Set when the target closed the connection.</summary>
    public bool Closed { get; private set; }
    /// <summary>Set when the connection ended with an error (a TCP reset, say) instead of an orderly end of stream.</summary>
    public bool Reset { get; private set; }
    /// <summary>
    /// When the target ends the stream, shut the send side down too, as initiators do when they tear the connection
    /// down. Off: the socket stays half-open until disposed (to see how long the target waits).
    /// </summary>
    public bool CloseOnEndOfStream { get; set; } = true;
    /// <summary>Reply to target NOP-In pings automatically.</summary>
    public bool AnswerPings { get; set; } = true;
    public int PingsReceived;

    public static async Task<TestInitiator> ConnectAsync(IPEndPoint endPoint)
    {
        var socket = new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        await socket.ConnectAsync(endPoint);
        var stream = new NetworkStream(socket, ownsSocket: true);
        return new TestInitiator(PipeReader.Create(stream), PipeWriter.Create(stream), socket);
    }

    public static TestInitiator FromPipes(PipeReader input, PipeWriter output) => new(input, output, null);

    // ---------------------------------------------------------------- login

    public async Task<LoginResult> LoginAsync(LoginOptions options, CancellationToken cancellationToken = default)
    {
        _options = options;
        _cmdSN = (uint)Random.Shared.Next();
        uint itt = NextItt();
        var keys = new Dictionary<string, string>(StringComparer.Ordinal);
        bool useChap = options.ChapUser is not null;
        int stage = useChap ? 0 : 1;

        var first = new List<(string, string)> { ("InitiatorName", options.InitiatorName), ("SessionType", options.TargetName is null ? "Discovery" : "Normal") };
        if (options.TargetName is not null) first.Add(("TargetName", options.TargetName));

        if (useChap)
        {
            var response = await LoginStepAsync(itt, stage, 0, false, [.. first, ("AuthMethod", "CHAP,None")], cancellationToken);
            if (response.Status != 0) return new(response.Status, keys, 0);
            Merge(keys, response.Keys);
            if (keys.GetValueOrDefault("AuthMethod") != "CHAP") return new(0xFFFF, keys, 0);
            response = await LoginStepAsync(itt, 0, 0, false, [("CHAP_A", options.ChapAlgorithms)], cancellationToken);
            if (response.Status != 0) return new(response.Status, keys, 0);
            Merge(keys, response.Keys);
            int algorithm = int.Parse(keys["CHAP_A"]);
            byte id = byte.Parse(keys["CHAP_I"]);
            byte[] challenge = Convert.FromHexString(keys["CHAP_C"].AsSpan(2));
            var answer = ChapResponse(algorithm, id, options.ChapSecret!, challenge);
            var chapKeys = new List<(string, string)> { ("CHAP_N", options.ChapUser!), ("CHAP_R", "0x" + Convert.ToHexString(answer)) };
            byte mutualId = 0;
            byte[]? mutualChallenge = null;
            if (options.MutualChapUser is not null)
            {
                mutualId = (byte)Random.Shared.Next(256);
                mutualChallenge = RandomNumberGenerator.GetBytes(32);
                chapKeys.Add(("CHAP_I", mutualId.ToString()));
                chapKeys.Add(("CHAP_C", "0x" + Convert.ToHexString(mutualChallenge)));
            }
            response = await LoginStepAsync(itt, 0, 1, true, chapKeys, cancellationToken);
            if (response.Status != 0) return new(response.Status, keys, 0);
            Merge(keys, response.Keys);
            if (mutualChallenge is not null)
            {
                if (!keys.TryGetValue("CHAP_R", out var targetAnswer) || keys.GetValueOrDefault("CHAP_N") != options.MutualChapUser)
                    return new(0xFFFE, keys, 0);
                var expected = ChapResponse(algorithm, mutualId, options.MutualChapSecret!, mutualChallenge);
                if (!Convert.FromHexString(targetAnswer.AsSpan(2)).SequenceEqual(expected)) return new(0xFFFD, keys, 0);
            }
            first = [];
            stage = 1;
        }

        var operational = new List<(string, string)>(first)
        {
            ("HeaderDigest", options.HeaderDigest),
            ("DataDigest", options.DataDigest),
            ("MaxRecvDataSegmentLength", options.MaxRecvDataSegmentLength.ToString()),
        };
        if (options.TargetName is not null)
        {
            operational.Add(("InitialR2T", options.InitialR2T ? "Yes" : "No"));
            operational.Add(("ImmediateData", options.ImmediateData ? "Yes" : "No"));
            operational.Add(("MaxBurstLength", options.MaxBurstLength.ToString()));
            operational.Add(("FirstBurstLength", options.FirstBurstLength.ToString()));
            operational.Add(("MaxOutstandingR2T", options.MaxOutstandingR2T.ToString()));
            operational.Add(("ErrorRecoveryLevel", "0"));
        }
        operational.AddRange(options.ExtraKeys);
        while (true)
        {
            var response = await LoginStepAsync(itt, stage, 3, true, operational, cancellationToken);
            if (response.Status != 0) return new(response.Status, keys, 0);
            Merge(keys, response.Keys);
            if (response.Transit)
            {
                NegotiatedKeys = keys;
                _headerDigest = keys.GetValueOrDefault("HeaderDigest") == "CRC32C";
                _dataDigest = keys.GetValueOrDefault("DataDigest") == "CRC32C";
                if (keys.TryGetValue("MaxRecvDataSegmentLength", out var mrdsl)) _targetMaxRecv = int.Parse(mrdsl);
                _receiveLoop = Task.Run(ReceiveLoopAsync);
                return new(0, keys, response.Tsih);
            }
            // The target offered keys of its own: answer each with the value it proposed (and nothing else).
            var sent = operational.Select(k => k.Item1).ToHashSet();
            operational = response.Keys.Where(k => !sent.Contains(k.Key) && k.Key is not ("TargetPortalGroupTag" or "TargetAlias" or "MaxRecvDataSegmentLength"))
                .Select(k => (k.Key, k.Value)).ToList();
            first = [];
        }
    }

    private static void Merge(Dictionary<string, string> into, IReadOnlyDictionary<string, string> from)
    {
        foreach (var (k, v) in from) into[k] = v;
    }

    public static byte[] ChapResponse(int algorithm, byte id, string secret, byte[] challenge)
    {
        var input = new byte[1 + Encoding.UTF8.GetByteCount(secret) + challenge.Length];
        input[0] = id;
        Encoding.UTF8.GetBytes(secret, input.AsSpan(1));
        challenge.CopyTo(input, input.Length - challenge.Length);
        return algorithm switch
        {
            5 => MD5.HashData(input),
            6 => SHA1.HashData(input),
            7 => SHA256.HashData(input),
            8 => SHA3_256.HashData(input),
            _ => throw new ArgumentOutOfRangeException(nameof(algorithm)),
        };
    }

    private sealed record LoginStep(ushort Status, bool Transit, IReadOnlyDictionary<string, string> Keys, ushort Tsih);

    private async Task<LoginStep> LoginStepAsync(uint itt, int csg, int nsg, bool transit, IReadOnlyList<(string, string)> keys, CancellationToken cancellationToken)
    {
        var header = new byte[48];
        header[0] = 0x43;
        header[1] = (byte)((transit ? 0x80 : 0) | (csg << 2) | (transit ? nsg : 0));
        for (int i = 0; i < 6; i++) header[8 + i] = (byte)(_options.Isid >> (40 - 8 * i));
        BinaryPrimitives.WriteUInt16BigEndian(header.AsSpan(14), _options.Tsih);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(16), itt);
        BinaryPrimitives.WriteUInt16BigEndian(header.AsSpan(20), _options.Cid);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(24), _cmdSN);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(28), _expStatSN);
        await SendAsync(header, EncodeText(keys), cancellationToken);
        var reply = await ReadPduAsync(cancellationToken) ?? throw new IOException("connection closed during login");
        if ((reply.Header[0] & 0x3F) != 0x23) throw new IOException($"expected a login response, got opcode 0x{reply.Header[0] & 0x3F:x2}");
        _expStatSN = BinaryPrimitives.ReadUInt32BigEndian(reply.Header.AsSpan(24)) + 1;
        ExpCmdSN = BinaryPrimitives.ReadUInt32BigEndian(reply.Header.AsSpan(28));
        MaxCmdSN = BinaryPrimitives.ReadUInt32BigEndian(reply.Header.AsSpan(32));
        ushort status = BinaryPrimitives.ReadUInt16BigEndian(reply.Header.AsSpan(36));
        bool replyTransit = (reply.Header[1] & 0x80) != 0 && (reply.Header[1] & 0x03) == 3;
        ushort tsih = BinaryPrimitives.ReadUInt16BigEndian(reply.Header.AsSpan(14));
        return new(status, replyTransit, DecodeText(reply.Data), tsih);
    }

    public static byte[] EncodeText(IEnumerable<(string Key, string Value)> keys)
    {
        var bytes = new List<byte>();
        foreach (var (k, v) in keys)
        {
            bytes.AddRange(Encoding.UTF8.GetBytes($"{k}={v}"));
            bytes.Add(0);
        }
        return bytes.ToArray();
    }

    public static Dictionary<string, string> DecodeText(byte[] data)
    {
        var result = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var pair in Encoding.UTF8.GetString(data).Split('\0', StringSplitOptions.RemoveEmptyEntries))
        {
            int eq = pair.IndexOf('=');
            if (eq > 0) result[pair[..eq]] = pair[(eq + 1)..];
        }
        return result;
    }

    // ---------------------------------------------------------------- SCSI commands

    private sealed class PendingCommand
    {
        public required uint Itt;
        public required ulong Lun;
        public required byte[]? DataOut;
        public required TaskCompletionSource<ScsiResult> Completion;
        public byte[] DataIn = [];
        public int DataInLength;
        public byte[] Sense = [];
        /// <summary>
        /// The last Data-Out sequence queued for this command. Sequences go out one after another in offset order
        /// (DataSequenceInOrder=Yes): the unsolicited burst first, then each R2T's, even when an R2T arrives
        /// before the unsolicited burst is on the wire.
        /// </summary>
        public Task DataOutChain = Task.CompletedTask;
    }

    /// <summary>Runs a SCSI command: immediate data and unsolicited Data-Out as negotiated, R2Ts answered, Data-In gathered.</summary>
    public async Task<ScsiResult> ExecuteAsync(byte[] cdb, ulong lun = 0, int expectedDataIn = 0, byte[]? dataOut = null,
        byte attribute = 1, uint? expectedLengthOverride = null, bool immediate = false, CancellationToken cancellationToken = default)
    {
        uint itt = NextItt();
        var pending = new PendingCommand
        {
            Itt = itt, Lun = lun, DataOut = dataOut,
            Completion = new TaskCompletionSource<ScsiResult>(TaskCreationOptions.RunContinuationsAsynchronously),
            DataIn = new byte[Math.Max(expectedDataIn, 0)],
        };
        _pending[itt] = pending;
        var unsolicitedSent = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        pending.DataOutChain = unsolicitedSent.Task;   // before the command goes out: its R2Ts wait for the unsolicited data
        uint expected = expectedLengthOverride ?? (uint)(dataOut?.Length ?? expectedDataIn);
        int immediateLength = 0;
        bool write = dataOut is not null;
        if (write && NegotiatedBool("ImmediateData", true))
            immediateLength = Math.Min(dataOut!.Length, Math.Min(NegotiatedInt("FirstBurstLength", 65536), _targetMaxRecv));
        immediateLength = (int)Math.Min(immediateLength, expected);
        bool unsolicited = write && !NegotiatedBool("InitialR2T", true) && immediateLength < Math.Min(expected, (uint)NegotiatedInt("FirstBurstLength", 65536));

        var header = new byte[48];
        header[0] = (byte)(0x01 | (immediate ? 0x40 : 0));
        header[1] = (byte)((unsolicited ? 0 : 0x80) | (write ? 0x20 : 0) | (expectedDataIn > 0 ? 0x40 : 0) | (attribute & 7));
        BinaryPrimitives.WriteUInt64BigEndian(header.AsSpan(8), EncodeLun(lun));
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(16), itt);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), expected);
        cdb.AsSpan(0, Math.Min(16, cdb.Length)).CopyTo(header.AsSpan(32));
        try
        {
            if (!immediate) await _commandOrder.WaitAsync(cancellationToken);
            try
            {
                // The target silently ignores commands beyond MaxCmdSN (RFC 7143 §4.2.2.1): wait for the window.
                if (!immediate) await WaitForCommandWindowAsync(cancellationToken);
                BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(24), immediate ? _cmdSN : _cmdSN++);
                BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(28), _expStatSN);
                await SendAsync(header, write ? dataOut.AsMemory(0, immediateLength) : default, cancellationToken);
            }
            finally
            {
                if (!immediate) _commandOrder.Release();
            }
            if (unsolicited)
            {
                int end = (int)Math.Min(Math.Min(expected, (uint)NegotiatedInt("FirstBurstLength", 65536)), (uint)dataOut!.Length);
                await SendDataOutAsync(itt, lun, 0xFFFFFFFF, dataOut, immediateLength, end - immediateLength, cancellationToken);
            }
        }
        finally
        {
            unsolicitedSent.TrySetResult();
        }
        using var registration = cancellationToken.Register(() => pending.Completion.TrySetCanceled());
        return await pending.Completion.Task;
    }

    private async Task SendDataOutAsync(uint itt, ulong lun, uint ttt, byte[] data, int offset, int length, CancellationToken cancellationToken)
    {
        uint dataSN = 0;
        int segment = _targetMaxRecv;
        int end = offset + length;
        for (int position = offset; position < end; position += segment)
        {
            int n = Math.Min(segment, end - position);
            var header = new byte[48];
            header[0] = 0x05;
            header[1] = (byte)(position + n >= end ? 0x80 : 0);
            BinaryPrimitives.WriteUInt64BigEndian(header.AsSpan(8), EncodeLun(lun));
            BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(16), itt);
            BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), ttt);
            BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(28), _expStatSN);
            BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(36), dataSN++);
            BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(40), (uint)position);
            await SendAsync(header, data.AsMemory(position, n), cancellationToken);
        }
    }

    /// <summary>Waits (up to 10 s, or until the connection closes) until the next CmdSN is within MaxCmdSN.</summary>
    private async Task WaitForCommandWindowAsync(CancellationToken cancellationToken)
    {
        long deadline = Environment.TickCount64 + 10_000;
        while ((int)(_cmdSN - MaxCmdSN) > 0 && !Closed && Environment.TickCount64 < deadline)
            await Task.Delay(1, cancellationToken);
    }

    private async Task SendSolicitedAsync(Task previous, uint itt, ulong lun, uint ttt, byte[] data, int offset, int length)
    {
        try { await previous; } catch { /* the earlier sequence failed; the command fails on its own */ }
        await SendDataOutAsync(itt, lun, ttt, data, offset, length, CancellationToken.None);
    }

    public static ulong EncodeLun(ulong lun) => lun < 256 ? lun << 48 : (0x4000UL | lun) << 48;

    /// <summary>What initiators do after login: TEST UNIT READY until no unit attention is pending.</summary>
    public async Task ClearUnitAttentionsAsync(ulong lun = 0)
    {
        for (int i = 0; i < 10; i++)
        {
            var result = await ExecuteAsync([0x00, 0, 0, 0, 0, 0], lun);
            if (result.Good) return;
            if (result.SenseKey != 6) throw new InvalidOperationException($"TEST UNIT READY failed: status {result.Status}, sense {result.SenseKey:x}/{result.AscAscq:x4}");
        }
        throw new InvalidOperationException("unit attentions did not clear");
    }

    // ---------------------------------------------------------------- other requests

    /// <summary>Sends a task management request; returns the TMF response code.</summary>
    public async Task<byte> TaskManagementAsync(byte function, ulong lun, uint referencedItt = 0xFFFFFFFF, uint referencedCmdSN = 0)
    {
        uint itt = NextItt();
        var completion = new TaskCompletionSource<ScsiResult>(TaskCreationOptions.RunContinuationsAsynchronously);
        _pending[itt] = new PendingCommand { Itt = itt, Lun = lun, DataOut = null, Completion = completion };
        var header = new byte[48];
        header[0] = 0x42;
        header[1] = (byte)(0x80 | function);
        BinaryPrimitives.WriteUInt64BigEndian(header.AsSpan(8), EncodeLun(lun));
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(16), itt);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), referencedItt);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(24), _cmdSN);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(28), _expStatSN);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(32), referencedCmdSN);
        await SendAsync(header, default);
        var result = await completion.Task;
        return result.Status;
    }

    /// <summary>NOP-Out ping with data; returns the echoed data.</summary>
    public async Task<byte[]> PingAsync(byte[] data, bool immediate = true)
    {
        uint itt = NextItt();
        var completion = new TaskCompletionSource<ScsiResult>(TaskCreationOptions.RunContinuationsAsynchronously);
        _pending[itt] = new PendingCommand { Itt = itt, Lun = 0, DataOut = null, Completion = completion };
        var header = new byte[48];
        header[0] = (byte)(immediate ? 0x40 : 0x00);
        header[1] = 0x80;
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(16), itt);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), 0xFFFFFFFF);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(24), immediate ? _cmdSN : _cmdSN++);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(28), _expStatSN);
        await SendAsync(header, data);
        return (await completion.Task).DataIn;
    }

    /// <summary>Text request (SendTargets and the like); follows continuations and returns all the keys.</summary>
    public async Task<List<KeyValuePair<string, string>>> TextAsync(IEnumerable<(string Key, string Value)> keys)
    {
        var all = new List<byte>();
        uint ttt = 0xFFFFFFFF;
        byte[] data = EncodeText(keys);
        while (true)
        {
            uint itt = NextItt();
            var completion = new TaskCompletionSource<ScsiResult>(TaskCreationOptions.RunContinuationsAsynchronously);
            _pending[itt] = new PendingCommand { Itt = itt, Lun = 0, DataOut = null, Completion = completion };
            var header = new byte[48];
            header[0] = 0x44;
            header[1] = 0x80;
            BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(16), itt);
            BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), ttt);
            BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(24), _cmdSN);
            BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(28), _expStatSN);
            await SendAsync(header, data);
            var result = await completion.Task;
            all.AddRange(result.DataIn);
            if (result.Flags == 0x80) break;
            ttt = result.Residual;   // the continuation's target transfer tag
            data = [];
        }
        var list = new List<KeyValuePair<string, string>>();
        foreach (var pair in Encoding.UTF8.GetString(all.ToArray()).Split('\0', StringSplitOptions.RemoveEmptyEntries))
        {
            int eq = pair.IndexOf('=');
            list.Add(new(pair[..eq], pair[(eq + 1)..]));
        }
        return list;
    }

    /// <summary>Logout (reason 0: close the session); returns the logout response code.</summary>
    public async Task<byte> LogoutAsync(byte reason = 0)
    {
        uint itt = NextItt();
        var completion = new TaskCompletionSource<ScsiResult>(TaskCreationOptions.RunContinuationsAsynchronously);
        _pending[itt] = new PendingCommand { Itt = itt, Lun = 0, DataOut = null, Completion = completion };
        var header = new byte[48];
        header[0] = 0x46;
        header[1] = (byte)(0x80 | reason);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(16), itt);
        BinaryPrimitives.WriteUInt16BigEndian(header.AsSpan(20), _options.Cid);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(24), _cmdSN);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(28), _expStatSN);
        await SendAsync(header, default);
        return (await completion.Task).Status;
    }

    // ---------------------------------------------------------------- raw access (fuzzing)

    /// <summary>Sends bytes exactly as given (no digests added).</summary>
    public async Task SendRawAsync(ReadOnlyMemory<byte> bytes)
    {
        await _sendLock.WaitAsync();
        try
        {
            await _output.WriteAsync(bytes);
        }
        finally
        {
            _sendLock.Release();
        }
    }

    /// <summary>Next PDU that no pending request claimed (Reject, Async, NOP-In ping, stray responses); null on timeout or close.</summary>
    public async Task<ReceivedPdu?> NextUnsolicitedAsync(TimeSpan timeout)
    {
        if (!await _unsolicitedSignal.WaitAsync(timeout)) return null;
        return _unsolicited.TryDequeue(out var pdu) ? pdu : null;
    }

    public uint NextItt() => Interlocked.Increment(ref _itt);
    public uint CmdSN { get => _cmdSN; set => _cmdSN = value; }
    public uint ExpStatSN => _expStatSN;

    /// <summary>Builds a header with the sequence numbers of this session filled in (for hand-made PDUs).</summary>
    public byte[] NewHeader(byte opcode, byte flags, uint itt, bool immediate = false)
    {
        var header = new byte[48];
        header[0] = (byte)(opcode | (immediate ? 0x40 : 0));
        header[1] = flags;
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(16), itt);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(24), _cmdSN);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(28), _expStatSN);
        return header;
    }

    // ---------------------------------------------------------------- wire

    public async Task SendAsync(byte[] header, ReadOnlyMemory<byte> data, CancellationToken cancellationToken = default)
    {
        HeaderLength(header, data.Length);
        await _sendLock.WaitAsync(cancellationToken);
        try
        {
            _output.Write(header);
            if (_headerDigest)
            {
                Span<byte> digest = stackalloc byte[4];
                BinaryPrimitives.WriteUInt32LittleEndian(digest, Crc32C.Compute(header));
                _output.Write(digest);
            }
            if (data.Length > 0)
            {
                _output.Write(data.Span);
                int pad = (4 - (data.Length & 3)) & 3;
                Span<byte> padding = stackalloc byte[4];
                padding.Clear();
                _output.Write(padding.Slice(0, pad));
                if (_dataDigest)
                {
                    uint crc = Crc32C.Append(Crc32C.Seed, data.Span);
                    crc = Crc32C.Append(crc, padding.Slice(0, pad)) ^ Crc32C.Seed;
                    Span<byte> digest = stackalloc byte[4];
                    BinaryPrimitives.WriteUInt32LittleEndian(digest, crc);
                    _output.Write(digest);
                }
            }
            await _output.FlushAsync(cancellationToken);
        }
        finally
        {
            _sendLock.Release();
        }
    }

    private static void HeaderLength(byte[] header, int length)
    {
        header[5] = (byte)(length >> 16);
        header[6] = (byte)(length >> 8);
        header[7] = (byte)length;
    }

    private async Task<ReceivedPdu?> ReadPduAsync(CancellationToken cancellationToken)
    {
        while (true)
        {
            ReadResult result;
            try
            {
                result = await _input.ReadAsync(cancellationToken);
            }
            catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException)
            {
                if (!_stop.IsCancellationRequested) Reset = true;
                return null;
            }
            var buffer = result.Buffer;
            if (buffer.Length >= 48)
            {
                var header = buffer.Slice(0, 48).ToArray();
                int ahs = header[4] * 4;
                int dataLength = (header[5] << 16) | (header[6] << 8) | header[7];
                int headerDigest = _headerDigest ? 4 : 0;
                int padded = (dataLength + 3) & ~3;
                int dataDigest = _dataDigest && dataLength > 0 ? 4 : 0;
                long total = 48 + ahs + headerDigest + padded + dataDigest;
                if (buffer.Length >= total)
                {
                    if (_headerDigest)
                    {
                        uint expected = Crc32C.Compute(buffer.Slice(0, 48 + ahs).ToArray());
                        uint got = BinaryPrimitives.ReadUInt32LittleEndian(buffer.Slice(48 + ahs, 4).ToArray());
                        if (expected != got) throw new InvalidDataException("bad header digest from target");
                    }
                    var data = buffer.Slice(48 + ahs + headerDigest, dataLength).ToArray();
                    if (dataDigest != 0)
                    {
                        uint expected = Crc32C.Compute(buffer.Slice(48 + ahs + headerDigest, padded).ToArray());
                        uint got = BinaryPrimitives.ReadUInt32LittleEndian(buffer.Slice(48 + ahs + headerDigest + padded, 4).ToArray());
                        if (expected != got) throw new InvalidDataException("bad data digest from target");
                    }
                    _input.AdvanceTo(buffer.GetPosition(total));
                    return new ReceivedPdu(header, data);
                }
            }
            if (result.IsCompleted || result.IsCanceled)
            {
                _input.AdvanceTo(buffer.End);
                return null;
            }
            _input.AdvanceTo(buffer.Start, buffer.End);
        }
    }

    private async Task ReceiveLoopAsync()
    {
        try
        {
            while (!_stop.IsCancellationRequested)
            {
                var pdu = await ReadPduAsync(_stop.Token);
                if (pdu is null) break;
                Handle(pdu);
            }
        }
        catch (OperationCanceledException) { }
        catch (InvalidDataException) { }
        if (CloseOnEndOfStream && !_stop.IsCancellationRequested && _socket is not null)
            try { _socket.Shutdown(SocketShutdown.Send); } catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
        Closed = true;
        foreach (var pending in _pending.Values)
            pending.Completion.TrySetException(new IOException("connection closed"));
        _unsolicitedSignal.Release(1000);
    }

    private void Handle(ReceivedPdu pdu)
    {
        var h = pdu.Header;
        byte opcode = (byte)(h[0] & 0x3F);
        uint itt = BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(16));
        if (opcode is not (0x25 or 0x31) || (h[1] & 0x01) != 0)
        {
            // Status-bearing PDUs advance ExpStatSN (Data-In only with the S bit).
            uint statSN = BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(24));
            if (!(opcode == 0x20 && itt == 0xFFFFFFFF)) _expStatSN = statSN + 1;
        }
        ExpCmdSN = BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(28));
        MaxCmdSN = BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(32));
        switch (opcode)
        {
            case 0x25:   // Data-In
            {
                if (!_pending.TryGetValue(itt, out var pending)) break;
                int offset = (int)BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(40));
                if (offset + pdu.Data.Length > pending.DataIn.Length) Array.Resize(ref pending.DataIn, offset + pdu.Data.Length);
                pdu.Data.CopyTo(pending.DataIn, offset);
                pending.DataInLength = Math.Max(pending.DataInLength, offset + pdu.Data.Length);
                if ((h[1] & 0x01) != 0 && _pending.TryRemove(itt, out _))
                {
                    uint residual = BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(44));
                    pending.Completion.TrySetResult(new ScsiResult(h[3], [], pending.DataIn.AsSpan(0, pending.DataInLength).ToArray(), h[1], residual, false, 0));
                }
                break;
            }
            case 0x21:   // SCSI Response
            {
                if (!_pending.TryRemove(itt, out var pending)) { Unsolicited(pdu); break; }
                byte[] sense = [];
                if (pdu.Data.Length >= 2)
                {
                    int senseLength = BinaryPrimitives.ReadUInt16BigEndian(pdu.Data);
                    sense = pdu.Data.AsSpan(2, Math.Min(senseLength, pdu.Data.Length - 2)).ToArray();
                }
                uint residual = BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(44));
                pending.Completion.TrySetResult(new ScsiResult(h[3], sense, pending.DataIn.AsSpan(0, pending.DataInLength).ToArray(), h[1], residual, false, 0));
                break;
            }
            case 0x31:   // R2T
            {
                if (!_pending.TryGetValue(itt, out var pending) || pending.DataOut is null) break;
                uint ttt = BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(20));
                int offset = (int)BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(40));
                int length = (int)BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(44));
                length = Math.Min(length, pending.DataOut.Length - offset);
                pending.DataOutChain = SendSolicitedAsync(pending.DataOutChain, itt, pending.Lun, ttt, pending.DataOut, offset, length);
                break;
            }
            case 0x22:   // TMF response
            case 0x26:   // Logout response
            {
                if (_pending.TryRemove(itt, out var pending))
                    pending.Completion.TrySetResult(new ScsiResult(h[2], [], [], h[1], 0, false, 0));
                else Unsolicited(pdu);
                break;
            }
            case 0x24:   // Text response
            {
                if (_pending.TryRemove(itt, out var pending))
                    pending.Completion.TrySetResult(new ScsiResult(0, [], pdu.Data, (byte)(h[1] & 0xC0), BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(20)), false, 0));
                else Unsolicited(pdu);
                break;
            }
            case 0x20:   // NOP-In
            {
                if (itt != 0xFFFFFFFF && _pending.TryRemove(itt, out var pending))
                {
                    pending.Completion.TrySetResult(new ScsiResult(0, [], pdu.Data, h[1], 0, false, 0));
                    break;
                }
                Interlocked.Increment(ref PingsReceived);
                if (AnswerPings && itt == 0xFFFFFFFF)
                {
                    var reply = new byte[48];
                    reply[0] = 0x40;
                    reply[1] = 0x80;
                    BinaryPrimitives.WriteUInt32BigEndian(reply.AsSpan(16), 0xFFFFFFFF);
                    h.AsSpan(20, 4).CopyTo(reply.AsSpan(20));
                    BinaryPrimitives.WriteUInt32BigEndian(reply.AsSpan(24), _cmdSN);
                    BinaryPrimitives.WriteUInt32BigEndian(reply.AsSpan(28), _expStatSN);
                    _ = SendAsync(reply, default);
                }
                Unsolicited(pdu);
                break;
            }
            case 0x3F:   // Reject: fail the request whose header it echoes
            {
                Unsolicited(pdu);
                if (pdu.Data.Length >= 48)
                {
                    uint rejectedItt = BinaryPrimitives.ReadUInt32BigEndian(pdu.Data.AsSpan(16));
                    if (_pending.TryRemove(rejectedItt, out var pending))
                        pending.Completion.TrySetResult(new ScsiResult(0xFF, [], [], 0, 0, true, h[2]));
                }
                break;
            }
            default:
                Unsolicited(pdu);
                break;
        }
    }

    private void Unsolicited(ReceivedPdu pdu)
    {
        _unsolicited.Enqueue(pdu);
        _unsolicitedSignal.Release();
    }

    private bool NegotiatedBool(string key, bool fallback) => NegotiatedKeys.TryGetValue(key, out var v) ? v == "Yes" : fallback;
    private int NegotiatedInt(string key, int fallback) => NegotiatedKeys.TryGetValue(key, out var v) && int.TryParse(v, out int n) ? n : fallback;

    /// <summary>Drops the TCP connection without logging out.</summary>
    public void Abort()
    {
        _socket?.Close();
        _stop.Cancel();
    }

    /// <summary>
    /// Closes the way initiators do: the send side first (FIN), then, once the target has ended its side too (or
    /// after a few seconds), the socket.
    /// </summary>
    public async ValueTask DisposeAsync()
    {
        if (_socket is not null && _receiveLoop is not null)
        {
            try { _socket.Shutdown(SocketShutdown.Send); } catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
            try { await _receiveLoop.WaitAsync(TimeSpan.FromSeconds(5)); } catch { }
        }
        _stop.Cancel();
        try { await _output.CompleteAsync(); } catch { }
        _socket?.Dispose();
        if (_receiveLoop is not null) try { await _receiveLoop; } catch { }
    }
}
