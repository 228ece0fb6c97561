//! Layer norm and softmax as candle's fused kernels on a GPU, where the composed forms of
//! [`super::vit`] launch five to nine kernels each (and their backward many more).
//!
//! candle's fused `layer_norm` and `softmax_last_dim` have no backward: autograd silently treats
//! their outputs as constants. So they are used in two ways only:
//! - **no gradient wanted** ([`no_grad`]): no input is tracked by autograd (inference, a frozen
//!   prefix). `VITFORGE_FUSED=0` turns this off.
//! - **with our backward attached** ([`with_backward`]): the fused kernel computes the value, and a
//!   custom op that copies it carries the backward, written here in composed candle ops from
//!   the saved output: `dx = y ⊙ (dy − Σ dy ⊙ y)` for softmax, and for the normalisation of layer
//!   norm `dx = rstd ⊙ (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂))` (its scale and shift stay composed, so
//!   their gradients come from autograd). This path is on by default on a GPU where it has run and
//!   passed `vitforge selfcheck` (bench/GPU.md); `VITFORGE_FUSED_TRAINING=0` turns it off.
//!
//! On the CPU neither is used: the fast path runs inference and training there, and the
//! reference path stays the composed oracle. The tests below check both against the composed
//! forms on the CPU (candle has CPU versions of the kernels); the GPU's own kernels are checked
//! by `vitforge selfcheck --device cuda:N` against the golden files.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, D, Layout, Result, Shape, Tensor};

fn flag(var: &str, lock: &'static OnceLock<bool>) -> bool {
    *lock.get_or_init(|| std::env::var(var).map_or(true, |v| v.trim() != "0"))
}

/// Whether an op on `inputs` may run as a fused kernel without a backward: none of them tracked
/// by autograd, on a GPU, and unless `VITFORGE_FUSED=0`.
pub(crate) fn no_grad(inputs: &[&Tensor]) -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    !inputs[0].device().is_cpu() && inputs.iter().all(|t| !t.track_op()) && flag("VITFORGE_FUSED", &ENABLED)
}

/// Whether an op on `inputs`, some of them tracked, may run as a fused kernel with our backward
/// attached: on a GPU, unless `VITFORGE_FUSED_TRAINING=0`.
pub(crate) fn with_backward(inputs: &[&Tensor]) -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    !inputs[0].device().is_cpu() && flag("VITFORGE_FUSED_TRAINING", &ENABLED)
}

/// The value of its second operand, with a backward to its first: what ties a fused kernel's
/// output `y = f(x)` back to `x` for autograd. The forward is one copy of `y`.
struct Attach<B: Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync> {
    name: &'static str,
    /// (x, y, dy) → dx.
    backward: B,
}

