//! The configuration of `vitforge serve`. Every flag also reads a `VITFORGE_*` environment
//! variable, so a container can be configured without arguments. It is read once, at the top
//! (`startup`), and handed down as plain values: nothing below the HTTP layer sees it, and this
//! module names nothing else of the crate.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, FromArgMatches};

/// Settings of `vitforge serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on. Without an API key, keep the default (loopback only).
    #[arg(long, env = "VITFORGE_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// TCP port to listen on; 0 picks a free port.
    #[arg(long, env = "VITFORGE_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Folder holding the SQLite database, the image blobs, checkpoints and models.
    #[arg(long, env = "VITFORGE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Largest dataset upload accepted, in bytes (the archive as sent).
    #[arg(long, env = "VITFORGE_MAX_UPLOAD_BYTES", default_value_t = 2 * 1024 * 1024 * 1024)]
    pub max_upload_bytes: u64,

    /// Largest total size of the files inside one archive, in bytes (stops zip bombs).
    #[arg(long, env = "VITFORGE_MAX_EXTRACTED_BYTES", default_value_t = 8 * 1024 * 1024 * 1024)]
    pub max_extracted_bytes: u64,

    /// Largest number of files inside one archive.
    #[arg(long, env = "VITFORGE_MAX_ARCHIVE_ENTRIES", default_value_t = 200_000)]
    pub max_archive_entries: u64,

    /// Largest single image file accepted inside an upload, in bytes; larger files are rejected one
    /// by one (it also bounds the memory one upload holds at a time).
    #[arg(long, env = "VITFORGE_MAX_IMAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_image_bytes: u64,

    /// Largest image accepted, in pixels (width × height); larger ones are rejected to stop
    /// decompression bombs.
    #[arg(long, env = "VITFORGE_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,

    /// Folder of local base models, each a sub-folder in Hugging Face format that jobs can name as
    /// `base_model` (default: `<data-dir>/base-models`).
    #[arg(long, env = "VITFORGE_BASE_MODELS_DIR")]
    pub base_models_dir: Option<PathBuf>,

    /// Compute devices for fine-tune workers, one worker each: `auto` (the first CUDA GPU when built
    /// with `--features cuda` and one is present, else the CPU), `cpu`, or `cuda:N`. Repeat the
    /// flag or separate with commas.
    #[arg(long, env = "VITFORGE_DEVICE", value_delimiter = ',', default_value = "auto")]
    pub device: Vec<String>,

    /// Largest number of images `/predict` batches into one forward pass.
    #[arg(long, env = "VITFORGE_MAX_BATCH_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_batch_size: u64,

    /// Longest time, in milliseconds, a `/predict` request waits for others to share its batch.
    #[arg(long, env = "VITFORGE_MAX_BATCH_DELAY_MS", default_value_t = 5)]
    pub max_batch_delay_ms: u64,

    /// `/predict` requests admitted at once; more are answered 429 at once.
    #[arg(long, env = "VITFORGE_MAX_CONCURRENT_REQUESTS", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_concurrent_requests: u64,

    /// Longest expected wait, in milliseconds, for the model that a `/predict` request is queued
    /// for (images waiting × recent cost per image); beyond it the request gets 429 at once
    /// instead of waiting. Capped at half the request timeout. 0: no bound but the timeout's.
    #[arg(long, env = "VITFORGE_MAX_PREDICT_WAIT_MS", default_value_t = 5000)]
    pub max_predict_wait_ms: u64,

    /// Fine-tuned models kept loaded for `/predict` (least recently used are dropped).
    #[arg(long, env = "VITFORGE_MAX_LOADED_MODELS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_loaded_models: u64,

    /// Most images in one `/predict` request.
    #[arg(long, env = "VITFORGE_MAX_IMAGES_PER_PREDICT", default_value_t = 64)]
    pub max_images_per_predict: usize,

    /// Largest `/predict` request body, in bytes.
    #[arg(long, env = "VITFORGE_MAX_PREDICT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_predict_bytes: usize,

    /// Largest JSON request body elsewhere, in bytes.
    #[arg(long, env = "VITFORGE_MAX_JSON_BYTES", default_value_t = 1024 * 1024)]
    pub max_json_bytes: usize,

    /// Longest time, in seconds, a request may take before it is answered 408 (0: no limit).
    /// Dataset uploads are timed per body chunk instead (a stalled sender is cut off, a long
    /// transfer is not), and their ingest and `POST /models/{id}/evaluate` are not timed; event
    /// streams and model downloads are timed only until their first byte.
    #[arg(long, env = "VITFORGE_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,

    /// Bytes that request bodies being received or held, upload entries being read and images
    /// being decoded may take together, across all requests (default: a quarter of the machine's
    /// memory, or of the container's memory limit). A request that would exceed it waits up to
    /// a second, then gets 429 with Retry-After.
    #[arg(long, env = "VITFORGE_MAX_INFLIGHT_BYTES", default_value_t = default_max_inflight_bytes(), value_parser = clap::value_parser!(u64).range(1024 * 1024..))]
    pub max_inflight_bytes: u64,

    /// API keys (comma-separated). When set, every route but /healthz and /readyz needs
    /// `Authorization: Bearer <key>`. Keys are never logged or printed.
    #[arg(long, env = "VITFORGE_API_KEY", value_delimiter = ',', hide_env_values = true)]
    pub api_key: Vec<ApiKey>,
}

