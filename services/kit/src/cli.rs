//! The command line every service binary shares: `serve` (the default),
//! `migrate`, `check-config` and `health`, with `--config FILE` (or
//! `USHER_CONFIG`).

use std::{future::Future, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::sync::CancellationToken;

use crate::config::{self, TelemetryConfig, Validate};

/// A service's configuration, as the shared command line needs it.
pub trait ServiceConfig:
    Serialize + DeserializeOwned + Default + Validate + std::fmt::Debug
{
    /// Log settings.
    fn telemetry(&self) -> &TelemetryConfig;
}

/// Arguments of a service binary.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct ServiceArgs {
    /// Configuration file (TOML); `USHER_*` environment variables override it.
    #[arg(long, global = true, env = config::CONFIG_ENV)]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Option<ServiceCommand>,
}

/// What a service binary does.
#[derive(Clone, Debug, Subcommand, PartialEq, Eq)]
pub enum ServiceCommand {
    /// Serve gRPC until SIGTERM (the default).
    Serve,
    /// Create the database if needed, apply pending migrations and exit.
    Migrate,
    /// Load and validate the configuration, print it (secrets redacted) and exit.
    CheckConfig,
    /// Ask a running server's gRPC health service and exit 0 only when the
    /// name is SERVING: a container health check that needs no shell. Reads
    /// no configuration.
    Health(HealthArgs),
}

/// Arguments of `health`.
#[derive(Clone, Debug, clap::Args, PartialEq, Eq)]
pub struct HealthArgs {
    /// The server's gRPC address, e.g. `http://127.0.0.1:50061`.
    #[arg(long)]
    pub address: String,
    /// The service name to ask about: empty (the default) is liveness, a
    /// service name such as `usher.identity.v1.UserService` is readiness.
    #[arg(long, default_value = "")]
    pub service: String,
    /// How long to wait for the answer, in milliseconds.
    #[arg(long, default_value_t = 3_000)]
    pub timeout_ms: u64,
}

/// Runs `health`: exit 0 when SERVING, 1 (with the reason on stderr) otherwise.
pub async fn health(args: &HealthArgs) -> ExitCode {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    match crate::health::check(&args.address, &args.service, timeout).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the arguments, loads the configuration, installs logging and runs
/// `serve` or `migrate`. Errors are logged and turn into exit code 1.
pub async fn main<C, S, SF, M, MF>(serve: S, migrate: M) -> ExitCode
where
    C: ServiceConfig,
    S: FnOnce(C, CancellationToken) -> SF,
    SF: Future<Output = anyhow::Result<()>>,
    M: FnOnce(C) -> MF,
    MF: Future<Output = anyhow::Result<()>>,
{
    let args = ServiceArgs::parse();
    if let Some(ServiceCommand::Health(health_args)) = &args.command {
        return health(health_args).await;
    }
    let config: C = match config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::from(2);
        }
    };
    // Spans are named for the binary (`usher-identity`, ...).
    let service = std::env::args_os()
        .next()
        .and_then(|arg0| {
            std::path::Path::new(&arg0)
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "usher".to_owned());
    let telemetry = crate::telemetry::init_logging(config.telemetry(), &service);
    let result = match args.command.unwrap_or(ServiceCommand::Serve) {
        ServiceCommand::Serve => serve(config, crate::server::shutdown_on_signal()).await,
        ServiceCommand::Migrate => migrate(config).await,
        ServiceCommand::CheckConfig => {
            eprintln!("{config:#?}");
            Ok(())
        }
        // Answered above, before any configuration is read.
        ServiceCommand::Health(_) => Ok(()),
    };
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "exiting on error");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;

    #[test]
    fn health_takes_an_address_and_an_optional_service() {
        let args = ServiceArgs::try_parse_from([
            "usher-identity",
            "health",
            "--address",
            "http://127.0.0.1:50061",
            "--service",
            "usher.identity.v1.UserService",
        ])
        .expect("parses");
        assert_eq!(
            args.command,
            Some(ServiceCommand::Health(HealthArgs {
                address: "http://127.0.0.1:50061".into(),
                service: "usher.identity.v1.UserService".into(),
                timeout_ms: 3_000,
            }))
        );
        let liveness =
            ServiceArgs::try_parse_from(["usher-gateway", "health", "--address", "http://x:1"])
                .expect("parses");
        assert!(matches!(
            liveness.command,
            Some(ServiceCommand::Health(HealthArgs { ref service, .. })) if service.is_empty()
        ));
        assert!(ServiceArgs::try_parse_from(["usher-gateway", "health"]).is_err());
    }

    #[tokio::test]
    async fn health_fails_when_nothing_answers() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let code = health(&HealthArgs {
            address: format!("http://127.0.0.1:{port}"),
            service: String::new(),
            timeout_ms: 1_000,
        })
        .await;
        assert_eq!(code, ExitCode::FAILURE);
    }
}
