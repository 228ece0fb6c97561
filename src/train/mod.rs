//! The synchronous fine-tune loop: shuffling and augmentation, forward and backward, optimiser
//! and schedule, per-epoch validation with the best epoch kept, checkpoints, progress events and
//! cancellation. It runs on a plain thread; nothing here is async.

pub mod checkpoint;
pub mod data;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod probe;
pub mod step;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::model::vit::{Dropout, cross_entropy};
use crate::model::{LoadedModel, ModelError, Vit, params as mparams};
use step::{Boundary, boundary, frozen_forward, loss_and_grads, trainable_forward, trainable_set};
use checkpoint::LoopState;
use data::{Example, ImageCache, TrainData, batch_tensor, load_batch, mix};
use metrics::EvalReport;
use optim::{Optimizer, clip_grad_norm, lr_multiplier};
pub use params::{HeadInit, OptimizerKind, Recipe, Scheduler, TrainMode, TrainParams};

/// Why a fine-tune stopped without a model.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("cancelled")]
    Cancelled,
    #[error("invalid hyper-parameter {0}")]
    Params(#[from] params::ParamError),
    #[error("data: {0}")]
    Data(String),
    #[error("unusable checkpoint: {0}")]
    Checkpoint(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Model(ModelError::Candle(e))
    }
}

/// What the loop reports while it runs.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// The plan, once data is loaded; `resumed_from` is the checkpoint epoch continued from.
    Started { epochs: u32, steps_per_epoch: u64, total_steps: u64, train_images: usize, validation_images: usize, resumed_from: Option<u32> },
    /// A checkpoint could not be used; the fine-tune starts over.
    Restarted { reason: String },
    /// One optimiser step (1-based `step` out of `steps`).
    Step { epoch: u32, step: u64, steps: u64, loss: f64, learning_rate: f64, images_per_s: f64 },
    /// Validation after an epoch.
    Epoch { epoch: u32, report: EvalReport, improved: bool },
    /// Epoch `epoch`'s checkpoint is on disk at `dir`.
    Checkpoint { epoch: u32, dir: PathBuf, score: f64 },
    /// Test-split evaluation of the kept model.
    Test { report: EvalReport },
    /// The frozen backbone's features are being computed for the probe (`done` of `total` images).
    Features { done: usize, total: usize },
    /// The probe head was fitted (epoch 1 of a `head_init: probe` run): its regularisation
    /// strength `c` chosen by cross-validation (`cv_accuracy`), and the time it took.
    Probe { c: f64, cv_accuracy: Option<f64>, seconds: f64 },
}

/// How a fine-tune runs, besides its hyper-parameters.
pub struct TrainSpec {
    pub params: TrainParams,
    pub data: TrainData,
    /// Where epoch checkpoints and the best model are written (and resumed from).
    pub checkpoint_root: PathBuf,
    /// Largest image decoded, in pixels.
    pub max_pixels: u64,
    /// Memory for decoded images and cached frozen-backbone outputs, in bytes.
    pub cache_budget: usize,
}

/// The result of a fine-tune.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// A model folder with the best epoch's weights.
    pub best_dir: PathBuf,
    pub best_epoch: u32,
    pub best: EvalReport,
    pub test: Option<EvalReport>,
    pub epochs_run: u32,
    pub history: Vec<EvalReport>,
}

/// Cancellation flag and event sink of a running fine-tune.
pub struct Control<'a> {
    pub cancel: &'a AtomicBool,
    pub on_event: &'a mut dyn FnMut(TrainEvent),
}

/// Frozen-part outputs of a list of examples, kept when they fit in the budget.
struct PrefixCache {
    rows: Option<Vec<Tensor>>,
}

