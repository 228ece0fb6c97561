//! Finding, loading and saving models in Hugging Face's folder format: `config.json`,
//! `model.safetensors` (or sharded with `model.safetensors.index.json`) and, when present,
//! `preprocessor_config.json`. Hub ids are fetched with `hf-hub` into the standard cache.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use super::weights::keys::{BACKBONE_PREFIX, HEAD_BIAS, HEAD_WEIGHT};
use super::weights::{ParamSpec, Params, keys, param_specs};
use super::{ModelError, PreprocessorConfig, VitConfig};

type Result<T> = std::result::Result<T, ModelError>;

/// The model's configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file (unsharded).
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint (which shard holds each tensor).
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The image processor's configuration.
pub const PREPROCESSOR_FILE: &str = "preprocessor_config.json";
/// The files [`save_folder`] writes: a model folder as `from_pretrained` reads it.
pub const SAVED_FILES: [&str; 3] = [CONFIG_FILE, PREPROCESSOR_FILE, WEIGHTS_FILE];

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local folder.
    Dir(PathBuf),
    /// A Hugging Face hub repository id such as `google/vit-base-patch16-224`.
    Hub(String),
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Dir(p) => write!(f, "{}", p.display()),
            ModelSource::Hub(id) => write!(f, "{id}"),
        }
    }
}

impl ModelSource {
    /// A local folder when `spec` names an existing directory, else a hub id. A spec written as
    /// a path (starting with `/`, `./`, `../` or `~`) is a folder or an error, never a hub id.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(ModelSource::Dir(path.to_path_buf()));
        }
        let as_path = ["/", "./", "../", "~"].iter().any(|p| spec.starts_with(p)) || matches!(spec, "." | "..");
        if as_path {
            let why = if path.exists() {
                "is not a folder (give the model's folder, holding config.json and model.safetensors)"
            } else if spec.starts_with('~') {
                "not found (~ is not expanded here: give the full path)"
            } else {
                "not found"
            };
            return Err(ModelError::NotFound(format!("model folder '{spec}' {why}")));
        }
        if is_hub_id(spec) {
            return Ok(ModelSource::Hub(spec.to_string()));
        }
        Err(ModelError::NotFound(format!(
            "'{spec}' is neither a folder nor a Hugging Face model id (like google/vit-base-patch16-224)"
        )))
    }

    /// The files of the model, downloading them first for a hub id that is not cached;
    /// `on_download(received, total)` follows the download of the weights in bytes (every
    /// half-percent or so, and at the end), and stops it by answering `Break`: the result is
    /// then [`ModelError::Stopped`], and what came in stays in the hub cache's partial file,
    /// from which the next download resumes.
    pub fn resolve(&self, on_download: &mut OnDownload) -> Result<ModelFiles> {
        match self {
            ModelSource::Dir(dir) => ModelFiles::in_dir(dir),
            ModelSource::Hub(id) => fetch_from_hub(id, on_download),
        }
    }
}

/// True for strings shaped like a hub repository id: `name` or `owner/name`, made of letters,
/// digits, `-`, `_` and `.`, with no `..`.
pub fn is_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    !s.is_empty()
        && s.len() <= 96
        && parts.len() <= 2
        && !s.contains("..")
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with(['.', '-'])
                && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// The files making up a model.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub preprocessor: Option<PathBuf>,
}

