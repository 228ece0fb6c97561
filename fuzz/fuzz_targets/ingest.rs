//! Fuzzes dataset ingest: the bytes are an upload (zip, tar, tar.gz or Parquet, recognised by
//! content), ingested into a blob store as the service does. A panic that escapes `ingest`, a
//! sanitizer report, a hang or an out-of-memory is a finding; errors are the expected outcome for
//! most inputs.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use vitforge::dataset::{BlobStore, IngestLimits, ingest};

/// Scratch space on a RAM disk when there is one: blob writes are flushed to disk.
static DIR: LazyLock<tempfile::TempDir> = LazyLock::new(|| {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.expect("scratch dir")
});

/// The service's limits scaled down, so each input stays fast while every limit can be reached.
fn limits() -> IngestLimits {
    IngestLimits { max_extracted_bytes: 64 << 20, max_entries: 10_000, max_image_bytes: 8 << 20, max_image_pixels: 4_000_000 }
}

/// Panics that `ingest` itself catches (a decoder crate panicking on a malformed file; the service
/// answers those 400 `corrupt_archive`) are not findings: libfuzzer-sys's panic hook would abort on
/// them, so a silent hook replaces it. A panic that escapes `ingest` still aborts the run.
static QUIET_PANICS: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    QUIET_PANICS.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let upload = DIR.path().join("upload");
    std::fs::write(&upload, data).expect("write input");
    // A fresh store per input: a long run would otherwise fill the RAM disk with accepted images.
    let _ = std::fs::remove_dir_all(DIR.path().join("blobs"));
    let store = BlobStore::open(DIR.path().join("blobs")).expect("blob store");
    if let Ok(ingested) = ingest(&upload, &store, &limits(), &mut |_| {}) {
        assert!(!ingested.images.is_empty(), "an accepted upload has images");
        assert!(ingested.classes.len() >= 2, "an accepted upload has two classes");
        assert!(ingested.rejected.len() <= vitforge::dataset::MAX_REJECTED_LISTED);
        for image in &ingested.images {
            assert!(store.path(&image.blob).expect("blob name").is_file(), "every accepted image is stored");
        }
    }
});
