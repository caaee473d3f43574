using System.Net.Http.Json;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Clients;

/// <summary>One appliance process shared by the real-client tests of a class.</summary>
public sealed class ApplianceFixture : IAsyncLifetime
{
    public ApplianceProcess Appliance { get; private set; } = null!;

    public async Task InitializeAsync() => Appliance = await ApplianceProcess.StartAsync();

    public async Task DisposeAsync() => await Appliance.DisposeAsync();
}

/// <summary>Real initiators against the real executable: libiscsi's tools, QEMU's iSCSI driver, CHAP.</summary>
public sealed class RealClientTests(ApplianceFixture fixture) : IClassFixture<ApplianceFixture>
{
    private ApplianceProcess Appliance => fixture.Appliance;

    [Fact]
    public async Task Iscsi_ls_discovers_the_demo_target()
    {
        var result = await Tool.RunAsync("iscsi-ls", [$"iscsi://127.0.0.1:{Appliance.IscsiPort}"]);
        Assert.Equal(0, result.ExitCode);
        Assert.Contains($"Target:{ApplianceProcess.DemoTarget} Portal:127.0.0.1:{Appliance.IscsiPort},1", result.Output);
    }

    [Fact]
    public async Task Iscsi_inq_reads_standard_and_vpd_inquiry()
    {
        var standard = await Tool.RunAsync("iscsi-inq", [Appliance.Url()]);
        Assert.Equal(0, standard.ExitCode);
        Assert.Contains("Peripheral Device Type:DIRECT_ACCESS", standard.Output);
        Assert.Contains("Vendor:ISCSISNP", standard.Output);
        var identification = await Tool.RunAsync("iscsi-inq", ["-e", "1", "-c", "131", Appliance.Url()]);
        Assert.Equal(0, identification.ExitCode);
        Assert.Contains("Designator Type:(3) NAA", identification.Output);
        Assert.Contains("Association:(0) LOGICAL_UNIT", identification.Output);
    }

    [Fact]
    public async Task Iscsi_readcapacity16_reports_the_demo_lun()
    {
        var result = await Tool.RunAsync("iscsi-readcapacity16", [Appliance.Url()]);
        Assert.Equal(0, result.ExitCode);
        Assert.Contains("RETURNED LOGICAL BLOCK ADDRESS:2097151", result.Output);
        Assert.Contains("LOGICAL BLOCK LENGTH IN BYTES:512", result.Output);
        Assert.Contains("LBPME:1 LBPRZ:1", result.Output);
    }

