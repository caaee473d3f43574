using System.Buffers.Binary;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Files;
using ISCSISnap.Storage.Integrity;

namespace ISCSISnap.Storage.Vhdx;

/// <summary>One descriptor of a log entry: a 4 KiB sector image to write, or a range to zero.</summary>
internal readonly record struct VhdxLogDescriptor(bool IsZero, long FileOffset, long ZeroLength, ulong Leading, uint Trailing, int DataSector);

/// <summary>A log entry that passed every validity check.</summary>
internal sealed class VhdxLogEntry
{
    public long RingOffset;
    public long Length;
    public long Tail;
    public ulong Sequence;
    public long FlushedFileOffset;
    public long LastFileOffset;
    public int DescriptorSectors;
    public List<VhdxLogDescriptor> Descriptors = new();
}

/// <summary>
/// Finds the active log sequence the way MS-VHDX §2.3.3 describes (the complete sequence whose head has the largest
/// sequence number) and reconstructs its updates. Entries are read and checked a sector at a time, so a lying length
/// or descriptor count costs reads of real file content, never an allocation of its own size.
/// </summary>
internal sealed class VhdxLogReader
{
    /// <summary>Zero descriptors longer than this are treated as invalid: no writer zeroes more than a few blocks at once.</summary>
    public const long MaxZeroLength = 4L << 30;

    private readonly ImageFile _file;
    private readonly long _logOffset, _logLength;
    private readonly Guid _logGuid;
    private readonly Dictionary<long, VhdxLogEntry?> _parsed = new();
    private readonly byte[] _buffer = new byte[VhdxFormat.Page];
    private string? _firstProblem;

    public VhdxLogReader(ImageFile file, long logOffset, long logLength, Guid logGuid)
    {
        _file = file;
        _logOffset = logOffset;
        _logLength = logLength;
        _logGuid = logGuid;
    }

    /// <summary>Why the first entry that carried our LogGuid was rejected (for the refusal message).</summary>
    public string? FirstProblem => _firstProblem;

    /// <summary>The entries to replay, oldest first (from the head's Tail to the head), or null if there is no valid sequence.</summary>
    public List<VhdxLogEntry>? FindActiveSequence()
    {
        List<VhdxLogEntry>? best = null;
        ulong bestSeq = 0;
        long curTail = 0, oldTail = 0;
        while (true)
        {
            var sequence = new List<VhdxLogEntry>();
            long position = curTail, covered = 0;
            while (true)
            {
                var entry = Parse(position);
                if (entry is null) break;
                if (sequence.Count > 0 && entry.Sequence != sequence[^1].Sequence + 1) break;
                if (covered + entry.Length > _logLength) break;   // a sequence cannot lap the ring
                sequence.Add(entry);
                covered += entry.Length;
                position = (position + entry.Length) % _logLength;
            }
            bool valid = false;
            if (sequence.Count > 0)
            {
                var head = sequence[^1];
                int tailIndex = sequence.FindIndex(e => e.RingOffset == head.Tail);
                if (tailIndex >= 0)
                {
                    valid = true;
                    if (head.Sequence > bestSeq)
                    {
                        bestSeq = head.Sequence;
                        best = sequence.GetRange(tailIndex, sequence.Count - tailIndex);
                    }
                }
            }
            curTail = valid ? position : (curTail + VhdxFormat.Page) % _logLength;
            if (curTail <= oldTail) break;   // wrapped: the whole ring has been scanned
            oldTail = curTail;
        }
        return best;
    }

    private VhdxLogEntry? Parse(long ring)
    {
        if (_parsed.TryGetValue(ring, out var known)) return known;
        var entry = ParseUncached(ring, out string? problem);
        if (entry is null && problem is not null) _firstProblem ??= $"entry at log offset 0x{ring:x}: {problem}";
        _parsed[ring] = entry;
        return entry;
    }

