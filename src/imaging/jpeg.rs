//! JPEG pixels as Pillow reads them, and so as `transformers` feeds them to a model.
//!
//! Pillow decodes JPEG with libjpeg-turbo at libjpeg's defaults (the accurate integer inverse
//! DCT, smooth "fancy" chroma upsampling). So does [`decode`], through the `mozjpeg` crate:
//! MozJPEG is libjpeg-turbo with another encoder, and its decoder is libjpeg-turbo's. The pixels
//! are then the very ones Pillow gives, where the image crate's decoder (zune-jpeg) rounds the
//! inverse DCT, the upsampling and the colour conversion its own way: on the 1,200 photos of
//! `../shared/` it gave 11% of the samples a level or more off Pillow's (up to 5;
//! `bench/jpeg-parity.md`), enough to move a predicted probability by 5e-3 (`bench/QUALITY.md`).
//! libjpeg reads the header too ([`dimensions`]), so that what it decodes (arithmetic-coded JPEGs
//! included, which the image crate's header reader refuses) is accepted, and the EXIF
//! orientation is read from the file's segments ([`orientation`]).

use image::RgbImage;
use image::metadata::Orientation;
use mozjpeg::{ColorSpace, Decompress};

use super::ImageError;

/// Most scans a JPEG may have. Each scan of a progressive JPEG goes over the whole image again,
/// so a small file of thousands of scans would take minutes; real ones have about ten. (The image
/// crate's decoder, used before, had the same limit.)
pub(super) const MAX_SCANS: usize = 100;

/// Refuses a JPEG whose data runs out before its end-of-image marker, as Pillow does ("image
/// file is truncated"; libjpeg would fill what is missing with grey and say nothing), or that
/// has more than [`MAX_SCANS`] scans.
pub(super) fn check_structure(bytes: &[u8]) -> Result<(), ImageError> {
    match scans(bytes) {
        None => Err(ImageError::Corrupt("the JPEG data ends before its end-of-image marker (the file is cut short)".into())),
        Some(n) if n > MAX_SCANS => Err(ImageError::Corrupt(format!("the JPEG has {n} scans, more than the {MAX_SCANS} allowed"))),
        Some(_) => Ok(()),
    }
}

