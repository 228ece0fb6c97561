//! `/jobs`: submit fine-tunes, watch them (JSON and Server-Sent Events), read their metrics,
//! cancel them.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;

use super::error::AppError;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::{AppState, Route, paged};
use crate::db;
use crate::db::jobs::{Cancel, Deleted, Job, Status};
use crate::train::Recipe;
use crate::worker::hub::JobEvent;
use crate::worker::submit::{JobRequest, submit};

pub fn routes() -> Vec<Route> {
    vec![
        Route::post("/jobs", create),
        Route::get("/jobs", list).with_query(),
        Route::get("/jobs/{id}", get),
        Route::get("/jobs/{id}/metrics", metrics),
        Route::get("/jobs/{id}/events", events),
        Route::post("/jobs/{id}/cancel", cancel),
        Route::delete("/jobs/{id}", delete),
        Route::get("/jobs/{id}/mistakes", mistakes).with_query(),
        Route::get("/recipes", recipes),
    ]
}

/// `GET /recipes`: every recipe's defaults, as a job without `params` gets them.
async fn recipes() -> Json<Value> {
    let recipes: serde_json::Map<String, Value> =
        [Recipe::Auto, Recipe::Manual].into_iter().map(|r| (r.as_str().to_string(), serde_json::to_value(r.base()).unwrap_or_default())).collect();
    Json(Value::Object(recipes))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MistakesQuery {
    /// Epochs count from 1: 0 is refused as a bad query, not looked up.
    epoch: Option<std::num::NonZeroU32>,
}

/// `GET /jobs/{id}/mistakes`: the validation images the model got wrong at an epoch (default:
/// the best epoch by validation macro-F1, as training keeps it), most confident first.
async fn mistakes(State(s): State<AppState>, ApiPath(id): ApiPath<String>, ApiQuery(q): ApiQuery<MistakesQuery>) -> Result<Json<Value>, AppError> {
    let job = find(&s, &id).await?;
    let (validation, _) = db::job_metrics::evaluations(&s.db, &id).await?;
    let best = validation
        .iter()
        .max_by(|a, b| a.report.f1.total_cmp(&b.report.f1).then(b.report.loss.total_cmp(&a.report.loss)))
        .map(|e| e.epoch);
    let epoch = match (q.epoch.map(std::num::NonZeroU32::get), best) {
        (Some(e), _) if validation.iter().any(|v| v.epoch == e) => e,
        (Some(e), _) => return Err(AppError::not_found("validated epoch", &format!("{e} of job {id}"))),
        (None, Some(e)) => e,
        (None, None) => return Err(AppError::conflict("not_validated", format!("job '{id}' has not finished an epoch yet"))),
    };
    let mistakes = db::job_metrics::mistakes(&s.db, &id, epoch).await?;
    Ok(Json(serde_json::json!({"job_id": id, "dataset_id": job.dataset_id, "epoch": epoch, "best_epoch": best, "mistakes": mistakes})))
}

/// `POST /jobs`: 202 with the queued job.
async fn create(State(s): State<AppState>, ApiJson(req): ApiJson<JobRequest>) -> Result<(StatusCode, Json<Job>), AppError> {
    Ok((StatusCode::ACCEPTED, Json(submit(&s.db, &s.jobs, req, s.job_memory.as_ref()).await?)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<Status>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// `GET /jobs`: newest first, all or a page of them (see [`paged`]).
async fn list(State(s): State<AppState>, ApiQuery(q): ApiQuery<ListQuery>) -> Result<Response, AppError> {
    let page = paged::page(q.limit, q.cursor.as_deref())?;
    let listed = db::jobs::list(&s.db, q.status, &page).await?;
    let status = q.status.map(|s| ("status", s.as_str()));
    Ok(paged::answer("/jobs", status.as_slice(), &page, listed))
}

async fn find(s: &AppState, id: &str) -> Result<Job, AppError> {
    db::jobs::get(&s.db, id).await?.ok_or_else(|| AppError::not_found("job", id))
}

async fn get(State(s): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Json<Job>, AppError> {
    Ok(Json(find(&s, &id).await?))
}

async fn metrics(State(s): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Json<db::job_metrics::JobMetrics>, AppError> {
    find(&s, &id).await?;
    Ok(Json(db::job_metrics::get(&s.db, &id).await?))
}

async fn cancel(State(s): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<(StatusCode, Json<Job>), AppError> {
    match db::jobs::cancel(&s.db, &id).await? {
        Cancel::Cancelled => {
            // A queued job can hold checkpoints (a shutdown put it back in the queue mid-run):
            // nothing will resume from them now, here or in the object store.
            if let Err(e) = s.objects.remove_dir(&s.paths.job(&id)).await {
                tracing::warn!(job = %id, error = format!("{e:#}"), "removing the cancelled job's checkpoints failed");
            }
            let job = find(&s, &id).await?;
            s.jobs.publish(&id, JobEvent::Status(Box::new(job.clone())));
            Ok((StatusCode::OK, Json(job)))
        }
        Cancel::Requested => {
            s.jobs.cancel(&id);
            Ok((StatusCode::ACCEPTED, Json(find(&s, &id).await?)))
        }
        Cancel::AlreadyFinished(status) => {
            Err(AppError::conflict("job_finished", format!("job '{id}' has already finished ({})", status.as_str())))
        }
        Cancel::NotFound => Err(AppError::not_found("job", &id)),
    }
}

/// `DELETE /jobs/{id}`: 204 for an ended job, gone with its metrics and any checkpoints left (the
/// model it registered stays); 409 for one still queued or running.
async fn delete(State(s): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<StatusCode, AppError> {
    match db::jobs::delete(&s.db, &id).await? {
        Deleted::Removed => {
            // An ended job's checkpoints are normally gone already; a failed removal left some.
            if let Err(e) = s.objects.remove_dir(&s.paths.job(&id)).await {
                tracing::warn!(job = %id, error = format!("{e:#}"), "removing the deleted job's checkpoints failed; the sweep of ended jobs' folders removes them");
            }
            Ok(StatusCode::NO_CONTENT)
        }
        Deleted::NotEnded(status) => Err(AppError::conflict(
            "job_not_ended",
            format!("job '{id}' is {}: cancel it (POST /jobs/{id}/cancel) and delete it once it has ended", status.as_str()),
        )),
        Deleted::NotFound => Err(AppError::not_found("job", &id)),
    }
}

fn sse(event: &str, data: &Value) -> Event {
    Event::default().event(event).data(data.to_string())
}

/// Server-Sent Events: the current state first (progress, the validation blocks so far, and the
/// final status if the job has ended), then live `progress`, `metrics` and a last `status`.
async fn events(
    State(s): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, AppError> {
    // Subscribe before reading the state so nothing between the two is lost.
    let mut rx = s.jobs.subscribe(&id);
    let job = find(&s, &id).await?;
    let (validation, _) = db::job_metrics::evaluations(&s.db, &id).await?;
    let shutdown = s.jobs.shutdown_token();
    let (runs_jobs, db) = (s.config.role.runs_jobs(), s.db.clone());
    // A block published between the subscription and the read above is in both: send it once.
    let sent_up_to = validation.last().map(|b| u64::from(b.epoch));
    let stream = async_stream(move |tx| async move {
        let _ = tx.send(sse("progress", &serde_json::to_value(&job.progress).unwrap_or_default())).await;
        for block in &validation {
            let _ = tx.send(sse("metrics", &serde_json::to_value(block).unwrap_or_default())).await;
        }
        if job.status.is_terminal() {
            let _ = tx.send(sse("status", &serde_json::to_value(&job).unwrap_or_default())).await;
            return;
        }
        if !runs_jobs {
            // The job runs in a worker process: its events reach this process through the database.
            follow_in_database(&db, job, validation.len(), &tx, &shutdown).await;
            return;
        }
        loop {
            let event = tokio::select! {
                e = rx.recv() => e,
                _ = shutdown.cancelled() => return,
            };
            let out = match event {
                Ok(JobEvent::Progress(v)) => sse("progress", &v),
                Ok(JobEvent::Metrics(v)) if already_sent(&v, sent_up_to) => continue,
                Ok(JobEvent::Metrics(v)) => sse("metrics", &v),
                Ok(JobEvent::Status(job)) => {
                    let _ = tx.send(sse("status", &serde_json::to_value(&*job).unwrap_or_default())).await;
                    return;
                }
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            };
            if tx.send(out).await.is_err() {
                return;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Whether a live validation block (it carries its `epoch`) was already sent from the stored
/// ones, which go up to epoch `sent_up_to` (blocks come in epoch order).
fn already_sent(block: &Value, sent_up_to: Option<u64>) -> bool {
    matches!((block["epoch"].as_u64(), sent_up_to), (Some(epoch), Some(last)) if epoch <= last)
}

/// How often an event stream of a job run by another process looks at the database.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// The live part of an event stream in a process that runs no job (`--role api`): every
/// [`FOLLOW_EVERY`], the job's progress when it changed, validation blocks past the first `seen`,
/// and the final status, read from the database.
async fn follow_in_database(db: &db::Pool, mut last: Job, mut seen: usize, tx: &tokio::sync::mpsc::Sender<Event>, shutdown: &tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
        }
        let (Ok(Some(job)), Ok((validation, _))) = (db::jobs::get(db, &last.id).await, db::job_metrics::evaluations(db, &last.id).await) else {
            continue; // the database did not answer: look again
        };
        let mut out = Vec::new();
        if job.progress != last.progress {
            out.push(sse("progress", &serde_json::to_value(&job.progress).unwrap_or_default()));
        }
        for block in validation.iter().skip(seen) {
            out.push(sse("metrics", &serde_json::to_value(block).unwrap_or_default()));
        }
        seen = seen.max(validation.len());
        let ended = job.status.is_terminal();
        if ended {
            out.push(sse("status", &serde_json::to_value(&job).unwrap_or_default()));
        }
        for event in out {
            if tx.send(event).await.is_err() {
                return;
            }
        }
        if ended {
            return;
        }
        last = job;
    }
}

/// A stream fed by a task through a small channel (the task ends when the client goes away).
fn async_stream<F, Fut>(produce: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(produce(tx));
    futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::already_sent;

    /// A live block of an epoch the stored blocks already covered is skipped; later ones, and
    /// every one when nothing was stored, are sent.
    #[test]
    fn a_block_both_stored_and_live_is_sent_once() {
        assert!(already_sent(&json!({"epoch": 2, "accuracy": 0.5}), Some(2)));
        assert!(already_sent(&json!({"epoch": 1}), Some(2)));
        assert!(!already_sent(&json!({"epoch": 3}), Some(2)));
        assert!(!already_sent(&json!({"epoch": 1}), None));
        assert!(!already_sent(&json!({"accuracy": 0.5}), Some(2)));
    }
}
