//! The AVX-512 micro-kernels for the driver in `sgemm.rs`, both 12×32 (24 accumulators of 16
//! floats, two loads of B and twelve broadcasts of A per step):
//! - [`F32`]: f32 by FMA (bf16 emulated by the driver, which rounds the packed operands);
//! - [`Bf16`]: bf16 by `vdpbf16ps` (AVX-512 BF16), which multiplies pairs of bf16 values and adds
//!   both products to an f32 accumulator. Both operands are packed in pairs along k — each
//!   32-bit slot holds the bf16 of k = 2s (low half) and of k = 2s + 1 (high half), rounded to
//!   nearest even as [`round_bf16`] does — so one instruction does two steps of depth. The
//!   depth is padded to whole blocks of 16 pairs ([`PAIR_BLOCK`]); A keeps each row's 16 pairs
//!   of a block together (row-major bf16, converted without a transpose when A is row-major,
//!   as activations are), and the AMX kernel (`amx.rs`) packs both operands the same way. This
//!   kernel stops at the last pair that holds some of k; AMX's tiles multiply whole blocks.
//!
//! Every product of two bf16 values is exact in f32, so [`Bf16`] and the emulation differ only in
//! the order of the f32 additions (and in `vdpbf16ps` treating subnormal inputs as zero).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::Mat;
use super::sgemm::{Init, Micro, pack_a, pack_b};
use crate::model::precision::round_bf16;

/// Rows and columns of both kernels' tile.
const MR: usize = 12;
pub(super) const NR: usize = 32;
/// Pairs of k per block of a bf16 panel: the depth is padded with zero pairs to whole blocks,
/// and A keeps each row's pairs of a block together (64 bytes: the row of an AMX tile).
pub(super) const PAIR_BLOCK: usize = 16;

/// The AVX-512 f32 kernel (12×32).
pub(super) struct F32;

impl Micro for F32 {
    const MR: usize = MR;
    const NR: usize = NR;
    /// A `128 × 32` panel of B (16 KiB) stays in L1 beside twelve rows of A (6 KiB).
    const KC: usize = 128;
    const PAIRS: bool = false;

    fn pack_a(a: Mat, i0: usize, mc: usize, k: usize, dst: &mut [f32]) {
        pack_a::<MR>(a, i0, mc, k, dst)
    }

    fn pack_b(b: Mat, k: usize, j0: usize, nr: usize, dst: &mut [f32]) {
        pack_b::<NR>(b, k, j0, nr, dst)
    }

    unsafe fn packed(steps: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init) {
        // SAFETY: as the trait's contract.
        unsafe { f32_packed::<MR, 2>(steps, a, b, c, ldc, alpha, init) }
    }

    unsafe fn rows(kc: usize, a: *const f32, stride: usize, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init) {
        // SAFETY: as the trait's contract.
        unsafe { f32_rows::<MR, 2>(kc, a, stride, b, c, ldc, alpha, init) }
    }

    unsafe fn packed_edge(steps: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init, mr: usize, nr: usize) {
        // SAFETY: as the trait's contract; the tile chosen covers `mr` rows and `nr` columns.
        unsafe { by_edge!(mr, nr, f32_packed, (steps, a, b, c, ldc, alpha, init)) }
    }

    unsafe fn rows_edge(kc: usize, a: *const f32, stride: usize, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init, nr: usize) {
        // SAFETY: as the trait's contract; the tile chosen covers `nr` columns (rows read in
        // place are always whole panels of MR).
        unsafe {
            if nr > 16 {
                f32_rows::<MR, 2>(kc, a, stride, b, c, ldc, alpha, init)
            } else {
                f32_rows::<MR, 1>(kc, a, stride, b, c, ldc, alpha, init)
            }
        }
    }
}

/// Calls `$kernel::<R, H>($args)` with the fewest rows `R` (4, 8 or 12) and halves `H` of 16
/// columns (1 or 2) that cover an edge tile of `$mr` rows and `$nr` columns: a product whose
/// edge cuts a tile (197 rows are 16 tiles of 12 and one of 5; 197 columns, 6 panels of 32 and
/// one of 5) then multiplies 8 rows rather than 12, and 16 columns rather than 32.
macro_rules! by_edge {
    ($mr:expr, $nr:expr, $kernel:ident, ($($arg:expr),*)) => {
        match ($mr.div_ceil(4), $nr > 16) {
            (1, false) => $kernel::<4, 1>($($arg),*),
            (2, false) => $kernel::<8, 1>($($arg),*),
            (_, false) => $kernel::<MR, 1>($($arg),*),
            (1, true) => $kernel::<4, 2>($($arg),*),
            (2, true) => $kernel::<8, 2>($($arg),*),
            (_, true) => $kernel::<MR, 2>($($arg),*),
        }
    };
}
use by_edge;

