//! The registry of fine-tuned models: the one owner of what makes a model exist and stop existing.
//! Registering one copies its folder into `<data-dir>/models/<id>/`, loads it for `/predict`,
//! inserts its row (marking its job succeeded) and makes it the default; deleting one removes the
//! row, evicts it from the predictor, moves the default to the newest remaining model and
//! removes its folder. `/predict` asks it which model a request means. With an object store the
//! folder is stored there before the row exists, and fetched into the data folder on first use.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use crate::db::Pool;

use crate::db;
use crate::db::jobs::{Holder, Job};
use crate::db::models::{Deleted, Model, Registration};
use crate::model::VitConfig;
use crate::model::io::{CONFIG_FILE, SAVED_FILES, write_dir_atomically, write_file};
use crate::objects::Objects;
use crate::paths::DataPaths;
use crate::predictor::{Loaded, PredictError, Predictor};
use crate::train::TrainOutcome;

/// What registering a finished job's model came to.
#[derive(Debug)]
pub enum JobModel {
    Registered(Box<Model>),
    /// A cancel was asked for while the model was being saved: nothing is registered.
    CancelRequested,
    /// The job no longer runs under this worker (its lease ran out and another worker took it).
    Lost,
}

/// Handle to the registry; cheap to clone.
#[derive(Clone)]
pub struct ModelRegistry {
    db: Pool,
    paths: DataPaths,
    objects: Objects,
    predictor: Predictor,
    /// Whether this process answers `/predict` (a `--role worker` process does not, so it does
    /// not load the models it registers).
    serves_predict: bool,
    /// The ids of the models this process is registering (see [`ModelRegistry::registering`]).
    registering: Arc<Mutex<HashSet<String>>>,
}

