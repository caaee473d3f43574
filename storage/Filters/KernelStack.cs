using ISCSISnap.Storage.Buffers;

namespace ISCSISnap.Storage.Filters;

/// <summary>
/// A kernel stack: the frames of the upcalls running on it (bounded), the scratch memory its syscalls hold
/// (accounted, returned when the stack is released) and its depth. The IO path runs on a request's first stack;
/// each upcall runs its filter on a second stack initialised from the first. Threading: one request at a time.
/// </summary>
public sealed class KernelStack
{
    private readonly List<string> _frames = new();
    private readonly List<byte[]> _scratch = new();
    private readonly List<(string, VerdictKind)> _verdicts = new();
    private const int MaxScratchBuffer = 32 << 20;   // the largest buffer the pinned pool hands out
    private int _scratchBytes;

    internal KernelStack(int maxFrames) => MaxFrames = maxFrames;

    public int MaxFrames { get; }
    /// <summary>How many upcalls deep this stack is (0 for the IO path's own stack).</summary>
    public int Depth { get; private set; }
    public RequestContext Context { get; private set; } = null!;
    public IReadOnlyList<string> Frames => _frames;
    public int ScratchBytes => _scratchBytes;
    /// <summary>Verdicts given on the way down for the request on this (first) stack.</summary>
    public IReadOnlyList<(string Filter, VerdictKind Verdict)> Verdicts => _verdicts;

    internal void RecordVerdict(string filter, VerdictKind verdict)
    {
        if (_verdicts.Count < 64) _verdicts.Add((filter, verdict));   // a request deferred many times keeps its first 64
    }

    /// <summary>Makes this stack the first stack of a request.</summary>
    internal void InitialiseFirst(RequestContext context)
    {
        Context = context;
        Depth = 0;
        _verdicts.Clear();
    }

    /// <summary>A stack made for a syscall continues its caller's nesting: its upcalls run one level deeper.</summary>
    internal void InheritDepth(KernelStack caller)
    {
        Depth = caller.Depth;
        _frames.AddRange(caller._frames);
    }

    /// <summary>Initialises this (second) stack from <paramref name="first"/>: a copy of its context, one level deeper.</summary>
    internal bool InitialiseFrom(KernelStack first, string filter)
    {
        Context = first.Context with { };
        Depth = first.Depth + 1;
        _frames.AddRange(first._frames);
        if (_frames.Count >= MaxFrames) return false;
        _frames.Add(filter);
        return true;
    }

    internal byte[]? Allocate(int bytes, int budget)
    {
        if (bytes <= 0 || bytes > MaxScratchBuffer || _scratchBytes + bytes > budget) return null;
        var buffer = PinnedBufferPool.Shared.Rent(bytes);
        _scratch.Add(buffer);
        _scratchBytes += bytes;
        return buffer;
    }

    internal bool Free(byte[] buffer, int bytes)
    {
        int index = _scratch.IndexOf(buffer);
        if (index < 0) return false;
        _scratch.RemoveAt(index);
        _scratchBytes -= bytes;
        PinnedBufferPool.Shared.Return(buffer);
        return true;
    }

    /// <summary>Returns everything the stack holds (scratch a filter forgot to free included) and clears it for reuse.</summary>
    internal void Release()
    {
        foreach (var buffer in _scratch) PinnedBufferPool.Shared.Return(buffer);
        _scratch.Clear();
        _scratchBytes = 0;
        _frames.Clear();
        _verdicts.Clear();
        Depth = 0;
        Context = null!;
    }
}