/// How many scans a JPEG has when its segments and scans run to its end-of-image marker, none
/// when it is cut short: each segment's length is followed (stray bytes after a segment are
/// skipped), and each scan's entropy-coded data up to the next marker (in which a 0xFF byte is
/// followed by 0x00 or is a restart marker). Bytes after the marker (some cameras append some) do
/// not matter.
fn scans(bytes: &[u8]) -> Option<usize> {
    let mut at = 2; // after SOI
    let mut scans = 0;
    loop {
        let code;
        (code, at) = marker(bytes, at)?;
        match code {
            0xD9 => return Some(scans),
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        at += segment_length(bytes, at)?;
        if code == 0xDA {
            scans += 1;
            // Entropy-coded data up to the next marker that is not a restart marker.
            loop {
                at = next_ff(bytes, at)?;
                match bytes.get(at + 1)? {
                    0x00 | 0xD0..=0xD7 | 0xFF => at += 1,
                    _ => break,
                }
            }
        }
    }
}

/// The position of the first 0xFF byte at or after `at`.
fn next_ff(bytes: &[u8], at: usize) -> Option<usize> {
    Some(at + bytes.get(at..)?.iter().position(|&b| b == 0xFF)?)
}

/// The next marker at or after `at`: its code and where what follows it starts. A marker is
/// 0xFF (any number of fill bytes), then its code; stray bytes before it are skipped, as libjpeg
/// (with a warning Pillow ignores) and Pillow do. None when the bytes end first.
fn marker(bytes: &[u8], at: usize) -> Option<(u8, usize)> {
    let mut at = next_ff(bytes, at)?;
    while bytes.get(at + 1) == Some(&0xFF) {
        at += 1;
    }
    Some((*bytes.get(at + 1)?, at + 2))
}

/// The length a segment's first two bytes (at `at`) give, those two bytes included.
fn segment_length(bytes: &[u8], at: usize) -> Option<usize> {
    bytes.get(at..at + 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
}

/// A JPEG's size, from its frame header as libjpeg reads it; nothing is decoded, and no segment is
/// kept in memory.
pub(super) fn dimensions(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    let read = std::panic::catch_unwind(|| Decompress::new_mem(bytes).map(|jpeg| (jpeg.width(), jpeg.height())));
    match read {
        // A JPEG's sides are 16-bit numbers.
        Ok(Ok((width, height))) => Ok((width as u32, height as u32)),
        Ok(Err(e)) => Err(ImageError::Corrupt(e.to_string())),
        Err(payload) => Err(libjpeg_error(payload)),
    }
}

/// A JPEG's EXIF orientation, from its first APP1 segment that holds EXIF, as Pillow reads it (the
/// image crate's reader took the last). None, or one that cannot be read, leaves the pixels as
/// stored, as Pillow's `exif_transpose` does.
pub(super) fn orientation(bytes: &[u8]) -> Orientation {
    let mut at = 2; // after SOI
    // Each segment up to the first scan.
    while let Some((code, next)) = marker(bytes, at) {
        at = next;
        match code {
            // Markers without a length, and a stuffed zero, which is no marker (Pillow skips it).
            0x00 | 0x01 | 0xD0..=0xD8 => {}
            0xD9 | 0xDA => break,
            _ => {
                let Some(len) = segment_length(bytes, at) else { break };
                // A length under 2 (which libjpeg refuses) leaves an empty body, not a panic.
                let start = (at + 2).min(bytes.len());
                let body = &bytes[start..(at + len).clamp(start, bytes.len())];
                if code == 0xE1 && body.starts_with(b"Exif\0\0") {
                    return Orientation::from_exif_chunk(&body[6..]).unwrap_or(Orientation::NoTransforms);
                }
                at += len;
            }
        }
    }
    Orientation::NoTransforms
}

unsafe extern "C" {
    /// libjpeg-turbo's own answer to whether its SIMD inverse DCT runs here: 0 where the library
    /// was built without its SIMD code (`jsimd_none.c`: no `nasm` at build time), else whether
    /// this CPU has SSE2 or AVX2 (mozjpeg-sys builds it without its `JSIMD_*` variables).
    fn jsimd_can_idct_islow() -> std::ffi::c_int;
}

/// Whether JPEGs are decoded with libjpeg-turbo's SIMD code (its inverse DCT, upsampling and
/// colour conversion; the same pixels as its C code, in about half the time), for the start-up
/// log.
pub(super) fn simd_in_use() -> bool {
    // SAFETY: a libjpeg-turbo function of no arguments that reads the CPU's features (once, and
    // thread-safely) and returns an int.
    unsafe { jsimd_can_idct_islow() != 0 }
}

/// libjpeg's fatal error, unwound out of its C code (`mozjpeg`'s error manager, built for it),
/// as a reason; the message is the unwind's payload.
fn libjpeg_error(payload: Box<dyn std::any::Any + Send>) -> ImageError {
    let message = payload.downcast_ref::<String>().map_or("the decoder failed on this file", String::as_str);
    ImageError::Corrupt(message.trim_start_matches("libjpeg fatal error: ").to_string())
}

/// Decodes a JPEG that [`check_structure`] passed and whose header declared `width` × `height`
/// to 8-bit RGB as Pillow and `transformers`' `convert_to_rgb` do: grey replicated, colour as
/// libjpeg converts it, CMYK as [`cmyk_to_rgb`] says.
pub(super) fn decode(bytes: &[u8], width: u32, height: u32) -> Result<RgbImage, ImageError> {
    let samples = decode_samples(bytes, Output::Rgb, |w, h, _| {
        if (w, h) == (width as usize, height as usize) {
            Ok(())
        } else {
            Err(ImageError::Corrupt("the JPEG's frame header does not match its size".into()))
        }
    })?;
    RgbImage::from_raw(width, height, samples).ok_or_else(|| ImageError::Corrupt("the JPEG's data ended before its last row".into()))
}

/// What [`decode_samples`] makes of a JPEG's components.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Output {
    /// RGB, as Pillow opens a JPEG file: colour converted as the JPEG's markers say (else as
    /// libjpeg guesses from its component ids), grey replicated, CMYK by [`cmyk_to_rgb`].
    Rgb,
    /// The components as stored, upsampled but not converted: one sample a pixel for grey, three
    /// for colour, as libtiff hands over the JPEG strips of an RGB or grey TIFF.
    Stored,
}

/// Decodes a whole JPEG that [`check_structure`] passed to 8-bit samples, row after row.
/// `accept` sees its width, height and component count before any pixel is decoded, and may
/// refuse it.
pub(super) fn decode_samples(
    bytes: &[u8],
    output: Output,
    accept: impl FnOnce(usize, usize, usize) -> Result<(), ImageError>,
) -> Result<Vec<u8>, ImageError> {
    let corrupt = |e: std::io::Error| ImageError::Corrupt(e.to_string());
    // libjpeg reports a fatal error by unwinding out of its C code (`mozjpeg`'s error manager,
    // built for it); the message is the unwind's payload.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<Vec<u8>, ImageError> {
        let jpeg = Decompress::new_mem(bytes).map_err(corrupt)?;
        let components = jpeg.components().len();
        accept(jpeg.width(), jpeg.height(), components)?;
        // Pillow opens one layer as grey, three as RGB, four as CMYK, and refuses others.
        let cmyk = match (components, output) {
            (1 | 3, _) => false,
            (4, Output::Rgb) => true,
            (n, _) => return Err(ImageError::Corrupt(format!("a JPEG of {n} components (Pillow reads 1, 3 or 4)"))),
        };
        let mut started = match output {
            Output::Rgb if cmyk => jpeg.to_colorspace(ColorSpace::JCS_CMYK),
            Output::Rgb => jpeg.rgb(),
            Output::Stored => {
                let stored = jpeg.color_space();
                jpeg.to_colorspace(stored)
            }
        }
        .map_err(corrupt)?;
        let samples: Vec<u8> = started.read_scanlines().map_err(corrupt)?;
        started.finish().map_err(corrupt)?;
        // `finish` dropped the decoder: libjpeg's memory (a progressive JPEG's coefficients) is
        // freed before CMYK is converted, so that decoding stays within `decode_cost`.
        Ok(if cmyk { cmyk_to_rgb(&samples) } else { samples })
    }));
    decoded.unwrap_or_else(|payload| Err(libjpeg_error(payload)))
}

