//! The API description: `openapi.yaml` as written in the repository (a test holds it to the
//! router), and Swagger UI for it, served from files compiled into the binary (no CDN).

use std::sync::{Arc, LazyLock};

use super::extract::ApiPath;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use utoipa_swagger_ui::Config;

use super::Route;
use super::error::AppError;

/// Whether `path` is the API's description or its Swagger UI: served without a key, as they
/// hold no data (Swagger UI's "Authorize" sends the key with the calls it makes).
pub fn is_docs_path(path: &str) -> bool {
    path == "/openapi.yaml" || path == "/docs" || path.starts_with("/docs/")
}

/// The OpenAPI document, exactly as in the repository.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

static CONFIG: LazyLock<Arc<Config<'static>>> = LazyLock::new(|| Arc::new(Config::from("/openapi.yaml")));

/// Swagger UI's page takes its own query parameters, and the documents are files for tools:
/// every route takes any query, as the console's do.
pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/openapi.yaml", openapi), Route::get("/docs", docs_root),
        Route::get("/docs/", docs_index),
        Route::get("/docs/{*file}", docs_file),
    ]
    .into_iter()
    .map(Route::with_query)
    .collect()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml; charset=utf-8")], OPENAPI_YAML).into_response()
}

/// Swagger UI's page loads its assets relative to the folder, so the folder URL is canonical.
async fn docs_root() -> Redirect {
    Redirect::permanent("/docs/")
}

async fn docs_index() -> Result<Response, AppError> {
    serve("index.html")
}

async fn docs_file(ApiPath(file): ApiPath<String>) -> Result<Response, AppError> {
    serve(&file)
}

fn serve(file: &str) -> Result<Response, AppError> {
    match utoipa_swagger_ui::serve(file, CONFIG.clone()) {
        Ok(Some(f)) => Ok(([(header::CONTENT_TYPE, f.content_type)], f.bytes.into_owned()).into_response()),
        Ok(None) => Err(AppError::not_found("documentation file", file)),
        Err(e) => Err(AppError::Internal(anyhow::anyhow!("serving Swagger UI: {e}"))),
    }
}
