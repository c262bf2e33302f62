//! The service's database: connecting through sea-orm, creating the database
//! when it is missing (so a bare start works), and running migrations.

use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr};
use sea_orm_migration::MigratorTrait;

use crate::config::DatabaseConfig;

/// Opens the connection pool lazily: connections are made on first use, so a
/// service starts (and reports `NOT_SERVING`) while the database is down.
pub async fn connect(config: &DatabaseConfig) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(config.url.expose().to_owned());
    options
        .max_connections(config.max_connections)
        .min_connections(config.min_connections)
        .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
        .acquire_timeout(Duration::from_millis(config.connect_timeout_ms))
        .connect_lazy(true)
        .sqlx_logging(false)
        .map_sqlx_postgres_pool_opts(|pool| pool.after_release(shrink_on_release));
    Database::connect(options).await
}

/// Gives back, when a connection returns to the pool, what its buffers grew
/// to for one large message: sqlx keeps a connection's write buffer at the
/// size of the largest message it ever sent, so every pooled connection that
/// once carried a bulk insert (hundreds of KiB for 1,000 rows) kept that much
/// for its life. Costs nothing for a connection whose buffers stayed at their
/// default 8 KiB.
fn shrink_on_release(
    connection: &mut sea_orm::sqlx::PgConnection,
    _: sea_orm::sqlx::pool::PoolConnectionMetadata,
) -> futures::future::BoxFuture<'_, Result<bool, sea_orm::sqlx::Error>> {
    use sea_orm::sqlx::Connection as _;
    connection.shrink_buffers();
    Box::pin(std::future::ready(Ok(true)))
}

/// Creates the PostgreSQL database named in `url` when it does not exist yet,
/// connecting to the server's `postgres` database to do so. SQLite creates its
/// file by itself (`?mode=rwc`).
pub async fn ensure_database(url: &str) -> Result<(), DbErr> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Ok(());
    }
    let mut parsed = url::Url::parse(url).map_err(|e| DbErr::Custom(format!("bad url: {e}")))?;
    let name = parsed.path().trim_start_matches('/').to_owned();
    if name.is_empty() {
        return Ok(());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(DbErr::Custom(
            "database name may only hold [A-Za-z0-9_-]".into(),
        ));
    }
    parsed.set_path("/postgres");
    let admin = Database::connect(parsed.as_str()).await?;
    let exists = || async {
        admin
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT 1 AS one FROM pg_database WHERE datname = $1",
                [name.clone().into()],
            ))
            .await
            .map(|row| row.is_some())
    };
    if !exists().await? {
        let created = admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await;
        match created {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another replica created it at the same time: PostgreSQL says
            // so as "already exists" or, when both inserts raced, as a
            // unique violation in its catalog. Either way it is there now.
            Err(_) if exists().await? => {}
            Err(err) => return Err(err),
        }
    }
    admin.close().await?;
    Ok(())
}

/// Creates the database when missing and applies every pending migration of `M`.
pub async fn migrate<M: MigratorTrait>(config: &DatabaseConfig) -> Result<(), DbErr> {
    ensure_database(config.url.expose()).await?;
    let db = connect(config).await?;
    apply_migrations::<M>(&db, config).await?;
    db.close().await?;
    Ok(())
}

/// The key of the PostgreSQL advisory lock held while migrations are
/// applied (advisory locks are per database, so services sharing a server
/// do not wait for each other).
pub const MIGRATION_LOCK: i64 = 0x7573_6865_725f_6d69; // "usher_mi"

