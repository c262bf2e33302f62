//! What both stores share: the token pair minted for a new or rotated
//! session and the lifetimes it gets, and the verdict on a refresh token that
//! is no longer the session's current one. The Redis and in-memory stores
//! differ only in where they keep the outcome.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    SessionError,
    config::{SessionConfig, after},
    record::{
        IssuedSession, MAX_CLIENT_IP_CHARS, MAX_USER_AGENT_CHARS, SessionMeta, SessionRecord,
    },
};
use crate::{
    clock::SharedClock,
    error::ApiResult,
    tokens::{Token, TokenHasher, TokenPurpose},
};

/// What a token key points to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct TokenEntry {
    pub(super) sid: Uuid,
    #[serde(with = "chrono::serde::ts_milliseconds")]
    pub(super) exp: DateTime<Utc>,
}

/// A new token pair and the record that goes with it.
pub(super) struct Minted {
    pub(super) issued: IssuedSession,
}

impl Minted {
    pub(super) fn record(&self) -> &SessionRecord {
        &self.issued.record
    }

    pub(super) fn access_entry(&self) -> TokenEntry {
        TokenEntry {
            sid: self.record().id,
            exp: self.record().access_expiry,
        }
    }

    pub(super) fn refresh_entry(&self) -> TokenEntry {
        TokenEntry {
            sid: self.record().id,
            exp: self.record().refresh_expiry,
        }
    }
}

/// Why a presented refresh token is not the current one.
pub(super) enum Stale {
    Superseded,
    Reused,
}

/// What both backends share: lifetimes, hashing, and the rules.
pub(super) struct Rules {
    pub(super) config: SessionConfig,
    pub(super) hasher: TokenHasher,
    pub(super) clock: SharedClock,
}

impl Rules {
    pub(super) fn hash_access(&self, token: &str) -> String {
        self.hasher.hash(TokenPurpose::SessionAccess, token)
    }

    pub(super) fn hash_refresh(&self, token: &str) -> String {
        self.hasher.hash(TokenPurpose::SessionRefresh, token)
    }

    pub(super) fn hash_api_key(&self, secret: &str) -> String {
        self.hasher.hash(TokenPurpose::ApiKey, secret)
    }

    /// A new token pair for `record`, whose id, owner, start and absolute
    /// expiry are kept.
    pub(super) fn mint(&self, now: DateTime<Utc>, mut record: SessionRecord) -> ApiResult<Minted> {
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

    pub(super) fn start(
        &self,
        account_id: Uuid,
        user_id: Uuid,
        meta: SessionMeta,
    ) -> ApiResult<Minted> {
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

    pub(super) fn rotate(&self, now: DateTime<Utc>, current: &SessionRecord) -> ApiResult<Minted> {
        let mut record = current.clone();
        record.previous_refresh_hash = Some(current.refresh_hash.clone());
        record.rotated_at = Some(now);
        self.mint(now, record)
    }

    /// Whether `record`, found through a token key, may still be used.
    pub(super) fn live(now: DateTime<Utc>, record: &SessionRecord) -> bool {
        record.absolute_expiry > now
    }

    /// Judges a refresh token that is not the session's current one.
    pub(super) fn judge_stale(
        &self,
        now: DateTime<Utc>,
        record: &SessionRecord,
        hash: &str,
    ) -> Stale {
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

/// `value` cut to at most `max_chars` characters.
fn truncate(mut value: String, max_chars: usize) -> String {
    if let Some((at, _)) = value.char_indices().nth(max_chars) {
        value.truncate(at);
    }
    value
}

/// Logs a detected reuse and names the session it revoked.
pub(super) fn reuse_detected(record: &SessionRecord) -> SessionError {
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
