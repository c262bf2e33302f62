//! `usher-notification [serve|migrate|check-config|health] [--config FILE]`.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    usher_kit::cli::main::<usher_notification::Config, _, _, _, _>(
        usher_notification::run,
        usher_notification::migrate,
    )
    .await
}
