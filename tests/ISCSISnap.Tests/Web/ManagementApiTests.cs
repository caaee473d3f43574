using System.Text.Json;
using ISCSISnap.Tests.Support;
using Xunit;
using static ISCSISnap.Tests.Web.WebTest;

namespace ISCSISnap.Tests.Web;

/// <summary>The REST API (/api/v1) of the real executable, checked through HTTP and through iSCSI.</summary>
public sealed class ManagementApiTests(WebApplianceFixture fixture) : IClassFixture<WebApplianceFixture>
{
    private ApplianceProcess Appliance => fixture.Appliance;
    private HttpClient Http => fixture.Appliance.Http;

    private async Task<string> NewTargetAsync(string what, long? lunBytes = null)
    {
        string name = UniqueTarget(what);
        await JsonAsync(await PostAsync(Http, "/api/v1/targets", new { name }), 201);
        if (lunBytes is { } bytes) await JsonAsync(await PostAsync(Http, $"/api/v1/targets/{name}/luns", new { lun = 0, sizeBytes = bytes }), 201);
        return name;
    }

    [Fact]
    public async Task Targets_are_created_listed_read_and_deleted()
    {
        string name = UniqueTarget("crud");
        using var created = await PostAsync(Http, "/api/v1/targets", new { name, alias = "CRUD target" });
        var body = await JsonAsync(created, 201);
        Assert.Equal(name, body.Str("name"));
        Assert.Equal("CRUD target", body.Str("alias"));
        Assert.Equal(0, body.GetProperty("luns").GetArrayLength());
        Assert.Equal(0, body.GetProperty("allowedInitiators").GetArrayLength());
        Assert.Equal(JsonValueKind.Null, body.GetProperty("chap").ValueKind);
        Assert.Equal($"/api/v1/targets/{Uri.EscapeDataString(name)}", created.Headers.Location?.OriginalString);

        var list = await GetJsonAsync(Http, "/api/v1/targets");
        Assert.Contains(list.EnumerateArray(), t => t.Str("name") == name && t.Str("alias") == "CRUD target");
        Assert.Contains(list.EnumerateArray(), t => t.Str("name") == ApplianceProcess.DemoTarget);

        var one = await GetJsonAsync(Http, $"/api/v1/targets/{name}");
        Assert.Equal(name, one.Str("name"));
        Assert.Equal(0, one.GetProperty("sessions").GetInt32());
        // iSCSI names compare case-insensitively.
        Assert.Equal(name, (await GetJsonAsync(Http, $"/api/v1/targets/{name.ToUpperInvariant()}")).Str("name"));

        // The target is visible to initiators: SendTargets lists it.
        var discovery = await TestInitiator.ConnectAsync(Appliance.IscsiEndPoint);
        await using (discovery)
        {
            Assert.True((await discovery.LoginAsync(new LoginOptions { InitiatorName = Initiator })).Succeeded);
            var targets = await discovery.TextAsync([("SendTargets", "All")]).WaitAsync(TimeSpan.FromSeconds(10));
            Assert.Contains(targets, k => k.Key == "TargetName" && k.Value == name);
        }

        await JsonAsync(await SendAsync(Http, HttpMethod.Delete, $"/api/v1/targets/{name}"), 204);
        await AssertProblemAsync(await Http.GetAsync($"/api/v1/targets/{name}"), 404);
        Assert.DoesNotContain((await GetJsonAsync(Http, "/api/v1/targets")).EnumerateArray(), t => t.Str("name") == name);
        await AssertProblemAsync(await SendAsync(Http, HttpMethod.Delete, $"/api/v1/targets/{name}"), 404);
        Assert.Equal(0x0203, await LoginStatusAsync(Appliance, name));   // TARGET NOT FOUND
    }

