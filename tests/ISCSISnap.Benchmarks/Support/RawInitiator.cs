using System.Buffers;
using System.Buffers.Binary;
using System.IO.Pipelines;
using System.Text;
using System.Threading.Tasks.Sources;
using ISCSISnap.Target.Iscsi.Pdus;

namespace ISCSISnap.Benchmarks.Support;

/// <summary>
/// A minimal iSCSI initiator over raw pipes, for benchmarks: one Login PDU (CSG=1, NSG=3, T=1; it answers target
/// offers if any), TEST UNIT READY until GOOD, then READ(10)/WRITE(10) round trips that allocate nothing once warm:
/// headers are written straight into the pipe, responses are framed in place with <see cref="PduFramer"/> by a
/// long-lived pump (<see cref="StartPump"/>), operations complete through a reusable <see cref="IValueTaskSource"/>.
/// One operation at a time.
/// </summary>
public sealed class RawInitiator : IValueTaskSource
{
    public const int MaxBatch = 64;
    public const int MaxTransfer = 64 << 10;

    private readonly PipeReader _input;
    private readonly PipeWriter _output;
    private readonly FramingLimits _limits = new(HeaderDigest: false, DataDigest: false, MaxDataSegmentLength: 16 << 20);
    /// <summary>Where Data-In lands: one <see cref="MaxTransfer"/> slot per outstanding command.</summary>
    private readonly byte[] _dataIn = new byte[MaxBatch * MaxTransfer];
    private uint _itt = 0x100;
    private uint _cmdSN;
    private uint _expStatSN;
    private ManualResetValueTaskSourceCore<bool> _core = new() { RunContinuationsAsynchronously = false };
    private int _outstanding;
    private Task? _pump;
    private Exception? _fault;

    public RawInitiator(PipeReader input, PipeWriter output)
    {
        _input = input;
        _output = output;
    }

    /// <summary>Login PDUs the login took (1 unless the target made offers).</summary>
    public int LoginPdus { get; private set; }
    public uint ExpCmdSN { get; private set; }
    public uint MaxCmdSN { get; private set; }

    // ---------------------------------------------------------------- login (setup only: allocations do not matter)

    public async Task LoginAsync(string initiatorName, string targetName)
    {
        const ulong isid = 0x40_0000_00_0001UL;   // random-format ISID
        uint itt = _itt++;
        _cmdSN = 1;
        var keys = new List<(string Key, string Value)>
        {
            ("InitiatorName", initiatorName),
            ("TargetName", targetName),
            ("SessionType", "Normal"),
            ("MaxRecvDataSegmentLength", "262144"),
            // What the target would otherwise offer (it keeps no state for reconnects), so one PDU completes the login.
            ("DefaultTime2Retain", "0"),
        };
        for (int round = 0; round < 4; round++)
        {
            var text = Encode(keys);
            var h = new byte[Bhs.Size];
            h[0] = 0x40 | (byte)Opcode.LoginRequest;   // immediate
            h[1] = 0x80 | (1 << 2) | 3;                  // T=1, CSG=1 (operational), NSG=3 (full feature)
            HeaderWriter.DataSegmentLength(h, text.Length);
            for (int i = 0; i < 6; i++) h[8 + i] = (byte)(isid >> (40 - 8 * i));
            HeaderWriter.U32(h, 16, itt);
            HeaderWriter.U32(h, 24, _cmdSN);
            HeaderWriter.U32(h, 28, _expStatSN);
            WritePdu(h, text);
            await _output.FlushAsync();
            LoginPdus++;

            var (header, data) = await ReadOnePduAsync();
            if (header.Opcode != Opcode.LoginResponse) throw new IOException($"expected a Login Response, got {header.Opcode}");
            ushort status = header.U16(36);
            if (status != 0) throw new IOException($"login failed: status 0x{status:x4} ({Encoding.UTF8.GetString(data)})");
            _expStatSN = header.U32(24) + 1;
            ExpCmdSN = header.U32(28);
            MaxCmdSN = header.U32(32);
            if ((header.Flags & 0x80) != 0 && (header.Flags & 0x03) == 3) return;

            // The target made offers of its own (stricter defaults): accept each as offered, then ask again.
            var sent = keys.Select(k => k.Key).ToHashSet();
            keys = Decode(data).Where(k => !sent.Contains(k.Key) && k.Key is not ("TargetPortalGroupTag" or "TargetAlias" or "MaxRecvDataSegmentLength")).ToList();
        }
        throw new IOException("login did not reach full feature phase");
    }

    /// <summary>TEST UNIT READY until GOOD: the first command of a new nexus gets POWER ON/RESET UNIT ATTENTION.</summary>
    public async Task ClearUnitAttentionsAsync()
    {
        var cdb = new byte[16];   // TEST UNIT READY: all zeros
        for (int i = 0; i < 8; i++)
        {
            uint itt = WriteCommand(cdb, expectedLength: 0, read: false, write: false, ReadOnlySpan<byte>.Empty);
            await _output.FlushAsync();
            var (header, _) = await ReadOnePduAsync();
            if (header.Opcode != Opcode.ScsiResponse || header.InitiatorTaskTag != itt) throw new IOException($"unexpected {header.Opcode}");
            UpdateSequence(header);
            if (header[3] == 0) return;
        }
        throw new IOException("TEST UNIT READY never returned GOOD");
    }

