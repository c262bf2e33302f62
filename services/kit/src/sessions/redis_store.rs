//! Sessions in Redis ([`RedisSessionStore`]), the store of a deployment:
//! identity and the gateway share it. The key layout is in the parent
//! module's documentation. A session's keys are not kept in one slot of a
//! Redis Cluster (a token's key is named by the token's hash alone), so no
//! write spans two keys atomically: the session record is the commit point.
//! Every token resolves through it, so a session's other keys are written
//! before it and deleted after it, and a half-done write (a crash between
//! the steps) leaves keys no token reaches, which expire. The
//! check-and-set writes are the single-key Lua scripts below.

use std::fmt;

use chrono::{DateTime, Utc};
use futures::{FutureExt, future::BoxFuture};
use redis::{AsyncCommands, Script};
use serde::Serialize;
use uuid::Uuid;

use super::{
    SessionError, SessionStore,
    config::SessionConfig,
    record::{IssuedSession, SessionMeta, SessionRecord},
    rules::{Rules, Stale, TokenEntry, reuse_detected},
    snapshot::{ApiKeySnapshot, PrincipalSnapshot, plausible_api_key},
};
use crate::{
    clock::SharedClock,
    error::{ApiError, ApiResult},
    principal::Principal,
    redis::Redis,
    tokens::TokenHasher,
};

fn corrupt(what: &str, err: serde_json::Error) -> ApiError {
    ApiError::Internal(anyhow::Error::new(err).context(format!("corrupt {what} in session store")))
}

/// `value` as the JSON stored in Redis.
fn to_json<T: Serialize>(value: &T) -> ApiResult<String> {
    serde_json::to_string(value).map_err(|err| corrupt("value", err))
}

/// Milliseconds from `now` to `until`, at least 1 (Redis refuses `PX 0`).
fn ttl_ms(now: DateTime<Utc>, until: DateTime<Utc>) -> i64 {
    (until - now).num_milliseconds().max(1)
}

/// The version as a fixed-width string, so Lua can compare versions as
/// strings (its numbers are doubles and lose precision above 2^53).
fn padded_version(version: u64) -> String {
    format!("{version:020}")
}

/// Swaps in a rotated record only while the record still holds the refresh
/// hash the caller rotated from.
const ROTATE_SCRIPT: &str = r"
-- KEYS: session record; ARGV: expected refresh hash, record, record ttl ms
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if cjson.decode(current)['refresh_hash'] ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
";

/// Writes a snapshot unless the stored version is the same or newer.
const PUT_PRINCIPAL_SCRIPT: &str = r"
-- KEYS: principal key; ARGV: zero-padded version, snapshot JSON
local current = redis.call('HGET', KEYS[1], 'version')
if current and current >= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'snapshot', ARGV[2])
return 1
";

/// Writes an API key snapshot unless the key was revoked or the stored
/// version is the same or newer; the key expires with the API key.
const PUT_API_KEY_SCRIPT: &str = r"
-- KEYS: api key key; ARGV: zero-padded version, snapshot JSON, ttl ms (0: none)
if redis.call('HEXISTS', KEYS[1], 'revoked') == 1 then return 0 end
local current = redis.call('HGET', KEYS[1], 'version')
if current and current >= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'snapshot', ARGV[2])
if ARGV[3] ~= '0' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('PERSIST', KEYS[1])
end
return 1
";

/// Replaces an API key snapshot by a tombstone (keeping the key's TTL).
const DELETE_API_KEY_SCRIPT: &str = r"
-- KEYS: api key key
local had = redis.call('HEXISTS', KEYS[1], 'snapshot')
redis.call('HDEL', KEYS[1], 'snapshot', 'version')
redis.call('HSET', KEYS[1], 'revoked', '1')
return had
";

/// Sessions in Redis (the real mode; identity and the gateway share it).
pub struct RedisSessionStore {
    redis: Redis,
    rules: Rules,
    rotate: Script,
    put_principal: Script,
    put_api_key: Script,
    delete_api_key: Script,
}

impl fmt::Debug for RedisSessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSessionStore")
            .field("redis", &self.redis)
            .field("config", &self.rules.config)
            .finish_non_exhaustive()
    }
}

impl RedisSessionStore {
    /// A store on `redis`, hashing tokens with `hasher` and reading time from
    /// `clock`. `config` is expected to be validated.
    pub fn new(
        redis: Redis,
        config: SessionConfig,
        hasher: TokenHasher,
        clock: SharedClock,
    ) -> Self {
        Self {
            redis,
            rules: Rules {
                config,
                hasher,
                clock,
            },
            rotate: Script::new(ROTATE_SCRIPT),
            put_principal: Script::new(PUT_PRINCIPAL_SCRIPT),
            put_api_key: Script::new(PUT_API_KEY_SCRIPT),
            delete_api_key: Script::new(DELETE_API_KEY_SCRIPT),
        }
    }

