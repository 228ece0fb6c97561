//! The command line: `init-model`, `train`, `predict` and `eval` run as real processes.

use std::path::Path;
use std::process::Command;

use image::{Rgb, RgbImage};
use serde_json::Value;

#[path = "../support/mod.rs"]
mod support;

fn vitforge(args: &[&str]) -> (bool, String, String) {
    vitforge_with::<&str, &str>(args, &[])
}

fn vitforge_with<K: AsRef<std::ffi::OsStr>, V: AsRef<std::ffi::OsStr>>(args: &[&str], env: &[(K, V)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vitforge"))
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run vitforge");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Bright-on-top versus bright-at-bottom images: learnable by a tiny model in a few epochs.
fn write_dataset(root: &Path, per_class: u32) {
    for (class, top) in [("top", true), ("bottom", false)] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..per_class {
            let img = RgbImage::from_fn(40 + i % 7, 36 + i % 5, |x, y| {
                let upper = y < 18;
                let v = if upper == top { 220 } else { 30 };
                Rgb([v, (v as u32 * (x + i) % 251) as u8 / 4 + v / 2, v])
            });
            img.save(root.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
}

#[test]
fn init_train_predict_and_eval_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_string_lossy().into_owned();
    std::fs::write(tmp.path().join("config.json"), support::TINY_CONFIG).unwrap();
    let (ok, _, err) = vitforge(&["init-model", "--config", &t("config.json"), "--labels", "x,y", "--output", &t("base")]);
    assert!(ok, "{err}");
    assert!(tmp.path().join("base/model.safetensors").is_file());

    write_dataset(&tmp.path().join("data"), 16);
    let (ok, out, err) = vitforge(&[
        "train", "--data", &t("data"), "--base-model", &t("base"), "--output", &t("model"), "--epochs", "8",
        "--learning-rate", "2e-3", "--batch-size", "4", "--augment", "false", "--validation-split", "0.25",
    ]);
    assert!(ok, "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(summary["epochs_run"], 8);
    assert!(summary["validation"]["accuracy"].as_f64().unwrap() >= 0.75, "{summary}");
    assert_eq!(summary["params"]["learning_rate"], 2e-3);
    assert!(err.contains("epoch 8: validation"), "progress lines on stderr: {err}");
    // Checkpoints are cleaned up once the model is written.
    assert!(!tmp.path().join(".model.checkpoints").exists());

    let (ok, out, err) = vitforge(&["predict", "--model", &t("model"), "--top-k", "1", &t("data/top/0.png"), &t("data/bottom/0.png")]);
    assert!(ok, "{err}");
    let preds: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(preds["predictions"].as_array().unwrap().len(), 2);
    assert_eq!(preds["predictions"][0]["top_k"].as_array().unwrap().len(), 1);
    assert!(preds["predictions"][0]["file"].as_str().unwrap().ends_with("top/0.png"));
    assert!(preds["predictions"][0]["score"].as_f64().unwrap() > 0.0);

    let (ok, out, err) = vitforge(&["eval", "--model", &t("model"), "--data", &t("data")]);
    assert!(ok, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["num_images"], 32);
    assert!(report["accuracy"].as_f64().unwrap() >= 0.75, "{report}");
    for key in ["precision", "recall", "f1", "per_class", "confusion_matrix"] {
        assert!(report.get(key).is_some(), "{key}");
    }

    // bf16 products: the same model's predictions and accuracy, within bf16's rounding.
    let images: Vec<String> = ["top", "bottom"].iter().flat_map(|c| (0..16).map(move |i| format!("data/{c}/{i}.png"))).map(|p| t(&p)).collect();
    let model = t("model");
    let predict = |precision: &str| -> Vec<(String, f64)> {
        let mut args = vec!["predict", "--model", &model, "--top-k", "1", "--precision", precision];
        args.extend(images.iter().map(String::as_str));
        let (ok, out, err) = vitforge(&args);
        assert!(ok, "{precision}: {err}");
        let preds: Value = serde_json::from_str(&out).unwrap();
        preds["predictions"].as_array().unwrap().iter().map(|p| (p["label"].as_str().unwrap().to_string(), p["score"].as_f64().unwrap())).collect()
    };
    let (full, half) = (predict("f32"), predict("bf16"));
    let same = full.iter().zip(&half).filter(|(a, b)| a.0 == b.0).count();
    assert!(same >= 31, "bf16 changed {} of 32 top-1 labels", 32 - same);
    assert!(full.iter().zip(&half).any(|(a, b)| (a.1 - b.1).abs() > 1e-6), "bf16 scores equal f32's: nothing was rounded");
    let (ok, out, err) = vitforge(&["eval", "--model", &t("model"), "--data", &t("data"), "--precision", "bf16"]);
    assert!(ok, "{err}");
    let half_report: Value = serde_json::from_str(&out).unwrap();
    let gap = (half_report["accuracy"].as_f64().unwrap() - report["accuracy"].as_f64().unwrap()).abs();
    assert!(gap <= 1.0 / 32.0 + 1e-9, "accuracy f32 {} vs bf16 {}", report["accuracy"], half_report["accuracy"]);

    // Mixed-precision training says so, and records it. Its data repeats two files, one of them
    // under both classes, which the import points out.
    write_dataset(&tmp.path().join("data2"), 16);
    std::fs::copy(tmp.path().join("data2/top/3.png"), tmp.path().join("data2/top/3 copy.png")).unwrap();
    std::fs::copy(tmp.path().join("data2/top/5.png"), tmp.path().join("data2/bottom/x.png")).unwrap();
    // And a picture saved again in another format: the same pixels in other bytes, a look-alike.
    image::open(tmp.path().join("data2/top/7.png")).unwrap().save(tmp.path().join("data2/top/7.bmp")).unwrap();
    let (ok, out, err) = vitforge(&[
        "train", "--data", &t("data2"), "--base-model", &t("base"), "--output", &t("model16"), "--epochs", "2",
        "--learning-rate", "2e-3", "--batch-size", "4", "--augment", "false", "--precision", "bf16",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("products in bf16"), "{err}");
    assert!(err.contains("note: 2 images are copies of others: 1 file under two or more classes; all are used as given"), "{err}");
    assert!(err.contains("the same file: bottom/x.png (bottom, train), top/5.png (top, train)"), "{err}");
    assert!(err.contains("the same file: top/3 copy.png (top, train), top/3.png (top, train)"), "{err}");
    // This set's pictures are drawn alike on purpose, so 7.bmp is in a group with others. A
    // picture of one class turned half round is one of the other's (a band at the top, a band at
    // the bottom), but turned copies count only within a class: the one group under both
    // classes is that of top/5.png, whose copy bottom/x.png is bottom/5.png turned.
    assert!(
        err.contains("images look like other files (resized, re-encoded, mirrored or turned copies): 1 group under two or more classes; all are used as given"),
        "{err}"
    );
    let across: Vec<&str> = err.lines().filter(|l| l.starts_with("  alike: ") && l.contains("(top, ") && l.contains("(bottom, ")).collect();
    assert_eq!(across, ["  alike: bottom/5.png (bottom, train), bottom/x.png (bottom, train), top/5.png (top, train)"], "{err}");
    assert!(err.lines().any(|l| l.starts_with("  alike: ") && l.contains("top/7.bmp (top, train)") && l.contains("top/7.png (top, train)")), "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(summary["params"]["precision"], "bf16");
    assert!(summary["validation"]["loss"].as_f64().unwrap().is_finite(), "{summary}");
}

#[test]
fn command_line_errors_are_clear() {
    let (ok, _, err) = vitforge(&["train", "--data", "/nonexistent", "--output", "/tmp/x", "--epochs", "0"]);
    assert!(!ok);
    assert!(err.contains("epochs"), "{err}");
    let (ok, _, err) = vitforge(&["predict", "--model", "/nonexistent/model", "x.png"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/model"), "{err}");
    let (ok, _, err) = vitforge(&["init-model", "--config", "huge", "--labels", "a", "--output", "/tmp/x"]);
    assert!(!ok);
    assert!(err.contains("tiny, small or base"), "{err}");
    let (ok, _, err) = vitforge(&["predict", "--model", "m", "--precision", "fp16", "x.png"]);
    assert!(!ok);
    assert!(err.contains("fp16") && err.contains("f32") && err.contains("bf16") && err.contains("auto"), "{err}");
    let (ok, _, err) = vitforge(&["serve", "--precision", "half"]);
    assert!(!ok);
    assert!(err.contains("--precision") && err.contains("bf16"), "{err}");
    let (ok, out, _) = vitforge(&["train", "--help"]);
    assert!(ok);
    for flag in ["--learning-rate", "--epochs", "--batch-size", "--train-mode", "--trainable-layers", "--optimizer", "--label-smoothing"] {
        assert!(out.contains(flag), "{flag} in train --help");
    }
}

#[test]
fn selfcheck_passes_on_this_machine_and_fails_on_a_wrong_reference() {
    // `auto` is reported as the device it resolved to (this suite runs on a CPU).
    let (ok, out, err) = vitforge(&["selfcheck", "--device", "auto"]);
    assert!(ok, "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(summary["passed"], true, "{summary}");
    assert_eq!((summary["device"].as_str(), summary["tolerances"]["logits"].as_f64()), (Some("cpu"), Some(1e-4)), "{summary}");
    let names: Vec<&str> = summary["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for name in [
        "odd: preprocessing",
        "odd: logits",
        "odd: loss",
        "odd: every gradient",
        "odd: bf16 logits",
        "odd: bf16 loss",
        "odd: bf16 every gradient",
        "odd: training steps",
        "odd: save and load",
        "odd2: logits",
    ] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    assert_eq!(err.lines().filter(|l| l.starts_with("PASS")).count(), names.len(), "{err}");

    // The same files with one golden logit off by 0.01: the logits check fails, and says so.
    let tmp = tempfile::tempdir().unwrap();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden");
    for entry in support::files_under(&golden) {
        let dest = tmp.path().join(&entry);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(golden.join(&entry), &dest).unwrap();
    }
    let reference = tmp.path().join("odd/reference.safetensors");
    let mut tensors = candle_core::safetensors::load(&reference, &candle_core::Device::Cpu).unwrap();
    let logits = tensors["logits"].clone();
    let bump = (logits.ones_like().unwrap() * 0.01).unwrap().to_dtype(logits.dtype()).unwrap();
    tensors.insert("logits".into(), (logits + bump).unwrap());
    candle_core::safetensors::save(&tensors, &reference).unwrap();
    let (ok, out, err) = vitforge(&["selfcheck", "--device", "cpu", "--fixtures", &tmp.path().to_string_lossy()]);
    assert!(!ok, "a wrong reference must fail: {out}");
    assert!(err.lines().any(|l| l.starts_with("FAIL  odd: logits")), "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["passed"], false);
}

/// `VITFORGE_MAX_ISA` at every kernel level this CPU runs (`amx` where it has AMX, which only
/// the variable selects): the golden files pass (the model's
/// logits, loss and every gradient against PyTorch's), and `bench` reports the path it ran. An
/// unknown level stops the command with a message naming the variable.
#[test]
fn every_kernel_level_passes_the_golden_files_and_bench_names_it() {
    let mut levels = vec!["generic"];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") {
            levels.push("avx2");
        }
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
            levels.push("avx512");
            if has!("avx512bf16") {
                levels.push("avx512bf16");
            }
        }
    }
    // AMX needs the OS's grant as well as the CPU's flags: the binary's own detection decides.
    let (ok, out, err) = vitforge(&["bench", "--config", "tiny", "--mode", "infer", "--iters", "1", "--warmup", "0"]);
    assert!(ok, "{err}");
    let line: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    if line["cpu_isa"] == "amx" {
        levels.push("amx");
        assert_eq!(line["path"], "amx", "an AMX CPU runs the AMX kernel by default: {line}");
    }
    // At `avx512bf16` bf16 runs by `vdpbf16ps` or emulated on the FMA kernel, as measured at
    // start: both are put through the golden files, each forced by VITFORGE_DPBF16.
    let mut runs: Vec<(&str, Option<&str>)> = levels.iter().map(|l| (*l, None)).collect();
    if levels.contains(&"avx512bf16") {
        runs.extend([("avx512bf16", Some("1")), ("avx512bf16", Some("0"))]);
    }
    for (level, dpbf16) in &runs {
        let mut env = vec![("VITFORGE_MAX_ISA", *level)];
        env.extend(dpbf16.map(|v| ("VITFORGE_DPBF16", v)));
        let (ok, out, err) = vitforge_with(&["selfcheck", "--device", "cpu"], &env);
        assert!(ok, "{level}: {err}");
        let summary: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(summary["passed"], true, "{level}: {summary}");
        let (ok, out, err) = vitforge_with(&["bench", "--config", "tiny", "--mode", "infer", "--iters", "1", "--warmup", "0"], &env);
        assert!(ok, "{level}: {err}");
        let line: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(line["path"], *level, "{line}");
        assert!(line["cpu_isa"].is_string(), "{line}");
        if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            assert!(line["cpu"].as_str().is_some_and(|cpu| cpu.contains(" (family ")), "the CPU named, with its family and model: {line}");
        }
        assert!(err.contains(&format!("capped at {level} by VITFORGE_MAX_ISA")), "{err}");
        let (ok, out, err) = vitforge_with(&["bench", "--config", "tiny", "--mode", "infer,train", "--iters", "1", "--warmup", "0", "--precision", "bf16"], &env);
        assert!(ok, "{level} bf16: {err}");
        assert_eq!(out.lines().count(), 2, "a line for infer and one for train: {out}");
        for line in out.lines() {
            let line: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {out}"));
            assert_eq!((line["path"].as_str(), line["precision"].as_str()), (Some(*level), Some("bf16")), "{line}");
            let products = line["bf16_products"].as_str();
            match (*level, dpbf16) {
                ("amx", _) => assert_eq!(products, Some("amx"), "{line}"),
                ("avx512bf16", Some("1")) => assert_eq!(products, Some("vdpbf16ps"), "{line}"),
                ("avx512bf16", None) => assert!(matches!(products, Some("vdpbf16ps" | "fma-emulated")), "{line}"),
                ("generic", _) => assert_eq!(products, Some("gemm-crate-emulated"), "{line}"),
                _ => assert_eq!(products, Some("fma-emulated"), "{line}"),
            }
        }
    }
    eprintln!("kernel levels run through the golden files here: {runs:?} (level, VITFORGE_DPBF16)");
    let (ok, _, err) = vitforge_with(&["bench", "--config", "tiny", "--iters", "1"], &[("VITFORGE_MAX_ISA", "sse9")]);
    assert!(!ok);
    assert!(err.contains("VITFORGE_MAX_ISA") && err.contains("generic, avx2, avx512, avx512bf16, amx"), "{err}");
    let (ok, _, err) = vitforge_with(&["bench", "--config", "tiny", "--iters", "1"], &[("VITFORGE_DPBF16", "yes")]);
    assert!(!ok);
    assert!(err.contains("VITFORGE_DPBF16=\"yes\"") && err.contains("use 1"), "{err}");
}

/// `VITFORGE_MKL` picks who multiplies f32, and `bench` and `selfcheck` say who did. Built with
/// the `mkl` feature: MKL with `1` (and the golden files pass), ours with `0`, and by default MKL
/// only on Intel CPUs with AVX-512. Built without it: `1` is refused, naming the feature. A value
/// that is not 0 or 1 is refused either way.
#[cfg(target_arch = "x86_64")]
#[test]
fn f32_products_follow_vitforge_mkl_and_bench_and_selfcheck_name_them() {
    let f32_products = |env: &[(&str, &str)]| {
        let (ok, out, err) = vitforge_with(&["bench", "--config", "tiny", "--mode", "infer", "--iters", "1", "--warmup", "0"], env);
        assert!(ok, "{env:?}: {err}");
        let line: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        line["f32_products"].as_str().map(str::to_string).unwrap_or_else(|| panic!("{line}"))
    };
    let ours = if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") { "ours" } else { "gemm-crate" };
    assert_eq!(f32_products(&[("VITFORGE_MKL", "0")]), ours);
    let (ok, _, err) = vitforge_with(&["bench", "--config", "tiny", "--iters", "1"], &[("VITFORGE_MKL", "yes")]);
    assert!(!ok);
    assert!(err.contains("VITFORGE_MKL=\"yes\"") && err.contains("use 1"), "{err}");
    if cfg!(feature = "mkl") {
        assert_eq!(f32_products(&[("VITFORGE_MKL", "1")]), "mkl");
        let intel = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().contains("GenuineIntel");
        let default = if intel && std::arch::is_x86_feature_detected!("avx512f") { "mkl" } else { ours };
        assert_eq!(f32_products(&[("VITFORGE_MKL", "")]), default, "MKL by default on Intel CPUs with AVX-512 only");
        // The start-up line says MKL is there, whether it multiplies or not.
        let (ok, _, err) = vitforge_with(&["bench", "--config", "tiny", "--mode", "infer", "--iters", "1", "--warmup", "0"], &[("VITFORGE_MKL", "")]);
        let said = if default == "mkl" { "but f32 products by Intel MKL (its default on Intel CPUs with AVX-512" } else { "Intel MKL is built in but off here" };
        assert!(ok && err.contains(said), "{err}");
        let (ok, out, err) = vitforge_with(&["selfcheck", "--device", "cpu"], &[("VITFORGE_MKL", "1")]);
        assert!(ok, "{err}");
        let summary: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!((&summary["passed"], &summary["f32_products"]), (&Value::Bool(true), &Value::from("mkl")), "{summary}");
        assert!(summary["cpu_kernels"].as_str().is_some_and(|s| s.contains("f32 products by Intel MKL (VITFORGE_MKL=1)")), "{summary}");
    } else {
        assert_eq!(f32_products(&[("VITFORGE_MKL", "")]), ours);
        let (ok, _, err) = vitforge_with(&["bench", "--config", "tiny", "--iters", "1"], &[("VITFORGE_MKL", "1")]);
        assert!(!ok);
        assert!(err.contains("VITFORGE_MKL=1: this build has no MKL") && err.contains("--features mkl"), "{err}");
    }
}

/// `bench --breakdown` adds each stage's share of the timed iterations to the JSON line: the
/// forward's stages for inference, the backward's too for a training step, each above zero,
/// with `other` for the rest, adding up to the whole; a table of them goes to stderr. It times
/// the CPU's fast path only, so the reference ops are refused with the reason.
#[test]
fn bench_breaks_the_time_down_by_stage() {
    let forward = ["embed", "layer_norm", "qkv", "attention", "attention_out", "residual", "fc1", "activation_fc2"];
    let backward = ["activation_backward", "weight_grads", "input_grads", "attention_backward", "layer_norm_backward", "embed_backward"];
    let (ok, out, err) = vitforge(&["bench", "--config", "tiny", "--mode", "infer,train", "--iters", "2", "--warmup", "1", "--breakdown"]);
    assert!(ok, "{err}");
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {out}"))).collect();
    assert_eq!(lines.len(), 2, "{out}");
    for (line, train) in lines.iter().zip([false, true]) {
        let shares = line["breakdown"].as_object().unwrap_or_else(|| panic!("a breakdown: {line}"));
        let want: Vec<&str> = forward.iter().chain(if train { &backward[..] } else { &[] }).chain(&["other"]).copied().collect();
        assert_eq!(shares.keys().map(String::as_str).collect::<std::collections::BTreeSet<_>>(), want.iter().copied().collect(), "{line}");
        for stage in &want[..want.len() - 1] {
            assert!(shares[*stage].as_f64().is_some_and(|s| s > 0.0 && s < 1.0), "{stage}: {line}");
        }
        let total: f64 = shares.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 0.01, "the shares add up to the whole: {total} {line}");
        let mode = line["mode"].as_str().unwrap();
        assert!(err.contains(&format!("tiny, batch 8, {mode}: share of 2 timed iterations")), "{err}");
    }
    assert!(err.lines().any(|l| l.trim_start().starts_with("weight_grads") && l.ends_with('%')), "{err}");
    // Without the flag, no breakdown.
    let (ok, out, _) = vitforge(&["bench", "--config", "tiny", "--mode", "infer", "--iters", "1", "--warmup", "0"]);
    assert!(ok && !out.contains("breakdown"), "{out}");
    let (ok, _, err) = vitforge_with(&["bench", "--config", "tiny", "--iters", "1", "--breakdown"], &[("VITFORGE_REFERENCE_OPS", "1")]);
    assert!(!ok && err.contains("--breakdown") && err.contains("VITFORGE_REFERENCE_OPS"), "{err}");
}

/// `--output` never replaces a folder holding anything but an earlier model, nor one that is,
/// contains or lies inside `--data` or `--base-model`; the refusal names the folder, exits 1 and
/// leaves everything as it was (checked before any training). An earlier model is replaced.
#[test]
fn output_never_replaces_a_folder_of_other_files_or_the_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_string_lossy().into_owned();
    std::fs::create_dir(tmp.path().join("important")).unwrap();
    std::fs::write(tmp.path().join("important/notes.txt"), "x").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vitforge"))
        .args(["init-model", "--config", "tiny", "--labels", "cat,dog", "--output", &t("important")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&t("important")) && err.contains("notes.txt"), "{err}");
    assert_eq!(std::fs::read_to_string(tmp.path().join("important/notes.txt")).unwrap(), "x");
    assert!(!tmp.path().join("important/config.json").exists());

    // A fresh folder, an empty one and an earlier model are written (and rewritten).
    std::fs::create_dir(tmp.path().join("empty")).unwrap();
    for dir in ["base", "base", "empty"] {
        let (ok, _, err) = vitforge(&["init-model", "--config", "tiny", "--labels", "x,y", "--output", &t(dir)]);
        assert!(ok, "{dir}: {err}");
        assert!(tmp.path().join(dir).join("model.safetensors").is_file());
    }

    write_dataset(&tmp.path().join("data"), 4);
    let before = support::files_under(&tmp.path().join("data"));
    let train = |output: &str, base: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_vitforge"))
            .args(["train", "--data", &t("data"), "--base-model", base, "--output", output, "--epochs", "1"])
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let base = t("base");
    let cases = [
        (t("data"), base.as_str(), "is --data"),
        (format!("{}/../data/", t("data")), base.as_str(), "is --data"),
        (t("data/top"), base.as_str(), "lies inside --data"),
        (tmp.path().to_string_lossy().into_owned(), base.as_str(), "contains --data"),
        (t("base"), base.as_str(), "is --base-model"),
        (t("base/sub"), base.as_str(), "lies inside --base-model"),
        (t("important"), base.as_str(), "notes.txt"),
    ];
    for (output, base, expected) in &cases {
        let (code, err) = train(output, base);
        assert_eq!(code, Some(1), "{output}: {err}");
        assert!(err.contains(expected) && err.contains("--output"), "{output}: {err}");
        assert!(!err.contains("imported"), "refused before reading the data: {err}");
    }
    assert_eq!(support::files_under(&tmp.path().join("data")), before);
    assert!(tmp.path().join("base/model.safetensors").is_file());
    assert!(!tmp.path().join("base/sub").exists());
    assert_eq!(std::fs::read_to_string(tmp.path().join("important/notes.txt")).unwrap(), "x");
}

/// Ctrl-C during `train` stops it cleanly (status 130, the scratch copy of the data removed, the
/// epoch checkpoint kept and the way to resume named), and the same command run again resumes
/// from that checkpoint instead of starting over, then finishes.
#[test]
fn an_interrupted_train_resumes_from_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_string_lossy().into_owned();
    std::fs::write(tmp.path().join("config.json"), support::SLOW_CONFIG).unwrap();
    let (ok, _, err) = vitforge(&["init-model", "--config", &t("config.json"), "--labels", "x,y", "--output", &t("base")]);
    assert!(ok, "{err}");
    write_dataset(&tmp.path().join("data"), 24);
    std::fs::create_dir(tmp.path().join("scratch")).unwrap();
    let args = [
        "train", "--data", &t("data"), "--base-model", &t("base"), "--output", &t("model"), "--epochs", "40",
        "--learning-rate", "2e-3", "--batch-size", "4", "--augment", "false",
    ];
    let run = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vitforge"));
        cmd.args(args).env("RUST_LOG", "warn").env("TMPDIR", t("scratch"));
        cmd
    };

    let mut child = run().stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let checkpoints = tmp.path().join(".model.checkpoints");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !checkpoints.join("epoch-1").is_dir() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint of epoch 1 within two minutes");
        assert!(child.try_wait().unwrap().is_none(), "train ended before its first checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted") && err.contains("run the same command again to resume"), "{err}");
    assert!(!tmp.path().join("model").exists());
    assert!(std::fs::read_dir(tmp.path().join("scratch")).unwrap().next().is_none(), "the scratch copy of the data is removed");
    let kept = std::fs::read_dir(&checkpoints).unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with("epoch-"));
    assert!(kept, "the epoch checkpoint is kept");

    let out = run().output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming after epoch"), "{err}");
    assert!(!err.contains("starting over"), "{err}");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["epochs_run"], 40, "{summary}");
    assert!(tmp.path().join("model/model.safetensors").is_file());
    assert!(!checkpoints.exists());
}

