using System.Buffers.Binary;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Files;
using ISCSISnap.Storage.Native;

namespace ISCSISnap.Storage.Vhdx;

// Headers, the log, flushing, sealing, growth, parent locators and creation.
//
// Metadata protocol. Changes to the BAT, sector bitmaps, metadata region and region tables are made in memory and
// their 4 KiB pages marked dirty. A flush: (1) fdatasync, making payload data durable before any metadata that points
// at it, and retiring every log entry applied in place before; (2) one log entry with the dirty page images, then
// fdatasync (the commit point); (3) the pages written in place, made durable by the next flush's step 1 (so the entry
// stays the log's active tail until then). Entries are written front to back in the ring under one LogGuid; when the
// ring is full (or at the first entry of a session) a new LogGuid starts at ring offset 0 after everything is retired,
// so the ring never holds entries of one LogGuid out of order (QEMU replays a whole run). A header names a LogGuid only
// while a complete entry of it is durable, so "LogGuid set but no valid entry" always means corruption and is refused.
// Seal syncs and clears the LogGuid.
public sealed partial class VhdxFile
{
    private const int SourceBat = -1, SourceMetadata = -2, SourceRegionTable = -3;

    private readonly object _headerLock = new();
    private bool _fileGuidChanged, _dataGuidChanged;
    private volatile bool _fileSessionStarted, _dataSessionStarted;
    private (byte[] Copy1, byte[] Copy2)? _regionCopies;   // set when the two copies differ; repaired on the first change

    private readonly Dictionary<long, long> _dirty = new();   // page file offset → source (chunk index for bitmaps); under _allocLock
    private readonly SemaphoreSlim _flushGate = new(1, 1);
    private long _flushRequested, _flushCovered;
    private long _logHead, _logTail;   // ring offsets, under _flushGate
    private ulong _logSequence;
    private bool _disposed;

    /// <summary>Test hook: the next metadata flush writes and syncs its log entry, then stops as if the process died.</summary>
    internal bool StopBeforeApplyForTest { get; set; }

    /// <summary>Test hook: called after each log entry is durable (and named by the header), before it is applied in place.</summary>
    internal Action? LogEntryDurableForTest { get; set; }

    /// <summary>Test hook: when positive, caps the 4 KiB pages one log entry carries, so one flush spans several entries.</summary>
    internal int MaxPagesPerLogEntryForTest { get; set; }

    /// <summary>The most pages one log entry of this file carries.</summary>
    private int PagesPerLogEntry()
    {
        int pages = VhdxLogWriter.MaxPages(_logLength);
        return MaxPagesPerLogEntryForTest > 0 ? Math.Min(pages, MaxPagesPerLogEntryForTest) : pages;
    }

    private void MarkDirty(long pageOffset, long source) => _dirty[pageOffset] = source;

    // ------------------------------------------------------------------ headers

    /// <summary>Writes the header pair (non-current slot first, each synced) from the current header.</summary>
    private IoStatus UpdateHeaders(Guid logGuid, bool newDataWriteGuid)
    {
        lock (_headerLock)
        {
            if (_failed) return IoStatus.WriteError;
            Guid fileWrite = _fileGuidChanged ? _header.FileWriteGuid : Guid.NewGuid();
            Guid dataWrite = newDataWriteGuid ? Guid.NewGuid() : _header.DataWriteGuid;
            var buffer = new byte[VhdxFormat.HeaderLength];
            for (int i = 0; i < 2; i++)
            {
                var next = _header with
                {
                    SequenceNumber = _header.SequenceNumber + 1, FileWriteGuid = fileWrite, DataWriteGuid = dataWrite,
                    LogGuid = logGuid, LogVersion = 0,
                };
                int slot = 3 - _currentSlot;
                next.Write(buffer);
                int errno = _file.Write(slot == 1 ? VhdxFormat.Header1Offset : VhdxFormat.Header2Offset, buffer);
                if (errno == 0) errno = _file.SyncDataNow();
                if (errno != 0)
                {
                    _failed = true;
                    return ImageFile.MapWriteError(errno);
                }
                _header = next;
                _currentSlot = slot;
            }
            _fileGuidChanged = true;
            return IoStatus.Ok;
        }
    }

