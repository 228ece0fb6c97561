use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use vitforge::model::io::write_safetensors;
use vitforge::model::{LoadedModel, ModelError, ModelSource, Vit};

use crate::synth::{tiny_config, tiny_model};

fn forward(model: &LoadedModel, pixels: &Tensor) -> Vec<Vec<f32>> {
    Vit::frozen(&model.cfg, &model.params).unwrap().forward(pixels).unwrap().to_vec2().unwrap()
}

#[test]
fn saved_model_reloads_with_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&["a", "b", "c"], 1);
    model.save(&dir.path().join("m")).unwrap();
    for f in ["config.json", "model.safetensors", "preprocessor_config.json"] {
        assert!(dir.path().join("m").join(f).is_file(), "{f}");
    }
    let back = LoadedModel::load(&ModelSource::Dir(dir.path().join("m")), None, &Device::Cpu, 0).unwrap();
    assert_eq!(back.cfg.labels, vec!["a", "b", "c"]);
    assert!(!back.report.head_reset);
    let pixels = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    assert_eq!(forward(&model, &pixels), forward(&back, &pixels));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("m/config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "ViTForImageClassification");
    assert_eq!(config["id2label"]["2"], "c");
    assert_eq!(config["label2id"]["b"], 1);
}

#[test]
fn new_labels_keep_the_backbone_and_replace_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&["a", "b", "c"], 1);
    model.save(&dir.path().join("m")).unwrap();
    let labels = vec!["x".to_string(), "y".to_string()];
    let back = LoadedModel::load(&ModelSource::Dir(dir.path().join("m")), Some(&labels), &Device::Cpu, 0).unwrap();
    assert!(back.report.head_reset);
    assert_eq!(back.cfg.labels, labels);
    let pixels = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let f1 = Vit::frozen(&model.cfg, &model.params).unwrap().features(&pixels).unwrap();
    let f2 = Vit::frozen(&back.cfg, &back.params).unwrap().features(&pixels).unwrap();
    assert_eq!(f1.to_vec2::<f32>().unwrap(), f2.to_vec2::<f32>().unwrap());
    assert_eq!(forward(&back, &pixels)[0].len(), 2);
}

/// Writes `tensors` with a config into `dir` as a checkpoint folder.
fn write_checkpoint(dir: &std::path::Path, config: &serde_json::Value, tensors: &BTreeMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    write_safetensors(&dir.join("model.safetensors"), tensors).unwrap();
}

#[test]
fn a_1000_class_head_and_a_bare_backbone_both_load() {
    let dir = tempfile::tempdir().unwrap();
    let labels: Vec<String> = (0..1000).map(|i| format!("imagenet_{i}")).collect();
    let big = LoadedModel::random(&tiny_config(), &labels, 3, &Device::Cpu).unwrap();
    let snap = big.params.snapshot().unwrap();
    write_checkpoint(&dir.path().join("imagenet"), &big.cfg.to_json(), &snap);
    let mine = vec!["cat".to_string(), "dog".to_string()];
    let m = LoadedModel::load(&ModelSource::Dir(dir.path().join("imagenet")), Some(&mine), &Device::Cpu, 0).unwrap();
    assert!(m.report.head_reset);
    assert_eq!(m.cfg.labels, mine);

    // A bare ViTModel: no "vit." prefix, no classifier, plus a pooler we do not use.
    let mut bare: BTreeMap<String, Tensor> = snap
        .iter()
        .filter(|(k, _)| !k.starts_with("classifier."))
        .map(|(k, v)| (k.strip_prefix("vit.").unwrap().to_string(), v.clone()))
        .collect();
    bare.insert("pooler.dense.weight".into(), Tensor::zeros((32, 32), candle_core::DType::F32, &Device::Cpu).unwrap());
    let mut cfg = big.cfg.to_json();
    cfg.as_object_mut().unwrap().remove("id2label");
    cfg.as_object_mut().unwrap().remove("label2id");
    write_checkpoint(&dir.path().join("bare"), &cfg, &bare);
    let m = LoadedModel::load(&ModelSource::Dir(dir.path().join("bare")), Some(&mine), &Device::Cpu, 0).unwrap();
    assert_eq!(m.report.unused, vec!["vit.pooler.dense.weight"]);
    let err = LoadedModel::load(&ModelSource::Dir(dir.path().join("bare")), None, &Device::Cpu, 0).err().unwrap();
    assert!(err.to_string().contains("no classification head"), "{err}");
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&["a", "b"], 1);
    let mut snap = model.params.snapshot().unwrap();
    snap.remove("vit.encoder.layer.1.attention.attention.key.weight");
    write_checkpoint(&dir.path().join("m"), &model.cfg.to_json(), &snap);
    let err = LoadedModel::load(&ModelSource::Dir(dir.path().join("m")), None, &Device::Cpu, 0).err().unwrap();
    assert!(matches!(err, ModelError::Weights(_)));
    assert!(err.to_string().contains("vit.encoder.layer.1.attention.attention.key.weight"), "{err}");

    let mut snap = model.params.snapshot().unwrap();
    snap.insert("vit.layernorm.weight".into(), Tensor::ones(7, candle_core::DType::F32, &Device::Cpu).unwrap());
    write_checkpoint(&dir.path().join("m2"), &model.cfg.to_json(), &snap);
    let err = LoadedModel::load(&ModelSource::Dir(dir.path().join("m2")), None, &Device::Cpu, 0).err().unwrap();
    assert!(err.to_string().contains("vit.layernorm.weight"), "{err}");
}

#[test]
fn pytorch_bin_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not read").unwrap();
    let err = LoadedModel::load(&ModelSource::Dir(dir.path().to_path_buf()), None, &Device::Cpu, 0).err().unwrap();
    assert!(err.to_string().contains("pytorch_model.bin"), "{err}");
    assert!(err.to_string().contains("safe_serialization"), "{err}");
}

#[test]
fn offline_hub_without_cache_names_the_id_and_the_way_out() {
    let cache = tempfile::tempdir().unwrap();
    // SAFETY: this test binary does not read these variables from other threads concurrently
    // except through hf-hub in this very test.
    unsafe {
        std::env::set_var("HF_HOME", cache.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let source = ModelSource::parse("google/vit-base-patch16-224").unwrap();
    assert_eq!(source, ModelSource::Hub("google/vit-base-patch16-224".into()));
    let err = LoadedModel::load(&source, None, &Device::Cpu, 0).err().unwrap().to_string();
    assert!(err.contains("google/vit-base-patch16-224"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    assert!(err.contains("local folder"), "{err}");
}
