//! The sessions' tests: the conformance suite expanded once per store, the
//! Redis store's own checks (key layout, TTLs, an unreachable Redis), and the
//! configuration and snapshot rules.

use std::{collections::HashMap, panic::AssertUnwindSafe};

use chrono::{DateTime, Duration, TimeDelta, Utc};
use futures::FutureExt;
use redis::AsyncCommands;

use super::{config::seconds, *};
use crate::{
    clock::{ManualClock, SystemClock},
    config::{RedisConfig, Secret, Validate},
    principal::PrincipalKind,
    redis::Redis,
    tokens::{Token, TokenHasher},
};

fn start() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).expect("valid")
}

fn hasher() -> TokenHasher {
    TokenHasher::new(b"sessions-test-key-sessions-test-key!").expect("32 bytes or more")
}

fn secs(secs: u64) -> Duration {
    seconds(secs)
}

fn short_config() -> SessionConfig {
    SessionConfig {
        access_ttl_secs: 60,
        idle_timeout_secs: 100,
        absolute_timeout_secs: 150,
        reuse_grace_secs: 5,
    }
}

fn strict_config() -> SessionConfig {
    SessionConfig {
        reuse_grace_secs: 0,
        ..SessionConfig::default()
    }
}

/// A store, its clock and, for Redis, the connection to clean up with.
struct Harness {
    store: SharedSessionStore,
    clock: Arc<ManualClock>,
    config: SessionConfig,
    redis: Option<Redis>,
}

impl Harness {
    fn memory(config: SessionConfig) -> Self {
        let clock = ManualClock::new(start());
        Self {
            store: Arc::new(MemorySessionStore::new(
                config.clone(),
                hasher(),
                clock.clone(),
            )),
            clock,
            config,
            redis: None,
        }
    }

    fn redis(config: SessionConfig) -> Self {
        Self::on(test_redis(), config)
    }

    /// On the master of a real Sentinel group.
    fn sentinel(config: SessionConfig) -> Self {
        let url = crate::testing::topologies::SentinelGroup::shared().url();
        Self::on(topology_redis(&url), config)
    }

    /// On a real Redis Cluster.
    fn cluster(config: SessionConfig) -> Self {
        let url = crate::testing::topologies::RedisCluster::shared().url();
        Self::on(topology_redis(&url), config)
    }

    fn on(redis: Redis, config: SessionConfig) -> Self {
        let clock = ManualClock::new(start());
        Self {
            store: Arc::new(RedisSessionStore::new(
                redis.clone(),
                config.clone(),
                hasher(),
                clock.clone(),
            )),
            clock,
            config,
            redis: Some(redis),
        }
    }

    fn advance(&self, secs: i64) {
        self.clock.advance(Duration::seconds(secs));
    }

    async fn cleanup(&self) {
        if let Some(redis) = &self.redis {
            for key in keys(redis).await {
                let _: () = redis.connection().del(key).await.expect("del");
            }
        }
    }
}

/// A connection to the local Redis under a prefix of its own.
fn test_redis() -> Redis {
    Redis::connect(&RedisConfig {
        key_prefix: format!("usher-test:{}:", Uuid::new_v4().simple()),
        ..RedisConfig::default()
    })
    .expect("url")
}

/// A connection to `url` (a Sentinel group or a Cluster) under a prefix of
/// its own.
fn topology_redis(url: &str) -> Redis {
    Redis::connect(&RedisConfig {
        url: Secret::new(url),
        key_prefix: format!("usher-test:{}:", Uuid::new_v4().simple()),
        ..RedisConfig::default()
    })
    .expect("url")
}

/// Every key under the harness prefix.
async fn keys(redis: &Redis) -> Vec<String> {
    redis.scan_keys(&redis.key(&["*"])).await.expect("scan")
}

