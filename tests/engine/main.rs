//! Engine tests: loading, saving, gradients and fine-tuning, without HTTP.

mod golden;
mod gradients;
mod loading;
mod synth;
#[path = "../support/mod.rs"]
mod support;
mod training;
