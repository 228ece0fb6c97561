//! The Vision Transformer: configuration, weights, forward pass, preprocessing, and loading and
//! saving in Hugging Face's format. Synchronous code only: no tokio, axum or sqlx here.

pub mod classifier;
pub mod config;
pub mod fast;
pub mod io;
pub mod params;
pub mod preprocess;
pub mod vit;

pub use config::VitConfig;
pub use io::{LoadedModel, ModelSource};
pub use params::Params;
pub use preprocess::PreprocessorConfig;
pub use vit::Vit;

/// Errors of model loading, saving and running.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `config.json` or `preprocessor_config.json` is unusable.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// The weights file does not fit the configuration.
    #[error("invalid weights: {0}")]
    Weights(String),
    /// The model could not be found or fetched.
    #[error("{0}")]
    NotFound(String),
    /// Input that the model cannot take (wrong image size, empty batch, ...).
    #[error("invalid input: {0}")]
    Input(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The compute device, as named on the command line (`cpu`, `cuda:N`).
pub fn device_from_name(name: &str) -> Result<candle_core::Device, ModelError> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        _ => {
            let Some(ordinal) = name.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) else {
                return Err(ModelError::Config(format!("unknown device '{name}' (use cpu or cuda:N)")));
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(ModelError::Config(format!(
                    "device '{name}' needs a binary built with --features cuda and an NVIDIA GPU"
                )));
            }
            Ok(candle_core::Device::new_cuda(ordinal)?)
        }
    }
}
