//! A linear probe: multinomial logistic regression with L2 on standardised frozen features,
//! fitted to convergence with L-BFGS (the objective is convex), its strength chosen by stratified
//! cross-validation (the held-out images' log-loss). Folding the standardisation into the weights gives an ordinary
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
    /// The chosen `C`'s cross-validated scores (None when there was too little data to
    /// cross-validate).
    pub cv: Option<CvScore>,
}

/// One `C`'s scores in cross-validation, over the images (each judged once, by the fit that did
/// not see it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CvScore {
    pub c: f64,
    /// The share of images classified right.
    pub accuracy: f64,
    /// The mean cross-entropy of the images' labels (what chooses `C`: see [`choose`]).
    pub log_loss: f64,
}

/// The `C` whose cross-validated log-loss is lowest, the stronger regularisation (earlier in the
/// grid) among exact ties.
///
/// Not the accuracy: counted in images, it ties often on a few dozen images and moves by whole
/// images when the features move a little. Training in bf16 moved it so on two splits of the
/// 100 cat and dog photos, which then chose another `C`, started fine-tuning from another head
/// and ended 6–13 points apart from f32 on 1,000 held-out photos (bench/RESULTS.md). The loss
/// moves smoothly with the features.
pub fn choose(scores: &[CvScore]) -> CvScore {
    *scores.iter().reduce(|best, s| if s.log_loss < best.log_loss { s } else { best }).expect("a grid of C")
}

/// Class weights `n / (classes · n_c)` (scikit-learn's `balanced`), 1 for absent classes.
pub fn balanced_weights(labels: &[u32], classes: usize) -> Vec<f64> {
    let mut counts = vec![0usize; classes];
    for &l in labels {
        counts[l as usize] += 1;
    }
    counts.iter().map(|&n| if n == 0 { 1.0 } else { labels.len() as f64 / (classes as f64 * n as f64) }).collect()
}

