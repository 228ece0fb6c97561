//! Where the service's bytes live: the data folder alone (the default), or an S3-compatible
//! object store (`--object-store s3://bucket/prefix`) with the data folder as a cache.
//!
//! With a store, every image blob, every epoch checkpoint and every model folder is written to
//! it before the database row that makes it visible (the dataset, the checkpoint record, the
//! model), so what a row names is always complete in the store; the local copy is a cache that
//! may be deleted at any time and is fetched again on first use. Keys mirror the data folder's
//! layout (`blobs/<sha256>`, `models/<id>/…`), under the prefix, except a job's checkpoints: each
//! run of a job (each claim of it by a worker) writes under a prefix of its own,
//! `jobs/<id>/claim-<n>-run-<uuid v7>/` ([`run_prefix`]: `epoch-<n>/`, and the local `best/` as
//! `best-<epoch>/`, which each checkpoint's `state.json`, written last, names). One writer per
//! prefix: a worker that lost its lease and has not noticed yet cannot overwrite or delete what
//! the worker that took over writes. The claim in the name (the database's claim count, the same
//! on every machine) orders the runs, where the machines' clocks, and so the ids, may not.
//!
//! The bottom layers stay synchronous and know only local files; this module moves bytes between
//! the two, on the async side, and the callers decide when.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::ObjectStore;

use crate::dataset::BlobStore;
use crate::model::io::CONFIG_FILE;
use crate::paths::DataPaths;
use crate::train::checkpoint::{self, LoopState};

/// How many objects move at once in a transfer of many (a dataset's blobs).
const PARALLEL: usize = 16;

/// The prefix (under `jobs/<id>/`) of a new run of claim `claim` of a job in the object store:
/// `claim-<claim>-run-<uuid v7>`. The id keeps two runs apart that got the same claim (a claim
/// handed back at a graceful shutdown is counted again).
pub fn run_prefix(claim: i64) -> String {
    format!("claim-{claim}-run-{}", crate::db::new_id())
}

/// The claim of the run whose prefix (under `jobs/<id>/`) is `name`: as [`run_prefix`] writes it,
/// or 0 for a run stored before prefixes named their claim (`run-<uuid v7>`). `None` for a name
/// that is no run's.
pub fn run_claim(name: &str) -> Option<i64> {
    if name.starts_with("run-") {
        return Some(0);
    }
    name.strip_prefix("claim-")?.split_once("-run-")?.0.parse().ok()
}

/// The bytes of the service: the data folder, and the object store when there is one. Cheap to
/// clone.
#[derive(Clone)]
pub struct Objects {
    paths: DataPaths,
    blobs: BlobStore,
    remote: Option<Arc<Remote>>,
}

struct Remote {
    store: Arc<dyn ObjectStore>,
    /// `s3://bucket/prefix`, for messages.
    url: String,
}

impl Remote {
    fn failed(&self, source: impl std::error::Error + Send + Sync + 'static, doing: String) -> anyhow::Error {
        anyhow::Error::new(StoreFailed { url: self.url.clone(), doing, source: Box::new(source) })
    }

    /// Streams the file at `path` to `key`: one request for a small file, a multipart upload
    /// (parts of 10 MB) for a large one, never the whole file in memory.
    async fn put_file(&self, path: &Path, key: &Key) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut file = tokio::fs::File::open(path).await.with_context(|| format!("reading {}", path.display()))?;
        let mut writer = object_store::buffered::BufWriter::new(self.store.clone(), key.clone());
        if let Err(e) = tokio::io::copy(&mut file, &mut writer).await {
            writer.abort().await.ok();
            return Err(self.failed(e, format!("storing {key}")));
        }
        // Not `abort` after a failed shutdown: the writer panics ("Already shut down"). A failed
        // put leaves nothing visible (an unfinished multipart upload neither: the bucket's
        // lifecycle rule for incomplete uploads removes its parts).
        writer.shutdown().await.map_err(|e| self.failed(e, format!("storing {key}")))
    }

    /// Streams the object `key` into a new file at `path`.
    async fn get_file(&self, key: &Key, path: &Path) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut stream = self.store.get(key).await.map_err(|e| self.failed(e, format!("fetching {key}")))?.into_stream();
        let mut file = tokio::fs::File::create(path).await.with_context(|| format!("creating {}", path.display()))?;
        while let Some(chunk) = stream.try_next().await.map_err(|e| self.failed(e, format!("fetching {key}")))? {
            file.write_all(&chunk).await.with_context(|| format!("writing {}", path.display()))?;
        }
        file.sync_all().await?;
        Ok(())
    }
}

