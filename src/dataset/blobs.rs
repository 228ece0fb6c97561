//! The content-addressed image store: one file per distinct image, named by the SHA-256 of its
//! bytes, so an image shared by several datasets is stored once.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// Prefix of files being written; they are renamed to their hash once complete.
const TEMP_PREFIX: &str = ".tmp-";

/// Blobs under one folder (`<data-dir>/blobs`). Cheap to clone.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    /// Where [`put`](Self::put) notes the blobs it writes, when the store is [`recording`](Self::recording).
    written: Option<Arc<Mutex<Vec<String>>>>,
}

impl BlobStore {
    /// A store rooted at `root`, creating the folder if needed.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(Self { root, written: None })
    }

    /// The same store, noting in the list returned with it the name of every blob its
    /// [`put`](Self::put) writes (not those it finds already stored): what an upload added, to be
    /// removed again if the upload fails.
    pub fn recording(&self) -> (Self, Arc<Mutex<Vec<String>>>) {
        let written = Arc::new(Mutex::new(Vec::new()));
        (Self { root: self.root.clone(), written: Some(written.clone()) }, written)
    }

    /// The folder holding the blobs.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether `hash` is a blob name: 64 lowercase hexadecimal digits.
    pub fn is_valid_hash(hash: &str) -> bool {
        hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }

    /// The SHA-256 of `bytes` as a blob name.
    pub fn hash(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// Stores `bytes` unless a blob with the same content exists, and returns its name. The data is
    /// written to a temporary file in the same folder, flushed to disk, then renamed, so a blob is
    /// either complete or absent.
    pub fn put(&self, bytes: &[u8]) -> io::Result<String> {
        let hash = Self::hash(bytes);
        let path = self.root.join(&hash);
        if path.exists() {
            return Ok(hash);
        }
        let mut tmp = tempfile::Builder::new().prefix(TEMP_PREFIX).tempfile_in(&self.root)?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        // A concurrent put of the same content may win the rename; both files are identical.
        tmp.persist(&path).map_err(|e| e.error)?;
        if let Some(written) = &self.written {
            written.lock().unwrap_or_else(|e| e.into_inner()).push(hash.clone());
        }
        Ok(hash)
    }

    /// A new path, in the store's folder, for a file that is to become a blob through
    /// [`adopt`](Self::adopt); a file left there by a process that died is a temporary file that
    /// [`remove_stale_temp_files`](Self::remove_stale_temp_files) removes.
    pub fn temp_path(&self) -> PathBuf {
        self.root.join(format!("{TEMP_PREFIX}{}", uuid::Uuid::now_v7()))
    }

    /// Makes the complete file `temp` (from [`temp_path`](Self::temp_path)) blob `expected`,
    /// reading it once to hash it: flushed to disk and renamed when its content has that hash,
    /// refused (`InvalidData`, naming the hash it has) otherwise. `temp` is gone either way.
    pub fn adopt(&self, temp: &Path, expected: &str) -> io::Result<()> {
        let adopted = (|| {
            let path = self.path(expected)?;
            let mut file = std::fs::File::open(temp)?;
            let mut hasher = Sha256::new();
            io::copy(&mut file, &mut hasher)?;
            let hash = hex::encode(hasher.finalize());
            if hash != expected {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("holds other content ({hash})")));
            }
            file.sync_all()?;
            std::fs::rename(temp, path)
        })();
        if adopted.is_err() {
            std::fs::remove_file(temp).ok();
        }
        adopted
    }

    /// The file of blob `hash` (which may not exist). Refuses anything that is not a blob name, so
    /// no caller can reach outside the store.
    pub fn path(&self, hash: &str) -> io::Result<PathBuf> {
        if !Self::is_valid_hash(hash) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not a blob name: {hash:?}")));
        }
        Ok(self.root.join(hash))
    }

    /// The bytes of blob `hash`.
    pub fn read(&self, hash: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.path(hash)?)
    }

    /// Deletes blob `hash`; `Ok(false)` when it was not there.
    pub fn remove(&self, hash: &str) -> io::Result<bool> {
        match std::fs::remove_file(self.path(hash)?) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The names of every stored blob (files that are not blob names are left out).
    pub fn list(&self) -> io::Result<Vec<String>> {
        let mut hashes = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            if let Some(name) = entry?.file_name().to_str()
                && Self::is_valid_hash(name)
            {
                hashes.push(name.to_string());
            }
        }
        Ok(hashes)
    }

    /// Flushes the folder itself, so the renames of blobs written so far survive a power loss.
    pub fn sync(&self) -> io::Result<()> {
        #[cfg(unix)]
        std::fs::File::open(&self.root)?.sync_all()?;
        Ok(())
    }

    /// Removes temporary files older than `age`, left behind when a process died mid-write.
    /// Younger ones may belong to a write in progress in another process and are kept.
    pub fn remove_stale_temp_files(&self, age: Duration) -> io::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            if !entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                continue;
            }
            let modified = entry.metadata()?.modified()?;
            if SystemTime::now().duration_since(modified).unwrap_or_default() >= age {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_is_content_addressed_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let a = store.put(b"hello").unwrap();
        assert_eq!(a, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(store.put(b"hello").unwrap(), a);
        assert_eq!(store.read(&a).unwrap(), b"hello");
        assert_eq!(store.list().unwrap(), vec![a.clone()]);
        // No temporary file is left next to the blob.
        assert_eq!(std::fs::read_dir(store.root()).unwrap().count(), 1);
        assert!(store.remove(&a).unwrap());
        assert!(!store.remove(&a).unwrap());
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn adopt_keeps_a_file_only_under_its_own_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let hello = BlobStore::hash(b"hello");
        let temp = store.temp_path();
        std::fs::write(&temp, b"hello").unwrap();
        store.adopt(&temp, &hello).unwrap();
        assert_eq!(store.list().unwrap(), vec![hello.clone()]);
        assert_eq!(std::fs::read_dir(store.root()).unwrap().count(), 1, "the temporary file became the blob");
        // Other content, or a name that is no blob name: refused, and the temporary file is gone.
        for name in [BlobStore::hash(b"bye"), "../escape".to_string()] {
            let temp = store.temp_path();
            std::fs::write(&temp, b"not bye").unwrap();
            let refused = store.adopt(&temp, &name).unwrap_err();
            assert!(!temp.exists(), "{name}");
            assert_eq!(store.list().unwrap(), vec![hello.clone()]);
            if name.len() == 64 {
                assert_eq!(refused.kind(), io::ErrorKind::InvalidData);
                assert!(refused.to_string().contains(&BlobStore::hash(b"not bye")), "{refused}");
            }
        }
    }

    #[test]
    fn hashes_are_validated_before_touching_paths() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        for bad in ["../etc/passwd", "", "ABCDEF", &"A".repeat(64), &format!("{}/", "a".repeat(63)), &"g".repeat(64)] {
            assert_eq!(store.path(bad).unwrap_err().kind(), io::ErrorKind::InvalidInput, "{bad}");
            assert!(store.remove(bad).is_err());
        }
        assert!(store.path(&"0".repeat(64)).is_ok());
    }

    #[test]
    fn stale_temp_files_are_removed_and_fresh_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        std::fs::write(dir.path().join(".tmp-abc"), b"partial").unwrap();
        assert_eq!(store.remove_stale_temp_files(Duration::from_secs(3600)).unwrap(), 0);
        assert_eq!(store.remove_stale_temp_files(Duration::ZERO).unwrap(), 1);
        assert!(!dir.path().join(".tmp-abc").exists());
    }
}
