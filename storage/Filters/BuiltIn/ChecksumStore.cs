using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Text;
using Microsoft.Win32.SafeHandles;

namespace ISCSISnap.Storage.Filters.BuiltIn;

/// <summary>
/// The CRC-32C of every sector of one chain layer (by disk ID), in the file <c>&lt;directory&gt;/&lt;diskId&gt;.crc</c>:
/// a header, a write-intent bitmap (one bit per <see cref="RegionBytes"/> of LBA) and a dense table of one uint per
/// sector (0 = not recorded), grown sparsely. The whole table lives in memory as chunks (a chunk is allocated once a
/// CRC in it is recorded); table chunks go to the file lazily at a checkpoint. A region's bit is made durable before
/// the first write into it goes down and cleared only after a checkpoint made its data and CRCs durable, so after an
/// unclean stop the regions still marked are reset to "not recorded" at open. Stores are shared process-wide by
/// path (a frozen layer under several chains), counted by <see cref="Acquire"/> and <see cref="Release"/>.
/// Threading: thread-safe; lookups and records are lock-free array accesses once a chunk exists.
/// </summary>
public sealed class ChecksumStore
{
    /// <summary>LBA bytes per write-intent bit.</summary>
    public const long RegionBytes = 8L << 20;
    private const int RegionShift = 23;
    private const int HeaderBytes = 4096;
    /// <summary>Bitmap room for 64 TiB of LBA (8 Mi regions); sparse in the file.</summary>
    private const long BitmapBytes = 1 << 20;
    private const long TableOffset = HeaderBytes + BitmapBytes;
    private const int ChunkShift = 14;              // 16 Ki sectors (64 KiB of CRCs) per table chunk
    private const int ChunkEntries = 1 << ChunkShift;
    private const int RegionChunkShift = 10;        // 1 Ki regions (8 GiB of LBA) per region-state chunk
    private static ReadOnlySpan<byte> Magic => "ISNPCRC1"u8;

    private static readonly Dictionary<string, ChecksumStore> s_open = new();

    private readonly SafeFileHandle _file;
    private readonly object _lock = new();
    private readonly int _sectorShift;
    private Chunk?[] _chunks;
    private RegionChunk?[] _regions;
    private byte[] _bitmap;                          // mirrors the regions' dirty state; written whole-page by FlushBitmapAsync
    private long _bitmapVersion, _durableVersion;    // changes to _bitmap, and the newest version on disk
    private readonly SemaphoreSlim _bitmapWriter = new(1, 1);
    private readonly SemaphoreSlim _checkpointing = new(1, 1);
    private int _references;
    private int _dirtyRegions;

    private sealed class Chunk
    {
        public readonly uint[] Entries = new uint[ChunkEntries];
        public int Dirty;
    }

    /// <summary>Per region: writes in flight, writes begun (a generation), and its bit (0 clean, 1 dirty, 2 being cleared).</summary>
    private sealed class RegionChunk
    {
        public readonly int[] InFlight = new int[1 << RegionChunkShift];
        public readonly int[] Generation = new int[1 << RegionChunkShift];
        public readonly int[] State = new int[1 << RegionChunkShift];
        public readonly long[] SetVersion = new long[1 << RegionChunkShift];
    }

    private const int Clean = 0, Dirty = 1, Clearing = 2;

    private ChecksumStore(string path, Guid diskId, int sectorSize, SafeFileHandle file, Chunk?[] chunks, int regionsUsed)
    {
        Path = path;
        DiskId = diskId;
        SectorSize = sectorSize;
        _sectorShift = System.Numerics.BitOperations.Log2((uint)sectorSize);
        _file = file;
        _chunks = chunks;
        _regions = new RegionChunk?[Math.Max(1, (regionsUsed >> RegionChunkShift) + 1)];
        _bitmap = new byte[Math.Max(HeaderBytes, (regionsUsed / 8 + HeaderBytes) / HeaderBytes * HeaderBytes)];
    }

    public string Path { get; }
    public Guid DiskId { get; }
    public int SectorSize { get; }

