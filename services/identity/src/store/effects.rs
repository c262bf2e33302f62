//! Writes what a decision caused ([`Effects`]): its audit rows and its
//! outbox events, in the caller's transaction, in one statement each (for
//! one call, or for a whole batch of calls).

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, EntityTrait};
use usher_kit::{db::StoreResult, outbox};

use super::{
    audit::{self, AuditEntry},
    entities::audit_event,
};
use crate::domain::effects::{Actor, Audit, Effects};

/// Audit rows per INSERT statement: few enough that the statement sqlx
/// prepares and keeps on its connection stays small (see
/// [`super::directory`]'s `USERS_PER_INSERT`).
const AUDIT_CHUNK: usize = 250;

/// Writes `effects` of a call by `actor` with `request_id` at `now` on `db`
/// (the transaction of the change).
pub async fn apply<C: ConnectionTrait>(
    db: &C,
    effects: Effects,
    actor: &Actor,
    request_id: &str,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let rows = audit_rows(effects.audit, actor, request_id, now);
    write(db, rows, &effects.events).await
}

/// Writes the effects of several calls (each with its actor and request id)
/// on `db`, in one transaction: every audit row in one statement per
/// thousand, every event in one outbox insert.
pub async fn apply_all<C: ConnectionTrait>(
    db: &C,
    all: Vec<(Effects, &Actor, &str)>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let mut rows = Vec::new();
    let mut events = Vec::new();
    for (effects, actor, request_id) in all {
        rows.extend(audit_rows(effects.audit, actor, request_id, now));
        events.extend(effects.events);
    }
    write(db, rows, &events).await
}

/// The audit rows of `entries`.
fn audit_rows(
    entries: Vec<Audit>,
    actor: &Actor,
    request_id: &str,
    now: DateTime<Utc>,
) -> Vec<audit_event::ActiveModel> {
    entries
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
        .collect()
}

/// Inserts `rows` and enqueues `events`.
async fn write<C: ConnectionTrait>(
    db: &C,
    mut rows: Vec<audit_event::ActiveModel>,
    events: &[usher_kit::amqp::OutgoingMessage],
) -> StoreResult<()> {
    // Well under PostgreSQL's 65,535 bind parameters per statement.
    while !rows.is_empty() {
        let chunk: Vec<_> = rows.drain(..rows.len().min(AUDIT_CHUNK)).collect();
        audit_event::Entity::insert_many(chunk).exec(db).await?;
    }
    outbox::enqueue(db, events).await?;
    Ok(())
}
