//! The command line every service binary shares: `serve` (the default) and
//! `migrate`, with `--config FILE` (or `USHER_CONFIG`).

use std::{future::Future, path::PathBuf, process::ExitCode};

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
#[derive(Clone, Copy, Debug, Subcommand, PartialEq, Eq)]
pub enum ServiceCommand {
    /// Serve gRPC until SIGTERM (the default).
    Serve,
    /// Create the database if needed, apply pending migrations and exit.
    Migrate,
    /// Load and validate the configuration, print it (secrets redacted) and exit.
    CheckConfig,
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
    let config: C = match config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init_logging(config.telemetry());
    let result = match args.command.unwrap_or(ServiceCommand::Serve) {
        ServiceCommand::Serve => serve(config, crate::server::shutdown_on_signal()).await,
        ServiceCommand::Migrate => migrate(config).await,
        ServiceCommand::CheckConfig => {
            eprintln!("{config:#?}");
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "exiting on error");
            ExitCode::FAILURE
        }
    }
}
