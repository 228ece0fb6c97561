//! Fine-tune hyper-parameters: one struct shared by `POST /jobs` and `vitforge train`, with the
//! defaults of Hugging Face's image-classification recipe and a range check per field.

use serde::{Deserialize, Serialize};

use crate::model::{PrecisionChoice, TrainableSet};

/// The optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// AdamW (β = 0.9, 0.999, ε = 1e-8), weight decay decoupled, not applied to biases and
    /// layer norms (as `transformers.Trainer`).
    Adamw,
    /// SGD with `momentum`.
    Sgd,
}

/// The learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Scheduler {
    Linear,
    Cosine,
    Constant,
}

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum TrainMode {
    /// Every parameter.
    Full,
    /// The classifier only; the backbone is frozen and run without a backward graph.
    HeadOnly,
    /// The classifier, the final layer norm and the last `trainable_layers` encoder layers.
    LastNLayers,
}

/// How the classifier head starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum HeadInit {
    /// Fresh random weights (or the base model's head when it already has these labels).
    Random,
    /// Epoch 1 fits the head without gradient steps: an L2-regularised logistic regression on the
    /// frozen backbone's features, fitted to convergence (L-BFGS) with class-balanced weights and
    /// its strength chosen by cross-validation. Later epochs fine-tune from that head.
    Probe,
}

/// How a run with a probe head goes on after the probe epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum AfterProbe {
    /// As `epochs` and `train_mode` say.
    Given,
    /// The run decides from the data and the time budget (`train::auto`): stop after the probe,
    /// fine-tune the last layers, or fine-tune the whole network, for as many epochs as pay and
    /// fit; the decision and its reason are recorded on the job.
    Auto,
}

/// Fields that, given to the `auto` recipe, fix what follows the probe (so `after_probe` becomes
/// `given` unless it is given too).
pub const FIXES_AFTER_PROBE: [&str; 3] = ["epochs", "train_mode", "trainable_layers"];

/// Fields that leave the implied recipe `auto`.
pub const NOT_RECIPE_FIELDS: [&str; 4] = ["seed", "validation_split", "time_budget_secs", "precision"];

/// Which defaults a job starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Recipe {
    /// Defaults tuned for small data (`TrainParams::auto`); given fields override them.
    Auto,
    /// Hugging Face's image-classification defaults (`TrainParams::default`) with exactly the
    /// given fields changed.
    Manual,
}

impl Recipe {
    /// The recipe when a request names none: `auto` unless hyper-parameters other than
    /// [`NOT_RECIPE_FIELDS`] (which pick data, time and arithmetic, not a recipe) are given.
    pub fn implied<'a>(given: impl IntoIterator<Item = &'a str>) -> Self {
        if given.into_iter().any(|k| !NOT_RECIPE_FIELDS.contains(&k)) { Recipe::Manual } else { Recipe::Auto }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Recipe::Auto => "auto",
            Recipe::Manual => "manual",
        }
    }

    /// The recipe's defaults.
    pub fn base(self) -> TrainParams {
        match self {
            Recipe::Auto => TrainParams::auto(),
            Recipe::Manual => TrainParams::default(),
        }
    }

    /// The recipe's defaults with the fields of a JSON object applied; unknown fields and wrong
    /// types are refused by name (range checks are [`TrainParams::validate`]'s).
    pub fn resolve(self, given: &serde_json::Map<String, serde_json::Value>) -> Result<TrainParams, String> {
        // Field by field first, so an error names its field (a `Value` carries no path).
        for (k, v) in given {
            let one = serde_json::Value::Object([(k.clone(), v.clone())].into_iter().collect());
            if let Err(e) = serde_json::from_value::<TrainParams>(one) {
                return Err(format!("{k}: {e}"));
            }
        }
        let mut merged = match serde_json::to_value(self.base()) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        if self == Recipe::Auto && !given.contains_key("after_probe") && FIXES_AFTER_PROBE.iter().any(|f| given.contains_key(*f)) {
            merged.insert("after_probe".into(), serde_json::json!(AfterProbe::Given));
        }
        for (k, v) in given {
            merged.insert(k.clone(), v.clone());
        }
        serde_json::from_value(serde_json::Value::Object(merged)).map_err(|e| e.to_string())
    }
}