    [Fact]
    public async Task A_lun_from_sizeBytes_is_a_new_disk_served_over_iscsi_and_deleted_with_the_lun()
    {
        string name = await NewTargetAsync("managed");
        var lun = await JsonAsync(await PostAsync(Http, $"/api/v1/targets/{name}/luns", new { lun = 3, sizeBytes = 8L << 20, blockSize = 4096 }), 201);
        Assert.Equal(3, lun.GetProperty("lun").GetInt32());
        Assert.Equal(8L << 20, lun.GetProperty("sizeBytes").GetInt64());
        Assert.Equal(4096, lun.GetProperty("blockSize").GetInt32());
        Assert.True(lun.GetProperty("managed").GetBoolean());
        Assert.False(lun.GetProperty("readOnly").GetBoolean());
        Assert.Equal(JsonValueKind.Null, lun.GetProperty("image").ValueKind);
        // The LUN serves a new disk: one dynamic VHDX layer with 4096-byte sectors.
        var disk = await GetJsonAsync(Http, $"/api/v1/disks/{lun.Str("disk")}");
        Assert.Equal(4096, disk.GetProperty("sectorSize").GetInt32());
        Assert.Equal(8L << 20, disk.GetProperty("sizeBytes").GetInt64());
        string image = disk.Str("headPath")!;
        Assert.StartsWith(Path.Combine(Path.GetFullPath(Appliance.DataDirectory), "disks"), image);
        Assert.True(File.Exists(image), image);

        var got = await GetJsonAsync(Http, $"/api/v1/targets/{name}/luns/3");
        Assert.Equal(lun.Str("disk"), got.Str("disk"));
        Assert.Equal(lun.Str("naa"), got.Str("naa"));
        var listed = await GetJsonAsync(Http, $"/api/v1/targets/{name}/luns");
        Assert.Equal([3], listed.EnumerateArray().Select(l => l.GetProperty("lun").GetInt32()));

        var initiator = await LoginAsync(Appliance, name, luns: [3]);
        await using (initiator)
        {
            var (lastLba, blockLength) = await initiator.ReadCapacity16Async(3);
            Assert.Equal((ulong)(8 << 20) / 4096 - 1, lastLba);
            Assert.Equal(4096u, blockLength);
            var data = Pattern(7, 42, 2, 4096);
            await initiator.WriteAsync(7, data, lun: 3, blockSize: 4096);
            Assert.Equal(data, await initiator.ReadAsync(7, 2, lun: 3, blockSize: 4096));
            await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
        }

        await JsonAsync(await SendAsync(Http, HttpMethod.Delete, $"/api/v1/targets/{name}/luns/3"), 204);
        Assert.False(File.Exists(image), $"{image} should be deleted with its LUN");
        await AssertProblemAsync(await Http.GetAsync($"/api/v1/disks/{lun.Str("disk")}"), 404);
        await AssertProblemAsync(await Http.GetAsync($"/api/v1/targets/{name}/luns/3"), 404);
        Assert.Equal(0, (await GetJsonAsync(Http, $"/api/v1/targets/{name}")).GetProperty("luns").GetArrayLength());
    }

