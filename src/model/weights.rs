//! The weights of a `ViTForImageClassification`: every tensor under the key `save_pretrained`
//! writes ([`keys`]), with `transformers`' initialisation for new ones.

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

/// The checkpoint key of every tensor, as `save_pretrained` writes a `ViTForImageClassification`:
/// the one place those strings are spelled (as candle's `vb.pp(…)` keeps key structure in one
/// place). Every per-layer key is [`keys::layer`]`(i, part)` with a `part` below.
pub mod keys {
    /// Prefix of backbone tensors.
    pub const BACKBONE_PREFIX: &str = "vit.";
    pub const CLS_TOKEN: &str = "vit.embeddings.cls_token";
    pub const POSITION_EMBEDDINGS: &str = "vit.embeddings.position_embeddings";
    pub const PATCH_WEIGHT: &str = "vit.embeddings.patch_embeddings.projection.weight";
    pub const PATCH_BIAS: &str = "vit.embeddings.patch_embeddings.projection.bias";
    /// The final layer norm (before the head).
    pub const FINAL_NORM: &str = "vit.layernorm";
    pub const HEAD_WEIGHT: &str = "classifier.weight";
    pub const HEAD_BIAS: &str = "classifier.bias";
    /// The head's linear layer (its `.weight` and `.bias` are [`HEAD_WEIGHT`] and [`HEAD_BIAS`]).
    pub const HEAD: &str = "classifier";
    /// Prefix of the encoder layers' tensors.
    const LAYER_PREFIX: &str = "vit.encoder.layer.";

    /// Linear layers and layer norms of one encoder layer, relative to [`layer`]'s prefix.
    pub const QUERY: &str = "attention.attention.query";
    pub const KEY: &str = "attention.attention.key";
    pub const VALUE: &str = "attention.attention.value";
    pub const ATTENTION_OUT: &str = "attention.output.dense";
    pub const FC1: &str = "intermediate.dense";
    pub const FC2: &str = "output.dense";
    pub const NORM_BEFORE: &str = "layernorm_before";
    pub const NORM_AFTER: &str = "layernorm_after";

    /// The key of `part` (e.g. `"attention.output.dense.weight"`) of encoder layer `i`.
    pub fn layer(i: usize, part: &str) -> String {
        format!("{LAYER_PREFIX}{i}.{part}")
    }

    /// `<module>.weight`.
    pub fn weight(module: &str) -> String {
        format!("{module}.weight")
    }

    /// `<module>.bias`.
    pub fn bias(module: &str) -> String {
        format!("{module}.bias")
    }

    /// Index of the encoder layer a key belongs to, if any.
    pub fn layer_of(name: &str) -> Option<usize> {
        name.strip_prefix(LAYER_PREFIX)?.split('.').next()?.parse().ok()
    }

    /// True for the classification head's tensors.
    pub fn is_head(name: &str) -> bool {
        name == HEAD_WEIGHT || name == HEAD_BIAS
    }

    /// True for the tensors of `module` (`<module>.weight`, `<module>.bias`).
    pub fn in_module(name: &str, module: &str) -> bool {
        name.strip_prefix(module).is_some_and(|rest| rest.starts_with('.'))
    }

    /// True for the final layer norm's tensors.
    pub fn is_final_norm(name: &str) -> bool {
        in_module(name, FINAL_NORM)
    }

    /// True for the tensors of any layer norm (the final one and those of every encoder layer).
    pub fn is_layer_norm(name: &str) -> bool {
        is_final_norm(name)
            || (layer_of(name).is_some()
                && [NORM_BEFORE, NORM_AFTER].iter().any(|norm| name.split('.').any(|part| part == *norm)))
    }
}

/// Every parameter of a ViT classifier with `num_labels` outputs, in checkpoint order.
pub fn param_specs(cfg: &VitConfig, num_labels: usize) -> Vec<ParamSpec> {
    use keys::{bias, layer, weight};
    let h = cfg.hidden_size;
    let std = cfg.initializer_range;
    let (ph, pw) = cfg.patch_size;
    let mut specs = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, init: Init| specs.push(ParamSpec { name, shape, init });
    push(keys::CLS_TOKEN.into(), vec![1, 1, h], Init::Normal(std));
    push(keys::POSITION_EMBEDDINGS.into(), vec![1, cfg.num_tokens(), h], Init::Normal(std));
    push(keys::PATCH_WEIGHT.into(), vec![h, cfg.num_channels, ph, pw], Init::Normal(std));
    push(keys::PATCH_BIAS.into(), vec![h], Init::Zeros);
    for i in 0..cfg.num_hidden_layers {
        for qkv in [keys::QUERY, keys::KEY, keys::VALUE] {
            push(layer(i, &weight(qkv)), vec![h, h], Init::Normal(std));
            if cfg.qkv_bias {
                push(layer(i, &bias(qkv)), vec![h], Init::Zeros);
            }
        }
        let inter = cfg.intermediate_size;
        for (module, out, inp) in [(keys::ATTENTION_OUT, h, h), (keys::FC1, inter, h), (keys::FC2, h, inter)] {
            push(layer(i, &weight(module)), vec![out, inp], Init::Normal(std));
            push(layer(i, &bias(module)), vec![out], Init::Zeros);
        }
        for ln in [keys::NORM_BEFORE, keys::NORM_AFTER] {
            push(layer(i, &weight(ln)), vec![h], Init::Ones);
            push(layer(i, &bias(ln)), vec![h], Init::Zeros);
        }
    }
    push(weight(keys::FINAL_NORM), vec![h], Init::Ones);
    push(bias(keys::FINAL_NORM), vec![h], Init::Zeros);
    push(keys::HEAD_WEIGHT.into(), vec![num_labels, h], Init::Normal(std));
    push(keys::HEAD_BIAS.into(), vec![num_labels], Init::Zeros);
    specs
}

/// Which parameters train in each mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainableSet {
    /// Everything.
    All,
    /// The classifier only.
    HeadOnly,
    /// The classifier, the final layer norm and the last `n` encoder layers.
    LastLayers(usize),
}

impl TrainableSet {
    /// Whether the parameter `name` trains, in a model with `num_layers` encoder layers.
    pub fn contains(self, name: &str, num_layers: usize) -> bool {
        match self {
            TrainableSet::All => true,
            TrainableSet::HeadOnly => keys::is_head(name),
            TrainableSet::LastLayers(n) => {
                keys::is_head(name) || keys::is_final_norm(name) || keys::layer_of(name).is_some_and(|l| l + n >= num_layers)
            }
        }
    }

    /// Where the frozen part ends: layers before the first trainable one can be run once,
    /// without a backward graph.
    pub fn boundary(self, num_layers: usize) -> Boundary {
        match self {
            TrainableSet::All => Boundary::Pixels,
            TrainableSet::HeadOnly => Boundary::Features,
            TrainableSet::LastLayers(n) => Boundary::Layer(num_layers.saturating_sub(n)),
        }
    }
}

/// Where the frozen part of the network ends (the trainable part starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    /// Everything trains: start from pixels (B, C, H, W).
    Pixels,
    /// Layers before this one are frozen: start from their output hidden states (B, tokens, hidden).
    Layer(usize),
    /// Only the head trains: start from pooled features (B, hidden).
    Features,
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
        for spec in param_specs(cfg, num_labels).into_iter().filter(|s| keys::is_head(&s.name)) {
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
