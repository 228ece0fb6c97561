//! Fine-tune jobs over HTTP: submit, poll, metrics, events, cancel, bad input, queueing.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::helpers::{assert_error, json, spawn_app};

fn small() -> Value {
    json!({"epochs": 2, "batch_size": 4, "learning_rate": 1e-3})
}

#[tokio::test]
async fn a_job_runs_to_a_registered_model_with_its_metrics() {
    let app = spawn_app().await;
    let dataset = app.upload_pets(6, true).await;
    let job = app.submit_job(&dataset, small()).await;
    assert_eq!(job["status"], "queued");
    assert_eq!(job["dataset_id"], dataset);
    assert_eq!(job["base_model"], "tiny");
    // Every default is filled in.
    assert_eq!(job["params"]["epochs"], 2);
    assert_eq!(job["params"]["optimizer"], "adamw");
    assert_eq!(job["params"]["warmup_ratio"], 0.0);
    assert_eq!(job["progress"]["epochs"], 2);
    for key in ["created_at", "started_at", "finished_at", "error", "model_id", "device"] {
        assert!(job.get(key).is_some(), "{key} missing from {job}");
    }

    let done = app.wait_job(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["device"], "cpu");
    assert_eq!(done["progress"]["epoch"], 2);
    assert_eq!(done["progress"]["step"], done["progress"]["steps"]);
    let model_id = done["model_id"].as_str().unwrap();

    let metrics = json(app.get(&format!("/jobs/{}/metrics", job["id"].as_str().unwrap())).await).await;
    let steps = done["progress"]["steps"].as_u64().unwrap();
    let train = metrics["train"].as_array().unwrap();
    assert_eq!(train.len() as u64, steps, "one train point per step");
    let unique: BTreeSet<u64> = train.iter().map(|p| p["step"].as_u64().unwrap()).collect();
    assert_eq!(unique.len() as u64, steps);
    assert!(train.iter().all(|p| p["loss"].as_f64().unwrap().is_finite() && p["learning_rate"].as_f64().unwrap() > 0.0));
    let validation = metrics["validation"].as_array().unwrap();
    assert_eq!(validation.iter().map(|v| v["epoch"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2]);
    for key in ["loss", "accuracy", "precision", "recall", "f1", "per_class", "confusion_matrix"] {
        assert!(validation[0].get(key).is_some(), "{key} missing");
    }
    assert_eq!(validation[0]["per_class"]["cat"]["support"].as_u64().unwrap() + validation[0]["per_class"]["dog"]["support"].as_u64().unwrap(), 2);
    let test = &metrics["test"];
    assert_eq!(test["confusion_matrix"].as_array().unwrap().len(), 2);
    assert_eq!(test["per_class"]["cat"]["support"], 2);

    let model = json(app.get(&format!("/models/{model_id}")).await).await;
    assert_eq!(model["job_id"], job["id"]);
    assert_eq!(model["labels"], json!(["cat", "dog"]));
    assert_eq!(model["base_model"], "tiny");
    assert!(model["metrics"]["f1"].is_number());
    assert!(app.data_dir.join("models").join(model_id).join("model.safetensors").is_file());
    // The job's checkpoints are gone once the model is registered.
    assert!(!app.data_dir.join("jobs").join(job["id"].as_str().unwrap()).exists());
}

/// Reads a job's whole event stream into (event, data) pairs.
async fn read_events(app: &crate::helpers::TestApp, id: &str) -> Vec<(String, Value)> {
    crate::helpers::sse_events(app.get(&format!("/jobs/{id}/events")).await).await
}

#[tokio::test]
async fn events_stream_progress_metrics_and_the_final_status_live_and_late() {
    let app = spawn_app().await;
    let dataset = app.upload_pets(6, false).await;
    let job = app.submit_job(&dataset, json!({"epochs": 3, "batch_size": 2})).await;
    let id = job["id"].as_str().unwrap();
    let live = read_events(&app, id).await;
    let kinds: Vec<&str> = live.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"progress"));
    assert!(kinds.iter().filter(|k| **k == "progress").count() > 3, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "metrics").count(), 3, "{kinds:?}");
    let (last, status) = live.last().unwrap();
    assert_eq!(last, "status");
    assert_eq!(status["status"], "succeeded");
    let steps: Vec<u64> = live.iter().filter(|(e, v)| e == "progress" && v.get("loss").is_some()).map(|(_, v)| v["step"].as_u64().unwrap()).collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "steps in order: {steps:?}");

    // A client connecting after the end gets the current state, then the stream ends.
    let late = read_events(&app, id).await;
    let kinds: Vec<&str> = late.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(kinds, vec!["progress", "metrics", "metrics", "metrics", "status"]);
    assert_eq!(late[0].1["epoch"], 3);
    assert_eq!(late[4].1["status"], "succeeded");
}

