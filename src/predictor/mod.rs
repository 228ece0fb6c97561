//! The predictor: loaded models kept in a small LRU, and one thread that owns inference, fed by a
//! queue and batching concurrent requests dynamically (as text-embeddings-inference does, its
//! queue ([`queue`]) kept apart from the thread that runs the model ([`backend`])).
//!
//! The requests that arrived while the last batch ran, and those that arrive within
//! `max_batch_delay` (0 by default), run together up to `max_batch_size` images. Admission is bounded by a semaphore, and by the expected wait (images
//! queued × recent cost per image) against `max_queue_wait`, so overload is answered 429 at once
//! instead of queueing until the request times out. A newly registered model is loaded in the background and
//! only then becomes the default, so no request is dropped by a swap.

mod backend;
mod queue;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use candle_core::Device;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::budget::{MemoryBudget, Reservation, WAIT};
use crate::cancel::CancelOnDrop;
use crate::model::classifier::{ClassifyError, Classifier, Prediction};
use crate::model::{ModelSource, Precision};
use crate::telemetry::ServiceMetrics;
use queue::Work;

/// Batching and admission settings.
#[derive(Debug, Clone)]
pub struct PredictorConfig {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    pub max_concurrent_requests: usize,
    pub max_loaded_models: usize,
    /// Longest expected wait for the model thread that a request is admitted to: beyond it the
    /// request is answered 429 at once rather than queued to time out (None: no bound).
    pub max_queue_wait: Option<Duration>,
    /// The budget that decoded images and pixel values are reserved from.
    pub memory: Arc<MemoryBudget>,
    /// The precision of the models' products.
    pub precision: Precision,
}

#[cfg(test)]
impl PredictorConfig {
    /// Settings for tests: batches of 16, no wait bound, f32, `memory` as the budget.
    pub(crate) fn for_tests(memory: Arc<MemoryBudget>, max_batch_delay: Duration) -> Self {
        Self { max_batch_size: 16, max_batch_delay, max_concurrent_requests: 64, max_loaded_models: 2, max_queue_wait: None, memory, precision: Precision::F32 }
    }
}

/// A loaded model and its id.
pub struct Loaded {
    pub id: String,
    pub classifier: Classifier,
}

/// Why a prediction could not be served.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("too many requests in flight")]
    Overloaded,
    #[error("no fine-tuned model yet")]
    NoModel,
    #[error("model '{0}' does not exist")]
    UnknownModel(String),
    #[error("model '{id}' cannot be loaded: {reason}")]
    Load { id: String, reason: String },
    #[error("inference failed: {0}")]
    Inference(String),
    /// An image of the request is unusable, or the request was abandoned.
    #[error(transparent)]
    Classify(#[from] ClassifyError),
    /// The database failed while choosing the model.
    #[error("database error: {0}")]
    Store(String),
    /// The model's files could not be fetched from the object store.
    #[error("{0:#}")]
    Fetch(anyhow::Error),
}

impl PredictError {
    /// A database failure while choosing the model.
    pub fn store(e: impl std::fmt::Display) -> Self {
        PredictError::Store(e.to_string())
    }
}

/// Handle to the predictor; cheap to clone.
#[derive(Clone)]
pub struct Predictor {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: PredictorConfig,
    device: Device,
    queue: Mutex<Sender<Work>>,
    admission: Arc<Semaphore>,
    /// Images waiting for the model thread.
    queued_images: Arc<AtomicUsize>,
    /// Recent inference cost in nanoseconds per image (an exponential moving average kept by the
    /// model thread; 0 until the first batch).
    ns_per_image: Arc<AtomicU64>,
    /// Most recently used first.
    loaded: Mutex<VecDeque<Arc<Loaded>>>,
    /// Serialises loads so two requests for the same cold model load it once.
    loading: tokio::sync::Mutex<()>,
    /// Ids of deleted models (ids are never reused): a load that finishes after the delete does
    /// not put its model back in memory.
    deleted: Mutex<std::collections::HashSet<String>>,
    default_model: RwLock<Option<String>>,
}

