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

/// Where each distinct image (path and label) of `examples` first stands, and for every example
/// the index of its image among them.
pub(super) fn distinct_images(examples: &[Example]) -> (Vec<usize>, Vec<usize>) {
    let mut seen = std::collections::HashMap::new();
    let mut first = Vec::new();
    let slot = examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            *seen.entry((&e.path, e.label)).or_insert_with(|| {
                first.push(i);
                first.len() - 1
            })
        })
        .collect();
    (first, slot)
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

    /// [`PrefixCache::compute`] on another view of each example's image. Copies of a file (one
    /// path) under one label are one image shown alike (an augmented view is seeded by label and
    /// file name), so each is computed once and its row shared: a placeholder image repeated
    /// thousands of times costs one forward pass, not thousands.
    pub fn compute_view(
        f: &Frozen,
        examples: &[Example],
        view: View,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Tensor>, TrainError> {
        let pre = &f.model.preprocessor;
        let (first, slot) = distinct_images(examples);
        let distinct: Vec<&Example> = first.iter().map(|&i| &examples[i]).collect();
        let mut rows = Vec::with_capacity(distinct.len());
        for chunk in distinct.chunks(f.batch.max(1)) {
            if cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let augment = match view {
                View::Crop { seed, index } => Some((seed, CROP_STREAM + index)),
                View::Plain | View::Mirror => None,
            };
            let mut loaded = load_batch(chunk, f.images, pre, augment)?;
            if view == View::Mirror {
                loaded.iter_mut().for_each(|p| pre.mirror(p));
            }
            let pixels = batch_tensor(loaded, pre, f.device)?;
            let out = frozen_forward(f.vit, f.boundary, &pixels)?;
            for i in 0..chunk.len() {
                rows.push(out.get(i)?);
            }
            // In examples, so that the count ends at their number.
            progress(rows.len() * examples.len() / distinct.len(), examples.len());
        }
        Ok(slot.into_iter().map(|s| rows[s].clone()).collect())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Precision, VitConfig};

    /// Copies of a file under one label are computed once and share their row, which is the row
    /// each would have on its own; a copy under another label is its own image where the view
    /// is seeded by label (an augmented crop).
    #[test]
    fn copies_of_a_file_are_computed_once_and_get_the_row_they_would_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str, shade: u8| {
            let p = dir.path().join(name);
            image::RgbImage::from_fn(40, 36, |x, y| image::Rgb([shade, (x * 6) as u8, (y * 7) as u8])).save(&p).unwrap();
            p
        };
        let (a, b) = (path("a.png", 10), path("b.png", 200));
        let ex = |p: &std::path::Path, label| Example { path: p.to_path_buf(), label };
        let examples = [ex(&a, 0), ex(&b, 0), ex(&a, 0), ex(&a, 1), ex(&a, 0)];
        let cfg = VitConfig::for_tests();
        let model = LoadedModel::random(&cfg, &["x".into(), "y".into()], 0, &Device::Cpu).unwrap();
        let vit = Vit::frozen(&cfg, &model.params).unwrap().with_precision(Precision::F32);
        let images = ImageCache::new(1 << 20, 1 << 20);
        let f = Frozen { vit: &vit, boundary: Boundary::Features, images: &images, model: &model, device: &Device::Cpu, batch: 1 };
        let cancel = AtomicBool::new(false);
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for view in [View::Plain, View::Mirror, View::Crop { seed: 3, index: 1 }] {
            let mut seen = Vec::new();
            let rows = PrefixCache::compute_view(&f, &examples, view, &cancel, &mut |done, total| seen.push((done, total))).unwrap();
            // Three images (a as 0, b, a as 1), one pass each, counted in examples.
            assert_eq!(seen, [(1, 5), (3, 5), (5, 5)], "{view:?}");
            let alone: Vec<Vec<f32>> =
                examples.iter().map(|e| values(&PrefixCache::compute_view(&f, std::slice::from_ref(e), view, &cancel, &mut |_, _| {}).unwrap()[0])).collect();
            let rows: Vec<Vec<f32>> = rows.iter().map(values).collect();
            assert_eq!(rows, alone, "{view:?}");
            assert_eq!(rows[0], rows[2]);
            assert_ne!(rows[0], rows[1]);
            // Plain and mirrored views do not depend on the label; the crop does.
            assert_eq!(rows[0] == rows[3], view != (View::Crop { seed: 3, index: 1 }), "{view:?}");
        }
    }
}