/// The AVX-512 BF16 kernel (12×32, pairs of k).
pub(super) struct Bf16;

impl Micro for Bf16 {
    const MR: usize = MR;
    const NR: usize = NR;
    /// 128 pairs: a panel of B of 16 KiB, as for [`F32`], covering twice the depth.
    const KC: usize = 128;
    const PAIRS: bool = true;
    const STEP_BLOCK: usize = PAIR_BLOCK;
    const PARTIAL_BLOCK: bool = true;

    fn pack_a(a: Mat, i0: usize, mc: usize, k: usize, dst: &mut [f32]) {
        // SAFETY: the driver runs this kernel only on a CPU with AVX-512 BF16.
        unsafe { pack_a_blocks::<MR>(a, i0, mc, k, dst) }
    }

    fn pack_b(b: Mat, k: usize, j0: usize, nr: usize, dst: &mut [f32]) {
        // SAFETY: as for `pack_a`.
        unsafe { pack_b_blocks(b, k, j0, nr, dst) }
    }

    unsafe fn packed(steps: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init) {
        // SAFETY: as the trait's contract.
        unsafe { bf16_packed::<MR, 2>(steps, a, b, c, ldc, alpha, init) }
    }

    unsafe fn packed_edge(steps: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init, mr: usize, nr: usize) {
        // SAFETY: as the trait's contract; the tile chosen covers `mr` rows and `nr` columns.
        unsafe { by_edge!(mr, nr, bf16_packed, (steps, a, b, c, ldc, alpha, init)) }
    }

    unsafe fn rows(_: usize, _: *const f32, _: usize, _: *const f32, _: *mut f32, _: usize, _: f32, _: Init) {
        unreachable!("a kernel of bf16 pairs always packs A (the driver checks PAIRS)")
    }
}

/// The bf16 bits of `x`, rounded by [`round_bf16`] (to nearest even; NaNs stay NaN): the scalar
/// edges of the packing, where a vector of 16 does not fit.
#[inline(always)]
fn bf16_bits(x: f32) -> u32 {
    round_bf16(x).to_bits() >> 16
}

/// One 32-bit slot of a pair: `lo`'s bf16 in the low half, `hi`'s in the high half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> f32 {
    f32::from_bits(bf16_bits(lo) | bf16_bits(hi) << 16)
}

/// 32 consecutive values of k (`x[0..16]`, `x[16..32]`) as 16 pair slots: slot `s` holds
/// `x[2s]` and `x[2s+1]`. `vcvtne2ps2bf16` rounds to nearest even as [`bf16_bits`] does, but
/// flushes subnormals to zero (as `vdpbf16ps` treats them anyway).
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
fn run_pairs(first: __m512, second: __m512) -> __m512i {
    // The low 16 bf16 lanes come from the second operand: `first`, in order, then `second`.
    // SAFETY: same size; a vector of bf16 is a vector of bits.
    unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(second, first)) }
}

/// Two rows of 16 (`lo[j]` at k = 2s, `hi[j]` at 2s + 1) as 16 pair slots: slot `j` holds
/// `lo[j]` and `hi[j]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
fn interleave_pairs(lo: __m512, hi: __m512) -> __m512i {
    // Lanes 0..16 hold lo's bf16, 16..32 hi's; then word 2j takes lane j, word 2j + 1 lane 16 + j.
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
    );
    // SAFETY: same size; a vector of bf16 is a vector of bits.
    let both = unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) };
    _mm512_permutexvar_epi16(idx, both)
}

/// A mask of the first `n` (≤ 16) lanes.
fn lanes(n: usize) -> __mmask16 {
    ((1u32 << n.min(16)) - 1) as __mmask16
}

