//! The phases of a fine-tune and their progress: what a job, its event stream and the command
//! line's progress bar show while it runs.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// What a job is doing, in the order the phases first occur.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reading the base model (from disk or the hub) and the checkpoint to resume from.
    Loading,
    /// Running the frozen part of the network over images once (the probe's features, or the
    /// cached input of the trainable part); `done` / `total` count images.
    Features,
    /// Fitting the probe head: `done` / `total` count logistic-regression fits.
    Probe,
    /// Gradient steps: `done` / `total` count optimiser steps over the whole run.
    Training,
    /// Evaluating on the validation (or test) split: `done` / `total` count images.
    Validating,
    /// Writing the checkpoint and the model.
    Saving,
}

impl Phase {
    /// The name in JSON and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Loading => "loading",
            Phase::Features => "features",
            Phase::Probe => "probe",
            Phase::Training => "training",
            Phase::Validating => "validating",
            Phase::Saving => "saving",
        }
    }

    /// Whether a rate (per second of `done`) means something for the phase at `total`: images
    /// for `features`, `training` and `validating`, and bytes for `loading` while it counts a
    /// download's (a total over 1).
    pub fn has_rate(self, total: u64) -> bool {
        matches!(self, Phase::Features | Phase::Training | Phase::Validating) || (self == Phase::Loading && total > 1)
    }
}

impl std::str::FromStr for Phase {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "loading" => Phase::Loading,
            "features" => Phase::Features,
            "probe" => Phase::Probe,
            "training" => Phase::Training,
            "validating" => Phase::Validating,
            "saving" => Phase::Saving,
            other => return Err(format!("unknown phase '{other}'")),
        })
    }
}

/// Measures the rate of the phase under way: `done` per second since the phase began.
#[derive(Debug)]
pub struct PhaseClock {
    phase: Option<Phase>,
    started: Instant,
    first_done: u64,
}

impl Default for PhaseClock {
    fn default() -> Self {
        Self { phase: None, started: Instant::now(), first_done: 0 }
    }
}

impl PhaseClock {
    /// Records `done` of `phase`; returns whether the phase just changed, and the rate where
    /// the phase has one and enough time has passed to tell.
    pub fn update(&mut self, phase: Phase, done: u64, total: u64) -> (bool, Option<f64>) {
        let changed = self.phase != Some(phase);
        if changed {
            *self = Self { phase: Some(phase), started: Instant::now(), first_done: done };
        }
        let secs = self.started.elapsed().as_secs_f64();
        let rate = (phase.has_rate(total) && secs > 0.05 && done >= self.first_done).then(|| (done - self.first_done) as f64 / secs);
        (changed, rate)
    }
}
