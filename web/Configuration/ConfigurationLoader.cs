using System.Reflection;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace ISCSISnap.Web.Configuration;

/// <summary>Reads appliance.json (a file or the built-in copy), applies command-line overrides and validates.</summary>
public static class ConfigurationLoader
{
    public static readonly JsonSerializerOptions Json = new(JsonSerializerDefaults.Web)
    {
        ReadCommentHandling = JsonCommentHandling.Skip,
        AllowTrailingCommas = true,
        UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
        WriteIndented = true,
    };

    /// <summary>The options, or null with every problem in <paramref name="errors"/>, each prefixed by the source file.</summary>
    public static ApplianceOptions? Load(CommandLine commandLine, out List<string> errors)
    {
        errors = new List<string>();
        string source = commandLine.ConfigFile ?? "appliance.json (built in)";
        string text;
        try
        {
            text = commandLine.ConfigFile is { } file ? File.ReadAllText(file) : ReadEmbedded();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            errors.Add($"{source}: cannot read: {e.Message}");
            return null;
        }
        ApplianceOptions? options;
        try
        {
            options = JsonSerializer.Deserialize<ApplianceOptions>(text, Json);
        }
        catch (JsonException e)
        {
            errors.Add($"{source}: {Describe(e)}");
            return null;
        }
        if (options is null)
        {
            errors.Add($"{source}: the file is empty");
            return null;
        }
        if (commandLine.DataDirectory is { } data) options.DataDirectory = data;
        if (commandLine.Portal is { } portal) options.Iscsi.Portal = portal;
        if (commandLine.WebUrl is { } web) options.Web.Url = web;
        if (commandLine.ConfigFile is { } configFile && !Path.IsPathRooted(options.DataDirectory) && commandLine.DataDirectory is null)
        {
            // A relative data directory in a configuration file is relative to the current directory, like the default.
            options.DataDirectory = Path.GetFullPath(options.DataDirectory);
        }
        foreach (var error in options.Validate()) errors.Add($"{source}: {error}");
        return errors.Count == 0 ? options : null;
    }

    private static string Describe(JsonException e)
    {
        string where = e.Path is { Length: > 0 } path ? $" at {path}" : "";
        string line = e.LineNumber is { } l ? $" (line {l + 1})" : "";
        string message = e.Message;
        int cut = message.IndexOf(" Path:", StringComparison.Ordinal);
        if (cut > 0) message = message[..cut];
        return $"invalid JSON{where}{line}: {message}";
    }

    private static string ReadEmbedded()
    {
        using var stream = Assembly.GetExecutingAssembly().GetManifestResourceStream("appliance.json")
            ?? throw new IOException("the built-in appliance.json is missing from the executable");
        using var reader = new StreamReader(stream);
        return reader.ReadToEnd();
    }
}
