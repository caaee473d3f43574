using System.Buffers;
using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using ISCSISnap.Storage.BlockDevices;

namespace ISCSISnap.Target.Scsi;

public sealed partial class LogicalUnit
{
    private const int VerifyChunkBytes = 1 << 20;

    // ---------------------------------------------------------------- READ

    private ValueTask ReadAsync(ScsiCommand command)
    {
        var cdb = command.Cdb;
        ulong lba = ReadLba(cdb);
        int length = (int)(ReadTransferLength(cdb) << BlockShift);
        if (length == 0)
        {
            command.CompleteGood();
            return ValueTask.CompletedTask;
        }
        if (!command.TryEnsureBuffer(length))
        {
            command.Complete(ScsiStatus.TaskSetFull);
            return ValueTask.CompletedTask;
        }
        var io = FilteredReadAsync(command, (long)lba << BlockShift, command.Buffer.AsMemory(0, length));
        if (io.IsCompletedSuccessfully)
        {
            CompleteFrom(command, io.Result, write: false, length);
            return ValueTask.CompletedTask;
        }
        return AwaitRead(io, command, length);
    }

    private async ValueTask AwaitRead(ValueTask<IoStatus> io, ScsiCommand command, int length) =>
        CompleteFrom(command, await io.ConfigureAwait(false), write: false, length);

    // ---------------------------------------------------------------- streamed WRITE

    /// <summary>
    /// Takes the next in-order piece of a streamed write's Data-Out: whole blocks go to the device straight from
    /// the receive buffer; a block split across PDUs is assembled in a one-block carry buffer.
    /// </summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask WriteStreamAsync(ScsiCommand command, ReadOnlySequence<byte> data)
    {
        if (command.DeferredError is not null)
        {
            command.StreamedBytes += data.Length;
            return;
        }
        long start = (long)ReadLba(command.Cdb) << BlockShift;

        if (command.CarryLength > 0)
        {
            var carry = command.Buffer!;
            int take = (int)Math.Min(BlockSize - command.CarryLength, data.Length);
            data.Slice(0, take).CopyTo(carry.AsSpan(command.CarryLength));
            command.CarryLength += take;
            command.StreamedBytes += take;
            data = data.Slice(take);
            if (command.CarryLength == BlockSize)
            {
                long blockStart = start + command.StreamedBytes - BlockSize;
                var status = await GatedWriteAsync(command, blockStart, new ReadOnlySequence<byte>(carry, 0, BlockSize)).ConfigureAwait(false);
                command.CarryLength = 0;
                if (status != IoStatus.Ok)
                {
                    command.DeferredError = MapStatus(status, write: true);
                    command.StreamedBytes += data.Length;
                    return;
                }
            }
        }

        long whole = data.Length & ~(long)(BlockSize - 1);
        if (whole > 0)
        {
            var status = await GatedWriteAsync(command, start + command.StreamedBytes, data.Slice(0, whole)).ConfigureAwait(false);
            command.StreamedBytes += whole;
            data = data.Slice(whole);
            if (status != IoStatus.Ok)
            {
                command.DeferredError = MapStatus(status, write: true);
                command.StreamedBytes += data.Length;
                return;
            }
        }

        if (!data.IsEmpty)
        {
            if (!command.TryEnsureBuffer(BlockSize))
            {
                command.DeferredError = SenseCode.InternalTargetFailure;
                command.StreamedBytes += data.Length;
                return;
            }
            data.CopyTo(command.Buffer);
            command.CarryLength = (int)data.Length;
            command.StreamedBytes += data.Length;
        }
    }

    /// <summary>
    /// A device write inside the shared side of the write gate. The gate is held only for the device call, never
    /// while waiting for the network, so an atomic operation (COMPARE AND WRITE) never waits on an initiator.
    /// </summary>
    private ValueTask<IoStatus> GatedWriteAsync(ScsiCommand command, long offset, ReadOnlySequence<byte> data)
    {
        if (!_writeGate.TryEnterShared()) return SlowGatedWriteAsync(command, offset, data);
        ValueTask<IoStatus> write;
        try
        {
            write = FilteredWriteAsync(command, offset, data);
        }
        catch
        {
            _writeGate.ExitShared();
            throw;
        }
        if (write.IsCompleted)
        {
            _writeGate.ExitShared();
            return write;
        }
        return ExitAfter(write);

        async ValueTask<IoStatus> ExitAfter(ValueTask<IoStatus> pending)
        {
            try { return await pending.ConfigureAwait(false); }
            finally { _writeGate.ExitShared(); }
        }
    }

    private async ValueTask<IoStatus> SlowGatedWriteAsync(ScsiCommand command, long offset, ReadOnlySequence<byte> data)
    {
        await _writeGate.EnterSharedAsync().ConfigureAwait(false);
        try
        {
            return await FilteredWriteAsync(command, offset, data).ConfigureAwait(false);
        }
        finally
        {
            _writeGate.ExitShared();
        }
    }

