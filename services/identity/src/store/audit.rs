//! The audit log: every mutation writes who did what to whom in the same
//! transaction as the change (an audit entry exists if and only if the change
//! committed).

use chrono::{DateTime, Utc};
use sea_orm::{ActiveModelTrait, ConnectionTrait, DbErr, Set};
use serde_json::Value as Json;
use usher_kit::principal::{Principal, PrincipalKind};
use uuid::Uuid;

use super::entities::audit_event;

/// Who did something.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// `user`, `api_key`, `platform`, `system` or `anonymous`.
    pub kind: &'static str,
    /// The user id, API key id, or empty.
    pub id: String,
    /// A name for humans, as it was at the time.
    pub name: String,
}

impl Actor {
    /// The actor behind a verified principal; `name` is the user's display
    /// name when known.
    pub fn from_principal(principal: &Principal, name: impl Into<String>) -> Self {
        let (kind, id) = match principal.kind {
            PrincipalKind::User => ("user", principal.user_id.map(|u| u.to_string())),
            PrincipalKind::ApiKey => ("api_key", principal.credential_id.clone()),
            PrincipalKind::Platform => ("platform", principal.credential_id.clone()),
            PrincipalKind::Service => ("system", principal.service.clone()),
            PrincipalKind::Anonymous => ("anonymous", None),
        };
        Self {
            kind,
            id: id.unwrap_or_default(),
            name: name.into(),
        }
    }

    /// Usher itself (expiry, migrations).
    pub fn system() -> Self {
        Self {
            kind: "system",
            id: String::new(),
            name: "Usher".into(),
        }
    }

    /// The protobuf form.
    pub fn to_proto(&self) -> usher_proto::identity::v1::Actor {
        use usher_proto::identity::v1::ActorKind;
        let kind = match self.kind {
            "user" => ActorKind::User,
            "api_key" => ActorKind::ApiKey,
            "platform" => ActorKind::Platform,
            "system" => ActorKind::System,
            "anonymous" => ActorKind::Anonymous,
            _ => ActorKind::Unspecified,
        };
        usher_proto::identity::v1::Actor {
            kind: kind as i32,
            id: self.id.clone(),
            display_name: self.name.clone(),
        }
    }
}

/// One audit entry to write.
#[derive(Clone, Debug)]
pub struct AuditEntry<'a> {
    /// The account it belongs to.
    pub account_id: Uuid,
    /// Who did it.
    pub actor: &'a Actor,
    /// What, e.g. `user.deactivated`.
    pub action: &'static str,
    /// The kind of target: `user`, `role`, `team`, `account`, `api_key`.
    pub target_type: &'static str,
    /// The target's id.
    pub target_id: String,
    /// The target's name at the time.
    pub target_name: String,
    /// Details (changed fields, old and new values); never secrets.
    pub details: Option<Json>,
    /// The request id of the call.
    pub request_id: &'a str,
}

/// Writes `entry` on `db` (the caller's transaction) at `now`.
pub async fn record<C: ConnectionTrait>(
    db: &C,
    entry: AuditEntry<'_>,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    row(entry, now).insert(db).await?;
    Ok(())
}

/// The row of `entry`, for multi-row inserts (`audit_event::Entity::insert_many`).
pub fn row(entry: AuditEntry<'_>, now: DateTime<Utc>) -> audit_event::ActiveModel {
    audit_event::ActiveModel {
        id: Set(Uuid::now_v7()),
        account_id: Set(entry.account_id),
        event_time: Set(now),
        actor_kind: Set(entry.actor.kind.to_owned()),
        actor_id: Set(entry.actor.id.clone()),
        actor_name: Set(entry.actor.name.clone()),
        action: Set(entry.action.to_owned()),
        target_type: Set(entry.target_type.to_owned()),
        target_id: Set(entry.target_id),
        target_name: Set(entry.target_name),
        details: Set(entry.details),
        request_id: Set(entry.request_id.to_owned()),
        client_ip: Set(String::new()),
    }
}
