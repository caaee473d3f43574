using System.Globalization;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace ISCSISnap.Web.Cli;

/// <summary>
/// <c>iscsisnap disk ...</c>: the disk operations of a running appliance, through its REST API. Refusals print the
/// API's problem detail (naming the file and the fault) and exit 1; usage errors exit 2.
/// </summary>
public static class DiskCli
{
    public const string Usage = """
        usage: iscsisnap disk [--web URL] COMMAND ...
          list                                  disks, their sizes, chains and LUNs
          show DISK                             one disk (DISK is its name or ID)
          create NAME --size SIZE [--block-size SIZE] [--sector-size 512|4096]
          import NAME IMAGE [--sector-size 512|4096]
                                                a VHDX, raw image or the newest .avhdx of a Hyper-V checkpoint chain
          grow DISK SIZE                        grow (never shrink); the LUN's initiators see CAPACITY DATA HAS CHANGED
          delete DISK
          snapshot DISK [NAME]                  freeze the head as a snapshot (instant)
          snapshots DISK                        the snapshot tree of a disk
          clone DISK SNAPSHOT NAME              a new disk on a snapshot (a linked clone)
          revert DISK SNAPSHOT [--force]        point the disk back at a snapshot
          delete-snapshot DISK SNAPSHOT [--wait]
                                                merge the snapshot away (a job; --wait follows it)
          export DISK PATH [--format vhdx|raw] [--snapshot SNAPSHOT] [--wait]
          job ID                                a job's state and progress
        SIZE takes K, M, G, T suffixes (powers of 1024). --web defaults to http://127.0.0.1:8080.
        """;

    public static async Task<int> RunAsync(IReadOnlyList<string> args, TextWriter stdout, TextWriter stderr)
    {
        var arguments = CliArguments.Parse(args, ["--size", "--block-size", "--sector-size", "--format", "--snapshot"], ["--force", "--wait"], out var error);
        if (arguments is null) return UsageError(stderr, error!);
        if (arguments.Help)
        {
            stdout.WriteLine(Usage);
            return 0;
        }
        var (positional, flags, url) = (arguments.Positional, arguments.Options, arguments.Url);
        if (positional.Count == 0) return UsageError(stderr, "a command is required");
        if (!Uri.TryCreate(url, UriKind.Absolute, out var baseUri)) return UsageError(stderr, $"--web '{url}' is not a URL");

        using var http = new HttpClient { BaseAddress = baseUri, Timeout = TimeSpan.FromMinutes(10) };
        var client = new ApiClient(http, stdout, stderr);
        string command = positional[0];
        var p = positional.Skip(1).ToList();
        try
        {
            switch (command)
            {
                case "list" when p.Count == 0:
                    return await client.PrintAsync(HttpMethod.Get, "/api/v1/disks", null, PrintDisks);
                case "show" when p.Count == 1:
                    return await client.PrintAsync(HttpMethod.Get, $"/api/v1/disks/{Esc(p[0])}", null, null);
                case "create" when p.Count == 1:
                {
                    if (!flags.TryGetValue("--size", out var size)) return UsageError(stderr, "create needs --size");
                    var body = new JsonObject { ["name"] = p[0], ["sizeBytes"] = ParseSize(size!, "--size") };
                    if (flags.TryGetValue("--block-size", out var block)) body["blockSize"] = ParseSize(block!, "--block-size");
                    if (flags.TryGetValue("--sector-size", out var sector)) body["sectorSize"] = ParseSize(sector!, "--sector-size");
                    return await client.PrintAsync(HttpMethod.Post, "/api/v1/disks", body, null);
                }
                case "import" when p.Count == 2:
                {
                    var body = new JsonObject { ["name"] = p[0], ["image"] = Path.GetFullPath(p[1]) };
                    if (flags.TryGetValue("--sector-size", out var sector)) body["sectorSize"] = ParseSize(sector!, "--sector-size");
                    return await client.PrintAsync(HttpMethod.Post, "/api/v1/disks", body, null);
                }
                case "grow" when p.Count == 2:
                    return await client.PrintAsync(HttpMethod.Patch, $"/api/v1/disks/{Esc(p[0])}", new JsonObject { ["sizeBytes"] = ParseSize(p[1], "SIZE") }, null);
                case "delete" when p.Count == 1:
                    return await client.PrintAsync(HttpMethod.Delete, $"/api/v1/disks/{Esc(p[0])}", null, null);
                case "snapshot" when p.Count is 1 or 2:
                    return await client.PrintAsync(HttpMethod.Post, $"/api/v1/disks/{Esc(p[0])}/snapshots",
                        new JsonObject { ["name"] = p.Count == 2 ? p[1] : null }, null);
                case "snapshots" when p.Count == 1:
                    return await client.PrintAsync(HttpMethod.Get, $"/api/v1/disks/{Esc(p[0])}/snapshots", null, PrintSnapshots);
                case "clone" when p.Count == 3:
                    return await client.PrintAsync(HttpMethod.Post, $"/api/v1/disks/{Esc(p[0])}/snapshots/{Esc(p[1])}/clone", new JsonObject { ["name"] = p[2] }, null);
                case "revert" when p.Count == 2:
                    return await client.PrintAsync(HttpMethod.Post, $"/api/v1/disks/{Esc(p[0])}/revert",
                        new JsonObject { ["snapshot"] = p[1], ["force"] = flags.ContainsKey("--force") }, null);
                case "delete-snapshot" when p.Count == 2:
                    return await client.JobAsync(HttpMethod.Delete, $"/api/v1/disks/{Esc(p[0])}/snapshots/{Esc(p[1])}", null, flags.ContainsKey("--wait"));
                case "export" when p.Count == 2:
                {
                    var body = new JsonObject { ["path"] = Path.GetFullPath(p[1]), ["format"] = flags.GetValueOrDefault("--format") ?? "vhdx" };
                    if (flags.TryGetValue("--snapshot", out var snapshot)) body["snapshot"] = snapshot;
                    return await client.JobAsync(HttpMethod.Post, $"/api/v1/disks/{Esc(p[0])}/export", body, flags.ContainsKey("--wait"));
                }
                case "job" when p.Count == 1:
                    return await client.PrintAsync(HttpMethod.Get, $"/api/v1/jobs/{Esc(p[0])}", null, null);
                default:
                    return UsageError(stderr, $"'{string.Join(' ', positional)}' is not a disk command (or has the wrong number of arguments)");
            }
        }
        catch (FormatException e)
        {
            return UsageError(stderr, e.Message);
        }
        catch (HttpRequestException e)
        {
            stderr.WriteLine($"iscsisnap: cannot reach the appliance at {url}: {e.Message}");
            return 1;
        }
    }

