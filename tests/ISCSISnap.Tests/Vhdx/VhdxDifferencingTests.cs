using System.Buffers;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Vhdx;
using ISCSISnap.Tests.Support;
using Xunit;
using static ISCSISnap.Tests.Vhdx.VhdxTestSupport;

namespace ISCSISnap.Tests.Vhdx;

public sealed class VhdxDifferencingTests
{
    private const long Size = 24L << 20;

    /// <summary>Per-sector states of a layer from Enumerate, checking runs are in order, contiguous and merged.</summary>
    private static SectorState[] States(IChainLayer layer, long first, long count)
    {
        var states = new SectorState[count];
        long next = first;
        SectorState? previous = null;
        layer.Enumerate(first, count, (s, n, st) =>
        {
            Assert.Equal(next, s);
            Assert.True(n > 0);
            Assert.NotEqual(previous, st);   // adjacent equal runs are merged
            for (long i = 0; i < n; i++) states[s - first + i] = st;
            next = s + n;
            previous = st;
        });
        Assert.Equal(first + count, next);
        return states;
    }

    /// <summary>The chain's view: the child's Data and Zero sectors, the parent's where the child is Absent.</summary>
    private static async Task<byte[]> Flattened(IChainLayer child, IChainLayer parent)
    {
        var result = new byte[child.VirtualSize];
        var runs = new List<(long, long, SectorState)>();
        child.Enumerate(0, child.VirtualSize / 512, (s, n, st) => runs.Add((s, n, st)));
        foreach (var (s, n, st) in runs)
        {
            var target = result.AsMemory((int)(s * 512), (int)(n * 512));
            var layer = st == SectorState.Absent ? parent : child;
            Assert.Equal(IoStatus.Ok, await layer.ReadAsync(s * 512, target));
        }
        return result;
    }

    private static async Task<(string BasePath, byte[] BaseContent, Guid BaseDataWrite)> MakeBase(string dir)
    {
        string basePath = Path.Combine(dir, "base.vhdx");
        var content = new byte[Size];
        new Random(99).NextBytes(content.AsSpan(0, 10 << 20));
        using var b = VhdxFile.Create(basePath, new VhdxCreateOptions { VirtualSize = Size, BlockSize = 1 << 20 });
        await WriteAsync(b, 0, content[..(10 << 20)]);
        Assert.Equal(IoStatus.Ok, b.Seal());
        Assert.False(b.IsWritable);
        return (basePath, content, b.DataWriteGuid);
    }

