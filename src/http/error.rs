//! The one error type at the HTTP edge, and the only place where error status codes are chosen:
//! handlers and middleware build errors with the constructors below, and the errors of the layers
//! beneath (ingest, job submission, prediction, evaluation) are mapped here. (`extract.rs` passes
//! on the status that axum's own rejections carry, such as 413 for a body over the limit.)
//!
//! Client errors carry a stable `code` and a human sentence; internal errors are logged with their
//! full chain and answered with a bare "internal error" so nothing internal leaks to clients.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::dataset::IngestError;
use crate::dataset::edits::EditError;
use crate::model::classifier::ClassifyError;
use crate::predictor::PredictError;
use crate::train::eval::EvalError;
use crate::worker::submit::SubmitError;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The client sent something we refuse; the message says what.
    #[error("{message}")]
    Client { status: StatusCode, code: &'static str, message: String },
    /// A database failure (a bug or a broken disk, never the client's fault).
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// Anything else that went wrong inside.
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

/// Response body of every error: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The inner object of [`ErrorBody`].
#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl AppError {
    /// A client error with an explicit status.
    pub fn client(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self::Client { status, code, message: message.into() }
    }

    /// 400: the request is malformed.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::client(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 for the resource `what` (e.g. "dataset") with this id.
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::client(StatusCode::NOT_FOUND, "not_found", format!("{what} '{id}' does not exist"))
    }

    /// 409: the request conflicts with the current state.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::client(StatusCode::CONFLICT, code, message)
    }

    /// 408: the request took longer than the limit.
    pub fn request_timeout(limit: std::time::Duration) -> Self {
        Self::client(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request was not completed within {} s", limit.as_secs()),
        )
    }

    /// 413: too large.
    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        Self::client(StatusCode::PAYLOAD_TOO_LARGE, code, message)
    }

    /// 415: a body of a type we do not read.
    pub fn unsupported_media(code: &'static str, message: impl Into<String>) -> Self {
        Self::client(StatusCode::UNSUPPORTED_MEDIA_TYPE, code, message)
    }

    /// 401: no valid API key.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::client(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 503: the service cannot answer now (its database does not answer).
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::client(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// 404 for a path no route serves.
    pub fn no_route() -> Self {
        Self::client(StatusCode::NOT_FOUND, "route_not_found", "no such route")
    }

    /// 405 for a method a route does not serve.
    pub fn method_not_allowed() -> Self {
        Self::client(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
    }

    /// 429 (with `Retry-After`): the memory budget for work in flight is spent.
    pub fn over_budget(message: impl Into<String>) -> Self {
        Self::client(StatusCode::TOO_MANY_REQUESTS, "over_memory_budget", message)
    }

    /// 422: well-formed but semantically invalid.
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::client(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Client { status, .. } => *status,
            Self::Db(e) if database_unreachable(e) => StatusCode::SERVICE_UNAVAILABLE,
            _ if self.disk_full() => StatusCode::INSUFFICIENT_STORAGE,
            Self::Db(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether this failed for want of disk space: a write of the data folder (or of the object
    /// store's cache in it) with no space or quota left, or a database whose disk is full. Not
    /// the client's fault, but not a bug either: answered 507 saying so (uploads and jobs clean up
    /// after a failed write as after any other, so nothing half-written stays).
    pub fn disk_full(&self) -> bool {
        match self {
            Self::Client { .. } => false,
            Self::Db(e) => database_full(e),
            Self::Internal(e) => e.chain().any(|cause| {
                cause.downcast_ref::<std::io::Error>().is_some_and(io_full) || cause.downcast_ref::<sqlx::Error>().is_some_and(database_full)
            }),
        }
    }
}

/// Whether an I/O error is a full disk or a spent quota (ENOSPC, EDQUOT).
fn io_full(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

/// Whether a database refused a write for want of space: SQLite's SQLITE_FULL (13), PostgreSQL's
/// disk_full (53100).
fn database_full(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.code().is_some_and(|c| matches!(c.as_ref(), "13" | "53100")),
        sqlx::Error::Io(io) => io_full(io),
        _ => false,
    }
}

/// Whether a database error means the database cannot be reached (stopped, restarting, the
/// network gone) rather than a bug: answered 503, and the request can be retried.
fn database_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(io) if io_full(io) => false,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        // PostgreSQL: 08 connection exception, 57P01-57P03 shut down or starting up.
        sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("08") || matches!(c.as_ref(), "57P01" | "57P02" | "57P03")),
        _ => false,
    }
}

/// Builds the JSON error response for a status, code and message.
fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = ErrorBody { error: ErrorDetail { code: code.to_string(), message: message.into() } };
    (status, Json(body)).into_response()
}

