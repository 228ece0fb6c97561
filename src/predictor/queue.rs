//! The predictor's queue: requests waiting for the model thread, gathered into batches. It owns
//! the waiting; [`super::backend`] owns the model.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;

use tokio::sync::oneshot;

use super::{Loaded, PredictorConfig};
use crate::model::ModelError;

/// One request: its model, its preprocessed images, where its answer goes, and the memory budget
/// its pixel values hold (given back when the work is dropped: a request abandoned by its client
/// keeps it reserved until the queue lets go of its pixels).
pub(super) struct Work {
    pub model: Arc<Loaded>,
    pub pixels: Vec<Vec<f32>>,
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, ModelError>>,
    pub _held: Option<crate::budget::Reservation>,
}

/// Requests received and not yet run, in arrival order.
pub(super) struct Queue<'a> {
    rx: Receiver<Work>,
    pending: VecDeque<Work>,
    cfg: &'a PredictorConfig,
    /// Images waiting (shared with the handle, for admission and `/metrics`).
    queued: &'a AtomicUsize,
}

impl<'a> Queue<'a> {
    pub fn new(rx: Receiver<Work>, cfg: &'a PredictorConfig, queued: &'a AtomicUsize) -> Self {
        Self { rx, pending: VecDeque::new(), cfg, queued }
    }

    /// The next batch: whole requests for one model, at most `max_batch_size` images unless a
    /// single request is larger. Waits for work, then up to `max_batch_delay` for company; `None`
    /// once every sender is gone and nothing is left.
    pub fn next_batch(&mut self) -> Option<Vec<Work>> {
        loop {
            if self.pending.is_empty() {
                self.pending.push_back(self.rx.recv().ok()?);
            }
            self.gather();
            self.drop_abandoned();
            if !self.pending.is_empty() {
                return Some(self.take_batch());
            }
        }
    }

    /// Receives more requests until the first request's model has `max_batch_size` images
    /// waiting or `max_batch_delay` has passed. Requests that arrived already (while the last
    /// batch ran) join at once, whatever the delay, so with a delay of 0 a lone request runs
    /// without waiting and a busy predictor still runs full batches.
    fn gather(&mut self) {
        let deadline = Instant::now() + self.cfg.max_batch_delay;
        let model_id = self.pending[0].model.id.clone();
        while self.images_for(&model_id) < self.cfg.max_batch_size {
            let next = match self.rx.try_recv() {
                Err(TryRecvError::Empty) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    self.rx.recv_timeout(left).ok()
                }
                other => other.ok(),
            };
            let Some(w) = next else { break };
            self.pending.push_back(w);
        }
    }

    fn images_for(&self, model_id: &str) -> usize {
        self.pending.iter().filter(|w| w.model.id == model_id).map(|w| w.pixels.len()).sum()
    }

    /// Drops, unanswered, requests whose client has gone (disconnected, or answered 408 by the
    /// request timeout): computing them would only delay everyone behind them.
    fn drop_abandoned(&mut self) {
        let queued = self.queued;
        self.pending.retain(|w| {
            let waiting = !w.reply.is_closed();
            if !waiting {
                queued.fetch_sub(w.pixels.len(), Ordering::Relaxed);
            }
            waiting
        });
    }

    /// Takes whole requests of the first request's model, up to the batch size (a single
    /// request larger than the batch is taken alone, and run in chunks).
    fn take_batch(&mut self) -> Vec<Work> {
        let model_id = self.pending[0].model.id.clone();
        let mut batch: Vec<Work> = Vec::new();
        let mut size = 0;
        let mut rest = VecDeque::new();
        while let Some(w) = self.pending.pop_front() {
            if w.model.id == model_id && (batch.is_empty() || size + w.pixels.len() <= self.cfg.max_batch_size) {
                size += w.pixels.len();
                batch.push(w);
            } else {
                rest.push_back(w);
            }
        }
        self.pending = rest;
        self.queued.fetch_sub(size, Ordering::Relaxed);
        batch
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use candle_core::Device;

    use super::*;
    use crate::budget::MemoryBudget;
    use crate::model::classifier::Classifier;
    use crate::model::{LoadedModel, Precision, VitConfig};

    /// A random tiny model with id `m`.
    fn tiny_model() -> Arc<Loaded> {
        let tiny = VitConfig::preset("tiny").unwrap();
        let labels = ["a".to_string(), "b".to_string()];
        let loaded = LoadedModel::random(&tiny, &labels, 0, &Device::Cpu).unwrap();
        Arc::new(Loaded { id: "m".into(), classifier: Classifier::new(loaded, &Device::Cpu, Precision::F32).unwrap() })
    }

    /// The memory a request's pixel values hold stays reserved while they wait, also once its
    /// client has gone, and is given back when the queue drops them.
    #[test]
    fn an_abandoned_request_holds_its_memory_until_the_queue_drops_it() {
        let model = tiny_model();
        let memory = MemoryBudget::new(1 << 20);
        let cfg = PredictorConfig::for_tests(memory.clone(), Duration::ZERO);
        let queued = AtomicUsize::new(0);
        let (tx, rx) = mpsc::channel();
        let mut queue = Queue::new(rx, &cfg, &queued);
        let (reply, answer) = oneshot::channel();
        queued.fetch_add(1, Ordering::Relaxed);
        tx.send(Work { model: model.clone(), pixels: vec![vec![0.0; 1000]], reply, _held: memory.try_reserve(4000) }).unwrap();
        drop(answer);
        assert_eq!(memory.in_use(), 4000, "held while the pixels wait, though nobody will read the answer");
        let (reply, _answer) = oneshot::channel();
        queued.fetch_add(1, Ordering::Relaxed);
        tx.send(Work { model, pixels: vec![Vec::new()], reply, _held: None }).unwrap();
        assert_eq!(queue.next_batch().unwrap().len(), 1, "the abandoned request is dropped");
        assert_eq!(memory.in_use(), 0);
    }

    /// Requests already waiting join the batch at once, also with no delay (before, a delay of 0
    /// ran them one by one); with a delay, a lone request waits that long for company.
    #[test]
    fn waiting_requests_join_the_batch_and_a_lone_one_waits_the_delay() {
        let model = tiny_model();
        for delay in [0, 200] {
            let cfg = PredictorConfig::for_tests(MemoryBudget::unlimited(), Duration::from_millis(delay));
            let queued = AtomicUsize::new(0);
            let (tx, rx) = mpsc::channel();
            let mut queue = Queue::new(rx, &cfg, &queued);
            // The receivers stay open, or the queue would drop the requests as abandoned.
            let mut answers = Vec::new();
            let mut send = |images: usize| {
                let (reply, answer) = oneshot::channel();
                answers.push(answer);
                queued.fetch_add(images, Ordering::Relaxed);
                tx.send(Work { model: model.clone(), pixels: vec![Vec::new(); images], reply, _held: None }).unwrap();
            };
            for images in [1, 2, 3] {
                send(images);
            }
            let batch = queue.next_batch().unwrap();
            assert_eq!(batch.iter().map(|w| w.pixels.len()).collect::<Vec<_>>(), [1, 2, 3], "delay {delay} ms");
            send(1);
            let started = Instant::now();
            assert_eq!(queue.next_batch().unwrap().len(), 1);
            let waited = started.elapsed();
            assert!(waited >= Duration::from_millis(delay), "delay {delay} ms: ran after {waited:?}");
            assert_eq!(queued.load(Ordering::Relaxed), 0);
        }
    }
}