/// Runs one case against a harness, cleaning up even when it fails.
async fn run<F>(harness: Harness, case: F)
where
    F: AsyncFnOnce(&Harness),
{
    let outcome = AssertUnwindSafe(case(&harness)).catch_unwind().await;
    harness.cleanup().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The conformance suite, expanded once per backend (CONVENTIONS.md #9).
macro_rules! conformance_suite {
    ($backend:ident, $harness:path) => {
        mod $backend {
            use super::*;

            conformance_suite!(@cases $harness;
                create_then_resolve => SessionConfig::default(),
                access_token_expires => SessionConfig::default(),
                refresh_rotates_tokens => SessionConfig::default(),
                refresh_reuse_revokes_session => SessionConfig::default(),
                older_refresh_token_revokes_even_within_grace => SessionConfig::default(),
                concurrent_refreshes_have_one_winner => SessionConfig::default(),
                concurrent_refreshes_without_grace_revoke => strict_config(),
                idle_timeout_ends_unrefreshed_session => SessionConfig::default(),
                absolute_timeout_caps_refresh => short_config(),
                revoke_ends_one_session => SessionConfig::default(),
                a_live_session_is_found_by_id => SessionConfig::default(),
                revoke_user_ends_all_sessions_of_user => SessionConfig::default(),
                principal_snapshots_are_versioned => SessionConfig::default(),
                api_key_snapshots_resolve_to_principals => SessionConfig::default(),
                expired_api_key_is_refused => SessionConfig::default(),
                deleted_api_key_stays_revoked => SessionConfig::default(),
            );
        }
    };
    (@cases $harness:path; $($case:ident => $config:expr),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                run($harness($config), suite::$case).await;
            }
        )*
    };
}

conformance_suite!(memory, Harness::memory);
conformance_suite!(redis_backend, Harness::redis);
conformance_suite!(redis_sentinel, Harness::sentinel);
conformance_suite!(redis_cluster, Harness::cluster);

/// The cases, written once against [`SessionStore`].
mod suite;

/// P1: after sign-ins, rotations, a reuse and a snapshot, no key or
/// value in Redis contains a raw token.
#[tokio::test]
async fn redis_stores_no_raw_token() {
    run(
        Harness::redis(SessionConfig::default()),
        async |h: &Harness| {
            let user_id = Uuid::new_v4();
            let mut tokens = Vec::new();
            let first = h
                .store
                .create(Uuid::new_v4(), user_id, SessionMeta::default())
                .await
                .expect("create");
            let second = h
                .store
                .refresh(first.refresh_token.as_str())
                .await
                .expect("refresh");
            let other = h
                .store
                .create(Uuid::new_v4(), user_id, SessionMeta::default())
                .await
                .expect("create");
            h.advance(60);
            let _ = h.store.refresh(first.refresh_token.as_str()).await;
            h.store
                .put_principal(PrincipalSnapshot {
                    account_id: other.record.account_id,
                    user_id,
                    status: UserStatus::Active,
                    permissions: vec!["users.read".into()],
                    role_id: Uuid::new_v4(),
                    password_change_required: false,
                    version: 1,
                })
                .await
                .expect("put");
            for issued in [&first, &second, &other] {
                tokens.push(issued.access_token.as_str().to_owned());
                tokens.push(issued.refresh_token.as_str().to_owned());
            }

            let redis = h.redis.as_ref().expect("redis");
            let mut conn = redis.connection();
            let keys = keys(redis).await;
            assert!(keys.len() >= 6, "the store wrote its keys: {keys:?}");
            for key in keys {
                let kind: String = redis::cmd("TYPE")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .expect("type");
                let values: Vec<String> = match kind.as_str() {
                    "string" => vec![conn.get(&key).await.expect("get")],
                    "zset" => conn.zrange(&key, 0, -1).await.expect("zrange"),
                    "hash" => {
                        let fields: HashMap<String, String> =
                            conn.hgetall(&key).await.expect("hgetall");
                        fields.into_iter().flat_map(|(k, v)| [k, v]).collect()
                    }
                    other => panic!("unexpected type {other} of {key}"),
                };
                assert!(
                    key.starts_with(&redis.key(&["sess:"]))
                        || key.starts_with(&redis.key(&["prn:"])),
                    "key outside the namespaces: {key}"
                );
                for token in &tokens {
                    assert!(!key.contains(token.as_str()), "raw token in key {key}");
                    for value in &values {
                        assert!(
                            !value.contains(token.as_str()),
                            "raw token in value of {key}"
                        );
                    }
                }
            }
        },
    )
    .await;
}

fn pttl_near(actual: i64, expected: TimeDelta) {
    let expected = expected.num_milliseconds();
    assert!(
        actual <= expected && actual > expected - 5_000,
        "pttl {actual} ms, expected about {expected} ms"
    );
}

async fn pttl(redis: &Redis, parts: &[&str]) -> i64 {
    redis
        .connection()
        .pttl(redis.key(parts))
        .await
        .expect("pttl")
}

