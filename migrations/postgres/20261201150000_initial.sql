-- The PostgreSQL schema: the same tables and columns as the SQLite migrations in
-- `migrations/sqlite/` arrive at, in one step (this backend has no older databases to upgrade).
-- Timestamps are RFC 3339 UTC text, ids are UUIDv7 text and structured fields are JSON text, as on
-- SQLite, so every query is the same text on both backends. Integers are `bigint` and reals
-- `double precision` because SQLite's are 64 bits.

create table datasets (
    id             text primary key,
    name           text not null,
    created_at     text not null,
    num_images     bigint not null,
    classes        text not null,   -- JSON array of class names, sorted
    counts         text not null,   -- JSON {"train": {class: n}, "validation": {...}, "test": {...}}
    rejected       text not null,   -- JSON [{"file", "reason"}], the first 1000
    rejected_total bigint not null default 0
);
create index datasets_created on datasets (created_at desc);

create table dataset_images (
    -- Upload order. SQLite has an implicit `rowid`; naming this column the same keeps the
    -- queries' `order by rowid` one text for both backends.
    rowid       bigint generated always as identity,
    dataset_id  text not null references datasets (id) on delete cascade,
    blob        text not null,   -- SHA-256 hex of the stored file
    label       text not null,
    split       text not null check (split in ('train', 'validation', 'test')),
    file        text not null    -- the name it had in the upload
);
create index dataset_images_dataset on dataset_images (dataset_id, split, rowid);
create index dataset_images_blob on dataset_images (blob);

create table jobs (
    id               text primary key,
    dataset_id       text not null,  -- no foreign key: a finished job outlives its dataset
    base_model       text not null,
    params           text not null,  -- JSON, every default filled in
    recipe           text not null,
    status           text not null check (status in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    epoch            bigint not null default 0,
    epochs           bigint not null,
    step             bigint not null default 0,
    steps            bigint not null default 0,
    created_at       text not null,
    started_at       text,
    finished_at      text,
    error            text,
    model_id         text,
    device           text,
    cancel_requested bigint not null default 0,
    attempts         bigint not null default 0,
    phase            text,
    phase_done       bigint not null default 0,
    phase_total      bigint not null default 0,
    phase_rate       double precision,
    decision         text,
    worker           text,   -- who runs it (`--worker-name`)
    lease_expires_at text    -- until when its worker's lease holds
);
create index jobs_queue on jobs (status, created_at);

create table job_metrics (
    job_id  text not null references jobs (id) on delete cascade,
    split   text not null,
    epoch   bigint not null,
    step    bigint not null,
    name    text not null,
    value   double precision not null,
    primary key (job_id, split, epoch, step, name)
);

create table job_evaluations (
    job_id  text not null references jobs (id) on delete cascade,
    split   text not null,
    epoch   bigint not null,
    report  text not null,
    primary key (job_id, split, epoch)
);

create table checkpoints (
    job_id      text not null references jobs (id) on delete cascade,
    epoch       bigint not null,
    path        text not null,
    score       double precision not null,
    created_at  text not null,
    primary key (job_id, epoch)
);

create table models (
    id          text primary key,
    job_id      text,
    base_model  text not null,
    labels      text not null,
    metrics     text,
    params      text,
    recipe      text,
    path        text not null,
    created_at  text not null
);
create index models_created on models (created_at desc);

create table job_mistakes (
    job_id     text not null references jobs (id) on delete cascade,
    epoch      bigint not null,
    rank       bigint not null,
    blob       text not null,
    file       text not null,
    label      text not null,
    predicted  text not null,
    score      double precision not null,
    primary key (job_id, epoch, rank)
);
