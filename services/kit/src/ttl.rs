//! Keys with a time to live: what invitation tokens, quotas and rate limits
//! need from Redis, behind one trait with two implementations.
//!
//! - [`RedisTtlStore`]: the real one (`SET … PX`, `GET`, `DEL`, `INCRBY` +
//!   `PEXPIRE [NX]` in a single-key script), keys under the deployment's
//!   prefix; every command names one key, so it runs on a Redis Cluster too.
//! - [`MemoryTtlStore`]: in the process, for `usher dev` without Redis
//!   (ARCHITECTURE.md, "`usher dev` — the embedded default"). Time comes
//!   from a [`Clock`](crate::clock::Clock), so tests move it instead of sleeping.
//!
//! Both pass the same [`conformance`] suite: a key lives until its TTL and
//! not a moment longer, is gone once deleted, counters add atomically, and a
//! fixed window keeps the end its first hit gave it.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures::{FutureExt, future::BoxFuture};
use redis::AsyncCommands;

use crate::{
    clock::SharedClock,
    error::{ApiError, ApiResult},
    redis::Redis,
};

/// One key to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TtlEntry {
    /// The key, without the deployment's prefix.
    pub key: String,
    /// The value.
    pub value: String,
    /// How long the key lives; a zero TTL writes nothing.
    pub ttl: Duration,
}

/// Keys with a time to live.
pub trait TtlStore: Send + Sync + fmt::Debug {
    /// Writes every entry (replacing earlier values and TTLs), in one round
    /// trip where the backend allows. Entries with a zero TTL are skipped.
    /// On Redis, the write is durable as `redis.wait_replicas` asks
    /// ([`Redis::replicate`]).
    fn set_many(&self, entries: Vec<TtlEntry>) -> BoxFuture<'_, ApiResult<()>>;

    /// The value of `key`, unless it is missing or expired.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ApiResult<Option<String>>>;

    /// Deletes `keys` and returns how many existed.
    fn delete(&self, keys: Vec<String>) -> BoxFuture<'_, ApiResult<u64>>;

    /// Adds `by` (negative to subtract) to the integer at `key` (0 when
    /// missing or expired), sets the key's TTL to `ttl`, and returns the new
    /// value, atomically.
    fn add<'a>(&'a self, key: &'a str, by: i64, ttl: Duration) -> BoxFuture<'a, ApiResult<i64>>;

    /// Adds `by` to the counter at `key` like [`add`](Self::add), but sets
    /// the TTL only when the key is new (a fixed window, as rate limits
    /// count: `INCRBY` + `PEXPIRE … NX`). Returns the new value and the time
    /// the window has left.
    fn add_in_window<'a>(
        &'a self,
        key: &'a str,
        by: i64,
        window: Duration,
    ) -> BoxFuture<'a, ApiResult<(i64, Duration)>>;

    /// The time `key` has left; `None` when it is missing or expired.
    fn ttl<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ApiResult<Option<Duration>>>;
}

/// A shareable store.
pub type SharedTtlStore = Arc<dyn TtlStore>;

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

/// Adds to a counter and sets its TTL, atomically. A single-key script
/// rather than `MULTI`/`EXEC`: a Redis Cluster routes (and re-routes after
/// a failover) a script by its key, but gives up on a transaction whose
/// slot moved.
const ADD_SCRIPT: &str = r"
-- KEYS: counter; ARGV: by, ttl ms
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return value
";

/// Adds to a counter whose TTL is set only when it is new (a fixed
/// window); returns the value and the time the window has left.
const WINDOW_SCRIPT: &str = r"
-- KEYS: counter; ARGV: by, window ms
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2], 'NX')
return {value, redis.call('PTTL', KEYS[1])}
";

/// [`TtlStore`] on Redis, every key under the deployment's prefix.
#[derive(Clone, Debug)]
pub struct RedisTtlStore {
    redis: Redis,
    add_script: Arc<redis::Script>,
    window_script: Arc<redis::Script>,
}

impl RedisTtlStore {
    /// Keys in `redis`.
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            add_script: Arc::new(redis::Script::new(ADD_SCRIPT)),
            window_script: Arc::new(redis::Script::new(WINDOW_SCRIPT)),
        }
    }

    fn key(&self, key: &str) -> String {
        self.redis.key(&[key])
    }
}

