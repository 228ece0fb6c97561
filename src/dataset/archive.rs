//! Reading archives (zip, tar, gzip-compressed tar) and local folders in two passes: headers
//! first, to enforce the limits and plan the layout, then the selected contents.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::layout::{self, Action, Entry, Kind, Plan};
use super::{IngestError, Sink};

/// Longest GNU long-name entry read (real ones are a path: at most a few KiB).
const MAX_LONG_NAME_BYTES: u64 = 64 * 1024;
/// Longest PAX extended header read.
const MAX_PAX_BYTES: u64 = 1024 * 1024;
/// Deepest folder nesting walked when ingesting a local folder.
const MAX_FOLDER_DEPTH: usize = 8;
/// Largest zip central directory read. The zip reader indexes it in memory; 200 000 entries
/// with names of a few hundred bytes take a fraction of this.
const MAX_CENTRAL_DIRECTORY_BYTES: u64 = 128 * 1024 * 1024;

/// An upload's format, recognised from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    Zip,
    Tar,
    TarGz,
    Parquet,
}

/// Recognises the format from the file's first bytes (the name is never consulted).
pub(super) fn detect(file: &mut File) -> Result<Format, IngestError> {
    let mut head = Vec::with_capacity(512);
    file.by_ref().take(512).read_to_end(&mut head)?;
    file.seek(SeekFrom::Start(0))?;
    let format = match head.as_slice() {
        [] => return Err(IngestError::Unsupported("the upload is empty".into())),
        [b'P', b'K', 3, 4, ..] | [b'P', b'K', 5, 6, ..] | [b'P', b'K', 7, 8, ..] => Format::Zip,
        [b'P', b'A', b'R', b'1', ..] => Format::Parquet,
        [0x1f, 0x8b, ..] => {
            gz_holds_tar(file)?;
            Format::TarGz
        }
        head if is_tar_header(head) => Format::Tar,
        _ => {
            return Err(IngestError::Unsupported(
                "the upload is not a zip, tar or tar.gz archive, nor a Parquet file".into(),
            ));
        }
    };
    Ok(format)
}

/// Checks that a gzip stream starts with a tar header.
fn gz_holds_tar(file: &mut File) -> Result<(), IngestError> {
    let mut head = Vec::with_capacity(512);
    let read = flate2::read::MultiGzDecoder::new(BufReader::new(&mut *file)).take(512).read_to_end(&mut head);
    file.seek(SeekFrom::Start(0))?;
    if let Err(e) = read {
        return Err(IngestError::Corrupt(format!("the gzip stream is corrupt: {e}")));
    }
    if !is_tar_header(&head) {
        return Err(IngestError::Unsupported(
            "the upload is gzip-compressed but does not contain a tar archive".into(),
        ));
    }
    Ok(())
}

/// A 512-byte block with the POSIX/GNU `ustar` magic, or a pre-POSIX header with a valid checksum.
fn is_tar_header(block: &[u8]) -> bool {
    if block.len() < 512 {
        return false;
    }
    if &block[257..262] == b"ustar" {
        return true;
    }
    // The checksum field (148..156) counts as spaces; the stored value is octal.
    let sum: u64 = block[..512]
        .iter()
        .enumerate()
        .map(|(i, b)| if (148..156).contains(&i) { u64::from(b' ') } else { u64::from(*b) })
        .sum();
    let field = String::from_utf8_lossy(&block[148..156]);
    let stored = u64::from_str_radix(field.trim_matches(|c: char| c == '\0' || c == ' '), 8);
    block[0] != 0 && stored == Ok(sum)
}

/// Checks the first pass's totals: the sum of declared sizes of what will be read.
fn check_declared(plan: &Plan, entries: &[Entry], sink: &Sink<'_>) -> Result<(), IngestError> {
    let per_file = sink.limits.max_image_bytes.saturating_add(1);
    let declared = plan
        .actions
        .iter()
        .zip(entries)
        .filter(|(action, _)| matches!(action, Action::Read { .. }))
        .fold(0u64, |sum, (_, entry)| sum.saturating_add(entry.size.min(per_file)));
    if declared > sink.limits.max_extracted_bytes {
        return Err(sink.too_large());
    }
    Ok(())
}

