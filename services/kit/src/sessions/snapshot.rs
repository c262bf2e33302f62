//! What the gateway needs to build a caller's [`Principal`] without asking
//! identity: a user's [`PrincipalSnapshot`] (read together with the session)
//! and an API key's [`ApiKeySnapshot`]. Identity writes both; each carries a
//! version so that a slow writer never replaces a newer snapshot.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::record::SessionRecord;
use crate::principal::{Principal, PrincipalKind};

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
pub(super) fn plausible_api_key(secret: &str) -> bool {
    secret.starts_with(crate::tokens::API_KEY_PREFIX) && secret.chars().count() <= MAX_API_KEY_CHARS
}
