//! A blocked single-precision matrix product for x86-64, after BLIS (Goto's algorithm): a
//! register-blocked micro-kernel ([`Micro`]: 6×16 with AVX2 + FMA here, 12×32 with AVX-512 in
//! `avx512.rs`, 32×32 on AMX tiles in `amx.rs`), B packed once into NR-wide panels, and A read in place when its rows are
//! contiguous (packed otherwise). Each rayon task owns a block of rows (and, where there are few
//! blocks, a range of columns) and finishes one strip of C over the whole depth before the next,
//! so the strip stays in L2.
//!
//! Matrix products are two thirds to three quarters of a ViT step. Against the `gemm` crate
//! (which candle uses, and which this replaces where the CPU has AVX2 and FMA), the gain is in
//! the transposed operands of backward: the weight gradient `dYᵀ·X` reads A column-major, and
//! packing it well (contiguous copies, 8×8 register transposes for `Wᵀ`) is most of the
//! difference. `VITFORGE_GENERIC_GEMM=1` switches back to the crate, to compare.
//!
//! In bf16 an f32 kernel gets every operand packed (A too) and rounded to bfloat16 as it is
//! packed: it then multiplies bf16 values exactly and accumulates in f32, as `vdpbf16ps` and AMX
//! do. A kernel with [`Micro::PAIRS`] (AVX-512 BF16) packs pairs of bf16 values of k instead.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::{ElementWise, Mat, MatMut, Onto, Scratch};
use crate::model::precision::round_bf16;

/// A micro-kernel: its tile, its depth blocking, and how its operands are packed.
pub(super) trait Micro {
    /// Rows of the tile (broadcasts of A per step).
    const MR: usize;
    /// Columns of the tile.
    const NR: usize;
    /// Packed steps of depth per pass: a `KC × NR` panel of B stays in L1 while the tiles of a
    /// block of rows pass over it.
    const KC: usize;
    /// Whether a packed step holds two values of k, as a pair of bf16 in one 32-bit slot (low
    /// half first), rather than one f32.
    const PAIRS: bool;
    /// Packed steps come in blocks of this many (KC is a multiple of it): the depth is padded
    /// with zero steps to whole blocks (AMX tiles take 16 pairs of k at a time).
    const STEP_BLOCK: usize = 1;
    /// Whether [`Micro::packed`] takes a count of steps that stops inside a block (the last
    /// one's padding then not multiplied), rather than whole blocks only (AMX's tiles).
    const PARTIAL_BLOCK: bool = false;

    /// Packs rows `i0..i0+mc` of `a` (all of k, padded to whole blocks of steps) into panels of
    /// MR rows, `MR · STEP_BLOCK` slots per block (`dst[panel][block][..]`, step-major within
    /// it, `dst[panel][step][r]`, unless the kernel says otherwise), zero-padded.
    fn pack_a(a: Mat, i0: usize, mc: usize, k: usize, dst: &mut [f32]);

    /// Packs columns `j0..j0+nr` of `b` (all of k, padded to whole blocks of steps) as one
    /// NR-wide panel, step-major (`dst[step][j]`), zero-padded.
    fn pack_b(b: Mat, k: usize, j0: usize, nr: usize, dst: &mut [f32]);

    /// `c[MR×NR] = alpha · a · b + init` over `steps` packed steps, A packed.
    ///
    /// # Safety
    /// The CPU must run the kernel's instructions; `a` must hold `MR·steps` floats, `b`
    /// `NR·steps`, `c` MR rows of NR writable floats `ldc` apart, and an [`Init::Row`] NR
    /// readable floats.
    unsafe fn packed(steps: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init);

    /// As [`Micro::packed`] with A's MR rows read in place, `stride` apart, `kc` floats each
    /// (only called when not [`Micro::PAIRS`]).
    ///
    /// # Safety
    /// As [`Micro::packed`], with row `r` of A at `a + r·stride`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows(kc: usize, a: *const f32, stride: usize, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init);

    /// As [`Micro::packed`] for a tile cut by the matrix's edge, of which only the first `mr`
    /// rows and `nr` columns are wanted: a kernel may compute a smaller tile that covers them
    /// (what it writes past them is never read). By default the whole tile.
    ///
    /// # Safety
    /// As [`Micro::packed`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn packed_edge(steps: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init, mr: usize, nr: usize) {
        let _ = (mr, nr);
        // SAFETY: as the caller's contract.
        unsafe { Self::packed(steps, a, b, c, ldc, alpha, init) }
    }

    /// As [`Micro::rows`] for a tile cut by the matrix's edge on the right, of which only the
    /// first `nr` columns are wanted (as [`Micro::packed_edge`]).
    ///
    /// # Safety
    /// As [`Micro::rows`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_edge(kc: usize, a: *const f32, stride: usize, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init, nr: usize) {
        let _ = nr;
        // SAFETY: as the caller's contract.
        unsafe { Self::rows(kc, a, stride, b, c, ldc, alpha, init) }
    }
}

