using System.Collections.Concurrent;

namespace ISCSISnap.Storage.Filters;

/// <summary>
/// The kernel context: a fixed set of IO worker threads. A filtered request is handed to one of them and runs there
/// on its first kernel stack; the worker never blocks on a filter: while an upcall awaits (a syscall, a deferral),
/// the worker serves other requests, and the request resumes on the worker when the upcall returns. Each worker
/// keeps its own pool of kernel stacks. Threading: thread-safe; stacks are only touched on their worker.
/// </summary>
public sealed class KernelContext : IDisposable
{
    private readonly Worker[] _workers;
    private int _next;

    public KernelContext(int workers, int maxDepth = 8, string name = "iscsisnap-io")
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(workers, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(workers, 256);
        MaxDepth = maxDepth;
        _workers = Enumerable.Range(0, workers).Select(i => new Worker($"{name}-{i}", maxDepth + 1)).ToArray();
    }

    public int Workers => _workers.Length;
    public int MaxDepth { get; }

    /// <summary>Runs <paramref name="request"/> on a worker (round robin) and completes with its status.</summary>
    internal Task<T> RunAsync<T>(Func<Worker, Task<T>> request)
    {
        // Already on one of the workers (the IO that led here continued on it): no hop.
        if (Current is { } here && Array.IndexOf(_workers, here) >= 0)
        {
            var previous = SynchronizationContext.Current;
            SynchronizationContext.SetSynchronizationContext(here);
            Task<T> task;
            try
            {
                task = request(here);
            }
            finally
            {
                SynchronizationContext.SetSynchronizationContext(previous);
            }
            // Completed later, the request would finish on this worker under its context, where the runtime does not
            // run the caller's context-free continuation inline but queues it to the thread pool (slow to come
            // round on a loaded host): complete it as a handed-over request is, so the caller stays on the worker.
            return task.IsCompleted ? task : Worker.CompleteOnWorker(task);
        }
        var worker = _workers[(uint)Interlocked.Increment(ref _next) % (uint)_workers.Length];
        return worker.RunAsync(request);
    }

    /// <summary>The worker the calling code runs on, if it runs on one of this context's.</summary>
    internal static Worker? Current => Worker.OnThisThread;

    /// <summary>
    /// Completes after <paramref name="delay"/> on the kernel's own timer thread, not the runtime's timers: those
    /// complete on the thread pool, which a loaded host can starve for hundreds of milliseconds. An await of it
    /// resumes on the awaiting worker (its synchronization context); off the workers it resumes on the thread pool.
    /// </summary>
    internal static Task DelayAsync(TimeSpan delay) => DeferralTimer.Shared.DelayAsync(delay);

    public void Dispose()
    {
        foreach (var worker in _workers) worker.Dispose();
    }

    /// <summary>One IO worker thread: a queue of continuations and the kernel stacks it lends to requests.</summary>
    internal sealed class Worker : SynchronizationContext, IDisposable
    {
        private readonly ConcurrentQueue<(SendOrPostCallback Callback, object? State)> _queue = new();
        private readonly SemaphoreSlim _ready = new(0);
        private readonly Thread _thread;
        private readonly Stack<KernelStack> _stacks = new();
        private readonly int _maxFrames;
        private volatile bool _stopping;

        [ThreadStatic] private static Worker? t_worker;

        /// <summary>The worker whose thread this is.</summary>
        public static Worker? OnThisThread => t_worker;

        public Worker(string name, int maxFrames)
        {
            _maxFrames = maxFrames;
            _thread = new Thread(Loop) { IsBackground = true, Name = name };
            _thread.Start();
        }

        public override void Post(SendOrPostCallback d, object? state)
        {
            _queue.Enqueue((d, state));
            _ready.Release();
        }

        public override void Send(SendOrPostCallback d, object? state) => throw new NotSupportedException("IO workers never block on each other");

        public override SynchronizationContext CreateCopy() => this;

        public Task<T> RunAsync<T>(Func<Worker, Task<T>> request)
        {
            // The request goes on where its filters finished: the caller's continuation runs on this worker.
            var completion = new TaskCompletionSource<T>();
            Post(static state =>
            {
                var (worker, run, done) = ((Worker, Func<Worker, Task<T>>, TaskCompletionSource<T>))state!;
                Task<T> task;
                try
                {
                    task = run(worker);
                }
                catch (Exception e)
                {
                    done.SetException(e);
                    return;
                }
                CompleteWhenDone(task, done);
            }, (this, request, completion));
            return completion.Task;
        }

        /// <summary>A task that completes as <paramref name="task"/> does, by <see cref="Complete{T}"/>, on the thread completing it.</summary>
        public static Task<T> CompleteOnWorker<T>(Task<T> task)
        {
            var completion = new TaskCompletionSource<T>();
            CompleteWhenDone(task, completion);
            return completion.Task;
        }

