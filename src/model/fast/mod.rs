//! The fast CPU path of the ViT: forward and backward written out layer by layer (as llm.c
//! does for GPT-2), with fused kernels and `gemm` products on strided views, instead of candle's
//! op-by-op autograd. It computes exactly what [`super::vit`] computes (tests hold the two and the
//! PyTorch golden files together) while avoiding per-op allocations, transposed copies and the
//! zero-then-add gradient accumulation of a generic autograd, and it keeps far fewer activations:
//! layer-norm and GELU outputs and attention probabilities are recomputed in backward.
//!
//! Parameters stay candle tensors; this module borrows their storage for the duration of a call.
//! Used on the CPU device when dropout is off; everything else takes the reference path.

pub mod isa;
mod kernels;
pub(super) mod matmul;
pub(super) mod simd;
pub mod stages;

use self::stages::{Stage, timed};

use std::collections::BTreeMap;

use candle_core::{Device, Storage, StorageRef, Tensor};
use rayon::prelude::*;

use self::kernels as k;
use self::matmul::{ElementWise, Mat, MatMut, PackedB, Threads, gemm, gemm_bias, gemm_bias_packed, gemm_bias_parts, gemm_mapped, gemm_mapped_packed, with_scratch};
use super::precision::Precision;
use super::vit::{Linear, Objective, Vit};
use super::weights::{Boundary, TrainableSet, keys, param_specs};
use super::{ModelError, VitConfig};

type Result<T> = std::result::Result<T, ModelError>;

/// Runs `f` on one of rayon's worker threads while the calling thread waits (at once when
/// already on one). Every entry point of this path goes through it: a training step opens some
/// thousands of parallel regions (products, element-wise kernels, attention heads), and a region
/// opened by a thread outside the pool is handed to the pool while that thread sleeps until it
/// is done, two context switches each time and a third thread on the cores while the workers
/// spin; opened by a worker, it is shared through that worker's own queue. Measured in
/// bench/RESULTS.md ("Compute on the pool's threads").
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // Tests force a kernel level per thread (`isa::tests::on`): the worker takes the caller's.
    #[cfg(test)]
    let level = isa::tests::OVERRIDE.get();
    rayon::scope(move |_| {
        #[cfg(test)]
        let before = isa::tests::OVERRIDE.replace(level);
        let out = f();
        #[cfg(test)]
        isa::tests::OVERRIDE.set(before);
        out
    })
}

/// Whether the fast path can run this model on this device (set `VITFORGE_REFERENCE_OPS=1` to
/// force the reference path, e.g. to compare speed). [`super::network`] decides with it.
pub(super) fn usable(vit: &Vit, device: &Device) -> bool {
    device.is_cpu()
        && !reference_ops_forced()
        && vit.cfg.hidden_dropout_prob == 0.0
        && vit.cfg.attention_probs_dropout_prob == 0.0
}

/// Whether `VITFORGE_REFERENCE_OPS` asks for candle's composed ops instead of the fused CPU
/// kernels (read once).
pub fn reference_ops_forced() -> bool {
    static FORCE_REFERENCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCE_REFERENCE.get_or_init(|| std::env::var_os("VITFORGE_REFERENCE_OPS").is_some())
}

pub use matmul::{bf16_products, dpbf16_from_env, f32_products, mkl_from_env, native_bf16};

/// [`isa::summary`], and at `avx512bf16` what multiplies bf16 and why: for logs and `vitforge
/// bench`.
pub fn kernels_summary() -> String {
    let bf16 = match (isa::active(), matmul::dpbf16_from_env()) {
        (isa::Isa::Avx512Bf16, Ok(Some(forced))) => {
            format!("; bf16 products by {} (VITFORGE_DPBF16={})", bf16_products(), u8::from(forced))
        }
        (isa::Isa::Avx512Bf16, _) => format!(
            "; vdpbf16ps measured at {:.2}× the f32 FMA kernel's speed here, so bf16 products by {}",
            matmul::dpbf16_speed().unwrap_or(f64::NAN),
            bf16_products()
        ),
        _ => String::new(),
    };
    let f32 = match (f32_products(), mkl_from_env()) {
        ("mkl", Ok(Some(_))) => "; but f32 products by Intel MKL (VITFORGE_MKL=1)",
        ("mkl", _) => "; but f32 products by Intel MKL (its default on Intel CPUs with AVX-512; VITFORGE_MKL=0 for ours)",
        (_, Ok(Some(false))) => "; f32 products by our kernels (VITFORGE_MKL=0)",
        _ if cfg!(all(feature = "mkl", target_arch = "x86_64")) => {
            "; Intel MKL is built in but off here (its default only on Intel CPUs with AVX-512; VITFORGE_MKL=1 turns it on)"
        }
        _ => "",
    };
    format!("{}{bf16}{f32}", isa::summary())
}

/// Which compute path a CPU model runs, for `vitforge bench`: `reference` (candle's composed ops,
/// `VITFORGE_REFERENCE_OPS`), else the kernel level (`generic`, `avx2`, `avx512`, `avx512bf16` or `amx`, see [`isa`]), with
/// `+gemm-crate` when `VITFORGE_GENERIC_GEMM` swaps our matrix product for the crate's.
pub fn cpu_path() -> String {
    if reference_ops_forced() {
        return "reference".into();
    }
    let level = isa::active();
    let crate_gemm = if level >= isa::Isa::Avx2 && matmul::generic_forced() { "+gemm-crate" } else { "" };
    format!("{}{crate_gemm}", level.name())
}

/// Read guards on the storage of every tensor of a model, so its weights can be used as slices.
struct Guards<'a> {
    items: Vec<(StorageRef<'a>, usize, usize)>,
}

impl<'a> Guards<'a> {
    fn new(tensors: &[&'a Tensor]) -> Result<Self> {
        let mut items = Vec::with_capacity(tensors.len());
        for t in tensors {
            let (guard, layout) = t.storage_and_layout();
            if !layout.is_contiguous() || t.dtype() != candle_core::DType::F32 || !matches!(&*guard, Storage::Cpu(_)) {
                return Err(ModelError::Input("the fast path needs contiguous f32 CPU weights".into()));
            }
            items.push((guard, layout.start_offset(), t.elem_count()));
        }
        Ok(Self { items })
    }

    fn slice(&self, i: usize) -> &[f32] {
        let (guard, offset, len) = &self.items[i];
        match &**guard {
            Storage::Cpu(cpu) => &cpu.as_slice::<f32>().expect("checked f32 in new")[*offset..*offset + *len],
            _ => unreachable!("checked CPU storage in new"),
        }
    }
}

struct Lin<'g> {
    w: &'g [f32],
    b: Option<&'g [f32]>,
    out: usize,
    inp: usize,
    /// The precision of its products (forward and backward).
    prec: Precision,
    /// Its weight packed for inference's products (`x·Wᵀ`), when the model has them.
    packed: Option<&'g PackedB>,
}

