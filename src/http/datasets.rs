//! `/datasets`: upload, list, inspect, copy, extend and delete labelled image sets.
//!
//! An upload is streamed to `<data-dir>/tmp/` chunk by chunk (never held in memory), ingested on a
//! blocking thread, and stored in one transaction.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::extract::multipart::{Field, MultipartRejection};
use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::paged::{self, PageQuery};
use super::progress;
use super::{AppState, Route};
use super::error::AppError;
use super::inflight::BodyUse;
use crate::cancel::CancelOnDrop;
use crate::dataset::edits::{EditError, Edits, Source};
use crate::dataset::{self, BlobStore, ImageRecord, Ingested, Reports, Split};
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
        Route::get("/datasets", list).with_query(),
        Route::get("/datasets/{id}", get),
        Route::delete("/datasets/{id}", delete),
        Route::get("/datasets/{id}/images", images).with_query(),
        Route::get("/datasets/{id}/images/{blob}/thumbnail", thumbnail),
        Route::post("/datasets/{id}/copy", copy),
        Route::post("/datasets/{id}/extend", extend).without_body_limit().without_timeout().body(BodyUse::Streamed),
    ]
}

/// Most images in one page of `GET /datasets/{id}/images`.
const MAX_PAGE: u64 = 200;

/// Longest side of a thumbnail, in pixels.
pub const THUMBNAIL_SIDE: u32 = 160;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImagesQuery {
    split: Option<Split>,
    class: Option<String>,
    offset: Option<u64>,
    limit: Option<u64>,
}

/// `GET /datasets/{id}/images`: a page of the dataset's images in upload order, optionally of one
/// split and class, each with its thumbnail's URL.
async fn images(State(state): State<AppState>, ApiPath(id): ApiPath<String>, ApiQuery(q): ApiQuery<ImagesQuery>) -> Result<Json<serde_json::Value>, AppError> {
    let dataset = queries::get(&state.db, &id).await?.ok_or_else(|| AppError::not_found("dataset", &id))?;
    // A class the dataset lacks is a mistake (a misspelling, another dataset's class), not an
    // empty page.
    if let Some(class) = q.class.as_deref()
        && !dataset.classes.iter().any(|c| c == class)
    {
        let classes = dataset.classes.iter().map(|c| format!("'{c}'")).collect::<Vec<_>>().join(", ");
        return Err(AppError::unprocessable("invalid_query", format!("class '{class}' is not a class of dataset '{id}' (its classes: {classes})")));
    }
    let (offset, limit) = (q.offset.unwrap_or(0), q.limit.unwrap_or(50));
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(AppError::unprocessable("invalid_query", format!("limit must be between 1 and {MAX_PAGE}")));
    }
    // The databases count rows in an i64.
    if i64::try_from(offset).is_err() {
        return Err(AppError::unprocessable("invalid_query", format!("offset must be at most {}", i64::MAX)));
    }
    let (rows, total) = queries::images_page(&state.db, &id, q.split, q.class.as_deref(), offset, limit).await?;
    let images: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|r| {
            let thumbnail = format!("/datasets/{id}/images/{}/thumbnail", r.blob);
            serde_json::json!({"blob": r.blob, "file": r.file, "label": r.label, "split": r.split, "thumbnail": thumbnail})
        })
        .collect();
    Ok(Json(serde_json::json!({"total": total, "offset": offset, "limit": limit, "images": images})))
}

/// `GET /datasets/{id}/images/{blob}/thumbnail`: a JPEG of at most [`THUMBNAIL_SIDE`] pixels a
/// side, made on first use and cached; only for an image the dataset has (no other blob, no
/// path can be read this way).
async fn thumbnail(State(state): State<AppState>, ApiPath((id, blob)): ApiPath<(String, String)>) -> Result<Response, AppError> {
    if !BlobStore::is_valid_hash(&blob) {
        return Err(AppError::bad_request("invalid_blob", "the image id must be 64 lower-case hexadecimal characters"));
    }
    queries::get(&state.db, &id).await?.ok_or_else(|| AppError::not_found("dataset", &id))?;
    if !queries::references(&state.db, &id, &blob).await? {
        return Err(AppError::not_found("image", &blob));
    }
    let cached = state.paths.thumbnail(&blob);
    if let Ok(jpeg) = tokio::fs::read(&cached).await {
        return Ok(thumbnail_response(jpeg));
    }
    let made = make_thumbnail(&state, &blob).await;
    // The dataset may have been deleted, and its blob collected, since it was looked up.
    if made.is_err() && !queries::references(&state.db, &id, &blob).await? {
        return Err(AppError::not_found("image", &blob));
    }
    Ok(thumbnail_response(made?))
}

