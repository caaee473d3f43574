using System.Buffers.Binary;
using ISCSISnap.Storage.Integrity;

namespace ISCSISnap.Storage.Chains;

/// <summary>
/// Which layer of a chain owns each logical sector: the topmost layer that holds it, or 0 when none does
/// (the sector reads as zeros). Resolving a sector costs the same at chain depth 1 and 64: two array
/// indexes and, inside a mixed 1 MiB chunk, a binary search over that chunk's runs.
/// Layout: segments of 4096 chunks (4 GiB at 512-byte sectors) allocated only when they stop being uniform;
/// a chunk entry is either one owner (uniform chunk) or a reference to an immutable run list.
/// Threading: lookups are lock-free and may run concurrently with <see cref="SetOwner"/>, which writers
/// serialise on an internal lock; a lookup sees either the old or the new owner of a sector being changed.
/// </summary>
public sealed class ChainMap
{
    public const int ChunkBytes = 1 << 20;
    private const int ChunksPerSegment = 4096;
    private const uint RunsFlag = 0x8000_0000;

    private readonly object _write = new();
    private readonly int _sectorShift;
    private readonly int _sectorsPerChunkShift;
    private Segment?[] _segments;
    private ushort[] _segmentDefaults;

    private sealed class Segment
    {
        public readonly uint[] Chunks = new uint[ChunksPerSegment];
        /// <summary>Run lists: each entry (start sector in chunk &lt;&lt; 16 | owner), sorted, first start 0; replaced, never mutated.</summary>
        public readonly List<uint[]?> Runs = new();
        public readonly Stack<int> FreeRuns = new();
    }

    public ChainMap(long virtualSize, int sectorSize, ushort initialOwner = 0)
    {
        if (sectorSize is not (512 or 4096)) throw new ArgumentOutOfRangeException(nameof(sectorSize));
        SectorSize = sectorSize;
        _sectorShift = System.Numerics.BitOperations.Log2((uint)sectorSize);
        _sectorsPerChunkShift = System.Numerics.BitOperations.Log2((uint)(ChunkBytes / sectorSize));
        VirtualSize = virtualSize;
        int segments = (int)((ChunkCount(virtualSize) + ChunksPerSegment - 1) / ChunksPerSegment);
        _segments = new Segment?[Math.Max(1, segments)];
        _segmentDefaults = new ushort[_segments.Length];
        Array.Fill(_segmentDefaults, initialOwner);
    }

    public int SectorSize { get; }
    public long VirtualSize { get; private set; }
    public long SectorCount => VirtualSize >> _sectorShift;
    private int SectorsPerChunk => 1 << _sectorsPerChunkShift;

    private static long ChunkCount(long virtualSize) => (virtualSize + ChunkBytes - 1) / ChunkBytes;

    /// <summary>The owner of <paramref name="sector"/> and how many sectors from it (within its chunk) share that owner.</summary>
    public ushort Lookup(long sector, out int runSectors)
    {
        long chunk = sector >> _sectorsPerChunkShift;
        int inChunk = (int)(sector & (SectorsPerChunk - 1));
        int segmentIndex = (int)(chunk / ChunksPerSegment);
        var segments = Volatile.Read(ref _segments);
        var segment = Volatile.Read(ref segments[segmentIndex]);
        if (segment is null)
        {
            runSectors = SectorsPerChunk - inChunk;
            return Volatile.Read(ref _segmentDefaults)[segmentIndex];
        }
        uint entry = Volatile.Read(ref segment.Chunks[chunk % ChunksPerSegment]);
        if ((entry & RunsFlag) == 0)
        {
            runSectors = SectorsPerChunk - inChunk;
            return (ushort)entry;
        }
        // The run list is read once and never mutated, so a concurrent writer cannot tear this lookup.
        var runs = Volatile.Read(ref System.Runtime.InteropServices.CollectionsMarshal.AsSpan(segment.Runs)[(int)(entry & ~RunsFlag)])!;
        int low = 0, high = runs.Length - 1;
        while (low < high)
        {
            int middle = (low + high + 1) >> 1;
            if ((int)(runs[middle] >> 16) <= inChunk) low = middle;
            else high = middle - 1;
        }
        int end = low + 1 < runs.Length ? (int)(runs[low + 1] >> 16) : SectorsPerChunk;
        runSectors = end - inChunk;
        return (ushort)runs[low];
    }

