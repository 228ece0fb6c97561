//! Training data: the examples of each split, a memory-bounded cache of decoded images, and the
//! per-image transforms (random resized crop + horizontal flip for training, the processor's
//! exact resize for evaluation).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::TrainError;
use crate::dataset::{Split, look_alike};
use crate::model::PreprocessorConfig;
use crate::model::preprocess::{Filter, resize_box};

/// One labelled image file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Example {
    pub path: PathBuf,
    pub label: u32,
}

/// The examples of a fine-tune, by split, with the class names (index = label id).
#[derive(Debug, Clone, Default)]
pub struct TrainData {
    pub labels: Vec<String>,
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    pub test: Vec<Example>,
    /// For each image file with look-alikes ([`crate::dataset::look_alike`]), the first file of
    /// its cluster: look-alikes are kept together like copies of one file.
    pub look_alikes: HashMap<PathBuf, PathBuf>,
}

impl TrainData {
    /// Groups `(path, class name, split)` records; labels are the sorted class names.
    pub fn from_records(records: impl IntoIterator<Item = (PathBuf, String, Split)>) -> Self {
        let records: Vec<_> = records.into_iter().collect();
        let mut labels: Vec<String> = records.iter().map(|(_, l, _)| l.clone()).collect();
        labels.sort();
        labels.dedup();
        Self::with_labels(labels, records).expect("labels cover every record")
    }

    /// Groups records under a fixed label list (e.g. a model's); a record whose class is not in
    /// `labels` is an error naming it.
    pub fn with_labels(labels: Vec<String>, records: Vec<(PathBuf, String, Split)>) -> Result<Self, TrainError> {
        let index: HashMap<&str, u32> = labels.iter().enumerate().map(|(i, l)| (l.as_str(), i as u32)).collect();
        let mut data = Self { labels: labels.clone(), ..Self::default() };
        for (path, label, split) in records {
            let label = *index
                .get(label.as_str())
                .ok_or_else(|| TrainError::Data(format!("class '{label}' is not one of the model's labels")))?;
            let ex = Example { path, label };
            match split {
                Split::Train => data.train.push(ex),
                Split::Validation => data.validation.push(ex),
                Split::Test => data.test.push(ex),
            }
        }
        Ok(data)
    }

