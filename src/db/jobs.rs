//! Queries on `jobs`, which is also the work queue: a job is claimed with one atomic
//! `update … returning` (on PostgreSQL its row is picked with `for update skip locked`), so two
//! workers can never take the same one. A claim is a lease: the worker renews it while the job
//! runs, and a running job whose lease ran out (its worker died) is claimed again like a queued one.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use crate::db::{Backend, Cursor, Listed, Page, Pool, new_id, now};
use crate::train::Phase;

/// Lifecycle of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    /// True once the job can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }
}

impl TryFrom<String> for Status {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Ok(match s.as_str() {
            "queued" => Status::Queued,
            "running" => Status::Running,
            "succeeded" => Status::Succeeded,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            _ => return Err(format!("unknown job status '{s}'")),
        })
    }
}

/// Where a job is in its run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    pub epoch: u32,
    pub epochs: u32,
    pub step: u64,
    pub steps: u64,
    /// The phase under way (or the last one, once the job has ended); `None` until it runs.
    pub phase: Option<Phase>,
    /// Progress within the phase: `done` of `total` (images, fits or steps; see `Phase`).
    pub done: u64,
    pub total: u64,
    /// `done` per second in this phase, where the phase has a rate.
    pub rate: Option<f64>,
}

/// A job as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub id: String,
    pub dataset_id: String,
    pub base_model: String,
    /// Hyper-parameters with every default filled in.
    pub params: Value,
    pub recipe: String,
    pub status: Status,
    pub progress: Progress,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    pub model_id: Option<String>,
    pub device: Option<String>,
    /// A cancel was asked for while the job runs; it stops within one batch.
    pub cancel_requested: bool,
    /// What the `auto` recipe decided after its probe epoch, and why (`{"action", "epochs",
    /// "reason"}`); also why a time budget ended the run early.
    pub decision: Option<Value>,
    /// The worker that runs it, or ran it last (`--worker-name`: host name and process id by
    /// default).
    pub worker: Option<String>,
    /// The precision its products run in there (`params.precision` with `auto` resolved), once
    /// training has started.
    pub precision: Option<String>,
    /// Times a worker has claimed it (a resume after a restart or a lost lease counts).
    #[serde(skip)]
    pub attempts: u32,
    /// The claim under which it last wrote a checkpoint.
    #[serde(skip)]
    pub progress_claim: u32,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: String,
    dataset_id: String,
    base_model: String,
    params: String,
    recipe: String,
    #[sqlx(try_from = "String")]
    status: Status,
    epoch: i64,
    epochs: i64,
    step: i64,
    steps: i64,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    error: Option<String>,
    model_id: Option<String>,
    device: Option<String>,
    cancel_requested: i64,
    phase: Option<String>,
    phase_done: i64,
    phase_total: i64,
    phase_rate: Option<f64>,
    decision: Option<String>,
    worker: Option<String>,
    precision: Option<String>,
    attempts: i64,
    progress_claim: i64,
}

impl TryFrom<JobRow> for Job {
    type Error = sqlx::Error;
    fn try_from(r: JobRow) -> Result<Self, sqlx::Error> {
        Ok(Job {
            params: serde_json::from_str(&r.params).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            id: r.id,
            dataset_id: r.dataset_id,
            base_model: r.base_model,
            recipe: r.recipe,
            status: r.status,
            progress: Progress {
                epoch: r.epoch as u32,
                epochs: r.epochs as u32,
                step: r.step as u64,
                steps: r.steps as u64,
                phase: r.phase.as_deref().map(str::parse).transpose().map_err(|e: String| sqlx::Error::Decode(e.into()))?,
                done: r.phase_done as u64,
                total: r.phase_total as u64,
                rate: r.phase_rate,
            },
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            error: r.error,
            model_id: r.model_id,
            device: r.device,
            cancel_requested: r.cancel_requested != 0,
            decision: r.decision.as_deref().map(serde_json::from_str).transpose().map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            worker: r.worker,
            precision: r.precision,
            attempts: u32::try_from(r.attempts).unwrap_or(u32::MAX),
            progress_claim: u32::try_from(r.progress_claim).unwrap_or(0),
        })
    }
}

