namespace ISCSISnap.Web.Configuration;

/// <summary>The appliance's command line: <c>[--config FILE] [--data DIR] [--portal HOST:PORT] [--web URL]</c>.</summary>
public sealed record CommandLine(string? ConfigFile, string? DataDirectory, string? Portal, string? WebUrl, bool Help)
{
    public const string Usage = """
        usage: iscsisnap [--config FILE] [--data DIR] [--portal HOST:PORT] [--web URL]
               iscsisnap disk COMMAND ...   (manage the disks of a running appliance; iscsisnap disk --help)
               iscsisnap filter COMMAND ... (manage LUN filter stacks of a running appliance; iscsisnap filter --help)
          --config FILE      appliance configuration (default: the built-in appliance.json)
          --data DIR         data directory: catalog, images, logs (default from the configuration: ./data)
          --portal HOST:PORT iSCSI portal to listen on (default 0.0.0.0:3260)
          --web URL          web console, REST API and /metrics (default http://127.0.0.1:8080)
        """;

    public static CommandLine Parse(IReadOnlyList<string> args, out string? error)
    {
        string? config = null, data = null, portal = null, web = null;
        bool help = false;
        error = null;
        for (int i = 0; i < args.Count; i++)
        {
            string arg = args[i];
            string? value = null;
            int eq = arg.IndexOf('=');
            string name = eq > 0 && arg.StartsWith("--", StringComparison.Ordinal) ? arg[..eq] : arg;
            if (eq > 0 && arg.StartsWith("--", StringComparison.Ordinal)) value = arg[(eq + 1)..];
            switch (name)
            {
                case "-h" or "--help":
                    help = true;
                    continue;
                case "--config" or "--data" or "--portal" or "--web":
                    if (value is null)
                    {
                        if (i + 1 >= args.Count || args[i + 1].StartsWith("--", StringComparison.Ordinal))
                        {
                            error = $"{name} needs a value";
                            return new(null, null, null, null, false);
                        }
                        value = args[++i];
                    }
                    break;
                default:
                    error = $"unknown argument '{arg}'";
                    return new(null, null, null, null, false);
            }
            switch (name)
            {
                case "--config": config = value; break;
                case "--data": data = value; break;
                case "--portal": portal = value; break;
                case "--web": web = value; break;
            }
        }
        return new(config, data, portal, web, help);
    }
}
