//! Image decoding with limits, shared by dataset ingest, training and prediction.
//!
//! Every image enters the system through [`decode_rgb`] or [`decode_rgb_within`]: the header is read first so that a file
//! declaring more pixels than allowed is refused before any pixel buffer is allocated.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use image::metadata::Orientation;
use image::{DynamicImage, ImageBuffer, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage, RgbaImage};

use crate::budget::{MemoryBudget, Reservation};

mod bmp;
mod jpeg;
mod pnm;
mod tiff;

/// Default pixel limit (width × height): 40 megapixels.
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

/// Most memory the decoder may use for what precedes the pixels (ICC profile, EXIF, text
/// chunks). Real ICC profiles are kilobytes to a few megabytes; without this, a PNG of a few
/// hundred kilobytes whose compressed ICC profile inflates to 512 MiB is read whole just to
/// learn its size (the image crate's default limit).
pub const MAX_METADATA_BYTES: u64 = 16 * 1024 * 1024;

/// Why an image could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("empty file")]
    Empty,
    #[error("not an image (unrecognised format)")]
    UnknownFormat,
    #[error("unsupported image format {0} (supported: JPEG, PNG, WebP, BMP, GIF, TIFF, PBM/PGM/PPM)")]
    UnsupportedFormat(String),
    /// A format we read, in a kind of it we do not (a TIFF of palette colours, say).
    #[error("unsupported image: {0}")]
    Unsupported(String),
    #[error("image is {width}×{height} = {pixels} pixels, over the limit of {max} pixels")]
    TooManyPixels { width: u32, height: u32, pixels: u64, max: u64 },
    #[error("image has a zero dimension")]
    ZeroSize,
    #[error("image metadata (such as an ICC profile) needs more than {MAX_METADATA_BYTES} bytes")]
    MetadataTooLarge,
    #[error("corrupt or truncated image: {0}")]
    Corrupt(String),
    /// Not the image's fault: decoding it needs more of the memory budget than is free.
    #[error("decoding this image needs {needed} bytes and the service's memory budget for work in flight is spent; retry shortly")]
    OverBudget { needed: u64 },
}

/// The image formats we accept.
pub fn is_supported(format: ImageFormat) -> bool {
    matches!(format, ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP | ImageFormat::Bmp | ImageFormat::Gif | ImageFormat::Tiff | ImageFormat::Pnm)
}

/// Decodes an encoded image (JPEG, PNG, WebP, BMP, a GIF's first frame or a TIFF's first page)
/// to 8-bit RGB, as `transformers`' `convert_to_rgb` does with Pillow: grey is replicated, 16-bit
/// is reduced to 8, and an image with transparency is composited onto white. An EXIF orientation
/// (or a TIFF's orientation tag) is applied ([`upright`]).
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    let (format, width, height) = dimensions(bytes, max_pixels)?;
    decode_checked(bytes, format, width, height)
}

/// Most bytes decoding an image of `pixels` pixels holds at once: the decoded frame at up to 8
/// bytes per pixel (16-bit RGBA), its 8-bit copy at up to 4, and the metadata allowance.
pub fn decode_cost(pixels: u64) -> u64 {
    pixels.saturating_mul(12).saturating_add(MAX_METADATA_BYTES)
}

/// What decoding `bytes` would hold at most ([`decode_cost`] of the pixels its header declares);
/// 0 for bytes whose header is refused (their decode fails before allocating pixels).
pub fn decode_cost_of(bytes: &[u8], max_pixels: u64) -> u64 {
    dimensions(bytes, max_pixels).map_or(0, |(_, w, h)| decode_cost(u64::from(w) * u64::from(h)))
}

/// [`decode_rgb`] within a memory budget: the decode's cost ([`decode_cost`], known from the
/// header before any pixel is allocated) is reserved first, waiting up to `wait` (zero: not at
/// all) when the budget is spent, and given back when the decode is done.
pub fn decode_rgb_within(bytes: &[u8], max_pixels: u64, memory: &Arc<MemoryBudget>, wait: Duration) -> Result<RgbImage, ImageError> {
    let (format, width, height) = dimensions(bytes, max_pixels)?;
    let needed = decode_cost(u64::from(width) * u64::from(height));
    let reserved: Option<Reservation> =
        if wait.is_zero() { memory.try_reserve(needed) } else { memory.reserve_blocking(needed, wait) };
    let _reserved = reserved.ok_or(ImageError::OverBudget { needed })?;
    decode_checked(bytes, format, width, height)
}