    /// When there is no validation split, moves a stratified, seeded `ratio` of each class's
    /// training images into one (at least one image of every class with two or more).
    ///
    /// Copies of one file (the same blob path), and files that look alike ([`Self::look_alikes`]),
    /// stay together, all held out or none, so that no validation image is also a training
    /// image; such a group under two or more classes is never held out, since its score would be
    /// wrong under one of its labels whatever the model said. A group is held out only where it
    /// fits in the class's share, so that one large group of look-alikes does not hold out far
    /// more than `ratio`; where look-alike groups would leave a class with nothing held out (a
    /// class of pictures that all look alike), that class is split by files instead. With no
    /// copies and no look-alikes this is a stratified shuffle split of the examples.
    ///
    /// Returns the split made, to be [`Self::apply_split`] again (none when there was a
    /// validation split).
    pub fn ensure_validation(&mut self, ratio: f64, seed: u64) -> Option<SplitOrder> {
        if !self.validation.is_empty() {
            return None;
        }
        let before = self.train.clone();
        let by_files = HashMap::new();
        let alike = Grouping::new(&self.train, &self.look_alikes);
        let files = Grouping::new(&self.train, &by_files);
        let mut by_class: BTreeMap<u32, Vec<Example>> = BTreeMap::new();
        for ex in self.train.drain(..) {
            by_class.entry(ex.label).or_default().push(ex);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, 0x7661_6c69));
        for (_, examples) in by_class {
            let (held, kept) = match alike.hold_out(examples, ratio, &mut rng) {
                Ok(split) => split,
                Err(examples) => files.hold_out(examples, ratio, &mut rng).unwrap_or_else(|examples| (Vec::new(), examples)),
            };
            self.validation.extend(held);
            self.train.extend(kept);
        }
        Some(SplitOrder::of(&before, &self.train, &self.validation))
    }

    /// Splits the training examples as `split` says, which [`Self::ensure_validation`] returned
    /// for examples in the same order (a run resumed by a version of the service that chooses
    /// validation images differently goes on with the ones it had). False, and nothing changes,
    /// where `split` is not a split of these examples: there is a validation split already, or
    /// its positions are not each of the training examples' once.
    pub fn apply_split(&mut self, split: &SplitOrder) -> bool {
        let mut seen = vec![false; self.train.len()];
        let positions = || split.train.iter().chain(&split.validation).map(|&i| i as usize);
        let whole = positions().all(|i| i < seen.len() && !std::mem::replace(&mut seen[i], true)) && seen.iter().all(|s| *s);
        if !self.validation.is_empty() || !whole {
            return false;
        }
        let pick = |positions: &[u32]| positions.iter().map(|&i| self.train[i as usize].clone()).collect::<Vec<_>>();
        (self.train, self.validation) = (pick(&split.train), pick(&split.validation));
        true
    }

    /// For each training example, the number of its file (its blob path), counted from 0 in the
    /// order first seen: copies of one file share a number, and so do files that look alike, in
    /// a group of at most a fifth of its class's files (one cross-validation fold's share: a
    /// larger one, such as a class of pictures that all look alike, would leave a fold without
    /// the class).
    pub fn train_files(&self) -> Vec<usize> {
        fn first<'a>(look_alikes: &'a HashMap<PathBuf, PathBuf>, ex: &'a Example) -> &'a PathBuf {
            look_alikes.get(&ex.path).unwrap_or(&ex.path)
        }
        let cluster = |ex| first(&self.look_alikes, ex);
        let mut class_files: HashMap<u32, HashSet<&PathBuf>> = HashMap::new();
        let mut cluster_files: HashMap<&PathBuf, HashSet<&PathBuf>> = HashMap::new();
        for ex in &self.train {
            class_files.entry(ex.label).or_default().insert(&ex.path);
            cluster_files.entry(cluster(ex)).or_default().insert(&ex.path);
        }
        let mut number: HashMap<&PathBuf, usize> = HashMap::new();
        self.train
            .iter()
            .map(|ex| {
                let whole = cluster_files[cluster(ex)].len() <= (class_files[&ex.label].len() / 5).max(1);
                let next = number.len();
                *number.entry(if whole { cluster(ex) } else { &ex.path }).or_insert(next)
            })
            .collect()
    }

    /// Sets [`Self::look_alikes`] from each image's file, class and fingerprint; when one has
    /// none (a dataset stored before they were taken), there are none.
    pub fn set_look_alikes(&mut self, files: &[(PathBuf, &str, Option<look_alike::Look>)]) {
        self.look_alikes.clear();
        let Some(prints) = files.iter().map(|&(_, class, look)| Some((look?, class))).collect::<Option<Vec<_>>>() else { return };
        for (i, first) in look_alike::clusters(&prints).into_iter().enumerate() {
            if files[first].0 != files[i].0 {
                self.look_alikes.insert(files[i].0.clone(), files[first].0.clone());
            }
        }
    }

    /// Number of training examples per class.
    pub fn train_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.labels.len()];
        for ex in &self.train {
            counts[ex.label as usize] += 1;
        }
        counts
    }
}

/// How a run split its training examples into training and validation: each kept example's and
/// each held-out example's position among the training examples before the split, in their
/// order after it. Recorded in the run's checkpoints ([`super::checkpoint::LoopState::split`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitOrder {
    pub train: Vec<u32>,
    pub validation: Vec<u32>,
}

impl SplitOrder {
    /// The positions in `before` of the examples of `train` and `validation`, which are
    /// `before`'s examples moved (of equal examples, copies of one file under one class, the
    /// first position goes to the first met: which is which makes no difference).
    fn of(before: &[Example], train: &[Example], validation: &[Example]) -> Self {
        let mut at: HashMap<&Example, VecDeque<u32>> = HashMap::new();
        for (i, ex) in before.iter().enumerate() {
            at.entry(ex).or_default().push_back(i as u32);
        }
        let mut position = |ex: &Example| at.get_mut(ex).and_then(VecDeque::pop_front).expect("a split moves examples, it makes none");
        Self { train: train.iter().map(&mut position).collect(), validation: validation.iter().map(position).collect() }
    }
}

