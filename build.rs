//! Rebuilds the crate when a migration is added or changed: `sqlx::migrate!` embeds the
//! `migrations/` folders at compile time, and cargo does not otherwise watch them (sqlx's own
//! advice, `cargo sqlx migrate build-script`). With the `mkl` feature, links Intel MKL's static
//! libraries from `MKL_LIB_DIR` (`scripts/mkl.sh` fetches them).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
    if std::env::var_os("CARGO_FEATURE_MKL").is_some() {
        link_mkl();
    }
}

/// MKL's LP64 interface, sequential threading layer and core, as one group (they refer to each
/// other), after everything else on the link line; rayon's threads call it, so MKL starts none.
fn link_mkl() {
    println!("cargo:rerun-if-env-changed=MKL_LIB_DIR");
    let Some(dir) = std::env::var_os("MKL_LIB_DIR") else {
        panic!(
            "the `mkl` feature links Intel MKL's static libraries: set MKL_LIB_DIR to the folder \
             that holds libmkl_core.a (`export MKL_LIB_DIR=$(bash scripts/mkl.sh)` fetches them)"
        );
    };
    let dir = std::path::PathBuf::from(dir);
    let libs = ["mkl_intel_lp64", "mkl_sequential", "mkl_core"].map(|name| dir.join(format!("lib{name}.a")));
    for lib in &libs {
        assert!(lib.is_file(), "MKL_LIB_DIR: {} is missing (`bash scripts/mkl.sh` fetches it)", lib.display());
        println!("cargo:rerun-if-changed={}", lib.display());
    }
    println!("cargo:rustc-link-arg=-Wl,--start-group");
    for lib in &libs {
        println!("cargo:rustc-link-arg={}", lib.display());
    }
    println!("cargo:rustc-link-arg=-Wl,--end-group");
    for lib in ["-lpthread", "-lm", "-ldl"] {
        println!("cargo:rustc-link-arg={lib}");
    }
}