/// Hyper-parameters of a fine-tune. Every field is optional in JSON; unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainParams {
    /// Peak learning rate (of the backbone when `head_learning_rate` is set).
    pub learning_rate: f64,
    /// Learning rate of the classifier head; `null` means `learning_rate`.
    pub head_learning_rate: Option<f64>,
    /// Passes over the training split.
    pub epochs: u32,
    /// Images per forward pass.
    pub batch_size: u32,
    pub optimizer: OptimizerKind,
    /// Decoupled weight decay (AdamW) or L2 (SGD); not applied to biases and layer norms.
    pub weight_decay: f64,
    /// SGD momentum (ignored by AdamW).
    pub momentum: f64,
    pub lr_scheduler: Scheduler,
    /// Fraction of the optimiser steps spent warming the learning rate up linearly from 0.
    pub warmup_ratio: f64,
    /// Batches whose gradients are summed before one optimiser step.
    pub gradient_accumulation_steps: u32,
    /// Clip the global gradient norm to this value (0 disables clipping).
    pub max_grad_norm: f64,
    pub train_mode: TrainMode,
    /// Encoder layers that train in `last_n_layers` mode.
    pub trainable_layers: Option<u32>,
    /// Fraction of each class held out for validation when the dataset has no validation split.
    pub validation_split: f64,
    /// Random resized crop and horizontal flip on training images.
    pub augment: bool,
    /// Seed of shuffling, augmentation, the validation split and new weights.
    pub seed: u64,
    /// Stop after this many epochs in a row that improve neither the validation macro-F1 nor the
    /// validation loss (`null`: never). The epoch kept is the best by macro-F1, then loss.
    pub early_stopping_patience: Option<u32>,
    /// Label smoothing of the cross-entropy loss.
    pub label_smoothing: f64,
    /// Weigh each training example's loss by its class's weight `n / (classes · n_class)`
    /// (scikit-learn's `balanced`, as the probe does), so that each class counts alike.
    pub class_balanced_loss: bool,
    /// How the head starts; with `probe`, epoch 1 is the probe fit and counts among `epochs`.
    pub head_init: HeadInit,
    /// Fit a temperature on the validation split after training and fold it into the head, so
    /// that scores mean what they say (predictions do not change).
    pub calibrate: bool,
    /// How a run with a probe head goes on after the probe epoch.
    pub after_probe: AfterProbe,
    /// Other views of each training image that the probe head is fitted on as well: the first
    /// is its mirror image, each further one a random resized crop with flip. Each costs one
    /// more pass of the frozen network over the training images; 0: the images alone; `null`:
    /// `after_probe: auto` chooses ([`super::auto::probe_views`]), else 0.
    pub probe_views: Option<u32>,
    /// Longest the run should take, in seconds: `after_probe: auto` plans within it, and no
    /// gradient epoch starts that would end past it (the best epoch so far is kept).
    pub time_budget_secs: Option<u64>,
    /// The precision of the matrix products, in training and in the run's evaluations: `f32`,
    /// `bf16` (mixed precision: f32 weights and optimiser state, bf16 operands, f32
    /// accumulation), or `auto` (bf16 on a GPU worker and where the worker's CPU multiplies bf16
    /// natively and faster, else f32). The model is saved in f32 either way.
    pub precision: PrecisionChoice,
}

impl Default for TrainParams {
    fn default() -> Self {
        Self {
            learning_rate: 5e-5,
            head_learning_rate: None,
            epochs: 3,
            batch_size: 8,
            optimizer: OptimizerKind::Adamw,
            weight_decay: 0.0,
            momentum: 0.9,
            lr_scheduler: Scheduler::Linear,
            warmup_ratio: 0.0,
            gradient_accumulation_steps: 1,
            max_grad_norm: 1.0,
            train_mode: TrainMode::Full,
            trainable_layers: None,
            validation_split: 0.1,
            augment: true,
            seed: 42,
            early_stopping_patience: None,
            label_smoothing: 0.0,
            class_balanced_loss: false,
            head_init: HeadInit::Random,
            calibrate: false,
            after_probe: AfterProbe::Given,
            probe_views: None,
            time_budget_secs: None,
            precision: PrecisionChoice::F32,
        }
    }
}

