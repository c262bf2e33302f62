//! Domain events on the `usher.events` topic exchange, with CloudEvents
//! attributes in the AMQP application headers (binding prefix `cloudEvents_`),
//! written to the outbox in the transaction of the change they describe.

use chrono::{DateTime, SecondsFormat, Utc};
use prost::Message;
use uuid::Uuid;

use crate::amqp::{EVENTS_EXCHANGE, OutgoingMessage, QueueSpec, Topology};

/// The durable quorum queue from which identity ingests the `invitation.*`
/// events into the account's audit log.
pub const AUDIT_QUEUE: &str = "usher.identity.audit";
/// Its binding on [`EVENTS_EXCHANGE`].
pub const AUDIT_BINDING: &str = "invitation.*";

/// The audit queue and its binding. Identity, which consumes it, and the
/// invitation service, which publishes the events, both declare it (the same
/// arguments, so either may come first): an event published before identity
/// ever started is kept for it rather than dropped for want of a queue.
pub fn audit_topology() -> Topology {
    Topology::new()
        .topic_exchange(EVENTS_EXCHANGE)
        .queue(QueueSpec::durable(AUDIT_QUEUE).quorum())
        .bind(AUDIT_QUEUE, EVENTS_EXCHANGE, AUDIT_BINDING)
}

/// One domain event, ready for the outbox.
#[derive(Debug)]
pub struct DomainEvent<'a> {
    /// The routing key, e.g. `user.deactivated`.
    pub routing_key: &'a str,
    /// The emitting service, e.g. `identity` (source `/usher/identity`).
    pub service: &'a str,
    /// The id of the resource the event is about.
    pub subject: String,
    /// The account, absent for platform-level events.
    pub account_id: Option<Uuid>,
    /// When the change was committed.
    pub time: DateTime<Utc>,
}

impl DomainEvent<'_> {
    /// The outbox message carrying `payload` (a `usher.events.v1` message
    /// named `kind`), as events.proto describes it: `content_type`
    /// `application/protobuf`, `type` the full message name, `timestamp` the
    /// time of the change. The CloudEvents id doubles as the AMQP message id,
    /// so consumers dedupe redeliveries on either.
    pub fn into_message<M: Message>(self, kind: &str, payload: &M) -> OutgoingMessage {
        let id = Uuid::now_v7().to_string();
        let mut message = OutgoingMessage::new(
            EVENTS_EXCHANGE,
            self.routing_key,
            format!("usher.events.v1.{kind}"),
            payload.encode_to_vec(),
        )
        .with_message_id(id.clone())
        .with_timestamp(self.time)
        .with_header("cloudEvents_specversion", "1.0")
        .with_header("cloudEvents_id", id)
        .with_header("cloudEvents_source", format!("/usher/{}", self.service))
        .with_header(
            "cloudEvents_type",
            format!("dev.usher.{}", self.routing_key),
        )
        .with_header(
            "cloudEvents_time",
            self.time.to_rfc3339_opts(SecondsFormat::Millis, true),
        )
        .with_header("cloudEvents_subject", self.subject)
        .with_header("cloudEvents_datacontenttype", "application/protobuf")
        .with_header("cloudEvents_dataschema", format!("usher.events.v1.{kind}"))
        .broadcast();
        if let Some(account) = self.account_id {
            message = message.with_header("cloudEvents_usheraccount", account.to_string());
        }
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_cloudevents_attributes_and_are_broadcasts() {
        let account = Uuid::new_v4();
        let time = DateTime::from_timestamp(1_800_000_000, 0).expect("valid");
        let payload = prost_types::Timestamp {
            seconds: 5,
            nanos: 0,
        };
        let message = DomainEvent {
            routing_key: "user.deactivated",
            service: "identity",
            subject: "u1".into(),
            account_id: Some(account),
            time,
        }
        .into_message("UserDeactivated", &payload);
        assert_eq!(message.exchange, EVENTS_EXCHANGE);
        assert_eq!(message.routing_key, "user.deactivated");
        assert!(!message.mandatory);
        assert_eq!(
            message.headers["cloudEvents_type"],
            "dev.usher.user.deactivated"
        );
        assert_eq!(message.headers["cloudEvents_source"], "/usher/identity");
        assert_eq!(message.headers["cloudEvents_id"], message.message_id);
        assert_eq!(
            message.headers["cloudEvents_usheraccount"],
            account.to_string()
        );
        assert_eq!(
            message.headers["cloudEvents_time"],
            "2027-01-15T08:00:00.000Z"
        );
        assert_eq!(message.payload, payload.encode_to_vec());
        assert_eq!(message.content_type, "application/protobuf");
        assert_eq!(message.kind, "usher.events.v1.UserDeactivated");
        assert_eq!(message.timestamp, Some(1_800_000_000));
    }
}