/// Makes (and caches) the thumbnail of `blob`.
async fn make_thumbnail(state: &AppState, blob: &str) -> Result<Vec<u8>, AppError> {
    let cached = state.paths.thumbnail(blob);
    let image = state.objects.blob_path(blob).await?;
    let (memory, max_pixels) = (state.memory.clone(), state.config.max_image_pixels);
    tokio::task::spawn_blocking(move || -> Result<Vec<u8>, AppError> {
        let bytes = std::fs::read(image).context("reading the image")?;
        let img = crate::imaging::decode_rgb_within(&bytes, max_pixels, &memory, crate::budget::WAIT).map_err(|e| match e {
            // (an image stored under a larger budget than this process's: waiting never helps)
            crate::imaging::ImageError::OverBudget { needed } if needed > memory.limit() => AppError::too_large(
                "image_too_large",
                format!(
                    "decoding this image needs {needed} bytes at once, more than the service's whole memory budget for work in flight ({} bytes, --max-inflight-bytes)",
                    memory.limit()
                ),
            ),
            crate::imaging::ImageError::OverBudget { .. } => AppError::over_budget(e.to_string()),
            e => AppError::Internal(anyhow::anyhow!("a stored image no longer decodes: {e}")),
        })?;
        let (w, h) = fit_within(img.width(), img.height(), THUMBNAIL_SIDE);
        let small = image::imageops::thumbnail(&img, w, h);
        let mut out = std::io::Cursor::new(Vec::new());
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85).encode_image(&small).context("encoding the thumbnail")?;
        let out = out.into_inner();
        // Whole or not at all (a request for the same blob may read it meanwhile); a cache that
        // cannot be written costs the next request a new thumbnail, not this one its answer.
        if let Err(e) = cache_thumbnail(&cached, &out) {
            tracing::warn!(path = %cached.display(), error = %e, "caching a thumbnail failed");
        }
        Ok(out)
    })
    .await
    .context("thumbnail task")?
}

/// Writes a thumbnail into the cache through a temporary file and a rename. A temporary file left
/// by a crash has no blob's name, so start-up removes it with the orphaned thumbnails.
fn cache_thumbnail(path: &std::path::Path, jpeg: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut temp = tempfile::NamedTempFile::new_in(path.parent().unwrap_or(std::path::Path::new(".")))?;
    temp.write_all(jpeg)?;
    temp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn thumbnail_response(jpeg: Vec<u8>) -> Response {
    // Blobs are content-addressed: a thumbnail never changes.
    ([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "private, max-age=31536000, immutable")], jpeg).into_response()
}

/// The size of a `w` × `h` image scaled down (never up) to fit `side` × `side`.
fn fit_within(w: u32, h: u32, side: u32) -> (u32, u32) {
    let scale = (f64::from(side) / f64::from(w.max(h))).min(1.0);
    (((f64::from(w) * scale).round() as u32).max(1), ((f64::from(h) * scale).round() as u32).max(1))
}

/// `POST /datasets`: multipart `file` (archive or Parquet) and optional `name`; 201 with the
/// dataset, or its progress as events (see [`answer`]).
async fn create(State(state): State<AppState>, headers: HeaderMap, multipart: Result<Multipart, MultipartRejection>) -> Result<Response, AppError> {
    refuse_declared_oversize(&headers, state.config.max_upload_bytes)?;
    let upload = receive(&state, multipart?).await?;
    let name = upload.name.or_else(|| upload.file_name.as_deref().and_then(name_from_file_name)).unwrap_or_else(|| "dataset".into());
    Ok(answer(state, &headers, upload.file, Making::Dataset { name }).await)
}

