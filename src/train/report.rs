//! Classification metrics: accuracy, precision / recall / F1 per class and macro-averaged, and the
//! confusion matrix (rows: true class, columns: predicted class).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Figures of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Number of examples whose true class this is.
    pub support: u64,
}

/// An evaluation block, as `/jobs/{id}/metrics` and `vitforge eval` report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Mean cross-entropy (without label smoothing).
    pub loss: f64,
    pub accuracy: f64,
    /// Macro averages over the classes present in the truth or the predictions (as
    /// scikit-learn with `zero_division=0`).
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub per_class: BTreeMap<String, ClassMetrics>,
    pub confusion_matrix: Vec<Vec<u64>>,
    /// Expected calibration error: the gap between the top-1 score and accuracy, averaged over
    /// 10 equal-width bins of the score, weighted by the share of examples in each.
    #[serde(default)]
    pub ece: f64,
    /// Mean top-1 score (probability of the predicted class).
    #[serde(default)]
    pub mean_score: f64,
}

/// Bins of [`expected_calibration_error`].
pub const ECE_BINS: usize = 10;

/// The expected calibration error of top-1 `scores` against whether each prediction was right.
pub fn expected_calibration_error(scores: &[f64], correct: &[bool]) -> f64 {
    let n = scores.len();
    if n == 0 {
        return 0.0;
    }
    let mut bins = [(0usize, 0.0f64, 0usize); ECE_BINS];
    for (&s, &ok) in scores.iter().zip(correct) {
        let b = ((s * ECE_BINS as f64) as usize).min(ECE_BINS - 1);
        bins[b].0 += 1;
        bins[b].1 += s;
        bins[b].2 += usize::from(ok);
    }
    bins.iter()
        .filter(|b| b.0 > 0)
        .map(|&(count, sum, right)| (count as f64 / n as f64) * (sum / count as f64 - right as f64 / count as f64).abs())
        .sum()
}

impl EvalReport {
    /// Computes the report from true and predicted class indices, the top-1 scores (empty when
    /// unknown: calibration figures are then 0) and the summed loss.
    pub fn compute(labels: &[String], truth: &[u32], predicted: &[u32], scores: &[f64], loss_sum: f64) -> Self {
        let k = labels.len();
        let mut cm = vec![vec![0u64; k]; k];
        for (&t, &p) in truth.iter().zip(predicted) {
            cm[t as usize][p as usize] += 1;
        }
        let n = truth.len() as u64;
        let correct: u64 = (0..k).map(|i| cm[i][i]).sum();
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let mut per_class = BTreeMap::new();
        let (mut sp, mut sr, mut sf, mut counted) = (0.0, 0.0, 0.0, 0u32);
        for (i, label) in labels.iter().enumerate() {
            let tp = cm[i][i];
            let support: u64 = cm[i].iter().sum();
            let predicted_i: u64 = (0..k).map(|r| cm[r][i]).sum();
            let precision = ratio(tp, predicted_i);
            let recall = ratio(tp, support);
            let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
            if support > 0 || predicted_i > 0 {
                sp += precision;
                sr += recall;
                sf += f1;
                counted += 1;
            }
            per_class.insert(label.clone(), ClassMetrics { precision, recall, f1, support });
        }
        let mean = |s: f64| if counted == 0 { 0.0 } else { s / f64::from(counted) };
        Self {
            loss: if n == 0 { 0.0 } else { loss_sum / n as f64 },
            accuracy: ratio(correct, n),
            precision: mean(sp),
            recall: mean(sr),
            f1: mean(sf),
            per_class,
            confusion_matrix: cm,
            ece: expected_calibration_error(scores, &truth.iter().zip(predicted).map(|(t, p)| t == p).collect::<Vec<_>>()),
            mean_score: if scores.is_empty() { 0.0 } else { scores.iter().sum::<f64>() / scores.len() as f64 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_hand_computed_figures() {
        let labels = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        // truth a a a b b c ; predicted a a b b c c
        let r = EvalReport::compute(&labels, &[0, 0, 0, 1, 1, 2], &[0, 0, 1, 1, 2, 2], &[], 6.0);
        assert_eq!(r.confusion_matrix, vec![vec![2, 1, 0], vec![0, 1, 1], vec![0, 0, 1]]);
        assert!((r.accuracy - 4.0 / 6.0).abs() < 1e-12);
        let a = &r.per_class["a"];
        assert_eq!((a.precision, a.support), (1.0, 3));
        assert!((a.recall - 2.0 / 3.0).abs() < 1e-12);
        let b = &r.per_class["b"];
        assert_eq!((b.precision, b.recall, b.f1), (0.5, 0.5, 0.5));
        let c = &r.per_class["c"];
        assert_eq!((c.precision, c.recall), (0.5, 1.0));
        let macro_p = (1.0 + 0.5 + 0.5) / 3.0;
        assert!((r.precision - macro_p).abs() < 1e-12);
        assert!((r.loss - 1.0).abs() < 1e-12);
    }

    #[test]
    fn classes_absent_from_truth_and_predictions_do_not_dilute_the_macro_average() {
        let labels = vec!["a".to_string(), "b".to_string(), "z".to_string()];
        let r = EvalReport::compute(&labels, &[0, 1], &[0, 1], &[], 0.0);
        assert_eq!(r.f1, 1.0);
        assert_eq!(r.per_class["z"].support, 0);
    }

    #[test]
    fn calibration_error_is_the_weighted_gap_between_score_and_accuracy() {
        // Two bins: scores 0.95 (4 examples, 3 right) and 0.55 (2 examples, 1 right).
        let scores = [0.95, 0.95, 0.95, 0.95, 0.55, 0.55];
        let correct = [true, true, true, false, true, false];
        let expected = 4.0 / 6.0 * (0.95f64 - 0.75).abs() + 2.0 / 6.0 * (0.55f64 - 0.5).abs();
        assert!((expected_calibration_error(&scores, &correct) - expected).abs() < 1e-12);
        assert_eq!(expected_calibration_error(&[1.0, 1.0], &[true, true]), 0.0);
        assert_eq!(expected_calibration_error(&[], &[]), 0.0);
    }
}
