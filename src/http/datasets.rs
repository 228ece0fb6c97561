//! `/datasets`: upload, list, inspect and delete labelled image sets.
//!
//! An upload is streamed to `<data-dir>/tmp/` chunk by chunk (never held in memory), ingested on a
//! blocking thread, and stored in one transaction.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::extract::multipart::{Field, MultipartRejection};
use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, StatusCode, header};
use tokio::io::AsyncWriteExt;

use super::extract::ApiPath;
use super::{AppState, Route};
use super::error::AppError;
use super::inflight::BodyUse;
use crate::cancel::CancelOnDrop;
use crate::dataset::{self, Ingested};
use crate::db::datasets::{self as queries, Dataset, Deleted};

/// Longest dataset name, in characters.
const MAX_NAME_CHARS: usize = 200;
/// Room for the multipart framing and the `name` part on top of the file itself.
const MULTIPART_OVERHEAD: u64 = 64 * 1024;

pub fn routes() -> Vec<Route> {
    vec![
        // A big upload takes as long as the link needs, and its ingest as long as the images
        // need: the body is timed per chunk instead (see `save`).
        Route::post("/datasets", create).without_body_limit().without_timeout().body(BodyUse::Streamed),
        Route::get("/datasets", list),
        Route::get("/datasets/{id}", get),
        Route::delete("/datasets/{id}", delete),
    ]
}

/// `POST /datasets`: multipart `file` (archive or Parquet) and optional `name`; 201 with the dataset.
async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, Json<Dataset>), AppError> {
    refuse_declared_oversize(&headers, state.config.max_upload_bytes)?;
    let upload = receive(&state, multipart?).await?;
    let slot = state.ingest_slots.clone().acquire_owned().await.context("ingest slots closed")?;
    // Held until the rows are committed, so blob collection cannot remove a blob this upload
    // reuses; shared with the ingest thread, which may outlive this future by an entry.
    let uploading = Arc::new(state.blob_lock.clone().read_owned().await);
    let ingested = ingest(&state, upload.file, slot, uploading.clone()).await?;
    let dataset = queries::insert(&state.db, &upload.name, &ingested).await?;
    drop(uploading);
    tracing::info!(id = %dataset.id, images = dataset.num_images, rejected = dataset.rejected_total, "dataset stored");
    Ok((StatusCode::CREATED, Json(dataset)))
}

/// `GET /datasets`: every dataset, newest first.
async fn list(State(state): State<AppState>) -> Result<Json<Vec<Dataset>>, AppError> {
    Ok(Json(queries::list(&state.db).await?))
}

/// `GET /datasets/{id}`.
async fn get(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Json<Dataset>, AppError> {
    let dataset = queries::get(&state.db, &id).await?.ok_or_else(|| AppError::not_found("dataset", &id))?;
    Ok(Json(dataset))
}

/// `DELETE /datasets/{id}`: 204, and the blobs only this dataset used are removed.
async fn delete(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<StatusCode, AppError> {
    match queries::delete(&state.db, &id).await? {
        Deleted::Removed { blobs } => {
            crate::blob_gc::collect_after_delete(&state.db, &state.blobs, &state.blob_lock, blobs).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        Deleted::NotFound => Err(AppError::not_found("dataset", &id)),
        Deleted::InUse { job_id } => Err(AppError::conflict(
            "dataset_in_use",
            format!(
                "dataset '{id}' is used by job '{job_id}', which is queued or running; cancel it or wait for it to end"
            ),
        )),
    }
}

/// A received upload: the dataset's name and the file on disk.
struct Upload {
    name: String,
    file: ScratchFile,
}

/// A file under `<data-dir>/tmp/`, removed when dropped: on every exit path, including a client
/// that disconnects mid-upload (which drops the handler's future).
struct ScratchFile {
    path: PathBuf,
}

impl ScratchFile {
    fn new(dir: &Path) -> Self {
        Self { path: dir.join(format!("{}.upload", uuid::Uuid::now_v7())) }
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "cannot remove upload scratch file"),
        }
    }
}

fn upload_too_large(limit: u64) -> AppError {
    AppError::too_large("upload_too_large", format!("the upload is larger than the limit of {limit} bytes"))
}

/// Refuses a body whose declared length already exceeds the limit, before reading any of it.
fn refuse_declared_oversize(headers: &HeaderMap, limit: u64) -> Result<(), AppError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit.saturating_add(MULTIPART_OVERHEAD)) {
        return Err(upload_too_large(limit));
    }
    Ok(())
}

