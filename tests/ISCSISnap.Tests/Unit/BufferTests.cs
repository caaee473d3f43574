using ISCSISnap.Storage.Buffers;
using Xunit;

namespace ISCSISnap.Tests.Unit;

/// <summary><see cref="PinnedBufferPool"/> size classes, <see cref="PinnedBlockMemoryPool"/> and <see cref="MemoryBudget"/> bounds.</summary>
public sealed class BufferTests
{
    // ---------------------------------------------------------------- PinnedBufferPool

    [Theory]
    [InlineData(0, 4096)]
    [InlineData(1, 4096)]
    [InlineData(4096, 4096)]
    [InlineData(4097, 8192)]
    [InlineData(65535, 65536)]
    [InlineData(65536, 65536)]
    [InlineData(65537, 131072)]
    [InlineData(1 << 20, 1 << 20)]
    public void Rent_rounds_up_to_a_power_of_two_size_class_of_at_least_4096(int requested, int expected)
    {
        var pool = new PinnedBufferPool(maximumSize: 1 << 20, retainedBytesPerClass: 4 << 20);
        Assert.Equal(expected, pool.Rent(requested).Length);
    }

    [Theory]
    [InlineData((1 << 20) + 1)]
    [InlineData(-1)]
    public void Rent_refuses_sizes_outside_the_pool(int requested)
    {
        var pool = new PinnedBufferPool(maximumSize: 1 << 20, retainedBytesPerClass: 4 << 20);
        Assert.Throws<ArgumentOutOfRangeException>(() => pool.Rent(requested));
    }

    [Theory]
    [InlineData(3000)]
    [InlineData(6000)]
    [InlineData(2048)]
    public void The_pool_refuses_a_maximum_that_is_not_a_power_of_two_of_at_least_4096(int maximum) =>
        Assert.Throws<ArgumentOutOfRangeException>(() => new PinnedBufferPool(maximum, 1 << 20));

    [Fact]
    public void Rented_arrays_live_on_the_pinned_heap()
    {
        var pool = new PinnedBufferPool(maximumSize: 1 << 16, retainedBytesPerClass: 1 << 20);
        // Arrays on the pinned object heap report generation 2 at once (they are never moved by the GC).
        Assert.Equal(GC.MaxGeneration, GC.GetGeneration(pool.Rent(100)));
    }

    [Fact]
    public void A_returned_array_is_reused_by_its_own_size_class_only()
    {
        var pool = new PinnedBufferPool(maximumSize: 1 << 20, retainedBytesPerClass: 4 << 20);
        var small = pool.Rent(4096);
        var large = pool.Rent(10000);
        pool.Return(small);
        pool.Return(large);
        Assert.Same(large, pool.Rent(16384));
        Assert.Same(small, pool.Rent(1));
        Assert.NotSame(small, pool.Rent(1));   // taken: a fresh array this time
    }

    [Fact]
    public void Arrays_of_foreign_sizes_are_not_taken_into_the_pool()
    {
        var pool = new PinnedBufferPool(maximumSize: 1 << 20, retainedBytesPerClass: 4 << 20);
        var foreign = new byte[5000];
        var tooLarge = new byte[2 << 20];
        pool.Return(foreign);
        pool.Return(tooLarge);
        pool.Return(new byte[100]);
        var rented = pool.Rent(5000);
        Assert.NotSame(foreign, rented);
        Assert.Equal(8192, rented.Length);
    }

    [Fact]
    public void Each_class_retains_at_most_its_byte_budget()
    {
        // 16 KiB per class: four 4 KiB arrays are kept, the fifth is dropped.
        var pool = new PinnedBufferPool(maximumSize: 1 << 16, retainedBytesPerClass: 16 * 1024);
        var arrays = Enumerable.Range(0, 5).Select(_ => pool.Rent(4096)).ToArray();
        foreach (var array in arrays) pool.Return(array);
        var again = Enumerable.Range(0, 5).Select(_ => pool.Rent(4096)).ToArray();
        Assert.Equal(4, again.Count(a => arrays.Contains(a)));
        Assert.DoesNotContain(arrays, a => ReferenceEquals(a, again[4]));
    }

    [Fact]
    public void Every_class_keeps_at_least_two_arrays_even_with_a_tiny_budget()
    {
        var pool = new PinnedBufferPool(maximumSize: 1 << 16, retainedBytesPerClass: 1);
        var a = pool.Rent(65536);
        var b = pool.Rent(65536);
        var c = pool.Rent(65536);
        pool.Return(a);
        pool.Return(b);
        pool.Return(c);
        var again = new[] { pool.Rent(65536), pool.Rent(65536), pool.Rent(65536) };
        Assert.Same(a, again[0]);
        Assert.Same(b, again[1]);
        Assert.NotSame(c, again[2]);
    }