    /// <summary>
    /// The first change of a session: new FileWriteGuid (and DataWriteGuid for a data change, unless preserved) in both
    /// headers before anything else is written.
    /// </summary>
    private IoStatus StartSession(bool dataChange)
    {
        lock (_headerLock)
        {
            if (dataChange ? _dataSessionStarted : _fileSessionStarted) return IoStatus.Ok;
            if (_failed) return IoStatus.WriteError;
            if (!_writable) return IoStatus.WriteProtected;
            bool newData = dataChange && !_preserveDataWriteGuid && !_dataGuidChanged;
            if (!_fileSessionStarted || newData)
            {
                var status = UpdateHeaders(_header.LogGuid, newData);
                if (status != IoStatus.Ok) return status;
                if (newData) _dataGuidChanged = true;
            }
            if (!_fileSessionStarted)
            {
                lock (_allocLock)
                {
                    // Log entries record the file size as a 1 MiB multiple; make the file that long.
                    if (_file.Length < _eof && _file.SetLength(_eof) is var errno and not 0) return ImageFile.MapWriteError(errno);
                    if (_regionCopies is var (copy1, copy2))
                    {
                        for (int page = 0; page < VhdxFormat.RegionTableLength / VhdxFormat.Page; page++)
                        {
                            var want = _regionTable.AsSpan(page * VhdxFormat.Page, VhdxFormat.Page);
                            if (!want.SequenceEqual(copy1.AsSpan(page * VhdxFormat.Page, VhdxFormat.Page)))
                                MarkDirty(VhdxFormat.RegionTable1Offset + page * VhdxFormat.Page, SourceRegionTable);
                            if (!want.SequenceEqual(copy2.AsSpan(page * VhdxFormat.Page, VhdxFormat.Page)))
                                MarkDirty(VhdxFormat.RegionTable2Offset + page * VhdxFormat.Page, SourceRegionTable);
                        }
                        _regionCopies = null;
                    }
                }
                _fileSessionStarted = true;
            }
            if (dataChange) _dataSessionStarted = true;
            return IoStatus.Ok;
        }
    }

    // ------------------------------------------------------------------ log replay (open)

