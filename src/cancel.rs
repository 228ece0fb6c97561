//! Cancellation of blocking work started by an async caller. Blocking closures cannot be aborted,
//! so they check a flag between units of work (images, entries, batches); the caller holds a
//! [`CancelOnDrop`], and its future being dropped (the client went away, or the request timed
//! out) sets the flag.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Sets its flag when dropped.
pub struct CancelOnDrop(Arc<AtomicBool>);

impl CancelOnDrop {
    /// A new flag, unset, and the guard that sets it.
    pub fn new() -> (Self, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        (Self(flag.clone()), flag)
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
