//! Builders for test inputs: generated images, zip / tar / tar.gz archives written without any
//! name sanitising (so hostile entries can be built), and Parquet files shaped like a Hugging Face
//! `datasets` export.

use std::io::{Cursor, Write};
use std::sync::Arc;

use image::{ImageFormat, Rgb, RgbImage};

/// A `size`×`size` image, different for every `seed`, encoded in `format`.
pub fn image(format: ImageFormat, size: u32, seed: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(size, size, |x, y| {
        let v = x.wrapping_mul(7).wrapping_add(y.wrapping_mul(13)).wrapping_add(seed.wrapping_mul(101));
        Rgb([(v % 256) as u8, ((v / 3 + seed) % 256) as u8, ((x ^ y ^ seed) % 256) as u8])
    });
    encoded(&img, format)
}

/// `img` encoded in `format`.
pub fn encoded(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode image");
    out.into_inner()
}

/// A 32×32 JPEG, different for every `seed`.
pub fn jpeg(seed: u32) -> Vec<u8> {
    image(ImageFormat::Jpeg, 32, seed)
}

/// A file of `tests/fixtures/tiff/`, `pnm/` or `bmp/` (`make_tiff_refs.py`, `make_pnm_refs.py`
/// and `make_bmp_refs.py` wrote them), by its path there (`tiff/rgb.tif`): an image, or the PNG of
/// the pixels transformers gets from one (`<name>.png`).
pub fn decoder_fixture(path: &str) -> Vec<u8> {
    std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path)).unwrap()
}

/// A 32×32 PNG, different for every `seed`.
pub fn png(seed: u32) -> Vec<u8> {
    image(ImageFormat::Png, 32, seed)
}

/// `img` as a PNG whose EXIF says to show it turned by `orientation` (1–8: 6 is a quarter turn
/// clockwise, as a phone stores a portrait photo).
pub fn png_with_orientation(img: &image::RgbImage, orientation: u16) -> Vec<u8> {
    use image::ImageEncoder;
    let exif = crate::support::exif::orientation(orientation);
    let mut out = Vec::new();
    let mut encoder = image::codecs::png::PngEncoder::new(&mut out);
    encoder.set_exif_metadata(exif).expect("PNG takes EXIF");
    encoder.write_image(img, img.width(), img.height(), image::ExtendedColorType::Rgb8).expect("encode image");
    out
}

/// A JPEG cut off after its headers: recognisable, not decodable.
pub fn corrupt_jpeg() -> Vec<u8> {
    let mut bytes = jpeg(999);
    bytes.truncate(bytes.len() / 3);
    bytes
}

/// One archive member.
#[derive(Debug, Clone)]
pub enum Member {
    File(String, Vec<u8>),
    /// A file of this many zero bytes, written in chunks (for bombs).
    Zeros(String, u64),
    Dir(String),
    Symlink(String, String),
    HardLink(String, String),
}

pub fn file(name: &str, bytes: Vec<u8>) -> Member {
    Member::File(name.to_string(), bytes)
}

/// `n` distinct JPEGs per class, flat `<class>/<i>.jpg` under `prefix` (e.g. "" or "pets/train/").
pub fn class_images(prefix: &str, classes: &[&str], n: u32, seed: u32) -> Vec<Member> {
    let mut members = Vec::new();
    for (c, class) in classes.iter().enumerate() {
        for i in 0..n {
            members.push(file(&format!("{prefix}{class}/{i}.jpg"), jpeg(seed + c as u32 * 1000 + i)));
        }
    }
    members
}

/// A zip (deflate) of `members`, names written as given.
pub fn zip(members: &[Member]) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for member in members {
        match member {
            Member::File(name, bytes) => {
                writer.start_file(name.as_str(), options).expect("zip start");
                writer.write_all(bytes).expect("zip write");
            }
            Member::Zeros(name, len) => {
                writer.start_file(name.as_str(), options.large_file(*len >= u32::MAX as u64)).expect("zip start");
                let chunk = vec![0u8; 64 * 1024];
                let mut left = *len;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    writer.write_all(&chunk[..n]).expect("zip write");
                    left -= n as u64;
                }
            }
            Member::Dir(name) => writer.add_directory(name.as_str(), options).expect("zip dir"),
            Member::Symlink(name, target) => {
                writer.add_symlink(name.as_str(), target.as_str(), options).expect("zip symlink")
            }
            Member::HardLink(..) => panic!("zip has no hard links"),
        }
    }
    writer.finish().expect("zip finish").into_inner()
}

/// A tar of `members`. Names and link targets go into the header bytes directly, bypassing the
/// tar crate's checks, so `../x` and `/abs` entries can be built.
pub fn tar(members: &[Member]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for member in members {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        let (name, entry_type, data, link): (&str, tar::EntryType, Vec<u8>, Option<&str>) = match member {
            Member::File(name, bytes) => (name, tar::EntryType::Regular, bytes.clone(), None),
            Member::Zeros(name, len) => (name, tar::EntryType::Regular, vec![0u8; *len as usize], None),
            Member::Dir(name) => (name, tar::EntryType::Directory, Vec::new(), None),
            Member::Symlink(name, target) => (name, tar::EntryType::Symlink, Vec::new(), Some(target)),
            Member::HardLink(name, target) => (name, tar::EntryType::Link, Vec::new(), Some(target)),
        };
        assert!(name.len() < 100, "fixture names must fit the classic header");
        let old = header.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(entry_type);
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, data.as_slice()).expect("tar append");
    }
    builder.into_inner().expect("tar finish")
}

