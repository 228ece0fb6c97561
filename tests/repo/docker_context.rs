//! The container image is built from the build context that the `Dockerfile` and `.dockerignore`
//! define. A file the crate reads at compile time (`include_str!`, `include_bytes!`,
//! `sqlx::migrate!`, a build script, any source under `src/`) that is left out of it breaks
//! `docker build` for every user while `cargo build` here still works, as `openapi.yaml` once did.
//! These tests find every such file from the sources and check that the Dockerfile's builder copies
//! it and that `.dockerignore` keeps it in, with Docker's own pattern rules.

use std::path::{Path, PathBuf};

use crate::repo_root;

/// Where a compile-time read is made, and the file (or folder) it reads, relative to the root.
#[derive(Debug)]
struct Needed {
    path: String,
    because: String,
}

/// Every file the crate needs at compile time, relative to the repository root, `/`-separated.
fn needed_files(root: &Path) -> Vec<Needed> {
    let mut needed: Vec<Needed> = ["Cargo.toml", "Cargo.lock"]
        .iter()
        .map(|f| Needed { path: f.to_string(), because: "the manifest and the lock file".into() })
        .collect();
    if root.join("build.rs").exists() {
        needed.push(Needed { path: "build.rs".into(), because: "the build script".into() });
    }
    for file in walk(&root.join("src")) {
        let rel = relative(root, &file);
        needed.push(Needed { path: rel.clone(), because: "a file under src/".into() });
        if file.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (macro_name, base) in [("include_str!", Base::File), ("include_bytes!", Base::File), ("sqlx::migrate!", Base::Manifest)] {
            for arg in macro_args(&text, macro_name) {
                let literal = string_literal(&arg).unwrap_or_else(|| {
                    panic!("{rel}: {macro_name}({arg}): only a plain string literal can be checked against the image's build context")
                });
                let target = match base {
                    Base::File => file.parent().unwrap().join(&literal),
                    Base::Manifest => root.join(&literal),
                };
                let target = normalise(&target);
                assert!(target.exists(), "{rel}: {macro_name}(\"{literal}\") names {}, which does not exist", target.display());
                let because = format!("{rel} reads it with {macro_name}(\"{literal}\")");
                if target.is_dir() {
                    for inner in walk(&target) {
                        needed.push(Needed { path: relative(root, &inner), because: because.clone() });
                    }
                } else {
                    needed.push(Needed { path: relative(root, &target), because });
                }
            }
        }
    }
    needed
}

#[derive(Clone, Copy)]
enum Base {
    /// Relative to the file the macro is in (`include_str!`, `include_bytes!`).
    File,
    /// Relative to the crate's manifest folder (`sqlx::migrate!`).
    Manifest,
}

/// The argument text of every call of `name` (`name(...)`) in `text`.
fn macro_args(text: &str, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices(name) {
        // A mention in a comment (`include_str!` in prose) is not a call.
        let line = text[..at].rsplit('\n').next().unwrap_or("");
        if line.contains("//") {
            continue;
        }
        let Some(open) = text[at + name.len()..].trim_start().strip_prefix('(') else { continue };
        let mut depth = 1;
        let mut arg = String::new();
        for ch in open.chars() {
            match ch {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                break;
            }
            arg.push(ch);
        }
        out.push(arg.trim().to_string());
    }
    out
}

/// The contents of a plain `"..."` literal without escapes.
fn string_literal(arg: &str) -> Option<String> {
    let inner = arg.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains(['"', '\\'])).then(|| inner.to_string())
}

fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).to_string_lossy().replace('\\', "/")
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { out.extend(walk(&path)) } else { out.push(path) }
    }
    out.sort();
    out
}

/// One `.dockerignore` line: a pattern, and whether it re-includes (`!`).
struct Pattern {
    glob: Vec<char>,
    exclusion: bool,
}

/// `.dockerignore` with the rules of Docker's pattern matcher (moby/patternmatcher): `#` comments,
/// `!` re-includes, a leading `/` and a trailing `/` are dropped, `*` and `?` stay within one path
/// segment, `**` crosses segments, a pattern that matches a parent folder matches everything under
/// it, and the last matching pattern decides.
struct DockerIgnore {
    patterns: Vec<Pattern>,
}

impl DockerIgnore {
    fn parse(text: &str) -> Self {
        let mut patterns = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (exclusion, pattern) = match line.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, line),
            };
            assert!(!pattern.contains(['[', '\\']), ".dockerignore: '{pattern}': character classes and escapes are not supported by this check");
            let cleaned = pattern.trim_start_matches('/').trim_end_matches('/');
            let cleaned = cleaned.strip_prefix("./").unwrap_or(cleaned);
            patterns.push(Pattern { glob: cleaned.chars().collect(), exclusion });
        }
        Self { patterns }
    }

    /// Whether `path` (relative, `/`-separated) is left out of the build context.
    fn excludes(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        let mut excluded = false;
        for p in &self.patterns {
            if p.exclusion != excluded {
                continue;
            }
            let hit = (1..=parts.len()).any(|n| glob_match(&p.glob, &parts[..n].join("/").chars().collect::<Vec<_>>()));
            if hit {
                excluded = !p.exclusion;
            }
        }
        excluded
    }
}