impl TtlStore for RedisTtlStore {
    fn set_many(&self, entries: Vec<TtlEntry>) -> BoxFuture<'_, ApiResult<()>> {
        async move {
            let mut pipe = redis::pipe();
            let mut any = false;
            for entry in entries {
                let ttl = millis(entry.ttl);
                if ttl == 0 {
                    continue;
                }
                any = true;
                pipe.set_options(
                    self.key(&entry.key),
                    entry.value,
                    redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ttl)),
                )
                .ignore();
            }
            if any {
                let mut conn = self.redis.connection();
                let () = pipe.query_async(&mut conn).await?;
                self.redis.replicate().await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ApiResult<Option<String>>> {
        async move {
            let mut conn = self.redis.connection();
            let value: Option<String> = conn.get(self.key(key)).await?;
            Ok(value)
        }
        .boxed()
    }

    fn delete(&self, keys: Vec<String>) -> BoxFuture<'_, ApiResult<u64>> {
        async move {
            if keys.is_empty() {
                return Ok(0);
            }
            let keys: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
            let mut conn = self.redis.connection();
            let deleted: u64 = conn.del(keys).await?;
            Ok(deleted)
        }
        .boxed()
    }

    fn add<'a>(&'a self, key: &'a str, by: i64, ttl: Duration) -> BoxFuture<'a, ApiResult<i64>> {
        async move {
            let ttl = i64::try_from(millis(ttl).max(1)).unwrap_or(i64::MAX);
            let mut conn = self.redis.connection();
            let value: i64 = self
                .add_script
                .key(self.key(key))
                .arg(by)
                .arg(ttl)
                .invoke_async(&mut conn)
                .await?;
            Ok(value)
        }
        .boxed()
    }

    fn add_in_window<'a>(
        &'a self,
        key: &'a str,
        by: i64,
        window: Duration,
    ) -> BoxFuture<'a, ApiResult<(i64, Duration)>> {
        async move {
            let window = millis(window).max(1);
            let mut conn = self.redis.connection();
            let (value, left): (i64, i64) = self
                .window_script
                .key(self.key(key))
                .arg(by)
                .arg(window)
                .invoke_async(&mut conn)
                .await?;
            let left = u64::try_from(left).unwrap_or(0);
            Ok((value, Duration::from_millis(left)))
        }
        .boxed()
    }

    fn ttl<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ApiResult<Option<Duration>>> {
        async move {
            let mut conn = self.redis.connection();
            let left: i64 = conn.pttl(self.key(key)).await?;
            // -2: no such key; -1: no expiry (never written by this store).
            Ok(u64::try_from(left).ok().map(Duration::from_millis))
        }
        .boxed()
    }
}

/// [`TtlStore`] in the process's memory, for `usher dev`. Expired keys are
/// invisible at once and removed as writes go by.
pub struct MemoryTtlStore {
    clock: SharedClock,
    keys: Mutex<MemoryKeys>,
}

#[derive(Default)]
struct MemoryKeys {
    map: HashMap<String, (String, DateTime<Utc>)>,
    /// The map's size after the last sweep of expired keys.
    swept_at: usize,
}

impl fmt::Debug for MemoryTtlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTtlStore").finish_non_exhaustive()
    }
}

impl MemoryTtlStore {
    /// An empty store whose time comes from `clock`.
    pub fn new(clock: SharedClock) -> Self {
        Self {
            clock,
            keys: Mutex::new(MemoryKeys::default()),
        }
    }

    fn expiry(&self, now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
        chrono::Duration::from_std(ttl)
            .ok()
            .and_then(|ttl| now.checked_add_signed(ttl))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// Adds `by` to the counter at `key`; its TTL becomes `ttl` when `renew`
    /// or when the key is new. Returns the value and the time left.
    fn add_counter(
        &self,
        key: &str,
        by: i64,
        ttl: Duration,
        renew: bool,
    ) -> ApiResult<(i64, Duration)> {
        self.with_keys(|keys, now| {
            let (current, expires) = match keys.live(key, now) {
                Some((value, expires)) => (
                    value.parse::<i64>().map_err(|_| {
                        ApiError::Internal(anyhow::anyhow!("key {key} does not hold an integer"))
                    })?,
                    Some(*expires),
                ),
                None => (0, None),
            };
            let value = current.checked_add(by).ok_or_else(|| {
                ApiError::Internal(anyhow::anyhow!("counter {key} would overflow"))
            })?;
            let expires = match expires {
                Some(expires) if !renew => expires,
                _ => self.expiry(now, ttl.max(Duration::from_millis(1))),
            };
            keys.map
                .insert(key.to_owned(), (value.to_string(), expires));
            keys.sweep(now);
            Ok((value, (expires - now).to_std().unwrap_or_default()))
        })
    }

    fn with_keys<T>(&self, f: impl FnOnce(&mut MemoryKeys, DateTime<Utc>) -> T) -> T {
        let now = self.clock.now();
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut keys, now)
    }
}

