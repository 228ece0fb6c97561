//! How long one image takes to become a model's input, as `/predict` prepares it: decoding
//! (`imaging::decode_rgb`) and then resizing and normalising (`PreprocessorConfig::pixel_values`,
//! `ViTImageProcessor`'s defaults at 224×224 with the bilinear filter).
//!
//! `cargo run --release --example prepare_time -- [--rounds N] IMAGE...` prints, for each image,
//! its size and the fastest and median of N rounds (default 10) of each step, in milliseconds.
//! `bench/mosaic.py` writes a phone-sized photo (12 megapixels) out of the shared photos, where
//! these steps weigh most.

use std::time::{Duration, Instant};

use vitforge::model::preprocess::PreprocessorConfig;

fn main() -> anyhow::Result<()> {
    // The allocator's settings of the service (`src/main.rs`): a large image's buffers are then
    // reused from one round to the next, as from one request to the next, instead of mapped and
    // faulted in again each time.
    vitforge::malloc::configure();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut rounds = 10;
    if let Some(i) = args.iter().position(|a| a == "--rounds") {
        rounds = args.get(i + 1).and_then(|n| n.parse().ok()).filter(|&n| n > 0).ok_or_else(|| anyhow::anyhow!("--rounds needs a whole number above 0"))?;
        args.drain(i..i + 2);
    }
    anyhow::ensure!(!args.is_empty(), "usage: prepare_time [--rounds N] IMAGE...");
    let pre = PreprocessorConfig::default_for((224, 224));
    println!("{}", vitforge::imaging::jpeg_decoder_summary());
    for path in &args {
        let bytes = std::fs::read(path)?;
        let (mut decode, mut prepare) = (Vec::new(), Vec::new());
        let mut size = (0, 0);
        for _ in 0..rounds {
            let t = Instant::now();
            let img = vitforge::imaging::decode_rgb(&bytes, u64::MAX).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
            decode.push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(pre.pixel_values(&img)?);
            prepare.push(t.elapsed());
            size = (img.width(), img.height());
        }
        let ms = |d: &mut Vec<Duration>| {
            d.sort();
            (d[0].as_secs_f64() * 1e3, d[d.len() / 2].as_secs_f64() * 1e3)
        };
        let ((d_min, d_med), (p_min, p_med)) = (ms(&mut decode), ms(&mut prepare));
        println!(
            "{path}: {}×{}, decode {d_min:.2} ms (median {d_med:.2}), resize and normalise {p_min:.2} ms (median {p_med:.2}), {rounds} rounds",
            size.0, size.1
        );
    }
    Ok(())
}