    /// <summary>Regions whose bit is set now (in memory).</summary>
    public int DirtyRegions => Volatile.Read(ref _dirtyRegions);

    /// <summary>Regions found dirty (after an unclean stop) and reset when the file was opened.</summary>
    public int RegionsResetAtOpen { get; private set; }

    // ---------------------------------------------------------------- open and close

    /// <summary>Opens (or creates) the store of <paramref name="diskId"/> in <paramref name="directory"/>, or adds a reference to the one open. Blocking file IO: call off the IO workers.</summary>
    /// <summary>
    /// Deletes the stores of layers that no longer exist (merged or deleted while no filter held them); returns the
    /// files deleted. Run at start, before any filter opens a store.
    /// </summary>
    public static IReadOnlyList<string> RemoveOrphans(string directory, IReadOnlySet<Guid> layers)
    {
        var removed = new List<string>();
        if (!Directory.Exists(directory)) return removed;
        foreach (var file in Directory.EnumerateFiles(directory, "*.crc"))
        {
            if (!Guid.TryParse(System.IO.Path.GetFileNameWithoutExtension(file), out var id) || layers.Contains(id)) continue;
            File.Delete(file);
            removed.Add(file);
        }
        return removed;
    }

    public static ChecksumStore Acquire(string directory, Guid diskId, int sectorSize)
    {
        string path = System.IO.Path.GetFullPath(System.IO.Path.Combine(directory, diskId.ToString("D") + ".crc"));
        lock (s_open)
        {
            if (!s_open.TryGetValue(path, out var store))
            {
                Directory.CreateDirectory(directory);
                store = Open(path, diskId, sectorSize);
                s_open[path] = store;
            }
            if (store.SectorSize != sectorSize) throw new InvalidOperationException($"{path} is open with {store.SectorSize}-byte sectors, not {sectorSize}");
            store._references++;
            return store;
        }
    }

    /// <summary>Drops a reference; the last closes the file. Call <see cref="CheckpointAsync"/> first for a clean close.</summary>
    public void Release()
    {
        lock (s_open)
        {
            if (--_references > 0) return;
            s_open.Remove(Path);
            _file.Dispose();
        }
    }

    private static ChecksumStore Open(string path, Guid diskId, int sectorSize)
    {
        var file = File.OpenHandle(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.Read);
        try
        {
            long length = RandomAccess.GetLength(file);
            var header = new byte[HeaderBytes];
            bool valid = length >= TableOffset && RandomAccess.Read(file, header, 0) == HeaderBytes && header.AsSpan(0, 8).SequenceEqual(Magic)
                && BinaryPrimitives.ReadInt32LittleEndian(header.AsSpan(8)) == sectorSize
                && BinaryPrimitives.ReadInt32LittleEndian(header.AsSpan(12)) == RegionShift;
            if (!valid)
            {
                // New, or unusable (another sector size, a torn create): start empty; nothing recorded is never wrong.
                RandomAccess.SetLength(file, 0);
                header.AsSpan().Clear();
                Magic.CopyTo(header);
                BinaryPrimitives.WriteInt32LittleEndian(header.AsSpan(8), sectorSize);
                BinaryPrimitives.WriteInt32LittleEndian(header.AsSpan(12), RegionShift);
                RandomAccess.Write(file, header, 0);
                RandomAccess.SetLength(file, TableOffset);
                RandomAccess.FlushToDisk(file);
                return new ChecksumStore(path, diskId, sectorSize, file, new Chunk?[1], 0);
            }

            // Regions marked at an unclean stop: their data may be old or new, so forget their CRCs.
            var bitmap = new byte[BitmapBytes];
            RandomAccess.Read(file, bitmap, HeaderBytes);
            int reset = 0;
            var zeros = new byte[(RegionBytes >> System.Numerics.BitOperations.Log2((uint)sectorSize)) * sizeof(uint)];
            for (int i = 0; i < bitmap.Length; i++)
            {
                if (bitmap[i] == 0) continue;
                for (int bit = 0; bit < 8; bit++)
                {
                    if ((bitmap[i] & (1 << bit)) == 0) continue;
                    long region = i * 8L + bit;
                    long at = TableOffset + region * zeros.Length;
                    if (at < length) RandomAccess.Write(file, zeros.AsSpan(0, (int)Math.Min(zeros.Length, length - at)), at);
                    reset++;
                }
            }
            if (reset > 0)
            {
                RandomAccess.FlushToDisk(file);   // the resets are durable before the bits go
                RandomAccess.Write(file, new byte[BitmapBytes], HeaderBytes);
                RandomAccess.FlushToDisk(file);
            }

            // Load the table; chunks with nothing recorded stay unallocated.
            long entries = (length - TableOffset) / sizeof(uint);
            var chunks = new Chunk?[Math.Max(1, (entries + ChunkEntries - 1) >> ChunkShift)];
            var buffer = new byte[ChunkEntries * sizeof(uint)];
            for (long c = 0; c < chunks.Length; c++)
            {
                long at = TableOffset + c * buffer.Length;
                int n = at < length ? RandomAccess.Read(file, buffer.AsSpan(0, (int)Math.Min(buffer.Length, length - at)), at) : 0;
                if (n == 0 || !buffer.AsSpan(0, n).ContainsAnyExcept((byte)0)) continue;
                var chunk = new Chunk();
                buffer.AsSpan(0, n).CopyTo(MemoryMarshal.AsBytes(chunk.Entries.AsSpan()));
                chunks[c] = chunk;
                buffer.AsSpan().Clear();
            }
            return new ChecksumStore(path, diskId, sectorSize, file, chunks, 0) { RegionsResetAtOpen = reset };
        }
        catch
        {
            file.Dispose();
            throw;
        }
    }

