//! Queries on `datasets` and `dataset_images`.

use std::collections::HashMap;

use serde::Serialize;

use crate::dataset::edits::Source;
use crate::dataset::look_alike::Look;
use crate::dataset::{Duplicates, ImageRecord, ImageRef, Ingested, Rejected, Reports, Split, SplitCounts};
use crate::db::{Cursor, Listed, Page, Pool, RowLock, lock_row, new_id, now};

/// Rows per multi-row `insert` (9 parameters each, well under SQLite's parameter limit and
/// PostgreSQL's 65,535).
const INSERT_CHUNK: usize = 500;
/// Blob names per `in (...)` lookup.
const LOOKUP_CHUNK: usize = 500;

/// A stored dataset, as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dataset {
    pub id: String,
    pub name: String,
    pub created_at: String,
    pub num_images: u64,
    /// Sorted; a class's index here is its label id.
    pub classes: Vec<String>,
    pub counts: SplitCounts,
    /// The first [`crate::dataset::MAX_REJECTED_LISTED`] files not used, with reasons.
    pub rejected: Vec<Rejected>,
    /// How many files were not used, including those past the listing cap.
    pub rejected_total: u64,
    /// The images that are the same file as another (shown with their sentence).
    #[serde(serialize_with = "crate::dataset::serialize_repeats")]
    pub duplicates: Duplicates,
    /// The images that look like another though their files differ; `None` for a dataset
    /// stored before images were fingerprinted.
    #[serde(serialize_with = "crate::dataset::serialize_look_alikes")]
    pub look_alikes: Option<Duplicates>,
    /// For a corrected copy of another dataset, that dataset and what changed; `None` for an
    /// upload.
    pub source: Option<Source>,
}

/// One image of a dataset, as training reads it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ImageRow {
    /// Blob name in the store (`BlobStore::path`).
    pub blob: String,
    pub label: String,
    #[sqlx(try_from = "String")]
    pub split: Split,
    /// Its name in the upload.
    pub file: String,
    /// Its look-alike fingerprint's shape, mirror image's shape (the u64s' bits), turned shapes
    /// and colour ([`Look::to_columns`]); null for an image stored before they were taken.
    pub look: Option<i64>,
    pub look_mirror: Option<i64>,
    pub look_turned: Option<Vec<u8>>,
    pub look_colour: Option<i32>,
}

impl ImageRow {
    /// Its look-alike fingerprint.
    pub fn look(&self) -> Option<Look> {
        Look::from_columns(self.look, self.look_mirror, self.look_turned.as_deref(), self.look_colour)
    }

    /// Its look-alike fingerprint as far as an older version took it ([`Look::from_columns_so_far`]).
    pub fn look_so_far(&self) -> Option<Look> {
        Look::from_columns_so_far(self.look, self.look_mirror, self.look_turned.as_deref(), self.look_colour)
    }

    /// The fields the duplicate summaries read.
    pub fn image_ref(&self) -> ImageRef<'_> {
        ImageRef { blob: &self.blob, file: &self.file, label: &self.label, split: self.split, look: self.look() }
    }

    /// The image as an ingest records it (for a copy of its dataset).
    pub fn into_record(self) -> ImageRecord {
        let look = self.look();
        ImageRecord { file: self.file, label: self.label, split: self.split, blob: self.blob, look }
    }
}

/// The outcome of [`delete`].
#[derive(Debug, PartialEq, Eq)]
pub enum Deleted {
    /// Gone; `blobs` are the blobs it referenced (some may still be used by other datasets).
    Removed {
        blobs: Vec<String>,
    },
    NotFound,
    /// Kept, because this queued or running job reads it.
    InUse {
        job_id: String,
    },
}

#[derive(sqlx::FromRow)]
struct DatasetRow {
    id: String,
    name: String,
    created_at: String,
    num_images: i64,
    classes: String,
    counts: String,
    rejected: String,
    rejected_total: i64,
    /// Null for a dataset stored before duplicates were worked out (see [`with_duplicates`]).
    duplicates: Option<String>,
    /// Null for a dataset stored before images were fingerprinted.
    look_alikes: Option<String>,
    /// Null for an upload.
    source: Option<String>,
}

