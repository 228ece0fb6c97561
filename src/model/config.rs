//! `config.json` of a Hugging Face ViT, read field by field with `transformers`' defaults, and
//! written back with every field we did not interpret preserved.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ModelError;

/// An image or patch size: `transformers` accepts an integer or a `[height, width]` pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size2 {
    Square(usize),
    Pair([usize; 2]),
}

impl Size2 {
    /// (height, width).
    pub fn hw(self) -> (usize, usize) {
        match self {
            Size2::Square(s) => (s, s),
            Size2::Pair([h, w]) => (h, w),
        }
    }
}

/// The activation of the MLP, by its `transformers` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// Exact GELU (erf).
    #[serde(rename = "gelu")]
    Gelu,
    /// tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    #[serde(rename = "gelu_pytorch_tanh", alias = "gelu_new", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
    #[serde(rename = "silu", alias = "swish")]
    Silu,
    /// x · sigmoid(1.702 x).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
}

/// The fields of a ViT `config.json` that shape the model.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    pub image_size: (usize, usize),
    pub patch_size: (usize, usize),
    pub num_channels: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub initializer_range: f64,
    /// Class names by index, from `id2label` (empty for a bare backbone).
    pub labels: Vec<String>,
    /// The whole JSON object as read, so that export keeps fields we do not interpret.
    pub raw: Map<String, Value>,
}

/// The serde view of config.json; absent fields take `transformers.ViTConfig`'s defaults.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(default = "d_image")]
    image_size: Size2,
    #[serde(default = "d_patch")]
    patch_size: Size2,
    #[serde(default = "d_3")]
    num_channels: usize,
    #[serde(default = "d_768")]
    hidden_size: usize,
    #[serde(default = "d_12")]
    num_hidden_layers: usize,
    #[serde(default = "d_12")]
    num_attention_heads: usize,
    #[serde(default = "d_3072")]
    intermediate_size: usize,
    #[serde(default = "d_act")]
    hidden_act: Activation,
    #[serde(default = "d_eps")]
    layer_norm_eps: f64,
    #[serde(default = "d_true")]
    qkv_bias: bool,
    #[serde(default)]
    hidden_dropout_prob: f64,
    #[serde(default)]
    attention_probs_dropout_prob: f64,
    #[serde(default = "d_init")]
    initializer_range: f64,
    #[serde(default)]
    id2label: Option<BTreeMap<String, String>>,
    #[serde(default)]
    model_type: Option<String>,
}

fn d_image() -> Size2 {
    Size2::Square(224)
}
fn d_patch() -> Size2 {
    Size2::Square(16)
}
fn d_3() -> usize {
    3
}
fn d_768() -> usize {
    768
}
fn d_12() -> usize {
    12
}
fn d_3072() -> usize {
    3072
}
fn d_act() -> Activation {
    Activation::Gelu
}
fn d_eps() -> f64 {
    1e-12
}
fn d_true() -> bool {
    true
}
fn d_init() -> f64 {
    0.02
}

/// Most encoder layers a config may have (ViT-22B has 48).
const MAX_LAYERS: usize = 128;
/// Widest hidden size a config may have (ViT-22B: 6,144); the MLP may be four times as wide.
const MAX_WIDTH: usize = 8192;
/// Most patches an image may make (a 64 × 64 grid: 1,024 pixels a side at patch 16); attention
/// holds the square of the tokens.
const MAX_PATCHES: usize = 64 * 64;
/// Largest image side a config may have.
const MAX_IMAGE_SIDE: usize = 16384;
/// Most backbone parameters (8 GB of f32 weights, twice that in training with AdamW's state).
const MAX_PARAMETERS: u64 = 2_000_000_000;

