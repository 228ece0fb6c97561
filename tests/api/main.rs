//! Integration tests against the real router on a random port with a temporary data folder.

mod health;
mod helpers;
