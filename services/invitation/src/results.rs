//! Records the delivery results the notification service publishes for
//! invitation emails (`usher.email`, routing key `email.result.invitation`)
//! on the invitation whose latest email they concern: a result for an older
//! email (an earlier link, before a resend) is ignored.
//!
//! The queue is durable (quorum); messages are acked after the update
//! commits, and a result that cannot be decoded is dropped with a warning (it
//! would never decode on a redelivery either). The consumer re-subscribes
//! whenever the connection comes back.

use std::time::Duration;

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

/// Records `result` (see [`crate::domain::delivery`]); returns whether an
/// invitation was updated.
pub async fn record(
    db: &DatabaseConnection,
    result: &notification::DeliveryResult,
    clock: &SharedClock,
) -> ApiResult<bool> {
    let Some(report) = delivery::report(result) else {
        return Ok(false);
    };
    Ok(Repository::new(db.clone())
        .record_delivery(&report, clock.now())
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
        let delivery = tokio::select! {
            () = shutdown.cancelled() => break,
            next = subscription.next() => match next {
                Some(delivery) => delivery?,
                None => break,
            },
        };
        match notification::DeliveryResult::decode(delivery.data.as_slice()) {
            Ok(result) => match record(db, &result, clock).await {
                Ok(_) => delivery.ack().await?,
                Err(err) => {
                    tracing::warn!(error = %err, "delivery result not recorded; requeued");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    delivery.requeue().await?;
                }
            },
            Err(err) => {
                tracing::warn!(error = %err, "undecodable delivery result dropped");
                delivery.ack().await?;
            }
        }
    }
    subscription.close().await;
    Ok(())
}
