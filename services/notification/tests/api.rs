//! NotificationService handlers against a real PostgreSQL database, called
//! with a verified principal as the guard attaches it.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;

use chrono::Duration;
use usher_kit::{
    clock::{Clock, ManualClock, SharedClock, SystemClock},
    error::{ApiError, Reason},
    principal::{Principal, PrincipalKind},
    testing::TestDatabase,
};
use usher_notification::{
    api::NotificationApi,
    migration::Migrator,
    store::{self, NewDelivery, Outcome, Status},
    templates::Templates,
};
use usher_proto::notification::v1 as pb;
use uuid::Uuid;

fn member(account: Uuid) -> Principal {
    Principal {
        kind: PrincipalKind::User,
        account_id: Some(account),
        user_id: Some(Uuid::new_v4()),
        credential_id: None,
        permissions: vec!["users.read".into(), "account.manage".into()],
        service: None,
        password_change_required: false,
    }
}

fn row(account: Uuid, template: pb::EmailTemplate, email: &str) -> NewDelivery {
    NewDelivery {
        id: Uuid::new_v4(),
        account_id: account,
        source: pb::EmailSource::Invitation,
        template,
        recipient_email: email.into(),
        recipient_name: "Ada".into(),
        invitation_id: Uuid::new_v4().to_string(),
        user_id: Uuid::new_v4().to_string(),
        token_version: 1,
        account_locale: "fr".into(),
    }
}

