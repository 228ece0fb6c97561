//! Matrix products on strided views of `f32` slices, with bounds checked before the unsafe call:
//! through our kernels ([`sgemm`]'s driver with an AVX2/FMA, AVX-512, AVX-512 BF16 or AMX
//! micro-kernel, the highest the CPU has and `VITFORGE_MAX_ISA` allows), else through the `gemm` crate (the kernels candle's CPU backend uses). Strides let one buffer hold Q, K and V side by
//! side and let transposes cost nothing. In [`Precision::Bf16`] both operands are rounded to
//! bfloat16 (our kernel rounds them as it packs them, the crate's path on rounded copies) and the
//! products accumulate in f32 (natively by `vdpbf16ps` at the `avx512bf16` level, `tdpbf16ps` at
//! `amx`). Built with the `mkl` feature, f32 products go to Intel MKL instead where it is faster
//! (`matmul/mkl.rs`: Intel CPUs with AVX-512, or as `VITFORGE_MKL` says).

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(all(feature = "mkl", target_arch = "x86_64"))]
pub(crate) mod mkl;
#[cfg(target_arch = "x86_64")]
mod sgemm;

use gemm::Parallelism;

use crate::model::precision::{Precision, round_bf16};

/// A read-only matrix view: `rows × cols` elements at `data[offset + r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, offset: 0, rows, cols, rs: cols, cs: 1 }
    }

    /// The transpose (a view, nothing is copied).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = self.offset + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// A writable matrix view.
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
}

impl<'a> MatMut<'a> {
    /// A row-major matrix.
    pub fn rows(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self { data, offset: 0, rows, cols, rs: cols }
    }

    /// Columns `start..start + n` of a row-major buffer `stride` wide.
    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, stride: usize, start: usize) -> Self {
        Self { data, offset: start, rows, cols, rs: stride }
    }
}

/// Space reused from call to call on each thread (so large products do not pay for fresh zeroed
/// pages every time): the products' packing space, and [`with_scratch`]'s. Handed out on a
/// cache-line boundary so a 16-float row of a packed panel is one line, never two. Contents are
/// stale: packing writes every element it reads back, padding included.
struct Scratch(std::cell::RefCell<Vec<f32>>);

thread_local! {
    static CALLER_SCRATCH: Scratch = const { Scratch(std::cell::RefCell::new(Vec::new())) };
}

/// Runs `f` on `len` floats of space reused from call to call on this thread, for a caller's
/// intermediate matrices (attention's scores, one head at a time), so they cost no fresh zeroed
/// memory each time. The contents are stale: `f` must write every element before it reads it.
pub fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    CALLER_SCRATCH.with(|s| s.with(len, f))
}

impl Scratch {
    /// Runs `f` on `len` floats of this thread's space, or of a fresh buffer when the space is
    /// already in use further up this thread's stack (rayon may run a nested product here).
    fn with<R>(&self, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
        let aligned = |v: &mut Vec<f32>| {
            let range = on_cache_line(v, len);
            f(&mut v[range])
        };
        match self.0.try_borrow_mut() {
            Ok(mut v) => aligned(&mut v),
            Err(_) => aligned(&mut Vec::new()),
        }
    }
}

/// Where `len` floats of `v` start on a cache-line boundary (`v` replaced by a zeroed buffer
/// first when it is too short), so a 16-float row of a packed panel is one line, never two.
fn on_cache_line(v: &mut Vec<f32>, len: usize) -> std::ops::Range<usize> {
    if v.len() < len + 16 {
        *v = vec![0f32; len + 16];
    }
    let start = v.as_ptr().align_offset(64).min(16);
    start..start + len
}

/// How the product is run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// On the calling thread (inside an already parallel loop).
    One,
    /// On every thread of the rayon pool.
    All,
}

/// Whether `VITFORGE_GENERIC_GEMM` asks for the `gemm` crate even where our kernel runs (to
/// compare the two; read once).
pub fn generic_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var_os("VITFORGE_GENERIC_GEMM").is_some())
}

/// What a product is added to.
#[derive(Clone, Copy)]
pub enum Onto<'a> {
    /// Nothing: `c = beta·a·b`.
    Zero,
    /// C as it is: `c += beta·a·b`.
    C,
    /// A row (one value per column of C) added to every row: `c = beta·a·b + bias`. Our
    /// kernels add it as they store each tile, so C is written once.
    Bias(&'a [f32]),
}

/// An element-wise function, `f(x, y)` writing `f` of each value of `x` to `y` (as long as `x`),
/// applied to the left operand of a product: `f(A)·B` (GELU's output as fc2's input). Our
/// kernels apply it to each panel of A's rows as they pack them, so `f(A)` is never a matrix in
/// memory; the `gemm` crate's product gets `f(A)` written whole first.
pub type ElementWise<'a> = &'a (dyn Fn(&[f32], &mut [f32]) + Sync);

/// `c = beta·a·b` (or `c += beta·a·b` with `accumulate`), with the operands at `precision`.
pub fn gemm(a: Mat, b: Mat, c: MatMut, beta: f32, accumulate: bool, threads: Threads, precision: Precision) {
    product(a, None, b, c, beta, if accumulate { Onto::C } else { Onto::Zero }, threads, precision)
}

/// `c = a·b + bias`, the bias added to every row, with the operands at `precision`.
pub fn gemm_bias(a: Mat, b: Mat, c: MatMut, bias: &[f32], threads: Threads, precision: Precision) {
    product(a, None, b, c, 1.0, Onto::Bias(bias), threads, precision)
}

/// `c = f(a)·b (+ bias)` for a row-major `a`, with the operands at `precision` (see
/// [`ElementWise`]).
pub fn gemm_mapped(a: Mat, f: ElementWise, b: Mat, c: MatMut, bias: Option<&[f32]>, threads: Threads, precision: Precision) {
    assert_eq!(a.cs, 1, "a mapped A is row-major");
    product(a, Some(f), b, c, 1.0, bias.map_or(Onto::Zero, Onto::Bias), threads, precision)
}

