//! The consumer of `usher.email.send`: decode, dedupe, render, send, record.
//!
//! Each job goes through these steps (see `docs/notification.md`):
//!
//! 1. Decode it; a job of a source listed in `delivery.external_sources` is
//!    acked untouched (an external pipeline sends it). Check it. A job that cannot be sent as it is (undecodable,
//!    unknown template, bad address, a link that does not open or points
//!    outside the public base URL) is **parked** with its reason and recorded
//!    FAILED when it names a job and an account; the queue keeps flowing.
//! 2. Claim it in `deliveries` (insert when first seen, then lease it for one
//!    attempt). A job already SENT or FAILED is acked without sending: a
//!    redelivered job is never sent twice. A job leased by another consumer
//!    (a duplicate copy in flight) is put back through the first delay queue.
//! 3. Render and send, with the deterministic `Message-ID` `<job_id@host>`.
//! 4. Record the outcome and its `DeliveryResult` (outbox, same transaction):
//!    SENT; or QUEUED with the reason and a copy to the delay queue of this
//!    attempt (transient failure); or FAILED and parked (5xx, or transient
//!    failures beyond `delivery.max_attempts`).
//! 5. Ack. When a step fails on our side (database down), the job goes back
//!    through the first delay queue instead (a nack only when the broker
//!    refuses that too): quorum queues count every nack toward their
//!    delivery limit, and our outage must not park good jobs.
//!
//! The one window left is a crash after the SMTP server accepted the email
//! and before step 4 committed: the job is then sent again once its lease
//! expires, with the same `Message-ID`.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use lettre::message::Mailbox;
use prost::Message as _;
use sea_orm::DatabaseConnection;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use usher_kit::{
    amqp::{EMAIL_JOB_TYPE, OutgoingMessage, PROTOBUF_CONTENT_TYPE},
    broker::{Broker, Received},
    clock::SharedClock,
    email::EmailAddress,
    seal::Sealer,
};
use usher_proto::notification::v1 as pb;
use uuid::Uuid;

use crate::{
    config::DeliveryConfig,
    mailer::{self, Mailer, SendError},
    store::{self, Claim, NewDelivery, Outcome, Status},
    templates::{self, EmailValues, RenderedEmail, Templates},
    topology::{
        DEAD_LETTER_EXCHANGE, DEFAULT_EXCHANGE, PARK_REASON_HEADER, PARKED_ROUTING_KEY, SEND_QUEUE,
        delay_queue,
    },
};

/// Pause before a job is put back after a failure on our side.
const REQUEUE_PAUSE: Duration = Duration::from_millis(500);
/// Longest recipient display name.
const MAX_RECIPIENT_NAME_CHARS: usize = 200;

/// What to do with a delivery once handled.
#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Done with it (sent, parked, retried through a delay queue, duplicate).
    Ack,
    /// Our side failed (database, broker): put it back.
    Requeue(String),
}

/// Everything the consumer needs.
#[derive(Debug)]
pub struct Pipeline {
    /// The notification database.
    pub db: DatabaseConnection,
    /// The broker: jobs come from it, retried and parked copies go to it.
    pub broker: Broker,
    /// The compiled templates.
    pub templates: Arc<Templates>,
    /// SMTP or the mail folder.
    pub mailer: Mailer,
    /// Opens sealed links.
    pub sealer: Sealer,
    /// Every link must start with this (no trailing `/`).
    pub link_base: String,
    /// The `From` mailbox.
    pub from: Mailbox,
    /// Prefetch, retries, `Message-ID` host, lease.
    pub config: DeliveryConfig,
    /// Time.
    pub clock: SharedClock,
}

/// A job that cannot be sent as it is.
struct Rejected {
    /// The row to record, when the job names a job id and an account.
    row: Option<Box<NewDelivery>>,
    reason: String,
}

/// Registers the pipeline's metrics at zero, so they are served from the
/// start (docs/notification.md lists them).
pub(crate) fn register_metrics() {
    for counter in [
        "usher_notification_sent_total",
        "usher_notification_failed_total",
        "usher_notification_retried_total",
        "usher_notification_parked_total",
        "usher_notification_duplicates_total",
        "usher_notification_handed_off_total",
    ] {
        metrics::counter!(counter).increment(0);
    }
    // A histogram is listed (empty) once registered.
    let _ = metrics::histogram!("usher_notification_queue_lag_seconds");
}

