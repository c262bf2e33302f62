//! The email pipeline against the real RabbitMQ and PostgreSQL, with an SMTP
//! sink that counts lost, duplicated and unexpected emails.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::{collections::HashMap, time::Duration};

use common::{BASE_URL, Harness};
use mail_parser::MessageParser;
use prost::Message as _;
use usher_notification::{
    pipeline::Disposition,
    topology::{PARKED_QUEUE, SEND_QUEUE},
};
use usher_proto::notification::v1::{self as pb, EmailTemplate};

/// Jobs in the volume test: the full scenario (about 12 s here);
/// `USHER_TEST_EMAIL_JOBS=100` for a quick local run.
const DEFAULT_JOBS: usize = 1_000;

fn jobs_to_send() -> usize {
    std::env::var("USHER_TEST_EMAIL_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_JOBS)
}

const TEMPLATES: [EmailTemplate; 6] = [
    EmailTemplate::Invitation,
    EmailTemplate::Reinvitation,
    EmailTemplate::PasswordReset,
    EmailTemplate::PasswordChanged,
    EmailTemplate::InvitationAccepted,
    EmailTemplate::SetPassword,
];

/// A word every subject of `template` holds in `locale`.
fn subject_marker(template: EmailTemplate, locale: &str) -> &'static str {
    match (template, locale) {
        (EmailTemplate::Invitation, "fr") => "vous invite à rejoindre",
        (EmailTemplate::Invitation, _) => "invited you to join",
        (EmailTemplate::Reinvitation, "fr") => "Rappel",
        (EmailTemplate::Reinvitation, _) => "Reminder",
        (EmailTemplate::PasswordReset, "fr") => "Choisissez un nouveau mot de passe",
        (EmailTemplate::PasswordReset, _) => "Choose a new password",
        (EmailTemplate::PasswordChanged, "fr") => "a été modifié",
        (EmailTemplate::PasswordChanged, _) => "was changed",
        (EmailTemplate::InvitationAccepted, "fr") => "a rejoint",
        (EmailTemplate::InvitationAccepted, _) => "joined",
        (EmailTemplate::SetPassword, "fr") => "Choisissez votre mot de passe",
        (EmailTemplate::SetPassword, _) => "Choose your password",
        (EmailTemplate::Unspecified, _) => "",
    }
}

