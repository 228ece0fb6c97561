//! A check of every page of the columns we read, before the parquet crate reads them.
//!
//! The crate trusts what a page header declares: it allocates the declared uncompressed size
//! (up to 2 GiB) before decompressing, and its gzip, zstd and LZ4-frame decoders inflate a page
//! to whatever the stream produces, only comparing with the declared size afterwards. A Parquet
//! file of a few kilobytes could so make one ingest hold gigabytes. Here each page header is
//! read with a small Thrift compact-protocol reader (the crate's own is private), its sizes are
//! checked against the column chunk and [`MAX_PAGE_BYTES`], and a page compressed with one of
//! those unbounded codecs is inflated once into nothing, counting, to prove it stays within its
//! declared size. Memory used here is a few buffers, whatever the file says.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};

use parquet::basic::Compression;
use parquet::file::metadata::ParquetMetaData;

use super::IngestError;

/// Largest decompressed page accepted. Hugging Face writes image datasets in row groups of 100
/// rows, so a page holds at most 100 images.
pub(super) const MAX_PAGE_BYTES: u64 = 256 * 1024 * 1024;
/// Largest page header accepted (real ones are tens of bytes; statistics are truncated by
/// writers to a few kilobytes).
const MAX_HEADER_BYTES: u64 = 1024 * 1024;
/// Deepest nesting of Thrift structs followed (a page header nests three levels).
const MAX_DEPTH: u8 = 16;
/// The magic number of an LZ4 frame; other LZ4 framings are decoded into the declared size.
const LZ4_FRAME_MAGIC: [u8; 4] = [0x04, 0x22, 0x4d, 0x18];

fn corrupt(what: impl std::fmt::Display) -> IngestError {
    IngestError::Corrupt(format!("the Parquet file is damaged: {what}"))
}

/// Walks the footer's Thrift structure (a `FileMetaData` struct) before the parquet crate decodes
/// it. That decoder reserves `Vec::with_capacity(declared length)` for every list, so a footer of
/// a few bytes declaring a list of billions of key-value pairs asks for ~100 GB and aborts the
/// process (found by `cargo fuzz`); here such a list is refused, as is deeper nesting than any
/// real footer has.
pub(super) fn check_footer(footer: &[u8]) -> Result<(), IngestError> {
    let mut r = Compact::new(footer, footer.len() as u64);
    r.fields(0, |r, _, ty, depth| r.skip(ty, true, depth))
        .map_err(|e| IngestError::Corrupt(format!("the Parquet footer is malformed: {e}")))
}

/// Checks every page of the column chunks whose top-level column is in `columns`.
pub(super) fn check(file: &File, metadata: &ParquetMetaData, columns: &[&str]) -> Result<(), IngestError> {
    let file_len = file.metadata()?.len();
    for group in metadata.row_groups() {
        for chunk in group.columns() {
            let top = chunk.column_path().parts().first().map(String::as_str).unwrap_or_default();
            if !columns.contains(&top) {
                continue;
            }
            let (start, len) = chunk.byte_range();
            if start.checked_add(len).is_none_or(|end| end > file_len) {
                return Err(corrupt(format!("column '{}' declares bytes past the end of the file", chunk.column_path())));
            }
            check_chunk(file, start, len, chunk.compression())
                .map_err(|e| match e {
                    ChunkError::Io(e) => IngestError::Io(e),
                    ChunkError::Corrupt(what) => corrupt(format!("column '{}': {what}", chunk.column_path())),
                    ChunkError::TooLarge(what) => IngestError::TooLarge(format!("column '{}': {what}", chunk.column_path())),
                })?;
        }
    }
    Ok(())
}

/// Why a column chunk was refused.
#[derive(Debug)]
enum ChunkError {
    Io(io::Error),
    Corrupt(String),
    TooLarge(String),
}

impl From<io::Error> for ChunkError {
    fn from(e: io::Error) -> Self {
        // A read past the chunk or a malformed varint: the header is damaged, not the disk.
        match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData => Self::Corrupt(e.to_string()),
            _ => Self::Io(e),
        }
    }
}