struct LayerW<'g> {
    ln1: (&'g [f32], &'g [f32]),
    q: Lin<'g>,
    k: Lin<'g>,
    v: Lin<'g>,
    o: Lin<'g>,
    ln2: (&'g [f32], &'g [f32]),
    fc1: Lin<'g>,
    fc2: Lin<'g>,
    /// The precision of the attention products.
    prec: Precision,
    /// Q's, K's and V's weights packed as one for inference's product (`x·[Wq Wk Wv]ᵀ`), where
    /// the kernel's panels allow it (else each is packed on its own, if at all).
    qkv_packed: Option<&'g PackedB>,
}

struct Weights<'g> {
    patch: Lin<'g>,
    cls: &'g [f32],
    pos: &'g [f32],
    layers: Vec<LayerW<'g>>,
    ln: (&'g [f32], &'g [f32]),
    head: Lin<'g>,
}

/// Every tensor of the model in a fixed order (the order [`Weights::new`] reads them back).
fn tensor_list(vit: &Vit) -> Vec<&Tensor> {
    let mut out = vec![&vit.patch_weight, &vit.patch_bias, &vit.cls_token, &vit.position_embeddings];
    for layer in &vit.layers {
        out.push(&layer.ln_before.weight);
        out.push(&layer.ln_before.bias);
        for l in [&layer.query, &layer.key, &layer.value, &layer.attn_out] {
            out.push(&l.weight);
            if let Some(b) = &l.bias {
                out.push(b);
            }
        }
        out.push(&layer.ln_after.weight);
        out.push(&layer.ln_after.bias);
        for l in [&layer.fc1, &layer.fc2] {
            out.push(&l.weight);
            if let Some(b) = &l.bias {
                out.push(b);
            }
        }
    }
    out.push(&vit.layernorm.weight);
    out.push(&vit.layernorm.bias);
    out.push(&vit.classifier.weight);
    if let Some(b) = &vit.classifier.bias {
        out.push(b);
    }
    out
}

impl<'g> Weights<'g> {
    /// The weights of `vit` as slices of `g`, with the packed copies of inference attached.
    fn new(vit: &'g Vit, g: &'g Guards) -> Result<Self> {
        let mut i = 0;
        let mut next = || {
            i += 1;
            g.slice(i - 1)
        };
        let dims = |l: &Linear| (l.weight.dim(0).unwrap_or(0), l.weight.dim(1).unwrap_or(0));
        let prec = vit.precision;
        let patch_w = next();
        let patch_b = next();
        let (h, cpp) = (vit.cfg.hidden_size, patch_w.len() / vit.cfg.hidden_size);
        let cls = next();
        let pos = next();
        let mut layers = Vec::with_capacity(vit.layers.len());
        for layer in &vit.layers {
            let ln1 = (next(), next());
            let mut lin = |l: &Linear| {
                let (out, inp) = dims(l);
                let w = next();
                let b = if l.bias.is_some() { Some(next()) } else { None };
                Lin { w, b, out, inp, prec, packed: None }
            };
            let q = lin(&layer.query);
            let k = lin(&layer.key);
            let v = lin(&layer.value);
            let o = lin(&layer.attn_out);
            let ln2 = {
                let w = next();
                (w, next())
            };
            let mut lin = |l: &Linear| {
                let (out, inp) = dims(l);
                let w = next();
                let b = if l.bias.is_some() { Some(next()) } else { None };
                Lin { w, b, out, inp, prec, packed: None }
            };
            let fc1 = lin(&layer.fc1);
            let fc2 = lin(&layer.fc2);
            layers.push(LayerW { ln1, q, k, v, o, ln2, fc1, fc2, prec, qkv_packed: None });
        }
        let ln = (next(), next());
        let (out, inp) = dims(&vit.classifier);
        let hw = next();
        let hb = vit.classifier.bias.as_ref().map(|_| next());
        let patch = Lin { w: patch_w, b: Some(patch_b), out: h, inp: cpp, prec, packed: None };
        let mut w = Weights { patch, cls, pos, layers, ln, head: Lin { w: hw, b: hb, out, inp, prec, packed: None } };
        if let Some(packed) = vit.packed.as_deref()
            && w.attach(packed).is_none()
        {
            // `pack` made them for this very model: a mismatch is a bug, not bad input.
            return Err(ModelError::Weights("the packed weights do not fit the model's layers".into()));
        }
        Ok(w)
    }

    /// Attaches the packed weights [`pack`] made, in its order; `None` where they do not fit
    /// this model's shapes.
    fn attach(&mut self, packed: &'g [PackedB]) -> Option<()> {
        let mut packed = packed.iter().peekable();
        let one = |l: &mut Lin<'g>, p: Option<&'g PackedB>| {
            l.packed = Some(p.filter(|p| p.shape() == (l.inp, l.out))?);
            Some(())
        };
        one(&mut self.patch, packed.next())?;
        for layer in &mut self.layers {
            let qkv = (layer.q.inp, layer.q.out + layer.k.out + layer.v.out);
            if packed.peek().is_some_and(|p| p.shape() == qkv) {
                layer.qkv_packed = packed.next();
            } else {
                for l in [&mut layer.q, &mut layer.k, &mut layer.v] {
                    one(l, packed.next())?;
                }
            }
            for l in [&mut layer.o, &mut layer.fc1, &mut layer.fc2] {
                one(l, packed.next())?;
            }
        }
        one(&mut self.head, packed.next())?;
        packed.next().is_none().then_some(())
    }
}

/// The weights of every linear layer of `vit` packed once for the products of inference
/// (`x·Wᵀ` at the model's precision, for the kernel this process runs), in the order
/// [`Weights::attach`] reads them: the patch projection, then per layer Q, K and V as one
/// (where the kernel's panels allow, else each), the output, FC1 and FC2, then the head; `None`
/// where the products are not ours (the `gemm` crate's).
pub(super) fn pack(vit: &Vit) -> Result<Option<Vec<PackedB>>> {
    let guards = Guards::new(&tensor_list(vit))?;
    let w = Weights::new(vit, &guards)?;
    let one = |l: &Lin| PackedB::new(weight_t(l), l.prec);
    let mut packed = vec![one(&w.patch)];
    for layer in &w.layers {
        match PackedB::from_parts(&qkv_parts(layer), layer.q.prec) {
            Some(qkv) => packed.push(Some(qkv)),
            None => packed.extend([&layer.q, &layer.k, &layer.v].map(one)),
        }
        packed.extend([&layer.o, &layer.fc1, &layer.fc2].map(one));
    }
    packed.push(one(&w.head));
    Ok(packed.into_iter().collect())
}