impl ModelFiles {
    fn in_dir(dir: &Path) -> Result<Self> {
        let config = dir.join(CONFIG_FILE);
        if !config.is_file() {
            return Err(ModelError::NotFound(format!("{} has no config.json", dir.display())));
        }
        let single = dir.join(WEIGHTS_FILE);
        let index = dir.join(INDEX_FILE);
        let weights = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shards_from_index(&index)?
        } else if dir.join("pytorch_model.bin").is_file() {
            return Err(ModelError::Weights(format!(
                "{} holds pytorch_model.bin, which vitforge does not read (pickle files can run code); \
                 convert it with `ViTForImageClassification.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`",
                dir.display()
            )));
        } else {
            return Err(ModelError::NotFound(format!("{} has no model.safetensors", dir.display())));
        };
        let pre = dir.join(PREPROCESSOR_FILE);
        Ok(Self { config, weights, preprocessor: pre.is_file().then_some(pre) })
    }
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = fs::read_to_string(index)?;
    let idx: Index = serde_json::from_str(&text).map_err(|e| ModelError::Weights(format!("{}: {e}", index.display())))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = idx.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|f| {
            if f.contains('/') || f.contains("..") {
                return Err(ModelError::Weights(format!("shard name '{f}' is not a plain file name")));
            }
            Ok(dir.join(f))
        })
        .collect()
}

/// The hub token in `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`), when set and not empty.
fn hub_token() -> Option<String> {
    ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"].iter().find_map(|name| std::env::var(name).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()))
}

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// How long a hub download may receive nothing before it is given up: `HF_HUB_DOWNLOAD_TIMEOUT`
/// seconds (the hub's own tools' variable, there a socket's timeout, 10 s by default), else a
/// minute; at least 10 s, as hf-hub tries for another download's lock for five seconds without a
/// word. hf-hub sets no timeout on its connections, so a stalled one would otherwise hold the job
/// that needs the model, and the worker with it, for as long as it stays open.
fn hub_download_timeout() -> Duration {
    std::env::var("HF_HUB_DOWNLOAD_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|secs| secs.is_finite() && *secs > 0.0)
        .map_or(Duration::from_secs(60), |secs| Duration::from_secs_f64(secs.min(1e9)))
        .max(Duration::from_secs(10))
}

/// What follows a hub download ([`ModelSource::resolve`]): called with the bytes received and
/// the file's size, again with the same figures at least every quarter second when nothing new
/// came in, and with `(0, 0)` while there is nothing to count yet (the download has not begun,
/// or waits for another download of the same file to end); `Break` stops it.
pub type OnDownload<'a> = dyn FnMut(u64, u64) -> ControlFlow<()> + 'a;

/// Bytes received of a download, for a callback: reported when at least a 200th of the file
/// (and 64 KiB) came in since the last report, or a second passed, and when it is complete,
/// rather than at every read.
struct Received<'a, 'b> {
    done: u64,
    total: u64,
    reported: u64,
    reported_at: Instant,
    report: &'a mut OnDownload<'b>,
}

/// What unwinds out of `hf-hub`'s download when the callback stops it: its progress hook, called
/// from inside the read loop, returns nothing, and nothing else reaches into that loop. Unwinding
/// drops the download's file and lock as an error would, and [`stoppable`] turns it back into
/// [`ModelError::Stopped`] at once (`resume_unwind` runs no panic hook, so nothing is printed).
struct StopDownload;

impl Received<'_, '_> {
    fn report(&mut self) {
        (self.reported, self.reported_at) = (self.done, Instant::now());
        if (self.report)(self.done, self.total).is_break() {
            std::panic::resume_unwind(Box::new(StopDownload));
        }
    }
}

impl hf_hub::api::Progress for Received<'_, '_> {
    fn init(&mut self, size: usize, _filename: &str) {
        (self.done, self.total) = (0, size as u64);
        self.report();
    }

    fn update(&mut self, size: usize) {
        self.done += size as u64;
        if self.done >= self.total || self.done - self.reported >= (self.total / 200).max(64 << 10) || self.reported_at.elapsed() >= Duration::from_secs(1) {
            self.report();
        }
    }

    fn finish(&mut self) {}
}

/// Runs a download that a [`Received`] may stop, giving [`ModelError::Stopped`] when it did (any
/// other panic goes on unwinding).
fn stoppable<T>(download: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(download)) {
        Ok(result) => result,
        Err(payload) if payload.is::<StopDownload>() => Err(ModelError::Stopped),
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

/// Times a download of the hub whose connection failed mid-file is resumed before it fails.
const HUB_RETRIES: usize = 5;

/// How often, at least, a hub download asks its caller whether to go on ([`OnDownload`]), while
/// it waits for another download's lock and while its bytes do not come.
const ASK_EVERY: Duration = Duration::from_millis(250);

/// Waits until no download holds the lock file `lock` (hf-hub's, an exclusive `flock`, which
/// ends with its process), calling `on_download(0, 0)` every quarter second so the caller can
/// stop the wait. Fails when that download's partial file (hf-hub's, beside the lock) has not
/// grown for `timeout`: its connection stalled, and the wait would last as long as it does.
fn wait_for_lock(lock: &Path, file_name: &str, timeout: Duration, on_download: &mut OnDownload) -> Result<()> {
    let file = fs::File::open(lock)?;
    let partial = lock.with_extension("part");
    let size = || fs::metadata(&partial).ok().map(|m| m.len());
    let (mut seen, mut grew) = (size(), Instant::now());
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file.unlock()?),
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        if on_download(0, 0).is_break() {
            return Err(ModelError::Stopped);
        }
        std::thread::sleep(ASK_EVERY);
        let now = size();
        if now != seen {
            (seen, grew) = (now, Instant::now());
        } else if grew.elapsed() >= timeout {
            return Err(ModelError::NotFound(format!(
                "another download of {file_name} holds its lock ({}) and has received nothing for {} s (HF_HUB_DOWNLOAD_TIMEOUT): \
                 its connection stalled; the file can be fetched once that connection closes or the process downloading stops \
                 (the download then resumes from where it stopped)",
                lock.display(),
                timeout.as_secs_f64()
            )));
        }
    }
}

