//! Dataset ingest: an uploaded archive (zip, tar, tar.gz), a Parquet file exported by Hugging Face
//! `datasets`, or a local folder becomes a list of validated, labelled images in the
//! content-addressed [`BlobStore`].
//!
//! Ingest is synchronous and CPU-bound (every image is decoded once), so async callers run it with
//! `spawn_blocking`. Archives are read in two passes: the first reads entry headers only, so the
//! entry and size limits hold and the folder layout is decided before any content is unpacked; the
//! second reads, validates and stores just the images the layout selected. Nothing is ever written
//! under a name taken from the upload: the only files written are blobs named by their SHA-256.
//!
//! Memory per ingest is bounded by one entry (at most [`IngestLimits::max_image_bytes`]) plus the
//! decoder's buffers for one image (bounded by [`IngestLimits::max_image_pixels`]); for Parquet, a
//! few values of the image column at a time.

mod archive;
mod blobs;
mod duplicates;
pub mod edits;
mod layout;
pub mod look_alike;
mod parquet;
mod parquet_pages;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use blobs::BlobStore;
pub use duplicates::{DuplicateFile, DuplicateGroup, Duplicates, ImageRef, serialize_look_alikes, serialize_repeats};
pub use layout::is_clutter;

use crate::budget::{MemoryBudget, Reservation};
use crate::imaging::{self, ImageError};

/// The part of a dataset an image belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    /// Every split, in the order they are reported.
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

    /// The name used in JSON, in the database and in split folders.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }

    /// The split a top-level folder (or a Parquet `split` value) names: `train`, `validation` or its
    /// alias `val`, `test`. Case-sensitive, so a class folder called `Test` stays a class.
    pub fn from_name(name: &str) -> Option<Split> {
        match name {
            "train" => Some(Split::Train),
            "validation" | "val" => Some(Split::Validation),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A split name that is not one of `train`, `validation` (`val`), `test`.
#[derive(Debug, thiserror::Error)]
#[error("unknown split '{0}' (expected train, validation or test)")]
pub struct UnknownSplit(pub String);

impl FromStr for Split {
    type Err = UnknownSplit;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Shown cut short: a split column may hold any text, and the reason is stored.
        Split::from_name(s).ok_or_else(|| UnknownSplit(layout::shown(s)))
    }
}

impl TryFrom<String> for Split {
    type Error = UnknownSplit;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// One accepted image: where it came from, its class and split, and its blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// Its path in the archive (normalised, `/`-separated), or its Parquet `path` / row number.
    pub file: String,
    /// Class name.
    pub label: String,
    pub split: Split,
    /// SHA-256 (hex) of the file's bytes, the blob's name in the [`BlobStore`].
    pub blob: String,
    /// Its look-alike fingerprint ([`look_alike::fingerprint`]), taken when it was decoded.
    pub look: Option<look_alike::Look>,
}

impl ImageRecord {
    /// The fields the duplicate summaries read.
    pub fn image_ref(&self) -> ImageRef<'_> {
        ImageRef { blob: &self.blob, file: &self.file, label: &self.label, split: self.split, look: self.look }
    }
}

/// A file of the upload that was not used, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub file: String,
    pub reason: String,
}

/// Image counts per split and class. Every split is present, and every class appears in every
/// split (with 0 where it has no image), so clients can index without checking.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub train: BTreeMap<String, u64>,
    pub validation: BTreeMap<String, u64>,
    pub test: BTreeMap<String, u64>,
}

impl SplitCounts {
    /// The counts of one split.
    pub fn split(&self, split: Split) -> &BTreeMap<String, u64> {
        match split {
            Split::Train => &self.train,
            Split::Validation => &self.validation,
            Split::Test => &self.test,
        }
    }

    fn split_mut(&mut self, split: Split) -> &mut BTreeMap<String, u64> {
        match split {
            Split::Train => &mut self.train,
            Split::Validation => &mut self.validation,
            Split::Test => &mut self.test,
        }
    }
}

/// Most rejected files listed one by one; the rest are only counted, so an archive of
/// 200 000 junk entries cannot make a dataset's record (and every listing of it) huge.
pub const MAX_REJECTED_LISTED: usize = 1000;

