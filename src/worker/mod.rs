//! Job workers, one per compute device: claim the oldest queued job (or a running one whose
//! worker's lease ran out), run the fine-tune on its own
//! OS thread ([`run`]), record progress and metrics as they arrive, register the model on
//! success. Workers get a [`JobContext`] of their own, not the web state.

pub mod hub;
mod run;
pub mod submit;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::Device;
use crate::db::Pool;

use crate::db;
use crate::db::jobs::{Holder, Job, Status};
use crate::objects::Objects;
use crate::paths::DataPaths;
use crate::registry::{JobModel, ModelRegistry};
use crate::train::{Phase, TrainError, TrainEvent};
use hub::{JobEvent, JobHub};
use run::{JobFailure, Recorder};

/// How often an idle worker looks at the queue even without a wake-up.
const POLL: Duration = Duration::from_secs(2);

/// What a job needs from the service: storage, the hub, the model registry, and the few settings
/// that concern jobs, as plain values.
#[derive(Clone)]
pub struct JobContext {
    pub db: Pool,
    pub paths: DataPaths,
    pub objects: Objects,
    pub hub: Arc<JobHub>,
    pub models: ModelRegistry,
    /// Folder of local base models (`base_model` names a sub-folder).
    pub base_models_dir: PathBuf,
    /// Largest image decoded, in pixels.
    pub max_image_pixels: u64,
    /// This process's name in `jobs.worker` (`--worker-name`).
    pub worker_name: String,
    /// How long a claim holds without renewal (`--lease-secs`); renewed every third of it.
    pub lease: Duration,
    /// Memory a job's training may take on the CPU (`--max-job-memory`; 0: no check).
    pub max_job_memory: u64,
}

