//! `/models`: the registry of fine-tuned models: inspect, delete, download, evaluate.

use std::io::Write;

use anyhow::Context;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use super::error::AppError;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::paged::{self, PageQuery};
use super::progress;
use super::{AppState, Route};
use crate::db;
use crate::db::models::{Deleted, Model};
use crate::model::io::SAVED_FILES;
use crate::model::{LoadedModel, ModelSource};
use crate::cancel::CancelOnDrop;
use crate::train::eval::{EvalSplit, evaluate_records_with_progress};

pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/models", list).with_query(),
        Route::get("/models/{id}", get),
        Route::delete("/models/{id}", delete),
        Route::get("/models/{id}/download", download),
        // Evaluation decodes and classifies a whole dataset split: minutes on a large one.
        Route::post("/models/{id}/evaluate", evaluate).without_timeout(),
    ]
}

async fn find(s: &AppState, id: &str) -> Result<Model, AppError> {
    db::models::get(&s.db, id).await?.ok_or_else(|| AppError::not_found("model", id))
}

/// `GET /models`: newest first, all or a page of them (see [`paged`]).
async fn list(State(s): State<AppState>, ApiQuery(q): ApiQuery<PageQuery>) -> Result<Response, AppError> {
    let page = paged::page(q.limit, q.cursor.as_deref())?;
    Ok(paged::answer("/models", &[], &page, db::models::list(&s.db, &page).await?))
}

