//! Optimisers (AdamW, SGD with momentum) with state that checkpoints can save and restore, the
//! learning-rate schedules of `transformers.get_scheduler`, and global gradient-norm clipping.

use std::collections::BTreeMap;

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Storage, Tensor};

use super::TrainError;
use super::hyperparams::{OptimizerKind, Scheduler};
use crate::model::Params;
use crate::model::weights::keys;

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

/// Whether weight decay applies to a parameter: not to biases and layer norms (as
/// `Trainer.get_decay_parameter_names`).
pub fn decays(name: &str) -> bool {
    !name.ends_with(".bias") && !keys::is_layer_norm(name)
}

/// An optimiser and its per-parameter state.
pub struct Optimizer {
    kind: OptimizerKind,
    weight_decay: f64,
    momentum: f64,
    /// Optimiser steps taken so far (AdamW's bias correction needs it).
    steps: u64,
    /// First moment (AdamW) or momentum buffer (SGD), by parameter name.
    m: BTreeMap<String, Tensor>,
    /// Second moment (AdamW only).
    v: BTreeMap<String, Tensor>,
    /// AdamW's moments of the CPU parameters that the fused update steps in place (see
    /// [`adamw_in_place`]); a parameter's moments are here or in `m` and `v`, never in both.
    host: BTreeMap<String, Moments>,
}

