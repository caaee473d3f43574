using System.Buffers.Binary;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Files;
using ISCSISnap.Storage.Native;

namespace ISCSISnap.Storage.Vhdx;

/// <summary>
/// A VHDX file (MS-VHDX v1.0), dynamic or differencing, as a chain layer. This part opens and validates the file;
/// VhdxFile.Io.cs holds the data path, VhdxFile.Metadata.cs the log, flush, headers and metadata changes.
/// A read-only open of a file whose log needs replay replays it in memory (an overlay over structure and payload
/// reads); a writable open replays it to disk and clears the LogGuid.
/// Threading: reads, writes, zeroing and flushes may run concurrently; Seal, GrowAsync and Dispose run alone.
/// </summary>
public sealed partial class VhdxFile : IWritableLayer
{
    private const string CreatorName = "ISCSISnap";
    /// <summary>Metadata regions are 1 MiB in every known writer; a much larger one is refused rather than loaded.</summary>
    private const long MaxMetadataRegion = 32 * VhdxFormat.MiB;
    /// <summary>Parent locators beyond this are refused (real ones are a few hundred bytes).</summary>
    private const int MaxParentLocatorBytes = 256 * 1024;

    private readonly ImageFile _file;
    private readonly bool _preserveDataWriteGuid;
    private volatile bool _writable;

    // Header state: the current copy and its slot (1 or 2). Changed only under _headerLock.
    private VhdxHeader _header;
    private int _currentSlot;
    private readonly long _logOffset, _logLength;
    private VhdxLogOverlay? _overlay;         // a read-only open's in-memory log replay
    private long _fileLength;                  // during open: the file's length (after an in-memory replay, the replayed length)

    // Geometry.
    private long _virtualSize;
    // Set once while opening, before the object is published.
    private int _blockSize, _blockShift;
    private int _logicalSectorSize, _physicalSectorSize;
    private long _chunkRatio;                  // payload blocks per sector-bitmap block
    private int _sectorsPerBlock;
    private long _payloadBlocks;

    // Structures mirrored in memory; pages of them become dirty and reach the file through the log.
    private byte[] _regionTable = [];          // the image both region table copies should hold
    private long _batOffset, _batLength;
    private ulong[] _bat = [];
    private long _metadataOffset, _metadataLength;
    private byte[] _metadata = [];
    private bool _hasParent;
    private IReadOnlyList<KeyValuePair<string, string>> _parentLocator = [];
    private byte[]?[] _bitmaps = [];           // per chunk, loaded on first need (differencing only)

    private VhdxFile(ImageFile file, Guid diskId, bool writable, bool preserveDataWriteGuid, long probedLength,
        VhdxHeader header, int slot, long logOffset, long logLength)
    {
        _file = file;
        DiskId = diskId;
        _writable = writable;
        _preserveDataWriteGuid = preserveDataWriteGuid;
        _header = header;
        _currentSlot = slot;
        _logOffset = logOffset;
        _logLength = logLength;
        _fileLength = probedLength;
    }

    // ------------------------------------------------------------------ properties

    public Guid DiskId { get; }
    public string Path => _file.Path;
    public long VirtualSize => Volatile.Read(ref _virtualSize);
    public int LogicalSectorSize => _logicalSectorSize;
    public int PhysicalSectorSize => _physicalSectorSize;
    public int BlockSize => _blockSize;
    public bool IsWritable => _writable;
    public Guid DataWriteGuid { get { lock (_headerLock) return _header.DataWriteGuid; } }
    public bool IsDifferencing => _hasParent;
    public IReadOnlyList<KeyValuePair<string, string>> ParentLocator => Volatile.Read(ref _parentLocator);
    public Guid Page83Id { get; private set; }
    public long AllocatedBytes => _file.AllocatedBytes;

    // ------------------------------------------------------------------ open

