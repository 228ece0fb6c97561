//! Inference with and without the weights packed once (`Vit::packed_for_inference`), alternated
//! in one process so the two see the same machine: a random-weight ViT, `rounds` forward passes
//! of each, the first discarded. Prints the best and mean time of each and their ratios.
//!
//! `cargo run --release --example packed_weights -- CONFIG BATCH PRECISION ROUNDS`, e.g.
//! `cargo run --release --example packed_weights -- small 1 bf16 61`.
//!
//! Only bf16 packs now, so in f32 both runs take the same path (packed weights: 0 MiB); the f32
//! figures in bench/RESULTS.md were taken on commit 0d74e97, which packed in both precisions.

use std::time::Instant;

use candle_core::{Device, Tensor};
use vitforge::model::{LoadedModel, Precision, Vit, VitConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, batch, precision, rounds] = &args[..] else {
        anyhow::bail!("usage: packed_weights CONFIG BATCH PRECISION ROUNDS (e.g. small 1 bf16 61)");
    };
    let Some(cfg) = VitConfig::preset(config) else { anyhow::bail!("CONFIG must be tiny, small or base") };
    let batch: usize = batch.parse()?;
    let rounds: usize = rounds.parse::<usize>()?.max(2);
    let precision = match precision.as_str() {
        "bf16" => Precision::Bf16,
        "f32" => Precision::F32,
        _ => anyhow::bail!("PRECISION must be f32 or bf16"),
    };
    let labels = vec!["a".to_string(), "b".to_string()];
    let model = LoadedModel::random(&cfg, &labels, 0, &Device::Cpu)?;
    let (h, w) = model.cfg.image_size;
    let pixels = Tensor::randn(0f32, 1.0, (batch, model.cfg.num_channels, h, w), &Device::Cpu)?;
    let plain = Vit::frozen(&model.cfg, &model.params)?.with_precision(precision);
    let packed = plain.clone().packed_for_inference()?;
    println!("{}; path {}; packed weights: {} MiB", vitforge::model::isa::summary(), vitforge::model::cpu_path(), packed.packed_bytes() >> 20);
    let (mut best, mut sum) = ([f64::MAX; 2], [0f64; 2]);
    for round in 0..rounds {
        for (i, vit) in [&plain, &packed].into_iter().enumerate() {
            let t = Instant::now();
            vit.forward(&pixels)?;
            let s = t.elapsed().as_secs_f64();
            if round > 0 {
                best[i] = best[i].min(s);
                sum[i] += s;
            }
        }
    }
    let n = (rounds - 1) as f64;
    println!(
        "{config} batch {batch} {}: plain best {:.1} ms, mean {:.1} ms; packed best {:.1} ms, mean {:.1} ms; plain/packed: best {:.3}, mean {:.3}",
        precision.name(),
        best[0] * 1e3,
        sum[0] / n * 1e3,
        best[1] * 1e3,
        sum[1] / n * 1e3,
        best[0] / best[1],
        sum[0] / sum[1]
    );
    Ok(())
}
