//! `/aliases`: names that point at a model, for `/predict?model=<name>`. A client keeps calling
//! one name (`production`) while the model behind it is replaced by a `PUT`, which takes effect
//! for the next request; unlike the default (the newest model), a name moves only when told to.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;

use super::error::AppError;
use super::extract::{ApiJson, ApiPath};
use super::{AppState, Route};
use crate::db;
use crate::db::aliases::{Alias, Put};

pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/aliases", list),
        Route::get("/aliases/{name}", get),
        Route::put("/aliases/{name}", put),
        Route::delete("/aliases/{name}", delete),
    ]
}

/// Longest alias name, in bytes.
const MAX_NAME: usize = 64;

/// An alias name: 1–64 ASCII letters, digits, `.`, `_` and `-`, starting with a letter or a
/// digit, and not shaped like a model's id (a UUID), which `/predict?model=` reads first.
fn check_name(name: &str) -> Result<(), AppError> {
    let refuse = |why: &str| Err(AppError::unprocessable("invalid_alias", format!("alias name '{}' {why}", name.escape_debug())));
    if name.is_empty() || name.len() > MAX_NAME {
        return refuse(&format!("must be 1 to {MAX_NAME} characters long"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return refuse("may hold only ASCII letters, digits, '.', '_' and '-'");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return refuse("must start with a letter or a digit");
    }
    if uuid::Uuid::try_parse(name).is_ok() {
        return refuse("has the shape of a model id");
    }
    Ok(())
}

async fn list(State(s): State<AppState>) -> Result<Json<Vec<Alias>>, AppError> {
    Ok(Json(db::aliases::list(&s.db).await?))
}

async fn get(State(s): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Json<Alias>, AppError> {
    db::aliases::get(&s.db, &name).await?.map(Json).ok_or_else(|| AppError::not_found("alias", &name))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutAlias {
    model_id: String,
}

/// Points the name at a model: 201 when the name is new, 200 when it moved (or stayed).
async fn put(State(s): State<AppState>, ApiPath(name): ApiPath<String>, ApiJson(body): ApiJson<PutAlias>) -> Result<(StatusCode, Json<Alias>), AppError> {
    check_name(&name)?;
    match db::aliases::put(&s.db, &name, &body.model_id).await? {
        Put::Created(alias) => Ok((StatusCode::CREATED, Json(alias))),
        Put::Moved(alias) => Ok((StatusCode::OK, Json(alias))),
        Put::NoModel => Err(AppError::not_found("model", &body.model_id)),
    }
}

async fn delete(State(s): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<StatusCode, AppError> {
    if db::aliases::delete(&s.db, &name).await? { Ok(StatusCode::NO_CONTENT) } else { Err(AppError::not_found("alias", &name)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_names_are_checked() {
        for ok in ["production", "pets-v2", "a", "v1.2_rc", &"x".repeat(64)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".hidden", "two words", "é", "a/b", &"x".repeat(65), "01938a6e-8c1f-7d2a-9b3e-5f0a1c2d3e4f"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
