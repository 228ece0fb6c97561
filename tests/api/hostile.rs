//! The hostile input corpus, run against a real `vitforge` process with its default limits.
//!
//! A dataset is uploaded and a model trained first. Then every hostile input goes in, one after
//! another, and each must get a 4xx or be rejected file by file, never a 5xx. Afterwards the
//! process must still run and must not have panicked, its peak resident memory while it handled
//! the corpus must be under [`RSS_BOUND_MIB`] (read from `/proc/<pid>/status` `VmHWM`, reset
//! before each input, so the figure is the corpus's own), nothing may have been written outside
//! its data folder (its working folder and its `TMPDIR` are empty canary folders), and the
//! dataset and model stored before must be exactly as they were.
//!
//! `cargo test --test api hostile -- --nocapture` prints the table of inputs with their answer,
//! time and memory peak.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::ImageFormat;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sha2::Digest;

use crate::fixtures::{self, Member, file};
use crate::hostile_inputs::*;
use crate::support::{ChildServer, Launch, entries_under, install_base_model, reset_peak_rss, rss_mib, tiny_config};

/// Peak resident memory allowed while one hostile input is handled, in MiB. The largest single
/// allocations are an entry of up to `--max-image-bytes` (64 MiB) read whole, a `/predict` body
/// of up to `--max-predict-bytes` (64 MiB) with its decoded copy, and one image's decoder buffers
/// (under 40 megapixels); see the README's "Memory" section.
const RSS_BOUND_MIB: u64 = 1024;

type Server = ChildServer;

/// Starts `vitforge serve` on `data` with `cwd` as working folder, `tmp` as `TMPDIR`, and its log
/// in `log`.
fn start(data: &Path, cwd: &Path, tmp: &Path, log: &Path) -> Server {
    Launch::new(data).cwd(cwd).env("TMPDIR", tmp).log_file(log).start()
}

fn peak_mib(pid: u32) -> u64 {
    rss_mib(pid, "VmHWM:")
}

/// What a hostile input may be answered with.
enum Expect {
    /// One of these statuses (and the standard error body when it is an error).
    Status(&'static [u16]),
    /// 201, with each of these files listed in `rejected`.
    Rejected(Vec<String>),
}

/// Runs the corpus and keeps the table of results.
struct Corpus<'a> {
    server: &'a Server,
    rows: Vec<String>,
    worst_peak: (u64, String),
}

