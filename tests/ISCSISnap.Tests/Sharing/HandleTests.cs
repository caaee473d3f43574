using ISCSISnap.SharingPeer;
using ISCSISnap.Storage.Sharing;
using ISCSISnap.Tests.Fuzz;
using Xunit;

namespace ISCSISnap.Tests.Sharing;

/// <summary>Handles and their checks, with both ends of the link in this process over a real Unix socket.</summary>
public sealed class HandleTests
{
    private const int OwnerWrites = 0, PeerWrites = 1;
    private static readonly RegionSpec[] TwoWays = [new(64 * 1024, PeerAccess.Read), new(64 * 1024, PeerAccess.ReadWrite)];

    private static void Fill(Span<byte> span, byte seed)
    {
        for (int i = 0; i < span.Length; i++) span[i] = (byte)(seed + i * 7);
    }

    [Fact]
    public async Task A_read_handle_opens_exactly_its_range_of_the_owners_bytes_and_nothing_else()
    {
        await using var pair = await LinkPair.CreateAsync(TwoWays);
        Fill(pair.Owner.GetRegionMemory(OwnerWrites, 0, 8192), 3);
        var first = pair.Owner.Grant(OwnerWrites, 0, 4096, HandleRights.Read);
        var second = pair.Owner.Grant(OwnerWrites, 4096, 4096, HandleRights.Read);

        Assert.True(pair.Peer.TryResolve(first, HandleRights.Read, out var memory, out _));
        Assert.Equal(pair.Owner.GetRegionMemory(OwnerWrites, 0, 4096).ToArray(), memory.ToArray());
        Assert.True(pair.Peer.TryResolve(second, HandleRights.Read, 100, 50, out var part, out _));
        Assert.Equal(pair.Owner.GetRegionMemory(OwnerWrites, 4196, 50).ToArray(), part.ToArray());

        // One request's data cannot be reached through another request's handle: not past its end, not before its start.
        Assert.False(pair.Peer.TryResolve(first, HandleRights.Read, 4000, 200, out _, out var refusal));
        Assert.Equal(SharingCheck.Range, refusal);
        Assert.False(pair.Peer.TryResolve(second, HandleRights.Read, -1, 10, out _, out refusal));
        Assert.Equal(SharingCheck.Range, refusal);
        Assert.False(pair.Peer.TryResolve(first, HandleRights.Read, 4097, 0, out _, out refusal));
        Assert.Equal(SharingCheck.Range, refusal);
        Assert.Equal(SharingCheck.Range, Assert.Throws<SharingException>(() => pair.Peer.Resolve(first, HandleRights.Read, 1, 4096)).Check);
        Assert.Equal(4, pair.Peer.Refusals(SharingCheck.Range));
    }

    [Fact]
    public async Task A_write_handle_carries_what_the_peer_writes_to_the_owner_and_a_read_handle_cannot_write()
    {
        await using var pair = await LinkPair.CreateAsync(TwoWays);
        var writable = pair.Owner.Grant(PeerWrites, 8192, 4096, HandleRights.Write);
        pair.Peer.Resolve(writable, HandleRights.Write).Fill(0xC3);
        Assert.All(pair.Owner.GetRegionMemory(PeerWrites, 8192, 4096).ToArray(), b => Assert.Equal(0xC3, b));
        Assert.All(pair.Owner.GetRegionMemory(PeerWrites, 4096, 4096).ToArray(), b => Assert.Equal(0, b));

        // A write-only handle cannot be read through, and a read handle cannot be written through.
        Assert.False(pair.Peer.TryResolve(writable, HandleRights.Read, out _, out var refusal));
        Assert.Equal(SharingCheck.Rights, refusal);
        var readable = pair.Owner.Grant(OwnerWrites, 0, 4096, HandleRights.Read);
        Assert.False(pair.Peer.TryResolve(readable, HandleRights.Write, out _, out refusal));
        Assert.Equal(SharingCheck.Rights, refusal);
        Assert.False(pair.Peer.TryResolve(readable, HandleRights.ReadWrite, out _, out refusal));
        Assert.Equal(SharingCheck.Rights, refusal);

        // The owner cannot even grant write access to a region the peer may only read.
        Assert.Throws<ArgumentException>(() => pair.Owner.Grant(OwnerWrites, 0, 4096, HandleRights.Write));
        Assert.Throws<ArgumentOutOfRangeException>(() => pair.Owner.Grant(PeerWrites, 60 * 1024, 8192, HandleRights.Read));
        Assert.Throws<ArgumentOutOfRangeException>(() => pair.Owner.Grant(2, 0, 1, HandleRights.Read));
    }

