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
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x in f32 (Cephes `expf`: range reduction by ln 2 and a degree-6 polynomial, about 1 ulp),
/// branch-free so that loops calling it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let z = r * r;
    let p = 1.987_569_1e-4f32
        .mul_add(r, 1.398_199_9e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 1.666_666_5e-1)
        .mul_add(r, 0.5);
    let y = p.mul_add(z, r) + 1.0;
    // SAFETY: n is in [-126, 127] after the clamp, so the conversion is exact.
    let bits = (unsafe { n.to_int_unchecked::<i32>() } + 127) << 23;
    y * f32::from_bits(bits as u32)
}

/// erf(x) in f32 from the Numerical Recipes `erfc` fit (fractional error below 1.2e-7).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = t.mul_add(0.170_872_77, -0.822_152_23).mul_add(t, 1.488_515_9).mul_add(t, -1.135_204).mul_add(t, 0.278_868_07)
        .mul_add(t, -0.186_288_06)
        .mul_add(t, 0.096_784_18)
        .mul_add(t, 0.374_091_96)
        .mul_add(t, 1.000_023_7)
        .mul_add(t, -1.265_512_2);
    let erfc = t * exp(-z * z + poly);
    (1.0 - erfc).copysign(x)
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
        assert!(worst[1] < 3e-7, "erf absolute error {}", worst[1]);
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
