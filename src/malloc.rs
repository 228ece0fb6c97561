//! The C allocator's settings for this workload (glibc, the allocator of our Linux builds and
//! containers; elsewhere this module does nothing).
//!
//! A training step of the fast CPU path allocates its activations, thousands of buffers of a
//! few MiB each (hundreds of MiB to GiB in all), and frees them when the step ends. With glibc's
//! defaults that memory goes back to the kernel after every step and comes back in the next one
//! page by page, each page a fault and a zero-fill: the main heap is trimmed whenever more than
//! a few tens of MiB are free at its top, and the heaps of other threads' arenas (64 MiB each;
//! the compute runs on rayon's threads, see `model::on_pool`) are unmapped whenever they empty,
//! whatever the trim threshold says. bench/RESULTS.md ("Compute on the pool's threads") has the
//! measurements: with these settings a training run takes half the page faults, and moving the
//! compute onto rayon's threads made ViT-B/16 training slower until they came with it.
//!
//! So, at start ([`configure`]): one arena (the compute makes few, large allocations; threads'
//! small ones are served mostly from their own caches), no automatic trimming, and no separate
//! mapping for blocks under 1 GiB. Memory a step freed then stays with the process for the next
//! one; [`release_free_memory`] gives it back when a job ends and, in `serve`, every 30 s (a
//! running job then faults one step's memory in again, twice a minute). Settings of the
//! user's own (`GLIBC_TUNABLES` naming `glibc.malloc.*`, or any `MALLOC_*` variable) win: then
//! nothing is changed.

/// Applies this workload's allocator settings, unless the user set their own. Call first thing
/// in `main`, before any thread starts (arenas are handed out to threads as they first
/// allocate). Returns whether the settings were applied.
pub fn configure() -> bool {
    let applied = !user_configured(std::env::vars_os()) && apply();
    APPLIED.store(applied, std::sync::atomic::Ordering::Relaxed);
    applied
}

static APPLIED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`configure`] applied its settings: then freed memory stays with the process until
/// [`release_free_memory`], which a long-running process should call now and then.
pub fn applied() -> bool {
    APPLIED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether the environment carries allocator settings of the user's own.
fn user_configured(vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>) -> bool {
    vars.into_iter().any(|(name, value)| {
        let name = name.to_string_lossy();
        name.starts_with("MALLOC_") || (name == "GLIBC_TUNABLES" && value.to_string_lossy().contains("glibc.malloc."))
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    /// Blocks at least this large get a mapping of their own (unmapped when freed).
    const MMAP_THRESHOLD: libc::c_int = 1 << 30;
    // SAFETY: mallopt only sets glibc's malloc parameters, under malloc's own lock.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
            && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

/// Gives the memory that is free inside the process back to the kernel (glibc's `malloc_trim`),
/// as the settings of [`configure`] no longer do by themselves: the worker calls it when a job
/// ends, and `serve` every half minute. Takes some milliseconds for GiBs.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the heaps to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))).collect()
    }

    #[test]
    fn a_users_own_malloc_settings_win() {
        assert!(!user_configured(env(&[("PATH", "/bin"), ("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")])));
        assert!(!user_configured(env(&[])));
        assert!(user_configured(env(&[("GLIBC_TUNABLES", "glibc.cpu.x=1:glibc.malloc.arena_max=4")])));
        assert!(user_configured(env(&[("MALLOC_ARENA_MAX", "2")])));
        assert!(user_configured(env(&[("MALLOC_TRIM_THRESHOLD_", "0")])));
    }

    #[test]
    fn the_settings_are_accepted_and_memory_can_be_released() {
        // In a test binary other threads already run: mallopt still takes the values (the
        // arena limit applies to arenas created from now on).
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        assert!(apply(), "glibc refused a setting");
        let big = vec![1u8; 64 << 20];
        assert_eq!(big.iter().map(|&b| u64::from(b)).sum::<u64>(), 64 << 20);
        drop(big);
        release_free_memory();
    }
}