/// The `config.json` of hub model `id` where the hub cache (`HF_HOME`) holds it: a look in the
/// cache's folders, no connection.
pub fn cached_hub_config(id: &str) -> Option<PathBuf> {
    hf_hub::Cache::from_env().model(id.to_string()).get(CONFIG_FILE)
}

fn fetch_from_hub(id: &str, on_download: &mut OnDownload) -> Result<ModelFiles> {
    let cache = hf_hub::Cache::from_env();
    let cached = cache.model(id.to_string());
    let how_to = format!(
        "download it where the hub is reachable (e.g. `huggingface-cli download {id}`, with HF_HOME pointing at the \
         same cache), or use a local folder containing config.json and model.safetensors"
    );
    if let Some(config) = cached.get(CONFIG_FILE) {
        // One weights file, or an index whose every shard is cached.
        let weights = cached.get(WEIGHTS_FILE).map(|w| vec![w]).or_else(|| {
            let shards = shards_from_index(&cached.get(INDEX_FILE)?).ok()?;
            shards.iter().all(|s| s.is_file()).then_some(shards)
        });
        if let Some(weights) = weights {
            return Ok(ModelFiles { config, weights, preprocessor: cached.get(PREPROCESSOR_FILE) });
        }
    }
    if hub_offline() {
        return Err(ModelError::NotFound(format!(
            "model '{id}' is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set: {how_to}",
            cache.path().display()
        )));
    }
    // The network part runs on a thread of its own: hf-hub sets no timeouts on its connections,
    // so one that stalls without closing blocks a read for as long as it lasts, and the caller
    // must still be able to stop. Progress comes over a channel, the caller is asked at least
    // every quarter second, and its `Break` returns at once (the thread then stops at its next
    // read, or when the connection dies). So does a download from which nothing came for the
    // timeout (the thread reports at least every second while bytes come, and every quarter
    // second while it waits for another download's lock, which it gives up itself when that one
    // stalls).
    let timeout = hub_download_timeout();
    let (sent, progress) = mpsc::channel::<(u64, u64)>();
    let stop = Arc::new(AtomicBool::new(false));
    let download = {
        let (id, how_to, stop) = (id.to_string(), how_to.clone(), stop.clone());
        std::thread::Builder::new().name("hub-download".into()).spawn(move || {
            download_from_hub(&id, &how_to, timeout, &mut |done, total| {
                let _ = sent.send((done, total));
                if stop.load(Ordering::Relaxed) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
            })
        })?
    };
    let (mut last, mut heard) = ((0, 0), Instant::now());
    loop {
        let asked = match progress.recv_timeout(ASK_EVERY) {
            Ok(now) => {
                (last, heard) = (now, Instant::now());
                on_download(now.0, now.1)
            }
            Err(RecvTimeoutError::Timeout) if heard.elapsed() >= timeout => {
                stop.store(true, Ordering::Relaxed);
                let received = if last.1 > 0 { format!(" ({} of {} bytes of its weights)", last.0, last.1) } else { String::new() };
                return Err(ModelError::NotFound(format!(
                    "nothing came from the Hugging Face hub for {} s (HF_HUB_DOWNLOAD_TIMEOUT) while fetching model '{id}'{received}: \
                     the connection stalled; try again later (the download resumes from where it stopped once that connection \
                     closes, or this process restarts), or {how_to}",
                    timeout.as_secs_f64()
                )));
            }
            Err(RecvTimeoutError::Timeout) => on_download(last.0, last.1),
            Err(RecvTimeoutError::Disconnected) => return download.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
        };
        if asked.is_break() {
            stop.store(true, Ordering::Relaxed);
            return Err(ModelError::Stopped);
        }
    }
}