/// Counts that must be positive are refused by the parser with the flag named, instead of a
/// panic (`--probe-classes 0` divided a chunk size by zero) or a meaningless figure.
#[test]
fn zero_counts_are_refused_with_the_flag_named() {
    let cases: [(&[&str], &str); 7] = [
        (&["bench", "--config", "tiny", "--probe-classes", "0"], "--probe-classes"),
        (&["bench", "--config", "tiny", "--probe-classes", "1"], "--probe-classes"),
        (&["bench", "--config", "tiny", "--probe-classes", "2", "--probe-per-class", "0"], "--probe-per-class"),
        (&["bench", "--config", "tiny", "--batch", "4,0"], "--batch"),
        (&["bench", "--config", "tiny", "--iters", "0"], "--iters"),
        (&["predict", "--model", "m", "--top-k", "0", "x.png"], "--top-k"),
        (&["eval", "--model", "m", "--data", "d", "--batch-size", "0"], "--batch-size"),
    ];
    for (args, flag) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_vitforge")).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag) && err.contains("or more") && !err.contains("panicked"), "{args:?}: {err}");
    }
}

/// `init-model --labels` takes at least two different, non-empty class names (trimmed); anything
/// else is refused with a message saying what is wrong, and nothing is written.
#[test]
fn init_model_needs_two_distinct_class_names() {
    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("m").to_string_lossy().into_owned();
    for (labels, expected) in [("cat,cat", "'cat' is given twice"), ("cat, cat ", "'cat' is given twice"), ("", "empty"), ("cat,,dog", "empty"), ("cat", "at least 2 classes")] {
        let (ok, _, err) = vitforge(&["init-model", "--config", "tiny", "--labels", labels, "--output", &output]);
        assert!(!ok, "{labels:?} accepted");
        assert!(err.contains("--labels") && err.contains(expected), "{labels:?}: {err}");
        assert!(!tmp.path().join("m").exists(), "{labels:?}");
    }
    let (ok, _, err) = vitforge(&["init-model", "--config", "tiny", "--labels", " cat , dog", "--output", &output]);
    assert!(ok, "{err}");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("m/config.json")).unwrap()).unwrap();
    assert_eq!(config["id2label"], serde_json::json!({"0": "cat", "1": "dog"}));
}

