//! Command-line and environment configuration. Every `serve` flag also reads a `VITFORGE_*`
//! environment variable, so a container can be configured without arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// vitforge: fine-tune a pre-trained Vision Transformer on your images and serve it over HTTP.
///
/// With no subcommand, `vitforge` runs `serve`.
#[derive(Debug, Parser)]
#[command(name = "vitforge", version, about, long_about = None, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub serve: ServeConfig,

    /// Log output format.
    #[arg(long, env = "VITFORGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service, its job workers and the predictor (the default).
    Serve(Box<ServeConfig>),
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

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

    /// API keys (comma-separated). When set, every route but /healthz and /readyz needs
    /// `Authorization: Bearer <key>`.
    #[arg(long, env = "VITFORGE_API_KEY", value_delimiter = ',', hide_env_values = true)]
    pub api_key: Vec<String>,
}

impl ServeConfig {
    /// The defaults, as `vitforge serve` with no flags and no environment would use them.
    pub fn default_for(data_dir: impl Into<PathBuf>) -> Self {
        let mut cfg = Cli::parse_from(["vitforge"]).serve;
        cfg.data_dir = data_dir.into();
        cfg
    }
}
