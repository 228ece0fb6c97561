//! Every trainable parameter gets a gradient, and frozen ones get none.

use candle_core::{Device, Tensor};
use vitforge::model::Vit;
use vitforge::model::TrainableSet;
use vitforge::model::vit::cross_entropy;

use crate::synth::tiny_model;

fn grads_for(set: TrainableSet, batch: usize) -> Vec<(String, Option<f32>)> {
    let model = tiny_model(&["a", "b", "c"], 5);
    let layers = model.cfg.num_hidden_layers;
    let vit = Vit::new(&model.cfg, &model.params, &|n| set.contains(n, layers)).unwrap();
    let pixels = Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), &Device::Cpu).unwrap();
    let targets: Vec<u32> = (0..batch as u32).map(|i| i % 3).collect();
    let loss = cross_entropy(&vit.forward(&pixels).unwrap(), &targets, 0.1, None).unwrap();
    let grads = loss.backward().unwrap();
    model
        .params
        .iter()
        .map(|(name, var)| {
            let g = grads.get(var.as_tensor()).map(|g| g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap());
            (name.clone(), g)
        })
        .collect()
}

#[test]
fn full_mode_gives_every_parameter_a_nonzero_gradient_at_batch_1_and_4() {
    for batch in [1, 4] {
        let grads = grads_for(TrainableSet::All, batch);
        assert!(grads.len() > 30);
        for (name, g) in grads {
            let g = g.unwrap_or_else(|| panic!("batch {batch}: no gradient for {name}"));
            assert!(g > 0.0, "batch {batch}: zero gradient for {name}");
        }
    }
}

#[test]
fn head_only_mode_gives_gradients_to_the_head_alone() {
    for (name, g) in grads_for(TrainableSet::HeadOnly, 3) {
        assert_eq!(g.is_some(), name.starts_with("classifier."), "{name}");
    }
}

#[test]
fn last_layers_mode_trains_the_last_layer_final_norm_and_head() {
    for (name, g) in grads_for(TrainableSet::LastLayers(1), 3) {
        let expect = name.starts_with("classifier.") || name.starts_with("vit.layernorm.") || name.starts_with("vit.encoder.layer.1.");
        assert_eq!(g.is_some(), expect, "{name}");
        if let Some(g) = g {
            assert!(g > 0.0, "zero gradient for {name}");
        }
    }
}

/// The hand-written backward of the fast CPU path gives the same loss and gradients as candle's
/// autograd through the reference forward, in every mode, with and without the biases of Q, K
/// and V (whose gradients the fast path computes in one product).
#[test]
fn fast_path_agrees_with_autograd_in_every_mode() {
    let mut cfg = crate::synth::tiny_config();
    cfg.qkv_bias = false;
    let labels = ["a", "b", "c"].map(String::from);
    let without = vitforge::model::LoadedModel::random(&cfg, &labels, 5, &Device::Cpu).unwrap();
    assert!(!without.params.iter().any(|(name, _)| name.contains("query.bias")));
    for model in [tiny_model(&["a", "b", "c"], 5), without] {
        fast_path_agrees_with_autograd(&model);
    }
}

fn fast_path_agrees_with_autograd(model: &vitforge::model::LoadedModel) {
    use vitforge::model::Boundary;
    use vitforge::model::network::{Objective, frozen_forward, loss_and_grads, reference_loss_and_grads};
    let layers = model.cfg.num_hidden_layers;
    let pixels = Tensor::randn(0f32, 1.0, (3, 3, 32, 32), &Device::Cpu).unwrap();
    let targets = [0u32, 2, 1];
    for set in [TrainableSet::All, TrainableSet::LastLayers(1), TrainableSet::HeadOnly] {
        let b = set.boundary(layers);
        let frozen = Vit::frozen(&model.cfg, &model.params).unwrap();
        let input = frozen_forward(&frozen, b, &pixels).unwrap();
        let vit = Vit::new(&model.cfg, &model.params, &|n| set.contains(n, layers)).unwrap();
        // Label smoothing and class weights, so both paths' weighted mean is checked too.
        let objective = Objective { targets: &targets, label_smoothing: 0.1, class_weights: Some(&[0.5f32, 3.0, 1.0][..]) };
        let (fast_loss, fast) = loss_and_grads(&vit, &model.params, set, b, &input, objective, None).unwrap();
        let input_ref = match b {
            Boundary::Pixels => pixels.clone(),
            Boundary::Layer(k) => frozen.encode_reference(frozen.embed_reference(&pixels).unwrap(), 0..k, None).unwrap(),
            Boundary::Features => frozen.features_reference(&pixels).unwrap(),
        };
        let diff = (&input - &input_ref).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{set:?}: frozen part differs by {diff}");
        let (ref_loss, reference) = reference_loss_and_grads(&vit, &model.params, set, b, &input_ref, objective, None).unwrap();
        // The weights matter: without them, the loss differs.
        let (plain_loss, _) = loss_and_grads(&vit, &model.params, set, b, &input, Objective { class_weights: None, ..objective }, None).unwrap();
        assert!((plain_loss - fast_loss).abs() > 1e-4, "{set:?}: class weights changed nothing");
        assert!((fast_loss - ref_loss).abs() < 1e-5, "{set:?}: {fast_loss} vs {ref_loss}");
        assert_eq!(fast.keys().collect::<Vec<_>>(), reference.keys().collect::<Vec<_>>(), "{set:?}");
        for (name, g) in &fast {
            let r = &reference[name];
            let scale = r.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
            let diff = (g - r).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff / scale < 1e-3, "{set:?} {name}: {diff} (scale {scale})");
        }
    }
}