/// One packed step from two runs across the tile (up to 16 floats each, the lanes of `mask`):
/// the values at k = 2s from `lo`, those at k = 2s + 1 from `hi` (`None` past the end of k, read
/// as zeros), interleaved into pair slots.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and BF16; the lanes of `mask` must be readable from `lo`
/// and from `hi` when given.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn step_of_two_runs(lo: *const f32, hi: Option<*const f32>, mask: __mmask16) -> __m512i {
    // SAFETY: the caller's contract.
    unsafe {
        let hi = hi.map_or(_mm512_setzero_ps(), |p| _mm512_maskz_loadu_ps(mask, p));
        interleave_pairs(_mm512_maskz_loadu_ps(mask, lo), hi)
    }
}

/// Runs `run(0)..run(n)` (n ≤ 16) in the first `n` entries, for [`transpose_runs`], without
/// allocating on the packing path.
fn runs_of<'a>(n: usize, run: impl Fn(usize) -> &'a [f32]) -> [&'a [f32]; 16] {
    assert!(n <= 16);
    std::array::from_fn(|i| if i < n { run(i) } else { &[] })
}

/// Writes the pairs of up to 16 contiguous runs of k (`runs[i]`, `k` floats each) as packed
/// steps: slot `s` of run `i` goes to `dst[s·stride + i]`. 32 values of each run are converted
/// at a time and the 16 × 16 block of slots is transposed in registers, so each step is one
/// (masked) store; the odd tail goes by [`pair`].
///
/// # Safety
/// The CPU must support AVX-512 F and BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn transpose_runs(runs: &[&[f32]], k: usize, dst: &mut [f32], stride: usize) {
    let n = runs.len();
    let depth = k.div_ceil(2);
    assert!((1..=16).contains(&n) && runs.iter().all(|r| r.len() >= k) && stride >= n);
    assert!(dst.len() >= (depth.max(1) - 1) * stride + n);
    let whole = k / 32 * 32;
    let mask = lanes(n);
    for kk in (0..whole).step_by(32) {
        // SAFETY: kk + 32 ≤ whole ≤ k floats of every run; the masked stores write `n` slots
        // of steps kk/2 .. kk/2 + 16 < depth, inside `dst` (checked above).
        unsafe {
            let rows: [__m512i; 16] = std::array::from_fn(|i| match runs.get(i) {
                Some(r) => run_pairs(_mm512_loadu_ps(r.as_ptr().add(kk)), _mm512_loadu_ps(r.as_ptr().add(kk + 16))),
                None => _mm512_setzero_si512(),
            });
            for (q, v) in transpose16(rows).into_iter().enumerate() {
                _mm512_mask_storeu_epi32(dst.as_mut_ptr().add((kk / 2 + q) * stride).cast(), mask, v);
            }
        }
    }
    for (i, run) in runs.iter().enumerate() {
        for (t, two) in run[whole..k].chunks(2).enumerate() {
            dst[(whole / 2 + t) * stride + i] = pair(two[0], two.get(1).copied().unwrap_or(0.0));
        }
    }
}

/// Transposes a 16 × 16 block of 32-bit values held as sixteen rows.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    // Within each 128-bit lane L, u[4g + q] holds column 4L + q of rows 4g .. 4g + 4.
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        let (a, b, c, d) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
        let (t0, t1) = (_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        let (t2, t3) = (_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
        u[4 * g] = _mm512_unpacklo_epi64(t0, t2);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
    }
    // Then gather lane L of u[q], u[4 + q], u[8 + q], u[12 + q]: column 4L + q whole.
    let mut out = [_mm512_setzero_si512(); 16];
    for q in 0..4 {
        let even_lo = _mm512_shuffle_i32x4::<0x88>(u[q], u[4 + q]);
        let odd_lo = _mm512_shuffle_i32x4::<0xdd>(u[q], u[4 + q]);
        let even_hi = _mm512_shuffle_i32x4::<0x88>(u[8 + q], u[12 + q]);
        let odd_hi = _mm512_shuffle_i32x4::<0xdd>(u[8 + q], u[12 + q]);
        out[q] = _mm512_shuffle_i32x4::<0x88>(even_lo, even_hi);
        out[8 + q] = _mm512_shuffle_i32x4::<0xdd>(even_lo, even_hi);
        out[4 + q] = _mm512_shuffle_i32x4::<0x88>(odd_lo, odd_hi);
        out[12 + q] = _mm512_shuffle_i32x4::<0xdd>(odd_lo, odd_hi);
    }
    out
}

