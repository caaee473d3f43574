using System.Buffers;
using System.Buffers.Binary;
using System.Collections.Concurrent;
using ISCSISnap.Storage.BlockDevices;

namespace ISCSISnap.Target.Scsi;

/// <summary>Finds the logical unit an EXTENDED COPY target descriptor names (by its NAA designator).</summary>
public interface ICopyTargetResolver
{
    LogicalUnit? FindByDesignator(ReadOnlySpan<byte> naa);
}

public sealed partial class LogicalUnit
{
    private const int MaxCopyTargetDescriptors = 8;
    private const int MaxCopySegmentDescriptors = 32;
    private const int MaxCopyDescriptorListBytes = 1024;
    private const int CopyChunkBytes = 1 << 20;
    private static readonly SenseCode CopyTargetOverrun = new(SenseKey.CopyAborted, 0x0D, 0x02);
    private static readonly SenseCode CopyTargetUnreachable = new(SenseKey.CopyAborted, 0x08, 0x04);

    private readonly record struct CopyResult(byte Status, ushort Segments, uint KibibytesTransferred);

    /// <summary>Held EXTENDED COPY results per I_T nexus and list identifier (RECEIVE COPY RESULTS).</summary>
    private readonly ConcurrentDictionary<string, ConcurrentDictionary<byte, CopyResult>> _copyResults = new();

    private readonly record struct CopySegment(LogicalUnit Source, LogicalUnit Destination, long SourceLba, long DestinationLba, int Blocks);

    /// <summary>EXTENDED COPY (LID1) with identification target descriptors (E4h) and block-to-block segments (02h), as VMware's XCOPY uses it.</summary>
    private async ValueTask ExtendedCopyAsync(ScsiCommand command)
    {
        int length = command.DataOutLength;
        if (length == 0)
        {
            command.CompleteGood();
            return;
        }
        if (length < 16 || command.DataOutReceived < length)
        {
            Fail(command, SenseCode.ParameterListLengthError);
            return;
        }
        var data = command.Buffer.AsMemory(0, length);
        var header = data.Span;
        byte listId = header[0];
        int listIdUsage = (header[1] >> 3) & 0x03;
        int targetBytes = BinaryPrimitives.ReadUInt16BigEndian(header.Slice(2));
        int segmentBytes = (int)Math.Min(BinaryPrimitives.ReadUInt32BigEndian(header.Slice(8)), int.MaxValue);
        uint inlineBytes = BinaryPrimitives.ReadUInt32BigEndian(header.Slice(12));
        if (16L + targetBytes + segmentBytes + inlineBytes > length)
        {
            Fail(command, SenseCode.ParameterListLengthError);
            return;
        }
        if (targetBytes + segmentBytes > MaxCopyDescriptorListBytes)
        {
            Fail(command, SenseCode.ParameterListLengthError);
            return;
        }
        if (inlineBytes != 0)
        {
            FailParameter(command, 12);
            return;
        }
        if (targetBytes % 32 != 0)
        {
            FailParameter(command, 2);
            return;
        }
        int targetCount = targetBytes / 32;
        if (targetCount > MaxCopyTargetDescriptors)
        {
            Fail(command, SenseCode.TooManyTargetDescriptors);
            return;
        }

        // Target descriptors.
        var targets = new LogicalUnit?[targetCount];
        for (int i = 0; i < targetCount; i++)
        {
            var d = header.Slice(16 + 32 * i, 32);
            if (d[0] != 0xE4)
            {
                FailParameter(command, 16 + 32 * i, SenseCode.UnsupportedTargetDescriptorType);
                return;
            }
            bool nul = (d[1] & 0x20) != 0;
            int deviceType = d[1] & 0x1F;
            if (deviceType != 0)
            {
                FailParameter(command, 16 + 32 * i + 1, SenseCode.UnsupportedTargetDescriptorType);
                return;
            }
            int designatorType = d[5] & 0x0F;
            int designatorLength = d[7];
            int blockLength = (d[29] << 16) | (d[30] << 8) | d[31];
            if (nul) continue;   // a null target: reaching it aborts the copy
            if (designatorType == 3 && designatorLength is 8 or 16 && designatorLength <= 20)
            {
                var naa = d.Slice(8, designatorLength);
                var unit = naa.SequenceEqual(Identity.NaaDesignator) ? this : CopyTargets?.FindByDesignator(naa);
                if (unit is not null && blockLength == unit.BlockSize) targets[i] = unit;
            }
        }

        // Segment descriptors.
        var segments = new List<CopySegment>();
        int offset = 16 + targetBytes;
        int end = offset + segmentBytes;
        while (offset < end)
        {
            if (offset + 4 > end)
            {
                Fail(command, SenseCode.ParameterListLengthError);
                return;
            }
            var d = header.Slice(offset);
            if (d[0] != 0x02)
            {
                FailParameter(command, offset, SenseCode.UnsupportedSegmentDescriptorType);
                return;
            }
            int descriptorLength = BinaryPrimitives.ReadUInt16BigEndian(d.Slice(2));
            if (descriptorLength != 0x18 || offset + 4 + descriptorLength > end)
            {
                FailParameter(command, offset + 2);
                return;
            }
            if (segments.Count == MaxCopySegmentDescriptors)
            {
                Fail(command, SenseCode.TooManySegmentDescriptors);
                return;
            }
            int sourceIndex = BinaryPrimitives.ReadUInt16BigEndian(d.Slice(4));
            int destinationIndex = BinaryPrimitives.ReadUInt16BigEndian(d.Slice(6));
            int blocks = BinaryPrimitives.ReadUInt16BigEndian(d.Slice(10));
            ulong sourceLba = BinaryPrimitives.ReadUInt64BigEndian(d.Slice(12));
            ulong destinationLba = BinaryPrimitives.ReadUInt64BigEndian(d.Slice(20));
            if (sourceIndex >= targetCount || destinationIndex >= targetCount
                || targets[sourceIndex] is not { } source || targets[destinationIndex] is not { } destination)
            {
                Fail(command, CopyTargetUnreachable);
                return;
            }
            if (!source.RangeValid(sourceLba, (ulong)blocks) || !destination.RangeValid(destinationLba, (ulong)blocks))
            {
                Fail(command, CopyTargetOverrun);
                return;
            }
            if (destination.WriteProtected)
            {
                Fail(command, destination.SoftwareOrHardwareWriteProtect);
                return;
            }
            segments.Add(new CopySegment(source, destination, (long)sourceLba, (long)destinationLba, blocks));
            offset += 4 + descriptorLength;
        }

        ushort processed = 0;
        long bytes = 0;
        SenseCode? failure = null;
        foreach (var segment in segments)
        {
            var status = await CopySegmentAsync(segment).ConfigureAwait(false);
            if (status != IoStatus.Ok)
            {
                failure = new SenseCode(SenseKey.CopyAborted, 0x0D, 0x01);   // third party device failure
                break;
            }
            processed++;
            bytes += (long)segment.Blocks * segment.Source.BlockSize;
        }
        if (listIdUsage == 0)
        {
            var held = _copyResults.GetOrAdd(command.Nexus.Key, _ => new ConcurrentDictionary<byte, CopyResult>());
            held[listId] = new CopyResult(failure is null ? (byte)0x01 : (byte)0x02, processed, (uint)Math.Min(bytes >> 10, uint.MaxValue));
        }
        if (failure is { } sense) Fail(command, sense);
        else command.CompleteGood();
    }