/// A file `predict` cannot read or decode gets `{"file", "error"}` in place of its prediction;
/// the other files are still classified, and the command exits with status 1 at the end.
#[test]
fn predict_reports_a_bad_file_and_classifies_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_string_lossy().into_owned();
    std::fs::write(tmp.path().join("config.json"), support::TINY_CONFIG).unwrap();
    let (ok, _, err) = vitforge(&["init-model", "--config", &t("config.json"), "--labels", "x,y", "--output", &t("model")]);
    assert!(ok, "{err}");
    write_dataset(&tmp.path().join("data"), 1);
    std::fs::write(tmp.path().join("empty.png"), b"").unwrap();
    std::fs::write(tmp.path().join("corrupt.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    let files = [t("data/top/0.png"), "/dev/null".into(), t("missing.png"), t("empty.png"), t("corrupt.jpg"), t("data/bottom/0.png")];
    let model = t("model");
    let mut args = vec!["predict", "--model", &model, "--top-k", "1"];
    args.extend(files.iter().map(String::as_str));
    let out = Command::new(env!("CARGO_BIN_EXE_vitforge")).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("4 of 6 images could not be read or decoded"), "{err}");
    let preds: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {err}"));
    let preds = preds["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), files.len());
    for (pred, file) in preds.iter().zip(&files) {
        assert_eq!(pred["file"], *file);
        let bad = !file.ends_with("/0.png");
        assert_eq!(pred.get("error").is_some(), bad, "{pred}");
        assert_eq!(pred.get("label").is_some(), !bad, "{pred}");
    }
    assert!(preds[2]["error"].as_str().unwrap().contains("cannot read"), "{}", preds[2]);

    // A file name that is not UTF-8 is reported as far as it can be, not a panic.
    use std::os::unix::ffi::OsStrExt;
    let odd = tmp.path().join(std::ffi::OsStr::from_bytes(b"\xff.png"));
    std::fs::copy(tmp.path().join("data/top/0.png"), &odd).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vitforge")).args(["predict", "--model", &model]).arg(&odd).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let preds: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(preds["predictions"][0]["file"], odd.to_string_lossy().as_ref());
    assert!(preds["predictions"][0]["label"].is_string(), "{preds}");
}

/// A folder given to `predict` stands for its images, sub-folders' included, in name order;
/// files in it that are not images, and clutter, are passed over; a broken image is still an
/// error; a folder with no image fails saying so.
#[test]
fn predict_classifies_the_images_of_a_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_string_lossy().into_owned();
    let (ok, _, err) = vitforge(&["init-model", "--config", "tiny", "--labels", "x,y", "--output", &t("model")]);
    assert!(ok, "{err}");
    write_dataset(&tmp.path().join("data"), 1);
    let photos = tmp.path().join("photos");
    for (from, to) in [("top/0.png", "b.png"), ("bottom/0.png", "a.png"), ("top/0.png", "sub/c.png"), ("top/0.png", "__MACOSX/._a.png")] {
        std::fs::create_dir_all(photos.join(to).parent().unwrap()).unwrap();
        std::fs::copy(tmp.path().join("data").join(from), photos.join(to)).unwrap();
    }
    std::fs::write(photos.join(".DS_Store"), b"\0\0\0\x01Bud1").unwrap();
    std::fs::write(photos.join("README.txt"), b"holiday photos").unwrap();
    let model = t("model");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_vitforge")).args(["predict", "--model", &model]).args(args).output().unwrap();
        let stdout: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.code(), stdout, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, preds, err) = run(&[&t("photos"), &t("data/top/0.png")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("passed over 1 file(s)"), "the README: {err}");
    let files: Vec<&str> = preds["predictions"].as_array().unwrap().iter().map(|p| p["file"].as_str().unwrap()).collect();
    assert_eq!(files, [t("photos/a.png"), t("photos/b.png"), t("photos/sub/c.png"), t("data/top/0.png")]);
    assert!(preds["predictions"].as_array().unwrap().iter().all(|p| p["label"].is_string()), "{preds}");

    // A broken image in a folder is an error of its own; the others are classified.
    std::fs::write(photos.join("broken.jpg"), b"\xff\xd8\xff\xe0 cut short").unwrap();
    let (code, preds, err) = run(&[&t("photos")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("1 of 4 images could not be read or decoded"), "{err}");
    assert_eq!(preds["predictions"][2]["file"], t("photos/broken.jpg"));
    assert!(preds["predictions"][2]["error"].is_string(), "{preds}");

    // A folder with no image at all.
    std::fs::create_dir_all(tmp.path().join("notes")).unwrap();
    std::fs::write(tmp.path().join("notes/list.txt"), b"nothing").unwrap();
    let (code, _, err) = run(&[&t("notes")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no image in the folders given"), "{err}");
}

/// `--output .` or `..` (the current folder or one above it) is refused with the reason: a model
/// replaces its folder whole, which would leave the shell in a folder that no longer exists.
/// A folder inside it is fine.
#[test]
fn the_current_folder_is_refused_as_output() {
    let tmp = tempfile::tempdir().unwrap();
    let init = |output: &str| {
        Command::new(env!("CARGO_BIN_EXE_vitforge"))
            .args(["init-model", "--config", "tiny", "--labels", "a,b", "--output", output])
            .current_dir(tmp.path())
            .output()
            .unwrap()
    };
    for output in [".", "..", "./"] {
        let out = init(output);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("is the current folder or one above it"), "{output}: {err}");
    }
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none(), "nothing written");
    let out = init("model");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(tmp.path().join("model/config.json").is_file());
}

/// Errors name the path or flag at fault, and an i/o error's text is printed once (not again
/// under "Caused by").
#[test]
fn errors_name_the_path_or_flag_at_fault() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("afile"), "x").unwrap();
    let under_file = tmp.path().join("afile/out").to_string_lossy().into_owned();
    let under_proc = "/proc/vitforge-no-such-folder/out".to_string();
    for output in [&under_file, &under_proc] {
        let (ok, _, err) = vitforge(&["init-model", "--config", "tiny", "--labels", "a,b", "--output", output]);
        assert!(!ok);
        assert!(err.contains(output.as_str()), "{err}");
        assert_eq!(err.matches("os error").count(), 1, "{err}");
    }
    let model = tmp.path().join("m").to_string_lossy().into_owned();
    assert!(vitforge(&["init-model", "--config", "tiny", "--labels", "a,b", "--output", &model]).0);
    let missing = tmp.path().join("no-such-data").to_string_lossy().into_owned();
    let out = tmp.path().join("o").to_string_lossy().into_owned();
    for args in [&["train", "--base-model", &model, "--data", &missing, "--output", &out][..], &["eval", "--model", &model, "--data", &missing]] {
        let (ok, _, err) = vitforge(args);
        assert!(!ok);
        assert!(err.contains(&format!("--data {missing}: no such file or folder")) && !err.contains("os error"), "{args:?}: {err}");
    }
    let (ok, _, err) = vitforge(&["bench", "--probe-classes", "2", "--model", "/nonexistent"]);
    assert!(!ok);
    assert!(err.contains("--model /nonexistent"), "{err}");
    let (ok, _, err) = vitforge(&["bench", "--model", "/nonexistent", "--iters", "1"]);
    assert!(!ok);
    assert!(err.contains("--model /nonexistent"), "{err}");
    let device_cases: [&[&str]; 3] = [
        &["predict", "--device", "gpu", "--model", "m", "x.png"],
        &["eval", "--device", "gpu", "--model", "m", "--data", "d"],
        &["train", "--device", "gpu", "--base-model", "m", "--data", "d", "--output", "o"],
    ];
    for args in device_cases {
        let (ok, _, err) = vitforge(args);
        assert!(!ok);
        assert!(err.contains("--device") && err.contains("'gpu'") && err.contains("auto, cpu or cuda:N"), "{args:?}: {err}");
        assert!(!err.contains("model configuration"), "{args:?}: {err}");
    }
}

