using System.Buffers;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Vhdx;
using ISCSISnap.Tests.Support;
using Xunit;
using static ISCSISnap.Tests.Vhdx.VhdxTestSupport;

namespace ISCSISnap.Tests.Vhdx;

public sealed class VhdxConcurrencyTests
{
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Concurrent_writers_zeroes_flushes_and_readers_leave_the_expected_content(bool differencing)
    {
        using var dir = new TempDirectory();
        long size = 32L << 20;
        string path = Path.Combine(dir.Path, "c.vhdx");
        VhdxParent? link = null;
        if (differencing)
        {
            string basePath = Path.Combine(dir.Path, "base.vhdx");
            using (var b = VhdxFile.Create(basePath, new VhdxCreateOptions { VirtualSize = size, BlockSize = 1 << 20 })) { }
            using var parent = VhdxFile.Open(basePath, Guid.Empty, writable: false);
            link = VhdxParent.For(path, basePath, parent.DataWriteGuid);
        }
        var expected = new byte[size];
        const int tasks = 6, slot = 4096;
        using (var vhdx = VhdxFile.Create(path, new VhdxCreateOptions { VirtualSize = size, BlockSize = 1 << 20, LogSize = 1 << 20, Parent = link }))
        {
            using var stop = new CancellationTokenSource();
            var reader = Task.Run(async () =>
            {
                var random = new Random(77);
                var buffer = new byte[256 << 10];
                while (!stop.IsCancellationRequested)
                {
                    long at = random.Next((int)((size - buffer.Length) / 512)) * 512L;
                    Assert.Equal(IoStatus.Ok, await vhdx.ReadAsync(at, buffer));
                    vhdx.Enumerate(at / 512, buffer.Length / 512, (_, _, _) => { });
                }
            });
            var writers = Enumerable.Range(0, tasks).Select(t => Task.Run(async () =>
            {
                // Each writer owns every tasks-th 4 KiB slot, so writers share blocks (and allocate them concurrently).
                var random = new Random(t);
                var data = new byte[slot * 4];
                for (int i = 0; i < 400; i++)
                {
                    long index = random.Next((int)(size / slot / tasks)) * tasks + t;
                    long at = index * slot;
                    int op = random.Next(10);
                    if (op < 7)
                    {
                        random.NextBytes(data.AsSpan(0, slot));
                        Assert.Equal(IoStatus.Ok, await vhdx.WriteAsync(at, new ReadOnlySequence<byte>(data, 0, slot), forceUnitAccess: op == 0));
                        data.AsSpan(0, slot).CopyTo(expected.AsSpan((int)at));
                    }
                    else if (op < 9)
                    {
                        Assert.Equal(IoStatus.Ok, await vhdx.ZeroAsync(at, slot, deallocate: op == 8, forceUnitAccess: false));
                        expected.AsSpan((int)at, slot).Clear();
                    }
                    else
                    {
                        Assert.Equal(IoStatus.Ok, await vhdx.FlushAsync());
                    }
                }
            })).ToArray();
            await Task.WhenAll(writers);
            stop.Cancel();
            await reader;
            var all = new byte[size];
            Assert.Equal(IoStatus.Ok, await vhdx.ReadAsync(0, all));
            Assert.True(all.AsSpan().SequenceEqual(expected));
        }
        using (var reopened = VhdxFile.Open(path, Guid.Empty, writable: false))
        {
            var all = new byte[size];
            var runs = new List<(long, long, SectorState)>();
            reopened.Enumerate(0, size / 512, (s, n, st) => runs.Add((s, n, st)));
            foreach (var (s, n, st) in runs)
                if (st != SectorState.Absent) Assert.Equal(IoStatus.Ok, await reopened.ReadAsync(s * 512, all.AsMemory((int)(s * 512), (int)(n * 512))));
            Assert.True(all.AsSpan().SequenceEqual(expected));
        }
        if (!differencing) await AssertQemuCheckClean(path);
    }
}
