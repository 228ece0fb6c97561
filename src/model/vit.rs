//! The reference ViT (`ViTForImageClassification`): its weights assembled from [`Params`], and a
//! forward pass written with differentiable candle ops only, so that autograd gives every
//! parameter its true gradient on any device. It is the oracle of the fast CPU path; which of the
//! two runs is decided in one place, [`super::network`].
//!
//! candle-transformers' `vit` uses `softmax_last_dim` and the fused `layer_norm`, which have no
//! backward: candle silently treats their outputs as constants. Here layer norm, softmax and the
//! activations are composed from ops that all implement backward, and golden-file tests check
//! every gradient against PyTorch. On a GPU, layer norm and softmax run as candle's fused kernels
//! instead, with our own backward attached where a gradient may be asked for ([`super::fused`]).

use std::sync::Arc;

use candle_core::{D, DType, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::config::Activation;
use super::fused;
use super::fast::matmul::PackedB;
use super::precision::Precision;
use super::weights::{Params, keys};
use super::{ModelError, VitConfig};

type Result<T> = std::result::Result<T, ModelError>;

/// A linear layer `y = x Wᵀ + b` over the last dimension.
#[derive(Clone)]
pub(crate) struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, xs: &Tensor, prec: Precision) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let (rows, inner) = (dims[..dims.len() - 1].iter().product::<usize>(), dims[dims.len() - 1]);
        let y = matmul(&xs.reshape((rows, inner))?, &self.weight.t()?, prec)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank ≥ 1") = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }
}

/// `a·b` with both operands at `prec`. In bf16 each operand is rounded to bfloat16 by a
/// straight-through cast, `x + (bf16(x) − x)` with the difference detached: the value is the
/// rounded one (the difference is exact), and the gradient reaches `x` unchanged, as the fast
/// path's mixed precision gives it (f32 gradients of the f32 master weights).
///
/// On a GPU, bf16 runs natively instead, as `torch.autocast` does: both operands cast to bf16,
/// cuBLAS multiplies them with f32 accumulation (candle asks for `CUBLAS_COMPUTE_32F`), and the
/// bf16 result is cast back to f32. The casts are differentiable (their backward casts the
/// gradient back), so the backward's products run in bf16 too and the f32 master weights get
/// f32 gradients.
fn matmul(a: &Tensor, b: &Tensor, prec: Precision) -> Result<Tensor> {
    match prec {
        Precision::F32 => Ok(a.matmul(b)?),
        Precision::Bf16 if a.device().is_cuda() => {
            let dtype = a.dtype();
            Ok(a.to_dtype(DType::BF16)?.matmul(&b.to_dtype(DType::BF16)?)?.to_dtype(dtype)?)
        }
        Precision::Bf16 => {
            let round = |x: &Tensor| -> Result<Tensor> { Ok((x + (x.to_dtype(DType::BF16)?.to_dtype(x.dtype())? - x)?.detach())?) };
            Ok(round(a)?.matmul(&round(b)?)?)
        }
    }
}

/// Layer normalisation over the last dimension, composed so that it has a backward.
#[derive(Clone)]
pub(crate) struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) eps: f64,
}

impl LayerNorm {
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let inputs = [xs, &self.weight, &self.bias];
        if fused::no_grad(&inputs) {
            return Ok(candle_nn::ops::layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps as f32)?);
        }
        if fused::with_backward(&inputs) {
            return Ok(fused::layer_norm(xs, &self.weight, &self.bias, self.eps)?);
        }
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centred = xs.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// Softmax over the last dimension. The max is subtracted for stability; it is detached because
/// softmax does not depend on it, which saves its backward work.
pub fn softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    if fused::no_grad(&[xs]) {
        return candle_nn::ops::softmax_last_dim(&xs.contiguous()?);
    }
    if fused::with_backward(&[xs]) {
        return fused::softmax_last_dim(xs);
    }
    let max = xs.detach().max_keepdim(D::Minus1)?;
    let e = xs.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// log(softmax(x)) over the last dimension, composed (differentiable).
