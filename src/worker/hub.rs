//! In-process coordination around the `jobs` table: waking workers on submit, cancellation flags
//! of running jobs, live events for `/jobs/{id}/events`, a count of jobs that ended (so callers
//! can wait for the queue to drain without polling), and the shutdown signal.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::db::jobs::Job;

/// A live event of one job, as Server-Sent Events carry it.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// `{"epoch", "epochs", "step", "steps", "loss", "learning_rate", "images_per_s"}`.
    Progress(Value),
    /// An epoch's validation block, with `"epoch"`.
    Metrics(Value),
    /// The job reached a final state; the stream ends after this.
    Status(Box<Job>),
}

/// Shared by the HTTP handlers and the workers.
pub struct JobHub {
    submitted: Notify,
    /// Bumped whenever a job reaches a final state.
    ended: watch::Sender<u64>,
    cancel_flags: Mutex<HashMap<String, Arc<AtomicBool>>>,
    channels: Channels,
    throughput: Mutex<HashMap<String, f64>>,
    shutdown: CancellationToken,
}

/// Each watched job's channel of live events, by job id.
type Channels = Arc<Mutex<HashMap<String, broadcast::Sender<JobEvent>>>>;

/// A subscription to one job's live events. When the last one of a job is dropped the job's
/// channel goes too, so streams of unknown or finished jobs leave nothing behind.
pub struct Subscription {
    rx: Option<broadcast::Receiver<JobEvent>>,
    channels: Channels,
    job_id: String,
}

impl Subscription {
    /// The next event, as [`broadcast::Receiver::recv`].
    pub async fn recv(&mut self) -> Result<JobEvent, broadcast::error::RecvError> {
        match self.rx.as_mut() {
            Some(rx) => rx.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut channels = lock(&self.channels);
        // A subscriber that came meanwhile keeps the channel.
        if channels.get(&self.job_id).is_some_and(|tx| tx.receiver_count() == 0) {
            channels.remove(&self.job_id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps stay consistent even if a holder panicked (every update is a single insert/remove).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for JobHub {
    fn default() -> Self {
        Self {
            submitted: Notify::new(),
            ended: watch::channel(0).0,
            cancel_flags: Mutex::default(),
            channels: Channels::default(),
            throughput: Mutex::default(),
            shutdown: CancellationToken::new(),
        }
    }
}

impl JobHub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Changes whenever a job reaches a final state: wait on it (after subscribing, look at the
    /// queue) to drain the queue without polling.
    pub fn ended(&self) -> watch::Receiver<u64> {
        self.ended.subscribe()
    }

    /// Wakes idle workers after a job was queued.
    pub fn job_submitted(&self) {
        self.submitted.notify_waiters();
    }

    /// Completes on the next [`JobHub::job_submitted`].
    pub fn submitted(&self) -> tokio::sync::futures::Notified<'_> {
        self.submitted.notified()
    }

    /// Registers a running job's cancellation flag.
    pub fn start(&self, job_id: &str, cancel_requested: bool) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(cancel_requested || self.shutdown.is_cancelled()));
        lock(&self.cancel_flags).insert(job_id.to_string(), flag.clone());
        flag
    }

    /// Whether this process runs the job (between [`JobHub::start`] and [`JobHub::stop`]).
    pub fn runs(&self, job_id: &str) -> bool {
        lock(&self.cancel_flags).contains_key(job_id)
    }

    /// The jobs this process runs.
    pub fn running(&self) -> Vec<String> {
        lock(&self.cancel_flags).keys().cloned().collect()
    }

    /// Forgets a job that stopped running.
    pub fn stop(&self, job_id: &str) {
        lock(&self.cancel_flags).remove(job_id);
        lock(&self.throughput).remove(job_id);
    }

    /// Asks a running job to stop at its next batch.
    pub fn cancel(&self, job_id: &str) {
        if let Some(flag) = lock(&self.cancel_flags).get(job_id) {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// Subscribes to a job's live events (of any id: the caller looks the job up after, so
    /// that nothing published between the two is lost).
    pub fn subscribe(&self, job_id: &str) -> Subscription {
        let rx = lock(&self.channels).entry(job_id.to_string()).or_insert_with(|| broadcast::channel(256).0).subscribe();
        Subscription { rx: Some(rx), channels: self.channels.clone(), job_id: job_id.to_string() }
    }

    /// Sends a live event to the job's subscribers (if any); a final status closes the channel.
    pub fn publish(&self, job_id: &str, event: JobEvent) {
        let mut channels = lock(&self.channels);
        let last = matches!(event, JobEvent::Status(_));
        if let Some(tx) = channels.get(job_id) {
            let _ = tx.send(event);
        }
        if last {
            channels.remove(job_id);
            drop(channels);
            self.ended.send_modify(|n| *n += 1);
        }
    }

    /// Records the training throughput of a running job (for `/metrics`).
    pub fn set_throughput(&self, job_id: &str, images_per_s: f64) {
        lock(&self.throughput).insert(job_id.to_string(), images_per_s);
    }

    /// Training images per second of each running job.
    pub fn throughput(&self) -> Vec<(String, f64)> {
        lock(&self.throughput).iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Starts shutting down: running jobs stop at their next batch and go back to the queue.
    pub fn shut_down(&self) {
        self.shutdown.cancel();
        for flag in lock(&self.cancel_flags).values() {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// The shutdown signal.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn channels_go_with_their_last_subscriber() {
        let hub = JobHub::new();
        // A stream of an unknown id subscribes, finds nothing and ends: nothing stays.
        drop(hub.subscribe("no-such-job"));
        assert!(lock(&hub.channels).is_empty());

        let (mut first, second) = (hub.subscribe("job"), hub.subscribe("job"));
        drop(second);
        hub.publish("job", JobEvent::Progress(serde_json::json!({"step": 1})));
        assert!(matches!(first.recv().await, Ok(JobEvent::Progress(_))), "the remaining subscriber still hears the job");
        drop(first);
        assert!(lock(&hub.channels).is_empty());
        // Events of a job nobody watches go nowhere and create nothing.
        hub.publish("job", JobEvent::Progress(serde_json::json!({"step": 2})));
        assert!(lock(&hub.channels).is_empty());
    }
}