/// How JPEGs are decoded here, in words, for the start-up log: with libjpeg-turbo's SIMD code
/// where the build had `nasm` to assemble it, else with its C code alone (the same pixels).
pub fn jpeg_decoder_summary() -> &'static str {
    if jpeg::simd_in_use() {
        "JPEG decoding: libjpeg-turbo with its SIMD code"
    } else {
        "JPEG decoding: libjpeg-turbo's C code alone, about half the speed of its SIMD code (the same pixels): the build had no nasm to assemble it (apt-get install nasm, then cargo clean -p mozjpeg-sys and build again)"
    }
}

/// Whether `bytes` look like an image by their first bytes: a format we know of, decodable or
/// not (a text file or a PDF is not one).
pub fn looks_like_an_image(bytes: &[u8]) -> bool {
    image::guess_format(bytes).is_ok() || is_heif(bytes)
}

/// Whether `bytes` begin as a HEIF image does (an ISO media file whose brand is a HEIF one), the
/// format iPhones store photos in: not one we decode, but worth naming rather than calling it
/// "not an image".
fn is_heif(bytes: &[u8]) -> bool {
    const BRANDS: [&[u8]; 10] = [b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"];
    bytes.get(4..8) == Some(b"ftyp".as_slice()) && bytes.get(8..12).is_some_and(|brand| BRANDS.contains(&brand))
}

/// The format and size of an encoded image, read from its header within the limits.
fn dimensions(bytes: &[u8], max_pixels: u64) -> Result<(ImageFormat, u32, u32), ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let format = image::guess_format(bytes).map_err(|_| if is_heif(bytes) { ImageError::UnsupportedFormat("HEIC/HEIF".into()) } else { ImageError::UnknownFormat })?;
    if !is_supported(format) {
        return Err(ImageError::UnsupportedFormat(format!("{format:?}").to_uppercase()));
    }
    let (width, height) = match format {
        ImageFormat::Jpeg => jpeg::dimensions(bytes)?,
        ImageFormat::Tiff => tiff_dimensions(bytes)?,
        ImageFormat::Pnm => pnm::dimensions(bytes)?,
        _ => header_dimensions(bytes, format)?,
    };
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 {
        return Err(ImageError::ZeroSize);
    }
    if pixels > max_pixels {
        return Err(ImageError::TooManyPixels { width, height, pixels, max: max_pixels });
    }
    Ok((format, width, height))
}

/// Runs a decoder on untrusted bytes: a panic in it costs one image, refused as corrupt, not the
/// caller's thread.
fn guarded<T>(decode: impl FnOnce() -> T) -> Result<T, ImageError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)).map_err(|_| ImageError::Corrupt("the decoder failed on this file".into()))
}

/// A TIFF's size, read by [`tiff`] (the image crate's TIFF support is not built in).
fn tiff_dimensions(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    guarded(|| tiff::dimensions(bytes))?
}

/// The size of an image in another format, read by the image crate within the metadata limit.
fn header_dimensions(bytes: &[u8], format: ImageFormat) -> Result<(u32, u32), ImageError> {
    let mut header = ImageReader::with_format(Cursor::new(bytes), format);
    let mut header_limits = Limits::default();
    header_limits.max_alloc = Some(MAX_METADATA_BYTES);
    header.limits(header_limits);
    guarded(|| header.into_dimensions())?.map_err(|e| match e {
        image::ImageError::Limits(_) => ImageError::MetadataTooLarge,
        e => ImageError::Corrupt(e.to_string()),
    })
}