    [Fact]
    public async Task A_lun_from_an_existing_image_serves_its_content_and_never_writes_the_file()
    {
        using var dir = new TempDirectory();
        string image = Path.Combine(dir.Path, "existing.raw");
        var content = new byte[4 << 20];
        Pattern(100, 9, 16).CopyTo(content, 100 * 512);
        await File.WriteAllBytesAsync(image, content);

        string name = await NewTargetAsync("external");
        var lun = await JsonAsync(await PostAsync(Http, $"/api/v1/targets/{name}/luns", new { lun = 1, image }), 201);
        // The LUN gets its own disk (deleted with it) whose read-only base is the image.
        Assert.True(lun.GetProperty("managed").GetBoolean());
        Assert.Equal(image, lun.Str("image"));
        Assert.Equal(4L << 20, lun.GetProperty("sizeBytes").GetInt64());
        Assert.Equal(image, (await GetJsonAsync(Http, $"/api/v1/targets/{name}/luns/1")).Str("image"));

        // The same file cannot be served twice.
        await AssertProblemAsync(await PostAsync(Http, $"/api/v1/targets/{name}/luns", new { lun = 2, image }), 409, "image");

        var initiator = await LoginAsync(Appliance, name, luns: [1]);
        await using (initiator)
        {
            Assert.Equal((ulong)(4 << 20) / 512 - 1, (await initiator.ReadCapacity16Async(1)).LastLba);
            Assert.Equal(Pattern(100, 9, 16), await initiator.ReadAsync(100, 16, lun: 1));
            await initiator.WriteAsync(2000, Pattern(2000, 10, 4), lun: 1);
            await initiator.RunAsync(Cdb.SynchronizeCache10(), 1);
            await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
        }

        // The image is the read-only base of the LUN's disk: writes land in the disk's head, the file stays as it was.
        Assert.Equal(content, await File.ReadAllBytesAsync(image));
        string disk = lun.Str("disk")!;
        string exported = Path.Combine(dir.Path, "written.raw");
        var job = await JsonAsync(await PostAsync(Http, $"/api/v1/disks/{disk}/export", new { path = exported, format = "raw" }), 202);
        Assert.True(await EventuallyAsync(async () => (await GetJsonAsync(Http, $"/api/v1/jobs/{job.Str("id")}")).Str("state") == "Succeeded"));
        var after = await File.ReadAllBytesAsync(exported);
        Assert.Equal(4 << 20, after.Length);
        Assert.Equal(Pattern(100, 9, 16), after.AsSpan(100 * 512, 16 * 512).ToArray());
        Assert.Equal(Pattern(2000, 10, 4), after.AsSpan(2000 * 512, 4 * 512).ToArray());

        await JsonAsync(await SendAsync(Http, HttpMethod.Delete, $"/api/v1/targets/{name}/luns/1"), 204);
        Assert.True(File.Exists(image), "an image given by path must survive the deletion of its LUN");
        Assert.Equal(content, await File.ReadAllBytesAsync(image));
        await AssertProblemAsync(await Http.GetAsync($"/api/v1/targets/{name}/luns/1"), 404);
    }

    [Fact]
    public async Task Read_only_luns_refuse_writes_with_data_protect_whether_new_or_from_an_image()
    {
        using var dir = new TempDirectory();
        string image = Path.Combine(dir.Path, "read-only.raw");
        var content = new byte[1 << 20];
        Pattern(0, 5, 8).CopyTo(content, 0);
        await File.WriteAllBytesAsync(image, content);
        string name = await NewTargetAsync("read-only");
        var fresh = await JsonAsync(await PostAsync(Http, $"/api/v1/targets/{name}/luns", new { lun = 0, sizeBytes = 1L << 20, readOnly = true }), 201);
        Assert.True(fresh.GetProperty("readOnly").GetBoolean(), "readOnly asked for a new disk must be honoured, not dropped");
        var fromImage = await JsonAsync(await PostAsync(Http, $"/api/v1/targets/{name}/luns", new { lun = 1, image, readOnly = true }), 201);
        Assert.True(fromImage.GetProperty("readOnly").GetBoolean());

        var initiator = await LoginAsync(Appliance, name, luns: [0, 1]);
        await using (initiator)
        {
            foreach (ulong lun in new ulong[] { 0, 1 })
            {
                var write = await initiator.RunAsync(Cdb.Write10(0, 8), lun, dataOut: new byte[8 * 512]);
                Assert.Equal(2, write.Status);
                Assert.Equal(7, write.SenseKey);          // DATA PROTECT
                Assert.Equal(0x27, write.AscAscq >> 8);   // WRITE PROTECTED
            }
            Assert.Equal(new byte[8 * 512], await initiator.ReadAsync(0, 8, lun: 0));
            Assert.Equal(Pattern(0, 5, 8), await initiator.ReadAsync(0, 8, lun: 1));
            await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
        }
        Assert.Equal(content, await File.ReadAllBytesAsync(image));
    }