/// A model name that is no local folder is looked up on the hub, and the hub's error says that no
/// folder of that name exists either; a name written as a path is only ever a folder.
#[test]
fn a_mistyped_model_folder_is_named_as_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().to_string_lossy().into_owned();
    let env = [("HF_HUB_OFFLINE", "1"), ("HF_HOME", hf_home.as_str())];
    let (ok, _, err) = vitforge_with(&["predict", "--model", "my-modle", "x.jpg"], &env);
    assert!(!ok);
    assert!(err.contains("no folder 'my-modle' here either"), "{err}");
    let (ok, _, err) = vitforge_with(&["eval", "--model", "./my-modle", "--data", "d"], &env);
    assert!(!ok);
    assert!(err.contains("model folder './my-modle' not found") && !err.contains("Hugging Face"), "{err}");
}

/// Global flags (`--log-format`) work before the subcommand as after it; `serve`'s flags before
/// another subcommand are refused (they would be ignored); with no subcommand, `vitforge` still
/// serves, and its log lines on a pipe carry no terminal colour codes.
#[test]
fn global_flags_go_before_the_subcommand_and_no_subcommand_serves() {
    for args in [&["--log-format", "json", "eval", "--model", "./no-such-model", "--data", "d"][..], &["eval", "--log-format", "json", "--model", "./no-such-model", "--data", "d"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_vitforge")).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("model folder './no-such-model' not found"), "{args:?}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vitforge")).args(["--port", "1", "eval", "--model", "m", "--data", "d"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--port is a flag of `serve`, not of `eval`"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vitforge"))
        .args(["--port", "0", "--data-dir"])
        .arg(tmp.path())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in std::io::BufRead::lines(stderr) {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains("vitforge listening") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let log = seen.join("\n");
    assert!(log.contains("vitforge listening"), "serves with no subcommand: {log}");
    assert!(!log.contains('\x1b'), "colour codes in a piped log: {log:?}");
}

/// Every `vitforge` command line in the README's shell blocks uses only flags its subcommand's
/// `--help` lists, and the `train` showcase runs the `auto` recipe the text promises (a
/// hyper-parameter flag such as `--epochs` would switch it to `manual` silently).
#[test]
fn the_readme_command_lines_match_the_help() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut in_sh = false;
    let mut checked = 0;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        let line = line.split(" #").next().unwrap().trim();
        let Some(rest) = line.strip_prefix("vitforge ").or_else(|| line.strip_prefix("target/release/vitforge ")) else { continue };
        if !in_sh {
            continue;
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        let sub = words[0];
        let (ok, help, err) = vitforge(&[sub, "--help"]);
        assert!(ok, "{line}: {err}");
        let flags: Vec<&str> = words.iter().filter(|w| w.starts_with("--")).map(|w| w.split('=').next().unwrap()).collect();
        for flag in &flags {
            // A flag with a value is followed by it, a switch by the end of its line.
            assert!(help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")), "{line}: {flag} is not in `vitforge {sub} --help`");
        }
        if sub == "train" && !flags.contains(&"--recipe") {
            let keeps_auto = ["--data", "--base-model", "--output", "--device", "--seed", "--validation-split", "--time-budget-secs", "--precision"];
            assert!(flags.iter().all(|f| keeps_auto.contains(f)), "{line}: a hyper-parameter flag switches train to the manual recipe");
        }
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} command lines found");
}

/// A random tiny model (classes `top` and `bottom`) in `root/repo`, for a stand-in hub to serve.
fn hub_repo(root: &Path) {
    hub_repo_of(root, support::TINY_CONFIG);
}

/// [`hub_repo`] with the configuration `config`.
fn hub_repo_of(root: &Path, config: &str) {
    std::fs::write(root.join("config.json"), config).unwrap();
    let t = |p: &str| root.join(p).to_string_lossy().into_owned();
    let (ok, _, err) = vitforge(&["init-model", "--config", &t("config.json"), "--labels", "top,bottom", "--output", &t("repo")]);
    assert!(ok, "{err}");
}

/// The name of the blob the hub cache keeps the file `served` in (after the etag the stand-in
/// hub sends for it).
fn blob_of(served: &Path) -> String {
    support::hub::etag_of(&std::fs::read(served).unwrap())
}

/// The bytes of the partial download (hf-hub's `.part` file) of blob `blob` of hub model `repo`
/// in the hub cache `hf_home`, when there is one.
fn partial_download(hf_home: &Path, repo: &str, blob: &str) -> Option<u64> {
    let path = hf_home.join(format!("hub/models--{}/blobs/{blob}.part", repo.replace('/', "--")));
    std::fs::metadata(path).ok().map(|m| m.len())
}

/// Waits, a minute at most, until `child`'s download of hub model `repo` into `hf_home` has
/// received bytes of blob `blob` (the weights'). Any partial file would not do: the config's
/// is one too while it downloads, and a signal sent then, before the weights' download began,
/// left no partial file behind.
fn wait_for_download(hf_home: &Path, repo: &str, blob: &str, child: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while partial_download(hf_home, repo, blob).is_none_or(|len| len == 0) {
        assert!(std::time::Instant::now() < deadline, "no download under way within a minute");
        assert!(child.try_wait().unwrap().is_none(), "the command ended before its download began");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// `train --base-model owner/name` downloads the model from the hub (`HF_ENDPOINT`, a stand-in
/// here) into the hub cache (`HF_HOME`), then trains; `predict` then finds it in the cache with
/// the hub out of reach (`HF_HUB_OFFLINE=1`), and a model the hub lacks is an error naming it.
#[test]
fn a_hub_base_model_is_downloaded_into_the_cache_once() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_string_lossy().into_owned();
    hub_repo(tmp.path());
    let hub = support::hub::FakeHub::serve("acme/tiny-vit", &tmp.path().join("repo"), 4, std::time::Duration::from_millis(20));
    let hf_home = t("hf");
    let online = hub.env(Path::new(&hf_home));
    write_dataset(&tmp.path().join("data"), 6);
    let (ok, out, err) = vitforge_with(
        &["train", "--data", &t("data"), "--base-model", "acme/tiny-vit", "--output", &t("model"), "--epochs", "1", "--batch-size", "4"],
        &online,
    );
    assert!(ok, "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(summary["epochs_run"], 1, "{summary}");
    let weights = hub.requests_for("model.safetensors");
    assert_eq!(weights, ["model.safetensors 0-0", "model.safetensors 0-"], "its size, then the file whole");
    let cached = support::files_under(&tmp.path().join("hf").join("hub"));
    assert!(cached.iter().any(|p| p.ends_with(format!("snapshots/{}/model.safetensors", "0123456789abcdef0123456789abcdef01234567"))), "{cached:?}");

    let offline = [("HF_HOME", hf_home.as_str()), ("HF_HUB_OFFLINE", "1")];
    let (ok, out, err) = vitforge_with(&["predict", "--model", "acme/tiny-vit", &t("data/top/0.png")], &offline);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["predictions"].as_array().unwrap().len(), 1);
    assert_eq!(hub.requests_for("model.safetensors").len(), 2, "nothing downloaded again");

    let (ok, _, err) = vitforge_with(&["predict", "--model", "acme/other", &t("data/top/0.png")], &online);
    assert!(!ok);
    assert!(err.contains("acme/other") && err.contains("config.json"), "{err}");
}

/// Ctrl-C while `train` downloads its base model from the hub stops the download there (status
/// 130, saying so) with what came in kept in the hub cache, and the same command run again
/// resumes the download from that byte, then trains.
#[test]
fn ctrl_c_stops_a_hub_download_and_the_next_run_resumes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_string_lossy().into_owned();
    // The larger test model: enough bytes for progress between the pieces.
    hub_repo_of(tmp.path(), support::SLOW_CONFIG);
    let size = std::fs::metadata(tmp.path().join("repo/model.safetensors")).unwrap().len();
    // 30 pieces 200 ms apart: six seconds for the whole file.
    let hub = support::hub::FakeHub::serve("acme/slow-vit", &tmp.path().join("repo"), 30, std::time::Duration::from_millis(200));
    write_dataset(&tmp.path().join("data"), 4);
    let hf_home = tmp.path().join("hf");
    let run = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vitforge"));
        cmd.args(["train", "--data", &t("data"), "--base-model", "acme/slow-vit", "--output", &t("model"), "--epochs", "1", "--batch-size", "4"])
            .env("RUST_LOG", "warn")
            .envs(hub.env(&hf_home));
        cmd
    };

    let mut child = run().stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let weights = blob_of(&tmp.path().join("repo/model.safetensors"));
    wait_for_download(&hf_home, "acme/slow-vit", &weights, &mut child);
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted while downloading acme/slow-vit") && err.contains("resumes"), "{err}");
    let kept = partial_download(&hf_home, "acme/slow-vit", &weights).expect("the partial download is kept");
    assert!(kept > 0 && kept < size, "{kept} of {size} bytes");
    assert!(!tmp.path().join("model").exists());

    let out = run().output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let requests = hub.requests_for("model.safetensors");
    assert_eq!(requests.last().map(String::as_str), Some(format!("model.safetensors {kept}-").as_str()), "resumed from byte {kept}: {requests:?}");
    assert!(tmp.path().join("model/model.safetensors").is_file());
}

/// Two processes that need the same hub model at once download it once: the second waits for
/// the first's download (whose lock hf-hub gives up on after five seconds) and takes the file
/// from the cache, instead of failing.
#[test]
fn two_processes_wait_for_one_download_of_a_hub_model() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_string_lossy().into_owned();
    hub_repo_of(tmp.path(), support::SLOW_CONFIG);
    // 40 pieces 250 ms apart: ten seconds for the whole file, twice hf-hub's wait for a lock.
    let hub = support::hub::FakeHub::serve("acme/slow-vit", &tmp.path().join("repo"), 40, std::time::Duration::from_millis(250));
    write_dataset(&tmp.path().join("data"), 1);
    let hf_home = tmp.path().join("hf");
    let predict = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vitforge"));
        cmd.args(["predict", "--model", "acme/slow-vit", &t("data/top/0.png")])
            .env("RUST_LOG", "warn")
            .envs(hub.env(&hf_home))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd.spawn().unwrap()
    };

    let mut first = predict();
    wait_for_download(&hf_home, "acme/slow-vit", &blob_of(&tmp.path().join("repo/model.safetensors")), &mut first);
    let second = predict();
    for (which, child) in [("first", first), ("second", second)] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{which}: {}", String::from_utf8_lossy(&out.stderr));
        let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(answer["predictions"].as_array().map(Vec::len), Some(1), "{which}: {answer}");
    }
    let downloads: Vec<String> = hub.requests_for("model.safetensors").into_iter().filter(|r| !r.ends_with(" 0-0")).collect();
    assert_eq!(downloads, ["model.safetensors 0-"], "the file was sent once");
}

