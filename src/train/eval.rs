//! Evaluation of a model on labelled examples: per epoch on the validation split, on the test
//! split at the end of a run, and the one path that both `POST /models/{id}/evaluate` and
//! `vitforge eval` take to evaluate a model on a split of a labelled set.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};
use serde::Deserialize;

use super::TrainError;
use super::data::{Example, ImageCache, TrainData};
use super::features::{Frozen, PrefixCache, distinct_images};
use super::report::EvalReport;
use crate::dataset::Split;
use crate::model::network::trainable_forward;
use crate::model::{Boundary, LoadedModel, Precision, Vit};

/// Evaluates `model` on examples (evaluation transforms; loss without smoothing), its products
/// at `precision`, reporting `(images done, images)` after each batch.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    model: &LoadedModel,
    examples: &[Example],
    images: &ImageCache,
    device: &Device,
    batch: usize,
    precision: Precision,
    cancel: Option<&AtomicBool>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalReport, TrainError> {
    // The weights do not change while it runs: in bf16, converted and packed once for all its
    // batches.
    let vit = Vit::frozen(&model.cfg, &model.params)?.with_precision(precision).packed_for_inference()?;
    let frozen = Frozen { vit: &vit, boundary: Boundary::Pixels, images, model, device, batch };
    evaluate_with(&frozen, &PrefixCache::empty(), examples, cancel, progress)
}

/// Evaluates on examples whose frozen-part outputs come from `cache` (or are computed by `f`),
/// reporting `(images done, images)` after each batch.
pub fn evaluate_with(
    f: &Frozen,
    cache: &PrefixCache,
    examples: &[Example],
    cancel: Option<&AtomicBool>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalReport, TrainError> {
    let logits = logits_with(f, cache, examples, cancel, progress)?;
    Ok(logits.report(&f.model.cfg.labels, 1.0))
}

/// The logits of a set of examples, with their true labels.
#[derive(Debug, Clone)]
pub struct Logits {
    /// One row per example, in order.
    pub rows: Vec<Vec<f32>>,
    pub truth: Vec<u32>,
}

impl Logits {
    /// The report of the model whose logits are these times `scale` (1/temperature): loss
    /// without smoothing, classification figures, and calibration.
    pub fn report(&self, labels: &[String], scale: f64) -> EvalReport {
        let mut loss_sum = 0.0;
        let mut predicted = Vec::with_capacity(self.rows.len());
        let mut scores = Vec::with_capacity(self.rows.len());
        for (row, &t) in self.rows.iter().zip(&self.truth) {
            let log_p = log_softmax(row, scale);
            let (best, top) = top(&log_p);
            loss_sum -= log_p[t as usize];
            predicted.push(best as u32);
            scores.push(top.exp());
        }
        EvalReport::compute(labels, &self.truth, &predicted, &scores, loss_sum)
    }

    /// The examples predicted wrong (at `scale`), the most confident first, at most
    /// [`MAX_MISTAKES`]: what a person looks at to see what the model gets wrong.
    pub fn mistakes(&self, examples: &[Example], scale: f64) -> Vec<Mistake> {
        let mut out: Vec<Mistake> = self
            .rows
            .iter()
            .zip(&self.truth)
            .zip(examples)
            .filter_map(|((row, &label), example)| {
                let log_p = log_softmax(row, scale);
                let (predicted, top) = top(&log_p);
                (predicted as u32 != label).then(|| Mistake { path: example.path.clone(), label, predicted: predicted as u32, score: top.exp() })
            })
            .collect();
        out.sort_by(|a, b| b.score.total_cmp(&a.score));
        out.truncate(MAX_MISTAKES);
        out
    }

    /// How many examples are predicted wrong (as [`Logits::report`] and [`Logits::mistakes`]
    /// predict: the first highest score).
    pub fn wrong(&self) -> usize {
        self.rows.iter().zip(&self.truth).filter(|(row, label)| top(&log_softmax(row, 1.0)).0 as u32 != **label).count()
    }

    /// Mean negative log-likelihood of the truth at `scale` (1/temperature).
    pub fn nll(&self, scale: f64) -> f64 {
        let sum: f64 = self.rows.iter().zip(&self.truth).map(|(row, &t)| -log_softmax(row, scale)[t as usize]).sum();
        sum / self.rows.len().max(1) as f64
    }
}

/// The predicted class (the first highest log-probability) and its log-probability.
fn top(log_p: &[f64]) -> (usize, f64) {
    log_p.iter().enumerate().fold((0, f64::NEG_INFINITY), |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc })
}

