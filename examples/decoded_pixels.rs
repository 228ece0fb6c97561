//! The pixels vitforge decodes from images, for comparing with another decoder's, and how long
//! decoding takes.
//!
//! `cargo run --release --example decoded_pixels -- OUT FOLDER...` decodes every JPEG, PNG and
//! TIFF under the folders as the service does (`vitforge::imaging::decode_rgb`) and writes each as
//! `OUT/<file name>.png`; then it times decoding the JPEGs again, and decoding them with the image
//! crate's own JPEG decoder (zune-jpeg, which vitforge used before) for comparison, and decoding
//! the TIFFs again. `bench/jpeg_parity.py` (and `bench/tiff_parity.py` through it) runs it and
//! compares the pixels with Pillow's.

use std::path::{Path, PathBuf};
use std::time::Instant;

#[path = "support/image_files.rs"]
mod image_files;
use image_files::files;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!("usage: decoded_pixels OUT FOLDER..."))?);
    let mut paths = Vec::new();
    for dir in args {
        files(Path::new(&dir), &mut paths)?;
    }
    paths.sort();
    std::fs::create_dir_all(&out)?;
    let (mut jpegs, mut tiffs) = (Vec::new(), Vec::new());
    for path in &paths {
        let bytes = std::fs::read(path)?;
        let rgb = vitforge::imaging::decode_rgb(&bytes, u64::MAX).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        rgb.save(out.join(format!("{name}.png")))?;
        match image::guess_format(&bytes)? {
            image::ImageFormat::Jpeg => jpegs.push(bytes),
            image::ImageFormat::Tiff => tiffs.push(bytes),
            _ => {}
        }
    }
    println!("wrote {} images to {}", paths.len(), out.display());
    let per_image = |files: &[Vec<u8>], decode: &dyn Fn(&[u8]) -> usize| {
        let start = Instant::now();
        let samples: usize = files.iter().map(|j| decode(j)).sum();
        (start.elapsed().as_secs_f64() * 1e3 / files.len() as f64, samples)
    };
    let ours = |j: &[u8]| vitforge::imaging::decode_rgb(j, u64::MAX).map_or(0, |i| i.len());
    for round in 1..=2 {
        if !jpegs.is_empty() {
            let (ours, a) = per_image(&jpegs, &ours);
            let (zune, b) = per_image(&jpegs, &|j| image::load_from_memory_with_format(j, image::ImageFormat::Jpeg).map_or(0, |i| i.to_rgb8().len()));
            assert_eq!(a, b, "both decoders give every sample");
            println!("round {round}: {} JPEGs, decode_rgb {ours:.2} ms each, the image crate's decoder {zune:.2} ms each", jpegs.len());
        }
        if !tiffs.is_empty() {
            let (ms, _) = per_image(&tiffs, &ours);
            println!("round {round}: {} TIFFs, decode_rgb {ms:.2} ms each", tiffs.len());
        }
    }
    Ok(())
}