    [Fact]
    public async Task Growing_a_lun_changes_its_capacity_over_iscsi_and_raises_capacity_data_has_changed()
    {
        string name = await NewTargetAsync("grow", 4L << 20);
        var initiator = await LoginAsync(Appliance, name);
        await using (initiator)
        {
            Assert.Equal((ulong)(4 << 20) / 512 - 1, (await initiator.ReadCapacity16Async()).LastLba);
            await initiator.WriteAsync(8000, Pattern(8000, 1, 8));

            var grown = await JsonAsync(await PatchAsync(Http, $"/api/v1/targets/{name}/luns/0", new { sizeBytes = 8L << 20 }), 200);
            Assert.Equal(8L << 20, grown.GetProperty("sizeBytes").GetInt64());
            Assert.Equal(8L << 20, (await GetJsonAsync(Http, $"/api/v1/targets/{name}/luns/0")).GetProperty("sizeBytes").GetInt64());

            // The logged-in nexus learns through a unit attention: CAPACITY DATA HAS CHANGED (2A/09), reported once.
            var attention = await initiator.RunAsync(Cdb.TestUnitReady());
            Assert.Equal(2, attention.Status);
            Assert.Equal(6, attention.SenseKey);
            Assert.Equal(0x2A09, attention.AscAscq);
            Assert.True((await initiator.RunAsync(Cdb.TestUnitReady())).Good);

            Assert.Equal((ulong)(8 << 20) / 512 - 1, (await initiator.ReadCapacity16Async()).LastLba);
            Assert.Equal(Pattern(8000, 1, 8), await initiator.ReadAsync(8000, 8));
            var beyond = Pattern(12000, 2, 8);   // past the old end
            await initiator.WriteAsync(12000, beyond);
            Assert.Equal(beyond, await initiator.ReadAsync(12000, 8));
        }

        // A new initiator (libiscsi) sees the new capacity too.
        var tool = await Tool.RunAsync("iscsi-readcapacity16", [Appliance.Url(name)], TimeSpan.FromSeconds(30));
        Assert.True(tool.ExitCode == 0, tool.Output);
        Assert.Contains($"RETURNED LOGICAL BLOCK ADDRESS:{(8 << 20) / 512 - 1}", tool.Output);

        await AssertProblemAsync(await PatchAsync(Http, $"/api/v1/targets/{name}/luns/0", new { sizeBytes = 4L << 20 }), 400, "sizeBytes");
        await AssertProblemAsync(await PatchAsync(Http, $"/api/v1/targets/{name}/luns/0", new { sizeBytes = (8L << 20) + 100 }), 400, "sizeBytes");
        await AssertProblemAsync(await PatchAsync(Http, $"/api/v1/targets/{name}/luns/0", new { }), 400, "sizeBytes");
        await AssertProblemAsync(await PatchAsync(Http, $"/api/v1/targets/{name}/luns/9", new { sizeBytes = 16L << 20 }), 404);
    }

    [Fact]
    public async Task Acl_is_read_and_replaced_and_an_initiator_not_listed_is_refused_at_login()
    {
        string name = await NewTargetAsync("acl", 1L << 20);
        const string allowed = "iqn.2026-11.io.iscsisnap.test:acl-allowed";
        const string other = "iqn.2026-11.io.iscsisnap.test:acl-other";
        var empty = await GetJsonAsync(Http, $"/api/v1/targets/{name}/acl");
        Assert.Equal(0, empty.GetProperty("allowedInitiators").GetArrayLength());
        Assert.Equal(0, await LoginStatusAsync(Appliance, name, other));

        var put = await JsonAsync(await PutAsync(Http, $"/api/v1/targets/{name}/acl", new { allowedInitiators = new[] { allowed } }), 200);
        Assert.Equal([allowed], put.GetProperty("allowedInitiators").EnumerateArray().Select(e => e.GetString()));
        var got = await GetJsonAsync(Http, $"/api/v1/targets/{name}/acl");
        Assert.Equal([allowed], got.GetProperty("allowedInitiators").EnumerateArray().Select(e => e.GetString()));
        Assert.Equal([allowed], (await GetJsonAsync(Http, $"/api/v1/targets/{name}")).GetProperty("allowedInitiators").EnumerateArray().Select(e => e.GetString()));

        Assert.Equal(0, await LoginStatusAsync(Appliance, name, allowed));
        Assert.Equal(0x0202, await LoginStatusAsync(Appliance, name, other));   // AUTHORIZATION FAILURE

        await AssertProblemAsync(await PutAsync(Http, $"/api/v1/targets/{name}/acl", new { allowedInitiators = new[] { "not an iscsi name" } }), 400, "allowedInitiators");
        await AssertProblemAsync(await PutAsync(Http, $"/api/v1/targets/{name}/acl", new { }), 400, "allowedInitiators");
        Assert.Equal(0x0202, await LoginStatusAsync(Appliance, name, other));   // refused changes changed nothing

        await JsonAsync(await PutAsync(Http, $"/api/v1/targets/{name}/acl", new { allowedInitiators = Array.Empty<string>() }), 200);
        Assert.Equal(0, await LoginStatusAsync(Appliance, name, other));
    }

