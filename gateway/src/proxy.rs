//! The layers between a public call and its upstream: routing by gRPC service
//! name, authentication, authorization, the principal assertion, and the
//! transparent HTTP/2 forwarding itself.
//!
//! Every layer lets the gateway's own paths (health, reflection) through
//! untouched to the local routes; every other path is either answered by the
//! gateway (refused) or forwarded, never both. Refusals are trailers-only gRPC
//! responses built by the gateway, so a refused call never reaches a service
//! (P13).
//!
//! Unroutable paths — a service that is not public (every `*.internal.*`
//! service), an unknown service, a method without a `usher.auth.v1.rule`, or
//! one whose rule is `INTERNAL` — all answer `UNIMPLEMENTED`, like a gRPC
//! server asked for a method it does not have: the answer is the same with or
//! without a credential and does not reveal which internal services exist.

use std::{
    collections::HashMap,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response, header::AUTHORIZATION};
use tonic::{Status, body::Body, transport::Channel};
use tower::{Layer, Service, ServiceExt};
use usher_kit::{
    authz::{Policy, is_infrastructure_path},
    clock::SharedClock,
    error::{ApiError, Reason},
    principal::{ASSERTION_HEADER, AssertionSigner, Principal, RESERVED_HEADER_PREFIX},
    sessions::{SessionStore, SharedSessionStore},
    tokens::API_KEY_PREFIX,
};
use usher_proto::policy::Access;

use crate::{PUBLIC_SERVICES, Upstream};

/// The header carrying the request id, set by the outer layers.
const REQUEST_ID_HEADER: &str = "x-request-id";
/// The gRPC deadline header.
const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";
/// Largest value `grpc-timeout` can carry (8 digits).
const MAX_TIMEOUT_VALUE: u128 = 99_999_999;

/// When the gateway received a routed call, to pass the remaining budget on.
#[derive(Clone, Copy, Debug)]
struct Received(Instant);

/// The duration of a `grpc-timeout` value (`1-8 digits` + `H M S m u n`).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit = value.get(value.len().checked_sub(1)?..)?;
    let digits = value.get(..value.len() - 1)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `budget` as a `grpc-timeout` value, in milliseconds (rounded up, so a
/// sub-millisecond rest is not sent as an already expired 0).
fn format_grpc_timeout(budget: Duration) -> String {
    let mut millis = budget.as_millis();
    if budget > Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX)) {
        millis += 1;
    }
    format!("{}m", millis.min(MAX_TIMEOUT_VALUE))
}

/// What is left of a call's deadline after `elapsed`: the client's
/// `grpc-timeout` capped by `default`, or `default` when it sent none (or an
/// unreadable one).
fn remaining_budget(
    client: Option<&HeaderValue>,
    default: Duration,
    elapsed: Duration,
) -> Duration {
    let deadline = client
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(default, |d| d.min(default));
    deadline.saturating_sub(elapsed)
}

/// A trailers-only gRPC answer for `err`.
fn refuse(err: ApiError) -> Response<Body> {
    Status::from(err).into_http()
}

/// Takes the inner service out of `slot`, leaving a clone (the usual tower
/// dance: the clone that was polled ready is the one that gets the call).
fn take<S: Clone>(slot: &mut S) -> S {
    let clone = slot.clone();
    std::mem::replace(slot, clone)
}

/// Which upstream owns each routable gRPC path.
#[derive(Clone, Debug)]
pub struct RouteTable {
    routes: Arc<HashMap<String, Upstream>>,
}

impl RouteTable {
    /// Every method of a public service whose rule lets some outside caller in
    /// (`PUBLIC`, `MEMBER`, `PERMISSION`, `PLATFORM`).
    pub fn new(policy: &Policy) -> Self {
        let routes = policy
            .rules()
            .filter(|rule| {
                matches!(
                    rule.access,
                    Access::Public | Access::Member | Access::Permission | Access::Platform
                )
            })
            .filter_map(|rule| {
                let service = service_name(&rule.path)?;
                PUBLIC_SERVICES
                    .iter()
                    .find(|(name, _)| *name == service)
                    .map(|(_, upstream)| (rule.path.clone(), *upstream))
            })
            .collect();
        Self {
            routes: Arc::new(routes),
        }
    }

