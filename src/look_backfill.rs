//! Fingerprints the images of datasets stored before look-alike fingerprints (or those of mirror
//! images) were taken ([`crate::dataset::look_alike`]), once, in the background after start-up,
//! so that an upgraded service reports their look-alikes and its jobs keep them together as for
//! new uploads.
//!
//! One dataset at a time, oldest first, each image decoded on one blocking thread within the
//! memory budget: the work is that of the upload's decode, spread out so as not to crowd out
//! requests and jobs. A dataset deleted meanwhile is skipped; one whose blob cannot be read or
//! decoded is left as it is (its `look_alikes` stays `null`) and tried again at the next start.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::budget::MemoryBudget;
use crate::dataset::look_alike::{self, Look};
use crate::db::Pool;
use crate::imaging;
use crate::objects::Objects;

/// What fingerprinting reads: the database, the blobs, and the budget and limit decodes keep to.
#[derive(Clone)]
pub struct Backfill {
    pub db: Pool,
    pub objects: Objects,
    pub memory: Arc<MemoryBudget>,
    pub max_image_pixels: u64,
}

/// Fingerprints every dataset that has no look-alike report; logs what it did.
pub async fn run(state: Backfill) {
    let ids = match crate::db::datasets::without_look_alikes(&state.db).await {
        Ok(ids) => ids,
        Err(e) => return tracing::warn!(error = %e, "could not list the datasets to fingerprint; the next start tries again"),
    };
    if ids.is_empty() {
        return;
    }
    tracing::info!(datasets = ids.len(), "fingerprinting the images of datasets stored before look-alikes were reported");
    for id in ids {
        match backfill(&state, &id).await {
            Ok(Some(images)) => tracing::info!(dataset = %id, images, "fingerprinted a dataset's images; its look-alikes are reported"),
            Ok(None) => tracing::debug!(dataset = %id, "dataset gone or fingerprinted elsewhere"),
            Err(e) => tracing::warn!(dataset = %id, error = format!("{e:#}"), "could not fingerprint a dataset's images; the next start tries again"),
        }
    }
}

/// Fingerprints one dataset's images; how many distinct files, or `None` where the dataset is
/// gone or was done meanwhile.
pub async fn backfill(state: &Backfill, id: &str) -> anyhow::Result<Option<usize>> {
    let rows = crate::db::datasets::images(&state.db, id).await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let blobs: Vec<String> = rows.iter().filter(|r| r.look().is_none()).map(|r| r.blob.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    let paths = state.objects.blob_paths(&blobs).await?;
    let (memory, max_pixels) = (state.memory.clone(), state.max_image_pixels);
    let looks = tokio::task::spawn_blocking(move || -> anyhow::Result<HashMap<String, Look>> {
        blobs
            .into_iter()
            .zip(paths)
            .map(|(blob, path): (String, PathBuf)| {
                let bytes = std::fs::read(&path).with_context(|| format!("reading blob {blob}"))?;
                let image = imaging::decode_rgb_within(&bytes, max_pixels, &memory, crate::dataset::MEMORY_WAIT)
                    .with_context(|| format!("decoding blob {blob}"))?;
                Ok((blob, look_alike::fingerprint(&image)))
            })
            .collect()
    })
    .await??;
    let count = looks.len();
    Ok(crate::db::datasets::set_looks(&state.db, id, &looks).await?.then_some(count))
}
