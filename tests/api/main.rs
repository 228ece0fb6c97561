//! Integration tests against the real router on a random port with a temporary data folder.

mod access;
mod aliases;
mod browse;
mod budget;
mod cluster;
mod console;
mod copies;
mod crash;
mod datasets;
mod extensions;
mod fixtures;
mod health;
mod hostile;
mod hostile_inputs;
mod hub;
mod jobs;
mod models;
mod objects;
mod helpers;
mod openapi;
mod overload;
mod pages;
mod predict;
mod queue;
mod restart;
#[path = "../support/mod.rs"]
mod support;
mod throughput;
mod upload_progress;
