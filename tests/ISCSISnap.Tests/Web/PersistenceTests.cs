using System.Text.Json;
using ISCSISnap.Tests.Support;
using Xunit;
using static ISCSISnap.Tests.Web.WebTest;

namespace ISCSISnap.Tests.Web;

/// <summary>What the API creates lives in the catalog and the images: a restart on the same data directory finds it all.</summary>
public sealed class PersistenceTests
{
    [Fact]
    public async Task Targets_luns_acl_chap_and_data_survive_a_restart()
    {
        using var data = new TempDirectory();
        using var external = new TempDirectory();
        string name = UniqueTarget("persist");
        string gone = UniqueTarget("persist-deleted");
        const string allowed = "iqn.2026-11.io.iscsisnap.test:persist-allowed";
        const string stranger = "iqn.2026-11.io.iscsisnap.test:persist-stranger";
        const string secret = "persisted-secret-01";
        const string mutualSecret = "persisted-mutual-02";
        string image = Path.Combine(external.Path, "external.raw");
        await File.WriteAllBytesAsync(image, new byte[2 << 20]);
        ulong seed = (ulong)Random.Shared.NextInt64();

        JsonElement before;
        var first = await ApplianceProcess.StartAsync(dataDirectory: data.Path);
        try
        {
            var http = first.Http;
            await JsonAsync(await PostAsync(http, "/api/v1/targets", new { name, alias = "persisted alias" }), 201);
            await JsonAsync(await PostAsync(http, $"/api/v1/targets/{name}/luns", new { lun = 0, sizeBytes = 8L << 20 }), 201);
            await JsonAsync(await PostAsync(http, $"/api/v1/targets/{name}/luns", new { lun = 1, image }), 201);
            await JsonAsync(await PostAsync(http, $"/api/v1/targets/{name}/luns", new { lun = 2, sizeBytes = 1L << 20, blockSize = 4096 }), 201);
            await JsonAsync(await PatchAsync(http, $"/api/v1/targets/{name}/luns/0", new { sizeBytes = 16L << 20 }), 200);
            await JsonAsync(await PostAsync(http, $"/api/v1/targets/{name}/luns", new { lun = 7, sizeBytes = 1L << 20 }), 201);
            await JsonAsync(await SendAsync(http, HttpMethod.Delete, $"/api/v1/targets/{name}/luns/7"), 204);
            await first.CreateTargetAsync(gone, 1L << 20);
            await JsonAsync(await SendAsync(http, HttpMethod.Delete, $"/api/v1/targets/{gone}"), 204);

            // Data written before ACL and CHAP are set (they apply to new logins).
            var initiator = await LoginAsync(first, name, allowed, luns: [0, 1, 2]);
            await using (initiator)
            {
                await initiator.WriteAsync(0, Pattern(0, seed, 8));
                await initiator.WriteAsync(20000, Pattern(20000, seed, 16));   // past the original 8 MiB
                await initiator.WriteAsync(3000, Pattern(3000, seed, 8), lun: 1);
                await initiator.WriteAsync(100, Pattern(100, seed, 2, 4096), lun: 2, blockSize: 4096);
                await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
            }
            await JsonAsync(await PutAsync(http, $"/api/v1/targets/{name}/acl", new { allowedInitiators = new[] { allowed } }), 200);
            await JsonAsync(await PutAsync(http, $"/api/v1/targets/{name}/chap",
                new { chap = new { userName = "persist", secret }, mutualChap = new { userName = "array", secret = mutualSecret } }), 200);
            before = await GetJsonAsync(http, $"/api/v1/targets/{name}");
            Assert.Equal(0, await first.StopAsync());
        }
        finally
        {
            await first.DisposeAsync();
        }

        var second = await ApplianceProcess.StartAsync(dataDirectory: data.Path);
        await using (second)
        {
            var http = second.Http;
            var after = await GetJsonAsync(http, $"/api/v1/targets/{name}");
            Assert.Equal("persisted alias", after.Str("alias"));
            Assert.Equal([allowed], after.GetProperty("allowedInitiators").EnumerateArray().Select(e => e.GetString()));
            Assert.Equal("persist", after.GetProperty("chap").Str("userName"));
            Assert.Equal("array", after.GetProperty("mutualChap").Str("userName"));
            Assert.DoesNotContain(secret, after.GetRawText());
            // LUNs come back with the same numbers, sizes, images and identities (NAA, serial).
            string Luns(JsonElement target) => string.Join("\n", target.GetProperty("luns").EnumerateArray().Select(l =>
                $"{l.GetProperty("lun")} {l.GetProperty("sizeBytes")} {l.GetProperty("blockSize")} {l.Str("disk")} {l.Str("image")} {l.GetProperty("managed")} {l.Str("naa")} {l.Str("serial")}"));
            Assert.Equal(Luns(before), Luns(after));
            Assert.Equal([0, 1, 2], after.GetProperty("luns").EnumerateArray().Select(l => l.GetProperty("lun").GetInt32()));
            Assert.Equal(16L << 20, after.GetProperty("luns")[0].GetProperty("sizeBytes").GetInt64());
            await AssertProblemAsync(await http.GetAsync($"/api/v1/targets/{gone}"), 404);
            var acl = await GetJsonAsync(http, $"/api/v1/targets/{name}/acl");
            Assert.Equal([allowed], acl.GetProperty("allowedInitiators").EnumerateArray().Select(e => e.GetString()));

            // CHAP and the ACL are still enforced.
            Assert.Equal(0x0201, await LoginStatusAsync(second, name, allowed));
            Assert.Equal(0x0201, await LoginStatusAsync(second, name, allowed, "persist", "not-the-secret-01", "array", mutualSecret));
            Assert.Equal(0x0202, await LoginStatusAsync(second, name, stranger, "persist", secret, "array", mutualSecret));

            var initiator = await LoginAsync(second, name, allowed, "persist", secret, "array", mutualSecret, luns: [0, 1, 2]);
            await using (initiator)
            {
                Assert.Equal((ulong)(16 << 20) / 512 - 1, (await initiator.ReadCapacity16Async()).LastLba);
                Assert.Equal(Pattern(0, seed, 8), await initiator.ReadAsync(0, 8));
                Assert.Equal(Pattern(20000, seed, 16), await initiator.ReadAsync(20000, 16));
                Assert.Equal(Pattern(3000, seed, 8), await initiator.ReadAsync(3000, 8, lun: 1));
                Assert.Equal(Pattern(100, seed, 2, 4096), await initiator.ReadAsync(100, 2, lun: 2, blockSize: 4096));
                await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
            }
        }
        // The image given by path is the disk's read-only base: the write went to the disk's head.
        Assert.Equal(new byte[8 * 512], File.ReadAllBytes(image).AsSpan(3000 * 512, 8 * 512).ToArray());
    }

