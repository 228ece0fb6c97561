//! Hyper-parameter flags of `vitforge train`, named like the JSON fields of `POST /jobs` with
//! dashes. Unset flags keep the defaults of the run's recipe (`Recipe::base`: `auto`'s, or
//! Hugging Face's for `manual`).

use clap::Args;

use crate::model::PrecisionChoice;
use crate::train::{AfterProbe, HeadInit, OptimizerKind, Scheduler, TrainMode, TrainParams};

/// Fine-tune hyper-parameters (defaults: the recipe's, see [`HyperParams::any_recipe_flag`]).
#[derive(Debug, Clone, Default, Args)]
pub struct HyperParams {
    /// Peak learning rate [default: 5e-5].
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Learning rate of the classifier head [default: the learning rate].
    #[arg(long)]
    pub head_learning_rate: Option<f64>,
    /// Passes over the training images [default: 3].
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Images per batch [default: 8].
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Optimiser [default: adamw].
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerKind>,
    /// Weight decay, not applied to biases and layer norms [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// SGD momentum [default: 0.9].
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Learning-rate schedule after warm-up [default: linear].
    #[arg(long, value_enum)]
    pub lr_scheduler: Option<Scheduler>,
    /// Fraction of steps warming the learning rate up from 0 [default: 0].
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Batches per optimiser step [default: 1].
    #[arg(long)]
    pub gradient_accumulation_steps: Option<u32>,
    /// Global gradient-norm clip, 0 to disable [default: 1].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// What trains [default: full].
    #[arg(long, value_enum)]
    pub train_mode: Option<TrainMode>,
    /// Encoder layers that train with `--train-mode last_n_layers`.
    #[arg(long)]
    pub trainable_layers: Option<u32>,
    /// Fraction held out for validation when the data has no validation split [default: 0.1].
    #[arg(long)]
    pub validation_split: Option<f64>,
    /// Random resized crop and flip on training images [default: true].
    #[arg(long)]
    pub augment: Option<bool>,
    /// Seed of shuffling, augmentation and new weights [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this many epochs in a row that improve neither the validation macro-F1 nor loss.
    #[arg(long)]
    pub early_stopping_patience: Option<u32>,
    /// Label smoothing of the loss [default: 0].
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Weigh the loss so each class counts alike, whatever its number of images [default: false].
    #[arg(long)]
    pub class_balanced_loss: Option<bool>,
    /// How the head starts: `probe` makes epoch 1 a logistic-regression fit on frozen features
    /// [default: random; probe with the auto recipe].
    #[arg(long, value_enum)]
    pub head_init: Option<HeadInit>,
    /// Fit a temperature on the validation split so scores match accuracy [default: true with
    /// the auto recipe, false with manual].
    #[arg(long)]
    pub calibrate: Option<bool>,
    /// After the probe epoch: `auto` decides from the data and the time budget, `given` follows
    /// --epochs and --train-mode [default: auto with the auto recipe unless --epochs,
    /// --train-mode or --trainable-layers is given].
    #[arg(long, value_enum)]
    pub after_probe: Option<AfterProbe>,
    /// Other views of each training image the probe head is also fitted on: the first is its
    /// mirror image, further ones random resized crops [default: the auto recipe's choice (3
    /// where the probe is the model), else 0].
    #[arg(long)]
    pub probe_views: Option<u32>,
    /// Longest the run should take, in seconds: auto plans within it, and no epoch starts that
    /// would end past it.
    #[arg(long)]
    pub time_budget_secs: Option<u64>,
    /// Precision of the matrix products: f32, bf16 (mixed precision: f32 weights, bf16 operands,
    /// f32 accumulation) or auto (bf16 on a GPU and where the CPU multiplies bf16 natively and faster) [default: f32].
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionChoice>,
}

impl HyperParams {
    /// Whether a hyper-parameter flag other than `--seed`, `--validation-split`,
    /// `--time-budget-secs` and `--precision` is given (which makes the recipe `manual` by default).
    pub fn any_recipe_flag(&self) -> bool {
        let Self {
            learning_rate, head_learning_rate, epochs, batch_size, optimizer, weight_decay, momentum, lr_scheduler,
            warmup_ratio, gradient_accumulation_steps, max_grad_norm, train_mode, trainable_layers,
            augment, early_stopping_patience, label_smoothing, class_balanced_loss, head_init, calibrate, after_probe, probe_views,
            seed: _, validation_split: _, time_budget_secs: _, precision: _,
        } = self;
        learning_rate.is_some() || head_learning_rate.is_some() || epochs.is_some() || batch_size.is_some()
            || optimizer.is_some() || weight_decay.is_some() || momentum.is_some() || lr_scheduler.is_some()
            || warmup_ratio.is_some() || gradient_accumulation_steps.is_some() || max_grad_norm.is_some()
            || train_mode.is_some() || trainable_layers.is_some() || augment.is_some()
            || early_stopping_patience.is_some() || label_smoothing.is_some() || head_init.is_some() || calibrate.is_some()
            || after_probe.is_some() || probe_views.is_some() || class_balanced_loss.is_some()
    }

    /// The defaults with every given flag applied.
    pub fn apply(&self, mut p: TrainParams) -> TrainParams {
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { p.$field = v; } )* };
        }
        set!(learning_rate, epochs, batch_size, optimizer, weight_decay, momentum, lr_scheduler, warmup_ratio,
             gradient_accumulation_steps, max_grad_norm, train_mode, validation_split, augment, seed, label_smoothing,
             head_init, calibrate, after_probe, class_balanced_loss, precision);
        if self.probe_views.is_some() {
            p.probe_views = self.probe_views;
        }
        if self.head_learning_rate.is_some() {
            p.head_learning_rate = self.head_learning_rate;
        }
        if self.trainable_layers.is_some() {
            p.trainable_layers = self.trainable_layers;
        }
        if self.early_stopping_patience.is_some() {
            p.early_stopping_patience = self.early_stopping_patience;
        }
        if self.time_budget_secs.is_some() {
            p.time_budget_secs = self.time_budget_secs;
        }
        // As POST /jobs: fixing the epochs or the mode fixes what follows the probe.
        if self.after_probe.is_none() && (self.epochs.is_some() || self.train_mode.is_some() || self.trainable_layers.is_some()) {
            p.after_probe = AfterProbe::Given;
        }
        p
    }
}