    /// <summary>
    /// Opens and validates an existing VHDX. <paramref name="diskId"/> is the chain identity reported as
    /// <see cref="DiskId"/> (empty is allowed for probing). Every fault is a <see cref="StorageException"/> naming the file.
    /// </summary>
    public static VhdxFile Open(string path, Guid diskId, bool writable, bool preserveDataWriteGuid = false)
    {
        var file = ImageFile.Open(path, readOnly: !writable);
        try
        {
            return OpenCore(file, diskId, writable, preserveDataWriteGuid);
        }
        catch (StorageException)
        {
            file.Dispose();
            throw;
        }
        catch (Exception e) when (e is ArgumentException or IndexOutOfRangeException or OverflowException or InvalidOperationException or OutOfMemoryException)
        {
            // A safety net only: every known fault has its own message. Reaching this is a validation gap.
            file.Dispose();
            throw new StorageException(path, $"unexpected structure fault while opening ({e.GetType().Name}: {e.Message})", e);
        }
    }

    private static VhdxFile OpenCore(ImageFile file, Guid diskId, bool writable, bool preserveDataWriteGuid)
    {
        string path = file.Path;
        long length = file.Length;
        if (length < VhdxFormat.HeaderSectionLength)
            throw new StorageException(path, $"file is {length} bytes, shorter than the 1 MiB VHDX header section (truncated or not a VHDX)");

        var buffer = new byte[VhdxFormat.RegionTableLength];
        ReadRaw(file, 0, buffer.AsSpan(0, 8));
        if (BinaryPrimitives.ReadUInt64LittleEndian(buffer) != VhdxFormat.FileSignature)
            throw new StorageException(path, "file type identifier at offset 0 is not 'vhdxfile' (not a VHDX file)");

        // Headers: the valid one with the larger sequence number is current (spec §2.2.2.1).
        ReadRaw(file, VhdxFormat.Header1Offset, buffer.AsSpan(0, VhdxFormat.HeaderLength));
        var h1 = VhdxHeader.TryParse(buffer, out string p1);
        ReadRaw(file, VhdxFormat.Header2Offset, buffer.AsSpan(0, VhdxFormat.HeaderLength));
        var h2 = VhdxHeader.TryParse(buffer, out string p2);
        VhdxHeader header;
        int slot;
        if (h1 is null && h2 is null)
            throw new StorageException(path, $"no valid header: header 1 at 0x10000 has {p1}; header 2 at 0x20000 has {p2}");
        if (h1 is null) (header, slot) = (h2!.Value, 2);
        else if (h2 is null) (header, slot) = (h1.Value, 1);
        else if (h1.Value.SequenceNumber > h2.Value.SequenceNumber) (header, slot) = (h1.Value, 1);
        else if (h2.Value.SequenceNumber > h1.Value.SequenceNumber) (header, slot) = (h2.Value, 2);
        else if (h1.Value == h2.Value) (header, slot) = (h1.Value, 1);   // identical copies (Disk2VHD writes them so)
        else throw new StorageException(path, $"both headers have sequence number {h1.Value.SequenceNumber} but differ: no current header");

        if (header.LogVersion != 0 && header.LogGuid != Guid.Empty)
            throw new StorageException(path, $"header {slot} has log version {header.LogVersion} (only 0 is defined) and a log to replay");
        long logOffset = (long)header.LogOffset, logLength = header.LogLength;
        if (header.LogOffset > (ulong)VhdxFormat.MaxFileOffset || logOffset % VhdxFormat.MiB != 0 || logOffset < VhdxFormat.HeaderSectionLength)
            throw new StorageException(path, $"header {slot} log offset 0x{header.LogOffset:x} is not a 1 MiB multiple at or past 1 MiB");
        if (logLength % VhdxFormat.MiB != 0 || logLength == 0)
            throw new StorageException(path, $"header {slot} log length {logLength} is not a non-zero multiple of 1 MiB");
        if (logOffset + logLength > length)
            throw new StorageException(path, $"log [0x{logOffset:x}, 0x{logOffset + logLength:x}) extends past the end of the file ({length} bytes; truncated?)");

        var vhdx = new VhdxFile(file, diskId, writable, preserveDataWriteGuid, length, header, slot, logOffset, logLength);
        if (header.LogGuid != Guid.Empty) vhdx.ReplayLog();
        vhdx.LoadStructures(buffer);
        return vhdx;
    }

