//! The fine-tune, step by step: [`fine_tune`] reads as the recipe (check the data, plan the
//! schedule, resume or start, fit the probe head, run gradient epochs, finish), and each step is a
//! function of its own below.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use super::checkpoint::{self, LoopState};
use super::data::{ImageCache, SplitOrder, TrainData, mix};
use super::calibrate::{self, Calibration};
use super::eval::{Mistake, logits_with};
use super::features::{Frozen, PrefixCache, View};
use super::progress::Phase;
use super::auto::{self, Decision, Situation};
use super::hyperparams::{AfterProbe, HeadInit, TrainMode, TrainParams};
use super::memory::{self, MemoryLimit};
use super::optim::{Optimizer, clip_grad_norm, lr_multiplier};
use super::report::EvalReport;
use super::{Control, TrainError, TrainEvent, TrainOutcome, TrainSpec, probe};
use crate::dataset::BlobStore;
use crate::model::network::{Objective, loss_and_grads};
use crate::model::vit::Dropout;
use crate::model::weights::keys;
use crate::model::{Boundary, LoadedModel, ModelSource, Precision, TrainableSet, Vit};

/// Fine-tunes `model` in place. Validation is split off first when `data` has none. Resumes from
/// the latest matching checkpoint under `spec.checkpoint_root`; an unusable one is reported with
/// [`TrainEvent::Restarted`] and the run starts over. On success, `model` holds the best epoch's
/// weights, which are also in `TrainOutcome::best_dir`.
pub fn fine_tune(model: &mut LoadedModel, spec: TrainSpec, device: &Device, mut ctl: Control) -> Result<TrainOutcome, TrainError> {
    let started = Instant::now();
    let p = spec.params.clone();
    p.validate()?;
    p.validate_for(model.cfg.num_hidden_layers)?;
    let root = spec.checkpoint_root.clone();
    let (data, split, fingerprints) = checked_data(spec.data, model, &p, &root)?;
    at_path(std::fs::create_dir_all(&root), "creating the checkpoint folder", &root)?;
    let mut optimizer = Optimizer::new(p.optimizer, p.weight_decay, p.momentum);
    let (mut state, resumed_from) = resume_or_start(&root, fingerprints, model, &mut optimizer, device, &mut ctl)?;
    state.split = split;
    // The time budget counts the seconds of earlier attempts of this run too.
    let clock = Clock { before: state.seconds, since: started };
    report_phase(&mut ctl, Phase::Loading, 1, 1);
    // A decision an earlier attempt of this run took stands.
    let params = state.decision.as_ref().map_or_else(|| p.clone(), |d| auto::apply(&p, d));
    let plan = Plan::new(&params, model, data.train.len());
    (ctl.on_event)(TrainEvent::Started {
        epochs: params.epochs,
        steps_per_epoch: plan.steps_per_epoch,
        total_steps: plan.total_steps,
        train_images: data.train.len(),
        validation_images: data.validation.len(),
        resumed_from,
        steps_done: state.global_step,
        precision: params.precision.resolve(device),
    });
    let limits = (spec.max_pixels, spec.cache_budget, spec.memory_limit.as_ref());
    let mut run = Run::prepare(params, &data, limits, plan, &root, model, device, &mut ctl)?;
    if run.plan.probe_epochs == 1 && state.epoch == 0 {
        let decide = p.after_probe == AfterProbe::Auto;
        probe_epoch(&run, model, &optimizer, &mut state, decide, clock, &mut ctl)?;
        if let Some(d) = &state.decision {
            let params = auto::apply(&p, d);
            let plan = Plan::new(&params, model, data.train.len());
            (ctl.on_event)(TrainEvent::Decided { decision: d.clone(), epochs: params.epochs, total_steps: plan.total_steps });
            run = Run::prepare(params, &data, limits, plan, &root, model, device, &mut ctl)?;
        }
    }
    while state.epoch < run.p.epochs {
        let epoch = state.epoch + 1;
        if let Some((why, stop)) = stop_before(&run.p, &state) {
            (ctl.on_event)(TrainEvent::Stopped { why, decision: stop.clone(), epochs: state.epoch, total_steps: state.global_step });
            state.decision = Some(stop);
            break;
        }
        let epoch_started = Instant::now();
        gradient_epoch(&run, model, &mut optimizer, &mut state, epoch, &mut ctl)?;
        let validation = validate(&run, model, &mut ctl)?;
        if !validation.0.loss.is_finite() {
            return Err(TrainError::Diverged(format!("the validation loss after epoch {epoch} is {}", validation.0.loss)));
        }
        (state.next_epoch_seconds, state.seconds) = (Some(epoch_started.elapsed().as_secs_f64()), clock.secs());
        end_epoch(&root, model, &optimizer, &mut state, epoch, validation, &mut ctl)?;
    }
    finish(&run, model, state, &mut ctl)
}

/// Seconds a run has spent: those of its earlier attempts (from its checkpoint) and this one's.
#[derive(Debug, Clone, Copy)]
struct Clock {
    before: f64,
    since: Instant,
}

impl Clock {
    fn secs(&self) -> f64 {
        self.before + self.since.elapsed().as_secs_f64()
    }
}