impl TrainParams {
    /// The `auto` recipe: the head fitted to convergence on the frozen backbone's features (epoch
    /// 1, no gradient steps); then `after_probe: auto` decides from the data and the time budget
    /// whether the last layers or the whole network fine-tune from that head (`train::auto`),
    /// keeping the best epoch by validation macro-F1, and a temperature is fitted at the end.
    /// Given `epochs`, the whole network fine-tunes gently from the probe head (learning rate
    /// 1e-5; linear-probe-then-fine-tune) for those epochs instead.
    pub fn auto() -> Self {
        Self {
            learning_rate: AUTO_LEARNING_RATE,
            epochs: AUTO_EPOCHS,
            head_init: HeadInit::Probe,
            early_stopping_patience: Some(1),
            warmup_ratio: 0.0,
            calibrate: true,
            after_probe: AfterProbe::Auto,
            ..Self::default()
        }
    }
}

/// Most other views per image the probe may be fitted on.
pub const MAX_PROBE_VIEWS: u32 = 8;

/// Backbone learning rate of the `auto` recipe's fine-tune epochs.
pub const AUTO_LEARNING_RATE: f64 = 1e-5;
/// Epochs of the `auto` recipe, the probe epoch included.
pub const AUTO_EPOCHS: u32 = 1;

impl TrainParams {
    /// The parameters that train in this run's `train_mode`.
    pub fn trainable_set(&self) -> TrainableSet {
        match self.train_mode {
            TrainMode::Full => TrainableSet::All,
            TrainMode::HeadOnly => TrainableSet::HeadOnly,
            TrainMode::LastNLayers => TrainableSet::LastLayers(self.trainable_layers.unwrap_or(1) as usize),
        }
    }
}

/// A hyper-parameter outside its range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ParamError {
    pub field: &'static str,
    pub message: String,
}