async fn get(State(s): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Json<Model>, AppError> {
    Ok(Json(find(&s, &id).await?))
}

async fn delete(State(s): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<StatusCode, AppError> {
    match s.models.delete(&id).await? {
        Deleted::NotFound => Err(AppError::not_found("model", &id)),
        Deleted::OnlyModel => Err(AppError::conflict("only_model", format!("model '{id}' is the only model; /predict needs one"))),
        Deleted::InUse { job_id } => {
            Err(AppError::conflict("model_in_use", format!("model '{id}' is the base model of job '{job_id}', which has not finished")))
        }
        Deleted::Aliased { names } => {
            let (plural, them) = if names.len() == 1 { ("", "it") } else { ("es", "them") };
            let quoted = names.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ");
            Err(AppError::conflict(
                "model_aliased",
                format!("model '{id}' is named by the alias{plural} {quoted}; point {them} at another model or delete {them} first"),
            ))
        }
        Deleted::Removed { .. } => Ok(StatusCode::NO_CONTENT),
    }
}

/// A `Write` that forwards chunks to an async response body.
struct ChannelWriter(mpsc::Sender<Result<Bytes, std::io::Error>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The model folder as a tar archive (config.json, model.safetensors, preprocessor_config.json),
/// streamed as it is written.
async fn download(State(s): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, AppError> {
    let model = find(&s, &id).await?;
    let dir = s.models.dir(&model).await?;
    // Every file is opened before the answer starts, so a model deleted meanwhile is a 404, not a
    // 200 whose body breaks off (an open file outlives its removal).
    let opened = tokio::task::spawn_blocking(move || {
        SAVED_FILES.iter().map(|f| std::fs::File::open(dir.join(f)).map(|file| (*f, file))).collect::<std::io::Result<Vec<_>>>()
    })
    .await
    .context("opening the model's files")?;
    let mut files = match opened {
        Ok(files) => files,
        Err(e) => {
            find(&s, &id).await?;
            return Err(AppError::Internal(anyhow::Error::new(e).context(format!("opening the files of model {id}"))));
        }
    };
    let (tx, rx) = mpsc::channel(8);
    let name = format!("vitforge-model-{id}");
    let prefix = name.clone();
    tokio::task::spawn_blocking(move || {
        let mut tar = tar::Builder::new(ChannelWriter(tx.clone()));
        let result = files
            .iter_mut()
            .try_for_each(|(f, file)| tar.append_file(format!("{prefix}/{f}"), file))
            .and_then(|()| tar.finish());
        if let Err(e) = result {
            tracing::warn!(error = %e, "model download interrupted");
            let _ = tx.blocking_send(Err(e));
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [(header::CONTENT_TYPE, "application/x-tar".to_string()), (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{name}.tar\""))],
        body,
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvaluateRequest {
    dataset_id: String,
    /// Default: `test` when the dataset has a test split, else `all`.
    split: Option<EvalSplit>,
}

/// `POST /models/{id}/evaluate`: the model's metrics on a split of a dataset, computed on a
/// blocking thread by the same path as `vitforge eval`; or its [`EvalProgress`] as events, then a
/// `report` event (see [`progress::answer`]).
async fn evaluate(State(s): State<AppState>, ApiPath(id): ApiPath<String>, headers: HeaderMap, ApiJson(req): ApiJson<EvaluateRequest>) -> Result<Response, AppError> {
    let model = find(&s, &id).await?;
    db::datasets::get(&s.db, &req.dataset_id).await?.ok_or_else(|| AppError::not_found("dataset", &req.dataset_id))?;
    let rows = db::datasets::images(&s.db, &req.dataset_id).await?;
    // A dataset deleted meanwhile may have its blobs gone from the object store before they are
    // fetched (its rows go first, then the blobs): that is the dataset's 404, not the store's 503.
    let files = match s.objects.blob_paths(&rows.iter().map(|r| r.blob.clone()).collect::<Vec<_>>()).await {
        Ok(files) => files,
        Err(e) if db::datasets::get(&s.db, &req.dataset_id).await?.is_none() => {
            tracing::debug!(dataset = %req.dataset_id, error = format!("{e:#}"), "the dataset was deleted as its images were fetched");
            return Err(deleted_under_evaluation(&req.dataset_id));
        }
        Err(e) => return Err(e.into()),
    };
    let records: Vec<_> = rows.into_iter().zip(files).map(|(row, file)| (file, row.label, row.split)).collect();
    let dir = s.models.dir(&model).await?;
    let (max_pixels, precision) = (s.config.max_image_pixels, s.predictor.precision());
    let dataset = req.dataset_id.clone();
    let (progress, watching) = watch::channel(EvalProgress::default());
    let work = async move {
        // One evaluation at a time (each uses every core); those that wait hold nothing. One whose
        // client goes away stops at its next batch instead of running on for no one.
        let _turn = s.evaluations.clone().acquire_owned().await.map_err(anyhow::Error::from)?;
        progress.send_modify(|p| p.stage = EvalStage::Loading);
        let (_cancel_on_drop, cancel) = CancelOnDrop::new();
        let evaluation = tokio::task::spawn_blocking(move || {
            let device = candle_core::Device::Cpu;
            let loaded = LoadedModel::load(&ModelSource::Dir(dir), None, &device, 0).map_err(anyhow::Error::from)?;
            let mut report = |done: usize, images: usize| {
                progress.send_replace(EvalProgress { stage: EvalStage::Evaluating, images: images as u64, evaluated: done as u64 });
            };
            Ok::<_, AppError>(evaluate_records_with_progress(&loaded, records, req.split, max_pixels, 16, &device, precision, Some(&cancel), &mut report)?)
        })
        .await
        .map_err(anyhow::Error::from)?;
        // A dataset or model deleted meanwhile has its files removed under the evaluation: say
        // so, not 500.
        if evaluation.is_err() {
            if db::datasets::get(&s.db, &dataset).await?.is_none() {
                return Err(deleted_under_evaluation(&dataset));
            }
            find(&s, &id).await?;
        }
        Ok(evaluation?.report)
    }
    .instrument(tracing::Span::current());
    Ok(progress::answer(progress::wants_events(&headers), StatusCode::OK, "report", work, watching).await)
}

/// The answer to an evaluation whose dataset was deleted under it.
fn deleted_under_evaluation(dataset: &str) -> AppError {
    AppError::client(StatusCode::NOT_FOUND, "not_found", format!("dataset '{dataset}' was deleted while it was being evaluated"))
}

/// Where an evaluation has got, as its event stream reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
struct EvalProgress {
    stage: EvalStage,
    /// The images of the split evaluated (0 until `evaluating`).
    images: u64,
    /// Images classified so far.
    evaluated: u64,
}

/// The stages of an evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum EvalStage {
    /// Waiting for the evaluation before it to end (one runs at a time).
    #[default]
    Waiting,
    /// Loading the model.
    Loading,
    /// Classifying the images, a batch at a time.
    Evaluating,
}