    // ---------------------------------------------------------------- the table

    /// <summary>The CRC recorded for <paramref name="sector"/>, 0 when none is.</summary>
    public uint Get(long sector)
    {
        var chunks = Volatile.Read(ref _chunks);
        long c = sector >> ChunkShift;
        return c < chunks.Length && chunks[c] is { } chunk ? Volatile.Read(ref chunk.Entries[sector & (ChunkEntries - 1)]) : 0;
    }

    /// <summary>Records <paramref name="crcs"/> for the sectors from <paramref name="sector"/> (0 = not recorded).</summary>
    public void Set(long sector, ReadOnlySpan<uint> crcs)
    {
        while (!crcs.IsEmpty)
        {
            int within = (int)(sector & (ChunkEntries - 1));
            int n = Math.Min(crcs.Length, ChunkEntries - within);
            var chunk = ChunkOf(sector >> ChunkShift, create: true)!;
            crcs.Slice(0, n).CopyTo(chunk.Entries.AsSpan(within, n));
            Volatile.Write(ref chunk.Dirty, 1);
            sector += n;
            crcs = crcs.Slice(n);
        }
    }

    /// <summary>Forgets the CRCs of <paramref name="count"/> sectors from <paramref name="sector"/>.</summary>
    public void Reset(long sector, long count)
    {
        while (count > 0)
        {
            int within = (int)(sector & (ChunkEntries - 1));
            int n = (int)Math.Min(count, ChunkEntries - within);
            if (ChunkOf(sector >> ChunkShift, create: false) is { } chunk)
            {
                chunk.Entries.AsSpan(within, n).Clear();
                Volatile.Write(ref chunk.Dirty, 1);
            }
            sector += n;
            count -= n;
        }
    }

    private Chunk? ChunkOf(long index, bool create)
    {
        var chunks = Volatile.Read(ref _chunks);
        if (index < chunks.Length && chunks[index] is { } found) return found;
        if (!create) return null;
        // Readers holding the old array see the same chunk objects; one missing there reads as "not recorded".
        return GetOrCreate(ref _chunks, index);
    }

    /// <summary>The entry at <paramref name="index"/> of a table that grows by doubling (made under the lock, published whole).</summary>
    private T GetOrCreate<T>(ref T?[] table, long index) where T : class, new()
    {
        lock (_lock)
        {
            var current = table;
            if (index >= current.Length)
            {
                Array.Resize(ref current, (int)Math.Max(index + 1, current.Length * 2L));
                Volatile.Write(ref table, current);
            }
            return current[index] ??= new T();
        }
    }

