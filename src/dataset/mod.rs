//! Dataset ingest: archives and Parquet files become validated images in the blob store.