#[tokio::test]
async fn every_phase_of_a_job_is_streamed_in_order_with_growing_progress() {
    let app = spawn_app().await;
    let dataset = app.upload_pets(6, true).await;
    // A first job keeps the one CPU worker busy, so the second is still queued when its event
    // stream opens and every phase of it is seen live.
    app.submit_job(&dataset, json!({"epochs": 12, "batch_size": 2})).await;
    let resp = app.post_json("/jobs", &json!({"dataset_id": dataset, "base_model": "tiny", "recipe": "auto", "params": {"epochs": 2}})).await;
    assert_eq!(resp.status(), 202);
    let job = json(resp).await;
    let id = job["id"].as_str().unwrap();
    let events = read_events(&app, id).await;
    assert_eq!(events[0].1["phase"], Value::Null, "queued when the stream opened: {:?}", events[0]);

    let progress: Vec<&Value> = events.iter().filter(|(e, v)| e == "progress" && !v["phase"].is_null()).map(|(_, v)| v).collect();
    let mut runs: Vec<(String, Vec<(u64, u64)>)> = Vec::new();
    for p in &progress {
        let phase = p["phase"].as_str().unwrap().to_string();
        let at = (p["done"].as_u64().unwrap(), p["total"].as_u64().unwrap());
        match runs.last_mut() {
            Some((last, points)) if *last == phase => points.push(at),
            _ => runs.push((phase, vec![at])),
        }
    }
    let order: Vec<&str> = runs.iter().map(|(p, _)| p.as_str()).collect();
    // Epoch 1 is the probe; epoch 2 fine-tunes; the test split is evaluated at the end.
    assert_eq!(
        order,
        ["loading", "features", "probe", "validating", "saving", "training", "validating", "saving", "validating", "saving"],
        "{progress:?}"
    );
    for (phase, points) in &runs {
        assert!(points.windows(2).all(|w| w[0].0 <= w[1].0), "{phase}: done grows: {points:?}");
        let (done, total) = *points.last().unwrap();
        assert!(total > 0 && done == total, "{phase} ends complete: {points:?}");
    }
    let features = &runs[1].1;
    assert_eq!(features.last().unwrap().1, 10, "features of the 10 training images");
    assert!(progress.iter().any(|p| p["phase"] == "training" && p["rate"].as_f64().is_some_and(|r| r > 0.0)), "training has a rate");
    assert_eq!(events.last().unwrap().0, "status");
    assert_eq!(events.last().unwrap().1["status"], "succeeded");

    // The job records its last phase.
    let done = json(app.get(&format!("/jobs/{id}")).await).await;
    assert_eq!((done["progress"]["phase"].as_str(), done["progress"]["done"].as_u64(), done["progress"]["total"].as_u64()), (Some("saving"), Some(1), Some(1)), "{done}");
}

