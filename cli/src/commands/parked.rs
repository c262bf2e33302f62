//! `usher parked list|replay`: operators look at the email jobs parked by
//! the notification service (`usher.email.parked`) and put chosen ones back
//! to work once the cause is fixed. Runs against the notification
//! service's RabbitMQ and database with its configuration (`--config`,
//! `USHER_*`), like `usher-notification migrate`; see
//! [`usher_notification::parked`].

use std::path::Path;

use usher_kit::clock::{Clock, SystemClock};
use usher_notification::parked::{self, ParkedJob, Replay};

use crate::output;

/// Walks the parking queue, replaying what `replay` selects, and prints
/// every parked job (a table, or JSON lines with `json`).
pub async fn run(config: Option<&Path>, replay: Replay, json: bool) -> anyhow::Result<()> {
    let config: usher_notification::Config = usher_kit::config::load(config)?;
    let db = usher_kit::db::connect(&config.database).await?;
    let amqp = usher_kit::amqp::Amqp::start(config.amqp.clone(), "usher-cli-parked");
    amqp.wait_connected(std::time::Duration::from_secs(10))
        .await?;
    let walked = parked::walk(&amqp, &db, &replay, SystemClock.now()).await;
    amqp.close().await;
    db.close().await?;
    print(&walked?, json)
}

fn print(jobs: &[ParkedJob], json: bool) -> anyhow::Result<()> {
    if json {
        for job in jobs {
            output::line(serde_json::to_string(job)?);
        }
        return Ok(());
    }
    let rows = jobs.iter().map(|job| {
        vec![
            job.job_id.clone(),
            job.template.clone(),
            job.recipient.clone(),
            job.reason.clone(),
            if job.replayed { "replayed" } else { "parked" }.to_owned(),
        ]
    });
    output::line(output::table(
        &["job", "template", "recipient", "reason", "now"],
        rows,
    ));
    let replayed = jobs.iter().filter(|job| job.replayed).count();
    output::note(format!(
        "{} parked job(s) seen, {replayed} replayed",
        jobs.len()
    ));
    Ok(())
}
