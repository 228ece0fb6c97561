//! TIFF pixels as Pillow reads them, and so as `transformers` feeds them to a model.
//!
//! Read with the `tiff` crate (the image-rs project's decoder: strips and tiles, chunky and
//! planar, uncompressed, PackBits, LZW, Deflate and Zstandard, with or without the horizontal
//! predictor, CCITT fax, either byte order), its samples are then made RGB here with Pillow's
//! rules: 16 bits by each sample's high byte, bilevel and 2- and 4-bit grey scaled to 0–255,
//! CMYK with Pillow's integer `cmyk2rgb`, samples of no stated meaning (ExtraSamples 0) ignored,
//! premultiplied alpha divided out as Pillow's `RGBa` unpacker does, and alpha composited onto
//! white as `transformers`' `convert_to_rgb` does. (The image crate's own TIFF support rounds
//! CMYK otherwise and refuses grey with alpha.) Palette colours are looked up in the file's
//! colour map by each entry's high byte, as Pillow does ([`Source`] hands the indices over).
//! JPEG-compressed strips and tiles are decoded by libjpeg-turbo ([`jpeg_chunks`]). The first
//! image of a file of several is the one read, as Pillow opens it. Kinds Pillow or this module
//! do not read (floating-point or signed samples, 16-bit palettes, 12- and 32-bit samples,
//! uncompressed YCbCr, CIELab, old-style JPEG, bits filled least significant first) are refused
//! by name before any pixel is decoded.

use std::io::{Cursor, Read, Seek, SeekFrom};

use image::metadata::Orientation;
use image::RgbImage;
use tiff::decoder::{Decoder, Limits};
use tiff::tags::{PhotometricInterpretation, SampleFormat, Tag};
use tiff::{ColorType, TiffError};

use super::{MAX_METADATA_BYTES, ImageError};

/// What a TIFF's samples are, once [`open`] has accepted them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One grey sample of 1, 2, 4, 8 or 16 bits (white-is-zero already inverted by the decoder).
    Grey(u8),
    /// Grey and alpha, 8 or 16 bits each.
    GreyAlpha(u8, Alpha),
    /// Grey and a second sample of no stated meaning (ExtraSamples 0), 8 or 16 bits each: the
    /// second is ignored, as Pillow's `LX` does.
    GreyExtra(u8),
    /// 8 or 16 bits each.
    Rgb(u8),
    Rgba(u8, Alpha),
    /// 8 or 16 bits each, ink amounts (0 is no ink).
    Cmyk(u8),
    /// JPEG-compressed strips or tiles of 8-bit grey (one sample), RGB or YCbCr (three).
    Jpeg(Photometric),
    /// Indices of 1, 2, 4 or 8 bits into the file's colour map, alone or (8 bits) with a second
    /// sample.
    Palette(u8, Extra),
}

/// What a palette TIFF's second sample is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extra {
    /// There is none.
    None,
    /// Of no stated meaning (ExtraSamples 0): Pillow ignores it (its `PX` raw mode).
    Ignored,
    /// Alpha, not premultiplied (ExtraSamples 2): Pillow's `PA`.
    Alpha,
}

/// What the components of a JPEG-compressed TIFF's strips hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Photometric {
    Grey,
    Rgb,
    /// Converted to RGB by libjpeg, as libtiff does for Pillow (`JPEGCOLORMODE_RGB`).
    YCbCr,
}

/// Whether colour samples are stored multiplied by their alpha (TIFF's "associated" alpha).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alpha {
    Straight,
    Premultiplied,
}

impl Kind {
    fn bits(self) -> u8 {
        match self {
            Kind::Grey(b) | Kind::GreyAlpha(b, _) | Kind::GreyExtra(b) | Kind::Rgb(b) | Kind::Rgba(b, _) | Kind::Cmyk(b) | Kind::Palette(b, _) => b,
            Kind::Jpeg(_) => 8,
        }
    }

    fn samples(self) -> usize {
        match self {
            Kind::Grey(_) | Kind::Jpeg(Photometric::Grey) | Kind::Palette(_, Extra::None) => 1,
            Kind::Jpeg(_) => 3,
            Kind::GreyAlpha(..) | Kind::GreyExtra(_) | Kind::Palette(..) => 2,
            Kind::Rgb(_) => 3,
            Kind::Rgba(..) | Kind::Cmyk(_) => 4,
        }
    }
}

/// The decoder, on a TIFF's bytes in memory.
type Reader<'a> = Decoder<Source<'a>>;

/// A TIFF's bytes as the decoder reads them, but for a palette TIFF's photometric tag, which
/// reads as grey (BlackIsZero): the `tiff` crate refuses palettes, and so hands over their
/// indices as grey samples, to be looked up here. Nothing is copied.
struct Source<'a> {
    bytes: Cursor<&'a [u8]>,
    /// Where the photometric tag's value is, and the value grey has in the file's byte order.
    grey: Option<(u64, [u8; 2])>,
}

impl Read for Source<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = self.bytes.position();
        let n = self.bytes.read(buf)?;
        if let Some((at, value)) = self.grey {
            for (i, byte) in (at..).zip(value) {
                if let Some(slot) = i.checked_sub(start).filter(|&o| o < n as u64) {
                    buf[slot as usize] = byte;
                }
            }
        }
        Ok(n)
    }
}

impl Seek for Source<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.bytes.seek(to)
    }
}

fn corrupt(e: TiffError) -> ImageError {
    match e {
        TiffError::UnsupportedError(e) => ImageError::Unsupported(format!("a TIFF the decoder does not read ({e})")),
        TiffError::LimitsExceeded => ImageError::MetadataTooLarge,
        e => ImageError::Corrupt(e.to_string()),
    }
}

