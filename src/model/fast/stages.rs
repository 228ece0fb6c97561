//! Where the fast path's passes spend their time, stage by stage, for `vitforge bench
//! --breakdown`: wall-clock seconds of each stage of every forward and backward pass while a
//! breakdown is on (off by default: then a stage costs one relaxed atomic load). Each stage is
//! timed where the pass's own thread calls it, around the parallel work it hands to the pool, so
//! the figures are wall time and add up to at most the passes' time; what no stage covers
//! (pooling, the head, the loss, conversions to and from tensors, and, in a training step, the
//! optimiser) is the caller's total less their sum.
//!
//! The counters are the process's: a breakdown is meant for a process that runs one thing at a
//! time, as `vitforge bench` does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A stage of a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Patches to rows, their product by the patch weights, CLS and position embeddings.
    Embed,
    /// Layer norms before attention and before the MLP.
    LayerNorm,
    /// The product of Q, K and V.
    Qkv,
    /// Every head's scores, softmax and weighted values, and the heads gathered.
    Attention,
    /// The attention's output product.
    AttentionOut,
    /// The residual additions.
    Residual,
    /// The MLP's first product.
    Fc1,
    /// The activation and the MLP's second product (the activation applied as fc1's output is
    /// packed).
    Fc2,
    /// Backward of the activation (recomputing it for fc2's weight gradient).
    ActivationBackward,
    /// Gradients of the linear layers' weights and biases.
    WeightGrads,
    /// Gradients of the linear layers' inputs.
    InputGrads,
    /// Attention's backward (the scores recomputed).
    AttentionBackward,
    /// Layer norms' backward (their outputs recomputed).
    LayerNormBackward,
    /// The embeddings' backward.
    EmbedBackward,
}

impl Stage {
    /// Every stage, in the order a training step meets them.
    pub const ALL: [Stage; 14] = [
        Stage::Embed,
        Stage::LayerNorm,
        Stage::Qkv,
        Stage::Attention,
        Stage::AttentionOut,
        Stage::Residual,
        Stage::Fc1,
        Stage::Fc2,
        Stage::ActivationBackward,
        Stage::WeightGrads,
        Stage::InputGrads,
        Stage::AttentionBackward,
        Stage::LayerNormBackward,
        Stage::EmbedBackward,
    ];

    /// Its name in `vitforge bench`'s output.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Embed => "embed",
            Stage::LayerNorm => "layer_norm",
            Stage::Qkv => "qkv",
            Stage::Attention => "attention",
            Stage::AttentionOut => "attention_out",
            Stage::Residual => "residual",
            Stage::Fc1 => "fc1",
            Stage::Fc2 => "activation_fc2",
            Stage::ActivationBackward => "activation_backward",
            Stage::WeightGrads => "weight_grads",
            Stage::InputGrads => "input_grads",
            Stage::AttentionBackward => "attention_backward",
            Stage::LayerNormBackward => "layer_norm_backward",
            Stage::EmbedBackward => "embed_backward",
        }
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; Stage::ALL.len()] = [const { AtomicU64::new(0) }; Stage::ALL.len()];

/// Runs `f`, adding its wall time to `stage` while a breakdown is on.
#[inline]
pub(super) fn timed<R>(stage: Stage, f: impl FnOnce() -> R) -> R {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    NANOS[stage as usize].fetch_add(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    out
}

/// Starts a breakdown from zero (or turns it off): the passes from now on are timed by stage.
pub fn set_breakdown(on: bool) {
    for n in &NANOS {
        n.store(0, Ordering::Relaxed);
    }
    ON.store(on, Ordering::Relaxed);
}

/// Seconds spent in each stage since [`set_breakdown`] turned it on, every stage listed.
pub fn breakdown() -> Vec<(Stage, f64)> {
    Stage::ALL.iter().map(|&s| (s, NANOS[s as usize].load(Ordering::Relaxed) as f64 * 1e-9)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_listed_once_in_order_with_distinct_names() {
        for (i, s) in Stage::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?} in its place");
        }
        let mut names: Vec<_> = Stage::ALL.iter().map(|s| s.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Stage::ALL.len());
    }
}