/// The object store refused or did not answer a request (the HTTP layer answers 503).
#[derive(Debug, thiserror::Error)]
#[error("object store {url}: {doing}: {source}")]
pub struct StoreFailed {
    url: String,
    doing: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// Why an `--object-store` value is refused.
fn invalid(url: &str, why: &str) -> anyhow::Error {
    anyhow::anyhow!("--object-store {url:?}: {why} (expected s3://bucket or s3://bucket/prefix)")
}

impl Objects {
    /// The data folder alone (its blob store is opened, and created if missing).
    pub fn local(paths: DataPaths) -> std::io::Result<Self> {
        let blobs = BlobStore::open(paths.blobs())?;
        Ok(Self { paths, blobs, remote: None })
    }

    /// The data folder as a cache of the S3-compatible store at `url` (`s3://bucket/prefix`),
    /// configured by the usual `AWS_*` variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ALLOW_HTTP`). Nothing is contacted here.
    pub fn s3(url: &str, paths: DataPaths) -> anyhow::Result<Self> {
        Self::s3_with(url, &[], paths)
    }

    /// [`Objects::s3`] with `settings` (names as the `AWS_*` variables', e.g. `AWS_ENDPOINT_URL`)
    /// applied over the environment's.
    pub fn s3_with(url: &str, settings: &[(&str, &str)], paths: DataPaths) -> anyhow::Result<Self> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| invalid(url, "only s3:// is supported"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid(url, "no bucket"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|part| part == "." || part == "..") {
            return Err(invalid(url, "the prefix may not contain . or .. parts"));
        }
        let retry = object_store::RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(20), ..Default::default() };
        use object_store::ClientConfigKey::{ConnectTimeout, Timeout};
        use object_store::aws::AmazonS3ConfigKey::Client;
        // Timeouts as configuration keys: replacing the client options would drop those the
        // environment set (AWS_ALLOW_HTTP among them).
        let mut builder = object_store::aws::AmazonS3Builder::from_env();
        for (name, value) in settings {
            let key = name.to_ascii_lowercase().parse().map_err(|e: object_store::Error| invalid(url, &e.to_string()))?;
            builder = builder.with_config(key, *value);
        }
        let s3 = builder
            .with_bucket_name(bucket)
            .with_retry(retry)
            .with_config(Client(ConnectTimeout), "5 seconds")
            .with_config(Client(Timeout), "120 seconds")
            .build()
            .map_err(|e| invalid(url, &e.to_string()))?;
        let store: Arc<dyn ObjectStore> =
            if prefix.is_empty() { Arc::new(s3) } else { Arc::new(object_store::prefix::PrefixStore::new(s3, prefix)) };
        let local = Self::local(paths)?;
        Ok(Self { remote: Some(Arc::new(Remote { store, url: format!("s3://{bucket}/{prefix}") })), ..local })
    }

    /// Whether bytes live in an object store (the data folder is then a cache).
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// The object store's URL, or `None` for the data folder alone.
    pub fn url(&self) -> Option<&str> {
        self.remote.as_deref().map(|r| r.url.as_str())
    }

    /// The local image store (the cache, with an object store).
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// The key of a file or folder under the data folder.
    fn key(&self, path: &Path) -> anyhow::Result<Key> {
        let rel = path.strip_prefix(self.paths.root()).with_context(|| format!("{} is outside the data folder", path.display()))?;
        let parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
        Ok(Key::from(parts.join("/")))
    }

    /// The prefix of a job's checkpoints, from the folder `root` of one claim of it
    /// (`jobs/<id>/claim-<n>`, see `checkpoint::take_over`): the store's runs of a job share it.
    fn job_key(&self, root: &Path) -> anyhow::Result<Key> {
        self.key(root.parent().with_context(|| format!("{} is not in a job's folder", root.display()))?)
    }

