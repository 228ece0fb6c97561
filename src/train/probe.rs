//! A linear probe: multinomial logistic regression with L2 on standardised frozen features,
//! fitted to convergence with L-BFGS (the objective is convex), its strength chosen by stratified
//! cross-validation. Folding the standardisation into the weights gives an ordinary
//! classification head, so the result is a normal model that can also be fine-tuned further.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// Inverse regularisation strengths tried (scikit-learn's `C`: the objective is
/// ½‖W‖² + C·Σᵢ wᵢ·CEᵢ).
pub const C_GRID: [f64; 6] = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0];

/// A fitted head on raw (unstandardised) features: logits = W·f + b.
#[derive(Debug, Clone)]
pub struct Probe {
    /// classes × dim, row-major.
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    /// The chosen `C`.
    pub c: f64,
    /// Mean cross-validated accuracy of the chosen `C` (None when there was too little data to
    /// cross-validate).
    pub cv_accuracy: Option<f64>,
}

/// Class weights `n / (classes · n_c)` (scikit-learn's `balanced`), 1 for absent classes.
pub fn balanced_weights(labels: &[u32], classes: usize) -> Vec<f64> {
    let mut counts = vec![0usize; classes];
    for &l in labels {
        counts[l as usize] += 1;
    }
    counts.iter().map(|&n| if n == 0 { 1.0 } else { labels.len() as f64 / (classes as f64 * n as f64) }).collect()
}

/// Objective and gradient of weighted multinomial logistic regression with L2 on the weights
/// (not the bias), over standardised features `x` (n × d). Parameters: W (k × d) then b (k).
#[allow(clippy::too_many_arguments)]
fn objective(theta: &[f64], x: &[f64], y: &[u32], sample_w: &[f64], d: usize, k: usize, c: f64, grad: &mut [f64]) -> f64 {
    let n = y.len();
    let (w, b) = theta.split_at(k * d);
    grad.fill(0.0);
    let mut f = 0.0;
    let mut logits = vec![0f64; k];
    for i in 0..n {
        let xi = &x[i * d..(i + 1) * d];
        for (c_, l) in logits.iter_mut().enumerate() {
            *l = b[c_] + w[c_ * d..(c_ + 1) * d].iter().zip(xi).map(|(a, b)| a * b).sum::<f64>();
        }
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
        let lse = max + sum.ln();
        let wi = c * sample_w[i];
        f += wi * (lse - logits[y[i] as usize]);
        for c_ in 0..k {
            let g = wi * ((logits[c_] - lse).exp() - if c_ == y[i] as usize { 1.0 } else { 0.0 });
            for (gj, xj) in grad[c_ * d..(c_ + 1) * d].iter_mut().zip(xi) {
                *gj += g * xj;
            }
            grad[k * d + c_] += g;
        }
    }
    for (j, wj) in w.iter().enumerate() {
        f += 0.5 * wj * wj;
        grad[j] += wj;
    }
    f
}

