//! The whole product, every binary: an admin invites through the gateway,
//! the notification service emails the invitee through SMTP, the invitee
//! opens the link from that email on the gateway's page and accepts, the
//! inviter is emailed, and the invitation shows its email delivered.

use std::time::Duration;

use mail_parser::MessageParser;
use tonic_health::pb::health_check_response::ServingStatus;
use usher_proto::{
    identity::v1::{SignInRequest, auth_service_client::AuthServiceClient, sign_in_request::Login},
    invitation::v1::{self as pb, invitation_service_client::InvitationServiceClient},
    notification::v1::DeliveryStatus,
};

use crate::{
    harness::{
        Isolation, OWNER_PASSWORD, POSTGRES, Service, bearer, create_account, http, role_id,
        service_env, sign_in,
    },
    smtp_sink::SmtpSink,
};

/// The public address links point to (a load balancer in production).
pub const BASE_URL: &str = "https://usher.journey.example";

/// Every binary with an SMTP sink, links on [`BASE_URL`].
pub struct MailStack {
    pub sink: SmtpSink,
    /// The identity service's environment (for `usher platform-keys create`).
    pub identity_env: Vec<(&'static str, String)>,
    pub identity: Service,
    pub invitation: Service,
    pub invitation_env: Vec<(&'static str, String)>,
    pub notification: Service,
    pub notification_env: Vec<(&'static str, String)>,
    pub gateway: Service,
    pub gateway_env: Vec<(&'static str, String)>,
    /// Dropped after the processes.
    pub isolation: Isolation,
}

impl MailStack {
    /// Starts everything and waits until it serves.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// [`Self::start`] with more settings for the gateway.
    pub async fn start_with(gateway_extra: &[(&'static str, &str)]) -> Self {
        Self::start_configured(&[], gateway_extra).await
    }

    /// [`Self::start_with`] with more settings for the services too:
    /// `(binary, variable, value)`.
    pub async fn start_configured(
        service_extra: &[(&str, &'static str, String)],
        gateway_extra: &[(&'static str, &str)],
    ) -> Self {
        let extra = |binary: &str| -> Vec<(&'static str, String)> {
            service_extra
                .iter()
                .filter(|(b, _, _)| *b == binary)
                .map(|(_, key, value)| (*key, value.clone()))
                .collect()
        };
        let sink = SmtpSink::start().await;
        let mut isolation = Isolation::new();
        let mut identity_env = service_env(&mut isolation, "identity", POSTGRES);
        identity_env.push(("USHER_LINKS__PUBLIC_BASE_URL", BASE_URL.to_owned()));
        identity_env.extend(extra("usher-identity"));
        let identity = Service::start("usher-identity", &identity_env);
        let mut invitation_env = service_env(&mut isolation, "invitation", POSTGRES);
        invitation_env.extend([
            ("USHER_IDENTITY__URL", format!("http://{}", identity.grpc)),
            ("USHER_LINKS__PUBLIC_BASE_URL", BASE_URL.to_owned()),
            // A journey reinvites at once; the cool-down has tests of its own.
            ("USHER_INVITATIONS__RESEND_COOLDOWN_SECS", "0".to_owned()),
        ]);
        invitation_env.extend(extra("usher-invitation"));
        let invitation = Service::start("usher-invitation", &invitation_env);
        let mut notification_env = service_env(&mut isolation, "notification", POSTGRES);
        notification_env.extend([
            ("USHER_SMTP__PORT", sink.port.to_string()),
            ("USHER_LINKS__PUBLIC_BASE_URL", BASE_URL.to_owned()),
        ]);
        notification_env.extend(extra("usher-notification"));
        let notification = Service::start("usher-notification", &notification_env);
        let mut gateway_env = vec![
            ("USHER_REDIS__KEY_PREFIX", isolation.redis_prefix()),
            (
                "USHER_UPSTREAMS__IDENTITY",
                format!("http://{}", identity.grpc),
            ),
            (
                "USHER_UPSTREAMS__INVITATION",
                format!("http://{}", invitation.grpc),
            ),
            (
                "USHER_UPSTREAMS__NOTIFICATION",
                format!("http://{}", notification.grpc),
            ),
        ];
        gateway_env.extend(gateway_extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let gateway = Service::start("usher-gateway", &gateway_env);
        for (service, name) in [
            (&identity, "usher.identity.v1.AuthService"),
            (&invitation, "usher.invitation.v1.InvitationService"),
            (&notification, "usher.notification.v1.NotificationService"),
        ] {
            service
                .wait_for(name, ServingStatus::Serving, Duration::from_secs(60))
                .await;
        }
        gateway
            .wait_for("", ServingStatus::Serving, Duration::from_secs(30))
            .await;
        Self {
            sink,
            identity_env,
            identity,
            invitation,
            invitation_env,
            notification,
            notification_env,
            gateway,
            gateway_env,
            isolation,
        }
    }

    /// Waits until `count` emails to `address` arrived; returns them in
    /// order of arrival as (subject, text part).
    pub async fn emails_to(&self, address: &str, count: usize) -> Vec<(String, String)> {
        for _ in 0..300 {
            let received: Vec<_> = self
                .sink
                .messages()
                .into_iter()
                .filter(|m| m.to == [address])
                .collect();
            if received.len() >= count {
                return received
                    .iter()
                    .map(|m| {
                        let parsed = MessageParser::default()
                            .parse(&m.data)
                            .expect("a parsable email");
                        (
                            parsed.subject().unwrap_or_default().to_owned(),
                            parsed.body_text(0).expect("a text part").into_owned(),
                        )
                    })
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("fewer than {count} emails to {address}");
    }

    /// The text of the first email to `address`.
    pub async fn email_to(&self, address: &str) -> String {
        self.emails_to(address, 1).await.remove(0).1
    }
}

/// Accepts the invitation of `token` on the gateway's page in `lang`, as a
/// browser posts the form; returns the status and the page.
pub async fn accept_on_page(
    gateway: &Service,
    token: &str,
    lang: &str,
    name: &str,
    password: &str,
) -> (u16, String) {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("token", token)
        .append_pair("lang", lang)
        .append_pair("action", "accept")
        .append_pair("display_name", name)
        .append_pair("password", password);
    let (status, _, body) = http(
        gateway,
        "POST",
        "/invite",
        &[("content-type", "application/x-www-form-urlencoded")],
        form.finish().as_bytes(),
    )
    .await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The token of the link to `path` (`/invite`, `/reset`) in an email's text.
pub fn link_token(text: &str, path: &str) -> String {
    let prefix = format!("{BASE_URL}{path}?token=");
    let start = text
        .find(&prefix)
        .unwrap_or_else(|| panic!("a link to {path} in {text}"))
        + prefix.len();
    let token: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    assert_eq!(token.len(), 43, "{text}");
    token
}

#[tokio::test]
async fn invited_by_email_accepted_on_the_page_and_delivery_reported() {
    let stack = MailStack::start().await;
    let MailStack {
        sink,
        identity,
        gateway,
        isolation,
        ..
    } = &stack;
    let slug = format!("journey-{}", isolation.id);
    create_account(
        identity,
        &slug,
        "Journey Co",
        "owner@journey.example",
        "Jo Owner",
        5,
    )
    .await;
    let mut auth = AuthServiceClient::new(gateway.channel());
    let admin = sign_in(
        gateway,
        &slug,
        Login::Email("owner@journey.example".into()),
        OWNER_PASSWORD,
    )
    .await;
    let user_role = role_id(gateway, &admin, "User").await;

    // The admin invites; the invitee gets an email naming inviter and
    // account, with a link on the public base URL.
    let mut invitations = InvitationServiceClient::new(gateway.channel());
    let created = invitations
        .create_invitations(bearer(
            &admin,
            pb::CreateInvitationsRequest {
                raw_text: "Ivy Journey <ivy@journey.example>".into(),
                role_id: user_role,
                ..Default::default()
            },
        ))
        .await
        .expect("created")
        .into_inner();
    assert_eq!(created.invited_count, 1, "{created:?}");
    let id = created.results[0]
        .invitation
        .clone()
        .expect("invitation")
        .id;
    let text = stack.email_to("ivy@journey.example").await;
    assert!(text.contains("Jo Owner"), "{text}");
    assert!(text.contains("Journey Co"), "{text}");
    let token = link_token(&text, "/invite");

    // The delivery shows on the invitation.
    let mut delivered = false;
    for _ in 0..100 {
        let shown = invitations
            .get_invitation(bearer(
                &admin,
                pb::GetInvitationRequest {
                    invitation_id: id.clone(),
                },
            ))
            .await
            .expect("get")
            .into_inner()
            .invitation
            .expect("invitation");
        if shown.latest_delivery.expect("delivery").status() == DeliveryStatus::Sent {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(delivered, "the invitation shows its email SENT");

    // The link, opened on the gateway (where the base URL's load balancer
    // would send it): the page, then accept.
    let (status, _, page) = http(gateway, "GET", &format!("/invite?token={token}"), &[], b"").await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&page).contains("Jo Owner invited you to join Journey Co."));
    let (status, page) = accept_on_page(
        gateway,
        &token,
        "en",
        "Ivy Journey",
        "a long enough passphrase",
    )
    .await;
    assert_eq!(status, 200, "{page}");
    auth.sign_in(SignInRequest {
        account_slug: slug,
        login: Some(Login::Email("ivy@journey.example".into())),
        password: "a long enough passphrase".into(),
    })
    .await
    .expect("the new member signs in");

    // The inviter is told.
    let told = stack.email_to("owner@journey.example").await;
    assert!(
        told.contains("Ivy Journey") || told.contains("ivy@journey.example"),
        "{told}"
    );
    assert_eq!(sink.count(), 2, "one email each, no duplicates");
}
