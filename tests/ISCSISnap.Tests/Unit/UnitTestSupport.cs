using System.Buffers;
using System.Buffers.Binary;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Target.Scsi;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary>Multi-segment <see cref="ReadOnlySequence{T}"/> builders.</summary>
internal static class Sequences
{
    /// <summary>Splits <paramref name="data"/> into segments of <paramref name="segmentSize"/> bytes (each a separate array).</summary>
    public static ReadOnlySequence<byte> Split(byte[] data, int segmentSize)
    {
        var pieces = new List<byte[]>();
        for (int offset = 0; offset < data.Length; offset += segmentSize)
            pieces.Add(data.AsSpan(offset, Math.Min(segmentSize, data.Length - offset)).ToArray());
        return FromPieces(pieces.ToArray());
    }

    /// <summary>One segment per piece, in order.</summary>
    public static ReadOnlySequence<byte> FromPieces(params byte[][] pieces)
    {
        Segment? first = null, last = null;
        foreach (var piece in pieces)
        {
            var segment = new Segment(piece, last is null ? 0 : last.RunningIndex + last.Memory.Length);
            if (last is null) first = segment;
            else last.SetNext(segment);
            last = segment;
        }
        if (first is null) return ReadOnlySequence<byte>.Empty;
        return new ReadOnlySequence<byte>(first, 0, last!, last!.Memory.Length);
    }

    private sealed class Segment : ReadOnlySequenceSegment<byte>
    {
        public Segment(ReadOnlyMemory<byte> memory, long runningIndex)
        {
            Memory = memory;
            RunningIndex = runningIndex;
        }

        public void SetNext(Segment next) => Next = next;
    }
}

/// <summary>What a command ended with: status, sense bytes and Data-In, copied out before the command is recycled.</summary>
internal sealed record ScsiResult(ScsiStatus Status, byte[] Sense, byte[] DataIn, bool CompletedInBegin = false)
{
    public bool Good => Status == ScsiStatus.Good;
    public bool DescriptorFormat => Sense.Length > 0 && (Sense[0] & 0x7F) is 0x72 or 0x73;
    public SenseKey Key => Sense.Length == 0 ? SenseKey.NoSense : (SenseKey)((DescriptorFormat ? Sense[1] : Sense[2]) & 0x0F);
    public byte Asc => Sense.Length == 0 ? (byte)0 : DescriptorFormat ? Sense[2] : Sense[12];
    public byte Ascq => Sense.Length == 0 ? (byte)0 : DescriptorFormat ? Sense[3] : Sense[13];

    /// <summary>Asserts CHECK CONDITION with exactly this sense key and ASC/ASCQ.</summary>
    public void AssertSense(SenseKey key, byte asc, byte ascq)
    {
        Assert.True(Status == ScsiStatus.CheckCondition, $"expected CHECK CONDITION {key} {asc:X2}/{ascq:X2}, got {Status}");
        Assert.Equal((key, asc, ascq), (Key, Asc, Ascq));
    }

    public void AssertSense(SenseCode code) => AssertSense(code.Key, code.Asc, code.Ascq);

    public void AssertGood() =>
        Assert.True(Good, $"expected GOOD, got {Status}" + (Sense.Length > 0 ? $" {Key} {Asc:X2}/{Ascq:X2}" : ""));

    public override string ToString() => $"{Status} {Key} {Asc:X2}/{Ascq:X2} ({DataIn.Length} bytes in)";
}

/// <summary>
/// A real <see cref="LogicalUnit"/> over a real sparse <see cref="FileBlockDevice"/> in a temporary directory,
/// driven the way the transport drives it: Begin, Data-Out (buffered or streamed), ExecuteAsync, Release.
/// </summary>
internal sealed class LuHarness : IAsyncDisposable
{
    public const string TargetName = "iqn.2026-11.io.iscsisnap.test:unit";

    private readonly TempDirectory? _ownedDirectory;

