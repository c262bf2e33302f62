//! The gRPC server every service runs: health (`grpc.health.v1`), reflection
//! (v1 and v1alpha, including the health descriptor, switchable off), limits,
//! the principal guard, `INVALID_ARGUMENT` for requests that do not decode,
//! and graceful shutdown (health flips to `NOT_SERVING` first, then the
//! listener closes, then in-flight calls get a grace period).

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use http::{Request, Response};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Status, body::Body, server::NamedService, service::RoutesBuilder};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::{Layer, Service, ServiceBuilder};
use tower_http::{
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer},
};
use tracing::Level;

use crate::{
    authz::{Policy, is_infrastructure_path},
    clock::SharedClock,
    config::ServerConfig,
    error::{ApiError, Violation},
    principal::{ASSERTION_HEADER, AssertionVerifier, Principal},
};

/// Verifies the principal assertion of every call and applies the policy
/// table, so a service refuses calls that did not come through the gateway
/// (or another service) even if its port is reachable (P16).
#[derive(Clone, Debug)]
pub struct CallGuard {
    policy: Policy,
    verifier: AssertionVerifier,
    clock: SharedClock,
}

impl CallGuard {
    /// A guard checking `policy` with assertions verified by `verifier`.
    pub fn new(policy: Policy, verifier: AssertionVerifier, clock: SharedClock) -> Self {
        Self {
            policy,
            verifier,
            clock,
        }
    }

    /// The principal of a call of `path` carrying `assertion`, if allowed.
    pub fn check(&self, path: &str, assertion: Option<&str>) -> Result<Principal, ApiError> {
        let unauthenticated = |why: &dyn std::fmt::Display| {
            tracing::debug!(%path, reason = %why, "call refused");
            ApiError::rejected(
                crate::error::Reason::Unauthenticated,
                "a valid credential is required",
            )
        };
        let token = assertion.ok_or_else(|| unauthenticated(&"missing assertion"))?;
        let assertion = self
            .verifier
            .verify(token, path, self.clock.now())
            .map_err(|e| unauthenticated(&e))?;
        self.policy.authorize(path, &assertion.principal)?;
        Ok(assertion.principal)
    }
}

/// The verified caller of a call, put there by the [`CallGuard`].
pub fn principal<T>(request: &tonic::Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| {
            Status::from(ApiError::rejected(
                crate::error::Reason::Unauthenticated,
                "a valid credential is required",
            ))
        })
}

/// The `x-request-id` of a call (set by the gateway, or by the client and
/// kept by it), for logs and the audit log; empty when absent. It follows
/// the one request-id rule ([`crate::idempotency::validate_request_id`]):
/// one that breaks it is `INVALID_ARGUMENT` on `x-request-id`, never cut.
pub fn request_id<T>(request: &tonic::Request<T>) -> Result<String, Status> {
    let Some(value) = request.metadata().get("x-request-id") else {
        return Ok(String::new());
    };
    let invalid = || {
        Status::from(ApiError::invalid(
            "x-request-id",
            "must be at most 128 printable ASCII characters",
        ))
    };
    let value = value.to_str().map_err(|_| invalid())?;
    crate::idempotency::validate_request_id("x-request-id", value).map_err(|_| invalid())?;
    Ok(value.to_owned())
}

/// A service's gRPC server under construction.
pub struct ServiceServer {
    name: &'static str,
    config: ServerConfig,
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    health: HealthReporter,
    guard: Option<CallGuard>,
}

impl std::fmt::Debug for ServiceServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceServer")
            .field("name", &self.name)
            .field("services", &self.names)
            .finish_non_exhaustive()
    }
}

impl ServiceServer {
    /// A server named `name` (e.g. `usher-identity`) with `config`'s limits.
    pub fn new(name: &'static str, config: &ServerConfig, guard: CallGuard) -> Self {
        Self::build(name, config, Some(guard))
    }

    /// A server without the principal guard: only for the gateway, which
    /// authenticates callers itself and serves no Usher RPC of its own.
    pub fn without_guard(name: &'static str, config: &ServerConfig) -> Self {
        Self::build(name, config, None)
    }

