//! A real `vitforge` process killed with SIGKILL in the middle of a fine-tune: after a restart on
//! the same data folder the job resumes from its last epoch checkpoint and finishes with every
//! epoch's metrics exactly once, and its model is served.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fixtures::{class_images, zip};
use crate::support::{Launch, install_base_model, slow_config};

/// A base model big enough that an epoch takes a noticeable time.
fn install_slow_base_model(data_dir: &std::path::Path) {
    install_base_model(data_dir, "slow", &slow_config(), &["a", "b"]);
}

#[tokio::test]
async fn a_killed_server_resumes_its_job_from_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    install_slow_base_model(&data);
    let server = Launch::new(&data).start();
    let client = reqwest::Client::new();
    let form = reqwest::multipart::Form::new()
        .part("file", reqwest::multipart::Part::bytes(zip(&class_images("", &["cat", "dog"], 12, 3))).file_name("pets.zip"));
    let dataset: Value = client.post(format!("{}/datasets", server.base)).multipart(form).send().await.unwrap().json().await.unwrap();
    let epochs = 4;
    let job = server.post_json("/jobs", &json!({"dataset_id": dataset["id"], "base_model": "slow", "params": {"epochs": epochs, "batch_size": 2}})).await;
    let id = job["id"].as_str().unwrap().to_string();

    // Kill it once the first epoch's checkpoint exists and the second epoch is under way.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let j = server.get_json(&format!("/jobs/{id}")).await;
        assert_ne!(j["status"], "succeeded", "the job finished before it could be killed; make it slower");
        if j["progress"]["epoch"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill(); // SIGKILL

    // The phase the job was in is recorded, so the restarted service shows where it was.
    let db = crate::support::open_database(&data).await;
    let (phase, done, total): (Option<String>, i64, i64) =
        sqlx::query_as("select phase, phase_done, phase_total from jobs where id = $1").bind(&id).fetch_one(&db).await.unwrap();
    db.close().await;
    assert!(matches!(phase.as_deref(), Some("training" | "validating" | "saving")), "{phase:?}");
    assert!(total > 0 && done <= total, "{done} of {total}");
    // The checkpoint recorded is named by its folder in the claim's folder, which the next claim
    // takes over under its own name.
    let db = crate::support::open_database(&data).await;
    let (epoch, path): (i64, String) = sqlx::query_as("select epoch, path from checkpoints where job_id = $1").bind(&id).fetch_one(&db).await.unwrap();
    db.close().await;
    assert_eq!(path, format!("epoch-{epoch}"));
    assert!(data.join("jobs").join(&id).join("claim-1").join(&path).join("state.json").is_file(), "{path}");

    let server = Launch::new(&data).start();
    let deadline = Instant::now() + Duration::from_secs(300);
    let done = loop {
        let j = server.get_json(&format!("/jobs/{id}")).await;
        if j["status"] != "running" && j["status"] != "queued" {
            break j;
        }
        assert!(Instant::now() < deadline, "the resumed job did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    let metrics = server.get_json(&format!("/jobs/{id}/metrics")).await;
    let epochs_seen: Vec<u64> = metrics["validation"].as_array().unwrap().iter().map(|v| v["epoch"].as_u64().unwrap()).collect();
    assert_eq!(epochs_seen, (1..=epochs).collect::<Vec<_>>(), "each epoch's metrics exactly once");
    let steps: Vec<u64> = metrics["train"].as_array().unwrap().iter().map(|p| p["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=done["progress"]["steps"].as_u64().unwrap()).collect::<Vec<_>>(), "each step exactly once");

    let image = crate::fixtures::png(7);
    let resp = client.post(format!("{}/predict", server.base)).header("content-type", "image/png").body(image).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let prediction: Value = resp.json().await.unwrap();
    assert_eq!(prediction["model_id"], done["model_id"]);
}
