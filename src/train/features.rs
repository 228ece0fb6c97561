//! Outputs of the frozen part of the network (the input of the trainable part), computed once per
//! example and kept when they fit a memory budget: they never change during a run, so evaluation
//! and (without augmentation) training read them instead of running the frozen layers again.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor};

use super::data::{Example, ImageCache, batch_tensor, load_batch};
use super::TrainError;
use crate::model::network::frozen_forward;
use crate::model::{Boundary, LoadedModel, Vit};

/// How each example's image is shown to the frozen network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// As the processor prepares it.
    Plain,
    /// Its left-right mirror image.
    Mirror,
    /// A random resized crop with a random flip (the training augmentation), the `index`-th of
    /// a run seeded by `seed`.
    Crop { seed: u64, index: u64 },
}

/// Augmentation streams of [`View::Crop`], apart from the epochs' (which count from 0).
const CROP_STREAM: u64 = 0x7072_6f62_6500_0000;

/// Frozen-part outputs of a list of examples, kept when they fit in the budget.
pub struct PrefixCache {
    rows: Option<Vec<Tensor>>,
}

/// What a cache is computed from: the frozen model, where it ends, and how examples are read.
pub struct Frozen<'a> {
    pub vit: &'a Vit,
    pub boundary: Boundary,
    pub images: &'a ImageCache,
    pub model: &'a LoadedModel,
    pub device: &'a Device,
    pub batch: usize,
}

impl PrefixCache {
    /// A cache that keeps nothing (every batch is computed when asked for).
    pub fn empty() -> Self {
        Self { rows: None }
    }

    /// Whether the outputs of `examples` examples fit in `budget` bytes (never worth it when the
    /// trainable part starts at the pixels).
    pub fn fits(f: &Frozen, examples: usize, budget: usize) -> bool {
        let cfg = &f.model.cfg;
        let per_example = match f.boundary {
            Boundary::Pixels => return false,
            Boundary::Layer(_) => cfg.num_tokens() * cfg.hidden_size,
            Boundary::Features => cfg.hidden_size,
        } * 4;
        per_example * examples <= budget
    }

    /// A cache holding these rows (one per example, from [`PrefixCache::compute`]).
    pub fn from_rows(rows: Vec<Tensor>) -> Self {
        Self { rows: Some(rows) }
    }

    /// The cached rows, if the cache holds them.
    pub fn rows(&self) -> Option<&[Tensor]> {
        self.rows.as_deref()
    }

    /// Frozen-part outputs of every example (no budget check), reporting `(done, total)` after
    /// each batch.
    pub fn compute(
        f: &Frozen,
        examples: &[Example],
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Tensor>, TrainError> {
        Self::compute_view(f, examples, View::Plain, cancel, progress)
    }

    /// [`PrefixCache::compute`] on another view of each example's image.
    pub fn compute_view(
        f: &Frozen,
        examples: &[Example],
        view: View,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Tensor>, TrainError> {
        let pre = &f.model.preprocessor;
        let mut rows = Vec::with_capacity(examples.len());
        for chunk in examples.chunks(f.batch.max(1)) {
            if cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let refs: Vec<&Example> = chunk.iter().collect();
            let augment = match view {
                View::Crop { seed, index } => Some((seed, CROP_STREAM + index)),
                View::Plain | View::Mirror => None,
            };
            let mut loaded = load_batch(&refs, f.images, pre, augment)?;
            if view == View::Mirror {
                loaded.iter_mut().for_each(|p| pre.mirror(p));
            }
            let pixels = batch_tensor(loaded, pre, f.device)?;
            let out = frozen_forward(f.vit, f.boundary, &pixels)?;
            for i in 0..chunk.len() {
                rows.push(out.get(i)?);
            }
            progress(rows.len(), examples.len());
        }
        Ok(rows)
    }

    /// The frozen-part output of examples `idx` of `examples`, from the cache or computed now
    /// (always computed for an augmented view, seeded by `augment`).
    pub fn batch(&self, f: &Frozen, idx: &[usize], examples: &[Example], augment: Option<(u64, u64)>) -> Result<Tensor, TrainError> {
        if augment.is_none()
            && let Some(rows) = &self.rows
        {
            let picked: Vec<&Tensor> = idx.iter().map(|&i| &rows[i]).collect();
            return Ok(Tensor::stack(&picked, 0)?);
        }
        let refs: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
        let pixels = batch_tensor(load_batch(&refs, f.images, &f.model.preprocessor, augment)?, &f.model.preprocessor, f.device)?;
        Ok(frozen_forward(f.vit, f.boundary, &pixels)?)
    }
}