fn too_many_entries(limit: u64) -> IngestError {
    IngestError::TooManyEntries(format!("the archive has more than the limit of {limit} entries"))
}

/// Ingests a zip archive. Entries are independent, so a damaged entry is rejected on its own.
pub(super) fn read_zip(mut file: File, sink: &mut Sink<'_>) -> Result<BTreeSet<String>, IngestError> {
    let limit = sink.limits.max_entries;
    // Checked before the zip reader indexes the central directory, which costs memory per entry.
    if let Some(directory) = zip_directory(&mut file)? {
        if directory.entries > limit {
            return Err(too_many_entries(limit));
        }
        if directory.size > MAX_CENTRAL_DIRECTORY_BYTES {
            return Err(IngestError::TooManyEntries(format!(
                "the zip's central directory is {} bytes, over the limit of {MAX_CENTRAL_DIRECTORY_BYTES}",
                directory.size
            )));
        }
    }
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| IngestError::Corrupt(format!("the zip archive cannot be read: {e}")))?;
    if zip.len() as u64 > limit {
        return Err(too_many_entries(limit));
    }
    // The zip reader indexes entries by name and keeps one per name, so a repeated name hides an
    // entry from us; and tools disagree on which copy such an archive means.
    if zip.has_duplicate_names() {
        return Err(IngestError::Corrupt(
            "the zip archive lists the same entry name more than once, which makes it ambiguous".into(),
        ));
    }
    let mut entries = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let entry =
            zip.by_index_data(i).map_err(|e| IngestError::Corrupt(format!("the zip archive cannot be read: {e}")))?;
        let kind = if entry.encrypted() {
            Kind::Unsupported("encrypted entry")
        } else if entry.is_dir() {
            Kind::Dir
        } else {
            match entry.unix_mode().map(|m| m & 0o170_000) {
                None | Some(0o100_000) | Some(0) => Kind::File,
                Some(0o040_000) => Kind::Dir,
                Some(0o120_000) => Kind::Symlink,
                Some(_) => Kind::Unsupported("device, pipe or socket"),
            }
        };
        // The zip reader decodes any name that is not valid UTF-8 as CP437 (the format's legacy
        // encoding), whatever the entry's UTF-8 flag says, so zip names always arrive as text;
        // should decoding fail, the raw bytes are rejected as not UTF-8. Names are never paths.
        let entry = match entry.name() {
            Ok(name) => Entry::new(name.as_bytes(), kind, entry.size()),
            Err(_) => Entry::new(entry.name_raw(), kind, entry.size()),
        };
        entries.push(entry);
    }
    let plan = layout::plan(&entries);
    check_declared(&plan, &entries, sink)?;
    sink.plan(entries.len() as u64);

    for (i, action) in plan.actions.iter().enumerate() {
        match action {
            Action::Read { file, .. } if entries[i].size > sink.limits.max_image_bytes => {
                let reason = sink.too_big_reason(Some(entries[i].size));
                sink.reject(file.clone(), reason);
            }
            Action::Read { file, label, split } => {
                let content = match zip.by_index(i) {
                    Ok(mut reader) => sink.read_entry(&mut reader, entries[i].size)?,
                    Err(e) => Err(io::Error::other(e)),
                };
                match content {
                    Ok(content) => sink.add(file.clone(), label.clone(), *split, content)?,
                    Err(e) => sink.reject(file.clone(), format!("cannot read this archive entry: {e}")),
                }
            }
            Action::Reject { file, reason } => sink.reject(file.clone(), reason.clone()),
            Action::Skip => {}
        }
        sink.entry_done()?;
    }
    Ok(plan.classes)
}

/// What a zip's end-of-central-directory record declares (zip64 included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ZipDirectory {
    entries: u64,
    /// Bytes of the central directory.
    size: u64,
}

