using System.Diagnostics;
using System.Text.Json;
using ISCSISnap.Tests.Support;
using Xunit;
using static ISCSISnap.Tests.Web.WebTest;

namespace ISCSISnap.Tests.Web;

/// <summary>/healthz, /metrics (checked by promtool and scraped by a real Prometheus server) and the JSON log files.</summary>
public sealed class ObservabilityTests(WebApplianceFixture fixture) : IClassFixture<WebApplianceFixture>
{
    private ApplianceProcess Appliance => fixture.Appliance;
    private HttpClient Http => fixture.Appliance.Http;

    private async Task<string> NewTargetAsync(string what, long lunBytes = 4L << 20)
    {
        string name = UniqueTarget(what);
        await Appliance.CreateTargetAsync(name, lunBytes);
        return name;
    }

    [Fact]
    public async Task Healthz_reports_ok_with_the_portal_and_counts()
    {
        var health = await GetJsonAsync(Http, "/healthz");
        Assert.Equal("ok", health.Str("status"));
        Assert.Equal($"127.0.0.1:{Appliance.IscsiPort}", health.Str("portal"));
        int targets = (await GetJsonAsync(Http, "/api/v1/targets")).GetArrayLength();
        Assert.Equal(targets, health.GetProperty("targets").GetInt32());
        Assert.True(health.GetProperty("sessions").GetInt32() >= 0);
    }

    [Fact]
    public async Task Metrics_pass_promtool_check_metrics()
    {
        string promtool = Tool.Require("promtool");
        // Some traffic first, so that labelled series (login outcomes, bytes, durations) exist.
        string name = await NewTargetAsync("promtool");
        var initiator = await LoginAsync(Appliance, name);
        await using (initiator)
        {
            await initiator.WriteAsync(0, Pattern(0, 1, 8));
            await initiator.ReadAsync(0, 8);
        }
        Assert.Equal(0x0203, await LoginStatusAsync(Appliance, "iqn.2026-11.io.iscsisnap.test:absent"));

        using var response = await Http.GetAsync("/metrics");
        Assert.Equal(200, (int)response.StatusCode);
        Assert.StartsWith("text/plain", response.Content.Headers.ContentType?.MediaType);
        string text = await response.Content.ReadAsStringAsync();
        Assert.Contains("iscsisnap_scsi_commands_total", text);
        var check = await RunProcessAsync(promtool, ["check", "metrics"], stdin: text);
        Assert.True(check.ExitCode == 0, check.ToString());

        // The check is real: promtool refuses a broken exposition.
        var broken = await RunProcessAsync(promtool, ["check", "metrics"], stdin: text + "iscsisnap_broken{kind=\"x\" 1\n");
        Assert.NotEqual(0, broken.ExitCode);
    }

