//! Long requests that report their progress as they go (an upload's check, an evaluation): a
//! client that sends `Accept: text/event-stream` gets 200 at once, the work's progress as
//! Server-Sent Events, then its outcome; any other client gets the outcome alone, as a plain
//! answer, once the work is done.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::watch;

use super::error::AppError;

/// How often, at most, a stream reports progress.
pub const EVERY: Duration = Duration::from_millis(250);

/// Whether the request's `Accept` names `text/event-stream` (a wildcard does not).
pub fn wants_events(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| range.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("text/event-stream"))
}

/// Answers with `work`'s outcome: `status` and its JSON (or its error) once it is done; or, with
/// `events`, 200 at once and a stream of `progress` events (what `progress` holds, at most one
/// each [`EVERY`] and only when it changed, the last one always sent before the end), then one
/// `outcome` event with the JSON, or an `error` event with the error's body and the `status` it
/// would have been answered with. The stream drives `work`, so a client that goes away stops it
/// either way, as dropping a request's future does.
pub async fn answer<T, P>(
    events: bool,
    status: StatusCode,
    outcome: &'static str,
    work: impl Future<Output = Result<T, AppError>> + Send + 'static,
    progress: watch::Receiver<P>,
) -> Response
where
    T: Serialize + Send + 'static,
    P: Serialize + Copy + PartialEq + Send + Sync + 'static,
{
    if !events {
        return match work.await {
            Ok(value) => (status, Json(value)).into_response(),
            Err(e) => e.into_response(),
        };
    }
    Sse::new(stream(work, progress, outcome)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

fn stream<T, P>(
    work: impl Future<Output = Result<T, AppError>> + Send + 'static,
    progress: watch::Receiver<P>,
    outcome: &'static str,
) -> impl futures::Stream<Item = Result<Event, Infallible>>
where
    T: Serialize + Send + 'static,
    P: Serialize + Copy + PartialEq + Send + Sync + 'static,
{
    enum State<W, P> {
        Running { work: std::pin::Pin<Box<W>>, progress: watch::Receiver<P>, sent: Option<P> },
        Ending(Event),
        Ended,
    }
    let event = |p: P| Event::default().event("progress").data(serde_json::to_string(&p).unwrap_or_default());
    futures::stream::unfold(State::Running { work: Box::pin(work), progress, sent: None }, move |state| async move {
        let (mut work, progress, sent) = match state {
            State::Running { work, progress, sent } => (work, progress, sent),
            State::Ending(last) => return Some((Ok(last), State::Ended)),
            State::Ended => return None,
        };
        loop {
            tokio::select! {
                done = &mut work => {
                    let last = last_event(done, outcome).await;
                    let now = *progress.borrow();
                    return Some(if sent == Some(now) { (Ok(last), State::Ended) } else { (Ok(event(now)), State::Ending(last)) });
                }
                _ = tokio::time::sleep(EVERY) => {
                    let now = *progress.borrow();
                    if sent != Some(now) {
                        return Some((Ok(event(now)), State::Running { work, progress, sent: Some(now) }));
                    }
                }
            }
        }
    })
}

/// The last event of a stream: `outcome` with the JSON, or `error` with the body and the
/// `status` the error is answered with without a stream.
async fn last_event<T: Serialize>(done: Result<T, AppError>, outcome: &'static str) -> Event {
    match done {
        Ok(value) => Event::default().event(outcome).data(serde_json::to_string(&value).unwrap_or_default()),
        Err(e) => {
            let answer = e.into_response();
            let status = answer.status().as_u16();
            let body = axum::body::to_bytes(answer.into_body(), 1 << 20).await.unwrap_or_default();
            let mut value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|_| serde_json::json!({}));
            value["status"] = status.into();
            Event::default().event("error").data(value.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_accept_naming_event_streams_asks_for_them() {
        let with = |accept: &[&str]| {
            let mut headers = HeaderMap::new();
            for a in accept {
                headers.append(header::ACCEPT, a.parse().unwrap());
            }
            wants_events(&headers)
        };
        assert!(with(&["text/event-stream"]));
        assert!(with(&["application/json, Text/Event-Stream;q=0.9"]));
        assert!(with(&["application/json", "text/event-stream"]));
        assert!(!with(&[]));
        assert!(!with(&["*/*"]));
        assert!(!with(&["text/*"]));
        assert!(!with(&["application/json"]));
    }
}