impl From<EditError> for AppError {
    fn from(e: EditError) -> Self {
        let code = match e {
            EditError::UnknownImage { .. } => "unknown_image",
            EditError::RemovedAndChanged { .. } => "conflicting_edits",
            EditError::UnfitLabel { .. } => "invalid_label",
            EditError::NoImages => "no_images",
            EditError::TooFewClasses(_) => "too_few_classes",
            EditError::NothingNew(_) => "no_new_images",
        };
        Self::unprocessable(code, e.to_string())
    }
}

impl From<IngestError> for AppError {
    fn from(e: IngestError) -> Self {
        let message = e.to_string();
        match e {
            IngestError::Unsupported(_) => Self::unsupported_media("unsupported_format", message),
            IngestError::Corrupt(_) => Self::bad_request("corrupt_archive", message),
            IngestError::InvalidParquet(_) => Self::unprocessable("invalid_parquet", message),
            IngestError::TooManyEntries(_) => Self::too_large("too_many_entries", message),
            IngestError::TooLarge(_) => Self::too_large("extracted_too_large", message),
            IngestError::NoImages { .. } => Self::unprocessable("no_images", message),
            IngestError::TooFewClasses { .. } => Self::unprocessable("too_few_classes", message),
            IngestError::EmptyClass { .. } => Self::unprocessable("empty_class", message),
            // Only reached when the client has gone; nobody reads this answer.
            IngestError::Cancelled => Self::client(StatusCode::SERVICE_UNAVAILABLE, "cancelled", message),
            IngestError::OverBudget(_) => Self::over_budget(message),
            IngestError::Io(e) => Self::Internal(anyhow::Error::new(e).context("dataset ingest")),
        }
    }
}

impl From<SubmitError> for AppError {
    fn from(e: SubmitError) -> Self {
        let message = e.to_string();
        match e {
            SubmitError::InvalidField(_) => Self::unprocessable("invalid_field", message),
            SubmitError::InvalidParams(_) => Self::unprocessable("invalid_params", message),
            SubmitError::BaseModel(_) => Self::unprocessable("invalid_base_model", message),
            SubmitError::UnknownDataset(id) => Self::not_found("dataset", &id),
            SubmitError::TooLarge(_) => Self::unprocessable("job_too_large", message),
            SubmitError::Db(e) => Self::Db(e),
        }
    }
}

impl From<PredictError> for AppError {
    fn from(e: PredictError) -> Self {
        match e {
            PredictError::Overloaded => {
                Self::client(StatusCode::TOO_MANY_REQUESTS, "overloaded", "too many prediction requests in flight; retry shortly")
            }
            PredictError::NoModel => Self::conflict(
                "no_model",
                "no fine-tuned model yet: upload a dataset (POST /datasets) and run a fine-tune (POST /jobs); \
                 /predict uses the newest model once its job succeeds",
            ),
            PredictError::UnknownModel(id) => Self::not_found("model", &id),
            PredictError::Classify(ClassifyError::Image { .. }) => Self::bad_request("invalid_image", e.to_string()),
            PredictError::Classify(ClassifyError::Busy(message)) => Self::over_budget(message),
            PredictError::Classify(ClassifyError::TooLarge(message)) => Self::too_large("images_too_large", message),
            // Only reached when the client has gone; nobody reads this answer.
            PredictError::Classify(ClassifyError::Cancelled) => {
                Self::client(StatusCode::SERVICE_UNAVAILABLE, "cancelled", "the request was abandoned")
            }
            PredictError::Fetch(e) => Self::Internal(e),
            other => Self::Internal(anyhow::anyhow!(other)),
        }
    }
}