    [Fact]
    public async Task Reads_writes_bytes_sessions_and_failed_chap_logins_are_counted()
    {
        string name = await NewTargetAsync("counters");
        const string secret = "counter-secret-0001";
        await JsonAsync(await PutAsync(Http, $"/api/v1/targets/{name}/chap", new { chap = new { userName = "metrics", secret } }), 200);
        // Sessions of earlier tests have ended (the class runs its tests one at a time).
        Assert.True(await EventuallyAsync(async () => (await GetJsonAsync(Http, "/api/v1/sessions")).GetArrayLength() == 0));
        Assert.True(await EventuallyAsync(async () => (await ScrapeAsync(Appliance)).Sum("iscsisnap_iscsi_sessions") == 0),
            "iscsisnap_iscsi_sessions should be 0 without sessions");

        var before = await ScrapeAsync(Appliance);
        var initiator = await LoginAsync(Appliance, name, chapUser: "metrics", chapSecret: secret);
        await using (initiator)
        {
            Assert.True(await EventuallyAsync(async () => (await ScrapeAsync(Appliance)).Sum("iscsisnap_iscsi_sessions") == 1),
                "iscsisnap_iscsi_sessions should count the logged-in session");
            for (uint i = 0; i < 10; i++) await initiator.WriteAsync(i * 8, Pattern(i * 8, 3, 8));          // 10 x 4 KiB
            for (uint i = 0; i < 5; i++) await initiator.ReadAsync(i * 16, 16);                              // 5 x 8 KiB
            var during = await ScrapeAsync(Appliance);
            Assert.True(during.Sum("iscsisnap_scsi_commands_total", ("kind", "write")) - before.Sum("iscsisnap_scsi_commands_total", ("kind", "write")) >= 10);
            Assert.True(during.Sum("iscsisnap_scsi_commands_total", ("kind", "read")) - before.Sum("iscsisnap_scsi_commands_total", ("kind", "read")) >= 5);
            Assert.True(during.Sum("iscsisnap_scsi_bytes_total", ("kind", "write")) - before.Sum("iscsisnap_scsi_bytes_total", ("kind", "write")) >= 10 * 4096);
            Assert.True(during.Sum("iscsisnap_scsi_bytes_total", ("kind", "read")) - before.Sum("iscsisnap_scsi_bytes_total", ("kind", "read")) >= 5 * 8192);
            Assert.True(during.Sum("iscsisnap_scsi_command_duration_seconds_count", ("kind", "write")) - before.Sum("iscsisnap_scsi_command_duration_seconds_count", ("kind", "write")) >= 10);
            Assert.True(during.Sum("iscsisnap_iscsi_logins_total", ("outcome", "success")) - before.Sum("iscsisnap_iscsi_logins_total", ("outcome", "success")) >= 1);
            await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
        }
        Assert.True(await EventuallyAsync(async () => (await ScrapeAsync(Appliance)).Sum("iscsisnap_iscsi_sessions") == 0),
            "iscsisnap_iscsi_sessions should drop back after logout");

        double failuresBefore = (await ScrapeAsync(Appliance)).Sum("iscsisnap_iscsi_logins_total", ("outcome", "failure"));
        Assert.Equal(0x0201, await LoginStatusAsync(Appliance, name, chapUser: "metrics", chapSecret: "wrong-secret-00001"));
        Assert.True(await EventuallyAsync(async () =>
            (await ScrapeAsync(Appliance)).Sum("iscsisnap_iscsi_logins_total", ("outcome", "failure")) == failuresBefore + 1),
            "a failed CHAP login should count once as a failure");
        var after = await ScrapeAsync(Appliance);
        Assert.True(after.Sum("iscsisnap_iscsi_logins_total", ("outcome", "failure"), ("reason", "authentication")) >= 1);
        Assert.Equal(0, after.Sum("iscsisnap_iscsi_sessions"));

        // Inventory gauges follow the API.
        int targets = (await GetJsonAsync(Http, "/api/v1/targets")).GetArrayLength();
        Assert.Equal(targets, after.Sum("iscsisnap_targets"));
        Assert.Equal(4L << 20, after.Sum("iscsisnap_lun_capacity_bytes", ("target", name), ("lun", "0")));
    }

