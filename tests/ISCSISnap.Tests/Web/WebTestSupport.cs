using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Web;

/// <summary>One appliance process (the real executable) shared by the tests of a class.</summary>
public sealed class WebApplianceFixture : IAsyncLifetime
{
    public ApplianceProcess Appliance { get; private set; } = null!;

    public async Task InitializeAsync() => Appliance = await ApplianceProcess.StartAsync();

    public async Task DisposeAsync() => await Appliance.DisposeAsync();
}

/// <summary>What an external process did: exit code, standard output and standard error apart.</summary>
public sealed record ProcessOutcome(int ExitCode, string StdOut, string StdErr)
{
    public override string ToString() => $"exit {ExitCode}\n--- stdout\n{StdOut}\n--- stderr\n{StdErr}";
}

/// <summary>Helpers shared by the web host tests: HTTP, problem details, iSCSI logins, data patterns, metrics, processes.</summary>
public static class WebTest
{
    public const string Initiator = "iqn.2026-11.io.iscsisnap.test:web-initiator";

    private static int s_counter;

    /// <summary>A target name no other test uses.</summary>
    public static string UniqueTarget(string what) =>
        $"iqn.2026-11.io.iscsisnap.test:{what}-{Interlocked.Increment(ref s_counter)}-{Guid.NewGuid().ToString("N")[..6]}";

    // ---------------------------------------------------------------- HTTP

    public static async Task<HttpResponseMessage> SendAsync(HttpClient http, HttpMethod method, string path, string? body = null,
        string? contentType = "application/json")
    {
        using var request = new HttpRequestMessage(method, path);
        if (body is not null)
        {
            request.Content = new ByteArrayContent(Encoding.UTF8.GetBytes(body));
            if (contentType is not null) request.Content.Headers.ContentType = MediaTypeHeaderValue.Parse(contentType);
        }
        return await http.SendAsync(request);
    }

    public static Task<HttpResponseMessage> PostAsync(HttpClient http, string path, object body) =>
        SendAsync(http, HttpMethod.Post, path, JsonSerializer.Serialize(body));

    public static Task<HttpResponseMessage> PutAsync(HttpClient http, string path, object body) =>
        SendAsync(http, HttpMethod.Put, path, JsonSerializer.Serialize(body));

    public static Task<HttpResponseMessage> PatchAsync(HttpClient http, string path, object body) =>
        SendAsync(http, HttpMethod.Patch, path, JsonSerializer.Serialize(body));

    /// <summary>Asserts the status and parses the JSON body.</summary>
    public static async Task<JsonElement> JsonAsync(HttpResponseMessage response, int expectedStatus)
    {
        string text = await response.Content.ReadAsStringAsync();
        Assert.True((int)response.StatusCode == expectedStatus,
            $"{response.RequestMessage?.Method} {response.RequestMessage?.RequestUri}: expected {expectedStatus}, got {(int)response.StatusCode}: {text}");
        if (expectedStatus == 204) return default;
        Assert.Equal("application/json", response.Content.Headers.ContentType?.MediaType);
        return JsonDocument.Parse(text).RootElement.Clone();
    }

    public static async Task<JsonElement> GetJsonAsync(HttpClient http, string path)
    {
        using var response = await http.GetAsync(path);
        return await JsonAsync(response, 200);
    }

    /// <summary>
    /// Asserts an RFC 7807 problem: the status, Content-Type application/problem+json, a status member equal to the
    /// HTTP status, a title and a detail, and the field at fault when one is expected.
    /// </summary>
    public static async Task<JsonElement> AssertProblemAsync(HttpResponseMessage response, int status, string? field = null)
    {
        string text = await response.Content.ReadAsStringAsync();
        string what = $"{response.RequestMessage?.Method} {response.RequestMessage?.RequestUri} -> {(int)response.StatusCode} {response.Content.Headers.ContentType}: {text}";
        Assert.True((int)response.StatusCode == status, $"expected {status}: {what}");
        Assert.True(response.Content.Headers.ContentType?.MediaType == "application/problem+json", $"expected application/problem+json: {what}");
        var problem = JsonDocument.Parse(text).RootElement.Clone();
        Assert.True(problem.TryGetProperty("status", out var s) && s.GetInt32() == status, $"status member: {what}");
        Assert.True(problem.TryGetProperty("title", out var title) && !string.IsNullOrWhiteSpace(title.GetString()), $"title member: {what}");
        Assert.True(problem.TryGetProperty("detail", out var detail) && !string.IsNullOrWhiteSpace(detail.GetString()), $"detail member: {what}");
        if (field is not null)
            Assert.True(problem.TryGetProperty("field", out var f) && f.GetString() == field, $"expected field '{field}': {what}");
        return problem;
    }

    public static string? Str(this JsonElement element, string property) =>
        element.TryGetProperty(property, out var value) && value.ValueKind == JsonValueKind.String ? value.GetString() : null;

    // ---------------------------------------------------------------- iSCSI