    // ---------------------------------------------------------------- the write-intent bitmap

    private RegionChunk RegionChunkOf(long region)
    {
        long index = region >> RegionChunkShift;
        var regions = Volatile.Read(ref _regions);
        if (index < regions.Length && regions[index] is { } found) return found;
        return GetOrCreate(ref _regions, index);
    }

    /// <summary>
    /// A write into [<paramref name="offset"/>, +<paramref name="length"/>) of this layer is about to go down: counts
    /// it in flight and returns once each region it touches is durably marked dirty. Pair with <see cref="EndWrite"/>.
    /// </summary>
    public ValueTask BeginWriteAsync(long offset, long length)
    {
        long first = offset >> RegionShift, last = (offset + length - 1) >> RegionShift;
        long waitFor = 0;
        for (long r = first; r <= last; r++)
        {
            var rc = RegionChunkOf(r);
            int i = (int)(r & ((1 << RegionChunkShift) - 1));
            Interlocked.Increment(ref rc.InFlight[i]);
            Interlocked.Increment(ref rc.Generation[i]);
            // The increments above are full fences: a checkpoint that starts clearing after this read sees them.
            if (Volatile.Read(ref rc.State[i]) != Dirty) waitFor = Math.Max(waitFor, MarkDirty(rc, i, r));
            else waitFor = Math.Max(waitFor, Volatile.Read(ref rc.SetVersion[i]));
        }
        return waitFor <= Volatile.Read(ref _durableVersion) ? ValueTask.CompletedTask : FlushBitmapAsync(waitFor);
    }

    public void EndWrite(long offset, long length)
    {
        long first = offset >> RegionShift, last = (offset + length - 1) >> RegionShift;
        for (long r = first; r <= last; r++)
        {
            var rc = RegionChunkOf(r);
            Interlocked.Decrement(ref rc.InFlight[(int)(r & ((1 << RegionChunkShift) - 1))]);
        }
    }

    /// <summary>Sets a region's bit (unless set) and returns the bitmap version that holds it.</summary>
    private long MarkDirty(RegionChunk rc, int i, long region)
    {
        lock (_lock)
        {
            // Under the lock a checkpoint's decision (Clearing → Clean or Dirty) is complete.
            if (rc.State[i] != Dirty)
            {
                if (rc.State[i] == Clean) _dirtyRegions++;
                SetBit(region, true);
                rc.SetVersion[i] = ++_bitmapVersion;
                Volatile.Write(ref rc.State[i], Dirty);
            }
            return rc.SetVersion[i];
        }
    }

    private void SetBit(long region, bool on)
    {
        long index = region >> 3;
        if (index >= BitmapBytes) throw new InvalidOperationException("the LUN is larger than a checksum store covers (64 TiB)");
        if (index >= _bitmap.Length) Array.Resize(ref _bitmap, (int)Math.Min(BitmapBytes, Math.Max(index + 1 + HeaderBytes, _bitmap.Length * 2L) / HeaderBytes * HeaderBytes));
        if (on) _bitmap[index] |= (byte)(1 << (int)(region & 7));
        else _bitmap[index] &= (byte)~(1 << (int)(region & 7));
    }

    /// <summary>Writes the bitmap and fsyncs it until version <paramref name="version"/> is durable; concurrent callers share one write.</summary>
    private async ValueTask FlushBitmapAsync(long version)
    {
        await _bitmapWriter.WaitAsync().ConfigureAwait(false);
        try
        {
            if (Volatile.Read(ref _durableVersion) >= version) return;   // an earlier writer's flush covered ours
            byte[] snapshot;
            long snapshotVersion;
            lock (_lock)
            {
                snapshot = (byte[])_bitmap.Clone();
                snapshotVersion = _bitmapVersion;
            }
            await Task.Run(() =>
            {
                RandomAccess.Write(_file, snapshot, HeaderBytes);
                RandomAccess.FlushToDisk(_file);
            }).ConfigureAwait(false);
            Volatile.Write(ref _durableVersion, snapshotVersion);
        }
        finally
        {
            _bitmapWriter.Release();
        }
    }