impl PrefixCache {
    fn build(
        frozen: &Vit,
        b: Boundary,
        examples: &[Example],
        images: &ImageCache,
        model: &LoadedModel,
        device: &Device,
        batch: usize,
        budget: usize,
    ) -> Result<Self, TrainError> {
        let cfg = &model.cfg;
        let per_example = match b {
            Boundary::Pixels => 3 * cfg.image_size.0 * cfg.image_size.1,
            Boundary::Layer(_) => cfg.num_tokens() * cfg.hidden_size,
            Boundary::Features => cfg.hidden_size,
        } * 4;
        if per_example * examples.len() > budget {
            return Ok(Self { rows: None });
        }
        let never = AtomicBool::new(false);
        let rows = Self::build_with_progress(frozen, b, examples, images, model, device, batch, &never, &mut |_| {})?;
        Ok(Self { rows: Some(rows) })
    }

    /// Frozen-part outputs of every example (no budget check), reporting progress.
    #[allow(clippy::too_many_arguments)]
    fn build_with_progress(
        frozen: &Vit,
        b: Boundary,
        examples: &[Example],
        images: &ImageCache,
        model: &LoadedModel,
        device: &Device,
        batch: usize,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<Vec<Tensor>, TrainError> {
        let mut rows = Vec::with_capacity(examples.len());
        for chunk in examples.chunks(batch) {
            if cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let refs: Vec<&Example> = chunk.iter().collect();
            let pixels = batch_tensor(load_batch(&refs, images, &model.preprocessor, None)?, &model.preprocessor, device)?;
            let out = frozen_forward(frozen, b, &pixels)?;
            for i in 0..chunk.len() {
                rows.push(out.get(i)?);
            }
            on_event(TrainEvent::Features { done: rows.len(), total: examples.len() });
        }
        Ok(rows)
    }

    /// The frozen-part output of examples `idx` of `examples`, from the cache or computed now.
    #[allow(clippy::too_many_arguments)]
    fn batch(
        &self,
        idx: &[usize],
        examples: &[Example],
        frozen: &Vit,
        b: Boundary,
        images: &ImageCache,
        model: &LoadedModel,
        device: &Device,
        augment: Option<(u64, u64)>,
    ) -> Result<Tensor, TrainError> {
        if augment.is_none()
            && let Some(rows) = &self.rows
        {
            let picked: Vec<&Tensor> = idx.iter().map(|&i| &rows[i]).collect();
            return Ok(Tensor::stack(&picked, 0)?);
        }
        let refs: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
        let pixels = batch_tensor(load_batch(&refs, images, &model.preprocessor, augment)?, &model.preprocessor, device)?;
        frozen_forward(frozen, b, &pixels)
    }
}

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
    let cache = PrefixCache { rows: None };
    evaluate_with(&vit, Boundary::Pixels, &cache, model, examples, images, device, batch, cancel)
}

#[allow(clippy::too_many_arguments)]
fn evaluate_with(
    frozen: &Vit,
    b: Boundary,
    cache: &PrefixCache,
    model: &LoadedModel,
    examples: &[Example],
    images: &ImageCache,
    device: &Device,
    batch: usize,
    cancel: Option<&AtomicBool>,
) -> Result<EvalReport, TrainError> {
    let mut truth = Vec::with_capacity(examples.len());
    let mut predicted = Vec::with_capacity(examples.len());
    let mut loss_sum = 0.0;
    let all: Vec<usize> = (0..examples.len()).collect();
    for idx in all.chunks(batch.max(1)) {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(TrainError::Cancelled);
        }
        let input = cache.batch(idx, examples, frozen, b, images, model, device, None)?;
        let logits = trainable_forward(frozen, b, &input, None)?;
        let targets: Vec<u32> = idx.iter().map(|&i| examples[i].label).collect();
        let loss = cross_entropy(&logits, &targets, 0.0, None)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        loss_sum += loss * idx.len() as f64;
        predicted.extend(logits.argmax(1)?.to_vec1::<u32>()?);
        truth.extend(targets);
    }
    Ok(EvalReport::compute(&model.cfg.labels, &truth, &predicted, loss_sum))
}

