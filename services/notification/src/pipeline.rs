//! The consumer of `usher.email.send`: decode, dedupe, render, send, record.
//!
//! Jobs are handled in batches (`delivery.batch_size` jobs, or what arrived
//! within `delivery.batch_wait_ms` of the first), on `delivery.consumers`
//! channels that each handle one batch at a time. A batch is claimed in one
//! transaction, sent at once (up to `smtp.pool_max_size` in flight, over
//! pooled connections), recorded with its results in one transaction, and
//! acknowledged with one multiple-ack once that committed. Each job goes
//! through these steps (see `docs/notification.md`):
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
//! expires, with the same `Message-ID` — at most the batches being sent,
//! `delivery.consumers × delivery.batch_size` jobs.

use std::collections::BTreeMap;
use std::{sync::Arc, time::Duration};
use tracing::Instrument as _;

use chrono::Utc;
use lettre::message::Mailbox;
use prost::Message as _;
use sea_orm::DatabaseConnection;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use usher_kit::{
    amqp::{EMAIL_JOB_TYPE, OutgoingMessage, PROTOBUF_CONTENT_TYPE},
    broker::{self, Broker, Received},
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
        // One channel per consumer, each handling one batch at a time, so a
        // batch's multiple-ack covers exactly that batch.
        // One consumer ending (its channel closed) stops the others after
        // their batch: the caller subscribes again.
        let stop = shutdown.child_token();
        let mut consumers = JoinSet::new();
        let mut ended = Ok(());
        for _ in 0..self.config.consumers.max(1) {
            let subscription = tokio::select! {
                () = stop.cancelled() => break,
                subscribed = self.broker.subscribe(SEND_QUEUE, crate::SERVICE, self.config.prefetch) => subscribed,
            };
            match subscription {
                Ok(subscription) => {
                    let this = self.clone();
                    let stop = stop.clone();
                    consumers.spawn(async move { this.consume_batches(subscription, &stop).await });
                }
                Err(error) => {
                    ended = Err(error.into());
                    break;
                }
            }
        }
        tracing::info!(
            queue = SEND_QUEUE,
            consumers = consumers.len(),
            "consuming email jobs"
        );
        while let Some(joined) = consumers.join_next().await {
            stop.cancel();
            if let Ok(Err(error)) = joined
                && ended.is_ok()
            {
                ended = Err(error);
            }
        }
        ended
    }

    /// Takes batches from `subscription` and handles each in turn, until
    /// `shutdown` or the subscription ends.
    async fn consume_batches(
        self: Arc<Self>,
        mut subscription: broker::Subscription,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let size = usize::from(self.config.batch_size.max(1));
        let wait = Duration::from_millis(self.config.batch_wait_ms);
        let ended = loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                next = subscription.next() => next,
            };
            let mut batch = match first {
                Some(Ok(delivery)) => vec![delivery],
                Some(Err(error)) => break Err(error.into()),
                None => break Ok(()),
            };
            let deadline = Instant::now() + wait;
            let mut stop = None;
            while batch.len() < size {
                tokio::select! {
                    biased;
                    next = subscription.next() => match next {
                        Some(Ok(delivery)) => batch.push(delivery),
                        Some(Err(error)) => { stop = Some(Err(error.into())); break; }
                        None => { stop = Some(Ok(())); break; }
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            // Finished (acked or deferred) before the next batch is taken,
            // also on shutdown.
            self.handle_batch(batch).await;
            if let Some(stop) = stop {
                break stop;
            }
        };
        subscription.close().await;
        ended
    }

    /// Handles a batch of deliveries, then acknowledges them: the deferred
    /// ones one by one first, then the rest with one multiple-ack.
    async fn handle_batch(&self, batch: Vec<Received>) {
        let bodies: Vec<&[u8]> = batch.iter().map(|d| d.data.as_slice()).collect();
        let traces: Vec<&BTreeMap<String, String>> = batch.iter().map(|d| &d.headers).collect();
        let dispositions = self.handle_traced(&bodies, &traces).await;
        let mut done = Vec::with_capacity(batch.len());
        for (delivery, disposition) in batch.into_iter().zip(dispositions) {
            match disposition {
                Disposition::Ack => done.push(delivery),
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
                        Ok(()) => done.push(delivery),
                        Err(_) => {
                            tokio::time::sleep(REQUEUE_PAUSE).await;
                            if let Err(error) = delivery.requeue().await {
                                tracing::warn!(%error, "email job not requeued");
                            }
                        }
                    }
                }
            }
        }
        if let Err(error) = broker::ack_all(done).await {
            // The channel is gone: the broker redelivers the jobs, and
            // their rows make the redelivered copies duplicates.
            tracing::warn!(%error, "email jobs not acknowledged");
        }
    }

    /// Handles one job body; see the module documentation.
    pub async fn handle(&self, data: &[u8]) -> Disposition {
        self.handle_many(&[data])
            .await
            .pop()
            .unwrap_or(Disposition::Requeue("not handled".into()))
    }

    /// Handles a batch of job bodies, one [`Disposition`] per body in order:
    /// one transaction claims them, they are sent at once, one transaction
    /// records their outcomes and results.
    pub async fn handle_many(&self, bodies: &[&[u8]]) -> Vec<Disposition> {
        self.handle_traced(bodies, &[]).await
    }

    /// [`Self::handle_many`], each send a span continuing the trace in its
    /// message's headers (`traces[i]` for `bodies[i]`, when given).
    async fn handle_traced(
        &self,
        bodies: &[&[u8]],
        traces: &[&BTreeMap<String, String>],
    ) -> Vec<Disposition> {
        let mut dispositions: Vec<Option<Disposition>> = vec![None; bodies.len()];
        // Decode and check; a job that cannot be sent as it is is parked.
        let mut valid = Vec::with_capacity(bodies.len());
        for (index, data) in bodies.iter().enumerate() {
            let checked = match pb::EmailJob::decode(*data) {
                Ok(job) if self.config.hands_off(job.source) => {
                    // An external pipeline sends this source's emails and
                    // publishes their results (docs/notification.md,
                    // "Taking over delivery").
                    metrics::counter!("usher_notification_handed_off_total").increment(1);
                    dispositions[index] = Some(Disposition::Ack);
                    continue;
                }
                Ok(job) => checked(&job).map(|row| (job, row)),
                Err(_) => Err(Rejected {
                    row: None,
                    reason: "malformed job: not an EmailJob".into(),
                }),
            };
            match checked {
                Ok((job, row)) => valid.push((index, job, row)),
                Err(rejected) => dispositions[index] = Some(self.reject(data, rejected).await),
            }
        }

        // Claim, in one transaction. A job waits at most `lease_secs` for a
        // free SMTP connection (else it is retried later), then its send has
        // `lease_secs` (at least 4 SMTP timeouts): the lease covers both.
        let now = self.clock.now();
        let wait_until = Instant::now() + Duration::from_secs(u64::from(self.config.lease_secs));
        let lease = chrono::Duration::seconds(2 * i64::from(self.config.lease_secs));
        let rows: Vec<NewDelivery> = valid.iter().map(|(_, _, row)| row.clone()).collect();
        let mut claims = match store::claim_many(&self.db, &rows, now, lease).await {
            Ok(claims) => claims,
            Err(error) => {
                let why = format!("database: {error}");
                for (index, _, _) in &valid {
                    dispositions[*index] = Some(Disposition::Requeue(why.clone()));
                }
                return finish(dispositions);
            }
        };
        let mut to_send = Vec::with_capacity(valid.len());
        for (index, job, row) in valid {
            // A job id twice in one batch: the first copy is sent, the other
            // waits like a copy in flight elsewhere.
            match claims.remove(&row.id) {
                Some(Claim::Send(claimed)) => to_send.push((index, job, row, claimed.attempts)),
                Some(Claim::Done(done)) => {
                    metrics::counter!("usher_notification_duplicates_total").increment(1);
                    tracing::info!(job_id = %done.id, status = %done.status, "duplicate email job acked");
                    dispositions[index] = Some(Disposition::Ack);
                }
                Some(Claim::Busy) | None => {
                    let delay = self.delays()[0];
                    dispositions[index] = Some(
                        match self
                            .publish_delayed(bodies[index], &row.id.to_string(), delay)
                            .await
                        {
                            Ok(()) => Disposition::Ack,
                            Err(why) => Disposition::Requeue(why),
                        },
                    );
                }
            }
        }

        // Render and send them all at once (the mailer bounds how many are
        // in flight).
        let sent = futures::future::join_all(to_send.iter().map(|(index, job, row, _)| {
            let span = tracing::info_span!(
                "email.send",
                job_id = %job.job_id,
                trace_id = tracing::field::Empty,
            );
            if let Some(headers) = traces.get(*index) {
                usher_kit::telemetry::continue_trace_from(&span, headers);
            }
            async move {
                let locale = templates::resolve_locale(&job.locale, &job.account_default_locale);
                let message_id = mailer::message_id(&job.job_id, &self.config.message_id_host);
                let sent = match self.render(job, locale) {
                    Ok(email) => match mailer::build(
                        &self.from,
                        &row.recipient_email,
                        &job.recipient_name,
                        message_id.clone(),
                        &email,
                    ) {
                        Ok(message) => {
                            let wait = wait_until.saturating_duration_since(Instant::now());
                            self.mailer.send(message, wait).await
                        }
                        Err(error) => Err(error),
                    },
                    Err(reason) => Err(SendError::Permanent(reason)),
                };
                (locale, message_id, sent)
            }
            .instrument(span)
        }))
        .await;

        // Outcomes: parked ones are parked first, retried ones copied to
        // their delay queue after the record committed.
        let now = self.clock.now();
        let mut outcomes = Vec::with_capacity(sent.len());
        let mut retries = Vec::new();
        for ((index, job, row, attempts), (locale, message_id, sent)) in to_send.iter().zip(sent) {
            let outcome = match sent {
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
                    Outcome {
                        status: Status::Sent,
                        reason: String::new(),
                        locale: locale.to_owned(),
                        message_id,
                    }
                }
                Err(SendError::Transient(reason))
                    if u32::try_from(*attempts).unwrap_or(u32::MAX) < self.config.max_attempts =>
                {
                    metrics::counter!("usher_notification_retried_total").increment(1);
                    tracing::info!(job_id = %row.id, attempts, %reason, "email send failed; retrying");
                    retries.push((*index, row.id, *attempts));
                    Outcome {
                        status: Status::Queued,
                        reason,
                        locale: locale.to_owned(),
                        message_id: String::new(),
                    }
                }
                Err(error) => {
                    let reason = match error {
                        SendError::Transient(reason) => {
                            format!("gave up after {attempts} attempts: {reason}")
                        }
                        SendError::Permanent(reason) => reason,
                    };
                    metrics::counter!("usher_notification_failed_total").increment(1);
                    tracing::warn!(job_id = %row.id, %reason, "email job failed permanently; parked");
                    if let Err(why) = self.park(bodies[*index], &reason).await {
                        dispositions[*index] = Some(Disposition::Requeue(why));
                        continue;
                    }
                    Outcome {
                        status: Status::Failed,
                        reason,
                        locale: locale.to_owned(),
                        message_id: String::new(),
                    }
                }
            };
            outcomes.push((*index, row.id, outcome));
        }

        // Record, in one transaction.
        let records: Vec<_> = outcomes
            .iter()
            .map(|(_, id, outcome)| (*id, outcome.clone()))
            .collect();
        if let Err(error) = store::record_many(&self.db, &records, now).await {
            let why = format!("database: {error}");
            for (index, _, _) in &outcomes {
                dispositions[*index] = Some(Disposition::Requeue(why.clone()));
            }
            return finish(dispositions);
        }
        for (index, _, _) in &outcomes {
            dispositions[*index] = Some(Disposition::Ack);
        }
        let delays = self.delays();
        for (index, id, attempts) in retries {
            let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
            let delay = delays[usize::try_from(attempts.saturating_sub(1))
                .unwrap_or(usize::MAX)
                .min(delays.len() - 1)];
            if let Err(why) = self
                .publish_delayed(bodies[index], &id.to_string(), delay)
                .await
            {
                dispositions[index] = Some(Disposition::Requeue(why));
            }
        }
        finish(dispositions)
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

/// Every disposition, a missing one (a bug) deferring its job.
fn finish(dispositions: Vec<Option<Disposition>>) -> Vec<Disposition> {
    dispositions
        .into_iter()
        .map(|d| d.unwrap_or_else(|| Disposition::Requeue("not handled".into())))
        .collect()
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
