//! Builders for hostile inputs: zips written byte by byte (lying sizes, overlapping entries,
//! non-UTF-8 names), GNU sparse tar members, streamed tar.gz bombs, images with absurd headers,
//! huge metadata or damage, and Parquet files with wrong types or lying page headers.

use std::io::{Cursor, Write};

use image::ImageFormat;
use rand::{Rng, SeedableRng};

use crate::fixtures;

/// The CRC-32 of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    crc.sum()
}

/// Raw deflate of `bytes`.
pub fn deflate(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Raw deflate of `len` zero bytes, with their CRC, built in chunks.
pub fn deflated_zeros(len: u64) -> (Vec<u8>, u32) {
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut crc = flate2::Crc::new();
    let chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        enc.write_all(&chunk[..n]).unwrap();
        crc.update(&chunk[..n]);
        left -= n as u64;
    }
    (enc.finish().unwrap(), crc.sum())
}

/// One entry of a zip written by [`raw_zip`]: every header field as the test wants it.
#[derive(Clone)]
pub struct RawEntry {
    pub name: Vec<u8>,
    /// General-purpose flag bit 11: the name is UTF-8.
    pub utf8: bool,
    /// 0 stored, 8 deflated.
    pub method: u16,
    pub crc: u32,
    pub data: std::sync::Arc<Vec<u8>>,
    /// The uncompressed size the headers declare.
    pub size: u32,
    /// Unix mode in the external attributes (e.g. 0o120777 for a link).
    pub mode: u32,
}

impl RawEntry {
    /// A deflated entry whose headers tell the truth.
    pub fn file(name: &str, bytes: &[u8]) -> Self {
        Self {
            name: name.as_bytes().to_vec(),
            utf8: true,
            method: 8,
            crc: crc32(bytes),
            data: std::sync::Arc::new(deflate(bytes)),
            size: bytes.len() as u32,
            mode: 0o100644,
        }
    }
}

/// A zip of `entries`. With `overlap`, a single local header and its data are written and every
/// central entry points at them (the overlapping-file bomb).
pub fn raw_zip(entries: &[RawEntry], overlap: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut offsets = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if overlap && i > 0 {
            offsets.push(0u32);
            continue;
        }
        offsets.push(out.len() as u32);
        out.extend_from_slice(&0x04034b50u32.to_le_bytes());
        out.extend_from_slice(&20u16.to_le_bytes());
        out.extend_from_slice(&(if e.utf8 { 1u16 << 11 } else { 0 }).to_le_bytes());
        out.extend_from_slice(&e.method.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&0x21u16.to_le_bytes());
        out.extend_from_slice(&e.crc.to_le_bytes());
        out.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&e.name);
        out.extend_from_slice(&e.data);
    }
    let cd_start = out.len() as u32;
    for (e, offset) in entries.iter().zip(&offsets) {
        out.extend_from_slice(&0x02014b50u32.to_le_bytes());
        out.extend_from_slice(&(3u16 << 8 | 20).to_le_bytes());
        out.extend_from_slice(&20u16.to_le_bytes());
        out.extend_from_slice(&(if e.utf8 { 1u16 << 11 } else { 0 }).to_le_bytes());
        out.extend_from_slice(&e.method.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&0x21u16.to_le_bytes());
        out.extend_from_slice(&e.crc.to_le_bytes());
        out.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0u8; 8]); // extra and comment lengths, disk, internal attributes
        out.extend_from_slice(&(e.mode << 16).to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&e.name);
    }
    let cd_size = out.len() as u32 - cd_start;
    out.extend_from_slice(&0x06054b50u32.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&cd_size.to_le_bytes());
    out.extend_from_slice(&cd_start.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// A tar member header with raw `name` bytes, `entry_type`, a declared `size`, and for GNU sparse
/// members a `real_size`.
pub fn tar_header(name: &[u8], entry_type: tar::EntryType, size: u64, real_size: Option<u64>) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_entry_type(entry_type);
    header.set_mode(0o644);
    header.set_mtime(1_700_000_000);
    header.set_size(size);
    if let Some(real) = real_size {
        let gnu = header.as_gnu_mut().unwrap();
        let octal = format!("{real:011o}\0");
        gnu.realsize.copy_from_slice(octal.as_bytes());
        // One sparse region of 512 bytes at the end of the declared 1 GB.
        let offset = format!("{:011o}\0", real - 512);
        gnu.sparse[0].offset.copy_from_slice(offset.as_bytes());
        gnu.sparse[0].numbytes.copy_from_slice(format!("{:011o}\0", 512).as_bytes());
    }
    header.set_cksum();
    header
}

