//! Element-wise and row-wise kernels of the fast CPU path, each with its backward, parallel over
//! rows with rayon and vectorised through [`dispatch!`].

use rayon::prelude::*;

use super::simd::{self, dispatch};
use crate::model::config::Activation;

/// Rows handed to one rayon task at least (small tasks cost more than they save).
const MIN_ROWS: usize = 16;

/// Rows per rayon chunk so that each of the pool's threads gets a few chunks.
fn rows_per_task(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(threads * 4).max(MIN_ROWS)
}

/// Sum of a slice with eight independent accumulators (so it vectorises).
#[inline(always)]
fn sum8(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// Dot product with eight independent accumulators.
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let rest: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// One row of layer-norm forward; returns (mean, 1/std).
pub fn ln_row(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if simd::use_avx512() {
        // SAFETY: `isa::active` is never above what was detected on this CPU, so it has AVX-512 F.
        return unsafe { avx512::ln_row(x, gamma, beta, eps, y) };
    }
    ln_row_vectorised(x, gamma, beta, eps, y)
}

dispatch! {
    /// [`ln_row`] as loops LLVM vectorises, for CPUs without AVX-512.
    fn ln_row_vectorised(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) -> (f32, f32) {
        let n = x.len() as f32;
        let mean = sum8(x) / n;
        let mut acc = [0f32; 8];
        let chunks = x.chunks_exact(8);
        let rest: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
        for c in chunks {
            for i in 0..8 {
                let d = c[i] - mean;
                acc[i] = d.mul_add(d, acc[i]);
            }
        }
        let var = (acc.iter().sum::<f32>() + rest) / n;
        let rstd = 1.0 / (var + eps).sqrt();
        ln_apply_row(x, gamma, beta, mean, rstd, y);
        (mean, rstd)
    }
}

/// Layer norm over rows of width `gamma.len()`: writes `y`, returns per-row mean and 1/std.
pub fn layer_norm(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) -> (Vec<f32>, Vec<f32>) {
    let h = gamma.len();
    let rows = x.len() / h;
    let mut stats = vec![(0f32, 0f32); rows];
    let chunk = rows_per_task(rows);
    y.par_chunks_mut(chunk * h).zip(x.par_chunks(chunk * h)).zip(stats.par_chunks_mut(chunk)).for_each(|((y, x), st)| {
        for ((yr, xr), s) in y.chunks_mut(h).zip(x.chunks(h)).zip(st.iter_mut()) {
            *s = ln_row(xr, gamma, beta, eps, yr);
        }
    });
    stats.into_iter().unzip()
}

dispatch! {
    /// Re-applies a layer norm with known statistics (backward recomputes outputs this way).
    pub fn ln_apply_row(x: &[f32], gamma: &[f32], beta: &[f32], mean: f32, rstd: f32, y: &mut [f32]) {
        assert!(y.len() == x.len() && gamma.len() == x.len() && beta.len() == x.len(), "one γ, β and output per value");
        // Zipped, so no index is checked against four lengths and the loop vectorises.
        for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
            *y = ((x - mean) * rstd).mul_add(g, b);
        }
    }
}

/// Layer-norm outputs from saved statistics.
pub fn layer_norm_apply(x: &[f32], gamma: &[f32], beta: &[f32], mean: &[f32], rstd: &[f32], y: &mut [f32]) {
    let h = gamma.len();
    let chunk = rows_per_task(mean.len());
    y.par_chunks_mut(chunk * h).zip(x.par_chunks(chunk * h)).enumerate().for_each(|(c, (y, x))| {
        for (r, (yr, xr)) in y.chunks_mut(h).zip(x.chunks(h)).enumerate() {
            let row = c * chunk + r;
            ln_apply_row(xr, gamma, beta, mean[row], rstd[row], yr);
        }
    });
}