    /// <summary>Parses and fully validates the entry at <paramref name="ring"/>; problem is set only for entries that carry our LogGuid.</summary>
    private VhdxLogEntry? ParseUncached(long ring, out string? problem)
    {
        problem = null;
        var s = _buffer.AsSpan();
        if (!ReadRing(ring, s)) { problem = "read error"; return null; }
        if (BinaryPrimitives.ReadUInt32LittleEndian(s) != VhdxFormat.LogEntrySignature) return null;
        if (new Guid(s.Slice(32, 16)) != _logGuid) return null;   // stale entry of another log epoch

        uint length = BinaryPrimitives.ReadUInt32LittleEndian(s[8..]);
        uint tail = BinaryPrimitives.ReadUInt32LittleEndian(s[12..]);
        ulong seq = BinaryPrimitives.ReadUInt64LittleEndian(s[16..]);
        uint descriptorCount = BinaryPrimitives.ReadUInt32LittleEndian(s[24..]);
        ulong flushed = BinaryPrimitives.ReadUInt64LittleEndian(s[48..]);
        ulong last = BinaryPrimitives.ReadUInt64LittleEndian(s[56..]);
        uint expectedCrc = BinaryPrimitives.ReadUInt32LittleEndian(s[4..]);

        if (length == 0 || length % VhdxFormat.Page != 0 || length > _logLength) { problem = $"entry length {length} is not a non-zero multiple of 4096 within the log"; return null; }
        if (tail % VhdxFormat.Page != 0 || tail >= _logLength) { problem = $"tail {tail} is not a 4 KiB offset inside the log"; return null; }
        if (seq == 0) { problem = "sequence number 0"; return null; }
        if (flushed % VhdxFormat.MiB != 0 || last % VhdxFormat.MiB != 0 || flushed > VhdxFormat.MaxFileOffset || last > VhdxFormat.MaxFileOffset)
        { problem = $"flushed/last file offsets {flushed}/{last} are not plausible 1 MiB multiples"; return null; }
        long sectors = length / VhdxFormat.Page;
        long descriptorSectors = (descriptorCount + 2L + 127) / 128;
        if (descriptorSectors > sectors) { problem = $"{descriptorCount} descriptors do not fit an entry of {length} bytes"; return null; }
        long dataSectors = sectors - descriptorSectors;

        var entry = new VhdxLogEntry
        {
            RingOffset = ring, Length = length, Tail = tail, Sequence = seq,
            FlushedFileOffset = (long)flushed, LastFileOffset = (long)last, DescriptorSectors = (int)descriptorSectors,
        };
        uint crc = Crc32C.Seed;
        int dataSeen = 0;
        long descriptor = 0;
        for (long i = 0; i < sectors; i++)
        {
            if (i > 0 && !ReadRing((ring + i * VhdxFormat.Page) % _logLength, s)) { problem = "read error"; return null; }
            if (i == 0)
            {
                BinaryPrimitives.WriteUInt32LittleEndian(s[4..], 0);
                crc = Crc32C.Append(crc, s);
                BinaryPrimitives.WriteUInt32LittleEndian(s[4..], expectedCrc);
            }
            else
            {
                crc = Crc32C.Append(crc, s);
            }
            if (i < descriptorSectors)
            {
                for (int slot = i == 0 ? 2 : 0; slot < 128 && descriptor < descriptorCount; slot++, descriptor++)
                {
                    var d = s.Slice(slot * 32, 32);
                    string? bad = CheckDescriptor(d, seq, dataSeen, out var parsed);
                    if (bad is not null) { problem = $"descriptor {descriptor}: {bad}"; return null; }
                    if (!parsed.IsZero)
                    {
                        if (++dataSeen > dataSectors) { problem = $"more data descriptors than the {dataSectors} data sectors"; return null; }
                    }
                    entry.Descriptors.Add(parsed);
                }
            }
            else
            {
                if (i == descriptorSectors && dataSeen != dataSectors) { problem = $"{dataSeen} data descriptors but {dataSectors} data sectors"; return null; }
                if (BinaryPrimitives.ReadUInt32LittleEndian(s) != VhdxFormat.DataSectorSignature) { problem = $"data sector {i - descriptorSectors} has a bad signature"; return null; }
                ulong split = ((ulong)BinaryPrimitives.ReadUInt32LittleEndian(s[4..]) << 32) | BinaryPrimitives.ReadUInt32LittleEndian(s[4092..]);
                if (split != seq) { problem = $"data sector {i - descriptorSectors} belongs to sequence {split}, not {seq}"; return null; }
            }
        }
        if (dataSectors == 0 && dataSeen != 0) { problem = "data descriptors without data sectors"; return null; }
        if ((crc ^ Crc32C.Seed) != expectedCrc) { problem = "CRC-32C mismatch"; return null; }
        return entry;
    }

