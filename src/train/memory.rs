//! How much memory a training step needs at the least, so that a run the machine cannot hold is
//! refused with the reason before it starts, instead of being killed for lack of memory (in
//! `serve --role all` with the whole service) at every claim of its job.
//!
//! A CPU training step holds the f32 weights, their bf16 copies in bf16, the optimiser's state
//! of the trained parameters (AdamW two moments, SGD with momentum one), and at its peak the
//! larger of the activations kept for the backward pass and the gradients. The activations of
//! one encoder layer take at least [`ACTIVATION_FLOATS_PER_HIDDEN`] × `hidden_size` floats per
//! token. Measured peak resident memory of `vitforge bench --mode train --precision f32` (patch
//! 16, 224×224, Intel Xeon with AVX-512, 2026-12-04) against this bound:
//!
//! | ViT | batch | measured MiB | bound MiB |
//! | --- | --- | --- | --- |
//! | tiny | 4 | 162 | 126 |
//! | tiny | 32 | 739 | 562 |
//! | small | 4 | 438 | 373 |
//! | small | 16 | 902 | 747 |
//! | base | 4 | 1438 | 1309 |
//!
//! (10 classes, as `bench` makes them.) So the bound is 9–24% under what a step took: it
//! refuses only what cannot fit. Not counted: the caches of decoded images and frozen-part
//! outputs (`TrainSpec::cache_budget`), evaluation, the process's own memory.

use crate::model::weights::TrainableSet;
use crate::model::{LoadedModel, Precision, VitConfig};
use crate::train::OptimizerKind;

/// Floats per token and trained encoder layer that a step keeps at the least, per unit of
/// `hidden_size` (measured: 11.9 for tiny and 11.2 for small, from the growth of the peak
/// between the two batch sizes of the module's table).
pub const ACTIVATION_FLOATS_PER_HIDDEN: u64 = 9;

/// The least memory a training step of `model` needs, and what it is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepMemory {
    /// Bytes in all.
    pub bytes: u64,
    /// Parameters of the model, and of them those that train.
    pub params: u64,
    pub trained: u64,
    /// Encoder layers that train (their activations are kept for the backward pass).
    pub trained_layers: u64,
}

/// The least memory one training step of `model` needs, training `set` on batches of `batch`
/// images with `optimizer` (`momentum` for SGD) in `precision`.
pub fn training_step(model: &LoadedModel, set: TrainableSet, batch: usize, precision: Precision, optimizer: OptimizerKind, momentum: f64) -> StepMemory {
    let sizes = model.params.iter().map(|(name, var)| (name.as_str(), var.as_tensor().elem_count()));
    step_of(&model.cfg, sizes, set, batch, precision, optimizer, momentum)
}

/// [`training_step`] of a model known by its configuration alone (no weights loaded), as a job
/// about to be queued is: `num_labels` classes.
pub fn training_step_of_config(
    cfg: &VitConfig,
    num_labels: usize,
    set: TrainableSet,
    batch: usize,
    precision: Precision,
    optimizer: OptimizerKind,
    momentum: f64,
) -> StepMemory {
    let specs = crate::model::weights::param_specs(cfg, num_labels);
    let sizes = specs.iter().map(|s| (s.name.as_str(), s.shape.iter().product()));
    step_of(cfg, sizes, set, batch, precision, optimizer, momentum)
}

/// The bound for a model of `cfg` whose parameters are `sizes` (name, elements).
fn step_of<'a>(
    cfg: &VitConfig,
    sizes: impl Iterator<Item = (&'a str, usize)>,
    set: TrainableSet,
    batch: usize,
    precision: Precision,
    optimizer: OptimizerKind,
    momentum: f64,
) -> StepMemory {
    let layers = cfg.num_hidden_layers;
    let (mut params, mut trained) = (0u64, 0u64);
    for (name, n) in sizes {
        let n = n as u64;
        params += n;
        if set.contains(name, layers) {
            trained += n;
        }
    }
    let trained_layers = match set {
        TrainableSet::All => layers,
        TrainableSet::HeadOnly => 0,
        TrainableSet::LastLayers(n) => n.min(layers),
    } as u64;
    let tokens = ((cfg.image_size.0 / cfg.patch_size.0) * (cfg.image_size.1 / cfg.patch_size.1) + 1) as u64;
    let activations = 4 * batch as u64 * tokens * trained_layers * ACTIVATION_FLOATS_PER_HIDDEN * cfg.hidden_size as u64;
    let state_floats = match optimizer {
        OptimizerKind::Adamw => 2,
        OptimizerKind::Sgd if momentum != 0.0 => 1,
        OptimizerKind::Sgd => 0,
    };
    let copies = if precision == Precision::Bf16 { 2 * params } else { 0 };
    let bytes = 4 * params + copies + 4 * state_floats * trained + activations.max(4 * trained);
    StepMemory { bytes, params, trained, trained_layers }
}

/// The most memory a run may take, and what set it (named in the refusal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLimit {
    pub bytes: u64,
    /// `--max-job-memory`, or the machine's memory.
    pub source: String,
}

impl MemoryLimit {
    /// The limit `--max-job-memory` sets for a job's training (0: none), as both the worker that
    /// runs a job and `POST /jobs` (`worker::submit::JobMemory`) apply it.
    pub fn max_job_memory(bytes: u64) -> Option<Self> {
        (bytes > 0).then(|| Self { bytes, source: "--max-job-memory".into() })
    }
}