/// What a micro-kernel adds its product to.
#[derive(Clone, Copy)]
pub(super) enum Init {
    /// Nothing.
    Zero,
    /// The tile of C as it is.
    C,
    /// One row of NR floats (the bias of the tile's columns), added to every row.
    Row(*const f32),
}

impl Init {
    /// What a kernel adds as it stores a tile of C at `c` (rows `ldc` apart): row `r` of it at
    /// `add + r·ld`, or nothing when `add` is null. (Two plain values rather than a match per
    /// row: a match in the store phase made the compiler write the bf16 kernel's accumulators
    /// to the stack on every step.)
    #[inline(always)]
    pub(super) fn rows(self, c: *mut f32, ldc: usize) -> (*const f32, usize) {
        match self {
            Init::Zero => (std::ptr::null(), 0),
            Init::C => (c.cast_const(), ldc),
            Init::Row(bias) => (bias, 0),
        }
    }
}

/// The AVX2 + FMA kernel: 6×16 (12 accumulators, two loads of B and six broadcasts of A per
/// step of k).
pub(super) struct Avx2;

impl Micro for Avx2 {
    const MR: usize = AVX2_MR;
    const NR: usize = AVX2_NR;
    /// A `256 × 16` panel of B (16 KiB) and six rows of A (6 KiB) fit in L1 together.
    const KC: usize = 256;
    const PAIRS: bool = false;

    fn pack_a(a: Mat, i0: usize, mc: usize, k: usize, dst: &mut [f32]) {
        pack_a::<AVX2_MR>(a, i0, mc, k, dst)
    }

    fn pack_b(b: Mat, k: usize, j0: usize, nr: usize, dst: &mut [f32]) {
        pack_b::<AVX2_NR>(b, k, j0, nr, dst)
    }

    unsafe fn packed(steps: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init) {
        // SAFETY: as the trait's contract.
        unsafe { kernel(steps, a, b, c, ldc, alpha, init) }
    }

    unsafe fn rows(kc: usize, a: *const f32, stride: usize, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init) {
        // SAFETY: as the trait's contract.
        unsafe { kernel_rows(kc, a, stride, b, c, ldc, alpha, init) }
    }
}

/// Rows of A per task: its `MC × KC` block is at most 96 KiB, in L2 (a multiple of every MR).
const MC: usize = 96;
/// Columns of a strip of C finished before the next (`MC × NS` is 48 KiB, in L2).
const NS: usize = 128;
/// The largest tile of any kernel, in floats (the scratch tile for cut edges).
const MAX_TILE: usize = 32 * 32;

/// A raw pointer that may cross to rayon's threads: every task writes a disjoint set of rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint rows of the output (see `gemm`), and the pointer outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `alpha·a·b` onto `onto` (nothing, C, or a bias row) by the kernel `K`; views already checked
/// by the caller (a bias has one value per column), and the CPU runs `K`'s instructions.
/// `parallel`: spread the work over rayon's pool; `bf16`: round the operands to bfloat16 (what a
/// kernel of pairs always does).
///
/// B is packed whole, once (NR-wide panels over the full depth, see [`pack_panels`]); each task
/// then takes MC rows of A (read in place when row-major, else packed over the full depth) and
/// walks its columns in strips of `NS`, finishing each strip over all of k before the next, so
/// the strip of C it updates stays in L2 instead of being reloaded from memory for every block
/// of depth.
pub(super) fn gemm<K: Micro>(a: Mat, b: Mat, c: MatMut, step: Step) {
    gemm_parts::<K>(a, &[b], c, step)
}

/// [`gemm()`] by the matrix made of `parts` side by side (each `a.cols` deep), which must
/// [`parts_align`]: one product, so A is packed once for all of them.
pub(super) fn gemm_parts<K: Micro>(a: Mat, parts: &[Mat], c: MatMut, step: Step) {
    B_SCRATCH.with(|scratch| {
        scratch.with(packed_len::<K>(a.cols, c.cols), |bpack| {
            pack_parts::<K>(parts, step.bf16, step.parallel, bpack);
            gemm_packed::<K>(a, bpack, c, step)
        })
    });
}

/// Whether the matrix made of `parts` side by side packs as its parts packed one after the
/// other: every part but the last fills whole NR-wide panels of `K`, so no panel straddles two.
pub(super) fn parts_align<K: Micro>(parts: &[Mat]) -> bool {
    parts.iter().rev().skip(1).all(|p| p.cols.is_multiple_of(K::NR))
}

