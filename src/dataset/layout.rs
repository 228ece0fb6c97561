//! The image-folder layout: which entries of an archive (or folder) are images of which class and
//! split, decided from the entry names alone before any content is read.
//!
//! Accepted shapes are `<class>/<image>` and `<split>/<class>/<image>` (split folders `train`,
//! `validation` or `val`, `test`), optionally inside one wrapping folder. The archive uses split
//! folders if any file sits at `<split>/<class>/<image>`; files at another depth are rejected with
//! a reason. Operating-system clutter (`__MACOSX/`, names starting with a dot such as `.DS_Store`
//! and `._photo.jpg`, `Thumbs.db`, `desktop.ini`) is skipped silently: a zip made by macOS Finder
//! has one such file per image, and listing them would hide the rejections that matter.
//! Absolute names, `..` components and links are rejected; they are never used as paths.

use std::collections::{BTreeSet, HashSet};

use super::Split;

/// Longest entry name accepted, in bytes.
const MAX_NAME_BYTES: usize = 1024;
/// Longest name kept in a rejection message, in characters.
const MAX_SHOWN_CHARS: usize = 256;

/// What an archive entry is, as its header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    /// Anything else (device, pipe, sparse or encrypted file…); the text says what it is.
    Unsupported(&'static str),
}

/// An entry's header: its name (lossily decoded when `utf8` is false), what it is, and its
/// declared size (only a hint: reads are bounded independently).
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub name: String,
    pub utf8: bool,
    pub kind: Kind,
    pub size: u64,
}

impl Entry {
    /// An entry named by raw bytes. A name over [`MAX_NAME_BYTES`] is cut just past the limit (it is
    /// rejected anyway), so a hostile archive cannot make the plan hold huge names.
    pub fn new(name: &[u8], kind: Kind, size: u64) -> Self {
        let utf8 = std::str::from_utf8(name).is_ok();
        let name = String::from_utf8_lossy(&name[..name.len().min(MAX_NAME_BYTES + 1)]).into_owned();
        Self { name, utf8, kind, size }
    }

    #[cfg(test)]
    pub fn file(name: &str) -> Self {
        Self::new(name.as_bytes(), Kind::File, 1)
    }
}

/// What to do with one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// Read it as an image of `label` in `split`; `file` is its normalised name.
    Read { file: String, label: String, split: Split },
    /// Do not read it; report it.
    Reject { file: String, reason: String },
    /// Do not read it; do not report it (folders, clutter).
    Skip,
}

/// The decision for every entry, in entry order, and the class folders found (including ones
/// whose files were all rejected, so an empty class can be reported).
#[derive(Debug)]
pub(super) struct Plan {
    pub actions: Vec<Action>,
    pub classes: BTreeSet<String>,
}

/// A name after normalisation.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// Normal components, `.` and empty ones removed, `\` read as `/`.
    Path(Vec<String>),
    /// Clutter to skip silently.
    Junk,
    /// A name that must never be used; the text says why.
    Unsafe(&'static str),
}

fn parse(name: &str) -> Parsed {
    if name.chars().any(char::is_control) {
        return Parsed::Unsafe("file name contains control characters");
    }
    let name = name.replace('\\', "/");
    if name.starts_with('/') {
        return Parsed::Unsafe("absolute path");
    }
    let components: Vec<&str> = name.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    if components.first().is_some_and(|c| is_drive(c)) {
        return Parsed::Unsafe("absolute path");
    }
    if components.contains(&"..") {
        return Parsed::Unsafe("path contains '..'");
    }
    if components.iter().any(|c| is_clutter(c)) {
        return Parsed::Junk;
    }
    Parsed::Path(components.into_iter().map(str::to_string).collect())
}

/// Whether a file or folder name is operating-system clutter, skipped silently wherever images
/// are gathered from folders: `__MACOSX`, names starting with a dot (`.DS_Store`, `._photo.jpg`,
/// `.git`), `Thumbs.db` and `desktop.ini`.
pub fn is_clutter(name: &str) -> bool {
    name.starts_with('.') || name == "__MACOSX" || name.eq_ignore_ascii_case("thumbs.db") || name.eq_ignore_ascii_case("desktop.ini")
}