/// Decodes an image whose header [`dimensions`] has accepted. A JPEG is read by libjpeg-turbo's
/// decoder, as Pillow reads it ([`jpeg`]), once its structure is checked (one cut short is
/// refused, as Pillow refuses it); a TIFF by [`tiff`], a Netpbm image by [`pnm`], a 16-bit BMP
/// by [`bmp`]; the others by the image crate.
fn decode_checked(bytes: &[u8], format: ImageFormat, width: u32, height: u32) -> Result<RgbImage, ImageError> {
    match format {
        ImageFormat::Jpeg => {
            // Our segment walks see untrusted bytes too.
            let (rgb, orientation) = guarded(|| -> Result<_, ImageError> {
                jpeg::check_structure(bytes)?;
                Ok((jpeg::decode(bytes, width, height)?, jpeg::orientation(bytes)))
            })??;
            return Ok(upright(rgb, orientation));
        }
        ImageFormat::Tiff => {
            let (rgb, orientation) = guarded(|| tiff::decode(bytes, width, height))??;
            return Ok(upright(rgb, orientation));
        }
        // No orientation: neither format has metadata.
        ImageFormat::Pnm => return guarded(|| pnm::decode(bytes, width, height))?,
        ImageFormat::Bmp if bmp::is_16_bit(bytes) => return guarded(|| bmp::decode_16(bytes, width, height))?,
        _ => {}
    }
    let pixels = u64::from(width) * u64::from(height);
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    // Room for the decoded frame at 16 bits per channel with alpha, plus the metadata allowance
    // (decoders that count their allocations, as the PNG one does, stay within it).
    limits.max_alloc = Some(pixels * 8 + MAX_METADATA_BYTES);
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    reader.limits(limits);
    let (decoded, orientation) = guarded(|| -> image::ImageResult<_> {
        let mut decoder = reader.into_decoder()?;
        // Metadata that cannot be read leaves the pixels as stored, as Pillow's `exif_transpose`
        // does with an orientation it does not know.
        let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
        Ok((DynamicImage::from_decoder(decoder)?, orientation))
    })?
    .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    let decoded = high_bytes(decoded);
    let rgb = if decoded.color().has_alpha() { composite_on_white(&decoded.into_rgba8()) } else { decoded.into_rgb8() };
    Ok(upright(rgb, orientation))
}

/// A 16-bit image reduced to 8 bits by keeping each sample's high byte, as Pillow reads a 16-bit
/// PNG (its `RGB;16B` unpackers), so that such images reach the model as they reach it through
/// `transformers`; the image crate would round (`v / 257`), one level off for some samples.
/// (Pillow opens 16-bit grey without alpha as `I;16`, which its RGB conversion clips to
/// 0–255, washing out the picture; that one we read by the high byte too, as the picture is
/// meant.) Other images pass unchanged. The 8-bit copy costs half the 16-bit frame at most,
/// within [`decode_cost`].
fn high_bytes(image: DynamicImage) -> DynamicImage {
    fn high<P: image::Pixel<Subpixel = u8>>(width: u32, height: u32, samples: Vec<u16>) -> ImageBuffer<P, Vec<u8>> {
        let bytes = samples.into_iter().map(|v| (v >> 8) as u8).collect();
        ImageBuffer::from_raw(width, height, bytes).expect("as many samples as the 16-bit frame had")
    }
    let (width, height) = (image.width(), image.height());
    match image {
        DynamicImage::ImageLuma16(b) => DynamicImage::ImageLuma8(high(width, height, b.into_raw())),
        DynamicImage::ImageLumaA16(b) => DynamicImage::ImageLumaA8(high(width, height, b.into_raw())),
        DynamicImage::ImageRgb16(b) => DynamicImage::ImageRgb8(high(width, height, b.into_raw())),
        DynamicImage::ImageRgba16(b) => DynamicImage::ImageRgba8(high(width, height, b.into_raw())),
        other => other,
    }
}

