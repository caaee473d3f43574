using System.Buffers;
using System.Diagnostics;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;

namespace ISCSISnap.Storage.Filters;

/// <summary>What the engine reports: per-upcall outcomes, faults and quarantines, filter log lines.</summary>
public interface IFilterObserver
{
    /// <summary>What records one filter's upcalls on one LUN; asked for once per filter added, used on every upcall.</summary>
    IUpcallMeter MeterFor(string lun, string filter);
    void OnFault(string lun, string filter, string reason, bool quarantined);
    void OnFilterLog(string lun, string filter, string message);
}

/// <summary>Records upcalls of one filter on one LUN (bound once, so an upcall costs no label lookup).</summary>
public interface IUpcallMeter
{
    void OnUpcall(VerdictKind verdict, double seconds);
}

/// <summary>
/// Runs a LUN's filter stack for each request: the IO path's own (first) kernel stack hands the request to each
/// filter by upcall on a second stack initialised from it, awaits the filter without blocking its thread, and goes
/// on by the verdict. Syscalls that read or write below a filter run the filters below it by nested upcalls, up
/// to <see cref="MaxDepth"/>. A faulting filter (throws, overruns its deadline, breaks a budget) is contained by its
/// failure policy and quarantined after repeated faults. Filters can be added and removed while IO runs: each
/// request uses the stack as it was when it started. Threading: thread-safe.
/// </summary>
public sealed class FilterEngine
{
    private StackVersion _current = new([]);
    private readonly List<StackVersion> _undrained = new();   // older versions requests may still run on
    private readonly object _change = new();

    /// <summary>One version of the stack and the requests running on it, so a removed filter is disposed only once no request can call it.</summary>
    private sealed class StackVersion(FilterSlot[] slots)
    {
        public readonly FilterSlot[] Slots = slots;
        public int InFlight;
    }

    public FilterEngine(IBlockDevice device, string lun, int maxDepth = 8, IFilterObserver? observer = null, KernelContext? kernel = null,
        Cache.IBlockCache? cache = null)
    {
        BlockCache = cache;
        ArgumentOutOfRangeException.ThrowIfLessThan(maxDepth, 1);
        Kernel = kernel;
        if (kernel is not null) maxDepth = Math.Min(maxDepth, kernel.MaxDepth);   // its stacks hold that many frames
        Device = device;
        Chain = device as ChainDevice;
        Lun = lun;
        MaxDepth = maxDepth;
        Observer = observer;
    }

    /// <summary>The IO worker threads filtered requests run on; null runs them on the caller's flow (tests, tools).</summary>
    public KernelContext? Kernel { get; }

    /// <summary>The block cache the cache syscalls reach; null: they are refused.</summary>
    public Cache.IBlockCache? BlockCache { get; }

    /// <summary>The device under the stack.</summary>
    public IBlockDevice Device { get; }
    public ChainDevice? Chain { get; }
    public string Lun { get; }
    /// <summary>Deepest upcall nesting; a syscall that would go deeper fails with <see cref="IoStatus.NotReady"/>.</summary>
    public int MaxDepth { get; }
    public IFilterObserver? Observer { get; }
    public IReadOnlyList<FilterSlot> Filters => Volatile.Read(ref _current).Slots;
    public bool IsEmpty => Volatile.Read(ref _current).Slots.Length == 0;

    /// <summary>Adds a filter at <paramref name="position"/> (0 = top, the first to see a request; null = bottom).</summary>
    public FilterSlot Add(IIoFilter filter, FilterOptions? options = null, int? position = null)
    {
        var slot = new FilterSlot(filter, options) { Meter = Observer?.MeterFor(Lun, filter.Name) };
        lock (_change)
        {
            var slots = _current.Slots.ToList();
            if (slots.Any(s => s.Name == filter.Name)) throw new ArgumentException($"a filter named '{filter.Name}' is already in the stack");
            int at = Math.Clamp(position ?? slots.Count, 0, slots.Count);
            slots.Insert(at, slot);
            Publish(slots.ToArray());
        }
        return slot;
    }

    /// <summary>Takes a filter out of the stack; requests already running may still call it (see <see cref="RemoveAsync"/>).</summary>
    public bool Remove(string name) => Unpublish(name) is not null;

