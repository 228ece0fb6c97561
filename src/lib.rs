//! vitforge: fine-tune pre-trained Vision Transformers on small labelled image sets and serve them
//! over HTTP. The binary in `main.rs` is a thin shell around the modules below.

pub mod blob_gc;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod db;
pub mod error;
pub mod http;
pub mod imaging;
pub mod jobs;
pub mod model;
pub mod paths;
pub mod predictor;
pub mod startup;
pub mod telemetry;
pub mod train;
pub mod worker;
