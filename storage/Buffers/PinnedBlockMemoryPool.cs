using System.Buffers;
using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace ISCSISnap.Storage.Buffers;

/// <summary>
/// A <see cref="MemoryPool{T}"/> of fixed-size blocks on the pinned object heap, for pipes whose segments
/// are handed to native vectored I/O: <see cref="Memory{T}.Pin"/> on these blocks costs nothing.
/// Threading: thread-safe.
/// </summary>
public sealed class PinnedBlockMemoryPool : MemoryPool<byte>
{
    private readonly ConcurrentQueue<Block> _free = new();
    private readonly int _blockSize;
    private readonly int _maxRetained;
    private int _retained;

    public PinnedBlockMemoryPool(int blockSize = 64 * 1024, int maxRetainedBlocks = 4096)
    {
        _blockSize = blockSize;
        _maxRetained = maxRetainedBlocks;
    }

    public static PinnedBlockMemoryPool Default { get; } = new();

    public override int MaxBufferSize => _blockSize;

    public override IMemoryOwner<byte> Rent(int minBufferSize = -1)
    {
        if (minBufferSize > _blockSize)
            throw new ArgumentOutOfRangeException(nameof(minBufferSize), minBufferSize, $"blocks are {_blockSize} bytes");
        if (_free.TryDequeue(out var block))
        {
            Interlocked.Decrement(ref _retained);
            block.Lease();
            return block;
        }
        var fresh = new Block(this, GC.AllocateUninitializedArray<byte>(_blockSize, pinned: true));
        fresh.Lease();
        return fresh;
    }

    private void Release(Block block)
    {
        if (Interlocked.Increment(ref _retained) > _maxRetained)
        {
            Interlocked.Decrement(ref _retained);
            return;
        }
        _free.Enqueue(block);
    }

    protected override void Dispose(bool disposing) { }

    private sealed class Block : MemoryManager<byte>
    {
        private readonly PinnedBlockMemoryPool _pool;
        private readonly byte[] _array;
        private int _leased;

        public Block(PinnedBlockMemoryPool pool, byte[] array)
        {
            _pool = pool;
            _array = array;
        }

        public void Lease() => _leased = 1;

        public override Span<byte> GetSpan() => _array;

        public override Memory<byte> Memory => CreateMemory(_array.Length);

        public override unsafe MemoryHandle Pin(int elementIndex = 0)
        {
            // The array lives on the pinned object heap: its address never changes.
            return new MemoryHandle(Unsafe.AsPointer(ref Unsafe.Add(ref MemoryMarshal.GetArrayDataReference(_array), elementIndex)));
        }

        public override void Unpin() { }

        protected override bool TryGetArray(out ArraySegment<byte> segment)
        {
            segment = new ArraySegment<byte>(_array);
            return true;
        }

        protected override void Dispose(bool disposing)
        {
            if (Interlocked.Exchange(ref _leased, 0) == 1) _pool.Release(this);
        }
    }
}
