//! The module graph of `src/` runs one way, as `ARCHITECTURE.md` draws it: these tests read the
//! layer table from `ARCHITECTURE.md`, find every module path each file of `src/` names
//! (`crate::…`, `super::…`, `self::…`, `use` groups included), and fail when a module names one
//! in a layer above its own, when two files name each other (other than a module and its own
//! children), when a module of the bottom layers
//! uses the async or web stack, or when a function is longer than [`MAX_FUNCTION_LINES`] without
//! a comment saying why.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::{repo_root, rust_files};

/// Longest function allowed without a `// long: <why>` comment on the line above its signature.
const MAX_FUNCTION_LINES: usize = 90;

/// Modules that must not use tokio, axum or sqlx (synchronous code, usable without a service).
const SYNC_ONLY: [&str; 4] = ["model", "imaging", "dataset", "train"];

/// The layers of `ARCHITECTURE.md`'s table, bottom first: each row's top-level modules.
fn layers_from_architecture(text: &str) -> Vec<Vec<String>> {
    let start = text.find("## Layers").expect("ARCHITECTURE.md has a '## Layers' section");
    let mut layers = Vec::new();
    for line in text[start..].lines().skip(1) {
        if line.starts_with("## ") {
            break;
        }
        // | 1 | `model`, `imaging` | ... |
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || cells[1].parse::<usize>().is_err() {
            continue;
        }
        let modules: Vec<String> =
            cells[2].split('`').skip(1).step_by(2).map(|m| m.trim_end_matches(".rs").to_string()).collect();
        assert!(!modules.is_empty(), "layer row without modules: {line}");
        layers.push(modules);
    }
    assert!(layers.len() >= 3, "ARCHITECTURE.md's layer table has rows '| n | `module`, … | … |'");
    layers
}

/// The module path of a file under `src/` (`model/fast/mod.rs` → `model::fast`); `main.rs` is
/// the binary, `lib.rs` the crate root.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().to_string_lossy().replace('\\', "/");
    let rel = rel.trim_end_matches(".rs");
    let rel = rel.strip_suffix("/mod").unwrap_or(rel);
    match rel {
        "lib" => String::new(),
        other => other.replace('/', "::"),
    }
}

/// The text of a file as the compiler sees it for the build: comments removed, and the
/// `#[cfg(test)]` module at its end left out (tests may set up whatever they need).
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]" && lines.peek().is_some_and(|l| l.trim_start().starts_with("mod tests")) {
            break;
        }
        let code = match line.find("//") {
            // A `//` inside a string literal ("http://…") is not a comment.
            Some(at) if line[..at].matches('"').count() % 2 == 0 => &line[..at],
            _ => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Every path that starts at one of `roots` (`crate`, `super`, `self`, or the library's name from
/// the binary), with `use` groups expanded: `crate::{db, http::{self, AppState}}` gives
/// `crate::db`, `crate::http`, `crate::http::AppState`.
fn paths_in(code: &str, roots: &[&str]) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let at_word_start = i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_' || chars[i - 1] == ':');
        if at_word_start {
            for root in roots {
                let word: Vec<char> = format!("{root}::").chars().collect();
                if chars[i..].starts_with(&word) {
                    let (paths, end) = parse_path(&chars, i);
                    out.extend(paths);
                    i = end.max(i + 1);
                    break;
                }
            }
        }
        i += 1;
    }
    out
}

/// Parses a path (with `{…}` groups) starting at `i`; returns its expansions and where it ends.
fn parse_path(chars: &[char], mut i: usize) -> (Vec<Vec<String>>, usize) {
    let mut prefix: Vec<String> = Vec::new();
    loop {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i < chars.len() && chars[i] == '{' {
            let mut out = Vec::new();
            i += 1;
            loop {
                while i < chars.len() && (chars[i].is_whitespace() || chars[i] == ',') {
                    i += 1;
                }
                if i >= chars.len() || chars[i] == '}' {
                    return (out, i + 1);
                }
                let (inner, end) = parse_path(chars, i);
                for p in inner {
                    let mut full = prefix.clone();
                    full.extend(p.into_iter().filter(|s| s != "self"));
                    out.push(full);
                }
                i = end;
            }
        }
        let start = i;
        while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '*') {
            i += 1;
        }
        if i == start {
            return (vec![prefix], i);
        }
        prefix.push(chars[start..i].iter().collect());
        if chars[i..].starts_with(&[':', ':']) {
            i += 2;
        } else {
            return (vec![prefix], i);
        }
    }
}

/// Resolves a path named in module `from` to the deepest module (file) of `modules` it reaches.
fn resolve(from: &str, path: &[String], modules: &BTreeSet<String>, lib_root: &str) -> Option<String> {
    let mut here: Vec<String> = if from.is_empty() { vec![] } else { from.split("::").map(String::from).collect() };
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => here.clear(),
        Some(root) if root == lib_root => here.clear(),
        Some("self") => {}
        Some("super") => {
            while rest.first().is_some_and(|s| s == "super") {
                here.pop()?;
                rest = &rest[1..];
            }
            return descend(here, rest, modules);
        }
        _ => return None,
    }
    descend(here, &rest[1..], modules)
}

fn descend(mut here: Vec<String>, rest: &[String], modules: &BTreeSet<String>) -> Option<String> {
    for part in rest {
        let mut next = here.clone();
        next.push(part.clone());
        if modules.contains(&next.join("::")) {
            here = next;
        } else {
            break;
        }
    }
    Some(here.join("::"))
}

/// Whether `line` re-exports or declares modules under `module` (a parent exposing its own
/// children is structure, not a dependency).
fn is_structure(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("pub use self::") || t.starts_with("mod ") || t.starts_with("pub mod ") || t.starts_with("pub(crate) mod ")
        || (t.starts_with("pub use ") && !t.starts_with("pub use crate::") && !t.starts_with("pub use super::"))
}