/// `Wᵀ` of a linear layer (in × out), the right operand of `x·Wᵀ`.
fn weight_t<'g>(l: &Lin<'g>) -> Mat<'g> {
    Mat::rows(l.w, l.out, l.inp).t()
}

/// `Wqᵀ`, `Wkᵀ` and `Wvᵀ`, side by side the right operand of one product for Q, K and V.
fn qkv_parts<'g>(w: &LayerW<'g>) -> [Mat<'g>; 3] {
    [weight_t(&w.q), weight_t(&w.k), weight_t(&w.v)]
}

/// `y = x·[Wq Wk Wv]ᵀ + [bq bk bv]` for a row-major `x` (rows × in): Q, K and V side by side in
/// `y` (rows × 3·hidden), by one product, so `x` is packed once rather than three times.
fn linear_qkv(x: &[f32], rows: usize, w: &LayerW, y: &mut [f32]) {
    let ls = [&w.q, &w.k, &w.v];
    let width = ls.iter().map(|l| l.out).sum();
    if w.qkv_packed.is_none() && ls.iter().any(|l| l.packed.is_some()) {
        // Packed one by one (the kernel's panels did not allow one packing).
        let mut col = 0;
        for l in ls {
            linear(x, rows, l, y, width, col);
            col += l.out;
        }
        return;
    }
    let bias = ls.iter().any(|l| l.b.is_some()).then(|| {
        let mut bias = Vec::with_capacity(width);
        for l in ls {
            match l.b {
                Some(b) => bias.extend_from_slice(b),
                None => bias.resize(bias.len() + l.out, 0.0),
            }
        }
        bias
    });
    let (x, y) = (Mat::rows(x, rows, w.q.inp), MatMut::rows(y, rows, width));
    match w.qkv_packed.filter(|p| p.fits(w.q.prec)) {
        Some(packed) => gemm_bias_packed(x, packed, y, bias.as_deref(), Threads::All),
        None => gemm_bias_parts(x, &qkv_parts(w), y, bias.as_deref(), Threads::All, w.q.prec),
    }
}

/// `y[:, col..col+out] = x·Wᵀ + b` for a row-major `x` (rows × in) into a buffer `stride` wide.
fn linear(x: &[f32], rows: usize, l: &Lin, y: &mut [f32], stride: usize, col: usize) {
    let (x, wt) = (Mat::rows(x, rows, l.inp), weight_t(l));
    let y = MatMut::strided(y, rows, l.out, stride, col);
    if let Some(packed) = l.packed.filter(|p| p.fits(l.prec)) {
        return gemm_bias_packed(x, packed, y, l.b, Threads::All);
    }
    match l.b {
        Some(b) => gemm_bias(x, wt, y, b, Threads::All, l.prec),
        None => gemm(x, wt, y, 1.0, false, Threads::All, l.prec),
    }
}

/// `y = f(x)·Wᵀ + b` for a row-major `x` (rows × in) and an element-wise `f` (the activation
/// before fc2), `y` rows × out.
fn linear_mapped(x: &[f32], f: ElementWise, rows: usize, l: &Lin, y: &mut [f32]) {
    let (x, y) = (Mat::rows(x, rows, l.inp), MatMut::rows(y, rows, l.out));
    match l.packed.filter(|p| p.fits(l.prec)) {
        Some(packed) => gemm_mapped_packed(x, f, packed, y, l.b, Threads::All),
        None => gemm_mapped(x, f, weight_t(l), y, l.b, Threads::All, l.prec),
    }
}

/// Weight and bias gradients of a linear layer from its input and the gradient of its output
/// (`rows × out`).
fn linear_grads(x: &[f32], rows: usize, l: &Lin, dy: &[f32]) -> (Vec<f32>, Option<Vec<f32>>) {
    shared_input_grads(x, rows, &[l], dy).pop().expect("one layer, one gradient")
}

/// Weight and bias gradients of linear layers that share their input `x` and whose outputs lie
/// side by side, filling a `dy` as wide as they are together (one layer, or Q, K and V): one
/// product for all of them, so `x` is packed once rather than once per layer, and the bias sums
/// read `dy` in place.
fn shared_input_grads(x: &[f32], rows: usize, ls: &[&Lin], dy: &[f32]) -> Vec<(Vec<f32>, Option<Vec<f32>>)> {
    let (inp, prec) = (ls[0].inp, ls[0].prec);
    assert!(ls.iter().all(|l| l.inp == inp && l.prec == prec), "one input, one precision");
    let width: usize = ls.iter().map(|l| l.out).sum();
    let mut dw = vec![0f32; width * inp];
    let dy_view = Mat::rows(dy, rows, width);
    gemm(dy_view.t(), Mat::rows(x, rows, inp), MatMut::rows(&mut dw, width, inp), 1.0, false, Threads::All, prec);
    let db = ls.iter().any(|l| l.b.is_some()).then(|| k::col_sums(dy, width));
    // Split from the back, so the first layer's gradient keeps the product's buffer (shrunk in
    // place) and only the others are copied.
    let mut out = Vec::with_capacity(ls.len());
    let mut end = width;
    for l in ls.iter().rev() {
        let start = end - l.out;
        let w = if start == 0 {
            dw.truncate(l.out * inp);
            dw.shrink_to_fit();
            std::mem::take(&mut dw)
        } else {
            dw.split_off(start * inp)
        };
        out.push((w, l.b.and(db.as_ref()).map(|db| db[start..end].to_vec())));
        end = start;
    }
    out.reverse();
    out
}

/// `dx (+)= dy[:, col..col+out]·W`.
fn linear_input_grad(dy: &[f32], rows: usize, l: &Lin, stride: usize, col: usize, dx: &mut [f32], accumulate: bool) {
    let dy_view = Mat { data: dy, offset: col, rows, cols: l.out, rs: stride, cs: 1 };
    gemm(dy_view, Mat::rows(l.w, l.out, l.inp), MatMut::rows(dx, rows, l.inp), 1.0, accumulate, Threads::All, l.prec);
}

/// Patches as rows (B·patches × C·ph·pw), in the order of the convolution kernel's flattening.
fn im2col(cfg: &VitConfig, pixels: &[f32], b: usize) -> Vec<f32> {
    let c = cfg.num_channels;
    let (ih, iw) = cfg.image_size;
    let (ph, pw) = cfg.patch_size;
    let (gh, gw) = cfg.grid();
    let cpp = c * ph * pw;
    let mut cols = vec![0f32; b * gh * gw * cpp];
    cols.par_chunks_mut(gh * gw * cpp).enumerate().for_each(|(bi, out)| {
        let img = &pixels[bi * c * ih * iw..(bi + 1) * c * ih * iw];
        for py in 0..gh {
            for px in 0..gw {
                let row = &mut out[(py * gw + px) * cpp..(py * gw + px + 1) * cpp];
                for ch in 0..c {
                    for y in 0..ph {
                        let src = ch * ih * iw + (py * ph + y) * iw + px * pw;
                        row[(ch * ph + y) * pw..(ch * ph + y + 1) * pw].copy_from_slice(&img[src..src + pw]);
                    }
                }
            }
        }
    });
    cols
}