/// `c (m × n) = a · b` in f64 (the `gemm` crate, one thread: the cross-validation runs its fits
/// side by side instead), every matrix given by its data and (row, column) strides.
#[allow(clippy::too_many_arguments)]
fn matmul(m: usize, n: usize, k: usize, a: &[f64], a_strides: (usize, usize), b: &[f64], b_strides: (usize, usize), c: &mut [f64]) {
    let last = |rows: usize, cols: usize, (rs, cs): (usize, usize)| if rows == 0 || cols == 0 { 0 } else { (rows - 1) * rs + (cols - 1) * cs + 1 };
    assert!(a.len() >= last(m, k, a_strides) && b.len() >= last(k, n, b_strides) && c.len() >= m * n, "matmul: a view runs past its slice");
    // SAFETY: every view was checked to lie inside its slice just above; `c` is borrowed
    // mutably, so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_strides.1 as isize,
            a_strides.0 as isize,
            b.as_ptr(),
            b_strides.1 as isize,
            b_strides.0 as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Logits (n × k) = X·Wᵀ + b for standardised features `x` (n × d) and parameters W (k × d), b (k).
fn logits(theta: &[f64], x: &[f64], d: usize, k: usize) -> Vec<f64> {
    let n = x.len() / d.max(1);
    let (w, b) = theta.split_at(k * d);
    let mut out = vec![0f64; n * k];
    matmul(n, k, d, x, (d, 1), w, (1, d), &mut out);
    for row in out.chunks_mut(k.max(1)) {
        row.iter_mut().zip(b).for_each(|(l, bc)| *l += bc);
    }
    out
}

/// Objective and gradient of weighted multinomial logistic regression with L2 on the weights
/// (not the bias), over standardised features `x` (n × d). Parameters: W (k × d) then b (k).
/// The two products (logits = X·Wᵀ, ∇W = Gᵀ·X) are matrix products: they are nearly all its cost.
#[allow(clippy::too_many_arguments)]
fn objective(theta: &[f64], x: &[f64], y: &[u32], sample_w: &[f64], d: usize, k: usize, c: f64, grad: &mut [f64]) -> f64 {
    let n = y.len();
    let w = &theta[..k * d];
    // Turn the logits into the per-example gradient of the loss w.r.t. them, in place.
    let mut g = logits(theta, x, d, k);
    let mut f = 0.0;
    for (i, row) in g.chunks_mut(k).enumerate() {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|l| (l - max).exp()).sum();
        let lse = max + sum.ln();
        let wi = c * sample_w[i];
        let label = y[i] as usize;
        f += wi * (lse - row[label]);
        for (c_, l) in row.iter_mut().enumerate() {
            *l = wi * ((*l - lse).exp() - if c_ == label { 1.0 } else { 0.0 });
        }
    }
    let (grad_w, grad_b) = grad.split_at_mut(k * d);
    matmul(k, d, n, &g, (1, k), x, (d, 1), grad_w);
    grad_b.fill(0.0);
    for row in g.chunks(k) {
        grad_b.iter_mut().zip(row).for_each(|(gb, v)| *gb += v);
    }
    for (gj, wj) in grad_w.iter_mut().zip(w) {
        f += 0.5 * wj * wj;
        *gj += wj;
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

/// Scores every `C` of [`C_GRID`] by stratified `folds`-fold cross-validation on standardised
/// features, in the grid's order ([`choose`] picks one). The first `n` rows are the images; any
/// rows after them are other views of the same images, `n` per view in the same order: a view
/// trains with its image's fold and is never validated on, so no image is judged by a copy of
/// itself.
/// `groups` (empty, or one per image) names each image's file: images of one file (copies in the
/// dataset, under one class or several) share a fold too. The grid's fits are independent, so
/// they run side by side on rayon's threads; `progress` hears the number done after each one.
#[allow(clippy::too_many_arguments)]
fn cross_validate(
    x: &[f64],
    labels: &[u32],
    groups: &[usize],
    n: usize,
    d: usize,
    classes: usize,
    folds: usize,
    seed: u64,
    progress: &mut dyn FnMut(usize),
) -> Vec<CvScore> {
    use rayon::prelude::*;
    use std::collections::{HashMap, HashSet};
    let rows = labels.len();
    // Stratified folds: each class's files are shuffled and dealt round-robin (a file dealt
    // under an earlier class keeps its fold). With no copies, a file is an image.
    let group = |i: usize| groups.get(i).copied().unwrap_or(i);
    let mut fold_of_group: HashMap<usize, usize> = HashMap::new();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7072_6f62);
    for class in 0..classes as u32 {
        let mut seen = HashSet::new();
        let mut files: Vec<usize> =
            (0..n).filter(|&i| labels[i] == class).map(group).filter(|g| !fold_of_group.contains_key(g) && seen.insert(*g)).collect();
        files.shuffle(&mut rng);
        for (j, g) in files.into_iter().enumerate() {
            fold_of_group.insert(g, j % folds);
        }
    }
    let fold_of: Vec<usize> = (0..n).map(|i| fold_of_group[&group(i)]).collect();
    let pick = |keep: &dyn Fn(usize) -> bool, upto: usize| -> (Vec<f64>, Vec<u32>) {
        let idx: Vec<usize> = (0..upto).filter(|&i| keep(fold_of[i % n])).collect();
        (idx.iter().flat_map(|&i| x[i * d..(i + 1) * d].iter().copied()).collect(), idx.iter().map(|&i| labels[i]).collect())
    };
    let tasks: Vec<(f64, usize)> = C_GRID.iter().flat_map(|&c| (0..folds).map(move |f| (c, f))).collect();
    let fit_one = |&(c, f): &(f64, usize)| -> (usize, f64) {
        let (xt, yt) = pick(&|fold| fold != f, rows);
        let (xv, yv) = pick(&|fold| fold == f, n);
        let theta = fit_standardised(&xt, &yt, d, classes, c);
        scores(&theta, &xv, &yv, d, classes)
    };
    // Inside a rayon task (or with one thread) this thread's waiting could starve the pool:
    // fit one after the other there.
    let scored: Vec<(usize, f64)> = if rayon::current_thread_index().is_some() || rayon::current_num_threads() < 2 {
        tasks.iter().enumerate().map(|(i, t)| (fit_one(t), progress(i + 1)).0).collect()
    } else {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|scope| {
            let fits = scope.spawn(move || {
                tasks
                    .par_iter()
                    .map(|t| {
                        let right = fit_one(t);
                        // The receiver outlives every fit; a send cannot fail.
                        let _ = done_tx.send(());
                        right
                    })
                    .collect()
            });
            for (done, ()) in done_rx.iter().enumerate() {
                progress(done + 1);
            }
            fits.join().expect("a probe fit panicked")
        })
    };
    C_GRID
        .iter()
        .zip(scored.chunks(folds))
        .map(|(&c, folds)| CvScore {
            c,
            accuracy: folds.iter().map(|f| f.0).sum::<usize>() as f64 / n as f64,
            log_loss: folds.iter().map(|f| f.1).sum::<f64>() / n as f64,
        })
        .collect()
}