    /// <summary>Connects and logs in; the caller disposes the initiator whatever the outcome.</summary>
    public static async Task<(TestInitiator Initiator, LoginResult Result)> TryLoginAsync(ApplianceProcess appliance, string target,
        string initiatorName = Initiator, string? chapUser = null, string? chapSecret = null, string? mutualUser = null, string? mutualSecret = null)
    {
        var initiator = await TestInitiator.ConnectAsync(appliance.IscsiEndPoint);
        try
        {
            var result = await initiator.LoginAsync(new LoginOptions
            {
                TargetName = target,
                InitiatorName = initiatorName,
                ChapUser = chapUser,
                ChapSecret = chapSecret,
                MutualChapUser = mutualUser,
                MutualChapSecret = mutualSecret,
            }).WaitAsync(TimeSpan.FromSeconds(15));
            return (initiator, result);
        }
        catch
        {
            await initiator.DisposeAsync();
            throw;
        }
    }

    /// <summary>The login status alone (0 = success); the connection is closed afterwards.</summary>
    public static async Task<ushort> LoginStatusAsync(ApplianceProcess appliance, string target, string initiatorName = Initiator,
        string? chapUser = null, string? chapSecret = null, string? mutualUser = null, string? mutualSecret = null)
    {
        var (initiator, result) = await TryLoginAsync(appliance, target, initiatorName, chapUser, chapSecret, mutualUser, mutualSecret);
        await using (initiator)
        {
            if (result.Succeeded) await initiator.LogoutAsync().WaitAsync(TimeSpan.FromSeconds(10));
            return result.Status;
        }
    }

    /// <summary>A logged-in session with the unit attentions of login cleared on <paramref name="luns"/>.</summary>
    public static async Task<TestInitiator> LoginAsync(ApplianceProcess appliance, string target, string initiatorName = Initiator,
        string? chapUser = null, string? chapSecret = null, string? mutualUser = null, string? mutualSecret = null, ulong[]? luns = null)
    {
        var (initiator, result) = await TryLoginAsync(appliance, target, initiatorName, chapUser, chapSecret, mutualUser, mutualSecret);
        if (!result.Succeeded)
        {
            await initiator.DisposeAsync();
            throw new InvalidOperationException($"login of {initiatorName} to {target} failed with status 0x{result.Status:x4}");
        }
        foreach (var lun in luns ?? [0]) await initiator.ClearUnitAttentionsAsync(lun).WaitAsync(TimeSpan.FromSeconds(10));
        return initiator;
    }

    public static Task<ScsiResult> RunAsync(this TestInitiator initiator, byte[] cdb, ulong lun = 0, int expectedDataIn = 0, byte[]? dataOut = null) =>
        initiator.ExecuteAsync(cdb, lun, expectedDataIn, dataOut).WaitAsync(TimeSpan.FromSeconds(15));

    /// <summary>READ CAPACITY(16): the last LBA and the block length.</summary>
    public static async Task<(ulong LastLba, uint BlockLength)> ReadCapacity16Async(this TestInitiator initiator, ulong lun = 0)
    {
        var result = await initiator.RunAsync(Cdb.ReadCapacity16(), lun, 32);
        Assert.True(result.Good, $"READ CAPACITY(16): status {result.Status}, sense {result.SenseKey:x}/{result.AscAscq:x4}");
        return (BinaryPrimitives.ReadUInt64BigEndian(result.DataIn), BinaryPrimitives.ReadUInt32BigEndian(result.DataIn.AsSpan(8)));
    }

    public static async Task WriteAsync(this TestInitiator initiator, uint lba, byte[] data, ulong lun = 0, byte flags = 0, int blockSize = 512)
    {
        var result = await initiator.RunAsync(Cdb.Write10(lba, (ushort)(data.Length / blockSize), flags), lun, dataOut: data);
        Assert.True(result.Good, $"WRITE(10) at {lba}: status {result.Status}, sense {result.SenseKey:x}/{result.AscAscq:x4}");
    }

    public static async Task<byte[]> ReadAsync(this TestInitiator initiator, uint lba, int blocks, ulong lun = 0, int blockSize = 512)
    {
        var result = await initiator.RunAsync(Cdb.Read10(lba, (ushort)blocks), lun, blocks * blockSize);
        Assert.True(result.Good, $"READ(10) at {lba}: status {result.Status}, sense {result.SenseKey:x}/{result.AscAscq:x4}");
        Assert.Equal(blocks * blockSize, result.DataIn.Length);
        return result.DataIn;
    }

    /// <summary>A block no other LBA, seed or block size produces: the LBA and seed up front, then bytes derived from both.</summary>
    public static byte[] Pattern(ulong lba, ulong seed, int blocks = 1, int blockSize = 512)
    {
        var data = new byte[blocks * blockSize];
        for (int b = 0; b < blocks; b++)
        {
            ulong block = lba + (ulong)b;
            var span = data.AsSpan(b * blockSize, blockSize);
            BinaryPrimitives.WriteUInt64BigEndian(span, block);
            BinaryPrimitives.WriteUInt64BigEndian(span[8..], seed);
            for (int i = 16; i < blockSize; i++) span[i] = (byte)(block * 131 + seed * 7 + (ulong)i * 17);
        }
        return data;
    }

