//! usher-notification: the email pipeline. It consumes email jobs from the
//! quorum queue `usher.email.send`, renders them (minijinja, English and
//! French), sends them with lettre (SMTP, or a mail folder for `usher dev`),
//! records each job in `deliveries` so a redelivered job is never sent twice,
//! retries transient failures through delay queues, parks permanent ones, and
//! publishes a `DeliveryResult` per status change through its outbox. It
//! also serves the account's deliveries and template previews over gRPC.
//! `main.rs` only parses arguments; `usher dev` and the integration tests
//! start the service in-process through [`serve`].

pub mod api;
pub mod config;
pub mod mailer;
pub mod migration;
pub mod parked;
pub mod pipeline;
pub mod store;
pub mod templates;
pub mod topology;

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use usher_kit::{
    authz::Policy,
    broker::Broker,
    clock::{SharedClock, SystemClock},
    outbox::OutboxRelay,
    runtime::{self, ServiceDatabase},
    seal::Sealer,
    server::{CallGuard, ServiceServer},
    telemetry,
};
use usher_proto::notification::v1 as notification;

pub use config::Config;

/// The service's name in logs, assertions and AMQP connection names.
pub const SERVICE: &str = "usher-notification";

/// Serves on `config.server.listen` until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = runtime::bind(config.server.listen).await?;
    serve(config, listener, shutdown).await
}

/// Creates the database if needed and applies pending migrations.
pub async fn migrate(config: Config) -> anyhow::Result<()> {
    usher_kit::db::migrate::<migration::Migrator>(&config.database).await?;
    Ok(())
}

/// The broker topology of `config` (see [`topology`]).
pub fn broker_topology(config: &Config) -> usher_kit::amqp::Topology {
    let delays: Vec<_> = config
        .delivery
        .retry_delays_ms
        .iter()
        .map(|ms| Duration::from_millis(*ms))
        .collect();
    // The producers' result queues (see `store::RESULT_QUEUES`).
    store::RESULT_QUEUES
        .iter()
        .fold(topology::topology(&delays), |topology, (source, queue)| {
            topology
                .queue(usher_kit::amqp::QueueSpec::durable(*queue).quorum())
                .bind(
                    *queue,
                    usher_kit::amqp::EMAIL_EXCHANGE,
                    topology::result_routing_key(source),
                )
        })
}

/// The email pipeline of `config` on `db` and `broker`.
pub fn pipeline(
    config: &Config,
    db: sea_orm::DatabaseConnection,
    broker: Broker,
    templates: Arc<templates::Templates>,
    clock: SharedClock,
) -> anyhow::Result<pipeline::Pipeline> {
    pipeline::register_metrics();
    Ok(pipeline::Pipeline {
        db,
        broker,
        templates,
        mailer: mailer::Mailer::from_config(&config.smtp)?,
        sealer: Sealer::from_config(&config.seal)?,
        link_base: config.links.base().to_owned(),
        from: config
            .smtp
            .from
            .parse()
            .map_err(|_| anyhow::anyhow!("smtp.from is not a mailbox"))?,
        config: config.delivery.clone(),
        clock,
    })
}

/// Serves on `listener` until `shutdown`, with the RabbitMQ of `config`.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Before anything records (the broker's supervisor takes its gauge at once).
    telemetry::install_metrics(config.server.metrics_listen)?;
    let broker = Broker::connect(config.amqp.clone(), SERVICE);
    serve_with(config, listener, shutdown, broker).await
}

/// Serves on `listener` until `shutdown`, taking jobs from and publishing
/// results to `broker` (the in-process one for `usher dev`).
pub async fn serve_with(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    broker: Broker,
) -> anyhow::Result<()> {
    telemetry::install_metrics(config.server.metrics_listen)?;
    let clock = SystemClock::shared();
    let database = ServiceDatabase::start::<migration::Migrator>(
        &config.database,
        Duration::from_secs(2),
        shutdown.clone(),
    )
    .await?;
    // Exchanges, work, delay and parking queues (re-declared on reconnect).
    broker.declare(broker_topology(&config)).await?;
    let templates = Arc::new(templates::Templates::new()?);

    // Delivery results leave through the outbox, written with each status
    // change; both start once the database's schema is there.
    let relay = database.spawn_when_ready(
        OutboxRelay::new(database.connection.clone(), broker.sink(), shutdown.clone()).run(),
    );
    let consumer = database.spawn_when_ready(
        Arc::new(pipeline(
            &config,
            database.connection.clone(),
            broker.clone(),
            templates.clone(),
            clock.clone(),
        )?)
        .consume(shutdown.clone()),
    );

    let guard = CallGuard::new(
        Policy::from_contracts()?,
        config.assertion.verifier()?,
        clock.clone(),
    );
    let mut server = ServiceServer::new(SERVICE, &config.server, guard);
    let limit = config.server.max_message_bytes;
    server.add_service(
        notification::notification_service_server::NotificationServiceServer::new(
            api::NotificationApi::new(
                database.connection.clone(),
                templates,
                config.links.base(),
                clock,
            ),
        )
        .max_decoding_message_size(limit),
    );

    server
        .watch_readiness(
            vec![database.probe(), broker.probe()],
            Duration::from_secs(1),
            shutdown.clone(),
        )
        .await;
    tracing::info!(listen = %config.server.listen, "usher-notification serving");
    let served = server.serve(listener, shutdown).await;
    // The consumer finishes its in-flight jobs (ack or requeue) first.
    let _ = consumer.await;
    let _ = relay.await;
    broker.close().await;
    served
}