/// Why a run that has completed `state.epoch` epochs stops before the next, if it does: early
/// stopping's patience ran out, or, with a time budget, the next epoch would end past it (its
/// length estimated from the last epoch, or from the probe's measurements). Both follow from the
/// loop state, so a run resumed from its checkpoint stops where the interrupted attempt did (or
/// would have). Returns why, and the run's decision with the stop: the action `auto` decided,
/// its reason followed by why. The seconds spent are those the checkpoint records (up to the end
/// of the last epoch's validation), not the clock's: with the clock, the writing of the last
/// checkpoint counted in the attempt that wrote it and not in one resumed from it, so a stop that
/// barely tripped could be missed on resume. (That writing counts from the next epoch on.)
fn stop_before(p: &TrainParams, state: &LoopState) -> Option<(String, Decision)> {
    let (done, elapsed) = (state.epoch, state.seconds);
    if done == 0 {
        return None;
    }
    let why = match p.early_stopping_patience.filter(|&patience| state.epochs_since_best >= patience) {
        Some(patience) => format!(
            "stopped early after epoch {done}: neither the validation macro-F1 nor the validation loss improved in the last {patience} epoch(s) (early_stopping_patience)"
        ),
        None => {
            let budget = p.time_budget_secs? as f64;
            match state.next_epoch_seconds {
                // The budget is spent already (the probe alone may spend it): no estimate needed.
                _ if elapsed >= budget => {
                    format!("stopped after epoch {done}: the time budget of {budget:.0} s is spent ({elapsed:.0} s)")
                }
                Some(secs) if elapsed + secs > budget => format!(
                    "stopped after epoch {done}: another epoch (about {secs:.0} s) would end past the time budget of {budget:.0} s ({elapsed:.0} s spent)"
                ),
                _ => return None,
            }
        }
    };
    let (action, reason) = match &state.decision {
        Some(d) => (d.action, format!("{}; {why}", d.reason)),
        None => (auto::Action::AsGiven, why.clone()),
    };
    Some((why, Decision { action, epochs: done, reason }))
}

/// `result` with an I/O failure described by what was being done and the path (the bare
/// operating-system message, "Permission denied", names neither).
fn at_path<T, E: Into<TrainError>>(result: Result<T, E>, doing: &str, path: &Path) -> Result<T, TrainError> {
    result.map_err(|e| match e.into() {
        TrainError::Io(e) | TrainError::Model(crate::model::ModelError::Io(e)) => TrainError::Files(format!("{doing} {}: {e}", path.display())),
        other => other,
    })
}

/// Reports progress within a phase.
fn report_phase(ctl: &mut Control, phase: Phase, done: usize, total: usize) {
    (ctl.on_event)(TrainEvent::Phase { phase, done: done as u64, total: total as u64 });
}

/// The data of a run, and how it split validation images off (none where the data has a
/// validation split): its classes match the model's labels, and neither training nor validation
/// is empty. The split is the one recorded in the latest checkpoint under `root` where that
/// checkpoint is this run's with it (its fingerprint then matches), so a run resumed by a
/// version of the service that chooses validation images differently goes on with the ones it
/// had instead of starting over; otherwise [`TrainData::ensure_validation`] makes it. With them,
/// the run's [`fingerprints`].
fn checked_data(mut data: TrainData, model: &LoadedModel, p: &TrainParams, root: &Path) -> Result<(TrainData, Option<SplitOrder>, [String; 2]), TrainError> {
    if data.labels != model.cfg.labels {
        return Err(TrainError::Data(format!(
            "the data's classes {:?} differ from the model's labels {:?}",
            data.labels, model.cfg.labels
        )));
    }
    let recorded = checkpoint::latest_state(root).and_then(|state| {
        let split = state.split?;
        let mut recorded = data.clone();
        if !recorded.apply_split(&split) {
            return None;
        }
        let prints = fingerprints(p, &recorded, model);
        prints.contains(&state.fingerprint).then_some((recorded, Some(split), prints))
    });
    let (data, split, prints) = recorded.unwrap_or_else(|| {
        let split = data.ensure_validation(p.validation_split, p.seed);
        let prints = fingerprints(p, &data, model);
        (data, split, prints)
    });
    if data.train.is_empty() {
        return Err(TrainError::Data("no training images".into()));
    }
    if data.validation.is_empty() {
        return Err(TrainError::Data("no validation images (every class has a single image)".into()));
    }
    Ok((data, split, prints))
}

/// The schedule maths of a run: what trains, batches and optimiser steps per epoch, warm-up.
#[derive(Debug, Clone, Copy)]
struct Plan {
    set: TrainableSet,
    boundary: Boundary,
    batch: usize,
    accumulation: u64,
    batches_per_epoch: u64,
    steps_per_epoch: u64,
    /// Optimiser steps of the whole run (the probe epoch has none).
    total_steps: u64,
    warmup_steps: u64,
    /// 1 when epoch 1 fits the head as a probe instead of taking gradient steps.
    probe_epochs: u32,
}

