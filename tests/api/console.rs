//! The web console in a real browser: Debian's `chromium`, driven over WebDriver (a local
//! `chromedriver`) by fantoccini. One test walks the path a person takes: open `/`, upload an
//! image-folder zip through the page, start a fine-tune on a tiny base model, watch it reach
//! `succeeded`, see the charts and the confusion matrix, predict an image and read its label.
//! Files and folders are also dropped on the pages as from a file manager ([`drop_paths`]).
//!
//! Without chromium and chromedriver it says so and passes, unless `VITFORGE_REQUIRE_BROWSER=1`
//! (set by `.ci/run`, which installs them). With `VITFORGE_SCREENSHOTS=DIR` it saves the job and
//! predict pages as PNGs there (the README's screenshots).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use image::{ImageFormat, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::fixtures::{Member, encoded, file, zip};
use crate::support::{Launch, install_base_model, tiny_config};

/// A chromedriver process, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts chromedriver on a port of its choosing; `None` (and a line saying why) when it is not
/// installed and the browser is not required.
fn chromedriver() -> Option<Driver> {
    let required = std::env::var_os("VITFORGE_REQUIRE_BROWSER").is_some_and(|v| v == "1");
    let spawned = Command::new("chromedriver").arg("--port=0").stdout(Stdio::piped()).stderr(Stdio::null()).spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if !required => {
            eprintln!("SKIPPED: no chromedriver ({e}); install Debian's chromium and chromium-driver to run the console test");
            return None;
        }
        Err(e) => panic!("VITFORGE_REQUIRE_BROWSER=1 but chromedriver does not start: {e}"),
    };
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.split("started successfully on port ").nth(1).and_then(|p| p.trim_end_matches('.').parse().ok()))
        .expect("chromedriver names its port");
    std::thread::spawn(move || lines.for_each(drop));
    Some(Driver { child, port })
}

async fn browser(driver: &Driver, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--window-size=1280,1600", format!("--user-data-dir={}", profile.display())]}),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session")
}