    fn build(name: &'static str, config: &ServerConfig, guard: Option<CallGuard>) -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        Self {
            name,
            config: config.clone(),
            routes,
            names: Vec::new(),
            health,
            guard,
        }
    }

    /// Advertises `name` in health and reflection without serving it here
    /// (the gateway fronts services that run elsewhere).
    pub fn advertise(&mut self, name: &'static str) -> &mut Self {
        self.names.push(name);
        self
    }

    /// The health reporter, for readiness probes.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Sets the service names `NOT_SERVING`, then watches `probes` every
    /// `interval` until `shutdown` (see [`crate::health::watch`]): from here
    /// on the watcher alone writes their status, so a start whose
    /// dependencies are ready before the listener serves stays `SERVING`.
    pub async fn watch_readiness(
        &self,
        probes: Vec<crate::health::Probe>,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        for service in &self.names {
            self.health
                .set_service_status(*service, ServingStatus::NotServing)
                .await;
        }
        crate::health::watch(
            self.health.clone(),
            self.service_names(),
            probes,
            interval,
            shutdown,
        )
    }

    /// The fully-qualified names of the services added so far.
    pub fn service_names(&self) -> Vec<String> {
        self.names.iter().map(|n| (*n).to_owned()).collect()
    }

    /// Adds a generated tonic service (apply `max_decoding_message_size` with
    /// [`ServerConfig::max_message_bytes`] first).
    pub fn add_service<S>(&mut self, service: S) -> &mut Self
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Serves on `listener` until `shutdown` is cancelled. Liveness (the
    /// empty name) is `SERVING`; the service names are the readiness
    /// watcher's ([`Self::watch_readiness`], called before this): `NOT_SERVING`
    /// until their dependencies are reachable.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let Self {
            name,
            config,
            mut routes,
            names,
            health,
            guard,
        } = self;
        // Not the service names: a status set here could land after the
        // watcher's first SERVING and hide it until the next change.
        health.set_service_status("", ServingStatus::Serving).await;

        if config.reflection {
            let mut v1 = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(usher_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health");
            let mut v1alpha = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(usher_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health");
            for service in &names {
                v1 = v1.with_service_name(*service);
                v1alpha = v1alpha.with_service_name(*service);
            }
            routes.add_service(v1.build_v1()?);
            routes.add_service(v1alpha.build_v1alpha()?);
        }

        let detach = DetachLayer::default();
        let calls = detach.calls();
        let stack = ServiceBuilder::new()
            // Give every call a request id (kept when the gateway sent one) so
            // logs of one call can be joined across services.
            .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
            // Echo the request id to the caller.
            .layer(PropagateRequestIdLayer::x_request_id())
            // One span per call with method and request id; outcomes at debug.
            .layer(
                TraceLayer::new_for_grpc()
                    .make_span_with(|request: &Request<Body>| crate::telemetry::rpc_span(request))
                    .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                    .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
            )
            // Count and time every call, refused ones included.
            .layer(MetricsLayer)
            // A call runs to its end once admitted, even when its caller
            // goes away (see `DetachLayer`).
            .layer(detach)
            // Shed load beyond the concurrency limit at once with UNAVAILABLE
            // instead of queueing without bound (P22).
            .layer(ShedLayer::new(config.concurrency_limit))
            // Verify the principal assertion and the RPC's access rule.
            .option_layer(guard.map(|guard| GuardLayer {
                guard: Arc::new(guard),
            }))
            // A request that does not decode is the caller's fault.
            .layer(MalformedRequestLayer)
            .into_inner();

        let incoming = incoming(listener);
        let server = tonic::transport::Server::builder()
            // The deadline of a call that carries none (and the cap of those that do).
            .timeout(config.request_timeout())
            .max_concurrent_streams(config.max_concurrent_streams)
            .http2_keepalive_interval(Some(Duration::from_secs(config.keepalive_interval_secs)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(stack)
            .add_routes(routes.routes());

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = server.serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
        tokio::pin!(serving);
        tokio::select! {
            result = &mut serving => return result.map_err(Into::into),
            () = shutdown.cancelled() => {}
        }
        tracing::info!(service = name, "shutting down: not serving");
        for service in &names {
            health
                .set_service_status(*service, ServingStatus::NotServing)
                .await;
        }
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let drain = Duration::from_millis(config.shutdown_drain_ms);
        // Keep answering while load balancers notice NOT_SERVING.
        let drained = tokio::time::timeout(drain, &mut serving).await;
        if let Ok(result) = drained {
            return result.map_err(Into::into);
        }
        let _ = stop_tx.send(());
        let grace = Instant::now() + Duration::from_millis(config.shutdown_grace_ms);
        let served = match tokio::time::timeout_at(grace.into(), serving).await {
            Ok(result) => result.map_err(Into::into),
            Err(_) => {
                tracing::warn!(service = name, "grace period over, closing remaining calls");
                Ok(())
            }
        };
        // Calls whose callers went away still run (`DetachLayer`): they get
        // what is left of the grace period too.
        calls.close();
        if tokio::time::timeout_at(grace.into(), calls.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                service = name,
                calls = calls.len(),
                "grace period over, abandoned calls cut short"
            );
        }
        served
    }
}

/// The connections `listener` accepts, with `TCP_NODELAY` set: a gRPC
/// answer written in more than one segment must not wait for the peer's
/// delayed ACK (40 ms on Linux), which a plain listener stream would let
/// happen on every database-bound call.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A token cancelled by SIGTERM or Ctrl-C.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        termination_signal().await;
        child.cancel();
    });
    token
}