    [Fact]
    public async Task A_prometheus_server_scrapes_the_appliance()
    {
        string prometheus = Tool.Require("prometheus");
        using var dir = new TempDirectory();
        string config = Path.Combine(dir.Path, "prometheus.yml");
        await File.WriteAllTextAsync(config, $"""
            global:
              scrape_interval: 1s
              evaluation_interval: 1s
            scrape_configs:
              - job_name: iscsisnap
                scrape_interval: 1s
                scrape_timeout: 1s
                metrics_path: /metrics
                static_configs:
                  - targets: ['127.0.0.1:{Appliance.WebPort}']
            """);
        int port = ApplianceProcess.FreePort();
        var start = new ProcessStartInfo(prometheus)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = dir.Path,
        };
        foreach (var a in new[] { $"--config.file={config}", $"--storage.tsdb.path={Path.Combine(dir.Path, "tsdb")}", $"--web.listen-address=127.0.0.1:{port}" })
            start.ArgumentList.Add(a);
        var output = new System.Text.StringBuilder();
        using var server = Process.Start(start)!;
        server.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
        server.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
        server.BeginOutputReadLine();
        server.BeginErrorReadLine();
        try
        {
            using var client = new HttpClient { BaseAddress = new Uri($"http://127.0.0.1:{port}"), Timeout = TimeSpan.FromSeconds(5) };
            int targets = (await GetJsonAsync(Http, "/api/v1/targets")).GetArrayLength();
            string? value = null;
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(25);
            while (value is null && DateTime.UtcNow < deadline && !server.HasExited)
            {
                try
                {
                    using var response = await client.GetAsync("/api/v1/query?query=iscsisnap_targets");
                    if (response.IsSuccessStatusCode)
                    {
                        var body = JsonDocument.Parse(await response.Content.ReadAsStringAsync()).RootElement;
                        Assert.Equal("success", body.Str("status"));
                        var result = body.GetProperty("data").GetProperty("result");
                        if (result.GetArrayLength() > 0)
                        {
                            var sample = result[0];
                            Assert.Equal("iscsisnap", sample.GetProperty("metric").Str("job"));
                            value = sample.GetProperty("value")[1].GetString();
                        }
                    }
                }
                catch (HttpRequestException) { }
                catch (TaskCanceledException) { }
                if (value is null) await Task.Delay(250);
            }
            string log;
            lock (output) log = output.ToString();
            Assert.False(server.HasExited, $"prometheus exited with {(server.HasExited ? server.ExitCode : 0)}:\n{log}");
            Assert.True(value is not null, $"prometheus did not return iscsisnap_targets within 25 s:\n{log}");
            Assert.Equal(targets.ToString(System.Globalization.CultureInfo.InvariantCulture), value);

            using var up = await client.GetAsync("/api/v1/query?query=up%7Bjob%3D%22iscsisnap%22%7D");
            var upResult = JsonDocument.Parse(await up.Content.ReadAsStringAsync()).RootElement.GetProperty("data").GetProperty("result");
            Assert.Equal("1", upResult[0].GetProperty("value")[1].GetString());
        }
        finally
        {
            if (!server.HasExited)
            {
                server.Kill(entireProcessTree: true);
                await server.WaitForExitAsync();
            }
        }
    }

    [Fact]
    public async Task Log_files_are_compact_json_and_never_contain_chap_secrets()
    {
        string name = await NewTargetAsync("secrets");
        const string secret = "log-probe-secret-K7x1";
        const string mutualSecret = "log-probe-mutual-P3q9";
        const string wrongSecret = "log-probe-wrong-Z5m2";
        const string refusedSecret = "log-probe-refused-Y8n4";
        await JsonAsync(await PutAsync(Http, $"/api/v1/targets/{name}/chap",
            new { chap = new { userName = "logger", secret }, mutualChap = new { userName = "array", secret = mutualSecret } }), 200);
        // A refused change carrying a secret must not leak it either.
        await AssertProblemAsync(await PutAsync(Http, $"/api/v1/targets/{name}/chap",
            new { chap = new { userName = "logger", secret = refusedSecret }, mutualChap = new { userName = "array", secret = refusedSecret } }), 400);

        static int Refusals(List<string> lines) => lines.Count(l => l.Contains("refused with status", StringComparison.Ordinal));
        int refusedBefore = Refusals(LogLines(Appliance.DataDirectory));
        Assert.Equal(0, await LoginStatusAsync(Appliance, name, chapUser: "logger", chapSecret: secret, mutualUser: "array", mutualSecret: mutualSecret));
        Assert.Equal(0x0201, await LoginStatusAsync(Appliance, name, chapUser: "logger", chapSecret: wrongSecret, mutualUser: "array", mutualSecret: mutualSecret));
        Assert.Equal(0x0201, await LoginStatusAsync(Appliance, name, chapUser: "logger", chapSecret: mutualSecret, mutualUser: "array", mutualSecret: mutualSecret));

        var files = LogFiles(Appliance.DataDirectory);
        Assert.NotEmpty(files);
        Assert.All(files, f => Assert.Matches(@"iscsisnap-\d{8}\.log$", f));

        // The refusals have reached the file, so the search below covers the logins' records.
        List<string> lines = [];
        Assert.True(await EventuallyAsync(() =>
        {
            lines = LogLines(Appliance.DataDirectory);
            return Task.FromResult(Refusals(lines) >= refusedBefore + 2);
        }), "the failed CHAP logins should be logged");

        foreach (var line in lines)
        {
            using var json = JsonDocument.Parse(line);   // every line is one JSON object
            var root = json.RootElement;
            Assert.Equal(JsonValueKind.Object, root.ValueKind);
            Assert.True(root.TryGetProperty("@t", out var timestamp) && DateTimeOffset.TryParse(timestamp.GetString(), out _), line);
            Assert.True(root.TryGetProperty("@mt", out _) || root.TryGetProperty("@m", out _), line);
        }
        Assert.Contains(lines, l => l.Contains("ISCSISnap ready", StringComparison.Ordinal));
        Assert.Contains(lines, l => JsonDocument.Parse(l).RootElement.Str("@l") == "Warning");

        string everything = string.Join('\n', lines) + "\n" + Appliance.Output;
        foreach (var s in new[] { secret, mutualSecret, wrongSecret, refusedSecret })
            Assert.False(everything.Contains(s, StringComparison.Ordinal), $"the secret '{s}' appears in the log files or the console output");
    }
}
