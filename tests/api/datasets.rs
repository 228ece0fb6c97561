//! `/datasets`: uploads in every supported format, per-file rejections, hostile archives, limits,
//! persistence across restarts, deletion and blob collection.

use std::collections::BTreeMap;
use std::path::Path;

use image::ImageFormat;
use serde_json::{Value, json};
use vitforge::dataset::BlobStore;

use crate::fixtures::{self, HfRow, Member, class_images, file};
use crate::helpers::{TestApp, assert_error, json, spawn_app, spawn_app_with, spawn_with, test_config};
use crate::support::files_under;

/// Uploads and expects 201, returning the dataset.
/// An image of a duplicates report's group, as the API lists it.
/// A file of a report's group: its name, class, split, and blob (the SHA-256 of its bytes).
fn at(file: &str, bytes: &[u8], label: &str, split: &str) -> Value {
    json!({"file": file, "label": label, "split": split, "blob": BlobStore::hash(bytes)})
}

async fn upload_ok(app: &TestApp, file_name: &str, bytes: Vec<u8>) -> Value {
    let resp = app.post_dataset(file_name, bytes, None).await;
    let status = resp.status();
    let body = json(resp).await;
    assert_eq!(status, 201, "upload refused: {body}");
    body
}

/// `rejected` as file → reason.
fn rejected(dataset: &Value) -> BTreeMap<String, String> {
    dataset["rejected"]
        .as_array()
        .expect("rejected array")
        .iter()
        .map(|r| (r["file"].as_str().unwrap().to_string(), r["reason"].as_str().unwrap().to_string()))
        .collect()
}

/// Asserts the data folder holds nothing but the database, blobs named by hash, and empty scratch.
fn assert_only_blobs_written(app: &TestApp) {
    for rel in files_under(&app.data_dir) {
        let rel = rel.as_path();
        let name = rel.to_string_lossy();
        let ok = name.starts_with("vitforge.db")
            || rel.parent() == Some(Path::new("blobs"))
                && BlobStore::is_valid_hash(&rel.file_name().unwrap().to_string_lossy());
        assert!(ok, "unexpected file in the data folder: {name}");
    }
}

