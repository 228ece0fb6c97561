//! The named parameters of a `ViTForImageClassification`, under the names `save_pretrained`
//! writes, with `transformers`' initialisation for new ones.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::{ModelError, VitConfig};

/// How a fresh parameter is initialised (`ViTPreTrainedModel._init_weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Truncated normal (cut at ±2, as `trunc_normal_`'s absolute bounds) with this std.
    Normal(f64),
    Zeros,
    Ones,
}

/// One parameter's name, shape and initialisation.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// Prefix of backbone tensors in a `ViTForImageClassification` checkpoint.
pub const BACKBONE_PREFIX: &str = "vit.";
/// Names of the classification head's tensors.
pub const HEAD_WEIGHT: &str = "classifier.weight";
/// See [`HEAD_WEIGHT`].
pub const HEAD_BIAS: &str = "classifier.bias";

/// Every parameter of a ViT classifier with `num_labels` outputs, in checkpoint order.
pub fn param_specs(cfg: &VitConfig, num_labels: usize) -> Vec<ParamSpec> {
    let h = cfg.hidden_size;
    let std = cfg.initializer_range;
    let (ph, pw) = cfg.patch_size;
    let mut specs = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, init: Init| specs.push(ParamSpec { name, shape, init });
    push("vit.embeddings.cls_token".into(), vec![1, 1, h], Init::Normal(std));
    push("vit.embeddings.position_embeddings".into(), vec![1, cfg.num_tokens(), h], Init::Normal(std));
    push("vit.embeddings.patch_embeddings.projection.weight".into(), vec![h, cfg.num_channels, ph, pw], Init::Normal(std));
    push("vit.embeddings.patch_embeddings.projection.bias".into(), vec![h], Init::Zeros);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("vit.encoder.layer.{i}.");
        for qkv in ["query", "key", "value"] {
            push(format!("{p}attention.attention.{qkv}.weight"), vec![h, h], Init::Normal(std));
            if cfg.qkv_bias {
                push(format!("{p}attention.attention.{qkv}.bias"), vec![h], Init::Zeros);
            }
        }
        push(format!("{p}attention.output.dense.weight"), vec![h, h], Init::Normal(std));
        push(format!("{p}attention.output.dense.bias"), vec![h], Init::Zeros);
        push(format!("{p}intermediate.dense.weight"), vec![cfg.intermediate_size, h], Init::Normal(std));
        push(format!("{p}intermediate.dense.bias"), vec![cfg.intermediate_size], Init::Zeros);
        push(format!("{p}output.dense.weight"), vec![h, cfg.intermediate_size], Init::Normal(std));
        push(format!("{p}output.dense.bias"), vec![h], Init::Zeros);
        for ln in ["layernorm_before", "layernorm_after"] {
            push(format!("{p}{ln}.weight"), vec![h], Init::Ones);
            push(format!("{p}{ln}.bias"), vec![h], Init::Zeros);
        }
    }
    push("vit.layernorm.weight".into(), vec![h], Init::Ones);
    push("vit.layernorm.bias".into(), vec![h], Init::Zeros);
    push(HEAD_WEIGHT.into(), vec![num_labels, h], Init::Normal(std));
    push(HEAD_BIAS.into(), vec![num_labels], Init::Zeros);
    specs
}

/// Index of the encoder layer a parameter belongs to, if any.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("vit.encoder.layer.")?.split('.').next()?.parse().ok()
}

/// True for the classification head's tensors.
pub fn is_head(name: &str) -> bool {
    name == HEAD_WEIGHT || name == HEAD_BIAS
}

/// The parameters of one model: trainable variables by checkpoint name.
pub struct Params {
    vars: BTreeMap<String, Var>,
}

