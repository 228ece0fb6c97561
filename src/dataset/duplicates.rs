//! Images of a dataset that are the same file: byte for byte, by their SHA-256 (their blob).
//!
//! Real image sets repeat files: a folder merged twice, a photo filed under two classes, the same
//! picture in `train/` and in `test/`. None of these stops a fine-tune, and none is refused, but
//! each misleads in its own way: a file under two classes contradicts itself, and a held-out
//! image that is also a training image makes that split's figures look better than they are.
//! The summary here says how many there are and which files, so that a user can mend the
//! upload; the trainer keeps the copies of a file together when it holds out its own validation
//! images (`TrainData::ensure_validation`).

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::Split;

/// Most groups of copies listed; the rest are only counted.
pub const MAX_GROUPS_LISTED: usize = 100;
/// Most files listed in one group (a placeholder image repeated thousands of times is one
/// group); `count` says how many it has.
pub const MAX_FILES_LISTED: usize = 10;

/// What a dataset repeats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Duplicates {
    /// Images that repeat an earlier image of the dataset (a file there three times counts 2).
    pub copies: u64,
    /// Files found under two or more classes.
    pub across_classes: u64,
    /// Files found in two or more splits.
    pub across_splits: u64,
    /// The first [`MAX_GROUPS_LISTED`] groups of copies: those across classes first, then those
    /// across splits, then the rest, each kind in upload order.
    pub groups: Vec<DuplicateGroup>,
    /// How many groups there are, listed or not.
    pub groups_total: u64,
}

/// The images that are one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateGroup {
    /// How many images of the dataset are this file.
    pub count: u64,
    /// Its classes, sorted.
    pub classes: Vec<String>,
    /// Its splits, in the order train, validation, test.
    pub splits: Vec<Split>,
    /// The first [`MAX_FILES_LISTED`] of its images, in upload order.
    pub files: Vec<DuplicateFile>,
}

/// One image of a group: its name in the upload, its class and split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateFile {
    pub file: String,
    pub label: String,
    pub split: Split,
}

/// The fields of a dataset's image that the summary reads.
pub struct ImageRef<'a> {
    pub blob: &'a str,
    pub file: &'a str,
    pub label: &'a str,
    pub split: Split,
}

impl Duplicates {
    /// The summary of a dataset's images, given in upload order.
    pub fn of<'a>(images: impl IntoIterator<Item = ImageRef<'a>>) -> Self {
        struct Group<'a> {
            count: u64,
            classes: BTreeSet<&'a str>,
            splits: BTreeSet<Split>,
            files: Vec<DuplicateFile>,
        }
        let mut order: Vec<&'a str> = Vec::new();
        let mut groups: HashMap<&'a str, Group<'a>> = HashMap::new();
        for image in images {
            let group = groups.entry(image.blob).or_insert_with(|| {
                order.push(image.blob);
                Group { count: 0, classes: BTreeSet::new(), splits: BTreeSet::new(), files: Vec::new() }
            });
            group.count += 1;
            group.classes.insert(image.label);
            group.splits.insert(image.split);
            if group.files.len() < MAX_FILES_LISTED {
                group.files.push(DuplicateFile { file: image.file.to_string(), label: image.label.to_string(), split: image.split });
            }
        }
        let mut summary = Self::default();
        let mut repeated: Vec<(u8, DuplicateGroup)> = Vec::new();
        for blob in order {
            let group = groups.remove(blob).expect("every blob in the order has its group");
            if group.count < 2 {
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
    /// others: 1 file under two or more classes, 1 in two or more splits".
    pub fn describe(&self) -> Option<String> {
        if self.copies == 0 {
            return None;
        }
        let mut text =
            if self.copies == 1 { "1 image is a copy of another".to_string() } else { format!("{} images are copies of others", self.copies) };
        let mut kinds = Vec::new();
        if self.across_classes > 0 {
            kinds.push(format!("{} {} under two or more classes", self.across_classes, files(self.across_classes)));
        }
        if self.across_splits > 0 {
            kinds.push(format!("{} {} in two or more splits", self.across_splits, files(self.across_splits)));
        }
        if !kinds.is_empty() {
            text.push_str(": ");
            text.push_str(&kinds.join(", "));
        }
        Some(text)
    }
}

fn files(n: u64) -> &'static str {
    if n == 1 { "file" } else { "files" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image<'a>(blob: &'a str, file: &'a str, label: &'a str, split: Split) -> ImageRef<'a> {
        ImageRef { blob, file, label, split }
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
        assert_eq!(d.groups[2].files[2], DuplicateFile { file: "cat/1 copy 2.jpg".into(), label: "cat".into(), split: Split::Train });
        assert_eq!(
            d.describe().unwrap(),
            "4 images are copies of others: 1 file under two or more classes, 1 file in two or more splits"
        );
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["groups"][1]["splits"], serde_json::json!(["train", "test"]));
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
}
