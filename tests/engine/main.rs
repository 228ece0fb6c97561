//! Engine tests: loading, saving, gradients and fine-tuning, without HTTP.

mod gradients;
mod loading;
mod synth;
mod training;
