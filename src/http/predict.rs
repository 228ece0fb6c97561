//! `POST /predict`: classify images with the newest fine-tuned model (or `?model=`).

use axum::Json;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{StatusCode, header};
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::error::AppError;
use super::inflight::BodyUse;
use super::extract::ApiQuery;
use super::{AppState, Route};
use crate::model::classifier::Prediction;

pub fn routes() -> Vec<Route> {
    vec![Route::post("/predict", predict).with_query().without_body_limit().body(BodyUse::Images)]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictQuery {
    model: Option<String>,
    top_k: Option<usize>,
    /// Test-time flip: average each image's probabilities with its mirror image's.
    #[serde(default)]
    flip: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Base64Images {
    images: Vec<String>,
}

#[derive(Debug, Serialize)]
struct PredictResponse {
    model_id: String,
    predictions: Vec<NamedPrediction>,
}

/// A prediction, with the file name of the multipart part it is for where the part has one, so
/// that a client sending many files need not count them.
#[derive(Debug, Serialize)]
struct NamedPrediction {
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    #[serde(flatten)]
    prediction: Prediction,
}

/// The images of a request: for each, its name for error messages, the file name its multipart
/// part gave (if any) and its bytes.
type Images = Vec<(String, Option<String>, Bytes)>;

/// The base64 of one image of a JSON body: the string itself, or the data of a base64 data URL
/// (`data:image/jpeg;base64,…`, what a browser's `FileReader.readAsDataURL` gives).
fn base64_of(text: &str) -> Result<&str, String> {
    let Some(url) = text.strip_prefix("data:") else { return Ok(text) };
    match url.split_once(',') {
        Some((kind, data)) if kind.ends_with(";base64") => Ok(data),
        _ => Err("is a data URL without ';base64,': send the image's bytes in base64".to_string()),
    }
}

/// The images of a request, named for error messages: multipart parts (any field name), a raw
/// image body, or JSON `{"images": [base64, ...]}`.
async fn images_of(s: &AppState, req: Request) -> Result<Images, AppError> {
    let limit = s.config.max_predict_bytes;
    let too_large = || AppError::too_large("body_too_large", format!("the request body is larger than the limit of {limit} bytes"));
    // A declared length over the limit is refused before any of the body is read.
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let req = req.map(|body| axum::body::Body::new(http_body_util::Limited::new(body, limit)));
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    // The media type without its parameters (`; boundary=…`, `; charset=…`).
    let essence = content_type.split(';').next().unwrap_or("").trim().to_string();
    let max = s.config.max_images_per_predict;
    let too_many = move |n: usize| AppError::unprocessable("too_many_images", format!("{n} images in one request; the limit is {max}"));
    // The body limit surfaces as a 413 from whichever reader hit it; answer all of them alike.
    let body_error = |status: StatusCode, code: &'static str, text: String| {
        if status == StatusCode::PAYLOAD_TOO_LARGE { too_large() } else { AppError::client(status, code, text) }
    };
    let mut out = Vec::new();
    if essence == "multipart/form-data" {
        let mut form = Multipart::from_request(req, s)
            .await
            .map_err(|e| AppError::bad_request("invalid_multipart", e.body_text()))?;
        while let Some(field) = form.next_field().await.map_err(|e| body_error(e.status(), "invalid_multipart", e.body_text()))? {
            let file = field.file_name().map(str::to_string);
            let name = file.clone().or(field.name().map(str::to_string)).unwrap_or_else(|| format!("part {}", out.len() + 1));
            let bytes = field.bytes().await.map_err(|e| body_error(e.status(), "invalid_multipart", e.body_text()))?;
            out.push((name, file, bytes));
            if out.len() > max {
                return Err(too_many(out.len()));
            }
        }
    } else if essence == "application/json" {
        let body = Bytes::from_request(req, s).await.map_err(|e| body_error(e.status(), "invalid_body", e.body_text()))?;
        // Parsing and decoding up to --max-predict-bytes of JSON and base64 is CPU work: off the
        // async runtime's threads.
        out = tokio::task::spawn_blocking(move || {
            let axum::Json(body) = axum::Json::<Base64Images>::from_bytes(&body).map_err(|rejection| {
                // Well-formed JSON of the wrong kind (`[]`): said as plainly as for other bodies.
                let value = serde_json::from_slice::<serde_json::Value>(&body).ok();
                value.as_ref().and_then(crate::http::extract::not_an_object).unwrap_or_else(|| AppError::from(rejection))
            })?;
            if body.images.len() > max {
                return Err(too_many(body.images.len()));
            }
            body.images
                .iter()
                .enumerate()
                .map(|(i, b64)| {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(base64_of(b64.trim()).map_err(|e| AppError::bad_request("invalid_base64", format!("images[{i}] {e}")))?)
                        .map_err(|e| AppError::bad_request("invalid_base64", format!("images[{i}] is not valid base64: {e}")))?;
                    Ok((format!("images[{i}]"), None, Bytes::from(bytes)))
                })
                .collect::<Result<Vec<_>, AppError>>()
        })
        .await
        .map_err(anyhow::Error::from)??;
    } else if essence.starts_with("image/") || essence == "application/octet-stream" || essence.is_empty() {
        let bytes = Bytes::from_request(req, s).await.map_err(|e| body_error(e.status(), "invalid_body", e.body_text()))?;
        out.push(("body".to_string(), None, bytes));
    } else {
        return Err(AppError::unsupported_media(
            "unsupported_content_type",
            format!("cannot read images from '{content_type}': send multipart/form-data, image/*, application/octet-stream or JSON {{\"images\": [base64]}}"),
        ));
    }
    if out.is_empty() {
        return Err(AppError::unprocessable("no_images", "the request contains no image"));
    }
    Ok(out)
}

async fn predict(State(s): State<AppState>, ApiQuery(q): ApiQuery<PredictQuery>, req: Request) -> Result<Json<PredictResponse>, AppError> {
    let _permit = s.predictor.admit()?;
    let model = s.models.resolve(q.model).await?;
    if q.top_k == Some(0) {
        return Err(AppError::unprocessable("invalid_query", "top_k must be at least 1"));
    }
    let (images, files): (Vec<(String, Bytes)>, Vec<Option<String>>) =
        images_of(&s, req).await?.into_iter().map(|(name, file, bytes)| ((name, bytes), file)).unzip();
    let n = images.len();
    let loaded = s.models.load(&model).await?;
    let predictions = s.predictor.classify(loaded, images, q.top_k.unwrap_or(5), s.config.max_image_pixels, q.flip).await?;
    s.metrics.predict_images.inc_by(n as u64);
    let predictions = files.into_iter().zip(predictions).map(|(file, prediction)| NamedPrediction { file, prediction }).collect();
    Ok(Json(PredictResponse { model_id: model.id, predictions }))
}
