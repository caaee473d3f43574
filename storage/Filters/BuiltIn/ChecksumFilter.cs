using System.Buffers;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Integrity;

namespace ISCSISnap.Storage.Filters.BuiltIn;

/// <summary>
/// End-to-end data integrity: the CRC-32C of every sector written through the stack is recorded, keyed by the disk
/// ID of the chain layer that holds it (so it stays right across snapshot, clone, revert and merge), and checked
/// when the sector is read back; a sector whose data no longer matches fails the read with
/// <see cref="IoStatus.ReadError"/> (MEDIUM ERROR, unrecovered read error). CRCs live in one
/// <see cref="ChecksumStore"/> per layer, made crash safe by its write-intent bitmap and the checkpoints this filter
/// runs every <c>checkpointInterval</c>. Races never produce a false error: overlapping concurrent writes record
/// "not recorded" for the overlap, and a mismatching read is read again once and fails only when nothing wrote the
/// range meanwhile. Counters: verified, unverified, mismatch (in sectors). Threading: thread-safe.
/// </summary>
public sealed class ChecksumFilter : IIoFilter, IRangeChangeListener, IAsyncDisposable
{
    private const int StripeCount = 64;
    private const int StripeShift = 23;   // one stripe per 8 MiB of LBA (hashed)

    private readonly string _directory;
    private readonly ChainDevice _chain;
    private readonly Func<ValueTask<IoStatus>> _flush;
    private readonly int _sectorSize;
    private readonly int _sectorShift;
    private readonly Stripe[] _stripes = new Stripe[StripeCount];
    private (Guid Id, ChecksumStore Store)[] _stores = [];
    private readonly Dictionary<Guid, Task<ChecksumStore>> _opening = new();
    private ChecksumStore[] _written = [];   // stores whose bits this filter sets (its device's flush makes them true): it checkpoints them
    private readonly object _lock = new();
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _checkpointer;
    private long _nextWriteId;
    private readonly System.Collections.Concurrent.ConcurrentDictionary<(long, long, ChecksumStore), byte> _changing = new();

    /// <summary>
    /// A filter for the LUN over <paramref name="chain"/> keeping its CRCs in <paramref name="directory"/> (shared by
    /// LUNs: files are per layer). <paramref name="flush"/> makes completed writes durable before a checkpoint trusts
    /// them (default: the chain's flush). <paramref name="checkpointInterval"/>: null for no background checkpoints.
    /// </summary>
    public ChecksumFilter(string directory, ChainDevice chain, Func<ValueTask<IoStatus>>? flush = null, TimeSpan? checkpointInterval = null)
    {
        _directory = directory;
        _chain = chain;
        _flush = flush ?? (() => chain.FlushAsync());
        _sectorSize = chain.LogicalBlockSize;
        _sectorShift = System.Numerics.BitOperations.Log2((uint)_sectorSize);
        for (int i = 0; i < _stripes.Length; i++) _stripes[i] = new Stripe();
        var interval = checkpointInterval ?? TimeSpan.FromSeconds(5);
        _checkpointer = interval > TimeSpan.Zero ? Task.Run(() => CheckpointLoopAsync(interval)) : Task.CompletedTask;
    }

    public string Name => "checksum";

    // ---------------------------------------------------------------- writes

