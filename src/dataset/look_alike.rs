//! Images that look the same though their files differ: a photo saved again at another size or
//! JPEG quality, a screenshot of it, a copy with its metadata stripped, its mirror image (as image
//! sets augmented by flipping hold).
//!
//! Byte-identical copies are found by their SHA-256 ([`super::duplicates`]); these are not, and
//! they mislead in the same ways (a held-out image that is a training image re-encoded makes
//! validation look better than it is). Each image gets a 64-bit perceptual fingerprint when it is
//! decoded at upload: the gradient hash (dHash) of the `image_hasher` crate, taken of a small
//! area-averaged copy of the picture, the same of its mirror image, and its mean colour. Two
//! images whose hashes differ in at most [`MAX_DISTANCE`] bits (or one's and the other's mirror
//! image's) and whose colours are close look alike; the look-alike relation is closed
//! transitively into clusters, so that a chain of near copies is one group.
//!
//! The threshold was chosen on real photos (`bench/look-alikes.md` has the measurement): of the
//! 1,200 cat and dog photos of `../shared/`, 99.9% of the copies at half size (JPEG quality 75)
//! and 99.3% at a third (quality 40) were found, and no two different photos were taken for one
//! another, bar one pair that is the same picture in two files; so were all of their mirror
//! images (JPEG quality 75). Cropped copies are found less often (90% with 2% cut from each
//! edge).

use std::collections::HashMap;

use image::RgbImage;
use image_hasher::{HashAlg, HasherConfig};

/// Most bits two fingerprints' shapes may differ in for their images to look alike.
pub const MAX_DISTANCE: u32 = 6;

/// The side of the area-averaged copy the hash is taken of: averaging first makes the hash fast
/// on large photos and steady under resizing and JPEG noise.
const SHRUNK: u32 = 64;

/// An image's perceptual fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Look {
    /// The gradient hash of its shape: whether each cell of a 9×8 grey copy is brighter than its
    /// right neighbour (64 bits).
    pub shape: u64,
    /// The same of its mirror image (flipped left to right), so that a mirrored copy, as
    /// augmented image sets hold, is found too.
    pub mirror: u64,
    /// Its mean colour, RGB 5:6:5. The shape sees only where brightness changes, so pictures with
    /// little structure (a flat colour, a smooth ramp) all have one shape whatever their colour;
    /// the colour tells those apart.
    pub colour: u16,
}

impl Look {
    /// The integers the database stores: the shape's and the mirror image's bits as i64s, and
    /// the colour.
    pub fn to_columns(self) -> (i64, i64, i32) {
        (self.shape as i64, self.mirror as i64, i32::from(self.colour))
    }

    /// The fingerprint of the stored integers; `None` where one is null or the colour is out of
    /// range (an image stored before fingerprints, or their mirror images', were taken).
    pub fn from_columns(shape: Option<i64>, mirror: Option<i64>, colour: Option<i32>) -> Option<Self> {
        Some(Self { shape: shape? as u64, mirror: mirror? as u64, colour: u16::try_from(colour?).ok()? })
    }
}

/// The image's perceptual fingerprint.
pub fn fingerprint(image: &RgbImage) -> Look {
    let shrunk = image::imageops::thumbnail(image, SHRUNK, SHRUNK);
    let hasher = HasherConfig::with_bytes_type::<[u8; 8]>().hash_size(8, 8).hash_alg(HashAlg::Gradient).to_hasher();
    let hash = |image: &RgbImage| u64::from_le_bytes(hasher.hash_image(image).into_inner());
    let (shape, mirror) = (hash(&shrunk), hash(&image::imageops::flip_horizontal(&shrunk)));
    let pixels = u64::from(SHRUNK * SHRUNK);
    let mut sum = [0u64; 3];
    for p in shrunk.pixels() {
        for (s, v) in sum.iter_mut().zip(p.0) {
            *s += u64::from(v);
        }
    }
    let [r, g, b] = sum.map(|s| (s + pixels / 2) / pixels);
    Look { shape, mirror, colour: (((r >> 3) << 11) | ((g >> 2) << 5) | (b >> 3)) as u16 }
}

/// How many bits two fingerprints' shapes differ in.
pub fn distance(a: Look, b: Look) -> u32 {
    (a.shape ^ b.shape).count_ones()
}

/// Whether two fingerprints are of images that look alike, one perhaps the other's mirror image:
/// shapes at most [`MAX_DISTANCE`] bits apart (as they are, or one's shape and the other's
/// mirror image's), and mean colours at most one step apart in each channel.
pub fn alike(a: Look, b: Look) -> bool {
    let channel = |l: Look, shift: u32, bits: u32| i32::from((l.colour >> shift) & ((1 << bits) - 1));
    let close = |shift, bits| (channel(a, shift, bits) - channel(b, shift, bits)).abs() <= 1;
    let apart = |x: u64, y: u64| (x ^ y).count_ones() <= MAX_DISTANCE;
    let shape = apart(a.shape, b.shape) || apart(a.shape, b.mirror) || apart(a.mirror, b.shape);
    shape && close(11, 5) && close(5, 6) && close(0, 5)
}

