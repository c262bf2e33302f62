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

    /// Runs the check once: whether the dependency is usable now.
    pub async fn check(&self) -> bool {
        (self.check)().await
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

/// How often dependencies are probed until the service is first ready,
/// during the first [`EAGER_STARTUP`] of a start: a start is `SERVING` at
/// most this long after its dependencies are. The probes are cheap while a
/// dependency is not up yet (the database probe asks nothing before the
/// schema check succeeded, the broker probe reads a flag).
const EAGER_PROBE_INTERVAL: Duration = Duration::from_millis(5);

/// How long a start probes every [`EAGER_PROBE_INTERVAL`].
const EAGER_STARTUP: Duration = Duration::from_secs(1);

/// How often dependencies are probed until the service is first ready,
/// after [`EAGER_STARTUP`].
const STARTUP_PROBE_INTERVAL: Duration = Duration::from_millis(25);

/// How long dependencies may take to come up at start before it is logged
/// as a warning.
const STARTUP_PATIENCE: Duration = Duration::from_secs(30);

/// Probes every `interval` until `shutdown`, setting `services` to `SERVING`
/// when all probes pass and `NOT_SERVING` otherwise.
pub fn watch(
    reporter: HealthReporter,
    services: Vec<String>,
    probes: Vec<Probe>,
    interval: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    watch_with_patience(
        reporter,
        services,
        probes,
        interval,
        STARTUP_PATIENCE,
        shutdown,
    )
}

fn watch_with_patience(
    reporter: HealthReporter,
    services: Vec<String>,
    probes: Vec<Probe>,
    interval: Duration,
    patience: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let probes = Arc::new(probes);
    tokio::spawn(async move {
        let mut last: Option<bool> = None;
        // Dependencies are usually still coming up at start (the database
        // being created, the broker connecting): that is news only if it
        // lasts.
        let started = tokio::time::Instant::now();
        let mut slow_start_reported = false;
        let mut ever_healthy = false;
        loop {
            // All at once: a round takes as long as the slowest probe, so a
            // dependency that is slow to answer delays no other.
            let checks = probes.iter().map(|probe| async move {
                let ok =
                    tokio::time::timeout(interval.max(Duration::from_millis(500)), (probe.check)())
                        .await
                        .unwrap_or(false);
                (probe.name, ok)
            });
            let failing: Vec<&'static str> = futures::future::join_all(checks)
                .await
                .into_iter()
                .filter_map(|(name, ok)| (!ok).then_some(name))
                .collect();
            let healthy = failing.is_empty();
            if shutdown.is_cancelled() {
                return;
            }
            if last.is_none() && !healthy {
                tracing::info!(failing = ?failing, "starting: waiting for dependencies");
            } else if !ever_healthy
                && !healthy
                && !slow_start_reported
                && started.elapsed() >= patience
            {
                slow_start_reported = true;
                tracing::warn!(failing = ?failing, "dependency unreachable since start, not serving");
            }
            if last != Some(healthy) {
                if healthy {
                    ever_healthy = true;
                    tracing::info!("dependencies reachable, serving");
                } else if last.is_some() {
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
                // Until first ready, look often: a start is SERVING as soon
                // as its dependencies are, not up to an interval later.
                () = tokio::time::sleep(if ever_healthy {
                    interval
                } else if started.elapsed() < EAGER_STARTUP {
                    interval.min(EAGER_PROBE_INTERVAL)
                } else {
                    interval.min(STARTUP_PROBE_INTERVAL)
                }) => {}
            }
        }
    })
}

/// Why [`check`] did not find the service `SERVING`.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The address is not a valid gRPC endpoint URL.
    #[error("bad address {address:?}: {message}")]
    Address {
        /// The address given.
        address: String,
        /// What is wrong with it.
        message: String,
    },
    /// No answer within the deadline, or the connection failed.
    #[error("no answer from {address}: {message}")]
    Unreachable {
        /// The address asked.
        address: String,
        /// The transport error or the timeout.
        message: String,
    },
    /// The server answered with an error (e.g. `NOT_FOUND` for a name it
    /// does not serve).
    #[error("health check of {service:?} failed: {status}")]
    Refused {
        /// The service name asked about.
        service: String,
        /// The gRPC status answered.
        status: tonic::Status,
    },
    /// The server answered with a status other than `SERVING`.
    #[error("{service:?} is {status}")]
    NotServing {
        /// The service name asked about.
        service: String,
        /// The status answered, e.g. `NOT_SERVING`.
        status: &'static str,
    },
}

/// Asks the `grpc.health.v1.Health` service at `address` (e.g.
/// `http://127.0.0.1:50061`) for the status of `service` (`""` is liveness),
/// within `timeout`. `Ok` only when it answers `SERVING`. This is what the
/// binaries' `health` subcommand runs, so containers can be probed without a
/// shell or an extra tool.
pub async fn check(address: &str, service: &str, timeout: Duration) -> Result<(), CheckError> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let endpoint = tonic::transport::Endpoint::from_shared(address.to_owned())
        .map_err(|e| CheckError::Address {
            address: address.to_owned(),
            message: e.to_string(),
        })?
        .connect_timeout(timeout)
        .timeout(timeout);
    let unreachable = |message: String| CheckError::Unreachable {
        address: address.to_owned(),
        message,
    };
    let ask = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| unreachable(format!("{e:#}")))?;
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(|status| CheckError::Refused {
                service: service.to_owned(),
                status,
            })
    };
    let answer = tokio::time::timeout(timeout, ask)
        .await
        .map_err(|_| unreachable(format!("timed out after {timeout:?}")))??;
    let status = answer.into_inner().status();
    if status == tonic_health::pb::health_check_response::ServingStatus::Serving {
        Ok(())
    } else {
        Err(CheckError::NotServing {
            service: service.to_owned(),
            status: status.as_str_name(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;

    /// A health server on a free loopback port with `ready` NOT_SERVING and
    /// liveness SERVING; returns its address.
    async fn health_server(shutdown: CancellationToken) -> String {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("ready", ServingStatus::NotServing)
            .await;
        reporter
            .set_service_status("up", ServingStatus::Serving)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _keep = reporter;
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    shutdown.cancelled_owned(),
                )
                .await
                .expect("serve");
        });
        address
    }

    #[tokio::test]
    async fn check_passes_only_for_serving_names() {
        let shutdown = CancellationToken::new();
        let address = health_server(shutdown.clone()).await;
        let timeout = Duration::from_secs(5);

        check(&address, "", timeout)
            .await
            .expect("liveness serving");
        check(&address, "up", timeout).await.expect("up serving");

        let err = check(&address, "ready", timeout)
            .await
            .expect_err("not serving");
        assert!(matches!(err, CheckError::NotServing { .. }), "{err:?}");
        assert!(err.to_string().contains("NOT_SERVING"), "{err}");

        let err = check(&address, "no.such.Service", timeout)
            .await
            .expect_err("unknown name");
        match err {
            CheckError::Refused { status, .. } => {
                assert_eq!(status.code(), tonic::Code::NotFound);
            }
            other => panic!("expected Refused, got {other:?}"),
        }
        shutdown.cancel();
    }

    #[tokio::test]
    async fn check_reports_an_unreachable_server_and_a_bad_address() {
        // A port that was free a moment ago: nothing listens there.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let err = check(
            &format!("http://127.0.0.1:{port}"),
            "",
            Duration::from_secs(2),
        )
        .await
        .expect_err("nothing listens");
        assert!(matches!(err, CheckError::Unreachable { .. }), "{err:?}");

        let err = check("not a url", "", Duration::from_secs(1))
            .await
            .expect_err("bad address");
        assert!(matches!(err, CheckError::Address { .. }), "{err:?}");
    }
}

