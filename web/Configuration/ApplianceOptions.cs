using System.Text.RegularExpressions;
using ISCSISnap.Target.Hosting;

namespace ISCSISnap.Web.Configuration;

/// <summary>The appliance's configuration (appliance.json), validated once at start.</summary>
public sealed class ApplianceOptions
{
    public string DataDirectory { get; set; } = "./data";
    public WebOptions Web { get; set; } = new();
    public LoggingOptions Logging { get; set; } = new();
    public IscsiPortalOptions Iscsi { get; set; } = new();
    public FilterOptionsSection Filters { get; set; } = new();
    /// <summary>Created once, when the appliance starts with an empty catalog.</summary>
    public DemoTargetOptions? DemoTarget { get; set; }
    /// <summary>Targets declared here are created if missing and their settings applied at every start.</summary>
    public List<TargetDeclaration> Targets { get; set; } = [];

    /// <summary>Every problem, each naming its field.</summary>
    public List<string> Validate()
    {
        var errors = new List<string>();
        if (string.IsNullOrWhiteSpace(DataDirectory)) errors.Add("dataDirectory must not be empty");
        if (!Uri.TryCreate(Web.Url, UriKind.Absolute, out var url) || url.Scheme is not ("http" or "https") || url.AbsolutePath != "/")
            errors.Add($"web.url '{Web.Url}' is not an absolute http(s) URL without a path");
        if (!Enum.TryParse<Serilog.Events.LogEventLevel>(Logging.Level, true, out _))
            errors.Add($"logging.level '{Logging.Level}' is not one of Verbose, Debug, Information, Warning, Error, Fatal");
        if (!Enum.TryParse<Serilog.Events.LogEventLevel>(Logging.FileLevel, true, out _))
            errors.Add($"logging.fileLevel '{Logging.FileLevel}' is not one of Verbose, Debug, Information, Warning, Error, Fatal");
        if (Logging.RetainedFiles is < 1 or > 1000) errors.Add("logging.retainedFiles must be 1-1000");
        errors.AddRange(Iscsi.Validate());
        if (Filters.Workers is < 1 or > 64) errors.Add($"filters.workers {Filters.Workers} must be 1-64");
        if (Filters.MaxDepth is < 1 or > 32) errors.Add($"filters.maxDepth {Filters.MaxDepth} must be 1-32");
        if (string.IsNullOrWhiteSpace(Filters.PluginDirectory)) errors.Add("filters.pluginDirectory must not be empty");
        if (Filters.CacheBytes is < 0 or > 1L << 40 || Filters.CacheBytes is > 0 and < 4096) errors.Add($"filters.cacheBytes {Filters.CacheBytes} must be 0 or 4096 to 1 TiB");
        if (DemoTarget is { } demo)
        {
            if (!Names.IsValidTargetName(demo.Name)) errors.Add($"demoTarget.name '{demo.Name}' is not a valid iSCSI name (iqn., eui. or naa.)");
            if (!Names.IsValidLunSize(demo.SizeBytes)) errors.Add($"demoTarget.sizeBytes {demo.SizeBytes} must be a positive multiple of 4096 up to 64 TiB");
        }
        var seen = new HashSet<string>(StringComparer.OrdinalIgnoreCase);
        for (int i = 0; i < Targets.Count; i++)
            errors.AddRange(Targets[i].Validate($"targets[{i}]", seen));
        return errors;
    }
}

/// <summary>The IO filter engine: its kernel context (IO worker threads) and how deep upcalls may nest.</summary>
public sealed class FilterOptionsSection
{
    public int Workers { get; set; } = 2;
    public int MaxDepth { get; set; } = 8;
    /// <summary>Where plugin filter assemblies are found; relative to the data directory ("plugins" by default).</summary>
    public string PluginDirectory { get; set; } = "plugins";
    /// <summary>Bytes of the in-process block cache that filters reach through the cache syscalls (0: none, they are refused).</summary>
    public long CacheBytes { get; set; }
}

public sealed class WebOptions
{
    public string Url { get; set; } = "http://127.0.0.1:8080";
}

public sealed class LoggingOptions
{
    public string Level { get; set; } = "Information";
    public string FileLevel { get; set; } = "Information";
    public int RetainedFiles { get; set; } = 14;
}

public sealed class DemoTargetOptions
{
    public string Name { get; set; } = "iqn.2026-11.io.iscsisnap:demo";
    public string? Alias { get; set; }
    public long SizeBytes { get; set; } = 1L << 30;
}

