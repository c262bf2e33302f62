//! Floors measured in the same run as the scenarios: what the hardware and
//! the shared servers allow before any Usher code runs.

use std::time::Duration;

use anyhow::Context;
use lapin::{
    BasicProperties, Confirmation, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};
use sea_orm::{ConnectionTrait, Database};
use serde::Serialize;
use tokio::time::Instant;
use usher_identity::passwords::{PasswordConfig, PasswordHasher};

use crate::{
    launcher::{Isolation, REDIS},
    load::{self, Load},
    stats::Summary,
};

/// argon2id hashes per second with identity's own hasher and its default
/// (production) parameters, `2 × cores` callers feeding its pool so every
/// core hashes.
pub async fn argon2(warmup: Duration, measure: Duration) -> Summary {
    let config = PasswordConfig::default();
    let hasher = PasswordHasher::new(&config);
    let callers = 2 * config.pool_size;
    load::run(Load::timed(callers, warmup, measure), move |seq| {
        let hasher = hasher.clone();
        async move {
            hasher
                .hash(format!("bench password {seq}"))
                .await
                .map(|_| ())
                .map_err(|_| tonic::Status::internal("hash failed"))
        }
    })
    .await
}

/// About what one invitation row holds, with its unique token hash and the
/// account/email index (both floors write it).
const INVITATIONS_TABLE: &str = "CREATE TABLE invitations (
    id uuid PRIMARY KEY, account_id uuid NOT NULL, email text NOT NULL,
    display_name text NOT NULL, token_hash text NOT NULL UNIQUE, state text NOT NULL,
    role_id uuid NOT NULL, metadata jsonb, create_time timestamptz NOT NULL DEFAULT now(),
    expire_time timestamptz NOT NULL);
  CREATE INDEX invitations_account_email ON invitations (account_id, email);";

/// Creates the run's database `name` (removed with the run); returns its
/// full name.
async fn fresh_database(iso: &mut Isolation, name: &str) -> anyhow::Result<String> {
    let db_name = iso.database(name);
    let admin = Database::connect(Isolation::database_url("postgres")).await?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{db_name}\""))
        .await?;
    admin.close().await?;
    Ok(db_name)
}

/// The raw floor of creating `n` invitations: each part timed alone.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RawFloor {
    /// Invitations.
    pub n: u64,
    /// PostgreSQL: `n` rows in multi-row INSERTs of 1,000 (one transaction
    /// each), seconds.
    pub postgres_s: f64,
    /// Redis: `n` SETs with expiry in pipelines of 1,000, seconds.
    pub redis_s: f64,
    /// RabbitMQ: `n` persistent messages published with confirms, all
    /// confirmed, seconds.
    pub rabbitmq_s: f64,
}

impl RawFloor {
    /// The three parts one after the other, seconds.
    pub fn total_s(&self) -> f64 {
        self.postgres_s + self.redis_s + self.rabbitmq_s
    }

    /// Invitations per second when the three run one after the other.
    pub fn per_second(&self) -> f64 {
        if self.total_s() > 0.0 {
            self.n as f64 / self.total_s()
        } else {
            0.0
        }
    }
}

/// Measures [`RawFloor`] for `n` invitations against the run's own database,
/// Redis prefix and vhost.
pub async fn raw(iso: &mut Isolation, n: u64) -> anyhow::Result<RawFloor> {
    let db_name = fresh_database(iso, "raw").await?;
    let db = Database::connect(Isolation::database_url(&db_name)).await?;
    db.execute_unprepared(INVITATIONS_TABLE).await?;
    let account = uuid::Uuid::new_v4();
    let role = uuid::Uuid::new_v4();
    let started = Instant::now();
    let mut i = 0u64;
    while i < n {
        let end = (i + 1_000).min(n);
        let rows: Vec<String> = (i..end)
            .map(|k| {
                format!(
                    "('{}','{account}','raw{k}@bench.example','Raw {k}','{}','pending','{role}','{{}}',now() + interval '7 days')",
                    uuid::Uuid::now_v7(),
                    uuid::Uuid::new_v4().simple(),
                )
            })
            .collect();
        db.execute_unprepared(&format!(
            "INSERT INTO invitations (id, account_id, email, display_name, token_hash, state, role_id, metadata, expire_time) VALUES {}",
            rows.join(",")
        ))
        .await?;
        i = end;
    }
    let postgres_s = started.elapsed().as_secs_f64();
    db.close().await?;

    let client = redis::Client::open(REDIS)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let prefix = iso.redis_prefix();
    let started = Instant::now();
    let mut i = 0u64;
    while i < n {
        let end = (i + 1_000).min(n);
        let mut pipe = redis::pipe();
        for k in i..end {
            pipe.cmd("SET")
                .arg(format!("{prefix}raw:{k}"))
                .arg(uuid::Uuid::new_v4().to_string())
                .arg("EX")
                .arg(3_600)
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await?;
        i = end;
    }
    let redis_s = started.elapsed().as_secs_f64();

    let connection = Connection::connect(&iso.amqp_url(), ConnectionProperties::default())
        .await
        .context("RabbitMQ")?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = "bench.raw";
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    // About an email job's size.
    let payload = vec![b'x'; 600];
    let started = Instant::now();
    let mut pending = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for _ in 0..n {
        pending.push(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?,
        );
    }
    for confirm in pending {
        match confirm.await? {
            Confirmation::Ack(_) | Confirmation::NotRequested => {}
            Confirmation::Nack(_) => anyhow::bail!("RabbitMQ refused a message"),
        }
    }
    let rabbitmq_s = started.elapsed().as_secs_f64();
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "bye".into()).await;

    Ok(RawFloor {
        n,
        postgres_s,
        redis_s,
        rabbitmq_s,
    })
}