    public async ValueTask<FilterVerdict> OnWriteAsync(Upcall upcall)
    {
        var request = upcall.Request;
        long offset = request.Offset;
        int length = request.Length;
        if (_chain.Head is not { } head || length == 0 || ((offset | (long)length) & (_sectorSize - 1)) != 0) return FilterVerdict.Pass;
        // The layer the data goes to; if the chain changes before we record, the owner we resolve differs and we record nothing.
        Guid headId = head.DiskId;
        var store = TryGetStore(headId) ?? await OpenStoreAsync(headId);
        Written(store);

        byte[]? copied = null;
        uint[] crcs = ArrayPool<uint>.Shared.Rent(length >> _sectorShift);
        var data = upcall.WriteData;
        ReadOnlyMemory<byte> contiguous;
        if (data.IsSingleSegment)
        {
            contiguous = data.First;
        }
        else
        {
            copied = ArrayPool<byte>.Shared.Rent(length);
            data.CopyTo(copied);
            contiguous = copied.AsMemory(0, length);
        }
        long id = Interlocked.Increment(ref _nextWriteId);
        try
        {
            ComputeCrcs(contiguous.Span, crcs);
            Register(id, offset, length);
            IoStatus status;
            try
            {
                await store.BeginWriteAsync(offset, length);   // the region's bit is durable before the data goes down
                try
                {
                    status = await upcall.Syscalls.WriteBelowAsync(offset, contiguous);
                    Record(upcall, id, store, headId, offset, length, crcs, status == IoStatus.Ok);
                }
                finally
                {
                    store.EndWrite(offset, length);
                }
            }
            finally
            {
                Unregister(id, offset, length);
            }
            return status == IoStatus.Ok ? FilterVerdict.Complete : FilterVerdict.Fail(status);
        }
        finally
        {
            ArrayPool<uint>.Shared.Return(crcs);
            if (copied is not null) ArrayPool<byte>.Shared.Return(copied);
        }
    }

    private void ComputeCrcs(ReadOnlySpan<byte> data, uint[] crcs)
    {
        for (int i = 0, at = 0; at < data.Length; i++, at += _sectorSize) crcs[i] = Crc32C.Compute(data.Slice(at, _sectorSize));
    }

    /// <summary>
    /// Records the write's CRCs for the sectors the head now holds, under the stripe locks so no overlapping write can
    /// start (and mark a conflict) between the conflict check and the record. A failed write or a conflict records
    /// "not recorded".
    /// </summary>
    private void Record(Upcall upcall, long id, ChecksumStore store, Guid headId, long offset, int length, uint[] crcs, bool written)
    {
        // Owners first (a syscall; cheap): after the write the head holds the whole range, unless the chain changed.
        bool ours = true;
        for (long at = offset; at < offset + length;)
        {
            var (owner, bytes) = upcall.Syscalls.ResolveOwner(at);
            if (owner != headId || bytes <= 0) { ours = false; break; }
            at += bytes;
        }
        long sector = offset >> _sectorShift;
        int count = length >> _sectorShift;
        var (lo, hi) = StripeRange(offset, length);
        EnterStripes(lo, hi);
        try
        {
            long conflictStart = long.MaxValue, conflictEnd = long.MinValue;
            foreach (int s in Touched(lo, hi)) _stripes[s].ConflictOf(id, ref conflictStart, ref conflictEnd);
            if (!written || !ours)
            {
                // A failed write may have left part of the data; a changed chain holds it elsewhere: forget.
                store.Reset(sector, count);
                return;
            }
            if (conflictStart < conflictEnd)
            {
                long from = Math.Max(conflictStart, offset), to = Math.Min(conflictEnd, offset + length);
                if (from < to) crcs.AsSpan((int)((from - offset) >> _sectorShift), (int)((to - from) >> _sectorShift)).Clear();
            }
            store.Set(sector, crcs.AsSpan(0, count));
        }
        finally
        {
            ExitStripes(lo, hi);
        }
    }

    // ---------------------------------------------------------------- reads