    private void ReplayLog()
    {
        var reader = new VhdxLogReader(_file, _logOffset, _logLength, _header.LogGuid);
        var sequence = reader.FindActiveSequence();
        if (sequence is null)
            throw Refuse($"the log at 0x{_logOffset:x} ({_logLength} bytes) must be replayed (LogGuid {_header.LogGuid}) but holds no valid entry sequence: {reader.FirstProblem ?? "no entry carries that LogGuid"}");
        var head = sequence[^1];
        long length = _fileLength;
        if (length < head.FlushedFileOffset)
            throw Refuse($"the file is {length} bytes but its log (entry {head.Sequence}) says {head.FlushedFileOffset} bytes were flushed: truncated");
        long limit = Math.Max(length, head.LastFileOffset);
        foreach (var entry in sequence)
        {
            foreach (var d in entry.Descriptors)
            {
                long end = d.FileOffset + (d.IsZero ? d.ZeroLength : VhdxFormat.Page);
                if (end > limit) throw Refuse($"log entry {entry.Sequence} writes [0x{d.FileOffset:x}, 0x{end:x}), past the file's last offset 0x{limit:x}");
            }
        }

        var page = new byte[VhdxFormat.Page];
        if (_writable)
        {
            // A new FileWriteGuid first; the LogGuid stays until the replay is durable, so a crash here replays again.
            if (UpdateHeaders(_header.LogGuid, false) != IoStatus.Ok) throw Refuse("cannot update the headers before replaying the log");
            foreach (var entry in sequence)
            {
                foreach (var d in entry.Descriptors)
                {
                    int errno;
                    if (d.IsZero)
                    {
                        errno = _file.WriteZeroes(d.FileOffset, d.ZeroLength, deallocate: false);
                    }
                    else
                    {
                        if (!reader.ReadUpdate(entry, d, page)) throw Refuse($"read error in log entry {entry.Sequence}");
                        errno = _file.Write(d.FileOffset, page);
                    }
                    if (errno != 0) throw Refuse($"replaying the log failed writing at 0x{d.FileOffset:x} (errno {errno})");
                }
            }
            if (_file.Length < head.LastFileOffset && _file.SetLength(head.LastFileOffset) != 0)
                throw Refuse($"replaying the log failed extending the file to {head.LastFileOffset} bytes");
            if (_file.SyncDataNow() is var syncErrno and not 0) throw Refuse($"replaying the log failed: fdatasync errno {syncErrno}");
            if (UpdateHeaders(Guid.Empty, false) != IoStatus.Ok) throw Refuse("cannot clear the LogGuid after replaying the log");
            _fileLength = _file.Length;
        }
        else
        {
            // Read-only: replay into memory; structure and payload reads are patched through the overlay.
            var overlay = new VhdxLogOverlay { Length = limit };
            foreach (var entry in sequence)
            {
                foreach (var d in entry.Descriptors)
                {
                    if (d.IsZero)
                    {
                        overlay.Add(d.FileOffset, d.ZeroLength, null);
                    }
                    else
                    {
                        var data = new byte[VhdxFormat.Page];
                        if (!reader.ReadUpdate(entry, d, data)) throw Refuse($"read error in log entry {entry.Sequence}");
                        overlay.Add(d.FileOffset, VhdxFormat.Page, data);
                    }
                }
            }
            _overlay = overlay;
            _fileLength = limit;
        }
    }

    // ------------------------------------------------------------------ flush

    public ValueTask<IoStatus> FlushAsync()
    {
        if (_failed) return new(IoStatus.WriteError);
        if (!_writable) return new(IoStatus.Ok);
        return FlushCoreAsync();
    }

    private async ValueTask<IoStatus> FlushCoreAsync()
    {
        long ticket = Interlocked.Increment(ref _flushRequested);
        await _flushGate.WaitAsync().ConfigureAwait(false);
        try
        {
            if (_failed) return IoStatus.WriteError;
            if (Volatile.Read(ref _flushCovered) >= ticket) return IoStatus.Ok;   // a flush that started after us covered us
            long covers = Volatile.Read(ref _flushRequested);
            var status = await CommitAsync().ConfigureAwait(false);
            if (status == IoStatus.Ok) Volatile.Write(ref _flushCovered, covers);
            return status;
        }
        finally
        {
            _flushGate.Release();
        }
    }

    private IoStatus Fail(int errno)
    {
        _failed = true;
        var status = ImageFile.MapWriteError(errno);
        return status == IoStatus.Ok ? IoStatus.WriteError : status;
    }

