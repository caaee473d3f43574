using System.Globalization;
using System.Text.Json.Nodes;

namespace ISCSISnap.Web.Cli;

/// <summary>
/// <c>iscsisnap filter ...</c>: a LUN's IO filter stack on a running appliance, through its REST API. Refusals print
/// the API's problem detail and exit 1; usage errors exit 2.
/// </summary>
public static class FilterCli
{
    public const string Usage = """
        usage: iscsisnap filter [--web URL] COMMAND ...
          list TARGET LUN                       the LUN's filter stack, top first, with upcalls, faults and counters
          add TARGET LUN TYPE [KEY=VALUE ...] [--position N]
                                                TYPE is checksum, qos, trace or plugin; KEYs are the filter's settings
                                                (iopsPerLun=5000, sampleEvery=16, onFault=fail, assembly=x.dll,
                                                typeName=Ns.Filter, settings.key=1, ...); --position 0 puts it on top
          qos TARGET LUN KEY=VALUE ...          change the qos filter's caps live (0 = unlimited)
          release TARGET LUN NAME               let a quarantined filter run again
          remove TARGET LUN NAME                take a filter off the live LUN
          trace TARGET LUN [--limit N]          the newest records of the LUN's trace filter
        --web defaults to http://127.0.0.1:8080.
        """;

    public static async Task<int> RunAsync(IReadOnlyList<string> args, TextWriter stdout, TextWriter stderr)
    {
        var arguments = CliArguments.Parse(args, ["--position", "--limit"], [], out var error);
        if (arguments is null) return UsageError(stderr, error!);
        if (arguments.Help)
        {
            stdout.WriteLine(Usage);
            return 0;
        }
        var (positional, flags, url) = (arguments.Positional, arguments.Options, arguments.Url);
        if (positional.Count < 3) return UsageError(stderr, "a command, a target and a LUN are required");
        if (!Uri.TryCreate(url, UriKind.Absolute, out var baseUri)) return UsageError(stderr, $"--web '{url}' is not a URL");
        if (!int.TryParse(positional[2], NumberStyles.None, CultureInfo.InvariantCulture, out int lun)) return UsageError(stderr, $"LUN '{positional[2]}' is not a number");

        using var http = new HttpClient { BaseAddress = baseUri, Timeout = TimeSpan.FromMinutes(2) };
        var client = new ApiClient(http, stdout, stderr);
        string command = positional[0];
        string filters = $"/api/v1/targets/{Uri.EscapeDataString(positional[1])}/luns/{lun}/filters";
        var rest = positional.Skip(3).ToList();
        try
        {
            switch (command)
            {
                case "list" when rest.Count == 0:
                    return await client.PrintAsync(HttpMethod.Get, filters, null, PrintStack);
                case "add" when rest.Count >= 1:
                {
                    var body = Settings(rest.Skip(1));
                    body["type"] = rest[0];
                    if (flags.TryGetValue("--position", out var position)) body["position"] = Number(position!, "--position");
                    return await client.PrintAsync(HttpMethod.Post, filters, body, null);
                }
                case "qos" when rest.Count >= 1:
                    return await client.PrintAsync(HttpMethod.Patch, $"{filters}/qos", Settings(rest), null);
                case "release" when rest.Count == 1:
                    return await client.PrintAsync(HttpMethod.Post, $"{filters}/{Uri.EscapeDataString(rest[0])}/release", null, null);
                case "remove" when rest.Count == 1:
                    return await client.PrintAsync(HttpMethod.Delete, $"{filters}/{Uri.EscapeDataString(rest[0])}", null, null);
                case "trace" when rest.Count == 0:
                {
                    string limit = flags.TryGetValue("--limit", out var l) ? $"?limit={Number(l!, "--limit")}" : "";
                    return await client.PrintAsync(HttpMethod.Get, $"/api/v1/targets/{Uri.EscapeDataString(positional[1])}/luns/{lun}/trace{limit}", null, PrintTrace);
                }
                default:
                    return UsageError(stderr, $"'{string.Join(' ', positional)}' is not a filter command (or has the wrong number of arguments)");
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

    /// <summary>KEY=VALUE arguments as a filter spec: whole numbers as numbers, "settings.X=V" into the plugin's settings.</summary>
    private static JsonObject Settings(IEnumerable<string> pairs)
    {
        var body = new JsonObject();
        foreach (var pair in pairs)
        {
            int eq = pair.IndexOf('=');
            if (eq <= 0) throw new FormatException($"'{pair}' is not KEY=VALUE");
            string key = pair[..eq], value = pair[(eq + 1)..];
            if (key.StartsWith("settings.", StringComparison.Ordinal))
            {
                var settings = body["settings"] as JsonObject ?? (JsonObject)(body["settings"] = new JsonObject());
                settings[key["settings.".Length..]] = value;   // plugin settings are strings
            }
            else body[key] = long.TryParse(value, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out long number) ? number : value;
        }
        return body;
    }

    private static long Number(string text, string what) =>
        long.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out long value) ? value : throw new FormatException($"{what} '{text}' is not a number");

    private static int UsageError(TextWriter stderr, string message)
    {
        stderr.WriteLine($"iscsisnap: {message}");
        stderr.WriteLine(Usage);
        return 2;
    }

    private static void PrintStack(JsonNode node, TextWriter stdout)
    {
        stdout.WriteLine($"{"#",2} {"NAME",-12} {"TYPE",-9} {"ON FAULT",-8} {"UPCALLS",12} {"FAULTS",7}  COUNTERS");
        foreach (var filter in node.AsArray())
        {
            string state = filter!["quarantined"]!.GetValue<bool>() ? " (quarantined)" : "";
            string counters = string.Join(' ', filter["counters"]!.AsObject().Select(c => $"{c.Key}={c.Value}"));
            stdout.WriteLine($"{filter["position"],2} {filter["name"],-12} {filter["type"]?.GetValue<string>() ?? "-",-9} {filter["onFault"],-8} {filter["upcalls"],12} {filter["faults"],7}  {counters}{state}");
        }
    }

    private static void PrintTrace(JsonNode node, TextWriter stdout)
    {
        stdout.WriteLine($"{"AT",-28} {"OP",-5} {"OFFSET",14} {"LENGTH",9} {"LATENCY µs",11}  INITIATOR  VERDICTS");
        foreach (var record in node.AsArray())
        {
            string latency = record!["latencyMicroseconds"] is { } l ? l.GetValue<double>().ToString("F1", CultureInfo.InvariantCulture) : "-";
            stdout.WriteLine($"{record["at"],-28} {record["operation"],-5} {record["offset"],14} {record["length"],9} {latency,11}  {record["initiator"]}  {record["verdicts"]}");
        }
    }
}