fn field(error: &ApiError) -> String {
    match error {
        ApiError::InvalidArgument(violations) => violations[0].field.clone(),
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

#[tokio::test]
async fn deliveries_are_listed_and_read_within_the_callers_account_only() {
    let database = TestDatabase::create("notify_api").await.expect("db");
    let db = database.migrated::<Migrator>().await.expect("migrations");
    let clock = ManualClock::new(SystemClock.now());
    let shared: SharedClock = clock.clone();
    let api = NotificationApi::new(
        db.clone(),
        Arc::new(Templates::new().expect("templates")),
        "https://usher.test",
        shared,
    );
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ids_a = Vec::new();
    for i in 0..7 {
        let template = if i % 2 == 0 {
            pb::EmailTemplate::Invitation
        } else {
            pb::EmailTemplate::PasswordReset
        };
        let new = row(a, template, &format!("a{i}@example.com"));
        store::claim(&db, &new, clock.now(), Duration::seconds(30))
            .await
            .expect("claim");
        if i < 5 {
            let outcome = Outcome {
                status: Status::Sent,
                reason: String::new(),
                locale: "fr".into(),
                message_id: format!("<{}@h>", new.id),
            };
            store::record(&db, new.id, &outcome, clock.now())
                .await
                .expect("record");
        }
        ids_a.push(new.id);
        clock.advance(Duration::seconds(1));
    }
    let other = row(b, pb::EmailTemplate::Invitation, "b@example.com");
    store::claim(&db, &other, clock.now(), Duration::seconds(30))
        .await
        .expect("claim");

    // Every page, newest first, only account A's rows.
    let caller = member(a);
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = api
            .list(
                &caller,
                pb::ListDeliveriesRequest {
                    page_size: 3,
                    page_token: token.clone(),
                    ..Default::default()
                },
            )
            .await
            .expect("page");
        assert!(page.deliveries.len() <= 3);
        seen.extend(page.deliveries.iter().map(|d| d.id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: Vec<_> = ids_a.iter().rev().map(ToString::to_string).collect();
    assert_eq!(seen, expected);

    // Filters.
    let sent = api
        .list(
            &caller,
            pb::ListDeliveriesRequest {
                status: pb::DeliveryStatus::Sent as i32,
                template: pb::EmailTemplate::Invitation as i32,
                ..Default::default()
            },
        )
        .await
        .expect("filtered");
    assert_eq!(sent.deliveries.len(), 3);
    assert!(
        sent.deliveries
            .iter()
            .all(|d| d.status == pb::DeliveryStatus::Sent as i32
                && d.locale == "fr"
                && d.send_time.is_some()
                && !d.message_id.is_empty())
    );
    let by_email = api
        .list(
            &caller,
            pb::ListDeliveriesRequest {
                recipient_email: " A3@Example.com ".into(),
                ..Default::default()
            },
        )
        .await
        .expect("by email");
    assert_eq!(by_email.deliveries.len(), 1);

    // Get: own id found; the other account's id is NOT_FOUND like an unknown one.
    let own = api
        .get(
            &caller,
            pb::GetDeliveryRequest {
                delivery_id: ids_a[0].to_string(),
            },
        )
        .await
        .expect("own delivery");
    assert_eq!(
        own.delivery.expect("delivery").recipient_email,
        "a0@example.com"
    );
    for id in [other.id, Uuid::new_v4()] {
        let error = api
            .get(
                &caller,
                pb::GetDeliveryRequest {
                    delivery_id: id.to_string(),
                },
            )
            .await
            .expect_err("not visible");
        assert_eq!(error.reason(), Reason::NotFound);
    }
    let b_sees = api
        .list(&member(b), pb::ListDeliveriesRequest::default())
        .await
        .expect("b lists");
    assert_eq!(b_sees.deliveries.len(), 1);

    // Input limits.
    let bad = [
        (
            pb::ListDeliveriesRequest {
                page_size: -1,
                ..Default::default()
            },
            "page_size",
        ),
        (
            pb::ListDeliveriesRequest {
                page_token: token_for_other_query(&api, &caller).await,
                status: pb::DeliveryStatus::Failed as i32,
                ..Default::default()
            },
            "page_token",
        ),
        (
            pb::ListDeliveriesRequest {
                invitation_id: "nope".into(),
                ..Default::default()
            },
            "invitation_id",
        ),
        (
            pb::ListDeliveriesRequest {
                recipient_email: "x".repeat(300),
                ..Default::default()
            },
            "recipient_email",
        ),
        (
            pb::ListDeliveriesRequest {
                start_time: Some(prost_types::Timestamp {
                    seconds: 2_000_000_000,
                    nanos: 0,
                }),
                end_time: Some(prost_types::Timestamp {
                    seconds: 1_000_000_000,
                    nanos: 0,
                }),
                ..Default::default()
            },
            "start_time",
        ),
        (
            pb::ListDeliveriesRequest {
                status: 99,
                ..Default::default()
            },
            "status",
        ),
    ];
    for (request, expected) in bad {
        let error = api.list(&caller, request).await.expect_err("refused");
        assert_eq!(field(&error), expected);
    }
    let error = api
        .get(
            &caller,
            pb::GetDeliveryRequest {
                delivery_id: "not-a-uuid".into(),
            },
        )
        .await
        .expect_err("refused");
    assert_eq!(field(&error), "delivery_id");
    // No account in the credential: refused.
    let error = api
        .list(
            &Principal::anonymous(),
            pb::ListDeliveriesRequest::default(),
        )
        .await
        .expect_err("no account");
    assert_eq!(error.reason(), Reason::Unauthenticated);

    database.drop_database().await.expect("drop");
}

async fn token_for_other_query(api: &NotificationApi, caller: &Principal) -> String {
    api.list(
        caller,
        pb::ListDeliveriesRequest {
            page_size: 1,
            ..Default::default()
        },
    )
    .await
    .expect("page")
    .next_page_token
}

#[tokio::test]
async fn previews_render_every_template_in_both_locales_and_send_nothing() {
    let database = TestDatabase::create("notify_preview").await.expect("db");
    let db = database.migrated::<Migrator>().await.expect("migrations");
    let api = NotificationApi::new(
        db.clone(),
        Arc::new(Templates::new().expect("templates")),
        "https://usher.test",
        SystemClock::shared(),
    );
    let caller = member(Uuid::new_v4());
    for template in [
        pb::EmailTemplate::Invitation,
        pb::EmailTemplate::Reinvitation,
        pb::EmailTemplate::PasswordReset,
        pb::EmailTemplate::PasswordChanged,
        pb::EmailTemplate::InvitationAccepted,
        pb::EmailTemplate::SetPassword,
    ] {
        for (asked, expected) in [("fr", "fr"), ("en-GB", "en"), ("", "en"), ("de", "en")] {
            let preview = api
                .preview(
                    &caller,
                    &pb::PreviewEmailRequest {
                        template: template as i32,
                        locale: asked.into(),
                    },
                )
                .await
                .expect("preview");
            assert_eq!(preview.locale, expected);
            assert!(!preview.subject.is_empty());
            assert!(preview.html_body.contains(&format!("lang=\"{expected}\"")));
            if usher_notification::templates::needs_link(template) {
                assert!(preview.text_body.contains("https://usher.test/"));
            }
            if template == pb::EmailTemplate::SetPassword {
                assert!(
                    preview
                        .text_body
                        .contains("https://usher.test/set-password?token=")
                );
            }
        }
    }
    // Once a job told the account's default locale, it is the fallback.
    let account = caller.account_id.expect("account");
    store::claim(
        &db,
        &row(account, pb::EmailTemplate::Invitation, "x@example.com"),
        SystemClock.now(),
        Duration::seconds(30),
    )
    .await
    .expect("claim");
    for (asked, expected) in [("", "fr"), ("de", "fr"), ("en", "en")] {
        let preview = api
            .preview(
                &caller,
                &pb::PreviewEmailRequest {
                    template: pb::EmailTemplate::PasswordChanged as i32,
                    locale: asked.into(),
                },
            )
            .await
            .expect("preview");
        assert_eq!(preview.locale, expected, "{asked:?}");
    }
    let error = api
        .preview(&caller, &pb::PreviewEmailRequest::default())
        .await
        .expect_err("template required");
    assert_eq!(field(&error), "template");
    let error = api
        .preview(
            &caller,
            &pb::PreviewEmailRequest {
                template: pb::EmailTemplate::Invitation as i32,
                locale: "fr\r\nX".into(),
            },
        )
        .await
        .expect_err("bad locale");
    assert_eq!(field(&error), "locale");
    assert!(
        store::get(&db, caller.account_id.unwrap(), Uuid::new_v4())
            .await
            .expect("query")
            .is_none()
    );
    database.drop_database().await.expect("drop");
}
