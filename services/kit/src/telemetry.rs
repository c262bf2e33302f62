//! Logs, traces and metrics. Logs are JSON lines (or text) filtered by
//! `telemetry.log_filter`; each RPC runs in a span carrying its method,
//! request id and trace id. With `telemetry.otlp_endpoint` set, spans are
//! exported over OTLP/gRPC and the W3C trace context (`traceparent`,
//! `tracestate`) travels with every call between the binaries and with
//! every AMQP message, so one call is one trace across them. Metrics are
//! served in the Prometheus format on `server.metrics_listen`.

use std::{collections::BTreeMap, net::SocketAddr};

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer as _, filter, fmt, layer::SubscriberExt, util::SubscriberInitExt,
};

use crate::config::{LogFormat, TelemetryConfig};

/// Whether this process exports spans (set once [`init_logging`] installed
/// an exporter): spans that exist only for traces are not made otherwise.
static TRACES_EXPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process exports traces.
pub fn traces_exported() -> bool {
    TRACES_EXPORTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// What [`init_logging`] installed; [`Telemetry::shutdown`] sends the spans
/// still buffered before the process exits.
#[derive(Debug, Default)]
#[must_use = "keep it until the process exits, then call shutdown"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered (within the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(err) = provider.shutdown()
        {
            tracing::warn!(error = %err, "traces not all exported");
        }
    }
}

/// Installs the global log subscriber, and the trace exporter when
/// `telemetry.otlp_endpoint` is set (spans named for `service`, e.g.
/// `usher-identity`). Must be called inside a tokio runtime. A second call
/// (several services in one process, as in `usher dev` and tests) keeps the
/// first subscriber.
pub fn init_logging(config: &TelemetryConfig, service: &str) -> Telemetry {
    let provider = tracer_provider(config, service);
    let result = subscriber(config, provider.as_ref(), std::io::stdout).try_init();
    match result {
        Ok(()) => {
            if let Some(provider) = &provider {
                opentelemetry::global::set_tracer_provider(provider.clone());
                TRACES_EXPORTED.store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(endpoint = %config.otlp_endpoint, "exporting traces");
            }
            Telemetry { provider }
        }
        // Already installed: keep it.
        Err(_) => Telemetry::default(),
    }
}

/// Logs written to `writer` as `config` says, and spans handed to
/// `provider` when there is one.
fn subscriber<W>(
    config: &TelemetryConfig,
    provider: Option<&SdkTracerProvider>,
    writer: W,
) -> impl tracing::Subscriber + Send + Sync + 'static
where
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    // The log filter decides which lines are written; spans are exported
    // whatever it says: Usher's own, at info and above.
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match config.log_format {
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
        LogFormat::Text => fmt::layer().compact().with_writer(writer).boxed(),
    }
    .with_filter(filter);
    let traces = provider.map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("usher"))
            .with_filter(filter::filter_fn(|metadata| {
                metadata.target().starts_with("usher") && *metadata.level() <= Level::INFO
            }))
    });
    tracing_subscriber::registry().with(logs).with(traces)
}

/// The OTLP exporter and its provider, when an endpoint is configured.
fn tracer_provider(config: &TelemetryConfig, service: &str) -> Option<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig as _;
    if config.otlp_endpoint.is_empty() {
        return None;
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.otlp_endpoint.clone())
        .with_timeout(std::time::Duration::from_secs(5))
        .build();
    let exporter = match exporter {
        Ok(exporter) => exporter,
        Err(err) => {
            eprintln!(
                "traces off: OTLP exporter for {}: {err}",
                config.otlp_endpoint
            );
            return None;
        }
    };
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
        config.trace_sample_ratio,
    )));
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service.to_owned())
                    .build(),
            )
            .build(),
    )
}

/// The W3C header carrying a trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The span of one RPC: its method, request id and trace id (empty when
/// traces are off), continuing the trace of the caller's `traceparent`.
/// Health checks and reflection get a debug span, never exported: probes
/// would otherwise make a trace every few seconds.
pub fn rpc_span<B>(request: &http::Request<B>) -> tracing::Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let path = request.uri().path();
    if crate::authz::is_infrastructure_path(path) {
        return tracing::debug_span!("rpc", method = %path, request_id = %request_id);
    }
    let span = tracing::info_span!(
        "rpc",
        method = %path,
        request_id = %request_id,
        trace_id = tracing::field::Empty,
    );
    continue_trace(&span, &HeaderCarrier(request.headers()));
    span
}

