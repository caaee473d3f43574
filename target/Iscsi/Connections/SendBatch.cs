using ISCSISnap.Storage.Integrity;
using System.Buffers.Binary;
using ISCSISnap.Target.Iscsi.Pdus;

namespace ISCSISnap.Target.Iscsi.Connections;

/// <summary>
/// One gather send under construction: PDU headers (with digests) are written into a pinned arena, payloads are
/// referenced where they already are (read buffers, text bytes), never copied. Every array a batch references
/// lives on the pinned object heap (arena, padding, <see cref="Storage.Buffers.PinnedBufferPool"/> buffers,
/// <see cref="ControlPduItem.SetData"/>), so the transport may hand their addresses to sendmsg directly.
/// Threading: used by the connection's single send loop only.
/// </summary>
internal sealed class SendBatch
{
    public const int MaxSegments = 256;
    private const int ArenaSize = 64 * 1024;
    private const long MaxBytes = 4 << 20;
    private static readonly byte[] s_padding = GC.AllocateArray<byte>(4, pinned: true);

    private readonly byte[] _arena = GC.AllocateArray<byte>(ArenaSize, pinned: true);
    private int _arenaUsed;

    public List<ArraySegment<byte>> Segments { get; } = new(MaxSegments);
    public List<OutboundItem> Finished { get; } = new(64);
    public long Bytes { get; private set; }
    public bool HeaderDigest { get; set; }
    public bool DataDigest { get; set; }
    public bool IsEmpty => Segments.Count == 0;

    public void Reset()
    {
        Segments.Clear();
        Finished.Clear();
        _arenaUsed = 0;
        Bytes = 0;
    }

    /// <summary>Whether one more PDU (header, payload, padding and digests) fits.</summary>
    public bool HasRoom => Segments.Count + 3 <= MaxSegments && _arenaUsed + 128 + ScsiSenseMax <= ArenaSize && Bytes < MaxBytes;

    private const int ScsiSenseMax = 2 + 96 + 8;

    /// <summary>A zeroed 48-byte header in the arena; finish it with <see cref="Commit"/>.</summary>
    public Span<byte> NewHeader()
    {
        var header = _arena.AsSpan(_arenaUsed, Bhs.Size);
        header.Clear();
        return header;
    }

    /// <summary>Scratch space in the arena for a small payload (sense data, say) that follows the current header.</summary>
    public ArraySegment<byte> SmallPayload(int length)
    {
        int start = _arenaUsed + Bhs.Size + 4;
        return new ArraySegment<byte>(_arena, start, length);
    }

    /// <summary>Adds the header made by <see cref="NewHeader"/> and its payload (which may be empty) to the batch.</summary>
    public void Commit(ArraySegment<byte> payload)
    {
        var header = _arena.AsSpan(_arenaUsed, Bhs.Size);
        HeaderWriter.DataSegmentLength(header, payload.Count);
        int headerLength = Bhs.Size;
        if (HeaderDigest)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(_arena.AsSpan(_arenaUsed + Bhs.Size, 4), Crc32C.Compute(header));
            headerLength += 4;
        }
        bool payloadInArena = payload.Array == _arena;
        Segments.Add(new ArraySegment<byte>(_arena, _arenaUsed, headerLength));
        _arenaUsed += headerLength;
        Bytes += headerLength;
        if (payloadInArena)
        {
            // The small payload was written right after the header: claim it.
            _arenaUsed = payload.Offset + payload.Count;
        }
        if (payload.Count == 0) return;

        Segments.Add(payload);
        Bytes += payload.Count;
        int pad = (4 - (payload.Count & 3)) & 3;
        if (!DataDigest)
        {
            if (pad != 0)
            {
                Segments.Add(new ArraySegment<byte>(s_padding, 0, pad));
                Bytes += pad;
            }
            return;
        }
        uint crc = Crc32C.Append(Crc32C.Seed, payload);
        if (pad != 0) crc = Crc32C.Append(crc, s_padding.AsSpan(0, pad));
        crc ^= Crc32C.Seed;
        var tail = _arena.AsSpan(_arenaUsed, pad + 4);
        tail.Slice(0, pad).Clear();
        BinaryPrimitives.WriteUInt32LittleEndian(tail.Slice(pad), crc);
        Segments.Add(new ArraySegment<byte>(_arena, _arenaUsed, pad + 4));
        _arenaUsed += pad + 4;
        Bytes += pad + 4;
    }
}
