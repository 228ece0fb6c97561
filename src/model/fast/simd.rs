//! Runtime CPU-feature dispatch for the element-wise kernels: each kernel body is written as plain
//! loops that LLVM vectorises, and compiled three times, for the baseline target, with AVX2 +
//! FMA and with AVX-512, picked at run time by [`isa::active`](super::isa::active) (the binary
//! stays portable, and `VITFORGE_MAX_ISA=generic` runs the baseline on any CPU).

/// True when the kernels may use AVX2 and FMA: the CPU has them and no cap forbids them.
#[cfg(target_arch = "x86_64")]
pub fn use_avx2() -> bool {
    super::isa::active() >= super::isa::Isa::Avx2
}

/// True when the kernels may use AVX-512 (F, BW, VL, DQ): the CPU has it and no cap forbids it.
#[cfg(target_arch = "x86_64")]
pub fn use_avx512() -> bool {
    super::isa::active() >= super::isa::Isa::Avx512
}

/// Defines `pub fn $name(args)` that runs `$body` compiled with AVX-512 when [`use_avx512`] says
/// so, else with AVX2 + FMA when [`use_avx2`] does, else for the baseline.
macro_rules! dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if $crate::model::fast::simd::use_avx512() {
                    // SAFETY: `isa::active` is never above what was detected on this CPU, so it
                    // has AVX-512 F, BW, VL and DQ.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::model::fast::simd::use_avx2() {
                    // SAFETY: `isa::active` is never above what was detected on this CPU, so it
                    // has `avx2` and `fma`.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use dispatch;

const LOG2E: f32 = std::f32::consts::LOG2_E;
pub(super) const LN2_HI: f32 = 0.693_359_4;
pub(super) const LN2_LO: f32 = -2.121_944_4e-4;

/// Bounds of [`exp`]'s argument (e^-87 is near f32's smallest normal, e^88 near its largest).
pub(super) const EXP_RANGE: (f32, f32) = (-87.0, 88.0);
/// [`exp`]'s polynomial in the reduced argument, highest degree first.
pub(super) const EXP_POLY: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// e^x in f32 (Cephes `expf`: range reduction by ln 2 and a degree-6 polynomial, about 1 ulp),
/// branch-free so that loops calling it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(EXP_RANGE.0, EXP_RANGE.1);
    let n = x.mul_add(LOG2E, 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let z = r * r;
    let p = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, &c| p.mul_add(r, c));
    let y = p.mul_add(z, r) + 1.0;
    // SAFETY: n is in [-126, 127] after the clamp, so the conversion is exact.
    let bits = (unsafe { n.to_int_unchecked::<i32>() } + 127) << 23;
    y * f32::from_bits(bits as u32)
}

/// erf(x) in f32 as Eigen and XLA compute it: `x·P(x²)/Q(x²)` on x clamped to [-4, 4] (erf(4)
/// is 1 in f32), P of degree 6 and Q of degree 4 in x². Absolute error below 4e-7 (a few ulps of
/// values near 1), with no `exp`: GELU took 3.2% of a ViT-S bf16 inference profile with it,
/// against 7.7% with the Numerical Recipes `erfc` fit through `exp` it replaced (bench/RESULTS.md).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = (-2.726_142_4e-10f32)
        .mul_add(x2, 2.770_681_5e-8)
        .mul_add(x2, -2.101_024e-6)
        .mul_add(x2, -5.692_506_2e-5)
        .mul_add(x2, -7.349_906_4e-4)
        .mul_add(x2, -2.954_6e-3)
        .mul_add(x2, -1.609_603_3e-2);
    let q = (-1.456_607_15e-5f32)
        .mul_add(x2, -2.133_740_5e-4)
        .mul_add(x2, -1.682_827e-3)
        .mul_add(x2, -7.373_329_3e-3)
        .mul_add(x2, -1.426_473_9e-2);
    x * p / q
}

/// tanh(x) in f32 from `exp` (saturates cleanly for large |x|).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let e = exp(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

/// The logistic function.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
pub mod tests {
    use super::*;

    #[test]
    fn exp_erf_tanh_are_accurate() {
        let mut worst = [0f64; 3];
        let mut x = -30.0f32;
        while x < 30.0 {
            let e = (f64::from(exp(x)) - f64::from(x).exp()).abs() / f64::from(x).exp();
            worst[0] = worst[0].max(e);
            let erf_ref = erf64(f64::from(x));
            worst[1] = worst[1].max((f64::from(erf(x)) - erf_ref).abs());
            worst[2] = worst[2].max((f64::from(tanh(x)) - f64::from(x).tanh()).abs());
            x += 0.001_37;
        }
        assert!(worst[0] < 3e-7, "exp relative error {}", worst[0]);
        // The rational fit's own error is ~3e-7 near |x| = 2.9, where erf is within 4e-5 of 1 and
        // an ulp is 6e-8.
        assert!(worst[1] < 4e-7, "erf absolute error {}", worst[1]);
        assert!(worst[2] < 3e-7, "tanh absolute error {}", worst[2]);
        assert_eq!(exp(-200.0), exp(-87.0));
        assert!(exp(100.0).is_finite());
    }

    /// erf by its Taylor series (|x| < 3) or 1 − erfc by continued fraction, in f64.
    pub fn erf64(x: f64) -> f64 {
        let a = x.abs();
        let v = if a < 3.0 {
            let (mut sum, mut term, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            2.0 / std::f64::consts::PI.sqrt() * sum
        } else {
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = f64::from(k) / 2.0 / (a + f);
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f)
        };
        v.copysign(x)
    }
}