/// Refuses a TIFF whose first directory (the only one read) has a tag declaring a value longer
/// than the whole file. Such a value cannot be there, and the `tiff` crate (0.11.3) prints a
/// debugging line to stderr when an ASCII one is longer than its limit, a line per hostile
/// upload in the service's log. Says where the photometric tag's value is, with the bytes of
/// grey for it, when it says palette colours: the [`Source`] to read the file through.
fn check_first_directory(bytes: &[u8]) -> Result<Source<'_>, ImageError> {
    let mut source = Source { bytes: Cursor::new(bytes), grey: None };
    let (le, big) = match bytes.get(..4) {
        Some(b"II*\0") => (true, false),
        Some(b"MM\0*") => (false, false),
        Some(b"II+\0") => (true, true),
        Some(b"MM\0+") => (false, true),
        _ => return Ok(source), // not a TIFF header: the decoder says what is wrong
    };
    let number = |at: usize, len: usize| -> Option<u64> {
        let b = bytes.get(at..at.checked_add(len)?)?;
        Some(b.iter().enumerate().fold(0u64, |n, (i, &byte)| n | u64::from(byte) << (8 * if le { i } else { len - 1 - i })))
    };
    let past_the_end = || ImageError::Corrupt("the TIFF's first directory lies past the end of the file".into());
    let (ifd, entries, entry_len, count_len) = if big {
        let ifd = number(8, 8).ok_or_else(past_the_end)? as usize;
        (ifd, number(ifd, 8).ok_or_else(past_the_end)?, 20, 8)
    } else {
        let ifd = number(4, 4).ok_or_else(past_the_end)? as usize;
        (ifd, number(ifd, 2).ok_or_else(past_the_end)?, 12, 4)
    };
    let first = ifd + if big { 8 } else { 2 };
    for entry in (0..entries.min(bytes.len() as u64 / entry_len)).map(|i| first + i as usize * entry_len as usize) {
        let (Some(kind), Some(count)) = (number(entry + 2, 2), number(entry + 4, count_len)) else { return Err(past_the_end()) };
        let size = match kind {
            3 | 8 => 2,
            4 | 9 | 11 | 13 => 4,
            5 | 10 | 12 | 16..=18 => 8,
            _ => 1,
        };
        let tag = number(entry, 2).unwrap_or_default();
        if count.saturating_mul(size) > bytes.len() as u64 {
            return Err(ImageError::Corrupt(format!("the TIFF's tag {tag} declares {count} values, more than the file holds")));
        }
        // One SHORT, stored in the entry itself (at the start of its value field).
        let value = entry + 4 + count_len;
        if tag == 262 && kind == 3 && count == 1 && number(value, 2) == Some(3) {
            source.grey = Some((value as u64, if le { [1, 0] } else { [0, 1] }));
        }
    }
    Ok(source)
}