dispatch! {
    /// One row of layer-norm backward: adds to `dx`, accumulates `dgamma` and `dbeta`.
    #[allow(clippy::too_many_arguments)]
    pub fn ln_backward_row(dy: &[f32], x: &[f32], gamma: &[f32], mean: f32, rstd: f32, dx: &mut [f32], dgamma: &mut [f32], dbeta: &mut [f32]) {
        let n = x.len();
        let (dy, gamma, dx, dgamma, dbeta) = (&dy[..n], &gamma[..n], &mut dx[..n], &mut dgamma[..n], &mut dbeta[..n]);
        // dxhat = dy·γ; dx = rstd·(dxhat − mean(dxhat) − x̂·mean(dxhat·x̂))
        let mut s1 = [0f32; 8];
        let mut s2 = [0f32; 8];
        let whole = n / 8 * 8;
        for ((((x, dy), gamma), dgamma), dbeta) in x[..whole]
            .chunks_exact(8)
            .zip(dy[..whole].chunks_exact(8))
            .zip(gamma[..whole].chunks_exact(8))
            .zip(dgamma[..whole].chunks_exact_mut(8))
            .zip(dbeta[..whole].chunks_exact_mut(8))
        {
            for j in 0..8 {
                let xhat = (x[j] - mean) * rstd;
                let g = dy[j] * gamma[j];
                s1[j] += g;
                s2[j] = g.mul_add(xhat, s2[j]);
                dgamma[j] = dy[j].mul_add(xhat, dgamma[j]);
                dbeta[j] += dy[j];
            }
        }
        let (mut t1, mut t2) = (s1.iter().sum::<f32>(), s2.iter().sum::<f32>());
        for i in whole..n {
            let xhat = (x[i] - mean) * rstd;
            let g = dy[i] * gamma[i];
            t1 += g;
            t2 += g * xhat;
            dgamma[i] += dy[i] * xhat;
            dbeta[i] += dy[i];
        }
        let m1 = t1 / n as f32;
        let m2 = t2 / n as f32;
        for i in 0..n {
            let xhat = (x[i] - mean) * rstd;
            dx[i] += rstd * (dy[i] * gamma[i] - m1 - xhat * m2);
        }
    }
}

/// Layer-norm backward over rows: `dx += ∂L/∂x`, returns (dgamma, dbeta).
pub fn layer_norm_backward(dy: &[f32], x: &[f32], gamma: &[f32], mean: &[f32], rstd: &[f32], dx: &mut [f32]) -> (Vec<f32>, Vec<f32>) {
    let h = gamma.len();
    let rows = mean.len();
    let chunk = rows_per_task(rows);
    let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(chunk * h)
        .enumerate()
        .map(|(c, dx)| {
            let mut dg = vec![0f32; h];
            let mut db = vec![0f32; h];
            for (r, dxr) in dx.chunks_mut(h).enumerate() {
                let row = c * chunk + r;
                let span = row * h..(row + 1) * h;
                ln_backward_row(&dy[span.clone()], &x[span], gamma, mean[row], rstd[row], dxr, &mut dg, &mut db);
            }
            (dg, db)
        })
        .collect();
    let mut dg = vec![0f32; h];
    let mut db = vec![0f32; h];
    for (g, b) in partial {
        add_assign(&mut dg, &g);
        add_assign(&mut db, &b);
    }
    (dg, db)
}

dispatch! {
    /// `a += b`.
    pub fn add_assign(a: &mut [f32], b: &[f32]) {
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
    }
}

dispatch! {
    /// `y = s·x`.
    pub fn scale_into(y: &mut [f32], x: &[f32], s: f32) {
        for (y, x) in y.iter_mut().zip(x) {
            *y = s * x;
        }
    }
}

/// `a += b` over large buffers, in parallel.
pub fn par_add_assign(a: &mut [f32], b: &[f32]) {
    let chunk = 1 << 14;
    a.par_chunks_mut(chunk).zip(b.par_chunks(chunk)).for_each(|(a, b)| add_assign(a, b));
}

/// Column sums of a (rows × cols) matrix (bias gradients).
pub fn col_sums(x: &[f32], cols: usize) -> Vec<f32> {
    let rows = x.len() / cols;
    let chunk = rows_per_task(rows);
    x.par_chunks(chunk * cols)
        .map(|block| {
            let mut acc = vec![0f32; cols];
            for row in block.chunks(cols) {
                add_assign(&mut acc, row);
            }
            acc
        })
        .reduce(|| vec![0f32; cols], |mut a, b| {
            add_assign(&mut a, &b);
            a
        })
}

