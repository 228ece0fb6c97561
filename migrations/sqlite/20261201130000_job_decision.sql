-- What the auto recipe decided after its probe epoch (or why the time budget ended the run):
-- JSON {"action", "epochs", "reason"}.
alter table jobs add column decision text;
