//! Builds the application from its configuration and runs it until SIGINT/SIGTERM. This is where
//! the server's flags are turned into what each part needs (ingest limits, predictor settings,
//! the jobs' context), so nothing below sees the configuration itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::task::AbortOnDropHandle;

use crate::look_backfill::Backfill;
use crate::budget::MemoryBudget;
use crate::config::{DatabaseUrl, Role, ServeConfig};
use crate::dataset::IngestLimits;
use crate::http::{self, AppState};
use crate::model::PrecisionChoice;
use crate::model::io::remove_path;
use crate::objects::Objects;
use crate::paths::DataPaths;
use crate::predictor::{PredictError, Predictor, PredictorConfig};
use crate::registry::ModelRegistry;
use crate::telemetry::ServiceMetrics;
use crate::train::checkpoint;
use crate::worker::JobContext;
use crate::worker::hub::JobHub;

/// How long shutdown waits for a running fine-tune to reach the end of its batch.
const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A built application: the store is open, migrations have run and the port is bound.
pub struct Application {
    addr: SocketAddr,
    listener: TcpListener,
    state: AppState,
    devices: Vec<(String, candle_core::Device)>,
}

impl Application {
    /// Opens the data folder and the database, and binds the listener. With `port = 0` the
    /// operating system picks a free port, which [`Application::port`] reports (tests rely on it).
    pub async fn build(config: ServeConfig) -> anyhow::Result<Self> {
        let paths = DataPaths::new(&config.data_dir);
        paths.create_all().with_context(|| format!("creating data folder {}", paths.root().display()))?;
        let database_url = database_url(&config, &paths)?;
        let db = crate::db::connect(database_url.expose())
            .await
            .with_context(|| format!("opening database {}", database_url.redacted()))?;

        let listener = TcpListener::bind((config.host.as_str(), config.port))
            .await
            .with_context(|| format!("binding {}:{}", config.host, config.port))?;
        let addr = listener.local_addr()?;
        if config.api_key.is_empty() && !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "listening beyond this machine without an API key: anyone who can reach this address can upload, \
                 train, predict and delete; set --api-key (VITFORGE_API_KEY) or bind 127.0.0.1"
            );
        }
        let objects = match &config.object_store {
            Some(url) => Objects::s3(url, paths.clone())?,
            None => Objects::local(paths.clone())?,
        };
        let blob_lock = Arc::default();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let ingest_slots = Arc::new(tokio::sync::Semaphore::new(cpus));
        let metrics = Arc::new(ServiceMetrics::new());
        let devices = crate::model::resolve_devices(&config.device).context("--device")?;
        let memory = MemoryBudget::new(config.max_inflight_bytes);
        let predict_device = devices.first().map_or(candle_core::Device::Cpu, |(_, d)| d.clone());
        let predictor = Predictor::start(
            PredictorConfig {
                max_batch_size: config.max_batch_size as usize,
                max_batch_delay: Duration::from_millis(config.max_batch_delay_ms),
                max_concurrent_requests: config.max_concurrent_requests as usize,
                max_loaded_models: config.max_loaded_models as usize,
                max_queue_wait: config.max_predict_wait(),
                memory: memory.clone(),
                precision: PrecisionChoice::parse(&config.precision).map_err(|e| anyhow::anyhow!("--precision: {e}"))?.resolve(&predict_device),
            },
            predict_device,
            metrics.clone(),
        );
        let api_keys = Arc::new(http::auth::ApiKeys::new(&config.api_key));
        let job_memory = job_memory(&config, &devices, &paths);
        let models = ModelRegistry::new(db.clone(), paths.clone(), objects.clone(), predictor.clone(), config.role.serves_api());
        let state = AppState {
            db,
            api_keys,
            ingest_limits: ingest_limits(&config),
            config: Arc::new(config),
            paths,
            objects,
            blob_lock,
            ingest_slots,
            jobs: JobHub::new(),
            predictor,
            models,
            metrics,
            memory,
            evaluations: Arc::new(tokio::sync::Semaphore::new(1)),
            job_memory,
        };
        recover_jobs(&state).await?;
        if state.config.role == Role::All {
            clean_up(&state).await?;
        } else {
            tracing::info!(role = ?state.config.role, "sharing the database and data folder with other processes: start-up clean-up skipped");
        }
        state.models.set_default_to_latest().await?;
        Ok(Self { addr, listener, state, devices })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The state handlers see (tests use it to reach the database directly).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let object_store = self.state.objects.url().unwrap_or("the data folder");
        tracing::info!(addr = %self.addr, data_dir = %self.state.paths.root().display(), object_store, "vitforge listening");
        tracing::info!("{}", crate::model::kernels_summary());
        tracing::info!("{}", crate::imaging::jpeg_decoder_summary());
        let devices = if self.state.config.role.runs_jobs() { self.devices } else { Vec::new() };
        let workers = crate::worker::spawn(job_context(&self.state), devices);
        // An API process of several learns of models registered by workers elsewhere by looking.
        let follower = (self.state.config.role == Role::Api).then(|| tokio::spawn(follow_newest_model(self.state.clone())));
        let releaser = crate::malloc::applied().then(|| tokio::spawn(release_memory_now_and_then()));
        let sweeper = (self.state.config.sweep_secs > 0).then(|| tokio::spawn(sweep_now_and_then(self.state.clone())));
        // Datasets stored by an older version get their look-alike fingerprints, once.
        let backfill = self.state.config.role.serves_api().then(|| {
            let s = &self.state;
            let pieces = Backfill { db: s.db.clone(), objects: s.objects.clone(), memory: s.memory.clone(), max_image_pixels: s.ingest_limits.max_image_pixels };
            tokio::spawn(crate::look_backfill::run(pieces))
        });
        let app = http::router(self.state.clone());
        let hub = self.state.jobs.clone();
        // On the signal, stop the workers' jobs and end live event streams first: graceful
        // shutdown waits for open connections, and an SSE stream stays open until told.
        let stop = async move {
            shutdown.await;
            hub.shut_down();
        };
        axum::serve(http::linger::LingeringListener::new(self.listener), app).with_graceful_shutdown(stop).await?;
        self.state.jobs.shut_down();
        for worker in workers {
            // A running job stops within one batch; its state is requeued for the next start.
            if tokio::time::timeout(WORKER_STOP_TIMEOUT, worker).await.is_err() {
                tracing::warn!("a worker did not stop in time; its job resumes from its checkpoint at the next start");
            }
        }
        for task in [follower, releaser, sweeper, backfill].into_iter().flatten() {
            task.abort();
        }
        self.state.db.close().await;
        tracing::info!("vitforge stopped");
        Ok(())
    }

    /// Serves until SIGINT or SIGTERM.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(shutdown_signal()).await
    }
}

