//! What the `auto` recipe does after its probe epoch, decided from the data and the time budget
//! by the measurements of `bench/QUALITY.md` (a size curve on real photos): stop after the probe
//! where fine-tuning does not pay, else fine-tune the whole network from the probe head (LP-FT)
//! for as many epochs as the evidence supports and the budget allows, with early stopping.

use serde::{Deserialize, Serialize};

use super::hyperparams::{TrainMode, TrainParams};

/// Fewest training images per class at which fine-tuning after the probe paid in our
/// measurements (bench/QUALITY.md, "Size curve"); below it the probe alone was as accurate.
pub const MIN_PER_CLASS_TO_FINE_TUNE: usize = 100;

/// Fine-tune epochs after the probe: beyond two, validation stopped improving in our measurements.
pub const MAX_FINE_TUNE_EPOCHS: u32 = 2;

/// A full training step costs about this many forward passes per image (forward, backward
/// through every layer, the optimiser), measured with `vitforge bench` (small/16: 10.3 img/s
/// inference, 2.83 img/s training step on the same machine).
pub const TRAIN_COST_IN_FORWARDS: f64 = 3.6;

/// What `auto` does after the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Keep the probe head: the run ends after epoch 1.
    ProbeOnly,
    /// Fine-tune every parameter from the probe head (LP-FT).
    FullFineTune,
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
    /// Images per second of the frozen network's forward pass, measured in the probe epoch.
    pub forward_per_s: f64,
    /// Seconds the run has taken so far.
    pub elapsed_s: f64,
    /// The job's time budget, in seconds.
    pub budget_s: Option<f64>,
}

impl Situation {
    /// Seconds one fine-tune epoch should take (training, then validation).
    pub fn epoch_secs(&self) -> f64 {
        let train: usize = self.per_class.iter().sum();
        let rate = self.forward_per_s.max(1e-6);
        train as f64 * TRAIN_COST_IN_FORWARDS / rate + self.validation_images as f64 / rate
    }

    /// Seconds the end of a run takes after its last epoch (calibration on validation, test).
    pub fn finish_secs(&self) -> f64 {
        (self.validation_images + self.test_images) as f64 / self.forward_per_s.max(1e-6)
    }
}

/// What to do after the probe.
pub fn decide(s: &Situation) -> Decision {
    let smallest = s.per_class.iter().copied().min().unwrap_or(0);
    let largest = s.per_class.iter().copied().max().unwrap_or(0);
    let probe_only = |reason: String| Decision { action: Action::ProbeOnly, epochs: 1, reason };
    if smallest < MIN_PER_CLASS_TO_FINE_TUNE {
        return probe_only(format!(
            "{smallest} training images in the smallest class: below {MIN_PER_CLASS_TO_FINE_TUNE} per class, fine-tuning after the probe \
             did not beat the probe alone in our measurements (bench/QUALITY.md)"
        ));
    }
    let mut epochs = MAX_FINE_TUNE_EPOCHS;
    let mut limited = String::new();
    if let Some(budget) = s.budget_s {
        let left = budget - s.elapsed_s - s.finish_secs();
        let fit = (left / s.epoch_secs()).floor().max(0.0) as u32;
        if fit == 0 {
            return probe_only(format!(
                "fine-tuning would pay at {smallest}+ images per class, but one epoch (about {:.0} s) does not fit the {:.0} s left of \
                 the time budget",
                s.epoch_secs(),
                left.max(0.0)
            ));
        }
        if fit < epochs {
            epochs = fit;
            limited = format!("; {fit} of {MAX_FINE_TUNE_EPOCHS} epochs fit the time budget");
        }
    }
    let imbalance = if smallest > 0 { largest as f64 / smallest as f64 } else { f64::INFINITY };
    Decision {
        action: Action::FullFineTune,
        epochs: 1 + epochs,
        reason: format!(
            "{smallest} to {largest} training images per class (imbalance {imbalance:.1}:1): from {MIN_PER_CLASS_TO_FINE_TUNE} per class, \
             fine-tuning the whole network from the probe head beat the probe alone in our measurements (bench/QUALITY.md); up to \
             {epochs} epoch(s) at learning rate {:.0e}, the best kept by validation{limited}",
            super::hyperparams::AUTO_LEARNING_RATE
        ),
    }
}

/// The run's parameters once the decision is taken.
pub fn apply(p: &TrainParams, d: &Decision) -> TrainParams {
    let mut out = p.clone();
    out.epochs = d.epochs;
    if d.action == Action::FullFineTune {
        out.train_mode = TrainMode::Full;
        out.trainable_layers = None;
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
            forward_per_s: 10.0,
            elapsed_s: 30.0,
            budget_s,
        }
    }

    #[test]
    fn small_data_keeps_the_probe_and_larger_data_fine_tunes() {
        let d = decide(&situation(40, None));
        assert_eq!((d.action, d.epochs), (Action::ProbeOnly, 1), "{}", d.reason);
        let d = decide(&situation(300, None));
        assert_eq!((d.action, d.epochs), (Action::FullFineTune, 1 + MAX_FINE_TUNE_EPOCHS), "{}", d.reason);
        assert!(d.reason.contains("300 to 310"), "{}", d.reason);
    }

    #[test]
    fn the_time_budget_limits_the_epochs() {
        // An epoch of 610 images: 610 × 3.6 / 10 + 20 / 10 = 221.6 s; the finish 2 s.
        let s = situation(300, Some(30.0 + 2.0 + 250.0));
        let d = decide(&s);
        assert_eq!((d.action, d.epochs), (Action::FullFineTune, 2), "{}", d.reason);
        let d = decide(&situation(300, Some(100.0)));
        assert_eq!(d.action, Action::ProbeOnly, "{}", d.reason);
        assert!(d.reason.contains("time budget"));
    }
}
