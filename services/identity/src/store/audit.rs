//! The audit log: every mutation writes who did what to whom in the same
//! transaction as the change (an audit entry exists if and only if the change
//! committed).

use chrono::{DateTime, Utc};
use sea_orm::{ActiveModelTrait, ConnectionTrait, DbErr, Set};
use serde_json::Value as Json;
use uuid::Uuid;

use super::entities::audit_event;

pub use crate::domain::effects::Actor;

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
