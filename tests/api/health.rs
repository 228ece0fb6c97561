use crate::helpers::{assert_error, json, spawn_app};

#[tokio::test]
async fn healthz_and_readyz_answer() {
    let app = spawn_app().await;
    let resp = app.get("/healthz").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await["status"], "ok");
    let resp = app.get("/readyz").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await["status"], "ready");
}

#[tokio::test]
async fn unknown_route_and_wrong_method_get_json_errors() {
    let app = spawn_app().await;
    assert_error(app.get("/nope").await, 404, "route_not_found").await;
    let resp = app.client.put(app.url("/healthz")).send().await.unwrap();
    assert_error(resp, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn creates_database_in_data_folder() {
    let app = spawn_app().await;
    // Under VITFORGE_TEST_POSTGRES the database is on that server, not in the folder.
    assert_eq!(app.data_dir.join("vitforge.db").exists(), crate::support::test_postgres().is_none());
    assert!(app.data_dir.join("blobs").is_dir());
}