/// A decoder on the first image of a TIFF whose kind is one we read, with its kind and, for a
/// palette, its colours ([`colour_map`]; none for other kinds).
fn open(bytes: &[u8]) -> Result<(Reader<'_>, Kind, Vec<[u8; 3]>), ImageError> {
    let source = check_first_directory(bytes)?;
    let palette = source.grey.is_some();
    let mut limits = Limits::default();
    limits.ifd_value_size = MAX_METADATA_BYTES as usize;
    // Compressed data is read a strip or tile at a time, and one cannot be longer than the file.
    limits.intermediate_buffer_size = bytes.len();
    let mut decoder = Decoder::new(source).map_err(corrupt)?.with_limits(limits);
    let unsupported = |what: &str| Err(ImageError::Unsupported(format!("a TIFF of {what}; save it as 8-bit RGB")));
    let format = decoder.find_tag_unsigned_vec::<u16>(Tag::SampleFormat).map_err(corrupt)?.unwrap_or_default();
    if let Some(&other) = format.iter().find(|&&f| SampleFormat::from_u16(f) != Some(SampleFormat::Uint)) {
        let what = match SampleFormat::from_u16(other) {
            Some(SampleFormat::IEEEFP) => "floating-point samples",
            Some(SampleFormat::Int) => "signed samples",
            _ => "samples of an unknown format",
        };
        return unsupported(what);
    }
    // Bits filled least significant first (fax machines' order), which the decoder would take the
    // other way round.
    if decoder.find_tag_unsigned::<u16>(Tag::FillOrder).map_err(corrupt)?.is_some_and(|order| order != 1) {
        return unsupported("bits filled least significant first (FillOrder 2)");
    }
    let photometric = decoder.find_tag_unsigned::<u16>(Tag::PhotometricInterpretation).map_err(corrupt)?;
    let extra = decoder.find_tag_unsigned_vec::<u16>(Tag::ExtraSamples).map_err(corrupt)?;
    let alpha = match extra.as_deref() {
        Some([1, ..]) => Alpha::Premultiplied,
        _ => Alpha::Straight,
    };
    let compression = decoder.find_tag_unsigned::<u16>(Tag::Compression).map_err(corrupt)?;
    if compression == Some(6) {
        return unsupported("old-style JPEG compression");
    }
    if palette {
        // Read as grey through the `Source`: one index, or two samples, as Pillow's raw modes
        // `P;1`, `P;2`, `P;4`, `P`, `PX` and `PA` take them.
        let kind = match decoder.colortype() {
            _ if compression == Some(7) => return unsupported("JPEG-compressed palette colours"),
            Ok(ColorType::Gray(bits @ (1 | 2 | 4 | 8))) => Kind::Palette(bits, Extra::None),
            Ok(ColorType::Multiband { bit_depth: 8, num_samples: 2 }) => match extra.as_deref() {
                Some([0]) => Kind::Palette(8, Extra::Ignored),
                Some([2]) => Kind::Palette(8, Extra::Alpha),
                _ => return unsupported("palette colours with premultiplied alpha"),
            },
            Ok(ColorType::Gray(bits)) => return unsupported(&format!("{bits}-bit palette colours")),
            Ok(_) => return unsupported("palette colours with extra samples"),
            Err(e) => return Err(corrupt(e)),
        };
        let colours = colour_map(&mut decoder, kind.bits())?;
        return Ok((decoder, kind, colours));
    }
    if compression == Some(7) {
        let planar = decoder.find_tag_unsigned::<u16>(Tag::PlanarConfiguration).map_err(corrupt)?.unwrap_or(1);
        let photometric = match (decoder.colortype(), photometric.and_then(PhotometricInterpretation::from_u16)) {
            _ if planar != 1 => return unsupported("JPEG-compressed planes"),
            (Ok(ColorType::Gray(8)), Some(PhotometricInterpretation::BlackIsZero)) => Photometric::Grey,
            (Ok(ColorType::RGB(8)), _) => Photometric::Rgb,
            (Ok(ColorType::YCbCr(8)), _) => Photometric::YCbCr,
            (Ok(other), _) => return unsupported(&format!("JPEG-compressed {}", describe(other))),
            (Err(e), _) => return Err(corrupt(e)),
        };
        return Ok((decoder, Kind::Jpeg(photometric), Vec::new()));
    }
    let kind = match decoder.colortype() {
        Ok(ColorType::Gray(bits @ (1 | 2 | 4 | 8 | 16))) => Kind::Grey(bits),
        Ok(ColorType::Multiband { bit_depth: bits @ (8 | 16), num_samples: 2 })
            if photometric.and_then(PhotometricInterpretation::from_u16) == Some(PhotometricInterpretation::BlackIsZero) =>
        {
            if extra.as_deref() == Some(&[0]) { Kind::GreyExtra(bits) } else { Kind::GreyAlpha(bits, alpha) }
        }
        Ok(ColorType::RGB(bits @ (8 | 16))) => Kind::Rgb(bits),
        Ok(ColorType::RGBA(bits @ (8 | 16))) => Kind::Rgba(bits, alpha),
        Ok(ColorType::CMYK(bits @ (8 | 16))) => Kind::Cmyk(bits),
        Ok(other) => return unsupported(&describe(other)),
        Err(TiffError::UnsupportedError(_)) => {
            return match photometric.and_then(PhotometricInterpretation::from_u16) {
                // A palette whose photometric tag is not one SHORT, which the `Source` leaves.
                Some(PhotometricInterpretation::RGBPalette) => unsupported("palette colours"),
                Some(other) => unsupported(&format!("{other:?} samples")),
                None => unsupported("an unknown photometric interpretation"),
            };
        }
        Err(e) => return Err(corrupt(e)),
    };
    Ok((decoder, kind, Vec::new()))
}

/// A palette TIFF's colours, one for each of its 2^`bits` indices. Its colour map holds all the
/// reds, then all the greens, then all the blues, of 16 bits each, of which Pillow keeps the high
/// byte. Writers keep 2^`bits` colours there, or (tifffile) 256 whatever the bits: Pillow takes
/// a third of the map for each, and so does this.
fn colour_map(decoder: &mut Reader<'_>, bits: u8) -> Result<Vec<[u8; 3]>, ImageError> {
    let Some(map) = decoder.find_tag_unsigned_vec::<u16>(Tag::ColorMap).map_err(corrupt)? else {
        return Err(ImageError::Corrupt("the TIFF's palette has no colour map".into()));
    };
    let (colours, each) = (1usize << bits, map.len() / 3);
    if map.len() % 3 != 0 || each < colours || each > 256 {
        return Err(ImageError::Corrupt(format!(
            "the TIFF's colour map has {} values, where its {bits}-bit indices need from 3 × {colours} to 3 × 256",
            map.len()
        )));
    }
    Ok((0..colours).map(|i| [0, 1, 2].map(|c| (map[c * each + i] >> 8) as u8)).collect())
}

/// What a TIFF's samples are, in words, for a refusal.
fn describe(colour: ColorType) -> String {
    match colour {
        ColorType::Gray(bits) => format!("{bits}-bit grey samples"),
        ColorType::RGB(bits) => format!("{bits}-bit RGB samples"),
        ColorType::RGBA(bits) => format!("{bits}-bit RGBA samples"),
        ColorType::CMYK(bits) => format!("{bits}-bit CMYK samples"),
        ColorType::CMYKA(bits) => format!("{bits}-bit CMYK samples with alpha"),
        ColorType::YCbCr(bits) => format!("{bits}-bit YCbCr samples"),
        ColorType::Lab(_) => "CIELab samples".into(),
        ColorType::Palette(_) => "palette colours".into(),
        ColorType::Multiband { bit_depth, num_samples } => format!("{num_samples} samples of {bit_depth} bits a pixel"),
        other => format!("{other:?} samples"),
    }
}

/// The size of a TIFF's first image, once its kind is known to be one we read.
pub(super) fn dimensions(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    let (mut decoder, ..) = open(bytes)?;
    decoder.dimensions().map_err(corrupt)
}

