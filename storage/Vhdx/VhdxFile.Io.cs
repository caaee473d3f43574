using System.Buffers;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Files;

namespace ISCSISnap.Storage.Vhdx;

// The data path: sector states, reads, writes, zeroing and block allocation.
public sealed partial class VhdxFile
{
    private static readonly byte[] s_zeros = new byte[VhdxFormat.MiB];

    /// <summary>Serialises block allocation and every change of the in-memory BAT, bitmaps and metadata images.</summary>
    private readonly object _allocLock = new();
    private long _eof;   // next allocation offset (1 MiB aligned); under _allocLock
    private volatile bool _failed;

    private long BatIndex(long block) => block + block / _chunkRatio;
    private long BitmapEntryIndex(long chunk) => chunk * (_chunkRatio + 1) + _chunkRatio;
    private static bool IsAllocated(ulong entry) => (entry & VhdxFormat.StateMask) is VhdxFormat.FullyPresent or VhdxFormat.PartiallyPresent;
    private static long BlockOffset(ulong entry) => (long)(entry & VhdxFormat.OffsetMask);

    private IoStatus CheckRange(long offset, long length)
    {
        if (((offset | length) & (_logicalSectorSize - 1)) != 0) return IoStatus.Misaligned;
        if (offset < 0 || length < 0 || offset > VirtualSize - length) return IoStatus.OutOfRange;
        return IoStatus.Ok;
    }

    private IoStatus CheckWrite(long offset, long length)
    {
        if (!_writable) return IoStatus.WriteProtected;
        if (_failed || _file.FailedSyncErrno != 0) return IoStatus.WriteError;   // fail stop after a lost sync
        return CheckRange(offset, length);
    }

    // ------------------------------------------------------------------ states

    public void Enumerate(long sector, long count, Action<long, long, SectorState> visit)
    {
        if (count <= 0) return;
        long runStart = sector, runLength = 0;
        SectorState runState = SectorState.Absent;
        void Emit(long start, long n, SectorState state)
        {
            if (n <= 0) return;
            if (runLength > 0 && state == runState && runStart + runLength == start) { runLength += n; return; }
            if (runLength > 0) visit(runStart, runLength, runState);
            (runStart, runLength, runState) = (start, n, state);
        }

        long total = VirtualSize / _logicalSectorSize;
        long end = sector + count;
        long s = Math.Max(sector, 0);
        if (sector < 0) Emit(sector, Math.Min(end, 0) - sector, SectorState.Absent);
        var bat = Volatile.Read(ref _bat);
        while (s < Math.Min(end, total))
        {
            long block = s / _sectorsPerBlock;
            long inBlock = s % _sectorsPerBlock;
            long n = Math.Min(_sectorsPerBlock - inBlock, Math.Min(end, total) - s);
            ulong entry = Volatile.Read(ref bat[BatIndex(block)]);
            switch ((int)(entry & VhdxFormat.StateMask))
            {
                case VhdxFormat.FullyPresent:
                    Emit(s, n, SectorState.Data);
                    break;
                case VhdxFormat.PartiallyPresent:
                {
                    byte[] bitmap;
                    lock (_allocLock) bitmap = LoadBitmap(block / _chunkRatio) ?? throw Refuse($"cannot read the sector bitmap of chunk {block / _chunkRatio}");
                    long bit = (block % _chunkRatio) * _sectorsPerBlock + inBlock;
                    for (long i = 0; i < n;)
                    {
                        bool set = (bitmap[(bit + i) >> 3] & (1 << (int)((bit + i) & 7))) != 0;
                        long j = i + 1;
                        while (j < n && ((bitmap[(bit + j) >> 3] & (1 << (int)((bit + j) & 7))) != 0) == set) j++;
                        Emit(s + i, j - i, set ? SectorState.Data : SectorState.Absent);
                        i = j;
                    }
                    break;
                }
                case VhdxFormat.Zero or VhdxFormat.Unmapped or 5:
                    Emit(s, n, SectorState.Zero);
                    break;
                default:   // NOT_PRESENT, UNDEFINED: the layers below decide (zeros at the bottom of a chain)
                    Emit(s, n, SectorState.Absent);
                    break;
            }
            s += n;
        }
        if (end > Math.Max(total, sector)) Emit(Math.Max(total, sector), end - Math.Max(total, sector), SectorState.Absent);
        if (runLength > 0) visit(runStart, runLength, runState);
    }

    // ------------------------------------------------------------------ reads

