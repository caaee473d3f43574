using System.Buffers.Binary;
using System.Text;

namespace ISCSISnap.Target.Scsi;

public sealed partial class LogicalUnit
{
    private static readonly byte[] s_supportedVpdPages = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];

    private ValueTask Inquiry(ScsiCommand command)
    {
        var cdb = command.Cdb;
        int allocation = BinaryPrimitives.ReadUInt16BigEndian(cdb.Slice(3));
        bool evpd = (cdb[1] & 0x01) != 0;
        byte page = cdb[2];
        if (!evpd)
        {
            if (page != 0) FailField(command, 2);
            else
            {
                var buffer = command.EnsureBuffer(96);
                int length = StandardInquiry(buffer);
                command.CompleteGood(Math.Min(length, allocation));
            }
            return ValueTask.CompletedTask;
        }
        var data = command.EnsureBuffer(512);
        data.AsSpan(0, 512).Clear();
        int pageLength = page switch
        {
            0x00 => SupportedPages(data),
            0x80 => SerialNumberPage(data),
            0x83 => DeviceIdentificationPage(data),
            0xB0 => BlockLimitsPage(data),
            0xB1 => BlockCharacteristicsPage(data),
            0xB2 => ProvisioningPage(data),
            _ => -1,
        };
        if (pageLength < 0) FailField(command, 2);
        else command.CompleteGood(Math.Min(pageLength, allocation));
        return ValueTask.CompletedTask;
    }

    private int StandardInquiry(byte[] buffer)
    {
        var d = buffer.AsSpan(0, 96);
        d.Clear();
        d[0] = 0x00;                                   // connected, direct-access block device
        d[1] = 0x00;                                   // not removable
        d[2] = Options.InquiryVersion;
        d[3] = 0x12;                                   // HISUP, response data format 2
        d[4] = 96 - 5;
        d[5] = 0x18;                                   // TPGS=01b (implicit ALUA), 3PC (EXTENDED COPY)
        d[6] = 0x00;
        d[7] = 0x02;                                   // CMDQUE
        Encoding.ASCII.GetBytes(Identity.Vendor, d.Slice(8, 8));
        Encoding.ASCII.GetBytes(Identity.Product, d.Slice(16, 16));
        Encoding.ASCII.GetBytes(Identity.Revision, d.Slice(32, 4));
        Span<ushort> versions = [0x00A0 /* SAM-5 */, 0x0960 /* iSCSI */, 0x0460 /* SPC-4 */, 0x04C0 /* SBC-3 */];
        for (int i = 0; i < versions.Length; i++)
            BinaryPrimitives.WriteUInt16BigEndian(d.Slice(58 + 2 * i), versions[i]);
        return 96;
    }

    private static int SupportedPages(byte[] d)
    {
        d[1] = 0x00;
        d[3] = (byte)s_supportedVpdPages.Length;
        s_supportedVpdPages.CopyTo(d.AsSpan(4));
        return 4 + s_supportedVpdPages.Length;
    }

    private int SerialNumberPage(byte[] d)
    {
        d[1] = 0x80;
        int length = Encoding.ASCII.GetBytes(Identity.Serial, d.AsSpan(4));
        d[3] = (byte)length;
        return 4 + length;
    }

    private int DeviceIdentificationPage(byte[] d)
    {
        d[1] = 0x83;
        int offset = 4;

        // Logical unit: NAA IEEE Registered Extended (binary).
        offset += Designator(d.AsSpan(offset), codeSet: 1, piv: false, protocol: 0, association: 0, type: 3, Identity.NaaDesignator);

        // Logical unit: T10 vendor id + serial (ASCII), for hosts that look for a vendor-based name.
        var t10 = Encoding.ASCII.GetBytes(Identity.Vendor + Identity.Serial);
        offset += Designator(d.AsSpan(offset), codeSet: 2, piv: false, protocol: 0, association: 0, type: 1, t10);

        // Target port: relative target port identifier and SCSI name of the port (iSCSI).
        Span<byte> port = stackalloc byte[4];
        BinaryPrimitives.WriteUInt16BigEndian(port.Slice(2), RelativeTargetPortId);
        offset += Designator(d.AsSpan(offset), codeSet: 1, piv: true, protocol: 5, association: 1, type: 4, port);
        Span<byte> group = stackalloc byte[4];
        BinaryPrimitives.WriteUInt16BigEndian(group.Slice(2), TargetPortGroup);
        offset += Designator(d.AsSpan(offset), codeSet: 1, piv: false, protocol: 0, association: 1, type: 5, group);
        if (TargetName is { } target)
        {
            offset += Designator(d.AsSpan(offset), codeSet: 3, piv: true, protocol: 5, association: 1, type: 8,
                ScsiNameString($"{target},t,0x{TargetPortGroup:x4}"));
            offset += Designator(d.AsSpan(offset), codeSet: 3, piv: true, protocol: 5, association: 2, type: 8, ScsiNameString(target));
        }
        BinaryPrimitives.WriteUInt16BigEndian(d.AsSpan(2), (ushort)(offset - 4));
        return offset;
    }

    /// <summary>SCSI name strings are NUL-terminated UTF-8, padded to a multiple of four bytes (SPC-4 §7.8.6.11).</summary>
    private static byte[] ScsiNameString(string name)
    {
        int length = Encoding.UTF8.GetByteCount(name) + 1;
        var bytes = new byte[(length + 3) & ~3];
        Encoding.UTF8.GetBytes(name, bytes);
        return bytes;
    }

    private static int Designator(Span<byte> d, int codeSet, bool piv, int protocol, int association, int type, ReadOnlySpan<byte> value)
    {
        d[0] = (byte)((protocol << 4) | codeSet);
        d[1] = (byte)((piv ? 0x80 : 0) | (association << 4) | type);
        d[2] = 0;
        d[3] = (byte)value.Length;
        value.CopyTo(d.Slice(4));
        return 4 + value.Length;
    }

    private int BlockLimitsPage(byte[] d)
    {
        d[1] = 0xB0;
        BinaryPrimitives.WriteUInt16BigEndian(d.AsSpan(2), 0x3C);
        d[4] = 0;                                                                       // WSNZ=0
        d[5] = (byte)Options.MaxCompareAndWriteBlocks;
        int granularity = Math.Max(1, Device.PhysicalBlockSize / BlockSize);
        BinaryPrimitives.WriteUInt16BigEndian(d.AsSpan(6), (ushort)granularity);        // optimal transfer length granularity
        BinaryPrimitives.WriteUInt32BigEndian(d.AsSpan(8), MaxTransferBlocks);
        BinaryPrimitives.WriteUInt32BigEndian(d.AsSpan(12), (uint)((1 << 20) / BlockSize)); // optimal transfer length: 1 MiB
        if (Thin)
        {
            BinaryPrimitives.WriteUInt32BigEndian(d.AsSpan(20), 0xFFFFFFFF);             // maximum unmap LBA count: unlimited
            BinaryPrimitives.WriteUInt32BigEndian(d.AsSpan(24), (uint)Options.MaxUnmapDescriptors);
            BinaryPrimitives.WriteUInt32BigEndian(d.AsSpan(28), (uint)Math.Max(1, Device.DeallocationGranularity / BlockSize));
            BinaryPrimitives.WriteUInt32BigEndian(d.AsSpan(32), 0x80000000);             // UGAVALID, alignment 0
        }
        BinaryPrimitives.WriteUInt64BigEndian(d.AsSpan(36), Options.MaxWriteSameBlocks);
        BinaryPrimitives.WriteUInt32BigEndian(d.AsSpan(44), (uint)MaxAtomicTransferBlocks);
        return 64;
    }

    private int BlockCharacteristicsPage(byte[] d)
    {
        d[1] = 0xB1;
        BinaryPrimitives.WriteUInt16BigEndian(d.AsSpan(2), 0x3C);
        BinaryPrimitives.WriteUInt16BigEndian(d.AsSpan(4), 1);                          // non-rotating medium
        return 64;
    }

    private int ProvisioningPage(byte[] d)
    {
        d[1] = 0xB2;
        BinaryPrimitives.WriteUInt16BigEndian(d.AsSpan(2), 4);
        if (Thin)
        {
            d[5] = 0x80 | 0x40 | 0x20 | 0x04;                                           // LBPU, LBPWS, LBPWS10, LBPRZ
            d[6] = 0x02;                                                                // thin provisioned
        }
        return 8;
    }

    // ---------------------------------------------------------------- capacity

    private ValueTask ReadCapacity10(ScsiCommand command)
    {
        var d = command.EnsureBuffer(8);
        long last = BlockCount - 1;
        BinaryPrimitives.WriteUInt32BigEndian(d, last > 0xFFFFFFFFL ? 0xFFFFFFFF : (uint)last);
        BinaryPrimitives.WriteUInt32BigEndian(d.AsSpan(4), (uint)BlockSize);
        command.CompleteGood(8);
        return ValueTask.CompletedTask;
    }

    private ValueTask ReadCapacity16(ScsiCommand command)
    {
        uint allocation = BinaryPrimitives.ReadUInt32BigEndian(command.Cdb.Slice(10));
        var d = command.EnsureBuffer(32);
        d.AsSpan(0, 32).Clear();
        BinaryPrimitives.WriteUInt64BigEndian(d, (ulong)(BlockCount - 1));
        BinaryPrimitives.WriteUInt32BigEndian(d.AsSpan(8), (uint)BlockSize);
        d[13] = 0;                                                                      // LBPPBE 0: see README (GET LBA STATUS granularity)
        if (Thin) d[14] = 0x80 | 0x40;                                                  // LBPME, LBPRZ
        command.CompleteGood((int)Math.Min(32, allocation));
        return ValueTask.CompletedTask;
    }
}