    private LuHarness(TempDirectory? ownedDirectory, string imagePath, FileBlockDevice device, LogicalUnit unit)
    {
        _ownedDirectory = ownedDirectory;
        ImagePath = imagePath;
        Device = device;
        Unit = unit;
    }

    public string ImagePath { get; }
    public FileBlockDevice Device { get; }
    public LogicalUnit Unit { get; }
    public int BlockSize => Unit.BlockSize;
    public long BlockCount => Unit.BlockCount;

    /// <summary>A new unit over a new sparse image (16 MiB of 512-byte blocks unless told otherwise).</summary>
    public static LuHarness Create(long bytes = 16L << 20, int blockSize = 512, LogicalUnitOptions? options = null,
        IPersistentReservationStore? store = null, Guid? unitId = null)
    {
        var directory = new TempDirectory();
        string path = Path.Combine(directory.Path, "lun.img");
        var device = FileBlockDevice.Create(path, bytes, blockSize);
        var unit = new LogicalUnit(new LogicalUnitIdentity(unitId ?? Guid.NewGuid()), device, options, store) { TargetName = TargetName };
        return new LuHarness(directory, path, device, unit);
    }

    /// <summary>A unit over an existing image that someone else owns (the directory is not deleted on dispose).</summary>
    public static LuHarness Open(string path, Guid unitId, IPersistentReservationStore? store = null, LogicalUnitOptions? options = null)
    {
        var device = FileBlockDevice.Open(path);
        var unit = new LogicalUnit(new LogicalUnitIdentity(unitId), device, options, store) { TargetName = TargetName };
        return new LuHarness(null, path, device, unit);
    }

    public static ItNexus Nexus(string initiatorName, ulong isid = 0x23D000000001) =>
        new(initiatorName, isid, TargetName, portalGroupTag: 1, relativeTargetPortId: 1);

    /// <summary>A nexus whose POWER ON/RESET unit attention has been reported (so later commands run normally).</summary>
    public async Task<ItNexus> ReadyNexusAsync(string initiatorName, ulong isid = 0x23D000000001)
    {
        var nexus = Nexus(initiatorName, isid);
        var first = await RunAsync(nexus, Cdb.TestUnitReady());
        first.AssertSense(SenseCode.PowerOnResetOccurred);
        (await RunAsync(nexus, Cdb.TestUnitReady())).AssertGood();
        return nexus;
    }

    /// <summary>
    /// Runs one command. Buffered Data-Out is copied into the command's buffer; streamed Data-Out is handed to
    /// <see cref="LogicalUnit.WriteStreamAsync"/> in pieces of <paramref name="streamPieces"/> bytes (one piece by default).
    /// </summary>
    public async Task<ScsiResult> RunAsync(ItNexus nexus, byte[] cdb, byte[]? dataOut = null, uint? expectedTransferLength = null,
        int[]? streamPieces = null, TaskAttribute attribute = TaskAttribute.Simple)
    {
        var command = new ScsiCommand();
        command.Reset();
        command.Nexus = nexus;
        command.Attribute = attribute;
        command.SetCdb(cdb);
        command.ExpectedTransferLength = expectedTransferLength ?? (uint)(dataOut?.Length ?? 0);
        command.TransportWrite = dataOut is not null;
        try
        {
            Unit.Begin(command);
            bool completedInBegin = command.Completed;   // refused before any Data-Out would be requested
            if (!command.Completed)
            {
                if (command.DataOutMode == DataOutMode.Buffered)
                {
                    int n = Math.Min(command.DataOutLength, dataOut?.Length ?? 0);
                    dataOut.AsSpan(0, n).CopyTo(command.Buffer);
                    command.DataOutReceived = n;
                }
                else if (command.DataOutMode == DataOutMode.Stream && dataOut is not null)
                {
                    int total = Math.Min(command.DataOutLength, dataOut.Length);
                    int offset = 0;
                    foreach (int piece in streamPieces ?? [total])
                    {
                        int n = Math.Min(piece, total - offset);
                        if (n <= 0) break;
                        await Unit.WriteStreamAsync(command, new ReadOnlySequence<byte>(dataOut, offset, n));
                        offset += n;
                    }
                    if (offset < total)
                        await Unit.WriteStreamAsync(command, new ReadOnlySequence<byte>(dataOut, offset, total - offset));
                }
                await Unit.ExecuteAsync(command);
            }
            Assert.True(command.Completed, "the logical unit did not complete the command");
            var dataIn = command.Buffer is { } buffer && command.DataInLength > 0 ? buffer.AsSpan(0, command.DataInLength).ToArray() : [];
            return new ScsiResult(command.Status, command.Sense.ToArray(), dataIn, completedInBegin);
        }
        finally
        {
            Unit.Release(command);
            command.Reset();
        }
    }