    [Fact]
    public async Task Chap_is_set_read_and_removed_and_secrets_are_never_returned()
    {
        string name = await NewTargetAsync("chap", 1L << 20);
        const string secret = "initiator-secret-7Q2";
        const string mutualSecret = "target-secret-9Z4k";
        using var put = await PutAsync(Http, $"/api/v1/targets/{name}/chap",
            new { chap = new { userName = "hyperv", secret }, mutualChap = new { userName = "array", secret = mutualSecret } });
        string putText = await put.Content.ReadAsStringAsync();
        var putBody = await JsonAsync(put, 200);
        Assert.Equal("hyperv", putBody.GetProperty("chap").Str("userName"));
        Assert.Equal("array", putBody.GetProperty("mutualChap").Str("userName"));

        using var get = await Http.GetAsync($"/api/v1/targets/{name}/chap");
        string getText = await get.Content.ReadAsStringAsync();
        var chap = await JsonAsync(get, 200);
        Assert.Equal("hyperv", chap.GetProperty("chap").Str("userName"));
        Assert.Equal("array", chap.GetProperty("mutualChap").Str("userName"));
        Assert.False(chap.GetProperty("chap").TryGetProperty("secret", out _));
        Assert.False(chap.GetProperty("mutualChap").TryGetProperty("secret", out _));
        string targetText = await Http.GetStringAsync($"/api/v1/targets/{name}");
        string listText = await Http.GetStringAsync("/api/v1/targets");
        foreach (var text in new[] { putText, getText, targetText, listText })
        {
            Assert.DoesNotContain(secret, text);
            Assert.DoesNotContain(mutualSecret, text);
            Assert.DoesNotContain("\"secret\"", text, StringComparison.OrdinalIgnoreCase);
        }

        // CHAP is enforced at login, mutual CHAP proves the target.
        Assert.Equal(0x0201, await LoginStatusAsync(Appliance, name));
        Assert.Equal(0x0201, await LoginStatusAsync(Appliance, name, chapUser: "hyperv", chapSecret: "wrong-secret-123", mutualUser: "array", mutualSecret: mutualSecret));
        Assert.Equal(0, await LoginStatusAsync(Appliance, name, chapUser: "hyperv", chapSecret: secret, mutualUser: "array", mutualSecret: mutualSecret));

        // One-way only.
        await JsonAsync(await PutAsync(Http, $"/api/v1/targets/{name}/chap", new { chap = new { userName = "hyperv", secret } }), 200);
        var oneWay = await GetJsonAsync(Http, $"/api/v1/targets/{name}/chap");
        Assert.Equal(JsonValueKind.Null, oneWay.GetProperty("mutualChap").ValueKind);
        Assert.Equal(0, await LoginStatusAsync(Appliance, name, chapUser: "hyperv", chapSecret: secret));

        await JsonAsync(await SendAsync(Http, HttpMethod.Delete, $"/api/v1/targets/{name}/chap"), 204);
        var off = await GetJsonAsync(Http, $"/api/v1/targets/{name}/chap");
        Assert.Equal(JsonValueKind.Null, off.GetProperty("chap").ValueKind);
        Assert.Equal(JsonValueKind.Null, off.GetProperty("mutualChap").ValueKind);
        Assert.Equal(0, await LoginStatusAsync(Appliance, name));
    }