/// A tar of `(header, data)` members.
pub fn raw_tar(members: &[(tar::Header, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (header, data) in members {
        builder.append(header, data.as_slice()).unwrap();
    }
    builder.into_inner().unwrap()
}

/// A tar.gz holding `members` and then a regular member of `zeros` zero bytes named `name`,
/// streamed through the compressor (a 1 GB member costs about a megabyte).
pub fn tar_gz_with_zeros(members: &[fixtures::Member], name: &str, zeros: u64) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let head = fixtures::tar(members);
    // Drop the two zero blocks that end the archive; more members follow.
    gz.write_all(&head[..head.len() - 1024]).unwrap();
    let header = tar_header(name.as_bytes(), tar::EntryType::Regular, zeros, None);
    gz.write_all(header.as_bytes()).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut left = zeros;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        gz.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    let pad = (512 - zeros % 512) % 512;
    gz.write_all(&vec![0u8; pad as usize + 1024]).unwrap();
    gz.finish().unwrap()
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}

fn zlib(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// A PNG whose header declares `width`×`height` RGB pixels, with one row of data.
pub fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"IDAT", &zlib(&vec![0u8; 1 + 3 * width.min(4096) as usize]));
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A valid 32×32 PNG with an extra chunk of `kind` inserted after its header.
pub fn png_with_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let png = fixtures::png(41);
    // Signature (8) + IHDR chunk (4 + 4 + 13 + 4).
    let split = 8 + 25;
    let mut out = png[..split].to_vec();
    png_chunk(&mut out, kind, data);
    out.extend_from_slice(&png[split..]);
    out
}

/// A PNG with an ICC profile that inflates to `inflated` bytes (a compressed-metadata bomb).
pub fn png_with_icc_bomb(inflated: usize) -> Vec<u8> {
    let mut data = b"icc\0\0".to_vec();
    data.extend_from_slice(&zlib(&vec![0u8; inflated]));
    png_with_chunk(b"iCCP", &data)
}