impl Corpus<'_> {
    async fn check(&mut self, name: &str, request: reqwest::RequestBuilder, expect: Expect) -> Value {
        let pid = self.server.pid();
        reset_peak_rss(pid);
        let started = Instant::now();
        // A fresh connection per check: a server that answers (413, 400) before reading a whole
        // body closes its connection, and a pooled client could send the next check down it.
        let request = request.header(reqwest::header::CONNECTION, "close");
        let resp = request.send().await.unwrap_or_else(|e| panic!("{name}: no answer: {e:?}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let took = started.elapsed();
        let peak = peak_mib(pid);
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(status < 500, "{name}: {status} {text}");
        match &expect {
            Expect::Status(allowed) => {
                assert!(allowed.contains(&status), "{name}: {status} not in {allowed:?}: {text}");
                if status >= 400 {
                    assert!(body["error"]["code"].is_string(), "{name}: error body expected: {text}");
                }
            }
            Expect::Rejected(files) => {
                assert_eq!(status, 201, "{name}: {text}");
                let rejected: Vec<&str> = body["rejected"].as_array().unwrap().iter().map(|r| r["file"].as_str().unwrap()).collect();
                for f in files {
                    assert!(rejected.contains(&f.as_str()), "{name}: '{f}' not rejected: {text}");
                }
            }
        }
        let outcome = match (status, &body["error"]["code"]) {
            (_, Value::String(code)) => code.clone(),
            (201, _) => format!("{} rejected, {} kept", body["rejected_total"], body["num_images"]),
            _ => String::new(),
        };
        self.rows.push(format!("| {name} | {status} {outcome} | {:.2} s | {peak} MiB |", took.as_secs_f64()));
        if peak > self.worst_peak.0 {
            self.worst_peak = (peak, name.to_string());
        }
        body
    }

    fn upload(&self, file_name: &str, bytes: Vec<u8>) -> reqwest::RequestBuilder {
        let form = Form::new().part("file", Part::bytes(bytes).file_name(file_name.to_string()));
        self.server.client.post(format!("{}/datasets", self.server.base)).multipart(form)
    }

    fn post_json(&self, path: &str, body: String) -> reqwest::RequestBuilder {
        self.server.client.post(format!("{}{path}", self.server.base)).header("content-type", "application/json").body(body)
    }

    fn predict_raw(&self, content_type: &str, bytes: Vec<u8>) -> reqwest::RequestBuilder {
        self.server.client.post(format!("{}/predict", self.server.base)).header("content-type", content_type).body(bytes)
    }
}

/// Two classes of good images, so an archive with them is a valid upload whatever else it holds.
fn good_members() -> Vec<Member> {
    vec![
        file("cat/good-1.jpg", good(ImageFormat::Jpeg, 1)),
        file("cat/good-2.png", good(ImageFormat::Png, 2)),
        file("dog/good-1.jpg", good(ImageFormat::Jpeg, 3)),
        file("dog/good-2.png", good(ImageFormat::Png, 4)),
    ]
}

fn good_raw() -> Vec<RawEntry> {
    good_members()
        .into_iter()
        .map(|m| match m {
            Member::File(name, bytes) => RawEntry::file(&name, &bytes),
            _ => unreachable!(),
        })
        .collect()
}

fn good_tar_members() -> Vec<(tar::Header, Vec<u8>)> {
    good_members()
        .into_iter()
        .map(|m| match m {
            Member::File(name, bytes) => (tar_header(name.as_bytes(), tar::EntryType::Regular, bytes.len() as u64, None), bytes),
            _ => unreachable!(),
        })
        .collect()
}

fn link_header(name: &str, kind: tar::EntryType, target: &str) -> tar::Header {
    let mut h = tar_header(name.as_bytes(), kind, 0, None);
    h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
    h.set_cksum();
    h
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// What tests of harm store first: a dataset (cat, dog) and a model trained on it for one epoch
/// from base model `tiny`; returns their ids.
pub(crate) async fn store_dataset_and_model(server: &Server) -> (String, String) {
    let form = Form::new().part("file", Part::bytes(fixtures::zip(&fixtures::class_images("", &["cat", "dog"], 6, 1))).file_name("pets.zip"));
    let dataset: Value = server.client.post(server.url("/datasets")).multipart(form).send().await.unwrap().json().await.unwrap();
    let dataset_id = dataset["id"].as_str().unwrap().to_string();
    let body = json!({"dataset_id": dataset_id, "base_model": "tiny", "params": {"epochs": 1, "batch_size": 4}});
    let job: Value = server.client.post(server.url("/jobs")).json(&body).send().await.unwrap().json().await.unwrap();
    let job_id = job["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let done = loop {
        let j = server.get_json(&format!("/jobs/{job_id}")).await;
        if j["status"] == "succeeded" || j["status"] == "failed" {
            break j;
        }
        assert!(Instant::now() < deadline, "training did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    (dataset_id, done["model_id"].as_str().unwrap().to_string())
}

/// The stored state a hostile input must not change: the dataset and model as the API shows
/// them, the dataset's blobs by content, the model's files by content, and a prediction.
pub(crate) async fn snapshot(s: &Server, data: &Path, dataset: &str, model: &str) -> Value {
    let get = |path: String| {
        let c = s.client.clone();
        async move { c.get(path).send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let db = crate::support::open_database(data).await;
    let blobs: Vec<String> =
        sqlx::query_scalar("select blob from dataset_images where dataset_id = $1 order by rowid").bind(dataset).fetch_all(&db).await.unwrap();
    db.close().await;
    let blob_hashes: Vec<String> = blobs.iter().map(|b| sha256_hex(&std::fs::read(data.join("blobs").join(b)).unwrap())).collect();
    assert_eq!(blob_hashes, blobs, "every blob's content matches its name");
    let model_dir = data.join("models").join(model);
    let model_files: Vec<(String, String)> = ["config.json", "model.safetensors", "preprocessor_config.json"]
        .iter()
        .map(|f| (f.to_string(), sha256_hex(&std::fs::read(model_dir.join(f)).unwrap())))
        .collect();
    let prediction: Value = s
        .client
        .post(format!("{}/predict?model={model}", s.base))
        .header("content-type", "image/jpeg")
        .body(fixtures::jpeg(5))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    json!({
        "dataset": get(format!("{}/datasets/{dataset}", s.base)).await,
        "model": get(format!("{}/models/{model}", s.base)).await,
        "blobs": blobs,
        "model_files": model_files,
        "prediction": prediction,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_inputs_get_4xx_or_per_file_rejections_and_harm_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, cwd, tmpdir, log) = (tmp.path().join("data"), tmp.path().join("cwd"), tmp.path().join("tmpdir"), tmp.path().join("server.log"));
    for d in [&data, &cwd, &tmpdir] {
        std::fs::create_dir_all(d).unwrap();
    }
    // An image outside the data folder, which links and `..` entries name.
    std::fs::write(cwd.join("secret.jpg"), good(ImageFormat::Jpeg, 99)).unwrap();
    install_base_model(&data, "tiny", &tiny_config(), &["a", "b"]);
    let server = start(&data, &cwd, &tmpdir, &log);
    let pid = server.pid();

    let (dataset_id, model_id) = store_dataset_and_model(&server).await;
    let before = snapshot(&server, &data, &dataset_id, &model_id).await;
    let rss_before = peak_mib(pid);

    let mut c = Corpus { server: &server, rows: Vec::new(), worst_peak: (0, String::new()) };

    // --- Archives -------------------------------------------------------------------------
    let (zeros64, crc64) = deflated_zeros((64 << 20) - 1);
    let zeros64 = std::sync::Arc::new(zeros64);
    let bomb_entry = |name: String, size: u32| RawEntry { name: name.into_bytes(), utf8: true, method: 8, crc: crc64, data: zeros64.clone(), size, mode: 0o100644 };

    let mut wide = good_raw();
    wide.extend((0..150).map(|i| bomb_entry(format!("cat/bomb-{i}.jpg"), (64 << 20) - 1)));
    c.check("zip bomb, wide: 150 entries of 64 MiB of zeros (9.4 GiB, 10 MB sent)", c.upload("wide.zip", raw_zip(&wide, false)), Expect::Status(&[413])).await;

    let mut budget = good_raw();
    budget.extend((0..12).map(|i| bomb_entry(format!("dog/zeros-{i}.jpg"), (64 << 20) - 1)));
    let names = (0..12).map(|i| format!("dog/zeros-{i}.jpg")).collect();
    c.check("zip bomb within the unpack limit: 12 entries of 64 MiB of zeros, each read", c.upload("budget.zip", raw_zip(&budget, false)), Expect::Rejected(names)).await;

    let mut liars = good_raw();
    liars.extend((0..6).map(|i| bomb_entry(format!("cat/liar-{i}.jpg"), 1024)));
    let names = (0..6).map(|i| format!("cat/liar-{i}.jpg")).collect();
    c.check("zip bomb, headers understate: 6 entries declare 1 KiB, inflate to 64 MiB", c.upload("liars.zip", raw_zip(&liars, false)), Expect::Rejected(names)).await;

    let overlap: Vec<RawEntry> = (0..40).map(|i| bomb_entry(format!("cat/overlap-{i}.jpg"), (64 << 20) - 1)).collect();
    c.check("zip bomb, overlapping: 40 central entries share one 64 MiB entry", c.upload("overlap.zip", raw_zip(&overlap, true)), Expect::Status(&[400, 413, 422])).await;

    let mut deep = good_members();
    deep.push(file("cat/42.zip", nested_zip(3)));
    c.check("zip bomb, deep: 42.zip-style nesting, 3 levels of 10", c.upload("deep.zip", fixtures::zip(&deep)), Expect::Rejected(vec!["cat/42.zip".into()])).await;

    let mut nested = good_members();
    nested.push(file("cat/inner.zip", fixtures::zip(&good_members())));
    nested.push(file("dog/inner.tar.gz", fixtures::tar_gz(&good_members())));
    nested.push(file("dog/inner.tar", fixtures::tar(&good_members())));
    c.check(
        "nested archives (zip, tar, tar.gz inside a zip)",
        c.upload("nested.zip", fixtures::zip(&nested)),
        Expect::Rejected(vec!["cat/inner.zip".into(), "dog/inner.tar.gz".into(), "dog/inner.tar".into()]),
    )
    .await;

    let evil_paths = ["/tmp/abs.jpg", "../../cwd/evil.jpg", "cat/../../../evil.jpg", "C:/evil.jpg", "cat\\..\\..\\evil.jpg"];
    let mut paths = good_raw();
    paths.extend(evil_paths.iter().map(|p| RawEntry::file(p, &good(ImageFormat::Jpeg, 50))));
    let shown: Vec<String> = evil_paths.iter().map(|p| p.to_string()).collect();
    c.check("absolute and '..' paths in a zip", c.upload("paths.zip", raw_zip(&paths, false)), Expect::Rejected(shown.clone())).await;
    let mut tar_paths = good_tar_members();
    tar_paths.extend(evil_paths.iter().map(|p| {
        let bytes = good(ImageFormat::Jpeg, 51);
        (tar_header(p.as_bytes(), tar::EntryType::Regular, bytes.len() as u64, None), bytes)
    }));
    c.check("absolute and '..' paths in a tar", c.upload("paths.tar", raw_tar(&tar_paths)), Expect::Rejected(shown)).await;

    let mut links = good_tar_members();
    links.push((link_header("cat/passwd.jpg", tar::EntryType::Symlink, "/etc/passwd"), vec![]));
    links.push((link_header("cat/secret.jpg", tar::EntryType::Symlink, "../../cwd/secret.jpg"), vec![]));
    links.push((link_header("dog/hard.jpg", tar::EntryType::Link, "../cwd/secret.jpg"), vec![]));
    links.push((link_header("dog/hard-passwd.jpg", tar::EntryType::Link, "/etc/passwd"), vec![]));
    let names = ["cat/passwd.jpg", "cat/secret.jpg", "dog/hard.jpg", "dog/hard-passwd.jpg"].map(String::from).to_vec();
    c.check("symbolic and hard links in a tar", c.upload("links.tar", raw_tar(&links)), Expect::Rejected(names)).await;
    let mut zip_links = good_raw();
    zip_links.push(RawEntry { mode: 0o120777, ..RawEntry::file("cat/link.jpg", b"/etc/passwd") });
    c.check("a symbolic link in a zip", c.upload("links.zip", raw_zip(&zip_links, false)), Expect::Rejected(vec!["cat/link.jpg".into()])).await;

    let mut dup_tar = good_tar_members();
    let again = good(ImageFormat::Png, 60);
    dup_tar.push((tar_header(b"cat/good-1.jpg", tar::EntryType::Regular, again.len() as u64, None), again));
    c.check("duplicate names in a tar", c.upload("dup.tar", raw_tar(&dup_tar)), Expect::Rejected(vec!["cat/good-1.jpg".into()])).await;
    let mut dup_zip = good_raw();
    dup_zip.push(RawEntry::file("dog/good-1.jpg", &good(ImageFormat::Png, 61)));
    c.check("duplicate names in a zip", c.upload("dup.zip", raw_zip(&dup_zip, false)), Expect::Status(&[400])).await;

    let mut utf8_tar = good_tar_members();
    let bytes = good(ImageFormat::Jpeg, 62);
    utf8_tar.push((tar_header(b"cat/\xff\xfe-bad.jpg", tar::EntryType::Regular, bytes.len() as u64, None), bytes.clone()));
    c.check("a non-UTF-8 name in a tar", c.upload("names.tar", raw_tar(&utf8_tar)), Expect::Rejected(vec!["cat/\u{fffd}\u{fffd}-bad.jpg".into()])).await;
    let mut utf8_zip = good_raw();
    utf8_zip.push(RawEntry { name: b"dog/\xc3\x28-bad.jpg".to_vec(), ..RawEntry::file("x", &bytes) });
    // The zip reader reads a name that is not UTF-8 as CP437 whatever its flag says: it arrives
    // as "dog/├(-bad.jpg", a harmless name that is never used as a path.
    c.check("a non-UTF-8 name flagged UTF-8 in a zip (read as CP437)", c.upload("names.zip", raw_zip(&utf8_zip, false)), Expect::Status(&[201])).await;

    let mut sparse = good_tar_members();
    sparse.push((tar_header(b"cat/sparse.jpg", tar::EntryType::GNUSparse, 512, Some(1 << 30)), vec![0xff; 512]));
    c.check("a 1 GiB GNU sparse member in a tar", c.upload("sparse.tar", raw_tar(&sparse)), Expect::Rejected(vec!["cat/sparse.jpg".into()])).await;
    c.check(
        "a 1 GiB member of zeros in a tar.gz (1 MB sent)",
        c.upload("huge.tgz", tar_gz_with_zeros(&good_members(), "dog/huge.jpg", 1 << 30)),
        Expect::Rejected(vec!["dog/huge.jpg".into()]),
    )
    .await;
    let mut truncated = raw_tar(&good_tar_members());
    truncated.truncate(truncated.len() - 1024);
    truncated.extend_from_slice(tar_header(b"cat/missing.jpg", tar::EntryType::Regular, 1 << 30, None).as_bytes());
    c.check("a tar member declaring 1 GiB with no data", c.upload("cut.tar", truncated), Expect::Status(&[400])).await;

    // --- Images -------------------------------------------------------------------------------
    let damaged = damaged_images();
    let mut members = good_members();
    members.extend(damaged.iter().enumerate().map(|(i, (name, bytes))| file(&format!("{}/{name}", ["cat", "dog"][i % 2]), bytes.clone())));
    c.check(&format!("{} truncated and bit-flipped JPEG/PNG/WebP files in a zip", damaged.len()), c.upload("damaged.zip", fixtures::zip(&members)), Expect::Status(&[201])).await;

    let big_png = png_declaring(100_000, 100_000);
    let frames = gif_with_frames(5000);
    let icc_jpeg = jpeg_with_metadata(255);
    let icc_png = png_with_icc_bomb(256 << 20);
    let exif_png = png_with_chunk(b"eXIf", &vec![0x4du8; 20 << 20]);
    let icc_webp = webp_with_icc(20 << 20);
    let odd: Vec<(&str, &str, &Vec<u8>)> = vec![
        ("a PNG declaring 100000×100000 pixels", "image/png", &big_png),
        ("a GIF of 5000 frames", "image/gif", &frames),
        ("a JPEG with 16 MB of ICC and 16 MB of EXIF segments", "image/jpeg", &icc_jpeg),
        ("a PNG whose ICC profile inflates to 256 MiB", "image/png", &icc_png),
        ("a PNG with a 20 MiB eXIf chunk", "image/png", &exif_png),
        ("a WebP with a 20 MiB ICC chunk", "image/webp", &icc_webp),
    ];
    let mut members = good_members();
    members.push(file("cat/declares-10-gigapixels.png", big_png.clone()));
    for (i, (_, _, bytes)) in odd.iter().enumerate().skip(1) {
        members.push(file(&format!("dog/odd-{i}.img"), (*bytes).clone()));
    }
    c.check("those odd images in a zip", c.upload("odd.zip", fixtures::zip(&members)), Expect::Rejected(vec!["cat/declares-10-gigapixels.png".into()])).await;
    for (name, content_type, bytes) in &odd {
        c.check(&format!("/predict: {name}"), c.predict_raw(content_type, (*bytes).clone()), Expect::Status(&[200, 400])).await;
    }
    // Within the pixel limit but as large as it allows: 36 megapixels each, 100 KB each.
    let mut pixel_bomb = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image::RgbImage::new(6000, 6000)).write_to(&mut pixel_bomb, ImageFormat::Png).unwrap();
    let pixel_bomb = pixel_bomb.into_inner();
    let parts = (0..4).fold(Form::new(), |f, i| f.part(format!("p{i}"), Part::bytes(pixel_bomb.clone()).file_name("big.png")));
    c.check(
        &format!("/predict: 4 PNGs of 6000×6000 pixels, {} KB each", pixel_bomb.len() / 1000),
        server.client.post(format!("{}/predict", server.base)).multipart(parts),
        Expect::Status(&[200]),
    )
    .await;
    for (name, bytes) in damaged.iter().step_by(7) {
        c.check(&format!("/predict: damaged {name}"), c.predict_raw("application/octet-stream", bytes.clone()), Expect::Status(&[200, 400])).await;
    }

    // --- Parquet --------------------------------------------------------------------------
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type};
    let image_as_int = parquet_of("message schema { optional int64 image; optional int64 label; }", Compression::UNCOMPRESSED, |rg| {
        for _ in 0..2 {
            let mut col = rg.next_column().unwrap().unwrap();
            col.typed::<Int64Type>().write_batch(&[1, 2], Some(&[1, 1]), None).unwrap();
            col.close().unwrap();
        }
    });
    c.check("Parquet: the image column is an integer", c.upload("a.parquet", image_as_int), Expect::Status(&[422])).await;
    let bytes_as_int = parquet_of("message schema { optional group image { optional int32 bytes; } optional int64 label; }", Compression::UNCOMPRESSED, |rg| {
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<Int32Type>().write_batch(&[1, 2], Some(&[2, 2]), None).unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<Int64Type>().write_batch(&[0, 1], Some(&[1, 1]), None).unwrap();
        col.close().unwrap();
    });
    c.check("Parquet: image.bytes is an integer", c.upload("b.parquet", bytes_as_int), Expect::Status(&[422])).await;
    let label_as_double = parquet_of("message schema { optional group image { optional binary bytes; } optional double label; }", Compression::UNCOMPRESSED, |rg| {
        let mut col = rg.next_column().unwrap().unwrap();
        let imgs = [ByteArray::from(good(ImageFormat::Png, 70)), ByteArray::from(good(ImageFormat::Png, 71))];
        col.typed::<ByteArrayType>().write_batch(&imgs, Some(&[2, 2]), None).unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<DoubleType>().write_batch(&[0.5, 1e308], Some(&[1, 1]), None).unwrap();
        col.close().unwrap();
    });
    c.check("Parquet: the label column holds doubles", c.upload("c.parquet", label_as_double), Expect::Status(&[422])).await;

    let images: Vec<Vec<u8>> = (0..4).map(|i| good(ImageFormat::Png, 80 + i)).chain([vec![0u8; 48 << 20]]).collect();
    for (codec, name) in [(Compression::GZIP(Default::default()), "gzip"), (Compression::ZSTD(Default::default()), "zstd")] {
        let mut lying = hf_parquet_compressed(&images, codec);
        patch_page_size(&mut lying, 32 << 20, 1 << 20);
        c.check(&format!("Parquet: a {name} page declares 1 MiB and inflates to 48 MiB"), c.upload("lie.parquet", lying), Expect::Status(&[413])).await;
    }
    let mut snappy = hf_parquet_compressed(&[good(ImageFormat::Png, 90), good(ImageFormat::Png, 91), vec![0u8; 3 << 20]], Compression::SNAPPY);
    patch_page_size(&mut snappy, 2 << 20, 120 << 20);
    c.check("Parquet: a snappy page of 3 MiB declares 120 MiB", c.upload("snappy.parquet", snappy), Expect::Status(&[400, 413])).await;
    let mut footer = hf_parquet_compressed(&[good(ImageFormat::Png, 92)], Compression::UNCOMPRESSED);
    let n = footer.len();
    footer[n - 8..n - 4].copy_from_slice(&u32::MAX.to_le_bytes());
    c.check("Parquet: the footer declares 4 GiB", c.upload("footer.parquet", footer), Expect::Status(&[400, 413])).await;
    let mut cut = hf_parquet_compressed(&[good(ImageFormat::Png, 93), good(ImageFormat::Png, 94)], Compression::SNAPPY);
    let keep = cut.len() / 2;
    cut.drain(8..keep);
    c.check("Parquet: the middle of the file is missing", c.upload("cut.parquet", cut), Expect::Status(&[400, 422])).await;

    // --- JSON -----------------------------------------------------------------------------
    c.check("POST /jobs: JSON nested 100000 deep", c.post_json("/jobs", deep_json(100_000)), Expect::Status(&[400, 422])).await;
    let nested_param = format!(r#"{{"dataset_id": "{dataset_id}", "params": {{"seed": {}}}}}"#, deep_json(5000));
    c.check("POST /jobs: a hyper-parameter nested 5000 deep", c.post_json("/jobs", nested_param), Expect::Status(&[400, 422])).await;
    for (field, value) in [
        ("epochs", "1e400"),
        ("epochs", "18446744073709551616"),
        ("epochs", "4294967295"),
        ("batch_size", "1e30"),
        ("batch_size", "-1"),
        ("learning_rate", "1e308"),
        ("learning_rate", "-1e-308"),
        ("seed", "1e19"),
        ("gradient_accumulation_steps", "99999999999999999999999999"),
        ("warmup_ratio", "1e-400000"),
        ("label_smoothing", "12345678901234567890e-1"),
    ] {
        let body = format!(r#"{{"dataset_id": "{dataset_id}", "base_model": "tiny", "params": {{"{field}": {value}, "epochs": 0}}}}"#);
        c.check(&format!("POST /jobs: {field} = {value}"), c.post_json("/jobs", body), Expect::Status(&[400, 422])).await;
    }
    c.check("POST /jobs: a 2 MiB body", c.post_json("/jobs", format!(r#"{{"dataset_id": "{}"}}"#, "x".repeat(2 << 20))), Expect::Status(&[413])).await;
    c.check("POST /models/{id}/evaluate: JSON nested 100000 deep", c.post_json(&format!("/models/{model_id}/evaluate"), deep_json(100_000)), Expect::Status(&[400, 422])).await;
    c.check("POST /predict: JSON nested 100000 deep", c.post_json("/predict", deep_json(100_000)), Expect::Status(&[400, 422])).await;

    // --- base64 ---------------------------------------------------------------------------
    for (what, value) in [
        ("symbols", json!("@@@not base64@@@")),
        ("a bad length", json!("abc")),
        ("padding only", json!("====")),
        ("a NUL inside", json!("QUJD\u{0}RA==")),
        ("spaces inside", json!("QU JD RA==")),
        ("URL-safe alphabet", json!("_-_-")),
        ("non-ASCII", json!("ЖЖЖЖ")),
        ("a number", json!(12345)),
        ("1 MiB of valid base64 that is not an image", json!("A".repeat(1 << 20))),
    ] {
        c.check(&format!("/predict: base64 with {what}"), c.post_json("/predict", json!({"images": [value]}).to_string()), Expect::Status(&[400, 422])).await;
    }
    let parts = (0..65).fold(Form::new(), |f, i| f.part(format!("p{i}"), Part::bytes(fixtures::jpeg(i)).file_name("x.jpg")));
    c.check("/predict: 65 images", server.client.post(format!("{}/predict", server.base)).multipart(parts), Expect::Status(&[422])).await;
    c.check("/predict: a 65 MiB body", c.predict_raw("image/png", vec![0u8; 65 << 20]), Expect::Status(&[413])).await;

    // --- Afterwards ----------------------------------------------------------------------
    println!("| input | answer | time | peak RSS |\n| --- | --- | --- | --- |");
    for row in &c.rows {
        println!("{row}");
    }
    let (worst, worst_case) = c.worst_peak.clone();
    println!("RSS before the corpus (after training): {rss_before} MiB; highest peak during one input: {worst} MiB ({worst_case})");
    assert!(server.client.get(format!("{}/readyz", server.base)).send().await.unwrap().status() == 200);
    assert!(worst <= RSS_BOUND_MIB, "peak RSS {worst} MiB over the bound of {RSS_BOUND_MIB} MiB ({worst_case})");

    let after = snapshot(&server, &data, &dataset_id, &model_id).await;
    assert_eq!(after, before, "the dataset and model stored before the corpus are unchanged");
    assert_eq!(entries_under(&cwd), vec![PathBuf::from("secret.jpg")], "nothing written in the working folder");
    assert!(entries_under(&tmpdir).is_empty(), "nothing written in TMPDIR: {:?}", entries_under(&tmpdir));
    assert!(entries_under(&data.join("tmp")).is_empty(), "no upload scratch file left");
    let secret = sha256_hex(&good(ImageFormat::Jpeg, 99));
    assert!(!data.join("blobs").join(&secret).exists(), "the file outside the data folder was never read");
    for entry in std::fs::read_dir(&data).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            ["vitforge.db", "vitforge.db-wal", "vitforge.db-shm", "blobs", "jobs", "models", "tmp", "base-models", "thumbnails"].contains(&name.as_str()),
            "unexpected entry in the data folder: {name}"
        );
    }
    for blob in entries_under(&data.join("blobs")) {
        let name = blob.to_string_lossy().into_owned();
        assert_eq!(sha256_hex(&std::fs::read(data.join("blobs").join(&blob)).unwrap()), name, "blob {name} holds what its name says");
    }
    drop(server);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}