/// Steps of the padded depth for `k`: pairs, in whole blocks of [`PAIR_BLOCK`].
fn padded_pairs(k: usize) -> usize {
    k.div_ceil(2).next_multiple_of(PAIR_BLOCK)
}

/// [`Micro::pack_a`] in blocks of pairs, for both bf16 kernels (panels of `MR` rows):
/// `dst[panel][block][r][q] = pair(a[r][2s], a[r][2s+1])` with `s = 16·block + q`, zero beyond
/// the matrix (past k, and rows past `mc`): each row's 16 pairs of a block are one 64-byte line.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn pack_a_blocks<const MR: usize>(a: Mat, i0: usize, mc: usize, k: usize, dst: &mut [f32]) {
    let depth = padded_pairs(k);
    let blocks = depth / PAIR_BLOCK;
    let dst = &mut dst[..mc.div_ceil(MR) * MR * depth];
    if a.rs == 1 && a.cs != 1 {
        // SAFETY: this function's contract.
        unsafe { pack_a_columns::<MR>(a, i0, mc, k, dst) };
        return;
    }
    for (pi, panel) in dst.chunks_mut(MR * depth).enumerate() {
        let r0 = i0 + pi * MR;
        let rows = MR.min(i0 + mc - r0);
        let slots = |panel: &mut [f32], block: usize, r: usize| panel[(block * MR + r) * PAIR_BLOCK..][..PAIR_BLOCK].as_mut_ptr().cast::<__m512i>();
        if a.cs == 1 {
            // Rows contiguous in k: 32 values of a row are one row of a block. Block by block,
            // so the panel is written front to back while the rows are read side by side.
            let row_of = |r: usize| if r < rows { a.data[a.offset + (r0 + r) * a.rs..][..k].as_ptr() } else { std::ptr::null() };
            let row: [*const f32; MR] = std::array::from_fn(row_of);
            for block in 0..blocks {
                let kk = block * 2 * PAIR_BLOCK;
                let n = k.saturating_sub(kk).min(2 * PAIR_BLOCK);
                for (r, &row) in row.iter().enumerate() {
                    // SAFETY: this function's contract; the loads read the `n` values of row
                    // r0 + r from kk (inside the row's k values; none past the panel's rows),
                    // the store writes the 16 slots of this row of the block.
                    unsafe {
                        let v = if r >= rows {
                            _mm512_setzero_si512()
                        } else if n == 2 * PAIR_BLOCK {
                            run_pairs(_mm512_loadu_ps(row.add(kk)), _mm512_loadu_ps(row.add(kk + 16)))
                        } else {
                            let first = _mm512_maskz_loadu_ps(lanes(n), row.add(kk));
                            let second = if n > 16 { _mm512_maskz_loadu_ps(lanes(n - 16), row.add(kk + 16)) } else { _mm512_setzero_ps() };
                            run_pairs(first, second)
                        };
                        _mm512_storeu_si512(slots(panel, block, r), v);
                    }
                }
            }
        } else {
            let at = |i: usize, kk: usize| if kk < k { a.data[a.offset + i * a.rs + kk * a.cs] } else { 0.0 };
            for block in 0..blocks {
                for r in 0..MR {
                    for q in 0..PAIR_BLOCK {
                        let s = block * PAIR_BLOCK + q;
                        panel[(block * MR + r) * PAIR_BLOCK + q] = if r < rows { pair(at(r0 + r, 2 * s), at(r0 + r, 2 * s + 1)) } else { 0.0 };
                    }
                }
            }
        }
    }
}