/// Mixed precision: with bf16 products (f32 master weights, f32 accumulation and statistics),
/// the fast path's loss and gradients agree with autograd's through the reference path in bf16,
/// and both stay close to the f32 gradients (within bf16's rounding), in every mode; and bf16
/// does round (its gradients are not the f32 ones).
#[test]
fn bf16_gradients_agree_across_paths_and_with_f32_in_every_mode() {
    use vitforge::model::network::{Objective, frozen_forward, loss_and_grads, reference_loss_and_grads};
    use vitforge::model::{Boundary, Precision};
    let model = tiny_model(&["a", "b", "c"], 5);
    let layers = model.cfg.num_hidden_layers;
    // Fixed pixels, so the bounds below are met or missed the same way on every run.
    let pixels: Vec<f32> = (0..3 * 3 * 32 * 32).map(|i| (i as f32 * 0.618).sin() * 1.5).collect();
    let pixels = Tensor::from_vec(pixels, (3, 3, 32, 32), &Device::Cpu).unwrap();
    let targets = [0u32, 2, 1];
    let objective = Objective { targets: &targets, label_smoothing: 0.1, class_weights: None };
    // max |a − b| / max |b|, and the relative L2 error ‖a − b‖ / ‖b‖.
    let rel = |a: &Tensor, b: &Tensor| {
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
        let d = (a - b).unwrap();
        let max = d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() / scale;
        let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        (max, norm(&d) / norm(b).max(1e-6))
    };
    for set in [TrainableSet::All, TrainableSet::LastLayers(1), TrainableSet::HeadOnly] {
        let b = set.boundary(layers);
        let at = |p: Precision| {
            let frozen = Vit::frozen(&model.cfg, &model.params).unwrap().with_precision(p);
            let input = frozen_forward(&frozen, b, &pixels).unwrap();
            let input_ref = match b {
                Boundary::Pixels => pixels.clone(),
                Boundary::Layer(k) => frozen.encode_reference(frozen.embed_reference(&pixels).unwrap(), 0..k, None).unwrap(),
                Boundary::Features => frozen.features_reference(&pixels).unwrap(),
            };
            let (inp_max, _) = rel(&input, &input_ref);
            assert!(inp_max < 2e-2, "{set:?} {p:?}: frozen part differs across paths by {inp_max}");
            let vit = Vit::new(&model.cfg, &model.params, &|n| set.contains(n, layers)).unwrap().with_precision(p);
            let fast = loss_and_grads(&vit, &model.params, set, b, &input, objective, None).unwrap();
            let reference = reference_loss_and_grads(&vit, &model.params, set, b, &input_ref, objective, None).unwrap();
            (fast, reference)
        };
        let ((f32_loss, f32_grads), (_, f32_reference)) = at(Precision::F32);
        let ((loss, fast), (ref_loss, reference)) = at(Precision::Bf16);
        assert!((loss - ref_loss).abs() < 1e-3 * ref_loss.abs(), "{set:?}: bf16 loss {loss} vs autograd {ref_loss}");
        assert!((loss - f32_loss).abs() < 1e-2 * f32_loss.abs(), "{set:?}: bf16 loss {loss} vs f32 {f32_loss}");
        let (mut rounded, mut rounded_ref) = (false, false);
        for (name, g) in &fast {
            if name.ends_with("key.bias") {
                // Zero in exact arithmetic (softmax ignores a shift of a score row): in either
                // precision its value is rounding noise, so there is nothing to compare.
                continue;
            }
            let (max, l2) = rel(g, &reference[name]);
            let (max32, l2_32) = rel(g, &f32_grads[name]);
            eprintln!("{set:?} {name}: vs autograd bf16 max {max:.2e} l2 {l2:.2e}; vs f32 max {max32:.2e} l2 {l2_32:.2e}");
            assert!(l2 < 3e-2 && max < 6e-2, "{set:?} {name}: bf16 fast path vs autograd: l2 {l2}, max {max}");
            assert!(l2_32 < 3e-2 && max32 < 6e-2, "{set:?} {name}: bf16 vs f32: l2 {l2_32}, max {max32}");
            rounded |= l2_32 > 1e-4;
            rounded_ref |= rel(&reference[name], &f32_reference[name]).1 > 1e-4;
        }
        assert!(rounded, "{set:?}: the fast path's bf16 gradients equal the f32 ones, nothing was rounded");
        assert!(rounded_ref, "{set:?}: autograd's bf16 gradients equal the f32 ones, nothing was rounded");
    }
}