    [Fact]
    public async Task Sessions_list_a_logged_in_initiator_with_its_name_and_target()
    {
        string name = await NewTargetAsync("sessions", 1L << 20);
        const string initiatorName = "iqn.2026-11.io.iscsisnap.test:session-lister";
        var initiator = await LoginAsync(Appliance, name, initiatorName);
        await using (initiator)
        {
            var sessions = await GetJsonAsync(Http, "/api/v1/sessions");
            var mine = sessions.EnumerateArray().Where(s => s.Str("initiatorName") == initiatorName).ToList();
            var session = Assert.Single(mine);
            Assert.Equal(name, session.Str("targetName"));
            Assert.Equal("Normal", session.Str("type"));
            Assert.True(session.GetProperty("tsih").GetInt32() > 0);
            Assert.Single(session.GetProperty("connections").EnumerateArray());
            Assert.Equal(1, (await GetJsonAsync(Http, $"/api/v1/targets/{name}")).GetProperty("sessions").GetInt32());
            await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
        }
        Assert.True(await EventuallyAsync(async () =>
            !(await GetJsonAsync(Http, "/api/v1/sessions")).EnumerateArray().Any(s => s.Str("initiatorName") == initiatorName)),
            "the session should leave the list after logout");
    }

    [Fact]
    public async Task Deleting_a_target_with_a_logged_in_session_is_refused_with_409()
    {
        string name = await NewTargetAsync("busy", 1L << 20);
        var initiator = await LoginAsync(Appliance, name);
        await using (initiator)
        {
            await AssertProblemAsync(await SendAsync(Http, HttpMethod.Delete, $"/api/v1/targets/{name}"), 409);
            Assert.Equal(name, (await GetJsonAsync(Http, $"/api/v1/targets/{name}")).Str("name"));
            Assert.True((await initiator.RunAsync(Cdb.TestUnitReady())).Good, "the session keeps working after the refusal");
            await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
        }
        Assert.True(await EventuallyAsync(async () =>
        {
            using var response = await SendAsync(Http, HttpMethod.Delete, $"/api/v1/targets/{name}");
            return (int)response.StatusCode == 204;
        }), "the target should be deletable once its session logged out");
        await AssertProblemAsync(await Http.GetAsync($"/api/v1/targets/{name}"), 404);
    }

    [Fact]
    public async Task Invalid_target_requests_are_problems_naming_the_field()
    {
        await AssertProblemAsync(await PostAsync(Http, "/api/v1/targets", new { name = "not an iscsi name" }), 400, "name");
        await AssertProblemAsync(await PostAsync(Http, "/api/v1/targets", new { name = "iqn.20-11.io.x:bad-date" }), 400, "name");
        await AssertProblemAsync(await PostAsync(Http, "/api/v1/targets", new { alias = "no name" }), 400, "name");
        string name = await NewTargetAsync("dup");
        await AssertProblemAsync(await PostAsync(Http, "/api/v1/targets", new { name }), 409, "name");

        string missing = "iqn.2026-11.io.iscsisnap.test:no-such-target";
        await AssertProblemAsync(await Http.GetAsync($"/api/v1/targets/{missing}"), 404);
        await AssertProblemAsync(await SendAsync(Http, HttpMethod.Delete, $"/api/v1/targets/{missing}"), 404);
        await AssertProblemAsync(await Http.GetAsync($"/api/v1/targets/{missing}/luns"), 404);
        await AssertProblemAsync(await PostAsync(Http, $"/api/v1/targets/{missing}/luns", new { lun = 0, sizeBytes = 1L << 20 }), 404);
        await AssertProblemAsync(await Http.GetAsync($"/api/v1/targets/{missing}/acl"), 404);
        await AssertProblemAsync(await PutAsync(Http, $"/api/v1/targets/{missing}/acl", new { allowedInitiators = Array.Empty<string>() }), 404);
        await AssertProblemAsync(await Http.GetAsync($"/api/v1/targets/{missing}/chap"), 404);

        // All or nothing: a create with bad CHAP leaves no target behind.
        string half = UniqueTarget("half");
        await AssertProblemAsync(await PostAsync(Http, "/api/v1/targets", new { name = half, chap = new { userName = "u", secret = "short" } }), 400);
        await AssertProblemAsync(await Http.GetAsync($"/api/v1/targets/{half}"), 404);
    }

