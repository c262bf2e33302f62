//! `usher`: the operator and admin command line.
//!
//! `usher dev` runs the three services and the gateway in one process on
//! their default ports. The embedded backends (SQLite, an in-process token
//! store and queue) arrive with the `usher dev` issue; until then it uses the
//! local PostgreSQL, Redis and RabbitMQ that `deploy/local/services.sh` starts.

mod platform_keys;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use usher_kit::config::{LogFormat, TelemetryConfig};

#[derive(Debug, Parser)]
#[command(
    name = "usher",
    version,
    about = "Usher: invitations and user management"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every service and the gateway in this process (gateway on :8080).
    Dev,
    /// Platform API keys (for the embedding platform's back end).
    #[command(subcommand)]
    PlatformKeys(PlatformKeys),
}

#[derive(Debug, Subcommand)]
enum PlatformKeys {
    /// Create a platform key and print its secret once.
    Create {
        /// A name telling operators what the key is for.
        #[arg(long)]
        name: String,
        /// The identity service's configuration file (`USHER_*` variables apply too).
        #[arg(long, env = "USHER_CONFIG")]
        config: Option<std::path::PathBuf>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Dev => dev().await,
        Command::PlatformKeys(PlatformKeys::Create { name, config }) => {
            platform_keys::create(config.as_deref(), &name).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("usher: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dev() -> anyhow::Result<()> {
    usher_kit::telemetry::init_logging(&TelemetryConfig {
        log_filter: "info".into(),
        log_format: LogFormat::Text,
    });
    let shutdown = usher_kit::server::shutdown_on_signal();
    let mut tasks = tokio::task::JoinSet::new();
    spawn(&mut tasks, "usher-identity", shutdown.clone(), |s| {
        usher_identity::run(usher_identity::Config::default(), s)
    });
    spawn(&mut tasks, "usher-invitation", shutdown.clone(), |s| {
        usher_invitation::run(usher_invitation::Config::default(), s)
    });
    // No SMTP server in dev: emails are written as .eml files to ./usher-mail.
    let notification = usher_notification::Config {
        smtp: usher_notification::config::SmtpConfig {
            transport: usher_notification::config::TransportKind::File,
            ..Default::default()
        },
        ..Default::default()
    };
    tracing::info!(folder = %notification.smtp.folder.display(), "usher dev: emails go to a mail folder");
    spawn(&mut tasks, "usher-notification", shutdown.clone(), |s| {
        usher_notification::run(notification, s)
    });
    spawn(&mut tasks, "usher-gateway", shutdown.clone(), |s| {
        usher_gateway::run(usher_gateway::Config::default(), s)
    });
    tracing::info!("usher dev: gateway on 127.0.0.1:8080, press Ctrl-C to stop");
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        let (name, result) = joined?;
        if let Err(err) = result {
            tracing::error!(
                service = name,
                error = format!("{err:#}"),
                "service stopped"
            );
            failure.get_or_insert(anyhow::anyhow!("{name}: {err:#}"));
            shutdown.cancel();
        }
    }
    failure.map_or(Ok(()), Err)
}

fn spawn<F, Fut>(
    tasks: &mut tokio::task::JoinSet<(&'static str, anyhow::Result<()>)>,
    name: &'static str,
    shutdown: CancellationToken,
    run: F,
) where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let future = run(shutdown);
    tasks.spawn(async move { (name, future.await) });
}