/// Makes `span` a child of the trace context carried in `headers` (a
/// received AMQP message's), and records its trace id on it.
pub fn continue_trace_from(span: &tracing::Span, headers: &BTreeMap<String, String>) {
    continue_trace(span, &MapCarrier(headers));
}

fn continue_trace(span: &tracing::Span, carrier: &dyn Extractor) {
    if !traces_exported() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(carrier);
    if parent.span().span_context().is_valid() {
        // Fails only when the span is disabled (traces off): nothing to do.
        let _ = span.set_parent(parent);
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", span_context.trace_id().to_string());
    }
}

/// Puts the current span's trace context on an outgoing call.
pub fn inject_into(headers: &mut http::HeaderMap) {
    let context = tracing::Span::current().context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut HeaderCarrierMut(headers));
    }
}

/// The current span's trace context as message headers (`traceparent`,
/// `tracestate`), for an AMQP message made now and published later.
pub fn current_trace_headers() -> BTreeMap<String, String> {
    let mut headers = std::collections::HashMap::new();
    let context = tracing::Span::current().context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut headers);
    }
    headers.into_iter().collect()
}

struct HeaderCarrier<'a>(&'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderCarrierMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderCarrierMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct MapCarrier<'a>(&'a BTreeMap<String, String>);

impl Extractor for MapCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
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
    metrics::counter!("usher_redis_unreplicated_writes_total").increment(0);
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log lines written to memory.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> fmt::MakeWriter<'w> for Lines {
        type Writer = Self;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    /// The JSON log line of an event logged inside an RPC's span whose
    /// request carries `traceparent`.
    fn line_inside_a_call(provider: Option<&SdkTracerProvider>) -> serde_json::Value {
        let lines = Lines::default();
        let subscriber = subscriber(&TelemetryConfig::default(), provider, lines.clone());
        tracing::subscriber::with_default(subscriber, || {
            let request = http::Request::builder()
                .uri("/usher.identity.v1.UserService/GetUser")
                .header(
                    TRACEPARENT,
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .body(())
                .expect("request");
            let span = rpc_span(&request);
            let _entered = span.enter();
            tracing::info!("inside the call");
        });
        let text = String::from_utf8(lines.0.lock().expect("lock").clone()).expect("utf-8");
        let line = text
            .lines()
            .find(|line| line.contains("inside the call"))
            .expect("the line");
        serde_json::from_str(line).expect("a JSON line")
    }

    #[test]
    fn a_log_line_carries_the_trace_id_of_its_call() {
        // As init_logging sets it with an exporter (the flag only saves
        // work: the test without traces passes either way).
        TRACES_EXPORTED.store(true, std::sync::atomic::Ordering::Relaxed);
        let provider = SdkTracerProvider::builder().build();
        let line = line_inside_a_call(Some(&provider));
        assert_eq!(line["span"]["name"], "rpc");
        assert_eq!(
            line["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
            "{line}"
        );
    }

    #[test]
    fn with_traces_off_a_call_logs_without_a_trace_id() {
        let line = line_inside_a_call(None);
        assert_eq!(line["span"]["name"], "rpc");
        assert!(line["span"].get("trace_id").is_none(), "{line}");
    }

    #[test]
    fn the_sample_ratio_and_endpoint_are_checked() {
        use crate::config::Validate;
        for (endpoint, ratio, field) in [
            ("", 1.5, "telemetry.trace_sample_ratio"),
            ("", -0.1, "telemetry.trace_sample_ratio"),
            ("collector:4317", 1.0, "telemetry.otlp_endpoint"),
            ("ftp://collector:4317", 1.0, "telemetry.otlp_endpoint"),
        ] {
            let config = TelemetryConfig {
                otlp_endpoint: endpoint.into(),
                trace_sample_ratio: ratio,
                ..TelemetryConfig::default()
            };
            let err = config.validate().expect_err("refused");
            assert!(err.to_string().contains(field), "{err}");
        }
        let good = TelemetryConfig {
            otlp_endpoint: "http://otel-collector:4317".into(),
            trace_sample_ratio: 0.25,
            ..TelemetryConfig::default()
        };
        good.validate().expect("accepted");
    }
}
