//! Where things live inside the data folder. Every file the service writes is below `root`.

use std::path::{Path, PathBuf};

/// What a cached thumbnail's name adds to its blob's hash. The number counts changes to how
/// thumbnails are made (2: the EXIF orientation applied). The start-up sweep removes thumbnails
/// of any other name, so a change here retires the thumbnails made the old way.
pub const THUMBNAIL_SUFFIX: &str = ".v2.jpg";

/// The layout of a data folder: the SQLite file, the blob store, job checkpoints and models.
#[derive(Debug, Clone)]
pub struct DataPaths {
    root: PathBuf,
}

impl DataPaths {
    /// A layout rooted at `root` (nothing is created here; see [`DataPaths::create_all`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Creates the folders of the layout that do not exist yet.
    pub fn create_all(&self) -> std::io::Result<()> {
        for dir in [self.root.clone(), self.blobs(), self.jobs(), self.models(), self.tmp(), self.thumbnails()] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(())
    }

    /// The data folder itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The SQLite database file (the default database: `--database-url` may name another).
    pub fn database(&self) -> PathBuf {
        self.root.join("vitforge.db")
    }

    /// Content-addressed image store (`<sha256>` files).
    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }

    /// Per-job working folders holding epoch checkpoints.
    pub fn jobs(&self) -> PathBuf {
        self.root.join("jobs")
    }

    /// Folder of one job's checkpoints.
    pub fn job(&self, job_id: &str) -> PathBuf {
        self.jobs().join(job_id)
    }

    /// Registered fine-tuned models, one folder each.
    pub fn models(&self) -> PathBuf {
        self.root.join("models")
    }

    /// Folder of one registered model.
    pub fn model(&self, model_id: &str) -> PathBuf {
        self.models().join(model_id)
    }

    /// Thumbnails of dataset images (a cache: deleting it costs only their regeneration).
    pub fn thumbnails(&self) -> PathBuf {
        self.root.join("thumbnails")
    }

    /// The cached thumbnail of a blob.
    pub fn thumbnail(&self, blob: &str) -> PathBuf {
        self.thumbnails().join(format!("{blob}{THUMBNAIL_SUFFIX}"))
    }

    /// Scratch space for uploads in flight; emptied at start-up.
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
}

/// The folders in `dir` whose modification time is at least `grace` ago (a missing `dir`: none).
pub fn idle_folders(dir: &Path, grace: std::time::Duration) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        other => other?,
    };
    let mut idle = vec![];
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        let age = meta.modified()?.elapsed().unwrap_or_default();
        if meta.is_dir() && age >= grace {
            idle.push(entry.path());
        }
    }
    Ok(idle)
}