/// `c = a·[b₀ b₁ …] + bias`: the product by the matrix whose columns are those of `parts` side
/// by side (each as deep as `a` is wide), as one product where our kernel's panels allow it (every
/// part but the last a whole number of them), so A is packed once rather than once per part (Q,
/// K and V of one input), else a product per part. `bias` has one value per column of C.
pub fn gemm_bias_parts(a: Mat, parts: &[Mat], c: MatMut, bias: Option<&[f32]>, threads: Threads, precision: Precision) {
    let n = parts.iter().map(|p| p.cols).sum();
    let onto = bias.map_or(Onto::Zero, Onto::Bias);
    check_views(a, (a.cols, n), &c, onto);
    for part in parts {
        assert_eq!(part.rows, a.cols, "inner dimensions");
        part.check();
    }
    #[cfg(target_arch = "x86_64")]
    if a.rows > 0
        && a.cols > 0
        && !by_mkl(precision)
        && let Some(kernel) = Kernel::active(precision).filter(|&k| on_kernel!(k, K => sgemm::parts_align::<K>(parts)))
    {
        let bf16 = precision == Precision::Bf16;
        let step = sgemm::Step { alpha: 1.0, onto, parallel: parallel(threads), bf16, map: None };
        on_kernel!(kernel, K => sgemm::gemm_parts::<K>(a, parts, c, step));
        return;
    }
    let mut col = 0;
    for &part in parts {
        let columns = MatMut { data: &mut *c.data, offset: c.offset + col, rows: c.rows, cols: part.cols, rs: c.rs };
        let onto = bias.map_or(Onto::Zero, |bias| Onto::Bias(&bias[col..col + part.cols]));
        product(a, None, part, columns, 1.0, onto, threads, precision);
        col += part.cols;
    }
}

/// `beta·map(a)·b` onto `onto`, with the operands at `precision`.
#[allow(clippy::too_many_arguments)]
fn product(a: Mat, map: Option<ElementWise>, b: Mat, c: MatMut, beta: f32, onto: Onto, threads: Threads, precision: Precision) {
    check_views(a, (b.rows, b.cols), &c, onto);
    b.check();
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    if let Some(f) = map
        && !uses_our_kernels()
    {
        let mapped = mapped_rows(a, f);
        return product(Mat::rows(&mapped, a.rows, a.cols), None, b, c, beta, onto, threads, precision);
    }
    if a.cols == 0 || matches!(onto, Onto::Bias(_)) && !uses_our_kernels() {
        // No product to add (C becomes zero or the bias), or the crate's product, which adds to
        // C, after the bias is copied to every row.
        for r in 0..c.rows {
            let row = &mut c.data[c.offset + r * c.rs..c.offset + r * c.rs + c.cols];
            match onto {
                Onto::Zero => row.fill(0.0),
                Onto::C => {}
                Onto::Bias(bias) => row.copy_from_slice(bias),
            }
        }
        if a.cols == 0 {
            return;
        }
        return product(a, map, b, c, beta, Onto::C, threads, precision);
    }
    let accumulate = matches!(onto, Onto::C);
    #[cfg(all(feature = "mkl", target_arch = "x86_64"))]
    if by_mkl(precision) && mkl::takes(a, b, &c) {
        return mkl::product(a, map, b, c, beta, onto, threads);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(kernel) = Kernel::active(precision) {
        let parallel = parallel(threads);
        let bf16 = precision == Precision::Bf16;
        let step = sgemm::Step { alpha: beta, onto, parallel, bf16, map };
        on_kernel!(kernel, K => sgemm::gemm::<K>(a, b, c, step));
        return;
    }
    if precision == Precision::Bf16 {
        let k = a.cols;
        let (a, b) = (rounded(a), rounded(b));
        return gemm(Mat::rows(&a, c.rows, k), Mat::rows(&b, k, c.cols), c, beta, accumulate, threads, Precision::F32);
    }
    let parallelism = match threads {
        Threads::One => Parallelism::None,
        Threads::All => match rayon::current_num_threads() {
            0 | 1 => Parallelism::None,
            n => Parallelism::Rayon(n),
        },
    };
    // SAFETY: every view was checked to lie inside its slice above; `c` is borrowed mutably, so
    // it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            c.rows,
            c.cols,
            a.cols,
            c.data.as_mut_ptr().add(c.offset),
            1,
            c.rs as isize,
            accumulate,
            a.data.as_ptr().add(a.offset),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b.offset),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `f` of every row of the row-major `a`, as a matrix of its own.
fn mapped_rows(a: Mat, f: ElementWise) -> Vec<f32> {
    let mut out = vec![0f32; a.rows * a.cols];
    if a.cols > 0 {
        for (r, row) in out.chunks_mut(a.cols).enumerate() {
            f(&a.data[a.offset + r * a.rs..][..a.cols], row);
        }
    }
    out
}

/// Checks the views of a product of `a` by a B of depth `k` and `n` columns onto `c`: the shapes
/// agree, `a` and `c` lie inside their slices, and a bias has one value per column.
fn check_views(a: Mat, (k, n): (usize, usize), c: &MatMut, onto: Onto) {
    assert_eq!(a.cols, k, "inner dimensions");
    assert_eq!((a.rows, n), (c.rows, c.cols), "output shape");
    a.check();
    if c.rows > 0 && c.cols > 0 {
        assert!(c.offset + (c.rows - 1) * c.rs + c.cols - 1 < c.data.len(), "output view out of bounds");
    }
    if let Onto::Bias(bias) = onto {
        assert_eq!(bias.len(), c.cols, "one bias per column");
    }
}

/// Whether a product with `threads` spreads over rayon's pool.
fn parallel(threads: Threads) -> bool {
    threads == Threads::All && rayon::current_num_threads() > 1
}

/// Which of our micro-kernels a product runs (what B is packed for).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kernel {
    /// 6×16, AVX2 + FMA (f32 arithmetic; bf16 operands rounded as they are packed).
    Avx2,
    /// 12×32, AVX-512 (as `Avx2`).
    Avx512,
    /// 12×32, AVX-512 BF16: pairs of bf16 by `vdpbf16ps`.
    Avx512Bf16,
    /// 32×32 on AMX tiles (bf16 only).
    Amx,
}

