//! Start-up steps every service shares: binding, the database with its
//! migrations (retried in the background so a service starts while PostgreSQL
//! is down), and the readiness probe that goes with it.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sea_orm::DatabaseConnection;
use sea_orm_migration::MigratorTrait;
use tokio::net::TcpListener;
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
    schema_ready: Arc<AtomicBool>,
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
        let schema_ready = Arc::new(AtomicBool::new(false));
        let ready = schema_ready.clone();
        let config = config.clone();
        let pool = connection.clone();
        tokio::spawn(async move {
            loop {
                let outcome = if config.migrate_on_start {
                    db::migrate::<M>(&config).await.map(|()| true)
                } else {
                    M::get_pending_migrations(&pool)
                        .await
                        .map(|pending| pending.is_empty())
                };
                match outcome {
                    Ok(true) => {
                        ready.store(true, Ordering::Release);
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
        self.schema_ready.load(Ordering::Acquire)
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
