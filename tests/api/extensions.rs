//! `POST /datasets/{id}/extend`: a copy of a dataset with the images of an upload added; the
//! dataset itself unchanged, the images it already has not added twice, the upload's new blobs
//! removed when it is refused, and every bad request refused with nothing stored.

use serde_json::{Value, json};
use vitforge::dataset::BlobStore;

use crate::copies::{listing, pets};
use crate::fixtures::{self, HfRow, Member, file};
use crate::helpers::{assert_error, json, spawn_app, spawn_app_with};

fn extend_path(dataset: &Value) -> String {
    format!("/datasets/{}/extend", dataset["id"].as_str().unwrap())
}

fn row(f: &str, l: &str, s: &str) -> (String, String, String) {
    (f.to_string(), l.to_string(), s.to_string())
}

#[tokio::test]
async fn an_extension_adds_an_uploads_new_images_to_a_copy_of_the_dataset() {
    let app = spawn_app().await;
    let (source, blobs) = pets(&app).await;
    let id = source["id"].as_str().unwrap();
    let before = listing(&app, id).await;

    // More cats, one class only: 7 is new, 1 is already a training cat, the note is no image.
    let seven = fixtures::jpeg(7);
    let members = vec![file("cat/7.jpg", seven.clone()), file("cat/1.jpg", fixtures::jpeg(1)), file("cat/notes.txt", b"no image".to_vec())];
    let resp = app.post_upload(&extend_path(&source), "more.zip", fixtures::zip(&members), None).await;
    assert_eq!(resp.status(), 201);
    let more = json(resp).await;
    assert_eq!(more["name"], "pets (extended)");
    assert_ne!(more["id"], source["id"]);
    assert_eq!(more["num_images"], 8);
    assert_eq!(more["classes"], json!(["cat", "dog"]));
    assert_eq!(
        more["counts"],
        json!({"train": {"cat": 4, "dog": 2}, "validation": {"cat": 1, "dog": 0}, "test": {"cat": 0, "dog": 1}})
    );
    assert_eq!(more["source"], json!({"dataset_id": id, "relabelled": 0, "removed": 0, "moved": 0, "added": 1}));
    assert_eq!(more["rejected_total"], 2, "{more}");
    let reasons: Vec<(&str, &str)> = more["rejected"].as_array().unwrap().iter().map(|r| (r["file"].as_str().unwrap(), r["reason"].as_str().unwrap())).collect();
    assert_eq!(reasons[1], ("cat/1.jpg", "already in the dataset as 'train/cat/1.jpg' (class 'cat', split train)"));
    assert_eq!(reasons[0].0, "cat/notes.txt");
    // The dataset's images first, then the new one; its reports cover both.
    let more_id = more["id"].as_str().unwrap();
    let mut expected = before.clone();
    expected.push(row("cat/7.jpg", "cat", "train"));
    assert_eq!(listing(&app, more_id).await, expected);
    assert_eq!(more["duplicates"]["across_classes"], 1, "{more}");
    assert!(more["look_alikes"].is_object(), "{more}");
    // The source is untouched, and only the new picture was stored.
    assert_eq!(json(app.get(&format!("/datasets/{id}")).await).await, source);
    assert_eq!(listing(&app, id).await, before);
    assert_eq!(app.blobs().len(), 7);
    assert!(app.blobs().contains(&BlobStore::hash(&seven)));
    assert!(app.scratch_files().is_empty());

    // A new class, in split folders, under a name; the same picture under another class is
    // new, under the same class in another split not.
    let members = vec![
        file("train/bird/8.jpg", fixtures::jpeg(8)),
        file("test/bird/9.jpg", fixtures::jpeg(9)),
        file("test/bird/1.jpg", fixtures::jpeg(1)),
        file("test/cat/1.jpg", fixtures::jpeg(1)),
    ];
    let resp = app.post_upload(&extend_path(&more), "birds.tar", fixtures::tar(&members), Some("pets and birds")).await;
    assert_eq!(resp.status(), 201);
    let birds = json(resp).await;
    assert_eq!(birds["name"], "pets and birds");
    assert_eq!(birds["classes"], json!(["bird", "cat", "dog"]));
    assert_eq!(birds["num_images"], 11);
    assert_eq!(birds["counts"]["test"], json!({"bird": 2, "cat": 0, "dog": 1}));
    assert_eq!(birds["source"]["added"], 3);
    assert_eq!(birds["source"]["dataset_id"], more["id"]);
    assert_eq!(birds["rejected_total"], 1, "an extension's rejections are its upload's: {birds}");
    assert_eq!(birds["rejected"][0]["reason"], "already in the dataset as 'train/cat/1.jpg' (class 'cat', split train)");
    assert_eq!(birds["duplicates"]["across_classes"], 2, "1 is a bird and a cat, 6 a cat and a dog: {birds}");

    // Deleting the source keeps what the extensions use; deleting them collects the rest.
    assert_eq!(app.delete(&format!("/datasets/{id}")).await.status(), 204);
    assert_eq!(app.delete(&format!("/datasets/{more_id}")).await.status(), 204);
    assert_eq!(app.blobs().len(), 9);
    let birds_id = birds["id"].as_str().unwrap();
    let resp = app.get(&format!("/datasets/{birds_id}/images/{}/thumbnail", blobs[0])).await;
    assert_eq!(resp.status(), 200);

    // A job trains on an extension like on any dataset.
    let job = app.submit_job(birds_id, json!({"epochs": 1, "batch_size": 2})).await;
    let done = app.wait_job(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let model = json(app.get(&format!("/models/{}", done["model_id"].as_str().unwrap())).await).await;
    assert_eq!(model["labels"], json!(["bird", "cat", "dog"]), "{model}");
}

/// A Parquet export of part of a set names every class of the set: an extension needs images of
/// the classes it has rows of only.
#[tokio::test]
async fn a_parquet_extension_may_hold_some_of_the_classes_it_names() {
    let app = spawn_app().await;
    let (source, _) = pets(&app).await;
    let rows: Vec<HfRow> = (20..23).map(|i| HfRow::new(fixtures::jpeg(i), &format!("img_{i}.jpg"), 1)).collect();
    let bytes = fixtures::hf_parquet(&rows, "label", Some(&["bird", "cat", "dog"]), 2);
    let resp = app.post_upload(&extend_path(&source), "train-00000-of-00001.parquet", bytes.clone(), None).await;
    assert_eq!(resp.status(), 201);
    let more = json(resp).await;
    assert_eq!(more["classes"], json!(["cat", "dog"]), "no bird: {more}");
    assert_eq!(more["counts"]["train"], json!({"cat": 6, "dog": 2}));
    assert_eq!(more["source"]["added"], 3);
    // As a dataset of its own, the same file is refused: it names a class it has no image of.
    assert_error(app.post_dataset("train-00000-of-00001.parquet", bytes, None).await, 422, "empty_class").await;
}

#[tokio::test]
async fn bad_extensions_get_clear_errors_and_store_nothing() {
    let app = spawn_app_with(|cfg| cfg.max_upload_bytes = 100_000).await;
    let (source, _) = pets(&app).await;
    let path = extend_path(&source);
    let stored = app.blobs();

    // Nothing new: every picture is there already.
    let members = vec![file("train/cat/1.jpg", fixtures::jpeg(1)), file("test/dog/x.jpg", fixtures::jpeg(5))];
    let message = assert_error(app.post_upload(&path, "same.zip", fixtures::zip(&members), None).await, 422, "no_new_images").await;
    assert!(message.contains("every image of the upload (2 file(s)) is already in the dataset"), "{message}");
    // Refused after a new picture was stored (the bird class has no usable image): it goes.
    let members = vec![file("cat/10.jpg", fixtures::jpeg(10)), Member::Dir("bird/".into()), file("bird/broken.jpg", fixtures::corrupt_jpeg())];
    let message = assert_error(app.post_upload(&path, "birds.zip", fixtures::zip(&members), None).await, 422, "empty_class").await;
    assert!(message.contains("'bird'"), "{message}");
    assert_eq!(app.blobs(), stored, "the new cat is gone");

    let members = vec![file("cat/a.txt", b"text".to_vec())];
    assert_error(app.post_upload(&path, "text.zip", fixtures::zip(&members), None).await, 422, "no_images").await;
    assert_error(app.post_upload(&path, "notes.zip", b"not an archive".to_vec(), None).await, 415, "unsupported_format").await;
    let mut cut = fixtures::zip(&[file("cat/11.jpg", fixtures::jpeg(11))]);
    cut.truncate(cut.len() - 30);
    assert_error(app.post_upload(&path, "cut.zip", cut, None).await, 400, "corrupt_archive").await;
    let ok = fixtures::zip(&[file("cat/12.jpg", fixtures::jpeg(12))]);
    assert_error(app.post_upload(&path, "x.zip", ok.clone(), Some(" ")).await, 422, "invalid_name").await;
    assert_error(app.post_upload(&path, "big.zip", vec![7u8; 1_000_000], None).await, 413, "upload_too_large").await;
    assert_error(app.post_upload(&path, "big.zip", vec![7u8; 120_000], None).await, 413, "upload_too_large").await;
    let message = assert_error(app.post_upload("/datasets/no-such-dataset/extend", "x.zip", ok.clone(), None).await, 404, "not_found").await;
    assert!(message.contains("no-such-dataset"), "{message}");
    let form = reqwest::multipart::Form::new().text("name", "only a name");
    assert_error(app.client.post(app.url(&path)).multipart(form).send().await.unwrap(), 422, "missing_file").await;
    let form = reqwest::multipart::Form::new().text("colour", "blue");
    assert_error(app.client.post(app.url(&path)).multipart(form).send().await.unwrap(), 422, "unknown_field").await;
    let resp = app.client.post(app.url(&path)).header("content-type", "application/zip").body(ok.clone()).send().await.unwrap();
    assert_error(resp, 415, "expected_multipart").await;
    let form = reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(ok).file_name("x.zip"));
    let resp = app.client.post(app.url(&format!("{path}?split=test"))).multipart(form).send().await.unwrap();
    assert_error(resp, 422, "invalid_query").await;
    assert_eq!(app.client.get(app.url(&path)).send().await.unwrap().status(), 405);

    assert_eq!(app.blobs(), stored);
    assert!(app.scratch_files().is_empty());
    let listed = json(app.get("/datasets").await).await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "nothing was stored: {listed}");
    let rows: i64 = sqlx::query_scalar("select count(*) from dataset_images").fetch_one(&app.db).await.unwrap();
    assert_eq!(rows, 7);
}
