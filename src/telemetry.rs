//! Logging setup (`RUST_LOG` filters, default `info`) and the service's Prometheus metrics.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global tracing subscriber; later calls are ignored, so tests may call it freely.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only where a terminal shows them, not in a log file or a collector's pipe.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Logging for tests: output goes through the test harness's capture, so passing tests stay quiet.
pub fn init_for_tests() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Labels of per-route HTTP metrics (`route` is the path template, e.g. `/jobs/{id}`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

/// Labels of latency histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOnly {
    pub method: String,
    pub route: String,
}

/// A label set with one `status` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

/// A label set with one `job` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabel {
    pub job: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The service's Prometheus metrics, in a registry of its own (so test apps do not share one).
pub struct ServiceMetrics {
    pub registry: Registry,
    pub http_requests: Family<RouteLabels, Counter>,
    pub http_latency: Family<RouteOnly, Histogram, fn() -> Histogram>,
    pub predict_batch_size: Histogram,
    pub predict_images: Counter,
    pub predict_queue_depth: Gauge,
    /// Bytes reserved from the memory budget for work in flight, and the budget.
    pub inflight_bytes: Gauge,
    pub inflight_budget_bytes: Gauge,
    pub jobs: Family<StatusLabel, Gauge>,
    pub training_images_per_second: Family<JobLabel, Gauge<f64, AtomicU64>>,
}

impl ServiceMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vitforge");
        let http_requests = Family::<RouteLabels, Counter>::default();
        let http_latency = Family::<RouteOnly, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let predict_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        let predict_images = Counter::default();
        let predict_queue_depth = Gauge::default();
        let inflight_bytes = Gauge::default();
        let inflight_budget_bytes = Gauge::default();
        let jobs = Family::<StatusLabel, Gauge>::default();
        let training_images_per_second = Family::<JobLabel, Gauge<f64, AtomicU64>>::default();
        registry.register("http_requests", "HTTP requests by method, route and status", http_requests.clone());
        registry.register("http_request_duration_seconds", "HTTP request latency by route", http_latency.clone());
        registry.register("predict_batch_size", "Images per inference batch", predict_batch_size.clone());
        registry.register("predict_images", "Images classified", predict_images.clone());
        registry.register("predict_queue_depth", "Images waiting for the model thread", predict_queue_depth.clone());
        registry.register("inflight_bytes", "Bytes of request bodies, upload entries and image decodes held now", inflight_bytes.clone());
        registry.register("inflight_budget_bytes", "The memory budget for work in flight (--max-inflight-bytes)", inflight_budget_bytes.clone());
        registry.register("jobs", "Fine-tune jobs by status", jobs.clone());
        registry.register(
            "training_images_per_second",
            "Training throughput of each running job",
            training_images_per_second.clone(),
        );
        Self {
            registry,
            http_requests,
            http_latency,
            predict_batch_size,
            predict_images,
            predict_queue_depth,
            inflight_bytes,
            inflight_budget_bytes,
            jobs,
            training_images_per_second,
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            tracing::error!("encoding metrics failed");
        }
        out
    }
}

impl Default for ServiceMetrics {
    fn default() -> Self {
        Self::new()
    }
}