/// The outcome of a successful ingest.
#[derive(Debug, Clone)]
pub struct Ingested {
    /// Accepted images, in upload order.
    pub images: Vec<ImageRecord>,
    /// Files not used, in upload order: the first [`MAX_REJECTED_LISTED`].
    pub rejected: Vec<Rejected>,
    /// How many files were not used, listed or not.
    pub rejected_total: u64,
    /// Class names, sorted byte-wise; a class's index in this list is its label id.
    pub classes: Vec<String>,
}

impl Ingested {
    /// Images per split and class (every class listed in every split).
    pub fn counts(&self) -> SplitCounts {
        let mut counts = SplitCounts::default();
        for split in Split::ALL {
            let per_class = counts.split_mut(split);
            for class in &self.classes {
                per_class.insert(class.clone(), 0);
            }
        }
        for image in &self.images {
            *counts.split_mut(image.split).entry(image.label.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// The images that are the same file as another.
    pub fn duplicates(&self) -> Duplicates {
        Duplicates::of(self.images.iter().map(ImageRecord::image_ref))
    }

    /// The images that look like another though their files differ (`None` only when an image
    /// has no fingerprint, which an ingest always takes).
    pub fn look_alikes(&self) -> Option<Duplicates> {
        Duplicates::look_alikes(self.images.iter().map(ImageRecord::image_ref))
    }

    /// Both reports, as a dataset's record holds them. Finding look-alikes grows as the square
    /// of the images: a server works them out on a blocking thread, not on its async runtime.
    pub fn reports(&self) -> Reports {
        Reports { duplicates: self.duplicates(), look_alikes: self.look_alikes() }
    }
}

/// An upload's reports of repeated files and of pictures that look alike ([`Ingested::reports`]).
#[derive(Debug, Clone)]
pub struct Reports {
    pub duplicates: Duplicates,
    pub look_alikes: Option<Duplicates>,
}

/// Bounds on what one ingest may unpack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestLimits {
    /// Most bytes unpacked from one upload (the sum of the files read; for tar, every entry,
    /// because a tar stream is read through). Beyond it the ingest fails with
    /// [`IngestError::TooLarge`].
    pub max_extracted_bytes: u64,
    /// Most entries (files, folders, links) in one archive, or rows in one Parquet file.
    pub max_entries: u64,
    /// Largest single image file, in bytes; larger files are rejected one by one.
    pub max_image_bytes: u64,
    /// Largest image, in pixels; larger images are rejected one by one.
    pub max_image_pixels: u64,
}

impl Default for IngestLimits {
    fn default() -> Self {
        Self {
            max_extracted_bytes: 8 * 1024 * 1024 * 1024,
            max_entries: 200_000,
            max_image_bytes: 64 * 1024 * 1024,
            max_image_pixels: imaging::DEFAULT_MAX_PIXELS,
        }
    }
}

/// Why an upload as a whole was refused. Problems with single files are not errors: they are
/// listed in [`Ingested::rejected`].
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Not a zip, tar, tar.gz or Parquet file.
    #[error("{0}")]
    Unsupported(String),
    /// A supported format whose structure is broken.
    #[error("{0}")]
    Corrupt(String),
    /// A Parquet file without the columns a Hugging Face image dataset has.
    #[error("{0}")]
    InvalidParquet(String),
    /// More entries than [`IngestLimits::max_entries`].
    #[error("{0}")]
    TooManyEntries(String),
    /// More bytes to unpack than [`IngestLimits::max_extracted_bytes`] (zip bombs end here).
    #[error("{0}")]
    TooLarge(String),
    /// Not one file was a usable image.
    #[error("{}", no_images_message(*.rejected, .example.as_ref()))]
    NoImages { rejected: usize, example: Option<Rejected> },
    /// A classifier needs at least two classes.
    #[error("{}", too_few_classes_message(.classes))]
    TooFewClasses { classes: Vec<String> },
    /// A class folder (or Parquet class name) without a single usable image.
    #[error("class '{class}' has no usable image")]
    EmptyClass { class: String },
    /// The caller gave up (its client went away); nothing was stored for it.
    #[error("the ingest was cancelled")]
    Cancelled,
    /// The memory budget for work in flight stayed spent for [`MEMORY_WAIT`] (not the upload's
    /// fault; nothing was stored for it).
    #[error("{0}")]
    OverBudget(String),
    /// Reading the upload or writing a blob failed (not the client's fault).
    #[error("i/o error during ingest: {0}")]
    Io(#[from] io::Error),
}

fn no_images_message(rejected: usize, example: Option<&Rejected>) -> String {
    match example {
        Some(r) => format!(
            "the upload contains no usable image ({rejected} file(s) rejected, e.g. '{}': {})",
            r.file, r.reason
        ),
        None => "the upload contains no image files in a class folder".to_string(),
    }
}

fn too_few_classes_message(classes: &[String]) -> String {
    match classes {
        [only] => format!("the upload has a single class ('{only}'); a classifier needs at least 2"),
        _ => "the upload has no class; a classifier needs at least 2".to_string(),
    }
}

/// How far an ingest has got, as it reports after each entry (file, folder or Parquet row).
///
/// Every format is read in two passes: the first lists the entries (and, for a tar, reads the
/// whole stream to do so: gigabytes for a big tar.gz), the second checks each one (reads it,
/// decodes an image, stores its blob). Zip, folders and Parquet list theirs at once, so only a
/// tar reports [`Progress::Listing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Members of a tar listed so far.
    Listing { listed: u64 },
    /// `checked` of the upload's `entries` entries handled.
    Checking { checked: u64, entries: u64 },
}

/// Ingests `source` into `store`.
///
/// `source` is a file (zip, tar or gzip-compressed tar, recognised by its first bytes whatever its
/// name, or Parquet) or a folder in the same image-folder layout as archives; links inside a folder
/// are not followed. `on_progress` is called after each entry of each pass (see [`Progress`]).
pub fn ingest(
    source: &Path,
    store: &BlobStore,
    limits: &IngestLimits,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<Ingested, IngestError> {
    ingest_cancellable(source, store, limits, on_progress, &AtomicBool::new(false), &MemoryBudget::unlimited(), Purpose::Dataset)
}

/// How long an entry waits for its bytes (or an image for its decode) when the memory budget is
/// spent, before the upload is refused with [`IngestError::OverBudget`].
pub const MEMORY_WAIT: Duration = Duration::from_secs(30);

/// What an upload is for, which decides how few classes it may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A dataset of its own: at least two classes.
    Dataset,
    /// Images to add to a dataset, which has classes of its own: one class is enough (more
    /// pictures of one class is the usual addition), and only the classes it has files of need
    /// a usable image.
    Addition,
}

/// [`ingest`], for `purpose`, stopping with [`IngestError::Cancelled`] at the next entry once
/// `cancel` is set (the service sets it when the uploading client disconnects), with the bytes
/// of each entry read and each image decoded reserved from `memory` while they are held.
pub fn ingest_cancellable(
    source: &Path,
    store: &BlobStore,
    limits: &IngestLimits,
    on_progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
    memory: &Arc<MemoryBudget>,
    purpose: Purpose,
) -> Result<Ingested, IngestError> {
    let mut sink = Sink::new(store, limits, on_progress, cancel);
    sink.memory = memory.clone();
    sink.purpose = purpose;
    // Archive and Parquet readers are not hardened against every malformed input; a panic inside
    // one is the upload's fault, so it is answered as a damaged file, not a crashed request.
    let declared_classes = match catch_unwind(AssertUnwindSafe(|| read_source(source, &mut sink))) {
        Ok(result) => result?,
        Err(_) => {
            tracing::error!(source = %source.display(), "a decoder panicked during ingest");
            return Err(IngestError::Corrupt("the upload could not be decoded".into()));
        }
    };
    sink.finish(declared_classes)
}

/// Reads `source` in its format; returns the classes it names, used or not.
fn read_source(source: &Path, sink: &mut Sink<'_>) -> Result<BTreeSet<String>, IngestError> {
    let meta = std::fs::symlink_metadata(source)?;
    if meta.is_dir() {
        return archive::read_folder(source, sink);
    }
    if !meta.is_file() {
        return Err(IngestError::Unsupported(format!("{} is neither a file nor a folder", source.display())));
    }
    let mut file = std::fs::File::open(source)?;
    match archive::detect(&mut file)? {
        archive::Format::Zip => archive::read_zip(file, sink),
        archive::Format::Tar => archive::read_tar(source, false, sink),
        archive::Format::TarGz => archive::read_tar(source, true, sink),
        archive::Format::Parquet => parquet::read(file, sink),
    }
}

/// What reading one entry produced: its bytes, or the fact that it is over the per-file limit
/// (in which case only `limit + 1` bytes were read).
#[derive(Debug)]
enum Content {
    /// The bytes, and their share of the memory budget (when they were reserved).
    Bytes(Vec<u8>, Option<Reservation>),
    TooBig,
    /// More bytes than the whole memory budget for work in flight: waiting would never help.
    OverWholeBudget(u64),
}

fn over_budget(bytes: u64) -> IngestError {
    IngestError::OverBudget(format!(
        "the service's memory budget for work in flight stayed spent for {} s while this upload needed {bytes} bytes for one file; retry shortly",
        MEMORY_WAIT.as_secs()
    ))
}

/// Collects the outcome of the second pass: counts entries and unpacked bytes against the limits,
/// validates and stores images, and records rejections.
struct Sink<'a> {
    store: &'a BlobStore,
    limits: &'a IngestLimits,
    on_progress: &'a mut dyn FnMut(Progress),
    cancel: &'a AtomicBool,
    /// What entries being read and images being decoded reserve (unlimited unless set).
    memory: Arc<MemoryBudget>,
    /// Entries handled by the second pass.
    entries: u64,
    /// The entries the second pass will handle, as the first pass found them.
    planned: u64,
    extracted: u64,
    images: Vec<ImageRecord>,
    rejected: Vec<Rejected>,
    rejected_total: u64,
    /// What the upload is for.
    purpose: Purpose,
    /// The classes of the files that were read as images, usable or not.
    tried: BTreeSet<String>,
}