    fn access_key(&self, hash: &str) -> String {
        self.redis.key(&["sess", "a", hash])
    }

    fn refresh_key(&self, hash: &str) -> String {
        self.redis.key(&["sess", "r", hash])
    }

    fn session_key(&self, id: Uuid) -> String {
        self.redis.key(&["sess", "s", &id.to_string()])
    }

    fn user_key(&self, user_id: Uuid) -> String {
        self.redis.key(&["sess", "u", &user_id.to_string()])
    }

    fn principal_key(&self, user_id: Uuid) -> String {
        self.redis.key(&["prn", &user_id.to_string()])
    }

    fn api_key_key(&self, hash: &str) -> String {
        self.redis.key(&["key", hash])
    }

    async fn entry(&self, key: &str) -> ApiResult<Option<TokenEntry>> {
        let raw: Option<String> = self.redis.connection().get(key).await?;
        raw.map(|raw| serde_json::from_str(&raw).map_err(|err| corrupt("token entry", err)))
            .transpose()
    }

    async fn record(&self, id: Uuid) -> ApiResult<Option<SessionRecord>> {
        let raw: Option<String> = self.redis.connection().get(self.session_key(id)).await?;
        raw.map(|raw| serde_json::from_str(&raw).map_err(|err| corrupt("session record", err)))
            .transpose()
    }

