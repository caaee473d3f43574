using System.Diagnostics;
using System.Runtime.InteropServices;

namespace ISCSISnap.Storage.Sharing;

/// <summary>
/// The handle table of one link, kept in a region the owner writes and the peer may only read, so both sides check
/// a handle against the same facts and a revocation is seen by the peer the moment the owner makes it, with no
/// message. Each slot holds one grant; its generation is written last when granted and cleared first when revoked,
/// and generations never repeat within a link, so a reader that sees the same generation before and after reading
/// a slot's fields has read one consistent grant. Threading: any number of readers; grants and revocations are
/// lock-free and may run concurrently with each other and with readers.
/// </summary>
internal sealed unsafe class HandleTable
{
    public const int HeaderSize = 64;
    public const uint Magic = 0x31544853;   // "SHT1"

    [StructLayout(LayoutKind.Explicit, Size = 64)]
    private struct Entry
    {
        [FieldOffset(0)] public ulong Generation;   // 0: free
        [FieldOffset(8)] public long Offset;
        [FieldOffset(16)] public long Length;
        [FieldOffset(24)] public long ExpiresAt;    // monotonic nanoseconds; long.MaxValue: never
        [FieldOffset(32)] public uint Region;
        [FieldOffset(36)] public uint Peer;
        [FieldOffset(40)] public byte Rights;
        [FieldOffset(41)] public byte OneShot;
    }

    private readonly Entry* _entries;
    private readonly uint _slots;
    private readonly uint _peer;
    private readonly SharedRegion[] _regions;
    private readonly ulong[] _consumed;           // this side's record of one-shot handles already used
    // Owner only: free slots as a lock-free stack (head = tag << 32 | slot + 1) and the generation counter.
    private readonly int[]? _nextFree;
    private long _freeHead;
    private long _generation;

    public static long BytesFor(int slots) => HeaderSize + (long)slots * sizeof(Entry);

    public uint Slots => _slots;

    private HandleTable(byte* memory, uint slots, uint peer, SharedRegion[] regions, bool owner)
    {
        _entries = (Entry*)(memory + HeaderSize);
        _slots = slots;
        _peer = peer;
        _regions = regions;
        _consumed = new ulong[slots];
        if (owner)
        {
            _nextFree = new int[slots];
            for (uint slot = slots; slot-- > 0;) Push(slot);
        }
    }

    /// <summary>Lays a fresh table out in <paramref name="table"/> (zeroed by the kernel) for the owner.</summary>
    public static HandleTable CreateForOwner(SharedRegion table, uint slots, uint peer, SharedRegion[] regions)
    {
        uint* header = (uint*)table.Pointer;
        header[0] = Magic;
        header[1] = peer;
        header[2] = slots;
        return new HandleTable(table.Pointer, slots, peer, regions, owner: true);
    }

    /// <summary>Reads a table the owner laid out, checking it matches what the hand-over declared.</summary>
    public static HandleTable OpenForPeer(SharedRegion table, uint slots, uint peer, SharedRegion[] regions)
    {
        uint* header = (uint*)table.Pointer;
        if (header[0] != Magic || header[1] != peer || header[2] != slots || BytesFor((int)slots) > table.Length)
            throw new SharingException(SharingCheck.Handshake, "the handle table does not match the hand-over");
        return new HandleTable(table.Pointer, slots, peer, regions, owner: false);
    }

    public static long MonotonicNanoseconds()
    {
        long ticks = Stopwatch.GetTimestamp();
        return Stopwatch.Frequency == 1_000_000_000 ? ticks : (long)(ticks * (1_000_000_000.0 / Stopwatch.Frequency));
    }

    /// <summary>Owner: records a grant in a free slot. False when every slot is granted.</summary>
    public bool TryGrant(uint region, long offset, long length, HandleRights rights, long expiresAt, bool oneShot, out SharedHandle handle)
    {
        if (!TryPop(out uint slot))
        {
            SweepExpired();
            if (!TryPop(out slot))
            {
                handle = default;
                return false;
            }
        }
        ulong generation = (ulong)Interlocked.Increment(ref _generation);
        Entry* entry = _entries + slot;
        entry->Offset = offset;
        entry->Length = length;
        entry->ExpiresAt = expiresAt;
        entry->Region = region;
        entry->Peer = _peer;
        entry->Rights = (byte)rights;
        entry->OneShot = oneShot ? (byte)1 : (byte)0;
        Volatile.Write(ref entry->Generation, generation);
        handle = new SharedHandle(generation, slot, _peer);
        return true;
    }

