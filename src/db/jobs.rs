//! Queries on `jobs`, which is also the work queue: a job is claimed with one atomic
//! `update … returning`, so two workers can never take the same one.

use serde::Serialize;
use serde_json::Value;
use sqlx::SqlitePool;

use crate::db::{new_id, now};
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
    cancel_requested: bool,
    phase: Option<String>,
    phase_done: i64,
    phase_total: i64,
    phase_rate: Option<f64>,
    decision: Option<String>,
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
            cancel_requested: r.cancel_requested,
            decision: r.decision.as_deref().map(serde_json::from_str).transpose().map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        })
    }
}

/// The columns every query returns, as a literal for `concat!` (sqlx only takes static SQL).
macro_rules! job_columns {
    () => {
        "id, dataset_id, base_model, params, recipe, status, epoch, epochs, step, steps, created_at, \
                       started_at, finished_at, error, model_id, device, cancel_requested, phase, phase_done, phase_total, phase_rate, decision"
    };
}

/// What a new job is made of.
pub struct NewJob<'a> {
    pub dataset_id: &'a str,
    pub base_model: &'a str,
    pub params: &'a Value,
    pub recipe: &'a str,
    pub epochs: u32,
}

/// Queues a job; `None` when its dataset does not exist. The existence check is part of the
/// insert, so a concurrent dataset delete cannot slip in between.
pub async fn insert(pool: &SqlitePool, job: &NewJob<'_>) -> Result<Option<Job>, sqlx::Error> {
    let row: Option<JobRow> = sqlx::query_as(concat!(
        "insert into jobs (id, dataset_id, base_model, params, recipe, status, epochs, created_at) \
         select ?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?7 where exists (select 1 from datasets where id = ?2) returning ",
        job_columns!()
    ))
    .bind(new_id())
    .bind(job.dataset_id)
    .bind(job.base_model)
    .bind(job.params.to_string())
    .bind(job.recipe)
    .bind(i64::from(job.epochs))
    .bind(now())
    .fetch_optional(pool)
    .await?;
    row.map(Job::try_from).transpose()
}

/// One job.
pub async fn get(pool: &SqlitePool, id: &str) -> Result<Option<Job>, sqlx::Error> {
    let row: Option<JobRow> =
        sqlx::query_as(concat!("select ", job_columns!(), " from jobs where id = ?")).bind(id).fetch_optional(pool).await?;
    row.map(Job::try_from).transpose()
}

/// Jobs, newest first, optionally with one status.
pub async fn list(pool: &SqlitePool, status: Option<Status>) -> Result<Vec<Job>, sqlx::Error> {
    let rows: Vec<JobRow> = sqlx::query_as(concat!(
        "select ", job_columns!(), " from jobs where (?1 is null or status = ?1) order by created_at desc, id desc"
    ))
    .bind(status.map(Status::as_str))
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(Job::try_from).collect()
}

/// Claims the oldest queued job for `device` in one statement.
pub async fn claim(pool: &SqlitePool, device: &str) -> Result<Option<Job>, sqlx::Error> {
    let row: Option<JobRow> = sqlx::query_as(concat!(
        "update jobs set status = 'running', device = ?1, started_at = coalesce(started_at, ?2), attempts = attempts + 1 \
         where id = (select id from jobs where status = 'queued' order by created_at, id limit 1) and status = 'queued' \
         returning ", job_columns!()))
    .bind(device)
    .bind(now())
    .fetch_optional(pool)
    .await?;
    row.map(Job::try_from).transpose()
}

/// At start-up: jobs left `running` by a previous process go back to the queue (they resume from
/// their last checkpoint), except those whose cancel had been asked for, which become cancelled.
pub async fn recover_interrupted(pool: &SqlitePool) -> Result<u64, sqlx::Error> {
    sqlx::query("update jobs set status = 'cancelled', finished_at = ? where status = 'running' and cancel_requested = 1")
        .bind(now())
        .execute(pool)
        .await?;
    let done = sqlx::query("update jobs set status = 'queued' where status = 'running'").execute(pool).await?;
    Ok(done.rows_affected())
}