/// Of validation rows `x` with labels `y`: how many the probe `theta` classifies right, and the
/// sum of their cross-entropies.
fn scores(theta: &[f64], x: &[f64], y: &[u32], d: usize, k: usize) -> (usize, f64) {
    let mut right = 0;
    let mut loss = 0.0;
    for (row, &label) in logits(theta, x, d, k).chunks(k).zip(y) {
        let (arg, max) = row.iter().enumerate().fold((0, f64::NEG_INFINITY), |best, (c, &v)| if v > best.1 { (c, v) } else { best });
        right += usize::from(arg == label as usize);
        loss += max + row.iter().map(|l| (l - max).exp()).sum::<f64>().ln() - row[label as usize];
    }
    (right, loss)
}

/// Fits the probe on features (n × d, row-major) and labels, choosing `C` from [`C_GRID`] by
/// stratified k-fold cross-validation (k ≤ 5, limited by the smallest class).
pub fn fit(features: &[f32], labels: &[u32], classes: usize, seed: u64) -> Probe {
    fit_with_progress(features, labels, classes, seed, &mut |_, _| {})
}

/// [`fit`], reporting `(fits done, fits in all)` after each logistic-regression fit.
pub fn fit_with_progress(features: &[f32], labels: &[u32], classes: usize, seed: u64, progress: &mut dyn FnMut(usize, usize)) -> Probe {
    fit_with_views(features, &[], labels, &[], classes, seed, progress)
}

