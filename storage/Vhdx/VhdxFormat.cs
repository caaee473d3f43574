using System.Buffers.Binary;
using System.Text;
using ISCSISnap.Storage.Integrity;

namespace ISCSISnap.Storage.Vhdx;

/// <summary>On-disk constants and structure codecs of MS-VHDX v1.0 (all integers little-endian).</summary>
internal static class VhdxFormat
{
    public const long MiB = 1L << 20;
    public const int Page = 4096;                    // log sector and metadata page size
    public const long HeaderSectionLength = MiB;
    public const long Header1Offset = 0x10000, Header2Offset = 0x20000;
    public const long RegionTable1Offset = 0x30000, RegionTable2Offset = 0x40000;
    public const int HeaderLength = 4096, RegionTableLength = 65536, MetadataTableLength = 65536;
    public const int MaxTableEntries = 2047;
    public const long MaxVirtualSize = 64L << 40;
    public const int MinBlockSize = 1 << 20, MaxBlockSize = 256 << 20;
    public const int SectorsPerBitmapBlock = 1 << 23;
    /// <summary>Largest file offset we accept anywhere (BAT entries, log targets): far above a 64 TiB disk, far below overflow.</summary>
    public const long MaxFileOffset = 1L << 48;

    public const ulong FileSignature = 0x656C6966_78646876;     // "vhdxfile"
    public const uint HeaderSignature = 0x64616568;             // "head"
    public const uint RegionSignature = 0x69676572;             // "regi"
    public const ulong MetadataSignature = 0x61746164_6174656D; // "metadata"
    public const uint LogEntrySignature = 0x65676F6C;           // "loge"
    public const uint DataDescriptorSignature = 0x63736564;     // "desc"
    public const uint ZeroDescriptorSignature = 0x6F72657A;     // "zero"
    public const uint DataSectorSignature = 0x61746164;         // "data"

