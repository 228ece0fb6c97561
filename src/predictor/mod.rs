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

use crate::budget::{MemoryBudget, WAIT};
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
        let mut loaded = self.lock_loaded();
        loaded.retain(|l| l.id != model.id);
        loaded.push_front(model);
        loaded.truncate(self.inner.cfg.max_loaded_models.max(1));
    }

    /// The precision of the models' products (`--precision`, resolved).
    pub fn precision(&self) -> Precision {
        self.inner.cfg.precision
    }

    /// The model `id` (folder `dir`), loading it on a blocking thread if it is not in memory.
    pub async fn get_or_load(&self, id: &str, dir: std::path::PathBuf) -> Result<Arc<Loaded>, PredictError> {
        if let Some(hit) = self.cached(id) {
            return Ok(hit);
        }
        let _guard = self.inner.loading.lock().await;
        if let Some(hit) = self.cached(id) {
            return Ok(hit);
        }
        let (device, precision) = (self.inner.device.clone(), self.inner.cfg.precision);
        let model_id = id.to_string();
        let started = Instant::now();
        let loaded = tokio::task::spawn_blocking(move || {
            Classifier::load(&ModelSource::Dir(dir), &device, precision).map(|classifier| Loaded { id: model_id, classifier })
        })
        .await
        .map_err(|e| PredictError::Load { id: id.to_string(), reason: e.to_string() })?
        .map_err(|e| PredictError::Load { id: id.to_string(), reason: e.to_string() })?;
        tracing::info!(model = %id, ms = started.elapsed().as_millis() as u64, "model loaded");
        let loaded = Arc::new(loaded);
        self.insert(loaded.clone());
        Ok(loaded)
    }

    /// Forgets a deleted model.
    pub fn evict(&self, id: &str) {
        self.lock_loaded().retain(|l| l.id != id);
    }

    /// Probabilities for preprocessed images, batched with other requests on the model thread.
    pub async fn infer(&self, model: Arc<Loaded>, pixels: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, PredictError> {
        let (reply, rx) = oneshot::channel();
        let n = pixels.len();
        let ahead = self.inner.queued_images.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(max_wait) = self.inner.cfg.max_queue_wait {
            let expected = Duration::from_nanos(self.inner.ns_per_image.load(Ordering::Relaxed).saturating_mul(ahead as u64));
            // Always admit into an empty queue, so one large request is never refused outright.
            if expected > max_wait && ahead > n {
                self.inner.queued_images.fetch_sub(n, Ordering::Relaxed);
                return Err(PredictError::Overloaded);
            }
        }
        let sent = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner()).send(Work { model, pixels, reply });
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
        let (_cancel_on_drop, cancel) = CancelOnDrop::new();
        let memory = self.inner.cfg.memory.clone();
        let prep = model.clone();
        // The decodes and the pixel values are reserved before any is allocated (waiting up to
        // budget::WAIT on this blocking thread), and held until the answer.
        let (pixels, _held) = tokio::task::spawn_blocking(move || {
            // Test-time flip holds a mirrored copy of every image's pixel values as well.
            let mirrors = if flip { prep.classifier.input_bytes() * images.len() as u64 } else { 0 };
            let cost = prep.classifier.prepare_cost(&images, max_pixels) + mirrors;
            let held = memory.reserve_blocking(cost, WAIT).ok_or_else(|| {
                ClassifyError::Busy(format!(
                    "decoding these images needs {cost} bytes and the service's memory budget for work in flight ({} bytes) is spent; retry shortly",
                    memory.limit()
                ))
            })?;
            Ok::<_, ClassifyError>((prep.classifier.prepare(&images, max_pixels, &cancel)?, held))
        })
        .await
        .map_err(|e| PredictError::Inference(format!("preprocessing stopped: {e}")))??;
        let probs = if flip {
            let both = model.classifier.with_mirrors(pixels);
            crate::model::classifier::mean_of_halves(&self.infer(model.clone(), both).await?)
        } else {
            self.infer(model.clone(), pixels).await?
        };
        Ok(model.classifier.predictions(&probs, top_k))
    }
}
