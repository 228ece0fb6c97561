//! Several `vitforge serve` processes on one database and data folder (`--role api` and
//! `--role worker`), run against whichever backend the suite runs on (SQLite by default,
//! PostgreSQL under `scripts/test-postgres.sh`): a worker SIGKILLed in the middle of a job loses
//! its lease, another worker finishes the job with each epoch's and step's metrics once, the model
//! is registered once, and the API process serves it without being told.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fixtures::{class_images, zip};
use crate::support::{ChildServer, Launch, install_base_model, slow_config};

/// How long a worker's lease holds in these tests: short, so a dead worker's job moves on soon.
const LEASE_SECS: &str = "3";

fn worker(data: &std::path::Path, name: &str) -> ChildServer {
    Launch::new(data).args(&["--role", "worker", "--worker-name", name, "--lease-secs", LEASE_SECS]).start()
}

/// Polls `GET /jobs/{id}` on `api` until `done` holds (at most `secs`).
pub(crate) async fn wait_for(api: &ChildServer, id: &str, secs: u64, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let job = api.get_json(&format!("/jobs/{id}")).await;
        if done(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "{what}: not within {secs} s; the job is {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_killed_workers_job_is_finished_by_another_worker_and_served_by_the_api_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    install_base_model(&data, "slow", &slow_config(), &["a", "b"]);
    // Every process starts before any work exists (start-up touches nothing shared: see startup.rs).
    let api = Launch::new(&data).args(&["--role", "api"]).start();
    let first = worker(&data, "worker-one");

    // A worker process answers only the probes and the metrics.
    let client = reqwest::Client::new();
    assert_eq!(client.get(first.url("/readyz")).send().await.unwrap().status(), 200);
    assert_eq!(client.get(first.url("/metrics")).send().await.unwrap().status(), 200);
    assert_eq!(client.get(first.url("/jobs")).send().await.unwrap().status(), 404);

    let form = reqwest::multipart::Form::new()
        .part("file", reqwest::multipart::Part::bytes(zip(&class_images("", &["cat", "dog"], 12, 3))).file_name("pets.zip"));
    let dataset: Value = client.post(api.url("/datasets")).multipart(form).send().await.unwrap().json().await.unwrap();
    let epochs = 4;
    let job = api.post_json("/jobs", &json!({"dataset_id": dataset["id"], "base_model": "slow", "params": {"epochs": epochs, "batch_size": 2}})).await;
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["worker"], Value::Null, "queued, nobody runs it yet");

    // The API process runs no job: only the worker claims it.
    let running = wait_for(&api, &id, 300, "the first worker reaching epoch 2", |j| {
        assert_ne!(j["status"], "succeeded", "the job finished before it could be killed; make it slower");
        j["progress"]["epoch"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    assert_eq!(running["worker"], "worker-one");
    // The API process streams the job's events though another process runs it.
    let events = tokio::spawn(read_events(client.clone(), api.url(&format!("/jobs/{id}/events"))));
    first.kill(); // SIGKILL: its lease is no longer renewed

    let killed_at = Instant::now();
    let second = worker(&data, "worker-two");
    let resumed = wait_for(&api, &id, 60, "the second worker taking the job", |j| j["worker"] == "worker-two").await;
    assert_eq!(resumed["status"], "running");
    let moved_after = killed_at.elapsed();
    assert!(moved_after < Duration::from_secs(30), "the job moved {moved_after:?} after the kill (lease 3 s)");

    let done = wait_for(&api, &id, 300, "the job finishing", |j| j["status"] != "running" && j["status"] != "queued").await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["worker"], "worker-two");
    let metrics = api.get_json(&format!("/jobs/{id}/metrics")).await;
    let epochs_seen: Vec<u64> = metrics["validation"].as_array().unwrap().iter().map(|v| v["epoch"].as_u64().unwrap()).collect();
    assert_eq!(epochs_seen, (1..=epochs).collect::<Vec<_>>(), "each epoch's metrics exactly once");
    let steps: Vec<u64> = metrics["train"].as_array().unwrap().iter().map(|p| p["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=done["progress"]["steps"].as_u64().unwrap()).collect::<Vec<_>>(), "each step exactly once");
    let models = api.get_json("/models").await;
    let of_job: Vec<&Value> = models.as_array().unwrap().iter().filter(|m| m["job_id"] == id.as_str()).collect();
    assert_eq!(of_job.len(), 1, "one model for the job: {models}");
    let events = tokio::time::timeout(Duration::from_secs(10), events).await.expect("the event stream ends with the job").unwrap();
    let metrics_events = events.matches("event: metrics").count();
    assert!(metrics_events >= epochs as usize - 1, "the epochs after the kill are streamed: {events}");
    let last = events.rsplit("event: ").next().unwrap();
    assert!(last.starts_with("status") && last.contains("\"succeeded\""), "the stream ends with the status: {last}");

    // The API process serves the new model: it was not told, it looked.
    let image = crate::fixtures::png(7);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = client.post(api.url("/predict")).header("content-type", "image/png").body(image.clone()).send().await.unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        if status == 200 && body["model_id"] == done["model_id"] {
            break;
        }
        assert!(Instant::now() < deadline, "the API process does not serve the new model: {status} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A cancel asked of the API process reaches the job in the worker process (with the lease's
    // renewal, every second here).
    let job = api.post_json("/jobs", &json!({"dataset_id": dataset["id"], "base_model": "slow", "params": {"epochs": 50, "batch_size": 2}})).await;
    let id = job["id"].as_str().unwrap().to_string();
    wait_for(&api, &id, 60, "the second job running", |j| j["status"] == "running").await;
    let resp = client.post(api.url(&format!("/jobs/{id}/cancel"))).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    let cancelled = wait_for(&api, &id, 30, "the cancel reaching the worker", |j| j["status"] != "running").await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    drop(second);
}

/// The whole body of an event stream, read until the server ends it.
async fn read_events(client: reqwest::Client, url: String) -> String {
    let mut resp = client.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).unwrap()
}

/// On PostgreSQL, queueing a job and registering a model notify the listeners (workers and API
/// processes wake at once instead of at their next poll). SQLite has no notifications: skipped.
#[tokio::test]
async fn postgres_notifies_queued_jobs_and_registered_models() {
    if crate::support::test_postgres().is_none() {
        eprintln!("skipped: SQLite has no LISTEN/NOTIFY (scripts/test-postgres.sh runs this)");
        return;
    }
    let app = crate::helpers::spawn_app().await;
    let (jobs_tx, mut jobs_rx) = tokio::sync::mpsc::unbounded_channel();
    let (models_tx, mut models_rx) = tokio::sync::mpsc::unbounded_channel();
    let (db1, db2) = (app.db.clone(), app.db.clone());
    let listeners = [
        tokio::spawn(async move { vitforge::db::listen(&db1, vitforge::db::JOBS_CHANNEL, || jobs_tx.send(()).unwrap()).await }),
        tokio::spawn(async move { vitforge::db::listen(&db2, vitforge::db::MODELS_CHANNEL, || models_tx.send(()).unwrap()).await }),
    ];
    // Each listener calls once when it starts listening.
    for rx in [&mut jobs_rx, &mut models_rx] {
        tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("listening").unwrap();
    }
    let dataset = app.upload_pets(4, false).await;
    let job = app.submit_job(&dataset, json!({"epochs": 1})).await;
    tokio::time::timeout(Duration::from_secs(5), jobs_rx.recv()).await.expect("a queued job is notified").unwrap();
    let done = app.wait_job(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    tokio::time::timeout(Duration::from_secs(5), models_rx.recv()).await.expect("a registered model is notified").unwrap();
    for l in listeners {
        l.abort();
    }
}

/// The database stopped under load and started again: `/readyz` answers 503 within its 2 s,
/// requests get 503 `database_unavailable` (never a 500, never past the request timeout), and the
/// service recovers by itself: ready again, its data intact, a job runs. Needs PostgreSQL
/// installed; runs under `scripts/test-postgres.sh` (with a server of its own).
#[tokio::test]
async fn the_database_stopped_and_restarted_under_load() {
    if crate::support::test_postgres().is_none() {
        eprintln!("skipped: runs under scripts/test-postgres.sh");
        return;
    }
    let pg = crate::support::PrivatePostgres::start().expect("PostgreSQL is installed (scripts/test-postgres.sh found it)");
    let url = pg.url();
    let app = crate::helpers::spawn_app_with(|c| {
        c.database_url = Some(url.parse().unwrap());
        c.request_timeout_secs = 15;
    })
    .await;
    let dataset = app.upload_pets(4, false).await;

    // Load: reads of the dataset, each answer's status and time kept.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (client, target, stop) = (app.client.clone(), app.url(&format!("/datasets/{dataset}")), stop.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let started = Instant::now();
                let status = client.get(&target).send().await.unwrap().status().as_u16();
                seen.push((status, started.elapsed()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.down();

    let started = Instant::now();
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(4), "readyz took {:?}", started.elapsed());
    let started = Instant::now();
    let message = crate::helpers::assert_error(app.get("/datasets").await, 503, "database_unavailable").await;
    assert!(started.elapsed() < Duration::from_secs(15), "a request waited {:?}", started.elapsed());
    assert!(message.contains("database"), "{message}");

    pg.up();
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.get("/readyz").await.status() != 200 {
        assert!(Instant::now() < deadline, "not ready again 30 s after the database returned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = load.await.unwrap();
    assert!(seen.iter().any(|(s, _)| *s == 503), "the load saw the outage: {seen:?}");
    assert!(seen.iter().all(|(s, _)| matches!(s, 200 | 503)), "only 200 and 503: {seen:?}");
    assert!(seen.iter().all(|(_, t)| *t < Duration::from_secs(15)), "none past the request timeout: {seen:?}");

    let resp = app.get(&format!("/datasets/{dataset}")).await;
    assert_eq!(resp.status(), 200, "the data is intact");
    let job = app.submit_job(&dataset, json!({"epochs": 1})).await;
    let done = app.wait_job(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
}

/// The periodic blob sweep of a process of several (`--sweep-secs`) runs only when no process
/// has an upload in flight (PostgreSQL's advisory lock, held shared by uploads, taken exclusively
/// with a try), then removes what no dataset references. On SQLite such a process never sweeps.
#[tokio::test]
async fn periodic_blob_sweep_of_a_process_of_several_waits_for_uploads_elsewhere() {
    let postgres = crate::support::test_postgres().is_some();
    let app = crate::helpers::spawn_app_with(|c| {
        c.role = vitforge::config::Role::Api;
        c.sweep_secs = 1;
    })
    .await;
    app.upload_pets(1, false).await;
    let kept = app.blobs();
    let orphan = vitforge::dataset::BlobStore::open(app.data_dir.join("blobs")).unwrap().put(b"orphan").unwrap();
    let upload_elsewhere = if postgres { vitforge::db::blob_lock(&app.db, false, true).await.unwrap() } else { None };
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(app.blobs().contains(&orphan), "no sweep under an upload elsewhere, nor on SQLite");
    if !postgres {
        return;
    }
    drop(upload_elsewhere);
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.blobs().contains(&orphan) {
        assert!(Instant::now() < deadline, "swept once the upload ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.blobs(), kept);
}

/// Blob collection after a dataset delete waits for uploads in other processes (which hold
/// PostgreSQL's advisory lock shared), then removes what no dataset references. On SQLite an API
/// process of several leaves them to the next `--role all` start-up sweep: skipped there.
#[tokio::test]
async fn blob_collection_waits_for_uploads_in_other_processes() {
    if crate::support::test_postgres().is_none() {
        eprintln!("skipped: the lock across processes is PostgreSQL's (scripts/test-postgres.sh runs this)");
        return;
    }
    let app = crate::helpers::spawn_app_with(|c| c.role = vitforge::config::Role::Api).await;
    let dataset = app.upload_pets(3, false).await;
    assert_eq!(app.blobs().len(), 6);

    // The lock: shared holders exclude an exclusive one and the other way round.
    let upload_elsewhere = vitforge::db::blob_lock(&app.db, false, true).await.unwrap().expect("shared");
    assert!(vitforge::db::blob_lock(&app.db, true, false).await.unwrap().is_none(), "no exclusive while shared");
    assert!(vitforge::db::blob_lock(&app.db, false, false).await.unwrap().is_some(), "shared with shared");

    // Another process's upload is in flight: the delete answers at once, collection waits.
    assert_eq!(app.delete(&format!("/datasets/{dataset}")).await.status(), 204);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(app.blobs().len(), 6, "nothing removed under an upload in flight elsewhere");
    drop(upload_elsewhere);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !app.blobs().is_empty() {
        assert!(Instant::now() < deadline, "collected once the upload ended: {:?}", app.blobs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exclusive = vitforge::db::blob_lock(&app.db, true, false).await.unwrap();
    assert!(exclusive.is_some(), "free again");
    assert!(vitforge::db::blob_lock(&app.db, false, false).await.unwrap().is_none(), "no shared while exclusive");
}
