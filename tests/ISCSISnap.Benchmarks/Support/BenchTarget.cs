using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Iscsi.Connections;
using ISCSISnap.Target.Scsi;
using Microsoft.Extensions.Logging.Abstractions;

namespace ISCSISnap.Benchmarks.Support;

/// <summary>
/// An <see cref="IscsiPortal"/> that never listens: one target with LUN 0 over a temporary sparse file, and one
/// connection accepted through <see cref="IscsiPortal.Accept"/> over an <see cref="InMemoryTransport"/>, logged in
/// by a <see cref="RawInitiator"/> on the transport's client ends.
/// </summary>
public sealed class BenchTarget : IAsyncDisposable
{
    public const string TargetName = "iqn.2026-11.io.iscsisnap.bench:target";
    public const string InitiatorName = "iqn.2026-11.io.iscsisnap.bench:initiator";
    public const int BlockSize = 512;

    private readonly string _directory;
    private readonly FileBlockDevice _device;
    private readonly LogicalUnit _unit;
    private readonly IscsiPortal _portal;
    private readonly InMemoryTransport _transport;
    private readonly Task _connection;

    private BenchTarget(string directory, FileBlockDevice device, LogicalUnit unit, IscsiPortal portal, InMemoryTransport transport, Task connection)
    {
        _directory = directory;
        _device = device;
        _unit = unit;
        _portal = portal;
        _transport = transport;
        _connection = connection;
        Initiator = new RawInitiator(transport.ClientInput, transport.ClientOutput);
    }

    public RawInitiator Initiator { get; }

    /// <summary>
    /// Creates the LUN (<paramref name="lunBytes"/>), writes its first <paramref name="prewrittenBytes"/> and reads them
    /// back so READs are page-cache hits, accepts the connection, logs in and clears the power-on unit attention.
    /// The file lives under <c>ISCSISNAP_BENCH_DIR</c> or the temp directory (it must not be tmpfs: RWF_NOWAIT).
    /// </summary>
    public static async Task<BenchTarget> StartAsync(long lunBytes = 64L << 20, int prewrittenBytes = 4 << 20)
    {
        string root = Environment.GetEnvironmentVariable("ISCSISNAP_BENCH_DIR") is { Length: > 0 } configured ? configured : Path.GetTempPath();
        string directory = Path.Combine(root, "iscsisnap-bench-" + Guid.NewGuid().ToString("N")[..12]);
        Directory.CreateDirectory(directory);
        var device = FileBlockDevice.Create(Path.Combine(directory, "lun0.img"), lunBytes, BlockSize);

        var pattern = new byte[prewrittenBytes];
        new Random(7).NextBytes(pattern);
        if (await device.WriteAsync(0, new(pattern), WriteFlags.None) != IoStatus.Ok) throw new IOException("pre-write failed");
        if (await device.FlushAsync() != IoStatus.Ok) throw new IOException("flush failed");
        if (await device.ReadAsync(0, pattern) != IoStatus.Ok) throw new IOException("warm-up read failed");

        var registry = new TargetRegistry();
        var target = new IscsiTarget(TargetName, "benchmark target", TargetAccess.Open);
        registry.TryAdd(target);
        var options = new IscsiPortalOptions { Portal = "127.0.0.1:0" };
        var portal = new IscsiPortal(options, registry, NullLoggerFactory.Instance);
        var unit = new LogicalUnit(new LogicalUnitIdentity(Guid.NewGuid()), device) { TargetName = TargetName };
        target.AddLun(0, unit);

        var transport = new InMemoryTransport();
        var connection = portal.Accept(transport);
        var bench = new BenchTarget(directory, device, unit, portal, transport, connection);
        await bench.Initiator.LoginAsync(InitiatorName, TargetName);
        await bench.Initiator.ClearUnitAttentionsAsync();
        bench.Initiator.StartPump();
        return bench;
    }

    public async ValueTask DisposeAsync()
    {
        await Initiator.CloseAsync();
        _transport.Abort();
        await Task.WhenAny(_connection, Task.Delay(TimeSpan.FromSeconds(5)));
        await _portal.DisposeAsync();
        await _unit.DisposeAsync();
        try { Directory.Delete(_directory, recursive: true); } catch (IOException) { }
    }
}
