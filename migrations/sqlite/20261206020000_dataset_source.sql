-- Where a dataset made as a corrected copy of another came from, and what changed (JSON,
-- `dataset::edits::Source`); null for an uploaded dataset.
alter table datasets add column source text;
