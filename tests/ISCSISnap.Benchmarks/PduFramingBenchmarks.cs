using System.Buffers;
using BenchmarkDotNet.Attributes;
using ISCSISnap.Benchmarks.Support;
using ISCSISnap.Storage.Integrity;
using ISCSISnap.Target.Iscsi.Pdus;

namespace ISCSISnap.Benchmarks;

/// <summary>
/// <see cref="PduFramer.TryFrame"/> on the receive hot path (expected: no allocation), and CRC-32C throughput.
/// </summary>
[MemoryDiagnoser]
public class PduFramingBenchmarks
{
    private const int Payload = 4096;

    private ReadOnlySequence<byte> _command;
    private ReadOnlySequence<byte> _dataOutTwoSegments;
    private ReadOnlySequence<byte> _dataOutTwoSegmentsDigests;
    private readonly FramingLimits _noDigests = new(HeaderDigest: false, DataDigest: false, MaxDataSegmentLength: 262144);
    private readonly FramingLimits _digests = new(HeaderDigest: true, DataDigest: true, MaxDataSegmentLength: 262144);
    private byte[] _crc4K = null!;
    private byte[] _crc256K = null!;

    [GlobalSetup]
    public void Setup()
    {
        _command = new ReadOnlySequence<byte>(Pdus.ScsiRead10(itt: 7, cmdSN: 1, lba: 2048, blocks: 8));

        var payload = new byte[Payload];
        new Random(42).NextBytes(payload);
        // The split falls inside the data segment (48-byte header + 1000 bytes in the first segment).
        var plain = Pdus.DataOut(itt: 7, ttt: 0x1234, dataSN: 0, offset: 0, payload, headerDigest: false, dataDigest: false);
        _dataOutTwoSegments = Pdus.TwoSegments(plain, Bhs.Size + 1000);
        var digested = Pdus.DataOut(itt: 7, ttt: 0x1234, dataSN: 0, offset: 0, payload, headerDigest: true, dataDigest: true);
        _dataOutTwoSegmentsDigests = Pdus.TwoSegments(digested, Bhs.Size + 4 + 1000);

        _crc4K = new byte[4 << 10];
        _crc256K = new byte[256 << 10];
        new Random(1).NextBytes(_crc4K);
        new Random(2).NextBytes(_crc256K);

        // Fail fast if a PDU does not frame (the benchmark would measure the error path).
        Check(_command, _noDigests, 0);
        Check(_dataOutTwoSegments, _noDigests, Payload);
        Check(_dataOutTwoSegmentsDigests, _digests, Payload);
    }

    private static void Check(in ReadOnlySequence<byte> buffer, in FramingLimits limits, int dataLength)
    {
        var result = PduFramer.TryFrame(buffer, limits, out var pdu, out var fault);
        if (result != FrameResult.Complete || !pdu.DataDigestOk || pdu.Data.Length != dataLength || !buffer.GetPosition(buffer.Length).Equals(pdu.End))
            throw new InvalidOperationException($"benchmark PDU did not frame: {result} {fault}");
    }

    [Benchmark(Description = "TryFrame SCSI Command, 1 segment")]
    public long FrameCommand()
    {
        PduFramer.TryFrame(_command, _noDigests, out var pdu, out _);
        return pdu.Header.ExpectedDataTransferLength + pdu.Data.Length;
    }

    [Benchmark(Description = "TryFrame Data-Out 4 KiB, 2 segments")]
    public long FrameDataOutTwoSegments()
    {
        PduFramer.TryFrame(_dataOutTwoSegments, _noDigests, out var pdu, out _);
        return pdu.Header.BufferOffset + pdu.Data.Length;
    }

    [Benchmark(Description = "TryFrame Data-Out 4 KiB, 2 segments, HeaderDigest+DataDigest CRC32C")]
    public long FrameDataOutTwoSegmentsDigests()
    {
        PduFramer.TryFrame(_dataOutTwoSegmentsDigests, _digests, out var pdu, out _);
        return pdu.DataDigestOk ? pdu.Data.Length : -1;
    }

    [Benchmark(Description = "Crc32C.Compute 4 KiB")]
    public uint Crc4K() => Crc32C.Compute(_crc4K);

    [Benchmark(Description = "Crc32C.Compute 256 KiB")]
    public uint Crc256K() => Crc32C.Compute(_crc256K);
}
