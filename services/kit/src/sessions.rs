//! Sessions (P12): opaque bearer tokens stored only as HMACs (P1), shared by
//! identity (which creates, refreshes and revokes them) and the gateway (which
//! resolves an access token to a principal on every call).
//!
//! # Model
//!
//! A sign-in creates a new session with two tokens from [`Token::try_generate`]:
//! a short-lived **access** token (`access_ttl_secs`) sent on every call, and a
//! **refresh** token that buys a new pair. Refreshing *rotates* both: the
//! presented refresh token stops working at once. A refresh token lives
//! `idle_timeout_secs` after it was issued (the idle timeout: a session nobody
//! refreshes dies), and nothing outlives the session's absolute expiry,
//! `absolute_timeout_secs` after sign-in. An access token replaced by a
//! rotation keeps working until its own (short) expiry, as in OAuth, so calls
//! in flight during a refresh do not fail; revocation ends every token of the
//! session at once, because every lookup goes through the session record.
//!
//! **Reuse detection.** Presenting a refresh token that was already rotated
//! means two parties hold it, one of them possibly a thief: the session is
//! revoked ([`SessionError::Reused`]). One exception keeps benign races from
//! signing users out (two tabs refreshing at once): the token *immediately*
//! replaced less than `reuse_grace_secs` ago is refused with
//! [`SessionError::Superseded`] and the session survives. Either way exactly
//! one refresh of a token succeeds, however many race (a Lua check-and-set on
//! the record's current refresh hash). `reuse_grace_secs = 0` turns the
//! exception off.
//!
//! **Principal snapshots.** The gateway builds a [`Principal`] from the session
//! and a [`PrincipalSnapshot`] that identity writes whenever a user's role,
//! status or permissions change (and deletes on deactivation and deletion,
//! together with [`SessionStore::revoke_user`]), so changes apply on the next
//! call without the gateway asking identity. Snapshots carry a version and a
//! stale write never replaces a newer one. A stale write landing after a
//! deletion can bring a snapshot back, but no session of that user survives
//! the `revoke_user` that goes with the deletion, so it grants nothing.
//!
//! # Redis layout
//!
//! Every key is under `redis.key_prefix` and namespaced by purpose (P5); token
//! hashes come from [`TokenHasher`] with [`TokenPurpose::SessionAccess`] or
//! [`TokenPurpose::SessionRefresh`], so one purpose's token never matches the
//! other's key.
//!
//! | key | value | TTL |
//! |---|---|---|
//! | `sess:a:<hash(access)>` | `{"sid","exp"}` JSON | until the access expiry |
//! | `sess:r:<hash(refresh)>` | `{"sid","exp"}` JSON | until the refresh expiry: min(idle, absolute) |
//! | `sess:s:<session id>` | [`SessionRecord`] JSON | until the absolute expiry |
//! | `sess:u:<user id>` | sorted set of session ids, scored by absolute expiry (ms) | the latest absolute expiry |
//! | `prn:<user id>` | hash `version` (20 digits, zero-padded) + `snapshot` ([`PrincipalSnapshot`] JSON) | none |
//! | `key:<hash(secret)>` | hash `version` + `snapshot` ([`ApiKeySnapshot`] JSON), or `revoked` | until the key's expiry, none without one |
//!
//! Token entries carry their expiry and records their absolute expiry, checked
//! against the injected [`Clock`](crate::clock::Clock) on every lookup, so a
//! key that outlives its TTL (a failover, a `PERSIST`) grants nothing. The user index is a sorted set
//! rather than a plain set so that a sign-in also prunes the ids of sessions
//! that ended, keeping it bounded. A refresh key replaced by a rotation is left
//! to expire on its own: it is what lets a later reuse find, and revoke, its
//! session. Snapshots have no TTL: a session may outlive any fixed one.
//!
//! **API keys.** Identity is the source of truth for API keys; the gateway
//! resolves a `usk_…` bearer with [`SessionStore::get_api_key`] from an
//! [`ApiKeySnapshot`] identity writes under the keyed hash of the secret
//! ([`TokenPurpose::ApiKey`], the hash identity stores in its table, so
//! identity can rewrite a snapshot without the secret). Identity writes it
//! after creating a key (and for platform keys, the operator's CLI), rewrites
//! it when the account's products change, and deletes it *before* answering a
//! revocation, so a revoked key fails on its next call. No snapshot means no
//! key (fail closed). [`SessionStore::delete_api_key`] leaves a tombstone that
//! no later [`SessionStore::put_api_key`] replaces — revocation is final — so
//! a slow rewrite that read the key before its revocation cannot bring it
//! back. Expiry is checked against the injected clock on every lookup, and
//! the Redis key expires with the API key.
//!
//! Multi-key writes are `MULTI`/`EXEC` pipelines; the rotation and the
//! versioned snapshot write are Lua scripts (check-and-set). Needs Redis 7
//! (`PEXPIRE … NX|GT`). A Redis that cannot be reached gives
//! [`ApiError::Unavailable`], never "no such session" (fail closed, P21).
//!
//! [`MemorySessionStore`] implements the same contract in process, with expiry
//! against the injected clock, for `usher dev` and unit tests; one conformance
//! suite runs against both (CONVENTIONS.md #9).

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    sync::{Arc, Mutex},
};

use chrono::{DateTime, TimeDelta, Utc};
use futures::{FutureExt, future::BoxFuture};
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    clock::SharedClock,
    config::{ConfigError, Validate},
    error::{ApiError, ApiResult, Reason},
    principal::{Principal, PrincipalKind},
    redis::Redis,
    tokens::{Token, TokenHasher, TokenPurpose},
};

/// The configuration section of [`SessionConfig`].
pub const SECTION: &str = "sessions";
/// Longest user agent kept on a session; longer ones are truncated.
pub const MAX_USER_AGENT_CHARS: usize = 512;
/// Longest client address kept on a session; longer ones are truncated.
pub const MAX_CLIENT_IP_CHARS: usize = 64;
/// Longest allowed timeout, so every duration stays far from overflow.
const MAX_TIMEOUT_SECS: u64 = 366 * 24 * 3600;
/// Longest allowed reuse grace.
const MAX_REUSE_GRACE_SECS: u64 = 60;

/// Lifetimes of sessions and their tokens (section `sessions`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Lifetime of an access token, in seconds.
    pub access_ttl_secs: u64,
    /// Lifetime of a refresh token, in seconds: a session not refreshed for
    /// this long ends (the idle timeout).
    pub idle_timeout_secs: u64,
    /// Lifetime of a session from sign-in, in seconds, however often it is
    /// refreshed (the absolute timeout).
    pub absolute_timeout_secs: u64,
    /// How long the refresh token just replaced by a rotation is refused
    /// without revoking the session (concurrent refreshes by one client), in
    /// seconds; 0 treats every reuse as theft.
    pub reuse_grace_secs: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            access_ttl_secs: 900,
            idle_timeout_secs: 7 * 24 * 3600,
            absolute_timeout_secs: 30 * 24 * 3600,
            reuse_grace_secs: 10,
        }
    }
}