    /// The upstream of `path`, if it is routable.
    pub fn upstream(&self, path: &str) -> Option<Upstream> {
        self.routes.get(path).copied()
    }

    /// How many paths are routable.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether no path is routable.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// `<package>.<Service>` of a path `/<package>.<Service>/<Method>`.
fn service_name(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/')).then_some(service)
}

// ---------------------------------------------------------------- routing

/// Layer of [`RouteService`].
#[derive(Clone, Debug)]
pub struct RouteLayer {
    table: RouteTable,
}

impl RouteLayer {
    /// Routes by `table`.
    pub fn new(table: RouteTable) -> Self {
        Self { table }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = RouteService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RouteService {
            inner,
            table: self.table.clone(),
        }
    }
}

/// Tags a routable call with its [`Upstream`]; answers `UNIMPLEMENTED` for
/// any other path that is not the gateway's own.
#[derive(Clone, Debug)]
pub struct RouteService<S> {
    inner: S,
    table: RouteTable,
}

impl<S> Service<Request<Body>> for RouteService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if !is_infrastructure_path(path) {
            match self.table.upstream(path) {
                Some(upstream) => {
                    request.extensions_mut().insert(upstream);
                    request.extensions_mut().insert(Received(Instant::now()));
                }
                None => {
                    tracing::debug!(%path, "not routable");
                    let response = Status::unimplemented("unknown method").into_http();
                    return Box::pin(async move { Ok(response) });
                }
            }
        }
        Box::pin(take(&mut self.inner).call(request))
    }
}

// --------------------------------------------------------- authentication

/// Layer of [`AuthnService`].
#[derive(Clone)]
pub struct AuthnLayer {
    sessions: SharedSessionStore,
}

impl std::fmt::Debug for AuthnLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthnLayer").finish_non_exhaustive()
    }
}

impl AuthnLayer {
    /// Resolves session tokens and API keys in `sessions`.
    pub fn new(sessions: SharedSessionStore) -> Self {
        Self { sessions }
    }
}

impl<S> Layer<S> for AuthnLayer {
    type Service = AuthnService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthnService {
            inner,
            sessions: self.sessions.clone(),
        }
    }
}

/// Resolves the caller's credential to a [`Principal`] put in the request's
/// extensions: no `authorization` header is the anonymous principal; a
/// `Bearer usk_…` is an API key, resolved from the snapshot identity keeps in
/// Redis (account keys are API_KEY principals with the key's permissions,
/// platform keys PLATFORM principals; a revoked key has no snapshot and fails
/// on its next call); any other bearer is a session access token; a
/// credential that is present but not valid is refused with
/// `UNAUTHENTICATED`, whatever the RPC (even a public one), so a client learns
/// at once that its token is dead. A store failure fails closed (`UNAVAILABLE`).
/// A session whose user (or the session itself) must change its password
/// gives a principal flagged `password_change_required`
/// ([`PrincipalSnapshot::must_change_password`](usher_kit::sessions::PrincipalSnapshot::must_change_password)):
/// the authorization layer then refuses it every RPC not allowed before the
/// change, and the flag travels on in the assertion so services refuse it too.
#[derive(Clone)]
pub struct AuthnService<S> {
    inner: S,
    sessions: SharedSessionStore,
}

impl<S> std::fmt::Debug for AuthnService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthnService").finish_non_exhaustive()
    }
}

/// The one answer to every refused credential (P21: no hint which part failed).
fn unauthenticated(why: &str) -> ApiError {
    tracing::debug!(reason = why, "credential refused");
    ApiError::rejected(Reason::Unauthenticated, "a valid credential is required")
}

