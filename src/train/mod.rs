//! The synchronous fine-tune loop: shuffling and augmentation, forward and backward, optimiser
//! and schedule, per-epoch validation with the best epoch kept, checkpoints, progress events and
//! cancellation. It runs on a plain thread; nothing here is async.

pub mod auto;
pub mod calibrate;
pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod features;
pub mod hyperparams;
pub mod memory;
pub mod optim;
pub mod probe;
pub mod progress;
pub mod report;
mod run;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use crate::model::ModelError;
use data::TrainData;
pub use eval::EvalSplit;
pub use hyperparams::{AfterProbe, HeadInit, OptimizerKind, Recipe, Scheduler, TrainMode, TrainParams};
pub use progress::Phase;
use report::EvalReport;
pub use run::fine_tune;

/// Why a fine-tune stopped without a model.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("cancelled")]
    Cancelled,
    #[error("invalid hyper-parameter {0}")]
    Params(#[from] hyperparams::ParamError),
    #[error("data: {0}")]
    Data(String),
    #[error("unusable checkpoint: {0}")]
    Checkpoint(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Transparent, so an error chain does not print the same text twice.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Reading or writing the run's files failed: what was being done, the path and why.
    #[error("{0}")]
    Files(String),
    /// The loss became NaN or infinite: the weights blew up, and nothing after it can be kept.
    #[error("training diverged: {0}; lower learning_rate (or head_learning_rate, weight_decay)")]
    Diverged(String),
    /// A training step cannot fit the memory the run may take ([`memory::StepMemory::check`]).
    #[error("{0}")]
    Memory(String),
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Model(ModelError::Candle(e))
    }
}

/// What the loop reports while it runs.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// The plan, once data is loaded; `resumed_from` is the checkpoint epoch continued from.
    /// `precision` is the job's `precision` as it runs on this machine (`auto` resolved).
    Started {
        epochs: u32,
        steps_per_epoch: u64,
        total_steps: u64,
        train_images: usize,
        validation_images: usize,
        resumed_from: Option<u32>,
        /// Optimiser steps taken before this attempt (those of the checkpoint resumed from).
        steps_done: u64,
        precision: crate::model::Precision,
    },
    /// A checkpoint could not be used; the fine-tune starts over.
    Restarted { reason: String },
    /// One optimiser step (1-based `step` out of `steps`).
    Step { epoch: u32, step: u64, steps: u64, loss: f64, learning_rate: f64, images_per_s: f64 },
    /// Validation after an epoch, with the validation images it got wrong (most confident first).
    Epoch { epoch: u32, report: EvalReport, improved: bool, mistakes: Vec<eval::Mistake> },
    /// Epoch `epoch`'s checkpoint is on disk at `dir`.
    Checkpoint { epoch: u32, dir: PathBuf, score: f64 },
    /// Test-split evaluation of the kept model.
    Test { report: EvalReport },
    /// What follows the probe epoch was decided (`after_probe: auto`); `epochs` and
    /// `total_steps` are the run's plan from here on.
    Decided { decision: auto::Decision, epochs: u32, total_steps: u64 },
    /// Early stopping or the time budget ended the run after `epochs` epochs and `total_steps`
    /// optimiser steps (its plan from here on): `why`, and the run's decision with the stop added
    /// (see [`auto::Decision`]).
    Stopped { why: String, decision: auto::Decision, epochs: u32, total_steps: u64 },
    /// The kept model's scores were calibrated on the validation split.
    Calibrated { calibration: calibrate::Calibration },
    /// Progress within a phase (`done` of `total`; see [`Phase`] for what they count). The
    /// training phase is reported by [`TrainEvent::Step`] instead.
    Phase { phase: Phase, done: u64, total: u64 },
    /// The probe head was fitted (epoch 1 of a `head_init: probe` run): its regularisation
    /// strength `c` chosen by cross-validation (its `cv_log_loss`, which chose it, and
    /// `cv_accuracy`; none with too few images per class to cross-validate), the seconds of the
    /// frozen network's pass over the training images (`features_seconds`, 0 when they were
    /// cached) and of the logistic-regression fits (`fit_seconds`), and how many other views of
    /// each image (mirror image, crops) it was fitted on as well (`views`).
    Probe { c: f64, cv_accuracy: Option<f64>, cv_log_loss: Option<f64>, features_seconds: f64, fit_seconds: f64, views: u32 },
}

/// How a fine-tune runs, besides its hyper-parameters.
pub struct TrainSpec {
    pub params: TrainParams,
    pub data: TrainData,
    /// Where epoch checkpoints and the best model are written (and resumed from).
    pub checkpoint_root: PathBuf,
    /// Largest image decoded, in pixels.
    pub max_pixels: u64,
    /// Memory for decoded images and cached frozen-backbone outputs, in bytes.
    pub cache_budget: usize,
    /// The most memory the run may take on the CPU: a run whose training step needs more
    /// ([`memory::training_step`]) is refused before it starts. `None`: no check.
    pub memory_limit: Option<memory::MemoryLimit>,
}

/// The result of a fine-tune.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// A model folder with the kept model: the best epoch's weights, with the calibration
    /// folded into its head when the run calibrated.
    pub best_dir: PathBuf,
    pub best_epoch: u32,
    pub best: EvalReport,
    pub test: Option<EvalReport>,
    pub epochs_run: u32,
    pub history: Vec<EvalReport>,
    /// The temperature fitted on the validation split, when the run calibrates.
    pub calibration: Option<calibrate::Calibration>,
    /// What `after_probe: auto` decided, and why the run stopped early (early stopping or the
    /// time budget) when it did.
    pub decision: Option<auto::Decision>,
    /// The precision the products ran in (`precision` with `auto` resolved).
    pub precision: crate::model::Precision,
}

/// Cancellation flag and event sink of a running fine-tune, and its fence.
pub struct Control<'a> {
    pub cancel: &'a AtomicBool,
    pub on_event: &'a mut dyn FnMut(TrainEvent),
    /// Asked before anything is written to the checkpoint folder (an epoch's checkpoint, the
    /// calibrated model): `false` stops the run as cancelled with nothing written. A job's run
    /// answers whether it still holds the job: one whose lease lapsed stops there rather than
    /// training on for a folder no one resumes from (`checkpoint::take_over`) ([`Control::new`]:
    /// always `true`).
    pub holds: &'a dyn Fn() -> bool,
}

impl<'a> Control<'a> {
    /// A run that answers to `cancel`, reports to `on_event` and is never fenced.
    pub fn new(cancel: &'a AtomicBool, on_event: &'a mut dyn FnMut(TrainEvent)) -> Self {
        fn always() -> bool {
            true
        }
        Self { cancel, on_event, holds: &always }
    }
}

/// The default memory budget for decoded images and cached frozen-backbone outputs: 4 GiB.
pub fn default_cache_budget() -> usize {
    4usize << 30
}

/// The cache budget of a run that may take `memory_limit` bytes: [`default_cache_budget`], or a
/// quarter of the limit where that is less (a small machine or container), so the caches leave
/// the training step its room.
pub fn cache_budget_within(memory_limit: Option<&memory::MemoryLimit>) -> usize {
    let quarter = memory_limit.map_or(u64::MAX, |l| l.bytes / 4);
    usize::try_from(quarter).map_or(default_cache_budget(), |q| q.min(default_cache_budget()))
}

/// Path helper: the checkpoint root used by `vitforge train --output DIR`.
pub fn cli_checkpoint_root(output: &Path) -> PathBuf {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    output.with_file_name(format!(".{name}.checkpoints"))
}