impl Kernel {
    /// The kernel a product at `precision` runs at the active level, or `None` where products
    /// go to the `gemm` crate (below AVX2, or `VITFORGE_GENERIC_GEMM`).
    #[cfg(target_arch = "x86_64")]
    fn active(precision: Precision) -> Option<Kernel> {
        use super::isa::Isa;
        if !uses_our_kernels() {
            return None;
        }
        let bf16 = precision == Precision::Bf16;
        let level = super::isa::active();
        Some(match level {
            Isa::Generic | Isa::Avx2 => Kernel::Avx2,
            Isa::Amx if bf16 => Kernel::Amx,
            Isa::Avx512Bf16 if bf16 && dpbf16_pays() => Kernel::Avx512Bf16,
            _ => Kernel::Avx512,
        })
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn active(_: Precision) -> Option<Kernel> {
        None
    }
}

/// What multiplies bf16 at the active level: `amx`, `vdpbf16ps`, `fma-emulated` (our f32
/// kernel on operands rounded as they are packed) or `gemm-crate-emulated` (the crate's product
/// on rounded copies), for `vitforge bench`.
pub fn bf16_products() -> &'static str {
    match Kernel::active(Precision::Bf16) {
        Some(Kernel::Amx) => "amx",
        Some(Kernel::Avx512Bf16) => "vdpbf16ps",
        Some(Kernel::Avx2 | Kernel::Avx512) => "fma-emulated",
        None => "gemm-crate-emulated",
    }
}

/// Whether this CPU runs bf16 products natively and faster than f32 ones at the active level
/// (AMX; AVX-512 BF16 where `vdpbf16ps` measured faster than the FMA kernel): what `auto`
/// precision picks bf16 on.
pub fn native_bf16() -> bool {
    matches!(Kernel::active(Precision::Bf16), Some(Kernel::Amx | Kernel::Avx512Bf16))
}

/// The environment variable that settles [`dpbf16_pays`] instead of the measurement: `1` (bf16
/// products by `vdpbf16ps`) or `0` (bf16 emulated on the f32 FMA kernel).
pub const DPBF16_VAR: &str = "VITFORGE_DPBF16";

/// Whether bf16 products at the `avx512bf16` level run by `vdpbf16ps` rather than emulated on
/// the f32 FMA kernel (operands rounded as they are packed: the same products, added in another
/// order). `vdpbf16ps` does twice an FMA's multiplications, but not at the same rate on every
/// CPU: on an AMD EPYC Zen 5 it multiplied bf16 2–3 times as fast as the FMA kernel multiplied
/// f32, on an Intel Xeon without AMX at about half its speed (both in bench/RESULTS.md). So it is
/// measured, once per process ([`dpbf16_speed`]), unless `VITFORGE_DPBF16` settles it.
pub fn dpbf16_pays() -> bool {
    // Tests that force a level run that level's own kernel.
    #[cfg(test)]
    if super::isa::tests::OVERRIDE.get().is_some() {
        return true;
    }
    static PAYS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PAYS.get_or_init(|| match dpbf16_from_env() {
        Ok(Some(forced)) => forced,
        _ => dpbf16_speed().is_some_and(|speed| speed >= 1.0),
    })
}

/// `VITFORGE_DPBF16` as set (`1` or `0`), or an error naming the variable and its values (the
/// command line checks it at start-up; an unreadable value is ignored here).
pub fn dpbf16_from_env() -> Result<Option<bool>, String> {
    switch_from_env(DPBF16_VAR, "use 1 (bf16 products by vdpbf16ps) or 0 (emulated on the f32 FMA kernel), or leave it unset to measure")
}

/// A 0/1 switch read from the environment: `Some(true)` for `1`, `Some(false)` for `0`, `None`
/// when unset or empty, or an error naming the variable, its value and `usage` (what each value
/// does).
fn switch_from_env(var: &str, usage: &str) -> Result<Option<bool>, String> {
    match std::env::var(var) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Ok(v) => parse_switch(var, &v, usage),
        Err(e) => Err(format!("{var}: {e}")),
    }
}

/// [`switch_from_env`]'s reading of the value `v` of `var`.
fn parse_switch(var: &str, v: &str, usage: &str) -> Result<Option<bool>, String> {
    match v.trim() {
        "" => Ok(None),
        "1" => Ok(Some(true)),
        "0" => Ok(Some(false)),
        _ => Err(format!("{var}={v:?}: {usage}")),
    }
}

/// How fast `vdpbf16ps` multiplies here against the f32 FMA kernel (> 1: faster), measured once
/// on the first call (whatever `VITFORGE_MAX_ISA` says); `None` where the CPU lacks AVX-512 BF16.
pub fn dpbf16_speed() -> Option<f64> {
    static SPEED: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    *SPEED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if super::isa::detected() >= super::isa::Isa::Avx512Bf16 {
            // SAFETY: this CPU runs both kernels' instructions.
            return Some(unsafe { measure_dpbf16_speed() });
        }
        None
    })
}

/// Times the two 12×32 micro-kernels on the same tile, operands in L1 (about 15 ms): the
/// f32 kernel over 2·KC steps of k, and `vdpbf16ps` over KC pairs (the same multiplications);
/// alternately, the best of several rounds of each, as this machine's speed drifts.
///
/// # Safety
/// The CPU must run AVX-512 F and BF16.
#[cfg(target_arch = "x86_64")]
unsafe fn measure_dpbf16_speed() -> f64 {
    use sgemm::{Init, Micro};
    const PAIRS: usize = <avx512::Bf16 as Micro>::KC;
    let (mr, nr) = (<avx512::F32 as Micro>::MR, <avx512::F32 as Micro>::NR);
    // 1.0 as f32 bits is the pair (0, 1.0) in bf16: ordinary values either way.
    let a = vec![1.0f32; mr * 2 * PAIRS];
    let b = vec![1.0f32; nr * 2 * PAIRS];
    let mut c = vec![0f32; mr * nr];
    let mut time = |pairs: bool| {
        let t = std::time::Instant::now();
        for _ in 0..2000 {
            // SAFETY: `a` and `b` hold MR·2·KC and NR·2·KC floats (KC pairs are as many
            // floats); `c` is one MR × NR tile; the caller's CPU runs both kernels.
            unsafe {
                if pairs {
                    avx512::Bf16::packed(PAIRS, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), nr, 1.0, Init::Zero);
                } else {
                    avx512::F32::packed(2 * PAIRS, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), nr, 1.0, Init::Zero);
                }
            }
            std::hint::black_box(&mut c);
        }
        t.elapsed().as_secs_f64()
    };
    // A first pass of each warms the vector units (and any change of clock they bring).
    time(false);
    time(true);
    let (mut fma, mut dp) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        fma = fma.min(time(false));
        dp = dp.min(time(true));
    }
    fma / dp
}

