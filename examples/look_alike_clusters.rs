//! How long `dataset::look_alike::clusters` takes on many fingerprints.
//!
//! `cargo run --release --example look_alike_clusters -- N FOLDER...`, e.g.
//! `cargo run --release --example look_alike_clusters -- 100000 ../shared/data/catsdogs-dev ../shared/data/catsdogs-more`.
//!
//! It fingerprints the images under the folders, then makes `N` fingerprints, each one of them
//! with every bit of every shape flipped with probability 1/8 (8 bits of 64 on average, so that
//! many land near each other, as copies do), and times clustering them; then the same for `N`
//! random fingerprints (no folders needed for those: with none, only they are timed).

use std::path::Path;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use vitforge::dataset::look_alike::{Look, clusters, fingerprint};

#[path = "support/image_files.rs"]
mod image_files;
use image_files::files;

/// Clusters `prints` as if all were under one class (where mirrored and turned copies count).
fn timed(what: &str, prints: &[Look]) {
    let prints: Vec<(Look, ())> = prints.iter().map(|&l| (l, ())).collect();
    let start = Instant::now();
    let roots = clusters(&prints);
    let seconds = start.elapsed().as_secs_f64();
    let groups = roots.iter().enumerate().filter(|&(i, &r)| i == r).count();
    println!("{what}: {} fingerprints in {groups} clusters, {seconds:.2} s", prints.len());
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().ok_or_else(|| anyhow::anyhow!("usage: look_alike_clusters N [FOLDER...]"))?.parse()?;
    let mut paths = Vec::new();
    for dir in args {
        files(Path::new(&dir), &mut paths)?;
    }
    paths.sort();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    if !paths.is_empty() {
        let photos: Vec<Look> =
            paths.iter().map(|p| Ok(fingerprint(&vitforge::imaging::decode_rgb(&std::fs::read(p)?, u64::MAX)?))).collect::<anyhow::Result<_>>()?;
        let mut flip = |x: u64| x ^ (rng.random::<u64>() & rng.random::<u64>() & rng.random::<u64>());
        let near: Vec<Look> = (0..n)
            .map(|i| {
                let f = photos[i % photos.len()];
                Look { shape: flip(f.shape), mirror: flip(f.mirror), turned: f.turned.map(&mut flip), colour: f.colour }
            })
            .collect();
        timed(&format!("near copies of {} photos", photos.len()), &near);
    }
    let random: Vec<Look> = (0..n).map(|_| Look { shape: rng.random(), mirror: rng.random(), turned: rng.random(), colour: rng.random() }).collect();
    timed("random", &random);
    Ok(())
}
