//! The transactional outbox (CONVENTIONS.md #8): what must reach the broker
//! after a commit — an email job, a domain event — is written to the
//! `usher_outbox` table *in the same transaction* as the change that causes
//! it ([`enqueue`]), and an [`OutboxRelay`] publishes it afterwards through a
//! [`MessageSink`] (RabbitMQ with publisher confirms in production).
//!
//! # Delivery is at least once
//!
//! A row is deleted only after the broker confirmed its message. A crash (or a
//! lost commit) between the confirm and the delete publishes the message again
//! later, so **consumers must deduplicate on `message_id`**
//! ([`OutgoingMessage::message_id`]); the notification service does so on the
//! job id. A rolled-back transaction never publishes anything.
//!
//! # The relay
//!
//! Each cycle takes up to `batch_size` rows in id order — on PostgreSQL in a
//! transaction with `FOR UPDATE SKIP LOCKED`, so several replicas share the
//! work and never publish the same row at once; on SQLite (`usher dev`, one
//! process) with a plain `SELECT` — publishes them as one batch, deletes
//! exactly the confirmed rows and records `attempts`/`last_error` on the
//! others, then commits.
//!
//! - [`AmqpError::Unavailable`] (broker down) stops the batch at that message:
//!   it is charged one attempt, later rows are left as they are, and the relay
//!   backs off exponentially up to `max_backoff` — no hot loop, order kept.
//! - Any other failure (returned, nacked, confirm timeout, refused) concerns
//!   that message only: it gets one attempt and is set aside for
//!   `2^attempts` seconds (at most [`MAX_RETRY_DELAY`]) through its
//!   `available_at` column, so a poison message never blocks the rows behind
//!   it; the batch goes on.
//!
//! The relay wakes on `LISTEN usher_outbox` (PostgreSQL; a statement trigger
//! on the table notifies, delivered at commit: [`notify_migration`]) — then
//! lets commits gather for
//! [`DEFAULT_GATHER`], so one cycle carries many commits' messages under
//! load — and otherwise every `poll_interval`.
//! It exports `usher_outbox_pending` (gauge), `usher_outbox_published_total`
//! and `usher_outbox_publish_failures_total` (counters).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, DeriveIden, QueryResult, Statement,
    TransactionSession, TransactionTrait,
    sea_query::{Expr, ExprTrait, LockBehavior, LockType, Order, Query},
};
use sea_orm_migration::{
    MigrationName, MigrationTrait, SchemaManager,
    schema::{big_pk_auto, blob, integer, json_binary, text_null, timestamp_with_time_zone},
    sea_query::Table,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::amqp::{AmqpError, MessageSink, OutgoingMessage};

/// The table, and the PostgreSQL notification channel the relay listens on.
pub const CHANNEL: &str = "usher_outbox";
/// Rows taken per relay cycle unless told otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 500;
/// How often the relay looks for rows when nothing wakes it.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long the relay lets commits gather after a notification before it
/// takes a batch: under steady load, one cycle (one select, one publish
/// batch, one delete) carries the messages of many commits instead of one.
pub const DEFAULT_GATHER: Duration = Duration::from_millis(10);
/// The longest pause after the broker was found unavailable.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest a message that failed on its own is set aside.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// Messages per `INSERT`.
const INSERT_CHUNK: usize = 1_000;
/// The outbox insert on PostgreSQL: the messages travel as one `jsonb` array
/// of `[envelope, payload in hex]` pairs, so the statement's text is the same
/// whatever their number. With a parameter per value each batch size was a
/// statement of its own, which every pooled connection prepared (one round
/// trip more) and kept in its statement cache with a type per parameter:
/// about 360 KiB for a batch of 1,000, 8 MiB of identity's heap after a run
/// of bulk invitations (heaptrack).
const ENQUEUE_SQL: &str = "INSERT INTO usher_outbox (message, payload) \
     SELECT m.value -> 0, decode(m.value ->> 1, 'hex') FROM jsonb_array_elements($1) AS m";
/// Ids per `DELETE … WHERE id IN (…)`.
const DELETE_CHUNK: usize = 1_000;
/// First pause after an unavailable broker or a database error.
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// The pending gauge is refreshed (a `COUNT(*)`) at most this often.
const PENDING_GAUGE_INTERVAL: Duration = Duration::from_secs(1);
/// `last_error` is cut to this many characters.
const MAX_ERROR_CHARS: usize = 1_000;

#[derive(DeriveIden)]
enum UsherOutbox {
    Table,
    Id,
    Message,
    Payload,
    CreatedAt,
    AvailableAt,
    Attempts,
    LastError,
}

/// The migration that creates `usher_outbox`; every service's `Migrator` lists it.
pub fn migration() -> Box<dyn MigrationTrait> {
    Box::new(CreateUsherOutbox)
}

struct CreateUsherOutbox;

/// The migration that makes PostgreSQL notify the relay of every insert
/// into `usher_outbox`: an `AFTER INSERT … FOR EACH STATEMENT` trigger
/// calling `pg_notify('usher_outbox', '')`, delivered at commit like the
/// `NOTIFY` statement [`enqueue`] used to send after its insert — one round
/// trip fewer per writing transaction. Nothing on SQLite. Every service's
/// `Migrator` lists it after [`migration`].
pub fn notify_migration() -> Box<dyn MigrationTrait> {
    Box::new(NotifyOnInsert)
}

struct NotifyOnInsert;

impl MigrationName for NotifyOnInsert {
    fn name(&self) -> &str {
        "m20261206_000001_usher_outbox_notify_trigger"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for NotifyOnInsert {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared(&format!(
                "CREATE OR REPLACE FUNCTION usher_outbox_notify() RETURNS trigger \
                 LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('{CHANNEL}', ''); RETURN NULL; END $$; \
                 DROP TRIGGER IF EXISTS usher_outbox_notify ON usher_outbox; \
                 CREATE TRIGGER usher_outbox_notify AFTER INSERT ON usher_outbox \
                 FOR EACH STATEMENT EXECUTE FUNCTION usher_outbox_notify();"
            ))
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared(
                "DROP TRIGGER IF EXISTS usher_outbox_notify ON usher_outbox; \
                 DROP FUNCTION IF EXISTS usher_outbox_notify();",
            )
            .await?;
        Ok(())
    }
}

impl MigrationName for CreateUsherOutbox {
    fn name(&self) -> &str {
        "m20260101_000001_create_usher_outbox"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateUsherOutbox {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(UsherOutbox::Table)
                    .if_not_exists()
                    // BIGSERIAL on PostgreSQL, INTEGER PRIMARY KEY AUTOINCREMENT on SQLite.
                    .col(big_pk_auto(UsherOutbox::Id))
                    // The message without its payload, as JSON (JSONB on PostgreSQL).
                    .col(json_binary(UsherOutbox::Message))
                    // The payload as bytes (BYTEA / BLOB): no base64 growth.
                    .col(blob(UsherOutbox::Payload))
                    .col(
                        timestamp_with_time_zone(UsherOutbox::CreatedAt)
                            .default(Expr::current_timestamp()),
                    )
                    // Not taken before this time (set after a message-specific failure).
                    .col(
                        timestamp_with_time_zone(UsherOutbox::AvailableAt)
                            .default(Expr::current_timestamp()),
                    )
                    .col(integer(UsherOutbox::Attempts).default(0))
                    .col(text_null(UsherOutbox::LastError))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(UsherOutbox::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}

/// What the `message` column holds: the message minus its payload.
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    content_type: &'a str,
    message_id: &'a str,
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<u64>,
    headers: &'a BTreeMap<String, String>,
    mandatory: bool,
}

#[derive(Deserialize)]
struct Envelope {
    exchange: String,
    routing_key: String,
    content_type: String,
    message_id: String,
    kind: String,
    #[serde(default)]
    timestamp: Option<u64>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default = "mandatory_by_default")]
    mandatory: bool,
}

fn mandatory_by_default() -> bool {
    true
}

fn envelope_json(message: &OutgoingMessage) -> Result<serde_json::Value, DbErr> {
    serde_json::to_value(EnvelopeRef {
        exchange: &message.exchange,
        routing_key: &message.routing_key,
        content_type: &message.content_type,
        message_id: &message.message_id,
        kind: &message.kind,
        timestamp: message.timestamp,
        headers: &message.headers,
        mandatory: message.mandatory,
    })
    .map_err(|e| DbErr::Custom(format!("outbox message not serializable: {e}")))
}

/// Writes `messages` to the outbox on `conn` — the caller's transaction, so
/// they are published if and only if it commits. One multi-row `INSERT` per
/// 1,000 messages; on PostgreSQL the table's trigger ([`notify_migration`])
/// notifies `usher_outbox` (delivered at commit) to wake the relays.
pub async fn enqueue<C: ConnectionTrait>(
    conn: &C,
    messages: &[OutgoingMessage],
) -> Result<(), DbErr> {
    if messages.is_empty() {
        return Ok(());
    }
    if conn.get_database_backend() == DbBackend::Postgres {
        for chunk in messages.chunks(INSERT_CHUNK) {
            let rows = chunk
                .iter()
                .map(|message| {
                    Ok(serde_json::json!([
                        envelope_json(message)?,
                        hex::encode(&message.payload)
                    ]))
                })
                .collect::<Result<Vec<_>, DbErr>>()?;
            let rows = sea_orm::Value::Json(Some(Box::new(serde_json::Value::Array(rows))));
            conn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                ENQUEUE_SQL,
                [rows],
            ))
            .await?;
        }
        return Ok(());
    }
    for chunk in messages.chunks(INSERT_CHUNK) {
        let mut insert = Query::insert();
        insert
            .into_table(UsherOutbox::Table)
            .columns([UsherOutbox::Message, UsherOutbox::Payload]);
        for message in chunk {
            let envelope = sea_orm::Value::Json(Some(Box::new(envelope_json(message)?)));
            let payload = sea_orm::Value::Bytes(Some(message.payload.clone()));
            insert
                .values([envelope.into(), payload.into()])
                .map_err(|e| DbErr::Custom(format!("outbox insert: {e}")))?;
        }
        conn.execute(&insert).await?;
    }
    Ok(())
}

