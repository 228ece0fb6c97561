//! Request bodies in flight, counted against the one memory budget (`--max-inflight-bytes`).
//!
//! A route that buffers its body (JSON, `/predict`'s images) reserves, before reading it, what
//! the body will take at its peak: its declared length (or the route's limit when it has none)
//! times the copies its reader makes. A route that streams its body (a dataset upload, written
//! to disk as it arrives) reserves each chunk for as long as the chunk is held, so it counts what
//! it holds, not its declared size. When the budget stays spent for [`WAIT`], the request gets 429
//! with `Retry-After`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;

use super::AppState;
use super::error::AppError;
use crate::budget::{MemoryBudget, Reservation, WAIT};

/// How often a waiting request looks again.
const POLL: Duration = Duration::from_millis(5);

/// How a route's body is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyUse {
    /// Read whole as JSON (at most `--max-json-bytes`): the bytes, the parsed value and the
    /// typed value may be alive at once.
    Json,
    /// Read whole as images (at most `--max-predict-bytes`): the body and the images cut from it,
    /// and for base64 JSON also the decoded copy.
    Images,
    /// Streamed to disk chunk by chunk.
    Streamed,
}

/// Reserves `bytes`, waiting up to [`WAIT`].
pub async fn reserve(memory: &Arc<MemoryBudget>, bytes: u64) -> Result<Reservation, AppError> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(r) = memory.try_reserve(bytes) {
            return Ok(r);
        }
        if bytes > memory.limit() || Instant::now() >= deadline {
            return Err(over_budget(memory, bytes));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn over_budget(memory: &MemoryBudget, bytes: u64) -> AppError {
    AppError::over_budget(format!(
        "the request needs {bytes} bytes and the service's memory budget for work in flight ({} bytes) is spent; retry shortly",
        memory.limit()
    ))
}

/// What a buffered body takes at its peak: its length (declared, or the route's limit when it
/// is sent without one, chunked in HTTP/1.1 or as frames in HTTP/2) times the copies its reader
/// makes. Only a body known to be empty costs nothing.
fn buffered_cost(req: &Request, limit: u64, copies: u64) -> u64 {
    use axum::body::HttpBody;
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let length = match declared {
        Some(n) => n.min(limit),
        None if req.body().is_end_stream() || req.body().size_hint().exact() == Some(0) => 0,
        None => limit,
    };
    length.saturating_mul(copies)
}

/// Middleware of one route (see the module documentation).
pub async fn count_body(State((s, body_use)): State<(AppState, BodyUse)>, req: Request, next: Next) -> Response {
    match body_use {
        BodyUse::Json | BodyUse::Images => {
            let is_json = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|t| t.starts_with("application/json"));
            let (limit, copies) = match body_use {
                BodyUse::Json => (s.config.max_json_bytes as u64, 3),
                _ => (s.config.max_predict_bytes as u64, if is_json { 3 } else { 2 }),
            };
            let cost = buffered_cost(&req, limit, copies);
            let _held = match reserve(&s.memory, cost).await {
                Ok(held) => held,
                Err(e) => return e.into_response(),
            };
            next.run(req).await
        }
        BodyUse::Streamed => {
            let exhausted = Arc::new(AtomicBool::new(false));
            let req = req.map(|body| counted(body, s.memory.clone(), exhausted.clone()));
            let resp = next.run(req).await;
            // A chunk that found no room ended the body early; whatever the reader made of that,
            // the answer is the budget's.
            if exhausted.load(Ordering::Relaxed) && resp.status() != StatusCode::TOO_MANY_REQUESTS {
                return over_budget(&s.memory, 0).into_response();
            }
            resp
        }
    }
}

/// A chunk of a body and its share of the budget, given back when the chunk (and every slice of
/// it) is dropped.
struct Counted {
    bytes: Bytes,
    _held: Reservation,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// The body with each chunk reserved from the budget for as long as it lives; a chunk that finds
/// no room within [`WAIT`] ends the body with an error and sets `exhausted`.
fn counted(body: Body, memory: Arc<MemoryBudget>, exhausted: Arc<AtomicBool>) -> Body {
    let stream = body.into_data_stream().then(move |chunk| {
        let (memory, exhausted) = (memory.clone(), exhausted.clone());
        async move {
            let chunk = chunk?;
            match reserve(&memory, chunk.len() as u64).await {
                Ok(held) => Ok(Bytes::from_owner(Counted { bytes: chunk, _held: held })),
                Err(e) => {
                    exhausted.store(true, Ordering::Relaxed);
                    Err(axum::Error::new(e))
                }
            }
        }
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;

    use super::*;

    #[test]
    fn a_body_of_unknown_length_costs_the_limit_and_only_an_empty_one_nothing() {
        let request = |body: Body, length: Option<&str>| {
            let mut builder = Request::builder().method("POST").uri("/predict");
            if let Some(n) = length {
                builder = builder.header(header::CONTENT_LENGTH, n);
            }
            builder.body(body).unwrap()
        };
        let stream = || Body::from_stream(futures::stream::iter([Ok::<_, std::io::Error>(vec![0u8; 10])]));
        // As HTTP/2 sends a body: frames, with neither Content-Length nor Transfer-Encoding.
        assert_eq!(buffered_cost(&request(stream(), None), 1000, 2), 2000);
        assert_eq!(buffered_cost(&request(stream(), Some("10")), 1000, 2), 20);
        assert_eq!(buffered_cost(&request(stream(), Some("5000")), 1000, 3), 3000);
        assert_eq!(buffered_cost(&request(Body::empty(), None), 1000, 2), 0);
    }
}