impl Pipeline {
    /// Consumes `usher.email.send` until `shutdown`, re-subscribing after a
    /// lost connection.
    pub async fn consume(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Err(error) = self.consume_once(&shutdown).await {
                tracing::warn!(%error, "email job consumer stopped; resubscribing");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn consume_once(self: &Arc<Self>, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut subscription = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            subscribed = self.broker.subscribe(SEND_QUEUE, crate::SERVICE, self.config.prefetch) => subscribed?,
        };
        tracing::info!(queue = SEND_QUEUE, "consuming email jobs");
        // The prefetch bounds the jobs in flight, so the task set too.
        let mut in_flight = JoinSet::new();
        let ended = loop {
            tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                next = subscription.next() => match next {
                    Some(Ok(delivery)) => {
                        let this = self.clone();
                        in_flight.spawn(async move { this.handle_delivery(delivery).await });
                    }
                    Some(Err(error)) => break Err(error.into()),
                    None => break Ok(()),
                },
            }
        };
        // In-flight jobs finish (and ack or requeue) before we let go.
        while in_flight.join_next().await.is_some() {}
        subscription.close().await;
        ended
    }

    async fn handle_delivery(&self, delivery: Received) {
        let outcome = match self.handle(&delivery.data).await {
            Disposition::Ack => delivery.ack().await,
            Disposition::Requeue(why) => {
                tracing::warn!(reason = %why, "email job deferred");
                // Through a delay queue rather than a nack: a quorum queue
                // counts every return toward its delivery limit, and an
                // outage on our side must not park good jobs.
                let message_id = delivery.message_id.clone().unwrap_or_default();
                match self
                    .publish_delayed(&delivery.data, &message_id, self.delays()[0])
                    .await
                {
                    Ok(()) => delivery.ack().await,
                    Err(_) => {
                        tokio::time::sleep(REQUEUE_PAUSE).await;
                        delivery.requeue().await
                    }
                }
            }
        };
        if let Err(error) = outcome {
            // The channel is gone: the broker redelivers the job.
            tracing::warn!(%error, "email job not acknowledged");
        }
    }

    /// Handles one job body; see the module documentation.
    pub async fn handle(&self, data: &[u8]) -> Disposition {
        let job = match pb::EmailJob::decode(data) {
            Ok(job) => job,
            Err(_) => {
                return self
                    .reject(
                        data,
                        Rejected {
                            row: None,
                            reason: "malformed job: not an EmailJob".into(),
                        },
                    )
                    .await;
            }
        };
        if self.config.hands_off(job.source) {
            // An external pipeline sends this source's emails and publishes
            // their results (docs/notification.md, "Taking over delivery").
            metrics::counter!("usher_notification_handed_off_total").increment(1);
            return Disposition::Ack;
        }
        let row = match checked(&job) {
            Ok(row) => row,
            Err(rejected) => return self.reject(data, rejected).await,
        };
        let now = self.clock.now();
        let lease = chrono::Duration::seconds(i64::from(self.config.lease_secs));
        let claimed = match store::claim(&self.db, &row, now, lease).await {
            Ok(Claim::Send(claimed)) => claimed,
            Ok(Claim::Done(done)) => {
                metrics::counter!("usher_notification_duplicates_total").increment(1);
                tracing::info!(job_id = %done.id, status = %done.status, "duplicate email job acked");
                return Disposition::Ack;
            }
            Ok(Claim::Busy) => {
                let delay = self.delays()[0];
                return match self.publish_delayed(data, &row.id.to_string(), delay).await {
                    Ok(()) => Disposition::Ack,
                    Err(why) => Disposition::Requeue(why),
                };
            }
            Err(error) => return Disposition::Requeue(format!("database: {error}")),
        };

        let locale = templates::resolve_locale(&job.locale, &job.account_default_locale);
        let email = match self.render(&job, locale) {
            Ok(email) => email,
            Err(reason) => return self.fail(data, &row, reason, locale).await,
        };
        let message_id = mailer::message_id(&job.job_id, &self.config.message_id_host);
        let sent = match mailer::build(
            &self.from,
            &row.recipient_email,
            &job.recipient_name,
            message_id.clone(),
            &email,
        ) {
            Ok(message) => self.mailer.send(message).await,
            Err(error) => Err(error),
        };
        let now = self.clock.now();
        match sent {
            Ok(()) => {
                metrics::counter!("usher_notification_sent_total").increment(1);
                if let Some(created) = job
                    .create_time
                    .as_ref()
                    .and_then(|t| chrono::DateTime::<Utc>::from_timestamp(t.seconds, 0))
                {
                    let lag = (now - created).num_milliseconds().max(0) as f64 / 1000.0;
                    metrics::histogram!("usher_notification_queue_lag_seconds").record(lag);
                }
                let outcome = Outcome {
                    status: Status::Sent,
                    reason: String::new(),
                    locale: locale.to_owned(),
                    message_id,
                };
                match store::record(&self.db, row.id, &outcome, now).await {
                    Ok(_) => Disposition::Ack,
                    Err(error) => Disposition::Requeue(format!("database: {error}")),
                }
            }
            Err(SendError::Permanent(reason)) => self.fail(data, &row, reason, locale).await,
            Err(SendError::Transient(reason)) => {
                let attempts = u32::try_from(claimed.attempts).unwrap_or(u32::MAX);
                if attempts >= self.config.max_attempts {
                    let reason = format!("gave up after {attempts} attempts: {reason}");
                    return self.fail(data, &row, reason, locale).await;
                }
                metrics::counter!("usher_notification_retried_total").increment(1);
                tracing::info!(job_id = %row.id, attempts, %reason, "email send failed; retrying");
                let outcome = Outcome {
                    status: Status::Queued,
                    reason,
                    locale: locale.to_owned(),
                    message_id: String::new(),
                };
                if let Err(error) = store::record(&self.db, row.id, &outcome, now).await {
                    return Disposition::Requeue(format!("database: {error}"));
                }
                let delays = self.delays();
                let index = usize::try_from(attempts.saturating_sub(1))
                    .unwrap_or(usize::MAX)
                    .min(delays.len() - 1);
                match self
                    .publish_delayed(data, &row.id.to_string(), delays[index])
                    .await
                {
                    Ok(()) => Disposition::Ack,
                    Err(why) => Disposition::Requeue(why),
                }
            }
        }
    }

