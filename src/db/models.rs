//! Queries on `models`: the registry of fine-tuned models.

use serde::Serialize;
use serde_json::Value;
use crate::db::jobs::Holder;
use crate::db::{Backend, Cursor, Listed, Page, Pool};

/// A registered model as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Model {
    pub id: String,
    pub job_id: Option<String>,
    pub base_model: String,
    pub labels: Vec<String>,
    /// The kept epoch's validation block.
    pub metrics: Option<Value>,
    /// Hyper-parameters it was trained with.
    pub params: Option<Value>,
    pub recipe: Option<String>,
    pub created_at: String,
    /// Folder relative to the data folder.
    #[serde(skip)]
    pub path: String,
}

#[derive(sqlx::FromRow)]
struct ModelRow {
    id: String,
    job_id: Option<String>,
    base_model: String,
    labels: String,
    metrics: Option<String>,
    params: Option<String>,
    recipe: Option<String>,
    path: String,
    created_at: String,
}

fn parse<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, sqlx::Error> {
    serde_json::from_str(s).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

impl TryFrom<ModelRow> for Model {
    type Error = sqlx::Error;
    fn try_from(r: ModelRow) -> Result<Self, sqlx::Error> {
        Ok(Model {
            labels: parse(&r.labels)?,
            metrics: r.metrics.as_deref().map(parse).transpose()?,
            params: r.params.as_deref().map(parse).transpose()?,
            id: r.id,
            job_id: r.job_id,
            base_model: r.base_model,
            recipe: r.recipe,
            path: r.path,
            created_at: r.created_at,
        })
    }
}

/// The columns every query returns, as a literal for `concat!` (sqlx only takes static SQL).
macro_rules! model_columns {
    () => {
        "id, job_id, base_model, labels, metrics, params, recipe, path, created_at"
    };
}

/// What [`register_for_job`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// The model is registered and the job succeeded.
    Registered,
    /// Nothing: a cancel was asked for while the job was saving its model; the cancel wins.
    CancelRequested,
    /// Nothing: the job no longer runs under this worker.
    NotOurs,
}

/// Registers the model of a succeeded job and marks the job succeeded, in one transaction. With a
/// `holder`, only while the job still runs under that holder's claim and no cancel was asked for:
/// a worker whose lease ran out (and whose job another claim took) registers nothing, so a job
/// gets one model even when two workers race to the end of it, and a cancel answered 202 while the
/// model was being saved is not followed by a success.
pub async fn register_for_job(pool: &Pool, model: &Model, holder: Option<&Holder>) -> Result<Registration, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if let Some(job_id) = &model.job_id {
        let (worker, claim) = (holder.map(|h| h.worker.as_str()), holder.map(|h| h.claim));
        let done = sqlx::query(
            "update jobs set status = 'succeeded', model_id = $1, finished_at = $2, error = null \
             where id = $3 and ($4 is null or (status = 'running' and worker = $4 and attempts = $5 and cancel_requested = 0))",
        )
        .bind(&model.id)
        .bind(crate::db::now())
        .bind(job_id)
        .bind(worker)
        .bind(claim)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            let cancelled: Option<i64> =
                sqlx::query_scalar("select cancel_requested from jobs where id = $1 and status = 'running' and worker = $2 and attempts = $3")
                    .bind(job_id)
                    .bind(worker)
                    .bind(claim)
                    .fetch_optional(&mut *tx)
                    .await?;
            tx.rollback().await?;
            return Ok(if cancelled.is_some_and(|c| c != 0) { Registration::CancelRequested } else { Registration::NotOurs });
        }
    }
    sqlx::query(concat!("insert into models (", model_columns!(), ") values ($1, $2, $3, $4, $5, $6, $7, $8, $9)"))
        .bind(&model.id)
        .bind(&model.job_id)
        .bind(&model.base_model)
        .bind(serde_json::to_string(&model.labels).unwrap_or_default())
        .bind(model.metrics.as_ref().map(Value::to_string))
        .bind(model.params.as_ref().map(Value::to_string))
        .bind(&model.recipe)
        .bind(&model.path)
        .bind(&model.created_at)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Registration::Registered)
}