    [Fact]
    public async Task The_demo_target_is_created_on_first_start_and_not_recreated_once_deleted()
    {
        using var data = new TempDirectory();
        var first = await ApplianceProcess.StartAsync(dataDirectory: data.Path);
        string demoImage;
        try
        {
            var demo = await GetJsonAsync(first.Http, $"/api/v1/targets/{ApplianceProcess.DemoTarget}");
            var lun = Assert.Single(demo.GetProperty("luns").EnumerateArray());
            Assert.Equal(0, lun.GetProperty("lun").GetInt32());
            Assert.Equal(1L << 30, lun.GetProperty("sizeBytes").GetInt64());
            Assert.True(lun.GetProperty("managed").GetBoolean());
            demoImage = (await GetJsonAsync(first.Http, $"/api/v1/disks/{lun.Str("disk")}")).Str("headPath")!;
            Assert.True(File.Exists(demoImage));
            Assert.EndsWith(".vhdx", demoImage);
            Assert.Equal(0, await LoginStatusAsync(first, ApplianceProcess.DemoTarget));

            await JsonAsync(await SendAsync(first.Http, HttpMethod.Delete, $"/api/v1/targets/{ApplianceProcess.DemoTarget}"), 204);
            Assert.False(File.Exists(demoImage), "the demo LUN's managed image goes with the target");
            Assert.Equal(0, await first.StopAsync());
        }
        finally
        {
            await first.DisposeAsync();
        }

        var second = await ApplianceProcess.StartAsync(dataDirectory: data.Path);
        await using (second)
        {
            await AssertProblemAsync(await second.Http.GetAsync($"/api/v1/targets/{ApplianceProcess.DemoTarget}"), 404);
            Assert.DoesNotContain((await GetJsonAsync(second.Http, "/api/v1/targets")).EnumerateArray(), t => t.Str("name") == ApplianceProcess.DemoTarget);
            Assert.Equal(0x0203, await LoginStatusAsync(second, ApplianceProcess.DemoTarget));
            Assert.Empty(Directory.GetFiles(Path.Combine(data.Path, "disks"), "*.vhdx"));
        }
    }