    private string? CheckDescriptor(ReadOnlySpan<byte> d, ulong seq, int dataIndex, out VhdxLogDescriptor parsed)
    {
        parsed = default;
        uint signature = BinaryPrimitives.ReadUInt32LittleEndian(d);
        ulong target = BinaryPrimitives.ReadUInt64LittleEndian(d[16..]);
        if (BinaryPrimitives.ReadUInt64LittleEndian(d[24..]) != seq) return "sequence number differs from the entry's";
        if (target % VhdxFormat.Page != 0) return $"target 0x{target:x} is not 4 KiB aligned";
        long length;
        if (signature == VhdxFormat.ZeroDescriptorSignature)
        {
            ulong zeroLength = BinaryPrimitives.ReadUInt64LittleEndian(d[8..]);
            if (zeroLength % VhdxFormat.Page != 0 || zeroLength > MaxZeroLength) return $"zero length {zeroLength} is not a plausible 4 KiB multiple";
            length = (long)zeroLength;
        }
        else if (signature == VhdxFormat.DataDescriptorSignature)
        {
            length = VhdxFormat.Page;
        }
        else
        {
            return "bad signature";
        }
        if (target > VhdxFormat.MaxFileOffset) return $"target 0x{target:x} is beyond any plausible file";
        long start = (long)target, end = start + length;
        // Never let a log rewrite the file identifier, the headers (they locate the log) or the log itself.
        if (start < VhdxFormat.RegionTable1Offset) return $"target 0x{target:x} lies in the file identifier or headers";
        if (start < _logOffset + _logLength && end > _logOffset) return $"target 0x{target:x} lies inside the log";
        parsed = signature == VhdxFormat.ZeroDescriptorSignature
            ? new VhdxLogDescriptor(true, start, length, 0, 0, -1)
            : new VhdxLogDescriptor(false, start, 0, BinaryPrimitives.ReadUInt64LittleEndian(d[8..]), BinaryPrimitives.ReadUInt32LittleEndian(d[4..]), dataIndex);
        return null;
    }

    /// <summary>Rebuilds the 4 KiB update of a data descriptor from its data sector.</summary>
    public bool ReadUpdate(VhdxLogEntry entry, VhdxLogDescriptor descriptor, Span<byte> page)
    {
        long ring = (entry.RingOffset + (entry.DescriptorSectors + (long)descriptor.DataSector) * VhdxFormat.Page) % _logLength;
        if (!ReadRing(ring, page)) return false;
        BinaryPrimitives.WriteUInt64LittleEndian(page, descriptor.Leading);
        BinaryPrimitives.WriteUInt32LittleEndian(page[4092..], descriptor.Trailing);
        return true;
    }

    private bool ReadRing(long ring, Span<byte> sector) =>
        _file.ReadExact(_logOffset + ring, sector[..VhdxFormat.Page]) == IoStatus.Ok;
}

/// <summary>
/// A log replayed into memory (read-only opens of a file that needs replay): the updates in replay order and the file
/// length they imply. Structure reads, and payload reads that touch a logged range, are patched through it.
/// </summary>
internal sealed class VhdxLogOverlay
{
    private readonly List<(long Offset, long Length, byte[]? Data)> _updates = new();

    public long Length { get; set; }
    public long Start { get; private set; } = long.MaxValue;
    public long End { get; private set; }

    public void Add(long offset, long length, byte[]? data)
    {
        _updates.Add((offset, length, data));
        Start = Math.Min(Start, offset);
        End = Math.Max(End, offset + length);
    }