/// [`pack_a_blocks`] for A whose columns are contiguous (a transposed view, as `dYᵀ` in a weight
/// gradient or `Pᵀ` in attention's backward): block by block of depth, 16 rows at a time across
/// the panels, 16 steps of them loaded by interleaving two columns each (full 64-byte runs
/// whatever `MR` is), then a 16 × 16 transpose makes them 16 rows of 16 steps, each stored in
/// its panel. The 32 columns of a block stay in L1 while all `mc` rows of them are read.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_a_columns<const MR: usize>(a: Mat, i0: usize, mc: usize, k: usize, dst: &mut [f32]) {
    let depth = padded_pairs(k);
    let padded_rows = mc.div_ceil(MR) * MR;
    assert!(a.rs == 1 && dst.len() == padded_rows * depth);
    if mc == 0 || k == 0 {
        // `dst` is empty: no rows, or no steps.
        return;
    }
    assert!(a.offset + i0 + (k - 1) * a.cs + mc <= a.data.len());
    let blocks = depth / PAIR_BLOCK;
    for block in 0..blocks {
        // The columns of the next block, all `mc` rows of them, are asked for now: one column
        // per step, far apart in memory, is a pattern the hardware prefetcher does not follow.
        for kk in (block + 1) * 2 * PAIR_BLOCK..k.min((block + 2) * 2 * PAIR_BLOCK) {
            prefetch_run(a.data[a.offset + i0 + kk * a.cs..].as_ptr(), mc);
        }
        for g in (0..padded_rows).step_by(16) {
            // Rows g..g + n hold values; the rest of the group (up to the last panel's end) zeros.
            let n = mc.saturating_sub(g).min(16);
            let base = a.offset + i0 + g;
            let column = |kk: usize| (n > 0 && kk < k).then(|| a.data[base + kk * a.cs..].as_ptr());
            let steps: [__m512i; PAIR_BLOCK] = std::array::from_fn(|q| {
                let s = block * PAIR_BLOCK + q;
                match column(2 * s) {
                    // SAFETY: this function's contract; the masked loads read `n` floats of
                    // columns 2s and 2s + 1 (< k) from row i0 + g, inside A (checked above).
                    Some(lo) => unsafe { step_of_two_runs(lo, column(2 * s + 1), lanes(n)) },
                    None => _mm512_setzero_si512(),
                }
            });
            for (r, v) in transpose16(steps).into_iter().enumerate().take(padded_rows - g) {
                let (panel, row) = ((g + r) / MR, (g + r) % MR);
                let slots = &mut dst[panel * MR * depth + (block * MR + row) * PAIR_BLOCK..][..PAIR_BLOCK];
                // SAFETY: the 16 slots of row `row` of this block of the panel, inside `dst`.
                unsafe { _mm512_storeu_si512(slots.as_mut_ptr().cast(), v) };
            }
        }
    }
}

/// Steps of B ahead of the one being packed whose rows [`pack_b_pairs`] asks for.
const AHEAD: usize = 8;

/// Asks for the cache lines holding `len` floats from `p`, which packing reads soon.
#[inline]
#[target_feature(enable = "sse")]
fn prefetch_run(p: *const f32, len: usize) {
    let first = p.cast::<i8>().wrapping_sub(p as usize % 64);
    let lines = (p as usize % 64 + 4 * len).div_ceil(64);
    for line in 0..lines {
        // Prefetching reads nothing and never faults; the address is only computed.
        _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(64 * line));
    }
}

/// [`Micro::pack_b`] in blocks of pairs: [`pack_b_pairs`], then zero steps to the padded depth.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn pack_b_blocks(b: Mat, k: usize, j0: usize, nr: usize, dst: &mut [f32]) {
    let dst = &mut dst[..padded_pairs(k) * NR];
    // SAFETY: this function's contract.
    unsafe { pack_b_pairs(b, k, j0, nr, dst) };
    dst[k.div_ceil(2) * NR..].fill(0.0);
}