/// The columns every query returns, as a literal for `concat!` (sqlx only takes static SQL).
macro_rules! job_columns {
    () => {
        "id, dataset_id, base_model, params, recipe, status, epoch, epochs, step, steps, created_at, \
                       started_at, finished_at, error, model_id, device, cancel_requested, phase, phase_done, phase_total, phase_rate, decision, worker, precision, attempts, progress_claim"
    };
}

/// What a new job is made of.
pub struct NewJob<'a> {
    pub dataset_id: &'a str,
    pub base_model: &'a str,
    pub params: &'a Value,
    pub recipe: &'a str,
    pub epochs: u32,
    /// The base model is a model of this service, which must still exist when the job is queued.
    pub base_is_model: bool,
}

/// Queues a job; `None` when its dataset, or its base model when that is one of ours, does not
/// exist. The existence checks are part of the insert, so a concurrent delete cannot slip in
/// between (on PostgreSQL each check takes a share lock on the row, which
/// [`crate::db::datasets::delete`] and [`crate::db::models::delete`] lock for update before they
/// look for the jobs that use it).
pub async fn insert(pool: &Pool, job: &NewJob<'_>) -> Result<Option<Job>, sqlx::Error> {
    macro_rules! insert_sql {
        ($lock:literal) => {
            concat!(
                "insert into jobs (id, dataset_id, base_model, params, recipe, status, epochs, created_at) \
                 select $1, $2, $3, $4, $5, 'queued', $6, $7 where exists (select 1 from datasets where id = $2", $lock, ") \
                 and ($8 = 0 or exists (select 1 from models where id = $3", $lock, ")) returning ",
                job_columns!()
            )
        };
    }
    let sql = match Backend::of(pool) {
        Backend::Sqlite => insert_sql!(""),
        Backend::Postgres => insert_sql!(" for share"),
    };
    let row: Option<JobRow> = sqlx::query_as(sql)
        .bind(new_id())
        .bind(job.dataset_id)
        .bind(job.base_model)
        .bind(job.params.to_string())
        .bind(job.recipe)
        .bind(i64::from(job.epochs))
        .bind(now())
        .bind(i64::from(job.base_is_model))
        .fetch_optional(pool)
        .await?;
    row.map(Job::try_from).transpose()
}

/// One job.
pub async fn get(pool: &Pool, id: &str) -> Result<Option<Job>, sqlx::Error> {
    let row: Option<JobRow> =
        sqlx::query_as(concat!("select ", job_columns!(), " from jobs where id = $1")).bind(id).fetch_optional(pool).await?;
    row.map(Job::try_from).transpose()
}

/// Whether job `id` has ended or no longer exists: what its folder of checkpoints serves is over
/// (an ended job never runs again).
pub async fn ended_or_gone(pool: &Pool, id: &str) -> Result<bool, sqlx::Error> {
    Ok(get(pool, id).await?.is_none_or(|job| job.status.is_terminal()))
}

/// Jobs, newest first, optionally with one status.
pub async fn list(pool: &Pool, status: Option<Status>, page: &Page) -> Result<Listed<Job>, sqlx::Error> {
    let (created_at, id, rows) = page.binds();
    let rows: Vec<JobRow> = sqlx::query_as(concat!(
        "select ", job_columns!(), " from jobs where ($1 is null or status = $1) and ", newest_first_page!("$2", "$3", "$4")
    ))
    .bind(status.map(Status::as_str))
    .bind(created_at)
    .bind(id)
    .bind(rows)
    .fetch_all(pool)
    .await?;
    let jobs = rows.into_iter().map(Job::try_from).collect::<Result<Vec<_>, _>>()?;
    Ok(page.fetch(jobs, |j| Cursor { created_at: j.created_at.clone(), id: j.id.clone() }))
}

