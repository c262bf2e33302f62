//! usher-invitation: bulk invitations with per-address verdicts, single-use
//! 24-hour links kept hashed in Redis, reinvite, withdraw, delete, and the
//! public preview / accept / decline of a link. `main.rs` only parses
//! arguments; `usher dev` and the integration tests start the service
//! in-process through [`serve`].
//!
//! Layers, each importing only those below it: [`api`] (gRPC handlers:
//! decode, call, encode) → [`app`] (load, decide, persist) → [`domain`]
//! (the rules and the invitation state machine, pure) ← [`store`] (SQL and
//! the token keys) and [`directory`] (identity).

pub mod api;
pub mod app;
pub mod config;
pub mod directory;
pub mod domain;
pub mod expiry;
pub mod migration;
pub mod results;
pub mod state;
pub mod store;

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use usher_kit::{
    amqp::{EMAIL_EXCHANGE, EVENTS_EXCHANGE, Topology},
    authz::Policy,
    broker::Broker,
    cache::Cache,
    client::ServiceChannel,
    clock::{SharedClock, SystemClock},
    outbox::OutboxRelay,
    runtime::{self, ServiceDatabase},
    seal::Sealer,
    server::{CallGuard, ServiceServer},
    telemetry,
    tokens::TokenHasher,
    ttl::SharedTtlStore,
};
use usher_proto::invitation::v1 as invitation;

pub use config::Config;

/// The service's name in logs, assertions and AMQP connection names.
pub const SERVICE: &str = "usher-invitation";

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

/// The service's state from `config`, on `db` and the token keys in `keys`
/// (Redis, or in-process for `usher dev`), with time from `clock`.
pub fn state(
    config: &Config,
    db: sea_orm::DatabaseConnection,
    keys: SharedTtlStore,
    clock: SharedClock,
) -> anyhow::Result<state::Invitations> {
    let channel = ServiceChannel::connect_lazy(
        &config.identity,
        "identity",
        config.assertion.signer(SERVICE)?,
        clock.clone(),
    )?;
    Ok(state::Invitations {
        repo: store::Repository::new(db),
        tokens: store::tokens::TokenStore::with_store(
            keys,
            TokenHasher::from_config(&config.tokens)?,
        ),
        directory: directory::Directory::new(channel, config.server.max_message_bytes),
        sealer: Sealer::from_config(&config.seal)?,
        link_base: config.links.base().to_owned(),
        rules: config.invitations.clone(),
        clock,
    })
}

/// Serves on `listener` until `shutdown`, with the Redis and RabbitMQ of
/// `config`.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Before anything records (the broker's supervisor takes its gauge at once).
    telemetry::install_metrics(config.server.metrics_listen)?;
    let cache = Cache::connect(&config.redis)?;
    let broker = Broker::connect(config.amqp.clone(), SERVICE);
    serve_with(config, listener, shutdown, cache, broker).await
}

/// Serves on `listener` until `shutdown`, keeping tokens and quotas in
/// `cache` and messages going through `broker` (in-process ones for
/// `usher dev`).
pub async fn serve_with(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    cache: Cache,
    broker: Broker,
) -> anyhow::Result<()> {
    telemetry::install_metrics(config.server.metrics_listen)?;
    // Served from the start (docs/operations.md lists them).
    metrics::counter!("usher_invitations_created_total").increment(0);
    metrics::counter!("usher_invitations_accepted_total").increment(0);
    metrics::counter!("usher_invitation_token_key_misses_total").increment(0);
    for step in app::create::STEPS {
        let _ = metrics::histogram!(app::create::STEP_SECONDS, "step" => step);
    }
    let clock = SystemClock::shared();
    let database = ServiceDatabase::start::<migration::Migrator>(
        &config.database,
        Duration::from_secs(2),
        shutdown.clone(),
    )
    .await?;
    // The exchanges this service publishes to, and its delivery-result queue
    // (re-declared on reconnect).
    broker
        .declare(
            Topology::new()
                .topic_exchange(EVENTS_EXCHANGE)
                .topic_exchange(EMAIL_EXCHANGE)
                .queue(results::queue())
                .bind(results::QUEUE, EMAIL_EXCHANGE, results::ROUTING_KEY),
        )
        .await?;
    // Identity's audit queue: declared here too, so the invitation events
    // published before identity first starts wait for it.
    broker.declare(usher_kit::events::audit_topology()).await?;

    let state = Arc::new(state(
        &config,
        database.connection.clone(),
        cache.keys(),
        clock.clone(),
    )?);
    // Background work on the database starts once its schema is there.
    database.spawn_when_ready(
        OutboxRelay::new(database.connection.clone(), broker.sink(), shutdown.clone()).run(),
    );
    if config.invitations.expiry_sweep_secs > 0 {
        database.spawn_when_ready(expiry::run(
            database.connection.clone(),
            clock.clone(),
            Duration::from_secs(u64::from(config.invitations.expiry_sweep_secs)),
            shutdown.clone(),
        ));
    }
    database.spawn_when_ready(results::consume(
        broker.clone(),
        database.connection.clone(),
        clock.clone(),
        shutdown.clone(),
    ));

    let guard = CallGuard::new(
        Policy::from_contracts()?,
        config.assertion.verifier()?,
        clock,
    );
    let mut server = ServiceServer::new(SERVICE, &config.server, guard);
    let limit = config.server.max_message_bytes;
    server.add_service(
        invitation::invitation_service_server::InvitationServiceServer::new(
            api::InvitationApi::new(state),
        )
        .max_decoding_message_size(limit),
    );

    server
        .watch_readiness(
            vec![database.probe(), cache.probe(), broker.probe()],
            Duration::from_secs(1),
            shutdown.clone(),
        )
        .await;
    tracing::info!(listen = %config.server.listen, "usher-invitation serving");
    let served = server.serve(listener, shutdown).await;
    broker.close().await;
    served
}
