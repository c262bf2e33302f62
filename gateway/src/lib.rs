//! usher-gateway: the only public entry point. It authenticates callers,
//! authorizes each call from the access rules in the contracts, and forwards
//! it to the service that owns it with a signed principal assertion.
//!
//! It serves health (aggregating the upstreams' readiness), reflection for the
//! public services, and metrics itself, and forwards every other call through
//! the stack built in [`serve`] (see [`proxy`] and [`limits`]). A caller
//! presents a session access token or an API key (`usk_…`), both resolved
//! from the snapshots identity keeps in Redis. Browsers reach the same
//! services, under the same rules, over gRPC-Web (with CORS for the
//! configured origins). The gateway also serves the invitation page and the
//! password pages (`/invite`, `/reset`, `/set-password`, see [`page`]), which
//! call the services through the same stack as any client.

pub mod config;
pub mod limits;
pub mod page;
pub mod proxy;

use std::time::Duration;

use http::Request;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    body::Body,
    service::RoutesBuilder,
    transport::{Channel, Endpoint},
};
use tonic_health::{
    ServingStatus,
    pb::{
        HealthCheckRequest, health_check_response::ServingStatus as ProbeStatus,
        health_client::HealthClient,
    },
};
use tower::ServiceBuilder;
use tower_http::{
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer},
};
use tracing::Level;
use usher_kit::{
    authz::Policy,
    cache::Cache,
    clock::SystemClock,
    health::{self, Probe},
    runtime,
    server::{MetricsLayer, ShedLayer},
    telemetry,
    tokens::TokenHasher,
};

use crate::proxy::{
    AssertLayer, AuthnLayer, AuthzLayer, ForwardLayer, RouteLayer, RouteTable, Upstreams,
};

pub use config::Config;

/// The gateway's name in logs and assertions.
pub const SERVICE: &str = "usher-gateway";

/// The public services the gateway fronts, with the upstream that owns each.
pub const PUBLIC_SERVICES: &[(&str, Upstream)] = &[
    ("usher.identity.v1.AccountService", Upstream::Identity),
    ("usher.identity.v1.AuthService", Upstream::Identity),
    ("usher.identity.v1.UserService", Upstream::Identity),
    ("usher.identity.v1.RoleService", Upstream::Identity),
    ("usher.identity.v1.TeamService", Upstream::Identity),
    ("usher.identity.v1.AuditService", Upstream::Identity),
    (
        "usher.invitation.v1.InvitationService",
        Upstream::Invitation,
    ),
    (
        "usher.notification.v1.NotificationService",
        Upstream::Notification,
    ),
];

/// A service behind the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// usher-identity.
    Identity,
    /// usher-invitation.
    Invitation,
    /// usher-notification.
    Notification,
}

/// Serves on `config.server.listen` until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = runtime::bind(config.server.listen).await?;
    serve(config, listener, shutdown).await
}

/// The gateway has no database: `migrate` has nothing to do.
pub async fn migrate(_config: Config) -> anyhow::Result<()> {
    tracing::info!("usher-gateway has no database; nothing to migrate");
    Ok(())
}

/// An upstream is ready when it reports `SERVING` for the service `name`.
fn upstream_probe(upstream: &'static str, url: &str, name: &'static str) -> anyhow::Result<Probe> {
    let channel = Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_millis(500))
        .connect_lazy();
    Ok(Probe::new(upstream, move || {
        let mut client = HealthClient::new(channel.clone());
        async move {
            let request = HealthCheckRequest {
                service: name.to_owned(),
            };
            matches!(
                client.check(request).await.map(|r| r.into_inner().status()),
                Ok(ProbeStatus::Serving)
            )
        }
    }))
}

/// Serves on `listener` until `shutdown`, with the Redis of `config`.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Before anything records.
    telemetry::install_metrics(config.server.metrics_listen)?;
    let cache = Cache::connect(&config.redis)?;
    serve_with(config, listener, shutdown, cache).await
}