/// A CMYK JPEG's samples to RGB as Pillow does: it takes a four-layer JPEG's samples as Adobe
/// writes them, inverted (its raw mode `CMYK;I`), then converts with its integer arithmetic
/// ([`super::cmyk_to_rgb`]).
fn cmyk_to_rgb(samples: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(samples.len() / 4 * 3);
    for pixel in samples.chunks_exact(4) {
        rgb.extend(super::cmyk_to_rgb([pixel[0], pixel[1], pixel[2], pixel[3]].map(|v| 255 - v)));
    }
    rgb
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// The test fixtures, read when a test runs, so that the image build (which leaves tests/
    /// out) needs none.
    fn fixtures() -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(fixtures().join("jpeg").join(name)).unwrap()
    }

    /// Where the build is meant to have libjpeg-turbo's SIMD code (`VITFORGE_REQUIRE_JPEG_SIMD=1`,
    /// which `.ci/run` sets once nasm is installed, as the container build has it), it is in use,
    /// so that the fixture tests here decode with the code the service runs.
    #[test]
    fn libjpeg_turbo_s_simd_code_is_in_use_where_required() {
        let required = std::env::var("VITFORGE_REQUIRE_JPEG_SIMD").is_ok_and(|v| v == "1");
        eprintln!("libjpeg-turbo's SIMD code in use: {}", simd_in_use());
        assert!(!required || simd_in_use(), "VITFORGE_REQUIRE_JPEG_SIMD=1 but libjpeg-turbo runs its C code alone: was nasm missing when mozjpeg-sys was built?");
    }

    /// Every kind of JPEG Pillow writes (4:2:0, 4:2:2 and 4:4:4 sampling, quality 10 to 100,
    /// progressive, optimised tables, restart markers, grey, CMYK, one pixel, sizes that end
    /// mid-block), decoded sample for sample as Pillow decodes it
    /// (`tests/fixtures/make_jpeg_refs.py` wrote the references).
    #[test]
    fn every_kind_of_jpeg_decodes_to_pillow_s_pixels() {
        let fixtures = fixtures();
        let mut files: Vec<_> = std::fs::read_dir(fixtures.join("jpeg")).unwrap().map(|e| e.unwrap().path()).collect();
        files.retain(|p| p.extension().is_some_and(|e| e == "jpg"));
        files.extend(["progressive.jpg", "restart-markers.jpg"].map(|n| fixtures.join(n)));
        files.sort();
        assert_eq!(files.len(), 17);
        let failures = super::super::differences_from_pillow(&files, &fixtures.join("jpeg"));
        assert!(failures.is_empty(), "{failures:#?}");
    }

    /// Where the first scan's segment and its entropy-coded data start and end.
    fn first_scan(jpeg: &[u8]) -> std::ops::Range<usize> {
        let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let data = sos + 2 + usize::from(u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]));
        let end = (data..jpeg.len() - 1).find(|&i| jpeg[i] == 0xFF && !matches!(jpeg[i + 1], 0x00 | 0xD0..=0xD7)).unwrap();
        sos..end
    }

    #[test]
    fn a_jpeg_libjpeg_refuses_is_corrupt_with_its_reason() {
        let jpeg = fixture("420-q90.jpg");
        // The first scan's first component uses Huffman tables 3, which the file does not
        // define: the header reads, libjpeg refuses at the scan (as it does in Pillow).
        let mut bad = jpeg.clone();
        let sos = first_scan(&jpeg).start;
        bad[sos + 6] = 0x33;
        let err = super::super::decode_rgb(&bad, 1 << 20).unwrap_err();
        assert_eq!(err, ImageError::Corrupt("Huffman table 0x03 was not defined".into()));
        // The decoder is whole after it: the next image decodes.
        assert!(super::super::decode_rgb(&jpeg, 1 << 20).is_ok());
    }

    /// The orientation is the first EXIF segment's, as Pillow reads it; XMP in an APP1 before it
    /// and stray bytes between segments do not get in its way.
    #[test]
    fn the_orientation_is_the_first_exif_segment_s() {
        let jpeg = fixture("420-q90.jpg");
        let app1 = |body: &[u8]| [&[0xFF, 0xE1], &(body.len() as u16 + 2).to_be_bytes()[..], body].concat();
        let exif = |n| app1(&[b"Exif\0\0".as_slice(), &super::super::test_exif::orientation(n)].concat());
        let with = |segments: &[Vec<u8>]| [&jpeg[..2], &segments.concat(), &jpeg[2..]].concat();
        assert_eq!(orientation(&jpeg), Orientation::NoTransforms);
        assert_eq!(orientation(&with(&[exif(6), exif(3)])), Orientation::Rotate90);
        let xmp = app1(b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>");
        assert_eq!(orientation(&with(&[xmp, vec![0x00, 0x17], exif(8)])), Orientation::Rotate270);
        assert_eq!(orientation(&with(&[app1(b"Exif\0\0II*\0")])), Orientation::NoTransforms, "unreadable EXIF");
        // Decoded and turned a quarter: 61×45 stored, 45×61 seen.
        let turned = super::super::decode_rgb(&with(&[exif(6)]), 1 << 20).unwrap();
        assert_eq!(turned.dimensions(), (45, 61));
    }

    /// Bytes that are no segment, or a segment of a length under 2, before the EXIF one: the walk
    /// neither panics nor loops, and the decode says what is wrong or decodes. (The fuzzer found
    /// a stuffed zero before the frame header that made the walk slice backwards.)
    #[test]
    fn the_segment_walk_survives_bogus_lengths() {
        let jpeg = fixture("420-q90.jpg");
        let block = [b"Exif\0\0".as_slice(), &super::super::test_exif::orientation(6)].concat();
        let exif = [&[0xFF, 0xE1][..], &(block.len() as u16 + 2).to_be_bytes(), &block].concat();
        for junk in [[0xFF, 0x00, 0x00, 0x00], [0xFF, 0xE0, 0x00, 0x00], [0xFF, 0xE0, 0x00, 0x01], [0xFF, 0xFF, 0xFF, 0x00]] {
            let file = [&jpeg[..2], &junk, &exif, &jpeg[2..]].concat();
            let turned = orientation(&file);
            assert!(matches!(turned, Orientation::Rotate90 | Orientation::NoTransforms), "{junk:?}: {turned:?}");
            let _ = super::super::decode_rgb(&file, 1 << 20);
        }
        let stuffed = [&jpeg[..2], &[0xFF, 0x00], &exif, &jpeg[2..]].concat();
        assert_eq!(orientation(&stuffed), Orientation::Rotate90, "a stuffed zero is skipped");
    }

    #[test]
    fn a_jpeg_of_too_many_scans_is_refused() {
        // A progressive JPEG's first scan (DC of every component) repeated: libjpeg would go over
        // the image again for each copy.
        let jpeg = fixture("420-progressive.jpg");
        let scan = first_scan(&jpeg);
        let repeated = |copies: usize| [&jpeg[..scan.end], &jpeg[scan.clone()].repeat(copies), &jpeg[scan.end..]].concat();
        let scans = scans(&jpeg).unwrap();
        assert!(scans > 1, "{scans}");
        assert_eq!(check_structure(&repeated(MAX_SCANS - scans)), Ok(()));
        let err = super::super::decode_rgb(&repeated(MAX_SCANS - scans + 1), 1 << 20).unwrap_err();
        assert_eq!(err, ImageError::Corrupt(format!("the JPEG has {} scans, more than the {MAX_SCANS} allowed", MAX_SCANS + 1)));
    }

    #[test]
    fn cmyk_converts_with_pillow_s_rounding() {
        // Samples as stored (inverted): 255 is no ink.
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 0]), [0, 0, 0]);
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 0]), [0, 0, 0], "full black");
        // c = 100, k = 50: nk = 205, 100 × 205 / 255 = 80.39 (Pillow: 80), 205 - 80 = 125.
        assert_eq!(cmyk_to_rgb(&[155, 255, 0, 205]), [125, 205, 0]);
    }
}