    public static readonly Guid BatRegion = new("2DC27766-F623-4200-9D64-115E9BFD4A08");
    public static readonly Guid MetadataRegion = new("8B7CA206-4790-4B9A-B8FE-575F050F886E");
    public static readonly Guid FileParametersItem = new("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
    public static readonly Guid VirtualDiskSizeItem = new("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
    public static readonly Guid Page83Item = new("BECA12AB-B2E6-4523-93EF-C309E000C746");
    public static readonly Guid LogicalSectorSizeItem = new("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
    public static readonly Guid PhysicalSectorSizeItem = new("CDA348C7-445D-4471-9CC9-E9885251C556");
    public static readonly Guid ParentLocatorItem = new("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
    public static readonly Guid VhdxLocatorType = new("B04AEFB7-D19E-4A81-B789-25B8E9445913");

    // BAT entry states.
    public const int NotPresent = 0, Undefined = 1, Zero = 2, Unmapped = 3, FullyPresent = 6, PartiallyPresent = 7;
    public const int SbPresent = 6;
    public const ulong StateMask = 7;
    public const ulong OffsetMask = 0xFFFF_FFFF_FFF0_0000;

    public static long RoundUp(long value, long alignment) => (value + alignment - 1) / alignment * alignment;

    /// <summary>CRC-32C of <paramref name="data"/> with the 4-byte checksum field at <paramref name="field"/> taken as zero.</summary>
    public static uint Checksum(ReadOnlySpan<byte> data, int field)
    {
        ReadOnlySpan<byte> zero = stackalloc byte[4];
        uint crc = Crc32C.Append(Crc32C.Seed, data[..field]);
        crc = Crc32C.Append(crc, zero);
        return Crc32C.Append(crc, data[(field + 4)..]) ^ Crc32C.Seed;
    }

    /// <summary>Computes and stores the checksum of a structure whose checksum field is at offset 4.</summary>
    public static void Seal(Span<byte> structure) =>
        BinaryPrimitives.WriteUInt32LittleEndian(structure[4..], Checksum(structure, 4));

    public static bool ChecksumMatches(ReadOnlySpan<byte> structure) =>
        BinaryPrimitives.ReadUInt32LittleEndian(structure[4..]) == Checksum(structure, 4);

    /// <summary>The file type identifier (first 64 KiB): signature and a UTF-16 creator string.</summary>
    public static byte[] FileIdentifier(string creator)
    {
        var id = new byte[64 * 1024];
        BinaryPrimitives.WriteUInt64LittleEndian(id, FileSignature);
        Encoding.Unicode.GetBytes(creator.AsSpan(0, Math.Min(creator.Length, 255)), id.AsSpan(8, 512));
        return id;
    }
}

/// <summary>A VHDX header (one of two 4 KiB copies).</summary>
internal readonly record struct VhdxHeader(
    ulong SequenceNumber, Guid FileWriteGuid, Guid DataWriteGuid, Guid LogGuid,
    ushort LogVersion, ushort Version, uint LogLength, ulong LogOffset)
{
    /// <summary>Parses a header copy; null with a reason when it is not valid (signature, CRC, version).</summary>
    public static VhdxHeader? TryParse(ReadOnlySpan<byte> s, out string problem)
    {
        if (BinaryPrimitives.ReadUInt32LittleEndian(s) != VhdxFormat.HeaderSignature) { problem = "bad signature"; return null; }
        if (!VhdxFormat.ChecksumMatches(s[..VhdxFormat.HeaderLength])) { problem = "CRC-32C mismatch"; return null; }
        var h = new VhdxHeader(
            BinaryPrimitives.ReadUInt64LittleEndian(s[8..]),
            new Guid(s.Slice(16, 16)), new Guid(s.Slice(32, 16)), new Guid(s.Slice(48, 16)),
            BinaryPrimitives.ReadUInt16LittleEndian(s[64..]), BinaryPrimitives.ReadUInt16LittleEndian(s[66..]),
            BinaryPrimitives.ReadUInt32LittleEndian(s[68..]), BinaryPrimitives.ReadUInt64LittleEndian(s[72..]));
        if (h.Version != 1) { problem = $"version {h.Version} (only 1 is defined)"; return null; }
        problem = "";
        return h;
    }

    public void Write(Span<byte> s)
    {
        s[..VhdxFormat.HeaderLength].Clear();
        BinaryPrimitives.WriteUInt32LittleEndian(s, VhdxFormat.HeaderSignature);
        BinaryPrimitives.WriteUInt64LittleEndian(s[8..], SequenceNumber);
        FileWriteGuid.TryWriteBytes(s.Slice(16, 16));
        DataWriteGuid.TryWriteBytes(s.Slice(32, 16));
        LogGuid.TryWriteBytes(s.Slice(48, 16));
        BinaryPrimitives.WriteUInt16LittleEndian(s[64..], LogVersion);
        BinaryPrimitives.WriteUInt16LittleEndian(s[66..], Version);
        BinaryPrimitives.WriteUInt32LittleEndian(s[68..], LogLength);
        BinaryPrimitives.WriteUInt64LittleEndian(s[72..], LogOffset);
        VhdxFormat.Seal(s[..VhdxFormat.HeaderLength]);
    }
}

internal readonly record struct VhdxRegion(Guid Id, long FileOffset, long Length, bool Required);

/// <summary>Region table codec (64 KiB, header + up to 2047 entries of 32 bytes).</summary>
internal static class VhdxRegionTable
{
    public static List<VhdxRegion>? TryParse(ReadOnlySpan<byte> t, out string problem)
    {
        if (BinaryPrimitives.ReadUInt32LittleEndian(t) != VhdxFormat.RegionSignature) { problem = "bad signature"; return null; }
        if (!VhdxFormat.ChecksumMatches(t[..VhdxFormat.RegionTableLength])) { problem = "CRC-32C mismatch"; return null; }
        uint count = BinaryPrimitives.ReadUInt32LittleEndian(t[8..]);
        if (count > VhdxFormat.MaxTableEntries) { problem = $"entry count {count} exceeds 2047"; return null; }
        var list = new List<VhdxRegion>((int)count);
        for (int i = 0; i < (int)count; i++)
        {
            var e = t.Slice(16 + i * 32, 32);
            ulong offset = BinaryPrimitives.ReadUInt64LittleEndian(e[16..]);
            uint length = BinaryPrimitives.ReadUInt32LittleEndian(e[24..]);
            uint flags = BinaryPrimitives.ReadUInt32LittleEndian(e[28..]);
            if (offset > VhdxFormat.MaxFileOffset) { problem = $"entry {i} has file offset {offset} beyond any plausible file"; return null; }
            list.Add(new VhdxRegion(new Guid(e[..16]), (long)offset, length, (flags & 1) != 0));
        }
        problem = "";
        return list;
    }

    public static void Write(Span<byte> t, IReadOnlyList<VhdxRegion> regions)
    {
        t[..VhdxFormat.RegionTableLength].Clear();
        BinaryPrimitives.WriteUInt32LittleEndian(t, VhdxFormat.RegionSignature);
        BinaryPrimitives.WriteUInt32LittleEndian(t[8..], (uint)regions.Count);
        for (int i = 0; i < regions.Count; i++)
        {
            var e = t.Slice(16 + i * 32, 32);
            regions[i].Id.TryWriteBytes(e);
            BinaryPrimitives.WriteUInt64LittleEndian(e[16..], (ulong)regions[i].FileOffset);
            BinaryPrimitives.WriteUInt32LittleEndian(e[24..], (uint)regions[i].Length);
            BinaryPrimitives.WriteUInt32LittleEndian(e[28..], regions[i].Required ? 1u : 0u);
        }
        VhdxFormat.Seal(t[..VhdxFormat.RegionTableLength]);
    }

    /// <summary>Rewrites the file offset and length of the entry with <paramref name="id"/> in a raw table and re-seals it.</summary>
    public static void Relocate(Span<byte> t, Guid id, long fileOffset, long length)
    {
        uint count = BinaryPrimitives.ReadUInt32LittleEndian(t[8..]);
        for (int i = 0; i < (int)count; i++)
        {
            var e = t.Slice(16 + i * 32, 32);
            if (new Guid(e[..16]) != id) continue;
            BinaryPrimitives.WriteUInt64LittleEndian(e[16..], (ulong)fileOffset);
            BinaryPrimitives.WriteUInt32LittleEndian(e[24..], (uint)length);
        }
        VhdxFormat.Seal(t[..VhdxFormat.RegionTableLength]);
    }
}

/// <summary>One entry of the metadata table: where an item lives inside the metadata region.</summary>
internal readonly record struct VhdxMetadataEntry(int Index, Guid ItemId, uint Offset, uint Length, uint Flags)
{
    public bool IsUser => (Flags & 1) != 0;
    public bool IsVirtualDisk => (Flags & 2) != 0;
    public bool IsRequired => (Flags & 4) != 0;
}

/// <summary>Metadata table and the parent locator item codecs.</summary>
internal static class VhdxMetadata
{
    public const uint FlagVirtualDisk = 2, FlagRequired = 4;

    /// <summary>Builds the whole metadata region image (table + items) for a new file.</summary>
    public static byte[] Build(int blockSize, bool hasParent, long virtualSize, Guid page83, int logicalSectorSize,
        int physicalSectorSize, byte[]? parentLocator, out uint virtualSizeItemOffset)
    {
        var region = new byte[VhdxFormat.MiB];
        BinaryPrimitives.WriteUInt64LittleEndian(region, VhdxFormat.MetadataSignature);
        var items = new List<(Guid Id, byte[] Data, uint Flags)>();
        var fp = new byte[8];
        BinaryPrimitives.WriteUInt32LittleEndian(fp, (uint)blockSize);
        BinaryPrimitives.WriteUInt32LittleEndian(fp.AsSpan(4), hasParent ? 2u : 0u);
        items.Add((VhdxFormat.FileParametersItem, fp, FlagRequired));
        var vs = new byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(vs, (ulong)virtualSize);
        items.Add((VhdxFormat.VirtualDiskSizeItem, vs, FlagVirtualDisk | FlagRequired));
        items.Add((VhdxFormat.Page83Item, page83.ToByteArray(), FlagVirtualDisk | FlagRequired));
        var lss = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(lss, (uint)logicalSectorSize);
        items.Add((VhdxFormat.LogicalSectorSizeItem, lss, FlagVirtualDisk | FlagRequired));
        var pss = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(pss, (uint)physicalSectorSize);
        items.Add((VhdxFormat.PhysicalSectorSizeItem, pss, FlagVirtualDisk | FlagRequired));
        if (parentLocator is not null) items.Add((VhdxFormat.ParentLocatorItem, parentLocator, FlagRequired));

        BinaryPrimitives.WriteUInt16LittleEndian(region.AsSpan(10), (ushort)items.Count);
        uint at = VhdxFormat.MetadataTableLength;
        virtualSizeItemOffset = 0;
        for (int i = 0; i < items.Count; i++)
        {
            var e = region.AsSpan(32 + i * 32, 32);
            items[i].Id.TryWriteBytes(e);
            BinaryPrimitives.WriteUInt32LittleEndian(e[16..], at);
            BinaryPrimitives.WriteUInt32LittleEndian(e[20..], (uint)items[i].Data.Length);
            BinaryPrimitives.WriteUInt32LittleEndian(e[24..], items[i].Flags);
            items[i].Data.CopyTo(region.AsSpan((int)at));
            if (items[i].Id == VhdxFormat.VirtualDiskSizeItem) virtualSizeItemOffset = at;
            at += (uint)items[i].Data.Length;
        }
        return region;
    }

    /// <summary>Encodes a parent locator item (VHDX type) from ordered key/value pairs.</summary>
    public static byte[] BuildParentLocator(IReadOnlyList<KeyValuePair<string, string>> entries)
    {
        int header = 20 + entries.Count * 12;
        int total = header;
        foreach (var (k, v) in entries) total += (k.Length + v.Length) * 2;
        var item = new byte[total];
        VhdxFormat.VhdxLocatorType.TryWriteBytes(item);
        BinaryPrimitives.WriteUInt16LittleEndian(item.AsSpan(18), (ushort)entries.Count);
        int at = header;
        for (int i = 0; i < entries.Count; i++)
        {
            var e = item.AsSpan(20 + i * 12, 12);
            var (k, v) = entries[i];
            BinaryPrimitives.WriteUInt32LittleEndian(e, (uint)at);
            at += Encoding.Unicode.GetBytes(k, item.AsSpan(at));
            BinaryPrimitives.WriteUInt32LittleEndian(e[4..], (uint)at);
            at += Encoding.Unicode.GetBytes(v, item.AsSpan(at));
            BinaryPrimitives.WriteUInt16LittleEndian(e[8..], (ushort)(k.Length * 2));
            BinaryPrimitives.WriteUInt16LittleEndian(e[10..], (ushort)(v.Length * 2));
        }
        return item;
    }

    /// <summary>Checks parent locator entries as §18 of the digest demands; null when fine, else the fault.</summary>
    public static string? ValidateLocatorEntries(IReadOnlyList<KeyValuePair<string, string>> entries)
    {
        if (entries.Count is 0 or > 1000) return $"parent locator has {entries.Count} entries";
        var keys = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (k, v) in entries)
        {
            if (string.IsNullOrEmpty(k) || string.IsNullOrEmpty(v)) return "parent locator has an empty key or value";
            if (k.Length > 16383 || v.Length > 16383) return $"parent locator entry '{Truncate(k)}' is too long";
            if (k.Contains('\0') || v.Contains('\0')) return $"parent locator entry '{Truncate(k)}' contains a NUL character";
            if (!keys.Add(k)) return $"parent locator key '{Truncate(k)}' appears twice";
        }
        var map = entries.ToDictionary(e => e.Key, e => e.Value, StringComparer.Ordinal);
        if (!map.TryGetValue("parent_linkage", out var linkage)) return "parent locator has no parent_linkage";
        if (!Guid.TryParse(linkage, out _)) return $"parent locator parent_linkage '{Truncate(linkage)}' is not a GUID";
        if (map.TryGetValue("parent_linkage2", out var linkage2) && !Guid.TryParse(linkage2, out _))
            return $"parent locator parent_linkage2 '{Truncate(linkage2)}' is not a GUID";
        if (!map.ContainsKey("relative_path") && !map.ContainsKey("volume_path") && !map.ContainsKey("absolute_win32_path"))
            return "parent locator has none of relative_path, volume_path, absolute_win32_path";
        if (map.TryGetValue("absolute_win32_path", out var abs) && !abs.StartsWith(@"\\?\", StringComparison.Ordinal))
            return @"parent locator absolute_win32_path does not begin with \\?\";
        return null;
    }

    /// <summary>Decodes a parent locator item; null with the fault when it is malformed.</summary>
    public static List<KeyValuePair<string, string>>? TryParseParentLocator(ReadOnlySpan<byte> item, out string problem)
    {
        if (item.Length < 20) { problem = $"parent locator is {item.Length} bytes, shorter than its header"; return null; }
        var type = new Guid(item[..16]);
        if (type != VhdxFormat.VhdxLocatorType) { problem = $"parent locator type {type} is not the VHDX locator type"; return null; }
        int count = BinaryPrimitives.ReadUInt16LittleEndian(item[18..]);
        if (20L + count * 12L > item.Length) { problem = $"parent locator claims {count} entries, more than its {item.Length} bytes hold"; return null; }
        var list = new List<KeyValuePair<string, string>>(count);
        for (int i = 0; i < count; i++)
        {
            var e = item.Slice(20 + i * 12, 12);
            uint ko = BinaryPrimitives.ReadUInt32LittleEndian(e), vo = BinaryPrimitives.ReadUInt32LittleEndian(e[4..]);
            int kl = BinaryPrimitives.ReadUInt16LittleEndian(e[8..]), vl = BinaryPrimitives.ReadUInt16LittleEndian(e[10..]);
            if (ko == 0 || vo == 0 || kl == 0 || vl == 0) { problem = $"parent locator entry {i} has a zero offset or length"; return null; }
            if ((kl | vl) % 2 != 0) { problem = $"parent locator entry {i} has an odd UTF-16 length"; return null; }
            if (ko + (long)kl > item.Length || vo + (long)vl > item.Length) { problem = $"parent locator entry {i} lies outside the item"; return null; }
            // Some writers count a terminating NUL in the length; the spec says not to, so accept and drop it.
            string key = Encoding.Unicode.GetString(item.Slice((int)ko, kl)).TrimEnd('\0');
            string value = Encoding.Unicode.GetString(item.Slice((int)vo, vl)).TrimEnd('\0');
            list.Add(new(key, value));
        }
        problem = ValidateLocatorEntries(list) ?? "";
        return problem.Length == 0 ? list : null;
    }

    private static string Truncate(string s) => s.Length <= 64 ? s : s[..64] + "…";
}