/// [`fit_with_progress`] on the images' features and those of other views of them (mirror
/// images, crops): `views` holds whole blocks of n × d, each in the images' order. The views
/// train with their images (the cross-validation keeps each with its image's fold and validates
/// on the images alone). `groups` is empty, or names each image's file (the same number for the
/// images that are one file): the cross-validation keeps a file's copies in one fold.
pub fn fit_with_views(
    images: &[f32],
    views: &[f32],
    labels: &[u32],
    groups: &[usize],
    classes: usize,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Probe {
    let n = labels.len();
    let d = images.len() / n.max(1);
    let copies = 1 + views.len() / (n * d).max(1);
    let features: Vec<f32> = [images, views].concat();
    let all_labels: Vec<u32> = labels.iter().copied().cycle().take(n * copies).collect();
    let (features, labels) = (&features[..], &all_labels[..]);
    let rows = labels.len();
    // Standardise each dimension (a constant one gets std 1, so it is simply ignored).
    let mut mean = vec![0f64; d];
    let mut std = vec![0f64; d];
    for row in features.chunks(d) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += f64::from(*v) / rows as f64;
        }
    }
    for row in features.chunks(d) {
        for ((s, v), m) in std.iter_mut().zip(row).zip(&mean) {
            *s += (f64::from(*v) - m).powi(2) / rows as f64;
        }
    }
    std.iter_mut().for_each(|s| *s = if *s > 1e-12 { s.sqrt() } else { 1.0 });
    let x: Vec<f64> = features.chunks(d).flat_map(|row| row.iter().zip(&mean).zip(&std).map(|((v, m), s)| (f64::from(*v) - m) / s)).collect();

    let min_class = (0..classes).map(|c| labels[..n].iter().filter(|&&l| l as usize == c).count()).filter(|&n| n > 0).min().unwrap_or(0);
    let folds = min_class.min(5);
    let fits = if folds >= 2 { C_GRID.len() * folds + 1 } else { 1 };
    let cv = (folds >= 2).then(|| choose(&cross_validate(&x, labels, groups, n, d, classes, folds, seed, &mut |done| progress(done, fits))));
    let c = cv.map_or(1.0, |s| s.c);
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
    Probe { weight, bias, c, cv }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Views train with their own image's fold and are never validated on: with labels that
    /// are pure noise and views that are near copies of the images, a copy in the training
    /// folds of its own validation image would let the weakest regularisation memorise its way
    /// to a cross-validated accuracy near 1. Kept apart, it stays near chance.
    #[test]
    fn views_stay_with_their_image_in_cross_validation() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (n, d) = (80, 40);
        let images: Vec<f32> = (0..n * d).map(|_| rand_distr::Distribution::<f64>::sample(&rand_distr::StandardNormal, &mut rng) as f32).collect();
        let labels: Vec<u32> = (0..n).map(|_| rand::Rng::random_range(&mut rng, 0..2u32)).collect();
        let mut noise = || rand_distr::Distribution::<f64>::sample(&rand_distr::StandardNormal, &mut rng) as f32 * 0.05;
        let views: Vec<f32> = [images.clone(), images.clone()].concat().into_iter().map(|v| v + noise()).collect();
        let alone = fit(&images, &labels, 2, 0);
        let with_views = fit_with_views(&images, &views, &labels, &[], 2, 0, &mut |_, _| {});
        let (a, v) = (alone.cv.unwrap().accuracy, with_views.cv.unwrap().accuracy);
        eprintln!("cross-validated accuracy on noise: {a} alone, {v} with views");
        assert!(v < 0.7, "cross-validated accuracy {v} on noise: a view leaked into validation");
        assert!(a < 0.7, "{a}");
        // The views are in the fit.
        assert_ne!(alone.weight, with_views.weight);
    }

    /// The same for files that are in the dataset twice: labels that are noise, each image twice
    /// (the second time under the same label, or under the other class). Grouped by file, the
    /// cross-validated accuracy stays near chance; split apart, the copies memorise it up (most
    /// with the weakest regularisation).
    #[test]
    fn copies_of_a_file_share_a_fold_in_cross_validation() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (n, d) = (60, 40);
        let images: Vec<f32> = (0..n * d).map(|_| rand_distr::Distribution::<f64>::sample(&rand_distr::StandardNormal, &mut rng) as f32).collect();
        let labels: Vec<u32> = (0..n).map(|_| rand::Rng::random_range(&mut rng, 0..2u32)).collect();
        let twice: Vec<f32> = [images.clone(), images].concat();
        // The last ten copies contradict their first.
        let labels2: Vec<u32> = labels.iter().copied().chain(labels.iter().enumerate().map(|(i, &l)| if i >= n - 10 { 1 - l } else { l })).collect();
        let groups: Vec<usize> = (0..2 * n).map(|i| i % n).collect();
        let apart = fit_with_views(&twice, &[], &labels2, &[], 2, 0, &mut |_, _| {}).cv.unwrap();
        let together = fit_with_views(&twice, &[], &labels2, &groups, 2, 0, &mut |_, _| {}).cv.unwrap();
        eprintln!("cross-validated scores on noise, every image twice: {apart:?} apart, {together:?} together");
        assert!(together.accuracy < 0.7, "cross-validated accuracy {together:?} on noise: a copy leaked into validation");
        assert!(apart.log_loss < together.log_loss, "{apart:?} against {together:?}");
        // The weakest regularisation memorises most: there the two differ most.
        let x: Vec<f64> = twice.iter().map(|&v| f64::from(v)).collect();
        let weakest = |groups: &[usize]| cross_validate(&x, &labels2, groups, 2 * n, d, 2, 5, 0, &mut |_| {})[C_GRID.len() - 1].accuracy;
        let (apart, together) = (weakest(&[]), weakest(&groups));
        eprintln!("at C = {}: {apart} apart, {together} together", C_GRID[C_GRID.len() - 1]);
        assert!(together < 0.7, "cross-validated accuracy {together} on noise: a copy leaked into validation");
        assert!(apart > together + 0.15, "{apart} against {together}: the test no longer tells copies split apart from kept together");
    }

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
        assert!(probe.cv.unwrap().accuracy > 0.8, "{probe:?}");
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
    fn the_lowest_cross_validated_log_loss_chooses_and_the_stronger_c_among_ties() {
        let score = |c, accuracy, log_loss| CvScore { c, accuracy, log_loss };
        let grid = [score(0.01, 0.9, 0.40), score(0.03, 0.9, 0.31), score(0.1, 0.95, 0.33), score(0.3, 0.8, 0.31)];
        // Not the most accurate C (0.1), and of the two equal losses the first.
        assert_eq!(choose(&grid), grid[1]);
        assert_eq!(choose(&grid[2..]), grid[3]);
        assert_eq!(choose(&grid[..1]), grid[0]);
    }

    /// Cross-validation scores every C of the grid on the held-out images: on classes that the
    /// features separate, every C is right on every image, and the log-loss (which falls as the
    /// fit grows surer) chooses a weaker regularisation than the strongest, where counting right
    /// answers would have kept the strongest. Each log-loss is the mean cross-entropy of a
    /// probability below 1, so it lies between 0 and ln 2.
    #[test]
    fn cross_validation_scores_each_c_by_accuracy_and_log_loss() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let d = 3;
        let labels: Vec<u32> = (0..40).map(|i| i % 2).collect();
        let x: Vec<f64> = labels
            .iter()
            .flat_map(|&l| {
                let noise: Vec<f64> = (0..d).map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng)).collect();
                noise.into_iter().enumerate().map(move |(j, e)| e * 0.3 + if j == 0 { 4.0 * f64::from(l) - 2.0 } else { 0.0 })
            })
            .collect();
        let scores = cross_validate(&x, &labels, &[], labels.len(), d, 2, 5, 0, &mut |_| {});
        assert_eq!(scores.iter().map(|s| s.c).collect::<Vec<_>>(), C_GRID);
        assert!(scores.iter().all(|s| s.accuracy == 1.0 && s.log_loss > 0.0 && s.log_loss < 2f64.ln()), "{scores:?}");
        assert!(scores.windows(2).all(|w| w[1].log_loss < w[0].log_loss), "{scores:?}");
        let probe = fit(&x.iter().map(|&v| v as f32).collect::<Vec<_>>(), &labels, 2, 0);
        assert!(probe.c > C_GRID[0] && probe.cv.is_some_and(|s| s.c == probe.c && s.accuracy == 1.0), "{probe:?}");
    }

    /// The objective's gradient (two strided matrix products) matches central differences, and
    /// its value matches a plain per-example loop.
    #[test]
    fn objective_gradient_matches_finite_differences() {
        use rand::Rng;
        let (n, d, k, c) = (7, 4, 3, 0.7);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let x: Vec<f64> = (0..n * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let y: Vec<u32> = (0..n as u32).map(|i| i % k as u32).collect();
        let sw: Vec<f64> = (0..n).map(|i| 0.5 + i as f64 * 0.1).collect();
        let theta: Vec<f64> = (0..k * d + k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut grad = vec![0.0; theta.len()];
        let f = objective(&theta, &x, &y, &sw, d, k, c, &mut grad);
        let mut plain = 0.5 * theta[..k * d].iter().map(|w| w * w).sum::<f64>();
        for i in 0..n {
            let l: Vec<f64> = (0..k).map(|cl| theta[k * d + cl] + (0..d).map(|j| theta[cl * d + j] * x[i * d + j]).sum::<f64>()).collect();
            let lse = l.iter().map(|v| v.exp()).sum::<f64>().ln();
            plain += c * sw[i] * (lse - l[y[i] as usize]);
        }
        assert!((f - plain).abs() < 1e-9, "{f} vs {plain}");
        let mut scratch = vec![0.0; theta.len()];
        for j in 0..theta.len() {
            let (mut up, mut down) = (theta.clone(), theta.clone());
            up[j] += 1e-6;
            down[j] -= 1e-6;
            let numeric = (objective(&up, &x, &y, &sw, d, k, c, &mut scratch) - objective(&down, &x, &y, &sw, d, k, c, &mut scratch)) / 2e-6;
            assert!((numeric - grad[j]).abs() < 1e-5, "parameter {j}: {numeric} vs {}", grad[j]);
        }
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
