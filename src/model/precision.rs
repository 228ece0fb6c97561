//! The precision of the matrix products: `f32`, or `bf16` (operands rounded to bfloat16, products
//! accumulated in f32), and `auto`, which picks bf16 only where our kernels run bf16 natively
//! and faster than f32.
//!
//! Layer norm, softmax, the activations, the loss and every reduction stay in f32 in both; so do
//! the weights a model keeps and saves (training in bf16 is mixed precision: f32 master weights
//! and optimiser state, bf16 operands for the products). The fast CPU path rounds each operand
//! as it packs it for the product ([`super::fast`]); the reference path rounds with a
//! straight-through cast, so that autograd passes gradients through the rounding unchanged.
//!
//! On AMX CPUs the products run on tiles by `tdpbf16ps`; on a CPU with AVX-512 BF16 by
//! `vdpbf16ps` where that measured faster than the f32 FMA kernel (twice the f32 rate on an AMD
//! Zen 5, half of it on an Intel Xeon without AMX: `matmul::dpbf16_pays`); elsewhere bf16 is
//! emulated (the f32 kernels multiply the rounded operands), at f32 speed with bf16's results.
//! `auto` is bf16 only where it runs natively and faster. The default stays `f32` (README,
//! "Precision", says why).

use serde::{Deserialize, Serialize};

/// The precision the products of a run use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// The precision asked for (a flag, a job parameter): `auto` is decided where the work runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionChoice {
    #[default]
    F32,
    Bf16,
    /// bf16 where our kernels run it natively, and faster than f32, on this CPU, else f32.
    Auto,
}

impl PrecisionChoice {
    /// `f32`, `bf16` or `auto`, or an error naming the values.
    pub fn parse(s: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s.trim(), true).map_err(|_| format!("{s:?} is not a precision: use f32, bf16 or auto"))
    }

    /// The precision to run at on `device` of this machine.
    pub fn resolve(self, device: &candle_core::Device) -> Precision {
        match self {
            PrecisionChoice::F32 => Precision::F32,
            PrecisionChoice::Bf16 => Precision::Bf16,
            PrecisionChoice::Auto => auto(device.is_cuda()),
        }
    }
}

/// What `auto` runs at: bf16 on a GPU (cuBLAS multiplies bf16 with f32 accumulation: 1.46× f32's
/// speed in inference and 1.16× in a training step of ViT-B/16 on an H200, bench/GPU.md); on the
/// CPU bf16 when a kernel of ours multiplies it natively, and faster than f32, at the active
/// instruction-set level (AMX; AVX-512 BF16 where `vdpbf16ps` measured faster), else f32.
fn auto(gpu: bool) -> Precision {
    if gpu || super::native_bf16() { Precision::Bf16 } else { Precision::F32 }
}

/// `x` rounded to the nearest bfloat16 (ties to even), as an f32.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even_and_idempotent() {
        // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: ties go to the even mantissa (1).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0 + 1e-6), 1.0 + 2.0 / 256.0);
        let x = round_bf16(std::f32::consts::PI);
        assert_eq!(round_bf16(x), x);
        assert!((x - std::f32::consts::PI).abs() < 2f32.powi(-7) * 2.0);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn choices_parse_and_resolve() {
        let cpu = candle_core::Device::Cpu;
        let c: PrecisionChoice = serde_json::from_str("\"bf16\"").unwrap();
        assert_eq!(c.resolve(&cpu), Precision::Bf16);
        assert_eq!(PrecisionChoice::F32.resolve(&cpu), Precision::F32);
        let native = super::super::native_bf16();
        assert_eq!(PrecisionChoice::Auto.resolve(&cpu), if native { Precision::Bf16 } else { Precision::F32 });
        assert_eq!(super::super::isa::tests::on(super::super::isa::Isa::Avx512, || PrecisionChoice::Auto.resolve(&cpu)), Precision::F32);
        // A GPU multiplies bf16 natively whatever the CPU (a CUDA device cannot be made here).
        assert_eq!(super::super::isa::tests::on(super::super::isa::Isa::Avx512, || auto(true)), Precision::Bf16);
        assert!(serde_json::from_str::<PrecisionChoice>("\"fp16\"").is_err());
        assert_eq!(serde_json::to_string(&Precision::Bf16).unwrap(), "\"bf16\"");
    }
}
