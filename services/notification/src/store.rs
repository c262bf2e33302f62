//! The `deliveries` table: one row per email job, keyed by the job id, so a
//! redelivered job is recognised (P25), and the source of the delivery API.
//! Every status change that the producer must learn of is written together
//! with its `DeliveryResult` in the outbox, in one transaction.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use prost::Message as _;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    QueryFilter, sea_query::Expr,
};
use sea_orm_migration::{prelude::*, schema::*};
use usher_kit::{
    amqp::{EMAIL_EXCHANGE, OutgoingMessage, PROTOBUF_CONTENT_TYPE},
    convert::timestamp,
    outbox,
};
use usher_proto::notification::v1 as pb;
use uuid::Uuid;

use crate::topology::result_routing_key;

/// AMQP `type` of a delivery result.
pub const DELIVERY_RESULT_TYPE: &str = "usher.notification.v1.DeliveryResult";
/// Longest stored reason.
pub const MAX_REASON_CHARS: usize = 500;

/// The status column's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Received, being sent or waiting for a retry.
    Queued,
    /// Accepted by the SMTP server (or written to the mail folder).
    Sent,
    /// Will never be sent; parked.
    Failed,
}

impl Status {
    /// The stored text.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::Sent => "SENT",
            Self::Failed => "FAILED",
        }
    }

    /// Parses the stored text.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "QUEUED" => Some(Self::Queued),
            "SENT" => Some(Self::Sent),
            "FAILED" => Some(Self::Failed),
            _ => None,
        }
    }

    /// The contract's enum.
    pub fn proto(self) -> pb::DeliveryStatus {
        match self {
            Self::Queued => pb::DeliveryStatus::Queued,
            Self::Sent => pb::DeliveryStatus::Sent,
            Self::Failed => pb::DeliveryStatus::Failed,
        }
    }
}

/// sea-orm entity of `deliveries`.
#[allow(missing_docs)]
pub mod delivery {
    use sea_orm::entity::prelude::*;

