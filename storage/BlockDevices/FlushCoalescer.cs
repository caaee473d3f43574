namespace ISCSISnap.Storage.BlockDevices;

/// <summary>
/// Group commit for a file's data-sync: a caller is served by any sync that started after it asked, so
/// concurrent FUA writes and SYNCHRONIZE CACHE commands share one fdatasync. The sync runs on the thread
/// pool so the caller's I/O thread keeps serving. Threading: thread-safe.
/// </summary>
internal sealed class FlushCoalescer
{
    private readonly Func<int> _sync;   // returns 0 or an errno
    private readonly SemaphoreSlim _gate = new(1, 1);
    private long _requested;
    private long _coveredThrough;
    private int _failedErrno;

    public FlushCoalescer(Func<int> sync) => _sync = sync;

    /// <summary>0 until a sync has failed; then the errno, forever (the kernel forgets the error after reporting it once).</summary>
    public int FailedErrno => Volatile.Read(ref _failedErrno);

    public async ValueTask<int> FlushAsync(CancellationToken cancellationToken)
    {
        long ticket = Interlocked.Increment(ref _requested);
        await _gate.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            if (FailedErrno != 0) return FailedErrno;
            if (Volatile.Read(ref _coveredThrough) >= ticket) return 0;
            long covers = Volatile.Read(ref _requested);
            int errno = await Task.Factory.StartNew(_sync, CancellationToken.None, TaskCreationOptions.DenyChildAttach, TaskScheduler.Default).ConfigureAwait(false);
            if (errno != 0)
            {
                Volatile.Write(ref _failedErrno, errno);
                return errno;
            }
            Volatile.Write(ref _coveredThrough, covers);
            return 0;
        }
        finally
        {
            _gate.Release();
        }
    }
}
