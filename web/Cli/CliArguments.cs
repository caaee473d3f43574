namespace ISCSISnap.Web.Cli;

/// <summary>A CLI command's arguments: the positional ones, and options as <c>--name value</c> or <c>--name=value</c> (switches take none).</summary>
internal sealed class CliArguments
{
    public List<string> Positional { get; } = [];
    public Dictionary<string, string?> Options { get; } = new(StringComparer.Ordinal);
    public bool Help { get; private set; }
    /// <summary>The appliance's API: --web, else ISCSISNAP_URL, else the default.</summary>
    public string Url => Options.TryGetValue("--web", out var web) && web is not null ? web
        : Environment.GetEnvironmentVariable("ISCSISNAP_URL") ?? "http://127.0.0.1:8080";

    /// <summary>The arguments, or null with <paramref name="error"/> naming an unknown option or one missing its value.</summary>
    public static CliArguments? Parse(IReadOnlyList<string> args, string[] withValue, string[] switches, out string? error)
    {
        var parsed = new CliArguments();
        error = null;
        for (int i = 0; i < args.Count; i++)
        {
            string arg = args[i];
            if (arg is "-h" or "--help")
            {
                parsed.Help = true;
                return parsed;
            }
            if (switches.Contains(arg))
            {
                parsed.Options[arg] = null;
                continue;
            }
            if (arg.StartsWith("--", StringComparison.Ordinal))
            {
                int eq = arg.IndexOf('=');
                string name = eq > 0 ? arg[..eq] : arg;
                if (name != "--web" && !withValue.Contains(name))
                {
                    error = $"unknown option '{arg}'";
                    return null;
                }
                string? value = eq > 0 ? arg[(eq + 1)..] : i + 1 < args.Count ? args[++i] : null;
                if (value is null)
                {
                    error = $"{name} needs a value";
                    return null;
                }
                parsed.Options[name] = value;
                continue;
            }
            parsed.Positional.Add(arg);
        }
        return parsed;
    }
}
