//! `GET /metrics` (Prometheus text format) and the middleware that counts requests per route.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AppState, Route};
use super::error::AppError;
use crate::telemetry::{JobLabel, RouteLabels, RouteOnly, StatusLabel};

/// A scrape may carry parameters of Prometheus's configuration (`params:`); they are ignored.
pub fn routes() -> Vec<Route> {
    vec![Route::get("/metrics", metrics).with_query()]
}

/// Request counts and latency per route template (unmatched paths are counted as `unmatched`).
pub async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = method_label(req.method()).to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    s.metrics.http_requests.get_or_create(&RouteLabels { method: method.clone(), route: route.clone(), status }).inc();
    s.metrics.http_latency.get_or_create(&RouteOnly { method, route }).observe(started.elapsed().as_secs_f64());
    resp
}

/// The method as a label: the standard ones by name, any other `other`, so that clients cannot
/// add series (and memory) by inventing methods.
fn method_label(method: &axum::http::Method) -> &'static str {
    const KNOWN: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"];
    KNOWN.into_iter().find(|m| *m == method.as_str()).unwrap_or("other")
}

async fn metrics(State(s): State<AppState>) -> Result<Response, AppError> {
    s.metrics.predict_queue_depth.set(s.predictor.queue_depth() as i64);
    s.metrics.inflight_bytes.set(i64::try_from(s.memory.in_use()).unwrap_or(i64::MAX));
    s.metrics.inflight_budget_bytes.set(i64::try_from(s.memory.limit()).unwrap_or(i64::MAX));
    s.metrics.jobs.clear();
    for status in ["queued", "running", "succeeded", "failed", "cancelled"] {
        s.metrics.jobs.get_or_create(&StatusLabel { status: status.into() }).set(0);
    }
    for (status, n) in crate::db::jobs::count_by_status(&s.db).await? {
        s.metrics.jobs.get_or_create(&StatusLabel { status }).set(n);
    }
    s.metrics.training_images_per_second.clear();
    for (job, rate) in s.jobs.throughput() {
        s.metrics.training_images_per_second.get_or_create(&JobLabel { job }).set(rate);
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render()).into_response())
}
