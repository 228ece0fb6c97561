//! Removal of blobs that no dataset references any more: right after a dataset is deleted, and as a
//! full sweep at start-up and every `--sweep-secs` (a crash between an upload's blob writes and its
//! insert leaves orphans, and so does a failed collection after a delete).
//!
//! Blobs are shared between datasets, and an upload whose image is already stored writes nothing
//! and only references the existing blob. So uploads hold the [`BlobLock`] shared from their first
//! blob write until their rows are committed, and collection holds it exclusively: a blob an upload
//! is about to reference is never removed under it.

use std::sync::Arc;

use anyhow::Context;
use crate::db::Pool;
use tokio::sync::{OwnedRwLockWriteGuard, RwLock};

use crate::dataset::BlobStore;
use crate::db;
use crate::objects::Objects;

/// Shared by uploads in flight, exclusive for collection.
pub type BlobLock = Arc<RwLock<()>>;

/// Removes the blobs among `candidates` that no dataset references (from the data folder and the
/// object store); returns how many went. The guard proves the caller holds the lock exclusively.
pub async fn remove_unreferenced(
    pool: &Pool,
    store: &Objects,
    candidates: &[String],
    _exclusive: &OwnedRwLockWriteGuard<()>,
) -> anyhow::Result<usize> {
    let orphans = db::datasets::unreferenced(pool, candidates).await?;
    store.remove_blobs(&orphans).await
}

/// Collects the blobs of a deleted dataset. Done now when no upload is in flight; otherwise in the
/// background once the uploads finish, so the client deleting does not wait for them. With
/// `shared_store` (processes of several roles share the blobs), uploads of the other processes
/// count too: on PostgreSQL through its advisory lock ([`db::blob_lock`]), taken before the
/// in-process one (its holders wait on the database, not on this process); on SQLite, which has
/// none, the blobs are left for the next start-up sweep of a `--role all` process.
pub async fn collect_after_delete(
    pool: &Pool,
    store: &Objects,
    lock: &BlobLock,
    candidates: Vec<String>,
    shared_store: bool,
) -> anyhow::Result<()> {
    if shared_store && db::Backend::of(pool) != db::Backend::Postgres {
        tracing::info!(blobs = candidates.len(), "blobs of a deleted dataset left for the next --role all start-up sweep (SQLite has no lock across processes)");
        return Ok(());
    }
    let across = if shared_store { db::blob_lock(pool, true, false).await? } else { None };
    if (across.is_some() || !shared_store)
        && let Ok(guard) = lock.clone().try_write_owned()
    {
        let removed = remove_unreferenced(pool, store, &candidates, &guard).await?;
        tracing::debug!(removed, "removed unreferenced blobs");
        return Ok(());
    }
    drop(across);
    let (pool, store, lock) = (pool.clone(), store.clone(), lock.clone());
    tokio::spawn(async move {
        let collected = async {
            let _across = if shared_store { db::blob_lock(&pool, true, true).await? } else { None };
            let guard = lock.write_owned().await;
            remove_unreferenced(&pool, &store, &candidates, &guard).await
        };
        match collected.await {
            Ok(removed) => tracing::debug!(removed, "removed unreferenced blobs after uploads finished"),
            Err(e) => tracing::error!(error = ?e, "blob collection failed; the next start-up sweep retries"),
        }
    });
    Ok(())
}

/// Removes every stored blob no dataset references (in the data folder and the object store), and
/// temporary files a crash left behind.
pub async fn sweep(pool: &Pool, store: &Objects, lock: &BlobLock) -> anyhow::Result<usize> {
    let guard = lock.clone().write_owned().await;
    sweep_locked(pool, store, &guard).await
}