impl VitConfig {
    /// Parses `config.json` text.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let raw: Map<String, Value> =
            serde_json::from_str(text).map_err(|e| ModelError::Config(format!("config.json is not a JSON object: {e}")))?;
        let parsed: RawConfig = serde_json::from_value(Value::Object(raw.clone()))
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        if let Some(t) = parsed.model_type.as_deref()
            && t != "vit"
        {
            return Err(ModelError::Config(format!("model_type is '{t}', only 'vit' (ViTForImageClassification) is supported")));
        }
        let labels = labels_from_id2label(&parsed.id2label.unwrap_or_default())?;
        let cfg = Self {
            image_size: parsed.image_size.hw(),
            patch_size: parsed.patch_size.hw(),
            num_channels: parsed.num_channels,
            hidden_size: parsed.hidden_size,
            num_hidden_layers: parsed.num_hidden_layers,
            num_attention_heads: parsed.num_attention_heads,
            intermediate_size: parsed.intermediate_size,
            hidden_act: parsed.hidden_act,
            layer_norm_eps: parsed.layer_norm_eps,
            qkv_bias: parsed.qkv_bias,
            hidden_dropout_prob: parsed.hidden_dropout_prob,
            attention_probs_dropout_prob: parsed.attention_probs_dropout_prob,
            initializer_range: parsed.initializer_range,
            labels,
            raw,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The ViT the library's unit tests run forward (32×32 input, patch 8, 2 layers of width 32,
    /// as `tests/support`'s `TINY_CONFIG` for the test binaries).
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        Self::from_json(
            r#"{"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}"#,
        )
        .expect("a valid configuration")
    }

    /// A named architecture with patch 16 at 224×224: `tiny` (192 wide, 3 heads), `small` (384,
    /// 6 heads) or `base` (768, 12 heads), all 12 layers with an MLP four times as wide.
    pub fn preset(name: &str) -> Option<Self> {
        let (hidden, heads) = match name {
            "tiny" => (192, 3),
            "small" => (384, 6),
            "base" => (768, 12),
            _ => return None,
        };
        let json = serde_json::json!({
            "model_type": "vit",
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "intermediate_size": 4 * hidden,
            "num_hidden_layers": 12,
            "image_size": 224,
            "patch_size": 16,
            "layer_norm_eps": 1e-12,
        });
        Self::from_json(&json.to_string()).ok()
    }

    fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        let (ih, iw) = self.image_size;
        let (ph, pw) = self.patch_size;
        if ih == 0 || iw == 0 || ph == 0 || pw == 0 || ph > ih || pw > iw {
            return bad(format!("image_size {ih}×{iw} and patch_size {ph}×{pw} do not fit"));
        }
        // Bounded first, so the products below cannot overflow.
        if ih.max(iw) > MAX_IMAGE_SIDE {
            return bad(format!("image_size {ih}×{iw} is over the limit of {MAX_IMAGE_SIDE} a side"));
        }
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.intermediate_size == 0 {
            return bad("hidden_size, num_hidden_layers and intermediate_size must be positive".into());
        }
        if self.num_channels != 3 {
            return bad(format!("num_channels is {}; images are read as RGB, so it must be 3", self.num_channels));
        }
        // Sizes are checked before anything is allocated for them (a config from the hub is anyone's).
        for (name, value, max) in [
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, 4 * MAX_WIDTH),
        ] {
            if value > max {
                return bad(format!("{name} {value} is over the limit of {max}"));
            }
        }
        let (gh, gw) = (ih / ph, iw / pw);
        if gh * gw > MAX_PATCHES {
            return bad(format!("image_size {ih}×{iw} with patch_size {ph}×{pw} makes {} patches, over the limit of {MAX_PATCHES}", gh * gw));
        }
        let params = self.num_parameters();
        if params > MAX_PARAMETERS {
            return bad(format!("the model would have {params} parameters, over the limit of {MAX_PARAMETERS}"));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps < 1.0) {
            return bad(format!("layer_norm_eps {} is out of range", self.layer_norm_eps));
        }
        for (name, p) in [("hidden_dropout_prob", self.hidden_dropout_prob), ("attention_probs_dropout_prob", self.attention_probs_dropout_prob)] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} {p} is out of range [0, 1)"));
            }
        }
        Ok(())
    }

    /// The backbone's parameters (the head's depend on the labels and are left out), as the
    /// architecture implies them: what loading or creating it allocates.
    pub fn num_parameters(&self) -> u64 {
        let (h, i, l) = (self.hidden_size as u64, self.intermediate_size as u64, self.num_hidden_layers as u64);
        let (ph, pw) = self.patch_size;
        let patch = h * (self.num_channels * ph * pw) as u64 + h;
        let tokens = ((self.image_size.0 / ph) * (self.image_size.1 / pw) + 1) as u64;
        // Attention (Q, K, V, output) and the MLP, with biases, and two layer norms.
        let layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h;
        patch + tokens * h + h + l * layer + 2 * h
    }

    /// Number of patches along (height, width).
    pub fn grid(&self) -> (usize, usize) {
        (self.image_size.0 / self.patch_size.0, self.image_size.1 / self.patch_size.1)
    }

    /// Tokens per image: the patches plus the CLS token.
    pub fn num_tokens(&self) -> usize {
        let (gh, gw) = self.grid();
        gh * gw + 1
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The same architecture with another set of class names.
    pub fn with_labels(&self, labels: &[String]) -> Self {
        Self { labels: labels.to_vec(), ..self.clone() }
    }

    /// The `config.json` to write next to our weights: the original object with our labels,
    /// `architectures` and dtype set, so `ViTForImageClassification.from_pretrained` loads it.
    pub fn to_json(&self) -> Value {
        let mut obj = self.raw.clone();
        let id2label: Map<String, Value> =
            self.labels.iter().enumerate().map(|(i, l)| (i.to_string(), Value::String(l.clone()))).collect();
        let label2id: Map<String, Value> =
            self.labels.iter().enumerate().map(|(i, l)| (l.clone(), Value::from(i))).collect();
        obj.insert("architectures".into(), serde_json::json!(["ViTForImageClassification"]));
        obj.insert("model_type".into(), "vit".into());
        obj.insert("id2label".into(), Value::Object(id2label));
        obj.insert("label2id".into(), Value::Object(label2id));
        // transformers 5 writes "dtype" where 4.x wrote "torch_dtype"; keep whichever the source
        // used so the file reads naturally in the version it came from.
        if !obj.contains_key("dtype") {
            obj.insert("torch_dtype".into(), "float32".into());
        } else {
            obj.insert("dtype".into(), "float32".into());
        }
        let (ih, iw) = self.image_size;
        let (ph, pw) = self.patch_size;
        let size = |h: usize, w: usize| if h == w { Value::from(h) } else { serde_json::json!([h, w]) };
        for (k, v) in [
            ("image_size", size(ih, iw)),
            ("patch_size", size(ph, pw)),
            ("num_channels", self.num_channels.into()),
            ("hidden_size", self.hidden_size.into()),
            ("num_hidden_layers", self.num_hidden_layers.into()),
            ("num_attention_heads", self.num_attention_heads.into()),
            ("intermediate_size", self.intermediate_size.into()),
            ("hidden_act", serde_json::to_value(self.hidden_act).unwrap_or(Value::Null)),
            ("layer_norm_eps", self.layer_norm_eps.into()),
            ("qkv_bias", self.qkv_bias.into()),
            ("hidden_dropout_prob", self.hidden_dropout_prob.into()),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob.into()),
            ("initializer_range", self.initializer_range.into()),
        ] {
            obj.insert(k.into(), v);
        }
        Value::Object(obj)
    }
}

