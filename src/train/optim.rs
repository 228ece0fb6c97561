//! Optimisers (AdamW, SGD with momentum) with state that checkpoints can save and restore, the
//! learning-rate schedules of `transformers.get_scheduler`, and global gradient-norm clipping.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

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
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, weight_decay: f64, momentum: f64) -> Self {
        Self { kind, weight_decay, momentum, steps: 0, m: BTreeMap::new(), v: BTreeMap::new() }
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
            if self.kind == OptimizerKind::Adamw && p.device().is_cpu() && !crate::model::network::reference_ops_forced() {
                let (new_p, m, v) = adamw_cpu(&p, g, self.m.get(name), self.v.get(name), lr, wd, t)?;
                self.m.insert(name.clone(), m);
                self.v.insert(name.clone(), v);
                var.set(&new_p)?;
                continue;
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
        let device = self.m.values().next().map(|t| t.device().clone()).unwrap_or(candle_core::Device::Cpu);
        out.insert("steps".into(), Tensor::new(&[self.steps as f64], &device)?);
        Ok(out)
    }

    /// Restores state saved by [`Optimizer::state`].
    pub fn load_state(&mut self, state: BTreeMap<String, Tensor>, device: &candle_core::Device) -> Result<(), TrainError> {
        self.m.clear();
        self.v.clear();
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

/// One AdamW update of a CPU parameter in a single pass over memory (parallel over chunks),
/// where the composed version makes a dozen temporary tensors the size of the parameter. The
/// arithmetic is the composed version's, in the same order, so the two agree to rounding.
fn adamw_cpu(p: &Tensor, g: &Tensor, m: Option<&Tensor>, v: Option<&Tensor>, lr: f64, wd: f64, t: i32) -> Result<(Tensor, Tensor, Tensor), TrainError> {
    use rayon::prelude::*;
    let flat = |x: &Tensor| -> Result<Vec<f32>, TrainError> { Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
    let mut pv = flat(p)?;
    let gv = flat(g)?;
    let n = pv.len();
    let mut mv = match m {
        Some(m) => flat(m)?,
        None => vec![0.0; n],
    };
    let mut vv = match v {
        Some(v) => flat(v)?,
        None => vec![0.0; n],
    };
    let (b1, b2) = (BETA1 as f32, BETA2 as f32);
    let (c1, c2) = ((1.0 - BETA1) as f32, (1.0 - BETA2) as f32);
    let (bc1, bc2) = ((1.0 - BETA1.powi(t)) as f32, (1.0 - BETA2.powi(t)) as f32);
    let (decay, lr32, eps) = ((1.0 - lr * wd) as f32, lr as f32, ADAM_EPS as f32);
    const CHUNK: usize = 1 << 14;
    pv.par_chunks_mut(CHUNK)
        .zip(mv.par_chunks_mut(CHUNK))
        .zip(vv.par_chunks_mut(CHUNK))
        .zip(gv.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for i in 0..p.len() {
                let gi = g[i];
                m[i] = m[i] * b1 + gi * c1;
                v[i] = v[i] * b2 + (gi * gi) * c2;
                let update = (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps);
                p[i] = p[i] * decay - update * lr32;
            }
        });
    let shape = p.shape().clone();
    let dev = p.device();
    Ok((Tensor::from_vec(pv, shape.clone(), dev)?, Tensor::from_vec(mv, shape.clone(), dev)?, Tensor::from_vec(vv, shape, dev)?))
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
    let mut sq = 0.0f64;
    for g in grads.values() {
        sq += f64::from(g.sqr()?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?);
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
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

    #[test]
    fn the_fused_cpu_adamw_matches_the_composed_one() {
        use candle_core::Device;
        let dev = Device::Cpu;
        let p = Tensor::randn(0f32, 1.0, (3, 40_000), &dev).unwrap();
        let mut m = None;
        let mut v = None;
        let mut pc = p.clone();
        let mut mc: Option<Tensor> = None;
        let mut vc: Option<Tensor> = None;
        let mut pf = p;
        for t in 1..=3 {
            let g = Tensor::randn(0f32, 1.0, (3, 40_000), &dev).unwrap();
            let (lr, wd) = (1e-3, 0.01);
            // The composed update, as Optimizer::step writes it.
            let m2 = match &mc { Some(m) => ((m * BETA1).unwrap() + (&g * (1.0 - BETA1)).unwrap()).unwrap(), None => (&g * (1.0 - BETA1)).unwrap() };
            let v2 = match &vc { Some(v) => ((v * BETA2).unwrap() + (g.sqr().unwrap() * (1.0 - BETA2)).unwrap()).unwrap(), None => (g.sqr().unwrap() * (1.0 - BETA2)).unwrap() };
            let upd = ((&m2 / (1.0 - BETA1.powi(t))).unwrap() / ((&v2 / (1.0 - BETA2.powi(t))).unwrap().sqrt().unwrap() + ADAM_EPS).unwrap()).unwrap();
            pc = ((&pc * (1.0 - lr * wd)).unwrap() - (upd * lr).unwrap()).unwrap();
            mc = Some(m2);
            vc = Some(v2);
            let (np, nm, nv) = adamw_cpu(&pf, &g, m.as_ref(), v.as_ref(), lr, wd, t).unwrap();
            (pf, m, v) = (np, Some(nm), Some(nv));
        }
        let diff = (pf - pc).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "max difference {diff}");
    }

    #[test]
    fn decay_skips_biases_and_layer_norms() {
        assert!(decays("vit.encoder.layer.0.attention.attention.query.weight"));
        assert!(!decays("vit.encoder.layer.0.attention.attention.query.bias"));
        assert!(!decays("vit.encoder.layer.3.layernorm_before.weight"));
        assert!(!decays("vit.layernorm.weight"));
    }
}
