//! `/aliases`: names that point at a model for `/predict?model=`, moved on request.

use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_error, json};

async fn put(app: &TestApp, name: &str, body: &Value) -> reqwest::Response {
    app.client.put(app.url(&format!("/aliases/{name}"))).json(body).send().await.unwrap()
}

async fn predicted_by(app: &TestApp, query: &str) -> Value {
    let resp = app.client.post(app.url(&format!("/predict{query}"))).header("content-type", "image/png").body(crate::fixtures::png(7)).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{query}");
    json(resp).await["model_id"].clone()
}

#[tokio::test]
async fn an_alias_names_a_model_for_predict_until_it_is_moved() {
    let app = crate::helpers::spawn_app().await;
    let dataset = app.upload_pets(4, false).await;
    let mut models = vec![];
    for seed in [1, 2] {
        let job = app.submit_job(&dataset, json!({"epochs": 1, "batch_size": 4, "seed": seed})).await;
        let done = app.wait_job(job["id"].as_str().unwrap(), 120).await;
        models.push(done["model_id"].as_str().unwrap().to_string());
    }
    assert_eq!(json(app.get("/aliases").await).await, json!([]));

    // Made (201), then put again (200): /predict follows the name, not the newest model.
    let resp = put(&app, "production", &json!({"model_id": models[0]})).await;
    assert_eq!(resp.status(), 201);
    let made = json(resp).await;
    assert_eq!((&made["name"], &made["model_id"]), (&json!("production"), &json!(models[0])));
    assert!(made["updated_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(put(&app, "production", &json!({"model_id": models[0]})).await.status(), 200);
    assert_eq!(predicted_by(&app, "").await, models[1], "the default is the newest model");
    assert_eq!(predicted_by(&app, "?model=production").await, models[0]);
    assert_eq!(predicted_by(&app, &format!("?model={}", models[1])).await, models[1], "an id still names its model");

    // Moved: the next request follows it.
    let moved = json(put(&app, "production", &json!({"model_id": models[1]})).await).await;
    assert_eq!(moved["model_id"], models[1].as_str());
    assert_eq!(predicted_by(&app, "?model=production").await, models[1]);
    put(&app, "canary", &json!({"model_id": models[1]})).await;
    let listed = json(app.get("/aliases").await).await;
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["canary", "production"]);
    assert_eq!(json(app.get("/aliases/production").await).await, moved);

    // A model an alias points at is not deleted; the message names the aliases.
    let msg = assert_error(app.delete(&format!("/models/{}", models[1])).await, 409, "model_aliased").await;
    assert!(msg.contains("'canary', 'production'"), "{msg}");

    // Bad input.
    for bad in ["two%20words", "-x", "caf%C3%A9", &"x".repeat(65), "01938a6e-8c1f-7d2a-9b3e-5f0a1c2d3e4f"] {
        assert_error(put(&app, bad, &json!({"model_id": models[0]})).await, 422, "invalid_alias").await;
    }
    let msg = assert_error(put(&app, "staging", &json!({"model_id": "nope"})).await, 404, "not_found").await;
    assert!(msg.contains("model 'nope'"), "{msg}");
    assert_error(put(&app, "staging", &json!({})).await, 422, "invalid_field").await;
    assert_error(put(&app, "staging", &json!({"model_id": models[0], "colour": 1})).await, 422, "invalid_field").await;
    assert_error(put(&app, "staging", &json!({"model_id": 5})).await, 422, "invalid_field").await;
    let url = app.url("/aliases/staging");
    assert_error(app.client.put(&url).header("content-type", "application/json").body("{nope").send().await.unwrap(), 400, "invalid_json").await;
    assert_error(app.client.put(&url).body("model_id=x").send().await.unwrap(), 415, "expected_json").await;
    assert_error(app.get("/aliases/staging").await, 404, "not_found").await;
    assert_error(app.delete("/aliases/staging").await, 404, "not_found").await;
    assert_error(app.get("/aliases?sort=name").await, 422, "invalid_query").await;
    let resp = app.client.post(app.url("/predict?model=staging")).header("content-type", "image/png").body(crate::fixtures::png(7)).send().await.unwrap();
    assert_error(resp, 404, "not_found").await;
    assert_eq!(app.client.post(app.url("/aliases/production")).send().await.unwrap().status(), 405);
    assert_eq!(json(app.get("/aliases").await).await, listed, "nothing refused was stored");

    // Deleted: the model stays, and can go once no alias points at it.
    for name in ["canary", "production"] {
        assert_eq!(app.delete(&format!("/aliases/{name}")).await.status(), 204);
    }
    assert_eq!(json(app.get("/aliases").await).await, json!([]));
    assert_eq!(app.delete(&format!("/models/{}", models[1])).await.status(), 204);
}
