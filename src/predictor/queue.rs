//! The predictor's queue: requests waiting for the model thread, gathered into batches. It owns
//! the waiting; [`super::backend`] owns the model.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

use tokio::sync::oneshot;

use super::{Loaded, PredictorConfig};
use crate::model::ModelError;

/// One request: its model, its preprocessed images, and where its answer goes.
pub(super) struct Work {
    pub model: Arc<Loaded>,
    pub pixels: Vec<Vec<f32>>,
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, ModelError>>,
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
    /// waiting or `max_batch_delay` has passed.
    fn gather(&mut self) {
        let deadline = Instant::now() + self.cfg.max_batch_delay;
        let model_id = self.pending[0].model.id.clone();
        while self.images_for(&model_id) < self.cfg.max_batch_size {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.rx.recv_timeout(left) {
                Ok(w) => self.pending.push_back(w),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
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
