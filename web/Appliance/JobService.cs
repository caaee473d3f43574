using System.Collections.Concurrent;

namespace ISCSISnap.Web.Appliance;

public enum JobState
{
    Running,
    Succeeded,
    Failed,
    Canceled,
}

/// <summary>Long work (a merge, an export) as the API shows it: GET /api/v1/jobs/{id}.</summary>
public sealed record JobInfo(
    Guid Id,
    string Kind,
    string Description,
    Guid? DiskId,
    Guid? SnapshotId,
    JobState State,
    double Progress,
    string? Error,
    DateTimeOffset StartedAt,
    DateTimeOffset? FinishedAt);

/// <summary>
/// Runs long disk operations in the background and reports their progress. Jobs live in memory; the work they
/// do is crash-safe on its own (a merge resumes at the next start, an export leaves no partial file).
/// At shutdown running jobs are cancelled and awaited.
/// </summary>
public sealed class JobService : IAsyncDisposable
{
    private const int KeptFinishedJobs = 1000;
    private readonly ConcurrentDictionary<Guid, Job> _jobs = new();
    private readonly CancellationTokenSource _stopping = new();
    private readonly ILogger<JobService> _log;

    public JobService(ILogger<JobService> log) => _log = log;

    private sealed class Job(JobInfo info) : IProgress<double>
    {
        private double _progress;
        public JobInfo Info = info;
        public Task Completion = Task.CompletedTask;

        public void Report(double value) => Volatile.Write(ref _progress, Math.Clamp(value, 0, 1));
        public double Progress => Volatile.Read(ref _progress);
    }

    public JobInfo Start(string kind, string description, Guid? diskId, Guid? snapshotId, Func<IProgress<double>, CancellationToken, Task> work)
    {
        var job = new Job(new JobInfo(Guid.NewGuid(), kind, description, diskId, snapshotId, JobState.Running, 0, null, DateTimeOffset.UtcNow, null));
        _jobs[job.Info.Id] = job;
        Log.JobStarted(_log, job.Info.Id, kind, description);
        job.Completion = Task.Run(async () =>
        {
            JobState state;
            string? error = null;
            try
            {
                await work(job, _stopping.Token).ConfigureAwait(false);
                state = JobState.Succeeded;
                job.Report(1);
            }
            catch (OperationCanceledException) when (_stopping.IsCancellationRequested)
            {
                state = JobState.Canceled;
                error = "the appliance stopped; the work resumes or can be retried after the restart";
            }
            catch (Exception e)
            {
                state = JobState.Failed;
                error = e is ApplianceError or ISCSISnap.Storage.Disks.DiskException or ISCSISnap.Storage.BlockDevices.StorageException
                    ? e.Message : $"unexpected failure: {e.Message}";
                if (e is not (ApplianceError or ISCSISnap.Storage.Disks.DiskException)) _log.LogError(e, "job {Job} ({Kind}) failed", job.Info.Id, kind);
            }
            job.Info = job.Info with { State = state, Error = error, FinishedAt = DateTimeOffset.UtcNow };
            Log.JobFinished(_log, job.Info.Id, kind, state.ToString(), error ?? "");
        });
        PruneFinished();
        return Describe(job);
    }

    public JobInfo? Get(Guid id) => _jobs.TryGetValue(id, out var job) ? Describe(job) : null;

    public IReadOnlyList<JobInfo> All => _jobs.Values.Select(Describe).OrderBy(j => j.StartedAt).ToList();

    /// <summary>Waits for a job to end (tests and the CLI's --wait go through the API instead; this is for the host).</summary>
    public Task WhenDoneAsync(Guid id) => _jobs.TryGetValue(id, out var job) ? job.Completion : Task.CompletedTask;

    /// <summary>Finished jobs are kept for their callers to read, the newest <see cref="KeptFinishedJobs"/> of them.</summary>
    private void PruneFinished()
    {
        var finished = _jobs.Values.Where(j => j.Info.State != JobState.Running).ToList();
        if (finished.Count <= KeptFinishedJobs) return;
        foreach (var job in finished.OrderBy(j => j.Info.FinishedAt).Take(finished.Count - KeptFinishedJobs)) _jobs.TryRemove(job.Info.Id, out _);
    }

    private static JobInfo Describe(Job job) => job.Info with { Progress = job.Info.State == JobState.Succeeded ? 1 : job.Progress };

    public async ValueTask DisposeAsync()
    {
        _stopping.Cancel();
        try
        {
            await Task.WhenAll(_jobs.Values.Select(j => j.Completion)).ConfigureAwait(false);
        }
        catch
        {
            // Each job recorded its own outcome.
        }
    }
}
