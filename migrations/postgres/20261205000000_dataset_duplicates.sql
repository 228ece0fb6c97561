-- The dataset's images that are the same file (JSON, `dataset::Duplicates`), worked out at
-- upload. Datasets stored before this column have it null until first read, when the service
-- works it out from their images and stores it.
alter table datasets add column duplicates text;
