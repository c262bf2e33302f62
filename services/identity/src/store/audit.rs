//! The audit log: every mutation writes who did what to whom in the same
//! transaction as the change (an audit entry exists if and only if the change
//! committed); AuditService reads it newest first.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Set,
};
use serde_json::Value as Json;
use usher_kit::db::StoreResult;
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

/// Which entries of an account's log to read (every filter optional).
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    /// The account.
    pub account_id: Uuid,
    /// Only entries by this actor id.
    pub actor_id: Option<String>,
    /// Only entries on targets of this kind (empty: any).
    pub target_type: String,
    /// Only entries on this target id.
    pub target_id: Option<String>,
    /// This action, or every action starting with it when it ends with `.`
    /// (empty: any).
    pub action: String,
    /// From this time on (inclusive).
    pub start: Option<DateTime<Utc>>,
    /// Before this time.
    pub end: Option<DateTime<Utc>>,
}

/// A `LIKE` pattern matching every value starting with `prefix`.
fn prefix_pattern(prefix: &str) -> String {
    format!(
        "{}%",
        prefix
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    )
}

/// Up to `limit` entries matching `filter`, newest first, after the entry
/// `after` (its time and id).
pub async fn page<C: ConnectionTrait>(
    db: &C,
    filter: AuditFilter,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: u64,
) -> StoreResult<Vec<audit_event::Model>> {
    let mut select =
        audit_event::Entity::find().filter(audit_event::Column::AccountId.eq(filter.account_id));
    if let Some(actor_id) = filter.actor_id {
        select = select.filter(audit_event::Column::ActorId.eq(actor_id));
    }
    if !filter.target_type.is_empty() {
        select = select.filter(audit_event::Column::TargetType.eq(filter.target_type));
    }
    if let Some(target_id) = filter.target_id {
        select = select.filter(audit_event::Column::TargetId.eq(target_id));
    }
    if filter.action.ends_with('.') {
        select = select.filter(audit_event::Column::Action.like(prefix_pattern(&filter.action)));
    } else if !filter.action.is_empty() {
        select = select.filter(audit_event::Column::Action.eq(filter.action));
    }
    if let Some(start) = filter.start {
        select = select.filter(audit_event::Column::EventTime.gte(start));
    }
    if let Some(end) = filter.end {
        select = select.filter(audit_event::Column::EventTime.lt(end));
    }
    if let Some((time, id)) = after {
        select = select.filter(
            Condition::any()
                .add(audit_event::Column::EventTime.lt(time))
                .add(
                    Condition::all()
                        .add(audit_event::Column::EventTime.eq(time))
                        .add(audit_event::Column::Id.lt(id)),
                ),
        );
    }
    Ok(select
        .order_by_desc(audit_event::Column::EventTime)
        .order_by_desc(audit_event::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}
