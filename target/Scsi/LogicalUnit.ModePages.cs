using System.Buffers.Binary;

namespace ISCSISnap.Target.Scsi;

public sealed partial class LogicalUnit
{
    private volatile bool _writeCacheEnabled;
    private volatile bool _descriptorSense;
    private volatile bool _softwareWriteProtect;

    private enum PageControl { Current = 0, Changeable = 1, Default = 2, Saved = 3 }

    /// <summary>Mode pages in the order MODE SENSE lists them for page 3Fh.</summary>
    private static readonly byte[] s_modePages = [0x01, 0x08, 0x0A, 0x1C];

    private ValueTask ModeSense(ScsiCommand command)
    {
        var cdb = command.Cdb;
        bool ten = cdb[0] == 0x5A;
        bool dbd = (cdb[1] & 0x08) != 0;
        bool llbaa = ten && (cdb[1] & 0x10) != 0;
        var pc = (PageControl)(cdb[2] >> 6);
        byte page = (byte)(cdb[2] & 0x3F);
        byte subpage = cdb[3];
        int allocation = ten ? BinaryPrimitives.ReadUInt16BigEndian(cdb.Slice(7)) : cdb[4];

        if (pc == PageControl.Saved)
        {
            Fail(command, SenseCode.SavingParametersNotSupported);
            return ValueTask.CompletedTask;
        }
        if (page != 0x3F && Array.IndexOf(s_modePages, page) < 0)
        {
            FailField(command, 2, 5);
            return ValueTask.CompletedTask;
        }
        if (subpage != 0 && !(subpage == 0xFF))
        {
            FailField(command, 3);
            return ValueTask.CompletedTask;
        }

        var d = command.EnsureBuffer(512);
        int header = ten ? 8 : 4;
        int offset = header;
        if (!dbd)
        {
            ulong blocks = (ulong)BlockCount;
            if (llbaa)
            {
                var bd = d.AsSpan(offset, 16);
                bd.Clear();
                BinaryPrimitives.WriteUInt64BigEndian(bd, blocks);
                BinaryPrimitives.WriteUInt32BigEndian(bd.Slice(12), (uint)BlockSize);
                offset += 16;
            }
            else
            {
                var bd = d.AsSpan(offset, 8);
                bd.Clear();
                uint count = blocks > 0xFFFFFF ? 0xFFFFFF : (uint)blocks;
                if (ten) BinaryPrimitives.WriteUInt32BigEndian(bd, blocks > 0xFFFFFFFF ? 0xFFFFFFFF : (uint)blocks);
                else { bd[1] = (byte)(count >> 16); bd[2] = (byte)(count >> 8); bd[3] = (byte)count; }
                bd[5] = (byte)(BlockSize >> 16); bd[6] = (byte)(BlockSize >> 8); bd[7] = (byte)BlockSize;
                offset += 8;
            }
        }
        int blockDescriptorLength = offset - header;
        if (page == 0x3F)
            foreach (byte p in s_modePages) offset += WriteModePage(d.AsSpan(offset), p, pc);
        else
            offset += WriteModePage(d.AsSpan(offset), page, pc);

        byte deviceSpecific = (byte)((WriteProtected ? 0x80 : 0) | 0x10);   // WP, DPOFUA
        if (ten)
        {
            BinaryPrimitives.WriteUInt16BigEndian(d, (ushort)(offset - 2));
            d[2] = 0;
            d[3] = deviceSpecific;
            d[4] = (byte)(llbaa && !dbd ? 0x01 : 0);
            d[5] = 0;
            BinaryPrimitives.WriteUInt16BigEndian(d.AsSpan(6), (ushort)blockDescriptorLength);
        }
        else
        {
            d[0] = (byte)(offset - 1);
            d[1] = 0;
            d[2] = deviceSpecific;
            d[3] = (byte)blockDescriptorLength;
        }
        command.CompleteGood(Math.Min(offset, allocation));
        return ValueTask.CompletedTask;
    }

    private int WriteModePage(Span<byte> d, byte page, PageControl pc)
    {
        bool changeable = pc == PageControl.Changeable;
        bool current = pc == PageControl.Current;
        switch (page)
        {
            case 0x01:   // read-write error recovery: nothing configurable
            {
                var p = d.Slice(0, 12);
                p.Clear();
                p[0] = 0x01;
                p[1] = 0x0A;
                return 12;
            }
            case 0x08:   // caching
            {
                var p = d.Slice(0, 20);
                p.Clear();
                p[0] = 0x08;
                p[1] = 0x12;
                if (changeable) p[2] = 0x04;
                else if (current ? _writeCacheEnabled : Options.WriteCacheEnabled) p[2] = 0x04;   // WCE
                return 20;
            }
            case 0x0A:   // control
            {
                var p = d.Slice(0, 12);
                p.Clear();
                p[0] = 0x0A;
                p[1] = 0x0A;
                if (changeable)
                {
                    p[2] = 0x04;      // D_SENSE
                    p[4] = 0x08;      // SWP
                }
                else if (current)
                {
                    if (_descriptorSense) p[2] |= 0x04;
                    if (_softwareWriteProtect) p[4] |= 0x08;
                }
                return 12;
            }
            case 0x1C:   // informational exceptions control: exceptions are not reported
            {
                var p = d.Slice(0, 12);
                p.Clear();
                p[0] = 0x1C;
                p[1] = 0x0A;
                if (!changeable) p[2] = 0x08;   // DEXCPT
                return 12;
            }
            default:
                return 0;
        }
    }