/// Minimises a smooth convex function with L-BFGS (memory 10, Armijo backtracking).
fn lbfgs(mut theta: Vec<f64>, mut f_grad: impl FnMut(&[f64], &mut [f64]) -> f64, max_iter: usize, tol: f64) -> Vec<f64> {
    let m = 10;
    let dim = theta.len();
    let mut g = vec![0f64; dim];
    let mut f = f_grad(&theta, &mut g);
    let mut s_hist: Vec<Vec<f64>> = Vec::new();
    let mut y_hist: Vec<Vec<f64>> = Vec::new();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for _ in 0..max_iter {
        if g.iter().fold(0f64, |a, v| a.max(v.abs())) < tol {
            break;
        }
        // Two-loop recursion: direction = −H·g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(s_hist.len());
        for (s, y) in s_hist.iter().zip(&y_hist).rev() {
            let a = dot(s, &q) / dot(y, s);
            for (qi, yi) in q.iter_mut().zip(y) {
                *qi -= a * yi;
            }
            alphas.push(a);
        }
        if let (Some(s), Some(y)) = (s_hist.last(), y_hist.last()) {
            let gamma = dot(s, y) / dot(y, y);
            q.iter_mut().for_each(|v| *v *= gamma);
        }
        for ((s, y), a) in s_hist.iter().zip(&y_hist).zip(alphas.into_iter().rev()) {
            let beta = dot(y, &q) / dot(y, s);
            for (qi, si) in q.iter_mut().zip(s) {
                *qi += (a - beta) * si;
            }
        }
        let dir: Vec<f64> = q.iter().map(|v| -v).collect();
        let slope = dot(&dir, &g);
        if slope >= 0.0 {
            // Not a descent direction (numerical trouble): restart from steepest descent.
            s_hist.clear();
            y_hist.clear();
            continue;
        }
        let mut step = if s_hist.is_empty() { 1.0 / g.iter().map(|v| v * v).sum::<f64>().sqrt().max(1.0) } else { 1.0 };
        let mut g_new = vec![0f64; dim];
        let mut accepted = None;
        for _ in 0..40 {
            let cand: Vec<f64> = theta.iter().zip(&dir).map(|(t, d)| t + step * d).collect();
            let f_new = f_grad(&cand, &mut g_new);
            if f_new <= f + 1e-4 * step * slope {
                accepted = Some((cand, f_new));
                break;
            }
            step *= 0.5;
        }
        let Some((cand, f_new)) = accepted else { break };
        let s: Vec<f64> = cand.iter().zip(&theta).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
        let converged = (f - f_new).abs() <= 1e-12 * f.abs().max(1.0);
        if dot(&s, &y) > 1e-12 {
            s_hist.push(s);
            y_hist.push(y);
            if s_hist.len() > m {
                s_hist.remove(0);
                y_hist.remove(0);
            }
        }
        theta = cand;
        g = g_new;
        f = f_new;
        if converged {
            break;
        }
    }
    theta
}

/// Fits a probe with a given `C` on standardised features; returns W (k × d) and b.
fn fit_standardised(x: &[f64], y: &[u32], d: usize, k: usize, c: f64) -> Vec<f64> {
    let sample_w: Vec<f64> = {
        let cw = balanced_weights(y, k);
        y.iter().map(|&l| cw[l as usize]).collect()
    };
    lbfgs(vec![0.0; k * d + k], |t, g| objective(t, x, y, &sample_w, d, k, c, g), 1000, 1e-6)
}

fn predict(theta: &[f64], x: &[f64], d: usize, k: usize) -> Vec<u32> {
    let (w, b) = theta.split_at(k * d);
    x.chunks(d)
        .map(|xi| {
            (0..k)
                .map(|c| b[c] + w[c * d..(c + 1) * d].iter().zip(xi).map(|(a, b)| a * b).sum::<f64>())
                .enumerate()
                .fold((0u32, f64::NEG_INFINITY), |best, (c, v)| if v > best.1 { (c as u32, v) } else { best })
                .0
        })
        .collect()
}

/// Fits the probe on features (n × d, row-major) and labels, choosing `C` from [`C_GRID`] by
/// stratified k-fold cross-validation (k ≤ 5, limited by the smallest class).
pub fn fit(features: &[f32], labels: &[u32], classes: usize, seed: u64) -> Probe {
    fit_with_progress(features, labels, classes, seed, &mut |_, _| {})
}

