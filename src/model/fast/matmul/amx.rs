//! The AMX micro-kernel for the driver in `sgemm.rs`: bf16 products on Intel's matrix tiles
//! (`tdpbf16ps`), a 32×32 tile of C held in four 16×16 f32 tiles, two tiles of A (16 rows × 16
//! pairs of k) and two of B (16 pairs of k × 16 columns) per block of 16 pairs.
//!
//! **On by default on AMX CPUs since it ran on one** (2026-12-04, an Intel Xeon with AMX-BF16,
//! 2 of its cores, by `bench/amx-check.sh`): every matrix-product and element-wise test passed at
//! all five levels against f64, `vitforge selfcheck` passed at `VITFORGE_MAX_ISA=amx` (logits,
//! loss and every gradient in f32 and bf16, against the golden files), and `bench/levels.sh amx
//! avx512bf16` gave bf16 products 2.5 to 4.3 times the AVX-512 BF16 kernel's speed (small and
//! base, inference and a training step; bench/RESULTS.md). Before that, what was checked
//! without the hardware:
//! - here, on any AVX-512 BF16 CPU: the packing and the driver, against f64, through the `tests` module's
//!   emulation of each tile instruction as the Intel SDM defines it;
//! - once (2026-12-02), under a whole-machine emulator: the kernel itself, its instructions as
//!   the assembler encoded them, in the Bochs emulator's Sapphire Rapids model running Linux 6.12,
//!   which granted the tile state through `arch_prctl` and XFD as on hardware. There every
//!   matrix-product test at all five levels (`amx` included: against f64, packed against plain)
//!   and the engine's golden and gradient tests at `VITFORGE_MAX_ISA=amx` (bf16 logits,
//!   mixed-precision gradients against autograd) passed, with four rayon threads sharing the
//!   one emulated core (the OS saving and restoring each one's tiles when it switches), and
//!   `vitforge bench --config tiny --precision bf16` ran inference and a training step at path
//!   `amx` (the grant asked by the real binary, beside Rust's signal stacks). That run checks the
//!   encoding, the tile configuration, the layouts, the stride-0 load of the bias row and the
//!   grant, not speed, and an emulator is not the CPU: the kernel stayed off by default until it
//!   had run, faster than the AVX-512 BF16 one, on an AMX CPU.
//!
//! On an AMX CPU the tests above, and every matrix-product test at the `amx` level, run the
//! instructions themselves.
//!
//! Layouts: the AVX-512 BF16 kernel's packing, whose blocks of 16 pairs of k are AMX's. B's pair
//! panel (`dst[s][j]`: the bf16 of k = 2s and 2s + 1 of column j in one 32-bit slot) is AMX's
//! "VNNI" layout of a B tile: a block of 16 steps of a 32-wide panel is two B tiles, 128 bytes
//! apart per row. A's blocks hold each row's 16 pairs contiguous (`dst[panel][block][r][q]`:
//! row-major bf16, 64 bytes per tile row).

#![cfg(target_arch = "x86_64")]

use std::arch::asm;

use super::Mat;
use super::avx512::{PAIR_BLOCK as KT, pack_a_blocks, pack_b_blocks};
use super::sgemm::{Init, Micro};

/// Rows and columns of the kernel's tile of C: 2 × 2 AMX tiles of 16 × 16 floats.
const MR: usize = 32;
const NR: usize = super::avx512::NR;
/// Bytes of a packed slot (a pair of bf16, or an f32 of C).
const SLOT: usize = 4;

/// The AMX kernel (32×32, pairs of k in blocks of 16), its tile instructions run by `T` (the
/// CPU's, or in the tests an emulation).
pub(super) struct Amx<T = Hardware>(std::marker::PhantomData<T>);

impl<T: Tiles> Micro for Amx<T> {
    const MR: usize = MR;
    const NR: usize = NR;
    /// 128 pairs: panels of A and of B of 16 KiB each, in L1 together (48 KiB on Sapphire
    /// Rapids), eight blocks of four tile products per call.
    const KC: usize = 128;
    const PAIRS: bool = true;
    const STEP_BLOCK: usize = KT;