/// For each fingerprint, the index of the first fingerprint of its cluster: fingerprints
/// [`alike`] are in one cluster, and so, transitively, are their clusters.
///
/// Pairs are found by multi-index hashing: with the shape split into `MAX_DISTANCE + 1` bit
/// ranges, two shapes that close agree on at least one whole range, so only fingerprints sharing
/// a range's value are compared. Each fingerprint is filed under its shape's value and its
/// mirror image's, so that a mirror image meets its original in some range too: for `n`
/// distinct random fingerprints, about one in twenty of the `n² / 2` pairs is compared.
pub fn clusters(fingerprints: &[Look]) -> Vec<usize> {
    let mut parent: Vec<usize> = (0..fingerprints.len()).collect();
    // Equal fingerprints first: one representative each goes through the pair search.
    let mut first_of: HashMap<Look, usize> = HashMap::new();
    let mut distinct: Vec<usize> = Vec::new();
    for (i, &f) in fingerprints.iter().enumerate() {
        match first_of.get(&f) {
            Some(&j) => union(&mut parent, j, i),
            None => {
                first_of.insert(f, i);
                distinct.push(i);
            }
        }
    }
    let ranges = MAX_DISTANCE + 1;
    for r in 0..ranges {
        let (lo, hi) = (64 * r / ranges, 64 * (r + 1) / ranges);
        let mask = ((1u64 << (hi - lo)) - 1) << lo;
        let mut buckets: HashMap<u64, Vec<usize>> = HashMap::new();
        for &i in &distinct {
            let (plain, mirror) = (fingerprints[i].shape & mask, fingerprints[i].mirror & mask);
            buckets.entry(plain).or_default().push(i);
            // Once where both are the same value, so that no fingerprint meets itself.
            if mirror != plain {
                buckets.entry(mirror).or_default().push(i);
            }
        }
        for bucket in buckets.values() {
            for (k, &i) in bucket.iter().enumerate() {
                for &j in &bucket[k + 1..] {
                    if alike(fingerprints[i], fingerprints[j]) {
                        union(&mut parent, i, j);
                    }
                }
            }
        }
    }
    (0..fingerprints.len()).map(|i| root(&mut parent, i)).collect()
}