    /// <summary>
    /// Takes a filter out of the stack, waits until no request that started with it is still running, then disposes
    /// it (when it is disposable). Returns false when no filter has that name.
    /// </summary>
    public async Task<bool> RemoveAsync(string name, CancellationToken cancellationToken = default)
    {
        if (Unpublish(name) is not { } removed) return false;
        await DrainAsync(cancellationToken);
        await DisposeFilterAsync(removed.Filter);
        return true;
    }

    /// <summary>Empties the stack and disposes every filter once requests have left it (a LUN going away, a clean stop).</summary>
    public async Task ClearAsync(CancellationToken cancellationToken = default)
    {
        FilterSlot[] removed;
        lock (_change)
        {
            removed = _current.Slots;
            if (removed.Length == 0) return;
            Publish([]);
        }
        await DrainAsync(cancellationToken);
        foreach (var slot in removed) await DisposeFilterAsync(slot.Filter);
    }

    private FilterSlot? Unpublish(string name)
    {
        lock (_change)
        {
            var removed = _current.Slots.FirstOrDefault(s => s.Name == name);
            if (removed is null) return null;
            Publish(_current.Slots.Where(s => s != removed).ToArray());
            return removed;
        }
    }

    private void Publish(FilterSlot[] slots)
    {
        // A superseded version with no request counted in can gain none (see EnterVersion): nothing to wait for.
        _undrained.RemoveAll(v => Volatile.Read(ref v.InFlight) == 0);
        _undrained.Add(_current);
        Volatile.Write(ref _current, new StackVersion(slots));
    }

    /// <summary>Waits for every request that started on an older version of the stack.</summary>
    private async Task DrainAsync(CancellationToken cancellationToken)
    {
        List<StackVersion> older;
        lock (_change) older = _undrained.ToList();
        foreach (var version in older)
            while (Volatile.Read(ref version.InFlight) > 0) await Task.Delay(5, cancellationToken);
        lock (_change) _undrained.RemoveAll(older.Contains);
    }

    private static async ValueTask DisposeFilterAsync(IIoFilter filter)
    {
        if (filter is IAsyncDisposable asyncDisposable) await asyncDisposable.DisposeAsync();
        else if (filter is IDisposable disposable) disposable.Dispose();
    }

    /// <summary>A command is about to change <paramref name="offset"/>+<paramref name="length"/> without passing its data through the stack.</summary>
    public ValueTask RangeChangingAsync(long offset, long length)
    {
        var slots = Volatile.Read(ref _current).Slots;
        foreach (var slot in slots)
            if (slot.Filter is IRangeChangeListener) return TellAsync(slots, offset, length);
        return ValueTask.CompletedTask;   // no listener: the usual case costs nothing

        static async ValueTask TellAsync(FilterSlot[] slots, long offset, long length)
        {
            foreach (var slot in slots)
                if (slot.Filter is IRangeChangeListener listener) await listener.OnRangeChangingAsync(offset, length);
        }
    }

    /// <summary>The change announced by <see cref="RangeChangingAsync"/> is done (or failed: the range may hold either data).</summary>
    public void RangeChanged(long offset, long length)
    {
        foreach (var slot in Volatile.Read(ref _current).Slots)
            if (slot.Filter is IRangeChangeListener listener) listener.OnRangeChanged(offset, length);
    }

    // ---------------------------------------------------------------- the IO path

    public ValueTask<IoStatus> ReadAsync(RequestContext request, Memory<byte> destination)
    {
        if (Volatile.Read(ref _current).Slots.Length == 0) return Device.ReadAsync(request.Offset, destination);
        var version = EnterVersion();
        if (version.Slots.Length == 0)
        {
            Interlocked.Decrement(ref version.InFlight);
            return Device.ReadAsync(request.Offset, destination);
        }
        if (Kernel is { } kernel) return new(kernel.RunAsync(_ => StartRead(version, request, destination).AsTask()));
        return StartRead(version, request, destination);
    }

    /// <summary>
    /// Counts a request in on the current version of the stack. The count is taken, then the version checked to be
    /// still current: a removal publishes its new version before it drains the old one, so either this request is
    /// counted where the drain will see it, or it moves on to the new version (without the removed filter).
    /// </summary>
    private StackVersion EnterVersion()
    {
        while (true)
        {
            var version = Volatile.Read(ref _current);
            Interlocked.Increment(ref version.InFlight);
            if (ReferenceEquals(version, Volatile.Read(ref _current))) return version;
            Interlocked.Decrement(ref version.InFlight);
        }
    }