/// Patch, CLS and position embeddings: pixels → hidden states (B·tokens × hidden).
fn embed(cfg: &VitConfig, w: &Weights, pixels: &[f32], b: usize) -> (Vec<f32>, Vec<f32>) {
    let h = cfg.hidden_size;
    let n = cfg.num_tokens();
    let p = n - 1;
    let cols = im2col(cfg, pixels, b);
    let mut patches = vec![0f32; b * p * h];
    linear(&cols, b * p, &w.patch, &mut patches, h, 0);
    let mut x = vec![0f32; b * n * h];
    x.par_chunks_mut(n * h).enumerate().for_each(|(bi, xb)| {
        xb[..h].copy_from_slice(w.cls);
        xb[h..].copy_from_slice(&patches[bi * p * h..(bi + 1) * p * h]);
        k::add_assign(xb, w.pos);
    });
    (x, cols)
}

/// What one layer keeps for its backward.
struct LayerSaved {
    x_in: Vec<f32>,
    mean1: Vec<f32>,
    rstd1: Vec<f32>,
    qkv: Vec<f32>,
    lse: Vec<f32>,
    ctx: Vec<f32>,
    x_mid: Vec<f32>,
    mean2: Vec<f32>,
    rstd2: Vec<f32>,
    fc1: Vec<f32>,
}

/// A buffer that parallel tasks write disjoint parts of, each through [`Disjoint::part`].
struct Disjoint<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: a `Disjoint` is the exclusive borrow of its buffer, handed to tasks that each write
// parts no other task touches (the contract of `part`); f32 has no drop or interior state.
unsafe impl Send for Disjoint<'_> {}
unsafe impl Sync for Disjoint<'_> {}

impl<'a> Disjoint<'a> {
    fn new(buf: &'a mut [f32]) -> Self {
        Self { ptr: buf.as_mut_ptr(), len: buf.len(), _buf: std::marker::PhantomData }
    }

    /// Elements `start..start + len`.
    ///
    /// # Safety
    /// No two parts alive at the same time, on any thread, overlap.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.len, "part {start}..{} of {}", start + len, self.len);
        // SAFETY: in bounds (checked above), and no other live part overlaps it (the caller's
        // promise), so this is the only reference to these elements.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// Head `hi`'s Q, K and V (each n × d) of image `bi`, as views into the QKV product's rows.
fn head_qkv(qkv: &[f32], n: usize, hid: usize, d: usize, bi: usize, hi: usize) -> [Mat<'_>; 3] {
    let base = bi * n * 3 * hid;
    let q = Mat { data: qkv, offset: base + hi * d, rows: n, cols: d, rs: 3 * hid, cs: 1 };
    [q, Mat { offset: base + hid + hi * d, ..q }, Mat { offset: base + 2 * hid + hi * d, ..q }]
}

/// The row stride of a head's `n × n` scores and probabilities in scratch space: `n` rounded up
/// to whole cache lines, so every row starts on one (the scratch does). With 197 tokens a row
/// was 788 bytes, and most rows began inside a line: the AMX kernel's 64-byte tile rows were
/// stored across two lines and `exp_row`'s vectors loaded across two. Padded to 208, one
/// thread's Q·Kᵀ of a ViT-B head took 13 µs instead of 15–16, its softmax 16.5 instead of
/// 19.5–20.5, and the batch's attention 5–10% less (bench/RESULTS.md).
fn score_stride(n: usize) -> usize {
    n.next_multiple_of(16)
}

/// `s`'s first `n` rows of `n` scores, `ls` apart (see [`score_stride`]).
fn scores(s: &[f32], n: usize, ls: usize) -> Mat<'_> {
    Mat { data: s, offset: 0, rows: n, cols: n, rs: ls, cs: 1 }
}

/// Attention into `ctx` (rows × hidden, every element written); returns each (image, head)'s
/// row log-sum-exps, `n` per head, for the backward. One task per (image, head): `S = Q·Kᵀ`,
/// `exp(scale·S − max)` and its product by V in the thread's scratch space, then each
/// row divided by its sum (its `d` values rather than its `n` probabilities) as it is written
/// into the head's columns of the context, so no head's output is allocated or gathered.
fn attention(cfg: &VitConfig, qkv: &[f32], b: usize, prec: Precision, ctx: &mut [f32]) -> Vec<f32> {
    let (n, hid, heads, d) = (cfg.num_tokens(), cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim());
    let scale = 1.0 / (d as f32).sqrt();
    assert_eq!(ctx.len(), b * n * hid, "context size");
    let out = Disjoint::new(ctx);
    let mut lse = vec![0f32; b * heads * n];
    lse.par_chunks_mut(n).enumerate().for_each(|(t, lse)| {
        let (bi, hi) = (t / heads, t % heads);
        let [q, kk, v] = head_qkv(qkv, n, hid, d, bi, hi);
        let ls = score_stride(n);
        with_scratch(n * ls + n * d + n, |scratch| {
            let (s, rest) = scratch.split_at_mut(n * ls);
            let (o, inv) = rest.split_at_mut(n * d);
            // The scale is applied by `exp_row`, so that the product stores its sums as they are.
            gemm(q, kk.t(), MatMut::strided(s, n, n, ls, 0), 1.0, false, Threads::One, prec);
            for ((row, l), inv) in s.chunks_mut(ls).zip(lse.iter_mut()).zip(inv.iter_mut()) {
                let (max, sum) = k::exp_row(&mut row[..n], scale);
                (*l, *inv) = (max + sum.ln(), 1.0 / sum);
            }
            gemm(scores(s, n, ls), v, MatMut::rows(o, n, d), 1.0, false, Threads::One, prec);
            for (r, (o, &inv)) in o.chunks(d).zip(&*inv).enumerate() {
                // SAFETY: this task alone writes columns `hi·d..(hi+1)·d` of image `bi`'s rows.
                let dst = unsafe { out.part((bi * n + r) * hid + hi * d, d) };
                k::scale_into(dst, o, inv);
            }
        });
    });
    lse
}