#[cfg(test)]
mod watch_tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    };

    use tracing::Level;
    use tracing_subscriber::{Layer, layer::SubscriberExt};

    use super::*;

    /// Records each event's level and message.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(Level, String)>>>);

    impl<S: tracing::Subscriber> Layer<S> for Recorder {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            let mut message = Message(String::new());
            event.record(&mut message);
            self.0
                .lock()
                .expect("lock")
                .push((*event.metadata().level(), message.0));
        }
    }

    impl Recorder {
        fn warnings(&self) -> Vec<String> {
            self.0
                .lock()
                .expect("lock")
                .iter()
                .filter(|(level, _)| *level == Level::WARN)
                .map(|(_, message)| message.clone())
                .collect()
        }
    }

    /// A probe that passes while the returned switch is on (it starts off).
    fn switch_probe() -> (Arc<AtomicBool>, Probe) {
        let up = Arc::new(AtomicBool::new(false));
        let flag = up.clone();
        let probe = Probe::new("database", move || {
            let flag = flag.clone();
            async move { flag.load(Ordering::SeqCst) }
        });
        (up, probe)
    }

    #[tokio::test]
    async fn a_slow_start_is_quiet_until_patience_runs_out_then_outages_warn() {
        let recorder = Recorder::default();
        let _guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(recorder.clone()));
        let (up, probe) = switch_probe();
        let (reporter, _) = tonic_health::server::health_reporter();
        let shutdown = CancellationToken::new();
        let task = watch_with_patience(
            reporter,
            vec!["svc".into()],
            vec![probe],
            Duration::from_millis(20),
            Duration::from_secs(2),
            shutdown.clone(),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(recorder.warnings().is_empty(), "starting is not a warning");
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert_eq!(
            recorder.warnings(),
            ["dependency unreachable since start, not serving"],
            "once, when it lasts"
        );
        up.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        up.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            recorder.warnings().last().map(String::as_str),
            Some("dependency unreachable, not serving"),
            "an outage after serving warns at once"
        );
        assert_eq!(recorder.warnings().len(), 2);
        shutdown.cancel();
        task.await.expect("watch ends");
    }

    #[tokio::test]
    async fn probes_run_at_once_so_a_slow_dependency_delays_no_other() {
        let recorder = Recorder::default();
        let _guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(recorder.clone()));
        // Three dependencies that each take 400 ms to answer: one after the
        // other, a round would take 1.2 s.
        let slow = |name| {
            Probe::new(name, || async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                true
            })
        };
        let (reporter, _) = tonic_health::server::health_reporter();
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let task = watch(
            reporter,
            vec!["svc".into()],
            vec![slow("database"), slow("redis"), slow("amqp")],
            Duration::from_secs(10),
            shutdown.clone(),
        );
        let serving = |r: &Recorder| {
            r.0.lock()
                .expect("lock")
                .iter()
                .any(|(_, m)| m == "dependencies reachable, serving")
        };
        while !serving(&recorder) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1_000),
            "one round of concurrent probes, not the sum: {took:?}"
        );
        shutdown.cancel();
        task.await.expect("watch ends");
    }

    #[tokio::test]
    async fn a_start_is_ready_as_soon_as_its_dependencies_not_an_interval_later() {
        let recorder = Recorder::default();
        let _guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(recorder.clone()));
        let (up, probe) = switch_probe();
        let (reporter, _) = tonic_health::server::health_reporter();
        let shutdown = CancellationToken::new();
        // A long interval: with it alone, readiness would wait 10 s.
        let task = watch(
            reporter,
            vec!["svc".into()],
            vec![probe],
            Duration::from_secs(10),
            shutdown.clone(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        up.store(true, Ordering::SeqCst);
        let ready = tokio::time::Instant::now();
        let serving = |r: &Recorder| {
            r.0.lock()
                .expect("lock")
                .iter()
                .any(|(_, m)| m == "dependencies reachable, serving")
        };
        while !serving(&recorder) {
            assert!(
                ready.elapsed() < Duration::from_secs(3),
                "SERVING soon after the dependencies are"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.cancel();
        task.await.expect("watch ends");
    }
}
