using System.Collections.Concurrent;
using System.Reflection;
using System.Runtime.Loader;

namespace ISCSISnap.Storage.Filters.Configuration;

/// <summary>A filter configuration that cannot be honoured: names the field and why.</summary>
public sealed class FilterConfigurationException(string field, string message) : Exception(message)
{
    public string Field { get; } = field;
}

/// <summary>
/// Loads filter classes from plugin assemblies in one directory, each assembly into its own
/// <see cref="AssemblyLoadContext"/> so its dependencies cannot clash with the appliance's or another plugin's.
/// Assemblies the appliance itself has loaded (ISCSISnap.Storage above all) resolve to the appliance's copy, so a
/// plugin's filter implements the very <see cref="IIoFilter"/> the engine knows. Threading: thread-safe.
/// </summary>
public sealed class FilterPluginLoader(string directory)
{
    private readonly ConcurrentDictionary<string, PluginContext> _contexts = new(StringComparer.Ordinal);

    public string Directory { get; } = Path.GetFullPath(directory);

    /// <summary>Creates the filter <paramref name="typeName"/> of <paramref name="assemblyFile"/> with its settings.</summary>
    public IIoFilter Create(string assemblyFile, string typeName, IReadOnlyDictionary<string, string> settings)
    {
        string path = Path.Combine(Directory, Path.GetFileName(assemblyFile));
        if (!File.Exists(path)) throw new FilterConfigurationException("assembly", $"no plugin assembly {path}");
        PluginContext context;
        Assembly assembly;
        try
        {
            context = _contexts.GetOrAdd(path, p => new PluginContext(p));
            assembly = context.Main;
        }
        catch (Exception e) when (e is BadImageFormatException or FileLoadException or IOException)
        {
            _contexts.TryRemove(path, out _);
            throw new FilterConfigurationException("assembly", $"{path} is not a loadable .NET assembly: {e.Message}");
        }
        var type = assembly.GetType(typeName, throwOnError: false)
            ?? throw new FilterConfigurationException("typeName", $"{Path.GetFileName(path)} has no type {typeName}");
        if (!typeof(IIoFilter).IsAssignableFrom(type) || type.IsAbstract)
            throw new FilterConfigurationException("typeName", $"{typeName} is not a concrete class implementing {typeof(IIoFilter).FullName}");
        try
        {
            if (type.GetConstructor([typeof(IReadOnlyDictionary<string, string>)]) is { } withSettings)
                return (IIoFilter)withSettings.Invoke([settings]);
            if (type.GetConstructor(Type.EmptyTypes) is { } plain)
            {
                if (settings.Count > 0) throw new FilterConfigurationException("settings", $"{typeName} takes no settings");
                return (IIoFilter)plain.Invoke(null);
            }
        }
        catch (TargetInvocationException e)
        {
            // The plugin refused its settings: its message is the answer.
            throw new FilterConfigurationException("settings", $"{typeName}: {e.InnerException?.Message ?? e.Message}");
        }
        throw new FilterConfigurationException("typeName", $"{typeName} has neither a constructor taking IReadOnlyDictionary<string, string> nor a parameterless one");
    }

    private sealed class PluginContext : AssemblyLoadContext
    {
        private readonly AssemblyDependencyResolver _resolver;

        public PluginContext(string path) : base($"filter-plugin:{Path.GetFileName(path)}")
        {
            _resolver = new AssemblyDependencyResolver(path);
            Main = LoadFromAssemblyPath(path);
        }

        public Assembly Main { get; }

        protected override Assembly? Load(AssemblyName name)
        {
            // Shared contracts come from the appliance: the same IIoFilter, the same Storage types.
            foreach (var loaded in Default.Assemblies)
                if (AssemblyName.ReferenceMatchesDefinition(name, loaded.GetName()) && string.Equals(loaded.GetName().Name, name.Name, StringComparison.OrdinalIgnoreCase))
                    return null;
            return _resolver.ResolveAssemblyToPath(name) is { } path ? LoadFromAssemblyPath(path) : null;
        }

        protected override IntPtr LoadUnmanagedDll(string unmanagedDllName) =>
            _resolver.ResolveUnmanagedDllToPath(unmanagedDllName) is { } path ? LoadUnmanagedDllFromPath(path) : IntPtr.Zero;
    }
}