    fn delays(&self) -> Vec<Duration> {
        let delays: Vec<_> = self
            .config
            .retry_delays_ms
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();
        if delays.is_empty() {
            vec![Duration::from_secs(5)]
        } else {
            delays
        }
    }

    /// Opens and checks the link, then renders.
    fn render(&self, job: &pb::EmailJob, locale: &'static str) -> Result<RenderedEmail, String> {
        let template = pb::EmailTemplate::try_from(job.template)
            .map_err(|_| "malformed job: unknown template".to_owned())?;
        let link = if templates::needs_link(template) {
            Some(self.open_link(job)?)
        } else {
            None
        };
        let variables = job.variables.clone().unwrap_or_default();
        let time = |t: Option<prost_types::Timestamp>| {
            t.and_then(|t| {
                chrono::DateTime::<Utc>::from_timestamp(
                    t.seconds,
                    u32::try_from(t.nanos).unwrap_or(0),
                )
            })
        };
        let values = EmailValues {
            recipient_name: job.recipient_name.clone(),
            account_name: variables.account_name,
            inviter_name: variables.inviter_name,
            role_name: variables.role_name,
            invitee_name: variables.invitee_name,
            invitee_email: variables.invitee_email,
            expire_time: time(variables.expire_time),
            // The event is the job's cause: its creation time when not given.
            event_time: time(variables.event_time.or(job.create_time)),
            link,
        };
        self.templates
            .render(template, locale, &values)
            .map_err(|error| format!("not renderable: {error}"))
    }

    /// The job's link, opened with the job id as associated data, and only if
    /// it points under the public base URL.
    fn open_link(&self, job: &pb::EmailJob) -> Result<String, String> {
        if job.sealed_link.is_empty() {
            return Err("malformed job: link missing".into());
        }
        // The current key, or the previous one during a rotation.
        let link = self
            .sealer
            .open_with_key_id(&job.seal_key_id, &job.job_id, &job.sealed_link)
            .map_err(|error| format!("malformed job: {error}"))?;
        if !link_allowed(&link, &self.link_base) {
            return Err("malformed job: link outside the public base url".into());
        }
        Ok(link)
    }

    /// Parks a permanently failed job and records it FAILED.
    async fn fail(
        &self,
        data: &[u8],
        row: &NewDelivery,
        reason: String,
        locale: &'static str,
    ) -> Disposition {
        metrics::counter!("usher_notification_failed_total").increment(1);
        tracing::warn!(job_id = %row.id, %reason, "email job failed permanently; parked");
        if let Err(why) = self.park(data, &reason).await {
            return Disposition::Requeue(why);
        }
        let outcome = Outcome {
            status: Status::Failed,
            reason,
            locale: locale.to_owned(),
            message_id: String::new(),
        };
        match store::record(&self.db, row.id, &outcome, self.clock.now()).await {
            Ok(_) => Disposition::Ack,
            Err(error) => Disposition::Requeue(format!("database: {error}")),
        }
    }

    /// Parks a job that cannot be sent as it is, recording it when it can.
    async fn reject(&self, data: &[u8], rejected: Rejected) -> Disposition {
        metrics::counter!("usher_notification_failed_total").increment(1);
        tracing::warn!(reason = %rejected.reason, "malformed email job parked");
        if let Err(why) = self.park(data, &rejected.reason).await {
            return Disposition::Requeue(why);
        }
        if let Some(row) = rejected.row
            && let Err(error) =
                store::record_rejected(&self.db, &row, &rejected.reason, self.clock.now()).await
        {
            return Disposition::Requeue(format!("database: {error}"));
        }
        Disposition::Ack
    }