/// [`Micro::pack_b`] in pairs: `dst[s][j] = pair(b[2s][j0+j], b[2s+1][j0+j])`, zero beyond the
/// matrix.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_b_pairs(b: Mat, k: usize, j0: usize, nr: usize, dst: &mut [f32]) {
    let depth = k.div_ceil(2);
    let dst = &mut dst[..depth * NR];
    if nr < NR {
        dst.fill(0.0);
    }
    if b.rs == 1 {
        // Columns contiguous in k (weights used as `x·Wᵀ`): 16 columns at a time are the runs.
        for jb in (0..nr).step_by(16) {
            let n = (nr - jb).min(16);
            let runs = runs_of(n, |j| &b.data[b.offset + (j0 + jb + j) * b.cs..][..k]);
            // SAFETY: this function's contract.
            unsafe { transpose_runs(&runs[..n], k, &mut dst[jb..], NR) };
        }
    } else if b.cs == 1 {
        // Rows contiguous: rows 2s and 2s + 1 interleaved, 16 columns at a time.
        let row = |kk: usize| b.offset + kk * b.rs + j0;
        assert!(row(k - 1) + nr <= b.data.len());
        // Steps with both rows and the panel's 32 columns: unmasked loads from two row pointers.
        let whole = if nr == NR { k / 2 } else { 0 };
        for s in 0..whole {
            let (lo, hi) = (row(2 * s), row(2 * s + 1));
            // The rows ahead as the steps below ask for them, with the constant NR: one closure
            // for both loops, taking the length, made packing whole steps 1.5 times as slow.
            if 2 * (s + AHEAD) + 1 < k {
                for at in [row(2 * (s + AHEAD)), row(2 * (s + AHEAD) + 1)] {
                    prefetch_run(b.data[at..].as_ptr(), NR);
                }
            }
            // SAFETY: rows 2s and 2s + 1 (< k) hold NR floats from `lo` and `hi` (checked
            // above, nr = NR); the stores write the NR slots of step s (< depth).
            unsafe {
                let (lo, hi) = (b.data.as_ptr().add(lo), b.data.as_ptr().add(hi));
                let out = dst.as_mut_ptr().add(s * NR);
                for j in (0..NR).step_by(16) {
                    let v = interleave_pairs(_mm512_loadu_ps(lo.add(j)), _mm512_loadu_ps(hi.add(j)));
                    _mm512_storeu_si512(out.add(j).cast(), v);
                }
            }
        }
        for s in whole..depth {
            // Rows a few steps ahead are asked for now: the hardware prefetcher does not follow
            // a run of `nr` floats per row, rows far apart.
            for kk in (2 * (s + AHEAD)..k).take(2) {
                prefetch_run(b.data[row(kk)..].as_ptr(), nr);
            }
            for j in (0..nr).step_by(16) {
                let at = |kk: usize| (kk < k).then(|| b.data[row(kk) + j..].as_ptr());
                // SAFETY: this function's contract; the masked loads read at most `nr - j`
                // floats of rows 2s and 2s + 1 (< k, checked above), and the store writes 16
                // slots of step s (j + 16 ≤ NR).
                unsafe {
                    let v = step_of_two_runs(b.data[row(2 * s) + j..].as_ptr(), at(2 * s + 1), lanes(nr - j));
                    _mm512_storeu_si512(dst[s * NR + j..][..16].as_mut_ptr().cast(), v);
                }
            }
        }
    } else {
        let at = |kk: usize, j: usize| if kk < k { b.data[b.offset + kk * b.rs + (j0 + j) * b.cs] } else { 0.0 };
        for (s, out) in dst.chunks_exact_mut(NR).enumerate() {
            for (j, o) in out[..nr].iter_mut().enumerate() {
                *o = pair(at(2 * s, j), at(2 * s + 1, j));
            }
        }
    }
}

/// [`f32_at`] on R rows of A read in place, `stride` apart.
///
/// # Safety
/// As [`f32_at`], with row `r` of A at `a + r·stride`, `kc` floats long.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn f32_rows<const R: usize, const H: usize>(kc: usize, a: *const f32, stride: usize, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init) {
    unsafe { f32_at::<R, H>(kc, |kk, r| a.add(r * stride + kk), b, c, ldc, alpha, init) }
}

/// [`f32_at`] on a packed panel of A (`MR` floats per step of k, the first R of them read).
///
/// # Safety
/// As [`f32_at`], with A packed k-major.
#[target_feature(enable = "avx512f")]
unsafe fn f32_packed<const R: usize, const H: usize>(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init) {
    unsafe { f32_at::<R, H>(kc, |kk, r| a.add(kk * MR + r), b, c, ldc, alpha, init) }
}

/// The f32 micro-kernel, 12×32 whole (R = 12, H = 2; R rows and H halves of 16 columns at an
/// edge, see [`by_edge`]): `c[R×16H] = alpha · a[R×kc] · b[kc×16H] + init`, with B packed k-major
/// (32 floats a step whatever H) and element (kk, r) of A at `at(kk, r)`.
///
/// # Safety
/// The CPU must support AVX-512 F; `at` must give readable addresses for every `kk < kc`,
/// `r < R`, `b` hold `32·kc` floats, and `c` R rows of 16·H writable floats `ldc` apart.
#[inline(always)]
unsafe fn f32_at<const R: usize, const H: usize>(kc: usize, at: impl Fn(usize, usize) -> *const f32, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init) {
    unsafe {
        prefetch_tile::<R, H>(c, ldc);
        let mut c0 = [_mm512_setzero_ps(); R];
        let mut c1 = [_mm512_setzero_ps(); R];
        let mut b = b;
        for kk in 0..kc {
            let b0 = _mm512_loadu_ps(b);
            let b1 = if H == 2 { _mm512_loadu_ps(b.add(16)) } else { b0 };
            for r in 0..R {
                let ar = _mm512_set1_ps(*at(kk, r));
                c0[r] = _mm512_fmadd_ps(ar, b0, c0[r]);
                if H == 2 {
                    c1[r] = _mm512_fmadd_ps(ar, b1, c1[r]);
                }
            }
            b = b.add(NR);
        }
        store_tile::<R, H>(c0, c1, c, ldc, alpha, init);
    }
}

