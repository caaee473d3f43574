using System.Buffers;
using System.Diagnostics;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Storage.Chains;
using ISCSISnap.Storage.Disks;

namespace ISCSISnap.Benchmarks;

/// <summary>
/// <c>-- chain-depth [ROUNDS]</c>: random 4 KiB read latency through chains of depth 1, 8, 32 and 64, measured in
/// alternating rounds in one process so that machine noise hits every depth alike; prints the median per depth and
/// its ratio to depth 1. Two layouts: "slices" (layer i owns the i-th contiguous slice of the disk) and
/// "interleaved" (block b was last written by layer b mod depth: every 4 KiB read goes to another layer, the map's
/// worst case). The data is in the page cache: what differs between depths is finding the layer, which the chain
/// map keeps constant, and how the kernel's page cache copes with the data spread over many sparse files.
/// </summary>
public static class ChainDepthReport
{
    private const long DiskBytes = 256L << 20;
    private const int BlockBytes = 4096;
    private const int ReadsPerRound = 4096;

    public static int Run(ReadOnlySpan<string> args)
    {
        int rounds = args.Length > 0 && int.TryParse(args[0], out int r) ? r : 40;
        return RunAsync(rounds).GetAwaiter().GetResult();
    }

    private static async Task<int> RunAsync(int rounds)
    {
        int[] depths = [1, 8, 32, 64];
        string root = Path.Combine(Path.GetTempPath(), "iscsisnap-chain-depth-" + Guid.NewGuid().ToString("N")[..8]);
        var managers = new List<DiskManager>();
        try
        {
            foreach (bool interleaved in new[] { false, true })
            {
                var devices = new List<ChainDevice>();
                foreach (int depth in depths)
                {
                    var manager = DiskManager.Open(Path.Combine(root, $"{depth}-{interleaved}"));
                    managers.Add(manager);
                    devices.Add(await BuildAsync(manager, depth, interleaved));
                }
                await MeasureAsync(devices, depths, rounds, interleaved ? "interleaved" : "slices");
                foreach (var manager in managers) await manager.DisposeAsync();
                managers.Clear();
            }
            MeasureKernelBaseline(Path.Combine(root, "raw"), rounds);
            return 0;
        }
        finally
        {
            foreach (var manager in managers) await manager.DisposeAsync();
            Directory.Delete(root, recursive: true);
        }
    }

    private static async Task MeasureAsync(List<ChainDevice> devices, int[] depths, int rounds, string layout)
    {
        {
            long blocks = DiskBytes / BlockBytes;
            var random = new Random(2);
            var offsets = Enumerable.Range(0, ReadsPerRound).Select(_ => random.NextInt64(blocks) * BlockBytes).ToArray();
            var buffer = GC.AllocateArray<byte>(BlockBytes, pinned: true);
            var samples = depths.Select(_ => new List<double>()).ToArray();
            for (int round = -3; round < rounds; round++)   // three warm-up rounds
            {
                for (int d = 0; d < depths.Length; d++)
                {
                    var device = devices[d];
                    var clock = Stopwatch.StartNew();
                    foreach (var offset in offsets)
                    {
                        var status = await device.ReadAsync(offset, buffer);
                        if (status != IoStatus.Ok) throw new InvalidOperationException($"read failed: {status}");
                    }
                    if (round >= 0) samples[d].Add(clock.Elapsed.TotalMicroseconds / offsets.Length);
                }
            }
            double Median(List<double> values)
            {
                var sorted = values.Order().ToList();
                return sorted[sorted.Count / 2];
            }
            double baseline = Median(samples[0]);
            Console.WriteLine($"{layout}: random 4 KiB reads, queue depth 1, {rounds} alternating rounds of {ReadsPerRound}:");
            for (int d = 0; d < depths.Length; d++)
                Console.WriteLine($"  depth {depths[d],2}: median {Median(samples[d]):F3} us/read   ({Median(samples[d]) / baseline:F2}x depth 1)");
        }
    }

    /// <summary>
    /// The same interleaved pattern with plain preads and no chain: one dense file against 64 files each holding every
    /// 64th page. What the kernel's page cache alone adds when the data is spread over many sparse files.
    /// </summary>
    private static void MeasureKernelBaseline(string directory, int rounds)
    {
        Directory.CreateDirectory(directory);
        long pages = DiskBytes / BlockBytes;
        var data = new byte[BlockBytes];
        new Random(1).NextBytes(data);
        Microsoft.Win32.SafeHandles.SafeFileHandle Make(string name, Func<long, bool> holds)
        {
            var handle = File.OpenHandle(Path.Combine(directory, name), FileMode.Create, FileAccess.ReadWrite);
            RandomAccess.SetLength(handle, DiskBytes);
            for (long page = 0; page < pages; page++) if (holds(page)) RandomAccess.Write(handle, data, page * BlockBytes);
            return handle;
        }
        using var dense = Make("dense", _ => true);
        var sparse = Enumerable.Range(0, 64).Select(i => Make($"sparse{i}", page => page % 64 == i)).ToArray();
        var random = new Random(2);
        var offsets = Enumerable.Range(0, ReadsPerRound).Select(_ => random.NextInt64(pages)).ToArray();
        var buffer = new byte[BlockBytes];
        var one = new List<double>();
        var many = new List<double>();
        for (int round = -3; round < rounds; round++)
        {
            var clock = Stopwatch.StartNew();
            foreach (var page in offsets) RandomAccess.Read(dense, buffer, page * BlockBytes);
            if (round >= 0) one.Add(clock.Elapsed.TotalMicroseconds / offsets.Length);
            clock.Restart();
            foreach (var page in offsets) RandomAccess.Read(sparse[page % 64], buffer, page * BlockBytes);
            if (round >= 0) many.Add(clock.Elapsed.TotalMicroseconds / offsets.Length);
        }
        foreach (var handle in sparse) handle.Dispose();
        double Median(List<double> values) => values.Order().ElementAt(values.Count / 2);
        Console.WriteLine($"kernel baseline (plain pread, no chain): 1 dense file {Median(one):F3} us/read, 64 sparse files {Median(many):F3} us/read ({Median(many) / Median(one):F2}x)");
    }

    /// <summary>A disk whose chain has <paramref name="depth"/> layers, each owning a contiguous slice or every depth-th block.</summary>
    private static async Task<ChainDevice> BuildAsync(DiskManager manager, int depth, bool interleaved)
    {
        var disk = await manager.CreateAsync($"depth-{depth}", DiskBytes, 512, blockSize: 2 << 20);
        var device = await manager.AttachAsync(disk.Id);
        var data = new byte[BlockBytes];
        new Random(depth).NextBytes(data);
        long blocks = DiskBytes / BlockBytes;
        for (int layer = 0; layer < depth; layer++)
        {
            long first = interleaved ? layer : blocks * layer / depth;
            long end = interleaved ? blocks : blocks * (layer + 1) / depth;
            for (long block = first; block < end; block += interleaved ? depth : 1)
            {
                var status = await device.WriteAsync(block * BlockBytes, new ReadOnlySequence<byte>(data), WriteFlags.None);
                if (status != IoStatus.Ok) throw new InvalidOperationException($"setup write failed: {status}");
            }
            if (layer < depth - 1) await manager.SnapshotAsync(disk.Id, $"layer {layer}");
        }
        if (manager.GetDisk(disk.Id).Chain.Count != depth) throw new InvalidOperationException("unexpected chain depth");
        return device;
    }
}