/// The entry count and directory size the zip's end-of-central-directory record declares,
/// read before the zip reader builds its index.
fn zip_directory(file: &mut File) -> io::Result<Option<ZipDirectory>> {
    const EOCD: [u8; 4] = [b'P', b'K', 5, 6];
    const LOCATOR: [u8; 4] = [b'P', b'K', 6, 7];
    const EOCD64: [u8; 4] = [b'P', b'K', 6, 6];
    let len = file.seek(SeekFrom::End(0))?;
    // The record is 22 bytes plus a comment of at most 65535.
    let tail_len = len.min(22 + 65_535);
    file.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = Vec::with_capacity(tail_len as usize);
    file.by_ref().take(tail_len).read_to_end(&mut tail)?;
    file.seek(SeekFrom::Start(0))?;

    let Some(pos) = (0..tail.len().saturating_sub(21)).rev().find(|&p| tail[p..p + 4] == EOCD) else {
        return Ok(None);
    };
    let u16_at = |b: &[u8], at: usize| u64::from(u16::from_le_bytes([b[at], b[at + 1]]));
    let u32_at = |b: &[u8], at: usize| u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]));
    let u64_at = |b: &[u8], at: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(v)
    };
    let classic = ZipDirectory { entries: u16_at(&tail, pos + 10), size: u32_at(&tail, pos + 12) };
    let zip64 = classic.entries == 0xFFFF || classic.size == 0xFFFF_FFFF;
    if !zip64 || pos < 20 || tail[pos - 20..pos - 16] != LOCATOR {
        return Ok(Some(classic));
    }
    let offset = u64_at(&tail, pos - 12);
    let mut record = [0u8; 56];
    if offset.checked_add(56).is_none_or(|end| end > len) {
        return Ok(Some(classic));
    }
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(&mut record)?;
    file.seek(SeekFrom::Start(0))?;
    if record[..4] != EOCD64 {
        return Ok(Some(classic));
    }
    Ok(Some(ZipDirectory { entries: u64_at(&record, 32), size: u64_at(&record, 40) }))
}

/// Ingests a tar archive, gzip-compressed or not. A tar is one stream, so damage anywhere makes
/// the whole upload corrupt; the first pass finds it before anything is stored.
pub(super) fn read_tar(path: &Path, gzip: bool, sink: &mut Sink<'_>) -> Result<BTreeSet<String>, IngestError> {
    let open = || -> io::Result<Box<dyn Read>> {
        let file = BufReader::with_capacity(256 * 1024, File::open(path)?);
        Ok(if gzip { Box::new(flate2::read::MultiGzDecoder::new(file)) } else { Box::new(file) })
    };
    let limits = sink.limits.clone();
    let mut entries = Vec::new();
    // The first pass streams the whole archive (gigabytes, for a big tar.gz): it reports its
    // progress and stops on cancellation too.
    walk_tar(open()?, &limits, &mut |entry, _| {
        entries.push(entry);
        sink.listed(entries.len() as u64)
    })?;
    let plan = layout::plan(&entries);
    check_declared(&plan, &entries, sink)?;
    sink.plan(entries.len() as u64);

    let mut index = 0;
    walk_tar(open()?, &limits, &mut |entry, reader| {
        match &plan.actions[index] {
            Action::Read { file, .. } if entry.size > sink.limits.max_image_bytes => {
                let reason = sink.too_big_reason(Some(entry.size));
                sink.reject(file.clone(), reason);
            }
            Action::Read { file, label, split } => {
                let content = sink
                    .read_entry(reader, entry.size)?
                    .map_err(|e| IngestError::Corrupt(format!("the tar archive is damaged: {e}")))?;
                sink.add(file.clone(), label.clone(), *split, content)?;
            }
            Action::Reject { file, reason } => sink.reject(file.clone(), reason.clone()),
            Action::Skip => {}
        }
        index += 1;
        sink.entry_done()?;
        Ok(())
    })?;
    Ok(plan.classes)
}