/// [`sweep`] now unless an upload is in flight (then `None`: the next sweep tries again). With
/// `shared_store` (processes of several roles share the blobs), uploads of every process count:
/// the sweep needs PostgreSQL's advisory lock exclusively, and on SQLite, which has none
/// ([`db::blob_lock`] gives `None` there), it is never done.
pub async fn sweep_if_idle(pool: &Pool, store: &Objects, lock: &BlobLock, shared_store: bool) -> anyhow::Result<Option<usize>> {
    let across = if shared_store {
        match db::blob_lock(pool, true, false).await? {
            Some(held) => Some(held),
            None => return Ok(None),
        }
    } else {
        None
    };
    let Ok(guard) = lock.clone().try_write_owned() else { return Ok(None) };
    let removed = sweep_locked(pool, store, &guard).await?;
    drop(across);
    Ok(Some(removed))
}

/// The sweep itself; the guard proves the caller holds the in-process lock exclusively.
async fn sweep_locked(pool: &Pool, store: &Objects, guard: &OwnedRwLockWriteGuard<()>) -> anyhow::Result<usize> {
    let listing = store.blobs().clone();
    let stored = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<String>> {
        // An hour is far longer than any single blob write, so such a file is abandoned.
        listing.remove_stale_temp_files(std::time::Duration::from_secs(3600))?;
        listing.list()
    })
    .await
    .context("blob listing task")?
    .with_context(|| format!("listing blobs in {}", store.blobs().root().display()))?;
    let mut stored: std::collections::BTreeSet<String> = stored.into_iter().collect();
    stored.extend(store.remote_blobs().await?);
    remove_unreferenced(pool, store, &stored.into_iter().collect::<Vec<_>>(), guard).await
}

/// Removes cached thumbnails (`<hash>` and [`THUMBNAIL_SUFFIX`] in `dir`) whose blob is gone,
/// and files of any other name (thumbnails made by an older version); returns how many.
///
/// [`THUMBNAIL_SUFFIX`]: crate::paths::THUMBNAIL_SUFFIX
pub fn remove_orphan_thumbnails(store: &BlobStore, dir: &std::path::Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let hash = name.strip_suffix(crate::paths::THUMBNAIL_SUFFIX);
        if hash.is_some_and(|hash| store.path(hash).is_ok_and(|blob| blob.exists())) {
            continue;
        }
        std::fs::remove_file(&path)?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::dataset::{ImageRecord, Ingested, Split};

    fn ingested(store: &BlobStore, contents: &[&[u8]]) -> Ingested {
        let images = contents
            .iter()
            .enumerate()
            .map(|(i, bytes)| ImageRecord {
                file: format!("{i}.png"),
                label: if i % 2 == 0 { "a" } else { "b" }.to_string(),
                split: Split::Train,
                blob: store.put(bytes).unwrap(),
                look: None,
            })
            .collect();
        Ingested { images, rejected: vec![], rejected_total: 0, classes: vec!["a".into(), "b".into()] }
    }

    #[tokio::test]
    async fn collection_waits_for_uploads_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let pool = db::connect(&db::sqlite_url(&dir.path().join("test.db"))).await.unwrap();
        let objects = Objects::local(crate::paths::DataPaths::new(dir.path())).unwrap();
        let store = objects.blobs().clone();
        let lock = BlobLock::default();
        let first = ingested(&store, &[b"one", b"two"]);
        let dataset = db::datasets::insert(&pool, "d", &first, first.reports()).await.unwrap();

        // An upload in flight that found b"two" already stored and is about to reference it.
        let upload = lock.clone().read_owned().await;
        let db::datasets::Deleted::Removed { blobs } = db::datasets::delete(&pool, &dataset.id).await.unwrap() else {
            panic!("not removed");
        };
        collect_after_delete(&pool, &objects, &lock, blobs, false).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(store.list().unwrap().len(), 2, "collected while an upload held the lock");
        let second = ingested(&store, &[b"two", b"three"]);
        db::datasets::insert(&pool, "e", &second, second.reports()).await.unwrap();
        drop(upload);

        // Once the upload is done, only the blob nobody references goes.
        let one = BlobStore::hash(b"one");
        for _ in 0..100 {
            if !store.list().unwrap().contains(&one) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut left = store.list().unwrap();
        left.sort();
        let mut expected = vec![BlobStore::hash(b"two"), BlobStore::hash(b"three")];
        expected.sort();
        assert_eq!(left, expected);
    }
}
