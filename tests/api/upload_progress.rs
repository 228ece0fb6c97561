//! An upload's progress as Server-Sent Events (`Accept: text/event-stream` on `POST /datasets`
//! and `POST /datasets/{id}/extend`): the stages and counts while it is checked, then the dataset
//! or the error the plain request would get; refusals before the stream starts keep their
//! status; a client that goes away mid-stream stops the upload, as one that drops its request.

use std::time::{Duration, Instant};

use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::fixtures::{self, HfRow, class_images, file};
use crate::helpers::{TestApp, assert_error, json, spawn_app, sse_events};

/// A request uploading `bytes` as `file_name` to `path`, asking for events.
fn streamed(app: &TestApp, path: &str, file_name: &str, bytes: Vec<u8>) -> reqwest::RequestBuilder {
    let form = Form::new().part("file", Part::bytes(bytes).file_name(file_name.to_string()));
    app.client.post(app.url(path)).header("accept", "text/event-stream").multipart(form)
}

async fn stream_of(app: &TestApp, path: &str, file_name: &str, bytes: Vec<u8>) -> Vec<(String, Value)> {
    sse_events(streamed(app, path, file_name, bytes).send().await.expect("request")).await
}

/// The order of the stages an upload goes through.
fn stage_rank(event: &Value) -> usize {
    let stages = ["waiting", "listing", "checking", "comparing", "storing"];
    let stage = event["stage"].as_str().unwrap_or_else(|| panic!("no stage: {event}"));
    stages.iter().position(|s| *s == stage).unwrap_or_else(|| panic!("unknown stage: {event}"))
}

/// The progress events of a stream, checked to come first, in order of stage and count, each
/// with at most as many entries checked as the upload has; and its last event.
fn progress_and_last(events: &[(String, Value)]) -> (Vec<&Value>, &(String, Value)) {
    let (last, before) = events.split_last().expect("events");
    let progress: Vec<&Value> = before.iter().map(|(e, v)| if e == "progress" { v } else { panic!("{e} before the end: {v}") }).collect();
    for pair in progress.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert!(stage_rank(a) <= stage_rank(b), "stages out of order: {a} then {b}");
        if a["stage"] == "checking" && b["stage"] == "checking" {
            assert!(a["checked"].as_u64() < b["checked"].as_u64(), "no news: {a} then {b}");
        }
    }
    for p in progress.iter().filter(|p| p["stage"] != "listing") {
        assert!(p["checked"].as_u64().unwrap() <= p["entries"].as_u64().unwrap(), "{p}");
    }
    (progress, last)
}

#[tokio::test]
async fn an_upload_asking_for_events_gets_its_progress_then_the_dataset() {
    let app = spawn_app().await;
    // 3,000 images and 2 folders: long enough to be reported while it is checked.
    let members = class_images("", &["cat", "dog"], 1500, 0);
    let started = Instant::now();
    let events = stream_of(&app, "/datasets", "pets.zip", fixtures::zip(&members)).await;
    let took = started.elapsed();
    let (progress, (last, dataset)) = progress_and_last(&events);
    assert_eq!(last, "dataset", "{events:?}");
    assert_eq!(dataset["num_images"], 3000);
    assert_eq!(&json(app.get(&format!("/datasets/{}", dataset["id"].as_str().unwrap())).await).await, dataset);
    // The last progress, sent before the end, has every entry checked.
    assert_eq!(progress.last().copied(), Some(&json!({"stage": "storing", "entries": 3000, "checked": 3000})), "{progress:?}");
    // On the way: the check, part done, reported while it ran (every quarter second at most).
    let midway: Vec<_> = progress.iter().filter(|p| p["stage"] == "checking" && p["checked"].as_u64() < Some(3000)).collect();
    assert!(!midway.is_empty() || took < Duration::from_millis(500), "nothing reported during {took:?}: {progress:?}");
    assert!(progress.len() as u128 <= took.as_millis() / 250 + 2, "{} events in {took:?}", progress.len());

    // A Parquet file's rows are counted from its metadata before they are checked.
    let rows: Vec<HfRow> = (0..3000).map(|i| HfRow::new(fixtures::jpeg(i), &format!("{i}.jpg"), i64::from(i % 2))).collect();
    let events = stream_of(&app, "/datasets", "pets.parquet", fixtures::hf_parquet(&rows, "label", Some(&["cat", "dog"]), 500)).await;
    let (progress, (last, _)) = progress_and_last(&events);
    assert_eq!(last, "dataset", "{events:?}");
    assert!(progress.iter().all(|p| p["entries"] == 3000), "{progress:?}");
    assert!(progress.iter().any(|p| p["stage"] == "checking" && p["checked"].as_u64() < Some(3000)), "{progress:?}");

    // A tar is listed first (its stream read through); an extension reports the same way.
    // (A picture of another size: every 32-pixel one repeats one of the 1,500 cats.)
    let new_cat = fixtures::image(image::ImageFormat::Jpeg, 40, 1);
    let members = vec![file("cat/new.jpg", new_cat), file("cat/0.jpg", fixtures::jpeg(0)), file("bird/0.jpg", fixtures::jpeg(2))];
    let path = format!("/datasets/{}/extend", dataset["id"].as_str().unwrap());
    let events = stream_of(&app, &path, "more.tar", fixtures::tar(&members)).await;
    let (progress, (last, extended)) = progress_and_last(&events);
    assert_eq!(last, "dataset", "{events:?}");
    assert_eq!(extended["source"]["added"], 2);
    assert_eq!(progress.last().copied(), Some(&json!({"stage": "storing", "entries": 3, "checked": 3})));

    // Without the header, or with a wildcard, the answer is the plain 201.
    let form = || Form::new().part("file", Part::bytes(fixtures::zip(&class_images("", &["a", "b"], 1, 7))).file_name("ab.zip"));
    for accept in [None, Some("*/*"), Some("application/json")] {
        let mut request = app.client.post(app.url("/datasets")).multipart(form());
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        let resp = request.send().await.unwrap();
        assert_eq!(resp.status(), 201, "{accept:?}");
        assert!(json(resp).await["id"].is_string());
    }
}