struct Expected {
    job: pb::EmailJob,
    locale: &'static str,
    link: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_job_yields_exactly_one_email_with_the_right_content() {
    let harness = Harness::start("volume").await;
    let total = jobs_to_send();
    // Locale from the job, else the account's default, else English.
    let locales: [(&str, &str, &'static str); 4] = [
        ("en", "", "en"),
        ("fr", "en", "fr"),
        ("", "fr-CA", "fr"),
        ("de", "es", "en"),
    ];
    let mut expected = HashMap::new();
    for i in 0..total {
        let template = TEMPLATES[i % TEMPLATES.len()];
        let (job_locale, account_locale, locale) = locales[(i / TEMPLATES.len()) % locales.len()];
        let mut job = harness.job(template, &format!("user{i}@example.com"), job_locale);
        job.account_default_locale = account_locale.into();
        let link =
            usher_notification::templates::needs_link(template).then(|| harness.link_of(&job));
        expected.insert(job.recipient_email.clone(), Expected { job, locale, link });
    }
    for item in expected.values() {
        harness.publish(&item.job).await;
    }

    harness
        .wait_until(Duration::from_secs(120), "every email", || async {
            harness.sink.count() >= total
        })
        .await;
    // Every row SENT, every result published; then nothing more arrives.
    harness
        .wait_until(Duration::from_secs(30), "every row sent", || async {
            harness
                .rows()
                .await
                .iter()
                .filter(|r| r.status == "SENT")
                .count()
                == total
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let messages = harness.sink.messages();
    assert_eq!(
        messages.len(),
        total,
        "no duplicate and no unexpected email"
    );

    let parser = MessageParser::default();
    let mut seen = HashMap::new();
    for received in &messages {
        assert_eq!(received.to.len(), 1);
        let recipient = &received.to[0];
        let item = expected.get(recipient).expect("an expected recipient");
        *seen.entry(recipient.clone()).or_insert(0) += 1;
        let template = EmailTemplate::try_from(item.job.template).expect("template");
        let parsed = parser.parse(&received.data).expect("parses");
        assert_eq!(
            parsed.message_id(),
            Some(format!("{}@mail.usher.test", item.job.job_id).as_str())
        );
        let to = parsed.to().and_then(|a| a.first()).expect("to");
        assert_eq!(to.address(), Some(recipient.as_str()));
        assert_eq!(to.name(), Some("Ada Lovelace"));
        let subject = parsed.subject().expect("subject");
        assert!(
            subject.contains(subject_marker(template, item.locale)),
            "{template:?} {} {subject}",
            item.locale
        );
        let text = parsed.body_text(0).expect("text part");
        let html = parsed.body_html(0).expect("html part");
        assert!(
            html.contains(&format!("lang=\"{}\"", item.locale)),
            "{html}"
        );
        match &item.link {
            Some(link) => {
                assert!(text.contains(link.as_str()), "{text}");
                assert_eq!(text.matches(BASE_URL).count(), 1);
                let escaped = minijinja::HtmlEscape(link).to_string();
                assert!(html.contains(&escaped), "{html}");
            }
            None => assert!(!text.contains("://"), "{text}"),
        }
    }
    assert_eq!(seen.len(), total);
    assert!(seen.values().all(|n| *n == 1));

    let rows = harness.rows().await;
    for row in &rows {
        let item = expected.get(&row.recipient_email).expect("row of a job");
        assert_eq!(row.id.to_string(), item.job.job_id);
        assert_eq!(row.attempts, 1);
        assert_eq!(row.locale, item.locale);
        assert_eq!(row.message_id, format!("<{}@mail.usher.test>", row.id));
    }
    harness
        .wait_until(Duration::from_secs(30), "every result", || async {
            harness.queue_len(common::RESULTS_QUEUE).await as usize >= total
        })
        .await;
    let results = harness.results().await;
    assert_eq!(results.len(), total);
    assert!(
        results
            .iter()
            .all(|r| r.status == pb::DeliveryStatus::Sent as i32 && r.attempts == 1)
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_redelivered_after_it_was_sent_is_not_sent_again() {
    let harness = Harness::start("redelivery").await;
    let job = harness.job(EmailTemplate::Invitation, "once@example.com", "en");
    harness.publish(&job).await;
    harness
        .wait_until(Duration::from_secs(20), "the email", || async {
            harness.sink.count() == 1
        })
        .await;
    harness
        .wait_until(Duration::from_secs(10), "the row sent", || async {
            harness
                .rows()
                .await
                .first()
                .is_some_and(|r| r.status == "SENT")
        })
        .await;

    // The broker redelivers it (a lost ack, an outbox relay that published
    // twice): acked, not sent.
    harness.publish(&job).await;
    harness.publish(&job).await;
    // The same job handled directly, as a redelivery after a crash would be.
    assert_eq!(
        harness.pipeline.handle(&job.encode_to_vec()).await,
        Disposition::Ack
    );
    harness
        .wait_until(Duration::from_secs(10), "the copies consumed", || async {
            harness.queue_len(SEND_QUEUE).await == 0
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(harness.sink.count(), 1, "sent once");
    let rows = harness.rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].attempts, 1);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_answering_550_is_parked_and_failed_while_others_are_delivered() {
    let harness = Harness::start("bounce").await;
    harness.sink.reject_recipient("bounce@example.com");
    let bounce = harness.job(EmailTemplate::Invitation, "bounce@example.com", "en");
    let others: Vec<_> = (0..9)
        .map(|i| {
            harness.job(
                EmailTemplate::Invitation,
                &format!("ok{i}@example.com"),
                "en",
            )
        })
        .collect();
    harness.publish(&others[0]).await;
    harness.publish(&bounce).await;
    for job in &others[1..] {
        harness.publish(job).await;
    }
    harness
        .wait_until(
            Duration::from_secs(30),
            "the others delivered and the bounce failed",
            || async {
                let rows = harness.rows().await;
                harness.sink.count() == 9
                    && rows.iter().filter(|r| r.status == "SENT").count() == 9
                    && rows.iter().any(|r| r.status == "FAILED")
            },
        )
        .await;
    let rows = harness.rows().await;
    let failed = rows
        .iter()
        .find(|r| r.recipient_email == "bounce@example.com")
        .expect("bounce row");
    assert_eq!(failed.status, "FAILED");
    assert_eq!(failed.attempts, 1, "a permanent failure is not retried");
    assert!(failed.reason.contains("550"), "{}", failed.reason);
    assert!(rows.iter().filter(|r| r.status == "SENT").count() == 9);
    assert!(
        harness
            .sink
            .messages()
            .iter()
            .all(|m| m.to[0] != "bounce@example.com")
    );

    harness
        .wait_until(Duration::from_secs(10), "the parked job", || async {
            harness.queue_len(PARKED_QUEUE).await == 1
        })
        .await;
    let parked = harness.drain(PARKED_QUEUE).await;
    let job = pb::EmailJob::decode(parked[0].0.as_slice()).expect("the job");
    assert_eq!(job.job_id, bounce.job_id);
    assert!(parked[0].1.as_deref().is_some_and(|r| r.contains("550")));

    harness
        .wait_until(Duration::from_secs(10), "every result", || async {
            harness.queue_len(common::RESULTS_QUEUE).await >= 10
        })
        .await;
    let results = harness.results().await;
    let result = results
        .iter()
        .find(|r| r.job_id == bounce.job_id)
        .expect("the bounce result");
    assert_eq!(result.status, pb::DeliveryStatus::Failed as i32);
    assert!(result.reason.contains("550"));
    assert_eq!(result.invitation_id, bounce.invitation_id);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_jobs_are_parked_and_the_queue_keeps_flowing() {
    let harness = Harness::start("malformed").await;
    // Not protobuf at all.
    harness
        .publish_raw(b"\xff\xff\xff not a job".to_vec())
        .await;
    // No template.
    let mut no_template = harness.job(EmailTemplate::Invitation, "a@example.com", "en");
    no_template.template = 0;
    harness.publish(&no_template).await;
    // A link outside the public base URL (a producer tricked into phishing).
    let mut evil = harness.job(EmailTemplate::Invitation, "b@example.com", "en");
    evil.sealed_link = harness.sealer.seal(
        &evil.job_id,
        "https://usher.test.evil.example/invite?token=x",
    );
    harness.publish(&evil).await;
    // A link sealed for another job.
    let mut moved = harness.job(EmailTemplate::PasswordReset, "c@example.com", "en");
    let other = harness.job(EmailTemplate::PasswordReset, "c@example.com", "en");
    moved.sealed_link = other.sealed_link.clone();
    harness.publish(&moved).await;
    // Then a good one.
    let good = harness.job(EmailTemplate::PasswordChanged, "good@example.com", "fr");
    harness.publish(&good).await;

    harness
        .wait_until(Duration::from_secs(20), "the good email", || async {
            harness.sink.count() == 1
        })
        .await;
    harness
        .wait_until(Duration::from_secs(10), "four parked jobs", || async {
            harness.queue_len(PARKED_QUEUE).await == 4
        })
        .await;
    // Parking comes before recording: wait for the rows too.
    harness
        .wait_until(Duration::from_secs(10), "three failed rows", || async {
            harness
                .rows()
                .await
                .iter()
                .filter(|r| r.status == "FAILED")
                .count()
                == 3
        })
        .await;
    assert_eq!(harness.sink.messages()[0].to, ["good@example.com"]);
    let parked = harness.drain(PARKED_QUEUE).await;
    let reasons: Vec<_> = parked.iter().filter_map(|p| p.1.clone()).collect();
    assert_eq!(reasons.len(), 4);
    assert!(
        reasons.iter().all(|r| r.starts_with("malformed job")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("public base url")));
    let rows = harness.rows().await;
    let failed: Vec<_> = rows.iter().filter(|r| r.status == "FAILED").collect();
    assert_eq!(failed.len(), 3, "every identifiable job is recorded FAILED");
    assert_eq!(harness.queue_len(SEND_QUEUE).await, 0);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_refusing_connections_then_recovering_delivers_everything_once() {
    let harness = Harness::start_with("outage", |config| {
        config.delivery.max_attempts = 100;
    })
    .await;
    harness.sink.set_refusing(true);
    let jobs: Vec<_> = (0..20)
        .map(|i| {
            harness.job(
                EmailTemplate::Invitation,
                &format!("wait{i}@example.com"),
                "en",
            )
        })
        .collect();
    for job in &jobs {
        harness.publish(job).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(harness.sink.count(), 0);
    let rows = harness.rows().await;
    assert_eq!(rows.len(), 20);
    for row in &rows {
        assert_eq!(row.status, "QUEUED");
        assert!(row.attempts >= 1);
        // Delays of 100, 200, 400, 800 ms: no hot loop.
        assert!(row.attempts <= 7, "attempts {}", row.attempts);
        assert!(!row.reason.is_empty());
    }
    assert!(harness.sink.refused_connections() > 0);

    harness.sink.set_refusing(false);
    harness
        .wait_until(
            Duration::from_secs(30),
            "every email after recovery",
            || async { harness.sink.count() >= 20 },
        )
        .await;
    harness
        .wait_until(Duration::from_secs(10), "every row sent", || async {
            harness.rows().await.iter().all(|r| r.status == "SENT")
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let messages = harness.sink.messages();
    assert_eq!(messages.len(), 20);
    let mut recipients: Vec<_> = messages.iter().map(|m| m.to[0].clone()).collect();
    recipients.sort();
    recipients.dedup();
    assert_eq!(recipients.len(), 20, "each exactly once");
    let results = harness.results().await;
    assert!(
        results
            .iter()
            .any(|r| r.status == pb::DeliveryStatus::Queued as i32)
    );
    assert_eq!(
        results
            .iter()
            .filter(|r| r.status == pb::DeliveryStatus::Sent as i32)
            .count(),
        20
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_render_escaped_with_no_extra_header_or_link() {
    let harness = Harness::start("hostile").await;
    let hostile = "Eve <a href=\"https://evil.example/x\">click</a>\r\nBcc: victim@evil.example\r\n\r\n{{ 7*7 }} www.evil.example";
    let mut job = harness.job(EmailTemplate::Invitation, "target@example.com", "en");
    job.recipient_name = hostile.into();
    let variables = job.variables.as_mut().expect("variables");
    variables.inviter_name = hostile.into();
    variables.account_name = hostile.into();
    variables.role_name = hostile.into();
    let link = harness.link_of(&job);
    harness.publish(&job).await;
    harness
        .wait_until(Duration::from_secs(20), "the email", || async {
            harness.sink.count() == 1
        })
        .await;
    let received = &harness.sink.messages()[0];
    assert_eq!(received.to, ["target@example.com"]);
    let raw = String::from_utf8_lossy(&received.data);
    let header_block = raw.split("\r\n\r\n").next().expect("headers");
    for line in header_block.lines() {
        assert!(
            !line.to_ascii_lowercase().starts_with("bcc"),
            "no injected header: {header_block}"
        );
    }
    let parsed = MessageParser::default()
        .parse(&received.data)
        .expect("parses");
    assert!(parsed.bcc().is_none());
    assert_eq!(parsed.to().map(|a| a.iter().count()), Some(1));
    let subject = parsed.subject().expect("subject");
    assert!(!subject.contains('\n') && !subject.contains('\r'));
    let text = parsed.body_text(0).expect("text");
    let html = parsed.body_html(0).expect("html");
    for part in [subject, text.as_ref(), html.as_ref()] {
        assert!(!part.contains("evil.example"), "{part}");
        // Shown literally, so never evaluated (the random token in the link
        // may itself contain "49", so that is not what to look for).
        assert!(part.contains("{{ 7*7 }}"), "{part}");
    }
    assert_eq!(html.matches("<a ").count(), 1, "{html}");
    assert!(html.contains("&lt;a href="), "{html}");
    assert_eq!(text.matches("://").count(), 1, "{text}");
    assert!(text.contains(&link));
    assert!(!text.lines().any(|l| l.starts_with("Bcc")), "{text}");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topology_is_declared_idempotently_with_quorum_work_and_parking_queues() {
    let harness = Harness::start("topology").await;
    // Declared again (a second replica, a restart): accepted as is.
    harness
        .amqp
        .declare(usher_notification::broker_topology(&harness.config))
        .await
        .expect("declared twice");
    let output = tokio::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "-p",
            &harness.vhost,
            "--no-table-headers",
            "name",
            "type",
        ])
        .output()
        .await
        .expect("rabbitmqctl");
    let listing = String::from_utf8_lossy(&output.stdout);
    let kinds: HashMap<_, _> = listing
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect();
    for queue in [
        SEND_QUEUE,
        PARKED_QUEUE,
        "usher.email.send.delay.100ms",
        "usher.email.send.delay.800ms",
    ] {
        assert_eq!(
            kinds.get(queue).map(String::as_str),
            Some("quorum"),
            "{listing}"
        );
    }
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_transport_writes_one_eml_file_per_job() {
    let folder = tempfile::tempdir().expect("tempdir");
    let path = folder.path().to_owned();
    let harness = Harness::start_with("folder", |config| {
        config.smtp.transport = usher_notification::config::TransportKind::File;
        config.smtp.folder = path;
    })
    .await;
    let job = harness.job(EmailTemplate::PasswordReset, "dev@example.com", "fr");
    let link = harness.link_of(&job);
    harness.publish(&job).await;
    let files = || {
        std::fs::read_dir(folder.path())
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                    .map(|e| e.path())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    harness
        .wait_until(Duration::from_secs(20), "the .eml file", || async {
            files().len() == 1
        })
        .await;
    harness
        .wait_until(Duration::from_secs(10), "the row sent", || async {
            harness
                .rows()
                .await
                .first()
                .is_some_and(|r| r.status == "SENT")
        })
        .await;
    let raw = std::fs::read(&files()[0]).expect("read");
    let parsed = MessageParser::default().parse(&raw).expect("parses");
    assert_eq!(
        parsed.message_id(),
        Some(format!("{}@mail.usher.test", job.job_id).as_str())
    );
    assert!(parsed.subject().expect("subject").contains("Choisissez"));
    assert!(parsed.body_text(0).expect("text").contains(&link));
    assert_eq!(harness.sink.count(), 0);
    harness.stop().await;
}

/// The broker-side pid of the connection whose name holds `name`.
async fn connection_pid(name: &str) -> Option<String> {
    let output = tokio::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .await
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.contains(name))
        .and_then(|line| line.split_whitespace().next())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_connection_lost_mid_stream_loses_and_duplicates_nothing() {
    let harness = Harness::start("reconnect").await;
    let jobs: Vec<_> = (0..60)
        .map(|i| {
            harness.job(
                EmailTemplate::PasswordChanged,
                &format!("r{i}@example.com"),
                "en",
            )
        })
        .collect();
    for job in &jobs {
        harness.publish(job).await;
    }
    harness
        .wait_until(Duration::from_secs(20), "some emails", || async {
            harness.sink.count() >= 5
        })
        .await;
    // Kill the connection while jobs are in flight: unacked jobs come back,
    // and those already sent are recognised instead of sent again.
    let mut pid = None;
    for _ in 0..20 {
        pid = connection_pid("test-reconnect").await;
        if pid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = pid.expect("the test connection is listed");
    let closed = tokio::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "close_connection",
            &pid,
            "notification reconnect test",
        ])
        .status()
        .await
        .expect("rabbitmqctl");
    assert!(closed.success());

    harness
        .wait_until(Duration::from_secs(60), "every email", || async {
            harness.sink.count() >= 60
                && harness
                    .rows()
                    .await
                    .iter()
                    .filter(|r| r.status == "SENT")
                    .count()
                    == 60
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut recipients: Vec<_> = harness
        .sink
        .messages()
        .iter()
        .map(|m| m.to[0].clone())
        .collect();
    assert_eq!(recipients.len(), 60, "no duplicate");
    recipients.sort();
    recipients.dedup();
    assert_eq!(recipients.len(), 60, "no loss");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_defers_jobs_without_parking_them() {
    use sea_orm::ConnectionTrait;
    let harness = Harness::start("db-outage").await;
    // The deliveries table vanishes: every claim fails on our side.
    harness
        .db
        .execute_unprepared("ALTER TABLE deliveries RENAME TO deliveries_offline")
        .await
        .expect("rename");
    let jobs: Vec<_> = (0..5)
        .map(|i| {
            harness.job(
                EmailTemplate::PasswordChanged,
                &format!("d{i}@example.com"),
                "en",
            )
        })
        .collect();
    for job in &jobs {
        harness.publish(job).await;
    }
    // 12 s of outage is more than 20 returns even at one per 500 ms, the
    // quorum queue's delivery limit: nacking would have parked the jobs;
    // deferring through the delay queue counts no return.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(harness.sink.count(), 0);
    assert_eq!(harness.queue_len(PARKED_QUEUE).await, 0, "nothing parked");
    harness
        .db
        .execute_unprepared("ALTER TABLE deliveries_offline RENAME TO deliveries")
        .await
        .expect("rename back");
    harness
        .wait_until(Duration::from_secs(20), "every email", || async {
            harness
                .rows()
                .await
                .iter()
                .filter(|r| r.status == "SENT")
                .count()
                == 5
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(harness.sink.count(), 5);
    assert_eq!(harness.queue_len(PARKED_QUEUE).await, 0);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_refusal_sends_the_others_and_fails_that_one_each_once() {
    let harness = Harness::start("batch").await;
    harness.sink.reject_recipient("bounce@example.com");
    let mut jobs: Vec<_> = (0..7)
        .map(|i| {
            harness.job(
                EmailTemplate::Invitation,
                &format!("b{i}@example.com"),
                "en",
            )
        })
        .collect();
    let bounce = harness.job(EmailTemplate::Invitation, "bounce@example.com", "fr");
    jobs.insert(3, bounce.clone());
    let mut bodies: Vec<Vec<u8>> = jobs.iter().map(prost::Message::encode_to_vec).collect();
    // The same job twice in one batch (an outbox that published it twice):
    // one email.
    bodies.push(jobs[0].encode_to_vec());
    let batch: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();

    // One batch: every job gets one disposition, all of them acks.
    let dispositions = harness.pipeline.handle_many(&batch).await;
    assert_eq!(dispositions, vec![Disposition::Ack; 9]);
    let rows = harness.rows().await;
    assert_eq!(rows.len(), 8);
    for row in &rows {
        assert_eq!(row.attempts, 1, "claimed once: {}", row.recipient_email);
        if row.recipient_email == "bounce@example.com" {
            assert_eq!(row.status, "FAILED");
            assert!(row.reason.contains("550"), "{}", row.reason);
            assert_eq!(row.locale, "fr");
        } else {
            assert_eq!(row.status, "SENT");
            assert_eq!(row.message_id, format!("<{}@mail.usher.test>", row.id));
            assert_eq!(row.locale, "en");
            assert!(row.send_time.is_some());
        }
    }
    harness
        .wait_until(
            Duration::from_secs(10),
            "the copy back from the delay queue",
            || async { harness.queue_len(SEND_QUEUE).await == 0 },
        )
        .await;

    // The whole batch again, as after an acknowledgement lost with its
    // channel: every job acked, nothing sent, nothing parked twice.
    let again = harness.pipeline.handle_many(&batch).await;
    assert_eq!(again, vec![Disposition::Ack; 9]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(harness.sink.count(), 7, "each good job sent once");
    assert!(harness.rows().await.iter().all(|r| r.attempts == 1));
    harness
        .wait_until(Duration::from_secs(10), "the parked job", || async {
            harness.queue_len(PARKED_QUEUE).await == 1
        })
        .await;
    let parked = harness.drain(PARKED_QUEUE).await;
    assert_eq!(parked.len(), 1);
    let job = pb::EmailJob::decode(parked[0].0.as_slice()).expect("the job");
    assert_eq!(job.job_id, bounce.job_id);

    // One result per job, published from one outbox transaction.
    harness
        .wait_until(Duration::from_secs(10), "every result", || async {
            harness.queue_len(common::RESULTS_QUEUE).await >= 8
        })
        .await;
    let results = harness.results().await;
    assert_eq!(results.len(), 8);
    assert_eq!(
        results
            .iter()
            .filter(|r| r.status == pb::DeliveryStatus::Sent as i32)
            .count(),
        7
    );
    let failed = results
        .iter()
        .find(|r| r.job_id == bounce.job_id)
        .expect("the refused job's result");
    assert_eq!(failed.status, pb::DeliveryStatus::Failed as i32);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_wait_in_the_invitation_queue_before_it_is_consumed() {
    let harness = Harness::start("results-durable").await;
    // usher-invitation never started in this vhost: its result queue exists
    // all the same (declared by this service), so the result waits there.
    let job = harness.job(EmailTemplate::Invitation, "early@example.com", "en");
    harness.publish(&job).await;
    harness
        .wait_until(
            Duration::from_secs(20),
            "the result in the invitation's queue",
            || async {
                harness
                    .queue_len(usher_notification::store::RESULT_QUEUES[0].1)
                    .await
                    == 1
            },
        )
        .await;
    let kept = harness
        .drain(usher_notification::store::RESULT_QUEUES[0].1)
        .await;
    let result = pb::DeliveryResult::decode(kept[0].0.as_slice()).expect("a result");
    assert_eq!(result.job_id, job.job_id);
    assert_eq!(result.status, pb::DeliveryStatus::Sent as i32);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_jobs_are_listed_with_their_reason_and_replayed_once_fixed() {
    use usher_notification::parked::{self, Replay};
    let harness = Harness::start("parked").await;
    harness.sink.reject_recipient("fixme@example.com");
    let bounce = harness.job(EmailTemplate::Invitation, "fixme@example.com", "en");
    harness.publish(&bounce).await;
    harness.publish_raw(b"not a job".to_vec()).await;
    harness
        .wait_until(Duration::from_secs(20), "two parked jobs", || async {
            harness.queue_len(PARKED_QUEUE).await == 2
        })
        .await;
    let now = usher_kit::clock::Clock::now(&usher_kit::clock::SystemClock);

    // Looking changes nothing.
    let listed = parked::walk(&harness.amqp, &harness.db, &Replay::Nothing, now)
        .await
        .expect("listed");
    assert_eq!(listed.len(), 2);
    let job = listed
        .iter()
        .find(|p| p.job_id == bounce.job_id)
        .expect("the refused job is listed");
    assert!(job.reason.contains("550"), "{}", job.reason);
    assert_eq!(job.recipient, "fixme@example.com");
    assert_eq!(job.template, "EMAIL_TEMPLATE_INVITATION");
    assert!(!job.replayed);
    let malformed = listed
        .iter()
        .find(|p| p.job_id.is_empty())
        .expect("the malformed message is listed");
    assert!(
        malformed.reason.contains("malformed"),
        "{}",
        malformed.reason
    );
    assert_eq!(
        harness.queue_len(PARKED_QUEUE).await,
        2,
        "both still parked"
    );
    let again = parked::walk(&harness.amqp, &harness.db, &Replay::Nothing, now)
        .await
        .expect("listed again");
    assert_eq!(again, listed, "same jobs, same order");

    // The mailbox is fixed: replay that job only.
    harness.sink.accept_recipient("fixme@example.com");
    let replay = Replay::Jobs([bounce.job_id.clone()].into_iter().collect());
    let walked = parked::walk(&harness.amqp, &harness.db, &replay, now)
        .await
        .expect("replayed");
    assert_eq!(walked.iter().filter(|p| p.replayed).count(), 1);
    harness
        .wait_until(Duration::from_secs(20), "the replayed job sent", || async {
            harness
                .rows()
                .await
                .iter()
                .any(|r| r.id.to_string() == bounce.job_id && r.status == "SENT")
        })
        .await;
    assert_eq!(harness.sink.count(), 1);
    assert_eq!(harness.sink.messages()[0].to[0], "fixme@example.com");
    assert_eq!(harness.queue_len(PARKED_QUEUE).await, 1, "the other stays");
    // Its results: FAILED, then QUEUED (replayed), then SENT.
    harness
        .wait_until(Duration::from_secs(10), "three results", || async {
            harness.queue_len(common::RESULTS_QUEUE).await >= 3
        })
        .await;
    let statuses: Vec<_> = harness
        .results()
        .await
        .iter()
        .filter(|r| r.job_id == bounce.job_id)
        .map(|r| r.status)
        .collect();
    assert_eq!(
        statuses,
        [
            pb::DeliveryStatus::Failed as i32,
            pb::DeliveryStatus::Queued as i32,
            pb::DeliveryStatus::Sent as i32
        ]
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_seal_key_rotation_jobs_sealed_with_either_key_are_sent() {
    use usher_kit::{config::Secret, seal::SealConfig};
    let old = SealConfig {
        key: Secret::new("AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="),
        key_id: "2026-01".into(),
        ..SealConfig::default()
    };
    let previous = old.clone();
    let harness = Harness::start_with("rotation", move |config| {
        config.seal = SealConfig {
            key: Secret::new("AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI="),
            key_id: "2026-07".into(),
            previous_key: previous.key,
            previous_key_id: previous.key_id,
        };
    })
    .await;
    // A job sealed by a producer still on the old key, one on the new key,
    // and one naming a key nobody holds.
    let old_sealer = usher_kit::seal::Sealer::from_config(&old).expect("old key");
    let mut on_old = harness.job(EmailTemplate::Invitation, "old@example.com", "en");
    let link = harness.link_of(&on_old);
    on_old.sealed_link = old_sealer.seal(&on_old.job_id, &link);
    on_old.seal_key_id = "2026-01".into();
    let on_new = harness.job(EmailTemplate::Invitation, "new@example.com", "en");
    let mut unknown = harness.job(EmailTemplate::Invitation, "unknown@example.com", "en");
    unknown.seal_key_id = "2025-01".into();
    for job in [&on_old, &on_new, &unknown] {
        harness.publish(job).await;
    }
    harness
        .wait_until(Duration::from_secs(60), "three jobs handled", || async {
            let rows = harness.rows().await;
            rows.len() == 3 && rows.iter().all(|r| r.status != "QUEUED")
        })
        .await;
    let mut sent: Vec<_> = harness
        .sink
        .messages()
        .iter()
        .map(|m| m.to[0].clone())
        .collect();
    sent.sort();
    assert_eq!(sent, ["new@example.com", "old@example.com"]);
    let parked = harness.drain(PARKED_QUEUE).await;
    assert_eq!(parked.len(), 1);
    assert_eq!(
        parked[0].1.as_deref(),
        Some("malformed job: unknown seal key")
    );
    harness.stop().await;
}