    /// <summary>Writes <paramref name="data"/> at <paramref name="lba"/> with WRITE(16), asserting GOOD.</summary>
    public async Task WriteAsync(ItNexus nexus, ulong lba, byte[] data)
    {
        (await RunAsync(nexus, Cdb.Write16(lba, (uint)(data.Length / BlockSize)), data)).AssertGood();
    }

    /// <summary>Reads <paramref name="blocks"/> blocks at <paramref name="lba"/> with READ(16), asserting GOOD.</summary>
    public async Task<byte[]> ReadAsync(ItNexus nexus, ulong lba, uint blocks)
    {
        var result = await RunAsync(nexus, Cdb.Read16(lba, blocks));
        result.AssertGood();
        Assert.Equal((int)blocks * BlockSize, result.DataIn.Length);
        return result.DataIn;
    }

    public async ValueTask DisposeAsync()
    {
        await Unit.DisposeAsync();
        _ownedDirectory?.Dispose();
    }

    public static byte[] Pattern(int length, int seed)
    {
        var data = new byte[length];
        new Random(seed).NextBytes(data);
        return data;
    }
}

/// <summary>CDB builders beyond those in <see cref="Cdb"/>.</summary>
internal static class ScsiCdb
{
    public static byte[] Read6(uint lba, byte blocks) => [0x08, (byte)((lba >> 16) & 0x1F), (byte)(lba >> 8), (byte)lba, blocks, 0];

    public static byte[] ModeSense6(byte page, byte pageControl = 0, bool dbd = false, byte allocation = 255, byte subpage = 0) =>
        [0x1A, (byte)(dbd ? 0x08 : 0), (byte)((pageControl << 6) | page), subpage, allocation, 0];

    public static byte[] ModeSense10(byte page, byte pageControl = 0, bool dbd = false, bool llbaa = false, ushort allocation = 1024) =>
        [0x5A, (byte)((dbd ? 0x08 : 0) | (llbaa ? 0x10 : 0)), (byte)((pageControl << 6) | page), 0, 0, 0, 0, (byte)(allocation >> 8), (byte)allocation, 0];

    public static byte[] ModeSelect6(int length, bool pageFormat = true, bool savePages = false) =>
        [0x15, (byte)((pageFormat ? 0x10 : 0) | (savePages ? 0x01 : 0)), 0, 0, (byte)length, 0];

    public static byte[] ModeSelect10(int length, bool pageFormat = true) =>
        [0x55, (byte)(pageFormat ? 0x10 : 0), 0, 0, 0, 0, 0, (byte)(length >> 8), (byte)length, 0];