/// A class's examples held out, and kept for training.
type HeldKept = (Vec<Example>, Vec<Example>);

/// How [`TrainData::ensure_validation`] groups a class's examples: by file, or by look-alike
/// cluster (`first`: a file's cluster's first file).
struct Grouping<'a> {
    first: &'a HashMap<PathBuf, PathBuf>,
    /// Groups under two or more classes, never held out.
    contradicted: HashSet<PathBuf>,
}

impl<'a> Grouping<'a> {
    fn new(train: &[Example], first: &'a HashMap<PathBuf, PathBuf>) -> Self {
        let mut classes_of: HashMap<&PathBuf, HashSet<u32>> = HashMap::new();
        for ex in train {
            classes_of.entry(first.get(&ex.path).unwrap_or(&ex.path)).or_default().insert(ex.label);
        }
        let contradicted = classes_of.into_iter().filter(|(_, labels)| labels.len() > 1).map(|(path, _)| path.clone()).collect();
        Self { first, contradicted }
    }

    /// One class's examples split into (held out, kept): its groups shuffled, each held out
    /// while the held-out files stay within the class's share. `Err` with the examples where
    /// nothing is held out of a class of two or more files because of look-alike groups.
    fn hold_out(&self, examples: Vec<Example>, ratio: f64, rng: &mut ChaCha8Rng) -> Result<HeldKept, Vec<Example>> {
        // The groups in the order first seen, each with its examples and its distinct files.
        let mut order: Vec<&PathBuf> = Vec::new();
        let mut groups: HashMap<&PathBuf, (Vec<&Example>, HashSet<&PathBuf>)> = HashMap::new();
        for ex in &examples {
            let key = self.first.get(&ex.path).unwrap_or(&ex.path);
            let (members, files) = groups.entry(key).or_insert_with(|| {
                order.push(key);
                Default::default()
            });
            members.push(ex);
            files.insert(&ex.path);
        }
        let (mut free, fixed): (Vec<&PathBuf>, Vec<&PathBuf>) = order.into_iter().partition(|p| !self.contradicted.contains(*p));
        free.shuffle(rng);
        let n: usize = free.iter().map(|g| groups[g].1.len()).sum();
        let share = if n < 2 { 0 } else { ((n as f64 * ratio).round() as usize).clamp(1, n - 1) };
        let (mut held, mut kept, mut held_files) = (Vec::new(), Vec::new(), 0);
        for key in free.iter().chain(&fixed) {
            let (members, files) = &groups[key];
            let fits = !self.contradicted.contains(*key) && held_files + files.len() <= share;
            held_files += if fits { files.len() } else { 0 };
            if fits { held.extend(members.iter().map(|ex| (*ex).clone())) } else { kept.extend(members.iter().map(|ex| (*ex).clone())) }
        }
        let distinct: HashSet<&PathBuf> = examples.iter().map(|ex| &ex.path).collect();
        if held.is_empty() && !self.first.is_empty() && distinct.len() > 1 {
            return Err(examples);
        }
        Ok((held, kept))
    }
}