    public ValueTask<IoStatus> WriteAsync(RequestContext request, ReadOnlySequence<byte> data, WriteFlags flags)
    {
        if (Volatile.Read(ref _current).Slots.Length == 0) return Device.WriteAsync(request.Offset, data, flags);
        var version = EnterVersion();
        if (version.Slots.Length == 0)
        {
            Interlocked.Decrement(ref version.InFlight);
            return Device.WriteAsync(request.Offset, data, flags);
        }
        if (flags != request.Flags) request = request with { Flags = flags };
        if (Kernel is { } kernel) return new(kernel.RunAsync(_ => StartWrite(version, request, data, flags).AsTask()));
        return StartWrite(version, request, data, flags);
    }

    /// <summary>The request on its first kernel stack (a worker's, when it runs on one); it leaves its version when done.</summary>
    private async ValueTask<IoStatus> StartRead(StackVersion version, RequestContext request, Memory<byte> destination)
    {
        var first = RentStack();
        first.InitialiseFirst(request);
        try
        {
            return await RunReadAsync(version.Slots, 0, first, request.Offset, destination);
        }
        finally
        {
            ReturnStack(first);
            Interlocked.Decrement(ref version.InFlight);
        }
    }

    private async ValueTask<IoStatus> StartWrite(StackVersion version, RequestContext request, ReadOnlySequence<byte> data, WriteFlags flags)
    {
        var first = RentStack();
        first.InitialiseFirst(request);
        try
        {
            return await RunWriteAsync(version.Slots, 0, first, request.Offset, data, flags);
        }
        finally
        {
            ReturnStack(first);
            Interlocked.Decrement(ref version.InFlight);
        }
    }

    private KernelStack RentStack() => KernelContext.Current?.RentStack() ?? new KernelStack(MaxDepth + 1);

    private static void ReturnStack(KernelStack stack)
    {
        if (KernelContext.Current is { } worker) worker.ReturnStack(stack);
        else stack.Release();
    }

    /// <summary>A read syscall of <paramref name="caller"/>: the filters below it, then the device.</summary>
    internal ValueTask<IoStatus> ReadFromAsync(Upcall upcall, long offset, Memory<byte> destination) =>
        Below(upcall, out int from) ? NestedReadAsync(upcall.Slots, from, upcall.Stack, offset, destination) : new(IoStatus.NotReady);

    internal ValueTask<IoStatus> WriteFromAsync(Upcall upcall, long offset, ReadOnlySequence<byte> data) =>
        Below(upcall, out int from) ? NestedWriteAsync(upcall.Slots, from, upcall.Stack, offset, data) : new(IoStatus.NotReady);

    /// <summary>
    /// Where a syscall of <paramref name="upcall"/>'s filter continues in the request's own version of the stack (a
    /// filter removed meanwhile still reaches what was below it); false when that would nest past <see cref="MaxDepth"/>.
    /// </summary>
    private bool Below(Upcall upcall, out int from)
    {
        from = Array.IndexOf(upcall.Slots, upcall.Slot) + 1;
        return upcall.Stack.Depth < MaxDepth || from >= upcall.Slots.Length;
    }

    /// <summary>A syscall's own stack continues its caller's: the upcalls it makes nest one level deeper.</summary>
    private async ValueTask<IoStatus> NestedReadAsync(FilterSlot[] slots, int from, KernelStack caller, long offset, Memory<byte> destination)
    {
        var nested = RentStack();
        nested.InitialiseFirst(caller.Context with { Offset = offset, Length = destination.Length });
        nested.InheritDepth(caller);
        try
        {
            return await RunReadAsync(slots, from, nested, offset, destination);
        }
        finally
        {
            ReturnStack(nested);
        }
    }

    private async ValueTask<IoStatus> NestedWriteAsync(FilterSlot[] slots, int from, KernelStack caller, long offset, ReadOnlySequence<byte> data)
    {
        var nested = RentStack();
        nested.InitialiseFirst(caller.Context with { Offset = offset, Length = (int)data.Length, Operation = IoOperation.Write });
        nested.InheritDepth(caller);
        try
        {
            return await RunWriteAsync(slots, from, nested, offset, data, caller.Context.Flags);
        }
        finally
        {
            ReturnStack(nested);
        }
    }