/// One model.
pub async fn get(pool: &Pool, id: &str) -> Result<Option<Model>, sqlx::Error> {
    let row: Option<ModelRow> =
        sqlx::query_as(concat!("select ", model_columns!(), " from models where id = $1")).bind(id).fetch_optional(pool).await?;
    row.map(Model::try_from).transpose()
}

/// All models, newest first.
pub async fn list(pool: &Pool, page: &Page) -> Result<Listed<Model>, sqlx::Error> {
    let (created_at, id, rows) = page.binds();
    let rows: Vec<ModelRow> = sqlx::query_as(concat!("select ", model_columns!(), " from models where ", newest_first_page!("$1", "$2", "$3")))
        .bind(created_at)
        .bind(id)
        .bind(rows)
        .fetch_all(pool)
        .await?;
    let models = rows.into_iter().map(Model::try_from).collect::<Result<Vec<_>, _>>()?;
    Ok(page.fetch(models, |m| Cursor { created_at: m.created_at.clone(), id: m.id.clone() }))
}

/// The newest model (the default for `/predict`).
pub async fn latest(pool: &Pool) -> Result<Option<Model>, sqlx::Error> {
    let row: Option<ModelRow> = sqlx::query_as(concat!("select ", model_columns!(), " from models order by created_at desc, id desc limit 1"))
        .fetch_optional(pool)
        .await?;
    row.map(Model::try_from).transpose()
}

/// Paths of every registered model (to find orphaned folders at start-up).
pub async fn paths(pool: &Pool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("select path from models").fetch_all(pool).await
}

/// The outcome of [`delete`].
#[derive(Debug, PartialEq, Eq)]
pub enum Deleted {
    /// Removed; the folder (relative path) can go.
    Removed { path: String },
    NotFound,
    /// It is the only model, so `/predict` would be left with none.
    OnlyModel,
    /// A queued or running job continues training from it.
    InUse { job_id: String },
    /// Aliases point at it (`/predict?model=<alias>` would stop working); sorted.
    Aliased { names: Vec<String> },
}

/// Deletes a model unless it is the only one, a job continues from it or an alias points at it
/// (one transaction).
pub async fn delete(pool: &Pool, id: &str) -> Result<Deleted, sqlx::Error> {
    // One deleter at a time, so two deletes cannot each see the other's model and leave none.
    let mut tx = match Backend::of(pool) {
        Backend::Sqlite => pool.begin_with("begin immediate").await?,
        Backend::Postgres => {
            let mut tx = pool.begin().await?;
            sqlx::query("lock table models in share row exclusive mode").execute(&mut *tx).await?;
            tx
        }
    };
    // On PostgreSQL the row is locked first: a job being queued on it (which share-locks it)
    // is then committed, and seen below, or not queued at all.
    let select = match Backend::of(pool) {
        Backend::Sqlite => "select path from models where id = $1",
        Backend::Postgres => "select path from models where id = $1 for update",
    };
    let path: Option<String> = sqlx::query_scalar(select).bind(id).fetch_optional(&mut *tx).await?;
    let Some(path) = path else {
        return Ok(Deleted::NotFound);
    };
    let count: i64 = sqlx::query_scalar("select count(*) from models").fetch_one(&mut *tx).await?;
    if count <= 1 {
        return Ok(Deleted::OnlyModel);
    }
    let job: Option<String> =
        sqlx::query_scalar("select id from jobs where base_model = $1 and status in ('queued', 'running') limit 1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(job_id) = job {
        return Ok(Deleted::InUse { job_id });
    }
    // An alias being put takes a share lock on this row (PostgreSQL) or waits for this write
    // transaction (SQLite), so none can point here unseen.
    let names: Vec<String> =
        sqlx::query_scalar("select name from model_aliases where model_id = $1 order by name").bind(id).fetch_all(&mut *tx).await?;
    if !names.is_empty() {
        return Ok(Deleted::Aliased { names });
    }
    sqlx::query("delete from models where id = $1").bind(id).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(Deleted::Removed { path })
}
