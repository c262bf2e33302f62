//! Dependencies failing under the real binaries. The services reach
//! RabbitMQ, PostgreSQL and Redis through proxies of the test's own, cut and
//! restored; the machine's servers keep running for every other test.

use std::{collections::HashMap, time::Duration};

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use usher_kit::amqp::{Amqp, EMAIL_EXCHANGE};
use usher_proto::{
    identity::v1::{
        GetCurrentUserRequest, SignInRequest, auth_service_client::AuthServiceClient,
        sign_in_request::Login,
    },
    invitation::v1::{self as pb, invitation_service_client::InvitationServiceClient},
    notification::v1::EmailJob,
};

use crate::{
    harness::{
        Isolation, OWNER_PASSWORD, POSTGRES, RABBITMQ_HOST, REDIS, Service, TcpProxy, bearer,
        bound_queues, create_account, http, identity_and_gateway, role_id, service_env, sign_in,
    },
    invitation::token_of,
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
    /// The invitation service's Redis (its link tokens).
    redis: TcpProxy,
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
        let redis = TcpProxy::start(REDIS).await;
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
            (
                "USHER_REDIS__URL",
                format!("redis://127.0.0.1:{}", redis.port),
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
        let amqp = bound_queues(
            &isolation,
            "it-faults",
            &[("it.email", EMAIL_EXCHANGE, "email.send")],
        )
        .await;
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
            redis,
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
    /// outbox is empty; returns the jobs by id and the deliveries seen.
    async fn emails(&self, expected: usize) -> (HashMap<String, EmailJob>, usize) {
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
                jobs.insert(job.job_id.clone(), job);
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
        drop((self.broker, self.database, self.redis, self.isolation));
    }
}

/// Every recipient appears once among `jobs`, and there are `n` of them.
fn once_each(jobs: &HashMap<String, EmailJob>, n: usize) {
    let mut recipients: Vec<&String> = jobs.values().map(|j| &j.recipient_email).collect();
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

#[tokio::test]
async fn without_redis_create_and_accept_are_unavailable_never_invalid() {
    let stack = Faults::start(100).await;
    let created = stack.invite(2).await.expect("created");
    assert_eq!(created.invited_count, 2);
    let (jobs, _) = stack.emails(2).await;
    assert_eq!(jobs.len(), 2);
    // The links of both invitees, as their emails carry them.
    let tokens: Vec<String> = jobs.values().map(token_of).collect();
    let accept = |token: String| {
        let gateway = stack.gateway.channel();
        async move {
            InvitationServiceClient::new(gateway)
                .accept_invitation(pb::AcceptInvitationRequest {
                    token,
                    display_name: "Person".into(),
                    password: "a long enough passphrase".into(),
                    ..Default::default()
                })
                .await
        }
    };
    let preview = |token: String| {
        let gateway = stack.gateway.channel();
        async move {
            InvitationServiceClient::new(gateway)
                .preview_invitation(pb::PreviewInvitationRequest { token })
                .await
        }
    };

    stack.redis.cut();
    stack
        .invitation()
        .wait_for(
            INVITATION,
            ServingStatus::NotServing,
            Duration::from_secs(10),
        )
        .await;
    // Creating: refused as unavailable, and nothing is half made.
    let refused = InvitationServiceClient::new(stack.gateway.channel())
        .create_invitations(bearer(
            &stack.admin,
            pb::CreateInvitationsRequest {
                raw_text: "late@faults.example".into(),
                role_id: stack.user_role.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("no token store");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    // Accepting and previewing a good link: unavailable, never "not usable".
    for result in [
        accept(tokens[0].clone()).await.map(|_| ()),
        preview(tokens[0].clone()).await.map(|_| ()),
    ] {
        let status = result.expect_err("no token store");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    // The page says so too (503), rather than calling the link broken.
    let (status, _, _) = http(
        &stack.gateway,
        "GET",
        &format!("/invite?token={}", tokens[0]),
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 503);
    let listed = InvitationServiceClient::new(stack.gateway.channel())
        .list_invitations(bearer(&stack.admin, pb::ListInvitationsRequest::default()))
        .await
        .expect("listing needs no Redis")
        .into_inner();
    assert_eq!(listed.total_size, 2, "no invitation without a usable token");

    // Redis returns: within seconds everything works again, and the links
    // handed out before the outage still do.
    stack.redis.restore();
    let back = std::time::Instant::now();
    let recreated = loop {
        match InvitationServiceClient::new(stack.gateway.channel())
            .create_invitations(bearer(
                &stack.admin,
                pb::CreateInvitationsRequest {
                    raw_text: "late@faults.example".into(),
                    role_id: stack.user_role.clone(),
                    ..Default::default()
                },
            ))
            .await
        {
            Ok(answer) => break answer.into_inner(),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(
                    back.elapsed() < Duration::from_secs(15),
                    "recovered within seconds"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(recreated.invited_count, 1, "{recreated:?}");
    accept(tokens[0].clone()).await.expect("the old link works");
    preview(tokens[1].clone())
        .await
        .expect("the other link too");
    let (jobs, _) = stack.emails(1).await;
    let late = jobs
        .values()
        .filter(|j| j.recipient_email == "late@faults.example")
        .count();
    assert_eq!(late, 1, "the late invitee is emailed once: {jobs:?}");
    stack.stop().await;
}

#[tokio::test]
async fn without_redis_the_gateway_and_identity_say_unavailable_not_unauthenticated() {
    let mut isolation = Isolation::new();
    let redis = TcpProxy::start(REDIS).await;
    let redis_url = (
        "USHER_REDIS__URL",
        format!("redis://127.0.0.1:{}", redis.port),
    );
    let redis_urls = [redis_url];
    let (identity, _, gateway) =
        identity_and_gateway(&mut isolation, &redis_urls, &redis_urls).await;
    let slug = format!("redis-{}", isolation.id);
    create_account(
        &identity,
        &slug,
        "Redis Co",
        "owner@redis.example",
        "Owner",
        5,
    )
    .await;
    let session = sign_in(
        &gateway,
        &slug,
        Login::Email("owner@redis.example".into()),
        OWNER_PASSWORD,
    )
    .await;
    let whoami = || async {
        AuthServiceClient::new(gateway.channel())
            .get_current_user(bearer(&session, GetCurrentUserRequest::default()))
            .await
    };
    let sign_in_again = || async {
        AuthServiceClient::new(gateway.channel())
            .sign_in(SignInRequest {
                account_slug: slug.clone(),
                login: Some(Login::Email("owner@redis.example".into())),
                password: OWNER_PASSWORD.into(),
            })
            .await
    };
    whoami().await.expect("signed in");

    redis.cut();
    // A session that cannot be looked up is not a bad session.
    let status = whoami().await.expect_err("sessions unreadable");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = sign_in_again().await.expect_err("sessions unwritable");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    redis.restore();
    let back = std::time::Instant::now();
    while whoami().await.is_err() {
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "recovered within seconds"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sign_in_again().await.expect("signs in again");
}
