//! The parking queue for operators (`usher parked list|replay`): what is
//! parked and why, and putting chosen jobs back to work once the cause is
//! fixed (docs/notification.md, "Parked jobs").
//!
//! The queue is walked once, message by message: each is either replayed
//! (its `deliveries` row reset from FAILED to QUEUED, with a QUEUED result,
//! then the job published to `usher.email` / `email.send`) or copied back to
//! the tail of the parking queue, and acknowledged only once the broker
//! confirmed the copy. Nothing is ever requeued (a quorum queue counts every
//! return toward its delivery limit), order is kept, and an interruption at
//! worst leaves one job twice in the parking queue, or parked and replayed:
//! the job's row makes the second copy a duplicate, acked without a send.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use lapin::{
    options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use prost::Message as _;
use sea_orm::DatabaseConnection;
use usher_kit::amqp::{
    Amqp, ConfirmedPublisher, EMAIL_EXCHANGE, EMAIL_JOB_TYPE, EMAIL_SEND_ROUTING_KEY,
    OutgoingMessage, PROTOBUF_CONTENT_TYPE,
};
use usher_proto::notification::v1 as pb;
use uuid::Uuid;

use crate::{
    store,
    topology::{DEAD_LETTER_EXCHANGE, PARK_REASON_HEADER, PARKED_QUEUE, PARKED_ROUTING_KEY},
};

/// Which parked jobs to put back to work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Replay {
    /// None: only look.
    Nothing,
    /// Every job that names a job id.
    All,
    /// These job ids.
    Jobs(HashSet<String>),
}

/// One parked message, as an operator sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ParkedJob {
    /// The job id (empty when the message is not a readable job).
    pub job_id: String,
    /// Its account.
    pub account_id: String,
    /// Its template, as the contract names it.
    pub template: String,
    /// Its recipient.
    pub recipient: String,
    /// Why it was parked.
    pub reason: String,
    /// Whether this walk put it back to work.
    pub replayed: bool,
}

/// Walks the parking queue once (the messages in it when the walk starts),
/// replaying what `replay` selects and keeping the rest, in order. Returns
/// every message seen.
pub async fn walk(
    amqp: &Amqp,
    db: &DatabaseConnection,
    replay: &Replay,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<ParkedJob>> {
    let publisher = ConfirmedPublisher::new(amqp.clone());
    let channel = amqp.channel().await?;
    let parked = channel
        .queue_declare(
            PARKED_QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count();
    let mut seen = Vec::new();
    for _ in 0..parked {
        let Some(message) = channel
            .basic_get(PARKED_QUEUE.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        let reason = park_reason(delivery.properties.headers().as_ref());
        let job = pb::EmailJob::decode(delivery.data.as_slice()).ok();
        let mut item = ParkedJob {
            job_id: job.as_ref().map(|j| j.job_id.clone()).unwrap_or_default(),
            account_id: job
                .as_ref()
                .map(|j| j.account_id.clone())
                .unwrap_or_default(),
            template: job
                .as_ref()
                .and_then(|j| pb::EmailTemplate::try_from(j.template).ok())
                .map(|t| t.as_str_name().to_owned())
                .unwrap_or_default(),
            recipient: job
                .as_ref()
                .map(|j| j.recipient_email.clone())
                .unwrap_or_default(),
            reason: reason.clone(),
            replayed: false,
        };
        let job_id = Uuid::parse_str(&item.job_id).ok();
        let selected = job_id.is_some()
            && match replay {
                Replay::Nothing => false,
                Replay::All => true,
                Replay::Jobs(ids) => ids.contains(&item.job_id),
            };
        let copy = match (selected, job_id) {
            (true, Some(id)) => {
                // The row first: a job published while its row is FAILED
                // would be acked as a duplicate.
                store::requeue_failed(db, id, now).await?;
                item.replayed = true;
                OutgoingMessage::new(
                    EMAIL_EXCHANGE,
                    EMAIL_SEND_ROUTING_KEY,
                    EMAIL_JOB_TYPE,
                    delivery.data.clone(),
                )
                .with_message_id(id.to_string())
            }
            _ => OutgoingMessage::new(
                DEAD_LETTER_EXCHANGE,
                PARKED_ROUTING_KEY,
                EMAIL_JOB_TYPE,
                delivery.data.clone(),
            )
            .with_header(PARK_REASON_HEADER, reason),
        };
        publisher
            .publish(&copy.with_content_type(PROTOBUF_CONTENT_TYPE))
            .await?;
        delivery.ack(BasicAckOptions::default()).await?;
        seen.push(item);
    }
    let _ = channel.close(200, "parked jobs walked".into()).await;
    Ok(seen)
}

/// Why a message was parked: our header, else the broker's dead-letter
/// reason (a job redelivered beyond the delivery limit).
fn park_reason(headers: Option<&FieldTable>) -> String {
    let text = |name: &str| {
        headers
            .and_then(|h| h.inner().get(name).cloned())
            .and_then(|value| match value {
                AMQPValue::LongString(s) => Some(s.to_string()),
                AMQPValue::ShortString(s) => Some(s.to_string()),
                _ => None,
            })
    };
    text(PARK_REASON_HEADER).unwrap_or_else(|| {
        let why = text("x-first-death-reason").unwrap_or_else(|| "unknown".into());
        store::sanitize_reason(&format!("dead-lettered by the broker: {why}"))
    })
}
