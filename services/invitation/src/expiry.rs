//! Publishes `invitation.expired` once per expired invitation: a periodic
//! sweep marks PENDING invitations past their expiry (`expiry_published`)
//! and writes the events to the outbox in the same transaction. Several
//! replicas may sweep at once (`FOR UPDATE SKIP LOCKED`); a resend clears the
//! mark, so a resent invitation that expires again is published again. The
//! rule is the state machine's ([`crate::domain::Invitation::expire`]).

use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;
use usher_kit::{clock::SharedClock, error::ApiResult};

use crate::store::Repository;

/// Most invitations marked per transaction.
const BATCH: u64 = 500;

/// Marks one batch of newly expired invitations and queues their events;
/// returns how many.
pub async fn sweep_once(db: &DatabaseConnection, clock: &SharedClock) -> ApiResult<usize> {
    let now = clock.now();
    let tx = Repository::new(db.clone()).begin().await?;
    let expired = tx.lock_newly_expired(now, BATCH).await?;
    let mut events = Vec::with_capacity(expired.len());
    for invitation in &expired {
        let Some(transition) = invitation.expire(now) else {
            continue;
        };
        tx.apply(&transition.row).await?;
        events.extend(transition.emit);
    }
    tx.emit(&events).await?;
    tx.commit().await?;
    Ok(events.len())
}

/// Sweeps every `every` until `shutdown`.
pub async fn run(
    db: DatabaseConnection,
    clock: SharedClock,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        loop {
            match sweep_once(&db, &clock).await {
                Ok(n) if n as u64 >= BATCH => continue,
                Ok(_) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "expiry sweep failed; retrying later");
                    break;
                }
            }
        }
    }
}
