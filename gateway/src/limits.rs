//! Rate limits (P8), counted in Redis so every gateway replica shares them.
//!
//! Two classes:
//! - `public`: per client IP on the public RPCs an attacker can call without
//!   a credential (sign-in, refresh, password reset request and reset,
//!   invitation preview, accept and decline);
//! - `invitations`: per account on invitation creates and resends.
//!
//! The algorithm is a fixed window: one counter per subject and window, key
//! `<prefix>rl:<class>:<subject>:<window index>`, incremented with
//! `INCR` + `PEXPIRE … NX` in one atomic pipeline (one Redis round trip; the
//! kit's `TtlStore::add_in_window`, in-process under `usher dev`). The
//! key lives until the window ends plus a grace second for clock skew between
//! replicas. A fixed window lets a burst of up to twice the limit straddle a
//! window boundary; that is accepted for these limits (they bound abuse, not
//! exact throughput).
//!
//! Over the limit the call is answered here, `RESOURCE_EXHAUSTED` with reason
//! `RATE_LIMITED` and the delay until the window ends (`RetryInfo`), and never
//! reaches a service. When Redis cannot be reached both classes **fail open**:
//! the call goes on, the failure is logged and counted
//! (`usher_gateway_rate_limit_errors_total{class}`). Failing closed on the
//! public class would lock everyone out during a Redis blip; the invitation
//! class sits behind authentication, which already fails closed on Redis
//! errors, and behind the account's seat limit.
//!
//! The client IP is the TCP peer; with `rate_limits.trust_forwarded_for` it is
//! the last `x-forwarded-for` hop, which is only right behind a trusted proxy
//! that appends it (otherwise a client chooses its own bucket). IPv6 clients
//! are counted per /64, the block one subscriber usually holds.

use std::{
    net::{IpAddr, SocketAddr},
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http::{Extensions, HeaderMap, Request, Response};
use tonic::{
    Status,
    body::Body,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service};
use usher_kit::{
    authz::is_infrastructure_path,
    clock::SharedClock,
    error::{ApiError, ApiResult, Reason},
    principal::Principal,
    ttl::SharedTtlStore,
};

use crate::config::{RateLimit, RateLimitsConfig};

/// The public RPCs limited per client IP.
pub const PUBLIC_PATHS: &[&str] = &[
    "/usher.identity.v1.AuthService/SignIn",
    "/usher.identity.v1.AuthService/RefreshSession",
    "/usher.identity.v1.AuthService/RequestPasswordReset",
    "/usher.identity.v1.AuthService/ResetPassword",
    "/usher.identity.v1.AuthService/SetPassword",
    "/usher.invitation.v1.InvitationService/PreviewInvitation",
    "/usher.invitation.v1.InvitationService/AcceptInvitation",
    "/usher.invitation.v1.InvitationService/DeclineInvitation",
];

/// The RPCs limited per account.
pub const INVITATION_PATHS: &[&str] = &[
    "/usher.invitation.v1.InvitationService/CreateInvitations",
    "/usher.invitation.v1.InvitationService/ResendInvitations",
];

/// Extra lifetime of a window's key past the window's end, so a replica whose
/// clock is a little behind still finds the counter.
const KEY_GRACE: Duration = Duration::from_secs(1);

/// What a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Public RPCs, per client IP.
    Public,
    /// Invitation creates and resends, per account.
    Invitations,
}

impl Class {
    /// The class's name in keys and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Invitations => "invitations",
        }
    }

    /// The class of `path`, if it is limited.
    pub fn of(path: &str) -> Option<Self> {
        if PUBLIC_PATHS.contains(&path) {
            Some(Self::Public)
        } else if INVITATION_PATHS.contains(&path) {
            Some(Self::Invitations)
        } else {
            None
        }
    }
}

/// The fixed window a call falls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    /// Windows since the Unix epoch.
    index: u64,
    /// Time left until the window ends (never zero).
    remaining: Duration,
}

