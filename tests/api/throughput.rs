//! Upload throughput, a measurement rather than a check, so ignored by default:
//! `cargo test --test api -- --ignored --nocapture upload_throughput`.

use std::time::Instant;

use image::ImageFormat;

use crate::fixtures::{self, Member};
use crate::helpers::spawn_app;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement; run explicitly"]
async fn upload_throughput() {
    let app = spawn_app().await;
    let members: Vec<Member> = (0..200u32)
        .map(|i| {
            fixtures::file(
                &format!("set/{}/{i}.jpg", ["cat", "dog"][i as usize % 2]),
                fixtures::image(ImageFormat::Jpeg, 256, i),
            )
        })
        .collect();
    let archive = fixtures::zip(&members);
    let size = archive.len();
    for attempt in ["first upload (every blob new)", "same images again (blobs exist)"] {
        let start = Instant::now();
        let resp = app.post_dataset("bench.zip", archive.clone(), None).await;
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(resp.status(), 201);
        println!(
            "{attempt}: 200 JPEGs 256x256, zip {:.1} MiB: {secs:.3} s = {:.0} images/s, {:.1} MiB/s",
            size as f64 / 1048576.0,
            200.0 / secs,
            size as f64 / 1048576.0 / secs
        );
    }
}