/// The bf16 micro-kernel, 12×32 whole (R = 12, H = 2; R rows and H halves of 16 columns at an
/// edge, see [`by_edge`]): `c[R×16H] = alpha · a · b + init` over `steps` pairs of k, A packed by
/// [`pack_a_blocks`] (`dst[block][r][q]`, 12 rows whatever R) and B by [`pack_b_blocks`]
/// (`dst[s][j]`, 32 columns whatever H). `steps` may stop inside a block: the padding after it
/// is not multiplied.
///
/// # Safety
/// The CPU must support AVX-512 F and BF16; `a` must hold `12·steps` slots, `b` `32·steps`, and
/// `c` R rows of 16·H writable floats `ldc` apart.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_packed<const R: usize, const H: usize>(steps: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init) {
    unsafe {
        prefetch_tile::<R, H>(c, ldc);
        let mut c0 = [_mm512_setzero_ps(); R];
        let mut c1 = [_mm512_setzero_ps(); R];
        let (a, mut b) = (a.cast::<i32>(), b.cast::<i32>());
        // Pair `q` of the block of A at `a`, by the step of B at `b`.
        let mut step = |a: *const i32, q: usize, b: *const i32| {
            // Loaded as integers: the slots are bit patterns (a pair may look like a NaN).
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.cast()));
            let b1: __m512bh = if H == 2 { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b.add(16).cast())) } else { b0 };
            for r in 0..R {
                let ar: __m512bh = std::mem::transmute(_mm512_set1_epi32(a.add(r * PAIR_BLOCK + q).read_unaligned()));
                c0[r] = _mm512_dpbf16_ps(c0[r], ar, b0);
                if H == 2 {
                    c1[r] = _mm512_dpbf16_ps(c1[r], ar, b1);
                }
            }
        };
        let blocks = steps / PAIR_BLOCK;
        for block in 0..blocks {
            let a = a.add(block * MR * PAIR_BLOCK);
            // A constant count, so the compiler unrolls the block whole.
            for q in 0..PAIR_BLOCK {
                step(a, q, b);
                b = b.add(NR);
            }
        }
        // The last block's live pairs (a depth of 197 is 99 pairs: 6 blocks and 3 pairs, where
        // a whole seventh block would multiply 13 pairs of zeros).
        let a = a.add(blocks * MR * PAIR_BLOCK);
        for q in 0..steps % PAIR_BLOCK {
            step(a, q, b);
            b = b.add(NR);
        }
        store_tile::<R, H>(c0, c1, c, ldc, alpha, init);
    }
}

/// Fetches a tile of C (R rows of 16·H floats) while the products run (it is read or written
/// only at the end).
///
/// # Safety
/// The CPU must support SSE; prefetches never fault, but `c + r·ldc + 16·H − 1` must not
/// overflow.
#[inline(always)]
unsafe fn prefetch_tile<const R: usize, const H: usize>(c: *mut f32, ldc: usize) {
    for r in 0..R {
        // SAFETY: address arithmetic inside the caller's tile; prefetching reads nothing.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc).cast());
            _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc + 16 * H - 1).cast());
            if H == 2 {
                _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc + 16).cast());
            }
        }
    }
}

