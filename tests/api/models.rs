//! `/models`: list, inspect, delete, download (and reload), evaluate.

use std::io::Read;

use serde_json::json;
use vitforge::model::{LoadedModel, ModelSource, Vit};

use crate::fixtures::{class_images, file, image, zip};
use image::ImageFormat;
use crate::helpers::{assert_error, json, spawn_app, sse_events};

#[tokio::test]
async fn registry_download_evaluate_and_delete() {
    let app = spawn_app().await;
    let dataset = app.upload_pets(4, true).await;
    let mut models = vec![];
    for seed in [1, 2] {
        let job = app.submit_job(&dataset, json!({"epochs": 1, "seed": seed})).await;
        let done = app.wait_job(job["id"].as_str().unwrap(), 120).await;
        models.push(done["model_id"].as_str().unwrap().to_string());
    }
    let listed = json(app.get("/models").await).await;
    let ids: Vec<&str> = listed.as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![models[1].as_str(), models[0].as_str()], "newest first");
    let m = json(app.get(&format!("/models/{}", models[0])).await).await;
    for key in ["id", "job_id", "base_model", "labels", "metrics", "created_at"] {
        assert!(m.get(key).is_some(), "{key}");
    }
    assert_error(app.get("/models/nope").await, 404, "not_found").await;

    // Download: a tar that unpacks into a loadable model with the same outputs.
    let resp = app.get(&format!("/models/{}/download", models[0])).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-tar");
    let bytes = resp.bytes().await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut archive = tar::Archive::new(bytes.as_ref());
    let mut names = vec![];
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().into_owned();
        names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        let mut data = vec![];
        entry.read_to_end(&mut data).unwrap();
        std::fs::write(out.path().join(path.file_name().unwrap()), data).unwrap();
    }
    names.sort();
    assert_eq!(names, vec!["config.json", "model.safetensors", "preprocessor_config.json"]);
    let device = candle_core::Device::Cpu;
    let downloaded = LoadedModel::load(&ModelSource::Dir(out.path().to_path_buf()), None, &device, 0).unwrap();
    let stored = LoadedModel::load(&ModelSource::Dir(app.data_dir.join("models").join(&models[0])), None, &device, 0).unwrap();
    let pixels = candle_core::Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &device).unwrap();
    let a: Vec<Vec<f32>> = Vit::frozen(&downloaded.cfg, &downloaded.params).unwrap().forward(&pixels).unwrap().to_vec2().unwrap();
    let b: Vec<Vec<f32>> = Vit::frozen(&stored.cfg, &stored.params).unwrap().forward(&pixels).unwrap().to_vec2().unwrap();
    assert_eq!(a, b);
    assert_eq!(downloaded.cfg.labels, vec!["cat", "dog"]);
    assert_error(app.get("/models/nope/download").await, 404, "not_found").await;
    // Files that cannot be opened are an error before the answer starts, not a 200 that breaks off.
    let file = app.data_dir.join("models").join(&models[1]).join("model.safetensors");
    std::fs::rename(&file, file.with_extension("aside")).unwrap();
    let resp = app.get(&format!("/models/{}/download", models[1])).await;
    assert_eq!(resp.status(), 500);
    assert_eq!(resp.headers()["content-type"], "application/json");
    std::fs::rename(file.with_extension("aside"), &file).unwrap();

    // Evaluate on the dataset's test split (the default when it has one), and on everything.
    let report = json(app.post_json(&format!("/models/{}/evaluate", models[0]), &json!({"dataset_id": dataset})).await).await;
    assert_eq!(report["confusion_matrix"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap()).map(|v| v.as_u64().unwrap()).sum::<u64>(), 4);
    let all = json(app.post_json(&format!("/models/{}/evaluate", models[0]), &json!({"dataset_id": dataset, "split": "all"})).await).await;
    assert_eq!(all["per_class"]["cat"]["support"].as_u64().unwrap() + all["per_class"]["dog"]["support"].as_u64().unwrap(), 12);
    for key in ["accuracy", "precision", "recall", "f1", "loss"] {
        assert!(all[key].is_number(), "{key}");
    }
    // A dataset with a class the model does not know.
    let resp = app.post_dataset("birds.zip", zip(&class_images("", &["cat", "owl"], 2, 9)), None).await;
    let birds = json(resp).await["id"].as_str().unwrap().to_string();
    let msg = assert_error(app.post_json(&format!("/models/{}/evaluate", models[0]), &json!({"dataset_id": birds})).await, 422, "unknown_classes").await;
    assert!(msg.contains("owl"), "{msg}");
    // Only the split evaluated counts: an owl among the training images does not stop a test.
    let mut members = class_images("train/", &["cat", "dog", "owl"], 2, 21);
    members.extend(class_images("test/", &["cat", "dog"], 2, 31));
    let mixed = json(app.post_dataset("mixed.zip", zip(&members), None).await).await["id"].as_str().unwrap().to_string();
    let tested = json(app.post_json(&format!("/models/{}/evaluate", models[0]), &json!({"dataset_id": mixed, "split": "test"})).await).await;
    assert_eq!(tested["per_class"]["cat"]["support"].as_u64().unwrap() + tested["per_class"]["dog"]["support"].as_u64().unwrap(), 4, "{tested}");
    let msg = assert_error(app.post_json(&format!("/models/{}/evaluate", models[0]), &json!({"dataset_id": mixed, "split": "all"})).await, 422, "unknown_classes").await;
    assert!(msg.contains("owl"), "{msg}");
    assert_error(app.post_json(&format!("/models/{}/evaluate", models[0]), &json!({"dataset_id": "nope"})).await, 404, "not_found").await;
    assert_error(app.post_json(&format!("/models/{}/evaluate", models[0]), &json!({"dataset_id": dataset, "split": "dev"})).await, 422, "invalid_field").await;
    assert_error(app.post_json("/models/nope/evaluate", &json!({"dataset_id": dataset})).await, 404, "not_found").await;
    let evaluate = app.url(&format!("/models/{}/evaluate", models[0]));
    let resp = app.client.post(&evaluate).header("content-type", "application/json").body("{not json").send().await.unwrap();
    assert_error(resp, 400, "invalid_json").await;
    let resp = app.client.post(&evaluate).body("dataset_id=x").send().await.unwrap();
    assert_error(resp, 415, "expected_json").await;
    assert_error(app.post_json(&format!("/models/{}/evaluate", models[0]), &json!({"split": "all"})).await, 422, "invalid_field").await;
    assert_error(app.post_json(&format!("/models/{}/evaluate", models[0]), &json!({"dataset_id": dataset, "colour": 1})).await, 422, "invalid_field").await;

    // Delete: refused while a queued job continues from it, fine after, refused for the last one.
    let body = json!({"dataset_id": dataset, "base_model": models[0], "params": {"epochs": 1000}});
    let cont = json(app.post_json("/jobs", &body).await).await;
    assert_eq!(cont["base_model"], models[0]);
    assert_error(app.delete(&format!("/models/{}", models[0])).await, 409, "model_in_use").await;
    let resp = app.client.post(app.url(&format!("/jobs/{}/cancel", cont["id"].as_str().unwrap()))).send().await.unwrap();
    assert!(resp.status().is_success());
    app.wait_job(cont["id"].as_str().unwrap(), 60).await;
    let resp = app.delete(&format!("/models/{}", models[0])).await;
    assert_eq!(resp.status(), 204);
    assert!(!app.data_dir.join("models").join(&models[0]).exists());
    assert_error(app.get(&format!("/models/{}", models[0])).await, 404, "not_found").await;
    assert_error(app.delete(&format!("/models/{}", models[1])).await, 409, "only_model").await;
    assert_error(app.delete("/models/nope").await, 404, "not_found").await;
}