    // ---------------------------------------------------------------- metrics

    /// <summary>Reads /metrics and parses its samples.</summary>
    public static async Task<MetricsScrape> ScrapeAsync(ApplianceProcess appliance)
    {
        using var response = await appliance.Http.GetAsync("/metrics");
        Assert.Equal(200, (int)response.StatusCode);
        return MetricsScrape.Parse(await response.Content.ReadAsStringAsync());
    }

    /// <summary>Polls <paramref name="condition"/> until it holds or the time is up; returns whether it held.</summary>
    public static async Task<bool> EventuallyAsync(Func<Task<bool>> condition, TimeSpan? within = null)
    {
        var deadline = DateTime.UtcNow + (within ?? TimeSpan.FromSeconds(10));
        while (true)
        {
            if (await condition()) return true;
            if (DateTime.UtcNow > deadline) return false;
            await Task.Delay(50);
        }
    }

    // ---------------------------------------------------------------- processes

    /// <summary>Runs a process to its end (killed and reported after <paramref name="timeout"/>), optionally feeding stdin.</summary>
    public static async Task<ProcessOutcome> RunProcessAsync(string file, IEnumerable<string> arguments, string? stdin = null, TimeSpan? timeout = null)
    {
        var start = new ProcessStartInfo(file)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = stdin is not null,
            UseShellExecute = false,
            WorkingDirectory = Path.GetTempPath(),
        };
        foreach (var a in arguments) start.ArgumentList.Add(a);
        using var process = Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        if (stdin is not null)
        {
            await process.StandardInput.WriteAsync(stdin);
            process.StandardInput.Close();
        }
        using var cts = new CancellationTokenSource(timeout ?? TimeSpan.FromSeconds(30));
        try
        {
            await process.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync();
            throw new TimeoutException($"{file} {string.Join(' ', start.ArgumentList)} did not exit in time:\n{await stdout}\n{await stderr}");
        }
        return new ProcessOutcome(process.ExitCode, await stdout, await stderr);
    }

    /// <summary>Runs the built appliance executable with these arguments.</summary>
    public static Task<ProcessOutcome> RunApplianceAsync(params string[] arguments) =>
        RunProcessAsync("dotnet", [ApplianceProcess.ExecutablePath, .. arguments], timeout: TimeSpan.FromSeconds(30));

    /// <summary>Every line of the appliance's JSON log files (read while the appliance may still be writing them).</summary>
    public static List<string> LogLines(string dataDirectory)
    {
        var lines = new List<string>();
        foreach (var file in LogFiles(dataDirectory))
        {
            using var stream = new FileStream(file, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
            using var reader = new StreamReader(stream);
            while (reader.ReadLine() is { } line)
                if (line.Length > 0) lines.Add(line);
        }
        return lines;
    }

    public static string[] LogFiles(string dataDirectory)
    {
        string logs = Path.Combine(dataDirectory, "logs");
        return Directory.Exists(logs) ? Directory.GetFiles(logs, "iscsisnap-*.log") : [];
    }
}

/// <summary>Samples of one Prometheus text exposition.</summary>
public sealed class MetricsScrape
{
    private readonly List<(string Name, Dictionary<string, string> Labels, double Value)> _samples = [];

    public string Text { get; private init; } = "";

    public static MetricsScrape Parse(string text)
    {
        var scrape = new MetricsScrape { Text = text };
        foreach (var raw in text.Split('\n'))
        {
            string line = raw.Trim();
            if (line.Length == 0 || line.StartsWith('#')) continue;
            int brace = line.IndexOf('{');
            int space = line.LastIndexOf(' ');
            string name;
            var labels = new Dictionary<string, string>();
            if (brace >= 0 && brace < space)
            {
                name = line[..brace];
                int close = line.LastIndexOf('}');
                foreach (var pair in SplitLabels(line[(brace + 1)..close]))
                {
                    int eq = pair.IndexOf('=');
                    labels[pair[..eq].Trim()] = pair[(eq + 1)..].Trim().Trim('"');
                }
            }
            else name = line[..space];
            double value = double.Parse(line[(space + 1)..], NumberStyles.Float, CultureInfo.InvariantCulture);
            scrape._samples.Add((name, labels, value));
        }
        return scrape;
    }

    private static IEnumerable<string> SplitLabels(string labels)
    {
        var current = new StringBuilder();
        bool quoted = false;
        foreach (char c in labels)
        {
            if (c == '"') quoted = !quoted;
            if (c == ',' && !quoted)
            {
                yield return current.ToString();
                current.Clear();
                continue;
            }
            current.Append(c);
        }
        if (current.Length > 0) yield return current.ToString();
    }

    public bool Has(string name) => _samples.Any(s => s.Name == name);

    /// <summary>The sum of every sample of <paramref name="name"/> carrying these labels (0 when there is none).</summary>
    public double Sum(string name, params (string Label, string Value)[] labels) =>
        _samples.Where(s => s.Name == name && labels.All(l => s.Labels.TryGetValue(l.Label, out var v) && v == l.Value)).Sum(s => s.Value);
}