    [Fact]
    public async Task An_expired_handle_is_refused_on_both_sides()
    {
        await using var pair = await LinkPair.CreateAsync(TwoWays);
        var brief = pair.Owner.Grant(OwnerWrites, 0, 4096, HandleRights.Read, lifetime: TimeSpan.FromMilliseconds(1));
        var lasting = pair.Owner.Grant(OwnerWrites, 0, 4096, HandleRights.Read, lifetime: TimeSpan.FromHours(1));
        await Task.Delay(50);
        Assert.False(pair.Peer.TryResolve(brief, HandleRights.Read, out _, out var refusal));
        Assert.Equal(SharingCheck.Expiry, refusal);
        Assert.False(pair.Owner.TryResolve(brief, HandleRights.Read, out _, out refusal));
        Assert.Equal(SharingCheck.Expiry, refusal);
        Assert.True(pair.Peer.TryResolve(lasting, HandleRights.Read, out _, out _));
    }

    [Fact]
    public async Task A_revoked_handle_is_refused_at_once_and_revoking_a_peer_ends_all_its_handles()
    {
        await using var pair = await LinkPair.CreateAsync(TwoWays);
        var handles = Enumerable.Range(0, 10).Select(i => pair.Owner.Grant(OwnerWrites, i * 4096, 4096, HandleRights.Read)).ToArray();
        Assert.True(pair.Owner.Revoke(handles[3]));
        Assert.False(pair.Owner.Revoke(handles[3]));
        Assert.False(pair.Peer.TryResolve(handles[3], HandleRights.Read, out _, out var refusal));
        Assert.Equal(SharingCheck.Revoked, refusal);
        Assert.True(pair.Peer.TryResolve(handles[4], HandleRights.Read, out _, out _));

        // Its slot is granted again, under a new generation: the old handle stays dead.
        var reused = pair.Owner.Grant(OwnerWrites, 0, 4096, HandleRights.Read);
        Assert.Equal(handles[3].Slot, reused.Slot);
        Assert.NotEqual(handles[3].Generation, reused.Generation);
        Assert.False(pair.Peer.TryResolve(handles[3], HandleRights.Read, out _, out refusal));
        Assert.Equal(SharingCheck.Revoked, refusal);

        Assert.Equal(10, pair.Owner.RevokeAll());
        foreach (var handle in handles.Append(reused))
        {
            Assert.False(pair.Peer.TryResolve(handle, HandleRights.Read, out _, out refusal));
            Assert.Equal(SharingCheck.Revoked, refusal);
        }
    }

    [Fact]
    public async Task A_one_shot_handle_resolves_once_on_each_side()
    {
        await using var pair = await LinkPair.CreateAsync(TwoWays);
        var once = pair.Owner.Grant(PeerWrites, 0, 4096, HandleRights.ReadWrite, oneShot: true);
        Assert.True(pair.Peer.TryResolve(once, HandleRights.Write, out _, out _));
        Assert.False(pair.Peer.TryResolve(once, HandleRights.Read, out _, out var refusal));
        Assert.Equal(SharingCheck.OneShot, refusal);
        Assert.True(pair.Owner.TryResolve(once, HandleRights.Read, out _, out _));
        Assert.False(pair.Owner.TryResolve(once, HandleRights.Read, out _, out refusal));
        Assert.Equal(SharingCheck.OneShot, refusal);

        // A later grant in the same slot is a new handle, with its own single use.
        Assert.True(pair.Owner.Revoke(once));
        var next = pair.Owner.Grant(PeerWrites, 0, 4096, HandleRights.Read, oneShot: true);
        Assert.Equal(once.Slot, next.Slot);
        Assert.True(pair.Peer.TryResolve(next, HandleRights.Read, out _, out _));
    }

