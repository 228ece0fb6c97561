//! HTTP routes, the shared state handlers see, and the layers around them.
//!
//! Every module with endpoints exposes `routes()` as a list of [`Route`]s; `router()` mounts them and
//! [`route_table`] lists them, so a test can hold the router and `openapi.yaml` together.

pub mod aliases;
pub mod auth;
pub mod base_models;
pub mod console;
pub mod datasets;
pub mod docs;
pub mod error;
pub mod extract;
pub mod health;
pub mod inflight;
pub mod jobs;
pub mod linger;
pub mod models;
pub mod paged;
pub mod predict;
pub mod progress;
pub mod prometheus;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::handler::Handler;
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use crate::db::Pool;
use tokio::sync::Semaphore;
use tower_http::trace::TraceLayer;

use crate::blob_gc::BlobLock;
use crate::budget::MemoryBudget;
use crate::config::ServeConfig;
use crate::dataset::IngestLimits;
use crate::objects::Objects;
use crate::paths::DataPaths;
use crate::predictor::Predictor;
use crate::registry::ModelRegistry;
use crate::telemetry::ServiceMetrics;
use crate::worker::hub::JobHub;
use error::AppError;

/// What every handler can reach. Each field is cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: Pool,
    pub config: Arc<ServeConfig>,
    pub paths: DataPaths,
    /// The bytes: image blobs, checkpoints and models (the data folder, or an object store with
    /// the data folder as a cache).
    pub objects: Objects,
    /// Held shared by uploads until their rows are in, exclusively by blob collection.
    pub blob_lock: BlobLock,
    /// One permit per ingest allowed to run at once (one per CPU): each holds up to an image's
    /// bytes and decoded pixels, so this bounds the memory uploads use together.
    pub ingest_slots: Arc<Semaphore>,
    /// What one upload may unpack.
    pub ingest_limits: IngestLimits,
    /// Worker wake-ups, cancellation flags and live job events.
    pub jobs: Arc<JobHub>,
    /// Loaded models and the batching inference thread.
    pub predictor: Predictor,
    /// Registers, deletes and chooses fine-tuned models.
    pub models: ModelRegistry,
    pub metrics: Arc<ServiceMetrics>,
    /// Digests of the API keys; access control is off when there are none.
    pub api_keys: Arc<auth::ApiKeys>,
    /// The budget of bytes in flight: request bodies, upload entries, image decodes.
    pub memory: Arc<MemoryBudget>,
    /// One permit: `POST /models/{id}/evaluate` runs one evaluation at a time.
    pub evaluations: Arc<Semaphore>,
    /// The memory this process's workers run every job it queues within, where it knows that
    /// (`--role all` with CPU workers and `--max-job-memory`): `POST /jobs` refuses a job whose
    /// training step cannot fit.
    pub job_memory: Option<crate::worker::submit::JobMemory>,
}

/// One route: its method, its path template (axum syntax, `{id}`), and its handler.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    handler: MethodRouter<AppState>,
    /// Whether `--request-timeout-secs` bounds the handler.
    timed: bool,
    /// How the body is held, for the memory budget.
    body: inflight::BodyUse,
    /// Whether the handler reads the query (or its page's script does); any query parameter of
    /// a route that does not is refused, 422 `invalid_query`, rather than ignored.
    query: bool,
}

impl Route {
    /// A `GET` route.
    pub fn get<H: Handler<T, AppState>, T: 'static>(path: &'static str, h: H) -> Self {
        Self { method: Method::GET, path, handler: axum::routing::get(h), timed: true, body: inflight::BodyUse::Json, query: false }
    }

    /// A `POST` route.
    pub fn post<H: Handler<T, AppState>, T: 'static>(path: &'static str, h: H) -> Self {
        Self { method: Method::POST, path, handler: axum::routing::post(h), timed: true, body: inflight::BodyUse::Json, query: false }
    }

    /// A `PUT` route.
    pub fn put<H: Handler<T, AppState>, T: 'static>(path: &'static str, h: H) -> Self {
        Self { method: Method::PUT, path, handler: axum::routing::put(h), timed: true, body: inflight::BodyUse::Json, query: false }
    }

    /// A `DELETE` route.
    pub fn delete<H: Handler<T, AppState>, T: 'static>(path: &'static str, h: H) -> Self {
        Self { method: Method::DELETE, path, handler: axum::routing::delete(h), timed: true, body: inflight::BodyUse::Json, query: false }
    }

    /// Lifts axum's default 2 MB body limit, for a handler that streams its body and enforces its
    /// own limit.
    pub fn without_body_limit(mut self) -> Self {
        self.handler = self.handler.layer(DefaultBodyLimit::disable());
        self
    }

    /// Declares how the handler holds its body (default: read whole as JSON).
    pub fn body(mut self, body: inflight::BodyUse) -> Self {
        self.body = body;
        self
    }

    /// Declares that the handler reads the query: its parameters are its own to check.
    pub fn with_query(mut self) -> Self {
        self.query = true;
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
    [
        health::routes(),
        docs::routes(),
        datasets::routes(),
        jobs::routes(),
        base_models::routes(),
        models::routes(),
        aliases::routes(),
        predict::routes(),
        prometheus::routes(),
        console::routes(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The routes of a `--role worker` process: the probes and the metrics.
fn worker_routes() -> Vec<Route> {
    [health::routes(), prometheus::routes()].into_iter().flatten().collect()
}

/// Every (method, path) the router serves, for the OpenAPI consistency test.
pub fn route_table() -> Vec<(Method, &'static str)> {
    all_routes().into_iter().map(|r| (r.method, r.path)).collect()
}

/// The (method, path) of the routes that take no query parameters (and refuse any).
pub fn routes_without_query() -> Vec<(Method, &'static str)> {
    all_routes().into_iter().filter(|r| !r.query).map(|r| (r.method, r.path)).collect()
}

/// The application's router with its layers, ready to serve.
pub fn router(state: AppState) -> Router {
    // Methods of one path are merged first: axum refuses to merge two `MethodRouter`s that both
    // have a fallback, and each path needs exactly one (the 405 answer).
    let mut paths: Vec<(&'static str, MethodRouter<AppState>)> = Vec::new();
    let routes = if state.config.role.serves_api() { all_routes() } else { worker_routes() };
    for route in routes {
        let handler = route.handler.layer(axum::middleware::from_fn_with_state((state.clone(), route.body), inflight::count_body));
        let handler = if route.timed {
            handler.layer(axum::middleware::from_fn_with_state(state.clone(), request_timeout))
        } else {
            handler
        };
        // Outermost: a refused query costs no body and no time.
        let handler = if route.query { handler } else { handler.layer(axum::middleware::from_fn(extract::refuse_query)) };
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
        .layer(axum::middleware::from_fn_with_state(state.clone(), prometheus::track))
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

async fn not_found() -> AppError {
    AppError::no_route()
}

async fn method_not_allowed() -> AppError {
    AppError::method_not_allowed()
}