/// A quarter of the memory this process may use: the machine's (`MemTotal`), or the cgroup's
/// limit when that is lower (a container); 1 GiB where neither can be read.
pub fn default_max_inflight_bytes() -> u64 {
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
    });
    let cgroup = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok())
        .min();
    match (machine, cgroup) {
        (Some(m), Some(c)) => m.min(c) / 4,
        (Some(m), None) => m / 4,
        (None, Some(c)) => c / 4,
        (None, None) => 1 << 30,
    }
}

/// One API key. Its `Debug` form is redacted, so logging a configuration never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// The key itself, for the one place that digests it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Why a configured API key is refused.
#[derive(Debug, thiserror::Error)]
#[error("an API key must be at least 16 characters long, without spaces or control characters")]
pub struct InvalidApiKey;

/// Shortest API key accepted (as [`InvalidApiKey`] says): a short key is guessable whatever the
/// comparison.
pub const MIN_API_KEY_CHARS: usize = 16;

impl FromStr for ApiKey {
    type Err = InvalidApiKey;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key = s.trim();
        if key.chars().count() < MIN_API_KEY_CHARS || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(InvalidApiKey);
        }
        Ok(Self(key.to_string()))
    }
}

impl ServeConfig {
    /// The base models folder.
    pub fn base_models_dir(&self) -> PathBuf {
        self.base_models_dir.clone().unwrap_or_else(|| self.data_dir.join("base-models"))
    }

    /// The defaults, as `vitforge serve` with no flags and no environment would use them: the
    /// `VITFORGE_*` variables of the calling process are not read (an exported
    /// `VITFORGE_API_KEY` must not change a test's service).
    pub fn default_for(data_dir: impl Into<PathBuf>) -> Self {
        let command = Self::augment_args(clap::Command::new("vitforge")).mut_args(|arg| arg.env(None));
        let matches = command.try_get_matches_from(["vitforge"]).expect("the defaults parse");
        let mut cfg = Self::from_arg_matches(&matches).expect("the defaults parse");
        cfg.data_dir = data_dir.into();
        cfg
    }

    /// The expected-wait bound of `/predict` admission: `--max-predict-wait-ms`, at most half
    /// the request timeout.
    pub fn max_predict_wait(&self) -> Option<std::time::Duration> {
        let own = (self.max_predict_wait_ms > 0).then(|| std::time::Duration::from_millis(self.max_predict_wait_ms));
        let half_timeout = self.request_timeout().map(|t| t / 2);
        match (own, half_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The request timeout, `None` when disabled.
    pub fn request_timeout(&self) -> Option<std::time::Duration> {
        (self.request_timeout_secs > 0).then(|| std::time::Duration::from_secs(self.request_timeout_secs))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeConfig,
    }

    #[test]
    fn api_keys_are_parsed_comma_separated_and_never_shown() {
        let cli = Cli::parse_from(["vitforge", "--api-key", "first-key-0123456789, second-key-0123456789"]);
        let keys: Vec<&str> = cli.serve.api_key.iter().map(ApiKey::expose).collect();
        assert_eq!(keys, ["first-key-0123456789", "second-key-0123456789"]);
        let shown = format!("{:?} {:#?}", cli.serve, cli.serve);
        assert!(!shown.contains("first-key") && !shown.contains("second-key"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn short_or_blank_api_keys_are_refused() {
        for bad in ["", "   ", "short", "has a space in it!!", "tab\tinside-0123456789"] {
            assert!(bad.parse::<ApiKey>().is_err(), "{bad:?}");
        }
        assert!(Cli::try_parse_from(["vitforge", "--api-key", "ok-key-0123456789abc,"]).is_err());
    }

    #[test]
    fn the_defaults_ignore_the_environment() {
        if std::env::var_os("VITFORGE_DEFAULTS_CHILD").is_some() {
            let cfg = ServeConfig::default_for("/tmp/x");
            assert!(cfg.api_key.is_empty(), "VITFORGE_API_KEY leaked into the defaults");
            assert_eq!((cfg.port, cfg.max_json_bytes, cfg.host.as_str()), (8080, 1024 * 1024, "127.0.0.1"));
            return;
        }
        // In a child process of this test binary, so no other test sees the variables.
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "config::tests::the_defaults_ignore_the_environment", "--test-threads", "1"])
            .env("VITFORGE_DEFAULTS_CHILD", "1")
            .env("VITFORGE_API_KEY", "leaked-key-0123456789")
            .env("VITFORGE_PORT", "1")
            .env("VITFORGE_MAX_JSON_BYTES", "7")
            .env("VITFORGE_HOST", "0.0.0.0")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains("1 passed"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    }
}
