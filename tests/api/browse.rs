//! The routes the console reads besides the core API: a dataset's images by page and their
//! thumbnails, a job's mistakes, the base models and recipes on offer, and the console's own
//! files — good and bad input alike.

use serde_json::{Value, json};

use crate::fixtures::{class_images, file, png_with_orientation, zip};
use crate::helpers::{assert_error, json, spawn_app};

#[tokio::test]
async fn a_dataset_s_images_come_in_pages_with_thumbnails_of_its_own_images_only() {
    let app = spawn_app().await;
    let id = app.upload_pets(6, true).await;
    let page = json(app.get(&format!("/datasets/{id}/images?limit=5")).await).await;
    assert_eq!((page["total"].as_u64(), page["images"].as_array().unwrap().len()), (Some(16), 5), "{page}");
    let test = json(app.get(&format!("/datasets/{id}/images?split=test")).await).await;
    assert_eq!(test["total"], 4);
    let cats = json(app.get(&format!("/datasets/{id}/images?split=train&class=cat&offset=4")).await).await;
    assert_eq!((cats["total"].as_u64(), cats["images"].as_array().unwrap().len()), (Some(6), 2));
    assert!(cats["images"].as_array().unwrap().iter().all(|i| i["label"] == "cat" && i["split"] == "train"));
    let at_most = json(app.get(&format!("/datasets/{id}/images?offset={}", i64::MAX)).await).await;
    assert_eq!(at_most["images"], json!([]));
    for bad in ["limit=0", "limit=201", "split=bogus", "offset=-1", "offset=9223372036854775808", "class=%00", "colour=red"] {
        let msg = assert_error(app.get(&format!("/datasets/{id}/images?{bad}")).await, 422, "invalid_query").await;
        assert!(!msg.starts_with("Failed to deserialize"), "{bad}: {msg}");
    }
    let msg = assert_error(app.get(&format!("/datasets/{id}/images?split=bogus")).await, 422, "invalid_query").await;
    assert_eq!(msg, "split: unknown variant `bogus`, expected one of `train`, `validation`, `test`");
    assert_error(app.get("/datasets/nope/images").await, 404, "not_found").await;
    let msg = assert_error(app.get(&format!("/datasets/{id}/images?class=Cat")).await, 422, "invalid_query").await;
    assert_eq!(msg, format!("class 'Cat' is not a class of dataset '{id}' (its classes: 'cat', 'dog')"));
    let empty = json(app.get(&format!("/datasets/{id}/images?split=validation&class=dog")).await).await;
    assert_eq!((empty["total"].as_u64(), empty["images"].as_array().unwrap().len()), (Some(0), 0), "a class of the dataset with no image in the split");

    // A thumbnail: a JPEG within 160 pixels, cached, the same bytes the second time.
    let first = &page["images"][0];
    let url = first["thumbnail"].as_str().unwrap().to_string();
    let resp = app.get(&url).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/jpeg");
    let bytes = resp.bytes().await.unwrap();
    let img = image::load_from_memory(&bytes).unwrap();
    assert!(img.width() <= 160 && img.height() <= 160);
    let blob = first["blob"].as_str().unwrap();
    assert!(app.data_dir.join("thumbnails").join(format!("{blob}.v2.jpg")).is_file(), "cached");
    assert_eq!(app.get(&url).await.bytes().await.unwrap(), bytes);

    // Only a blob of this dataset, named by its hash: nothing else can be read this way.
    assert_error(app.get(&format!("/datasets/{id}/images/abc/thumbnail")).await, 400, "invalid_blob").await;
    assert_error(app.get(&format!("/datasets/{id}/images/..%2F..%2Fvitforge.db/thumbnail")).await, 400, "invalid_blob").await;
    assert_error(app.get(&format!("/datasets/{id}/images/{}/thumbnail", "0".repeat(64))).await, 404, "not_found").await;
    let resp = app.post_dataset("other.zip", crate::fixtures::zip(&crate::fixtures::class_images("", &["x", "y"], 2, 900)), None).await;
    let other = json(resp).await;
    let their = json(app.get(&format!("/datasets/{}/images?limit=1", other["id"].as_str().unwrap())).await).await;
    let their_blob = their["images"][0]["blob"].as_str().unwrap();
    assert_error(app.get(&format!("/datasets/{id}/images/{their_blob}/thumbnail")).await, 404, "not_found").await;
    assert_error(app.get(&format!("/datasets/nope/images/{blob}/thumbnail")).await, 404, "not_found").await;
}