/// Layer of [`GuardService`].
#[derive(Clone, Debug)]
struct GuardLayer {
    guard: Arc<CallGuard>,
}

impl<S> Layer<S> for GuardLayer {
    type Service = GuardService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GuardService {
            inner,
            guard: self.guard.clone(),
        }
    }
}

/// Refuses calls without a valid assertion or access; passes the principal on.
#[derive(Clone, Debug)]
struct GuardService<S> {
    inner: S,
    guard: Arc<CallGuard>,
}

impl<S, B> Service<Request<B>> for GuardService<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        if !is_infrastructure_path(&path) {
            let assertion = request
                .headers()
                .get(ASSERTION_HEADER)
                .and_then(|v| v.to_str().ok());
            match self.guard.check(&path, assertion) {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                }
                Err(err) => {
                    let status = Status::from(err);
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(request))
    }
}

/// Layer of [`MalformedRequestService`].
#[derive(Clone, Copy, Debug)]
pub struct MalformedRequestLayer;

impl<S> Layer<S> for MalformedRequestLayer {
    type Service = MalformedRequestService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MalformedRequestService { inner }
    }
}

/// Answers `INVALID_ARGUMENT` (reason `INVALID_ARGUMENT`, the field at fault
/// when the decoder names one) for a request tonic could not decode, instead
/// of the `INTERNAL` tonic and its prost codec answer: bytes that are not
/// protobuf, a string field that is not UTF-8, a message or gRPC frame cut
/// short, a missing message, a bad compression flag. The request was the
/// caller's fault; it is logged at debug level, never as an error.
///
/// Unary requests are decoded before the handler runs, so such a failure is
/// always a trailers-only answer; it is recognised by tonic's own messages
/// (pinned by a test against the real decoder). An `INTERNAL` answered by a
/// handler is opaque (`internal error (correlation id …)`) and never matches.
#[derive(Clone, Debug)]
pub struct MalformedRequestService<S> {
    inner: S,
}

/// Prefix of every prost decode error (`prost::DecodeError`'s `Display`).
const PROST_DECODE_PREFIX: &str = "failed to decode Protobuf message: ";