/// A stable fingerprint of what determines a run, so checkpoints are only resumed by the run
/// that wrote them.
fn fingerprint(p: &TrainParams, data: &TrainData, model: &LoadedModel) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_string(p).unwrap_or_default());
    h.update(serde_json::to_string(&data.labels).unwrap_or_default());
    for (split, exs) in [("t", &data.train), ("v", &data.validation), ("s", &data.test)] {
        h.update(split);
        for e in exs.iter() {
            h.update(e.path.to_string_lossy().as_bytes());
            h.update(e.label.to_le_bytes());
        }
    }
    h.update(model.params.num_scalars().to_le_bytes());
    hex::encode(h.finalize())
}

/// Better validation: higher macro-F1, then lower loss.
fn better(a: (f64, f64), b: Option<(f64, f64)>) -> bool {
    match b {
        None => true,
        Some(b) => a.0 > b.0 || (a.0 == b.0 && a.1 < b.1),
    }
}

/// Fine-tunes `model` in place. Validation is split off first when `data` has none. Resumes from
/// the latest matching checkpoint under `spec.checkpoint_root`; an unusable one is reported with
/// [`TrainEvent::Restarted`] and the run starts over. On success, `model` holds the best epoch's
/// weights, which are also in `TrainOutcome::best_dir`.
pub fn fine_tune(model: &mut LoadedModel, spec: TrainSpec, device: &Device, ctl: Control) -> Result<TrainOutcome, TrainError> {
    let p = spec.params.clone();
    p.validate()?;
    let mut data = spec.data;
    if data.labels != model.cfg.labels {
        return Err(TrainError::Data(format!(
            "the data's classes {:?} differ from the model's labels {:?}",
            data.labels, model.cfg.labels
        )));
    }
    data.ensure_validation(p.validation_split, p.seed);
    if data.train.is_empty() {
        return Err(TrainError::Data("no training images".into()));
    }
    if data.validation.is_empty() {
        return Err(TrainError::Data("no validation images (every class has a single image)".into()));
    }
    let root = spec.checkpoint_root.clone();
    std::fs::create_dir_all(&root)?;
    let fp = fingerprint(&p, &data, model);
    let set = trainable_set(&p);
    let num_layers = model.cfg.num_hidden_layers;
    let b = boundary(set, num_layers);
    let batch = p.batch_size as usize;
    let accum = p.gradient_accumulation_steps as u64;
    let batches_per_epoch = data.train.len().div_ceil(batch) as u64;
    let steps_per_epoch = batches_per_epoch.div_ceil(accum);
    // With a probe head, epoch 1 fits the head without gradient steps.
    let probe_epochs = u32::from(p.head_init == HeadInit::Probe);
    let total_steps = steps_per_epoch * u64::from(p.epochs - probe_epochs);
    let warmup = (p.warmup_ratio * total_steps as f64).ceil() as u64;
    let images = ImageCache::new(spec.max_pixels, spec.cache_budget / 2);

    let mut optimizer = Optimizer::new(p.optimizer, p.weight_decay, p.momentum);
    let mut state = LoopState {
        fingerprint: fp.clone(),
        epoch: 0,
        global_step: 0,
        best_epoch: None,
        best_score: None,
        epochs_since_best: 0,
        history: vec![],
    };
    let mut resumed_from = None;
    match checkpoint::load_latest(&root, &fp) {
        Ok(Some(restored)) => {
            model.params.load_from(&restored.weights)?;
            optimizer.load_state(restored.optimizer, device)?;
            state = restored.state;
            resumed_from = Some(state.epoch);
        }
        Ok(None) => {}
        Err(e) => {
            (ctl.on_event)(TrainEvent::Restarted { reason: e.to_string() });
            checkpoint::clear(&root)?;
            std::fs::create_dir_all(&root)?;
        }
    }
    (ctl.on_event)(TrainEvent::Started {
        epochs: p.epochs,
        steps_per_epoch,
        total_steps,
        train_images: data.train.len(),
        validation_images: data.validation.len(),
        resumed_from,
    });

    let frozen = Vit::frozen(&model.cfg, &model.params)?;
    // Frozen-part outputs never change during the run: cache them (for training only when
    // augmentation is off, since augmented views differ every epoch).
    let budget = spec.cache_budget / 2;
    let val_cache = if b == Boundary::Pixels {
        PrefixCache { rows: None }
    } else {
        PrefixCache::build(&frozen, b, &data.validation, &images, model, device, batch, budget / 2)?
    };
    let train_cache = if b == Boundary::Pixels || p.augment {
        PrefixCache { rows: None }
    } else {
        PrefixCache::build(&frozen, b, &data.train, &images, model, device, batch, budget / 2)?
    };
    let head_scale = p.head_learning_rate.map_or(1.0, |h| h / p.learning_rate);

    if probe_epochs == 1 && state.epoch == 0 {
        let started = Instant::now();
        let fb = Boundary::Features;
        let feats = if b == fb && train_cache.rows.is_some() {
            train_cache.rows.clone().unwrap_or_default()
        } else {
            PrefixCache::build_with_progress(&frozen, fb, &data.train, &images, model, device, batch, ctl.cancel, &mut *ctl.on_event)?
        };
        let flat: Vec<f32> = Tensor::stack(&feats, 0)?.flatten_all()?.to_vec1::<f32>()?;
        let labels: Vec<u32> = data.train.iter().map(|e| e.label).collect();
        let fitted = probe::fit(&flat, &labels, data.labels.len(), p.seed);
        let k = data.labels.len();
        let d = flat.len() / labels.len();
        let mut head = BTreeMap::new();
        head.insert("classifier.weight".to_string(), Tensor::from_vec(fitted.weight, (k, d), device)?);
        head.insert("classifier.bias".to_string(), Tensor::from_vec(fitted.bias, k, device)?);
        model.params.set_some(&head)?;
        (ctl.on_event)(TrainEvent::Probe { c: fitted.c, cv_accuracy: fitted.cv_accuracy, seconds: started.elapsed().as_secs_f64() });
        let eval_vit = Vit::frozen(&model.cfg, &model.params)?;
        let report = evaluate_with(&eval_vit, b, &val_cache, model, &data.validation, &images, device, batch, Some(ctl.cancel))?;
        end_epoch(&root, model, &optimizer, &mut state, 1, report, &mut *ctl.on_event)?;
    }

    let mut epoch = state.epoch;
    while epoch < p.epochs {
        epoch += 1;
        let mut order: Vec<usize> = (0..data.train.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(p.seed, u64::from(epoch))));
        let mut dropout_rng = ChaCha8Rng::seed_from_u64(mix(p.seed, 0x64726f70 + u64::from(epoch)));
        let augment = p.augment.then_some((p.seed, u64::from(epoch)));
        let mut acc: BTreeMap<String, Tensor> = BTreeMap::new();
        let (mut micro, mut micro_loss) = (0u64, 0.0f64);
        let mut step_start = Instant::now();
        let mut step_images = 0usize;
        for (bi, idx) in order.chunks(batch).enumerate() {
            if ctl.cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let vit = Vit::new(&model.cfg, &model.params, &|n| set.contains(n, num_layers))?;
            let input = train_cache.batch(idx, &data.train, &frozen, b, &images, model, device, augment)?;
            let targets: Vec<u32> = idx.iter().map(|&i| data.train[i].label).collect();
            let mut dropout = Dropout { rng: &mut dropout_rng };
            let (loss, grads) = loss_and_grads(&vit, &model.params, set, b, &input, &targets, p.label_smoothing, Some(&mut dropout))?;
            for (name, g) in grads {
                let g = match acc.remove(&name) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                acc.insert(name, g);
            }
            micro += 1;
            micro_loss += loss;
            step_images += idx.len();
            let last = bi as u64 + 1 == batches_per_epoch;
            if micro == accum || last {
                if micro > 1 {
                    for g in acc.values_mut() {
                        *g = (&*g / micro as f64)?;
                    }
                }
                clip_grad_norm(&mut acc, p.max_grad_norm)?;
                let mult = lr_multiplier(p.lr_scheduler, state.global_step, total_steps, warmup);
                let lr = p.learning_rate * mult;
                optimizer.step(&model.params, &acc, &|n| if mparams::is_head(n) { lr * head_scale } else { lr })?;
                state.global_step += 1;
                let secs = step_start.elapsed().as_secs_f64().max(1e-9);
                (ctl.on_event)(TrainEvent::Step {
                    epoch,
                    step: state.global_step,
                    steps: total_steps,
                    loss: micro_loss / micro as f64,
                    learning_rate: lr,
                    images_per_s: step_images as f64 / secs,
                });
                acc.clear();
                micro = 0;
                micro_loss = 0.0;
                step_images = 0;
                step_start = Instant::now();
            }
        }

        let eval_vit = Vit::frozen(&model.cfg, &model.params)?;
        let report = evaluate_with(&eval_vit, b, &val_cache, model, &data.validation, &images, device, batch, Some(ctl.cancel))?;
        end_epoch(&root, model, &optimizer, &mut state, epoch, report, &mut *ctl.on_event)?;
        if p.early_stopping_patience.is_some_and(|pat| state.epochs_since_best >= pat) {
            break;
        }
    }

    let best_epoch = state.best_epoch.ok_or_else(|| TrainError::Checkpoint("no epoch completed".into()))?;
    let best_dir = checkpoint::best_dir(&root);
    let best = LoadedModel::load(&crate::model::ModelSource::Dir(best_dir.clone()), Some(&data.labels), device, p.seed)?;
    model.params.load_from(&best.params.snapshot()?)?;
    let test = if data.test.is_empty() {
        None
    } else {
        let report = evaluate(model, &data.test, &images, device, batch, Some(ctl.cancel))?;
        (ctl.on_event)(TrainEvent::Test { report: report.clone() });
        Some(report)
    };
    let best_report = state.history[best_epoch as usize - 1].clone();
    Ok(TrainOutcome { best_dir, best_epoch, best: best_report, test, epochs_run: state.epoch, history: state.history })
}

