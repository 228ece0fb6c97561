//! Base models from the Hugging Face hub, against a stand-in for it (`support::hub::FakeHub`,
//! reached through `HF_ENDPOINT`) in a `vitforge serve` child process, whose environment (the hub's
//! address and cache) is its own.

use std::time::Duration;

use serde_json::{Value, json};

use crate::cluster::wait_for;
use crate::fixtures::{class_images, zip};
use crate::support::hub::FakeHub;
use crate::support::{ChildServer, Launch, slow_config};

/// A job on a hub model that is not cached downloads its weights into the hub cache, and its
/// `loading` phase follows the download in bytes (live events, with the file's size as the total);
/// a second job on the same model downloads nothing.
#[tokio::test]
async fn a_job_on_a_hub_model_shows_its_download_and_the_next_one_uses_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let Served { hub, app, request, size } = serve_a_hub_model(tmp.path(), 8, Duration::from_millis(250), &[]).await;
    assert!(size > 8 * (64 << 10), "the weights are large enough for progress in between: {size} bytes");
    let submit = || app.post_json("/jobs", &request);

    let job = submit().await;
    let id = job["id"].as_str().unwrap();
    let mut stream = app.client.get(app.url(&format!("/jobs/{id}/events"))).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let mut body = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(120), stream.chunk()).await.expect("the stream ends").unwrap() {
        body.extend_from_slice(&chunk);
    }
    let events: Vec<Value> = String::from_utf8(body)
        .unwrap()
        .split("\n\n")
        .filter(|block| block.lines().any(|l| l == "event: progress"))
        .filter_map(|block| serde_json::from_str::<Value>(block.lines().find_map(|l| l.strip_prefix("data: "))?).ok())
        .filter(|p| p["phase"] == "loading" && p["total"].as_u64() > Some(1))
        .collect();
    let loading: Vec<(u64, u64)> = events.iter().map(|p| (p["done"].as_u64().unwrap(), p["total"].as_u64().unwrap())).collect();
    assert!(events.iter().any(|p| p["rate"].as_f64().is_some_and(|r| r > 0.0)), "a rate in bytes per second: {events:?}");
    assert!(loading.iter().all(|&(_, total)| total == size), "the total is the weights' size: {loading:?}");
    assert!(loading.iter().any(|&(done, _)| done > 0 && done < size), "progress while it downloads: {loading:?}");
    assert_eq!(loading.last(), Some(&(size, size)), "{loading:?}");
    assert!(loading.windows(2).all(|w| w[0].0 <= w[1].0), "{loading:?}");
    let done = wait_for(&app, id, 60, "the job ending", |j| j["status"] != "running" && j["status"] != "queued").await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(hub.requests_for("model.safetensors"), ["model.safetensors 0-0", "model.safetensors 0-"]);

    let again = submit().await;
    let done = wait_for(&app, again["id"].as_str().unwrap(), 60, "the second job ending", |j| j["status"] != "running" && j["status"] != "queued").await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(hub.requests_for("model.safetensors").len(), 2, "the second job downloads nothing");
}

