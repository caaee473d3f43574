using System.Text.Json;
using ISCSISnap.Tests.Support;
using Xunit;
using static ISCSISnap.Tests.Web.WebTest;

namespace ISCSISnap.Tests.Web;

/// <summary>The executable's command line and appliance.json: bad input stops it with exit code 2 and a message naming what is wrong.</summary>
public sealed class ConfigurationTests
{
    public static TheoryData<string, string, string> BadConfigurations => new()
    {
        // file content, what stderr must name (the field), a description
        { """{ "dataDirectory": "./data", "iscsiPortal": "0.0.0.0:3260" }""", "iscsiPortal", "unknown top-level field" },
        { """{ "iscsi": { "maxBurstLenght": 1048576 } }""", "iscsi.maxBurstLenght", "unknown nested field" },
        { "{ \"web\": { \"url\": \"http://127.0.0.1:8080\" }, \n  \"logging\": { \"level\": \"Information\" \n", "invalid JSON at $.logging", "truncated JSON" },
        { "{ \"logging\": {\n  \"retainedFiles\": 1x } }", "logging.retainedFiles (line 2)", "a syntax error inside a value" },
        { """{ "iscsi": { "maxRecvDataSegmentLength": "big" } }""", "iscsi.maxRecvDataSegmentLength", "a string where a number belongs" },
        { """{ "iscsi": { "maxBurstLength": 100, "firstBurstLength": 100 } }""", "iscsi.maxBurstLength", "maxBurstLength below 512" },
        { """{ "web": { "url": "127.0.0.1:8080" } }""", "web.url", "web.url without scheme" },
        { """{ "targets": [ { "name": "iqn.2026-11.io.iscsisnap.test:ok" }, { "name": "Not An IQN" } ] }""", "targets[1].name", "a target with an invalid name" },
        { """{ "targets": [ { "name": "iqn.2026-11.io.iscsisnap.test:c", "chap": { "userName": "u", "secret": "short" } } ] }""", "targets[0].chap.secret", "a CHAP secret too short" },
    };

    [Theory]
    [MemberData(nameof(BadConfigurations))]
    public async Task A_bad_configuration_file_exits_2_naming_the_file_and_the_field(string content, string field, string description)
    {
        using var dir = new TempDirectory();
        string config = Path.Combine(dir.Path, "bad-appliance.json");
        await File.WriteAllTextAsync(config, content);
        string data = Path.Combine(dir.Path, "data");
        // Free ports, should the file be accepted by mistake; not for the fields under test (the command line overrides them).
        var arguments = new List<string> { "--config", config, "--data", data };
        if (!content.Contains("\"portal\"", StringComparison.Ordinal)) arguments.AddRange(["--portal", $"127.0.0.1:{ApplianceProcess.FreePort()}"]);
        if (!content.Contains("\"web\"", StringComparison.Ordinal)) arguments.AddRange(["--web", $"http://127.0.0.1:{ApplianceProcess.FreePort()}"]);
        var outcome = await RunApplianceAsync([.. arguments]);
        Assert.True(outcome.ExitCode == 2, $"{description}: {outcome}");
        Assert.Contains(config, outcome.StdErr);
        Assert.Contains(field, outcome.StdErr);
        Assert.DoesNotContain("Unhandled exception", outcome.StdErr);
        Assert.DoesNotContain("   at ", outcome.StdErr);   // a message, not a stack trace
        Assert.False(File.Exists(Path.Combine(data, "catalog.db")), "nothing should have started");
    }

    [Fact]
    public async Task A_missing_configuration_file_exits_2_naming_it()
    {
        using var dir = new TempDirectory();
        string config = Path.Combine(dir.Path, "absent.json");
        var outcome = await RunApplianceAsync("--config", config, "--data", Path.Combine(dir.Path, "data"));
        Assert.True(outcome.ExitCode == 2, outcome.ToString());
        Assert.Contains(config, outcome.StdErr);
    }

    [Theory]
    [InlineData("--nope")]
    [InlineData("--data")]
    [InlineData("--config")]
    [InlineData("--portal", "--web", "http://127.0.0.1:1")]
    [InlineData("stray")]
    public async Task A_bad_argument_exits_2_naming_it_and_prints_usage(params string[] arguments)
    {
        var outcome = await RunApplianceAsync(arguments);
        Assert.True(outcome.ExitCode == 2, outcome.ToString());
        Assert.Contains(arguments[0], outcome.StdErr);
        Assert.Contains("usage: iscsisnap", outcome.StdErr);
        Assert.DoesNotContain("   at ", outcome.StdErr);
    }

