//! Queries on `model_aliases`: names that point at a model.

use serde::Serialize;

use crate::db::{Pool, RowLock, lock_row, now};

/// A name and the model it points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Alias {
    pub name: String,
    pub model_id: String,
    /// When it was last pointed (RFC 3339, UTC).
    pub updated_at: String,
}

/// Every alias, by name.
pub async fn list(pool: &Pool) -> Result<Vec<Alias>, sqlx::Error> {
    sqlx::query_as("select name, model_id, updated_at from model_aliases order by name").fetch_all(pool).await
}

/// One alias.
pub async fn get(pool: &Pool, name: &str) -> Result<Option<Alias>, sqlx::Error> {
    sqlx::query_as("select name, model_id, updated_at from model_aliases where name = $1").bind(name).fetch_optional(pool).await
}

/// What [`put`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Put {
    /// The name is new.
    Created(Alias),
    /// The name existed, and now points at the model (it may already have).
    Moved(Alias),
    /// No model has that id; nothing was written.
    NoModel,
}

/// Points `name` at `model_id` (made, or moved from the model it pointed at). The model's row is
/// read in the same transaction as the write, locked against a delete (which checks aliases under
/// its own lock: see `db::models::delete`), so a name never points at a deleted model; whether
/// the name existed is read there too.
pub async fn put(pool: &Pool, name: &str, model_id: &str) -> Result<Put, sqlx::Error> {
    let Some(mut tx) = lock_row(pool, "models", model_id, RowLock::Share).await? else { return Ok(Put::NoModel) };
    let existed: Option<i32> = sqlx::query_scalar("select 1 from model_aliases where name = $1").bind(name).fetch_optional(&mut *tx).await?;
    let alias = Alias { name: name.to_string(), model_id: model_id.to_string(), updated_at: now() };
    sqlx::query(
        "insert into model_aliases (name, model_id, updated_at) values ($1, $2, $3) \
         on conflict (name) do update set model_id = excluded.model_id, updated_at = excluded.updated_at",
    )
    .bind(&alias.name)
    .bind(&alias.model_id)
    .bind(&alias.updated_at)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(if existed.is_some() { Put::Moved(alias) } else { Put::Created(alias) })
}

/// Removes an alias; whether there was one.
pub async fn delete(pool: &Pool, name: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("delete from model_aliases where name = $1").bind(name).execute(pool).await?;
    Ok(done.rows_affected() > 0)
}
