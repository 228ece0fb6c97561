//! Corrected and extended copies of a dataset: its images with some relabelled, removed or moved
//! to another split, or with the images of an upload added, stored as a new dataset beside the
//! old one.
//!
//! A dataset is never changed in place: jobs and models name the dataset they were trained on,
//! and what they report (its counts, its validation images, the mistakes of a job) must stay
//! true of it. A copy references the same blobs (no image is stored twice) and gets its own
//! reports of repeated files and look-alikes, worked out again for the images it keeps.
//!
//! An image is named by its blob, as the dataset's listing and a job's mistakes name it. Where
//! one picture was uploaded under several names (its files share a blob), an edit changes all of
//! them: relabelling such a picture is how a copy under two contradicting classes is resolved.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::layout::{shown, unfit_class_name};
use super::{ImageRecord, Ingested, MAX_REJECTED_LISTED, Rejected, Split};

/// Changes to a dataset's images, each image named by its blob.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edits {
    /// The new label of each of these images (a new class name makes a new class).
    pub relabel: BTreeMap<String, String>,
    /// Images left out of the copy.
    pub remove: BTreeSet<String>,
    /// The split each of these images moves to.
    pub moves: BTreeMap<String, Split>,
}

/// Where a copy came from and how many of its files changed or were added, as its dataset's
/// record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The dataset it is a copy of (which may since have been deleted).
    pub dataset_id: String,
    /// Files whose label changed.
    pub relabelled: u64,
    /// Files left out.
    pub removed: u64,
    /// Files moved to another split.
    pub moved: u64,
    /// Files added from an upload ([`extend`]); absent from the records of copies made before
    /// images could be added.
    #[serde(default)]
    pub added: u64,
}

