//! HTTP routes, the shared state handlers see, and the layers around them.
//!
//! Every module exposes `routes()` as a list of [`Route`]s; `router()` mounts them and
//! [`route_table`] lists them, so a test can hold the router and `openapi.yaml` together.

pub mod auth;
pub mod datasets;
pub mod docs;
pub mod extract;
pub mod health;
pub mod jobs;
pub mod linger;
pub mod metrics;
pub mod models;
pub mod predict;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::handler::Handler;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use sqlx::SqlitePool;
use tokio::sync::Semaphore;
use tower_http::trace::TraceLayer;

use crate::blob_gc::BlobLock;
use crate::config::ServeConfig;
use crate::dataset::BlobStore;
use crate::error::{AppError, error_response};
use crate::jobs::JobHub;
use crate::paths::DataPaths;
use crate::predictor::Predictor;
use crate::telemetry::Metrics;

/// What every handler can reach. Each field is cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: SqlitePool,
    pub config: Arc<ServeConfig>,
    pub paths: DataPaths,
    /// The image store under `<data-dir>/blobs`.
    pub blobs: BlobStore,
    /// Held shared by uploads until their rows are in, exclusively by blob collection.
    pub blob_lock: BlobLock,
    /// One permit per ingest allowed to run at once (one per CPU): each holds up to an image's
    /// bytes and decoded pixels, so this bounds the memory uploads use together.
    pub ingest_slots: Arc<Semaphore>,
    /// Worker wake-ups, cancellation flags and live job events.
    pub jobs: Arc<JobHub>,
    /// Loaded models and the batching inference thread.
    pub predictor: Predictor,
    pub metrics: Arc<Metrics>,
    /// Digests of the API keys; access control is off when there are none.
    pub api_keys: Arc<auth::ApiKeys>,
}

/// Sets its flag when dropped. A handler's future is dropped when its client disconnects or the
/// request times out; blocking work it started checks the flag and stops early.
pub(crate) struct CancelOnDrop(pub Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One route: its method, its path template (axum syntax, `{id}`), and its handler.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    handler: MethodRouter<AppState>,
    /// Whether `--request-timeout-secs` bounds the handler.
    timed: bool,
}

impl Route {
    /// A `GET` route.
    pub fn get<H: Handler<T, AppState>, T: 'static>(path: &'static str, h: H) -> Self {
        Self { method: Method::GET, path, handler: axum::routing::get(h), timed: true }
    }

    /// A `POST` route.
    pub fn post<H: Handler<T, AppState>, T: 'static>(path: &'static str, h: H) -> Self {
        Self { method: Method::POST, path, handler: axum::routing::post(h), timed: true }
    }

    /// A `DELETE` route.
    pub fn delete<H: Handler<T, AppState>, T: 'static>(path: &'static str, h: H) -> Self {
        Self { method: Method::DELETE, path, handler: axum::routing::delete(h), timed: true }
    }

    /// Lifts axum's default 2 MB body limit, for a handler that streams its body and enforces its
    /// own limit.
    pub fn without_body_limit(mut self) -> Self {
        self.handler = self.handler.layer(DefaultBodyLimit::disable());
        self
    }

    /// Exempts a handler that can legitimately run long from the request timeout; it must bound
    /// its own waits on the client (as uploads do per body chunk).
    pub fn without_timeout(mut self) -> Self {
        self.timed = false;
        self
    }
}

fn all_routes() -> Vec<Route> {
    [health::routes(), docs::routes(), datasets::routes(), jobs::routes(), models::routes(), predict::routes(), metrics::routes()].into_iter().flatten().collect()
}

/// Every (method, path) the router serves, for the OpenAPI consistency test.
pub fn route_table() -> Vec<(Method, &'static str)> {
    all_routes().into_iter().map(|r| (r.method, r.path)).collect()
}

/// The application's router with its layers, ready to serve.
pub fn router(state: AppState) -> Router {
    // Methods of one path are merged first: axum refuses to merge two `MethodRouter`s that both
    // have a fallback, and each path needs exactly one (the 405 answer).
    let mut paths: Vec<(&'static str, MethodRouter<AppState>)> = Vec::new();
    for route in all_routes() {
        let handler = if route.timed {
            route.handler.layer(axum::middleware::from_fn_with_state(state.clone(), request_timeout))
        } else {
            route.handler
        };
        match paths.iter_mut().find(|(path, _)| *path == route.path) {
            Some((_, methods)) => *methods = std::mem::take(methods).merge(handler),
            None => paths.push((route.path, handler)),
        }
    }
    let mut router = Router::new();
    for (path, methods) in paths {
        router = router.route(path, methods.fallback(method_not_allowed));
    }
    let json_limit = state.config.max_json_bytes;
    // Layers run outside in: tracing, request counting (so refusals are counted too), access
    // control (before any body is read), then the body limit.
    router
        .fallback(not_found)
        // Routes that stream large bodies lift this and enforce their own limits.
        .layer(DefaultBodyLimit::max(json_limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key))
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Middleware: 408 with the error body when the handler has not answered within
/// `--request-timeout-secs`. Only the handler is timed: a streamed response body (events, model
/// downloads) flows for as long as it needs once its head is sent.
async fn request_timeout(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let Some(limit) = s.config.request_timeout() else {
        return next.run(req).await;
    };
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => AppError::request_timeout(limit).into_response(),
    }
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "route_not_found", "no such route")
}

async fn method_not_allowed() -> Response {
    error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
        .into_response()
}