impl StepMemory {
    /// `Err` with the reason and what to change when this step cannot fit `limit`.
    pub fn check(&self, limit: &MemoryLimit, batch: usize, precision: Precision) -> Result<(), String> {
        if self.bytes <= limit.bytes {
            return Ok(());
        }
        let millions = |n: u64| format!("{:.1} M", n as f64 / 1e6);
        Err(format!(
            "a training step needs at least {} of memory ({} parameters, {} of them trained, the activations of {} encoder layers for batches of {batch} images, {}), more than the {} of {}: lower batch_size, or train fewer layers (train_mode last_n_layers or head_only)",
            size(self.bytes),
            millions(self.params),
            millions(self.trained),
            self.trained_layers,
            precision.name(),
            size(limit.bytes),
            limit.source,
        ))
    }
}

/// Bytes as GiB with one decimal (`1.4 GiB`), or below 1 GiB as whole MiB (`300 MiB`).
pub fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
    } else {
        format!("{} MiB", bytes.div_ceil(1 << 20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn model(json: &str) -> LoadedModel {
        let cfg = crate::model::VitConfig::from_json(json).unwrap();
        LoadedModel::random(&cfg, &["a".into(), "b".into()], 1, &Device::Cpu).unwrap()
    }

    /// The sum by hand for a small ViT (64×64 images, patch 16: 17 tokens; hidden 32, 2 layers,
    /// MLP 64, 2 classes), and how each setting moves it.
    #[test]
    fn the_bound_adds_up_weights_copies_optimiser_state_and_activations() {
        let m = model(r#"{"model_type": "vit", "image_size": 64, "patch_size": 16, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}"#);
        // Patch projection 3·16·16·32 + 32, CLS 32, positions 17·32; per layer Q, K, V, O
        // 4·(32·32 + 32), MLP 32·64 + 64 + 64·32 + 32, two norms 4·32; final norm 64; head 32·2 + 2.
        let embeddings = 3 * 16 * 16 * 32 + 32 + 32 + 17 * 32;
        let layer = 4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 4 * 32;
        let (norm, head) = (64, 32 * 2 + 2);
        let params = embeddings + 2 * layer + norm + head;
        let all = training_step(&m, TrainableSet::All, 8, Precision::F32, OptimizerKind::Adamw, 0.9);
        assert_eq!((all.params, all.trained, all.trained_layers), (params, params, 2));
        let activations = 4 * 8 * 17 * 2 * ACTIVATION_FLOATS_PER_HIDDEN * 32;
        assert_eq!(all.bytes, 4 * params + 8 * params + activations.max(4 * params));

        let head_only = training_step(&m, TrainableSet::HeadOnly, 8, Precision::F32, OptimizerKind::Adamw, 0.9);
        assert_eq!((head_only.trained, head_only.trained_layers), (head, 0));
        assert_eq!(head_only.bytes, 4 * params + 8 * head + 4 * head);
        let last = training_step(&m, TrainableSet::LastLayers(1), 8, Precision::F32, OptimizerKind::Sgd, 0.0);
        assert_eq!((last.trained, last.trained_layers), (layer + norm + head, 1));
        assert_eq!(last.bytes, 4 * params + (4 * 8 * 17 * ACTIVATION_FLOATS_PER_HIDDEN * 32).max(4 * last.trained));
        let bf16 = training_step(&m, TrainableSet::All, 8, Precision::Bf16, OptimizerKind::Adamw, 0.9);
        assert_eq!(bf16.bytes, all.bytes + 2 * params);
        // Worked out from the configuration alone (a job being queued), the same.
        for (set, optimizer) in [(TrainableSet::All, OptimizerKind::Adamw), (TrainableSet::HeadOnly, OptimizerKind::Sgd), (TrainableSet::LastLayers(1), OptimizerKind::Adamw)] {
            let of_config = training_step_of_config(&m.cfg, 2, set, 8, Precision::Bf16, optimizer, 0.9);
            assert_eq!(of_config, training_step(&m, set, 8, Precision::Bf16, optimizer, 0.9), "{set:?}");
        }
        let bigger = training_step(&m, TrainableSet::All, 512, Precision::F32, OptimizerKind::Adamw, 0.9);
        assert_eq!(bigger.bytes, 12 * params + 64 * activations, "activations grow with the batch");
        assert_eq!((size(3 << 29), size(300 << 20), size((300 << 20) + 1)), ("1.5 GiB".into(), "300 MiB".into(), "301 MiB".into()));

        let limit = |bytes| MemoryLimit { bytes, source: "--max-job-memory".into() };
        // The caches take a quarter of a small limit, and 4 GiB of a large one or of none.
        assert_eq!(crate::train::cache_budget_within(Some(&limit(2 << 30))), 512 << 20);
        assert_eq!(crate::train::cache_budget_within(Some(&limit(64 << 30))), 4 << 30);
        assert_eq!(crate::train::cache_budget_within(None), 4 << 30);
        assert_eq!(all.check(&limit(all.bytes), 8, Precision::F32), Ok(()), "a step that just fits");
        let refused = all.check(&limit(all.bytes - 1), 8, Precision::F32).unwrap_err();
        assert!(refused.starts_with("a training step needs at least 1 MiB of memory (0.0 M parameters"), "{refused}");
        assert!(refused.contains("batches of 8 images, f32), more than the 1 MiB of --max-job-memory: lower batch_size"), "{refused}");
    }
}