    [Fact]
    public async Task Invalid_lun_requests_are_problems_naming_the_field()
    {
        string name = await NewTargetAsync("lun-errors", 1L << 20);
        string luns = $"/api/v1/targets/{name}/luns";
        await AssertProblemAsync(await PostAsync(Http, luns, new { lun = 16384, sizeBytes = 1L << 20 }), 400, "lun");
        await AssertProblemAsync(await PostAsync(Http, luns, new { lun = -1, sizeBytes = 1L << 20 }), 400, "lun");
        await AssertProblemAsync(await PostAsync(Http, luns, new { sizeBytes = 1L << 20 }), 400, "lun");
        await AssertProblemAsync(await PostAsync(Http, luns, new { lun = 0, sizeBytes = 1L << 20 }), 409, "lun");
        await AssertProblemAsync(await PostAsync(Http, luns, new { lun = 5, sizeBytes = 1000 }), 400, "sizeBytes");
        await AssertProblemAsync(await PostAsync(Http, luns, new { lun = 5, sizeBytes = 0 }), 400, "sizeBytes");
        await AssertProblemAsync(await PostAsync(Http, luns, new { lun = 5, sizeBytes = -4096 }), 400, "sizeBytes");
        await AssertProblemAsync(await PostAsync(Http, luns, new { lun = 5, sizeBytes = (64L << 40) + 4096 }), 400, "sizeBytes");
        await AssertProblemAsync(await PostAsync(Http, luns, new { lun = 5 }), 400, "sizeBytes");
        await AssertProblemAsync(await PostAsync(Http, luns, new { lun = 5, sizeBytes = 1L << 20, blockSize = 1024 }), 400, "blockSize");

        using var dir = new TempDirectory();
        string existing = Path.Combine(dir.Path, "both.raw");
        await File.WriteAllBytesAsync(existing, new byte[1 << 20]);
        var both = await AssertProblemAsync(await PostAsync(Http, luns, new { lun = 5, sizeBytes = 1L << 20, image = existing }), 400);
        Assert.Contains(both.Str("field"), new[] { "sizeBytes", "image" });
        Assert.Contains("sizeBytes", both.Str("detail"));
        Assert.Contains("image", both.Str("detail"));

        string absent = Path.Combine(dir.Path, "no-such-image.raw");
        var missing = await AssertProblemAsync(await PostAsync(Http, luns, new { lun = 5, image = absent }), 400, "image");
        Assert.Contains(absent, missing.Str("detail"));

        await AssertProblemAsync(await Http.GetAsync($"{luns}/99"), 404);
        await AssertProblemAsync(await SendAsync(Http, HttpMethod.Delete, $"{luns}/99"), 404);

        // Nothing was created by the refused requests.
        var listed = await GetJsonAsync(Http, luns);
        Assert.Equal([0], listed.EnumerateArray().Select(l => l.GetProperty("lun").GetInt32()));
    }

    [Fact]
    public async Task Malformed_json_names_the_json_path_and_a_wrong_content_type_is_415()
    {
        string name = await NewTargetAsync("json-errors");
        string luns = $"/api/v1/targets/{name}/luns";
        await AssertProblemAsync(await SendAsync(Http, HttpMethod.Post, luns, """{"lun":0,"sizeBytes":"big"}"""), 400, "sizeBytes");
        await AssertProblemAsync(await SendAsync(Http, HttpMethod.Post, luns, """{"lun":"zero","sizeBytes":4096}"""), 400, "lun");
        await AssertProblemAsync(await SendAsync(Http, HttpMethod.Post, luns, """{"lun":0,"sizeBytes":4096,"sizeBites":1}"""), 400, "sizeBites");
        await AssertProblemAsync(await SendAsync(Http, HttpMethod.Put, $"/api/v1/targets/{name}/chap", """{"chap":{"userName":5,"secret":"long-enough-secret"}}"""), 400, "chap.userName");
        await AssertProblemAsync(await SendAsync(Http, HttpMethod.Put, $"/api/v1/targets/{name}/acl", """{"allowedInitiators":["iqn.2026-11.io.x:a",7]}"""), 400, "allowedInitiators[1]");
        await AssertProblemAsync(await SendAsync(Http, HttpMethod.Post, "/api/v1/targets", """{"name":"iqn.2026-11.io.x:y","alias":tru}"""), 400, "alias");
        var truncated = await AssertProblemAsync(await SendAsync(Http, HttpMethod.Post, luns, """{"lun":0,"""), 400);
        Assert.False(string.IsNullOrEmpty(truncated.Str("field")));
        await AssertProblemAsync(await SendAsync(Http, HttpMethod.Post, luns, ""), 400, "body");

        await AssertProblemAsync(await SendAsync(Http, HttpMethod.Post, "/api/v1/targets", """{"name":"iqn.2026-11.io.x:z"}""", "text/plain"), 415);
        await AssertProblemAsync(await SendAsync(Http, HttpMethod.Post, "/api/v1/targets", """{"name":"iqn.2026-11.io.x:z"}""", null), 415);
        await AssertProblemAsync(await SendAsync(Http, HttpMethod.Put, $"/api/v1/targets/{name}/acl", """{"allowedInitiators":[]}""", "application/xml"), 415);
        await AssertProblemAsync(await Http.GetAsync("/api/v1/targets/iqn.2026-11.io.x:z"), 404);   // none of them created anything
        // application/json with a charset is JSON.
        await JsonAsync(await SendAsync(Http, HttpMethod.Put, $"/api/v1/targets/{name}/acl", """{"allowedInitiators":[]}""", "application/json; charset=utf-8"), 200);
    }

