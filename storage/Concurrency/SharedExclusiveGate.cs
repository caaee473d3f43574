namespace ISCSISnap.Storage.Concurrency;

/// <summary>
/// An asynchronous shared/exclusive gate whose shared side costs two interlocked operations when no exclusive
/// holder is around (the hot path: every write enters it shared). Exclusive holders (COMPARE AND WRITE,
/// WRITE ATOMIC, ORDERED tasks) wait for the shared holders present when they arrive and block new ones.
/// Threading: thread-safe; exclusive holders are served one at a time.
/// </summary>
public sealed class SharedExclusiveGate
{
    private readonly SemaphoreSlim _exclusiveMutex = new(1, 1);
    private int _shared;
    private int _exclusive;
    private TaskCompletionSource? _exclusiveDone;
    private TaskCompletionSource? _drained;

    public bool TryEnterShared()
    {
        Interlocked.Increment(ref _shared);
        if (Volatile.Read(ref _exclusive) == 0) return true;
        ExitShared();
        return false;
    }

    public ValueTask EnterSharedAsync(CancellationToken cancellationToken = default) =>
        TryEnterShared() ? ValueTask.CompletedTask : EnterSharedSlowAsync(cancellationToken);

    private async ValueTask EnterSharedSlowAsync(CancellationToken cancellationToken)
    {
        while (!TryEnterShared())
        {
            var done = Volatile.Read(ref _exclusiveDone);
            if (done is not null) await done.Task.WaitAsync(cancellationToken).ConfigureAwait(false);
            else await Task.Yield();
        }
    }

    public void ExitShared()
    {
        if (Interlocked.Decrement(ref _shared) == 0 && Volatile.Read(ref _exclusive) != 0)
            Volatile.Read(ref _drained)?.TrySetResult();
    }

    public async ValueTask EnterExclusiveAsync(CancellationToken cancellationToken = default)
    {
        await _exclusiveMutex.WaitAsync(cancellationToken).ConfigureAwait(false);
        var drained = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        Volatile.Write(ref _drained, drained);
        Volatile.Write(ref _exclusiveDone, new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously));
        Interlocked.Exchange(ref _exclusive, 1);
        if (Volatile.Read(ref _shared) != 0)
        {
            try
            {
                await drained.Task.WaitAsync(cancellationToken).ConfigureAwait(false);
            }
            catch
            {
                ExitExclusive();
                throw;
            }
        }
    }

    public void ExitExclusive()
    {
        var done = _exclusiveDone;
        Interlocked.Exchange(ref _exclusive, 0);
        done?.TrySetResult();
        _exclusiveMutex.Release();
    }
}