/// How many messages wait in the outbox (including set-aside ones).
pub async fn pending<C: ConnectionTrait>(db: &C) -> Result<u64, DbErr> {
    let count = Query::select()
        .expr_as(Expr::col(UsherOutbox::Id).count(), "n")
        .from(UsherOutbox::Table)
        .to_owned();
    let row = db.query_one(&count).await?;
    let n: i64 = match row {
        Some(row) => row.try_get("", "n")?,
        None => 0,
    };
    Ok(u64::try_from(n).unwrap_or(0))
}

/// What one relay cycle did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayOutcome {
    /// Rows taken.
    pub selected: usize,
    /// Rows confirmed by the sink and deleted.
    pub published: usize,
    /// Rows that failed and stay (attempts recorded).
    pub failed: usize,
    /// The sink reported the broker unavailable (the batch stopped there).
    pub unavailable: bool,
}

/// One row taken from the outbox.
struct Row {
    id: i64,
    attempts: i32,
    message: Result<OutgoingMessage, String>,
}

/// The columns [`decode`] reads, of every row in id order.
fn rows_in_order() -> sea_orm::sea_query::SelectStatement {
    Query::select()
        .columns([
            UsherOutbox::Id,
            UsherOutbox::Attempts,
            UsherOutbox::Message,
            UsherOutbox::Payload,
        ])
        .from(UsherOutbox::Table)
        .order_by(UsherOutbox::Id, Order::Asc)
        .to_owned()
}

