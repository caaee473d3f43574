using ISCSISnap.SharingPeer;
using ISCSISnap.Storage.Sharing;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Sharing;

/// <summary>
/// The owner in this process, the peer a separate process (ISCSISnap.SharingPeer) that either uses the checked API
/// or goes around it, as a hostile peer would, straight at the kernel.
/// </summary>
[Collection(ProcessWideMeasurements.Name)]   // counts this process's descriptors and mappings
public sealed class HostilePeerTests
{
    private const int EPERM = 1, EACCES = 13;
    private const int OwnerWrites = 0, PeerWrites = 1, Constant = 2;
    // The peer numbers its memfds with the handle table first: 0 table, 1.. the regions.
    private const int TableFd = 0, OwnerWritesFd = 1, PeerWritesFd = 2, ConstantFd = 3;

    /// <summary>What the sharing layer's memfds are called (the runtime has memfds of its own, for JIT code).</summary>
    private const string Shared = "memfd:iscsisnap-share";

    private static RegionSpec[] Regions => [new(64 * 1024, PeerAccess.Read), new(64 * 1024, PeerAccess.ReadWrite), new(4096, PeerAccess.Constant, new byte[] { 1, 2, 3 })];

    [Fact]
    public async Task The_kernel_refuses_every_way_a_peer_could_write_a_region_it_may_only_read()
    {
        await using var peer = await PeerProcess.LaunchAsync();
        var link = await peer.OfferAsync(Regions);
        link.GetRegionMemory(OwnerWrites, 0, 4096).Fill(0x11);

        foreach (int fd in new[] { TableFd, OwnerWritesFd, ConstantFd })
        {
            Assert.Equal(EPERM, (await peer.SendAsync(PeerCommand.MapWritable, argument: (byte)fd)).Value);
            Assert.Equal(EACCES, (await peer.SendAsync(PeerCommand.ProtectWritable, argument: (byte)fd)).Value);
            Assert.Equal(EPERM, (await peer.SendAsync(PeerCommand.WriteDescriptor, argument: (byte)fd)).Value);
            Assert.Equal(EPERM, (await peer.SendAsync(PeerCommand.PunchHole, argument: (byte)fd)).Value);
            Assert.Equal(EPERM, (await peer.SendAsync(PeerCommand.ReopenWritable, argument: (byte)fd)).Value);
        }
        foreach (int fd in new[] { TableFd, OwnerWritesFd, PeerWritesFd, ConstantFd })
        {
            Assert.Equal(EPERM, (await peer.SendAsync(PeerCommand.Shrink, argument: (byte)fd)).Value);
            Assert.Equal(EPERM, (await peer.SendAsync(PeerCommand.Grow, argument: (byte)fd)).Value);
            Assert.Equal(EPERM, (await peer.SendAsync(PeerCommand.AddSeal, argument: (byte)fd)).Value);
        }
        // The region the peer may write is writable to it: the refusals above are the seals, not a broken peer.
        Assert.Equal(0, (await peer.SendAsync(PeerCommand.MapWritable, argument: PeerWritesFd)).Value);
        Assert.Equal(0, (await peer.SendAsync(PeerCommand.ReopenWritable, argument: PeerWritesFd)).Value);

        // Nothing the attempts did reached the owner's bytes or its handle table.
        Assert.All(link.GetRegionMemory(OwnerWrites, 0, 4096).ToArray(), b => Assert.Equal(0x11, b));
        var handle = link.Grant(OwnerWrites, 0, 4096, HandleRights.Read);
        var read = await peer.SendAsync(PeerCommand.Read, handle, HandleRights.Read);
        Assert.Equal(SharingCheck.None, read.Check);
        Assert.All(read.Payload, b => Assert.Equal(0x11, b));
        var constant = link.Grant(Constant, 0, 3, HandleRights.Read);
        Assert.Equal(new byte[] { 1, 2, 3 }, (await peer.SendAsync(PeerCommand.Read, constant, HandleRights.Read)).Payload);
    }

