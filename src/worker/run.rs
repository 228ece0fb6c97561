//! One job's run: its dataset and base model resolved, the fine-tune on an OS thread of its own
//! (never on the async runtime), and every event it reports recorded in the database and sent
//! to the job's live subscribers.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use candle_core::Device;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::JobContext;
use super::hub::JobEvent;
use super::submit::resolve_base_model;
use crate::db;
use crate::db::jobs::{Holder, Job, Progress};
use crate::db::job_metrics::{MistakeRow, TrainPoint};
use crate::model::{LoadedModel, ModelError};
use crate::train::data::TrainData;
use crate::train::memory::MemoryLimit;
use crate::train::progress::PhaseClock;
use crate::train::{Control, Phase, TrainError, TrainEvent, TrainOutcome, TrainParams, TrainSpec, cache_budget_within, fine_tune};

/// Why a job did not produce a model.
#[derive(Debug, thiserror::Error)]
pub(super) enum JobFailure {
    #[error("{0}")]
    Train(#[from] TrainError),
    #[error("{0}")]
    Setup(String),
    /// Fetching from the object store failed: it may be out of reach for a while, so the job is
    /// tried again (see `worker::retry_or_fail`).
    #[error("{0}")]
    Store(String),
    #[error("training crashed: {0}")]
    Panic(String),
    /// This many claims since its last checkpoint ended without an outcome (see
    /// `worker::MAX_CLAIMS`).
    #[error(
        "not run again: its last {0} runs each ended without an outcome or a new checkpoint (the process running it was killed, for example for lack of memory, or lost its lease, or the object store was out of reach); a smaller batch_size or base model may fit"
    )]
    Abandoned(u32),
}

fn setup(e: impl std::fmt::Display) -> JobFailure {
    JobFailure::Setup(e.to_string())
}

fn store(e: anyhow::Error) -> JobFailure {
    JobFailure::Store(format!("{e:#}"))
}