impl<'a> Sink<'a> {
    fn new(
        store: &'a BlobStore,
        limits: &'a IngestLimits,
        on_progress: &'a mut dyn FnMut(Progress),
        cancel: &'a AtomicBool,
    ) -> Self {
        Self {
            store,
            limits,
            on_progress,
            cancel,
            memory: MemoryBudget::unlimited(),
            entries: 0,
            planned: 0,
            extracted: 0,
            images: Vec::new(),
            rejected: Vec::new(),
            rejected_total: 0,
            purpose: Purpose::Dataset,
            tried: BTreeSet::new(),
        }
    }

    fn reject(&mut self, file: impl Into<String>, reason: impl Into<String>) {
        self.rejected_total += 1;
        if self.rejected.len() < MAX_REJECTED_LISTED {
            self.rejected.push(Rejected { file: file.into(), reason: reason.into() });
        }
    }

    /// Reports one more member of a tar listed by the first pass, and stops a cancelled ingest.
    fn listed(&mut self, listed: u64) -> Result<(), IngestError> {
        (self.on_progress)(Progress::Listing { listed });
        check_cancelled(self.cancel)
    }

    /// Starts the second pass, over the `entries` the first found.
    fn plan(&mut self, entries: u64) {
        self.planned = entries;
        (self.on_progress)(Progress::Checking { checked: 0, entries });
    }