/// Decodes the first image of a TIFF whose size [`dimensions`] gave as `width` × `height` to
/// 8-bit RGB with Pillow's rules, with its orientation tag. Holds at most 8 bytes a pixel of
/// samples (16-bit RGBA), then 4 more for RGBA to composite, within `decode_cost`.
pub(super) fn decode(bytes: &[u8], width: u32, height: u32) -> Result<(RgbImage, Orientation), ImageError> {
    let (mut decoder, kind, colours) = open(bytes)?;
    if decoder.dimensions().map_err(corrupt)? != (width, height) {
        return Err(ImageError::Corrupt("the TIFF's size changed between reads".into()));
    }
    let orientation = decoder
        .find_tag_unsigned::<u16>(Tag::Orientation)
        .ok()
        .flatten()
        .and_then(|v| Orientation::from_exif(u8::try_from(v).ok()?))
        .unwrap_or(Orientation::NoTransforms);
    if let Kind::Jpeg(photometric) = kind {
        return Ok((jpeg_chunks(&mut decoder, bytes, photometric, width, height)?, orientation));
    }
    let layout = decoder.image_buffer_layout().map_err(corrupt)?;
    let pixels = width as usize * height as usize;
    let row = (width as usize * kind.samples() * usize::from(kind.bits())).div_ceil(8);
    let plane_row = if layout.planes > 1 { row / kind.samples() } else { row };
    if (layout.planes != 1 && layout.planes != kind.samples())
        || layout.row_stride.map_or(0, |s| s.get()) != plane_row
        || layout.complete_len > pixels * 8
    {
        return Err(ImageError::Corrupt(format!("the TIFF's layout ({} planes) does not match its samples", layout.planes)));
    }
    let mut raw = vec![0u8; layout.complete_len];
    decoder.read_image_bytes(&mut raw).map_err(|e| match e {
        // The only limit left to reach: a strip or tile longer than the whole file.
        TiffError::LimitsExceeded => ImageError::Corrupt("the TIFF's strips or tiles run past the end of the file".into()),
        e => corrupt(e),
    })?;
    drop(decoder);
    if kind == Kind::Rgb(8) && layout.planes == 1 {
        // Already 8-bit RGB, row after row (the commonest TIFF): the samples are the image.
        raw.truncate(pixels * 3);
        return RgbImage::from_raw(width, height, raw).map(|rgb| (rgb, orientation)).ok_or_else(|| ImageError::Corrupt("the TIFF's samples end early".into()));
    }
    let samples = Samples { raw: &raw, kind, row, planes: layout.planes, plane: layout.plane_stride.map_or(0, |s| s.get()) };
    let rgb = match kind {
        Kind::Palette(_, extra) => {
            let colour = |x, y| colours[usize::from(samples.stored(x, y, 0))];
            if extra != Extra::Alpha {
                RgbImage::from_fn(width, height, |x, y| image::Rgb(colour(x, y)))
            } else {
                let rgba = image::RgbaImage::from_fn(width, height, |x, y| {
                    let [r, g, b] = colour(x, y);
                    image::Rgba([r, g, b, samples.stored(x, y, 1) as u8])
                });
                drop(raw);
                return Ok((super::composite_on_white(&rgba), orientation));
            }
        }
        Kind::Grey(_) | Kind::GreyExtra(_) => RgbImage::from_fn(width, height, |x, y| {
            let v = samples.get(x, y, 0);
            image::Rgb([v, v, v])
        }),
        Kind::Jpeg(_) => unreachable!("decoded above"),
        Kind::Rgb(_) => RgbImage::from_fn(width, height, |x, y| image::Rgb([0, 1, 2].map(|c| samples.get(x, y, c)))),
        Kind::Cmyk(_) => RgbImage::from_fn(width, height, |x, y| image::Rgb(super::cmyk_to_rgb([0, 1, 2, 3].map(|c| samples.get(x, y, c))))),
        Kind::GreyAlpha(_, alpha) | Kind::Rgba(_, alpha) => {
            let channels: [usize; 4] = if matches!(kind, Kind::GreyAlpha(..)) { [0, 0, 0, 1] } else { [0, 1, 2, 3] };
            let rgba = image::RgbaImage::from_fn(width, height, |x, y| {
                let [r, g, b, a] = channels.map(|c| samples.get(x, y, c));
                let [r, g, b] = if alpha == Alpha::Premultiplied { unpremultiply([r, g, b], a) } else { [r, g, b] };
                image::Rgba([r, g, b, a])
            });
            drop(raw);
            return Ok((super::composite_on_white(&rgba), orientation));
        }
    };
    Ok((rgb, orientation))
}

