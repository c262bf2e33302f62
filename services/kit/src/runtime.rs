//! Start-up steps every service shares: binding, the database with its
//! migrations (retried in the background so a service starts while PostgreSQL
//! is down), and the readiness probe that goes with it.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sea_orm::DatabaseConnection;
use sea_orm_migration::MigratorTrait;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{config::DatabaseConfig, db, health::Probe};

/// Binds the gRPC listener.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

/// A service's database and whether its schema is up to date.
#[derive(Clone, Debug)]
pub struct ServiceDatabase {
    /// The pool.
    pub connection: DatabaseConnection,
    schema_ready: watch::Receiver<bool>,
    /// Set when the schema check has just succeeded: that answer from the
    /// database is the readiness probe's first one (so the probe does not
    /// need a connection of its own while background work takes the one the
    /// check opened).
    answered: Arc<AtomicBool>,
}

impl ServiceDatabase {
    /// Opens the pool (lazily) and, in the background, checks the schema
    /// on it, retrying every `retry` until `shutdown`: see
    /// [`bring_up_to_date`] for what one check does.
    pub async fn start<M: MigratorTrait>(
        config: &DatabaseConfig,
        retry: Duration,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let connection = db::connect(config).await?;
        let (ready, schema_ready) = watch::channel(false);
        let answered = Arc::new(AtomicBool::new(false));
        let config = config.clone();
        let pool = connection.clone();
        let just_answered = answered.clone();
        tokio::spawn(async move {
            loop {
                // A stop does not wait for an attempt on an unreachable server.
                let outcome = tokio::select! {
                    () = shutdown.cancelled() => return,
                    outcome = bring_up_to_date::<M>(&pool, &config) => outcome,
                };
                match outcome {
                    Ok(true) => {
                        just_answered.store(true, Ordering::SeqCst);
                        ready.send_replace(true);
                        tracing::info!("database schema up to date");
                        return;
                    }
                    Ok(false) => tracing::warn!("migrations pending: run `migrate`"),
                    Err(err) => tracing::warn!(error = %err, "database not ready"),
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(retry) => {}
                }
            }
        });
        Ok(Self {
            connection,
            schema_ready,
            answered,
        })
    }

    /// Whether migrations are applied.
    pub fn schema_ready(&self) -> bool {
        *self.schema_ready.borrow()
    }

    /// Spawns `task` once the schema is up to date, so background work on
    /// the database (outbox relays, consumers, sweeps) does not start —
    /// and warn — while the database is still being created. If the
    /// service stops first, `task` never runs.
    pub fn spawn_when_ready<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut ready = self.schema_ready.clone();
        tokio::spawn(async move {
            if ready.wait_for(|ready| *ready).await.is_ok() {
                task.await;
            }
        })
    }

    /// Readiness: schema applied and the database answering (the schema
    /// check that found it applied is the first answer; a ping each time
    /// after it).
    pub fn probe(&self) -> Probe {
        let this = self.clone();
        Probe::new("database", move || {
            let this = this.clone();
            async move {
                this.schema_ready()
                    && (this.answered.swap(false, Ordering::SeqCst)
                        || db::ping(&this.connection).await)
            }
        })
    }
}

