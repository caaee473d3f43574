using System.Text.Json;
using ISCSISnap.Tests.Support;
using Xunit;
using static ISCSISnap.Tests.Web.WebTest;

namespace ISCSISnap.Tests.Web;

/// <summary>/api/v1/disks and the `iscsisnap disk` CLI on the real executable, checked through HTTP and iSCSI.</summary>
public sealed class DiskApiTests(WebApplianceFixture fixture) : IClassFixture<WebApplianceFixture>
{
    private ApplianceProcess Appliance => fixture.Appliance;
    private HttpClient Http => fixture.Appliance.Http;

    private static string UniqueDisk(string what) => $"{what}-{Guid.NewGuid():N}"[..24];

    private async Task<JsonElement> WaitForJobAsync(JsonElement job)
    {
        string id = job.Str("id")!;
        JsonElement state = job;
        Assert.True(await EventuallyAsync(async () =>
        {
            state = await GetJsonAsync(Http, $"/api/v1/jobs/{id}");
            return state.Str("state") != "Running";
        }, TimeSpan.FromSeconds(60)), $"job {id} did not finish");
        return state;
    }

    private async Task<(string Target, JsonElement Disk)> NewLunOnDiskAsync(string what, long size)
    {
        string target = UniqueTarget(what);
        await JsonAsync(await PostAsync(Http, "/api/v1/targets", new { name = target }), 201);
        var lun = await JsonAsync(await PostAsync(Http, $"/api/v1/targets/{target}/luns", new { lun = 0, sizeBytes = size }), 201);
        var disk = await GetJsonAsync(Http, $"/api/v1/disks/{lun.Str("disk")}");
        return (target, disk);
    }

    [Fact]
    public async Task Disks_are_created_snapshotted_cloned_reverted_and_deleted_through_the_api()
    {
        string name = UniqueDisk("api");
        var disk = await JsonAsync(await PostAsync(Http, "/api/v1/disks", new { name, sizeBytes = 16L << 20, blockSize = 1 << 20 }), 201);
        string id = disk.Str("id")!;
        Assert.Equal(16L << 20, disk.GetProperty("sizeBytes").GetInt64());
        Assert.Equal(1, disk.GetProperty("chain").GetArrayLength());
        Assert.Equal(id, (await GetJsonAsync(Http, $"/api/v1/disks/{name}")).Str("id"));   // by name too
        Assert.Contains((await GetJsonAsync(Http, "/api/v1/disks")).EnumerateArray(), d => d.Str("id") == id);
        await AssertProblemAsync(await PostAsync(Http, "/api/v1/disks", new { name, sizeBytes = 1L << 20 }), 409, "name");

        var first = await JsonAsync(await PostAsync(Http, $"/api/v1/disks/{id}/snapshots", new { name = "first" }), 201);
        var second = await JsonAsync(await PostAsync(Http, $"/api/v1/disks/{id}/snapshots", new { name = "second" }), 201);
        Assert.Equal(first.Str("id"), second.Str("parentId"));
        var tree = await GetJsonAsync(Http, $"/api/v1/disks/{id}/snapshots");
        Assert.Equal(["first", "second"], tree.EnumerateArray().Select(s => s.Str("name")));
        Assert.Equal(3, (await GetJsonAsync(Http, $"/api/v1/disks/{id}")).GetProperty("chain").GetArrayLength());

        var clone = await JsonAsync(await PostAsync(Http, $"/api/v1/disks/{id}/snapshots/{first.Str("id")}/clone", new { name = UniqueDisk("clone") }), 201);
        Assert.Equal(2, clone.GetProperty("chain").GetArrayLength());
        Assert.Equal(first.Str("id"), clone.GetProperty("chain")[0].GetString());

        var reverted = await JsonAsync(await PostAsync(Http, $"/api/v1/disks/{id}/revert", new { snapshot = first.Str("id") }), 200);
        Assert.Equal(2, reverted.GetProperty("chain").GetArrayLength());

        // "first" now carries the clone and the reverted head: it cannot be merged away.
        var refused = await WaitForJobAsync(await JsonAsync(await SendAsync(Http, HttpMethod.Delete, $"/api/v1/disks/{id}/snapshots/{first.Str("id")}"), 202));
        Assert.Equal("Failed", refused.Str("state"));
        Assert.Contains("children", refused.Str("error"));

        var grown = await JsonAsync(await PatchAsync(Http, $"/api/v1/disks/{id}", new { sizeBytes = 32L << 20 }), 200);
        Assert.Equal(32L << 20, grown.GetProperty("sizeBytes").GetInt64());
        await AssertProblemAsync(await PatchAsync(Http, $"/api/v1/disks/{id}", new { sizeBytes = 8L << 20 }), 400, "sizeBytes");

        await JsonAsync(await SendAsync(Http, HttpMethod.Delete, $"/api/v1/disks/{clone.Str("id")}"), 204);
        await JsonAsync(await SendAsync(Http, HttpMethod.Delete, $"/api/v1/disks/{id}"), 204);
        await AssertProblemAsync(await Http.GetAsync($"/api/v1/disks/{id}"), 404);
    }