/// A connection to the hub lost in the middle of the weights is resumed from the byte it
/// reached (a range request), and the model loads, instead of the command failing.
#[test]
fn a_download_cut_short_resumes_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_string_lossy().into_owned();
    hub_repo_of(tmp.path(), support::SLOW_CONFIG);
    let hub = support::hub::FakeHub::serve_cutting_once("acme/slow-vit", &tmp.path().join("repo"), 8, std::time::Duration::from_millis(20), 3);
    write_dataset(&tmp.path().join("data"), 1);
    let (ok, out, err) = vitforge_with(&["predict", "--model", "acme/slow-vit", &t("data/top/0.png")], &hub.env(&tmp.path().join("hf")));
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["predictions"].as_array().map(Vec::len), Some(1));
    let requests = hub.requests_for("model.safetensors");
    let [size, whole, rest] = &requests[..] else { panic!("its size, the file, then the rest: {requests:?}") };
    assert_eq!((size.as_str(), whole.as_str()), ("model.safetensors 0-0", "model.safetensors 0-"));
    let from = support::hub::FakeHub::range_start(rest).unwrap_or(0);
    assert!(from > 0, "resumed from where the first stopped: {requests:?}");
}

/// A gated or private hub model: without a token the error says to set `HF_TOKEN`; with it in
/// `HF_TOKEN` the model downloads (the token file of `huggingface-cli login` is not needed).
#[test]
fn a_private_hub_model_needs_its_token_in_hf_token() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_string_lossy().into_owned();
    hub_repo(tmp.path());
    let hub = support::hub::FakeHub::serve_private("acme/private-vit", &tmp.path().join("repo"), Some("hf_secret"), 1, std::time::Duration::ZERO);
    write_dataset(&tmp.path().join("data"), 2);
    let predict = |token: &str| {
        let mut env = hub.env(&tmp.path().join("hf"));
        env.push(("HF_TOKEN".into(), token.into()));
        vitforge_with(&["predict", "--model", "acme/private-vit", &t("data/top/0.png")], &env)
    };
    let (ok, _, err) = predict("");
    assert!(!ok);
    assert!(err.contains("acme/private-vit") && err.contains("401") && err.contains("HF_TOKEN"), "{err}");
    let (ok, _, err) = predict("hf_wrong");
    assert!(!ok && err.contains("HF_TOKEN"), "{err}");
    assert!(!err.contains("hf_wrong"), "the token is never shown: {err}");
    let (ok, out, err) = predict("hf_secret");
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["predictions"].as_array().unwrap().len(), 1);
}