/// Records epoch `epoch`'s validation, keeps the model when it is the best so far and writes the
/// epoch checkpoint.
fn end_epoch(
    root: &Path,
    model: &LoadedModel,
    optimizer: &Optimizer,
    state: &mut LoopState,
    epoch: u32,
    report: EvalReport,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<(), TrainError> {
    let score = (report.f1, report.loss);
    let improved = better(score, state.best_score);
    state.epoch = epoch;
    state.history.push(report.clone());
    if improved {
        state.best_epoch = Some(epoch);
        state.best_score = Some(score);
        state.epochs_since_best = 0;
        model.save(&checkpoint::best_dir(root))?;
    } else {
        state.epochs_since_best += 1;
    }
    on_event(TrainEvent::Epoch { epoch, report, improved });
    let dir = checkpoint::save(root, &model.cfg, &model.preprocessor, &model.params.snapshot()?, &optimizer.state()?, state)?;
    on_event(TrainEvent::Checkpoint { epoch, dir, score: score.0 });
    Ok(())
}

/// The default memory budget for decoded images and cached frozen-backbone outputs: 4 GiB.
pub fn default_cache_budget() -> usize {
    4usize << 30
}

/// Path helper: the checkpoint root used by `vitforge train --output DIR`.
pub fn cli_checkpoint_root(output: &Path) -> PathBuf {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    output.with_file_name(format!(".{name}.checkpoints"))
}