fn decode(row: &QueryResult) -> Result<Row, DbErr> {
    let id: i64 = row.try_get("", "id")?;
    let attempts: i32 = row.try_get("", "attempts")?;
    let envelope: serde_json::Value = row.try_get("", "message")?;
    let payload: Vec<u8> = row.try_get("", "payload")?;
    let message = serde_json::from_value::<Envelope>(envelope)
        .map(|e| OutgoingMessage {
            exchange: e.exchange,
            routing_key: e.routing_key,
            payload,
            content_type: e.content_type,
            message_id: e.message_id,
            kind: e.kind,
            timestamp: e.timestamp,
            headers: e.headers,
            mandatory: e.mandatory,
        })
        .map_err(|e| format!("undecodable outbox row: {e}"));
    Ok(Row {
        id,
        attempts,
        message,
    })
}

/// A failure to record on a row.
struct Failure {
    id: i64,
    error: String,
    /// Set the row aside for this long (`None`: the broker was down, retry in order).
    retry_in: Option<Duration>,
}

fn retry_delay(attempts_after: i32) -> Duration {
    let exponent = u32::try_from(attempts_after.clamp(0, 16)).unwrap_or(16);
    Duration::from_secs(1u64 << exponent).min(MAX_RETRY_DELAY)
}

/// Publishes the outbox of one database. See the module documentation.
#[derive(Debug)]
pub struct OutboxRelay {
    db: DatabaseConnection,
    sink: Arc<dyn MessageSink>,
    batch_size: usize,
    poll_interval: Duration,
    gather: Duration,
    max_backoff: Duration,
    shutdown: CancellationToken,
    wake: Arc<Notify>,
}