/// Serves on `listener` until `shutdown`, resolving sessions and counting
/// rate limits in `cache` (the in-process one of `usher dev`, shared with
/// identity).
pub async fn serve_with(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    cache: Cache,
) -> anyhow::Result<()> {
    telemetry::install_metrics(config.server.metrics_listen)?;
    let clock = SystemClock::shared();
    let policy = Policy::from_contracts().map_err(|e| anyhow::anyhow!("policy: {e}"))?;
    let routes = RouteTable::new(&policy);
    let routes_len = routes.len();
    let sessions = cache.sessions(
        config.sessions.clone(),
        TokenHasher::from_config(&config.tokens)?,
        clock.clone(),
    );
    let signer = config.assertion.signer(SERVICE)?;
    let upstreams = &config.upstreams;
    let channels = Upstreams {
        identity: upstream_channel(&upstreams.identity)?,
        invitation: upstream_channel(&upstreams.invitation)?,
        notification: upstream_channel(&upstreams.notification)?,
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    let names: Vec<String> = PUBLIC_SERVICES
        .iter()
        .map(|(n, _)| (*n).to_owned())
        .collect();
    for name in &names {
        health
            .set_service_status(name.as_str(), ServingStatus::NotServing)
            .await;
    }
    health.set_service_status("", ServingStatus::Serving).await;
    let probes = vec![
        cache.probe(),
        upstream_probe(
            "identity",
            &upstreams.identity,
            "usher.identity.v1.AuthService",
        )?,
        upstream_probe(
            "invitation",
            &upstreams.invitation,
            "usher.invitation.v1.InvitationService",
        )?,
        upstream_probe(
            "notification",
            &upstreams.notification,
            "usher.notification.v1.NotificationService",
        )?,
    ];
    health::watch(
        health.clone(),
        names.clone(),
        probes,
        Duration::from_secs(1),
        shutdown.clone(),
    );

    // The gateway's own routes: health and reflection (public services only).
    let mut local = RoutesBuilder::default();
    local.add_service(health_service);
    if config.server.reflection {
        let mut v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(usher_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        let mut v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(usher_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for (name, _) in PUBLIC_SERVICES {
            v1 = v1.with_service_name(*name);
            v1alpha = v1alpha.with_service_name(*name);
        }
        local.add_service(v1.build_v1()?);
        local.add_service(v1alpha.build_v1alpha()?);
    }

    let server_config = &config.server;
    let stack = ServiceBuilder::new()
        // Give every call a request id (a client-sent one is kept) so the
        // gateway's and the services' logs of one call can be joined; it is
        // forwarded upstream and goes in the assertion.
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        // Echo the request id to the caller, refusals included.
        .layer(PropagateRequestIdLayer::x_request_id())
        // One span per call with method and request id; outcomes at debug.
        .layer(
            TraceLayer::new_for_grpc()
                .make_span_with(|request: &Request<Body>| usher_kit::telemetry::rpc_span(request))
                .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
        )
        // Count and time every call, the ones the gateway refuses included.
        .layer(MetricsLayer)
        // CORS for gRPC-Web from the configured origins (preflights answered
        // here); nothing when none is configured.
        .option_layer(cors(&config.grpc_web))
        // The invitation and password pages (`/invite`, `/reset`,
        // `/set-password`, HTML over HTTP/1.1 or 2). They call the services
        // through the layers below, as a client would.
        .layer(page::PageLayer::new(page::Pages::new()?))
        // gRPC-Web (HTTP/1.1 or 2) translated to gRPC; other HTTP/1.1
        // requests answer 400.
        .layer(tonic_web::GrpcWebLayer::new())
        // (Timeout: the server below applies the deadline — the client's
        // `grpc-timeout` capped by `server.request_timeout_ms`, or that
        // default when it sent none — until the upstream's response headers.
        // The forwarding layer passes what is left of that budget upstream
        // as the call's `grpc-timeout`.)
        // Shed load beyond the concurrency limit at once with UNAVAILABLE
        // rather than queueing without bound (P22).
        .layer(ShedLayer::new(server_config.concurrency_limit))
        // Route by gRPC service name; everything not public and ruled is
        // UNIMPLEMENTED here, before any credential is looked at (P13).
        .layer(RouteLayer::new(routes))
        // Bearer session token or API key -> principal (Redis); a bad
        // credential is UNAUTHENTICATED, no credential the anonymous principal.
        .layer(AuthnLayer::new(sessions))
        // The RPC's access rule from the contracts; refusals never leave
        // the gateway (P13).
        .layer(AuthzLayer::new(policy))
        // Rate limits in Redis, per IP on public RPCs and per account on invites
        // (after authz: the account is known, only forwardable calls count; P8).
        .layer(limits::RateLimitLayer::new(
            cache.keys(),
            &config.rate_limits,
            clock.clone(),
        ))
        // Drop client-sent `x-usher-*` metadata and the bearer token, attach
        // the signed principal assertion bound to this path (P16).
        .layer(AssertLayer::new(signer, clock))
        // Transparent HTTP/2 forwarding to the owning upstream; the gateway's
        // own paths fall through to the local routes.
        .layer(ForwardLayer::new(channels, server_config.request_timeout()))
        .into_inner();

    let incoming = usher_kit::server::incoming(listener);
    let server = tonic::transport::Server::builder()
        // Browsers open the invitation page over HTTP/1.1.
        .accept_http1(true)
        // The deadline of a call that carries none (and the cap of those that do).
        .timeout(server_config.request_timeout())
        .max_concurrent_streams(server_config.max_concurrent_streams)
        .http2_keepalive_interval(Some(Duration::from_secs(
            server_config.keepalive_interval_secs,
        )))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(stack)
        .add_routes(local.routes());

    tracing::info!(
        listen = %server_config.listen,
        routes = routes_len,
        "usher-gateway serving"
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = server.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    });
    tokio::pin!(serving);
    tokio::select! {
        result = &mut serving => return result.map_err(Into::into),
        () = shutdown.cancelled() => {}
    }
    tracing::info!("usher-gateway shutting down: not serving");
    for name in &names {
        health
            .set_service_status(name.as_str(), ServingStatus::NotServing)
            .await;
    }
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    // Keep answering while load balancers notice NOT_SERVING.
    let drain = Duration::from_millis(server_config.shutdown_drain_ms);
    if let Ok(result) = tokio::time::timeout(drain, &mut serving).await {
        return result.map_err(Into::into);
    }
    let _ = stop_tx.send(());
    let grace = Duration::from_millis(server_config.shutdown_grace_ms);
    match tokio::time::timeout(grace, serving).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => {
            tracing::warn!("grace period over, closing remaining calls");
            Ok(())
        }
    }
}

/// The CORS layer for gRPC-Web from `config`'s origins, if any.
fn cors(config: &config::GrpcWebConfig) -> Option<tower_http::cors::CorsLayer> {
    use http::{HeaderName, HeaderValue, Method};
    if config.allowed_origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = config
        .allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let allowed = [
        "content-type",
        "authorization",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
        "x-request-id",
    ];
    let exposed = [
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "x-request-id",
    ];
    Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::POST])
            .allow_headers(allowed.map(HeaderName::from_static))
            .expose_headers(exposed.map(HeaderName::from_static))
            .max_age(Duration::from_secs(3600)),
    )
}

/// A lazily connected HTTP/2 channel to an upstream.
fn upstream_channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy())
}
