//! The deployment files (`docker-compose.yml`, `deploy/kubernetes/`) set only variables the binary
//! reads: a misspelt or removed `VITFORGE_*` would otherwise be ignored without a word.

use std::collections::BTreeSet;
use std::path::Path;

use super::{repo_root, rust_files};

/// Every `VITFORGE_*` name in `text` (settings, and comments that advise one).
fn variables(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("VITFORGE_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The `VITFORGE_*` variables the binary reads: the `env = "…"` of its flags and the names it
/// passes to `std::env::var`, all of them quoted in the source.
fn read_by_the_binary(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for file in rust_files(&root.join("src")) {
        let text = std::fs::read_to_string(&file).unwrap();
        out.extend(variables(&text).into_iter().filter(|v| text.contains(&format!("\"{v}\""))));
    }
    out
}

/// The variables of `files` the binary does not read, as `file: NAME`.
fn unknown(root: &Path, files: &[std::path::PathBuf], known: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        for v in variables(&text) {
            if !known.contains(&v) {
                out.push(format!("{}: {v}", file.strip_prefix(root).unwrap_or(file).display()));
            }
        }
    }
    out
}

fn deployment_files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut files = vec![root.join("docker-compose.yml")];
    let mut manifests: Vec<_> = std::fs::read_dir(root.join("deploy/kubernetes")).unwrap().map(|e| e.unwrap().path()).collect();
    manifests.sort();
    files.extend(manifests.into_iter().filter(|p| p.extension().is_some_and(|e| e == "yaml")));
    files
}

#[test]
fn every_variable_the_deployment_files_set_is_one_the_binary_reads() {
    let root = repo_root();
    let known = read_by_the_binary(&root);
    // The reader finds the flags' variables, including those the cluster needs.
    for v in ["VITFORGE_DATABASE_URL", "VITFORGE_ROLE", "VITFORGE_WORKER_NAME", "VITFORGE_LEASE_SECS", "VITFORGE_API_KEY", "VITFORGE_DATA_DIR"] {
        assert!(known.contains(v), "{v} is not found among the variables the binary reads: {known:?}");
    }
    let files = deployment_files(&root);
    assert!(files.len() >= 4, "{files:?}");
    let set: BTreeSet<String> = files.iter().flat_map(|f| variables(&std::fs::read_to_string(f).unwrap())).collect();
    assert!(set.contains("VITFORGE_ROLE") && set.contains("VITFORGE_DATABASE_URL"), "{set:?}");
    let unknown = unknown(&root, &files, &known);
    assert!(unknown.is_empty(), "variables the binary does not read: {unknown:?}");
}

#[test]
fn a_misspelt_variable_in_a_manifest_is_caught() {
    let root = repo_root();
    let known = read_by_the_binary(&root);
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("api.yaml");
    std::fs::write(&manifest, "env:\n  - name: VITFORGE_DATABASE_URL\n  - name: VITFORGE_DATABSE_URL\n").unwrap();
    assert_eq!(unknown(&root, std::slice::from_ref(&manifest), &known), vec![format!("{}: VITFORGE_DATABSE_URL", manifest.display())]);
}
