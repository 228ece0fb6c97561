//! `POST /datasets/{id}/copy`: a corrected copy of a dataset, with images relabelled, removed or
//! moved; the dataset itself unchanged, the copy's blobs kept when its source goes, and every
//! bad request refused with nothing stored.

use serde_json::{Value, json};
use vitforge::dataset::BlobStore;

use crate::fixtures::{self, file};
use crate::helpers::{TestApp, assert_error, json, spawn_app};

/// cat: 1, 2, 3 (3 in validation); dog: 4, 5 (5 in test); 6 under both cat and dog.
pub(crate) async fn pets(app: &TestApp) -> (Value, Vec<String>) {
    let images: Vec<Vec<u8>> = (1..=6).map(fixtures::jpeg).collect();
    let members = vec![
        file("train/cat/1.jpg", images[0].clone()),
        file("train/cat/2.jpg", images[1].clone()),
        file("validation/cat/3.jpg", images[2].clone()),
        file("train/dog/4.jpg", images[3].clone()),
        file("test/dog/5.jpg", images[4].clone()),
        file("train/cat/6.jpg", images[5].clone()),
        file("train/dog/6-again.jpg", images[5].clone()),
    ];
    let resp = app.post_dataset("pets.zip", fixtures::zip(&members), Some("pets")).await;
    assert_eq!(resp.status(), 201);
    (json(resp).await, images.iter().map(|b| BlobStore::hash(b)).collect())
}

fn copy_path(dataset: &Value) -> String {
    format!("/datasets/{}/copy", dataset["id"].as_str().unwrap())
}

/// The (file, label, split) of every image of a dataset, in upload order.
pub(crate) async fn listing(app: &TestApp, id: &str) -> Vec<(String, String, String)> {
    let page = json(app.get(&format!("/datasets/{id}/images?limit=200")).await).await;
    let field = |im: &Value, k: &str| im[k].as_str().unwrap().to_string();
    page["images"].as_array().unwrap().iter().map(|im| (field(im, "file"), field(im, "label"), field(im, "split"))).collect()
}

#[tokio::test]
async fn a_copy_relabels_removes_and_moves_images_and_leaves_its_dataset_as_it_was() {
    let app = spawn_app().await;
    let (source, blobs) = pets(&app).await;
    assert_eq!(source["duplicates"]["across_classes"], 1, "{source}");
    let id = source["id"].as_str().unwrap();
    let before = listing(&app, id).await;

    // 2 becomes a dog, 4 goes, 3 moves to training, and the picture under both classes (6) is
    // settled as a cat.
    let edits = json!({
        "name": "pets, corrected",
        "relabel": {(&blobs[1]): "dog", (&blobs[5]): "cat"},
        "remove": [&blobs[3]],
        "move": {(&blobs[2]): "train"},
    });
    let resp = app.post_json(&copy_path(&source), &edits).await;
    assert_eq!(resp.status(), 201);
    let copy = json(resp).await;
    assert_eq!(copy["name"], "pets, corrected");
    assert_ne!(copy["id"], source["id"]);
    assert_eq!(copy["num_images"], 6);
    assert_eq!(copy["classes"], json!(["cat", "dog"]));
    assert_eq!(
        copy["counts"],
        json!({"train": {"cat": 4, "dog": 1}, "validation": {"cat": 0, "dog": 0}, "test": {"cat": 0, "dog": 1}})
    );
    assert_eq!(copy["source"], json!({"dataset_id": id, "relabelled": 2, "removed": 1, "moved": 1, "added": 0}));
    assert_eq!((copy["rejected"].clone(), copy["rejected_total"].clone()), (json!([]), json!(0)));
    // Its reports are its own: the one file under two classes is now a copy under one.
    assert_eq!(copy["duplicates"]["copies"], 1, "{copy}");
    assert_eq!(copy["duplicates"]["across_classes"], 0, "{copy}");
    assert!(copy["look_alikes"].is_object(), "{copy}");
    let copy_id = copy["id"].as_str().unwrap();
    let row = |f: &str, l: &str, s: &str| (f.to_string(), l.to_string(), s.to_string());
    assert_eq!(
        listing(&app, copy_id).await,
        [
            row("train/cat/1.jpg", "cat", "train"),
            row("train/cat/2.jpg", "dog", "train"),
            row("validation/cat/3.jpg", "cat", "train"),
            row("test/dog/5.jpg", "dog", "test"),
            row("train/cat/6.jpg", "cat", "train"),
            row("train/dog/6-again.jpg", "cat", "train"),
        ]
    );

    // The source is untouched, and both are listed, the copy first.
    assert_eq!(json(app.get(&format!("/datasets/{id}")).await).await, source);
    assert_eq!(listing(&app, id).await, before);
    assert_eq!(json(app.get(&format!("/datasets/{copy_id}")).await).await, copy);
    let listed = json(app.get("/datasets").await).await;
    let ids: Vec<&str> = listed.as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [copy_id, id]);
    assert_eq!(listed[1]["source"], Value::Null, "an upload has no source");

    // Without a name, the source's with "(copy)"; without edits, every image as it was.
    let plain = json(app.post_json(&copy_path(&source), &json!({})).await).await;
    assert_eq!(plain["name"], "pets (copy)");
    assert_eq!(plain["counts"], source["counts"]);
    assert_eq!(plain["source"], json!({"dataset_id": id, "relabelled": 0, "removed": 0, "moved": 0, "added": 0}));
    assert_eq!(app.blobs().len(), 6, "a copy stores no image again");

    // A job trains on the copy like on any dataset.
    let job = app.submit_job(copy_id, json!({"epochs": 1, "batch_size": 2})).await;
    let done = app.wait_job(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
}