/// The time now on the database's clock, as [`crate::db::at`] writes it, as SQL of each backend;
/// with a placeholder of milliseconds, that long from now. Lease times are read and written on
/// the database's clock only, so machines whose clocks disagree still agree on whose lease ran out.
macro_rules! db_time {
    (sqlite) => {
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    };
    (sqlite, $ms:literal) => {
        concat!("strftime('%Y-%m-%dT%H:%M:%fZ', 'now', (", $ms, " / 1000.0) || ' seconds')")
    };
    (postgres) => {
        "to_char(now() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
    };
    (postgres, $ms:literal) => {
        concat!("to_char((now() + ", $ms, " * interval '1 millisecond') at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
    };
}

/// A lease's length as the queue's statements take it (milliseconds).
fn millis(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}

/// A run's hold on its job: the worker's name and the number of the claim it runs under (the
/// job's `attempts` as that claim set it). Every statement a run makes as the job's holder names
/// both, so a run whose claim has passed on changes nothing: its lease ran out and the job was
/// claimed again, by another worker or under the same name by another process (a fencing token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub worker: String,
    pub claim: i64,
}

impl Holder {
    /// The holder of `job` as `worker` claimed it.
    pub fn of(worker: &str, job: &Job) -> Self {
        Holder { worker: worker.to_string(), claim: i64::from(job.attempts) }
    }
}

/// Claims the oldest claimable job for `worker` (its `device`) for `lease`: a queued job, or a
/// running one whose lease ran out (its worker died; it resumes from its last checkpoint). One
/// statement, so two workers never take the same job. `running`: the jobs this very process runs
/// on its other devices, which it never claims, though their leases may have lapsed (the
/// database was out of reach longer than a lease): those runs still hold them, and renew their
/// leases when they next can.
pub async fn claim(pool: &Pool, worker: &str, device: &str, lease: Duration, running: &[String]) -> Result<Option<Job>, sqlx::Error> {
    // The ids (UUIDs, without commas) go as one comma-separated text: sqlx's `Any` driver binds
    // no arrays.
    macro_rules! claim_sql {
        ($backend:ident, $lock:literal, $find:literal) => {
            concat!(
                "update jobs set status = 'running', device = $1, worker = $2, lease_expires_at = ", db_time!($backend, "$3"), ", \
                 started_at = coalesce(started_at, ", db_time!($backend), "), attempts = attempts + 1 \
                 where id = (select id from jobs where (status = 'queued' or (status = 'running' and lease_expires_at < ", db_time!($backend), ")) \
                 and ", $find, "(',' || $4 || ',', ',' || id || ',') = 0 \
                 order by created_at, id limit 1", $lock, ") \
                 and (status = 'queued' or (status = 'running' and lease_expires_at < ", db_time!($backend), ")) returning ",
                job_columns!()
            )
        };
    }
    let sql = match Backend::of(pool) {
        Backend::Sqlite => claim_sql!(sqlite, "", "instr"),
        Backend::Postgres => claim_sql!(postgres, " for update skip locked", "strpos"),
    };
    let running = running.join(",");
    let row: Option<JobRow> =
        sqlx::query_as(sql).bind(device).bind(worker).bind(millis(lease)).bind(running).fetch_optional(pool).await?;
    row.map(Job::try_from).transpose()
}

/// `update jobs set <assignments>` of a job that runs under a holder (`$1` the job, `$2` and `$3`
/// the holder), for [`update_held`].
macro_rules! held_update {
    ($set:literal) => {
        concat!("update jobs set ", $set, " where id = $1 and status = 'running' and worker = $2 and attempts = $3")
    };
}
/// `update jobs set <assignments>` of the job `holder`'s claim took (`$1` the job, `$2` and `$3`
/// the holder), whether it still runs or that claim's run has just ended it (its last progress
/// comes after its outcome), for what a run records of itself: a no-op once another claim took
/// the job.
macro_rules! claim_update {
    ($set:literal) => {
        concat!("update jobs set ", $set, " where id = $1 and worker = $2 and attempts = $3")
    };
}
/// Runs a [`held_update`] or a [`claim_update`] on job `id` for `holder` (a no-op when the job
/// no longer runs under it, or for a `claim_update` once another claim took it).
async fn update_held(pool: &Pool, sql: &'static str, id: &str, holder: &Holder) -> Result<(), sqlx::Error> {
    sqlx::query(sql).bind(id).bind(&holder.worker).bind(holder.claim).execute(pool).await?;
    Ok(())
}

