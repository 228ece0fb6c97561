//! Liveness and readiness probes.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::error::AppError;
use super::{AppState, Route};

pub fn routes() -> Vec<Route> {
    vec![Route::get("/healthz", healthz), Route::get("/readyz", readyz)]
}

/// 200 whenever the process is up and serving HTTP.
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// How long readiness waits for the database: less than an orchestrator's probe timeout, so a
/// database that is down gives a 503, not a probe that times out.
const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// 200 when the database answers within [`READY_WAIT`], 503 when it does not.
async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    let why = match tokio::time::timeout(READY_WAIT, crate::db::ping(&state.db)).await {
        Ok(Ok(())) => return Ok(Json(json!({"status": "ready"}))),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {READY_WAIT:?}"),
    };
    tracing::warn!(error = %why, "readiness check failed");
    Err(AppError::unavailable("not_ready", "the database does not answer"))
}
