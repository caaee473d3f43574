using ISCSISnap.Storage.Filters.BuiltIn;

namespace ISCSISnap.Storage.Filters.Configuration;

/// <summary>
/// Makes filters from their specs: the built-in ones, and plugin classes through <see cref="FilterPluginLoader"/>.
/// Threading: thread-safe.
/// </summary>
public sealed class FilterFactory(FilterPluginLoader plugins, string checksumDirectory)
{
    public FilterPluginLoader Plugins { get; } = plugins;
    /// <summary>Where checksum filters keep their per-layer stores (shared by every LUN: layers are shared by clones).</summary>
    public string ChecksumDirectory { get; } = Path.GetFullPath(checksumDirectory);

    /// <summary>The filter a spec describes; throws <see cref="FilterConfigurationException"/> naming the field at fault.</summary>
    public IIoFilter Create(FilterSpec spec, BlockDevices.IBlockDevice device)
    {
        if (spec.Validate("filter") is { Count: > 0 } errors) throw new FilterConfigurationException("filter", string.Join("; ", errors));
        return spec.Type switch
        {
            FilterSpec.Trace => new TraceFilter(spec.SampleEvery ?? 1, spec.Capacity ?? 4096),
            FilterSpec.Qos => new QosFilter(QosLimitsOf(spec)),
            FilterSpec.Checksum => device is Chains.ChainDevice chain
                ? new ChecksumFilter(ChecksumDirectory, chain)
                : throw new FilterConfigurationException("type", "the checksum filter needs a LUN served from a disk (a snapshot chain)"),
            FilterSpec.Plugin => Plugins.Create(spec.Assembly!, spec.TypeName!, spec.Settings ?? new Dictionary<string, string>()),
            _ => throw new FilterConfigurationException("type", $"the {spec.Type} filter is not available in this build"),
        };
    }

    public static QosLimits QosLimitsOf(FilterSpec spec) => new()
    {
        IopsPerLun = spec.IopsPerLun ?? 0,
        BytesPerSecondPerLun = spec.BytesPerSecondPerLun ?? 0,
        IopsPerInitiator = spec.IopsPerInitiator ?? 0,
        BytesPerSecondPerInitiator = spec.BytesPerSecondPerInitiator ?? 0,
    };
}
