//! `--object-store s3://…`: processes that share only the database and an S3-compatible store
//! (a private `moto_server` per test), each on a data folder of its own, as on separate machines.
//! Without `moto_server` installed these tests say so and pass, unless `VITFORGE_REQUIRE_S3=1`
//! (`.ci/run` installs it and sets that).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fixtures::{class_images, zip};
use crate::cluster::wait_for;
use crate::support::{ChildServer, Launch, PrivateS3, install_base_model, slow_config};

/// A data folder of its own ("a machine") with the slow base model installed.
fn machine(root: &Path, name: &str) -> std::path::PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    install_base_model(&dir, "slow", &slow_config(), &["a", "b"]);
    dir
}

/// `vitforge serve` on `data`, on the shared database `db_url` and the store `s3` (prefix `cluster`).
fn launch(data: &Path, db_url: &str, s3: &PrivateS3, args: &[&str]) -> Launch {
    Launch::new(data).args(args).envs(s3.env("cluster")).env("VITFORGE_DATABASE_URL", db_url)
}

/// The shared database: the suite's PostgreSQL server when it runs on one, else one SQLite file
/// outside every data folder (processes on one machine may share it).
fn shared_database(root: &Path) -> String {
    let dir = root.join("database");
    std::fs::create_dir_all(&dir).unwrap();
    crate::support::database_url(&dir).unwrap_or_else(|| vitforge::db::sqlite_url(&dir.join("vitforge.db")))
}

async fn upload(api: &ChildServer) -> reqwest::Response {
    let form = reqwest::multipart::Form::new()
        .part("file", reqwest::multipart::Part::bytes(zip(&class_images("", &["cat", "dog"], 12, 3))).file_name("pets.zip"));
    api.client.post(api.url("/datasets")).multipart(form).send().await.unwrap()
}