/// [`fit`], reporting `(fits done, fits in all)` after each logistic-regression fit.
pub fn fit_with_progress(features: &[f32], labels: &[u32], classes: usize, seed: u64, progress: &mut dyn FnMut(usize, usize)) -> Probe {
    let n = labels.len();
    let d = features.len() / n.max(1);
    // Standardise each dimension (a constant one gets std 1, so it is simply ignored).
    let mut mean = vec![0f64; d];
    let mut std = vec![0f64; d];
    for row in features.chunks(d) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += f64::from(*v) / n as f64;
        }
    }
    for row in features.chunks(d) {
        for ((s, v), m) in std.iter_mut().zip(row).zip(&mean) {
            *s += (f64::from(*v) - m).powi(2) / n as f64;
        }
    }
    std.iter_mut().for_each(|s| *s = if *s > 1e-12 { s.sqrt() } else { 1.0 });
    let x: Vec<f64> = features.chunks(d).flat_map(|row| row.iter().zip(&mean).zip(&std).map(|((v, m), s)| (f64::from(*v) - m) / s)).collect();

    let min_class = (0..classes).map(|c| labels.iter().filter(|&&l| l as usize == c).count()).filter(|&n| n > 0).min().unwrap_or(0);
    let folds = min_class.min(5);
    let fits = if folds >= 2 { C_GRID.len() * folds + 1 } else { 1 };
    let mut fitted = 0;
    let (c, cv_accuracy) = if folds >= 2 {
        // Stratified folds: each class's examples are shuffled and dealt round-robin.
        let mut fold_of = vec![0usize; n];
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7072_6f62);
        for class in 0..classes as u32 {
            let mut idx: Vec<usize> = (0..n).filter(|&i| labels[i] == class).collect();
            idx.shuffle(&mut rng);
            for (j, i) in idx.into_iter().enumerate() {
                fold_of[i] = j % folds;
            }
        }
        let mut best = (C_GRID[0], -1.0);
        for &c in &C_GRID {
            let mut correct = 0;
            for f in 0..folds {
                let train: Vec<usize> = (0..n).filter(|&i| fold_of[i] != f).collect();
                let test: Vec<usize> = (0..n).filter(|&i| fold_of[i] == f).collect();
                let pick = |idx: &[usize]| -> (Vec<f64>, Vec<u32>) {
                    (idx.iter().flat_map(|&i| x[i * d..(i + 1) * d].iter().copied()).collect(), idx.iter().map(|&i| labels[i]).collect())
                };
                let (xt, yt) = pick(&train);
                let (xv, yv) = pick(&test);
                let theta = fit_standardised(&xt, &yt, d, classes, c);
                correct += predict(&theta, &xv, d, classes).iter().zip(&yv).filter(|(a, b)| a == b).count();
                fitted += 1;
                progress(fitted, fits);
            }
            let acc = correct as f64 / n as f64;
            // Strictly better only: among ties the stronger regularisation (earlier C) stays.
            if acc > best.1 {
                best = (c, acc);
            }
        }
        (best.0, Some(best.1))
    } else {
        (1.0, None)
    };
    let theta = fit_standardised(&x, labels, d, classes, c);
    progress(fits, fits);
    // Fold the standardisation in: W' = W / σ, b' = b − W'·μ.
    let (w, b) = theta.split_at(classes * d);
    let mut weight = vec![0f32; classes * d];
    let mut bias = vec![0f32; classes];
    for k in 0..classes {
        let mut shift = 0.0;
        for j in 0..d {
            let wj = w[k * d + j] / std[j];
            weight[k * d + j] = wj as f32;
            shift += wj * mean[j];
        }
        bias[k] = (b[k] - shift) as f32;
    }
    Probe { weight, bias, c, cv_accuracy }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separates_shifted_gaussians_and_folds_the_scaling_into_the_head() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let d = 6;
        let mut feats = vec![];
        let mut labels = vec![];
        for i in 0..90 {
            let class = (i % 3) as u32;
            for j in 0..d {
                // Large offset and scale on every dimension: standardisation matters.
                let noise: f64 = rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng);
                let signal = if j == class as usize { 2.0 } else { 0.0 };
                feats.push((100.0 + 50.0 * (signal + noise)) as f32);
            }
            labels.push(class);
        }
        let probe = fit(&feats, &labels, 3, 7);
        assert!(probe.cv_accuracy.unwrap() > 0.8, "{probe:?}");
        let correct = feats
            .chunks(d)
            .zip(&labels)
            .filter(|(f, l)| {
                let logits: Vec<f32> = (0..3).map(|k| probe.bias[k] + (0..d).map(|j| probe.weight[k * d + j] * f[j]).sum::<f32>()).collect();
                let arg = (0..3).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap() as u32;
                arg == **l
            })
            .count();
        assert!(correct >= 80, "{correct}/90 on raw features");
    }

    #[test]
    fn lbfgs_finds_a_quadratic_minimum() {
        let target = [3.0, -2.0, 0.5];
        let theta = lbfgs(vec![0.0; 3], |t, g| {
            let mut f = 0.0;
            for i in 0..3 {
                let scale = (i + 1) as f64 * 10.0;
                f += 0.5 * scale * (t[i] - target[i]).powi(2);
                g[i] = scale * (t[i] - target[i]);
            }
            f
        }, 200, 1e-9);
        for i in 0..3 {
            assert!((theta[i] - target[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn balanced_weights_follow_scikit_learn() {
        assert_eq!(balanced_weights(&[0, 0, 0, 1], 2), vec![4.0 / 6.0, 2.0]);
    }
}