    /// <summary>One flush under _flushGate: data, then the dirty metadata pages through the log.</summary>
    private async ValueTask<IoStatus> CommitAsync()
    {
        List<(long Offset, byte[] Data)> pages;
        long fileEnd;
        lock (_allocLock)
        {
            pages = SnapshotDirtyPages();
            fileEnd = _eof;
        }
        int errno = await _file.FlushAsync().ConfigureAwait(false);
        if (errno != 0) return Fail(errno);
        _logTail = _logHead;   // pages applied before that sync are durable: their entries are retired
        if (pages.Count == 0) return IoStatus.Ok;

        int perEntry = PagesPerLogEntry();
        for (int i = 0; i < pages.Count; i += perEntry)
        {
            var batch = pages.GetRange(i, Math.Min(perEntry, pages.Count - i));
            long size = (long)VhdxLogWriter.EntrySectors(batch.Count) * VhdxFormat.Page;
            Guid logGuid;
            lock (_headerLock) logGuid = _header.LogGuid;
            bool newEpoch = logGuid == Guid.Empty || _logHead + size > _logLength - VhdxFormat.Page;
            if (newEpoch)
            {
                // Restart the ring under a new LogGuid once every entry of the old one is applied and durable. The old
                // LogGuid is cleared before its ring is overwritten, and the new one is set only after its first entry
                // is durable, so a header never names a LogGuid without a complete entry behind it.
                if (_logHead != _logTail)
                {
                    errno = _file.SyncDataNow();
                    if (errno != 0) return Fail(errno);
                }
                if (logGuid != Guid.Empty)
                {
                    var cleared = UpdateHeaders(Guid.Empty, false);
                    if (cleared != IoStatus.Ok) return cleared;
                }
                logGuid = Guid.NewGuid();
                _logHead = _logTail = 0;
            }
            var entry = VhdxLogWriter.Build(logGuid, ++_logSequence, _logTail, fileEnd, fileEnd, batch);
            errno = _file.Write(_logOffset + _logHead, entry);
            if (errno != 0) return Fail(errno);
            errno = await _file.FlushAsync().ConfigureAwait(false);
            if (errno != 0) return Fail(errno);
            if (newEpoch)
            {
                var status = UpdateHeaders(logGuid, false);   // the commit point of an epoch's first entry
                if (status != IoStatus.Ok) return status;
            }
            _logHead += size;
            LogEntryDurableForTest?.Invoke();
            if (StopBeforeApplyForTest)
            {
                _failed = true;   // the test's "crash": nothing more reaches the file
                return IoStatus.Ok;
            }
            foreach (var (offset, data) in batch)
            {
                errno = _file.Write(offset, data);
                if (errno != 0) return Fail(errno);
            }
        }
        return IoStatus.Ok;
    }

    /// <summary>
    /// Copies and clears the dirty pages, ordered so every prefix is a valid file should one flush need several
    /// entries: bitmaps, then BAT pages from the end (a chunk's bitmap entry before its payload entries), then region
    /// tables (a relocated BAT is complete before it is named), then metadata. Under _allocLock.
    /// </summary>
    private List<(long Offset, byte[] Data)> SnapshotDirtyPages()
    {
        var pages = new List<(long Offset, byte[] Data, int Rank)>(_dirty.Count);
        foreach (var (offset, source) in _dirty)
        {
            var data = new byte[VhdxFormat.Page];
            int rank;
            if (source >= 0)
            {
                long sb = BlockOffset(_bat[BitmapEntryIndex(source)]);
                _bitmaps[source].AsSpan((int)(offset - sb), VhdxFormat.Page).CopyTo(data);
                rank = 0;
            }
            else if (source == SourceBat)
            {
                long first = (offset - _batOffset) / 8;
                for (int i = 0; i < VhdxFormat.Page / 8 && first + i < _bat.Length; i++)
                    BinaryPrimitives.WriteUInt64LittleEndian(data.AsSpan(i * 8), _bat[first + i]);
                rank = 1;
            }
            else if (source == SourceRegionTable)
            {
                long within = offset >= VhdxFormat.RegionTable2Offset ? offset - VhdxFormat.RegionTable2Offset : offset - VhdxFormat.RegionTable1Offset;
                _regionTable.AsSpan((int)within, VhdxFormat.Page).CopyTo(data);
                rank = 2;
            }
            else
            {
                _metadata.AsSpan((int)(offset - _metadataOffset), VhdxFormat.Page).CopyTo(data);
                rank = 3;
            }
            pages.Add((offset, data, rank));
        }
        _dirty.Clear();
        pages.Sort((a, b) => a.Rank != b.Rank ? a.Rank.CompareTo(b.Rank) : a.Rank == 1 ? b.Offset.CompareTo(a.Offset) : a.Offset.CompareTo(b.Offset));
        return pages.ConvertAll(p => (p.Offset, p.Data));
    }