/// The input error of a status tonic answers for a request it cannot decode,
/// or `None` for any other status.
pub fn malformed_request(status: &Status) -> Option<ApiError> {
    if status.code() != tonic::Code::Internal {
        return None;
    }
    let message = status.message();
    if let Some(detail) = message.strip_prefix(PROST_DECODE_PREFIX) {
        // `Inner.field: Outer.inner: description`: the innermost field
        // first, each `Message.field` followed by `: `.
        let mut fields = Vec::new();
        let mut rest = detail;
        while let Some((head, tail)) = rest.split_once(": ") {
            let Some((message_name, field)) = head.split_once('.') else {
                break;
            };
            let plain =
                |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !plain(message_name) || !plain(field) {
                break;
            }
            fields.push(field);
            rest = tail;
        }
        fields.reverse();
        return Some(ApiError::InvalidArgument(vec![Violation {
            field: fields.join("."),
            description: format!("the request does not decode: {rest}"),
        }]));
    }
    let framing = message == "Unexpected EOF decoding stream."
        || message == "Missing request message."
        || message.starts_with("protocol error: received message with")
        || (message.starts_with("Error decompressing")
            && message.ends_with("while sending request"));
    framing.then(|| {
        ApiError::InvalidArgument(vec![Violation {
            field: String::new(),
            description: format!("the request is not a well-formed gRPC message: {message}"),
        }])
    })
}

impl<S, B> Service<Request<B>> for MalformedRequestService<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(request).await?;
            let refused = Status::from_header_map(response.headers())
                .as_ref()
                .and_then(malformed_request);
            Ok(match refused {
                Some(err) => {
                    tracing::debug!(%path, error = %err, "request does not decode");
                    Status::from(err).into_http()
                }
                None => response,
            })
        })
    }
}

/// Layer of [`Detached`].
#[derive(Clone, Debug, Default)]
pub struct DetachLayer {
    calls: TaskTracker,
}

impl DetachLayer {
    /// The calls running, so a stop can wait for those nobody awaits.
    pub fn calls(&self) -> TaskTracker {
        self.calls.clone()
    }
}

impl<S> Layer<S> for DetachLayer {
    type Service = Detached<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Detached {
            inner,
            calls: self.calls.clone(),
        }
    }
}

/// Runs each call in a task of its own, so that a caller that goes away (a
/// client's deadline, a dropped connection, the gateway's call cancelled)
/// does not stop a call halfway: a create whose users identity reserved
/// still commits or rolls back, instead of leaving the seats taken with no
/// invitation. What lies inside (the concurrency limit's permit, the guard,
/// the handler) runs in the task; the call's span goes with it. A handler
/// that panics is answered `INTERNAL` (opaque, with a correlation id).
#[derive(Clone, Debug)]
pub struct Detached<S> {
    inner: S,
    calls: TaskTracker,
}

impl<S> Service<Request<Body>> for Detached<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        use tracing::Instrument;
        let task = self.calls.spawn(self.inner.call(request).in_current_span());
        Box::pin(async move {
            match task.await {
                Ok(answer) => answer,
                Err(failure) => {
                    let status = Status::from(ApiError::Internal(anyhow::anyhow!(
                        "the call's task failed: {failure}"
                    )));
                    Ok(status.into_http())
                }
            }
        })
    }
}

/// Layer of [`ShedService`].
#[derive(Clone, Debug)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
}

impl ShedLayer {
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = ShedService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ShedService {
            inner,
            permits: self.permits.clone(),
        }
    }
}

/// Answers `UNAVAILABLE` at once when `limit` calls are already in flight.
#[derive(Clone, Debug)]
pub struct ShedService<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, B> Service<Request<B>> for ShedService<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            metrics::counter!("usher_grpc_shed_total").increment(1);
            return Box::pin(async {
                Ok(Status::unavailable("server overloaded, retry shortly").into_http())
            });
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(request).await;
            drop(permit);
            response
        })
    }
}

/// Layer of [`MetricsService`].
#[derive(Clone, Copy, Debug)]
pub struct MetricsLayer;

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MetricsService { inner }
    }
}

