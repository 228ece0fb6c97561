-- Uploads list at most their first 1000 rejected files (`rejected`); this counts them all.
alter table datasets add column rejected_total integer not null default 0;
update datasets set rejected_total = json_array_length(rejected);