    /// <summary>The end of a streamed write: report deferred errors, then make it durable if FUA asked (or the cache is off).</summary>
    private ValueTask FinishStreamedWriteAsync(ScsiCommand command)
    {
        if (command.DeferredError is { } error)
        {
            Fail(command, error);
            return ValueTask.CompletedTask;
        }
        if (command.CarryLength > 0)
        {
            // Data-Out ended inside a block: the whole blocks before it are written, the fragment cannot be.
            Fail(command, SenseCode.InvalidFieldInInformationUnit);
            return ValueTask.CompletedTask;
        }
        bool fua = command.Opcode != 0x0A && (command.Cdb[1] & 0x08) != 0;
        if ((fua || !_writeCacheEnabled) && command.StreamedBytes > 0)
        {
            var flush = Device.FlushAsync();
            if (!flush.IsCompletedSuccessfully) return AwaitFlush(flush, command);
            CompleteFrom(command, flush.Result, write: true);
            return ValueTask.CompletedTask;
        }
        command.CompleteGood();
        return ValueTask.CompletedTask;
    }

    private async ValueTask AwaitFlush(ValueTask<IoStatus> flush, ScsiCommand command) =>
        CompleteFrom(command, await flush.ConfigureAwait(false), write: true);

    // ---------------------------------------------------------------- WRITE AND VERIFY, VERIFY

    private async ValueTask WriteAndVerifyAsync(ScsiCommand command)
    {
        await FinishStreamedWriteAsync(command).ConfigureAwait(false);
        if (command.Status != ScsiStatus.Good || command.StreamedBytes == 0) return;
        // Verify: the written blocks must read back from the medium.
        long start = (long)ReadLba(command.Cdb) << BlockShift;
        var status = await ReadRangeAsync(start, command.StreamedBytes, null).ConfigureAwait(false);
        if (status.Status != IoStatus.Ok) Fail(command, MapStatus(status.Status, write: false));
        else command.CompleteGood();
    }

    private async ValueTask VerifyAsync(ScsiCommand command)
    {
        var cdb = command.Cdb;
        long start = (long)ReadLba(cdb) << BlockShift;
        long length = (long)ReadTransferLength(cdb) << BlockShift;
        int byteCheck = (cdb[1] >> 1) & 0x03;
        if (length == 0)
        {
            command.CompleteGood();
            return;
        }
        byte[]? expected = null;
        if (byteCheck != 0)
        {
            if (command.DataOutReceived < command.DataOutLength)
            {
                Fail(command, SenseCode.InvalidFieldInInformationUnit);
                return;
            }
            expected = command.Buffer;
        }
        var (status, mismatch) = await ReadRangeAsync(start, length, expected, singleBlock: byteCheck == 3).ConfigureAwait(false);
        if (status != IoStatus.Ok) Fail(command, MapStatus(status, write: false));
        else if (mismatch >= 0) Fail(command, SenseCode.MiscompareDuringVerify, (uint)mismatch);
        else command.CompleteGood();
    }

    /// <summary>
    /// Reads [start, start+length) in chunks; with <paramref name="expected"/> compares against it and returns the
    /// offset of the first differing byte (or -1).
    /// </summary>
    private async ValueTask<(IoStatus Status, long Mismatch)> ReadRangeAsync(long start, long length, byte[]? expected, bool singleBlock = false)
    {
        var pool = Storage.Buffers.PinnedBufferPool.Shared;
        int chunk = (int)Math.Min(length, VerifyChunkBytes);
        var buffer = pool.Rent(chunk);
        try
        {
            for (long done = 0; done < length; done += chunk)
            {
                int n = (int)Math.Min(chunk, length - done);
                var status = await Device.ReadAsync(start + done, buffer.AsMemory(0, n)).ConfigureAwait(false);
                if (status != IoStatus.Ok) return (status, -1);
                if (expected is null) continue;
                for (int offset = 0; offset < n; offset += BlockSize)
                {
                    var actual = buffer.AsSpan(offset, BlockSize);
                    var wanted = singleBlock ? expected.AsSpan(0, BlockSize) : expected.AsSpan((int)(done + offset), BlockSize);
                    if (!actual.SequenceEqual(wanted))
                    {
                        int at = actual.CommonPrefixLength(wanted);
                        return (IoStatus.Ok, done + offset + at);
                    }
                }
            }
            return (IoStatus.Ok, -1);
        }
        finally
        {
            pool.Return(buffer);
        }
    }

    // ---------------------------------------------------------------- COMPARE AND WRITE, ORWRITE, WRITE ATOMIC