    /// <summary>Reads bytes the caller has already checked lie inside the file.</summary>
    private static void ReadRaw(ImageFile file, long offset, Span<byte> destination)
    {
        destination.Clear();
        if (file.ReadExact(offset, destination) != IoStatus.Ok)
            throw new StorageException(file.Path, $"read error at offset 0x{offset:x} ({destination.Length} bytes)");
    }

    /// <summary>Reads structure bytes, seen through the in-memory log replay when there is one.</summary>
    private void ReadStructure(long offset, Span<byte> destination)
    {
        ReadRaw(_file, offset, destination);
        _overlay?.Apply(offset, destination);
    }

    private StorageException Refuse(string fault) => new(Path, fault);

    // Runs after any log replay, so it sees the replayed structures.
    private void LoadStructures(byte[] buffer)
    {
        long length = _fileLength;
        var occupied = new List<(long Start, long End, string What)>
        {
            (0, VhdxFormat.HeaderSectionLength, "the header section"),
            (_logOffset, _logOffset + _logLength, "the log"),
        };

        // Region table: copy 1, else copy 2 (QEMU reads only copy 1; a writable open repairs the other copy).
        ReadStructure(VhdxFormat.RegionTable1Offset, buffer);
        var regions = VhdxRegionTable.TryParse(buffer, out string r1);
        byte[] table1 = (byte[])buffer.Clone();
        ReadStructure(VhdxFormat.RegionTable2Offset, buffer);
        byte[] table2 = (byte[])buffer.Clone();
        string r2 = "";
        if (regions is null)
        {
            regions = VhdxRegionTable.TryParse(buffer, out r2);
            if (regions is null) throw Refuse($"no valid region table: copy 1 at 0x30000 has {r1}; copy 2 at 0x40000 has {r2}");
            _regionTable = table2;
        }
        else
        {
            _regionTable = table1;
        }
        if (!table1.AsSpan().SequenceEqual(table2)) _regionCopies = (table1, table2);

        (long Offset, long Length)? bat = null, metadata = null;
        var seen = new HashSet<Guid>();
        foreach (var region in regions)
        {
            string name = region.Id == VhdxFormat.BatRegion ? "BAT region" : region.Id == VhdxFormat.MetadataRegion ? "metadata region" : $"region {region.Id}";
            if (!seen.Add(region.Id)) throw Refuse($"region table lists {name} twice");
            bool known = region.Id == VhdxFormat.BatRegion || region.Id == VhdxFormat.MetadataRegion;
            if (!known && region.Required) throw Refuse($"region table has an unknown required region {region.Id}; this reader does not understand it");
            if (region.FileOffset % VhdxFormat.MiB != 0 || region.FileOffset < VhdxFormat.MiB)
                throw Refuse($"{name} offset 0x{region.FileOffset:x} is not a 1 MiB multiple at or past 1 MiB");
            if (region.Length == 0 || region.Length % VhdxFormat.MiB != 0)
                throw Refuse($"{name} length {region.Length} is not a non-zero multiple of 1 MiB");
            if (region.FileOffset + region.Length > length)
                throw Refuse($"{name} [0x{region.FileOffset:x}, 0x{region.FileOffset + region.Length:x}) extends past the end of the file ({length} bytes; truncated?)");
            occupied.Add((region.FileOffset, region.FileOffset + region.Length, name));
            if (region.Id == VhdxFormat.BatRegion) bat = (region.FileOffset, region.Length);
            if (region.Id == VhdxFormat.MetadataRegion) metadata = (region.FileOffset, region.Length);
        }
        if (bat is null) throw Refuse("region table has no BAT region");
        if (metadata is null) throw Refuse("region table has no metadata region");
        CheckOverlaps(occupied, "");
        _batOffset = bat.Value.Offset;
        _batLength = bat.Value.Length;

        LoadMetadata(metadata.Value.Offset, metadata.Value.Length);
        LoadBat(occupied);
    }

    private void CheckOverlaps(List<(long Start, long End, string What)> extents, string context)
    {
        extents.Sort((a, b) => a.Start.CompareTo(b.Start));
        for (int i = 1; i < extents.Count; i++)
        {
            var (prev, cur) = (extents[i - 1], extents[i]);
            if (cur.Start < prev.End)
                throw Refuse($"{cur.What} [0x{cur.Start:x}, 0x{cur.End:x}) overlaps {prev.What} [0x{prev.Start:x}, 0x{prev.End:x}){context}");
        }
    }

