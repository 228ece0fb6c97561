-- Initial schema. Timestamps are RFC 3339 UTC text (millisecond precision), ids are UUIDv7 text,
-- structured fields are JSON text.

create table datasets (
    id          text primary key,
    name        text not null,
    created_at  text not null,
    num_images  integer not null,
    classes     text not null,   -- JSON array of class names, sorted
    counts      text not null,   -- JSON {"train": {class: n}, "validation": {...}, "test": {...}}
    rejected    text not null    -- JSON [{"file", "reason"}]
);
create index datasets_created on datasets (created_at desc);

create table dataset_images (
    dataset_id  text not null references datasets (id) on delete cascade,
    blob        text not null,   -- SHA-256 hex of the file under <data-dir>/blobs/
    label       text not null,
    split       text not null check (split in ('train', 'validation', 'test')),
    file        text not null    -- the name it had in the upload
);
create index dataset_images_dataset on dataset_images (dataset_id, split);
create index dataset_images_blob on dataset_images (blob);

create table jobs (
    id               text primary key,
    dataset_id       text not null,  -- no foreign key: a finished job outlives its dataset
    base_model       text not null,
    params           text not null,  -- JSON, every default filled in
    recipe           text not null,
    status           text not null check (status in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    epoch            integer not null default 0,
    epochs           integer not null,
    step             integer not null default 0,
    steps            integer not null default 0,
    created_at       text not null,
    started_at       text,
    finished_at      text,
    error            text,
    model_id         text,
    device           text,
    cancel_requested integer not null default 0,
    attempts         integer not null default 0
);
create index jobs_queue on jobs (status, created_at);

-- Scalar time series: train loss and learning rate per step, validation scalars per epoch.
-- The primary key makes a replayed write after a restart overwrite instead of duplicating.
create table job_metrics (
    job_id  text not null references jobs (id) on delete cascade,
    split   text not null,
    epoch   integer not null,
    step    integer not null,
    name    text not null,
    value   real not null,
    primary key (job_id, split, epoch, step, name)
);

-- Full evaluation blocks (per-class figures, confusion matrix) per epoch and split.
create table job_evaluations (
    job_id  text not null references jobs (id) on delete cascade,
    split   text not null,
    epoch   integer not null,
    report  text not null,   -- JSON metrics block
    primary key (job_id, split, epoch)
);

create table checkpoints (
    job_id      text not null references jobs (id) on delete cascade,
    epoch       integer not null,
    path        text not null,   -- relative to the data folder
    score       real not null,   -- validation macro-F1
    created_at  text not null,
    primary key (job_id, epoch)
);

create table models (
    id          text primary key,
    job_id      text,
    base_model  text not null,
    labels      text not null,   -- JSON array, index = class id
    metrics     text,            -- JSON: the kept epoch's validation block
    params      text,            -- JSON hyper-parameters it was trained with
    recipe      text,
    path        text not null,   -- relative to the data folder
    created_at  text not null
);
create index models_created on models (created_at desc);
