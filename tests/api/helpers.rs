//! `spawn_app()`: a fresh service per test on 127.0.0.1:0 with its own temporary data folder.

use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::multipart::{Form, Part};
use reqwest::{Client, Response};
use serde_json::Value;
use vitforge::config::ServeConfig;
use vitforge::startup::Application;
use vitforge::worker::hub::JobHub;

use crate::support::{install_base_model, tiny_config};

/// A running service and what a test needs to talk to it.
pub struct TestApp {
    pub address: String,
    pub client: Client,
    pub data_dir: PathBuf,
    /// The service's database, for tests that set up rows directly.
    pub db: vitforge::db::Pool,
    /// The service's job hub: tests wait on it for jobs to end instead of polling.
    hub: Arc<JobHub>,
    /// Dropping the sender stops the server.
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _tmp: Option<tempfile::TempDir>,
}

/// The default configuration of a test service rooted at `data_dir`.
pub fn test_config(data_dir: &Path) -> ServeConfig {
    let mut cfg = ServeConfig::default_for(data_dir);
    cfg.database_url = crate::support::database_url(data_dir).map(|url| url.parse().expect("a database URL"));
    cfg.object_store = crate::support::object_store_url(data_dir);
    cfg.port = 0;
    cfg.host = "127.0.0.1".into();
    cfg
}

/// Starts a service on a fresh temporary data folder.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts a service on a fresh temporary data folder, with `adjust` applied to its configuration.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut ServeConfig)) -> TestApp {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = test_config(tmp.path());
    adjust(&mut cfg);
    let mut app = spawn_with(cfg).await;
    app._tmp = Some(tmp);
    app
}

/// Starts a service with an explicit configuration (e.g. to restart on the same data folder).
pub async fn spawn_with(cfg: ServeConfig) -> TestApp {
    vitforge::telemetry::init_for_tests();
    let data_dir = cfg.data_dir.clone();
    let app = Application::build(cfg).await.expect("build app");
    let address = format!("http://127.0.0.1:{}", app.port());
    let db = app.state().db.clone();
    let hub = app.state().jobs.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    TestApp { address, client: Client::new(), data_dir, db, hub, shutdown: Some(tx), handle: Some(handle), _tmp: None }
}

impl TestApp {
    /// The full URL of a path on this service.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.expect("request")
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.client.delete(self.url(path)).send().await.expect("request")
    }

    #[allow(dead_code)] // for the JSON routes' tests
    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client.post(self.url(path)).json(body).send().await.expect("request")
    }

    /// Uploads `bytes` as the multipart `file` part named `file_name`, with an optional `name` part.
    pub async fn post_dataset(&self, file_name: &str, bytes: Vec<u8>, name: Option<&str>) -> Response {
        self.post_upload("/datasets", file_name, bytes, name).await
    }

    /// A multipart upload of `bytes` as the `file` part, and `name`, to `path`.
    pub async fn post_upload(&self, path: &str, file_name: &str, bytes: Vec<u8>, name: Option<&str>) -> Response {
        let mut form = Form::new().part("file", Part::bytes(bytes).file_name(file_name.to_string()));
        if let Some(name) = name {
            form = form.text("name", name.to_string());
        }
        self.client.post(self.url(path)).multipart(form).send().await.expect("request")
    }

    /// The names of the files in the blob store.
    pub fn blobs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.data_dir.join("blobs"))
            .expect("blobs folder")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// The files left in the upload scratch folder.
    pub fn scratch_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.data_dir.join("tmp")).expect("tmp folder").map(|e| e.expect("entry").path()).collect()
    }

    /// Stops the server gracefully and waits for it, keeping the data folder for a restart.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.expect("server task").expect("server result");
        }
        self._tmp.take()
    }
}

/// Reads a whole Server-Sent Events answer (200, `text/event-stream`) into (event, data) pairs.
pub async fn sse_events(resp: Response) -> Vec<(String, Value)> {
    use futures::StreamExt;

    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut body = String::new();
    let mut stream = resp.bytes_stream();
    let reading = async {
        while let Some(chunk) = stream.next().await {
            body.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    };
    tokio::time::timeout(Duration::from_secs(120), reading).await.expect("the stream ends");
    body.split("\n\n")
        .filter_map(|block| {
            let event = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((event.to_string(), serde_json::from_str(data).unwrap()))
        })
        .collect()
}

/// Reads a response as JSON, panicking with the body when it is not JSON.
pub async fn json(resp: Response) -> Value {
    let text = resp.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Asserts the response has `status` and the standard error body with `code`; returns the message.
pub async fn assert_error(resp: Response, status: u16, code: &str) -> String {
    assert_eq!(resp.status().as_u16(), status, "unexpected status");
    let body = json(resp).await;
    assert_eq!(body["error"]["code"], code, "unexpected error body: {body}");
    body["error"]["message"].as_str().expect("message").to_string()
}

impl TestApp {
    /// Uploads a two-class (`cat`, `dog`) zip of `n` images per class, with a test split when
    /// `with_test`; returns the dataset id.
    pub async fn upload_pets(&self, n: u32, with_test: bool) -> String {
        use crate::fixtures::{class_images, zip};
        let mut members = class_images("train/", &["cat", "dog"], n, 1);
        if with_test {
            members.extend(class_images("test/", &["cat", "dog"], 2, 500));
        }
        let resp = self.post_dataset("pets.zip", zip(&members), Some("pets")).await;
        assert_eq!(resp.status(), 201);
        json(resp).await["id"].as_str().unwrap().to_string()
    }

    /// Submits a job on base model `tiny` (installed on first use) and returns its JSON.
    pub async fn submit_job(&self, dataset_id: &str, params: Value) -> Value {
        if !self.data_dir.join("base-models/tiny").exists() {
            install_base_model(&self.data_dir, "tiny", &tiny_config(), &["a", "b"]);
        }
        let body = serde_json::json!({"dataset_id": dataset_id, "base_model": "tiny", "params": params});
        let resp = self.post_json("/jobs", &body).await;
        assert_eq!(resp.status(), 202);
        json(resp).await
    }

    /// Waits until a job has ended (or panics after `secs`), woken by the hub when any job ends.
    pub async fn wait_job(&self, id: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            // Subscribe before looking, so an end between the two is not missed.
            let mut ended = self.hub.ended();
            let job = json(self.get(&format!("/jobs/{id}")).await).await;
            if ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap()) {
                return job;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero() && tokio::time::timeout(left, ended.changed()).await.is_ok(), "job {id} did not finish in {secs} s: {job}");
        }
    }

    /// Waits until no job is queued or running (or panics after `secs`): the queue has drained.
    pub async fn drain(&self, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let mut ended = self.hub.ended();
            let busy: i64 = sqlx::query_scalar("select count(*) from jobs where status in ('queued', 'running')").fetch_one(&self.db).await.unwrap();
            if busy == 0 {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero() && tokio::time::timeout(left, ended.changed()).await.is_ok(), "{busy} jobs still queued or running after {secs} s");
        }
    }
}