#[tokio::test]
async fn zip_in_class_folders_is_ingested() {
    let app = spawn_app().await;
    let mut members = vec![Member::Dir("cat/".into()), Member::Dir("dog/".into())];
    members.extend(class_images("", &["cat"], 3, 0));
    members.push(file("dog/a.png", fixtures::png(1)));
    members.push(file("dog/b.webp", fixtures::image(ImageFormat::WebP, 16, 2)));
    members.push(file("dog/c.bmp", fixtures::image(ImageFormat::Bmp, 16, 3)));
    members.push(file("dog/d.gif", fixtures::image(ImageFormat::Gif, 16, 4)));
    let resp = app.post_dataset("pets.zip", fixtures::zip(&members), Some("my pets")).await;
    assert_eq!(resp.status(), 201);
    let ds = json(resp).await;

    assert_eq!(ds["name"], "my pets");
    assert_eq!(ds["num_images"], 7);
    assert_eq!(ds["classes"], json!(["cat", "dog"]));
    assert_eq!(
        ds["counts"],
        json!({"train": {"cat": 3, "dog": 4}, "validation": {"cat": 0, "dog": 0}, "test": {"cat": 0, "dog": 0}})
    );
    assert_eq!(ds["rejected"], json!([]));
    assert!(ds["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(ds["created_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(app.blobs().len(), 7);
    assert!(app.scratch_files().is_empty(), "the upload's scratch file was not removed");

    let fetched = json(app.get(&format!("/datasets/{}", ds["id"].as_str().unwrap())).await).await;
    assert_eq!(fetched, ds);
}

/// TIFFs and Netpbm images are ingested, the first page of a TIFF of several; a kind that is not
/// read is listed in `rejected` by what it is; a TIFF's thumbnail is a JPEG like any other.
#[tokio::test]
async fn tiffs_and_netpbm_images_are_ingested_and_a_kind_not_read_is_rejected_by_name() {
    let app = spawn_app().await;
    let mut members = class_images("", &["cat", "dog"], 2, 0);
    for (name, fixture) in [
        ("cat/scan.tif", "tiff/jpeg-ycbcr-tiles.tif"),
        ("cat/pages.tif", "tiff/multipage.tif"),
        ("dog/16bit.tiff", "tiff/rgb16.tif"),
        ("dog/palette.tif", "tiff/palette4.tif"),
        ("dog/float.tif", "tiff/refused-float.tif"),
        ("dog/face.pgm", "pnm/p5-max255.pgm"),
        ("cat/plain.ppm", "pnm/p3-max1000.ppm"),
    ] {
        members.push(file(name, fixtures::decoder_fixture(fixture)));
    }
    let ds = upload_ok(&app, "scans.zip", fixtures::zip(&members)).await;
    assert_eq!(ds["counts"]["train"], json!({"cat": 5, "dog": 5}));
    assert_eq!(
        rejected(&ds),
        BTreeMap::from([("dog/float.tif".to_string(), "unsupported image: a TIFF of floating-point samples; save it as 8-bit RGB".to_string())])
    );
    let id = ds["id"].as_str().unwrap();
    let page = json(app.get(&format!("/datasets/{id}/images?limit=200")).await).await;
    let scan = page["images"].as_array().unwrap().iter().find(|i| i["file"] == "cat/scan.tif").expect("the scan is listed");
    let resp = app.get(scan["thumbnail"].as_str().unwrap()).await;
    assert_eq!(resp.status(), 200);
    let thumbnail = image::load_from_memory_with_format(&resp.bytes().await.unwrap(), ImageFormat::Jpeg).unwrap();
    assert_eq!((thumbnail.width(), thumbnail.height()), (37, 29), "no larger than the scan");
}

#[tokio::test]
async fn the_default_name_is_the_uploaded_file_name() {
    let app = spawn_app().await;
    let ds = upload_ok(&app, "pets.zip", fixtures::zip(&class_images("", &["cat", "dog"], 1, 0))).await;
    assert_eq!(ds["name"], "pets.zip");
}

#[tokio::test]
async fn tar_gz_with_a_wrapping_folder_and_split_folders() {
    let app = spawn_app().await;
    let mut members = class_images("mydata/train/", &["cat", "dog"], 3, 0);
    members.extend(class_images("mydata/val/", &["cat", "dog"], 2, 100));
    members.extend(class_images("mydata/test/", &["cat"], 1, 200));
    members.push(file("mydata/README.txt", b"about this set".to_vec()));
    // The name does not matter: the format is recognised from the content.
    let ds = upload_ok(&app, "upload.bin", fixtures::tar_gz(&members)).await;

    assert_eq!(ds["num_images"], 11);
    assert_eq!(ds["classes"], json!(["cat", "dog"]));
    assert_eq!(
        ds["counts"],
        json!({"train": {"cat": 3, "dog": 3}, "validation": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 0}})
    );
    let rejected = rejected(&ds);
    assert_eq!(rejected.len(), 1);
    assert!(rejected["mydata/README.txt"].contains("expected <split>/<class>/<image>"), "{rejected:?}");
}

#[tokio::test]
async fn plain_tar_is_ingested() {
    let app = spawn_app().await;
    let mut members = class_images("", &["bird", "cat", "dog"], 2, 0);
    members.push(Member::Dir("bird/".into()));
    let ds = upload_ok(&app, "set.tar", fixtures::tar(&members)).await;
    assert_eq!(ds["num_images"], 6);
    assert_eq!(ds["classes"], json!(["bird", "cat", "dog"]));
    assert_eq!(ds["counts"]["train"], json!({"bird": 2, "cat": 2, "dog": 2}));
}

#[tokio::test]
async fn duplicate_names_keep_the_first_entry() {
    let app = spawn_app().await;
    let members = vec![
        file("cat/1.jpg", fixtures::jpeg(1)),
        file("dog/1.jpg", fixtures::jpeg(2)),
        file("cat/1.jpg", fixtures::jpeg(3)),
    ];
    let ds = upload_ok(&app, "dup.tar", fixtures::tar(&members)).await;
    assert_eq!(ds["num_images"], 2);
    assert!(rejected(&ds)["cat/1.jpg"].contains("duplicate"));
    // The first one's bytes were kept.
    assert!(app.blobs().contains(&BlobStore::hash(&fixtures::jpeg(1))));
    assert!(!app.blobs().contains(&BlobStore::hash(&fixtures::jpeg(3))));
}

/// Files repeated under other names are kept, and reported: a file under two classes first, then
/// one in two splits, then plain copies. A dataset stored before the report existed gets it when
/// first read.
#[tokio::test]
async fn repeated_files_are_reported_and_worked_out_for_older_datasets() {
    let app = spawn_app().await;
    let members = vec![
        file("train/cat/1.png", fixtures::png(1)),
        file("train/cat/1 copy.png", fixtures::png(1)),
        file("train/dog/2.png", fixtures::png(2)),
        file("train/cat/3.png", fixtures::png(3)),
        file("train/dog/3.png", fixtures::png(3)),
        file("test/dog/2.png", fixtures::png(2)),
        file("test/cat/4.png", fixtures::png(4)),
    ];
    let ds = upload_ok(&app, "dups.tar", fixtures::tar(&members)).await;
    assert_eq!(ds["num_images"], 7);
    assert_eq!(app.blobs().len(), 4);
    let expected = json!({
        "copies": 3,
        "across_classes": 1,
        "across_splits": 1,
        "groups_total": 3,
        "groups": [
            {"count": 2, "classes": ["cat", "dog"], "splits": ["train"], "files": [at("train/cat/3.png", &fixtures::png(3), "cat", "train"), at("train/dog/3.png", &fixtures::png(3), "dog", "train")]},
            {"count": 2, "classes": ["dog"], "splits": ["train", "test"], "files": [at("train/dog/2.png", &fixtures::png(2), "dog", "train"), at("test/dog/2.png", &fixtures::png(2), "dog", "test")]},
            {"count": 2, "classes": ["cat"], "splits": ["train"], "files": [at("train/cat/1.png", &fixtures::png(1), "cat", "train"), at("train/cat/1 copy.png", &fixtures::png(1), "cat", "train")]},
        ],
        "summary": "3 images are copies of others: 1 file under two or more classes, 1 file in two or more splits",
    });
    assert_eq!(ds["duplicates"], expected);
    let id = ds["id"].as_str().unwrap();
    assert_eq!(json(app.get(&format!("/datasets/{id}")).await).await, ds);

    let plain = upload_ok(&app, "plain.zip", fixtures::zip(&class_images("", &["cat", "dog"], 2, 0))).await;
    let none = json!({"copies": 0, "across_classes": 0, "across_splits": 0, "groups": [], "groups_total": 0, "summary": null});
    assert_eq!(plain["duplicates"], none);

    // As stored by a version before this report: the column is null until the dataset is read.
    let db = crate::support::open_database(&app.data_dir).await;
    sqlx::query("update datasets set duplicates = null").execute(&db).await.unwrap();
    let list = json(app.get("/datasets").await).await;
    assert_eq!(list[1]["duplicates"], expected);
    assert_eq!(list[0]["duplicates"], none);
    let stored: Vec<Option<String>> = sqlx::query_scalar("select duplicates from datasets").fetch_all(&db).await.unwrap();
    assert!(stored.iter().all(Option::is_some), "the report was not stored once worked out: {stored:?}");
    assert_eq!(json(app.get(&format!("/datasets/{id}")).await).await, ds);
}

/// A resized, re-encoded copy of a picture, its mirror image and the picture turned a quarter
/// are reported as look-alikes, though not the picture turned under another class (where the
/// way it is laid down is what tells classes apart); datasets stored before images were
/// fingerprinted (or before their mirror images or turned copies were) report none (`null`)
/// and keep working until the next start fingerprints them.
#[tokio::test]
async fn pictures_that_look_alike_are_reported() {
    let app = spawn_app().await;
    let picture = |seed| crate::support::pictures::picture(seed, 256, 256);
    let smaller = {
        let half = image::imageops::resize(&picture(1), 128, 128, image::imageops::FilterType::Triangle);
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 70).encode_image(&half).unwrap();
        bytes
    };
    let encoded = |image: image::RgbImage| fixtures::encoded(&image, ImageFormat::Png);
    let png = |seed| encoded(picture(seed));
    let mirrored = encoded(image::imageops::flip_horizontal(&picture(1)));
    let turned = encoded(image::imageops::rotate90(&picture(1)));
    let files = [
        at("train/cat/1.png", &png(1), "cat", "train"),
        at("test/cat/1-small.jpg", &smaller, "cat", "test"),
        at("test/cat/1-mirrored.png", &mirrored, "cat", "test"),
        at("validation/cat/1-turned.png", &turned, "cat", "validation"),
    ];
    let members = vec![
        file("train/cat/1.png", png(1)),
        file("train/cat/2.png", png(2)),
        file("train/dog/3.png", png(3)),
        file("train/dog/4.png", png(4)),
        file("test/cat/1-small.jpg", smaller),
        file("test/cat/1-mirrored.png", mirrored),
        file("validation/cat/1-turned.png", turned),
        file("test/dog/5.png", png(5)),
        file("train/dog/1-turned.png", encoded(image::imageops::rotate270(&picture(1)))),
    ];
    let ds = upload_ok(&app, "alike.zip", fixtures::zip(&members)).await;
    let expected = json!({
        "copies": 3,
        "across_classes": 0,
        "across_splits": 1,
        "groups_total": 1,
        "groups": [{"count": 4, "classes": ["cat"], "splits": ["train", "validation", "test"], "files": files}],
        "summary": "3 images look like other files (resized, re-encoded, mirrored or turned copies): 1 group in two or more splits",
    });
    assert_eq!(ds["look_alikes"], expected);
    assert_eq!(ds["duplicates"]["copies"], 0);
    let id = ds["id"].as_str().unwrap();
    assert_eq!(json(app.get(&format!("/datasets/{id}")).await).await["look_alikes"], expected);

    // As stored by a version before fingerprints of turned copies (or of mirror images): no
    // report, and the rest reads as before.
    let db = crate::support::open_database(&app.data_dir).await;
    sqlx::query("update dataset_images set look_turned = null").execute(&db).await.unwrap();
    sqlx::query("update datasets set look_alikes = null").execute(&db).await.unwrap();
    let old = json(app.get(&format!("/datasets/{id}")).await).await;
    assert_eq!(old["look_alikes"], Value::Null);
    assert_eq!(old["num_images"], 9);

    // The next start fingerprints them in the background, and the report appears.
    let restarted = spawn_with(test_config(&app.data_dir)).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let report = loop {
        let now = json(restarted.get(&format!("/datasets/{id}")).await).await;
        if !now["look_alikes"].is_null() || std::time::Instant::now() > deadline {
            break now["look_alikes"].clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(report, expected);
    let unset: i64 = sqlx::query_scalar(
        "select count(*) from dataset_images where look is null or look_mirror is null or look_turned is null or look_colour is null",
    )
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(unset, 0);
}

#[tokio::test]
async fn hugging_face_parquet_with_class_label_names() {
    let app = spawn_app().await;
    let mut rows: Vec<HfRow> =
        (0..7).map(|i| HfRow::new(fixtures::jpeg(i as u32), &format!("img_{i}.jpg"), i % 3)).collect();
    // An unlabelled row, as Hugging Face writes them (-1), and a row with only a path.
    rows.push(HfRow::new(fixtures::jpeg(50), "unlabelled.jpg", -1));
    rows.push(HfRow { bytes: None, ..HfRow::new(Vec::new(), "/home/someone/img.jpg", 0) });
    let bytes = fixtures::hf_parquet(&rows, "label", Some(&["cat", "dog", "bird"]), 2);
    let ds = upload_ok(&app, "train-00000-of-00001.parquet", bytes).await;

    assert_eq!(ds["num_images"], 7);
    // Sorted names, not ClassLabel order.
    assert_eq!(ds["classes"], json!(["bird", "cat", "dog"]));
    assert_eq!(ds["counts"]["train"], json!({"bird": 2, "cat": 3, "dog": 2}));
    let rejected = rejected(&ds);
    assert!(rejected["unlabelled.jpg"].contains("no label"), "{rejected:?}");
    assert!(rejected["/home/someone/img.jpg"].contains("no embedded image bytes"), "{rejected:?}");
    assert_eq!(app.blobs().len(), 7);
}

/// Parquet's class names and file names come whole, not from folders: they get the checks a
/// folder name gets (not empty, no control characters, at most 1,024 bytes), and a rejected
/// name is shown with its control characters escaped (PostgreSQL stores no NUL).
#[tokio::test]
async fn parquet_class_and_file_names_are_checked_like_folder_names() {
    let app = spawn_app().await;
    let long = "x".repeat(1025);
    let mut rows: Vec<HfRow> = (0..10).map(|i| HfRow::new(fixtures::jpeg(i as u32), &format!("img_{i}.jpg"), i % 5)).collect();
    rows.push(HfRow::new(fixtures::jpeg(20), "bad\u{0}name.jpg", 0));
    let ds = upload_ok(&app, "names.parquet", fixtures::hf_parquet(&rows, "label", Some(&["cat", "dog", " ", "cow\n", &long]), 4)).await;
    assert_eq!(ds["classes"], json!(["cat", "dog"]));
    assert_eq!(ds["num_images"], 4);
    let rejected = rejected(&ds);
    assert!(rejected["img_2.jpg"].contains("class name is empty"), "{rejected:?}");
    assert!(rejected["img_3.jpg"].contains("class name 'cow\\u{a}' contains control characters"), "{rejected:?}");
    assert!(rejected["img_4.jpg"].contains("longer than 1024 bytes"), "{rejected:?}");
    assert!(rejected["bad\\u{0}name.jpg"].contains("control characters"), "{rejected:?}");
}

#[tokio::test]
async fn parquet_with_a_split_column_and_no_class_names() {
    let app = spawn_app().await;
    let split = ["train", "train", "validation", "test", "train", "val"];
    let rows: Vec<HfRow> = (0..6)
        .map(|i| HfRow {
            split: Some(split[i].to_string()),
            path: None,
            ..HfRow::new(fixtures::png(i as u32), "", (i % 2) as i64)
        })
        .collect();
    let ds = upload_ok(&app, "data.parquet", fixtures::hf_parquet(&rows, "labels", None, 4)).await;
    assert_eq!(ds["classes"], json!(["0", "1"]));
    assert_eq!(
        ds["counts"],
        json!({"train": {"0": 2, "1": 1}, "validation": {"0": 1, "1": 1}, "test": {"0": 0, "1": 1}})
    );
    let id = ds["id"].as_str().unwrap();
    let files: Vec<String> = sqlx::query_scalar("select file from dataset_images where dataset_id = $1 order by rowid")
        .bind(id)
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(files[0], "row 0");
}

#[tokio::test]
async fn parquet_that_is_not_an_image_dataset_is_422_and_a_damaged_one_400() {
    let app = spawn_app().await;
    let resp = app.post_dataset("labels.parquet", fixtures::parquet_without_images(), None).await;
    let message = assert_error(resp, 422, "invalid_parquet").await;
    assert!(message.contains("image column"), "{message}");

    let rows: Vec<HfRow> = (0..4).map(|i| HfRow::new(fixtures::jpeg(i), "x.jpg", i64::from(i % 2))).collect();
    let mut bytes = fixtures::hf_parquet(&rows, "label", None, 2);
    bytes.truncate(bytes.len() - 1);
    assert_error(app.post_dataset("cut.parquet", bytes, None).await, 400, "corrupt_archive").await;
    assert!(app.blobs().is_empty());
}

/// Inputs `cargo fuzz` found (`scripts/fuzz.sh`): a footer whose list declares billions of
/// elements, which made the parquet crate reserve ~100 GB and abort the process, and one on which
/// its footer decoder panics.
#[tokio::test]
async fn parquet_footers_found_by_the_fuzzer_are_400() {
    let app = spawn_app().await;
    for name in ["parquet-footer-huge-list.parquet", "parquet-footer-decoder-panic.parquet"] {
        let bytes = std::fs::read(format!("{}/tests/fixtures/fuzz/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert_error(app.post_dataset(name, bytes, None).await, 400, "corrupt_archive").await;
    }
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn a_parquet_footer_that_crashes_the_decoder_is_400() {
    let app = spawn_app().await;
    let rows: Vec<HfRow> = (0..4).map(|i| HfRow::new(fixtures::jpeg(i), "x.jpg", i64::from(i % 2))).collect();
    let mut bytes = fixtures::hf_parquet(&rows, "label", Some(&["cat", "dog"]), 2);
    // One byte of the footer's thrift changed so that parquet 57's footer decoder panics (found
    // by mutating this fixture). If a parquet upgrade stops panicking here, this still expects a
    // 400 but the message check will say the panic path is no longer exercised.
    let footer = u32::from_le_bytes(bytes[bytes.len() - 8..bytes.len() - 4].try_into().unwrap()) as usize;
    let footer_start = bytes.len() - 8 - footer;
    bytes[footer_start + 13] = 0x15;
    let message = assert_error(app.post_dataset("crash.parquet", bytes, None).await, 400, "corrupt_archive").await;
    assert!(message.contains("could not be decoded"), "{message}");
    assert_eq!(app.get("/healthz").await.status(), 200);
    upload_ok(&app, "ok.zip", fixtures::zip(&class_images("", &["cat", "dog"], 1, 0))).await;
}

#[tokio::test]
async fn broken_files_are_rejected_one_by_one() {
    let app = spawn_app().await;
    let mut members = class_images("", &["cat", "dog"], 2, 0);
    members.push(file("cat/broken.jpg", fixtures::corrupt_jpeg()));
    // Cut in its image data: the decoder would fill the rest with grey and say nothing.
    let mut cut = fixtures::image(ImageFormat::Jpeg, 128, 7);
    cut.truncate(cut.len() - 100);
    members.push(file("dog/cut.jpg", cut));
    members.push(file("cat/notes.txt", b"these are my cats".to_vec()));
    members.push(file("dog/empty.jpg", Vec::new()));
    members.push(file("README.md", b"# pets".to_vec()));
    // Operating-system clutter is skipped without a word.
    members.push(file("__MACOSX/cat/._0.jpg", vec![0u8; 100]));
    members.push(file("cat/.DS_Store", vec![0u8; 100]));
    let ds = upload_ok(&app, "pets.zip", fixtures::zip(&members)).await;

    assert_eq!(ds["num_images"], 4);
    let rejected = rejected(&ds);
    assert_eq!(rejected.len(), 5, "{rejected:?}");
    assert!(rejected["cat/broken.jpg"].contains("corrupt"), "{rejected:?}");
    assert!(rejected["dog/cut.jpg"].contains("cut short"), "{rejected:?}");
    assert!(rejected["cat/notes.txt"].contains("not an image"), "{rejected:?}");
    assert!(rejected["dog/empty.jpg"].contains("empty"), "{rejected:?}");
    assert!(rejected["README.md"].contains("not inside a class folder"), "{rejected:?}");
    assert_eq!(app.blobs().len(), 4);
}

#[tokio::test]
async fn images_over_the_pixel_limit_are_rejected() {
    let app = spawn_app_with(|cfg| cfg.max_image_pixels = 40 * 40).await;
    let mut members = class_images("", &["cat", "dog"], 1, 0);
    members.push(file("dog/huge.png", fixtures::image(ImageFormat::Png, 64, 9)));
    let ds = upload_ok(&app, "pets.zip", fixtures::zip(&members)).await;
    assert!(rejected(&ds)["dog/huge.png"].contains("over the limit"), "{ds}");
}

#[tokio::test]
async fn traversal_and_absolute_zip_entries_are_rejected_and_never_written() {
    let app = spawn_app().await;
    let outside = std::env::temp_dir().join(format!("vitforge-escape-{}.png", uuid::Uuid::now_v7()));
    let mut members = class_images("", &["cat", "dog"], 1, 0);
    members.push(file("../escaped.png", fixtures::png(7)));
    members.push(file("cat/../../escaped2.png", fixtures::png(8)));
    members.push(file(outside.to_str().unwrap(), fixtures::png(9)));
    let ds = upload_ok(&app, "evil.zip", fixtures::zip(&members)).await;

    assert_eq!(ds["num_images"], 2);
    let rejected = rejected(&ds);
    assert!(rejected["../escaped.png"].contains(".."), "{rejected:?}");
    assert!(rejected["cat/../../escaped2.png"].contains(".."), "{rejected:?}");
    assert_eq!(rejected[outside.to_str().unwrap()], "absolute path");
    assert!(!outside.exists());
    let parent = app.data_dir.parent().unwrap();
    assert!(!parent.join("escaped.png").exists() && !parent.join("escaped2.png").exists());
    assert_only_blobs_written(&app);
    assert_eq!(app.blobs().len(), 2);
}

#[tokio::test]
async fn links_and_traversal_in_a_tar_are_rejected_and_never_followed() {
    let app = spawn_app().await;
    let outside = std::env::temp_dir().join(format!("vitforge-{}.png", uuid::Uuid::now_v7().simple()));
    let mut members = class_images("", &["cat", "dog"], 1, 0);
    members.push(Member::Symlink("cat/passwd.png".into(), "/etc/passwd".into()));
    members.push(Member::Symlink("dog/up".into(), "../..".into()));
    members.push(Member::HardLink("dog/hard.jpg".into(), "cat/0.jpg".into()));
    members.push(file("../escaped.png", fixtures::png(7)));
    members.push(file(outside.to_str().unwrap(), fixtures::png(8)));
    // A file "through" the symlinked folder: never resolved, just a wrong-depth path.
    members.push(file("dog/up/x.png", fixtures::png(9)));
    let ds = upload_ok(&app, "evil.tar", fixtures::tar(&members)).await;

    assert_eq!(ds["num_images"], 2);
    let rejected = rejected(&ds);
    assert!(rejected["cat/passwd.png"].contains("symbolic link"), "{rejected:?}");
    assert!(rejected["dog/up"].contains("symbolic link"), "{rejected:?}");
    assert!(rejected["dog/hard.jpg"].contains("hard link"), "{rejected:?}");
    assert!(rejected["../escaped.png"].contains(".."), "{rejected:?}");
    assert_eq!(rejected[outside.to_str().unwrap()], "absolute path");
    assert!(rejected["dog/up/x.png"].contains("nested too deeply"), "{rejected:?}");
    assert!(!outside.exists());
    assert!(!app.data_dir.parent().unwrap().join("escaped.png").exists());
    assert_only_blobs_written(&app);
}

#[tokio::test]
async fn a_zip_bomb_is_stopped_by_the_unpack_limit() {
    let app = spawn_app_with(|cfg| cfg.max_extracted_bytes = 1024 * 1024).await;
    let mut members = class_images("", &["cat", "dog"], 2, 0);
    members.push(Member::Zeros("cat/bomb.png".into(), 64 * 1024 * 1024));
    let bomb = fixtures::zip(&members);
    assert!(bomb.len() < 200 * 1024, "the bomb should be small: {} bytes", bomb.len());
    let message = assert_error(app.post_dataset("bomb.zip", bomb, None).await, 413, "extracted_too_large").await;
    assert!(message.contains("1048576"), "{message}");

    // Nothing was stored, nothing is left behind, and the service still works.
    assert!(app.blobs().is_empty());
    assert!(app.scratch_files().is_empty());
    assert_eq!(app.get("/healthz").await.status(), 200);
    upload_ok(&app, "ok.zip", fixtures::zip(&class_images("", &["cat", "dog"], 1, 0))).await;
}

#[tokio::test]
async fn a_tar_gz_bomb_is_stopped_by_the_unpack_limit() {
    let app = spawn_app_with(|cfg| cfg.max_extracted_bytes = 1024 * 1024).await;
    let mut members = class_images("", &["cat", "dog"], 2, 0);
    members.push(Member::Zeros("cat/zeros.bin".into(), 32 * 1024 * 1024));
    let bomb = fixtures::tar_gz(&members);
    assert!(bomb.len() < 200 * 1024, "the bomb should be small: {} bytes", bomb.len());
    assert_error(app.post_dataset("bomb.tgz", bomb, None).await, 413, "extracted_too_large").await;
    assert!(app.blobs().is_empty());
}

#[tokio::test]
async fn too_many_entries_is_413() {
    let app = spawn_app_with(|cfg| cfg.max_archive_entries = 5).await;
    let resp = app.post_dataset("many.zip", fixtures::zip(&class_images("", &["cat", "dog"], 3, 0)), None).await;
    assert_error(resp, 413, "too_many_entries").await;
}

/// The entry limit holds for a Parquet file whose footer understates its rows (the rows read are
/// the row groups'), and for a split column of any length the reason shows it cut short.
#[tokio::test]
async fn a_parquet_footer_that_understates_its_rows_is_413_and_a_long_split_is_shown_cut() {
    let app = spawn_app_with(|cfg| cfg.max_archive_entries = 4).await;
    let rows: Vec<HfRow> = (0..6).map(|i| HfRow::new(fixtures::png(i as u32), &format!("{i}.png"), i % 2)).collect();
    let mut parquet = fixtures::hf_parquet(&rows, "label", Some(&["cat", "dog"]), 2);
    // FileMetaData's num_rows (field 3, i64: 0x16, zigzag 6 = 0x0c) just before its row groups
    // (field 4, a list: 0x19) says 1 (zigzag 2).
    let at: Vec<usize> = parquet.windows(3).enumerate().filter(|(_, w)| *w == [0x16, 0x0c, 0x19]).map(|(i, _)| i).collect();
    assert_eq!(at.len(), 1, "one num_rows field of 6");
    parquet[at[0] + 1] = 0x02;
    assert_error(app.post_dataset("lying.parquet", parquet, None).await, 413, "too_many_entries").await;

    let mut rows: Vec<HfRow> = (0..4).map(|i| HfRow::new(fixtures::png(i as u32), &format!("{i}.png"), i % 2)).collect();
    rows[3].split = Some("x".repeat(100_000));
    for row in &mut rows[..3] {
        row.split = Some("train".into());
    }
    let ds = upload_ok(&app, "split.parquet", fixtures::hf_parquet(&rows, "label", Some(&["cat", "dog"]), 4)).await;
    let reason = &rejected(&ds)["3.png"];
    assert!(reason.starts_with("unknown split 'xxx") && reason.len() < 400, "{} bytes: {}", reason.len(), &reason[..100]);
}

/// An image whose decode needs more than the whole memory budget is refused on its own, saying
/// which setting limits it; the rest of the upload is stored (a 429 would be retried for ever).
#[tokio::test]
async fn an_image_larger_than_the_whole_memory_budget_is_rejected_not_retried() {
    let app = spawn_app_with(|cfg| cfg.max_inflight_bytes = 20 << 20).await;
    let mut members = class_images("", &["cat", "dog"], 3, 0);
    let mut big = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(1000, 1000).write_to(&mut big, ImageFormat::Png).unwrap();
    members.push(file("cat/big.png", big.into_inner()));
    let ds = upload_ok(&app, "pets.zip", fixtures::zip(&members)).await;
    assert_eq!(ds["num_images"], 6);
    let reason = &rejected(&ds)["cat/big.png"];
    assert!(reason.contains("more than the service's whole memory budget") && reason.contains("--max-inflight-bytes"), "{reason}");
}

#[tokio::test]
async fn a_body_that_is_not_an_archive_is_415() {
    let app = spawn_app().await;
    let resp = app.post_dataset("notes.zip", b"just some text, not an archive".to_vec(), None).await;
    assert_error(resp, 415, "unsupported_format").await;
    let resp = app.post_dataset("image.jpg", fixtures::jpeg(1), None).await;
    assert_error(resp, 415, "unsupported_format").await;
    let resp = app.post_dataset("empty.zip", Vec::new(), None).await;
    assert_error(resp, 415, "unsupported_format").await;

    // Not multipart at all.
    let resp = app
        .client
        .post(app.url("/datasets"))
        .header("content-type", "application/zip")
        .body(fixtures::zip(&class_images("", &["cat", "dog"], 1, 0)))
        .send()
        .await
        .unwrap();
    assert_error(resp, 415, "expected_multipart").await;
    assert!(app.scratch_files().is_empty());
}

#[tokio::test]
async fn a_damaged_archive_is_400() {
    let app = spawn_app().await;
    let mut zip = fixtures::zip(&class_images("", &["cat", "dog"], 2, 0));
    zip.truncate(zip.len() - 30);
    assert_error(app.post_dataset("cut.zip", zip, None).await, 400, "corrupt_archive").await;
    let mut tgz = fixtures::tar_gz(&class_images("", &["cat", "dog"], 2, 0));
    tgz.truncate(tgz.len() / 2);
    assert_error(app.post_dataset("cut.tgz", tgz, None).await, 400, "corrupt_archive").await;
    assert!(app.blobs().is_empty());
}

/// An upload refused after some of its images were stored (here: every image of one class is
/// unusable, which only decoding finds) removes the blobs it added, and keeps those it shares
/// with a stored dataset: no space is held until the next sweep.
#[tokio::test]
async fn a_refused_upload_removes_the_blobs_it_added() {
    let app = spawn_app().await;
    let kept = class_images("", &["cat", "dog"], 2, 0);
    upload_ok(&app, "kept.zip", fixtures::zip(&kept)).await;
    let stored = app.blobs();
    assert_eq!(stored.len(), 4);
    let mut members: Vec<Member> = class_images("", &["cat"], 5, 0);
    members.push(file("dog/0.jpg", b"not an image".to_vec()));
    members.push(file("dog/1.jpg", fixtures::corrupt_jpeg()));
    let resp = app.post_dataset("refused.zip", fixtures::zip(&members), None).await;
    let message = assert_error(resp, 422, "empty_class").await;
    assert!(message.contains("'dog'"), "{message}");
    assert_eq!(app.blobs(), stored, "the three new cats are gone, the two shared ones stay");
    assert!(app.scratch_files().is_empty());
    assert_eq!(json(app.get("/datasets").await).await.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn one_class_only_is_422() {
    let app = spawn_app().await;
    let resp = app.post_dataset("cats.zip", fixtures::zip(&class_images("", &["cat"], 3, 0)), None).await;
    let message = assert_error(resp, 422, "too_few_classes").await;
    assert!(message.contains("'cat'"), "{message}");
}

#[tokio::test]
async fn a_class_without_a_usable_image_is_422_naming_it() {
    let app = spawn_app().await;
    let mut members = class_images("", &["cat", "dog"], 1, 0);
    members.push(Member::Dir("bird/".into()));
    members.push(file("bird/broken.jpg", fixtures::corrupt_jpeg()));
    let message =
        assert_error(app.post_dataset("set.zip", fixtures::zip(&members), None).await, 422, "empty_class").await;
    assert!(message.contains("'bird'"), "{message}");
}

#[tokio::test]
async fn no_usable_image_is_422() {
    let app = spawn_app().await;
    let members = vec![file("cat/a.txt", b"text".to_vec()), file("dog/b.txt", b"text".to_vec())];
    let message =
        assert_error(app.post_dataset("set.zip", fixtures::zip(&members), None).await, 422, "no_images").await;
    assert!(message.contains("not an image"), "{message}");
}

#[tokio::test]
async fn an_upload_over_max_upload_bytes_is_413_and_leaves_nothing() {
    let app = spawn_app_with(|cfg| cfg.max_upload_bytes = 100_000).await;
    // Within the multipart allowance, so the streaming check is the one that stops it.
    let resp = app.post_dataset("big.zip", vec![7u8; 120_000], None).await;
    assert_error(resp, 413, "upload_too_large").await;
    // Far over: refused from its Content-Length before the body is read.
    let resp = app.post_dataset("huge.zip", vec![7u8; 1_000_000], None).await;
    assert_error(resp, 413, "upload_too_large").await;
    assert!(app.scratch_files().is_empty());
    // A small one still goes through.
    upload_ok(&app, "ok.zip", fixtures::zip(&class_images("", &["cat", "dog"], 1, 0))).await;
}

#[tokio::test]
async fn malformed_multipart_requests_are_refused_clearly() {
    let app = spawn_app().await;
    let form = reqwest::multipart::Form::new().text("name", "only a name");
    let resp = app.client.post(app.url("/datasets")).multipart(form).send().await.unwrap();
    assert_error(resp, 422, "missing_file").await;

    let form = reqwest::multipart::Form::new().text("colour", "blue");
    let resp = app.client.post(app.url("/datasets")).multipart(form).send().await.unwrap();
    assert_error(resp, 422, "unknown_field").await;

    let resp = app.post_dataset("x.zip", fixtures::zip(&class_images("", &["cat", "dog"], 1, 0)), Some("   ")).await;
    assert_error(resp, 422, "invalid_name").await;
    assert!(app.scratch_files().is_empty());
    assert_eq!(json(app.get("/datasets").await).await, json!([]));
}

#[tokio::test]
async fn datasets_survive_a_restart() {
    let app = spawn_app().await;
    let a = upload_ok(&app, "a.zip", fixtures::zip(&class_images("", &["cat", "dog"], 2, 0))).await;
    let b = upload_ok(&app, "b.tgz", fixtures::tar_gz(&class_images("train/", &["x", "y"], 1, 50))).await;
    let blobs = app.blobs();
    let tmp = app.stop().await.expect("temporary data folder");

    let app = spawn_with(test_config(tmp.path())).await;
    let list = json(app.get("/datasets").await).await;
    assert_eq!(list, json!([b, a]));
    for ds in [&a, &b] {
        let fetched = json(app.get(&format!("/datasets/{}", ds["id"].as_str().unwrap())).await).await;
        assert_eq!(&fetched, ds);
    }
    assert_eq!(app.blobs(), blobs);
}

#[tokio::test]
async fn the_list_is_newest_first() {
    let app = spawn_app().await;
    assert_eq!(json(app.get("/datasets").await).await, json!([]));
    let mut ids = Vec::new();
    for i in 0..3 {
        let ds = upload_ok(&app, &format!("{i}.zip"), fixtures::zip(&class_images("", &["a", "b"], 1, i * 10))).await;
        ids.push(ds["id"].clone());
    }
    let list = json(app.get("/datasets").await).await;
    let listed: Vec<Value> = list.as_array().unwrap().iter().map(|d| d["id"].clone()).collect();
    ids.reverse();
    assert_eq!(listed, ids);
}

#[tokio::test]
async fn delete_removes_orphan_blobs_and_keeps_shared_ones() {
    let app = spawn_app().await;
    let (j1, j2, j3, j4) = (fixtures::jpeg(1), fixtures::jpeg(2), fixtures::jpeg(3), fixtures::jpeg(4));
    let a = upload_ok(
        &app,
        "a.zip",
        fixtures::zip(&[file("cat/1.jpg", j1.clone()), file("cat/2.jpg", j2.clone()), file("dog/3.jpg", j3.clone())]),
    )
    .await;
    // B shares j3 with A, under another class even.
    let b =
        upload_ok(&app, "b.zip", fixtures::zip(&[file("cat/3.jpg", j3.clone()), file("dog/4.jpg", j4.clone())])).await;
    let hash = |b: &[u8]| BlobStore::hash(b);
    assert_eq!(app.blobs().len(), 4);

    let a_path = format!("/datasets/{}", a["id"].as_str().unwrap());
    let resp = app.delete(&a_path).await;
    assert_eq!(resp.status(), 204);
    assert!(resp.text().await.unwrap().is_empty());
    let mut expected = vec![hash(&j3), hash(&j4)];
    expected.sort();
    assert_eq!(app.blobs(), expected);
    assert_error(app.get(&a_path).await, 404, "not_found").await;
    assert_error(app.delete(&a_path).await, 404, "not_found").await;

    let b_path = format!("/datasets/{}", b["id"].as_str().unwrap());
    assert_eq!(json(app.get(&b_path).await).await, b);
    let count: i64 = sqlx::query_scalar("select count(*) from dataset_images").fetch_one(&app.db).await.unwrap();
    assert_eq!(count, 2);
    assert_eq!(app.delete(&b_path).await.status(), 204);
    assert!(app.blobs().is_empty());
    assert_eq!(json(app.get("/datasets").await).await, json!([]));
}

/// Once its rows are gone the dataset is deleted: a blob that cannot be removed is logged (the
/// start-up sweep retries), not answered as a failure a retry could only meet with 404.
#[tokio::test]
async fn a_delete_whose_blobs_cannot_be_removed_still_succeeds() {
    let app = spawn_app().await;
    let image = fixtures::jpeg(7);
    let ds = upload_ok(&app, "a.zip", fixtures::zip(&[file("cat/1.jpg", image.clone()), file("dog/2.jpg", fixtures::jpeg(8))])).await;
    // A blob that is a folder with something in it cannot be removed as a file.
    let stuck = app.data_dir.join("blobs").join(BlobStore::hash(&image));
    std::fs::remove_file(&stuck).unwrap();
    std::fs::create_dir_all(stuck.join("inside")).unwrap();
    let path = format!("/datasets/{}", ds["id"].as_str().unwrap());
    assert_eq!(app.delete(&path).await.status(), 204);
    assert_error(app.get(&path).await, 404, "not_found").await;
    assert_eq!(app.blobs(), vec![BlobStore::hash(&image)], "the other blob went");
}

#[tokio::test]
async fn an_unknown_dataset_is_404() {
    let app = spawn_app().await;
    let message = assert_error(app.get("/datasets/nope").await, 404, "not_found").await;
    assert!(message.contains("nope"), "{message}");
    assert_error(app.delete("/datasets/nope").await, 404, "not_found").await;
}

#[tokio::test]
async fn delete_is_refused_while_a_queued_or_running_job_uses_the_dataset() {
    // No device, so no worker: the job inserted below stays as the test sets it (a worker would
    // claim it, and on PostgreSQL it is woken at once by the insert's notification).
    let app = spawn_app_with(|c| c.device = vec![]).await;
    let ds = upload_ok(&app, "a.zip", fixtures::zip(&class_images("", &["cat", "dog"], 1, 0))).await;
    let id = ds["id"].as_str().unwrap();
    sqlx::query(
        "insert into jobs (id, dataset_id, base_model, params, recipe, status, epochs, created_at) \
         values ('job-1', $1, 'google/vit-base-patch16-224', '{}', 'default', 'queued', 3, '2026-01-01T00:00:00.000Z')",
    )
    .bind(id)
    .execute(&app.db)
    .await
    .unwrap();
    let path = format!("/datasets/{id}");
    let message = assert_error(app.delete(&path).await, 409, "dataset_in_use").await;
    assert!(message.contains("job-1"), "{message}");

    sqlx::query("update jobs set status = 'running'").execute(&app.db).await.unwrap();
    assert_error(app.delete(&path).await, 409, "dataset_in_use").await;
    assert_eq!(app.get(&path).await.status(), 200);
    assert_eq!(app.blobs().len(), 2);

    sqlx::query("update jobs set status = 'succeeded'").execute(&app.db).await.unwrap();
    assert_eq!(app.delete(&path).await.status(), 204);
    assert!(app.blobs().is_empty());
}

#[tokio::test]
async fn unsupported_methods_on_dataset_routes_are_405() {
    let app = spawn_app().await;
    let resp = app.client.put(app.url("/datasets")).send().await.unwrap();
    assert_error(resp, 405, "method_not_allowed").await;
    let resp = app.client.post(app.url("/datasets/some-id")).send().await.unwrap();
    assert_error(resp, 405, "method_not_allowed").await;
}

/// What a crash can leave besides blobs goes at the next start: upload scratch, a model folder
/// no model row names, the checkpoint folder of a job the database does not hold as unfinished,
/// a thumbnail of an image no dataset has, one made the old way (named `<hash>.jpg`, before the
/// EXIF orientation was applied). What is still needed stays.
#[tokio::test]
async fn leftovers_of_a_crash_are_removed_at_start_up() {
    let app = spawn_app().await;
    let dataset = upload_ok(&app, "a.zip", fixtures::zip(&class_images("", &["cat", "dog"], 1, 0))).await;
    let dataset = dataset["id"].as_str().unwrap().to_string();
    let kept = app.blobs();
    let blob = kept[0].clone();
    let resp = app.get(&format!("/datasets/{dataset}/images/{blob}/thumbnail")).await;
    assert_eq!(resp.status(), 200);
    let root = app.data_dir.clone();
    let kept_thumbnail = root.join("thumbnails").join(format!("{blob}.v2.jpg"));
    assert!(kept_thumbnail.exists(), "the thumbnail is cached");
    let tmp = app.stop().await.expect("temporary data folder");
    let planted = [
        root.join("tmp/upload-123"),
        root.join("tmp/half-unpacked/x.jpg"),
        root.join("models/never-registered/config.json"),
        root.join("jobs/no-such-job/epoch-1/model.safetensors"),
        root.join(format!("thumbnails/{}.v2.jpg", "0".repeat(64))),
        root.join(format!("thumbnails/{blob}.jpg")),
    ];
    for path in &planted {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"left by a crash").unwrap();
    }
    let app = spawn_with(test_config(tmp.path())).await;
    for path in &planted {
        assert!(!path.exists(), "{} was removed", path.display());
    }
    for dir in ["tmp/half-unpacked", "models/never-registered", "jobs/no-such-job"] {
        assert!(!root.join(dir).exists(), "{dir} was removed");
    }
    assert!(kept_thumbnail.exists(), "a thumbnail of a kept image stays");
    assert_eq!(app.blobs(), kept);
    assert_eq!(json(app.get(&format!("/datasets/{dataset}")).await).await["num_images"], 2);
}

/// `--sweep-secs`: a blob no dataset references goes at the next periodic sweep, without a
/// restart, and referenced ones stay; with the sweep off (0) it stays.
#[tokio::test]
async fn unreferenced_blobs_are_swept_periodically_unless_off() {
    for sweep_secs in [1, 0] {
        let app = spawn_app_with(|c| c.sweep_secs = sweep_secs).await;
        upload_ok(&app, "a.zip", fixtures::zip(&class_images("", &["cat", "dog"], 1, 0))).await;
        let kept = app.blobs();
        // What an upload interrupted between its blob writes and its insert leaves behind.
        let orphan = BlobStore::open(app.data_dir.join("blobs")).unwrap().put(b"orphan").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(if sweep_secs > 0 { 15 } else { 3 });
        while app.blobs().contains(&orphan) && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        if sweep_secs > 0 {
            assert!(!app.blobs().contains(&orphan), "swept within 15 s");
            assert_eq!(app.blobs(), kept);
        } else {
            assert!(app.blobs().contains(&orphan), "no sweep when it is off");
        }
        assert_eq!(json(app.get("/datasets").await).await.as_array().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn unreferenced_blobs_are_swept_at_start_up() {
    let app = spawn_app().await;
    upload_ok(&app, "a.zip", fixtures::zip(&class_images("", &["cat", "dog"], 1, 0))).await;
    let kept = app.blobs();
    let tmp = app.stop().await.expect("temporary data folder");
    // What an upload interrupted between its blob writes and its insert leaves behind.
    let orphan = BlobStore::open(tmp.path().join("blobs")).unwrap().put(b"orphan").unwrap();
    let app = spawn_with(test_config(tmp.path())).await;
    assert!(!app.blobs().contains(&orphan));
    assert_eq!(app.blobs(), kept);
}

/// A client that goes away while its upload is being unpacked: the request is dropped, the ingest
/// stops at its next entry, and the images stored by then are removed as a failed upload's are.
#[tokio::test]
async fn an_upload_whose_client_goes_away_mid_ingest_leaves_no_blobs() {
    let app = spawn_app().await;
    let archive = fixtures::zip(&class_images("", &["cat", "dog"], 1500, 0));
    let (client, url) = (app.client.clone(), app.url("/datasets"));
    let request = tokio::spawn(async move {
        let part = reqwest::multipart::Part::bytes(archive).file_name("big.zip");
        client.post(url).multipart(reqwest::multipart::Form::new().part("file", part)).send().await
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while app.blobs().is_empty() {
        assert!(!request.is_finished(), "the upload ended before it could be cut short");
        assert!(std::time::Instant::now() < deadline, "no image was stored");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    request.abort();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !app.blobs().is_empty() || !app.scratch_files().is_empty() {
        assert!(std::time::Instant::now() < deadline, "left behind: {} blobs, {:?}", app.blobs().len(), app.scratch_files());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(json(app.get("/datasets").await).await, json!([]));
    // The service goes on: the next upload is stored.
    upload_ok(&app, "ok.zip", fixtures::zip(&class_images("", &["cat", "dog"], 1, 0))).await;
}
