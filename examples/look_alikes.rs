//! How far apart the look-alike fingerprints (`dataset::look_alike`) of copies and of different
//! photos are, to choose and check `MAX_DISTANCE`.
//!
//! `cargo run --release --example look_alikes -- FOLDER...`, e.g.
//! `cargo run --release --example look_alikes -- ../shared/data/catsdogs-dev ../shared/data/catsdogs-more`.
//!
//! Every image under the folders is decoded (EXIF orientation applied, as at upload) and copied
//! five ways: resized to half with JPEG quality 75, to a third with quality 40, saved as PNG at
//! full size, with 2% cut from each edge, and flipped left to right (JPEG quality 75; its
//! distance is to the original's mirror-image shape). For each way it prints the largest shape distance
//! between an image and its copy and how many copies are taken as look-alikes; then, over every
//! pair of different images, how many pairs are at each shape distance up to twice the threshold,
//! and how many are taken as look-alikes (byte-identical files counted once). With
//! `LOOK_ALIKES_PAIRS=1` it also names, on stderr, each pair of different images within 8 bits
//! (as they are, or one mirrored).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use image::RgbImage;
use image::imageops::FilterType;
use vitforge::dataset::look_alike::{MAX_DISTANCE, alike, distance, fingerprint};

fn files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files(&path, out)?;
        } else if path.extension().is_some_and(|e| ["jpg", "jpeg", "png"].contains(&e.to_string_lossy().to_lowercase().as_str())) {
            out.push(path);
        }
    }
    Ok(())
}

fn encoded(image: &RgbImage, scale: f32, quality: Option<u8>) -> anyhow::Result<RgbImage> {
    let (w, h) = (((image.width() as f32 * scale) as u32).max(1), ((image.height() as f32 * scale) as u32).max(1));
    let small = image::imageops::resize(image, w, h, FilterType::Triangle);
    let mut bytes = Vec::new();
    match quality {
        Some(q) => image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, q).encode_image(&small)?,
        None => small.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?,
    }
    Ok(vitforge::imaging::decode_rgb(&bytes, u64::MAX)?)
}

fn main() -> anyhow::Result<()> {
    let mut paths = Vec::new();
    for dir in std::env::args().skip(1) {
        files(Path::new(&dir), &mut paths)?;
    }
    anyhow::ensure!(!paths.is_empty(), "usage: look_alikes FOLDER... (no images found)");
    paths.sort();
    type Copier = Box<dyn Fn(&RgbImage) -> anyhow::Result<RgbImage>>;
    let ways: [(&str, Copier); 5] = [
        ("half size, JPEG 75", Box::new(|i| encoded(i, 0.5, Some(75)))),
        ("third size, JPEG 40", Box::new(|i| encoded(i, 1.0 / 3.0, Some(40)))),
        ("full size, PNG", Box::new(|i| encoded(i, 1.0, None))),
        ("2% cut from each edge", Box::new(|i| {
            let (dx, dy) = (i.width() / 50, i.height() / 50);
            Ok(image::imageops::crop_imm(i, dx, dy, i.width() - 2 * dx, i.height() - 2 * dy).to_image())
        })),
        ("mirror image, JPEG 75", Box::new(|i| encoded(&image::imageops::flip_horizontal(i), 1.0, Some(75)))),
    ];
    let mut prints = Vec::new();
    let mut names = Vec::new();
    let mut worst = [0u32; 5];
    let mut within = [0usize; 5];
    let mut hashing = 0.0f64;
    let mut seen = BTreeSet::new();
    for path in &paths {
        let bytes = std::fs::read(path)?;
        if !seen.insert(bytes.clone()) {
            continue;
        }
        let image = vitforge::imaging::decode_rgb(&bytes, u64::MAX)?;
        let start = Instant::now();
        let f = fingerprint(&image);
        hashing += start.elapsed().as_secs_f64();
        prints.push(f);
        names.push(path.clone());
        for (k, (_, way)) in ways.iter().enumerate() {
            let copy = fingerprint(&way(&image)?);
            // The mirror image is compared with the original's mirror-image shape.
            let d = if k == 4 { (f.mirror ^ copy.shape).count_ones() } else { distance(f, copy) };
            worst[k] = worst[k].max(d);
            within[k] += usize::from(alike(f, copy));
        }
    }
    let n = prints.len();
    println!("{n} distinct images; fingerprint {:.2} ms per image; threshold {MAX_DISTANCE} bits", hashing * 1e3 / n as f64);
    for (k, (name, _)) in ways.iter().enumerate() {
        println!("copy {name:<22} largest shape distance {:>2}, taken as look-alikes {}/{n}", worst[k], within[k]);
    }
    let mut pairs = vec![0u64; 2 * MAX_DISTANCE as usize + 1];
    let mut mirror_pairs = vec![0u64; 2 * MAX_DISTANCE as usize + 1];
    let mut alike_pairs = 0u64;
    let name_pairs = std::env::var_os("LOOK_ALIKES_PAIRS").is_some();
    for i in 0..n {
        for j in i + 1..n {
            let d = distance(prints[i], prints[j]) as usize;
            if d <= 8 && name_pairs {
                eprintln!("{d} {} {}", names[i].display(), names[j].display());
            }
            alike_pairs += u64::from(alike(prints[i], prints[j]));
            if d < pairs.len() {
                pairs[d] += 1;
            }
            let m = (prints[i].shape ^ prints[j].mirror).count_ones().min((prints[i].mirror ^ prints[j].shape).count_ones()) as usize;
            if m < mirror_pairs.len() {
                mirror_pairs[m] += 1;
            }
            if m <= 8 && name_pairs {
                eprintln!("{m} mirrored {} {}", names[i].display(), names[j].display());
            }
        }
    }
    println!("pairs of different images ({}) at each distance:", n * (n - 1) / 2);
    for (d, count) in pairs.iter().enumerate() {
        println!("  {d:>2} bits: {count}{}", if d as u32 <= MAX_DISTANCE { "  (within the threshold)" } else { "" });
    }
    println!("the same pairs, one image mirrored, at each distance:");
    for (d, count) in mirror_pairs.iter().enumerate() {
        println!("  {d:>2} bits: {count}{}", if d as u32 <= MAX_DISTANCE { "  (within the threshold)" } else { "" });
    }
    println!("pairs of different images taken as look-alikes (shape or mirror image, and colour): {alike_pairs}");
    Ok(())
}
