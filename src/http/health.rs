//! Liveness and readiness probes.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::error::AppError;
use super::{AppState, Route};

/// Probes answer whatever query an orchestrator's check adds (they read none).
pub fn routes() -> Vec<Route> {
    vec![Route::get("/healthz", healthz).with_query(), Route::get("/readyz", readyz).with_query()]
}

/// 200 whenever the process is up and serving HTTP.
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// How long readiness waits for the database: less than an orchestrator's probe timeout, so a
/// database that is down gives a 503, not a probe that times out.
const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// 200 when the database and the object store (if any) answer within [`READY_WAIT`], 503 naming
/// the one that does not.
async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    let database = tokio::time::timeout(READY_WAIT, async { crate::db::ping(&state.db).await.map_err(anyhow::Error::from) });
    let objects = tokio::time::timeout(READY_WAIT, state.objects.check());
    let (database, objects) = tokio::join!(database, objects);
    for (what, outcome) in [("the database", database), ("the object store", objects)] {
        let why = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("no answer within {READY_WAIT:?}"),
        };
        tracing::warn!(error = %why, "readiness check failed: {what}");
        return Err(AppError::unavailable("not_ready", format!("{what} does not answer")));
    }
    Ok(Json(json!({"status": "ready"})))
}
