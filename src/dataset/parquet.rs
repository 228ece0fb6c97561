//! Parquet files as Hugging Face `datasets` exports them: an `image` struct column holding the
//! encoded file (`bytes`) and its original name (`path`), an integer label column (`label` or
//! `labels`, else the only integer column) whose class names come from the `huggingface` key-value
//! metadata (`info.features.<label>.names`, a ClassLabel), and optionally a `split` column.
//!
//! Rows are read one row group at a time, a few rows per batch, through the row API. Images whose
//! bytes are missing (a `path` alone would point at the exporter's disk) are rejected, never read.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use parquet::basic::{ConvertedType, LogicalType, Type as PhysicalType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::TreeBuilder;
use parquet::record::{Field, Row};
use parquet::schema::types::{SchemaDescriptor, Type, TypePtr};

use super::{IngestError, Sink, Split};

/// Rows decoded per batch: few, because each holds a whole image.
const ROW_BATCH: usize = 8;
/// Largest footer (schema and row-group index) read; real ones are kilobytes.
const MAX_FOOTER_BYTES: u64 = 64 * 1024 * 1024;

/// The columns used, found in the file's schema.
struct Columns {
    image: TypePtr,
    label: TypePtr,
    split: Option<TypePtr>,
}

/// A row's label before it is mapped to a class name.
enum Label {
    Int(i64),
    Text(String),
    Missing,
}

/// Ingests a Parquet file.
pub(super) fn read(mut file: File, sink: &mut Sink<'_>) -> Result<BTreeSet<String>, IngestError> {
    check_footer(&mut file)?;
    read_rows(file, sink)
}

fn corrupt(e: impl std::fmt::Display) -> IngestError {
    IngestError::Corrupt(format!("the Parquet file is damaged: {e}"))
}

/// Refuses a footer whose declared length would make the reader allocate more than we accept.
fn check_footer(file: &mut File) -> Result<(), IngestError> {
    let len = file.seek(SeekFrom::End(0))?;
    if len < 12 {
        return Err(corrupt("file too short"));
    }
    file.seek(SeekFrom::End(-8))?;
    let mut tail = [0u8; 8];
    file.read_exact(&mut tail)?;
    file.seek(SeekFrom::Start(0))?;
    if &tail[4..] != b"PAR1" {
        return Err(corrupt("no Parquet footer (the file may be truncated)"));
    }
    let footer = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if footer > MAX_FOOTER_BYTES {
        return Err(IngestError::TooLarge(format!(
            "the Parquet footer is {footer} bytes, over the limit of {MAX_FOOTER_BYTES}"
        )));
    }
    if footer + 8 > len {
        return Err(corrupt("the footer is longer than the file"));
    }
    let mut bytes = vec![0u8; footer as usize];
    file.seek(SeekFrom::Start(len - 8 - footer))?;
    file.read_exact(&mut bytes)?;
    file.seek(SeekFrom::Start(0))?;
    super::parquet_pages::check_footer(&bytes)
}

fn read_rows(file: File, sink: &mut Sink<'_>) -> Result<BTreeSet<String>, IngestError> {
    let pages = file.try_clone()?;
    let reader = SerializedFileReader::new(file).map_err(corrupt)?;
    let metadata = reader.metadata();
    let file_meta = metadata.file_metadata();
    let columns = find_columns(file_meta.schema())?;
    let names = class_names(file_meta.key_value_metadata(), columns.label.name());

    let limits = sink.limits;
    // The rows read are those of the row groups, whatever the file's own count says.
    let count = |n: i64| u64::try_from(n).unwrap_or(u64::MAX);
    let group_rows = metadata.row_groups().iter().map(|rg| count(rg.num_rows())).fold(0, u64::saturating_add);
    let rows = group_rows.max(count(file_meta.num_rows()));
    if rows > limits.max_entries {
        return Err(IngestError::TooManyEntries(format!(
            "the Parquet file has {rows} rows, over the limit of {}",
            limits.max_entries
        )));
    }
    let image_bytes: u64 = metadata
        .row_groups()
        .iter()
        .flat_map(|rg| rg.columns())
        .filter(|c| c.column_path().parts().first().map(String::as_str) == Some(columns.image.name()))
        .map(|c| u64::try_from(c.uncompressed_size()).unwrap_or(u64::MAX))
        .fold(0, u64::saturating_add);
    if image_bytes > limits.max_extracted_bytes {
        return Err(sink.too_large());
    }

    let mut fields = vec![columns.image.clone(), columns.label.clone()];
    fields.extend(columns.split.clone());
    let read: Vec<&str> = fields.iter().map(|f| f.name()).collect();
    super::parquet_pages::check(&pages, metadata, &read)?;
    let projection = Type::group_type_builder("schema").with_fields(fields).build().map_err(corrupt)?;
    let descr = Arc::new(SchemaDescriptor::new(Arc::new(projection)));

    sink.plan(group_rows);
    let mut index = 0u64;
    for group in 0..reader.num_row_groups() {
        let group_reader = reader.get_row_group(group).map_err(corrupt)?;
        let rows =
            TreeBuilder::new().with_batch_size(ROW_BATCH).as_iter(descr.clone(), &*group_reader).map_err(corrupt)?;
        for row in rows {
            let row = row.map_err(corrupt)?;
            add_row(&row, index, &columns, names.as_deref(), sink)?;
            index += 1;
            sink.entry_done()?;
        }
    }
    // The declared classes, less the names no class can have (their rows are rejected, saying why).
    Ok(names.unwrap_or_default().into_iter().filter(|n| super::layout::unfit_class_name(n).is_none()).collect())
}