/// A cancel during a hub download stops it there, rather than once the whole file is in: the
/// job is cancelled while the cache holds only the partial file. The next job on the model
/// resumes the download from where the first stopped (a range from that byte), and succeeds.
#[tokio::test]
async fn a_cancel_stops_a_hub_download_and_the_next_job_resumes_it() {
    let tmp = tempfile::tempdir().unwrap();
    // 30 pieces 200 ms apart: six seconds for the whole file.
    let Served { hub, app, request, size } = serve_a_hub_model(tmp.path(), 30, Duration::from_millis(200), &[]).await;
    let hf = tmp.path().join("hf");

    let job = app.post_json("/jobs", &request).await;
    cancel_mid_download(&app, job["id"].as_str().unwrap(), size).await;
    // Files of the hub cache's blobs: (name, bytes).
    let blobs = || -> Vec<(String, u64)> {
        let dir = hf.join("hub/models--acme--tiny-vit/blobs");
        std::fs::read_dir(&dir).map_or(vec![], |entries| {
            entries.flatten().map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len())).collect()
        })
    };
    let now = blobs();
    let partial: Vec<u64> = now.iter().filter(|(name, _)| name.ends_with(".part")).map(|&(_, len)| len).collect();
    assert!(!now.iter().any(|&(ref name, len)| len == size && !name.ends_with(".part")), "the whole file never came in: {now:?}");
    let [kept] = partial[..] else { panic!("one partial file in the cache: {now:?}") };
    assert!(kept > 0 && kept < size, "{kept} of {size} bytes");

    let again = app.post_json("/jobs", &request).await;
    let done = wait_for(&app, again["id"].as_str().unwrap(), 60, "the second job ending", |j| j["status"] != "running" && j["status"] != "queued").await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let requests = hub.requests_for("model.safetensors");
    // The download's thread may take one more piece before it sees the stop.
    let from = requests.last().and_then(|r| FakeHub::range_start(r)).unwrap_or(0);
    assert!(kept <= from && from < size, "resumed from the partial file's end ({kept} bytes or a piece more): {requests:?}");
    assert!(blobs().iter().any(|&(ref name, len)| len == size && !name.ends_with(".part")), "{:?}", blobs());
}

/// A cancel stops a download whose connection stalls (the bytes stop coming, the connection
/// stays open, and hf-hub sets no timeout on it) without waiting for it to move again.
#[tokio::test]
async fn a_cancel_stops_a_stalled_hub_download() {
    let tmp = tempfile::tempdir().unwrap();
    // Half the weights, then nothing for ten minutes.
    let Served { app, request, size, .. } = serve_a_hub_model(tmp.path(), 2, Duration::from_secs(600), &[]).await;
    let job = app.post_json("/jobs", &request).await;
    cancel_mid_download(&app, job["id"].as_str().unwrap(), size).await;
}

/// A download from which nothing comes for `HF_HUB_DOWNLOAD_TIMEOUT` (its connection stalled and
/// stays open) is given up: the job fails saying so, rather than holding the worker for as long
/// as the connection lasts, and the worker goes on to the next job. That one, on the same model,
/// finds the stalled download still holding the file's lock, and fails saying that, in time too.
#[tokio::test]
async fn a_stalled_hub_download_is_given_up_and_the_worker_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    // Half the weights, then nothing for ten minutes. 10 s is the shortest timeout taken.
    let Served { app, request, size, .. } = serve_a_hub_model(tmp.path(), 2, Duration::from_secs(600), &[("HF_HUB_DOWNLOAD_TIMEOUT", "2")]).await;
    let ended = |j: &Value| j["status"] != "running" && j["status"] != "queued";
    let first = app.post_json("/jobs", &request).await;
    let second = app.post_json("/jobs", &request).await;
    let started = std::time::Instant::now();
    let failed = wait_for(&app, first["id"].as_str().unwrap(), 60, "the stalled job ending", ended).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("nothing came from the Hugging Face hub for 10 s (HF_HUB_DOWNLOAD_TIMEOUT)"), "{error}");
    assert!(error.contains(&format!("of {size} bytes of its weights")) && error.contains("acme/tiny-vit"), "{error}");
    let failed = wait_for(&app, second["id"].as_str().unwrap(), 60, "the next job ending", ended).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("another download of model.safetensors holds its lock") && error.contains("received nothing for 10 s"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(100), "both ended in {:?}", started.elapsed());
}

