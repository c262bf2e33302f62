//! The broker topology of the email pipeline, declared idempotently at start
//! and on every reconnect (see `docs/notification.md`):
//!
//! ```text
//! usher.email (topic) --email.send--> usher.email.send (quorum, manual acks)
//!      |                                   | rejected / over the delivery limit
//!      |                                   v
//!      |                    usher.email.dead (direct) --parked--> usher.email.parked
//!      |
//!      +--email.result.<source>--> the producers' own result queues
//!
//! "" (default exchange) --usher.email.send.delay.<ms>--> usher.email.send.delay.<ms>
//!      (TTL <ms>, dead-lettered to "" with routing key usher.email.send:
//!       back to the work queue alone)
//! ```
//!
//! A transient failure republishes the job to the delay queue of its attempt
//! (increasing delays), whose TTL dead-letters it back to the work queue. Both
//! hops go through the default exchange, addressed by queue name, never
//! through `usher.email`: a retry is this service's own business, and another
//! pipeline's queue bound on `email.send` sees each job once. A
//! permanent failure or a malformed job is published to the parking queue
//! with its reason, then acked. The work queue also dead-letters what it
//! rejects or what was redelivered too often (the quorum `x-delivery-limit`,
//! for a job that crashes its consumer), so a poison message ends up parked
//! too and never blocks the queue. Delay queues are named by their delay, so
//! changing `delivery.retry_delays_ms` adds queues instead of redeclaring one
//! with other arguments (which the broker refuses with `PRECONDITION_FAILED`).
//!
//! Releases before this one named the delay queues `usher.email.delay.<ms>`,
//! fed them through the direct exchange `usher.email.retry` and dead-lettered
//! them to `usher.email` / `email.send`, so every queue bound there got each
//! retry. Their arguments cannot be changed in place, hence the new names;
//! nothing is published to the old objects any more, and
//! `docs/notification.md` ("Upgrading") says how to delete them.

use std::time::Duration;

use usher_kit::amqp::{
    EMAIL_EXCHANGE, EMAIL_SEND_ROUTING_KEY, EVENTS_EXCHANGE, ExchangeType, QueueArgument,
    QueueSpec, Topology,
};

/// The work queue of email jobs.
pub const SEND_QUEUE: &str = "usher.email.send";
/// The queue of jobs that will never be sent, with their reason.
pub const PARKED_QUEUE: &str = "usher.email.parked";
/// The dead-letter exchange of the work queue (routes to the parking queue).
pub const DEAD_LETTER_EXCHANGE: &str = "usher.email.dead";
/// Routing key of parked jobs on [`DEAD_LETTER_EXCHANGE`].
pub const PARKED_ROUTING_KEY: &str = "parked";
/// The exchange retried copies are published to and delay queues
/// dead-letter to: the default exchange, which routes by queue name.
pub const DEFAULT_EXCHANGE: &str = "";
/// AMQP header holding the attempts made so far on a retried job.
pub const ATTEMPTS_HEADER: &str = "x-usher-attempts";
/// AMQP header holding why a job was parked.
pub const PARK_REASON_HEADER: &str = "x-usher-park-reason";
/// Redeliveries of one job (consumer crashes) before the broker parks it.
pub const DELIVERY_LIMIT: i64 = 20;

/// Name of the delay queue for `delay`, also its routing key on the default
/// exchange.
pub fn delay_queue(delay: Duration) -> String {
    format!("{SEND_QUEUE}.delay.{}ms", delay.as_millis())
}

/// Routing key of the delivery results for a producer (`invitation`, `identity`).
pub fn result_routing_key(source: &str) -> String {
    format!("email.result.{source}")
}

/// Everything the notification service declares, with one delay queue per
/// entry of `retry_delays`.
pub fn topology(retry_delays: &[Duration]) -> Topology {
    let mut topology = Topology::new()
        .topic_exchange(EVENTS_EXCHANGE)
        .topic_exchange(EMAIL_EXCHANGE)
        .exchange(DEAD_LETTER_EXCHANGE, ExchangeType::Direct)
        .queue(
            QueueSpec::durable(SEND_QUEUE)
                .quorum()
                .with_dead_letter(DEAD_LETTER_EXCHANGE, Some(PARKED_ROUTING_KEY))
                .with_argument("x-delivery-limit", QueueArgument::Int(DELIVERY_LIMIT)),
        )
        .queue(QueueSpec::durable(PARKED_QUEUE).quorum())
        .bind(SEND_QUEUE, EMAIL_EXCHANGE, EMAIL_SEND_ROUTING_KEY)
        .bind(PARKED_QUEUE, DEAD_LETTER_EXCHANGE, PARKED_ROUTING_KEY);
    let mut seen = Vec::new();
    for delay in retry_delays {
        if seen.contains(delay) {
            continue;
        }
        seen.push(*delay);
        let queue = delay_queue(*delay);
        // No binding: published to and dead-lettered through the default
        // exchange, by queue name.
        topology = topology.queue(
            QueueSpec::durable(&queue)
                .quorum()
                .with_message_ttl(*delay)
                .with_dead_letter(DEFAULT_EXCHANGE, Some(SEND_QUEUE)),
        );
    }
    topology
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_delay_queue_per_distinct_delay() {
        let delays = [
            Duration::from_secs(1),
            Duration::from_secs(5),
            Duration::from_secs(5),
        ];
        let topology = topology(&delays);
        let names: Vec<_> = topology.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(
            names,
            [
                SEND_QUEUE,
                PARKED_QUEUE,
                "usher.email.send.delay.1000ms",
                "usher.email.send.delay.5000ms"
            ]
        );
        let send = &topology.queues[0];
        assert_eq!(
            send.arguments.get("x-queue-type"),
            Some(&QueueArgument::Text("quorum".into()))
        );
        assert_eq!(
            send.arguments.get("x-dead-letter-exchange"),
            Some(&QueueArgument::Text(DEAD_LETTER_EXCHANGE.into()))
        );
        let delay = &topology.queues[2];
        assert_eq!(
            delay.arguments.get("x-message-ttl"),
            Some(&QueueArgument::Int(1_000))
        );
        // Back to the work queue alone, never through `usher.email`, where
        // other pipelines' queues are bound on `email.send`.
        assert_eq!(
            delay.arguments.get("x-dead-letter-exchange"),
            Some(&QueueArgument::Text(String::new()))
        );
        assert_eq!(
            delay.arguments.get("x-dead-letter-routing-key"),
            Some(&QueueArgument::Text(SEND_QUEUE.into()))
        );
        assert!(
            topology.bindings.iter().all(|b| b.queue != delay.name),
            "a delay queue is reached by its name only"
        );
    }
}
