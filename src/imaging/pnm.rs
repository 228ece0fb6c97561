//! Netpbm images (PBM, PGM and PPM, `P1` to `P6`, plain or binary) as Pillow reads them, and so
//! as `transformers` feeds them to a model: classic image sets (faces, cars, scans) come as PGM.
//!
//! Read here rather than by the image crate's PNM decoder, which scales samples of a maximum
//! other than 255 in `f32`, rounding halves away from zero, where Pillow computes
//! `round(v / maxval * 255)` in double precision, rounding halves to even: 3 of 10 becomes 77
//! there and 76 in Pillow. The format is a few lines of header; the rules are Pillow's
//! (`PpmImagePlugin`):
//! - the header's tokens are separated by whitespace, a `#` starts a comment to the end of its
//!   line (inside a token too), and one whitespace byte ends the header;
//! - a bitmap's 1 is black (plain ones may run their digits together);
//! - samples of a maximum other than 255 are scaled to 0–255 as above, a binary one over its
//!   maximum clamped to 255, a plain one over it refused; binary samples of a maximum over 255 take
//!   two bytes, most significant first.
//!
//! One departure, as for 16-bit PNG and TIFF: Pillow opens grey of a maximum over 255 as 32-bit
//! integers, which its RGB conversion clips to 0–255, washing the picture out; it is scaled to
//! 0–255 here as Pillow scales colour. `P7` (PAM), which Pillow does not read, is refused by
//! name.

use image::RgbImage;

use super::ImageError;

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    /// 1 to 6, the digit of the magic number.
    kind: u8,
    width: u32,
    height: u32,
    /// The largest sample value (1 for bitmaps).
    maxval: u32,
    /// Where the samples begin.
    data: usize,
}

const WHITESPACE: &[u8] = b" \t\n\x0b\x0c\r";

fn corrupt(why: impl Into<String>) -> ImageError {
    ImageError::Corrupt(why.into())
}

/// Reads the header: the magic number, then width, height and (but for bitmaps) the maximum.
fn header(bytes: &[u8]) -> Result<Header, ImageError> {
    let kind = match bytes {
        [b'P', digit @ b'1'..=b'6', next, ..] if WHITESPACE.contains(next) => digit - b'0',
        [b'P', b'7', ..] => return Err(ImageError::Unsupported("a PAM (P7) image; save it as PNG".into())),
        _ => return Err(corrupt("not a Netpbm header")),
    };
    let mut at = 3;
    let mut token = || -> Result<u32, ImageError> {
        let mut digits = Vec::new();
        while let Some(&c) = bytes.get(at) {
            at += 1;
            if WHITESPACE.contains(&c) {
                if digits.is_empty() {
                    continue;
                }
                break;
            }
            if c == b'#' {
                // A comment, to the end of its line (or of the file).
                while bytes.get(at).is_some_and(|c| !b"\r\n".contains(c)) {
                    at += 1;
                }
                at += 1;
                continue;
            }
            digits.push(c);
            if digits.len() > 10 {
                return Err(corrupt("a Netpbm header value is longer than 10 characters"));
            }
        }
        if digits.is_empty() {
            return Err(corrupt("the Netpbm header ends early"));
        }
        number(&digits)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| corrupt(format!("the Netpbm header has {:?} where a number belongs", String::from_utf8_lossy(&digits))))
    };
    let (width, height) = (token()?, token()?);
    let maxval = if kind == 1 || kind == 4 { 1 } else { token()? };
    if !(1..=65535).contains(&maxval) {
        return Err(corrupt(format!("the Netpbm maximum value is {maxval}, outside 1 to 65535")));
    }
    Ok(Header { kind, width, height, maxval, data: at.min(bytes.len()) })
}

/// A header value or plain sample: decimal digits only (at most 10 of them, so it fits).
fn number(digits: &[u8]) -> Option<u64> {
    digits.iter().all(u8::is_ascii_digit).then(|| std::str::from_utf8(digits).ok()?.parse().ok()).flatten()
}

/// The size of a Netpbm image, from its header.
pub(super) fn dimensions(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    header(bytes).map(|h| (h.width, h.height))
}

/// Pillow's scaling of a sample to 0–255: `round(v / maxval * 255)` in double precision, halves
/// to even, then at most 255.
fn scale(v: u32, maxval: u32) -> u8 {
    if maxval == 255 {
        return v.min(255) as u8;
    }
    (f64::from(v) / f64::from(maxval) * 255.0).round_ties_even().min(255.0) as u8
}

