//! `/predict`: input forms, order, top_k, model choice and hot swap, batching, overload.

use base64::Engine;
use serde_json::{Value, json};

use crate::fixtures::{corrupt_jpeg, decoder_fixture, jpeg, png, png_with_orientation};
use crate::helpers::{TestApp, assert_error, json, spawn_app, spawn_app_with};

/// An app with one succeeded job; returns (app, dataset id, model id).
async fn trained_app(adjust: impl FnOnce(&mut vitforge::config::ServeConfig)) -> (TestApp, String, String) {
    let app = spawn_app_with(adjust).await;
    let dataset = app.upload_pets(4, false).await;
    let job = app.submit_job(&dataset, json!({"epochs": 1, "batch_size": 4})).await;
    let done = app.wait_job(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let model = done["model_id"].as_str().unwrap().to_string();
    (app, dataset, model)
}

fn multipart(images: &[(&str, Vec<u8>)]) -> reqwest::multipart::Form {
    images.iter().fold(reqwest::multipart::Form::new(), |form, (name, bytes)| {
        form.part(name.to_string(), reqwest::multipart::Part::bytes(bytes.clone()).file_name(format!("{name}.img")))
    })
}

fn check_probabilities(p: &Value, top_k: usize) {
    let top = p["top_k"].as_array().unwrap();
    assert_eq!(top.len(), top_k);
    assert_eq!(p["label"], top[0]["label"]);
    assert_eq!(p["score"], top[0]["score"]);
    let scores: Vec<f64> = top.iter().map(|t| t["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "sorted: {scores:?}");
    if top_k == 2 {
        assert!((scores.iter().sum::<f64>() - 1.0).abs() < 1e-5, "softmax sums to 1: {scores:?}");
    }
}

#[tokio::test]
async fn every_input_form_gives_the_same_answer_in_input_order() {
    let (app, _, model) = trained_app(|_| {}).await;
    let images = [jpeg(1), png(2), jpeg(3)];
    let url = app.url("/predict");

    let resp = app.client.post(&url).multipart(multipart(&[("a", images[0].clone()), ("b", images[1].clone()), ("c", images[2].clone())])).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let by_multipart = json(resp).await;
    assert_eq!(by_multipart["model_id"], model);
    let preds = by_multipart["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 3);
    for p in preds {
        check_probabilities(p, 2);
    }
    // Each multipart prediction names its part's file; the other forms have no file name.
    let files: Vec<&Value> = preds.iter().map(|p| &p["file"]).collect();
    assert_eq!(files, [&json!("a.img"), &json!("b.img"), &json!("c.img")]);
    let mut by_multipart = by_multipart.clone();
    for p in by_multipart["predictions"].as_array_mut().unwrap() {
        p.as_object_mut().unwrap().remove("file");
    }
    let unnamed = reqwest::multipart::Form::new().part("a", reqwest::multipart::Part::bytes(images[0].clone()));
    let unnamed = json(app.client.post(&url).multipart(unnamed).send().await.unwrap()).await;
    assert_eq!(unnamed["predictions"][0], by_multipart["predictions"][0], "a part without a file name has no `file`");

    let b64: Vec<String> = images.iter().map(|i| base64::engine::general_purpose::STANDARD.encode(i)).collect();
    let by_json = json(app.post_json("/predict", &json!({"images": b64})).await).await;
    assert_eq!(by_json["predictions"], by_multipart["predictions"]);
    // Data URLs, as a browser's FileReader.readAsDataURL gives them, are read the same.
    let data_urls: Vec<String> = b64.iter().zip(["image/jpeg", "image/png", "image/jpeg"]).map(|(b, kind)| format!("data:{kind};base64,{b}")).collect();
    let by_data_url = json(app.post_json("/predict", &json!({"images": data_urls})).await).await;
    assert_eq!(by_data_url["predictions"], by_multipart["predictions"]);

    // One at a time, raw bodies: each equals its position in the batch (order preserved).
    for (i, img) in images.iter().enumerate() {
        let ct = if i == 1 { "image/png" } else { "image/jpeg" };
        let resp = app.client.post(&url).header("content-type", ct).body(img.clone()).send().await.unwrap();
        let single = json(resp).await;
        let (a, b) = (&single["predictions"][0]["top_k"], &by_multipart["predictions"][i]["top_k"]);
        for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
            assert_eq!(x["label"], y["label"]);
            assert!((x["score"].as_f64().unwrap() - y["score"].as_f64().unwrap()).abs() < 1e-5);
        }
    }
    let resp = app.client.post(&url).header("content-type", "application/octet-stream").body(images[0].clone()).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    // top_k is capped at the number of labels.
    let one = json(app.client.post(app.url("/predict?top_k=1")).header("content-type", "image/jpeg").body(images[0].clone()).send().await.unwrap()).await;
    check_probabilities(&one["predictions"][0], 1);
    let many = json(app.client.post(app.url("/predict?top_k=50")).header("content-type", "image/jpeg").body(images[0].clone()).send().await.unwrap()).await;
    check_probabilities(&many["predictions"][0], 2);
}

/// Each label's score in one answer.
fn scores(answer: &Value) -> std::collections::BTreeMap<String, f64> {
    answer["predictions"][0]["top_k"].as_array().unwrap().iter().map(|s| (s["label"].as_str().unwrap().to_string(), s["score"].as_f64().unwrap())).collect()
}

/// `--precision bf16`: the service's answers are the bf16 model's, not the f32 model's.
#[tokio::test]
async fn the_serve_precision_reaches_predict() {
    use vitforge::model::classifier::Classifier;
    use vitforge::model::{ModelSource, Precision};
    let (app, _, model) = trained_app(|c| c.precision = "bf16".into()).await;
    let image = png(4);
    let req = app.client.post(app.url("/predict?top_k=2")).header("content-type", "image/png").body(image.clone());
    let served = scores(&json(req.send().await.unwrap()).await);
    let dir = app.data_dir.join("models").join(&model);
    let local = |precision: Precision| {
        let clf = Classifier::load(&ModelSource::Dir(dir.clone()), &candle_core::Device::Cpu, precision).unwrap();
        let answer = clf.classify(&[("x".to_string(), image.clone())], 2, 1 << 24, 1, false).unwrap().remove(0);
        answer.top_k.into_iter().map(|s| (s.label, f64::from(s.score))).collect::<std::collections::BTreeMap<_, _>>()
    };
    let (bf16, f32) = (local(Precision::Bf16), local(Precision::F32));
    for (label, score) in &served {
        assert!((score - bf16[label]).abs() < 1e-6, "{label}: served {score}, bf16 {}", bf16[label]);
    }
    assert!(served.iter().any(|(label, score)| (score - f32[label]).abs() > 1e-6), "served {served:?} equals f32 {f32:?}");
}

#[tokio::test]
async fn test_time_flip_averages_an_image_with_its_mirror_image() {
    let (app, _, _) = trained_app(|_| {}).await;
    let image = png(4);
    let mut mirror = Vec::new();
    image::load_from_memory(&image).unwrap().fliph().write_to(&mut std::io::Cursor::new(&mut mirror), image::ImageFormat::Png).unwrap();
    let ask = |body: Vec<u8>, query: &'static str| {
        let req = app.client.post(app.url(&format!("/predict?top_k=2{query}"))).header("content-type", "image/png").body(body);
        async move { json(req.send().await.unwrap()).await }
    };
    let (plain, mirrored) = (scores(&ask(image.clone(), "").await), scores(&ask(mirror.clone(), "").await));
    let flipped = scores(&ask(image.clone(), "&flip=true").await);
    let flipped_mirror = scores(&ask(mirror, "&flip=true").await);
    assert_ne!(plain, mirrored, "the model tells an image from its mirror, so the test can see a difference");
    for (label, score) in &flipped {
        let mean = (plain[label] + mirrored[label]) / 2.0;
        assert!((score - mean).abs() < 1e-4, "{label}: {score} with flip, {mean} the mean of the two");
        assert!((score - flipped_mirror[label]).abs() < 1e-4, "an image and its mirror agree with flip");
    }
    assert_eq!(scores(&ask(image, "&flip=false").await), plain);
}

/// A photo stored sideways with an EXIF orientation (as phones store portrait photos) is
/// classified as it is meant to be seen: exactly as the same picture stored upright.
#[tokio::test]
async fn an_image_is_classified_upright_by_its_exif_orientation() {
    let (app, _, _) = trained_app(|_| {}).await;
    let upright = image::load_from_memory(&png(4)).unwrap().into_rgb8();
    let sideways = image::imageops::rotate270(&upright); // stored a quarter turn back…
    let ask = |body: Vec<u8>| {
        let req = app.client.post(app.url("/predict?top_k=2")).header("content-type", "image/png").body(body);
        async move { scores(&json(req.send().await.unwrap()).await) }
    };
    let plain = ask(png_with_orientation(&upright, 1)).await;
    assert_eq!(ask(png_with_orientation(&sideways, 6)).await, plain, "…with orientation 6: turned upright");
    assert_ne!(ask(png_with_orientation(&sideways, 1)).await, plain, "the model tells the sideways picture apart, so the test can see a difference");
}

/// A TIFF, Netpbm or 16-bit BMP image is classified exactly as the PNG of the pixels transformers
/// gets from it (JPEG-compressed YCbCr tiles, premultiplied alpha, an orientation tag, a palette,
/// and grey and colour of maxima other than 255 among them).
#[tokio::test]
async fn tiff_netpbm_and_16_bit_bmp_images_are_classified_as_the_png_of_their_pixels() {
    let (app, _, _) = trained_app(|_| {}).await;
    let names = [
        "tiff/jpeg-ycbcr-tiles.tif",
        "tiff/rgba-premultiplied.tif",
        "tiff/orientation6.tif",
        "tiff/rgb16.tif",
        "tiff/palette4.tif",
        "pnm/p2-max10.pgm",
        "pnm/p6-max65535.ppm",
        "bmp/rgb565-bitfields.bmp",
    ];
    let mut images: Vec<(String, Vec<u8>)> = Vec::new();
    for name in names {
        images.push((name.into(), decoder_fixture(name)));
        images.push((format!("{name}.png"), decoder_fixture(&format!("{name}.png"))));
    }
    let form = multipart(&images.iter().map(|(n, b)| (n.as_str(), b.clone())).collect::<Vec<_>>());
    let resp = app.client.post(app.url("/predict?top_k=2")).multipart(form).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let answer = json(resp).await;
    let predictions = answer["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 2 * names.len());
    for (name, pair) in names.iter().zip(predictions.chunks(2)) {
        assert_eq!(pair[0]["top_k"], pair[1]["top_k"], "{name}");
    }
}

#[tokio::test]
async fn bad_predict_requests_name_the_problem() {
    let app = spawn_app().await;
    let resp = app.client.post(app.url("/predict")).header("content-type", "image/jpeg").body(jpeg(1)).send().await.unwrap();
    let msg = assert_error(resp, 409, "no_model").await;
    assert!(msg.contains("POST /jobs"), "{msg}");

    let dataset = app.upload_pets(3, false).await;
    let job = app.submit_job(&dataset, json!({"epochs": 1})).await;
    app.wait_job(job["id"].as_str().unwrap(), 120).await;
    let url = app.url("/predict");
    let resp = app.client.post(&url).multipart(multipart(&[("good", jpeg(1)), ("broken", corrupt_jpeg()), ("also", png(3))])).send().await.unwrap();
    let msg = assert_error(resp, 400, "invalid_image").await;
    assert!(msg.contains("image 2") && msg.contains("broken"), "{msg}");
    let resp = app.client.post(&url).header("content-type", "image/png").body("not an image").send().await.unwrap();
    assert_error(resp, 400, "invalid_image").await;
    // An iPhone photo (HEIC) is named as such, not called "not an image".
    let heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic\0\0\0\0".to_vec();
    let resp = app.client.post(&url).header("content-type", "image/heic").body(heic).send().await.unwrap();
    let msg = assert_error(resp, 400, "invalid_image").await;
    assert!(msg.contains("unsupported image format HEIC/HEIF (supported: JPEG"), "{msg}");
    // A kind of TIFF that is not read is named too.
    let resp = app.client.post(&url).header("content-type", "image/tiff").body(decoder_fixture("tiff/refused-palette16.tif")).send().await.unwrap();
    let msg = assert_error(resp, 400, "invalid_image").await;
    assert!(msg.ends_with("unsupported image: a TIFF of 16-bit palette colours; save it as 8-bit RGB"), "{msg}");
    let resp = app.client.post(&url).header("content-type", "image/x-portable-anymap").body(decoder_fixture("pnm/refused-p7.pam")).send().await.unwrap();
    let msg = assert_error(resp, 400, "invalid_image").await;
    assert!(msg.ends_with("unsupported image: a PAM (P7) image; save it as PNG"), "{msg}");
    let resp = app.post_json("/predict", &json!({"images": ["@@@not base64@@@"]})).await;
    let msg = assert_error(resp, 400, "invalid_base64").await;
    assert!(msg.contains("images[0]"), "{msg}");
    let resp = app.post_json("/predict", &json!({"images": [format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png(3))), "data:text/plain,hello"]})).await;
    let msg = assert_error(resp, 400, "invalid_base64").await;
    assert_eq!(msg, "images[1] is a data URL without ';base64,': send the image's bytes in base64");
    assert_error(app.post_json("/predict", &json!({"images": []})).await, 422, "no_images").await;
    assert_error(app.post_json("/predict", &json!({"pictures": []})).await, 422, "invalid_field").await;
    let msg = assert_error(app.post_json("/predict", &json!(["a"])).await, 422, "invalid_field").await;
    assert_eq!(msg, "the body must be a JSON object, not an array");
    let resp = app.client.post(&url).header("content-type", "application/json").body(r#"{"images": ["a""#).send().await.unwrap();
    assert_error(resp, 400, "invalid_json").await;
    let resp = app.client.post(&url).header("content-type", "text/plain").body("hello").send().await.unwrap();
    assert_error(resp, 415, "unsupported_content_type").await;
    for almost in ["application/jsonx", "application/octet-streamy", "multipart/form-datas; boundary=x"] {
        let resp = app.client.post(&url).header("content-type", almost).body("{}").send().await.unwrap();
        assert_error(resp, 415, "unsupported_content_type").await;
    }
    let resp = app.client.post(app.url("/predict?model=nope")).header("content-type", "image/jpeg").body(jpeg(1)).send().await.unwrap();
    assert_error(resp, 404, "not_found").await;
    let resp = app.client.post(app.url("/predict?top_k=0")).header("content-type", "image/jpeg").body(jpeg(1)).send().await.unwrap();
    assert_error(resp, 422, "invalid_query").await;
    let resp = app.client.post(app.url("/predict?top_k=many")).header("content-type", "image/jpeg").body(jpeg(1)).send().await.unwrap();
    assert_error(resp, 422, "invalid_query").await;
    let resp = app.client.post(app.url("/predict?flip=maybe")).header("content-type", "image/jpeg").body(jpeg(1)).send().await.unwrap();
    assert_error(resp, 422, "invalid_query").await;
    let resp = app.client.post(app.url("/predict?topk=3")).header("content-type", "image/jpeg").body(jpeg(1)).send().await.unwrap();
    assert_error(resp, 422, "invalid_query").await;
    let resp = app.client.post(app.url("/predict?model=a%00b")).header("content-type", "image/jpeg").body(jpeg(1)).send().await.unwrap();
    let msg = assert_error(resp, 422, "invalid_query").await;
    assert!(msg.contains("NUL"), "{msg}");
}

#[tokio::test]
async fn the_default_switches_to_the_newest_model_and_older_ones_stay_reachable() {
    let (app, dataset, first) = trained_app(|_| {}).await;
    let post = |q: &str| app.client.post(app.url(&format!("/predict{q}"))).header("content-type", "image/jpeg").body(jpeg(5)).send();
    assert_eq!(json(post("").await.unwrap()).await["model_id"], first);
    let job = app.submit_job(&dataset, json!({"epochs": 1, "seed": 7})).await;
    let done = app.wait_job(job["id"].as_str().unwrap(), 120).await;
    let second = done["model_id"].as_str().unwrap();
    // The new model was loaded before the job showed as succeeded, so the switch is immediate
    // or, at worst, a moment later.
    let mut served = Value::Null;
    for _ in 0..40 {
        served = json(post("").await.unwrap()).await["model_id"].clone();
        if served == second {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(served, second);
    assert_eq!(json(post(&format!("?model={first}")).await.unwrap()).await["model_id"], first);

    // The default's row deleted behind this process's back (another process deleted it, or a
    // delete has not moved the default on yet): a request that names no model gets the newest
    // one left, not a 404 for a model it never named; one that names it gets that 404.
    sqlx::query("delete from models where id = $1").bind(second).execute(&app.db).await.unwrap();
    assert_eq!(json(post("").await.unwrap()).await["model_id"], first);
    let msg = assert_error(post(&format!("?model={second}")).await.unwrap(), 404, "not_found").await;
    assert!(msg.contains(second), "{msg}");
}

#[tokio::test]
async fn concurrent_requests_are_batched_and_all_answered() {
    let (app, _, _) = trained_app(|c| c.max_batch_delay_ms = 50).await;
    let mut tasks = vec![];
    for i in 0..64 {
        let client = app.client.clone();
        let url = app.url("/predict");
        tasks.push(tokio::spawn(async move {
            client.post(url).header("content-type", "image/jpeg").body(jpeg(i)).send().await.unwrap().status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let count = |name: &str| -> f64 {
        metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).unwrap_or_else(|| panic!("{name} in\n{metrics}")).parse().unwrap()
    };
    let batches = count("vitforge_predict_batch_size_count");
    let images = count("vitforge_predict_batch_size_sum");
    assert_eq!(images, 64.0);
    assert!(batches < 64.0, "64 requests ran in {batches} batches: some batches held several images");
    assert!(metrics.contains("vitforge_http_requests_total{method=\"POST\",route=\"/predict\",status=\"200\"} 64"), "{metrics}");
    assert!(metrics.contains("vitforge_jobs{status=\"succeeded\"} 1"), "{metrics}");
}

#[tokio::test]
async fn overload_gets_429_at_once_and_the_service_recovers() {
    let (app, _, _) = trained_app(|c| {
        c.max_concurrent_requests = 2;
        c.max_batch_delay_ms = 300;
    })
    .await;
    let mut tasks = vec![];
    for i in 0..12 {
        let client = app.client.clone();
        let url = app.url("/predict");
        tasks.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let resp = client.post(url).header("content-type", "image/jpeg").body(jpeg(i)).send().await.unwrap();
            (resp.status().as_u16(), started.elapsed(), resp.text().await.unwrap())
        }));
    }
    let (mut ok, mut rejected) = (vec![], vec![]);
    for t in tasks {
        let (status, took, body) = t.await.unwrap();
        match status {
            200 => ok.push(took),
            429 => {
                assert!(body.contains("overloaded"), "{body}");
                rejected.push(took);
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(ok.len() >= 2 && !rejected.is_empty(), "ok {ok:?}, rejected {rejected:?}");
    // A 429 comes at once, not after waiting for the model thread: every one before any 200
    // (which waits the 300 ms batch delay at least).
    assert!(rejected.iter().max() < ok.iter().min(), "429s {rejected:?}, 200s {ok:?}");
    let resp = app.client.post(app.url("/predict")).header("content-type", "image/jpeg").body(jpeg(99)).send().await.unwrap();
    assert_eq!(resp.status(), 200, "recovers once the burst is over");
}

#[tokio::test]
async fn predict_limits_answer_413_and_422_with_the_error_body() {
    let (app, _, _) = trained_app(|c| {
        c.max_predict_bytes = 16 * 1024;
        c.max_images_per_predict = 2;
    })
    .await;
    let url = app.url("/predict");
    let big = vec![0u8; 20 * 1024];
    // Declared length over the limit: refused before reading.
    let resp = app.client.post(&url).header("content-type", "image/png").body(big.clone()).send().await.unwrap();
    assert_error(resp, 413, "body_too_large").await;
    // No declared length (chunked): refused once the limit is passed.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..20).map(|_| Ok(vec![0u8; 1024])).collect();
    let resp = app
        .client
        .post(&url)
        .header("content-type", "image/png")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_error(resp, 413, "body_too_large").await;
    let resp = app.client.post(&url).multipart(multipart(&[("a", big.clone())])).send().await.unwrap();
    assert_error(resp, 413, "body_too_large").await;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&big);
    assert_error(app.post_json("/predict", &json!({"images": [b64]})).await, 413, "body_too_large").await;
    // Over the image count, in every input form.
    let resp = app.client.post(&url).multipart(multipart(&[("a", jpeg(1)), ("b", jpeg(2)), ("c", jpeg(3))])).send().await.unwrap();
    assert_error(resp, 422, "too_many_images").await;
    let three: Vec<String> = (0..3).map(|i| base64::engine::general_purpose::STANDARD.encode(jpeg(i))).collect();
    assert_error(app.post_json("/predict", &json!({"images": three})).await, 422, "too_many_images").await;
    // At the limits, it answers.
    let resp = app.client.post(&url).multipart(multipart(&[("a", jpeg(1)), ("b", jpeg(2))])).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// The memory budget for work in flight decides how a request's images are decoded: in
/// parallel when their decodes fit it together, one at a time when only that fits (answered, not
/// 429 for ever), and a request that cannot fit even so is 413 at once: retrying cannot help.
#[tokio::test]
async fn images_are_decoded_one_at_a_time_when_the_budget_is_small_and_refused_when_they_cannot_fit() {
    use image::ImageFormat;
    // 24 MiB: one decode's allowance (16 MiB of metadata room, 12 bytes a pixel) fits, two do not.
    let (app, _, _) = trained_app(|c| c.max_inflight_bytes = 24 << 20).await;
    let url = app.url("/predict");
    let resp = app.client.post(&url).multipart(multipart(&[("a", jpeg(1)), ("b", jpeg(2)), ("c", png(3))])).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await["predictions"].as_array().unwrap().len(), 3);
    // 1000×1000 pixels: 16 MiB + 12 MB alone, over the whole budget.
    let big = crate::fixtures::image(ImageFormat::Jpeg, 1000, 4);
    let resp = app.client.post(&url).header("content-type", "image/jpeg").body(big).send().await.unwrap();
    let message = assert_error(resp, 413, "images_too_large").await;
    assert!(message.contains("--max-inflight-bytes") && message.contains(&(24u64 << 20).to_string()), "{message}");
}