/// `C:` and the like: a Windows drive.
fn is_drive(component: &str) -> bool {
    let b = component.as_bytes();
    b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':'
}

/// A name as shown in a rejection: at most [`MAX_SHOWN_CHARS`] characters, control characters
/// written as escapes (`\u{0}`), so that every database can store it.
pub(super) fn shown(name: &str) -> String {
    let (kept, cut) = match name.char_indices().nth(MAX_SHOWN_CHARS) {
        Some((cut, _)) => (&name[..cut], true),
        None => (name, false),
    };
    let mut out: String = kept.chars().map(|c| if c.is_control() { c.escape_unicode().to_string() } else { c.to_string() }).collect();
    if cut {
        out.push('…');
    }
    out
}

/// Why `name` cannot be a file's name in a dataset (too long, or with control characters), if
/// it cannot; for names that come whole rather than from an archive's paths (Parquet's `path`).
pub(super) fn unfit_file_name(name: &str) -> Option<String> {
    if name.len() > MAX_NAME_BYTES {
        Some(format!("file name is longer than {MAX_NAME_BYTES} bytes"))
    } else if name.chars().any(char::is_control) {
        Some("file name contains control characters".into())
    } else {
        None
    }
}

/// Why `class` cannot be a class name, if it cannot: empty or blank, over [`MAX_NAME_BYTES`], or
/// with control characters (a Parquet label or an archive's class folder).
pub(super) fn unfit_class_name(class: &str) -> Option<String> {
    if class.trim().is_empty() {
        Some("the class name is empty".into())
    } else if class.len() > MAX_NAME_BYTES {
        Some(format!("the class name is longer than {MAX_NAME_BYTES} bytes"))
    } else if class.chars().any(char::is_control) {
        Some(format!("the class name '{}' contains control characters", shown(class)))
    } else {
        None
    }
}

/// `<class>/<image>` or `<split>/<class>/<image>`.
fn fits(c: &[String]) -> bool {
    c.len() == 2 || is_split_path(c)
}

fn is_split_path(c: &[String]) -> bool {
    c.len() == 3 && Split::from_name(&c[0]).is_some()
}

/// Whether every file sits in one wrapping folder that is better stripped: stripping must make
/// more files fit the layout than keeping it (so `train/cat/1.jpg` keeps `train` as a split, and a
/// single class `cat/1.jpg` is not mistaken for a wrapper).
fn has_wrapper(files: &[(usize, Vec<String>)]) -> bool {
    let Some((_, first)) = files.first() else { return false };
    let wrapper = &first[0];
    if !files.iter().all(|(_, c)| c.len() >= 2 && &c[0] == wrapper) {
        return false;
    }
    let kept = files.iter().filter(|(_, c)| fits(c)).count();
    let stripped = files.iter().filter(|(_, c)| fits(&c[1..])).count();
    stripped > kept
}

/// The split and class of a file at `rel` (below any wrapper), or why it has none.
fn place(rel: &[String], split_mode: bool) -> Result<(Split, &str), &'static str> {
    match (split_mode, rel) {
        (true, [split, class, _]) => match Split::from_name(split) {
            Some(split) => Ok((split, class)),
            None => Err("not under a split folder (expected <split>/<class>/<image>)"),
        },
        (true, [_, _]) => Err("outside the split folders (the upload has train/validation/test folders, so \
                               images must be at <split>/<class>/<image>)"),
        (true, [_]) => Err("not inside a split and class folder (expected <split>/<class>/<image>)"),
        (true, _) => Err("at the wrong depth (expected <split>/<class>/<image>)"),
        (false, [class, _]) => Ok((Split::Train, class)),
        (false, [_]) => Err("not inside a class folder (expected <class>/<image>)"),
        (false, _) => Err("nested too deeply (expected <class>/<image>)"),
    }
}

