using ISCSISnap.Storage.Disks;
using Xunit;

namespace ISCSISnap.Tests.Support;

/// <summary>A test class with its own temporary directory and a <see cref="DiskManager"/> on its "disks" folder.</summary>
public abstract class DiskManagerTest : IAsyncLifetime
{
    protected readonly TempDirectory _directory = new();
    protected DiskManager _manager = null!;

    public virtual Task InitializeAsync()
    {
        _manager = DiskManager.Open(Path.Combine(_directory.Path, "disks"));
        return Task.CompletedTask;
    }

    public virtual async Task DisposeAsync()
    {
        await _manager.DisposeAsync();
        _directory.Dispose();
    }
}