/// Who names whom: for every module (file), the modules it names, by path.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = repo_root().join("src");
    let files = rust_files(&src);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut named = BTreeMap::new();
    for file in &files {
        let from = module_of(&src, file);
        let text = std::fs::read_to_string(file).unwrap();
        let code: String = code_of(&text).lines().filter(|l| !is_structure(l)).collect::<Vec<_>>().join("\n");
        let roots: &[&str] = if from == "main" { &["vitforge"] } else { &["crate", "super", "self"] };
        let base = if from == "main" { String::new() } else { from.clone() };
        let mut targets = BTreeSet::new();
        for path in paths_in(&code, roots) {
            if let Some(to) = resolve(&base, &path, &modules, "vitforge")
                && to != from
                && !to.is_empty()
            {
                targets.insert(to);
            }
        }
        named.insert(from, targets);
    }
    named
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

#[test]
fn no_module_names_one_in_a_layer_above_its_own() {
    let architecture = std::fs::read_to_string(repo_root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let layers = layers_from_architecture(&architecture);
    let layer_of: BTreeMap<&str, usize> =
        layers.iter().enumerate().flat_map(|(i, mods)| mods.iter().map(move |m| (m.as_str(), i))).collect();
    let graph = graph();
    let mut problems = Vec::new();
    for module in graph.keys().filter(|m| !m.is_empty()) {
        if !layer_of.contains_key(top(module)) {
            problems.push(format!("`{}` is in no layer of ARCHITECTURE.md's table", top(module)));
        }
    }
    for (from, targets) in &graph {
        let Some(&own) = layer_of.get(top(from)) else { continue };
        for to in targets {
            if let Some(&theirs) = layer_of.get(top(to))
                && theirs > own
            {
                problems.push(format!("{from} (layer {}) names {to} (layer {})", own + 1, theirs + 1));
            }
        }
    }
    problems.sort();
    problems.dedup();
    assert!(problems.is_empty(), "the module graph does not run one way:\n{}", problems.join("\n"));
}

/// Whether `child` is a module declared directly inside `parent` (`model::fast` in `model`).
fn is_child(parent: &str, child: &str) -> bool {
    child.rsplit_once("::").is_some_and(|(p, _)| p == parent)
}

/// Two files may not name each other, except a module's own file and its direct children (the
/// children use the parent's types, the parent calls into its private children: one module).
#[test]
fn no_two_files_name_each_other() {
    let graph = graph();
    let mut mutual = Vec::new();
    for (a, targets) in &graph {
        for b in targets {
            if is_child(a, b) || is_child(b, a) {
                continue;
            }
            if a < b && graph.get(b).is_some_and(|t| t.contains(a)) {
                mutual.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(mutual.is_empty(), "files that name each other:\n{}", mutual.join("\n"));
}

#[test]
fn the_bottom_layers_are_synchronous() {
    let src = repo_root().join("src");
    let mut found = Vec::new();
    for file in rust_files(&src) {
        let module = module_of(&src, &file);
        if !SYNC_ONLY.contains(&top(&module)) {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&file).unwrap());
        for stack in ["tokio::", "axum::", "sqlx::", "async fn"] {
            if code.contains(stack) {
                found.push(format!("{module} uses {stack}"));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn no_function_is_longer_than_the_limit_without_a_reason() {
    let src = repo_root().join("src");
    let mut long = Vec::new();
    for file in rust_files(&src) {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            let is_fn = ["fn ", "pub fn ", "pub(crate) fn ", "async fn ", "pub async fn ", "unsafe fn ", "pub unsafe fn ", "pub(crate) unsafe fn "]
                .iter()
                .any(|p| trimmed.starts_with(p));
            if !is_fn || line.trim_end().ends_with(';') {
                continue;
            }
            let closing = " ".repeat(indent) + "}";
            let Some(len) = lines[i..].iter().position(|l| l.trim_end() == closing) else { continue };
            let excused = lines[..i].iter().rev().take_while(|l| {
                let t = l.trim_start();
                t.starts_with("//") || t.starts_with("#[")
            }).any(|l| l.trim_start().starts_with("// long:"));
            if len + 1 > MAX_FUNCTION_LINES && !excused {
                let rel = file.strip_prefix(&src).unwrap().display();
                long.push(format!("src/{rel}:{} is {} lines: {}", i + 1, len + 1, trimmed.split('(').next().unwrap_or(trimmed)));
            }
        }
    }
    assert!(long.is_empty(), "functions over {MAX_FUNCTION_LINES} lines (split them, or say why in a `// long:` comment):\n{}", long.join("\n"));
}

#[test]
fn paths_and_use_groups_are_read_like_the_compiler_reads_them() {
    let code = code_of("use crate::{db, http::{self, AppState}};\nlet x = super::super::fast::go(); // crate::nope\n");
    let paths = paths_in(&code, &["crate", "super", "self"]);
    let flat: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(flat, ["crate::db", "crate::http", "crate::http::AppState", "super::super::fast::go"]);
    let modules: BTreeSet<String> = ["model", "model::fast", "model::fast::sgemm", "http", "db"].iter().map(|s| s.to_string()).collect();
    assert_eq!(resolve("model::fast::sgemm", &paths[3], &modules, "vitforge").as_deref(), Some("model::fast"));
    assert_eq!(resolve("train", &paths[2], &modules, "vitforge").as_deref(), Some("http"));
    let text = "fn a() {}\n#[cfg(test)]\nmod tests {\n    use crate::http;\n}\n";
    assert!(!code_of(text).contains("http"));
}