/// `POST /datasets/{id}/extend`: multipart `file` and optional `name`, as for `POST /datasets`;
/// 201 and a new dataset, the images of dataset `id` followed by those of the upload that it
/// lacks ([`dataset::edits::extend`]). The upload may be of a single class; dataset `id` stays
/// as it is.
async fn extend(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, AppError> {
    refuse_declared_oversize(&headers, state.config.max_upload_bytes)?;
    // Before the body is read, so an upload to a dataset that is not there is not sent for
    // nothing (it is read again under the blob lock).
    queries::get(&state.db, &id).await?.ok_or_else(|| AppError::not_found("dataset", &id))?;
    let upload = receive(&state, multipart?).await?;
    Ok(answer(state, &headers, upload.file, Making::Extension { id, name: upload.name }).await)
}

/// What an upload makes: a dataset of its own, or a copy of dataset `id` with its images added.
enum Making {
    Dataset { name: String },
    Extension { id: String, name: Option<String> },
}

/// The answer to a received upload (see [`progress::answer`]): 201 and the dataset it makes,
/// or its [`UploadProgress`] as events, then a `dataset` event.
async fn answer(state: AppState, headers: &HeaderMap, file: ScratchFile, making: Making) -> Response {
    let (progress, watching) = tokio::sync::watch::channel(UploadProgress::default());
    let work = async move {
        let extending = matches!(making, Making::Extension { .. });
        let dataset = store_upload(&state, file, making, &progress).await?;
        let what = if extending { "dataset extended" } else { "dataset stored" };
        tracing::info!(id = %dataset.id, images = dataset.num_images, rejected = dataset.rejected_total, "{what}");
        Ok::<_, AppError>(dataset)
    }
    // A stream is polled after the handler returned: its logs keep the request's span.
    .instrument(tracing::Span::current());
    progress::answer(progress::wants_events(headers), StatusCode::CREATED, "dataset", work, watching).await
}

/// Where an upload has got, as its event stream reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
struct UploadProgress {
    stage: Stage,
    /// Entries listed so far while `listing`; the upload's entries (files, folders, Parquet rows)
    /// from `checking` on.
    entries: u64,
    /// Entries checked (read, decoded, stored).
    checked: u64,
}

/// The stages of an upload after it was received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum Stage {
    /// Waiting for an ingest slot (as many as the CPU has cores).
    #[default]
    Waiting,
    /// Listing the entries (a tar is read through once to list them; the others at once).
    Listing,
    /// Checking each entry.
    Checking,
    /// Finding repeated files and look-alikes (and, for an extension, what the dataset has).
    Comparing,
    /// Storing the dataset's rows (and its new blobs in the object store).
    Storing,
}

impl UploadProgress {
    fn of(progress: dataset::Progress) -> Self {
        match progress {
            dataset::Progress::Listing { listed } => Self { stage: Stage::Listing, entries: listed, checked: 0 },
            dataset::Progress::Checking { checked, entries } => Self { stage: Stage::Checking, entries, checked },
        }
    }
}

/// Moves an upload's progress on to `stage`, keeping its counts.
fn reached(progress: &tokio::sync::watch::Sender<UploadProgress>, stage: Stage) {
    progress.send_modify(|p| p.stage = stage);
}

/// Ingests an upload and stores the dataset it makes, removing the blobs it added when it fails;
/// reports its stages to `progress`.
async fn store_upload(state: &AppState, file: ScratchFile, making: Making, progress: &tokio::sync::watch::Sender<UploadProgress>) -> Result<Dataset, AppError> {
    let slot = state.ingest_slots.clone().acquire_owned().await.context("ingest slots closed")?;
    reached(progress, Stage::Listing);
    // Held until the rows are committed, so blob collection cannot remove a blob this upload
    // reuses (nor, for an extension, one of the dataset it copies); shared with the ingest
    // thread, which may outlive this future by an entry.
    let (across, uploading) = blobs_held(state).await?;
    let uploading = Arc::new(uploading);
    let (store, written) = state.objects.blobs().recording();
    let mut added = AddedBlobs { state: state.clone(), written: written.clone(), armed: true };
    let stored = async {
        let (name, base) = match making {
            Making::Dataset { name } => (name, None),
            Making::Extension { id, name } => {
                let (source, images) = source_images(state, &id).await?;
                (name.unwrap_or_else(|| derived_name(&source.name, "extended")), Some((id, images)))
            }
        };
        let made = ingest(state, store, file, slot, uploading.clone(), base, progress.clone()).await?;
        reached(progress, Stage::Storing);
        // In the object store before the rows that name them.
        state.objects.publish_blobs(&made.uploaded_blobs).await?;
        Ok::<_, AppError>(queries::insert_from(&state.db, &name, &made.dataset, made.reports, made.source).await?)
    }
    .await;
    // Not dropped mid-way: the outcome below keeps the blobs or removes them itself.
    added.armed = false;
    drop(uploading);
    drop(across);
    if stored.is_err() {
        // A failed upload, a full disk's above all, should not hold its blobs' space until the
        // next sweep.
        remove_added_blobs(state, &written).await;
    }
    stored
}