/// A reproducible 64-bit mix of a seed and a stream number (SplitMix64's finaliser).
pub fn mix(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Decodes images on demand and keeps them while they fit in a memory budget, so that small
/// datasets are decoded once per fine-tune rather than once per epoch.
pub struct ImageCache {
    max_pixels: u64,
    budget: usize,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    used: usize,
    images: HashMap<PathBuf, Arc<RgbImage>>,
}

impl ImageCache {
    /// A cache holding at most `budget` bytes of decoded pixels.
    pub fn new(max_pixels: u64, budget: usize) -> Self {
        Self { max_pixels, budget, inner: Mutex::new(CacheInner::default()) }
    }

    /// The decoded image at `path`.
    pub fn get(&self, path: &PathBuf) -> Result<Arc<RgbImage>, TrainError> {
        if let Some(img) = self.lock().images.get(path) {
            return Ok(img.clone());
        }
        let bytes = std::fs::read(path).map_err(|e| TrainError::Data(format!("reading {}: {e}", path.display())))?;
        let img = Arc::new(
            crate::imaging::decode_rgb(&bytes, self.max_pixels)
                .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?,
        );
        let mut inner = self.lock();
        let size = img.as_raw().len();
        if inner.used + size <= self.budget {
            inner.used += size;
            inner.images.insert(path.clone(), img.clone());
        }
        Ok(img)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        // A panic while holding the lock cannot leave the map inconsistent (inserts are atomic).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Area and aspect-ratio ranges of torchvision's `RandomResizedCrop` defaults.
const CROP_SCALE: (f64, f64) = (0.08, 1.0);
const CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// torchvision's `RandomResizedCrop.get_params`: a crop box (x, y, w, h) of the image.
pub fn random_crop_box(w: u32, h: u32, rng: &mut impl Rng) -> (u32, u32, u32, u32) {
    let area = f64::from(w) * f64::from(h);
    let (lr0, lr1) = (CROP_RATIO.0.ln(), CROP_RATIO.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(CROP_SCALE.0..CROP_SCALE.1);
        let aspect = rng.random_range(lr0..lr1).exp();
        let cw = (target * aspect).sqrt().round() as u32;
        let ch = (target / aspect).sqrt().round() as u32;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let x = rng.random_range(0..=w - cw);
            let y = rng.random_range(0..=h - ch);
            return (x, y, cw, ch);
        }
    }
    // Fallback: the largest centred crop within the ratio range.
    let in_ratio = f64::from(w) / f64::from(h);
    let (cw, ch) = if in_ratio < CROP_RATIO.0 {
        (w, ((f64::from(w) / CROP_RATIO.0).round() as u32).min(h))
    } else if in_ratio > CROP_RATIO.1 {
        (((f64::from(h) * CROP_RATIO.1).round() as u32).min(w), h)
    } else {
        (w, h)
    };
    ((w - cw) / 2, (h - ch) / 2, cw.max(1), ch.max(1))
}

/// A training view of an image: random resized crop to the model size (bilinear, as torchvision
/// on PIL images) and a horizontal flip with probability ½, then rescale and normalise.
pub fn augmented_pixels(img: &RgbImage, pre: &PreprocessorConfig, rng: &mut impl Rng) -> Vec<f32> {
    let (x, y, cw, ch) = random_crop_box(img.width(), img.height(), rng);
    let crop = image::imageops::crop_imm(img, x, y, cw, ch).to_image();
    let (oh, ow) = pre.size;
    let bx = (0.0, 0.0, f64::from(cw), f64::from(ch));
    let mut out = resize_box(&crop, bx, ow, oh, Filter::Bilinear);
    if rng.random_bool(0.5) {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    pre.normalize(&out)
}

/// Turns per-image pixel vectors into a (B, C, H, W) tensor.
pub fn batch_tensor(pixels: Vec<Vec<f32>>, pre: &PreprocessorConfig, device: &Device) -> Result<Tensor, TrainError> {
    let b = pixels.len();
    let (h, w) = pre.size;
    let flat: Vec<f32> = pixels.into_iter().flatten().collect();
    Ok(Tensor::from_vec(flat, (b, 3, h, w), device)?)
}

/// Pixels of a batch of examples, computed in parallel: evaluation transforms when `augment` is
/// `None`, otherwise training transforms seeded per (seed, epoch, example) so results do not
/// depend on thread scheduling. An example is known by its label and file name, not its whole
/// path, so the same data copied to another folder augments alike.
pub fn load_batch(
    examples: &[&Example],
    cache: &ImageCache,
    pre: &PreprocessorConfig,
    augment: Option<(u64, u64)>,
) -> Result<Vec<Vec<f32>>, TrainError> {
    examples
        .par_iter()
        .map(|ex| {
            let img = cache.get(&ex.path)?;
            match augment {
                None => pre.pixel_values(&img).map_err(TrainError::from),
                Some((seed, epoch)) => {
                    let name = ex.path.file_name().unwrap_or(ex.path.as_os_str()).to_string_lossy();
                    let stream = mix(epoch, name.bytes().fold(u64::from(ex.label), |h, b| mix(h, u64::from(b))));
                    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, stream));
                    Ok(augmented_pixels(&img, pre, &mut rng))
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(i: usize, label: u32) -> Example {
        Example { path: PathBuf::from(format!("img{i}.png")), label }
    }

    #[test]
    fn validation_split_is_stratified_and_seeded() {
        let mut d = TrainData { labels: vec!["a".into(), "b".into()], ..Default::default() };
        d.train = (0..20).map(|i| ex(i, 0)).chain((20..30).map(|i| ex(i, 1))).collect();
        let mut d2 = d.clone();
        d.ensure_validation(0.2, 7);
        d2.ensure_validation(0.2, 7);
        assert_eq!(d.validation, d2.validation);
        assert_eq!(d.validation.iter().filter(|e| e.label == 0).count(), 4);
        assert_eq!(d.validation.iter().filter(|e| e.label == 1).count(), 2);
        assert_eq!(d.train.len(), 24);
    }

    /// Without copies the split is the stratified shuffle split it was before copies were kept
    /// together, example for example and in the same order: the runs of earlier versions are
    /// reproduced.
    #[test]
    fn without_copies_the_split_is_the_plain_stratified_one() {
        fn plain(train: Vec<Example>, ratio: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
            let mut by_class: BTreeMap<u32, Vec<Example>> = BTreeMap::new();
            for ex in train {
                by_class.entry(ex.label).or_default().push(ex);
            }
            let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, 0x7661_6c69));
            let (mut kept, mut held) = (Vec::new(), Vec::new());
            for (_, mut exs) in by_class {
                exs.shuffle(&mut rng);
                let n = exs.len();
                let take = if n < 2 { 0 } else { ((n as f64 * ratio).round() as usize).clamp(1, n - 1) };
                held.extend(exs.drain(..take));
                kept.extend(exs);
            }
            (kept, held)
        }
        for seed in 0..20u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let n = rng.random_range(3..60);
            let train: Vec<Example> = (0..n).map(|i| ex(i, rng.random_range(0..3))).collect();
            let mut d = TrainData { labels: vec!["a".into(), "b".into(), "c".into()], train: train.clone(), ..Default::default() };
            d.ensure_validation(0.25, seed);
            assert_eq!((d.train, d.validation), plain(train, 0.25, seed), "seed {seed}");
        }
    }

    /// The split a run made is made again from its record, example for example and in the same
    /// order, with copies of one file among the examples and whatever the look-alikes now say;
    /// a record that is not a split of the examples changes nothing.
    #[test]
    fn a_recorded_split_is_made_again_exactly_and_a_wrong_one_is_refused() {
        let labels: Vec<String> = vec!["a".into(), "b".into()];
        // Files 0..12 of class a (file 3 three times), 12..20 of class b; 5 and 6 look alike.
        let train: Vec<Example> = (0..12).chain([3, 3]).map(|i| ex(i, 0)).chain((12..20).map(|i| ex(i, 1))).collect();
        let alike = HashMap::from([(ex(6, 0).path, ex(5, 0).path)]);
        let mut made = TrainData { labels: labels.clone(), train: train.clone(), look_alikes: alike, ..Default::default() };
        let split = made.ensure_validation(0.3, 5).expect("a split was made");
        assert_eq!((split.train.len(), split.validation.len()), (made.train.len(), made.validation.len()));
        assert!(made.validation.iter().filter(|e| e.path == ex(3, 0).path).count() % 3 == 0, "copies together");
        // Another version, which knows no look-alikes: its own split differs, the record's does not.
        let mut other = TrainData { labels: labels.clone(), train: train.clone(), ..Default::default() };
        let mut own = other.clone();
        assert_ne!(own.ensure_validation(0.3, 5).as_ref(), Some(&split), "the test needs splits that differ");
        assert!(other.apply_split(&split));
        assert_eq!((&other.train, &other.validation), (&made.train, &made.validation));

        let fresh = TrainData { labels, train, ..Default::default() };
        let wrong = |f: &dyn Fn(&mut SplitOrder)| {
            let (mut record, mut d) = (split.clone(), fresh.clone());
            f(&mut record);
            assert!(!d.apply_split(&record), "{record:?}");
            assert_eq!((&d.train, d.validation.len()), (&fresh.train, 0), "unchanged");
        };
        wrong(&|r| r.validation[0] = r.train[0]);
        wrong(&|r| r.validation[0] = 22);
        wrong(&|r| _ = r.train.pop());
        wrong(&|r| r.train.push(0));
        let mut split_already = made.clone();
        assert!(!split_already.apply_split(&split), "a dataset with a validation split keeps it");
        assert_eq!(split_already.ensure_validation(0.3, 5), None);
    }

    #[test]
    fn copies_of_a_file_stay_together_and_contradicted_files_are_not_held_out() {
        let mut d = TrainData { labels: vec!["a".into(), "b".into()], ..Default::default() };
        // Ten files of class a, each there three times; file 20 under both classes, five times.
        d.train = (0..30).map(|i| ex(i % 10, 0)).chain((0..5).map(|i| ex(20, i % 2))).chain((30..40).map(|i| ex(i, 1))).collect();
        for seed in 0..10 {
            let mut split = d.clone();
            split.ensure_validation(0.2, seed);
            let held: HashSet<&PathBuf> = split.validation.iter().map(|e| &e.path).collect();
            assert!(split.train.iter().all(|e| !held.contains(&e.path)), "seed {seed}: a held-out file is also trained on");
            assert!(!held.contains(&PathBuf::from("img20.png")), "seed {seed}");
            // Two of class a's ten files (each three times), two of class b's ten.
            assert_eq!(split.validation.iter().filter(|e| e.label == 0).count(), 6, "seed {seed}");
            assert_eq!(split.validation.iter().filter(|e| e.label == 1).count(), 2, "seed {seed}");
            assert_eq!(split.train.len() + split.validation.len(), d.train.len());
        }
    }

    #[test]
    fn copies_share_a_file_number() {
        let d = TrainData { train: vec![ex(3, 0), ex(5, 1), ex(3, 1), ex(7, 0), ex(5, 0)], ..Default::default() };
        assert_eq!(d.train_files(), [0, 1, 0, 2, 1]);
    }

    #[test]
    fn look_alikes_stay_together_like_copies() {
        let mut d = TrainData { labels: vec!["a".into(), "b".into()], ..Default::default() };
        // Files 0..10 and 10..20 of class a: file i + 10 looks like file i. File 30 (class a)
        // looks like file 31 (class b). Files 40..50 of class b stand alone.
        let ids: Vec<usize> = (0..20).chain([30, 31]).chain(40..50).collect();
        d.train = ids.iter().map(|&i| ex(i, u32::from(i == 31 || i >= 40))).collect();
        let print = |i: usize| match i {
            0..20 => ((i % 10) as u64 * 0x0101_0101_0101_0101) ^ u64::from(i >= 10),
            30 | 31 => u64::MAX,
            _ => (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        };
        let class = |i: usize| if i == 31 || i >= 40 { "b" } else { "a" };
        let files: Vec<(PathBuf, &str, Option<look_alike::Look>)> =
            ids.iter().map(|&i| (ex(i, 0).path, class(i), Some(look_alike::Look::of_shape(print(i), 0)))).collect();
        d.set_look_alikes(&files);
        assert_eq!(d.look_alikes.len(), 11, "{:?}", d.look_alikes);
        assert_eq!(d.look_alikes[&PathBuf::from("img13.png")], PathBuf::from("img3.png"));
        let numbers = d.train_files();
        assert_eq!(numbers[3], numbers[13]);
        assert_eq!(numbers[20], numbers[21]);
        for seed in 0..10 {
            let mut split = d.clone();
            split.ensure_validation(0.2, seed);
            let held: HashSet<&PathBuf> = split.validation.iter().map(|e| &e.path).collect();
            for i in 0..10 {
                let (a, b) = (PathBuf::from(format!("img{i}.png")), PathBuf::from(format!("img{}.png", i + 10)));
                assert_eq!(held.contains(&a), held.contains(&b), "seed {seed}: file {i} and its look-alike were split");
            }
            assert!(!held.contains(&PathBuf::from("img30.png")) && !held.contains(&PathBuf::from("img31.png")), "seed {seed}");
            // Two of class a's ten pairs, two of class b's ten single files.
            assert_eq!(split.validation.iter().filter(|e| e.label == 0).count(), 4, "seed {seed}");
            assert_eq!(split.validation.iter().filter(|e| e.label == 1).count(), 2, "seed {seed}");
        }
        // An image without a fingerprint (an older dataset): no look-alikes at all.
        let mut older = files.clone();
        older[0].2 = None;
        d.set_look_alikes(&older);
        assert!(d.look_alikes.is_empty());
    }

    /// A large group of look-alikes is not held out past the class's share, and a class of
    /// pictures that all look alike is split by files rather than left without validation.
    #[test]
    fn large_look_alike_groups_do_not_swamp_or_empty_the_hold_out() {
        let mut d = TrainData { labels: vec!["a".into(), "b".into()], ..Default::default() };
        // Class a: files 0..10 all alike, 10..20 alone. Class b: files 20..25, all alike.
        d.train = (0..20).map(|i| ex(i, 0)).chain((20..25).map(|i| ex(i, 1))).collect();
        let alike = [0..10, 20..25];
        let files: Vec<(PathBuf, &str, Option<look_alike::Look>)> = (0..25)
            .map(|i| {
                let shape = match alike.iter().position(|r| r.contains(&i)) {
                    Some(group) => (group as u64 * 0xFFFF_FFFF_0000_0000) ^ (1 << (i % 5)),
                    None => (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                };
                (ex(i, 0).path, if i < 20 { "a" } else { "b" }, Some(look_alike::Look::of_shape(shape, 0)))
            })
            .collect();
        d.set_look_alikes(&files);
        for seed in 0..10 {
            let mut split = d.clone();
            split.ensure_validation(0.2, seed);
            let held: Vec<usize> = split.validation.iter().map(|e| e.path.to_string_lossy()[3..].trim_end_matches(".png").parse().unwrap()).collect();
            let (a, b): (Vec<usize>, Vec<usize>) = held.iter().partition(|&&i| i < 20);
            assert_eq!(a.len(), 4, "seed {seed}: {held:?}");
            assert!(a.iter().all(|&i| i >= 10), "seed {seed}: the group of ten was held out: {held:?}");
            assert_eq!(b.len(), 1, "seed {seed}: {held:?}");
            assert_eq!(split.train.len() + split.validation.len(), 25);
        }
        // Nor do the cross-validation folds keep groups that large together: every file has its
        // own number.
        let numbers = d.train_files();
        assert_eq!(numbers, (0..25).collect::<Vec<_>>());
    }

    #[test]
    fn tiny_classes_keep_a_training_example() {
        let mut d = TrainData { labels: vec!["a".into(), "b".into()], ..Default::default() };
        d.train = vec![ex(0, 0), ex(1, 1), ex(2, 1)];
        d.ensure_validation(0.5, 1);
        assert_eq!(d.train_counts(), vec![1, 1]);
        assert_eq!(d.validation.len(), 1);
    }

    /// The same data in another folder augments alike (benchmarks copy their data to a fresh
    /// folder each run); another example, or the same one in another epoch, differently.
    #[test]
    fn augmentation_follows_label_and_file_name_not_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let img = RgbImage::from_fn(48, 40, |x, y| image::Rgb([(x * 5) as u8, (y * 6) as u8, ((x * y) % 251) as u8]));
        for dir in ["a", "b"] {
            std::fs::create_dir_all(tmp.path().join(dir)).unwrap();
            img.save(tmp.path().join(dir).join("1.png")).unwrap();
        }
        let cache = ImageCache::new(1 << 24, 1 << 24);
        let pre = PreprocessorConfig::default_for((16, 16));
        let at = |dir: &str, label: u32, epoch: u64| {
            let ex = Example { path: tmp.path().join(dir).join("1.png"), label };
            load_batch(&[&ex], &cache, &pre, Some((7, epoch))).unwrap().remove(0)
        };
        assert_eq!(at("a", 0, 1), at("b", 0, 1));
        assert_ne!(at("a", 0, 1), at("a", 1, 1));
        assert_ne!(at("a", 0, 1), at("a", 0, 2));
    }

    #[test]
    fn crop_boxes_stay_inside_the_image() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for (w, h) in [(224, 224), (500, 40), (3, 900), (1, 1)] {
            for _ in 0..200 {
                let (x, y, cw, ch) = random_crop_box(w, h, &mut rng);
                assert!(cw >= 1 && ch >= 1 && x + cw <= w && y + ch <= h, "{w}×{h}: {x},{y} {cw}×{ch}");
            }
        }
    }
}
