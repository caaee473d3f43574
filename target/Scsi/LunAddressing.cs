using ISCSISnap.Target.Hosting;

namespace ISCSISnap.Target.Scsi;

/// <summary>SAM-5 LUN encoding: peripheral device addressing for 0-255, flat space addressing for 256-16383.</summary>
public static class LunAddressing
{
    public const ulong MaxLun = 16383;

    public static ulong Encode(ulong lun)
    {
        if (lun < 256) return lun << 48;
        if (lun <= MaxLun) return (0x4000UL | lun) << 48;
        throw new ArgumentOutOfRangeException(nameof(lun), lun, "LUNs are 0-16383");
    }

    /// <summary>Decodes the 8-byte LUN field; <paramref name="valid"/> is false for addressing methods this target does not use.</summary>
    public static ulong Decode(ulong field, out bool valid)
    {
        int method = (int)(field >> 62);
        ulong rest = field & 0x0000FFFFFFFFFFFFUL;
        valid = rest == 0;
        switch (method)
        {
            case 0:
                if (((field >> 56) & 0x3F) != 0) valid = false;   // bus identifier must be 0
                return (field >> 48) & 0xFF;
            case 1:
                return (field >> 48) & 0x3FFF;
            default:
                valid = false;
                return ulong.MaxValue;
        }
    }
}

/// <summary>Lists the LUNs of the target a logical unit belongs to (REPORT LUNS).</summary>
public interface ILunDirectory
{
    IEnumerable<ulong> LunNumbers { get; }
}

/// <summary>Answers for a LUN that does not exist (SPC-4 §4.6.4): INQUIRY says "not present", REPORT LUNS works, the rest fail.</summary>
internal static class MissingLogicalUnit
{
    public static void Handle(ScsiCommand command, IscsiTarget target)
    {
        switch (command.Opcode)
        {
            case 0x12:   // INQUIRY
            {
                var cdb = command.Cdb;
                int allocation = (cdb[3] << 8) | cdb[4];
                if ((cdb[1] & 0x01) != 0)
                {
                    command.CompleteCheckCondition(SenseCode.LunNotSupported, false);
                    return;
                }
                var buffer = command.EnsureBuffer(36);
                buffer.AsSpan(0, 36).Clear();
                buffer[0] = 0x7F;   // peripheral qualifier 011b: no logical unit; device type 1Fh
                buffer[2] = 0x06;
                buffer[3] = 0x12;
                buffer[4] = 31;
                command.CompleteGood(Math.Min(36, allocation));
                return;
            }
            case 0xA0:   // REPORT LUNS
                ReportLuns.Execute(command, target.Luns.Keys);
                return;
            case 0x03:   // REQUEST SENSE
            {
                int allocation = command.Cdb[4];
                var buffer = command.EnsureBuffer(252);
                int length = ScsiCommand.WriteSense(buffer, SenseCode.LunNotSupported, (command.Cdb[1] & 1) != 0);
                command.CompleteGood(Math.Min(length, allocation));
                return;
            }
            default:
                command.CompleteCheckCondition(SenseCode.LunNotSupported, false);
                return;
        }
    }
}

/// <summary>REPORT LUNS (SPC-4 §6.33).</summary>
internal static class ReportLuns
{
    public static void Execute(ScsiCommand command, IEnumerable<ulong> luns)
    {
        var cdb = command.Cdb;
        byte select = cdb[2];
        uint allocation = (uint)((cdb[6] << 24) | (cdb[7] << 16) | (cdb[8] << 8) | cdb[9]);
        if (select is not (0x00 or 0x01 or 0x02))
        {
            command.CompleteCheckCondition(SenseCode.InvalidFieldInCdb, false, keySpecific: new SenseKeySpecific(true, 2));
            return;
        }
        if (allocation < 16)
        {
            command.CompleteCheckCondition(SenseCode.InvalidFieldInCdb, false, keySpecific: new SenseKeySpecific(true, 6));
            return;
        }
        var list = select == 0x01 ? new List<ulong>() : luns.ToList();   // no well-known LUs
        int length = 8 + 8 * list.Count;
        var buffer = command.EnsureBuffer(length);
        buffer.AsSpan(0, length).Clear();
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(buffer, (uint)(8 * list.Count));
        for (int i = 0; i < list.Count; i++)
            System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(buffer.AsSpan(8 + 8 * i), LunAddressing.Encode(list[i]));
        command.CompleteGood((int)Math.Min(length, allocation));
    }
}