pub fn log_softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    let max = xs.detach().max_keepdim(D::Minus1)?;
    let shifted = xs.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

fn activate(act: Activation, xs: &Tensor) -> candle_core::Result<Tensor> {
    match act {
        Activation::Gelu => xs.gelu_erf(),
        Activation::GeluTanh => xs.gelu(),
        Activation::Relu => xs.relu(),
        Activation::Silu => xs.silu(),
        Activation::QuickGelu => {
            let sig = ((xs * -1.702)?.exp()? + 1.0)?.recip()?;
            xs * sig
        }
    }
}

/// Dropout for training, driven by our seeded generator so runs are reproducible.
pub struct Dropout<'a> {
    pub rng: &'a mut ChaCha8Rng,
}

impl Dropout<'_> {
    fn apply(&mut self, xs: &Tensor, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(xs.clone());
        }
        let keep = 1.0 - p;
        let mask: Vec<f32> =
            (0..xs.elem_count()).map(|_| if self.rng.random::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?;
        Ok((xs * mask)?)
    }
}

#[derive(Clone)]
pub(crate) struct Layer {
    pub(crate) ln_before: LayerNorm,
    pub(crate) query: Linear,
    pub(crate) key: Linear,
    pub(crate) value: Linear,
    pub(crate) attn_out: Linear,
    pub(crate) ln_after: LayerNorm,
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
}

/// A ViT classifier assembled from [`Params`]. Building one is cheap (tensors are shared with the
/// parameters), so callers build one per use with the trainable set they need.
#[derive(Clone)]
pub struct Vit {
    pub(crate) cfg: VitConfig,
    pub(crate) patch_weight: Tensor,
    pub(crate) patch_bias: Tensor,
    pub(crate) cls_token: Tensor,
    pub(crate) position_embeddings: Tensor,
    pub(crate) layers: Vec<Layer>,
    pub(crate) layernorm: LayerNorm,
    pub(crate) classifier: Linear,
    /// True when some parameter is tracked by autograd (then the fast path, which builds no
    /// graph, must not be used).
    pub(crate) trainable: bool,
    /// The precision of every matrix product, on both paths.
    pub(crate) precision: Precision,
    /// The weights of its linear layers packed once for inference's products on the CPU (see
    /// [`Vit::packed_for_inference`]); none when built.
    pub(crate) packed: Option<Arc<[PackedB]>>,
}

impl Vit {
    /// Assembles the model; parameters for which `trainable(name)` is false are detached, so no
    /// backward graph is built through them.
    pub fn new(cfg: &VitConfig, params: &Params, trainable: &dyn Fn(&str) -> bool) -> Result<Self> {
        use keys::{bias, weight};
        let t = |name: &str| params.tensor(name, trainable(name));
        let any_trainable = params.iter().any(|(name, _)| trainable(name));
        let eps = cfg.layer_norm_eps;
        let ln = |p: &str| -> Result<LayerNorm> { Ok(LayerNorm { weight: t(&weight(p))?, bias: t(&bias(p))?, eps }) };
        let lin = |p: &str, with_bias: bool| -> Result<Linear> {
            Ok(Linear { weight: t(&weight(p))?, bias: if with_bias { Some(t(&bias(p))?) } else { None } })
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let key = |part: &str| keys::layer(i, part);
            layers.push(Layer {
                ln_before: ln(&key(keys::NORM_BEFORE))?,
                query: lin(&key(keys::QUERY), cfg.qkv_bias)?,
                key: lin(&key(keys::KEY), cfg.qkv_bias)?,
                value: lin(&key(keys::VALUE), cfg.qkv_bias)?,
                attn_out: lin(&key(keys::ATTENTION_OUT), true)?,
                ln_after: ln(&key(keys::NORM_AFTER))?,
                fc1: lin(&key(keys::FC1), true)?,
                fc2: lin(&key(keys::FC2), true)?,
            });
        }
        let patch_weight = t(keys::PATCH_WEIGHT)?;
        let h = cfg.hidden_size;
        Ok(Self {
            cfg: cfg.clone(),
            patch_weight: patch_weight.reshape((h, ()))?,
            patch_bias: t(keys::PATCH_BIAS)?,
            cls_token: t(keys::CLS_TOKEN)?,
            position_embeddings: t(keys::POSITION_EMBEDDINGS)?,
            layers,
            layernorm: ln(keys::FINAL_NORM)?,
            classifier: lin(keys::HEAD, true)?,
            trainable: any_trainable,
            precision: Precision::F32,
            packed: None,
        })
    }