dispatch! {
    /// `y = act(x)` on this thread (a panel of rows being packed; [`activation`] spreads a whole
    /// matrix over the pool).
    pub fn act_forward_chunk(act: Activation, x: &[f32], y: &mut [f32]) {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        match act {
            Activation::Gelu => {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = 0.5 * x * (1.0 + simd::erf(x * std::f32::consts::FRAC_1_SQRT_2));
                }
            }
            Activation::GeluTanh => {
                for (y, &x) in y.iter_mut().zip(x) {
                    let u = SQRT_2_OVER_PI * (0.044_715 * x * x).mul_add(x, x);
                    *y = 0.5 * x * (1.0 + simd::tanh(u));
                }
            }
            Activation::Relu => {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = x.max(0.0);
                }
            }
            Activation::Silu => {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = x * simd::sigmoid(x);
                }
            }
            Activation::QuickGelu => {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = x * simd::sigmoid(1.702 * x);
                }
            }
        }
    }
}

dispatch! {
    /// `dx = dy · act'(x)`, written over `dy`.
    fn act_backward_chunk(act: Activation, x: &[f32], dy: &mut [f32]) {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        match act {
            Activation::Gelu => {
                for (d, &x) in dy.iter_mut().zip(x) {
                    let cdf = 0.5 * (1.0 + simd::erf(x * std::f32::consts::FRAC_1_SQRT_2));
                    let pdf = INV_SQRT_2PI * simd::exp(-0.5 * x * x);
                    *d *= x.mul_add(pdf, cdf);
                }
            }
            Activation::GeluTanh => {
                for (d, &x) in dy.iter_mut().zip(x) {
                    let u = SQRT_2_OVER_PI * (0.044_715 * x * x).mul_add(x, x);
                    let t = simd::tanh(u);
                    let du = SQRT_2_OVER_PI * (3.0 * 0.044_715 * x).mul_add(x, 1.0);
                    *d *= 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
                }
            }
            Activation::Relu => {
                for (d, &x) in dy.iter_mut().zip(x) {
                    *d = if x > 0.0 { *d } else { 0.0 };
                }
            }
            Activation::Silu => {
                for (d, &x) in dy.iter_mut().zip(x) {
                    let s = simd::sigmoid(x);
                    *d *= s * (1.0 + x * (1.0 - s));
                }
            }
            Activation::QuickGelu => {
                for (d, &x) in dy.iter_mut().zip(x) {
                    let s = simd::sigmoid(1.702 * x);
                    *d *= s + 1.702 * x * s * (1.0 - s);
                }
            }
        }
    }
}

const ELEMENTS_PER_TASK: usize = 1 << 14;

/// `y = act(x)`.
pub fn activation(act: Activation, x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(ELEMENTS_PER_TASK).zip(x.par_chunks(ELEMENTS_PER_TASK)).for_each(|(y, x)| act_forward_chunk(act, x, y));
}

/// `dy ← dy · act'(x)`.
pub fn activation_backward(act: Activation, x: &[f32], dy: &mut [f32]) {
    dy.par_chunks_mut(ELEMENTS_PER_TASK).zip(x.par_chunks(ELEMENTS_PER_TASK)).for_each(|(dy, x)| act_backward_chunk(act, x, dy));
}

/// Softmax of one row of scores scaled by `scale` (> 0), before its division by the sum, in
/// place: `exp(scale·x − max)` with `max` the largest `scale·x`; returns `(max, sum)` (the
/// log-sum-exp is `max + ln sum`). Attention divides its weighted values' rows by the sum
/// instead (`n × d` values rather than the `n × n` probabilities), as it writes them into the
/// context.
///
/// The scale is applied here, by the multiply-add that subtracts the maximum, rather than by the
/// product that computes the scores: so that product stores its tiles as they are, which the
/// AMX kernel does straight from its tile registers (a scaled product goes through a scratch
/// tile there, element by element).
pub fn exp_row(row: &mut [f32], scale: f32) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if simd::use_avx512() {
        // SAFETY: `isa::active` is never above what was detected on this CPU, so it has AVX-512 F.
        return unsafe { avx512::exp_row(row, scale) };
    }
    exp_row_vectorised(row, scale)
}