    /// Marks one entry as handled, reports progress, and stops a cancelled ingest.
    fn entry_done(&mut self) -> Result<(), IngestError> {
        self.entries += 1;
        // Each format checks its own count up front; this holds whatever a header claimed.
        if self.entries > self.limits.max_entries {
            return Err(IngestError::TooManyEntries(format!("the upload has more than the limit of {} entries", self.limits.max_entries)));
        }
        // A Parquet file whose row groups hold more rows than their headers said.
        let entries = self.planned.max(self.entries);
        (self.on_progress)(Progress::Checking { checked: self.entries, entries });
        check_cancelled(self.cancel)
    }

    /// The rejection reason for a file whose size is known to be over the per-file limit.
    fn too_big_reason(&self, size: Option<u64>) -> String {
        match size {
            Some(size) => {
                format!("file is {size} bytes, over the limit of {} bytes per image", self.limits.max_image_bytes)
            }
            None => format!("file is over the limit of {} bytes per image", self.limits.max_image_bytes),
        }
    }

    /// Reads one entry's content without trusting any declared size: at most one byte more than
    /// the per-file limit, and never past the upload's remaining unpack budget.
    fn read_entry(&mut self, reader: &mut dyn Read, size_hint: u64) -> Result<io::Result<Content>, IngestError> {
        let budget = self.limits.max_extracted_bytes.saturating_sub(self.extracted);
        let cap = self.limits.max_image_bytes.min(budget).saturating_add(1);
        // Cap the initial allocation too: the hint comes from the archive and may lie.
        let initial = size_hint.min(cap).min(8 * 1024 * 1024);
        // The entry's bytes are held until it is stored (or rejected): reserve what the header
        // says (never more than the whole budget: the header may lie), and the rest if it turns
        // out larger.
        let mut held = self.reserve(size_hint.min(cap).min(self.memory.limit()))?;
        let mut bytes = Vec::with_capacity(usize::try_from(initial).unwrap_or(0));
        let read = reader.take(cap).read_to_end(&mut bytes);
        let len = bytes.len() as u64;
        self.extracted = self.extracted.saturating_add(len);
        if self.extracted > self.limits.max_extracted_bytes {
            return Err(self.too_large());
        }
        if let Err(e) = read {
            return Ok(Err(e));
        }
        if len > self.limits.max_image_bytes {
            return Ok(Ok(Content::TooBig));
        }
        if len > self.memory.limit() {
            return Ok(Ok(Content::OverWholeBudget(len)));
        }
        let more = len.saturating_sub(held.bytes());
        if more > 0 && !held.try_grow(more) {
            held.absorb(self.reserve(more)?);
        }
        Ok(Ok(Content::Bytes(bytes, Some(held))))
    }

