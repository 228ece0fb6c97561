//! The one place that chooses, for every forward and backward pass, between the fast CPU path
//! ([`super::fast`]: hand-written, fused, no autograd graph) and the reference model
//! ([`super::vit`]: composed candle ops, differentiable on any device, dropout). Callers ask for a
//! forward or for a loss and its gradients; this module picks the path.
//!
//! The fast path runs when the tensors live on the CPU, nothing is tracked by autograd and
//! dropout is off, unless `VITFORGE_REFERENCE_OPS=1` forces the reference (to compare speed).

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::{DType, Tensor};

use super::ModelError;
use super::fast;
use super::precision::Precision;
pub use super::vit::Objective;
use super::vit::{Dropout, Vit, cross_entropy};
use super::weights::{Boundary, Params, TrainableSet};

type Result<T> = std::result::Result<T, ModelError>;

impl Vit {
    /// True when the fast CPU path may run this model: nothing is tracked by autograd, the
    /// tensors live on the CPU and dropout is off.
    pub fn fast_path(&self) -> bool {
        !self.trainable && fast::usable(self, self.patch_weight.device())
    }

    /// The same model, in bf16, with the weights of its linear layers converted to bf16 once,
    /// here, packed for the matrix-product kernel the CPU runs, rather than in every product of
    /// every forward pass. For a model whose parameters no longer change, as a loaded model
    /// being served: the packed copy does not follow them.
    ///
    /// Nothing is packed in f32 (packing once there measured no faster, for a copy as large as
    /// the weights; in bf16 the copy is half their size and one image ran about 5% faster:
    /// bench/RESULTS.md), nor where the fast path does not run (another device, reference ops, a
    /// trainable model) or its products are the `gemm` crate's.
    pub fn packed_for_inference(mut self) -> Result<Self> {
        self.packed = None;
        if self.fast_path() && self.precision == Precision::Bf16 {
            self.packed = fast::pack(&self)?.map(Into::into);
        }
        Ok(self)
    }

    /// Bytes its packed weights hold (0 when none are packed).
    pub fn packed_bytes(&self) -> usize {
        self.packed.as_deref().map_or(0, |p| p.iter().map(|p| p.bytes()).sum())
    }

    /// Patch + CLS + position embeddings: (B, C, H, W) pixels → (B, tokens, hidden).
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        self.check_pixels(pixels)?;
        if self.fast_path() {
            return fast::embed_tensor(self, pixels);
        }
        self.embed_reference(pixels)
    }

    /// Runs encoder layers `range` on hidden states (B, tokens, hidden), with dropout when given.
    pub fn encode(&self, x: Tensor, range: Range<usize>, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        if dropout.is_none() && self.fast_path() {
            return fast::encode(self, &x, range);
        }
        self.encode_reference(x, range, dropout)
    }

    /// Features of a batch of images (the final layer norm of the CLS token): (B, C, H, W) →
    /// (B, hidden).
    pub fn features(&self, pixels: &Tensor) -> Result<Tensor> {
        if self.fast_path() {
            self.check_pixels(pixels)?;
            return fast::features(self, pixels);
        }
        self.features_reference(pixels)
    }

    /// Logits of a batch of images: (B, C, H, W) → (B, labels).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        self.head(&self.features(pixels)?)
    }

    /// Logits with dropout (the training forward).
    pub fn forward_train(&self, pixels: &Tensor, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let x = self.embed(pixels)?;
        let x = self.encode(x, 0..self.layers.len(), dropout)?;
        self.head(&self.pool(&x)?)
    }
}

/// Whether `VITFORGE_REFERENCE_OPS` asks for candle's composed ops instead of the fused CPU
/// kernels (read once; the fused AdamW follows the same switch).
pub fn reference_ops_forced() -> bool {
    fast::reference_ops_forced()
}

/// Runs the frozen part of the network (no backward graph: every tensor in `frozen` is detached).
pub fn frozen_forward(frozen: &Vit, b: Boundary, pixels: &Tensor) -> Result<Tensor> {
    match b {
        Boundary::Pixels => Ok(pixels.clone()),
        Boundary::Layer(k) => frozen.encode(frozen.embed(pixels)?, 0..k, None),
        Boundary::Features => frozen.features(pixels),
    }
}

/// Runs the trainable part from the boundary's output to logits.
pub fn trainable_forward(vit: &Vit, b: Boundary, input: &Tensor, dropout: Option<&mut Dropout>) -> Result<Tensor> {
    let layers = vit.config().num_hidden_layers;
    match b {
        Boundary::Pixels => vit.forward_train(input, dropout),
        Boundary::Layer(k) => vit.head(&vit.pool(&vit.encode(input.clone(), k..layers, dropout)?)?),
        Boundary::Features => vit.head(input),
    }
}

/// Loss of a batch and the gradient of every trainable parameter, by name: by the fast path's
/// hand-written backward where it runs, else by candle's autograd.
pub fn loss_and_grads(
    vit: &Vit,
    params: &Params,
    set: TrainableSet,
    b: Boundary,
    input: &Tensor,
    objective: Objective,
    dropout: Option<&mut Dropout>,
) -> Result<(f64, BTreeMap<String, Tensor>)> {
    let cfg = vit.config();
    let no_dropout = cfg.hidden_dropout_prob == 0.0 && cfg.attention_probs_dropout_prob == 0.0;
    if no_dropout && fast::usable(vit, input.device()) {
        return fast::loss_and_grads(vit, set, b, input, objective);
    }
    reference_loss_and_grads(vit, params, set, b, input, objective, dropout)
}

/// [`loss_and_grads`] through candle's autograd on the reference forward (any device, dropout).
pub fn reference_loss_and_grads(
    vit: &Vit,
    params: &Params,
    set: TrainableSet,
    b: Boundary,
    input: &Tensor,
    objective: Objective,
    dropout: Option<&mut Dropout>,
) -> Result<(f64, BTreeMap<String, Tensor>)> {
    let layers = vit.config().num_hidden_layers;
    let logits = trainable_forward(vit, b, input, dropout)?;
    let loss = cross_entropy(&logits, objective.targets, objective.label_smoothing, objective.class_weights)?;
    let grads = loss.backward()?;
    let mut out = BTreeMap::new();
    for (name, var) in params.iter() {
        if set.contains(name, layers)
            && let Some(g) = grads.get(var.as_tensor())
        {
            out.insert(name.clone(), g.clone());
        }
    }
    Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, out))
}
