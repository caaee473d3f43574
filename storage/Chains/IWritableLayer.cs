using System.Buffers;
using ISCSISnap.Storage.BlockDevices;

namespace ISCSISnap.Storage.Chains;

/// <summary>
/// The writable head of a chain. Writes make their sectors <see cref="SectorState.Data"/> in this layer;
/// zeroing makes them <see cref="SectorState.Zero"/> (reads return zeros even where a parent holds data).
/// Metadata changes are ordered so that a crash at any instant leaves a file that opens and holds every write
/// made durable by <see cref="FlushAsync"/> or FUA. Threading: every member may be called concurrently, except
/// <see cref="Seal"/> and <see cref="GrowAsync"/>, which the caller runs with no IO in flight.
/// </summary>
public interface IWritableLayer : IChainLayer
{
    /// <summary>Writes <paramref name="data"/> at <paramref name="offset"/> (multiples of the logical sector size).</summary>
    ValueTask<IoStatus> WriteAsync(long offset, ReadOnlySequence<byte> data, bool forceUnitAccess);

    /// <summary>
    /// Makes [offset, offset+length) read as zeros from this layer. With <paramref name="deallocate"/> whole blocks
    /// give their space back (punched); partial blocks are written with zeros.
    /// </summary>
    ValueTask<IoStatus> ZeroAsync(long offset, long length, bool deallocate, bool forceUnitAccess);

    /// <summary>Makes every completed write and its metadata durable.</summary>
    ValueTask<IoStatus> FlushAsync();

    /// <summary>Grows the virtual size; shrinking is refused with <see cref="IoStatus.OutOfRange"/>.</summary>
    ValueTask<IoStatus> GrowAsync(long newVirtualSize);

    /// <summary>
    /// The unit the layer allocates in (a VHDX payload block): a first write makes the whole unit present, so a
    /// layer with nothing below it holds the unit's unwritten sectors too (as zeros).
    /// </summary>
    int BlockSize { get; }

    /// <summary>Bytes of the file in use on disk.</summary>
    long AllocatedBytes { get; }

    /// <summary>
    /// Ends writing: everything durable, the log applied and cleared, so the file is clean for any reader
    /// (a frozen snapshot layer or a clean close). The layer is read-only afterwards.
    /// </summary>
    IoStatus Seal();
}
