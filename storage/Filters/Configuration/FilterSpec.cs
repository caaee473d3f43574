using ISCSISnap.Storage.BlockDevices;

namespace ISCSISnap.Storage.Filters.Configuration;

/// <summary>
/// One filter of a LUN's stack as configured (appliance.json, the REST API, the catalog): its type, the engine's
/// limits for it and its own settings. Fields a type does not use must be left out.
/// </summary>
public class FilterSpec
{
    public const string Checksum = "checksum", Qos = "qos", Trace = "trace", Plugin = "plugin";
    public static readonly IReadOnlyList<string> Types = [Checksum, Qos, Trace, Plugin];

    /// <summary>checksum, qos, trace, or plugin (a filter class in an assembly of the plugin directory).</summary>
    public string Type { get; set; } = "";

    /// <summary>The filter's name in the stack: the type for a built-in filter, the class's own name for a plugin (filled in when it is added).</summary>
    public string? Name { get; set; }

    // What the engine does with the filter (see FilterOptions); null keeps the default.
    /// <summary>bypass (the request goes on as if the filter passed) or fail (with <see cref="FailureStatus"/>).</summary>
    public string? OnFault { get; set; }
    /// <summary>mediumError (03/11/00) or notReady (02/04/00) when the policy is fail.</summary>
    public string? FailureStatus { get; set; }
    public int? UpcallDeadlineMs { get; set; }
    public int? MaxSyscallsPerUpcall { get; set; }
    public int? MaxScratchBytes { get; set; }
    public int? QuarantineAfterFaults { get; set; }

    // qos: caps, 0 or absent = unlimited.
    public int? IopsPerLun { get; set; }
    public long? BytesPerSecondPerLun { get; set; }
    public int? IopsPerInitiator { get; set; }
    public long? BytesPerSecondPerInitiator { get; set; }

    // trace
    public int? SampleEvery { get; set; }
    public int? Capacity { get; set; }

    // plugin
    /// <summary>The assembly's file name in the plugin directory (no path).</summary>
    public string? Assembly { get; set; }
    /// <summary>The filter class's full name; it implements IIoFilter and has a constructor taking (IReadOnlyDictionary&lt;string, string&gt;) or none.</summary>
    public string? TypeName { get; set; }
    public Dictionary<string, string>? Settings { get; set; }

    /// <summary>Every problem, each naming its field under <paramref name="field"/>.</summary>
    public List<string> Validate(string field)
    {
        var errors = new List<string>();
        if (!Types.Contains(Type)) errors.Add($"{field}.type '{Type}' is not one of {string.Join(", ", Types)}");
        if (OnFault is not (null or "bypass" or "fail")) errors.Add($"{field}.onFault '{OnFault}' is not bypass or fail");
        if (FailureStatus is not null && StatusOf(FailureStatus) is null) errors.Add($"{field}.failureStatus '{FailureStatus}' is not mediumError or notReady");
        if (UpcallDeadlineMs is < 1 or > 60_000) errors.Add($"{field}.upcallDeadlineMs {UpcallDeadlineMs} must be 1-60000");
        if (MaxSyscallsPerUpcall is < 1 or > 1_000_000) errors.Add($"{field}.maxSyscallsPerUpcall {MaxSyscallsPerUpcall} must be 1-1000000");
        if (MaxScratchBytes is < 0 or > 256 << 20) errors.Add($"{field}.maxScratchBytes {MaxScratchBytes} must be 0-268435456");
        if (QuarantineAfterFaults is < 1 or > 1_000_000) errors.Add($"{field}.quarantineAfterFaults {QuarantineAfterFaults} must be 1-1000000");
        bool qos = Type == Qos, trace = Type == Trace, plugin = Type == Plugin;
        if (!plugin && Name is not null && Name != Type) errors.Add($"{field}.name '{Name}' must be left out or be '{Type}' for a built-in filter");
        Only(qos, IopsPerLun, "iopsPerLun"); Only(qos, BytesPerSecondPerLun, "bytesPerSecondPerLun");
        Only(qos, IopsPerInitiator, "iopsPerInitiator"); Only(qos, BytesPerSecondPerInitiator, "bytesPerSecondPerInitiator");
        Only(trace, SampleEvery, "sampleEvery"); Only(trace, Capacity, "capacity");
        Only(plugin, Assembly, "assembly"); Only(plugin, TypeName, "typeName"); Only(plugin, Settings, "settings");
        if (IopsPerLun < 0 || IopsPerInitiator < 0 || BytesPerSecondPerLun < 0 || BytesPerSecondPerInitiator < 0)
            errors.Add($"{field}: qos caps must be 0 (unlimited) or more");
        if (SampleEvery is < 1 or > 1_000_000) errors.Add($"{field}.sampleEvery {SampleEvery} must be 1-1000000");
        if (Capacity is < 1 or > 1 << 20) errors.Add($"{field}.capacity {Capacity} must be 1-1048576");
        if (plugin)
        {
            if (string.IsNullOrEmpty(Assembly) || Assembly != Path.GetFileName(Assembly) || !Assembly.EndsWith(".dll", StringComparison.OrdinalIgnoreCase))
                errors.Add($"{field}.assembly '{Assembly}' must be the file name of a .dll in the plugin directory");
            if (string.IsNullOrWhiteSpace(TypeName)) errors.Add($"{field}.typeName is required for a plugin");
        }
        return errors;

        void Only(bool used, object? value, string name)
        {
            if (!used && value is not null) errors.Add($"{field}.{name} does not apply to a {Type} filter");
        }
    }

    public FilterOptions ToOptions()
    {
        var options = new FilterOptions();
        return options with
        {
            OnFault = OnFault == "fail" ? FailurePolicy.Fail : FailurePolicy.Bypass,
            FailureStatus = FailureStatus is { } status ? StatusOf(status)!.Value : options.FailureStatus,
            UpcallDeadline = UpcallDeadlineMs is { } ms ? TimeSpan.FromMilliseconds(ms) : options.UpcallDeadline,
            MaxSyscallsPerUpcall = MaxSyscallsPerUpcall ?? options.MaxSyscallsPerUpcall,
            MaxScratchBytes = MaxScratchBytes ?? options.MaxScratchBytes,
            QuarantineAfterFaults = QuarantineAfterFaults ?? options.QuarantineAfterFaults,
        };
    }

    private static IoStatus? StatusOf(string name) => name switch
    {
        "mediumError" => IoStatus.ReadError,
        "notReady" => IoStatus.NotReady,
        _ => null,
    };
}