#[tokio::test]
async fn queued_jobs_run_one_after_another_and_cancel_works_in_every_state() {
    let app = spawn_app().await;
    let dataset = app.upload_pets(6, false).await;
    // A long job keeps the CPU worker busy while the others queue behind it.
    let long = app.submit_job(&dataset, json!({"epochs": 1000, "batch_size": 2})).await;
    let queued = app.submit_job(&dataset, small()).await;
    let long_id = long["id"].as_str().unwrap();
    let queued_id = queued["id"].as_str().unwrap();

    // Wait until the long one runs.
    for _ in 0..200 {
        if json(app.get(&format!("/jobs/{long_id}")).await).await["status"] == "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let listed = json(app.get("/jobs?status=queued").await).await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], queued_id);

    // Queued → cancelled at once. A queued job can hold checkpoints (a shutdown put it back in
    // the queue mid-run): they go with the cancel.
    let checkpoints = app.data_dir.join("jobs").join(queued_id);
    std::fs::create_dir_all(checkpoints.join("claim-1/epoch-1")).unwrap();
    std::fs::write(checkpoints.join("claim-1/epoch-1/state.json"), "{}").unwrap();
    let resp = app.client.post(app.url(&format!("/jobs/{queued_id}/cancel"))).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await["status"], "cancelled");
    assert!(!checkpoints.exists(), "the cancelled job's checkpoints are removed");
    // Running → stops within a batch.
    let resp = app.client.post(app.url(&format!("/jobs/{long_id}/cancel"))).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(json(resp).await["cancel_requested"], true);
    let done = app.wait_job(long_id, 30).await;
    assert_eq!(done["status"], "cancelled");
    assert!(done["model_id"].is_null());
    // Finished → 409.
    let resp = app.client.post(app.url(&format!("/jobs/{long_id}/cancel"))).send().await.unwrap();
    assert_error(resp, 409, "job_finished").await;

    // Two more jobs on the one CPU worker: the second starts after the first ends.
    let a = app.submit_job(&dataset, small()).await;
    let b = app.submit_job(&dataset, small()).await;
    app.drain(240).await;
    let a = app.wait_job(a["id"].as_str().unwrap(), 1).await;
    let b = app.wait_job(b["id"].as_str().unwrap(), 1).await;
    assert_eq!((a["status"].as_str(), b["status"].as_str()), (Some("succeeded"), Some("succeeded")));
    assert!(b["started_at"].as_str().unwrap() >= a["finished_at"].as_str().unwrap(), "{a}\n{b}");
    let all = json(app.get("/jobs").await).await;
    let ids: Vec<&str> = all.as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids[0], b["id"].as_str().unwrap(), "newest first");
    assert_eq!(ids.len(), 4);
}

/// A model that cannot be registered (here: `models/` is a file, so its copy cannot be made) is
/// not left running, to be claimed and trained again at every lease: the job goes back to the
/// queue with its checkpoints (the failure may pass: an object store out of reach), a few times,
/// each after a longer wait, then ends failed with the reason. Nothing half-made stays.
#[tokio::test]
async fn a_job_whose_model_cannot_be_registered_fails_with_the_reason() {
    // Waits of a third of the lease per claim: 1, 2, 3 and 4 s.
    let app = crate::helpers::spawn_app_with(|c| c.lease_secs = 3).await;
    let dataset = app.upload_pets(4, false).await;
    let models = app.data_dir.join("models");
    std::fs::remove_dir_all(&models).unwrap();
    std::fs::write(&models, "not a folder").unwrap();
    let job = app.submit_job(&dataset, small()).await;
    let id = job["id"].as_str().unwrap();
    let done = app.wait_job(id, 120).await;
    assert_eq!(done["status"], "failed", "{done}");
    let error = done["error"].as_str().unwrap();
    assert!(error.starts_with("registering the model failed: copying the model from"), "{error}");
    assert!(error.contains(&models.display().to_string()), "the error names the path: {error}");
    assert!(done["model_id"].is_null());
    let claims: i64 = sqlx::query_scalar("select attempts from jobs where id = $1").bind(id).fetch_one(&app.db).await.unwrap();
    assert_eq!(claims, i64::from(vitforge::worker::MAX_CLAIMS), "tried again before failing");
    assert_eq!(json(app.get("/models").await).await, json!([]));
    assert!(!app.data_dir.join("jobs").join(id).exists(), "its checkpoints are removed like any ended job's");
    // It stays failed: nothing claims it again.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(json(app.get(&format!("/jobs/{id}")).await).await["status"], "failed");
}