/// A JPEG-compressed TIFF decoded strip by strip (or tile by tile) with libjpeg-turbo, as
/// libtiff decodes it for Pillow: each strip is a JPEG, completed by the tables the file keeps
/// once (its `JPEGTables`: the strip's start-of-image marker replaced by them). RGB and grey
/// strips are taken as stored, YCbCr ones converted to RGB by libjpeg. (The `tiff` crate's own
/// JPEG support decodes with zune-jpeg, which rounds otherwise, and refuses subsampled YCbCr,
/// the kind libtiff writes by default.) Holds the RGB image and one decoded strip.
fn jpeg_chunks(decoder: &mut Reader<'_>, bytes: &[u8], photometric: Photometric, width: u32, height: u32) -> Result<RgbImage, ImageError> {
    let tag = |decoder: &mut Reader<'_>, tag| decoder.find_tag_unsigned_vec::<u64>(tag).map_err(corrupt);
    let tables = match decoder.find_tag(Tag::JPEGTables).map_err(corrupt)? {
        None => None,
        Some(value) => Some(value.into_u8_vec().map_err(corrupt)?),
    };
    if let Some(t) = &tables
        && (t.len() < 4 || t[..2] != [0xFF, 0xD8] || t[t.len() - 2..] != [0xFF, 0xD9])
    {
        return Err(ImageError::Corrupt("the TIFF's JPEG tables are not a JPEG stream".into()));
    }
    let (chunk_width, chunk_height, offsets, counts) = match tag(decoder, Tag::TileWidth)? {
        Some(tile_width) => {
            let tile_height = tag(decoder, Tag::TileLength)?.and_then(|v| v.first().copied()).unwrap_or(0);
            (tile_width.first().copied().unwrap_or(0), tile_height, tag(decoder, Tag::TileOffsets)?, tag(decoder, Tag::TileByteCounts)?)
        }
        None => {
            let rows = tag(decoder, Tag::RowsPerStrip)?.and_then(|v| v.first().copied()).unwrap_or(u64::from(height));
            (u64::from(width), rows.min(u64::from(height)), tag(decoder, Tag::StripOffsets)?, tag(decoder, Tag::StripByteCounts)?)
        }
    };
    let (Some(offsets), Some(counts)) = (offsets, counts) else {
        return Err(ImageError::Corrupt("the TIFF has no strip or tile offsets".into()));
    };
    if chunk_width == 0 || chunk_height == 0 {
        return Err(ImageError::Corrupt("the TIFF's strips or tiles have no size".into()));
    }
    let across = u64::from(width).div_ceil(chunk_width);
    let down = u64::from(height).div_ceil(chunk_height);
    if offsets.len() as u64 != across * down || counts.len() != offsets.len() {
        return Err(ImageError::Corrupt(format!("the TIFF has {} strips or tiles where its size needs {}", offsets.len(), across * down)));
    }
    // Each strip or tile costs a JPEG decoder's start-up however few pixels it holds (some
    // microseconds): a file of millions of one-row strips of one image would take minutes. Real
    // ones hold 8 rows or a 16×16 tile at the least.
    let most = u64::from(width) * u64::from(height) / 256 + 4096;
    if offsets.len() as u64 > most {
        return Err(ImageError::Corrupt(format!("the TIFF has {} JPEG strips or tiles, more than the {most} its size allows", offsets.len())));
    }
    let output = if photometric == Photometric::YCbCr { super::jpeg::Output::Rgb } else { super::jpeg::Output::Stored };
    let components = Kind::Jpeg(photometric).samples();
    let pixels = u64::from(width) * u64::from(height);
    let mut rgb = RgbImage::new(width, height);
    for (index, (&offset, &count)) in offsets.iter().zip(&counts).enumerate() {
        let data = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(count).ok())
            .and_then(|(start, count)| bytes.get(start..start.checked_add(count)?))
            .ok_or_else(|| ImageError::Corrupt(format!("the TIFF's strip or tile {index} runs past the end of the file")))?;
        let stream: std::borrow::Cow<[u8]> = match &tables {
            Some(tables) if data.starts_with(&[0xFF, 0xD8]) => [&tables[..tables.len() - 2], &data[2..]].concat().into(),
            Some(_) => return Err(ImageError::Corrupt(format!("the TIFF's strip or tile {index} is not a JPEG stream"))),
            None => data.into(),
        };
        super::jpeg::check_structure(&stream)?;
        // The part of the image this chunk covers (tiles at the right and bottom edges, and the
        // last strip, reach past it; libtiff writes the last strip's JPEG only as high as the
        // rows left, tiles whole).
        let (x0, y0) = ((index as u64 % across) * chunk_width, (index as u64 / across) * chunk_height);
        let (cover_width, cover_height) = ((u64::from(width) - x0).min(chunk_width), (u64::from(height) - y0).min(chunk_height));
        let mut jpeg_width = 0;
        let samples = super::jpeg::decode_samples(&stream, output, |w, h, n| {
            jpeg_width = w;
            let (w, h) = (w as u64, h as u64);
            if n != components || w < cover_width || h < cover_height || w > chunk_width || h > chunk_height {
                return Err(ImageError::Corrupt(format!(
                    "the TIFF's strip or tile {index} is a {w}×{h} JPEG of {n} components, where {cover_width}×{cover_height} of {components} are needed"
                )));
            }
            // A tile may reach past the image, but decoding it (its samples, and libjpeg's
            // coefficients for a progressive one: about 9 bytes a pixel) must fit in what
            // `decode_cost` leaves beside the RGB image, however large the tiles claim to be.
            if w * h > pixels + MAX_METADATA_BYTES / 9 {
                return Err(ImageError::Corrupt(format!("the TIFF's tile {index} is {w}×{h} pixels, far larger than the image")));
            }
            Ok(())
        })?;
        let per_pixel = if output == super::jpeg::Output::Rgb { 3 } else { components };
        for y in 0..cover_height as usize {
            for x in 0..cover_width as usize {
                let at = (y * jpeg_width + x) * per_pixel;
                let pixel = if per_pixel == 1 { [samples[at]; 3] } else { [samples[at], samples[at + 1], samples[at + 2]] };
                rgb.put_pixel(x0 as u32 + x as u32, y0 as u32 + y as u32, image::Rgb(pixel));
            }
        }
    }
    Ok(rgb)
}

/// Colour samples stored multiplied by their alpha, divided back as Pillow's `RGBa` unpacker does
/// (`Unpack.c`): truncating, and all zero where alpha is.
fn unpremultiply(colour: [u8; 3], alpha: u8) -> [u8; 3] {
    match alpha {
        0 => [0; 3],
        255 => colour,
        a => colour.map(|c| (u32::from(c) * 255 / u32::from(a)).min(255) as u8),
    }
}

