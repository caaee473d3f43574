using System.Buffers.Binary;

namespace ISCSISnap.Target.Scsi;

public sealed partial class LogicalUnit
{
    /// <summary>
    /// Per-command CDB checks in the order initiators expect (fields, then LBA range, then write protection,
    /// then data length) and the Data-Out plan. Completes the command on error.
    /// </summary>
    private void Prepare(ScsiCommand command, ReadOnlySpan<byte> cdb)
    {
        switch (cdb[0])
        {
            case 0x08: case 0x28: case 0xA8: case 0x88:
                PrepareRead(command, cdb);
                return;
            case 0x0A: case 0x2A: case 0xAA: case 0x8A:
                PrepareWrite(command, cdb);
                return;
            case 0x2E: case 0xAE: case 0x8E:
                PrepareWrite(command, cdb);   // WRITE AND VERIFY streams like WRITE, then reads back
                return;
            case 0x2F: case 0xAF: case 0x8F:
                PrepareVerify(command, cdb);
                return;
            case 0x8B:
                PrepareBlocksOut(command, cdb, ReadTransferLength(cdb));
                return;
            case 0x89:
                PrepareCompareAndWrite(command, cdb);
                return;
            case 0x9C:
                PrepareWriteAtomic(command, cdb);
                return;
            case 0x41: case 0x93:
                PrepareWriteSame(command, cdb);
                return;
            case 0x42:
                PrepareUnmap(command, cdb);
                return;
            case 0x34: case 0x90: case 0x35: case 0x91:
                PrepareCacheRange(command, cdb);
                return;
            case 0x15:
                PrepareParameterList(command, cdb, cdb[4], checkWriteProtect: false);
                return;
            case 0x55:
                PrepareParameterList(command, cdb, BinaryPrimitives.ReadUInt16BigEndian(cdb.Slice(7)), checkWriteProtect: false);
                return;
            case 0x5F:
                PrepareParameterList(command, cdb, (int)Math.Min(BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(5)), 1 << 20), checkWriteProtect: false);
                return;
            case 0x83:
            {
                uint length = BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(10));
                if (length > MaxCopyParameterListBytes)
                {
                    FailField(command, 10, code: SenseCode.ParameterListLengthError);
                    return;
                }
                if (WriteProtected)
                {
                    Fail(command, SoftwareOrHardwareWriteProtect);
                    return;
                }
                PrepareParameterList(command, cdb, (int)length, checkWriteProtect: false);
                return;
            }
            case 0x04:
                if ((cdb[1] & 0x10) != 0) FailField(command, 1, 4);   // FMTDATA: no format parameters supported
                else if (WriteProtected) Fail(command, SoftwareOrHardwareWriteProtect);
                return;
            case 0x1D:
                if (BinaryPrimitives.ReadUInt16BigEndian(cdb.Slice(3)) != 0) FailField(command, 3);
                else if ((cdb[1] & 0x04) == 0 && (cdb[1] & 0xE0) != 0) FailField(command, 1, 5);   // self-test codes other than the default
                return;
            case 0x56: case 0x57:
                if ((cdb[1] & 0x13) != 0) FailField(command, 1);   // third-party and LONGID reservations are not supported
                return;
            default:
                return;
        }
    }

    /// <summary>
    /// The checks every block-addressed READ/WRITE/VERIFY shares, in the order initiators expect: protection
    /// field, LBA range (overflow-safe), transfer length, then write protection. False when the command failed.
    /// </summary>
    private bool CheckBlockCommand(ScsiCommand command, ReadOnlySpan<byte> cdb, uint blocks, bool write)
    {
        bool sixByte = cdb[0] is 0x08 or 0x0A;
        if (!sixByte && (cdb[1] & 0xE0) != 0)
        {
            FailField(command, 1, 7);   // RDPROTECT/WRPROTECT/VRPROTECT without protection information
            return false;
        }
        if (!RangeValid(ReadLba(cdb), blocks))
        {
            Fail(command, SenseCode.LbaOutOfRange);
            return false;
        }
        if (blocks > MaxTransferBlocks)
        {
            FailField(command, TransferLengthField(cdb[0]));
            return false;
        }
        if (write && WriteProtected)
        {
            Fail(command, SoftwareOrHardwareWriteProtect);
            return false;
        }
        return true;
    }

    /// <summary>Where the transfer length sits in the CDB, by command group (for sense field pointers).</summary>
    private static int TransferLengthField(byte opcode) => opcode switch
    {
        0x08 or 0x0A => 4,
        >= 0x80 and < 0xA0 => 10,
        >= 0xA0 => 6,
        _ => 7,
    };

    private void PrepareRead(ScsiCommand command, ReadOnlySpan<byte> cdb) =>
        CheckBlockCommand(command, cdb, ReadTransferLength(cdb), write: false);

    private void PrepareWrite(ScsiCommand command, ReadOnlySpan<byte> cdb)
    {
        uint blocks = ReadTransferLength(cdb);
        if (!CheckBlockCommand(command, cdb, blocks, write: true)) return;
        command.DataOutMode = DataOutMode.Stream;
        command.DataOutLength = (int)(blocks << BlockShift);
    }

    /// <summary>Commands whose Data-Out is <paramref name="blocks"/> logical blocks, collected before execution.</summary>
    private void PrepareBlocksOut(ScsiCommand command, ReadOnlySpan<byte> cdb, uint blocks)
    {
        if (CheckBlockCommand(command, cdb, blocks, write: true)) PlanBuffered(command, (int)(blocks << BlockShift));
    }

    private void PrepareVerify(ScsiCommand command, ReadOnlySpan<byte> cdb)
    {
        int byteCheck = (cdb[1] >> 1) & 0x03;
        if ((cdb[1] & 0xE0) == 0 && byteCheck == 2)
        {
            FailField(command, 1, 2);
            return;
        }
        uint blocks = ReadTransferLength(cdb);
        if (!CheckBlockCommand(command, cdb, blocks, write: false)) return;
        if (byteCheck == 1) PlanBuffered(command, (int)(blocks << BlockShift));
        else if (byteCheck == 3) PlanBuffered(command, blocks == 0 ? 0 : BlockSize);
    }

    private void PrepareCompareAndWrite(ScsiCommand command, ReadOnlySpan<byte> cdb)
    {
        if ((cdb[1] & 0xE0) != 0)
        {
            FailField(command, 1, 7);
            return;
        }
        int blocks = cdb[13];
        if (blocks > Options.MaxCompareAndWriteBlocks)
        {
            FailField(command, 13);
            return;
        }
        ulong lba = ReadLba(cdb);
        if (!RangeValid(lba, (ulong)blocks))
        {
            Fail(command, SenseCode.LbaOutOfRange);
            return;
        }
        if (WriteProtected)
        {
            Fail(command, SoftwareOrHardwareWriteProtect);
            return;
        }
        int length = 2 * (blocks << BlockShift);
        if (command.ExpectedTransferLength != (uint)length)
        {
            // The data-out must hold exactly the compare and the write blocks (SBC-3 §5.2).
            FailField(command, 13);
            return;
        }
        PlanBuffered(command, length);
    }

    private void PrepareWriteAtomic(ScsiCommand command, ReadOnlySpan<byte> cdb)
    {
        if ((cdb[1] & 0xE0) != 0)
        {
            FailField(command, 1, 7);
            return;
        }
        ulong lba = ReadLba(cdb);
        uint blocks = BinaryPrimitives.ReadUInt16BigEndian(cdb.Slice(12));
        if (!RangeValid(lba, blocks))
        {
            Fail(command, SenseCode.LbaOutOfRange);
            return;
        }
        if (blocks > MaxAtomicTransferBlocks)
        {
            FailField(command, 12);
            return;
        }
        if (WriteProtected)
        {
            Fail(command, SoftwareOrHardwareWriteProtect);
            return;
        }
        PlanBuffered(command, (int)(blocks << BlockShift));
    }

    private void PrepareWriteSame(ScsiCommand command, ReadOnlySpan<byte> cdb)
    {
        bool sixteen = cdb[0] == 0x93;
        byte flags = cdb[1];
        if ((flags & 0xE0) != 0)
        {
            FailField(command, 1, 7);   // WRPROTECT
            return;
        }
        bool anchor = (flags & 0x10) != 0, unmap = (flags & 0x08) != 0, noDataOut = sixteen && (flags & 0x01) != 0;
        if (anchor)
        {
            FailField(command, 1, 4);   // anchored LBAs are not supported (ANC_SUP=0)
            return;
        }
        ulong lba = ReadLba(cdb);
        ulong blocks = sixteen ? BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(10)) : BinaryPrimitives.ReadUInt16BigEndian(cdb.Slice(7));
        ulong capacity = (ulong)BlockCount;
        if (lba > capacity || (blocks != 0 && !RangeValid(lba, blocks)))
        {
            Fail(command, SenseCode.LbaOutOfRange);
            return;
        }
        if (blocks == 0) blocks = capacity - lba;   // WSNZ=0: zero blocks means "to the end"
        if (Options.MaxWriteSameBlocks != 0 && blocks > Options.MaxWriteSameBlocks)
        {
            FailField(command, sixteen ? 10 : 7);
            return;
        }
        if (WriteProtected)
        {
            Fail(command, SoftwareOrHardwareWriteProtect);
            return;
        }
        if (unmap && !Thin)
        {
            FailField(command, 1, 3);
            return;
        }
        int dataOut = noDataOut ? 0 : BlockSize;
        if (command.ExpectedTransferLength != (uint)dataOut)
        {
            FailField(command, 1, noDataOut ? 0 : null);   // the data-out must be exactly one block (none with NDOB)
            return;
        }
        PlanBuffered(command, dataOut);
    }

    private void PrepareUnmap(ScsiCommand command, ReadOnlySpan<byte> cdb)
    {
        if ((cdb[1] & 0x01) != 0)
        {
            FailField(command, 1, 0);   // ANCHOR
            return;
        }
        if (WriteProtected)
        {
            Fail(command, SoftwareOrHardwareWriteProtect);   // write protection is reported before anything else
            return;
        }
        if (!Thin)
        {
            Fail(command, SenseCode.InvalidOpcode);
            return;
        }
        int length = BinaryPrimitives.ReadUInt16BigEndian(cdb.Slice(7));
        if (length > 8 + 16 * Options.MaxUnmapDescriptors + 16)
        {
            FailField(command, 7, code: SenseCode.ParameterListLengthError);
            return;
        }
        PlanBuffered(command, length);
    }

    private void PrepareCacheRange(ScsiCommand command, ReadOnlySpan<byte> cdb)
    {
        ulong lba = ReadLba(cdb);
        ulong blocks = cdb[0] is 0x34 or 0x35 ? BinaryPrimitives.ReadUInt16BigEndian(cdb.Slice(7)) : BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(10));
        if (!RangeValid(lba, blocks)) Fail(command, SenseCode.LbaOutOfRange);
    }

    private void PrepareParameterList(ScsiCommand command, ReadOnlySpan<byte> cdb, int length, bool checkWriteProtect)
    {
        if (checkWriteProtect && WriteProtected)
        {
            Fail(command, SoftwareOrHardwareWriteProtect);
            return;
        }
        PlanBuffered(command, length);
    }

    private void PlanBuffered(ScsiCommand command, int length)
    {
        if (length == 0) return;
        if (!command.TryEnsureBuffer(length))
        {
            command.Complete(ScsiStatus.TaskSetFull);
            return;
        }
        command.DataOutMode = DataOutMode.Buffered;
        command.DataOutLength = length;
    }

    internal SenseCode SoftwareOrHardwareWriteProtect =>
        _softwareWriteProtect ? new SenseCode(SenseKey.DataProtect, 0x27, 0x02) : SenseCode.WriteProtected;

    internal int MaxAtomicTransferBlocks => Math.Min(Math.Min(Options.MaxAtomicTransferBlocks, (int)MaxTransferBlocks), Device.MaxAtomicWriteBytes >> BlockShift);

    /// <summary>Largest EXTENDED COPY parameter list accepted.</summary>
    internal const int MaxCopyParameterListBytes = 16 + 1024 + 4096;
}
