//! Which instruction sets the CPU kernels may use: what the CPU has, capped by
//! `VITFORGE_MAX_ISA` (`generic`, `avx2`, `avx512`, `avx512bf16` or `amx`) so that every path
//! can be run, compared and tested on one machine.
//!
//! Our kernels exist for five levels: portable code (`generic`: the `gemm` crate's matrix
//! product and plain loops), AVX2 + FMA (our 6×16 matrix product, the element-wise kernels
//! compiled for AVX2), AVX-512 (a 12×32 f32 matrix product, the element-wise kernels compiled
//! for AVX-512), AVX-512 BF16 (bf16 products by `vdpbf16ps`, 12×32) and AMX (bf16 products on
//! tiles, 32×32). Each has run and been checked against f64 on a CPU with its instruction set
//! (bench/RESULTS.md names the CPUs) and is chosen by default where the CPU has it. AMX ran on an
//! Intel Xeon with AMX-BF16 on 2026-12-04 (the device machine of the GPU check, by
//! `bench/amx-check.sh`): every kernel test passed at `amx`, the golden files passed, and its bf16
//! products were 2.5 to 4.3 times the AVX-512 BF16 kernel's speed; from then on it is the default
//! on CPUs with AMX where Linux grants the tile state. The tests and golden files passed at every
//! level again on 2026-12-07 on a development VM with AMX (bench/RESULTS.md).

use std::sync::OnceLock;

/// An instruction-set level, from the lowest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Whatever the compile target guarantees (SSE2 on x86-64).
    Generic,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 F, BW, VL and DQ.
    Avx512,
    /// AVX-512 with BF16 (`vdpbf16ps`: bf16 pairs multiplied, accumulated in f32).
    Avx512Bf16,
    /// AMX tiles with bf16 (and AVX-512 BF16).
    Amx,
}

/// Every level, from the lowest.
pub const ALL: [Isa; 5] = [Isa::Generic, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Amx];

/// The environment variable that caps the level.
pub const CAP_VAR: &str = "VITFORGE_MAX_ISA";

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Generic => "generic",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }

    pub fn parse(s: &str) -> Option<Isa> {
        ALL.into_iter().find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }

    /// What runs at this level, in words (for `vitforge bench` and the start-up log).
    pub fn describe_kernels(self) -> &'static str {
        match self {
            Isa::Generic => "portable kernels (the gemm crate's matrix product, plain loops)",
            Isa::Avx2 => "AVX2/FMA kernels (our 6×16 matrix product, the element-wise kernels compiled for AVX2)",
            Isa::Avx512 => {
                "AVX-512 kernels (our 12×32 f32 matrix product, bf16 emulated by rounding; element-wise kernels compiled for AVX-512)"
            }
            Isa::Avx512Bf16 => {
                "AVX-512 BF16 kernels (12×32 matrix products: f32 by FMA, bf16 by vdpbf16ps where it is faster, else emulated by FMA; element-wise kernels compiled for AVX-512)"
            }
            Isa::Amx => {
                "AMX kernels (bf16 products on 32×32 tiles; f32 by the 12×32 AVX-512 FMA kernel; element-wise kernels compiled for AVX-512)"
            }
        }
    }
}

/// The highest level this CPU (and its operating system) supports, checked once.
pub fn detected() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    use std::arch::is_x86_feature_detected as has;
    if !(has!("avx2") && has!("fma")) {
        return Isa::Generic;
    }
    if !(has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq")) {
        return Isa::Avx2;
    }
    // AMX has no stable feature detection: the CPUID bits, and the OS's grant of the tile state.
    match (has!("avx512bf16"), cpu_has_amx() && grant_tile_state()) {
        (false, _) => Isa::Avx512,
        (true, false) => Isa::Avx512Bf16,
        (true, true) => Isa::Amx,
    }
}