impl From<EvalError> for AppError {
    fn from(e: EvalError) -> Self {
        let message = e.to_string();
        match e {
            EvalError::UnknownClasses { .. } => Self::unprocessable("unknown_classes", message),
            EvalError::EmptySplit => Self::unprocessable("empty_split", message),
            EvalError::Train(e) => Self::Internal(anyhow::Error::new(e).context("evaluation")),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            Self::Client { status, code, message } => {
                let mut resp = error_response(status, code, message);
                if status == StatusCode::UNAUTHORIZED {
                    // RFC 6750: a 401 names the scheme the client should use.
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"vitforge\""));
                }
                if status == StatusCode::TOO_MANY_REQUESTS {
                    // Overload and a spent memory budget pass within a second or two.
                    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                }
                resp
            }
            Self::Db(e) if database_unreachable(&e) => {
                tracing::warn!(error = %e, "the database does not answer");
                let mut resp = error_response(StatusCode::SERVICE_UNAVAILABLE, "database_unavailable", "the database does not answer; retry shortly");
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
                resp
            }
            ref full if full.disk_full() => {
                tracing::error!(error = ?full, "a write failed: the disk is full");
                error_response(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient_storage",
                    "the service's disk is full (no space left for the data folder or the database), so this request could not be carried out; free space and retry",
                )
            }
            Self::Internal(e) if e.downcast_ref::<crate::objects::StoreFailed>().is_some() => {
                tracing::warn!(error = format!("{e:#}"), "the object store failed");
                let mut resp =
                    error_response(StatusCode::SERVICE_UNAVAILABLE, "object_store_unavailable", "the object store does not answer or refused a request; retry shortly");
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
                resp
            }
            other => {
                tracing::error!(error = ?other, "request failed");
                error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    async fn answer(e: AppError) -> (StatusCode, String) {
        let status = e.status();
        let resp = e.into_response();
        assert_eq!(resp.status(), status, "status() and the answer agree");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        (status, body["error"]["code"].as_str().unwrap().to_string())
    }

    /// A full disk or a spent quota, met anywhere in an error's chain or as a database's own
    /// refusal, is 507 `insufficient_storage`; other I/O errors stay 500.
    #[tokio::test]
    async fn a_full_disk_is_507_and_other_failures_are_not() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = AppError::Internal(anyhow::Error::new(full).context("writing upload scratch file").context("dataset ingest"));
        assert_eq!(answer(e).await, (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage".into()));
        let quota = std::io::Error::from_raw_os_error(libc::EDQUOT);
        assert_eq!(answer(AppError::Internal(quota.into())).await.0, StatusCode::INSUFFICIENT_STORAGE);
        let denied = std::io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(answer(AppError::Internal(anyhow::Error::new(denied).context("x"))).await, (StatusCode::INTERNAL_SERVER_ERROR, "internal".into()));

        // SQLite's own "database or disk is full", from a real database held to a few pages.
        let mut db = sqlx::SqliteConnection::connect("sqlite::memory:").await.unwrap();
        sqlx::query("create table t (x blob)").execute(&mut db).await.unwrap();
        sqlx::query("pragma max_page_count = 3").execute(&mut db).await.unwrap();
        let refused = sqlx::query("insert into t values (zeroblob(100000))").execute(&mut db).await.unwrap_err();
        assert!(refused.to_string().contains("full"), "{refused}");
        assert_eq!(answer(AppError::Db(refused)).await, (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage".into()));
        let other = sqlx::query("insert into nowhere values (1)").execute(&mut db).await.unwrap_err();
        assert_eq!(answer(AppError::Db(other)).await.0, StatusCode::INTERNAL_SERVER_ERROR);
        // A database error inside another error's chain (a job's submit, say) counts as well.
        let refused = sqlx::query("insert into t values (zeroblob(100000))").execute(&mut db).await.unwrap_err();
        assert_eq!(answer(AppError::Internal(anyhow::Error::new(refused).context("storing"))).await.0, StatusCode::INSUFFICIENT_STORAGE);
    }
}