/// Calls `visit` for every member of a tar stream with its header and a reader over its data.
///
/// The tar crate runs in raw mode, and GNU long names and PAX headers are handled here with a size
/// cap: the crate itself would read them into memory whatever their size. Every byte of a tar
/// stream is read through, so the sum of all entry sizes is checked against the unpack limit
/// before any entry's data is skipped or read, which stops tar bombs in the first pass.
fn walk_tar(
    reader: Box<dyn Read>,
    limits: &super::IngestLimits,
    visit: &mut dyn FnMut(Entry, &mut dyn Read) -> Result<(), IngestError>,
) -> Result<(), IngestError> {
    let corrupt = |e: io::Error| IngestError::Corrupt(format!("the tar archive is damaged: {e}"));
    let mut archive = tar::Archive::new(reader);
    let mut raw_entries = 0u64;
    let mut streamed = 0u64;
    let mut long_name: Option<Vec<u8>> = None;
    let mut pax_name: Option<Vec<u8>> = None;
    for member in archive.entries().map_err(corrupt)?.raw(true) {
        let mut member = member.map_err(corrupt)?;
        raw_entries += 1;
        if raw_entries > limits.max_entries {
            return Err(too_many_entries(limits.max_entries));
        }
        let size = member.header().entry_size().map_err(corrupt)?;
        streamed = streamed.saturating_add(size);
        if streamed > limits.max_extracted_bytes {
            return Err(IngestError::TooLarge(format!(
                "the upload unpacks to more than the limit of {} bytes",
                limits.max_extracted_bytes
            )));
        }
        let entry_type = member.header().entry_type();
        match entry_type {
            tar::EntryType::GNULongName => {
                let mut name = read_capped(&mut member, MAX_LONG_NAME_BYTES, "GNU long name").map_err(corrupt)?;
                while name.last() == Some(&0) {
                    name.pop();
                }
                long_name = Some(name);
                continue;
            }
            tar::EntryType::XHeader => {
                let pax = read_capped(&mut member, MAX_PAX_BYTES, "PAX header").map_err(corrupt)?;
                pax_name = tar::PaxExtensions::new(&pax)
                    .filter_map(Result::ok)
                    .find(|ext| ext.key_bytes() == b"path")
                    .map(|ext| ext.value_bytes().to_vec());
                continue;
            }
            // Link targets are never used, and global PAX headers carry nothing we read.
            tar::EntryType::GNULongLink | tar::EntryType::XGlobalHeader => continue,
            _ => {}
        }
        let name = pax_name.take().or(long_name.take()).unwrap_or_else(|| member.path_bytes().into_owned());
        let kind = match entry_type {
            tar::EntryType::Regular | tar::EntryType::Continuous if name.ends_with(b"/") => Kind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Symlink => Kind::Symlink,
            tar::EntryType::Link => Kind::HardLink,
            tar::EntryType::Char => Kind::Unsupported("character device"),
            tar::EntryType::Block => Kind::Unsupported("block device"),
            tar::EntryType::Fifo => Kind::Unsupported("named pipe"),
            tar::EntryType::GNUSparse => Kind::Unsupported("sparse file"),
            _ => Kind::Unsupported("unknown tar entry type"),
        };
        visit(Entry::new(&name, kind, size), &mut member)?;
    }
    Ok(())
}

/// Reads a small metadata member whole, refusing one over `cap` bytes.
fn read_capped(reader: &mut dyn Read, cap: u64, what: &str) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(io::Error::other(format!("{what} entry is larger than {cap} bytes")));
    }
    Ok(bytes)
}

/// Ingests a local folder laid out like an archive. Links are reported, never followed.
pub(super) fn read_folder(root: &Path, sink: &mut Sink<'_>) -> Result<BTreeSet<String>, IngestError> {
    let mut entries = Vec::new();
    let mut paths = Vec::new();
    walk_folder(root, &mut Vec::new(), sink.limits.max_entries, &mut entries, &mut paths)?;
    let plan = layout::plan(&entries);
    check_declared(&plan, &entries, sink)?;
    sink.plan(entries.len() as u64);

    for (i, action) in plan.actions.iter().enumerate() {
        match action {
            Action::Read { file, .. } if entries[i].size > sink.limits.max_image_bytes => {
                let reason = sink.too_big_reason(Some(entries[i].size));
                sink.reject(file.clone(), reason);
            }
            Action::Read { file, label, split } => match open_regular(&paths[i]) {
                Ok(mut f) => match sink.read_entry(&mut f, entries[i].size)? {
                    Ok(content) => sink.add(file.clone(), label.clone(), *split, content)?,
                    Err(e) => sink.reject(file.clone(), format!("cannot read file: {e}")),
                },
                Err(e) => sink.reject(file.clone(), format!("cannot read file: {e}")),
            },
            Action::Reject { file, reason } => sink.reject(file.clone(), reason.clone()),
            Action::Skip => {}
        }
        sink.entry_done()?;
    }
    Ok(plan.classes)
}

