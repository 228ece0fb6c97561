//! How far apart the look-alike fingerprints (`dataset::look_alike`) of copies and of different
//! photos are, to choose and check `MAX_DISTANCE`.
//!
//! `cargo run --release --example look_alikes -- FOLDER...`, e.g.
//! `cargo run --release --example look_alikes -- ../shared/data/catsdogs-dev ../shared/data/catsdogs-more`.
//!
//! Every image under the folders is decoded (EXIF orientation applied, as at upload) and copied
//! eleven ways: resized to half with JPEG quality 75, to a third with quality 40, saved as PNG at
//! full size, with 2% cut from each edge, flipped left to right (JPEG quality 75; its distance is
//! to the original's mirror-image shape), and turned by a quarter, a half and three quarters,
//! mirrored or not (half size, JPEG quality 75; each distance is to the original's shape turned
//! the same way). For each way it prints the largest shape distance between an image and its
//! copy and how many copies are taken as look-alikes; then, over every pair of different images,
//! how many pairs are at each shape distance up to twice the threshold (as they are, one
//! mirrored, one turned), and how many are taken as look-alikes (byte-identical files counted
//! once; every pair as if under one class, where mirrored and turned copies count too). With
//! `LOOK_ALIKES_PAIRS=1` it also names, on stderr, each pair of different images within 8 bits
//! (as they are, one mirrored, or one turned).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use image::RgbImage;
use image::imageops::{self, FilterType};
use vitforge::dataset::look_alike::{Look, MAX_DISTANCE, TURNS, alike, distance, fingerprint, turned};

#[path = "support/image_files.rs"]
mod image_files;
use image_files::files;

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
    // The original's shape each copy is compared with: as it is, mirrored, or turned.
    type Shape = Box<dyn Fn(&Look) -> u64>;
    let mut ways: Vec<(String, Copier, Shape)> = Vec::new();
    let plain: [(&str, Copier); 4] = [
        ("half size, JPEG 75", Box::new(|i| encoded(i, 0.5, Some(75)))),
        ("third size, JPEG 40", Box::new(|i| encoded(i, 1.0 / 3.0, Some(40)))),
        ("full size, PNG", Box::new(|i| encoded(i, 1.0, None))),
        ("2% cut from each edge", Box::new(|i| {
            let (dx, dy) = (i.width() / 50, i.height() / 50);
            Ok(image::imageops::crop_imm(i, dx, dy, i.width() - 2 * dx, i.height() - 2 * dy).to_image())
        })),
    ];
    for (name, copier) in plain {
        ways.push((name.to_string(), copier, Box::new(|f| f.shape)));
    }
    ways.push(("mirror image, JPEG 75".into(), Box::new(|i| encoded(&imageops::flip_horizontal(i), 1.0, Some(75))), Box::new(|f| f.mirror)));
    for (k, (mirror, quarters)) in TURNS.into_iter().enumerate() {
        let name = format!("{}turned {}/4, half, JPEG 75", if mirror { "mirrored, " } else { "" }, quarters);
        let turn = move |i: &RgbImage| {
            let i = if mirror { imageops::flip_horizontal(i) } else { i.clone() };
            encoded(&turned(&i, quarters), 0.5, Some(75))
        };
        ways.push((name, Box::new(turn), Box::new(move |f: &Look| f.turned[k])));
    }
    let mut prints = Vec::new();
    let mut names = Vec::new();
    let mut worst = vec![0u32; ways.len()];
    let mut within = vec![0usize; ways.len()];
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
        for (k, (_, way, shape)) in ways.iter().enumerate() {
            let copy = fingerprint(&way(&image)?);
            let d = (shape(&f) ^ copy.shape).count_ones();
            worst[k] = worst[k].max(d);
            within[k] += usize::from(alike(f, copy, true));
        }
    }
    let n = prints.len();
    println!("{n} distinct images; fingerprint {:.2} ms per image; threshold {MAX_DISTANCE} bits", hashing * 1e3 / n as f64);
    for (k, (name, _, _)) in ways.iter().enumerate() {
        println!("copy {name:<34} largest shape distance {:>2}, taken as look-alikes {}/{n}", worst[k], within[k]);
    }
    let mut pairs = vec![0u64; 2 * MAX_DISTANCE as usize + 1];
    let mut mirror_pairs = vec![0u64; 2 * MAX_DISTANCE as usize + 1];
    let mut turned_pairs = vec![0u64; 2 * MAX_DISTANCE as usize + 1];
    let mut alike_pairs = 0u64;
    let name_pairs = std::env::var_os("LOOK_ALIKES_PAIRS").is_some();
    for i in 0..n {
        for j in i + 1..n {
            let d = distance(prints[i], prints[j]) as usize;
            if d <= 8 && name_pairs {
                eprintln!("{d} {} {}", names[i].display(), names[j].display());
            }
            // As if under one class, where mirrored and turned copies count too.
            alike_pairs += u64::from(alike(prints[i], prints[j], true));
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
            let (a, b) = (prints[i], prints[j]);
            let t = (0..TURNS.len()).map(|k| (a.shape ^ b.turned[k]).count_ones().min((a.turned[k] ^ b.shape).count_ones())).min().unwrap_or(64) as usize;
            if t < turned_pairs.len() {
                turned_pairs[t] += 1;
            }
            if t <= 8 && name_pairs {
                eprintln!("{t} turned {} {}", names[i].display(), names[j].display());
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
    println!("the same pairs, one image turned (the nearest of the six ways), at each distance:");
    for (d, count) in turned_pairs.iter().enumerate() {
        println!("  {d:>2} bits: {count}{}", if d as u32 <= MAX_DISTANCE { "  (within the threshold)" } else { "" });
    }
    println!("pairs of different images taken as look-alikes (as they are, mirrored or turned, and colour): {alike_pairs}");
    Ok(())
}
