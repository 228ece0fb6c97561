//! Access control: with `--api-key` set, every route but the probes, the console's static files
//! and the API's documentation (which hold no data) needs `Authorization: Bearer <key>`.
//!
//! Keys are kept only as SHA-256 digests. A presented token is digested too and compared with
//! every digest in constant time, so neither the comparison nor the keys' lengths show in the
//! answer's timing.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::config::ApiKey;
use super::error::AppError;

/// Paths answered without a key: orchestrators probe them without credentials. (The console's
/// files and the API's documentation are public too: they hold no data.)
const PUBLIC_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// The digests of the accepted keys; empty when access control is off.
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    /// Digests `keys` (the keys themselves are not kept).
    pub fn new(keys: &[ApiKey]) -> Self {
        Self { digests: keys.iter().map(|k| Sha256::digest(k.expose().as_bytes()).into()).collect() }
    }

    /// Whether any key is configured.
    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Whether `token` is one of the keys. Every digest is compared, whatever matched before.
    pub fn accepts(&self, token: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        for digest in &self.digests {
            found |= digest[..].ct_eq(&presented[..]);
        }
        found.into()
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Middleware: 401 (with `WWW-Authenticate: Bearer`) for a request without a valid key.
pub async fn require_key(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let public = PUBLIC_PATHS.contains(&path) || super::console::is_console_path(path) || super::docs::is_docs_path(path);
    if !s.api_keys.enabled() || public {
        return next.run(req).await;
    }
    match bearer_token(req.headers()) {
        Some(token) if s.api_keys.accepts(token) => next.run(req).await,
        Some(_) => AppError::unauthorized("invalid_api_key", "the API key is not valid").into_response(),
        None => AppError::unauthorized(
            "missing_api_key",
            "this service needs an API key: send 'Authorization: Bearer <key>'",
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn keys(list: &[&str]) -> ApiKeys {
        ApiKeys::new(&list.iter().map(|k| k.parse().unwrap()).collect::<Vec<ApiKey>>())
    }

    #[test]
    fn any_configured_key_is_accepted_and_nothing_else() {
        let k = keys(&["alpha-key-0123456789", "beta-key-0123456789"]);
        assert!(k.enabled());
        assert!(k.accepts("alpha-key-0123456789"));
        assert!(k.accepts("beta-key-0123456789"));
        for wrong in ["", "alpha-key-012345678", "alpha-key-01234567890", "ALPHA-KEY-0123456789", "beta"] {
            assert!(!k.accepts(wrong), "{wrong}");
        }
        assert!(!keys(&[]).enabled());
        assert!(!keys(&[]).accepts(""));
    }

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert_eq!(bearer_token(&with("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&with("bearer   abc  ")), Some("abc"));
        assert_eq!(bearer_token(&with("Basic abc")), None);
        assert_eq!(bearer_token(&with("Bearer ")), None);
        assert_eq!(bearer_token(&with("Bearerabc")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }
}
