//! `usher-gateway [serve|migrate|check-config|health] [--config FILE]`.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    usher_kit::cli::main::<usher_gateway::Config, _, _, _, _>(
        usher_gateway::run,
        usher_gateway::migrate,
    )
    .await
}
