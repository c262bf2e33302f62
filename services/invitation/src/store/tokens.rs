//! Invitation tokens in Redis, and the hourly invitation quota.
//!
//! The keys live in a [`usher_kit::ttl::TtlStore`]: Redis in a deployment, or the process's
//! memory for `usher dev` ([`TokenStore::with_store`]); both pass the same
//! tests below.
//!
//! Key `<prefix>inv:tok:<HMAC-SHA256(key, "invitation" NUL token)>` → value
//! `<invitation id>:<token version>`, with the invitation's remaining
//! lifetime as TTL. The raw token is never stored anywhere. Redis only finds
//! the invitation; PostgreSQL decides whether the token is usable (state
//! PENDING, same `token_version`, not expired), so a key that Redis lost,
//! kept past its TTL or resurrected can never revive a dead link.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use usher_kit::{
    db::StoreResult,
    redis::Redis,
    tokens::{Token, TokenHasher, TokenPurpose},
    ttl::{RedisTtlStore, SharedTtlStore, TtlEntry},
};
use uuid::Uuid;

use super::classified;
use crate::domain::ports::TokenPort;
pub use crate::domain::{input::MAX_TOKEN_CHARS, ports::TokenEntry};

/// What a token points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenTarget {
    /// The invitation.
    pub invitation_id: Uuid,
    /// The token version the link carries.
    pub version: i64,
}

/// How long a quota counter is kept: past the end of its hour.
const QUOTA_KEY_TTL: Duration = Duration::from_secs(7200);

/// The token keys of one deployment.
#[derive(Clone, Debug)]
pub struct TokenStore {
    store: SharedTtlStore,
    hasher: TokenHasher,
}

impl TokenStore {
    /// Keys in `redis`, hashed with `hasher`.
    pub fn new(redis: Redis, hasher: TokenHasher) -> Self {
        Self::with_store(Arc::new(RedisTtlStore::new(redis)), hasher)
    }

    /// Keys in `store` (Redis, or memory for `usher dev`), hashed with
    /// `hasher`.
    pub fn with_store(store: SharedTtlStore, hasher: TokenHasher) -> Self {
        Self { store, hasher }
    }

    fn key(hash: &str) -> String {
        format!("inv:tok:{hash}")
    }

    fn quota_key(account: Uuid, now: DateTime<Utc>) -> String {
        let hour = now.timestamp().div_euclid(3600);
        format!("inv:quota:{account}:{hour}")
    }

    /// The hash `token` is stored under; `None` for a malformed token,
    /// which is never looked up.
    pub fn hash_of(&self, token: &str) -> Option<String> {
        let well_formed = !token.is_empty()
            && token.len() <= MAX_TOKEN_CHARS
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        well_formed.then(|| self.hasher.hash(TokenPurpose::Invitation, token))
    }

    /// What `token` points at, if its key exists. Malformed tokens are never
    /// looked up.
    pub async fn get(&self, token: &str) -> StoreResult<Option<TokenTarget>> {
        let Some(hash) = self.hash_of(token) else {
            return Ok(None);
        };
        let value = classified(self.store.get(&Self::key(&hash)).await)?;
        Ok(value.as_deref().and_then(parse_target))
    }

    /// Deletes the keys of `hashes` (unknown ones are ignored).
    pub async fn delete(&self, hashes: &[String]) -> StoreResult<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = hashes.iter().map(|h| Self::key(h)).collect();
        classified(self.store.delete(keys).await)?;
        Ok(())
    }

    /// The time until the quota window of `now` ends (the domain's rule,
    /// [`crate::domain::transitions::quota_retry_after`]).
    pub fn quota_retry_after(now: DateTime<Utc>) -> Duration {
        crate::domain::transitions::quota_retry_after(now)
    }
}

impl TokenPort for TokenStore {
    /// A new token and its hash.
    fn generate(&self) -> (Token, String) {
        let token = Token::generate();
        let hash = self.hasher.hash(TokenPurpose::Invitation, token.as_str());
        (token, hash)
    }

