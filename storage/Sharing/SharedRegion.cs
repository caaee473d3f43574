namespace ISCSISnap.Storage.Sharing;

/// <summary>What a peer may do with a region. Each direction of a link gets its own regions.</summary>
public enum PeerAccess : byte
{
    /// <summary>The owner writes, the peer only reads: sealed with F_SEAL_FUTURE_WRITE, mapped read-only by the peer.</summary>
    Read = 1,
    /// <summary>Both write (the peer fills what the owner reads): mapped read-write on both sides.</summary>
    ReadWrite = 2,
    /// <summary>Filled once by the owner at creation, then read-only for both: sealed with F_SEAL_WRITE.</summary>
    Constant = 3,
}

/// <summary>One region a link shares: its length (rounded up to whole pages), what the peer may do, and for a <see cref="PeerAccess.Constant"/> region its content.</summary>
public readonly record struct RegionSpec(long Length, PeerAccess Access, ReadOnlyMemory<byte> Content = default);

/// <summary>
/// One memfd-backed shared-memory region mapped into this process: created and sealed by the owner, or received
/// and checked by the peer. Its size can never change (F_SEAL_SHRINK | F_SEAL_GROW), so a mapping can never fault
/// on a truncated file. Threading: the mapping is shared memory; callers coordinate access to its bytes.
/// </summary>
internal sealed unsafe class SharedRegion : IDisposable
{
    private const int SizeSeals = SharingNative.F_SEAL_SHRINK | SharingNative.F_SEAL_GROW;
    private int _fd;
    private nint _address;
    private int _reclaimed;

    public long Length { get; }
    public PeerAccess Access { get; }
    public bool Writable { get; }
    public byte* Pointer => (byte*)_address;
    /// <summary>The memfd, until <see cref="CloseDescriptor"/>; -1 after.</summary>
    public int Descriptor => _fd;

    private SharedRegion(int fd, nint address, long length, PeerAccess access, bool writable)
    {
        _fd = fd;
        _address = address;
        Length = length;
        Access = access;
        Writable = writable;
    }

    public static long RoundToPages(long length) => (length + Environment.SystemPageSize - 1) / Environment.SystemPageSize * Environment.SystemPageSize;

    /// <summary>Creates, sizes, maps and seals a region as its owner.</summary>
    public static SharedRegion Create(string name, RegionSpec spec)
    {
        if (spec.Length <= 0) throw new ArgumentOutOfRangeException(nameof(spec), spec.Length, "a region needs a positive length");
        if (spec.Access is not (PeerAccess.Read or PeerAccess.ReadWrite or PeerAccess.Constant))
            throw new ArgumentOutOfRangeException(nameof(spec), spec.Access, "unknown peer access");
        if (spec.Access == PeerAccess.Constant ? spec.Content.Length > spec.Length : !spec.Content.IsEmpty)
            throw new ArgumentException("only a constant region has content, and it must fit the region", nameof(spec));
        long length = RoundToPages(spec.Length);

        int fd = SharingNative.MemfdCreate(name, SharingNative.MFD_CLOEXEC | SharingNative.MFD_ALLOW_SEALING);
        if (fd < 0) throw Failure("memfd_create", name);
        try
        {
            if (SharingNative.FTruncate(fd, length) != 0) throw Failure("ftruncate", name);
            nint address = SharingNative.MMap(0, (nuint)length, SharingNative.PROT_READ | SharingNative.PROT_WRITE, SharingNative.MAP_SHARED, fd, 0);
            if (address == SharingNative.MapFailed) throw Failure("mmap", name);

            int seals = SizeSeals | SharingNative.F_SEAL_SEAL;
            bool writable = true;
            if (spec.Access == PeerAccess.Read)
            {
                // The owner's writable mapping exists already; FUTURE_WRITE stops every later one (and write(2)).
                seals |= SharingNative.F_SEAL_FUTURE_WRITE;
            }
            else if (spec.Access == PeerAccess.Constant)
            {
                spec.Content.Span.CopyTo(new Span<byte>((void*)address, spec.Content.Length));
                // F_SEAL_WRITE is refused (EBUSY) while any shared mapping that may write exists (a read-only one
                // of a read-write descriptor counts), so unmap, seal, then map read-only.
                SharingNative.MUnmap(address, (nuint)length);
                address = 0;
                seals |= SharingNative.F_SEAL_WRITE;
                writable = false;
            }
            if (SharingNative.Fcntl(fd, SharingNative.F_ADD_SEALS, seals) != 0)
            {
                int error = SharingNative.LastError;
                if (address != 0) SharingNative.MUnmap(address, (nuint)length);
                throw new IOException($"sealing shared region {name} failed: errno {error}");
            }
            if (address == 0)
            {
                address = SharingNative.MMap(0, (nuint)length, SharingNative.PROT_READ, SharingNative.MAP_SHARED, fd, 0);
                if (address == SharingNative.MapFailed) throw Failure("mmap", name);
            }
            return new SharedRegion(fd, address, length, spec.Access, writable);
        }
        catch
        {
            SharingNative.Close(fd);
            throw;
        }
    }

