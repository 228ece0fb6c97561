//! `vitforge selfcheck`: does this build, on this device, compute what `transformers` computes?
//! It runs the engine's golden files (two small models with odd configurations, made by
//! `tests/fixtures/make_golden.py` and compiled into the binary) on the device: preprocessing,
//! logits, the loss and every parameter's gradient against PyTorch's values, then a few training
//! steps and a save/load round trip. One PASS/FAIL line per check on stderr, a JSON summary on
//! stdout, exit status 1 when a check fails.
//!
//! Tolerances are the CPU tests' (logits 1e-4 absolute, gradients 1e-3 relative to the
//! largest of each tensor). On a GPU, cuBLAS may run f32 products in reduced precision (TF32), so
//! there they are 1e-2 and 2e-2: still far below what a wrong kernel gives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::Args;
use serde_json::{Value, json};

use crate::model::network::{Objective, loss_and_grads};
use crate::model::{Boundary, LoadedModel, ModelSource, Precision, TrainableSet, Vit};
use crate::train::OptimizerKind;
use crate::train::optim::Optimizer;

/// `vitforge selfcheck`.
#[derive(Debug, Args)]
pub struct SelfcheckArgs {
    /// Compute device: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// A golden-files folder (as `tests/fixtures/golden`) instead of the copy in the binary.
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
}

/// The golden models.
const MODELS: [&str; 2] = ["odd", "odd2"];

/// The files of one golden model folder.
const MODEL_FILES: [&str; 6] =
    ["config.json", "model.safetensors", "preprocessor_config.json", "preprocess.safetensors", "resized_u8.safetensors", "reference.safetensors"];

/// The golden files compiled into the binary: (path under the golden folder, bytes).
const EMBEDDED: [(&str, &[u8]); 20] = [
    ("odd/config.json", include_bytes!("../../tests/fixtures/golden/odd/config.json")),
    ("odd/model.safetensors", include_bytes!("../../tests/fixtures/golden/odd/model.safetensors")),
    ("odd/preprocessor_config.json", include_bytes!("../../tests/fixtures/golden/odd/preprocessor_config.json")),
    ("odd/preprocess.safetensors", include_bytes!("../../tests/fixtures/golden/odd/preprocess.safetensors")),
    ("odd/resized_u8.safetensors", include_bytes!("../../tests/fixtures/golden/odd/resized_u8.safetensors")),
    ("odd/reference.safetensors", include_bytes!("../../tests/fixtures/golden/odd/reference.safetensors")),
    ("odd2/config.json", include_bytes!("../../tests/fixtures/golden/odd2/config.json")),
    ("odd2/model.safetensors", include_bytes!("../../tests/fixtures/golden/odd2/model.safetensors")),
    ("odd2/preprocessor_config.json", include_bytes!("../../tests/fixtures/golden/odd2/preprocessor_config.json")),
    ("odd2/preprocess.safetensors", include_bytes!("../../tests/fixtures/golden/odd2/preprocess.safetensors")),
    ("odd2/resized_u8.safetensors", include_bytes!("../../tests/fixtures/golden/odd2/resized_u8.safetensors")),
    ("odd2/reference.safetensors", include_bytes!("../../tests/fixtures/golden/odd2/reference.safetensors")),
    ("images/alpha_rgba_40x40.png", include_bytes!("../../tests/fixtures/golden/images/alpha_rgba_40x40.png")),
    ("images/detail_rgb_200x150.png", include_bytes!("../../tests/fixtures/golden/images/detail_rgb_200x150.png")),
    ("images/grad_rgb_64x48.png", include_bytes!("../../tests/fixtures/golden/images/grad_rgb_64x48.png")),
    ("images/grey_l_50x31.png", include_bytes!("../../tests/fixtures/golden/images/grey_l_50x31.png")),
    ("images/pass_rgb_30x20.png", include_bytes!("../../tests/fixtures/golden/images/pass_rgb_30x20.png")),
    ("images/small_rgb_17x23.png", include_bytes!("../../tests/fixtures/golden/images/small_rgb_17x23.png")),
    ("images/tall_rgb_36x90.png", include_bytes!("../../tests/fixtures/golden/images/tall_rgb_36x90.png")),
    ("images/photo_rgb_120x90.jpg", include_bytes!("../../tests/fixtures/golden/images/photo_rgb_120x90.jpg")),
];

/// One check's outcome.
struct Check {
    name: String,
    passed: bool,
    detail: String,
}

/// Tolerances: (logits, absolute), (gradients, relative to each tensor's largest value).
fn tolerances(device: &Device) -> (f64, f64) {
    if device.is_cpu() { (1e-4, 1e-3) } else { (1e-2, 2e-2) }
}

