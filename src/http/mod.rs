//! HTTP routes, the shared state handlers see, and the layers around them.
//!
//! Every module exposes `routes()` as a list of [`Route`]s; `router()` mounts them and
//! [`route_table`] lists them, so a test can hold the router and `openapi.yaml` together.

pub mod datasets;
pub mod extract;
pub mod health;

use std::sync::Arc;

use axum::Router;
use axum::handler::Handler;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use sqlx::SqlitePool;
use tower_http::trace::TraceLayer;

use crate::config::ServeConfig;
use crate::error::error_response;
use crate::paths::DataPaths;

/// What every handler can reach. Each field is cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: SqlitePool,
    pub config: Arc<ServeConfig>,
    pub paths: DataPaths,
}

/// One route: its method, its path template (axum syntax, `{id}`), and its handler.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    handler: MethodRouter<AppState>,
}

impl Route {
    /// A `GET` route.
    pub fn get<H: Handler<T, AppState>, T: 'static>(path: &'static str, h: H) -> Self {
        Self { method: Method::GET, path, handler: axum::routing::get(h) }
    }

    /// A `POST` route.
    pub fn post<H: Handler<T, AppState>, T: 'static>(path: &'static str, h: H) -> Self {
        Self { method: Method::POST, path, handler: axum::routing::post(h) }
    }

    /// A `DELETE` route.
    pub fn delete<H: Handler<T, AppState>, T: 'static>(path: &'static str, h: H) -> Self {
        Self { method: Method::DELETE, path, handler: axum::routing::delete(h) }
    }
}

fn all_routes() -> Vec<Route> {
    [health::routes(), datasets::routes()].into_iter().flatten().collect()
}

/// Every (method, path) the router serves, for the OpenAPI consistency test.
pub fn route_table() -> Vec<(Method, &'static str)> {
    all_routes().into_iter().map(|r| (r.method, r.path)).collect()
}

/// The application's router with its layers, ready to serve.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for route in all_routes() {
        // Registering a second method on a path merges it into the same `MethodRouter`.
        router = router.route(route.path, route.handler.fallback(method_not_allowed));
    }
    router.fallback(not_found).layer(TraceLayer::new_for_http()).with_state(state)
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "route_not_found", "no such route")
}

async fn method_not_allowed() -> Response {
    error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
        .into_response()
}