    /// Why a file is refused whose handling needs `needed` bytes at once, more than the whole
    /// memory budget (no wait would make room for it).
    fn over_whole_budget_reason(&self, what: &str, needed: u64) -> String {
        format!(
            "{what} needs {needed} bytes at once, more than the service's whole memory budget for work in flight ({} bytes, --max-inflight-bytes)",
            self.memory.limit()
        )
    }

    /// Reserves `bytes` of the memory budget, waiting up to [`MEMORY_WAIT`].
    fn reserve(&self, bytes: u64) -> Result<Reservation, IngestError> {
        self.memory.reserve_blocking(bytes, MEMORY_WAIT).ok_or_else(|| over_budget(bytes))
    }

    /// The error for an upload that unpacks to more than the limit.
    fn too_large(&self) -> IngestError {
        IngestError::TooLarge(format!(
            "the upload unpacks to more than the limit of {} bytes",
            self.limits.max_extracted_bytes
        ))
    }

    /// Validates one image and stores it, or records why it was rejected.
    fn add(&mut self, file: String, label: String, split: Split, content: Content) -> Result<(), IngestError> {
        if !self.tried.contains(&label) {
            self.tried.insert(label.clone());
        }
        let (bytes, _held) = match content {
            Content::Bytes(bytes, held) => (bytes, held),
            Content::TooBig => {
                let reason = self.too_big_reason(None);
                self.reject(file, reason);
                return Ok(());
            }
            Content::OverWholeBudget(size) => {
                let reason = self.over_whole_budget_reason("holding the file", size);
                self.reject(file, reason);
                return Ok(());
            }
        };
        let look = match imaging::decode_rgb_within(&bytes, self.limits.max_image_pixels, &self.memory, MEMORY_WAIT) {
            Ok(image) => look_alike::fingerprint(&image),
            Err(ImageError::OverBudget { needed }) if needed > self.memory.limit() => {
                let reason = self.over_whole_budget_reason("decoding the image", needed);
                self.reject(file, reason);
                return Ok(());
            }
            Err(ImageError::OverBudget { needed }) => return Err(over_budget(needed)),
            Err(e) => {
                self.reject(file, e.to_string());
                return Ok(());
            }
        };
        let blob = self.store.put(&bytes)?;
        self.images.push(ImageRecord { file, label, split, blob, look: Some(look) });
        Ok(())
    }