/// Applies every pending migration of `M` on `pool`, holding the database's
/// migration lock ([`MIGRATION_LOCK`]) meanwhile, so replicas that start
/// together (or a `migrate` job beside a replica with `migrate_on_start`)
/// apply each migration once, one after the other: the second finds nothing
/// pending. Without it both would create the same tables at once and one
/// would fail. The lock is a session lock on a connection of its own, so a
/// process that dies while migrating releases it at once. SQLite (one
/// process) takes none.
pub async fn apply_migrations<M: MigratorTrait>(
    pool: &DatabaseConnection,
    config: &DatabaseConfig,
) -> Result<(), DbErr> {
    if pool.get_database_backend() != DbBackend::Postgres {
        return M::up(pool, None).await;
    }
    let mut options = ConnectOptions::new(config.url.expose().to_owned());
    options
        .max_connections(1)
        .min_connections(1)
        .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
        .acquire_timeout(Duration::from_millis(config.connect_timeout_ms))
        .sqlx_logging(false);
    let lock = Database::connect(options).await?;
    let statement = |sql: &str| {
        sea_orm::Statement::from_sql_and_values(DbBackend::Postgres, sql, [MIGRATION_LOCK.into()])
    };
    let taken = lock
        .query_one_raw(statement("SELECT pg_try_advisory_lock($1) AS taken"))
        .await?
        .map(|row| row.try_get::<bool>("", "taken"))
        .transpose()?
        .unwrap_or(false);
    if !taken {
        tracing::info!("waiting for another process's migrations");
        lock.execute_raw(statement("SELECT pg_advisory_lock($1)"))
            .await?;
    }
    let applied = M::up(pool, None).await;
    // Closing the session releases the lock too; unlock first so the next
    // waiter does not wait for the close.
    let unlocked = lock
        .execute_raw(statement("SELECT pg_advisory_unlock($1)"))
        .await;
    lock.close().await?;
    applied?;
    unlocked.map(|_| ())
}

/// A database transaction that is a `db.transaction` span of the current
/// trace from [`begin`] until it is committed, rolled back or dropped (no
/// span, and no cost, when traces are not exported or no call is traced). Use it as the
/// [`DatabaseTransaction`](sea_orm::DatabaseTransaction) it dereferences to.
pub struct Transaction {
    txn: sea_orm::DatabaseTransaction,
    _span: Option<tracing::Span>,
}

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction").finish_non_exhaustive()
    }
}

/// Begins a transaction on `db` (see [`Transaction`]).
pub async fn begin<C>(db: &C) -> Result<Transaction, DbErr>
where
    C: sea_orm::TransactionTrait<Transaction = sea_orm::DatabaseTransaction>,
{
    // Only inside a trace: background work (relays, sweeps) outside any
    // call would otherwise start a trace of its own at every poll.
    let span = (crate::telemetry::traces_exported() && !tracing::Span::current().is_none())
        .then(|| tracing::info_span!("db.transaction", db.system = "postgresql"));
    Ok(Transaction {
        txn: db.begin().await?,
        _span: span,
    })
}

impl Transaction {
    /// Commits, ending the span.
    pub async fn commit(self) -> Result<(), DbErr> {
        self.txn.commit().await
    }

    /// Rolls back, ending the span.
    pub async fn rollback(self) -> Result<(), DbErr> {
        self.txn.rollback().await
    }
}

/// Statements run in the transaction, as on the transaction itself, so a
/// [`Transaction`] goes wherever a connection does.
#[sea_orm_migration::async_trait::async_trait]
impl ConnectionTrait for Transaction {
    fn get_database_backend(&self) -> DbBackend {
        self.txn.get_database_backend()
    }

    async fn execute_raw(&self, stmt: sea_orm::Statement) -> Result<sea_orm::ExecResult, DbErr> {
        self.txn.execute_raw(stmt).await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<sea_orm::ExecResult, DbErr> {
        self.txn.execute_unprepared(sql).await
    }

    async fn query_one_raw(
        &self,
        stmt: sea_orm::Statement,
    ) -> Result<Option<sea_orm::QueryResult>, DbErr> {
        self.txn.query_one_raw(stmt).await
    }

    async fn query_all_raw(
        &self,
        stmt: sea_orm::Statement,
    ) -> Result<Vec<sea_orm::QueryResult>, DbErr> {
        self.txn.query_all_raw(stmt).await
    }

    fn support_returning(&self) -> bool {
        self.txn.support_returning()
    }

    fn is_mock_connection(&self) -> bool {
        self.txn.is_mock_connection()
    }
}

impl std::ops::Deref for Transaction {
    type Target = sea_orm::DatabaseTransaction;

