//! One training step: the split of the network into a frozen part (run without a backward graph)
//! and a trainable part, and the loss and gradients of a batch.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use super::TrainError;
use super::params::{TrainMode, TrainParams};
use crate::model::vit::{Dropout, TrainableSet, cross_entropy};
use crate::model::{Params, Vit, fast};

/// Where the frozen part of the network ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    /// Everything trains: start from pixels.
    Pixels,
    /// Layers before this one are frozen: start from their output hidden states.
    Layer(usize),
    /// Only the head trains: start from pooled features.
    Features,
}

pub fn trainable_set(p: &TrainParams) -> TrainableSet {
    match p.train_mode {
        TrainMode::Full => TrainableSet::All,
        TrainMode::HeadOnly => TrainableSet::HeadOnly,
        TrainMode::LastNLayers => TrainableSet::LastLayers(p.trainable_layers.unwrap_or(1) as usize),
    }
}

pub fn boundary(set: TrainableSet, num_layers: usize) -> Boundary {
    match set {
        TrainableSet::All => Boundary::Pixels,
        TrainableSet::HeadOnly => Boundary::Features,
        TrainableSet::LastLayers(n) if n >= num_layers => Boundary::Layer(0),
        TrainableSet::LastLayers(n) => Boundary::Layer(num_layers - n),
    }
}

/// Runs the frozen part of the network (no backward graph: every tensor in `frozen` is detached).
pub fn frozen_forward(frozen: &Vit, b: Boundary, pixels: &Tensor) -> Result<Tensor, TrainError> {
    Ok(match b {
        Boundary::Pixels => pixels.clone(),
        Boundary::Layer(k) => frozen.encode(frozen.embed(pixels)?, 0..k, None)?,
        Boundary::Features => frozen.features(pixels)?,
    })
}

/// Runs the trainable part from the boundary's output to logits.
pub fn trainable_forward(vit: &Vit, b: Boundary, input: &Tensor, dropout: Option<&mut Dropout>) -> Result<Tensor, TrainError> {
    let layers = vit.config().num_hidden_layers;
    Ok(match b {
        Boundary::Pixels => vit.forward_train(input, dropout)?,
        Boundary::Layer(k) => vit.head(&vit.pool(&vit.encode(input.clone(), k..layers, dropout)?)?)?,
        Boundary::Features => vit.head(input)?,
    })
}

/// Loss of a batch and the gradient of every trainable parameter, by name.
pub fn loss_and_grads(
    vit: &Vit,
    params: &Params,
    set: TrainableSet,
    b: Boundary,
    input: &Tensor,
    targets: &[u32],
    label_smoothing: f64,
    dropout: Option<&mut Dropout>,
) -> Result<(f64, BTreeMap<String, Tensor>), TrainError> {
    let cfg = vit.config();
    let no_dropout = cfg.hidden_dropout_prob == 0.0 && cfg.attention_probs_dropout_prob == 0.0;
    if no_dropout && crate::model::fast::usable(vit, input.device()) {
        let start = match b {
            Boundary::Pixels => fast::Start::Pixels,
            Boundary::Layer(k) => fast::Start::Layer(k),
            Boundary::Features => fast::Start::Features,
        };
        return Ok(fast::loss_and_grads(vit, set, start, input, targets, label_smoothing)?);
    }
    reference_loss_and_grads(vit, params, set, b, input, targets, label_smoothing, dropout)
}

/// [`loss_and_grads`] through candle's autograd on the reference forward (any device, dropout).
#[allow(clippy::too_many_arguments)]
pub fn reference_loss_and_grads(
    vit: &Vit,
    params: &Params,
    set: TrainableSet,
    b: Boundary,
    input: &Tensor,
    targets: &[u32],
    label_smoothing: f64,
    dropout: Option<&mut Dropout>,
) -> Result<(f64, BTreeMap<String, Tensor>), TrainError> {
    let layers = vit.config().num_hidden_layers;
    let logits = trainable_forward(vit, b, input, dropout)?;
    let loss = cross_entropy(&logits, targets, label_smoothing, None)?;
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