/// Packs the matrix made of `parts` side by side (equally deep; they must [`parts_align`]) into
/// `dst` as [`pack_panels`] packs one matrix: each part's panels after the one before's.
pub(super) fn pack_parts<K: Micro>(parts: &[Mat], bf16: bool, parallel: bool, dst: &mut [f32]) {
    debug_assert!(parts_align::<K>(parts));
    let mut at = 0;
    for &part in parts {
        let len = packed_len::<K>(part.rows, part.cols);
        pack_panels::<K>(part, bf16, parallel, &mut dst[at..at + len]);
        at += len;
    }
}

/// Floats of B packed for `K` (all of its panels): depth `k`, `n` columns.
pub(super) fn packed_len<K: Micro>(k: usize, n: usize) -> usize {
    n.div_ceil(K::NR) * K::NR * steps::<K>(k)
}

/// Packs all of `b` for `K` into `dst` ([`packed_len`] floats): NR-wide panels over the full
/// depth, rounded to bfloat16 in `bf16` (or as pairs of bf16 by a kernel of pairs), on rayon's
/// pool when `parallel`. A product of `K` can take B packed once this way for many products
/// ([`gemm_packed`]), as a model's weights are at inference.
pub(super) fn pack_panels<K: Micro>(b: Mat, bf16: bool, parallel: bool, dst: &mut [f32]) {
    let (n, k) = (b.cols, b.rows);
    let depth = steps::<K>(k);
    let round = bf16 && !K::PAIRS;
    let pack = |(p, dst): (usize, &mut [f32])| {
        K::pack_b(b, k, p * K::NR, K::NR.min(n - p * K::NR), dst);
        if round {
            round_packed(&mut dst[..depth * K::NR]);
        }
    };
    let dst = &mut dst[..packed_len::<K>(k, n)];
    if parallel && n > K::NR {
        dst.par_chunks_mut(K::NR * depth).enumerate().for_each(pack);
    } else {
        dst.chunks_mut(K::NR * depth).enumerate().for_each(pack);
    }
}

/// [`gemm()`] with B already packed by [`pack_panels`] for `K` at the same precision (`step.bf16`);
/// C's view gives the product's shape.
pub(super) fn gemm_packed<K: Micro>(a: Mat, bpack: &[f32], c: MatMut, step: Step) {
    debug_assert!(K::MR * K::NR <= MAX_TILE && MC.is_multiple_of(K::MR) && NS.is_multiple_of(K::NR));
    debug_assert!(K::KC.is_multiple_of(K::STEP_BLOCK));
    assert_eq!(bpack.len(), packed_len::<K>(a.cols, c.cols), "B packed for this kernel and shape");
    let out = OutPtr(c.data[c.offset..].as_mut_ptr());
    run::<K>(a, bpack, c.cols, c.rows, c.rs, out, step)
}

/// Packed steps for a depth of `k`, padded to whole blocks of [`Micro::STEP_BLOCK`].
fn steps<K: Micro>(k: usize) -> usize {
    unpadded_steps::<K>(k).next_multiple_of(K::STEP_BLOCK)
}

/// Steps that hold some of a depth of `k`: its values, or its pairs.
fn unpadded_steps<K: Micro>(k: usize) -> usize {
    if K::PAIRS { k.div_ceil(2) } else { k }
}

/// How [`run`] runs: the scale, what it adds to, on how many threads, in which precision, and
/// what it applies to A's values first.
#[derive(Clone, Copy)]
pub(super) struct Step<'a> {
    pub(super) alpha: f32,
    pub(super) onto: Onto<'a>,
    pub(super) parallel: bool,
    pub(super) bf16: bool,
    /// `f` of `f(A)·B`, for a row-major A: applied as A is packed ([`pack_a_mapped`]).
    pub(super) map: Option<ElementWise<'a>>,
}