/// A thumbnail cache that cannot be written costs the next request a new thumbnail, not this one
/// its answer; a cached thumbnail is only ever a whole one (written aside and renamed).
/// A photo stored sideways with an EXIF orientation gets an upright thumbnail, as the browser
/// shows the photo itself.
#[tokio::test]
async fn a_thumbnail_is_upright_by_its_image_s_exif_orientation() {
    let app = spawn_app().await;
    // Stored 64 wide and 32 high with its top-left quarter red; orientation 6 turns it a quarter
    // clockwise, so the red quarter is the top right of a 32×64 picture.
    let stored = image::RgbImage::from_fn(64, 32, |x, y| image::Rgb(if x < 32 && y < 16 { [255, 0, 0] } else { [0, 0, 255] }));
    let mut members = class_images("", &["cat", "dog"], 2, 0);
    members.push(file("cat/portrait.png", png_with_orientation(&stored, 6)));
    let resp = app.post_dataset("photos.zip", zip(&members), None).await;
    assert_eq!(resp.status(), 201);
    let id = json(resp).await["id"].as_str().unwrap().to_string();
    let page = json(app.get(&format!("/datasets/{id}/images?limit=200")).await).await;
    let portrait = page["images"].as_array().unwrap().iter().find(|i| i["file"] == "cat/portrait.png").expect("the portrait is listed");
    let resp = app.get(portrait["thumbnail"].as_str().unwrap()).await;
    assert_eq!(resp.status(), 200);
    let thumbnail = image::load_from_memory(&resp.bytes().await.unwrap()).unwrap().into_rgb8();
    assert_eq!(thumbnail.dimensions(), (32, 64));
    let [r, _, b] = thumbnail.get_pixel(24, 8).0;
    assert!(r > 200 && b < 60, "top right {:?}", thumbnail.get_pixel(24, 8));
}

#[tokio::test]
async fn a_thumbnail_is_served_when_its_cache_cannot_be_written() {
    let app = spawn_app().await;
    let id = app.upload_pets(2, false).await;
    let page = json(app.get(&format!("/datasets/{id}/images?limit=1")).await).await;
    let url = page["images"][0]["thumbnail"].as_str().unwrap().to_string();
    let cache = app.data_dir.join("thumbnails");
    std::fs::remove_dir(&cache).unwrap();
    std::fs::write(&cache, b"not a folder").unwrap();
    for _ in 0..2 {
        let resp = app.get(&url).await;
        assert_eq!(resp.status(), 200);
        assert!(image::load_from_memory(&resp.bytes().await.unwrap()).is_ok());
    }
    std::fs::remove_file(&cache).unwrap();
    std::fs::create_dir(&cache).unwrap();
    assert_eq!(app.get(&url).await.status(), 200);
    let names: Vec<String> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec![format!("{}.v2.jpg", page["images"][0]["blob"].as_str().unwrap())], "the thumbnail alone, no temporary file");
}