    public ValueTask<IoStatus> ReadAsync(long offset, Memory<byte> destination)
    {
        var status = CheckRange(offset, destination.Length);
        if (status != IoStatus.Ok) return new(status);
        if (_failed) return new(IoStatus.ReadError);
        if (_overlay is not null) return ReadOverlaidAsync(offset, destination);
        var bat = Volatile.Read(ref _bat);
        while (!destination.IsEmpty)
        {
            long block = offset >> _blockShift;
            long inBlock = offset & (_blockSize - 1);
            int n = (int)Math.Min(destination.Length, _blockSize - inBlock);
            var part = destination[..n];
            // A block's file offset never changes once allocated, so a plain read of the entry is enough.
            ulong entry = Volatile.Read(ref bat[BatIndex(block)]);
            if (IsAllocated(entry))
            {
                var pending = _file.ReadAsync(BlockOffset(entry) + inBlock, part);
                if (!pending.IsCompletedSuccessfully) return ContinueReadAsync(pending, offset + n, destination[n..]);
                if (pending.Result != IoStatus.Ok) return pending;
            }
            else
            {
                part.Span.Clear();
            }
            offset += n;
            destination = destination[n..];
        }
        return new(IoStatus.Ok);
    }

    private async ValueTask<IoStatus> ContinueReadAsync(ValueTask<IoStatus> pending, long offset, Memory<byte> rest)
    {
        var status = await pending.ConfigureAwait(false);
        if (status != IoStatus.Ok || rest.IsEmpty) return status;
        return await ReadAsync(offset, rest).ConfigureAwait(false);
    }

    /// <summary>Reads of a read-only file whose log was replayed in memory: payload the log rewrote is patched in.</summary>
    private async ValueTask<IoStatus> ReadOverlaidAsync(long offset, Memory<byte> destination)
    {
        var bat = _bat;
        while (!destination.IsEmpty)
        {
            long block = offset >> _blockShift;
            long inBlock = offset & (_blockSize - 1);
            int n = (int)Math.Min(destination.Length, _blockSize - inBlock);
            var part = destination[..n];
            ulong entry = bat[BatIndex(block)];
            if (IsAllocated(entry))
            {
                long at = BlockOffset(entry) + inBlock;
                var status = await _file.ReadAsync(at, part).ConfigureAwait(false);
                if (status != IoStatus.Ok) return status;
                if (_overlay!.Touches(at, n)) _overlay.Apply(at, part.Span);
            }
            else
            {
                part.Span.Clear();
            }
            offset += n;
            destination = destination[n..];
        }
        return IoStatus.Ok;
    }

    // ------------------------------------------------------------------ writes

    public ValueTask<IoStatus> WriteAsync(long offset, ReadOnlySequence<byte> data, bool forceUnitAccess)
    {
        var status = CheckWrite(offset, data.Length);
        if (status != IoStatus.Ok) return new(status);
        if (!_dataSessionStarted && (status = StartSession(dataChange: true)) != IoStatus.Ok) return new(status);
        while (data.Length > 0)
        {
            long block = offset >> _blockShift;
            long inBlock = offset & (_blockSize - 1);
            long n = Math.Min(data.Length, _blockSize - inBlock);
            status = WriteBlock(block, inBlock, data.Slice(0, n));
            if (status != IoStatus.Ok) return new(status);
            offset += n;
            data = data.Slice(n);
        }
        return forceUnitAccess ? FlushAsync() : new(IoStatus.Ok);
    }

    private IoStatus WriteBlock(long block, long inBlock, ReadOnlySequence<byte> part)
    {
        // Fast path: the block (or, partially present, every sector written) is already this file's: one gather write.
        ulong entry = Volatile.Read(ref _bat[BatIndex(block)]);
        long state = (long)(entry & VhdxFormat.StateMask);
        if (state == VhdxFormat.FullyPresent ||
            (state == VhdxFormat.PartiallyPresent && Volatile.Read(ref _bitmaps[block / _chunkRatio]) is { } bitmap &&
             AllBitsSet(bitmap, FirstBit(block, inBlock), part.Length / _logicalSectorSize)))
            return ImageFile.MapWriteError(_file.Write(BlockOffset(entry) + inBlock, part));
        return WriteSlow(block, inBlock, part);
    }

    private long FirstBit(long block, long inBlock) => (block % _chunkRatio) * _sectorsPerBlock + inBlock / _logicalSectorSize;

