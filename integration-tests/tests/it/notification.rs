//! The usher-notification binary end to end: configured only through its
//! environment, it consumes email jobs from its vhost, sends them to an SMTP
//! sink, and answers GetDelivery and PreviewEmail through its guard.

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use usher_kit::{
    amqp::{Amqp, ConfirmedPublisher, email_job_message},
    config::{AmqpConfig, Secret},
    principal::{Principal, PrincipalKind},
    seal::{SealConfig, Sealer},
};
use usher_proto::notification::v1::{
    DeliveryStatus, EmailJob, EmailSource, EmailTemplate, EmailVariables, GetDeliveryRequest,
    PreviewEmailRequest, notification_service_client::NotificationServiceClient,
};

use crate::{
    harness::{Isolation, POSTGRES, Service, service_env, signed_request},
    smtp_sink::SmtpSink,
};

const BASE_URL: &str = "https://usher.it.example";

#[tokio::test]
async fn the_binary_sends_queued_jobs_and_reports_them() {
    let sink = SmtpSink::start().await;
    let mut isolation = Isolation::new();
    let mut env = service_env(&mut isolation, "notification", POSTGRES);
    env.extend([
        ("USHER_SMTP__PORT", sink.port.to_string()),
        ("USHER_LINKS__PUBLIC_BASE_URL", BASE_URL.to_owned()),
        ("USHER_DELIVERY__RETRY_DELAYS_MS", "[100, 200]".to_owned()),
    ]);
    let service = Service::start("usher-notification", &env);
    service
        .wait_for(
            "usher.notification.v1.NotificationService",
            ServingStatus::Serving,
            Duration::from_secs(60),
        )
        .await;

    // A producer's job, its link sealed with the key both sides hold (the
    // development key when none is configured).
    let sealer = Sealer::from_config(&SealConfig::default()).expect("sealer");
    let account = uuid::Uuid::new_v4();
    let job_id = uuid::Uuid::new_v4().to_string();
    let link = format!("{BASE_URL}/invite?token=it-token");
    let job = EmailJob {
        job_id: job_id.clone(),
        account_id: account.to_string(),
        template: EmailTemplate::Invitation as i32,
        recipient_email: "invitee@it.example".into(),
        recipient_name: "In Vitee".into(),
        locale: "fr".into(),
        variables: Some(EmailVariables {
            account_name: "IT Co".into(),
            inviter_name: "Owner".into(),
            expire_time: Some(usher_kit::convert::timestamp(
                chrono::DateTime::from_timestamp(1_900_000_000, 0).expect("time"),
            )),
            ..Default::default()
        }),
        sealed_link: sealer.seal(&job_id, &link),
        seal_key_id: sealer.key_id().to_owned(),
        source: EmailSource::Invitation as i32,
        invitation_id: uuid::Uuid::new_v4().to_string(),
        token_version: 1,
        ..Default::default()
    };
    let amqp = Amqp::start(
        AmqpConfig {
            url: Secret::new(isolation.amqp_url()),
            ..AmqpConfig::default()
        },
        "it-notification",
    );
    amqp.wait_connected(Duration::from_secs(10))
        .await
        .expect("broker");
    let publisher = ConfirmedPublisher::new(amqp.clone());
    // The service declared the queue before reporting SERVING: the job routes.
    publisher
        .publish(&email_job_message(&job))
        .await
        .expect("job accepted by the broker");

    let started = std::time::Instant::now();
    while sink.count() == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "no email");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = &sink.messages()[0];
    assert_eq!(received.to, ["invitee@it.example"]);
    let raw = String::from_utf8_lossy(&received.data);
    assert!(
        raw.contains(&format!("Message-ID: <{job_id}@usher.localhost>")),
        "{raw}"
    );

    let member = Principal {
        kind: PrincipalKind::User,
        account_id: Some(account),
        user_id: Some(uuid::Uuid::new_v4()),
        credential_id: None,
        permissions: vec!["users.read".into(), "account.manage".into()],
        service: None,
        password_change_required: false,
    };
    let mut client = NotificationServiceClient::new(service.channel());
    let mut delivery = None;
    for _ in 0..50 {
        let got = client
            .get_delivery(signed_request(
                "/usher.notification.v1.NotificationService/GetDelivery",
                &member,
                GetDeliveryRequest {
                    delivery_id: job_id.clone(),
                },
            ))
            .await
            .expect("get delivery")
            .into_inner()
            .delivery
            .expect("delivery");
        if got.status == DeliveryStatus::Sent as i32 {
            delivery = Some(got);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivery = delivery.expect("SENT");
    assert_eq!(delivery.locale, "fr");
    assert_eq!(delivery.attempts, 1);

    // Another account sees nothing of it.
    let stranger = Principal {
        account_id: Some(uuid::Uuid::new_v4()),
        ..member.clone()
    };
    let refused = client
        .get_delivery(signed_request(
            "/usher.notification.v1.NotificationService/GetDelivery",
            &stranger,
            GetDeliveryRequest {
                delivery_id: job_id.clone(),
            },
        ))
        .await
        .expect_err("not found");
    assert_eq!(refused.code(), tonic::Code::NotFound);

    // A member without account.manage may not preview.
    let reader = Principal {
        permissions: vec!["users.read".into()],
        ..member.clone()
    };
    let denied = client
        .preview_email(signed_request(
            "/usher.notification.v1.NotificationService/PreviewEmail",
            &reader,
            PreviewEmailRequest {
                template: EmailTemplate::PasswordReset as i32,
                locale: "fr".into(),
            },
        ))
        .await
        .expect_err("denied");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let preview = client
        .preview_email(signed_request(
            "/usher.notification.v1.NotificationService/PreviewEmail",
            &member,
            PreviewEmailRequest {
                template: EmailTemplate::PasswordReset as i32,
                locale: "fr".into(),
            },
        ))
        .await
        .expect("preview")
        .into_inner();
    assert_eq!(preview.locale, "fr");
    assert!(preview.text_body.contains(BASE_URL));
    assert_eq!(sink.count(), 1, "a preview sends nothing");

    amqp.close().await;
    let exit = service.terminate().await;
    assert!(exit.success(), "{exit}");
}
