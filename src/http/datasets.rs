//! `/datasets`: upload, list, inspect and delete labelled image sets.

use super::Route;

pub fn routes() -> Vec<Route> {
    vec![]
}