/// Waits until `css` matches an element whose text satisfies `ok`; returns that text.
async fn wait_text(c: &Client, css: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(elements) = c.find_all(Locator::Css(css)).await {
            for e in elements {
                if let Ok(text) = e.text().await
                    && ok(&text)
                {
                    return text;
                }
            }
        }
        let page = c.source().await.unwrap_or_default();
        assert!(Instant::now() < deadline, "waited {secs} s for '{css}'; the page:\n{page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The element `css` names, once the page has drawn it (pages render after their data arrives).
async fn element(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("no '{css}': {e}"))
}

async fn wait_url(c: &Client, part: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let url = c.current_url().await.unwrap().to_string();
        if url.contains(part) {
            return url;
        }
        assert!(Instant::now() < deadline, "waited {secs} s for a URL with '{part}', at {url}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The page's URL once it no longer ends with `old` (another page opened).
async fn wait_url_leaves(c: &Client, old: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let url = c.current_url().await.unwrap().to_string();
        if !url.ends_with(old) {
            return url;
        }
        assert!(Instant::now() < deadline, "waited {secs} s for a page other than {url}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Chrome DevTools Protocol command, sent through chromedriver (`goog/cdp/execute`).
#[derive(Debug)]
struct Cdp(serde_json::Value);

impl fantoccini::wd::WebDriverCompatibleCommand for Cdp {
    fn endpoint(&self, base: &reqwest::Url, session: Option<&str>) -> Result<reqwest::Url, <reqwest::Url as std::str::FromStr>::Err> {
        base.join(&format!("session/{}/goog/cdp/execute", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &reqwest::Url) -> (axum::http::Method, Option<String>) {
        (axum::http::Method::POST, Some(self.0.to_string()))
    }
}

/// Drags `paths` (files, or a folder) from outside the browser and drops them on the middle of
/// the element `css`, as a person does from a file manager: the browser's own drag and drop, with
/// a dropped folder's `webkitGetAsEntry` a real `FileSystemDirectoryEntry`.
async fn drop_paths(c: &Client, css: &str, paths: &[&Path]) {
    element(c, css).await;
    let script = format!("const r = document.querySelector({css:?}).getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];");
    let at = c.execute(&script, vec![]).await.unwrap();
    let data = json!({"items": [], "files": paths, "dragOperationsMask": 1});
    for kind in ["dragEnter", "dragOver", "drop"] {
        let params = json!({"type": kind, "x": at[0], "y": at[1], "data": data});
        c.issue_cmd(Cdp(json!({"cmd": "Input.dispatchDragEvent", "params": params}))).await.unwrap_or_else(|e| panic!("{kind}: {e}"));
    }
}

/// A `size`² image of `rgb` with noise.
fn colour(rgb: [u8; 3], seed: u64) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let img = RgbImage::from_fn(48, 40, |_, _| Rgb(rgb.map(|c| c.saturating_add(rng.random_range(0..40)))));
    encoded(&img, ImageFormat::Png)
}

async fn screenshot(c: &Client, name: &str) {
    if let Some(dir) = std::env::var_os("VITFORGE_SCREENSHOTS") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(Path::new(&dir).join(name), c.screenshot().await.unwrap()).unwrap();
    }
}

/// A service on a data folder under `root` with the tiny base model installed.
fn server_with_tiny(root: &Path) -> crate::support::ChildServer {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    install_base_model(&data, "tiny", &tiny_config(), &["a", "b"]);
    Launch::new(&data).start()
}

/// Uploads `members` zipped as `file_name`: the dataset.
async fn uploaded(server: &crate::support::ChildServer, members: &[Member], file_name: &str) -> serde_json::Value {
    let form = reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(zip(members)).file_name(file_name.to_string()));
    let resp = server.client.post(server.url("/datasets")).multipart(form).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    resp.json().await.unwrap()
}

/// `n` reddish and `n` bluish PNGs in class folders `red` and `blue`.
fn red_and_blue(n: u64) -> Vec<Member> {
    (0..n).flat_map(|i| [file(&format!("red/{i}.png"), colour([190, 30, 30], i)), file(&format!("blue/{i}.png"), colour([30, 40, 190], 100 + i))]).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_person_uploads_trains_watches_and_predicts_in_the_console() {
    let Some(driver) = chromedriver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_tiny(tmp.path());
    let members = red_and_blue(12);
    let upload = tmp.path().join("colours.zip");
    std::fs::write(&upload, zip(&members)).unwrap();
    let probe = tmp.path().join("probe.png");
    std::fs::write(&probe, colour([200, 35, 35], 999)).unwrap();
    let c = browser(&driver, &tmp.path().join("profile")).await;
    let started = Instant::now();

    // A browser opening / lands on the console's overview.
    c.goto(&server.url("/")).await.unwrap();
    wait_url(&c, "/ui/", 10).await;
    wait_text(&c, "h1", 10, |t| t == "Overview").await;

    // Upload through the page: the dataset page opens, with its counts and thumbnails.
    element(&c, "#dataset-file").await.send_keys(&upload.to_string_lossy()).await.unwrap();
    wait_url(&c, "/ui/datasets/", 30).await;
    wait_text(&c, "h2", 10, |t| t.contains("24 images in 2 classes")).await;
    wait_text(&c, "#main", 10, |t| t.contains("No image is repeated.")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.find_all(Locator::Css("#thumbs img[src^='blob:']")).await.unwrap().len() < 24 {
        assert!(Instant::now() < deadline, "the thumbnails did not load");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A thumbnail fills its grid cell (at least 120 px), not what a figure's default margins
    // leave of it (40 px).
    let width = c.execute("return document.querySelector('#thumbs img').getBoundingClientRect().width", vec![]).await.unwrap();
    assert!(width.as_f64().unwrap() >= 110.0, "a thumbnail is {width} px wide");

    // Start a fine-tune from the new-job page, on the tiny local base model.
    element(&c, "a[href^='/ui/new?dataset=']").await.click().await.unwrap();
    wait_url(&c, "/ui/new", 10).await;
    element(&c, "#job-base option[value='tiny']").await.click().await.unwrap();
    element(&c, "#job-recipe option[value='manual']").await.click().await.unwrap();
    for (name, value) in [("epochs", "3"), ("learning_rate", "0.002"), ("batch_size", "4")] {
        c.find(Locator::Css(&format!("input[name='{name}']"))).await.unwrap().send_keys(value).await.unwrap();
    }
    element(&c, "#job-submit").await.click().await.unwrap();
    let job_url = wait_url(&c, "/ui/jobs/", 10).await;

    // Watch it to the end: status, charts, confusion matrix with its counts.
    wait_text(&c, ".status", 60, |t| t == "succeeded").await;
    // The worker that ran it: by default the server's host name and process id.
    let worker = format!(":{}", server.pid());
    wait_text(&c, "#main", 10, |t| t.contains(&worker)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.find_all(Locator::Css("svg.chart path")).await.unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "the charts did not draw their lines");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(c.source().await.unwrap().contains("<title>Training loss</title>"));
    let cells = wait_text(&c, "table.heat tbody", 10, |t| !t.is_empty()).await;
    let counted: u64 = cells.split_whitespace().filter_map(|w| w.parse::<u64>().ok()).sum();
    assert!(counted > 0, "the confusion matrix shows counts: {cells}");
    assert_eq!(c.find_all(Locator::Css("svg.chart")).await.unwrap().len(), 3);
    screenshot(&c, "console-job.png").await;
    assert!(job_url.contains("/ui/jobs/"));
    assert_eq!(c.find_all(Locator::Css("#job-repeats")).await.unwrap().len(), 0, "a dataset without repeated files is not warned about");

    // "Run again…" opens the new-job form as that job ran: its base model, recipe and the
    // parameters it set.
    element(&c, "#job-again").await.click().await.unwrap();
    wait_url(&c, "/ui/new?from=", 10).await;
    wait_text(&c, "#job-from", 10, |t| t.contains("As job")).await;
    let value = |css: &'static str| {
        let c = c.clone();
        async move { element(&c, css).await.prop("value").await.unwrap().unwrap_or_default() }
    };
    assert_eq!(value("#job-base").await, "tiny");
    assert_eq!(value("#job-recipe").await, "manual");
    assert_eq!(value("input[name='epochs']").await, "", "3 epochs is the manual recipe's default: a placeholder");
    assert_eq!(value("input[name='learning_rate']").await, "0.002");
    assert_eq!(value("input[name='batch_size']").await, "4");

    // Predict: pick an image, read its label and the top-k bars.
    c.goto(&server.url("/ui/predict")).await.unwrap();
    element(&c, "#predict-file").await.send_keys(&probe.to_string_lossy()).await.unwrap();
    let label = wait_text(&c, ".prediction h2.label", 30, |t| !t.is_empty()).await;
    assert!(label == "red" || label == "blue", "{label}");
    assert_eq!(c.find_all(Locator::Css(".prediction .topk .bar")).await.unwrap().len(), 2);
    screenshot(&c, "console-predict.png").await;
    // Or drop images on the page from outside the browser: each gets its prediction, named.
    let blue = tmp.path().join("blue-probe.png");
    std::fs::write(&blue, colour([35, 35, 200], 998)).unwrap();
    // A TIFF among them, which Chromium cannot show: a note stands in for its picture.
    let scan = tmp.path().join("scan.tif");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiff/rgb-lzw.tif"), &scan).unwrap();
    drop_paths(&c, "#predict-drop", &[&probe, &blue, &scan]).await;
    wait_text(&c, ".prediction .muted", 30, |t| t.starts_with("blue-probe.png")).await;
    let named = wait_text(&c, ".prediction .muted", 5, |t| t.starts_with("probe.png")).await;
    assert_eq!(c.find_all(Locator::Css(".prediction")).await.unwrap().len(), 3, "{named}");
    wait_text(&c, ".prediction .no-preview", 10, |t| t == "no preview: this browser cannot show the format").await;
    assert_eq!(c.find_all(Locator::Css(".prediction img")).await.unwrap().len(), 2, "the two PNGs are shown");

    // Class names that look like integers: the matrix keeps the service's order ('10' before
    // '9', its rows' order), not the one JavaScript gives such object keys ('9' first).
    let mut members: Vec<Member> = (0..6)
        .flat_map(|i| [file(&format!("10/{i}.png"), colour([190, 30, 30], 200 + i)), file(&format!("9/{i}.png"), colour([30, 40, 190], 300 + i))])
        .collect();
    // One file under both classes: the job page warns of it.
    members.push(file("9/stray.png", colour([190, 30, 30], 200)));
    let dataset = uploaded(&server, &members, "numbers.zip").await;
    assert_eq!(dataset["classes"], json!(["10", "9"]), "{dataset}");
    let body = json!({"dataset_id": dataset["id"], "base_model": "tiny", "params": {"epochs": 1, "batch_size": 4, "label_smoothing": 0.1}});
    let job: serde_json::Value = server.client.post(server.url("/jobs")).json(&body).send().await.unwrap().json().await.unwrap();
    c.goto(&server.url(&format!("/ui/jobs/{}", job["id"].as_str().unwrap()))).await.unwrap();
    wait_text(&c, ".status", 60, |t| t == "succeeded").await;
    let head = wait_text(&c, "table.heat thead", 10, |t| !t.is_empty()).await;
    let names: Vec<&str> = head.split_whitespace().filter(|w| w.chars().all(|ch| ch.is_ascii_digit())).collect();
    assert_eq!(names, ["10", "9"], "the matrix's columns: {head}");
    let warning = wait_text(&c, "#job-repeats", 10, |t| !t.is_empty()).await;
    assert!(warning.contains("1 image is a copy of another: 1 file under two or more classes"), "{warning}");

    // Run again with a change: what the form has no field for (label smoothing) goes along.
    let first = job["id"].as_str().unwrap();
    c.goto(&server.url(&format!("/ui/new?from={first}"))).await.unwrap();
    let from = wait_text(&c, "#job-from", 10, |t| t.contains("As job")).await;
    assert!(from.contains("Also kept from job") && from.contains("label_smoothing 0.1"), "{from}");
    let epochs = element(&c, "input[name='epochs']").await;
    epochs.clear().await.unwrap();
    epochs.send_keys("2").await.unwrap();
    element(&c, "#job-submit").await.click().await.unwrap();
    let again = wait_url(&c, "/ui/jobs/", 10).await;
    let again = again.rsplit('/').next().unwrap().to_string();
    assert_ne!(again, first);
    let rerun = server.get_json(&format!("/jobs/{again}")).await;
    assert_eq!(rerun["dataset_id"], dataset["id"], "{rerun}");
    assert_eq!(rerun["base_model"], "tiny");
    assert_eq!((rerun["params"]["epochs"].as_u64(), rerun["params"]["batch_size"].as_u64()), (Some(2), Some(4)), "{rerun}");
    assert_eq!(rerun["params"]["label_smoothing"], 0.1, "{rerun}");
    server.client.post(server.url(&format!("/jobs/{again}/cancel"))).send().await.unwrap();

    eprintln!("console walk-through: {:.1} s, predicted '{label}'", started.elapsed().as_secs_f64());
    c.close().await.unwrap();
}

/// A folder picked in the console goes up as one tar archive and is stored like an uploaded one:
/// every image, under its class, with a path longer than a tar header holds and a name that is
/// not ASCII, and without the clutter beside them.
#[tokio::test(flavor = "multi_thread")]
async fn a_folder_picked_in_the_console_is_uploaded_as_a_dataset() {
    let Some(driver) = chromedriver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_tiny(tmp.path());
    let folder = tmp.path().join("colours");
    let long = format!("red/{}.png", "a-long-name-".repeat(10));
    let mut members = red_and_blue(3);
    members.push(file(&long, colour([200, 20, 20], 50)));
    members.push(file("blue/ciel-été.png", colour([20, 20, 200], 51)));
    members.push(file(".DS_Store", b"\0\0\0\x01Bud1".to_vec()));
    // A red image filed under blue as well: the dataset page points it out.
    members.push(file("blue/stray.png", colour([190, 30, 30], 1)));
    // And a picture beside a copy of it turned a quarter: the page shows both, to judge by eye.
    let disc = crate::support::pictures::picture(7, 96, 80);
    members.push(file("red/disc.png", encoded(&disc, ImageFormat::Png)));
    members.push(file("red/disc-turned.jpg", encoded(&image::imageops::rotate90(&disc), ImageFormat::Jpeg)));
    for member in &members {
        let Member::File(name, bytes) = member else { unreachable!() };
        std::fs::create_dir_all(folder.join(name).parent().unwrap()).unwrap();
        std::fs::write(folder.join(name), bytes).unwrap();
    }
    let c = browser(&driver, &tmp.path().join("profile")).await;
    c.goto(&server.url("/ui/")).await.unwrap();
    element(&c, "#dataset-folder").await.send_keys(&folder.to_string_lossy()).await.unwrap();
    wait_url(&c, "/ui/datasets/", 30).await;
    wait_text(&c, "h2", 10, |t| t.contains("11 images in 2 classes")).await;
    let repeated = wait_text(&c, "#duplicates", 10, |t| !t.is_empty()).await;
    assert!(repeated.contains("1 image is a copy of another: 1 file under two or more classes."), "{repeated}");
    assert!(repeated.contains("A file under two classes contradicts itself.") && !repeated.contains("look better"), "{repeated}");
    assert!(repeated.contains("colours/red/1.png") && repeated.contains("colours/blue/stray.png"), "{repeated}");
    assert!(repeated.contains("blue, red"), "{repeated}");
    assert_eq!(c.find_all(Locator::Css("#duplicates p.warning")).await.unwrap().len(), 1);
    let alike = wait_text(&c, "#look-alikes-section", 10, |t| !t.is_empty()).await;
    assert!(alike.contains("1 image looks like another file (resized, re-encoded, mirrored or turned copies)."), "{alike}");
    assert!(alike.contains("colours/red/disc.png") && alike.contains("colours/red/disc-turned.jpg"), "{alike}");
    // Each look-alike's thumbnail, and the repeated file's once, loaded through the API.
    let widths = |section: &'static str| {
        let c = c.clone();
        async move {
            let script = format!("return [...document.querySelectorAll('{section} .strip img')].map((i) => i.complete ? i.naturalWidth : 0)");
            for _ in 0..100 {
                let widths = c.execute(&script, vec![]).await.unwrap();
                if widths.as_array().unwrap().iter().all(|w| w.as_u64() > Some(0)) {
                    return widths;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("{section}'s thumbnails did not load");
        }
    };
    assert_eq!(widths("#look-alikes").await.as_array().unwrap().len(), 2);
    assert_eq!(widths("#duplicates").await.as_array().unwrap().len(), 1);
    screenshot(&c, "dataset-repeats.png").await;
    let dataset = &server.get_json("/datasets").await[0];
    assert_eq!(dataset["name"], "colours", "named after the folder: {dataset}");
    assert_eq!(dataset["rejected_total"], 0, "{dataset}");
    let images = server.get_json(&format!("/datasets/{}/images", dataset["id"].as_str().unwrap())).await;
    let files: Vec<&str> = images["images"].as_array().unwrap().iter().map(|i| i["file"].as_str().unwrap()).collect();
    for name in [format!("colours/{long}"), "colours/blue/ciel-été.png".to_string()] {
        assert!(files.contains(&name.as_str()), "{name} in {files:?}");
    }

    // The same folder dragged from outside the browser and dropped on the overview's upload zone:
    // another dataset, the same images.
    c.goto(&server.url("/ui/")).await.unwrap();
    drop_paths(&c, "#drop", &[&folder]).await;
    wait_url(&c, "/ui/datasets/", 30).await;
    wait_text(&c, "h2", 10, |t| t.contains("11 images in 2 classes")).await;
    let datasets = server.get_json("/datasets").await;
    assert_eq!((datasets.as_array().unwrap().len(), &datasets[0]["name"]), (2, &json!("colours")), "{datasets}");
    let dropped = server.get_json(&format!("/datasets/{}/images", datasets[0]["id"].as_str().unwrap())).await;
    let mut dropped: Vec<&str> = dropped["images"].as_array().unwrap().iter().map(|i| i["file"].as_str().unwrap()).collect();
    let mut picked = files.clone();
    dropped.sort();
    picked.sort();
    assert_eq!(dropped, picked);

    // A folder's entries come in batches, in no order: the reading is checked on entries made to
    // answer so (a real folder this small comes in one batch).
    let script = r#"
        const done = arguments[arguments.length - 1];
        const file = (path) => ({ isFile: true, isDirectory: false, fullPath: "/" + path, name: path.split("/").pop(), file: (ok) => ok(new File([path], path)) });
        const folder = (path, children) => {
            const batches = [children.slice(0, 2), children.slice(2), []];
            return { isFile: false, isDirectory: true, fullPath: "/" + path, name: path.split("/").pop(), createReader: () => ({ readEntries: (ok) => ok(batches.shift()) }) };
        };
        const top = folder("pets", [folder("pets/dog", [file("pets/dog/2.jpg"), file("pets/dog/1.jpg")]), file("pets/notes.txt"), folder("pets/cat", [file("pets/cat/9.jpg")])]);
        import("/ui/assets/tar.js").then(({ filesOfEntry }) => filesOfEntry(top)).then((files) => done(files.map((f) => f.path)), (e) => done(String(e)));
    "#;
    let read = c.execute_async(script, vec![]).await.unwrap();
    assert_eq!(read, json!(["pets/cat/9.jpg", "pets/dog/1.jpg", "pets/dog/2.jpg", "pets/notes.txt"]));
    c.close().await.unwrap();
}

/// Submits a job and waits for it to succeed: its id and its model's.
async fn trained(server: &crate::support::ChildServer, body: &serde_json::Value) -> (String, String) {
    let job = server.post_json("/jobs", body).await;
    let id = job["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = server.get_json(&format!("/jobs/{id}")).await;
        if job["status"] == "succeeded" {
            return (id, job["model_id"].as_str().unwrap().to_string());
        }
        assert!(Instant::now() < deadline && job["status"] != "failed", "a job did not succeed: {job}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A job's mistakes and a dataset's images are corrected on their pages and saved as a new
/// dataset, which names what it was made from; the dataset itself stays as it was.
#[tokio::test(flavor = "multi_thread")]
async fn mistakes_and_images_are_corrected_into_a_copy_of_the_dataset() {
    let Some(driver) = chromedriver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_tiny(tmp.path());
    // Validation pictures labelled against their colour: a model that learned anything from the
    // training pictures, or nothing, gets some of them wrong.
    let mut members = red_and_blue(6).into_iter().map(|m| match m {
        Member::File(name, bytes) => Member::File(format!("train/{name}"), bytes),
        other => other,
    }).collect::<Vec<_>>();
    for i in 0..3 {
        members.push(file(&format!("validation/blue/r{i}.png"), colour([190, 30, 30], 500 + i)));
        members.push(file(&format!("validation/red/b{i}.png"), colour([30, 40, 190], 600 + i)));
    }
    // And one red picture filed under both classes, and the same pixels as a BMP (a look-alike).
    let twice = colour([190, 30, 30], 700);
    members.push(file("train/red/twice.png", twice.clone()));
    members.push(file("train/blue/twice.png", twice.clone()));
    members.push(file("train/red/twice.bmp", encoded(&image::load_from_memory(&twice).unwrap().to_rgb8(), ImageFormat::Bmp)));
    let dataset = uploaded(&server, &members, "colours.zip").await;
    let source = dataset["id"].as_str().unwrap().to_string();
    let (job, _) = trained(&server, &json!({"dataset_id": source, "base_model": "tiny", "params": {"epochs": 2, "batch_size": 4, "learning_rate": 0.002}})).await;
    let c = browser(&driver, &tmp.path().join("profile")).await;

    // On the job's page: relabel the first mistake as the other class, and save under a name.
    c.goto(&server.url(&format!("/ui/jobs/{job}"))).await.unwrap();
    let select = element(&c, "#mistakes select.edit").await;
    assert!(!element(&c, "#edit-bar").await.is_displayed().await.unwrap(), "nothing to save yet");
    let blob = select.attr("data-blob").await.unwrap().unwrap();
    let mistakes = server.get_json(&format!("/jobs/{job}/mistakes")).await;
    let first = &mistakes["mistakes"][0];
    assert_eq!(first["blob"], blob.as_str(), "{mistakes}");
    let other = if first["label"] == "red" { "blue" } else { "red" };
    element(&c, &format!("#mistakes select.edit option[value='label:{other}']")).await.click().await.unwrap();
    wait_text(&c, "#edit-count", 10, |t| t == "1 image to correct").await;
    screenshot(&c, "console-corrections.png").await;
    element(&c, "#edit-name").await.send_keys("colours, corrected").await.unwrap();
    element(&c, "#edit-save").await.click().await.unwrap();
    let url = wait_url(&c, "/ui/datasets/", 20).await;
    let (copy, from) = url.rsplit('/').next().unwrap().split_once('?').unwrap();
    let copy = copy.to_string();
    assert_eq!(from, format!("job={job}"));
    assert_ne!(copy, source);
    let note = wait_text(&c, "#dataset-source", 10, |t| !t.is_empty()).await;
    assert_eq!(note, format!("A corrected copy of dataset {}: 1 relabelled.", &source[source.len() - 8..]));
    // The copy's page offers the job again, on the copy: its base model and parameters, the
    // copy as its dataset.
    element(&c, "#dataset-again").await.click().await.unwrap();
    wait_url(&c, "/ui/new?from=", 10).await;
    wait_text(&c, "#job-from", 10, |t| t.contains("As job")).await;
    assert_eq!(element(&c, "#job-dataset").await.prop("value").await.unwrap().as_deref(), Some(copy.as_str()));
    assert_eq!(element(&c, "#job-base").await.prop("value").await.unwrap().as_deref(), Some("tiny"));
    element(&c, "#job-submit").await.click().await.unwrap();
    let rerun = wait_url(&c, "/ui/jobs/", 10).await;
    let rerun = rerun.rsplit('/').next().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ran = loop {
        let ran = server.get_json(&format!("/jobs/{rerun}")).await;
        if ["succeeded", "failed", "cancelled"].contains(&ran["status"].as_str().unwrap()) {
            break ran;
        }
        assert!(Instant::now() < deadline, "the job on the copy did not end: {ran}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((ran["status"].as_str(), ran["dataset_id"].as_str()), (Some("succeeded"), Some(copy.as_str())), "{ran}");
    assert_eq!(ran["params"]["epochs"], 2, "{ran}");
    c.goto(&server.url(&format!("/ui/datasets/{copy}"))).await.unwrap();
    wait_text(&c, "#dataset-source", 10, |t| !t.is_empty()).await;
    assert!(c.find_all(Locator::Css("#dataset-again")).await.unwrap().is_empty(), "no job to run again without ?job=");
    let stored = server.get_json(&format!("/datasets/{copy}")).await;
    assert_eq!(stored["name"], "colours, corrected");
    let images = server.get_json(&format!("/datasets/{copy}/images?limit=200")).await;
    let relabelled: Vec<&serde_json::Value> = images["images"].as_array().unwrap().iter().filter(|im| im["blob"] == blob.as_str()).collect();
    assert!(!relabelled.is_empty() && relabelled.iter().all(|im| im["label"] == other), "{images}");

    // On the copy's page: remove an image, and a refusal says why (the copy of a copy is
    // refused once the copy is deleted).
    let select = element(&c, "#thumbs select.edit").await;
    let removed = select.attr("data-blob").await.unwrap().unwrap();
    element(&c, "#thumbs select.edit option[value='remove']").await.click().await.unwrap();
    wait_text(&c, "#edit-count", 10, |t| t == "1 image to correct").await;
    let gone = server.client.delete(server.url(&format!("/datasets/{copy}"))).send().await.unwrap();
    assert_eq!(gone.status(), 204);
    element(&c, "#edit-save").await.click().await.unwrap();
    let said = wait_text(&c, "#edit-bar p.error", 10, |t| !t.is_empty()).await;
    assert!(said.contains("does not exist") && said.contains("(not_found)"), "{said}");
    assert!(c.current_url().await.unwrap().as_str().ends_with(&copy), "the page stays");

    assert_ne!(removed, "");

    // On the dataset's own page, the picture filed under both classes is settled as red.
    assert_eq!(dataset["duplicates"]["across_classes"], 1, "{dataset}");
    c.goto(&server.url(&format!("/ui/datasets/{source}"))).await.unwrap();
    element(&c, "#duplicates select.edit option[value='label:red']").await.click().await.unwrap();
    // The same picture's choice among the look-alikes (one per distinct file) follows.
    assert_eq!(c.find_all(Locator::Css("#look-alikes select.edit")).await.unwrap().len(), 2);
    let png = vitforge::dataset::BlobStore::hash(&twice);
    let beside = element(&c, &format!("#look-alikes select.edit[data-blob='{png}']")).await;
    assert_eq!(beside.prop("value").await.unwrap().as_deref(), Some("label:red"));
    let page = wait_text(&c, "#main", 10, |t| t.contains("Repeated files")).await;
    assert!(!page.contains("null") && c.find_all(Locator::Css("#dataset-source")).await.unwrap().is_empty(), "an upload names no source: {page}");
    wait_text(&c, "#edit-count", 10, |t| t == "1 image to correct").await;
    // And a training image moves to the test split (an image offers the splits it is not in).
    let first = element(&c, "#thumbs select.edit").await;
    assert!(first.find(Locator::Css("option[value='move:train']")).await.is_err(), "it is in train already");
    first.find(Locator::Css("option[value='move:test']")).await.unwrap().click().await.unwrap();
    wait_text(&c, "#edit-count", 10, |t| t == "2 images to correct").await;
    screenshot(&c, "console-dataset-corrections.png").await;
    element(&c, "#edit-save").await.click().await.unwrap();
    let url = wait_url_leaves(&c, &source, 20).await;
    let settled = url.strip_prefix(&server.url("/ui/datasets/")).unwrap_or_else(|| panic!("{url}"));
    assert!(!settled.contains('?'), "no job to run again: {url}");
    let settled = server.get_json(&format!("/datasets/{settled}")).await;
    assert_eq!(settled["duplicates"]["across_classes"], 0, "{settled}");
    assert_eq!((settled["source"]["relabelled"].as_u64(), settled["source"]["moved"].as_u64()), (Some(1), Some(1)), "{settled}");
    assert_eq!(settled["counts"]["test"]["red"], 1, "{settled}");

    // The source dataset is as it was uploaded.
    let now = server.get_json(&format!("/datasets/{source}")).await;
    assert_eq!(now, dataset);
    c.close().await.unwrap();
}

/// A dataset's page adds more images, from a folder of one class or an archive, as a new
/// dataset; a refused upload says why and the page stays.
#[tokio::test(flavor = "multi_thread")]
async fn more_images_are_added_to_a_copy_of_a_dataset_from_its_page() {
    let Some(driver) = chromedriver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_tiny(tmp.path());
    let dataset = uploaded(&server, &red_and_blue(3), "colours.zip").await;
    let source = dataset["id"].as_str().unwrap().to_string();
    // A folder of more reds: one new, one the dataset has.
    let folder = tmp.path().join("more");
    std::fs::create_dir_all(folder.join("red")).unwrap();
    std::fs::write(folder.join("red/new.png"), colour([200, 25, 25], 40)).unwrap();
    std::fs::write(folder.join("red/0.png"), colour([190, 30, 30], 0)).unwrap();
    let c = browser(&driver, &tmp.path().join("profile")).await;

    c.goto(&server.url(&format!("/ui/datasets/{source}"))).await.unwrap();
    let placeholder = element(&c, "#extend #dataset-name").await.attr("placeholder").await.unwrap().unwrap();
    assert_eq!(placeholder, "name (default: colours.zip (extended))");
    element(&c, "#extend #dataset-folder").await.send_keys(&folder.to_string_lossy()).await.unwrap();
    let url = wait_url_leaves(&c, &source, 30).await;
    let more = url.rsplit('/').next().unwrap().to_string();
    wait_text(&c, "h2", 10, |t| t.contains("7 images in 2 classes")).await;
    let note = wait_text(&c, "#dataset-source", 10, |t| !t.is_empty()).await;
    assert_eq!(note, format!("An extended copy of dataset {}: 1 added.", &source[source.len() - 8..]));
    let rejected = wait_text(&c, "#main details", 10, |t| !t.is_empty()).await;
    assert!(rejected.contains("1 files rejected"), "{rejected}");
    let stored = server.get_json(&format!("/datasets/{more}")).await;
    assert_eq!(stored["name"], "colours.zip (extended)", "the service's default, not the folder's name");
    assert_eq!(stored["rejected"][0]["file"], "more/red/0.png", "{stored}");
    assert!(stored["rejected"][0]["reason"].as_str().unwrap().starts_with("already in the dataset as 'red/0.png'"), "{stored}");

    // A file that is no archive is refused on the page, which stays.
    let junk = tmp.path().join("notes.zip");
    std::fs::write(&junk, b"not an archive").unwrap();
    element(&c, "#extend #dataset-file").await.send_keys(&junk.to_string_lossy()).await.unwrap();
    let said = wait_text(&c, "#extend p.error", 20, |t| !t.is_empty()).await;
    assert!(said.contains("(unsupported_format)"), "{said}");
    assert!(c.current_url().await.unwrap().as_str().ends_with(&more), "the page stays");
    // An archive without a picture is refused once the service has checked it, which the page
    // says from the service's progress events.
    let notes = tmp.path().join("notes-only.zip");
    std::fs::write(&notes, zip(&[file("red/notes.txt", b"no picture".to_vec())])).unwrap();
    element(&c, "#extend #dataset-file").await.send_keys(&notes.to_string_lossy()).await.unwrap();
    let said = wait_text(&c, "#extend p.error", 20, |t| t.contains("(no_images)")).await;
    assert!(said.contains("red/notes.txt"), "{said}");
    assert_eq!(element(&c, "#extend .checked").await.text().await.unwrap(), "checked 1 of 1 entries");

    // An archive of a new class, under a typed name.
    let greens = tmp.path().join("greens.zip");
    std::fs::write(&greens, zip(&[file("green/0.png", colour([30, 180, 40], 300)), file("green/1.png", colour([30, 180, 40], 301))])).unwrap();
    element(&c, "#extend #dataset-name").await.send_keys("with greens").await.unwrap();
    element(&c, "#extend #dataset-file").await.send_keys(&greens.to_string_lossy()).await.unwrap();
    wait_url_leaves(&c, &more, 30).await;
    wait_text(&c, "h1", 10, |t| t == "with greens").await;
    wait_text(&c, "h2", 10, |t| t.contains("9 images in 3 classes")).await;
    screenshot(&c, "console-extended.png").await;
    assert_eq!(server.get_json(&format!("/datasets/{source}")).await, dataset, "the dataset is as it was uploaded");
    c.close().await.unwrap();
}

/// A service with a tiny model trained on 4 reds and 4 blues (the dataset's JSON, the model's
/// id), and a browser on the model's page.
async fn on_a_model_page(driver: &Driver, root: &Path) -> (crate::support::ChildServer, serde_json::Value, String, Client) {
    let server = server_with_tiny(root);
    let dataset = uploaded(&server, &red_and_blue(4), "colours.zip").await;
    let (_, model) = trained(&server, &json!({"dataset_id": dataset["id"], "base_model": "tiny", "params": {"epochs": 1, "batch_size": 2}})).await;
    let c = browser(driver, &root.join("profile")).await;
    c.goto(&server.url(&format!("/ui/models/{model}"))).await.unwrap();
    (server, dataset, model, c)
}

/// A model's page points an alias at it and removes it; the overview lists it beside its model,
/// and the predict page offers it. A name the service refuses says why.
#[tokio::test(flavor = "multi_thread")]
async fn aliases_are_set_on_a_model_s_page_and_offered_for_predictions() {
    let Some(driver) = chromedriver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (server, _, model, c) = on_a_model_page(&driver, tmp.path()).await;
    wait_text(&c, "#aliases", 20, |t| t.contains("No alias names this model.")).await;
    element(&c, "#alias-name").await.send_keys("two words").await.unwrap();
    element(&c, "#alias-set").await.click().await.unwrap();
    let said = wait_text(&c, "p.error", 20, |t| !t.is_empty()).await;
    assert!(said.contains("may hold only") && said.contains("(invalid_alias)"), "{said}");
    element(&c, "#alias-name").await.clear().await.unwrap();
    element(&c, "#alias-name").await.send_keys("production").await.unwrap();
    element(&c, "#alias-set").await.click().await.unwrap();
    wait_text(&c, "#aliases", 20, |t| t.contains("production")).await;
    assert_eq!(c.find_all(Locator::Css("p.error")).await.unwrap().len(), 0, "the refusal is cleared by the next success");
    assert_eq!(server.get_json("/aliases").await[0]["model_id"], model.as_str());

    c.goto(&server.url("/ui/")).await.unwrap();
    wait_text(&c, "#models tbody", 20, |t| t.contains("production")).await;
    c.goto(&server.url("/ui/predict?model=production")).await.unwrap();
    let chosen = element(&c, "#predict-model").await.prop("value").await.unwrap();
    assert_eq!(chosen.as_deref(), Some("production"));

    c.goto(&server.url(&format!("/ui/models/{model}"))).await.unwrap();
    element(&c, "button[aria-label='Remove alias production']").await.click().await.unwrap();
    wait_text(&c, "#aliases", 20, |t| t.contains("No alias names this model.")).await;
    assert_eq!(server.get_json("/aliases").await, json!([]));
    c.close().await.unwrap();
}

/// A model's page evaluates it on a dataset: the count of images from the service's progress
/// events, then the metrics and the confusion matrix; a dataset with a class the model lacks
/// is refused on the page.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_is_evaluated_on_its_page_with_the_count_of_images() {
    let Some(driver) = chromedriver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (server, dataset, _, c) = on_a_model_page(&driver, tmp.path()).await;
    let evaluate = c.wait().at_most(Duration::from_secs(20)).for_element(Locator::XPath("//button[contains(., 'Evaluate')]")).await.unwrap();
    evaluate.click().await.unwrap();
    let images = dataset["num_images"].as_u64().unwrap();
    let said = wait_text(&c, "#main", 30, |t| t.contains("accuracy")).await;
    assert!(said.contains(&format!("(evaluated {images} of {images} images)")), "{said}");
    element(&c, "#main table.heat").await;

    let other = uploaded(&server, &[file("red/0.png", colour([200, 30, 30], 7)), file("green/0.png", colour([30, 200, 30], 8))], "greens.zip").await;
    c.refresh().await.unwrap();
    let choice = format!("#eval-dataset option[value='{}']", other["id"].as_str().unwrap());
    element(&c, &choice).await.click().await.unwrap();
    c.wait().at_most(Duration::from_secs(20)).for_element(Locator::XPath("//button[contains(., 'Evaluate')]")).await.unwrap().click().await.unwrap();
    let said = wait_text(&c, "p.error", 20, |t| !t.is_empty()).await;
    assert!(said.contains("green") && said.ends_with("(unknown_classes)"), "{said}");
    c.close().await.unwrap();
}

/// Actions the service refuses say why on the page: a download of a model deleted since the page
/// drew it, and a cancel of a job that has already finished.
#[tokio::test(flavor = "multi_thread")]
async fn refused_downloads_and_cancels_say_why_on_the_page() {
    let Some(driver) = chromedriver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_tiny(tmp.path());
    let members = red_and_blue(6);
    let dataset = uploaded(&server, &members, "colours.zip").await;
    let submit = |epochs: u32| json!({"dataset_id": dataset["id"], "base_model": "tiny", "params": {"epochs": epochs, "batch_size": 2}});
    // Two models: the only one may not be deleted.
    let (finished, model) = trained(&server, &submit(1)).await;
    trained(&server, &submit(1)).await;
    let c = browser(&driver, &tmp.path().join("profile")).await;

    // The model's page is drawn, then the model is deleted behind its back: Download says so.
    c.goto(&server.url(&format!("/ui/models/{model}"))).await.unwrap();
    let download = c.wait().at_most(Duration::from_secs(20)).for_element(Locator::XPath("//button[contains(., 'Download')]")).await.unwrap();
    let deleted = server.client.delete(server.url(&format!("/models/{model}"))).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    download.click().await.unwrap();
    let said = wait_text(&c, "p.error", 20, |t| !t.is_empty()).await;
    assert_eq!(said, format!("model '{model}' does not exist (not_found)"));

    // A running job's page offers Cancel. Its request is sent, by the page's own code, for the
    // job that has finished (the page cannot be made to miss the end of its own job, whose event
    // stream redraws it): the service's 409 shows below the head, which still offers Cancel.
    let running = server.post_json("/jobs", &submit(500)).await;
    let running = running["id"].as_str().unwrap().to_string();
    c.goto(&server.url(&format!("/ui/jobs/{running}"))).await.unwrap();
    element(&c, "button.danger").await;
    // One script: the head is redrawn on progress, so a button found earlier may be gone.
    let redirect_and_click = "const [from, to] = arguments; const sent = window.fetch;
        window.fetch = (url, init) => sent(String(url).replace(from, to), init);
        document.querySelector('button.danger').click();";
    c.execute(redirect_and_click, vec![json!(format!("/jobs/{running}/cancel")), json!(format!("/jobs/{finished}/cancel"))]).await.unwrap();
    let said = wait_text(&c, "p.error", 20, |t| !t.is_empty()).await;
    assert_eq!(said, format!("job '{finished}' has already finished (succeeded) (job_finished)"));
    assert_eq!(c.find_all(Locator::Css("button.danger")).await.unwrap().len(), 1, "the redrawn head still offers Cancel");
    assert_ne!(server.get_json(&format!("/jobs/{running}")).await["status"], "cancelled");
    c.close().await.unwrap();
}

/// The live job page outlives a restart of the service: its event stream ends (or breaks) with
/// the job unfinished, so the page reconnects and follows the resumed job to its end (here a
/// cancel), with no reload.
#[tokio::test(flavor = "multi_thread")]
async fn the_job_page_follows_its_job_across_a_restart_of_the_service() {
    let Some(driver) = chromedriver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    install_base_model(&data, "slow", &crate::support::slow_config(), &["a", "b"]);
    let server = Launch::new(&data).start();
    let port: u16 = server.base.rsplit(':').next().unwrap().parse().unwrap();
    let dataset = uploaded(&server, &red_and_blue(12), "colours.zip").await;
    let body = json!({"dataset_id": dataset["id"], "base_model": "slow", "recipe": "manual", "params": {"epochs": 400, "batch_size": 2}});
    let job = server.post_json("/jobs", &body).await;
    let id = job["id"].as_str().unwrap().to_string();

    let c = browser(&driver, &tmp.path().join("profile")).await;
    c.goto(&server.url(&format!("/ui/jobs/{id}"))).await.unwrap();
    wait_text(&c, ".status", 60, |t| t == "running").await;
    server.kill();
    let server = Launch::new(&data).port(port).start();
    // The job resumes; its end (a cancel through the API) reaches the page.
    let resumed = Instant::now() + Duration::from_secs(60);
    while server.get_json(&format!("/jobs/{id}")).await["status"] != "running" {
        assert!(Instant::now() < resumed, "the job did not resume");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cancel = server.client.post(server.url(&format!("/jobs/{id}/cancel"))).send().await.unwrap();
    assert!(cancel.status().is_success(), "{}", cancel.status());
    let done = wait_text(&c, ".status", 120, |t| !["queued", "running"].contains(&t)).await;
    assert_eq!(done, "cancelled", "{}", server.log());
    assert!(c.find_all(Locator::Css("#main p.error")).await.unwrap().is_empty(), "no error on the page");
    c.close().await.unwrap();
}

/// With `--api-key`, the console asks for the key once, keeps it out of every URL, and every
/// page's data loads with it.
#[tokio::test(flavor = "multi_thread")]
async fn with_an_api_key_the_console_asks_once_and_sends_it_as_a_bearer_token() {
    let Some(driver) = chromedriver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let key = "console-key-0123456789";
    let server = Launch::new(&tmp.path().join("data")).args(&["--api-key", key]).start();
    let c = browser(&driver, &tmp.path().join("profile")).await;
    c.goto(&server.url("/ui/")).await.unwrap();
    element(&c, "#key-dialog[open] #key-input").await.send_keys(key).await.unwrap();
    element(&c, "#key-form button[type=submit]").await.click().await.unwrap();
    wait_text(&c, "#main", 20, |t| t.contains("No dataset yet")).await;
    // Another page, same tab: no second question.
    c.goto(&server.url("/ui/predict")).await.unwrap();
    wait_text(&c, "#main", 20, |t| t.contains("No model yet")).await;
    assert!(c.find_all(Locator::Css("#key-dialog[open]")).await.unwrap().is_empty(), "asked once");
    let url = c.current_url().await.unwrap().to_string();
    assert!(!url.contains(key), "{url}");
    c.close().await.unwrap();
}

/// The overview shows the newest 25 datasets and jobs, and "Show more" brings the rest: it asks
/// the lists for pages (`?limit=`) instead of every row at each refresh. A job whose model is
/// not among the models shown still shows that model's F1.
#[tokio::test(flavor = "multi_thread")]
async fn the_overview_shows_the_newest_rows_and_more_on_request() {
    let Some(driver) = chromedriver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_tiny(tmp.path());
    let archive = zip(&red_and_blue(1));
    let mut dataset = String::new();
    for i in 0..26 {
        let part = reqwest::multipart::Part::bytes(archive.clone()).file_name(format!("{i}.zip"));
        let resp = server.client.post(server.url("/datasets")).multipart(reqwest::multipart::Form::new().part("file", part)).send().await.unwrap();
        assert_eq!(resp.status(), 201);
        dataset = resp.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    }
    for _ in 0..26 {
        let body = json!({"dataset_id": dataset, "base_model": "tiny", "params": {"epochs": 50}});
        let job: serde_json::Value = server.client.post(server.url("/jobs")).json(&body).send().await.unwrap().json().await.unwrap();
        // Cancelled, or (409) already ended: one image per class is too few to train on.
        let cancel = server.client.post(server.url(&format!("/jobs/{}/cancel", job["id"].as_str().unwrap()))).send().await.unwrap();
        assert!(cancel.status().is_success() || cancel.status() == 409, "{}", cancel.status());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let ended = |jobs: serde_json::Value| jobs.as_array().unwrap().iter().filter(|j| !["queued", "running"].contains(&j["status"].as_str().unwrap())).count();
    while ended(server.get_json("/jobs").await) < 26 {
        assert!(Instant::now() < deadline, "the jobs did not end: {}", server.get_json("/jobs").await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let c = browser(&driver, &tmp.path().join("profile")).await;
    c.goto(&server.url("/ui/")).await.unwrap();
    let rows = |list: &'static str| {
        let c = c.clone();
        async move { c.find_all(Locator::Css(&format!("#{list} tbody tr"))).await.unwrap().len() }
    };
    for list in ["datasets", "jobs"] {
        let button = element(&c, &format!("button.more[data-list={list}]")).await;
        assert_eq!(rows(list).await, 25, "{list}");
        button.click().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while rows(list).await != 26 || !c.find_all(Locator::Css(&format!("button.more[data-list={list}]"))).await.unwrap().is_empty() {
            assert!(Instant::now() < deadline, "{list}: {} rows after Show more", rows(list).await);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    wait_text(&c, "#models", 10, |t| t.contains("No model yet")).await;
    assert!(c.find_all(Locator::Css("#main p.error")).await.unwrap().is_empty(), "no error on the page");

    // An ended job's page offers to delete it; once confirmed, the overview lists one job fewer.
    let newest = server.get_json("/jobs?limit=1").await[0]["id"].as_str().unwrap().to_string();
    c.goto(&server.url(&format!("/ui/jobs/{newest}"))).await.unwrap();
    wait_text(&c, "button.danger", 20, |t| t == "Delete job").await;
    element(&c, "button.danger").await.click().await.unwrap();
    c.accept_alert().await.unwrap();
    wait_url(&c, "/ui/", 20).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows("jobs").await != 25 || !c.find_all(Locator::Css("button.more[data-list=jobs]")).await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "{} jobs listed after the delete", rows("jobs").await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_gone(&server, &newest).await;

    // A job whose model is older than the 25 models shown still shows its model's F1 (the page
    // asks for that model).
    let six = uploaded(&server, &red_and_blue(6), "six.zip").await;
    let body = json!({"dataset_id": six["id"], "base_model": "tiny", "params": {"epochs": 1, "batch_size": 2}});
    let trained = server.post_json("/jobs", &body).await["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let job = server.get_json(&format!("/jobs/{trained}")).await;
        if job["status"] == "succeeded" {
            break job;
        }
        assert!(Instant::now() < deadline && job["status"] != "failed", "{job}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let model = job["model_id"].as_str().unwrap();
    let f1 = server.get_json(&format!("/models/{model}")).await["metrics"]["f1"].as_f64().expect("the model has an F1");
    // 25 newer models (rows that share its files) push it off the overview's first page.
    let db = crate::support::open_database(&tmp.path().join("data")).await;
    for i in 0..25 {
        sqlx::query("insert into models (id, job_id, base_model, labels, metrics, params, recipe, path, created_at) select $1, null, base_model, labels, metrics, params, recipe, path, $2 from models where id = $3")
            .bind(format!("newer-{i:02}"))
            .bind(format!("2999-01-01T00:00:{i:02}Z"))
            .bind(model)
            .execute(&db)
            .await
            .unwrap();
    }
    c.goto(&server.url("/ui/")).await.unwrap();
    let shown = wait_text(&c, "#models tbody", 20, |t| t.contains("newer-00")).await;
    assert!(!shown.contains(&model[model.len() - 8..]), "the job's model is not among those shown: {shown}");
    let row = wait_text(&c, "#jobs tbody tr:first-child", 20, |t| t.contains(&trained[trained.len() - 8..])).await;
    assert!(row.contains(&format!("{f1:.3}")), "the job's row shows its model's F1 {f1:.3}: {row}");
    c.close().await.unwrap();
}

/// The deleted job is gone from the API too.
async fn assert_gone(server: &crate::support::ChildServer, job: &str) {
    let resp = server.client.get(server.url(&format!("/jobs/{job}"))).send().await.unwrap();
    assert_eq!(resp.status(), 404);
}