/// The driver's loop nest over packed B (`n` columns).
// long: the kernel driver's loop nest (tasks, strips, depth blocks, micro-tiles) reads best whole.
fn run<K: Micro>(a: Mat, bpack: &[f32], n: usize, m: usize, ldc: usize, out: OutPtr, step: Step) {
    let Step { alpha, onto, parallel, bf16, map } = step;
    let (mr_, nr_) = (K::MR, K::NR);
    let k = a.cols;
    let depth = steps::<K>(k);
    // The steps multiplied: the packed depth, or short of its padding where the kernel allows.
    let live = if K::PARTIAL_BLOCK { unpadded_steps::<K>(k) } else { depth };
    let round = bf16 && !K::PAIRS;
    let panels = n.div_ceil(nr_);
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    // Tasks: row blocks of at most MC rows, and when there are few of them, column ranges too.
    // The blocks are whole micro-tiles shared out evenly, not MC rows and a remainder: 197
    // rows (one image of ViT-S/16) as 96 + 96 + 5 left one thread with a third of the work
    // and the other with the sliver; as 72 + 72 + 53 the two finish together.
    let tiles = m.div_ceil(mr_);
    let mut row_blocks = tiles.div_ceil(MC / mr_);
    if threads > 1 && row_blocks > 1 {
        row_blocks = row_blocks.next_multiple_of(threads).min(tiles);
    }
    let block = |ib: usize| {
        let (t0, t1) = (ib * tiles / row_blocks, (ib + 1) * tiles / row_blocks);
        (t0 * mr_, (t1 * mr_).min(m) - t0 * mr_)
    };
    let col_parts = if threads > 1 {
        (threads * 3).div_ceil(row_blocks).clamp(1, panels)
    } else {
        1
    };
    let panels_per_part = panels.div_ceil(col_parts);
    let strip = NS / nr_;
    // Tasks are numbered column part first: rayon hands each thread a contiguous half of the
    // numbers, which is then a half of the columns over every row block, the same work for
    // each whichever block is one tile taller, and B's columns one thread reads stay its own.
    // Numbered row block first, a half was whole row blocks: 197 rows (17 tiles of 12) as
    // 4 + 4 | 4 + 5 tiles, and ViT-S's products at batch 1 ran 1.61–1.85× faster on two threads
    // than on one, against 1.83–1.99× now (bench/RESULTS.md).
    // Row-major A is read in place, MR rows at a time (its rows are contiguous in k); only a
    // last partial panel, or A in any other layout or precision, or mapped, is packed.
    let direct = a.cs == 1 && !bf16 && !K::PAIRS && map.is_none();
    // Packs `rows` rows of A from row `i0` (all of k) into `dst`.
    let pack = |i0: usize, rows: usize, dst: &mut [f32]| {
        match map {
            None => K::pack_a(a, i0, rows, k, dst),
            Some(f) => pack_a_mapped::<K>(a, f, i0, rows, dst),
        }
        if round {
            round_packed(dst);
        }
    };
    // Where tasks share a block of rows (few rows, split by columns too: one image's 197),
    // A is packed once, block by block on the pool, before the products, rather than by every
    // task that multiplies the block: at batch 1 each row of fc2's input was its GELU computed
    // twice, once per half of the columns.
    let shared = col_parts > 1 && !direct;
    // The tasks, on A packed whole in `all` where `shared` (else `all` is empty and each task
    // packs its own rows).
    let multiply = |all: &mut [f32]| {
        if shared {
            // Blocks are whole runs of tiles, in order: each one's panels follow the last's.
            let mut blocks = Vec::with_capacity(row_blocks);
            let mut rest = &mut *all;
            for ib in 0..row_blocks {
                let (ic, mc) = block(ib);
                let (packed, after) = rest.split_at_mut(mc.next_multiple_of(mr_) * depth);
                blocks.push((ic, mc, packed));
                rest = after;
            }
            blocks.into_par_iter().for_each(|(ic, mc, packed)| pack(ic, mc, packed));
        }
        let all = &*all;
        let task = |t: usize| {
            let (ib, part) = (t % row_blocks, t / row_blocks);
            let (ic, mc) = block(ib);
            let p0 = part * panels_per_part;
            let p1 = panels.min(p0 + panels_per_part);
            if p0 >= p1 {
                return;
            }
            let whole = if direct { mc / mr_ * mr_ } else { 0 };
            let packed_rows = mc - whole;
            // The task's products, on its rows of A packed in `apack` (those past `whole`).
            let products = |apack: &[f32]| {
                // The whole `OutPtr` (Send), not its raw pointer field, is what the closure
                // below must capture.
                #[allow(clippy::redundant_locals)]
                let out = out;
                for s0 in (p0..p1).step_by(strip) {
                    let s1 = p1.min(s0 + strip);
                    for pc in (0..live).step_by(K::KC) {
                        let kc = K::KC.min(live - pc);
                        for p in s0..s1 {
                            let (j, nr) = (p * nr_, nr_.min(n - p * nr_));
                            // The first block of depth starts from nothing, C or the bias
                            // (this panel's part of it); later ones add to what the blocks
                            // before wrote.
                            let init = match onto {
                                _ if pc > 0 => Onto::C,
                                Onto::Bias(bias) => Onto::Bias(&bias[j..j + nr]),
                                other => other,
                            };
                            let panel = p * nr_ * depth;
                            let bpanel = &bpack[panel + pc * nr_..panel + (pc + kc) * nr_];
                            for i in (0..mc).step_by(mr_) {
                                let mr = mr_.min(mc - i);
                                let apanel = if i < whole {
                                    let start = a.offset + (ic + i) * a.rs + pc;
                                    APanel::Rows(&a.data[start..start + (mr_ - 1) * a.rs + kc], a.rs)
                                } else {
                                    let i = i - whole;
                                    APanel::Packed(&apack[i * depth + pc * mr_..i * depth + (pc + kc) * mr_])
                                };
                                // SAFETY: rows ic+i..ic+i+mr and columns j..j+nr lie
                                // inside the output view (checked by the caller); this
                                // task owns rows ic..ic+mc for the columns of panels
                                // p0..p1, which no other task writes. The caller checked
                                // that the CPU runs `K`.
                                unsafe {
                                    let dst = out.0.add((ic + i) * ldc + j);
                                    tile::<K>(kc, apanel, bpanel, dst, ldc, mr, nr, alpha, init);
                                }
                            }
                        }
                    }
                }
            };
            if shared {
                products(&all[ic * depth..][..packed_rows.next_multiple_of(mr_) * depth]);
            } else {
                A_SCRATCH.with(|scratch| {
                    scratch.with(packed_rows.next_multiple_of(mr_) * depth, |apack| {
                        pack(ic + whole, packed_rows, apack);
                        products(apack)
                    })
                });
            }
        };
        let tasks = row_blocks * col_parts;
        if threads > 1 && tasks > 1 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    };
    if shared {
        SHARED_A_SCRATCH.with(|scratch| scratch.with(tiles * mr_ * depth, multiply));
    } else {
        multiply(&mut []);
    }
}

