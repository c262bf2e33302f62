//! `usher-invitation [serve|migrate|check-config|health] [--config FILE]`.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    usher_kit::cli::main::<usher_invitation::Config, _, _, _, _>(
        usher_invitation::run,
        usher_invitation::migrate,
    )
    .await
}
