//! The C allocator's settings for this workload (glibc, the allocator of our Linux builds and
//! containers; elsewhere the settings do nothing), and the process's allocator: the C
//! allocator's, with large blocks on a cache line ([`CacheLineAligned`]).
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

/// The process's allocator: the C allocator (Rust's `System`), with every block of
/// [`ALIGNED_FROM`] bytes or more on a cache-line boundary on CPUs with AMX ([`aligns`]).
///
/// glibc hands out blocks on 16-byte boundaries, so three matrices in four began mid-line, and
/// so did every one of their rows (rows are whole multiples of 64 bytes in a ViT). AMX loads and
/// stores tiles of C row by row, 64 bytes each: a row across two lines made `tileloadd` some
/// five times slower (2.5 ns aligned, 17 ns not, on a 2.6 GHz Xeon) and the bf16 products of a
/// ViT 14–18% slower in all (bench/RESULTS.md, "Intel Xeon with AMX-BF16 (a development VM),
/// 2026-12-07").
/// Small blocks keep the C allocator's alignment, which costs nothing. Only on CPUs with AMX:
/// the same alignment did nothing for the f32 kernels there (AVX-512 loads across two lines cost
/// less), and it costs memory: peak RSS of f32 ViT-B inference (`bench --iters 2 --warmup 1`)
/// 461 MiB before, 603 MiB with `System`'s `realloc` (which moves every aligned block it grows),
/// 515 MiB with C's `realloc` growing blocks in place (below). Most of the rest is zeroing:
/// `calloc` skips fresh pages, an aligned block is cleared by `memset` (506 MiB with zeroed
/// blocks left unaligned, which would give up most of the gain).
pub struct CacheLineAligned;

/// Blocks from this size up start on a cache line.
pub const ALIGNED_FROM: usize = 4096;

/// Whether large blocks are aligned: on CPUs with AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits
/// 24 and 22), asked once, by an instruction (no allocation, and the same answer for every block
/// the process allocates, grows or frees).
pub fn aligns() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    static AMX: AtomicU8 = AtomicU8::new(0);
    match AMX.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let amx = crate::model::isa::cpu_has_amx();
            AMX.store(if amx { 2 } else { 1 }, Ordering::Relaxed);
            amx
        }
    }
}

/// `layout` as the C allocator is asked for it: large blocks aligned to 64 bytes where
/// [`aligns`].
fn widened(layout: std::alloc::Layout) -> std::alloc::Layout {
    if layout.size() >= ALIGNED_FROM && layout.align() < 64 && aligns() {
        layout.align_to(64).expect("64 is a power of two, and the size stays under isize::MAX")
    } else {
        layout
    }
}

// SAFETY: every method passes the C allocator the layout `widened` gives for the block's
// current size and alignment, the same whenever that block is allocated, grown or freed.
unsafe impl std::alloc::GlobalAlloc for CacheLineAligned {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract (a non-zero size), which `widened` keeps.
        unsafe { std::alloc::System.alloc(widened(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe { std::alloc::System.alloc_zeroed(widened(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator with `layout`, so from `System` with `widened`.
        unsafe { std::alloc::System.dealloc(ptr, widened(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let old = widened(layout);
        // SAFETY: the caller's contract: `new_size` rounded up to `layout.align()` fits isize.
        let new = widened(unsafe { std::alloc::Layout::from_size_align_unchecked(new_size, layout.align()) });
        #[cfg(unix)]
        if new.align() != layout.align() && old.align() == new.align() {
            // An aligned block growing or shrinking: C's `realloc` keeps it where it is when it
            // can (`System` would always move it, for its alignment: peak memory of ViT-B
            // inference 526 MiB this way against 603), and where it moved it off a cache line,
            // it moves once more, to an aligned block.
            // SAFETY: `ptr` came from `posix_memalign` (`System` for an alignment over 16), which
            // C's `realloc` takes, as `System.dealloc`'s `free` takes a block from `realloc`;
            // `new_size` is non-zero; the copy reads the bytes both blocks hold.
            unsafe {
                let grown = libc::realloc(ptr.cast(), new_size).cast::<u8>();
                if grown.is_null() || (grown as usize).is_multiple_of(64) {
                    return grown;
                }
                let moved = std::alloc::System.alloc(new);
                if moved.is_null() {
                    // Out of memory for the second move: the block as C moved it (on the
                    // caller's alignment, and freed by `free` as any block here).
                    return grown;
                }
                std::ptr::copy_nonoverlapping(grown, moved, layout.size().min(new_size));
                libc::free(grown.cast());
                return moved;
            }
        }
        if old.align() == new.align() {
            // SAFETY: as `dealloc`, and the new block keeps the old one's alignment.
            return unsafe { std::alloc::System.realloc(ptr, old, new_size) };
        }
        // Across the threshold: a new block at the new alignment, the bytes both hold copied.
        // SAFETY: `new` has a non-zero size; `ptr` holds `layout.size()` bytes, as `dealloc`.
        unsafe {
            let moved = std::alloc::System.alloc(new);
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                std::alloc::System.dealloc(ptr, old);
            }
            moved
        }
    }
}

#[global_allocator]
static ALLOCATOR: CacheLineAligned = CacheLineAligned;

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

    /// Large blocks start on a cache line however they came (allocated, zeroed, grown, or grown
    /// past the threshold from a small one), and keep their bytes when they move.
    /// (On a CPU without AMX, where blocks keep glibc's alignment, only the contents are
    /// checked.)
    #[test]
    fn large_blocks_start_on_a_cache_line() {
        if !aligns() {
            eprintln!("no AMX here: large blocks keep the C allocator's alignment");
        }
        let on_line = |p: *const f32| !aligns() || (p as usize).is_multiple_of(64);
        // Sizes around the threshold and a ViT's (rows of 384 and 768 floats).
        for floats in [1024, 1025, 1031, 4 * 384, 197 * 384, 1576 * 768, 3 << 18] {
            let mut held = Vec::new();
            for _ in 0..8 {
                let plain: Vec<f32> = Vec::with_capacity(floats);
                let zeroed = vec![0f32; floats];
                assert!(on_line(plain.as_ptr()) && on_line(zeroed.as_ptr()), "{floats} floats");
                held.push((plain, zeroed, vec![0u8; 8]));
            }
        }
        // A block grown from under the threshold to over it, and back, keeps its contents.
        let mut v: Vec<f32> = (0..100).map(|i| i as f32).collect();
        for n in 100..5000 {
            v.push(n as f32);
            if v.capacity() * 4 >= ALIGNED_FROM {
                assert!(on_line(v.as_ptr()), "grown to {n}");
            }
        }
        v.truncate(10);
        v.shrink_to_fit();
        assert_eq!(v, (0..10).map(|i| i as f32).collect::<Vec<_>>());
        v.extend((10..3000).map(|i| i as f32));
        assert!(on_line(v.as_ptr()));
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32));
        // Large blocks grown with another block allocated after each (so C's `realloc` must
        // move most of them, to wherever it finds room) still start on a cache line.
        let mut kept = Vec::new();
        for i in 0..16 {
            let mut v = vec![i as f32; 2000 + 16 * i];
            let after = vec![0f32; 1100 + i];
            v.reserve_exact(20_000);
            assert!(on_line(v.as_ptr()), "block {i}, grown");
            assert!(v.iter().all(|&x| x == i as f32));
            kept.push((v, after));
        }
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