/// The database: `--database-url`, else the SQLite file of the data folder (created if missing).
fn database_url(config: &ServeConfig, paths: &DataPaths) -> anyhow::Result<DatabaseUrl> {
    match &config.database_url {
        Some(url) => Ok(url.clone()),
        None => crate::db::sqlite_url(&paths.database()).parse().map_err(anyhow::Error::msg),
    }
}

/// How often `serve` gives the memory it freed back to the system (see `malloc`).
const RELEASE_MEMORY_EVERY: Duration = Duration::from_secs(30);

/// Gives freed memory back to the system every [`RELEASE_MEMORY_EVERY`], which the allocator's
/// settings (`malloc::configure`) no longer do by themselves, so a burst of requests or a job
/// does not leave the process at its peak size.
async fn release_memory_now_and_then() {
    let mut every = tokio::time::interval(RELEASE_MEMORY_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let _ = tokio::task::spawn_blocking(crate::malloc::release_free_memory).await;
    }
}

/// Every `--sweep-secs` (the first time one period after start: `--role all` has just swept at
/// start-up), sweeps for blobs no dataset references, for the folders of jobs that have ended
/// (left on this machine by a run that lost its lease, or in the object store by a machine that
/// stopped), and for model folders no model names (here: cached copies of models deleted through
/// another process; here or in the store: registrations that did not finish). Where the blob
/// sweep cannot be safe (several processes on SQLite) it says so once and leaves blobs alone.
async fn sweep_now_and_then(state: AppState) {
    let shared = state.config.role != Role::All;
    let blobs = !shared || crate::db::Backend::of(&state.db) == crate::db::Backend::Postgres;
    if !blobs {
        tracing::info!("no periodic blob sweep: processes of several roles on SQLite have no lock across processes (a --role all start-up sweeps)");
    }
    let period = Duration::from_secs(state.config.sweep_secs);
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if blobs {
            match crate::blob_gc::sweep_if_idle(&state.db, &state.objects, &state.blob_lock, shared).await {
                Ok(Some(0)) => tracing::debug!("blob sweep: nothing to remove"),
                Ok(Some(removed)) => tracing::info!(removed, "removed blobs no dataset references"),
                Ok(None) => tracing::debug!("blob sweep skipped: an upload is in flight"),
                Err(e) => tracing::warn!(error = format!("{e:#}"), "the blob sweep failed; the next one tries again"),
            }
        }
        match crate::worker::remove_ended_job_folders(&state.db, &state.objects, &state.paths, LEFTOVER_GRACE).await {
            Ok(removed) => {
                for path in removed {
                    tracing::info!(path = %path.display(), "removed the folder of a job that has ended");
                }
            }
            Err(e) => tracing::warn!(error = format!("{e:#}"), "sweeping the folders of ended jobs failed; the next sweep tries again"),
        }
        match state.models.remove_unregistered(LEFTOVER_GRACE).await {
            Ok(removed) => {
                for path in removed {
                    tracing::info!(path = %path.display(), "removed a model folder no model names (a deleted model's cached copy, or a registration that did not finish)");
                }
            }
            Err(e) => tracing::warn!(error = format!("{e:#}"), "sweeping the model folders no model names failed; the next sweep tries again"),
        }
    }
}