    private static async ValueTask<IoStatus> CopySegmentAsync(CopySegment segment)
    {
        var pool = Storage.Buffers.PinnedBufferPool.Shared;
        long length = (long)segment.Blocks * segment.Source.BlockSize;
        if (length == 0) return IoStatus.Ok;
        int chunk = (int)Math.Min(length, CopyChunkBytes);
        var buffer = pool.Rent(chunk);
        var destination = segment.Destination;
        if (!destination._writeGate.TryEnterShared()) await destination._writeGate.EnterSharedAsync().ConfigureAwait(false);
        try
        {
            long source = segment.SourceLba * segment.Source.BlockSize;
            long target = segment.DestinationLba * destination.BlockSize;
            var flags = destination._writeCacheEnabled ? WriteFlags.None : WriteFlags.ForceUnitAccess;
            for (long done = 0; done < length; done += chunk)
            {
                int n = (int)Math.Min(chunk, length - done);
                var status = await segment.Source.Device.ReadAsync(source + done, buffer.AsMemory(0, n)).ConfigureAwait(false);
                if (status != IoStatus.Ok) return status;
                if (destination.Filters is { } destinationFilters) await destinationFilters.RangeChangingAsync(target + done, n).ConfigureAwait(false);
                status = await destination.Device.WriteAsync(target + done, new ReadOnlySequence<byte>(buffer, 0, n), flags).ConfigureAwait(false);
                destination.Filters?.RangeChanged(target + done, n);
                if (status != IoStatus.Ok) return status;
            }
            return IoStatus.Ok;
        }
        finally
        {
            destination._writeGate.ExitShared();
            pool.Return(buffer);
        }
    }

    private ValueTask ReceiveCopyResults(ScsiCommand command)
    {
        var cdb = command.Cdb;
        int action = cdb[1] & 0x1F;
        byte listId = cdb[2];
        uint allocation = BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(10));
        byte[] data;
        if (action == 0x03)
        {
            byte[] implemented = [0x02, 0xE4];
            data = new byte[44 + implemented.Length];
            BinaryPrimitives.WriteUInt32BigEndian(data, (uint)(data.Length - 4));
            data[4] = 0x01;                                                              // SNLID
            BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(8), MaxCopyTargetDescriptors);
            BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(10), MaxCopySegmentDescriptors);
            BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(12), MaxCopyDescriptorListBytes);
            BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(16), (uint)(0xFFFF * BlockSize));   // one segment: at most 65535 blocks
            BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(34), 1);                 // total concurrent copies
            data[36] = 1;                                                                // maximum concurrent copies
            data[37] = (byte)BlockShift;                                                 // data segment granularity (log2)
            data[43] = (byte)implemented.Length;
            implemented.CopyTo(data, 44);
        }
        else
        {
            if (!_copyResults.TryGetValue(command.Nexus.Key, out var held) || !held.TryGetValue(listId, out var result))
            {
                FailField(command, 2);
                return ValueTask.CompletedTask;
            }
            data = new byte[12];
            BinaryPrimitives.WriteUInt32BigEndian(data, 8);
            data[4] = result.Status;
            BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(5), result.Segments);
            data[7] = 0xF1;                                                              // transfer count in KiB
            BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(8), result.KibibytesTransferred);
        }
        var buffer = command.EnsureBuffer(data.Length);
        data.CopyTo(buffer, 0);
        command.CompleteGood((int)Math.Min(data.Length, allocation));
        return ValueTask.CompletedTask;
    }
}