    // ------------------------------------------------------------------ seal / dispose

    public IoStatus Seal()
    {
        if (_failed) return IoStatus.WriteError;
        if (!_writable) return IoStatus.Ok;
        var status = FlushAsync().AsTask().GetAwaiter().GetResult();
        if (status != IoStatus.Ok) return status;
        _flushGate.Wait();
        try
        {
            Guid logGuid;
            lock (_headerLock) logGuid = _header.LogGuid;
            if (logGuid != Guid.Empty)
            {
                // Everything applied in place must be durable before the log stops protecting it.
                int errno = _file.SyncDataNow();
                if (errno != 0) return Fail(errno);
                status = UpdateHeaders(Guid.Empty, false);
                if (status != IoStatus.Ok) return status;
                _logHead = _logTail = 0;
            }
            _writable = false;
            return IoStatus.Ok;
        }
        finally
        {
            _flushGate.Release();
        }
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        if (_writable && !_failed)
        {
            try { Seal(); }
            catch (Exception) { /* best effort: the log keeps the file consistent */ }
        }
        _file.Dispose();
    }

    // ------------------------------------------------------------------ growth

    public async ValueTask<IoStatus> GrowAsync(long newVirtualSize)
    {
        if (_failed) return IoStatus.WriteError;
        if (!_writable) return IoStatus.WriteProtected;
        if (newVirtualSize < VirtualSize || newVirtualSize > VhdxFormat.MaxVirtualSize) return IoStatus.OutOfRange;
        if (newVirtualSize % _logicalSectorSize != 0) return IoStatus.Misaligned;
        if (newVirtualSize == VirtualSize) return IoStatus.Ok;
        var status = StartSession(dataChange: true);
        if (status != IoStatus.Ok) return status;
        status = await FlushAsync().ConfigureAwait(false);   // the BAT in place is current before it is copied or extended
        if (status != IoStatus.Ok) return status;

        var sizeItem = FindMetadataItem(VhdxFormat.VirtualDiskSizeItem);
        if (sizeItem is null) return IoStatus.WriteError;
        long newBlocks = (newVirtualSize + _blockSize - 1) / _blockSize;
        long newChunks = (newBlocks + _chunkRatio - 1) / _chunkRatio;
        long newMirror = VhdxFormat.RoundUp(newChunks * (_chunkRatio + 1), VhdxFormat.Page / 8);
        lock (_allocLock)
        {
            var old = _bat;
            long oldChunks = _bitmaps.Length;
            var bat = new ulong[Math.Max(newMirror, old.Length)];
            old.CopyTo(bat, 0);
            // Entries past the old disk were reserved (ignored) and may hold anything: they start NOT_PRESENT.
            bool relocate = newMirror * 8 > _batLength;
            for (long i = 0; i < old.Length; i++)
            {
                bool sb = (i + 1) % (_chunkRatio + 1) == 0;
                bool beyond = sb ? i / (_chunkRatio + 1) >= oldChunks : i - i / (_chunkRatio + 1) >= _payloadBlocks;
                if (beyond && bat[i] != 0)
                {
                    bat[i] = 0;
                    if (!relocate) MarkDirty(_batOffset + i * 8 / VhdxFormat.Page * VhdxFormat.Page, SourceBat);
                }
            }
            if (!relocate && bat.Length > old.Length)
            {
                // Region entries the old mirror did not cover: other writers may have left anything there.
                var onDisk = new byte[(bat.Length - old.Length) * 8];
                try { ReadStructure(_batOffset + old.Length * 8, onDisk); }
                catch (StorageException) { return IoStatus.ReadError; }
                for (long i = 0; i < bat.Length - old.Length; i++)
                    if (BinaryPrimitives.ReadUInt64LittleEndian(onDisk.AsSpan((int)(i * 8))) != 0)
                        MarkDirty(_batOffset + (old.Length + i) * 8 / VhdxFormat.Page * VhdxFormat.Page, SourceBat);
            }
            if (relocate)
            {
                // The new BAT goes to the end of the file, complete and durable before the region table names it.
                long length = VhdxFormat.RoundUp(newMirror * 8, VhdxFormat.MiB);
                long at = _eof;
                int errno = _file.SetLength(at + length);
                if (errno != 0) return ImageFile.MapWriteError(errno);
                _eof = at + length;
                var image = new byte[Math.Min(length, 4 * VhdxFormat.MiB)];
                for (long done = 0; done < length; done += image.Length)
                {
                    Array.Clear(image);
                    for (int i = 0; i < image.Length / 8 && done / 8 + i < bat.Length; i++)
                        BinaryPrimitives.WriteUInt64LittleEndian(image.AsSpan(i * 8), bat[done / 8 + i]);
                    errno = _file.Write(at + done, image);
                    if (errno != 0) return Fail(errno);
                }
                errno = _file.SyncDataNow();
                if (errno != 0) return Fail(errno);
                var table = (byte[])_regionTable.Clone();
                VhdxRegionTable.Relocate(table, VhdxFormat.BatRegion, at, length);
                for (int page = 0; page < VhdxFormat.RegionTableLength / VhdxFormat.Page; page++)
                {
                    if (table.AsSpan(page * VhdxFormat.Page, VhdxFormat.Page).SequenceEqual(_regionTable.AsSpan(page * VhdxFormat.Page, VhdxFormat.Page))) continue;
                    MarkDirty(VhdxFormat.RegionTable1Offset + page * VhdxFormat.Page, SourceRegionTable);
                    MarkDirty(VhdxFormat.RegionTable2Offset + page * VhdxFormat.Page, SourceRegionTable);
                }
                _regionTable = table;
                _batOffset = at;
                _batLength = length;
            }
            var bitmaps = new byte[]?[newChunks];
            Array.Copy(_bitmaps, bitmaps, _bitmaps.Length);
            _bitmaps = bitmaps;
            Volatile.Write(ref _bat, bat);
            BinaryPrimitives.WriteUInt64LittleEndian(_metadata.AsSpan((int)sizeItem.Value.Offset), (ulong)newVirtualSize);
            MarkMetadataDirty(sizeItem.Value.Offset, 8);
            _payloadBlocks = newBlocks;
            Volatile.Write(ref _virtualSize, newVirtualSize);
        }
        return await FlushAsync().ConfigureAwait(false);
    }