impl Validate for SessionConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("access_ttl_secs", self.access_ttl_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("absolute_timeout_secs", self.absolute_timeout_secs),
        ] {
            if value == 0 || value > MAX_TIMEOUT_SECS {
                return Err(ConfigError::invalid(
                    format!("{SECTION}.{field}"),
                    format!("must be between 1 and {MAX_TIMEOUT_SECS}"),
                ));
            }
        }
        if self.access_ttl_secs > self.idle_timeout_secs {
            return Err(ConfigError::invalid(
                format!("{SECTION}.access_ttl_secs"),
                format!("must be at most {SECTION}.idle_timeout_secs"),
            ));
        }
        if self.idle_timeout_secs > self.absolute_timeout_secs {
            return Err(ConfigError::invalid(
                format!("{SECTION}.idle_timeout_secs"),
                format!("must be at most {SECTION}.absolute_timeout_secs"),
            ));
        }
        if self.reuse_grace_secs > MAX_REUSE_GRACE_SECS {
            return Err(ConfigError::invalid(
                format!("{SECTION}.reuse_grace_secs"),
                format!("must be at most {MAX_REUSE_GRACE_SECS}"),
            ));
        }
        Ok(())
    }
}

impl SessionConfig {
    fn access_ttl(&self) -> TimeDelta {
        seconds(self.access_ttl_secs)
    }

    fn idle_timeout(&self) -> TimeDelta {
        seconds(self.idle_timeout_secs)
    }

    fn absolute_timeout(&self) -> TimeDelta {
        seconds(self.absolute_timeout_secs)
    }

    fn reuse_grace(&self) -> TimeDelta {
        seconds(self.reuse_grace_secs)
    }
}

/// `at + delta`, saturating instead of panicking on an absurd (unvalidated) lifetime.
fn after(at: DateTime<Utc>, delta: TimeDelta) -> DateTime<Utc> {
    at.checked_add_signed(delta)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn seconds(secs: u64) -> TimeDelta {
    i64::try_from(secs)
        .ok()
        .and_then(TimeDelta::try_seconds)
        .unwrap_or(TimeDelta::MAX)
}

/// What identity knows about the client signing in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionMeta {
    /// The client's address, as the gateway saw it.
    pub client_ip: Option<String>,
    /// The client's `user-agent`.
    pub user_agent: Option<String>,
    /// The user must choose a new password before anything else.
    pub password_change_required: bool,
}

/// A session as stored. It holds token hashes, never tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The session id (UUID v4), the principal's `credential_id`.
    pub id: Uuid,
    /// The user's account.
    pub account_id: Uuid,
    /// The signed-in user.
    pub user_id: Uuid,
    /// When the user signed in.
    pub created_at: DateTime<Utc>,
    /// When the session ends, however often it is refreshed.
    pub absolute_expiry: DateTime<Utc>,
    /// Hash of the current access token.
    pub access_hash: String,
    /// When the current access token expires.
    pub access_expiry: DateTime<Utc>,
    /// Hash of the current refresh token: the only one that may rotate.
    pub refresh_hash: String,
    /// When the current refresh token expires (the idle timeout).
    pub refresh_expiry: DateTime<Utc>,
    /// Hash of the refresh token the last rotation replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_refresh_hash: Option<String>,
    /// When the session was last refreshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_at: Option<DateTime<Utc>>,
    /// The client's address at sign-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    /// The client's user agent at sign-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// The user must choose a new password before anything else.
    #[serde(default)]
    pub password_change_required: bool,
}

/// A new session or a rotated one, with the tokens to hand to the client
/// once. `Debug` redacts the tokens.
pub struct IssuedSession {
    /// The session as stored.
    pub record: SessionRecord,
    /// The bearer token for calls.
    pub access_token: Token,
    /// The token for [`SessionStore::refresh`].
    pub refresh_token: Token,
    /// When `access_token` expires.
    pub access_expiry: DateTime<Utc>,
    /// When `refresh_token` expires.
    pub refresh_expiry: DateTime<Utc>,
}

impl fmt::Debug for IssuedSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedSession")
            .field("record", &self.record)
            .field("access_token", &"<redacted>")
            .field("refresh_token", &"<redacted>")
            .field("access_expiry", &self.access_expiry)
            .field("refresh_expiry", &self.refresh_expiry)
            .finish()
    }
}

/// Whether a user may act, as the gateway needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserStatus {
    /// Invited, not yet accepted: cannot sign in.
    Invited,
    /// May sign in and call.
    Active,
    /// Deactivated by an administrator.
    Inactive,
}

/// What the gateway needs to build a user's [`Principal`] without asking
/// identity. Identity writes it on every change of the user's role, status or
/// permissions, with a larger `version` each time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrincipalSnapshot {
    /// The user's account.
    pub account_id: Uuid,
    /// The user.
    pub user_id: Uuid,
    /// Whether the user may act.
    pub status: UserStatus,
    /// Permissions of the user's role.
    pub permissions: Vec<String>,
    /// The user's role.
    pub role_id: Uuid,
    /// The user must choose a new password before anything else.
    pub password_change_required: bool,
    /// Increases with every change; a write with a version not above the
    /// stored one is ignored, so a slow writer cannot undo a newer change.
    pub version: u64,
}

impl PrincipalSnapshot {
    /// The principal of `session`, or `None` when the snapshot refuses it: the
    /// user is not active, or the snapshot belongs to another user or account.
    /// It carries [`must_change_password`](Self::must_change_password), so
    /// the policy refuses it every RPC not allowed before the change.
    pub fn principal_for(&self, session: &SessionRecord) -> Option<Principal> {
        if self.status != UserStatus::Active
            || self.user_id != session.user_id
            || self.account_id != session.account_id
        {
            return None;
        }
        Some(Principal {
            kind: PrincipalKind::User,
            account_id: Some(self.account_id),
            user_id: Some(self.user_id),
            credential_id: Some(session.id.to_string()),
            permissions: self.permissions.clone(),
            service: None,
            password_change_required: self.must_change_password(session),
        })
    }

    /// Whether the user must change their password before anything else.
    pub fn must_change_password(&self, session: &SessionRecord) -> bool {
        self.password_change_required || session.password_change_required
    }
}

/// What the gateway needs to build an API key's [`Principal`] without asking
/// identity, stored under the keyed hash of the key's secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeySnapshot {
    /// The key's id, the principal's `credential_id`.
    pub key_id: Uuid,
    /// The key's account; `None` for a platform key.
    pub account_id: Option<Uuid>,
    /// A platform key (created by operators): a PLATFORM principal.
    pub platform: bool,
    /// The key's permissions, without those of products the account no
    /// longer has.
    pub permissions: Vec<String>,
    /// When the key stops working, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_time: Option<DateTime<Utc>>,
    /// Increases with every rewrite; a write with a version not above the
    /// stored one is ignored.
    pub version: u64,
}

