using ISCSISnap.Storage.Chains;
using Xunit;

namespace ISCSISnap.Tests.Chains;

public sealed class ChainMapTests
{
    /// <summary>A plain per-sector array: the obviously right answer the map is checked against.</summary>
    private sealed class Oracle(long sectors, ushort initial)
    {
        public readonly ushort[] Owners = Enumerable.Repeat(initial, (int)sectors).ToArray();
        public void Set(long sector, long count, ushort owner, Func<ushort, bool>? only = null)
        {
            for (long s = sector; s < Math.Min(sector + count, Owners.Length); s++)
                if (only is null || only(Owners[s])) Owners[s] = owner;
        }
    }

    private static void AssertSame(ChainMap map, Oracle oracle)
    {
        long sector = 0;
        while (sector < oracle.Owners.Length)
        {
            ushort owner = map.Lookup(sector, out int n);
            Assert.True(n > 0);
            for (long s = sector; s < Math.Min(sector + n, oracle.Owners.Length); s++)
                Assert.True(oracle.Owners[s] == owner, $"sector {s}: map says {owner}, expected {oracle.Owners[s]}");
            sector += n;
        }
    }

    [Fact]
    public void A_fresh_map_gives_every_sector_the_initial_owner()
    {
        var map = new ChainMap(8L << 20, 512, initialOwner: 3);
        Assert.Equal(3, map.Lookup(0, out int n));
        Assert.Equal(2048, n);   // a whole 1 MiB chunk
        Assert.Equal(3, map.Lookup(map.SectorCount - 1, out n));
        Assert.Equal(1, n);
        Assert.Single(map.Runs());
    }

    [Fact]
    public void Random_updates_agree_with_a_per_sector_oracle()
    {
        var random = new Random(1234);
        long size = 16L << 20;
        var map = new ChainMap(size, 512);
        var oracle = new Oracle(size / 512, 0);
        for (int i = 0; i < 2000; i++)
        {
            long sector = random.Next((int)(size / 512));
            long count = random.Next(1, i % 10 == 0 ? 5000 : 40);
            ushort owner = (ushort)random.Next(0, 6);
            if (i % 7 == 0)
            {
                ushort victim = (ushort)random.Next(0, 6);
                map.SetOwner(sector, count, owner, o => o == victim);
                oracle.Set(sector, count, owner, o => o == victim);
            }
            else
            {
                map.SetOwner(sector, count, owner);
                oracle.Set(sector, count, owner);
            }
        }
        AssertSame(map, oracle);
    }

    [Theory]
    [InlineData(512)]
    [InlineData(4096)]
    public void Serialization_round_trips_and_rejects_damage(int sectorSize)
    {
        var map = new ChainMap(64L << 20, sectorSize);
        map.SetOwner(10, 100, 2);
        map.SetOwner(5000, 1, 5);
        map.SetOwner(map.SectorCount - 3, 3, 1);
        var bytes = map.Serialize();
        var copy = ChainMap.Deserialize(bytes, 64L << 20, sectorSize, maxOwner: 5);
        Assert.NotNull(copy);
        Assert.True(copy!.SameAs(map));

        Assert.Null(ChainMap.Deserialize(bytes, 32L << 20, sectorSize, 5));          // another geometry
        Assert.Null(ChainMap.Deserialize(bytes, 64L << 20, sectorSize, 4));          // names a layer that is not there
        var damaged = (byte[])bytes.Clone();
        damaged[^3] ^= 1;
        Assert.Null(ChainMap.Deserialize(damaged, 64L << 20, sectorSize, 5));        // checksum
        Assert.Null(ChainMap.Deserialize(bytes.AsSpan(0, 40), 64L << 20, sectorSize, 5));
    }

    [Fact]
    public void Growing_adds_sectors_owned_by_nobody()
    {
        var map = new ChainMap(3L << 20, 512, initialOwner: 1);
        map.Grow(10L << 20);
        Assert.Equal(1, map.Lookup((3L << 20) / 512 - 1, out _));
        Assert.Equal(0, map.Lookup((3L << 20) / 512, out _));
        Assert.Equal(0, map.Lookup(map.SectorCount - 1, out _));
    }

    [Fact]
    public void Lookups_stay_consistent_while_a_writer_changes_owners()
    {
        var map = new ChainMap(64L << 20, 512, initialOwner: 1);
        using var stop = new CancellationTokenSource(TimeSpan.FromMilliseconds(500));
        var writer = Task.Run(() =>
        {
            var random = new Random(5);
            while (!stop.IsCancellationRequested)
                map.SetOwner(random.Next(0, 131072), random.Next(1, 300), (ushort)random.Next(1, 3));
        });
        var random = new Random(6);
        while (!stop.IsCancellationRequested)
        {
            ushort owner = map.Lookup(random.Next(0, 131072), out int n);
            Assert.InRange(owner, (ushort)1, (ushort)2);
            Assert.InRange(n, 1, 2048);
        }
        writer.Wait();
    }

    [Fact]
    public void Removing_an_owner_renumbers_the_owners_above_it_everywhere()
    {
        var map = new ChainMap(64L << 20, 512);
        var oracle = new Oracle(map.SectorCount, 0);
        var random = new Random(11);
        for (int i = 0; i < 400; i++)
        {
            long sector = random.NextInt64(map.SectorCount);
            long count = random.Next(1, random.Next(2) == 0 ? 64 : 8192);
            ushort owner = (ushort)random.Next(0, 6);
            if (owner == 3) owner = 4;   // owner 3 never owns anything: it is the one removed
            map.SetOwner(sector, count, owner);
            oracle.Set(sector, count, owner);
        }
        map.RemoveOwner(3);
        for (int s = 0; s < oracle.Owners.Length; s++) if (oracle.Owners[s] > 3) oracle.Owners[s]--;
        AssertSame(map, oracle);
        Assert.Throws<InvalidOperationException>(() => map.RemoveOwner(2));   // 2 still owns sectors
    }
}