/// Decides what to do with every entry.
pub(super) fn plan(entries: &[Entry]) -> Plan {
    let mut actions = vec![Action::Skip; entries.len()];
    let mut files: Vec<(usize, Vec<String>)> = Vec::new();
    let mut dirs: Vec<Vec<String>> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();

    for (i, entry) in entries.iter().enumerate() {
        let reject = |reason: &str| Action::Reject { file: shown(&entry.name), reason: reason.to_string() };
        if !entry.utf8 {
            actions[i] = reject("file name is not valid UTF-8");
            continue;
        }
        if entry.name.len() > MAX_NAME_BYTES {
            actions[i] = reject(&format!("file name is longer than {MAX_NAME_BYTES} bytes"));
            continue;
        }
        let components = match parse(&entry.name) {
            Parsed::Unsafe(reason) => {
                actions[i] = reject(reason);
                continue;
            }
            Parsed::Junk => continue,
            Parsed::Path(c) if c.is_empty() => continue,
            Parsed::Path(c) => c,
        };
        actions[i] = match &entry.kind {
            Kind::Dir => {
                dirs.push(components);
                Action::Skip
            }
            Kind::File if seen.insert(components.join("/")) => {
                files.push((i, components));
                Action::Skip
            }
            Kind::File => reject("duplicate name: an earlier entry with the same path was used"),
            Kind::Symlink => reject("symbolic link (links are never followed)"),
            Kind::HardLink => reject("hard link (links are never followed)"),
            Kind::Unsupported(what) => reject(&format!("not a regular file ({what})")),
        };
    }

    let strip = usize::from(has_wrapper(&files));
    let wrapper = files.first().map(|(_, c)| c[0].clone());
    let split_mode = files.iter().any(|(_, c)| is_split_path(&c[strip..]));
    let mut classes = BTreeSet::new();

    for (i, c) in files {
        let file = c.join("/");
        actions[i] = match place(&c[strip..], split_mode) {
            Ok((split, class)) => match unfit_class_name(class) {
                Some(reason) => Action::Reject { file, reason },
                None => {
                    classes.insert(class.to_string());
                    Action::Read { file, label: class.to_string(), split }
                }
            },
            Err(reason) => Action::Reject { file, reason: reason.to_string() },
        };
    }

    // Class folders that exist only as folder entries: their class has no image, which the caller
    // reports instead of silently dropping the class.
    for c in dirs {
        if strip == 1 && wrapper.as_ref() != Some(&c[0]) {
            continue;
        }
        match (split_mode, &c[strip..]) {
            (_, [.., class]) if unfit_class_name(class).is_some() => {}
            (false, [class]) => {
                classes.insert(class.clone());
            }
            (true, [split, class]) if Split::from_name(split).is_some() => {
                classes.insert(class.clone());
            }
            _ => {}
        }
    }
    Plan { actions, classes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(file: &str, label: &str, split: Split) -> Action {
        Action::Read { file: file.into(), label: label.into(), split }
    }

    fn plan_of(names: &[&str]) -> Plan {
        plan(&names.iter().map(|n| Entry::file(n)).collect::<Vec<_>>())
    }

    fn reason(action: &Action) -> &str {
        match action {
            Action::Reject { reason, .. } => reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn flat_class_folders() {
        let p = plan_of(&["cat/1.jpg", "dog/2.png", "./dog//3.png"]);
        assert_eq!(
            p.actions,
            vec![
                read("cat/1.jpg", "cat", Split::Train),
                read("dog/2.png", "dog", Split::Train),
                read("dog/3.png", "dog", Split::Train)
            ]
        );
        assert_eq!(p.classes, BTreeSet::from(["cat".into(), "dog".into()]));
    }

    #[test]
    fn one_wrapping_folder_is_stripped() {
        let p = plan_of(&["pets/cat/1.jpg", "pets/dog/2.jpg", "pets/README.md"]);
        assert_eq!(p.actions[0], read("pets/cat/1.jpg", "cat", Split::Train));
        assert_eq!(p.actions[1], read("pets/dog/2.jpg", "dog", Split::Train));
        assert!(reason(&p.actions[2]).contains("not inside a class folder"));
    }

    #[test]
    fn a_single_class_is_not_mistaken_for_a_wrapper() {
        let p = plan_of(&["cat/1.jpg", "cat/2.jpg"]);
        assert_eq!(p.actions[0], read("cat/1.jpg", "cat", Split::Train));
        assert_eq!(p.classes, BTreeSet::from(["cat".into()]));
    }

    #[test]
    fn split_folders_with_val_alias() {
        let p = plan_of(&["train/cat/1.jpg", "val/dog/2.jpg", "validation/cat/3.jpg", "test/dog/4.jpg"]);
        assert_eq!(
            p.actions,
            vec![
                read("train/cat/1.jpg", "cat", Split::Train),
                read("val/dog/2.jpg", "dog", Split::Validation),
                read("validation/cat/3.jpg", "cat", Split::Validation),
                read("test/dog/4.jpg", "dog", Split::Test),
            ]
        );
    }

    #[test]
    fn a_train_folder_alone_is_a_split_not_a_wrapper() {
        let p = plan_of(&["train/cat/1.jpg", "train/dog/2.jpg"]);
        assert_eq!(p.actions[0], read("train/cat/1.jpg", "cat", Split::Train));
        assert_eq!(p.actions[1], read("train/dog/2.jpg", "dog", Split::Train));
    }

    #[test]
    fn wrapper_around_split_folders() {
        let p = plan_of(&["mydata/train/cat/1.jpg", "mydata/test/dog/2.jpg", "mydata/train/dog/3.jpg"]);
        assert_eq!(p.actions[0], read("mydata/train/cat/1.jpg", "cat", Split::Train));
        assert_eq!(p.actions[1], read("mydata/test/dog/2.jpg", "dog", Split::Test));
        assert_eq!(p.actions[2], read("mydata/train/dog/3.jpg", "dog", Split::Train));
    }

    #[test]
    fn two_wrapping_folders_are_not_tolerated() {
        let p = plan_of(&["a/b/cat/1.jpg", "a/b/dog/2.jpg"]);
        assert!(p.actions.iter().all(|a| reason(a).contains("nested too deeply")), "{:?}", p.actions);
    }

    #[test]
    fn files_at_the_wrong_depth_are_rejected_with_a_reason() {
        let p = plan_of(&["train/cat/1.jpg", "train/dog/2.jpg", "cat/3.jpg", "top.jpg", "train/cat/x/4.jpg"]);
        assert!(reason(&p.actions[2]).contains("outside the split folders"));
        assert!(reason(&p.actions[3]).contains("not inside a split and class folder"));
        assert!(reason(&p.actions[4]).contains("wrong depth"));
        let p = plan_of(&["cat/1.jpg", "dog/2.jpg", "top.jpg", "cat/sub/3.jpg"]);
        assert!(reason(&p.actions[2]).contains("not inside a class folder"));
        assert!(reason(&p.actions[3]).contains("nested too deeply"));
    }

    #[test]
    fn clutter_is_skipped_silently() {
        let p = plan_of(&[
            "__MACOSX/cat/._1.jpg",
            "cat/.DS_Store",
            "cat/._1.jpg",
            ".hidden/x.jpg",
            "dog/Thumbs.db",
            "cat/1.jpg",
            "dog/desktop.ini",
        ]);
        let skipped = p.actions.iter().filter(|a| **a == Action::Skip).count();
        assert_eq!(skipped, 6, "{:?}", p.actions);
        assert_eq!(p.actions[5], read("cat/1.jpg", "cat", Split::Train));
    }

    #[test]
    fn unsafe_names_are_rejected_not_normalised() {
        let p = plan_of(&[
            "../x.png",
            "/etc/passwd",
            "cat/../../x.png",
            "C:\\x\\y.png",
            "..\\x.png",
            "cat/a\u{0}b.png",
            "cat/ok.png",
        ]);
        assert_eq!(reason(&p.actions[0]), "path contains '..'");
        assert_eq!(reason(&p.actions[1]), "absolute path");
        assert_eq!(reason(&p.actions[2]), "path contains '..'");
        assert_eq!(reason(&p.actions[3]), "absolute path");
        assert_eq!(reason(&p.actions[4]), "path contains '..'");
        assert!(reason(&p.actions[5]).contains("control characters"));
        assert_eq!(p.actions[6], read("cat/ok.png", "cat", Split::Train));
    }

    #[test]
    fn links_devices_and_bad_names_are_rejected() {
        let mut entries = vec![
            Entry { kind: Kind::Symlink, ..Entry::file("cat/link.png") },
            Entry { kind: Kind::HardLink, ..Entry::file("cat/hard.png") },
            Entry { kind: Kind::Unsupported("block device"), ..Entry::file("cat/dev") },
            Entry::new(b"cat/\xff.png", Kind::File, 1),
            Entry::file(&format!("cat/{}.png", "x".repeat(2000))),
        ];
        entries.push(Entry::file("cat/1.png"));
        let p = plan(&entries);
        assert!(reason(&p.actions[0]).contains("symbolic link"));
        assert!(reason(&p.actions[1]).contains("hard link"));
        assert!(reason(&p.actions[2]).contains("block device"));
        assert!(reason(&p.actions[3]).contains("UTF-8"));
        assert!(reason(&p.actions[4]).contains("longer than"));
        assert!(entries[4].name.len() <= MAX_NAME_BYTES + 1, "long names are cut when read");
        match &p.actions[4] {
            Action::Reject { file, .. } => assert!(file.chars().count() <= MAX_SHOWN_CHARS + 1),
            other => panic!("{other:?}"),
        }
        // A symlink does not make its folder a wrapper or a class by itself.
        assert_eq!(p.actions[5], read("cat/1.png", "cat", Split::Train));
    }

    #[test]
    fn duplicate_names_keep_the_first() {
        let p = plan_of(&["cat/1.jpg", "dog/1.jpg", "cat/1.jpg", "./cat/1.jpg"]);
        assert_eq!(p.actions[0], read("cat/1.jpg", "cat", Split::Train));
        assert!(reason(&p.actions[2]).contains("duplicate"));
        assert!(reason(&p.actions[3]).contains("duplicate"));
    }

    #[test]
    fn empty_class_folders_are_classes() {
        let mut entries: Vec<Entry> = ["pets/", "pets/cat/", "pets/bird/", "pets/cat/1.jpg", "pets/dog/2.jpg"]
            .iter()
            .map(|n| Entry::file(n))
            .collect();
        for e in entries.iter_mut().take(3) {
            e.kind = Kind::Dir;
        }
        let p = plan(&entries);
        assert_eq!(p.classes, BTreeSet::from(["bird".into(), "cat".into(), "dog".into()]));
        // With split folders, the split folders themselves are not classes.
        let mut entries: Vec<Entry> = ["train/", "train/cat/", "test/", "train/cat/1.jpg", "test/dog/2.jpg"]
            .iter()
            .map(|n| Entry::file(n))
            .collect();
        for e in entries.iter_mut().take(3) {
            e.kind = Kind::Dir;
        }
        let p = plan(&entries);
        assert_eq!(p.classes, BTreeSet::from(["cat".into(), "dog".into()]));
    }

    #[test]
    fn a_blank_class_folder_is_no_class() {
        let mut entries: Vec<Entry> = [" /1.jpg", "cat/2.jpg", "  /"].iter().map(|n| Entry::file(n)).collect();
        entries[2].kind = Kind::Dir;
        let p = plan(&entries);
        assert_eq!(reason(&p.actions[0]), "the class name is empty");
        assert_eq!(p.actions[1], read("cat/2.jpg", "cat", Split::Train));
        assert_eq!(p.classes, BTreeSet::from(["cat".into()]), "neither the blank folder with an image nor the empty one");
        let p = plan_of(&["train/ /3.jpg", "train/cat/4.jpg"]);
        assert_eq!(reason(&p.actions[0]), "the class name is empty");
        assert_eq!(p.classes, BTreeSet::from(["cat".into()]));
    }
}