/// The image as it is meant to be seen: turned and mirrored as its EXIF orientation says (a
/// phone's portrait photo is stored sideways with orientation 6). `transformers`' `load_image`,
/// which its pipelines use, does the same (`PIL.ImageOps.exif_transpose`), and so does every
/// browser and image viewer. Done on the 8-bit image, so that it costs one 3-byte frame more at
/// most, within [`decode_cost`].
///
/// Our own loops rather than the image crate's `apply_orientation`, which turned a 12-megapixel
/// photo more slowly than libjpeg-turbo decodes it (`examples/prepare_time.rs`; figures in
/// `bench/RESULTS.md`, "Phone photos at `/predict`").
fn upright(rgb: RgbImage, orientation: Orientation) -> RgbImage {
    // Where the upright image's pixel (x, y) comes from in the stored image: its coordinates
    // swapped (a quarter turn), then mirrored across either axis.
    let (swap, mirror_x, mirror_y) = match orientation {
        Orientation::NoTransforms => return rgb,
        Orientation::FlipHorizontal => (false, true, false), // EXIF 2
        Orientation::Rotate180 => (false, true, true),       // 3
        Orientation::FlipVertical => (false, false, true),   // 4
        Orientation::Rotate90FlipH => (true, false, false),  // 5
        Orientation::Rotate90 => (true, false, true),        // 6
        Orientation::Rotate270FlipH => (true, true, true),   // 7
        Orientation::Rotate270 => (true, true, false),       // 8
    };
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let (out_w, out_h) = if swap { (h, w) } else { (w, h) };
    let stored = rgb.as_raw();
    let mut out = vec![0u8; stored.len()];
    // The stored index, along an axis of `along` pixels, of index `i`: counted from the far end
    // when mirrored.
    let stored_index = |i: usize, mirrored: bool, along: usize| if mirrored { along - 1 - i } else { i };
    if !swap {
        for (y, upright_row) in out.chunks_exact_mut(w * 3).enumerate() {
            let from = stored_index(y, mirror_y, h);
            let stored_row = &stored[from * w * 3..(from + 1) * w * 3];
            if mirror_x {
                for (pixel, source) in upright_row.chunks_exact_mut(3).zip(stored_row.chunks_exact(3).rev()) {
                    pixel.copy_from_slice(source);
                }
            } else {
                upright_row.copy_from_slice(stored_row);
            }
        }
    } else {
        // A quarter turn: row y of the upright image is column `stored_index(y, mirror_x, w)` of the
        // stored one, read down its rows (up them when mirrored across the other axis). In
        // strips of 64 upright columns, so that the 64 stored rows a strip reads stay in the
        // cache all the way down it.
        const TILE: usize = 64;
        for x0 in (0..out_w).step_by(TILE) {
            let x1 = (x0 + TILE).min(out_w);
            // The stored rows this tile column reads, in the upright image's x order.
            let rows: Vec<&[u8]> = (x0..x1).map(|x| stored_index(x, mirror_y, h)).map(|r| &stored[r * w * 3..(r + 1) * w * 3]).collect();
            for y in 0..out_h {
                let column = stored_index(y, mirror_x, w) * 3;
                let upright_row = &mut out[(y * out_w + x0) * 3..(y * out_w + x1) * 3];
                for (pixel, stored_row) in upright_row.chunks_exact_mut(3).zip(&rows) {
                    pixel.copy_from_slice(&stored_row[column..column + 3]);
                }
            }
        }
    }
    RgbImage::from_raw(out_w as u32, out_h as u32, out).expect("the same number of pixels, turned")
}

/// CMYK ink amounts (0 is no ink) to RGB as Pillow converts them (`cmyk2rgb` in `Convert.c`:
/// each channel is `(255 - k) - (c × (255 - k)) / 255`, rounded as its `MULDIV255`).
fn cmyk_to_rgb(cmyk: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = cmyk.map(u32::from);
    let nk = 255 - k;
    let muldiv255 = |a: u32| {
        let t = a * nk + 128;
        ((t >> 8) + t) >> 8
    };
    [c, m, y].map(|v| (nk - muldiv255(v)) as u8)
}

/// `Image.alpha_composite(white, img).convert("RGB")` with Pillow's exact integer arithmetic
/// (`AlphaComposite.c` with an opaque white destination).
pub fn composite_on_white(rgba: &RgbaImage) -> RgbImage {
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = u32::from(p[3]);
        let blend = |c: u8| -> u8 {
            if a == 0 {
                return 255;
            }
            let t = u32::from(c) * a * 128 + 255 * (255 - a) * 128 + (0x80 << 7);
            ((((t >> 8) + t) >> 8) >> 7) as u8
        };
        image::Rgb([blend(p[0]), blend(p[1]), blend(p[2])])
    })
}

/// For the decoders' tests: the images of a fixture folder, but for the PNGs of Pillow's pixels
/// beside them (`<name>.png`) and the files that must be refused (`refused-*`), are `count` and
/// each decodes to Pillow's pixels ([`differences_from_pillow`]).
#[cfg(test)]
#[track_caller]
fn assert_fixture_folder_decodes_as_pillow_does(folder: &std::path::Path, count: usize) {
    let mut files: Vec<_> = std::fs::read_dir(folder).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|p| p.extension().is_some_and(|e| e != "png") && !p.file_name().unwrap().to_string_lossy().starts_with("refused-"));
    files.sort();
    assert_eq!(files.len(), count, "{}", folder.display());
    let failures = differences_from_pillow(&files, folder);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// For the decoders' tests: how each of `files` decodes otherwise than to the pixels transformers
