//! Writes the seed corpora: `cargo run --release --bin seeds` (from `fuzz/`) fills
//! `corpus/ingest/` with a small valid zip, tar, tar.gz and Parquet dataset, and
//! `corpus/decode_image/` with one small image per supported format. `scripts/fuzz.sh` runs it
//! from the fuzz build when a corpus is missing.

use std::io::{Cursor, Write};
use std::path::Path;
use std::sync::Arc;

use image::{ImageFormat, Rgb, RgbImage};

fn image(format: ImageFormat, seed: u8) -> Vec<u8> {
    let img = RgbImage::from_fn(12, 9, |x, y| Rgb([(x * 20) as u8 ^ seed, (y * 25) as u8, seed]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

fn members() -> Vec<(String, Vec<u8>)> {
    vec![
        ("pets/train/cat/1.png".into(), image(ImageFormat::Png, 1)),
        ("pets/train/dog/2.jpg".into(), image(ImageFormat::Jpeg, 2)),
        ("pets/test/cat/3.gif".into(), image(ImageFormat::Gif, 3)),
        ("pets/test/dog/4.bmp".into(), image(ImageFormat::Bmp, 4)),
    ]
}

fn zip_bytes() -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    w.add_directory("pets/", opts).unwrap();
    for (name, bytes) in members() {
        w.start_file(name, opts).unwrap();
        w.write_all(&bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn tar_bytes() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in members() {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, bytes.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

fn parquet_bytes() -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = parquet::schema::parser::parse_message_type(
        "message schema { optional group image { optional binary bytes; optional binary path (STRING); } \
         optional int64 label; optional binary split (STRING); }",
    )
    .unwrap();
    let meta = r#"{"info": {"features": {"image": {"_type": "Image"}, "label": {"names": ["cat", "dog"], "_type": "ClassLabel"}}}}"#;
    let props = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .set_key_value_metadata(Some(vec![KeyValue::new("huggingface".into(), meta.to_string())]))
        .build();
    let mut w = SerializedFileWriter::new(Vec::new(), Arc::new(schema), Arc::new(props)).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let rows = members();
    let bytes: Vec<ByteArray> = rows.iter().map(|(_, b)| ByteArray::from(b.clone())).collect();
    let paths: Vec<ByteArray> = rows.iter().map(|(n, _)| ByteArray::from(n.as_str())).collect();
    let defs = vec![2i16; rows.len()];
    for values in [&bytes, &paths] {
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>().write_batch(values, Some(&defs), None).unwrap();
        col.close().unwrap();
    }
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<Int64Type>().write_batch(&[0, 1, 0, 1], Some(&[1; 4]), None).unwrap();
    col.close().unwrap();
    let splits: Vec<ByteArray> = ["train", "train", "test", "validation"].iter().map(|s| ByteArray::from(*s)).collect();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>().write_batch(&splits, Some(&[1; 4]), None).unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    w.into_inner().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let ingest = root.join("ingest");
    write(&ingest, "seed.zip", &zip_bytes());
    write(&ingest, "seed.tar", &tar_bytes());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar_bytes()).unwrap();
    write(&ingest, "seed.tar.gz", &gz.finish().unwrap());
    write(&ingest, "seed.parquet", &parquet_bytes());
    let images = root.join("decode_image");
    for (i, (name, format)) in
        [("png", ImageFormat::Png), ("jpg", ImageFormat::Jpeg), ("webp", ImageFormat::WebP), ("gif", ImageFormat::Gif), ("bmp", ImageFormat::Bmp)]
            .into_iter()
            .enumerate()
    {
        write(&images, &format!("seed.{name}"), &image(format, i as u8 * 40));
    }
    // TIFFs of every kind the decoder reads or refuses (compressions, tiles, planes, depths,
    // alpha, CMYK, palettes, JPEG strips with shared tables), Netpbm images (plain and binary,
    // every maximum) and BMPs (16-bit layouts, palettes, run-length coding), from the lib tests'
    // fixtures.
    for folder in ["tiff", "pnm", "bmp"] {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(folder);
        for entry in std::fs::read_dir(&fixtures).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e != "png") {
                write(&images, &format!("seed-{}", path.file_name().unwrap().to_string_lossy()), &std::fs::read(&path).unwrap());
            }
        }
    }
    println!("seed corpora written under {}", root.display());
}