    /// One email job. `template` and `source` hold the contract's enum
    /// numbers; `status` is QUEUED, SENT or FAILED.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "deliveries")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub account_id: Uuid,
        pub source: i32,
        pub template: i32,
        pub recipient_email: String,
        pub recipient_name: String,
        pub locale: String,
        pub account_locale: String,
        pub status: String,
        pub reason: String,
        pub attempts: i32,
        pub invitation_id: String,
        pub user_id: String,
        pub token_version: i64,
        pub message_id: String,
        pub create_time: DateTimeUtc,
        pub update_time: DateTimeUtc,
        pub send_time: Option<DateTimeUtc>,
        pub lease_until: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

use delivery::{Column, Entity};

#[derive(DeriveIden)]
enum Deliveries {
    Table,
    Id,
    AccountId,
    Source,
    Template,
    RecipientEmail,
    RecipientName,
    Locale,
    AccountLocale,
    Status,
    Reason,
    Attempts,
    InvitationId,
    UserId,
    TokenVersion,
    MessageId,
    CreateTime,
    UpdateTime,
    SendTime,
    LeaseUntil,
}

/// Creates `deliveries`.
#[derive(Debug)]
pub struct CreateDeliveries;

impl MigrationName for CreateDeliveries {
    fn name(&self) -> &str {
        "m20260301_000001_create_deliveries"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateDeliveries {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Deliveries::Table)
                    .if_not_exists()
                    .col(uuid(Deliveries::Id).primary_key())
                    .col(uuid(Deliveries::AccountId))
                    .col(integer(Deliveries::Source))
                    .col(integer(Deliveries::Template))
                    .col(string_len(Deliveries::RecipientEmail, 254))
                    .col(string_len(Deliveries::RecipientName, 800))
                    .col(string_len(Deliveries::Locale, 16))
                    // The account's default locale as the job gave it
                    // (PreviewEmail's fallback).
                    .col(string_len(Deliveries::AccountLocale, 16))
                    .col(string_len(Deliveries::Status, 16))
                    .col(text(Deliveries::Reason))
                    .col(integer(Deliveries::Attempts))
                    .col(string_len(Deliveries::InvitationId, 64))
                    .col(string_len(Deliveries::UserId, 64))
                    .col(big_integer(Deliveries::TokenVersion))
                    .col(string_len(Deliveries::MessageId, 300))
                    .col(timestamp_with_time_zone(Deliveries::CreateTime))
                    .col(timestamp_with_time_zone(Deliveries::UpdateTime))
                    .col(timestamp_with_time_zone_null(Deliveries::SendTime))
                    .col(timestamp_with_time_zone_null(Deliveries::LeaseUntil))
                    .to_owned(),
            )
            .await?;
        // ListDeliveries: the account's rows, newest first (keyset).
        manager
            .create_index(
                Index::create()
                    .name("deliveries_account_time")
                    .table(Deliveries::Table)
                    .col(Deliveries::AccountId)
                    .col(Deliveries::CreateTime)
                    .col(Deliveries::Id)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(Deliveries::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}

/// Cuts a reason to [`MAX_REASON_CHARS`] and removes control characters.
pub fn sanitize_reason(reason: &str) -> String {
    reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON_CHARS)
        .collect::<String>()
        .trim()
        .to_owned()
}

/// What the consumer knows of a job before sending it.
#[derive(Clone, Debug)]
pub struct NewDelivery {
    /// The job id.
    pub id: Uuid,
    /// Its account.
    pub account_id: Uuid,
    /// Its producer.
    pub source: pb::EmailSource,
    /// Its template.
    pub template: pb::EmailTemplate,
    /// Recipient address.
    pub recipient_email: String,
    /// Recipient display name.
    pub recipient_name: String,
    /// Correlation ids.
    pub invitation_id: String,
    /// Correlation ids.
    pub user_id: String,
    /// Correlation: token version.
    pub token_version: i64,
    /// The account's default locale, as a supported locale or empty.
    pub account_locale: String,
}

impl NewDelivery {
    fn active(&self, now: DateTime<Utc>, status: Status, reason: &str) -> delivery::ActiveModel {
        delivery::ActiveModel {
            id: Set(self.id),
            account_id: Set(self.account_id),
            source: Set(self.source as i32),
            template: Set(self.template as i32),
            recipient_email: Set(self.recipient_email.chars().take(254).collect()),
            recipient_name: Set(self.recipient_name.chars().take(200).collect()),
            locale: Set(String::new()),
            account_locale: Set(self.account_locale.chars().take(16).collect()),
            status: Set(status.as_str().to_owned()),
            reason: Set(sanitize_reason(reason)),
            attempts: Set(0),
            invitation_id: Set(self.invitation_id.chars().take(64).collect()),
            user_id: Set(self.user_id.chars().take(64).collect()),
            token_version: Set(self.token_version),
            message_id: Set(String::new()),
            create_time: Set(now),
            update_time: Set(now),
            send_time: Set(None),
            lease_until: Set(None),
        }
    }
}

/// What [`claim`] found.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// This consumer may send; the row now counts this attempt.
    Send(delivery::Model),
    /// Already SENT or FAILED: ack without sending.
    Done(delivery::Model),
    /// Another consumer holds the lease (a duplicate copy in flight).
    Busy,
}

/// Records the job when first seen, then leases it for one sending attempt.
pub async fn claim(
    db: &DatabaseConnection,
    job: &NewDelivery,
    now: DateTime<Utc>,
    lease: chrono::Duration,
) -> Result<Claim, DbErr> {
    let mut claims = claim_many(db, std::slice::from_ref(job), now, lease).await?;
    claims
        .remove(&job.id)
        .ok_or_else(|| DbErr::RecordNotFound("delivery".into()))
}

/// [`claim`] for a batch of jobs, in one transaction: records the ones seen
/// for the first time (one `INSERT`), leases every one that may be sent (one
/// `UPDATE … RETURNING`), and reads the others. A job id given twice is
/// claimed once.
pub async fn claim_many(
    db: &DatabaseConnection,
    jobs: &[NewDelivery],
    now: DateTime<Utc>,
    lease: chrono::Duration,
) -> Result<HashMap<Uuid, Claim>, DbErr> {
    let mut seen = HashSet::new();
    let jobs: Vec<&NewDelivery> = jobs.iter().filter(|job| seen.insert(job.id)).collect();
    if jobs.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<Uuid> = jobs.iter().map(|job| job.id).collect();
    let txn = usher_kit::db::begin(db).await?;
    Entity::insert_many(jobs.iter().map(|job| job.active(now, Status::Queued, "")))
        .on_conflict_do_nothing_on([Column::Id])
        .exec_without_returning(&txn)
        .await?;
    let claimed = Entity::update_many()
        .col_expr(Column::Attempts, Expr::col(Column::Attempts).add(1))
        .col_expr(Column::LeaseUntil, Expr::value(Some(now + lease)))
        .col_expr(Column::UpdateTime, Expr::value(now))
        .filter(Column::Id.is_in(ids.iter().copied()))
        .filter(Column::Status.eq(Status::Queued.as_str()))
        .filter(Column::LeaseUntil.is_null().or(Column::LeaseUntil.lt(now)))
        .exec_with_returning(&txn)
        .await?;
    let mut claims: HashMap<Uuid, Claim> = claimed
        .into_iter()
        .map(|row| (row.id, Claim::Send(row)))
        .collect();
    let rest: Vec<Uuid> = ids
        .into_iter()
        .filter(|id| !claims.contains_key(id))
        .collect();
    if !rest.is_empty() {
        for row in Entity::find()
            .filter(Column::Id.is_in(rest))
            .all(&txn)
            .await?
        {
            let claim = if row.status == Status::Queued.as_str() {
                Claim::Busy
            } else {
                Claim::Done(row.clone())
            };
            claims.insert(row.id, claim);
        }
    }
    txn.commit().await?;
    Ok(claims)
}

/// A status change to record.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The new status.
    pub status: Status,
    /// Why (empty for SENT).
    pub reason: String,
    /// The locale rendered (empty when unknown).
    pub locale: String,
    /// The `Message-ID` (SENT only).
    pub message_id: String,
}