    /// Whether the object store answers (a missing object is an answer).
    pub async fn check(&self) -> anyhow::Result<()> {
        let Some(remote) = &self.remote else { return Ok(()) };
        match remote.store.head(&Key::from("readyz")).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(remote.failed(e, "checking readiness".into())),
        }
    }

    // ---- image blobs ----

    /// Writes blobs of the local store to the object store (all of them: one stored earlier
    /// may since have been collected there while it stayed in this cache).
    pub async fn publish_blobs(&self, hashes: &[String]) -> anyhow::Result<()> {
        let Some(remote) = &self.remote else { return Ok(()) };
        let puts: Vec<_> = hashes
            .iter()
            .map(|hash| {
                let remote = remote.clone();
                let path = self.blobs.path(hash);
                let key = path.as_ref().map_err(|e| anyhow::anyhow!("{e}")).and_then(|p| self.key(p));
                async move { remote.put_file(&path?, &key?).await }
            })
            .collect();
        futures::stream::iter(puts).buffer_unordered(PARALLEL).try_collect::<()>().await
    }

    /// The local file of blob `hash`, fetched from the object store first when the cache lacks it.
    pub async fn blob_path(&self, hash: &str) -> anyhow::Result<PathBuf> {
        let path = self.blobs.path(hash)?;
        let Some(remote) = &self.remote else { return Ok(path) };
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        // Streamed to a file beside the blobs, never whole in memory, then checked and renamed.
        let temp = self.blobs.temp_path();
        if let Err(e) = remote.get_file(&self.key(&path)?, &temp).await {
            tokio::fs::remove_file(&temp).await.ok();
            return Err(e);
        }
        let (blobs, name) = (self.blobs.clone(), hash.to_string());
        tokio::task::spawn_blocking(move || blobs.adopt(&temp, &name)).await?.with_context(|| format!("blob {hash} in {}", remote.url))?;
        Ok(path)
    }

    /// The local files of `hashes`, fetching the missing ones (many at once).
    pub async fn blob_paths(&self, hashes: &[String]) -> anyhow::Result<Vec<PathBuf>> {
        // Owned futures: a stream of borrowing closures is not `Send` for every lifetime.
        let fetches: Vec<_> = hashes
            .iter()
            .map(|hash| {
                let (this, hash) = (self.clone(), hash.clone());
                async move { this.blob_path(&hash).await }
            })
            .collect();
        futures::stream::iter(fetches).buffered(PARALLEL).try_collect().await
    }

    /// Removes blobs from the cache and the object store; how many went (with a store, every one:
    /// S3 answers the delete of a missing object as a success).
    pub async fn remove_blobs(&self, hashes: &[String]) -> anyhow::Result<usize> {
        let (blobs, names) = (self.blobs.clone(), hashes.to_vec());
        // Every blob is tried: one that cannot be removed keeps only itself, and is reported.
        let (mut removed, failed) = tokio::task::spawn_blocking(move || {
            let mut failed = None;
            let removed: Vec<bool> = names
                .iter()
                .map(|h| match blobs.remove(h) {
                    Ok(gone) => gone,
                    Err(e) => {
                        failed.get_or_insert(anyhow::Error::new(e).context(format!("removing blob {h}")));
                        false
                    }
                })
                .collect();
            (removed, failed)
        })
        .await?;
        if let Some(remote) = &self.remote {
            // In batches: collection holds the lock every upload waits for while it deletes.
            let keys = hashes.iter().map(|h| self.key(&self.blobs.path(h)?)).collect::<anyhow::Result<Vec<Key>>>()?;
            let missing = self.delete_keys(remote, keys.clone(), "removing blobs").await?;
            for (gone, key) in removed.iter_mut().zip(&keys) {
                *gone |= !missing.contains(key.as_ref());
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(removed.into_iter().filter(|r| *r).count()),
        }
    }

    /// The names of the blobs in the object store (none without one).
    pub async fn remote_blobs(&self) -> anyhow::Result<Vec<String>> {
        let Some(remote) = &self.remote else { return Ok(vec![]) };
        let keys = self.list(remote, &self.key(&self.paths.blobs())?).await?;
        Ok(keys.into_iter().filter_map(|k| k.filename().map(str::to_string)).filter(|n| BlobStore::is_valid_hash(n)).collect())
    }

    // ---- folders: models and checkpoints ----

    /// Writes every file under `dir` (a folder of the data folder) to the object store.
    pub async fn publish_dir(&self, dir: &Path) -> anyhow::Result<()> {
        let Some(remote) = &self.remote else { return Ok(()) };
        self.upload_tree(remote, dir, &self.key(dir)?, None).await
    }

    /// Makes sure `dir` (a folder of the data folder) is in the cache: fetched whole from the
    /// object store when it is missing, into a temporary sibling renamed at the end.
    pub async fn fetch_dir(&self, dir: &Path) -> anyhow::Result<()> {
        let Some(remote) = &self.remote else { return Ok(()) };
        if tokio::fs::try_exists(dir).await.unwrap_or(false) {
            return Ok(());
        }
        self.download_tree(remote, &self.key(dir)?, dir).await
    }

    /// The names of the folders directly under `dir` in the object store (none without one).
    pub async fn stored_folders(&self, dir: &Path) -> anyhow::Result<Vec<String>> {
        let Some(remote) = &self.remote else { return Ok(vec![]) };
        self.children(remote, &self.key(dir)?).await
    }

    /// The folders directly under `dir` (a folder of the data folder) left alone for `grace`:
    /// here, those whose modification time is that old ([`crate::paths::idle_folders`]), and in
    /// the object store, those none of whose objects is newer ([`Objects::idle_stored_folders`]),
    /// each once, as data-folder paths. What the periodic sweeps may take for leftovers.
    pub async fn idle_folders(&self, dir: &Path, grace: Duration) -> anyhow::Result<std::collections::BTreeSet<PathBuf>> {
        let local = dir.to_path_buf();
        let mut idle: std::collections::BTreeSet<PathBuf> = tokio::task::spawn_blocking(move || crate::paths::idle_folders(&local, grace)).await??.into_iter().collect();
        idle.extend(self.idle_stored_folders(dir, grace).await?.iter().map(|name| dir.join(name)));
        Ok(idle)
    }

    /// The names of the folders directly under `dir` in the object store none of whose objects
    /// was written less than `grace` ago, by the store's clock (none without a store). A folder
    /// with an object written within the grace is being written, or was just now.
    pub async fn idle_stored_folders(&self, dir: &Path, grace: Duration) -> anyhow::Result<Vec<String>> {
        let Some(remote) = &self.remote else { return Ok(vec![]) };
        let prefix = self.key(dir)?;
        let listed: Vec<_> = remote.store.list(Some(&prefix)).try_collect().await.map_err(|e| remote.failed(e, format!("listing {prefix}")))?;
        let mut newest = std::collections::BTreeMap::<String, chrono::DateTime<chrono::Utc>>::new();
        for meta in listed {
            // Objects in a folder only (a file directly under `dir` is no folder's).
            let Some(mut parts) = meta.location.prefix_match(&prefix) else { continue };
            let (Some(folder), Some(_)) = (parts.next(), parts.next()) else { continue };
            let at = newest.entry(folder.as_ref().to_string()).or_insert(meta.last_modified);
            *at = (*at).max(meta.last_modified);
        }
        let cutoff = chrono::Utc::now() - grace;
        Ok(newest.into_iter().filter(|(_, at)| *at <= cutoff).map(|(name, _)| name).collect())
    }

    /// Removes `dir` from the cache and its objects from the store.
    pub async fn remove_dir(&self, dir: &Path) -> anyhow::Result<()> {
        let local = dir.to_path_buf();
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&local) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await??;
        if let Some(remote) = &self.remote {
            self.delete_prefix(remote, &self.key(dir)?).await?;
        }
        Ok(())
    }

    /// After epoch `epoch`'s checkpoint of a job was written in its claim's folder `root` by the run
    /// `run` ([`run_prefix`], new at each claim): stores the best model (when this epoch improved
    /// it) as `best-<epoch>/`, then the checkpoint with its `state.json` last, under the run's
    /// prefix; then removes what this run's checkpoint supersedes, and the prefixes of the runs
    /// of its claim and of earlier claims.
    pub async fn publish_checkpoint(&self, root: &Path, run: &str, epoch: u32, improved: bool) -> anyhow::Result<()> {
        let Some(remote) = &self.remote else { return Ok(()) };
        let claim = run_claim(run).with_context(|| format!("{run:?} is not a run's prefix"))?;
        let job = self.job_key(root)?;
        let mine = job.child(run);
        let dir = checkpoint::epoch_dir(root, epoch);
        let best = read_state(&dir.join("state.json")).await?.best_epoch.unwrap_or(epoch);
        let best_part = format!("best-{best}");
        let stored = self.children(remote, &mine).await?;
        // The best model this checkpoint names, when it is new or not stored whole under this run
        // yet (a run that resumed elsewhere, whose prefix a later run removed, or whose upload of
        // it failed part-way): its `config.json` goes last, so with it there the rest is too.
        let best_key = mine.child(best_part.clone());
        let best_stored = stored.contains(&best_part) && self.exists(remote, &best_key.child(CONFIG_FILE)).await?;
        if improved || !best_stored {
            self.upload_tree(remote, &checkpoint::best_dir(root), &best_key, Some(CONFIG_FILE)).await?;
        }
        self.upload_tree(remote, &dir, &mine.child(format!("epoch-{epoch}")), Some("state.json")).await?;
        // What was there before these uploads, less what this checkpoint needs.
        let keep = [format!("epoch-{epoch}"), best_part];
        for part in stored {
            if !keep.contains(&part) {
                self.delete_prefix(remote, &mine.child(part)).await?;
            }
        }
        // Runs of earlier claims, or of this one handed back: this run resumed from the newest of
        // them, or from a later checkpoint.
        for part in self.children(remote, &job).await? {
            if part != run && run_claim(&part).is_some_and(|c| c <= claim) {
                self.delete_prefix(remote, &job.child(part)).await?;
            }
        }
        Ok(())
    }

    /// Before claim `claim` of a job runs: when the object store holds a later checkpoint of the
    /// job than the claim's folder `root`, fetches that checkpoint and its best model in place of
    /// the folder's; then marks the folder as this claim's ([`checkpoint::mark_claim`]). Returns
    /// the epoch fetched.
    ///
    /// Later is by claim first, then by epoch: the claim whose run stored a checkpoint (its
    /// prefix names it), against the claim the folder is marked with. Each claim starts from the
    /// latest checkpoint of the claim before it, so the newest claim's is the line of runs whose
    /// progress the database recorded, and a later epoch of an older claim (in the store, or in
    /// this machine's folder) is what a run whose lease had lapsed wrote after all. Claims, not
    /// the runs' ids, order them: machines' clocks may differ. (`checkpoint::take_over` chooses
    /// among local folders the same way.)
    pub async fn fetch_checkpoint(&self, root: &Path, claim: i64) -> anyhow::Result<Option<u32>> {
        let Some(remote) = &self.remote else { return Ok(None) };
        let fetched = self.fetch_later_checkpoint(remote, root).await?;
        let root = root.to_path_buf();
        tokio::task::spawn_blocking(move || checkpoint::mark_claim(&root, claim)).await??;
        Ok(fetched)
    }

    async fn fetch_later_checkpoint(&self, remote: &Remote, root: &Path) -> anyhow::Result<Option<u32>> {
        let job = self.job_key(root)?;
        let stored = self.list(remote, &job).await?;
        let Some((claim, epoch, run)) = stored
            .iter()
            .filter_map(|k| {
                let parts: Vec<String> = k.prefix_match(&job)?.map(|p| p.as_ref().to_string()).collect();
                let [run, epoch, file] = parts.as_slice() else { return None };
                let epoch = epoch.strip_prefix("epoch-")?.parse::<u32>().ok()?;
                (file == "state.json").then_some((run_claim(run)?, epoch, run.clone()))
            })
            .max()
        else {
            return Ok(None);
        };
        let job = job.child(run);
        let local = {
            let root = root.to_path_buf();
            tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                let Some(epoch) = checkpoint::list_epochs(&root).pop() else { return Ok(None) };
                Ok(Some((checkpoint::marked_claim(&root)?, epoch)))
            })
            .await??
        };
        if local >= Some((claim, epoch)) {
            return Ok(None);
        }
        // Both fetched beside the checkpoints first (hidden: start-up or the next take-over removes
        // them after a crash); then the folder's own checkpoints go, the best model goes into
        // place, and the epoch last. Until the epoch is in place, the folder holds none, so a
        // failure or a crash on the way is followed by this same fetch, never by a resume from
        // the new epoch with the old best model, nor from the folder's superseded checkpoint.
        let (fetched_epoch, fetched_best) = (root.join(format!(".epoch-{epoch}.fetched")), root.join(".best.fetched"));
        self.download_tree(remote, &job.child(format!("epoch-{epoch}")), &fetched_epoch).await?;
        let best = read_state(&fetched_epoch.join("state.json")).await?.best_epoch;
        if let Some(best) = best {
            self.download_tree(remote, &job.child(format!("best-{best}")), &fetched_best).await?;
            if !tokio::fs::try_exists(fetched_best.join(CONFIG_FILE)).await? {
                bail!("the best model of {job} (epoch {best}) is not stored whole in {}", remote.url);
            }
        }
        let root = root.to_path_buf();
        tokio::task::spawn_blocking(move || {
            checkpoint::remove_superseded(&root)?;
            if best.is_some() {
                crate::model::io::replace_dir(&fetched_best, &checkpoint::best_dir(&root))?;
            }
            std::fs::rename(&fetched_epoch, checkpoint::epoch_dir(&root, epoch))
        })
        .await??;
        Ok(Some(epoch))
    }

    // ---- transfers ----

    async fn list(&self, remote: &Remote, prefix: &Key) -> anyhow::Result<Vec<Key>> {
        let listed: Vec<_> = remote.store.list(Some(prefix)).try_collect().await.map_err(|e| remote.failed(e, format!("listing {prefix}")))?;
        Ok(listed.into_iter().map(|meta| meta.location).collect())
    }

    /// The names of the folders directly under `prefix`.
    async fn children(&self, remote: &Remote, prefix: &Key) -> anyhow::Result<Vec<String>> {
        let listed = remote.store.list_with_delimiter(Some(prefix)).await.map_err(|e| remote.failed(e, format!("listing {prefix}")))?;
        Ok(listed.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect())
    }

    /// Whether the object `key` is stored.
    async fn exists(&self, remote: &Remote, key: &Key) -> anyhow::Result<bool> {
        match remote.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(remote.failed(e, format!("looking up {key}"))),
        }
    }

    /// Removes every object under `prefix`.
    async fn delete_prefix(&self, remote: &Remote, prefix: &Key) -> anyhow::Result<()> {
        let keys = self.list(remote, prefix).await?;
        self.delete_keys(remote, keys, &format!("removing what is under {prefix}")).await?;
        Ok(())
    }

    /// Removes the objects `keys` in batches (one S3 DeleteObjects request per 1,000 keys rather
    /// than one request per key); returns the paths of those that were not there. `doing` names
    /// the work in an error.
    async fn delete_keys(&self, remote: &Remote, keys: Vec<Key>, doing: &str) -> anyhow::Result<std::collections::HashSet<String>> {
        let mut missing = std::collections::HashSet::new();
        let mut deleted = remote.store.delete_stream(futures::stream::iter(keys.into_iter().map(Ok)).boxed());
        while let Some(result) = deleted.next().await {
            match result {
                Ok(_) => {}
                Err(object_store::Error::NotFound { path, .. }) => {
                    missing.insert(path);
                }
                Err(e) => return Err(remote.failed(e, doing.to_string())),
            }
        }
        Ok(missing)
    }

    /// Uploads the files under `dir` to `prefix` in [`upload_order`].
    async fn upload_tree(&self, remote: &Remote, dir: &Path, prefix: &Key, last: Option<&str>) -> anyhow::Result<()> {
        let root = dir.to_path_buf();
        let files = tokio::task::spawn_blocking(move || files_under(&root)).await?.with_context(|| format!("listing {}", dir.display()))?;
        for rel in upload_order(files, last) {
            remote.put_file(&dir.join(&rel), &Key::from(format!("{prefix}/{rel}"))).await?;
        }
        Ok(())
    }

    /// Downloads every object under `prefix` into the folder `dest` (replacing it): streamed into
    /// a staging folder in the data folder's scratch space, then moved into place as a whole, so
    /// `dest` is either whole or as it was.
    async fn download_tree(&self, remote: &Remote, prefix: &Key, dest: &Path) -> anyhow::Result<()> {
        let keys = self.list(remote, prefix).await?;
        if keys.is_empty() {
            bail!("{prefix} is not in {}", remote.url);
        }
        tokio::fs::create_dir_all(self.paths.tmp()).await?;
        let staging = tempfile::Builder::new().prefix("fetch-").tempdir_in(self.paths.tmp())?;
        let mut files = Vec::with_capacity(keys.len());
        for key in keys {
            let rel: Vec<String> = key.prefix_match(prefix).into_iter().flatten().map(|p| p.as_ref().to_string()).collect();
            if rel.is_empty() || rel.iter().any(|p| p == ".." || p == ".") {
                continue;
            }
            let rel = rel.join("/");
            let path = staging.path().join(&rel);
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            remote.get_file(&key, &path).await?;
            files.push(rel);
        }
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let staged = staging.path();
            crate::model::io::write_dir_atomically(&dest, |tmp| {
                for rel in &files {
                    let path = tmp.join(rel);
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::rename(staged.join(rel), path)?;
                }
                Ok(())
            })
        })
        .await?
        .with_context(|| format!("writing what {prefix} holds"))?;
        Ok(())
    }
}