/// Backward of one (image, head), recomputing the probabilities: dQ, dK and dV (each n × d, in
/// the thread's scratch space) written into the head's columns of `dqkv`'s Q, K and V parts.
#[allow(clippy::too_many_arguments)]
fn attention_head_backward(qkv: &[f32], lse: &[f32], dctx: &[f32], n: usize, hid: usize, d: usize, bi: usize, hi: usize, scale: f32, prec: Precision, dqkv: &Disjoint) {
    let [q, kk, v] = head_qkv(qkv, n, hid, d, bi, hi);
    let d_o = Mat { data: dctx, offset: bi * n * hid + hi * d, rows: n, cols: d, rs: hid, cs: 1 };
    let ls = score_stride(n);
    with_scratch(2 * n * ls + 3 * n * d, |scratch| {
        let (p, rest) = scratch.split_at_mut(n * ls);
        let (dp, rest) = rest.split_at_mut(n * ls);
        let (dq, rest) = rest.split_at_mut(n * d);
        let (dk, dv) = rest.split_at_mut(n * d);
        gemm(q, kk.t(), MatMut::strided(p, n, n, ls, 0), 1.0, false, Threads::One, prec);
        for (row, &l) in p.chunks_mut(ls).zip(lse) {
            k::softmax_from_lse(&mut row[..n], scale, l);
        }
        gemm(scores(p, n, ls).t(), d_o, MatMut::rows(dv, n, d), 1.0, false, Threads::One, prec);
        gemm(d_o, v.t(), MatMut::strided(dp, n, n, ls, 0), 1.0, false, Threads::One, prec);
        for (pr, dr) in p.chunks(ls).zip(dp.chunks_mut(ls)) {
            k::softmax_backward_row(&pr[..n], &mut dr[..n], scale);
        }
        gemm(scores(dp, n, ls), kk, MatMut::rows(dq, n, d), 1.0, false, Threads::One, prec);
        gemm(scores(dp, n, ls).t(), q, MatMut::rows(dk, n, d), 1.0, false, Threads::One, prec);
        for (j, part) in [&*dq, &*dk, &*dv].into_iter().enumerate() {
            for (r, src) in part.chunks(d).enumerate() {
                // SAFETY: this (image, head) alone writes columns `hi·d..(hi+1)·d` of part `j`
                // of image `bi`'s rows.
                unsafe { dqkv.part((bi * n + r) * 3 * hid + j * hid + hi * d, d) }.copy_from_slice(src);
            }
        }
    });
}

/// Attention's backward into `dqkv` (rows × 3·hidden, every element written), one task per
/// (image, head), each writing its own columns.
fn attention_backward(cfg: &VitConfig, qkv: &[f32], lse: &[f32], dctx: &[f32], b: usize, prec: Precision, dqkv: &mut [f32]) {
    let (n, hid, heads, d) = (cfg.num_tokens(), cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim());
    let scale = 1.0 / (d as f32).sqrt();
    assert_eq!(dqkv.len(), b * n * 3 * hid, "gradient size");
    let out = Disjoint::new(dqkv);
    lse.par_chunks(n).enumerate().for_each(|(t, lse)| attention_head_backward(qkv, lse, dctx, n, hid, d, t / heads, t % heads, scale, prec, &out));
}

/// Buffers of a layer's forward, kept from layer to layer: a buffer the layer saves for backward
/// is taken (and the next layer gets a fresh one), the others are reused, so inference
/// allocates (and zeroes, and faults in) none of its large buffers after the first layer. Every
/// buffer is fully written before it is read, so what a layer before left in it never shows.
#[derive(Default)]
struct Workspace {
    hs: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    x_mid: Vec<f32>,
    fc1: Vec<f32>,
}

/// Buffers of a layer's backward, reused by every layer of one backward pass, as [`Workspace`]'s
/// are by the forward: each is fully written before it is read (so no zeroing, and no fresh
/// pages, after the first layer).
#[derive(Default)]
struct BackWorkspace {
    inter: Vec<f32>,
    hs: Vec<f32>,
    dhs: Vec<f32>,
    dctx: Vec<f32>,
    dqkv: Vec<f32>,
}

/// `buf` holding `len` floats: as it is when it already does, else fresh zeros.
fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() != len {
        *buf = vec![0f32; len];
    }
    buf
}

/// One encoder layer forward on `ws`'s buffers; with `save`, also what its backward needs.
fn layer_forward(cfg: &VitConfig, w: &LayerW, x: Vec<f32>, b: usize, save: bool, ws: &mut Workspace) -> (Vec<f32>, Option<LayerSaved>) {
    let h = cfg.hidden_size;
    let rows = b * cfg.num_tokens();
    let eps = cfg.layer_norm_eps as f32;
    let inter = w.fc1.out;
    let Workspace { hs, qkv, ctx, x_mid, fc1 } = ws;
    let hs = sized(hs, rows * h);
    let (mean1, rstd1) = timed(Stage::LayerNorm, || k::layer_norm(&x, w.ln1.0, w.ln1.1, eps, hs));
    let qkv_buf = sized(qkv, rows * 3 * h);
    timed(Stage::Qkv, || linear_qkv(hs, rows, w, qkv_buf));
    let ctx_buf = sized(ctx, rows * h);
    let lse = timed(Stage::Attention, || attention(cfg, qkv_buf, b, w.prec, ctx_buf));
    let x_mid_buf = sized(x_mid, rows * h);
    timed(Stage::AttentionOut, || linear(ctx_buf, rows, &w.o, x_mid_buf, h, 0));
    timed(Stage::Residual, || k::par_add_assign(x_mid_buf, &x));
    let (mean2, rstd2) = timed(Stage::LayerNorm, || k::layer_norm(x_mid_buf, w.ln2.0, w.ln2.1, eps, hs));
    let fc1_buf = sized(fc1, rows * inter);
    timed(Stage::Fc1, || linear(hs, rows, &w.fc1, fc1_buf, inter, 0));
    // The output goes where the input was, unless the input is saved.
    let (mut out, x_in) = if save { (vec![0f32; rows * h], Some(x)) } else { (x, None) };
    // fc2 of the activation, applied as the product packs fc1's rows.
    let act = |x: &[f32], y: &mut [f32]| k::act_forward_chunk(cfg.hidden_act, x, y);
    timed(Stage::Fc2, || linear_mapped(fc1_buf, &act, rows, &w.fc2, &mut out));
    timed(Stage::Residual, || k::par_add_assign(&mut out, x_mid_buf));
    let take = std::mem::take::<Vec<f32>>;
    let saved = x_in.map(|x_in| LayerSaved { x_in, mean1, rstd1, qkv: take(qkv), lse, ctx: take(ctx), x_mid: take(x_mid), mean2, rstd2, fc1: take(fc1) });
    (out, saved)
}

/// Gradients by checkpoint key.
type NamedGrads = Vec<(String, Vec<f32>)>;