/// A model being registered by this process: while it is held, the periodic sweep leaves the
/// model's folder alone, however long the copy and the upload to the object store take.
pub struct Registering {
    set: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Drop for Registering {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

impl ModelRegistry {
    pub fn new(db: Pool, paths: DataPaths, objects: Objects, predictor: Predictor, serves_predict: bool) -> Self {
        Self { db, paths, objects, predictor, serves_predict, registering: Arc::default() }
    }

    /// Marks model `id` as being registered until the guard is dropped: its folder has no row
    /// yet, and [`ModelRegistry::remove_unregistered`] must not take it for a leftover however
    /// old its files grow meanwhile (a large model's upload to a slow object store can outlast
    /// the sweep's grace).
    pub fn registering(&self, id: &str) -> Registering {
        self.registering.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string());
        Registering { set: self.registering.clone(), id: id.to_string() }
    }

    fn is_registering(&self, path: &Path) -> bool {
        let id = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        self.registering.lock().unwrap_or_else(|e| e.into_inner()).contains(id)
    }

    /// The folder of a registered model, fetched from the object store first when the data
    /// folder lacks it.
    pub async fn dir(&self, model: &Model) -> anyhow::Result<PathBuf> {
        let dir = self.paths.root().join(&model.path);
        self.objects.fetch_dir(&dir).await.with_context(|| format!("fetching model {}", model.id))?;
        Ok(dir)
    }

    /// Makes the newest model the default of `/predict` (at start-up).
    pub async fn set_default_to_latest(&self) -> Result<(), sqlx::Error> {
        self.predictor.set_default(db::models::latest(&self.db).await?.map(|m| m.id));
        Ok(())
    }

    /// Registers the kept model of a finished job: copies it into `<data-dir>/models/<id>/`,
    /// inserts the model and marks the job succeeded (one transaction), makes it the default
    /// once loaded, then drops the job's checkpoint records (the worker removes their files, as for
    /// every job that ends). Only while the job still runs under `holder` and no cancel was asked
    /// for. Whatever stops it part-way (a failure, a lost lease, a cancel) leaves nothing behind:
    /// neither the copy, here or in the object store, nor the loaded model.
    pub async fn register_for_job(&self, job: &Job, outcome: &TrainOutcome, holder: &Holder) -> anyhow::Result<JobModel> {
        let model_id = db::new_id();
        let dest = self.paths.model(&model_id);
        let _registering = self.registering(&model_id);
        match self.register_copy(job, outcome, holder, &model_id, &dest).await {
            Ok(JobModel::Registered(model)) => {
                if let Err(e) = db::job_metrics::delete_checkpoints(&self.db, &job.id).await {
                    tracing::warn!(job = %job.id, error = %e, "dropping the job's checkpoint records failed");
                }
                Ok(JobModel::Registered(model))
            }
            Err(e) => {
                // A commit whose answer was lost on the way may have registered it after all; the
                // copy goes only when the database says it is not there (when it cannot say, the
                // copy stays: start-up clean-up removes a folder no model names).
                match db::models::get(&self.db, &model_id).await {
                    Ok(Some(model)) => {
                        tracing::warn!(job = %job.id, model = %model_id, "registering the model reported a failure, yet it is registered: kept");
                        if self.predictor.loaded_ids().contains(&model_id) {
                            self.predictor.set_default(Some(model_id.clone()));
                        }
                        return Ok(JobModel::Registered(Box::new(model)));
                    }
                    Ok(None) => self.discard(&model_id, &dest).await,
                    Err(_) => {}
                }
                Err(e)
            }
            other => {
                self.discard(&model_id, &dest).await;
                other
            }
        }
    }

    /// Forgets a model that was not registered: its place in memory and its folder.
    async fn discard(&self, model_id: &str, dest: &Path) {
        self.predictor.evict(model_id);
        self.objects.remove_dir(dest).await.ok();
    }

    /// [`Self::register_for_job`] up to the registration, with the copy at `dest`.
    async fn register_copy(&self, job: &Job, outcome: &TrainOutcome, holder: &Holder, model_id: &str, dest: &Path) -> anyhow::Result<JobModel> {
        let (src, copy_to) = (outcome.best_dir.clone(), dest.to_path_buf());
        let copied = tokio::task::spawn_blocking(move || copy_model_folder(&src, &copy_to)).await?;
        copied.with_context(|| format!("copying the model from {} to {}", outcome.best_dir.display(), dest.display()))?;
        // In the object store before its row exists, so every process that sees the row finds it.
        self.objects.publish_dir(dest).await.context("storing the model")?;
        let model = Model {
            id: model_id.to_string(),
            job_id: Some(job.id.clone()),
            base_model: job.base_model.clone(),
            labels: labels_of(dest)?,
            metrics: Some(model_metrics(outcome)?),
            params: Some(trained_params(job, outcome)),
            recipe: Some(job.recipe.clone()),
            created_at: db::now(),
            path: self.relative(dest),
        };
        // Load it before the job shows as succeeded, so the default can switch as soon as it does;
        // a model that fails to load is still registered, and the previous default keeps serving.
        let loaded = if self.serves_predict { Some(self.predictor.get_or_load(model_id, dest.to_path_buf()).await) } else { None };
        match db::models::register_for_job(&self.db, &model, Some(holder)).await.context("registering the model")? {
            Registration::Registered => {}
            Registration::CancelRequested => return Ok(JobModel::CancelRequested),
            Registration::NotOurs => return Ok(JobModel::Lost),
        }
        match loaded {
            Some(Ok(_)) => self.predictor.set_default(Some(model_id.to_string())),
            Some(Err(e)) => tracing::error!(model = %model_id, error = %e, "the new model failed to load; the previous default keeps serving"),
            None => {}
        }
        Ok(JobModel::Registered(Box::new(model)))
    }

    /// Deletes a model unless it is the only one or a job continues from it: its row, its place in
    /// the predictor (and as the default), and its folder.
    pub async fn delete(&self, id: &str) -> anyhow::Result<Deleted> {
        let outcome = db::models::delete(&self.db, id).await?;
        if let Deleted::Removed { path } = &outcome {
            self.predictor.evict(id);
            // The row is gone: the delete has happened whatever follows. The rest runs on a task
            // of its own, awaited (a client that goes away does not stop the folder's removal
            // half-way), and a failure there is logged, not answered as a failed delete.
            let (this, id, dir) = (self.clone(), id.to_string(), self.paths.root().join(path));
            let clean_up = tokio::spawn(async move {
                if this.predictor.default_model().as_deref() == Some(id.as_str())
                    && let Err(e) = this.set_default_to_latest().await
                {
                    tracing::error!(model = %id, error = %e, "choosing the new default model failed");
                }
                if let Err(e) = this.objects.remove_dir(&dir).await {
                    tracing::error!(model = %id, path = %dir.display(), error = format!("{e:#}"), "removing the deleted model's folder failed");
                }
            });
            let _ = clean_up.await;
        }
        Ok(outcome)
    }

    /// The model a `/predict` request means: the one it names (by id, or by an alias), else the
    /// default, else the newest.
    /// A default deleted a moment ago (its delete has not yet moved the default on, or another
    /// process deleted it) gives way to the newest model, not to a 404 for a model the request
    /// never named.
    pub async fn resolve(&self, requested: Option<String>) -> Result<Model, PredictError> {
        let named = requested.is_some();
        let latest = || async { db::models::latest(&self.db).await.map_err(PredictError::store)?.ok_or(PredictError::NoModel) };
        let Some(id) = requested.or_else(|| self.predictor.default_model()) else { return latest().await };
        if let Some(model) = db::models::get(&self.db, &id).await.map_err(PredictError::store)? {
            return Ok(model);
        }
        if !named {
            return latest().await;
        }
        // Not a model's id: an alias's name, pointing at one.
        if let Some(alias) = db::aliases::get(&self.db, &id).await.map_err(PredictError::store)?
            && let Some(model) = db::models::get(&self.db, &alias.model_id).await.map_err(PredictError::store)?
        {
            return Ok(model);
        }
        Err(PredictError::UnknownModel(id))
    }

    /// The model loaded for inference (from memory, or loaded now). A model deleted since it was
    /// resolved (its folder gone under the load) is an unknown model, not a failure.
    pub async fn load(&self, model: &Model) -> Result<std::sync::Arc<Loaded>, PredictError> {
        let loaded = match self.dir(model).await {
            Ok(dir) => self.predictor.get_or_load(&model.id, dir).await,
            Err(e) => Err(PredictError::Fetch(e)),
        };
        if loaded.is_err() && db::models::get(&self.db, &model.id).await.map_err(PredictError::store)?.is_none() {
            return Err(PredictError::UnknownModel(model.id.clone()));
        }
        loaded
    }

    /// At start-up: removes folders under `models/` that no model row points at (left by a crash
    /// between copying a model and registering it), and temporary folders.
    pub async fn remove_orphans(&self) -> anyhow::Result<Vec<PathBuf>> {
        let known: HashSet<String> = db::models::paths(&self.db).await?.into_iter().collect();
        let mut removed = vec![];
        for entry in std::fs::read_dir(self.paths.models())? {
            let path = entry?.path();
            if !known.contains(&self.relative(&path)) {
                std::fs::remove_dir_all(&path)?;
                removed.push(path);
            }
        }
        // And in the object store: stored, then the process died before the row went in.
        for name in self.objects.stored_folders(&self.paths.models()).await? {
            let path = self.paths.model(&name);
            if !known.contains(&self.relative(&path)) {
                self.objects.remove_dir(&path).await?;
                removed.push(path);
            }
        }
        Ok(removed)
    }

    /// Every so often, in every role: removes the model folders that no model row names once
    /// nothing in them has changed for `grace` — here (with an object store, this machine's
    /// cached copies of models deleted through another process, which removed its own copy and
    /// the store's but cannot reach this data folder; and in any case the copy a process left
    /// when it stopped between copying a model and registering it) and in the object store (a
    /// model stored by a process that then stopped before its row went in). A folder being
    /// registered has no row yet either: this process's own are skipped whatever their age
    /// ([`ModelRegistry::registering`]), and another's is being written (the store receives its
    /// largest file first, so the folder appears in a listing only as its last files go in). The
    /// folders are listed before the rows are read, so a model registered in between is kept.
    /// Models removed here are forgotten by the predictor. Returns the folders removed (the
    /// store's as the data folder's paths).
    pub async fn remove_unregistered(&self, grace: std::time::Duration) -> anyhow::Result<Vec<PathBuf>> {
        let idle = self.objects.idle_folders(&self.paths.models(), grace).await?;
        if idle.is_empty() {
            return Ok(vec![]);
        }
        let known: HashSet<String> = db::models::paths(&self.db).await?.into_iter().collect();
        let mut removed = vec![];
        for path in idle.into_iter().filter(|path| !known.contains(&self.relative(path)) && !self.is_registering(path)) {
            self.objects.remove_dir(&path).await?;
            if let Some(id) = path.file_name().and_then(|n| n.to_str()) {
                self.predictor.evict(id);
            }
            removed.push(path);
        }
        Ok(removed)
    }

    fn relative(&self, path: &Path) -> String {
        path.strip_prefix(self.paths.root()).unwrap_or(path).to_string_lossy().into_owned()
    }
}

/// What a model records as its metrics: the kept epoch's validation block, with the calibration
/// of its scores when the run calibrated them.
fn model_metrics(outcome: &TrainOutcome) -> anyhow::Result<serde_json::Value> {
    let mut metrics = serde_json::to_value(&outcome.best)?;
    if let (Some(c), Some(m)) = (&outcome.calibration, metrics.as_object_mut()) {
        m.insert("calibration".into(), serde_json::to_value(c)?);
    }
    Ok(metrics)
}

fn labels_of(dir: &Path) -> anyhow::Result<Vec<String>> {
    let cfg = VitConfig::from_json(&std::fs::read_to_string(dir.join(CONFIG_FILE))?)?;
    Ok(cfg.labels)
}

/// Copies a model folder's files into `dest` atomically (temporary sibling, then rename).
fn copy_model_folder(src: &Path, dest: &Path) -> anyhow::Result<()> {
    write_dir_atomically(dest, |tmp| {
        for name in SAVED_FILES {
            let bytes = std::fs::read(src.join(name))?;
            write_file(&tmp.join(name), &bytes)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// The job's hyper-parameters as the model records them: with the precision it was trained in
/// (`auto` resolved on the worker that ran it).
fn trained_params(job: &Job, outcome: &TrainOutcome) -> serde_json::Value {
    let mut params = job.params.clone();
    if let Some(p) = params.as_object_mut() {
        p.insert("precision".into(), serde_json::json!(outcome.precision));
    }
    params
}