/// Records `outcome` on the job's row and, in the same transaction, its
/// `DeliveryResult` in the outbox. A row already SENT or FAILED is left
/// alone (returns `false`).
pub async fn record(
    db: &DatabaseConnection,
    id: Uuid,
    outcome: &Outcome,
    now: DateTime<Utc>,
) -> Result<bool, DbErr> {
    let recorded = record_many(db, &[(id, outcome.clone())], now).await?;
    Ok(recorded.contains(&id))
}

/// [`record`] for a batch, in one transaction: one `UPDATE` for every SENT
/// row, one per other outcome (rare), and one outbox `INSERT` for all the
/// results. Returns the ids recorded (rows already SENT or FAILED are left
/// alone).
pub async fn record_many(
    db: &DatabaseConnection,
    outcomes: &[(Uuid, Outcome)],
    now: DateTime<Utc>,
) -> Result<HashSet<Uuid>, DbErr> {
    if outcomes.is_empty() {
        return Ok(HashSet::new());
    }
    let txn = usher_kit::db::begin(db).await?;
    let mut rows = Vec::with_capacity(outcomes.len());
    let (sent, others): (Vec<_>, Vec<_>) = outcomes
        .iter()
        .partition(|(_, outcome)| outcome.status == Status::Sent);
    if let Some(((first_id, first), rest)) = sent.split_first() {
        // Per-row values through `CASE id WHEN … THEN …`: one statement.
        let case = |value: fn(&Outcome) -> String| {
            rest.iter().fold(
                Expr::case(Column::Id.eq(*first_id), value(first)),
                |case, (id, outcome)| case.case(Column::Id.eq(*id), value(outcome)),
            )
        };
        let locale = case(|o| o.locale.clone()).finally(Expr::col(Column::Locale));
        let message_id = case(|o| o.message_id.clone()).finally(Expr::col(Column::MessageId));
        rows.extend(
            queued_rows(sent.iter().map(|(id, _)| *id))
                .col_expr(Column::Status, Expr::value(Status::Sent.as_str()))
                .col_expr(Column::Reason, Expr::value(String::new()))
                .col_expr(Column::UpdateTime, Expr::value(now))
                .col_expr(
                    Column::LeaseUntil,
                    Expr::value(Option::<DateTime<Utc>>::None),
                )
                .col_expr(Column::SendTime, Expr::value(Some(now)))
                .col_expr(Column::Locale, locale.into())
                .col_expr(Column::MessageId, message_id.into())
                .exec_with_returning(&txn)
                .await?,
        );
    }
    for (id, outcome) in others {
        let mut update = queued_rows([*id])
            .col_expr(Column::Status, Expr::value(outcome.status.as_str()))
            .col_expr(
                Column::Reason,
                Expr::value(sanitize_reason(&outcome.reason)),
            )
            .col_expr(Column::UpdateTime, Expr::value(now))
            .col_expr(
                Column::LeaseUntil,
                Expr::value(Option::<DateTime<Utc>>::None),
            );
        if !outcome.locale.is_empty() {
            update = update.col_expr(Column::Locale, Expr::value(outcome.locale.clone()));
        }
        rows.extend(update.exec_with_returning(&txn).await?);
    }
    if rows.is_empty() {
        txn.rollback().await?;
        return Ok(HashSet::new());
    }
    let results: Vec<_> = rows.iter().map(result_message).collect();
    outbox::enqueue(&txn, &results).await?;
    txn.commit().await?;
    Ok(rows.into_iter().map(|row| row.id).collect())
}