        private static void CompleteWhenDone<T>(Task<T> task, TaskCompletionSource<T> done)
        {
            if (task.IsCompleted) Complete(done, task);
            else task.ContinueWith(static (t, d) => Complete((TaskCompletionSource<T>)d!, t), done, TaskContinuationOptions.ExecuteSynchronously);
        }

        /// <summary>
        /// Completes a request so that its caller goes on right here, on this thread, without a context (the
        /// runtime runs an awaiting continuation inline only where no synchronization context is set); the IO
        /// that follows finds itself on a worker and makes no further hop.
        /// </summary>
        private static void Complete<T>(TaskCompletionSource<T> done, Task<T> task)
        {
            var context = SynchronizationContext.Current;
            SetSynchronizationContext(null);
            try
            {
                if (task.IsCompletedSuccessfully) done.SetResult(task.Result);
                else if (task.IsCanceled) done.SetCanceled();
                else done.SetException(task.Exception!.InnerExceptions);
            }
            finally
            {
                SetSynchronizationContext(context);
            }
        }

        /// <summary>A kernel stack from this worker's pool (called on the worker).</summary>
        public KernelStack RentStack() => _stacks.TryPop(out var stack) ? stack : new KernelStack(_maxFrames);

        /// <summary>Back to the pool, cleared (called on the worker; a stack released elsewhere is simply dropped).</summary>
        public void ReturnStack(KernelStack stack)
        {
            stack.Release();
            if (Thread.CurrentThread == _thread && _stacks.Count < 256) _stacks.Push(stack);
        }

        private void Loop()
        {
            t_worker = this;
            SetSynchronizationContext(this);
            while (true)
            {
                // Spin briefly before parking: under IO the next request usually arrives within microseconds, and
                // waking a parked thread costs more than that.
                if (!_ready.Wait(0))
                {
                    var spinner = new SpinWait();
                    while (!spinner.NextSpinWillYield && _queue.IsEmpty) spinner.SpinOnce();
                    _ready.Wait();
                }
                if (_stopping && _queue.IsEmpty) return;
                while (_queue.TryDequeue(out var item)) item.Callback(item.State);
            }
        }

        public void Dispose()
        {
            _stopping = true;
            _ready.Release();
        }
    }

    /// <summary>
    /// One dedicated thread completing waits in due order: it sleeps the whole milliseconds to the next due time,
    /// then yields the last fraction (deferrals are a few milliseconds: a coarse timer would add most of a wait
    /// again). It parks when nothing is due. Threading: thread-safe.
    /// </summary>
    internal sealed class DeferralTimer
    {
        public static DeferralTimer Shared { get; } = new("iscsisnap-timer");

        private readonly PriorityQueue<TaskCompletionSource, long> _due = new();
        private readonly object _lock = new();
        private long _earliest = long.MaxValue;   // the due time the thread sleeps towards
        private static readonly long TicksPerMillisecond = System.Diagnostics.Stopwatch.Frequency / 1000;

        private DeferralTimer(string name)
        {
            new Thread(Loop) { IsBackground = true, Name = name }.Start();
        }

        public Task DelayAsync(TimeSpan delay)
        {
            if (delay <= TimeSpan.Zero) return Task.CompletedTask;
            long due = System.Diagnostics.Stopwatch.GetTimestamp() + (long)(delay.TotalSeconds * System.Diagnostics.Stopwatch.Frequency);
            // Asynchronous continuations: the timer thread only hands them over (to the worker's queue), never runs them.
            var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            lock (_lock)
            {
                _due.Enqueue(done, due);
                if (due < _earliest) Monitor.Pulse(_lock);   // the thread sleeps towards a later time (or parks)
            }
            return done.Task;
        }

        private void Loop()
        {
            var ready = new List<TaskCompletionSource>();
            while (true)
            {
                lock (_lock)
                {
                    while (true)
                    {
                        if (!_due.TryPeek(out _, out long due))
                        {
                            _earliest = long.MaxValue;
                            Monitor.Wait(_lock);
                            continue;
                        }
                        long now = System.Diagnostics.Stopwatch.GetTimestamp();
                        if (due <= now) break;
                        _earliest = due;
                        long sleep = (due - now) / TicksPerMillisecond;   // whole milliseconds: wakes about on time, then yields the rest
                        if (sleep >= 1) Monitor.Wait(_lock, (int)Math.Min(sleep, int.MaxValue));
                        else
                        {
                            Monitor.Exit(_lock);
                            try { Thread.Yield(); }
                            finally { Monitor.Enter(_lock); }
                        }
                    }
                    long at = System.Diagnostics.Stopwatch.GetTimestamp();
                    while (_due.TryPeek(out _, out long due) && due <= at) ready.Add(_due.Dequeue());
                }
                foreach (var done in ready) done.TrySetResult();
                ready.Clear();
            }
        }
    }
}
