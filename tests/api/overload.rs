//! Overload test, ignored by default (a measurement of a minute or two, best on a release build):
//!
//! ```sh
//! cargo build --release
//! VITFORGE_BIN=target/release/vitforge cargo test --test api -- --ignored --nocapture overload
//! ```
//!
//! A real `vitforge` process serves a ViT-Tiny (224×224, 12 layers) fine-tuned for one epoch.
//! First its `/predict` capacity is measured with a closed loop of `max-batch-size` clients; then
//! requests arrive open-loop at five times that rate for 30 s. Every request must be answered 200
//! or 429 (never an error, never a hang); the 429s must come at once; the accepted requests'
//! p99 latency must stay under a bound that follows from the admission limit; the process's
//! memory must stay bounded; and right after the burst a request must be served at the normal
//! latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fixtures::{class_images, jpeg, zip};
use crate::support::{Launch, install_base_model, rss_mib};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn predict(client: &reqwest::Client, url: &str, body: Vec<u8>) -> (u16, Duration) {
    let started = Instant::now();
    let status = match client.post(url).header("content-type", "image/jpeg").body(body).send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let _ = resp.bytes().await;
            status
        }
        Err(_) => 0,
    };
    (status, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a load measurement; see the module documentation"]
async fn overload_is_answered_429_with_bounded_latency_and_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    install_base_model(&data, "vit-tiny", &vitforge::model::VitConfig::preset("tiny").unwrap(), &["a", "b"]);
    let extra: Vec<String> = std::env::var("VITFORGE_OVERLOAD_ARGS").map(|a| a.split_whitespace().map(String::from).collect()).unwrap_or_default();
    // $VITFORGE_BIN, when set, is the binary measured (to compare builds).
    let server = Launch::new(&data).args(&extra).start();
    let pid = server.pid();
    let client = server.client.clone();
    let form = reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(zip(&class_images("", &["cat", "dog"], 4, 1))).file_name("p.zip"));
    let dataset: Value = client.post(format!("{}/datasets", server.base)).multipart(form).send().await.unwrap().json().await.unwrap();
    let body = json!({"dataset_id": dataset["id"], "base_model": "vit-tiny", "params": {"epochs": 1, "batch_size": 8, "train_mode": "head_only"}});
    let job: Value = client.post(format!("{}/jobs", server.base)).json(&body).send().await.unwrap().json().await.unwrap();
    loop {
        let j: Value = client.get(format!("{}/jobs/{}", server.base, job["id"].as_str().unwrap())).send().await.unwrap().json().await.unwrap();
        match j["status"].as_str().unwrap() {
            "succeeded" => break,
            "failed" | "cancelled" => panic!("{j}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let url = format!("{}/predict", server.base);
    let image = jpeg(11);
    // Warm the model and the connection pool.
    for _ in 0..8 {
        assert_eq!(predict(&client, &url, image.clone()).await.0, 200);
    }
    let (idle_status, idle_latency) = predict(&client, &url, image.clone()).await;
    assert_eq!(idle_status, 200);

    // Capacity: a closed loop of 16 clients (the batch size) for 10 s.
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    let started = Instant::now();
    for _ in 0..16 {
        let (client, url, image, stop) = (client.clone(), url.clone(), image.clone(), stop.clone());
        loops.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(predict(&client, &url, image.clone()).await.0, 200);
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    let mut served = 0;
    for l in loops {
        served += l.await.unwrap();
    }
    let capacity = served as f64 / started.elapsed().as_secs_f64();
    let rss_base = rss_mib(pid, "VmRSS:");

    // Overload: open loop at 5× capacity for 30 s.
    let rate = capacity * 5.0;
    let burst = Duration::from_secs(30);
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut max = 0;
            while sampling.load(Ordering::Relaxed) {
                max = max.max(rss_mib(pid, "VmRSS:"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            max
        })
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut sent = 0u64;
    while started.elapsed() < burst {
        let due = started + Duration::from_secs_f64(sent as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (client, url, image) = (client.clone(), url.clone(), image.clone());
        tasks.push(tokio::spawn(async move { predict(&client, &url, image).await }));
        sent += 1;
    }
    let mut ok = Vec::new();
    let mut rejected = Vec::new();
    let mut other = Vec::new();
    for t in tasks {
        let (status, took) = t.await.unwrap();
        match status {
            200 => ok.push(took.as_secs_f64()),
            429 => rejected.push(took.as_secs_f64()),
            s => other.push(s),
        }
    }
    let burst_secs = started.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    let rss_max = sampler.await.unwrap();
    let hwm = rss_mib(pid, "VmHWM:");
    // Recovery: the very next request is served at the idle latency (give or take a batch delay).
    let (after_status, after_latency) = predict(&client, &url, image.clone()).await;

    ok.sort_by(f64::total_cmp);
    rejected.sort_by(f64::total_cmp);
    let (p50, p99, max) = (percentile(&ok, 0.5), percentile(&ok, 0.99), ok.last().copied().unwrap_or(f64::NAN));
    println!("capacity: {capacity:.1} req/s (closed loop, 16 clients, 1 image each); idle latency {:.1} ms", idle_latency.as_secs_f64() * 1e3);
    println!(
        "overload: {sent} requests at {rate:.0}/s for {burst_secs:.1} s: {} × 200, {} × 429, {} other {:?}",
        ok.len(),
        rejected.len(),
        other.len(),
        &other[..other.len().min(10)]
    );
    println!("accepted latency: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; goodput {:.1} req/s", p50 * 1e3, p99 * 1e3, max * 1e3, ok.len() as f64 / burst_secs);
    println!("429 latency: p50 {:.1} ms, p99 {:.1} ms", percentile(&rejected, 0.5) * 1e3, percentile(&rejected, 0.99) * 1e3);
    println!("RSS: {rss_base} MiB before, {rss_max} MiB max sampled, {hwm} MiB peak (VmHWM) during the burst");
    println!("recovery: next request {after_status} in {:.1} ms", after_latency.as_secs_f64() * 1e3);

    assert!(other.is_empty(), "only 200 and 429: {other:?}");
    assert!(!rejected.is_empty(), "the overflow is refused");
    assert!(percentile(&rejected, 0.99) < 0.25, "429 comes at once");
    assert!(ok.len() as f64 >= capacity * burst_secs * 0.5, "goodput stays near capacity");
    assert!(p99 < 10.0, "accepted p99 {p99:.1} s is bounded");
    assert!(hwm < rss_base + 1024, "memory stays bounded");
    assert_eq!(after_status, 200);
    assert!(after_latency < idle_latency * 4 + Duration::from_millis(200), "recovers at once");
}