    /// <summary>
    /// Maps a region received from an owner, after checking that the kernel's view of it matches what the owner
    /// declared: its size, seals against resizing, and for a read-only region a write seal. Takes the descriptor
    /// over (closes it on failure).
    /// </summary>
    public static SharedRegion MapReceived(int fd, long declaredLength, PeerAccess access)
    {
        try
        {
            if (access is not (PeerAccess.Read or PeerAccess.ReadWrite or PeerAccess.Constant))
                throw new SharingException(SharingCheck.Handshake, $"the owner declared an unknown access {(int)access}");
            long size = SharingNative.LSeek(fd, 0, SharingNative.SEEK_END);
            if (size != declaredLength || size <= 0)
                throw new SharingException(SharingCheck.Seals, $"a received region is {size} bytes, not the {declaredLength} declared");
            int seals = SharingNative.Fcntl(fd, SharingNative.F_GET_SEALS, 0);
            if (seals < 0 || (seals & SizeSeals) != SizeSeals)
                throw new SharingException(SharingCheck.Seals, $"a received region is not sealed against resizing (seals 0x{seals:x})");
            bool readOnly = access != PeerAccess.ReadWrite;
            int writeSeal = access == PeerAccess.Read ? SharingNative.F_SEAL_FUTURE_WRITE | SharingNative.F_SEAL_WRITE : SharingNative.F_SEAL_WRITE;
            if (readOnly && (seals & writeSeal) == 0)
                throw new SharingException(SharingCheck.Seals, $"a read-only region is not sealed against writing (seals 0x{seals:x})");
            int protection = readOnly ? SharingNative.PROT_READ : SharingNative.PROT_READ | SharingNative.PROT_WRITE;
            nint address = SharingNative.MMap(0, (nuint)size, protection, SharingNative.MAP_SHARED, fd, 0);
            if (address == SharingNative.MapFailed)
                throw new SharingException(SharingCheck.Seals, $"mapping a received region failed: errno {SharingNative.LastError}");
            return new SharedRegion(fd, address, size, access, !readOnly);
        }
        catch
        {
            SharingNative.Close(fd);
            throw;
        }
    }

    /// <summary>Closes the memfd; the mapping keeps the memory for as long as it lasts.</summary>
    public void CloseDescriptor()
    {
        int fd = Interlocked.Exchange(ref _fd, -1);
        if (fd >= 0) SharingNative.Close(fd);
    }

    /// <summary>
    /// Lets the kernel free the region's pages now, while a stale pointer into it stays harmless: the mapping is
    /// replaced in place by private anonymous memory, so a late access reads zeros instead of faulting.
    /// </summary>
    public void Reclaim()
    {
        if (Interlocked.Exchange(ref _reclaimed, 1) != 0) return;
        CloseDescriptor();
        SharingNative.MMap(_address, (nuint)Length, SharingNative.PROT_READ | SharingNative.PROT_WRITE,
            SharingNative.MAP_FIXED | SharingNative.MAP_PRIVATE | SharingNative.MAP_ANONYMOUS, -1, 0);
    }

    public void Dispose()
    {
        CloseDescriptor();
        nint address = Interlocked.Exchange(ref _address, 0);
        if (address != 0) SharingNative.MUnmap(address, (nuint)Length);
    }

    private static IOException Failure(string call, string name) => new($"{call} for shared region {name} failed: errno {SharingNative.LastError}");
}
