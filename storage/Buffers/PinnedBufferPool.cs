using System.Collections.Concurrent;
using System.Numerics;

namespace ISCSISnap.Storage.Buffers;

/// <summary>
/// Power-of-two size classes of byte arrays allocated on the pinned object heap, so native calls
/// (preadv2, sendmsg) can take their address without pinning handles. Threading: all members are thread-safe.
/// </summary>
public sealed class PinnedBufferPool
{
    public const int MinimumSize = 4096;
    private readonly ConcurrentQueue<byte[]>[] _classes;
    private readonly int[] _counts;
    private readonly int _maximumSize;

    public static PinnedBufferPool Shared { get; } = new(maximumSize: 32 << 20, retainedBytesPerClass: 64 << 20);

    public PinnedBufferPool(int maximumSize, long retainedBytesPerClass)
    {
        if (!BitOperations.IsPow2(maximumSize) || maximumSize < MinimumSize)
            throw new ArgumentOutOfRangeException(nameof(maximumSize));
        _maximumSize = maximumSize;
        int classes = BitOperations.Log2((uint)maximumSize) - BitOperations.Log2(MinimumSize) + 1;
        _classes = new ConcurrentQueue<byte[]>[classes];
        _counts = new int[classes];
        for (int i = 0; i < classes; i++) _classes[i] = new ConcurrentQueue<byte[]>();
        _retainedBytesPerClass = retainedBytesPerClass;
    }

    private readonly long _retainedBytesPerClass;

    public int MaximumSize => _maximumSize;

    /// <summary>Rents an array of at least <paramref name="minimumLength"/> bytes (contents undefined).</summary>
    public byte[] Rent(int minimumLength)
    {
        if ((uint)minimumLength > (uint)_maximumSize)
            throw new ArgumentOutOfRangeException(nameof(minimumLength), minimumLength, $"at most {_maximumSize} bytes");
        int size = Math.Max(MinimumSize, (int)BitOperations.RoundUpToPowerOf2((uint)minimumLength));
        int index = ClassOf(size);
        if (_classes[index].TryDequeue(out var array))
        {
            Interlocked.Decrement(ref _counts[index]);
            return array;
        }
        return GC.AllocateUninitializedArray<byte>(size, pinned: true);
    }

    /// <summary>Returns an array obtained from <see cref="Rent"/>.</summary>
    public void Return(byte[] array)
    {
        int index = ClassOf(array.Length);
        if ((uint)index >= (uint)_classes.Length || array.Length != (MinimumSize << index)) return;
        long limit = Math.Max(2, _retainedBytesPerClass / array.Length);
        if (Interlocked.Increment(ref _counts[index]) > limit)
        {
            Interlocked.Decrement(ref _counts[index]);
            return;
        }
        _classes[index].Enqueue(array);
    }

    private static int ClassOf(int size) => BitOperations.Log2((uint)size) - BitOperations.Log2(MinimumSize);
}
