//! Publishes `invitation.expired` once per expired invitation: a periodic
//! sweep marks PENDING invitations past their expiry (`expiry_published`)
//! and writes the events to the outbox in the same transaction. Several
//! replicas may sweep at once (`FOR UPDATE SKIP LOCKED`); a resend clears the
//! mark, so a resent invitation that expires again is published again.

use std::time::Duration;

use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, EntityTrait, IntoActiveModel, QueryFilter,
    QuerySelect, TransactionTrait, sea_query::LockBehavior,
};
use tokio_util::sync::CancellationToken;
use usher_kit::{clock::SharedClock, error::ApiResult, outbox};

use crate::{
    api::{expired_event, state_of},
    store::entities::invitation::{self, Column},
};

/// Most invitations marked per transaction.
const BATCH: u64 = 500;

/// Marks one batch of newly expired invitations and queues their events;
/// returns how many.
pub async fn sweep_once(db: &DatabaseConnection, clock: &SharedClock) -> ApiResult<usize> {
    let now = clock.now();
    let txn = db.begin().await?;
    let expired = invitation::Entity::find()
        .filter(Column::State.eq("PENDING"))
        .filter(Column::ExpiryPublished.eq(false))
        .filter(Column::ExpireTime.lte(now))
        .limit(BATCH)
        .lock_with_behavior(
            sea_orm::sea_query::LockType::Update,
            LockBehavior::SkipLocked,
        )
        .all(&txn)
        .await?;
    let mut events = Vec::with_capacity(expired.len());
    for model in &expired {
        if state_of(model, now) != usher_proto::invitation::v1::InvitationState::Expired {
            continue;
        }
        let mut marked = model.clone();
        marked.expiry_published = true;
        marked.into_active_model().reset_all().update(&txn).await?;
        events.push(expired_event(model, now));
    }
    outbox::enqueue(&txn, &events).await?;
    txn.commit().await?;
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