impl DatasetRow {
    /// The dataset, with its `duplicates` (read or worked out by [`with_duplicates`]).
    fn into_dataset(self, duplicates: Duplicates) -> Result<Dataset, sqlx::Error> {
        let decode = |e: serde_json::Error| sqlx::Error::Decode(Box::new(e));
        let row = self;
        Ok(Dataset {
            id: row.id,
            name: row.name,
            created_at: row.created_at,
            num_images: u64::try_from(row.num_images).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            classes: serde_json::from_str(&row.classes).map_err(decode)?,
            counts: serde_json::from_str(&row.counts).map_err(decode)?,
            rejected: serde_json::from_str(&row.rejected).map_err(decode)?,
            rejected_total: u64::try_from(row.rejected_total).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            duplicates,
            look_alikes: row.look_alikes.as_deref().map(serde_json::from_str).transpose().map_err(decode)?,
            source: row.source.as_deref().map(serde_json::from_str).transpose().map_err(decode)?,
        })
    }
}

/// The dataset of a row, its duplicates worked out from its images and stored where the row was
/// written before they were (a dataset of an older version is read once more, then never again).
async fn with_duplicates(pool: &Pool, row: DatasetRow) -> Result<Dataset, sqlx::Error> {
    if let Some(text) = &row.duplicates {
        let duplicates = serde_json::from_str(text).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        return row.into_dataset(duplicates);
    }
    let images = images(pool, &row.id).await?;
    let duplicates = Duplicates::of(images.iter().map(ImageRow::image_ref));
    sqlx::query("update datasets set duplicates = $1 where id = $2 and duplicates is null")
        .bind(to_json(&duplicates)?)
        .bind(&row.id)
        .execute(pool)
        .await?;
    row.into_dataset(duplicates)
}

/// `($1, $2, …), ($n+1, …)`: `rows` groups of `width` numbered placeholders, which both backends
/// read (sqlx's `QueryBuilder` for the `Any` driver writes `?`, which PostgreSQL does not).
fn placeholder_rows(rows: usize, width: usize) -> String {
    let row = |r: usize| format!("({})", (1..=width).map(|c| format!("${}", r * width + c)).collect::<Vec<_>>().join(", "));
    (0..rows).map(row).collect::<Vec<_>>().join(", ")
}

