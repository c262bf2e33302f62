//! Invitation tokens in Redis, and the hourly invitation quota.
//!
//! Key `<prefix>inv:tok:<HMAC-SHA256(key, "invitation" NUL token)>` → value
//! `<invitation id>:<token version>`, with the invitation's remaining
//! lifetime as TTL. The raw token is never stored anywhere. Redis only finds
//! the invitation; PostgreSQL decides whether the token is usable (state
//! PENDING, same `token_version`, not expired), so a key that Redis lost,
//! kept past its TTL or resurrected can never revive a dead link.

use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use usher_kit::{
    error::ApiResult,
    redis::Redis,
    tokens::{Token, TokenHasher, TokenPurpose},
};
use uuid::Uuid;

/// Longest token looked up; anything longer is no token of ours.
pub const MAX_TOKEN_CHARS: usize = 128;

/// One key to write: the token's hash, what it points at, until when.
#[derive(Clone, Debug)]
pub struct TokenEntry {
    /// HMAC of the token.
    pub hash: String,
    /// The invitation.
    pub invitation_id: Uuid,
    /// The invitation's token version this token carries.
    pub version: i64,
    /// When the link stops working.
    pub expire_time: DateTime<Utc>,
}

/// What a token points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenTarget {
    /// The invitation.
    pub invitation_id: Uuid,
    /// The token version the link carries.
    pub version: i64,
}

/// The token keys of one deployment.
#[derive(Clone, Debug)]
pub struct TokenStore {
    redis: Redis,
    hasher: TokenHasher,
}

impl TokenStore {
    /// Keys in `redis`, hashed with `hasher`.
    pub fn new(redis: Redis, hasher: TokenHasher) -> Self {
        Self { redis, hasher }
    }

    /// A new token and its hash.
    pub fn generate(&self) -> (Token, String) {
        let token = Token::generate();
        let hash = self.hasher.hash(TokenPurpose::Invitation, token.as_str());
        (token, hash)
    }

    fn key(&self, hash: &str) -> String {
        self.redis.key(&["inv", "tok", hash])
    }