/// How long a model folder without a row must have been left alone (here, or in the object
/// store) before a sweep takes it for a leftover rather than one being registered (copied,
/// uploaded to the store, then given its row); and the folder of an ended job, for a leftover
/// rather than one a run that lost its lease still writes.
const LEFTOVER_GRACE: Duration = Duration::from_secs(3600);

/// How often an API process looks for a model newer than its `/predict` default.
const FOLLOW_MODELS_EVERY: Duration = Duration::from_secs(2);

/// Keeps an API process's `/predict` default on the newest registered model, which workers in
/// other processes register (and, since they serve no `/predict`, do not load): it looks when
/// PostgreSQL notifies a new model, and every [`FOLLOW_MODELS_EVERY`] in any case.
async fn follow_newest_model(state: AppState) {
    let registered = Arc::new(tokio::sync::Notify::new());
    let notify = registered.clone();
    let db = state.db.clone();
    // Aborted with this task, which is aborted at shutdown.
    let _listener = AbortOnDropHandle::new(tokio::spawn(async move { crate::db::listen(&db, crate::db::MODELS_CHANNEL, || notify.notify_one()).await }));
    // The newest model when it could not be loaded (not tried again until a newer one comes).
    let mut unloadable: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_MODELS_EVERY) => {}
            _ = registered.notified() => {}
        }
        match crate::db::models::latest(&state.db).await {
            Ok(Some(newest)) if state.predictor.default_model().as_deref() != Some(newest.id.as_str()) && unloadable.as_ref() != Some(&newest.id) => {
                // Loaded (fetched first, with an object store) before it becomes the default, so
                // no request waits for the load, and one that cannot be loaded leaves the
                // previous default serving, as where it was registered.
                match state.models.load(&newest).await {
                    Ok(_) => {
                        tracing::info!(model = %newest.id, "a newer model was registered; it is now the default of /predict");
                        state.predictor.set_default(Some(newest.id));
                    }
                    Err(PredictError::Load { id, reason }) => {
                        tracing::error!(model = %id, %reason, "the newest model cannot be loaded; the previous default keeps serving");
                        unloadable = Some(id);
                    }
                    Err(e) => tracing::warn!(model = %newest.id, error = %e, "loading the newest model failed; retrying"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "looking for a newer model failed"),
        }
    }
}

/// The memory every job this process queues runs within, where it knows it: `--role all` is
/// alone on its database, so its workers run every job; with all of them on the CPU, each
/// training step must fit `--max-job-memory` (0: no limit).
fn job_memory(config: &ServeConfig, devices: &[(String, candle_core::Device)], paths: &DataPaths) -> Option<crate::worker::submit::JobMemory> {
    let cpu_only = !devices.is_empty() && devices.iter().all(|(_, d)| d.is_cpu());
    let limit = crate::train::memory::MemoryLimit::max_job_memory(config.max_job_memory)?;
    (config.role == Role::All && cpu_only).then(|| crate::worker::submit::JobMemory { limit, models_dir: paths.models(), base_models_dir: config.base_models_dir() })
}

/// At start-up, jobs left `running` go back to the queue (they resume from their last checkpoint).
/// `--role all` is alone on its database, so it takes every one; a worker of several takes only its
/// own (restarted under the same name) and those whose lease ran out.
async fn recover_jobs(state: &AppState) -> anyhow::Result<()> {
    if !state.config.role.runs_jobs() {
        return Ok(());
    }
    let worker_name = state.config.worker_name();
    let owner = if state.config.role == Role::All { None } else { Some(worker_name.as_str()) };
    let recovered = crate::db::jobs::recover_interrupted(&state.db, owner).await?;
    if recovered.requeued > 0 {
        tracing::info!(requeued = recovered.requeued, "jobs interrupted by the last shutdown go back to the queue");
    }
    // Jobs whose cancel was asked for before the interruption ended cancelled: their checkpoints
    // (here and in the object store) serve no one.
    for id in &recovered.cancelled {
        tracing::info!(job = %id, "a job interrupted after its cancel was asked for ends cancelled");
        if let Err(e) = state.objects.remove_dir(&state.paths.job(id)).await {
            tracing::warn!(job = %id, error = format!("{e:#}"), "removing the cancelled job's checkpoints failed");
        }
    }
    Ok(())
}