    private async ValueTask<IoStatus> RunReadAsync(FilterSlot[] slots, int from, KernelStack first, long offset, Memory<byte> destination)
    {
        ulong transforms = 0;   // filters (by index, up to 64) that see the data again on its way up
        for (int i = from; i < slots.Length; i++)
        {
            var verdict = await CallAsync(slots, slots[i], first, FilterPhase.Before, destination, default);
            if (verdict.Kind == VerdictKind.Fail) return verdict.Status;
            if (verdict.Kind == VerdictKind.Complete) return await UpAsync(slots, transforms, first, FilterPhase.AfterRead, destination, default);
            if (verdict.Kind == VerdictKind.Transform && i < 64) transforms |= 1UL << i;
        }
        var status = await Device.ReadAsync(offset, destination);
        if (status != IoStatus.Ok) return status;
        return await UpAsync(slots, transforms, first, FilterPhase.AfterRead, destination, default);
    }

    /// <summary>On the way up: the filters in <paramref name="mask"/> (by index, up to 64) again, bottom first.</summary>
    private async ValueTask<IoStatus> UpAsync(FilterSlot[] slots, ulong mask, KernelStack first, FilterPhase phase, Memory<byte> buffer, ReadOnlySequence<byte> data)
    {
        for (int i = Math.Min(slots.Length, 64) - 1; i >= 0; i--)
        {
            if ((mask & (1UL << i)) == 0) continue;
            var verdict = await CallAsync(slots, slots[i], first, phase, buffer, data);
            if (verdict.Kind == VerdictKind.Fail) return verdict.Status;
        }
        return IoStatus.Ok;
    }

    private async ValueTask<IoStatus> RunWriteAsync(FilterSlot[] slots, int from, KernelStack first, long offset, ReadOnlySequence<byte> data, WriteFlags flags)
    {
        List<KernelStack>? held = null;   // stacks whose scratch holds replaced data until the write is done
        ulong after = 0;                  // filters (by index, up to 64) called again once the write is done
        try
        {
            int i = from;
            IoStatus status = IoStatus.Ok;
            for (; i < slots.Length; i++)
            {
                var (verdict, replaced, stack) = await CallForWriteAsync(slots, slots[i], first, data);
                if (stack is not null) (held ??= new()).Add(stack);
                if (verdict.Kind == VerdictKind.Fail) return verdict.Status;
                if (verdict.Kind == VerdictKind.Complete) break;
                if (replaced is { } bytes) data = new ReadOnlySequence<byte>(bytes);
                else if (verdict.Kind == VerdictKind.Transform && i < 64) after |= 1UL << i;
            }
            if (i == slots.Length) status = await Device.WriteAsync(offset, data, flags);
            if (status != IoStatus.Ok || after == 0) return status;
            return await UpAsync(slots, after, first, FilterPhase.AfterWrite, default, data);
        }
        finally
        {
            if (held is not null) foreach (var stack in held) ReturnStack(stack);
        }
    }

    // ---------------------------------------------------------------- upcalls

    private async ValueTask<FilterVerdict> CallAsync(FilterSlot[] slots, FilterSlot slot, KernelStack first, FilterPhase phase, Memory<byte> buffer, ReadOnlySequence<byte> data)
    {
        var second = RentStack();
        var (verdict, _, keep) = await UpcallAsync(slots, slot, first, second, phase, buffer, data);
        if (!keep) ReturnStack(second);
        return verdict;
    }

    private async ValueTask<(FilterVerdict, ReadOnlyMemory<byte>?, KernelStack?)> CallForWriteAsync(FilterSlot[] slots, FilterSlot slot, KernelStack first, ReadOnlySequence<byte> data)
    {
        var second = RentStack();
        var (verdict, upcall, keep) = await UpcallAsync(slots, slot, first, second, FilterPhase.Before, default, data);
        var replaced = verdict.Kind == VerdictKind.Transform ? upcall?.ReplacedWriteData : null;
        if (replaced is not null) return (verdict, replaced, second);   // returned once the write is done
        if (!keep) ReturnStack(second);
        return (verdict, null, null);
    }

