//! One job's run: its dataset and base model resolved, the fine-tune on an OS thread of its own
//! (never on the async runtime), and every event it reports recorded in the database and sent
//! to the job's live subscribers.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::JobContext;
use super::hub::JobEvent;
use super::submit::resolve_base_model;
use crate::db;
use crate::db::jobs::Job;
use crate::db::job_metrics::TrainPoint;
use crate::model::LoadedModel;
use crate::train::data::TrainData;
use crate::train::{Control, TrainError, TrainEvent, TrainOutcome, TrainParams, TrainSpec, default_cache_budget, fine_tune};

/// Why a job did not produce a model.
#[derive(Debug, thiserror::Error)]
pub(super) enum JobFailure {
    #[error("{0}")]
    Train(#[from] TrainError),
    #[error("{0}")]
    Setup(String),
    #[error("training crashed: {0}")]
    Panic(String),
}

fn setup(e: impl std::fmt::Display) -> JobFailure {
    JobFailure::Setup(e.to_string())
}

/// Runs the fine-tune of `job` on a thread of its own and records its events as they arrive.
pub(super) async fn run_job(ctx: &JobContext, job: &Job, device: &Device, cancel: Arc<AtomicBool>) -> Result<TrainOutcome, JobFailure> {
    let params: TrainParams = serde_json::from_value(job.params.clone()).map_err(|e| setup(format!("stored hyper-parameters: {e}")))?;
    let is_our_model = db::models::get(&ctx.db, &job.base_model).await.map_err(setup)?.is_some();
    let source = resolve_base_model(&job.base_model, is_our_model, &ctx.paths.models(), &ctx.base_models_dir).map_err(setup)?;
    let data = load_dataset(ctx, &job.dataset_id).await?;
    let spec = TrainSpec {
        params: params.clone(),
        data,
        checkpoint_root: ctx.paths.job(&job.id),
        max_pixels: ctx.max_image_pixels,
        cache_budget: default_cache_budget(),
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
            let _ = done_tx.send(result.unwrap_or_else(|panic| Err(JobFailure::Panic(panic_message(panic.as_ref())))));
        })
        .map_err(|e| setup(format!("cannot start the training thread: {e}")))?;

    // Events arrive until the thread drops its sender; record each as it comes.
    while let Some(event) = rx.recv().await {
        if let Err(e) = record_event(ctx, job, event).await {
            tracing::error!(job = %job.id, error = %e, "recording a training event failed");
        }
    }
    done_rx.await.unwrap_or_else(|_| Err(JobFailure::Panic("the training thread vanished".into())))
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// The job's dataset as training examples (its images are blobs of the store).
async fn load_dataset(ctx: &JobContext, dataset_id: &str) -> Result<TrainData, JobFailure> {
    let dataset = db::datasets::get(&ctx.db, dataset_id)
        .await
        .map_err(setup)?
        .ok_or_else(|| setup(format!("dataset '{dataset_id}' no longer exists")))?;
    let rows = db::datasets::images(&ctx.db, dataset_id).await.map_err(setup)?;
    let mut records = Vec::with_capacity(rows.len());
    for row in rows {
        let path = ctx.blobs.path(&row.blob).map_err(|e| setup(format!("image {}: {e}", row.file)))?;
        records.push((path, row.label, row.split));
    }
    Ok(TrainData::with_labels(dataset.classes, records)?)
}

/// Records one training event and forwards it to the job's live subscribers.
async fn record_event(ctx: &JobContext, job: &Job, event: TrainEvent) -> anyhow::Result<()> {
    let db = &ctx.db;
    match event {
        TrainEvent::Started { epochs, total_steps, resumed_from, .. } => {
            db::jobs::set_plan(db, &job.id, epochs, total_steps).await?;
            let done = resumed_from.unwrap_or(0);
            db::job_metrics::truncate_after(db, &job.id, done).await?;
            db::jobs::set_progress(db, &job.id, done, 0).await?;
            if let Some(epoch) = resumed_from {
                tracing::info!(job = %job.id, epoch, "resuming from checkpoint");
            }
        }
        TrainEvent::Restarted { reason } => tracing::warn!(job = %job.id, %reason, "checkpoint unusable, starting over"),
        TrainEvent::Step { epoch, step, steps, loss, learning_rate, images_per_s } => {
            db::job_metrics::record_step(db, &job.id, &TrainPoint { step, epoch, loss, learning_rate }).await?;
            db::jobs::set_progress(db, &job.id, epoch, step).await?;
            ctx.hub.set_throughput(&job.id, images_per_s);
            let epochs = job.progress.epochs;
            ctx.hub.publish(
                &job.id,
                JobEvent::Progress(json!({"epoch": epoch, "epochs": epochs, "step": step, "steps": steps,
                    "loss": loss, "learning_rate": learning_rate, "images_per_s": images_per_s})),
            );
        }
        TrainEvent::Epoch { epoch, report, .. } => {
            db::job_metrics::record_evaluation(db, &job.id, "validation", epoch, &report).await?;
            db::jobs::set_epoch_done(db, &job.id, epoch).await?;
            let mut block = serde_json::to_value(&report)?;
            block["epoch"] = json!(epoch);
            ctx.hub.publish(&job.id, JobEvent::Metrics(block));
        }
        TrainEvent::Checkpoint { epoch, dir, score } => {
            let rel = dir.strip_prefix(ctx.paths.root()).unwrap_or(&dir).to_string_lossy().into_owned();
            db::job_metrics::record_checkpoint(db, &job.id, epoch, &rel, score).await?;
        }
        TrainEvent::Test { report } => db::job_metrics::record_evaluation(db, &job.id, "test", 0, &report).await?,
        TrainEvent::Features { done, total } => tracing::debug!(job = %job.id, done, total, "probe features"),
        TrainEvent::Probe { c, cv_accuracy, seconds } => tracing::info!(job = %job.id, c, ?cv_accuracy, seconds, "probe head fitted"),
    }
    Ok(())
}