/// Undoes `holder`'s claim of a job whose previous claim, by this same process, still runs: the
/// claim count goes back, so that run's [`Holder`] holds the job again (with the lease the claim
/// just set). A no-op if the job has moved on meanwhile.
pub async fn undo_claim(pool: &Pool, id: &str, holder: &Holder) -> Result<(), sqlx::Error> {
    update_held(pool, held_update!("attempts = attempts - 1"), id, holder).await
}

/// Extends `holder`'s lease on a running job to `lease` from now. `None` when the job no longer
/// runs under this holder (it ended, or its lease ran out and another claim took it), so the run
/// must stop; else whether a cancel was asked for (by an API process that cannot reach the run
/// itself).
pub async fn renew_lease(pool: &Pool, id: &str, holder: &Holder, lease: Duration) -> Result<Option<bool>, sqlx::Error> {
    macro_rules! renew_sql {
        ($backend:ident) => {
            concat!(
                "update jobs set lease_expires_at = ", db_time!($backend, "$1"),
                " where id = $2 and worker = $3 and attempts = $4 and status = 'running' returning cancel_requested"
            )
        };
    }
    let sql = match Backend::of(pool) {
        Backend::Sqlite => renew_sql!(sqlite),
        Backend::Postgres => renew_sql!(postgres),
    };
    let cancel: Option<i64> =
        sqlx::query_scalar(sql).bind(millis(lease)).bind(id).bind(&holder.worker).bind(holder.claim).fetch_optional(pool).await?;
    Ok(cancel.map(|c| c != 0))
}

/// At start-up: jobs left `running` by an earlier process go back to the queue (they resume from
/// their last checkpoint), except those whose cancel had been asked for, which become cancelled.
/// `owner = None` takes every running job (a process alone on its database); `Some(worker)` only
/// this worker's own (it was restarted under the same name) and those whose lease ran out, so a
/// process never takes a job another live process runs.
pub async fn recover_interrupted(pool: &Pool, owner: Option<&str>) -> Result<Recovered, sqlx::Error> {
    macro_rules! recover_sql {
        ($backend:ident) => {
            (
                concat!(
                    "update jobs set status = 'cancelled', finished_at = $1 where status = 'running' and cancel_requested = 1 \
                     and ($2 is null or worker = $2 or lease_expires_at < ", db_time!($backend), ") returning id"
                ),
                concat!(
                    "update jobs set status = 'queued', lease_expires_at = null where status = 'running' \
                     and ($1 is null or worker = $1 or lease_expires_at < ", db_time!($backend), ")"
                ),
            )
        };
    }
    let (cancel_sql, requeue_sql) = match Backend::of(pool) {
        Backend::Sqlite => recover_sql!(sqlite),
        Backend::Postgres => recover_sql!(postgres),
    };
    let cancelled: Vec<String> = sqlx::query_scalar(cancel_sql).bind(now()).bind(owner).fetch_all(pool).await?;
    let done = sqlx::query(requeue_sql).bind(owner).execute(pool).await?;
    Ok(Recovered { requeued: done.rows_affected(), cancelled })
}

/// What [`recover_interrupted`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovered {
    /// Jobs put back in the queue.
    pub requeued: u64,
    /// Jobs whose cancel had been asked for, now cancelled (their checkpoints can go).
    pub cancelled: Vec<String>,
}

/// Puts `holder`'s running job back in the queue after a failure that may pass (the claim counts
/// towards [`crate::worker::MAX_CLAIMS`]).
pub async fn requeue(pool: &Pool, id: &str, holder: &Holder) -> Result<(), sqlx::Error> {
    update_held(pool, held_update!("status = 'queued', lease_expires_at = null"), id, holder).await
}

