-- Each image's mirror image's shape (`dataset::look_alike::Look::mirror`, a u64 stored as the
-- signed integer of the same bits), so that mirrored copies are found as look-alikes too; null
-- for images stored before it was taken.
alter table dataset_images add column look_mirror bigint;
-- Every dataset's look-alike report is worked out again, with mirror images: the background
-- fill-in (`look_backfill`) fingerprints the images again and stores the new report.
update datasets set look_alikes = null;
