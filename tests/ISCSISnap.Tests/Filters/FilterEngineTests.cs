using System.Buffers;
using System.Collections.Concurrent;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Filters;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Filters;

/// <summary>The filter engine without worker threads (requests run on the caller's flow).</summary>
public sealed class FilterEngineTests : FilterEngineTestsBase
{
    protected override KernelContext? Kernel => null;
}

/// <summary>The same, with requests run on the kernel context's IO worker threads.</summary>
public sealed class FilterEngineOnWorkersTests : FilterEngineTestsBase
{
    private readonly KernelContext _kernel = new(workers: 1, maxDepth: 8, name: "test-io");
    protected override KernelContext? Kernel => _kernel;

    public override async Task DisposeAsync()
    {
        await base.DisposeAsync();
        _kernel.Dispose();
    }

    [Fact]
    public async Task Filters_run_on_the_worker_which_serves_other_requests_while_an_upcall_waits()
    {
        var gate = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var threads = new ConcurrentQueue<string?>();
        var waiting = NewEngine(name: "waiting");
        waiting.Add(new Lambda("waits", async u =>
        {
            threads.Enqueue(Thread.CurrentThread.Name);
            await gate.Task;   // a long syscall, say
            return FilterVerdict.Pass;
        }));
        var other = NewEngine(name: "other");
        other.Add(new Lambda("quick", u =>
        {
            threads.Enqueue(Thread.CurrentThread.Name);
            return Verdict(FilterVerdict.Pass);
        }));
        var first = waiting.ReadAsync(Read(0, 4096), new byte[4096]).AsTask();
        var buffer = new byte[4096];
        // One worker only: the second request is served while the first one's upcall is still waiting.
        Assert.Equal(IoStatus.Ok, await other.ReadAsync(Read(4096, 4096), buffer).AsTask().WaitAsync(TimeSpan.FromSeconds(5)));
        Assert.False(first.IsCompleted);
        gate.SetResult();
        Assert.Equal(IoStatus.Ok, await first.WaitAsync(TimeSpan.FromSeconds(5)));
        Assert.All(threads, name => Assert.Equal("test-io-0", name));
    }
}

/// <summary>The filter engine over a real file device: order, verdicts, transforms, nesting, faults, budgets, live changes.</summary>
public abstract class FilterEngineTestsBase : IAsyncLifetime
{
    protected abstract KernelContext? Kernel { get; }

    protected FilterEngine NewEngine(int maxDepth = 8, string name = "lun0") => new(_device, name, maxDepth, kernel: Kernel);

    private const int Size = 4 << 20;
    private readonly TempDirectory _directory = new();
    protected FileBlockDevice _device = null!;
    private readonly byte[] _content = new byte[Size];

    public async Task InitializeAsync()
    {
        new Random(1).NextBytes(_content);
        string path = Path.Combine(_directory.Path, "disk.img");
        File.WriteAllBytes(path, _content);
        _device = FileBlockDevice.Open(path);
        await Task.CompletedTask;
    }

    public virtual async Task DisposeAsync()
    {
        await _device.DisposeAsync();
        _directory.Dispose();
    }

    protected static RequestContext Read(long offset, int length) =>
        new("lun0", "iqn.test:init", "nexus", IoOperation.Read, offset, length, DateTimeOffset.UtcNow.AddSeconds(30));

    protected static RequestContext Write(long offset, int length) => Read(offset, length) with { Operation = IoOperation.Write };

    /// <summary>A filter made of two functions.</summary>
    protected sealed class Lambda(string name, Func<Upcall, ValueTask<FilterVerdict>> read, Func<Upcall, ValueTask<FilterVerdict>>? write = null) : IIoFilter
    {
        public string Name => name;
        public ValueTask<FilterVerdict> OnReadAsync(Upcall upcall) => read(upcall);
        public ValueTask<FilterVerdict> OnWriteAsync(Upcall upcall) => (write ?? read)(upcall);
    }

