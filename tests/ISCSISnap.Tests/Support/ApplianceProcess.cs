using System.Diagnostics;
using System.Net;
using System.Net.Http.Json;
using System.Net.Sockets;
using System.Text;

namespace ISCSISnap.Tests.Support;

/// <summary>
/// The real appliance executable started as a child process on free loopback ports with its own data
/// directory, the way an operator runs it. Used by real-client tests (libiscsi, QEMU) and shutdown tests.
/// </summary>
public sealed class ApplianceProcess : IAsyncDisposable
{
    public const string DemoTarget = "iqn.2026-11.io.iscsisnap:demo";

    private readonly Process _process;
    private readonly StringBuilder _output = new();
    private readonly bool _ownsData;

    private ApplianceProcess(Process process, string dataDirectory, int iscsiPort, int webPort, bool ownsData)
    {
        _process = process;
        DataDirectory = dataDirectory;
        IscsiPort = iscsiPort;
        WebPort = webPort;
        _ownsData = ownsData;
        Http = new HttpClient { BaseAddress = new Uri($"http://127.0.0.1:{webPort}"), Timeout = TimeSpan.FromSeconds(60) };
    }

    public string DataDirectory { get; }
    public int IscsiPort { get; }
    public int WebPort { get; }
    public HttpClient Http { get; }
    public int ProcessId => _process.Id;
    public string Output { get { lock (_output) return _output.ToString(); } }
    public IPEndPoint IscsiEndPoint => new(IPAddress.Loopback, IscsiPort);
    public string Url(string target = DemoTarget, int lun = 0) => $"iscsi://127.0.0.1:{IscsiPort}/{target}/{lun}";

    /// <summary>The built appliance (next to the test assembly's solution output).</summary>
    public static string ExecutablePath
    {
        get
        {
            // tests/ISCSISnap.Tests/bin/<Configuration>/net10.0 -> web/bin/<Configuration>/net10.0/iscsisnap.dll
            var here = new DirectoryInfo(AppContext.BaseDirectory);
            string configuration = here.Parent!.Name;
            string root = Path.GetFullPath(Path.Combine(AppContext.BaseDirectory, "..", "..", "..", "..", ".."));
            string dll = Path.Combine(root, "web", "bin", configuration, "net10.0", "iscsisnap.dll");
            if (!File.Exists(dll)) throw new FileNotFoundException($"build the solution first: {dll} is missing");
            return dll;
        }
    }

    public static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }

    /// <summary>Starts the appliance and waits until /healthz answers.</summary>
    public static async Task<ApplianceProcess> StartAsync(string? dataDirectory = null, string? configFile = null, int? iscsiPort = null, int? webPort = null)
    {
        bool owns = dataDirectory is null;
        dataDirectory ??= Path.Combine(Path.GetTempPath(), "iscsisnap-appliance-" + Guid.NewGuid().ToString("N")[..12]);
        int iscsi = iscsiPort ?? FreePort();
        int web = webPort ?? FreePort();
        var start = new ProcessStartInfo("dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        start.ArgumentList.Add(ExecutablePath);
        if (configFile is not null) { start.ArgumentList.Add("--config"); start.ArgumentList.Add(configFile); }
        start.ArgumentList.Add("--data"); start.ArgumentList.Add(dataDirectory);
        start.ArgumentList.Add("--portal"); start.ArgumentList.Add($"127.0.0.1:{iscsi}");
        start.ArgumentList.Add("--web"); start.ArgumentList.Add($"http://127.0.0.1:{web}");
        var process = Process.Start(start)!;
        var appliance = new ApplianceProcess(process, dataDirectory, iscsi, web, owns);
        process.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (appliance._output) appliance._output.AppendLine(e.Data); };
        process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (appliance._output) appliance._output.AppendLine(e.Data); };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while (DateTime.UtcNow < deadline)
        {
            if (process.HasExited) throw new InvalidOperationException($"the appliance exited with {process.ExitCode}:\n{appliance.Output}");
            try
            {
                using var response = await appliance.Http.GetAsync("/healthz");
                if (response.IsSuccessStatusCode) return appliance;
            }
            catch (HttpRequestException) { }
            await Task.Delay(100);
        }
        await appliance.DisposeAsync();
        throw new TimeoutException($"the appliance did not become healthy:\n{appliance.Output}");
    }

    /// <summary>Creates a target with one managed LUN through the REST API.</summary>
    public async Task CreateTargetAsync(string name, long lunBytes, object? access = null)
    {
        var created = await Http.PostAsJsonAsync("/api/v1/targets", new { name });
        created.EnsureSuccessStatusCode();
        var lun = await Http.PostAsJsonAsync($"/api/v1/targets/{name}/luns", new { lun = 0, sizeBytes = lunBytes });
        lun.EnsureSuccessStatusCode();
    }

    /// <summary>SIGTERM, then waits for the process to exit; returns its exit code.</summary>
    public async Task<int> StopAsync(TimeSpan? timeout = null)
    {
        if (_process.HasExited) return _process.ExitCode;
        Signal(15);
        using var cts = new CancellationTokenSource(timeout ?? TimeSpan.FromSeconds(30));
        await _process.WaitForExitAsync(cts.Token);
        return _process.ExitCode;
    }

    /// <summary>SIGKILL: the process dies at once, whatever it was doing.</summary>
    public async Task KillAsync()
    {
        if (_process.HasExited) return;
        Signal(9);
        await _process.WaitForExitAsync();
    }

    private void Signal(int signal)
    {
        using var kill = Process.Start("kill", $"-{signal} {_process.Id}");
        kill.WaitForExit();
    }

    public async ValueTask DisposeAsync()
    {
        try
        {
            if (!_process.HasExited) await StopAsync(TimeSpan.FromSeconds(15));
        }
        catch (OperationCanceledException)
        {
            _process.Kill(entireProcessTree: true);
        }
        _process.Dispose();
        Http.Dispose();
        if (_ownsData) try { Directory.Delete(DataDirectory, true); } catch (IOException) { }
    }
}

/// <summary>Runs external tools (libiscsi utilities, qemu-img, promtool) and insists they exist.</summary>
public static class Tool
{
    public sealed record Result(int ExitCode, string Output);

    public static string Require(string name)
    {
        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "/usr/bin").Split(':'))
        {
            string path = Path.Combine(dir, name);
            if (File.Exists(path)) return path;
        }
        throw new InvalidOperationException($"{name} is not installed: run tests/run.sh (it installs libiscsi-bin, qemu-utils, qemu-block-extra and prometheus)");
    }

    public static async Task<Result> RunAsync(string name, IEnumerable<string> arguments, TimeSpan? timeout = null, string? workingDirectory = null)
    {
        var start = new ProcessStartInfo(Require(name))
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = workingDirectory ?? Path.GetTempPath(),
        };
        foreach (var a in arguments) start.ArgumentList.Add(a);
        using var process = Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(timeout ?? TimeSpan.FromMinutes(5));
        try
        {
            await process.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            process.Kill(entireProcessTree: true);
            throw new TimeoutException($"{name} {string.Join(' ', arguments)} timed out");
        }
        return new Result(process.ExitCode, await stdout + await stderr);
    }
}
