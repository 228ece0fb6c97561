//! Images that look the same though their files differ: a photo saved again at another size or
//! JPEG quality, a screenshot of it, a copy with its metadata stripped, its mirror image (as image
//! sets augmented by flipping hold), the same turned a quarter or half round (a photo whose
//! orientation was lost, an image set augmented by rotation).
//!
//! Byte-identical copies are found by their SHA-256 ([`super::duplicates`]); these are not, and
//! they mislead in the same ways (a held-out image that is a training image re-encoded makes
//! validation look better than it is). Each image gets a 64-bit perceptual fingerprint when it is
//! decoded at upload: the gradient hash (dHash) of the `image_hasher` crate, taken of a small
//! area-averaged copy of the picture, the same of its mirror image and of both turned by each
//! quarter (the eight ways a square can be laid down), and its mean colour. Two images whose
//! hashes differ in at most [`MAX_DISTANCE`] bits (one's as it is, and the other's laid down
//! one of those ways) and whose colours are close look alike; the look-alike relation is closed
//! transitively into clusters, so that a chain of near copies is one group.
//!
//! Mirrored and turned copies count only within a class. Where the way a picture is laid down is
//! what tells two classes apart (up from down, a left arrow from a right one, a 6 from a 9, a
//! photo's orientation), a picture of one class mirrored or turned into another is a different
//! example, not a copy that leaks; a copy as it is under two classes is reported, since its labels
//! contradict each other.
//!
//! The threshold was chosen on real photos (`bench/look-alikes.md` has the measurement): of the
//! 1,200 cat and dog photos of `../shared/`, 99.9% of the copies at half size (JPEG quality 75)
//! and 99.3% at a third (quality 40) were found, and no two different photos were taken for one
//! another, bar one pair that is the same picture in two files; so were all of their mirror
//! images (JPEG quality 75), and 99.7% or more of their copies turned, mirrored or not (each of
//! the six ways, half size, quality 75), with no pair of different photos closer than 8 bits
//! turned. Cropped copies are found less often (90% with 2% cut from each edge).

use std::collections::HashMap;
use std::hash::Hash;

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
    /// The same of the picture turned clockwise by a quarter, a half and three quarters, then of
    /// its mirror image turned likewise ([`TURNS`]), so that a turned copy is found too: a photo
    /// whose EXIF orientation was lost or ignored, an image set augmented by rotation.
    pub turned: [u64; 6],
    /// Its mean colour, RGB 5:6:5. The shape sees only where brightness changes, so pictures with
    /// little structure (a flat colour, a smooth ramp) all have one shape whatever their colour;
    /// the colour tells those apart.
    pub colour: u16,
}

/// How many quarter turns clockwise each of [`Look::turned`] is of the picture (`false`) or of
/// its mirror image (`true`).
pub const TURNS: [(bool, u8); 6] = [(false, 1), (false, 2), (false, 3), (true, 1), (true, 2), (true, 3)];

/// What the database stores of a fingerprint ([`Look::to_columns`]).
pub struct Columns {
    /// The shape's and the mirror image's bits as i64s.
    pub shape: i64,
    pub mirror: i64,
    /// The turned shapes' bits, 8 bytes each, little-endian, in [`TURNS`] order.
    pub turned: Vec<u8>,
    pub colour: i32,
}

impl Look {
    /// What the database stores.
    pub fn to_columns(self) -> Columns {
        Columns {
            shape: self.shape as i64,
            mirror: self.mirror as i64,
            turned: self.turned.iter().flat_map(|t| t.to_le_bytes()).collect(),
            colour: i32::from(self.colour),
        }
    }

    /// The fingerprint of the stored columns; `None` where one is null or out of range (an image
    /// stored before fingerprints, or their mirror images' or turned copies', were taken).
    pub fn from_columns(shape: Option<i64>, mirror: Option<i64>, turned: Option<&[u8]>, colour: Option<i32>) -> Option<Self> {
        let turned: &[u8; 48] = turned?.try_into().ok()?;
        let turned = std::array::from_fn(|k| u64::from_le_bytes(turned[8 * k..8 * k + 8].try_into().expect("8 bytes")));
        Some(Self { shape: shape? as u64, mirror: mirror? as u64, turned, colour: u16::try_from(colour?).ok()? })
    }