#[tokio::test]
async fn an_upload_refused_while_it_is_checked_ends_its_stream_with_the_error() {
    let app = spawn_app().await;
    let error_of = |events: &[(String, Value)]| {
        let (progress, (last, error)) = progress_and_last(events);
        assert_eq!(last, "error", "{events:?}");
        (progress.last().map(|p| (*p).clone()), error.clone())
    };

    // No image at all: refused once its two entries were checked.
    let members = [file("cat/notes.txt", b"text".to_vec()), file("dog/notes.txt", b"more text".to_vec())];
    let events = stream_of(&app, "/datasets", "notes.zip", fixtures::zip(&members)).await;
    let (last_progress, error) = error_of(&events);
    assert_eq!(last_progress, Some(json!({"stage": "checking", "entries": 2, "checked": 2})), "{events:?}");
    assert_eq!(error["status"], 422);
    assert_eq!(error["error"]["code"], "no_images");
    assert!(error["error"]["message"].as_str().unwrap().contains("notes.txt"), "{error}");

    // Not an archive; a damaged zip: the statuses of the plain request.
    let (_, error) = error_of(&stream_of(&app, "/datasets", "x.zip", b"just some text, no archive".to_vec()).await);
    assert_eq!((error["status"].clone(), error["error"]["code"].clone()), (json!(415), json!("unsupported_format")));
    let mut damaged = fixtures::zip(&class_images("", &["cat", "dog"], 2, 0));
    let cut = damaged.len() - 30;
    damaged.truncate(cut);
    let (_, error) = error_of(&stream_of(&app, "/datasets", "x.zip", damaged).await);
    assert_eq!((error["status"].clone(), error["error"]["code"].clone()), (json!(400), json!("corrupt_archive")));

    // One of two classes without a usable image, its bad picture stored first: nothing is kept.
    let members = vec![file("cat/0.jpg", fixtures::jpeg(1)), file("dog/0.jpg", fixtures::corrupt_jpeg())];
    let (_, error) = error_of(&stream_of(&app, "/datasets", "x.zip", fixtures::zip(&members)).await);
    assert_eq!(error["error"]["code"], "empty_class", "{error}");
    assert_eq!(json(app.get("/datasets").await).await, json!([]));
    assert!(app.blobs().is_empty(), "{:?}", app.blobs());
    assert!(app.scratch_files().is_empty(), "{:?}", app.scratch_files());

    // An extension with nothing new.
    let pets = fixtures::zip(&class_images("", &["cat", "dog"], 2, 0));
    let resp = app.post_dataset("pets.zip", pets.clone(), None).await;
    assert_eq!(resp.status(), 201);
    let id = json(resp).await["id"].as_str().unwrap().to_string();
    let (last_progress, error) = error_of(&stream_of(&app, &format!("/datasets/{id}/extend"), "pets.zip", pets).await);
    assert_eq!((error["status"].clone(), error["error"]["code"].clone()), (json!(422), json!("no_new_images")));
    assert_eq!(last_progress.unwrap()["stage"], "comparing");

    // Refused before the stream starts: the plain status and body.
    let resp = streamed(&app, "/datasets/nope/extend", "x.zip", fixtures::zip(&class_images("", &["cat"], 1, 0))).send().await.unwrap();
    assert_error(resp, 404, "not_found").await;
    let no_file = app.client.post(app.url("/datasets")).header("accept", "text/event-stream").multipart(Form::new().text("name", "x"));
    assert_error(no_file.send().await.unwrap(), 422, "missing_file").await;
    assert_eq!(app.blobs().len(), 4);
}

/// A client that closes the stream mid-check: the upload stops and its blobs go, as when a
/// client drops a plain upload.
#[tokio::test]
async fn closing_an_uploads_stream_stops_it_and_removes_its_blobs() {
    use futures::StreamExt;

    let app = spawn_app().await;
    let archive = fixtures::zip(&class_images("", &["cat", "dog"], 1500, 0));
    let resp = streamed(&app, "/datasets", "big.zip", archive).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !text.contains("\"stage\":\"checking\"") {
        assert!(Instant::now() < deadline, "no progress while checking: {text}");
        let chunk = tokio::time::timeout(Duration::from_secs(60), body.next()).await.expect("an event").expect("more of the stream").unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
        assert!(!text.contains("event: dataset"), "the upload ended before it could be cut short");
    }
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !app.blobs().is_empty() || !app.scratch_files().is_empty() {
        assert!(Instant::now() < deadline, "left behind: {} blobs, {:?}", app.blobs().len(), app.scratch_files());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(json(app.get("/datasets").await).await, json!([]));
}