    async fn do_create(
        &self,
        account_id: Uuid,
        user_id: Uuid,
        meta: SessionMeta,
    ) -> ApiResult<IssuedSession> {
        let minted = self.rules.start(account_id, user_id, meta)?;
        let record = minted.record();
        let now = record.created_at;
        let session_ttl = ttl_ms(now, record.absolute_expiry);
        let user_key = self.user_key(user_id);
        let mut conn = self.redis.connection();
        // The token keys and the index first, the record last (the module's
        // documentation says why).
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.access_key(&record.access_hash))
            .arg(to_json(&minted.access_entry())?)
            .arg("PX")
            .arg(ttl_ms(now, record.access_expiry))
            .ignore()
            .cmd("SET")
            .arg(self.refresh_key(&record.refresh_hash))
            .arg(to_json(&minted.refresh_entry())?)
            .arg("PX")
            .arg(ttl_ms(now, record.refresh_expiry))
            .ignore()
            // The index: this session, minus those that ended.
            .cmd("ZADD")
            .arg(&user_key)
            .arg(record.absolute_expiry.timestamp_millis())
            .arg(record.id.to_string())
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&user_key)
            .arg("-inf")
            .arg(now.timestamp_millis())
            .ignore()
            // Lives as long as its longest session: set if none, else extend.
            .cmd("PEXPIRE")
            .arg(&user_key)
            .arg(session_ttl)
            .arg("NX")
            .ignore()
            .cmd("PEXPIRE")
            .arg(&user_key)
            .arg(session_ttl)
            .arg("GT")
            .ignore();
        pipe.query_async::<()>(&mut conn).await?;
        let () = conn
            .pset_ex(
                self.session_key(record.id),
                to_json(record)?,
                u64::try_from(session_ttl).unwrap_or(1),
            )
            .await?;
        self.redis.replicate().await?;
        Ok(minted.issued)
    }

    async fn do_resolve_access(&self, access_token: &str) -> ApiResult<Option<SessionRecord>> {
        let now = self.rules.clock.now();
        let key = self.access_key(&self.rules.hash_access(access_token));
        let Some(entry) = self.entry(&key).await?.filter(|entry| entry.exp > now) else {
            return Ok(None);
        };
        Ok(self
            .record(entry.sid)
            .await?
            .filter(|record| Rules::live(now, record)))
    }

    async fn do_refresh(&self, refresh_token: &str) -> Result<IssuedSession, SessionError> {
        let now = self.rules.clock.now();
        let hash = self.rules.hash_refresh(refresh_token);
        let Some(entry) = self
            .entry(&self.refresh_key(&hash))
            .await?
            .filter(|entry| entry.exp > now)
        else {
            return Err(SessionError::NotUsable);
        };
        // At most twice: a lost check-and-set means another refresh won, and
        // the second read judges the token against the winner's record.
        for _ in 0..2 {
            let Some(record) = self
                .record(entry.sid)
                .await?
                .filter(|record| Rules::live(now, record))
            else {
                return Err(SessionError::NotUsable);
            };
            if record.refresh_hash != hash {
                return match self.rules.judge_stale(now, &record, &hash) {
                    Stale::Superseded => Err(SessionError::Superseded),
                    Stale::Reused => {
                        self.delete_sessions(std::slice::from_ref(&record)).await?;
                        Err(reuse_detected(&record))
                    }
                };
            }
            let minted = self.rules.rotate(now, &record)?;
            let rotated = minted.record();
            let mut conn = self.redis.connection();
            // The new token keys first: nobody holds their tokens until the
            // swap of the record succeeds.
            let access_key = self.access_key(&rotated.access_hash);
            let refresh_key = self.refresh_key(&rotated.refresh_hash);
            redis::pipe()
                .cmd("SET")
                .arg(&access_key)
                .arg(to_json(&minted.access_entry())?)
                .arg("PX")
                .arg(ttl_ms(now, rotated.access_expiry))
                .ignore()
                .cmd("SET")
                .arg(&refresh_key)
                .arg(to_json(&minted.refresh_entry())?)
                .arg("PX")
                .arg(ttl_ms(now, rotated.refresh_expiry))
                .ignore()
                .query_async::<()>(&mut conn)
                .await
                .map_err(ApiError::from)?;
            let swapped: i64 = self
                .rotate
                .key(self.session_key(rotated.id))
                .arg(&hash)
                .arg(to_json(rotated)?)
                .arg(ttl_ms(now, rotated.absolute_expiry))
                .invoke_async(&mut conn)
                .await
                .map_err(ApiError::from)?;
            if swapped == 1 {
                self.redis.replicate().await.map_err(ApiError::from)?;
                return Ok(minted.issued);
            }
            // Lost to another refresh: the keys just written name tokens
            // nobody will ever hold.
            let _: usize = conn
                .del(&[access_key, refresh_key])
                .await
                .map_err(ApiError::from)?;
        }
        // Two lost races in a row: refuse, as a concurrent refresh would be.
        Err(SessionError::Superseded)
    }

    /// Deletes sessions, their current token keys and their index entries;
    /// returns how many records existed.
    async fn delete_sessions(&self, records: &[SessionRecord]) -> ApiResult<usize> {
        if records.is_empty() {
            return Ok(0);
        }
        let mut conn = self.redis.connection();
        // The records first: from then on no token of theirs resolves.
        let records_keys: Vec<String> = records
            .iter()
            .map(|record| self.session_key(record.id))
            .collect();
        let deleted: usize = conn.del(records_keys).await?;
        // One key per command, so a Cluster can route each.
        let mut pipe = redis::pipe();
        for record in records {
            pipe.cmd("DEL")
                .arg(self.access_key(&record.access_hash))
                .ignore()
                .cmd("DEL")
                .arg(self.refresh_key(&record.refresh_hash))
                .ignore()
                .cmd("ZREM")
                .arg(self.user_key(record.user_id))
                .arg(record.id.to_string())
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        self.redis.replicate().await?;
        Ok(deleted)
    }

    async fn do_revoke(&self, session_id: Uuid) -> ApiResult<bool> {
        match self.record(session_id).await? {
            Some(record) => Ok(self.delete_sessions(&[record]).await? > 0),
            None => Ok(false),
        }
    }

    async fn do_revoke_user(&self, user_id: Uuid) -> ApiResult<usize> {
        let mut conn = self.redis.connection();
        let user_key = self.user_key(user_id);
        let ids: Vec<String> = conn.zrange(&user_key, 0, -1).await?;
        if ids.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> = ids
            .iter()
            .map(|id| self.redis.key(&["sess", "s", id]))
            .collect();
        let raws: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let records = raws
            .into_iter()
            .flatten()
            .map(|raw| {
                serde_json::from_str::<SessionRecord>(&raw)
                    .map_err(|err| corrupt("session record", err))
            })
            .collect::<ApiResult<Vec<_>>>()?;
        let deleted = self.delete_sessions(&records).await?;
        // Ids of sessions that had already ended.
        let _: () = conn.zrem(&user_key, &ids).await?;
        Ok(deleted)
    }

    async fn do_put_principal(&self, snapshot: PrincipalSnapshot) -> ApiResult<bool> {
        let written: i64 = self
            .put_principal
            .key(self.principal_key(snapshot.user_id))
            .arg(padded_version(snapshot.version))
            .arg(to_json(&snapshot)?)
            .invoke_async(&mut self.redis.connection())
            .await?;
        self.redis.replicate().await?;
        Ok(written == 1)
    }

    async fn do_get_principal(&self, user_id: Uuid) -> ApiResult<Option<PrincipalSnapshot>> {
        let raw: Option<String> = self
            .redis
            .connection()
            .hget(self.principal_key(user_id), "snapshot")
            .await?;
        raw.map(|raw| serde_json::from_str(&raw).map_err(|err| corrupt("principal", err)))
            .transpose()
    }

    async fn do_delete_principal(&self, user_id: Uuid) -> ApiResult<bool> {
        let deleted: usize = self
            .redis
            .connection()
            .del(self.principal_key(user_id))
            .await?;
        self.redis.replicate().await?;
        Ok(deleted > 0)
    }

    async fn do_put_api_key(&self, hash: String, snapshot: ApiKeySnapshot) -> ApiResult<bool> {
        let now = self.rules.clock.now();
        let ttl = match snapshot.expire_time {
            // Already expired: nothing to store, nothing it could grant.
            Some(at) if at <= now => return Ok(false),
            Some(at) => ttl_ms(now, at),
            None => 0,
        };
        let written: i64 = self
            .put_api_key
            .key(self.api_key_key(&hash))
            .arg(padded_version(snapshot.version))
            .arg(to_json(&snapshot)?)
            .arg(ttl)
            .invoke_async(&mut self.redis.connection())
            .await?;
        self.redis.replicate().await?;
        Ok(written == 1)
    }

    async fn do_get_api_key(&self, secret: &str) -> ApiResult<Option<Principal>> {
        if !plausible_api_key(secret) {
            return Ok(None);
        }
        let key = self.api_key_key(&self.rules.hash_api_key(secret));
        let raw: Option<String> = self.redis.connection().hget(key, "snapshot").await?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        let snapshot: ApiKeySnapshot =
            serde_json::from_str(&raw).map_err(|err| corrupt("api key", err))?;
        Ok(snapshot.principal_at(self.rules.clock.now()))
    }

    async fn do_delete_api_key(&self, hash: String) -> ApiResult<bool> {
        let had: i64 = self
            .delete_api_key
            .key(self.api_key_key(&hash))
            .invoke_async(&mut self.redis.connection())
            .await?;
        self.redis.replicate().await?;
        Ok(had == 1)
    }
}

