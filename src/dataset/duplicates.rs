//! Images of a dataset that are the same file: byte for byte, by their SHA-256 (their blob).
//!
//! Real image sets repeat files: a folder merged twice, a photo filed under two classes, the same
//! picture in `train/` and in `test/`. None of these stops a fine-tune, and none is refused, but
//! each misleads in its own way: a file under two classes contradicts itself, and a held-out
//! image that is also a training image makes that split's figures look better than they are.
//! The summary here says how many there are and which files, so that a user can mend the
//! upload; the trainer keeps the copies of a file together when it holds out its own validation
//! images (`TrainData::ensure_validation`).

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::Split;
use super::look_alike::{self, Look};

/// Most groups of copies listed; the rest are only counted.
pub const MAX_GROUPS_LISTED: usize = 100;
/// Most files listed in one group (a placeholder image repeated thousands of times is one
/// group); `count` says how many it has.
pub const MAX_FILES_LISTED: usize = 10;

/// What a dataset repeats: the same file ([`Duplicates::of`]), or pictures that look the same
/// ([`Duplicates::look_alikes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Duplicates {
    /// Images that repeat an earlier image of their group (a file there three times counts 2).
    pub copies: u64,
    /// Groups found under two or more classes.
    pub across_classes: u64,
    /// Groups found in two or more splits.
    pub across_splits: u64,
    /// The first [`MAX_GROUPS_LISTED`] groups of copies: those across classes first, then those
    /// across splits, then the rest, each kind in upload order.
    pub groups: Vec<DuplicateGroup>,
    /// How many groups there are, listed or not.
    pub groups_total: u64,
}

/// The images that are one file, or that look alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateGroup {
    /// How many images of the dataset are in the group.
    pub count: u64,
    /// Its classes, sorted.
    pub classes: Vec<String>,
    /// Its splits, in the order train, validation, test.
    pub splits: Vec<Split>,
    /// The first [`MAX_FILES_LISTED`] of its images, in upload order.
    pub files: Vec<DuplicateFile>,
}

/// One image of a group: its name in the upload, its class and split, and its blob (whose
/// thumbnail the console shows, so that a group can be judged by eye).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateFile {
    pub file: String,
    pub label: String,
    pub split: Split,
    /// Empty in a report stored by a version before it was listed (a migration clears those
    /// reports, so they are worked out again).
    #[serde(default)]
    pub blob: String,
}

/// The fields of a dataset's image that the summary reads.
#[derive(Debug, Clone, Copy)]
pub struct ImageRef<'a> {
    pub blob: &'a str,
    pub file: &'a str,
    pub label: &'a str,
    pub split: Split,
    /// Its look-alike fingerprint ([`super::look_alike::fingerprint`]); `None` for an image
    /// stored before they were taken.
    pub look: Option<Look>,
}