impl Params {
    /// Freshly initialised parameters, reproducible for a given seed.
    pub fn init(cfg: &VitConfig, num_labels: usize, seed: u64, device: &Device) -> Result<Self, ModelError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut vars = BTreeMap::new();
        for spec in param_specs(cfg, num_labels) {
            let t = init_tensor(&spec, &mut rng, device)?;
            vars.insert(spec.name, Var::from_tensor(&t)?);
        }
        Ok(Self { vars })
    }

    /// Builds parameters from named tensors (converted to f32 on `device`); every name of
    /// `param_specs` must be present with its shape.
    pub fn from_tensors(specs: &[ParamSpec], mut tensors: BTreeMap<String, Tensor>, device: &Device) -> Result<Self, ModelError> {
        let mut vars = BTreeMap::new();
        for spec in specs {
            let t = tensors
                .remove(&spec.name)
                .ok_or_else(|| ModelError::Weights(format!("missing tensor {}", spec.name)))?;
            if t.dims() != spec.shape.as_slice() {
                return Err(ModelError::Weights(format!(
                    "tensor {} has shape {:?}, the configuration needs {:?}",
                    spec.name,
                    t.dims(),
                    spec.shape
                )));
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?.contiguous()?;
            vars.insert(spec.name.clone(), Var::from_tensor(&t)?);
        }
        Ok(Self { vars })
    }

    /// The variable called `name`.
    pub fn var(&self, name: &str) -> Result<&Var, ModelError> {
        self.vars.get(name).ok_or_else(|| ModelError::Weights(format!("no parameter named {name}")))
    }

    /// The parameter as a tensor: tracked by autograd when `trainable`, detached otherwise (so no
    /// backward graph is built through frozen weights).
    pub fn tensor(&self, name: &str, trainable: bool) -> Result<Tensor, ModelError> {
        let var = self.var(name)?;
        Ok(if trainable { var.as_tensor().clone() } else { var.as_detached_tensor() })
    }

    /// All parameters by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    /// Number of scalar parameters.
    pub fn num_scalars(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Replaces the head with a fresh one of `num_labels` outputs.
    pub fn reset_head(&mut self, cfg: &VitConfig, num_labels: usize, seed: u64, device: &Device) -> Result<(), ModelError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6865_6164);
        for spec in param_specs(cfg, num_labels).into_iter().filter(|s| is_head(&s.name)) {
            let t = init_tensor(&spec, &mut rng, device)?;
            self.vars.insert(spec.name, Var::from_tensor(&t)?);
        }
        Ok(())
    }

    /// Detached copies of every tensor (what a checkpoint stores).
    pub fn snapshot(&self) -> Result<BTreeMap<String, Tensor>, ModelError> {
        self.vars.iter().map(|(k, v)| Ok((k.clone(), v.as_detached_tensor().copy()?))).collect()
    }

    /// Overwrites the named variables (each must exist and keep its shape).
    pub fn set_some(&self, tensors: &BTreeMap<String, Tensor>) -> Result<(), ModelError> {
        for (name, t) in tensors {
            let var = self.vars.get(name).ok_or_else(|| ModelError::Weights(format!("unknown tensor {name}")))?;
            if t.dims() != var.dims() {
                return Err(ModelError::Weights(format!("tensor {name} has shape {:?}, expected {:?}", t.dims(), var.dims())));
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Overwrites every variable from named tensors of the same shapes.
    pub fn load_from(&self, tensors: &BTreeMap<String, Tensor>) -> Result<(), ModelError> {
        for (name, var) in &self.vars {
            let t = tensors.get(name).ok_or_else(|| ModelError::Weights(format!("missing tensor {name}")))?;
            if t.dims() != var.dims() {
                return Err(ModelError::Weights(format!("tensor {name} has shape {:?}, expected {:?}", t.dims(), var.dims())));
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }
}

fn init_tensor(spec: &ParamSpec, rng: &mut ChaCha8Rng, device: &Device) -> Result<Tensor, ModelError> {
    let n: usize = spec.shape.iter().product();
    let data: Vec<f32> = match spec.init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Normal(std) => {
            let normal = Normal::new(0.0, std).map_err(|e| ModelError::Config(format!("initializer_range: {e}")))?;
            (0..n).map(|_| normal.sample(rng).clamp(-2.0, 2.0) as f32).collect()
        }
    };
    Ok(Tensor::from_vec(data, spec.shape.as_slice(), device)?)
}