    /// <summary>
    /// Makes <paramref name="owner"/> the owner of [sector, sector+count); with <paramref name="onlyWhere"/> only
    /// the sectors whose current owner it accepts change (used when layers merge).
    /// </summary>
    public void SetOwner(long sector, long count, ushort owner, Func<ushort, bool>? onlyWhere = null)
    {
        if (count <= 0) return;
        lock (_write)
        {
            long end = Math.Min(sector + count, SectorCount);
            while (sector < end)
            {
                long chunk = sector >> _sectorsPerChunkShift;
                long chunkStart = chunk << _sectorsPerChunkShift;
                int from = (int)(sector - chunkStart);
                int to = (int)Math.Min(end - chunkStart, SectorsPerChunk);
                SetInChunk(chunk, from, to, owner, onlyWhere);
                sector = chunkStart + to;
            }
        }
    }

    private void SetInChunk(long chunk, int from, int to, ushort owner, Func<ushort, bool>? onlyWhere)
    {
        int segmentIndex = (int)(chunk / ChunksPerSegment);
        int index = (int)(chunk % ChunksPerSegment);
        var segment = _segments[segmentIndex];
        if (segment is null)
        {
            ushort fallback = _segmentDefaults[segmentIndex];
            bool wholeChunk = from == 0 && to == SectorsPerChunk;
            if (fallback == owner || (onlyWhere is not null && !onlyWhere(fallback))) return;
            segment = new Segment();
            Array.Fill(segment.Chunks, fallback);
            Volatile.Write(ref _segments[segmentIndex], segment);
            if (wholeChunk)
            {
                Volatile.Write(ref segment.Chunks[index], owner);
                return;
            }
        }

        uint entry = segment.Chunks[index];
        uint[] current = (entry & RunsFlag) == 0 ? [(uint)(ushort)entry] : segment.Runs[(int)(entry & ~RunsFlag)]!;
        var updated = Apply(current, from, to, owner, onlyWhere);
        uint replacement;
        if (updated.Length == 1)
        {
            replacement = (ushort)updated[0];
        }
        else if ((entry & RunsFlag) != 0)
        {
            int slot = (int)(entry & ~RunsFlag);
            Volatile.Write(ref System.Runtime.InteropServices.CollectionsMarshal.AsSpan(segment.Runs)[slot], updated);
            return;
        }
        else
        {
            int slot;
            if (segment.FreeRuns.Count > 0)
            {
                slot = segment.FreeRuns.Pop();
                segment.Runs[slot] = updated;
            }
            else
            {
                slot = segment.Runs.Count;
                segment.Runs.Add(updated);
            }
            replacement = RunsFlag | (uint)slot;
        }
        Volatile.Write(ref segment.Chunks[index], replacement);
        if ((entry & RunsFlag) != 0 && (replacement & RunsFlag) == 0)
        {
            int slot = (int)(entry & ~RunsFlag);
            segment.Runs[slot] = null;
            segment.FreeRuns.Push(slot);
        }
    }

    /// <summary>The run list after setting [from, to) to <paramref name="owner"/> (where allowed), with equal neighbours merged.</summary>
    private uint[] Apply(uint[] runs, int from, int to, ushort owner, Func<ushort, bool>? onlyWhere)
    {
        // Expand to (start, end, owner) triples, rewrite the affected part, then re-merge.
        var result = new List<uint>(runs.Length + 2);
        void Add(int start, ushort who)
        {
            if (result.Count > 0 && (int)(result[^1] >> 16) == start) result.RemoveAt(result.Count - 1);   // empty run
            if (result.Count > 0 && (ushort)result[^1] == who) return;                                      // extends the previous
            result.Add(((uint)start << 16) | who);
        }
        for (int i = 0; i < runs.Length; i++)
        {
            int start = (int)(runs[i] >> 16);
            int end = i + 1 < runs.Length ? (int)(runs[i + 1] >> 16) : SectorsPerChunk;
            ushort who = (ushort)runs[i];
            if (end <= from || start >= to || (onlyWhere is not null && !onlyWhere(who)))
            {
                Add(start, who);
                continue;
            }
            if (start < from) Add(start, who);
            Add(Math.Max(start, from), owner);
            if (end > to) Add(to, who);
        }
        return result.ToArray();
    }