/// Puts `holder`'s running job back in the queue at a graceful shutdown: the claim does not count
/// (a rolling restart is no failure of the job).
pub async fn hand_back(pool: &Pool, id: &str, holder: &Holder) -> Result<(), sqlx::Error> {
    update_held(pool, held_update!("status = 'queued', lease_expires_at = null, attempts = attempts - 1"), id, holder).await
}

/// Begins a transaction in which `holder` holds job `id`, for writes of its run that span several
/// statements (its metrics): the first statement writes the job's row under the holder's claim
/// (a [`claim_update`]), which takes that row (PostgreSQL) or the database (SQLite) until the
/// transaction ends, so no claim can take the job over in between. `None`, with nothing begun,
/// once another claim has taken the job: a run whose claim passed on writes nothing.
pub async fn begin_held<'p>(pool: &'p Pool, id: &str, holder: &Holder) -> Result<Option<sqlx::Transaction<'p, sqlx::Any>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let held = sqlx::query(claim_update!("attempts = attempts")).bind(id).bind(&holder.worker).bind(holder.claim).execute(&mut *tx).await?;
    if held.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(None);
    }
    Ok(Some(tx))
}

// The statements below record a run's progress on its job's row. Each is a [`claim_update`]: a
// no-op once another claim has taken the job from `holder`, so a run whose lease ran out cannot
// write over the progress of the run that took its job over, in the time before its next
// renewal tells it to stop.

/// Records the plan of a run (total optimiser steps) once it is known.
pub async fn set_plan(pool: &Pool, id: &str, holder: &Holder, epochs: u32, steps: u64) -> Result<(), sqlx::Error> {
    sqlx::query(claim_update!("epochs = $4, steps = $5"))
        .bind(id)
        .bind(&holder.worker)
        .bind(holder.claim)
        .bind(i64::from(epochs))
        .bind(steps as i64)
        .execute(pool)
        .await?;
    Ok(())
}

/// Records progress.
pub async fn set_progress(pool: &Pool, id: &str, holder: &Holder, epoch: u32, step: u64) -> Result<(), sqlx::Error> {
    sqlx::query(claim_update!("epoch = $4, step = $5"))
        .bind(id)
        .bind(&holder.worker)
        .bind(holder.claim)
        .bind(i64::from(epoch))
        .bind(step as i64)
        .execute(pool)
        .await?;
    Ok(())
}

/// Records the phase a job is in and its progress within it.
pub async fn set_phase(pool: &Pool, id: &str, holder: &Holder, phase: Phase, done: u64, total: u64, rate: Option<f64>) -> Result<(), sqlx::Error> {
    // No `Option<f64>` is bound: sqlx 0.9's Any driver sends a missing f64 as a PostgreSQL `real`,
    // and a prepared statement whose parameter got that type then refuses the next rate (8 bytes):
    // transact-rs/sqlx#4284 (the NULL float kinds swapped in `AnyArguments::convert_into`).
    let query = match rate {
        Some(_) => sqlx::query(claim_update!("phase = $4, phase_done = $5, phase_total = $6, phase_rate = $7")),
        None => sqlx::query(claim_update!("phase = $4, phase_done = $5, phase_total = $6, phase_rate = null")),
    };
    let query = query.bind(id).bind(&holder.worker).bind(holder.claim).bind(phase.as_str()).bind(done as i64).bind(total as i64);
    match rate {
        Some(rate) => query.bind(rate).execute(pool).await?,
        None => query.execute(pool).await?,
    };
    Ok(())
}

/// Records what the auto recipe decided (or why a time budget ended the run).
pub async fn set_decision(pool: &Pool, id: &str, holder: &Holder, decision: &Value) -> Result<(), sqlx::Error> {
    sqlx::query(claim_update!("decision = $4")).bind(id).bind(&holder.worker).bind(holder.claim).bind(decision.to_string()).execute(pool).await?;
    Ok(())
}

/// Records the precision the job's products run in on its worker.
pub async fn set_precision(pool: &Pool, id: &str, holder: &Holder, precision: &str) -> Result<(), sqlx::Error> {
    sqlx::query(claim_update!("precision = $4")).bind(id).bind(&holder.worker).bind(holder.claim).bind(precision).execute(pool).await?;
    Ok(())
}

