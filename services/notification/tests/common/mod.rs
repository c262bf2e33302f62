//! The test harness: the real pipeline on a fresh PostgreSQL database and a
//! RabbitMQ vhost of its own (created with `rabbitmqctl`, deleted after), an
//! SMTP sink, and helpers to publish jobs and read the queues.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

pub mod smtp_sink;

use std::{sync::Arc, time::Duration};

use lapin::{
    options::{BasicGetOptions, QueueDeclareOptions},
    types::FieldTable,
};
use prost::Message as _;
use sea_orm::{DatabaseConnection, EntityTrait};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use usher_kit::{
    amqp::{
        Amqp, ConfirmedPublisher, EMAIL_EXCHANGE, OutgoingMessage, QueueSpec, Topology,
        email_job_message,
    },
    clock::{Clock, SystemClock},
    config::{AmqpConfig, LinksConfig, Secret},
    convert::timestamp,
    outbox::OutboxRelay,
    seal::Sealer,
    testing::TestDatabase,
};
use usher_notification::{
    Config,
    config::{DeliveryConfig, SmtpConfig},
    migration::Migrator,
    pipeline::Pipeline,
    store::delivery,
    templates::Templates,
};
use usher_proto::notification::v1 as pb;
use uuid::Uuid;

pub use smtp_sink::SmtpSink;

/// Where links point in tests.
pub const BASE_URL: &str = "https://usher.test";
/// The queue capturing every delivery result of the test.
pub const RESULTS_QUEUE: &str = "test.delivery-results";

