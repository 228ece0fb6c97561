//! What the `auto` recipe does after its probe epoch, decided from the data and the time budget
//! by the measurements of `bench/QUALITY.md` (a size curve on real photos): stop after the probe
//! (fitted on other views of the images as well) where validation is too small to tell a better
//! epoch; fine-tune the last layers from the probe head where that paid, the whole network (LP-FT)
//! where there is data enough; for up to [`MAX_FINE_TUNE_EPOCHS`] (2) epochs, fewer where the time
//! budget does not allow them, keeping the best
//! epoch by validation (the probe's included, so a fine-tune that does not help is not kept).

use serde::{Deserialize, Serialize};

use super::hyperparams::{AUTO_LEARNING_RATE, TrainMode, TrainParams};

/// Fewest training images per class (after the validation hold-out) at which `auto` fine-tunes
/// after the probe: 200 photos per class with the default 10% held out, where validation holds
/// 20 photos per class. Below that the epoch kept is picked on too few validation photos: over 15
/// splits from 25 to 200 photos per class the last layers gained 0.2 points on average, and on one
/// split of 50 per class (10 validation photos) the epoch picked tested 11 points below the probe.
/// At 200 per class they were level or ahead twice in three seeds (−0.5, 0, +3.25 points), at 300
/// and 400 ahead by 2.25 and 4.25 (bench/QUALITY.md, "Size curve").
pub const MIN_PER_CLASS_TO_FINE_TUNE: usize = 180;

/// Other views of each training image (the mirror image and two random resized crops) that
/// `auto` fits the probe on as well where the probe is the model (below
/// [`MIN_PER_CLASS_TO_FINE_TUNE`]): over 12 fits at 25, 50 and 100 photos per class, they added
/// 3.6, 1.3 and 0.4 points on average to the probe on the images alone, for three more passes
/// over the training images (bench/QUALITY.md, "Probe on other views").
pub const AUTO_PROBE_VIEWS: u32 = 3;

/// Most training images on which `auto` fits the probe on other views: three more passes over
/// 1,000 images take about 5 minutes for ViT-S on two cores (10 images/s). The views were
/// measured on up to 450 training images (five texture classes of 90, bench/QUALITY.md); on many
/// classes of small size the passes grow with the number of classes while their gain was never
/// measured there.
pub const AUTO_PROBE_VIEWS_MAX_IMAGES: usize = 1000;

/// The probe views of a run that leaves them to the recipe (`probe_views: null`): with
/// `after_probe: auto`, [`AUTO_PROBE_VIEWS`] where the smallest class will keep the probe and
/// the training split is at most [`AUTO_PROBE_VIEWS_MAX_IMAGES`], else none.
pub fn probe_views(after_probe_auto: bool, train_per_class: &[usize]) -> u32 {
    let smallest = train_per_class.iter().copied().min().unwrap_or(0);
    let total: usize = train_per_class.iter().sum();
    if after_probe_auto && smallest < MIN_PER_CLASS_TO_FINE_TUNE && total <= AUTO_PROBE_VIEWS_MAX_IMAGES { AUTO_PROBE_VIEWS } else { 0 }
}

/// Fewest training images per class at which `auto` fine-tunes the whole network rather than the
/// last layers: 1,000 photos per class with 10% held out, where the whole network's fine-tune
/// was measured 3 points above the probe (issue 19). In our size curve (up to 400 per class) the
/// last layers were as accurate as the whole network or more, in a third of its time or less
/// (bench/QUALITY.md, "Size curve").
pub const MIN_PER_CLASS_FOR_FULL: usize = 900;

/// Encoder layers the last-layers fine-tune trains (with the final layer norm and the head).
pub const LAST_LAYERS: u32 = 2;

/// Learning rate of the last-layers fine-tune when the job leaves the recipe's own (1e-5, made
/// for the whole network): the last layers alone move little at 1e-5 in two epochs.
pub const LAST_LAYERS_LEARNING_RATE: f64 = 1e-4;

/// Fine-tune epochs after the probe: beyond two, validation stopped improving in our measurements.
pub const MAX_FINE_TUNE_EPOCHS: u32 = 2;

/// A full training step costs about this many forward passes per image (forward, backward
/// through every layer, the optimiser), measured with `vitforge bench` (small/16: 10.3 img/s
/// inference, 2.83 img/s training step on the same machine).
pub const TRAIN_COST_IN_FORWARDS: f64 = 3.6;

/// What `auto` does after the probe (or, with `as_given`, what a time-budget stop cut short).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Keep the probe head: the run ends after epoch 1.
    ProbeOnly,
    /// Fine-tune the last [`LAST_LAYERS`] encoder layers, the final layer norm and the head from
    /// the probe head, without augmentation (the frozen layers' outputs are computed once).
    LastLayers,
    /// Fine-tune every parameter from the probe head (LP-FT).
    FullFineTune,
    /// The run's own parameters (a time-budget stop of a run `auto` did not plan).
    AsGiven,
}

