//! The Vision Transformer: configuration, weights, forward and backward passes, preprocessing,
//! and loading and saving in Hugging Face's format. Synchronous code only: no tokio, axum or sqlx
//! here.
//!
//! `vit` is the reference model (composed candle ops, differentiable anywhere), `fast` the
//! hand-written CPU path, and `network` the one place that picks between them.

pub mod classifier;
pub mod config;
mod fast;
mod fused;
pub mod io;
pub mod network;
pub mod precision;
pub mod preprocess;
pub mod vit;
pub mod weights;

pub use config::VitConfig;
pub use fast::{bf16_products, cpu_path, dpbf16_from_env, f32_products, isa, kernels_summary, mkl_from_env, native_bf16, stages};
pub(crate) use fast::on_pool;
pub use io::{LoadedModel, ModelSource};
pub use precision::{Precision, PrecisionChoice};
pub use preprocess::PreprocessorConfig;
pub use vit::Vit;
pub use weights::{Boundary, Params, TrainableSet};

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
    /// A file could not be read or written; transparent, so an error chain (anyhow's `Caused
    /// by`) does not print the same text twice. Callers add the path as context.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A device name that is not `auto`, `cpu` or `cuda:N`, or one this build or machine lacks.
    #[error("{0}")]
    Device(String),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// The caller stopped the download of a hub model's weights (a cancelled job, a signal).
    #[error("the download was stopped")]
    Stopped,
}

/// Resolves device names as the command line and `--device` take them (`auto`, `cpu`, `cuda:N`)
/// to distinct devices, in order: `auto` is the first CUDA GPU where the binary is built with
/// CUDA and one is present, else the CPU.
pub fn resolve_devices(names: &[String]) -> Result<Vec<(String, candle_core::Device)>, ModelError> {
    let mut out: Vec<(String, candle_core::Device)> = Vec::new();
    for name in names {
        let name = if name == "auto" {
            if candle_core::utils::cuda_is_available() { "cuda:0".to_string() } else { "cpu".to_string() }
        } else {
            name.clone()
        };
        if out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let device = device_from_name(&name)?;
        out.push((name, device));
    }
    Ok(out)
}

/// One device by name (`auto`, `cpu`, `cuda:N`), as [`resolve_devices`] resolves it.
pub fn device(name: &str) -> Result<candle_core::Device, ModelError> {
    Ok(resolve_devices(&[name.to_string()])?.into_iter().next().map_or(candle_core::Device::Cpu, |(_, d)| d))
}

/// The compute device, as named on the command line (`cpu`, `cuda:N`).
pub fn device_from_name(name: &str) -> Result<candle_core::Device, ModelError> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        _ => {
            let Some(ordinal) = name.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) else {
                return Err(ModelError::Device(format!("unknown device '{name}': --device takes auto, cpu or cuda:N (N the GPU's index, from 0)")));
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(ModelError::Device(format!(
                    "device '{name}' needs a binary built with --features cuda and an NVIDIA GPU"
                )));
            }
            Ok(candle_core::Device::new_cuda(ordinal)?)
        }
    }
}