    /// <summary>
    /// Runs <paramref name="slot"/>'s function on <paramref name="second"/>, initialised from <paramref name="first"/>.
    /// Returns the verdict (a fault's policy verdict when it faulted) and whether the stack must stay alive (a filter
    /// still running after its deadline keeps its stack until it returns).
    /// </summary>
    private async ValueTask<(FilterVerdict Verdict, Upcall? Upcall, bool KeepStack)> UpcallAsync(
        FilterSlot[] slots, FilterSlot slot, KernelStack first, KernelStack second, FilterPhase phase, Memory<byte> buffer, ReadOnlySequence<byte> data)
    {
        if (slot.IsQuarantined) return (PolicyVerdict(slot), null, false);
        if (!second.InitialiseFrom(first, slot.Name) || second.Depth > MaxDepth)
        {
            Faulted(slot, $"upcall depth {second.Depth} exceeds the limit of {MaxDepth}");
            return (PolicyVerdict(slot), null, false);
        }
        var upcall = new Upcall(slots, slot, first, second, phase, buffer, data, this);
        long started = Stopwatch.GetTimestamp();
        while (true)
        {
            ValueTask<FilterVerdict> pending;
            long attempt = Stopwatch.GetTimestamp();
            try
            {
                pending = first.Context.Operation == IoOperation.Read ? slot.Filter.OnReadAsync(upcall) : slot.Filter.OnWriteAsync(upcall);
            }
            catch (Exception e)
            {
                upcall.Syscalls.Expired = true;
                Faulted(slot, Describe(e));
                return (PolicyVerdict(slot), upcall, false);
            }
            FilterVerdict verdict;
            if (pending.IsCompletedSuccessfully)
            {
                verdict = pending.Result;
                // A filter that blocked its thread instead of awaiting cannot be cut short (the worker was stuck in
                // it), but overrunning its deadline that way is a fault like any other.
                if (Stopwatch.GetElapsedTime(attempt) is var took && took > slot.Options.UpcallDeadline)
                {
                    upcall.Syscalls.Expired = true;
                    Faulted(slot, $"blocked its thread for {took.TotalMilliseconds:F0} ms, over its upcall deadline of {slot.Options.UpcallDeadline.TotalMilliseconds:F0} ms");
                    return (PolicyVerdict(slot), upcall, false);
                }
            }
            else
            {
                var task = pending.AsTask();
                try
                {
                    verdict = await task.WaitAsync(slot.Options.UpcallDeadline);
                }
                catch (TimeoutException)
                {
                    // The filter runs on; its stack stays until it returns, its syscalls are refused from now on.
                    upcall.Syscalls.Expired = true;
                    _ = task.ContinueWith(_ => second.Release(), TaskScheduler.Default);
                    Faulted(slot, $"overran its upcall deadline of {slot.Options.UpcallDeadline.TotalMilliseconds:F0} ms");
                    return (PolicyVerdict(slot), upcall, true);
                }
                catch (Exception e)
                {
                    upcall.Syscalls.Expired = true;
                    Faulted(slot, Describe(e));
                    return (PolicyVerdict(slot), upcall, false);
                }
            }
            if (verdict.Kind == VerdictKind.Defer)
            {
                // Throttled: try again later, never past the request's deadline.
                slot.Record(VerdictKind.Defer);
                if (phase == FilterPhase.Before) first.RecordVerdict(slot.Name, VerdictKind.Defer);
                var left = first.Context.Deadline - DateTimeOffset.UtcNow;
                if (left <= TimeSpan.Zero) return (FilterVerdict.Fail(IoStatus.NotReady), upcall, false);
                await KernelContext.DelayAsync(TimeSpan.FromMilliseconds(Math.Min(verdict.DeferMilliseconds, left.TotalMilliseconds)));
                continue;
            }
            if (verdict.Kind is VerdictKind.Complete or VerdictKind.Transform && phase != FilterPhase.Before) verdict = FilterVerdict.Pass;
            upcall.Syscalls.Expired = true;
            slot.Record(verdict.Kind);
            if (phase == FilterPhase.Before) first.RecordVerdict(slot.Name, verdict.Kind);
            slot.Meter?.OnUpcall(verdict.Kind, Stopwatch.GetElapsedTime(started).TotalSeconds);
            return (verdict, upcall, false);
        }
    }

    private static string Describe(Exception e) => e is SyscallRefusedException ? e.Message : $"threw {e.GetType().Name}: {e.Message}";

    private static FilterVerdict PolicyVerdict(FilterSlot slot) =>
        slot.Options.OnFault == FailurePolicy.Fail ? FilterVerdict.Fail(slot.Options.FailureStatus) : FilterVerdict.Pass;

    private void Faulted(FilterSlot slot, string reason)
    {
        bool quarantined = slot.Fault();
        Observer?.OnFault(Lun, slot.Name, reason, quarantined);
    }
}
