-- Each image's shapes turned by each quarter, of the picture and of its mirror image
-- (`dataset::look_alike::Look::turned`: six u64s, 8 bytes each, little-endian), so that turned
-- copies are found as look-alikes too; null for images stored before they were taken.
alter table dataset_images add column look_turned blob;
-- Every dataset's look-alike report is worked out again, with turned copies: the background
-- fill-in (`look_backfill`) fingerprints the images again and stores the new report.
update datasets set look_alikes = null;
