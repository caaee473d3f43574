using System.Buffers.Binary;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Files;

namespace ISCSISnap.Storage.Vhdx;

// Detaching a differencing file from its parent: the last step of merging a chain's base layer into its only child.
//
// Crash safety. The conversion is a sequence of steps, each leaving a file that opens as a valid VHDX with the same
// flattened content over a parent that reads zeros wherever this file is absent (the caller's precondition):
//   1. The sectors of every PARTIALLY_PRESENT block whose bitmap bit is 0 are overwritten with zeros (plain data
//      writes; no metadata changes, so the file is unchanged as far as any reader is concerned).
//   2. Flush: fdatasync (the zeros are durable), then the payload BAT entries through the log: PARTIALLY_PRESENT
//      becomes FULLY_PRESENT (its unmapped sectors now hold the parent's zeros), UNDEFINED becomes NOT_PRESENT, and a
//      NOT_PRESENT entry with a stray (reserved) offset is rewritten as 0. Each entry is a valid change on its own,
//      so the BAT pages may span several log entries in any order.
//   3. Flush: the sector bitmap entries become SB_NOT_PRESENT. By now no payload entry is partially present (the
//      flush begins with an fdatasync that makes step 2's in-place pages durable), so any subset of these pages is
//      valid too. Once this flush returns, the old bitmap blocks are punched (their space stays unreferenced; the file
//      never reuses space, and punching only saves disk space).
//   4. Flush: the metadata pages, alone and in ONE log entry (checked before dirtying them): the file parameters lose
//      HasParent (and LeaveBlockAllocated, which a differencing file ignores and a dynamic file with unallocated blocks
//      must not claim), the parent locator's table entry is removed (the last entry moves into its slot) and the
//      item's bytes are zeroed. This entry is the switch from "differencing" to "dynamic".
// A crash before step 4's entry is durable leaves a differencing file (steps 2 and 3 replayed from the log if need be);
// a crash after leaves the dynamic file.
public sealed partial class VhdxFile
{
    /// <summary>Test hook: called at the boundaries between DetachParent's steps, with the step just finished.</summary>
    internal Action<string>? DetachStepForTest { get; set; }

    /// <summary>
    /// Turns this writable differencing file into a standalone dynamic file with the same content, given that its parent
    /// reads zeros wherever this file is still absent (the caller has copied every sector the parent holds into this file
    /// first). Durable on return. The caller guarantees no concurrent I/O during the call. DataWriteGuid follows the
    /// session rules of any write (kept by a file opened with preserveDataWriteGuid). Returns
    /// <see cref="IoStatus.WriteProtected"/> for a read-only file; throws <see cref="InvalidOperationException"/> for a
    /// file that is not differencing.
    /// </summary>
    public IoStatus DetachParent()
    {
        if (!_hasParent) throw new InvalidOperationException($"{Path}: not a differencing file; it has no parent to detach");
        if (!_writable) return IoStatus.WriteProtected;
        if (_failed) return IoStatus.WriteError;
        var status = StartSession(dataChange: true);
        if (status == IoStatus.Ok) status = FlushNow();   // the caller's own pending changes get entries of their own
        if (status != IoStatus.Ok) return status;

        // 1. Zero the unmapped sectors of partially present blocks.
        lock (_allocLock)
        {
            status = ZeroUnmappedSectors();
            if (status != IoStatus.Ok) return status;
        }
        DetachStepForTest?.Invoke("zero-filled");

        // 2. Payload BAT entries.
        lock (_allocLock)
        {
            var bat = _bat;
            for (long block = 0; block < _payloadBlocks; block++)
            {
                long index = BatIndex(block);
                ulong entry = bat[index];
                switch ((int)(entry & VhdxFormat.StateMask))
                {
                    case VhdxFormat.PartiallyPresent:
                        Publish(index, BlockOffset(entry), VhdxFormat.FullyPresent);
                        break;
                    case VhdxFormat.NotPresent or VhdxFormat.Undefined when entry != VhdxFormat.NotPresent:
                        Publish(index, 0, VhdxFormat.NotPresent);
                        break;
                }
            }
        }
        status = FlushNow();
        if (status != IoStatus.Ok) return status;
        DetachStepForTest?.Invoke("blocks-converted");

        // 3. Sector bitmap entries.
        var bitmapBlocks = new List<long>();
        lock (_allocLock)
        {
            for (long chunk = 0; chunk < _bitmaps.Length; chunk++)
            {
                long index = BitmapEntryIndex(chunk);
                if (index >= _bat.Length || _bat[index] == 0) continue;
                if ((_bat[index] & VhdxFormat.StateMask) == VhdxFormat.SbPresent) bitmapBlocks.Add(BlockOffset(_bat[index]));
                Publish(index, 0, VhdxFormat.NotPresent);
            }
            Volatile.Write(ref _bitmaps, new byte[]?[_bitmaps.Length]);
        }
        status = FlushNow();
        if (status != IoStatus.Ok) return status;
        DetachStepForTest?.Invoke("bitmaps-dropped");
        // Nothing durable refers to these blocks any more (step 2 is durable, so no partially present entry is left).
        // Best effort: a failure leaves unreferenced bytes, nothing worse.
        foreach (long offset in bitmapBlocks) _file.WriteZeroes(offset, VhdxFormat.MiB, deallocate: true);

        // 4. Metadata, in one log entry.
        lock (_allocLock)
        {
            status = DropParentMetadata();
            if (status != IoStatus.Ok) return status;
        }
        status = FlushNow();
        if (status != IoStatus.Ok) return status;
        _hasParent = false;
        Volatile.Write(ref _parentLocator, []);
        DetachStepForTest?.Invoke("detached");
        return IoStatus.Ok;
    }

