//! f32 products by Intel MKL's sequential `sgemm` (cargo feature `mkl`), where they are faster
//! than ours.
//!
//! On an Intel Xeon with AMX, MKL's f32 product was 13–30% faster than our AVX-512 kernel per
//! product, and PyTorch's f32 speed there is MKL's (bench/RESULTS.md, 2026-12-07). MKL is tested
//! by its maker on Intel's CPUs, so it runs by default on Intel CPUs with AVX-512 when the
//! feature is built in; elsewhere our kernels stay (`VITFORGE_MKL=1` or `0` overrides). bf16
//! products stay ours everywhere: MKL's were slower than our AMX and `vdpbf16ps` kernels.
//!
//! Each product packs B itself (MKL's packed-weights API, `cblas_sgemm_pack`, was tried for
//! inference on a Zen 5 and ran no faster there while doubling the weights' memory:
//! bench/RESULTS.md). MKL's threading layer here is the sequential one: each rayon task multiplies a block of rows
//! with one call, as our driver's tasks do, so MKL starts no threads of its own and the pool's
//! size stays the one setting. A product of `f(A)` (GELU's output into fc2) maps each block of
//! rows into this thread's scratch just before its call, so `f(A)` is never a matrix in memory;
//! a bias is written into the block's rows of C, which the call then adds to.

use std::ffi::c_int;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::{ElementWise, Mat, MatMut, Onto, Scratch, Threads, parallel};

// CBLAS's enumerations (mkl_cblas.h).
const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

// MKL's LP64 interface: 32-bit integers.
unsafe extern "C" {
    fn cblas_sgemm(
        layout: c_int,
        transa: c_int,
        transb: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        a: *const f32,
        lda: c_int,
        b: *const f32,
        ldb: c_int,
        beta: f32,
        c: *mut f32,
        ldc: c_int,
    );
}

/// Whether f32 products go to MKL by default here: `VITFORGE_MKL` where set, else on Intel CPUs
/// with AVX-512 (read once; see the module's comment).
pub fn wanted() -> bool {
    static WANTED: OnceLock<bool> = OnceLock::new();
    *WANTED.get_or_init(|| match super::mkl_from_env() {
        Ok(Some(on)) => on,
        _ => intel() && super::super::isa::detected() >= super::super::isa::Isa::Avx512,
    })
}

/// Whether the CPU's vendor is Intel (CPUID leaf 0: "GenuineIntel").
fn intel() -> bool {
    use std::arch::x86_64::__cpuid;
    // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
    #[allow(unused_unsafe)]
    let id = unsafe { __cpuid(0) };
    let bytes: Vec<u8> = [id.ebx, id.edx, id.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
    bytes == b"GenuineIntel"
}

/// Whether f32 products called on this thread go to MKL now. The library's own tests test our
/// kernels unless a test asks for MKL (`tests::with`); the engine's tests follow
/// `VITFORGE_MKL` as the service does.
pub(super) fn runs() -> bool {
    #[cfg(test)]
    return tests::OVERRIDE.get().unwrap_or(false);
    #[cfg(not(test))]
    wanted()
}

/// One operand as CBLAS takes it (row-major): its first element, transposed or not, and the
/// distance between its stored rows.
#[derive(Clone, Copy)]
struct Operand {
    at: usize,
    trans: c_int,
    ld: c_int,
}

/// `m` as an operand: rows or columns contiguous (else MKL cannot read it in place), every size
/// within MKL's 32-bit integers.
fn operand(m: Mat) -> Option<Operand> {
    let fits = |x: usize| c_int::try_from(x).ok();
    fits(m.rows)?;
    fits(m.cols)?;
    // The stored rows: `rows` of `cols` (as it is) or `cols` of `rows` (transposed). A single
    // stored row may have any stride; MKL only needs it to be at least the row's length.
    if m.cs == 1 && (m.rs >= m.cols || m.rows == 1) {
        Some(Operand { at: m.offset, trans: NO_TRANS, ld: fits(m.rs.max(m.cols).max(1))? })
    } else if m.rs == 1 && (m.cs >= m.rows || m.cols == 1) {
        Some(Operand { at: m.offset, trans: TRANS, ld: fits(m.cs.max(m.rows).max(1))? })
    } else {
        None
    }
}

/// Rows `i0..i0 + rows` of `m`.
fn row_block(m: Mat, i0: usize, rows: usize) -> Mat {
    Mat { offset: m.offset + i0 * m.rs, rows, ..m }
}

/// Whether MKL can run `a·b` onto `c` in place (see [`operand`]).
pub(super) fn takes(a: Mat, b: Mat, c: &MatMut) -> bool {
    operand(a).is_some()
        && operand(b).is_some()
        && (c.rows <= 1 || c.rs >= c.cols)
        && c_int::try_from(c.rs.max(c.cols)).is_ok()
}

/// `alpha·f(a)·b` onto `onto` (nothing, C, or a bias row), the views already checked by the
/// caller to be ones MKL takes ([`takes`]), of the product's shapes.
pub(super) fn product(a: Mat, map: Option<ElementWise>, b: Mat, c: MatMut, alpha: f32, onto: Onto, threads: Threads) {
    let (m, k, n) = (a.rows, a.cols, c.cols);
    #[cfg(test)]
    tests::CALLS.set(tests::CALLS.get() + 1);
    let ldc = c.rs.max(n).max(1);
    let out = Out(c.data[c.offset..].as_mut_ptr(), c.data.len() - c.offset);
    // Rows per task: the pool's threads shared out evenly; mapped, at most MAPPED_ROWS (the
    // block's f(A) then stays in L2 until its call reads it).
    let threads = if parallel(threads) { rayon::current_num_threads() } else { 1 };
    let mut tasks = threads.min(m);
    if map.is_some() {
        tasks = tasks.max(m.div_ceil(MAPPED_ROWS)).next_multiple_of(threads).min(m);
    }
    let task = |t: usize| {
        let (i0, i1) = (t * m / tasks, (t + 1) * m / tasks);
        let rows = i1 - i0;
        // SAFETY: rows i0..i1 of C lie inside `c`'s slice (checked by the caller), and tasks'
        // rows do not overlap (ldc ≥ n).
        let cb = unsafe { out.rows(i0 * ldc, (rows - 1) * ldc + n) };
        if let Onto::Bias(bias) = onto {
            for r in 0..rows {
                cb[r * ldc..r * ldc + n].copy_from_slice(bias);
            }
        }
        let beta = if matches!(onto, Onto::Zero) { 0.0 } else { 1.0 };
        let ab = row_block(a, i0, rows);
        match map {
            None => call(ab, b, cb, ldc, alpha, beta),
            Some(f) => MAPPED.with(|scratch| {
                scratch.with(rows * k, |fa| {
                    for r in 0..rows {
                        f(&ab.data[ab.offset + r * ab.rs..][..k], &mut fa[r * k..(r + 1) * k]);
                    }
                    call(Mat::rows(fa, rows, k), b, cb, ldc, alpha, beta)
                })
            }),
        }
    };
    if tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        task(0);
    }
}