impl Plan {
    fn new(p: &TrainParams, model: &LoadedModel, train_images: usize) -> Self {
        let set = p.trainable_set();
        let batch = p.batch_size as usize;
        let accumulation = u64::from(p.gradient_accumulation_steps);
        let batches_per_epoch = train_images.div_ceil(batch) as u64;
        let steps_per_epoch = batches_per_epoch.div_ceil(accumulation);
        let probe_epochs = u32::from(p.head_init == HeadInit::Probe);
        let total_steps = steps_per_epoch * u64::from(p.epochs - probe_epochs);
        Self {
            set,
            boundary: set.boundary(model.cfg.num_hidden_layers),
            batch,
            accumulation,
            batches_per_epoch,
            steps_per_epoch,
            total_steps,
            warmup_steps: (p.warmup_ratio * total_steps as f64).ceil() as u64,
            probe_epochs,
        }
    }
}

/// A stable fingerprint of what determines a run, so checkpoints are only resumed by the run
/// that wrote them: the hyper-parameters, labels, model size and each example's image (see
/// [`image_identity`]), label and split.
fn fingerprint(p: &TrainParams, data: &TrainData, model: &LoadedModel) -> String {
    fingerprint_with(p, data, model, image_identity)
}

/// The fingerprints a checkpoint of this run may carry: this build's, and the legacy one.
fn fingerprints(p: &TrainParams, data: &TrainData, model: &LoadedModel) -> [String; 2] {
    [fingerprint(p, data, model), legacy_fingerprint(p, data, model)]
}

/// The fingerprint of builds before [`image_identity`], which hashed every image's full path:
/// still accepted, so a job interrupted by an upgrade of the service resumes.
fn legacy_fingerprint(p: &TrainParams, data: &TrainData, model: &LoadedModel) -> String {
    fingerprint_with(p, data, model, |path| path.to_string_lossy())
}

/// What stands for an image in the fingerprint: its blob name (the SHA-256 of its bytes) when the
/// file is a blob, so the same data imported again into another folder (the command line imports
/// into a fresh scratch folder on every run; a cluster's workers keep blobs in their own data
/// folders) is the same run; otherwise its path.
fn image_identity(path: &Path) -> std::borrow::Cow<'_, str> {
    match path.file_name().and_then(|n| n.to_str()) {
        Some(name) if BlobStore::is_valid_hash(name) => name.into(),
        _ => path.to_string_lossy(),
    }
}

/// The fingerprint, with `identity` naming each image.
fn fingerprint_with(p: &TrainParams, data: &TrainData, model: &LoadedModel, identity: impl for<'p> Fn(&'p Path) -> std::borrow::Cow<'p, str>) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_string(p).unwrap_or_default());
    h.update(serde_json::to_string(&data.labels).unwrap_or_default());
    for (split, exs) in [("t", &data.train), ("v", &data.validation), ("s", &data.test)] {
        h.update(split);
        for e in exs.iter() {
            h.update(identity(&e.path).as_bytes());
            h.update(e.label.to_le_bytes());
        }
    }
    h.update(model.params.num_scalars().to_le_bytes());
    hex::encode(h.finalize())
}

/// The loop state to continue from: the latest checkpoint's matching either fingerprint (its
/// weights and optimiser state loaded), or a fresh one with the first. An unusable checkpoint is
/// reported and removed.
fn resume_or_start(
    root: &Path,
    [fingerprint, legacy]: [String; 2],
    model: &mut LoadedModel,
    optimizer: &mut Optimizer,
    device: &Device,
    ctl: &mut Control,
) -> Result<(LoopState, Option<u32>), TrainError> {
    // A crash between the two renames of a best-model replacement leaves it moved aside.
    at_path(crate::model::io::restore_interrupted_replacements(root), "restoring the checkpoints in", root)?;
    let fresh = LoopState::fresh(fingerprint.clone());
    let latest = checkpoint::load_latest(root, &[&fingerprint, &legacy]);
    if let Ok(restored) = &latest {
        let state = restored.as_ref().map(|r| &r.state);
        at_path(checkpoint::settle_staged_best(root, state), "settling the best model in", root)?;
    }
    match latest {
        Ok(Some(restored)) => {
            model.params.load_from(&restored.weights)?;
            optimizer.load_state(restored.optimizer, device)?;
            let epoch = restored.state.epoch;
            Ok((restored.state, Some(epoch)))
        }
        Ok(None) => Ok((fresh, None)),
        Err(e) => {
            (ctl.on_event)(TrainEvent::Restarted { reason: e.to_string() });
            at_path(checkpoint::clear(root), "removing the unusable checkpoints in", root)?;
            at_path(std::fs::create_dir_all(root), "creating the checkpoint folder", root)?;
            Ok((fresh, None))
        }
    }
}

/// What every epoch of a run shares: the plan, the frozen part of the network and the cached
/// outputs of it, decoded images.
struct Run<'a> {
    p: TrainParams,
    data: &'a TrainData,
    plan: Plan,
    root: PathBuf,
    device: Device,
    images: ImageCache,
    /// The precision of the products (`p.precision` resolved on this machine).
    precision: Precision,
    /// The model with every parameter frozen, for the part before the boundary.
    frozen: Vit,
    val_cache: PrefixCache,
    train_cache: PrefixCache,
    /// Learning rate of the head relative to the backbone's.
    head_scale: f64,
}