/// The bearer token of an `authorization` value (scheme case-insensitive).
fn bearer(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The principal of the call's credential.
async fn authenticate(
    sessions: &dyn SessionStore,
    header: Option<&HeaderValue>,
) -> Result<Principal, ApiError> {
    let Some(header) = header else {
        return Ok(Principal::anonymous());
    };
    let token = bearer(header).ok_or_else(|| unauthenticated("not a bearer credential"))?;
    if token.starts_with(API_KEY_PREFIX) {
        // API keys resolve from the snapshot identity writes on creation and
        // deletes before answering a revocation (kit `sessions`): none means
        // no such key, so a revoked key fails on its next call.
        return sessions
            .get_api_key(token)
            .await?
            .ok_or_else(|| unauthenticated("unknown, revoked or expired api key"));
    }
    let session = sessions
        .resolve_access(token)
        .await?
        .ok_or_else(|| unauthenticated("unknown or expired access token"))?;
    let snapshot = sessions
        .get_principal(session.user_id)
        .await?
        .ok_or_else(|| unauthenticated("no principal snapshot"))?;
    // The principal carries `must_change_password`: the policy refuses it
    // every RPC not allowed before the change.
    snapshot
        .principal_for(&session)
        .ok_or_else(|| unauthenticated("snapshot refuses the session"))
}

impl<S> Service<Request<Body>> for AuthnService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let mut inner = take(&mut self.inner);
        if is_infrastructure_path(request.uri().path()) {
            return Box::pin(inner.call(request));
        }
        let sessions = self.sessions.clone();
        Box::pin(async move {
            let header = request.headers().get(AUTHORIZATION).cloned();
            match authenticate(sessions.as_ref(), header.as_ref()).await {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    inner.call(request).await
                }
                Err(err) => Ok(refuse(err)),
            }
        })
    }
}

// ---------------------------------------------------------- authorization

/// Layer of [`AuthzService`].
#[derive(Clone, Debug)]
pub struct AuthzLayer {
    policy: Policy,
}

impl AuthzLayer {
    /// Applies `policy`.
    pub fn new(policy: Policy) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = AuthzService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthzService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// Applies the RPC's access rule to the authenticated principal; a call with
/// no principal (a layer missing) is refused, never let through.
#[derive(Clone, Debug)]
pub struct AuthzService<S> {
    inner: S,
    policy: Policy,
}

impl<S> Service<Request<Body>> for AuthzService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if !is_infrastructure_path(path) {
            let decision = match request.extensions().get::<Principal>() {
                Some(principal) => self.policy.authorize(path, principal),
                None => Err(unauthenticated("no principal")),
            };
            if let Err(err) = decision {
                tracing::debug!(%path, reason = %err.reason(), "call refused");
                let response = refuse(err);
                return Box::pin(async move { Ok(response) });
            }
        }
        Box::pin(take(&mut self.inner).call(request))
    }
}

// -------------------------------------------------------------- assertion

/// Layer of [`AssertService`].
#[derive(Clone, Debug)]
pub struct AssertLayer {
    signer: AssertionSigner,
    clock: SharedClock,
}

impl AssertLayer {
    /// Signs with `signer` at `clock`'s time.
    pub fn new(signer: AssertionSigner, clock: SharedClock) -> Self {
        Self { signer, clock }
    }
}

impl<S> Layer<S> for AssertLayer {
    type Service = AssertService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AssertService {
            inner,
            signer: self.signer.clone(),
            clock: self.clock.clone(),
        }
    }
}

/// Strips every client-sent `x-usher-*` header and the client's credential,
/// then attaches the principal assertion for this path (P16). The request id
/// header travels on as it is and goes in the assertion too.
#[derive(Clone, Debug)]
pub struct AssertService<S> {
    inner: S,
    signer: AssertionSigner,
    clock: SharedClock,
}

/// Removes the headers a client must not pass to a service: Usher's reserved
/// ones (only the gateway and services set them) and the bearer credential
/// (services need the principal, not the secret).
pub fn strip_client_headers(headers: &mut http::HeaderMap) {
    let reserved: Vec<_> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(RESERVED_HEADER_PREFIX))
        .cloned()
        .collect();
    for name in reserved {
        headers.remove(name);
    }
    headers.remove(AUTHORIZATION);
}