#[tokio::test]
async fn a_copy_keeps_its_images_when_its_dataset_is_deleted() {
    let app = spawn_app().await;
    let (source, blobs) = pets(&app).await;
    let copy = json(app.post_json(&copy_path(&source), &json!({"remove": [&blobs[0]]})).await).await;
    assert_eq!(copy["num_images"], 6);
    assert_eq!(app.delete(&format!("/datasets/{}", source["id"].as_str().unwrap())).await.status(), 204);
    // The removed image was the source's alone: it goes; the copy's stay.
    let mut kept = blobs[1..].to_vec();
    kept.sort();
    assert_eq!(app.blobs(), kept);
    let copy_id = copy["id"].as_str().unwrap();
    let resp = app.get(&format!("/datasets/{copy_id}/images/{}/thumbnail", blobs[1])).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(json(app.get(&format!("/datasets/{copy_id}")).await).await, copy, "the copy still names its source");
    assert_eq!(app.delete(&format!("/datasets/{copy_id}")).await.status(), 204);
    assert!(app.blobs().is_empty());
}

#[tokio::test]
async fn bad_copy_requests_get_clear_errors_and_store_nothing() {
    let app = spawn_app().await;
    let (source, blobs) = pets(&app).await;
    let path = copy_path(&source);
    let (a, b) = (&blobs[0], &blobs[1]);
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!({"remove": ["0123"]}), "unknown_image", "remove names image '0123', which this dataset does not have"),
        (json!({"relabel": {"nope": "cat"}}), "unknown_image", "relabel names image 'nope'"),
        (json!({"move": {"nope": "test"}}), "unknown_image", "move names image 'nope'"),
        (json!({"remove": [a], "relabel": {(a): "dog"}}), "conflicting_edits", "is both removed and relabelled"),
        (json!({"remove": [a], "move": {(a): "test"}}), "conflicting_edits", "is both removed and moved"),
        (json!({"relabel": {(a): " "}}), "invalid_label", "the class name is empty"),
        (json!({"relabel": {(a): "x".repeat(1025)}}), "invalid_label", "longer than 1024 bytes"),
        (json!({"relabel": {(a): "tab\there"}}), "invalid_label", "contains control characters"),
        (json!({"remove": &blobs[3..6]}), "too_few_classes", "a single class ('cat')"),
        (json!({"relabel": {(&blobs[3]): "cat", (&blobs[4]): "cat", (&blobs[5]): "cat"}}), "too_few_classes", "a single class ('cat')"),
        (json!({"remove": &blobs}), "no_images", "no image left"),
        (json!({"name": ""}), "invalid_name", "the name is empty"),
        (json!({"name": "n".repeat(201)}), "invalid_name", "longer than 200 characters"),
        (json!({"name": "a\u{1}b"}), "invalid_name", "control characters"),
        (json!({"move": {(a): "holdout"}}), "invalid_field", "unknown variant `holdout`"),
        (json!({"remove": a}), "invalid_field", "remove: invalid type: string"),
        (json!({"relabel": [b]}), "invalid_field", "relabel: invalid type: sequence"),
        (json!({"relabel": {(a): 3}}), "invalid_field", "invalid type: integer `3`"),
        (json!({"labels": {}}), "invalid_field", "unknown field `labels`"),
        (json!({"remove": ["a\u{0}b"]}), "invalid_field", "contains a NUL character"),
    ];
    for (body, code, says) in cases {
        let message = assert_error(app.post_json(&path, &body).await, 422, code).await;
        assert!(message.contains(says), "{body}: {message}");
    }
    assert_error(app.post_json("/datasets/no-such-dataset/copy", &json!({})).await, 404, "not_found").await;
    let resp = app.client.post(app.url(&path)).body("{}").send().await.unwrap();
    assert_error(resp, 415, "expected_json").await;
    let resp = app.client.post(app.url(&path)).header("content-type", "application/json").body("{\"remove\": [").send().await.unwrap();
    assert_error(resp, 400, "invalid_json").await;
    let resp = app.client.post(app.url(&format!("{path}?dry_run=1"))).json(&json!({})).send().await.unwrap();
    assert_error(resp, 422, "invalid_query").await;
    let resp = app.client.get(app.url(&path)).send().await.unwrap();
    assert_eq!(resp.status(), 405);

    let listed = json(app.get("/datasets").await).await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "nothing was stored: {listed}");
    let rows: i64 = sqlx::query_scalar("select count(*) from dataset_images").fetch_one(&app.db).await.unwrap();
    assert_eq!(rows, 7);
}