/// Decodes a Netpbm image whose size [`dimensions`] gave to 8-bit RGB.
pub(super) fn decode(bytes: &[u8], width: u32, height: u32) -> Result<RgbImage, ImageError> {
    let h = header(bytes)?;
    if (h.width, h.height) != (width, height) {
        return Err(corrupt("the Netpbm image's size changed between reads"));
    }
    let data = &bytes[h.data..];
    let (w, rows) = (width as usize, height as usize);
    let bands = if h.kind == 3 || h.kind == 6 { 3 } else { 1 };
    let needed = w * rows * bands;
    let short = || corrupt("the Netpbm image is cut short");
    let samples: Vec<u8> = match h.kind {
        4 => {
            // Rows of bits, most significant first, each row padded to a byte; 1 is black.
            let row = w.div_ceil(8);
            let data = data.get(..row * rows).ok_or_else(short)?;
            (0..rows).flat_map(|y| (0..w).map(move |x| if data[y * row + x / 8] & (0x80 >> (x % 8)) != 0 { 0 } else { 255 })).collect()
        }
        5 | 6 => {
            let sample_bytes = if h.maxval < 256 { 1 } else { 2 };
            let data = data.get(..needed * sample_bytes).ok_or_else(short)?;
            if sample_bytes == 1 {
                data.iter().map(|&v| scale(u32::from(v), h.maxval)).collect()
            } else {
                data.chunks_exact(2).map(|v| scale(u32::from(u16::from_be_bytes([v[0], v[1]])), h.maxval)).collect()
            }
        }
        1 => {
            // Digits 0 and 1, whitespace between them optional; every one in the file must be one
            // (Pillow checks those it reads, a megabyte at a time).
            let mut bits = Vec::with_capacity(needed);
            for c in plain(data) {
                let bit = match c {
                    b'0' => 255,
                    b'1' => 0,
                    c if WHITESPACE.contains(&c) => continue,
                    c => return Err(corrupt(format!("the plain bitmap holds {:?} where 0 or 1 belongs", char::from(c)))),
                };
                if bits.len() < needed {
                    bits.push(bit);
                }
            }
            bits
        }
        _ => {
            // Numbers separated by whitespace, none over the maximum (read as they come: the
            // text is not copied).
            let mut values = Vec::with_capacity(needed);
            let mut token = Vec::with_capacity(11);
            for c in plain(data).chain([b' ']) {
                if values.len() == needed {
                    break;
                }
                if !WHITESPACE.contains(&c) {
                    token.push(c);
                    if token.len() > 10 {
                        return Err(corrupt("the plain Netpbm image holds a value longer than 10 characters"));
                    }
                    continue;
                }
                if token.is_empty() {
                    continue;
                }
                let value = number(&token).ok_or_else(|| corrupt(format!("the plain Netpbm image holds {:?} where a number belongs", String::from_utf8_lossy(&token))))?;
                if value > u64::from(h.maxval) {
                    return Err(corrupt(format!("the plain Netpbm image holds {value}, over its maximum {}", h.maxval)));
                }
                values.push(scale(value as u32, h.maxval));
                token.clear();
            }
            values
        }
    };
    if samples.len() < needed {
        return Err(short());
    }
    Ok(if bands == 3 {
        RgbImage::from_raw(width, height, samples).ok_or_else(short)?
    } else {
        RgbImage::from_fn(width, height, |x, y| {
            let v = samples[y as usize * w + x as usize];
            image::Rgb([v, v, v])
        })
    })
}