impl<'a> Run<'a> {
    /// The run's shared state; `(max_pixels, cache_budget)` as in [`TrainSpec`]. Computing the
    /// cached frozen-part outputs is the `features` phase.
    #[allow(clippy::too_many_arguments)]
    fn prepare(
        p: TrainParams,
        data: &'a TrainData,
        (max_pixels, cache_budget, memory_limit): (u64, usize, Option<&MemoryLimit>),
        plan: Plan,
        root: &Path,
        model: &LoadedModel,
        device: &Device,
        ctl: &mut Control,
    ) -> Result<Self, TrainError> {
        let precision = p.precision.resolve(device);
        // Before anything is computed: a run whose steps cannot fit is refused, not killed. (The
        // bound is the CPU's; on a GPU the tensors live in its memory.)
        if let Some(limit) = memory_limit.filter(|_| device.is_cpu() && plan.total_steps > 0) {
            let batch = plan.batch.min(data.train.len());
            let step = memory::training_step(model, plan.set, batch, precision, p.optimizer, p.momentum);
            step.check(limit, batch, precision).map_err(TrainError::Memory)?;
        }
        let images = ImageCache::new(max_pixels, cache_budget / 2);
        let frozen = Vit::frozen(&model.cfg, &model.params)?.with_precision(precision);
        // Frozen-part outputs never change during the run: cache them (for training only when
        // augmentation is off, since augmented views differ every epoch).
        let budget = cache_budget / 4;
        let f = Frozen { vit: &frozen, boundary: plan.boundary, images: &images, model, device, batch: plan.batch };
        let val_n = if PrefixCache::fits(&f, data.validation.len(), budget) { data.validation.len() } else { 0 };
        let train_n = if !p.augment && PrefixCache::fits(&f, data.train.len(), budget) { data.train.len() } else { 0 };
        let total = val_n + train_n;
        let cache = |examples: &[crate::train::data::Example], offset: usize, ctl: &mut Control| -> Result<PrefixCache, TrainError> {
            if examples.is_empty() {
                return Ok(PrefixCache::empty());
            }
            let cancel = ctl.cancel;
            let rows = PrefixCache::compute(&f, examples, cancel, &mut |done, _| report_phase(ctl, Phase::Features, offset + done, total))?;
            Ok(PrefixCache::from_rows(rows))
        };
        let val_cache = cache(&data.validation[..val_n], 0, ctl)?;
        let train_cache = cache(&data.train[..train_n], val_n, ctl)?;
        Ok(Self {
            data,
            plan,
            root: root.to_path_buf(),
            device: device.clone(),
            images,
            precision,
            frozen,
            val_cache,
            train_cache,
            head_scale: p.head_learning_rate.map_or(1.0, |h| h / p.learning_rate),
            p,
        })
    }

    /// `model` with every parameter frozen, at the run's precision (for evaluation).
    fn frozen_vit(&self, model: &LoadedModel) -> Result<Vit, TrainError> {
        Ok(Vit::frozen(&model.cfg, &model.params)?.with_precision(self.precision))
    }

    /// How the frozen part is run for `model`.
    fn frozen_part<'r>(&'r self, model: &'r LoadedModel) -> Frozen<'r> {
        Frozen { vit: &self.frozen, boundary: self.plan.boundary, images: &self.images, model, device: &self.device, batch: self.plan.batch }
    }
}

