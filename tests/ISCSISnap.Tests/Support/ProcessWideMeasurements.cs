using Xunit;

namespace ISCSISnap.Tests.Support;

/// <summary>
/// Tests that measure the whole test process (managed heap, working set) run alone: other tests running beside
/// them (the disk model keeps flat copies of whole disks, say) would be counted as theirs.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class ProcessWideMeasurements
{
    public const string Name = "process-wide measurements";
}
