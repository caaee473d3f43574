using System.Buffers;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Concurrency;

namespace ISCSISnap.Storage.Chains;

/// <summary>A run of a read and the layer (disk ID) its data came from; <see cref="Guid.Empty"/> when no layer holds it (zeros).</summary>
public readonly record struct OwnedRun(long Offset, long Length, Guid DiskId);

/// <summary>
/// The block device of a snapshot chain: read-only layers under one writable head. Reads resolve each sector to
/// the layer that owns it through the <see cref="ChainMap"/> (the same cost at any depth); writes and zeroing go
/// to the head and make it the owner. Structural changes (a snapshot freezing the head, a merge retiring a layer,
/// a revert) run in a quiesced section (<see cref="QuiesceAsync"/>) that waits for in-flight IO and holds new IO.
/// Threading: every IO member is safe to call concurrently.
/// </summary>
public sealed class ChainDevice : IBlockDevice
{
    // Large zeroing runs in pieces so a whole-disk WRITE SAME does not hold up structural changes for long.
    private const long ZeroPieceBytes = 256L << 20;

    private readonly SharedExclusiveGate _gate = new();
    private readonly int _sectorShift;
    private readonly LazyAtomicJournal? _journal;
    private IChainLayer?[] _layers;
    private IWritableLayer? _head;
    private ushort _headIndex;
    private ChainMap _map;
    private long _length;
    private MergeFence? _fence;
    private int _disposed;

    /// <summary>
    /// A chain over <paramref name="layers"/>, indexed as the map's owners (index 0 is unused: "no layer").
    /// The topmost layer is the head when it is writable and <paramref name="readOnly"/> is false.
    /// </summary>
    private ChainDevice(IChainLayer?[] layers, ChainMap map, bool readOnly, string? atomicJournalPath)
    {
        _layers = layers;
        _map = map;
        LogicalBlockSize = map.SectorSize;
        _sectorShift = System.Numerics.BitOperations.Log2((uint)LogicalBlockSize);
        if (atomicJournalPath is not null) _journal = new LazyAtomicJournal(() => AtomicWriteJournal.Open(atomicJournalPath, ApplyDurablyAsync));
        var top = layers[^1];
        if (!readOnly && top is IWritableLayer { IsWritable: true } head)
        {
            _head = head;
            _headIndex = (ushort)(layers.Length - 1);
        }
        _length = top?.VirtualSize ?? 0;
        PhysicalBlockSize = Math.Max(LogicalBlockSize, 4096);
    }

    /// <summary>
    /// Opens a chain over <paramref name="layersBottomToTop"/> (all with the same sector size; the chain's size is
    /// the top layer's). <paramref name="map"/> is a map the caller loaded for the first <paramref name="mappedLayers"/>
    /// layers (validated against their DataWriteGuids by the caller); the layers above it are overlaid from their
    /// own metadata. Without a map every layer is enumerated. The chain owns the layers from here on.
    /// </summary>
    public static ChainDevice Open(IReadOnlyList<IChainLayer> layersBottomToTop, bool readOnly = false,
        ChainMap? map = null, int mappedLayers = 0, string? atomicJournalPath = null)
    {
        if (layersBottomToTop.Count == 0) throw new ArgumentException("a chain needs at least one layer", nameof(layersBottomToTop));
        if (layersBottomToTop.Count >= ushort.MaxValue) throw new ArgumentException("too many layers", nameof(layersBottomToTop));
        var top = layersBottomToTop[^1];
        int sectorSize = top.LogicalSectorSize;
        foreach (var layer in layersBottomToTop)
        {
            if (layer.LogicalSectorSize != sectorSize)
                throw new StorageException(layer.Path, $"its {layer.LogicalSectorSize}-byte sectors differ from the chain's {sectorSize}-byte sectors");
            if (layer != top && layer.IsWritable)
                throw new StorageException(layer.Path, "a layer below the head is open for writing");
        }
        var layers = new IChainLayer?[layersBottomToTop.Count + 1];
        for (int i = 0; i < layersBottomToTop.Count; i++) layers[i + 1] = layersBottomToTop[i];

        if (map is null || map.SectorSize != sectorSize || map.VirtualSize > top.VirtualSize)
        {
            map = new ChainMap(top.VirtualSize, sectorSize);
            mappedLayers = 0;
        }
        else if (map.VirtualSize < top.VirtualSize)
        {
            map.Grow(top.VirtualSize);
        }
        for (int i = mappedLayers + 1; i < layers.Length; i++) Overlay(map, layers[i]!, (ushort)i);

        var device = new ChainDevice(layers, map, readOnly, atomicJournalPath);
        if (device._head is not null && atomicJournalPath is not null && File.Exists(atomicJournalPath))
        {
            try
            {
                device._journal!.OpenNow();   // a crash may have left an atomic write to finish
            }
            catch
            {
                foreach (var layer in layersBottomToTop) layer.Dispose();
                throw;
            }
        }
        return device;
    }