/// One schema check on the service's own `pool`: whether no migration is
/// pending afterwards.
///
/// A restart, the usual case, costs one query on one connection, which then
/// stays in the pool for the service: the list of applied migrations is
/// read, nothing is created. Only when a migration is pending (or the
/// database cannot be read, e.g. it does not exist yet) and
/// `migrate_on_start` is set does it create the database when missing
/// (through the server's `postgres` database) and apply the migrations.
pub async fn bring_up_to_date<M: MigratorTrait>(
    pool: &DatabaseConnection,
    config: &DatabaseConfig,
) -> Result<bool, sea_orm::DbErr> {
    match M::get_pending_migrations_read_only(pool).await {
        Ok(pending) if pending.is_empty() => Ok(true),
        Ok(_) | Err(_) if config.migrate_on_start => {
            db::ensure_database(config.url.expose()).await?;
            db::apply_migrations::<M>(pool, config).await?;
            Ok(true)
        }
        Ok(_) => Ok(false),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::ConnectionTrait;
    use sea_orm_migration::MigrationTrait;

    use super::*;
    use crate::config::Secret;

    struct NoMigrations;

    impl MigratorTrait for NoMigrations {
        fn migrations() -> Vec<Box<dyn MigrationTrait>> {
            Vec::new()
        }
    }

    #[tokio::test]
    async fn background_work_starts_once_the_database_exists() {
        // A database that does not exist yet: the service creates it.
        let name = format!("usher_kit_rt_{}", uuid::Uuid::new_v4().simple());
        let shutdown = CancellationToken::new();
        let database = ServiceDatabase::start::<NoMigrations>(
            &DatabaseConfig::local(&name),
            Duration::from_millis(50),
            shutdown.clone(),
        )
        .await
        .expect("pool");
        let probe = database.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        database
            .spawn_when_ready(async move {
                let _ = tx.send(probe.schema_ready());
            })
            .await
            .expect("task");
        assert_eq!(rx.await, Ok(true), "it ran, and only with the schema ready");
        shutdown.cancel();
        database.connection.close().await.expect("close");
        drop_database(&name).await;
    }

    #[tokio::test]
    async fn background_work_never_starts_if_the_service_stops_first() {
        let shutdown = CancellationToken::new();
        let unreachable = DatabaseConfig {
            url: Secret::new("postgres://postgres@127.0.0.1:1/nowhere"),
            connect_timeout_ms: 100,
            ..DatabaseConfig::local("nowhere")
        };
        let database = ServiceDatabase::start::<NoMigrations>(
            &unreachable,
            Duration::from_millis(50),
            shutdown.clone(),
        )
        .await
        .expect("a lazy pool");
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let task = database.spawn_when_ready(async move { flag.store(true, Ordering::SeqCst) });
        tokio::time::sleep(Duration::from_millis(200)).await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("ends with the service")
            .expect("task");
        assert!(!ran.load(Ordering::SeqCst));
    }

    /// One migration creating one table, as a service's migrator does.
    struct OneTable;

    struct CreateThing;

    impl sea_orm_migration::MigrationName for CreateThing {
        fn name(&self) -> &str {
            "m20261206_000001_create_thing"
        }
    }

    #[sea_orm_migration::async_trait::async_trait]
    impl MigrationTrait for CreateThing {
        async fn up(
            &self,
            manager: &sea_orm_migration::SchemaManager,
        ) -> Result<(), sea_orm::DbErr> {
            manager
                .get_connection()
                // Slow enough that replicas starting together overlap.
                .execute_unprepared(
                    "CREATE TABLE thing (id BIGINT PRIMARY KEY); SELECT pg_sleep(0.2)",
                )
                .await
                .map(|_| ())
        }
    }

    impl MigratorTrait for OneTable {
        fn migrations() -> Vec<Box<dyn MigrationTrait>> {
            vec![Box::new(CreateThing)]
        }
    }

    async fn drop_database(name: &str) {
        let admin = crate::db::connect(&DatabaseConfig::local("postgres"))
            .await
            .expect("admin");
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await
            .expect("dropped");
    }

    #[tokio::test]
    async fn a_restart_finds_the_schema_applied_and_the_first_probe_needs_no_new_connection() {
        let name = format!("usher_kit_rt_{}", uuid::Uuid::new_v4().simple());
        // First start: the database is created and migrated.
        let first = DatabaseConfig::local(&name);
        let pool = crate::db::connect(&first).await.expect("pool");
        assert!(
            bring_up_to_date::<OneTable>(&pool, &first)
                .await
                .expect("migrated")
        );
        pool.close().await.expect("close");

        // A restart with a pool of one connection: the schema check's
        // connection stays in it, and while the service's work holds it the
        // first probe still answers — from the check itself.
        let restart = DatabaseConfig {
            max_connections: 1,
            min_connections: 0,
            connect_timeout_ms: 300,
            ..DatabaseConfig::local(&name)
        };
        let shutdown = CancellationToken::new();
        let database = ServiceDatabase::start::<OneTable>(
            &restart,
            Duration::from_millis(50),
            shutdown.clone(),
        )
        .await
        .expect("pool");
        let mut ready = database.schema_ready.clone();
        tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|ready| *ready))
            .await
            .expect("schema found applied")
            .expect("watch");
        let probe = database.probe();
        let busy = sea_orm::TransactionTrait::begin(&database.connection)
            .await
            .expect("the pool's one connection");
        assert!(probe.check().await, "the schema check was the first answer");
        assert!(
            !probe.check().await,
            "later probes ask the database (whose one connection is busy)"
        );
        busy.rollback().await.expect("rollback");
        assert!(probe.check().await, "and it answers again");
        shutdown.cancel();
        database.connection.close().await.expect("close");
        drop_database(&name).await;
    }

    #[tokio::test]
    async fn replicas_starting_together_apply_each_migration_once() {
        // Four processes' worth of pools on a database that does not exist
        // yet, all finding the migration pending at once: each applies it
        // under the migration lock, so none fails on a table another is
        // creating, and the migration is recorded once.
        let name = format!("usher_kit_rt_{}", uuid::Uuid::new_v4().simple());
        let config = DatabaseConfig::local(&name);
        let mut starts = Vec::new();
        for _ in 0..4 {
            let config = config.clone();
            starts.push(tokio::spawn(async move {
                let pool = crate::db::connect(&config).await.expect("pool");
                let outcome = bring_up_to_date::<OneTable>(&pool, &config).await;
                pool.close().await.expect("close");
                outcome
            }));
        }
        for start in starts {
            assert!(
                start.await.expect("joined").expect("migrated, not refused"),
                "up to date"
            );
        }
        let pool = crate::db::connect(&config).await.expect("pool");
        let recorded = pool
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT COUNT(*) AS n FROM seaql_migrations",
            ))
            .await
            .expect("read")
            .expect("a row")
            .try_get::<i64>("", "n")
            .expect("count");
        assert_eq!(recorded, 1);
        pool.close().await.expect("close");
        drop_database(&name).await;
    }

    #[tokio::test]
    async fn pending_migrations_wait_for_migrate_when_not_applied_at_start() {
        let name = format!("usher_kit_rt_{}", uuid::Uuid::new_v4().simple());
        let config = DatabaseConfig::local(&name);
        let pool = crate::db::connect(&config).await.expect("pool");
        crate::db::ensure_database(config.url.expose())
            .await
            .expect("created");
        let manual = DatabaseConfig {
            migrate_on_start: false,
            ..DatabaseConfig::local(&name)
        };
        assert!(
            !bring_up_to_date::<OneTable>(&pool, &manual)
                .await
                .expect("readable"),
            "pending, and left so"
        );
        assert!(
            bring_up_to_date::<OneTable>(&pool, &config)
                .await
                .expect("migrated")
        );
        assert!(
            bring_up_to_date::<OneTable>(&pool, &manual)
                .await
                .expect("readable"),
            "applied now"
        );
        pool.close().await.expect("close");
        drop_database(&name).await;
    }
}
