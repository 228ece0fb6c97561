//! Crash test, ignored by default because it runs for minutes:
//!
//! ```sh
//! cargo test --test api -- --ignored --nocapture sigkill
//! VITFORGE_CRASH_KILLS=200 VITFORGE_CRASH_SEED=7 cargo test --test api -- --ignored --nocapture sigkill
//! ```
//!
//! A real `vitforge` process is killed with SIGKILL again and again, at random points of four
//! kinds: while a dataset upload is streamed or ingested, during a training epoch, while an
//! epoch checkpoint is being written (its temporary folder exists), and while a fine-tuned model
//! is being registered (its folder is being copied, or is in place but not yet in the database).
//! After every kill the database is checked with `PRAGMA integrity_check` before the restart;
//! after every restart the service must serve only complete things: every dataset with all its
//! images (blobs present, contents matching their hashes), every model with its three files and
//! answering `/predict`, no temporary folder or scratch file left. At the end every job must have
//! succeeded (or failed with a reason), with each training step and each epoch's evaluation
//! recorded exactly once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sha2::Digest;

use crate::fixtures::{class_images, zip};
use crate::support::{ChildServer, Launch, install_base_model, slow_config};

type Server = ChildServer;

/// A base model slow enough that an epoch is long compared with the polling.
fn install_slow_base_model(data: &Path) {
    install_base_model(data, "slow", &slow_config(), &["a", "b"]);
}

fn upload_form(bytes: Vec<u8>) -> reqwest::multipart::Form {
    reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(bytes).file_name("pets.zip"))
}

/// Entries of `dir` whose name starts with a dot (temporary or old folders of atomic writes).
fn dot_entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.')).collect())
        .unwrap_or_default()
}

/// The hidden entries of a job's folder and of its claims' folders, where its checkpoints are.
fn job_dot_entries(job_dir: &Path) -> Vec<PathBuf> {
    let mut found = dot_entries(job_dir);
    for claim in std::fs::read_dir(job_dir).into_iter().flatten().flatten() {
        if claim.file_name().to_string_lossy().starts_with("claim-") {
            found.extend(dot_entries(&claim.path()));
        }
    }
    found
}

/// `PRAGMA integrity_check` on the database of a stopped service (SQLite; PostgreSQL keeps its
/// own files whole).
async fn integrity_check(data: &Path) {
    if crate::support::test_postgres().is_some() {
        return;
    }
    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", data.join("vitforge.db").display())).await.unwrap();
    let result: Vec<String> = sqlx::query_scalar("pragma integrity_check").fetch_all(&db).await.unwrap();
    db.close().await;
    assert_eq!(result, vec!["ok".to_string()], "integrity_check");
}

/// What a crash left behind: temporary folders of atomic writes, model folders the database does
/// not list, upload scratch files (read while the service is stopped).
async fn leftovers(data: &Path) -> Vec<PathBuf> {
    let mut found = dot_entries(&data.join("models"));
    found.extend(unregistered_models(data).await.into_iter().map(|m| data.join("models").join(m)));
    for job_dir in std::fs::read_dir(data.join("jobs")).unwrap().flatten() {
        found.extend(job_dot_entries(&job_dir.path()));
    }
    found.extend(std::fs::read_dir(data.join("tmp")).unwrap().flatten().map(|e| e.path()));
    found
}

/// Everything the restarted service serves is complete; returns the datasets' image counts.
/// (The restarted service may already be writing again, so only what it serves is checked here;
/// the crash's leftovers are checked by name.)
async fn check_served(s: &Server, data: &Path) -> BTreeMap<String, u64> {
    let db = crate::support::open_database(data).await;
    let mut counts = BTreeMap::new();
    for d in s.get_json("/datasets").await.as_array().unwrap() {
        let id = d["id"].as_str().unwrap();
        let blobs: Vec<String> = sqlx::query_scalar("select blob from dataset_images where dataset_id = $1").bind(id).fetch_all(&db).await.unwrap();
        assert_eq!(blobs.len() as u64, d["num_images"].as_u64().unwrap(), "dataset {id} has all its rows");
        for b in &blobs {
            let bytes = std::fs::read(data.join("blobs").join(b)).unwrap_or_else(|e| panic!("dataset {id}: blob {b}: {e}"));
            assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), *b, "blob {b} is complete");
        }
        counts.insert(id.to_string(), blobs.len() as u64);
    }
    db.close().await;
    let models = s.get_json("/models").await;
    for m in models.as_array().unwrap() {
        let id = m["id"].as_str().unwrap();
        for f in ["config.json", "model.safetensors", "preprocessor_config.json"] {
            assert!(data.join("models").join(id).join(f).is_file(), "model {id} has {f}");
        }
        let resp = s
            .client
            .post(format!("{}/predict?model={id}", s.base))
            .header("content-type", "image/jpeg")
            .body(crate::fixtures::jpeg(3))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "model {id} answers /predict");
    }
    counts
}