    async fn park(&self, data: &[u8], reason: &str) -> Result<(), String> {
        metrics::counter!("usher_notification_parked_total").increment(1);
        let message = OutgoingMessage::new(
            DEAD_LETTER_EXCHANGE,
            PARKED_ROUTING_KEY,
            EMAIL_JOB_TYPE,
            data.to_vec(),
        )
        .with_content_type(PROTOBUF_CONTENT_TYPE)
        .with_header(PARK_REASON_HEADER, store::sanitize_reason(reason));
        self.broker
            .publish(&message)
            .await
            .map_err(|error| format!("parking: {error}"))
    }

    /// Puts a copy of the job in the delay queue of `delay`, addressed by
    /// name on the default exchange (see [`crate::topology`]): no other
    /// pipeline's queue gets it.
    async fn publish_delayed(
        &self,
        data: &[u8],
        message_id: &str,
        delay: Duration,
    ) -> Result<(), String> {
        let mut message = OutgoingMessage::new(
            DEFAULT_EXCHANGE,
            delay_queue(delay),
            EMAIL_JOB_TYPE,
            data.to_vec(),
        );
        if !message_id.is_empty() {
            message = message.with_message_id(message_id);
        }
        let message = message.with_content_type(PROTOBUF_CONTENT_TYPE);
        self.broker
            .publish(&message)
            .await
            .map_err(|error| format!("retry: {error}"))
    }
}

/// Whether `link` is an absolute URL under `base` (`base` itself or a path
/// below it), with no whitespace or control characters.
pub fn link_allowed(link: &str, base: &str) -> bool {
    let base = base.trim_end_matches('/');
    if link.chars().any(|c| c.is_whitespace() || c.is_control()) || base.is_empty() {
        return false;
    }
    let Some(rest) = link.strip_prefix(base) else {
        return false;
    };
    // `https://a.example` must not admit `https://a.example.evil` or `…@evil`.
    (rest.is_empty() || rest.starts_with(['/', '?', '#'])) && url::Url::parse(link).is_ok()
}

/// Checks a decoded job; the row to record, or why it cannot be sent.
fn checked(job: &pb::EmailJob) -> Result<NewDelivery, Rejected> {
    let (Ok(id), Ok(account_id)) = (
        Uuid::parse_str(&job.job_id),
        Uuid::parse_str(&job.account_id),
    ) else {
        return Err(Rejected {
            row: None,
            reason: "malformed job: job_id and account_id must be UUIDs".into(),
        });
    };
    let template =
        pb::EmailTemplate::try_from(job.template).unwrap_or(pb::EmailTemplate::Unspecified);
    let source = pb::EmailSource::try_from(job.source).unwrap_or(pb::EmailSource::Unspecified);
    let row = NewDelivery {
        id,
        account_id,
        source,
        template,
        recipient_email: job.recipient_email.clone(),
        recipient_name: job.recipient_name.clone(),
        invitation_id: job.invitation_id.clone(),
        user_id: job.user_id.clone(),
        token_version: job.token_version,
        account_locale: templates::supported(&job.account_default_locale)
            .unwrap_or_default()
            .to_owned(),
    };
    let reason = if template == pb::EmailTemplate::Unspecified {
        Some("malformed job: template unspecified")
    } else if source == pb::EmailSource::Unspecified {
        Some("malformed job: source unspecified")
    } else if job.recipient_name.chars().count() > MAX_RECIPIENT_NAME_CHARS {
        Some("malformed job: recipient name too long")
    } else {
        None
    };
    if let Some(reason) = reason {
        return Err(Rejected {
            row: Some(Box::new(row)),
            reason: reason.into(),
        });
    }
    match EmailAddress::parse(&job.recipient_email) {
        Ok(address) => Ok(NewDelivery {
            recipient_email: address.into_canonical(),
            ..row
        }),
        Err(_) => Err(Rejected {
            row: Some(Box::new(row)),
            reason: "malformed job: recipient address invalid".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_must_stay_under_the_base_url() {
        let base = "https://usher.example";
        assert!(link_allowed("https://usher.example/invite?token=a", base));
        assert!(link_allowed(
            "https://usher.example/invite?token=a",
            "https://usher.example/"
        ));
        assert!(!link_allowed("https://usher.example.evil/invite", base));
        assert!(!link_allowed("https://usher.example@evil.example/", base));
        assert!(!link_allowed("http://usher.example/invite", base));
        assert!(!link_allowed("https://usher.example/in vite", base));
        assert!(!link_allowed("https://usher.example/a\r\nBcc: x", base));
        assert!(!link_allowed("https://evil.example/", base));
    }
}