dispatch! {
    /// [`exp_row`] as loops LLVM vectorises, for CPUs without AVX-512.
    fn exp_row_vectorised(row: &mut [f32], scale: f32) -> (f32, f32) {
        // The maximum in 16 independent lanes: one running maximum is a chain of dependent
        // `max`es that does not vectorise (it was 10% of a small ViT's inference in bf16). `>`
        // rather than `f32::max`, whose rule for NaN costs a compare and a blend per vector; a
        // NaN is passed over either way (and makes the row NaN through its exp).
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut chunks = row.chunks_exact(16);
        for c in &mut chunks {
            for i in 0..16 {
                lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
            }
        }
        let mut raw = lanes.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        for &v in chunks.remainder() {
            raw = if v > raw { v } else { raw };
        }
        // The largest scaled score: rounding keeps the order, so it is the largest score scaled.
        let max = raw * scale;
        // exp and the sum in one pass, 16 lanes at a time; the last partial vector (a ViT row of
        // 197 ends in 5) through a padded copy, so it is one vector, not that many scalar exps.
        let mut sums = [0f32; 16];
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            for i in 0..16 {
                c[i] = simd::exp(c[i].mul_add(scale, -max));
                sums[i] += c[i];
            }
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut pad = [raw; 16];
            pad[..rest.len()].copy_from_slice(rest);
            for v in &mut pad {
                *v = simd::exp(v.mul_add(scale, -max));
            }
            rest.copy_from_slice(&pad[..rest.len()]);
            for (s, &v) in sums.iter_mut().zip(&pad[..rest.len()]) {
                *s += v;
            }
        }
        (max, sums.iter().sum::<f32>())
    }
}