    private IoStatus WriteSlow(long block, long inBlock, ReadOnlySequence<byte> part)
    {
        lock (_allocLock)
        {
            if (_failed) return IoStatus.WriteError;
            var bat = _bat;
            long index = BatIndex(block);
            ulong entry = bat[index];
            int state = (int)(entry & VhdxFormat.StateMask);
            long length = part.Length;
            long chunk = block / _chunkRatio;
            int errno;
            if (state == VhdxFormat.FullyPresent) return ImageFile.MapWriteError(_file.Write(BlockOffset(entry) + inBlock, part));
            if (state == VhdxFormat.PartiallyPresent)
            {
                var present = LoadBitmap(chunk);
                if (present is null) return IoStatus.ReadError;
                errno = _file.Write(BlockOffset(entry) + inBlock, part);
                if (errno != 0) return ImageFile.MapWriteError(errno);
                // Data first, then the bits that make it visible.
                SetBits(chunk, present, FirstBit(block, inBlock), length / _logicalSectorSize, true);
                if (AllBitsSet(present, FirstBit(block, 0), _sectorsPerBlock)) Publish(index, BlockOffset(entry), VhdxFormat.FullyPresent);
                return IoStatus.Ok;
            }

            // A new block. In a differencing file a block the parent shows through gets only the written sectors.
            bool parentShows = _hasParent && state is VhdxFormat.NotPresent or VhdxFormat.Undefined;
            bool partial = parentShows && (inBlock != 0 || length != _blockSize);
            byte[]? bitmap = null;
            if (partial)
            {
                var status = EnsureBitmapBlock(chunk, out bitmap);
                if (status != IoStatus.Ok) return status;
            }
            long at = _eof;
            // Extend first: a fresh extension reads as zeros, which is what the rest of a new block must read as.
            errno = _file.SetLength(at + _blockSize);
            if (errno != 0) return ImageFile.MapWriteError(errno);
            _eof = at + _blockSize;
            errno = _file.Write(at + inBlock, part);
            if (errno != 0) return ImageFile.MapWriteError(errno);
            if (partial)
            {
                SetBits(chunk, bitmap!, FirstBit(block, 0), _sectorsPerBlock, false);
                SetBits(chunk, bitmap!, FirstBit(block, inBlock), length / _logicalSectorSize, true);
                Publish(index, at, VhdxFormat.PartiallyPresent);
            }
            else
            {
                Publish(index, at, VhdxFormat.FullyPresent);
            }
            return IoStatus.Ok;
        }
    }

    /// <summary>Makes a BAT entry visible to readers and dirty for the next flush. Under _allocLock.</summary>
    private void Publish(long index, long offset, int state)
    {
        Volatile.Write(ref _bat[index], (ulong)offset | (uint)state);
        MarkDirty(_batOffset + index * 8 / VhdxFormat.Page * VhdxFormat.Page, -1);
    }

    /// <summary>The chunk's sector bitmap, allocating its block when the chunk has none. Under _allocLock.</summary>
    private IoStatus EnsureBitmapBlock(long chunk, out byte[]? bitmap)
    {
        bitmap = null;
        long sbIndex = BitmapEntryIndex(chunk);
        if (sbIndex >= _bat.Length) return IoStatus.NoSpace;   // a BAT with the short (dynamic) count: no slot for this bitmap
        if ((_bat[sbIndex] & VhdxFormat.StateMask) == VhdxFormat.SbPresent)
        {
            bitmap = LoadBitmap(chunk);
            return bitmap is null ? IoStatus.ReadError : IoStatus.Ok;
        }
        long at = _eof;
        int errno = _file.SetLength(at + VhdxFormat.MiB);
        if (errno != 0) return ImageFile.MapWriteError(errno);
        _eof = at + VhdxFormat.MiB;
        bitmap = new byte[VhdxFormat.MiB];   // the fresh extension is zeros too
        Volatile.Write(ref _bitmaps[chunk], bitmap);
        Publish(sbIndex, at, VhdxFormat.SbPresent);
        return IoStatus.Ok;
    }

    /// <summary>Loads a present chunk's bitmap on first need; null on a read error. Under _allocLock.</summary>
    private byte[]? LoadBitmap(long chunk)
    {
        var bitmap = _bitmaps[chunk];
        if (bitmap is not null) return bitmap;
        ulong entry = _bat[BitmapEntryIndex(chunk)];
        bitmap = new byte[VhdxFormat.MiB];
        if ((entry & VhdxFormat.StateMask) == VhdxFormat.SbPresent)
        {
            try { ReadStructure(BlockOffset(entry), bitmap); }
            catch (StorageException) { return null; }
        }
        Volatile.Write(ref _bitmaps[chunk], bitmap);
        return bitmap;
    }

    private static bool AllBitsSet(byte[] bitmap, long first, long count)
    {
        long bit = first, end = first + count;
        for (; bit < end && (bit & 7) != 0; bit++)
            if ((bitmap[bit >> 3] & (1 << (int)(bit & 7))) == 0) return false;
        for (; bit + 8 <= end; bit += 8)
            if (bitmap[bit >> 3] != 0xFF) return false;
        for (; bit < end; bit++)
            if ((bitmap[bit >> 3] & (1 << (int)(bit & 7))) == 0) return false;
        return true;
    }

