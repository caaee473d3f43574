using System.Buffers;
using System.Diagnostics;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;

namespace ISCSISnap.Storage.Filters;

/// <summary>What the engine reports: per-upcall outcomes, faults and quarantines, filter log lines.</summary>
public interface IFilterObserver
{
    void OnUpcall(string lun, string filter, VerdictKind verdict, double seconds);
    void OnFault(string lun, string filter, string reason, bool quarantined);
    void OnFilterLog(string lun, string filter, string message);
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
    private FilterSlot[] _slots = [];
    private readonly object _change = new();

    public FilterEngine(IBlockDevice device, string lun, int maxDepth = 8, IFilterObserver? observer = null, KernelContext? kernel = null)
    {
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

    /// <summary>The device under the stack.</summary>
    public IBlockDevice Device { get; }
    public ChainDevice? Chain { get; }
    public string Lun { get; }
    /// <summary>Deepest upcall nesting; a syscall that would go deeper fails with <see cref="IoStatus.NotReady"/>.</summary>
    public int MaxDepth { get; }
    public IFilterObserver? Observer { get; }
    public IReadOnlyList<FilterSlot> Filters => Volatile.Read(ref _slots);
    public bool IsEmpty => Volatile.Read(ref _slots).Length == 0;

    /// <summary>Adds a filter at <paramref name="position"/> (0 = top, the first to see a request; null = bottom).</summary>
    public FilterSlot Add(IIoFilter filter, FilterOptions? options = null, int? position = null)
    {
        var slot = new FilterSlot(filter, options);
        lock (_change)
        {
            var slots = _slots.ToList();
            if (slots.Any(s => s.Name == filter.Name)) throw new ArgumentException($"a filter named '{filter.Name}' is already in the stack");
            int at = Math.Clamp(position ?? slots.Count, 0, slots.Count);
            slots.Insert(at, slot);
            Volatile.Write(ref _slots, slots.ToArray());
        }
        return slot;
    }

    public bool Remove(string name)
    {
        lock (_change)
        {
            var slots = _slots.Where(s => s.Name != name).ToArray();
            if (slots.Length == _slots.Length) return false;
            Volatile.Write(ref _slots, slots);
            return true;
        }
    }

    /// <summary>A command is about to change <paramref name="offset"/>+<paramref name="length"/> without passing its data through the stack.</summary>
    public void RangeChanging(long offset, long length)
    {
        foreach (var slot in Volatile.Read(ref _slots))
            if (slot.Filter is IRangeChangeListener listener) listener.OnRangeChanging(offset, length);
    }

    /// <summary>The change announced by <see cref="RangeChanging"/> is done (or failed: the range may hold either data).</summary>
    public void RangeChanged(long offset, long length)
    {
        foreach (var slot in Volatile.Read(ref _slots))
            if (slot.Filter is IRangeChangeListener listener) listener.OnRangeChanged(offset, length);
    }

    // ---------------------------------------------------------------- the IO path

    public ValueTask<IoStatus> ReadAsync(RequestContext request, Memory<byte> destination)
    {
        var slots = Volatile.Read(ref _slots);
        if (slots.Length == 0) return Device.ReadAsync(request.Offset, destination);
        if (Kernel is { } kernel) return new(kernel.RunAsync(_ => StartRead(slots, request, destination).AsTask()));
        return StartRead(slots, request, destination);
    }

    public ValueTask<IoStatus> WriteAsync(RequestContext request, ReadOnlySequence<byte> data, WriteFlags flags)
    {
        var slots = Volatile.Read(ref _slots);
        if (slots.Length == 0) return Device.WriteAsync(request.Offset, data, flags);
        if (Kernel is { } kernel) return new(kernel.RunAsync(_ => StartWrite(slots, request, data, flags).AsTask()));
        return StartWrite(slots, request, data, flags);
    }

    /// <summary>The request on its first kernel stack (a worker's, when it runs on one).</summary>
    private async ValueTask<IoStatus> StartRead(FilterSlot[] slots, RequestContext request, Memory<byte> destination)
    {
        var first = RentStack();
        first.InitialiseFirst(request);
        try
        {
            return await RunReadAsync(slots, 0, first, request.Offset, destination);
        }
        finally
        {
            ReturnStack(first);
        }
    }

    private async ValueTask<IoStatus> StartWrite(FilterSlot[] slots, RequestContext request, ReadOnlySequence<byte> data, WriteFlags flags)
    {
        var first = RentStack();
        first.InitialiseFirst(request);
        try
        {
            return await RunWriteAsync(slots, 0, first, request.Offset, data, flags);
        }
        finally
        {
            ReturnStack(first);
        }
    }

    private KernelStack RentStack() => KernelContext.Current?.RentStack() ?? new KernelStack(MaxDepth + 1);

    private static void ReturnStack(KernelStack stack)
    {
        if (KernelContext.Current is { } worker) worker.ReturnStack(stack);
        else stack.Release();
    }

    /// <summary>A read syscall of <paramref name="caller"/>: the filters below it, then the device.</summary>
    internal ValueTask<IoStatus> ReadFromAsync(FilterSlot caller, KernelStack stack, long offset, Memory<byte> destination)
    {
        var slots = Volatile.Read(ref _slots);
        int index = Array.IndexOf(slots, caller);
        if (stack.Depth >= MaxDepth && index + 1 < slots.Length) return new(IoStatus.NotReady);
        return NestedReadAsync(slots, index + 1, stack, offset, destination);
    }

    internal ValueTask<IoStatus> WriteFromAsync(FilterSlot caller, KernelStack stack, long offset, ReadOnlySequence<byte> data)
    {
        var slots = Volatile.Read(ref _slots);
        int index = Array.IndexOf(slots, caller);
        if (stack.Depth >= MaxDepth && index + 1 < slots.Length) return new(IoStatus.NotReady);
        return NestedWriteAsync(slots, index + 1, stack, offset, data);
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
            return await RunWriteAsync(slots, from, nested, offset, data, WriteFlags.None);
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
            var verdict = await CallAsync(slots[i], first, FilterPhase.Before, destination, default);
            if (verdict.Kind == VerdictKind.Fail) return verdict.Status;
            if (verdict.Kind == VerdictKind.Complete) return await AfterReadAsync(slots, transforms, first, destination);
            if (verdict.Kind == VerdictKind.Transform && i < 64) transforms |= 1UL << i;
        }
        var status = await Device.ReadAsync(offset, destination);
        if (status != IoStatus.Ok) return status;
        return await AfterReadAsync(slots, transforms, first, destination);
    }