    /// The fingerprint of the stored columns as far as they go: for an image stored before its
    /// mirror image's or turned shapes were taken, those it lacks are taken to be its shape, so
    /// that it is compared as it is (and mirrored, where that is known) only, as the version that
    /// stored it did. What a job keeps look-alikes together by while the background fill-in has
    /// not fingerprinted its dataset again; `None` where the shape or colour is missing.
    pub fn from_columns_so_far(shape: Option<i64>, mirror: Option<i64>, turned: Option<&[u8]>, colour: Option<i32>) -> Option<Self> {
        Self::from_columns(shape, mirror, turned, colour).or_else(|| {
            let shape = shape? as u64;
            Some(Self { shape, mirror: mirror.map_or(shape, |m| m as u64), turned: [shape; 6], colour: u16::try_from(colour?).ok()? })
        })
    }

    /// Its shapes of the picture laid down each of the eight ways: as it is first, then
    /// mirrored, then turned.
    fn ways(&self) -> impl Iterator<Item = u64> + '_ {
        [self.shape, self.mirror].into_iter().chain(self.turned)
    }

    /// A fingerprint whose every way has the one shape (for tests that need only shapes).
    #[cfg(test)]
    pub fn of_shape(shape: u64, colour: u16) -> Self {
        Self { shape, mirror: shape, turned: [shape; 6], colour }
    }
}

/// The image's perceptual fingerprint.
pub fn fingerprint(image: &RgbImage) -> Look {
    let shrunk = image::imageops::thumbnail(image, SHRUNK, SHRUNK);
    let hasher = HasherConfig::with_bytes_type::<[u8; 8]>().hash_size(8, 8).hash_alg(HashAlg::Gradient).to_hasher();
    let hash = |image: &RgbImage| u64::from_le_bytes(hasher.hash_image(image).into_inner());
    let mirrored = image::imageops::flip_horizontal(&shrunk);
    let (shape, mirror) = (hash(&shrunk), hash(&mirrored));
    let turned = TURNS.map(|(mirror, quarters)| hash(&turned(if mirror { &mirrored } else { &shrunk }, quarters)));
    let pixels = u64::from(SHRUNK * SHRUNK);
    let mut sum = [0u64; 3];
    for p in shrunk.pixels() {
        for (s, v) in sum.iter_mut().zip(p.0) {
            *s += u64::from(v);
        }
    }
    let [r, g, b] = sum.map(|s| (s + pixels / 2) / pixels);
    Look { shape, mirror, turned, colour: (((r >> 3) << 11) | ((g >> 2) << 5) | (b >> 3)) as u16 }
}

/// `picture` turned clockwise by `quarters` quarter turns (1 to 3), as [`TURNS`] counts them.
pub fn turned(picture: &RgbImage, quarters: u8) -> RgbImage {
    match quarters {
        1 => image::imageops::rotate90(picture),
        2 => image::imageops::rotate180(picture),
        _ => image::imageops::rotate270(picture),
    }
}

/// How many bits two fingerprints' shapes differ in.
pub fn distance(a: Look, b: Look) -> u32 {
    (a.shape ^ b.shape).count_ones()
}

/// Whether two fingerprints are of images that look alike: shapes at most [`MAX_DISTANCE`] bits
/// apart and mean colours at most one step apart in each channel. Of images under one class
/// (`same_class`), one may be the other mirrored or turned (one's shape as it is, and the
/// other's as it is, mirrored or turned); under two classes, only as they are.
pub fn alike(a: Look, b: Look, same_class: bool) -> bool {
    // The colour first: it is cheaper, and turns down most pairs of different pictures.
    close_colours(a.colour, b.colour) && near_shapes(a, b, same_class)
}

/// The shapes' half of [`alike`].
fn near_shapes(a: Look, b: Look, same_class: bool) -> bool {
    let near = |x: u64, y: u64| (x ^ y).count_ones() <= MAX_DISTANCE;
    if same_class { b.ways().any(|w| near(a.shape, w)) || a.ways().any(|w| near(w, b.shape)) } else { near(a.shape, b.shape) }
}

