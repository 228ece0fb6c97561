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

/// 200 when the database answers, 503 when it does not.
async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    match crate::db::ping(&state.db).await {
        Ok(()) => Ok(Json(json!({"status": "ready"}))),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            Err(AppError::unavailable("not_ready", "the database does not answer"))
        }
    }
}