/// Row kernels written with AVX-512 intrinsics where the vectorised loops leave much behind.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::simd::{EXP_POLY, EXP_RANGE, LN2_HI, LN2_LO};

    /// e^x of 16 lanes at most 0 (a softmax's `scale·x − max`, or a rounding above it), the
    /// steps of [`simd::exp`](super::simd::exp) in the same order, so the same results, in
    /// fewer instructions: `vscalefps` multiplies by 2ⁿ where the loops build 2ⁿ's bits (three
    /// instructions), and no upper bound, which the argument never passes by more than a
    /// rounding (n is then 0).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn exp_nonpositive(x: __m512) -> __m512 {
        // Bound first, so a NaN stays one (`max` returns its second operand when either is NaN).
        let x = _mm512_max_ps(_mm512_set1_ps(EXP_RANGE.0), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
            _mm512_set1_ps(0.5),
        ));
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x));
        let z = _mm512_mul_ps(r, r);
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(p, z, r), _mm512_set1_ps(1.0));
        _mm512_scalef_ps(y, n)
    }

    /// The sum over `xs` of `step(v, acc)`, which adds what 16 of its values `v` give to the
    /// sums `acc`: four vectors at a time into four independent sums (one running sum is a
    /// chain of dependent additions, which left the loops LLVM vectorises waiting on it), then
    /// single vectors, then the rest under a mask.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn row_sum(xs: &[f32], step: impl Fn(__m512, __m512) -> __m512) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut quads = xs.chunks_exact(64);
        for q in &mut quads {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: `q` holds 64 floats.
                *a = step(unsafe { _mm512_loadu_ps(q.as_ptr().add(16 * j)) }, *a);
            }
        }
        let mut vectors = quads.remainder().chunks_exact(16);
        for v in &mut vectors {
            // SAFETY: `v` holds 16 floats.
            acc[0] = step(unsafe { _mm512_loadu_ps(v.as_ptr()) }, acc[0]);
        }
        let rest = vectors.remainder();
        let mask: __mmask16 = ((1u32 << rest.len()) - 1) as u16;
        // SAFETY: the masked lanes are `rest`'s elements; the others are not read.
        let last = unsafe { _mm512_maskz_loadu_ps(mask, rest.as_ptr()) };
        acc[1] = _mm512_mask_mov_ps(acc[1], mask, step(last, acc[1]));
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])))
    }

    /// [`super::ln_row`]: the mean and the variance by [`row_sum`] (in the loops LLVM
    /// vectorises, their sums were chains of dependent additions: 2.3 times as long a row of
    /// 384), then the output by [`super::ln_apply_row`], as below AVX-512.
    #[target_feature(enable = "avx512f")]
    pub(super) fn ln_row(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) -> (f32, f32) {
        let n = x.len() as f32;
        let mean = row_sum(x, |v, acc| _mm512_add_ps(v, acc)) / n;
        let m = _mm512_set1_ps(mean);
        let var = row_sum(x, |v, acc| {
            let d = _mm512_sub_ps(v, m);
            _mm512_fmadd_ps(d, d, acc)
        }) / n;
        let rstd = 1.0 / (var + eps).sqrt();
        super::ln_apply_row(x, gamma, beta, mean, rstd, y);
        (mean, rstd)
    }

    /// [`super::exp_row`]: whole vectors, then the last partial one under a mask (in registers:
    /// the vectorised loops' padded copy of it through memory, whose reload could not be
    /// forwarded from the store, and their sums' serial reduction took half their time).
    #[target_feature(enable = "avx512f")]
    pub(super) fn exp_row(row: &mut [f32], scale: f32) -> (f32, f32) {
        let (whole, rest) = (row.len() / 16 * 16, row.len() % 16);
        let mask: __mmask16 = ((1u32 << rest) - 1) as u16;
        let (body, end) = row.split_at_mut(whole);
        let tail = end.as_mut_ptr();
        // The maximum: `max(x, m)` keeps `m` where x is NaN, as the loops' `>` does; a NaN
        // then makes the row NaN through its exp.
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for c in body.chunks_exact(16) {
            // SAFETY: `c` holds 16 floats.
            m = _mm512_max_ps(unsafe { _mm512_loadu_ps(c.as_ptr()) }, m);
        }
        // SAFETY: the masked lanes, `rest` of them, are the row's last elements.
        let last = unsafe { _mm512_maskz_loadu_ps(mask, tail) };
        m = _mm512_mask_max_ps(m, mask, last, m);
        // The largest scaled score (rounding keeps the order), subtracted by the multiply-add
        // that scales: `scale·x − max` is at most 0 but for the rounding of `max`, a few ulps of
        // it, whose exp `exp_nonpositive` takes as well.
        let max = _mm512_reduce_max_ps(m) * scale;
        let (vscale, vneg) = (_mm512_set1_ps(scale), _mm512_set1_ps(-max));
        let mut sum = _mm512_setzero_ps();
        for c in body.chunks_exact_mut(16) {
            // SAFETY: `c` holds 16 floats.
            unsafe {
                let e = exp_nonpositive(_mm512_fmadd_ps(_mm512_loadu_ps(c.as_ptr()), vscale, vneg));
                _mm512_storeu_ps(c.as_mut_ptr(), e);
                sum = _mm512_add_ps(sum, e);
            }
        }
        let e = exp_nonpositive(_mm512_fmadd_ps(last, vscale, vneg));
        // SAFETY: as the masked load above.
        unsafe { _mm512_mask_storeu_ps(tail, mask, e) };
        sum = _mm512_mask_add_ps(sum, mask, sum, e);
        (max, _mm512_reduce_add_ps(sum))
    }
}

dispatch! {
    /// Probabilities from scaled scores and their saved log-sum-exp, in place.
    pub fn softmax_from_lse(row: &mut [f32], scale: f32, lse: f32) {
        for v in row.iter_mut() {
            *v = simd::exp((*v).mul_add(scale, -lse));
        }
    }
}