    /// Writes `entries` in one pipelined round trip. An entry already past
    /// its expiry at `now` is skipped (it could never be used).
    async fn put(&self, entries: &[TokenEntry], now: DateTime<Utc>) -> StoreResult<()> {
        let keys: Vec<TtlEntry> = entries
            .iter()
            .filter_map(|entry| {
                let ttl = u64::try_from((entry.expire_time - now).num_milliseconds()).ok()?;
                Some(TtlEntry {
                    key: Self::key(&entry.hash),
                    value: format!("{}:{}", entry.invitation_id, entry.version),
                    ttl: Duration::from_millis(ttl),
                })
            })
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        classified(self.store.set_many(keys).await)
    }

    /// Deletes the keys of links that no longer work, after the commit that
    /// killed them. Best effort: PostgreSQL already refuses those links, so a
    /// failure only leaves a key pointing at nothing until its TTL; it is
    /// logged with `what` (e.g. "revoked").
    async fn forget(&self, hashes: &[String], what: &str) {
        if let Err(err) = self.delete(hashes).await {
            tracing::warn!(error = %err, what, "dead invitation token keys not deleted");
        }
    }

    /// Takes up to `wanted` sends from `account`'s quota of `limit` per clock
    /// hour and returns how many were granted (0 when the quota is used up).
    /// A `limit` of 0 means no quota.
    async fn take_quota(
        &self,
        account: Uuid,
        wanted: u32,
        limit: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u32> {
        if limit == 0 || wanted == 0 {
            return Ok(wanted);
        }
        let key = Self::quota_key(account, now);
        let used = classified(self.store.add(&key, i64::from(wanted), QUOTA_KEY_TTL).await)?;
        let before = used - i64::from(wanted);
        let granted = (i64::from(limit) - before).clamp(0, i64::from(wanted));
        let refused = i64::from(wanted) - granted;
        if refused > 0 {
            // Give back what was not granted so later calls see the truth.
            classified(self.store.add(&key, -refused, QUOTA_KEY_TTL).await)?;
        }
        Ok(u32::try_from(granted).unwrap_or(0))
    }

    /// Returns `count` unused sends to `account`'s quota of the hour of `now`
    /// (after a call failed or some invitees were not invited).
    async fn give_back_quota(
        &self,
        account: Uuid,
        count: u32,
        limit: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        if limit == 0 || count == 0 {
            return Ok(());
        }
        let key = Self::quota_key(account, now);
        classified(self.store.add(&key, -i64::from(count), QUOTA_KEY_TTL).await)?;
        Ok(())
    }
}

fn parse_target(value: &str) -> Option<TokenTarget> {
    let (id, version) = value.split_once(':')?;
    Some(TokenTarget {
        invitation_id: id.parse().ok()?,
        version: version.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use redis::AsyncCommands;
    use usher_kit::{
        clock::{Clock, ManualClock, SystemClock},
        config::RedisConfig,
        ttl::MemoryTtlStore,
    };

    use super::*;

    fn hasher() -> TokenHasher {
        TokenHasher::new(&[7u8; 32]).expect("key")
    }

    fn redis() -> Redis {
        Redis::connect(&RedisConfig {
            key_prefix: format!("t:{}:", Uuid::new_v4().simple()),
            ..RedisConfig::default()
        })
        .expect("redis")
    }

    /// The store on Redis and in memory (`usher dev`): the behaviour tests
    /// run on both.
    fn stores() -> [(&'static str, TokenStore); 2] {
        [
            ("redis", TokenStore::new(redis(), hasher())),
            (
                "memory",
                TokenStore::with_store(
                    Arc::new(MemoryTtlStore::new(SystemClock::shared())),
                    hasher(),
                ),
            ),
        ]
    }

    fn entry(hash: &str, id: Uuid, expire_time: DateTime<Utc>) -> TokenEntry {
        TokenEntry {
            hash: hash.to_owned(),
            invitation_id: id,
            version: 1,
            expire_time,
        }
    }

    #[test]
    fn targets_parse_strictly() {
        let id = Uuid::new_v4();
        assert_eq!(
            parse_target(&format!("{id}:3")),
            Some(TokenTarget {
                invitation_id: id,
                version: 3
            })
        );
        assert_eq!(parse_target("x:3"), None);
        assert_eq!(parse_target(&id.to_string()), None);
    }

    #[tokio::test]
    async fn tokens_find_their_invitation_until_deleted() {
        for (backend, store) in stores() {
            let now = SystemClock.now();
            let (token, hash) = store.generate();
            let (dead, dead_hash) = store.generate();
            let id = Uuid::new_v4();
            store
                .put(
                    &[
                        entry(&hash, id, now + chrono::Duration::seconds(30)),
                        entry(&dead_hash, id, now - chrono::Duration::seconds(1)),
                    ],
                    now,
                )
                .await
                .expect("put");
            let target = store.get(token.as_str()).await.expect("get");
            assert_eq!(target.map(|t| t.invitation_id), Some(id), "{backend}");
            assert_eq!(
                store.get(dead.as_str()).await.expect("get"),
                None,
                "{backend}: an expired entry is not written"
            );
            store
                .delete(std::slice::from_ref(&hash))
                .await
                .expect("delete");
            assert_eq!(
                store.get(token.as_str()).await.expect("get"),
                None,
                "{backend}"
            );
            store.forget(&[hash], "deleted twice").await;
            // Malformed tokens are not looked up.
            assert_eq!(store.get("").await.expect("get"), None, "{backend}");
            assert_eq!(store.get(&"a".repeat(129)).await.expect("get"), None);
            assert_eq!(store.get("a b").await.expect("get"), None, "{backend}");
        }
    }

    #[tokio::test]
    async fn redis_keys_hold_hashes_with_the_invitation_lifetime() {
        let redis = redis();
        let store = TokenStore::new(redis.clone(), hasher());
        let now = SystemClock.now();
        let (token, hash) = store.generate();
        let id = Uuid::new_v4();
        store
            .put(
                &[entry(&hash, id, now + chrono::Duration::seconds(30))],
                now,
            )
            .await
            .expect("put");
        let mut conn = redis.connection();
        let keys = redis.scan_keys(&redis.key(&["*"])).await.expect("keys");
        assert_eq!(keys, [redis.key(&["inv", "tok", &hash])]);
        assert!(!keys[0].contains(token.as_str()));
        let value: String = conn.get(&keys[0]).await.expect("value");
        assert!(!value.contains(token.as_str()));
        let ttl: i64 = conn.pttl(&keys[0]).await.expect("ttl");
        assert!((1..=30_000).contains(&ttl), "{ttl}");
    }

    #[tokio::test]
    async fn memory_keys_expire_with_the_invitation() {
        let start = Utc.with_ymd_and_hms(2026, 11, 24, 10, 0, 0).unwrap();
        let clock = ManualClock::new(start);
        let store = TokenStore::with_store(Arc::new(MemoryTtlStore::new(clock.clone())), hasher());
        let (token, hash) = store.generate();
        let id = Uuid::new_v4();
        store
            .put(
                &[entry(&hash, id, start + chrono::Duration::hours(24))],
                start,
            )
            .await
            .expect("put");
        clock.advance(chrono::Duration::hours(24) - chrono::Duration::milliseconds(1));
        assert!(store.get(token.as_str()).await.expect("get").is_some());
        clock.advance(chrono::Duration::milliseconds(1));
        assert_eq!(store.get(token.as_str()).await.expect("get"), None);
    }

    #[tokio::test]
    async fn the_quota_grants_up_to_the_limit_per_hour() {
        for (backend, store) in stores() {
            let account = Uuid::new_v4();
            let now = Utc.with_ymd_and_hms(2026, 11, 24, 10, 59, 0).unwrap();
            let take = |wanted, limit, at| store.take_quota(account, wanted, limit, at);
            assert_eq!(take(6, 10, now).await.expect("q"), 6, "{backend}");
            assert_eq!(take(6, 10, now).await.expect("q"), 4, "{backend}");
            assert_eq!(take(1, 10, now).await.expect("q"), 0, "{backend}");
            store.give_back_quota(account, 2, 10, now).await.expect("q");
            assert_eq!(take(5, 10, now).await.expect("q"), 2, "{backend}");
            // A new hour, a new quota.
            let later = now + chrono::Duration::minutes(1);
            assert_eq!(take(5, 10, later).await.expect("q"), 5, "{backend}");
            assert_eq!(take(5, 0, later).await.expect("q"), 5, "{backend}");
        }
        let now = Utc.with_ymd_and_hms(2026, 11, 24, 10, 59, 0).unwrap();
        assert_eq!(TokenStore::quota_retry_after(now), Duration::from_secs(60));
    }
}