/// AdamW's first and second moments of one parameter, in host memory, and the parameter's shape
/// (a checkpoint stores them in it, so any worker, on any device, can take them up).
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
    shape: Vec<usize>,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, weight_decay: f64, momentum: f64) -> Self {
        Self { kind, weight_decay, momentum, steps: 0, m: BTreeMap::new(), v: BTreeMap::new(), host: BTreeMap::new() }
    }

    /// One update of every parameter that has a gradient, each with learning rate `lr(name)`.
    /// On the CPU it runs on rayon's threads, as the fast path does (see `model::on_pool`): the
    /// fused AdamW opens a parallel region per parameter.
    pub fn step(&mut self, params: &Params, grads: &BTreeMap<String, Tensor>, lr: &(dyn Fn(&str) -> f64 + Sync)) -> Result<(), TrainError> {
        if grads.values().all(|g| g.device().is_cpu()) {
            return crate::model::on_pool(|| self.step_here(params, grads, lr));
        }
        self.step_here(params, grads, lr)
    }

    /// [`Optimizer::step`] on the calling thread.
    fn step_here(&mut self, params: &Params, grads: &BTreeMap<String, Tensor>, lr: &(dyn Fn(&str) -> f64 + Sync)) -> Result<(), TrainError> {
        self.steps += 1;
        let t = self.steps as i32;
        for (name, g) in grads {
            let var = params.var(name)?;
            let p = var.as_detached_tensor();
            let lr = lr(name);
            let wd = if decays(name) { self.weight_decay } else { 0.0 };
            if self.kind == OptimizerKind::Adamw && fusable(&p, g) {
                let moments = match self.host.entry(name.clone()) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        // Zeros before the first step; restored moments move here from `m`/`v`.
                        let n = p.elem_count();
                        let take = |map: &mut BTreeMap<String, Tensor>| -> Result<Vec<f32>, TrainError> {
                            match map.remove(name) {
                                Some(t) => Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                                None => Ok(vec![0.0; n]),
                            }
                        };
                        let (m, v) = (take(&mut self.m)?, take(&mut self.v)?);
                        if m.len() != n || v.len() != n {
                            return Err(TrainError::Checkpoint(format!("the optimiser state of {name} does not match the parameter's size")));
                        }
                        e.insert(Moments { m, v, shape: p.dims().to_vec() })
                    }
                };
                adamw_in_place(&p, g, moments, AdamwCoeffs::new(lr, wd, t))?;
                continue;
            }
            if let Some(Moments { m, v, shape }) = self.host.remove(name) {
                // Stepped in place before, composed now (a gradient that is not contiguous).
                self.m.insert(name.clone(), Tensor::from_vec(m, shape.as_slice(), p.device())?);
                self.v.insert(name.clone(), Tensor::from_vec(v, shape.as_slice(), p.device())?);
            }
            let new_p = match self.kind {
                OptimizerKind::Adamw => {
                    let m = match self.m.get(name) {
                        Some(m) => ((m * BETA1)? + (g * (1.0 - BETA1))?)?,
                        None => (g * (1.0 - BETA1))?,
                    };
                    let v = match self.v.get(name) {
                        Some(v) => ((v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?,
                        None => (g.sqr()? * (1.0 - BETA2))?,
                    };
                    let m_hat = (&m / (1.0 - BETA1.powi(t)))?;
                    let v_hat = (&v / (1.0 - BETA2.powi(t)))?;
                    let update = (m_hat / (v_hat.sqrt()? + ADAM_EPS)?)?;
                    self.m.insert(name.clone(), m);
                    self.v.insert(name.clone(), v);
                    ((&p * (1.0 - lr * wd))? - (update * lr)?)?
                }
                OptimizerKind::Sgd => {
                    let g = if wd > 0.0 { (g + (&p * wd)?)? } else { g.clone() };
                    let buf = match self.m.get(name) {
                        Some(b) if self.momentum > 0.0 => ((b * self.momentum)? + &g)?,
                        _ => g,
                    };
                    let next = (&p - (&buf * lr)?)?;
                    self.m.insert(name.clone(), buf);
                    next
                }
            };
            var.set(&new_p)?;
        }
        Ok(())
    }

    /// Optimiser steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The state as named tensors, for a checkpoint.
    pub fn state(&self) -> Result<BTreeMap<String, Tensor>, TrainError> {
        let mut out = BTreeMap::new();
        for (k, t) in &self.m {
            out.insert(format!("m.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            out.insert(format!("v.{k}"), t.clone());
        }
        for (k, Moments { m, v, shape }) in &self.host {
            out.insert(format!("m.{k}"), Tensor::from_slice(m, shape.as_slice(), &candle_core::Device::Cpu)?);
            out.insert(format!("v.{k}"), Tensor::from_slice(v, shape.as_slice(), &candle_core::Device::Cpu)?);
        }
        let device = self.m.values().next().map(|t| t.device().clone()).unwrap_or(candle_core::Device::Cpu);
        out.insert("steps".into(), Tensor::new(&[self.steps as f64], &device)?);
        Ok(out)
    }

    /// Restores state saved by [`Optimizer::state`].
    pub fn load_state(&mut self, state: BTreeMap<String, Tensor>, device: &candle_core::Device) -> Result<(), TrainError> {
        self.m.clear();
        self.v.clear();
        self.host.clear();
        for (k, t) in state {
            let t = t.to_device(device)?;
            if let Some(name) = k.strip_prefix("m.") {
                self.m.insert(name.to_string(), t.to_dtype(DType::F32)?);
            } else if let Some(name) = k.strip_prefix("v.") {
                self.v.insert(name.to_string(), t.to_dtype(DType::F32)?);
            } else if k == "steps" {
                self.steps = t.to_dtype(DType::F64)?.to_vec1::<f64>()?.first().copied().unwrap_or(0.0) as u64;
            }
        }
        Ok(())
    }
}

/// Whether the fused update can step `p` in place: AdamW's arithmetic on f32 host memory, both
/// tensors contiguous (parameters and the fast path's gradients are), and no `VITFORGE_REFERENCE_OPS`.
fn fusable(p: &Tensor, g: &Tensor) -> bool {
    on_host(p) && on_host(g) && p.elem_count() == g.elem_count() && !crate::model::network::reference_ops_forced()
}

/// Whether `t` is contiguous f32 host memory, which the in-place updates read and write as a slice.
fn on_host(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

/// The values of a contiguous f32 CPU tensor, from its storage and layout.
fn host_slice<'s>(storage: &'s Storage, layout: &Layout) -> Option<&'s [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) => Some(&data[a..b]),
        _ => None,
    }
}

/// The scalars of one AdamW step, as the composed update uses them.
#[derive(Clone, Copy)]
struct AdamwCoeffs {
    b1: f32,
    b2: f32,
    c1: f32,
    c2: f32,
    bc1: f32,
    bc2: f32,
    decay: f32,
    lr: f32,
    eps: f32,
}

impl AdamwCoeffs {
    fn new(lr: f64, wd: f64, t: i32) -> Self {
        Self {
            b1: BETA1 as f32,
            b2: BETA2 as f32,
            c1: (1.0 - BETA1) as f32,
            c2: (1.0 - BETA2) as f32,
            bc1: (1.0 - BETA1.powi(t)) as f32,
            bc2: (1.0 - BETA2.powi(t)) as f32,
            decay: (1.0 - lr * wd) as f32,
            lr: lr as f32,
            eps: ADAM_EPS as f32,
        }
    }

    /// One element: the composed update's arithmetic, in the same order, so the two agree to
    /// rounding.
    #[inline(always)]
    fn update(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        *m = *m * self.b1 + g * self.c1;
        *v = *v * self.b2 + (g * g) * self.c2;
        let step = (*m / self.bc1) / ((*v / self.bc2).sqrt() + self.eps);
        *p = *p * self.decay - step * self.lr;
    }
}