    public static byte[] Reserve6() => [0x16, 0, 0, 0, 0, 0];
    public static byte[] Release6() => [0x17, 0, 0, 0, 0, 0];
    public static byte[] Reserve10() => [0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    public static byte[] Release10() => [0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0];

    public static byte[] PersistentReserveOut(byte serviceAction, PersistentReservationType type = PersistentReservationType.None, uint length = 24, byte scope = 0) =>
        [0x5F, serviceAction, (byte)((scope << 4) | (byte)type), 0, 0, (byte)(length >> 24), (byte)(length >> 16), (byte)(length >> 8), (byte)length, 0];

    public static byte[] PersistentReserveIn(byte serviceAction, ushort allocation = 4096) =>
        [0x5E, serviceAction, 0, 0, 0, 0, 0, (byte)(allocation >> 8), (byte)allocation, 0];

    /// <summary>The 24-byte basic PERSISTENT RESERVE OUT parameter list.</summary>
    public static byte[] PrParameters(ulong key, ulong serviceActionKey = 0, bool aptpl = false)
    {
        var p = new byte[24];
        BinaryPrimitives.WriteUInt64BigEndian(p, key);
        BinaryPrimitives.WriteUInt64BigEndian(p.AsSpan(8), serviceActionKey);
        if (aptpl) p[20] = 0x01;
        return p;
    }

    public static byte[] Unmap(int parameterListLength) =>
        [0x42, 0, 0, 0, 0, 0, 0, (byte)(parameterListLength >> 8), (byte)parameterListLength, 0];

    public static byte[] UnmapParameters(params (ulong Lba, uint Blocks)[] ranges)
    {
        var p = new byte[8 + 16 * ranges.Length];
        BinaryPrimitives.WriteUInt16BigEndian(p, (ushort)(p.Length - 2));
        BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(2), (ushort)(16 * ranges.Length));
        for (int i = 0; i < ranges.Length; i++)
        {
            BinaryPrimitives.WriteUInt64BigEndian(p.AsSpan(8 + 16 * i), ranges[i].Lba);
            BinaryPrimitives.WriteUInt32BigEndian(p.AsSpan(16 + 16 * i), ranges[i].Blocks);
        }
        return p;
    }

    public static byte[] GetLbaStatus(ulong lba, uint allocation = 1024)
    {
        var c = new byte[16];
        c[0] = 0x9E;
        c[1] = 0x12;
        BinaryPrimitives.WriteUInt64BigEndian(c.AsSpan(2), lba);
        BinaryPrimitives.WriteUInt32BigEndian(c.AsSpan(10), allocation);
        return c;
    }

    public static byte[] WriteSame16(ulong lba, uint blocks, bool unmap = false, bool noDataOut = false)
    {
        var c = new byte[16];
        c[0] = 0x93;
        c[1] = (byte)((unmap ? 0x08 : 0) | (noDataOut ? 0x01 : 0));
        BinaryPrimitives.WriteUInt64BigEndian(c.AsSpan(2), lba);
        BinaryPrimitives.WriteUInt32BigEndian(c.AsSpan(10), blocks);
        return c;
    }

    public static byte[] WriteSame10(uint lba, ushort blocks, bool unmap = false) =>
        [0x41, (byte)(unmap ? 0x08 : 0), (byte)(lba >> 24), (byte)(lba >> 16), (byte)(lba >> 8), (byte)lba, 0, (byte)(blocks >> 8), (byte)blocks, 0];

    public static byte[] Verify10(uint lba, ushort blocks, byte byteCheck) =>
        [0x2F, (byte)(byteCheck << 1), (byte)(lba >> 24), (byte)(lba >> 16), (byte)(lba >> 8), (byte)lba, 0, (byte)(blocks >> 8), (byte)blocks, 0];

    public static byte[] ReportSupportedOperationCodes(byte reportingOptions, byte opcode = 0, ushort serviceAction = 0, uint allocation = 4096, bool timeouts = false) =>
        [0xA3, 0x0C, (byte)((timeouts ? 0x80 : 0) | reportingOptions), opcode, (byte)(serviceAction >> 8), (byte)serviceAction,
         (byte)(allocation >> 24), (byte)(allocation >> 16), (byte)(allocation >> 8), (byte)allocation, 0, 0];
}