    [Fact]
    public async Task Chap_secrets_must_be_long_enough_and_mutual_secrets_must_differ()
    {
        string name = await NewTargetAsync("chap-errors", 1L << 20);
        string chap = $"/api/v1/targets/{name}/chap";
        var shortSecret = await AssertProblemAsync(await PutAsync(Http, chap, new { chap = new { userName = "u", secret = "elevenchars" } }), 400);
        Assert.StartsWith("chap", shortSecret.Str("field"));
        Assert.Contains("12", shortSecret.Str("detail"));
        await JsonAsync(await PutAsync(Http, chap, new { chap = new { userName = "u", secret = "twelve-chars" } }), 200);   // 12 is enough
        await JsonAsync(await SendAsync(Http, HttpMethod.Delete, chap), 204);

        var same = await AssertProblemAsync(await PutAsync(Http, chap,
            new { chap = new { userName = "u", secret = "the-same-secret-1" }, mutualChap = new { userName = "t", secret = "the-same-secret-1" } }), 400);
        Assert.StartsWith("mutualChap", same.Str("field"));
        var shortMutual = await AssertProblemAsync(await PutAsync(Http, chap,
            new { chap = new { userName = "u", secret = "initiator-secret-1" }, mutualChap = new { userName = "t", secret = "short" } }), 400);
        Assert.StartsWith("mutualChap", shortMutual.Str("field"));
        await AssertProblemAsync(await PutAsync(Http, chap, new { mutualChap = new { userName = "t", secret = "target-secret-01" } }), 400, "chap");
        await AssertProblemAsync(await PutAsync(Http, chap, new { chap = new { userName = "", secret = "initiator-secret-1" } }), 400);

        // None of the refused requests turned CHAP on.
        var current = await GetJsonAsync(Http, chap);
        Assert.Equal(JsonValueKind.Null, current.GetProperty("chap").ValueKind);
        Assert.Equal(0, await LoginStatusAsync(Appliance, name));
    }

    [Fact]
    public async Task Unknown_api_routes_and_methods_are_problems_too()
    {
        await AssertProblemAsync(await Http.GetAsync("/api/v1/no-such-collection"), 404);
        await AssertProblemAsync(await Http.GetAsync($"/api/v1/targets/{ApplianceProcess.DemoTarget}/luns/not-a-number"), 404);
        await AssertProblemAsync(await SendAsync(Http, HttpMethod.Delete, "/api/v1/sessions"), 405);
    }

    [Fact]
    public async Task A_luns_filter_stack_is_listed_and_starts_empty()
    {
        var filters = await GetJsonAsync(Http, $"/api/v1/targets/{ApplianceProcess.DemoTarget}/luns/0/filters");
        Assert.Equal(JsonValueKind.Array, filters.ValueKind);
        Assert.Equal(0, filters.GetArrayLength());
        await AssertProblemAsync(await Http.GetAsync($"/api/v1/targets/{ApplianceProcess.DemoTarget}/luns/9/filters"), 404);
    }
}