    /// <summary>Sets or clears bits and marks their bitmap pages dirty. Under _allocLock.</summary>
    private void SetBits(long chunk, byte[] bitmap, long first, long count, bool value)
    {
        long bit = first, end = first + count;
        for (; bit < end && ((bit & 7) != 0 || end - bit < 8); bit++)
        {
            if (value) bitmap[bit >> 3] |= (byte)(1 << (int)(bit & 7));
            else bitmap[bit >> 3] &= (byte)~(1 << (int)(bit & 7));
        }
        long wholeBytes = (end - bit) >> 3;
        bitmap.AsSpan((int)(bit >> 3), (int)wholeBytes).Fill(value ? (byte)0xFF : (byte)0);
        for (bit += wholeBytes << 3; bit < end; bit++)
        {
            if (value) bitmap[bit >> 3] |= (byte)(1 << (int)(bit & 7));
            else bitmap[bit >> 3] &= (byte)~(1 << (int)(bit & 7));
        }
        long sbOffset = BlockOffset(_bat[BitmapEntryIndex(chunk)]);
        for (long page = (first >> 3) / VhdxFormat.Page; page <= ((first + count - 1) >> 3) / VhdxFormat.Page; page++)
            MarkDirty(sbOffset + page * VhdxFormat.Page, chunk);
    }

    // ------------------------------------------------------------------ zeroing

    public ValueTask<IoStatus> ZeroAsync(long offset, long length, bool deallocate, bool forceUnitAccess)
    {
        var status = CheckWrite(offset, length);
        if (status != IoStatus.Ok) return new(status);
        if (length == 0) return forceUnitAccess ? FlushAsync() : new(IoStatus.Ok);
        if (!_dataSessionStarted && (status = StartSession(dataChange: true)) != IoStatus.Ok) return new(status);
        while (length > 0)
        {
            long block = offset >> _blockShift;
            long inBlock = offset & (_blockSize - 1);
            long n = Math.Min(length, _blockSize - inBlock);
            status = n == _blockSize ? ZeroWholeBlock(block, deallocate) : ZeroPartial(block, inBlock, n, deallocate);
            if (status != IoStatus.Ok) return new(status);
            offset += n;
            length -= n;
        }
        return forceUnitAccess ? FlushAsync() : new(IoStatus.Ok);
    }

    private IoStatus ZeroWholeBlock(long block, bool deallocate)
    {
        lock (_allocLock)
        {
            if (_failed) return IoStatus.WriteError;
            long index = BatIndex(block);
            ulong entry = _bat[index];
            int state = (int)(entry & VhdxFormat.StateMask);
            if (IsAllocated(entry))
            {
                // Without deallocate the space stays allocated: write zeros into it instead of dropping it.
                if (!deallocate) return ZeroPartial(block, 0, _blockSize, false);
                // The ZERO state drops the offset (the spec reserves it); the old space is punched and never reused.
                Publish(index, 0, VhdxFormat.Zero);
                int errno = _file.WriteZeroes(BlockOffset(entry), _blockSize, deallocate: true);
                return ImageFile.MapWriteError(errno);
            }
            if (state != VhdxFormat.Zero) Publish(index, 0, VhdxFormat.Zero);
            return IoStatus.Ok;
        }
    }

    private IoStatus ZeroPartial(long block, long inBlock, long length, bool deallocate)
    {
        ulong entry = Volatile.Read(ref _bat[BatIndex(block)]);
        int state = (int)(entry & VhdxFormat.StateMask);
        if (state == VhdxFormat.FullyPresent)
            return ImageFile.MapWriteError(_file.WriteZeroes(BlockOffset(entry) + inBlock, length, deallocate));
        bool readsZero = state switch
        {
            VhdxFormat.PartiallyPresent => false,
            VhdxFormat.NotPresent or VhdxFormat.Undefined => !_hasParent,   // a dynamic file hides nothing
            _ => true,
        };
        if (readsZero) return IoStatus.Ok;
        // A partial zero in a differencing file must hide the parent: the sectors become data that is zero.
        while (length > 0)
        {
            int n = (int)Math.Min(length, s_zeros.Length);
            var status = WriteBlock(block, inBlock, new ReadOnlySequence<byte>(s_zeros, 0, n));
            if (status != IoStatus.Ok) return status;
            inBlock += n;
            length -= n;
        }
        return IoStatus.Ok;
    }
}