// Packing space for B and A, for a panel of A's rows mapped before they are packed, and for
// all of A where tasks share it ([`Scratch`]).
thread_local! {
    static B_SCRATCH: Scratch = const { Scratch(std::cell::RefCell::new(Vec::new())) };
    static A_SCRATCH: Scratch = const { Scratch(std::cell::RefCell::new(Vec::new())) };
    static MAPPED_SCRATCH: Scratch = const { Scratch(std::cell::RefCell::new(Vec::new())) };
    static SHARED_A_SCRATCH: Scratch = const { Scratch(std::cell::RefCell::new(Vec::new())) };
}

/// [`Micro::pack_a`] of `f(a)` for a row-major `a` (all of its columns): each panel's MR rows
/// are mapped into this thread's space (`MR × k` floats, in L2), then packed from there, so
/// `f(A)` is never written to memory whole, nor read back, as a pass of its own would.
fn pack_a_mapped<K: Micro>(a: Mat, f: ElementWise, i0: usize, mc: usize, dst: &mut [f32]) {
    let k = a.cols;
    assert_eq!(a.cs, 1, "a mapped A is row-major");
    let per_panel = K::MR * steps::<K>(k);
    MAPPED_SCRATCH.with(|scratch| {
        scratch.with(K::MR * k, |mapped| {
            for (p, panel) in dst[..mc.div_ceil(K::MR) * per_panel].chunks_mut(per_panel).enumerate() {
                let r0 = i0 + p * K::MR;
                let rows = K::MR.min(i0 + mc - r0);
                for (r, out) in mapped.chunks_mut(k).take(rows).enumerate() {
                    f(&a.data[a.offset + (r0 + r) * a.rs..][..k], out);
                }
                K::pack_a(Mat::rows(&mapped[..rows * k], rows, k), 0, rows, k, panel);
            }
        })
    });
}