    private async ValueTask<IoStatus> AfterReadAsync(FilterSlot[] slots, ulong transforms, KernelStack first, Memory<byte> data)
    {
        for (int i = Math.Min(slots.Length, 64) - 1; i >= 0; i--)
        {
            if ((transforms & (1UL << i)) == 0) continue;
            var verdict = await CallAsync(slots[i], first, FilterPhase.AfterRead, data, default);
            if (verdict.Kind == VerdictKind.Fail) return verdict.Status;
        }
        return IoStatus.Ok;
    }

    private async ValueTask<IoStatus> RunWriteAsync(FilterSlot[] slots, int from, KernelStack first, long offset, ReadOnlySequence<byte> data, WriteFlags flags)
    {
        var held = new List<KernelStack>();   // stacks whose scratch holds replaced data until the write is done
        try
        {
            for (int i = from; i < slots.Length; i++)
            {
                var (verdict, replaced, stack) = await CallForWriteAsync(slots[i], first, data);
                if (stack is not null) held.Add(stack);
                if (verdict.Kind == VerdictKind.Fail) return verdict.Status;
                if (verdict.Kind == VerdictKind.Complete) return IoStatus.Ok;
                if (replaced is { } bytes) data = new ReadOnlySequence<byte>(bytes);
            }
            return await Device.WriteAsync(offset, data, flags);
        }
        finally
        {
            foreach (var stack in held) ReturnStack(stack);
        }
    }

    // ---------------------------------------------------------------- upcalls

    private async ValueTask<FilterVerdict> CallAsync(FilterSlot slot, KernelStack first, FilterPhase phase, Memory<byte> buffer, ReadOnlySequence<byte> data)
    {
        var second = RentStack();
        var (verdict, _, keep) = await UpcallAsync(slot, first, second, phase, buffer, data);
        if (!keep) ReturnStack(second);
        return verdict;
    }

    private async ValueTask<(FilterVerdict, ReadOnlyMemory<byte>?, KernelStack?)> CallForWriteAsync(FilterSlot slot, KernelStack first, ReadOnlySequence<byte> data)
    {
        var second = RentStack();
        var (verdict, upcall, keep) = await UpcallAsync(slot, first, second, FilterPhase.Before, default, data);
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
        FilterSlot slot, KernelStack first, KernelStack second, FilterPhase phase, Memory<byte> buffer, ReadOnlySequence<byte> data)
    {
        if (slot.IsQuarantined) return (PolicyVerdict(slot), null, false);
        if (!second.InitialiseFrom(first, slot.Name) || second.Depth > MaxDepth)
        {
            Faulted(slot, $"upcall depth {second.Depth} exceeds the limit of {MaxDepth}");
            return (PolicyVerdict(slot), null, false);
        }
        var upcall = new Upcall(slot, second, phase, buffer, data, this);
        long started = Stopwatch.GetTimestamp();
        while (true)
        {
            ValueTask<FilterVerdict> pending;
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
                var left = first.Context.Deadline - DateTimeOffset.UtcNow;
                if (left <= TimeSpan.Zero) return (FilterVerdict.Fail(IoStatus.NotReady), upcall, false);
                await KernelContext.DelayAsync(TimeSpan.FromMilliseconds(Math.Min(verdict.DeferMilliseconds, left.TotalMilliseconds)));
                continue;
            }
            if (verdict.Kind == VerdictKind.Complete && phase == FilterPhase.AfterRead) verdict = FilterVerdict.Pass;
            upcall.Syscalls.Expired = true;
            slot.Record(verdict.Kind);
            Observer?.OnUpcall(Lun, slot.Name, verdict.Kind, Stopwatch.GetElapsedTime(started).TotalSeconds);
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