    [Fact]
    public async Task A_handle_of_another_peer_or_a_forged_one_is_refused()
    {
        await using var first = await LinkPair.CreateAsync(TwoWays);
        await using var second = await LinkPair.CreateAsync(TwoWays);
        var theirs = first.Owner.Grant(OwnerWrites, 0, 4096, HandleRights.Read);
        var ours = second.Owner.Grant(OwnerWrites, 0, 4096, HandleRights.Read);
        Assert.Equal(theirs.Slot, ours.Slot);

        Assert.False(second.Peer.TryResolve(theirs, HandleRights.Read, out _, out var refusal));
        Assert.Equal(SharingCheck.Peer, refusal);
        Assert.False(second.Owner.TryResolve(theirs, HandleRights.Read, out _, out refusal));
        Assert.Equal(SharingCheck.Peer, refusal);
        // Relabelled as ours, it names a grant that does not exist in our table.
        Assert.False(second.Peer.TryResolve(theirs with { Peer = ours.Peer, Generation = ours.Generation + 1000 }, HandleRights.Read, out _, out refusal));
        Assert.Equal(SharingCheck.Revoked, refusal);
        Assert.False(second.Peer.TryResolve(ours with { Slot = 1 << 30 }, HandleRights.Read, out _, out refusal));
        Assert.Equal(SharingCheck.Slot, refusal);
        Assert.False(second.Peer.TryResolve(ours with { Slot = 5 }, HandleRights.Read, out _, out refusal));
        Assert.Equal(SharingCheck.Revoked, refusal);
        Assert.False(second.Peer.TryResolve(default, HandleRights.Read, out _, out refusal));
        Assert.Equal(SharingCheck.Peer, refusal);
    }

    [Fact]
    public async Task A_full_table_refuses_grants_until_handles_are_revoked_or_expire()
    {
        await using var pair = await LinkPair.CreateAsync(TwoWays, new SharingLinkOptions { HandleSlots = 8 });
        var handles = Enumerable.Range(0, 8).Select(_ => pair.Owner.Grant(OwnerWrites, 0, 4096, HandleRights.Read)).ToList();
        Assert.False(pair.Owner.TryGrant(OwnerWrites, 0, 4096, HandleRights.Read, null, false, out _));
        Assert.True(pair.Owner.Revoke(handles[7]));
        var brief = pair.Owner.Grant(OwnerWrites, 0, 4096, HandleRights.Read, lifetime: TimeSpan.FromMilliseconds(1));
        await Task.Delay(20);
        // The expired grant's slot is swept when the table runs out.
        Assert.True(pair.Owner.TryGrant(OwnerWrites, 0, 4096, HandleRights.Read, null, false, out var swept));
        Assert.Equal(brief.Slot, swept.Slot);
        Assert.Equal(SharingCheck.TableFull, Assert.Throws<SharingException>(() => pair.Owner.Grant(OwnerWrites, 0, 4096, HandleRights.Read)).Check);
        Assert.True(pair.Owner.Revoke(handles[2]));
        Assert.Equal(handles[2].Slot, pair.Owner.Grant(OwnerWrites, 0, 4096, HandleRights.Read).Slot);
    }

    [Fact]
    public async Task A_constant_region_is_read_only_for_both_and_holds_its_content()
    {
        byte[] content = Enumerable.Range(0, 5000).Select(i => (byte)(i * 13)).ToArray();
        await using var pair = await LinkPair.CreateAsync([new(8192, PeerAccess.Constant, content)]);
        Assert.Equal(8192, pair.Owner.RegionLength(0));
        var handle = pair.Owner.Grant(0, 0, 5000, HandleRights.Read);
        Assert.Equal(content, pair.Peer.Resolve(handle, HandleRights.Read).ToArray());
        Assert.Throws<ArgumentException>(() => pair.Owner.Grant(0, 0, 4096, HandleRights.ReadWrite));
        Assert.Throws<ArgumentException>(() => SharedRegion.Create("content-on-a-read-region", new RegionSpec(4096, PeerAccess.Read, content)));
        Assert.Throws<ArgumentException>(() => SharedRegion.Create("content-too-large", new RegionSpec(4096, PeerAccess.Constant, content)));
    }

