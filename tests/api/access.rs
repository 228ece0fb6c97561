//! Access control (`--api-key`) and the request limits that apply to every route: body size of
//! JSON routes and the request timeout (408, per body chunk for uploads).

use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::multipart::{Form, Part};
use serde_json::json;

use crate::support::Launch;
use crate::helpers::{assert_error, spawn_app_with};

const KEY_A: &str = "key-a-0123456789abcdef";
const KEY_B: &str = "key-b-fedcba9876543210";

#[tokio::test]
async fn with_keys_every_route_but_the_probes_needs_one() {
    let app = spawn_app_with(|c| c.api_key = vec![KEY_A.parse().unwrap(), KEY_B.parse().unwrap()]).await;
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(app.get(probe).await.status(), 200, "{probe} is open");
    }
    let mut routes = vitforge::http::route_table();
    routes.push((reqwest::Method::GET, "/no/such/route"));
    for (method, path) in routes {
        if path == "/healthz" || path == "/readyz" {
            continue;
        }
        if vitforge::http::console::is_console_path(path) {
            // The console's files hold no data: they are served without a key.
            let resp = app.client.request(method.clone(), app.url(&path.replace("{*page}", "jobs/x").replace("{file}", "app.js"))).send().await.unwrap();
            assert!(resp.status().is_success() || resp.status().is_redirection(), "{method} {path}: {}", resp.status());
            continue;
        }
        if vitforge::http::docs::is_docs_path(path) {
            // Nor do the API's description and its Swagger UI.
            let resp = app.client.request(method.clone(), app.url(&path.replace("{*file}", "swagger-initializer.js"))).send().await.unwrap();
            assert!(resp.status().is_success() || resp.status().is_redirection(), "{method} {path}: {}", resp.status());
            continue;
        }
        let url = app.url(&path.replace("{id}", "some-id"));
        let resp = app.client.request(method.clone(), &url).send().await.unwrap();
        let challenge = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
        assert_error(resp, 401, "missing_api_key").await;
        assert!(challenge.is_some_and(|c| c.starts_with("Bearer")), "{method} {path}: WWW-Authenticate: Bearer");
        let resp = app.client.request(method.clone(), &url).bearer_auth("key-a-0123456789abcdeX").send().await.unwrap();
        assert_error(resp, 401, "invalid_api_key").await;
        let resp = app.client.request(method.clone(), &url).basic_auth(KEY_A, None::<&str>).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{method} {path}: Basic is not Bearer");
    }
    for key in [KEY_A, KEY_B] {
        let resp = app.client.get(app.url("/datasets")).bearer_auth(key).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let resp = app.client.get(app.url("/datasets")).header("authorization", format!("bearer {KEY_B}")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the scheme is case-insensitive");
    let resp = app.client.get(app.url("/no/such/route")).bearer_auth(KEY_A).send().await.unwrap();
    assert_error(resp, 404, "route_not_found").await;

    // Refused before any of the body is read: nothing reaches the scratch folder.
    let form = Form::new().part("file", Part::bytes(vec![0u8; 4 << 20]).file_name("x.zip"));
    let resp = app.client.post(app.url("/datasets")).multipart(form).send().await.unwrap();
    assert_error(resp, 401, "missing_api_key").await;
    assert!(app.scratch_files().is_empty());
    // Methods a client invents are counted as one label, not one series each.
    for i in 0..3 {
        let method = reqwest::Method::from_bytes(format!("INVENTED{i}").as_bytes()).unwrap();
        assert_eq!(app.client.request(method, app.url("/datasets")).send().await.unwrap().status(), 401);
    }
    let metrics = app.client.get(app.url("/metrics")).bearer_auth(KEY_A).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("status=\"401\""), "refusals are counted: {metrics}");
    assert!(!metrics.contains("INVENTED"), "{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("vitforge_http_requests_total{") && l.contains("method=\"other\"") && l.ends_with(" 3")), "{metrics}");
}

/// Runs the real binary with `args` and `env` until it is ready, makes a few requests with `key`
/// (when given), stops it with SIGTERM, and returns everything it logged at debug level.
async fn run_and_capture(args: &[&str], env: &[(&str, &str)], key: Option<&str>) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut launch = Launch::new(&tmp.path().join("data")).args(args).level("debug");
    for (k, v) in env {
        launch = launch.env(k, v);
    }
    let server = launch.start();
    let (base, client) = (server.base.clone(), server.client.clone());
    if let Some(key) = key {
        for path in ["/datasets", "/jobs", "/models", "/metrics"] {
            assert_eq!(client.get(format!("{base}{path}")).bearer_auth(key).send().await.unwrap().status(), 200);
        }
        let resp = client.post(format!("{base}/jobs")).bearer_auth(key).json(&json!({"dataset_id": "nope"})).send().await.unwrap();
        assert_eq!(resp.status(), 404);
        assert_eq!(client.get(format!("{base}/jobs")).bearer_auth(format!("{key}-wrong")).send().await.unwrap().status(), 401);
    }
    // SIGTERM, so the shutdown path logs too.
    server.terminate().1
}

