//! Dependencies failing under the real binaries. The broker is reached
//! through a proxy of the test's own, cut and restored; the machine's
//! RabbitMQ keeps running for every other test.

use std::{collections::HashMap, time::Duration};

use prost::Message;
use sea_orm::{ConnectionTrait, Statement};
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

/// Messages waiting in the invitation service's outbox.
async fn outbox_size(db: &sea_orm::DatabaseConnection) -> i64 {
    db.query_one_raw(Statement::from_string(
        db.get_database_backend(),
        "SELECT count(*) AS n FROM usher_outbox",
    ))
    .await
    .expect("query")
    .expect("row")
    .try_get("", "n")
    .expect("n")
}

#[tokio::test]
async fn with_the_broker_away_every_invitation_is_emailed_once_it_returns() {
    let mut isolation = Isolation::new();
    let identity = Service::start(
        "usher-identity",
        &service_env(&mut isolation, "identity", POSTGRES),
    );
    let proxy = TcpProxy::start(RABBITMQ_HOST).await;
    let mut invitation_env = service_env(&mut isolation, "invitation", POSTGRES);
    invitation_env.retain(|(name, _)| *name != "USHER_AMQP__URL");
    invitation_env.extend([
        ("USHER_IDENTITY__URL", format!("http://{}", identity.grpc)),
        (
            "USHER_AMQP__URL",
            format!(
                "amqp://guest:guest@127.0.0.1:{}/{}",
                proxy.port, isolation.vhost
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
    for (service, name) in [
        (&identity, "usher.identity.v1.AuthService"),
        (&invitation, "usher.invitation.v1.InvitationService"),
    ] {
        service
            .wait_for(name, ServingStatus::Serving, Duration::from_secs(60))
            .await;
    }
    gateway
        .wait_for("", ServingStatus::Serving, Duration::from_secs(30))
        .await;
    // The email queue, bound straight at the broker (not through the proxy).
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
    let slug = format!("faults-{}", isolation.id);
    create_account(
        &identity,
        &slug,
        "Faults Co",
        "owner@faults.example",
        "Owner",
        2_000,
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

    // The broker goes away; invitations are still created (the emails wait
    // in the outbox, committed with them).
    proxy.cut();
    let invitees: Vec<String> = (0..INVITEES)
        .map(|i| format!("person{i}@faults.example"))
        .collect();
    let created = InvitationServiceClient::new(gateway.channel())
        .create_invitations(bearer(
            &admin,
            pb::CreateInvitationsRequest {
                raw_text: invitees.join("\n"),
                role_id: user_role,
                ..Default::default()
            },
        ))
        .await
        .expect("created while the broker is away")
        .into_inner();
    assert_eq!(created.invited_count as usize, INVITEES);
    let db = sea_orm::Database::connect(format!(
        "postgres://postgres@{POSTGRES}/usher_it_{}_invitation",
        isolation.id
    ))
    .await
    .expect("invitation database");
    tokio::time::sleep(OUTAGE).await;
    assert!(
        outbox_size(&db).await >= INVITEES as i64,
        "the emails wait in the outbox"
    );
    invitation
        .wait_for(
            "usher.invitation.v1.InvitationService",
            ServingStatus::NotServing,
            Duration::from_secs(10),
        )
        .await;

    // The broker returns: every invitation's email is published, once.
    proxy.restore();
    let channel = amqp.channel().await.expect("channel");
    let mut jobs: HashMap<String, String> = HashMap::new();
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
        if jobs.len() >= INVITEES && outbox_size(&db).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(jobs.len(), INVITEES, "one email job per invitation");
    let mut recipients: Vec<&String> = jobs.values().collect();
    recipients.sort();
    recipients.dedup();
    assert_eq!(recipients.len(), INVITEES, "each invitee exactly once");
    assert_eq!(deliveries, INVITEES, "no job published twice");
    assert_eq!(outbox_size(&db).await, 0, "the outbox drained");
    invitation
        .wait_for(
            "usher.invitation.v1.InvitationService",
            ServingStatus::Serving,
            Duration::from_secs(30),
        )
        .await;
    db.close().await.expect("close");
    amqp.close().await;
}