    [Fact]
    public async Task Refusals_are_counted_by_check_and_logged_at_most_once_per_peer_per_second()
    {
        var time = new ManualTime();
        var log = new LogCapture();
        await using var pair = await LinkPair.CreateAsync(TwoWays, new SharingLinkOptions { Time = time }, peerLogger: log.CreateLogger("peer"));
        var handle = pair.Owner.Grant(OwnerWrites, 0, 4096, HandleRights.Read);
        for (int i = 0; i < 100; i++) pair.Peer.TryResolve(handle, HandleRights.Write, out _, out _);
        for (int i = 0; i < 50; i++) pair.Peer.TryResolve(handle, HandleRights.Read, 0, 5000, out _, out _);
        Assert.Equal(100, pair.Peer.Refusals(SharingCheck.Rights));
        Assert.Equal(50, pair.Peer.Refusals(SharingCheck.Range));
        Assert.Equal(150, pair.Peer.TotalRefusals);
        Assert.Equal(0, pair.Owner.TotalRefusals);

        string[] Lines() => log.Recent.Split('\n').Where(line => line.Contains("[5001]")).ToArray();
        var first = Assert.Single(Lines());
        Assert.Contains("Rights", first);
        Assert.Contains("1 refusal(s)", first);

        time.Advance(TimeSpan.FromMilliseconds(999));
        pair.Peer.TryResolve(handle, HandleRights.Write, out _, out _);
        Assert.Single(Lines());
        time.Advance(TimeSpan.FromMilliseconds(1));
        pair.Peer.TryResolve(handle, HandleRights.Read, 0, 5000, out _, out _);
        Assert.Equal(2, Lines().Length);
        Assert.Contains("151 refusal(s)", Lines()[1]);
        Assert.Contains("Range", Lines()[1]);
    }

    [Fact]
    public async Task Grants_and_revocations_racing_resolutions_never_yield_another_grants_bytes()
    {
        await using var pair = await LinkPair.CreateAsync([new(64 * 4096, PeerAccess.Read)], new SharingLinkOptions { HandleSlots = 16 });
        for (int page = 0; page < 64; page++) pair.Owner.GetRegionMemory(0, page * 4096L, 4096).Fill((byte)page);
        var live = new System.Runtime.CompilerServices.StrongBox<SharedHandle>?[16];
        var pageOf = new System.Collections.Concurrent.ConcurrentDictionary<ulong, int>();
        using var stop = new CancellationTokenSource(TimeSpan.FromSeconds(2));
        long resolved = 0, refused = 0;

        var granter = Task.Run(() =>
        {
            var random = new Random(1);
            while (!stop.IsCancellationRequested)
            {
                int index = random.Next(16);
                if (Volatile.Read(ref live[index]) is { } old) pair.Owner.Revoke(old.Value);
                int page = random.Next(64);
                var handle = pair.Owner.Grant(0, page * 4096L, 4096, HandleRights.Read);
                pageOf[handle.Generation] = page;
                Volatile.Write(ref live[index], new(handle));
            }
        });
        var resolver = Task.Run(() =>
        {
            var random = new Random(2);
            while (!stop.IsCancellationRequested)
            {
                if (Volatile.Read(ref live[random.Next(16)]) is not { Value: var handle }) continue;
                if (!pair.Peer.TryResolve(handle, HandleRights.Read, out var memory, out var refusal))
                {
                    Assert.Equal(SharingCheck.Revoked, refusal);
                    refused++;
                    continue;
                }
                // A resolved handle is the grant it names: the 4096 bytes of its page, never another's.
                Assert.Equal(4096, memory.Length);
                byte expected = (byte)pageOf[handle.Generation];
                Assert.True(memory.IndexOfAnyExcept(expected) < 0, $"{handle} resolved to bytes of another page");
                resolved++;
            }
        });
        await Task.WhenAll(granter, resolver);
        Assert.True(resolved > 1000, $"{resolved} resolved, {refused} refused");
    }
}