    protected static ValueTask<FilterVerdict> Verdict(FilterVerdict verdict) => ValueTask.FromResult(verdict);

    [Fact]
    public async Task Without_filters_a_read_is_the_device_read()
    {
        var engine = NewEngine();
        var buffer = new byte[8192];
        Assert.Equal(IoStatus.Ok, await engine.ReadAsync(Read(4096, 8192), buffer));
        Assert.Equal(_content.AsSpan(4096, 8192).ToArray(), buffer);
    }

    [Fact]
    public async Task Filters_see_requests_top_down_and_transformed_reads_bottom_up()
    {
        var calls = new ConcurrentQueue<string>();
        var engine = NewEngine();
        foreach (var name in new[] { "a", "b", "c" })
            engine.Add(new Lambda(name, u =>
            {
                calls.Enqueue($"{name}:{u.Phase}:{u.Depth}");
                return Verdict(u.Phase == FilterPhase.Before && name != "b" ? FilterVerdict.Transform : FilterVerdict.Pass);
            }));
        Assert.Equal(IoStatus.Ok, await engine.ReadAsync(Read(0, 4096), new byte[4096]));
        Assert.Equal(["a:Before:1", "b:Before:1", "c:Before:1", "c:AfterRead:1", "a:AfterRead:1"], calls);
    }

    [Fact]
    public async Task Complete_answers_without_the_device_and_fail_returns_the_filters_status()
    {
        var engine = NewEngine();
        engine.Add(new Lambda("hit", u =>
        {
            u.ReadBuffer.Span.Fill(0x5A);
            return Verdict(FilterVerdict.Complete);
        }));
        var buffer = new byte[4096];
        Assert.Equal(IoStatus.Ok, await engine.ReadAsync(Read(0, 4096), buffer));
        Assert.All(buffer, b => Assert.Equal(0x5A, b));

        engine.Remove("hit");
        engine.Add(new Lambda("refuse", _ => Verdict(FilterVerdict.Fail(IoStatus.ReadError))));
        Assert.Equal(IoStatus.ReadError, await engine.ReadAsync(Read(0, 4096), buffer));
        Assert.Equal(1, engine.Filters[0].VerdictCount(VerdictKind.Fail));
    }

    [Fact]
    public async Task Defer_runs_the_filter_again_after_the_delay()
    {
        int calls = 0;
        var engine = NewEngine();
        engine.Add(new Lambda("throttle", _ => Verdict(Interlocked.Increment(ref calls) < 3 ? FilterVerdict.Defer(20) : FilterVerdict.Pass)));
        var clock = System.Diagnostics.Stopwatch.StartNew();
        Assert.Equal(IoStatus.Ok, await engine.ReadAsync(Read(0, 4096), new byte[4096]));
        Assert.Equal(3, calls);
        Assert.True(clock.ElapsedMilliseconds >= 35, $"{clock.ElapsedMilliseconds} ms");
        Assert.Equal(2, engine.Filters[0].VerdictCount(VerdictKind.Defer));
    }

    [Fact]
    public async Task A_transforming_filter_rewrites_writes_on_the_way_down_and_reads_on_the_way_up()
    {
        static void Xor(Span<byte> data) { foreach (ref byte b in data) b ^= 0xA5; }
        var engine = NewEngine();
        engine.Add(new Lambda("xor",
            read: u =>
            {
                if (u.Phase == FilterPhase.AfterRead) Xor(u.ReadBuffer.Span);
                return Verdict(u.Phase == FilterPhase.Before ? FilterVerdict.Transform : FilterVerdict.Pass);
            },
            write: u =>
            {
                var scratch = u.Syscalls.Allocate((int)u.WriteData.Length);
                u.WriteData.CopyTo(scratch.Memory.Span);
                Xor(scratch.Memory.Span);
                u.Syscalls.ReplaceWriteData(scratch);
                return Verdict(FilterVerdict.Transform);
            }));
        var data = new byte[8192];
        new Random(2).NextBytes(data);
        Assert.Equal(IoStatus.Ok, await engine.WriteAsync(Write(65536, 8192), new ReadOnlySequence<byte>(data), WriteFlags.None));
        var raw = new byte[8192];
        Assert.Equal(IoStatus.Ok, await _device.ReadAsync(65536, raw));
        Xor(raw);
        Assert.Equal(data, raw);   // the device holds the transformed data
        var back = new byte[8192];
        Assert.Equal(IoStatus.Ok, await engine.ReadAsync(Read(65536, 8192), back));
        Assert.Equal(data, back);   // and reads through the filter give the original
    }

