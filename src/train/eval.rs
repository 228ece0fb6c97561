//! Evaluation of a model on labelled examples: per epoch on the validation split, on the test
//! split at the end of a run, and the one path that both `POST /models/{id}/evaluate` and
//! `vitforge eval` take to evaluate a model on a split of a labelled set.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};
use serde::Deserialize;

use super::TrainError;
use super::data::{Example, ImageCache, TrainData};
use super::features::{Frozen, PrefixCache};
use super::report::EvalReport;
use crate::dataset::Split;
use crate::model::network::trainable_forward;
use crate::model::vit::cross_entropy;
use crate::model::{Boundary, LoadedModel, Vit};

/// Evaluates `model` on examples (evaluation transforms; loss without smoothing).
pub fn evaluate(
    model: &LoadedModel,
    examples: &[Example],
    images: &ImageCache,
    device: &Device,
    batch: usize,
    cancel: Option<&AtomicBool>,
) -> Result<EvalReport, TrainError> {
    let vit = Vit::frozen(&model.cfg, &model.params)?;
    let frozen = Frozen { vit: &vit, boundary: Boundary::Pixels, images, model, device, batch };
    evaluate_with(&frozen, &PrefixCache::empty(), examples, cancel, &mut |_, _| {})
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
    let mut truth = Vec::with_capacity(examples.len());
    let mut predicted = Vec::with_capacity(examples.len());
    let mut loss_sum = 0.0;
    let all: Vec<usize> = (0..examples.len()).collect();
    for idx in all.chunks(f.batch.max(1)) {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(TrainError::Cancelled);
        }
        let input = cache.batch(f, idx, examples, None)?;
        let logits = trainable_forward(f.vit, f.boundary, &input, None)?;
        let targets: Vec<u32> = idx.iter().map(|&i| examples[i].label).collect();
        let loss = cross_entropy(&logits, &targets, 0.0, None)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        loss_sum += loss * idx.len() as f64;
        predicted.extend(logits.argmax(1)?.to_vec1::<u32>()?);
        truth.extend(targets);
        progress(truth.len(), examples.len());
    }
    Ok(EvalReport::compute(&f.model.cfg.labels, &truth, &predicted, loss_sum))
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
/// split when there is one, else every image). Every class of the records must be one of the
/// model's labels.
pub fn evaluate_records(
    model: &LoadedModel,
    records: Vec<(PathBuf, String, Split)>,
    split: Option<EvalSplit>,
    max_pixels: u64,
    batch: usize,
    device: &Device,
) -> Result<Evaluation, EvalError> {
    let labels = &model.cfg.labels;
    let mut unknown: Vec<String> = records.iter().map(|r| r.1.clone()).filter(|c| !labels.contains(c)).collect();
    unknown.sort();
    unknown.dedup();
    if !unknown.is_empty() {
        return Err(EvalError::UnknownClasses { unknown, labels: labels.clone() });
    }
    let split = split.unwrap_or(if records.iter().any(|r| r.2 == Split::Test) { EvalSplit::Test } else { EvalSplit::All });
    let kept: Vec<_> = records.into_iter().filter(|r| split.keeps(r.2)).collect();
    if kept.is_empty() {
        return Err(EvalError::EmptySplit);
    }
    let data = TrainData::with_labels(labels.clone(), kept)?;
    let examples = [data.train, data.validation, data.test].concat();
    let images = ImageCache::new(max_pixels, 0);
    let report = evaluate(model, &examples, &images, device, batch.max(1), None)?;
    Ok(Evaluation { report, num_images: examples.len() })
}