/// Start-up clean-up of what a crash left: upload scratch, blobs no dataset references, stale
/// thumbnails, model folders never registered, checkpoint leftovers. It assumes nothing else uses
/// the data folder and the database, which `--role all` means (one process, as by default);
/// processes of the other roles share them and must not remove what another is writing.
async fn clean_up(state: &AppState) -> anyhow::Result<()> {
    clear_scratch(&state.paths)?;
    let removed = crate::blob_gc::sweep(&state.db, &state.objects, &state.blob_lock).await.context("sweeping unreferenced blobs")?;
    if removed > 0 {
        tracing::info!(removed, "removed blobs no dataset references (left by an interrupted upload)");
    }
    let thumbnails =
        crate::blob_gc::remove_orphan_thumbnails(state.objects.blobs(), &state.paths.thumbnails()).context("removing stale thumbnails")?;
    if thumbnails > 0 {
        tracing::info!(thumbnails, "removed thumbnails of images no dataset has any more");
    }
    for orphan in state.models.remove_orphans().await.context("removing orphaned model folders")? {
        tracing::info!(path = %orphan.display(), "removed a model folder no model refers to");
    }
    for stale in remove_stale_job_files(state).await.context("removing stale checkpoint files")? {
        tracing::info!(path = %stale.display(), "removed checkpoint files no unfinished job needs");
    }
    Ok(())
}

/// What one dataset ingest may unpack, from the server's flags.
fn ingest_limits(config: &ServeConfig) -> IngestLimits {
    IngestLimits {
        max_extracted_bytes: config.max_extracted_bytes,
        max_entries: config.max_archive_entries,
        max_image_bytes: config.max_image_bytes,
        max_image_pixels: config.max_image_pixels,
    }
}

/// What the job workers get: storage, the hub, the registry, and the settings of jobs.
pub(crate) fn job_context(state: &AppState) -> JobContext {
    JobContext {
        db: state.db.clone(),
        paths: state.paths.clone(),
        objects: state.objects.clone(),
        hub: state.jobs.clone(),
        models: state.models.clone(),
        base_models_dir: state.config.base_models_dir(),
        max_image_pixels: state.config.max_image_pixels,
        worker_name: state.config.worker_name(),
        lease: Duration::from_secs(state.config.lease_secs),
        max_job_memory: state.config.max_job_memory,
    }
}

/// Under `jobs/`: the folders of jobs that have ended or no longer exist (a crash after a model
/// was registered, before its job's checkpoints were dropped, leaves one), and inside the others
/// (and their claims' folders) the half-written temporary folders of a checkpoint interrupted by
/// a crash. Nothing trains while this runs, so nothing removed is in use.
async fn remove_stale_job_files(state: &AppState) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(state.paths.jobs())? {
        let dir = entry?.path();
        let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if crate::db::jobs::ended_or_gone(&state.db, &id).await? {
            remove_path(&dir)?;
            removed.push(dir);
            continue;
        }
        // The job's folder and its claims' folders (`checkpoint::take_over`), where checkpoints are;
        // a crash while a checkpoint replaced its best model can leave it moved aside, put back
        // before the leftovers go.
        let claims = checkpoint::claim_folders(&dir)?.into_iter().map(|(_, folder)| folder);
        for folder in std::iter::once(dir.clone()).chain(claims) {
            removed.extend(checkpoint::clear_interrupted_writes(&folder)?);
        }
    }
    Ok(removed)
}

/// Removes upload leftovers from a previous run (a crash mid-upload leaves them behind).
fn clear_scratch(paths: &DataPaths) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(paths.tmp())? {
        let path = entry?.path();
        remove_path(&path).with_context(|| format!("removing leftover {}", path.display()))?;
    }
    Ok(())
}

/// Entry point of `vitforge serve`: a multi-threaded runtime running the application.
pub fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let app = Application::build(config).await?;
        app.run_until_stopped().await
    })
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_database_is_the_sqlite_file_of_the_data_folder() {
        let config = ServeConfig::default_for("/srv/d");
        let default = database_url(&config, &DataPaths::new("/srv/d")).unwrap();
        assert_eq!(default.expose(), "sqlite:///srv/d/vitforge.db?mode=rwc");
        let given = ServeConfig { database_url: Some("postgres://db/x".parse().unwrap()), ..config };
        assert_eq!(database_url(&given, &DataPaths::new("/srv/d")).unwrap().expose(), "postgres://db/x");
    }
}