/// gets from it through Pillow, kept in `references` as `<name>.png`: one line a file that
/// differs or fails, none when every sample is Pillow's.
#[cfg(test)]
fn differences_from_pillow(files: &[std::path::PathBuf], references: &std::path::Path) -> Vec<String> {
    let mut failures = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let ours = match decode_rgb(&std::fs::read(file).unwrap(), 1 << 20) {
            Ok(ours) => ours,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let pillow = image::open(references.join(format!("{name}.png"))).unwrap().into_rgb8();
        if ours.dimensions() != pillow.dimensions() {
            failures.push(format!("{name}: {:?} against Pillow's {:?}", ours.dimensions(), pillow.dimensions()));
            continue;
        }
        let differing = ours.as_raw().iter().zip(pillow.as_raw()).filter(|(a, b)| a != b).count();
        if differing > 0 {
            let most = ours.as_raw().iter().zip(pillow.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            failures.push(format!("{name}: {differing} of {} samples differ from Pillow's (by up to {most})", ours.as_raw().len()));
        }
    }
    failures
}

/// The EXIF blocks the test binaries use too.
#[cfg(test)]
#[path = "../tests/support/exif.rs"]
mod test_exif;

#[cfg(test)]
mod tests {
    use image::{DynamicImage, ImageBuffer, Luma, Rgba};

    use super::*;

    fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_jpeg_cut_short_is_refused_and_bytes_after_its_end_do_not_matter() {
        let img = DynamicImage::ImageRgb8(ImageBuffer::from_fn(256, 192, |x, y| image::Rgb([x as u8, (y * 5) as u8, ((x ^ y) * 3) as u8])));
        let whole = encode(img, ImageFormat::Jpeg);
        assert_eq!(jpeg::check_structure(&whole), Ok(()));
        assert_eq!(decode_rgb(&whole, 1 << 20).unwrap().dimensions(), (256, 192));
        // Padding between two segments (some editors leave it; libjpeg skips it with a warning).
        let sos = whole.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let padded = [&whole[..sos], &[0u8; 7][..], &whole[sos..]].concat();
        assert_eq!(jpeg::check_structure(&padded), Ok(()), "stray bytes before a marker are skipped");
        let mut trailing = whole.clone();
        trailing.extend_from_slice(b"camera maker's notes");
        assert!(decode_rgb(&trailing, 1 << 20).is_ok(), "bytes after the end-of-image marker are ignored");
        // Progressive (several scans, tables between them) and with restart markers, whole and cut.
        for name in ["progressive.jpg", "restart-markers.jpg"] {
            // Read when the test runs, so the image build (which leaves tests/ out) needs no fixture.
            let file = &std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)).unwrap();
            assert_eq!(decode_rgb(file, 1 << 20).unwrap().dimensions(), (56, 40));
            assert!(jpeg::check_structure(&file[..file.len() * 2 / 3]).is_err());
        }
        // Cut in its scan (the decoder itself refuses a cut in the headers).
        for keep in [whole.len() - 2, whole.len() - 1, whole.len() * 3 / 4, whole.len() / 2] {
            let err = decode_rgb(&whole[..keep], 1 << 20).unwrap_err();
            assert!(matches!(&err, ImageError::Corrupt(m) if m.contains("cut short")), "{keep} of {} bytes: {err}", whole.len());
        }
    }

    #[test]
    fn grey_alpha_and_16_bit_become_rgb() {
        let grey16 = DynamicImage::ImageLuma16(ImageBuffer::from_pixel(3, 2, Luma([65535u16])));
        let rgb = decode_rgb(&encode(grey16, ImageFormat::Png), 100).unwrap();
        assert_eq!(rgb.dimensions(), (3, 2));
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        let rgba = DynamicImage::ImageRgba8(ImageBuffer::from_pixel(2, 2, Rgba([10u8, 20, 30, 0])));
        // Fully transparent pixels become white, as transformers' convert_to_rgb composites onto white.
        assert_eq!(decode_rgb(&encode(rgba.clone(), ImageFormat::Png), 100).unwrap().get_pixel(1, 1).0, [255, 255, 255]);
        assert_eq!(decode_rgb(&encode(rgba, ImageFormat::Gif), 100).unwrap().dimensions(), (2, 2));
        // 16 bits become 8 by the high byte, as Pillow reads a 16-bit PNG: 0x12FF is 0x12 (the
        // image crate's rounding would make it 0x13).
        let rgb16 = DynamicImage::ImageRgb16(ImageBuffer::from_pixel(2, 2, image::Rgb([0x12FFu16, 0x0080, 0xFFFF])));
        assert_eq!(decode_rgb(&encode(rgb16, ImageFormat::Png), 100).unwrap().get_pixel(1, 1).0, [0x12, 0x00, 0xFF]);
        let grey16 = DynamicImage::ImageLuma16(ImageBuffer::from_pixel(2, 2, Luma([0x80FFu16])));
        assert_eq!(decode_rgb(&encode(grey16, ImageFormat::Png), 100).unwrap().get_pixel(0, 1).0, [0x80; 3]);
        // With alpha, the high bytes are composited onto white: 0x12FF at alpha 0xFFFF stays 0x12.
        let rgba16 = DynamicImage::ImageRgba16(ImageBuffer::from_pixel(2, 2, image::Rgba([0x12FFu16, 0x12FF, 0x12FF, 0xFFFF])));
        assert_eq!(decode_rgb(&encode(rgba16, ImageFormat::Png), 100).unwrap().get_pixel(0, 0).0, [0x12; 3]);
    }

    use super::test_exif::orientation as exif_orientation;

    fn encode_with_exif(img: &RgbImage, format: ImageFormat, exif: Vec<u8>) -> Vec<u8> {
        use image::ImageEncoder;
        let mut out = Vec::new();
        let (w, h) = img.dimensions();
        let color = image::ExtendedColorType::Rgb8;
        match format {
            ImageFormat::Png => {
                let mut encoder = image::codecs::png::PngEncoder::new(&mut out);
                encoder.set_exif_metadata(exif).unwrap();
                encoder.write_image(img, w, h, color).unwrap();
            }
            ImageFormat::Jpeg => {
                let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95);
                encoder.set_exif_metadata(exif).unwrap();
                encoder.write_image(img, w, h, color).unwrap();
            }
            ImageFormat::WebP => {
                let mut encoder = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
                encoder.set_exif_metadata(exif).unwrap();
                encoder.write_image(img, w, h, color).unwrap();
            }
            other => unreachable!("{other:?}"),
        }
        out
    }

    /// For each EXIF orientation, the stored pixel that lands at (x, y) of the upright image of a
    /// stored image `w` × `h`: checked against `PIL.ImageOps.exif_transpose` (Pillow 13) by
    /// [`an_exif_orientation_is_applied_as_pillow_s_exif_transpose_does`].
    #[allow(clippy::type_complexity)]
    const EXIF_SOURCE: [(u16, fn(u32, u32, u32, u32) -> (u32, u32)); 8] = [
        (1, |x, y, _, _| (x, y)),
        (2, |x, y, w, _| (w - 1 - x, y)),
        (3, |x, y, w, h| (w - 1 - x, h - 1 - y)),
        (4, |x, y, _, h| (x, h - 1 - y)),
        (5, |x, y, _, _| (y, x)),
        (6, |x, y, _, h| (y, h - 1 - x)),
        (7, |x, y, w, h| (w - 1 - y, h - 1 - x)),
        (8, |x, y, w, _| (w - 1 - y, x)),
    ];

    /// [`upright`] turns and mirrors images of every shape as [`EXIF_SOURCE`] says: one pixel,
    /// one row, one column, and sizes on, under and over its tiles of 64 pixels.
    #[test]
    fn every_orientation_turns_images_of_any_size() {
        for (w, h) in [(1, 1), (1, 70), (70, 1), (64, 64), (65, 130), (131, 63), (200, 3)] {
            // Each pixel holds its own coordinates (all under 256), so where it lands shows the turn.
            let stored = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
            for (orientation, from) in EXIF_SOURCE {
                let upright = upright(stored.clone(), Orientation::from_exif(orientation as u8).unwrap());
                let turned = orientation >= 5;
                assert_eq!(upright.dimensions(), if turned { (h, w) } else { (w, h) }, "{w}×{h} orientation {orientation}");
                for (x, y, pixel) in upright.enumerate_pixels() {
                    let (sx, sy) = from(x, y, w, h);
                    assert_eq!(pixel.0, [sx as u8, sy as u8, 7], "{w}×{h} orientation {orientation} at ({x}, {y})");
                }
            }
        }
    }

    #[test]
    fn an_exif_orientation_is_applied_as_pillow_s_exif_transpose_does() {
        // Each pixel holds its own coordinates, so where it lands shows the turn.
        let (w, h) = (3u32, 2u32);
        let stored = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        for format in [ImageFormat::Png, ImageFormat::WebP] {
            for (orientation, from) in EXIF_SOURCE {
                let upright = decode_rgb(&encode_with_exif(&stored, format, exif_orientation(orientation)), 100).unwrap();
                let turned = orientation >= 5;
                assert_eq!(upright.dimensions(), if turned { (h, w) } else { (w, h) }, "{format:?} orientation {orientation}");
                for (x, y, pixel) in upright.enumerate_pixels() {
                    let (sx, sy) = from(x, y, w, h);
                    assert_eq!(pixel.0, [sx as u8, sy as u8, 7], "{format:?} orientation {orientation} at ({x}, {y})");
                }
            }
        }
        // A phone's portrait JPEG: stored 64 wide and 32 high, with its top-left quarter red.
        let landscape = RgbImage::from_fn(64, 32, |x, y| if x < 32 && y < 16 { image::Rgb([255, 0, 0]) } else { image::Rgb([0, 0, 255]) });
        let portrait = decode_rgb(&encode_with_exif(&landscape, ImageFormat::Jpeg, exif_orientation(6)), 10_000).unwrap();
        assert_eq!(portrait.dimensions(), (32, 64));
        let [r, _, b] = portrait.get_pixel(24, 8).0; // turned a quarter clockwise: now top-right
        assert!(r > 200 && b < 60, "{:?}", portrait.get_pixel(24, 8));
        // An orientation out of range, and none at all, leave the pixels as stored.
        for exif in [exif_orientation(9), Vec::new()] {
            assert_eq!(decode_rgb(&encode_with_exif(&stored, ImageFormat::Png, exif), 100).unwrap(), stored);
        }
    }

    #[test]
    fn bad_inputs_are_refused_with_a_reason() {
        assert_eq!(decode_rgb(b"", 100), Err(ImageError::Empty));
        assert_eq!(decode_rgb(b"hello, world", 100), Err(ImageError::UnknownFormat));
        // An iPhone photo's first bytes: an ISO media file of brand `heic`.
        let heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic\0\0\0\0";
        assert_eq!(decode_rgb(heic, 100), Err(ImageError::UnsupportedFormat("HEIC/HEIF".into())));
        assert_eq!(decode_rgb(b"\0\0\0\x18ftypisom\0\0\0\0", 100), Err(ImageError::UnknownFormat), "an MP4 is not a HEIF");
        let avif = b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf";
        assert_eq!(decode_rgb(avif, 100).unwrap_err().to_string(), "unsupported image format AVIF (supported: JPEG, PNG, WebP, BMP, GIF, TIFF, PBM/PGM/PPM)");
        assert!(matches!(decode_rgb(b"II*\0\x08\0\0\0", 100), Err(ImageError::Corrupt(_))), "a TIFF header alone");
        let png = encode(DynamicImage::new_rgb8(20, 10), ImageFormat::Png);
        assert!(matches!(decode_rgb(&png, 199), Err(ImageError::TooManyPixels { pixels: 200, .. })));
        assert!(matches!(decode_rgb(&png[..png.len() / 2], 1000), Err(ImageError::Corrupt(_))));
    }

    #[test]
    fn an_icc_profile_that_inflates_past_the_metadata_limit_is_dropped() {
        // A PNG with an iCCP chunk after its header, whose profile inflates to 64 MiB: the PNG
        // decoder stops inflating at the limit and drops the profile (we never use it); the
        // pixels still decode. The hostile-input corpus measures the memory this saves.
        let png = encode(DynamicImage::new_rgb8(4, 4), ImageFormat::Png);
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut zlib, &vec![0u8; 64 << 20]).unwrap();
        let mut chunk = b"icc\0\0".to_vec();
        chunk.extend(zlib.finish().unwrap());
        let mut crc = flate2::Crc::new();
        crc.update(b"iCCP");
        crc.update(&chunk);
        let mut bomb = png[..33].to_vec();
        bomb.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        bomb.extend_from_slice(b"iCCP");
        bomb.extend_from_slice(&chunk);
        bomb.extend_from_slice(&crc.sum().to_be_bytes());
        bomb.extend_from_slice(&png[33..]);
        assert_eq!(decode_rgb(&bomb, 100).unwrap().dimensions(), (4, 4));
    }
}