impl<S> Service<Request<Body>> for AssertService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let path = request.uri().path().to_owned();
        if !is_infrastructure_path(&path) {
            strip_client_headers(request.headers_mut());
            let Some(principal) = request.extensions().get::<Principal>() else {
                let response = refuse(unauthenticated("no principal"));
                return Box::pin(async move { Ok(response) });
            };
            let request_id = request
                .headers()
                .get(REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok());
            let token = self
                .signer
                .sign(principal, &path, request_id, self.clock.now());
            match HeaderValue::from_str(&token) {
                Ok(value) => {
                    request.headers_mut().insert(ASSERTION_HEADER, value);
                }
                Err(err) => {
                    let response = refuse(ApiError::Internal(anyhow::anyhow!(
                        "assertion is not a header value: {err}"
                    )));
                    return Box::pin(async move { Ok(response) });
                }
            }
        }
        Box::pin(take(&mut self.inner).call(request))
    }
}

// ------------------------------------------------------------- forwarding

/// One lazily connected HTTP/2 channel per upstream.
#[derive(Clone, Debug)]
pub struct Upstreams {
    /// usher-identity.
    pub identity: Channel,
    /// usher-invitation.
    pub invitation: Channel,
    /// usher-notification.
    pub notification: Channel,
}

impl Upstreams {
    fn channel(&self, upstream: Upstream) -> &Channel {
        match upstream {
            Upstream::Identity => &self.identity,
            Upstream::Invitation => &self.invitation,
            Upstream::Notification => &self.notification,
        }
    }
}

/// Layer of [`ForwardService`].
#[derive(Clone, Debug)]
pub struct ForwardLayer {
    upstreams: Upstreams,
    default_timeout: Duration,
}

impl ForwardLayer {
    /// Forwards to `upstreams`; `default_timeout` is the deadline of a call
    /// that carries none and the cap of those that do.
    pub fn new(upstreams: Upstreams, default_timeout: Duration) -> Self {
        Self {
            upstreams,
            default_timeout,
        }
    }
}

impl<S> Layer<S> for ForwardLayer {
    type Service = ForwardService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ForwardService {
            inner,
            upstreams: self.upstreams.clone(),
            default_timeout: self.default_timeout,
        }
    }
}

/// Sends a routed call to its upstream's channel as it is: headers, the
/// streaming body and the response with its trailers pass through without
/// being decoded. Calls without an [`Upstream`] (the gateway's own paths) go
/// to the local routes. An upstream that cannot be reached is `UNAVAILABLE`.
/// The upstream gets the remaining budget of the call as its `grpc-timeout`
/// (P22), so it never works on past the deadline the client sees.
#[derive(Clone, Debug)]
pub struct ForwardService<S> {
    inner: S,
    upstreams: Upstreams,
    default_timeout: Duration,
}