    fn pack_a(a: Mat, i0: usize, mc: usize, k: usize, dst: &mut [f32]) {
        // SAFETY: the driver runs this kernel only on a CPU with AMX, which has AVX-512 BF16.
        unsafe { pack_a_blocks::<MR>(a, i0, mc, k, dst) }
    }

    fn pack_b(b: Mat, k: usize, j0: usize, nr: usize, dst: &mut [f32]) {
        // SAFETY: as for `pack_a`.
        unsafe { pack_b_blocks(b, k, j0, nr, dst) }
    }

    unsafe fn packed(steps: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init) {
        // SAFETY: as the trait's contract (the driver hands whole blocks of steps).
        unsafe { tiles::<T>(steps, a, b, c, ldc, alpha, init) }
    }

    unsafe fn rows(_: usize, _: *const f32, _: usize, _: *const f32, _: *mut f32, _: usize, _: f32, _: Init) {
        unreachable!("a kernel of bf16 pairs always packs A (the driver checks PAIRS)")
    }
}

/// The tile instructions the kernel uses, with the tile registers as constants: run by the CPU
/// ([`Hardware`]), or emulated in the tests.
pub(super) trait Tiles {
    /// Loads the kernel's tile configuration on this thread, if not yet done.
    ///
    /// # Safety
    /// The CPU must have AMX and the OS must have granted this process the tile state.
    unsafe fn configure();
    /// `tilezero`: tile T = 0.
    ///
    /// # Safety
    /// As [`Tiles::configure`], after it on this thread.
    unsafe fn zero<const T: u8>();
    /// `tileloadd`: the 16 rows of tile T from 64 bytes at `src + r·stride`.
    ///
    /// # Safety
    /// As [`Tiles::zero`]; the 16 rows must be readable.
    unsafe fn load<const T: u8>(src: *const u8, stride: usize);
    /// `tilestored`: the 16 rows of tile T to 64 bytes at `dst + r·stride`.
    ///
    /// # Safety
    /// As [`Tiles::zero`]; the 16 rows must be writable.
    unsafe fn store<const T: u8>(dst: *mut u8, stride: usize);
    /// `tdpbf16ps`: tile C (16 × 16 f32) += tile A (16 rows × 16 pairs) · tile B (16 pairs × 16
    /// columns), pair by pair.
    ///
    /// # Safety
    /// As [`Tiles::zero`].
    unsafe fn dot<const C: u8, const A: u8, const B: u8>();
}

/// The tile configuration: palette 1, tiles 0–7 each 16 rows of 64 bytes (`colsb` at bytes
/// 16 + 2t, `rows` at byte 48 + t), the rest zero.
#[repr(C, align(64))]
struct Config([u8; 64]);

static CONFIG: Config = {
    let mut bytes = [0u8; 64];
    bytes[0] = 1;
    let mut t = 0;
    while t < 8 {
        bytes[16 + 2 * t] = 64;
        bytes[48 + t] = 16;
        t += 1;
    }
    Config(bytes)
};