/// Opens `path` only if it is still a regular file (it may have been swapped for a link since the
/// walk).
fn open_regular(path: &Path) -> io::Result<File> {
    if !std::fs::symlink_metadata(path)?.file_type().is_file() {
        return Err(io::Error::other("no longer a regular file"));
    }
    File::open(path)
}

/// Lists a folder depth-first in name order, without following links.
fn walk_folder(
    dir: &Path,
    prefix: &mut Vec<String>,
    limit: u64,
    entries: &mut Vec<Entry>,
    paths: &mut Vec<PathBuf>,
) -> Result<(), IngestError> {
    let mut children: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    children.sort_by_key(|c| c.file_name());
    for child in children {
        if entries.len() as u64 >= limit {
            return Err(too_many_entries(limit));
        }
        let os_name = child.file_name();
        let utf8 = os_name.to_str().is_some();
        prefix.push(os_name.to_string_lossy().into_owned());
        let name = prefix.join("/");
        let file_type = child.file_type()?;
        let (kind, size) = if file_type.is_symlink() {
            (Kind::Symlink, 0)
        } else if file_type.is_dir() {
            (
                if prefix.len() > MAX_FOLDER_DEPTH {
                    Kind::Unsupported("folder nested too deeply; not read")
                } else {
                    Kind::Dir
                },
                0,
            )
        } else if file_type.is_file() {
            (Kind::File, child.metadata()?.len())
        } else {
            (Kind::Unsupported("device, pipe or socket"), 0)
        };
        let descend = kind == Kind::Dir && utf8;
        entries.push(Entry { utf8, ..Entry::new(name.as_bytes(), kind, size) });
        paths.push(child.path());
        if descend {
            walk_folder(&child.path(), prefix, limit, entries, paths)?;
        }
        prefix.pop();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Cursor, Write};

    use super::*;

    fn detect_bytes(bytes: &[u8]) -> Result<Format, IngestError> {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        file.seek(SeekFrom::Start(0)).unwrap();
        detect(&mut file)
    }

    fn tar_bytes() -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(3);
        header.set_cksum();
        builder.append_data(&mut header, "cat/a.png", &b"abc"[..]).unwrap();
        builder.into_inner().unwrap()
    }

    #[test]
    fn formats_are_recognised_by_content() {
        assert_eq!(detect_bytes(b"PK\x03\x04rest").unwrap(), Format::Zip);
        assert_eq!(detect_bytes(b"PAR1....").unwrap(), Format::Parquet);
        assert_eq!(detect_bytes(&tar_bytes()).unwrap(), Format::Tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar_bytes()).unwrap();
        assert_eq!(detect_bytes(&gz.finish().unwrap()).unwrap(), Format::TarGz);
    }

    #[test]
    fn other_content_is_unsupported() {
        assert!(matches!(detect_bytes(b""), Err(IngestError::Unsupported(_))));
        assert!(matches!(detect_bytes(b"hello, world"), Err(IngestError::Unsupported(_))));
        assert!(matches!(detect_bytes(&[0u8; 1024]), Err(IngestError::Unsupported(_))));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&[7u8; 2048]).unwrap();
        assert!(matches!(detect_bytes(&gz.finish().unwrap()), Err(IngestError::Unsupported(_))));
        assert!(matches!(detect_bytes(b"\x1f\x8bnot really gzip"), Err(IngestError::Corrupt(_))));
    }

    #[test]
    fn zip_entry_count_is_read_from_the_end_record() {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for i in 0..5 {
            writer.start_file(format!("cat/{i}.png"), zip::write::SimpleFileOptions::default()).unwrap();
        }
        let bytes = writer.finish().unwrap().into_inner();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();
        let directory = zip_directory(&mut file).unwrap().unwrap();
        assert_eq!(directory.entries, 5);
        // Five headers of 46 bytes plus a 9-byte name each (and any extra fields the writer adds).
        assert!((5 * (46 + 9)..5 * 200).contains(&directory.size), "{directory:?}");
        let mut not_zip = tempfile::tempfile().unwrap();
        not_zip.write_all(b"tiny").unwrap();
        assert_eq!(zip_directory(&mut not_zip).unwrap(), None);
    }

    fn png(seed: u8) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(8, 8, image::Rgb([seed, 0, 0]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[cfg(unix)]
    #[test]
    fn a_folder_is_ingested_without_following_links() {
        use super::super::{BlobStore, IngestLimits, Progress, Split, ingest};

        let src = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.png"), png(9)).unwrap();
        let root = src.path().join("pets");
        for (dir, n) in [("train/cat", 2u8), ("train/dog", 1), ("test/dog", 1)] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            for i in 0..n {
                std::fs::write(root.join(dir).join(format!("{i}.png")), png(i * 10 + n)).unwrap();
            }
        }
        std::os::unix::fs::symlink(outside.path().join("secret.png"), root.join("train/cat/link.png")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("train/bird")).unwrap();
        std::fs::write(root.join("train/cat/.DS_Store"), b"junk").unwrap();

        let store_dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(store_dir.path()).unwrap();
        let mut seen = Vec::new();
        let ingested = ingest(src.path(), &store, &IngestLimits::default(), &mut |p| seen.push(p)).unwrap();

        assert_eq!(ingested.classes, vec!["cat", "dog"]);
        assert_eq!(ingested.images.len(), 4);
        assert!(ingested.images.iter().any(|i| i.file == "pets/test/dog/0.png" && i.split == Split::Test));
        let rejected: Vec<(&str, &str)> =
            ingested.rejected.iter().map(|r| (r.file.as_str(), r.reason.as_str())).collect();
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(rejected.iter().all(|(_, reason)| reason.contains("symbolic link")), "{rejected:?}");
        assert!(!store.list().unwrap().contains(&BlobStore::hash(&png(9))));
        // Every entry was counted: 6 folders, 2 links, 4 images and the clutter file.
        // A folder is listed at once: its check counts up to its 13 entries.
        let want: Vec<_> = (0..=13).map(|checked| Progress::Checking { checked, entries: 13 }).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn a_zip_entry_larger_than_its_header_says_is_rejected() {
        use super::super::{BlobStore, IngestLimits, ingest};

        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        writer.start_file("cat/liar.png", opts).unwrap();
        writer.write_all(&vec![0u8; 4 << 20]).unwrap();
        for (name, seed) in [("cat/ok.png", 1), ("dog/ok.png", 2)] {
            writer.start_file(name, opts).unwrap();
            writer.write_all(&png(seed)).unwrap();
        }
        let mut bytes = writer.finish().unwrap().into_inner();
        // Rewrite the declared size (local and central headers) from 4 MiB to 100 bytes.
        let declared = (4u32 << 20).to_le_bytes();
        let mut patched = 0;
        for i in 0..bytes.len() - 4 {
            if bytes[i..i + 4] == declared {
                bytes[i..i + 4].copy_from_slice(&100u32.to_le_bytes());
                patched += 1;
            }
        }
        assert_eq!(patched, 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("liar.zip");
        std::fs::write(&path, &bytes).unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let limits = IngestLimits { max_image_bytes: 1 << 20, ..IngestLimits::default() };

        let ingested = ingest(&path, &store, &limits, &mut |_| {}).unwrap();
        assert_eq!(ingested.images.len(), 2);
        assert_eq!(ingested.rejected.len(), 1);
        assert_eq!(ingested.rejected[0].file, "cat/liar.png");
        assert!(ingested.rejected[0].reason.contains("larger than its declared"), "{:?}", ingested.rejected);
    }

    /// Appends a raw tar member of `entry_type` with `data`, named `name` in the classic header.
    fn raw_member(builder: &mut tar::Builder<Vec<u8>>, entry_type: tar::EntryType, name: &str, data: &[u8]) {
        let mut header = tar::Header::new_ustar();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(entry_type);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }

    /// Every progress report of ingesting `bytes` (named `name`), which must succeed.
    fn progress_of(name: &str, bytes: &[u8]) -> Vec<super::super::Progress> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let store = super::super::BlobStore::open(dir.path().join("blobs")).unwrap();
        let mut seen = Vec::new();
        super::super::ingest(&path, &store, &super::super::IngestLimits::default(), &mut |p| seen.push(p)).unwrap();
        seen
    }

    /// A tar reports each member its first pass lists, then each entry its second checks, out of
    /// the number listed; a zip lists its entries at once and reports the check alone.
    #[test]
    fn progress_counts_every_entry_of_each_pass() {
        use super::super::Progress::{Checking, Listing};

        let members = [("pets/cat/1.png", png(1)), ("pets/cat/2.png", png(2)), ("pets/dog/1.png", png(3)), ("pets/notes.txt", b"x".to_vec())];
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in &members {
            raw_member(&mut builder, tar::EntryType::Regular, name, data);
        }
        let checks: Vec<_> = (0..=4).map(|checked| Checking { checked, entries: 4 }).collect();
        let listing: Vec<_> = (1..=4).map(|listed| Listing { listed }).collect();
        assert_eq!(progress_of("x.tar", &builder.into_inner().unwrap()), [listing, checks.clone()].concat());

        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, data) in &members {
            zip.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
            zip.write_all(data).unwrap();
        }
        assert_eq!(progress_of("x.zip", &zip.finish().unwrap().into_inner()), checks);
    }

    fn ingest_tar(bytes: &[u8]) -> Result<super::super::Ingested, IngestError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.tar");
        std::fs::write(&path, bytes).unwrap();
        let store = super::super::BlobStore::open(dir.path().join("blobs")).unwrap();
        super::super::ingest(&path, &store, &super::super::IngestLimits::default(), &mut |_| {})
    }

    #[test]
    fn tar_long_names_and_pax_paths_are_honoured() {
        let long = format!("cat/{}.png", "a".repeat(150));
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(png(1).len() as u64);
        header.set_mode(0o644);
        // The tar crate writes a GNU long-name member for a path this long.
        builder.append_data(&mut header, &long, png(1).as_slice()).unwrap();
        raw_member(&mut builder, tar::EntryType::XHeader, "PaxHeader", b"20 path=dog/pax.png\n");
        raw_member(&mut builder, tar::EntryType::Regular, "ignored.png", &png(2));
        let ingested = ingest_tar(&builder.into_inner().unwrap()).unwrap();
        let files: Vec<&str> = ingested.images.iter().map(|i| i.file.as_str()).collect();
        assert_eq!(files, vec![long.as_str(), "dog/pax.png"]);
    }

    #[test]
    fn an_oversized_tar_long_name_is_refused_without_buffering_it() {
        let mut builder = tar::Builder::new(Vec::new());
        raw_member(&mut builder, tar::EntryType::GNULongName, "././@LongLink", &vec![b'a'; 200 * 1024]);
        raw_member(&mut builder, tar::EntryType::Regular, "cat/a.png", &png(1));
        let err = ingest_tar(&builder.into_inner().unwrap()).unwrap_err();
        assert!(matches!(err, IngestError::Corrupt(ref m) if m.contains("long name")), "{err:?}");
    }

    #[test]
    fn a_zip_repeating_an_entry_name_is_refused() {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, seed) in [("cat/a.png", 1), ("cat/b.png", 2), ("dog/c.png", 3)] {
            writer.start_file(name, zip::write::SimpleFileOptions::default()).unwrap();
            writer.write_all(&png(seed)).unwrap();
        }
        let mut bytes = writer.finish().unwrap().into_inner();
        // Rename the second entry to the first's name, in its local and central headers.
        let mut renamed = 0;
        for i in 0..bytes.len() - 9 {
            if &bytes[i..i + 9] == b"cat/b.png" {
                bytes[i..i + 9].copy_from_slice(b"cat/a.png");
                renamed += 1;
            }
        }
        assert_eq!(renamed, 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dup.zip");
        std::fs::write(&path, &bytes).unwrap();
        let store = super::super::BlobStore::open(dir.path().join("blobs")).unwrap();
        let err = super::super::ingest(&path, &store, &super::super::IngestLimits::default(), &mut |_| {}).unwrap_err();
        assert!(matches!(err, IngestError::Corrupt(ref m) if m.contains("more than once")), "{err:?}");
    }
}