    private void LoadMetadata(long offset, long length)
    {
        if (length > MaxMetadataRegion) throw Refuse($"metadata region is {length} bytes; more than the {MaxMetadataRegion} this reader loads");
        var image = new byte[length];
        ReadStructure(offset, image);
        var m = image.AsSpan();
        if (BinaryPrimitives.ReadUInt64LittleEndian(m) != VhdxFormat.MetadataSignature)
            throw Refuse($"metadata table at 0x{offset:x} has a bad signature");
        int count = BinaryPrimitives.ReadUInt16LittleEndian(m[10..]);
        if (count > VhdxFormat.MaxTableEntries) throw Refuse($"metadata table has {count} entries, more than 2047");

        var items = new Dictionary<Guid, VhdxMetadataEntry>();
        var extents = new List<(long Start, long End, string What)>();
        int userItems = 0;
        for (int i = 0; i < count; i++)
        {
            var e = m.Slice(32 + i * 32, 32);
            var entry = new VhdxMetadataEntry(i, new Guid(e[..16]), BinaryPrimitives.ReadUInt32LittleEndian(e[16..]),
                BinaryPrimitives.ReadUInt32LittleEndian(e[20..]), BinaryPrimitives.ReadUInt32LittleEndian(e[24..]));
            string name = $"metadata item {entry.ItemId}";
            if (entry.Length == 0 && entry.Offset != 0) throw Refuse($"{name} is empty but has offset 0x{entry.Offset:x}");
            if (entry.Length > 0)
            {
                if (entry.Offset < VhdxFormat.MetadataTableLength) throw Refuse($"{name} offset 0x{entry.Offset:x} lies inside the 64 KiB metadata table");
                if (entry.Length > VhdxFormat.MiB) throw Refuse($"{name} is {entry.Length} bytes, more than 1 MiB");
                if ((long)entry.Offset + entry.Length > length)
                    throw Refuse($"{name} [0x{entry.Offset:x}, +{entry.Length}) extends past the {length}-byte metadata region");
                extents.Add((entry.Offset, (long)entry.Offset + entry.Length, name));
            }
            if (entry.IsUser)
            {
                if (++userItems > 1024) throw Refuse("metadata table has more than 1024 user items");
                continue;
            }
            bool known = entry.ItemId == VhdxFormat.FileParametersItem || entry.ItemId == VhdxFormat.VirtualDiskSizeItem ||
                         entry.ItemId == VhdxFormat.Page83Item || entry.ItemId == VhdxFormat.LogicalSectorSizeItem ||
                         entry.ItemId == VhdxFormat.PhysicalSectorSizeItem || entry.ItemId == VhdxFormat.ParentLocatorItem;
            if (!known)
            {
                if (entry.IsRequired) throw Refuse($"metadata table has an unknown required item {entry.ItemId}; this reader does not understand it");
                continue;
            }
            if (!items.TryAdd(entry.ItemId, entry)) throw Refuse($"{name} appears twice in the metadata table");
        }
        CheckOverlaps(extents, " in the metadata region");

        ReadOnlySpan<byte> Item(Guid id, string what, int expected)
        {
            if (!items.TryGetValue(id, out var entry)) throw Refuse($"metadata has no {what} item");
            if (expected > 0 && entry.Length != expected) throw Refuse($"metadata {what} item is {entry.Length} bytes, not {expected}");
            return image.AsSpan((int)entry.Offset, (int)entry.Length);
        }

        var fp = Item(VhdxFormat.FileParametersItem, "file parameters", 8);
        uint blockSize = BinaryPrimitives.ReadUInt32LittleEndian(fp);
        uint bits = BinaryPrimitives.ReadUInt32LittleEndian(fp[4..]);
        if (blockSize < VhdxFormat.MinBlockSize || blockSize > VhdxFormat.MaxBlockSize || (blockSize & (blockSize - 1)) != 0)
            throw Refuse($"block size {blockSize} is not a power of two from 1 MiB to 256 MiB");
        bool hasParent = (bits & 2) != 0;
        ulong virtualSize = BinaryPrimitives.ReadUInt64LittleEndian(Item(VhdxFormat.VirtualDiskSizeItem, "virtual disk size", 8));
        var page83 = new Guid(Item(VhdxFormat.Page83Item, "virtual disk ID (page 83)", 16));
        uint lss = BinaryPrimitives.ReadUInt32LittleEndian(Item(VhdxFormat.LogicalSectorSizeItem, "logical sector size", 4));
        uint pss = BinaryPrimitives.ReadUInt32LittleEndian(Item(VhdxFormat.PhysicalSectorSizeItem, "physical sector size", 4));
        if (lss is not (512 or 4096)) throw Refuse($"logical sector size {lss} is not 512 or 4096");
        if (pss is not (512 or 4096)) throw Refuse($"physical sector size {pss} is not 512 or 4096");
        if (virtualSize == 0 || virtualSize > VhdxFormat.MaxVirtualSize || virtualSize % lss != 0)
            throw Refuse($"virtual size {virtualSize} is not a non-zero multiple of the {lss}-byte logical sector of at most 64 TiB");

        IReadOnlyList<KeyValuePair<string, string>> locator = [];
        if (items.TryGetValue(VhdxFormat.ParentLocatorItem, out var locatorEntry))
        {
            if (!hasParent) throw Refuse("metadata has a parent locator but the file parameters say there is no parent");
            var parsed = VhdxMetadata.TryParseParentLocator(image.AsSpan((int)locatorEntry.Offset, (int)locatorEntry.Length), out string problem);
            locator = parsed ?? throw Refuse(problem);
        }
        else if (hasParent)
        {
            throw Refuse("file parameters say the file has a parent but metadata has no parent locator");
        }

        _blockSize = (int)blockSize;
        _blockShift = System.Numerics.BitOperations.Log2(blockSize);
        _logicalSectorSize = (int)lss;
        _physicalSectorSize = (int)pss;
        _chunkRatio = (long)VhdxFormat.SectorsPerBitmapBlock * lss / blockSize;
        _sectorsPerBlock = (int)(blockSize / lss);
        _hasParent = hasParent;
        _metadata = image;
        _metadataOffset = offset;
        _metadataLength = length;
        _virtualSize = (long)virtualSize;
        _payloadBlocks = ((long)virtualSize + blockSize - 1) / blockSize;
        _parentLocator = locator;
        Page83Id = page83;
    }

