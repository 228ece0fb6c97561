//! Inference: a loaded model turned into probabilities and top-k labels for images. `/predict`
//! and `vitforge predict` both go through [`Classifier::prepare`] and
//! [`Classifier::predictions`] (the service batches the forward pass between the two on its
//! predictor thread; the command line calls [`Classifier::classify`]).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use serde::Serialize;

use super::{LoadedModel, ModelError, ModelSource, Precision, PreprocessorConfig, Vit, VitConfig};
use crate::imaging::{decode_cost_of, decode_rgb};

/// A label and its probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scored {
    pub label: String,
    pub score: f32,
}

/// One image's answer: the most probable label, its probability, and the `k` most probable.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub label: String,
    pub score: f32,
    pub top_k: Vec<Scored>,
}

/// Why images could not be classified.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    /// One image is unusable (1-based `index` and its name in the request).
    #[error("image {index} ('{name}'): {reason}")]
    Image { index: usize, name: String, reason: String },
    /// The caller gave up (its client went away).
    #[error("cancelled")]
    Cancelled,
    /// Decoding needs more of the memory budget than is free (not the image's fault).
    #[error("{0}")]
    Busy(String),
    /// The images need more memory at once than the whole budget for work in flight: retrying
    /// cannot help.
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// A model ready for inference: frozen weights, its preprocessing and its labels.
pub struct Classifier {
    vit: Vit,
    pre: PreprocessorConfig,
    device: Device,
}

impl Classifier {
    /// Wraps a loaded model, to run its products at `precision`. The model is taken, not
    /// borrowed: in bf16 its weights are converted and packed here once for every forward pass
    /// to come (see [`Vit::packed_for_inference`]), so they must not change afterwards.
    pub fn new(model: LoadedModel, device: &Device, precision: Precision) -> Result<Self, ModelError> {
        let vit = Vit::frozen(&model.cfg, &model.params)?.with_precision(precision).packed_for_inference()?;
        Ok(Self { vit, pre: model.preprocessor, device: device.clone() })
    }