impl MemoryKeys {
    fn live(&self, key: &str, now: DateTime<Utc>) -> Option<&(String, DateTime<Utc>)> {
        self.map.get(key).filter(|(_, expires)| *expires > now)
    }

    /// Drops expired keys once the map has doubled since the last sweep, so
    /// the work stays proportional to the writes.
    fn sweep(&mut self, now: DateTime<Utc>) {
        if self.map.len() >= 2 * self.swept_at.max(512) {
            self.map.retain(|_, (_, expires)| *expires > now);
            self.swept_at = self.map.len();
        }
    }
}

impl TtlStore for MemoryTtlStore {
    fn set_many(&self, entries: Vec<TtlEntry>) -> BoxFuture<'_, ApiResult<()>> {
        let result = self.with_keys(|keys, now| {
            for entry in entries {
                if entry.ttl.is_zero() {
                    continue;
                }
                let expires = self.expiry(now, entry.ttl);
                keys.map.insert(entry.key, (entry.value, expires));
            }
            keys.sweep(now);
            Ok(())
        });
        futures::future::ready(result).boxed()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ApiResult<Option<String>>> {
        let value = self.with_keys(|keys, now| keys.live(key, now).map(|(v, _)| v.clone()));
        futures::future::ready(Ok(value)).boxed()
    }

    fn delete(&self, keys_to_delete: Vec<String>) -> BoxFuture<'_, ApiResult<u64>> {
        let deleted = self.with_keys(|keys, now| {
            let mut deleted = 0;
            for key in keys_to_delete {
                if let Some((_, expires)) = keys.map.remove(&key)
                    && expires > now
                {
                    deleted += 1;
                }
            }
            deleted
        });
        futures::future::ready(Ok(deleted)).boxed()
    }

    fn add<'a>(&'a self, key: &'a str, by: i64, ttl: Duration) -> BoxFuture<'a, ApiResult<i64>> {
        let result = self.add_counter(key, by, ttl, true).map(|(value, _)| value);
        futures::future::ready(result).boxed()
    }

    fn add_in_window<'a>(
        &'a self,
        key: &'a str,
        by: i64,
        window: Duration,
    ) -> BoxFuture<'a, ApiResult<(i64, Duration)>> {
        futures::future::ready(self.add_counter(key, by, window, false)).boxed()
    }

    fn ttl<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ApiResult<Option<Duration>>> {
        let left = self.with_keys(|keys, now| {
            keys.live(key, now)
                .and_then(|(_, expires)| (*expires - now).to_std().ok())
        });
        futures::future::ready(Ok(left)).boxed()
    }
}

/// The behaviour every [`TtlStore`] must have. Each check panics with what
/// went wrong; run it from a test of each implementation.
pub mod conformance {
    use std::{future::Future, time::Duration};

    use super::{TtlEntry, TtlStore};

    fn entry(key: &str, value: &str, ttl: Duration) -> TtlEntry {
        TtlEntry {
            key: key.to_owned(),
            value: value.to_owned(),
            ttl,
        }
    }

    /// Runs every check on `store`, whose keys must start empty (a fresh
    /// prefix). `wait` lets time pass: a real sleep for Redis, a clock
    /// moved forward for the memory store.
    pub async fn run<S, W, F>(store: &S, wait: W)
    where
        S: TtlStore + ?Sized,
        W: Fn(Duration) -> F,
        F: Future<Output = ()>,
    {
        values_live_until_deleted(store).await;
        keys_expire_with_their_ttl(store, &wait).await;
        counters_add_and_expire(store, &wait).await;
        windows_keep_their_first_ttl(store, &wait).await;
    }