    [Fact]
    public async Task Qemu_img_copies_a_64_mib_random_image_and_compares_it_back()
    {
        const string target = "iqn.2026-11.io.iscsisnap.test:qemu";
        await Appliance.CreateTargetAsync(target, 64L << 20);
        using var dir = new TempDirectory();
        string source = Path.Combine(dir.Path, "source.img");
        var bytes = new byte[64 << 20];
        Random.Shared.NextBytes(bytes);
        await File.WriteAllBytesAsync(source, bytes);
        var convert = await Tool.RunAsync("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", source, Appliance.Url(target)]);
        Assert.True(convert.ExitCode == 0, convert.Output);
        var compare = await Tool.RunAsync("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, Appliance.Url(target)]);
        Assert.True(compare.ExitCode == 0, compare.Output);
        Assert.Contains("Images are identical", compare.Output);

        // A changed byte on the LUN side must be noticed: the comparison is real.
        bytes[12345] ^= 0xFF;
        await File.WriteAllBytesAsync(source, bytes);
        var differs = await Tool.RunAsync("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, Appliance.Url(target)]);
        Assert.Equal(1, differs.ExitCode);
    }

    [Fact]
    public async Task Chap_right_secret_logs_in_wrong_secret_is_refused_and_mutual_chap_works()
    {
        const string target = "iqn.2026-11.io.iscsisnap.test:chap";
        await Appliance.CreateTargetAsync(target, 16L << 20);
        string Url(string credentials, string query = "") => $"iscsi://{credentials}127.0.0.1:{Appliance.IscsiPort}/{target}/0{query}";

        (await Appliance.Http.PutAsJsonAsync($"/api/v1/targets/{target}/chap", new { chap = new { userName = "hyperv", secret = "initiator-secret-01" } }))
            .EnsureSuccessStatusCode();
        var right = await Tool.RunAsync("iscsi-inq", [Url("hyperv%initiator-secret-01@")]);
        Assert.True(right.ExitCode == 0, right.Output);
        var wrong = await Tool.RunAsync("iscsi-inq", [Url("hyperv%not-the-secret-1@")]);
        Assert.NotEqual(0, wrong.ExitCode);
        Assert.Contains("Authentication failure", wrong.Output);
        var none = await Tool.RunAsync("iscsi-inq", [Url("")]);
        Assert.NotEqual(0, none.ExitCode);

        // Mutual CHAP: the target proves itself too; libiscsi takes the target's credentials from URL arguments.
        (await Appliance.Http.PutAsJsonAsync($"/api/v1/targets/{target}/chap", new
        {
            chap = new { userName = "hyperv", secret = "initiator-secret-01" },
            mutualChap = new { userName = "array", secret = "target-secret-0002" },
        })).EnsureSuccessStatusCode();
        var mutual = await Tool.RunAsync("iscsi-inq", [Url("hyperv%initiator-secret-01@", "?target_user=array&target_password=target-secret-0002")]);
        Assert.True(mutual.ExitCode == 0, mutual.Output);
        var impostor = await Tool.RunAsync("iscsi-inq", [Url("hyperv%initiator-secret-01@", "?target_user=array&target_password=wrong-target-secret")]);
        Assert.NotEqual(0, impostor.ExitCode);
        var oneWay = await Tool.RunAsync("iscsi-inq", [Url("hyperv%initiator-secret-01@")]);
        Assert.NotEqual(0, oneWay.ExitCode);   // mutual CHAP configured: the initiator must ask the target to prove itself
    }

    [Fact]
    public async Task Iscsi_test_cu_passes_core_suites()
    {
        const string target = "iqn.2026-11.io.iscsisnap.test:conformance";
        await Appliance.CreateTargetAsync(target, 128L << 20);
        using var dir = new TempDirectory();
        foreach (var suite in new[] { "ALL.Read10", "ALL.Write16", "ALL.CompareAndWrite", "ALL.Unmap", "ALL.ProutReserve", "ALL.iSCSIResiduals", "ALL.iSCSIcmdsn" })
        {
            var result = await Tool.RunAsync("iscsi-test-cu", ["-d", "-t", suite, Appliance.Url(target)], TimeSpan.FromMinutes(5), dir.Path);
            Assert.True(result.ExitCode == 0, result.Output);
            Assert.DoesNotContain("FAILED", result.Output);
            Assert.Matches(@"tests\s+\d+\s+\d+\s+\d+\s+0\s", result.Output);
        }
    }

    [Fact]
    public async Task Iscsi_test_cu_read_only_suite_passes_on_a_write_protected_lun()
    {
        const string target = "iqn.2026-11.io.iscsisnap.test:readonly";
        using var dir = new TempDirectory();
        string image = Path.Combine(dir.Path, "ro.img");
        using (var file = File.Create(image)) file.SetLength(64L << 20);
        (await Appliance.Http.PostAsJsonAsync("/api/v1/targets", new { name = target })).EnsureSuccessStatusCode();
        (await Appliance.Http.PostAsJsonAsync($"/api/v1/targets/{target}/luns", new { lun = 0, image, readOnly = true })).EnsureSuccessStatusCode();
        var result = await Tool.RunAsync("iscsi-test-cu", ["-d", "-v", "-t", "ALL.ReadOnly", Appliance.Url(target)], TimeSpan.FromMinutes(2), dir.Path);
        Assert.True(result.ExitCode == 0, result.Output);
        Assert.DoesNotContain("FAILED", result.Output);
        Assert.DoesNotContain("SKIPPED", result.Output);   // every write-type command was refused with DATA PROTECT
        Assert.Matches(@"tests\s+1\s+1\s+1\s+0\s", result.Output);
    }
}
