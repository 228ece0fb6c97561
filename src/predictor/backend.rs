//! The model thread: takes batches from the [`super::queue`], runs each as forward passes of at
//! most `max_batch_size` images, and answers every request of the batch.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Instant;

use super::PredictorConfig;
use super::queue::{Queue, Work};
use crate::model::ModelError;
use crate::telemetry::ServiceMetrics;

/// Runs until every sender of `rx` is gone.
pub(super) fn run(rx: Receiver<Work>, cfg: &PredictorConfig, queued: &AtomicUsize, ns_per_image: &AtomicU64, metrics: &ServiceMetrics) {
    let mut queue = Queue::new(rx, cfg, queued);
    while let Some(batch) = queue.next_batch() {
        // A panic in a forward pass costs its batch (whose requests learn that their answer was
        // dropped), not the thread every later request needs.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_and_reply(batch, cfg, ns_per_image, metrics)));
        if ran.is_err() {
            tracing::error!("a batch's inference panicked; its requests fail and the model thread goes on");
        }
    }
}

/// One batch: the forward passes, the cost per image (an exponential moving average that
/// admission uses to estimate waits), and the answers.
fn run_and_reply(mut batch: Vec<Work>, cfg: &PredictorConfig, ns_per_image: &AtomicU64, metrics: &ServiceMetrics) {
    let model = batch[0].model.clone();
    // The pixel values move into the batch (no second copy); each request's count stays.
    let counts: Vec<usize> = batch.iter().map(|w| w.pixels.len()).collect();
    let all: Vec<Vec<f32>> = batch.iter_mut().flat_map(|w| std::mem::take(&mut w.pixels)).collect();
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
            for (w, n) in batch.into_iter().zip(counts) {
                let mine: Vec<Vec<f32>> = it.by_ref().take(n).collect();
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
