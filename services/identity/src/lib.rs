//! usher-identity: accounts, users, roles, teams, sessions, API keys and the
//! audit log. `main.rs` only parses arguments; `usher dev` and the
//! integration tests start the service in-process through [`serve`].

pub mod api;
pub mod app;
pub mod audit_ingest;
pub mod config;
pub mod domain;
pub mod migration;
pub mod passwords;
pub mod state;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use usher_kit::{
    amqp::{EMAIL_EXCHANGE, EVENTS_EXCHANGE, Topology},
    authz::Policy,
    broker::Broker,
    cache::Cache,
    clock::SystemClock,
    outbox::OutboxRelay,
    runtime::{self, ServiceDatabase},
    server::{CallGuard, ServiceServer},
    telemetry,
    tokens::TokenHasher,
};
use usher_proto::identity::{internal::v1 as internal, v1 as identity};

pub use config::Config;

/// The service's name in logs, assertions and AMQP connection names.
pub const SERVICE: &str = "usher-identity";

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

/// Serves on `listener` until `shutdown`, keeping sessions and counters in
/// `cache` and publishing through `broker` (in-process ones for `usher dev`).
pub async fn serve_with(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    cache: Cache,
    broker: Broker,
) -> anyhow::Result<()> {
    telemetry::install_metrics(config.server.metrics_listen)?;
    let clock = SystemClock::shared();
    let (calls, writers) = store::pools::split(&config.database);
    let database = ServiceDatabase::start::<migration::Migrator>(
        &calls,
        Duration::from_secs(2),
        shutdown.clone(),
    )
    .await?;
    // The exchanges this service publishes to, and the queue it ingests
    // invitation events from (re-declared on reconnect).
    broker
        .declare(
            Topology::new()
                .topic_exchange(EVENTS_EXCHANGE)
                .topic_exchange(EMAIL_EXCHANGE),
        )
        .await?;
    broker.declare(usher_kit::events::audit_topology()).await?;

    let writes = match writers {
        Some(writers) => usher_kit::db::connect(&writers).await?,
        None => database.connection.clone(),
    };
    let tokens = TokenHasher::from_config(&config.tokens)?;
    let sessions = cache.sessions(config.sessions.clone(), tokens.clone(), clock.clone());
    let state = Arc::new(state::Identity {
        db: database.connection.clone(),
        writes: writes.clone(),
        clock: clock.clone(),
        passwords: passwords::PasswordHasher::new(&config.passwords),
        password_policy: config.passwords.policy(),
        sessions,
        tokens,
        settings: Arc::new(state::Settings::from_config(&config)),
        keys: cache.keys(),
        sealer: usher_kit::seal::Sealer::from_config(&config.seal)?,
        reservations: crate::app::directory::reservations(),
    });
    let relay = OutboxRelay::new(database.connection.clone(), broker.sink(), shutdown.clone());
    database.spawn_when_ready(relay.run());
    database.spawn_when_ready(audit_ingest::consume(
        broker.clone(),
        writes,
        clock.clone(),
        shutdown.clone(),
    ));
    if cache.is_memory() {
        // An in-process cache starts empty: the gateway would refuse every
        // API key until its snapshot is written again.
        let state = state.clone();
        database.spawn_when_ready(async move {
            if let Err(error) = store::api_keys::publish_all(&state).await {
                tracing::warn!(%error, "API key snapshots not re-published");
            }
        });
    }

    let guard = CallGuard::new(
        Policy::from_contracts()?,
        config.assertion.verifier()?,
        clock,
    );
    let mut server = ServiceServer::new(SERVICE, &config.server, guard);
    let limit = config.server.max_message_bytes;
    let api = api::IdentityApi::new(state);
    server
        .add_service(
            identity::account_service_server::AccountServiceServer::new(api.clone())
                .max_decoding_message_size(limit),
        )
        .add_service(
            identity::auth_service_server::AuthServiceServer::new(api.clone())
                .max_decoding_message_size(limit),
        )
        .add_service(
            identity::user_service_server::UserServiceServer::new(api.clone())
                .max_decoding_message_size(limit),
        )
        .add_service(
            identity::role_service_server::RoleServiceServer::new(api.clone())
                .max_decoding_message_size(limit),
        )
        .add_service(
            identity::team_service_server::TeamServiceServer::new(api.clone())
                .max_decoding_message_size(limit),
        )
        .add_service(
            identity::audit_service_server::AuditServiceServer::new(api.clone())
                .max_decoding_message_size(limit),
        )
        .add_service(
            internal::directory_service_server::DirectoryServiceServer::new(api)
                .max_decoding_message_size(limit),
        );

    server
        .watch_readiness(
            vec![database.probe(), cache.probe(), broker.probe()],
            Duration::from_secs(1),
            shutdown.clone(),
        )
        .await;
    tracing::info!(listen = %config.server.listen, "usher-identity serving");
    let served = server.serve(listener, shutdown).await;
    broker.close().await;
    served
}
