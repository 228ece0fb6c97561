//! Temperature scaling (Guo et al., 2017): one scalar that divides the logits, fitted on the
//! validation split by minimising the negative log-likelihood, so that a score of 0.9 is right
//! about 90% of the time. It changes no prediction (the order of the logits stays), and it is
//! folded into the classification head, so the exported model gives the calibrated scores in
//! `transformers` too.

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::TrainError;
use super::eval::Logits;
use crate::model::LoadedModel;
use crate::model::weights::keys;

/// Fewest validation images a temperature is fitted on; with fewer it would chase noise.
pub const MIN_VALIDATION_IMAGES: usize = 20;

/// The range searched for the scale (1/temperature).
const SCALE_RANGE: (f64, f64) = (0.05, 20.0);

/// What calibration did, with the expected calibration error before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The temperature the logits are divided by (1 when not fitted).
    pub temperature: f64,
    /// Whether it was fitted (false: too few validation images).
    pub fitted: bool,
    pub validation_ece_before: f64,
    pub validation_ece_after: f64,
    /// On the test split, when the data has one.
    pub test_ece_before: Option<f64>,
    pub test_ece_after: Option<f64>,
}

/// The scale (1/temperature) that minimises the validation NLL. The NLL is convex in the scale
/// (a log-sum-exp of linear functions minus a linear one), so a golden-section search finds it.
pub fn fit_scale(validation: &Logits) -> f64 {
    let (mut a, mut b) = SCALE_RANGE;
    // Search in log space: the NLL's curvature varies over orders of magnitude of the scale.
    let (mut la, mut lb) = (a.ln(), b.ln());
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    let f = |l: f64| validation.nll(l.exp());
    let (mut c, mut d) = (lb - phi * (lb - la), la + phi * (lb - la));
    let (mut fc, mut fd) = (f(c), f(d));
    for _ in 0..80 {
        if fc < fd {
            lb = d;
            (d, fd) = (c, fc);
            c = lb - phi * (lb - la);
            fc = f(c);
        } else {
            la = c;
            (c, fc) = (d, fd);
            d = la + phi * (lb - la);
            fd = f(d);
        }
    }
    (a, b) = (la.exp(), lb.exp());
    ((a * b).sqrt()).clamp(SCALE_RANGE.0, SCALE_RANGE.1)
}

/// Multiplies the classification head by `scale`, so the model's logits are the old ones times
/// `scale` (the softmax of logits / temperature).
pub fn fold_into_head(model: &LoadedModel, scale: f64) -> Result<(), TrainError> {
    let mut head = BTreeMap::new();
    for name in [keys::HEAD_WEIGHT, keys::HEAD_BIAS] {
        let t: Tensor = model.params.var(name)?.as_detached_tensor();
        head.insert(name.to_string(), (t * scale)?);
    }
    model.params.set_some(&head)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_over_confident_model_is_cooled_and_a_right_one_left_alone() {
        // Logits that say 99% where the truth is right 3 times in 4: the fitted temperature
        // brings the score down to about 75%.
        let rows: Vec<Vec<f32>> = (0..400).map(|_| vec![4.6, 0.0]).collect();
        let truth: Vec<u32> = (0..400).map(|i| if i % 4 == 3 { 1 } else { 0 }).collect();
        let logits = Logits { rows, truth };
        let scale = fit_scale(&logits);
        let p = 1.0 / (1.0 + (-4.6 * scale).exp());
        assert!((p - 0.75).abs() < 0.005, "calibrated score {p} (scale {scale})");
        let labels = vec!["a".to_string(), "b".to_string()];
        assert!(logits.report(&labels, scale).ece < 0.01);
        assert!(logits.report(&labels, 1.0).ece > 0.2);
    }
}