/// [`fetch_from_hub`]'s network part: the config, then the weights (one file or the shards an
/// index names) with their progress.
fn download_from_hub(id: &str, how_to: &str, timeout: Duration, on_download: &mut OnDownload) -> Result<ModelFiles> {
    let cached = hf_hub::Cache::from_env().model(id.to_string());
    // A connection lost mid-file is tried again (after 0.3, 0.6, 1.2, 2.4 and 4.8 s), from the
    // byte it reached, rather than failing the job that needs the model.
    let mut builder = hf_hub::api::sync::ApiBuilder::from_env().with_progress(false).with_retries(HUB_RETRIES);
    // `hf-hub` reads only the token file `huggingface-cli login` writes; the variable that the
    // hub's own tools and containers use goes first, as there.
    if let Some(token) = hub_token() {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| ModelError::NotFound(format!("cannot reach the Hugging Face hub for '{id}': {e}; {how_to}")))?;
    let repo = api.model(id.to_string());
    let failed = |file: &str, e: hf_hub::api::sync::ApiError| {
        let e = e.to_string();
        // A gated or private model answers 401 (no token) or 403 (a token without access).
        let denied = ["status code 401", "status code 403"].iter().any(|code| e.contains(code));
        let hint = if denied { "; a gated or private model needs a token with access to it in HF_TOKEN" } else { "" };
        ModelError::NotFound(format!("cannot fetch {file} of model '{id}' from the Hugging Face hub: {e}{hint}; {how_to}"))
    };
    let fetch = |file: &str| repo.get(file).map_err(|e| failed(file, e));
    let config = fetch(CONFIG_FILE)?;
    // A config vitforge cannot load is refused before its weights are downloaded.
    VitConfig::from_json(&fs::read_to_string(&config)?)?;
    // The weights (the large files) are the downloads whose progress is followed, file by file.
    let mut weights_file = |file: &str| loop {
        if let Some(path) = cached.get(file) {
            return Ok(path);
        }
        let received = Received { done: 0, total: 0, reported: 0, reported_at: Instant::now(), report: &mut *on_download };
        match stoppable(|| Ok(repo.download_with_progress(file, received)))? {
            Ok(path) => return Ok(path),
            // Another download of the file (another job's, another process's) holds its lock,
            // and hf-hub gave up after five seconds: wait for that one to end, then take the
            // file from the cache, or resume what it left.
            Err(hf_hub::api::sync::ApiError::LockAcquisition(lock)) => {
                wait_for_lock(&lock, file, timeout, &mut *on_download)?;
                // hf-hub frees the lock when the file is in place and only then names it in the
                // cache (pointer and ref): when the download that held it completed, its file is
                // taken from the cache as soon as it is named there, not downloaded again.
                let named = Instant::now();
                while lock.with_extension("").exists() && named.elapsed() < Duration::from_secs(5) {
                    if let Some(path) = cached.get(file) {
                        return Ok(path);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Err(e) => return Err(failed(file, e)),
        }
    };
    let weights = match weights_file(WEIGHTS_FILE) {
        Ok(single) => vec![single],
        Err(ModelError::Stopped) => return Err(ModelError::Stopped),
        // Sharded: the index names the shards, each downloaded beside it.
        Err(single) => match repo.get(INDEX_FILE) {
            Ok(index) => {
                let mut shards = vec![];
                for shard in shards_from_index(&index)? {
                    let name = shard.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                    shards.push(weights_file(&name)?);
                }
                shards
            }
            Err(_) => {
                return Err(match repo.get("pytorch_model.bin") {
                    Ok(_) => ModelError::Weights(format!("model '{id}' has only pytorch_model.bin, which vitforge does not read; use a revision with model.safetensors")),
                    Err(_) => single,
                });
            }
        },
    };
    let preprocessor = repo.get(PREPROCESSOR_FILE).ok();
    Ok(ModelFiles { config, weights, preprocessor })
}

/// How loading went: what was reused and what was left over.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Tensors in the checkpoint that the model does not use (e.g. `vit.pooler.*`).
    pub unused: Vec<String>,
    /// True when the classification head was created fresh (new labels).
    pub head_reset: bool,
}

/// A model ready to run or train.
pub struct LoadedModel {
    /// Architecture and labels (`cfg.labels` are the classes the head predicts).
    pub cfg: VitConfig,
    pub preprocessor: PreprocessorConfig,
    pub params: Params,
    pub report: LoadReport,
}

impl LoadedModel {
    /// Loads a model. With `labels`, the head predicts those classes: it is reused when the
    /// checkpoint's labels are the same, created fresh otherwise (so a 1000-class ImageNet head
    /// does not stop a backbone from loading). The backbone must be complete.
    pub fn load(source: &ModelSource, labels: Option<&[String]>, device: &Device, seed: u64) -> Result<Self> {
        Self::load_with(source, labels, device, seed, &mut |_, _| ControlFlow::Continue(()))
    }

    /// [`LoadedModel::load`], following the download of a hub model's weights that are not
    /// cached yet with `on_download(received, total)` in bytes, which may stop it (see
    /// [`ModelSource::resolve`]).
    pub fn load_with(source: &ModelSource, labels: Option<&[String]>, device: &Device, seed: u64, on_download: &mut OnDownload) -> Result<Self> {
        let files = source.resolve(on_download)?;
        let cfg = VitConfig::from_json(&fs::read_to_string(&files.config)?)?;
        let preprocessor = match &files.preprocessor {
            Some(p) => PreprocessorConfig::from_json(&fs::read_to_string(p)?, cfg.image_size, cfg.num_channels)?,
            None => PreprocessorConfig::default_for(cfg.image_size),
        };
        if preprocessor.size != cfg.image_size {
            return Err(ModelError::Config(format!(
                "preprocessor_config.json resizes to {}×{} but the model takes {}×{} images",
                preprocessor.size.1, preprocessor.size.0, cfg.image_size.1, cfg.image_size.0
            )));
        }
        let mut tensors = BTreeMap::new();
        for file in &files.weights {
            let loaded = candle_core::safetensors::load(file, &Device::Cpu)
                .map_err(|e| ModelError::Weights(format!("{}: {e}", file.display())))?;
            for (name, t) in loaded {
                tensors.insert(canonical_name(&name), t);
            }
        }
        let ckpt_labels = cfg.labels.clone();
        let labels: Vec<String> = match labels {
            Some(l) => l.to_vec(),
            None if !ckpt_labels.is_empty() => ckpt_labels.clone(),
            None => match tensors.get(HEAD_WEIGHT) {
                Some(w) => (0..w.dim(0)?).map(|i| format!("LABEL_{i}")).collect(),
                None => {
                    return Err(ModelError::Config(
                        "the model has no classification head and no id2label; give the class names".into(),
                    ));
                }
            },
        };
        if labels.is_empty() {
            return Err(ModelError::Config("a classifier needs at least one label".into()));
        }
        let cfg = cfg.with_labels(&labels);
        let specs = param_specs(&cfg, labels.len());
        let head_fits = ckpt_labels == labels
            && tensors.get(HEAD_WEIGHT).is_some_and(|w| w.dims() == [labels.len(), cfg.hidden_size])
            && tensors.get(HEAD_BIAS).is_some_and(|b| b.dims() == [labels.len()]);
        let mut report = LoadReport::default();
        if !head_fits {
            tensors.remove(HEAD_WEIGHT);
            tensors.remove(HEAD_BIAS);
            report.head_reset = true;
        }
        check_complete(&specs, &tensors, head_fits)?;
        report.unused = tensors.keys().filter(|k| !specs.iter().any(|s| &s.name == *k)).cloned().collect();
        if head_fits {
            let params = Params::from_tensors(&specs, tensors, device)?;
            return Ok(Self { cfg, preprocessor, params, report });
        }
        let mut params = Params::from_tensors(
            &specs.iter().filter(|s| !keys::is_head(&s.name)).cloned().collect::<Vec<_>>(),
            tensors,
            device,
        )?;
        params.reset_head(&cfg, labels.len(), seed, device)?;
        Ok(Self { cfg, preprocessor, params, report })
    }

    /// A randomly initialised model (for training from scratch and for tests).
    pub fn random(cfg: &VitConfig, labels: &[String], seed: u64, device: &Device) -> Result<Self> {
        let cfg = cfg.with_labels(labels);
        let params = Params::init(&cfg, labels.len(), seed, device)?;
        let preprocessor = PreprocessorConfig::default_for(cfg.image_size);
        Ok(Self { cfg, preprocessor, params, report: LoadReport { unused: vec![], head_reset: true } })
    }

    /// Writes the model folder (config.json, model.safetensors, preprocessor_config.json)
    /// atomically: into a temporary sibling folder that is renamed into place.
    pub fn save(&self, dir: &Path) -> Result<()> {
        save_folder(dir, &self.cfg, &self.preprocessor, &self.params.snapshot()?)
    }
}

/// Names in a bare `ViTModel` checkpoint lack the `vit.` prefix.
fn canonical_name(name: &str) -> String {
    if name.starts_with(BACKBONE_PREFIX) || keys::in_module(name, keys::HEAD) {
        name.to_string()
    } else {
        format!("{BACKBONE_PREFIX}{name}")
    }
}

fn check_complete(specs: &[ParamSpec], tensors: &BTreeMap<String, Tensor>, with_head: bool) -> Result<()> {
    let missing: Vec<&str> = specs
        .iter()
        .filter(|s| (with_head || !keys::is_head(&s.name)) && !tensors.contains_key(&s.name))
        .map(|s| s.name.as_str())
        .collect();
    if !missing.is_empty() {
        let shown = missing.iter().take(8).copied().collect::<Vec<_>>().join(", ");
        let more = if missing.len() > 8 { format!(" and {} more", missing.len() - 8) } else { String::new() };
        return Err(ModelError::Weights(format!("the checkpoint lacks {} tensors: {shown}{more}", missing.len())));
    }
    for spec in specs {
        if let Some(t) = tensors.get(&spec.name)
            && t.dims() != spec.shape.as_slice()
        {
            return Err(ModelError::Weights(format!(
                "tensor {} has shape {:?} but config.json implies {:?}",
                spec.name,
                t.dims(),
                spec.shape
            )));
        }
    }
    Ok(())
}

/// Writes a model folder atomically (temporary sibling, fsync, rename). An existing folder at
/// `dir` is replaced.
pub fn save_folder(dir: &Path, cfg: &VitConfig, pre: &PreprocessorConfig, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    write_dir_atomically(dir, |tmp| {
        write_file(&tmp.join(CONFIG_FILE), serde_json::to_string_pretty(&cfg.to_json()).unwrap_or_default().as_bytes())?;
        write_file(
            &tmp.join(PREPROCESSOR_FILE),
            serde_json::to_string_pretty(&pre.to_json()).unwrap_or_default().as_bytes(),
        )?;
        write_safetensors(&tmp.join(WEIGHTS_FILE), tensors)
    })
}

/// Writes `tensors` as a safetensors file with the `{"format": "pt"}` metadata `transformers`
/// expects.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let host: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(host.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
        .map_err(|e| ModelError::Weights(format!("serialising weights: {e}")))?;
    write_file(path, &bytes)
}

/// Writes a file and flushes it to disk.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// The entries of `dir` that a saved model folder does not hold (anything but [`SAVED_FILES`]),
/// sorted: what replacing `dir` with a model would delete. Empty when `dir` does not exist, is
/// empty or holds an earlier model; an error when `dir` exists but is not a folder.
pub fn foreign_entries(dir: &Path) -> std::io::Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && fs::symlink_metadata(dir).is_err() => return Ok(vec![]),
        Err(e) if dir.exists() && !dir.is_dir() => return Err(std::io::Error::new(e.kind(), "it exists and is not a folder")),
        Err(e) => return Err(e),
    };
    let mut foreign = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if !(is_file && SAVED_FILES.contains(&name.as_str())) {
            foreign.push(name);
        }
    }
    foreign.sort();
    Ok(foreign)
}