    [Fact]
    public async Task Persistent_reservations_with_aptpl_survive_a_restart_and_without_it_do_not()
    {
        using var data = new TempDirectory();
        string aptpl = UniqueTarget("aptpl");
        string plain = UniqueTarget("no-aptpl");
        const ulong key = 0x1122334455667788UL;

        static byte[] ProutCdb(byte serviceAction, byte type = 0) => [0x5F, serviceAction, type, 0, 0, 0, 0, 0, 24, 0];
        static byte[] Parameters(ulong reservationKey, ulong serviceActionKey, bool aptpl)
        {
            var p = new byte[24];
            System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(p, reservationKey);
            System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(p.AsSpan(8), serviceActionKey);
            p[20] = (byte)(aptpl ? 0x01 : 0);
            return p;
        }
        static async Task<(uint Generation, ulong[] Keys)> ReadKeysAsync(TestInitiator initiator)
        {
            var result = await initiator.RunAsync([0x5E, 0x00, 0, 0, 0, 0, 0, 0x01, 0x00, 0], expectedDataIn: 256);
            Assert.True(result.Good);
            uint generation = System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(result.DataIn);
            int length = (int)System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(result.DataIn.AsSpan(4));
            var keys = Enumerable.Range(0, length / 8).Select(i => System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(result.DataIn.AsSpan(8 + 8 * i))).ToArray();
            return (generation, keys);
        }

        var first = await ApplianceProcess.StartAsync(dataDirectory: data.Path);
        try
        {
            await first.CreateTargetAsync(aptpl, 1L << 20);
            await first.CreateTargetAsync(plain, 1L << 20);
            foreach (var (target, persist) in new[] { (aptpl, true), (plain, false) })
            {
                await using var initiator = await LoginAsync(first, target);
                Assert.True((await initiator.RunAsync(ProutCdb(0x00), dataOut: Parameters(0, key, persist))).Good);            // REGISTER
                Assert.True((await initiator.RunAsync(ProutCdb(0x01, type: 5), dataOut: Parameters(key, 0, false))).Good);     // RESERVE WERO
                Assert.Equal(new[] { key }, (await ReadKeysAsync(initiator)).Keys);
            }
            Assert.Equal(0, await first.StopAsync());
        }
        finally
        {
            await first.DisposeAsync();
        }

        var second = await ApplianceProcess.StartAsync(dataDirectory: data.Path);
        try
        {
            await using (var initiator = await LoginAsync(second, aptpl, "iqn.2026-11.io.iscsisnap.test:another-node"))
            {
                var (generation, keys) = await ReadKeysAsync(initiator);
                Assert.Equal(new[] { key }, keys);
                Assert.Equal(1u, generation);
                var reservation = await initiator.RunAsync([0x5E, 0x01, 0, 0, 0, 0, 0, 0, 64, 0], expectedDataIn: 64);
                Assert.Equal(16u, System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(reservation.DataIn.AsSpan(4)));
                Assert.Equal(key, System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(reservation.DataIn.AsSpan(8)));
                Assert.Equal(5, reservation.DataIn[21] & 0x0F);
                // The reservation is enforced: another (unregistered) node cannot write under WRITE EXCLUSIVE, REGISTRANTS ONLY.
                var write = await initiator.RunAsync(Cdb.Write10(0, 1), dataOut: new byte[512]);
                Assert.Equal(0x18, write.Status);
            }
            await using (var initiator = await LoginAsync(second, plain))
            {
                Assert.Empty((await ReadKeysAsync(initiator)).Keys);   // APTPL was not set: registrations died with the process
            }
        }
        finally
        {
            await second.DisposeAsync();
        }
    }

    [Fact]
    public async Task A_lun_catalogued_before_disks_existed_keeps_its_content_on_a_migrated_disk()
    {
        // A catalog as the appliance wrote it before disks: the LUN points straight at a raw image.
        using var data = new TempDirectory();
        string image = Path.Combine(data.Path, "images", "legacy.img");
        Directory.CreateDirectory(Path.GetDirectoryName(image)!);
        var content = new byte[4 << 20];
        Pattern(50, 77, 8).CopyTo(content, 50 * 512);
        File.WriteAllBytes(image, content);
        string target = UniqueTarget("legacy");
        var unit = Guid.NewGuid();
        using (var catalog = new ISCSISnap.Web.Catalog.ApplianceCatalog(Path.Combine(data.Path, "catalog.db")))
        {
            catalog.SaveTarget(new ISCSISnap.Web.Catalog.TargetRecord { Id = target.ToLowerInvariant(), Name = target, CreatedAt = DateTime.UtcNow });
            catalog.SaveLun(new ISCSISnap.Web.Catalog.LunRecord
            {
                Id = ISCSISnap.Web.Catalog.LunRecord.KeyOf(target.ToLowerInvariant(), 0), TargetId = target.ToLowerInvariant(), Lun = 0, UnitId = unit,
                ImagePath = image, Managed = true, SizeBytes = content.Length, BlockSize = 512, CreatedAt = DateTime.UtcNow,
            });
        }

        var appliance = await ApplianceProcess.StartAsync(dataDirectory: data.Path);
        await using (appliance)
        {
            var lun = (await GetJsonAsync(appliance.Http, $"/api/v1/targets/{target}")).GetProperty("luns")[0];
            Assert.Equal(4L << 20, lun.GetProperty("sizeBytes").GetInt64());
            var disk = await GetJsonAsync(appliance.Http, $"/api/v1/disks/{lun.Str("disk")}");
            Assert.Equal(2, disk.GetProperty("chain").GetArrayLength());   // the image as base, a new head
            var initiator = await LoginAsync(appliance, target);
            await using (initiator)
            {
                Assert.Equal(Pattern(50, 77, 8), await initiator.ReadAsync(50, 8));
                await initiator.WriteAsync(60, Pattern(60, 78, 2));
                await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
            }
            Assert.True(LogLines(data.Path).Any(l => l.Contains("legacy.img") && l.Contains("base of disk")), "the migration is logged");
        }
        Assert.Equal(content, File.ReadAllBytes(image));
    }
}