    // ---------------------------------------------------------------- checkpoints

    /// <summary>Generations of the dirty regions, noted by a checkpoint before it flushes the device.</summary>
    public readonly struct Marks
    {
        internal readonly (long Region, int Generation)[]? Regions;
        internal Marks((long, int)[]? regions) => Regions = regions;
        public bool IsEmpty => Regions is null || Regions.Length == 0;
    }

    /// <summary>Notes the generation of every dirty region (step 1 of a checkpoint, before the data flush).</summary>
    public Marks Mark()
    {
        if (Volatile.Read(ref _dirtyRegions) == 0) return default;
        var list = new List<(long, int)>();
        var regions = Volatile.Read(ref _regions);
        for (int c = 0; c < regions.Length; c++)
        {
            if (regions[c] is not { } rc) continue;
            for (int i = 0; i < rc.State.Length; i++)
                if (Volatile.Read(ref rc.State[i]) == Dirty) list.Add(((long)c << RegionChunkShift | (uint)i, Volatile.Read(ref rc.Generation[i])));
        }
        return new Marks(list.ToArray());
    }

    /// <summary>
    /// Step 2 of a checkpoint, after the data the marked regions hold was flushed: writes the changed table chunks,
    /// fsyncs them, then clears the bits of marked regions no write entered since (nor is in) and fsyncs the bitmap.
    /// </summary>
    public async Task CheckpointAsync(Marks marks)
    {
        await _checkpointing.WaitAsync().ConfigureAwait(false);
        try
        {
            await Task.Run(WriteTable).ConfigureAwait(false);
            if (marks.IsEmpty) return;
            bool cleared = false;
            foreach (var (region, generation) in marks.Regions!)
            {
                var rc = RegionChunkOf(region);
                int i = (int)(region & ((1 << RegionChunkShift) - 1));
                lock (_lock)
                {
                    if (rc.State[i] != Dirty) continue;
                    // Clearing makes writers that read the state from here on take the lock (MarkDirty), which waits for this decision.
                    Interlocked.Exchange(ref rc.State[i], Clearing);
                    if (Volatile.Read(ref rc.InFlight[i]) == 0 && Volatile.Read(ref rc.Generation[i]) == generation)
                    {
                        SetBit(region, false);
                        _bitmapVersion++;
                        _dirtyRegions--;
                        Volatile.Write(ref rc.State[i], Clean);
                        cleared = true;
                    }
                    else
                    {
                        Volatile.Write(ref rc.State[i], Dirty);
                    }
                }
            }
            if (cleared) await FlushBitmapAsync(Interlocked.Read(ref _bitmapVersion)).ConfigureAwait(false);
        }
        finally
        {
            _checkpointing.Release();
        }
    }

    /// <summary>pwrites the dirty chunks and fsyncs the file (blocking).</summary>
    private void WriteTable()
    {
        var chunks = Volatile.Read(ref _chunks);
        bool wrote = false;
        for (long c = 0; c < chunks.Length; c++)
        {
            // Cleared before the write: a record racing it dirties the chunk again for the next checkpoint.
            if (chunks[c] is not { } chunk || Interlocked.Exchange(ref chunk.Dirty, 0) == 0) continue;
            RandomAccess.Write(_file, MemoryMarshal.AsBytes(chunk.Entries.AsSpan()), TableOffset + c * ChunkEntries * sizeof(uint));
            wrote = true;
        }
        if (wrote) RandomAccess.FlushToDisk(_file);
    }

    /// <summary>Sector index of a LUN byte offset.</summary>
    public long SectorOf(long offset) => offset >> _sectorShift;

    /// <summary>Byte offset in the file of a sector's CRC (tests corrupt or inspect it).</summary>
    public static long TableOffsetOf(long sector) => TableOffset + sector * sizeof(uint);

    public override string ToString() => new StringBuilder().Append("crc store ").Append(DiskId).ToString();
}