/// What the check needs from a page header.
#[derive(Debug, Default, PartialEq, Eq)]
struct PageHeader {
    uncompressed: i64,
    compressed: i64,
    /// For data page v2: bytes of repetition and definition levels stored uncompressed in front.
    levels: i64,
    /// For data page v2: whether the values are compressed (default true).
    values_compressed: bool,
}

/// Walks the pages of one column chunk (`len` bytes from `start`).
fn check_chunk(mut file: &File, start: u64, len: u64, codec: Compression) -> Result<(), ChunkError> {
    let mut pos = start;
    let mut remaining = len;
    while remaining > 0 {
        file.seek(SeekFrom::Start(pos))?;
        let mut reader = Compact::new(BufReader::with_capacity(8 * 1024, file), remaining.min(MAX_HEADER_BYTES));
        let header = reader.page_header()?;
        let header_len = reader.read;
        remaining -= header_len;
        pos += header_len;
        let (compressed, uncompressed, levels) = (header.compressed, header.uncompressed, header.levels);
        if compressed < 0 || compressed as u64 > remaining || uncompressed < 0 || levels < 0 || levels > uncompressed || levels > compressed {
            return Err(ChunkError::Corrupt(format!(
                "a page header declares impossible sizes ({compressed} bytes stored, {uncompressed} decompressed, {levels} of levels)"
            )));
        }
        if uncompressed as u64 > MAX_PAGE_BYTES {
            return Err(ChunkError::TooLarge(format!(
                "a page declares {uncompressed} bytes, over the limit of {MAX_PAGE_BYTES} bytes per page"
            )));
        }
        if header.values_compressed && uncompressed > levels {
            file.seek(SeekFrom::Start(pos + levels as u64))?;
            let stored = file.take((compressed - levels) as u64);
            let expected = (uncompressed - levels) as u64;
            match inflated_size(stored, codec, expected)? {
                Some(inflated) if inflated > expected => {
                    return Err(ChunkError::TooLarge(format!("a page inflates to more than the {expected} bytes it declares")));
                }
                Some(inflated) if inflated < expected => {
                    return Err(ChunkError::Corrupt(format!(
                        "a page decompresses to {inflated} bytes, not the {expected} it declares"
                    )));
                }
                _ => {}
            }
        }
        remaining -= compressed as u64;
        pos += compressed as u64;
    }
    Ok(())
}

/// The size `stored` decompresses to, counted up to `expected + 1` bytes, for the codecs whose
/// decoder in the parquet crate is not bounded by the declared size; for Snappy, the size its
/// stream declares (the crate allocates the page's declared size, so a mismatch is refused before
/// that allocation). `None` for codecs bounded by the declared size alone.
fn inflated_size(mut stored: io::Take<&File>, codec: Compression, expected: u64) -> Result<Option<u64>, ChunkError> {
    let cap = expected + 1;
    let count = |reader: &mut dyn Read| -> Result<u64, ChunkError> {
        io::copy(&mut reader.take(cap), &mut io::sink()).map_err(|e| ChunkError::Corrupt(format!("a page does not decompress: {e}")))
    };
    let n = match codec {
        Compression::GZIP(_) => count(&mut flate2::read::MultiGzDecoder::new(stored))?,
        Compression::ZSTD(_) => {
            let mut decoder =
                zstd::Decoder::new(stored).map_err(|e| ChunkError::Corrupt(format!("a page does not decompress: {e}")))?;
            count(&mut decoder)?
        }
        Compression::LZ4 => {
            let mut magic = Vec::with_capacity(4);
            (&mut stored).take(4).read_to_end(&mut magic)?;
            if magic != LZ4_FRAME_MAGIC {
                return Ok(None);
            }
            count(&mut lz4_flex::frame::FrameDecoder::new(io::Cursor::new(magic).chain(stored)))?
        }
        Compression::SNAPPY => {
            let mut head = Vec::with_capacity(10);
            (&mut stored).take(10).read_to_end(&mut head)?;
            let n = snap::raw::decompress_len(&head).map_err(|e| ChunkError::Corrupt(format!("a page does not decompress: {e}")))?;
            n as u64
        }
        _ => return Ok(None),
    };
    Ok(Some(n))
}

