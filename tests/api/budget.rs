//! The memory budget for work in flight (`--max-inflight-bytes`): concurrent `/predict` bodies and
//! dataset uploads against a real `vitforge` process with a small budget. Every answer must be
//! 2xx, 4xx or 429 (never a 5xx, never a lost connection), `/healthz` must answer throughout,
//! the process's peak resident memory must stay under the budget + its resting size + 256 MiB,
//! and the dataset and model stored before must be intact after.
//!
//! `cargo test` runs it at a small scale (24 bodies of 12 MiB, 4 uploads of 112 MiB, 192 MiB
//! budget). The issue's scale (64 bodies of 60 MiB, 16 uploads of 1 GiB, 1 GiB budget: 16 GiB
//! through the disk) is a measurement, run explicitly:
//!
//! ```sh
//! cargo test --test api -- --ignored --nocapture memory_budget_at_full_scale
//! ```

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use image::{ImageFormat, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use reqwest::multipart::{Form, Part};

use crate::fixtures;
use crate::hostile::{snapshot, store_dataset_and_model};
use crate::support::{Launch, install_base_model, reset_peak_rss, rss_mib, tiny_config};

const MIB: u64 = 1 << 20;

/// One run's size.
struct Scale {
    budget: u64,
    predicts: usize,
    /// Side of the square random-pixel PNG each `/predict` body holds.
    predict_side: u32,
    uploads: usize,
    /// Bytes of each upload (a tar of a few images and 8 MiB files that are no image).
    upload_bytes: u64,
}

/// A PNG of random pixels (incompressible, so the body is about `side² × 3` bytes).
fn noise_png(side: u32) -> Bytes {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let img = RgbImage::from_fn(side, side, |_, _| Rgb([rng.random(), rng.random(), rng.random()]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    Bytes::from(out.into_inner())
}

/// A tar header of a regular file.
fn tar_header(name: &str, size: u64) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_path(name).unwrap();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_cksum();
    header.as_bytes().to_vec()
}

/// An upload of about `total` bytes, generated as it is sent (never whole in memory): a tar with
/// four small images per class, then 8 MiB files of zeros (no image: rejected one by one).
fn upload_body(total: u64) -> (reqwest::Body, u64) {
    let mut head = Vec::new();
    for i in 0..8u32 {
        let (name, bytes) = (format!("{}/{i}.png", if i < 4 { "a" } else { "b" }), fixtures::png(i));
        head.extend(tar_header(&name, bytes.len() as u64));
        head.extend(&bytes);
        head.resize(head.len().div_ceil(512) * 512, 0);
    }
    const PAD: u64 = 8 * MIB;
    let pads = total.saturating_sub(head.len() as u64) / (PAD + 512);
    let len = head.len() as u64 + pads * (PAD + 512) + 1024;
    let chunks = futures::stream::iter(std::iter::once(Bytes::from(head)).chain((0..pads).flat_map(|i| {
        let header = Bytes::from(tar_header(&format!("a/pad-{i}.bin"), PAD));
        std::iter::once(header).chain((0..8).map(|_| Bytes::from(vec![0u8; MIB as usize])))
    })).chain(std::iter::once(Bytes::from(vec![0u8; 1024]))))
    .map(Ok::<Bytes, std::io::Error>);
    (reqwest::Body::wrap_stream(chunks), len)
}

async fn run(scale: Scale) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    install_base_model(&data, "tiny", &tiny_config(), &["a", "b"]);
    let server = Launch::new(&data).args(&["--max-inflight-bytes", &scale.budget.to_string()]).start();
    let pid = server.pid();
    let (dataset_id, model_id) = store_dataset_and_model(&server).await;
    let before = snapshot(&server, &data, &dataset_id, &model_id).await;
    let body = noise_png(scale.predict_side);
    // Warm the model and the allocator with one request of the size to come.
    let warm = server.client.post(server.url("/predict")).header("content-type", "image/png").body(body.clone()).send().await.unwrap();
    assert_eq!(warm.status(), 200, "{}", warm.text().await.unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = rss_mib(pid, "VmRSS:");
    reset_peak_rss(pid);

    // /healthz, every 50 ms, throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let health = {
        let (client, url, stop) = (server.client.clone(), server.url("/healthz"), stop.clone());
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let status = tokio::time::timeout(Duration::from_secs(5), client.get(&url).send()).await;
                assert!(matches!(status, Ok(Ok(ref r)) if r.status() == 200), "/healthz did not answer: {status:?}");
                worst = worst.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            worst
        })
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..scale.predicts {
        let (client, url, body) = (server.client.clone(), server.url("/predict"), body.clone());
        tasks.push(tokio::spawn(async move {
            let resp = client.post(url).header("content-type", "image/png").body(body).send().await.expect("an answer, not a dropped connection");
            ("predict", resp.status().as_u16(), resp.headers().contains_key("retry-after"), resp.text().await.unwrap_or_default())
        }));
    }
    for _ in 0..scale.uploads {
        let (client, url) = (server.client.clone(), server.url("/datasets"));
        let (body, len) = upload_body(scale.upload_bytes);
        tasks.push(tokio::spawn(async move {
            let form = Form::new().part("file", Part::stream_with_length(body, len).file_name("big.tar"));
            let resp = client.post(url).multipart(form).send().await.expect("an answer, not a dropped connection");
            ("upload", resp.status().as_u16(), resp.headers().contains_key("retry-after"), resp.text().await.unwrap_or_default())
        }));
    }
    let mut answers: Vec<(&str, u16)> = Vec::new();
    for task in tasks {
        let (what, status, retry_after, text) = task.await.unwrap();
        assert!((200..500).contains(&status), "{what}: {status} {text}");
        if status == 429 {
            assert!(retry_after && text.contains("\"code\""), "{what}: 429 with Retry-After and the error body: {text}");
        }
        answers.push((what, status));
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let worst_health = health.await.unwrap();
    let peak = rss_mib(pid, "VmHWM:");
    let count = |what: &str, status: u16| answers.iter().filter(|a| **a == (what, status)).count();
    let (ok, busy) = (count("predict", 200), count("predict", 429));
    let (stored, refused) = (count("upload", 201), count("upload", 429));
    eprintln!(
        "budget {} MiB: {} /predict of {} MiB → {ok} × 200, {busy} × 429; {} uploads of {} MiB → {stored} × 201, {refused} × 429; \
         {:.1} s; /healthz worst {} ms; resting {baseline} MiB, peak {peak} MiB",
        scale.budget / MIB,
        scale.predicts,
        body.len() as u64 / MIB,
        scale.uploads,
        scale.upload_bytes / MIB,
        took.as_secs_f64(),
        worst_health.as_millis(),
    );
    assert!(ok > 0, "some predictions are served");
    assert!(stored > 0, "some uploads are stored");
    let bound = scale.budget / MIB + baseline + 256;
    assert!(peak <= bound, "peak resident memory {peak} MiB over the bound {bound} MiB");
    let after = snapshot(&server, &data, &dataset_id, &model_id).await;
    assert_eq!(before, after, "the stored dataset and model are intact");
    // Every reservation was given back.
    let metrics = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "vitforge_inflight_bytes 0"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_bodies_stay_within_the_memory_budget() {
    run(Scale { budget: 192 * MIB, predicts: 24, predict_side: 2048, uploads: 4, upload_bytes: 112 * MIB }).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: 16 GiB of uploads through the disk; see the module documentation"]
async fn memory_budget_at_full_scale() {
    run(Scale { budget: 1024 * MIB, predicts: 64, predict_side: 4580, uploads: 16, upload_bytes: 1024 * MIB }).await;
}
