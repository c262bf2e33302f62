//! usher-notification: the email pipeline: consumes email jobs, renders, sends, records deliveries. `main.rs` only parses arguments; `usher dev` and the
//! integration tests start the service in-process through [`serve`].

pub mod api;
pub mod config;
pub mod migration;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use usher_kit::{
    amqp::Amqp,
    authz::Policy,
    clock::SystemClock,
    health::{self, Probe},
    runtime::{self, ServiceDatabase},
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

/// Serves on `listener` until `shutdown`.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    telemetry::install_metrics(config.server.metrics_listen)?;
    let clock = SystemClock::shared();
    let database = ServiceDatabase::start::<migration::Migrator>(
        &config.database,
        Duration::from_secs(2),
        shutdown.clone(),
    )
    .await?;
    let amqp = Amqp::start(config.amqp.clone(), SERVICE);

    let guard = CallGuard::new(
        Policy::from_contracts()?,
        config.assertion.verifier()?,
        clock,
    );
    let mut server = ServiceServer::new(SERVICE, &config.server, guard);
    let limit = config.server.max_message_bytes;
    server.add_service(
        notification::notification_service_server::NotificationServiceServer::new(
            api::NotificationApi,
        )
        .max_decoding_message_size(limit),
    );

    health::watch(
        server.health(),
        server.service_names(),
        vec![database.probe(), Probe::amqp(amqp.clone())],
        Duration::from_secs(1),
        shutdown.clone(),
    );
    tracing::info!(listen = %config.server.listen, "usher-notification serving");
    let served = server.serve(listener, shutdown).await;
    amqp.close().await;
    served
}