    /// <summary>BAT entries the spec requires (v1.0 count; the differencing count when there is a parent).</summary>
    private long SpecEntries(long payloadBlocks)
    {
        long chunks = (payloadBlocks + _chunkRatio - 1) / _chunkRatio;
        return _hasParent ? chunks * (_chunkRatio + 1) : payloadBlocks + (payloadBlocks - 1) / _chunkRatio;
    }

    /// <summary>Entries this reader insists on: the payload entries and the bitmap entries between them.</summary>
    private long MinimumEntries(long payloadBlocks) => payloadBlocks + (payloadBlocks - 1) / _chunkRatio;

    /// <summary>Entries mirrored in memory: every entry of a differencing file's last chunk, rounded to 4 KiB pages, within the region.</summary>
    private long MirrorEntries(long payloadBlocks, long regionLength)
    {
        long chunks = (payloadBlocks + _chunkRatio - 1) / _chunkRatio;
        long wanted = VhdxFormat.RoundUp(chunks * (_chunkRatio + 1), VhdxFormat.Page / 8);
        return Math.Min(wanted, regionLength / 8);
    }

    private void LoadBat(List<(long Start, long End, string What)> occupied)
    {
        long length = _fileLength;
        long required = MinimumEntries(_payloadBlocks);
        if (required * 8 > _batLength)
            throw Refuse($"BAT region is {_batLength} bytes but {required} entries ({required * 8} bytes) are needed for {_payloadBlocks} blocks");
        long mirror = MirrorEntries(_payloadBlocks, _batLength);
        _bat = new ulong[mirror];
        var bytes = new byte[(int)Math.Min(mirror * 8, VhdxFormat.MiB)];
        for (long done = 0; done < mirror * 8; done += bytes.Length)
        {
            int n = (int)Math.Min(bytes.Length, mirror * 8 - done);
            ReadStructure(_batOffset + done, bytes.AsSpan(0, n));
            for (int i = 0; i < n / 8; i++) _bat[done / 8 + i] = BinaryPrimitives.ReadUInt64LittleEndian(bytes.AsSpan(i * 8));
        }

        long chunks = (_payloadBlocks + _chunkRatio - 1) / _chunkRatio;
        _bitmaps = new byte[]?[chunks];
        for (long i = 0; i < mirror; i++)
        {
            ulong entry = _bat[i];
            int state = (int)(entry & VhdxFormat.StateMask);
            long offset = (long)(entry & VhdxFormat.OffsetMask);
            bool bitmapEntry = (i + 1) % (_chunkRatio + 1) == 0;
            if (bitmapEntry)
            {
                long chunk = i / (_chunkRatio + 1);
                if (chunk >= chunks) continue;   // beyond the disk: reserved, ignored
                if (state == VhdxFormat.NotPresent) continue;
                if (!_hasParent || state != VhdxFormat.SbPresent)
                    throw Refuse($"BAT entry {i} (sector bitmap of chunk {chunk}) has state {state}, invalid for a {(_hasParent ? "differencing" : "dynamic")} file");
                CheckBlock(i, offset, VhdxFormat.MiB, VhdxFormat.MiB, length, "sector bitmap block", occupied);
                continue;
            }
            long block = i - i / (_chunkRatio + 1);
            if (block >= _payloadBlocks) continue;
            switch (state)
            {
                case VhdxFormat.NotPresent or VhdxFormat.Undefined or VhdxFormat.Zero or VhdxFormat.Unmapped or 5:
                    break;   // offsets of these states are reserved or advisory; ignored
                case VhdxFormat.FullyPresent:
                case VhdxFormat.PartiallyPresent when _hasParent:
                {
                    // The last block may be short by the part beyond the virtual size (QEMU allows it too).
                    long needed = Math.Min(_blockSize, _virtualSize - block * (long)_blockSize);
                    CheckBlock(i, offset, _blockSize, needed, length, $"payload block {block}", occupied);
                    if (state == VhdxFormat.PartiallyPresent)
                    {
                        long sbIndex = (block / _chunkRatio) * (_chunkRatio + 1) + _chunkRatio;
                        if (sbIndex >= mirror || (_bat[sbIndex] & VhdxFormat.StateMask) != VhdxFormat.SbPresent)
                            throw Refuse($"BAT entry {i} (payload block {block}) is PARTIALLY_PRESENT but its chunk's sector bitmap is not present");
                    }
                    break;
                }
                default:
                    throw Refuse($"BAT entry {i} (payload block {block}) has state {state}, invalid for a {(_hasParent ? "differencing" : "dynamic")} file");
            }
        }
        CheckOverlaps(occupied, "");
        long end = length;
        foreach (var e in occupied) end = Math.Max(end, e.End);
        _eof = VhdxFormat.RoundUp(end, VhdxFormat.MiB);
    }

    private void CheckBlock(long index, long offset, long size, long needed, long fileLength, string what, List<(long, long, string)> occupied)
    {
        if (offset < 0 || offset > VhdxFormat.MaxFileOffset)
            throw Refuse($"BAT entry {index} ({what}) points at file offset 0x{(ulong)offset:x}, past the end of the file ({fileLength} bytes)");
        if (offset < VhdxFormat.HeaderSectionLength)
            throw Refuse($"BAT entry {index} ({what}) points at file offset 0x{offset:x}, inside the header section");
        if (offset + needed > fileLength)
            throw Refuse($"BAT entry {index} ({what}) at file offset 0x{offset:x} + {needed} bytes points past the end of the file ({fileLength} bytes; truncated?)");
        occupied.Add((offset, offset + Math.Min(size, Math.Max(needed, VhdxFormat.MiB)), $"BAT entry {index} ({what})"));
    }
}
