//! Queries on `datasets` and `dataset_images`.