/// Dataset `id` and its images in upload order, for a copy made from it (read under the blob
/// lock, so that they stay until the copy's rows are committed).
async fn source_images(state: &AppState, id: &str) -> Result<(Dataset, Vec<ImageRecord>), AppError> {
    let source = queries::get(&state.db, id).await?.ok_or_else(|| AppError::not_found("dataset", id))?;
    let images: Vec<_> = queries::images(&state.db, id).await?.into_iter().map(|row| row.into_record()).collect();
    if images.is_empty() {
        // Deleted between the two reads (a stored dataset has images).
        return Err(AppError::not_found("dataset", id));
    }
    Ok((source, images))
}

/// `source`'s name with `(what)` after it, within [`MAX_NAME_CHARS`]: the default name of a
/// dataset made from another.
fn derived_name(source: &str, what: &str) -> String {
    let suffix = format!(" ({what})");
    let kept: String = source.chars().take(MAX_NAME_CHARS.saturating_sub(suffix.chars().count())).collect();
    kept + &suffix
}

/// Removes the blobs an upload added (`written`, by a recording [`BlobStore`]) that no dataset
/// uses, as those of a deleted dataset are: called when the upload failed or was abandoned,
/// once its ingest has stopped.
async fn remove_added_blobs(state: &AppState, written: &std::sync::Mutex<Vec<String>>) {
    let written = std::mem::take(&mut *written.lock().unwrap_or_else(|e| e.into_inner()));
    if written.is_empty() {
        return;
    }
    if let Err(e) = crate::blob_gc::collect_after_delete(&state.db, &state.objects, &state.blob_lock, written, shared_blobs(state)).await {
        tracing::warn!(error = ?e, "removing the blobs of an upload that did not end stored failed; the next sweep removes them");
    }
}

/// The blobs an upload added, removed again when its request is dropped before it ended (the
/// client went away mid-ingest), as a failed upload's are. Disarmed once the upload has an
/// outcome, which keeps them or removes them itself.
struct AddedBlobs {
    state: AppState,
    written: Arc<std::sync::Mutex<Vec<String>>>,
    armed: bool,
}

impl Drop for AddedBlobs {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Without a runtime (the process is ending) the next start-up sweep removes them.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (state, written) = (self.state.clone(), self.written.clone());
        runtime.spawn(async move {
            // The ingest thread holds the lock shared until it stops, at its next entry: once the
            // lock can be had exclusively, it has stopped and the list is complete.
            drop(state.blob_lock.clone().write_owned().await);
            remove_added_blobs(&state, &written).await;
        });
    }
}

/// The blob lock held shared, by a request about to reference blobs (an upload, a copy), so that
/// collection cannot remove them until its rows are committed: where processes of several roles
/// share the blobs, the lock across processes first (its holders wait on the database, not on
/// this process), then this process's.
async fn blobs_held(state: &AppState) -> Result<(Option<crate::db::SessionLock>, tokio::sync::OwnedRwLockReadGuard<()>), AppError> {
    let across = if shared_blobs(state) { crate::db::blob_lock(&state.db, false, true).await? } else { None };
    Ok((across, state.blob_lock.clone().read_owned().await))
}

/// Whether other processes share this one's blobs (every role but `all`, which is alone).
fn shared_blobs(state: &AppState) -> bool {
    state.config.role != crate::config::Role::All
}

/// `GET /datasets`: newest first, all or a page of them (see [`paged`]).
async fn list(State(state): State<AppState>, ApiQuery(q): ApiQuery<PageQuery>) -> Result<Response, AppError> {
    let page = paged::page(q.limit, q.cursor.as_deref())?;
    Ok(paged::answer("/datasets", &[], &page, queries::list(&state.db, &page).await?))
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
            // The rows are gone, so the delete has happened whatever becomes of the collection: its
            // failure is logged, not answered (a retry would find nothing to delete). Spawned, so a
            // request timeout cannot cut it short; awaited, so the blobs are usually gone on 204.
            let (db, objects, lock, shared) = (state.db.clone(), state.objects.clone(), state.blob_lock.clone(), shared_blobs(&state));
            let collection = tokio::spawn(async move { crate::blob_gc::collect_after_delete(&db, &objects, &lock, blobs, shared).await });
            match collection.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(dataset = %id, error = ?e, "removing the deleted dataset's blobs failed; a --role all start-up sweep removes them"),
                Err(e) => tracing::error!(dataset = %id, error = %e, "the blob collection task failed"),
            }
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