/// Packs rows `i0..i0+mc` of `a` (all `k` columns) into panels of MR rows, k-major
/// (`dst[panel][kk][r]`), zero-padding the last panel.
pub(super) fn pack_a<const MR: usize>(a: Mat, i0: usize, mc: usize, k: usize, dst: &mut [f32]) {
    let dst = &mut dst[..mc.div_ceil(MR) * MR * k];
    if a.rs == 1 {
        // Column-major A (a transposed view): at each kk the block's rows are contiguous; walk
        // kk outside so the source is read once, front to back.
        let whole = mc / MR;
        for kk in 0..k {
            let src = &a.data[a.offset + i0 + kk * a.cs..][..mc];
            for (pi, chunk) in src.chunks(MR).enumerate() {
                let out = &mut dst[pi * MR * k + kk * MR..][..MR];
                if pi < whole {
                    // Fixed-size copies compile to moves, not a call to memcpy.
                    let out: &mut [f32; MR] = out.try_into().expect("MR floats");
                    *out = chunk.try_into().expect("MR floats");
                } else {
                    out[..chunk.len()].copy_from_slice(chunk);
                    out[chunk.len()..].fill(0.0);
                }
            }
        }
        return;
    }
    for (pi, panel) in dst.chunks_mut(MR * k).enumerate() {
        let r0 = i0 + pi * MR;
        let rows = MR.min(i0 + mc - r0);
        if rows < MR {
            panel.fill(0.0);
        }
        if a.cs == 1 {
            let src: Vec<&[f32]> = (0..rows).map(|r| &a.data[a.offset + (r0 + r) * a.rs..][..k]).collect();
            for (kk, out) in panel.chunks_exact_mut(MR).enumerate() {
                for (o, row) in out.iter_mut().zip(&src) {
                    *o = row[kk];
                }
            }
        } else {
            for (kk, out) in panel.chunks_exact_mut(MR).enumerate() {
                for (r, o) in out[..rows].iter_mut().enumerate() {
                    *o = a.data[a.offset + (r0 + r) * a.rs + kk * a.cs];
                }
            }
        }
    }
}

/// Packs columns `j0..j0+nr` of `b` (all `k` rows) as one NR-wide panel (NR a multiple of 8),
/// k-major (`dst[kk][j]`), zero-padding missing columns.
pub(super) fn pack_b<const NR: usize>(b: Mat, k: usize, j0: usize, nr: usize, dst: &mut [f32]) {
    let dst = &mut dst[..k * NR];
    if nr < NR {
        dst.fill(0.0);
    }
    if b.cs == 1 {
        for (kk, out) in dst.chunks_exact_mut(NR).enumerate() {
            let base = b.offset + kk * b.rs + j0;
            if nr == NR {
                let out: &mut [f32; NR] = out.try_into().expect("NR floats");
                *out = b.data[base..base + NR].try_into().expect("NR floats");
            } else {
                out[..nr].copy_from_slice(&b.data[base..base + nr]);
            }
        }
    } else if b.rs == 1 && nr == NR {
        // Row-major Bᵀ (weights used as `x·Wᵀ`): each column is contiguous; transpose 8×8
        // blocks in registers.
        let whole = k / 8 * 8;
        let cols: [&[f32]; NR] =
            std::array::from_fn(|j| &b.data[b.offset + (j0 + j) * b.cs..][..k]);
        // SAFETY: AVX2 is available (this module only runs where it is); every column holds k
        // floats and `dst` k·NR.
        unsafe { transpose_panel(&cols, whole, dst) };
        for kk in whole..k {
            for (j, col) in cols.iter().enumerate() {
                dst[kk * NR + j] = col[kk];
            }
        }
    } else {
        for (kk, out) in dst.chunks_exact_mut(NR).enumerate() {
            for (j, o) in out[..nr].iter_mut().enumerate() {
                *o = b.data[b.offset + kk * b.rs + (j0 + j) * b.cs];
            }
        }
    }
}

/// `dst[kk][j] = cols[j][kk]` for `kk < whole` (a multiple of 8), by 8×8 register transposes.
///
/// # Safety
/// AVX2 must be available; every column must hold at least `whole` floats, `dst` `whole·NR`.
#[target_feature(enable = "avx2")]
unsafe fn transpose_panel<const NR: usize>(cols: &[&[f32]; NR], whole: usize, dst: &mut [f32]) {
    assert!(cols.iter().all(|c| c.len() >= whole) && dst.len() >= whole * NR && NR.is_multiple_of(8));
    unsafe {
        for kk in (0..whole).step_by(8) {
            for half in 0..NR / 8 {
                let r: [__m256; 8] =
                    std::array::from_fn(|j| _mm256_loadu_ps(cols[half * 8 + j].as_ptr().add(kk)));
                let t = transpose8(r);
                for (i, v) in t.iter().enumerate() {
                    _mm256_storeu_ps(dst.as_mut_ptr().add((kk + i) * NR + half * 8), *v);
                }
            }
        }
    }
}

/// Transposes an 8×8 block held as eight rows.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// Rounds a packed panel to bfloat16 in place (ties to even; NaN stays NaN), eight at a time.
pub(super) fn round_packed(xs: &mut [f32]) {
    let whole = xs.len() / 8 * 8;
    // SAFETY: AVX2 is available (this module only runs where it is); `whole` floats are in `xs`.
    unsafe { round_bf16_avx2(&mut xs[..whole]) };
    for x in &mut xs[whole..] {
        *x = round_bf16(*x);
    }
}