/// Splits a model folder's `model.safetensors` into two shards and the index naming them, as
/// `save_pretrained` does for a large model.
fn shard(dir: &Path) {
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let subset: std::collections::HashMap<String, candle_core::Tensor> = part.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        candle_core::safetensors::save(&subset, dir.join(&file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
}

/// A sharded checkpoint (`model.safetensors.index.json` and its shards) loads from a folder and
/// from the hub, where each shard is downloaded into the cache, and gives the same predictions as
/// the model it was split from.
#[test]
fn a_sharded_checkpoint_loads_from_a_folder_and_from_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_string_lossy().into_owned();
    hub_repo(tmp.path());
    write_dataset(&tmp.path().join("data"), 2);
    let image = t("data/top/0.png");
    let scores = |out: &str| serde_json::from_str::<Value>(out).unwrap()["predictions"][0]["top_k"].clone();
    let (ok, whole, err) = vitforge(&["predict", "--model", &t("repo"), &image]);
    assert!(ok, "{err}");
    shard(&tmp.path().join("repo"));
    let (ok, out, err) = vitforge(&["predict", "--model", &t("repo"), &image]);
    assert!(ok, "{err}");
    assert_eq!(scores(&out), scores(&whole), "the shards hold the same model");

    let hub = support::hub::FakeHub::serve("acme/sharded-vit", &tmp.path().join("repo"), 1, std::time::Duration::ZERO);
    let hf_home = t("hf");
    let online = hub.env(Path::new(&hf_home));
    let (ok, out, err) = vitforge_with(&["predict", "--model", "acme/sharded-vit", &image], &online);
    assert!(ok, "{err}");
    assert_eq!(scores(&out), scores(&whole));
    assert_eq!(hub.requests_for("model-00002-of-00002.safetensors"), ["model-00002-of-00002.safetensors 0-0", "model-00002-of-00002.safetensors 0-"]);
    // Cached whole: offline, it loads without the hub.
    let (ok, out, err) = vitforge_with(&["predict", "--model", "acme/sharded-vit", &image], &[("HF_HOME", hf_home.as_str()), ("HF_HUB_OFFLINE", "1")]);
    assert!(ok, "{err}");
    assert_eq!(scores(&out), scores(&whole));
}