    [Fact]
    public async Task Syscalls_below_a_filter_run_the_filters_below_by_nested_upcalls_up_to_the_depth_limit()
    {
        var depths = new ConcurrentQueue<string>();
        var statuses = new ConcurrentQueue<IoStatus>();
        var engine = NewEngine(maxDepth: 2);
        foreach (var name in new[] { "f1", "f2", "f3" })
            engine.Add(new Lambda(name, async u =>
            {
                depths.Enqueue($"{name}@{u.Depth}");
                if (name == "f3") return FilterVerdict.Pass;
                var status = await u.Syscalls.ReadBelowAsync(u.Request.Offset, new byte[u.Request.Length]);
                statuses.Enqueue(status);
                return status == IoStatus.Ok ? FilterVerdict.Pass : FilterVerdict.Fail(status);
            }));
        // f1 (depth 1) reads below: f2 runs nested (depth 2); f2's own read below would need depth 3: refused cleanly.
        Assert.Equal(IoStatus.NotReady, await engine.ReadAsync(Read(0, 4096), new byte[4096]));
        Assert.Equal(["f1@1", "f2@2"], depths);
        Assert.Equal([IoStatus.NotReady, IoStatus.NotReady], statuses);
        Assert.All(engine.Filters, f => Assert.Equal(0, f.Faults));

        var deeper = NewEngine(maxDepth: 4);
        depths.Clear();
        foreach (var slot in engine.Filters) deeper.Add(slot.Filter);
        Assert.Equal(IoStatus.Ok, await deeper.ReadAsync(Read(0, 4096), new byte[4096]));
        // f1's read below runs f2 (which reads below: f3) and f3; then, as f1 passed, f2 and f3 see the request itself.
        Assert.Equal(["f1@1", "f2@2", "f3@3", "f3@2", "f2@1", "f3@2", "f3@1"], depths);
    }

    [Fact]
    public async Task A_filter_that_overruns_its_deadline_is_bypassed_and_its_late_syscalls_are_refused()
    {
        var late = new TaskCompletionSource<Exception?>();
        // The filter waits for the test itself, not for a timer: however late timers fire on a busy machine, the
        // deadline passes first.
        var release = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var engine = NewEngine();
        engine.Add(new Lambda("slow", async u =>
        {
            await release.Task;
            try
            {
                u.Syscalls.Count("late");
                late.SetResult(null);
            }
            catch (Exception e)
            {
                late.SetResult(e);
            }
            return FilterVerdict.Complete;
        }), new FilterOptions { UpcallDeadline = TimeSpan.FromMilliseconds(50), OnFault = FailurePolicy.Bypass });
        var buffer = new byte[4096];
        Assert.Equal(IoStatus.Ok, await engine.ReadAsync(Read(0, 4096), buffer));
        Assert.Equal(_content.AsSpan(0, 4096).ToArray(), buffer);   // bypassed: the device answered
        Assert.Equal(1, engine.Filters[0].Faults);
        release.SetResult();
        Assert.IsType<SyscallRefusedException>(await late.Task.WaitAsync(TimeSpan.FromSeconds(5)));
    }