    async fn windows_keep_their_first_ttl<S, W, F>(store: &S, wait: &W)
    where
        S: TtlStore + ?Sized,
        W: Fn(Duration) -> F,
        F: Future<Output = ()>,
    {
        // Generous margins: with Redis the waits are real sleeps, which
        // may run late on a busy machine.
        let window = Duration::from_secs(3);
        let first = store.add_in_window("w:n", 1, window).await.ok();
        assert!(
            first.is_some_and(|(n, left)| n == 1 && left <= window && !left.is_zero()),
            "a new window: {first:?}"
        );
        wait(Duration::from_secs(1)).await;
        let second = store.add_in_window("w:n", 1, window).await.ok();
        assert!(
            second.is_some_and(|(n, left)| n == 2 && left <= Duration::from_secs(2)),
            "a later hit keeps the window's end: {second:?}"
        );
        wait(Duration::from_millis(2_500)).await;
        let next = store.add_in_window("w:n", 1, window).await.ok();
        assert!(
            next.is_some_and(|(n, left)| n == 1 && left > Duration::from_secs(2)),
            "the next window starts from zero: {next:?}"
        );
    }

    async fn values_live_until_deleted<S: TtlStore + ?Sized>(store: &S) {
        let long = Duration::from_secs(600);
        assert_eq!(store.get("c:a").await.ok(), Some(None), "starts empty");
        store
            .set_many(vec![
                entry("c:a", "1", long),
                entry("c:b", "2", long),
                entry("c:zero", "never", Duration::ZERO),
            ])
            .await
            .ok();
        assert_eq!(store.get("c:a").await.ok(), Some(Some("1".to_owned())));
        assert_eq!(store.get("c:b").await.ok(), Some(Some("2".to_owned())));
        assert_eq!(
            store.get("c:zero").await.ok(),
            Some(None),
            "a zero TTL writes nothing"
        );
        let left = store.ttl("c:a").await.ok().flatten();
        assert!(
            left.is_some_and(|left| left <= long && left > Duration::from_secs(500)),
            "the TTL is the one given: {left:?}"
        );
        // A second write replaces the value and the TTL.
        store
            .set_many(vec![entry("c:a", "1b", Duration::from_secs(60))])
            .await
            .ok();
        assert_eq!(store.get("c:a").await.ok(), Some(Some("1b".to_owned())));
        assert!(
            store
                .ttl("c:a")
                .await
                .ok()
                .flatten()
                .is_some_and(|left| left <= Duration::from_secs(60)),
            "the TTL is replaced"
        );
        // Single use: once deleted, a key is gone, and deleting again is
        // harmless.
        let deleted = store
            .delete(vec!["c:a".to_owned(), "c:missing".to_owned()])
            .await
            .ok();
        assert_eq!(deleted, Some(1), "only existing keys count");
        assert_eq!(store.get("c:a").await.ok(), Some(None));
        assert_eq!(store.delete(vec!["c:a".to_owned()]).await.ok(), Some(0));
        assert_eq!(store.delete(Vec::new()).await.ok(), Some(0));
        assert_eq!(store.get("c:b").await.ok(), Some(Some("2".to_owned())));
        assert_eq!(store.ttl("c:missing").await.ok(), Some(None));
    }

    async fn keys_expire_with_their_ttl<S, W, F>(store: &S, wait: &W)
    where
        S: TtlStore + ?Sized,
        W: Fn(Duration) -> F,
        F: Future<Output = ()>,
    {
        store
            .set_many(vec![
                entry("e:short", "s", Duration::from_millis(300)),
                entry("e:long", "l", Duration::from_secs(600)),
            ])
            .await
            .ok();
        wait(Duration::from_millis(600)).await;
        assert_eq!(
            store.get("e:short").await.ok(),
            Some(None),
            "gone after its TTL"
        );
        assert_eq!(store.ttl("e:short").await.ok(), Some(None));
        assert_eq!(
            store.delete(vec!["e:short".to_owned()]).await.ok(),
            Some(0),
            "an expired key no longer exists"
        );
        assert_eq!(
            store.get("e:long").await.ok(),
            Some(Some("l".to_owned())),
            "others live on"
        );
    }

