//! `usher-identity [serve|migrate|check-config|health] [--config FILE]`.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    usher_kit::cli::main::<usher_identity::Config, _, _, _, _>(
        usher_identity::run,
        usher_identity::migrate,
    )
    .await
}