/// `c = alpha·acc + init` for a tile of R rows held as H halves of 16 columns (`c1` unused when
/// H is 1).
///
/// # Safety
/// The CPU must support AVX-512 F; `c` must hold R rows of 16·H writable floats `ldc` apart,
/// and an [`Init::Row`] 16·H readable floats.
#[inline(always)]
unsafe fn store_tile<const R: usize, const H: usize>(c0: [__m512; R], c1: [__m512; R], c: *mut f32, ldc: usize, alpha: f32, init: Init) {
    unsafe {
        let alpha = _mm512_set1_ps(alpha);
        // What is added: rows `ld` apart from `add` (C's own rows, or the bias row every time).
        let (add, ld) = init.rows(c, ldc);
        for r in 0..R {
            let row = c.add(r * ldc);
            if !add.is_null() {
                let add = add.add(r * ld);
                _mm512_storeu_ps(row, _mm512_fmadd_ps(alpha, c0[r], _mm512_loadu_ps(add)));
                if H == 2 {
                    _mm512_storeu_ps(row.add(16), _mm512_fmadd_ps(alpha, c1[r], _mm512_loadu_ps(add.add(16))));
                }
            } else {
                _mm512_storeu_ps(row, _mm512_mul_ps(alpha, c0[r]));
                if H == 2 {
                    _mm512_storeu_ps(row.add(16), _mm512_mul_ps(alpha, c1[r]));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packing in pairs puts each value's bf16 where the kernels read it, for every layout of
    /// each operand (row-major, column-major, neither), a depth with whole runs of 32, a block
    /// cut short and an odd tail, cut panels of A (12 rows for `vdpbf16ps`, 32 for AMX) and of
    /// B, and zero pairs to the padded depth: bit for bit what `half` gives.
    #[test]
    fn pairs_hold_the_rounded_values_in_place() {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx512f") && has!("avx512bw") && has!("avx512bf16")) {
            eprintln!("no AVX-512 BF16 here: the packing in pairs cannot run");
            return;
        }
        let (m, k) = (40usize, 71usize);
        let data: Vec<f32> = (0..2 * m * k).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let bits = |x: f32| u32::from(half::bf16::from_f32(x).to_bits());
        let depth = padded_pairs(k);
        assert_eq!(depth, 48);
        let strided = Mat { data: &data, offset: 1, rows: m, cols: k, rs: 2 * k, cs: 2 };
        for view in [Mat::rows(&data, m, k), Mat::rows(&data, k, m).t(), strided] {
            let want = |i: usize, kk: usize| if kk < k { bits(view.data[view.offset + i * view.rs + kk * view.cs]) } else { 0 };
            let slot = |i: usize, s: usize| want(i, 2 * s) | want(i, 2 * s + 1) << 16;
            let layout = format!("rs {} cs {}", view.rs, view.cs);
            // Rows of A from i0, mc of them: rows 3..16 are one whole panel of 12 and one cut to
            // a single row (for 32-row panels, one cut to 13 rows); the others make groups of 16
            // rows (a transposed view is packed 16 rows at a time) straddle panels, end inside
            // one, and run to the last row of A.
            fn check<const R: usize>(view: Mat, k: usize, depth: usize, slot: &dyn Fn(usize, usize) -> u32, layout: &str) {
                for (i0, mc) in [(3usize, 13usize), (0, 40), (5, 35), (1, 17), (7, 24)] {
                    let mut dst = vec![f32::NAN; mc.div_ceil(R) * R * depth];
                    // SAFETY: the caller checked that the CPU has AVX-512 F, BW and BF16.
                    unsafe { pack_a_blocks::<R>(view, i0, mc, k, &mut dst) };
                    for i in 0..mc.div_ceil(R) * R {
                        for s in 0..depth {
                            let at = (i / R) * R * depth + (s / PAIR_BLOCK) * R * PAIR_BLOCK + (i % R) * PAIR_BLOCK + s % PAIR_BLOCK;
                            let expect = if i < mc { slot(i0 + i, s) } else { 0 };
                            assert_eq!(dst[at].to_bits(), expect, "A ({R} rows from {i0}, {mc} of them) {layout}: row {i} pair {s}");
                        }
                    }
                }
            }
            check::<MR>(view, k, depth, &slot, &layout);
            check::<32>(view, k, depth, &slot, &layout);
            // The same view as B (k×m): a whole panel of 32 columns, then one cut to 8.
            let bview = view.t();
            for (j0, nr) in [(0, 32), (32, 8)] {
                let mut dst = vec![f32::NAN; depth * NR];
                // SAFETY: as above.
                unsafe { pack_b_blocks(bview, k, j0, nr, &mut dst) };
                for s in 0..depth {
                    for j in 0..NR {
                        let expect = if j < nr { slot(j0 + j, s) } else { 0 };
                        assert_eq!(dst[s * NR + j].to_bits(), expect, "B {layout}: column {} pair {s}", j0 + j);
                    }
                }
            }
        }
    }
}