/// Counts calls by method and status and records their latency. Unary
/// errors travel as trailers-only responses, so the status is read from the
/// response headers; a response without one is counted as `0` (OK).
#[derive(Clone, Debug)]
pub struct MetricsService<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for MetricsService<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<RB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let started = Instant::now();
        Box::pin(async move {
            let response = inner.call(request).await;
            let code = match &response {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_owned(),
                Err(_) => "error".to_owned(),
            };
            metrics::counter!("usher_grpc_requests_total", "method" => method.clone(), "code" => code)
                .increment(1);
            metrics::histogram!("usher_grpc_request_duration_seconds", "method" => method)
                .record(started.elapsed().as_secs_f64());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the real prost decoder says for `bytes` as a `T`.
    fn decode_failure<T: prost::Message + Default + std::fmt::Debug>(bytes: &[u8]) -> Status {
        let error = T::decode(bytes).expect_err("does not decode");
        // As tonic-prost maps it.
        Status::internal(error.to_string())
    }

    fn violations(err: Option<ApiError>) -> Vec<Violation> {
        match err {
            Some(ApiError::InvalidArgument(violations)) => violations,
            other => panic!("not an input error: {other:?}"),
        }
    }

    #[test]
    fn requests_that_do_not_decode_are_input_errors_naming_the_field() {
        use usher_proto::identity::v1::{SignInRequest, UpdateUserRequest};
        // `account_slug` (field 1) holding bytes that are not UTF-8.
        let not_utf8 = decode_failure::<SignInRequest>(&[0x0a, 0x02, 0xc3, 0x28]);
        let found = violations(malformed_request(&not_utf8));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].field, "account_slug", "{not_utf8:?}");
        // A length that runs past the end of the message.
        let truncated = decode_failure::<SignInRequest>(&[0x0a, 0x05, b'a', b'b']);
        assert_eq!(
            violations(malformed_request(&truncated))[0].field,
            "account_slug",
            "{truncated:?}"
        );
        // A nested field: `update_mask.paths` (8, then 1) of UpdateUserRequest.
        let nested = decode_failure::<UpdateUserRequest>(&[0x42, 0x04, 0x0a, 0x02, 0xff, 0xfe]);
        let found = violations(malformed_request(&nested));
        assert_eq!(found[0].field, "update_mask.paths", "{nested:?}");
        // A tag cut short: no field to name.
        let cut = decode_failure::<SignInRequest>(&[0x80]);
        assert_eq!(violations(malformed_request(&cut))[0].field, "");
        // tonic's framing failures.
        for message in [
            "Unexpected EOF decoding stream.",
            "Missing request message.",
            "protocol error: received message with invalid compression flag: 7 (valid flags are 0 and 1), while sending request",
        ] {
            violations(malformed_request(&Status::internal(message)));
        }
    }

    #[test]
    fn other_statuses_are_left_alone() {
        let internal = Status::from(ApiError::Internal(anyhow::anyhow!(
            "failed to decode Protobuf message: hidden"
        )));
        assert!(malformed_request(&internal).is_none(), "{internal:?}");
        assert!(malformed_request(&Status::internal("boom")).is_none());
        assert!(
            malformed_request(&Status::unavailable("failed to decode Protobuf message: x"))
                .is_none()
        );
    }

    #[tokio::test]
    async fn the_layer_rewrites_a_decode_failure_and_nothing_else() {
        use tower::ServiceExt;
        let answer = |status: Status| {
            tower::service_fn(move |_: Request<Body>| {
                let status = status.clone();
                async move { Ok::<_, Infallible>(status.into_http()) }
            })
        };
        let call = |status: Status| async move {
            let response = MalformedRequestLayer
                .layer(answer(status))
                .oneshot(Request::new(Body::empty()))
                .await
                .expect("infallible");
            Status::from_header_map(response.headers()).expect("a status")
        };
        let rewritten = call(Status::internal(
            "failed to decode Protobuf message: SignInRequest.account_slug: invalid string value: data is not UTF-8 encoded",
        ))
        .await;
        assert_eq!(rewritten.code(), tonic::Code::InvalidArgument);
        use tonic_types::StatusExt;
        let details = rewritten.get_error_details();
        assert_eq!(
            details.error_info().map(|i| i.reason.as_str()),
            Some("INVALID_ARGUMENT")
        );
        assert_eq!(
            details
                .bad_request()
                .map(|b| b.field_violations[0].field.as_str()),
            Some("account_slug")
        );
        let kept = call(Status::internal("boom")).await;
        assert_eq!(kept.code(), tonic::Code::Internal);
    }

    #[test]
    fn request_ids_follow_the_one_rule_and_are_never_cut() {
        let with = |id: &str| {
            let mut request = tonic::Request::new(());
            request
                .metadata_mut()
                .insert("x-request-id", id.parse().expect("header value"));
            request
        };
        assert_eq!(request_id(&tonic::Request::new(())).expect("absent"), "");
        let long = "r".repeat(128);
        assert_eq!(request_id(&with(&long)).expect("128 characters"), long);
        let status = request_id(&with(&"r".repeat(129))).expect_err("too long");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("x-request-id"), "{status:?}");
        assert!(
            request_id(&with("tab\there")).is_err(),
            "a control character"
        );
    }

    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_delayed_acks() {
        use tokio_stream::StreamExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let stream = accepted
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(stream.nodelay().expect("nodelay"), "TCP_NODELAY is set");
    }

    #[tokio::test]
    async fn dependencies_ready_before_the_listener_serves_stay_serving() {
        let mut server = ServiceServer::without_guard("usher-test", &ServerConfig::default());
        server.advertise("usher.test.v1.Ready");
        let ready = Arc::new(tokio::sync::Notify::new());
        let answered = ready.clone();
        let shutdown = CancellationToken::new();
        // The probe passes at once; the first SERVING is reported before
        // the server starts.
        let probe = crate::health::Probe::new("database", move || {
            let answered = answered.clone();
            async move {
                answered.notify_one();
                true
            }
        });
        server
            .watch_readiness(vec![probe], Duration::from_secs(60), shutdown.clone())
            .await;
        ready.notified().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = format!("http://{}", listener.local_addr().expect("addr"));
        let serving = tokio::spawn(server.serve(listener, shutdown.clone()));
        // Without another probe round for a minute, only the watcher's first
        // answer can make it SERVING: starting the server must not undo it.
        let started = Instant::now();
        loop {
            match crate::health::check(&address, "usher.test.v1.Ready", Duration::from_secs(1))
                .await
            {
                Ok(()) => break,
                Err(crate::health::CheckError::Unreachable { .. })
                    if started.elapsed() < Duration::from_secs(5) =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => panic!("still ready once the server serves: {err}"),
            }
        }
        shutdown.cancel();
        serving.await.expect("joined").expect("served");
    }

    #[tokio::test]
    async fn a_detached_call_finishes_when_its_caller_goes_away_and_a_panic_answers_internal() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let finished = Arc::new(AtomicBool::new(false));
        let flag = finished.clone();
        let mut slow = DetachLayer::default().layer(tower::service_fn(move |_: Request<Body>| {
            let flag = flag.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                flag.store(true, Ordering::SeqCst);
                Ok::<_, Infallible>(Response::new(Body::empty()))
            }
        }));
        let call = slow.call(Request::new(Body::empty()));
        // The caller gives up at once.
        drop(tokio::time::timeout(Duration::from_millis(5), call).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(finished.load(Ordering::SeqCst), "the call ran to its end");

        let mut failing =
            DetachLayer::default().layer(tower::service_fn(|_: Request<Body>| async {
                if true {
                    panic!("a handler bug");
                }
                Ok::<_, Infallible>(Response::new(Body::empty()))
            }));
        let answer = failing
            .call(Request::new(Body::empty()))
            .await
            .expect("answered");
        let status = Status::from_header_map(answer.headers()).expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(status.message().contains("correlation id"), "{status:?}");
        assert!(!status.message().contains("a handler bug"), "{status:?}");
    }
}