    [Fact]
    public async Task Bad_disk_requests_get_problem_details_naming_the_field()
    {
        await AssertProblemAsync(await PostAsync(Http, "/api/v1/disks", new { sizeBytes = 1L << 20 }), 400, "name");
        await AssertProblemAsync(await PostAsync(Http, "/api/v1/disks", new { name = UniqueDisk("x") }), 400, "sizeBytes");
        await AssertProblemAsync(await PostAsync(Http, "/api/v1/disks", new { name = UniqueDisk("x"), sizeBytes = 1000 }), 400, "sizeBytes");
        await AssertProblemAsync(await PostAsync(Http, "/api/v1/disks", new { name = UniqueDisk("x"), sizeBytes = 1L << 20, blockSize = 3 << 20 }), 400, "blockSize");
        await AssertProblemAsync(await PostAsync(Http, "/api/v1/disks", new { name = UniqueDisk("x"), sizeBytes = 1L << 20, sectorSize = 1024 }), 400, "sectorSize");
        await AssertProblemAsync(await PostAsync(Http, "/api/v1/disks", new { name = UniqueDisk("x"), image = "relative.vhdx" }), 400, "image");
        await AssertProblemAsync(await Http.GetAsync($"/api/v1/disks/{Guid.NewGuid()}"), 404);
        await AssertProblemAsync(await Http.GetAsync($"/api/v1/jobs/{Guid.NewGuid()}"), 404);

        // A damaged VHDX: the problem names the file and the fault, and so does the log.
        using var dir = new TempDirectory();
        string image = Path.Combine(dir.Path, "damaged.vhdx");
        var bytes = new byte[2 << 20];
        "vhdxfile"u8.CopyTo(bytes);
        File.WriteAllBytes(image, bytes);
        var problem = await AssertProblemAsync(await PostAsync(Http, "/api/v1/disks", new { name = UniqueDisk("bad"), image }), 400, "image");
        Assert.Contains(image, problem.Str("detail"));
        Assert.True(await EventuallyAsync(() => Task.FromResult(LogLines(Appliance.DataDirectory).Any(l => l.Contains(image) && l.Contains("refused")))),
            "the refusal is logged naming the file");
    }

    [Fact]
    public async Task A_lun_serves_its_disk_and_snapshots_revert_and_grow_reach_the_initiator()
    {
        var (target, disk) = await NewLunOnDiskAsync("chain", 8L << 20);
        string id = disk.Str("id")!;
        Assert.Equal(target, disk.GetProperty("servedBy").Str("target"));
        await AssertProblemAsync(await SendAsync(Http, HttpMethod.Delete, $"/api/v1/disks/{id}"), 409);

        var initiator = await LoginAsync(Appliance, target);
        await using (initiator)
        {
            await initiator.WriteAsync(10, Pattern(10, 1, 8));
            var snapshot = await JsonAsync(await PostAsync(Http, $"/api/v1/disks/{id}/snapshots", new { name = "before" }), 201);
            await initiator.WriteAsync(10, Pattern(10, 2, 8));
            Assert.Equal(Pattern(10, 2, 8), await initiator.ReadAsync(10, 8));

            // Reverting under a logged-in initiator needs force, and then the initiator is told.
            await AssertProblemAsync(await PostAsync(Http, $"/api/v1/disks/{id}/revert", new { snapshot = snapshot.Str("id") }), 409, "force");
            await JsonAsync(await PostAsync(Http, $"/api/v1/disks/{id}/revert", new { snapshot = snapshot.Str("id"), force = true }), 200);
            var attention = await initiator.RunAsync(Cdb.TestUnitReady());
            Assert.Equal(2, attention.Status);
            Assert.Equal((6, 0x2800), (attention.SenseKey, attention.AscAscq));
            Assert.Equal(Pattern(10, 1, 8), await initiator.ReadAsync(10, 8));

            // Growing the disk: CAPACITY DATA HAS CHANGED, then the new size.
            await JsonAsync(await PatchAsync(Http, $"/api/v1/disks/{id}", new { sizeBytes = 16L << 20 }), 200);
            attention = await initiator.RunAsync(Cdb.TestUnitReady());
            Assert.Equal((6, 0x2A09), (attention.SenseKey, attention.AscAscq));
            Assert.Equal((ulong)(16 << 20) / 512 - 1, (await initiator.ReadCapacity16Async()).LastLba);

            // Merging the snapshot away while the initiator writes: the data stays.
            var job = await WaitForJobAsync(await JsonAsync(await SendAsync(Http, HttpMethod.Delete, $"/api/v1/disks/{id}/snapshots/{snapshot.Str("id")}"), 202));
            Assert.True(job.Str("state") == "Succeeded", job.ToString());   // the base merged into the head, online
            Assert.Equal(Pattern(10, 1, 8), await initiator.ReadAsync(10, 8));
            await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
        }
        await JsonAsync(await SendAsync(Http, HttpMethod.Delete, $"/api/v1/targets/{target}"), 204);
    }