    private void MarkMetadataDirty(long offset, long length)
    {
        for (long page = offset / VhdxFormat.Page; page <= (offset + Math.Max(length, 1) - 1) / VhdxFormat.Page; page++)
            MarkDirty(_metadataOffset + page * VhdxFormat.Page, SourceMetadata);
    }

    private VhdxMetadataEntry? FindMetadataItem(Guid id)
    {
        int count = BinaryPrimitives.ReadUInt16LittleEndian(_metadata.AsSpan(10));
        for (int i = 0; i < count; i++)
        {
            var e = _metadata.AsSpan(32 + i * 32, 32);
            var entry = new VhdxMetadataEntry(i, new Guid(e[..16]), BinaryPrimitives.ReadUInt32LittleEndian(e[16..]),
                BinaryPrimitives.ReadUInt32LittleEndian(e[20..]), BinaryPrimitives.ReadUInt32LittleEndian(e[24..]));
            if (entry.ItemId == id && !entry.IsUser) return entry;
        }
        return null;
    }

    // ------------------------------------------------------------------ parent locator

    /// <summary>
    /// Replaces the parent locator of this open, writable differencing file. The change goes through the log and is
    /// durable on return; DataWriteGuid is kept (a path fix is not a data change).
    /// </summary>
    public void SetParentLocator(IReadOnlyList<KeyValuePair<string, string>> entries)
    {
        if (!_hasParent) throw Refuse("not a differencing file: it has no parent locator to set");
        if (!_writable) throw Refuse("the file is not open for writing: cannot set its parent locator");
        if (VhdxMetadata.ValidateLocatorEntries(entries) is { } problem) throw Refuse(problem);
        var item = VhdxMetadata.BuildParentLocator(entries);
        if (item.Length > MaxParentLocatorBytes) throw Refuse($"parent locator of {item.Length} bytes is larger than {MaxParentLocatorBytes}");
        var status = StartSession(dataChange: false);
        if (status == IoStatus.Ok) status = FlushAsync().AsTask().GetAwaiter().GetResult();   // keep this change in an entry of its own
        if (status != IoStatus.Ok) throw Refuse($"cannot change the parent locator ({status})");
        lock (_allocLock)
        {
            var entry = FindMetadataItem(VhdxFormat.ParentLocatorItem) ?? throw Refuse("metadata has no parent locator item");
            long offset = entry.Offset;
            if (item.Length > entry.Length)
            {
                // Grow into free space after the last item.
                long end = VhdxFormat.MetadataTableLength;
                int count = BinaryPrimitives.ReadUInt16LittleEndian(_metadata.AsSpan(10));
                for (int i = 0; i < count; i++)
                {
                    var e = _metadata.AsSpan(32 + i * 32, 32);
                    end = Math.Max(end, (long)BinaryPrimitives.ReadUInt32LittleEndian(e[16..]) + BinaryPrimitives.ReadUInt32LittleEndian(e[20..]));
                }
                if (end + item.Length > _metadataLength)
                    throw Refuse($"the {_metadataLength}-byte metadata region has no room for a {item.Length}-byte parent locator");
                offset = end;
            }
            _metadata.AsSpan((int)entry.Offset, (int)entry.Length).Clear();
            MarkMetadataDirty(entry.Offset, entry.Length);
            item.CopyTo(_metadata.AsSpan((int)offset));
            MarkMetadataDirty(offset, item.Length);
            var tableEntry = _metadata.AsSpan(32 + entry.Index * 32, 32);
            BinaryPrimitives.WriteUInt32LittleEndian(tableEntry[16..], (uint)offset);
            BinaryPrimitives.WriteUInt32LittleEndian(tableEntry[20..], (uint)item.Length);
            MarkMetadataDirty(32 + entry.Index * 32, 32);
            Volatile.Write(ref _parentLocator, entries.ToArray());
        }
        status = FlushAsync().AsTask().GetAwaiter().GetResult();
        if (status != IoStatus.Ok) throw Refuse($"cannot make the new parent locator durable ({status})");
    }