    public async ValueTask<FilterVerdict> OnReadAsync(Upcall upcall)
    {
        if (upcall.Phase == FilterPhase.Before) return FilterVerdict.Transform;
        var request = upcall.Request;
        long offset = request.Offset;
        var buffer = upcall.ReadBuffer;
        if (buffer.Length == 0 || ((offset | (long)buffer.Length) & (_sectorSize - 1)) != 0) return FilterVerdict.Pass;

        var first = await VerifyAsync(upcall, offset, buffer);
        if (first.Mismatched == 0) return Counted(upcall, first, FilterVerdict.Pass);

        // A mismatch: a write racing this read (new data and old CRC, or the reverse) or real corruption. Read again
        // once; a write in flight or one that ran meanwhile makes the result unverified rather than an error.
        var (lo, hi) = StripeRange(offset, buffer.Length);
        long before = SequenceOf(lo, hi, offset, buffer.Length, out bool busy);
        if (busy) return Counted(upcall, first with { Unverified = first.Unverified + first.Mismatched, Mismatched = 0 }, FilterVerdict.Pass);
        var again = await upcall.Syscalls.ReadBelowAsync(offset, buffer);
        if (again != IoStatus.Ok) return FilterVerdict.Fail(again);
        var second = await VerifyAsync(upcall, offset, buffer);
        long after = SequenceOf(lo, hi, offset, buffer.Length, out busy);
        if (second.Mismatched == 0) return Counted(upcall, second, FilterVerdict.Pass);
        if (busy || after != before) return Counted(upcall, second with { Unverified = second.Unverified + second.Mismatched, Mismatched = 0 }, FilterVerdict.Pass);

        long bad = second.FirstBad;
        var (owner, _) = upcall.Syscalls.ResolveOwner(bad);
        upcall.Syscalls.Log($"CRC-32C mismatch at LBA {bad >> _sectorShift} (layer {owner}): {second.Mismatched} sector(s) of the read at LBA {offset >> _sectorShift}+{buffer.Length >> _sectorShift}");
        return Counted(upcall, second, FilterVerdict.Fail(IoStatus.ReadError));
    }

    private readonly record struct Tally(long Verified, long Unverified, long Mismatched, long FirstBad = -1, bool StoreMissing = false);

    /// <summary>Verifies <paramref name="data"/>; a layer whose store this filter has not opened yet is opened first (once per layer) and the data checked again.</summary>
    private async ValueTask<Tally> VerifyAsync(Upcall upcall, long offset, Memory<byte> data)
    {
        var tally = Verify(upcall, offset, data.Span);
        if (!tally.StoreMissing) return tally;
        await EnsureStoresAsync(upcall, offset, data.Length);
        return Verify(upcall, offset, data.Span);
    }

    private static FilterVerdict Counted(Upcall upcall, Tally tally, FilterVerdict verdict)
    {
        if (tally.Verified > 0) upcall.Syscalls.Count("verified", tally.Verified);
        if (tally.Unverified > 0) upcall.Syscalls.Count("unverified", tally.Unverified);
        if (tally.Mismatched > 0) upcall.Syscalls.Count("mismatch", tally.Mismatched);
        return verdict;
    }

    /// <summary>Checks each sector of <paramref name="data"/> against its owner's store (<see cref="Tally.FirstBad"/>: the first mismatching offset).</summary>
    private Tally Verify(Upcall upcall, long offset, ReadOnlySpan<byte> data)
    {
        long verified = 0, unverified = 0, mismatched = 0, bad = -1;
        bool missing = false;
        int at = 0;
        while (at < data.Length)
        {
            var (owner, bytes) = upcall.Syscalls.ResolveOwner(offset + at);
            int run = (int)Math.Min(Math.Max(bytes, _sectorSize), data.Length - at);
            var store = owner == Guid.Empty ? null : TryGetStore(owner);
            if (store is null)
            {
                // Zeros nobody holds, or a layer whose store is not open yet (VerifyAsync opens it and checks again).
                missing |= owner != Guid.Empty;
                unverified += run >> _sectorShift;
                at += run;
                continue;
            }
            long sector = (offset + at) >> _sectorShift;
            for (int end = at + run; at < end; at += _sectorSize, sector++)
            {
                uint expected = store.Get(sector);
                if (expected == 0) { unverified++; continue; }
                if (Crc32C.Compute(data.Slice(at, _sectorSize)) == expected) { verified++; continue; }
                mismatched++;
                if (bad < 0) bad = offset + at;
            }
        }
        return new Tally(verified, unverified, mismatched, bad, missing);
    }