    async fn counters_add_and_expire<S, W, F>(store: &S, wait: &W)
    where
        S: TtlStore + ?Sized,
        W: Fn(Duration) -> F,
        F: Future<Output = ()>,
    {
        let hour = Duration::from_secs(3600);
        assert_eq!(store.add("q:n", 6, hour).await.ok(), Some(6));
        assert_eq!(store.add("q:n", 6, hour).await.ok(), Some(12));
        assert_eq!(store.add("q:n", -2, hour).await.ok(), Some(10));
        assert!(
            store
                .ttl("q:n")
                .await
                .ok()
                .flatten()
                .is_some_and(|left| left <= hour),
            "counters carry their TTL"
        );
        // Concurrent adds all count.
        let adds: Vec<_> = (0..50).map(|_| store.add("q:c", 1, hour)).collect();
        let results = futures::future::join_all(adds).await;
        let mut seen: Vec<i64> = results.into_iter().filter_map(Result::ok).collect();
        seen.sort_unstable();
        assert_eq!(
            seen,
            (1..=50).collect::<Vec<_>>(),
            "each add sees its own total"
        );
        // An expired counter starts again from zero.
        assert_eq!(
            store.add("q:t", 5, Duration::from_millis(300)).await.ok(),
            Some(5)
        );
        wait(Duration::from_millis(600)).await;
        assert_eq!(
            store.add("q:t", 1, Duration::from_millis(300)).await.ok(),
            Some(1)
        );
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::{clock::ManualClock, config::RedisConfig};

    #[tokio::test]
    async fn the_memory_store_conforms() {
        let start = DateTime::from_timestamp(1_700_000_000, 0).expect("valid");
        let clock = ManualClock::new(start);
        let store = MemoryTtlStore::new(clock.clone());
        conformance::run(&store, |by| {
            clock.advance(chrono::Duration::from_std(by).expect("small"));
            futures::future::ready(())
        })
        .await;
    }

    #[tokio::test]
    async fn the_redis_store_conforms() {
        let redis = Redis::connect(&RedisConfig {
            key_prefix: format!("t:{}:", Uuid::new_v4().simple()),
            ..RedisConfig::default()
        })
        .expect("redis");
        let store = RedisTtlStore::new(redis);
        conformance::run(&store, tokio::time::sleep).await;
    }

    /// The store on a real topology's URL, under a fresh prefix.
    fn store_on(url: String) -> RedisTtlStore {
        RedisTtlStore::new(
            Redis::connect(&RedisConfig {
                url: crate::config::Secret::new(url),
                key_prefix: format!("t:{}:", Uuid::new_v4().simple()),
                ..RedisConfig::default()
            })
            .expect("redis"),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_redis_store_conforms_on_a_sentinel_group() {
        let url = crate::testing::topologies::SentinelGroup::shared().url();
        conformance::run(&store_on(url), tokio::time::sleep).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_redis_store_conforms_on_a_cluster() {
        let url = crate::testing::topologies::RedisCluster::shared().url();
        conformance::run(&store_on(url), tokio::time::sleep).await;
    }

    #[tokio::test]
    async fn the_memory_store_forgets_expired_keys_as_writes_go_by() {
        let start = DateTime::from_timestamp(1_700_000_000, 0).expect("valid");
        let clock = ManualClock::new(start);
        let store = MemoryTtlStore::new(clock.clone());
        let batch = |prefix: &str| {
            (0..600)
                .map(|i| TtlEntry {
                    key: format!("{prefix}{i}"),
                    value: String::new(),
                    ttl: Duration::from_secs(1),
                })
                .collect::<Vec<_>>()
        };
        store.set_many(batch("a")).await.expect("set");
        clock.advance(chrono::Duration::seconds(2));
        store.set_many(batch("b")).await.expect("set");
        let held = store.keys.lock().expect("lock").map.len();
        assert_eq!(held, 600, "the expired batch was swept");
    }

    #[tokio::test]
    async fn a_non_integer_cannot_be_added_to() {
        let store = MemoryTtlStore::new(crate::clock::SystemClock::shared());
        store
            .set_many(vec![TtlEntry {
                key: "k".into(),
                value: "text".into(),
                ttl: Duration::from_secs(60),
            }])
            .await
            .expect("set");
        assert!(store.add("k", 1, Duration::from_secs(60)).await.is_err());
    }
}