/// About what one invited user row holds, with the account/email unique
/// index (the per-call floor's first database).
const USERS_TABLE: &str = "CREATE TABLE users (
    id uuid PRIMARY KEY, account_id uuid NOT NULL, email text NOT NULL,
    display_name text NOT NULL, status text NOT NULL, role_id uuid NOT NULL,
    invitation_id uuid NOT NULL, create_time timestamptz NOT NULL DEFAULT now());
  CREATE UNIQUE INDEX users_account_email ON users (account_id, email);";

/// An outbox table as the services have it.
const OUTBOX_TABLE: &str = "CREATE TABLE outbox (id bigserial PRIMARY KEY, payload bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());";

/// The per-call floor of creating one invitation per call, as
/// PERFORMANCE.md defines it: what one call must durably do at the least —
/// a transaction in one database inserting a user-like row and an outbox
/// row, a transaction in a second database inserting an invitation-like row
/// and an outbox row, and one Redis SET with expiry — at each concurrency of
/// `sweep`, each database through a pool of `pool` connections (the
/// services' default). The best throughput is the floor.
pub async fn per_call(
    iso: &mut Isolation,
    sweep: &[usize],
    warmup: Duration,
    measure: Duration,
    pool: u32,
) -> anyhow::Result<Summary> {
    let mut connect =
        async |name: &str, table: &str| -> anyhow::Result<sea_orm::DatabaseConnection> {
            let db_name = fresh_database(iso, name).await?;
            let mut options = sea_orm::ConnectOptions::new(Isolation::database_url(&db_name));
            options.max_connections(pool).sqlx_logging(false);
            let db = Database::connect(options).await?;
            db.execute_unprepared(&format!("{table}\n{OUTBOX_TABLE}"))
                .await?;
            Ok(db)
        };
    let users = connect("percall_users", USERS_TABLE).await?;
    let db = connect("percall", INVITATIONS_TABLE).await?;
    let client = redis::Client::open(REDIS)?;
    let redis = client.get_multiplexed_async_connection().await?;
    let prefix = iso.redis_prefix();
    let account = uuid::Uuid::new_v4();
    let mut best = Summary::default();
    for &concurrency in sweep {
        let (users, db, redis, prefix) = (users.clone(), db.clone(), redis.clone(), prefix.clone());
        let summary = load::run(Load::timed(concurrency, warmup, measure), move |seq| {
            let (users, db, mut redis, prefix) =
                (users.clone(), db.clone(), redis.clone(), prefix.clone());
            async move {
                let failed = |e: &dyn std::fmt::Display| tonic::Status::internal(e.to_string());
                let token = uuid::Uuid::new_v4().simple().to_string();
                let id = uuid::Uuid::now_v7();
                let user = uuid::Uuid::now_v7();
                users
                    .execute_unprepared(&format!(
                        "BEGIN;
                         INSERT INTO users (id, account_id, email, display_name, status, role_id, invitation_id)
                           VALUES ('{user}','{account}','{user}@bench.example','Call {seq}','invited','{account}','{id}');
                         INSERT INTO outbox (payload) VALUES (decode(repeat('78', 300), 'hex'));
                         COMMIT;"
                    ))
                    .await
                    .map_err(|e| failed(&e))?;
                let statements = format!(
                    "BEGIN;
                     INSERT INTO invitations (id, account_id, email, display_name, token_hash, state, role_id, metadata, expire_time)
                       VALUES ('{id}','{account}','call{seq}@bench.example','Call {seq}','{token}','pending','{account}','{{}}',now() + interval '1 day');
                     INSERT INTO outbox (payload) VALUES (decode(repeat('78', 600), 'hex'));
                     COMMIT;"
                );
                db.execute_unprepared(&statements)
                    .await
                    .map_err(|e| failed(&e))?;
                let () = redis::cmd("SET")
                    .arg(format!("{prefix}call:{token}"))
                    .arg(id.to_string())
                    .arg("EX")
                    .arg(3_600)
                    .query_async(&mut redis)
                    .await
                    .map_err(|e| failed(&e))?;
                Ok(())
            }
        })
        .await;
        if summary.throughput > best.throughput {
            best = summary;
        }
    }
    db.close().await?;
    users.close().await?;
    Ok(best)
}
