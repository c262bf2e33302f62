//! What another team's pipeline sees of the email queue, against the real
//! RabbitMQ and PostgreSQL (docs/queue-contract.md): a queue bound on
//! `usher.email` / `email.send` gets each job once however often the
//! notification service retries it, also on a broker upgraded from the
//! releases whose retries went back through `usher.email`; and a source left
//! to an external pipeline is never sent, recorded or reported here.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::{collections::HashMap, time::Duration};

use common::Harness;
use prost::Message as _;
use usher_kit::amqp::{EMAIL_EXCHANGE, EMAIL_SEND_ROUTING_KEY, ExchangeType, QueueSpec, Topology};
use usher_notification::{config::ExternalSource, topology::SEND_QUEUE};
use usher_proto::notification::v1::{self as pb, EmailTemplate};

/// The partner's own queue, bound as docs/queue-contract.md says.
const PARTNER_QUEUE: &str = "partner.email-jobs";

async fn bind_partner(harness: &Harness) {
    harness
        .amqp
        .declare(
            Topology::new()
                .queue(QueueSpec::durable(PARTNER_QUEUE).quorum())
                .bind(PARTNER_QUEUE, EMAIL_EXCHANGE, EMAIL_SEND_ROUTING_KEY),
        )
        .await
        .expect("partner queue bound");
}

/// How many copies of each job id the partner's queue holds (taken).
async fn partner_copies(harness: &Harness) -> HashMap<String, usize> {
    let mut copies = HashMap::new();
    for (body, _) in harness.drain(PARTNER_QUEUE).await {
        let job = pb::EmailJob::decode(body.as_slice()).expect("an email job");
        *copies.entry(job.job_id).or_insert(0) += 1;
    }
    copies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_during_an_smtp_outage_never_reach_a_partner_queue() {
    let harness = Harness::start_with("partner-retries", |config| {
        config.delivery.max_attempts = 100;
    })
    .await;
    // A broker upgraded from an earlier release still holds its delay queue
    // (old name, old arguments: dead-lettered through `usher.email`) and the
    // exchange that fed it. The service's topology is declared over it again,
    // as on a restart after the upgrade: no PRECONDITION_FAILED.
    let legacy_queue = "usher.email.delay.100ms";
    harness
        .amqp
        .declare(
            Topology::new()
                .exchange("usher.email.retry", ExchangeType::Direct)
                .queue(
                    QueueSpec::durable(legacy_queue)
                        .quorum()
                        .with_message_ttl(Duration::from_millis(100))
                        .with_dead_letter(EMAIL_EXCHANGE, Some(EMAIL_SEND_ROUTING_KEY)),
                )
                .bind(legacy_queue, "usher.email.retry", "delay.100ms"),
        )
        .await
        .expect("the earlier release's delay queue");
    harness
        .amqp
        .declare(usher_notification::broker_topology(&harness.config))
        .await
        .expect("declared over the earlier release's objects");
    bind_partner(&harness).await;

    harness.sink.set_refusing(true);
    let jobs: Vec<_> = (0..10)
        .map(|i| {
            harness.job(
                EmailTemplate::Invitation,
                &format!("outage{i}@example.com"),
                "en",
            )
        })
        .collect();
    for job in &jobs {
        harness.publish(job).await;
    }
    // Every job retried at least twice while SMTP refuses.
    harness
        .wait_until(
            Duration::from_secs(120),
            "three attempts of every job",
            || async {
                let rows = harness.rows().await;
                rows.len() == jobs.len() && rows.iter().all(|r| r.attempts >= 3)
            },
        )
        .await;
    harness.sink.set_refusing(false);
    harness
        .wait_until(Duration::from_secs(120), "every job sent", || async {
            let rows = harness.rows().await;
            rows.len() == jobs.len() && rows.iter().all(|r| r.status == "SENT")
        })
        .await;
    assert_eq!(harness.sink.count(), jobs.len(), "one email per job");

    let copies = partner_copies(&harness).await;
    assert_eq!(copies.len(), jobs.len(), "{copies:?}");
    for job in &jobs {
        assert_eq!(copies.get(&job.job_id), Some(&1), "{copies:?}");
    }
    assert_eq!(
        harness.queue_len(legacy_queue).await,
        0,
        "nothing goes to the earlier release's delay queue"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_taken_over_is_left_to_the_external_pipeline() {
    let harness = Harness::start_with("partner-takeover", |config| {
        config.delivery.external_sources = vec![ExternalSource::Invitation];
        // One job at a time, in queue order: once the identity jobs
        // published last are sent, every invitation job was handled.
        config.delivery.prefetch = 1;
    })
    .await;
    bind_partner(&harness).await;
    let invitations: Vec<_> = (0..5)
        .map(|i| {
            harness.job(
                EmailTemplate::Invitation,
                &format!("inv{i}@example.com"),
                "en",
            )
        })
        .collect();
    let resets: Vec<_> = (0..2)
        .map(|i| {
            let mut job = harness.job(
                EmailTemplate::PasswordReset,
                &format!("reset{i}@example.com"),
                "en",
            );
            job.source = pb::EmailSource::Identity as i32;
            job.invitation_id.clear();
            job
        })
        .collect();
    for job in invitations.iter().chain(&resets) {
        harness.publish(job).await;
    }
    harness
        .wait_until(
            Duration::from_secs(60),
            "the identity jobs sent",
            || async {
                let rows = harness.rows().await;
                rows.len() == resets.len() && rows.iter().all(|r| r.status == "SENT")
            },
        )
        .await;
    assert_eq!(harness.queue_len(SEND_QUEUE).await, 0);

    // Only identity's emails were sent, recorded and reported here.
    let mut sent: Vec<_> = harness
        .sink
        .messages()
        .iter()
        .map(|m| m.to[0].clone())
        .collect();
    sent.sort();
    assert_eq!(sent, ["reset0@example.com", "reset1@example.com"]);
    let mut recorded: Vec<_> = harness
        .rows()
        .await
        .iter()
        .map(|r| r.id.to_string())
        .collect();
    recorded.sort();
    let mut expected: Vec<_> = resets.iter().map(|j| j.job_id.clone()).collect();
    expected.sort();
    assert_eq!(recorded, expected);
    harness
        .wait_until(Duration::from_secs(30), "identity's results", || async {
            harness.queue_len(common::RESULTS_QUEUE).await >= 2
        })
        .await;
    for result in harness.results().await {
        assert!(
            resets.iter().any(|j| j.job_id == result.job_id),
            "no result for a job taken over: {result:?}"
        );
    }
    // The external pipeline's queue got every job, each once.
    let copies = partner_copies(&harness).await;
    for job in invitations.iter().chain(&resets) {
        assert_eq!(copies.get(&job.job_id), Some(&1), "{copies:?}");
    }
    harness.stop().await;
}