/// Records that the job's current claim has written a checkpoint (progress a restart resumes from).
pub async fn mark_progress(pool: &Pool, id: &str, holder: &Holder) -> Result<(), sqlx::Error> {
    update_held(pool, claim_update!("progress_claim = attempts"), id, holder).await
}

/// Records that epoch `epoch` has ended (a probe epoch has no steps to report it).
pub async fn set_epoch_done(pool: &Pool, id: &str, holder: &Holder, epoch: u32) -> Result<(), sqlx::Error> {
    sqlx::query(claim_update!("epoch = case when epoch > $4 then epoch else $4 end"))
        .bind(id)
        .bind(&holder.worker)
        .bind(holder.claim)
        .bind(i64::from(epoch))
        .execute(pool)
        .await?;
    Ok(())
}

/// Ends `holder`'s running job as failed or cancelled (a no-op if it is not running under this
/// holder any more).
pub async fn finish(pool: &Pool, id: &str, holder: &Holder, status: Status, error: Option<&str>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update jobs set status = $1, error = $2, finished_at = $3 where id = $4 and status = 'running' and worker = $5 and attempts = $6",
    )
    .bind(status.as_str())
    .bind(error)
    .bind(now())
    .bind(id)
    .bind(&holder.worker)
    .bind(holder.claim)
    .execute(pool)
    .await?;
    Ok(())
}

/// The outcome of [`cancel`].
#[derive(Debug, PartialEq, Eq)]
pub enum Cancel {
    /// It was queued and is now cancelled.
    Cancelled,
    /// It is running; the worker stops it within one batch.
    Requested,
    /// It had already ended with this status.
    AlreadyFinished(Status),
    NotFound,
}

/// Cancels a queued job at once, or flags a running one for its worker.
pub async fn cancel(pool: &Pool, id: &str) -> Result<Cancel, sqlx::Error> {
    let done = sqlx::query("update jobs set status = 'cancelled', finished_at = $1 where id = $2 and status = 'queued'")
        .bind(now())
        .bind(id)
        .execute(pool)
        .await?;
    if done.rows_affected() == 1 {
        return Ok(Cancel::Cancelled);
    }
    let flagged = sqlx::query("update jobs set cancel_requested = 1 where id = $1 and status = 'running'").bind(id).execute(pool).await?;
    if flagged.rows_affected() == 1 {
        return Ok(Cancel::Requested);
    }
    Ok(match get(pool, id).await? {
        Some(job) => Cancel::AlreadyFinished(job.status),
        None => Cancel::NotFound,
    })
}

/// The outcome of [`delete`].
#[derive(Debug, PartialEq, Eq)]
pub enum Deleted {
    /// It had ended; it is gone with its metrics, evaluations, mistakes and checkpoint rows.
    Removed,
    /// It has not ended (this status): cancel it first.
    NotEnded(Status),
    NotFound,
}

/// Deletes an ended job and what the database holds of it (by the foreign keys' cascade); the
/// model it registered stays. A job that is queued or running is left as it is.
pub async fn delete(pool: &Pool, id: &str) -> Result<Deleted, sqlx::Error> {
    let done = sqlx::query("delete from jobs where id = $1 and status in ('succeeded', 'failed', 'cancelled')").bind(id).execute(pool).await?;
    if done.rows_affected() == 1 {
        return Ok(Deleted::Removed);
    }
    Ok(match get(pool, id).await? {
        Some(job) => Deleted::NotEnded(job.status),
        None => Deleted::NotFound,
    })
}

/// The base models jobs named, most recently used first (at most `limit`).
pub async fn recent_base_models(pool: &Pool, limit: u32) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("select base_model from jobs group by base_model order by max(created_at) desc limit $1")
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
}

/// Number of jobs in each status.
pub async fn count_by_status(pool: &Pool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("select status, count(*) from jobs group by status").fetch_all(pool).await
}

// The queue's statements are tested on both backends, in tests/api/queue.rs.