/// Runs the fine-tune of `job` on a thread of its own and records its events as they arrive.
/// Of the run's `flags`, `lost` is set once the job no longer runs under this worker: from then on no checkpoint of
/// this run goes to the object store (where the run that took the job over resumes from). Nor
/// into its claim's folder: before anything is written there, the claim is renewed
/// ([`holds_claim`]); and the run that took the job over renamed that folder to its own
/// (`checkpoint::take_over`), so what this run still writes by the old path reaches no one.
pub(super) async fn run_job(
    ctx: &JobContext,
    job: &Job,
    device: &Device,
    flags: super::RunFlags,
    recorder: &mut Recorder<'_>,
) -> Result<TrainOutcome, JobFailure> {
    let params: TrainParams = serde_json::from_value(job.params.clone()).map_err(|e| setup(format!("stored hyper-parameters: {e}")))?;
    let our_model = db::models::get(&ctx.db, &job.base_model).await.map_err(setup)?;
    if let Some(model) = &our_model {
        ctx.models.dir(model).await.map_err(store)?;
    }
    let source = resolve_base_model(&job.base_model, our_model.is_some(), &ctx.paths.models(), &ctx.base_models_dir).map_err(setup)?;
    let (data, files) = load_dataset(ctx, &job.dataset_id).await?;
    (recorder.files, recorder.labels) = (files, data.labels.clone());
    // This claim's own folder, holding the checkpoint the job resumes from if it has one: a run
    // of an earlier claim still writing (its lease lapsed unnoticed) writes elsewhere from now on.
    let holder = recorder.holder.clone();
    let (job_dir, claim) = (ctx.paths.job(&job.id), holder.claim);
    let checkpoint_root = tokio::task::spawn_blocking(move || crate::train::checkpoint::take_over(&job_dir, claim))
        .await
        .map_err(setup)?
        .map_err(|e| setup(format!("taking over the job's checkpoints: {e}")))?;
    // Another machine may have run it since: its last checkpoint is in the object store.
    if let Some(epoch) = ctx.objects.fetch_checkpoint(&checkpoint_root, claim).await.map_err(store)? {
        tracing::info!(job = %job.id, epoch, "fetched the job's last checkpoint from the object store");
    }
    let memory_limit = MemoryLimit::max_job_memory(ctx.max_job_memory);
    let spec = TrainSpec {
        params: params.clone(),
        data,
        checkpoint_root: checkpoint_root.clone(),
        max_pixels: ctx.max_image_pixels,
        cache_budget: cache_budget_within(memory_limit.as_ref()),
        memory_limit,
    };
    let (tx, rx) = mpsc::unbounded_channel::<TrainEvent>();
    let (done_tx, done_rx) = oneshot::channel();
    let device = device.clone();
    let labels = spec.data.labels.clone();
    let (objects, runtime) = (ctx.objects.clone(), tokio::runtime::Handle::current());
    // This run's own prefix for its checkpoints in the object store (see `objects`).
    let run_prefix = crate::objects::run_prefix(claim);
    let (pool, job_id, lease) = (ctx.db.clone(), job.id.clone(), ctx.lease);
    let (cancel, lost, _) = flags.clone();
    std::thread::Builder::new()
        .name(format!("train-{}", &job.id[job.id.len().saturating_sub(8)..]))
        .spawn(move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<TrainOutcome, JobFailure> {
                let mut improved = false;
                let mut on_event = |e: TrainEvent| {
                    match &e {
                        TrainEvent::Epoch { improved: better, .. } => improved = *better,
                        // Stored before the next epoch starts, from this thread (the async side
                        // only records): the checkpoint is then in the object store before the
                        // next one replaces it in the folder.
                        TrainEvent::Checkpoint { epoch, .. } if objects.is_remote() && !lost.load(Ordering::SeqCst) => {
                            if let Err(e) = runtime.block_on(objects.publish_checkpoint(&checkpoint_root, &run_prefix, *epoch, improved)) {
                                tracing::error!(error = format!("{e:#}"), epoch, "storing the checkpoint in the object store failed; a resume elsewhere starts from an earlier one");
                            }
                        }
                        _ => {}
                    }
                    let _ = tx.send(e);
                };
                on_event(TrainEvent::Phase { phase: Phase::Loading, done: 0, total: 1 });
                // A hub model not cached yet: its download in bytes, stopped by a cancel (or by
                // this process stopping) rather than finished first.
                let mut downloaded = |done: u64, total: u64| {
                    // (0, 0): nothing to count yet; still `loading 0/1`.
                    if total > 0 {
                        on_event(TrainEvent::Phase { phase: Phase::Loading, done, total });
                    }
                    if cancel.load(Ordering::SeqCst) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
                };
                let mut model = LoadedModel::load_with(&source, Some(&labels), &device, params.seed, &mut downloaded).map_err(|e| match e {
                    ModelError::Stopped => TrainError::Cancelled,
                    e => TrainError::from(e),
                })?;
                let holds = || holds_claim(&runtime, (&pool, &job_id, &holder, lease), &flags);
                Ok(fine_tune(&mut model, spec, &device, Control { cancel: &cancel, on_event: &mut on_event, holds: &holds })?)
            }));
            // The model and the step's buffers are freed by now; the allocator keeps freed memory
            // for the next step (see `malloc`), so hand it back to the system here.
            crate::malloc::release_free_memory();
            let _ = done_tx.send(result.unwrap_or_else(|panic| Err(JobFailure::Panic(panic_message(panic.as_ref())))));
        })
        .map_err(|e| setup(format!("cannot start the training thread: {e}")))?;

    record_events(recorder, rx).await;
    done_rx.await.unwrap_or_else(|_| Err(JobFailure::Panic("the training thread vanished".into())))
}

/// Whether the run still holds its job, asked (from the training thread) before it writes into
/// its claim's folder: the lease is renewed now ([`super::renew`], which flags a run whose claim
/// passed on `lost` and cancels it: another run took the job, and that folder with it). A
/// database that does not answer leaves the claim holding while half the lease since the last
/// renewal that held is left, as `keep_lease` would; after that, another run may have taken the
/// job, and the run is flagged and cancelled the same way.
fn holds_claim(runtime: &tokio::runtime::Handle, (pool, job_id, holder, lease): (&db::Pool, &str, &Holder, Duration), flags: &super::RunFlags) -> bool {
    match runtime.block_on(super::renew(pool, job_id, holder, lease, flags)) {
        Ok(true) => true,
        Ok(false) => {
            tracing::warn!(job = %job_id, "the job was taken over by another run: this one stops, writing nothing more into its folder");
            false
        }
        Err(e) => {
            let (cancel, lost, renewed) = flags;
            let held = renewed.lock().unwrap_or_else(PoisonError::into_inner).elapsed() < lease / 2;
            tracing::warn!(job = %job_id, error = %e, held, "renewing the job's lease before writing a checkpoint failed");
            if !held {
                lost.store(true, Ordering::SeqCst);
                cancel.store(true, Ordering::SeqCst);
            }
            held
        }
    }
}