impl<B: Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync> CustomOp2 for Attach<B> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, y: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((y.try_clone(layout)?, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((y.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached: the backward builds no graph of its own.
        Ok((Some((self.backward)(&x.detach(), &res.detach(), &grad.detach())?), None))
    }
}

/// `y` (computed from `x` by a kernel autograd does not see) tied to `x` with `backward`.
fn attach(
    name: &'static str,
    x: &Tensor,
    y: &Tensor,
    backward: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    // The copy in the forward takes y's buffer whole: y must start it and be contiguous (a fresh
    // kernel output is both).
    let y = y.contiguous()?;
    x.apply_op2(&y, Attach { name, backward })
}

/// Softmax over the last dimension by the fused kernel, differentiable.
pub(crate) fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let xs = xs.contiguous()?;
    let y = candle_nn::ops::softmax_last_dim(&xs.detach())?;
    attach("vitforge-softmax-last-dim", &xs, &y, |_, y, dy| {
        let gy = (dy * y)?;
        &gy - y.broadcast_mul(&gy.sum_keepdim(D::Minus1)?)?
    })
}

/// Layer norm over the last dimension by the fused kernel, differentiable: the normalisation is
/// fused with the backward above, the scale and shift are composed.
pub(crate) fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let xs = xs.contiguous()?;
    let n = xs.dim(D::Minus1)?;
    let (ones, zeros) = (Tensor::ones(n, xs.dtype(), xs.device())?, Tensor::zeros(n, xs.dtype(), xs.device())?);
    let normed = candle_nn::ops::layer_norm(&xs.detach(), &ones, &zeros, eps as f32)?;
    let normed = attach("vitforge-layer-norm", &xs, &normed, move |x, xhat, g| {
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let rstd = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let mean_g = g.mean_keepdim(D::Minus1)?;
        let mean_gx = (g * xhat)?.mean_keepdim(D::Minus1)?;
        (g.broadcast_sub(&mean_g)? - xhat.broadcast_mul(&mean_gx)?)?.broadcast_mul(&rstd)
    })?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// The reference path's layer norm, which on the CPU is always the composed form.
    fn composed_layer_norm(xs: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
        crate::model::vit::LayerNorm { weight: w.clone(), bias: b.clone(), eps }.forward(xs).unwrap()
    }

    /// The fused forms with our backward give the composed forms' values and gradients (of the
    /// input, and of layer norm's scale and shift), here on the CPU.
    #[test]
    fn fused_forms_with_backward_match_the_composed_forms_and_their_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (2, 5, 24), &dev).unwrap() + 1.5).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.2, 24, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, 24, &dev).unwrap()).unwrap();
        // A weighted sum, so that every output element has its own upstream gradient.
        let weights = Tensor::randn(0f32, 1.0, (2, 5, 24), &dev).unwrap();
        let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();

        let (ours, reference) = (softmax_last_dim(x.as_tensor()).unwrap(), crate::model::vit::softmax_last_dim(x.as_tensor()).unwrap());
        assert!(max_diff(&ours, &reference) < 1e-6);
        let (g1, g2) = (loss(&ours).backward().unwrap(), loss(&reference).backward().unwrap());
        let d = max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap());
        assert!(d < 1e-5, "softmax's input gradient differs by {d}");

        let eps = 1e-6;
        let ours = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), eps).unwrap();
        let reference = composed_layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), eps);
        assert!(max_diff(&ours, &reference) < 1e-4);
        let (g1, g2) = (loss(&ours).backward().unwrap(), loss(&reference).backward().unwrap());
        for (name, v) in [("input", &x), ("scale", &w), ("shift", &b)] {
            let (a, r) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            let scale = r.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let d = max_diff(a, r);
            assert!(d <= 1e-4 * scale.max(1.0), "layer norm's {name} gradient differs by {d} (largest {scale})");
        }
    }

    /// Without a gradient wanted, candle's fused kernels alone compute what the composed forms
    /// compute; on the CPU, and for anything autograd tracks, [`no_grad`] keeps the composed forms.
    #[test]
    fn fused_kernels_match_the_composed_forms() {
        let dev = Device::Cpu;
        let xs = (Tensor::randn(0f32, 3.0, (2, 5, 24), &dev).unwrap() + 1.5).unwrap();
        let (w, b) = (Tensor::randn(1f32, 0.2, 24, &dev).unwrap(), Tensor::randn(0f32, 0.2, 24, &dev).unwrap());
        let kernel = candle_nn::ops::layer_norm(&xs, &w, &b, 1e-6).unwrap();
        assert!(max_diff(&kernel, &composed_layer_norm(&xs, &w, &b, 1e-6)) < 1e-4);
        let kernel = candle_nn::ops::softmax_last_dim(&xs).unwrap();
        assert!(max_diff(&kernel, &crate::model::vit::softmax_last_dim(&xs).unwrap()) < 1e-6);
        assert!(!no_grad(&[&xs]) && !with_backward(&[&xs]));
        let var = Var::from_tensor(&xs).unwrap();
        assert!(!no_grad(&[var.as_tensor()]));
    }
}
