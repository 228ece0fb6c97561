//! Rebuilds the crate when a migration is added or changed: `sqlx::migrate!` embeds the
//! `migrations/` folders at compile time, and cargo does not otherwise watch them (sqlx's own
//! advice, `cargo sqlx migrate build-script`).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