fn to_json<T: Serialize>(value: &T) -> Result<String, sqlx::Error> {
    serde_json::to_string(value).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// Stores an uploaded dataset, its reports ([`Ingested::reports`]) and all its images in one
/// transaction.
pub async fn insert(pool: &Pool, name: &str, ingested: &Ingested, reports: Reports) -> Result<Dataset, sqlx::Error> {
    insert_from(pool, name, ingested, reports, None).await
}

/// [`insert`], for a dataset made from another (`source`, [`crate::dataset::edits`]) or uploaded
/// (`None`).
pub async fn insert_from(pool: &Pool, name: &str, ingested: &Ingested, reports: Reports, source: Option<Source>) -> Result<Dataset, sqlx::Error> {
    let dataset = Dataset {
        id: new_id(),
        name: name.to_string(),
        created_at: now(),
        num_images: ingested.images.len() as u64,
        classes: ingested.classes.clone(),
        counts: ingested.counts(),
        rejected: ingested.rejected.clone(),
        rejected_total: ingested.rejected_total,
        duplicates: reports.duplicates,
        look_alikes: reports.look_alikes,
        source,
    };
    let mut tx = pool.begin().await?;
    sqlx::query(
        "insert into datasets (id, name, created_at, num_images, classes, counts, rejected, rejected_total, duplicates, look_alikes, source) \
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&dataset.id)
    .bind(&dataset.name)
    .bind(&dataset.created_at)
    .bind(i64::try_from(dataset.num_images).unwrap_or(i64::MAX))
    .bind(to_json(&dataset.classes)?)
    .bind(to_json(&dataset.counts)?)
    .bind(to_json(&dataset.rejected)?)
    .bind(i64::try_from(dataset.rejected_total).unwrap_or(i64::MAX))
    .bind(to_json(&dataset.duplicates)?)
    .bind(dataset.look_alikes.as_ref().map(to_json).transpose()?)
    .bind(dataset.source.as_ref().map(to_json).transpose()?)
    .execute(&mut *tx)
    .await?;
    for chunk in ingested.images.chunks(INSERT_CHUNK) {
        let sql = format!(
            "insert into dataset_images (dataset_id, blob, label, split, file, look, look_mirror, look_turned, look_colour) values {}",
            placeholder_rows(chunk.len(), 9)
        );
        let mut insert = sqlx::query(sqlx::AssertSqlSafe(sql));
        for image in chunk {
            insert = insert.bind(&dataset.id).bind(&image.blob).bind(&image.label).bind(image.split.as_str()).bind(&image.file);
            let (shape, mirror, turned, colour) = match image.look.map(Look::to_columns) {
                Some(c) => (Some(c.shape), Some(c.mirror), Some(c.turned), Some(c.colour)),
                None => (None, None, None, None),
            };
            insert = insert.bind(shape).bind(mirror).bind(turned).bind(colour);
        }
        insert.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(dataset)
}

/// Every dataset, newest first.
pub async fn list(pool: &Pool, page: &Page) -> Result<Listed<Dataset>, sqlx::Error> {
    let (created_at, id, rows) = page.binds();
    let rows: Vec<DatasetRow> = sqlx::query_as(concat!(
        "select id, name, created_at, num_images, classes, counts, rejected, rejected_total, duplicates, look_alikes, source from datasets where ",
        newest_first_page!("$1", "$2", "$3")
    ))
    .bind(created_at)
    .bind(id)
    .bind(rows)
    .fetch_all(pool)
    .await?;
    let mut datasets = Vec::with_capacity(rows.len());
    for row in rows {
        datasets.push(with_duplicates(pool, row).await?);
    }
    Ok(page.fetch(datasets, |d| Cursor { created_at: d.created_at.clone(), id: d.id.clone() }))
}

/// How many distinct files (blobs) each class has in dataset `id`'s training split.
pub async fn train_files_per_class(pool: &Pool, id: &str) -> Result<Vec<u64>, sqlx::Error> {
    let counts: Vec<i64> =
        sqlx::query_scalar("select count(distinct blob) from dataset_images where dataset_id = $1 and split = 'train' group by label").bind(id).fetch_all(pool).await?;
    Ok(counts.into_iter().map(|n| n.max(0) as u64).collect())
}

/// One dataset.
pub async fn get(pool: &Pool, id: &str) -> Result<Option<Dataset>, sqlx::Error> {
    let row: Option<DatasetRow> =
        sqlx::query_as(
            "select id, name, created_at, num_images, classes, counts, rejected, rejected_total, duplicates, look_alikes, source from datasets where id = $1",
        )
            .bind(id)
            .fetch_optional(pool)
            .await?;
    match row {
        Some(row) => Ok(Some(with_duplicates(pool, row).await?)),
        None => Ok(None),
    }
}

/// The columns of `dataset_images` an [`ImageRow`] holds, in one place for every query that
/// reads them.
macro_rules! image_columns {
    () => {
        "blob, label, split, file, look, look_mirror, look_turned, look_colour"
    };
}

/// The images of a dataset in upload order (empty for an unknown dataset), read through a pool
/// or within a transaction.
pub async fn images<'e>(db: impl sqlx::Executor<'e, Database = sqlx::Any>, dataset_id: &str) -> Result<Vec<ImageRow>, sqlx::Error> {
    sqlx::query_as(concat!("select ", image_columns!(), " from dataset_images where dataset_id = $1 order by rowid")).bind(dataset_id).fetch_all(db).await
}

/// One page of a dataset's images in upload order, optionally of one split and one class, and how
/// many match in all.
pub async fn images_page(
    pool: &Pool,
    dataset_id: &str,
    split: Option<Split>,
    label: Option<&str>,
    offset: u64,
    limit: u64,
) -> Result<(Vec<ImageRow>, u64), sqlx::Error> {
    macro_rules! filter {
        () => {
            "dataset_id = $1 and ($2 is null or split = $2) and ($3 is null or label = $3)"
        };
    }
    let rows: Vec<ImageRow> = sqlx::query_as(concat!("select ", image_columns!(), " from dataset_images where ", filter!(), " order by rowid limit $4 offset $5"))
        .bind(dataset_id)
        .bind(split.map(Split::as_str))
        .bind(label)
        .bind(limit as i64)
        .bind(offset as i64)
        .fetch_all(pool)
        .await?;
    let total: i64 = sqlx::query_scalar(concat!("select count(*) from dataset_images where ", filter!()))
        .bind(dataset_id)
        .bind(split.map(Split::as_str))
        .bind(label)
        .fetch_one(pool)
        .await?;
    Ok((rows, total as u64))
}

/// The datasets stored before images were fingerprinted (no look-alike report), oldest first.
pub async fn without_look_alikes(pool: &Pool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("select id from datasets where look_alikes is null order by created_at, id").fetch_all(pool).await
}

/// Stores the fingerprints of a dataset's images (by blob) taken after its upload, and its
/// look-alike report worked out from them, in one transaction. Nothing is written where the
/// dataset is gone or already has a report, or where an image still lacks a fingerprint;
/// whether the report was stored.
pub async fn set_looks(pool: &Pool, dataset_id: &str, looks: &HashMap<String, Look>) -> Result<bool, sqlx::Error> {
    // The dataset's row held against a delete, and against another process storing the same
    // fingerprints: the second finds the report there and writes nothing.
    let Some(mut tx) = lock_row(pool, "datasets", dataset_id, RowLock::Update).await? else { return Ok(false) };
    let pending: Option<i32> = sqlx::query_scalar("select 1 from datasets where id = $1 and look_alikes is null")
        .bind(dataset_id)
        .fetch_optional(&mut *tx)
        .await?;
    if pending.is_none() {
        return Ok(false);
    }
    for (blob, look) in looks {
        let columns = look.to_columns();
        sqlx::query("update dataset_images set look = $1, look_mirror = $2, look_turned = $3, look_colour = $4 where dataset_id = $5 and blob = $6")
            .bind(columns.shape)
            .bind(columns.mirror)
            .bind(columns.turned)
            .bind(columns.colour)
            .bind(dataset_id)
            .bind(blob)
            .execute(&mut *tx)
            .await?;
    }
    let images = images(&mut *tx, dataset_id).await?;
    // Finding look-alikes grows as the square of the images: on a blocking thread.
    let report = tokio::task::spawn_blocking(move || Duplicates::look_alikes(images.iter().map(ImageRow::image_ref)))
        .await
        .map_err(|e| sqlx::Error::Io(std::io::Error::other(e)))?;
    let Some(report) = report else { return Ok(false) };
    sqlx::query("update datasets set look_alikes = $1 where id = $2").bind(to_json(&report)?).bind(dataset_id).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(true)
}

/// Whether a dataset has an image stored as `blob`.
pub async fn references(pool: &Pool, dataset_id: &str, blob: &str) -> Result<bool, sqlx::Error> {
    let found: Option<i64> = sqlx::query_scalar("select 1 from dataset_images where dataset_id = $1 and blob = $2 limit 1")
        .bind(dataset_id)
        .bind(blob)
        .fetch_optional(pool)
        .await?;
    Ok(found.is_some())
}

/// Deletes a dataset and its image rows unless a queued or running job uses it. The check and the
/// delete run in one write transaction, so a job cannot start using the dataset in between.
pub async fn delete(pool: &Pool, id: &str) -> Result<Deleted, sqlx::Error> {
    // SQLite: a write transaction from the start. PostgreSQL: the dataset's row locked for update,
    // which a job insert's share lock on it waits for (see `jobs::insert`).
    let Some(mut tx) = lock_row(pool, "datasets", id, RowLock::Update).await? else { return Ok(Deleted::NotFound) };
    let job: Option<String> = sqlx::query_scalar(
        "select id from jobs where dataset_id = $1 and status in ('queued', 'running') order by created_at limit 1",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(job_id) = job {
        return Ok(Deleted::InUse { job_id });
    }
    let blobs: Vec<String> = sqlx::query_scalar("select distinct blob from dataset_images where dataset_id = $1")
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
    sqlx::query("delete from dataset_images where dataset_id = $1").bind(id).execute(&mut *tx).await?;
    sqlx::query("delete from datasets where id = $1").bind(id).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(Deleted::Removed { blobs })
}

/// The blobs among `candidates` that no dataset references.
pub async fn unreferenced(pool: &Pool, candidates: &[String]) -> Result<Vec<String>, sqlx::Error> {
    let mut orphans = Vec::new();
    for chunk in candidates.chunks(LOOKUP_CHUNK) {
        let placeholders = (1..=chunk.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
        let sql = format!("select distinct blob from dataset_images where blob in ({placeholders})");
        let mut query = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql));
        for blob in chunk {
            query = query.bind(blob);
        }
        let used: std::collections::HashSet<String> = query.fetch_all(pool).await?.into_iter().collect();
        orphans.extend(chunk.iter().filter(|b| !used.contains(*b)).cloned());
    }
    Ok(orphans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::ImageRecord;

    async fn pool() -> (tempfile::TempDir, Pool) {
        let dir = tempfile::tempdir().unwrap();
        let pool = crate::db::connect(&crate::db::sqlite_url(&dir.path().join("test.db"))).await.unwrap();
        (dir, pool)
    }

    fn blob(i: usize) -> String {
        format!("{i:064x}")
    }

    /// Spread-out fingerprints, half of them with the top bit set (a negative i64 stored).
    fn look(i: usize) -> Look {
        let spread = |k: u64| (i as u64 + 1).wrapping_mul(k);
        Look {
            shape: spread(0x9E37_79B9_7F4A_7C15),
            mirror: spread(0xC2B2_AE3D_27D4_EB4F),
            turned: [0x1656_67B1_9E37_79F9, 0x27D4_EB2F_1656_67C5, 0x85EB_CA77_C2B2_AE63, 0xFF51_AFD7_ED55_8CCD, 0xC4CE_B9FE_1A85_EC53, 0x9E37_79B9_7F4A_7C16]
                .map(spread),
            colour: (i * 7919) as u16,
        }
    }

    fn ingested(n: usize) -> Ingested {
        let split = |i: usize| [Split::Train, Split::Validation, Split::Test][i % 3];
        let images = (0..n)
            .map(|i| ImageRecord {
                file: format!("f{i}"),
                label: format!("c{}", i % 2),
                split: split(i),
                blob: blob(i),
                look: Some(look(i)),
            })
            .collect();
        Ingested {
            images,
            rejected: vec![Rejected { file: "x".into(), reason: "y".into() }],
            rejected_total: 1,
            classes: vec!["c0".into(), "c1".into()],
        }
    }

    #[tokio::test]
    async fn a_dataset_round_trips_with_its_images_in_upload_order() {
        let (_dir, pool) = pool().await;
        // More rows than one multi-row insert holds.
        let set = ingested(1203);
        let stored = insert(&pool, "set", &set, set.reports()).await.unwrap();
        assert_eq!(get(&pool, &stored.id).await.unwrap(), Some(stored.clone()));
        assert_eq!(stored.counts.train["c0"], 201);
        let rows = images(&pool, &stored.id).await.unwrap();
        assert_eq!(rows.len(), 1203);
        assert_eq!(
            rows[4],
            ImageRow {
                blob: blob(4),
                label: "c0".into(),
                split: Split::Validation,
                file: "f4".into(),
                look: Some(look(4).shape as i64),
                look_mirror: Some(look(4).mirror as i64),
                look_turned: Some(look(4).turned.iter().flat_map(|t| t.to_le_bytes()).collect()),
                look_colour: Some(i32::from(look(4).colour))
            }
        );
        assert!(rows.iter().enumerate().all(|(i, r)| r.look() == Some(look(i))));
        assert!(stored.look_alikes.is_some());
        assert!(rows.iter().enumerate().all(|(i, r)| r.file == format!("f{i}")));
        assert!(images(&pool, "unknown").await.unwrap().is_empty());
        assert_eq!(get(&pool, "unknown").await.unwrap(), None);
    }

    /// Fingerprints taken after the upload are stored with their report only when they cover
    /// every image of a dataset that has none.
    #[tokio::test]
    async fn late_fingerprints_are_stored_only_where_they_complete_a_dataset() {
        let (_dir, pool) = pool().await;
        let mut old = ingested(4);
        old.images.iter_mut().for_each(|i| i.look = None);
        let stored = insert(&pool, "old", &old, old.reports()).await.unwrap();
        assert_eq!(stored.look_alikes, None);
        assert_eq!(without_look_alikes(&pool).await.unwrap(), vec![stored.id.clone()]);
        let looks: HashMap<String, Look> = (0..4).map(|i| (blob(i), look(i))).collect();
        // Three of four: nothing is written.
        let some: HashMap<String, Look> = looks.iter().filter(|(b, _)| **b != blob(3)).map(|(b, l)| (b.clone(), *l)).collect();
        assert!(!set_looks(&pool, &stored.id, &some).await.unwrap());
        assert!(images(&pool, &stored.id).await.unwrap().iter().all(|r| r.look().is_none()));
        assert!(set_looks(&pool, &stored.id, &looks).await.unwrap());
        assert!(images(&pool, &stored.id).await.unwrap().iter().enumerate().all(|(i, r)| r.look() == Some(look(i))));
        assert_eq!(get(&pool, &stored.id).await.unwrap().unwrap().look_alikes, Some(Duplicates::default()));
        assert!(without_look_alikes(&pool).await.unwrap().is_empty());
        // Done already, or gone: nothing to do.
        assert!(!set_looks(&pool, &stored.id, &looks).await.unwrap());
        assert!(!set_looks(&pool, "unknown", &looks).await.unwrap());
    }

    #[tokio::test]
    async fn list_is_newest_first_and_delete_reports_blobs_and_users() {
        let (_dir, pool) = pool().await;
        let (three, two) = (ingested(3), ingested(2));
        let a = insert(&pool, "a", &three, three.reports()).await.unwrap();
        let b = insert(&pool, "b", &two, two.reports()).await.unwrap();
        let ids: Vec<String> = list(&pool, &Page::all()).await.unwrap().rows.into_iter().map(|d| d.id).collect();
        assert_eq!(ids, vec![b.id.clone(), a.id.clone()]);

        sqlx::query(
            "insert into jobs (id, dataset_id, base_model, params, recipe, status, epochs, created_at) \
             values ('j', $1, 'm', '{}', 'r', 'running', 1, 'now')",
        )
        .bind(&a.id)
        .execute(&pool)
        .await
        .unwrap();
        assert_eq!(delete(&pool, &a.id).await.unwrap(), Deleted::InUse { job_id: "j".into() });
        assert_eq!(delete(&pool, "unknown").await.unwrap(), Deleted::NotFound);

        let Deleted::Removed { mut blobs } = delete(&pool, &b.id).await.unwrap() else { panic!("not removed") };
        blobs.sort();
        assert_eq!(blobs, vec![blob(0), blob(1)]);
        // Both are still used by `a`; blob(2) only by `a`; blob(9) by nobody.
        let candidates: Vec<String> = (0..1200).map(blob).collect();
        let orphans = unreferenced(&pool, &candidates).await.unwrap();
        assert_eq!(orphans.len(), 1197);
        assert!(!orphans.contains(&blob(0)) && !orphans.contains(&blob(2)) && orphans.contains(&blob(9)));
    }
}