/// `vitforge selfcheck`: runs every check, prints them, and fails when one failed.
pub fn selfcheck(args: SelfcheckArgs) -> anyhow::Result<()> {
    // The device `auto` resolved to is the one reported: the tolerances depend on it.
    let (device_name, device) =
        crate::model::resolve_devices(std::slice::from_ref(&args.device))?.into_iter().next().unwrap_or_else(|| ("cpu".into(), Device::Cpu));
    let scratch = tempfile::tempdir()?;
    let golden = match &args.fixtures {
        Some(dir) => dir.clone(),
        None => unpack_embedded(scratch.path())?,
    };
    let mut checks = Vec::new();
    for name in MODELS {
        checks.extend(check_model(&golden, name, &device, scratch.path()).with_context(|| format!("golden model {name}"))?);
    }
    let passed = checks.iter().all(|c| c.passed);
    for c in &checks {
        eprintln!("{}  {}: {}", if c.passed { "PASS" } else { "FAIL" }, c.name, c.detail);
    }
    let summary = json!({
        "device": device_name,
        // What ran on the CPU (the kernel level, and who multiplied f32 and bf16).
        "cpu_kernels": device.is_cpu().then(crate::model::kernels_summary),
        "f32_products": device.is_cpu().then(crate::model::f32_products),
        "tolerances": {"logits": tolerances(&device).0, "gradients": tolerances(&device).1},
        "passed": passed,
        "checks": checks.iter().map(|c| json!({"name": c.name, "passed": c.passed, "detail": c.detail})).collect::<Vec<Value>>(),
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if !passed {
        anyhow::bail!("{} of {} checks failed", checks.iter().filter(|c| !c.passed).count(), checks.len());
    }
    Ok(())
}

/// Writes the embedded golden files under `dir/golden`.
fn unpack_embedded(dir: &Path) -> anyhow::Result<PathBuf> {
    let root = dir.join("golden");
    for (rel, bytes) in EMBEDDED {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().expect("a file in a folder"))?;
        std::fs::write(&path, bytes)?;
    }
    Ok(root)
}

fn load(path: &Path, device: &Device) -> anyhow::Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).with_context(|| format!("reading {}", path.display()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?.to_device(&Device::Cpu)?, b.to_dtype(DType::F64)?.to_device(&Device::Cpu)?);
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f64>()?)
}

/// Every check of one golden model.
fn check_model(golden: &Path, name: &str, device: &Device, scratch: &Path) -> anyhow::Result<Vec<Check>> {
    let dir = golden.join(name);
    for file in MODEL_FILES {
        anyhow::ensure!(dir.join(file).is_file(), "{} is missing", dir.join(file).display());
    }
    let model = LoadedModel::load(&ModelSource::Dir(dir.clone()), None, device, 0)?;
    let reference = load(&dir.join("reference.safetensors"), device)?;
    let (logit_tol, grad_tol) = tolerances(device);
    let pixels = reference["pixel_values"].to_dtype(DType::F32)?;
    let labels: Vec<u32> = reference["labels"].to_device(&Device::Cpu)?.to_vec1::<i64>()?.into_iter().map(|l| l as u32).collect();
    let mut checks = vec![check_preprocessing(golden, name, &model)?];

    let logits = Vit::frozen(&model.cfg, &model.params)?.forward(&pixels)?;
    let diff = max_abs_diff(&logits, &reference["logits"])?;
    checks.push(Check { name: format!("{name}: logits"), passed: diff <= logit_tol, detail: format!("max abs diff {diff:.2e} (≤ {logit_tol:.0e})") });
    let vit = Vit::new(&model.cfg, &model.params, &|_| true)?;
    checks.extend(check_gradients(name, "", &vit, &model, &pixels, &labels, &reference, grad_tol)?);

    // bf16 products (f32 weights, layer norm, softmax and reductions), held to the f32 golden
    // values within what rounding the operands to 8 significant bits costs.
    let logits = Vit::frozen(&model.cfg, &model.params)?.with_precision(Precision::Bf16).forward(&pixels)?;
    let (diff, scale) = (max_abs_diff(&logits, &reference["logits"])?, max_abs(&reference["logits"])?);
    let rel = diff / scale.max(1e-12);
    checks.push(Check {
        name: format!("{name}: bf16 logits"),
        passed: rel <= BF16_TOLERANCE,
        detail: format!("max abs diff {diff:.2e}, relative to the largest logit {rel:.1e} (≤ {BF16_TOLERANCE:.0e})"),
    });
    let vit = Vit::new(&model.cfg, &model.params, &|_| true)?.with_precision(Precision::Bf16);
    checks.extend(check_gradients(name, "bf16 ", &vit, &model, &pixels, &labels, &reference, BF16_TOLERANCE)?);
    checks.push(check_training(name, &model, &pixels, &labels)?);
    checks.push(check_round_trip(name, &model, &pixels, &scratch.join(format!("saved-{name}")))?);
    Ok(checks)
}

/// Relative tolerance of the bf16 checks (loss, and logits and gradients relative to each
/// tensor's largest value). Rounding both operands of every product to bf16 (8 significant bits)
/// moves these golden models' values by up to about 1%; a wrong kernel moves them by 100%.
const BF16_TOLERANCE: f64 = 5e-2;