/// Whether the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22), on any CPU:
/// it allocates nothing, so the allocator asks it too (`crate::malloc::aligns`). AMX is used
/// only where Linux also grants the tile state ([`grant_tile_state`], asked once by
/// [`detected`]).
#[cfg(target_arch = "x86_64")]
pub(crate) fn cpu_has_amx() -> bool {
    use std::arch::x86_64::{__cpuid_count, __get_cpuid_max};
    // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is read only where the CPU has it.
    #[allow(unused_unsafe)]
    unsafe {
        __get_cpuid_max(0).0 >= 7 && {
            let edx = __cpuid_count(7, 0).edx;
            edx & (1 << 22) != 0 && edx & (1 << 24) != 0
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn cpu_has_amx() -> bool {
    false
}

/// Asks Linux for the AMX tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`)
/// and checks that `ARCH_GET_XCOMP_PERM` shows it.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn grant_tile_state() -> bool {
    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    let mut granted: libc::c_ulong = 0;
    // SAFETY: arch_prctl with these codes reads an integer argument or writes one `c_ulong`
    // through the pointer given.
    unsafe {
        libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
            && libc::syscall(libc::SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mut granted as *mut libc::c_ulong) == 0
            && granted & (1 << XFEATURE_XTILEDATA) != 0
    }
}

/// Other systems: not known to grant the tile state, so AMX is not used there.
#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn grant_tile_state() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Generic
}

/// The cap set by `VITFORGE_MAX_ISA`, or an error naming the variable and its values.
pub fn cap_from_env() -> Result<Option<Isa>, String> {
    match std::env::var(CAP_VAR) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Isa::parse(&v).map(Some).ok_or_else(|| {
            format!("{CAP_VAR}={v:?} is not an instruction-set level: use one of generic, avx2, avx512, avx512bf16, amx")
        }),
        Err(e) => Err(format!("{CAP_VAR}: {e}")),
    }
}

/// The cap in force: `VITFORGE_MAX_ISA`, read once (the command line checks it at start-up, so
/// an unreadable value is reported there and none applies here).
fn cap() -> Option<Isa> {
    static CAP: OnceLock<Option<Isa>> = OnceLock::new();
    *CAP.get_or_init(|| cap_from_env().ok().flatten())
}

/// The level the kernels use: what the CPU has, capped by [`cap`].
pub fn active() -> Isa {
    #[cfg(test)]
    if let Some(isa) = tests::OVERRIDE.get() {
        return isa.min(detected());
    }
    choose(detected(), cap())
}

/// The level for a CPU at `detected` under `cap`.
fn choose(detected: Isa, cap: Option<Isa>) -> Isa {
    match cap {
        Some(cap) => detected.min(cap),
        None => detected,
    }
}

/// One line for logs and `vitforge bench`: the CPU's level, the cap, and what runs.
pub fn summary() -> String {
    let cap = cap().map(|c| format!(", capped at {} by {CAP_VAR}", c.name())).unwrap_or_default();
    let amx = if detected() == Isa::Avx512Bf16 && cpu_has_amx() {
        // AVX-512 BF16 and the AMX flags, yet not `amx`: the grant was refused.
        " (the CPU has AMX, but Linux did not grant this process its tile state: AMX is not used)".to_string()
    } else {
        String::new()
    };
    format!("CPU instruction sets: {} detected{cap}; running {}{amx}", detected().name(), active().describe_kernels())
}

#[cfg(test)]
pub mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        /// A level forced on this thread by [`on`] (tests only: kernels called on this thread).
        pub static OVERRIDE: Cell<Option<Isa>> = const { Cell::new(None) };
    }

    /// Runs `f` with the kernels called on this thread at `isa`.
    pub fn on<T>(isa: Isa, f: impl FnOnce() -> T) -> T {
        let before = OVERRIDE.replace(Some(isa));
        let out = f();
        OVERRIDE.set(before);
        out
    }

    /// The levels this machine can run, lowest first (`amx` included where the CPU has it):
    /// every kernel test runs once per entry.
    pub fn runnable() -> Vec<Isa> {
        ALL.into_iter().filter(|&i| i <= detected()).collect()
    }

    #[test]
    fn levels_parse_order_and_cap() {
        assert_eq!(Isa::parse(" AVX512 "), Some(Isa::Avx512));
        assert_eq!(Isa::parse("sse"), None);
        assert_eq!(Isa::parse("avx512BF16"), Some(Isa::Avx512Bf16));
        assert!(ALL.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(choose(Isa::Amx, None), Isa::Amx, "AMX CPUs run the AMX kernel by default");
        assert_eq!(choose(Isa::Amx, Some(Isa::Amx)), Isa::Amx);
        assert_eq!(choose(Isa::Avx512Bf16, Some(Isa::Amx)), Isa::Avx512Bf16);
        assert_eq!(choose(Isa::Amx, Some(Isa::Avx2)), Isa::Avx2);
        assert_eq!(choose(Isa::Avx512, None), Isa::Avx512);
        assert_eq!(on(Isa::Generic, active), Isa::Generic);
        assert!(runnable().contains(&Isa::Generic));
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            runnable().contains(&Isa::Avx2),
            std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        );
        eprintln!("this CPU: {}; kernel levels tested here: {:?}", detected().name(), runnable());
    }
}