/// Rows of features as one flat, row-major vector (empty for no rows).
fn stacked(rows: &[Tensor]) -> Result<Vec<f32>, TrainError> {
    if rows.is_empty() {
        return Ok(vec![]);
    }
    Ok(Tensor::stack(rows, 0)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Epoch 1 of a `head_init: probe` run: the head fitted as a logistic regression on the frozen
/// backbone's features, then validated and checkpointed like any epoch.
fn probe_epoch(
    run: &Run,
    model: &mut LoadedModel,
    optimizer: &Optimizer,
    state: &mut LoopState,
    decide: bool,
    clock: Clock,
    ctl: &mut Control,
) -> Result<(), TrainError> {
    let started = Instant::now();
    let data = run.data;
    let (n, cancel) = (data.train.len(), ctl.cancel);
    // The images, then any other views of them (mirror images, crops), in one progress count.
    let probe_views = run.p.probe_views.unwrap_or_else(|| auto::probe_views(run.p.after_probe == AfterProbe::Auto, &data.train_counts()));
    let total = n * (1 + probe_views as usize);
    let f = Frozen { boundary: Boundary::Features, ..run.frozen_part(model) };
    let (feats, forward_per_s) = match run.train_cache.rows() {
        Some(rows) if run.plan.boundary == Boundary::Features => (rows.to_vec(), None),
        _ => {
            let rows = PrefixCache::compute(&f, &data.train, cancel, &mut |done, _| report_phase(ctl, Phase::Features, done, total))?;
            (rows, Some(n as f64 / started.elapsed().as_secs_f64().max(1e-9)))
        }
    };
    // Each view costs a pass like the images' own; with a time budget, none starts that would
    // end past it (they only refine the probe).
    let pass_secs = started.elapsed().as_secs_f64();
    let another_fits = || run.p.time_budget_secs.is_none_or(|b| clock.secs() + pass_secs <= b as f64);
    let mut views = Vec::new();
    let mut probe_views_used = 0;
    for index in 0..u64::from(probe_views) {
        if !another_fits() {
            break;
        }
        let view = if index == 0 { View::Mirror } else { View::Crop { seed: run.p.seed, index } };
        let offset = n * (1 + index as usize);
        let rows = PrefixCache::compute_view(&f, &data.train, view, cancel, &mut |done, _| report_phase(ctl, Phase::Features, offset + done, total))?;
        views.extend(rows);
        probe_views_used += 1;
    }
    let probe_views = probe_views_used;
    let features_seconds = started.elapsed().as_secs_f64();
    let fit_started = Instant::now();
    let (flat, views) = (stacked(&feats)?, stacked(&views)?);
    let labels: Vec<u32> = data.train.iter().map(|e| e.label).collect();
    // The copies of a file (one blob) share a cross-validation fold.
    let fitted = probe::fit_with_views(&flat, &views, &labels, &data.train_files(), data.labels.len(), run.p.seed, &mut |done, total| {
        report_phase(ctl, Phase::Probe, done, total)
    });
    let k = data.labels.len();
    let d = flat.len() / labels.len();
    let mut head = BTreeMap::new();
    head.insert(keys::HEAD_WEIGHT.to_string(), Tensor::from_vec(fitted.weight, (k, d), &run.device)?);
    head.insert(keys::HEAD_BIAS.to_string(), Tensor::from_vec(fitted.bias, k, &run.device)?);
    model.params.set_some(&head)?;
    let fit_seconds = fit_started.elapsed().as_secs_f64();
    (ctl.on_event)(TrainEvent::Probe { c: fitted.c, cv_accuracy: fitted.cv.map(|s| s.accuracy), cv_log_loss: fitted.cv.map(|s| s.log_loss), features_seconds, fit_seconds, views: probe_views });
    let validation = validate(run, model, ctl)?;
    let situation = Situation {
        per_class: data.train_counts(),
        validation_images: data.validation.len(),
        test_images: data.test.len(),
        layers: model.cfg.num_hidden_layers,
        forward_per_s: forward_per_s.unwrap_or(f64::INFINITY),
        elapsed_s: clock.secs(),
        budget_s: run.p.time_budget_secs.map(|s| s as f64).filter(|_| forward_per_s.is_some()),
    };
    // The decision goes into this epoch's checkpoint, so a resumed run keeps it.
    if decide {
        let mut decision = auto::decide(&situation);
        if probe_views > 0 {
            decision.reason.push_str(&format!("; the probe was fitted on each image and {probe_views} other view(s) of it (its mirror image, then crops)"));
        }
        // The set-up (a last-layers run's cache) comes after these seconds are recorded, before
        // the next epoch: the estimate carries it, so the budget check counts it.
        state.next_epoch_seconds = forward_per_s.map(|_| situation.epoch_secs(decision.action) + situation.setup_secs(decision.action));
        state.decision = Some(decision);
    } else if run.p.train_mode == TrainMode::Full {
        // The given plan goes on: a time budget must bound its first gradient epoch too, whose
        // length the probe's measurements estimate (a partial one costs less; it is bounded once
        // the budget is spent, and from its own length after it).
        state.next_epoch_seconds = forward_per_s.map(|_| situation.epoch_secs(auto::Action::FullFineTune));
    }
    state.seconds = clock.secs();
    end_epoch(&run.root, model, optimizer, state, 1, validation, ctl)
}

/// One pass over the training split in a seeded order: a forward and backward per batch, the
/// gradients of `gradient_accumulation_steps` batches averaged into one clipped optimiser step.
fn gradient_epoch(run: &Run, model: &LoadedModel, optimizer: &mut Optimizer, state: &mut LoopState, epoch: u32, ctl: &mut Control) -> Result<(), TrainError> {
    let (p, plan, data) = (&run.p, &run.plan, run.data);
    let layers = model.cfg.num_hidden_layers;
    let mut order: Vec<usize> = (0..data.train.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(p.seed, u64::from(epoch))));
    let mut dropout_rng = ChaCha8Rng::seed_from_u64(mix(p.seed, 0x64726f70 + u64::from(epoch)));
    let augment = p.augment.then_some((p.seed, u64::from(epoch)));
    let class_weights: Option<Vec<f32>> = p.class_balanced_loss.then(|| {
        let labels: Vec<u32> = data.train.iter().map(|e| e.label).collect();
        probe::balanced_weights(&labels, data.labels.len()).into_iter().map(|w| w as f32).collect()
    });
    let mut acc = Accumulator::default();
    for (bi, idx) in order.chunks(plan.batch).enumerate() {
        if ctl.cancel.load(Ordering::Relaxed) {
            return Err(TrainError::Cancelled);
        }
        acc.started.get_or_insert_with(Instant::now);
        let vit = Vit::new(&model.cfg, &model.params, &|n| plan.set.contains(n, layers))?.with_precision(run.precision);
        let input = run.train_cache.batch(&run.frozen_part(model), idx, &data.train, augment)?;
        let targets: Vec<u32> = idx.iter().map(|&i| data.train[i].label).collect();
        let mut dropout = Dropout { rng: &mut dropout_rng };
        let objective = Objective { targets: &targets, label_smoothing: p.label_smoothing, class_weights: class_weights.as_deref() };
        let (loss, grads) = loss_and_grads(&vit, &model.params, plan.set, plan.boundary, &input, objective, Some(&mut dropout))?;
        acc.add(grads, loss, idx.len())?;
        if acc.batches == plan.accumulation || bi as u64 + 1 == plan.batches_per_epoch {
            optimiser_step(run, model, optimizer, state, epoch, std::mem::take(&mut acc), ctl)?;
        }
    }
    Ok(())
}

/// Gradients summed over the batches of one optimiser step.
#[derive(Default)]
struct Accumulator {
    grads: BTreeMap<String, Tensor>,
    batches: u64,
    loss: f64,
    images: usize,
    /// When the step's first batch started (its time includes loading the batches).
    started: Option<Instant>,
}

impl Accumulator {
    fn add(&mut self, grads: BTreeMap<String, Tensor>, loss: f64, images: usize) -> Result<(), TrainError> {
        for (name, g) in grads {
            let g = match self.grads.remove(&name) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            self.grads.insert(name, g);
        }
        self.batches += 1;
        self.loss += loss;
        self.images += images;
        Ok(())
    }
}

/// Averages the accumulated gradients, clips them, steps the optimiser at the scheduled learning
/// rate and reports the step.
fn optimiser_step(run: &Run, model: &LoadedModel, optimizer: &mut Optimizer, state: &mut LoopState, epoch: u32, mut acc: Accumulator, ctl: &mut Control) -> Result<(), TrainError> {
    let (p, plan) = (&run.p, &run.plan);
    if acc.batches > 1 {
        for g in acc.grads.values_mut() {
            *g = (&*g / acc.batches as f64)?;
        }
    }
    let loss = acc.loss / acc.batches as f64;
    // Checked before the step is taken or reported: a NaN would poison every weight it touches.
    if !loss.is_finite() {
        return Err(TrainError::Diverged(format!("the loss of step {} is {loss}", state.global_step + 1)));
    }
    clip_grad_norm(&mut acc.grads, p.max_grad_norm)?;
    let lr = p.learning_rate * lr_multiplier(p.lr_scheduler, state.global_step, plan.total_steps, plan.warmup_steps);
    let head_lr = lr * run.head_scale;
    optimizer.step(&model.params, &acc.grads, &|n| if keys::is_head(n) { head_lr } else { lr })?;
    state.global_step += 1;
    let secs = acc.started.map_or(1e-9, |t| t.elapsed().as_secs_f64().max(1e-9));
    (ctl.on_event)(TrainEvent::Step {
        epoch,
        step: state.global_step,
        steps: plan.total_steps,
        loss,
        learning_rate: lr,
        images_per_s: acc.images as f64 / secs,
    });
    Ok(())
}

/// The current model's report on the validation split, and the images it gets wrong (the
/// `validating` phase).
fn validate(run: &Run, model: &LoadedModel, ctl: &mut Control) -> Result<(EvalReport, Vec<Mistake>), TrainError> {
    let eval_vit = run.frozen_vit(model)?;
    let f = Frozen { vit: &eval_vit, ..run.frozen_part(model) };
    let cancel = ctl.cancel;
    let validation = &run.data.validation;
    report_phase(ctl, Phase::Validating, 0, validation.len());
    let logits = logits_with(&f, &run.val_cache, validation, Some(cancel), &mut |done, total| report_phase(ctl, Phase::Validating, done, total))?;
    Ok((logits.report(&run.data.labels, 1.0), logits.mistakes(validation, 1.0)))
}

/// Better validation: higher macro-F1, then lower loss.
fn better(a: (f64, f64), b: Option<(f64, f64)>) -> bool {
    match b {
        None => true,
        Some(b) => a.0 > b.0 || (a.0 == b.0 && a.1 < b.1),
    }
}

/// Updates the loop state with an epoch's validation `(macro-F1, loss)` and says whether the epoch
/// is the best so far (higher F1, then lower loss: the one kept). Early stopping counts the epochs
/// in which neither the F1 nor the loss improved: an epoch that lowers the loss without raising the
/// F1 is not kept, but it is progress, and the run goes on.
fn track_progress(state: &mut LoopState, score: (f64, f64)) -> bool {
    let improved = better(score, state.best_score);
    let lower_loss = state.lowest_loss.is_none_or(|lowest| score.1 < lowest);
    if improved {
        state.best_score = Some(score);
    }
    if lower_loss {
        state.lowest_loss = Some(score.1);
    }
    state.epochs_since_best = if improved || lower_loss { 0 } else { state.epochs_since_best + 1 };
    improved
}

/// Records epoch `epoch`'s validation, keeps the model when it is the best so far and writes the
/// epoch checkpoint.
fn end_epoch(
    root: &Path,
    model: &LoadedModel,
    optimizer: &Optimizer,
    state: &mut LoopState,
    epoch: u32,
    (report, mistakes): (EvalReport, Vec<Mistake>),
    ctl: &mut Control,
) -> Result<(), TrainError> {
    let on_event = &mut *ctl.on_event;
    on_event(TrainEvent::Phase { phase: Phase::Saving, done: 0, total: 1 });
    if !(ctl.holds)() {
        return Err(TrainError::Cancelled);
    }
    let score = (report.f1, report.loss);
    let improved = track_progress(state, score);
    state.epoch = epoch;
    state.history.push(report.clone());
    // A new best model is staged, and becomes `best/` once the checkpoint naming it is written.
    if improved {
        state.best_epoch = Some(epoch);
        let staged = checkpoint::staged_best_dir(root, epoch);
        at_path(model.save(&staged), "saving the best model to", &staged)?;
    }
    on_event(TrainEvent::Epoch { epoch, report, improved, mistakes });
    let (weights, moments) = (model.params.snapshot()?, optimizer.state()?);
    let dir = at_path(checkpoint::save(root, &model.cfg, &model.preprocessor, &weights, &moments, state), "writing the checkpoint in", root)?;
    if improved {
        at_path(checkpoint::promote_best(root, epoch), "keeping the best model in", root)?;
    }
    on_event(TrainEvent::Checkpoint { epoch, dir, score: score.0 });
    on_event(TrainEvent::Phase { phase: Phase::Saving, done: 1, total: 1 });
    Ok(())
}

/// Loads the best epoch's weights back into `model`, calibrates its scores on the validation
/// split (when the run asks for it), evaluates it on the test split when there is one, and
/// describes the outcome. The calibrated model goes to a folder of its own: `best/` keeps the
/// uncalibrated weights, so a run interrupted after this and resumed calibrates the same weights
/// again (and finds the same temperature), not already-calibrated ones.
fn finish(run: &Run, model: &mut LoadedModel, state: LoopState, ctl: &mut Control) -> Result<TrainOutcome, TrainError> {
    let data = run.data;
    let best_epoch = state.best_epoch.ok_or_else(|| TrainError::Checkpoint("no epoch completed".into()))?;
    let best_dir = checkpoint::best_dir(&run.root);
    let best = LoadedModel::load(&ModelSource::Dir(best_dir.clone()), Some(&data.labels), &run.device, run.p.seed)?;
    model.params.load_from(&best.params.snapshot()?)?;
    let mut calibration = if run.p.calibrate { Some(calibrate(run, model, ctl)?) } else { None };
    let kept_dir = if calibration.as_ref().is_some_and(|c| c.fitted) {
        let dir = checkpoint::calibrated_dir(&run.root);
        report_phase(ctl, Phase::Saving, 0, 1);
        if !(ctl.holds)() {
            return Err(TrainError::Cancelled);
        }
        at_path(model.save(&dir), "saving the calibrated model to", &dir)?;
        report_phase(ctl, Phase::Saving, 1, 1);
        dir
    } else {
        best_dir
    };
    let test = if data.test.is_empty() {
        None
    } else {
        let vit = run.frozen_vit(model)?;
        let f = Frozen { vit: &vit, boundary: Boundary::Pixels, ..run.frozen_part(model) };
        let cancel = ctl.cancel;
        report_phase(ctl, Phase::Validating, 0, data.test.len());
        let logits = logits_with(&f, &PrefixCache::empty(), &data.test, Some(cancel), &mut |done, total| report_phase(ctl, Phase::Validating, done, total))?;
        let report = logits.report(&data.labels, 1.0);
        if let Some(c) = calibration.as_mut() {
            // The head is already scaled: the uncalibrated scores are the logits / scale.
            c.test_ece_after = Some(report.ece);
            c.test_ece_before = Some(logits.report(&data.labels, c.temperature).ece);
        }
        (ctl.on_event)(TrainEvent::Test { report: report.clone() });
        Some(report)
    };
    let best_report = state.history[best_epoch as usize - 1].clone();
    Ok(TrainOutcome { best_dir: kept_dir, best_epoch, best: best_report, test, epochs_run: state.epoch, history: state.history, calibration, decision: state.decision, precision: run.precision })
}

/// Fits a temperature on the validation split's logits and folds it into the head (see
/// [`super::calibrate`]); where the validation split cannot pin one down (too few images or
/// mistakes) the head is left as it is, and the calibration says why.
fn calibrate(run: &Run, model: &LoadedModel, ctl: &mut Control) -> Result<Calibration, TrainError> {
    let vit = run.frozen_vit(model)?;
    let f = Frozen { vit: &vit, ..run.frozen_part(model) };
    let cancel = ctl.cancel;
    let validation = &run.data.validation;
    report_phase(ctl, Phase::Validating, 0, validation.len());
    let logits = logits_with(&f, &run.val_cache, validation, Some(cancel), &mut |done, total| report_phase(ctl, Phase::Validating, done, total))?;
    let labels = &run.data.labels;
    let before = logits.report(labels, 1.0).ece;
    let (scale, reason) = match calibrate::choose(&logits) {
        Ok(scale) => (Some(scale), None),
        Err(reason) => (None, Some(reason)),
    };
    if let Some(scale) = scale {
        calibrate::fold_into_head(model, scale)?;
    }
    let scale_or_1 = scale.unwrap_or(1.0);
    let calibration = Calibration {
        temperature: 1.0 / scale_or_1,
        fitted: scale.is_some(),
        reason,
        validation_ece_before: before,
        validation_ece_after: logits.report(labels, scale_or_1).ece,
        test_ece_before: None,
        test_ece_after: None,
    };
    (ctl.on_event)(TrainEvent::Calibrated { calibration: calibration.clone() });
    Ok(calibration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> LoopState {
        LoopState::fresh(String::new())
    }

    #[test]
    fn early_stopping_counts_epochs_that_improve_neither_f1_nor_loss() {
        let mut s = state();
        assert!(track_progress(&mut s, (0.80, 0.50)), "the first epoch is the best so far");
        assert_eq!(s.epochs_since_best, 0);
        // The same F1, a lower loss: kept (the tie-break), progress.
        assert!(track_progress(&mut s, (0.80, 0.40)));
        assert_eq!((s.epochs_since_best, s.lowest_loss), (0, Some(0.40)));
        // A lower F1 but a lower loss: not kept, yet progress (the model grows surer where it is right).
        assert!(!track_progress(&mut s, (0.78, 0.35)));
        assert_eq!((s.epochs_since_best, s.best_score, s.lowest_loss), (0, Some((0.80, 0.40)), Some(0.35)));
        // Neither better: counted.
        assert!(!track_progress(&mut s, (0.79, 0.36)));
        assert_eq!(s.epochs_since_best, 1);
        assert!(!track_progress(&mut s, (0.80, 0.45)));
        assert_eq!(s.epochs_since_best, 2);
        // A higher F1 with a higher loss: kept, and the count starts again.
        assert!(track_progress(&mut s, (0.85, 0.60)));
        assert_eq!((s.epochs_since_best, s.best_score, s.lowest_loss), (0, Some((0.85, 0.60)), Some(0.35)));
    }

    /// The time budget stops a run whose budget is spent even without an estimate of the next
    /// epoch (after a probe that was not asked to decide), and otherwise when the next epoch
    /// would end past it; the decision rests on the checkpoint's seconds alone.
    #[test]
    fn a_spent_time_budget_stops_the_run_with_or_without_an_estimate() {
        let p = TrainParams { time_budget_secs: Some(60), ..TrainParams::default() };
        let at = |seconds: f64, next: Option<f64>| LoopState { epoch: 1, seconds, next_epoch_seconds: next, ..state() };
        assert!(stop_before(&p, &LoopState { epoch: 0, seconds: 100.0, ..state() }).is_none(), "nothing done yet");
        let (why, decision) = stop_before(&p, &at(75.0, None)).expect("spent");
        assert_eq!(why, "stopped after epoch 1: the time budget of 60 s is spent (75 s)");
        assert_eq!((decision.action, decision.epochs), (auto::Action::AsGiven, 1));
        assert!(stop_before(&p, &at(30.0, None)).is_none(), "no estimate, budget left");
        assert!(stop_before(&p, &at(30.0, Some(20.0))).is_none());
        assert!(stop_before(&p, &at(30.0, Some(40.0))).unwrap().0.contains("another epoch (about 40 s)"));
        assert!(stop_before(&TrainParams::default(), &at(1e9, None)).is_none(), "no budget");
    }

    #[test]
    fn a_checkpoint_written_before_the_lowest_loss_was_kept_still_loads() {
        let mut old = serde_json::to_value(state()).unwrap();
        old.as_object_mut().unwrap().remove("lowest_loss");
        old.as_object_mut().unwrap().remove("split");
        let back: LoopState = serde_json::from_value(old).unwrap();
        assert_eq!((back.lowest_loss, back.split), (None, None));
    }

    #[test]
    fn the_fingerprint_names_blobs_by_content_not_by_the_folder_they_were_imported_into() {
        let cfg = crate::model::VitConfig::preset("tiny").unwrap();
        let labels = vec!["a".to_string(), "b".to_string()];
        let model = LoadedModel::random(&cfg, &labels, 0, &Device::Cpu).unwrap();
        let p = TrainParams::default();
        let (blob_a, blob_b) = ("a".repeat(64), "b".repeat(64));
        let data = |dir: &str, blobs: [&str; 2]| {
            let records = blobs.iter().zip(["a", "b"]).map(|(b, l)| (Path::new(dir).join(b), l.to_string(), crate::dataset::Split::Train)).collect();
            TrainData::with_labels(labels.clone(), records).unwrap()
        };
        let first = data("/tmp/.tmpAbc/blobs", [&blob_a, &blob_b]);
        let again = data("/tmp/.tmpXyz/blobs", [&blob_a, &blob_b]);
        assert_eq!(fingerprint(&p, &first, &model), fingerprint(&p, &again, &model), "another scratch folder, the same run");
        let swapped = data("/tmp/.tmpAbc/blobs", [&blob_b, &blob_a]);
        assert_ne!(fingerprint(&p, &first, &model), fingerprint(&p, &swapped, &model), "other labels, another run");
        // Files that are not blobs are still told apart by their paths.
        let files = data("/data", ["x.png", "y.png"]);
        assert_ne!(fingerprint(&p, &files, &model), fingerprint(&p, &data("/other", ["x.png", "y.png"]), &model));
        // Checkpoints of older builds (full paths) still match.
        assert_eq!(legacy_fingerprint(&p, &files, &model), fingerprint(&p, &files, &model));
        assert_ne!(legacy_fingerprint(&p, &first, &model), legacy_fingerprint(&p, &again, &model));
    }
}