/// The files under `dir`, as `/`-separated paths relative to it.
fn files_under(dir: &Path) -> std::io::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else if let Ok(rel) = entry.path().strip_prefix(dir) {
                let name = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
                out.push((name, entry.metadata()?.len()));
            }
        }
    }
    Ok(out)
}

/// The order a folder's files (name, bytes) go to the object store: the largest first, the one
/// named `last` (a marker that the rest is complete) after all others. A folder then appears in
/// a listing only once its largest file is in, and the files after it follow within moments: the
/// periodic sweep, which takes a folder whose newest object is an hour old for a leftover, never
/// sees one whose large upload is still running with its small files long written.
fn upload_order(mut files: Vec<(String, u64)>, last: Option<&str>) -> Vec<String> {
    files.sort_by(|(a, a_len), (b, b_len)| (Some(a.as_str()) == last).cmp(&(Some(b.as_str()) == last)).then(b_len.cmp(a_len)).then(a.cmp(b)));
    files.into_iter().map(|(name, _)| name).collect()
}

async fn read_state(path: &Path) -> anyhow::Result<LoopState> {
    let text = tokio::fs::read_to_string(path).await.with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_prefix_names_its_claim() {
        let run = run_prefix(12);
        assert_eq!(run_claim(&run), Some(12), "{run}");
        assert_ne!(run, run_prefix(12), "two runs of one claim are kept apart");
        assert_eq!(run_claim("run-01f0a1b2-0000-7000-8000-000000000000"), Some(0), "stored before prefixes named their claim");
        for other in ["claim-x-run-1", "claim--run-1", "claim-3", "best-2", "epoch-3", ""] {
            assert_eq!(run_claim(other), None, "{other}");
        }
    }

    #[test]
    fn a_folder_is_uploaded_largest_file_first_and_its_marker_last() {
        let files = |list: &[(&str, u64)]| list.iter().map(|&(n, len)| (n.to_string(), len)).collect::<Vec<_>>();
        let model = files(&[("config.json", 700), ("model.safetensors", 90_000_000), ("preprocessor_config.json", 400)]);
        assert_eq!(upload_order(model, None), ["model.safetensors", "config.json", "preprocessor_config.json"]);
        // An epoch's checkpoint: `state.json` says the rest is complete.
        let checkpoint = files(&[("state.json", 300), ("model.safetensors", 5_000), ("optimizer.safetensors", 10_000), ("config.json", 700)]);
        assert_eq!(upload_order(checkpoint, Some("state.json")), ["optimizer.safetensors", "model.safetensors", "config.json", "state.json"]);
        // The marker goes last even when it is the largest; equal sizes go by name.
        let odd = files(&[("b", 5), ("a", 5), ("state.json", 9)]);
        assert_eq!(upload_order(odd, Some("state.json")), ["a", "b", "state.json"]);
    }

    fn objects(url: &str) -> anyhow::Result<Objects> {
        Objects::s3(url, DataPaths::new(tempfile::tempdir().unwrap().path()))
    }

    #[test]
    fn object_store_urls_are_checked() {
        for bad in ["", "bucket", "file:///tmp/x", "s3://", "s3:///prefix", "s3://b/../x", "s3://b/a/./c"] {
            let e = objects(bad).err().unwrap_or_else(|| panic!("{bad} accepted")).to_string();
            assert!(e.contains("--object-store"), "{e}");
        }
        assert_eq!(objects("s3://bucket").unwrap().url(), Some("s3://bucket/"));
        assert_eq!(objects("s3://bucket/team/a/").unwrap().url(), Some("s3://bucket/team/a"));
    }

    #[test]
    fn keys_mirror_the_data_folder_and_nothing_outside_it() {
        let o = objects("s3://b/p").unwrap();
        let root = o.paths.root().to_path_buf();
        assert_eq!(o.key(&root.join("models").join("m1")).unwrap().as_ref(), "models/m1");
        assert_eq!(o.key(&root.join("blobs").join("ab")).unwrap().as_ref(), "blobs/ab");
        assert!(o.key(Path::new("/elsewhere/x")).is_err());
    }
}