/// [`round_packed`] on a multiple of eight floats: `bits + 0x7fff + (bit 16)`, cut to the top
/// 16 bits, as `half::bf16::from_f32` rounds (NaNs are kept, made quiet).
///
/// # Safety
/// AVX2 must be available; `xs.len()` must be a multiple of 8.
#[target_feature(enable = "avx2")]
unsafe fn round_bf16_avx2(xs: &mut [f32]) {
    assert!(xs.len().is_multiple_of(8));
    let one = _mm256_set1_epi32(1);
    let bias = _mm256_set1_epi32(0x7fff);
    let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
    let abs = _mm256_set1_epi32(0x7fff_ffff);
    let inf = _mm256_set1_epi32(0x7f80_0000);
    let quiet = _mm256_set1_epi32(0x0040_0000);
    for chunk in xs.chunks_exact_mut(8) {
        // SAFETY: each chunk is eight floats, read and written unaligned.
        unsafe {
            let p = chunk.as_mut_ptr().cast::<__m256i>();
            let v = _mm256_loadu_si256(p);
            let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(v), one);
            let rounded = _mm256_and_si256(_mm256_add_epi32(v, _mm256_add_epi32(bias, lsb)), high);
            let nan = _mm256_cmpgt_epi32(_mm256_and_si256(v, abs), inf);
            let quiet_nan = _mm256_and_si256(_mm256_or_si256(v, quiet), high);
            _mm256_storeu_si256(p, _mm256_blendv_epi8(rounded, quiet_nan, nan));
        }
    }
}

/// Where a micro-tile's MR rows of A come from.
#[derive(Clone, Copy)]
enum APanel<'a> {
    /// Packed, step-major: `MR · steps` floats.
    Packed(&'a [f32]),
    /// In place: MR rows `stride` apart, each `kc` long, from the slice's start.
    Rows(&'a [f32], usize),
}

/// One micro-tile of the kernel `K`, onto `init` (a bias is the tile's `nr` values of it): the
/// full kernel into `c` when the tile is whole, through a scratch tile when it is cut by the
/// matrix's edge.
///
/// # Safety
/// The CPU must run `K`'s instructions; `c` must point at `mr` rows of `nr` writable floats,
/// `ldc` apart.
#[allow(clippy::too_many_arguments)]
unsafe fn tile<K: Micro>(kc: usize, a: APanel, b: &[f32], c: *mut f32, ldc: usize, mr: usize, nr: usize, alpha: f32, init: Onto) {
    assert!(b.len() >= kc * K::NR && K::MR * K::NR <= MAX_TILE);
    // SAFETY: the caller checked the CPU; the panels hold what the kernel reads (checked here),
    // `dst` is either the caller's whole tile or a scratch tile, and a row is NR floats.
    let whole = mr == K::MR && nr == K::NR;
    let run = |dst: *mut f32, ld: usize, init: Init| unsafe {
        match a {
            APanel::Packed(a) => {
                assert!(a.len() >= kc * K::MR);
                if whole {
                    K::packed(kc, a.as_ptr(), b.as_ptr(), dst, ld, alpha, init);
                } else {
                    K::packed_edge(kc, a.as_ptr(), b.as_ptr(), dst, ld, alpha, init, mr, nr);
                }
            }
            APanel::Rows(a, stride) => {
                assert!(!K::PAIRS && kc > 0 && a.len() > (K::MR - 1) * stride + kc - 1);
                if whole {
                    K::rows(kc, a.as_ptr(), stride, b.as_ptr(), dst, ld, alpha, init);
                } else {
                    K::rows_edge(kc, a.as_ptr(), stride, b.as_ptr(), dst, ld, alpha, init, nr);
                }
            }
        }
    };
    if whole {
        run(
            c,
            ldc,
            match init {
                Onto::Zero => Init::Zero,
                Onto::C => Init::C,
                Onto::Bias(row) => {
                    assert_eq!(row.len(), K::NR);
                    Init::Row(row.as_ptr())
                }
            },
        );
        return;
    }
    // Cut by the matrix's edge: the tile (or the kernel's smaller one that covers the part that
    // exists) into scratch, then the part that exists. The scratch is not zeroed first (that
    // was 4 KiB of memset per edge tile, 4% of attention's Q·Kᵀ): the kernel writes every
    // element read back.
    let mut scratch = std::mem::MaybeUninit::<[f32; MAX_TILE]>::uninit();
    let part = scratch.as_mut_ptr().cast::<f32>();
    run(part, K::NR, Init::Zero);
    for r in 0..mr {
        // SAFETY: the kernel wrote the first `nr` floats of each of the tile's first `mr` rows
        // (at least), and the caller's tile holds `mr` rows of `nr` floats `ldc` apart.
        let (src, dst) = unsafe { (std::slice::from_raw_parts(part.add(r * K::NR), nr), std::slice::from_raw_parts_mut(c.add(r * ldc), nr)) };
        match init {
            Onto::Zero => dst.copy_from_slice(src),
            Onto::C => dst.iter_mut().zip(src).for_each(|(d, s)| *d += s),
            Onto::Bias(row) => dst.iter_mut().zip(src).zip(row).for_each(|((d, s), b)| *d = b + s),
        }
    }
}

/// Rows and columns of the AVX2 kernel's tile.
const AVX2_MR: usize = 6;
const AVX2_NR: usize = 16;

/// [`kernel_at`] on six rows of A read in place, `stride` apart.
///
/// # Safety
/// As [`kernel_at`], with row `r` of A at `a + r·stride`, `kc` floats long.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_rows(kc: usize, a: *const f32, stride: usize, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init) {
    unsafe { kernel_at(kc, |kk, r| a.add(r * stride + kk), b, c, ldc, alpha, init) }
}