/// The decision, recorded on the job and in the checkpoint (a resumed run keeps it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub action: Action,
    /// Epochs of the whole run, the probe epoch included.
    pub epochs: u32,
    /// Why, in a sentence a person can check against bench/QUALITY.md.
    pub reason: String,
}

/// What the decision is made from.
#[derive(Debug, Clone)]
pub struct Situation {
    /// Training images per class.
    pub per_class: Vec<usize>,
    pub validation_images: usize,
    pub test_images: usize,
    /// Encoder layers of the model.
    pub layers: usize,
    /// Images per second of the frozen network's forward pass, measured in the probe epoch.
    pub forward_per_s: f64,
    /// Seconds the run has taken so far.
    pub elapsed_s: f64,
    /// The job's time budget, in seconds.
    pub budget_s: Option<f64>,
}

impl Situation {
    fn train_images(&self) -> f64 {
        self.per_class.iter().sum::<usize>() as f64
    }

    fn rate(&self) -> f64 {
        self.forward_per_s.max(1e-6)
    }

    /// Seconds one fine-tune epoch of `action` should take (training, then validation). The
    /// last-layers epochs read the frozen layers' outputs from a cache, so they cost the share of
    /// the network that trains.
    pub fn epoch_secs(&self, action: Action) -> f64 {
        let share = match action {
            Action::LastLayers => (LAST_LAYERS as f64 / self.layers.max(1) as f64).min(1.0),
            _ => 1.0,
        };
        share * (self.train_images() * TRAIN_COST_IN_FORWARDS + self.validation_images as f64) / self.rate()
    }

    /// Seconds before the first fine-tune epoch of `action`: the last layers' input (the frozen
    /// layers' outputs) is computed once over the training and validation images.
    pub fn setup_secs(&self, action: Action) -> f64 {
        match action {
            Action::LastLayers => (self.train_images() + self.validation_images as f64) / self.rate(),
            _ => 0.0,
        }
    }

    /// Seconds the end of a run takes after its last epoch (calibration on validation, test).
    pub fn finish_secs(&self) -> f64 {
        (self.validation_images + self.test_images) as f64 / self.rate()
    }
}

/// What to do after the probe.
pub fn decide(s: &Situation) -> Decision {
    let smallest = s.per_class.iter().copied().min().unwrap_or(0);
    let largest = s.per_class.iter().copied().max().unwrap_or(0);
    let probe_only = |reason: String| Decision { action: Action::ProbeOnly, epochs: 1, reason };
    if smallest < MIN_PER_CLASS_TO_FINE_TUNE {
        return probe_only(format!(
            "{smallest} training images in the smallest class: below {MIN_PER_CLASS_TO_FINE_TUNE} per class (200 photos with 10% \
             held out) the validation split is too small to pick a better epoch than the probe's, and fine-tuning after the probe \
             did not pay on average in our measurements (bench/QUALITY.md)"
        ));
    }
    let (action, what) = if smallest >= MIN_PER_CLASS_FOR_FULL {
        (Action::FullFineTune, format!("from {MIN_PER_CLASS_FOR_FULL} per class, fine-tuning the whole network from the probe head"))
    } else {
        (
            Action::LastLayers,
            format!(
                "from {MIN_PER_CLASS_TO_FINE_TUNE} to {} per class, fine-tuning the last {LAST_LAYERS} layers from the probe head",
                MIN_PER_CLASS_FOR_FULL - 1
            ),
        )
    };
    let mut epochs = MAX_FINE_TUNE_EPOCHS;
    let mut limited = String::new();
    if let Some(budget) = s.budget_s {
        let left = budget - s.elapsed_s - s.finish_secs() - s.setup_secs(action);
        let fit = (left / s.epoch_secs(action)).floor().max(0.0) as u32;
        if fit == 0 {
            return probe_only(format!(
                "fine-tuning would pay at {smallest}+ images per class, but one epoch (about {:.0} s) does not fit the {:.0} s left of \
                 the time budget",
                s.setup_secs(action) + s.epoch_secs(action),
                (budget - s.elapsed_s - s.finish_secs()).max(0.0)
            ));
        }
        if fit < epochs {
            epochs = fit;
            limited = format!("; {fit} of {MAX_FINE_TUNE_EPOCHS} epochs fit the time budget");
        }
    }
    let imbalance = if smallest > 0 { largest as f64 / smallest as f64 } else { f64::INFINITY };
    Decision {
        action,
        epochs: 1 + epochs,
        reason: format!(
            "{smallest} to {largest} training images per class (imbalance {imbalance:.1}:1): {what} beat the probe alone in our \
             measurements (bench/QUALITY.md); up to {epochs} epoch(s), the best epoch (the probe's included) kept by validation{limited}"
        ),
    }
}