    private static string Esc(string value) => Uri.EscapeDataString(value);

    private static int UsageError(TextWriter stderr, string message)
    {
        stderr.WriteLine($"iscsisnap: {message}");
        stderr.WriteLine(Usage);
        return 2;
    }

    /// <summary>"512", "64M", "1G", "1T" → bytes.</summary>
    public static long ParseSize(string text, string what)
    {
        text = text.Trim();
        long multiplier = 1;
        if (text.Length > 0 && char.IsLetter(text[^1]))
        {
            multiplier = char.ToUpperInvariant(text[^1]) switch
            {
                'K' => 1L << 10, 'M' => 1L << 20, 'G' => 1L << 30, 'T' => 1L << 40,
                _ => throw new FormatException($"{what} '{text}': the suffix must be K, M, G or T"),
            };
            text = text[..^1];
        }
        if (!long.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out long value) || value > long.MaxValue / multiplier)
            throw new FormatException($"{what} '{text}' is not a size");
        return value * multiplier;
    }

    private static void PrintDisks(JsonNode node, TextWriter stdout)
    {
        stdout.WriteLine($"{"NAME",-24} {"SIZE",12} {"LAYERS",6}  {"LUN",-40} ID");
        foreach (var disk in node.AsArray())
        {
            var lun = disk!["servedBy"];
            string served = lun is null ? "-" : $"{lun["target"]}/{lun["lun"]}";
            stdout.WriteLine($"{disk["name"],-24} {FormatSize(disk["sizeBytes"]!.GetValue<long>()),12} {disk["chain"]!.AsArray().Count,6}  {served,-40} {disk["id"]}");
        }
    }

    private static void PrintSnapshots(JsonNode node, TextWriter stdout)
    {
        var all = node.AsArray().Select(s => s!).ToList();
        var ids = all.Select(s => s["id"]!.GetValue<string>()).ToHashSet();
        void Print(JsonNode snapshot, int depth)
        {
            string children = snapshot["disks"]!.AsArray().Count is int d and > 0 ? $"  [{d} disk head(s) on it]" : "";
            stdout.WriteLine($"{new string(' ', depth * 2)}{snapshot["name"]}  {snapshot["id"]}  {snapshot["frozenAt"]}{children}");
            foreach (var child in all.Where(s => s["parentId"]?.GetValue<string>() == snapshot["id"]!.GetValue<string>())) Print(child, depth + 1);
        }
        foreach (var root in all.Where(s => s["parentId"] is null || !ids.Contains(s["parentId"]!.GetValue<string>()))) Print(root, 0);
    }

    private static string FormatSize(long bytes) => bytes switch
    {
        >= 1L << 40 when bytes % (1L << 40) == 0 => $"{bytes >> 40}T",
        >= 1L << 30 when bytes % (1L << 30) == 0 => $"{bytes >> 30}G",
        >= 1L << 20 when bytes % (1L << 20) == 0 => $"{bytes >> 20}M",
        _ => bytes.ToString(CultureInfo.InvariantCulture),
    };
}
