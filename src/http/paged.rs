//! Pages of the lists `GET /datasets`, `/jobs` and `/models`: `?limit=N` answers at most N items
//! (newest first, as the whole list), and when more follow, a `Link` header (RFC 8288) names the
//! next page's URL, `rel="next"`, with an opaque `cursor`. Without `limit` a list is answered
//! whole, as before pages existed.

use axum::Json;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::error::AppError;
use crate::db::{Listed, Page};

/// The query of a list with no other parameters.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// The page that a list's `limit` and `cursor` parameters name (422 `invalid_query` for a limit
/// out of range or a cursor this service did not give).
pub fn page(limit: Option<u32>, cursor: Option<&str>) -> Result<Page, AppError> {
    Page::parse(limit, cursor).map_err(|e| AppError::unprocessable("invalid_query", e))
}

/// `listed` as its JSON array, with the `Link` to the next page when there is one. `path` is the
/// list's path, `query` the list's other parameters as given (kept in the next page's URL as
/// they are, so plain words only: a status name).
pub fn answer<T: Serialize>(path: &str, query: &[(&str, &str)], page: &Page, listed: Listed<T>) -> Response {
    let link = match (&listed.next, page.limit) {
        (Some(next), Some(limit)) => {
            let mut url = format!("{path}?");
            for (name, value) in query {
                url.push_str(&format!("{name}={value}&"));
            }
            url.push_str(&format!("limit={limit}&cursor={}", next.encode()));
            HeaderValue::from_str(&format!("<{url}>; rel=\"next\"")).ok()
        }
        _ => None,
    };
    let mut response = Json(listed.rows).into_response();
    if let Some(link) = link {
        response.headers_mut().insert(header::LINK, link);
    }
    response
}
