//! Writes what a decision caused ([`Effects`]): its audit rows and its
//! outbox events, in the caller's transaction, in one statement each.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, EntityTrait};
use usher_kit::{db::StoreResult, outbox};

use super::{
    audit::{self, AuditEntry},
    entities::audit_event,
};
use crate::domain::effects::{Actor, Effects};

/// Audit rows per INSERT statement.
const AUDIT_CHUNK: usize = 1_000;

/// Writes `effects` of a call by `actor` with `request_id` at `now` on `db`
/// (the transaction of the change).
pub async fn apply<C: ConnectionTrait>(
    db: &C,
    effects: Effects,
    actor: &Actor,
    request_id: &str,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let mut rows: Vec<audit_event::ActiveModel> = effects
        .audit
        .into_iter()
        .map(|entry| {
            audit::row(
                AuditEntry {
                    account_id: entry.account_id,
                    actor,
                    action: entry.action,
                    target_type: entry.target_type,
                    target_id: entry.target_id,
                    target_name: entry.target_name,
                    details: entry.details,
                    request_id,
                },
                now,
            )
        })
        .collect();
    // Well under PostgreSQL's 65,535 bind parameters per statement.
    while !rows.is_empty() {
        let chunk: Vec<_> = rows.drain(..rows.len().min(AUDIT_CHUNK)).collect();
        audit_event::Entity::insert_many(chunk).exec(db).await?;
    }
    outbox::enqueue(db, &effects.events).await?;
    Ok(())
}