    /// Checks the dataset as a whole. `declared` are the classes the upload names even where no
    /// image of theirs survived (class folders, Parquet class names). An addition to a dataset
    /// is held only to the classes it has files of: a Parquet file's class names list every class
    /// of the set it was exported from, and an addition may be a part of one.
    fn finish(mut self, declared: BTreeSet<String>) -> Result<Ingested, IngestError> {
        if self.images.is_empty() {
            return Err(IngestError::NoImages {
                rejected: usize::try_from(self.rejected_total).unwrap_or(usize::MAX),
                example: self.rejected.into_iter().next(),
            });
        }
        let (mut classes, needed) = match self.purpose {
            Purpose::Dataset => (declared, 2),
            Purpose::Addition => (std::mem::take(&mut self.tried), 1),
        };
        classes.extend(self.images.iter().map(|i| i.label.clone()));
        if classes.len() < needed {
            return Err(IngestError::TooFewClasses { classes: classes.into_iter().collect() });
        }
        let used: BTreeSet<&str> = self.images.iter().map(|i| i.label.as_str()).collect();
        if let Some(empty) = classes.iter().find(|c| !used.contains(c.as_str())) {
            return Err(IngestError::EmptyClass { class: empty.clone() });
        }
        // The rows about to reference these blobs must not outlive the blobs' directory entries.
        self.store.sync()?;
        Ok(Ingested {
            images: self.images,
            rejected: self.rejected,
            rejected_total: self.rejected_total,
            classes: classes.into_iter().collect(),
        })
    }
}