/// Redis expires each key with the lifetime it stands for.
#[tokio::test]
async fn redis_key_ttls_follow_lifetimes() {
    run(Harness::redis(short_config()), async |h: &Harness| {
        let redis = h.redis.as_ref().expect("redis");
        let issued = h
            .store
            .create(Uuid::new_v4(), Uuid::new_v4(), SessionMeta::default())
            .await
            .expect("create");
        let record = &issued.record;
        let (id, user_id) = (record.id.to_string(), record.user_id.to_string());
        pttl_near(
            pttl(redis, &["sess", "a", &record.access_hash]).await,
            secs(60),
        );
        pttl_near(
            pttl(redis, &["sess", "r", &record.refresh_hash]).await,
            secs(100),
        );
        pttl_near(pttl(redis, &["sess", "s", &id]).await, secs(150));
        pttl_near(pttl(redis, &["sess", "u", &user_id]).await, secs(150));

        // 90 s later, a rotation: every new key ends with the session.
        h.advance(90);
        let rotated = h
            .store
            .refresh(issued.refresh_token.as_str())
            .await
            .expect("refresh");
        let record = &rotated.record;
        pttl_near(
            pttl(redis, &["sess", "a", &record.access_hash]).await,
            secs(60),
        );
        pttl_near(
            pttl(redis, &["sess", "r", &record.refresh_hash]).await,
            secs(60),
        );
        pttl_near(pttl(redis, &["sess", "s", &id]).await, secs(60));

        h.store
            .put_principal(PrincipalSnapshot {
                account_id: record.account_id,
                user_id: record.user_id,
                status: UserStatus::Active,
                permissions: Vec::new(),
                role_id: Uuid::new_v4(),
                password_change_required: false,
                version: 1,
            })
            .await
            .expect("put");
        assert_eq!(
            pttl(redis, &["prn", &user_id]).await,
            -1,
            "snapshots never expire"
        );
    })
    .await;
}

/// With the system clock, Redis alone ends an access token on time.
#[tokio::test]
async fn redis_access_token_expires_in_real_time() {
    let redis = test_redis();
    let config = SessionConfig {
        access_ttl_secs: 1,
        idle_timeout_secs: 2,
        absolute_timeout_secs: 3,
        reuse_grace_secs: 0,
    };
    let store = RedisSessionStore::new(redis.clone(), config, hasher(), SystemClock::shared());
    let issued = store
        .create(Uuid::new_v4(), Uuid::new_v4(), SessionMeta::default())
        .await
        .expect("create");
    assert!(
        store
            .resolve_access(issued.access_token.as_str())
            .await
            .expect("resolve")
            .is_some()
    );
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let access_key = redis.key(&["sess", "a", &issued.record.access_hash]);
    let exists: bool = redis
        .connection()
        .exists(&access_key)
        .await
        .expect("exists");
    assert!(!exists, "redis expired the access key");
    assert_eq!(
        store
            .resolve_access(issued.access_token.as_str())
            .await
            .expect("resolve"),
        None
    );
    for key in keys(&redis).await {
        let _: () = redis.connection().del(key).await.expect("del");
    }
}

/// Redis down: callers get `UNAVAILABLE`, never "no such session" (P21).
#[tokio::test]
async fn redis_down_is_unavailable() {
    let redis = Redis::connect(&RedisConfig {
        url: Secret::new("redis://127.0.0.1:1"),
        command_timeout_ms: 200,
        ..RedisConfig::default()
    })
    .expect("url");
    let store = RedisSessionStore::new(
        redis,
        SessionConfig::default(),
        hasher(),
        SystemClock::shared(),
    );
    assert!(matches!(
        store.resolve_access("whatever").await,
        Err(ApiError::Unavailable(_))
    ));
    assert!(matches!(
        store.refresh("whatever").await,
        Err(SessionError::Store(ApiError::Unavailable(_)))
    ));
    assert!(matches!(
        store
            .create(Uuid::new_v4(), Uuid::new_v4(), SessionMeta::default())
            .await,
        Err(ApiError::Unavailable(_))
    ));
}

#[test]
fn default_config_is_valid_and_rules_name_the_field() {
    SessionConfig::default()
        .validate()
        .expect("defaults are valid");
    short_config().validate().expect("valid");
    let cases = [
        (
            SessionConfig {
                access_ttl_secs: 0,
                ..Default::default()
            },
            "sessions.access_ttl_secs",
        ),
        (
            SessionConfig {
                access_ttl_secs: 8 * 24 * 3600,
                ..Default::default()
            },
            "sessions.access_ttl_secs",
        ),
        (
            SessionConfig {
                idle_timeout_secs: 31 * 24 * 3600,
                ..Default::default()
            },
            "sessions.idle_timeout_secs",
        ),
        (
            SessionConfig {
                absolute_timeout_secs: 0,
                ..Default::default()
            },
            "sessions.absolute_timeout_secs",
        ),
        (
            SessionConfig {
                reuse_grace_secs: 61,
                ..Default::default()
            },
            "sessions.reuse_grace_secs",
        ),
    ];
    for (config, field) in cases {
        let err = config.validate().expect_err("invalid");
        assert!(err.to_string().contains(field), "{err}");
    }
}