/// Puts a running job back in the queue (graceful shutdown mid-run).
pub async fn requeue(pool: &SqlitePool, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("update jobs set status = 'queued' where id = ? and status = 'running'").bind(id).execute(pool).await?;
    Ok(())
}

/// Records the plan of a run (total optimiser steps) once it is known.
pub async fn set_plan(pool: &SqlitePool, id: &str, epochs: u32, steps: u64) -> Result<(), sqlx::Error> {
    sqlx::query("update jobs set epochs = ?, steps = ? where id = ?")
        .bind(i64::from(epochs))
        .bind(steps as i64)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Records progress.
pub async fn set_progress(pool: &SqlitePool, id: &str, epoch: u32, step: u64) -> Result<(), sqlx::Error> {
    sqlx::query("update jobs set epoch = ?, step = ? where id = ?")
        .bind(i64::from(epoch))
        .bind(step as i64)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Records the phase a job is in and its progress within it.
pub async fn set_phase(pool: &SqlitePool, id: &str, phase: Phase, done: u64, total: u64, rate: Option<f64>) -> Result<(), sqlx::Error> {
    sqlx::query("update jobs set phase = ?, phase_done = ?, phase_total = ?, phase_rate = ? where id = ?")
        .bind(phase.as_str())
        .bind(done as i64)
        .bind(total as i64)
        .bind(rate)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Records what the auto recipe decided (or why a time budget ended the run).
pub async fn set_decision(pool: &SqlitePool, id: &str, decision: &Value) -> Result<(), sqlx::Error> {
    sqlx::query("update jobs set decision = ? where id = ?").bind(decision.to_string()).bind(id).execute(pool).await?;
    Ok(())
}

/// Records that epoch `epoch` has ended (a probe epoch has no steps to report it).
pub async fn set_epoch_done(pool: &SqlitePool, id: &str, epoch: u32) -> Result<(), sqlx::Error> {
    sqlx::query("update jobs set epoch = max(epoch, ?) where id = ?").bind(i64::from(epoch)).bind(id).execute(pool).await?;
    Ok(())
}

/// Ends a running job as failed or cancelled (a no-op if it is not running any more).
pub async fn finish(pool: &SqlitePool, id: &str, status: Status, error: Option<&str>) -> Result<(), sqlx::Error> {
    sqlx::query("update jobs set status = ?, error = ?, finished_at = ? where id = ? and status = 'running'")
        .bind(status.as_str())
        .bind(error)
        .bind(now())
        .bind(id)
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
pub async fn cancel(pool: &SqlitePool, id: &str) -> Result<Cancel, sqlx::Error> {
    let done = sqlx::query("update jobs set status = 'cancelled', finished_at = ? where id = ? and status = 'queued'")
        .bind(now())
        .bind(id)
        .execute(pool)
        .await?;
    if done.rows_affected() == 1 {
        return Ok(Cancel::Cancelled);
    }
    let flagged = sqlx::query("update jobs set cancel_requested = 1 where id = ? and status = 'running'").bind(id).execute(pool).await?;
    if flagged.rows_affected() == 1 {
        return Ok(Cancel::Requested);
    }
    Ok(match get(pool, id).await? {
        Some(job) => Cancel::AlreadyFinished(job.status),
        None => Cancel::NotFound,
    })
}

/// The base models jobs named, most recently used first (at most `limit`).
pub async fn recent_base_models(pool: &SqlitePool, limit: u32) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("select base_model from jobs group by base_model order by max(created_at) desc limit ?")
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
}

/// Number of jobs in each status.
pub async fn count_by_status(pool: &SqlitePool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("select status, count(*) from jobs group by status").fetch_all(pool).await
}