/// Docker's glob: `*` any run within a segment, `?` one character within a segment, `**` any run
/// across segments (a following `/` is part of it, so `**/x` also matches `x`).
fn glob_match(p: &[char], s: &[char]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some('*') if p.get(1) == Some(&'*') => {
            let mut rest = &p[2..];
            if rest.first() == Some(&'/') {
                rest = &rest[1..];
            }
            if rest.is_empty() {
                return true;
            }
            // `(.*/)?` then the rest: the rest at the start, or after any '/'.
            glob_match(rest, s) || (0..s.len()).any(|i| s[i] == '/' && glob_match(rest, &s[i + 1..]))
        }
        Some('*') => (0..=s.len()).take_while(|&i| i == 0 || s[i - 1] != '/').any(|i| glob_match(&p[1..], &s[i..])),
        Some('?') => s.first().is_some_and(|&c| c != '/') && glob_match(&p[1..], &s[1..]),
        Some(&c) => s.first() == Some(&c) && glob_match(&p[1..], &s[1..]),
    }
}

/// The sources of the `COPY` instructions of the Dockerfile's build stages that copy from the
/// build context (not `--from=` another stage), `/`-separated and without `./`.
fn copied_from_context(dockerfile: &str) -> Vec<String> {
    let joined = dockerfile.replace("\\\n", " ");
    let mut sources = Vec::new();
    for line in joined.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first().is_none_or(|w| !w.eq_ignore_ascii_case("COPY")) {
            continue;
        }
        let args: Vec<&str> = words[1..].iter().copied().filter(|w| !w.starts_with("--")).collect();
        if words[1..].iter().any(|w| w.starts_with("--from")) || args.len() < 2 {
            continue;
        }
        for src in &args[..args.len() - 1] {
            let src = src.trim_start_matches("./").trim_end_matches('/');
            sources.push(if src.is_empty() { ".".to_string() } else { src.to_string() });
        }
    }
    sources
}

/// Compile-time files missing from the image's build context, with why each is needed.
fn missing_from_image(root: &Path, dockerfile: &str, dockerignore: &str) -> Vec<String> {
    let ignore = DockerIgnore::parse(dockerignore);
    let copied = copied_from_context(dockerfile);
    let mut missing = Vec::new();
    for need in needed_files(root) {
        let in_copy = copied.iter().any(|src| src == "." || need.path == *src || need.path.starts_with(&format!("{src}/")));
        if !in_copy {
            missing.push(format!("{} ({}): no COPY of the Dockerfile takes it", need.path, need.because));
        } else if ignore.excludes(&need.path) {
            missing.push(format!("{} ({}): .dockerignore leaves it out of the build context", need.path, need.because));
        }
    }
    missing
}

#[test]
fn every_file_the_crate_reads_at_compile_time_is_in_the_image_build_context() {
    let root = repo_root();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let dockerignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap_or_default();
    let needed = needed_files(&root);
    assert!(needed.iter().any(|n| n.path == "openapi.yaml"), "the include_str! of openapi.yaml is found");
    assert!(needed.iter().any(|n| n.path.starts_with("migrations/")), "the migrations are found");
    let missing = missing_from_image(&root, &dockerfile, &dockerignore);
    assert!(missing.is_empty(), "`docker build .` would fail:\n{}", missing.join("\n"));
}

#[test]
fn a_dockerfile_or_dockerignore_that_leaves_a_needed_file_out_is_caught() {
    let root = repo_root();
    let dockerignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap_or_default();
    // The Dockerfile as it was when `openapi.yaml` went missing: only src/ and migrations/.
    let narrow = "FROM rust AS builder\nCOPY Cargo.toml Cargo.lock ./\nCOPY migrations ./migrations\nCOPY src ./src\nRUN cargo build\n";
    let missing = missing_from_image(&root, narrow, &dockerignore);
    assert!(missing.iter().any(|m| m.starts_with("openapi.yaml (src/http/docs.rs reads it")), "{missing:?}");
    // The whole context copied, but the file ignored: by name, by a glob, by a folder above it.
    let whole = "FROM rust AS builder\nCOPY . .\nCOPY --from=other /x /x\n";
    for extra in ["openapi.yaml", "*.yaml", "**/*.yaml", "/openapi.yaml", "migrations/", "src/http"] {
        let missing = missing_from_image(&root, whole, &format!("{dockerignore}\n{extra}\n"));
        assert!(!missing.is_empty(), "'{extra}' in .dockerignore is not caught");
    }
    // A later `!` pattern takes a file back in.
    assert!(missing_from_image(&root, whole, &format!("{dockerignore}\n*.yaml\n!openapi.yaml\n")).is_empty());
}

#[test]
fn dockerignore_patterns_follow_docker_s_rules() {
    let ig = DockerIgnore::parse("# comment\n**/target/\n*.md\ntests\n!tests/keep.rs\n/data/\nsrc/**/*.bin\n");
    for excluded in ["target/x", "fuzz/target/debug/a", "README.md", "tests/api/main.rs", "data/blobs/x", "src/a/b/c.bin", "src/c.bin"] {
        assert!(ig.excludes(excluded), "{excluded} should be excluded");
    }
    for kept in ["src/main.rs", "docs/README.mdx", "src/README.md", "tests/keep.rs", "database.rs", "targets/x", "src/a.binx"] {
        assert!(!ig.excludes(kept), "{kept} should be kept");
    }
}

#[test]
fn compile_time_reads_are_found_in_code_but_not_in_comments() {
    let text = "// include_str!(\"nope\")\nconst A: &str = include_str!(\"../x.txt\");\nlet b = include_bytes! (\"y.bin\");";
    assert_eq!(macro_args(text, "include_str!"), vec!["\"../x.txt\"".to_string()]);
    assert_eq!(macro_args(text, "include_bytes!"), vec!["\"y.bin\"".to_string()]);
    assert_eq!(string_literal("\"a/b\""), Some("a/b".into()));
    assert_eq!(string_literal("concat!(env!(\"X\"), \"/y\")"), None);
}
