//! Dependencies failing under the real binaries. The invitation service
//! reaches RabbitMQ and its PostgreSQL database through proxies of the
//! test's own, cut and restored; the machine's servers keep running for every
//! other test.

use std::{collections::HashMap, time::Duration};

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use usher_kit::{
    amqp::{Amqp, EMAIL_EXCHANGE, QueueSpec, Topology},
    config::{AmqpConfig, Secret},
};
use usher_proto::{
    identity::v1::sign_in_request::Login,
    invitation::v1::{self as pb, invitation_service_client::InvitationServiceClient},
    notification::v1::EmailJob,
};

use crate::harness::{
    Isolation, OWNER_PASSWORD, POSTGRES, RABBITMQ_HOST, Service, TcpProxy, bearer, create_account,
    role_id, service_env, sign_in,
};

/// Invitations created while the broker is away (the figure).
const INVITEES: usize = 1_000;
/// How long the broker stays away.
const OUTAGE: Duration = Duration::from_secs(30);
const INVITATION: &str = "usher.invitation.v1.InvitationService";

/// identity, invitation (broker and database behind proxies) and the
/// gateway; an account whose owner is signed in; a queue on the email
/// exchange, bound straight at the broker.
struct Faults {
    isolation: Isolation,
    identity: Service,
    invitation: Option<Service>,
    invitation_env: Vec<(&'static str, String)>,
    gateway: Service,
    broker: TcpProxy,
    database: TcpProxy,
    amqp: Amqp,
    db: DatabaseConnection,
    admin: String,
    user_role: String,
}

impl Faults {
    async fn start(seats: i32) -> Self {
        let mut isolation = Isolation::new();
        let identity = Service::start(
            "usher-identity",
            &service_env(&mut isolation, "identity", POSTGRES),
        );
        let broker = TcpProxy::start(RABBITMQ_HOST).await;
        let database = TcpProxy::start(POSTGRES).await;
        let mut invitation_env = service_env(
            &mut isolation,
            "invitation",
            &format!("127.0.0.1:{}", database.port),
        );
        invitation_env.retain(|(name, _)| *name != "USHER_AMQP__URL");
        invitation_env.extend([
            ("USHER_IDENTITY__URL", format!("http://{}", identity.grpc)),
            (
                "USHER_AMQP__URL",
                format!(
                    "amqp://guest:guest@127.0.0.1:{}/{}",
                    broker.port, isolation.vhost
                ),
            ),
        ]);
        let invitation = Service::start("usher-invitation", &invitation_env);
        let gateway = Service::start(
            "usher-gateway",
            &[
                ("USHER_REDIS__KEY_PREFIX", isolation.redis_prefix()),
                (
                    "USHER_UPSTREAMS__IDENTITY",
                    format!("http://{}", identity.grpc),
                ),
                (
                    "USHER_UPSTREAMS__INVITATION",
                    format!("http://{}", invitation.grpc),
                ),
            ],
        );
        identity
            .wait_for(
                "usher.identity.v1.AuthService",
                ServingStatus::Serving,
                Duration::from_secs(60),
            )
            .await;
        invitation
            .wait_for(INVITATION, ServingStatus::Serving, Duration::from_secs(60))
            .await;
        gateway
            .wait_for("", ServingStatus::Serving, Duration::from_secs(30))
            .await;
        let amqp = Amqp::start(
            AmqpConfig {
                url: Secret::new(isolation.amqp_url()),
                ..AmqpConfig::default()
            },
            "it-faults",
        );
        amqp.wait_connected(Duration::from_secs(10))
            .await
            .expect("broker");
        amqp.declare(
            Topology::new()
                .topic_exchange(EMAIL_EXCHANGE)
                .queue(QueueSpec::durable("it.email"))
                .bind("it.email", EMAIL_EXCHANGE, "email.send"),
        )
        .await
        .expect("bind");
        // Straight at the server, not through the proxy.
        let db = sea_orm::Database::connect(format!(
            "postgres://postgres@{POSTGRES}/usher_it_{}_invitation",
            isolation.id
        ))
        .await
        .expect("invitation database");
        let slug = format!("faults-{}", isolation.id);
        create_account(
            &identity,
            &slug,
            "Faults Co",
            "owner@faults.example",
            "Owner",
            seats,
        )
        .await;
        let admin = sign_in(
            &gateway,
            &slug,
            Login::Email("owner@faults.example".into()),
            OWNER_PASSWORD,
        )
        .await;
        let user_role = role_id(&gateway, &admin, "User").await;
        Self {
            isolation,
            identity,
            invitation: Some(invitation),
            invitation_env,
            gateway,
            broker,
            database,
            amqp,
            db,
            admin,
            user_role,
        }
    }

    fn invitation(&self) -> &Service {
        self.invitation.as_ref().expect("invitation running")
    }

