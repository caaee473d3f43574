using ISCSISnap.Target.Hosting;
using ISCSISnap.Web.Appliance;
using Prometheus;

namespace ISCSISnap.Web.Observability;

/// <summary>Inventory gauges refreshed at each scrape: targets, LUN capacity and the bytes their images really use.</summary>
public static class StorageMetrics
{
    public static void Register(CollectorRegistry registry, IMetricFactory factory, TargetService targets, IscsiPortal portal)
    {
        var targetCount = factory.CreateGauge("iscsisnap_targets", "Configured iSCSI targets.");
        var capacity = factory.CreateGauge("iscsisnap_lun_capacity_bytes", "LUN capacity.", ["target", "lun"]);
        var allocated = factory.CreateGauge("iscsisnap_lun_allocated_bytes", "Bytes the LUN's image occupies on disk.", ["target", "lun"]);
        registry.AddBeforeCollectCallback(() =>
        {
            var all = targets.Targets;
            targetCount.Set(all.Count);
            foreach (var labels in capacity.GetAllLabelValues().ToList()) capacity.RemoveLabelled(labels);
            foreach (var labels in allocated.GetAllLabelValues().ToList()) allocated.RemoveLabelled(labels);
            foreach (var target in all)
            {
                foreach (var (lun, unit) in target.Luns)
                {
                    string lunLabel = lun.ToString(System.Globalization.CultureInfo.InvariantCulture);
                    capacity.WithLabels(target.Name, lunLabel).Set(unit.Device.Length);
                    long used = unit.Device.AllocatedBytes;
                    if (used >= 0) allocated.WithLabels(target.Name, lunLabel).Set(used);
                }
            }
        });
    }
}