impl Duplicates {
    /// The summary of a dataset's images, given in upload order: groups of the same file.
    pub fn of<'a>(images: impl IntoIterator<Item = ImageRef<'a>>) -> Self {
        let images: Vec<ImageRef<'a>> = images.into_iter().collect();
        let mut number: HashMap<&str, usize> = HashMap::new();
        let keys: Vec<usize> = images
            .iter()
            .map(|i| {
                let next = number.len();
                *number.entry(i.blob).or_insert(next)
            })
            .collect();
        Self::grouped(&images, &keys, false)
    }

    /// The same summary of the images that look alike ([`super::look_alike`]) though their
    /// files differ: a group holds two or more different files (and any copies of them). `None`
    /// where an image has no fingerprint (a dataset stored before they were taken).
    pub fn look_alikes<'a>(images: impl IntoIterator<Item = ImageRef<'a>>) -> Option<Self> {
        let images: Vec<ImageRef<'a>> = images.into_iter().collect();
        let prints: Vec<(Look, &str)> = images.iter().map(|i| Some((i.look?, i.label))).collect::<Option<_>>()?;
        Some(Self::grouped(&images, &look_alike::clusters(&prints), true))
    }

    /// The summary of the groups `keys` put the images in (one key per image); with
    /// `different_files`, only groups of two or more different files count.
    fn grouped<'a>(images: &[ImageRef<'a>], keys: &[usize], different_files: bool) -> Self {
        struct Group<'a> {
            count: u64,
            blobs: HashSet<&'a str>,
            classes: BTreeSet<&'a str>,
            splits: BTreeSet<Split>,
            files: Vec<DuplicateFile>,
        }
        let mut order: Vec<usize> = Vec::new();
        let mut groups: HashMap<usize, Group<'a>> = HashMap::new();
        for (image, &key) in images.iter().zip(keys) {
            let group = groups.entry(key).or_insert_with(|| {
                order.push(key);
                Group { count: 0, blobs: HashSet::new(), classes: BTreeSet::new(), splits: BTreeSet::new(), files: Vec::new() }
            });
            group.count += 1;
            group.blobs.insert(image.blob);
            group.classes.insert(image.label);
            group.splits.insert(image.split);
            if group.files.len() < MAX_FILES_LISTED {
                group.files.push(DuplicateFile {
                    file: image.file.to_string(),
                    label: image.label.to_string(),
                    split: image.split,
                    blob: image.blob.to_string(),
                });
            }
        }
        let mut summary = Self::default();
        let mut repeated: Vec<(u8, DuplicateGroup)> = Vec::new();
        for key in order {
            let group = groups.remove(&key).expect("every key in the order has its group");
            if group.count < 2 || (different_files && group.blobs.len() < 2) {
                continue;
            }
            summary.copies += group.count - 1;
            let across_classes = group.classes.len() > 1;
            let across_splits = group.splits.len() > 1;
            summary.across_classes += u64::from(across_classes);
            summary.across_splits += u64::from(across_splits);
            let rank = if across_classes { 0 } else if across_splits { 1 } else { 2 };
            repeated.push((
                rank,
                DuplicateGroup {
                    count: group.count,
                    classes: group.classes.into_iter().map(str::to_string).collect(),
                    splits: group.splits.into_iter().collect(),
                    files: group.files,
                },
            ));
        }
        summary.groups_total = repeated.len() as u64;
        // A stable sort keeps upload order within each kind.
        repeated.sort_by_key(|(rank, _)| *rank);
        summary.groups = repeated.into_iter().take(MAX_GROUPS_LISTED).map(|(_, g)| g).collect();
        summary
    }

    /// The summary in a sentence, or `None` when no image is repeated: "3 images are copies of
    /// others: 1 file under two or more classes, 1 file in two or more splits".
    pub fn describe(&self) -> Option<String> {
        let head = if self.copies == 1 { "1 image is a copy of another".to_string() } else { format!("{} images are copies of others", self.copies) };
        self.sentence(head, ("file", "files"))
    }

    /// The look-alike summary in a sentence, or `None` when no images look alike: "2 images look
    /// like other files (resized, re-encoded, mirrored or turned copies): 1 group under two or more classes".
    pub fn describe_look_alikes(&self) -> Option<String> {
        let head = if self.copies == 1 { "1 image looks like another file".to_string() } else { format!("{} images look like other files", self.copies) };
        self.sentence(format!("{head} (resized, re-encoded, mirrored or turned copies)"), ("group", "groups"))
    }

    fn sentence(&self, mut text: String, (one, many): (&str, &str)) -> Option<String> {
        if self.copies == 0 {
            return None;
        }
        let unit = |n: u64| if n == 1 { one } else { many };
        let mut kinds = Vec::new();
        if self.across_classes > 0 {
            kinds.push(format!("{} {} under two or more classes", self.across_classes, unit(self.across_classes)));
        }
        if self.across_splits > 0 {
            kinds.push(format!("{} {} in two or more splits", self.across_splits, unit(self.across_splits)));
        }
        if !kinds.is_empty() {
            text.push_str(": ");
            text.push_str(&kinds.join(", "));
        }
        Some(text)
    }
}

/// A report as the API shows it: its fields and `summary`, its sentence (`null` when nothing
/// repeats), so that every client (the console, scripts) says it as `vitforge train` does.
#[derive(Serialize)]
struct Described<'a> {
    #[serde(flatten)]
    report: &'a Duplicates,
    summary: Option<String>,
}

/// Serializes a report of repeated files with its [`Duplicates::describe`] sentence.
pub fn serialize_repeats<S: serde::Serializer>(report: &Duplicates, s: S) -> Result<S::Ok, S::Error> {
    Described { report, summary: report.describe() }.serialize(s)
}