#[test]
fn config_rejects_unknown_keys() {
    let err = serde_json::from_str::<SessionConfig>(r#"{"access_ttl": 5}"#).expect_err("unknown");
    assert!(err.to_string().contains("access_ttl"), "{err}");
    let partial: SessionConfig =
        serde_json::from_str(r#"{"access_ttl_secs": 5}"#).expect("partial");
    assert_eq!(
        partial.idle_timeout_secs,
        SessionConfig::default().idle_timeout_secs
    );
}

#[tokio::test]
async fn debug_never_shows_tokens() {
    let h = Harness::memory(SessionConfig::default());
    let issued = h
        .store
        .create(Uuid::new_v4(), Uuid::new_v4(), SessionMeta::default())
        .await
        .expect("create");
    let shown = format!("{issued:?} {:?}", h.store);
    assert!(!shown.contains(issued.access_token.as_str()), "{shown}");
    assert!(!shown.contains(issued.refresh_token.as_str()), "{shown}");
    assert!(shown.contains("<redacted>"));
}

#[tokio::test]
async fn long_client_details_are_truncated() {
    let h = Harness::memory(SessionConfig::default());
    let meta = SessionMeta {
        client_ip: Some("1".repeat(100)),
        user_agent: Some("é".repeat(1_000)),
        password_change_required: false,
    };
    let issued = h
        .store
        .create(Uuid::new_v4(), Uuid::new_v4(), meta)
        .await
        .expect("create");
    assert_eq!(
        issued.record.client_ip.map(|ip| ip.chars().count()),
        Some(MAX_CLIENT_IP_CHARS)
    );
    assert_eq!(
        issued.record.user_agent.map(|ua| ua.chars().count()),
        Some(MAX_USER_AGENT_CHARS)
    );
}

#[tokio::test]
async fn absurd_unvalidated_lifetimes_saturate_instead_of_panicking() {
    let h = Harness::memory(SessionConfig {
        access_ttl_secs: u64::MAX,
        idle_timeout_secs: u64::MAX,
        absolute_timeout_secs: u64::MAX,
        reuse_grace_secs: u64::MAX,
    });
    let issued = h
        .store
        .create(Uuid::new_v4(), Uuid::new_v4(), SessionMeta::default())
        .await
        .expect("create");
    assert_eq!(issued.record.absolute_expiry, DateTime::<Utc>::MAX_UTC);
    h.store
        .refresh(issued.refresh_token.as_str())
        .await
        .expect("refresh");
}

#[test]
fn snapshot_grants_a_principal_only_to_its_active_user() {
    let record = SessionRecord {
        id: Uuid::new_v4(),
        account_id: Uuid::new_v4(),
        user_id: Uuid::new_v4(),
        created_at: start(),
        absolute_expiry: start() + secs(60),
        access_hash: "a".into(),
        access_expiry: start() + secs(60),
        refresh_hash: "r".into(),
        refresh_expiry: start() + secs(60),
        previous_refresh_hash: None,
        rotated_at: None,
        client_ip: None,
        user_agent: None,
        password_change_required: false,
    };
    let snapshot = PrincipalSnapshot {
        account_id: record.account_id,
        user_id: record.user_id,
        status: UserStatus::Active,
        permissions: vec!["users.read".into()],
        role_id: Uuid::new_v4(),
        password_change_required: true,
        version: 3,
    };
    let principal = snapshot.principal_for(&record).expect("active user");
    assert_eq!(principal.kind, PrincipalKind::User);
    assert_eq!(principal.account_id, Some(record.account_id));
    assert!(principal.is_member());
    assert!(snapshot.must_change_password(&record));
    assert!(
        principal.password_change_required,
        "the principal carries it"
    );
    let settled = PrincipalSnapshot {
        password_change_required: false,
        ..snapshot.clone()
    };
    assert!(
        !settled
            .principal_for(&record)
            .expect("active user")
            .password_change_required
    );
    let pending_session = SessionRecord {
        password_change_required: true,
        ..record.clone()
    };
    assert!(
        settled
            .principal_for(&pending_session)
            .expect("active user")
            .password_change_required,
        "either the user or the session requires it"
    );
    let inactive = PrincipalSnapshot {
        status: UserStatus::Inactive,
        ..snapshot.clone()
    };
    assert_eq!(inactive.principal_for(&record), None);
    let foreign = PrincipalSnapshot {
        account_id: Uuid::new_v4(),
        ..snapshot
    };
    assert_eq!(foreign.principal_for(&record), None);
}