fn root(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

/// Joins two clusters under the lower index, so that a cluster's root is its first member.
fn union(parent: &mut [usize], a: usize, b: usize) {
    let (ra, rb) = (root(parent, a), root(parent, b));
    if ra != rb {
        let (low, high) = if ra < rb { (ra, rb) } else { (rb, ra) };
        parent[high] = low;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A picture with structure at several scales, so that its hash has bits of both values.
    fn picture(seed: u64, w: u32, h: u32) -> RgbImage {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let blobs: Vec<(f32, f32, f32, [f32; 3])> =
            (0..12).map(|_| (rng.random(), rng.random(), rng.random_range(0.05..0.3), [rng.random(), rng.random(), rng.random()])).collect();
        RgbImage::from_fn(w, h, |x, y| {
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

    fn reencoded(image: &RgbImage, w: u32, h: u32, quality: u8) -> RgbImage {
        let small = image::imageops::resize(image, w, h, image::imageops::FilterType::Triangle);
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality).encode_image(&small).unwrap();
        image::load_from_memory(&bytes).unwrap().to_rgb8()
    }

    #[test]
    fn a_resized_reencoded_copy_looks_alike_and_another_picture_does_not() {
        for seed in 0..20 {
            let original = picture(seed, 640, 480);
            let f = fingerprint(&original);
            let copy = fingerprint(&reencoded(&original, 300, 225, 60));
            assert!(alike(f, copy), "seed {seed}: copy {f:?} {copy:?} at distance {}", distance(f, copy));
            let other = fingerprint(&picture(seed + 1000, 640, 480));
            assert!(!alike(f, other), "seed {seed}: another picture at distance {}", distance(f, other));
            // A mirror image, resized and re-encoded: alike, by the mirror image's shape.
            let mirrored = fingerprint(&image::imageops::flip_horizontal(&reencoded(&original, 300, 225, 60)));
            assert!(alike(f, mirrored) && alike(mirrored, f), "seed {seed}: mirror image {f:?} {mirrored:?}");
            assert!(distance(f, mirrored) > MAX_DISTANCE, "seed {seed}: the test needs pictures whose mirror images differ");
        }
    }

    /// Flat colours and smooth ramps have the same shape whatever their colour.
    #[test]
    fn pictures_without_structure_are_told_apart_by_colour() {
        let flat = |c: [u8; 3]| fingerprint(&RgbImage::from_pixel(100, 80, image::Rgb(c)));
        let ramp = |c: [u8; 3]| fingerprint(&RgbImage::from_fn(100, 80, |x, _| image::Rgb(c.map(|v| v.saturating_add(x as u8 / 4)))));
        for look in [flat, ramp] {
            assert!(alike(look([200, 30, 30]), look([203, 31, 28])));
            assert!(!alike(look([200, 30, 30]), look([30, 30, 200])));
            assert!(!alike(look([200, 30, 30]), look([150, 30, 30])));
        }
    }

    /// Images smaller than the averaged copy (down to one pixel) are enlarged, not refused.
    #[test]
    fn tiny_and_long_images_have_fingerprints() {
        for (w, h) in [(1, 1), (5, 3), (2000, 1), (1, 700), (63, 65)] {
            let image = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, 90]));
            assert_eq!(fingerprint(&image), fingerprint(&image), "{w}×{h}");
        }
        let grey = fingerprint(&RgbImage::from_pixel(1, 1, image::Rgb([128, 128, 128])));
        assert_eq!(grey, Look { shape: 0, mirror: 0, colour: ((128 >> 3) << 11) | ((128 >> 2) << 5) | (128 >> 3) });
    }

    /// The multi-index search finds exactly the clusters of the plain all-pairs search.
    #[test]
    fn clusters_match_the_all_pairs_search() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..30 {
            let mut prints: Vec<Look> = (0..rng.random_range(1..60)).map(|_| Look { shape: rng.random(), mirror: rng.random(), colour: rng.random() }).collect();
            // Near copies, some of them mirror images (the shapes swapped): a few bits flipped,
            // some just within the threshold, some just past it.
            for _ in 0..rng.random_range(0..40) {
                let mut f = prints[rng.random_range(0..prints.len())];
                if rng.random_bool(0.3) {
                    (f.shape, f.mirror) = (f.mirror, f.shape);
                }
                for _ in 0..rng.random_range(0..=MAX_DISTANCE + 2) {
                    f.shape ^= 1 << rng.random_range(0..64);
                    f.mirror ^= 1 << rng.random_range(0..64);
                }
                // The colour: the same, or one bit changed (one, two or more steps in a channel).
                f.colour ^= [0, 0, 1, 2 << 5, 3 << 11][rng.random_range(0..5)];
                prints.push(f);
            }
            let mut parent: Vec<usize> = (0..prints.len()).collect();
            for i in 0..prints.len() {
                for j in i + 1..prints.len() {
                    if alike(prints[i], prints[j]) {
                        union(&mut parent, i, j);
                    }
                }
            }
            let expected: Vec<usize> = (0..prints.len()).map(|i| root(&mut parent, i)).collect();
            assert_eq!(clusters(&prints), expected);
        }
    }

    /// Shapes at exactly the threshold, their differing bits spread over the whole hash, are
    /// found (the search needs one more bit range than the threshold).
    #[test]
    fn a_pair_at_the_threshold_with_spread_bits_is_found() {
        let a = Look { shape: 0x0123_4567_89AB_CDEF, mirror: 0xF7B3_D591_E6A2_C480, colour: 7 };
        let spread = (0..MAX_DISTANCE).fold(0u64, |m, k| m | 1 << (64 * k / MAX_DISTANCE));
        let b = Look { shape: a.shape ^ spread, mirror: !a.mirror, ..a };
        assert_eq!(distance(a, b), MAX_DISTANCE);
        assert_eq!(clusters(&[a, b]), [0, 0]);
        // A mirror image at the threshold: its shape is the original's mirror image's, nearly.
        let mirror = Look { shape: a.mirror ^ spread, mirror: !a.shape, ..a };
        assert!(distance(a, mirror) > 2 * MAX_DISTANCE);
        assert_eq!(clusters(&[a, mirror]), [0, 0]);
        let past = Look { shape: mirror.shape ^ 1 << 63, ..mirror };
        assert_eq!(clusters(&[a, past]), [0, 1], "one bit past the threshold");
    }

    #[test]
    fn a_chain_of_near_copies_is_one_cluster_led_by_its_first_member() {
        let look = |shape| Look { shape, mirror: shape, colour: 0x1234 };
        let a = look(0);
        let b = look(0b11_1111); // 6 bits from a
        let c = look(0b1111_1111_1111); // 6 from b, 12 from a
        let far = look(u64::MAX);
        assert_eq!(clusters(&[far, c, a, b, far]), [0, 1, 1, 1, 0]);
    }
}