    [Fact]
    public async Task The_checked_api_refuses_a_peer_process_each_misuse_of_a_handle_and_names_the_check()
    {
        await using var peer = await PeerProcess.LaunchAsync();
        var link = await peer.OfferAsync(Regions);
        link.GetRegionMemory(OwnerWrites, 0, 4096).Fill(0xA1);
        link.GetRegionMemory(OwnerWrites, 4096, 4096).Fill(0xB2);
        var first = link.Grant(OwnerWrites, 0, 4096, HandleRights.Read);
        var second = link.Grant(OwnerWrites, 4096, 4096, HandleRights.Read);

        async Task<SharingCheck> Read(SharedHandle handle, long offset = 0, int length = -1, HandleRights rights = HandleRights.Read)
            => (await peer.SendAsync(PeerCommand.Read, handle, rights, offset, length)).Check;

        // Each request sees its own data only.
        var own = await peer.SendAsync(PeerCommand.Read, first, HandleRights.Read);
        Assert.Equal(SharingCheck.None, own.Check);
        Assert.Equal(4096, own.Payload.Length);
        Assert.All(own.Payload, b => Assert.Equal(0xA1, b));
        Assert.Equal(SharingCheck.Range, await Read(first, 0, 4097));
        Assert.Equal(SharingCheck.Range, await Read(second, -4096, 4096));
        Assert.Equal(SharingCheck.Range, await Read(first, 4096, 1));

        // Rights.
        Assert.Equal(SharingCheck.Rights, (await peer.SendAsync(PeerCommand.Write, first, HandleRights.Write, argument: 0xFF)).Check);
        Assert.All(link.GetRegionMemory(OwnerWrites, 0, 4096).ToArray(), b => Assert.Equal(0xA1, b));
        var writable = link.Grant(PeerWrites, 0, 4096, HandleRights.Write);
        Assert.Equal(SharingCheck.None, (await peer.SendAsync(PeerCommand.Write, writable, HandleRights.Write, argument: 0x5C)).Check);
        Assert.All(link.GetRegionMemory(PeerWrites, 0, 4096).ToArray(), b => Assert.Equal(0x5C, b));
        Assert.Equal(SharingCheck.Rights, await Read(writable));

        // Expiry.
        var brief = link.Grant(OwnerWrites, 0, 4096, HandleRights.Read, lifetime: TimeSpan.FromMilliseconds(1));
        await Task.Delay(20);
        Assert.Equal(SharingCheck.Expiry, await Read(brief));

        // Revocation, seen by the other process with no message.
        Assert.True(link.Revoke(second));
        Assert.Equal(SharingCheck.Revoked, await Read(second));
        Assert.Equal(SharingCheck.None, await Read(first));

        // One shot.
        var once = link.Grant(OwnerWrites, 0, 4096, HandleRights.Read, oneShot: true);
        Assert.Equal(SharingCheck.None, await Read(once));
        Assert.Equal(SharingCheck.OneShot, await Read(once));

        // Another peer's handle, and forgeries.
        Assert.Equal(SharingCheck.Peer, await Read(first with { Peer = first.Peer + 1 }));
        Assert.Equal(SharingCheck.Revoked, await Read(first with { Generation = first.Generation + 1 }));
        Assert.Equal(SharingCheck.Slot, await Read(first with { Slot = uint.MaxValue }));

        // Revoking the peer ends everything it held.
        Assert.True(link.RevokeAll() >= 2);
        Assert.Equal(SharingCheck.Revoked, await Read(first));
        Assert.Equal(SharingCheck.Revoked, (await peer.SendAsync(PeerCommand.Write, writable, HandleRights.Write)).Check);

        var stats = await peer.SendAsync(PeerCommand.Stats);
        Assert.Equal(13, BitConverter.ToInt64(stats.Payload, 4));   // the peer counted each refusal it made
    }

    [Fact]
    public async Task A_process_other_than_the_expected_peer_gets_no_region()
    {
        await using var peer = await PeerProcess.LaunchAsync();
        var impostor = await Assert.ThrowsAsync<SharingException>(() => peer.OfferAsync(Regions, new ExpectedPeer(peer.Process.Id + 1, null)));
        Assert.Equal(SharingCheck.Credentials, impostor.Check);
        Assert.Contains($"pid {peer.Process.Id}", impostor.Message);
        var wrongUser = await Assert.ThrowsAsync<SharingException>(() => peer.OfferAsync(Regions, new ExpectedPeer(peer.Process.Id, PeerCredentials.Current.Uid + 1)));
        Assert.Equal(SharingCheck.Credentials, wrongUser.Check);
        Assert.Equal(0, ProcessResources.DescriptorsTo(Shared));

        // The peer saw the socket close with nothing sent, and says so.
        peer.Socket.Shutdown(System.Net.Sockets.SocketShutdown.Both);
        await peer.Process.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Equal(PeerProtocol.RefusedExitCode, peer.Process.ExitCode);
        Assert.StartsWith("refused: Handshake", await peer.Process.StandardOutput.ReadToEndAsync());
    }