/// A dataset deleted while a model is being evaluated on it (its images collected under the
/// evaluation) is answered 404 naming it, never 500. The delete lands at several moments; each
/// answer must be a report or that 404.
#[tokio::test]
async fn deleting_the_dataset_under_an_evaluation_is_404_not_500() {
    let app = spawn_app().await;
    let dataset = app.upload_pets(4, false).await;
    let job = app.submit_job(&dataset, json!({"epochs": 1})).await;
    let model = app.wait_job(job["id"].as_str().unwrap(), 120).await["model_id"].as_str().unwrap().to_string();
    let mut answers = vec![];
    for (i, delay) in [0u64, 10, 30, 60, 120].into_iter().enumerate() {
        // Large photos, so that evaluating them takes a while.
        let members: Vec<_> = (0..40u32)
            .flat_map(|n| ["cat", "dog"].map(|c| file(&format!("{c}/{n}.jpg"), image(ImageFormat::Jpeg, 640, 1000 + i as u32 * 100 + n))))
            .collect();
        let resp = app.post_dataset("many.zip", zip(&members), None).await;
        let doomed = json(resp).await["id"].as_str().unwrap().to_string();
        let url = app.url(&format!("/models/{model}/evaluate"));
        let evaluating = tokio::spawn(app.client.post(url).json(&json!({"dataset_id": doomed})).send());
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        assert_eq!(app.delete(&format!("/datasets/{doomed}")).await.status(), 204);
        let resp = evaluating.await.unwrap().unwrap();
        let status = resp.status().as_u16();
        if status == 404 {
            let msg = assert_error(resp, 404, "not_found").await;
            assert!(msg.contains(&doomed), "{msg}");
        } else {
            assert_eq!(status, 200, "{}", resp.text().await.unwrap());
        }
        answers.push(status);
    }
    eprintln!("answers with the delete 0, 10, 30, 60 and 120 ms after the evaluate: {answers:?}");
}