impl ApiKeySnapshot {
    /// The principal of the key at `now`; `None` once it expired, or for an
    /// account key without an account.
    pub fn principal_at(&self, now: DateTime<Utc>) -> Option<Principal> {
        if self.expire_time.is_some_and(|at| at <= now) {
            return None;
        }
        let (kind, account_id) = if self.platform {
            (PrincipalKind::Platform, None)
        } else {
            (PrincipalKind::ApiKey, Some(self.account_id?))
        };
        Some(Principal {
            kind,
            account_id,
            user_id: None,
            credential_id: Some(self.key_id.to_string()),
            permissions: self.permissions.clone(),
            service: None,
            password_change_required: false,
        })
    }
}

/// Longest API key secret looked up; anything longer is no key of ours.
pub const MAX_API_KEY_CHARS: usize = 128;

/// Whether `secret` may be an API key secret at all (prefix, length).
fn plausible_api_key(secret: &str) -> bool {
    secret.starts_with(crate::tokens::API_KEY_PREFIX) && secret.chars().count() <= MAX_API_KEY_CHARS
}

/// Why a refresh failed. Outward, all of them are one `UNAUTHENTICATED`
/// answer (see the `From` impl); the variants are for logs and audit.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Unknown, expired, or of a session that ended.
    #[error("refresh token not usable")]
    NotUsable,
    /// Replaced by a concurrent refresh moments ago; the session lives on.
    #[error("refresh token already rotated")]
    Superseded,
    /// Presented after it was rotated: the session was revoked.
    #[error("refresh token reused, session revoked")]
    Reused {
        /// The revoked session.
        session_id: Uuid,
        /// Its user.
        user_id: Uuid,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] ApiError),
}

impl From<SessionError> for ApiError {
    fn from(err: SessionError) -> Self {
        match err {
            SessionError::Store(err) => err,
            SessionError::NotUsable | SessionError::Superseded | SessionError::Reused { .. } => {
                ApiError::rejected(Reason::Unauthenticated, "session not usable")
            }
        }
    }
}

/// Where sessions and principal snapshots live.
pub trait SessionStore: Send + Sync + fmt::Debug {
    /// Creates a new session for a sign-in (never reuses one, P12).
    fn create(
        &self,
        account_id: Uuid,
        user_id: Uuid,
        meta: SessionMeta,
    ) -> BoxFuture<'_, ApiResult<IssuedSession>>;

    /// The session of an access token; `None` for an unknown or expired token
    /// or an ended session.
    fn resolve_access<'a>(
        &'a self,
        access_token: &'a str,
    ) -> BoxFuture<'a, ApiResult<Option<SessionRecord>>>;

    /// Rotates the session of `refresh_token`: a new access and refresh
    /// token, the presented one dead. Of any number of concurrent calls with
    /// one token, exactly one succeeds.
    fn refresh<'a>(
        &'a self,
        refresh_token: &'a str,
    ) -> BoxFuture<'a, Result<IssuedSession, SessionError>>;

    /// The live session with this id (for its expiry), if it has not ended.
    fn get(&self, session_id: Uuid) -> BoxFuture<'_, ApiResult<Option<SessionRecord>>>;

    /// Ends a session (sign-out); `false` when there was none.
    fn revoke(&self, session_id: Uuid) -> BoxFuture<'_, ApiResult<bool>>;

    /// Ends every session of a user (deactivation, deletion, password
    /// change) and returns how many there were. A session created while this
    /// runs may survive: callers change the user first.
    fn revoke_user(&self, user_id: Uuid) -> BoxFuture<'_, ApiResult<usize>>;

    /// Stores a snapshot unless one with the same or a newer version is
    /// stored; returns whether it was written.
    fn put_principal(&self, snapshot: PrincipalSnapshot) -> BoxFuture<'_, ApiResult<bool>>;

    /// The snapshot of a user.
    fn get_principal(&self, user_id: Uuid) -> BoxFuture<'_, ApiResult<Option<PrincipalSnapshot>>>;

    /// Deletes the snapshot of a user; returns whether there was one.
    fn delete_principal(&self, user_id: Uuid) -> BoxFuture<'_, ApiResult<bool>>;

    /// Stores the snapshot of the API key whose secret hashes to `hash`
    /// ([`TokenPurpose::ApiKey`]) unless one with the same or a newer version
    /// is stored or the key was deleted; returns whether it was written.
    fn put_api_key(&self, hash: String, snapshot: ApiKeySnapshot)
    -> BoxFuture<'_, ApiResult<bool>>;

    /// The principal of an API key secret: `None` for an unknown, deleted
    /// (revoked) or expired key.
    fn get_api_key<'a>(&'a self, secret: &'a str) -> BoxFuture<'a, ApiResult<Option<Principal>>>;

    /// Revokes the API key whose secret hashes to `hash`: its snapshot is
    /// replaced by a tombstone no later put replaces. Returns whether a
    /// snapshot was there.
    fn delete_api_key(&self, hash: String) -> BoxFuture<'_, ApiResult<bool>>;
}

/// A shareable session store.
pub type SharedSessionStore = Arc<dyn SessionStore>;

/// What a token key points to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct TokenEntry {
    sid: Uuid,
    #[serde(with = "chrono::serde::ts_milliseconds")]
    exp: DateTime<Utc>,
}

/// A new token pair and the record that goes with it.
struct Minted {
    issued: IssuedSession,
}

impl Minted {
    fn record(&self) -> &SessionRecord {
        &self.issued.record
    }

    fn access_entry(&self) -> TokenEntry {
        TokenEntry {
            sid: self.record().id,
            exp: self.record().access_expiry,
        }
    }

    fn refresh_entry(&self) -> TokenEntry {
        TokenEntry {
            sid: self.record().id,
            exp: self.record().refresh_expiry,
        }
    }
}

/// Why a presented refresh token is not the current one.
enum Stale {
    Superseded,
    Reused,
}

/// What both backends share: lifetimes, hashing, and the rules.
struct Rules {
    config: SessionConfig,
    hasher: TokenHasher,
    clock: SharedClock,
}

impl Rules {
    fn hash_access(&self, token: &str) -> String {
        self.hasher.hash(TokenPurpose::SessionAccess, token)
    }

    fn hash_refresh(&self, token: &str) -> String {
        self.hasher.hash(TokenPurpose::SessionRefresh, token)
    }

    fn hash_api_key(&self, secret: &str) -> String {
        self.hasher.hash(TokenPurpose::ApiKey, secret)
    }

    /// A new token pair for `record`, whose id, owner, start and absolute
    /// expiry are kept.
    fn mint(&self, now: DateTime<Utc>, mut record: SessionRecord) -> ApiResult<Minted> {
        // Without entropy no token may be issued: fail the call, not the process.
        let access_token = Token::try_generate().map_err(anyhow::Error::new)?;
        let refresh_token = Token::try_generate().map_err(anyhow::Error::new)?;
        let access_expiry = after(now, self.config.access_ttl()).min(record.absolute_expiry);
        let refresh_expiry = after(now, self.config.idle_timeout()).min(record.absolute_expiry);
        record.access_hash = self.hash_access(access_token.as_str());
        record.access_expiry = access_expiry;
        record.refresh_hash = self.hash_refresh(refresh_token.as_str());
        record.refresh_expiry = refresh_expiry;
        Ok(Minted {
            issued: IssuedSession {
                record,
                access_token,
                refresh_token,
                access_expiry,
                refresh_expiry,
            },
        })
    }