public sealed class TargetDeclaration
{
    public string Name { get; set; } = "";
    public string? Alias { get; set; }
    public List<string> AllowedInitiators { get; set; } = [];
    public ChapCredentials? Chap { get; set; }
    public ChapCredentials? MutualChap { get; set; }
    public List<LunDeclaration> Luns { get; set; } = [];

    public IEnumerable<string> Validate(string field, HashSet<string> seenNames)
    {
        if (!Names.IsValidTargetName(Name)) yield return $"{field}.name '{Name}' is not a valid iSCSI name (iqn., eui. or naa.)";
        else if (!seenNames.Add(Name)) yield return $"{field}.name '{Name}' is declared twice";
        foreach (var initiator in AllowedInitiators)
            if (!Names.IsValidInitiatorName(initiator)) yield return $"{field}.allowedInitiators: '{initiator}' is not a valid iSCSI name";
        if (Chap is not null) foreach (var e in Chap.Validate($"{field}.chap")) yield return e;
        if (MutualChap is not null)
        {
            if (Chap is null) yield return $"{field}.mutualChap needs chap as well";
            foreach (var e in MutualChap.Validate($"{field}.mutualChap")) yield return e;
            if (Chap is not null && Chap.Secret == MutualChap.Secret) yield return $"{field}.mutualChap.secret must differ from chap.secret";
        }
        var luns = new HashSet<int>();
        for (int i = 0; i < Luns.Count; i++)
        {
            var lun = Luns[i];
            if (lun.Lun is < 0 or > 16383) yield return $"{field}.luns[{i}].lun {lun.Lun} must be 0-16383";
            else if (!luns.Add(lun.Lun)) yield return $"{field}.luns[{i}].lun {lun.Lun} is declared twice";
            if (lun.Image is null && !Names.IsValidLunSize(lun.SizeBytes)) yield return $"{field}.luns[{i}].sizeBytes {lun.SizeBytes} must be a positive multiple of 4096 up to 64 TiB";
            if (lun.BlockSize is not (512 or 4096)) yield return $"{field}.luns[{i}].blockSize must be 512 or 4096";
            if (lun.Filters is { } filters)
            {
                var types = new HashSet<string>();
                for (int f = 0; f < filters.Count; f++)
                {
                    foreach (var e in filters[f].Validate($"{field}.luns[{i}].filters[{f}]")) yield return e;
                    if (filters[f].Type != ISCSISnap.Storage.Filters.Configuration.FilterSpec.Plugin && !types.Add(filters[f].Type))
                        yield return $"{field}.luns[{i}].filters[{f}]: a LUN has one {filters[f].Type} filter";
                }
            }
        }
    }
}

public sealed class LunDeclaration
{
    public int Lun { get; set; }
    public long SizeBytes { get; set; }
    /// <summary>An existing raw image to serve instead of a new thin disk.</summary>
    public string? Image { get; set; }
    public int BlockSize { get; set; } = 512;
    public bool ReadOnly { get; set; }
    /// <summary>The LUN's filter stack, top first; when given it replaces the stack at every start (absent: the stack is managed through the API).</summary>
    public List<ISCSISnap.Storage.Filters.Configuration.FilterSpec>? Filters { get; set; }
}

/// <summary>iSCSI name rules (RFC 3720 §3.2.6, RFC 7143 §4.2.7).</summary>
public static partial class Names
{
    public const long MaxLunBytes = 64L << 40;

    [GeneratedRegex(@"^(iqn\.\d{4}-\d{2}(\.[a-z0-9\-]+)+(:[a-z0-9\-\.:]+)?|eui\.[0-9a-fA-F]{16}|naa\.([0-9a-fA-F]{16}|[0-9a-fA-F]{32}))$", RegexOptions.CultureInvariant)]
    private static partial Regex TargetNameRegex();

    public static bool IsValidTargetName(string? name) => name is { Length: > 0 and <= 223 } && TargetNameRegex().IsMatch(name);

    /// <summary>Initiator names are compared case-insensitively and some initiators use upper case: be lenient on case only.</summary>
    public static bool IsValidInitiatorName(string? name) => name is { Length: > 0 and <= 223 } && TargetNameRegex().IsMatch(name.ToLowerInvariant());

    public static bool IsValidLunSize(long bytes) => bytes > 0 && bytes % 4096 == 0 && bytes <= MaxLunBytes;
}
