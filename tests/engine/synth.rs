//! Small generated datasets and models for engine tests.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vitforge::model::LoadedModel;
use vitforge::dataset::Split;
use vitforge::train::data::TrainData;

pub use crate::support::tiny_config;

/// A random tiny model with these labels.
pub fn tiny_model(labels: &[&str], seed: u64) -> LoadedModel {
    let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
    LoadedModel::random(&tiny_config(), &labels, seed, &candle_core::Device::Cpu).unwrap()
}

/// A stripes image: horizontal (`vertical = false`) or vertical bars of random period, phase and
/// colours, at a random size.
pub fn stripes(vertical: bool, rng: &mut ChaCha8Rng) -> RgbImage {
    let (w, h) = (rng.random_range(40..80), rng.random_range(40..80));
    let period = rng.random_range(8..17);
    let phase = rng.random_range(0..period);
    let a = Rgb([rng.random_range(0..100), rng.random_range(0..100), rng.random_range(0..100)]);
    let b = Rgb([rng.random_range(150..255), rng.random_range(150..255), rng.random_range(150..255)]);
    RgbImage::from_fn(w, h, |x, y| {
        let t = if vertical { x } else { y };
        if ((t + phase) / (period / 2).max(1)) % 2 == 0 { a } else { b }
    })
}

/// Writes a two-class stripes dataset (`horizontal/`, `vertical/`) with `n` images per class
/// under `root` and returns its records.
pub fn stripes_dataset(root: &Path, n: usize, seed: u64) -> Vec<(PathBuf, String, Split)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut records = vec![];
    for (class, vertical) in [("horizontal", false), ("vertical", true)] {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..n {
            let path = dir.join(format!("{i}.png"));
            stripes(vertical, &mut rng).save(&path).unwrap();
            records.push((path, class.to_string(), Split::Train));
        }
    }
    records
}

/// The stripes dataset as training data.
pub fn stripes_data(root: &Path, n: usize, seed: u64) -> TrainData {
    TrainData::from_records(stripes_dataset(root, n, seed))
}