impl Predictor {
    /// Starts the inference thread.
    pub fn start(cfg: PredictorConfig, device: Device, metrics: Arc<ServiceMetrics>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Work>();
        let queued_images = Arc::new(AtomicUsize::new(0));
        let thread_metrics = metrics;
        let thread_queue = queued_images.clone();
        let thread_cfg = cfg.clone();
        let ns_per_image = Arc::new(AtomicU64::new(0));
        let thread_cost = ns_per_image.clone();
        std::thread::Builder::new()
            .name("predictor".into())
            .spawn(move || backend::run(rx, &thread_cfg, &thread_queue, &thread_cost, &thread_metrics))
            .expect("spawning the predictor thread");
        let inner = Inner {
            admission: Arc::new(Semaphore::new(cfg.max_concurrent_requests)),
            cfg,
            device,
            queue: Mutex::new(tx),
            queued_images,
            ns_per_image,
            loaded: Mutex::new(VecDeque::new()),
            loading: tokio::sync::Mutex::new(()),
            deleted: Mutex::default(),
            default_model: RwLock::new(None),
        };
        Self { inner: Arc::new(inner) }
    }

    /// A slot for one request, or `Overloaded` at once when all are taken.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, PredictError> {
        self.inner.admission.clone().try_acquire_owned().map_err(|_| PredictError::Overloaded)
    }

    /// Images waiting for the model thread.
    pub fn queue_depth(&self) -> usize {
        self.inner.queued_images.load(Ordering::Relaxed)
    }

    /// The id of the model `/predict` uses by default.
    pub fn default_model(&self) -> Option<String> {
        self.inner.default_model.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes `id` the default without loading it (at start-up, for the newest model).
    pub fn set_default(&self, id: Option<String>) {
        *self.inner.default_model.write().unwrap_or_else(|e| e.into_inner()) = id;
    }

    /// Ids of the models in memory, most recently used first.
    pub fn loaded_ids(&self) -> Vec<String> {
        self.lock_loaded().iter().map(|l| l.id.clone()).collect()
    }

    fn lock_loaded(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Loaded>>> {
        self.inner.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached(&self, id: &str) -> Option<Arc<Loaded>> {
        let mut loaded = self.lock_loaded();
        let pos = loaded.iter().position(|l| l.id == id)?;
        let hit = loaded.remove(pos)?;
        loaded.push_front(hit.clone());
        Some(hit)
    }

    fn insert(&self, model: Arc<Loaded>) {
        // Held until the model is in: an eviction cannot fall between the check and the insert.
        let deleted = self.inner.deleted.lock().unwrap_or_else(|e| e.into_inner());
        if deleted.contains(&model.id) {
            return;
        }
        let mut loaded = self.lock_loaded();
        loaded.retain(|l| l.id != model.id);
        loaded.push_front(model);
        loaded.truncate(self.inner.cfg.max_loaded_models.max(1));
    }

    /// The precision of the models' products (`--precision`, resolved).
    pub fn precision(&self) -> Precision {
        self.inner.cfg.precision
    }

    /// The model `id` (folder `dir`), loading it on a blocking thread if it is not in memory. The
    /// load runs on a task of its own: when the request that started it stops waiting (its client
    /// went away, or it timed out), the load still completes and is kept, and the lock that makes
    /// requests for the same cold model wait for one load is held until it has.
    pub async fn get_or_load(&self, id: &str, dir: std::path::PathBuf) -> Result<Arc<Loaded>, PredictError> {
        if let Some(hit) = self.cached(id) {
            return Ok(hit);
        }
        let (this, model_id) = (self.clone(), id.to_string());
        tokio::spawn(async move { this.load(model_id, dir).await })
            .await
            .map_err(|e| PredictError::Load { id: id.to_string(), reason: e.to_string() })?
    }

    /// [`Self::get_or_load`]'s load, one at a time.
    async fn load(&self, id: String, dir: std::path::PathBuf) -> Result<Arc<Loaded>, PredictError> {
        let _guard = self.inner.loading.lock().await;
        if let Some(hit) = self.cached(&id) {
            return Ok(hit);
        }
        let (device, precision) = (self.inner.device.clone(), self.inner.cfg.precision);
        let model_id = id.clone();
        let started = Instant::now();
        let failed = |reason: String| PredictError::Load { id: id.clone(), reason };
        let loaded = tokio::task::spawn_blocking(move || {
            Classifier::load(&ModelSource::Dir(dir), &device, precision).map(|classifier| Loaded { id: model_id, classifier })
        })
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(e.to_string()))?;
        tracing::info!(model = %id, ms = started.elapsed().as_millis() as u64, "model loaded");
        let loaded = Arc::new(loaded);
        self.insert(loaded.clone());
        Ok(loaded)
    }

    /// Forgets a deleted model, also when a load of it is under way.
    pub fn evict(&self, id: &str) {
        let mut deleted = self.inner.deleted.lock().unwrap_or_else(|e| e.into_inner());
        deleted.insert(id.to_string());
        self.lock_loaded().retain(|l| l.id != id);
    }

    /// Whether `n` images with `ahead` images queued (theirs included) would wait for the model
    /// thread longer than `max_queue_wait`. An empty queue always admits, so one large request
    /// is never refused outright.
    fn waits_too_long(&self, n: usize, ahead: usize) -> bool {
        let Some(max_wait) = self.inner.cfg.max_queue_wait else { return false };
        let expected = Duration::from_nanos(self.inner.ns_per_image.load(Ordering::Relaxed).saturating_mul(ahead as u64));
        expected > max_wait && ahead > n
    }

    /// Probabilities for preprocessed images, batched with other requests on the model thread;
    /// `held`, the budget the pixel values hold, goes with them and is given back when the model
    /// thread lets go of them (not when the caller stops waiting).
    pub async fn infer(&self, model: Arc<Loaded>, pixels: Vec<Vec<f32>>, held: Option<Reservation>) -> Result<Vec<Vec<f32>>, PredictError> {
        let (reply, rx) = oneshot::channel();
        let n = pixels.len();
        let ahead = self.inner.queued_images.fetch_add(n, Ordering::Relaxed) + n;
        if self.waits_too_long(n, ahead) {
            self.inner.queued_images.fetch_sub(n, Ordering::Relaxed);
            return Err(PredictError::Overloaded);
        }
        let sent = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner()).send(Work { model, pixels, reply, _held: held });
        if sent.is_err() {
            self.inner.queued_images.fetch_sub(n, Ordering::Relaxed);
            return Err(PredictError::Inference("the predictor thread has stopped".into()));
        }
        rx.await
            .map_err(|_| PredictError::Inference("the predictor thread dropped the request".into()))?
            .map_err(|e| PredictError::Inference(e.to_string()))
    }

    /// Classifies named encoded images with a loaded model: decoding and preprocessing on a
    /// blocking thread (images in parallel; abandoned when the caller's future is dropped), the
    /// forward pass batched with other requests on the model thread, then the `top_k` labels.
    pub async fn classify<B>(&self, model: Arc<Loaded>, images: Vec<(String, B)>, top_k: usize, max_pixels: u64, flip: bool) -> Result<Vec<Prediction>, PredictError>
    where
        B: AsRef<[u8]> + Send + Sync + 'static,
    {
        // Refused before any decoding when the queue is already too long (checked again when
        // the images join it): an overloaded service does not decode what it will not run.
        let n = images.len() * if flip { 2 } else { 1 };
        if self.waits_too_long(n, self.queue_depth() + n) {
            return Err(PredictError::Overloaded);
        }
        let (_cancel_on_drop, cancel) = CancelOnDrop::new();
        let memory = self.inner.cfg.memory.clone();
        let prep = model.clone();
        // The decodes and the pixel values are reserved before any is allocated (waiting up to
        // budget::WAIT on this blocking thread), and held until the answer.
        let (pixels, held) = tokio::task::spawn_blocking(move || {
            // Test-time flip holds a mirrored copy of every image's pixel values as well.
            let mirrors = if flip { prep.classifier.input_bytes() * images.len() as u64 } else { 0 };
            let cost = |parallel: usize| prep.classifier.prepare_cost(&images, max_pixels, parallel) + mirrors;
            // In parallel where the whole budget allows it, else one image at a time; a request
            // that cannot fit even so is refused for good, not asked to retry.
            let threads = rayon::current_num_threads();
            let serial = cost(threads) > memory.limit();
            let cost = cost(if serial { 1 } else { threads });
            if cost > memory.limit() {
                return Err(ClassifyError::TooLarge(format!(
                    "decoding and preparing these images needs {cost} bytes at once, more than the service's whole memory budget for work in flight ({} bytes, --max-inflight-bytes); send fewer or smaller images",
                    memory.limit()
                )));
            }
            let held = memory.reserve_blocking(cost, WAIT).ok_or_else(|| {
                ClassifyError::Busy(format!(
                    "decoding these images needs {cost} bytes and the service's memory budget for work in flight ({} bytes) is spent; retry shortly",
                    memory.limit()
                ))
            })?;
            let pixels = if serial {
                prep.classifier.prepare_serially(&images, max_pixels, &cancel)?
            } else {
                prep.classifier.prepare(&images, max_pixels, &cancel)?
            };
            Ok::<_, ClassifyError>((pixels, held))
        })
        .await
        .map_err(|e| PredictError::Inference(format!("preprocessing stopped: {e}")))??;
        let probs = if flip {
            let both = model.classifier.with_mirrors(pixels);
            crate::model::classifier::mean_of_halves(&self.infer(model.clone(), both, Some(held)).await?)
        } else {
            self.infer(model.clone(), pixels, Some(held)).await?
        };
        Ok(model.classifier.predictions(&probs, top_k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn predictor_with_a_model() -> (tempfile::TempDir, Predictor) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::model::VitConfig::preset("small").unwrap();
        let labels = vec!["a".to_string(), "b".to_string()];
        crate::model::LoadedModel::random(&cfg, &labels, 0, &Device::Cpu).unwrap().save(dir.path()).unwrap();
        let config = PredictorConfig::for_tests(MemoryBudget::new(1 << 30), Duration::ZERO);
        (dir, Predictor::start(config, Device::Cpu, Arc::new(ServiceMetrics::new())))
    }

    /// A model deleted while it loads is not put in memory when the load finishes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_deleted_while_it_loads_is_not_kept() {
        let (dir, predictor) = predictor_with_a_model();
        let load = tokio::spawn({
            let predictor = predictor.clone();
            async move { predictor.get_or_load("m", dir.path().to_path_buf()).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(predictor.loaded_ids().is_empty(), "loading a ViT-S takes longer than a millisecond");
        predictor.evict("m");
        assert!(load.await.unwrap().is_ok());
        assert!(predictor.loaded_ids().is_empty());
    }

    /// A load keeps going when the request that started it stops waiting (its client went away,
    /// or it timed out): the next request finds the model in memory instead of loading it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_load_whose_request_went_away_is_completed_and_kept() {
        let (dir, predictor) = predictor_with_a_model();
        let gave_up = tokio::time::timeout(Duration::from_millis(1), predictor.get_or_load("m", dir.path().to_path_buf())).await;
        assert!(gave_up.is_err(), "loading a ViT-S takes longer than a millisecond");
        let deadline = Instant::now() + Duration::from_secs(60);
        while predictor.loaded_ids().is_empty() {
            assert!(Instant::now() < deadline, "the load was dropped with its request");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(predictor.loaded_ids(), ["m"]);
    }
}
