using ISCSISnap.Target.Hosting;
using ISCSISnap.Web;
using ISCSISnap.Web.Api;
using ISCSISnap.Web.Appliance;
using ISCSISnap.Web.Catalog;
using ISCSISnap.Web.Configuration;
using ISCSISnap.Web.Observability;
using Prometheus;
using Serilog;
using Serilog.Events;
using Serilog.Formatting.Compact;

if (args.Length > 0 && args[0] == "disk")
    return await ISCSISnap.Web.Cli.DiskCli.RunAsync(args[1..], Console.Out, Console.Error);
if (args.Length > 0 && args[0] == "filter")
    return await ISCSISnap.Web.Cli.FilterCli.RunAsync(args[1..], Console.Out, Console.Error);

var commandLine = CommandLine.Parse(args, out var argumentError);
if (argumentError is not null)
{
    Console.Error.WriteLine($"iscsisnap: {argumentError}");
    Console.Error.WriteLine(CommandLine.Usage);
    return 2;
}
if (commandLine.Help)
{
    Console.WriteLine(CommandLine.Usage);
    return 0;
}
var options = ConfigurationLoader.Load(commandLine, out var configurationErrors);
if (options is null)
{
    foreach (var error in configurationErrors) Console.Error.WriteLine($"iscsisnap: {error}");
    return 2;
}
try
{
    Directory.CreateDirectory(options.DataDirectory);
}
catch (Exception e) when (e is IOException or UnauthorizedAccessException)
{
    Console.Error.WriteLine($"iscsisnap: data directory {options.DataDirectory}: {e.Message}");
    return 2;
}

Serilog.Log.Logger = LoggingSetup.Create(options);
try
{
    var app = ApplianceHost.Build(options);
    await app.RunAsync();
    return 0;
}
catch (Exception e) when (ApplianceHost.DescribeStartupFailure(e) is { } message)
{
    Serilog.Log.Fatal("cannot start: {Reason}", message);
    Console.Error.WriteLine($"iscsisnap: {message}");
    return 1;
}
finally
{
    await Serilog.Log.CloseAndFlushAsync();
}

namespace ISCSISnap.Web
{
    /// <summary>Serilog: structured console and a rolling compact-JSON file under the data directory.</summary>
    public static class LoggingSetup
    {
        public static Serilog.ILogger Create(ApplianceOptions options)
        {
            var console = Enum.Parse<LogEventLevel>(options.Logging.Level, true);
            var file = Enum.Parse<LogEventLevel>(options.Logging.FileLevel, true);
            return new LoggerConfiguration()
                .MinimumLevel.Is((LogEventLevel)Math.Min((int)console, (int)file))
                .MinimumLevel.Override("Microsoft", LogEventLevel.Warning)
                .MinimumLevel.Override("Microsoft.Hosting.Lifetime", LogEventLevel.Information)
                .Enrich.FromLogContext()
                .WriteTo.Console(restrictedToMinimumLevel: console,
                    outputTemplate: "[{Timestamp:HH:mm:ss} {Level:u3}] {SourceContext}: {Message:lj}{NewLine}{Exception}")
                .WriteTo.File(new CompactJsonFormatter(), Path.Combine(options.DataDirectory, "logs", "iscsisnap-.log"),
                    restrictedToMinimumLevel: file, rollingInterval: RollingInterval.Day, retainedFileCountLimit: options.Logging.RetainedFiles)
                .CreateLogger();
        }
    }

    /// <summary>Wires storage, target and web into one host.</summary>
    public static class ApplianceHost
    {
        public static WebApplication Build(ApplianceOptions options, Action<IServiceCollection>? configure = null)
        {
            var builder = WebApplication.CreateBuilder(new WebApplicationOptions
            {
                Args = [],
                ContentRootPath = AppContext.BaseDirectory,
                EnvironmentName = "Production",
            });
            builder.Host.UseSerilog();
            builder.WebHost.UseUrls(options.Web.Url);
            builder.Host.ConfigureHostOptions(h => h.ShutdownTimeout = TimeSpan.FromSeconds(30));
            builder.Services.AddProblemDetails();

            Metrics.SuppressDefaultMetrics(new SuppressDefaultMetricOptions { SuppressEventCounters = true, SuppressMeters = true });
            var registry = Metrics.NewCustomRegistry();
            var factory = Metrics.WithCustomRegistry(registry);

            builder.Services.AddSingleton(options);
            builder.Services.AddSingleton(registry);
            builder.Services.AddSingleton(new ApplianceCatalog(Path.Combine(options.DataDirectory, "catalog.db")));
            builder.Services.AddSingleton<ITargetMetrics>(new PrometheusTargetMetrics(factory));
            builder.Services.AddSingleton<TargetRegistry>();
            builder.Services.AddSingleton(sp => new IscsiPortal(options.Iscsi, sp.GetRequiredService<TargetRegistry>(),
                sp.GetRequiredService<ILoggerFactory>(), sp.GetRequiredService<ITargetMetrics>()));
            builder.Services.AddSingleton(_ => ISCSISnap.Storage.Disks.DiskManager.Open(Path.Combine(options.DataDirectory, "disks")));
            builder.Services.AddSingleton(_ => new ISCSISnap.Storage.Filters.KernelContext(options.Filters.Workers, options.Filters.MaxDepth));
            builder.Services.AddSingleton<ISCSISnap.Storage.Filters.IFilterObserver>(sp => new FilterMetrics(factory, sp.GetRequiredService<ILogger<FilterMetrics>>()));
            builder.Services.AddSingleton<TargetService>();
            builder.Services.AddSingleton<JobService>();
            builder.Services.AddSingleton<DiskService>();
            builder.Services.ConfigureHttpJsonOptions(o => o.SerializerOptions.Converters.Add(new System.Text.Json.Serialization.JsonStringEnumConverter()));
            builder.Services.AddHostedService<ApplianceService>();
            configure?.Invoke(builder.Services);

            var app = builder.Build();
            StorageMetrics.Register(registry, factory, app.Services.GetRequiredService<TargetService>(), app.Services.GetRequiredService<IscsiPortal>());

            app.UseMiddleware<LoopbackOnlyMiddleware>();
            app.UseMiddleware<ProblemMiddleware>();
            app.UseRouting();
            app.UseHttpMetrics(o => o.SetMetricFactory(factory));
            app.MapGet("/healthz", (IscsiPortal portal, TargetService targets) => Results.Ok(new
            {
                status = "ok",
                portal = portal.LocalEndPoint?.ToString(),
                targets = targets.Targets.Count,
                sessions = portal.GetSessions().Count,
            }));
            app.MapMetrics("/metrics", registry);
            ManagementApi.Map(app);
            DiskApi.Map(app);
            return app;
        }

        /// <summary>A one-line reason for failures that are the operator's to fix (port in use, bad data directory); null for bugs.</summary>
        public static string? DescribeStartupFailure(Exception e) => e switch
        {
            IOException io when io.Message.Contains("address already in use", StringComparison.OrdinalIgnoreCase) => $"web: {io.Message}",
            InvalidOperationException op => op.Message,
            IOException io => io.Message,
            UnauthorizedAccessException ua => ua.Message,
            _ => null,
        };
    }
}
