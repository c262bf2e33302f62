//! Start-up steps every service shares: binding, the database with its
//! migrations (retried in the background so a service starts while PostgreSQL
//! is down), and the readiness probe that goes with it.

use std::{future::Future, net::SocketAddr, time::Duration};

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
}

impl ServiceDatabase {
    /// Opens the pool (lazily) and, in the background, creates the database
    /// and applies migrations when `migrate_on_start` is set, or waits until
    /// no migration is pending, retrying every `retry` until `shutdown`.
    pub async fn start<M: MigratorTrait>(
        config: &DatabaseConfig,
        retry: Duration,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let connection = db::connect(config).await?;
        let (ready, schema_ready) = watch::channel(false);
        let config = config.clone();
        let pool = connection.clone();
        tokio::spawn(async move {
            loop {
                let attempt = async {
                    if config.migrate_on_start {
                        db::migrate::<M>(&config).await.map(|()| true)
                    } else {
                        M::get_pending_migrations(&pool)
                            .await
                            .map(|pending| pending.is_empty())
                    }
                };
                // A stop does not wait for an attempt on an unreachable server.
                let outcome = tokio::select! {
                    () = shutdown.cancelled() => return,
                    outcome = attempt => outcome,
                };
                match outcome {
                    Ok(true) => {
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

    /// Readiness: schema applied and the database answering.
    pub fn probe(&self) -> Probe {
        let this = self.clone();
        Probe::new("database", move || {
            let this = this.clone();
            async move { this.schema_ready() && db::ping(&this.connection).await }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

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
        let admin = crate::db::connect(&DatabaseConfig::local("postgres"))
            .await
            .expect("admin");
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await
            .expect("dropped");
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
}