    private ValueTask ModeSelect(ScsiCommand command)
    {
        var cdb = command.Cdb;
        bool ten = cdb[0] == 0x55;
        if ((cdb[1] & 0x01) != 0)
        {
            FailField(command, 1, 0);   // SP: pages cannot be saved
            return ValueTask.CompletedTask;
        }
        if ((cdb[1] & 0x10) == 0 && command.DataOutLength > 0)
        {
            FailField(command, 1, 4);   // PF=0: vendor-specific page format is not supported
            return ValueTask.CompletedTask;
        }
        int length = command.DataOutLength;
        if (length == 0)
        {
            command.CompleteGood();
            return ValueTask.CompletedTask;
        }
        if (command.DataOutReceived < length)
        {
            Fail(command, SenseCode.ParameterListLengthError);
            return ValueTask.CompletedTask;
        }
        var data = command.Buffer.AsSpan(0, length);
        int header = ten ? 8 : 4;
        if (length < header)
        {
            Fail(command, SenseCode.ParameterListLengthError);
            return ValueTask.CompletedTask;
        }
        int blockDescriptorLength = ten ? BinaryPrimitives.ReadUInt16BigEndian(data.Slice(6)) : data[3];
        int offset = header;
        if (offset + blockDescriptorLength > length)
        {
            Fail(command, SenseCode.ParameterListLengthError);
            return ValueTask.CompletedTask;
        }
        if (blockDescriptorLength != 0)
        {
            // A block descriptor may restate the geometry but not change it.
            bool longLba = ten && (data[4] & 0x01) != 0;
            int descriptorSize = longLba ? 16 : 8;
            if (blockDescriptorLength != descriptorSize)
            {
                FailParameter(command, ten ? 6 : 3);
                return ValueTask.CompletedTask;
            }
            var bd = data.Slice(offset, descriptorSize);
            int blockLength = longLba ? (int)BinaryPrimitives.ReadUInt32BigEndian(bd.Slice(12)) : (bd[5] << 16) | (bd[6] << 8) | bd[7];
            if (blockLength != BlockSize)
            {
                FailParameter(command, offset + (longLba ? 12 : 5));
                return ValueTask.CompletedTask;
            }
            offset += descriptorSize;
        }

        bool wce = _writeCacheEnabled, dsense = _descriptorSense, swp = _softwareWriteProtect;
        Span<byte> currentPage = stackalloc byte[64];
        Span<byte> changeableMask = stackalloc byte[64];
        while (offset < length)
        {
            if (offset + 2 > length)
            {
                Fail(command, SenseCode.ParameterListLengthError);
                return ValueTask.CompletedTask;
            }
            byte code = (byte)(data[offset] & 0x3F);
            bool subpageFormat = (data[offset] & 0x40) != 0;
            int pageLength = data[offset + 1] + 2;
            if (subpageFormat || Array.IndexOf(s_modePages, code) < 0)
            {
                FailParameter(command, offset);
                return ValueTask.CompletedTask;
            }
            int ours = WriteModePage(currentPage, code, PageControl.Current);
            WriteModePage(changeableMask, code, PageControl.Changeable);
            if (pageLength != ours || offset + pageLength > length)
            {
                FailParameter(command, offset + 1);
                return ValueTask.CompletedTask;
            }
            var page = data.Slice(offset, pageLength);
            for (int i = 2; i < pageLength; i++)
            {
                // Only changeable bits may differ from the current values.
                if (((page[i] ^ currentPage[i]) & ~changeableMask[i]) != 0)
                {
                    FailParameter(command, offset + i);
                    return ValueTask.CompletedTask;
                }
            }
            switch (code)
            {
                case 0x08: wce = (page[2] & 0x04) != 0; break;
                case 0x0A:
                    dsense = (page[2] & 0x04) != 0;
                    swp = (page[4] & 0x08) != 0;
                    break;
            }
            offset += pageLength;
        }

        bool changed;
        lock (_stateLock)
        {
            changed = wce != _writeCacheEnabled || dsense != _descriptorSense || swp != _softwareWriteProtect;
            _writeCacheEnabled = wce;
            _descriptorSense = dsense;
            _softwareWriteProtect = swp;
        }
        if (changed) RaiseUnitAttentionForAll(SenseCode.ModeParametersChanged, except: command.Nexus.Key);
        command.CompleteGood();
        return ValueTask.CompletedTask;
    }
}
