//! Logs and metrics. Logs are JSON lines (or text) filtered by
//! `telemetry.log_filter`; each RPC runs in a span carrying its method and
//! request id. Metrics are served in the Prometheus format on
//! `server.metrics_listen`.

use std::net::SocketAddr;

use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::{LogFormat, TelemetryConfig};

/// Installs the global log subscriber. A second call (several services in one
/// process, as in `usher dev` and tests) keeps the first subscriber.
pub fn init_logging(config: &TelemetryConfig) {
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match config.log_format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Text => registry.with(fmt::layer().compact()).try_init(),
    };
    // Already installed: keep it.
    drop(result);
}

/// Whether this process has installed its metrics recorder.
static METRICS_INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();

/// Serves `/metrics` on `listen` and installs the global recorder. Call it
/// before anything records — before connecting to the broker or starting a
/// background task: a metric handle taken while no recorder is installed
/// records nowhere for ever. A second call in the same process keeps the
/// first exporter (all services of `usher dev` share it) and binds nothing.
///
/// Registers the metrics every binary serves (`usher_ready`,
/// `usher_grpc_shed_total`), so a scrape right after start lists them.
pub fn install_metrics(listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let Some(listen) = listen else { return Ok(()) };
    if METRICS_INSTALLED.get().is_some() {
        return Ok(());
    }
    let installed = metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ])
        .and_then(|builder| builder.install());
    match installed {
        Ok(()) => {
            let _ = METRICS_INSTALLED.set(());
            register_common();
            tracing::info!(%listen, "metrics endpoint listening");
            Ok(())
        }
        Err(metrics_exporter_prometheus::BuildError::FailedToSetGlobalRecorder(_)) => {
            // Another recorder was there first: keep it, and bind no more.
            let _ = METRICS_INSTALLED.set(());
            Ok(())
        }
        Err(err) => Err(anyhow::anyhow!("metrics endpoint on {listen}: {err}")),
    }
}

/// The metrics of every binary that have no label to wait for, at their
/// starting values (`usher_grpc_requests_total` and
/// `usher_grpc_request_duration_seconds` are per method and appear with the
/// first call, a health check included).
fn register_common() {
    metrics::gauge!("usher_ready").set(0.0);
    metrics::counter!("usher_grpc_shed_total").increment(0);
}
