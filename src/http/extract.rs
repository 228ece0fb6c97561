//! Extractors that answer malformed input with the service's JSON error body instead of axum's
//! plain-text rejections.

use axum::extract::{FromRequest, Request};
use axum::extract::FromRequestParts;
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::AppError;

/// `axum::Json` with errors in our format: 415 without a JSON content type, 400 for a syntax
/// error, 422 naming the field for a value of the wrong shape, 413 for a body over the limit.
///
/// A number with no fractional part (`3.0`, `1e3`) is read as an integer, as JSON Schema (and so
/// `openapi.yaml`) counts it one: serde would otherwise refuse `"epochs": 3.0`, a body the
/// published schema calls valid (schemathesis found it).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        // Content type, size limit and syntax are checked here; nesting is capped by serde_json.
        let axum::Json(mut value) = axum::Json::<serde_json::Value>::from_request(req, state).await?;
        // Every JSON body of this API is an object: say so, rather than serde's "invalid length
        // 0, expected struct JobRequest with 4 elements" for `[]`.
        if let Some(refused) = not_an_object(&value) {
            return Err(refused);
        }
        if let Some(at) = nul_in(&value, "") {
            return Err(AppError::unprocessable("invalid_field", format!("{at} contains a NUL character (\\u0000)")));
        }
        integral_floats_as_integers(&mut value);
        serde_path_to_error::deserialize(value).map(ApiJson).map_err(|e| AppError::unprocessable("invalid_field", field_error(&e)))
    }
}

/// A value of the wrong shape, named by its path in the body (`params.epochs: invalid type: …`).
/// Read from the parsed value, so the message carries no line and column: they would count in a
/// re-serialised copy, not in the body the client sent.
fn field_error(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    match e.path().to_string().as_str() {
        "." => e.inner().to_string(),
        path => format!("{path}: {}", e.inner()),
    }
}

/// The refusal of a body that is not an object, naming what it is (`an array`, `a string`…).
pub(crate) fn not_an_object(value: &serde_json::Value) -> Option<AppError> {
    use serde_json::Value;
    let kind = match value {
        Value::Object(_) => return None,
        Value::Array(_) => "an array",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
    };
    Some(AppError::unprocessable("invalid_field", format!("the body must be a JSON object, not {kind}")))
}

/// Where `value` holds a string (or a key) with a NUL character, as `body`, `body.name` or
/// `body.items[2]`: no field takes one, and PostgreSQL cannot store one.
fn nul_in(value: &serde_json::Value, at: &str) -> Option<String> {
    use serde_json::Value;
    let here = || if at.is_empty() { "the body".to_string() } else { at.to_string() };
    match value {
        Value::String(s) if s.contains('\0') => Some(here()),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| nul_in(v, &format!("{at}[{i}]"))),
        Value::Object(fields) => fields.iter().find_map(|(k, v)| {
            let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
            if k.contains('\0') { Some(format!("a key of {}", here())) } else { nul_in(v, &path) }
        }),
        _ => None,
    }
}

/// Replaces every float with no fractional part that fits an `i64` or a `u64` by that integer.
fn integral_floats_as_integers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // 2^64 and -2^63 are exact in f64, so these bounds make the casts below exact.
            if f.fract() == 0.0 && (-9_223_372_036_854_775_808.0..18_446_744_073_709_551_616.0).contains(&f) {
                *value = if f < 0.0 { Value::from(f as i64) } else { Value::from(f as u64) };
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        Value::Object(fields) => fields.values_mut().for_each(integral_floats_as_integers),
        _ => {}
    }
}

/// `axum::extract::Query` with errors in our format (422 naming the parameter); a NUL
/// character (`%00`) is refused, as no parameter takes one.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        if parts.uri.query().is_some_and(has_nul) {
            return Err(AppError::unprocessable("invalid_query", "the query contains a NUL character (%00)"));
        }
        Ok(Self(axum::extract::Query::<T>::from_request_parts(parts, state).await?.0))
    }
}

/// Whether a raw path or query decodes to a NUL character (a literal one cannot be in a URI).
fn has_nul(raw: &str) -> bool {
    raw.as_bytes().windows(3).any(|w| w == b"%00")
}

/// Middleware of the routes that take no query parameters ([`super::Route::with_query`]): any
/// parameter is refused (422 `invalid_query`, naming it), so a misspelt or unsupported one
/// (`?limit=5`, `?force=true`) is not silently ignored. An empty query (`?`) is none.
pub async fn refuse_query(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Some(query) = req.uri().query().filter(|q| !q.is_empty()) else {
        return next.run(req).await;
    };
    let pairs = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(req.uri()).map(|q| q.0).unwrap_or_default();
    let name = pairs.into_iter().map(|(name, _)| name).next().unwrap_or_else(|| query.split(['=', '&']).next().unwrap_or_default().to_string());
    AppError::unprocessable("invalid_query", format!("unknown query parameter `{name}`: this operation takes no query parameters")).into_response()
}

/// `axum::extract::Path` with errors in our format; a NUL character (`%00`) is refused (400
/// `invalid_path`), as no id or name holds one.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        if has_nul(parts.uri.path()) {
            return Err(AppError::bad_request("invalid_path", "the path contains a NUL character (%00)"));
        }
        Ok(Self(axum::extract::Path::<T>::from_request_parts(parts, state).await?.0))
    }
}

impl From<JsonRejection> for AppError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let code = match rejection {
            JsonRejection::JsonDataError(_) => "invalid_field",
            JsonRejection::JsonSyntaxError(_) => "invalid_json",
            JsonRejection::MissingJsonContentType(_) => "expected_json",
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            _ => "invalid_body",
        };
        AppError::client(status, code, rejection.body_text())
    }
}

impl From<QueryRejection> for AppError {
    fn from(rejection: QueryRejection) -> Self {
        // axum's message is "Failed to deserialize query string: <parameter>: <why>"; the
        // parameter and why, as the JSON bodies' errors say it.
        let text = rejection.body_text();
        let message = text.strip_prefix("Failed to deserialize query string: ").unwrap_or(&text);
        AppError::unprocessable("invalid_query", message)
    }
}

impl From<PathRejection> for AppError {
    fn from(rejection: PathRejection) -> Self {
        AppError::bad_request("invalid_path", rejection.body_text())
    }
}

impl From<MultipartRejection> for AppError {
    fn from(rejection: MultipartRejection) -> Self {
        AppError::unsupported_media(
            "expected_multipart",
            format!("expected a multipart/form-data body ({})", rejection.body_text()),
        )
    }
}

impl From<MultipartError> for AppError {
    fn from(e: MultipartError) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AppError::too_large("upload_too_large", e.body_text())
        } else {
            AppError::bad_request("invalid_multipart", format!("the multipart body is malformed: {}", e.body_text()))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn integral_floats_become_integers_and_others_stay() {
        let mut v = json!({"a": 302.0, "b": [-4.0, 1.5, 1e300], "c": {"d": 1e3, "e": "7.0"}, "f": 18446744073709551615u64});
        super::integral_floats_as_integers(&mut v);
        assert_eq!(v, json!({"a": 302, "b": [-4, 1.5, 1e300], "c": {"d": 1000, "e": "7.0"}, "f": 18446744073709551615u64}));
        assert!(v["a"].is_u64() && v["b"][0].is_i64() && v["b"][2].is_f64());
    }
}