/// Most mistakes kept per evaluation.
pub const MAX_MISTAKES: usize = 100;

/// An example the model got wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Mistake {
    /// The image file.
    pub path: PathBuf,
    /// Its true class and the predicted one (label indices).
    pub label: u32,
    pub predicted: u32,
    /// The predicted class's probability.
    pub score: f64,
}

/// log softmax(scale · row), in f64.
fn log_softmax(row: &[f32], scale: f64) -> Vec<f64> {
    let z: Vec<f64> = row.iter().map(|&v| f64::from(v) * scale).collect();
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
    z.iter().map(|v| v - lse).collect()
}

/// The logits of examples whose frozen-part outputs come from `cache` (or are computed by `f`),
/// reporting `(images done, images)` after each batch. The copies of a file under one label are
/// computed once.
pub fn logits_with(
    f: &Frozen,
    cache: &PrefixCache,
    examples: &[Example],
    cancel: Option<&AtomicBool>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Logits, TrainError> {
    let (first, slot) = distinct_images(examples);
    let mut rows = Vec::with_capacity(first.len());
    for idx in first.chunks(f.batch.max(1)) {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(TrainError::Cancelled);
        }
        let input = cache.batch(f, idx, examples, None)?;
        let logits = trainable_forward(f.vit, f.boundary, &input, None)?;
        rows.extend(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        // In examples, so that the count ends at their number.
        progress(rows.len() * examples.len() / first.len(), examples.len());
    }
    Ok(Logits { rows: slot.into_iter().map(|s| rows[s].clone()).collect(), truth: examples.iter().map(|e| e.label).collect() })
}

/// Which images of a labelled set an evaluation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EvalSplit {
    All,
    Train,
    Validation,
    Test,
}

impl EvalSplit {
    /// Whether an image of split `s` is evaluated.
    pub fn keeps(self, s: Split) -> bool {
        match self {
            EvalSplit::All => true,
            EvalSplit::Train => s == Split::Train,
            EvalSplit::Validation => s == Split::Validation,
            EvalSplit::Test => s == Split::Test,
        }
    }
}

/// Why a model could not be evaluated on a labelled set.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("the dataset has classes the model does not know: {unknown:?} (model labels: {labels:?})")]
    UnknownClasses { unknown: Vec<String>, labels: Vec<String> },
    #[error("the dataset has no image in the requested split")]
    EmptySplit,
    #[error(transparent)]
    Train(#[from] TrainError),
}

/// An evaluation: the report and how many images it rests on.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub report: EvalReport,
    pub num_images: usize,
}

/// Evaluates `model` on the `(image file, class, split)` records of `split` (default: the test
/// split when there is one, else every image), its products at `precision`. Every class of the
/// records of that split must be one of the model's labels.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_records(
    model: &LoadedModel,
    records: Vec<(PathBuf, String, Split)>,
    split: Option<EvalSplit>,
    max_pixels: u64,
    batch: usize,
    device: &Device,
    precision: Precision,
    cancel: &AtomicBool,
) -> Result<Evaluation, EvalError> {
    evaluate_records_with_progress(model, records, split, max_pixels, batch, device, precision, Some(cancel), &mut |_, _| {})
}