    [Fact]
    public async Task A_throwing_filter_fails_by_its_policy_and_is_quarantined_after_repeated_faults()
    {
        int calls = 0;
        var engine = NewEngine();
        engine.Add(new Lambda("broken", _ =>
        {
            Interlocked.Increment(ref calls);
            throw new InvalidOperationException("bug");
        }), new FilterOptions { OnFault = FailurePolicy.Fail, FailureStatus = IoStatus.ReadError, QuarantineAfterFaults = 3 });
        for (int i = 0; i < 5; i++) Assert.Equal(IoStatus.ReadError, await engine.ReadAsync(Read(0, 4096), new byte[4096]));
        Assert.Equal(3, calls);   // quarantined after the third fault: not called again
        Assert.True(engine.Filters[0].IsQuarantined);
        Assert.Equal(3, engine.Filters[0].Faults);
    }

    [Theory]
    [InlineData("syscalls")]
    [InlineData("scratch")]
    [InlineData("rights")]
    [InlineData("range")]
    public async Task Syscalls_outside_budgets_rights_or_the_request_fault_the_filter(string broken)
    {
        var engine = NewEngine();
        var options = new FilterOptions { MaxSyscallsPerUpcall = 2, MaxScratchBytes = 8192, Rights = FilterRights.Read, OnFault = FailurePolicy.Fail, FailureStatus = IoStatus.WriteError };
        engine.Add(new Lambda("greedy", async u =>
        {
            switch (broken)
            {
                case "syscalls":
                    for (int i = 0; i < 3; i++) u.Syscalls.Count("n");
                    break;
                case "scratch":
                    u.Syscalls.Allocate(4096);
                    u.Syscalls.Allocate(8192);
                    break;
                case "rights":
                    await u.Syscalls.WriteBelowAsync(u.Request.Offset, new byte[4096]);
                    break;
                case "range":
                    await u.Syscalls.ReadBelowAsync(u.Request.Offset + 4096, new byte[4096]);
                    break;
            }
            return FilterVerdict.Pass;
        }), options);
        Assert.Equal(IoStatus.WriteError, await engine.ReadAsync(Read(0, 4096), new byte[4096]));
        Assert.Equal(1, engine.Filters[0].Faults);
    }

    [Fact]
    public async Task Filters_come_and_go_while_reads_run_and_every_read_is_right()
    {
        var engine = NewEngine();
        using var stop = new CancellationTokenSource();
        int reads = 0;
        var readers = Enumerable.Range(0, 4).Select(seed => Task.Run(async () =>
        {
            var random = new Random(seed);
            var buffer = new byte[4096];
            while (!stop.IsCancellationRequested)
            {
                long offset = random.Next(Size / 4096) * 4096L;
                Assert.Equal(IoStatus.Ok, await engine.ReadAsync(Read(offset, 4096), buffer));
                Assert.True(buffer.AsSpan().SequenceEqual(_content.AsSpan((int)offset, 4096)));
                Interlocked.Increment(ref reads);
            }
        })).ToArray();
        for (int round = 0; round < 200; round++)
        {
            engine.Add(new Lambda($"pass{round % 3}", async u =>
            {
                var below = new byte[u.Request.Length];
                var status = await u.Syscalls.ReadBelowAsync(u.Request.Offset, below);
                return status == IoStatus.Ok ? FilterVerdict.Pass : FilterVerdict.Fail(status);
            }), position: round % 2);
            await Task.Delay(1);
            if (round % 3 == 2) foreach (var slot in engine.Filters.ToList()) engine.Remove(slot.Name);
        }
        stop.Cancel();
        await Task.WhenAll(readers);
        Assert.True(reads > 100, $"{reads} reads");
    }