/// A 32×32 JPEG carrying `segments` APP2 ICC segments (and as many APP1 EXIF segments) of
/// about 64 KiB each right after its start marker.
pub fn jpeg_with_metadata(segments: u8) -> Vec<u8> {
    let jpeg = fixtures::jpeg(42);
    let mut out = jpeg[..2].to_vec();
    let payload = vec![0x5au8; 65_000];
    for i in 0..segments {
        let mut seg = b"ICC_PROFILE\0".to_vec();
        seg.push(i + 1);
        seg.push(segments);
        seg.extend_from_slice(&payload);
        out.extend_from_slice(&[0xff, 0xe2]);
        out.extend_from_slice(&((seg.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&seg);
        let mut exif = b"Exif\0\0".to_vec();
        exif.extend_from_slice(&payload);
        out.extend_from_slice(&[0xff, 0xe1]);
        out.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&exif);
    }
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// A lossless 32×32 WebP with an ICC chunk of `icc_len` bytes (extended format).
pub fn webp_with_icc(icc_len: usize) -> Vec<u8> {
    let simple = fixtures::image(ImageFormat::WebP, 32, 43);
    assert_eq!(&simple[12..16], b"VP8L", "the encoder writes a simple lossless WebP");
    let image_chunk = &simple[12..];
    let mut body = b"WEBP".to_vec();
    body.extend_from_slice(b"VP8X");
    body.extend_from_slice(&10u32.to_le_bytes());
    body.extend_from_slice(&[0x20, 0, 0, 0]); // ICC flag
    body.extend_from_slice(&31u32.to_le_bytes()[..3]);
    body.extend_from_slice(&31u32.to_le_bytes()[..3]);
    body.extend_from_slice(b"ICCP");
    body.extend_from_slice(&(icc_len as u32).to_le_bytes());
    body.extend(std::iter::repeat_n(0x11u8, icc_len));
    if icc_len % 2 == 1 {
        body.push(0);
    }
    body.extend_from_slice(image_chunk);
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// A GIF of `frames` 8×8 frames.
pub fn gif_with_frames(frames: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new(&mut out);
        for i in 0..frames {
            let img = image::RgbaImage::from_pixel(8, 8, image::Rgba([(i % 251) as u8, 7, 9, 255]));
            enc.encode_frame(image::Frame::new(img)).unwrap();
        }
    }
    out
}

/// Damaged copies of a JPEG, a PNG and a WebP: cut at several points, and with 1 to 8 random bits
/// flipped (seeded, so a failure can be replayed).
pub fn damaged_images() -> Vec<(String, Vec<u8>)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let mut out = Vec::new();
    for (ext, format) in [("jpg", ImageFormat::Jpeg), ("png", ImageFormat::Png), ("webp", ImageFormat::WebP)] {
        let good = fixtures::image(format, 48, 77);
        for cut in [1, 8, 30, good.len() / 2, good.len() - 1] {
            out.push((format!("cut-{cut}.{ext}"), good[..cut].to_vec()));
        }
        for variant in 0..24 {
            let mut bad = good.clone();
            for _ in 0..rng.random_range(1..=8) {
                let at = rng.random_range(0..bad.len());
                bad[at] ^= 1 << rng.random_range(0..8);
            }
            out.push((format!("flip-{variant}.{ext}"), bad));
        }
    }
    out
}

/// Nested zips, `depth` deep, each holding the previous level ten times (42.zip's shape), the
/// innermost holding 10 MB of zeros.
pub fn nested_zip(depth: u32) -> Vec<u8> {
    let (zeros, crc) = deflated_zeros(10 << 20);
    let mut level = raw_zip(
        &[RawEntry {
            name: b"zeros.bin".to_vec(),
            utf8: false,
            method: 8,
            crc,
            data: std::sync::Arc::new(zeros),
            size: 10 << 20,
            mode: 0o100644,
        }],
        false,
    );
    for _ in 0..depth {
        let entries: Vec<RawEntry> = (0..10).map(|i| RawEntry::file(&format!("{i}.zip"), &level)).collect();
        level = raw_zip(&entries, false);
    }
    level
}

/// Finds the one data page header of at least `min` declared bytes (`0x15 0x00 0x15 <varint>`)
/// and rewrites its uncompressed size to `new`, with the varint padded to the same length.
pub fn patch_page_size(parquet: &mut [u8], min: u64, new: u64) {
    let mut hits = Vec::new();
    for i in 0..parquet.len().saturating_sub(8) {
        if parquet[i..i + 3] != [0x15, 0x00, 0x15] {
            continue;
        }
        let mut value = 0u64;
        let mut len = 0;
        while len < 10 && i + 3 + len < parquet.len() {
            let b = parquet[i + 3 + len];
            value |= u64::from(b & 0x7f) << (7 * len);
            len += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let size = (value >> 1) ^ (value & 1).wrapping_neg();
        if size >= min {
            hits.push((i + 3, len));
        }
    }
    assert_eq!(hits.len(), 1, "expected one page of at least {min} bytes");
    let (at, len) = hits[0];
    let mut zigzag = new << 1;
    for k in 0..len {
        let last = k == len - 1;
        parquet[at + k] = (zigzag & 0x7f) as u8 | if last { 0 } else { 0x80 };
        zigzag >>= 7;
    }
    assert_eq!(zigzag, 0, "{new} does not fit in {len} varint bytes");
}

/// A Parquet file of `schema` (message type text) with one row group written by `write`.
pub fn parquet_of(
    schema: &str,
    compression: parquet::basic::Compression,
    write: impl FnOnce(&mut parquet::file::writer::SerializedRowGroupWriter<'_, Vec<u8>>),
) -> Vec<u8> {
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = std::sync::Arc::new(parquet::schema::parser::parse_message_type(schema).unwrap());
    let props = WriterProperties::builder().set_compression(compression).set_dictionary_enabled(false).build();
    let mut writer = SerializedFileWriter::new(Vec::new(), schema, std::sync::Arc::new(props)).unwrap();
    let mut rg = writer.next_row_group().unwrap();
    write(&mut rg);
    rg.close().unwrap();
    writer.into_inner().unwrap()
}

/// An image dataset Parquet file (image struct, int64 label) with `images`, compressed.
pub fn hf_parquet_compressed(images: &[Vec<u8>], compression: parquet::basic::Compression) -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    parquet_of(
        "message schema { optional group image { optional binary bytes; } optional int64 label; }",
        compression,
        |rg| {
            let values: Vec<ByteArray> = images.iter().map(|b| ByteArray::from(b.clone())).collect();
            let defs = vec![2i16; images.len()];
            let mut col = rg.next_column().unwrap().unwrap();
            col.typed::<ByteArrayType>().write_batch(&values, Some(&defs), None).unwrap();
            col.close().unwrap();
            let labels: Vec<i64> = (0..images.len() as i64).map(|i| i % 2).collect();
            let defs = vec![1i16; images.len()];
            let mut col = rg.next_column().unwrap().unwrap();
            col.typed::<Int64Type>().write_batch(&labels, Some(&defs), None).unwrap();
            col.close().unwrap();
        },
    )
}

/// JSON nested `depth` arrays deep.
pub fn deep_json(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// An image encoded in `format`, for the corpus's well-formed members.
pub fn good(format: ImageFormat, seed: u32) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(24, 24, |x, y| {
        image::Rgb([(x * 9 + seed) as u8, (y * 7) as u8, (seed * 13) as u8])
    }))
    .write_to(&mut out, format)
    .unwrap();
    out.into_inner()
}
