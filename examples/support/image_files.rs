//! What the examples that read image folders share (each includes this file by its path; a
//! folder without a `main.rs` is no example of its own).

use std::path::{Path, PathBuf};

/// The JPEG, PNG and TIFF files under `dir`, at any depth, appended to `out`.
pub fn files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files(&path, out)?;
        } else if path.extension().is_some_and(|e| ["jpg", "jpeg", "png", "tif", "tiff"].contains(&e.to_string_lossy().to_lowercase().as_str())) {
            out.push(path);
        }
    }
    Ok(())
}