/// `--max-job-memory` judges a job on a hub model when it is submitted once the model is in the
/// hub cache; before that, the job is queued and judged when claimed, after the download.
#[tokio::test]
async fn a_hub_model_in_the_cache_is_judged_for_memory_when_the_job_is_submitted() {
    let tmp = tempfile::tempdir().unwrap();
    // About 4 MiB for a step of 4 images, about 8 for one of the 10 the hold-out leaves.
    let Served { app, request, .. } = serve_a_hub_model(tmp.path(), 1, Duration::ZERO, &[("VITFORGE_MAX_JOB_MEMORY", "6291456")]).await;
    let ended = |j: &Value| j["status"] != "running" && j["status"] != "queued";
    let mut too_large = request.clone();
    too_large["params"]["batch_size"] = json!(64);
    // Not cached: queued, and refused by the worker after the download.
    let queued = app.post_json("/jobs", &too_large).await;
    let failed = wait_for(&app, queued["id"].as_str().unwrap(), 120, "the job ending", ended).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("batches of 10 images, f32), more than the 6 MiB of --max-job-memory"), "{failed}");
    // Cached now: refused at once with the same reason, and one that fits trains.
    let resp = app.client.post(app.url("/jobs")).json(&too_large).send().await.unwrap();
    assert_eq!(resp.status(), 422);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "job_too_large", "{body}");
    assert_eq!(body["error"]["message"], failed["error"], "the worker's reason");
    let fits = app.post_json("/jobs", &request).await;
    let done = wait_for(&app, fits["id"].as_str().unwrap(), 120, "the job ending", ended).await;
    assert_eq!(done["status"], "succeeded", "{done}");
}

/// Waits until job `id` has received part of its model's weights (`size` bytes), cancels it, and
/// checks that it ends cancelled within a minute.
async fn cancel_mid_download(app: &ChildServer, id: &str, size: u64) {
    let started = |j: &Value| j["progress"]["phase"] == "loading" && j["progress"]["total"] == size && j["progress"]["done"].as_u64() > Some(0);
    let downloading = wait_for(app, id, 60, "the download under way", |j| started(j) || j["status"] != "running" && j["status"] != "queued").await;
    assert!(started(&downloading), "{downloading}");
    let resp = app.client.post(app.url(&format!("/jobs/{id}/cancel"))).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    let cancelled = wait_for(app, id, 60, "the cancel", |j| j["status"] != "running").await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
}

/// What [`serve_a_hub_model`] started.
struct Served {
    hub: FakeHub,
    app: ChildServer,
    /// A job request on the hub model, for a dataset of cats and dogs.
    request: Value,
    /// Bytes of the model's weights.
    size: u64,
}

/// A random model (the larger test configuration) served by a stand-in hub as `acme/tiny-vit`,
/// weights in `pieces` parts `pause` apart; the service started on `root/data` with the hub cache
/// in `root/hf` (and the variables `env`), and a dataset uploaded.
async fn serve_a_hub_model(root: &std::path::Path, pieces: usize, pause: Duration, env: &[(&str, &str)]) -> Served {
    let repo = root.join("repo");
    let labels = ["cat".to_string(), "dog".to_string()];
    vitforge::model::LoadedModel::random(&slow_config(), &labels, 1, &candle_core::Device::Cpu).unwrap().save(&repo).unwrap();
    let size = std::fs::metadata(repo.join("model.safetensors")).unwrap().len();
    let hub = FakeHub::serve("acme/tiny-vit", &repo, pieces, pause);
    let mut vars = hub.env(&root.join("hf"));
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let app = Launch::new(&root.join("data")).envs(vars).start();
    let form = reqwest::multipart::Form::new()
        .part("file", reqwest::multipart::Part::bytes(zip(&class_images("", &["cat", "dog"], 6, 3))).file_name("pets.zip"));
    let resp = app.client.post(app.url("/datasets")).multipart(form).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    let dataset: Value = resp.json().await.unwrap();
    let request = json!({"dataset_id": dataset["id"], "base_model": "acme/tiny-vit", "params": {"epochs": 1, "batch_size": 4}});
    Served { hub, app, request, size }
}
