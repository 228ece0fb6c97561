//! Job workers, one per compute device: claim the oldest queued job, run the fine-tune on its own
//! OS thread, record progress and metrics as they arrive, register the model on success.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use candle_core::Device;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::db;
use crate::db::jobs::{Job, Status};
use crate::db::metrics::TrainPoint;
use crate::http::AppState;
use crate::jobs::JobEvent;
use crate::model::{LoadedModel, ModelSource};
use crate::train::data::TrainData;
use crate::train::{Control, TrainError, TrainEvent, TrainOutcome, TrainParams, TrainSpec, fine_tune};

/// How often an idle worker looks at the queue even without a wake-up.
const POLL: Duration = Duration::from_secs(2);

/// Resolves `--device` values (`auto`, `cpu`, `cuda:N`) to distinct devices.
pub fn resolve_devices(names: &[String]) -> anyhow::Result<Vec<(String, Device)>> {
    let mut out: Vec<(String, Device)> = Vec::new();
    for name in names {
        let name = if name == "auto" {
            if candle_core::utils::cuda_is_available() { "cuda:0".to_string() } else { "cpu".to_string() }
        } else {
            name.clone()
        };
        if out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let device = crate::model::device_from_name(&name)?;
        out.push((name, device));
    }
    Ok(out)
}

/// Starts one worker task per device.
pub fn spawn(state: AppState, devices: Vec<(String, Device)>) -> Vec<tokio::task::JoinHandle<()>> {
    devices.into_iter().map(|(name, device)| tokio::spawn(run(state.clone(), name, device))).collect()
}

