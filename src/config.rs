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

    /// Database of datasets, jobs and models: `sqlite://<file>` or `postgres://user:password@host/db`
    /// (default: `sqlite://<data-dir>/vitforge.db`). A password in it is never logged.
    #[arg(long, env = "VITFORGE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<DatabaseUrl>,

    /// Where image blobs, checkpoints and models live: the data folder (the default), or an
    /// S3-compatible object store, `s3://bucket/prefix`, configured by the usual `AWS_*` variables
    /// (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ALLOW_HTTP`). With a store the data folder holds only scratch and caches, and
    /// processes on several machines share nothing but the database and the store.
    #[arg(long, env = "VITFORGE_OBJECT_STORE")]
    pub object_store: Option<String>,

    /// What this process does: `all` (the HTTP API and the fine-tune workers, the only process on
    /// its database and data folder), `api` (the HTTP API and `/predict`; runs no job) or `worker`
    /// (claims and runs jobs; answers only `/healthz`, `/readyz` and `/metrics`). Several
    /// processes on one database are `api` and `worker` processes.
    #[arg(long, env = "VITFORGE_ROLE", value_enum, default_value_t = Role::All)]
    pub role: Role,

    /// This process's name in a job's `worker` field (default: `<host name>:<process id>`). A
    /// worker restarted under the same name takes its interrupted jobs back at once instead of
    /// after their lease runs out.
    #[arg(long, env = "VITFORGE_WORKER_NAME", value_parser = parse_worker_name)]
    pub worker_name: Option<String>,

    /// Seconds a worker's claim on a running job holds without renewal (it renews every third of
    /// it). A job whose worker died goes to the next worker this long after the last renewal.
    #[arg(long, env = "VITFORGE_LEASE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub lease_secs: u64,

    /// Seconds between sweeps for blobs no dataset references (left by a crash between an
    /// upload's blob writes and its insert, or by a delete whose collection failed): in `--role
    /// all`, and in processes of several roles on PostgreSQL, whose advisory lock keeps out every
    /// process's uploads. A sweep is skipped while an upload is in flight. The same sweeps, in
    /// every role, remove the folders of jobs that have ended (left by a run that lost its lease)
    /// and model folders no model names (cached copies of models deleted through another process,
    /// registrations that did not finish), here and in the object store, each after an hour
    /// untouched. 0: none (the start-up sweep of `--role all` remains).
    #[arg(long, env = "VITFORGE_SWEEP_SECS", default_value_t = 3600)]
    pub sweep_secs: u64,

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
    /// Requests that arrived while the last batch ran join it without waiting, so at 0 a lone
    /// request runs at once and a busy predictor still runs full batches.
    #[arg(long, env = "VITFORGE_MAX_BATCH_DELAY_MS", default_value_t = 0)]
    pub max_batch_delay_ms: u64,

    /// `/predict` requests admitted at once; more are answered 429 at once.
    #[arg(long, env = "VITFORGE_MAX_CONCURRENT_REQUESTS", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_concurrent_requests: u64,

    /// Longest expected wait, in milliseconds, for the model that a `/predict` request is queued
    /// for (images waiting × recent cost per image); beyond it the request gets 429 at once
    /// instead of waiting. Capped at half the request timeout. 0: no bound but the timeout's.
    #[arg(long, env = "VITFORGE_MAX_PREDICT_WAIT_MS", default_value_t = 5000)]
    pub max_predict_wait_ms: u64,

    /// Precision of `/predict`'s matrix products: `f32`, `bf16` (bf16 operands, f32 accumulation
    /// and statistics) or `auto` (bf16 on a GPU and where the CPU multiplies bf16 natively and faster, else f32).
    #[arg(long, env = "VITFORGE_PRECISION", default_value = "f32", value_parser = ["f32", "bf16", "auto"])]
    pub precision: String,

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

    /// Memory a job's training may take on the CPU (default: the machine's memory, or the
    /// container's memory limit). A job whose training step needs more, by a lower bound from
    /// its model, batch_size, trained layers, precision and optimiser, fails at once with what
    /// it needs and what to change, instead of being killed for lack of memory. 0: no check.
    #[arg(long, env = "VITFORGE_MAX_JOB_MEMORY", default_value_t = default_max_job_memory())]
    pub max_job_memory: u64,

    /// API keys (comma-separated; each at least 16 visible ASCII characters). When set, every
    /// route but /healthz, /readyz, the console's static files and the API docs needs
    /// `Authorization: Bearer <key>`. Keys are never logged or printed.
    #[arg(long, env = "VITFORGE_API_KEY", value_delimiter = ',', hide_env_values = true)]
    pub api_key: Vec<ApiKey>,
}

/// What one `vitforge serve` process does (`--role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The HTTP API and the fine-tune workers in one process.
    All,
    /// The HTTP API and `/predict`; runs no job.
    Api,
    /// Claims and runs jobs; answers only `/healthz`, `/readyz` and `/metrics`.
    Worker,
}

impl Role {
    /// Whether this process runs fine-tune workers.
    pub fn runs_jobs(self) -> bool {
        matches!(self, Role::All | Role::Worker)
    }