impl<S> Service<Request<Body>> for ForwardService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let upstream = request.extensions().get::<Upstream>().copied();
        let Some(upstream) = upstream else {
            if is_infrastructure_path(request.uri().path()) {
                return Box::pin(take(&mut self.inner).call(request));
            }
            // Unreachable through the stack (routing tags every other path);
            // refuse rather than serve locally.
            let response = Status::unimplemented("unknown method").into_http();
            return Box::pin(async move { Ok(response) });
        };
        let elapsed = request
            .extensions()
            .get::<Received>()
            .map_or(Duration::ZERO, |r| r.0.elapsed());
        let budget = remaining_budget(
            request.headers().get(GRPC_TIMEOUT_HEADER),
            self.default_timeout,
            elapsed,
        );
        if budget.is_zero() {
            let response = Status::deadline_exceeded("deadline exceeded").into_http();
            return Box::pin(async move { Ok(response) });
        }
        if let Ok(value) = HeaderValue::from_str(&format_grpc_timeout(budget)) {
            request.headers_mut().insert(GRPC_TIMEOUT_HEADER, value);
        }
        // The service's span is a child of this call's.
        usher_kit::telemetry::inject_into(request.headers_mut());
        let channel = self.upstreams.channel(upstream).clone();
        Box::pin(async move {
            match channel.oneshot(request).await {
                Ok(response) => Ok(response),
                Err(err) => {
                    tracing::warn!(?upstream, error = %err, "upstream call failed");
                    Ok(Status::unavailable("service unavailable, retry shortly").into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_and_unknown_paths_are_not_routable() {
        let table = RouteTable::new(&Policy::from_contracts().expect("contracts"));
        assert!(!table.is_empty());
        assert_eq!(
            table.upstream("/usher.identity.v1.AuthService/SignIn"),
            Some(Upstream::Identity)
        );
        assert_eq!(
            table.upstream("/usher.invitation.v1.InvitationService/CreateInvitations"),
            Some(Upstream::Invitation)
        );
        for path in [
            "/usher.identity.internal.v1.DirectoryService/GetInvitationContext",
            "/usher.identity.v1.AuthService/NoSuchMethod",
            "/no.such.Service/Method",
            "/usher.identity.v1.AuthService/SignIn/extra",
            "",
            "/",
        ] {
            assert_eq!(table.upstream(path), None, "{path}");
        }
    }

    #[test]
    fn every_routable_path_has_an_outside_rule_and_a_public_service() {
        let policy = Policy::from_contracts().expect("contracts");
        let table = RouteTable::new(&policy);
        for rule in policy.rules() {
            let routable = table.upstream(&rule.path).is_some();
            let public_service = service_name(&rule.path)
                .is_some_and(|s| PUBLIC_SERVICES.iter().any(|(name, _)| *name == s));
            let outside = !matches!(rule.access, Access::Internal | Access::Unspecified);
            assert_eq!(routable, public_service && outside, "{}", rule.path);
            assert!(
                !(rule.path.contains(".internal.") && routable),
                "{}",
                rule.path
            );
        }
    }

    #[test]
    fn client_identity_headers_are_stripped() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-usher-assertion", HeaderValue::from_static("forged"));
        headers.insert("x-usher-account-id", HeaderValue::from_static("forged"));
        headers.insert("authorization", HeaderValue::from_static("Bearer abc"));
        headers.insert("x-request-id", HeaderValue::from_static("rid"));
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        strip_client_headers(&mut headers);
        let mut left: Vec<_> = headers.keys().map(|k| k.as_str().to_owned()).collect();
        left.sort();
        assert_eq!(left, ["content-type", "x-request-id"]);
    }

    #[test]
    fn the_remaining_budget_goes_upstream() {
        let default = Duration::from_secs(10);
        let header = |v: &'static str| HeaderValue::from_static(v);
        let ms = Duration::from_millis;
        assert_eq!(remaining_budget(None, default, ms(200)), ms(9_800));
        assert_eq!(
            remaining_budget(Some(&header("2S")), default, ms(500)),
            ms(1_500)
        );
        assert_eq!(
            remaining_budget(Some(&header("1H")), default, ms(0)),
            default
        );
        assert_eq!(
            remaining_budget(Some(&header("300m")), default, ms(400)),
            ms(0)
        );
        assert_eq!(
            remaining_budget(Some(&header("junk")), default, ms(0)),
            default
        );
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("-1S"), None);
        assert_eq!(format_grpc_timeout(ms(1_500)), "1500m");
        assert_eq!(format_grpc_timeout(Duration::from_micros(1)), "1m");
        assert_eq!(
            format_grpc_timeout(Duration::from_secs(10_000_000)),
            "99999999m"
        );
    }

    /// The authentication and authorization layers over a service that
    /// answers OK, with a session of a user whose snapshot says whether they
    /// must change their password.
    async fn authorized_stack(
        must_change: bool,
    ) -> (
        impl Service<Request<Body>, Response = Response<Body>, Error = std::convert::Infallible> + Clone,
        String,
    ) {
        use usher_kit::{
            clock::ManualClock,
            sessions::{
                MemorySessionStore, PrincipalSnapshot, SessionConfig, SessionMeta, UserStatus,
            },
            tokens::TokenHasher,
        };
        let clock =
            ManualClock::new(chrono::DateTime::from_timestamp(1_800_000_000, 0).expect("valid"));
        let store: SharedSessionStore = Arc::new(MemorySessionStore::new(
            SessionConfig::default(),
            TokenHasher::new(&[7; 32]).expect("hasher"),
            clock,
        ));
        let (account, user) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let issued = store
            .create(
                account,
                user,
                SessionMeta {
                    password_change_required: must_change,
                    ..SessionMeta::default()
                },
            )
            .await
            .expect("session");
        store
            .put_principal(PrincipalSnapshot {
                account_id: account,
                user_id: user,
                status: UserStatus::Active,
                permissions: vec!["users.read".into(), "users.manage".into()],
                role_id: uuid::Uuid::new_v4(),
                password_change_required: must_change,
                version: 1,
            })
            .await
            .expect("snapshot");
        let forwarded = tower::service_fn(|_: Request<Body>| async {
            Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
        });
        let stack = tower::ServiceBuilder::new()
            .layer(AuthnLayer::new(store))
            .layer(AuthzLayer::new(
                Policy::from_contracts().expect("contracts"),
            ))
            .service(forwarded);
        (stack, issued.access_token.as_str().to_owned())
    }

    /// The gRPC status the stack answers `path` with, `None` when forwarded.
    async fn refusal<S>(stack: &S, path: &str, token: &str) -> Option<Status>
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = std::convert::Infallible>
            + Clone,
    {
        let request = Request::builder()
            .uri(path)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .expect("request");
        let response = stack.clone().oneshot(request).await.expect("infallible");
        Status::from_header_map(response.headers())
    }

    #[tokio::test]
    async fn a_session_that_must_change_its_password_reaches_only_the_allowed_rpcs() {
        use tonic_types::StatusExt;
        let policy = Policy::from_contracts().expect("contracts");
        let (stack, token) = authorized_stack(true).await;
        let mut allowed = Vec::new();
        for rule in policy.rules() {
            let answer = refusal(&stack, &rule.path, &token).await;
            match rule.access {
                Access::Member | Access::Permission if rule.allowed_before_password_change => {
                    assert!(answer.is_none(), "{}: {answer:?}", rule.path);
                    allowed.push(rule.method.clone());
                }
                Access::Member | Access::Permission => {
                    let status = answer.unwrap_or_else(|| panic!("{} forwarded", rule.path));
                    assert_eq!(
                        status.code(),
                        tonic::Code::FailedPrecondition,
                        "{}",
                        rule.path
                    );
                    assert_eq!(
                        status
                            .get_error_details()
                            .error_info()
                            .map(|i| i.reason.clone()),
                        Some("PASSWORD_CHANGE_REQUIRED".to_owned()),
                        "{}",
                        rule.path
                    );
                }
                Access::Public => assert!(answer.is_none(), "{}: {answer:?}", rule.path),
                _ => assert!(answer.is_some(), "{}", rule.path),
            }
        }
        allowed.sort();
        assert_eq!(allowed, ["ChangePassword", "GetCurrentUser", "SignOut"]);

        // The same user with the password settled reaches what it holds.
        let (settled, token) = authorized_stack(false).await;
        assert!(
            refusal(&settled, "/usher.identity.v1.UserService/ListUsers", &token)
                .await
                .is_none()
        );
    }

    #[test]
    fn bearer_tokens_are_parsed() {
        assert_eq!(bearer(&HeaderValue::from_static("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&HeaderValue::from_static("bearer abc")), Some("abc"));
        assert_eq!(bearer(&HeaderValue::from_static("Basic abc")), None);
        assert_eq!(bearer(&HeaderValue::from_static("Bearer ")), None);
        assert_eq!(bearer(&HeaderValue::from_static("abc")), None);
    }
}
