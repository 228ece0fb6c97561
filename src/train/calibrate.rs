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

/// Fewest validation mistakes a temperature is fitted on. Without mistakes the likelihood only
/// grows as the scores sharpen, so the fit runs to the end of its range (a temperature of 0.05 on
/// 80 validation photos that were all right, which made the test's calibration error worse:
/// bench/QUALITY.md, "Size curve"); with one or two it rests on those few images.
pub const MIN_VALIDATION_MISTAKES: usize = 3;

/// The range searched for the scale (1/temperature).
const SCALE_RANGE: (f64, f64) = (0.05, 20.0);

/// What calibration did, with the expected calibration error before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The temperature the logits are divided by (1 when not fitted).
    pub temperature: f64,
    /// Whether it was fitted (false: see `reason`).
    pub fitted: bool,
    /// Why no temperature was fitted.
    #[serde(default)]
    pub reason: Option<String>,
    pub validation_ece_before: f64,
    pub validation_ece_after: f64,
    /// On the test split, when the data has one.
    pub test_ece_before: Option<f64>,
    pub test_ece_after: Option<f64>,
}

/// The scale (1/temperature) that minimises the validation NLL, or `None` when the minimum lies
/// at an end of the range searched (the validation split does not pin a temperature down). The
/// NLL is convex in the scale (a log-sum-exp of linear functions minus a linear one), so a
/// golden-section search finds it.
pub fn fit_scale(validation: &Logits) -> Option<f64> {
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
    let scale = (a * b).sqrt();
    let at_an_end = scale <= SCALE_RANGE.0 * 1.01 || scale >= SCALE_RANGE.1 / 1.01;
    (!at_an_end).then_some(scale)
}

/// The scale to fold into the head, or why there is none: the validation split must pin a
/// temperature down ([`cannot_fit`], [`fit_scale`]). The fit minimises the likelihood, not the
/// binned calibration error, which on a few dozen validation images is noisier: in the size
/// curve (bench/QUALITY.md) a temperature of 2.0 raised the validation error from 0.024 to 0.034
/// and lowered the test error from 0.041 to 0.018.
pub fn choose(validation: &Logits) -> Result<f64, String> {
    if let Some(reason) = cannot_fit(validation) {
        return Err(reason);
    }
    fit_scale(validation).ok_or_else(|| "the validation likelihood has no minimum inside temperatures 0.05 to 20".to_string())
}

/// Why the temperature cannot be fitted on this validation split, if it cannot.
pub fn cannot_fit(validation: &Logits) -> Option<String> {
    let n = validation.rows.len();
    if n < MIN_VALIDATION_IMAGES {
        return Some(format!("{n} validation images, fewer than {MIN_VALIDATION_IMAGES}"));
    }
    let mistakes = validation.wrong();
    if mistakes < MIN_VALIDATION_MISTAKES {
        return Some(format!(
            "{mistakes} of {n} validation images mistaken, fewer than {MIN_VALIDATION_MISTAKES}: too few to tell how confident the model should be"
        ));
    }
    None
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
        assert_eq!(cannot_fit(&logits), None);
        let scale = fit_scale(&logits).expect("a temperature");
        let p = 1.0 / (1.0 + (-4.6 * scale).exp());
        assert!((p - 0.75).abs() < 0.005, "calibrated score {p} (scale {scale})");
        let labels = vec!["a".to_string(), "b".to_string()];
        assert!(logits.report(&labels, scale).ece < 0.01);
        assert!(logits.report(&labels, 1.0).ece > 0.2);
    }

    /// A validation split without mistakes (or with one or two) gives no temperature: the
    /// likelihood would only grow with sharper scores, to the end of the range.
    #[test]
    fn no_temperature_without_mistakes() {
        let rows: Vec<Vec<f32>> = (0..80).map(|i| if i % 2 == 0 { vec![2.0, 0.0] } else { vec![0.0, 2.0] }).collect();
        let truth: Vec<u32> = (0..80).map(|i| i % 2).collect();
        let mut logits = Logits { rows, truth };
        assert_eq!(fit_scale(&logits), None, "the minimum is at the end of the range");
        assert!(cannot_fit(&logits).unwrap().contains("0 of 80"), "{:?}", cannot_fit(&logits));
        logits.truth[0] = 1;
        logits.truth[2] = 1;
        assert!(cannot_fit(&logits).unwrap().contains("2 of 80"));
        logits.truth[4] = 1;
        assert_eq!(cannot_fit(&logits), None);
        assert!(fit_scale(&logits).is_some());
        logits.rows.truncate(19);
        logits.truth.truncate(19);
        assert!(cannot_fit(&logits).unwrap().contains("fewer than 20"));
    }

    /// Scores that are already right (75% where three in four are right, 95% where 19 in 20
    /// are) keep their temperature.
    #[test]
    fn a_calibrated_model_keeps_its_scores() {
        let mut rows = vec![];
        let mut truth = vec![];
        for (margin, right, n) in [(3f32.ln(), 30, 40), (19f32.ln(), 38, 40)] {
            for i in 0..n {
                rows.push(vec![margin, 0.0]);
                truth.push(u32::from(i >= right));
            }
        }
        let logits = Logits { rows, truth };
        let scale = choose(&logits).expect("a temperature");
        assert!((scale - 1.0).abs() < 0.01, "{scale}");
    }
}