/// Why a copy cannot be made: each names the problem, and nothing is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    /// An edit names a blob that no image of the dataset has.
    #[error("{field} names image '{blob}', which this dataset does not have (an image is named by its blob, as the dataset's image listing gives it)")]
    UnknownImage { field: &'static str, blob: String },
    /// An image both removed and relabelled or moved.
    #[error("image '{blob}' is both removed and {other}; say one or the other")]
    RemovedAndChanged { blob: String, other: &'static str },
    /// A new label that cannot be a class name.
    #[error("relabel of image '{blob}': {reason}")]
    UnfitLabel { blob: String, reason: String },
    /// Every image removed.
    #[error("the copy would have no image left")]
    NoImages,
    /// One class left.
    #[error("the copy would have a single class ('{0}'); a classifier needs at least 2")]
    TooFewClasses(String),
    /// An upload to add whose every image the dataset already has.
    #[error("every image of the upload ({0} file(s)) is already in the dataset under the same class; nothing would be added")]
    NothingNew(u64),
}

/// The images of a copy of `images` (a dataset's, in upload order) with `edits` applied, in the
/// same order, and how many files each kind of edit changed. Every blob an edit names must be an
/// image of the dataset; the copy's classes are the labels its images have (a class all of
/// whose images were relabelled or removed is gone), at least two.
pub fn apply(images: Vec<ImageRecord>, edits: &Edits, dataset_id: &str) -> Result<(Ingested, Source), EditError> {
    check(&images, edits)?;
    let mut source = Source { dataset_id: dataset_id.to_string(), relabelled: 0, removed: 0, moved: 0, added: 0 };
    let mut kept = Vec::with_capacity(images.len());
    for mut image in images {
        if edits.remove.contains(&image.blob) {
            source.removed += 1;
            continue;
        }
        if let Some(label) = edits.relabel.get(&image.blob).filter(|l| **l != image.label) {
            image.label = label.clone();
            source.relabelled += 1;
        }
        if let Some(&split) = edits.moves.get(&image.blob).filter(|s| **s != image.split) {
            image.split = split;
            source.moved += 1;
        }
        kept.push(image);
    }
    Ok((with_classes(kept, Vec::new(), 0)?, source))
}

/// The images of `images` (a dataset's, in upload order) followed by those of `added` (an upload
/// to add to it), and how many files were added. A file of the upload that the dataset already
/// has under the same class is not added again, whatever its split (the same picture in two
/// splits would leak held-out images into training; moving one is a copy's edit): it is listed
/// among the copy's rejected files, which are the upload's, naming the dataset's file. One under
/// another class is added, and reported as a file under two classes. The copy's classes are
/// those of both; a new class name in the upload makes a new class.
pub fn extend(images: Vec<ImageRecord>, added: Ingested, dataset_id: &str) -> Result<(Ingested, Source), EditError> {
    let mut rejected = added.rejected;
    let mut rejected_total = added.rejected_total;
    let mut new = Vec::with_capacity(added.images.len());
    {
        let mut have: HashMap<(&str, &str), &ImageRecord> = HashMap::with_capacity(images.len());
        for image in &images {
            have.entry((&image.blob, &image.label)).or_insert(image);
        }
        for image in added.images {
            match have.get(&(image.blob.as_str(), image.label.as_str())) {
                Some(had) => {
                    rejected_total += 1;
                    if rejected.len() < MAX_REJECTED_LISTED {
                        let reason = format!("already in the dataset as '{}' (class '{}', split {})", shown(&had.file), shown(&had.label), had.split);
                        rejected.push(Rejected { file: image.file, reason });
                    }
                }
                None => new.push(image),
            }
        }
    }
    if new.is_empty() {
        return Err(EditError::NothingNew(rejected_total - added.rejected_total));
    }
    let source = Source { dataset_id: dataset_id.to_string(), relabelled: 0, removed: 0, moved: 0, added: new.len() as u64 };
    let mut all = images;
    all.extend(new);
    Ok((with_classes(all, rejected, rejected_total)?, source))
}

/// A copy of `images` and `rejected` files, its classes the labels its images have: at least two.
fn with_classes(images: Vec<ImageRecord>, rejected: Vec<Rejected>, rejected_total: u64) -> Result<Ingested, EditError> {
    let classes: BTreeSet<&str> = images.iter().map(|i| i.label.as_str()).collect();
    match classes.len() {
        0 => return Err(EditError::NoImages),
        1 => return Err(EditError::TooFewClasses(shown(classes.first().expect("one class")))),
        _ => {}
    }
    let classes = classes.into_iter().map(str::to_string).collect();
    Ok(Ingested { images, rejected, rejected_total, classes })
}

/// Refuses edits that name an image the dataset lacks, remove an image they also change, or give
/// a label that cannot be a class name.
fn check(images: &[ImageRecord], edits: &Edits) -> Result<(), EditError> {
    let blobs: HashSet<&str> = images.iter().map(|i| i.blob.as_str()).collect();
    let named = edits.relabel.keys().map(|b| ("relabel", b)).chain(edits.remove.iter().map(|b| ("remove", b))).chain(edits.moves.keys().map(|b| ("move", b)));
    for (field, blob) in named {
        if !blobs.contains(blob.as_str()) {
            return Err(EditError::UnknownImage { field, blob: shown(blob) });
        }
    }
    for blob in &edits.remove {
        let other = if edits.relabel.contains_key(blob) {
            "relabelled"
        } else if edits.moves.contains_key(blob) {
            "moved"
        } else {
            continue;
        };
        return Err(EditError::RemovedAndChanged { blob: shown(blob), other });
    }
    for (blob, label) in &edits.relabel {
        if let Some(reason) = unfit_class_name(label) {
            return Err(EditError::UnfitLabel { blob: shown(blob), reason });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(blob: &str, file: &str, label: &str, split: Split) -> ImageRecord {
        ImageRecord { file: file.into(), label: label.into(), split, blob: blob.into(), look: None }
    }

    /// cat: a, b (also as b2.jpg under dog), c; dog: d, e (test).
    fn images() -> Vec<ImageRecord> {
        vec![
            image("a", "cat/a.jpg", "cat", Split::Train),
            image("b", "cat/b.jpg", "cat", Split::Train),
            image("b", "dog/b2.jpg", "dog", Split::Train),
            image("c", "cat/c.jpg", "cat", Split::Validation),
            image("d", "dog/d.jpg", "dog", Split::Train),
            image("e", "test/dog/e.jpg", "dog", Split::Test),
        ]
    }

    fn relabel(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(b, l)| (b.to_string(), l.to_string())).collect()
    }

    #[test]
    fn edits_relabel_remove_and_move_every_file_of_a_blob_and_keep_the_order() {
        let edits = Edits {
            relabel: relabel(&[("b", "dog"), ("d", "dog"), ("e", "bird")]),
            remove: BTreeSet::from(["a".to_string()]),
            moves: BTreeMap::from([("c".to_string(), Split::Train), ("d".to_string(), Split::Test)]),
        };
        let (copy, source) = apply(images(), &edits, "src").unwrap();
        let rows: Vec<(&str, &str, &str, Split)> = copy.images.iter().map(|i| (i.blob.as_str(), i.file.as_str(), i.label.as_str(), i.split)).collect();
        assert_eq!(
            rows,
            [
                ("b", "cat/b.jpg", "dog", Split::Train),
                ("b", "dog/b2.jpg", "dog", Split::Train),
                ("c", "cat/c.jpg", "cat", Split::Train),
                ("d", "dog/d.jpg", "dog", Split::Test),
                ("e", "test/dog/e.jpg", "bird", Split::Test),
            ]
        );
        assert_eq!(copy.classes, ["bird", "cat", "dog"], "a new label is a new class");
        // b's dog file and d kept their label: only real changes count.
        assert_eq!(source, Source { dataset_id: "src".into(), relabelled: 2, removed: 1, moved: 2, added: 0 });
        assert_eq!((copy.rejected.len(), copy.rejected_total), (0, 0));
        assert_eq!(copy.counts().train, BTreeMap::from([("bird".into(), 0), ("cat".into(), 1), ("dog".into(), 2)]));
    }

    #[test]
    fn no_edits_copy_every_image_and_a_class_emptied_by_edits_is_gone() {
        let (copy, source) = apply(images(), &Edits::default(), "src").unwrap();
        assert_eq!(copy.images, images());
        assert_eq!((source.relabelled, source.removed, source.moved), (0, 0, 0));
        assert_eq!(copy.classes, ["cat", "dog"]);

        let edits = Edits { relabel: relabel(&[("a", "kitten"), ("b", "kitten"), ("c", "kitten")]), ..Edits::default() };
        let (copy, _) = apply(images(), &edits, "src").unwrap();
        assert_eq!(copy.classes, ["dog", "kitten"]);
    }

    fn upload(images: Vec<ImageRecord>, rejected: &[&str]) -> Ingested {
        let classes = images.iter().map(|i| i.label.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        let rejected: Vec<Rejected> = rejected.iter().map(|f| Rejected { file: f.to_string(), reason: "not an image".into() }).collect();
        Ingested { rejected_total: rejected.len() as u64, images, rejected, classes }
    }

    #[test]
    fn an_extension_adds_what_the_dataset_lacks_after_its_images() {
        let added = upload(
            vec![
                image("f", "cat/f.jpg", "cat", Split::Train),
                // The dataset has a as a training cat and c as a validation cat: not added again,
                // in any split.
                image("a", "cat/a-again.jpg", "cat", Split::Train),
                image("c", "train/cat/c.jpg", "cat", Split::Train),
                // c under another class: added (and reported as a file under two classes).
                image("c", "bird/c.jpg", "bird", Split::Train),
            ],
            &["notes.txt"],
        );
        let (copy, source) = extend(images(), added, "src").unwrap();
        let blobs: Vec<(&str, &str)> = copy.images.iter().map(|i| (i.blob.as_str(), i.file.as_str())).collect();
        assert_eq!(blobs[..6], images().iter().map(|i| (i.blob.as_str(), i.file.as_str())).collect::<Vec<_>>()[..], "the dataset's images first, in order");
        assert_eq!(blobs[6..], [("f", "cat/f.jpg"), ("c", "bird/c.jpg")]);
        assert_eq!(copy.classes, ["bird", "cat", "dog"]);
        assert_eq!(source, Source { dataset_id: "src".into(), relabelled: 0, removed: 0, moved: 0, added: 2 });
        assert_eq!(copy.rejected_total, 3);
        let rejected: Vec<(&str, &str)> = copy.rejected.iter().map(|r| (r.file.as_str(), r.reason.as_str())).collect();
        assert_eq!(
            rejected,
            [
                ("notes.txt", "not an image"),
                ("cat/a-again.jpg", "already in the dataset as 'cat/a.jpg' (class 'cat', split train)"),
                ("train/cat/c.jpg", "already in the dataset as 'cat/c.jpg' (class 'cat', split validation)"),
            ]
        );

        // Nothing new is refused, saying how many files were there already.
        let again = upload(vec![image("a", "x.jpg", "cat", Split::Train), image("e", "y.jpg", "dog", Split::Test)], &["z.txt"]);
        assert_eq!(extend(images(), again, "src").unwrap_err(), EditError::NothingNew(2));
    }

    #[test]
    fn a_source_stored_before_additions_reads_as_none_added() {
        let old: Source = serde_json::from_str(r#"{"dataset_id":"d","relabelled":1,"removed":2,"moved":3}"#).unwrap();
        assert_eq!(old, Source { dataset_id: "d".into(), relabelled: 1, removed: 2, moved: 3, added: 0 });
    }

    #[test]
    fn edits_naming_other_images_or_unfit_labels_or_leaving_one_class_are_refused() {
        let unknown = Edits { moves: BTreeMap::from([("zz".to_string(), Split::Test)]), ..Edits::default() };
        let err = apply(images(), &unknown, "src").unwrap_err();
        assert_eq!(err, EditError::UnknownImage { field: "move", blob: "zz".into() });
        assert!(err.to_string().starts_with("move names image 'zz', which this dataset does not have"), "{err}");
        // A long name is shown cut.
        let long = "x".repeat(5000);
        let err = apply(images(), &Edits { remove: BTreeSet::from([long]), ..Edits::default() }, "src").unwrap_err();
        assert!(err.to_string().len() < 600, "{err}");

        let both = Edits { relabel: relabel(&[("a", "dog")]), remove: BTreeSet::from(["a".to_string()]), ..Edits::default() };
        assert_eq!(apply(images(), &both, "src").unwrap_err(), EditError::RemovedAndChanged { blob: "a".into(), other: "relabelled" });
        let both = Edits { moves: BTreeMap::from([("a".to_string(), Split::Test)]), remove: BTreeSet::from(["a".to_string()]), ..Edits::default() };
        assert_eq!(apply(images(), &both, "src").unwrap_err(), EditError::RemovedAndChanged { blob: "a".into(), other: "moved" });

        for label in ["", "  ", "a\u{7}b"] {
            let err = apply(images(), &Edits { relabel: relabel(&[("a", label)]), ..Edits::default() }, "src").unwrap_err();
            assert!(matches!(err, EditError::UnfitLabel { ref blob, .. } if blob == "a"), "{label:?}: {err:?}");
        }

        let one_class = Edits { relabel: relabel(&[("b", "cat"), ("d", "cat"), ("e", "cat")]), ..Edits::default() };
        assert_eq!(apply(images(), &one_class, "src").unwrap_err(), EditError::TooFewClasses("cat".into()));
        let all = Edits { remove: ["a", "b", "c", "d", "e"].map(String::from).into(), ..Edits::default() };
        assert_eq!(apply(images(), &all, "src").unwrap_err(), EditError::NoImages);
    }
}