#[tokio::test]
async fn keys_are_never_logged_and_an_open_non_loopback_bind_is_warned_about() {
    let key = "s3cret-key-that-must-not-leak-42";
    let log = run_and_capture(&[], &[("VITFORGE_API_KEY", key)], Some(key)).await;
    assert!(log.contains("vitforge listening"), "{log}");
    assert!(!log.contains(key) && !log.contains("s3cret"), "a key reached the log:\n{log}");
    assert!(!log.contains("without an API key"), "{log}");

    let log = run_and_capture(&["--host", "0.0.0.0"], &[], None).await;
    assert!(log.contains("without an API key"), "binding 0.0.0.0 without a key is warned about:\n{log}");
    let log = run_and_capture(&["--host", "0.0.0.0", "--api-key", key], &[], Some(key)).await;
    assert!(!log.contains("without an API key") && !log.contains(key), "{log}");

    let help = Command::new(env!("CARGO_BIN_EXE_vitforge")).arg("--help").env("VITFORGE_API_KEY", key).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--api-key") && !help.contains(key), "{help}");
    let bad = Command::new(env!("CARGO_BIN_EXE_vitforge")).args(["--api-key", "short"]).output().unwrap();
    assert!(!bad.status.success(), "a short key is refused at start-up");
}

#[tokio::test]
async fn a_body_refused_before_it_is_read_still_gets_its_answer() {
    // The answer is sent while the client is still sending; without a lingering close the
    // connection reset would often destroy it before the client read it.
    let app = spawn_app_with(|c| c.api_key = vec![KEY_A.parse().unwrap()]).await;
    // A client that keeps sending for a while after the answer: 4 MiB in 64 chunks, 5 ms apart.
    let trickle = || {
        let chunks = (0..64).map(|i| Ok::<_, std::io::Error>(if i == 0 { br#"{"dataset_id": ""#.to_vec() } else { vec![b'x'; 64 * 1024] }));
        reqwest::Body::wrap_stream(futures::stream::iter(chunks).then(|c| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            c
        }))
    };
    for _ in 0..5 {
        let resp = app.client.post(app.url("/jobs")).bearer_auth(KEY_A).header("content-type", "application/json").body(trickle()).send().await.unwrap();
        assert_error(resp, 413, "body_too_large").await;
        let resp = app.client.post(app.url("/jobs")).header("content-type", "application/json").body(trickle()).send().await.unwrap();
        assert_error(resp, 401, "missing_api_key").await;
    }
    // Bodies with a declared length, refused on it, many at once.
    let body = format!(r#"{{"dataset_id": "{}"}}"#, "x".repeat(2 << 20));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (client, url, body) = (reqwest::Client::new(), app.url("/jobs"), body.clone());
        tasks.push(tokio::spawn(async move {
            let req = client.post(url).header("content-type", "application/json").body(body);
            let req = if i % 2 == 0 { req.bearer_auth(KEY_A) } else { req };
            req.send().await.map(|r| r.status().as_u16()).map_err(|e| format!("{e:?}"))
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), Ok(if i % 2 == 0 { 413 } else { 401 }));
    }
}

#[tokio::test]
async fn json_bodies_over_the_limit_are_413_with_the_error_body() {
    let app = spawn_app_with(|c| c.max_json_bytes = 1024).await;
    let big = json!({"dataset_id": "x".repeat(2000)});
    assert_error(app.post_json("/jobs", &big).await, 413, "body_too_large").await;
    let resp = app.client.post(app.url("/models/x/evaluate")).json(&big).send().await.unwrap();
    assert_error(resp, 413, "body_too_large").await;
    // Under the limit the same route answers normally.
    assert_error(app.post_json("/jobs", &json!({"dataset_id": "x"})).await, 404, "not_found").await;
}

/// A body that sends `first`, then nothing for `stall`, then `rest`.
fn stalling_body(first: Vec<u8>, stall: Duration, rest: Vec<u8>) -> reqwest::Body {
    let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(futures::stream::once(async move {
        tokio::time::sleep(stall).await;
        Ok(rest)
    }));
    reqwest::Body::wrap_stream(stream)
}

use futures::StreamExt;

#[tokio::test]
async fn a_stalled_request_gets_408_and_a_slow_but_steady_upload_does_not() {
    let app = spawn_app_with(|c| c.request_timeout_secs = 1).await;

    // A JSON body that stops half-way: the whole request is timed.
    let started = Instant::now();
    let resp = app
        .client
        .post(app.url("/jobs"))
        .header("content-type", "application/json")
        .body(stalling_body(br#"{"dataset_id": "#.to_vec(), Duration::from_secs(5), br#""x"}"#.to_vec()))
        .send()
        .await
        .unwrap();
    assert_error(resp, 408, "request_timeout").await;
    assert!(started.elapsed() < Duration::from_secs(4), "answered at the limit, not when the client resumed");

    // An upload that stalls between chunks: timed per chunk.
    let boundary = "XyZ";
    let head = format!("--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.zip\"\r\n\r\nPK").into_bytes();
    let tail = format!("\r\n--{boundary}--\r\n").into_bytes();
    let resp = app
        .client
        .post(app.url("/datasets"))
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(stalling_body(head.clone(), Duration::from_secs(3), tail.clone()))
        .send()
        .await
        .unwrap();
    assert_error(resp, 408, "request_timeout").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(app.scratch_files().is_empty(), "the stalled upload's scratch file is removed");

    // Stalls before the first part's headers are complete, and inside the `name` part: the
    // same 408, at the limit.
    let name_head = format!("--{boundary}\r\ncontent-disposition: form-data; name=\"name\"\r\n\r\npe").into_bytes();
    for (first, what) in [(format!("--{boundary}\r\ncontent-disp").into_bytes(), "part headers"), (name_head, "name part")] {
        let started = Instant::now();
        let resp = app
            .client
            .post(app.url("/datasets"))
            .header("content-type", format!("multipart/form-data; boundary={boundary}"))
            .body(stalling_body(first, Duration::from_secs(5), tail.clone()))
            .send()
            .await
            .unwrap();
        assert_error(resp, 408, "request_timeout").await;
        assert!(started.elapsed() < Duration::from_secs(4), "{what}: answered at the limit, not when the client resumed");
    }

    // An upload that takes longer than the timeout in total but never stalls is read whole (and
    // refused for what it is, not for its duration).
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        std::iter::once(Ok(head)).chain((0..12).map(|_| Ok(vec![0u8; 1000]))).chain(std::iter::once(Ok(tail))).collect();
    let steady = futures::stream::iter(chunks).then(|c| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c
    });
    let started = Instant::now();
    let resp = app
        .client
        .post(app.url("/datasets"))
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(reqwest::Body::wrap_stream(steady))
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() > Duration::from_secs(2));
    assert_error(resp, 415, "unsupported_format").await;
}

/// A query parameter on a route that takes none is refused by name (422 `invalid_query`), before
/// the route looks at its path or body, rather than ignored (`DELETE /models/{id}?force=true`
/// must not seem to do what it does not). The console, the docs, the probes and the metrics,
/// which browsers and scrapers call with parameters of their own, answer as without it.
#[tokio::test]
async fn a_query_parameter_on_a_route_that_takes_none_is_refused_by_name() {
    let app = spawn_app_with(|_| {}).await;
    let without = vitforge::http::routes_without_query();
    let at = |path: &str, query: &str| app.url(&format!("{}?{query}", path.replace("{id}", "x").replace("{name}", "x").replace("{blob}", "x")));
    for (method, path) in &without {
        let url = at(path, "bogus%20name=1&other");
        let resp = app.client.request(method.clone(), &url).header("content-type", "application/json").body("{}").send().await.unwrap();
        let msg = assert_error(resp, 422, "invalid_query").await;
        assert_eq!(msg, "unknown query parameter `bogus name`: this operation takes no query parameters", "{method} {path}");
        // An empty query is none.
        let resp = app.client.request(method.clone(), at(path, "")).send().await.unwrap();
        assert_ne!(resp.status(), 422, "{method} {path}?");
    }
    for path in ["/healthz", "/readyz", "/metrics", "/", "/ui/", "/ui/new", "/ui/assets/app.js", "/openapi.yaml", "/docs/"] {
        let resp = app.client.get(app.url(&format!("{path}?utm_source=mail"))).send().await.unwrap();
        assert!(resp.status().is_success() || resp.status().is_redirection(), "{path}: {}", resp.status());
    }
    let all = vitforge::http::route_table();
    assert_eq!(all.len() - without.len(), 9 + 6 + 3, "the console's, the docs' and the probes' and metrics' routes, and 6 that read a query");
}

/// A path parameter that is not valid percent-encoded UTF-8, or that holds a NUL character
/// (which PostgreSQL cannot compare), is answered 400 `invalid_path` by every route that has one,
/// the console's and the docs' file routes included.
#[tokio::test]
async fn a_malformed_path_parameter_is_400_on_every_route() {
    let app = spawn_app_with(|_| {}).await;
    let mut checked = 0;
    for (method, path) in vitforge::http::route_table() {
        // The console's pages: any path is the shell, which names an unknown page itself.
        if !path.contains('{') || path == "/ui/{*page}" {
            continue;
        }
        for bad in ["%FF%FE", "a%00b"] {
            let url = app.url(&path.replace("{id}", bad).replace("{blob}", "ab").replace("{file}", bad).replace("{*file}", bad).replace("{name}", bad));
            let resp = app.client.request(method.clone(), &url).header("content-type", "application/json").body("{}").send().await.unwrap();
            let msg = assert_error(resp, 400, "invalid_path").await;
            assert!(!msg.is_empty(), "{method} {path}");
        }
        checked += 1;
    }
    assert_eq!(checked, 21, "the routes with an {{id}}, the two file routes and the three of an alias's {{name}}");
}
