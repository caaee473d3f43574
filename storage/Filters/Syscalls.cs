using System.Buffers;
using ISCSISnap.Storage.BlockDevices;

namespace ISCSISnap.Storage.Filters;

/// <summary>A syscall refused: a bad argument, a missing right, an exhausted budget, or a call after the upcall ended.</summary>
public sealed class SyscallRefusedException(string syscall, string filter, string reason)
    : Exception($"syscall {syscall} of filter {filter} refused: {reason}")
{
    public string Syscall { get; } = syscall;
}

/// <summary>Scratch memory a filter got from <see cref="Syscalls.Allocate"/>; freed by <see cref="Syscalls.Free"/> or when the upcall ends.</summary>
public readonly record struct ScratchBuffer(byte[] Array, int Length)
{
    public Memory<byte> Memory => Array.AsMemory(0, Length);
}

/// <summary>
/// The only way a filter touches the system. Each call runs on the upcall's (second) kernel stack, checks its
/// arguments and the filter's rights and budgets, and is counted per filter. A refused call throws
/// <see cref="SyscallRefusedException"/>, which the engine contains as a fault of the filter.
/// </summary>
public sealed class Syscalls
{
    private readonly Upcall _upcall;
    private readonly FilterEngine _engine;

    internal Syscalls(Upcall upcall, FilterEngine engine)
    {
        _upcall = upcall;
        _engine = engine;
    }

    internal bool Expired { get; set; }

    private void Enter(string name, FilterRights right = FilterRights.None)
    {
        var slot = _upcall.Slot;
        if (Expired) throw new SyscallRefusedException(name, slot.Name, "the upcall has ended");
        slot.CountSyscall(name);
        if (++_upcall.SyscallCount > slot.Options.MaxSyscallsPerUpcall)
            throw new SyscallRefusedException(name, slot.Name, $"more than {slot.Options.MaxSyscallsPerUpcall} syscalls in one upcall");
        if ((slot.Options.Rights & right) != right) throw new SyscallRefusedException(name, slot.Name, $"the filter lacks the {right} right");
    }

    /// <summary>A range must lie inside the request (filters act on the IO they were called for) and be sector aligned.</summary>
    private void CheckRange(string name, long offset, long length)
    {
        var request = _upcall.Request;
        int sector = _engine.Device.LogicalBlockSize;
        if (length <= 0 || ((offset | length) & (sector - 1)) != 0 || offset < request.Offset || offset + length > request.Offset + request.Length)
            throw new SyscallRefusedException(name, _upcall.Slot.Name,
                $"range {offset}+{length} is not sector aligned inside the request {request.Offset}+{request.Length}");
    }

    /// <summary>Reads from what lies below this filter (the next filters by nested upcalls, then the device).</summary>
    public ValueTask<IoStatus> ReadBelowAsync(long offset, Memory<byte> destination)
    {
        Enter("read_below", FilterRights.Read);
        CheckRange("read_below", offset, destination.Length);
        return _engine.ReadFromAsync(_upcall, offset, destination);
    }

    /// <summary>Writes to what lies below this filter.</summary>
    public ValueTask<IoStatus> WriteBelowAsync(long offset, ReadOnlyMemory<byte> data)
    {
        Enter("write_below", FilterRights.Write);
        CheckRange("write_below", offset, data.Length);
        return _engine.WriteFromAsync(_upcall, offset, new ReadOnlySequence<byte>(data));
    }

    /// <summary>Makes every write completed below so far durable (the device's flush; what SYNCHRONIZE CACHE does).</summary>
    public ValueTask<IoStatus> FlushBelowAsync()
    {
        Enter("flush_below", FilterRights.Write);
        return _engine.Device.FlushAsync();
    }

    /// <summary>The disk ID of the chain layer holding <paramref name="offset"/> (empty: no layer, zeros) and how many bytes from there it holds.</summary>
    public (Guid DiskId, long Bytes) ResolveOwner(long offset)
    {
        Enter("resolve_owner", FilterRights.Read);
        CheckRange("resolve_owner", offset, _engine.Device.LogicalBlockSize);
        if (_engine.Chain is not { } chain) throw new SyscallRefusedException("resolve_owner", _upcall.Slot.Name, "the LUN is not a snapshot chain");
        return chain.OwnerOf(offset);
    }

    /// <summary>Reads a range of the request from one chain layer, by its disk ID.</summary>
    public ValueTask<IoStatus> ReadLayerAsync(Guid diskId, long offset, Memory<byte> destination)
    {
        Enter("read_layer", FilterRights.Read);
        CheckRange("read_layer", offset, destination.Length);
        if (_engine.Chain is not { } chain) throw new SyscallRefusedException("read_layer", _upcall.Slot.Name, "the LUN is not a snapshot chain");
        var layer = chain.Layers.FirstOrDefault(l => l.DiskId == diskId)
            ?? throw new SyscallRefusedException("read_layer", _upcall.Slot.Name, $"no layer {diskId} in the chain");
        return layer.ReadAsync(offset, destination);
    }