#[tokio::test]
async fn machines_that_share_only_the_database_and_the_object_store() {
    let Some(s3) = PrivateS3::start().await else { return };
    let tmp = tempfile::tempdir().unwrap();
    let db = shared_database(tmp.path());
    let api = launch(&machine(tmp.path(), "api-1"), &db, &s3, &["--role", "api"]).start();
    let first = launch(&machine(tmp.path(), "worker-1"), &db, &s3, &["--role", "worker", "--worker-name", "worker-one", "--lease-secs", "3"]).start();

    // An upload's images are in the store once the dataset exists.
    let resp = upload(&api).await;
    assert_eq!(resp.status(), 201);
    let dataset: Value = resp.json().await.unwrap();
    assert_eq!(s3.keys("cluster/blobs/").await.len() as u64, dataset["num_images"].as_u64().unwrap());

    // A worker on another machine runs the job; killed after a checkpoint, a third machine that
    // has never seen the job resumes it from the checkpoint in the store.
    let epochs = 4;
    let job = api.post_json("/jobs", &json!({"dataset_id": dataset["id"], "base_model": "slow", "params": {"epochs": epochs, "batch_size": 2}})).await;
    let id = job["id"].as_str().unwrap().to_string();
    wait_for(&api, &id, 300, "the first worker reaching epoch 2", |j| {
        assert_ne!(j["status"], "succeeded", "the job finished before it could be killed; make it slower");
        j["progress"]["epoch"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    let stored = s3.keys(&format!("cluster/jobs/{id}/claim-")).await;
    assert!(stored.iter().any(|k| k.contains("/epoch-") && k.ends_with("/state.json")), "a checkpoint is in the store: {stored:?}");
    first.kill();
    let log = tmp.path().join("worker-2.log");
    let second = launch(&machine(tmp.path(), "worker-2"), &db, &s3, &["--role", "worker", "--worker-name", "worker-two", "--lease-secs", "3", "--sweep-secs", "1"])
        .level("info")
        .log_file(&log)
        .start();
    let done = wait_for(&api, &id, 300, "the job finishing", |j| j["status"] != "running" && j["status"] != "queued").await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["worker"], "worker-two");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("fetched the job's last checkpoint from the object store"), "the second worker resumed from the store:\n{log}");
    let metrics = api.get_json(&format!("/jobs/{id}/metrics")).await;
    let seen: Vec<u64> = metrics["validation"].as_array().unwrap().iter().map(|v| v["epoch"].as_u64().unwrap()).collect();
    assert_eq!(seen, (1..=epochs).collect::<Vec<_>>(), "each epoch's metrics exactly once");
    let model_id = done["model_id"].as_str().unwrap().to_string();
    let mut stored = s3.keys(&format!("cluster/models/{model_id}/")).await;
    stored.sort();
    assert_eq!(stored.len(), 3, "the model's three files are in the store: {stored:?}");
    // The checkpoints go right after the job shows as succeeded.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s3.keys(&format!("cluster/jobs/{id}/")).await.is_empty() {
        assert!(Instant::now() < deadline, "the job's checkpoints are still in the store");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A fresh API process on an empty data folder serves everything from the database and the store.
    let empty = tmp.path().join("api-2");
    let fresh = launch(&empty, &db, &s3, &["--role", "api"]).start();
    let image = crate::fixtures::png(7);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = fresh.client.post(fresh.url("/predict")).header("content-type", "image/png").body(image.clone()).send().await.unwrap();
        let (status, body): (_, Value) = (resp.status(), resp.json().await.unwrap());
        if status == 200 && body["model_id"] == model_id.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "the fresh API process does not serve the model: {status} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let named = fresh.client.post(fresh.url(&format!("/predict?model={model_id}"))).header("content-type", "image/png").body(image).send().await.unwrap();
    assert_eq!(named.status(), 200);
    let images = fresh.get_json(&format!("/datasets/{}/images?limit=1", dataset["id"].as_str().unwrap())).await;
    let thumbnail = fresh.client.get(fresh.url(images["images"][0]["thumbnail"].as_str().unwrap())).send().await.unwrap();
    assert_eq!(thumbnail.status(), 200);
    assert_eq!(thumbnail.headers()["content-type"], "image/jpeg");
    let download = fresh.client.get(fresh.url(&format!("/models/{model_id}/download"))).send().await.unwrap();
    assert_eq!(download.status(), 200);
    let tar_bytes = download.bytes().await.unwrap();
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    assert_eq!(archive.entries().unwrap().count(), 3, "config, weights and preprocessor in the download");
    let evaluated = fresh.client.post(fresh.url(&format!("/models/{model_id}/evaluate"))).json(&json!({"dataset_id": dataset["id"]})).send().await.unwrap();
    assert_eq!(evaluated.status(), 200, "{}", evaluated.text().await.unwrap());

    // A model deleted through one process is gone from the store.
    let other = api.post_json("/jobs", &json!({"dataset_id": dataset["id"], "base_model": "slow", "params": {"epochs": 1, "batch_size": 4}})).await;
    let other = wait_for(&api, other["id"].as_str().unwrap(), 300, "a second model", |j| j["status"] == "succeeded").await;
    let resp = fresh.client.delete(fresh.url(&format!("/models/{model_id}"))).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    assert!(s3.keys(&format!("cluster/models/{model_id}/")).await.is_empty(), "the deleted model's files are gone from the store");
    assert_eq!(s3.keys(&format!("cluster/models/{}/", other["model_id"].as_str().unwrap())).await.len(), 3);

    // The second worker's cached copy goes at its next sweep once it has been left alone for an
    // hour (made so here), while a folder without a row that is still being written stays, and
    // so does the copy of the model that remains.
    let models = tmp.path().join("worker-2").join("models");
    let copy = models.join(&model_id);
    assert!(copy.join("config.json").is_file(), "the worker that registered the model has its copy");
    let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    std::fs::File::open(&copy).unwrap().set_modified(an_hour_ago).unwrap();
    let being_written = models.join("01a00000-0000-7000-8000-000000000000");
    std::fs::create_dir_all(&being_written).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while copy.exists() {
        assert!(Instant::now() < deadline, "the deleted model's cached copy is still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(being_written.is_dir(), "a recent folder without a row is not swept");
    assert!(models.join(other["model_id"].as_str().unwrap()).join("config.json").is_file(), "the remaining model's copy stays");

    // The first worker, killed while it ran the job the second one finished, still has its copy
    // of that job's checkpoints. Restarted (a worker's start-up removes nothing), its sweep
    // removes that folder once it has been left alone for an hour (made so here).
    let lost = machine(tmp.path(), "worker-1").join("jobs").join(&id);
    assert!(lost.is_dir(), "the killed worker's copy of the job's checkpoints");
    std::fs::File::open(&lost).unwrap().set_modified(an_hour_ago).unwrap();
    let restarted =
        launch(&machine(tmp.path(), "worker-1"), &db, &s3, &["--role", "worker", "--worker-name", "worker-one", "--lease-secs", "3", "--sweep-secs", "1"])
            .start();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lost.exists() {
        assert!(Instant::now() < deadline, "the folder of the job that moved away and ended is still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((second, restarted));
}

#[tokio::test]
async fn an_unreachable_object_store_makes_the_service_unready_until_it_returns() {
    let Some(mut s3) = PrivateS3::start().await else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let app = Launch::new(&data).envs(s3.env("alone")).start();
    assert_eq!(app.client.get(app.url("/readyz")).send().await.unwrap().status(), 200);

    s3.down();
    let started = Instant::now();
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["error"]["message"], "the object store does not answer", "{body}");
    assert!(started.elapsed() < Duration::from_secs(5), "readiness answered in {:?}", started.elapsed());
    // An upload fails cleanly, and leaves no dataset behind.
    let resp = upload(&app).await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "object_store_unavailable", "{body}");
    assert_eq!(app.get_json("/datasets").await, json!([]));

    // It comes back (empty: moto keeps nothing): ready again, and uploads and deletes work.
    s3.up().await;
    assert_eq!(app.client.get(app.url("/readyz")).send().await.unwrap().status(), 200);
    let resp = upload(&app).await;
    assert_eq!(resp.status(), 201);
    let dataset: Value = resp.json().await.unwrap();
    assert_eq!(s3.keys("alone/blobs/").await.len() as u64, dataset["num_images"].as_u64().unwrap());
    let resp = app.client.delete(app.url(&format!("/datasets/{}", dataset["id"].as_str().unwrap()))).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    assert!(s3.keys("alone/blobs/").await.is_empty(), "a deleted dataset's images are gone from the store");
}

#[tokio::test]
async fn a_bad_object_store_url_stops_start_up_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vitforge"))
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(tmp.path())
        .args(["--object-store", "gs://bucket/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--object-store") && stderr.contains("only s3:// is supported"), "{stderr}");
}

/// Files over the 10 MB part size go up as multipart uploads and come back streamed, byte for byte,
/// into a folder that appears whole.
#[tokio::test]
async fn large_files_go_up_in_parts_and_come_back_whole() {
    let Some(s3) = PrivateS3::start().await else { return };
    let tmp = tempfile::tempdir().unwrap();
    let paths = vitforge::paths::DataPaths::new(tmp.path());
    paths.create_all().unwrap();
    let settings: Vec<(String, String)> = s3.env("parts").into_iter().filter(|(k, _)| k.starts_with("AWS_")).collect();
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let url = format!("s3://{}/parts", s3.bucket);
    let open = |paths: vitforge::paths::DataPaths| vitforge::objects::Objects::s3_with(&url, &settings, paths).unwrap();
    let objects = open(paths.clone());
    let dir = paths.model("big");
    std::fs::create_dir_all(dir.join("inner")).unwrap();
    let big: Vec<u8> = (0..25_000_017u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(dir.join("model.safetensors"), &big).unwrap();
    std::fs::write(dir.join("inner").join("small.json"), b"{}").unwrap();
    objects.publish_dir(&dir).await.unwrap();
    let mut keys = s3.keys("parts/models/big/").await;
    keys.sort();
    assert_eq!(keys, vec!["parts/models/big/inner/small.json", "parts/models/big/model.safetensors"]);

    // Another machine: an empty data folder.
    let elsewhere = vitforge::paths::DataPaths::new(tmp.path().join("elsewhere"));
    elsewhere.create_all().unwrap();
    let theirs = open(elsewhere.clone());
    theirs.fetch_dir(&elsewhere.model("big")).await.unwrap();
    assert!(std::fs::read(elsewhere.model("big").join("model.safetensors")).unwrap() == big, "the large file differs");
    assert_eq!(std::fs::read(elsewhere.model("big").join("inner").join("small.json")).unwrap(), b"{}");
    assert_eq!(std::fs::read_dir(elsewhere.tmp()).unwrap().count(), 0, "the staging folder is gone");
    // A folder the store does not have is an error naming it, and leaves nothing behind.
    let missing = theirs.fetch_dir(&elsewhere.model("absent")).await.unwrap_err().to_string();
    assert!(missing.contains("models/absent"), "{missing}");
    assert!(!elsewhere.model("absent").exists());
    theirs.remove_dir(&elsewhere.model("big")).await.unwrap();
    assert!(s3.keys("parts/models/big/").await.is_empty());
}

/// The store `s3` under `prefix`, opened on a data folder of its own at `root` ("a machine").
fn store_on(s3: &PrivateS3, prefix: &str, root: &Path) -> (vitforge::objects::Objects, vitforge::paths::DataPaths) {
    let settings: Vec<(String, String)> = s3.env(prefix).into_iter().filter(|(k, _)| k.starts_with("AWS_")).collect();
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let paths = vitforge::paths::DataPaths::new(root);
    paths.create_all().unwrap();
    (vitforge::objects::Objects::s3_with(&format!("s3://{}/{prefix}", s3.bucket), &settings, paths.clone()).unwrap(), paths)
}

#[tokio::test]
async fn image_blobs_come_back_checked_and_leave_nothing_behind_when_wrong() {
    let Some(s3) = PrivateS3::start().await else { return };
    let tmp = tempfile::tempdir().unwrap();
    let machine = |name: &str| store_on(&s3, "blobs", &tmp.path().join(name));
    let (ours, here) = machine("here");
    let store = vitforge::dataset::BlobStore::open(here.blobs()).unwrap();
    let image: Vec<u8> = (0..3_000_001u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let (good, other) = (store.put(&image).unwrap(), store.put(b"another image").unwrap());
    ours.publish_blobs(&[good.clone(), other.clone()]).await.unwrap();

    // Another machine fetches a blob it lacks, whole, into its own cache.
    let (theirs, there) = machine("there");
    let path = theirs.blob_path(&good).await.unwrap();
    assert!(std::fs::read(&path).unwrap() == image, "the fetched blob differs");
    assert_eq!(path, there.blobs().join(&good));

    // An object whose bytes are not its name's is refused, and nothing of it stays in the cache.
    s3.put(&format!("blobs/blobs/{other}"), b"tampered".to_vec()).await;
    let (third, elsewhere) = machine("elsewhere");
    let refused = format!("{:#}", third.blob_path(&other).await.unwrap_err());
    assert!(refused.contains(&format!("blob {other}")) && refused.contains("holds other content"), "{refused}");
    assert!(refused.contains(&vitforge::dataset::BlobStore::hash(b"tampered")), "names the hash it has: {refused}");
    let missing = format!("{:#}", third.blob_path(&"0".repeat(64)).await.unwrap_err());
    assert!(missing.contains(&"0".repeat(64)), "{missing}");
    let left: Vec<_> = std::fs::read_dir(elsewhere.blobs()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "refused and missing blobs leave no file: {left:?}");
    assert!(std::fs::read(third.blob_path(&good).await.unwrap()).unwrap() == image);
}

/// Each run of a job writes its checkpoints under a prefix of its own, named by its claim: a
/// later run removes the earlier claims' prefixes, and a run that lost its lease without noticing
/// ("zombie") cannot delete what the run that took over wrote. A resume takes the newest claim's
/// latest epoch, with the best model its own `state.json` names, over a later epoch of an older
/// claim, in the store or in the machine's own folder. A best model whose upload failed part-way
/// is uploaded again.
#[tokio::test]
async fn each_run_of_a_job_keeps_its_checkpoints_apart() {
    use vitforge::objects::run_prefix;
    use vitforge::train::checkpoint::take_over;
    let Some(s3) = PrivateS3::start().await else { return };
    let tmp = tempfile::tempdir().unwrap();
    // A machine's objects, and its folder for claim `claim` of the job, taken over as a worker does.
    let machine = |name: &str, claim: i64| {
        let (objects, paths) = store_on(&s3, "runs", &tmp.path().join(name));
        (take_over(&paths.job("j"), claim).unwrap(), objects)
    };
    // A checkpoint of `epoch` in `root` whose best model is `best` (the best model's file says which).
    let write = |root: &Path, epoch: u32, best: u32| {
        let mut state = vitforge::train::checkpoint::LoopState::fresh("f".into());
        (state.epoch, state.best_epoch) = (epoch, Some(best));
        let dir = root.join(format!("epoch-{epoch}"));
        std::fs::create_dir_all(dir.join("model")).unwrap();
        std::fs::write(dir.join("model").join("model.safetensors"), format!("weights {epoch}")).unwrap();
        std::fs::write(dir.join("state.json"), serde_json::to_string(&state).unwrap()).unwrap();
        std::fs::create_dir_all(root.join("best")).unwrap();
        std::fs::write(root.join("best").join("model.safetensors"), format!("best {best}")).unwrap();
        std::fs::write(root.join("best").join("config.json"), "{}").unwrap();
    };
    let read = |path: std::path::PathBuf| std::fs::read_to_string(path).unwrap();
    let runs = |keys: Vec<String>| -> std::collections::BTreeSet<String> { keys.iter().map(|k| k.split('/').nth(3).unwrap().to_string()).collect() };

    // Claim 1, on machine a.
    let (root_a, a) = machine("a", 1);
    assert_eq!(a.fetch_checkpoint(&root_a, 1).await.unwrap(), None, "nothing stored yet");
    let run_1 = run_prefix(1);
    assert!(run_1.starts_with("claim-1-run-"), "{run_1}");
    write(&root_a, 1, 1);
    a.publish_checkpoint(&root_a, &run_1, 1, true).await.unwrap();
    // Epoch 2 improves, and its best model's upload fails part-way (its weights are stored, its
    // config.json not); epoch 3 does not improve: the best model of epoch 2 is stored again, whole.
    write(&root_a, 2, 2);
    s3.put(&format!("runs/jobs/j/{run_1}/best-2/model.safetensors"), b"part of best 2".to_vec()).await;
    write(&root_a, 3, 2);
    a.publish_checkpoint(&root_a, &run_1, 3, false).await.unwrap();
    let mut keys = s3.keys("runs/jobs/j/").await;
    keys.sort();
    let stored: Vec<String> = ["best-2/config.json", "best-2/model.safetensors", "epoch-3/model/model.safetensors", "epoch-3/state.json"]
        .iter()
        .map(|k| format!("runs/jobs/j/{run_1}/{k}"))
        .collect();
    assert_eq!(keys, stored);

    // Claim 2, on machine b, resumes: epoch 3 and the best model of epoch 2.
    let (root_b, b) = machine("b", 2);
    assert_eq!(b.fetch_checkpoint(&root_b, 2).await.unwrap(), Some(3));
    assert_eq!(read(root_b.join("best").join("model.safetensors")), "best 2");
    assert_eq!(read(root_b.join("epoch-3").join("model").join("model.safetensors")), "weights 3");
    assert_eq!(b.fetch_checkpoint(&root_b, 2).await.unwrap(), None, "nothing newer than what it has");
    let run_2 = run_prefix(2);
    write(&root_b, 4, 4);
    b.publish_checkpoint(&root_b, &run_2, 4, true).await.unwrap();
    assert_eq!(runs(s3.keys("runs/jobs/j/").await), [run_2.clone()].into(), "the earlier claim's prefix is gone");

    // Claim 1's run, unaware it lost the job, writes two more checkpoints: claim 2's stays.
    write(&root_a, 5, 2);
    a.publish_checkpoint(&root_a, &run_1, 5, false).await.unwrap();
    assert_eq!(runs(s3.keys("runs/jobs/j/").await), [run_1.clone(), run_2.clone()].into());
    assert_eq!(s3.keys(&format!("runs/jobs/j/{run_2}/epoch-4/")).await.len(), 2);
    write(&root_a, 6, 2);
    // And stages a best model for an epoch 4 of its own, as it would before that checkpoint.
    std::fs::create_dir_all(root_a.join("best-next-4")).unwrap();
    // Machine b keeps its own checkpoint of claim 2 over claim 1's later epoch.
    let (root_b, b) = machine("b", 3);
    assert_eq!(b.fetch_checkpoint(&root_b, 3).await.unwrap(), None, "claim 2's own epoch 4 stays");
    assert_eq!(read(root_b.join("epoch-4").join("model").join("model.safetensors")), "weights 4");
    // A machine that has never run the job takes claim 2's checkpoint, with its best model: not
    // claim 1's later epoch, stored after its lease had passed on.
    let (root_c, c) = machine("c", 4);
    assert_eq!(c.fetch_checkpoint(&root_c, 4).await.unwrap(), Some(4));
    assert_eq!(read(root_c.join("best").join("model.safetensors")), "best 4");
    // And so does machine a, back on the job, whose own folder holds claim 1's later epoch 6:
    // it resumes from claim 2's epoch 4 alone, with that one's best model.
    let (root_a, a) = machine("a", 5);
    assert_eq!(a.fetch_checkpoint(&root_a, 5).await.unwrap(), Some(4));
    assert_eq!(vitforge::train::checkpoint::list_epochs(&root_a), [4], "its own later epoch is gone");
    assert!(!root_a.join("best-next-4").exists(), "and its staged best model, which a resume from epoch 4 would promote");
    assert_eq!(read(root_a.join("best").join("model.safetensors")), "best 4");
    // Claim 5 chose: its folder's checkpoint is now of its line, and stays over the store's.
    assert_eq!(a.fetch_checkpoint(&root_a, 6).await.unwrap(), None);

    // A run stored before prefixes named their claim counts as older than any claim.
    s3.put("runs/jobs/j/run-01f0/epoch-9/state.json", b"{}".to_vec()).await;
    let (root_d, d) = machine("d", 7);
    assert_eq!(d.fetch_checkpoint(&root_d, 7).await.unwrap(), Some(4));
    // Its first checkpoint removes every earlier claim's prefix, that one's too; and a second run
    // of the same claim (the first handed it back at a shutdown) removes the first one's.
    let run_7 = run_prefix(7);
    write(&root_d, 5, 5);
    d.publish_checkpoint(&root_d, &run_7, 5, true).await.unwrap();
    assert_eq!(runs(s3.keys("runs/jobs/j/").await), [run_7.clone()].into());
    let run_7_again = run_prefix(7);
    write(&root_d, 6, 5);
    d.publish_checkpoint(&root_d, &run_7_again, 6, false).await.unwrap();
    assert_eq!(runs(s3.keys("runs/jobs/j/").await), [run_7_again].into());
}

/// The periodic sweeps' part of the object store (`ModelRegistry::remove_unregistered`,
/// `worker::remove_ended_job_folders`): a model folder that no row names (a process stored it and
/// stopped before registering it), and the folder of a job that has ended or no longer exists (a
/// process stopped before its clean-up), go from the store once nothing in them has changed for
/// the grace, and so does such a model folder that only this machine has; a registered model's
/// and a running job's stay, and so does everything written within the grace.
#[tokio::test]
async fn leftovers_in_the_object_store_are_swept_once_left_alone() {
    use vitforge::db::jobs::{self, Holder, NewJob, Status};
    let Some(s3) = PrivateS3::start().await else { return };
    let tmp = tempfile::tempdir().unwrap();
    let app = crate::helpers::spawn_app_with(|c| c.role = vitforge::config::Role::Api).await;
    let db = &app.db;
    let (objects, paths) = store_on(&s3, "leftovers", &tmp.path().join("here"));
    let registry = registry_on(db, &paths, &objects);

    // A job that ended, one that runs (elsewhere), and a registered model.
    let dataset = app.upload_pets(2, false).await;
    let params = json!({});
    let new = NewJob { dataset_id: &dataset, base_model: "m", params: &params, recipe: "r", epochs: 1, base_is_model: false };
    let lease = Duration::from_secs(30);
    let ended = jobs::insert(db, &new).await.unwrap().unwrap();
    assert_eq!(jobs::claim(db, "elsewhere", "cpu", lease, &[]).await.unwrap().unwrap().id, ended.id);
    let holder = Holder::of("elsewhere", &jobs::get(db, &ended.id).await.unwrap().unwrap());
    jobs::finish(db, &ended.id, &holder, Status::Failed, Some("it ended")).await.unwrap();
    let running = jobs::insert(db, &new).await.unwrap().unwrap();
    assert_eq!(jobs::claim(db, "elsewhere", "cpu", lease, &[]).await.unwrap().unwrap().id, running.id);
    let kept = vitforge::db::models::Model { job_id: None, ..crate::queue::model_of(&ended, "kept") };
    vitforge::db::models::register_for_job(db, &kept, None).await.unwrap();

    let gone = "01a00000-0000-7000-8000-00000000dead";
    for key in [
        "models/kept/config.json".to_string(),
        "models/in-flight/model.safetensors".into(),
        "models/unfinished/config.json".into(),
        "models/unfinished/model.safetensors".into(),
        format!("jobs/{}/run-1/epoch-1/state.json", ended.id),
        format!("jobs/{}/run-1/epoch-1/state.json", running.id),
        format!("jobs/{gone}/run-1/epoch-1/state.json"),
    ] {
        s3.put(&format!("leftovers/{key}"), b"{}".to_vec()).await;
    }
    std::fs::create_dir_all(paths.model("only-here")).unwrap();
    let stored = |prefix: String| {
        let s3 = &s3;
        async move { !s3.keys(&format!("leftovers/{prefix}/")).await.is_empty() }
    };

    // Within the grace (everything was written just now): nothing goes.
    let hour = Duration::from_secs(3600);
    assert_eq!(registry.remove_unregistered(hour).await.unwrap(), Vec::<std::path::PathBuf>::new());
    assert_eq!(vitforge::worker::remove_ended_job_folders(db, &objects, &paths, hour).await.unwrap(), Vec::<std::path::PathBuf>::new());
    assert!(stored("models/unfinished".into()).await && stored(format!("jobs/{gone}")).await);

    // Past it (a grace of zero here): the leftovers go, here and in the store; not a model this
    // process is registering.
    let in_flight = registry.registering("in-flight");
    let mut removed = registry.remove_unregistered(Duration::ZERO).await.unwrap();
    removed.sort();
    assert_eq!(removed, vec![paths.model("only-here"), paths.model("unfinished")]);
    let mut removed = vitforge::worker::remove_ended_job_folders(db, &objects, &paths, Duration::ZERO).await.unwrap();
    removed.sort();
    let mut expected = vec![paths.job(&ended.id), paths.job(gone)];
    expected.sort();
    assert_eq!(removed, expected);
    assert!(!stored("models/unfinished".into()).await && !paths.model("only-here").exists());
    assert!(!stored(format!("jobs/{}", ended.id)).await && !stored(format!("jobs/{gone}")).await);
    assert!(stored("models/kept".into()).await, "the registered model stays");
    assert!(stored(format!("jobs/{}", running.id)).await, "the running job's checkpoints stay");
    assert!(stored("models/in-flight".into()).await, "the model being registered stays");
    assert!(registry.remove_unregistered(Duration::ZERO).await.unwrap().is_empty(), "nothing more");
    // Had its registration ended without a row, its folder would be a leftover like the others.
    drop(in_flight);
    assert_eq!(registry.remove_unregistered(Duration::ZERO).await.unwrap(), vec![paths.model("in-flight")]);
    assert!(!stored("models/in-flight".into()).await);
}

/// A model registry on `db`, `paths` and `objects`, with a predictor that serves nothing.
fn registry_on(db: &vitforge::db::Pool, paths: &vitforge::paths::DataPaths, objects: &vitforge::objects::Objects) -> vitforge::registry::ModelRegistry {
    let predictor = vitforge::predictor::Predictor::start(
        vitforge::predictor::PredictorConfig {
            max_batch_size: 1,
            max_batch_delay: Duration::ZERO,
            max_concurrent_requests: 1,
            max_loaded_models: 1,
            max_queue_wait: None,
            memory: vitforge::budget::MemoryBudget::new(1 << 20),
            precision: vitforge::model::Precision::F32,
        },
        candle_core::Device::Cpu,
        std::sync::Arc::new(vitforge::telemetry::ServiceMetrics::new()),
    );
    vitforge::registry::ModelRegistry::new(db.clone(), paths.clone(), objects.clone(), predictor, false)
}

/// Without an object store too, the sweep of unregistered model folders leaves alone the folder
/// of a model this process is registering, however old it is, and takes it once that ends.
#[tokio::test]
async fn a_model_being_registered_is_not_swept_however_long_it_takes() {
    let app = crate::helpers::spawn_app_with(|c| c.role = vitforge::config::Role::Api).await;
    let tmp = tempfile::tempdir().unwrap();
    let paths = vitforge::paths::DataPaths::new(tmp.path());
    let objects = vitforge::objects::Objects::local(paths.clone()).unwrap();
    let registry = registry_on(&app.db, &paths, &objects);
    for name in ["in-flight", "leftover"] {
        std::fs::create_dir_all(paths.model(name)).unwrap();
        std::fs::write(paths.model(name).join("config.json"), "{}").unwrap();
    }
    let in_flight = registry.registering("in-flight");
    assert_eq!(registry.remove_unregistered(Duration::ZERO).await.unwrap(), vec![paths.model("leftover")]);
    assert!(paths.model("in-flight").join("config.json").is_file());
    drop(in_flight);
    assert_eq!(registry.remove_unregistered(Duration::ZERO).await.unwrap(), vec![paths.model("in-flight")]);
    assert!(!paths.model("in-flight").exists());
}
