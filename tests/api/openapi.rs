//! `openapi.yaml` and the router stay in step: every served route is documented and every
//! documented operation is served.

use std::collections::{BTreeMap, BTreeSet};

/// The (METHOD, path) operations under `paths:`, read by indentation (two spaces per level).
fn documented_operations(yaml: &str) -> BTreeSet<(String, String)> {
    operations(yaml).into_keys().collect()
}

/// Each operation under `paths:` with the lines of its text, read by indentation (two spaces per
/// level).
fn operations(yaml: &str) -> BTreeMap<(String, String), Vec<&str>> {
    const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
    let mut ops: BTreeMap<(String, String), Vec<&str>> = BTreeMap::new();
    let mut in_paths = false;
    let mut path = None;
    let mut op = None;
    for line in yaml.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let key = line.trim().trim_end_matches(':');
        match indent {
            0 => (in_paths, op) = (line == "paths:", None),
            2 if in_paths => (path, op) = (Some(key.trim_matches(['\'', '"']).to_string()), None),
            4 if in_paths && line.trim().ends_with(':') && METHODS.contains(&key) => {
                let path = path.clone().expect("method before any path");
                op = Some((key.to_uppercase(), path));
                ops.insert(op.clone().unwrap(), vec![]);
            }
            4 => op = None,
            _ => {}
        }
        if let Some(op) = &op {
            ops.get_mut(op).unwrap().push(line);
        }
    }
    ops
}

/// The text of an operation's `'422':` response (its lines, the key's included).
fn response_422<'a>(lines: &[&'a str]) -> Vec<&'a str> {
    let Some(start) = lines.iter().position(|l| l.trim() == "'422':") else { return vec![] };
    let indent = |l: &str| l.len() - l.trim_start().len();
    let key = indent(lines[start]);
    std::iter::once(lines[start]).chain(lines[start + 1..].iter().copied().take_while(|l| indent(l) > key)).collect()
}

#[test]
fn openapi_documents_exactly_the_served_routes() {
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).expect("openapi.yaml");
    assert!(yaml.starts_with("openapi: 3.1"), "not an OpenAPI 3.1 document");
    let documented = documented_operations(&yaml);
    // OpenAPI has no catch-all segment: the router's `{*name}` is documented as `{name}`.
    let served: BTreeSet<(String, String)> =
        vitforge::http::route_table().into_iter().map(|(m, p)| (m.to_string(), p.replace("{*", "{"))).collect();
    assert_eq!(documented, served, "openapi.yaml and the router disagree");
}

/// Every operation that takes no query parameters documents the 422 `invalid_query` it answers
/// to one, and declares none.
#[test]
fn operations_without_query_parameters_document_their_refusal() {
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).expect("openapi.yaml");
    let ops = operations(&yaml);
    let without = vitforge::http::routes_without_query();
    assert!(without.len() >= 20, "{without:?}");
    for (method, path) in without {
        let lines = &ops[&(method.to_string(), path.to_string())];
        let refusal = response_422(lines).join("\n");
        assert!(refusal.contains("NoQueryParameters") || refusal.contains("`invalid_query`"), "{method} {path}: 422 {refusal:?}");
        assert!(!lines.iter().any(|l| l.trim() == "in: query"), "{method} {path} declares a query parameter");
    }
}

#[test]
fn the_operation_reader_sees_nested_keys_only_at_their_level() {
    let yaml = "openapi: 3.1.0\npaths:\n  /a:\n    get:\n      responses:\n        get:\n  '/b/{id}':\n    parameters:\n    delete:\ncomponents:\n  /c:\n    get:\n";
    let ops = documented_operations(yaml);
    let expected: BTreeSet<(String, String)> =
        [("GET", "/a"), ("DELETE", "/b/{id}")].into_iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(ops, expected);
}

#[tokio::test]
async fn the_service_serves_its_openapi_document_and_swagger_ui_from_the_binary() {
    let app = crate::helpers::spawn_app().await;
    let resp = app.get("/openapi.yaml").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/yaml"));
    let served = resp.text().await.unwrap();
    assert_eq!(served, std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap());

    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let resp = client.get(format!("{}/docs", app.address)).send().await.unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(resp.headers()["location"], "/docs/");
    let page = app.get("/docs/").await;
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("swagger-ui"));
    // The page's configuration points at our document, and its assets are in the binary.
    let init = app.get("/docs/swagger-initializer.js").await.text().await.unwrap();
    assert!(init.contains("/openapi.yaml"), "{init}");
    for asset in ["swagger-ui.css", "swagger-ui-bundle.js"] {
        let resp = app.get(&format!("/docs/{asset}")).await;
        assert_eq!(resp.status(), 200, "{asset}");
        assert!(resp.bytes().await.unwrap().len() > 10_000, "{asset}");
    }
    crate::helpers::assert_error(app.get("/docs/..%2F..%2Fetc%2Fpasswd").await, 404, "not_found").await;
    crate::helpers::assert_error(app.get("/docs/no-such-file.js").await, 404, "not_found").await;
}