/// Rows of `f(A)` a task maps and multiplies at once (`MAPPED_ROWS × 3072` floats, fc2's input
/// in ViT-B, is 1.5 MiB).
const MAPPED_ROWS: usize = 128;

thread_local! {
    /// Each thread's space for its block of `f(A)`, reused from call to call.
    static MAPPED: Scratch = const { Scratch(std::cell::RefCell::new(Vec::new())) };
}

/// C's first element and the floats from it to the end of its slice, for rayon's tasks.
/// Every task has at least one row (there are no more tasks than rows).
#[derive(Clone, Copy)]
struct Out(*mut f32, usize);
// SAFETY: tasks write disjoint rows of C (see `product`), and the pointer outlives them.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// `len` floats of C from `at`.
    ///
    /// SAFETY: they lie inside C's slice, and no other live slice overlaps them.
    unsafe fn rows<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        assert!(at + len <= self.1, "rows of C out of bounds");
        // SAFETY: inside C's slice (just checked), and not aliased, as the caller promises.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}

/// One MKL call: `c = alpha·a·b + beta·c` for `c` the first of `ldc`-apart rows of `cb`.
fn call(a: Mat, b: Mat, cb: &mut [f32], ldc: usize, alpha: f32, beta: f32) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    let (op_a, op_b) = (operand(a).expect("checked by `takes`"), operand(b).expect("checked by `takes`"));
    assert!((m - 1) * ldc + n <= cb.len(), "output rows out of bounds");
    let int = |x: usize| c_int::try_from(x).expect("checked by `takes`");
    // SAFETY: every view lies inside its slice (checked by the callers, `cb` just above), the
    // sizes and distances fit MKL's integers, and `cb` is borrowed mutably, so it aliases
    // neither operand.
    unsafe {
        cblas_sgemm(
            ROW_MAJOR,
            op_a.trans,
            op_b.trans,
            int(m),
            int(n),
            int(k),
            alpha,
            a.data.as_ptr().add(op_a.at),
            op_a.ld,
            b.data.as_ptr().add(op_b.at),
            op_b.ld,
            beta,
            cb.as_mut_ptr(),
            int(ldc),
        )
    }
}

#[cfg(test)]
pub mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        /// MKL switched on or off on this thread by [`with`] (tests only; off otherwise).
        pub static OVERRIDE: Cell<Option<bool>> = const { Cell::new(None) };
        /// Products this thread handed to MKL, so a test can tell that MKL ran, not our kernels.
        pub static CALLS: Cell<usize> = const { Cell::new(0) };
    }

    pub fn calls() -> usize {
        CALLS.get()
    }

    /// Runs `f` with f32 products called on this thread by MKL (`true`) or not.
    pub fn with<T>(on: bool, f: impl FnOnce() -> T) -> T {
        let before = OVERRIDE.replace(Some(on));
        let out = f();
        OVERRIDE.set(before);
        out
    }

    #[test]
    fn mkl_reads_the_cpus_vendor() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("Linux's /proc/cpuinfo");
        let vendor = cpuinfo.lines().find_map(|l| l.strip_prefix("vendor_id")).expect("a vendor_id line");
        assert_eq!(intel(), vendor.trim_start_matches([' ', '\t', ':']).trim() == "GenuineIntel", "{vendor}");
        eprintln!("MKL by default here: {} (VITFORGE_MKL {:?})", wanted(), super::super::mkl_from_env());
    }
}