    [Fact]
    public async Task Child_sectors_are_absent_until_written_and_zeroing_hides_the_parent()
    {
        using var dir = new TempDirectory();
        var (basePath, baseContent, baseGuid) = await MakeBase(dir.Path);
        string childPath = Path.Combine(dir.Path, "child.vhdx");
        using var parent = VhdxFile.Open(basePath, Guid.NewGuid(), writable: false);
        Assert.Equal(baseGuid, parent.DataWriteGuid);
        var expected = (byte[])baseContent.Clone();
        var model = new SectorState[Size / 512];   // Absent everywhere

        var childId = Guid.NewGuid();
        using (var child = VhdxFile.Create(childPath, new VhdxCreateOptions
               { VirtualSize = Size, BlockSize = 1 << 20, DiskId = childId, Page83Id = parent.Page83Id, Parent = VhdxParent.For(childPath, basePath, parent.DataWriteGuid) }))
        {
            Assert.True(child.IsDifferencing);
            Assert.Equal(parent.Page83Id, child.Page83Id);
            var locator = child.ParentLocator.ToDictionary(e => e.Key, e => e.Value);
            Assert.Equal(baseGuid, Guid.Parse(locator["parent_linkage"]));
            Assert.Equal("base.vhdx", locator["relative_path"]);
            Assert.All(States(child, 0, Size / 512), s => Assert.Equal(SectorState.Absent, s));

            async Task Write(long offset, int length, byte seed)
            {
                var data = new byte[length];
                new Random(seed).NextBytes(data);
                await WriteAsync(child, offset, data);
                data.CopyTo(expected, offset);
                model.AsSpan((int)(offset / 512), length / 512).Fill(SectorState.Data);
            }
            async Task Zero(long offset, int length, bool deallocate)
            {
                Assert.Equal(IoStatus.Ok, await child.ZeroAsync(offset, length, deallocate, false));
                expected.AsSpan((int)offset, length).Clear();
                // Whole blocks become Zero; partial ranges become data that is zero.
                bool whole = offset % (1 << 20) == 0 && length % (1 << 20) == 0;
                model.AsSpan((int)(offset / 512), length / 512).Fill(whole && (deallocate || true) ? SectorState.Zero : SectorState.Data);
            }

            await Write(3 * 512, 512, 1);                     // one sector
            await Write((1 << 20) + 1024, 7 * 512, 2);        // seven sectors mid-block
            await Write((1 << 20) + 8192, 4096, 3);           // same block, later
            await Write((4 << 20) - 1024, 4096, 4);           // across a block edge
            await Write(5L << 20, 1 << 20, 5);                // a whole block at once (fully present)
            await Write(6L << 20, 512 * 1000, 6);             // then fill a block piecewise...
            await Write((6L << 20) + 512 * 1000, (1 << 20) - 512 * 1000, 7);   // ...until every bit is set
            await Zero((7L << 20) + 512, 1024, false);        // partial zero over an untouched block: hides the parent
            await Zero(8L << 20, 1 << 20, true);              // whole block: Zero state
            await Zero(9L << 20, 2 << 20, false);             // whole blocks over parent data, no deallocate
            await Zero((1 << 20) + 1024, 512, true);          // partial zero inside a partially present block
            await Write(20L << 20, 4096, 8);                  // beyond the parent's data

            Assert.Equal(model, States(child, 0, Size / 512));
            Assert.Equal(model.AsSpan(2047, 4099).ToArray(), States(child, 2047, 4099));   // odd sub-range
            Assert.Equal(expected, await Flattened(child, parent));
            Assert.Equal(IoStatus.Ok, await child.FlushAsync());
            await Write(3 * 512 + 512, 512, 9);               // after a flush, next to earlier data (bitmap fast path then slow path)
            Assert.Equal(model, States(child, 0, Size / 512));
        }
        using (var child = VhdxFile.Open(childPath, childId, writable: false))
        {
            Assert.Equal(childId, child.DiskId);
            Assert.Equal(model, States(child, 0, Size / 512));
            Assert.Equal(expected, await Flattened(child, parent));
        }
    }

    [Fact]
    public async Task Random_operations_on_a_child_match_the_flattened_expectation()
    {
        using var dir = new TempDirectory();
        var (basePath, baseContent, baseGuid) = await MakeBase(dir.Path);
        string childPath = Path.Combine(dir.Path, "child.vhdx");
        using var parent = VhdxFile.Open(basePath, Guid.NewGuid(), writable: false);
        using var expected = new ExpectedDisk(Path.Combine(dir.Path, "flat.raw"), Size);
        expected.Write(0, baseContent);
        using (var child = VhdxFile.Create(childPath, new VhdxCreateOptions { VirtualSize = Size, Parent = VhdxParent.For(childPath, basePath, baseGuid) }))
        {
            Assert.Equal(2 << 20, child.BlockSize);   // the differencing default
            await RandomOperations(child, expected, 5, 120, 2 << 20);
            Assert.Equal(expected.Read(0, (int)Size), await Flattened(child, parent));
        }
        using (var child = VhdxFile.Open(childPath, Guid.Empty, writable: false))
            Assert.Equal(expected.Read(0, (int)Size), await Flattened(child, parent));
    }

