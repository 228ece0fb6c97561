//! Every SQL query of the service, one function each, grouped by table (`job_metrics` holds the
//! queries on `job_metrics`, `job_evaluations`, `job_mistakes` and `checkpoints`). `migrations/sqlite/` and
//! `migrations/postgres/` hold the schema of each backend; this module opens the pool and runs them.
//!
//! The pool is sqlx's `Any` pool, so one query text serves both backends: placeholders are `$N`
//! (which SQLite reads too), upserts are `on conflict … do update`, and the few statements that must
//! differ (locking, the queue's claim) pick their text with [`Backend::of`].

#[macro_use]
mod page;
pub mod datasets;
pub mod job_metrics;
pub mod jobs;
pub mod aliases;
pub mod models;

pub use page::{Cursor, Listed, Page};

use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

/// The service's connection pool: SQLite or PostgreSQL, by the database URL.
pub type Pool = AnyPool;

/// Which database a pool talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend of a database URL (`sqlite:…`, `postgres://…` or `postgresql://…`).
    pub fn of_url(url: &str) -> Result<Self, String> {
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "sqlite" => Ok(Backend::Sqlite),
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            _ => Err(format!("unsupported database URL scheme '{scheme}:' (use sqlite:// or postgres://)")),
        }
    }

    /// The backend of an open pool.
    pub fn of(pool: &Pool) -> Self {
        Self::of_url(pool.connect_options().database_url.as_str()).unwrap_or(Backend::Sqlite)
    }
}

/// How a transaction of [`lock_row`] holds its row on PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowLock {
    /// Against deletes and updates (`for share`): other sharers go ahead.
    Share,
    /// Against every other lock (`for update`).
    Update,
}

/// Begins a transaction that holds the row of `table` with this `id` until it ends: on SQLite a
/// write transaction from the start (`begin immediate`, the whole database), on PostgreSQL the
/// row locked as `lock` says. `None`, with nothing held, where there is no such row.
pub async fn lock_row<'p>(pool: &'p Pool, table: &'static str, id: &str, lock: RowLock) -> Result<Option<sqlx::Transaction<'p, sqlx::Any>>, sqlx::Error> {
    let (begin, suffix) = match (Backend::of(pool), lock) {
        (Backend::Sqlite, _) => ("begin immediate", ""),
        (Backend::Postgres, RowLock::Share) => ("begin", " for share"),
        (Backend::Postgres, RowLock::Update) => ("begin", " for update"),
    };
    let mut tx = pool.begin_with(begin).await?;
    let sql = format!("select 1 from {table} where id = $1{suffix}");
    let found: Option<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&mut *tx).await?;
    if found.is_none() {
        tx.rollback().await?;
        return Ok(None);
    }
    Ok(Some(tx))
}

/// The SQLite URL of a database file (created if missing).
pub fn sqlite_url(path: &std::path::Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

/// Opens a pool on `url` and brings its schema up to date. SQLite files are created if missing
/// and run in WAL mode.
pub async fn connect(url: &str) -> anyhow::Result<Pool> {
    sqlx::any::install_default_drivers();
    let backend = Backend::of_url(url).map_err(anyhow::Error::msg)?;
    let options: AnyConnectOptions = url.parse()?;
    let pool = AnyPoolOptions::new()
        .max_connections(match backend {
            Backend::Sqlite => 8,
            Backend::Postgres => 16,
        })
        // A database that does not answer fails a request after this long instead of hanging it.
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if backend == Backend::Sqlite {
                    // NORMAL is durable in WAL mode except for the last transactions before a
                    // power loss; a process crash (the case we test) loses nothing.
                    conn.execute(
                        "pragma journal_mode = wal; pragma synchronous = normal; pragma foreign_keys = on; \
                         pragma busy_timeout = 10000;",
                    )
                    .await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await?;
    match backend {
        Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(&pool).await?,
        Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(&pool).await?,
    }
    Ok(pool)
}

/// Channels the PostgreSQL triggers notify (`migrations/postgres/…_notify.sql`).
pub const JOBS_CHANNEL: &str = "vitforge_jobs";
pub const MODELS_CHANNEL: &str = "vitforge_models";

/// On PostgreSQL, calls `on_notify` for every notification on `channel`, for ever: it listens on
/// a connection of its own and reconnects (after a second) when the database goes away. On SQLite
/// it returns at once: there is nothing to listen to, and callers poll anyway.
pub async fn listen(pool: &Pool, channel: &'static str, on_notify: impl Fn()) {
    if Backend::of(pool) != Backend::Postgres {
        return;
    }
    let url = pool.connect_options().database_url.to_string();
    loop {
        match sqlx::postgres::PgListener::connect(&url).await {
            Ok(mut listener) => match listener.listen(channel).await {
                Ok(()) => {
                    // A notification sent while we were away is caught by the callers' polling.
                    on_notify();
                    while listener.recv().await.is_ok() {
                        on_notify();
                    }
                }
                Err(e) => tracing::warn!(channel, error = %e, "LISTEN failed; polling only until it works"),
            },
            Err(e) => tracing::debug!(channel, error = %e, "cannot connect to listen; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// PostgreSQL advisory-lock key of blob collection across processes (any fixed number).
const BLOB_LOCK_KEY: i64 = 0x7669_7466_6f72_6765;

/// A hold on the cross-process blob lock: a connection of its own, taken out of the pool, whose
/// session holds a PostgreSQL advisory lock. Dropping it closes the connection, and the server
/// releases the lock; so does the death of the process.
pub struct SessionLock(#[allow(dead_code)] sqlx::AnyConnection);

/// The blob lock across processes, as [`crate::blob_gc`] uses the in-process one: uploads hold it
/// shared from their first blob write to their commit, collection exclusively. `wait = false`
/// gives `None` at once when another process holds it the other way. Only PostgreSQL has it:
/// `Ok(None)` on SQLite.
pub async fn blob_lock(pool: &Pool, exclusive: bool, wait: bool) -> Result<Option<SessionLock>, sqlx::Error> {
    if Backend::of(pool) != Backend::Postgres {
        return Ok(None);
    }
    let mut conn = pool.acquire().await?.detach();
    let sql = match (exclusive, wait) {
        (true, true) => "select pg_advisory_lock($1) is not null",
        (true, false) => "select pg_try_advisory_lock($1)",
        (false, true) => "select pg_advisory_lock_shared($1) is not null",
        (false, false) => "select pg_try_advisory_lock_shared($1)",
    };
    let held: bool = sqlx::query_scalar(sql).bind(BLOB_LOCK_KEY).fetch_one(&mut conn).await?;
    Ok(held.then_some(SessionLock(conn)))
}

/// Whether the database answers (the readiness probe).
pub async fn ping(pool: &Pool) -> Result<(), sqlx::Error> {
    sqlx::query("select 1").execute(pool).await?;
    Ok(())
}

/// The current time as stored in the database: RFC 3339, UTC, milliseconds.
pub fn now() -> String {
    at(chrono::Utc::now())
}

/// A time as stored in the database. The fixed width makes text order time order, which lease
/// expiry relies on.
pub fn at(time: chrono::DateTime<chrono::Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A new identifier: a UUIDv7, so ids sort by creation time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
