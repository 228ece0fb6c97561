//! `GET /datasets`, `/jobs` and `/models` in pages: `limit`, and the next page's URL in a `Link`
//! header with an opaque cursor.

use reqwest::Response;
use serde_json::Value;

use crate::fixtures::{self, class_images};
use crate::helpers::{assert_error, json, spawn_app, TestApp};

/// The ids of a list's answer.
fn ids(list: &Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(|item| item["id"].as_str().unwrap().to_string()).collect()
}

/// The URL of the `rel="next"` page of a response's `Link` header.
fn next_of(resp: &Response) -> Option<String> {
    let link = resp.headers().get("link")?.to_str().unwrap();
    let url = link.strip_prefix('<').and_then(|l| l.strip_suffix(">; rel=\"next\"")).unwrap_or_else(|| panic!("{link}"));
    Some(url.to_string())
}

/// Every page from `first` on, following the `Link` headers: each page's ids, and the URLs.
async fn follow(app: &TestApp, first: &str) -> (Vec<Vec<String>>, Vec<String>) {
    let (mut pages, mut urls, mut url) = (Vec::new(), vec![first.to_string()], first.to_string());
    loop {
        let resp = app.get(&url).await;
        assert_eq!(resp.status(), 200, "{url}");
        let next = next_of(&resp);
        pages.push(ids(&json(resp).await));
        match next {
            Some(n) => {
                urls.push(n.clone());
                url = n;
            }
            None => return (pages, urls),
        }
        assert!(pages.len() < 50, "the pages never end: {urls:?}");
    }
}

#[tokio::test]
async fn lists_come_in_pages_that_follow_the_whole_list() {
    let app = spawn_app().await;
    let mut uploaded = Vec::new();
    for i in 0..7 {
        let resp = app.post_dataset(&format!("{i}.zip"), fixtures::zip(&class_images("", &["a", "b"], 1, i * 10)), None).await;
        assert_eq!(resp.status(), 201);
        uploaded.push(json(resp).await["id"].as_str().unwrap().to_string());
    }
    // Three created in the same millisecond: the id orders them, and no page may split them wrongly.
    let same = "2026-01-01T00:00:00.000Z";
    for id in &uploaded[1..4] {
        sqlx::query("update datasets set created_at = $1 where id = $2").bind(same).bind(id).execute(&app.db).await.unwrap();
    }
    let whole = ids(&json(app.get("/datasets").await).await);
    assert_eq!(whole.len(), 7);
    let mut tied = uploaded[1..4].to_vec();
    tied.reverse();
    assert_eq!(whole[4..], tied, "the three of the same (earlier) millisecond last, the newest id first");

    for limit in [1, 2, 3, 7, 1000] {
        let (pages, urls) = follow(&app, &format!("/datasets?limit={limit}")).await;
        assert_eq!(pages.concat(), whole, "limit {limit}: {urls:?}");
        assert_eq!(pages.len(), 7usize.div_ceil(limit), "limit {limit}: {urls:?}");
        assert!(pages.iter().all(|p| p.len() <= limit));
        assert!(urls[1..].iter().all(|u| u.starts_with(&format!("/datasets?limit={limit}&cursor="))), "{urls:?}");
    }

    // A page goes on from where the last one ended, whatever happened to the list meanwhile: the
    // item its cursor names deleted, a newer one added.
    let first = app.get("/datasets?limit=3").await;
    let next = next_of(&first).unwrap();
    let first = ids(&json(first).await);
    assert_eq!(app.delete(&format!("/datasets/{}", first[2])).await.status(), 204);
    let resp = app.post_dataset("new.zip", fixtures::zip(&class_images("", &["a", "b"], 1, 90)), None).await;
    assert_eq!(resp.status(), 201);
    let (rest, _) = follow(&app, &next).await;
    assert_eq!(rest.concat(), whole[3..], "neither repeated nor skipped");

    for bad in ["limit=0", "limit=1001", "limit=-1", "limit=many", "cursor=abc", "cursor=", "cursor=MjAyNi0xMi0wNVQxMDowMDowMC4wMDBa", "page=2"] {
        for list in ["/datasets", "/jobs", "/models"] {
            let msg = assert_error(app.get(&format!("{list}?{bad}")).await, 422, "invalid_query").await;
            let named = bad.split('=').next().unwrap();
            assert!(msg.contains(named), "{list}?{bad}: {msg}");
        }
    }
    let msg = assert_error(app.get("/datasets?limit=2&cursor=abc").await, 422, "invalid_query").await;
    assert!(msg.contains("take it from the Link header"), "{msg}");
}

#[tokio::test]
async fn job_and_model_pages_keep_the_filter() {
    let app = spawn_app().await;
    let dataset = app.upload_pets(2, false).await;
    let mut jobs = Vec::new();
    for _ in 0..3 {
        let job = app.submit_job(&dataset, serde_json::json!({"epochs": 50})).await;
        let id = job["id"].as_str().unwrap().to_string();
        let resp = app.client.post(app.url(&format!("/jobs/{id}/cancel"))).send().await.unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        app.wait_job(&id, 60).await;
        jobs.push(id);
    }
    jobs.reverse();
    let (pages, urls) = follow(&app, "/jobs?status=cancelled&limit=2").await;
    assert_eq!(pages, vec![jobs[..2].to_vec(), jobs[2..].to_vec()]);
    assert!(urls[1].starts_with("/jobs?status=cancelled&limit=2&cursor="), "{urls:?}");
    let (pages, _) = follow(&app, "/jobs?status=succeeded&limit=2").await;
    assert_eq!(pages, vec![Vec::<String>::new()], "the filter holds on every page");
    let (pages, _) = follow(&app, "/jobs?limit=1").await;
    assert_eq!(pages.concat(), jobs);

    let resp = app.get("/models?limit=5").await;
    assert!(next_of(&resp).is_none());
    assert_eq!(json(resp).await, serde_json::json!([]));
}
