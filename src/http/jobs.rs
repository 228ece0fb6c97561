//! `/jobs`: submit fine-tunes, watch them (JSON and Server-Sent Events), read their metrics,
//! cancel them.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;

use super::error::AppError;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::{AppState, Route};
use crate::db;
use crate::db::jobs::{Cancel, Job, Status};
use crate::worker::hub::JobEvent;
use crate::worker::submit::{JobRequest, submit};

pub fn routes() -> Vec<Route> {
    vec![
        Route::post("/jobs", create),
        Route::get("/jobs", list),
        Route::get("/jobs/{id}", get),
        Route::get("/jobs/{id}/metrics", metrics),
        Route::get("/jobs/{id}/events", events),
        Route::post("/jobs/{id}/cancel", cancel),
    ]
}

/// `POST /jobs`: 202 with the queued job.
async fn create(State(s): State<AppState>, ApiJson(req): ApiJson<JobRequest>) -> Result<(StatusCode, Json<Job>), AppError> {
    Ok((StatusCode::ACCEPTED, Json(submit(&s.db, &s.jobs, req).await?)))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    status: Option<Status>,
}

async fn list(State(s): State<AppState>, ApiQuery(q): ApiQuery<ListQuery>) -> Result<Json<Vec<Job>>, AppError> {
    Ok(Json(db::jobs::list(&s.db, q.status).await?))
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
    let history = db::job_metrics::get(&s.db, &id).await?;
    let shutdown = s.jobs.shutdown_token();
    let stream = async_stream(move |tx| async move {
        let _ = tx.send(sse("progress", &serde_json::to_value(&job.progress).unwrap_or_default())).await;
        for block in &history.validation {
            let _ = tx.send(sse("metrics", &serde_json::to_value(block).unwrap_or_default())).await;
        }
        if job.status.is_terminal() {
            let _ = tx.send(sse("status", &serde_json::to_value(&job).unwrap_or_default())).await;
            return;
        }
        loop {
            let event = tokio::select! {
                e = rx.recv() => e,
                _ = shutdown.cancelled() => return,
            };
            let out = match event {
                Ok(JobEvent::Progress(v)) => sse("progress", &v),
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
