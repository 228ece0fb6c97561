//! `vitforge bench`: images per second of inference, a full training step and a head-only step,
//! and peak memory, for a named architecture or a model folder. One JSON line per figure, in the
//! same shape as `bench/torch_reference.py`, so `bench/compare.sh` can put them side by side.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::model::network::{Objective, frozen_forward, loss_and_grads};
use crate::model::{LoadedModel, ModelSource, Precision, PrecisionChoice, TrainableSet, Vit, VitConfig, isa, stages};
use crate::train::OptimizerKind;
use crate::train::optim::{Optimizer, clip_grad_norm};

/// What is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum BenchMode {
    /// Forward pass without gradients.
    Infer,
    /// Forward, loss, backward, gradient clipping and an AdamW step over every parameter.
    Train,
    /// The frozen backbone's forward (no backward graph), then a step of the head.
    HeadOnly,
}

impl BenchMode {
    fn name(self) -> &'static str {
        match self {
            BenchMode::Infer => "infer",
            BenchMode::Train => "train",
            BenchMode::HeadOnly => "head_only",
        }
    }
}

/// `vitforge bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Architecture with random weights: tiny, small or base (patch 16, 224×224).
    #[arg(long, default_value = "small", conflicts_with = "model")]
    pub config: String,
    /// A model folder to benchmark instead of a named architecture.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Batch sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "8", value_parser = super::at_least(1))]
    pub batch: Vec<usize>,
    /// Modes (comma-separated). Peak memory is the process's high-water mark, so measure one mode
    /// per process to compare memory (bench/compare.sh does).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "infer,train,head_only")]
    pub mode: Vec<BenchMode>,
    /// Timed iterations per figure (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = super::at_least(1))]
    pub iters: usize,
    /// Untimed iterations before timing.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Compute device: auto, cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Instead of the network: time the `auto` recipe's probe fit (the logistic regression with
    /// its cross-validation, on the CPU) for these numbers of classes (comma-separated, 2 or more each), on
    /// generated features of the architecture's width.
    #[arg(long, value_delimiter = ',', value_parser = super::at_least(2))]
    pub probe_classes: Vec<usize>,
    /// Training images per class for `--probe-classes`.
    #[arg(long, default_value_t = 50, value_parser = super::at_least(1))]
    pub probe_per_class: usize,
    /// Precision of the matrix products: f32, bf16 or auto (as `vitforge train`).
    #[arg(long, value_enum, default_value_t = PrecisionChoice::F32)]
    pub precision: PrecisionChoice,
    /// Also time each stage of the CPU's fast path (products, attention, layer norms, …) over
    /// the timed iterations: a table on stderr, and each stage's share of the time in the JSON
    /// line (`breakdown`).
    #[arg(long)]
    pub breakdown: bool,
}

/// Number of classes of the benchmark head (as in bench/torch_reference.py).
const BENCH_LABELS: usize = 10;