/// Reads the multipart body: the `file` part to disk, the `name` part into memory (bounded).
async fn receive(state: &AppState, mut multipart: Multipart) -> Result<Upload, AppError> {
    let mut file: Option<(ScratchFile, Option<String>)> = None;
    let mut name = None;
    while let Some(mut field) = multipart.next_field().await? {
        match field.name().unwrap_or_default() {
            "file" if file.is_some() => {
                return Err(AppError::bad_request("duplicate_file", "the body has more than one 'file' part"));
            }
            "file" => {
                let file_name = field.file_name().map(str::to_owned);
                let saved =
                    save(&mut field, &state.paths.tmp(), state.config.max_upload_bytes, state.config.request_timeout())
                        .await?;
                file = Some((saved, file_name));
            }
            "name" => name = Some(read_name(&mut field).await?),
            other => {
                let other: String = other.chars().take(64).collect();
                return Err(AppError::unprocessable(
                    "unknown_field",
                    format!("unknown multipart part '{other}' (expected 'file' and optionally 'name')"),
                ));
            }
        }
    }
    let Some((file, file_name)) = file else {
        return Err(AppError::unprocessable("missing_file", "the multipart body has no 'file' part"));
    };
    let name = name.or_else(|| file_name.as_deref().and_then(name_from_file_name)).unwrap_or_else(|| "dataset".into());
    Ok(Upload { name, file })
}

/// Streams one part to a scratch file, refusing it once it passes `limit` bytes, and answering
/// 408 when the client sends nothing for `idle` (a stalled or trickling sender would otherwise
/// hold a connection and a scratch file forever).
async fn save(field: &mut Field<'_>, dir: &Path, limit: u64, idle: Option<Duration>) -> Result<ScratchFile, AppError> {
    let scratch = ScratchFile::new(dir);
    let file = tokio::fs::File::create(&scratch.path).await.context("creating upload scratch file")?;
    let mut out = tokio::io::BufWriter::with_capacity(1024 * 1024, file);
    let mut written = 0u64;
    loop {
        let next = match idle {
            Some(idle) => tokio::time::timeout(idle, field.chunk()).await.map_err(|_| AppError::request_timeout(idle))?,
            None => field.chunk().await,
        };
        let Some(chunk) = next? else { break };
        written += chunk.len() as u64;
        if written > limit {
            return Err(upload_too_large(limit));
        }
        out.write_all(&chunk).await.context("writing upload scratch file")?;
    }
    out.flush().await.context("writing upload scratch file")?;
    Ok(scratch)
}

fn invalid_name(message: &str) -> AppError {
    AppError::unprocessable("invalid_name", message.to_string())
}

/// Reads and checks the `name` part: 1 to [`MAX_NAME_CHARS`] characters, no control characters.
async fn read_name(field: &mut Field<'_>) -> Result<String, AppError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_NAME_CHARS * 4 {
            return Err(invalid_name(&format!("the name is longer than {MAX_NAME_CHARS} characters")));
        }
    }
    let name = String::from_utf8(bytes).map_err(|_| invalid_name("the name is not valid UTF-8"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(invalid_name("the name is empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(invalid_name(&format!("the name is longer than {MAX_NAME_CHARS} characters")));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid_name("the name contains control characters"));
    }
    Ok(name.to_string())
}

/// The default name: the uploaded file's base name, cleaned; `None` if nothing usable is left.
fn name_from_file_name(file_name: &str) -> Option<String> {
    let base = file_name.rsplit(['/', '\\']).next().unwrap_or_default();
    let name: String = base.chars().filter(|c| !c.is_control()).take(MAX_NAME_CHARS).collect();
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// Runs the ingest on a blocking thread: it decodes every image. The ingest slot and the blob
/// lock's read guard travel with it, as does the scratch file, so they are held until it really
/// ends: when the client goes away this future is dropped at once, and the thread stops at the
/// next entry.
async fn ingest(
    state: &AppState,
    upload: ScratchFile,
    slot: tokio::sync::OwnedSemaphorePermit,
    uploading: Arc<tokio::sync::OwnedRwLockReadGuard<()>>,
) -> Result<Ingested, AppError> {
    let store = state.blobs.clone();
    let limits = state.ingest_limits.clone();
    let memory = state.memory.clone();
    let span = tracing::Span::current();
    let (_cancel_on_drop, cancel) = CancelOnDrop::new();
    let task = tokio::task::spawn_blocking(move || {
        // The scratch file too: the tar reader opens it by name twice.
        let _held = (slot, uploading);
        span.in_scope(|| dataset::ingest_cancellable(&upload.path, &store, &limits, &mut |_| {}, &cancel, &memory))
    });
    Ok(task.await.context("ingest task failed")??)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_come_from_the_file_name() {
        assert_eq!(name_from_file_name("pets.zip").as_deref(), Some("pets.zip"));
        assert_eq!(name_from_file_name("C:\\Users\\me\\pets.zip").as_deref(), Some("pets.zip"));
        assert_eq!(name_from_file_name("../../etc/x.tar").as_deref(), Some("x.tar"));
        assert_eq!(name_from_file_name(" \u{7} "), None);
        assert_eq!(name_from_file_name("dir/"), None);
    }
}