    /// Whether this process serves the HTTP API (beyond the probes and metrics).
    pub fn serves_api(self) -> bool {
        matches!(self, Role::All | Role::Api)
    }
}

fn parse_worker_name(s: &str) -> Result<String, String> {
    let name = s.trim();
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err("a worker name is 1 to 200 characters, without control characters".into());
    }
    Ok(name.to_string())
}

/// A database URL (`--database-url`). Its `Debug` form hides a password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL itself, for the one place that connects with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`, for logs and errors.
    pub fn redacted(&self) -> String {
        // scheme://user:password@host/… : the password is between the first ':' after "://" and
        // the last '@' of the authority.
        let Some(start) = self.0.find("://").map(|i| i + 3) else { return self.0.clone() };
        let authority_end = self.0[start..].find('/').map_or(self.0.len(), |i| start + i);
        let authority = &self.0[start..authority_end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                format!("{}{}:***{}", &self.0[..start], &authority[..colon], &self.0[start + at..])
            }
            _ => self.0.clone(),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted())
    }
}

impl FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let url = s.trim();
        let scheme = url.split("://").next().unwrap_or_default();
        if !url.contains("://") || !matches!(scheme, "sqlite" | "postgres" | "postgresql") {
            return Err("a database URL starts with sqlite:// or postgres://".into());
        }
        Ok(Self(url.to_string()))
    }
}

/// A quarter of the [`process_memory`]; 1 GiB where it cannot be read.
pub fn default_max_inflight_bytes() -> u64 {
    process_memory().map_or(1 << 30, |m| m / 4)
}

/// All the [`process_memory`]; 0 (no check) where it cannot be read.
pub fn default_max_job_memory() -> u64 {
    process_memory().unwrap_or(0)
}

/// The memory this process may use: the machine's (`MemTotal`), or the cgroup's limit when that
/// is lower (a container); `None` where neither can be read.
pub fn process_memory() -> Option<u64> {
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
    });
    let cgroup = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok())
        .min();
    match (machine, cgroup) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
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
#[error("an API key must be at least 16 characters long, of visible ASCII characters only (no spaces; an HTTP header cannot carry others)")]
pub struct InvalidApiKey;

/// Shortest API key accepted (as [`InvalidApiKey`] says): a short key is guessable whatever the
/// comparison.
pub const MIN_API_KEY_CHARS: usize = 16;

impl FromStr for ApiKey {
    type Err = InvalidApiKey;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key = s.trim();
        // An Authorization header carries visible ASCII only: any other key could never be sent.
        if key.len() < MIN_API_KEY_CHARS || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidApiKey);
        }
        Ok(Self(key.to_string()))
    }
}

impl ServeConfig {
    /// This process's worker name: `--worker-name`, else `<host name>:<process id>`.
    pub fn worker_name(&self) -> String {
        self.worker_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
            let host = if host.is_empty() { "localhost".to_string() } else { host };
            format!("{host}:{}", std::process::id())
        })
    }

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
    fn database_urls_are_checked_and_their_passwords_never_shown() {
        let cli = Cli::parse_from(["vitforge", "--database-url", "postgres://vf:s3cret@db.internal:5432/vitforge"]);
        let url = cli.serve.database_url.clone().unwrap();
        assert_eq!(url.expose(), "postgres://vf:s3cret@db.internal:5432/vitforge");
        assert_eq!(url.redacted(), "postgres://vf:***@db.internal:5432/vitforge");
        let shown = format!("{:?}", cli.serve);
        assert!(!shown.contains("s3cret") && shown.contains("vf:***@db.internal"), "{shown}");
        for bad in ["mysql://x/y", "vitforge.db", "", "postgres:/x"] {
            assert!(Cli::try_parse_from(["vitforge", "--database-url", bad]).is_err(), "{bad:?}");
        }
        assert_eq!(DatabaseUrl("postgres://db/x".into()).redacted(), "postgres://db/x");
    }

    #[test]
    fn roles_and_worker_names_parse() {
        let cli = Cli::parse_from(["vitforge", "--role", "worker", "--worker-name", " gpu-1 ", "--lease-secs", "10"]);
        assert_eq!((cli.serve.role, cli.serve.worker_name(), cli.serve.lease_secs), (Role::Worker, "gpu-1".to_string(), 10));
        assert!(cli.serve.role.runs_jobs() && !cli.serve.role.serves_api());
        assert!(Role::Api.serves_api() && !Role::Api.runs_jobs() && Role::All.runs_jobs() && Role::All.serves_api());
        let default = Cli::parse_from(["vitforge"]).serve;
        assert_eq!(default.role, Role::All);
        assert!(default.worker_name().ends_with(&format!(":{}", std::process::id())), "{}", default.worker_name());
        for bad in [&["--role", "boss"][..], &["--worker-name", ""], &["--worker-name", "a\nb"], &["--lease-secs", "1"]] {
            let args: Vec<&str> = std::iter::once("vitforge").chain(bad.iter().copied()).collect();
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn short_or_blank_api_keys_are_refused() {
        for bad in ["", "   ", "short", "has a space in it!!", "tab\tinside-0123456789", "ключ-секретный-ключ-123"] {
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
