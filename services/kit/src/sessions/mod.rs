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
//! No write spans two keys atomically, so the same code runs on a Redis
//! Cluster, where a session's keys live on different slots: the session
//! record is the commit point. Token keys and the index entry are written
//! before the record and deleted after it, so a half-done write leaves only
//! keys no token reaches. The rotation (a check-and-set of the record) and
//! the versioned snapshot writes are single-key Lua scripts. Needs Redis 7
//! (`PEXPIRE … NX|GT`). A Redis that cannot be reached gives
//! [`ApiError::Unavailable`], never "no such session" (fail closed, P21).
//!
//! [`MemorySessionStore`] implements the same contract in process, with expiry
//! against the injected clock, for `usher dev` and unit tests; one conformance
//! suite runs against both (CONVENTIONS.md #9).
//!
//! # Files
//!
//! This file holds the contract ([`SessionStore`], [`SessionError`]); beside
//! it, `config.rs` the lifetimes ([`SessionConfig`]), `record.rs` the stored
//! session and the tokens handed out, `snapshot.rs` the principal and API key
//! snapshots, `rules.rs` what both stores share (minting, rotation, the reuse
//! verdict), `redis_store.rs` and `memory_store.rs` the two stores, and
//! `tests/` the conformance suite run against both.
//!
//! [`Token::try_generate`]: crate::tokens::Token::try_generate
//! [`TokenHasher`]: crate::tokens::TokenHasher
//! [`TokenPurpose::SessionAccess`]: crate::tokens::TokenPurpose::SessionAccess
//! [`TokenPurpose::SessionRefresh`]: crate::tokens::TokenPurpose::SessionRefresh
//! [`TokenPurpose::ApiKey`]: crate::tokens::TokenPurpose::ApiKey

mod config;
mod memory_store;
mod record;
mod redis_store;
mod rules;
mod snapshot;
#[cfg(test)]
mod tests;

use std::{fmt, sync::Arc};

use futures::future::BoxFuture;
use uuid::Uuid;

pub use self::{
    config::{SECTION, SessionConfig},
    memory_store::MemorySessionStore,
    record::{
        IssuedSession, MAX_CLIENT_IP_CHARS, MAX_USER_AGENT_CHARS, SessionMeta, SessionRecord,
    },
    redis_store::RedisSessionStore,
    snapshot::{ApiKeySnapshot, MAX_API_KEY_CHARS, PrincipalSnapshot, UserStatus},
};
use crate::{
    error::{ApiError, ApiResult, Reason},
    principal::Principal,
};

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
    /// ([`TokenPurpose::ApiKey`](crate::tokens::TokenPurpose::ApiKey)) unless one with the same or a newer version
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