    // ---------------------------------------------------------------- PinnedBlockMemoryPool

    [Fact]
    public void Block_pool_hands_out_fixed_blocks_and_refuses_larger_requests()
    {
        var pool = new PinnedBlockMemoryPool(blockSize: 8192, maxRetainedBlocks: 4);
        using var owner = pool.Rent(100);
        Assert.Equal(8192, owner.Memory.Length);
        Assert.Equal(8192, pool.MaxBufferSize);
        Assert.Throws<ArgumentOutOfRangeException>(() => pool.Rent(8193));
    }

    [Fact]
    public void A_disposed_block_is_reused_once_even_if_disposed_twice()
    {
        var pool = new PinnedBlockMemoryPool(blockSize: 4096, maxRetainedBlocks: 4);
        var first = pool.Rent();
        first.Memory.Span[0] = 42;
        first.Dispose();
        first.Dispose();   // a double return must not put the block in the pool twice
        var a = pool.Rent();
        var b = pool.Rent();
        Assert.Same(first, a);
        Assert.NotSame(a, b);
        Assert.Equal(42, a.Memory.Span[0]);
    }

    // ---------------------------------------------------------------- MemoryBudget

    [Fact]
    public void Budget_reserves_only_what_is_available_and_release_gives_it_back()
    {
        var budget = new MemoryBudget(1000);
        Assert.Equal(1000, budget.Capacity);
        Assert.True(budget.TryReserve(600));
        Assert.Equal(400, budget.Available);
        Assert.False(budget.TryReserve(401));
        Assert.Equal(400, budget.Available);   // a refused reservation takes nothing
        Assert.True(budget.TryReserve(400));
        Assert.Equal(0, budget.Available);
        Assert.False(budget.TryReserve(1));
        Assert.True(budget.TryReserve(0));
        budget.Release(600);
        Assert.Equal(600, budget.Available);
        Assert.True(budget.TryReserve(600));
    }

    [Fact]
    public async Task Concurrent_reservations_never_overcommit_the_budget()
    {
        var budget = new MemoryBudget(100);
        int granted = 0;
        var workers = Enumerable.Range(0, 4).Select(_ => Task.Run(() =>
        {
            for (int i = 0; i < 10_000; i++)
                if (budget.TryReserve(3)) Interlocked.Increment(ref granted);
        })).ToArray();
        await Task.WhenAll(workers);
        Assert.Equal(33, granted);         // floor(100 / 3): never one more
        Assert.Equal(1, budget.Available);
    }

    [Fact]
    public async Task Concurrent_reserve_and_release_balance_out()
    {
        var budget = new MemoryBudget(64);
        long lowest = long.MaxValue;
        var workers = Enumerable.Range(0, 4).Select(w => Task.Run(() =>
        {
            for (int i = 0; i < 20_000; i++)
            {
                if (!budget.TryReserve(16)) continue;
                long available = budget.Available;
                InterlockedMin(ref lowest, available);
                budget.Release(16);
            }
        })).ToArray();
        await Task.WhenAll(workers);
        Assert.Equal(64, budget.Available);
        Assert.True(lowest >= 0, $"available went down to {lowest}");
    }

    private static void InterlockedMin(ref long target, long value)
    {
        long current = Volatile.Read(ref target);
        while (value < current)
        {
            long seen = Interlocked.CompareExchange(ref target, value, current);
            if (seen == current) return;
            current = seen;
        }
    }
}

public sealed class SessionBufferBudgetTests
{
    [Fact]
    public void One_session_exhausting_its_share_leaves_buffers_for_another()
    {
        var greedy = new ISCSISnap.Storage.Buffers.MemoryBudget(8 << 20);
        var other = new ISCSISnap.Storage.Buffers.MemoryBudget(8 << 20);
        var held = new List<ISCSISnap.Target.Scsi.ScsiCommand>();
        for (int i = 0; i < 2; i++)
        {
            var command = new ISCSISnap.Target.Scsi.ScsiCommand { SessionBudget = greedy };
            Assert.True(command.TryEnsureBuffer(4 << 20));
            held.Add(command);
        }
        var refused = new ISCSISnap.Target.Scsi.ScsiCommand { SessionBudget = greedy };
        Assert.False(refused.TryEnsureBuffer(4 << 20));          // its share is spent: TASK SET FULL for it
        Assert.Equal(0, greedy.Available);

        var fine = new ISCSISnap.Target.Scsi.ScsiCommand { SessionBudget = other };
        Assert.True(fine.TryEnsureBuffer(4 << 20));              // another session is not starved
        fine.ReleaseBuffer();
        foreach (var command in held) command.ReleaseBuffer();
        Assert.Equal(8 << 20, greedy.Available);                  // released back to the session
        Assert.True(refused.TryEnsureBuffer(4 << 20));
        refused.ReleaseBuffer();
    }
}