    public async Task CloseAsync()
    {
        await _output.CompleteAsync();
        if (_pump is not null) await Task.WhenAny(_pump, Task.Delay(TimeSpan.FromSeconds(5)));
        await _input.CompleteAsync();
    }

    // ---------------------------------------------------------------- measured operations

    /// <summary>
    /// Starts the response pump: one long-lived async loop reading the target's pipe. Awaiting a pipe read from an
    /// async method hands the state machine itself to the thread pool (no work item is allocated), and that state
    /// machine is allocated once, so the pump allocates nothing per response; operations complete through this
    /// object's reusable <see cref="IValueTaskSource"/>, whichever threads they start and finish on.
    /// </summary>
    public void StartPump() => _pump ??= PumpAsync();

    /// <summary>Sends one READ(10) and completes when its Data-In (with collapsed status) or SCSI Response arrived.</summary>
    public ValueTask ReadAsync(uint lba, int bytes)
    {
        QueueRead(lba, bytes);
        return Begin(1);
    }

    /// <summary>
    /// Sends <paramref name="count"/> READ(10)s of consecutive ranges from <paramref name="firstLba"/> (wrapping to 0 at
    /// <paramref name="lbaLimit"/>) in one flush; completes when all of them have their status.
    /// </summary>
    public ValueTask ReadBatchAsync(uint firstLba, int bytes, int count, uint lbaLimit)
    {
        uint blocks = (uint)(bytes / BenchTarget.BlockSize);
        uint lba = firstLba;
        for (int i = 0; i < count; i++)
        {
            if (lba + blocks > lbaLimit) lba = 0;
            QueueRead(lba, bytes);
            lba += blocks;
        }
        return Begin(count);
    }

    /// <summary>Sends one WRITE(10) with all of its data as immediate data; completes with its SCSI Response.</summary>
    public ValueTask WriteAsync(uint lba, ReadOnlySpan<byte> data)
    {
        Span<byte> cdb = stackalloc byte[16];
        cdb.Clear();
        Cdb.Write10(cdb, lba, (ushort)(data.Length / BenchTarget.BlockSize));
        WriteCommand(cdb, (uint)data.Length, read: false, write: true, data);
        return Begin(1);
    }

    private void QueueRead(uint lba, int bytes)
    {
        Span<byte> cdb = stackalloc byte[16];
        cdb.Clear();
        Cdb.Read10(cdb, lba, (ushort)(bytes / BenchTarget.BlockSize));
        WriteCommand(cdb, (uint)bytes, read: true, write: false, ReadOnlySpan<byte>.Empty);
    }

    /// <summary>Flushes the commands written so far and returns a ValueTask that completes when <paramref name="count"/> of them did.</summary>
    private ValueTask Begin(int count)
    {
        if (_pump is null) throw new InvalidOperationException("StartPump first");
        if (Volatile.Read(ref _fault) is { } fault) return ValueTask.FromException(fault);
        _core.Reset();
        Volatile.Write(ref _outstanding, count);
        var flush = _output.FlushAsync();
        // The pipe to the target pauses only at 64 MiB, so the flush completes at once.
        if (!flush.IsCompletedSuccessfully) flush.AsTask().GetAwaiter().GetResult();
        return new ValueTask(this, _core.Version);
    }

    private async Task PumpAsync()
    {
        try
        {
            while (true)
            {
                var result = await _input.ReadAsync().ConfigureAwait(false);
                var buffer = result.Buffer;
                int completed = Consume(ref buffer);
                _input.AdvanceTo(buffer.Start, buffer.End);
                // Completing runs the waiter inline, which may send the next operation: everything is consumed by now.
                if (completed > 0 && Interlocked.Add(ref _outstanding, -completed) == 0) _core.SetResult(true);
                if (result.IsCompleted || result.IsCanceled) break;
            }
            Fail(new IOException("the target closed the connection"));
        }
        catch (Exception e)
        {
            Fail(e);
        }
    }

    private void Fail(Exception e)
    {
        Volatile.Write(ref _fault, e);
        if (Interlocked.Exchange(ref _outstanding, 0) > 0) _core.SetException(e);
    }

    void IValueTaskSource.GetResult(short token) => _core.GetResult(token);
    ValueTaskSourceStatus IValueTaskSource.GetStatus(short token) => _core.GetStatus(token);
    void IValueTaskSource.OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
        _core.OnCompleted(continuation, state, token, flags);