/// Folders under `models/` that no model row names (the service is stopped).
async fn unregistered_models(data: &Path) -> Vec<String> {
    let db = crate::support::open_database(data).await;
    let ids: Vec<String> = sqlx::query_scalar("select id from models").fetch_all(&db).await.unwrap();
    db.close().await;
    std::fs::read_dir(data.join("models"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && !ids.contains(n))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Point {
    Upload,
    Epoch,
    Checkpoint,
    Register,
}

/// Waits until `found` returns true (polling every millisecond), up to `secs`; false on timeout.
async fn wait_for(secs: u64, mut found: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if found() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs for minutes; see the module documentation"]
async fn sigkill_at_random_points_loses_nothing() {
    let target: u32 = std::env::var("VITFORGE_CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let seed: u64 = std::env::var("VITFORGE_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    });
    println!("crash test: {target} kills, seed {seed} (VITFORGE_CRASH_SEED={seed} replays the choices)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    install_slow_base_model(&data);

    let mut server = Launch::new(&data).start();
    let small = zip(&class_images("", &["cat", "dog"], 6, 1));
    let resp = server.client.post(format!("{}/datasets", server.base)).multipart(upload_form(small)).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    let train_set = resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    // Uploads killed part-way: 300 images. One is timed first, so kills land within its span.
    let big = zip(&crate::fixtures::class_images("set/", &["a", "b", "c"], 100, 7000));
    let timed = Instant::now();
    let resp = server.client.post(format!("{}/datasets", server.base)).multipart(upload_form(big.clone())).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    // The kill delay adapts: shorter after an upload that finished before its kill, longer after
    // one that did not, so about half the upload kills land mid-upload.
    let mut upload_ms = (timed.elapsed().as_millis() as u64).max(10);
    let first_upload_ms = upload_ms;
    let first_big = resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();

    let mut acknowledged: BTreeMap<String, u64> = BTreeMap::new();
    acknowledged.insert(train_set.clone(), 12);
    acknowledged.insert(first_big, 300);
    let mut jobs: Vec<String> = Vec::new();
    let mut kills: BTreeMap<Point, u32> = BTreeMap::new();
    let mut mid_write: BTreeMap<Point, u32> = BTreeMap::new();
    let mut total = 0;
    let mut cleaned = 0;
    let started = Instant::now();

    while total < target {
        let point = [Point::Upload, Point::Epoch, Point::Checkpoint, Point::Register][rng.random_range(0..4)];
        // A job to kill during: the one under way, or a new one.
        let running = {
            let list = server.get_json("/jobs").await;
            list.as_array().unwrap().iter().find(|j| j["status"] == "running" || j["status"] == "queued").map(|j| j["id"].as_str().unwrap().to_string())
        };
        let job = match running {
            Some(id) => id,
            None if point != Point::Upload => {
                let epochs = rng.random_range(2..=4);
                let body = json!({"dataset_id": train_set, "base_model": "slow", "params": {"epochs": epochs, "batch_size": 2, "seed": jobs.len()}});
                let job: Value = server.client.post(format!("{}/jobs", server.base)).json(&body).send().await.unwrap().json().await.unwrap();
                let id = job["id"].as_str().unwrap().to_string();
                jobs.push(id.clone());
                id
            }
            None => String::new(),
        };
        let job_dir = data.join("jobs").join(&job);
        let models_dir = data.join("models");
        let landed = match point {
            Point::Upload => {
                let client = server.client.clone();
                let url = format!("{}/datasets", server.base);
                // New images each time, so the upload really writes blobs.
                let bytes = zip(&crate::fixtures::class_images("set/", &["a", "b", "c"], 100, 10_000 + 1000 * total));
                let upload = tokio::spawn(async move { client.post(url).multipart(upload_form(bytes)).send().await });
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..upload_ms))).await;
                if upload.is_finished() {
                    upload_ms = (upload_ms * 3 / 4).max(10);
                    if let Ok(Ok(resp)) = upload.await
                        && resp.status() == 201
                    {
                        let d: Value = resp.json().await.unwrap();
                        acknowledged.insert(d["id"].as_str().unwrap().to_string(), d["num_images"].as_u64().unwrap());
                    }
                    false
                } else {
                    upload_ms = upload_ms * 5 / 4;
                    true
                }
            }
            Point::Epoch => {
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..2500))).await;
                true
            }
            Point::Checkpoint => wait_for(60, || job_dot_entries(&job_dir).iter().any(|p| p.to_string_lossy().contains(".tmp-"))).await,
            Point::Register => {
                let known: Vec<String> = server.get_json("/models").await.as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
                wait_for(120, || {
                    std::fs::read_dir(&models_dir).unwrap().flatten().any(|e| !known.contains(&e.file_name().to_string_lossy().into_owned()))
                })
                .await
            }
        };
        server.kill();
        total += 1;
        *kills.entry(point).or_default() += 1;
        // Proof the kill interrupted a write: its temporary folder is still there, or a model
        // folder is in place that the database does not list yet.
        let interrupted = match point {
            Point::Checkpoint => !job_dot_entries(&job_dir).is_empty(),
            Point::Register => !dot_entries(&models_dir).is_empty() || !unregistered_models(&data).await.is_empty(),
            Point::Upload | Point::Epoch => true,
        };
        if landed && interrupted {
            *mid_write.entry(point).or_default() += 1;
        }
        integrity_check(&data).await;
        let left = leftovers(&data).await;
        cleaned += left.len() as u32;
        server = Launch::new(&data).start();
        for path in &left {
            assert!(!path.exists(), "{} left by the crash is removed at start-up", path.display());
        }
        let served = check_served(&server, &data).await;
        for (id, n) in &acknowledged {
            assert_eq!(served.get(id), Some(n), "acknowledged dataset {id} is intact");
        }
        // A dataset nobody was told about may exist only whole (checked above); keep it.
        acknowledged.extend(served);
    }

    // Let every job finish undisturbed.
    let deadline = Instant::now() + Duration::from_secs(1200);
    for id in &jobs {
        let done = loop {
            let j = server.get_json(&format!("/jobs/{id}")).await;
            if !["queued", "running"].contains(&j["status"].as_str().unwrap()) {
                break j;
            }
            assert!(Instant::now() < deadline, "job {id} did not finish");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        match done["status"].as_str().unwrap() {
            "succeeded" => {}
            "failed" => assert!(done["error"].as_str().is_some_and(|e| !e.is_empty()), "a failed job says why: {done}"),
            other => panic!("job {id} ended {other}: {done}"),
        }
        let metrics = server.get_json(&format!("/jobs/{id}/metrics")).await;
        let steps: Vec<u64> = metrics["train"].as_array().unwrap().iter().map(|p| p["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, (1..=done["progress"]["steps"].as_u64().unwrap()).collect::<Vec<_>>(), "job {id}: each step exactly once");
        let epochs: Vec<u64> = metrics["validation"].as_array().unwrap().iter().map(|v| v["epoch"].as_u64().unwrap()).collect();
        assert_eq!(epochs, (1..=done["progress"]["epochs"].as_u64().unwrap()).collect::<Vec<_>>(), "job {id}: each epoch exactly once");
        if done["status"] == "succeeded" {
            assert!(server.get_json(&format!("/models/{}", done["model_id"].as_str().unwrap())).await["id"].is_string());
        }
    }
    check_served(&server, &data).await;
    server.kill();
    integrity_check(&data).await;
    assert!(leftovers(&data).await.is_empty(), "nothing left over once every job has ended");
    println!("an upload of 300 images took {first_upload_ms} ms; crash leftovers removed at restarts: {cleaned}");
    println!(
        "crash test: survived {total} SIGKILLs in {:.0} s over {} jobs; kills by point: {kills:?}; of which landed mid-write: {mid_write:?}",
        started.elapsed().as_secs_f64(),
        jobs.len()
    );
}
