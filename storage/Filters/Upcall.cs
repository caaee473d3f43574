using System.Buffers;
using ISCSISnap.Storage.BlockDevices;

namespace ISCSISnap.Storage.Filters;

/// <summary>
/// One call into a filter: its second kernel stack, the request (a copy of the first stack's context), the data and
/// the syscalls it may make. Valid only until the filter's function returns.
/// </summary>
public sealed class Upcall
{
    internal Upcall(FilterSlot[] slots, FilterSlot slot, KernelStack first, KernelStack stack, FilterPhase phase, Memory<byte> readBuffer,
        ReadOnlySequence<byte> writeData, FilterEngine engine)
    {
        Slots = slots;
        First = first;
        Slot = slot;
        Stack = stack;
        Phase = phase;
        ReadBuffer = readBuffer;
        WriteData = writeData;
        Syscalls = new Syscalls(this, engine);
    }

    /// <summary>The stack as the request saw it when it started.</summary>
    internal FilterSlot[] Slots { get; }
    internal FilterSlot Slot { get; }
    /// <summary>The stack the upcall was made from (the request's, or a syscall's).</summary>
    internal KernelStack First { get; }
    internal KernelStack Stack { get; }
    internal int SyscallCount;
    /// <summary>Write data a transforming filter put in place of the initiator's (a scratch buffer of its stack).</summary>
    internal ReadOnlyMemory<byte>? ReplacedWriteData;

    public RequestContext Request => Stack.Context;
    public FilterPhase Phase { get; }
    /// <summary>How many upcalls deep this one runs (1 for a filter called from the IO path).</summary>
    public int Depth => Stack.Depth;
    /// <summary>A read's buffer: empty on the way down unless a filter above completed it; the data on <see cref="FilterPhase.AfterRead"/>.</summary>
    public Memory<byte> ReadBuffer { get; }
    /// <summary>A write's data as it stands at this filter (on <see cref="FilterPhase.AfterWrite"/>: as it went down).</summary>
    public ReadOnlySequence<byte> WriteData { get; }
    public Syscalls Syscalls { get; }
    /// <summary>The verdicts filters gave this request on its way down so far, in order (a trace filter reads them on the way up).</summary>
    public IReadOnlyList<(string Filter, VerdictKind Verdict)> Verdicts => First.Verdicts;
}