    /// <summary>Opens the store of every layer the range resolves to that this filter has not seen yet (once per layer).</summary>
    private async ValueTask EnsureStoresAsync(Upcall upcall, long offset, int length)
    {
        for (long at = offset, end = offset + length; at < end;)
        {
            var (owner, bytes) = upcall.Syscalls.ResolveOwner(at);
            if (owner != Guid.Empty && TryGetStore(owner) is null) await OpenStoreAsync(owner);
            at += Math.Max(bytes, _sectorSize);
        }
    }

    // ---------------------------------------------------------------- range changes

    /// <summary>
    /// UNMAP, WRITE SAME and the like change only the head (the layers below are frozen, their CRCs stay right): the
    /// head's CRCs for the range are forgotten before and after the change, and the change counts as a write in flight
    /// so reads and writes racing it never trust a CRC.
    /// </summary>
    public async ValueTask OnRangeChangingAsync(long offset, long length)
    {
        if (length <= 0 || _chain.Head is not { } head) return;
        Register(RangeChangeId(offset, length), offset, length);
        // Opened if need be: the head's file may hold CRCs from an earlier run.
        var store = TryGetStore(head.DiskId) ?? await OpenStoreAsync(head.DiskId);
        Written(store);
        // The region's bit is durable before the change goes down: after a crash its CRCs are forgotten, never trusted.
        await store.BeginWriteAsync(offset, length);
        _changing[(offset, length, store)] = 0;
        ResetUnderStripes(store, offset, length);
    }

    public void OnRangeChanged(long offset, long length)
    {
        if (length <= 0) return;
        if (_chain.Head is { } head && TryGetStore(head.DiskId) is { } store)
        {
            ResetUnderStripes(store, offset, length);
            // Balances OnRangeChanging's count only if that one marked this store (the same head, open then).
            if (_changing.TryRemove((offset, length, store), out _)) store.EndWrite(offset, length);
        }
        Unregister(RangeChangeId(offset, length), offset, length);
    }

    private void ResetUnderStripes(ChecksumStore store, long offset, long length)
    {
        var (lo, hi) = StripeRange(offset, length);
        EnterStripes(lo, hi);
        try
        {
            store.Reset(offset >> _sectorShift, length >> _sectorShift);
        }
        finally
        {
            ExitStripes(lo, hi);
        }
    }

    /// <summary>Range changes have no request to carry an ID: a negative one derived from the range finds the entry again.</summary>
    private static long RangeChangeId(long offset, long length) => long.MinValue + (offset ^ (length << 40));

    // ---------------------------------------------------------------- stores

    private ChecksumStore? TryGetStore(Guid id)
    {
        foreach (var (key, store) in Volatile.Read(ref _stores)) if (key == id) return store;
        return null;
    }

    /// <summary>Opens a layer's store off the IO worker (file IO), once however many requests ask.</summary>
    private Task<ChecksumStore> OpenStoreAsync(Guid id)
    {
        lock (_lock)
        {
            if (TryGetStore(id) is { } open) return Task.FromResult(open);
            if (!_opening.TryGetValue(id, out var task))
            {
                task = Task.Run(() => Adopt(id));
                _opening[id] = task;
            }
            return task;
        }
    }

    private ChecksumStore Adopt(Guid id)
    {
        var store = ChecksumStore.Acquire(_directory, id, _sectorSize);
        lock (_lock)
        {
            _stores = [.. _stores, (id, store)];
            _opening.Remove(id);
        }
        return store;
    }

    /// <summary>Notes that this filter sets bits in <paramref name="store"/>; after the first time, a read of an array.</summary>
    private void Written(ChecksumStore store)
    {
        if (Array.IndexOf(Volatile.Read(ref _written), store) >= 0) return;
        lock (_lock)
        {
            if (Array.IndexOf(_written, store) < 0) Volatile.Write(ref _written, [.. _written, store]);
        }
    }