/// Whether two mean colours (RGB 5:6:5) are at most one step apart in each channel.
fn close_colours(a: u16, b: u16) -> bool {
    let channel = |c: u16, shift: u32, bits: u32| i32::from((c >> shift) & ((1 << bits) - 1));
    let close = |shift, bits| (channel(a, shift, bits) - channel(b, shift, bits)).abs() <= 1;
    close(11, 5) && close(5, 6) && close(0, 5)
}

/// For each fingerprint, with the class of its image, the index of the first fingerprint of its
/// cluster: fingerprints [`alike`] are in one cluster, and so, transitively, are their clusters.
///
/// Pairs are found by multi-index hashing: the shape is split into [`PIECES`] pieces of 16 bits,
/// and two shapes at most [`MAX_DISTANCE`] bits apart differ in at most one bit of some piece (in
/// two or more bits of every piece they would differ in eight). Each fingerprint is filed under
/// each piece of its shape; for each piece of each of its eight ways (so that a mirrored or
/// turned copy meets its original too), the fingerprints filed under that value and under the 16
/// values one bit from it are the candidates. For `n` distinct random fingerprints that is about
/// one in 120 of the `n²` ordered pairs, most of them turned down by their colours alone; a
/// candidate already in the fingerprint's cluster is passed over without a look at its shapes.
pub fn clusters<C: Copy + Eq + Hash>(fingerprints: &[(Look, C)]) -> Vec<usize> {
    let mut parent: Vec<usize> = (0..fingerprints.len()).collect();
    // Equal fingerprints first: one representative each goes through the pair search.
    let mut first_of: HashMap<(Look, C), usize> = HashMap::new();
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
    let mut keys = Vec::with_capacity(8);
    for p in 0..PIECES {
        let filed = Filed::new(fingerprints, &distinct, p);
        for &i in &distinct {
            let (f, class) = fingerprints[i];
            keys.clear();
            keys.extend(f.ways().map(|w| piece(w, p)));
            keys.sort_unstable();
            keys.dedup();
            for &key in &keys {
                for probe in std::iter::once(key).chain((0..16).map(|bit| key ^ 1 << bit)) {
                    for (&colour, &j) in filed.under(probe) {
                        // [`alike`], its fingerprint read only for candidates of a close colour
                        // not yet in its cluster.
                        if j != i
                            && close_colours(f.colour, colour)
                            && root(&mut parent, i) != root(&mut parent, j)
                            && near_shapes(f, fingerprints[j].0, class == fingerprints[j].1)
                        {
                            union(&mut parent, i, j);
                        }
                    }
                }
            }
        }
    }
    (0..fingerprints.len()).map(|i| root(&mut parent, i)).collect()
}

/// How many 16-bit pieces [`clusters`] splits a shape into.
const PIECES: u32 = 4;
// Two shapes within the threshold must differ in at most one bit of some piece.
const _: () = assert!(2 * PIECES > MAX_DISTANCE && 16 * PIECES == 64);

/// Piece `p` of a shape.
fn piece(shape: u64, p: u32) -> u16 {
    (shape >> (16 * p)) as u16
}

/// Fingerprints filed under one piece of their shape, sorted by its value (a counting sort):
/// those with value `v` are at `start[v]..start[v + 1]` of `colours` and `indices`, each one's
/// colour beside its index, so that most candidates are turned down without reading their
/// fingerprint.
struct Filed {
    start: Vec<usize>,
    colours: Vec<u16>,
    indices: Vec<usize>,
}

impl Filed {
    fn new<C>(fingerprints: &[(Look, C)], distinct: &[usize], p: u32) -> Self {
        let mut start = vec![0usize; (1 << 16) + 1];
        for &i in distinct {
            start[usize::from(piece(fingerprints[i].0.shape, p)) + 1] += 1;
        }
        for v in 0..1 << 16 {
            start[v + 1] += start[v];
        }
        let mut next = start.clone();
        let (mut colours, mut indices) = (vec![0; distinct.len()], vec![0; distinct.len()]);
        for &i in distinct {
            let slot = &mut next[usize::from(piece(fingerprints[i].0.shape, p))];
            (colours[*slot], indices[*slot]) = (fingerprints[i].0.colour, i);
            *slot += 1;
        }
        Self { start, colours, indices }
    }

