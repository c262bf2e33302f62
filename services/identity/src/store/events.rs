//! Domain events of the identity service, written to the outbox in the
//! transaction of the change (published on `usher.events` by the relay).

use chrono::{DateTime, Utc};
use prost::Message;
use sea_orm::ConnectionTrait;
use usher_kit::{error::ApiResult, events::DomainEvent, outbox};
use uuid::Uuid;

/// Writes the event `kind` (a `usher.events.v1` message name) with routing
/// key `routing_key` about `subject` to the outbox on `db`.
pub async fn emit<C: ConnectionTrait, M: Message>(
    db: &C,
    routing_key: &str,
    kind: &str,
    subject: impl Into<String>,
    account_id: Option<Uuid>,
    payload: &M,
    now: DateTime<Utc>,
) -> ApiResult<()> {
    let message = DomainEvent {
        routing_key,
        service: "identity",
        subject: subject.into(),
        account_id,
        time: now,
    }
    .into_message(kind, payload);
    outbox::enqueue(db, &[message]).await?;
    Ok(())
}