/// Fills a fresh temporary sibling of `dir` with `fill`, then renames it to `dir` (replacing an
/// existing folder), so readers see either the old folder or the complete new one.
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", uuid::Uuid::now_v7()));
    fs::create_dir(&tmp)?;
    let result = fill(&tmp).and_then(|()| {
        fs::File::open(&tmp)?.sync_all()?;
        Ok(replace_dir(&tmp, dir)?)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// Moves the complete folder `from` to `dir`, its sibling, replacing what is there: the old
/// folder is moved aside first (to `.NAME.old-*`, which
/// [`restore_interrupted_replacements`] puts back after a crash between the two renames), then
/// removed.
pub fn replace_dir(from: &Path, dir: &Path) -> std::io::Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let old = parent.join(format!(".{name}.old-{}", uuid::Uuid::now_v7()));
    let had_old = dir.exists();
    if had_old {
        fs::rename(dir, &old)?;
    }
    fs::rename(from, dir)?;
    fs::File::open(parent)?.sync_all()?;
    if had_old {
        fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// Removes a folder with its contents, or a file.
pub fn remove_path(path: &Path) -> std::io::Result<()> {
    if path.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) }
}

/// Puts back, in `parent`, each folder that [`write_dir_atomically`] had moved aside when it was
/// interrupted between its two renames (a crash there leaves `.NAME.old-*` and no `NAME`). The old
/// folder is restored rather than the new one beside it: whatever recorded the replacement (a
/// checkpoint's state naming its best epoch) was written after it, so the old folder is the one
/// that record matches. The temporary folders left are the caller's to remove. Returns the folders
/// restored.
pub fn restore_interrupted_replacements(parent: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut aside: Vec<(String, String)> = Vec::new();
    for entry in fs::read_dir(parent)? {
        let file_name = entry?.file_name().to_string_lossy().into_owned();
        if let Some((name, _)) = file_name.strip_prefix('.').and_then(|rest| rest.rsplit_once(".old-")) {
            aside.push((name.to_string(), file_name.clone()));
        }
    }
    // The newest first (the names end in time-ordered UUIDs), so it is the one put back.
    aside.sort_by(|a, b| b.1.cmp(&a.1));
    let mut restored = Vec::new();
    for (name, old) in aside {
        let dir = parent.join(&name);
        if !name.is_empty() && !dir.exists() {
            fs::rename(parent.join(old), &dir)?;
            restored.push(dir);
        }
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_interrupted_between_its_renames_is_undone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("best");
        write_dir_atomically(&dir, |t| write_file(&t.join("w"), b"old")).unwrap();
        // A crash after the old folder was moved aside, before the new one took its place.
        let aside = tmp.path().join(format!(".best.old-{}", uuid::Uuid::now_v7()));
        fs::rename(&dir, &aside).unwrap();
        let new = tmp.path().join(format!(".best.tmp-{}", uuid::Uuid::now_v7()));
        fs::create_dir(&new).unwrap();
        write_file(&new.join("w"), b"new").unwrap();
        // A completed replacement's leftover is not put back over the folder in place.
        write_dir_atomically(&tmp.path().join("epoch-1"), |t| write_file(&t.join("w"), b"e1")).unwrap();
        let stale = tmp.path().join(format!(".epoch-1.old-{}", uuid::Uuid::now_v7()));
        fs::create_dir(&stale).unwrap();
        assert_eq!(restore_interrupted_replacements(tmp.path()).unwrap(), vec![dir.clone()]);
        assert_eq!(fs::read(dir.join("w")).unwrap(), b"old");
        assert_eq!(fs::read(tmp.path().join("epoch-1/w")).unwrap(), b"e1");
        assert!(!aside.exists() && new.exists() && stale.exists(), "the rest is left for the caller");
        assert_eq!(restore_interrupted_replacements(tmp.path()).unwrap(), Vec::<PathBuf>::new());
    }

    #[test]
    fn hub_ids_are_recognised_and_paths_are_not() {
        for ok in ["google/vit-base-patch16-224", "vit_small", "org.x/model-1.5"] {
            assert!(is_hub_id(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/b/c", "a/../b", ".hidden/x", "a b", "a/-x"] {
            assert!(!is_hub_id(bad), "{bad}");
        }
    }

    #[test]
    fn a_spec_written_as_a_path_is_a_folder_or_an_error_never_a_hub_id() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().to_string_lossy().into_owned();
        assert_eq!(ModelSource::parse(&spec).unwrap(), ModelSource::Dir(dir.path().to_path_buf()));
        for (spec, says) in [
            ("./no-such-model", "model folder './no-such-model' not found"),
            ("../no-such-model", "not found"),
            ("/no/such/model", "not found"),
            ("~/no-such-model", "~ is not expanded"),
            ("/dev/null", "is not a folder"),
        ] {
            let err = ModelSource::parse(spec).unwrap_err().to_string();
            assert!(err.contains(says) && !err.contains("Hugging Face"), "{spec}: {err}");
        }
        assert_eq!(ModelSource::parse("my-modle").unwrap(), ModelSource::Hub("my-modle".into()));
    }

    #[test]
    fn bare_backbone_names_get_the_prefix() {
        assert_eq!(canonical_name("embeddings.cls_token"), "vit.embeddings.cls_token");
        assert_eq!(canonical_name("vit.layernorm.weight"), "vit.layernorm.weight");
        assert_eq!(canonical_name("classifier.bias"), "classifier.bias");
    }
}