    [Fact]
    public async Task A_write_transform_that_keeps_the_data_is_called_again_once_the_write_is_done()
    {
        var calls = new ConcurrentQueue<string>();
        var engine = NewEngine();
        engine.Add(new Lambda("recorder", _ => Verdict(FilterVerdict.Pass), u =>
        {
            calls.Enqueue($"{u.Phase}:{u.WriteData.Length}");
            return Verdict(u.Phase == FilterPhase.Before ? FilterVerdict.Transform : FilterVerdict.Pass);
        }));
        engine.Add(new Lambda("below", _ => Verdict(FilterVerdict.Pass), u =>
        {
            calls.Enqueue($"below:{u.Phase}");
            return Verdict(FilterVerdict.Pass);
        }));
        var data = new byte[8192];
        data.AsSpan().Fill(7);
        Assert.Equal(IoStatus.Ok, await engine.WriteAsync(Write(8192, 8192), new ReadOnlySequence<byte>(data), WriteFlags.None));
        Assert.Equal(["Before:8192", "below:Before", "AfterWrite:8192"], calls);
        var back = new byte[8192];
        Assert.Equal(IoStatus.Ok, await _device.ReadAsync(8192, back));
        Assert.Equal(data, back);

        // A failed write is not reported to the filter as done.
        engine.Remove("below");
        engine.Add(new Lambda("refuse", _ => Verdict(FilterVerdict.Pass), _ => Verdict(FilterVerdict.Fail(IoStatus.WriteError))));
        calls.Clear();
        Assert.Equal(IoStatus.WriteError, await engine.WriteAsync(Write(0, 4096), new ReadOnlySequence<byte>(new byte[4096]), WriteFlags.None));
        Assert.Equal(["Before:4096"], calls);
    }

    private sealed class Disposable(string name, Func<Upcall, ValueTask<FilterVerdict>> read) : IIoFilter, IDisposable
    {
        public volatile bool Disposed;
        public volatile bool UsedAfterDispose;
        public string Name => name;
        public ValueTask<FilterVerdict> OnReadAsync(Upcall upcall)
        {
            if (Disposed) UsedAfterDispose = true;
            return read(upcall);
        }
        public ValueTask<FilterVerdict> OnWriteAsync(Upcall upcall) => OnReadAsync(upcall);
        public void Dispose() => Disposed = true;
    }

    [Fact]
    public async Task A_removed_filter_is_disposed_only_after_the_requests_that_started_with_it_are_done()
    {
        var engine = NewEngine();
        var gate = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var entered = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var filter = new Disposable("slow", u =>
        {
            if (u.Phase == FilterPhase.Before) return Verdict(FilterVerdict.Transform);
            entered.TrySetResult();
            return new ValueTask<FilterVerdict>(gate.Task.ContinueWith(_ => FilterVerdict.Pass));
        });
        engine.Add(filter);
        var read = engine.ReadAsync(Read(0, 4096), new byte[4096]).AsTask();
        await entered.Task.WaitAsync(TimeSpan.FromSeconds(5));

        var removal = engine.RemoveAsync("slow");
        Assert.True(engine.IsEmpty);                       // new requests no longer see it at once
        Assert.Equal(IoStatus.Ok, await engine.ReadAsync(Read(0, 4096), new byte[4096]));
        await Task.Delay(50);
        Assert.False(removal.IsCompleted);                 // the first request still runs on the old stack
        Assert.False(filter.Disposed);
        gate.SetResult();
        Assert.Equal(IoStatus.Ok, await read.WaitAsync(TimeSpan.FromSeconds(5)));
        Assert.True(await removal.WaitAsync(TimeSpan.FromSeconds(5)));
        Assert.True(filter.Disposed);
        Assert.False(filter.UsedAfterDispose);
        Assert.False(await engine.RemoveAsync("slow"));
    }

    [Fact]
    public async Task A_filter_that_blocks_its_thread_past_the_deadline_is_a_fault_handled_by_its_policy()
    {
        var engine = NewEngine();
        var slot = engine.Add(new Lambda("blocker", _ =>
        {
            Thread.Sleep(120);   // blocks instead of awaiting
            return Verdict(FilterVerdict.Complete);
        }), new FilterOptions { UpcallDeadline = TimeSpan.FromMilliseconds(30), OnFault = FailurePolicy.Fail, FailureStatus = IoStatus.NotReady });
        Assert.Equal(IoStatus.NotReady, await engine.ReadAsync(Read(0, 4096), new byte[4096]));
        Assert.Equal(1, slot.Faults);
        Assert.Equal(0, slot.VerdictCount(VerdictKind.Complete));
    }
}