    [Fact]
    public async Task An_export_job_writes_a_file_qemu_reads_as_the_luns_content()
    {
        string qemuImg = Tool.Require("qemu-img");
        var (target, disk) = await NewLunOnDiskAsync("export", 4L << 20);
        var initiator = await LoginAsync(Appliance, target);
        await using (initiator)
        {
            await initiator.WriteAsync(100, Pattern(100, 5, 16));
            await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
        }
        using var dir = new TempDirectory();
        string vhdx = Path.Combine(dir.Path, "export.vhdx"), raw = Path.Combine(dir.Path, "export.raw");
        var job = await WaitForJobAsync(await JsonAsync(await PostAsync(Http, $"/api/v1/disks/{disk.Str("id")}/export", new { path = vhdx }), 202));
        Assert.Equal("Succeeded", job.Str("state"));
        Assert.Equal(1.0, job.GetProperty("progress").GetDouble());
        var convert = await Tool.RunAsync(qemuImg, ["convert", "-f", "vhdx", "-O", "raw", vhdx, raw]);
        Assert.True(convert.ExitCode == 0, convert.Output);
        var content = File.ReadAllBytes(raw);
        Assert.Equal(4 << 20, content.Length);
        Assert.Equal(Pattern(100, 5, 16), content.AsSpan(100 * 512, 16 * 512).ToArray());
        await AssertProblemAsync(await PostAsync(Http, $"/api/v1/disks/{disk.Str("id")}/export", new { path = vhdx }), 409, "path");
        await AssertProblemAsync(await PostAsync(Http, $"/api/v1/disks/{disk.Str("id")}/export", new { path = raw + ".x", format = "qcow2" }), 400, "format");
        await JsonAsync(await SendAsync(Http, HttpMethod.Delete, $"/api/v1/targets/{target}"), 204);
    }

    [Fact]
    public async Task The_cli_manages_disks_and_reports_refusals_naming_the_file()
    {
        string web = $"http://127.0.0.1:{Appliance.WebPort}";
        string name = UniqueDisk("cli");
        var created = await RunApplianceAsync("disk", "--web", web, "create", name, "--size", "8M");
        Assert.True(created.ExitCode == 0, created.ToString());
        var snapshot = await RunApplianceAsync("disk", "--web", web, "snapshot", name, "cli-snap");
        Assert.True(snapshot.ExitCode == 0, snapshot.ToString());
        var tree = await RunApplianceAsync("disk", "--web", web, "snapshots", name);
        Assert.Contains("cli-snap", tree.StdOut);
        var list = await RunApplianceAsync("disk", "--web", web, "list");
        Assert.Contains(name, list.StdOut);
        Assert.Contains("8M", list.StdOut);

        using var dir = new TempDirectory();
        string export = Path.Combine(dir.Path, "cli.raw");
        var exported = await RunApplianceAsync("disk", "--web", web, "export", name, export, "--format", "raw", "--wait");
        Assert.True(exported.ExitCode == 0, exported.ToString());
        Assert.Equal(8L << 20, new FileInfo(export).Length);

        string missing = Path.Combine(dir.Path, "nothing.vhdx");
        var refused = await RunApplianceAsync("disk", "--web", web, "import", UniqueDisk("cli-bad"), missing);
        Assert.Equal(1, refused.ExitCode);
        Assert.Contains(missing, refused.StdErr);

        // A damaged VHDX (both headers' checksums wrong): the CLI prints the file and the fault.
        string damaged = Path.Combine(dir.Path, "damaged.vhdx");
        var bytes = new byte[2 << 20];
        "vhdxfile"u8.CopyTo(bytes);
        "head"u8.CopyTo(bytes.AsSpan(0x10000));
        "head"u8.CopyTo(bytes.AsSpan(0x20000));
        File.WriteAllBytes(damaged, bytes);
        refused = await RunApplianceAsync("disk", "--web", web, "import", UniqueDisk("cli-bad"), damaged);
        Assert.Equal(1, refused.ExitCode);
        Assert.Contains(damaged, refused.StdErr);
        Assert.Contains("header", refused.StdErr);

        var usage = await RunApplianceAsync("disk", "--web", web, "create", name);
        Assert.Equal(2, usage.ExitCode);
        Assert.Contains("--size", usage.StdErr);

        var deleted = await RunApplianceAsync("disk", "--web", web, "delete", name);
        Assert.True(deleted.ExitCode == 0, deleted.ToString());
    }
}
