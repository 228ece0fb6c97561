//! The rules of a job, written once: what a submitted fine-tune may ask for (recipe and
//! hyper-parameters, a base model), the base model when it names none, and which model files a
//! `base_model` resolves to when the job runs.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use crate::db::Pool;

use super::hub::JobHub;
use crate::db;
use crate::db::jobs::{Job, NewJob};
use crate::model::ModelSource;
use crate::model::io::is_hub_id;
use crate::train::Recipe;

/// The base model when a job names none.
pub const DEFAULT_BASE_MODEL: &str = "google/vit-base-patch16-224";

/// A fine-tune as submitted (the body of `POST /jobs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub dataset_id: String,
    #[serde(default)]
    pub base_model: Option<String>,
    /// `auto` (the default when no hyper-parameters are given) or `manual` (the default when some are).
    #[serde(default)]
    pub recipe: Option<Recipe>,
    /// Hyper-parameters; each given field overrides the recipe's default.
    #[serde(default)]
    pub params: Option<serde_json::Map<String, Value>>,
}

/// Why a job was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A hyper-parameter of the wrong type, or unknown (`params.<field>: …`).
    #[error("params.{0}")]
    InvalidField(String),
    /// A hyper-parameter out of its range (`params.<field>: …`).
    #[error("params.{0}")]
    InvalidParams(String),
    #[error(transparent)]
    BaseModel(#[from] InvalidBaseModel),
    #[error("dataset '{0}' does not exist")]
    UnknownDataset(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// A `base_model` that is none of the three things it may be.
#[derive(Debug, thiserror::Error)]
#[error(
    "base_model '{0}' must be a Hugging Face model id (like {DEFAULT_BASE_MODEL}), the id of a model of this service, \
     or the name of a folder under the base models folder; filesystem paths are not accepted"
)]
pub struct InvalidBaseModel(pub String);

/// Checks a request and queues its job (waking the workers).
pub async fn submit(db: &Pool, hub: &JobHub, req: JobRequest) -> Result<Job, SubmitError> {
    let given = req.params.unwrap_or_default();
    let recipe = req.recipe.unwrap_or(Recipe::implied(given.keys().map(String::as_str)));
    let params = recipe.resolve(&given).map_err(SubmitError::InvalidField)?;
    params.validate().map_err(|e| SubmitError::InvalidParams(e.to_string()))?;
    let base_model = req.base_model.unwrap_or_else(|| DEFAULT_BASE_MODEL.to_string());
    let is_our_model = db::models::get(db, &base_model).await?.is_some();
    check_base_model(&base_model, is_our_model)?;
    let params_json = serde_json::to_value(&params).map_err(|e| SubmitError::InvalidParams(e.to_string()))?;
    let job = db::jobs::insert(
        db,
        &NewJob {
            dataset_id: &req.dataset_id,
            base_model: &base_model,
            params: &params_json,
            recipe: recipe.as_str(),
            epochs: params.epochs,
            base_is_model: is_our_model,
        },
    )
    .await?;
    let Some(job) = job else {
        // The dataset, or the model it was to start from, was deleted meanwhile (or never was).
        return Err(match db::datasets::get(db, &req.dataset_id).await? {
            None => SubmitError::UnknownDataset(req.dataset_id.clone()),
            Some(_) => SubmitError::BaseModel(InvalidBaseModel(base_model)),
        });
    };
    hub.job_submitted();
    Ok(job)
}

/// The rule: a `base_model` is one of our models, or shaped like a hub id (which also names a
/// folder under the base models folder). Paths are refused, so a request cannot read arbitrary
/// folders.
pub fn check_base_model(spec: &str, is_our_model: bool) -> Result<(), InvalidBaseModel> {
    if is_our_model || is_hub_id(spec) { Ok(()) } else { Err(InvalidBaseModel(spec.to_string())) }
}

/// The base models in `base_models_dir` a job can name: the folders with a `config.json` whose
/// names the rule accepts, sorted.
pub fn local_base_models(base_models_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(base_models_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join(crate::model::io::CONFIG_FILE).is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| is_hub_id(n))
        .collect();
    names.sort();
    names
}

/// The model files a job's `base_model` names: one of our models (`models_dir/<id>`), a folder
/// under `base_models_dir`, or a hub id. Checked at submit and again when the job runs, because
/// the queue may predate a change (the model deleted, the folder added).
pub fn resolve_base_model(spec: &str, is_our_model: bool, models_dir: &Path, base_models_dir: &Path) -> Result<ModelSource, InvalidBaseModel> {
    check_base_model(spec, is_our_model)?;
    if is_our_model {
        return Ok(ModelSource::Dir(models_dir.join(spec)));
    }
    let local = base_models_dir.join(spec);
    Ok(if local.is_dir() { ModelSource::Dir(local) } else { ModelSource::Hub(spec.to_string()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_models_resolve_to_our_models_local_folders_or_the_hub() {
        let tmp = tempfile::tempdir().unwrap();
        let (models, bases) = (tmp.path().join("models"), tmp.path().join("base-models"));
        std::fs::create_dir_all(bases.join("tiny")).unwrap();
        assert_eq!(resolve_base_model("0193-id", true, &models, &bases).unwrap(), ModelSource::Dir(models.join("0193-id")));
        assert_eq!(resolve_base_model("tiny", false, &models, &bases).unwrap(), ModelSource::Dir(bases.join("tiny")));
        assert_eq!(resolve_base_model("google/vit-base-patch16-224", false, &models, &bases).unwrap(), ModelSource::Hub(DEFAULT_BASE_MODEL.into()));
        for path in ["/etc", "../x", "a/b/c", ""] {
            assert!(resolve_base_model(path, false, &models, &bases).is_err(), "{path}");
        }
    }
}