    [Theory]
    [InlineData("--help")]
    [InlineData("-h")]
    public async Task Help_prints_usage_and_exits_0(string argument)
    {
        var outcome = await RunApplianceAsync(argument);
        Assert.True(outcome.ExitCode == 0, outcome.ToString());
        Assert.StartsWith("usage: iscsisnap", outcome.StdOut.TrimStart());
        foreach (var option in new[] { "--config", "--data", "--portal", "--web" })
            Assert.Contains(option, outcome.StdOut);
        Assert.Equal("", outcome.StdErr);
    }

    [Fact]
    public async Task A_target_declared_in_the_configuration_is_created_and_its_acl_and_chap_enforced()
    {
        using var dir = new TempDirectory();
        string name = UniqueTarget("declared");
        const string allowed = "iqn.2026-11.io.iscsisnap.test:declared-allowed";
        const string stranger = "iqn.2026-11.io.iscsisnap.test:declared-stranger";
        const string secret = "declared-secret-001";
        string image = Path.Combine(dir.Path, "declared.raw");
        var imageContent = new byte[1 << 20];
        Pattern(10, 77, 4).CopyTo(imageContent, 10 * 512);
        await File.WriteAllBytesAsync(image, imageContent);
        string config = Path.Combine(dir.Path, "appliance.json");
        await File.WriteAllTextAsync(config, JsonSerializer.Serialize(new
        {
            logging = new { level = "Information" },
            iscsi = new { maxBurstLength = 1048576, firstBurstLength = 262144 },
            targets = new object[]
            {
                new
                {
                    name,
                    alias = "declared in appliance.json",
                    allowedInitiators = new[] { allowed },
                    chap = new { userName = "declared", secret },
                    luns = new object[]
                    {
                        new { lun = 0, sizeBytes = 8L << 20 },
                        new { lun = 1, image, readOnly = true },
                    },
                },
            },
        }));

        string data = Path.Combine(dir.Path, "data");
        var appliance = await ApplianceProcess.StartAsync(dataDirectory: data, configFile: config);
        await using (appliance)
        {
            var target = await GetJsonAsync(appliance.Http, $"/api/v1/targets/{name}");
            Assert.Equal("declared in appliance.json", target.Str("alias"));
            Assert.Equal([allowed], target.GetProperty("allowedInitiators").EnumerateArray().Select(e => e.GetString()));
            Assert.Equal("declared", target.GetProperty("chap").Str("userName"));
            var luns = target.GetProperty("luns").EnumerateArray().ToList();
            Assert.Equal([0, 1], luns.Select(l => l.GetProperty("lun").GetInt32()));
            Assert.Equal(8L << 20, luns[0].GetProperty("sizeBytes").GetInt64());
            Assert.True(luns[0].GetProperty("managed").GetBoolean());
            Assert.Equal(image, luns[1].Str("image"));
            Assert.True(luns[1].GetProperty("readOnly").GetBoolean());

            Assert.Equal(0x0201, await LoginStatusAsync(appliance, name, allowed));                           // CHAP required
            Assert.Equal(0x0202, await LoginStatusAsync(appliance, name, stranger, "declared", secret));       // not in the ACL
            var initiator = await LoginAsync(appliance, name, allowed, "declared", secret, luns: [0, 1]);
            await using (initiator)
            {
                Assert.Equal((ulong)(8 << 20) / 512 - 1, (await initiator.ReadCapacity16Async()).LastLba);
                Assert.Equal(Pattern(10, 77, 4), await initiator.ReadAsync(10, 4, lun: 1));
                var refused = await initiator.RunAsync(Cdb.Write10(10, 1), 1, dataOut: new byte[512]);
                Assert.Equal(2, refused.Status);
                Assert.Equal(7, refused.SenseKey);   // DATA PROTECT: the declared LUN is read-only
                await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
            }
        }
        Assert.Equal(imageContent, await File.ReadAllBytesAsync(image));
    }
}