async fn run(state: AppState, name: String, device: Device) {
    let shutdown = state.jobs.shutdown_token();
    tracing::info!(device = %name, "worker started");
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        // Listen before looking, so a submit between the claim and the wait is not missed.
        let submitted = state.jobs.submitted();
        tokio::pin!(submitted);
        submitted.as_mut().enable();
        match db::jobs::claim(&state.db, &name).await {
            Ok(Some(job)) => {
                process(&state, job, &name, &device).await;
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

/// Runs one claimed job to its end and records the outcome.
async fn process(state: &AppState, job: Job, device_name: &str, device: &Device) {
    tracing::info!(job = %job.id, device = %device_name, "job started");
    let cancel = state.jobs.start(&job.id, job.cancel_requested);
    let outcome = run_job(state, &job, device, cancel).await;
    state.jobs.stop(&job.id);
    let shutting_down = state.jobs.shutdown_token().is_cancelled();
    let result = match outcome {
        Ok(outcome) => register_model(state, &job, outcome).await,
        Err(JobFailure::Train(TrainError::Cancelled)) if shutting_down => {
            tracing::info!(job = %job.id, "job interrupted by shutdown; it resumes at the next start");
            db::jobs::requeue(&state.db, &job.id).await.map_err(Into::into)
        }
        Err(JobFailure::Train(TrainError::Cancelled)) => db::jobs::finish(&state.db, &job.id, Status::Cancelled, None).await.map_err(Into::into),
        Err(e) => {
            tracing::warn!(job = %job.id, error = %e, "job failed");
            db::jobs::finish(&state.db, &job.id, Status::Failed, Some(&e.to_string())).await.map_err(Into::into)
        }
    };
    if let Err(e) = result {
        tracing::error!(job = %job.id, error = ?e, "recording the job's outcome failed");
    }
    match db::jobs::get(&state.db, &job.id).await {
        Ok(Some(done)) if done.status.is_terminal() => {
            tracing::info!(job = %job.id, status = done.status.as_str(), "job finished");
            state.jobs.publish(&job.id, JobEvent::Status(Box::new(done)));
        }
        Ok(_) => {}
        Err(e) => tracing::error!(job = %job.id, error = %e, "reading the finished job failed"),
    }
}

/// Why a job did not produce a model.
#[derive(Debug, thiserror::Error)]
enum JobFailure {
    #[error("{0}")]
    Train(#[from] TrainError),
    #[error("{0}")]
    Setup(String),
    #[error("training crashed: {0}")]
    Panic(String),
}

/// The model source a job's `base_model` names: one of our models, a folder under the base
/// models folder, or a hub id. Validated again here because the queue may predate a change.
pub fn resolve_base_model(state_models: &Path, base_models_dir: &Path, spec: &str, is_our_model: bool) -> Result<ModelSource, String> {
    if is_our_model {
        return Ok(ModelSource::Dir(state_models.join(spec)));
    }
    if !crate::model::io::is_hub_id(spec) {
        return Err(format!(
            "base_model '{spec}' is not a Hugging Face model id, a model id of this service, or a folder name under the base models folder"
        ));
    }
    let local = base_models_dir.join(spec);
    if local.is_dir() {
        return Ok(ModelSource::Dir(local));
    }
    Ok(ModelSource::Hub(spec.to_string()))
}

async fn run_job(state: &AppState, job: &Job, device: &Device, cancel: Arc<AtomicBool>) -> Result<TrainOutcome, JobFailure> {
    let params: TrainParams =
        serde_json::from_value(job.params.clone()).map_err(|e| JobFailure::Setup(format!("stored hyper-parameters: {e}")))?;
    let is_model = db::models::get(&state.db, &job.base_model).await.map_err(|e| JobFailure::Setup(e.to_string()))?.is_some();
    let source = resolve_base_model(&state.paths.models(), &state.config.base_models_dir(), &job.base_model, is_model)
        .map_err(JobFailure::Setup)?;
    let data = load_dataset(state, &job.dataset_id).await?;
    let spec = TrainSpec {
        params: params.clone(),
        data,
        checkpoint_root: state.paths.job(&job.id),
        max_pixels: state.config.max_image_pixels,
        cache_budget: crate::train::default_cache_budget(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<TrainEvent>();
    let (done_tx, done_rx) = oneshot::channel();
    let device = device.clone();
    let labels = spec.data.labels.clone();
    std::thread::Builder::new()
        .name(format!("train-{}", &job.id[job.id.len().saturating_sub(8)..]))
        .spawn(move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<TrainOutcome, JobFailure> {
                let mut model = LoadedModel::load(&source, Some(&labels), &device, params.seed).map_err(TrainError::from)?;
                let mut on_event = |e: TrainEvent| {
                    let _ = tx.send(e);
                };
                Ok(fine_tune(&mut model, spec, &device, Control { cancel: &cancel, on_event: &mut on_event })?)
            }));
            let result = result.unwrap_or_else(|panic| {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(JobFailure::Panic(msg))
            });
            let _ = done_tx.send(result);
        })
        .map_err(|e| JobFailure::Setup(format!("cannot start the training thread: {e}")))?;

    // Events arrive until the thread drops its sender; record each as it comes.
    while let Some(event) = rx.recv().await {
        if let Err(e) = record_event(state, job, event).await {
            tracing::error!(job = %job.id, error = %e, "recording a training event failed");
        }
    }
    done_rx.await.unwrap_or_else(|_| Err(JobFailure::Panic("the training thread vanished".into())))
}

async fn load_dataset(state: &AppState, dataset_id: &str) -> Result<TrainData, JobFailure> {
    let dataset = db::datasets::get(&state.db, dataset_id)
        .await
        .map_err(|e| JobFailure::Setup(e.to_string()))?
        .ok_or_else(|| JobFailure::Setup(format!("dataset '{dataset_id}' no longer exists")))?;
    let rows = db::datasets::images(&state.db, dataset_id).await.map_err(|e| JobFailure::Setup(e.to_string()))?;
    let mut records = Vec::with_capacity(rows.len());
    for row in rows {
        let path = state.blobs.path(&row.blob).map_err(|e| JobFailure::Setup(format!("image {}: {e}", row.file)))?;
        records.push((path, row.label, row.split));
    }
    Ok(TrainData::with_labels(dataset.classes, records)?)
}

async fn record_event(state: &AppState, job: &Job, event: TrainEvent) -> anyhow::Result<()> {
    let db = &state.db;
    match event {
        TrainEvent::Started { epochs, total_steps, resumed_from, .. } => {
            db::jobs::set_plan(db, &job.id, epochs, total_steps).await?;
            let done = resumed_from.unwrap_or(0);
            db::metrics::truncate_after(db, &job.id, done).await?;
            db::jobs::set_progress(db, &job.id, done, 0).await?;
            if let Some(epoch) = resumed_from {
                tracing::info!(job = %job.id, epoch, "resuming from checkpoint");
            }
        }
        TrainEvent::Restarted { reason } => tracing::warn!(job = %job.id, %reason, "checkpoint unusable, starting over"),
        TrainEvent::Step { epoch, step, steps, loss, learning_rate, images_per_s } => {
            db::metrics::record_step(db, &job.id, &TrainPoint { step, epoch, loss, learning_rate }).await?;
            db::jobs::set_progress(db, &job.id, epoch, step).await?;
            state.jobs.set_throughput(&job.id, images_per_s);
            let epochs = job.progress.epochs;
            state.jobs.publish(
                &job.id,
                JobEvent::Progress(json!({"epoch": epoch, "epochs": epochs, "step": step, "steps": steps,
                    "loss": loss, "learning_rate": learning_rate, "images_per_s": images_per_s})),
            );
        }
        TrainEvent::Epoch { epoch, report, .. } => {
            db::metrics::record_evaluation(db, &job.id, "validation", epoch, &report).await?;
            db::jobs::set_epoch_done(db, &job.id, epoch).await?;
            let mut block = serde_json::to_value(&report)?;
            block["epoch"] = json!(epoch);
            state.jobs.publish(&job.id, JobEvent::Metrics(block));
        }
        TrainEvent::Checkpoint { epoch, dir, score } => {
            let rel = dir.strip_prefix(state.paths.root()).unwrap_or(&dir).to_string_lossy().into_owned();
            db::metrics::record_checkpoint(db, &job.id, epoch, &rel, score).await?;
        }
        TrainEvent::Test { report } => db::metrics::record_evaluation(db, &job.id, "test", 0, &report).await?,
        TrainEvent::Features { done, total } => tracing::debug!(job = %job.id, done, total, "probe features"),
        TrainEvent::Probe { c, cv_accuracy, seconds } => tracing::info!(job = %job.id, c, ?cv_accuracy, seconds, "probe head fitted"),
    }
    Ok(())
}

/// Copies the best checkpoint into `<data-dir>/models/<id>/`, registers it and marks the job
/// succeeded (one transaction), then drops the job's checkpoints.
async fn register_model(state: &AppState, job: &Job, outcome: TrainOutcome) -> anyhow::Result<()> {
    let model_id = db::new_id();
    let dest = state.paths.model(&model_id);
    let src = outcome.best_dir.clone();
    let copy_to = dest.clone();
    tokio::task::spawn_blocking(move || copy_model_folder(&src, &copy_to)).await??;
    let model = db::models::Model {
        id: model_id.clone(),
        job_id: Some(job.id.clone()),
        base_model: job.base_model.clone(),
        labels: outcome_labels(&outcome.best_dir)?,
        metrics: Some(serde_json::to_value(&outcome.best)?),
        params: Some(job.params.clone()),
        recipe: Some(job.recipe.clone()),
        created_at: db::now(),
        path: dest.strip_prefix(state.paths.root()).unwrap_or(&dest).to_string_lossy().into_owned(),
    };
    // Load it before the job shows as succeeded, so the default can switch as soon as it does;
    // a model that fails to load is still registered, and the previous default keeps serving.
    let loaded = state.predictor.get_or_load(&model_id, dest.clone()).await;
    db::models::register_for_job(&state.db, &model).await.context("registering the model")?;
    tracing::info!(job = %job.id, model = %model_id, epoch = outcome.best_epoch, f1 = outcome.best.f1, "model registered");
    match loaded {
        Ok(_) => state.predictor.set_default(Some(model_id.clone())),
        Err(e) => tracing::error!(model = %model_id, error = %e, "the new model failed to load; the previous default keeps serving"),
    }
    let job_dir = state.paths.job(&job.id);
    tokio::task::spawn_blocking(move || std::fs::remove_dir_all(job_dir)).await?.ok();
    sqlx::query("delete from checkpoints where job_id = ?").bind(&job.id).execute(&state.db).await?;
    Ok(())
}

fn outcome_labels(dir: &Path) -> anyhow::Result<Vec<String>> {
    let cfg = crate::model::VitConfig::from_json(&std::fs::read_to_string(dir.join("config.json"))?)?;
    Ok(cfg.labels)
}

/// Copies a model folder's files into `dest` atomically (temporary sibling, then rename).
fn copy_model_folder(src: &Path, dest: &Path) -> anyhow::Result<()> {
    crate::model::io::write_dir_atomically(dest, |tmp| {
        for name in ["config.json", "model.safetensors", "preprocessor_config.json"] {
            let bytes = std::fs::read(src.join(name))?;
            crate::model::io::write_file(&tmp.join(name), &bytes)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Folder names under `models/` that no model row points at (left by a crash between copying a
/// model and registering it), plus temporary folders; removed at start-up.
pub async fn remove_orphan_models(state: &AppState) -> anyhow::Result<Vec<PathBuf>> {
    let known: std::collections::HashSet<String> = db::models::paths(&state.db).await?.into_iter().collect();
    let mut removed = vec![];
    for entry in std::fs::read_dir(state.paths.models())? {
        let path = entry?.path();
        let rel = path.strip_prefix(state.paths.root()).unwrap_or(&path).to_string_lossy().into_owned();
        if !known.contains(&rel) {
            std::fs::remove_dir_all(&path)?;
            removed.push(path);
        }
    }
    Ok(removed)
}