    /// Invites `n` addresses through the gateway in one call.
    async fn invite(&self, n: usize) -> Result<pb::CreateInvitationsResponse, tonic::Status> {
        let invitees: Vec<String> = (0..n)
            .map(|i| format!("person{i}@faults.example"))
            .collect();
        InvitationServiceClient::new(self.gateway.channel())
            .create_invitations(bearer(
                &self.admin,
                pb::CreateInvitationsRequest {
                    raw_text: invitees.join("\n"),
                    role_id: self.user_role.clone(),
                    ..Default::default()
                },
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Messages waiting in the invitation service's outbox.
    async fn outbox_size(&self) -> i64 {
        self.db
            .query_one_raw(Statement::from_string(
                self.db.get_database_backend(),
                "SELECT count(*) AS n FROM usher_outbox",
            ))
            .await
            .expect("query")
            .expect("row")
            .try_get("", "n")
            .expect("n")
    }

    /// Drains the email queue until `expected` distinct jobs arrived and the
    /// outbox is empty; returns job id → recipient and the deliveries seen.
    async fn emails(&self, expected: usize) -> (HashMap<String, String>, usize) {
        let channel = self.amqp.channel().await.expect("channel");
        let mut jobs = HashMap::new();
        let mut deliveries = 0;
        for _ in 0..600 {
            while let Some(message) = channel
                .basic_get(
                    "it.email".into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic_get")
            {
                deliveries += 1;
                let job = EmailJob::decode(message.delivery.data.as_slice()).expect("an email job");
                jobs.insert(job.job_id, job.recipient_email);
            }
            if jobs.len() >= expected && self.outbox_size().await == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (jobs, deliveries)
    }

    async fn stop(self) {
        self.db.close().await.expect("close");
        self.amqp.close().await;
        drop((self.identity, self.invitation, self.gateway));
        drop((self.broker, self.database, self.isolation));
    }
}

/// Every recipient appears once among `jobs`, and there are `n` of them.
fn once_each(jobs: &HashMap<String, String>, n: usize) {
    let mut recipients: Vec<&String> = jobs.values().collect();
    recipients.sort();
    recipients.dedup();
    assert_eq!(jobs.len(), n, "one email job per invitation");
    assert_eq!(recipients.len(), n, "each invitee exactly once");
}

#[tokio::test]
async fn with_the_broker_away_every_invitation_is_emailed_once_it_returns() {
    let stack = Faults::start(2_000).await;
    // The broker goes away; invitations are still created (the emails wait
    // in the outbox, committed with them).
    stack.broker.cut();
    let created = stack
        .invite(INVITEES)
        .await
        .expect("created without a broker");
    assert_eq!(created.invited_count as usize, INVITEES);
    tokio::time::sleep(OUTAGE).await;
    assert!(
        stack.outbox_size().await >= INVITEES as i64,
        "the emails wait in the outbox"
    );
    stack
        .invitation()
        .wait_for(
            INVITATION,
            ServingStatus::NotServing,
            Duration::from_secs(10),
        )
        .await;

    // The broker returns: every invitation's email is published, once.
    stack.broker.restore();
    let (jobs, deliveries) = stack.emails(INVITEES).await;
    once_each(&jobs, INVITEES);
    assert_eq!(deliveries, INVITEES, "no job published twice");
    assert_eq!(stack.outbox_size().await, 0, "the outbox drained");
    stack
        .invitation()
        .wait_for(INVITATION, ServingStatus::Serving, Duration::from_secs(30))
        .await;
    stack.stop().await;
}

#[tokio::test]
async fn a_service_stopped_between_commit_and_relay_sends_after_restart() {
    let mut stack = Faults::start(100).await;
    stack.broker.cut();
    let created = stack.invite(20).await.expect("created");
    assert_eq!(created.invited_count, 20);
    // Stopped with the emails committed but not yet published.
    let stopped = stack.invitation.take().expect("running").terminate().await;
    assert!(stopped.success(), "graceful exit: {stopped:?}");
    assert!(stack.outbox_size().await >= 20);
    stack.broker.restore();
    let restarted = Service::start("usher-invitation", &stack.invitation_env);
    restarted
        .wait_for(INVITATION, ServingStatus::Serving, Duration::from_secs(60))
        .await;
    stack.invitation = Some(restarted);
    let (jobs, deliveries) = stack.emails(20).await;
    once_each(&jobs, 20);
    assert_eq!(deliveries, 20, "no job published twice");
    stack.stop().await;
}

#[tokio::test]
async fn without_its_database_the_service_says_so_fails_fast_and_recovers() {
    let stack = Faults::start(100).await;
    stack.invite(3).await.expect("created");
    let list = || async {
        let started = std::time::Instant::now();
        let answer = InvitationServiceClient::new(stack.gateway.channel())
            .list_invitations(bearer(&stack.admin, pb::ListInvitationsRequest::default()))
            .await
            .map(|r| r.into_inner().total_size);
        (answer, started.elapsed())
    };
    stack.database.cut();
    stack
        .invitation()
        .wait_for(
            INVITATION,
            ServingStatus::NotServing,
            Duration::from_secs(10),
        )
        .await;
    let (answer, took) = list().await;
    let status = answer.expect_err("no database");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        took < Duration::from_secs(10),
        "failed within its deadline: {took:?}"
    );

    stack.database.restore();
    stack
        .invitation()
        .wait_for(INVITATION, ServingStatus::Serving, Duration::from_secs(30))
        .await;
    let mut recovered = None;
    for _ in 0..50 {
        if let (Ok(total), _) = list().await {
            recovered = Some(total);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(recovered, Some(3), "the same invitations after recovery");
    stack.stop().await;
}