/// `Accept: text/event-stream` on an evaluation: its progress, the last one with every image
/// evaluated, then the report the plain request gets; an evaluation refused once it has started
/// ends its stream with the error; one refused before keeps its status.
#[tokio::test]
async fn an_evaluation_asking_for_events_reports_its_progress_then_the_report() {
    let app = spawn_app().await;
    let dataset = app.upload_pets(20, true).await;
    let job = app.submit_job(&dataset, json!({"epochs": 1})).await;
    let model = app.wait_job(job["id"].as_str().unwrap(), 120).await["model_id"].as_str().unwrap().to_string();
    let path = format!("/models/{model}/evaluate");
    let streamed = |body: serde_json::Value| app.client.post(app.url(&path)).header("accept", "text/event-stream").json(&body).send();

    let events = sse_events(streamed(json!({"dataset_id": dataset, "split": "all"})).await.unwrap()).await;
    let (last, progress) = events.split_last().unwrap();
    assert_eq!(last.0, "report", "{events:?}");
    assert!(progress.iter().all(|(e, _)| e == "progress"), "{events:?}");
    assert_eq!(progress.last().unwrap().1, json!({"stage": "evaluating", "images": 44, "evaluated": 44}), "{events:?}");
    let plain = json(app.post_json(&path, &json!({"dataset_id": dataset, "split": "all"})).await).await;
    assert_eq!(last.1, plain, "the same report either way");

    // Classes the model lacks are found once the evaluation runs: an `error` event.
    let owls = json(app.post_dataset("owls.zip", zip(&class_images("", &["cat", "owl"], 2, 9)), None).await).await["id"].clone();
    let events = sse_events(streamed(json!({"dataset_id": owls})).await.unwrap()).await;
    let (last, _) = events.split_last().unwrap();
    assert_eq!(last.0, "error", "{events:?}");
    assert_eq!((last.1["status"].clone(), last.1["error"]["code"].clone()), (json!(422), json!("unknown_classes")));

    // A dataset that is not there, a bad body: refused before the stream, with their status.
    assert_error(streamed(json!({"dataset_id": "nope"})).await.unwrap(), 404, "not_found").await;
    assert_error(streamed(json!({"dataset_id": dataset, "split": "dev"})).await.unwrap(), 422, "invalid_field").await;
    let resp = app.client.post(app.url("/models/nope/evaluate")).header("accept", "text/event-stream").json(&json!({"dataset_id": dataset})).send().await.unwrap();
    assert_error(resp, 404, "not_found").await;
}