impl OutboxRelay {
    /// A relay of `db`'s outbox into `sink`, stopping when `shutdown` is
    /// cancelled; batch of [`DEFAULT_BATCH_SIZE`], polling every
    /// [`DEFAULT_POLL_INTERVAL`].
    pub fn new(
        db: DatabaseConnection,
        sink: Arc<dyn MessageSink>,
        shutdown: CancellationToken,
    ) -> Self {
        // Served from the start: the gauge at zero until the first cycle counts.
        metrics::gauge!("usher_outbox_pending").set(0.0);
        metrics::counter!("usher_outbox_published_total").increment(0);
        metrics::counter!("usher_outbox_publish_failures_total").increment(0);
        Self {
            db,
            sink,
            batch_size: DEFAULT_BATCH_SIZE,
            poll_interval: DEFAULT_POLL_INTERVAL,
            gather: DEFAULT_GATHER,
            max_backoff: DEFAULT_MAX_BACKOFF,
            shutdown,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Rows per cycle (at least 1).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How often to look for rows when no notification arrives.
    #[must_use]
    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }

    /// How long commits gather after a notification before a cycle
    /// ([`DEFAULT_GATHER`]; zero takes a batch at once).
    #[must_use]
    pub fn with_gather(mut self, gather: Duration) -> Self {
        self.gather = gather;
        self
    }

    /// The longest pause after the broker (or the database) was unavailable.
    #[must_use]
    pub fn with_max_backoff(mut self, max_backoff: Duration) -> Self {
        self.max_backoff = max_backoff.max(INITIAL_BACKOFF);
        self
    }

    /// Relays until shutdown. Errors are logged and retried, never returned.
    pub async fn run(self) {
        let listener = (self.db.get_database_backend() == DbBackend::Postgres).then(|| {
            let pool = self.db.get_postgres_connection_pool().clone();
            tokio::spawn(listen(pool, self.wake.clone(), self.shutdown.child_token()))
        });
        let mut backoff: Option<Duration> = None;
        let mut last_count: Option<tokio::time::Instant> = None;
        tracing::info!(batch_size = self.batch_size, "outbox relay started");
        while !self.shutdown.is_cancelled() {
            let outcome = self.relay_once().await;
            if last_count.is_none_or(|at| at.elapsed() >= PENDING_GAUGE_INTERVAL) {
                self.record_pending().await;
                last_count = Some(tokio::time::Instant::now());
            }
            let database_error = match outcome {
                Ok(outcome) if outcome.unavailable => false,
                Ok(outcome) => {
                    backoff = None;
                    if outcome.selected == self.batch_size && outcome.published > 0 {
                        continue; // more is waiting: go on at once
                    }
                    tokio::select! {
                        () = self.shutdown.cancelled() => break,
                        () = self.wake.notified() => {
                            if !self.gather.is_zero() {
                                tokio::time::sleep(self.gather).await;
                            }
                        }
                        () = tokio::time::sleep(self.poll_interval) => {}
                    }
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "outbox relay cycle failed");
                    true
                }
            };
            let delay = backoff.map_or(INITIAL_BACKOFF, |d| (d * 2).min(self.max_backoff));
            backoff = Some(delay);
            tracing::debug!(
                delay_ms = delay.as_millis() as u64,
                database_error,
                "outbox relay backing off"
            );
            // Notifications do not cut a backoff short: a busy service would
            // otherwise retry a down broker on every commit.
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        if let Some(listener) = listener {
            let _ = listener.await;
        }
        tracing::info!("outbox relay stopped");
    }

    async fn record_pending(&self) {
        match pending(&self.db).await {
            Ok(n) => metrics::gauge!("usher_outbox_pending").set(n as f64),
            Err(error) => tracing::debug!(%error, "outbox pending count failed"),
        }
    }

    /// One cycle: take a batch, publish it, delete what was confirmed, record
    /// the failures.
    pub async fn relay_once(&self) -> Result<RelayOutcome, DbErr> {
        if self.db.get_database_backend() == DbBackend::Postgres {
            // The row locks live as long as the transaction: another replica
            // skips these rows until this one has deleted or released them.
            let txn = self.db.begin().await?;
            let outcome = self.relay_batch(&txn, true).await?;
            txn.commit().await?;
            Ok(outcome)
        } else {
            // One process only: no lock needed, and no read transaction held
            // across the publish (SQLite would refuse the later write if a
            // request committed in between).
            self.relay_batch(&self.db, false).await
        }
    }

    async fn relay_batch<C: ConnectionTrait + TransactionTrait>(
        &self,
        conn: &C,
        lock: bool,
    ) -> Result<RelayOutcome, DbErr> {
        let mut select = rows_in_order();
        select
            .and_where(Expr::col(UsherOutbox::AvailableAt).lte(Expr::current_timestamp()))
            .limit(self.batch_size as u64);
        if lock {
            select.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
        }
        let rows = conn.query_all(&select).await?;
        let rows = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
        let mut outcome = RelayOutcome {
            selected: rows.len(),
            ..RelayOutcome::default()
        };
        if rows.is_empty() {
            return Ok(outcome);
        }

        let mut failures = Vec::new();
        let mut sendable = Vec::with_capacity(rows.len());
        for row in &rows {
            match &row.message {
                Ok(message) => sendable.push((row, message.clone())),
                Err(error) => failures.push(Failure {
                    id: row.id,
                    error: error.clone(),
                    retry_in: Some(retry_delay(row.attempts + 1)),
                }),
            }
        }
        let messages: Vec<OutgoingMessage> = sendable.iter().map(|(_, m)| m.clone()).collect();
        // A span per message made in a traced call, in that call's trace,
        // lasting as long as the batch's publish and confirm.
        let spans: Vec<tracing::Span> = messages
            .iter()
            .filter(|m| m.headers.contains_key(crate::telemetry::TRACEPARENT))
            .map(|m| {
                let span = tracing::info_span!(
                    "amqp.publish",
                    routing_key = %m.routing_key,
                    message_id = %m.message_id,
                    trace_id = tracing::field::Empty,
                );
                crate::telemetry::continue_trace_from(&span, &m.headers);
                span
            })
            .collect();
        let results = self.sink.publish_batch(&messages).await;
        drop(spans);

        let mut confirmed = Vec::with_capacity(messages.len());
        for (index, (row, _)) in sendable.iter().enumerate() {
            // A sink that answers short is treated as unavailable for the rest.
            match results
                .get(index)
                .cloned()
                .unwrap_or(Err(AmqpError::Unavailable))
            {
                Ok(()) => confirmed.push(row.id),
                Err(AmqpError::Unavailable) => {
                    failures.push(Failure {
                        id: row.id,
                        error: AmqpError::Unavailable.to_string(),
                        retry_in: None,
                    });
                    outcome.unavailable = true;
                    break;
                }
                Err(error) => failures.push(Failure {
                    id: row.id,
                    error: error.to_string(),
                    retry_in: Some(retry_delay(row.attempts + 1)),
                }),
            }
        }

        if lock {
            // Already in the transaction that holds the rows' locks: no
            // savepoint of its own.
            record_outcome(conn, &confirmed, &failures).await?;
        } else {
            let txn = conn.begin().await?;
            record_outcome(&txn, &confirmed, &failures).await?;
            txn.commit().await?;
        }

        outcome.published = confirmed.len();
        outcome.failed = failures.len();
        metrics::counter!("usher_outbox_published_total").increment(confirmed.len() as u64);
        if !failures.is_empty() {
            metrics::counter!("usher_outbox_publish_failures_total")
                .increment(failures.len() as u64);
            let first = &failures[0];
            tracing::warn!(
                failed = failures.len(),
                published = confirmed.len(),
                outbox_id = first.id,
                error = %first.error,
                "outbox messages not published"
            );
        } else {
            tracing::debug!(published = confirmed.len(), "outbox batch published");
        }
        Ok(outcome)
    }
}

/// Deletes the `confirmed` rows and records the `failures` (attempts, the
/// error, and when to try again) on `db`.
async fn record_outcome<C: ConnectionTrait>(
    db: &C,
    confirmed: &[i64],
    failures: &[Failure],
) -> Result<(), DbErr> {
    for ids in confirmed.chunks(DELETE_CHUNK) {
        let delete = Query::delete()
            .from_table(UsherOutbox::Table)
            .and_where(Expr::col(UsherOutbox::Id).is_in(ids.iter().copied()))
            .to_owned();
        db.execute(&delete).await?;
    }
    for failure in failures {
        let error: String = failure.error.chars().take(MAX_ERROR_CHARS).collect();
        let mut update = Query::update();
        update
            .table(UsherOutbox::Table)
            .value(
                UsherOutbox::Attempts,
                Expr::col(UsherOutbox::Attempts).add(1),
            )
            .value(UsherOutbox::LastError, error)
            .and_where(Expr::col(UsherOutbox::Id).eq(failure.id));
        if let Some(delay) = failure.retry_in {
            update.value(
                UsherOutbox::AvailableAt,
                later(db.get_database_backend(), delay),
            );
        }
        db.execute(&update).await?;
    }
    Ok(())
}

/// The database's current time plus `delay`, in the column's own format.
fn later(backend: DbBackend, delay: Duration) -> Expr {
    let seconds = delay.as_secs();
    match backend {
        DbBackend::Sqlite => Expr::cust(format!("datetime('now', '+{seconds} seconds')")),
        _ => Expr::cust(format!("CURRENT_TIMESTAMP + INTERVAL '{seconds} seconds'")),
    }
}

/// Wakes the relay on every `NOTIFY usher_outbox`, reconnecting the listener
/// when it drops (and waking the relay then, as notifications may have been
/// missed meanwhile).
async fn listen(pool: sea_orm::sqlx::PgPool, wake: Arc<Notify>, shutdown: CancellationToken) {
    use sea_orm::sqlx::postgres::PgListener;
    let mut delay = INITIAL_BACKOFF;
    loop {
        let connected = tokio::select! {
            () = shutdown.cancelled() => return,
            listener = async {
                let mut listener = PgListener::connect_with(&pool).await?;
                listener.listen(CHANNEL).await?;
                Ok::<_, sea_orm::sqlx::Error>(listener)
            } => listener,
        };
        match connected {
            Ok(mut listener) => {
                delay = INITIAL_BACKOFF;
                tracing::debug!("outbox listener connected");
                wake.notify_one();
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        received = listener.try_recv() => match received {
                            Ok(Some(_)) => wake.notify_one(),
                            // The connection dropped; the next call reconnects.
                            Ok(None) => wake.notify_one(),
                            Err(error) => {
                                tracing::warn!(%error, "outbox listener failed");
                                break;
                            }
                        },
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "outbox listener could not connect"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(DEFAULT_MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    };

    use futures::future::BoxFuture;
    use sea_orm::Database;
    use sea_orm_migration::MigratorTrait;

    use super::*;
    use crate::{
        amqp::{
            Amqp, ConfirmedPublisher,
            tests::{cleanup, connected_with_queue, drain, test_config, unique},
        },
        config::{DatabaseConfig, Secret},
        db,
    };

    struct TestMigrator;

    impl MigratorTrait for TestMigrator {
        fn migrations() -> Vec<Box<dyn MigrationTrait>> {
            vec![migration(), notify_migration()]
        }
    }

    /// A fresh, migrated PostgreSQL database; drop it with [`drop_database`].
    async fn fresh_database() -> (DatabaseConnection, String) {
        let name = format!("usher_kit_test_{}", uuid::Uuid::new_v4().simple());
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        db::ensure_database(&url).await.expect("create database");
        let config = DatabaseConfig {
            url: Secret::new(url),
            ..DatabaseConfig::local(&name)
        };
        let conn = db::connect(&config).await.expect("connect");
        TestMigrator::up(&conn, None).await.expect("migrate");
        (conn, name)
    }

    async fn drop_database(conn: DatabaseConnection, name: &str) {
        conn.close().await.expect("close");
        let admin = Database::connect("postgres://postgres@127.0.0.1:5432/postgres")
            .await
            .expect("admin");
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await
            .expect("drop database");
        admin.close().await.expect("close admin");
    }

    fn messages(exchange: &str, n: usize, tag: &str) -> Vec<OutgoingMessage> {
        (0..n)
            .map(|i| {
                OutgoingMessage::new(
                    exchange,
                    format!("email.send.{i}"),
                    "test.Job",
                    format!("{tag}-{i}").into_bytes(),
                )
                .with_header("tag", tag)
            })
            .collect()
    }

    /// Every batch size is the same prepared statement on a connection, and
    /// each message reads back as it was enqueued (payload bytes included).
    #[tokio::test]
    async fn postgresql_enqueues_any_batch_with_one_statement_text() {
        let (pooled, name) = fresh_database().await;
        // One connection, so its prepared statements can be counted.
        let config = DatabaseConfig {
            max_connections: 1,
            ..DatabaseConfig::local(&name)
        };
        let db = db::connect(&config).await.expect("connect");
        let mut written = Vec::new();
        for (n, tag) in [(1, "one"), (7, "seven"), (1_300, "many")] {
            let mut batch = messages("x", n, tag);
            batch[0].payload = vec![0, 0xff, b'\\', b'"', 0x7f];
            enqueue(&db, &batch).await.expect("enqueue");
            written.extend(batch);
        }
        let read: Vec<OutgoingMessage> = db
            .query_all(&rows_in_order())
            .await
            .expect("read")
            .iter()
            .map(|row| decode(row).expect("row").message.expect("message"))
            .collect();
        assert!(
            read == written,
            "messages read back differ from those enqueued"
        );
        let prepared = db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT COUNT(*) AS n FROM pg_prepared_statements \
                 WHERE statement LIKE 'INSERT INTO usher_outbox%'",
            ))
            .await
            .expect("count")
            .expect("row");
        assert_eq!(prepared.try_get::<i64>("", "n").expect("n"), 1);
        db.close().await.expect("close");
        drop_database(pooled, &name).await;
    }

    async fn wait_until_empty(db: &DatabaseConnection, within: Duration) {
        let drained = tokio::time::timeout(within, async {
            while pending(db).await.expect("pending") > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            drained.is_ok(),
            "outbox still holds {} rows",
            pending(db).await.unwrap_or(0)
        );
    }

    fn count_by_id(deliveries: &[lapin::message::Delivery]) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for delivery in deliveries {
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .expect("message id")
                .to_string();
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }

    async fn attempts(db: &DatabaseConnection) -> Vec<(i32, Option<String>)> {
        let select = Query::select()
            .columns([UsherOutbox::Attempts, UsherOutbox::LastError])
            .from(UsherOutbox::Table)
            .order_by(UsherOutbox::Id, Order::Asc)
            .to_owned();
        db.query_all(&select)
            .await
            .expect("select")
            .iter()
            .map(|row| {
                (
                    row.try_get("", "attempts").expect("attempts"),
                    row.try_get("", "last_error").expect("err"),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn outbox_delivers_committed_messages_only() {
        let (db, name) = fresh_database().await;
        let (amqp, exchange, queue) = connected_with_queue("outbox-commit").await;
        let shutdown = CancellationToken::new();
        // A minute-long poll: only the NOTIFY can wake the relay in time.
        let relay = OutboxRelay::new(
            db.clone(),
            Arc::new(ConfirmedPublisher::new(amqp.clone())),
            shutdown.clone(),
        )
        .with_poll_interval(Duration::from_secs(60));
        let relay = tokio::spawn(relay.run());
        tokio::time::sleep(Duration::from_millis(300)).await;

        let committed = messages(&exchange, 1_000, "committed");
        let txn = db.begin().await.expect("begin");
        enqueue(&txn, &committed).await.expect("enqueue");
        txn.commit().await.expect("commit");

        let rolled_back = messages(&exchange, 5, "rolled-back");
        let txn = db.begin().await.expect("begin");
        enqueue(&txn, &rolled_back).await.expect("enqueue");
        txn.rollback().await.expect("rollback");

        wait_until_empty(&db, Duration::from_secs(20)).await;
        shutdown.cancel();
        relay.await.expect("relay ends");

        let received = count_by_id(&drain(&amqp, &queue).await);
        assert_eq!(received.len(), 1_000);
        assert!(
            committed
                .iter()
                .all(|m| received.get(&m.message_id) == Some(&1))
        );
        assert!(
            rolled_back
                .iter()
                .all(|m| !received.contains_key(&m.message_id))
        );
        assert_eq!(pending(&db).await.expect("pending"), 0);

        cleanup(&amqp, &exchange, &queue).await;
        drop_database(db, &name).await;
    }

    /// A sink that is "down" until told otherwise, then forwards to `inner`.
    #[derive(Debug)]
    struct SwitchableSink {
        up: AtomicBool,
        calls: AtomicUsize,
        inner: ConfirmedPublisher,
    }

    impl MessageSink for SwitchableSink {
        fn publish_batch<'a>(
            &'a self,
            messages: &'a [OutgoingMessage],
        ) -> BoxFuture<'a, Vec<Result<(), AmqpError>>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.up.load(Ordering::SeqCst) {
                self.inner.publish_batch(messages)
            } else {
                Box::pin(async move { vec![Err(AmqpError::Unavailable); messages.len()] })
            }
        }
    }

    #[tokio::test]
    async fn outbox_keeps_everything_while_the_sink_is_down() {
        let (db, name) = fresh_database().await;
        let (amqp, exchange, queue) = connected_with_queue("outbox-down").await;
        let sink = Arc::new(SwitchableSink {
            up: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            inner: ConfirmedPublisher::new(amqp.clone()),
        });
        let sent = messages(&exchange, 50, "down");
        enqueue(&db, &sent).await.expect("enqueue");

        let shutdown = CancellationToken::new();
        let relay = OutboxRelay::new(db.clone(), sink.clone(), shutdown.clone())
            .with_batch_size(20)
            .with_max_backoff(Duration::from_millis(400));
        let relay = tokio::spawn(relay.run());
        tokio::time::sleep(Duration::from_secs(2)).await;

        // Nothing lost; the head row carries the attempts; the relay backs off
        // (a hot loop would have called the sink hundreds of times).
        assert_eq!(pending(&db).await.expect("pending"), 50);
        let rows = attempts(&db).await;
        assert!(rows[0].0 >= 2, "{:?}", rows[0]);
        assert_eq!(rows[0].1.as_deref(), Some("broker unavailable"));
        assert!(
            rows[1..].iter().all(|(n, _)| *n == 0),
            "only the head was tried"
        );
        let calls = sink.calls.load(Ordering::SeqCst);
        assert!((2..=12).contains(&calls), "{calls} calls in 2 s");

        sink.up.store(true, Ordering::SeqCst);
        wait_until_empty(&db, Duration::from_secs(10)).await;
        shutdown.cancel();
        relay.await.expect("relay ends");

        let received = count_by_id(&drain(&amqp, &queue).await);
        assert_eq!(received.len(), 50);
        assert!(sent.iter().all(|m| received.get(&m.message_id) == Some(&1)));
        cleanup(&amqp, &exchange, &queue).await;
        drop_database(db, &name).await;
    }

    #[tokio::test]
    async fn outbox_survives_an_unreachable_broker_then_delivers_once() {
        let (db, name) = fresh_database().await;
        let (amqp, exchange, queue) = connected_with_queue("outbox-closed-port").await;
        let sent = messages(&exchange, 10, "closed-port");
        enqueue(&db, &sent).await.expect("enqueue");

        // A real AMQP client on a closed port.
        let config = crate::config::AmqpConfig {
            url: Secret::new("amqp://guest:guest@127.0.0.1:1/%2f"),
            ..test_config()
        };
        let down = Amqp::start(config, &unique("closed-port"));
        let shutdown = CancellationToken::new();
        let sink = Arc::new(ConfirmedPublisher::new(down.clone()));
        let relay = OutboxRelay::new(db.clone(), sink, shutdown.clone())
            .with_max_backoff(Duration::from_millis(300));
        let relay = tokio::spawn(relay.run());
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        shutdown.cancel();
        relay.await.expect("relay ends");
        down.close().await;

        assert_eq!(pending(&db).await.expect("pending"), 10);
        let rows = attempts(&db).await;
        assert!(rows[0].0 >= 2, "{:?}", rows[0]);
        assert!(drain(&amqp, &queue).await.is_empty());

        // The same rows through a reachable broker: each delivered once.
        let shutdown = CancellationToken::new();
        let sink = Arc::new(ConfirmedPublisher::new(amqp.clone()));
        let relay = tokio::spawn(OutboxRelay::new(db.clone(), sink, shutdown.clone()).run());
        wait_until_empty(&db, Duration::from_secs(10)).await;
        shutdown.cancel();
        relay.await.expect("relay ends");

        let received = count_by_id(&drain(&amqp, &queue).await);
        assert_eq!(received.len(), 10);
        assert!(sent.iter().all(|m| received.get(&m.message_id) == Some(&1)));
        cleanup(&amqp, &exchange, &queue).await;
        drop_database(db, &name).await;
    }

    #[tokio::test]
    async fn outbox_two_relays_deliver_each_row_exactly_once() {
        let (db, name) = fresh_database().await;
        let (amqp, exchange, queue) = connected_with_queue("outbox-two").await;
        let sent = messages(&exchange, 2_000, "two");
        enqueue(&db, &sent).await.expect("enqueue");

        let shutdown = CancellationToken::new();
        let mut relays = Vec::new();
        for replica in 0..2 {
            let connection = Amqp::start(test_config(), &unique(&format!("replica-{replica}")));
            let relay = OutboxRelay::new(
                db.clone(),
                Arc::new(ConfirmedPublisher::new(connection.clone())),
                shutdown.clone(),
            )
            .with_batch_size(50);
            relays.push((connection, tokio::spawn(relay.run())));
        }
        wait_until_empty(&db, Duration::from_secs(30)).await;
        shutdown.cancel();
        for (connection, relay) in relays {
            relay.await.expect("relay ends");
            connection.close().await;
        }

        let received = count_by_id(&drain(&amqp, &queue).await);
        assert_eq!(received.len(), 2_000);
        let duplicates: Vec<_> = received.iter().filter(|(_, n)| **n != 1).collect();
        assert!(duplicates.is_empty(), "{duplicates:?}");
        cleanup(&amqp, &exchange, &queue).await;
        drop_database(db, &name).await;
    }

    #[tokio::test]
    async fn outbox_sets_aside_a_poison_message_without_blocking_the_rest() {
        let (db, name) = fresh_database().await;
        let (amqp, exchange, queue) = connected_with_queue("outbox-poison").await;
        // First in line: an unroutable message (returned by the broker).
        let poison = OutgoingMessage::new("", unique("no-such-queue"), "test.Job", b"p".to_vec());
        enqueue(&db, std::slice::from_ref(&poison))
            .await
            .expect("enqueue");
        let good = messages(&exchange, 5, "good");
        enqueue(&db, &good).await.expect("enqueue");

        let relay = OutboxRelay::new(
            db.clone(),
            Arc::new(ConfirmedPublisher::new(amqp.clone())),
            CancellationToken::new(),
        );
        let first = relay.relay_once().await.expect("cycle");
        assert_eq!(
            first,
            RelayOutcome {
                selected: 6,
                published: 5,
                failed: 1,
                unavailable: false
            }
        );
        let second = relay.relay_once().await.expect("cycle");
        assert_eq!(second.selected, 0, "the poison row waits its turn");
        let rows = attempts(&db).await;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0, 1);
        assert!(
            rows[0].1.as_deref().is_some_and(|e| e.contains("NO_ROUTE")),
            "{rows:?}"
        );
        assert_eq!(count_by_id(&drain(&amqp, &queue).await).len(), 5);

        cleanup(&amqp, &exchange, &queue).await;
        drop_database(db, &name).await;
    }

    /// A migrated SQLite outbox holding, in id order, `poison` (first in
    /// line), 30 committed messages `<tag>-<i>` to `exchange`, and nothing of
    /// 3 more whose transaction rolled back. Keep the folder while it is used.
    async fn sqlite_outbox(
        poison: OutgoingMessage,
        exchange: &str,
        tag: &str,
    ) -> (tempfile::TempDir, DatabaseConnection) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("outbox.db").display()
        );
        let db = Database::connect(&url).await.expect("sqlite");
        TestMigrator::up(&db, None).await.expect("migrate");
        enqueue(&db, &[poison]).await.expect("enqueue");
        let txn = db.begin().await.expect("begin");
        enqueue(&txn, &messages(exchange, 30, tag))
            .await
            .expect("enqueue");
        txn.commit().await.expect("commit");
        let txn = db.begin().await.expect("begin");
        enqueue(&txn, &messages(exchange, 3, "gone"))
            .await
            .expect("enqueue");
        txn.rollback().await.expect("rollback");
        (dir, db)
    }

    #[tokio::test]
    async fn outbox_works_on_sqlite() {
        let (amqp, exchange, queue) = connected_with_queue("outbox-sqlite").await;
        let poison = OutgoingMessage::new("", unique("no-such-queue"), "test.Job", b"p".to_vec());
        let (_dir, db) = sqlite_outbox(poison, &exchange, "sqlite").await;
        assert_eq!(pending(&db).await.expect("pending"), 31);

        let relay = OutboxRelay::new(
            db.clone(),
            Arc::new(ConfirmedPublisher::new(amqp.clone())),
            CancellationToken::new(),
        )
        .with_batch_size(20);
        let first = relay.relay_once().await.expect("cycle");
        assert_eq!(
            first,
            RelayOutcome {
                selected: 20,
                published: 19,
                failed: 1,
                unavailable: false
            }
        );
        assert_eq!(relay.relay_once().await.expect("cycle").published, 11);
        assert_eq!(relay.relay_once().await.expect("cycle").selected, 0);
        assert_eq!(
            pending(&db).await.expect("pending"),
            1,
            "only the poison row stays"
        );
        assert_eq!(attempts(&db).await[0].0, 1);

        let received = drain(&amqp, &queue).await;
        let order: Vec<_> = received
            .iter()
            .map(|d| String::from_utf8_lossy(&d.data).into_owned())
            .collect();
        let expected: Vec<_> = (0..30).map(|i| format!("sqlite-{i}")).collect();
        assert_eq!(order, expected, "published in id order");
        cleanup(&amqp, &exchange, &queue).await;
        db.close().await.expect("close");
    }

    /// The same relay on either broker `usher dev` may run with: on SQLite
    /// (its default database), committed rows arrive once each and in order,
    /// rolled-back ones never, and an unroutable one is set aside.
    async fn outbox_delivers_through(broker: crate::broker::Broker) {
        use crate::amqp::{QueueSpec, Topology};

        let (exchange, queue) = (unique("outbox-x"), unique("outbox-q"));
        broker
            .declare(
                Topology::new()
                    .topic_exchange(&exchange)
                    .queue(QueueSpec::exclusive(&queue))
                    .bind(&queue, &exchange, "email.send.#"),
            )
            .await
            .expect("declare");
        let mut subscription = broker.subscribe(&queue, "outbox", 100).await.expect("sub");

        let poison = OutgoingMessage::new(&exchange, "nobody.bound", "test.Job", b"p".to_vec());
        let (_dir, db) = sqlite_outbox(poison, &exchange, "either").await;

        let relay = OutboxRelay::new(db.clone(), broker.sink(), CancellationToken::new())
            .with_batch_size(20);
        assert_eq!(relay.relay_once().await.expect("cycle").published, 19);
        assert_eq!(relay.relay_once().await.expect("cycle").published, 11);
        assert_eq!(
            pending(&db).await.expect("pending"),
            1,
            "the unroutable row"
        );

        let mut received = Vec::new();
        for _ in 0..30 {
            let message = tokio::time::timeout(Duration::from_secs(5), subscription.next())
                .await
                .expect("in time")
                .expect("open")
                .expect("message");
            received.push(String::from_utf8_lossy(&message.data).into_owned());
            message.ack().await.expect("ack");
        }
        let expected: Vec<_> = (0..30).map(|i| format!("either-{i}")).collect();
        assert_eq!(received, expected, "each once, in id order");
        let more = tokio::time::timeout(Duration::from_millis(300), subscription.next()).await;
        assert!(more.is_err(), "nothing else arrives");
        subscription.close().await;
        db.close().await.expect("close");
    }

    #[tokio::test]
    async fn outbox_delivers_through_the_in_process_broker() {
        let memory = crate::broker::MemoryBroker::new();
        outbox_delivers_through(crate::broker::Broker::memory(memory)).await;
    }

    #[tokio::test]
    async fn outbox_delivers_through_rabbitmq() {
        let broker = crate::broker::Broker::connect(test_config(), "outbox-either");
        outbox_delivers_through(broker.clone()).await;
        broker.close().await;
    }

    #[test]
    fn retry_delay_grows_and_is_capped() {
        assert_eq!(retry_delay(1), Duration::from_secs(2));
        assert_eq!(retry_delay(4), Duration::from_secs(16));
        assert_eq!(retry_delay(100), MAX_RETRY_DELAY);
    }
}