/// One AdamW update of a CPU parameter where it lies (the parameter's storage, as `Var::set`
/// writes), with its moments, in a single pass over memory on rayon's threads. The composed
/// version makes a dozen temporary tensors the size of the parameter; copying the operands in
/// and the result back made this step three times slower than the pass itself (ViT-S: 32 ms a
/// step, against 11 ms in place).
fn adamw_in_place(p: &Tensor, g: &Tensor, moments: &mut Moments, k: AdamwCoeffs) -> Result<(), TrainError> {
    struct Op<'a> {
        moments: RefCell<&'a mut Moments>,
        k: AdamwCoeffs,
    }
    impl InplaceOp2 for Op<'_> {
        fn name(&self) -> &'static str {
            "adamw-in-place"
        }

        fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
            use rayon::prelude::*;
            const CHUNK: usize = 1 << 14;
            let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else { candle_core::bail!("adamw-in-place needs f32 tensors") };
            let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
                candle_core::bail!("adamw-in-place needs contiguous tensors")
            };
            let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
            let mut moments = self.moments.borrow_mut();
            let Moments { m, v, .. } = &mut **moments;
            if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
                candle_core::bail!("adamw-in-place: a parameter, its gradient and its moments differ in size");
            }
            let k = self.k;
            p.par_chunks_mut(CHUNK).zip(m.par_chunks_mut(CHUNK)).zip(v.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK)).for_each(|(((p, m), v), g)| {
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    k.update(p, g, m, v);
                }
            });
            Ok(())
        }
    }
    p.inplace_op2(g, &Op { moments: RefCell::new(moments), k })?;
    Ok(())
}