    /// <summary>
    /// Copies a layer's cached blocks for a range of the request into <paramref name="destination"/> (the read's buffer
    /// or scratch); false when any block is not cached. The range is whole cache blocks; the layer is one of this
    /// LUN's chain (a filter never sees another LUN's data).
    /// </summary>
    public ValueTask<bool> CacheGetAsync(Guid diskId, long offset, Memory<byte> destination)
    {
        var cache = EnterCache("cache_get", diskId, offset, destination.Length);
        return cache.GetAsync(diskId, offset, destination);
    }

    /// <summary>Caches data of a layer for a range of the request (data read from that layer, say by read_layer).</summary>
    public ValueTask CachePutAsync(Guid diskId, long offset, ReadOnlyMemory<byte> data)
    {
        var cache = EnterCache("cache_put", diskId, offset, data.Length);
        return cache.PutAsync(diskId, offset, data);
    }

    /// <summary>Forgets a layer's cached blocks for a range of the request.</summary>
    public ValueTask CacheInvalidateAsync(Guid diskId, long offset, long length)
    {
        var cache = EnterCache("cache_invalidate", diskId, offset, length);
        return cache.InvalidateAsync(diskId, offset, length);
    }

    private Cache.IBlockCache EnterCache(string name, Guid diskId, long offset, long length)
    {
        Enter(name, FilterRights.Cache);
        CheckRange(name, offset, length);
        var cache = _engine.BlockCache ?? throw new SyscallRefusedException(name, _upcall.Slot.Name, "the LUN has no block cache");
        if (offset % cache.BlockSize != 0 || length % cache.BlockSize != 0)
            throw new SyscallRefusedException(name, _upcall.Slot.Name, $"range {offset}+{length} is not whole {cache.BlockSize}-byte cache blocks");
        if (_engine.Chain is not { } chain || chain.IndexOf(diskId) < 0)
            throw new SyscallRefusedException(name, _upcall.Slot.Name, $"{diskId} is not a layer of this LUN's chain");
        return cache;
    }

    /// <summary>Scratch memory on the upcall's stack, within the filter's budget.</summary>
    public ScratchBuffer Allocate(int bytes)
    {
        Enter("allocate");
        var array = _upcall.Stack.Allocate(bytes, _upcall.Slot.Options.MaxScratchBytes)
            ?? throw new SyscallRefusedException("allocate", _upcall.Slot.Name,
                $"{bytes} bytes would exceed the scratch budget of {_upcall.Slot.Options.MaxScratchBytes} (holding {_upcall.Stack.ScratchBytes})");
        return new ScratchBuffer(array, bytes);
    }

    public void Free(ScratchBuffer buffer)
    {
        Enter("free");
        if (!_upcall.Stack.Free(buffer.Array, buffer.Length)) throw new SyscallRefusedException("free", _upcall.Slot.Name, "not a buffer of this upcall");
    }

    /// <summary>Gives the layers below this data instead of the write's own (a transforming filter); the buffer must be this upcall's.</summary>
    public void ReplaceWriteData(ScratchBuffer buffer)
    {
        Enter("replace_write_data");
        if (_upcall.Request.Operation != IoOperation.Write || buffer.Length != _upcall.Request.Length)
            throw new SyscallRefusedException("replace_write_data", _upcall.Slot.Name, "only a write's whole data can be replaced");
        _upcall.ReplacedWriteData = buffer.Memory;
    }

    /// <summary>Waits, never past the request's deadline.</summary>
    public Task SleepAsync(int milliseconds)
    {
        Enter("sleep");
        if (milliseconds is < 0 or > 60_000) throw new SyscallRefusedException("sleep", _upcall.Slot.Name, $"{milliseconds} ms is outside 0-60000");
        var left = _upcall.Request.Deadline - DateTimeOffset.UtcNow;
        return KernelContext.DelayAsync(TimeSpan.FromMilliseconds(Math.Max(0, Math.Min(milliseconds, left.TotalMilliseconds))));
    }

    public void Log(string message)
    {
        Enter("log");
        _engine.Observer?.OnFilterLog(_engine.Lun, _upcall.Slot.Name, message.Length > 1024 ? message[..1024] : message);
    }

    /// <summary>Adds to one of the filter's own counters.</summary>
    public void Count(string counter, long by = 1)
    {
        Enter("count");
        if (string.IsNullOrEmpty(counter) || counter.Length > 64) throw new SyscallRefusedException("count", _upcall.Slot.Name, "a counter name is 1-64 characters");
        _upcall.Slot.Count(counter, by);
    }
}