    fn start(&self, account_id: Uuid, user_id: Uuid, meta: SessionMeta) -> ApiResult<Minted> {
        let now = self.clock.now();
        let record = SessionRecord {
            id: Uuid::new_v4(),
            account_id,
            user_id,
            created_at: now,
            absolute_expiry: after(now, self.config.absolute_timeout()),
            access_hash: String::new(),
            access_expiry: now,
            refresh_hash: String::new(),
            refresh_expiry: now,
            previous_refresh_hash: None,
            rotated_at: None,
            client_ip: meta.client_ip.map(|ip| truncate(ip, MAX_CLIENT_IP_CHARS)),
            user_agent: meta.user_agent.map(|ua| truncate(ua, MAX_USER_AGENT_CHARS)),
            password_change_required: meta.password_change_required,
        };
        self.mint(now, record)
    }

    fn rotate(&self, now: DateTime<Utc>, current: &SessionRecord) -> ApiResult<Minted> {
        let mut record = current.clone();
        record.previous_refresh_hash = Some(current.refresh_hash.clone());
        record.rotated_at = Some(now);
        self.mint(now, record)
    }

    /// Whether `record`, found through a token key, may still be used.
    fn live(now: DateTime<Utc>, record: &SessionRecord) -> bool {
        record.absolute_expiry > now
    }

    /// Judges a refresh token that is not the session's current one.
    fn judge_stale(&self, now: DateTime<Utc>, record: &SessionRecord, hash: &str) -> Stale {
        let just_replaced = record.previous_refresh_hash.as_deref() == Some(hash)
            && record
                .rotated_at
                .is_some_and(|at| now < after(at, self.config.reuse_grace()));
        if just_replaced {
            Stale::Superseded
        } else {
            Stale::Reused
        }
    }
}

impl fmt::Debug for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rules")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn truncate(mut value: String, max_chars: usize) -> String {
    if let Some((at, _)) = value.char_indices().nth(max_chars) {
        value.truncate(at);
    }
    value
}

fn reuse_detected(record: &SessionRecord) -> SessionError {
    tracing::warn!(
        session_id = %record.id,
        user_id = %record.user_id,
        account_id = %record.account_id,
        "refresh token reuse detected, session revoked"
    );
    SessionError::Reused {
        session_id: record.id,
        user_id: record.user_id,
    }
}

fn corrupt(what: &str, err: serde_json::Error) -> ApiError {
    ApiError::Internal(anyhow::Error::new(err).context(format!("corrupt {what} in session store")))
}

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

/// Swaps in a rotated record, and the new token keys, only while the record
/// still holds the refresh hash the caller rotated from.
const ROTATE_SCRIPT: &str = r"
-- KEYS: session record, new access key, new refresh key
-- ARGV: expected refresh hash, record, record ttl ms,
--       access entry, access ttl ms, refresh entry, refresh ttl ms
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if cjson.decode(current)['refresh_hash'] ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[7])
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
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.session_key(record.id))
            .arg(to_json(record)?)
            .arg("PX")
            .arg(session_ttl)
            .ignore()
            .cmd("SET")
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
        pipe.query_async::<()>(&mut self.redis.connection()).await?;
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
            let swapped: i64 = self
                .rotate
                .key(self.session_key(rotated.id))
                .key(self.access_key(&rotated.access_hash))
                .key(self.refresh_key(&rotated.refresh_hash))
                .arg(&hash)
                .arg(to_json(rotated)?)
                .arg(ttl_ms(now, rotated.absolute_expiry))
                .arg(to_json(&minted.access_entry())?)
                .arg(ttl_ms(now, rotated.access_expiry))
                .arg(to_json(&minted.refresh_entry())?)
                .arg(ttl_ms(now, rotated.refresh_expiry))
                .invoke_async(&mut self.redis.connection())
                .await
                .map_err(ApiError::from)?;
            if swapped == 1 {
                return Ok(minted.issued);
            }
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
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("DEL");
        for record in records {
            pipe.arg(self.session_key(record.id));
        }
        pipe.cmd("DEL");
        for record in records {
            pipe.arg(self.access_key(&record.access_hash))
                .arg(self.refresh_key(&record.refresh_hash));
        }
        pipe.ignore();
        for record in records {
            pipe.cmd("ZREM")
                .arg(self.user_key(record.user_id))
                .arg(record.id.to_string())
                .ignore();
        }
        let (deleted,): (usize,) = pipe.query_async(&mut self.redis.connection()).await?;
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

/// The in-process state of [`MemorySessionStore`], mirroring the Redis keys.
#[derive(Default)]
struct Memory {
    access: HashMap<String, TokenEntry>,
    refresh: HashMap<String, TokenEntry>,
    sessions: HashMap<Uuid, SessionRecord>,
    by_user: HashMap<Uuid, BTreeSet<Uuid>>,
    principals: HashMap<Uuid, PrincipalSnapshot>,
    /// API key snapshots by secret hash; `None` is a revocation's tombstone.
    api_keys: HashMap<String, Option<ApiKeySnapshot>>,
}

impl Memory {
    /// Drops what Redis would have expired by `now`.
    fn sweep(&mut self, now: DateTime<Utc>) {
        self.access.retain(|_, entry| entry.exp > now);
        self.refresh.retain(|_, entry| entry.exp > now);
        self.sessions.retain(|_, record| Rules::live(now, record));
        let sessions = &self.sessions;
        self.by_user.retain(|_, ids| {
            ids.retain(|id| sessions.contains_key(id));
            !ids.is_empty()
        });
    }

    fn live_session(&self, now: DateTime<Utc>, id: Uuid) -> Option<&SessionRecord> {
        self.sessions
            .get(&id)
            .filter(|record| Rules::live(now, record))
    }

    fn remove_session(&mut self, id: Uuid) -> bool {
        let Some(record) = self.sessions.remove(&id) else {
            return false;
        };
        self.access.remove(&record.access_hash);
        self.refresh.remove(&record.refresh_hash);
        if let Some(ids) = self.by_user.get_mut(&record.user_id) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_user.remove(&record.user_id);
            }
        }
        true
    }

    fn insert(&mut self, minted: &Minted) {
        let record = minted.record().clone();
        self.access
            .insert(record.access_hash.clone(), minted.access_entry());
        self.refresh
            .insert(record.refresh_hash.clone(), minted.refresh_entry());
        self.by_user
            .entry(record.user_id)
            .or_default()
            .insert(record.id);
        self.sessions.insert(record.id, record);
    }
}

/// Sessions in process memory, for `usher dev` and tests. Expiry follows the
/// injected clock; one lock makes every operation atomic.
pub struct MemorySessionStore {
    rules: Rules,
    state: Mutex<Memory>,
}

impl fmt::Debug for MemorySessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySessionStore")
            .field("config", &self.rules.config)
            .finish_non_exhaustive()
    }
}