    private async ValueTask CompareAndWriteAsync(ScsiCommand command)
    {
        var cdb = command.Cdb;
        int blocks = cdb[13];
        if (blocks == 0)
        {
            command.CompleteGood();
            return;
        }
        int length = blocks << BlockShift;
        long start = (long)ReadLba(cdb) << BlockShift;
        var data = command.Buffer!;
        bool fua = (cdb[1] & 0x08) != 0 || !_writeCacheEnabled;

        // Atomic against every other writer of this unit, in any session.
        await _writeGate.EnterExclusiveAsync().ConfigureAwait(false);
        try
        {
            var (status, mismatch) = await ReadRangeAsync(start, length, data).ConfigureAwait(false);
            if (status != IoStatus.Ok)
            {
                Fail(command, MapStatus(status, write: false));
                return;
            }
            if (mismatch >= 0)
            {
                Fail(command, SenseCode.MiscompareDuringVerify, (uint)mismatch);
                return;
            }
            if (Filters is { } filters) await filters.RangeChangingAsync(start, length).ConfigureAwait(false);
            var written = await Device.WriteAsync(start, new ReadOnlySequence<byte>(data, length, length),
                fua ? WriteFlags.ForceUnitAccess : WriteFlags.None).ConfigureAwait(false);
            Filters?.RangeChanged(start, length);
            CompleteFrom(command, written, write: true);
        }
        finally
        {
            _writeGate.ExitExclusive();
        }
    }

    /// <summary>The start shared by commands that write their buffered Data-Out blocks; false once the command is complete.</summary>
    private bool BeginBufferedWrite(ScsiCommand command, out long start, out WriteFlags flags)
    {
        start = 0;
        flags = WriteFlags.None;
        if (command.DataOutLength == 0)
        {
            command.CompleteGood();
            return false;
        }
        if (command.DataOutReceived < command.DataOutLength)
        {
            Fail(command, SenseCode.InvalidFieldInInformationUnit);
            return false;
        }
        start = (long)ReadLba(command.Cdb) << BlockShift;
        if ((command.Cdb[1] & 0x08) != 0 || !_writeCacheEnabled) flags = WriteFlags.ForceUnitAccess;
        return true;
    }

    private async ValueTask OrWriteAsync(ScsiCommand command)
    {
        if (!BeginBufferedWrite(command, out long start, out var flags)) return;
        int length = command.DataOutLength;
        var data = command.Buffer!;
        var pool = Storage.Buffers.PinnedBufferPool.Shared;
        var current = pool.Rent(length);
        await _writeGate.EnterExclusiveAsync().ConfigureAwait(false);
        try
        {
            var status = await Device.ReadAsync(start, current.AsMemory(0, length)).ConfigureAwait(false);
            if (status != IoStatus.Ok)
            {
                Fail(command, MapStatus(status, write: false));
                return;
            }
            OrInto(current.AsSpan(0, length), data.AsSpan(0, length));
            if (Filters is { } filters) await filters.RangeChangingAsync(start, length).ConfigureAwait(false);
            status = await Device.WriteAsync(start, new ReadOnlySequence<byte>(current, 0, length), flags).ConfigureAwait(false);
            Filters?.RangeChanged(start, length);
            CompleteFrom(command, status, write: true);
        }
        finally
        {
            _writeGate.ExitExclusive();
            pool.Return(current);
        }
    }

    private async ValueTask WriteAtomicAsync(ScsiCommand command)
    {
        if (!BeginBufferedWrite(command, out long start, out var flags)) return;
        await _writeGate.EnterExclusiveAsync().ConfigureAwait(false);
        try
        {
            if (Filters is { } filters) await filters.RangeChangingAsync(start, command.DataOutLength).ConfigureAwait(false);
            var status = await Device.WriteAtomicAsync(start, command.Buffer.AsMemory(0, command.DataOutLength), flags).ConfigureAwait(false);
            Filters?.RangeChanged(start, command.DataOutLength);
            CompleteFrom(command, status, write: true);
        }
        finally
        {
            _writeGate.ExitExclusive();
        }
    }

    private static void OrInto(Span<byte> target, ReadOnlySpan<byte> source)
    {
        int i = 0;
        int width = System.Numerics.Vector<byte>.Count;
        for (; i + width <= target.Length; i += width)
            (new System.Numerics.Vector<byte>(target.Slice(i)) | new System.Numerics.Vector<byte>(source.Slice(i))).CopyTo(target.Slice(i));
        for (; i < target.Length; i++) target[i] |= source[i];
    }

    // ---------------------------------------------------------------- cache management

    private ValueTask SynchronizeCacheAsync(ScsiCommand command)
    {
        var flush = Device.FlushAsync();
        if (!flush.IsCompletedSuccessfully) return AwaitFlush(flush, command);
        CompleteFrom(command, flush.Result, write: true);
        return ValueTask.CompletedTask;
    }

    private ValueTask PreFetch(ScsiCommand command)
    {
        // The page cache decides what stays resident; nothing is pinned, so GOOD (not CONDITION MET).
        command.CompleteGood();
        return ValueTask.CompletedTask;
    }
}