/// A running pipeline and what it talks to.
pub struct Harness {
    pub vhost: String,
    pub database: Option<TestDatabase>,
    pub db: DatabaseConnection,
    pub amqp: Amqp,
    pub publisher: ConfirmedPublisher,
    pub sink: SmtpSink,
    pub config: Config,
    pub sealer: Sealer,
    pub pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

async fn rabbitmqctl(args: &[&str]) {
    let status = tokio::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .status()
        .await
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

impl Harness {
    /// Starts with default test settings.
    pub async fn start(label: &str) -> Self {
        Self::start_with(label, |_| {}).await
    }

    /// Starts after `adjust` changed the configuration.
    pub async fn start_with(label: &str, adjust: impl FnOnce(&mut Config)) -> Self {
        let vhost = format!(
            "usher-notify-{label}-{}",
            &Uuid::new_v4().simple().to_string()[..8]
        );
        rabbitmqctl(&["add_vhost", &vhost]).await;
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]).await;
        let database = TestDatabase::create("notify").await.expect("test database");
        let db = database.migrated::<Migrator>().await.expect("migrations");
        let sink = SmtpSink::start().await;

        let mut config = Config {
            amqp: AmqpConfig {
                url: Secret::new(format!("amqp://guest:guest@127.0.0.1:5672/{vhost}")),
                heartbeat_secs: 2,
                ..AmqpConfig::default()
            },
            links: LinksConfig {
                public_base_url: BASE_URL.into(),
            },
            smtp: SmtpConfig {
                port: sink.port,
                timeout_ms: 5_000,
                ..SmtpConfig::default()
            },
            delivery: DeliveryConfig {
                prefetch: 16,
                batch_size: 8,
                consumers: 2,
                batch_wait_ms: 5,
                retry_delays_ms: vec![100, 200, 400, 800],
                max_attempts: 6,
                message_id_host: "mail.usher.test".into(),
                lease_secs: 30,
                ..DeliveryConfig::default()
            },
            ..Config::default()
        };
        adjust(&mut config);

        let amqp = Amqp::start(config.amqp.clone(), &format!("test-{label}"));
        amqp.declare(usher_notification::broker_topology(&config))
            .await
            .expect("topology");
        amqp.declare(
            Topology::new()
                .queue(QueueSpec::durable(RESULTS_QUEUE))
                .bind(RESULTS_QUEUE, EMAIL_EXCHANGE, "email.result.#"),
        )
        .await
        .expect("results queue");
        amqp.wait_connected(Duration::from_secs(10))
            .await
            .expect("broker reachable");

        let templates = Arc::new(Templates::new().expect("templates"));
        let pipeline = Arc::new(
            usher_notification::pipeline(
                &config,
                db.clone(),
                usher_kit::broker::Broker::amqp(amqp.clone()),
                templates,
                SystemClock::shared(),
            )
            .expect("pipeline"),
        );
        let shutdown = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(pipeline.clone().consume(shutdown.clone())),
            tokio::spawn(
                OutboxRelay::new(
                    db.clone(),
                    Arc::new(ConfirmedPublisher::new(amqp.clone())),
                    shutdown.clone(),
                )
                .with_poll_interval(Duration::from_millis(200))
                .run(),
            ),
        ];
        let sealer = Sealer::from_config(&config.seal).expect("sealer");
        Self {
            vhost,
            database: Some(database),
            db,
            publisher: ConfirmedPublisher::new(amqp.clone()),
            amqp,
            sink,
            config,
            sealer,
            pipeline,
            shutdown,
            tasks,
        }
    }

    /// A valid job for `template` to `recipient`, its link sealed for it.
    pub fn job(&self, template: pb::EmailTemplate, recipient: &str, locale: &str) -> pb::EmailJob {
        let job_id = Uuid::new_v4().to_string();
        let needs_link = usher_notification::templates::needs_link(template);
        let link = format!("{BASE_URL}/invite?token={}", Uuid::new_v4().simple());
        let (sealed_link, seal_key_id) = if needs_link {
            (
                self.sealer.seal(&job_id, &link),
                self.sealer.key_id().to_owned(),
            )
        } else {
            (Vec::new(), String::new())
        };
        let now = timestamp(SystemClock.now());
        pb::EmailJob {
            job_id,
            account_id: Uuid::from_u128(1).to_string(),
            template: template as i32,
            recipient_email: recipient.into(),
            recipient_name: "Ada Lovelace".into(),
            locale: locale.into(),
            account_default_locale: String::new(),
            variables: Some(pb::EmailVariables {
                account_name: "Analytical Engines".into(),
                inviter_name: "Charles Babbage".into(),
                expire_time: Some(now),
                role_name: "User".into(),
                invitee_name: "Grace Hopper".into(),
                invitee_email: "grace@example.org".into(),
                event_time: Some(now),
            }),
            sealed_link,
            seal_key_id,
            source: pb::EmailSource::Invitation as i32,
            invitation_id: Uuid::new_v4().to_string(),
            user_id: Uuid::new_v4().to_string(),
            token_version: 1,
            create_time: Some(now),
            request_id: String::new(),
        }
    }

    /// The link sealed in `job`.
    pub fn link_of(&self, job: &pb::EmailJob) -> String {
        self.sealer
            .open(&job.job_id, &job.sealed_link)
            .expect("opens")
    }

    /// Publishes `job` as a producer's outbox would.
    pub async fn publish(&self, job: &pb::EmailJob) {
        self.publisher
            .publish(&email_job_message(job))
            .await
            .expect("job published");
    }

    /// Publishes any bytes as an email job.
    pub async fn publish_raw(&self, body: Vec<u8>) {
        let message = OutgoingMessage::new(
            EMAIL_EXCHANGE,
            usher_kit::amqp::EMAIL_SEND_ROUTING_KEY,
            usher_kit::amqp::EMAIL_JOB_TYPE,
            body,
        );
        self.publisher.publish(&message).await.expect("published");
    }

    /// Messages ready in `queue`.
    pub async fn queue_len(&self, queue: &str) -> u32 {
        let channel = self.amqp.channel().await.expect("channel");
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue exists");
        let _ = channel.close(200, "done".into()).await;
        declared.message_count()
    }

    /// Takes every message of `queue` (body and park reason header).
    pub async fn drain(&self, queue: &str) -> Vec<(Vec<u8>, Option<String>)> {
        let channel = self.amqp.channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
        {
            let reason = message
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-usher-park-reason").cloned())
                .and_then(|v| match v {
                    lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
                    _ => None,
                });
            out.push((message.delivery.data, reason));
        }
        let _ = channel.close(200, "done".into()).await;
        out
    }

    /// Every delivery result published so far (taken from the capture queue).
    pub async fn results(&self) -> Vec<pb::DeliveryResult> {
        self.drain(RESULTS_QUEUE)
            .await
            .into_iter()
            .map(|(body, _)| pb::DeliveryResult::decode(body.as_slice()).expect("a result"))
            .collect()
    }

    /// Every deliveries row.
    pub async fn rows(&self) -> Vec<delivery::Model> {
        delivery::Entity::find().all(&self.db).await.expect("rows")
    }

    /// Waits until `check` holds, at most `timeout`.
    pub async fn wait_until<F, Fut>(&self, timeout: Duration, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        while !check().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops everything and deletes the vhost and the database.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        self.amqp.close().await;
        rabbitmqctl(&["delete_vhost", &self.vhost]).await;
        if let Some(database) = self.database.take() {
            database.drop_database().await.expect("drop database");
        }
    }
}