    /// The same model with its products at `precision` (f32 when built).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        if precision != self.precision {
            self.packed = None;
        }
        self.precision = precision;
        self
    }

    /// The precision of its products.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Assembles the model with every parameter frozen (for inference).
    pub fn frozen(cfg: &VitConfig, params: &Params) -> Result<Self> {
        Self::new(cfg, params, &|_| false)
    }

    /// The configuration.
    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    pub(crate) fn check_pixels(&self, pixels: &Tensor) -> Result<()> {
        let cfg = &self.cfg;
        let (_, c, ih, iw) = pixels.dims4()?;
        if c != cfg.num_channels || (ih, iw) != cfg.image_size {
            return Err(ModelError::Input(format!(
                "pixel values are {c}×{ih}×{iw}, the model expects {}×{}×{}",
                cfg.num_channels, cfg.image_size.0, cfg.image_size.1
            )));
        }
        Ok(())
    }

    /// Patch + CLS + position embeddings: (B, C, H, W) pixels → (B, tokens, hidden), with candle
    /// ops only (differentiable; the fast path's oracle).
    pub fn embed_reference(&self, pixels: &Tensor) -> Result<Tensor> {
        self.check_pixels(pixels)?;
        let cfg = &self.cfg;
        let (b, c, _, _) = pixels.dims4()?;
        let (ph, pw) = cfg.patch_size;
        let (gh, gw) = cfg.grid();
        // A stride-P convolution with a P×P kernel is a matmul over unfolded patches; pixels past
        // the last whole patch are dropped, as the convolution drops them.
        let patches = pixels
            .narrow(2, 0, gh * ph)?
            .narrow(3, 0, gw * pw)?
            .reshape((b, c, gh, ph, gw, pw))?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((b * gh * gw, c * ph * pw))?;
        let emb = matmul(&patches, &self.patch_weight.t()?, self.precision)?.broadcast_add(&self.patch_bias)?;
        let emb = emb.reshape((b, gh * gw, cfg.hidden_size))?;
        let cls = self.cls_token.broadcast_as((b, 1, cfg.hidden_size))?;
        let x = Tensor::cat(&[&cls, &emb], 1)?;
        Ok(x.broadcast_add(&self.position_embeddings)?)
    }

    /// Runs encoder layers `range` on hidden states (B, tokens, hidden), with candle ops only
    /// (differentiable; the fast path's oracle), and dropout when given.
    pub fn encode_reference(&self, mut x: Tensor, range: std::ops::Range<usize>, mut dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, n, h) = x.dims3()?;
        let heads = cfg.num_attention_heads;
        let d = cfg.head_dim();
        let scale = 1.0 / (d as f64).sqrt();
        for layer in &self.layers[range] {
            let hs = layer.ln_before.forward(&x)?;
            let split = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?) };
            let prec = self.precision;
            let q = split(layer.query.forward(&hs, prec)?)?;
            let k = split(layer.key.forward(&hs, prec)?)?;
            let v = split(layer.value.forward(&hs, prec)?)?;
            let scores = (matmul(&q, &k.t()?, prec)? * scale)?;
            let mut probs = softmax_last_dim(&scores)?;
            if let Some(dr) = dropout.as_deref_mut() {
                probs = dr.apply(&probs, cfg.attention_probs_dropout_prob)?;
            }
            let ctx = matmul(&probs, &v, prec)?.transpose(1, 2)?.reshape((b, n, h))?;
            let mut attn = layer.attn_out.forward(&ctx, prec)?;
            if let Some(dr) = dropout.as_deref_mut() {
                attn = dr.apply(&attn, cfg.hidden_dropout_prob)?;
            }
            x = (x + attn)?;
            let hs = layer.ln_after.forward(&x)?;
            let hs = activate(cfg.hidden_act, &layer.fc1.forward(&hs, prec)?)?;
            let mut mlp = layer.fc2.forward(&hs, prec)?;
            if let Some(dr) = dropout.as_deref_mut() {
                mlp = dr.apply(&mlp, cfg.hidden_dropout_prob)?;
            }
            x = (x + mlp)?;
        }
        Ok(x)
    }

    /// The final layer norm applied to the CLS token: (B, tokens, hidden) → (B, hidden). This
    /// is what the classifier sees (the "features" of an image).
    pub fn pool(&self, x: &Tensor) -> Result<Tensor> {
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        self.layernorm.forward(&cls)
    }

    /// Classifier logits from pooled features.
    pub fn head(&self, features: &Tensor) -> Result<Tensor> {
        self.classifier.forward(features, self.precision)
    }

    /// Features of a batch of images with candle ops only (differentiable; the fast path's
    /// oracle).
    pub fn features_reference(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self.embed_reference(pixels)?;
        let x = self.encode_reference(x, 0..self.layers.len(), None)?;
        self.pool(&x)
    }

    /// Logits with dropout when given, with candle ops only (the training forward of the
    /// reference path).
    pub fn forward_reference(&self, pixels: &Tensor, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let x = self.embed_reference(pixels)?;
        let x = self.encode_reference(x, 0..self.layers.len(), dropout)?;
        self.head(&self.pool(&x)?)
    }
}