/// One encoder layer backward (layer `index`): parameter gradients, and the gradient of its input
/// when `need_dx` (not for the lowest trainable layer).
#[allow(clippy::too_many_arguments)]
fn layer_backward(
    cfg: &VitConfig,
    w: &LayerW,
    s: LayerSaved,
    dx: Vec<f32>,
    b: usize,
    index: usize,
    need_dx: bool,
    ws: &mut BackWorkspace,
) -> (NamedGrads, Option<Vec<f32>>) {
    let h = cfg.hidden_size;
    let rows = b * cfg.num_tokens();
    let inter = w.fc1.out;
    let mut grads = NamedGrads::new();
    let mut push = |part: String, g: Vec<f32>| grads.push((keys::layer(index, &part), g));

    // MLP branch: out = x_mid + fc2(act(fc1(ln2(x_mid)))).
    let BackWorkspace { inter: inter_buf, hs, dhs, dctx, dqkv } = ws;
    // One buffer of rows × inter: the activation (for fc2's weight gradient), then dfc1.
    let inter_buf = sized(inter_buf, rows * inter);
    timed(Stage::ActivationBackward, || k::activation(cfg.hidden_act, &s.fc1, inter_buf));
    let (dw2, db2) = timed(Stage::WeightGrads, || linear_grads(inter_buf, rows, &w.fc2, &dx));
    let dfc1 = inter_buf;
    timed(Stage::InputGrads, || linear_input_grad(&dx, rows, &w.fc2, h, 0, dfc1, false));
    timed(Stage::ActivationBackward, || k::activation_backward(cfg.hidden_act, &s.fc1, dfc1));
    drop(s.fc1);
    let hs = sized(hs, rows * h);
    timed(Stage::LayerNormBackward, || k::layer_norm_apply(&s.x_mid, w.ln2.0, w.ln2.1, &s.mean2, &s.rstd2, hs));
    let (dw1, db1) = timed(Stage::WeightGrads, || linear_grads(hs, rows, &w.fc1, dfc1));
    let dhs = sized(dhs, rows * h);
    timed(Stage::InputGrads, || linear_input_grad(dfc1, rows, &w.fc1, inter, 0, dhs, false));
    let mut dx_mid = dx;
    let (dg2, dbeta2) = timed(Stage::LayerNormBackward, || k::layer_norm_backward(dhs, &s.x_mid, w.ln2.0, &s.mean2, &s.rstd2, &mut dx_mid));
    drop(s.x_mid);

    // Attention branch: x_mid = x_in + o(attention(qkv(ln1(x_in)))).
    let (dwo, dbo) = timed(Stage::WeightGrads, || linear_grads(&s.ctx, rows, &w.o, &dx_mid));
    let dctx = sized(dctx, rows * h);
    timed(Stage::InputGrads, || linear_input_grad(&dx_mid, rows, &w.o, h, 0, dctx, false));
    drop(s.ctx);
    let dqkv = sized(dqkv, rows * 3 * h);
    timed(Stage::AttentionBackward, || attention_backward(cfg, &s.qkv, &s.lse, dctx, b, w.prec, dqkv));
    drop(s.qkv);
    timed(Stage::LayerNormBackward, || k::layer_norm_apply(&s.x_in, w.ln1.0, w.ln1.1, &s.mean1, &s.rstd1, hs));
    let mut qkv = timed(Stage::WeightGrads, || shared_input_grads(hs, rows, &[&w.q, &w.k, &w.v], dqkv)).into_iter();
    let mut next = || qkv.next().expect("three layers, three gradients");
    let ((dwq, dbq), (dwk, dbk), (dwv, dbv)) = (next(), next(), next());
    timed(Stage::InputGrads, || {
        linear_input_grad(dqkv, rows, &w.q, 3 * h, 0, dhs, false);
        linear_input_grad(dqkv, rows, &w.k, 3 * h, h, dhs, true);
        linear_input_grad(dqkv, rows, &w.v, 3 * h, 2 * h, dhs, true);
    });
    let mut dx_in = dx_mid;
    let (dg1, dbeta1) = timed(Stage::LayerNormBackward, || k::layer_norm_backward(dhs, &s.x_in, w.ln1.0, &s.mean1, &s.rstd1, &mut dx_in));

    for (module, (dw, db)) in [(keys::QUERY, (dwq, dbq)), (keys::KEY, (dwk, dbk)), (keys::VALUE, (dwv, dbv))] {
        push(keys::weight(module), dw);
        if let Some(db) = db {
            push(keys::bias(module), db);
        }
    }
    for (module, dw, db) in [(keys::ATTENTION_OUT, dwo, dbo), (keys::FC1, dw1, db1), (keys::FC2, dw2, db2)] {
        push(keys::weight(module), dw);
        push(keys::bias(module), db.unwrap_or_default());
    }
    push(keys::weight(keys::NORM_BEFORE), dg1);
    push(keys::bias(keys::NORM_BEFORE), dbeta1);
    push(keys::weight(keys::NORM_AFTER), dg2);
    push(keys::bias(keys::NORM_AFTER), dbeta2);
    (grads, need_dx.then_some(dx_in))
}

