//! Records the delivery results the notification service publishes for
//! invitation emails (`usher.email`, routing key `email.result.invitation`)
//! on the invitation whose latest email they concern: a result for an older
//! email (an earlier link, before a resend) is ignored.
//!
//! The queue is durable (quorum); results are recorded in batches — what
//! the broker has delivered and is waiting, up to [`BATCH`], in one
//! transaction and, on PostgreSQL, one statement (one more for each further
//! result of an invitation already in it) — and acked after it commits (a
//! failed batch is requeued as a whole). A result that cannot be decoded is
//! dropped with a warning (it would never decode on a redelivery either).
//! The consumer re-subscribes whenever the connection comes back.

use std::time::Duration;

use futures::FutureExt;
use prost::Message;
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;
use usher_kit::{amqp::QueueSpec, broker::Broker, clock::SharedClock, error::ApiResult};
use usher_proto::notification::v1 as notification;

use crate::{domain::delivery, store::Repository};

/// The queue of this service's delivery results.
pub const QUEUE: &str = "usher.invitation.delivery-results";
/// Its binding on `usher.email`.
pub const ROUTING_KEY: &str = "email.result.invitation";
/// Unacknowledged results in flight.
const PREFETCH: u16 = 32;

/// The queue's declaration.
pub fn queue() -> QueueSpec {
    QueueSpec::durable(QUEUE).quorum()
}

/// Results recorded per transaction at most.
pub const BATCH: usize = 64;

/// Records `results` (see [`crate::domain::delivery`]) in one transaction;
/// returns how many invitations were updated.
pub async fn record(
    db: &DatabaseConnection,
    results: &[notification::DeliveryResult],
    clock: &SharedClock,
) -> ApiResult<usize> {
    let reports: Vec<_> = results.iter().filter_map(delivery::report).collect();
    if reports.is_empty() {
        return Ok(0);
    }
    Ok(Repository::new(db.clone())
        .record_deliveries(&reports, clock.now())
        .await?)
}

/// Consumes the results until `shutdown`.
pub async fn consume(
    broker: Broker,
    db: DatabaseConnection,
    clock: SharedClock,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        if let Err(err) = consume_once(&broker, &db, &clock, &shutdown).await {
            tracing::warn!(error = %err, "delivery results consumer stopped; resubscribing");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn consume_once(
    broker: &Broker,
    db: &DatabaseConnection,
    clock: &SharedClock,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut subscription = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        subscribed = broker.subscribe(QUEUE, "usher-invitation", PREFETCH) => subscribed?,
    };
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            next = subscription.next() => match next {
                Some(delivery) => delivery?,
                None => break,
            },
        };
        // With it, whatever else has arrived already: one transaction each.
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match subscription.next().now_or_never() {
                Some(Some(delivery)) => batch.push(delivery?),
                Some(None) | None => break,
            }
        }
        let mut results = Vec::with_capacity(batch.len());
        let mut held = Vec::with_capacity(batch.len());
        for delivery in batch {
            match notification::DeliveryResult::decode(delivery.data.as_slice()) {
                Ok(result) => {
                    results.push(result);
                    held.push(delivery);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "undecodable delivery result dropped");
                    delivery.ack().await?;
                }
            }
        }
        match record(db, &results, clock).await {
            Ok(_) => {
                for delivery in held {
                    delivery.ack().await?;
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, results = held.len(), "delivery results not recorded; requeued");
                tokio::time::sleep(Duration::from_millis(500)).await;
                for delivery in held {
                    delivery.requeue().await?;
                }
            }
        }
    }
    subscription.close().await;
    Ok(())
}