/// Serializes a look-alike report (`null` before it is made) with its
/// [`Duplicates::describe_look_alikes`] sentence.
pub fn serialize_look_alikes<S: serde::Serializer>(report: &Option<Duplicates>, s: S) -> Result<S::Ok, S::Error> {
    report.as_ref().map(|report| Described { report, summary: report.describe_look_alikes() }).serialize(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image<'a>(blob: &'a str, file: &'a str, label: &'a str, split: Split) -> ImageRef<'a> {
        ImageRef { blob, file, label, split, look: None }
    }

    #[test]
    fn no_repeated_file_is_no_duplicate() {
        let d = Duplicates::of([image("a", "cat/1.jpg", "cat", Split::Train), image("b", "dog/1.jpg", "dog", Split::Train)]);
        assert_eq!(d, Duplicates::default());
        assert_eq!(d.describe(), None);
    }

    #[test]
    fn copies_are_counted_and_grouped_the_worst_first() {
        let d = Duplicates::of([
            image("same", "cat/1.jpg", "cat", Split::Train),
            image("same", "cat/1 copy.jpg", "cat", Split::Train),
            image("same", "cat/1 copy 2.jpg", "cat", Split::Train),
            image("leak", "train/dog/2.jpg", "dog", Split::Train),
            image("other", "train/dog/3.jpg", "dog", Split::Train),
            image("leak", "test/dog/2.jpg", "dog", Split::Test),
            image("both", "cat/4.jpg", "cat", Split::Train),
            image("both", "dog/4.jpg", "dog", Split::Train),
        ]);
        assert_eq!((d.copies, d.across_classes, d.across_splits, d.groups_total), (4, 1, 1, 3));
        let firsts: Vec<&str> = d.groups.iter().map(|g| g.files[0].file.as_str()).collect();
        assert_eq!(firsts, ["cat/4.jpg", "train/dog/2.jpg", "cat/1.jpg"]);
        assert_eq!(d.groups[0].classes, ["cat", "dog"]);
        assert_eq!(d.groups[1].splits, [Split::Train, Split::Test]);
        assert_eq!(d.groups[2].count, 3);
        assert_eq!(d.groups[2].files[2], DuplicateFile { file: "cat/1 copy 2.jpg".into(), label: "cat".into(), split: Split::Train, blob: "same".into() });
        assert_eq!(
            d.describe().unwrap(),
            "4 images are copies of others: 1 file under two or more classes, 1 file in two or more splits"
        );
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["groups"][1]["splits"], serde_json::json!(["train", "test"]));
        assert_eq!(json["groups"][1]["files"][0]["blob"], "leak");
        // A report stored before files named their blobs still reads.
        let older: DuplicateFile = serde_json::from_str(r#"{"file": "a.jpg", "label": "cat", "split": "train"}"#).unwrap();
        assert_eq!(older.blob, "");
    }

    #[test]
    fn long_lists_are_cut_and_counted() {
        let names: Vec<String> = (0..MAX_GROUPS_LISTED + 5).map(|i| format!("{i}")).collect();
        let mut images = Vec::new();
        for name in &names {
            images.push(image(name, name, "cat", Split::Train));
            images.push(image(name, name, "cat", Split::Train));
        }
        let many: Vec<String> = (0..MAX_FILES_LISTED + 3).map(|i| format!("placeholder-{i}.jpg")).collect();
        images.extend(many.iter().map(|f| image("placeholder", f, "dog", Split::Train)));
        let d = Duplicates::of(images);
        assert_eq!(d.groups_total, MAX_GROUPS_LISTED as u64 + 6);
        assert_eq!(d.groups.len(), MAX_GROUPS_LISTED);
        assert_eq!(d.copies, MAX_GROUPS_LISTED as u64 + 5 + MAX_FILES_LISTED as u64 + 2);
        assert_eq!(d.describe().unwrap(), format!("{} images are copies of others", d.copies));
        let one = Duplicates::of([image("x", "a.jpg", "cat", Split::Train), image("x", "b.jpg", "cat", Split::Validation)]);
        assert_eq!(one.describe().unwrap(), "1 image is a copy of another: 1 file in two or more splits");
        let placeholder = Duplicates::of(many.iter().map(|f| image("placeholder", f, "dog", Split::Train)));
        assert_eq!(placeholder.groups[0].count, MAX_FILES_LISTED as u64 + 3);
        assert_eq!(placeholder.groups[0].files.len(), MAX_FILES_LISTED);
    }

    #[test]
    fn look_alikes_group_different_files_that_look_the_same() {
        let looks = |blob: &'static str, file: &'static str, label: &'static str, split, shape| ImageRef { blob, file, label, split, look: Some(Look::of_shape(shape, 0)) };
        let images = [
            looks("a", "cat/a.jpg", "cat", Split::Train, 0),
            looks("a2", "cat/a-small.jpg", "cat", Split::Train, 0b111),
            looks("b", "train/dog/b.jpg", "dog", Split::Train, u64::MAX),
            looks("b", "train/dog/b copy.jpg", "dog", Split::Train, u64::MAX),
            looks("c", "other/c.jpg", "dog", Split::Train, 0xF0F0_F0F0_F0F0_F0F0),
            looks("b2", "test/dog/b.png", "dog", Split::Test, u64::MAX ^ 1),
        ];
        let similar = Duplicates::look_alikes(images.iter().copied()).unwrap();
        // The copy of b is counted; c, alone, and the same-file pair inside b's group are no group of their own.
        assert_eq!((similar.copies, similar.across_classes, similar.across_splits, similar.groups_total), (3, 0, 1, 2));
        assert_eq!(similar.groups[0].files.iter().map(|f| f.file.as_str()).collect::<Vec<_>>(), ["train/dog/b.jpg", "train/dog/b copy.jpg", "test/dog/b.png"]);
        assert_eq!(similar.groups[1].count, 2);
        assert_eq!(
            similar.describe_look_alikes().unwrap(),
            "3 images look like other files (resized, re-encoded, mirrored or turned copies): 1 group in two or more splits"
        );
        // Same-file copies alone are no look-alike group.
        let same = [looks("a", "x.jpg", "cat", Split::Train, 1), looks("a", "y.jpg", "dog", Split::Train, 1)];
        assert_eq!(Duplicates::look_alikes(same.iter().copied()), Some(Duplicates::default()));
        // An image without a fingerprint: not worked out.
        let old = [ImageRef { look: None, ..images[0] }, images[1]];
        assert_eq!(Duplicates::look_alikes(old.iter().copied()), None);
    }
}