/// A run whose claim passed on (its lease lapsed: the database was out of reach, the process
/// paused) writes nothing more into its claim's folder: before each checkpoint it renews its
/// claim, and finding it gone it stops, at its next checkpoint rather than at its next renewal
/// (here ten minutes away).
#[tokio::test]
async fn a_run_whose_claim_passed_on_writes_no_more_checkpoints_and_stops() {
    let app = crate::helpers::spawn_app_with(|c| c.lease_secs = 1800).await;
    // Enough images that the thousand epochs would take minutes.
    let dataset = app.upload_pets(40, false).await;
    let job = app.submit_job(&dataset, json!({"epochs": 1000, "batch_size": 2})).await;
    let id = job["id"].as_str().unwrap();
    // The folder of the job's first claim.
    let folder = vitforge::train::checkpoint::claim_dir(&app.data_dir.join("jobs").join(id), 1);
    let last_epoch = || vitforge::train::checkpoint::list_epochs(&folder).pop();
    for _ in 0..600 {
        if last_epoch().is_some_and(|e| e >= 2) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Another claim takes the job, as another process's would once this run's lease lapsed.
    sqlx::query("update jobs set worker = 'elsewhere', attempts = attempts + 1 where id = $1").bind(id).execute(&app.db).await.unwrap();
    let taken = last_epoch().expect("checkpoints before the take-over");
    // The run stops: the one CPU worker takes the next job.
    let next = app.submit_job(&dataset, json!({"epochs": 1, "batch_size": 2})).await;
    let done = app.wait_job(next["id"].as_str().unwrap(), 30).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    // An epoch that passed its check before the take-over may have been written, no more.
    let last = last_epoch().unwrap();
    assert!(last <= taken + 1, "checkpoints up to epoch {taken} at the take-over, {last} after");
    let row = json(app.get(&format!("/jobs/{id}")).await).await;
    assert_eq!(row["status"], "running", "left to its new claim: {row}");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(last_epoch(), Some(last), "nothing written since");
}

/// `--max-job-memory`: a job whose training step cannot fit is refused when submitted to a
/// `--role all` process on the CPU, with what it needs, the limit and what to change; the same
/// job with a batch that fits trains. One that reached the queue anyway (here through an API
/// process, whose workers it cannot know) fails at once when claimed, claimed once.
#[tokio::test]
async fn a_job_whose_training_step_cannot_fit_the_memory_allowed_is_refused_or_fails_at_once() {
    let app = crate::helpers::spawn_app_with(|c| c.max_job_memory = 1 << 20).await;
    let dataset = app.upload_pets(20, false).await;
    crate::support::install_base_model(&app.data_dir, "tiny", &crate::support::tiny_config(), &["a", "b"]);
    let too_large = json!({"dataset_id": dataset, "base_model": "tiny", "params": {"epochs": 2, "batch_size": 32, "head_init": "random"}});
    let error = assert_error(app.post_json("/jobs", &too_large).await, 422, "job_too_large").await;
    assert!(error.starts_with("a training step needs at least "), "{error}");
    // 36 of the 40 training images stay after the hold-out, so batches are of 32.
    assert!(error.contains("batches of 32 images, f32), more than the 1 MiB of --max-job-memory: lower batch_size"), "{error}");
    // A batch larger than the images kept: judged at their number, as the worker would.
    let larger = json!({"dataset_id": dataset, "base_model": "tiny", "params": {"epochs": 2, "batch_size": 64, "head_init": "random"}});
    let error = assert_error(app.post_json("/jobs", &larger).await, 422, "job_too_large").await;
    assert!(error.contains("batches of 36 images"), "{error}");
    assert_eq!(json(app.get("/jobs").await).await, json!([]), "nothing queued");
    // Steps that fit, or none at all (the probe alone, as the `auto` recipe plans before its
    // probe decides), are queued.
    let fits = app.submit_job(&dataset, json!({"epochs": 2, "batch_size": 2, "head_init": "random"})).await;
    let done = app.wait_job(fits["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let probe = app.submit_job(&dataset, json!({"epochs": 1, "batch_size": 32, "head_init": "probe"})).await;
    assert_eq!(app.wait_job(probe["id"].as_str().unwrap(), 120).await["status"], "succeeded");
    let data_dir = app.data_dir.clone();
    let tmp = app.stop().await;

    // Queued through an API process, then claimed by a worker with the limit.
    let mut config = crate::helpers::test_config(&data_dir);
    config.role = vitforge::config::Role::Api;
    let api = crate::helpers::spawn_with(config).await;
    let queued = api.submit_job(&dataset, too_large["params"].clone()).await;
    let id = queued["id"].as_str().unwrap().to_string();
    api.stop().await;
    let mut config = crate::helpers::test_config(&data_dir);
    config.max_job_memory = 1 << 20;
    let app = crate::helpers::spawn_with(config).await;
    let done = app.wait_job(&id, 60).await;
    assert_eq!(done["status"], "failed", "{done}");
    let error = done["error"].as_str().unwrap();
    assert!(error.contains("batches of 32 images, f32), more than the 1 MiB of --max-job-memory: lower batch_size"), "{error}");
    let claims: i64 = sqlx::query_scalar("select attempts from jobs where id = $1").bind(&id).fetch_one(&app.db).await.unwrap();
    assert_eq!(claims, 1, "not tried again");
    assert_eq!(done["progress"]["step"], 0, "no step taken");
    app.stop().await;
    drop(tmp);
}

#[tokio::test]
async fn bad_job_requests_get_clear_errors() {
    let app = spawn_app().await;
    let dataset = app.upload_pets(3, false).await;
    let post = |body: Value| {
        let app = &app;
        async move { app.post_json("/jobs", &body).await }
    };
    let msg = assert_error(post(json!({"dataset_id": dataset, "params": {"epoch": 3}})).await, 422, "invalid_field").await;
    assert!(msg.contains("epoch"), "{msg}");
    let msg = assert_error(post(json!({"dataset_id": dataset, "params": {"epochs": 0}})).await, 422, "invalid_params").await;
    assert!(msg.contains("params.epochs"), "{msg}");
    // 0.0 is an integer to JSON Schema, so it is read as 0 (and refused as 0); 2.5 is not.
    let msg = assert_error(post(json!({"dataset_id": dataset, "params": {"epochs": 0.0}})).await, 422, "invalid_params").await;
    assert!(msg.contains("params.epochs"), "{msg}");
    // NUL characters: no field takes one (PostgreSQL could not store or compare it).
    let msg = assert_error(post(json!({"dataset_id": "a\u{0}b"})).await, 422, "invalid_field").await;
    assert_eq!(msg, "dataset_id contains a NUL character (\\u0000)");
    let msg = assert_error(post(json!({"dataset_id": dataset, "params": {"a\u{0}": [1, "x\u{0}"]}})).await, 422, "invalid_field").await;
    assert_eq!(msg, "a key of params contains a NUL character (\\u0000)");
    let msg = assert_error(post(json!({"dataset_id": dataset, "base_model": ["ok", "b\u{0}"]})).await, 422, "invalid_field").await;
    assert!(msg.starts_with("base_model[1] contains"), "{msg}");
    let msg = assert_error(post(json!({"dataset_id": dataset, "params": {"epochs": 2.5}})).await, 422, "invalid_field").await;
    assert!(msg.contains("params.epochs"), "{msg}");
    let msg = assert_error(post(json!({"dataset_id": dataset, "params": {"learning_rate": "fast"}})).await, 422, "invalid_field").await;
    assert!(msg.contains("learning_rate"), "{msg}");
    let msg = assert_error(post(json!({"dataset_id": dataset, "params": {"batch_size": 1e300}})).await, 422, "invalid_field").await;
    assert!(msg.contains("batch_size"), "{msg}");
    let msg = assert_error(post(json!({"dataset_id": dataset, "params": {"train_mode": "last_n_layers"}})).await, 422, "invalid_params").await;
    assert!(msg.contains("trainable_layers"), "{msg}");
    assert_error(post(json!({"dataset_id": "nope"})).await, 404, "not_found").await;
    let msg = assert_error(post(json!({"dataset_id": dataset, "params": {"time_budget_secs": 0}})).await, 422, "invalid_params").await;
    assert!(msg.contains("time_budget_secs"), "{msg}");
    let msg = assert_error(post(json!({"dataset_id": dataset, "recipe": "manual", "params": {"after_probe": "auto"}})).await, 422, "invalid_params").await;
    assert!(msg.contains("after_probe") && msg.contains("head_init"), "{msg}");
    let msg = assert_error(post(json!({"dataset_id": dataset, "recipe": "auto", "params": {"probe_views": 9}})).await, 422, "invalid_params").await;
    assert!(msg.contains("probe_views") && msg.contains("between 0 and 8"), "{msg}");
    let msg = assert_error(post(json!({"dataset_id": dataset, "recipe": "manual", "params": {"probe_views": 1}})).await, 422, "invalid_params").await;
    assert!(msg.contains("probe_views") && msg.contains("head_init"), "{msg}");
    let msg = assert_error(post(json!({"dataset_id": dataset, "recipe": "auto", "params": {"probe_views": -1}})).await, 422, "invalid_field").await;
    assert!(msg.contains("probe_views"), "{msg}");
    let msg = assert_error(post(json!({"dataset_id": dataset, "params": {"precision": "fp16"}})).await, 422, "invalid_field").await;
    assert!(msg.contains("precision") && msg.contains("bf16"), "{msg}");
    assert_error(post(json!({"params": {}})).await, 422, "invalid_field").await;
    for (body, kind) in [(json!([]), "an array"), (json!("x"), "a string"), (json!(3), "a number"), (json!(null), "null")] {
        let msg = assert_error(post(body).await, 422, "invalid_field").await;
        assert_eq!(msg, format!("the body must be a JSON object, not {kind}"));
    }
    assert_error(post(json!({"dataset_id": dataset, "colour": 1})).await, 422, "invalid_field").await;
    let msg = assert_error(post(json!({"params": {}})).await, 422, "invalid_field").await;
    assert_eq!(msg, "missing field `dataset_id`");
    // A value of the wrong shape is named by its path, with no line and column: those would
    // count in a re-serialised copy, not in the (here pretty-printed) body that was sent.
    let pretty = format!("{{\n  \"dataset_id\": \"{dataset}\",\n\n  \"recipe\": \"magic\"\n}}");
    let resp = app.client.post(app.url("/jobs")).header("content-type", "application/json").body(pretty).send().await.unwrap();
    let msg = assert_error(resp, 422, "invalid_field").await;
    assert_eq!(msg, "recipe: unknown variant `magic`, expected `auto` or `manual`");
    for path in ["/etc/passwd", "../../secret", "a/b/c", "C:\\model"] {
        let msg = assert_error(post(json!({"dataset_id": dataset, "base_model": path})).await, 422, "invalid_base_model").await;
        assert!(msg.contains("paths are not accepted"), "{msg}");
    }
    let resp = app.client.post(app.url("/jobs")).header("content-type", "application/json").body("{not json").send().await.unwrap();
    assert_error(resp, 400, "invalid_json").await;
    let resp = app.client.post(app.url("/jobs")).body("dataset_id=x").send().await.unwrap();
    assert_error(resp, 415, "expected_json").await;
    assert_error(app.get("/jobs?status=bogus").await, 422, "invalid_query").await;
    assert_error(app.get("/jobs?stat=queued").await, 422, "invalid_query").await;
    assert_error(app.get("/jobs/nope").await, 404, "not_found").await;
    assert_error(app.get("/jobs/nope/metrics").await, 404, "not_found").await;
    assert_error(app.get("/jobs/nope/events").await, 404, "not_found").await;
    let resp = app.client.post(app.url("/jobs/nope/cancel")).send().await.unwrap();
    assert_error(resp, 404, "not_found").await;
    // None of this queued anything.
    assert_eq!(json(app.get("/jobs").await).await.as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn a_job_on_a_missing_hub_model_fails_with_the_reason() {
    let app = spawn_app().await;
    let dataset = app.upload_pets(3, false).await;
    let cache = tempfile::tempdir().unwrap();
    // SAFETY: set before the job thread reads them; no other test in this binary reads them.
    unsafe {
        std::env::set_var("HF_HOME", cache.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let resp = app.post_json("/jobs", &json!({"dataset_id": dataset, "base_model": "someone/not-cached"})).await;
    assert_eq!(resp.status(), 202);
    let job = json(resp).await;
    let done = app.wait_job(job["id"].as_str().unwrap(), 60).await;
    assert_eq!(done["status"], "failed");
    let error = done["error"].as_str().unwrap();
    assert!(error.contains("someone/not-cached") && error.contains("HF_HUB_OFFLINE"), "{error}");
}

#[tokio::test]
async fn without_hyper_parameters_a_job_gets_the_auto_recipe_and_its_model_records_it() {
    let app = spawn_app().await;
    let dataset = app.upload_pets(6, false).await;
    app.submit_job(&dataset, json!({})).await; // installs the tiny base model
    let post = |body: Value| {
        let app = &app;
        async move { json(app.post_json("/jobs", &body).await).await }
    };
    let auto = post(json!({"dataset_id": dataset, "base_model": "tiny"})).await;
    assert_eq!(auto["recipe"], "auto", "{auto}");
    assert_eq!(auto["params"]["head_init"], "probe");
    assert_eq!(auto["params"]["learning_rate"], 1e-5);
    assert_eq!(auto["params"]["early_stopping_patience"], 1);
    assert_eq!(auto["params"]["epochs"], 1);
    assert_eq!((auto["params"]["after_probe"].as_str(), auto["params"]["calibrate"].as_bool()), (Some("auto"), Some(true)));
    // Seed, validation split, a time budget and the precision choose data, limits and arithmetic,
    // not a recipe.
    let seeded = post(json!({"dataset_id": dataset, "base_model": "tiny", "params": {"seed": 7, "validation_split": 0.3, "time_budget_secs": 600, "precision": "bf16"}})).await;
    assert_eq!((seeded["recipe"].as_str(), seeded["params"]["seed"].as_u64()), (Some("auto"), Some(7)));
    assert_eq!(seeded["params"]["precision"], "bf16");
    assert_eq!(seeded["params"]["time_budget_secs"], 600);
    // Any other field means exactly the hyper-parameters given, on Hugging Face's defaults.
    let manual = post(json!({"dataset_id": dataset, "base_model": "tiny", "params": {"epochs": 1}})).await;
    assert_eq!(manual["recipe"], "manual");
    assert_eq!((manual["params"]["head_init"].as_str(), manual["params"]["learning_rate"].as_f64()), (Some("random"), Some(5e-5)));
    // An explicit recipe takes the given fields as overrides of its own defaults.
    let tuned = post(json!({"dataset_id": dataset, "base_model": "tiny", "recipe": "auto", "params": {"epochs": 2}})).await;
    assert_eq!(tuned["params"]["learning_rate"], 1e-5);
    assert_eq!((tuned["recipe"].as_str(), tuned["params"]["epochs"].as_u64()), (Some("auto"), Some(2)));
    assert_eq!(tuned["params"]["head_init"], "probe");
    assert_eq!(tuned["params"]["after_probe"], "given", "given epochs fix what follows the probe");
    let msg = assert_error(app.post_json("/jobs", &json!({"dataset_id": dataset, "recipe": "magic"})).await, 422, "invalid_field").await;
    assert!(msg.contains("recipe"), "{msg}");

    let done = app.wait_job(auto["id"].as_str().unwrap(), 300).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let model = json(app.get(&format!("/models/{}", done["model_id"].as_str().unwrap())).await).await;
    assert_eq!(model["recipe"], "auto");
    assert_eq!(model["params"], auto["params"]);
    let metrics = json(app.get(&format!("/jobs/{}/metrics", auto["id"].as_str().unwrap())).await).await;
    // Epoch 1 is the probe: validated, without training steps.
    assert_eq!(metrics["validation"][0]["epoch"], 1);
    assert_eq!(metrics["train"], json!([]), "{metrics}");
    assert_eq!((done["progress"]["epoch"].as_u64(), done["progress"]["steps"].as_u64()), (Some(1), Some(0)));
    // Five images per class are too few for fine-tuning to pay: the job says so.
    assert_eq!(done["decision"]["action"], "probe_only", "{done}");
    assert_eq!(done["decision"]["epochs"], 1);
    assert!(done["decision"]["reason"].as_str().unwrap().contains("per class"), "{done}");
}

/// `precision`: a bf16 job trains in mixed precision and the job and its model say so; with
/// `auto` the job keeps what was asked and records what ran, and so does its model.
#[tokio::test]
async fn the_precision_a_job_ran_in_is_recorded_on_the_job_and_its_model() {
    let app = spawn_app().await;
    let dataset = app.upload_pets(6, false).await;
    let mut params = small();
    params["precision"] = json!("bf16");
    let bf16 = app.submit_job(&dataset, params).await;
    assert_eq!(bf16["params"]["precision"], "bf16");
    assert_eq!(bf16["precision"], Value::Null, "set when training starts: {bf16}");
    let auto = app.submit_job(&dataset, json!({"epochs": 1, "batch_size": 4, "precision": "auto"})).await;
    let plain = app.submit_job(&dataset, json!({"epochs": 1, "batch_size": 4})).await;
    assert_eq!(plain["params"]["precision"], "f32", "f32 is the default");
    let resolved = vitforge::model::PrecisionChoice::Auto.resolve(&candle_core::Device::Cpu).name();
    for (job, asked, ran) in [(&bf16, "bf16", "bf16"), (&auto, "auto", resolved), (&plain, "f32", "f32")] {
        let done = app.wait_job(job["id"].as_str().unwrap(), 120).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!((done["params"]["precision"].as_str(), done["precision"].as_str()), (Some(asked), Some(ran)), "{done}");
        let model = json(app.get(&format!("/models/{}", done["model_id"].as_str().unwrap())).await).await;
        assert_eq!(model["params"]["precision"], ran, "{model}");
        let metrics = json(app.get(&format!("/jobs/{}/metrics", job["id"].as_str().unwrap())).await).await;
        let losses: Vec<f64> = metrics["train"].as_array().unwrap().iter().map(|p| p["loss"].as_f64().unwrap()).collect();
        assert!(!losses.is_empty() && losses.iter().all(|l| l.is_finite()), "{asked}: {metrics}");
    }
}

/// `DELETE /jobs/{id}` removes an ended job with what the database holds of it, and keeps the
/// model it registered; a job still queued or running is refused (409) until it has ended.
#[tokio::test]
async fn an_ended_job_can_be_deleted_and_its_model_stays() {
    let app = spawn_app().await;
    let dataset = app.upload_pets(3, false).await;
    let done = app.submit_job(&dataset, small()).await;
    let id = done["id"].as_str().unwrap().to_string();
    let done = app.wait_job(&id, 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let model = done["model_id"].as_str().unwrap().to_string();
    let rows = |table: &'static str| {
        let (db, id) = (app.db.clone(), id.clone());
        async move {
            let sql = format!("select count(*) from {table} where job_id = $1");
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql)).bind(id).fetch_one(&db).await.unwrap()
        }
    };
    assert!(rows("job_metrics").await > 0 && rows("job_evaluations").await > 0);

    let long = app.submit_job(&dataset, json!({"epochs": 200, "batch_size": 2})).await;
    let long = long["id"].as_str().unwrap().to_string();
    let msg = assert_error(app.delete(&format!("/jobs/{long}")).await, 409, "job_not_ended").await;
    assert!(msg.contains("cancel it") && (msg.contains("queued") || msg.contains("running")), "{msg}");

    assert_eq!(app.delete(&format!("/jobs/{id}")).await.status(), 204);
    assert_error(app.get(&format!("/jobs/{id}")).await, 404, "not_found").await;
    assert_error(app.get(&format!("/jobs/{id}/metrics")).await, 404, "not_found").await;
    for table in ["job_metrics", "job_evaluations", "job_mistakes", "checkpoints"] {
        assert_eq!(rows(table).await, 0, "{table}");
    }
    let kept = json(app.get(&format!("/models/{model}")).await).await;
    assert_eq!(kept["job_id"], id.as_str(), "the model stays, naming the job it came from");
    assert_error(app.delete(&format!("/jobs/{id}")).await, 404, "not_found").await;
    assert_error(app.delete("/jobs/nope").await, 404, "not_found").await;
    assert_error(app.delete("/jobs/a%00b").await, 400, "invalid_path").await;

    let resp = app.client.post(app.url(&format!("/jobs/{long}/cancel"))).send().await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    assert_eq!(app.wait_job(&long, 60).await["status"], "cancelled");
    assert_eq!(app.delete(&format!("/jobs/{long}")).await.status(), 204);
    assert!(!app.data_dir.join("jobs").join(&long).exists(), "no folder of the job is left");
    assert_eq!(json(app.get("/jobs").await).await, json!([]));
}