    /// <summary>
    /// Forgets owner <paramref name="removed"/> (a layer that left the chain and owns nothing any more): every owner
    /// above it moves down by one, so owners stay the positions of the remaining layers. Runs only while no reader
    /// uses the map (the chain is quiesced).
    /// </summary>
    public void RemoveOwner(ushort removed)
    {
        ushort Renumber(ushort owner) => owner > removed ? (ushort)(owner - 1) : owner == removed
            ? throw new InvalidOperationException($"owner {removed} still owns sectors")
            : owner;
        lock (_write)
        {
            var defaults = (ushort[])_segmentDefaults.Clone();
            for (int i = 0; i < _segments.Length; i++)
            {
                var segment = _segments[i];
                if (segment is null)
                {
                    defaults[i] = Renumber(defaults[i]);
                    continue;
                }
                for (int c = 0; c < ChunksPerSegment; c++)
                {
                    uint entry = segment.Chunks[c];
                    if ((entry & RunsFlag) == 0) segment.Chunks[c] = Renumber((ushort)entry);
                }
                for (int r = 0; r < segment.Runs.Count; r++)
                {
                    if (segment.Runs[r] is not { } runs) continue;
                    var renumbered = new uint[runs.Length];
                    for (int k = 0; k < runs.Length; k++) renumbered[k] = (runs[k] & 0xFFFF_0000) | Renumber((ushort)runs[k]);
                    segment.Runs[r] = renumbered;
                }
            }
            Volatile.Write(ref _segmentDefaults, defaults);
        }
    }

    /// <summary>Extends the map for a grown disk; new sectors get <paramref name="owner"/> (normally 0: nobody).</summary>
    public void Grow(long newVirtualSize, ushort owner = 0)
    {
        lock (_write)
        {
            if (newVirtualSize <= VirtualSize) return;
            long oldSectors = SectorCount;
            int segments = (int)((ChunkCount(newVirtualSize) + ChunksPerSegment - 1) / ChunksPerSegment);
            if (segments > _segments.Length)
            {
                var grown = new Segment?[segments];
                Array.Copy(_segments, grown, _segments.Length);
                var defaults = new ushort[segments];
                Array.Copy(_segmentDefaults, defaults, _segmentDefaults.Length);
                for (int i = _segmentDefaults.Length; i < segments; i++) defaults[i] = owner;
                Volatile.Write(ref _segmentDefaults, defaults);
                Volatile.Write(ref _segments, grown);
            }
            VirtualSize = newVirtualSize;
            // What the old size did not cover belongs to the given owner (Monitor is reentrant).
            SetOwner(oldSectors, SectorCount - oldSectors, owner);
        }
    }

    /// <summary>Like <see cref="Lookup"/>, but an untouched segment answers for all of its chunks at once (fast scans of huge maps).</summary>
    private ushort LookupSpan(long sector, out long runSectors)
    {
        long chunk = sector >> _sectorsPerChunkShift;
        int segmentIndex = (int)(chunk / ChunksPerSegment);
        var segment = Volatile.Read(ref Volatile.Read(ref _segments)[segmentIndex]);
        if (segment is null)
        {
            long segmentEnd = (long)(segmentIndex + 1) * ChunksPerSegment << _sectorsPerChunkShift;
            runSectors = segmentEnd - sector;
            return Volatile.Read(ref _segmentDefaults)[segmentIndex];
        }
        ushort owner = Lookup(sector, out int n);
        runSectors = n;
        int index = (int)(chunk % ChunksPerSegment);
        uint entry = Volatile.Read(ref segment.Chunks[index]);
        if ((entry & RunsFlag) == 0)
        {
            // Whole chunks of the same owner that follow in this segment join the run.
            while (++index < ChunksPerSegment && Volatile.Read(ref segment.Chunks[index]) == entry) runSectors += SectorsPerChunk;
        }
        return owner;
    }

