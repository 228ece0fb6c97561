//! vitforge: fine-tune pre-trained Vision Transformers on small labelled image sets and serve them
//! over HTTP. The binary in `main.rs` is a thin shell around the modules below; `ARCHITECTURE.md`
//! draws their layers (a module names only modules of its own layer or below).
//!
//! The documentation is written for whoever works on the code, private items included: read it
//! with `cargo doc --no-deps --document-private-items` (which `.ci/run` builds with warnings as
//! errors, so its links stay true), where the links from public items to private ones resolve.
#![allow(rustdoc::private_intra_doc_links)]

pub mod blob_gc;
pub mod budget;
pub mod cancel;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod db;
pub mod http;
pub mod imaging;
pub mod look_backfill;
pub mod malloc;
pub mod model;
pub mod objects;
pub mod paths;
pub mod predictor;
pub mod registry;
pub mod startup;
pub mod telemetry;
pub mod train;
pub mod worker;
