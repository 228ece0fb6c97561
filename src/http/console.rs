//! The web console at `/ui/`: pages over the same JSON API, served from files compiled into the
//! binary (`src/http/console/`: plain HTML, CSS and ES modules; no build step, no CDN). Every
//! page is the one shell `index.html`, whose script renders the page its path names. The files
//! need no API key (they hold no data); every datum they show is fetched from the API with the
//! key the console asks for once and keeps in the tab's session storage (never in a URL).

use super::extract::ApiPath;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde_json::json;

use super::Route;
use super::error::AppError;

/// The console's files: name under `/ui/assets/`, content type, content.
const ASSETS: [(&str, &str, &str); 5] = [
    ("app.js", "text/javascript; charset=utf-8", include_str!("console/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_str!("console/api.js")),
    ("charts.js", "text/javascript; charset=utf-8", include_str!("console/charts.js")),
    ("tar.js", "text/javascript; charset=utf-8", include_str!("console/tar.js")),
    ("style.css", "text/css; charset=utf-8", include_str!("console/style.css")),
];

/// The page shell every console path answers with.
const INDEX: &str = include_str!("console/index.html");

/// Pages read their own query (`/ui/new?dataset=…`), and a browser's stray one (a link's
/// tracking parameters) is no reason to refuse the console: every route takes any query.
pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/", root),
        Route::get("/ui", ui_root),
        Route::get("/ui/", page),
        Route::get("/ui/assets/{file}", asset),
        Route::get("/ui/{*page}", page),
    ]
    .into_iter()
    .map(Route::with_query)
    .collect()
}

/// Whether a path is the console's (served without an API key).
pub fn is_console_path(path: &str) -> bool {
    path == "/" || path == "/ui" || path.starts_with("/ui/")
}

/// `/`: a browser is sent to the console; an API client gets where things are.
async fn root(headers: HeaderMap) -> Response {
    let html = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/html"));
    if html {
        return Redirect::to("/ui/").into_response();
    }
    axum::Json(json!({"service": "vitforge", "console": "/ui/", "api": "/openapi.yaml", "docs": "/docs/"})).into_response()
}

/// The console's folder URL is canonical (its assets are addressed from it).
async fn ui_root() -> Redirect {
    Redirect::permanent("/ui/")
}

/// Any console page: the shell, which renders the page its path names.
async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], INDEX).into_response()
}

async fn asset(ApiPath(file): ApiPath<String>) -> Result<Response, AppError> {
    let (_, content_type, body) =
        ASSETS.iter().find(|(name, ..)| *name == file).ok_or_else(|| AppError::not_found("console file", &file))?;
    Ok(([(header::CONTENT_TYPE, *content_type), (header::CACHE_CONTROL, "no-cache")], *body).into_response())
}
