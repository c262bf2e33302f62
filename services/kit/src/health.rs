//! Readiness from dependencies. A background task probes the database, Redis
//! and the broker and sets the `grpc.health.v1` status of the service's own
//! names: `NOT_SERVING` while any probe fails. The empty service name is
//! liveness and never depends on them.

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

/// One dependency check.
pub struct Probe {
    name: &'static str,
    check: Box<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Probe {
    /// A probe named `name` (`database`, `redis`, `amqp`).
    pub fn new<F, Fut>(name: &'static str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = bool> + Send + 'static,
    {
        Self {
            name,
            check: Box::new(move || Box::pin(check())),
        }
    }

    /// A database probe.
    pub fn database(db: sea_orm::DatabaseConnection) -> Self {
        Self::new("database", move || {
            let db = db.clone();
            async move { crate::db::ping(&db).await }
        })
    }

    /// A Redis probe.
    pub fn redis(redis: crate::redis::Redis) -> Self {
        Self::new("redis", move || {
            let redis = redis.clone();
            async move { redis.ping().await }
        })
    }

    /// A broker probe.
    pub fn amqp(amqp: crate::amqp::Amqp) -> Self {
        Self::new("amqp", move || {
            let amqp = amqp.clone();
            async move { amqp.is_connected() }
        })
    }
}

/// Probes every `interval` until `shutdown`, setting `services` to `SERVING`
/// when all probes pass and `NOT_SERVING` otherwise.
pub fn watch(
    reporter: HealthReporter,
    services: Vec<String>,
    probes: Vec<Probe>,
    interval: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let probes = Arc::new(probes);
    tokio::spawn(async move {
        let mut last: Option<bool> = None;
        loop {
            let mut failing = Vec::new();
            for probe in probes.iter() {
                let ok =
                    tokio::time::timeout(interval.max(Duration::from_millis(500)), (probe.check)())
                        .await
                        .unwrap_or(false);
                if !ok {
                    failing.push(probe.name);
                }
            }
            let healthy = failing.is_empty();
            if shutdown.is_cancelled() {
                return;
            }
            if last != Some(healthy) {
                if healthy {
                    tracing::info!("dependencies reachable, serving");
                } else {
                    tracing::warn!(failing = ?failing, "dependency unreachable, not serving");
                }
                let status = if healthy {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                for service in &services {
                    reporter.set_service_status(service, status).await;
                }
                metrics::gauge!("usher_ready").set(if healthy { 1.0 } else { 0.0 });
                last = Some(healthy);
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    })
}