    /// <summary>Gives <paramref name="owner"/> every sector <paramref name="layer"/> holds (data or zeros).</summary>
    public static void Overlay(ChainMap map, IChainLayer layer, ushort owner)
    {
        long sectors = Math.Min(layer.VirtualSize, map.VirtualSize) / map.SectorSize;
        layer.Enumerate(0, sectors, (sector, count, state) =>
        {
            if (state != SectorState.Absent) map.SetOwner(sector, count, owner);
        });
    }

    public int LogicalBlockSize { get; }
    public int PhysicalBlockSize { get; }
    public long Length => Volatile.Read(ref _length);
    public bool IsReadOnly => Volatile.Read(ref _head) is null;
    public bool SupportsDeallocation => true;
    public int DeallocationGranularity => 4096;
    public long AllocatedBytes => Volatile.Read(ref _head)?.AllocatedBytes ?? -1;

    /// <summary>The layers, bottom to top (the last is the head when the chain is writable).</summary>
    public IReadOnlyList<IChainLayer> Layers
    {
        get
        {
            var list = new List<IChainLayer>();
            foreach (var layer in Volatile.Read(ref _layers)) if (layer is not null) list.Add(layer);
            return list;
        }
    }

    /// <summary>The writable head, or null for a read-only chain.</summary>
    public IWritableLayer? Head => Volatile.Read(ref _head);

    /// <summary>The map of owners (index into the layer table: see <see cref="IndexOf"/>).</summary>
    public ChainMap Map => Volatile.Read(ref _map);

    /// <summary>The disk ID of the layer holding <paramref name="offset"/> (empty: nobody, zeros) and how many bytes from there it holds (within the 1 MiB chunk).</summary>
    public (Guid DiskId, long Bytes) OwnerOf(long offset)
    {
        var layers = Volatile.Read(ref _layers);
        ushort owner = _map.Lookup(offset >> _sectorShift, out int run);
        return (owner == 0 ? Guid.Empty : layers[owner]!.DiskId, (long)run << _sectorShift);
    }

    public int IndexOf(Guid diskId)
    {
        var layers = Volatile.Read(ref _layers);
        for (int i = 1; i < layers.Length; i++) if (layers[i]?.DiskId == diskId) return i;
        return -1;
    }

    // ---------------------------------------------------------------- reads

