//! Pictures with structure at several scales (coloured discs over a flat ground), different for
//! every seed, as the look-alike tests need: their fingerprints have bits of both values, and two
//! of them do not look alike, as they are, mirrored or turned. (The striped textures of the api
//! fixtures are not such pictures: a stripe turned half round is the same stripe.) Shared by the
//! test binaries (through `support`) and the library's own unit tests (`src/dataset/look_alike.rs`
//! includes this file by its path).

use rand::{Rng, SeedableRng};

/// A `w`×`h` picture of twelve discs, placed and coloured by `seed`.
pub fn picture(seed: u64, w: u32, h: u32) -> image::RgbImage {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let blobs: Vec<(f32, f32, f32, [f32; 3])> =
        (0..12).map(|_| (rng.random(), rng.random(), rng.random_range(0.05..0.3), [rng.random(), rng.random(), rng.random()])).collect();
    image::RgbImage::from_fn(w, h, |x, y| {
        let (u, v) = (x as f32 / w as f32, y as f32 / h as f32);
        let mut c = [0.2f32; 3];
        for (bx, by, r, colour) in &blobs {
            if (u - bx).powi(2) + (v - by).powi(2) < r * r {
                c = *colour;
            }
        }
        image::Rgb(c.map(|v| (v * 255.0) as u8))
    })
}