    /// Loads a model folder (or hub id) with its own labels.
    pub fn load(source: &ModelSource, device: &Device, precision: Precision) -> Result<Self, ModelError> {
        let model = LoadedModel::load(source, None, device, 0)?;
        Self::new(model, device, precision)
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

    /// Bytes of one image's pixel values (3 × height × width floats).
    pub fn input_bytes(&self) -> u64 {
        (3 * self.pre.size.0 * self.pre.size.1 * std::mem::size_of::<f32>()) as u64
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

    /// Probabilities with test-time flip: each image's are the mean of its own and those of its
    /// mirror image (left-right), from one forward pass of twice the batch. Without `flip`, as
    /// [`Classifier::probabilities`].
    pub fn probabilities_tta(&self, pixels: &[Vec<f32>], flip: bool) -> Result<Vec<Vec<f32>>, ModelError> {
        if !flip {
            return self.probabilities(pixels);
        }
        Ok(mean_of_halves(&self.probabilities(&self.with_mirrors(pixels.to_vec()))?))
    }

    /// The images' pixel values followed by those of their left-right mirror images (channels ×
    /// height × width each), the batch of a test-time flip: [`mean_of_halves`] of its
    /// probabilities is the answer.
    pub fn with_mirrors(&self, mut pixels: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        let mirrors: Vec<Vec<f32>> = pixels
            .iter()
            .map(|p| {
                let mut m = p.clone();
                self.pre.mirror(&mut m);
                m
            })
            .collect();
        pixels.extend(mirrors);
        pixels
    }

    /// The `k` most probable labels, most probable first.
    pub fn top_k(&self, probs: &[f32], k: usize) -> Vec<Scored> {
        let mut idx: Vec<usize> = (0..probs.len()).collect();
        idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        idx.into_iter().take(k).map(|i| Scored { label: self.labels()[i].clone(), score: probs[i] }).collect()
    }

    /// Decodes (within `max_pixels`) and preprocesses named encoded images, in parallel on the
    /// rayon pool; stops early when `cancel` is set.
    pub fn prepare<B: AsRef<[u8]> + Sync>(&self, images: &[(String, B)], max_pixels: u64, cancel: &AtomicBool) -> Result<Vec<Vec<f32>>, ClassifyError> {
        images.par_iter().enumerate().map(|(i, image)| self.prepare_one(i, image, max_pixels, cancel)).collect()
    }

    /// [`Classifier::prepare`] one image at a time (when the memory for parallel decodes is not
    /// there).
    pub fn prepare_serially<B: AsRef<[u8]>>(&self, images: &[(String, B)], max_pixels: u64, cancel: &AtomicBool) -> Result<Vec<Vec<f32>>, ClassifyError> {
        images.iter().enumerate().map(|(i, image)| self.prepare_one(i, image, max_pixels, cancel)).collect()
    }

    /// Decodes and preprocesses image `i` of a request.
    fn prepare_one<B: AsRef<[u8]>>(&self, i: usize, (name, bytes): &(String, B), max_pixels: u64, cancel: &AtomicBool) -> Result<Vec<f32>, ClassifyError> {
        if cancel.load(Ordering::Relaxed) {
            return Err(ClassifyError::Cancelled);
        }
        let bad = |reason: String| ClassifyError::Image { index: i + 1, name: name.clone(), reason };
        let img = decode_rgb(bytes.as_ref(), max_pixels).map_err(|e| bad(e.to_string()))?;
        self.preprocess(&img).map_err(|e| bad(e.to_string()))
    }

    /// The most memory [`Classifier::prepare`] holds for these images at once: the decodes that
    /// can run together (`parallel` of them: one per thread of the pool, the largest first; 1 for
    /// [`Classifier::prepare_serially`]) and every image's pixel values.
    pub fn prepare_cost<B: AsRef<[u8]>>(&self, images: &[(String, B)], max_pixels: u64, parallel: usize) -> u64 {
        let mut decodes: Vec<u64> = images.iter().map(|(_, b)| decode_cost_of(b.as_ref(), max_pixels)).collect();
        decodes.sort_unstable_by(|a, b| b.cmp(a));
        let together: u64 = decodes.iter().take(parallel.max(1)).sum();
        together + self.input_bytes() * images.len() as u64
    }

    /// The answer for each image's probabilities, with the `top_k` most probable labels (at
    /// least one, at most every label).
    pub fn predictions(&self, probs: &[Vec<f32>], top_k: usize) -> Vec<Prediction> {
        let k = top_k.clamp(1, self.labels().len().max(1));
        probs
            .iter()
            .map(|p| {
                let top_k = self.top_k(p, k);
                Prediction { label: top_k[0].label.clone(), score: top_k[0].score, top_k }
            })
            .collect()
    }

    /// Classifies named encoded images on the calling thread, `batch` images per forward pass
    /// (with test-time `flip`, see [`Classifier::probabilities_tta`]).
    pub fn classify<B: AsRef<[u8]> + Sync>(&self, images: &[(String, B)], top_k: usize, max_pixels: u64, batch: usize, flip: bool) -> Result<Vec<Prediction>, ClassifyError> {
        let never = AtomicBool::new(false);
        let mut out = Vec::with_capacity(images.len());
        for (c, chunk) in images.chunks(batch.max(1)).enumerate() {
            let pixels = self.prepare(chunk, max_pixels, &never).map_err(|e| match e {
                ClassifyError::Image { index, name, reason } => ClassifyError::Image { index: index + c * batch.max(1), name, reason },
                other => other,
            })?;
            out.extend(self.predictions(&self.probabilities_tta(&pixels, flip)?, top_k));
        }
        Ok(out)
    }
}

/// The element-wise mean of the first and second half of `rows` (row i with row i + n/2).
pub fn mean_of_halves(rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let (first, second) = rows.split_at(rows.len() / 2);
    first.iter().zip(second).map(|(a, b)| a.iter().zip(b).map(|(x, y)| 0.5 * (x + y)).collect()).collect()
}