    /// <summary>Frames every whole PDU in <paramref name="buffer"/>; returns how many commands completed.</summary>
    private int Consume(ref ReadOnlySequence<byte> buffer)
    {
        int completed = 0;
        while (PduFramer.TryFrame(buffer, _limits, out var pdu, out var fault) is var framing && framing != FrameResult.NeedMoreData)
        {
            if (framing == FrameResult.Invalid) throw new IOException("bad PDU from the target: " + fault);
            switch (pdu.Header.Opcode)
            {
                case Opcode.ScsiDataIn:
                {
                    int slot = (int)(pdu.Header.InitiatorTaskTag % MaxBatch);
                    long offset = pdu.Header.BufferOffset;
                    pdu.Data.CopyTo(_dataIn.AsSpan(slot * MaxTransfer + (int)offset));
                    if ((pdu.Header.Flags & 0x01) != 0)
                    {
                        if (pdu.Header[3] != 0) throw new IOException($"status 0x{pdu.Header[3]:x2}");
                        UpdateSequence(pdu.Header);
                        completed++;
                    }
                    break;
                }
                case Opcode.ScsiResponse:
                    if (pdu.Header[2] != 0 || pdu.Header[3] != 0) throw new IOException($"response 0x{pdu.Header[2]:x2} status 0x{pdu.Header[3]:x2}");
                    UpdateSequence(pdu.Header);
                    completed++;
                    break;
                case Opcode.NopIn:
                case Opcode.AsyncMessage:
                    break;
                default:
                    throw new IOException($"unexpected {pdu.Header.Opcode} (reason 0x{pdu.Header[2]:x2})");
            }
            buffer = buffer.Slice(pdu.End);
        }
        return completed;
    }

    private void UpdateSequence(in Bhs header)
    {
        _expStatSN = header.U32(24) + 1;
        ExpCmdSN = header.U32(28);
        MaxCmdSN = header.U32(32);
    }

    /// <summary>Writes a SCSI Command PDU (and its immediate data) into the pipe without flushing; returns its ITT.</summary>
    private uint WriteCommand(ReadOnlySpan<byte> cdb16, uint expectedLength, bool read, bool write, ReadOnlySpan<byte> immediate)
    {
        uint itt = _itt++;
        if (itt == 0xFFFFFFFF) itt = _itt++;
        int padded = (immediate.Length + 3) & ~3;
        var span = _output.GetSpan(Bhs.Size + padded);
        var h = span.Slice(0, Bhs.Size);
        h.Clear();
        h[0] = (byte)Opcode.ScsiCommand;
        h[1] = (byte)(0x80 | (read ? 0x40 : 0) | (write ? 0x20 : 0) | 0x01);   // F, R, W, SIMPLE
        HeaderWriter.DataSegmentLength(h, immediate.Length);
        HeaderWriter.U32(h, 16, itt);
        HeaderWriter.U32(h, 20, expectedLength);
        HeaderWriter.U32(h, 24, _cmdSN++);
        HeaderWriter.U32(h, 28, _expStatSN);
        cdb16.CopyTo(h.Slice(32, 16));
        immediate.CopyTo(span.Slice(Bhs.Size));
        span.Slice(Bhs.Size + immediate.Length, padded - immediate.Length).Clear();
        _output.Advance(Bhs.Size + padded);
        return itt;
    }

    private void WritePdu(ReadOnlySpan<byte> header, ReadOnlySpan<byte> data)
    {
        int padded = (data.Length + 3) & ~3;
        var span = _output.GetSpan(header.Length + padded);
        header.CopyTo(span);
        data.CopyTo(span.Slice(header.Length));
        span.Slice(header.Length + data.Length, padded - data.Length).Clear();
        _output.Advance(header.Length + padded);
    }

    private async Task<(Bhs Header, byte[] Data)> ReadOnePduAsync()
    {
        while (true)
        {
            var result = await _input.ReadAsync();
            var buffer = result.Buffer;
            var framing = PduFramer.TryFrame(buffer, _limits, out var pdu, out var fault);
            if (framing == FrameResult.Invalid) throw new IOException("bad PDU from the target: " + fault);
            if (framing == FrameResult.Complete)
            {
                var data = pdu.Data.ToArray();
                var header = pdu.Header;
                _input.AdvanceTo(pdu.End);
                return (header, data);
            }
            _input.AdvanceTo(buffer.Start, buffer.End);
            if (result.IsCompleted) throw new IOException("the target closed the connection");
        }
    }

    private static byte[] Encode(IEnumerable<(string Key, string Value)> keys)
    {
        var text = new MemoryStream();
        foreach (var (key, value) in keys)
        {
            text.Write(Encoding.UTF8.GetBytes($"{key}={value}"));
            text.WriteByte(0);
        }
        return text.ToArray();
    }

    private static List<(string Key, string Value)> Decode(byte[] data) =>
        Encoding.UTF8.GetString(data).Split('\0', StringSplitOptions.RemoveEmptyEntries)
            .Select(pair => pair.Split('=', 2))
            .Select(kv => (kv[0], kv.Length > 1 ? kv[1] : ""))
            .ToList();
}