#[tokio::test]
async fn a_job_s_mistakes_are_its_best_epoch_s_unless_an_epoch_is_named() {
    let app = spawn_app().await;
    let dataset = app.upload_pets(6, false).await;
    // Slow enough to be asked about before its first epoch ends.
    let long = app.submit_job(&dataset, json!({"epochs": 400, "batch_size": 2})).await;
    let long_id = long["id"].as_str().unwrap();
    assert_error(app.get(&format!("/jobs/{long_id}/mistakes")).await, 409, "not_validated").await;
    app.client.post(app.url(&format!("/jobs/{long_id}/cancel"))).send().await.unwrap();
    let job = app.submit_job(&dataset, json!({"epochs": 2, "batch_size": 4})).await;
    let id = job["id"].as_str().unwrap();
    assert_eq!(app.wait_job(id, 120).await["status"], "succeeded");
    let m = json(app.get(&format!("/jobs/{id}/mistakes")).await).await;
    assert_eq!(m["dataset_id"], dataset);
    assert_eq!(m["epoch"], m["best_epoch"]);
    // As many as the epoch's confusion matrix has off its diagonal, most confident first.
    let metrics = json(app.get(&format!("/jobs/{id}/metrics")).await).await;
    let wrong_at = |epoch: &Value| -> usize {
        let report = metrics["validation"].as_array().unwrap().iter().find(|v| v["epoch"] == *epoch).expect("a validated epoch");
        let rows = report["confusion_matrix"].as_array().unwrap();
        rows.iter().enumerate().map(|(i, row)| row.as_array().unwrap().iter().enumerate().filter(|&(j, _)| j != i).map(|(_, n)| n.as_u64().unwrap() as usize).sum::<usize>()).sum()
    };
    let listed = m["mistakes"].as_array().unwrap();
    assert_eq!(listed.len(), wrong_at(&m["epoch"]).min(100), "{m}");
    let scores: Vec<f64> = listed.iter().map(|x| x["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "most confident first: {scores:?}");
    for mistake in listed {
        assert_ne!(mistake["label"], mistake["predicted"], "{mistake}");
        assert!(mistake["score"].as_f64().unwrap() > 0.0);
        assert!(app.get(&format!("/datasets/{dataset}/images/{}/thumbnail", mistake["blob"].as_str().unwrap())).await.status() == 200);
    }
    let at1 = json(app.get(&format!("/jobs/{id}/mistakes?epoch=1")).await).await;
    assert_eq!(at1["epoch"], 1);
    assert_eq!(at1["mistakes"].as_array().unwrap().len(), wrong_at(&json!(1)).min(100), "{at1}");
    assert_error(app.get(&format!("/jobs/{id}/mistakes?epochs=1")).await, 422, "invalid_query").await;
    // A parameter a route does not take is refused, not ignored (the lists take only pages).
    for path in ["/datasets?offset=5", "/models?offset=1", "/base-models?all=1", "/recipes?recipe=auto"] {
        assert_error(app.get(path).await, 422, "invalid_query").await;
    }
    assert_eq!(app.get("/datasets").await.status(), 200);
    assert_error(app.get(&format!("/jobs/{id}/mistakes?epoch=9")).await, 404, "not_found").await;
    assert_error(app.get(&format!("/jobs/{id}/mistakes?epoch=first")).await, 422, "invalid_query").await;
    assert_error(app.get(&format!("/jobs/{id}/mistakes?epoch=0")).await, 422, "invalid_query").await;
    assert_error(app.get(&format!("/jobs/{id}/mistakes?epoch=-1")).await, 422, "invalid_query").await;
    assert_error(app.get("/jobs/nope/mistakes").await, 404, "not_found").await;
}

#[tokio::test]
async fn the_base_models_and_recipes_on_offer() {
    let app = spawn_app().await;
    let dataset = app.upload_pets(3, false).await;
    app.submit_job(&dataset, json!({"epochs": 1})).await; // installs `tiny` and names it
    let bases = json(app.get("/base-models").await).await;
    assert_eq!(bases["default"], "google/vit-base-patch16-224");
    assert_eq!(bases["local"], json!(["tiny"]));
    assert_eq!(bases["hub"], json!(["google/vit-base-patch16-224"]), "a local name is not listed as a hub id");
    let recipes = json(app.get("/recipes").await).await;
    assert_eq!((recipes["auto"]["after_probe"].as_str(), recipes["auto"]["head_init"].as_str()), (Some("auto"), Some("probe")));
    assert_eq!((recipes["manual"]["learning_rate"].as_f64(), recipes["manual"]["epochs"].as_u64()), (Some(5e-5), Some(3)));
    assert_error(app.post_json("/recipes", &json!({})).await, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn a_browser_at_the_root_is_sent_to_the_console_and_its_files_are_served() {
    let app = spawn_app().await;
    let no_redirect = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let resp = no_redirect.get(app.url("/")).header("accept", "text/html,application/xhtml+xml").send().await.unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/ui/");
    let info: Value = json(app.get("/").await).await;
    assert_eq!(info["console"], "/ui/");
    assert_eq!(no_redirect.get(app.url("/ui")).send().await.unwrap().status(), 308);
    for page in ["/ui/", "/ui/jobs/some-id", "/ui/predict", "/ui/no/such/page"] {
        let resp = app.get(page).await;
        assert_eq!(resp.status(), 200, "{page}");
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
        assert!(resp.text().await.unwrap().contains("/ui/assets/app.js"));
    }
    for (file, kind) in [("app.js", "text/javascript"), ("api.js", "text/javascript"), ("charts.js", "text/javascript"), ("tar.js", "text/javascript"), ("style.css", "text/css")] {
        let resp = app.get(&format!("/ui/assets/{file}")).await;
        assert_eq!(resp.status(), 200, "{file}");
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with(kind));
    }
    assert_error(app.get("/ui/assets/secret.js").await, 404, "not_found").await;
    assert_error(app.get("/ui/assets/..%2F..%2Fopenapi.yaml").await, 404, "not_found").await;
}
