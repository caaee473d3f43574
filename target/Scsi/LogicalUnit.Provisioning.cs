using System.Buffers;
using System.Buffers.Binary;
using ISCSISnap.Storage.BlockDevices;

namespace ISCSISnap.Target.Scsi;

public sealed partial class LogicalUnit
{
    private const int WriteSameChunkBytes = 1 << 20;

    private async ValueTask UnmapAsync(ScsiCommand command)
    {
        int length = command.DataOutLength;
        if (length == 0)
        {
            command.CompleteGood();
            return;
        }
        if (length < 8 || command.DataOutReceived < length)
        {
            Fail(command, SenseCode.ParameterListLengthError);
            return;
        }
        var data = command.Buffer!;
        int dataLength = BinaryPrimitives.ReadUInt16BigEndian(data);
        int descriptorBytes = BinaryPrimitives.ReadUInt16BigEndian(data.AsSpan(2));
        if (dataLength + 2 > length || descriptorBytes + 8 > length)
        {
            Fail(command, SenseCode.ParameterListLengthError);
            return;
        }
        int count = descriptorBytes / 16;
        if (count > Options.MaxUnmapDescriptors)
        {
            FailParameter(command, 2);
            return;
        }
        // Validate every descriptor before touching the medium: the command is all or nothing.
        for (int i = 0; i < count; i++)
        {
            var d = data.AsSpan(8 + 16 * i, 16);
            ulong lba = BinaryPrimitives.ReadUInt64BigEndian(d);
            uint blocks = BinaryPrimitives.ReadUInt32BigEndian(d.Slice(8));
            if (!RangeValid(lba, blocks))
            {
                Fail(command, SenseCode.LbaOutOfRange);
                return;
            }
        }
        if (!_writeGate.TryEnterShared()) await _writeGate.EnterSharedAsync().ConfigureAwait(false);
        try
        {
            for (int i = 0; i < count; i++)
            {
                var d = data.AsSpan(8 + 16 * i, 16);
                ulong lba = BinaryPrimitives.ReadUInt64BigEndian(d);
                uint blocks = BinaryPrimitives.ReadUInt32BigEndian(d.Slice(8));
                if (blocks == 0) continue;
                if (Filters is { } filters) await filters.RangeChangingAsync((long)lba << BlockShift, (long)blocks << BlockShift).ConfigureAwait(false);
                var status = await Device.WriteZeroesAsync((long)lba << BlockShift, (long)blocks << BlockShift, deallocate: true,
                    _writeCacheEnabled ? WriteFlags.None : WriteFlags.ForceUnitAccess).ConfigureAwait(false);
                Filters?.RangeChanged((long)lba << BlockShift, (long)blocks << BlockShift);
                if (status != IoStatus.Ok)
                {
                    Fail(command, MapStatus(status, write: true));
                    return;
                }
            }
        }
        finally
        {
            _writeGate.ExitShared();
        }
        command.CompleteGood();
    }

    private async ValueTask WriteSameAsync(ScsiCommand command)
    {
        var cdb = command.Cdb;
        bool sixteen = cdb[0] == 0x93;
        bool unmap = (cdb[1] & 0x08) != 0;
        bool noDataOut = sixteen && (cdb[1] & 0x01) != 0;
        ulong lba = ReadLba(cdb);
        ulong blocks = sixteen ? BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(10)) : BinaryPrimitives.ReadUInt16BigEndian(cdb.Slice(7));
        if (blocks == 0) blocks = (ulong)BlockCount - lba;
        if (blocks == 0)
        {
            command.CompleteGood();
            return;
        }
        if (!noDataOut && command.DataOutReceived < BlockSize)
        {
            Fail(command, SenseCode.InvalidFieldInInformationUnit);
            return;
        }
        var pattern = noDataOut ? ReadOnlyMemory<byte>.Empty : command.Buffer.AsMemory(0, BlockSize);
        bool zeros = noDataOut || !pattern.Span.ContainsAnyExcept((byte)0);
        long start = (long)lba << BlockShift;
        long length = (long)blocks << BlockShift;
        var flags = (_writeCacheEnabled ? WriteFlags.None : WriteFlags.ForceUnitAccess);

