-- The phase a job is in (loading, features, probe, training, validating, saving) and its
-- progress within it; `phase_rate` is per second of `phase_done` where the phase has a rate.
alter table jobs add column phase text;
alter table jobs add column phase_done integer not null default 0;
alter table jobs add column phase_total integer not null default 0;
alter table jobs add column phase_rate real;
