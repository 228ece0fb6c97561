-- The reports of repeated files and of look-alikes are worked out again: their files now name
-- their blobs (`dataset::DuplicateFile::blob`), for the console's thumbnails. A dataset's
-- repeated files are worked out when it is next read, its look-alikes by the background fill-in.
update datasets set duplicates = null;
update datasets set look_alikes = null;