impl MemorySessionStore {
    /// An empty store, hashing tokens with `hasher` and reading time from
    /// `clock`. `config` is expected to be validated.
    pub fn new(config: SessionConfig, hasher: TokenHasher, clock: SharedClock) -> Self {
        Self {
            rules: Rules {
                config,
                hasher,
                clock,
            },
            state: Mutex::new(Memory::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Memory> {
        // The state stays consistent across a panic: every change is made
        // after all checks, under the lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn do_create(
        &self,
        account_id: Uuid,
        user_id: Uuid,
        meta: SessionMeta,
    ) -> ApiResult<IssuedSession> {
        let minted = self.rules.start(account_id, user_id, meta)?;
        let mut state = self.state();
        state.sweep(minted.record().created_at);
        state.insert(&minted);
        Ok(minted.issued)
    }

    fn do_resolve_access(&self, access_token: &str) -> Option<SessionRecord> {
        let now = self.rules.clock.now();
        let hash = self.rules.hash_access(access_token);
        let state = self.state();
        let entry = state.access.get(&hash).filter(|entry| entry.exp > now)?;
        state.live_session(now, entry.sid).cloned()
    }

    fn do_refresh(&self, refresh_token: &str) -> Result<IssuedSession, SessionError> {
        let now = self.rules.clock.now();
        let hash = self.rules.hash_refresh(refresh_token);
        let mut state = self.state();
        let sid = state
            .refresh
            .get(&hash)
            .filter(|entry| entry.exp > now)
            .ok_or(SessionError::NotUsable)?
            .sid;
        let record = state
            .live_session(now, sid)
            .cloned()
            .ok_or(SessionError::NotUsable)?;
        if record.refresh_hash != hash {
            return match self.rules.judge_stale(now, &record, &hash) {
                Stale::Superseded => Err(SessionError::Superseded),
                Stale::Reused => {
                    state.remove_session(record.id);
                    Err(reuse_detected(&record))
                }
            };
        }
        let minted = self.rules.rotate(now, &record)?;
        state.insert(&minted);
        Ok(minted.issued)
    }

    fn do_revoke(&self, session_id: Uuid) -> bool {
        let mut state = self.state();
        state.sweep(self.rules.clock.now());
        state.remove_session(session_id)
    }

    fn do_revoke_user(&self, user_id: Uuid) -> usize {
        let mut state = self.state();
        state.sweep(self.rules.clock.now());
        let ids = state.by_user.remove(&user_id).unwrap_or_default();
        ids.into_iter()
            .filter(|id| state.remove_session(*id))
            .count()
    }

    fn do_put_api_key(&self, hash: String, snapshot: ApiKeySnapshot) -> bool {
        if snapshot
            .expire_time
            .is_some_and(|at| at <= self.rules.clock.now())
        {
            return false;
        }
        let mut state = self.state();
        match state.api_keys.get(&hash) {
            Some(None) => false,
            Some(Some(stored)) if stored.version >= snapshot.version => false,
            _ => {
                state.api_keys.insert(hash, Some(snapshot));
                true
            }
        }
    }

    fn do_get_api_key(&self, secret: &str) -> Option<Principal> {
        if !plausible_api_key(secret) {
            return None;
        }
        let hash = self.rules.hash_api_key(secret);
        let now = self.rules.clock.now();
        self.state()
            .api_keys
            .get(&hash)?
            .as_ref()?
            .principal_at(now)
    }

    fn do_delete_api_key(&self, hash: String) -> bool {
        matches!(self.state().api_keys.insert(hash, None), Some(Some(_)))
    }

    fn do_put_principal(&self, snapshot: PrincipalSnapshot) -> bool {
        let mut state = self.state();
        match state.principals.get(&snapshot.user_id) {
            Some(stored) if stored.version >= snapshot.version => false,
            _ => {
                state.principals.insert(snapshot.user_id, snapshot);
                true
            }
        }
    }
}

impl SessionStore for MemorySessionStore {
    fn create(
        &self,
        account_id: Uuid,
        user_id: Uuid,
        meta: SessionMeta,
    ) -> BoxFuture<'_, ApiResult<IssuedSession>> {
        let issued = self.do_create(account_id, user_id, meta);
        async move { issued }.boxed()
    }

    fn resolve_access<'a>(
        &'a self,
        access_token: &'a str,
    ) -> BoxFuture<'a, ApiResult<Option<SessionRecord>>> {
        let record = self.do_resolve_access(access_token);
        async move { Ok(record) }.boxed()
    }