/// Starts one worker task per device (and, on PostgreSQL, a listener that wakes them when a job is
/// queued by another process).
pub fn spawn(ctx: JobContext, devices: Vec<(String, Device)>) -> Vec<tokio::task::JoinHandle<()>> {
    if !devices.is_empty() {
        let (db, hub) = (ctx.db.clone(), ctx.hub.clone());
        let shutdown = hub.shutdown_token();
        tokio::spawn(async move {
            tokio::select! {
                _ = db::listen(&db, db::JOBS_CHANNEL, || hub.job_submitted()) => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
    devices.into_iter().map(|(name, device)| tokio::spawn(work(ctx.clone(), name, device))).collect()
}

async fn work(ctx: JobContext, name: String, device: Device) {
    let shutdown = ctx.hub.shutdown_token();
    tracing::info!(device = %name, "worker started");
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        // Listen before looking, so a submit between the claim and the wait is not missed.
        let submitted = ctx.hub.submitted();
        tokio::pin!(submitted);
        submitted.as_mut().enable();
        // Not the jobs this process runs on its other devices, though their leases may have lapsed
        // (the database was out of reach longer than a lease): those runs still hold them.
        match db::jobs::claim(&ctx.db, &ctx.worker_name, &name, ctx.lease, &ctx.hub.running()).await {
            // A fallback the claim above makes unreachable unless a run started between the list
            // and the claim: the claim is handed back, so that run goes on holding the job (with
            // the lease this claim set).
            Ok(Some(job)) if ctx.hub.runs(&job.id) => {
                tracing::warn!(job = %job.id, device = %name, "claimed a job this process still runs on another device; left to that run");
                if let Err(e) = db::jobs::undo_claim(&ctx.db, &job.id, &Holder::of(&ctx.worker_name, &job)).await {
                    tracing::error!(job = %job.id, error = %e, "handing the claim back failed; the run stops at its next renewal and the job is claimed again");
                }
            }
            Ok(Some(job)) => {
                process(&ctx, job, &name, &device).await;
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "claiming a job failed"),
        }
        tokio::select! {
            _ = submitted => {}
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    tracing::info!(device = %name, "worker stopped");
}

/// A run's flags: cancel it, it lost its job, and when its claim was last renewed.
type RunFlags = (Arc<AtomicBool>, Arc<AtomicBool>, Arc<Mutex<Instant>>);

/// Renews the lease on a running job every third of its length ([`renew`]). When the job no
/// longer runs under this worker (its lease ran out and another worker claimed it, or it ended
/// elsewhere), the run is cancelled and flagged `lost`, so nothing of its outcome is recorded. A
/// database that does not answer is retried: the lease still holds for two thirds of its length.
async fn keep_lease(ctx: JobContext, job_id: String, holder: Holder, flags: RunFlags) {
    loop {
        tokio::time::sleep(ctx.lease / 3).await;
        match renew(&ctx.db, &job_id, &holder, ctx.lease, &flags).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => tracing::warn!(job = %job_id, error = %e, "renewing the job's lease failed; retrying"),
        }
    }
}

/// Extends `holder`'s lease on the job and gives the answer to the run's flags: when a renewal
/// that held was asked for (`renewed`, which the run's fence reads: `run::holds_claim`), a cancel
/// asked for through another process, or the job gone from this claim (the run is cancelled and
/// flagged `lost`). Whether the claim still holds.
async fn renew(db: &Pool, job_id: &str, holder: &Holder, lease: Duration, (cancel, lost, renewed): &RunFlags) -> Result<bool, sqlx::Error> {
    let asked = Instant::now();
    match db::jobs::renew_lease(db, job_id, holder, lease).await? {
        Some(cancel_requested) => {
            let mut last = renewed.lock().unwrap_or_else(PoisonError::into_inner);
            *last = (*last).max(asked);
            if cancel_requested {
                cancel.store(true, Ordering::SeqCst);
            }
            Ok(true)
        }
        None => {
            lost.store(true, Ordering::SeqCst);
            cancel.store(true, Ordering::SeqCst);
            Ok(false)
        }
    }
}

/// The periodic sweep's part of `jobs/`: removes, here and in the object store, the folder of a
/// job that has ended (or no longer exists) once nothing directly in it here, or nothing in it
/// in the store, has changed for `grace`. The process that ends a job removes its folder; but a
/// machine whose run lost its lease (and whose job another machine then finished) keeps its copy
/// of the checkpoints, and so does a process that stopped between a job's end and the removal
/// (with a store, the store's copy too, which no other machine's data folder names). An ended
/// job never runs again, so no claim can race the removal, whichever processes share the data
/// folder; the grace leaves alone a run that lost its lease and writes on until its next renewal
/// stops it. Returns the folders removed (the store's as the data folder's paths).
pub async fn remove_ended_job_folders(db: &Pool, objects: &Objects, paths: &DataPaths, grace: Duration) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = vec![];
    for dir in objects.idle_folders(&paths.jobs(), grace).await? {
        let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if db::jobs::ended_or_gone(db, &id).await? {
            objects.remove_dir(&dir).await?;
            removed.push(dir);
        }
    }
    Ok(removed)
}

/// Claims of a job after which a failure that may pass ends it failed instead of putting it back
/// in the queue; a job claimed once more than this since its last checkpoint (every run since
/// ended without an outcome) fails without running. A graceful shutdown's claim does not count
/// ([`db::jobs::hand_back`]).
pub const MAX_CLAIMS: u32 = 5;

/// After a failure that may pass (the object store or the database out of reach while the job
/// fetched its inputs or saved its model): the job goes back to the queue, its checkpoints kept, so
/// the next claim resumes where it was, after a wait that grows with each claim (a third of the
/// lease per claim so far; the lease is renewed meanwhile, and a shutdown cuts the wait short).
/// At its [`MAX_CLAIMS`]th claim it ends failed with the reason.
async fn retry_or_fail(ctx: &JobContext, job: &Job, holder: &Holder, error: String) -> anyhow::Result<()> {
    if job.attempts >= MAX_CLAIMS {
        tracing::warn!(job = %job.id, %error, claims = job.attempts, "job failed");
        return Ok(db::jobs::finish(&ctx.db, &job.id, holder, Status::Failed, Some(&error)).await?);
    }
    let cancelled = || async { Ok(db::jobs::finish(&ctx.db, &job.id, holder, Status::Cancelled, None).await?) };
    // A cancel asked for meanwhile ends it cancelled, not tried again (and failed in the end).
    if cancel_asked(ctx, &job.id).await {
        return cancelled().await;
    }
    let wait = ctx.lease / 3 * job.attempts.max(1);
    tracing::warn!(job = %job.id, %error, claim = job.attempts, of = MAX_CLAIMS, "the job goes back to the queue in {wait:?}, its checkpoints kept");
    let shutdown = ctx.hub.shutdown_token();
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = shutdown.cancelled() => {}
    }
    if cancel_asked(ctx, &job.id).await {
        return cancelled().await;
    }
    Ok(db::jobs::requeue(&ctx.db, &job.id, holder).await?)
}

/// Whether a cancel of the job was asked for (false when the database cannot say).
async fn cancel_asked(ctx: &JobContext, job_id: &str) -> bool {
    match db::jobs::get(&ctx.db, job_id).await {
        Ok(job) => job.is_some_and(|job| job.cancel_requested),
        Err(e) => {
            tracing::warn!(job = %job_id, error = %e, "reading whether the job's cancel was asked for failed");
            false
        }
    }
}

/// Runs one claimed job to its end and records the outcome.
async fn process(ctx: &JobContext, job: Job, device_name: &str, device: &Device) {
    tracing::info!(job = %job.id, device = %device_name, "job started");
    let cancel = ctx.hub.start(&job.id, job.cancel_requested);
    let lost = Arc::new(AtomicBool::new(false));
    // The claim was taken just now: its lease runs from before this.
    let renewed = Arc::new(Mutex::new(Instant::now()));
    let holder = Holder::of(&ctx.worker_name, &job);
    let flags: RunFlags = (cancel, lost.clone(), renewed);
    // Aborted when dropped: a panic below must not leave the lease renewed for ever.
    let renewal = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(keep_lease(ctx.clone(), job.id.clone(), holder.clone(), flags.clone())));
    let mut recorder = Recorder::new(ctx, &job, holder.clone());
    // Every claim since its last checkpoint ended without an outcome: its process died (killed,
    // perhaps for lack of memory, by this very job) or lost its lease. Running it again would only
    // repeat that.
    let since_progress = job.attempts.saturating_sub(job.progress_claim);
    let outcome = if since_progress > MAX_CLAIMS {
        Err(JobFailure::Abandoned(since_progress - 1))
    } else {
        run::run_job(ctx, &job, device, flags, &mut recorder).await
    };
    let shutting_down = ctx.hub.shutdown_token().is_cancelled();
    let holder = &holder;
    let result: anyhow::Result<()> = match outcome {
        _ if lost.load(Ordering::SeqCst) => {
            tracing::warn!(job = %job.id, "lease lost: another worker has taken the job over; this run's outcome is dropped");
            Ok(())
        }
        Ok(outcome) => {
            // Copying the model into place and loading it for /predict is the last of `saving`.
            recorder.record(TrainEvent::Phase { phase: Phase::Saving, done: 0, total: 1 }).await;
            match ctx.models.register_for_job(&job, &outcome, holder).await {
                Ok(JobModel::Registered(model)) => {
                    tracing::info!(job = %job.id, model = %model.id, epoch = outcome.best_epoch, f1 = outcome.best.f1, "model registered");
                    recorder.record(TrainEvent::Phase { phase: Phase::Saving, done: 1, total: 1 }).await;
                    Ok(())
                }
                Ok(JobModel::CancelRequested) => {
                    tracing::info!(job = %job.id, "cancelled while its model was being saved: no model registered");
                    db::jobs::finish(&ctx.db, &job.id, holder, Status::Cancelled, None).await.map_err(Into::into)
                }
                Ok(JobModel::Lost) => {
                    tracing::warn!(job = %job.id, "lease lost while registering the model: another worker has taken the job over");
                    Ok(())
                }
                // Not left running (to be claimed and trained again at every lease): tried again a
                // few times, then failed with the reason.
                Err(e) => retry_or_fail(ctx, &job, holder, format!("registering the model failed: {e:#}")).await,
            }
        }
        // A shutdown requeues the job, unless its cancel was asked for (through this process or
        // another): then it ends cancelled now rather than at the next start.
        Err(JobFailure::Train(TrainError::Cancelled)) if shutting_down && !cancel_asked(ctx, &job.id).await => {
            tracing::info!(job = %job.id, "job interrupted by shutdown; it resumes at the next start");
            db::jobs::hand_back(&ctx.db, &job.id, holder).await.map_err(Into::into)
        }
        Err(JobFailure::Train(TrainError::Cancelled)) => db::jobs::finish(&ctx.db, &job.id, holder, Status::Cancelled, None).await.map_err(Into::into),
        Err(JobFailure::Store(e)) => retry_or_fail(ctx, &job, holder, e).await,
        Err(e) => {
            tracing::warn!(job = %job.id, error = %e, "job failed");
            db::jobs::finish(&ctx.db, &job.id, holder, Status::Failed, Some(&e.to_string())).await.map_err(Into::into)
        }
    };
    // The lease is held until the outcome is recorded: copying and loading a large model takes a
    // while, and the job must not look abandoned meanwhile.
    drop(renewal);
    // Until its outcome is recorded, the job is this process's: no other device of it takes it.
    ctx.hub.stop(&job.id);
    if let Err(e) = result {
        tracing::error!(job = %job.id, error = ?e, "recording the job's outcome failed");
    }
    match db::jobs::get(&ctx.db, &job.id).await {
        Ok(Some(done)) if done.status.is_terminal() => {
            tracing::info!(job = %job.id, status = done.status.as_str(), "job finished");
            // Its checkpoints serve no one any more, here or in the object store.
            if let Err(e) = ctx.objects.remove_dir(&ctx.paths.job(&job.id)).await {
                tracing::warn!(job = %job.id, error = format!("{e:#}"), "removing the job's checkpoints failed");
            }
            ctx.hub.publish(&job.id, JobEvent::Status(Box::new(done)));
        }
        Ok(_) => {}
        Err(e) => tracing::error!(job = %job.id, error = %e, "reading the finished job failed"),
    }
}