        if (!_writeGate.TryEnterShared()) await _writeGate.EnterSharedAsync().ConfigureAwait(false);
        try
        {
            IoStatus status;
            // The data does not pass through the filters: those keeping state about the blocks are told.
            if (Filters is { } filters) await filters.RangeChangingAsync(start, length).ConfigureAwait(false);
            if (unmap || zeros)
            {
                // UNMAP=1 deallocates whatever the pattern (SBC-3 §4.7.3.4 lets the device server unmap instead of
                // writing; LBPRZ=1 makes the blocks read back as zeros). Zeros without UNMAP stay mapped.
                status = await Device.WriteZeroesAsync(start, length, deallocate: unmap, flags).ConfigureAwait(false);
            }
            else
            {
                status = await WritePatternAsync(start, length, pattern, flags).ConfigureAwait(false);
            }
            Filters?.RangeChanged(start, length);
            CompleteFrom(command, status, write: true);
        }
        finally
        {
            _writeGate.ExitShared();
        }
    }

    private async ValueTask<IoStatus> WritePatternAsync(long start, long length, ReadOnlyMemory<byte> pattern, WriteFlags flags)
    {
        var pool = Storage.Buffers.PinnedBufferPool.Shared;
        int chunk = (int)Math.Min(length, WriteSameChunkBytes);
        var buffer = pool.Rent(chunk);
        try
        {
            for (int offset = 0; offset < chunk; offset += pattern.Length)
                pattern.Span.CopyTo(buffer.AsSpan(offset));
            for (long done = 0; done < length; done += chunk)
            {
                int n = (int)Math.Min(chunk, length - done);
                bool last = done + n >= length;
                var status = await Device.WriteAsync(start + done, new ReadOnlySequence<byte>(buffer, 0, n), last ? flags : WriteFlags.None).ConfigureAwait(false);
                if (status != IoStatus.Ok) return status;
            }
            return IoStatus.Ok;
        }
        finally
        {
            pool.Return(buffer);
        }
    }

    private async ValueTask GetLbaStatusAsync(ScsiCommand command)
    {
        var cdb = command.Cdb;
        ulong lba = BinaryPrimitives.ReadUInt64BigEndian(cdb.Slice(2));
        uint allocation = BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(10));
        if (lba >= (ulong)BlockCount)
        {
            Fail(command, SenseCode.LbaOutOfRange);
            return;
        }
        if (allocation == 0)
        {
            command.CompleteGood();
            return;
        }
        int maxDescriptors = (int)Math.Clamp((Math.Min(allocation, 8 + 16 * 64u) - 8) / 16, 1, 64);
        var buffer = command.EnsureBuffer(8 + 16 * maxDescriptors);
        int descriptors = 0;
        long position = (long)lba << BlockShift;
        while (descriptors < maxDescriptors && position < Device.Length)
        {
            var (status, extent) = await Device.GetAllocationAsync(position).ConfigureAwait(false);
            if (status != IoStatus.Ok)
            {
                Fail(command, MapStatus(status, write: false));
                return;
            }
            long blocks = Math.Min(extent.Length >> BlockShift, 0xFFFFFFFFL);
            if (blocks <= 0) break;
            var d = buffer.AsSpan(8 + 16 * descriptors, 16);
            d.Clear();
            BinaryPrimitives.WriteUInt64BigEndian(d, (ulong)(position >> BlockShift));
            BinaryPrimitives.WriteUInt32BigEndian(d.Slice(8), (uint)blocks);
            d[12] = (byte)(extent.Mapped ? 0 : 1);   // mapped, or deallocated
            descriptors++;
            position += blocks << BlockShift;
        }
        buffer.AsSpan(0, 8).Clear();
        BinaryPrimitives.WriteUInt32BigEndian(buffer, (uint)(4 + 16 * descriptors));
        command.CompleteGood((int)Math.Min(8 + 16 * descriptors, allocation));
    }
}