/// Validates and stores one row, or rejects it.
fn add_row(
    row: &Row,
    index: u64,
    columns: &Columns,
    names: Option<&[String]>,
    sink: &mut Sink<'_>,
) -> Result<(), IngestError> {
    let mut image = None;
    let mut label = Label::Missing;
    let mut split = Ok(Split::Train);
    for (name, field) in row.get_column_iter() {
        if name == columns.image.name() {
            image = Some(field);
        } else if name == columns.label.name() {
            label = label_of(field);
        } else if columns.split.as_ref().is_some_and(|s| s.name() == name) {
            split = split_of(field);
        }
    }
    let (bytes, path) = match image {
        Some(Field::Group(image)) => image_parts(image),
        _ => (None, None),
    };
    let file = path.filter(|p| !p.is_empty()).unwrap_or_else(|| format!("row {index}"));
    if let Some(reason) = super::layout::unfit_file_name(&file) {
        sink.reject(super::layout::shown(&file), reason);
        return Ok(());
    }
    let split = match split {
        Ok(split) => split,
        Err(reason) => {
            sink.reject(file, reason);
            return Ok(());
        }
    };
    let fit = |class: String| super::layout::unfit_class_name(&class).map_or(Ok(class), Err);
    let class = match class_of(label, names).and_then(fit) {
        Ok(class) => class,
        Err(reason) => {
            sink.reject(file, reason);
            return Ok(());
        }
    };
    let Some(bytes) = bytes else {
        sink.reject(file, "no embedded image bytes (a path alone is never read)");
        return Ok(());
    };
    if bytes.len() as u64 > sink.limits.max_image_bytes {
        let reason = sink.too_big_reason(Some(bytes.len() as u64));
        sink.reject(file, reason);
        return Ok(());
    }
    let content = sink.read_entry(&mut &bytes[..], bytes.len() as u64)?.map_err(IngestError::Io)?;
    sink.add(file, class, split, content)
}

/// The `bytes` and `path` of an image struct.
fn image_parts(image: &Row) -> (Option<&[u8]>, Option<String>) {
    let mut bytes = None;
    let mut path = None;
    for (name, field) in image.get_column_iter() {
        match (name.as_str(), field) {
            ("bytes", Field::Bytes(b)) => bytes = Some(b.data()),
            ("path", Field::Str(s)) => path = Some(s.clone()),
            ("path", Field::Bytes(b)) => path = Some(String::from_utf8_lossy(b.data()).into_owned()),
            _ => {}
        }
    }
    (bytes, path)
}

fn label_of(field: &Field) -> Label {
    let int = match field {
        Field::Byte(v) => Some(i64::from(*v)),
        Field::Short(v) => Some(i64::from(*v)),
        Field::Int(v) => Some(i64::from(*v)),
        Field::Long(v) => Some(*v),
        Field::UByte(v) => Some(i64::from(*v)),
        Field::UShort(v) => Some(i64::from(*v)),
        Field::UInt(v) => Some(i64::from(*v)),
        Field::ULong(v) => Some(i64::try_from(*v).unwrap_or(i64::MAX)),
        Field::Str(s) => return Label::Text(s.clone()),
        Field::Bytes(b) => return Label::Text(String::from_utf8_lossy(b.data()).into_owned()),
        _ => None,
    };
    int.map_or(Label::Missing, Label::Int)
}

fn split_of(field: &Field) -> Result<Split, String> {
    let name = match field {
        Field::Null => return Ok(Split::Train),
        Field::Str(s) => s.clone(),
        Field::Bytes(b) => String::from_utf8_lossy(b.data()).into_owned(),
        other => other.to_string(),
    };
    name.parse().map_err(|e: super::UnknownSplit| e.to_string())
}