    public ValueTask<IoStatus> ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default) =>
        ReadAsync(offset, destination, null, cancellationToken);

    /// <summary>
    /// Reads like <see cref="ReadAsync(long, Memory{byte}, CancellationToken)"/> and, when <paramref name="origins"/> is
    /// given, appends the runs of the read with the disk ID of the layer each came from (the key a cache uses).
    /// </summary>
    public ValueTask<IoStatus> ReadAsync(long offset, Memory<byte> destination, List<OwnedRun>? origins, CancellationToken cancellationToken = default)
    {
        var status = CheckRange(offset, destination.Length);
        if (status != IoStatus.Ok) return new(status);
        if (destination.IsEmpty) return new(IoStatus.Ok);
        if (!_gate.TryEnterShared()) return ReadAfterGateAsync(offset, destination, origins, cancellationToken);
        return ReadEntered(offset, destination, origins);
    }

    private async ValueTask<IoStatus> ReadAfterGateAsync(long offset, Memory<byte> destination, List<OwnedRun>? origins, CancellationToken cancellationToken)
    {
        await _gate.EnterSharedAsync(cancellationToken).ConfigureAwait(false);
        if (CheckRange(offset, destination.Length) != IoStatus.Ok) { _gate.ExitShared(); return IoStatus.OutOfRange; }
        return await ReadEntered(offset, destination, origins).ConfigureAwait(false);
    }

    /// <summary>Reads with the gate held shared and exits it when done.</summary>
    private ValueTask<IoStatus> ReadEntered(long offset, Memory<byte> destination, List<OwnedRun>? origins)
    {
        if (Volatile.Read(ref _disposed) != 0)
        {
            // Closed between the range check and the gate: the layers are gone.
            _gate.ExitShared();
            return new(IoStatus.NotReady);
        }
        var layers = _layers;
        var map = _map;
        while (!destination.IsEmpty)
        {
            int n = Resolve(map, offset, destination.Length, out ushort owner);
            var part = destination.Slice(0, n);
            origins?.Add(new OwnedRun(offset, n, owner == 0 ? Guid.Empty : layers[owner]!.DiskId));
            if (owner == 0)
            {
                part.Span.Clear();
            }
            else
            {
                var pending = layers[owner]!.ReadAsync(offset, part);
                if (!pending.IsCompletedSuccessfully) return ReadRestAsync(pending, offset + n, destination.Slice(n), origins);
                if (pending.Result != IoStatus.Ok)
                {
                    _gate.ExitShared();
                    return pending;
                }
            }
            offset += n;
            destination = destination.Slice(n);
        }
        _gate.ExitShared();
        return new(IoStatus.Ok);
    }

    private async ValueTask<IoStatus> ReadRestAsync(ValueTask<IoStatus> pending, long offset, Memory<byte> rest, List<OwnedRun>? origins)
    {
        try
        {
            var status = await pending.ConfigureAwait(false);
            if (status != IoStatus.Ok) return status;
            var layers = _layers;
            var map = _map;
            while (!rest.IsEmpty)
            {
                int n = Resolve(map, offset, rest.Length, out ushort owner);
                var part = rest.Slice(0, n);
                origins?.Add(new OwnedRun(offset, n, owner == 0 ? Guid.Empty : layers[owner]!.DiskId));
                if (owner == 0) part.Span.Clear();
                else if ((status = await layers[owner]!.ReadAsync(offset, part).ConfigureAwait(false)) != IoStatus.Ok) return status;
                offset += n;
                rest = rest.Slice(n);
            }
            return IoStatus.Ok;
        }
        finally
        {
            _gate.ExitShared();
        }
    }

    /// <summary>The owner at <paramref name="offset"/> and how many bytes (at most <paramref name="limit"/>) it owns from there.</summary>
    private int Resolve(ChainMap map, long offset, int limit, out ushort owner)
    {
        long sector = offset >> _sectorShift;
        owner = map.Lookup(sector, out int runSectors);
        long bytes = (long)runSectors << _sectorShift;
        // Runs of one owner continue across 1 MiB chunks: keep going so a large read is one layer read.
        while (bytes < limit)
        {
            if (map.Lookup(sector + (bytes >> _sectorShift), out int more) != owner) break;
            bytes += (long)more << _sectorShift;
        }
        return (int)Math.Min(bytes, limit);
    }

    // ---------------------------------------------------------------- writes

    public ValueTask<IoStatus> WriteAsync(long offset, ReadOnlySequence<byte> data, WriteFlags flags, CancellationToken cancellationToken = default)
    {
        var status = CheckWrite(offset, data.Length);
        if (status != IoStatus.Ok) return new(status);
        if (data.IsEmpty) return new(IoStatus.Ok);
        if (_gate.TryEnterShared())
        {
            var fence = Volatile.Read(ref _fence);
            if (fence is null || !fence.Overlaps(offset, data.Length)) return WriteEntered(offset, data, flags);
            _gate.ExitShared();
        }
        return WriteSlowAsync(offset, data, flags, cancellationToken);
    }

    private async ValueTask<IoStatus> WriteSlowAsync(long offset, ReadOnlySequence<byte> data, WriteFlags flags, CancellationToken cancellationToken)
    {
        await EnterForWriteAsync(offset, data.Length, cancellationToken).ConfigureAwait(false);
        var status = CheckWrite(offset, data.Length);
        if (status != IoStatus.Ok)
        {
            _gate.ExitShared();
            return status;
        }
        return await WriteEntered(offset, data, flags).ConfigureAwait(false);
    }

    /// <summary>Enters the gate shared and, while a merge copies a window of the head, waits for writes that overlap it.</summary>
    private async ValueTask EnterForWriteAsync(long offset, long length, CancellationToken cancellationToken)
    {
        while (true)
        {
            await _gate.EnterSharedAsync(cancellationToken).ConfigureAwait(false);
            var fence = Volatile.Read(ref _fence);
            if (fence is null || !fence.Overlaps(offset, length)) return;
            _gate.ExitShared();
            await fence.Done.Task.WaitAsync(cancellationToken).ConfigureAwait(false);
        }
    }

    private ValueTask<IoStatus> WriteEntered(long offset, ReadOnlySequence<byte> data, WriteFlags flags)
    {
        var head = _head;
        if (head is null || Volatile.Read(ref _disposed) != 0)
        {
            _gate.ExitShared();
            return new(head is null ? IoStatus.WriteProtected : IoStatus.NotReady);
        }
        var pending = head.WriteAsync(offset, data, (flags & WriteFlags.ForceUnitAccess) != 0);
        if (!pending.IsCompletedSuccessfully) return FinishWriteAsync(pending, offset, data.Length);
        if (pending.Result == IoStatus.Ok) Owned(offset, data.Length);
        _gate.ExitShared();
        return pending;
    }

    private async ValueTask<IoStatus> FinishWriteAsync(ValueTask<IoStatus> pending, long offset, long length)
    {
        try
        {
            var status = await pending.ConfigureAwait(false);
            if (status == IoStatus.Ok) Owned(offset, length);
            return status;
        }
        finally
        {
            _gate.ExitShared();
        }
    }

    /// <summary>The head now holds [offset, offset+length): record it in the map (nothing to do when it already owns it).</summary>
    private void Owned(long offset, long length)
    {
        long sector = offset >> _sectorShift;
        long count = length >> _sectorShift;
        if (_map.Lookup(sector, out int run) == _headIndex && run >= count) return;
        if (_headIndex == 1 && _head is { } head)
        {
            // Nothing below the head: the blocks it allocated are its own from end to end (unwritten sectors read
            // as its zeros), exactly as a map rebuilt from the file says. Once per new block, not per write.
            long unit = Math.Max(head.BlockSize, 1) >> _sectorShift;
            long first = sector / unit * unit;
            long end = Math.Min((sector + count + unit - 1) / unit * unit, _map.SectorCount);
            head.Enumerate(first, end - first, (s, c, state) =>
            {
                if (state != SectorState.Absent) _map.SetOwner(s, c, 1);
            });
            return;
        }
        _map.SetOwner(sector, count, _headIndex);
    }

    public ValueTask<IoStatus> FlushAsync(CancellationToken cancellationToken = default)
    {
        var head = Volatile.Read(ref _head);
        return head is null ? new(IoStatus.Ok) : head.FlushAsync();
    }

    public async ValueTask<IoStatus> WriteZeroesAsync(long offset, long length, bool deallocate, WriteFlags flags, CancellationToken cancellationToken = default)
    {
        var status = CheckWrite(offset, length);
        if (status != IoStatus.Ok || length == 0) return status;
        bool fua = (flags & WriteFlags.ForceUnitAccess) != 0;
        for (long done = 0; done < length;)
        {
            long piece = Math.Min(ZeroPieceBytes, length - done);
            await EnterForWriteAsync(offset + done, piece, cancellationToken).ConfigureAwait(false);
            try
            {
                var head = _head;
                if (head is null) return IoStatus.WriteProtected;
                if (Volatile.Read(ref _disposed) != 0) return IoStatus.NotReady;
                // Zeroing may touch many blocks' metadata: keep it off the caller's I/O thread.
                status = piece > (1 << 20)
                    ? await Task.Run(() => head.ZeroAsync(offset + done, piece, deallocate, fua).AsTask(), cancellationToken).ConfigureAwait(false)
                    : await head.ZeroAsync(offset + done, piece, deallocate, fua).ConfigureAwait(false);
                if (status != IoStatus.Ok) return status;
                if (_headIndex == 1)
                {
                    // A head with nothing below may zero by holding nothing (an unallocated block): nobody owns that.
                    long first = (offset + done) >> _sectorShift;
                    head.Enumerate(first, piece >> _sectorShift, (sector, count, state) =>
                        _map.SetOwner(sector, count, state == SectorState.Absent ? (ushort)0 : _headIndex));
                }
                else
                {
                    Owned(offset + done, piece);
                }
            }
            finally
            {
                _gate.ExitShared();
            }
            done += piece;
        }
        return IoStatus.Ok;
    }

    public async ValueTask<(IoStatus Status, AllocationExtent Extent)> GetAllocationAsync(long offset, CancellationToken cancellationToken = default)
    {
        long length = Length;
        if (offset < 0 || offset >= length || (offset & (LogicalBlockSize - 1)) != 0) return (IoStatus.OutOfRange, default);
        await _gate.EnterSharedAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            if (Volatile.Read(ref _disposed) != 0) return (IoStatus.NotReady, default);
            // Limit the scan: a descriptor need not cover the rest of a 64 TiB disk.
            int limit = (int)Math.Min(length - offset, 1 << 30);
            int n = Resolve(_map, offset, limit, out ushort owner);
            if (owner == 0) return (IoStatus.Ok, new AllocationExtent(offset, n, Mapped: false));
            // The owner holds data or zeros there: zeros read back as deallocated (LBPRZ), data as mapped.
            bool? mapped = null;
            long runSectors = 0;
            _layers[owner]!.Enumerate(offset >> _sectorShift, n >> _sectorShift, (sector, count, state) =>
            {
                bool isMapped = state == SectorState.Data;
                if (mapped is null) mapped = isMapped;
                if (mapped == isMapped && sector == (offset >> _sectorShift) + runSectors) runSectors += count;
            });
            long extent = Math.Max(runSectors << _sectorShift, LogicalBlockSize);
            return (IoStatus.Ok, new AllocationExtent(offset, Math.Min(extent, n), mapped ?? true));
        }
        finally
        {
            _gate.ExitShared();
        }
    }

    public int MaxAtomicWriteBytes => IsReadOnly || _journal is null ? 0 : AtomicWriteJournal.MaxDataBytes;

    public ValueTask<IoStatus> WriteAtomicAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken = default)
    {
        var status = CheckWrite(offset, data.Length);
        if (status != IoStatus.Ok) return new(status);
        if (data.Length > MaxAtomicWriteBytes || _journal is null) return new(IoStatus.OutOfRange);
        if (data.IsEmpty) return new(IoStatus.Ok);
        return _journal.WriteAsync(offset, data, cancellationToken);
    }

    private ValueTask<IoStatus> ApplyDurablyAsync(long offset, ReadOnlyMemory<byte> data) =>
        WriteAsync(offset, new ReadOnlySequence<byte>(data), WriteFlags.ForceUnitAccess);

    public async ValueTask<IoStatus> GrowAsync(long newLength, CancellationToken cancellationToken = default)
    {
        if (IsReadOnly) return IoStatus.WriteProtected;
        if (newLength < Length || (newLength & (LogicalBlockSize - 1)) != 0) return IoStatus.OutOfRange;
        if (newLength == Length) return IoStatus.Ok;
        await _gate.EnterExclusiveAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            var head = _head;
            if (head is null) return IoStatus.WriteProtected;
            if (Volatile.Read(ref _disposed) != 0) return IoStatus.NotReady;
            var status = await head.GrowAsync(newLength).ConfigureAwait(false);
            if (status != IoStatus.Ok) return status;
            _map.Grow(newLength);
            Volatile.Write(ref _length, newLength);
            return IoStatus.Ok;
        }
        finally
        {
            _gate.ExitExclusive();
        }
    }

    private IoStatus CheckRange(long offset, long count)
    {
        if (((offset | count) & (LogicalBlockSize - 1)) != 0) return IoStatus.Misaligned;
        if (offset < 0 || count < 0 || offset > Length - count) return IoStatus.OutOfRange;
        return Volatile.Read(ref _disposed) != 0 ? IoStatus.NotReady : IoStatus.Ok;
    }

    private IoStatus CheckWrite(long offset, long count) => IsReadOnly ? IoStatus.WriteProtected : CheckRange(offset, count);

    // ---------------------------------------------------------------- structural changes

    /// <summary>
    /// Runs <paramref name="change"/> with no IO in flight and new IO held until it returns: a snapshot freezes the
    /// head and pushes a new one, a merge retires a layer, a revert replaces the chain.
    /// </summary>
    public async ValueTask<T> QuiesceAsync<T>(Func<Quiesced, ValueTask<T>> change, CancellationToken cancellationToken = default)
    {
        await _gate.EnterExclusiveAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
            return await change(new Quiesced(this)).ConfigureAwait(false);
        }
        finally
        {
            _gate.ExitExclusive();
        }
    }

    /// <summary>What a quiesced section may change; valid only inside <see cref="QuiesceAsync{T}"/>.</summary>
    public readonly struct Quiesced
    {
        private readonly ChainDevice _device;

        internal Quiesced(ChainDevice device) => _device = device;

        public IReadOnlyList<IChainLayer> Layers => _device.Layers;
        public IWritableLayer? Head => _device._head;
        public ChainMap Map => _device._map;

        /// <summary>Makes <paramref name="newHead"/> (whose parent is the current top layer, now read-only) the head.</summary>
        public void PushHead(IWritableLayer newHead)
        {
            var device = _device;
            var top = device._layers[^1]!;
            if (top.IsWritable) throw new InvalidOperationException("the old head must be sealed before a new head goes on top");
            if (newHead.LogicalSectorSize != device.LogicalBlockSize || newHead.VirtualSize < device.Length)
                throw new StorageException(newHead.Path, "the new head does not match the chain's geometry");
            if (device._layers.Length >= ushort.MaxValue) throw new StorageException(newHead.Path, "the chain is too deep");
            var layers = new IChainLayer?[device._layers.Length + 1];
            Array.Copy(device._layers, layers, device._layers.Length);
            layers[^1] = newHead;
            ushort index = (ushort)(layers.Length - 1);
            Volatile.Write(ref device._layers, layers);
            device._headIndex = index;
            Volatile.Write(ref device._head, newHead);
        }

        /// <summary>Replaces layer <paramref name="index"/>'s object (a layer reopened for a merge, say) with one over the same data.</summary>
        public void ReplaceLayer(int index, IChainLayer layer)
        {
            var device = _device;
            var layers = (IChainLayer?[])device._layers.Clone();
            layers[index] = layer;
            Volatile.Write(ref device._layers, layers);
            if (index == device._headIndex) Volatile.Write(ref device._head, layer as IWritableLayer);
        }

        /// <summary>
        /// Drops layer <paramref name="index"/> from the chain once no sector is owned by it any more (a merge moved them
        /// to its child). The caller disposes the layer.
        /// </summary>
        public void RemoveLayer(int index)
        {
            var device = _device;
            if (index <= 0 || index == device._headIndex) throw new InvalidOperationException($"layer {index} cannot be removed");
            // The layers above move down one place; owners in the map are positions, so they follow.
            device._map.RemoveOwner((ushort)index);
            var layers = new IChainLayer?[device._layers.Length - 1];
            Array.Copy(device._layers, layers, index);
            Array.Copy(device._layers, index + 1, layers, index, device._layers.Length - index - 1);
            Volatile.Write(ref device._layers, layers);
            if (device._head is not null) device._headIndex = (ushort)(layers.Length - 1);
        }

        /// <summary>Replaces the whole chain (a revert, say): new layers, a map built for them, a new length.</summary>
        public void ReplaceChain(IReadOnlyList<IChainLayer> layersBottomToTop, ChainMap map)
        {
            var device = _device;
            var layers = new IChainLayer?[layersBottomToTop.Count + 1];
            for (int i = 0; i < layersBottomToTop.Count; i++) layers[i + 1] = layersBottomToTop[i];
            var top = layers[^1]!;
            Volatile.Write(ref device._map, map);
            Volatile.Write(ref device._layers, layers);
            device._headIndex = (ushort)(layers.Length - 1);
            Volatile.Write(ref device._head, top as IWritableLayer is { IsWritable: true } head ? head : null);
            Volatile.Write(ref device._length, top.VirtualSize);
        }
    }

    // ---------------------------------------------------------------- merges

    /// <summary>
    /// Holds writes that overlap [Offset, Offset+Length) while a merge copies that window into the head, so a
    /// copy never lands over newer data.
    /// </summary>
    private sealed class MergeFence(long offset, long length)
    {
        public readonly TaskCompletionSource Done = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public bool Overlaps(long start, long count) => start < offset + length && offset < start + count;
    }

    /// <summary>
    /// Runs <paramref name="copy"/> with writes to [offset, offset+length) held off (writes in flight there finish
    /// first); reads and writes elsewhere continue. For merges that copy into the live head.
    /// </summary>
    public async ValueTask<T> FenceAsync<T>(long offset, long length, Func<ValueTask<T>> copy, CancellationToken cancellationToken = default)
    {
        var fence = new MergeFence(offset, length);
        // Raise the fence with no write in flight: the exclusive section drains those that entered before it.
        await _gate.EnterExclusiveAsync(cancellationToken).ConfigureAwait(false);
        Volatile.Write(ref _fence, fence);
        _gate.ExitExclusive();
        try
        {
            return await copy().ConfigureAwait(false);
        }
        finally
        {
            Volatile.Write(ref _fence, null);
            fence.Done.TrySetResult();
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
        await _gate.EnterExclusiveAsync().ConfigureAwait(false);
        try
        {
            _journal?.Dispose();
            var head = _head;
            if (head is not null)
            {
                await head.FlushAsync().ConfigureAwait(false);
                head.Seal();
            }
            foreach (var layer in _layers) layer?.Dispose();
        }
        finally
        {
            _gate.ExitExclusive();
        }
    }
}