    fn refresh<'a>(
        &'a self,
        refresh_token: &'a str,
    ) -> BoxFuture<'a, Result<IssuedSession, SessionError>> {
        let result = self.do_refresh(refresh_token);
        async move { result }.boxed()
    }

    fn get(&self, session_id: Uuid) -> BoxFuture<'_, ApiResult<Option<SessionRecord>>> {
        let now = self.rules.clock.now();
        let record = self.state().live_session(now, session_id).cloned();
        async move { Ok(record) }.boxed()
    }

    fn revoke(&self, session_id: Uuid) -> BoxFuture<'_, ApiResult<bool>> {
        let removed = self.do_revoke(session_id);
        async move { Ok(removed) }.boxed()
    }

    fn revoke_user(&self, user_id: Uuid) -> BoxFuture<'_, ApiResult<usize>> {
        let count = self.do_revoke_user(user_id);
        async move { Ok(count) }.boxed()
    }

    fn put_principal(&self, snapshot: PrincipalSnapshot) -> BoxFuture<'_, ApiResult<bool>> {
        let written = self.do_put_principal(snapshot);
        async move { Ok(written) }.boxed()
    }

    fn get_principal(&self, user_id: Uuid) -> BoxFuture<'_, ApiResult<Option<PrincipalSnapshot>>> {
        let snapshot = self.state().principals.get(&user_id).cloned();
        async move { Ok(snapshot) }.boxed()
    }

    fn delete_principal(&self, user_id: Uuid) -> BoxFuture<'_, ApiResult<bool>> {
        let deleted = self.state().principals.remove(&user_id).is_some();
        async move { Ok(deleted) }.boxed()
    }

    fn put_api_key(
        &self,
        hash: String,
        snapshot: ApiKeySnapshot,
    ) -> BoxFuture<'_, ApiResult<bool>> {
        let written = self.do_put_api_key(hash, snapshot);
        async move { Ok(written) }.boxed()
    }

    fn get_api_key<'a>(&'a self, secret: &'a str) -> BoxFuture<'a, ApiResult<Option<Principal>>> {
        let principal = self.do_get_api_key(secret);
        async move { Ok(principal) }.boxed()
    }

    fn delete_api_key(&self, hash: String) -> BoxFuture<'_, ApiResult<bool>> {
        let had = self.do_delete_api_key(hash);
        async move { Ok(had) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::panic::AssertUnwindSafe;

    use chrono::Duration;

    use super::*;
    use crate::{
        clock::{ManualClock, SystemClock},
        config::{RedisConfig, Secret},
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
            let clock = ManualClock::new(start());
            let redis = test_redis();
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

    /// Every key under the harness prefix.
    async fn keys(redis: &Redis) -> Vec<String> {
        let pattern = redis.key(&["*"]);
        let mut conn = redis.connection();
        let mut cursor = 0_u64;
        let mut found = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1_000)
                .query_async(&mut conn)
                .await
                .expect("scan");
            found.extend(batch);
            if next == 0 {
                return found;
            }
            cursor = next;
        }
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

    /// The cases, written once against [`SessionStore`].
    mod suite {
        use super::*;

        fn meta() -> SessionMeta {
            SessionMeta {
                client_ip: Some("203.0.113.7".into()),
                user_agent: Some("usher-test/1.0".into()),
                password_change_required: true,
            }
        }

        async fn sign_in(h: &Harness, user_id: Uuid) -> IssuedSession {
            h.store
                .create(Uuid::new_v4(), user_id, meta())
                .await
                .expect("create")
        }

        async fn resolve(h: &Harness, token: &Token) -> Option<SessionRecord> {
            h.store
                .resolve_access(token.as_str())
                .await
                .expect("resolve")
        }

        async fn refresh(h: &Harness, token: &Token) -> Result<IssuedSession, SessionError> {
            h.store.refresh(token.as_str()).await
        }

        fn assert_not_usable(result: Result<IssuedSession, SessionError>) {
            assert!(
                matches!(result, Err(SessionError::NotUsable)),
                "expected NotUsable, got {result:?}"
            );
        }

        pub(super) async fn create_then_resolve(h: &Harness) {
            let (account_id, user_id) = (Uuid::new_v4(), Uuid::new_v4());
            let issued = h
                .store
                .create(account_id, user_id, meta())
                .await
                .expect("create");
            let record = &issued.record;
            assert_eq!((record.account_id, record.user_id), (account_id, user_id));
            assert_eq!(record.id.get_version_num(), 4);
            assert_eq!(record.created_at, start());
            assert_eq!(issued.access_expiry, start() + h.config.access_ttl());
            assert_eq!(issued.refresh_expiry, start() + h.config.idle_timeout());
            assert_eq!(
                record.absolute_expiry,
                start() + h.config.absolute_timeout()
            );
            assert_eq!(record.client_ip.as_deref(), Some("203.0.113.7"));
            assert_eq!(record.user_agent.as_deref(), Some("usher-test/1.0"));
            assert!(record.password_change_required);
            assert_ne!(issued.access_token.as_str(), issued.refresh_token.as_str());

            assert_eq!(
                resolve(h, &issued.access_token).await.as_ref(),
                Some(record)
            );
            // A refresh token is no access token (P5), and guesses find nothing.
            assert_eq!(resolve(h, &issued.refresh_token).await, None);
            assert_eq!(
                h.store
                    .resolve_access("not-a-token")
                    .await
                    .expect("resolve"),
                None
            );

            // Every sign-in is a new session.
            let again = h
                .store
                .create(account_id, user_id, SessionMeta::default())
                .await
                .expect("create");
            assert_ne!(again.record.id, record.id);
            assert_eq!(again.record.client_ip, None);
        }

        pub(super) async fn access_token_expires(h: &Harness) {
            let issued = sign_in(h, Uuid::new_v4()).await;
            let ttl = i64::try_from(h.config.access_ttl_secs).expect("small");
            h.advance(ttl - 1);
            assert!(resolve(h, &issued.access_token).await.is_some());
            h.advance(1);
            assert_eq!(resolve(h, &issued.access_token).await, None);
            // The session lives on: a refresh gives a working access token.
            let refreshed = refresh(h, &issued.refresh_token).await.expect("refresh");
            assert!(resolve(h, &refreshed.access_token).await.is_some());
        }

        pub(super) async fn refresh_rotates_tokens(h: &Harness) {
            let first = sign_in(h, Uuid::new_v4()).await;
            h.advance(60);
            let second = refresh(h, &first.refresh_token).await.expect("refresh");
            let record = &second.record;
            assert_eq!(record.id, first.record.id);
            assert_eq!(record.created_at, first.record.created_at);
            assert_eq!(record.absolute_expiry, first.record.absolute_expiry);
            assert_eq!(record.rotated_at, Some(start() + secs(60)));
            assert_eq!(
                record.previous_refresh_hash.as_deref(),
                Some(first.record.refresh_hash.as_str())
            );
            assert_eq!(
                second.access_expiry,
                start() + secs(60) + h.config.access_ttl()
            );
            assert_eq!(
                second.refresh_expiry,
                start() + secs(60) + h.config.idle_timeout()
            );
            assert_ne!(second.access_token.as_str(), first.access_token.as_str());
            assert_ne!(second.refresh_token.as_str(), first.refresh_token.as_str());
            assert_eq!(
                resolve(h, &second.access_token).await.as_ref(),
                Some(record)
            );

            // The old refresh token is dead; within the grace the session survives.
            assert!(matches!(
                refresh(h, &first.refresh_token).await,
                Err(SessionError::Superseded)
            ));
            let third = refresh(h, &second.refresh_token).await.expect("refresh");
            assert!(resolve(h, &third.access_token).await.is_some());

            // A replaced access token works until its own expiry, no longer.
            assert!(resolve(h, &first.access_token).await.is_some());
            h.advance(i64::try_from(h.config.access_ttl_secs).expect("small") - 60);
            assert_eq!(resolve(h, &first.access_token).await, None);
            assert!(resolve(h, &third.access_token).await.is_some());
        }

        pub(super) async fn refresh_reuse_revokes_session(h: &Harness) {
            let user_id = Uuid::new_v4();
            let first = sign_in(h, user_id).await;
            let second = refresh(h, &first.refresh_token).await.expect("refresh");
            h.advance(i64::try_from(h.config.reuse_grace_secs).expect("small") + 1);
            match refresh(h, &first.refresh_token).await {
                Err(SessionError::Reused {
                    session_id,
                    user_id: reused_by,
                }) => {
                    assert_eq!((session_id, reused_by), (first.record.id, user_id));
                }
                other => panic!("expected Reused, got {other:?}"),
            }
            // Every token of the session is dead, the thief's and the owner's.
            assert_eq!(resolve(h, &second.access_token).await, None);
            assert_eq!(resolve(h, &first.access_token).await, None);
            assert_not_usable(refresh(h, &second.refresh_token).await);
            assert_not_usable(refresh(h, &first.refresh_token).await);
        }

        pub(super) async fn older_refresh_token_revokes_even_within_grace(h: &Harness) {
            let first = sign_in(h, Uuid::new_v4()).await;
            let second = refresh(h, &first.refresh_token).await.expect("refresh");
            let third = refresh(h, &second.refresh_token).await.expect("refresh");
            // Only the token replaced last enjoys the grace.
            assert!(matches!(
                refresh(h, &first.refresh_token).await,
                Err(SessionError::Reused { .. })
            ));
            assert_eq!(resolve(h, &third.access_token).await, None);
            assert_not_usable(refresh(h, &third.refresh_token).await);
        }

        async fn race(h: &Harness, token: &Token) -> Vec<Result<IssuedSession, SessionError>> {
            let tasks: Vec<_> = (0..16)
                .map(|_| {
                    let store = h.store.clone();
                    let token = token.as_str().to_owned();
                    tokio::spawn(async move { store.refresh(&token).await })
                })
                .collect();
            futures::future::join_all(tasks)
                .await
                .into_iter()
                .map(|joined| joined.expect("task"))
                .collect()
        }

        pub(super) async fn concurrent_refreshes_have_one_winner(h: &Harness) {
            let issued = sign_in(h, Uuid::new_v4()).await;
            let (winners, losers): (Vec<_>, Vec<_>) = race(h, &issued.refresh_token)
                .await
                .into_iter()
                .partition(Result::is_ok);
            assert_eq!(winners.len(), 1, "exactly one refresh wins");
            for loser in &losers {
                assert!(
                    matches!(loser, Err(SessionError::Superseded)),
                    "losers are refused without revoking: {loser:?}"
                );
            }
            let winner = winners.into_iter().next().expect("one").expect("winner");
            assert!(resolve(h, &winner.access_token).await.is_some());
            refresh(h, &winner.refresh_token)
                .await
                .expect("the winner's refresh token works");
        }

        pub(super) async fn concurrent_refreshes_without_grace_revoke(h: &Harness) {
            let issued = sign_in(h, Uuid::new_v4()).await;
            let results = race(h, &issued.refresh_token).await;
            let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            assert_eq!(winners.len(), 1, "exactly one refresh wins");
            let mut reused = 0;
            for result in &results {
                match result {
                    Ok(_) => {}
                    Err(SessionError::Reused { .. }) => reused += 1,
                    Err(SessionError::NotUsable) => {}
                    Err(other) => panic!("unexpected {other:?}"),
                }
            }
            assert!(reused >= 1, "a reuse was detected");
            // Strict mode: the reuse revoked the session, the winner's tokens too.
            assert_eq!(resolve(h, &winners[0].access_token).await, None);
        }

        pub(super) async fn idle_timeout_ends_unrefreshed_session(h: &Harness) {
            let idle = i64::try_from(h.config.idle_timeout_secs).expect("small");
            let first = sign_in(h, Uuid::new_v4()).await;
            // Refreshing in time keeps the session beyond one idle period…
            h.advance(idle - 1);
            let second = refresh(h, &first.refresh_token).await.expect("refresh");
            h.advance(idle - 1);
            let third = refresh(h, &second.refresh_token).await.expect("refresh");
            // …not refreshing ends it.
            h.advance(idle);
            assert_not_usable(refresh(h, &third.refresh_token).await);
        }

        pub(super) async fn absolute_timeout_caps_refresh(h: &Harness) {
            let first = sign_in(h, Uuid::new_v4()).await;
            let absolute = start() + secs(150);
            assert_eq!(first.record.absolute_expiry, absolute);
            h.advance(90);
            let second = refresh(h, &first.refresh_token).await.expect("refresh");
            // Idle would allow 90 + 100 s; the absolute expiry wins.
            assert_eq!(second.refresh_expiry, absolute);
            assert!(second.access_expiry <= absolute);
            assert_eq!(second.record.absolute_expiry, absolute);
            h.advance(59);
            assert!(resolve(h, &second.access_token).await.is_some());
            h.advance(1);
            assert_eq!(resolve(h, &second.access_token).await, None);
            assert_not_usable(refresh(h, &second.refresh_token).await);
        }

        pub(super) async fn revoke_ends_one_session(h: &Harness) {
            let user_id = Uuid::new_v4();
            let first = sign_in(h, user_id).await;
            let second = sign_in(h, user_id).await;
            assert!(h.store.revoke(first.record.id).await.expect("revoke"));
            assert_eq!(resolve(h, &first.access_token).await, None);
            assert_not_usable(refresh(h, &first.refresh_token).await);
            assert!(resolve(h, &second.access_token).await.is_some());
            assert!(!h.store.revoke(first.record.id).await.expect("revoke"));
            assert!(!h.store.revoke(Uuid::new_v4()).await.expect("revoke"));
        }

        pub(super) async fn a_live_session_is_found_by_id(h: &Harness) {
            let signed_in = sign_in(h, Uuid::new_v4()).await;
            let id = signed_in.record.id;
            let found = h.store.get(id).await.expect("get").expect("live");
            assert_eq!(found.absolute_expiry, signed_in.record.absolute_expiry);
            assert_eq!(found.user_id, signed_in.record.user_id);
            assert!(h.store.revoke(id).await.expect("revoke"));
            assert_eq!(h.store.get(id).await.expect("get"), None);
            assert_eq!(h.store.get(Uuid::new_v4()).await.expect("get"), None);
        }

        pub(super) async fn revoke_user_ends_all_sessions_of_user(h: &Harness) {
            let (user, other) = (Uuid::new_v4(), Uuid::new_v4());
            let first = sign_in(h, user).await;
            let second = sign_in(h, user).await;
            let third = sign_in(h, user).await;
            let bystander = sign_in(h, other).await;
            // A rotated session is found through the index too.
            let rotated = refresh(h, &third.refresh_token).await.expect("refresh");

            assert_eq!(h.store.revoke_user(user).await.expect("revoke"), 3);
            for issued in [&first, &second, &rotated] {
                assert_eq!(resolve(h, &issued.access_token).await, None);
                assert_not_usable(refresh(h, &issued.refresh_token).await);
            }
            assert_eq!(resolve(h, &third.access_token).await, None);
            assert!(resolve(h, &bystander.access_token).await.is_some());
            assert_eq!(h.store.revoke_user(user).await.expect("revoke"), 0);
            refresh(h, &bystander.refresh_token)
                .await
                .expect("another user's session is untouched");
        }

        pub(super) async fn principal_snapshots_are_versioned(h: &Harness) {
            let issued = sign_in(h, Uuid::new_v4()).await;
            let user_id = issued.record.user_id;
            assert_eq!(h.store.get_principal(user_id).await.expect("get"), None);
            let v1 = PrincipalSnapshot {
                account_id: issued.record.account_id,
                user_id,
                status: UserStatus::Active,
                permissions: vec!["users.read".into()],
                role_id: Uuid::new_v4(),
                password_change_required: false,
                version: 1,
            };
            let v2 = PrincipalSnapshot {
                permissions: vec!["users.read".into(), "users.manage".into()],
                // Beyond 2^53: compared exactly, not as a Lua double.
                version: (1 << 60) + 1,
                ..v1.clone()
            };
            let stale = PrincipalSnapshot {
                status: UserStatus::Inactive,
                version: 1 << 60,
                ..v1.clone()
            };
            assert!(h.store.put_principal(v1.clone()).await.expect("put"));
            assert_eq!(
                h.store.get_principal(user_id).await.expect("get"),
                Some(v1.clone())
            );
            assert!(h.store.put_principal(v2.clone()).await.expect("put"));
            assert!(!h.store.put_principal(stale).await.expect("put"));
            assert!(!h.store.put_principal(v2.clone()).await.expect("put"));
            let stored = h.store.get_principal(user_id).await.expect("get");
            assert_eq!(stored.as_ref(), Some(&v2));
            let principal = v2.principal_for(&issued.record).expect("active");
            assert_eq!(principal.permissions, ["users.read", "users.manage"]);
            assert_eq!(principal.credential_id, Some(issued.record.id.to_string()));

            assert!(h.store.delete_principal(user_id).await.expect("delete"));
            assert_eq!(h.store.get_principal(user_id).await.expect("get"), None);
            assert!(!h.store.delete_principal(user_id).await.expect("delete"));
            // Another user's snapshot is unaffected by all of this.
            assert_eq!(
                h.store.get_principal(Uuid::new_v4()).await.expect("get"),
                None
            );
        }

        fn api_key(secret: &Token, platform: bool) -> (String, ApiKeySnapshot) {
            (
                hasher().hash(TokenPurpose::ApiKey, secret.as_str()),
                ApiKeySnapshot {
                    key_id: Uuid::new_v4(),
                    account_id: (!platform).then(Uuid::new_v4),
                    platform,
                    permissions: if platform {
                        Vec::new()
                    } else {
                        vec!["users.read".into()]
                    },
                    expire_time: None,
                    version: 1,
                },
            )
        }

        fn new_secret() -> Token {
            Token::try_generate_with_prefix(crate::tokens::API_KEY_PREFIX).expect("entropy")
        }

        pub(super) async fn api_key_snapshots_resolve_to_principals(h: &Harness) {
            let secret = new_secret();
            let (hash, v1) = api_key(&secret, false);
            assert_eq!(
                h.store.get_api_key(secret.as_str()).await.expect("get"),
                None
            );
            assert!(
                h.store
                    .put_api_key(hash.clone(), v1.clone())
                    .await
                    .expect("put")
            );
            let principal = h
                .store
                .get_api_key(secret.as_str())
                .await
                .expect("get")
                .expect("a principal");
            assert_eq!(principal.kind, PrincipalKind::ApiKey);
            assert_eq!(principal.account_id, v1.account_id);
            assert_eq!(principal.user_id, None);
            assert_eq!(principal.credential_id, Some(v1.key_id.to_string()));
            assert_eq!(principal.permissions, ["users.read"]);
            // Versioned: a stale rewrite never replaces a newer one.
            let v2 = ApiKeySnapshot {
                permissions: Vec::new(),
                version: (1 << 60) + 1,
                ..v1.clone()
            };
            let stale = ApiKeySnapshot {
                version: 1 << 60,
                ..v1.clone()
            };
            assert!(h.store.put_api_key(hash.clone(), v2).await.expect("put"));
            assert!(!h.store.put_api_key(hash.clone(), stale).await.expect("put"));
            let principal = h.store.get_api_key(secret.as_str()).await.expect("get");
            assert_eq!(
                principal.expect("a principal").permissions,
                Vec::<String>::new()
            );
            // Only the exact secret resolves; the hash itself is no credential.
            assert_eq!(h.store.get_api_key(&hash).await.expect("get"), None);
            assert_eq!(
                h.store
                    .get_api_key(new_secret().as_str())
                    .await
                    .expect("get"),
                None
            );
            assert_eq!(
                h.store
                    .get_api_key(&format!("{}{}", secret.as_str(), "x".repeat(200)))
                    .await
                    .expect("get"),
                None
            );
            // A platform key is a PLATFORM principal without an account.
            let platform_secret = new_secret();
            let (platform_hash, platform) = api_key(&platform_secret, true);
            assert!(
                h.store
                    .put_api_key(platform_hash, platform.clone())
                    .await
                    .expect("put")
            );
            let principal = h
                .store
                .get_api_key(platform_secret.as_str())
                .await
                .expect("get")
                .expect("a principal");
            assert_eq!(principal.kind, PrincipalKind::Platform);
            assert_eq!(principal.account_id, None);
            assert_eq!(principal.credential_id, Some(platform.key_id.to_string()));
        }

        pub(super) async fn expired_api_key_is_refused(h: &Harness) {
            let secret = new_secret();
            let (hash, mut snapshot) = api_key(&secret, false);
            snapshot.expire_time =
                Some(crate::clock::Clock::now(&*h.clock) + Duration::seconds(30));
            assert!(
                h.store
                    .put_api_key(hash.clone(), snapshot.clone())
                    .await
                    .expect("put")
            );
            assert!(
                h.store
                    .get_api_key(secret.as_str())
                    .await
                    .expect("get")
                    .is_some()
            );
            h.advance(29);
            assert!(
                h.store
                    .get_api_key(secret.as_str())
                    .await
                    .expect("get")
                    .is_some()
            );
            h.advance(1);
            assert_eq!(
                h.store.get_api_key(secret.as_str()).await.expect("get"),
                None
            );
            // Writing an already expired key stores nothing.
            snapshot.version = 2;
            assert!(!h.store.put_api_key(hash, snapshot).await.expect("put"));
            assert_eq!(
                h.store.get_api_key(secret.as_str()).await.expect("get"),
                None
            );
        }

        pub(super) async fn deleted_api_key_stays_revoked(h: &Harness) {
            let secret = new_secret();
            let (hash, snapshot) = api_key(&secret, false);
            let other = new_secret();
            let (other_hash, other_snapshot) = api_key(&other, false);
            assert!(
                h.store
                    .put_api_key(hash.clone(), snapshot.clone())
                    .await
                    .expect("put")
            );
            assert!(
                h.store
                    .put_api_key(other_hash, other_snapshot)
                    .await
                    .expect("put")
            );
            assert!(h.store.delete_api_key(hash.clone()).await.expect("delete"));
            assert_eq!(
                h.store.get_api_key(secret.as_str()).await.expect("get"),
                None
            );
            assert!(!h.store.delete_api_key(hash.clone()).await.expect("delete"));
            // A slow rewrite that read the key before its revocation cannot
            // bring it back, whatever its version.
            let late = ApiKeySnapshot {
                version: u64::MAX,
                ..snapshot
            };
            assert!(!h.store.put_api_key(hash, late).await.expect("put"));
            assert_eq!(
                h.store.get_api_key(secret.as_str()).await.expect("get"),
                None
            );
            // Another key is untouched.
            assert!(
                h.store
                    .get_api_key(other.as_str())
                    .await
                    .expect("get")
                    .is_some()
            );
            // Deleting a key never written leaves a tombstone too.
            let never = new_secret();
            let never_hash = hasher().hash(TokenPurpose::ApiKey, never.as_str());
            assert!(
                !h.store
                    .delete_api_key(never_hash.clone())
                    .await
                    .expect("delete")
            );
            let (_, snapshot) = api_key(&never, false);
            assert!(
                !h.store
                    .put_api_key(never_hash, snapshot)
                    .await
                    .expect("put")
            );
        }
    }

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
        let err =
            serde_json::from_str::<SessionConfig>(r#"{"access_ttl": 5}"#).expect_err("unknown");
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
}
