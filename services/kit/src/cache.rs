//! Where a service keeps what expires — sessions, invitation tokens, rate
//! limit counters — behind one type: Redis in a deployment, or the process's
//! memory for `usher dev` (ARCHITECTURE.md, "`usher dev` — the embedded
//! default").
//!
//! Both hand out the same traits ([`TtlStore`](crate::ttl::TtlStore) and
//! [`SessionStore`](crate::sessions::SessionStore)), which pass the same
//! conformance suites. Clones of one in-memory cache share their keys and
//! sessions, so the gateway resolves the sessions identity issued when both
//! run in one process. Nothing in it survives a restart: signed-in users sign
//! in again, invitation links sent before it stop working (reinvite), and
//! identity re-publishes the API key snapshots at start.

use std::sync::{Arc, OnceLock};

use crate::{
    clock::SharedClock,
    config::RedisConfig,
    health::Probe,
    redis::Redis,
    sessions::{MemorySessionStore, RedisSessionStore, SessionConfig, SharedSessionStore},
    tokens::TokenHasher,
    ttl::{MemoryTtlStore, RedisTtlStore, SharedTtlStore},
};

/// Redis, or the in-process cache. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Cache {
    inner: Backend,
}

#[derive(Clone, Debug)]
enum Backend {
    Redis(Redis),
    Memory(Arc<Memory>),
}

#[derive(Debug)]
struct Memory {
    keys: Arc<MemoryTtlStore>,
    sessions: OnceLock<Arc<MemorySessionStore>>,
}

impl Cache {
    /// Redis at `config` (connected lazily; see [`Redis::connect`]).
    pub fn connect(config: &RedisConfig) -> anyhow::Result<Self> {
        Ok(Self::redis(Redis::connect(config)?))
    }

    /// Redis on an existing connection.
    pub fn redis(redis: Redis) -> Self {
        Self {
            inner: Backend::Redis(redis),
        }
    }

    /// An empty in-process cache reading time from `clock`; clones share it.
    pub fn memory(clock: SharedClock) -> Self {
        Self {
            inner: Backend::Memory(Arc::new(Memory {
                keys: Arc::new(MemoryTtlStore::new(clock)),
                sessions: OnceLock::new(),
            })),
        }
    }

    /// Whether this is the in-process cache.
    pub fn is_memory(&self) -> bool {
        matches!(self.inner, Backend::Memory(_))
    }

    /// Keys with a time to live.
    pub fn keys(&self) -> SharedTtlStore {
        match &self.inner {
            Backend::Redis(redis) => Arc::new(RedisTtlStore::new(redis.clone())),
            Backend::Memory(memory) => memory.keys.clone(),
        }
    }

    /// Sessions, principal and API key snapshots. In memory there is one
    /// store per cache: the first caller's rules apply (in `usher dev`,
    /// identity's, which issues the sessions; the gateway only reads them,
    /// hashing tokens with the same key).
    pub fn sessions(
        &self,
        config: SessionConfig,
        hasher: TokenHasher,
        clock: SharedClock,
    ) -> SharedSessionStore {
        match &self.inner {
            Backend::Redis(redis) => {
                Arc::new(RedisSessionStore::new(redis.clone(), config, hasher, clock))
            }
            Backend::Memory(memory) => memory
                .sessions
                .get_or_init(|| Arc::new(MemorySessionStore::new(config, hasher, clock)))
                .clone(),
        }
    }

    /// The health probe: `redis` (answers `PING`) or `cache` (always up).
    pub fn probe(&self) -> Probe {
        match &self.inner {
            Backend::Redis(redis) => Probe::redis(redis.clone()),
            Backend::Memory(_) => Probe::new("cache", || async { true }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;
    use crate::{
        clock::SystemClock,
        config::Secret,
        sessions::SessionMeta,
        tokens::{TokenConfig, TokenHasher},
    };

    fn hasher() -> TokenHasher {
        TokenHasher::from_config(&TokenConfig::default()).expect("hasher")
    }

    #[tokio::test]
    async fn clones_of_a_memory_cache_share_keys_and_sessions() {
        let cache = Cache::memory(SystemClock::shared());
        let other = cache.clone();
        assert!(cache.is_memory());
        let keys = cache.keys();
        keys.add("k", 2, std::time::Duration::from_secs(60))
            .await
            .expect("add");
        assert_eq!(
            other.keys().get("k").await.expect("get").as_deref(),
            Some("2")
        );

        let issuer = cache.sessions(SessionConfig::default(), hasher(), SystemClock::shared());
        let reader = other.sessions(SessionConfig::default(), hasher(), SystemClock::shared());
        let issued = issuer
            .create(
                uuid::Uuid::new_v4(),
                uuid::Uuid::new_v4(),
                SessionMeta::default(),
            )
            .await
            .expect("create");
        let found = reader
            .resolve_access(issued.access_token.as_str())
            .await
            .expect("resolve");
        assert_eq!(found.map(|r| r.id), Some(issued.record.id));
        assert!(cache.probe().check().await);
    }

    #[tokio::test]
    async fn redis_cache_reaches_redis() {
        let cache = Cache::connect(&RedisConfig {
            url: Secret::new("redis://127.0.0.1:6379".to_owned()),
            key_prefix: format!("cachetest:{}:", uuid::Uuid::new_v4().simple()),
            ..RedisConfig::default()
        })
        .expect("config");
        assert!(!cache.is_memory());
        let keys = cache.keys();
        keys.add("k", 5, std::time::Duration::from_secs(5))
            .await
            .expect("add");
        assert_eq!(keys.get("k").await.expect("get").as_deref(), Some("5"));
        keys.delete(vec!["k".into()]).await.expect("delete");
        assert!(cache.probe().check().await);
    }
}
