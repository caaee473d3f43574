namespace ISCSISnap.Tests.Sharing;

/// <summary>What this process holds open and mapped, read from /proc.</summary>
internal static class ProcessResources
{
    /// <summary>Open descriptors, not counting the assemblies the runtime opens as it first needs them (when depends on tiering and load).</summary>
    public static int OpenDescriptors() => DescriptorTargets().Length;

    /// <summary>What each open descriptor refers to, assemblies left out.</summary>
    public static string[] DescriptorTargets()
    {
        var targets = new List<string>();
        foreach (string fd in Directory.GetFiles("/proc/self/fd"))
        {
            try
            {
                string target = new FileInfo(fd).LinkTarget ?? "?";
                if (!target.EndsWith(".dll", StringComparison.Ordinal)) targets.Add(target);
            }
            catch (IOException) { }
        }
        return targets.ToArray();
    }

    /// <summary>Descriptors whose target contains <paramref name="text"/> (for example "memfd:iscsisnap-share").</summary>
    public static int DescriptorsTo(string text)
    {
        int count = 0;
        foreach (string fd in Directory.GetFiles("/proc/self/fd"))
        {
            try
            {
                if (new FileInfo(fd).LinkTarget?.Contains(text, StringComparison.Ordinal) == true) count++;
            }
            catch (IOException) { }   // closed while listing
        }
        return count;
    }

    public static int Mappings(string text) => File.ReadLines("/proc/self/maps").Count(line => line.Contains(text, StringComparison.Ordinal));

    public static int AllMappings() => File.ReadLines("/proc/self/maps").Count();
}

/// <summary>A clock the test moves by hand.</summary>
internal sealed class ManualTime : TimeProvider
{
    private long _ticks = 1_000_000;
    public override long TimestampFrequency => 1000;
    public override long GetTimestamp() => Interlocked.Read(ref _ticks);
    public void Advance(TimeSpan by) => Interlocked.Add(ref _ticks, (long)by.TotalMilliseconds);
}
