-- The claim (`attempts`) under which the job last wrote a checkpoint. A job claimed more than
-- worker::MAX_CLAIMS times since, every run of which ended without an outcome, is not run again;
-- one that makes progress is, however often it is interrupted. Jobs already there count from now.
alter table jobs add column progress_claim bigint not null default 0;
update jobs set progress_claim = attempts;