thread_local! {
    /// Whether this thread has loaded [`CONFIG`] (`ldtilecfg` costs some 200 cycles; the
    /// configuration stays with the thread, saved and restored by the OS).
    static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The tile instructions themselves, by inline assembly (AMX intrinsics are not stable Rust).
pub(super) struct Hardware;

impl Tiles for Hardware {
    #[inline(always)]
    unsafe fn configure() {
        if !CONFIGURED.get() {
            // SAFETY: the caller's contract; CONFIG is 64 readable bytes.
            unsafe { asm!("ldtilecfg [{}]", in(reg) &raw const CONFIG, options(nostack, readonly)) };
            CONFIGURED.set(true);
        }
    }

    #[inline(always)]
    unsafe fn zero<const T: u8>() {
        // SAFETY: the caller's contract.
        unsafe { asm!("tilezero tmm{t}", t = const T, options(nostack, nomem)) }
    }

    #[inline(always)]
    unsafe fn load<const T: u8>(src: *const u8, stride: usize) {
        // SAFETY: the caller's contract.
        unsafe { asm!("tileloadd tmm{t}, [{src} + {stride} * 1]", t = const T, src = in(reg) src, stride = in(reg) stride, options(nostack, readonly)) }
    }

    #[inline(always)]
    unsafe fn store<const T: u8>(dst: *mut u8, stride: usize) {
        // SAFETY: the caller's contract.
        unsafe { asm!("tilestored [{dst} + {stride} * 1], tmm{t}", t = const T, dst = in(reg) dst, stride = in(reg) stride, options(nostack)) }
    }

    #[inline(always)]
    unsafe fn dot<const C: u8, const A: u8, const B: u8>() {
        // SAFETY: the caller's contract.
        unsafe { asm!("tdpbf16ps tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A, b = const B, options(nostack, nomem)) }
    }
}

/// The 32×32 tile kernel: `c = alpha · a · b + init` over `steps` pairs of k (whole blocks of
/// 16), A packed by [`pack_a_blocks`] and B by [`pack_b_blocks`]. Tiles 0–3 hold C (rows 0–15
/// and 16–31, columns 0–15 and 16–31), 4–5 the two halves of A's rows, 6–7 the two halves of
/// B's columns. With `alpha` 1 the tiles start from `init` — C loaded, the bias row loaded into
/// every row (a stride of 0), or zero — and are stored to C; otherwise the product goes through
/// a scratch tile and is scaled on the way.
///
/// # Safety
/// As [`Tiles::configure`] for `T`; `a` must hold `32·steps` slots, `b` `32·steps`, `c` 32 rows
/// of 32 writable floats `ldc` apart, and an [`Init::Row`] 32 readable floats.
unsafe fn tiles<T: Tiles>(steps: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, alpha: f32, init: Init) {
    assert!(steps.is_multiple_of(KT));
    // SAFETY: the caller's contract; every load and store below stays inside the panels of A
    // (32 rows of 16 slots per block) and B (16 steps of 32 slots per block) and the tile of C.
    unsafe {
        T::configure();
        let direct = alpha == 1.0;
        let (ld, quarter) = (ldc * SLOT, |r: usize, j: usize| c.add(r * ldc + j).cast::<u8>());
        match init {
            Init::C if direct => {
                T::load::<0>(quarter(0, 0), ld);
                T::load::<1>(quarter(0, 16), ld);
                T::load::<2>(quarter(16, 0), ld);
                T::load::<3>(quarter(16, 16), ld);
            }
            Init::Row(bias) if direct => {
                let bias = bias.cast::<u8>();
                T::load::<0>(bias, 0);
                T::load::<1>(bias.add(16 * SLOT), 0);
                T::load::<2>(bias, 0);
                T::load::<3>(bias.add(16 * SLOT), 0);
            }
            _ => {
                T::zero::<0>();
                T::zero::<1>();
                T::zero::<2>();
                T::zero::<3>();
            }
        }
        let (a, b) = (a.cast::<u8>(), b.cast::<u8>());
        for block in 0..steps / KT {
            let (a0, b0) = (a.add(block * MR * KT * SLOT), b.add(block * KT * NR * SLOT));
            T::load::<4>(a0, KT * SLOT);
            T::load::<6>(b0, NR * SLOT);
            T::dot::<0, 4, 6>();
            T::load::<7>(b0.add(16 * SLOT), NR * SLOT);
            T::dot::<1, 4, 7>();
            T::load::<5>(a0.add(16 * KT * SLOT), KT * SLOT);
            T::dot::<2, 5, 6>();
            T::dot::<3, 5, 7>();
        }
        if direct {
            T::store::<0>(quarter(0, 0), ld);
            T::store::<1>(quarter(0, 16), ld);
            T::store::<2>(quarter(16, 0), ld);
            T::store::<3>(quarter(16, 16), ld);
            return;
        }
        let mut product = [0f32; MR * NR];
        let base = product.as_mut_ptr();
        let at = |r: usize, j: usize| base.add(r * NR + j).cast::<u8>();
        T::store::<0>(at(0, 0), NR * SLOT);
        T::store::<1>(at(0, 16), NR * SLOT);
        T::store::<2>(at(16, 0), NR * SLOT);
        T::store::<3>(at(16, 16), NR * SLOT);
        for (r, row) in product.chunks_exact(NR).enumerate() {
            let out = std::slice::from_raw_parts_mut(c.add(r * ldc), NR);
            for (j, (o, p)) in out.iter_mut().zip(row).enumerate() {
                *o = alpha * p
                    + match init {
                        Init::Zero => 0.0,
                        Init::C => *o,
                        Init::Row(bias) => *bias.add(j),
                    };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::model::fast::matmul::Threads;
    use crate::model::fast::matmul::tests::check_products;
    use crate::model::precision::Precision;

    /// Eight tiles of 16 rows × 64 bytes, and whether the configuration was loaded.
    struct State {
        tiles: [[[u8; 64]; 16]; 8],
        configured: bool,
    }

    thread_local! {
        static STATE: RefCell<State> = const { RefCell::new(State { tiles: [[[0; 64]; 16]; 8], configured: false }) };
    }

    /// Each tile instruction as the Intel SDM defines it for the configuration in use (every
    /// tile 16 rows of 64 bytes), run on this thread's emulated tiles: any tile instruction
    /// before the configuration is loaded faults, as on the CPU.
    struct Emulated;

    fn with<R>(f: impl FnOnce(&mut State) -> R) -> R {
        STATE.with_borrow_mut(|s| {
            assert!(s.configured, "a tile instruction before ldtilecfg raises #UD");
            f(s)
        })
    }

    /// A bf16 value as the tile unit reads it: a subnormal counts as zero (the SDM's DAZ).
    fn bf16(lo: u8, hi: u8) -> f32 {
        let x = f32::from_bits(u32::from(u16::from_le_bytes([lo, hi])) << 16);
        if x.is_subnormal() { 0.0 } else { x }
    }

    impl Tiles for Emulated {
        unsafe fn configure() {
            assert_eq!((CONFIG.0[0], CONFIG.0[16], CONFIG.0[48], CONFIG.0[16 + 2 * 7], CONFIG.0[48 + 7]), (1, 64, 16, 64, 16));
            STATE.with_borrow_mut(|s| s.configured = true);
        }

        unsafe fn zero<const T: u8>() {
            with(|s| s.tiles[usize::from(T)] = [[0; 64]; 16]);
        }

        unsafe fn load<const T: u8>(src: *const u8, stride: usize) {
            // SAFETY: the caller's contract (16 readable rows of 64 bytes).
            with(|s| {
                for (r, row) in s.tiles[usize::from(T)].iter_mut().enumerate() {
                    unsafe { std::ptr::copy_nonoverlapping(src.add(r * stride), row.as_mut_ptr(), 64) };
                }
            });
        }

        unsafe fn store<const T: u8>(dst: *mut u8, stride: usize) {
            // SAFETY: the caller's contract (16 writable rows of 64 bytes).
            with(|s| {
                for (r, row) in s.tiles[usize::from(T)].iter().enumerate() {
                    unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(r * stride), 64) };
                }
            });
        }

        /// The SDM's TDPBF16PS: for each row m of C and pair k of A's row, for each column n,
        /// `C[m].fp32[n] += A[m].bf16[2k]·B[k].bf16[2n] + A[m].bf16[2k+1]·B[k].bf16[2n+1]`.
        unsafe fn dot<const C: u8, const A: u8, const B: u8>() {
            with(|s| {
                let (a, b) = (s.tiles[usize::from(A)], s.tiles[usize::from(B)]);
                let c = &mut s.tiles[usize::from(C)];
                for (m, row) in c.iter_mut().enumerate() {
                    for n in 0..16 {
                        let mut sum = f32::from_le_bytes(row[4 * n..4 * n + 4].try_into().expect("4 bytes"));
                        for k in 0..16 {
                            let (x, y) = (&a[m][4 * k..4 * k + 4], &b[k][4 * n..4 * n + 4]);
                            sum += bf16(x[0], x[1]) * bf16(y[0], y[1]);
                            sum += bf16(x[2], x[3]) * bf16(y[2], y[3]);
                        }
                        row[4 * n..4 * n + 4].copy_from_slice(&sum.to_le_bytes());
                    }
                }
            });
        }
    }

    /// The AMX kernel's packing and blocking, through the driver, with the tile instructions
    /// emulated: every layout of A and B, cut tiles and blocks, scaling and accumulation, serial
    /// and parallel, against f64 on the bf16-rounded operands (the packing needs AVX-512 BF16).
    /// The hardware kernel runs in `matmul`'s test at the `amx` level where the CPU has AMX.
    #[test]
    fn tiles_emulated_match_f64_through_the_driver() {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx512f") && has!("avx512bw") && has!("avx512bf16")) {
            eprintln!("no AVX-512 BF16 here: the AMX kernel's packing cannot run");
            return;
        }
        check_products("amx (emulated tiles)", &[Precision::Bf16], |a, b, c, alpha, onto, threads, _| {
            let step = super::super::sgemm::Step { alpha, onto, parallel: threads == Threads::All, bf16: true, map: None };
            super::super::sgemm::gemm::<Amx<Emulated>>(a, b, c, step)
        });
    }

    /// `f(A)·B` on the emulated tiles, `f` applied as the 32-row panels are packed, is the
    /// product of `f(A)` written whole, bit for bit (200 rows: several row blocks and a cut last
    /// panel; a depth of 70 cutting a block; serial and parallel).
    #[test]
    fn tiles_emulated_take_a_mapped_a_as_the_mapped_matrix() {
        use std::arch::is_x86_feature_detected as has;
        use super::super::sgemm::{Step, gemm};
        use super::super::{Mat, MatMut, Onto};
        if !(has!("avx512f") && has!("avx512bw") && has!("avx512bf16")) {
            eprintln!("no AVX-512 BF16 here: the AMX kernel's packing cannot run");
            return;
        }
        let f = |x: &[f32], y: &mut [f32]| y.iter_mut().zip(x).for_each(|(y, &x)| *y = (x - 0.2) * x);
        let (m, n, k) = (200, 40, 70);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 41.0).collect();
        let mut fa = vec![0f32; m * k];
        for (x, y) in a.chunks(k).zip(fa.chunks_mut(k)) {
            f(x, y);
        }
        for parallel in [false, true] {
            let run = |a: &[f32], map: Option<super::super::ElementWise>| {
                let mut c = vec![0f32; m * n];
                let step = Step { alpha: 1.0, onto: Onto::Zero, parallel, bf16: true, map };
                gemm::<Amx<Emulated>>(Mat::rows(a, m, k), Mat::rows(&b, k, n), MatMut::rows(&mut c, m, n), step);
                c
            };
            let (want, got) = (run(&fa, None), run(&a, Some(&f)));
            assert!(want.iter().zip(&got).all(|(x, y)| x.to_bits() == y.to_bits()), "parallel={parallel}");
            assert!(want.iter().any(|&x| x != 0.0));
        }
    }

    /// The emulation itself, on one hand-made product: row 0 of A holds pairs (1, 2) at pair 0
    /// and (3, −1) at pair 15; B's pair 0 of column 5 is (10, 100), of column 6 (1, 0), and
    /// pair 15 of column 5 is (0.5, 4): C[0][5] = 1·10 + 2·100 + 3·0.5 − 1·4 = 207.5 and
    /// C[0][6] = 1; row 1 of A, a subnormal, counts as zero.
    #[test]
    fn the_emulated_dot_product_follows_the_sdm() {
        let bits = |x: f32| (x.to_bits() >> 16) as u16;
        let slot = |lo: f32, hi: f32| u32::from(bits(lo)) | u32::from(bits(hi)) << 16;
        let (mut a, mut b, mut c) = ([0u32; 16 * 16], [0u32; 16 * 16], [0f32; 16 * 16]);
        a[0] = slot(1.0, 2.0);
        a[15] = slot(3.0, -1.0);
        b[5] = slot(10.0, 100.0);
        b[15 * 16 + 5] = slot(0.5, 4.0);
        a[16] = slot(f32::from_bits(1 << 16), 0.0);
        b[6] = slot(1.0, 0.0);
        // SAFETY: emulated; every buffer is 16 rows of 64 bytes.
        unsafe {
            Emulated::configure();
            Emulated::load::<4>(a.as_ptr().cast(), 64);
            Emulated::load::<6>(b.as_ptr().cast(), 64);
            Emulated::zero::<0>();
            Emulated::dot::<0, 4, 6>();
            Emulated::store::<0>(c.as_mut_ptr().cast(), 64);
        }
        assert_eq!((c[5], c[6]), (207.5, 1.0));
        assert_eq!((c[16 + 5], c[16 + 6]), (0.0, 0.0), "a subnormal input counts as zero");
        assert_eq!(c.iter().filter(|&&x| x != 0.0).count(), 2);
    }
}