/// The body of `POST /datasets/{id}/copy`: the copy's name and the edits, each image named by
/// its blob.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CopyRequest {
    name: Option<String>,
    #[serde(default)]
    relabel: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    remove: std::collections::BTreeSet<String>,
    #[serde(default, rename = "move")]
    moves: std::collections::BTreeMap<String, Split>,
}

/// `POST /datasets/{id}/copy`: 201 and a new dataset, the images of dataset `id` with some
/// relabelled, removed or moved to another split ([`dataset::edits`]); dataset `id` stays as it
/// is.
async fn copy(State(state): State<AppState>, ApiPath(id): ApiPath<String>, ApiJson(req): ApiJson<CopyRequest>) -> Result<(StatusCode, Json<Dataset>), AppError> {
    let name = req.name.as_deref().map(checked_name).transpose()?;
    let edits = Edits { relabel: req.relabel, remove: req.remove, moves: req.moves };
    // The copy's rows reference the source's blobs: held, as an upload holds it, from reading
    // the source's rows until the copy's are committed, so that deleting the source meanwhile
    // cannot have those blobs collected under the copy.
    let (across, reading) = blobs_held(&state).await?;
    let (source, images) = source_images(&state, &id).await?;
    let name = name.unwrap_or_else(|| derived_name(&source.name, "copy"));
    // Off the async runtime, in an ingest slot: finding look-alikes grows as the square of the
    // images.
    let slot = state.ingest_slots.clone().acquire_owned().await.context("ingest slots closed")?;
    let made = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let (copy, source) = dataset::edits::apply(images, &edits, &id)?;
        let reports = copy.reports();
        Ok::<_, EditError>((copy, source, reports))
    });
    let (copy, source, reports) = made.await.context("copy task failed")??;
    let dataset = queries::insert_from(&state.db, &name, &copy, reports, Some(source)).await?;
    drop(reading);
    drop(across);
    tracing::info!(id = %dataset.id, images = dataset.num_images, "dataset copied");
    Ok((StatusCode::CREATED, Json(dataset)))
}