/// [`IngestError::Cancelled`] once `cancel` is set.
fn check_cancelled(cancel: &AtomicBool) -> Result<(), IngestError> {
    if cancel.load(Ordering::Relaxed) { Err(IngestError::Cancelled) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: &str, split: Split) -> ImageRecord {
        ImageRecord { file: "f".into(), label: label.into(), split, blob: "b".into(), look: None }
    }

    #[test]
    fn counts_list_every_class_in_every_split() {
        let ingested = Ingested {
            images: vec![record("cat", Split::Train), record("cat", Split::Train), record("dog", Split::Test)],
            rejected: vec![],
            rejected_total: 0,
            classes: vec!["cat".into(), "dog".into()],
        };
        let counts = ingested.counts();
        assert_eq!(counts.train, BTreeMap::from([("cat".into(), 2), ("dog".into(), 0)]));
        assert_eq!(counts.validation, BTreeMap::from([("cat".into(), 0), ("dog".into(), 0)]));
        assert_eq!(counts.test, BTreeMap::from([("cat".into(), 0), ("dog".into(), 1)]));
        let json = serde_json::to_value(&counts).unwrap();
        assert_eq!(json["train"]["cat"], 2);
        assert!(json["validation"].is_object());
    }

    #[test]
    fn split_names_round_trip() {
        for split in Split::ALL {
            assert_eq!(split.as_str().parse::<Split>().unwrap(), split);
            assert_eq!(serde_json::to_value(split).unwrap(), split.as_str());
        }
        assert_eq!(Split::from_name("val"), Some(Split::Validation));
        assert_eq!(Split::from_name("Train"), None);
        assert!("dev".parse::<Split>().is_err());
    }

    fn sink_fixture(limits: IngestLimits, f: impl FnOnce(&mut Sink<'_>)) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let mut progress = |_| {};
        let cancel = AtomicBool::new(false);
        let mut sink = Sink::new(&store, &limits, &mut progress, &cancel);
        f(&mut sink);
    }

    #[test]
    fn an_endless_entry_is_cut_at_the_per_file_limit() {
        let limits = IngestLimits { max_image_bytes: 1000, ..IngestLimits::default() };
        sink_fixture(limits, |sink| {
            // A lying header: declares 10 bytes, produces an endless stream.
            let content = sink.read_entry(&mut io::repeat(0), 10).unwrap().unwrap();
            assert!(matches!(content, Content::TooBig));
            assert_eq!(sink.extracted, 1001);
        });
    }

    #[test]
    fn an_entry_larger_than_the_whole_memory_budget_is_refused_not_waited_for() {
        sink_fixture(IngestLimits { max_image_bytes: 10_000, ..IngestLimits::default() }, |sink| {
            sink.memory = MemoryBudget::new(1000);
            // The header says 10 bytes; the entry holds 5,000: refused on its own, at once.
            let content = sink.read_entry(&mut io::repeat(1).take(5000), 10).unwrap().unwrap();
            assert!(matches!(content, Content::OverWholeBudget(5000)));
            sink.add("big.bin".into(), "cat".into(), Split::Train, content).unwrap();
            assert!(sink.rejected[0].reason.contains("more than the service's whole memory budget"), "{:?}", sink.rejected);
            // One that fits is held within the budget, whatever its header said.
            let content = sink.read_entry(&mut io::repeat(1).take(900), 1_000_000).unwrap().unwrap();
            assert!(matches!(content, Content::Bytes(ref b, Some(ref held)) if b.len() == 900 && held.bytes() == 1000));
        });
    }

    #[test]
    fn the_unpack_budget_stops_the_upload() {
        let limits = IngestLimits { max_image_bytes: 1000, max_extracted_bytes: 2500, ..IngestLimits::default() };
        sink_fixture(limits, |sink| {
            for _ in 0..2 {
                let content = sink.read_entry(&mut io::repeat(1).take(900), 900).unwrap().unwrap();
                assert!(matches!(content, Content::Bytes(ref b, _) if b.len() == 900));
            }
            let err = sink.read_entry(&mut io::repeat(1), 1).unwrap_err();
            assert!(matches!(err, IngestError::TooLarge(_)), "{err:?}");
            // Never more than one byte past the budget was unpacked.
            assert_eq!(sink.extracted, 2501);
        });
    }

    #[test]
    fn finish_refuses_single_class_unless_adding_and_empty_class() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let limits = IngestLimits::default();
        let mut progress = |_| {};
        let cancel = AtomicBool::new(false);

        let mut sink = Sink::new(&store, &limits, &mut progress, &cancel);
        sink.images.push(record("cat", Split::Train));
        let err = sink.finish(BTreeSet::new()).unwrap_err();
        assert!(matches!(err, IngestError::TooFewClasses { ref classes } if classes == &["cat"]), "{err:?}");
        // Images added to a dataset may be of one class (the dataset has the others).
        // And they need not have every class they name (a Parquet file's class names are those
        // of the whole set), but a class of files that were tried needs a usable image.
        let mut sink = Sink::new(&store, &limits, &mut progress, &cancel);
        sink.purpose = Purpose::Addition;
        sink.images.push(record("cat", Split::Train));
        sink.tried.insert("cat".into());
        assert_eq!(sink.finish(BTreeSet::from(["cat".to_string(), "dog".to_string()])).unwrap().classes, ["cat"]);
        let mut sink = Sink::new(&store, &limits, &mut progress, &cancel);
        sink.purpose = Purpose::Addition;
        sink.images.push(record("cat", Split::Train));
        sink.add("bird/broken.jpg".into(), "bird".into(), Split::Train, Content::Bytes(b"no image".to_vec(), None)).unwrap();
        let err = sink.finish(BTreeSet::new()).unwrap_err();
        assert!(matches!(err, IngestError::EmptyClass { ref class } if class == "bird"), "{err:?}");

        let mut sink = Sink::new(&store, &limits, &mut progress, &cancel);
        sink.images.push(record("cat", Split::Train));
        sink.images.push(record("dog", Split::Train));
        let err = sink.finish(BTreeSet::from(["bird".to_string()])).unwrap_err();
        assert!(matches!(err, IngestError::EmptyClass { ref class } if class == "bird"), "{err:?}");

        let mut sink = Sink::new(&store, &limits, &mut progress, &cancel);
        sink.reject("a.txt", "not an image");
        let err = sink.finish(BTreeSet::new()).unwrap_err();
        assert!(err.to_string().contains("a.txt"), "{err}");
    }

    #[test]
    fn rejections_past_the_listing_cap_are_counted_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let limits = IngestLimits::default();
        let mut progress = |_| {};
        let cancel = AtomicBool::new(false);
        let mut sink = Sink::new(&store, &limits, &mut progress, &cancel);
        for i in 0..MAX_REJECTED_LISTED + 250 {
            sink.reject(format!("junk/{i}.txt"), "not an image");
        }
        sink.images.push(record("cat", Split::Train));
        sink.images.push(record("dog", Split::Train));
        let ingested = sink.finish(BTreeSet::new()).unwrap();
        assert_eq!(ingested.rejected.len(), MAX_REJECTED_LISTED);
        assert_eq!(ingested.rejected_total, MAX_REJECTED_LISTED as u64 + 250);
        assert_eq!(ingested.rejected[0].file, "junk/0.txt");
    }

    #[test]
    fn a_cancelled_ingest_stops_at_the_next_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let limits = IngestLimits::default();
        let mut progress = |_| {};
        let cancel = AtomicBool::new(false);
        let mut sink = Sink::new(&store, &limits, &mut progress, &cancel);
        sink.entry_done().unwrap();
        cancel.store(true, Ordering::Relaxed);
        assert!(matches!(sink.entry_done(), Err(IngestError::Cancelled)));
    }
}