    /// <summary>The store of a layer (opening it if needed): tests and tools inspect it.</summary>
    public Task<ChecksumStore> StoreOfAsync(Guid diskId) => OpenStoreAsync(diskId);

    // ---------------------------------------------------------------- checkpoints

    private async Task CheckpointLoopAsync(TimeSpan interval)
    {
        while (!_stop.IsCancellationRequested)
        {
            try
            {
                await Task.Delay(interval, _stop.Token).ConfigureAwait(false);
                await CheckpointAsync().ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                return;
            }
            catch
            {
                // Bits stay set: a later checkpoint retries, and a crash meanwhile only costs those regions' CRCs.
            }
        }
    }

    /// <summary>
    /// Makes the CRCs recorded so far durable and clears the bits of regions whose writes are all durable: notes the
    /// dirty regions' generations, flushes the data, writes and fsyncs the tables, then clears and fsyncs the bitmaps.
    /// </summary>
    public async Task CheckpointAsync()
    {
        var stores = Volatile.Read(ref _written);
        var marks = new ChecksumStore.Marks[stores.Length];
        bool any = false;
        for (int i = 0; i < stores.Length; i++) any |= !(marks[i] = stores[i].Mark()).IsEmpty;
        if (any)
        {
            var status = await _flush().ConfigureAwait(false);
            if (status != IoStatus.Ok) throw new IOException($"the device flush before a checksum checkpoint failed: {status}");
        }
        for (int i = 0; i < stores.Length; i++) await stores[i].CheckpointAsync(marks[i]).ConfigureAwait(false);
    }

    /// <summary>A clean close: a last checkpoint (no bits left set when no IO is in flight), then the stores are released.</summary>
    public async ValueTask DisposeAsync()
    {
        _stop.Cancel();
        await _checkpointer.ConfigureAwait(false);
        await CheckpointAsync().ConfigureAwait(false);
        Abandon();
    }

    /// <summary>Releases the stores without a checkpoint (what a crash leaves; tests simulate one with it).</summary>
    public void Abandon()
    {
        _stop.Cancel();
        (Guid, ChecksumStore)[] stores;
        lock (_lock)
        {
            stores = _stores;
            _stores = [];
        }
        foreach (var (_, store) in stores) store.Release();
    }

    // ---------------------------------------------------------------- writes in flight

    /// <summary>A stripe of the LUN's writes in flight: a small array under a lock, and a counter bumped as they start and end.</summary>
    private sealed class Stripe
    {
        public Entry[] Entries = new Entry[4];
        public int Count;
        public long Sequence;

        public struct Entry
        {
            public long Id, Start, End, ConflictStart, ConflictEnd;
        }

        /// <summary>Adds a write; an overlap with one in flight is a conflict for both (either may reach the device last).</summary>
        public void Add(long id, long start, long end)
        {
            long conflictStart = long.MaxValue, conflictEnd = long.MinValue;
            for (int i = 0; i < Count; i++)
            {
                ref var e = ref Entries[i];
                if (e.Start >= end || start >= e.End) continue;
                long from = Math.Max(e.Start, start), to = Math.Min(e.End, end);
                e.ConflictStart = Math.Min(e.ConflictStart, from);
                e.ConflictEnd = Math.Max(e.ConflictEnd, to);
                conflictStart = Math.Min(conflictStart, from);
                conflictEnd = Math.Max(conflictEnd, to);
            }
            if (Count == Entries.Length) Array.Resize(ref Entries, Count * 2);
            Entries[Count++] = new Entry { Id = id, Start = start, End = end, ConflictStart = conflictStart, ConflictEnd = conflictEnd };
            Sequence++;
        }