fn host_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The final layer norm of the CLS rows, with what its backward needs.
struct Pooled {
    /// (B × hidden): what the head sees.
    features: Vec<f32>,
    /// The CLS rows before the norm, and their statistics.
    cls: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

/// Final layer norm of the CLS rows: (B·tokens × hidden) → (B × hidden), with its statistics.
fn pool(cfg: &VitConfig, w: &Weights, x: &[f32], b: usize) -> Pooled {
    let h = cfg.hidden_size;
    let n = cfg.num_tokens();
    let mut cls = vec![0f32; b * h];
    for bi in 0..b {
        cls[bi * h..(bi + 1) * h].copy_from_slice(&x[bi * n * h..bi * n * h + h]);
    }
    let mut features = vec![0f32; b * h];
    let (mean, rstd) = k::layer_norm(&cls, w.ln.0, w.ln.1, cfg.layer_norm_eps as f32, &mut features);
    Pooled { features, cls, mean, rstd }
}

/// Runs layers `range` on hidden states (B, tokens, hidden) without keeping anything.
pub(super) fn encode(vit: &Vit, x: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
    on_pool(|| {
        let guards = Guards::new(&tensor_list(vit))?;
        let w = Weights::new(vit, &guards)?;
        let (b, n, h) = x.dims3()?;
        let mut hidden = host_vec(x)?;
        let mut ws = Workspace::default();
        for l in range {
            hidden = layer_forward(&vit.cfg, &w.layers[l], hidden, b, false, &mut ws).0;
        }
        Ok(Tensor::from_vec(hidden, (b, n, h), x.device())?)
    })
}

/// Embeddings of pixels (B, C, H, W) → (B, tokens, hidden).
pub(super) fn embed_tensor(vit: &Vit, pixels: &Tensor) -> Result<Tensor> {
    on_pool(|| {
        let guards = Guards::new(&tensor_list(vit))?;
        let w = Weights::new(vit, &guards)?;
        let b = pixels.dim(0)?;
        let (x, _) = embed(&vit.cfg, &w, &host_vec(pixels)?, b);
        Ok(Tensor::from_vec(x, (b, vit.cfg.num_tokens(), vit.cfg.hidden_size), pixels.device())?)
    })
}

/// Pooled features (B, hidden) of pixels, without keeping anything for backward.
pub(super) fn features(vit: &Vit, pixels: &Tensor) -> Result<Tensor> {
    let device = pixels.device();
    on_pool(|| {
        let guards = Guards::new(&tensor_list(vit))?;
        let w = Weights::new(vit, &guards)?;
        let b = pixels.dim(0)?;
        let pixels = host_vec(pixels)?;
        let (mut x, _) = timed(Stage::Embed, || embed(&vit.cfg, &w, &pixels, b));
        let mut ws = Workspace::default();
        for layer in &w.layers {
            x = layer_forward(&vit.cfg, layer, x, b, false, &mut ws).0;
        }
        let pooled = pool(&vit.cfg, &w, &x, b);
        Ok(Tensor::from_vec(pooled.features, (b, vit.cfg.hidden_size), device)?)
    })
}

/// Cross-entropy with label smoothing, the mean over the batch weighted by the class weights
/// when given (see [`Objective`]), and its gradient with respect to the logits.
fn cross_entropy(logits: &[f32], labels: usize, o: &Objective) -> (f64, Vec<f32>) {
    let eps = o.label_smoothing;
    let weight = |t: u32| o.class_weights.map_or(1.0, |w| f64::from(w[t as usize]));
    let total: f64 = o.targets.iter().map(|&t| weight(t)).sum();
    let mut grad = vec![0f32; logits.len()];
    let mut loss = 0.0f64;
    for (i, &t) in o.targets.iter().enumerate() {
        let row = &logits[i * labels..(i + 1) * labels];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
        let lse = f64::from(max) + sum.ln();
        let w = weight(t) / total;
        for (c, &v) in row.iter().enumerate() {
            let q = eps / labels as f64 + if c == t as usize { 1.0 - eps } else { 0.0 };
            let logp = f64::from(v) - lse;
            loss -= w * q * logp;
            grad[i * labels + c] = (w * (logp.exp() - q)) as f32;
        }
    }
    (loss, grad)
}

/// Loss of a batch and the gradients of the trainable parameters (by checkpoint key, shaped as
/// the parameters), computed by the hand-written backward. `input` is what enters the trainable
/// part at the boundary `start`.
pub(super) fn loss_and_grads(
    vit: &Vit,
    set: TrainableSet,
    start: Boundary,
    input: &Tensor,
    objective: Objective,
) -> Result<(f64, BTreeMap<String, Tensor>)> {
    on_pool(|| {
        let cfg = &vit.cfg;
        let guards = Guards::new(&tensor_list(vit))?;
        let w = Weights::new(vit, &guards)?;
        let b = objective.targets.len();
        let labels = w.head.out;

        // Forward, keeping what backward needs.
        let (x, saved, cols) = forward_saving(cfg, &w, start, input, b)?;
        let pooled = match start {
            Boundary::Features => Pooled { features: host_vec(input)?, cls: vec![], mean: vec![], rstd: vec![] },
            _ => pool(cfg, &w, &x, b),
        };
        drop(x);
        let mut logits = vec![0f32; b * labels];
        linear(&pooled.features, b, &w.head, &mut logits, labels, 0);
        let (loss, dlogits) = cross_entropy(&logits, labels, &objective);

        // Backward, top to bottom.
        let (mut grads, dcls) = head_backward(cfg, &w, &pooled, &dlogits, b, start != Boundary::Features);
        if let Some(dcls) = dcls {
            let first_layer = match start {
                Boundary::Layer(l) => l,
                _ => 0,
            };
            let dx = encoder_backward(cfg, &w, saved, dcls, b, first_layer, start == Boundary::Pixels, &mut grads);
            if let (Some(cols), Some(dx)) = (cols, dx) {
                grads.extend(timed(Stage::EmbedBackward, || embed_backward(cfg, &w, &cols, &dx, b)));
            }
        }
        Ok((loss, grads_as_tensors(cfg, labels, set, grads, input.device())?))
    })
}

/// The last layer's output, each layer's saved state, and the patch columns (from pixels).
type SavedForward = (Vec<f32>, Vec<LayerSaved>, Option<Vec<f32>>);

/// The forward of the trainable part up to the last layer's output, keeping each layer's saved
/// state (and the patch columns when it starts from pixels).
fn forward_saving(cfg: &VitConfig, w: &Weights, start: Boundary, input: &Tensor, b: usize) -> Result<SavedForward> {
    let layers = cfg.num_hidden_layers;
    let (first_layer, mut x, cols) = match start {
        Boundary::Pixels => {
            let pixels = host_vec(input)?;
            let (x, cols) = timed(Stage::Embed, || embed(cfg, w, &pixels, b));
            (0, x, Some(cols))
        }
        Boundary::Layer(l) => (l, host_vec(input)?, None),
        Boundary::Features => return Ok((Vec::new(), Vec::new(), None)),
    };
    let mut saved = Vec::with_capacity(layers - first_layer);
    let mut ws = Workspace::default();
    for layer in &w.layers[first_layer..] {
        let (next, s) = layer_forward(cfg, layer, x, b, true, &mut ws);
        saved.push(s.expect("saved"));
        x = next;
    }
    Ok((x, saved, cols))
}

/// Backward of the head (and of the final layer norm when `through_norm`): the gradients of
/// their parameters, and the gradient of the CLS rows entering the final layer norm.
fn head_backward(cfg: &VitConfig, w: &Weights, pooled: &Pooled, dlogits: &[f32], b: usize, through_norm: bool) -> (NamedGrads, Option<Vec<f32>>) {
    let labels = w.head.out;
    let (dw, db) = linear_grads(&pooled.features, b, &w.head, dlogits);
    let mut grads: NamedGrads = vec![(keys::HEAD_WEIGHT.into(), dw), (keys::HEAD_BIAS.into(), db.unwrap_or_default())];
    if !through_norm {
        return (grads, None);
    }
    let h = cfg.hidden_size;
    let mut dpooled = vec![0f32; b * h];
    linear_input_grad(dlogits, b, &w.head, labels, 0, &mut dpooled, false);
    let mut dcls = vec![0f32; b * h];
    let (dg, dbeta) = k::layer_norm_backward(&dpooled, &pooled.cls, w.ln.0, &pooled.mean, &pooled.rstd, &mut dcls);
    grads.push((keys::weight(keys::FINAL_NORM), dg));
    grads.push((keys::bias(keys::FINAL_NORM), dbeta));
    (grads, Some(dcls))
}

/// Backward of encoder layers `first_layer..`, top down, from the gradient of the CLS rows;
/// returns the gradient of the hidden states entering `first_layer` when `need_input_grad`.
#[allow(clippy::too_many_arguments)]
fn encoder_backward(
    cfg: &VitConfig,
    w: &Weights,
    mut saved: Vec<LayerSaved>,
    dcls: Vec<f32>,
    b: usize,
    first_layer: usize,
    need_input_grad: bool,
    grads: &mut NamedGrads,
) -> Option<Vec<f32>> {
    let (h, n) = (cfg.hidden_size, cfg.num_tokens());
    let mut dx = vec![0f32; b * n * h];
    for bi in 0..b {
        dx[bi * n * h..bi * n * h + h].copy_from_slice(&dcls[bi * h..(bi + 1) * h]);
    }
    let mut ws = BackWorkspace::default();
    for l in (first_layer..cfg.num_hidden_layers).rev() {
        let s = saved.pop().expect("one saved state per layer");
        let need_dx = l > first_layer || need_input_grad;
        let (g, next) = layer_backward(cfg, &w.layers[l], s, dx, b, l, need_dx, &mut ws);
        grads.extend(g);
        dx = next.unwrap_or_default();
    }
    need_input_grad.then_some(dx)
}

/// Backward of the embeddings, `x = [cls; patches·Wᵀ + b] + pos`, from the gradient of `x`.
fn embed_backward(cfg: &VitConfig, w: &Weights, cols: &[f32], dx: &[f32], b: usize) -> NamedGrads {
    let (h, n) = (cfg.hidden_size, cfg.num_tokens());
    let mut dpos = vec![0f32; n * h];
    let mut dcls_tok = vec![0f32; h];
    let p = n - 1;
    let mut dpatch = vec![0f32; b * p * h];
    for bi in 0..b {
        let xb = &dx[bi * n * h..(bi + 1) * n * h];
        k::add_assign(&mut dpos, xb);
        k::add_assign(&mut dcls_tok, &xb[..h]);
        dpatch[bi * p * h..(bi + 1) * p * h].copy_from_slice(&xb[h..]);
    }
    let (dwp, dbp) = linear_grads(cols, b * p, &w.patch, &dpatch);
    vec![
        (keys::CLS_TOKEN.into(), dcls_tok),
        (keys::POSITION_EMBEDDINGS.into(), dpos),
        (keys::PATCH_WEIGHT.into(), dwp),
        (keys::PATCH_BIAS.into(), dbp.unwrap_or_default()),
    ]
}

/// The gradients of the parameters in `set`, as tensors shaped as the parameters.
fn grads_as_tensors(cfg: &VitConfig, labels: usize, set: TrainableSet, grads: NamedGrads, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let shapes: BTreeMap<String, Vec<usize>> = param_specs(cfg, labels).into_iter().map(|s| (s.name, s.shape)).collect();
    let mut out = BTreeMap::new();
    for (name, g) in grads {
        if !set.contains(&name, cfg.num_hidden_layers) {
            continue;
        }
        let shape = shapes.get(&name).ok_or_else(|| ModelError::Weights(format!("no parameter named {name}")))?;
        out.insert(name, Tensor::from_vec(g, shape.as_slice(), device)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::Disjoint;

    #[test]
    fn disjoint_parts_are_written_from_several_threads_and_bounded() {
        let mut buf = vec![0f32; 10];
        let out = Disjoint::new(&mut buf);
        std::thread::scope(|s| {
            for t in 0..2 {
                let out = &out;
                // SAFETY: the two threads' parts (0..5 and 5..10) do not overlap.
                s.spawn(move || unsafe { out.part(5 * t, 5) }.iter_mut().enumerate().for_each(|(i, v)| *v = (5 * t + i) as f32));
            }
        });
        // SAFETY: no other part is alive.
        let beyond = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { out.part(8, 3) }.len()));
        assert!(beyond.is_err(), "a part past the end is refused");
        assert_eq!(buf, (0..10).map(|i| i as f32).collect::<Vec<_>>());
    }
}

#[cfg(test)]
mod attention_timing {
    use super::*;

