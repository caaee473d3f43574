using ISCSISnap.Target.Hosting;
using ISCSISnap.Web.Catalog;
using ISCSISnap.Web.Configuration;

namespace ISCSISnap.Web.Appliance;

/// <summary>
/// Brings the appliance up and down with the host: catalog and LUNs first, then the iSCSI portal; on stop
/// (SIGTERM, Ctrl-C) the portal drains, every device is flushed and closed, then the catalog.
/// </summary>
public sealed class ApplianceService : IHostedService
{
    private readonly TargetService _targets;
    private readonly DiskService _disks;
    private readonly JobService _jobs;
    private readonly IscsiPortal _portal;
    private readonly ApplianceCatalog _catalog;
    private readonly ApplianceOptions _options;
    private readonly ILogger<ApplianceService> _log;

    public ApplianceService(TargetService targets, DiskService disks, JobService jobs, IscsiPortal portal, ApplianceCatalog catalog, ApplianceOptions options, ILogger<ApplianceService> log)
    {
        _targets = targets;
        _disks = disks;
        _jobs = jobs;
        _portal = portal;
        _catalog = catalog;
        _options = options;
        _log = log;
    }

    public async Task StartAsync(CancellationToken cancellationToken)
    {
        Log.Starting(_log, Path.GetFullPath(_options.DataDirectory), _options.Iscsi.Portal, _options.Web.Url);
        await _targets.LoadAsync();
        _portal.Start();
        _disks.ResumePendingMerges();
        Log.Ready(_log, _targets.Targets.Count, _targets.Targets.Sum(t => t.Luns.Count));
    }

    public async Task StopAsync(CancellationToken cancellationToken)
    {
        Log.Stopping(_log);
        await _portal.StopAsync(TimeSpan.FromSeconds(3));
        await _jobs.DisposeAsync();   // merges stop at a window boundary and resume at the next start
        await _targets.DisposeAsync();
        _catalog.Dispose();
        Log.Stopped(_log);
    }
}