/// Runs `$body` with the type `$k` standing for `$kernel`'s micro-kernel.
///
/// SAFETY (of each kernel's instructions, for every use): [`Kernel::active`] names a kernel only
/// at a level `isa::active` allows, which is never above what this CPU has (and `amx` only where
/// Linux granted the tile state); a [`PackedB`] is used only for the kernel it names when that
/// is the active one.
#[cfg(target_arch = "x86_64")]
macro_rules! on_kernel {
    ($kernel:expr, $k:ident => $body:expr) => {
        match $kernel {
            Kernel::Avx2 => {
                type $k = sgemm::Avx2;
                $body
            }
            Kernel::Avx512 => {
                type $k = avx512::F32;
                $body
            }
            Kernel::Avx512Bf16 => {
                type $k = avx512::Bf16;
                $body
            }
            Kernel::Amx => {
                type $k = amx::Amx;
                $body
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
use on_kernel;

/// The right operand of `a·b` packed once for the kernel this process runs, at one precision
/// (rounded to bf16, or as pairs of bf16, in `bf16`): what every product would otherwise pack
/// again. Inference packs each weight matrix so when it loads a model ([`PackedB::new`]), then
/// multiplies by it with [`gemm_bias_packed`].
pub struct PackedB {
    kernel: Kernel,
    precision: Precision,
    /// Depth and columns of B.
    k: usize,
    n: usize,
    /// The panels: `data[panels]`, on a cache-line boundary (as the per-call packing space is).
    data: Vec<f32>,
    panels: std::ops::Range<usize>,
}

impl PackedB {
    /// `b` packed for the kernel a product at `precision` runs now (on rayon's pool), or `None`
    /// where products go to the `gemm` crate or to MKL, which pack their own way.
    pub fn new(b: Mat, precision: Precision) -> Option<Self> {
        Self::from_parts(&[b], precision)
    }

    /// The matrix made of `parts` side by side (equally deep) packed as [`PackedB::new`] packs
    /// one, for one product by all of them (see [`gemm_bias_parts`]); `None` also where the
    /// kernel's panels do not allow it (a part but the last not a whole number of them).
    pub fn from_parts(parts: &[Mat], precision: Precision) -> Option<Self> {
        let k = parts.first().map_or(0, |p| p.rows);
        for part in parts {
            assert_eq!(part.rows, k, "parts of one depth");
            part.check();
        }
        if by_mkl(precision) {
            return None;
        }
        let kernel = Kernel::active(precision)?;
        #[cfg(target_arch = "x86_64")]
        {
            if !on_kernel!(kernel, K => sgemm::parts_align::<K>(parts)) {
                return None;
            }
            let bf16 = precision == Precision::Bf16;
            let n = parts.iter().map(|p| p.cols).sum();
            let len = on_kernel!(kernel, K => sgemm::packed_len::<K>(k, n));
            let mut data = Vec::new();
            let panels = on_cache_line(&mut data, len);
            on_kernel!(kernel, K => sgemm::pack_parts::<K>(parts, bf16, parallel(Threads::All), &mut data[panels.clone()]));
            Some(Self { kernel, precision, k, n, data, panels })
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no kernel of ours off x86-64: {kernel:?}")
    }

    /// Whether a product at `precision` would run the kernel this was packed for (else the
    /// caller multiplies by the plain matrix: the level may be capped differently on this
    /// thread, as the tests do, or the precision changed).
    pub fn fits(&self, precision: Precision) -> bool {
        precision == self.precision && !by_mkl(precision) && Kernel::active(precision) == Some(self.kernel)
    }

    /// Depth and columns of B.
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }

    fn panels(&self) -> &[f32] {
        &self.data[self.panels.clone()]
    }
}

/// `c = a·b + bias` with `b` packed (see [`PackedB`]); the caller checked that it
/// [`fits`](PackedB::fits) the precision of the product.
pub fn gemm_bias_packed(a: Mat, b: &PackedB, c: MatMut, bias: Option<&[f32]>, threads: Threads) {
    packed_product(a, None, b, c, bias, threads)
}

/// [`gemm_bias_packed`] of `f(a)` for a row-major `a` (see [`ElementWise`]).
pub fn gemm_mapped_packed(a: Mat, f: ElementWise, b: &PackedB, c: MatMut, bias: Option<&[f32]>, threads: Threads) {
    assert_eq!(a.cs, 1, "a mapped A is row-major");
    packed_product(a, Some(f), b, c, bias, threads)
}

fn packed_product(a: Mat, map: Option<ElementWise>, b: &PackedB, c: MatMut, bias: Option<&[f32]>, threads: Threads) {
    assert!(b.fits(b.precision), "B packed for another kernel than the active one");
    let onto = bias.map_or(Onto::Zero, Onto::Bias);
    check_views(a, b.shape(), &c, onto);
    if a.rows == 0 || b.n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let step = sgemm::Step { alpha: 1.0, onto, parallel: parallel(threads), bf16: b.precision == Precision::Bf16, map };
        on_kernel!(b.kernel, K => sgemm::gemm_packed::<K>(a, b.panels(), c, step));
    }
}

/// Whether products run on our kernels (AVX2 and up, unless `VITFORGE_GENERIC_GEMM`), not the
/// `gemm` crate's.
#[cfg(target_arch = "x86_64")]
fn uses_our_kernels() -> bool {
    super::simd::use_avx2() && !generic_forced()
}

#[cfg(not(target_arch = "x86_64"))]
fn uses_our_kernels() -> bool {
    false
}

/// Whether a product at `precision` called on this thread goes to MKL (`matmul/mkl.rs`): f32 where our
/// kernels would otherwise run, in a build with the `mkl` feature, when MKL is switched on.
fn by_mkl(precision: Precision) -> bool {
    #[cfg(all(feature = "mkl", target_arch = "x86_64"))]
    {
        precision == Precision::F32 && uses_our_kernels() && mkl::runs()
    }
    #[cfg(not(all(feature = "mkl", target_arch = "x86_64")))]
    {
        let _ = precision;
        false
    }
}

/// What multiplies f32 now: `mkl` (Intel MKL's sgemm, see `matmul/mkl.rs`), `ours` (our kernels) or
/// `gemm-crate`, for `vitforge bench`.
pub fn f32_products() -> &'static str {
    if by_mkl(Precision::F32) {
        "mkl"
    } else if uses_our_kernels() {
        "ours"
    } else {
        "gemm-crate"
    }
}

/// `VITFORGE_MKL` as asked (`1`: f32 products by MKL, `0`: by ours), or an error naming the
/// variable and its values, or that this build has no MKL to switch on.
pub fn mkl_from_env() -> Result<Option<bool>, String> {
    let asked = switch_from_env(MKL_VAR, MKL_USAGE)?;
    if asked == Some(true) && !cfg!(all(feature = "mkl", target_arch = "x86_64")) {
        return Err(format!("{MKL_VAR}=1: this build has no MKL (build with `--features mkl`, see README)"));
    }
    Ok(asked)
}

const MKL_VAR: &str = "VITFORGE_MKL";
const MKL_USAGE: &str = "use 1 (f32 products by MKL) or 0 (by our kernels)";

/// A row-major copy of `m` with every element rounded to bfloat16.
fn rounded(m: Mat) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.rows * m.cols);
    for r in 0..m.rows {
        out.extend((0..m.cols).map(|c| round_bf16(m.data[m.offset + r * m.rs + c * m.cs])));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fast::isa::tests::{on, runnable};

    /// At every kernel level this CPU runs (`VITFORGE_MAX_ISA`'s levels, `amx` included where
    /// the CPU has it) and in both precisions: every layout of A and B, sizes that cut
    /// micro-tiles, row blocks and depth blocks at odd places, a strided output, accumulation
    /// and scaling, serial and parallel, against a plain triple loop in f64 (on the
    /// bf16-rounded operands in bf16).
    #[test]
    fn products_match_f64_for_every_layout_edge_and_level() {
        let levels = runnable();
        for &level in &levels {
            check_products(&format!("{level:?}"), &[Precision::F32, Precision::Bf16], |a, b, c, alpha, onto, threads, precision| {
                on(level, || product(a, None, b, c, alpha, onto, threads, precision))
            });
        }
        // An empty depth: C is cleared, or left as it is when accumulating.
        let mut c = vec![3.0f32; 4];
        gemm(Mat::rows(&[], 2, 0), Mat::rows(&[], 0, 2), MatMut::rows(&mut c, 2, 2), 1.0, false, Threads::One, Precision::F32);
        assert_eq!(c, vec![0.0; 4]);
        eprintln!("matrix products checked at {:?}", levels);
    }

    /// At the `avx512bf16` level bf16 products run by `vdpbf16ps` only where it measured faster
    /// than the FMA kernel (or `VITFORGE_DPBF16` says so); emulated, they are the `avx512`
    /// level's products bit for bit. `auto` precision follows the same choice.
    #[test]
    fn bf16_products_run_by_vdpbf16ps_only_where_it_measured_faster() {
        use crate::model::fast::isa::{self, Isa};
        let speed = dpbf16_speed();
        assert_eq!(speed.is_some(), isa::detected() >= Isa::Avx512Bf16);
        let expected = match isa::active() {
            Isa::Amx => "amx",
            Isa::Avx512Bf16 => match dpbf16_from_env() {
                Ok(Some(true)) => "vdpbf16ps",
                Ok(Some(false)) => "fma-emulated",
                _ if speed.expect("measured at this level") >= 1.0 => "vdpbf16ps",
                _ => "fma-emulated",
            },
            _ if !uses_our_kernels() => "gemm-crate-emulated",
            _ => "fma-emulated",
        };
        assert_eq!(bf16_products(), expected);
        assert_eq!(crate::model::native_bf16(), matches!(expected, "amx" | "vdpbf16ps"));
        if let Some(speed) = speed {
            assert!(speed.is_finite() && speed > 0.0, "{speed}");
        }
        let (m, k, n) = (37, 300, 70);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 41.0).collect();
        let run = || {
            let mut c = vec![0f32; m * n];
            gemm(Mat::rows(&a, m, k), Mat::rows(&b, k, n), MatMut::rows(&mut c, m, n), 1.0, false, Threads::All, Precision::Bf16);
            c
        };
        if expected == "fma-emulated" && isa::active() >= Isa::Avx512 {
            assert!(run() == on(Isa::Avx512, run), "emulated bf16 is the avx512 level's product");
        }
        eprintln!("bf16 products here: {expected} (vdpbf16ps against the FMA kernel: {speed:?})");
    }

    /// B packed once gives what packing it in the product gives, bit for bit, at every level
    /// this CPU runs, in both precisions, with and without a bias, serial and parallel, for B
    /// row-major and transposed (as weights are); and a packing is used only for the kernel and
    /// precision it was made for.
    #[test]
    fn packed_b_gives_the_product_of_plain_b_bit_for_bit() {
        let levels = runnable();
        let mut rand = uniform(3);
        for &level in &levels {
            for &(m, n, k) in &[(1, 1, 1), (13, 37, 385), (101, 33, 800), (200, 130, 64)] {
                let a: Vec<f32> = (0..m * k).map(|_| rand()).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rand()).collect();
                let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 0.1).collect();
                for tb in [false, true] {
                    let bv = if tb { Mat::rows(&b, n, k).t() } else { Mat::rows(&b, k, n) };
                    for precision in [Precision::F32, Precision::Bf16] {
                        let packed = on(level, || PackedB::new(bv, precision));
                        let Some(packed) = packed else {
                            assert!(!on(level, uses_our_kernels), "{level:?}: our kernels run, yet nothing was packed");
                            continue;
                        };
                        assert!(on(level, || packed.fits(precision)) && !on(level, || packed.fits(other(precision))));
                        assert_eq!(packed.shape(), (k, n));
                        for (with_bias, threads) in [(false, Threads::One), (true, Threads::All), (true, Threads::One), (false, Threads::All)] {
                            let bias = with_bias.then_some(&bias[..]);
                            let mut want = vec![0.25f32; m * n];
                            let mut got = vec![0.25f32; m * n];
                            on(level, || {
                                let onto = bias.map_or(Onto::Zero, Onto::Bias);
                                product(Mat::rows(&a, m, k), None, bv, MatMut::rows(&mut want, m, n), 1.0, onto, threads, precision);
                                gemm_bias_packed(Mat::rows(&a, m, k), &packed, MatMut::rows(&mut got, m, n), bias, threads);
                            });
                            let same = want.iter().zip(&got).all(|(x, y)| x.to_bits() == y.to_bits());
                            assert!(same, "{level:?} {precision:?} {m}x{n}x{k} tb={tb} bias={with_bias}");
                        }
                        // Packed for one level, it does not fit another level's kernel.
                        for &lower in levels.iter().filter(|&&l| on(l, || Kernel::active(precision)) != Some(packed.kernel)) {
                            assert!(!on(lower, || packed.fits(precision)), "{level:?} packing fits {lower:?}");
                        }
                    }
                }
            }
        }
        eprintln!("packed products checked at {levels:?}");
    }

    /// `f(A)·B` with `f` applied as A is packed gives the product of `f(A)` written whole, bit
    /// for bit, at every level this CPU runs, in both precisions, by B plain and packed once,
    /// with and without a bias, serial and parallel, for A a view inside a wider matrix and
    /// shapes that cut panels and blocks; and `f` is never asked for more than one row at a time.
    #[test]
    fn mapped_products_are_products_of_the_mapped_matrix_bit_for_bit() {
        let levels = runnable();
        let mut rand = uniform(11);
        for &level in &levels {
            for &(m, n, k) in &[(1, 1, 1), (13, 37, 385), (197, 70, 130), (250, 33, 64)] {
                let f = test_map(k);
                let wide = wider(m, k, &mut rand);
                let a = first_columns(&wide, m, k);
                let fa = mapped_rows(a, &f);
                assert_eq!(fa.len(), m * k);
                let b: Vec<f32> = (0..k * n).map(|_| rand()).collect();
                let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.02 - 0.3).collect();
                let bv = Mat::rows(&b, n, k).t();
                for precision in [Precision::F32, Precision::Bf16] {
                    let packed = on(level, || PackedB::new(bv, precision));
                    for (with_bias, threads) in [(false, Threads::One), (true, Threads::All), (true, Threads::One), (false, Threads::All)] {
                        let bias = with_bias.then_some(&bias[..]);
                        let (mut want, mut got, mut got_packed) = (vec![0.5f32; m * n], vec![0.5f32; m * n], vec![0.5f32; m * n]);
                        on(level, || {
                            let onto = bias.map_or(Onto::Zero, Onto::Bias);
                            product(Mat::rows(&fa, m, k), None, bv, MatMut::rows(&mut want, m, n), 1.0, onto, threads, precision);
                            gemm_mapped(a, &f, bv, MatMut::rows(&mut got, m, n), bias, threads, precision);
                            if let Some(packed) = &packed {
                                gemm_mapped_packed(a, &f, packed, MatMut::rows(&mut got_packed, m, n), bias, threads);
                            }
                        });
                        let label = format!("{level:?} {precision:?} {m}x{n}x{k} bias={with_bias} serial={}", threads == Threads::One);
                        assert!(want.iter().zip(&got).all(|(x, y)| x.to_bits() == y.to_bits()), "{label}");
                        if packed.is_some() {
                            assert!(want.iter().zip(&got_packed).all(|(x, y)| x.to_bits() == y.to_bits()), "{label}, B packed");
                        }
                    }
                }
            }
        }
        eprintln!("mapped products checked at {levels:?}");
    }

    /// A product by parts side by side gives what a product per part gives, bit for bit (one
    /// packing of A, the same tiles), and so does the product by the parts packed once, at every
    /// level this CPU runs, in both precisions, with and without a bias, serial and parallel:
    /// for parts that fill whole panels of every kernel (one product) and parts that do not (a
    /// product per part, and nothing packed).
    #[test]
    fn products_by_parts_side_by_side_match_a_product_per_part_bit_for_bit() {
        let levels = runnable();
        let mut rand = uniform(5);
        for &level in &levels {
            for (m, k, widths, whole_panels) in [(50, 70, vec![32, 64, 45], true), (13, 385, vec![64, 64], true), (30, 33, vec![20, 13, 7], false)] {
                let n: usize = widths.iter().sum();
                let a: Vec<f32> = (0..m * k).map(|_| rand()).collect();
                // Each part stored as weights are (out × in) and viewed transposed.
                let stored: Vec<Vec<f32>> = widths.iter().map(|w| (0..w * k).map(|_| rand()).collect()).collect();
                let parts: Vec<Mat> = stored.iter().zip(&widths).map(|(b, &w)| Mat::rows(b, w, k).t()).collect();
                let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 0.1).collect();
                for precision in [Precision::F32, Precision::Bf16] {
                    let packed = on(level, || PackedB::from_parts(&parts, precision));
                    let ours = on(level, uses_our_kernels);
                    assert_eq!(packed.is_some(), ours && whole_panels, "{level:?} {precision:?} {widths:?}");
                    for (with_bias, threads) in [(false, Threads::All), (true, Threads::One), (true, Threads::All)] {
                        let bias = with_bias.then_some(&bias[..]);
                        let (mut want, mut got, mut got_packed) = (vec![0.25f32; m * n], vec![0.5f32; m * n], vec![0.75f32; m * n]);
                        on(level, || {
                            let mut col = 0;
                            for (part, &w) in parts.iter().zip(&widths) {
                                let onto = bias.map_or(Onto::Zero, |b| Onto::Bias(&b[col..col + w]));
                                product(Mat::rows(&a, m, k), None, *part, MatMut::strided(&mut want, m, w, n, col), 1.0, onto, threads, precision);
                                col += w;
                            }
                            gemm_bias_parts(Mat::rows(&a, m, k), &parts, MatMut::rows(&mut got, m, n), bias, threads, precision);
                            if let Some(packed) = &packed {
                                assert_eq!(packed.shape(), (k, n));
                                gemm_bias_packed(Mat::rows(&a, m, k), packed, MatMut::rows(&mut got_packed, m, n), bias, threads);
                            }
                        });
                        let same = |x: &[f32]| want.iter().zip(x).all(|(x, y)| x.to_bits() == y.to_bits());
                        let label = format!("{level:?} {precision:?} {m}x{widths:?}x{k} bias={with_bias}");
                        assert!(same(&got), "{label}: by parts");
                        assert!(packed.is_none() || same(&got_packed), "{label}: packed by parts");
                    }
                }
            }
        }
        eprintln!("products by parts checked at {levels:?}");
    }

    /// With MKL switched on, f32 products are MKL's, and right: every layout, edge, output
    /// stride, scaling and target of [`check_products`] against f64, serial and parallel; bf16
    /// products stay ours.
    #[cfg(all(feature = "mkl", target_arch = "x86_64"))]
    #[test]
    fn mkl_products_match_f64_for_every_layout_and_edge() {
        let (before, runs) = (mkl::tests::calls(), std::cell::Cell::new(0));
        check_products("mkl", &[Precision::F32], |a, b, c, alpha, onto, threads, precision| {
            runs.set(runs.get() + 1);
            mkl::tests::with(true, || product(a, None, b, c, alpha, onto, threads, precision))
        });
        assert_eq!(mkl::tests::calls() - before, runs.get(), "every f32 product went to MKL");
        assert_eq!(mkl::tests::with(true, f32_products), "mkl");
        assert_eq!(mkl::tests::with(false, f32_products), if uses_our_kernels() { "ours" } else { "gemm-crate" });
        let before = mkl::tests::calls();
        check_products("mkl, bf16", &[Precision::Bf16], |a, b, c, alpha, onto, threads, precision| {
            mkl::tests::with(true, || product(a, None, b, c, alpha, onto, threads, precision))
        });
        assert_eq!(mkl::tests::calls(), before, "bf16 products went to MKL");
    }

    /// With MKL switched on, `f(A)·B` mapped block by block and a product by parts side by side
    /// give the f64 product of `f(A)` (or A) by B plus the bias, serial and parallel, for A a view
    /// inside a wider matrix, row counts that leave uneven blocks, and more rows than one mapped
    /// block; nothing is packed ahead for MKL, and our kernels' packing does not fit its products.
    #[cfg(all(feature = "mkl", target_arch = "x86_64"))]
    #[test]
    fn mkl_mapped_and_parts_products_match_f64() {
        let mut rand = uniform(17);
        for &(m, k, ref widths) in &[(1, 1, vec![1]), (13, 385, vec![32, 5]), (197, 130, vec![64, 6]), (301, 64, vec![20, 13, 7])] {
            let n: usize = widths.iter().sum();
            let f = test_map(k);
            let wide = wider(m, k, &mut rand);
            let a = first_columns(&wide, m, k);
            let fa = mapped_rows(a, &f);
            let plain_a = mapped_rows(a, &|x: &[f32], y: &mut [f32]| y.copy_from_slice(x));
            // Each part stored as weights are (out × in) and viewed transposed.
            let stored: Vec<Vec<f32>> = widths.iter().map(|w| (0..w * k).map(|_| rand()).collect()).collect();
            let parts: Vec<Mat> = stored.iter().zip(widths).map(|(b, &w)| Mat::rows(b, w, k).t()).collect();
            let whole: Vec<f32> = (0..k).flat_map(|p| parts.iter().flat_map(move |b| (0..b.cols).map(move |j| b.data[b.offset + p * b.rs + j * b.cs]))).collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.02 - 0.3).collect();
            let check = |got: &[f32], of: &[f32], with_bias: bool, label: &str| {
                for i in 0..m {
                    for j in 0..n {
                        let dot: f64 = (0..k).map(|p| f64::from(of[i * k + p]) * f64::from(whole[p * n + j])).sum();
                        let want = dot + if with_bias { f64::from(bias[j]) } else { 0.0 };
                        let got = f64::from(got[i * n + j]);
                        assert!((got - want).abs() < 1e-4, "{label} {m}x{n}x{k}: c[{i}][{j}] = {got}, want {want}");
                    }
                }
            };
            assert!(mkl::tests::with(true, || PackedB::from_parts(&parts, Precision::F32)).is_none(), "packed ahead for MKL");
            if let Some(ours) = mkl::tests::with(false, || PackedB::from_parts(&parts, Precision::F32)) {
                assert!(!mkl::tests::with(true, || ours.fits(Precision::F32)), "our packing fits MKL's products");
            }
            for (with_bias, threads) in [(false, Threads::One), (true, Threads::All), (true, Threads::One), (false, Threads::All)] {
                let b = with_bias.then_some(&bias[..]);
                let label = format!("bias={with_bias} serial={}", threads == Threads::One);
                let before = mkl::tests::calls();
                let (mut mapped, mut by_parts) = (vec![0.5f32; m * n], vec![0.5f32; m * n]);
                mkl::tests::with(true, || {
                    gemm_mapped(a, &f, Mat::rows(&whole, k, n), MatMut::rows(&mut mapped, m, n), b, threads, Precision::F32);
                    gemm_bias_parts(a, &parts, MatMut::rows(&mut by_parts, m, n), b, threads, Precision::F32);
                });
                assert_eq!(mkl::tests::calls(), before + 1 + parts.len(), "{label}: MKL ran one product, then one per part");
                check(&mapped, &fa, with_bias, &format!("{label} mapped"));
                check(&by_parts, &plain_a, with_bias, &format!("{label} by parts"));
            }
        }
    }

    #[test]
    fn the_mkl_switch_parses() {
        let parse_mkl = |v| parse_switch(MKL_VAR, v, MKL_USAGE);
        assert_eq!(parse_mkl(" 1 "), Ok(Some(true)));
        assert_eq!(parse_mkl("0"), Ok(Some(false)));
        assert_eq!(parse_mkl(""), Ok(None));
        let err = parse_mkl("yes").unwrap_err();
        assert!(err.contains("VITFORGE_MKL=\"yes\"") && err.contains("use 1"), "{err}");
    }

    /// The element-wise function the mapped products' tests apply (`x·|x| − 0.3·x + 0.1`),
    /// checking that it is given one row of `k` at a time.
    fn test_map(k: usize) -> impl Fn(&[f32], &mut [f32]) + Sync {
        move |x, y| {
            assert_eq!((x.len(), y.len()), (k, k), "one row at a time");
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x * x.abs() - 0.3 * x + 0.1;
            }
        }
    }

    /// An m × (k + 3) matrix of `rand`'s values, whose first k columns ([`first_columns`]) are
    /// an A that is a view inside a wider matrix.
    fn wider(m: usize, k: usize, rand: &mut impl FnMut() -> f32) -> Vec<f32> {
        (0..m * (k + 3)).map(|_| rand()).collect()
    }

    fn first_columns(wide: &[f32], m: usize, k: usize) -> Mat<'_> {
        Mat { data: wide, offset: 0, rows: m, cols: k, rs: k + 3, cs: 1 }
    }

    /// Reproducible values in [-½, ½) from `seed` (a 64-bit LCG's high bits).
    fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        }
    }

    fn other(p: Precision) -> Precision {
        if p == Precision::F32 { Precision::Bf16 } else { Precision::F32 }
    }

    /// Checks `run` — a product `alpha·a·b` onto nothing, C or a bias row (a, b, c, alpha,
    /// onto, threads, precision) — against f64 for the `precisions` given: sizes that cut every
    /// kernel's tiles and blocks, every layout of A and B, a strided output, scaling by 1 and by
    /// ½, serial and parallel.
    pub(super) fn check_products(label: &str, precisions: &[Precision], run: impl Fn(Mat, Mat, MatMut, f32, Onto, Threads, Precision)) {
        let mut rand = uniform(1);
        // Onto: 0 nothing, 1 C, 2 a bias row.
        let runs = [
            (0, Threads::One, Precision::F32, 0.5),
            (1, Threads::All, Precision::F32, 1.0),
            (2, Threads::One, Precision::F32, 1.0),
            (0, Threads::All, Precision::Bf16, 1.0),
            (1, Threads::One, Precision::Bf16, 0.5),
            (1, Threads::All, Precision::Bf16, 1.0),
            (2, Threads::All, Precision::Bf16, 1.0),
            (2, Threads::One, Precision::Bf16, 0.5),
        ];
        for &(m, n, k) in &[(1, 1, 1), (5, 15, 7), (6, 16, 384), (13, 37, 385), (27, 54, 70), (70, 96, 49), (101, 33, 800), (200, 130, 64), (397, 45, 33)] {
            let a: Vec<f32> = (0..m * k).map(|_| rand()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rand()).collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 0.1).collect();
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                // Stored transposed when asked, then viewed back as m×k and k×n.
                let av = if ta { Mat::rows(&a, k, m).t() } else { Mat::rows(&a, m, k) };
                let bv = if tb { Mat::rows(&b, n, k).t() } else { Mat::rows(&b, k, n) };
                for &(kind, threads, precision, alpha) in runs.iter().filter(|r| precisions.contains(&r.2)) {
                    let onto = [Onto::Zero, Onto::C, Onto::Bias(&bias)][kind];
                    let op = |x: f32| f64::from(if precision == Precision::Bf16 { round_bf16(x) } else { x });
                    let at = |i: usize, p: usize| op(a[av.offset + i * av.rs + p * av.cs]);
                    let bt = |p: usize, j: usize| op(b[bv.offset + p * bv.rs + j * bv.cs]);
                    let stride = n + 3;
                    let mut c = vec![0.25f32; m * stride];
                    run(av, bv, MatMut::strided(&mut c, m, n, stride, 2), alpha, onto, threads, precision);
                    for i in 0..m {
                        for j in 0..stride {
                            let got = f64::from(c[i * stride + j]);
                            let want = if (2..2 + n).contains(&j) {
                                let dot: f64 = (0..k).map(|p| at(i, p) * bt(p, j - 2)).sum();
                                f64::from(alpha) * dot + [0.0, 0.25, f64::from(bias[j - 2])][kind]
                            } else {
                                0.25
                            };
                            assert!(
                                (got - want).abs() < 1e-4,
                                "{label} {precision:?} {m}x{n}x{k} ta={ta} tb={tb} onto={kind} alpha={alpha}: c[{i}][{j}] = {got}, want {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Throughput of the products of a ViT layer, for comparing drivers and kernels (not a test: it
/// asserts nothing, and is ignored unless asked for):
/// `cargo test --release --lib product_speed -- --ignored --nocapture`, with `ROWS=197,1576`
/// (rows of A: tokens of a batch), `SHAPES="384,1152;1536,384"` (depth and columns of B; default
/// ViT-S/16's four), `PRECISION=f32|bf16` (default bf16), `THREADS=1` (default: rayon's pool),
/// and `VITFORGE_MAX_ISA` to pick the kernel (with the `mkl` feature, `VITFORGE_MKL=1` for MKL's
/// f32 products). Our kernels' B is packed once, as inference packs weights.
#[cfg(test)]
mod speed {
    use super::*;

    fn env_list<T>(name: &str, sep: char, default: &str, parse: impl Fn(&str) -> T) -> Vec<T> {
        std::env::var(name).unwrap_or_else(|_| default.to_string()).split(sep).map(|x| parse(x.trim())).collect()
    }

    #[test]
    #[ignore = "a measurement, run on request"]
    fn product_speed() {
        let rows = env_list("ROWS", ',', "197,1576", |x| x.parse::<usize>().expect("ROWS: numbers"));
        let shapes = env_list("SHAPES", ';', "384,1152;384,384;384,1536;1536,384", |x| {
            let (k, n) = x.split_once(',').expect("SHAPES: k,n;k,n");
            (k.parse::<usize>().expect("SHAPES: numbers"), n.parse::<usize>().expect("SHAPES: numbers"))
        });
        let precision = if std::env::var("PRECISION").as_deref() == Ok("f32") { Precision::F32 } else { Precision::Bf16 };
        let threads = if std::env::var("THREADS").as_deref() == Ok("1") { Threads::One } else { Threads::All };
        let on = if threads == Threads::One { "one thread" } else { "rayon's pool" };
        eprintln!("{}; {precision:?} on {on}; VITFORGE_MKL {:?}", crate::model::isa::summary(), mkl_from_env());
        for &m in &rows {
            for &(k, n) in &shapes {
                let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
                let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
                let mut c = vec![0f32; m * n];
                let time = || {
                    // MKL packs B in each call; our kernels' B is packed once.
                    let packed = (!by_mkl(precision)).then(|| PackedB::new(Mat::rows(&b, k, n), precision).expect("a kernel of ours runs here"));
                    let reps = (2_000_000_000 / (m * n * k)).max(3);
                    let mut best = f64::MAX;
                    for _ in 0..5 {
                        let t = std::time::Instant::now();
                        for _ in 0..reps {
                            let (a, c) = (Mat::rows(&a, m, k), MatMut::rows(&mut c, m, n));
                            match &packed {
                                Some(packed) => gemm_bias_packed(a, packed, c, None, threads),
                                None => gemm(a, Mat::rows(&b, k, n), c, 1.0, false, threads, precision),
                            }
                        }
                        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
                    }
                    best
                };
                #[cfg(all(feature = "mkl", target_arch = "x86_64"))]
                let time = || mkl::tests::with(mkl_from_env() == Ok(Some(true)), time);
                let seconds = crate::model::fast::on_pool(time);
                eprintln!("rows {m:5}  k {k:5}  n {n:5}: {:6.0} GFLOP/s", 2.0 * (m * n * k) as f64 / seconds / 1e9);
            }
        }
    }
}