fn max_abs(t: &Tensor) -> anyhow::Result<f64> {
    Ok(t.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The loss and every parameter's gradient of `vit` on the golden batch against PyTorch's, the
/// gradients relative to each tensor's largest value: two checks, named with `prefix`.
#[allow(clippy::too_many_arguments)]
fn check_gradients(
    name: &str,
    prefix: &str,
    vit: &Vit,
    model: &LoadedModel,
    pixels: &Tensor,
    labels: &[u32],
    reference: &HashMap<String, Tensor>,
    tol: f64,
) -> anyhow::Result<Vec<Check>> {
    let (loss, grads) = loss_and_grads(vit, &model.params, TrainableSet::All, Boundary::Pixels, pixels, Objective::plain(labels), None)?;
    let ref_loss = reference["loss"].to_dtype(DType::F64)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f64>()?[0];
    let rel = (loss - ref_loss).abs() / ref_loss.abs().max(1e-12);
    let mut checks =
        vec![Check { name: format!("{name}: {prefix}loss"), passed: rel <= tol, detail: format!("{loss:.6} vs {ref_loss:.6} (relative {rel:.1e})") }];
    let (mut worst, mut worst_name, mut missing) = (0f64, String::new(), 0);
    for (param, _) in model.params.iter() {
        let (Some(ours), Some(expected)) = (grads.get(param), reference.get(&format!("grad.{param}"))) else {
            missing += 1;
            continue;
        };
        let scale = max_abs(expected)?;
        let diff = max_abs_diff(ours, expected)?;
        // Analytically zero gradients (key biases) are compared absolutely.
        let err = if scale < 1e-10 { diff / 1e-2 } else { diff / scale };
        if err > worst {
            (worst, worst_name) = (err, param.clone());
        }
    }
    checks.push(Check {
        name: format!("{name}: {prefix}every gradient"),
        passed: missing == 0 && worst <= tol,
        detail: format!("{} tensors, worst relative error {worst:.1e} ({worst_name}; ≤ {tol:.0e}), {missing} missing", grads.len()),
    });
    Ok(checks)
}

/// Resizing and pixel values of every golden image, exactly as `ViTImageProcessor` (JPEG decoders
/// may differ by a level, so the JPEG is held to resized pixels within 8 levels only).
fn check_preprocessing(golden: &Path, name: &str, model: &LoadedModel) -> anyhow::Result<Check> {
    let expected = load(&golden.join(name).join("preprocess.safetensors"), &Device::Cpu)?;
    let (h, w) = model.preprocessor.size;
    let (mut exact, mut worst_jpeg) = (0, 0f64);
    for (image, reference) in &expected {
        let bytes = std::fs::read(golden.join("images").join(image))?;
        let img = crate::imaging::decode_rgb(&bytes, 1 << 30)?;
        let ours = Tensor::from_vec(model.preprocessor.pixel_values(&img)?, (3, h, w), &Device::Cpu)?;
        let diff = max_abs_diff(&ours, reference)?;
        if image.ends_with(".jpg") {
            // A level is 2/255 of the normalised range here (mean = std = 0.5).
            worst_jpeg = worst_jpeg.max(diff);
        } else if diff == 0.0 {
            exact += 1;
        }
    }
    let pngs = expected.keys().filter(|k| !k.ends_with(".jpg")).count();
    let passed = exact == pngs && worst_jpeg <= 8.0 * 2.0 / 255.0 + 1e-6;
    Ok(Check { name: format!("{name}: preprocessing"), passed, detail: format!("{exact}/{pngs} PNG images bit-exact, JPEG within {worst_jpeg:.3}") })
}

/// A few AdamW steps on the golden batch lower its loss.
fn check_training(name: &str, model: &LoadedModel, pixels: &Tensor, labels: &[u32]) -> anyhow::Result<Check> {
    let mut optimizer = Optimizer::new(OptimizerKind::Adamw, 0.0, 0.0);
    let mut losses = Vec::new();
    for _ in 0..6 {
        let vit = Vit::new(&model.cfg, &model.params, &|_| true)?;
        let (loss, grads) = loss_and_grads(&vit, &model.params, TrainableSet::All, Boundary::Pixels, pixels, Objective::plain(labels), None)?;
        losses.push(loss);
        optimizer.step(&model.params, &grads, &|_| 1e-3)?;
    }
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    Ok(Check {
        name: format!("{name}: training steps"),
        passed: last.is_finite() && last < first,
        detail: format!("loss {first:.4} → {last:.4} in {} AdamW steps", losses.len() - 1),
    })
}

/// The model saved and loaded back gives the same logits.
fn check_round_trip(name: &str, model: &LoadedModel, pixels: &Tensor, dir: &Path) -> anyhow::Result<Check> {
    let logits = Vit::frozen(&model.cfg, &model.params)?.forward(pixels)?;
    model.save(dir)?;
    let back = LoadedModel::load(&ModelSource::Dir(dir.to_path_buf()), None, pixels.device(), 0)?;
    let again = Vit::frozen(&back.cfg, &back.params)?.forward(pixels)?;
    let diff = max_abs_diff(&logits, &again)?;
    Ok(Check { name: format!("{name}: save and load"), passed: diff == 0.0, detail: format!("logits max abs diff {diff:e} after the round trip") })
}
