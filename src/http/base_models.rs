//! `GET /base-models`: what a job can start from besides the service's own models (`GET
//! /models`): the local base models folder, and the hub ids jobs have used.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::error::AppError;
use super::{AppState, Route};
use crate::db;
use crate::model::io::is_hub_id;
use crate::worker::submit::{DEFAULT_BASE_MODEL, local_base_models};

pub fn routes() -> Vec<Route> {
    vec![Route::get("/base-models", list)]
}

/// How many recently used hub ids are listed.
const RECENT: u32 = 20;

/// `{"default", "local": [names], "hub": [ids]}`: the default base model, the folders of the base
/// models folder, and the hub ids recent jobs named (the default first when no job has).
async fn list(State(s): State<AppState>) -> Result<Json<Value>, AppError> {
    let dir = s.config.base_models_dir();
    let local = tokio::task::spawn_blocking(move || local_base_models(&dir)).await.map_err(anyhow::Error::from)?;
    let mut hub: Vec<String> = Vec::new();
    for name in db::jobs::recent_base_models(&s.db, RECENT).await? {
        let ours = db::models::get(&s.db, &name).await?.is_some();
        if !ours && is_hub_id(&name) && !local.contains(&name) {
            hub.push(name);
        }
    }
    if !hub.iter().any(|h| h == DEFAULT_BASE_MODEL) {
        hub.push(DEFAULT_BASE_MODEL.to_string());
    }
    Ok(Json(json!({"default": DEFAULT_BASE_MODEL, "local": local, "hub": hub})))
}