    /// <summary>Every (start sector, sector count, owner) run in order; adjacent runs of one owner are joined.</summary>
    public IEnumerable<(long Sector, long Count, ushort Owner)> Runs()
    {
        long sector = 0;
        long total = SectorCount;
        long runStart = 0;
        ushort runOwner = total > 0 ? Lookup(0, out _) : (ushort)0;
        while (sector < total)
        {
            ushort owner = LookupSpan(sector, out long n);
            if (owner != runOwner)
            {
                yield return (runStart, sector - runStart, runOwner);
                runStart = sector;
                runOwner = owner;
            }
            sector += Math.Min(n, total - sector);
        }
        if (total > 0) yield return (runStart, total - runStart, runOwner);
    }

    /// <summary>True when both maps give every sector the same owner.</summary>
    public bool SameAs(ChainMap other) => SectorCount == other.SectorCount && Runs().SequenceEqual(other.Runs());

    // ---------------------------------------------------------------- persistence

    private static ReadOnlySpan<byte> Magic => "ISNPMAP1"u8;

    /// <summary>Serialises the runs (with a checksum) for the chain's map file.</summary>
    public byte[] Serialize()
    {
        var runs = Runs().ToList();
        var bytes = new byte[32 + runs.Count * 18];
        Magic.CopyTo(bytes);
        BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(8), SectorSize);
        BinaryPrimitives.WriteInt64LittleEndian(bytes.AsSpan(12), VirtualSize);
        BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(20), runs.Count);
        int offset = 32;
        foreach (var (sector, count, owner) in runs)
        {
            BinaryPrimitives.WriteInt64LittleEndian(bytes.AsSpan(offset), sector);
            BinaryPrimitives.WriteInt64LittleEndian(bytes.AsSpan(offset + 8), count);
            BinaryPrimitives.WriteUInt16LittleEndian(bytes.AsSpan(offset + 16), owner);
            offset += 18;
        }
        BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan(24), Crc32C.Compute(bytes.AsSpan(32)));
        BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan(28), Crc32C.Compute(bytes.AsSpan(0, 28)));
        return bytes;
    }

    /// <summary>Reads a serialised map; null when it is damaged or does not match the expected geometry.</summary>
    public static ChainMap? Deserialize(ReadOnlySpan<byte> bytes, long virtualSize, int sectorSize, ushort maxOwner)
    {
        if (bytes.Length < 32 || !bytes.Slice(0, 8).SequenceEqual(Magic)) return null;
        if (BinaryPrimitives.ReadUInt32LittleEndian(bytes.Slice(28)) != Crc32C.Compute(bytes.Slice(0, 28))) return null;
        if (BinaryPrimitives.ReadInt32LittleEndian(bytes.Slice(8)) != sectorSize) return null;
        if (BinaryPrimitives.ReadInt64LittleEndian(bytes.Slice(12)) != virtualSize) return null;
        int count = BinaryPrimitives.ReadInt32LittleEndian(bytes.Slice(20));
        if (count < 0 || bytes.Length != 32 + (long)count * 18) return null;
        if (BinaryPrimitives.ReadUInt32LittleEndian(bytes.Slice(24)) != Crc32C.Compute(bytes.Slice(32))) return null;
        var map = new ChainMap(virtualSize, sectorSize);
        long expected = 0;
        for (int i = 0; i < count; i++)
        {
            var run = bytes.Slice(32 + i * 18, 18);
            long sector = BinaryPrimitives.ReadInt64LittleEndian(run);
            long length = BinaryPrimitives.ReadInt64LittleEndian(run.Slice(8));
            ushort owner = BinaryPrimitives.ReadUInt16LittleEndian(run.Slice(16));
            if (sector != expected || length <= 0 || owner > maxOwner) return null;
            map.SetOwner(sector, length, owner);
            expected = sector + length;
        }
        return expected == map.SectorCount ? map : null;
    }
}
