//! vitforge: fine-tune pre-trained Vision Transformers on small labelled image sets and serve them
//! over HTTP. The binary in `main.rs` is a thin shell around the modules below.

pub mod blob_gc;
pub mod config;
pub mod dataset;
pub mod db;
pub mod error;
pub mod http;
pub mod imaging;
pub mod model;
pub mod paths;
pub mod startup;
pub mod telemetry;
pub mod train;