/// Peak resident memory of this process, in MiB (Linux `VmHWM`).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if !args.probe_classes.is_empty() {
        return bench_probe(&args);
    }
    let device = crate::model::device(&args.device)?;
    let cpu = cpu_description(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
    let labels: Vec<String> = (0..BENCH_LABELS).map(|i| format!("class_{i}")).collect();
    let (name, model) = match &args.model {
        Some(dir) => {
            let model = LoadedModel::load(&ModelSource::Dir(dir.clone()), Some(&labels), &device, 0).with_context(|| format!("--model {}", dir.display()))?;
            (dir.display().to_string(), model)
        }
        None => {
            let Some(cfg) = VitConfig::preset(&args.config) else { bail!("--config must be tiny, small or base") };
            (args.config.clone(), LoadedModel::random(&cfg, &labels, 0, &device)?)
        }
    };
    if args.breakdown && (!device.is_cpu() || crate::model::cpu_path() == "reference") {
        bail!("--breakdown times the stages of the CPU's fast path: it needs --device cpu, without VITFORGE_REFERENCE_OPS");
    }
    let (h, w) = model.cfg.image_size;
    let precision = args.precision.resolve(&device);
    if device.is_cpu() {
        eprintln!("{}; path {}; precision {}", crate::model::kernels_summary(), crate::model::cpu_path(), precision.name());
    }
    for &batch in &args.batch {
        let pixels = Tensor::randn(0f32, 1.0, (batch, model.cfg.num_channels, h, w), &device)?;
        let targets: Vec<u32> = (0..batch as u32).map(|i| i % BENCH_LABELS as u32).collect();
        for &mode in &args.mode {
            let mut optimizer = Optimizer::new(OptimizerKind::Adamw, 0.0, 0.0);
            // As a served model: in bf16, its weights converted and packed once, before timing.
            let served = Vit::frozen(&model.cfg, &model.params)?.with_precision(precision);
            let served = if mode == BenchMode::Infer { served.packed_for_inference()? } else { served };
            let mut run = || -> anyhow::Result<()> {
                match mode {
                    BenchMode::Infer => {
                        let logits = served.forward(&pixels)?;
                        logits.to_device(&Device::Cpu)?;
                    }
                    BenchMode::Train => train_step(&model, TrainableSet::All, precision, &pixels, &targets, &mut optimizer)?,
                    BenchMode::HeadOnly => train_step(&model, TrainableSet::HeadOnly, precision, &pixels, &targets, &mut optimizer)?,
                }
                // GPU work is queued; a figure must include it.
                device.synchronize()?;
                Ok(())
            };
            for _ in 0..args.warmup {
                run()?;
            }
            let mut times = Vec::with_capacity(args.iters);
            stages::set_breakdown(args.breakdown);
            let pb = indicatif::ProgressBar::new(args.iters as u64);
            for _ in 0..args.iters.max(1) {
                let t = Instant::now();
                run()?;
                times.push(t.elapsed().as_secs_f64());
                pb.inc(1);
            }
            pb.finish_and_clear();
            let breakdown = args.breakdown.then(|| shares(&stages::breakdown(), times.iter().sum()));
            stages::set_breakdown(false);
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            let mut line = json!({
                "impl": "vitforge",
                "config": name,
                "batch": batch,
                "mode": mode.name(),
                "images_per_s": (batch as f64 / median * 100.0).round() / 100.0,
                "peak_rss_mb": peak_rss_mb().round(),
                "cpu": cpu,
                "cpu_isa": isa::detected().name(),
                "path": if device.is_cpu() { crate::model::cpu_path() } else { "cuda".to_string() },
                "precision": precision.name(),
                "bf16_products": if device.is_cpu() { crate::model::bf16_products() } else { "cuda" },
                "f32_products": if device.is_cpu() { crate::model::f32_products() } else { "cuda" },
            });
            if let Some(shares) = breakdown {
                eprintln!("{name}, batch {batch}, {}: share of {} timed iterations", mode.name(), times.len());
                line["breakdown"] = print_shares(shares);
            }
            println!("{line}");
        }
    }
    Ok(())
}

/// One training step of `set` on a batch: the frozen part's forward, loss and gradients,
/// clipping and an AdamW step.
fn train_step(model: &LoadedModel, set: TrainableSet, precision: Precision, pixels: &Tensor, targets: &[u32], optimizer: &mut Optimizer) -> anyhow::Result<()> {
    let layers = model.cfg.num_hidden_layers;
    let b = set.boundary(layers);
    let frozen = Vit::frozen(&model.cfg, &model.params)?.with_precision(precision);
    let input = frozen_forward(&frozen, b, pixels)?;
    let vit = Vit::new(&model.cfg, &model.params, &|n| set.contains(n, layers))?.with_precision(precision);
    let (_, mut grads) = loss_and_grads(&vit, &model.params, set, b, &input, Objective::plain(targets), None)?;
    clip_grad_norm(&mut grads, 1.0)?;
    optimizer.step(&model.params, &grads, &|_| 1e-4)?;
    Ok(())
}

/// Each stage's share of `total` seconds, rounded to 0.1%, the stages that ran (in their
/// order), then `other`: what no stage covers (the head, the loss, the optimiser, conversions).
fn shares(stages: &[(stages::Stage, f64)], total: f64) -> Vec<(String, f64)> {
    let share = |secs: f64| (secs / total.max(f64::MIN_POSITIVE) * 1000.0).round() / 1000.0;
    let timed: f64 = stages.iter().map(|(_, s)| s).sum();
    let ran = stages.iter().filter(|(_, secs)| *secs > 0.0);
    let mut out: Vec<_> = ran.map(|(stage, secs)| (stage.name().to_string(), share(*secs))).collect();
    out.push(("other".into(), share((total - timed).max(0.0))));
    out
}