/// [`kernel_at`] on a packed panel of A (`AVX2_MR` floats per step of k).
///
/// # Safety
/// As [`kernel_at`], with A packed k-major.
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init) {
    unsafe { kernel_at(kc, |kk, r| a.add(kk * AVX2_MR + r), b, c, ldc, alpha, init) }
}

/// The 6×16 micro-kernel: `c[6×16] = alpha · a[6×kc] · b[kc×16] + init`, with B packed k-major
/// and element (kk, r) of A at `at(kk, r)`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `at` must give readable addresses for every `kk < kc`,
/// `r < 6`, `b` hold `16·kc` floats, `c` six rows of 16 writable floats `ldc` apart, and an
/// [`Init::Row`] 16 readable floats.
#[inline(always)]
unsafe fn kernel_at(kc: usize, at: impl Fn(usize, usize) -> *const f32, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init) {
    unsafe {
        // Fetch the tile of C while the products run (it is read or written only at the end).
        for r in 0..AVX2_MR {
            _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc).cast());
            _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc + AVX2_NR - 1).cast());
        }
        let mut c0 = [_mm256_setzero_ps(); AVX2_MR];
        let mut c1 = [_mm256_setzero_ps(); AVX2_MR];
        let mut b = b;
        for kk in 0..kc {
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            for r in 0..AVX2_MR {
                let ar = _mm256_broadcast_ss(&*at(kk, r));
                c0[r] = _mm256_fmadd_ps(ar, b0, c0[r]);
                c1[r] = _mm256_fmadd_ps(ar, b1, c1[r]);
            }
            b = b.add(AVX2_NR);
        }
        let alpha = _mm256_set1_ps(alpha);
        let (add, ld) = init.rows(c, ldc);
        for r in 0..AVX2_MR {
            let row = c.add(r * ldc);
            if !add.is_null() {
                let add = add.add(r * ld);
                _mm256_storeu_ps(row, _mm256_fmadd_ps(alpha, c0[r], _mm256_loadu_ps(add)));
                _mm256_storeu_ps(row.add(8), _mm256_fmadd_ps(alpha, c1[r], _mm256_loadu_ps(add.add(8))));
            } else {
                _mm256_storeu_ps(row, _mm256_mul_ps(alpha, c0[r]));
                _mm256_storeu_ps(row.add(8), _mm256_mul_ps(alpha, c1[r]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector rounding gives `half`'s bits for every kind of float: ties, carries into the
    /// exponent, the largest finite values (which round to infinity), subnormals, infinities and
    /// NaNs.
    #[test]
    fn vector_rounding_matches_half_bit_for_bit() {
        if !crate::model::fast::simd::use_avx2() {
            eprintln!("no AVX2 here: the vector rounding cannot run");
            return;
        }
        let mut seed = 7u64;
        let mut bits: Vec<u32> = (0..100_000)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (seed >> 32) as u32
            })
            .collect();
        bits.extend([0, 0x8000_0000, 0x3f80_8000, 0x3f81_8000, 0x3f80_8001, 0x7f7f_ffff, 0xff7f_ffff, 0x0000_0001, 0x0000_8000]);
        bits.extend([0x7f80_0000, 0xff80_0000, 0x7fc0_0000, 0x7f80_0001, 0xffff_ffff, 0x7fbf_ffff]);
        bits.resize(bits.len().next_multiple_of(8) + 3, 0x3f80_8000);
        let mut xs: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        round_packed(&mut xs);
        for (&b, x) in bits.iter().zip(&xs) {
            let want = half::bf16::from_f32(f32::from_bits(b)).to_f32().to_bits();
            assert_eq!(x.to_bits(), want, "rounding {b:#010x}");
        }
    }
}
