//! Queries on `job_metrics` (scalar time series), `job_evaluations` (full evaluation blocks),
//! `job_mistakes` (an epoch's mistaken validation images) and `checkpoints` (an epoch's saved
//! state). Every write is an upsert by the table's key — (job, split, epoch, step, name),
//! (job, split, epoch), (job, epoch) — or, for an epoch's mistakes, a delete and insert in one
//! transaction, so an epoch replayed after a restart overwrites its earlier rows instead of
//! duplicating them. A run's writes are its claim's ([`Holder`]): each runs in a transaction that
//! [`begin_held`] opens, so a run whose claim passed on to another writes nothing.

use serde::Serialize;
use crate::db::Pool;
use crate::db::jobs::{Holder, begin_held};

use crate::train::report::EvalReport;

/// One training step's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainPoint {
    pub step: u64,
    pub epoch: u32,
    pub loss: f64,
    pub learning_rate: f64,
}

/// An evaluation block with its epoch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochReport {
    pub epoch: u32,
    #[serde(flatten)]
    pub report: EvalReport,
}

/// The whole history of a job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobMetrics {
    pub train: Vec<TrainPoint>,
    pub validation: Vec<EpochReport>,
    pub test: Option<EvalReport>,
}

/// Records a training step.
pub async fn record_step(pool: &Pool, job_id: &str, holder: &Holder, p: &TrainPoint) -> Result<(), sqlx::Error> {
    let Some(mut tx) = begin_held(pool, job_id, holder).await? else { return Ok(()) };
    for (name, value) in [("loss", p.loss), ("learning_rate", p.learning_rate)] {
        sqlx::query("insert into job_metrics (job_id, split, epoch, step, name, value) values ($1, 'train', $2, $3, $4, $5) \
             on conflict (job_id, split, epoch, step, name) do update set value = excluded.value")
            .bind(job_id)
            .bind(i64::from(p.epoch))
            .bind(p.step as i64)
            .bind(name)
            .bind(value)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// Records an evaluation block (`split` is `validation` or `test`).
pub async fn record_evaluation(pool: &Pool, job_id: &str, holder: &Holder, split: &str, epoch: u32, report: &EvalReport) -> Result<(), sqlx::Error> {
    let json = serde_json::to_string(report).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let Some(mut tx) = begin_held(pool, job_id, holder).await? else { return Ok(()) };
    sqlx::query("insert into job_evaluations (job_id, split, epoch, report) values ($1, $2, $3, $4) \
         on conflict (job_id, split, epoch) do update set report = excluded.report")
        .bind(job_id)
        .bind(split)
        .bind(i64::from(epoch))
        .bind(json)
        .execute(&mut *tx)
        .await?;
    for (name, value) in
        [("loss", report.loss), ("accuracy", report.accuracy), ("precision", report.precision), ("recall", report.recall), ("f1", report.f1)]
    {
        sqlx::query("insert into job_metrics (job_id, split, epoch, step, name, value) values ($1, $2, $3, 0, $4, $5) \
             on conflict (job_id, split, epoch, step, name) do update set value = excluded.value")
            .bind(job_id)
            .bind(split)
            .bind(i64::from(epoch))
            .bind(name)
            .bind(value)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// Removes the metrics of epochs after `epoch` (a run restarting from scratch or from an earlier
/// checkpoint must not keep figures of a future it will recompute).
pub async fn truncate_after(pool: &Pool, job_id: &str, holder: &Holder, epoch: u32) -> Result<(), sqlx::Error> {
    let Some(mut tx) = begin_held(pool, job_id, holder).await? else { return Ok(()) };
    for sql in [
        "delete from job_metrics where job_id = $1 and epoch > $2",
        "delete from job_evaluations where job_id = $1 and epoch > $2",
        "delete from job_mistakes where job_id = $1 and epoch > $2",
    ] {
        sqlx::query(sql).bind(job_id).bind(i64::from(epoch)).execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// The full history of a job.
pub async fn get(pool: &Pool, job_id: &str) -> Result<JobMetrics, sqlx::Error> {
    let rows: Vec<(i64, i64, String, f64)> = sqlx::query_as(
        "select epoch, step, name, value from job_metrics where job_id = $1 and split = 'train' order by step, name",
    )
    .bind(job_id)
    .fetch_all(pool)
    .await?;
    let mut train: Vec<TrainPoint> = Vec::new();
    for (epoch, step, name, value) in rows {
        if train.last().is_none_or(|p| p.step != step as u64) {
            train.push(TrainPoint { step: step as u64, epoch: epoch as u32, loss: f64::NAN, learning_rate: f64::NAN });
        }
        let point = train.last_mut().expect("pushed above");
        match name.as_str() {
            "loss" => point.loss = value,
            "learning_rate" => point.learning_rate = value,
            _ => {}
        }
    }
    let (validation, test) = evaluations(pool, job_id).await?;
    Ok(JobMetrics { train, validation, test })
}

/// A job's evaluation blocks: the validation ones by epoch, and the test one if the job has ended
/// with a test split. (Without the step series of [`get`], for callers that look often.)
pub async fn evaluations(pool: &Pool, job_id: &str) -> Result<(Vec<EpochReport>, Option<EvalReport>), sqlx::Error> {
    let evals: Vec<(String, i64, String)> =
        sqlx::query_as("select split, epoch, report from job_evaluations where job_id = $1 order by epoch").bind(job_id).fetch_all(pool).await?;
    let mut validation = Vec::new();
    let mut test = None;
    for (split, epoch, json) in evals {
        let report: EvalReport = serde_json::from_str(&json).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        if split == "test" {
            test = Some(report);
        } else {
            validation.push(EpochReport { epoch: epoch as u32, report });
        }
    }
    Ok((validation, test))
}

/// Records an epoch checkpoint: `path` is its folder in the job's newest claim folder
/// (`jobs/<id>/claim-N/`, see `train::checkpoint::take_over`), `epoch-N`. (Rows written before
/// 2026-12-06 hold a path from the data folder through the claim folder of their time.)
pub async fn record_checkpoint(pool: &Pool, job_id: &str, holder: &Holder, epoch: u32, path: &str, score: f64) -> Result<(), sqlx::Error> {
    let Some(mut tx) = begin_held(pool, job_id, holder).await? else { return Ok(()) };
    sqlx::query("insert into checkpoints (job_id, epoch, path, score, created_at) values ($1, $2, $3, $4, $5) \
         on conflict (job_id, epoch) do update set path = excluded.path, score = excluded.score, created_at = excluded.created_at")
        .bind(job_id)
        .bind(i64::from(epoch))
        .bind(path)
        .bind(score)
        .bind(crate::db::now())
        .execute(&mut *tx)
        .await?;
    // Only the latest epoch's checkpoint stays on disk.
    sqlx::query("delete from checkpoints where job_id = $1 and epoch < $2").bind(job_id).bind(i64::from(epoch)).execute(&mut *tx).await?;
    tx.commit().await
}
/// A validation image a job's model got wrong.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MistakeRow {
    /// The image's blob (its thumbnail: `/datasets/{dataset_id}/images/{blob}/thumbnail`).
    pub blob: String,
    /// Its name in the upload.
    pub file: String,
    pub label: String,
    pub predicted: String,
    /// The predicted class's probability.
    pub score: f64,
}

/// Replaces epoch `epoch`'s mistakes of a job (most confident first).
pub async fn record_mistakes(pool: &Pool, job_id: &str, holder: &Holder, epoch: u32, mistakes: &[MistakeRow]) -> Result<(), sqlx::Error> {
    let Some(mut tx) = begin_held(pool, job_id, holder).await? else { return Ok(()) };
    sqlx::query("delete from job_mistakes where job_id = $1 and epoch = $2").bind(job_id).bind(i64::from(epoch)).execute(&mut *tx).await?;
    for (rank, m) in mistakes.iter().enumerate() {
        sqlx::query("insert into job_mistakes (job_id, epoch, rank, blob, file, label, predicted, score) values ($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(job_id)
            .bind(i64::from(epoch))
            .bind(rank as i64)
            .bind(&m.blob)
            .bind(&m.file)
            .bind(&m.label)
            .bind(&m.predicted)
            .bind(m.score)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// A job's mistakes at epoch `epoch`, most confident first.
pub async fn mistakes(pool: &Pool, job_id: &str, epoch: u32) -> Result<Vec<MistakeRow>, sqlx::Error> {
    let rows: Vec<(String, String, String, String, f64)> = sqlx::query_as(
        "select blob, file, label, predicted, score from job_mistakes where job_id = $1 and epoch = $2 order by rank",
    )
    .bind(job_id)
    .bind(i64::from(epoch))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(blob, file, label, predicted, score)| MistakeRow { blob, file, label, predicted, score }).collect())
}

/// Forgets a job's checkpoints (its model is registered and its checkpoint files are gone).
pub async fn delete_checkpoints(pool: &Pool, job_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("delete from checkpoints where job_id = $1").bind(job_id).execute(pool).await?;
    Ok(())
}