    fn deref(&self) -> &Self::Target {
        &self.txn
    }
}

/// Whether the database answers a trivial query.
pub async fn ping(db: &DatabaseConnection) -> bool {
    db.ping().await.is_ok()
}

/// A `LIKE` pattern matching `term` anywhere, with `%`, `_` and `\` in the
/// term matched literally (backslash is the escape character).
pub fn contains_pattern(term: &str) -> String {
    let mut pattern = String::with_capacity(term.len() + 2);
    pattern.push('%');
    for c in term.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// What a store operation fails with: the one classification of [`DbErr`]
/// every service's store boundary answers, so no handler inspects database
/// errors (their text, their SQLSTATE or their backend) itself.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row asked for does not exist (or belongs to another account).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A unique constraint refused the write; the constraint's name when the
    /// database gave one (the caller knows which field that means).
    #[error("taken: {0}")]
    Taken(String),
    /// The database cannot be reached or a connection could not be had in
    /// time; the caller may retry.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a bug or an unexpected failure.
    #[error("database: {0:#}")]
    Internal(anyhow::Error),
}

impl StoreError {
    /// Whether a unique constraint refused the write.
    pub fn is_taken(&self) -> bool {
        matches!(self, Self::Taken(_))
    }
}

/// Whether `err` is a passing condition a retry may clear: no connection,
/// a server going away, restarting or out of connections, or a table that
/// does not exist yet (a replica reached before its migrations were
/// applied, while its readiness still says NOT_SERVING).
pub fn is_passing(err: &DbErr) -> bool {
    use sea_orm::{RuntimeErr, sqlx::Error as Sqlx};
    match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Query(RuntimeErr::SqlxError(sqlx)) | DbErr::Exec(RuntimeErr::SqlxError(sqlx)) => {
            match sqlx.as_ref() {
                Sqlx::Io(_) | Sqlx::PoolTimedOut | Sqlx::PoolClosed | Sqlx::WorkerCrashed => true,
                Sqlx::Database(db) => db.code().is_some_and(|code| {
                    // undefined_table, invalid_catalog_name,
                    // too_many_connections, admin/crash shutdown,
                    // cannot_connect_now, connection exceptions.
                    matches!(
                        code.as_ref(),
                        "42P01" | "3D000" | "53300" | "57P01" | "57P02" | "57P03"
                    ) || code.starts_with("08")
                }),
                _ => false,
            }
        }
        _ => false,
    }
}

impl From<DbErr> for StoreError {
    fn from(err: DbErr) -> Self {
        if let Some(sea_orm::SqlErr::UniqueConstraintViolation(detail)) = err.sql_err() {
            return Self::Taken(detail);
        }
        if is_passing(&err) {
            return Self::Unavailable(err.to_string());
        }
        match err {
            DbErr::RecordNotFound(_) => Self::NotFound("record"),
            other => Self::Internal(anyhow::Error::new(other)),
        }
    }
}

impl From<StoreError> for crate::error::ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound(what) => Self::not_found(what),
            StoreError::Unavailable(detail) => Self::Unavailable(detail),
            // A constraint the caller did not turn into a field error is a bug.
            taken @ StoreError::Taken(_) => Self::Internal(anyhow::Error::new(taken)),
            StoreError::Internal(err) => Self::Internal(err),
        }
    }
}

/// The result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

#[cfg(test)]
mod store_error_tests {
    use super::*;
    use crate::error::{ApiError, Reason};

    #[test]
    fn connection_failures_are_unavailable_and_others_internal() {
        let down = StoreError::from(DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::Timeout));
        assert!(matches!(down, StoreError::Unavailable(_)), "{down:?}");
        assert!(matches!(ApiError::from(down), ApiError::Unavailable(_)));
        let odd = StoreError::from(DbErr::Custom("odd".into()));
        assert!(matches!(odd, StoreError::Internal(_)), "{odd:?}");
        assert!(!odd.is_taken());
    }

    /// A table that is not there yet (a service reached before its
    /// migrations ran) is a passing condition, not a bug.
    #[tokio::test]
    async fn a_missing_table_is_unavailable() {
        let database = crate::testing::TestDatabase::create("missing_table")
            .await
            .expect("database");
        let db = database.connect().await.expect("connect");
        let err = db
            .execute_unprepared("SELECT * FROM not_migrated_yet")
            .await
            .expect_err("no such table");
        assert!(is_passing(&err), "{err:?}");
        assert!(matches!(
            ApiError::from(StoreError::from(err)),
            ApiError::Unavailable(_)
        ));
        let err = db
            .execute_unprepared("SELECT 1/0")
            .await
            .expect_err("a bug stays a bug");
        assert!(!is_passing(&err), "{err:?}");
        assert!(matches!(ApiError::from(err), ApiError::Internal(_)));
        db.close().await.expect("close");
        database.drop_database().await.expect("drop");
    }

    #[test]
    fn not_found_keeps_the_one_answer() {
        let err = ApiError::from(StoreError::NotFound("user"));
        assert_eq!(err.reason(), Reason::NotFound);
        assert_eq!(err.to_string(), "NOT_FOUND: user not found");
    }
}
