//! The rules of a job, written once: what a submitted fine-tune may ask for (recipe and
//! hyper-parameters, a base model), the base model when it names none, and which model files a
//! `base_model` resolves to when the job runs.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use crate::db::Pool;

use super::hub::JobHub;
use crate::db;
use crate::db::jobs::{Job, NewJob};
use crate::model::ModelSource;
use crate::model::io::is_hub_id;
use crate::train::memory::{self, MemoryLimit};
use crate::train::{HeadInit, Recipe, TrainParams};

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
    /// A training step of the job cannot fit the memory its worker may take (the reason).
    #[error("{0}")]
    TooLarge(String),
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
pub async fn submit(db: &Pool, hub: &JobHub, req: JobRequest, memory: Option<&JobMemory>) -> Result<Job, SubmitError> {
    let given = req.params.unwrap_or_default();
    let recipe = req.recipe.unwrap_or(Recipe::implied(given.keys().map(String::as_str)));
    let params = recipe.resolve(&given).map_err(SubmitError::InvalidField)?;
    params.validate().map_err(|e| SubmitError::InvalidParams(e.to_string()))?;
    let base_model = req.base_model.unwrap_or_else(|| DEFAULT_BASE_MODEL.to_string());
    let is_our_model = db::models::get(db, &base_model).await?.is_some();
    check_base_model(&base_model, is_our_model)?;
    if let Some(memory) = memory {
        memory.check(db, &params, &base_model, is_our_model, &req.dataset_id).await?;
    }
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

/// The memory every job a process queues will run its training within, where it knows that: a
/// `--role all` process (alone on its database, so its own workers run every job) whose workers
/// are all on the CPU. A job whose training step cannot fit is then refused when submitted
/// instead of failing when a worker claims it, perhaps hours later behind a queue. The worker
/// checks again at the claim ([`memory::training_step`] with the model loaded), for the jobs this
/// cannot judge.
#[derive(Debug, Clone)]
pub struct JobMemory {
    pub limit: MemoryLimit,
    /// Where `base_model`s resolve (see [`resolve_base_model`]).
    pub models_dir: PathBuf,
    pub base_models_dir: PathBuf,
}

impl JobMemory {
    /// `Err(TooLarge)` where the job's training step cannot fit, judged as the worker first
    /// judges it (its plan before any probe) but with a batch no larger than the worker's, so
    /// nothing that would fit is refused. Passed over: a run that plans no gradient step (the
    /// probe alone, as the `auto` recipe plans until its probe has decided what trains, which
    /// the worker checks then), or a base model whose configuration is not on this machine (a
    /// hub model not in the hub cache yet).
    async fn check(&self, db: &Pool, p: &TrainParams, base_model: &str, is_our_model: bool, dataset_id: &str) -> Result<(), SubmitError> {
        if p.epochs <= u32::from(p.head_init == HeadInit::Probe) {
            return Ok(());
        }
        let config = match resolve_base_model(base_model, is_our_model, &self.models_dir, &self.base_models_dir) {
            Ok(ModelSource::Dir(dir)) => dir.join(crate::model::io::CONFIG_FILE),
            Ok(ModelSource::Hub(id)) => match tokio::task::spawn_blocking(move || crate::model::io::cached_hub_config(&id)).await {
                Ok(Some(config)) => config,
                _ => return Ok(()),
            },
            Err(_) => return Ok(()),
        };
        let Ok(text) = tokio::fs::read_to_string(config).await else { return Ok(()) };
        let Ok(cfg) = crate::model::VitConfig::from_json(&text) else { return Ok(()) };
        let Some(dataset) = db::datasets::get(db, dataset_id).await? else { return Ok(()) };
        let train = if dataset.counts.validation.values().sum::<u64>() > 0 {
            dataset.counts.train.values().sum::<u64>()
        } else {
            let files = db::datasets::train_files_per_class(db, dataset_id).await?;
            files.into_iter().map(|n| kept_at_least(n, p.validation_split)).sum()
        };
        let batch = u64::from(p.batch_size).min(train) as usize;
        if batch == 0 {
            return Ok(());
        }
        let precision = p.precision.resolve(&candle_core::Device::Cpu);
        let step = memory::training_step_of_config(&cfg, dataset.classes.len(), p.trainable_set(), batch, precision, p.optimizer, p.momentum);
        step.check(&self.limit, batch, precision).map_err(SubmitError::TooLarge)
    }
}

/// The fewest of a class's `files` distinct training files that a run holding out `ratio` of
/// them for validation keeps (`TrainData::ensure_validation` holds out at most its share of
/// files, `round(files × ratio)` between 1 and all but one, and keeps every copy of a file it
/// keeps).
fn kept_at_least(files: u64, ratio: f64) -> u64 {
    if files < 2 {
        return files;
    }
    let share = ((files as f64 * ratio).round() as u64).clamp(1, files - 1);
    files - share
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

    /// The bound on the training images a run keeps holds against the hold-out itself, on
    /// classes with copies of files, look-alike groups, files under two classes and any ratio.
    #[test]
    fn a_run_keeps_at_least_the_training_files_the_submit_check_counts() {
        use rand::{Rng, SeedableRng};
        use std::collections::{HashMap, HashSet};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for round in 0..300 {
            let classes = rng.random_range(1..=4u32);
            let mut train = Vec::new();
            let mut file = 0;
            for label in 0..classes {
                for _ in 0..rng.random_range(1..=30) {
                    file += 1;
                    for _ in 0..rng.random_range(1..=3) {
                        train.push(crate::train::data::Example { path: PathBuf::from(format!("{file}")), label });
                    }
                    if rng.random_bool(0.05) {
                        train.push(crate::train::data::Example { path: PathBuf::from(format!("{file}")), label: (label + 1) % classes });
                    }
                }
            }
            let paths: Vec<PathBuf> = train.iter().map(|e| e.path.clone()).collect();
            let mut look_alikes = HashMap::new();
            for p in &paths {
                if rng.random_bool(0.2) {
                    look_alikes.insert(p.clone(), paths[rng.random_range(0..paths.len())].clone());
                }
            }
            let ratio = [0.05, 0.1, 0.2, 0.3, 0.5][round % 5];
            let mut files: HashMap<u32, HashSet<&PathBuf>> = HashMap::new();
            for e in &train {
                files.entry(e.label).or_default().insert(&e.path);
            }
            let bound: u64 = files.values().map(|f| kept_at_least(f.len() as u64, ratio)).sum();
            let mut data = crate::train::data::TrainData { labels: (0..classes).map(|c| c.to_string()).collect(), train: train.clone(), look_alikes, ..Default::default() };
            data.ensure_validation(ratio, round as u64);
            assert!(data.train.len() as u64 >= bound, "round {round}: kept {} of {}, bound {bound}", data.train.len(), train.len());
        }
        assert_eq!((kept_at_least(0, 0.1), kept_at_least(1, 0.5), kept_at_least(2, 0.1), kept_at_least(20, 0.1), kept_at_least(20, 0.99)), (0, 1, 1, 18, 1));
    }

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