    [Fact]
    public async Task When_a_peer_dies_holding_handles_they_are_revoked_and_its_regions_reclaimed()
    {
        // A first peer process warms up what the runtime keeps open for child processes; then count.
        await (await PeerProcess.LaunchAsync()).DisposeAsync();
        int descriptors = ProcessResources.OpenDescriptors();
        int pidfds = ProcessResources.DescriptorsTo("[pidfd]"), eventfds = ProcessResources.DescriptorsTo("[eventfd]");
        await using var peer = await PeerProcess.LaunchAsync();
        var link = await peer.OfferAsync(Regions);
        string prefix = $"memfd:iscsisnap-share-{link.PeerId}-";
        var held = Enumerable.Range(0, 50).Select(i => link.Grant(PeerWrites, i * 1024, 1024, HandleRights.ReadWrite)).ToArray();
        Assert.Equal(SharingCheck.None, (await peer.SendAsync(PeerCommand.Write, held[0], HandleRights.Write, argument: 7)).Check);
        Assert.Equal(4, ProcessResources.Mappings(prefix));

        peer.Process.Kill();
        await link.Ended.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.True(link.PeerExited);
        Assert.Equal(0, ProcessResources.Mappings(prefix));   // the pages are the kernel's again
        Assert.False(link.TryResolve(held[1], HandleRights.Read, out _, out var refusal));
        Assert.Equal(SharingCheck.Closed, refusal);
        Assert.False(link.TryGrant(PeerWrites, 0, 1024, HandleRights.Read, null, false, out _));
        Assert.Equal(SharingCheck.Closed, Assert.Throws<SharingException>(() => link.Grant(PeerWrites, 0, 1024, HandleRights.Read)).Check);
        // A stale pointer into a reclaimed region reads zeros instead of faulting.
        Assert.All(link.GetRegionMemory(PeerWrites, 0, 1024).ToArray(), b => Assert.Equal(0, b));

        await peer.DisposeAsync();
        Assert.Equal(0, ProcessResources.DescriptorsTo(prefix));
        Assert.Equal(pidfds, ProcessResources.DescriptorsTo("[pidfd]"));
        Assert.Equal(eventfds, ProcessResources.DescriptorsTo("[eventfd]"));
        Assert.True(ProcessResources.OpenDescriptors() <= descriptors, $"{descriptors} descriptors before, {ProcessResources.OpenDescriptors()} after");
    }

    [Fact]
    public async Task Descriptors_and_mappings_stay_bounded_over_100000_grant_and_revoke_cycles()
    {
        await using var peer = await PeerProcess.LaunchAsync();
        var link = await peer.OfferAsync(Regions, options: new SharingLinkOptions { HandleSlots = 256 });
        async Task Cycles(int count)
        {
            for (int cycle = 0; cycle < count; cycle++)
            {
                var handle = link.Grant(cycle % 2 == 0 ? OwnerWrites : PeerWrites, cycle % 16 * 4096, 4096, HandleRights.Read, oneShot: cycle % 3 == 0);
                if (cycle % 100 == 0)
                    Assert.Equal(SharingCheck.None, (await peer.SendAsync(PeerCommand.Read, handle, HandleRights.Read, 0, 16)).Check);
                Assert.True(link.Revoke(handle));
            }
        }

        // Counted after a first round, so that what either runtime opens on first use is not taken for growth.
        await Cycles(10_000);
        var before = await peer.SendAsync(PeerCommand.Stats);
        int ownerDescriptors = ProcessResources.OpenDescriptors(), ownerMappings = ProcessResources.Mappings(Shared);
        await Cycles(100_000);
        var after = await peer.SendAsync(PeerCommand.Stats);

        Assert.Equal(before.Value, after.Value);                                                   // the peer's descriptors
        Assert.Equal(4, BitConverter.ToInt32(after.Payload));                                      // its memfd mappings
        // Other tests' leftovers may be finalized meanwhile, so the owner's count may fall; it must not grow.
        Assert.True(ProcessResources.OpenDescriptors() <= ownerDescriptors, $"owner descriptors {ownerDescriptors} -> {ProcessResources.OpenDescriptors()}");
        Assert.Equal(ownerMappings, ProcessResources.Mappings(Shared));
        Assert.Equal(0, ProcessResources.DescriptorsTo(Shared));                                 // closed once handed over
    }

    [Fact]
    public async Task Links_made_and_ended_leave_no_descriptor_or_mapping_behind()
    {
        // Warm up the runtime's own first-use descriptors and mappings, then count.
        await using (var warm = await LinkPair.CreateAsync(Regions)) { }
        int descriptors = ProcessResources.OpenDescriptors();
        var targets = ProcessResources.DescriptorTargets();
        int pidfds = ProcessResources.DescriptorsTo("[pidfd]"), eventfds = ProcessResources.DescriptorsTo("[eventfd]");
        for (int i = 0; i < 200; i++)
        {
            await using var pair = await LinkPair.CreateAsync(Regions);
            pair.Owner.Grant(OwnerWrites, 0, 4096, HandleRights.Read);
        }
        Assert.Equal(0, ProcessResources.Mappings(Shared));
        Assert.Equal(0, ProcessResources.DescriptorsTo(Shared));
        Assert.Equal(0, ProcessResources.DescriptorsTo("[pidfd]") - pidfds);
        Assert.Equal(0, ProcessResources.DescriptorsTo("[eventfd]") - eventfds);
        Assert.True(ProcessResources.OpenDescriptors() <= descriptors,
            $"{descriptors} descriptors before, {ProcessResources.OpenDescriptors()} after; new: {string.Join(", ", ProcessResources.DescriptorTargets().Except(targets))}");
    }
}
