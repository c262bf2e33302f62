//! A session as stored ([`SessionRecord`]), what identity knows about the
//! client signing in ([`SessionMeta`]), and the tokens a sign-in or a refresh
//! hands to the client once ([`IssuedSession`]).

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::tokens::Token;

/// Longest user agent kept on a session; longer ones are truncated.
pub const MAX_USER_AGENT_CHARS: usize = 512;
/// Longest client address kept on a session; longer ones are truncated.
pub const MAX_CLIENT_IP_CHARS: usize = 64;

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
    /// The token for [`SessionStore::refresh`](super::SessionStore::refresh).
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