        public void Remove(long id)
        {
            for (int i = 0; i < Count; i++)
            {
                if (Entries[i].Id != id) continue;
                Entries[i] = Entries[--Count];
                Sequence++;
                return;
            }
        }

        public void ConflictOf(long id, ref long start, ref long end)
        {
            for (int i = 0; i < Count; i++)
            {
                if (Entries[i].Id != id) continue;
                start = Math.Min(start, Entries[i].ConflictStart);
                end = Math.Max(end, Entries[i].ConflictEnd);
            }
        }

        public bool Overlaps(long start, long end)
        {
            for (int i = 0; i < Count; i++) if (Entries[i].Start < end && start < Entries[i].End) return true;
            return false;
        }
    }

    /// <summary>The stripes a range touches, as a span of region indexes (all stripes when it covers as many regions).</summary>
    private static (long Lo, long Hi) StripeRange(long offset, long length)
    {
        long lo = offset >> StripeShift, hi = (offset + length - 1) >> StripeShift;
        return hi - lo + 1 >= StripeCount ? (0, StripeCount - 1) : (lo, hi);
    }

    // Regions map to stripes by index mod StripeCount; stripes are always entered in ascending index order (and left
    // in descending order) so two ranges never deadlock.
    private void EnterStripes(long lo, long hi)
    {
        // Ascending stripe index order, whatever the region order.
        int first = (int)(lo & (StripeCount - 1)), n = (int)(hi - lo + 1);
        if (n == 1) { Monitor.Enter(_stripes[first]); return; }
        for (int s = 0; s < StripeCount; s++) if (InRange(s, first, n)) Monitor.Enter(_stripes[s]);
    }

    private void ExitStripes(long lo, long hi)
    {
        int first = (int)(lo & (StripeCount - 1)), n = (int)(hi - lo + 1);
        if (n == 1) { Monitor.Exit(_stripes[first]); return; }
        for (int s = StripeCount - 1; s >= 0; s--) if (InRange(s, first, n)) Monitor.Exit(_stripes[s]);
    }

    private static bool InRange(int stripe, int first, int n) => n >= StripeCount || ((stripe - first) & (StripeCount - 1)) < n;

    private void Register(long id, long offset, long length)
    {
        var (lo, hi) = StripeRange(offset, length);
        EnterStripes(lo, hi);
        try
        {
            foreach (int s in Touched(lo, hi)) _stripes[s].Add(id, offset, offset + length);
        }
        finally
        {
            ExitStripes(lo, hi);
        }
    }

    private void Unregister(long id, long offset, long length)
    {
        var (lo, hi) = StripeRange(offset, length);
        EnterStripes(lo, hi);
        try
        {
            foreach (int s in Touched(lo, hi)) _stripes[s].Remove(id);
        }
        finally
        {
            ExitStripes(lo, hi);
        }
    }

    /// <summary>The sum of the touched stripes' counters (changes whenever a write starts or ends there) and whether a write overlapping the range is in flight.</summary>
    private long SequenceOf(long lo, long hi, long offset, long length, out bool busy)
    {
        EnterStripes(lo, hi);
        try
        {
            long sum = 0;
            busy = false;
            foreach (int s in Touched(lo, hi))
            {
                sum += _stripes[s].Sequence;
                busy |= _stripes[s].Overlaps(offset, offset + length);
            }
            return sum;
        }
        finally
        {
            ExitStripes(lo, hi);
        }
    }

    private static StripeSet Touched(long lo, long hi) => new((int)(lo & (StripeCount - 1)), (int)Math.Min(hi - lo + 1, StripeCount));

    /// <summary>Distinct stripe indexes of a range, without allocating.</summary>
    private readonly struct StripeSet(int first, int count)
    {
        public Enumerator GetEnumerator() => new(first, count);

        public struct Enumerator(int first, int count)
        {
            private int _i = -1;
            public readonly int Current => (first + _i) & (StripeCount - 1);
            public bool MoveNext() => ++_i < count;
        }
    }
}
