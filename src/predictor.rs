//! The predictor: loaded models kept in a small LRU, and one thread that owns inference, fed by a
//! queue and batching concurrent requests dynamically (as text-embeddings-inference does).
//!
//! Requests wait at most `max_batch_delay` for company, then run together up to
//! `max_batch_size` images. Admission is bounded by a semaphore, and by the expected wait (images
//! queued × recent cost per image) against `max_queue_wait`, so overload is answered 429 at once
//! instead of queueing until the request times out. A newly registered model is loaded in the background and
//! only then becomes the default, so no request is dropped by a swap.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use candle_core::Device;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::model::classifier::Classifier;
use crate::model::{ModelError, ModelSource};
use crate::telemetry::Metrics;

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
}

/// A loaded model and its id.
pub struct Loaded {
    pub id: String,
    pub classifier: Classifier,
}

struct Work {
    model: Arc<Loaded>,
    pixels: Vec<Vec<f32>>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, ModelError>>,
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
    pub fn start(cfg: PredictorConfig, device: Device, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Work>();
        let queued_images = Arc::new(AtomicUsize::new(0));
        let thread_metrics = metrics;
        let thread_queue = queued_images.clone();
        let thread_cfg = cfg.clone();
        let ns_per_image = Arc::new(AtomicU64::new(0));
        let thread_cost = ns_per_image.clone();
        std::thread::Builder::new()
            .name("predictor".into())
            .spawn(move || run_batches(rx, &thread_cfg, &thread_queue, &thread_cost, &thread_metrics))
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

    /// The model `id` (folder `dir`), loading it on a blocking thread if it is not in memory.
    pub async fn get_or_load(&self, id: &str, dir: std::path::PathBuf) -> Result<Arc<Loaded>, PredictError> {
        if let Some(hit) = self.cached(id) {
            return Ok(hit);
        }
        let _guard = self.inner.loading.lock().await;
        if let Some(hit) = self.cached(id) {
            return Ok(hit);
        }
        let device = self.inner.device.clone();
        let model_id = id.to_string();
        let started = Instant::now();
        let loaded = tokio::task::spawn_blocking(move || {
            Classifier::load(&ModelSource::Dir(dir), &device).map(|classifier| Loaded { id: model_id, classifier })
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
}

/// The model thread: gathers work for up to `max_batch_delay` (or until `max_batch_size` images
/// are waiting), runs each model's share as one forward pass and answers every request.
fn run_batches(rx: Receiver<Work>, cfg: &PredictorConfig, queued: &AtomicUsize, ns_per_image: &AtomicU64, metrics: &Metrics) {
    let mut pending: VecDeque<Work> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(w) => pending.push_back(w),
                Err(_) => return,
            }
        }
        let deadline = Instant::now() + cfg.max_batch_delay;
        let model_id = pending[0].model.id.clone();
        let images_for = |p: &VecDeque<Work>| p.iter().filter(|w| w.model.id == model_id).map(|w| w.pixels.len()).sum::<usize>();
        while images_for(&pending) < cfg.max_batch_size {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(w) => pending.push_back(w),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // Requests whose client has gone (disconnected, or answered 408 by the request timeout)
        // are dropped unanswered: computing them would only delay everyone behind them.
        pending.retain(|w| {
            let waiting = !w.reply.is_closed();
            if !waiting {
                queued.fetch_sub(w.pixels.len(), Ordering::Relaxed);
            }
            waiting
        });
        if pending.is_empty() {
            continue;
        }
        let model_id = pending[0].model.id.clone();
        // Take whole requests of the first request's model, up to the batch size (a single
        // request larger than the batch runs alone, in chunks).
        let mut batch: Vec<Work> = Vec::new();
        let mut size = 0;
        let mut rest = VecDeque::new();
        while let Some(w) = pending.pop_front() {
            if w.model.id == model_id && (batch.is_empty() || size + w.pixels.len() <= cfg.max_batch_size) {
                size += w.pixels.len();
                batch.push(w);
            } else {
                rest.push_back(w);
            }
        }
        pending = rest;
        queued.fetch_sub(size, Ordering::Relaxed);
        let model = batch[0].model.clone();
        let all: Vec<Vec<f32>> = batch.iter().flat_map(|w| w.pixels.iter().cloned()).collect();
        let mut results: Result<Vec<Vec<f32>>, ModelError> = Ok(Vec::with_capacity(all.len()));
        let started = Instant::now();
        for chunk in all.chunks(cfg.max_batch_size.max(1)) {
            metrics.predict_batch_size.observe(chunk.len() as f64);
            results = results.and_then(|mut acc| {
                acc.extend(model.classifier.probabilities(chunk)?);
                Ok(acc)
            });
        }
        let cost = (started.elapsed().as_nanos() / all.len().max(1) as u128).min(u128::from(u64::MAX)) as u64;
        let old = ns_per_image.load(Ordering::Relaxed);
        ns_per_image.store(if old == 0 { cost } else { (old * 3 + cost) / 4 }, Ordering::Relaxed);
        match results {
            Ok(probs) => {
                let mut it = probs.into_iter();
                for w in batch {
                    let mine: Vec<Vec<f32>> = it.by_ref().take(w.pixels.len()).collect();
                    let _ = w.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                tracing::error!(model = %model.id, error = %e, "batch inference failed");
                for w in batch {
                    let _ = w.reply.send(Err(ModelError::Input(e.to_string())));
                }
            }
        }
    }
}