    /// <summary>Owner: ends a grant. False if it had ended already (or was never this table's).</summary>
    public bool Revoke(SharedHandle handle)
    {
        if (handle.Peer != _peer || handle.Slot >= _slots || handle.Generation == 0) return false;
        if (Interlocked.CompareExchange(ref _entries[handle.Slot].Generation, 0, handle.Generation) != handle.Generation) return false;
        Push(handle.Slot);
        return true;
    }

    /// <summary>Owner: ends every grant; returns how many were live.</summary>
    public int RevokeAll()
    {
        int revoked = 0;
        for (uint slot = 0; slot < _slots; slot++)
        {
            ulong generation = Volatile.Read(ref _entries[slot].Generation);
            if (generation != 0 && Interlocked.CompareExchange(ref _entries[slot].Generation, 0, generation) == generation)
            {
                Push(slot);
                revoked++;
            }
        }
        return revoked;
    }

    /// <summary>Owner: frees the slots of expired grants, so a table full of forgotten handles recovers by itself.</summary>
    private void SweepExpired()
    {
        long now = MonotonicNanoseconds();
        for (uint slot = 0; slot < _slots; slot++)
        {
            Entry* entry = _entries + slot;
            ulong generation = Volatile.Read(ref entry->Generation);
            if (generation == 0 || entry->ExpiresAt > now) continue;
            if (Interlocked.CompareExchange(ref entry->Generation, 0, generation) == generation) Push(slot);
        }
    }

    /// <summary>
    /// The checked way from a handle to memory: the bytes [<paramref name="offset"/>, +<paramref name="length"/>)
    /// of the handle's range, if the handle is this peer's, current, carries <paramref name="wanted"/>, has not
    /// expired and (one-shot) has not been used on this side before. A negative length means to the end of the range.
    /// </summary>
    public SharingCheck Check(SharedHandle handle, HandleRights wanted, long offset, long length, out byte* memory, out int resolvedLength)
    {
        memory = null;
        resolvedLength = 0;
        if (handle.Peer != _peer) return SharingCheck.Peer;
        if (handle.Slot >= _slots) return SharingCheck.Slot;
        Entry* entry = _entries + handle.Slot;
        ulong generation = Volatile.Read(ref entry->Generation);
        if (generation == 0 || generation != handle.Generation) return SharingCheck.Revoked;
        long start = entry->Offset, size = entry->Length, expiresAt = entry->ExpiresAt;
        uint region = entry->Region;
        var rights = (HandleRights)entry->Rights;
        bool oneShot = entry->OneShot != 0;
        Interlocked.MemoryBarrier();   // the fields above were read before the generation is read again
        if (Volatile.Read(ref entry->Generation) != generation) return SharingCheck.Revoked;

        if (wanted == HandleRights.None || (rights & wanted) != wanted) return SharingCheck.Rights;
        if (length < 0) length = size - offset;
        if ((ulong)offset > (ulong)size || (ulong)length > (ulong)(size - offset) || length > int.MaxValue) return SharingCheck.Range;
        if (expiresAt != long.MaxValue && MonotonicNanoseconds() >= expiresAt) return SharingCheck.Expiry;
        if (region >= (uint)_regions.Length) return SharingCheck.Slot;
        SharedRegion target = _regions[region];
        if (start < 0 || start + size > target.Length) return SharingCheck.Slot;
        if ((wanted & HandleRights.Write) != 0 && !target.Writable) return SharingCheck.Rights;
        if (oneShot && Interlocked.Exchange(ref _consumed[handle.Slot], generation) == generation) return SharingCheck.OneShot;
        memory = target.Pointer + start + offset;
        resolvedLength = (int)length;
        return SharingCheck.None;
    }

    private bool TryPop(out uint slot)
    {
        while (true)
        {
            long head = Volatile.Read(ref _freeHead);
            int top = (int)(uint)head;
            if (top == 0)
            {
                slot = 0;
                return false;
            }
            long next = ((head >> 32) + 1) << 32 | (uint)_nextFree![top - 1];
            if (Interlocked.CompareExchange(ref _freeHead, next, head) == head)
            {
                slot = (uint)(top - 1);
                return true;
            }
        }
    }

    private void Push(uint slot)
    {
        while (true)
        {
            long head = Volatile.Read(ref _freeHead);
            _nextFree![slot] = (int)(uint)head;
            long next = ((head >> 32) + 1) << 32 | (slot + 1);
            if (Interlocked.CompareExchange(ref _freeHead, next, head) == head) return;
        }
    }
}
