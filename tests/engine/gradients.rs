//! Every trainable parameter gets a gradient, and frozen ones get none.

use candle_core::{Device, Tensor};
use vitforge::model::Vit;
use vitforge::model::vit::{TrainableSet, cross_entropy};

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