/// A reader of the Thrift compact protocol that refuses to read more than `limit` bytes.
struct Compact<R> {
    inner: R,
    read: u64,
    limit: u64,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("malformed page header: {what}"))
}

impl<R: Read> Compact<R> {
    fn new(inner: R, limit: u64) -> Self {
        Self { inner, read: 0, limit }
    }

    fn byte(&mut self) -> io::Result<u8> {
        if self.read >= self.limit {
            return Err(invalid("longer than the room it has"));
        }
        let mut b = [0u8; 1];
        self.inner.read_exact(&mut b)?;
        self.read += 1;
        Ok(b[0])
    }

    fn varint(&mut self) -> io::Result<u64> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(invalid("varint too long"))
    }

    fn zigzag(&mut self) -> io::Result<i64> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    fn read_i32(&mut self) -> io::Result<i64> {
        let v = self.zigzag()?;
        i32::try_from(v).map(i64::from).map_err(|_| invalid("i32 out of range"))
    }

    fn skip_bytes(&mut self, n: u64) -> io::Result<()> {
        if n > self.limit - self.read {
            return Err(invalid("a field is longer than the room it has"));
        }
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        if copied < n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.read += n;
        Ok(())
    }

    /// Skips one value of compact type `ty`; `in_struct` booleans carry their value in the type.
    fn skip(&mut self, ty: u8, in_struct: bool, depth: u8) -> io::Result<()> {
        match ty {
            1 | 2 if in_struct => Ok(()),
            1..=3 => self.byte().map(drop),
            4..=6 => self.varint().map(drop),
            7 => self.skip_bytes(8),
            8 => {
                let n = self.varint()?;
                self.skip_bytes(n)
            }
            // Containers count as a nesting level (lists of lists would otherwise recurse once per
            // byte), and a declared size must fit in the bytes left, one byte per element at least:
            // the parquet crate reserves room for the declared size before reading an element.
            9 | 10 => {
                let depth = self.nested(depth)?;
                let head = self.byte()?;
                let size = match head >> 4 {
                    15 => self.varint()?,
                    n => u64::from(n),
                };
                self.room_for(size)?;
                for _ in 0..size {
                    self.skip(head & 0x0f, false, depth)?;
                }
                Ok(())
            }
            11 => {
                let depth = self.nested(depth)?;
                let size = self.varint()?;
                self.room_for(size)?;
                if size > 0 {
                    let kinds = self.byte()?;
                    for _ in 0..size {
                        self.skip(kinds >> 4, false, depth)?;
                        self.skip(kinds & 0x0f, false, depth)?;
                    }
                }
                Ok(())
            }
            12 => self.fields(depth + 1, |r, _, ty, depth| r.skip(ty, true, depth)),
            _ => Err(invalid("unknown field type")),
        }
    }

    fn nested(&self, depth: u8) -> io::Result<u8> {
        if depth >= MAX_DEPTH {
            return Err(invalid("nested too deeply"));
        }
        Ok(depth + 1)
    }

    fn room_for(&self, elements: u64) -> io::Result<()> {
        if elements > self.limit - self.read {
            return Err(invalid("a list declares more elements than the bytes left"));
        }
        Ok(())
    }

    /// Reads a struct's fields up to its stop byte, handing each (id, type) to `field`, which must
    /// consume the value.
    fn fields(&mut self, depth: u8, mut field: impl FnMut(&mut Self, i16, u8, u8) -> io::Result<()>) -> io::Result<()> {
        if depth > MAX_DEPTH {
            return Err(invalid("nested too deeply"));
        }
        let mut last = 0i16;
        loop {
            let head = self.byte()?;
            if head == 0 {
                return Ok(());
            }
            let ty = head & 0x0f;
            let id = match head >> 4 {
                0 => i16::try_from(self.zigzag()?).map_err(|_| invalid("field id out of range"))?,
                delta => last.checked_add(i16::from(delta)).ok_or_else(|| invalid("field id out of range"))?,
            };
            last = id;
            field(self, id, ty, depth)?;
        }
    }

    /// A `PageHeader` struct: fields 2 and 3 are the sizes, 8 the data page v2 header.
    fn page_header(&mut self) -> io::Result<PageHeader> {
        let mut header = PageHeader { uncompressed: -1, compressed: -1, levels: 0, values_compressed: true };
        let mut seen_type = false;
        self.fields(0, |r, id, ty, depth| match (id, ty) {
            (1, 5) => {
                seen_type = true;
                r.read_i32().map(drop)
            }
            (2, 5) => r.read_i32().map(|v| header.uncompressed = v),
            (3, 5) => r.read_i32().map(|v| header.compressed = v),
            (8, 12) => r.fields(depth + 1, |r, id, ty, depth| match (id, ty) {
                // A negative length marks the sum as impossible for the caller to refuse.
                (5 | 6, 5) => r.read_i32().map(|v| header.levels = if v < 0 || header.levels < 0 { -1 } else { header.levels + v }),
                (7, 1) => {
                    header.values_compressed = true;
                    Ok(())
                }
                (7, 2) => {
                    header.values_compressed = false;
                    Ok(())
                }
                _ => r.skip(ty, true, depth),
            }),
            _ => r.skip(ty, true, depth),
        })?;
        // Missing sizes stay negative and are refused as impossible by the caller.
        if !seen_type {
            return Err(invalid("the page type is missing"));
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compact-protocol bytes of a page header.
    fn header(uncompressed: i32, compressed: i32, v2: Option<(i32, i32, bool)>) -> Vec<u8> {
        fn zigzag(v: i64, out: &mut Vec<u8>) {
            let mut u = ((v << 1) ^ (v >> 63)) as u64;
            loop {
                let b = (u & 0x7f) as u8;
                u >>= 7;
                if u == 0 {
                    out.push(b);
                    return;
                }
                out.push(b | 0x80);
            }
        }
        let mut out = vec![0x15];
        zigzag(0, &mut out); // type: DATA_PAGE
        out.push(0x15);
        zigzag(i64::from(uncompressed), &mut out);
        out.push(0x15);
        zigzag(i64::from(compressed), &mut out);
        out.push(0x18); // field 4 (crc) as binary, to exercise skipping
        out.push(2);
        out.extend_from_slice(b"xy");
        if let Some((def, rep, compressed)) = v2 {
            out.push(0x4c); // field 8, struct
            out.push(0x55);
            zigzag(i64::from(def), &mut out);
            out.push(0x15);
            zigzag(i64::from(rep), &mut out);
            out.push(if compressed { 0x11 } else { 0x12 });
            out.push(0);
        }
        out.push(0);
        out
    }

    /// Checks a column chunk made of `pages` (header, stored bytes), written to a file.
    fn check_pages(pages: &[(Vec<u8>, Vec<u8>)], codec: Compression) -> Result<(), ChunkError> {
        let mut file = tempfile::tempfile().unwrap();
        let mut len = 0;
        for (header, data) in pages {
            std::io::Write::write_all(&mut file, header).unwrap();
            std::io::Write::write_all(&mut file, data).unwrap();
            len += (header.len() + data.len()) as u64;
        }
        check_chunk(&file, 0, len, codec)
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, bytes).unwrap();
        enc.finish().unwrap()
    }

    fn page(uncompressed: usize, data: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
        (header(uncompressed as i32, data.len() as i32, None), data)
    }

    #[test]
    fn honest_pages_pass() {
        let gz = Compression::GZIP(Default::default());
        check_pages(&[page(1000, gzip(&[7; 1000])), page(10, gzip(&[1; 10]))], gz).unwrap();
        check_pages(&[page(5, b"plain".to_vec())], Compression::UNCOMPRESSED).unwrap();
        let snappy = snap::raw::Encoder::new().compress_vec(&[3; 5000]).unwrap();
        check_pages(&[page(5000, snappy)], Compression::SNAPPY).unwrap();
        // Data page v2 with levels stored uncompressed in front of the values.
        let mut v2 = vec![9u8; 6];
        v2.extend(gzip(&[5; 100]));
        check_pages(&[(header(106, v2.len() as i32, Some((4, 2, true))), v2)], gz).unwrap();
    }

    #[test]
    fn a_page_that_inflates_past_its_declared_size_is_refused_without_holding_it() {
        let bomb = gzip(&vec![0; 64 << 20]);
        let err = check_pages(&[page(1024, bomb)], Compression::GZIP(Default::default())).unwrap_err();
        assert!(matches!(err, ChunkError::TooLarge(ref m) if m.contains("inflates")), "{err:?}");
        let short = gzip(&[0; 10]);
        assert!(matches!(check_pages(&[page(1024, short)], Compression::GZIP(Default::default())), Err(ChunkError::Corrupt(_))));
    }

    #[test]
    fn impossible_or_oversized_declarations_are_refused() {
        let err = check_pages(&[page(MAX_PAGE_BYTES as usize + 1, vec![0; 16])], Compression::UNCOMPRESSED).unwrap_err();
        assert!(matches!(err, ChunkError::TooLarge(_)), "{err:?}");
        // Declares more stored bytes than the chunk has.
        let err = check_pages(&[(header(10, 500, None), vec![0; 10])], Compression::UNCOMPRESSED).unwrap_err();
        assert!(matches!(err, ChunkError::Corrupt(_)), "{err:?}");
        // A Snappy stream of 5000 bytes in a page declaring 200 MiB.
        let snappy = snap::raw::Encoder::new().compress_vec(&[3; 5000]).unwrap();
        let err = check_pages(&[page(200 << 20, snappy)], Compression::SNAPPY).unwrap_err();
        assert!(matches!(err, ChunkError::Corrupt(_)), "{err:?}");
        // Levels longer than the page.
        let err = check_pages(&[(header(10, 10, Some((20, 0, true))), vec![0; 10])], Compression::UNCOMPRESSED).unwrap_err();
        assert!(matches!(err, ChunkError::Corrupt(_)), "{err:?}");
    }

    fn parse(bytes: &[u8]) -> io::Result<PageHeader> {
        Compact::new(bytes, bytes.len() as u64).page_header()
    }

    #[test]
    fn page_headers_are_read_with_unknown_fields_skipped() {
        let h = parse(&header(1000, 300, None)).unwrap();
        assert_eq!(h, PageHeader { uncompressed: 1000, compressed: 300, levels: 0, values_compressed: true });
        let h = parse(&header(1000, 300, Some((10, 4, false)))).unwrap();
        assert_eq!(h, PageHeader { uncompressed: 1000, compressed: 300, levels: 14, values_compressed: false });
    }

    #[test]
    fn footers_declaring_impossible_lists_or_deep_nesting_are_refused() {
        // FileMetaData field 5 (key_value_metadata), a list of structs declaring 2^32 - 1 elements
        // in a few bytes: the fuzzer's input that made parquet reserve ~100 GB.
        let huge = [0x59, 0xfc, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x00, 0x00];
        assert!(super::check_footer(&huge).is_err());
        // Lists of lists of lists…, one byte a level.
        let mut deep = vec![0x19];
        deep.extend(std::iter::repeat_n(0x19, 100_000));
        assert!(super::check_footer(&deep).is_err());
        // A list whose elements are all there passes: field 1 (i32) then a list of three i32.
        assert!(super::check_footer(&[0x15, 0x02, 0x19, 0x35, 0x02, 0x04, 0x06, 0x00]).is_ok());
    }

    #[test]
    fn malformed_headers_are_errors_not_allocations() {
        let h = header(1000, 300, None);
        for cut in 0..h.len() {
            assert!(parse(&h[..cut]).is_err(), "cut at {cut}");
        }
        // A binary field declaring 2 GiB is refused by the byte limit, without reading it.
        let mut huge = vec![0x15, 0, 0x18, 0xff, 0xff, 0xff, 0xff, 0x07];
        huge.extend_from_slice(&[0; 16]);
        assert_eq!(parse(&huge).unwrap_err().kind(), io::ErrorKind::InvalidData);
        // Structs nested without end are refused, not recursed into.
        let deep: Vec<u8> = std::iter::repeat_n(0x1c, 100).collect();
        assert_eq!(parse(&deep).unwrap_err().kind(), io::ErrorKind::InvalidData);
        // A list declaring billions of elements runs out of bytes, not memory.
        let list = [0x19, 0xf5, 0xff, 0xff, 0xff, 0xff, 0x0f, 0];
        assert!(parse(&list).is_err());
    }
}
