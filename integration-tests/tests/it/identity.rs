//! The identity binary end to end against the real servers: a platform
//! creates an account, the owner signs in, a wrong password gets the generic
//! answer, and the domain events leave through the outbox to RabbitMQ.

use std::time::Duration;

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use usher_kit::{
    amqp::EVENTS_EXCHANGE,
    principal::{Principal, PrincipalKind},
};
use usher_proto::identity::v1::{
    CreateAccountRequest, SignInRequest, account_service_client::AccountServiceClient,
    auth_service_client::AuthServiceClient, sign_in_request::Login,
};

use crate::harness::{Isolation, POSTGRES, Service, bound_queues, service_env, signed_request};

#[tokio::test]
async fn accounts_sign_in_and_events_through_the_real_binary() {
    let mut isolation = Isolation::new();
    let identity = Service::start(
        "usher-identity",
        &service_env(&mut isolation, "identity", POSTGRES),
    );
    identity
        .wait_for(
            "usher.identity.v1.AuthService",
            ServingStatus::Serving,
            Duration::from_secs(60),
        )
        .await;

    // A queue of our own on the events exchange, as another pipeline would bind.
    let amqp = bound_queues(
        &isolation,
        "it-events",
        &[("it.events", EVENTS_EXCHANGE, "#")],
    )
    .await;

    let platform = Principal {
        kind: PrincipalKind::Platform,
        credential_id: Some("it-platform".into()),
        ..Principal::anonymous()
    };
    let mut accounts = AccountServiceClient::new(identity.channel());
    let created = accounts
        .create_account(signed_request(
            "/usher.identity.v1.AccountService/CreateAccount",
            &platform,
            CreateAccountRequest {
                name: "Acme".into(),
                slug: format!("acme-{}", isolation.id),
                owner_email: "Owner@Acme.example".into(),
                owner_display_name: "Olive Owner".into(),
                owner_password: "correct horse battery".into(),
                seat_limit: 5,
                ..Default::default()
            },
        ))
        .await
        .expect("account created")
        .into_inner();
    let owner = created.owner.expect("owner");

    let mut auth = AuthServiceClient::new(identity.channel());
    let path = "/usher.identity.v1.AuthService/SignIn";
    let sign_in = |password: &str| SignInRequest {
        account_slug: format!("acme-{}", isolation.id),
        login: Some(Login::Email("owner@acme.example".into())),
        password: password.into(),
    };
    let session = auth
        .sign_in(signed_request(
            path,
            &Principal::anonymous(),
            sign_in("correct horse battery"),
        ))
        .await
        .expect("signed in")
        .into_inner();
    assert_eq!(session.user.expect("user").id, owner.id);
    assert_eq!(session.session.expect("session").access_token.len(), 43);
    let refused = auth
        .sign_in(signed_request(
            path,
            &Principal::anonymous(),
            sign_in("wrong password!"),
        ))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::Unauthenticated);

    // The outbox relay publishes the committed events with confirms.
    let channel = amqp.channel().await.expect("channel");
    let mut routing_keys = Vec::new();
    for _ in 0..100 {
        while let Some(message) = channel
            .basic_get(
                "it.events".into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic_get")
        {
            // The AMQP properties events.proto promises.
            let properties = &message.delivery.properties;
            let text = |value: &Option<lapin::types::ShortString>| {
                value.as_ref().map(ToString::to_string).unwrap_or_default()
            };
            assert_eq!(text(properties.content_type()), "application/protobuf");
            assert!(
                text(properties.kind()).starts_with("usher.events.v1."),
                "{properties:?}"
            );
            assert_eq!(*properties.delivery_mode(), Some(2));
            let stamped = properties.timestamp().expect("an AMQP timestamp");
            let now = u64::try_from(
                usher_kit::clock::Clock::now(&usher_kit::clock::SystemClock).timestamp(),
            )
            .expect("after 1970");
            assert!(
                stamped <= now && now - stamped < 300,
                "timestamp {stamped}, now {now}"
            );
            routing_keys.push(message.delivery.routing_key.to_string());
        }
        if routing_keys.iter().any(|k| k == "account.created")
            && routing_keys.iter().any(|k| k == "user.created")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        routing_keys.iter().any(|k| k == "account.created"),
        "{routing_keys:?}"
    );
    assert!(
        routing_keys.iter().any(|k| k == "user.created"),
        "{routing_keys:?}"
    );
    amqp.close().await;
}