/// [`evaluate_records`], reporting `(images done, images)` after each forward pass; stopped
/// (`TrainError::Cancelled`) between batches once `cancel` is set.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_records_with_progress(
    model: &LoadedModel,
    records: Vec<(PathBuf, String, Split)>,
    split: Option<EvalSplit>,
    max_pixels: u64,
    batch: usize,
    device: &Device,
    precision: Precision,
    cancel: Option<&AtomicBool>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Evaluation, EvalError> {
    let labels = &model.cfg.labels;
    let split = split.unwrap_or(if records.iter().any(|r| r.2 == Split::Test) { EvalSplit::Test } else { EvalSplit::All });
    let kept: Vec<_> = records.into_iter().filter(|r| split.keeps(r.2)).collect();
    if kept.is_empty() {
        return Err(EvalError::EmptySplit);
    }
    // Only the classes of the images evaluated matter: other splits may have more.
    let mut unknown: Vec<String> = kept.iter().map(|r| r.1.clone()).filter(|c| !labels.contains(c)).collect();
    unknown.sort();
    unknown.dedup();
    if !unknown.is_empty() {
        return Err(EvalError::UnknownClasses { unknown, labels: labels.clone() });
    }
    let data = TrainData::with_labels(labels.clone(), kept)?;
    let examples = [data.train, data.validation, data.test].concat();
    let images = ImageCache::new(max_pixels, 0);
    let report = evaluate(model, &examples, &images, device, batch.max(1), precision, cancel, progress)?;
    Ok(Evaluation { report, num_images: examples.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluating_records_reports_progress_after_each_forward_pass_and_stops_when_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let labels = vec!["a".to_string(), "b".to_string()];
        let mut records = Vec::new();
        for i in 0..5u8 {
            let path = dir.path().join(format!("{i}.png"));
            image::RgbImage::from_pixel(8, 8, image::Rgb([40 * i, 0, 0])).save(&path).unwrap();
            records.push((path, labels[usize::from(i % 2)].clone(), Split::Test));
        }
        let cfg = crate::model::VitConfig::for_tests();
        let model = LoadedModel::random(&cfg, &labels, 0, &Device::Cpu).unwrap();
        let mut seen = Vec::new();
        let evaluation = evaluate_records_with_progress(&model, records.clone(), None, 1 << 20, 2, &Device::Cpu, Precision::F32, None, &mut |done, total| {
            seen.push((done, total))
        })
        .unwrap();
        assert_eq!(evaluation.num_images, 5);
        assert_eq!(seen, [(2, 5), (4, 5), (5, 5)]);
        // Cancelled after its first batch (its client went away): it stops there.
        let (cancel, mut seen) = (AtomicBool::new(false), Vec::new());
        let stopped = evaluate_records_with_progress(&model, records, None, 1 << 20, 2, &Device::Cpu, Precision::F32, Some(&cancel), &mut |done, total| {
            seen.push((done, total));
            cancel.store(true, Ordering::Relaxed);
        });
        assert!(matches!(stopped, Err(EvalError::Train(TrainError::Cancelled))), "{stopped:?}");
        assert_eq!(seen, [(2, 5)]);
    }

    /// The copies of a file are evaluated once and counted as often as they stand: the report is
    /// that of distinct files with the same pixels.
    #[test]
    fn copies_of_a_file_are_evaluated_once_and_counted_each() {
        let dir = tempfile::tempdir().unwrap();
        let labels = vec!["a".to_string(), "b".to_string()];
        let save = |name: &str, shade: u8| {
            let path = dir.path().join(name);
            image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([shade, (x * 30) as u8, (y * 30) as u8])).save(&path).unwrap();
            path
        };
        let (a, b, a_again) = (save("a.png", 0), save("b.png", 250), save("a2.png", 0));
        let cfg = crate::model::VitConfig::for_tests();
        let model = LoadedModel::random(&cfg, &labels, 0, &Device::Cpu).unwrap();
        let run = |third: &PathBuf| {
            let records = vec![(a.clone(), "a".to_string(), Split::Test), (b.clone(), "b".to_string(), Split::Test), (third.clone(), "a".to_string(), Split::Test)];
            let mut seen = Vec::new();
            let e = evaluate_records_with_progress(&model, records, None, 1 << 20, 1, &Device::Cpu, Precision::F32, None, &mut |done, total| seen.push((done, total)))
                .unwrap();
            (e, seen)
        };
        let (copies, seen_copies) = run(&a);
        let (distinct, seen_distinct) = run(&a_again);
        assert_eq!(seen_copies, [(1, 3), (3, 3)], "a's copy was evaluated again");
        assert_eq!(seen_distinct, [(1, 3), (2, 3), (3, 3)]);
        assert_eq!((copies.num_images, &copies.report), (3, &distinct.report));
    }
}