/// A received upload: the name given for its dataset, the file's name in the request, and the
/// file on disk.
struct Upload {
    name: Option<String>,
    file_name: Option<String>,
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
/// Every read of it (a part's headers, each chunk) answers 408 when the client sends nothing
/// for the request timeout.
async fn receive(state: &AppState, mut multipart: Multipart) -> Result<Upload, AppError> {
    let idle = state.config.request_timeout();
    let mut file: Option<(ScratchFile, Option<String>)> = None;
    let mut name = None;
    while let Some(mut field) = within(idle, multipart.next_field()).await?? {
        match field.name().unwrap_or_default() {
            "file" if file.is_some() => {
                return Err(AppError::bad_request("duplicate_file", "the body has more than one 'file' part"));
            }
            "file" => {
                let file_name = field.file_name().map(str::to_owned);
                let saved = save(&mut field, &state.paths.tmp(), state.config.max_upload_bytes, idle).await?;
                file = Some((saved, file_name));
            }
            "name" => name = Some(read_name(&mut field, idle).await?),
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
    Ok(Upload { name, file_name, file })
}

/// Streams one part to a scratch file, refusing it once it passes `limit` bytes, and answering
/// 408 when the client sends nothing for `idle` (a stalled or trickling sender would otherwise
/// hold a connection and a scratch file forever).
async fn save(field: &mut Field<'_>, dir: &Path, limit: u64, idle: Option<Duration>) -> Result<ScratchFile, AppError> {
    let scratch = ScratchFile::new(dir);
    let file = tokio::fs::File::create(&scratch.path).await.context("creating upload scratch file")?;
    let mut out = tokio::io::BufWriter::with_capacity(1024 * 1024, file);
    let mut written = 0u64;
    while let Some(chunk) = within(idle, field.chunk()).await?? {
        written += chunk.len() as u64;
        if written > limit {
            return Err(upload_too_large(limit));
        }
        out.write_all(&chunk).await.context("writing upload scratch file")?;
    }
    out.flush().await.context("writing upload scratch file")?;
    Ok(scratch)
}

/// `next` (a read of the request body), or 408 when it takes longer than `idle`.
async fn within<T>(idle: Option<Duration>, next: impl std::future::Future<Output = T>) -> Result<T, AppError> {
    match idle {
        Some(idle) => tokio::time::timeout(idle, next).await.map_err(|_| AppError::request_timeout(idle)),
        None => Ok(next.await),
    }
}

fn invalid_name(message: &str) -> AppError {
    AppError::unprocessable("invalid_name", message.to_string())
}

/// Reads and checks the `name` part: 1 to [`MAX_NAME_CHARS`] characters, no control characters.
async fn read_name(field: &mut Field<'_>, idle: Option<Duration>) -> Result<String, AppError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = within(idle, field.chunk()).await?? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_NAME_CHARS * 4 {
            return Err(invalid_name(&format!("the name is longer than {MAX_NAME_CHARS} characters")));
        }
    }
    let name = String::from_utf8(bytes).map_err(|_| invalid_name("the name is not valid UTF-8"))?;
    checked_name(&name)
}

/// `name` without its surrounding blanks, if it is 1 to [`MAX_NAME_CHARS`] characters with no
/// control characters.
fn checked_name(name: &str) -> Result<String, AppError> {
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

/// What an ingest made: the dataset to store, its reports and source, and the blobs of the
/// upload's images it stores (to be published before the rows that name them; an extension's
/// repeats of the dataset's images are in the object store with the dataset's).
struct Made {
    dataset: Ingested,
    reports: Reports,
    source: Option<Source>,
    uploaded_blobs: Vec<String>,
}

/// Runs the ingest on a blocking thread: it decodes every image. With `base` (a dataset's id and
/// images), the upload is added to them, and may be of one class. The ingest slot and the blob
/// lock's read guard travel with it, as does the scratch file, so they are held until it really
/// ends: when the client goes away this future is dropped at once, and the thread stops at the
/// next entry.
async fn ingest(
    state: &AppState,
    store: BlobStore,
    upload: ScratchFile,
    slot: tokio::sync::OwnedSemaphorePermit,
    uploading: Arc<tokio::sync::OwnedRwLockReadGuard<()>>,
    base: Option<(String, Vec<ImageRecord>)>,
    progress: tokio::sync::watch::Sender<UploadProgress>,
) -> Result<Made, AppError> {
    let limits = state.ingest_limits.clone();
    let memory = state.memory.clone();
    let span = tracing::Span::current();
    let (_cancel_on_drop, cancel) = CancelOnDrop::new();
    let task = tokio::task::spawn_blocking(move || {
        // The scratch file too: the tar reader opens it by name twice.
        let _held = (slot, uploading);
        span.in_scope(|| {
            let purpose = if base.is_some() { dataset::Purpose::Addition } else { dataset::Purpose::Dataset };
            let mut report = |p| {
                progress.send_replace(UploadProgress::of(p));
            };
            let ingested = dataset::ingest_cancellable(&upload.path, &store, &limits, &mut report, &cancel, &memory, purpose)?;
            reached(&progress, Stage::Comparing);
            // The upload's images follow the dataset's, less those the dataset has already.
            let (dataset, source, first_uploaded) = match base {
                Some((id, images)) => {
                    let had = images.len();
                    let (dataset, source) = dataset::edits::extend(images, ingested, &id)?;
                    (dataset, Some(source), had)
                }
                None => (ingested, None, 0),
            };
            let uploaded_blobs = dataset.images[first_uploaded..].iter().map(|i| i.blob.clone()).collect::<BTreeSet<_>>().into_iter().collect();
            // Worked out here, off the async runtime: finding look-alikes grows as the square of
            // the images.
            let reports = dataset.reports();
            Ok::<_, AppError>(Made { dataset, reports, source, uploaded_blobs })
        })
    });
    task.await.context("ingest task failed")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbnails_fit_the_square_keep_the_aspect_and_never_grow() {
        assert_eq!(fit_within(640, 480, 160), (160, 120));
        assert_eq!(fit_within(90, 360, 160), (40, 160));
        assert_eq!(fit_within(50, 30, 160), (50, 30));
        assert_eq!(fit_within(10_000, 1, 160), (160, 1));
    }

    #[test]
    fn default_names_come_from_the_file_name() {
        assert_eq!(name_from_file_name("pets.zip").as_deref(), Some("pets.zip"));
        assert_eq!(name_from_file_name("C:\\Users\\me\\pets.zip").as_deref(), Some("pets.zip"));
        assert_eq!(name_from_file_name("../../etc/x.tar").as_deref(), Some("x.tar"));
        assert_eq!(name_from_file_name(" \u{7} "), None);
        assert_eq!(name_from_file_name("dir/"), None);
    }
}
