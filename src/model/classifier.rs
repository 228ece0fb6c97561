//! Inference: a loaded model turned into probabilities for images.

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::Serialize;

use super::{LoadedModel, ModelError, ModelSource, PreprocessorConfig, Vit, VitConfig};

/// A label and its probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scored {
    pub label: String,
    pub score: f32,
}

/// A model ready for inference: frozen weights, its preprocessing and its labels.
pub struct Classifier {
    vit: Vit,
    pre: PreprocessorConfig,
    device: Device,
}

impl Classifier {
    /// Wraps a loaded model.
    pub fn new(model: &LoadedModel, device: &Device) -> Result<Self, ModelError> {
        Ok(Self { vit: Vit::frozen(&model.cfg, &model.params)?, pre: model.preprocessor.clone(), device: device.clone() })
    }

    /// Loads a model folder (or hub id) with its own labels.
    pub fn load(source: &ModelSource, device: &Device) -> Result<Self, ModelError> {
        let model = LoadedModel::load(source, None, device, 0)?;
        Self::new(&model, device)
    }

    pub fn config(&self) -> &VitConfig {
        self.vit.config()
    }

    pub fn labels(&self) -> &[String] {
        &self.vit.config().labels
    }

    pub fn preprocessor(&self) -> &PreprocessorConfig {
        &self.pre
    }

    /// Pixel values of one image, as `ViTImageProcessor` makes them.
    pub fn preprocess(&self, img: &RgbImage) -> Result<Vec<f32>, ModelError> {
        self.pre.pixel_values(img)
    }

    /// Softmax probabilities for a batch of preprocessed images, in input order.
    pub fn probabilities(&self, pixels: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, ModelError> {
        if pixels.is_empty() {
            return Ok(vec![]);
        }
        let (h, w) = self.pre.size;
        let mut flat = Vec::with_capacity(pixels.len() * 3 * h * w);
        for p in pixels {
            if p.len() != 3 * h * w {
                return Err(ModelError::Input(format!("pixel vector of {} values, expected {}", p.len(), 3 * h * w)));
            }
            flat.extend_from_slice(p);
        }
        let batch = Tensor::from_vec(flat, (pixels.len(), 3, h, w), &self.device)?;
        super::vit::probabilities(&self.vit.forward(&batch)?)
    }

    /// The `k` most probable labels, most probable first.
    pub fn top_k(&self, probs: &[f32], k: usize) -> Vec<Scored> {
        let mut idx: Vec<usize> = (0..probs.len()).collect();
        idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        idx.into_iter().take(k).map(|i| Scored { label: self.labels()[i].clone(), score: probs[i] }).collect()
    }
}
