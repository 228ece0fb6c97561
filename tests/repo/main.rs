//! Checks that read the repository itself rather than run the service: what the container image
//! is built from.

mod docker_context;

use std::path::PathBuf;

/// The repository root (the crate's manifest folder).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
