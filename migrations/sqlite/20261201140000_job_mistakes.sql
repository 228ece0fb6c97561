-- The validation images a job's model got wrong at each epoch, most confident first (at most
-- 100 per epoch), for the console: the image's blob and file name, its class, the predicted one.
create table job_mistakes (
    job_id     text not null references jobs (id) on delete cascade,
    epoch      integer not null,
    rank       integer not null,   -- 0 = the most confident mistake
    blob       text not null,
    file       text not null,
    label      text not null,
    predicted  text not null,
    score      real not null,
    primary key (job_id, epoch, rank)
);
