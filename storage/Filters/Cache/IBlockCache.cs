namespace ISCSISnap.Storage.Filters.Cache;

/// <summary>
/// A cache of chain-layer blocks keyed by (disk ID, byte offset in the layer), so LUNs whose chains share a layer
/// (linked clones on one base) share its cached blocks. Filters reach it only through the cache syscalls. Offsets
/// and lengths are multiples of <see cref="BlockSize"/>. Threading: thread-safe.
/// </summary>
public interface IBlockCache
{
    /// <summary>The cache's unit, in bytes.</summary>
    int BlockSize { get; }

    /// <summary>Copies the cached blocks of <paramref name="diskId"/> at <paramref name="offset"/> into <paramref name="destination"/>; false (and nothing reliable in it) unless every block was cached.</summary>
    ValueTask<bool> GetAsync(Guid diskId, long offset, Memory<byte> destination);

    /// <summary>Caches <paramref name="data"/> as the blocks of <paramref name="diskId"/> at <paramref name="offset"/>.</summary>
    ValueTask PutAsync(Guid diskId, long offset, ReadOnlyMemory<byte> data);

    /// <summary>Forgets every cached block of <paramref name="diskId"/> overlapping the range.</summary>
    ValueTask InvalidateAsync(Guid diskId, long offset, long length);
}
