//! Domain events of the identity service, written to the outbox in the
//! transaction of the change (published on `usher.events` by the relay).

use chrono::{DateTime, Utc};
use prost::Message;
use sea_orm::ConnectionTrait;
use usher_kit::{error::ApiResult, outbox};
use uuid::Uuid;

use crate::domain::effects::Effects;

/// Writes the event `kind` (a `usher.events.v1` message name) with routing
/// key `routing_key` about `subject` to the outbox on `db` (the one event of
/// [`Effects::event`], for callers with no other effect to write).
pub async fn emit<C: ConnectionTrait, M: Message>(
    db: &C,
    routing_key: &str,
    kind: &str,
    subject: impl Into<String>,
    account_id: Option<Uuid>,
    payload: &M,
    now: DateTime<Utc>,
) -> ApiResult<()> {
    let mut effects = Effects::new();
    effects.event(routing_key, kind, subject, account_id, payload, now);
    outbox::enqueue(db, &effects.events).await?;
    Ok(())
}