/// Prints `shares` as a table on stderr, and returns them as a JSON object.
fn print_shares(shares: Vec<(String, f64)>) -> serde_json::Value {
    for (stage, share) in &shares {
        eprintln!("  {stage:<20} {:5.1}%", share * 100.0);
    }
    shares.into_iter().map(|(stage, share)| (stage, json!(share))).collect::<serde_json::Map<_, _>>().into()
}

/// The CPU figures are taken on, from `/proc/cpuinfo`'s first processor: its name, with its
/// family and model (a VM may give only the vendor's line, "AMD EPYC", for several
/// generations); `None` where the file names no model (not Linux, not x86).
fn cpu_description(cpuinfo: &str) -> Option<String> {
    let first = cpuinfo.lines().take_while(|l| !l.trim().is_empty());
    let field = |name: &str| {
        first.clone().find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == name).then(|| value.trim().to_string())
        })
    };
    let name = field("model name")?;
    Some(match (field("cpu family"), field("model")) {
        (Some(family), Some(model)) => format!("{name} (family {family} model {model})"),
        _ => name,
    })
}

/// `--probe-classes`: seconds to fit the probe head on `classes × per_class` feature vectors of
/// the architecture's width. The features are generated (a Gaussian cloud per class around its
/// own random centre, spread so that cross-validated accuracy lands near 90%, like real
/// features of a pre-trained backbone on a fine-grained task): the fit's cost depends on their
/// number, width and separability, not on what images they came from.
fn bench_probe(args: &BenchArgs) -> anyhow::Result<()> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let dim = match &args.model {
        Some(dir) => {
            let config = dir.join("config.json");
            let text = std::fs::read_to_string(&config).with_context(|| format!("--model {}: reading {}", dir.display(), config.display()))?;
            VitConfig::from_json(&text).with_context(|| format!("--model {}", dir.display()))?.hidden_size
        }
        None => VitConfig::preset(&args.config).ok_or_else(|| anyhow::anyhow!("--config must be tiny, small or base"))?.hidden_size,
    };
    for &classes in &args.probe_classes {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(classes as u64);
        let mut normal = || -> f32 { StandardNormal.sample(&mut rng) };
        let centres: Vec<f32> = (0..classes * dim).map(|_| normal() * 0.2).collect();
        let n = classes * args.probe_per_class;
        let labels: Vec<u32> = (0..n).map(|i| (i % classes) as u32).collect();
        let features: Vec<f32> = labels.iter().flat_map(|&l| (0..dim).map(|j| centres[l as usize * dim + j] + normal()).collect::<Vec<_>>()).collect();
        let pb = indicatif::ProgressBar::new(0);
        let t = Instant::now();
        let probe = crate::train::probe::fit_with_progress(&features, &labels, classes, 0, &mut |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        });
        let secs = t.elapsed().as_secs_f64();
        pb.finish_and_clear();
        let line = json!({
            "impl": "vitforge",
            "mode": "probe_fit",
            "dim": dim,
            "classes": classes,
            "images": n,
            "seconds": (secs * 100.0).round() / 100.0,
            "chosen_c": probe.c,
            "cv_accuracy": probe.cv.map(|s| s.accuracy),
            "cv_log_loss": probe.cv.map(|s| s.log_loss),
        });
        println!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::cpu_description;

    #[test]
    fn the_cpu_is_named_with_its_family_and_model_from_the_first_processor() {
        let zen4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nstepping\t: 1\n\nprocessor\t: 1\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: Other\n";
        assert_eq!(cpu_description(zen4).as_deref(), Some("AMD EPYC (family 25 model 17)"));
        assert_eq!(cpu_description("model name\t: Some CPU\n").as_deref(), Some("Some CPU"));
        // An Arm machine's cpuinfo names no model; nor does a missing file.
        assert_eq!(cpu_description("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n"), None);
        assert_eq!(cpu_description(""), None);
    }
}