    /// Attention's time on a batch of 8 (`CONFIG`: tiny, small or base; `PRECISION`: f32 or
    /// bf16), on rayon's pool, then one head's phases on one thread: `cargo test --release --lib
    /// attention_speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, run on request"]
    fn attention_speed() {
        let name = std::env::var("CONFIG").unwrap_or_else(|_| "base".into());
        let cfg = VitConfig::preset(&name).expect("CONFIG: tiny, small or base");
        let prec = if std::env::var("PRECISION").as_deref() == Ok("f32") { Precision::F32 } else { Precision::Bf16 };
        let (n, hid, d, b) = (cfg.num_tokens(), cfg.hidden_size, cfg.head_dim(), 8);
        let qkv: Vec<f32> = (0..b * n * 3 * hid).map(|i| ((i * 7919) % 1000) as f32 * 0.002 - 1.0).collect();
        let mut ctx = vec![0f32; b * n * hid];
        let mut times: Vec<f64> = (0..21)
            .map(|_| {
                let t = std::time::Instant::now();
                on_pool(|| attention(&cfg, &qkv, b, prec, &mut ctx));
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        eprintln!("{}; {name} {prec:?}", crate::model::isa::summary());
        eprintln!("attention of a batch of {b}, rayon's pool: best {:.2} ms, median {:.2} ms", times[0], times[10]);
        let [q, kk, v] = head_qkv(&qkv, n, hid, d, 0, 0);
        let ls = score_stride(n);
        let (mut s, mut o, mut out, mut inv) = (vec![0f32; n * ls], vec![0f32; n * d], vec![0f32; n * d], vec![0f32; n]);
        let scale = 1.0 / (d as f32).sqrt();
        let (mut phases, heads) = ([0f64; 4], 2000);
        let mut time = |phase: usize, f: &mut dyn FnMut()| {
            let t = std::time::Instant::now();
            f();
            phases[phase] += t.elapsed().as_secs_f64();
        };
        for _ in 0..heads {
            time(0, &mut || gemm(q, kk.t(), MatMut::strided(&mut s, n, n, ls, 0), 1.0, false, Threads::One, prec));
            time(1, &mut || {
                for (row, inv) in s.chunks_mut(ls).zip(inv.iter_mut()) {
                    *inv = 1.0 / k::exp_row(&mut row[..n], scale).1;
                }
            });
            time(2, &mut || gemm(scores(&s, n, ls), v, MatMut::rows(&mut o, n, d), 1.0, false, Threads::One, prec));
            time(3, &mut || {
                for ((dst, o), &inv) in out.chunks_mut(d).zip(o.chunks(d)).zip(&inv) {
                    k::scale_into(dst, o, inv);
                }
            });
        }
        let us = |x: f64| x * 1e6 / heads as f64;
        let [qk, exp, pv, sc] = phases.map(us);
        eprintln!("one head, one thread (µs): Q·Kᵀ {qk:.1}, softmax {exp:.1}, P·V {pv:.1}, division {sc:.1}; total {:.1}", qk + exp + pv + sc);
    }
}
