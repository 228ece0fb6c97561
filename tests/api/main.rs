//! Integration tests against the real router on a random port with a temporary data folder.

mod datasets;
mod fixtures;
mod health;
mod jobs;
mod models;
mod helpers;
mod openapi;
mod predict;
mod restart;
mod throughput;
