using System.Security.Cryptography;
using System.Text;

namespace ISCSISnap.Target.Scsi;

/// <summary>
/// The names a logical unit reports: an NAA IEEE Registered Extended designator (VPD 0x83 — Windows needs one),
/// a unit serial number (VPD 0x80) and the INQUIRY vendor/product strings. Derived from a persisted unit id so
/// they never change across restarts.
/// </summary>
public sealed class LogicalUnitIdentity
{
    /// <summary>Default 24-bit IEEE company id (a CID: the low nibble of its first octet is 0xA).</summary>
    public const uint DefaultCompanyId = 0x0A5E5A;

    public LogicalUnitIdentity(Guid unitId, uint companyId = DefaultCompanyId, string vendor = "ISCSISNP", string product = "VIRTUAL-DISK", string revision = "0001")
    {
        UnitId = unitId;
        Vendor = Fixed(vendor, 8);
        Product = Fixed(product, 16);
        Revision = Fixed(revision, 4);
        Serial = unitId.ToString("N");

        // NAA 6 (IEEE Registered Extended): 4-bit NAA, 24-bit company id, 36-bit vendor specific id and a
        // 64-bit extension. The 100 vendor bits come from the unit id's hash, so they are unique per unit.
        Span<byte> hash = stackalloc byte[32];
        SHA256.HashData(unitId.ToByteArray(), hash);
        var naa = new byte[16];
        naa[0] = (byte)(0x60 | ((companyId >> 20) & 0x0F));
        naa[1] = (byte)(companyId >> 12);
        naa[2] = (byte)(companyId >> 4);
        naa[3] = (byte)((int)((companyId & 0x0F) << 4) | (hash[0] & 0x0F));
        hash.Slice(1, 12).CopyTo(naa.AsSpan(4));
        NaaDesignator = naa;
    }

    public Guid UnitId { get; }
    public string Vendor { get; }
    public string Product { get; }
    public string Revision { get; }
    public string Serial { get; }
    public byte[] NaaDesignator { get; }
    public string NaaHex => Convert.ToHexStringLower(NaaDesignator);

    private static string Fixed(string value, int length)
    {
        var ascii = new StringBuilder(length);
        foreach (char c in value)
        {
            if (ascii.Length == length) break;
            ascii.Append(c is >= ' ' and <= '~' ? c : '_');
        }
        return ascii.ToString().PadRight(length);
    }
}