/// Learning-rate multiplier at optimiser step `step` (0-based), as `transformers.get_scheduler`.
pub fn lr_multiplier(sched: Scheduler, step: u64, total: u64, warmup: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    match sched {
        Scheduler::Constant => 1.0,
        Scheduler::Linear => ((total.saturating_sub(step)) as f64 / (total.saturating_sub(warmup)).max(1) as f64).max(0.0),
        Scheduler::Cosine => {
            let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

/// Scales gradients so that their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: f64) -> Result<f64, TrainError> {
    let host = !crate::model::network::reference_ops_forced() && grads.values().all(on_host);
    let norm = if host {
        crate::model::on_pool(|| host_norm(grads))?
    } else {
        let mut sq = 0.0f64;
        for g in grads.values() {
            sq += f64::from(g.sqr()?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        }
        sq.sqrt()
    };
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        if host && disjoint(grads) {
            crate::model::on_pool(|| grads.values().try_for_each(|g| g.inplace_op1(&Scale(scale as f32))))?;
        } else {
            for g in grads.values_mut() {
                *g = (&*g * scale)?;
            }
        }
    }
    Ok(norm)
}

const HOST_CHUNK: usize = 1 << 14;

/// The global L2 norm of contiguous f32 CPU gradients, read where they lie, in parallel (each
/// chunk summed in f32, the chunks in f64).
fn host_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64, TrainError> {
    use rayon::prelude::*;
    let mut sq = 0.0f64;
    for g in grads.values() {
        let (storage, layout) = g.storage_and_layout();
        let Some(data) = host_slice(&storage, layout) else {
            return Err(TrainError::Model(crate::model::ModelError::Input("gradient norm: not a contiguous f32 CPU tensor".into())));
        };
        sq += data.par_chunks(HOST_CHUNK).map(sum_of_squares).sum::<f64>();
    }
    Ok(sq.sqrt())
}

/// Σx² of a chunk, in 16 independent f32 lanes (one running sum is a chain of dependent adds
/// that does not vectorise).
fn sum_of_squares(c: &[f32]) -> f64 {
    let mut lanes = [0f32; 16];
    let mut blocks = c.chunks_exact(16);
    for b in &mut blocks {
        for (l, x) in lanes.iter_mut().zip(b) {
            *l += x * x;
        }
    }
    let tail: f32 = blocks.remainder().iter().map(|x| x * x).sum();
    lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + f64::from(tail)
}

/// Whether no two gradients share memory, so scaling each in place scales every value once.
/// Autograd may hand out one tensor as the gradient of two parameters; the fast path never does.
fn disjoint(grads: &BTreeMap<String, Tensor>) -> bool {
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(grads.len());
    for g in grads.values() {
        let (storage, layout) = g.storage_and_layout();
        let Some(data) = host_slice(&storage, layout) else {
            return false;
        };
        let start = data.as_ptr() as usize;
        spans.push((start, start + 4 * data.len()));
    }
    spans.sort_unstable();
    spans.windows(2).all(|w| w[0].1 <= w[1].0)
}

/// Multiplies a contiguous f32 CPU tensor by a constant where it lies.
struct Scale(f32);

impl candle_core::InplaceOp1 for Scale {
    fn name(&self) -> &'static str {
        "scale-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let (CpuStorage::F32(data), Some((a, b))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("scale-in-place needs a contiguous f32 tensor")
        };
        let s = self.0;
        data[a..b].par_chunks_mut(HOST_CHUNK).for_each(|c| c.iter_mut().for_each(|x| *x *= s));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_transformers() {
        // Linear with 2 warm-up steps out of 10.
        let m: Vec<f64> = (0..10).map(|s| lr_multiplier(Scheduler::Linear, s, 10, 2)).collect();
        assert_eq!(m[0], 0.0);
        assert_eq!(m[1], 0.5);
        assert_eq!(m[2], 1.0);
        assert!((m[6] - 0.5).abs() < 1e-12);
        assert_eq!(lr_multiplier(Scheduler::Linear, 0, 10, 0), 1.0);
        assert!((lr_multiplier(Scheduler::Cosine, 5, 10, 0) - 0.5).abs() < 1e-12);
        assert_eq!(lr_multiplier(Scheduler::Constant, 9, 10, 2), 1.0);
    }

    use crate::model::weights::{Init, ParamSpec};
    use candle_core::Device;

    fn params(seed: u64) -> Params {
        let specs: Vec<ParamSpec> = [("a.weight", vec![3, 40_000]), ("a.bias", vec![70_001])]
            .into_iter()
            .map(|(name, shape)| ParamSpec { name: name.into(), shape, init: Init::Zeros })
            .collect();
        let tensors = specs.iter().enumerate().map(|(i, s)| (s.name.clone(), rand(&s.shape, seed + i as u64))).collect();
        Params::from_tensors(&specs, tensors, &Device::Cpu).unwrap()
    }

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| rng.random_range(-1f32..1.0)).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
    }

    fn grads(p: &Params, seed: u64) -> BTreeMap<String, Tensor> {
        p.iter().enumerate().map(|(i, (k, v))| (k.clone(), rand(v.dims(), seed * 10 + i as u64))).collect()
    }

    /// The same values with the matrices laid out transposed twice: not contiguous, so their
    /// parameters take the composed update.
    fn strided(g: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
        g.iter()
            .map(|(k, t)| {
                let t = if t.rank() == 2 { t.t().unwrap().contiguous().unwrap().t().unwrap() } else { t.clone() };
                (k.clone(), t)
            })
            .collect()
    }

    fn max_diff(a: &Params, b: &Params) -> f32 {
        a.iter()
            .map(|(k, v)| (v.as_tensor() - b.var(k).unwrap().as_tensor()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap())
            .fold(0.0, f32::max)
    }

    /// Three AdamW steps of the fused update (in place, on the pool) and of the composed one
    /// (`VITFORGE_REFERENCE_OPS`' path, here taken for a gradient that is not contiguous) agree
    /// to rounding.
    #[test]
    fn the_fused_cpu_adamw_matches_the_composed_one() {
        let (fused, composed, mixed) = (params(1), params(1), params(1));
        let adamw = || Optimizer::new(OptimizerKind::Adamw, 0.01, 0.0);
        let (mut of, mut oc, mut om) = (adamw(), adamw(), adamw());
        for step in 1..=4 {
            let g = grads(&fused, step);
            let strided = strided(&g);
            assert!(fusable(&fused.var("a.weight").unwrap().as_detached_tensor(), &g["a.weight"]));
            assert!(!fusable(&fused.var("a.weight").unwrap().as_detached_tensor(), &strided["a.weight"]));
            of.step(&fused, &g, &|_| 1e-3).unwrap();
            oc.step(&composed, &strided, &|_| 1e-3).unwrap();
            // The weight's moments move between the two updates and are kept.
            om.step(&mixed, if step % 2 == 1 { &g } else { &strided }, &|_| 1e-3).unwrap();
        }
        assert_eq!(of.host.len(), 2, "both parameters stepped in place");
        assert_eq!((oc.host.len(), oc.m.len()), (1, 1), "the bias (one dimension, contiguous either way) fused, the weight composed");
        assert_eq!((om.host.len(), om.m.len()), (1, 1), "each parameter's moments in one place");
        let diff = max_diff(&fused, &composed).max(max_diff(&fused, &mixed));
        assert!(diff < 1e-6, "max difference {diff}");
        // The parameters did move (an update that wrote nothing would also agree).
        assert!(max_diff(&fused, &params(1)) > 1e-4);
    }

    /// Saving the in-place moments and restoring them into a new optimiser continues exactly as
    /// the optimiser that kept them.
    #[test]
    fn in_place_moments_survive_a_checkpoint() {
        let (kept, resumed) = (params(7), params(7));
        let mut ok = Optimizer::new(OptimizerKind::Adamw, 0.0, 0.0);
        let mut first = Optimizer::new(OptimizerKind::Adamw, 0.0, 0.0);
        ok.step(&kept, &grads(&kept, 1), &|_| 1e-2).unwrap();
        first.step(&resumed, &grads(&resumed, 1), &|_| 1e-2).unwrap();
        let state = first.state().unwrap();
        assert_eq!(state.len(), 2 * 2 + 1, "m and v of both parameters, and the step count");
        assert_eq!(state["v.a.weight"].dims(), &[3, 40_000], "in the parameter's shape, as the composed update needs them");
        // A worker whose update is the composed one (another device, or reference ops) takes
        // the same state up.
        let composed = params(7);
        let mut third = Optimizer::new(OptimizerKind::Adamw, 0.0, 0.0);
        third.step(&composed, &grads(&composed, 1), &|_| 1e-2).unwrap();
        third.load_state(state.clone(), &Device::Cpu).unwrap();
        let mut second = Optimizer::new(OptimizerKind::Adamw, 0.0, 0.0);
        second.load_state(state, &Device::Cpu).unwrap();
        for step in 2..=3 {
            ok.step(&kept, &grads(&kept, step), &|_| 1e-2).unwrap();
            second.step(&resumed, &grads(&resumed, step), &|_| 1e-2).unwrap();
            third.step(&composed, &strided(&grads(&composed, step)), &|_| 1e-2).unwrap();
        }
        assert_eq!(max_diff(&kept, &resumed), 0.0);
        assert!(third.m.contains_key("a.weight"), "the weight took the composed update");
        assert!(max_diff(&kept, &composed) < 1e-6);
        // Moments of the wrong size are refused, not read past.
        let mut state = second.state().unwrap();
        state.insert("m.a.bias".into(), Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap());
        let mut bad = Optimizer::new(OptimizerKind::Adamw, 0.0, 0.0);
        bad.load_state(state, &Device::Cpu).unwrap();
        assert!(matches!(bad.step(&resumed, &grads(&resumed, 4), &|_| 1e-2), Err(TrainError::Checkpoint(_))));
    }

    /// Clipping reads and scales the gradients in place and agrees with the composed version;
    /// gradients that share memory are scaled once each, by the composed version.
    #[test]
    fn clipping_in_place_matches_the_composed_version() {
        let p = params(3);
        let g = grads(&p, 5);
        let composed_norm = g.values().map(|t| f64::from(t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())).sum::<f64>().sqrt();
        let mut clipped = g.iter().map(|(k, t)| (k.clone(), t.copy().unwrap())).collect();
        let norm = clip_grad_norm(&mut clipped, 1.0).unwrap();
        assert!((norm - composed_norm).abs() < 1e-6 * composed_norm, "{norm} against {composed_norm}");
        let after = clip_grad_norm(&mut clipped.clone(), 0.0).unwrap();
        assert!((after - 1.0).abs() < 1e-5, "clipped to norm {after}");
        for (k, t) in &clipped {
            let expected = (&g[k] * (1.0 / (composed_norm + 1e-6))).unwrap();
            let d = (t - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-7, "{k}: {d}");
        }
        // One tensor as two gradients: in place would scale it twice.
        let shared = g["a.bias"].copy().unwrap();
        let mut two: BTreeMap<String, Tensor> = [("x".to_string(), shared.clone()), ("y".to_string(), shared.clone())].into();
        assert!(!disjoint(&two));
        assert!(disjoint(&clipped));
        let before = shared.to_vec1::<f32>().unwrap();
        clip_grad_norm(&mut two, 1e-3).unwrap();
        assert_eq!(shared.to_vec1::<f32>().unwrap(), before, "the shared tensor was not scaled in place");
        let after = clip_grad_norm(&mut two, 0.0).unwrap();
        assert!((after - 1e-3).abs() < 1e-8, "norm after clipping {after}");
    }

    #[test]
    fn decay_skips_biases_and_layer_norms() {
        assert!(decays("vit.encoder.layer.0.attention.attention.query.weight"));
        assert!(!decays("vit.encoder.layer.0.attention.attention.query.bias"));
        assert!(!decays("vit.encoder.layer.3.layernorm_before.weight"));
        assert!(!decays("vit.layernorm.weight"));
    }
}
