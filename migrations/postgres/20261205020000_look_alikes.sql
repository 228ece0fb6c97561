-- Each image's look-alike fingerprint (`dataset::look_alike::Look`: its shape, a u64 stored as
-- the signed integer of the same bits, and its mean colour), taken when it is decoded at upload;
-- null for images stored before fingerprints were taken.
alter table dataset_images add column look bigint;
alter table dataset_images add column look_colour integer;
-- The dataset's images that look alike though their files differ (JSON, `dataset::Duplicates`),
-- worked out at upload; null for a dataset with an image that has no fingerprint.
alter table datasets add column look_alikes text;