    [Fact]
    public async Task Parent_locator_can_be_rewritten_closed_or_open_keeping_the_DataWriteGuid()
    {
        using var dir = new TempDirectory();
        var (basePath, _, baseGuid) = await MakeBase(dir.Path);
        string childPath = Path.Combine(dir.Path, "child.vhdx");
        var data = new byte[64 << 10];
        new Random(8).NextBytes(data);
        Guid childData;
        using (var child = VhdxFile.Create(childPath, new VhdxCreateOptions { VirtualSize = Size, Parent = VhdxParent.For(childPath, basePath, baseGuid) }))
        {
            await WriteAsync(child, 1 << 20, data);
            childData = child.DataWriteGuid;
        }

        var moved = new List<KeyValuePair<string, string>>
        {
            new("parent_linkage", baseGuid.ToString("B")),
            new("relative_path", @"..\elsewhere\a-much-longer-directory-name-than-before\base.vhdx"),
            new("absolute_win32_path", @"\\?\D:\images\elsewhere\base.vhdx"),
        };
        VhdxFile.RewriteParentLocator(childPath, moved);
        using (var child = VhdxFile.Open(childPath, Guid.Empty, writable: false))
        {
            Assert.Equal(moved, child.ParentLocator);
            Assert.Equal(childData, child.DataWriteGuid);
            var back = new byte[data.Length];
            Assert.Equal(IoStatus.Ok, await child.ReadAsync(1 << 20, back));
            Assert.Equal(data, back);
        }

        var bad = new List<KeyValuePair<string, string>> { new("relative_path", "x") };
        var ex = Assert.Throws<StorageException>(() => VhdxFile.RewriteParentLocator(childPath, bad));
        Assert.Contains("parent_linkage", ex.Message);

        // On an open file, with writes running at the same time.
        var again = new List<KeyValuePair<string, string>> { new("parent_linkage", baseGuid.ToString("B")), new("relative_path", "base.vhdx") };
        using (var child = VhdxFile.Open(childPath, Guid.Empty, writable: true))
        {
            using var stop = new CancellationTokenSource();
            var writer = Task.Run(async () =>
            {
                long i = 0;
                while (!stop.IsCancellationRequested)
                {
                    Assert.Equal(IoStatus.Ok, await child.WriteAsync((4L << 20) + (i++ % 512) * 4096, new ReadOnlySequence<byte>(data, 0, 4096), false));
                }
            });
            await Task.Delay(20);
            child.SetParentLocator(again);
            Assert.Equal(again, child.ParentLocator);
            stop.Cancel();
            await writer;
        }
        using (var child = VhdxFile.Open(childPath, Guid.Empty, writable: false))
        {
            Assert.Equal(again, child.ParentLocator);
            var states = States(child, (4L << 20) / 512, 8);
            Assert.All(states, s => Assert.Equal(SectorState.Data, s));
        }
        using (var dynamicFile = VhdxFile.Open(basePath, Guid.Empty, writable: true))
            Assert.Throws<StorageException>(() => dynamicFile.SetParentLocator(again));
    }

    [Fact]
    public async Task A_grown_child_reports_the_new_sectors_absent_until_written()
    {
        using var dir = new TempDirectory();
        var (basePath, _, baseGuid) = await MakeBase(dir.Path);
        string childPath = Path.Combine(dir.Path, "child.vhdx");
        long grown = Size + (8L << 20);
        var data = new byte[4096];
        new Random(2).NextBytes(data);
        using (var child = VhdxFile.Create(childPath, new VhdxCreateOptions { VirtualSize = Size, BlockSize = 1 << 20, Parent = VhdxParent.For(childPath, basePath, baseGuid) }))
        {
            await WriteAsync(child, 512, data);
            Assert.Equal(IoStatus.Ok, await child.GrowAsync(grown));
            await WriteAsync(child, Size + (1 << 20) + 512, data);
        }
        using (var child = VhdxFile.Open(childPath, Guid.Empty, writable: false))
        {
            Assert.Equal(grown, child.VirtualSize);
            var states = States(child, 0, grown / 512);
            for (long s = 0; s < states.Length; s++)
            {
                bool written = s is >= 1 and < 9 || (s >= (Size + (1 << 20) + 512) / 512 && s < (Size + (1 << 20) + 512 + 4096) / 512);
                Assert.True((written ? SectorState.Data : SectorState.Absent) == states[s], $"sector {s}: {states[s]}");
            }
            var back = new byte[4096];
            Assert.Equal(IoStatus.Ok, await child.ReadAsync(Size + (1 << 20) + 512, back));
            Assert.Equal(data, back);
        }
    }
}