/// The class name of a label: a ClassLabel name when the file has them, else the label itself.
fn class_of(label: Label, names: Option<&[String]>) -> Result<String, String> {
    match (label, names) {
        (Label::Missing, _) => Err("row has no label".into()),
        // Hugging Face writes -1 for "no label" (e.g. unlabelled test splits).
        (Label::Int(n), _) if n < 0 => Err(format!("row has no label ({n})")),
        (Label::Int(n), Some(names)) => usize::try_from(n)
            .ok()
            .and_then(|i| names.get(i))
            .cloned()
            .ok_or_else(|| format!("label {n} is outside the {} class names", names.len())),
        (Label::Int(n), None) => Ok(n.to_string()),
        (Label::Text(s), _) if s.trim().is_empty() => Err("row has an empty label".into()),
        (Label::Text(s), _) => Ok(s),
    }
}

fn is_int(t: &Type) -> bool {
    matches!(t, Type::PrimitiveType { physical_type: PhysicalType::INT32 | PhysicalType::INT64, .. })
}

fn is_text(t: &Type) -> bool {
    matches!(t, Type::PrimitiveType { physical_type: PhysicalType::BYTE_ARRAY, .. })
        && (matches!(t.get_basic_info().logical_type_ref(), Some(LogicalType::String))
            || t.get_basic_info().converted_type() == ConvertedType::UTF8)
}

/// A struct with a binary `bytes` member, as the `datasets` Image feature is stored.
fn is_image_struct(t: &Type) -> bool {
    match t {
        Type::GroupType { fields, .. } => fields.iter().any(|f| {
            f.name() == "bytes" && matches!(**f, Type::PrimitiveType { physical_type: PhysicalType::BYTE_ARRAY, .. })
        }),
        Type::PrimitiveType { .. } => false,
    }
}

fn find_columns(schema: &Type) -> Result<Columns, IngestError> {
    let fields = schema.get_fields();
    let named = |names: &[&str], pred: fn(&Type) -> bool| {
        names.iter().find_map(|n| fields.iter().find(|f| f.name() == *n && pred(f))).cloned()
    };
    let only = |pred: fn(&Type) -> bool| {
        let mut matching = fields.iter().filter(|f| pred(f));
        match (matching.next(), matching.next()) {
            (Some(f), None) => Some(f.clone()),
            _ => None,
        }
    };
    let image = named(&["image", "img"], is_image_struct).or_else(|| only(is_image_struct)).ok_or_else(|| {
        IngestError::InvalidParquet(
            "the Parquet file has no image column (expected a struct column 'image' with a binary 'bytes' \
             field, as Hugging Face datasets writes it)"
                .into(),
        )
    })?;
    let label = named(&["label", "labels"], is_int)
        .or_else(|| named(&["label", "labels"], is_text))
        .or_else(|| only(is_int))
        .ok_or_else(|| {
            IngestError::InvalidParquet(
                "the Parquet file has no label column (expected an integer column 'label' or 'labels')".into(),
            )
        })?;
    let split = named(&["split"], is_text);
    Ok(Columns { image, label, split })
}

/// The ClassLabel names of `label_column` from the `huggingface` key-value metadata, if any.
fn class_names(kv: Option<&Vec<parquet::file::metadata::KeyValue>>, label_column: &str) -> Option<Vec<String>> {
    let json = kv?.iter().find(|kv| kv.key == "huggingface")?.value.as_deref()?;
    let meta: serde_json::Value = serde_json::from_str(json).ok()?;
    let names = meta.pointer(&format!("/info/features/{label_column}/names"))?.as_array()?;
    names.iter().map(|n| n.as_str().map(str::to_string)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_come_from_the_huggingface_metadata() {
        let kv = vec![parquet::file::metadata::KeyValue::new(
            "huggingface".to_string(),
            r#"{"info": {"features": {"image": {"_type": "Image"}, "label": {"names": ["cat", "dog"], "_type": "ClassLabel"}}}}"#
                .to_string(),
        )];
        assert_eq!(class_names(Some(&kv), "label"), Some(vec!["cat".to_string(), "dog".to_string()]));
        assert_eq!(class_names(Some(&kv), "labels"), None);
        assert_eq!(class_names(None, "label"), None);
    }

    #[test]
    fn labels_map_to_class_names() {
        let names = ["cat".to_string(), "dog".to_string()];
        assert_eq!(class_of(Label::Int(1), Some(&names)), Ok("dog".into()));
        assert!(class_of(Label::Int(2), Some(&names)).unwrap_err().contains("outside"));
        assert!(class_of(Label::Int(-1), Some(&names)).unwrap_err().contains("no label"));
        assert_eq!(class_of(Label::Int(7), None), Ok("7".into()));
        assert_eq!(class_of(Label::Text("bird".into()), Some(&names)), Ok("bird".into()));
        assert!(class_of(Label::Missing, None).is_err());
    }
}