    private IoStatus FlushNow() => FlushAsync().AsTask().GetAwaiter().GetResult();

    /// <summary>Writes zeros over every sector of a partially present block whose bitmap bit is 0. Under _allocLock.</summary>
    private IoStatus ZeroUnmappedSectors()
    {
        long diskSectors = _virtualSize / _logicalSectorSize;
        var bat = _bat;
        for (long block = 0; block < _payloadBlocks; block++)
        {
            ulong entry = bat[BatIndex(block)];
            if ((entry & VhdxFormat.StateMask) != VhdxFormat.PartiallyPresent) continue;
            var bitmap = LoadBitmap(block / _chunkRatio);
            if (bitmap is null) return IoStatus.ReadError;
            long first = FirstBit(block, 0);
            // Sectors past the virtual size (a short last block) are never read: leave them alone.
            long sectors = Math.Min(_sectorsPerBlock, diskSectors - block * _sectorsPerBlock);
            long i = NextBit(bitmap, first, first + sectors, false) - first;
            while (i < sectors)
            {
                long j = NextBit(bitmap, first + i, first + sectors, true) - first;
                int errno = _file.WriteZeroes(BlockOffset(entry) + i * _logicalSectorSize, (j - i) * _logicalSectorSize, deallocate: false);
                if (errno != 0) return ImageFile.MapWriteError(errno);
                i = NextBit(bitmap, first + j, first + sectors, false) - first;
            }
        }
        return IoStatus.Ok;
    }

    /// <summary>The first bit in [from, end) equal to <paramref name="value"/>, or <paramref name="end"/>.</summary>
    private static long NextBit(byte[] bitmap, long from, long end, bool value)
    {
        byte skip = value ? (byte)0x00 : (byte)0xFF;   // a whole byte holding none of the wanted bits
        long bit = from;
        while (bit < end)
        {
            if ((bit & 7) == 0 && end - bit >= 8 && bitmap[bit >> 3] == skip)
            {
                bit += 8;
                continue;
            }
            if (((bitmap[bit >> 3] & (1 << (int)(bit & 7))) != 0) == value) return bit;
            bit++;
        }
        return end;
    }

    /// <summary>
    /// Clears HasParent and removes the parent locator from the metadata image, marking the pages dirty; fails (changing
    /// nothing) when those pages would not fit one log entry. Under _allocLock, with no other page dirty.
    /// </summary>
    private IoStatus DropParentMetadata()
    {
        var parameters = FindMetadataItem(VhdxFormat.FileParametersItem);
        var locator = FindMetadataItem(VhdxFormat.ParentLocatorItem);
        if (parameters is null || locator is null) return IoStatus.WriteError;   // validated at open; cannot happen
        int count = BinaryPrimitives.ReadUInt16LittleEndian(_metadata.AsSpan(10));
        int last = count - 1;
        long slot = 32 + locator.Value.Index * 32L, lastSlot = 32 + last * 32L;

        static IEnumerable<long> Pages(long offset, long length)
        {
            for (long page = offset / VhdxFormat.Page; page <= (offset + Math.Max(length, 1) - 1) / VhdxFormat.Page; page++)
                yield return page;
        }
        var required = new HashSet<long>(Pages(parameters.Value.Offset + 4, 4));
        required.UnionWith(Pages(10, 2));
        required.UnionWith(Pages(slot, 32));
        required.UnionWith(Pages(lastSlot, 32));
        int limit = PagesPerLogEntry();
        if (required.Count > limit) return IoStatus.WriteError;   // only with a test cap below 4 pages
        var all = new HashSet<long>(required);
        if (locator.Value.Length > 0) all.UnionWith(Pages(locator.Value.Offset, locator.Value.Length));
        bool zeroItem = locator.Value.Length > 0 && all.Count <= limit;   // else the unreferenced item bytes stay as garbage

        var fp = _metadata.AsSpan((int)parameters.Value.Offset + 4, 4);
        BinaryPrimitives.WriteUInt32LittleEndian(fp, BinaryPrimitives.ReadUInt32LittleEndian(fp) & ~3u);   // HasParent, LeaveBlockAllocated
        MarkMetadataDirty(parameters.Value.Offset + 4, 4);
        if (slot != lastSlot)
        {
            _metadata.AsSpan((int)lastSlot, 32).CopyTo(_metadata.AsSpan((int)slot, 32));
            MarkMetadataDirty(slot, 32);
        }
        _metadata.AsSpan((int)lastSlot, 32).Clear();
        MarkMetadataDirty(lastSlot, 32);
        BinaryPrimitives.WriteUInt16LittleEndian(_metadata.AsSpan(10), (ushort)last);
        MarkMetadataDirty(10, 2);
        if (zeroItem)
        {
            _metadata.AsSpan((int)locator.Value.Offset, (int)locator.Value.Length).Clear();
            MarkMetadataDirty(locator.Value.Offset, locator.Value.Length);
        }
        return IoStatus.Ok;
    }
}
