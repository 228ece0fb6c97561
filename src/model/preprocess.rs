//! Image preprocessing identical to `transformers`' `ViTImageProcessor` (PIL path): resize with
//! PIL's resampling filters (8-bit fixed-point, horizontal pass then vertical, antialiased when
//! shrinking), rescale by `rescale_factor`, normalise with `image_mean` / `image_std`.
//!
//! The resampler is a transcription of Pillow's `libImaging/Resample.c`: the same coefficient
//! windows, the same 22-bit fixed-point rounding and the same 8-bit intermediate image, so the
//! pixels match PIL's to the last bit for the filters PIL implements this way.

use image::RgbImage;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::ModelError;
use super::fast::simd::dispatch;

/// `image_mean` / `image_std` used by ViT checkpoints that do not say otherwise.
pub const IMAGENET_STANDARD_MEAN: [f32; 3] = [0.5, 0.5, 0.5];
/// See [`IMAGENET_STANDARD_MEAN`].
pub const IMAGENET_STANDARD_STD: [f32; 3] = [0.5, 0.5, 0.5];

/// PIL's resampling filters, numbered as in `PIL.Image.Resampling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Nearest,
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Filter {
    /// The filter for PIL's integer code.
    pub fn from_pil(code: i64) -> Option<Self> {
        Some(match code {
            0 => Filter::Nearest,
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            _ => return None,
        })
    }

    /// PIL's integer code.
    pub fn pil_code(self) -> i64 {
        match self {
            Filter::Nearest => 0,
            Filter::Lanczos => 1,
            Filter::Bilinear => 2,
            Filter::Bicubic => 3,
            Filter::Box => 4,
            Filter::Hamming => 5,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Nearest | Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            Filter::Nearest | Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// The settings of `preprocessor_config.json` that `ViTImageProcessor` applies.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessorConfig {
    pub do_resize: bool,
    /// Output (height, width).
    pub size: (usize, usize),
    pub resample: Filter,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: Vec<f32>,
    pub image_std: Vec<f32>,
    /// The file as read, so export keeps fields we do not interpret.
    pub raw: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeField {
    Square(usize),
    HeightWidth { height: usize, width: usize },
    ShortestEdge { shortest_edge: usize },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FloatOrList {
    One(f32),
    Many(Vec<f32>),
}

#[derive(Deserialize)]
struct RawPreprocessor {
    do_resize: Option<bool>,
    size: Option<SizeField>,
    resample: Option<i64>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<FloatOrList>,
    image_std: Option<FloatOrList>,
}

impl PreprocessorConfig {
    /// `ViTImageProcessor`'s defaults for a model of this input size (used when the model
    /// folder has no `preprocessor_config.json`).
    pub fn default_for(size: (usize, usize)) -> Self {
        Self {
            do_resize: true,
            size,
            resample: Filter::Bilinear,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: IMAGENET_STANDARD_MEAN.to_vec(),
            image_std: IMAGENET_STANDARD_STD.to_vec(),
            raw: Map::new(),
        }
    }

    /// Parses `preprocessor_config.json`; absent fields take `ViTImageProcessor`'s defaults.
    /// `model_size` is the model's input size, used when the file gives none.
    pub fn from_json(text: &str, model_size: (usize, usize), channels: usize) -> Result<Self, ModelError> {
        let err = |m: String| ModelError::Config(format!("preprocessor_config.json: {m}"));
        let raw: Map<String, Value> = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
        let parsed: RawPreprocessor = serde_json::from_value(Value::Object(raw.clone())).map_err(|e| err(e.to_string()))?;
        let size = match parsed.size {
            None => model_size,
            Some(SizeField::Square(s)) => (s, s),
            Some(SizeField::HeightWidth { height, width }) => (height, width),
            Some(SizeField::ShortestEdge { shortest_edge }) => {
                return Err(err(format!(
                    "size {{\"shortest_edge\": {shortest_edge}}} is not used by ViTImageProcessor; give height and width"
                )));
            }
        };
        let resample = match parsed.resample {
            None => Filter::Bilinear,
            Some(code) => Filter::from_pil(code).ok_or_else(|| err(format!("unknown resample filter {code}")))?,
        };
        let per_channel = |v: Option<FloatOrList>, default: [f32; 3], name: &str| -> Result<Vec<f32>, ModelError> {
            let v = match v {
                None => default.to_vec(),
                Some(FloatOrList::One(x)) => vec![x; channels],
                Some(FloatOrList::Many(v)) => v,
            };
            if v.len() != channels {
                return Err(err(format!("{name} has {} values for {channels} channels", v.len())));
            }
            Ok(v)
        };
        let image_mean = per_channel(parsed.image_mean, IMAGENET_STANDARD_MEAN, "image_mean")?;
        let image_std = per_channel(parsed.image_std, IMAGENET_STANDARD_STD, "image_std")?;
        if image_std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err(err("image_std must be non-zero".into()));
        }
        let cfg = Self {
            do_resize: parsed.do_resize.unwrap_or(true),
            size,
            resample,
            do_rescale: parsed.do_rescale.unwrap_or(true),
            rescale_factor: parsed.rescale_factor.unwrap_or(1.0 / 255.0),
            do_normalize: parsed.do_normalize.unwrap_or(true),
            image_mean,
            image_std,
            raw,
        };
        if cfg.size.0 == 0 || cfg.size.1 == 0 {
            return Err(err("size must be positive".into()));
        }
        Ok(cfg)
    }

    /// The JSON to write next to exported weights.
    pub fn to_json(&self) -> Value {
        let mut obj = self.raw.clone();
        obj.insert("image_processor_type".into(), "ViTImageProcessor".into());
        obj.insert("do_resize".into(), self.do_resize.into());
        obj.insert("size".into(), serde_json::json!({"height": self.size.0, "width": self.size.1}));
        obj.insert("resample".into(), self.resample.pil_code().into());
        obj.insert("do_rescale".into(), self.do_rescale.into());
        obj.insert("rescale_factor".into(), self.rescale_factor.into());
        obj.insert("do_normalize".into(), self.do_normalize.into());
        obj.insert("image_mean".into(), serde_json::json!(self.image_mean));
        obj.insert("image_std".into(), serde_json::json!(self.image_std));
        Value::Object(obj)
    }

    /// Pixel values of the left-right mirror image, in place (each row of each channel reversed).
    pub fn mirror(&self, pixels: &mut [f32]) {
        pixels.chunks_mut(self.size.1.max(1)).for_each(<[f32]>::reverse);
    }

    /// Pixel values (channels × height × width, channel-major) of one image, exactly as
    /// `ViTImageProcessor` computes them. Without `do_resize` the image must already have the
    /// configured size.
    pub fn pixel_values(&self, img: &RgbImage) -> Result<Vec<f32>, ModelError> {
        let (h, w) = self.size;
        let resized;
        let img = if self.do_resize && (img.height() as usize, img.width() as usize) != (h, w) {
            resized = resize(img, w, h, self.resample);
            &resized
        } else {
            img
        };
        if (img.height() as usize, img.width() as usize) != (h, w) {
            return Err(ModelError::Input(format!(
                "image is {}×{} but the model expects {w}×{h} and do_resize is off",
                img.width(),
                img.height()
            )));
        }
        Ok(self.normalize(img))
    }

    /// Rescales and normalises an image that already has the model's size.
    pub fn normalize(&self, img: &RgbImage) -> Vec<f32> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut out = vec![0f32; 3 * h * w];
        // transformers rescales in float64 then casts to float32, and normalises in float32 by
        // division; doing the same keeps us bit-identical to it.
        let scale = if self.do_rescale { self.rescale_factor } else { 1.0 };
        let levels: [f32; 256] = std::array::from_fn(|v| (v as f64 * scale) as f32);
        let raw = img.as_raw();
        for c in 0..3 {
            let plane = &mut out[c * h * w..(c + 1) * h * w];
            for (i, v) in plane.iter_mut().enumerate() {
                let x = levels[raw[i * 3 + c] as usize];
                *v = if self.do_normalize { (x - self.image_mean[c]) / self.image_std[c] } else { x };
            }
        }
        out
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Coefficient windows of one axis, as Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`.
struct Coeffs {
    ksize: usize,
    /// (first source index, number of taps) per output index.
    bounds: Vec<(usize, usize)>,
    /// Fixed-point weights, `ksize` per output index.
    weights: Vec<i32>,
}

fn precompute_coeffs(in_size: usize, in0: f64, in1: f64, out_size: usize, filter: Filter) -> Coeffs {
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; clamping to 0 afterwards makes that a floor.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize - xmin;
        let xmax = xmax.min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let w = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if w < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs { ksize, bounds, weights }
}

#[inline(always)]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes like `PIL.Image.resize((out_w, out_h), filter)`.
pub fn resize(img: &RgbImage, out_w: usize, out_h: usize, filter: Filter) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    resize_box(img, (0.0, 0.0, w as f64, h as f64), out_w, out_h, filter)
}

/// Resizes the region `(x0, y0, x1, y1)` of `img` like
/// `PIL.Image.resize((out_w, out_h), filter, box=(x0, y0, x1, y1))`.
pub fn resize_box(img: &RgbImage, bx: (f64, f64, f64, f64), out_w: usize, out_h: usize, filter: Filter) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    if out_w == 0 || out_h == 0 {
        // No pixels to compute (the passes' row loops need rows of at least one pixel).
        return RgbImage::new(out_w as u32, out_h as u32);
    }
    if filter == Filter::Nearest {
        return resize_nearest(img, bx, out_w, out_h);
    }
    let (x0, y0, x1, y1) = bx;
    let need_h = out_w != in_w || x0 != 0.0 || x1 != out_w as f64;
    let need_v = out_h != in_h || y0 != 0.0 || y1 != out_h as f64;
    let horiz = precompute_coeffs(in_w, x0, x1, out_w, filter);
    let vert = precompute_coeffs(in_h, y0, y1, out_h, filter);
    let src = img.as_raw();
    // Pillow ≥ 13 runs the vertical pass first when the height shrinks by more than twice as many
    // pixels as the width (python-pillow/Pillow#9549); the order changes rounding of the 8-bit
    // intermediate image, so we follow it to stay bit-exact.
    let vertical_first = out_h < in_h && (in_h - out_h) as i64 > 2 * (in_w as i64 - out_w as i64);
    let out = if vertical_first {
        let (tmp, w) = if need_v { (pass_vertical(src, in_w, &vert, 0), in_w) } else { (src.to_vec(), in_w) };
        if need_h { pass_horizontal(&tmp, w, out_h, 0, &horiz) } else { tmp }
    } else {
        // The horizontal pass only needs the rows the vertical pass will read.
        let (first, last) = if need_v {
            (vert.bounds.first().map_or(0, |b| b.0), vert.bounds.last().map_or(in_h, |b| b.0 + b.1))
        } else {
            (0, in_h)
        };
        let (tmp, w) = if need_h { (pass_horizontal(src, in_w, last - first, first, &horiz), out_w) } else { (src[first * in_w * 3..last * in_w * 3].to_vec(), in_w) };
        if need_v { pass_vertical(&tmp, w, &vert, first) } else { tmp }
    };
    RgbImage::from_raw(out_w as u32, out_h as u32, out).expect("buffer size matches dimensions")
}

/// A horizontal pass's weights laid out for [`horizontal_row`]: each output pixel's taps padded
/// with zeros to a whole number of steps of eight, `stride` apart.
struct Taps {
    stride: usize,
    weights: Vec<i32>,
}

impl Taps {
    fn new(c: &Coeffs) -> Taps {
        let stride = c.ksize.div_ceil(8) * 8;
        let mut weights = vec![0i32; c.bounds.len() * stride];
        for (xx, &(_, n)) in c.bounds.iter().enumerate() {
            weights[xx * stride..xx * stride + n].copy_from_slice(&c.weights[xx * c.ksize..xx * c.ksize + n]);
        }
        Taps { stride, weights }
    }
}

/// Horizontal pass: `rows` rows starting at `first` of an RGB buffer `in_w` wide, to the
/// coefficient windows' output width.
fn pass_horizontal(src: &[u8], in_w: usize, rows: usize, first: usize, c: &Coeffs) -> Vec<u8> {
    let out_w = c.bounds.len();
    let taps = Taps::new(c);
    let mut out = vec![0u8; rows * out_w * 3];
    // Each row is read from a copy with room for a last step of eight pixels that runs past the
    // image's right edge (its weights there are zero).
    let mut padded = vec![0u8; (in_w + 8) * 3];
    for (r, dst_row) in out.chunks_exact_mut(out_w * 3).enumerate() {
        padded[..in_w * 3].copy_from_slice(&src[(first + r) * in_w * 3..(first + r + 1) * in_w * 3]);
        horizontal_row(&padded, &c.bounds, &taps, dst_row);
    }
    out
}

/// One row of the horizontal pass, as Pillow's `ImagingResampleHorizontal_8bpc` computes it:
/// per output sample, the 32-bit sum of source samples times fixed-point weights. `row` has room
/// for each window rounded up to whole steps of eight pixels. AVX2 where the CPU may use it (the
/// same code at the AVX-512 levels), else plain loops.
fn horizontal_row(row: &[u8], bounds: &[(usize, usize)], taps: &Taps, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if super::fast::simd::use_avx2() {
        // SAFETY: `use_avx2` is true only where the CPU has AVX2.
        return unsafe { horizontal_row_avx2(row, bounds, taps, out) };
    }
    for (xx, &(xmin, n)) in bounds.iter().enumerate() {
        let k = &taps.weights[xx * taps.stride..xx * taps.stride + n];
        let pixels = &row[xmin * 3..(xmin + n) * 3];
        for ch in 0..3 {
            let ss = pixels[ch..].iter().step_by(3).zip(k).fold(1i32 << (PRECISION_BITS - 1), |s, (&p, &k)| s.wrapping_add(i32::from(p).wrapping_mul(k)));
            out[xx * 3 + ch] = clip8(ss);
        }
    }
}

/// [`horizontal_row`] eight source pixels a step: their 24 bytes are split into the three
/// channels by byte shuffles, widened to 32 bits and multiplied by the eight taps' weights, one
/// accumulator per channel; each accumulator's eight lanes are added up at the end. Wrapping
/// arithmetic, as in Pillow's 32-bit `int` sums: partial sums that wrap still add up to the true
/// sum modulo 2³², and the true sum fits in 32 bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_row_avx2(row: &[u8], bounds: &[(usize, usize)], taps: &Taps, out: &mut [u8]) {
    use std::arch::x86_64::*;
    // Byte shuffles: from bytes 0..16 of a step (`lo`) and bytes 8..24 (`hi`), the red samples
    // to bytes 0..8 and the green to 8..16 of one vector, the blue to bytes 0..8 of another
    // (an index with its top bit set gives zero).
    const Z: i8 = -1;
    let rg_lo = _mm_setr_epi8(0, 3, 6, 9, 12, 15, Z, Z, 1, 4, 7, 10, 13, Z, Z, Z);
    let rg_hi = _mm_setr_epi8(Z, Z, Z, Z, Z, Z, 10, 13, Z, Z, Z, Z, Z, 8, 11, 14);
    let b_lo = _mm_setr_epi8(2, 5, 8, 11, 14, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z);
    let b_hi = _mm_setr_epi8(Z, Z, Z, Z, Z, 9, 12, 15, Z, Z, Z, Z, Z, Z, Z, Z);
    let half = _mm_set1_epi32(1 << (PRECISION_BITS - 1));
    for (xx, &(xmin, n)) in bounds.iter().enumerate() {
        let steps = n.div_ceil(8);
        // Every load below is within these two slices.
        let pixels = &row[xmin * 3..xmin * 3 + steps * 24];
        let weights = &taps.weights[xx * taps.stride..xx * taps.stride + steps * 8];
        let (mut r, mut g, mut b) = (_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256());
        for step in 0..steps {
            // SAFETY: bytes step·24 .. step·24 + 24 of `pixels` and weights step·8 .. step·8 + 8
            // of `weights` exist (the slices above); unaligned loads.
            let (lo, hi, w) = unsafe {
                let p = pixels.as_ptr().add(step * 24);
                (
                    _mm_loadu_si128(p.cast()),
                    _mm_loadu_si128(p.add(8).cast()),
                    _mm256_loadu_si256(weights.as_ptr().add(step * 8).cast()),
                )
            };
            let rg = _mm_or_si128(_mm_shuffle_epi8(lo, rg_lo), _mm_shuffle_epi8(hi, rg_hi));
            let bb = _mm_or_si128(_mm_shuffle_epi8(lo, b_lo), _mm_shuffle_epi8(hi, b_hi));
            r = _mm256_add_epi32(r, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(rg), w));
            g = _mm256_add_epi32(g, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(rg)), w));
            b = _mm256_add_epi32(b, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(bb), w));
        }
        // [r01 r23 g01 g23 | r45 r67 g45 g67], [b01 b23 b01 b23 | …], then [r g b b] per half.
        let rg = _mm256_hadd_epi32(r, g);
        let bb = _mm256_hadd_epi32(b, b);
        let rgbb = _mm256_hadd_epi32(rg, bb);
        let sums = _mm_add_epi32(_mm_add_epi32(_mm256_castsi256_si128(rgbb), _mm256_extracti128_si256::<1>(rgbb)), half);
        // Pillow's clip8: shift, then clamp to 0..255 (the saturating packs clamp).
        let shifted = _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(sums);
        let bytes = _mm_cvtsi128_si32(_mm_packus_epi16(_mm_packs_epi32(shifted, shifted), _mm_setzero_si128())).to_le_bytes();
        out[xx * 3..xx * 3 + 3].copy_from_slice(&bytes[..3]);
    }
}

/// Vertical pass over an RGB buffer `w` wide whose first row is source row `row_first`.
fn pass_vertical(src: &[u8], w: usize, c: &Coeffs, row_first: usize) -> Vec<u8> {
    let row_len = w * 3;
    let mut out = vec![0u8; c.bounds.len() * row_len];
    let mut acc = vec![0i32; row_len];
    for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
        let rows = &src[(ymin - row_first) * row_len..(ymin - row_first + n) * row_len];
        let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
        vertical_row(rows, k, &mut acc, &mut out[yy * row_len..(yy + 1) * row_len]);
    }
    out
}

dispatch! {
    /// One row of the vertical pass, as Pillow's `ImagingResampleVertical_8bpc` computes it:
    /// `rows` holds the window's source rows, one weight each in `k`; `acc` is scratch of a row's
    /// length.
    fn vertical_row(rows: &[u8], k: &[i32], acc: &mut [i32], out: &mut [u8]) {
        acc.fill(1 << (PRECISION_BITS - 1));
        for (row, &ky) in rows.chunks_exact(acc.len()).zip(k) {
            for (a, &p) in acc.iter_mut().zip(row) {
                *a = a.wrapping_add(i32::from(p).wrapping_mul(ky));
            }
        }
        for (o, &a) in out.iter_mut().zip(acc.iter()) {
            *o = clip8(a);
        }
    }
}

fn resize_nearest(img: &RgbImage, bx: (f64, f64, f64, f64), out_w: usize, out_h: usize) -> RgbImage {
    let (x0, y0, x1, y1) = bx;
    let (sx, sy) = ((x1 - x0) / out_w as f64, (y1 - y0) / out_h as f64);
    let (w, h) = (img.width(), img.height());
    RgbImage::from_fn(out_w as u32, out_h as u32, |x, y| {
        let xs = ((x0 + (f64::from(x) + 0.5) * sx) as u32).min(w - 1);
        let ys = ((y0 + (f64::from(y) + 0.5) * sy) as u32).min(h - 1);
        *img.get_pixel(xs, ys)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pillow's two passes as `Resample.c` writes them, one sum per output sample (in 64 bits
    /// here, which the 32-bit sums must equal): the definition the vectorised passes are held to.
    fn pillow_passes(img: &RgbImage, bx: (f64, f64, f64, f64), out_w: usize, out_h: usize, filter: Filter) -> Vec<u8> {
        let (in_w, in_h) = (img.width() as usize, img.height() as usize);
        let horiz = precompute_coeffs(in_w, bx.0, bx.2, out_w, filter);
        let vert = precompute_coeffs(in_h, bx.1, bx.3, out_h, filter);
        let sum = |taps: &mut dyn Iterator<Item = (u8, i32)>| {
            let ss = taps.fold(1i64 << (PRECISION_BITS - 1), |s, (p, k)| s + i64::from(p) * i64::from(k));
            (ss >> PRECISION_BITS).clamp(0, 255) as u8
        };
        let horizontal = |src: &[u8], w: usize, rows: usize| -> Vec<u8> {
            let mut out = Vec::with_capacity(rows * out_w * 3);
            for r in 0..rows {
                for (xx, &(xmin, n)) in horiz.bounds.iter().enumerate() {
                    for ch in 0..3 {
                        let k = &horiz.weights[xx * horiz.ksize..][..n];
                        out.push(sum(&mut k.iter().enumerate().map(|(x, &k)| (src[(r * w + xmin + x) * 3 + ch], k))));
                    }
                }
            }
            out
        };
        let vertical = |src: &[u8], w: usize| -> Vec<u8> {
            let mut out = Vec::with_capacity(out_h * w * 3);
            for (yy, &(ymin, n)) in vert.bounds.iter().enumerate() {
                for i in 0..w * 3 {
                    let k = &vert.weights[yy * vert.ksize..][..n];
                    out.push(sum(&mut k.iter().enumerate().map(|(y, &k)| (src[(ymin + y) * w * 3 + i], k))));
                }
            }
            out
        };
        // Both passes always, each in the order Pillow takes them (a pass that changes nothing is
        // the identity, which the tests' sizes and boxes do not ask for).
        if out_h < in_h && (in_h - out_h) as i64 > 2 * (in_w as i64 - out_w as i64) {
            horizontal(&vertical(img.as_raw(), in_w), in_w, out_h)
        } else {
            vertical(&horizontal(img.as_raw(), in_w, in_h), out_w)
        }
    }

    /// The vectorised passes give Pillow's sums sample for sample, at every instruction-set
    /// level this CPU runs: every filter, shrinking and enlarging, either pass first, boxes with
    /// fractional edges, widths either side of a step of eight pixels, noise and the extremes of
    /// 0 and 255 (where the negative lobes of bicubic and Lanczos weights matter most).
    #[test]
    fn vectorised_passes_give_pillow_s_sums_at_every_level() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let levels = super::super::fast::isa::tests::runnable();
        let filters = [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos, Filter::Box, Filter::Hamming];
        let mut checked = 0;
        for (in_w, in_h, out_w, out_h) in [(97, 61, 23, 17), (8, 9, 31, 29), (300, 40, 15, 7), (40, 300, 9, 16), (17, 16, 16, 15), (1, 1, 5, 3), (64, 64, 63, 1)] {
            let noise = RgbImage::from_fn(in_w, in_h, |_, _| image::Rgb(rng.random()));
            let extremes = RgbImage::from_fn(in_w, in_h, |x, y| image::Rgb([if (x + y) % 2 == 0 { 255 } else { 0 }, if x % 3 == 0 { 255 } else { 0 }, 255]));
            for img in [noise, extremes] {
                let (w, h) = (f64::from(in_w), f64::from(in_h));
                for bx in [(0.0, 0.0, w, h), (w * 0.13, h * 0.27, w * 0.91, h * 0.8)] {
                    for filter in filters {
                        let want = pillow_passes(&img, bx, out_w, out_h, filter);
                        for &level in &levels {
                            let got = super::super::fast::isa::tests::on(level, || resize_box(&img, bx, out_w, out_h, filter));
                            assert!(got.as_raw() == &want, "{level:?} {filter:?} {in_w}×{in_h} → {out_w}×{out_h}, box {bx:?}");
                            checked += 1;
                        }
                    }
                }
            }
        }
        eprintln!("resize passes checked {checked} times at {levels:?}");
    }

    #[test]
    fn identity_size_is_untouched() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([(x * 30) as u8, (y * 40) as u8, 9]));
        assert_eq!(resize(&img, 7, 5, Filter::Bilinear), img);
        // An empty output is an empty image, not a panic.
        assert_eq!(resize(&img, 0, 5, Filter::Bilinear).dimensions(), (0, 5));
        assert_eq!(resize(&img, 3, 0, Filter::Lanczos).dimensions(), (3, 0));
    }

    #[test]
    fn constant_image_stays_constant_under_every_filter() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 17, 99]));
        for f in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos, Filter::Box, Filter::Hamming, Filter::Nearest] {
            for (w, h) in [(10, 10), (64, 50), (37, 7)] {
                let out = resize(&img, w, h, f);
                assert!(out.pixels().all(|p| p.0 == [200, 17, 99]), "{f:?} {w}×{h}");
            }
        }
    }

    #[test]
    fn shrinking_widens_the_bilinear_triangle() {
        // Halving: the triangle is stretched to span 3 source pixels around the centre 1.0 with
        // weights 0.75, 0.75, 0.25 (normalised by 1.75), unlike a plain 2×2 bilinear sample.
        // (0·0.75 + 100·0.75 + 200·0.25) / 1.75 = 71.4 → 71. Pillow 11 gives the same.
        let img = RgbImage::from_fn(4, 1, |x, _| image::Rgb([[0, 100, 200, 40][x as usize]; 3]));
        let out = resize(&img, 2, 1, Filter::Bilinear);
        assert_eq!(out.get_pixel(0, 0).0[0], 71);
    }

    #[test]
    fn normalisation_matches_formula() {
        let cfg = PreprocessorConfig::default_for((2, 2));
        let img = RgbImage::from_pixel(2, 2, image::Rgb([255, 0, 51]));
        let v = cfg.pixel_values(&img).unwrap();
        assert_eq!(v.len(), 12);
        assert!((v[0] - 1.0).abs() < 1e-6);
        assert!((v[4] + 1.0).abs() < 1e-6);
        assert!((v[8] - (0.2 - 0.5) / 0.5).abs() < 1e-6);
    }

    #[test]
    fn parses_processor_configs() {
        let cfg = PreprocessorConfig::from_json(r#"{"size": {"height": 30, "width": 20}, "resample": 3, "image_mean": 0.5}"#, (224, 224), 3).unwrap();
        assert_eq!(cfg.size, (30, 20));
        assert_eq!(cfg.resample, Filter::Bicubic);
        assert_eq!(cfg.image_mean, vec![0.5; 3]);
        assert_eq!(PreprocessorConfig::from_json(r#"{"size": 64}"#, (224, 224), 3).unwrap().size, (64, 64));
        assert_eq!(PreprocessorConfig::from_json("{}", (40, 40), 3).unwrap().size, (40, 40));
        assert!(PreprocessorConfig::from_json(r#"{"size": {"shortest_edge": 5}}"#, (224, 224), 3).is_err());
        assert!(PreprocessorConfig::from_json(r#"{"resample": 9}"#, (224, 224), 3).is_err());
        assert!(PreprocessorConfig::from_json(r#"{"image_std": [1, 0, 1]}"#, (224, 224), 3).is_err());
    }
}
