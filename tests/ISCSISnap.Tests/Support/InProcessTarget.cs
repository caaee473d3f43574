using System.Collections.Immutable;
using System.Net;
using ISCSISnap.Storage.BlockDevices;
using ISCSISnap.Target.Hosting;
using ISCSISnap.Target.Scsi;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace ISCSISnap.Tests.Support;

/// <summary>
/// An iSCSI portal running inside the test process on a loopback port, with one target and LUNs over temporary
/// sparse files. Tests talk to it over real sockets with <see cref="TestInitiator"/> or external clients.
/// </summary>
public sealed class InProcessTarget : IAsyncDisposable
{
    public const string TargetName = "iqn.2026-11.io.iscsisnap.test:target";

    private readonly TempDirectory _directory = new();

    private InProcessTarget(IscsiPortal portal, TargetRegistry registry, IscsiTarget target)
    {
        Portal = portal;
        Registry = registry;
        Target = target;
    }

    public IscsiPortal Portal { get; }
    public TargetRegistry Registry { get; }
    public IscsiTarget Target { get; }
    public IPEndPoint EndPoint => Portal.LocalEndPoint!;
    public string Directory => _directory.Path;
    public string Url(ulong lun = 0) => $"iscsi://127.0.0.1:{EndPoint.Port}/{TargetName}/{lun}";

    public static async Task<InProcessTarget> StartAsync(Action<IscsiPortalOptions>? configure = null, TargetAccess? access = null,
        long lunBytes = 64L << 20, int blockSize = 512, ILoggerFactory? loggers = null, ITargetMetrics? metrics = null)
    {
        var options = new IscsiPortalOptions { Portal = "127.0.0.1:0", HeaderDigests = ["None", "CRC32C"], DataDigests = ["None", "CRC32C"] };
        configure?.Invoke(options);
        var registry = new TargetRegistry();
        var target = new IscsiTarget(TargetName, "test target", access ?? TargetAccess.Open);
        registry.TryAdd(target);
        var portal = new IscsiPortal(options, registry, loggers ?? NullLoggerFactory.Instance, metrics);
        var result = new InProcessTarget(portal, registry, target);
        result.AddLun(0, lunBytes, blockSize);
        portal.Start();
        await Task.CompletedTask;
        return result;
    }

    public LogicalUnit AddLun(ulong lun, long bytes, int blockSize = 512, LogicalUnitOptions? options = null)
    {
        string path = System.IO.Path.Combine(_directory.Path, $"lun{lun}-{Guid.NewGuid():N}.img");
        var device = FileBlockDevice.Create(path, bytes, blockSize);
        var unit = new LogicalUnit(new LogicalUnitIdentity(Guid.NewGuid()), device, options, null, new LunList(Target), new Resolver(Registry))
        {
            TargetName = TargetName,
        };
        unit.AbortTasksOfNexuses = (u, nexuses) => Portal.AbortTasksOfNexusesAsync(u, nexuses);
        Target.AddLun(lun, unit);
        return unit;
    }

    public async Task<TestInitiator> LoginAsync(LoginOptions? options = null)
    {
        var initiator = await TestInitiator.ConnectAsync(EndPoint);
        var result = await initiator.LoginAsync(options ?? new LoginOptions { TargetName = TargetName });
        if (!result.Succeeded) throw new InvalidOperationException($"login failed with status {result.Status:x4}");
        if (options?.TargetName is not null || options is null) await initiator.ClearUnitAttentionsAsync();
        return initiator;
    }

    public async ValueTask DisposeAsync()
    {
        await Portal.StopAsync(TimeSpan.FromMilliseconds(200));
        foreach (var unit in Target.Luns.Values) await unit.DisposeAsync();
        _directory.Dispose();
    }

    private sealed class LunList(IscsiTarget target) : ILunDirectory
    {
        public IEnumerable<ulong> LunNumbers => target.Luns.Keys;
    }

    private sealed class Resolver(TargetRegistry registry) : ICopyTargetResolver
    {
        public LogicalUnit? FindByDesignator(ReadOnlySpan<byte> naa) => registry.FindByDesignator(naa);
    }
}

/// <summary>A directory deleted when the test ends.</summary>
public sealed class TempDirectory : IDisposable
{
    public TempDirectory()
    {
        Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "iscsisnap-test-" + Guid.NewGuid().ToString("N")[..12]);
        System.IO.Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public void Dispose()
    {
        try { System.IO.Directory.Delete(Path, recursive: true); } catch (IOException) { }
    }
}

/// <summary>CDB builders for tests.</summary>
public static class Cdb
{
    public static byte[] Read10(uint lba, ushort blocks, byte flags = 0) => [0x28, flags, (byte)(lba >> 24), (byte)(lba >> 16), (byte)(lba >> 8), (byte)lba, 0, (byte)(blocks >> 8), (byte)blocks, 0];
    public static byte[] Write10(uint lba, ushort blocks, byte flags = 0) => [0x2A, flags, (byte)(lba >> 24), (byte)(lba >> 16), (byte)(lba >> 8), (byte)lba, 0, (byte)(blocks >> 8), (byte)blocks, 0];
    public static byte[] Read16(ulong lba, uint blocks) => Sixteen(0x88, lba, blocks);
    public static byte[] Write16(ulong lba, uint blocks, byte flags = 0) { var c = Sixteen(0x8A, lba, blocks); c[1] = flags; return c; }
    public static byte[] Inquiry(byte page = 0, bool evpd = false, ushort allocation = 255) => [0x12, (byte)(evpd ? 1 : 0), page, (byte)(allocation >> 8), (byte)allocation, 0];
    public static byte[] TestUnitReady() => [0x00, 0, 0, 0, 0, 0];
    public static byte[] RequestSense(byte allocation = 252) => [0x03, 0, 0, 0, allocation, 0];
    public static byte[] ReadCapacity16() => [0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0];
    public static byte[] ReportLuns() => [0xA0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0];
    public static byte[] SynchronizeCache10() => [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    public static byte[] CompareAndWrite(ulong lba, byte blocks) { var c = Sixteen(0x89, lba, 0); c[13] = blocks; return c; }

    private static byte[] Sixteen(byte opcode, ulong lba, uint blocks)
    {
        var c = new byte[16];
        c[0] = opcode;
        for (int i = 0; i < 8; i++) c[2 + i] = (byte)(lba >> (56 - 8 * i));
        c[10] = (byte)(blocks >> 24); c[11] = (byte)(blocks >> 16); c[12] = (byte)(blocks >> 8); c[13] = (byte)blocks;
        return c;
    }
}