dispatch! {
    /// Softmax backward of one row, scaled: `ds = scale · p ⊙ (dp − Σ dp⊙p)`, written over `dp`.
    pub fn softmax_backward_row(p: &[f32], dp: &mut [f32], scale: f32) {
        let d = dot8(p, dp);
        for (g, &pv) in dp.iter_mut().zip(p) {
            *g = scale * pv * (*g - d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fast::isa::tests::{on, runnable};
    use crate::model::fast::simd::tests::erf64;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f64 / (1u64 << 31) as f64 * 8.0 - 4.0) as f32
            })
            .collect()
    }

    fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
        let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((f64::from(g) - w).abs() <= tol * scale, "{what}[{i}] = {g}, want {w}");
        }
    }

    fn act64(act: Activation, x: f64) -> f64 {
        let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
        match act {
            Activation::Gelu => 0.5 * x * (1.0 + erf64(x / 2f64.sqrt())),
            Activation::GeluTanh => 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044_715 * x * x * x)).tanh()),
            Activation::Relu => x.max(0.0),
            Activation::Silu => x * sigmoid(x),
            Activation::QuickGelu => x * sigmoid(1.702 * x),
        }
    }

    /// Softmax's exponentials over the whole range of scores at every level: differences down
    /// to the bound at −87 (e⁻⁸⁷ is still a normal f32) and far past it (bounded there, never
    /// NaN, even for a score of −∞), and a NaN score making the sum NaN.
    #[test]
    fn exp_row_spans_the_range_of_scores() {
        for level in runnable() {
            // 20 values: a whole vector and a partial one under AVX-512.
            let mut row: Vec<f32> = vec![0.0, -0.3, -1.0, -7.5, -20.0, -44.4, -60.0, -80.0, -86.0, -86.9, -87.0, -87.3];
            row.extend([-88.0, -100.0, -126.0, -200.0, -1e4, -1e30, f32::MIN, f32::NEG_INFINITY]);
            let want: Vec<f64> = row.iter().map(|&v| f64::from(v).max(-87.0).exp()).collect();
            // The scores as the product leaves them, 8 times the scaled ones (ViT's 1/√64).
            let mut got: Vec<f32> = row.iter().map(|&v| v * 8.0).collect();
            let (max, sum) = on(level, || exp_row(&mut got, 0.125));
            assert_eq!(max, 0.0, "{level:?}");
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(g > 0.0 && (f64::from(g) - w).abs() <= 2e-7 * w, "{level:?} e^{}: {g}, want {w}", row[i]);
            }
            assert!((f64::from(sum) - want.iter().sum::<f64>()).abs() < 1e-6, "{level:?} sum {sum}");
            let mut nan = row.clone();
            nan[3] = f32::NAN;
            let (_, sum) = on(level, || exp_row(&mut nan, 1.0));
            assert!(nan[3].is_nan() && sum.is_nan(), "{level:?}: a NaN score is not passed over");
        }
    }

    /// Every element-wise and row kernel, at every kernel level this CPU runs, against the same
    /// function computed in f64 (derivatives by central differences of the f64 function).
    #[test]
    fn every_kernel_matches_f64_at_every_level() {
        let levels = runnable();
        for &level in &levels {
            for n in [1usize, 7, 8, 37, 48, 389, 400] {
                let x = data(n, n as u64);
                let (gamma, beta, dy) = (data(n, 1), data(n, 2), data(n, 3));
                let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
                let what = |k: &str| format!("{level:?} {k} n={n}");

                // Layer norm, forward, re-applied and backward.
                let mean = x64.iter().sum::<f64>() / n as f64;
                let rstd = 1.0 / (x64.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64 + 1e-5).sqrt();
                let xhat: Vec<f64> = x64.iter().map(|v| (v - mean) * rstd).collect();
                let y64: Vec<f64> = (0..n).map(|i| xhat[i] * f64::from(gamma[i]) + f64::from(beta[i])).collect();
                let mut y = vec![0f32; n];
                let (m, r) = on(level, || ln_row(&x, &gamma, &beta, 1e-5, &mut y));
                close(&y, &y64, 1e-5, &what("ln_row"));
                close(&[m, r], &[mean, rstd], 1e-5, &what("ln_row stats"));
                let mut again = vec![0f32; n];
                on(level, || ln_apply_row(&x, &gamma, &beta, m, r, &mut again));
                close(&again, &y64, 1e-5, &what("ln_apply_row"));
                let g: Vec<f64> = (0..n).map(|i| f64::from(dy[i]) * f64::from(gamma[i])).collect();
                let (m1, m2) = (g.iter().sum::<f64>() / n as f64, g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / n as f64);
                let dx64: Vec<f64> = (0..n).map(|i| 0.5 + rstd * (g[i] - m1 - xhat[i] * m2)).collect();
                let (mut dx, mut dgamma, mut dbeta) = (vec![0.5f32; n], vec![0.25f32; n], vec![0.25f32; n]);
                on(level, || ln_backward_row(&dy, &x, &gamma, m, r, &mut dx, &mut dgamma, &mut dbeta));
                close(&dx, &dx64, 1e-5, &what("ln_backward_row dx"));
                close(&dgamma, &(0..n).map(|i| 0.25 + f64::from(dy[i]) * xhat[i]).collect::<Vec<_>>(), 1e-5, &what("dgamma"));
                close(&dbeta, &(0..n).map(|i| 0.25 + f64::from(dy[i])).collect::<Vec<_>>(), 1e-6, &what("dbeta"));

                // Activations and their derivatives.
                for act in [Activation::Gelu, Activation::GeluTanh, Activation::Relu, Activation::Silu, Activation::QuickGelu] {
                    let mut y = vec![0f32; n];
                    on(level, || act_forward_chunk(act, &x, &mut y));
                    close(&y, &x64.iter().map(|&v| act64(act, v)).collect::<Vec<_>>(), 1e-6, &what(&format!("{act:?}")));
                    let mut d = dy.clone();
                    on(level, || act_backward_chunk(act, &x, &mut d));
                    let h = 1e-5;
                    let want: Vec<f64> =
                        (0..n).map(|i| f64::from(dy[i]) * (act64(act, x64[i] + h) - act64(act, x64[i] - h)) / (2.0 * h)).collect();
                    close(&d, &want, 1e-5, &what(&format!("{act:?} backward")));
                }

                // Softmax, its re-application from the log-sum-exp, and its backward.
                let scale = 0.7;
                let max = x64.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b * scale));
                let sum: f64 = x64.iter().map(|v| (v * scale - max).exp()).sum();
                let p64: Vec<f64> = x64.iter().map(|v| (v * scale - max).exp() / sum).collect();
                let mut p = x.clone();
                let (row_max, row_sum) = on(level, || exp_row(&mut p, scale as f32));
                close(&p, &p64.iter().map(|&v| v * sum).collect::<Vec<_>>(), 1e-6, &what("exp_row"));
                close(&[row_max, row_sum], &[max, sum], 1e-6, &what("exp_row's maximum and sum"));
                let lse = row_max + row_sum.ln();
                close(&[lse], &[max + sum.ln()], 1e-6, &what("log-sum-exp"));
                p.iter_mut().for_each(|v| *v /= row_sum);
                let mut q = x.clone();
                on(level, || softmax_from_lse(&mut q, scale as f32, lse));
                close(&q, &p64, 1e-5, &what("softmax_from_lse"));
                let dot: f64 = p64.iter().zip(&dy).map(|(a, &b)| a * f64::from(b)).sum();
                let mut ds = dy.clone();
                on(level, || softmax_backward_row(&p, &mut ds, scale as f32));
                close(&ds, &(0..n).map(|i| scale * p64[i] * (f64::from(dy[i]) - dot)).collect::<Vec<_>>(), 1e-5, &what("softmax backward"));

                // a += b.
                let mut a = x.clone();
                on(level, || add_assign(&mut a, &dy));
                close(&a, &(0..n).map(|i| x64[i] + f64::from(dy[i])).collect::<Vec<_>>(), 1e-6, &what("add_assign"));
                // y = s·x.
                let mut y = vec![0f32; n];
                on(level, || scale_into(&mut y, &x, 0.3));
                close(&y, &x64.iter().map(|v| v * f64::from(0.3f32)).collect::<Vec<_>>(), 1e-6, &what("scale_into"));
            }
        }
        eprintln!("element-wise kernels checked at {levels:?}");
    }
}