    /// The colours and indices of the fingerprints filed under `value`.
    fn under(&self, value: u16) -> impl Iterator<Item = (&u16, &usize)> {
        let range = self.start[usize::from(value)]..self.start[usize::from(value) + 1];
        self.colours[range.clone()].iter().zip(&self.indices[range])
    }
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

/// The pictures the test binaries use too.
#[cfg(test)]
#[path = "../../tests/support/pictures.rs"]
mod test_pictures;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::test_pictures::picture;

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
            assert!(alike(f, copy, false), "seed {seed}: copy {f:?} {copy:?} at distance {}", distance(f, copy));
            let other = fingerprint(&picture(seed + 1000, 640, 480));
            assert!(!alike(f, other, true), "seed {seed}: another picture at distance {}", distance(f, other));
            // A mirror image, resized and re-encoded: alike, by the mirror image's shape.
            let mirrored = fingerprint(&image::imageops::flip_horizontal(&reencoded(&original, 300, 225, 60)));
            assert!(alike(f, mirrored, true) && alike(mirrored, f, true), "seed {seed}: mirror image {f:?} {mirrored:?}");
            assert!(distance(f, mirrored) > MAX_DISTANCE, "seed {seed}: the test needs pictures whose mirror images differ");
            assert!(!alike(f, mirrored, false), "seed {seed}: a mirror image under another class is another example");
        }
    }

    /// A copy turned by a quarter, a half or three quarters, or mirrored and turned (the seven
    /// other ways of laying a picture down), resized and re-encoded: alike, each both ways round,
    /// though its shape as it is differs.
    #[test]
    fn a_turned_copy_looks_alike() {
        use image::imageops::{flip_horizontal, rotate90, rotate180, rotate270};
        for seed in 0..10 {
            let original = picture(seed, 640, 480);
            let f = fingerprint(&original);
            let small = reencoded(&original, 300, 225, 60);
            let turned = [
                rotate90(&small),
                rotate180(&small),
                rotate270(&small),
                rotate90(&flip_horizontal(&small)),
                rotate180(&flip_horizontal(&small)),
                rotate270(&flip_horizontal(&small)),
            ];
            for (way, copy) in turned.iter().enumerate() {
                let t = fingerprint(copy);
                assert!(alike(f, t, true) && alike(t, f, true), "seed {seed}, way {way}: {f:?} {t:?}");
                assert!(!alike(f, t, false), "seed {seed}, way {way}: a turned copy under another class is another example");
                assert!(distance(f, t) > MAX_DISTANCE, "seed {seed}, way {way}: the test needs pictures that differ turned");
                assert!(!alike(fingerprint(&picture(seed + 1000, 480, 640)), t, true), "seed {seed}, way {way}: another picture");
            }
        }
    }

    /// Flat colours and smooth ramps have the same shape whatever their colour.
    #[test]
    fn pictures_without_structure_are_told_apart_by_colour() {
        let flat = |c: [u8; 3]| fingerprint(&RgbImage::from_pixel(100, 80, image::Rgb(c)));
        let ramp = |c: [u8; 3]| fingerprint(&RgbImage::from_fn(100, 80, |x, _| image::Rgb(c.map(|v| v.saturating_add(x as u8 / 4)))));
        for look in [flat, ramp] {
            assert!(alike(look([200, 30, 30]), look([203, 31, 28]), false));
            assert!(!alike(look([200, 30, 30]), look([30, 30, 200]), true));
            assert!(!alike(look([200, 30, 30]), look([150, 30, 30]), true));
        }
    }

    /// Stored columns read back whole; those an older version did not take stand in as the shape
    /// for a job, never for the report.
    #[test]
    fn columns_round_trip_and_older_rows_read_as_far_as_they_go() {
        let f = fingerprint(&picture(3, 200, 150));
        let c = f.to_columns();
        let (shape, mirror, turned, colour) = (Some(c.shape), Some(c.mirror), Some(&c.turned[..]), Some(c.colour));
        assert_eq!(Look::from_columns(shape, mirror, turned, colour), Some(f));
        assert_eq!(Look::from_columns_so_far(shape, mirror, turned, colour), Some(f));
        assert_eq!(Look::from_columns(shape, mirror, None, colour), None);
        assert_eq!(Look::from_columns(shape, mirror, Some(&c.turned[..40]), colour), None);
        assert_eq!(Look::from_columns_so_far(shape, mirror, None, colour), Some(Look { turned: [f.shape; 6], ..f }));
        assert_eq!(Look::from_columns_so_far(shape, None, None, colour), Some(Look::of_shape(f.shape, f.colour)));
        assert_eq!(Look::from_columns_so_far(None, mirror, turned, colour), None);
        assert_eq!(Look::from_columns_so_far(shape, mirror, turned, None), None);
    }

    /// Images smaller than the averaged copy (down to one pixel) are enlarged, not refused.
    #[test]
    fn tiny_and_long_images_have_fingerprints() {
        for (w, h) in [(1, 1), (5, 3), (2000, 1), (1, 700), (63, 65)] {
            let image = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, 90]));
            assert_eq!(fingerprint(&image), fingerprint(&image), "{w}×{h}");
        }
        let grey = fingerprint(&RgbImage::from_pixel(1, 1, image::Rgb([128, 128, 128])));
        assert_eq!(grey, Look::of_shape(0, ((128 >> 3) << 11) | ((128 >> 2) << 5) | (128 >> 3)));
    }

    /// The multi-index search finds exactly the clusters of the plain all-pairs search.
    #[test]
    fn clusters_match_the_all_pairs_search() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..30 {
            // Each in one of three classes.
            let mut prints: Vec<(Look, u8)> = (0..rng.random_range(1..60))
                .map(|_| (Look { shape: rng.random(), mirror: rng.random(), turned: rng.random(), colour: rng.random() }, rng.random_range(0..3)))
                .collect();
            // Near copies, some of them mirrored or turned (the shape swapped with another way's),
            // some under another class: a few bits flipped, some just within the threshold, some
            // just past it.
            for _ in 0..rng.random_range(0..40) {
                let (mut f, mut class) = prints[rng.random_range(0..prints.len())];
                if rng.random_bool(0.3) {
                    class = rng.random_range(0..3);
                }
                match rng.random_range(0..10) {
                    0..3 => (f.shape, f.mirror) = (f.mirror, f.shape),
                    3..6 => std::mem::swap(&mut f.shape, &mut f.turned[rng.random_range(0..6)]),
                    _ => {}
                }
                for _ in 0..rng.random_range(0..=MAX_DISTANCE + 2) {
                    f.shape ^= 1 << rng.random_range(0..64);
                    f.mirror ^= 1 << rng.random_range(0..64);
                    f.turned[rng.random_range(0..6)] ^= 1 << rng.random_range(0..64);
                }
                // The colour: the same, or one bit changed (one, two or more steps in a channel).
                f.colour ^= [0, 0, 1, 2 << 5, 3 << 11][rng.random_range(0..5)];
                prints.push((f, class));
            }
            let mut parent: Vec<usize> = (0..prints.len()).collect();
            for i in 0..prints.len() {
                for j in i + 1..prints.len() {
                    if alike(prints[i].0, prints[j].0, prints[i].1 == prints[j].1) {
                        union(&mut parent, i, j);
                    }
                }
            }
            let expected: Vec<usize> = (0..prints.len()).map(|i| root(&mut parent, i)).collect();
            assert_eq!(clusters(&prints), expected);
        }
    }

    /// Shapes at exactly the threshold, their differing bits spread over the whole hash, are
    /// found (the search must look one bit round each piece of the shape).
    #[test]
    fn a_pair_at_the_threshold_with_spread_bits_is_found() {
        let clusters = |looks: &[Look]| clusters(&looks.iter().map(|&l| (l, "cat")).collect::<Vec<_>>());
        let a = Look { shape: 0x0123_4567_89AB_CDEF, mirror: 0xF7B3_D591_E6A2_C480, turned: [0x5A5A_0F0F_3C3C_9696, 1, 2, 3, 4, 5], colour: 7 };
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
        // A turned copy at the threshold: its shape is one of the original's turned shapes.
        let turned = Look { shape: a.turned[0] ^ spread, mirror: !a.shape, turned: [!a.mirror; 6], ..a };
        assert!(distance(a, turned) > 2 * MAX_DISTANCE);
        assert_eq!(clusters(&[a, turned]), [0, 0]);
        assert_eq!(clusters(&[a, Look { shape: turned.shape ^ 1 << 63, ..turned }]), [0, 1], "one bit past the threshold");
        // Under two classes, only as they are.
        assert_eq!(super::clusters(&[(a, "cat"), (b, "dog")]), [0, 0]);
        assert_eq!(super::clusters(&[(a, "cat"), (mirror, "dog")]), [0, 1]);
        assert_eq!(super::clusters(&[(a, "cat"), (turned, "dog")]), [0, 1]);
        assert_eq!(super::clusters(&[(a, "cat"), (mirror, "dog"), (turned, "cat")]), [0, 1, 0]);
    }

    /// Every way of spreading [`MAX_DISTANCE`] differing bits over the pieces of the shape is
    /// found, the hardest (no piece equal) included, and none one bit further.
    #[test]
    fn shapes_at_the_threshold_are_found_however_their_bits_fall() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let flips = |rng: &mut ChaCha8Rng, per_piece: &[u32]| {
            let mut mask = 0u64;
            for (p, &k) in per_piece.iter().enumerate() {
                while (mask >> (16 * p) & 0xFFFF).count_ones() < k {
                    mask |= 1 << (16 * p + rng.random_range(0..16));
                }
            }
            mask
        };
        // How many bits differ in each piece: the threshold's every split over the four pieces.
        let mut splits = Vec::new();
        for a in 0..=MAX_DISTANCE {
            for b in 0..=MAX_DISTANCE - a {
                for c in 0..=MAX_DISTANCE - a - b {
                    splits.push([a, b, c, MAX_DISTANCE - a - b - c]);
                }
            }
        }
        assert!(splits.contains(&[2, 2, 1, 1]) && splits.contains(&[0, 0, 0, 6]));
        for split in splits {
            for _ in 0..20 {
                let a = Look::of_shape(rng.random(), 0x4321);
                let near = Look::of_shape(a.shape ^ flips(&mut rng, &split), 0x4321);
                assert_eq!(distance(a, near), MAX_DISTANCE);
                assert_eq!(clusters(&[(a, ()), (near, ())]), [0, 0], "{split:?}");
                // One bit more is too far.
                let mut past = split;
                *past.iter_mut().min().unwrap() += 1;
                let far = Look::of_shape(a.shape ^ flips(&mut rng, &past), 0x4321);
                assert_eq!(clusters(&[(a, ()), (far, ())]), [0, 1], "{past:?}");
                // Found as a turned copy too: the original's turned shape near the copy's.
                let turned = Look { turned: [a.shape, 1, 2, 3, 4, 5], ..Look::of_shape(!a.shape, 0x4321) };
                let copy = Look::of_shape(near.shape, 0x4321);
                assert_eq!(clusters(&[(turned, ()), (copy, ())]), [0, 0], "{split:?}");
            }
        }
    }

    #[test]
    fn a_chain_of_near_copies_is_one_cluster_led_by_its_first_member() {
        let look = |shape| Look::of_shape(shape, 0x1234);
        let a = look(0);
        let b = look(0b11_1111); // 6 bits from a
        let c = look(0b1111_1111_1111); // 6 from b, 12 from a
        let far = look(u64::MAX);
        assert_eq!(clusters(&[far, c, a, b, far].map(|l| (l, 0))), [0, 1, 1, 1, 0]);
    }
}