/// The run's parameters once the decision is taken.
pub fn apply(p: &TrainParams, d: &Decision) -> TrainParams {
    let mut out = p.clone();
    out.epochs = d.epochs;
    match d.action {
        Action::FullFineTune => {
            out.train_mode = TrainMode::Full;
            out.trainable_layers = None;
        }
        Action::LastLayers => {
            out.train_mode = TrainMode::LastNLayers;
            out.trainable_layers = Some(LAST_LAYERS);
            out.augment = false;
            if out.learning_rate == AUTO_LEARNING_RATE {
                out.learning_rate = LAST_LAYERS_LEARNING_RATE;
            }
        }
        Action::ProbeOnly | Action::AsGiven => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn situation(per_class: usize, budget_s: Option<f64>) -> Situation {
        Situation {
            per_class: vec![per_class, per_class + 10],
            validation_images: 20,
            test_images: 0,
            layers: 12,
            forward_per_s: 10.0,
            elapsed_s: 30.0,
            budget_s,
        }
    }

    #[test]
    fn the_action_follows_the_smallest_class() {
        let d = decide(&situation(MIN_PER_CLASS_TO_FINE_TUNE - 1, None));
        assert_eq!((d.action, d.epochs), (Action::ProbeOnly, 1), "{}", d.reason);
        let d = decide(&situation(MIN_PER_CLASS_TO_FINE_TUNE, None));
        assert_eq!((d.action, d.epochs), (Action::LastLayers, 1 + MAX_FINE_TUNE_EPOCHS), "{}", d.reason);
        let d = decide(&situation(MIN_PER_CLASS_FOR_FULL, None));
        assert_eq!((d.action, d.epochs), (Action::FullFineTune, 1 + MAX_FINE_TUNE_EPOCHS), "{}", d.reason);
        let range = format!("{} to {}", MIN_PER_CLASS_FOR_FULL, MIN_PER_CLASS_FOR_FULL + 10);
        assert!(d.reason.contains(&range), "{}", d.reason);
    }

    #[test]
    fn views_where_the_probe_is_the_model() {
        assert_eq!(probe_views(true, &[MIN_PER_CLASS_TO_FINE_TUNE - 1, 500]), AUTO_PROBE_VIEWS);
        assert_eq!(probe_views(true, &[MIN_PER_CLASS_TO_FINE_TUNE, 500]), 0);
        assert_eq!(probe_views(false, &[10, 10]), 0, "a run auto does not plan gets what it asks for");
        assert_eq!(probe_views(true, &[50; 20]), AUTO_PROBE_VIEWS);
        assert_eq!(probe_views(true, &[50; 21]), 0, "over {AUTO_PROBE_VIEWS_MAX_IMAGES} images");
    }

    #[test]
    fn last_layers_cost_their_share_and_keep_a_given_learning_rate() {
        let s = situation(MIN_PER_CLASS_TO_FINE_TUNE, None);
        let full = s.epoch_secs(Action::FullFineTune);
        assert!((s.epoch_secs(Action::LastLayers) - full * 2.0 / 12.0).abs() < 1e-9);
        let d = decide(&s);
        let p = TrainParams { learning_rate: AUTO_LEARNING_RATE, ..Default::default() };
        let out = apply(&p, &d);
        assert_eq!((out.train_mode, out.trainable_layers, out.augment), (TrainMode::LastNLayers, Some(LAST_LAYERS), false));
        assert_eq!(out.learning_rate, LAST_LAYERS_LEARNING_RATE);
        assert_eq!(apply(&TrainParams { learning_rate: 3e-5, ..p }, &d).learning_rate, 3e-5);
    }

    #[test]
    fn the_time_budget_limits_the_epochs() {
        let s = situation(MIN_PER_CLASS_FOR_FULL, None);
        let (epoch, finish) = (s.epoch_secs(Action::FullFineTune), s.finish_secs());
        // Room for one and a half epochs after the 30 s spent: one epoch.
        let d = decide(&situation(MIN_PER_CLASS_FOR_FULL, Some(30.0 + finish + 1.5 * epoch)));
        assert_eq!((d.action, d.epochs), (Action::FullFineTune, 2), "{}", d.reason);
        assert!(d.reason.contains("time budget"), "{}", d.reason);
        let d = decide(&situation(MIN_PER_CLASS_FOR_FULL, Some(30.0 + finish + 0.5 * epoch)));
        assert_eq!(d.action, Action::ProbeOnly, "{}", d.reason);
        assert!(d.reason.contains("time budget"));
        // A last-layers run pays its cache first.
        let s = situation(MIN_PER_CLASS_TO_FINE_TUNE, None);
        let need = s.setup_secs(Action::LastLayers) + s.epoch_secs(Action::LastLayers);
        let d = decide(&situation(MIN_PER_CLASS_TO_FINE_TUNE, Some(30.0 + s.finish_secs() + need * 0.9)));
        assert_eq!(d.action, Action::ProbeOnly, "{}", d.reason);
    }
}