impl TrainParams {
    /// Checks what depends on the base model, known only when the job runs: `trainable_layers`
    /// may not exceed its encoder layers (more used to train them all without a word).
    pub fn validate_for(&self, num_layers: usize) -> Result<(), ParamError> {
        match self.trainable_layers {
            Some(n) if n as usize > num_layers => Err(ParamError {
                field: "trainable_layers",
                message: format!(
                    "is {n}, more than the {num_layers} encoder layers of the base model (train_mode full trains every layer and the embeddings)"
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Checks every range; the error names the first offending field.
    pub fn validate(&self) -> Result<(), ParamError> {
        fn check(ok: bool, field: &'static str, message: &str) -> Result<(), ParamError> {
            if ok { Ok(()) } else { Err(ParamError { field, message: message.to_string() }) }
        }
        // (A rate below 1e-12 trains nothing, and a head rate divided by it overflows.)
        let lr_ok = |lr: f64| lr.is_finite() && (1e-12..=10.0).contains(&lr);
        check(lr_ok(self.learning_rate), "learning_rate", "must be in [1e-12, 10]")?;
        check(self.head_learning_rate.is_none_or(lr_ok), "head_learning_rate", "must be in [1e-12, 10]")?;
        check((1..=1000).contains(&self.epochs), "epochs", "must be between 1 and 1000")?;
        check((1..=4096).contains(&self.batch_size), "batch_size", "must be between 1 and 4096")?;
        check(self.weight_decay.is_finite() && (0.0..=10.0).contains(&self.weight_decay), "weight_decay", "must be in [0, 10]")?;
        // Each step scales the decayed weights by 1 − rate × decay: at 1 or more they flip sign
        // and grow without bound (NaN within a few steps).
        let fastest = self.learning_rate.max(self.head_learning_rate.unwrap_or(0.0));
        check(
            fastest * self.weight_decay < 1.0,
            "weight_decay",
            &format!("times the learning rate ({fastest}) must be below 1 (each step scales the weights by 1 − learning_rate × weight_decay)"),
        )?;
        check(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum), "momentum", "must be in [0, 1)")?;
        check(self.warmup_ratio.is_finite() && (0.0..1.0).contains(&self.warmup_ratio), "warmup_ratio", "must be in [0, 1)")?;
        check(
            (1..=1024).contains(&self.gradient_accumulation_steps),
            "gradient_accumulation_steps",
            "must be between 1 and 1024",
        )?;
        check(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0, "max_grad_norm", "must be ≥ 0 (0 disables clipping)")?;
        match (self.train_mode, self.trainable_layers) {
            (TrainMode::LastNLayers, None) => {
                return Err(ParamError { field: "trainable_layers", message: "is required with train_mode last_n_layers".into() });
            }
            (TrainMode::LastNLayers, Some(n)) => check(n >= 1, "trainable_layers", "must be at least 1")?,
            (_, Some(_)) => {
                return Err(ParamError { field: "trainable_layers", message: "is only used with train_mode last_n_layers".into() });
            }
            _ => {}
        }
        check(
            self.validation_split.is_finite() && self.validation_split > 0.0 && self.validation_split < 1.0,
            "validation_split",
            "must be in (0, 1)",
        )?;
        check(self.early_stopping_patience.is_none_or(|p| p >= 1), "early_stopping_patience", "must be at least 1")?;
        check(
            self.after_probe == AfterProbe::Given || self.head_init == HeadInit::Probe,
            "after_probe",
            "auto needs head_init probe (the decision is taken after the probe epoch)",
        )?;
        let views = self.probe_views.unwrap_or(0);
        check(views <= MAX_PROBE_VIEWS, "probe_views", &format!("must be between 0 and {MAX_PROBE_VIEWS}"))?;
        check(views == 0 || self.head_init == HeadInit::Probe, "probe_views", "needs head_init probe (views feed the probe fit)")?;
        check(
            self.time_budget_secs.is_none_or(|t| (1..=7 * 24 * 3600).contains(&t)),
            "time_budget_secs",
            "must be between 1 and 604800 (a week)",
        )?;
        check(
            self.label_smoothing.is_finite() && (0.0..1.0).contains(&self.label_smoothing),
            "label_smoothing",
            "must be in [0, 1)",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_huggingface_s_and_valid() {
        let p: TrainParams = serde_json::from_str("{}").unwrap();
        assert_eq!(p, TrainParams::default());
        assert_eq!(p.learning_rate, 5e-5);
        assert_eq!((p.epochs, p.batch_size), (3, 8));
        p.validate().unwrap();
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused_by_name() {
        let e = serde_json::from_str::<TrainParams>(r#"{"learnin_rate": 1}"#).unwrap_err();
        assert!(e.to_string().contains("learnin_rate"), "{e}");
        let p: TrainParams = serde_json::from_str(r#"{"epochs": 0}"#).unwrap();
        assert_eq!(p.validate().unwrap_err().field, "epochs");
        let p: TrainParams = serde_json::from_str(r#"{"train_mode": "last_n_layers"}"#).unwrap();
        assert_eq!(p.validate().unwrap_err().field, "trainable_layers");
        let p: TrainParams = serde_json::from_str(r#"{"learning_rate": -1}"#).unwrap();
        assert_eq!(p.validate().unwrap_err().field, "learning_rate");
        assert!(serde_json::from_str::<TrainParams>(r#"{"optimizer": "adam"}"#).is_err());
        assert!(serde_json::from_str::<TrainParams>(r#"{"epochs": 1e300}"#).is_err());
        // Ranges that pass one by one and diverge together, or overflow a ratio.
        let p: TrainParams = serde_json::from_str(r#"{"learning_rate": 10, "weight_decay": 10}"#).unwrap();
        assert_eq!(p.validate().unwrap_err().field, "weight_decay");
        let p: TrainParams = serde_json::from_str(r#"{"learning_rate": 0.001, "head_learning_rate": 2, "weight_decay": 0.5}"#).unwrap();
        assert_eq!(p.validate().unwrap_err().field, "weight_decay");
        let p: TrainParams = serde_json::from_str(r#"{"learning_rate": 1e-309, "head_learning_rate": 1}"#).unwrap();
        assert_eq!(p.validate().unwrap_err().field, "learning_rate");
        let p: TrainParams = serde_json::from_str(r#"{"learning_rate": 0.001, "weight_decay": 10}"#).unwrap();
        p.validate().unwrap();
    }
}