    public bool Touches(long offset, long length) => offset < End && offset + length > Start;

    /// <summary>Applies, in order, every update overlapping [offset, offset+destination.Length).</summary>
    public void Apply(long offset, Span<byte> destination)
    {
        long end = offset + destination.Length;
        foreach (var (o, l, data) in _updates)
        {
            long from = Math.Max(o, offset), to = Math.Min(o + l, end);
            if (from >= to) continue;
            var slice = destination.Slice((int)(from - offset), (int)(to - from));
            if (data is null) slice.Clear();
            else data.AsSpan((int)(from - o), (int)(to - from)).CopyTo(slice);
        }
    }
}

/// <summary>Builds log entries (descriptor sectors, then one data sector per 4 KiB update).</summary>
internal static class VhdxLogWriter
{
    public static int DescriptorSectors(int descriptors) => (descriptors + 2 + 127) / 128;

    public static int EntrySectors(int pages) => DescriptorSectors(pages) + pages;

    /// <summary>The most 4 KiB updates one entry may carry in a ring of <paramref name="logLength"/> bytes (one sector stays free).</summary>
    public static int MaxPages(long logLength)
    {
        long sectors = logLength / VhdxFormat.Page - 1;
        int pages = (int)Math.Min(sectors, 1 << 20);
        while (pages > 0 && EntrySectors(pages) > sectors) pages--;
        return pages;
    }

    public static byte[] Build(Guid logGuid, ulong seq, long tail, long flushedFileOffset, long lastFileOffset,
        IReadOnlyList<(long Offset, byte[] Data)> pages)
    {
        int descriptorSectors = DescriptorSectors(pages.Count);
        int sectors = descriptorSectors + pages.Count;
        var entry = new byte[sectors * VhdxFormat.Page];
        var h = entry.AsSpan();
        BinaryPrimitives.WriteUInt32LittleEndian(h, VhdxFormat.LogEntrySignature);
        BinaryPrimitives.WriteUInt32LittleEndian(h[8..], (uint)entry.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(h[12..], (uint)tail);
        BinaryPrimitives.WriteUInt64LittleEndian(h[16..], seq);
        BinaryPrimitives.WriteUInt32LittleEndian(h[24..], (uint)pages.Count);
        logGuid.TryWriteBytes(h.Slice(32, 16));
        BinaryPrimitives.WriteUInt64LittleEndian(h[48..], (ulong)flushedFileOffset);
        BinaryPrimitives.WriteUInt64LittleEndian(h[56..], (ulong)lastFileOffset);
        for (int i = 0; i < pages.Count; i++)
        {
            int slot = i + 2;   // the entry header takes the first two descriptor slots
            var d = h.Slice((slot / 128) * VhdxFormat.Page + (slot % 128) * 32, 32);
            var page = pages[i].Data.AsSpan(0, VhdxFormat.Page);
            BinaryPrimitives.WriteUInt32LittleEndian(d, VhdxFormat.DataDescriptorSignature);
            BinaryPrimitives.WriteUInt32LittleEndian(d[4..], BinaryPrimitives.ReadUInt32LittleEndian(page[4092..]));
            BinaryPrimitives.WriteUInt64LittleEndian(d[8..], BinaryPrimitives.ReadUInt64LittleEndian(page));
            BinaryPrimitives.WriteUInt64LittleEndian(d[16..], (ulong)pages[i].Offset);
            BinaryPrimitives.WriteUInt64LittleEndian(d[24..], seq);
            var s = h.Slice((descriptorSectors + i) * VhdxFormat.Page, VhdxFormat.Page);
            page.CopyTo(s);
            BinaryPrimitives.WriteUInt32LittleEndian(s, VhdxFormat.DataSectorSignature);
            BinaryPrimitives.WriteUInt32LittleEndian(s[4..], (uint)(seq >> 32));
            BinaryPrimitives.WriteUInt32LittleEndian(s[4092..], (uint)seq);
        }
        VhdxFormat.Seal(entry);
        return entry;
    }
}