/// `id2label` keys are stringified integers; they must cover 0..n exactly, each once (`"0"` and
/// `"00"` are both id 0: without the check the second silently replaced the first and the last id
/// was left without a name).
fn labels_from_id2label(map: &BTreeMap<String, String>) -> Result<Vec<String>, ModelError> {
    let mut labels: Vec<Option<(&str, &str)>> = vec![None; map.len()];
    for (k, v) in map {
        let i: usize = k.parse().map_err(|_| ModelError::Config(format!("id2label key '{k}' is not an integer")))?;
        let slot = labels
            .get_mut(i)
            .ok_or_else(|| ModelError::Config(format!("id2label ids must be 0..{}, found {i}", map.len())))?;
        if let Some((first, _)) = slot {
            return Err(ModelError::Config(format!("id2label names id {i} twice (keys '{first}' and '{k}')")));
        }
        *slot = Some((k, v));
    }
    Ok(labels.into_iter().map(|l| l.map(|(_, v)| v.to_string()).unwrap_or_default()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_transformers() {
        let cfg = VitConfig::from_json("{}").unwrap();
        assert_eq!(cfg.image_size, (224, 224));
        assert_eq!(cfg.patch_size, (16, 16));
        assert_eq!(cfg.hidden_size, 768);
        assert!(cfg.qkv_bias);
        assert_eq!(cfg.layer_norm_eps, 1e-12);
        assert_eq!(cfg.hidden_act, Activation::Gelu);
        assert_eq!(cfg.num_tokens(), 197);
    }

    #[test]
    fn reads_odd_config_and_labels() {
        let cfg = VitConfig::from_json(
            r#"{"image_size": 30, "patch_size": 6, "hidden_size": 24, "num_attention_heads": 3,
                "qkv_bias": false, "hidden_act": "gelu_new", "id2label": {"1": "b", "0": "a"},
                "dtype": "float32", "custom": 7}"#,
        )
        .unwrap();
        assert_eq!(cfg.grid(), (5, 5));
        assert_eq!(cfg.head_dim(), 8);
        assert!(!cfg.qkv_bias);
        assert_eq!(cfg.hidden_act, Activation::GeluTanh);
        assert_eq!(cfg.labels, vec!["a", "b"]);
        let out = cfg.to_json();
        assert_eq!(out["custom"], 7);
        assert_eq!(out["dtype"], "float32");
        assert!(out.get("torch_dtype").is_none());
        assert_eq!(out["label2id"]["b"], 1);
    }

    #[test]
    fn refuses_inconsistent_configs() {
        assert!(VitConfig::from_json(r#"{"hidden_size": 10, "num_attention_heads": 3}"#).is_err());
        assert!(VitConfig::from_json(r#"{"model_type": "bert"}"#).is_err());
        assert!(VitConfig::from_json(r#"{"id2label": {"5": "x"}}"#).is_err());
        let twice = VitConfig::from_json(r#"{"id2label": {"0": "cat", "00": "dog"}}"#).unwrap_err().to_string();
        assert!(twice.contains("id2label names id 0 twice (keys '0' and '00')"), "{twice}");
        assert!(VitConfig::from_json(r#"{"id2label": {"+1": "cat", "1": "dog"}}"#).is_err());
        assert!(VitConfig::from_json(r#"{"hidden_act": "mish"}"#).is_err());
        assert!(VitConfig::from_json("[1]").is_err());
    }

    /// Sizes that would allocate without bound are refused before anything is allocated, with
    /// the field named; the largest real ViTs pass.
    #[test]
    fn refuses_configs_too_large_to_allocate() {
        let refused = |json: &str, field: &str| {
            let e = VitConfig::from_json(json).unwrap_err().to_string();
            assert!(e.contains(field), "{json}: {e}");
        };
        refused(r#"{"num_hidden_layers": 100000000000}"#, "num_hidden_layers 100000000000 is over the limit of 128");
        refused(r#"{"hidden_size": 65536, "num_attention_heads": 16}"#, "hidden_size");
        refused(r#"{"intermediate_size": 1000000}"#, "intermediate_size");
        refused(
            r#"{"image_size": 2048, "patch_size": 2, "hidden_size": 1, "num_attention_heads": 1, "intermediate_size": 1, "num_hidden_layers": 1}"#,
            "1048576 patches, over the limit of 4096",
        );
        refused(r#"{"hidden_size": 8192, "num_attention_heads": 64, "intermediate_size": 32768, "num_hidden_layers": 128}"#, "parameters, over the limit");
        refused(r#"{"num_channels": 1}"#, "num_channels is 1");
        refused(r#"{"image_size": 4294967296, "patch_size": 4294967296}"#, "over the limit of 16384 a side");
        // ViT-H/14 at 518 pixels (the DINOv2 giant is wider, still within the limits).
        let huge = VitConfig::from_json(r#"{"hidden_size": 1280, "num_attention_heads": 16, "intermediate_size": 5120, "num_hidden_layers": 32, "image_size": 518, "patch_size": 14}"#).unwrap();
        assert!((600_000_000..700_000_000).contains(&huge.num_parameters()), "{}", huge.num_parameters());
        assert_eq!(VitConfig::preset("base").unwrap().num_parameters(), 85_798_656);
    }
}