/// A TIFF's decoded samples, read as 8-bit values the way Pillow reads them.
struct Samples<'a> {
    raw: &'a [u8],
    kind: Kind,
    /// Bytes in one row of one plane (all samples when chunky).
    row: usize,
    planes: usize,
    /// Bytes from one plane to the next.
    plane: usize,
}

impl Samples<'_> {
    /// Sample `c` of pixel (`x`, `y`) as 8 bits: a 16-bit one by its high byte (Pillow's `;16`
    /// unpackers), 1-, 2- and 4-bit grey scaled to 0–255 as Pillow's `1`, `L;2` and `L;4` do.
    fn get(&self, x: u32, y: u32, c: usize) -> u8 {
        match self.kind.bits() {
            bits @ (1 | 2 | 4) => {
                let max = (1u16 << bits) - 1;
                (self.stored(x, y, c) * 255 / max) as u8
            }
            _ => self.stored(x, y, c) as u8,
        }
    }

    /// Sample `c` of pixel (`x`, `y`) as stored, but for a 16-bit one, which is its high byte:
    /// for packed samples (1, 2 or 4 bits, one a pixel), the value of those bits.
    fn stored(&self, x: u32, y: u32, c: usize) -> u16 {
        let (x, y) = (x as usize, y as usize);
        let samples = self.kind.samples();
        let (base, index) = if self.planes > 1 {
            (c * self.plane + y * (self.row / samples), x)
        } else {
            (y * self.row, x * samples + c)
        };
        match self.kind.bits() {
            8 => u16::from(self.raw[base + index]),
            16 => {
                let at = base + 2 * index;
                u16::from_ne_bytes([self.raw[at], self.raw[at + 1]]) >> 8
            }
            bits => {
                // Packed, most significant bits first; one sample a pixel.
                debug_assert_eq!(samples, 1);
                let bit = index * usize::from(bits);
                let byte = self.raw[base + bit / 8];
                u16::from(byte >> (8 - usize::from(bits) - bit % 8)) & ((1 << bits) - 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn fixtures() -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiff")
    }

    /// TIFFs as Pillow, tifffile and scanners write them (compressions, byte orders, tiles,
    /// planes, bit depths, alpha straight and premultiplied, samples of no stated meaning, CMYK,
    /// palettes, orientation, several pages), decoded sample for sample as transformers gets them
    /// from Pillow (`tests/fixtures/make_tiff_refs.py` wrote the references, and says which four
    /// are not Pillow's own).
    #[test]
    fn every_kind_of_tiff_decodes_to_pillow_s_pixels() {
        super::super::assert_fixture_folder_decodes_as_pillow_does(&fixtures(), 45);
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(fixtures().join(name)).unwrap()
    }

    fn decode(bytes: &[u8]) -> Result<RgbImage, ImageError> {
        super::super::decode_rgb(bytes, 1 << 20)
    }

    /// `bytes` (a little-endian TIFF) with the single value of `tag` in its first directory
    /// set to `value`.
    fn with_tag(bytes: &[u8], tag: u16, value: u32) -> Vec<u8> {
        let mut bytes = bytes.to_vec();
        let word = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        assert_eq!(&bytes[..4], b"II*\0");
        let ifd = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        let entry = (0..usize::from(word(&bytes, ifd)))
            .map(|i| ifd + 2 + 12 * i)
            .find(|&at| word(&bytes, at) == tag)
            .unwrap_or_else(|| panic!("no tag {tag}"));
        assert_eq!(u32::from_le_bytes(bytes[entry + 4..entry + 8].try_into().unwrap()), 1, "tag {tag} has one value");
        match word(&bytes, entry + 2) {
            3 => bytes[entry + 8..entry + 10].copy_from_slice(&u16::try_from(value).unwrap().to_le_bytes()),
            4 => bytes[entry + 8..entry + 12].copy_from_slice(&value.to_le_bytes()),
            other => panic!("tag {tag} is of type {other}"),
        }
        bytes
    }

    fn unsupported(what: &str) -> Result<RgbImage, ImageError> {
        Err(ImageError::Unsupported(format!("a TIFF of {what}; save it as 8-bit RGB")))
    }

    /// Kinds neither Pillow nor this module read, or that this module does not, are refused by
    /// what they are, from the header, before any pixel is decoded.
    #[test]
    fn kinds_it_does_not_read_are_refused_by_name() {
        assert_eq!(decode(&fixture("refused-palette16.tif")), unsupported("16-bit palette colours"));
        assert_eq!(decode(&fixture("refused-palette-premultiplied.tif")), unsupported("palette colours with premultiplied alpha"));
        assert_eq!(decode(&with_tag(&fixture("jpeg-grey.tif"), 262, 3)), unsupported("JPEG-compressed palette colours"));
        assert_eq!(decode(&fixture("refused-float.tif")), unsupported("floating-point samples"));
        assert_eq!(decode(&fixture("refused-int16.tif")), unsupported("signed samples"));
        // Old-style JPEG (compression 6), which TIFF 6.0 itself retired.
        assert_eq!(decode(&with_tag(&fixture("rgb-jpeg.tif"), 259, 6)), unsupported("old-style JPEG compression"));
        assert_eq!(decode(&fixture("refused-fillorder.tif")), unsupported("bits filled least significant first (FillOrder 2)"));
        assert_eq!(decode(&with_tag(&fixture("l16.tif"), 258, 12)), unsupported("12-bit grey samples"));
        // CIELab (photometric 8), and a photometric interpretation no one defined.
        assert_eq!(decode(&with_tag(&fixture("rgb.tif"), 262, 8)), unsupported("CIELab samples"));
        assert!(matches!(decode(&with_tag(&fixture("rgb.tif"), 262, 99)), Err(ImageError::Unsupported(_) | ImageError::Corrupt(_))));
        // The refusal names the format it is in, for the dataset's `rejected` list.
        assert_eq!(
            decode(&fixture("refused-float.tif")).unwrap_err().to_string(),
            "unsupported image: a TIFF of floating-point samples; save it as 8-bit RGB"
        );
    }

    /// A TIFF declaring more pixels than allowed is refused from its header, before its strips
    /// are read or any pixel buffer allocated.
    /// `bytes` (a little-endian TIFF) with the entry of `tag` in its first directory changed by
    /// `change` (its 12 bytes: tag, type, count, value).
    fn with_entry(bytes: &[u8], tag: u16, change: impl Fn(&mut [u8])) -> Vec<u8> {
        let mut bytes = bytes.to_vec();
        let ifd = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        let entry = (0..usize::from(u16::from_le_bytes([bytes[ifd], bytes[ifd + 1]])))
            .map(|i| ifd + 2 + 12 * i)
            .find(|&at| u16::from_le_bytes([bytes[at], bytes[at + 1]]) == tag)
            .unwrap_or_else(|| panic!("no tag {tag}"));
        change(&mut bytes[entry..entry + 12]);
        bytes
    }

    /// A palette TIFF's colour map must hold a colour for each index, as Pillow reads it (a
    /// third of the map each for red, green and blue, up to 256 colours); one that does not is
    /// refused as corrupt, not read with colours made up.
    #[test]
    fn a_palette_s_colour_map_must_cover_its_indices() {
        let count = |n: u32| move |entry: &mut [u8]| entry[4..8].copy_from_slice(&n.to_le_bytes());
        let palette4 = fixture("palette4.tif");
        for (values, why) in [(45, "too few for 16 colours"), (47, "not three of each"), (3 * 257, "more than 256 colours")] {
            let damaged = with_entry(&palette4, 320, count(values));
            assert!(matches!(decode(&damaged), Err(ImageError::Corrupt(_))), "{values} values ({why}): {:?}", decode(&damaged).map(|i| i.dimensions()));
        }
        assert_eq!(
            decode(&with_entry(&palette4, 320, count(45))).unwrap_err().to_string(),
            "corrupt or truncated image: the TIFF's colour map has 45 values, where its 4-bit indices need from 3 × 16 to 3 × 256"
        );
        // No colour map at all (its entry made one of a tag that means nothing).
        let unmapped = with_entry(&palette4, 320, |entry| entry[..2].copy_from_slice(&65000u16.to_le_bytes()));
        assert_eq!(decode(&unmapped), Err(ImageError::Corrupt("the TIFF's palette has no colour map".into())));
        // 3 × 16 and 3 × 256 both read (`palette4-16-colours.tif` and `palette4.tif` against
        // Pillow's pixels above); so does any count between, a third each.
        assert!(decode(&with_entry(&palette4, 320, count(3 * 100))).is_ok());
    }

    #[test]
    fn a_tiff_over_the_pixel_limit_is_refused_from_its_header() {
        // One strip of 100,000 rows, as a scanner might write it.
        let huge = with_tag(&with_tag(&with_tag(&fixture("rgb.tif"), 256, 100_000), 257, 100_000), 278, 100_000);
        assert_eq!(
            decode(&huge),
            Err(ImageError::TooManyPixels { width: 100_000, height: 100_000, pixels: 10_000_000_000, max: 1 << 20 })
        );
        assert!(matches!(decode(&with_tag(&fixture("rgb.tif"), 256, 0)), Err(ImageError::Corrupt(_))));
    }

    /// Damage anywhere is refused as corrupt, never decoded into made-up pixels and never a
    /// panic: each file cut at 40 points, and its strips or tiles pointed past its end. (A cut
    /// that leaves every byte the picture needs, such as one into the padding of an
    /// uncompressed edge tile, decodes to the whole file's pixels.)
    #[test]
    fn damaged_tiffs_are_refused_as_corrupt() {
        for name in ["rgb.tif", "rgb-lzw.tif", "rgb-tiled.tif", "rgb-planar.tif", "1bit-group4.tif", "jpeg-ycbcr-strips.tif", "jpeg-ycbcr-tiles.tif"] {
            let whole = fixture(name);
            let pixels = decode(&whole).unwrap();
            for cut in (1..40).map(|i| whole.len() * i / 40) {
                match decode(&whole[..cut]) {
                    Err(ImageError::Corrupt(_) | ImageError::UnknownFormat) => {}
                    Ok(cut_pixels) => assert!(cut_pixels == pixels, "{name} cut at {cut}: other pixels"),
                    Err(e) => panic!("{name} cut at {cut}: {e:?}"),
                }
            }
        }
        let past_the_end = with_tag(&fixture("jpeg-grey.tif"), 273, 1 << 20);
        assert_eq!(decode(&past_the_end), Err(ImageError::Corrupt("the TIFF's strip or tile 0 runs past the end of the file".into())));
        assert!(matches!(decode(&with_tag(&fixture("rgb.tif"), 273, 1 << 20)), Err(ImageError::Corrupt(_))));
    }

    /// A little-endian TIFF, written here: one grey strip per row of a 1-pixel-wide image,
    /// every strip the same JPEG of one pixel.
    fn one_row_strips(rows: u32) -> Vec<u8> {
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut jpeg).encode(&[200], 1, 1, image::ExtendedColorType::L8).unwrap();
        let entries: [(u16, u16, u32, u32); 9] = [
            (256, 4, 1, 1),
            (257, 4, 1, rows),
            (258, 3, 1, 8),
            (259, 3, 1, 7),
            (262, 3, 1, 1),
            (273, 4, rows, 0), // offsets: filled in below
            (277, 3, 1, 1),
            (278, 4, 1, 1),
            (279, 4, rows, 0), // byte counts
        ];
        let ifd_len = 2 + 12 * entries.len() + 4;
        let (offsets_at, counts_at) = (8 + ifd_len, 8 + ifd_len + 4 * rows as usize);
        let jpeg_at = counts_at + 4 * rows as usize;
        let mut out = b"II*\0".to_vec();
        out.extend(8u32.to_le_bytes());
        out.extend((entries.len() as u16).to_le_bytes());
        for (tag, kind, count, value) in entries {
            let value = match tag {
                273 => offsets_at as u32,
                279 => counts_at as u32,
                _ => value,
            };
            out.extend(tag.to_le_bytes());
            out.extend(kind.to_le_bytes());
            out.extend(count.to_le_bytes());
            out.extend(if kind == 3 { u32::from(value as u16) } else { value }.to_le_bytes());
        }
        out.extend(0u32.to_le_bytes());
        out.extend((0..rows).flat_map(|_| (jpeg_at as u32).to_le_bytes()));
        out.extend((0..rows).flat_map(|_| (jpeg.len() as u32).to_le_bytes()));
        out.extend(jpeg);
        out
    }

    /// A JPEG-compressed TIFF of more strips than its size allows (each costs a JPEG decoder's
    /// start-up) is refused before any is decoded.
    #[test]
    fn a_jpeg_tiff_of_too_many_strips_is_refused() {
        let grey = decode(&one_row_strips(4000)).unwrap();
        assert_eq!(grey.dimensions(), (1, 4000));
        assert!(grey.pixels().all(|p| p.0 == [200; 3]), "{:?}", grey.get_pixel(0, 0));
        // 1 × 5000 pixels allow 5000 / 256 + 4096 = 4115 strips.
        assert_eq!(
            decode(&one_row_strips(5000)),
            Err(ImageError::Corrupt("the TIFF has 5000 JPEG strips or tiles, more than the 4115 its size allows".into()))
        );
    }

    /// A tag declaring more values than the file holds is refused, whichever the tag and
    /// whether the decoder would read it, in either byte order.
    #[test]
    fn a_tag_longer_than_the_file_is_refused() {
        let tiled = fixture("rgb-tiled.tif");
        assert!(decode(&tiled).is_ok());
        // Its ImageDescription (ASCII, 23 bytes) declared 2³¹ bytes long.
        let at = tiled.windows(4).position(|w| w == [0x0E, 0x01, 0x02, 0x00]).unwrap();
        let mut long = tiled.clone();
        long[at + 4..at + 8].copy_from_slice(&0x8000_0000u32.to_le_bytes());
        assert_eq!(decode(&long), Err(ImageError::Corrupt("the TIFF's tag 270 declares 2147483648 values, more than the file holds".into())));
        let big_endian = fixture("rgb-big-endian.tif");
        let at = big_endian.windows(4).position(|w| w == [0x01, 0x0E, 0x00, 0x02]).unwrap();
        let mut long = big_endian.clone();
        long[at + 4..at + 8].copy_from_slice(&0x8000_0000u32.to_be_bytes());
        assert_eq!(decode(&long), Err(ImageError::Corrupt("the TIFF's tag 270 declares 2147483648 values, more than the file holds".into())));
        let mut lost = tiled.clone();
        lost[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&lost), Err(ImageError::Corrupt("the TIFF's first directory lies past the end of the file".into())));
    }

    /// A JPEG-compressed TIFF's strips are held to what the TIFF says of them: their number, size
    /// and components; and libjpeg's own refusals come through with their reasons.
    #[test]
    fn jpeg_strips_must_be_what_the_tiff_says() {
        let strips = fixture("jpeg-ycbcr-strips.tif");
        // 16 rows a strip makes two strips of 29 rows; 8 would need four, 32 one.
        for rows in [8, 32] {
            assert!(matches!(decode(&with_tag(&strips, 278, rows)), Err(ImageError::Corrupt(_))), "{rows}");
        }
        // A wider image than its strips' JPEGs.
        assert_eq!(
            decode(&with_tag(&strips, 256, 40)),
            Err(ImageError::Corrupt("the TIFF's strip or tile 0 is a 37×16 JPEG of 3 components, where 40×16 of 3 are needed".into()))
        );
        // A grey TIFF whose strips hold colour.
        let grey = with_tag(&with_tag(&strips, 262, 1), 277, 1);
        assert!(matches!(decode(&grey), Err(ImageError::Corrupt(_) | ImageError::Unsupported(_))), "{:?}", decode(&grey));
        // A 1×1 image in a 1536×1536 tile: refused before the tile is decoded.
        assert_eq!(
            decode(&fixture("refused-huge-tile.tif")),
            Err(ImageError::Corrupt("the TIFF's tile 0 is 1536×1536 pixels, far larger than the image".into()))
        );
        // The first strip's scan asks for Huffman tables 3, which the tables do not define.
        let mut bad = strips.clone();
        let sos = bad.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
        bad[sos + 6] = 0x33;
        assert_eq!(decode(&bad), Err(ImageError::Corrupt("Huffman table 0x03 was not defined".into())));
    }
}
