using System.Buffers;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Disks;
using ISCSISnap.Storage.Filters;
using ISCSISnap.Storage.Filters.Cache;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Filters;

/// <summary>
/// The cache syscalls over real chains: a small read-cache filter (the shape of the snapshot cache) resolves each
/// read's owning layer, answers from the cache by (disk ID, offset) or reads the layer and caches it, so two linked
/// clones share the base's cached blocks; the syscalls check rights, ranges, alignment and the chain.
/// </summary>
public sealed class CacheSyscallTests : DiskManagerTest
{

    /// <summary>Caches whole-block reads that one layer owns; everything else passes.</summary>
    private sealed class ReadCache : IIoFilter
    {
        public string Name => "read-cache";

        public async ValueTask<FilterVerdict> OnReadAsync(Upcall upcall)
        {
            var request = upcall.Request;
            if (request.Length % 4096 != 0 || request.Offset % 4096 != 0) return FilterVerdict.Pass;
            var (owner, bytes) = upcall.Syscalls.ResolveOwner(request.Offset);
            if (owner == Guid.Empty || bytes < request.Length) return FilterVerdict.Pass;   // unwritten, or several layers
            if (await upcall.Syscalls.CacheGetAsync(owner, request.Offset, upcall.ReadBuffer))
            {
                upcall.Syscalls.Count("hit");
                return FilterVerdict.Complete;
            }
            var status = await upcall.Syscalls.ReadLayerAsync(owner, request.Offset, upcall.ReadBuffer);
            if (status != IoStatus.Ok) return FilterVerdict.Fail(status);
            await upcall.Syscalls.CachePutAsync(owner, request.Offset, upcall.ReadBuffer);
            upcall.Syscalls.Count("miss");
            return FilterVerdict.Complete;
        }

        public async ValueTask<FilterVerdict> OnWriteAsync(Upcall upcall)
        {
            // Once the write has landed in the head, the head's cached copies of those blocks (if any) are stale;
            // the frozen layers' are not.
            if (upcall.Phase == FilterPhase.Before) return FilterVerdict.Transform;
            var request = upcall.Request;
            var (owner, _) = upcall.Syscalls.ResolveOwner(request.Offset);
            if (owner != Guid.Empty && request.Offset % 4096 == 0 && request.Length % 4096 == 0)
                await upcall.Syscalls.CacheInvalidateAsync(owner, request.Offset, request.Length);
            return FilterVerdict.Pass;
        }
    }

    private static RequestContext Request(IoOperation op, long offset, int length) =>
        new("lun", "iqn.test:init", "nexus", op, offset, length, DateTimeOffset.UtcNow.AddSeconds(30));

    private static async Task<byte[]> ReadAsync(FilterEngine engine, long offset, int length)
    {
        var buffer = new byte[length];
        Assert.Equal(IoStatus.Ok, await engine.ReadAsync(Request(IoOperation.Read, offset, length), buffer));
        return buffer;
    }

    [Fact]
    public async Task Linked_clones_share_the_base_blocks_cached_by_disk_id_and_writes_stay_visible()
    {
        var disk = await _manager.CreateAsync("base", 16L << 20, 512, blockSize: 1 << 20);
        var device = await _manager.AttachAsync(disk.Id);
        var content = new byte[1 << 20];
        new Random(8).NextBytes(content);
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(0, new ReadOnlySequence<byte>(content), WriteFlags.None));
        var snapshot = await _manager.SnapshotAsync(disk.Id, "gold");
        var clone = await _manager.CloneAsync(snapshot.Id, "clone");
        var cloneDevice = await _manager.AttachAsync(clone.Id);

        var cache = new MemoryBlockCache(4L << 20);
        var first = new FilterEngine(device, "a", cache: cache);
        var second = new FilterEngine(cloneDevice, "b", cache: cache);
        var slotA = first.Add(new ReadCache());
        var slotB = second.Add(new ReadCache());

        for (int i = 0; i < 16; i++) Assert.Equal(content.AsSpan(i * 4096, 4096).ToArray(), await ReadAsync(first, i * 4096, 4096));
        Assert.Equal(16, slotA.Counters["miss"]);
        // The clone reads the same base blocks: all hits on what LUN a cached.
        for (int i = 0; i < 16; i++) Assert.Equal(content.AsSpan(i * 4096, 4096).ToArray(), await ReadAsync(second, i * 4096, 4096));
        Assert.Equal(16, slotB.Counters["hit"]);
        Assert.False(slotB.Counters.ContainsKey("miss"));