/// What a batch's loss is: the cross-entropy of its targets, with label smoothing, each example
/// weighted by its class's weight when there are class weights (the loss is then the weighted
/// mean, as PyTorch's `CrossEntropyLoss(weight=…)`).
#[derive(Debug, Clone, Copy)]
pub struct Objective<'a> {
    pub targets: &'a [u32],
    pub label_smoothing: f64,
    pub class_weights: Option<&'a [f32]>,
}

impl<'a> Objective<'a> {
    /// The plain mean cross-entropy of `targets`.
    pub fn plain(targets: &'a [u32]) -> Self {
        Self { targets, label_smoothing: 0.0, class_weights: None }
    }
}

/// Mean cross-entropy of `logits` (B, C) against integer `targets`, with label smoothing `eps`
/// (each target gets 1 − eps + eps/C, the others eps/C, as PyTorch's `label_smoothing`) and
/// optional per-class weights (the weighted mean over samples, as PyTorch's `weight` without
/// smoothing).
pub fn cross_entropy(logits: &Tensor, targets: &[u32], eps: f64, class_weights: Option<&[f32]>) -> Result<Tensor> {
    let (b, c) = logits.dims2()?;
    if targets.len() != b {
        return Err(ModelError::Input(format!("{} targets for {b} logits", targets.len())));
    }
    let mut q = vec![(eps / c as f64) as f32; b * c];
    let mut w = vec![1f32; b];
    for (i, &t) in targets.iter().enumerate() {
        let t = t as usize;
        if t >= c {
            return Err(ModelError::Input(format!("target {t} is out of range for {c} classes")));
        }
        q[i * c + t] += (1.0 - eps) as f32;
        if let Some(cw) = class_weights {
            w[i] = cw[t];
        }
    }
    let total_w: f32 = w.iter().sum();
    let dev = logits.device();
    let q = Tensor::from_vec(q, (b, c), dev)?;
    let w = Tensor::from_vec(w, b, dev)?;
    let per_sample = (log_softmax_last_dim(logits)? * q)?.sum(D::Minus1)?;
    Ok(((per_sample * w)?.sum_all()? * (-1.0 / f64::from(total_w)))?)
}

/// Softmax probabilities of logits, on the host.
pub fn probabilities(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(softmax_last_dim(&logits.to_dtype(DType::F32)?)?.to_vec2::<f32>()?)
}