impl SessionStore for RedisSessionStore {
    fn create(
        &self,
        account_id: Uuid,
        user_id: Uuid,
        meta: SessionMeta,
    ) -> BoxFuture<'_, ApiResult<IssuedSession>> {
        self.do_create(account_id, user_id, meta).boxed()
    }

    fn resolve_access<'a>(
        &'a self,
        access_token: &'a str,
    ) -> BoxFuture<'a, ApiResult<Option<SessionRecord>>> {
        self.do_resolve_access(access_token).boxed()
    }

    fn refresh<'a>(
        &'a self,
        refresh_token: &'a str,
    ) -> BoxFuture<'a, Result<IssuedSession, SessionError>> {
        self.do_refresh(refresh_token).boxed()
    }

    fn get(&self, session_id: Uuid) -> BoxFuture<'_, ApiResult<Option<SessionRecord>>> {
        // The record's key lives as long as the session (idle or absolute
        // timeout, whichever comes first).
        self.record(session_id).boxed()
    }

    fn revoke(&self, session_id: Uuid) -> BoxFuture<'_, ApiResult<bool>> {
        self.do_revoke(session_id).boxed()
    }

    fn revoke_user(&self, user_id: Uuid) -> BoxFuture<'_, ApiResult<usize>> {
        self.do_revoke_user(user_id).boxed()
    }

    fn put_principal(&self, snapshot: PrincipalSnapshot) -> BoxFuture<'_, ApiResult<bool>> {
        self.do_put_principal(snapshot).boxed()
    }

    fn get_principal(&self, user_id: Uuid) -> BoxFuture<'_, ApiResult<Option<PrincipalSnapshot>>> {
        self.do_get_principal(user_id).boxed()
    }

    fn delete_principal(&self, user_id: Uuid) -> BoxFuture<'_, ApiResult<bool>> {
        self.do_delete_principal(user_id).boxed()
    }

    fn put_api_key(
        &self,
        hash: String,
        snapshot: ApiKeySnapshot,
    ) -> BoxFuture<'_, ApiResult<bool>> {
        self.do_put_api_key(hash, snapshot).boxed()
    }

    fn get_api_key<'a>(&'a self, secret: &'a str) -> BoxFuture<'a, ApiResult<Option<Principal>>> {
        self.do_get_api_key(secret).boxed()
    }

    fn delete_api_key(&self, hash: String) -> BoxFuture<'_, ApiResult<bool>> {
        self.do_delete_api_key(hash).boxed()
    }
}
