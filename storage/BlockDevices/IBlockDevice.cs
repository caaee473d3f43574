using System.Buffers;

namespace ISCSISnap.Storage.BlockDevices;

/// <summary>
/// A block device addressed by explicit byte offsets. Every offset and length is a multiple of
/// <see cref="LogicalBlockSize"/>. Operations are asynchronous and may complete synchronously (a page-cache
/// hit, say); they report faults as <see cref="IoStatus"/> codes. Threading: every member is safe to call
/// concurrently; overlapping concurrent writes land in an unspecified order, as SCSI allows.
/// </summary>
public interface IBlockDevice : IAsyncDisposable
{
    /// <summary>Logical block size in bytes: 512 or 4096.</summary>
    int LogicalBlockSize { get; }

    /// <summary>Physical block size in bytes (a power-of-two multiple of the logical block size).</summary>
    int PhysicalBlockSize { get; }

    /// <summary>Capacity in bytes (a multiple of the logical block size).</summary>
    long Length { get; }

    /// <summary>Bytes of backing storage in use (less than <see cref="Length"/> for a thin device); -1 when unknown.</summary>
    long AllocatedBytes { get; }

    /// <summary>Whether writes are refused.</summary>
    bool IsReadOnly { get; }

    /// <summary>Whether the device can deallocate blocks (UNMAP, WRITE SAME with UNMAP) and report their state; a read-only device still says what its medium can do.</summary>
    bool SupportsDeallocation { get; }

    /// <summary>Granularity, in bytes, at which deallocation frees backing storage.</summary>
    int DeallocationGranularity { get; }

    /// <summary>Reads <paramref name="destination"/>.Length bytes at <paramref name="offset"/>.</summary>
    ValueTask<IoStatus> ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default);

    /// <summary>Writes the (possibly multi-segment) <paramref name="data"/> at <paramref name="offset"/>.</summary>
    ValueTask<IoStatus> WriteAsync(long offset, ReadOnlySequence<byte> data, WriteFlags flags, CancellationToken cancellationToken = default);

    /// <summary>Makes every completed write durable (SYNCHRONIZE CACHE).</summary>
    ValueTask<IoStatus> FlushAsync(CancellationToken cancellationToken = default);

    /// <summary>
    /// Sets the range to zeros. With <paramref name="deallocate"/> the device frees backing storage where it
    /// can (whole granules) and writes zeros elsewhere.
    /// </summary>
    ValueTask<IoStatus> WriteZeroesAsync(long offset, long length, bool deallocate, WriteFlags flags, CancellationToken cancellationToken = default);

    /// <summary>The allocation state of the run that starts at <paramref name="offset"/> (at most up to the end of the device).</summary>
    ValueTask<(IoStatus Status, AllocationExtent Extent)> GetAllocationAsync(long offset, CancellationToken cancellationToken = default);

    /// <summary>Largest write <see cref="WriteAtomicAsync"/> accepts, in bytes (0: atomic writes are not supported).</summary>
    int MaxAtomicWriteBytes { get; }

    /// <summary>
    /// Writes <paramref name="data"/> so that after a crash at any instant the range holds either all old or all new
    /// data. Callers serialise atomic writes against other writers of the range.
    /// </summary>
    ValueTask<IoStatus> WriteAtomicAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken = default);

    /// <summary>Grows the device to <paramref name="newLength"/> bytes; shrinking is refused with <see cref="IoStatus.OutOfRange"/>.</summary>
    ValueTask<IoStatus> GrowAsync(long newLength, CancellationToken cancellationToken = default);
}
