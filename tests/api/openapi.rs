//! `openapi.yaml` and the router stay in step: every served route is documented and every
//! documented operation is served.

use std::collections::BTreeSet;

/// The (METHOD, path) operations under `paths:`, read by indentation (two spaces per level).
fn documented_operations(yaml: &str) -> BTreeSet<(String, String)> {
    const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
    let mut ops = BTreeSet::new();
    let mut in_paths = false;
    let mut path = None;
    for line in yaml.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let key = line.trim().trim_end_matches(':');
        match indent {
            0 => in_paths = line == "paths:",
            2 if in_paths => path = Some(key.trim_matches(['\'', '"']).to_string()),
            4 if in_paths && line.trim().ends_with(':') && METHODS.contains(&key) => {
                let path = path.clone().expect("method before any path");
                ops.insert((key.to_uppercase(), path));
            }
            _ => {}
        }
    }
    ops
}

#[test]
fn openapi_documents_exactly_the_served_routes() {
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).expect("openapi.yaml");
    assert!(yaml.starts_with("openapi: 3.1"), "not an OpenAPI 3.1 document");
    let documented = documented_operations(&yaml);
    let served: BTreeSet<(String, String)> =
        vitforge::http::route_table().into_iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(documented, served, "openapi.yaml and the router disagree");
}

#[test]
fn the_operation_reader_sees_nested_keys_only_at_their_level() {
    let yaml = "openapi: 3.1.0\npaths:\n  /a:\n    get:\n      responses:\n        get:\n  '/b/{id}':\n    parameters:\n    delete:\ncomponents:\n  /c:\n    get:\n";
    let ops = documented_operations(yaml);
    let expected: BTreeSet<(String, String)> =
        [("GET", "/a"), ("DELETE", "/b/{id}")].into_iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(ops, expected);
}