        // A write into the clone's head: the next read resolves to the head, not the cached base block.
        var fresh = new byte[4096];
        fresh.AsSpan().Fill(0xC3);
        Assert.Equal(IoStatus.Ok, await second.WriteAsync(Request(IoOperation.Write, 8192, 4096), new ReadOnlySequence<byte>(fresh), WriteFlags.None));
        Assert.Equal(fresh, await ReadAsync(second, 8192, 4096));
        Assert.Equal(content.AsSpan(8192, 4096).ToArray(), await ReadAsync(first, 8192, 4096));
        Assert.Equal(1, slotB.Counters["miss"]);                     // the clone's head block, cached under the head's ID
        Assert.Equal(1, slotB.SyscallCount("cache_put"));
        Assert.Equal(1, slotB.SyscallCount("cache_invalidate"));
    }

    [Fact]
    public async Task Cache_syscalls_are_checked_and_refused_without_a_cache_or_the_right()
    {
        var disk = await _manager.CreateAsync("checked", 16L << 20, 512, blockSize: 1 << 20);
        var device = await _manager.AttachAsync(disk.Id);
        Assert.Equal(IoStatus.Ok, await device.WriteAsync(0, new ReadOnlySequence<byte>(new byte[65536]), WriteFlags.None));
        var other = await _manager.CreateAsync("other", 16L << 20, 512, blockSize: 1 << 20);
        var cache = new MemoryBlockCache(1L << 20);

        async Task<string?> RefusalAsync(FilterEngine engine, Func<Upcall, ValueTask> call, FilterOptions? options = null)
        {
            string? refused = null;
            var probe = new Probe(async u =>
            {
                try { await call(u); }
                catch (SyscallRefusedException e) { refused = e.Message; }
            });
            engine.Add(probe, options);
            await ReadAsync(engine, 0, 8192);
            engine.Remove(probe.Name);
            return refused;
        }

        var engine = new FilterEngine(device, "lun", cache: cache);
        Assert.Null(await RefusalAsync(engine, async u => await u.Syscalls.CacheGetAsync(disk.HeadId, 0, new byte[8192])));
        Assert.Contains("not whole 4096-byte cache blocks", await RefusalAsync(engine, async u => await u.Syscalls.CacheGetAsync(disk.HeadId, 0, new byte[512])));
        Assert.Contains("inside the request", await RefusalAsync(engine, async u => await u.Syscalls.CachePutAsync(disk.HeadId, 8192, new byte[4096])));
        Assert.Contains("not a layer of this LUN", await RefusalAsync(engine, async u => await u.Syscalls.CacheGetAsync(other.HeadId, 0, new byte[4096])));
        Assert.Contains("lacks the Cache right", await RefusalAsync(engine, async u => await u.Syscalls.CacheInvalidateAsync(disk.HeadId, 0, 4096),
            new FilterOptions { Rights = FilterRights.Read }));
        var uncached = new FilterEngine(device, "lun2");
        Assert.Contains("no block cache", await RefusalAsync(uncached, async u => await u.Syscalls.CacheGetAsync(disk.HeadId, 0, new byte[4096])));
    }

    private sealed class Probe(Func<Upcall, Task> body) : IIoFilter
    {
        public string Name => "probe";
        public async ValueTask<FilterVerdict> OnReadAsync(Upcall upcall)
        {
            await body(upcall);
            return FilterVerdict.Pass;
        }
        public ValueTask<FilterVerdict> OnWriteAsync(Upcall upcall) => new(FilterVerdict.Pass);
    }

    [Fact]
    public async Task The_memory_cache_evicts_least_recently_used_blocks_and_reuses_their_arrays()
    {
        var cache = new MemoryBlockCache(3 * 4096);
        var disk = Guid.NewGuid();
        for (int i = 0; i < 3; i++) await cache.PutAsync(disk, i * 4096L, Block(i));
        var buffer = new byte[4096];
        Assert.True(await cache.GetAsync(disk, 0, buffer));          // block 0 is now the most recent
        await cache.PutAsync(disk, 3 * 4096L, Block(3));              // evicts block 1
        Assert.False(await cache.GetAsync(disk, 4096, buffer));
        Assert.True(await cache.GetAsync(disk, 3 * 4096L, buffer));
        Assert.Equal(Block(3), buffer);
        Assert.True(await cache.GetAsync(disk, 0, buffer));
        Assert.Equal(Block(0), buffer);
        await cache.InvalidateAsync(disk, 0, 8192);
        Assert.False(await cache.GetAsync(disk, 0, buffer));
        Assert.False(await cache.GetAsync(Guid.NewGuid(), 3 * 4096L, buffer));   // keyed by disk ID
        Assert.Equal(1, cache.Evictions);
        Assert.Throws<ArgumentException>(() => { cache.PutAsync(disk, 100, Block(0)); });

        static byte[] Block(int seed)
        {
            var data = new byte[4096];
            new Random(seed).NextBytes(data);
            return data;
        }
    }
}
