//! Matrix products on strided views of `f32` slices, with bounds checked before the unsafe call:
//! through our AVX2/FMA kernel ([`sgemm`]) where the CPU has it, else through the `gemm`
//! crate (the kernels candle's CPU backend uses). Strides let one buffer hold Q, K and V side by
//! side and let transposes cost nothing.

#[cfg(target_arch = "x86_64")]
mod sgemm;

use gemm::Parallelism;

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

/// `c = beta·a·b` (or `c += beta·a·b` with `accumulate`).
pub fn gemm(a: Mat, b: Mat, c: MatMut, beta: f32, accumulate: bool, threads: Threads) {
    assert_eq!(a.cols, b.rows, "inner dimensions");
    assert_eq!((a.rows, b.cols), (c.rows, c.cols), "output shape");
    a.check();
    b.check();
    if c.rows > 0 && c.cols > 0 {
        assert!(c.offset + (c.rows - 1) * c.rs + c.cols - 1 < c.data.len(), "output view out of bounds");
    }
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            for r in 0..c.rows {
                c.data[c.offset + r * c.rs..c.offset + r * c.rs + c.cols].fill(0.0);
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if sgemm::available() && !generic_forced() {
        let parallel = threads == Threads::All && rayon::current_num_threads() > 1;
        sgemm::gemm(a, b, c, beta, accumulate, parallel);
        return;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_products_match_a_naive_loop() {
        let a: Vec<f32> = (0..24).map(|v| v as f32 * 0.5 - 3.0).collect(); // 4×6
        let b: Vec<f32> = (0..18).map(|v| (v as f32).sin()).collect(); // 6×3
        let mut c = vec![1.0f32; 4 * 3];
        gemm(Mat::rows(&a, 4, 6), Mat::rows(&b, 6, 3), MatMut::rows(&mut c, 4, 3), 2.0, true, Threads::All);
        for i in 0..4 {
            for j in 0..3 {
                let want: f32 = 1.0 + 2.0 * (0..6).map(|k| a[i * 6 + k] * b[k * 3 + j]).sum::<f32>();
                assert!((c[i * 3 + j] - want).abs() < 1e-4);
            }
        }
        // Aᵀ·A via views, into the middle columns of a wider buffer.
        let mut wide = vec![9.0f32; 6 * 10];
        gemm(Mat::rows(&a, 4, 6).t(), Mat::rows(&a, 4, 6), MatMut::strided(&mut wide, 6, 6, 10, 2), 1.0, false, Threads::One);
        for i in 0..6 {
            assert_eq!(wide[i * 10], 9.0);
            for j in 0..6 {
                let want: f32 = (0..4).map(|k| a[k * 6 + i] * a[k * 6 + j]).sum();
                assert!((wide[i * 10 + 2 + j] - want).abs() < 1e-4);
            }
        }
    }
}
