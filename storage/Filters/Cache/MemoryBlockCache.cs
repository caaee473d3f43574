namespace ISCSISnap.Storage.Filters.Cache;

/// <summary>
/// An in-process <see cref="IBlockCache"/> of bounded size: blocks in pooled arrays, evicted least recently used.
/// It serves a single appliance process; the cache daemon (flash files shared across processes) implements the
/// same interface. Threading: thread-safe (one lock: each operation is a dictionary lookup and a copy).
/// </summary>
public sealed class MemoryBlockCache : IBlockCache
{
    private readonly Dictionary<(Guid, long), LinkedListNode<Entry>> _map = new();
    private readonly LinkedList<Entry> _lru = new();   // most recently used first
    private readonly object _lock = new();
    private readonly int _capacityBlocks;
    private long _hits, _misses, _evictions;

    private sealed class Entry(Guid disk, long block, byte[] data)
    {
        public readonly Guid Disk = disk;
        public readonly long Block = block;
        public readonly byte[] Data = data;
    }

    public MemoryBlockCache(long capacityBytes, int blockSize = 4096)
    {
        if (blockSize < 512 || (blockSize & (blockSize - 1)) != 0 || blockSize > 1 << 20) throw new ArgumentOutOfRangeException(nameof(blockSize), "a power of two, 512 B to 1 MiB");
        ArgumentOutOfRangeException.ThrowIfLessThan(capacityBytes, blockSize);
        BlockSize = blockSize;
        _capacityBlocks = (int)Math.Min(int.MaxValue, capacityBytes / blockSize);
    }

    public int BlockSize { get; }
    public long CapacityBytes => (long)_capacityBlocks * BlockSize;
    public long Hits => Interlocked.Read(ref _hits);
    public long Misses => Interlocked.Read(ref _misses);
    public long Evictions => Interlocked.Read(ref _evictions);
    public int CachedBlocks
    {
        get { lock (_lock) return _map.Count; }
    }

    public ValueTask<bool> GetAsync(Guid diskId, long offset, Memory<byte> destination)
    {
        CheckRange(offset, destination.Length);
        long first = offset / BlockSize;
        int count = destination.Length / BlockSize;
        lock (_lock)
        {
            for (int i = 0; i < count; i++)
            {
                if (!_map.TryGetValue((diskId, first + i), out var node))
                {
                    Interlocked.Increment(ref _misses);
                    return new(false);
                }
                node.Value.Data.CopyTo(destination.Span.Slice(i * BlockSize, BlockSize));
                _lru.Remove(node);
                _lru.AddFirst(node);
            }
        }
        Interlocked.Increment(ref _hits);
        return new(true);
    }

    public ValueTask PutAsync(Guid diskId, long offset, ReadOnlyMemory<byte> data)
    {
        CheckRange(offset, data.Length);
        long first = offset / BlockSize;
        int count = data.Length / BlockSize;
        lock (_lock)
        {
            for (int i = 0; i < count; i++)
            {
                var source = data.Span.Slice(i * BlockSize, BlockSize);
                if (_map.TryGetValue((diskId, first + i), out var node))
                {
                    source.CopyTo(node.Value.Data);
                    _lru.Remove(node);
                    _lru.AddFirst(node);
                    continue;
                }
                byte[] block;
                if (_map.Count >= _capacityBlocks)
                {
                    // Reuse the least recently used block's array: a full cache allocates nothing.
                    var last = _lru.Last!;
                    _lru.RemoveLast();
                    _map.Remove((last.Value.Disk, last.Value.Block));
                    block = last.Value.Data;
                    Interlocked.Increment(ref _evictions);
                }
                else block = new byte[BlockSize];
                source.CopyTo(block);
                _map[(diskId, first + i)] = _lru.AddFirst(new Entry(diskId, first + i, block));
            }
        }
        return ValueTask.CompletedTask;
    }

    public ValueTask InvalidateAsync(Guid diskId, long offset, long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        long first = offset / BlockSize, end = (offset + length + BlockSize - 1) / BlockSize;
        lock (_lock)
        {
            if (end - first > _map.Count)
            {
                // A large range: walk the cache rather than the range.
                foreach (var key in _map.Keys.Where(k => k.Item1 == diskId && k.Item2 >= first && k.Item2 < end).ToList()) Drop(key);
            }
            else
            {
                for (long block = first; block < end; block++) Drop((diskId, block));
            }
        }
        return ValueTask.CompletedTask;
    }

    private void Drop((Guid, long) key)
    {
        if (_map.Remove(key, out var node)) _lru.Remove(node);
    }

    private void CheckRange(long offset, int length)
    {
        if (offset < 0 || length <= 0 || offset % BlockSize != 0 || length % BlockSize != 0)
            throw new ArgumentException($"range {offset}+{length} is not whole {BlockSize}-byte blocks");
    }
}