/// An `UPDATE` of the rows `ids` still QUEUED (a row SENT or FAILED never
/// changes again).
fn queued_rows(ids: impl IntoIterator<Item = Uuid>) -> sea_orm::UpdateMany<Entity> {
    Entity::update_many()
        .filter(Column::Id.is_in(ids))
        .filter(Column::Status.eq(Status::Queued.as_str()))
}

/// Puts a FAILED job back to QUEUED (an operator replays it from the
/// parking queue), with fresh attempts and its QUEUED result, in one
/// transaction. Returns whether a FAILED row was reset (a SENT row is left
/// alone: the replayed copy is then acked as a duplicate).
pub async fn requeue_failed(
    db: &DatabaseConnection,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, DbErr> {
    let txn = usher_kit::db::begin(db).await?;
    let rows = Entity::update_many()
        .col_expr(Column::Status, Expr::value(Status::Queued.as_str()))
        .col_expr(
            Column::Reason,
            Expr::value("replayed from the parking queue".to_owned()),
        )
        .col_expr(Column::Attempts, Expr::value(0))
        .col_expr(
            Column::LeaseUntil,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .col_expr(Column::UpdateTime, Expr::value(now))
        .filter(Column::Id.eq(id))
        .filter(Column::Status.eq(Status::Failed.as_str()))
        .exec_with_returning(&txn)
        .await?;
    let results: Vec<_> = rows.iter().map(result_message).collect();
    if !results.is_empty() {
        outbox::enqueue(&txn, &results).await?;
    }
    txn.commit().await?;
    Ok(!rows.is_empty())
}

/// Records a job that is FAILED from the start (malformed, refused before any
/// attempt), with its result, unless its row exists already.
pub async fn record_rejected(
    db: &DatabaseConnection,
    job: &NewDelivery,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    let txn = usher_kit::db::begin(db).await?;
    let inserted = Entity::insert(job.active(now, Status::Failed, reason))
        .on_conflict_do_nothing_on([Column::Id])
        .exec(&txn)
        .await?;
    if matches!(inserted, sea_orm::TryInsertResult::Inserted(_)) {
        if let Some(row) = Entity::find_by_id(job.id).one(&txn).await? {
            outbox::enqueue(&txn, &[result_message(&row)]).await?;
        }
        txn.commit().await?;
    } else {
        txn.rollback().await?;
        // A row exists (an earlier copy): fail it the normal way.
        record(
            db,
            job.id,
            &Outcome {
                status: Status::Failed,
                reason: reason.to_owned(),
                locale: String::new(),
                message_id: String::new(),
            },
            now,
        )
        .await?;
    }
    Ok(())
}

/// The `DeliveryResult` of a row, as an outbox message routed to its producer.
pub fn result_message(row: &delivery::Model) -> OutgoingMessage {
    let status = Status::parse(&row.status).unwrap_or(Status::Queued);
    let source = match pb::EmailSource::try_from(row.source) {
        Ok(pb::EmailSource::Identity) => "identity",
        Ok(pb::EmailSource::Invitation) => "invitation",
        _ => "unknown",
    };
    let result = pb::DeliveryResult {
        job_id: row.id.to_string(),
        account_id: row.account_id.to_string(),
        template: row.template,
        invitation_id: row.invitation_id.clone(),
        user_id: row.user_id.clone(),
        token_version: row.token_version,
        status: status.proto() as i32,
        reason: row.reason.clone(),
        attempts: row.attempts,
        status_time: Some(timestamp(row.update_time)),
        message_id: if status == Status::Sent {
            row.message_id.clone()
        } else {
            String::new()
        },
    };
    // A fresh message id per status change: consumers dedupe on it, and a
    // job has several results (QUEUED, then SENT).
    let message = OutgoingMessage::new(
        EMAIL_EXCHANGE,
        result_routing_key(source),
        DELIVERY_RESULT_TYPE,
        result.encode_to_vec(),
    )
    .with_content_type(PROTOBUF_CONTENT_TYPE);
    if result_queue(source).is_some() {
        // Mandatory: its queue is declared by this service too, and should
        // it be missing, the result stays in the outbox (retried) instead of
        // being dropped by the broker.
        message
    } else {
        // Broadcast: a producer with no declared result queue (identity
        // consumes none) must not keep this service's outbox from draining.
        message.broadcast()
    }
}

/// The producers whose result queue this service declares itself (durable,
/// quorum, bound to `email.result.<source>`), with the same arguments as
/// the producer does: results published before the producer ever started
/// wait there instead of being lost.
pub const RESULT_QUEUES: [(&str, &str); 1] = [("invitation", "usher.invitation.delivery-results")];

/// The declared result queue of `source`, if any.
pub fn result_queue(source: &str) -> Option<&'static str> {
    RESULT_QUEUES
        .iter()
        .find(|(name, _)| *name == source)
        .map(|(_, queue)| *queue)
}

/// The account's default locale from its newest delivery that gave one.
pub async fn account_locale<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
) -> Result<Option<String>, DbErr> {
    use sea_orm::{QueryOrder, QuerySelect};
    Ok(Entity::find()
        .filter(Column::AccountId.eq(account_id))
        .filter(Column::AccountLocale.ne(""))
        .order_by_desc(Column::CreateTime)
        .limit(1)
        .one(db)
        .await?
        .map(|row| row.account_locale))
}

/// One row by id, within `account_id` only.
pub async fn get<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    id: Uuid,
) -> Result<Option<delivery::Model>, DbErr> {
    Entity::find_by_id(id)
        .filter(Column::AccountId.eq(account_id))
        .one(db)
        .await
}