    /// <summary>Rewrites the parent locator of a closed differencing file through its log, keeping its DataWriteGuid.</summary>
    public static void RewriteParentLocator(string path, IReadOnlyList<KeyValuePair<string, string>> entries)
    {
        using var file = Open(path, Guid.Empty, writable: true, preserveDataWriteGuid: true);
        file.SetParentLocator(entries);
        var status = file.Seal();
        if (status != IoStatus.Ok) throw new StorageException(path, $"cannot close the file cleanly after rewriting its parent locator ({status})");
    }

    // ------------------------------------------------------------------ create

    /// <summary>Creates a dynamic or (with <see cref="VhdxCreateOptions.Parent"/>) differencing VHDX and returns it open for writing.</summary>
    public static VhdxFile Create(string path, VhdxCreateOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        int lss = options.LogicalSectorSize, pss = options.PhysicalSectorSize;
        if (lss is not (512 or 4096)) throw new StorageException(path, $"logical sector size {lss} is not 512 or 4096");
        if (pss is not (512 or 4096)) throw new StorageException(path, $"physical sector size {pss} is not 512 or 4096");
        int blockSize = options.BlockSize ?? (options.Parent is null ? 32 << 20 : 2 << 20);
        if (blockSize < VhdxFormat.MinBlockSize || blockSize > VhdxFormat.MaxBlockSize || (blockSize & (blockSize - 1)) != 0)
            throw new StorageException(path, $"block size {blockSize} is not a power of two from 1 MiB to 256 MiB");
        long size = options.VirtualSize;
        if (size <= 0 || size > VhdxFormat.MaxVirtualSize || size % lss != 0)
            throw new StorageException(path, $"virtual size {size} is not a positive multiple of {lss} of at most 64 TiB");
        long logSize = options.LogSize;
        if (logSize < VhdxFormat.MiB || logSize > 256 * VhdxFormat.MiB || logSize % VhdxFormat.MiB != 0)
            throw new StorageException(path, $"log size {logSize} is not a multiple of 1 MiB from 1 to 256 MiB");
        byte[]? locator = null;
        if (options.Parent is { } parent)
        {
            var entries = parent.ToLocatorEntries();
            if (VhdxMetadata.ValidateLocatorEntries(entries) is { } problem) throw new StorageException(path, problem);
            locator = VhdxMetadata.BuildParentLocator(entries);
            if (locator.Length > MaxParentLocatorBytes) throw new StorageException(path, $"parent locator of {locator.Length} bytes is too large");
        }

        long chunkRatio = (long)VhdxFormat.SectorsPerBitmapBlock * lss / blockSize;
        long blocks = (size + blockSize - 1) / blockSize;
        long chunks = (blocks + chunkRatio - 1) / chunkRatio;
        // Sized for the differencing count even for a dynamic file, so either kind fits.
        long batLength = VhdxFormat.RoundUp(8 * chunks * (chunkRatio + 1), VhdxFormat.MiB);
        long logOffset = VhdxFormat.MiB;
        long metadataOffset = logOffset + logSize;
        long batOffset = metadataOffset + VhdxFormat.MiB;
        long fileLength = batOffset + batLength;

        var file = ImageFile.Create(path, fileLength);
        try
        {
            int errno = file.Write(0, VhdxFormat.FileIdentifier(CreatorName));
            var guid = Guid.NewGuid();
            var header = new VhdxHeader(1, guid, Guid.NewGuid(), Guid.Empty, 0, 1, (uint)logSize, (ulong)logOffset);
            var buffer = new byte[VhdxFormat.RegionTableLength];
            header.Write(buffer);
            if (errno == 0) errno = file.Write(VhdxFormat.Header1Offset, buffer.AsSpan(0, VhdxFormat.HeaderLength));
            (header with { SequenceNumber = 2 }).Write(buffer);
            if (errno == 0) errno = file.Write(VhdxFormat.Header2Offset, buffer.AsSpan(0, VhdxFormat.HeaderLength));
            VhdxRegionTable.Write(buffer, [
                new VhdxRegion(VhdxFormat.BatRegion, batOffset, batLength, true),
                new VhdxRegion(VhdxFormat.MetadataRegion, metadataOffset, VhdxFormat.MiB, true),
            ]);
            if (errno == 0) errno = file.Write(VhdxFormat.RegionTable1Offset, buffer);
            if (errno == 0) errno = file.Write(VhdxFormat.RegionTable2Offset, buffer);
            var page83 = options.Page83Id == Guid.Empty ? Guid.NewGuid() : options.Page83Id;
            var metadata = VhdxMetadata.Build(blockSize, locator is not null, size, page83, lss, pss, locator, out _);
            if (errno == 0) errno = file.Write(metadataOffset, metadata);
            if (errno == 0) errno = file.SyncNow();
            if (errno != 0) throw new StorageException(path, $"cannot write the new file (errno {errno})");
            LinuxFile.SyncDirectory(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!);
        }
        catch
        {
            file.Dispose();
            try { File.Delete(path); } catch (IOException) { }
            throw;
        }
        file.Dispose();
        return Open(path, options.DiskId == Guid.Empty ? Guid.NewGuid() : options.DiskId, writable: true);
    }
}