    /// Writes `entries` in one pipelined round trip. An entry already past
    /// its expiry at `now` is skipped (it could never be used).
    pub async fn put(&self, entries: &[TokenEntry], now: DateTime<Utc>) -> ApiResult<()> {
        let mut pipe = redis::pipe();
        let mut any = false;
        for entry in entries {
            let ttl = (entry.expire_time - now).num_milliseconds();
            let Ok(ttl) = u64::try_from(ttl) else {
                continue;
            };
            if ttl == 0 {
                continue;
            }
            any = true;
            pipe.set_options(
                self.key(&entry.hash),
                format!("{}:{}", entry.invitation_id, entry.version),
                redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ttl)),
            )
            .ignore();
        }
        if any {
            let mut conn = self.redis.connection();
            let () = pipe.query_async(&mut conn).await?;
        }
        Ok(())
    }

    /// What `token` points at, if its key exists. Malformed tokens are never
    /// looked up.
    pub async fn get(&self, token: &str) -> ApiResult<Option<TokenTarget>> {
        if token.is_empty()
            || token.len() > MAX_TOKEN_CHARS
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Ok(None);
        }
        let hash = self.hasher.hash(TokenPurpose::Invitation, token);
        let mut conn = self.redis.connection();
        let value: Option<String> = conn.get(self.key(&hash)).await?;
        Ok(value.as_deref().and_then(parse_target))
    }

    /// Deletes the keys of `hashes` (unknown ones are ignored).
    pub async fn delete(&self, hashes: &[String]) -> ApiResult<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = hashes.iter().map(|h| self.key(h)).collect();
        let mut conn = self.redis.connection();
        let _: u64 = conn.del(keys).await?;
        Ok(())
    }

    /// Deletes the keys of links that no longer work, after the commit that
    /// killed them. Best effort: PostgreSQL already refuses those links, so a
    /// failure only leaves a key pointing at nothing until its TTL; it is
    /// logged with `what` (e.g. "revoked").
    pub async fn forget(&self, hashes: &[String], what: &str) {
        if let Err(err) = self.delete(hashes).await {
            tracing::warn!(error = %err, what, "dead invitation token keys not deleted");
        }
    }

    /// Takes up to `wanted` sends from `account`'s quota of `limit` per clock
    /// hour and returns how many were granted (0 when the quota is used up).
    /// A `limit` of 0 means no quota.
    pub async fn take_quota(
        &self,
        account: Uuid,
        wanted: u32,
        limit: u32,
        now: DateTime<Utc>,
    ) -> ApiResult<u32> {
        if limit == 0 || wanted == 0 {
            return Ok(wanted);
        }
        let hour = now.timestamp().div_euclid(3600);
        let key = self
            .redis
            .key(&["inv", "quota", &account.to_string(), &hour.to_string()]);
        let mut conn = self.redis.connection();
        let (used,): (i64,) = redis::pipe()
            .atomic()
            .incr(&key, i64::from(wanted))
            .expire(&key, 7200)
            .ignore()
            .query_async(&mut conn)
            .await?;
        let before = used - i64::from(wanted);
        let granted = (i64::from(limit) - before).clamp(0, i64::from(wanted));
        let refused = i64::from(wanted) - granted;
        if refused > 0 {
            // Give back what was not granted so later calls see the truth.
            let _: i64 = conn.decr(&key, refused).await?;
        }
        Ok(u32::try_from(granted).unwrap_or(0))
    }

    /// Returns `count` unused sends to `account`'s quota of the hour of `now`
    /// (after a call failed or some invitees were not invited).
    pub async fn give_back_quota(
        &self,
        account: Uuid,
        count: u32,
        limit: u32,
        now: DateTime<Utc>,
    ) -> ApiResult<()> {
        if limit == 0 || count == 0 {
            return Ok(());
        }
        let hour = now.timestamp().div_euclid(3600);
        let key = self
            .redis
            .key(&["inv", "quota", &account.to_string(), &hour.to_string()]);
        let mut conn = self.redis.connection();
        let _: i64 = conn.decr(&key, i64::from(count)).await?;
        Ok(())
    }

    /// The time until the quota window of `now` ends.
    pub fn quota_retry_after(now: DateTime<Utc>) -> Duration {
        let into_hour = u64::try_from(now.timestamp().rem_euclid(3600)).unwrap_or(0);
        Duration::from_secs(3600 - into_hour)
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
    use usher_kit::config::RedisConfig;

    use super::*;

    fn store() -> TokenStore {
        let redis = Redis::connect(&RedisConfig {
            key_prefix: format!("t:{}:", Uuid::new_v4().simple()),
            ..RedisConfig::default()
        })
        .expect("redis");
        TokenStore::new(redis, TokenHasher::new(&[7u8; 32]).expect("key"))
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
    async fn keys_hold_hashes_and_expire_with_the_invitation() {
        let store = store();
        let now = usher_kit::clock::Clock::now(&usher_kit::clock::SystemClock);
        let (token, hash) = store.generate();
        let id = Uuid::new_v4();
        store
            .put(
                &[TokenEntry {
                    hash: hash.clone(),
                    invitation_id: id,
                    version: 1,
                    expire_time: now + chrono::Duration::seconds(30),
                }],
                now,
            )
            .await
            .expect("put");
        let target = store.get(token.as_str()).await.expect("get");
        assert_eq!(target.map(|t| t.invitation_id), Some(id));
        let mut conn = store.redis.connection();
        let keys: Vec<String> = conn.keys(store.redis.key(&["*"])).await.expect("keys");
        assert_eq!(keys.len(), 1);
        assert!(!keys[0].contains(token.as_str()));
        let value: String = conn.get(&keys[0]).await.expect("value");
        assert!(!value.contains(token.as_str()));
        let ttl: i64 = conn.pttl(&keys[0]).await.expect("ttl");
        assert!((1..=30_000).contains(&ttl), "{ttl}");
        store.delete(&[hash]).await.expect("delete");
        assert_eq!(store.get(token.as_str()).await.expect("get"), None);
        // Malformed tokens are not looked up.
        assert_eq!(store.get("").await.expect("get"), None);
        assert_eq!(store.get(&"a".repeat(129)).await.expect("get"), None);
        assert_eq!(store.get("a b").await.expect("get"), None);
    }

    #[tokio::test]
    async fn the_quota_grants_up_to_the_limit_per_hour() {
        let store = store();
        let account = Uuid::new_v4();
        let now = Utc.with_ymd_and_hms(2026, 11, 24, 10, 59, 0).unwrap();
        assert_eq!(store.take_quota(account, 6, 10, now).await.expect("q"), 6);
        assert_eq!(store.take_quota(account, 6, 10, now).await.expect("q"), 4);
        assert_eq!(store.take_quota(account, 1, 10, now).await.expect("q"), 0);
        store.give_back_quota(account, 2, 10, now).await.expect("q");
        assert_eq!(store.take_quota(account, 5, 10, now).await.expect("q"), 2);
        // A new hour, a new quota.
        let later = now + chrono::Duration::minutes(1);
        assert_eq!(store.take_quota(account, 5, 10, later).await.expect("q"), 5);
        assert_eq!(store.take_quota(account, 5, 0, later).await.expect("q"), 5);
        assert_eq!(TokenStore::quota_retry_after(now), Duration::from_secs(60));
    }
}
