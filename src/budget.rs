//! One budget of bytes for everything in flight: request bodies being received or held, entries
//! of uploads being read, images being decoded. Whoever is about to hold such bytes reserves
//! them first and releases them by dropping the [`Reservation`]; when the budget is spent, a
//! caller waits a little or is refused (the HTTP layer answers 429 with `Retry-After`), so
//! concurrent requests cannot add up to an out-of-memory kill.
//!
//! Synchronous (a mutex and a condition variable), so the bottom layers can use it; async
//! callers poll [`MemoryBudget::try_reserve`] (see `http::inflight`).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a request's work waits for room in the budget before it is refused.
pub const WAIT: Duration = Duration::from_secs(1);

/// A number of bytes that may be in flight at once.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

/// Bytes reserved from a budget, given back when dropped.
#[derive(Debug)]
#[must_use = "the bytes are given back as soon as the reservation is dropped"]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self { limit, used: Mutex::new(0), freed: Condvar::new() })
    }

    /// A budget that never refuses (for callers without one: the command line, tests).
    pub fn unlimited() -> Arc<Self> {
        Self::new(u64::MAX)
    }

    /// The budget's size.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> u64 {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        // The count stays consistent even if a holder panicked (updates are single statements).
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `bytes` now, if they fit; never, if they exceed the whole budget.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        let mut used = self.lock();
        if bytes > self.limit.saturating_sub(*used) {
            return None;
        }
        *used += bytes;
        Some(Reservation { budget: self.clone(), bytes })
    }

    /// `bytes`, waiting up to `wait` for others to give theirs back (blocks the thread: for
    /// blocking work only, never on the async runtime or a rayon worker).
    pub fn reserve_blocking(self: &Arc<Self>, bytes: u64, wait: Duration) -> Option<Reservation> {
        if bytes > self.limit {
            return None;
        }
        let deadline = Instant::now() + wait;
        let mut used = self.lock();
        loop {
            if bytes <= self.limit - *used {
                *used += bytes;
                return Some(Reservation { budget: self.clone(), bytes });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            used = self.freed.wait_timeout(used, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

impl Reservation {
    /// The bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Takes over another reservation of the same budget (one guard for both).
    pub fn absorb(&mut self, other: Reservation) {
        debug_assert!(Arc::ptr_eq(&self.budget, &other.budget));
        self.bytes += other.bytes;
        std::mem::forget(other);
    }

    /// Holds `more` bytes too, if they fit now.
    pub fn try_grow(&mut self, more: u64) -> bool {
        match self.budget.try_reserve(more) {
            Some(extra) => {
                self.bytes += extra.bytes;
                std::mem::forget(extra);
                true
            }
            None => false,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut used = self.budget.lock();
        *used = used.saturating_sub(self.bytes);
        drop(used);
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_fit_the_limit_and_come_back_when_dropped() {
        let budget = MemoryBudget::new(100);
        let a = budget.try_reserve(60).unwrap();
        assert!(budget.try_reserve(41).is_none());
        let mut b = budget.try_reserve(40).unwrap();
        assert_eq!(budget.in_use(), 100);
        assert!(!b.try_grow(1));
        drop(a);
        assert!(b.try_grow(10));
        assert_eq!((b.bytes(), budget.in_use()), (50, 50));
        drop(b);
        assert_eq!(budget.in_use(), 0);
        assert!(budget.try_reserve(101).is_none(), "more than the whole budget never fits");
    }

    #[test]
    fn a_blocked_reservation_proceeds_when_bytes_come_back_and_gives_up_at_its_deadline() {
        let budget = MemoryBudget::new(10);
        let held = budget.try_reserve(10).unwrap();
        assert!(budget.reserve_blocking(5, Duration::from_millis(30)).is_none());
        let waiter = {
            let budget = budget.clone();
            std::thread::spawn(move || budget.reserve_blocking(5, Duration::from_secs(10)).map(|r| r.bytes()))
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(held);
        assert_eq!(waiter.join().unwrap(), Some(5));
        assert!(budget.reserve_blocking(11, Duration::from_secs(10)).is_none(), "refused at once");
    }
}