/// The bytes of a plain (text) image's samples without its comments (a `#` to the end of its
/// line).
fn plain(data: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let mut comment = false;
    data.iter().copied().filter(move |&c| {
        if comment {
            comment = !b"\r\n".contains(&c);
            return false;
        }
        if c == b'#' {
            comment = true;
            return false;
        }
        true
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn fixtures() -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pnm")
    }

    fn decode(bytes: &[u8]) -> Result<RgbImage, ImageError> {
        super::super::decode_rgb(bytes, 1 << 20)
    }

    /// Plain and binary bitmaps, grey and colour of maxima 1 to 65535, comments in the header and
    /// the samples: decoded sample for sample as transformers gets them from Pillow
    /// (`tests/fixtures/make_pnm_refs.py` wrote the references, and says which are not Pillow's
    /// own).
    #[test]
    fn every_kind_of_netpbm_image_decodes_to_pillow_s_pixels() {
        super::super::assert_fixture_folder_decodes_as_pillow_does(&fixtures(), 18);
    }

    /// Pillow's rounding: halves to even (3 of 10 is 76.5, so 76; 1 of 10 is 25.5, so 26), and a
    /// binary sample over its maximum at most 255.
    #[test]
    fn samples_scale_as_pillow_s_do() {
        assert_eq!((scale(3, 10), scale(1, 10), scale(5, 10)), (76, 26, 128));
        assert_eq!((scale(0, 1), scale(1, 1), scale(255, 255), scale(65535, 65535)), (0, 255, 255, 255));
        assert_eq!((scale(150, 100), scale(1000, 255)), (255, 255));
        assert_eq!(scale(32768, 65535), 128);
        // Two bytes a sample from a maximum of 256 (one byte below it): 256 and 128 of 256.
        let two_bytes = decode(b"P5 2 1 256\n\x01\x00\x00\x80").unwrap();
        assert_eq!(two_bytes.as_raw(), &[255, 255, 255, 128, 128, 128]);
        let one_byte = decode(b"P5 2 1 255\n\x01\x00").unwrap();
        assert_eq!(one_byte.as_raw(), &[1, 1, 1, 0, 0, 0]);
    }

    fn corrupt_because(bytes: &[u8]) -> String {
        match decode(bytes) {
            Err(ImageError::Corrupt(why)) => why,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(&bytes[..bytes.len().min(20)])),
        }
    }

    /// Files Pillow refuses are refused, each with its reason; PAM (`P7`) by name.
    #[test]
    fn damaged_or_unread_netpbm_images_are_refused_with_a_reason() {
        let fixture = |name: &str| std::fs::read(fixtures().join(name)).unwrap();
        assert_eq!(decode(&fixture("refused-p7.pam")), Err(ImageError::Unsupported("a PAM (P7) image; save it as PNG".into())));
        assert_eq!(corrupt_because(&fixture("refused-over-max.pgm")), "the plain Netpbm image holds 11, over its maximum 10");
        assert_eq!(corrupt_because(&fixture("refused-cut-short.ppm")), "the Netpbm image is cut short");
        assert_eq!(corrupt_because(&fixture("refused-bad-bit.pbm")), "the plain bitmap holds '2' where 0 or 1 belongs");
        assert_eq!(corrupt_because(&fixture("refused-max0.pgm")), "the Netpbm maximum value is 0, outside 1 to 65535");
        assert_eq!(corrupt_because(&fixture("refused-max70000.pgm")), "the Netpbm maximum value is 70000, outside 1 to 65535");
        // A text file that happens to begin as a header does; headers cut short or lying.
        assert_eq!(corrupt_because(b"P1 is the first point of the agenda"), "the Netpbm header has \"is\" where a number belongs");
        assert_eq!(corrupt_because(b"P5\n12 12"), "the Netpbm header ends early");
        assert_eq!(corrupt_because(b"P6x 1 1 255\n"), "not a Netpbm header");
        assert_eq!(corrupt_because(b"P5 123456789012 1 255 "), "a Netpbm header value is longer than 10 characters");
        assert_eq!(corrupt_because(b"P5 9999999999 1 255 "), "the Netpbm header has \"9999999999\" where a number belongs");
        assert_eq!(corrupt_because(b"P2 2 1 255 7 -1"), "the plain Netpbm image holds \"-1\" where a number belongs");
        assert_eq!(corrupt_because(b"P2 3 1 255 7 8"), "the Netpbm image is cut short");
        assert_eq!(corrupt_because(b"P4 9 2 \xff\xff\xff"), "the Netpbm image is cut short");
        // Every fixture cut short is refused, never misread or a panic. (Only cut within its
        // last number, at most 4 digits and a newline, is a plain one read, as Pillow reads it:
        // its last sample shortened.)
        for entry in std::fs::read_dir(fixtures()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "png") || path.file_name().unwrap().to_string_lossy().starts_with("refused-") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            for cut in (0..bytes.len() - 4).step_by(bytes.len() / 40 + 1).chain([bytes.len() - 5]) {
                assert!(decode(&bytes[..cut]).is_err(), "{} cut at {cut} decoded", path.display());
            }
        }
    }

    /// A header over the pixel limit is refused before anything is read or allocated.
    #[test]
    fn a_netpbm_image_over_the_pixel_limit_is_refused_from_its_header() {
        let huge = b"P5 100000 100000 255\n";
        assert!(matches!(super::super::decode_rgb(huge, 40_000_000), Err(ImageError::TooManyPixels { width: 100000, height: 100000, .. })));
        assert_eq!(super::super::decode_rgb(b"P5 0 5 255\n", 100), Err(ImageError::ZeroSize));
    }
}