/// The window of length `length` holding the instant `now_ms` (Unix millis).
fn window_at(now_ms: i64, length: Duration) -> Window {
    let length = u64::try_from(length.as_millis()).unwrap_or(u64::MAX).max(1);
    let now = u64::try_from(now_ms).unwrap_or(0);
    Window {
        index: now / length,
        remaining: Duration::from_millis(length - now % length),
    }
}

/// The key subject of a client IP: IPv4 (IPv4-mapped IPv6 included) as is,
/// other IPv6 addresses by their /64, without colons.
fn ip_subject(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("v6-{:x}-{:x}-{:x}-{:x}/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// An IP from an `x-forwarded-for` item: `ip`, `ip:port` or `[v6]:port`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// The last hop of the last `x-forwarded-for` header: the address the
/// trusted proxy in front of the gateway saw.
fn last_forwarded_hop(headers: &HeaderMap) -> Option<IpAddr> {
    let value = headers.get_all("x-forwarded-for").iter().next_back()?;
    parse_hop(value.to_str().ok()?.rsplit(',').next()?)
}

/// The client IP of a call: the TCP peer tonic put in the extensions (plain
/// or TLS), or, when `trust_forwarded_for`, the last forwarded hop.
fn client_ip(
    extensions: &Extensions,
    headers: &HeaderMap,
    trust_forwarded_for: bool,
) -> Option<IpAddr> {
    if trust_forwarded_for && let Some(ip) = last_forwarded_hop(headers) {
        return Some(ip);
    }
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
        .map(|addr| addr.ip())
}

/// The account a per-account limit counts against (the credential when a
/// principal has no account, e.g. a platform key).
fn account_subject(principal: &Principal) -> Option<String> {
    principal.account_id.map(|id| id.to_string()).or_else(|| {
        principal
            .credential_id
            .as_ref()
            .map(|c| format!("cred-{c}"))
    })
}

/// Counts calls in Redis (or the in-process store of `usher dev`).
#[derive(Clone)]
pub struct Limiter {
    keys: SharedTtlStore,
    config: RateLimitsConfig,
    clock: SharedClock,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Limiter {
    /// Counts in `keys`, windows by `clock`.
    pub fn new(keys: SharedTtlStore, config: RateLimitsConfig, clock: SharedClock) -> Self {
        Self {
            keys,
            config,
            clock,
        }
    }

    fn limit(&self, class: Class) -> RateLimit {
        match class {
            Class::Public => self.config.public,
            Class::Invitations => self.config.invitations,
        }
    }

    /// The key counting `subject`'s calls of `class` in `window`.
    fn key(&self, class: Class, subject: &str, window: Window) -> String {
        format!("rl:{}:{subject}:{}", class.as_str(), window.index)
    }

    /// Counts one call of `class` by `subject`: `None` when it is within the
    /// limit, or the delay after which the subject may call again.
    pub async fn hit(&self, class: Class, subject: &str) -> ApiResult<Option<Duration>> {
        let limit = self.limit(class);
        let window = window_at(
            self.clock.now().timestamp_millis(),
            Duration::from_secs(limit.window_secs),
        );
        let key = self.key(class, subject, window);
        let (count, _) = self
            .keys
            .add_in_window(&key, 1, window.remaining + KEY_GRACE)
            .await?;
        let over = u64::try_from(count).unwrap_or(0) > limit.limit;
        Ok(over.then_some(window.remaining))
    }
}

/// Layer of [`RateLimitService`].
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    limiter: Option<Limiter>,
    trust_forwarded_for: bool,
}

impl RateLimitLayer {
    /// Applies `config` (nothing when it is disabled), counting in `keys`.
    pub fn new(keys: SharedTtlStore, config: &RateLimitsConfig, clock: SharedClock) -> Self {
        // Served from the start, at zero, for every class.
        for class in [Class::Public, Class::Invitations] {
            metrics::counter!("usher_gateway_rate_limited_total", "class" => class.as_str())
                .increment(0);
            metrics::counter!("usher_gateway_rate_limit_errors_total", "class" => class.as_str())
                .increment(0);
        }
        Self {
            trust_forwarded_for: config.trust_forwarded_for,
            limiter: config
                .enabled
                .then(|| Limiter::new(keys, config.clone(), clock)),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            limiter: self.limiter.clone(),
            trust_forwarded_for: self.trust_forwarded_for,
        }
    }
}

/// Refuses a limited call over its limit with `RESOURCE_EXHAUSTED`
/// (`RATE_LIMITED`, `RetryInfo`); lets every other call through. Placed after
/// authorization, so the account is known and only calls that would be
/// forwarded are counted.
#[derive(Clone, Debug)]
pub struct RateLimitService<S> {
    inner: S,
    limiter: Option<Limiter>,
    trust_forwarded_for: bool,
}

/// Takes the inner service out of `slot`, leaving a clone.
fn take<S: Clone>(slot: &mut S) -> S {
    let clone = slot.clone();
    std::mem::replace(slot, clone)
}

impl<S> Service<Request<Body>> for RateLimitService<S>
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
        let mut inner = take(&mut self.inner);
        let path = request.uri().path();
        let limited = self
            .limiter
            .as_ref()
            .filter(|_| !is_infrastructure_path(path))
            .and_then(|limiter| Some((limiter, Class::of(path)?)));
        let Some((limiter, class)) = limited else {
            return Box::pin(inner.call(request));
        };
        let subject = match class {
            Class::Public => client_ip(
                request.extensions(),
                request.headers(),
                self.trust_forwarded_for,
            )
            .map(ip_subject),
            Class::Invitations => request
                .extensions()
                .get::<Principal>()
                .and_then(account_subject),
        };
        let Some(subject) = subject else {
            tracing::debug!(%path, "no rate limit subject; not limited");
            return Box::pin(inner.call(request));
        };
        let limiter = limiter.clone();
        Box::pin(async move {
            match limiter.hit(class, &subject).await {
                Ok(None) => inner.call(request).await,
                Ok(Some(retry_after)) => {
                    metrics::counter!("usher_gateway_rate_limited_total", "class" => class.as_str())
                        .increment(1);
                    tracing::debug!(
                        path = %request.uri().path(),
                        class = class.as_str(),
                        "rate limited"
                    );
                    let err = ApiError::retry_later(
                        Reason::RateLimited,
                        "too many requests, retry later",
                        retry_after,
                    );
                    Ok(Status::from(err).into_http())
                }
                Err(err) => {
                    // Fail open (see the module documentation).
                    metrics::counter!("usher_gateway_rate_limit_errors_total", "class" => class.as_str())
                        .increment(1);
                    tracing::warn!(class = class.as_str(), error = %err, "rate limit not checked: Redis failed; letting the call through");
                    inner.call(request).await
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv6Addr, sync::Arc};

    use chrono::{TimeZone, Utc};
    use http::HeaderValue;
    use usher_kit::{
        authz::Policy,
        clock::{Clock, ManualClock, SharedClock},
        config::RedisConfig,
        redis::Redis,
        ttl::{MemoryTtlStore, RedisTtlStore},
    };
    use usher_proto::policy::Access;

    use super::*;

    #[test]
    fn windows_are_aligned_and_never_empty() {
        let minute = Duration::from_secs(60);
        assert_eq!(
            window_at(0, minute),
            Window {
                index: 0,
                remaining: minute
            }
        );
        assert_eq!(
            window_at(59_999, minute),
            Window {
                index: 0,
                remaining: Duration::from_millis(1)
            }
        );
        assert_eq!(
            window_at(60_000, minute),
            Window {
                index: 1,
                remaining: minute
            }
        );
        assert_eq!(
            window_at(1_700_000_012_345, Duration::from_secs(3600)),
            Window {
                index: 472_222,
                remaining: Duration::from_millis(3_600_000 - 812_345)
            }
        );
        // A clock before the epoch or a zero length do not panic.
        assert_eq!(window_at(-5, minute).index, 0);
        assert_eq!(
            window_at(7, Duration::ZERO).remaining,
            Duration::from_millis(1)
        );
    }

    #[test]
    fn limited_paths_are_public_or_invitation_rpcs() {
        let policy = Policy::from_contracts().expect("contracts");
        let access = |path: &str| policy.rules().find(|r| r.path == path).map(|r| r.access);
        for path in PUBLIC_PATHS {
            assert_eq!(Class::of(path), Some(Class::Public));
            assert_eq!(access(path), Some(Access::Public), "{path}");
        }
        for path in INVITATION_PATHS {
            assert_eq!(Class::of(path), Some(Class::Invitations));
            assert!(
                matches!(access(path), Some(Access::Permission | Access::Member)),
                "{path}"
            );
        }
        assert_eq!(
            Class::of("/usher.identity.v1.AuthService/GetCurrentUser"),
            None
        );
        assert_eq!(Class::of("/grpc.health.v1.Health/Check"), None);
    }

    #[test]
    fn ip_subjects_have_no_colons() {
        assert_eq!(
            ip_subject("203.0.113.7".parse().expect("ip")),
            "203.0.113.7"
        );
        assert_eq!(
            ip_subject("::ffff:203.0.113.7".parse().expect("ip")),
            "203.0.113.7"
        );
        let a: Ipv6Addr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: Ipv6Addr = "2001:db8:1:2:bbbb::9".parse().expect("ip");
        assert_eq!(ip_subject(a.into()), "v6-2001-db8-1-2/64");
        assert_eq!(ip_subject(a.into()), ip_subject(b.into()));
    }

    #[test]
    fn the_client_ip_is_the_peer_unless_forwarding_is_trusted() {
        let mut extensions = Extensions::new();
        let mut headers = HeaderMap::new();
        assert_eq!(client_ip(&extensions, &headers, false), None);
        extensions.insert(TcpConnectInfo {
            local_addr: None,
            remote_addr: Some("198.51.100.1:4000".parse().expect("addr")),
        });
        let peer: IpAddr = "198.51.100.1".parse().expect("ip");
        assert_eq!(client_ip(&extensions, &headers, false), Some(peer));
        headers.append(
            "x-forwarded-for",
            HeaderValue::from_static("10.0.0.1, 203.0.113.5"),
        );
        headers.append(
            "x-forwarded-for",
            HeaderValue::from_static("192.0.2.1, 203.0.113.7"),
        );
        // Not trusted: the header is ignored.
        assert_eq!(client_ip(&extensions, &headers, false), Some(peer));
        // Trusted: the last hop, the one the proxy appended.
        assert_eq!(
            client_ip(&extensions, &headers, true),
            Some("203.0.113.7".parse().expect("ip"))
        );
        let mut ported = HeaderMap::new();
        ported.insert(
            "x-forwarded-for",
            HeaderValue::from_static("[2001:db8::1]:443"),
        );
        assert_eq!(
            client_ip(&extensions, &ported, true),
            Some("2001:db8::1".parse().expect("ip"))
        );
        // An unreadable hop falls back to the peer.
        let mut junk = HeaderMap::new();
        junk.insert("x-forwarded-for", HeaderValue::from_static("unknown"));
        assert_eq!(client_ip(&extensions, &junk, true), Some(peer));
    }

    #[test]
    fn accounts_are_the_invitation_subject() {
        let id = uuid_like();
        let principal = Principal {
            account_id: Some(id),
            credential_id: Some("s1".into()),
            ..Principal::anonymous()
        };
        assert_eq!(account_subject(&principal), Some(id.to_string()));
        let key_only = Principal {
            credential_id: Some("k1".into()),
            ..Principal::anonymous()
        };
        assert_eq!(account_subject(&key_only), Some("cred-k1".into()));
        assert_eq!(account_subject(&Principal::anonymous()), None);
    }

    fn uuid_like() -> uuid::Uuid {
        uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef)
    }

    fn redis_keys(prefix: &str) -> Redis {
        Redis::connect(&RedisConfig {
            key_prefix: prefix.into(),
            ..Default::default()
        })
        .expect("lazy connect")
    }

    #[tokio::test]
    async fn keys_name_class_subject_and_window() {
        let start = Utc.timestamp_millis_opt(120_500).single().expect("time");
        let clock = ManualClock::new(start);
        let limiter = Limiter::new(
            Arc::new(MemoryTtlStore::new(clock.clone())),
            RateLimitsConfig::default(),
            clock,
        );
        let window = window_at(120_500, Duration::from_secs(60));
        assert_eq!(
            limiter.key(Class::Public, "203.0.113.7", window),
            "rl:public:203.0.113.7:2"
        );
    }

    /// The limit trips at N+1, reports the rest of the window, and recovers
    /// in the next window; the key lives as long as its window.
    async fn limits_trip_and_recover(keys: SharedTtlStore, clock: Arc<ManualClock>) {
        let config = RateLimitsConfig {
            public: RateLimit {
                limit: 3,
                window_secs: 60,
            },
            ..Default::default()
        };
        let limiter = Limiter::new(keys.clone(), config, clock.clone());
        let subject = format!("t-{}", uuid::Uuid::new_v4().simple());
        for _ in 0..3 {
            assert_eq!(
                limiter.hit(Class::Public, &subject).await.expect("store"),
                None
            );
        }
        clock.advance(chrono::Duration::seconds(20));
        let retry = limiter
            .hit(Class::Public, &subject)
            .await
            .expect("store")
            .expect("limited");
        assert_eq!(retry, Duration::from_secs(40));
        // Another subject and another class are counted apart.
        assert_eq!(
            limiter.hit(Class::Public, "other").await.expect("store"),
            None
        );
        assert_eq!(
            limiter
                .hit(Class::Invitations, &subject)
                .await
                .expect("store"),
            None
        );
        // The key expires with its window (plus the grace).
        let key = limiter.key(
            Class::Public,
            &subject,
            window_at(clock.now().timestamp_millis(), Duration::from_secs(60)),
        );
        let ttl = keys.ttl(&key).await.expect("ttl").expect("key lives");
        assert!(
            ttl > Duration::ZERO && ttl <= Duration::from_secs(61),
            "{ttl:?}"
        );
        // The next window starts afresh.
        clock.advance(chrono::Duration::seconds(40));
        assert_eq!(
            limiter.hit(Class::Public, &subject).await.expect("store"),
            None
        );
    }

    /// The start of a minute window.
    fn window_start() -> Arc<ManualClock> {
        ManualClock::new(
            Utc.timestamp_millis_opt(1_000_000_020_000)
                .single()
                .expect("time"),
        )
    }

    #[tokio::test]
    async fn limits_trip_and_recover_in_redis() {
        let redis = redis_keys(&format!("gw-test:{}:", uuid::Uuid::new_v4().simple()));
        limits_trip_and_recover(Arc::new(RedisTtlStore::new(redis)), window_start()).await;
    }

    #[tokio::test]
    async fn limits_trip_and_recover_in_memory() {
        let clock = window_start();
        limits_trip_and_recover(Arc::new(MemoryTtlStore::new(clock.clone())), clock).await;
    }

    #[test]
    fn invalid_limits_name_their_field() {
        use usher_kit::config::{ConfigError, Validate};
        let field = |config: RateLimitsConfig| match config.validate() {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert!(RateLimitsConfig::default().validate().is_ok());
        let mut config = RateLimitsConfig::default();
        config.public.limit = 0;
        assert_eq!(field(config), "rate_limits.public.limit");
        let mut config = RateLimitsConfig::default();
        config.invitations.window_secs = 0;
        assert_eq!(field(config), "rate_limits.invitations.window_secs");
        let mut config = RateLimitsConfig::default();
        config.public.window_secs = 86_401;
        assert_eq!(field(config), "rate_limits.public.window_secs");
    }

    #[tokio::test]
    async fn redis_failures_are_reported_to_the_caller() {
        let redis = Redis::connect(&RedisConfig {
            url: usher_kit::config::Secret::new("redis://127.0.0.1:1"),
            command_timeout_ms: 200,
            ..Default::default()
        })
        .expect("url");
        let clock: SharedClock = usher_kit::clock::SystemClock::shared();
        let limiter = Limiter::new(
            Arc::new(RedisTtlStore::new(redis)),
            RateLimitsConfig::default(),
            clock,
        );
        assert!(limiter.hit(Class::Public, "x").await.is_err());
    }
}