/// Records events as they arrive until their sender is dropped, and progress held back by the
/// interval once the interval has passed, should no event come by then.
async fn record_events(recorder: &mut Recorder<'_>, mut rx: mpsc::UnboundedReceiver<TrainEvent>) {
    loop {
        let event = match recorder.flush_at() {
            Some(at) => tokio::select! {
                event = rx.recv() => event,
                () = tokio::time::sleep_until(at.into()) => {
                    recorder.flush().await;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        match event {
            Some(event) => recorder.record(event).await,
            None => break,
        }
    }
    recorder.flush().await;
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// The job's dataset as training examples (its images are blobs of the store), and each image
/// file's blob and name in the upload.
async fn load_dataset(ctx: &JobContext, dataset_id: &str) -> Result<(TrainData, HashMap<PathBuf, (String, String)>), JobFailure> {
    let dataset = db::datasets::get(&ctx.db, dataset_id)
        .await
        .map_err(setup)?
        .ok_or_else(|| setup(format!("dataset '{dataset_id}' no longer exists")))?;
    let rows = db::datasets::images(&ctx.db, dataset_id).await.map_err(setup)?;
    let paths = ctx.objects.blob_paths(&rows.iter().map(|r| r.blob.clone()).collect::<Vec<_>>()).await.map_err(store)?;
    // Clustering the look-alikes grows as the square of the images: on a blocking thread.
    tokio::task::spawn_blocking(move || {
        // A dataset the background fill-in has not fingerprinted again since an upgrade is
        // grouped by what the version that stored it knew.
        let looks: Vec<_> = rows.iter().zip(&paths).map(|(row, path)| (path.clone(), row.label.as_str(), row.look_so_far())).collect();
        let mut data = TrainData::with_labels(dataset.classes, rows.iter().zip(&paths).map(|(row, path)| (path.clone(), row.label.clone(), row.split)).collect())?;
        data.set_look_alikes(&looks);
        let files = rows.into_iter().zip(paths).map(|(row, path)| (path, (row.blob, row.file))).collect();
        Ok((data, files))
    })
    .await
    .map_err(setup)?
}

/// How often, at most, a job's phase progress is written and sent live (besides every change of
/// phase and the end of each): a few times a second.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Records a run's events: every step and evaluation in the database; the job's progress (epoch,
/// step, phase) in its row and as live `progress` events, at most every [`PROGRESS_INTERVAL`]
/// except at a change of phase and at the end of one. Progress held back by the interval is
/// written when it has passed ([`Recorder::flush_at`]), so the last figures before a slow stretch
/// show at once rather than with the next event.
pub(super) struct Recorder<'a> {
    ctx: &'a JobContext,
    job: &'a Job,
    /// The claim the run holds the job under: every write names it (a run whose claim passed on
    /// writes nothing).
    holder: Holder,
    progress: Progress,
    clock: PhaseClock,
    last_sent: Option<Instant>,
    /// The live event's extra fields of progress held back by the interval, not written yet.
    held: Option<serde_json::Value>,
    /// Blob and file name of each image file of the dataset, and the class names, to record
    /// mistakes by.
    files: HashMap<PathBuf, (String, String)>,
    labels: Vec<String>,
}

impl<'a> Recorder<'a> {
    pub fn new(ctx: &'a JobContext, job: &'a Job, holder: Holder) -> Self {
        Self { ctx, job, holder, progress: job.progress.clone(), clock: PhaseClock::default(), last_sent: None, held: None, files: HashMap::new(), labels: vec![] }
    }

    /// Records one event; a failure to record is logged (the run goes on).
    pub async fn record(&mut self, event: TrainEvent) {
        if let Err(e) = self.try_record(event).await {
            tracing::error!(job = %self.job.id, error = %e, "recording a training event failed");
        }
    }

    async fn try_record(&mut self, event: TrainEvent) -> anyhow::Result<()> {
        let (ctx, job, db, holder) = (self.ctx, self.job, &self.ctx.db, &self.holder);
        match event {
            TrainEvent::Started { epochs, total_steps, resumed_from, steps_done, precision, .. } => {
                db::jobs::set_plan(db, &job.id, holder, epochs, total_steps).await?;
                db::jobs::set_precision(db, &job.id, holder, precision.name()).await?;
                let done = resumed_from.unwrap_or(0);
                db::job_metrics::truncate_after(db, &job.id, holder, done).await?;
                db::jobs::set_progress(db, &job.id, holder, done, steps_done).await?;
                (self.progress.epochs, self.progress.steps, self.progress.epoch, self.progress.step) = (epochs, total_steps, done, steps_done);
                if let Some(epoch) = resumed_from {
                    tracing::info!(job = %job.id, epoch, "resuming from checkpoint");
                }
            }
            TrainEvent::Restarted { reason } => tracing::warn!(job = %job.id, %reason, "checkpoint unusable, starting over"),
            TrainEvent::Step { epoch, step, steps, loss, learning_rate, images_per_s } => {
                db::job_metrics::record_step(db, &job.id, holder, &TrainPoint { step, epoch, loss, learning_rate }).await?;
                ctx.hub.set_throughput(&job.id, images_per_s);
                (self.progress.epoch, self.progress.step, self.progress.steps) = (epoch, step, steps);
                let extra = json!({"loss": loss, "learning_rate": learning_rate, "images_per_s": images_per_s});
                self.phase(Phase::Training, step, steps, Some(images_per_s), extra).await?;
            }
            TrainEvent::Phase { phase, done, total } => self.phase(phase, done, total, None, json!({})).await?,
            TrainEvent::Epoch { epoch, report, mistakes, .. } => {
                db::job_metrics::record_evaluation(db, &job.id, holder, "validation", epoch, &report).await?;
                let label = |i: u32| self.labels.get(i as usize).cloned().unwrap_or_default();
                let rows: Vec<MistakeRow> = mistakes
                    .iter()
                    .filter_map(|m| {
                        let (blob, file) = self.files.get(&m.path)?.clone();
                        Some(MistakeRow { blob, file, label: label(m.label), predicted: label(m.predicted), score: m.score })
                    })
                    .collect();
                db::job_metrics::record_mistakes(db, &job.id, holder, epoch, &rows).await?;
                db::jobs::set_epoch_done(db, &job.id, holder, epoch).await?;
                self.progress.epoch = self.progress.epoch.max(epoch);
                let mut block = serde_json::to_value(&report)?;
                block["epoch"] = json!(epoch);
                ctx.hub.publish(&job.id, JobEvent::Metrics(block));
            }
            TrainEvent::Checkpoint { epoch, dir, score } => {
                // Its folder's name in the claim's folder: the next claim takes that folder over
                // under its own name, so a path through it would go stale.
                let name = dir.file_name().unwrap_or(dir.as_os_str()).to_string_lossy().into_owned();
                db::job_metrics::record_checkpoint(db, &job.id, holder, epoch, &name, score).await?;
                db::jobs::mark_progress(db, &job.id, holder).await?;
            }
            TrainEvent::Test { report } => db::job_metrics::record_evaluation(db, &job.id, holder, "test", 0, &report).await?,
            TrainEvent::Probe { c, cv_accuracy, cv_log_loss, features_seconds, fit_seconds, views } => {
                tracing::info!(job = %job.id, c, ?cv_accuracy, ?cv_log_loss, features_seconds, fit_seconds, views, "probe head fitted")
            }
            TrainEvent::Decided { decision, epochs, total_steps } | TrainEvent::Stopped { decision, epochs, total_steps, .. } => {
                tracing::info!(job = %job.id, action = ?decision.action, epochs, reason = %decision.reason, "decided");
                db::jobs::set_decision(db, &job.id, holder, &serde_json::to_value(&decision)?).await?;
                db::jobs::set_plan(db, &job.id, holder, epochs, total_steps).await?;
                (self.progress.epochs, self.progress.steps) = (epochs, total_steps);
            }
            TrainEvent::Calibrated { calibration: c } => {
                tracing::info!(job = %job.id, temperature = c.temperature, fitted = c.fitted, ece_before = c.validation_ece_before, ece_after = c.validation_ece_after, "scores calibrated")
            }
        }
        Ok(())
    }

    /// Progress within a phase: written and sent when the phase changed, when it is complete, or
    /// when the last update is older than [`PROGRESS_INTERVAL`]. `rate` overrides the measured one;
    /// `extra` fields (a step's loss) go into the live event only.
    async fn phase(&mut self, phase: Phase, done: u64, total: u64, rate: Option<f64>, extra: serde_json::Value) -> anyhow::Result<()> {
        let (changed, measured) = self.clock.update(phase, done, total);
        let p = &mut self.progress;
        (p.phase, p.done, p.total, p.rate) = (Some(phase), done, total, rate.or(measured));
        let due = self.last_sent.is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL);
        if !(changed || done >= total || due) {
            self.held = Some(extra);
            return Ok(());
        }
        self.send(extra).await
    }

    /// When progress held back by the interval is due to be written, if any is.
    pub fn flush_at(&self) -> Option<Instant> {
        self.held.as_ref().and(self.last_sent).map(|t| t + PROGRESS_INTERVAL)
    }

    /// Writes and sends progress held back by the interval, if any.
    pub async fn flush(&mut self) {
        let Some(extra) = self.held.take() else { return };
        if let Err(e) = self.send(extra).await {
            tracing::error!(job = %self.job.id, error = %e, "recording a job's progress failed");
        }
    }

    /// Writes the current progress in the job's row and sends it live, with `extra` fields.
    async fn send(&mut self, extra: serde_json::Value) -> anyhow::Result<()> {
        self.held = None;
        self.last_sent = Some(Instant::now());
        let (db, id, p) = (&self.ctx.db, &self.job.id, &self.progress);
        let Some(phase) = p.phase else { return Ok(()) };
        db::jobs::set_progress(db, id, &self.holder, p.epoch, p.step).await?;
        db::jobs::set_phase(db, id, &self.holder, phase, p.done, p.total, p.rate).await?;
        let mut event = serde_json::to_value(p)?;
        if let (Some(event), Some(extra)) = (event.as_object_mut(), extra.as_object()) {
            event.extend(extra.clone());
        }
        self.ctx.hub.publish(id, JobEvent::Progress(event));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::dataset::{ImageRecord, Ingested, Split};
    use crate::db::jobs::NewJob;

    /// A running job of a one-image dataset, in a service on a fresh data folder.
    async fn running_job(dir: &std::path::Path) -> (crate::startup::Application, JobContext, Job) {
        let mut config = crate::config::ServeConfig::default_for(dir);
        (config.host, config.port) = ("127.0.0.1".into(), 0);
        let app = crate::startup::Application::build(config).await.unwrap();
        let ctx = crate::startup::job_context(app.state());
        let image = ImageRecord { file: "a.png".into(), label: "a".into(), split: Split::Train, blob: format!("{:064x}", 1), look: None };
        let ingested = Ingested { images: vec![image], rejected: vec![], rejected_total: 0, classes: vec!["a".into()] };
        let dataset = db::datasets::insert(&ctx.db, "set", &ingested, ingested.reports()).await.unwrap();
        let new = NewJob { dataset_id: &dataset.id, base_model: "tiny", params: &json!({}), recipe: "auto", epochs: 1, base_is_model: false };
        db::jobs::insert(&ctx.db, &new).await.unwrap().unwrap();
        let job = db::jobs::claim(&ctx.db, &ctx.worker_name, "cpu", Duration::from_secs(60), &[]).await.unwrap().unwrap();
        (app, ctx, job)
    }

    /// The fence a run asks before writing into the job's folder: the claim holds while the
    /// lease renews; once another claim took the job it does not; with the database out of reach,
    /// while half the lease since the last renewal that held is left.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_claim_holds_while_it_renews_or_half_its_lease_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let (_app, ctx, job) = running_job(dir.path()).await;
        let holder = Holder::of(&ctx.worker_name, &job);
        let lease = Duration::from_secs(60);
        // From a thread outside the runtime, as the training thread asks.
        let ask = async |holder: &Holder, renewed: Instant| {
            let (runtime, pool, id, holder) = (tokio::runtime::Handle::current(), ctx.db.clone(), job.id.clone(), holder.clone());
            tokio::task::spawn_blocking(move || {
                let flags: super::super::RunFlags = (Default::default(), Default::default(), Arc::new(Mutex::new(renewed)));
                let held = holds_claim(&runtime, (&pool, &id, &holder, lease), &flags);
                (held, *flags.2.lock().unwrap())
            })
            .await
            .unwrap()
        };
        let long_ago = Instant::now() - lease;
        let (held, renewed) = ask(&holder, long_ago).await;
        assert!(held && renewed > long_ago, "renewed, and the renewal noted");
        assert!(!ask(&Holder::of("elsewhere", &job), Instant::now()).await.0, "another claim's run does not hold it");
        // The database out of reach.
        ctx.db.close().await;
        assert!(ask(&holder, Instant::now()).await.0, "renewed just now");
        assert!(!ask(&holder, Instant::now() - lease / 2).await.0, "half the lease ago");
    }

    /// A job reads its dataset's fingerprints: look-alikes are kept together by its hold-out. A
    /// dataset stored by an older version is grouped by what that version took until the
    /// background fill-in has fingerprinted it again.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_job_s_data_knows_which_files_look_alike() {
        let dir = tempfile::tempdir().unwrap();
        let (_app, ctx, _job) = running_job(dir.path()).await;
        let look = |shape| Some(crate::dataset::look_alike::Look::of_shape(shape, 0));
        let image = |i: u64, label: &str, shape| ImageRecord { file: format!("{i}.png"), label: label.into(), split: Split::Train, blob: format!("{i:064x}"), look: look(shape) };
        let images = vec![image(1, "a", 0), image(2, "a", u64::MAX), image(3, "b", 0b11), image(4, "b", 0xFFFF_0000)];
        let ingested = Ingested { images, rejected: vec![], rejected_total: 0, classes: vec!["a".into(), "b".into()] };
        let dataset = db::datasets::insert(&ctx.db, "alike", &ingested, ingested.reports()).await.unwrap();
        // Each file the job groups with another, by their names in the upload.
        let pairs = || async {
            let (data, files) = load_dataset(&ctx, &dataset.id).await.unwrap();
            let name = |path: &PathBuf| files[path].1.clone();
            data.look_alikes.iter().map(|(file, first)| (name(file), name(first))).collect::<Vec<(String, String)>>()
        };
        assert_eq!(pairs().await, [("3.png".to_string(), "1.png".to_string())]);

        let db = &ctx.db;
        for (older, expected) in [
            ("update dataset_images set look_turned = null", vec![("3.png".to_string(), "1.png".to_string())]),
            ("update dataset_images set look_mirror = null", vec![("3.png".to_string(), "1.png".to_string())]),
            ("update dataset_images set look = null where file = '4.png'", vec![]),
        ] {
            sqlx::query(older).execute(db).await.unwrap();
            assert_eq!(pairs().await, expected, "after {older}");
        }
    }

    /// Progress held back because it came within the interval of the last is written, and sent
    /// live, once the interval has passed, though no event follows it.
    #[tokio::test]
    async fn progress_held_back_by_the_interval_is_written_once_it_has_passed() {
        let dir = tempfile::tempdir().unwrap();
        let (_app, ctx, job) = running_job(dir.path()).await;
        let mut live = ctx.hub.subscribe(&job.id);
        let mut recorder = Recorder::new(&ctx, &job, Holder::of(&ctx.worker_name, &job));
        let (tx, rx) = mpsc::unbounded_channel();
        let phase = |done| TrainEvent::Phase { phase: Phase::Features, done, total: 10 };
        let done = |job: Option<Job>| job.unwrap().progress.done;
        let check = async {
            tx.send(phase(1)).unwrap();
            tx.send(phase(2)).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(done(db::jobs::get(&ctx.db, &job.id).await.unwrap()), 1, "the first is written, the second held back");
            tokio::time::sleep(PROGRESS_INTERVAL * 3).await;
            assert_eq!(done(db::jobs::get(&ctx.db, &job.id).await.unwrap()), 2, "written once the interval passed");
            drop(tx);
        };
        tokio::join!(record_events(&mut recorder, rx), check);
        let mut sent = vec![];
        while let Ok(Ok(JobEvent::Progress(p))) = tokio::time::timeout(Duration::from_millis(10), live.recv()).await {
            sent.push(p["done"].as_u64().unwrap());
        }
        assert_eq!(sent, [1, 2], "each sent live once");
    }
}