/// [`tar`], gzip-compressed.
pub fn tar_gz(members: &[Member]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar(members)).expect("gzip");
    gz.finish().expect("gzip finish")
}

/// One row of a Hugging Face-style Parquet file.
#[derive(Debug, Clone)]
pub struct HfRow {
    pub bytes: Option<Vec<u8>>,
    pub path: Option<String>,
    pub label: Option<i64>,
    pub split: Option<String>,
}

impl HfRow {
    pub fn new(bytes: Vec<u8>, path: &str, label: i64) -> Self {
        Self { bytes: Some(bytes), path: Some(path.to_string()), label: Some(label), split: None }
    }
}

/// A Parquet file as `datasets.Dataset.to_parquet()` writes an image-classification set: an
/// `image` struct (`bytes`, `path`), an int64 `label` column named `label_column`, an optional
/// `split` column, and the ClassLabel names in the `huggingface` metadata when given. Rows are
/// written `rows_per_group` at a time, so several row groups are exercised.
pub fn hf_parquet(rows: &[HfRow], label_column: &str, names: Option<&[&str]>, rows_per_group: usize) -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let with_split = rows.iter().any(|r| r.split.is_some());
    let schema = format!(
        "message schema {{ optional group image {{ optional binary bytes; optional binary path (STRING); }} \
         optional int64 {label_column}; {} }}",
        if with_split { "optional binary split (STRING);" } else { "" }
    );
    let schema = Arc::new(parse_message_type(&schema).expect("schema"));
    let mut props = WriterProperties::builder();
    if let Some(names) = names {
        let meta = serde_json::json!({"info": {"features": {
            "image": {"_type": "Image"},
            label_column: {"names": names, "_type": "ClassLabel"},
        }}});
        props = props.set_key_value_metadata(Some(vec![KeyValue::new("huggingface".to_string(), meta.to_string())]));
    }
    let mut writer = SerializedFileWriter::new(Vec::new(), schema, Arc::new(props.build())).expect("writer");
    for group in rows.chunks(rows_per_group) {
        let mut rg = writer.next_row_group().expect("row group");
        // Definition levels: 2 = image and member present, 1 = image present but member null.
        let bytes: Vec<ByteArray> = group.iter().filter_map(|r| r.bytes.clone()).map(ByteArray::from).collect();
        let defs: Vec<i16> = group.iter().map(|r| if r.bytes.is_some() { 2 } else { 1 }).collect();
        let mut col = rg.next_column().expect("column").expect("image.bytes");
        col.typed::<ByteArrayType>().write_batch(&bytes, Some(&defs), None).expect("write");
        col.close().expect("close");

        let paths: Vec<ByteArray> = group.iter().filter_map(|r| r.path.as_deref()).map(ByteArray::from).collect();
        let defs: Vec<i16> = group.iter().map(|r| if r.path.is_some() { 2 } else { 1 }).collect();
        let mut col = rg.next_column().expect("column").expect("image.path");
        col.typed::<ByteArrayType>().write_batch(&paths, Some(&defs), None).expect("write");
        col.close().expect("close");

        let labels: Vec<i64> = group.iter().filter_map(|r| r.label).collect();
        let defs: Vec<i16> = group.iter().map(|r| i16::from(r.label.is_some())).collect();
        let mut col = rg.next_column().expect("column").expect("label");
        col.typed::<Int64Type>().write_batch(&labels, Some(&defs), None).expect("write");
        col.close().expect("close");

        if with_split {
            let splits: Vec<ByteArray> = group.iter().filter_map(|r| r.split.as_deref()).map(ByteArray::from).collect();
            let defs: Vec<i16> = group.iter().map(|r| i16::from(r.split.is_some())).collect();
            let mut col = rg.next_column().expect("column").expect("split");
            col.typed::<ByteArrayType>().write_batch(&splits, Some(&defs), None).expect("write");
            col.close().expect("close");
        }
        rg.close().expect("close row group");
    }
    writer.into_inner().expect("finish parquet")
}

/// A Parquet file with a label column and no image column.
pub fn parquet_without_images() -> Vec<u8> {
    use parquet::data_type::Int64Type;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let schema = Arc::new(parse_message_type("message schema { required int64 label; }").expect("schema"));
    let mut writer = SerializedFileWriter::new(Vec::new(), schema, Default::default()).expect("writer");
    let mut rg = writer.next_row_group().expect("row group");
    let mut col = rg.next_column().expect("column").expect("label");
    col.typed::<Int64Type>().write_batch(&[0, 1, 0], None, None).expect("write");
    col.close().expect("close");
    rg.close().expect("close row group");
    writer.into_inner().expect("finish parquet")
}
