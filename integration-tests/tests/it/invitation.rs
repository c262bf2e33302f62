//! Invitations end to end through the real binaries: an admin signed in at
//! the gateway invites, reinvites; the invitee previews and accepts through
//! the gateway with the link carried (sealed) in the queued email job; a
//! delivery result from the notification pipeline shows on the invitation;
//! with a short configured lifetime a link expires and `invitation.expired`
//! is published.

use std::time::Duration;

use prost::Message;
use tonic_health::pb::health_check_response::ServingStatus;
use usher_kit::{
    amqp::{Amqp, EMAIL_EXCHANGE, EVENTS_EXCHANGE, OutgoingMessage},
    seal::{SealConfig, Sealer},
};
use usher_proto::{
    identity::v1::{SignInRequest, auth_service_client::AuthServiceClient, sign_in_request::Login},
    invitation::v1::{self as pb, invitation_service_client::InvitationServiceClient},
    notification::v1::{DeliveryResult, DeliveryStatus, EmailJob, EmailTemplate},
};

use crate::harness::{
    Isolation, OWNER_PASSWORD, POSTGRES, Service, bearer, bound_queues, create_account, header,
    http, role_id, service_env, sign_in,
};

/// The next message on `queue`, waiting up to 15 s.
async fn next(amqp: &Amqp, queue: &str) -> lapin::message::BasicGetMessage {
    let channel = amqp.channel().await.expect("channel");
    for _ in 0..150 {
        if let Some(message) = channel
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic_get")
        {
            return message;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing arrived on {queue}");
}

pub async fn next_job(amqp: &Amqp) -> EmailJob {
    let message = next(amqp, "it.email").await;
    EmailJob::decode(message.delivery.data.as_slice()).expect("an email job")
}

/// The token of the link in `job`, opened with the development seal key the
/// binaries use when none is configured (as the notification service would).
pub fn token_of(job: &EmailJob) -> String {
    let sealer = Sealer::from_config(&SealConfig::default()).expect("dev seal key");
    let link = sealer
        .open(&job.job_id, &job.sealed_link)
        .expect("sealed link");
    assert!(link.contains("/invite?token="), "{link}");
    link.rsplit_once('=').expect("token").1.to_owned()
}

/// identity (links live `lifetime_secs`), invitation and the gateway, a queue on
/// the email exchange and one for `invitation.expired`, and an account whose
/// owner is signed in at the gateway.
pub struct Setup {
    pub _isolation: Isolation,
    pub _identity: Service,
    pub _invitation: Service,
    pub gateway: Service,
    pub amqp: Amqp,
    pub admin: String,
    pub user_role: String,
    pub slug: String,
}

pub async fn setup(lifetime_secs: u32) -> Setup {
    let mut isolation = Isolation::new();
    let mut identity_env = service_env(&mut isolation, "identity", POSTGRES);
    // Accounts may not go below 1 second here.
    identity_env.extend([
        (
            "USHER_ACCOUNTS__MIN_INVITATION_LIFETIME_SECS",
            "1".to_owned(),
        ),
        (
            "USHER_ACCOUNTS__DEFAULT_INVITATION_LIFETIME_SECS",
            lifetime_secs.to_string(),
        ),
    ]);
    let identity = Service::start("usher-identity", &identity_env);
    let mut invitation_env = service_env(&mut isolation, "invitation", POSTGRES);
    invitation_env.extend([
        ("USHER_IDENTITY__URL", format!("http://{}", identity.grpc)),
        ("USHER_INVITATIONS__RESEND_COOLDOWN_SECS", "0".to_owned()),
        ("USHER_INVITATIONS__EXPIRY_SWEEP_SECS", "1".to_owned()),
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

    // The email queue the notification service would consume, and a queue
    // for invitation events.
    let amqp = bound_queues(
        &isolation,
        "it-invitation",
        &[
            ("it.email", EMAIL_EXCHANGE, "email.send"),
            ("it.expired", EVENTS_EXCHANGE, "invitation.expired"),
        ],
    )
    .await;

    // An account, made by a platform at identity; its owner signs in at the gateway.
    let slug = format!("inv-{}", isolation.id);
    create_account(
        &identity,
        &slug,
        "Invite Co",
        "owner@invite.example",
        "Oona Owner",
        10,
    )
    .await;
    let admin = sign_in(
        &gateway,
        &slug,
        Login::Email("owner@invite.example".into()),
        OWNER_PASSWORD,
    )
    .await;
    let user_role = role_id(&gateway, &admin, "User").await;
    Setup {
        _isolation: isolation,
        _identity: identity,
        _invitation: invitation,
        gateway,
        amqp,
        admin,
        user_role,
        slug,
    }
}

/// The default link lifetime.
pub const DAY: u32 = 86_400;

#[tokio::test]
async fn invite_reinvite_accept_and_expire_through_the_gateway() {
    let Setup {
        gateway,
        amqp,
        admin,
        user_role,
        slug,
        // Bound (not `..`) so the processes and the vhost live to the end.
        _isolation,
        _identity,
        _invitation,
    } = setup(4).await;
    let mut auth = AuthServiceClient::new(gateway.channel());
    // Invite: the job carries the sealed link and the invitee's details.
    let mut invitations = InvitationServiceClient::new(gateway.channel());
    let create = |emails: &str| pb::CreateInvitationsRequest {
        raw_text: emails.to_owned(),
        role_id: user_role.clone(),
        locale: "fr".into(),
        ..Default::default()
    };
    let created = invitations
        .create_invitations(bearer(&admin, create("Ivy <ivy@invite.example>")))
        .await
        .expect("created")
        .into_inner();
    assert_eq!(created.invited_count, 1, "{created:?}");
    let invitation_id = created.results[0]
        .invitation
        .clone()
        .expect("invitation")
        .id;
    let first = next_job(&amqp).await;
    assert_eq!(first.template(), EmailTemplate::Invitation);
    assert_eq!(first.recipient_email, "ivy@invite.example");
    assert_eq!(first.recipient_name, "Ivy");
    assert_eq!(first.locale, "fr");
    assert_eq!(first.invitation_id, invitation_id);
    let variables = first.variables.clone().expect("variables");
    assert_eq!(variables.account_name, "Invite Co");
    assert_eq!(variables.inviter_name, "Oona Owner");
    let old_token = token_of(&first);

    // Reinvite: a new job with a new link; the old link is dead.
    let resent = invitations
        .resend_invitations(bearer(
            &admin,
            pb::ResendInvitationsRequest {
                request_id: String::new(),
                invitation_ids: vec![invitation_id.clone()],
            },
        ))
        .await
        .expect("resent")
        .into_inner();
    assert_eq!(resent.succeeded_count, 1, "{resent:?}");
    let second = next_job(&amqp).await;
    assert_eq!(second.template(), EmailTemplate::Reinvitation);
    assert_eq!(second.token_version, 2);
    let token = token_of(&second);
    assert_ne!(token, old_token);
    let dead = invitations
        .preview_invitation(pb::PreviewInvitationRequest { token: old_token })
        .await
        .expect_err("old link");
    assert_eq!(dead.code(), tonic::Code::FailedPrecondition, "{dead:?}");

    // The notification pipeline reports the reinvitation sent.
    let result = DeliveryResult {
        job_id: second.job_id.clone(),
        account_id: second.account_id.clone(),
        template: second.template,
        invitation_id: invitation_id.clone(),
        status: DeliveryStatus::Sent as i32,
        attempts: 1,
        ..Default::default()
    };
    let publisher = usher_kit::amqp::ConfirmedPublisher::new(amqp.clone());
    publisher
        .publish(&OutgoingMessage::new(
            EMAIL_EXCHANGE,
            "email.result.invitation",
            "usher.notification.v1.DeliveryResult",
            result.encode_to_vec(),
        ))
        .await
        .expect("result published");
    let mut delivered = false;
    for _ in 0..100 {
        let shown = invitations
            .get_invitation(bearer(
                &admin,
                pb::GetInvitationRequest {
                    invitation_id: invitation_id.clone(),
                },
            ))
            .await
            .expect("get")
            .into_inner()
            .invitation
            .expect("invitation");
        let delivery = shown.latest_delivery.expect("delivery");
        if delivery.status() == DeliveryStatus::Sent {
            assert_eq!(delivery.job_id, second.job_id);
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(delivered, "the delivery result shows on the invitation");

    // Accept through the gateway (public): a session for the new member,
    // and an email to the inviter.
    let preview = invitations
        .preview_invitation(pb::PreviewInvitationRequest {
            token: token.clone(),
        })
        .await
        .expect("preview")
        .into_inner();
    assert_eq!(preview.account_name, "Invite Co");
    assert_eq!(preview.inviter_display_name, "Oona Owner");
    let accepted = invitations
        .accept_invitation(pb::AcceptInvitationRequest {
            token: token.clone(),
            display_name: "Ivy Invitee".into(),
            password: "a long enough passphrase".into(),
            locale: String::new(),
        })
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(accepted.account_slug, slug);
    let third = next_job(&amqp).await;
    assert_eq!(third.template(), EmailTemplate::InvitationAccepted);
    assert_eq!(third.recipient_email, "owner@invite.example");
    assert!(third.sealed_link.is_empty());
    let variables = third.variables.expect("variables");
    assert_eq!(variables.invitee_email, "ivy@invite.example");
    auth.sign_in(SignInRequest {
        account_slug: slug.clone(),
        login: Some(Login::Email("ivy@invite.example".into())),
        password: "a long enough passphrase".into(),
    })
    .await
    .expect("the new member signs in");

    // A short lifetime, end to end: the link dies and `invitation.expired`
    // is published once.
    let late = invitations
        .create_invitations(bearer(&admin, create("late@invite.example")))
        .await
        .expect("created")
        .into_inner();
    let late_id = late.results[0].invitation.clone().expect("invitation").id;
    let late_token = token_of(&next_job(&amqp).await);
    invitations
        .preview_invitation(pb::PreviewInvitationRequest {
            token: late_token.clone(),
        })
        .await
        .expect("usable at first");
    let expired = next(&amqp, "it.expired").await;
    assert_eq!(expired.delivery.routing_key.as_str(), "invitation.expired");
    let gone = invitations
        .accept_invitation(pb::AcceptInvitationRequest {
            token: late_token,
            display_name: "Late".into(),
            password: "a long enough passphrase".into(),
            locale: String::new(),
        })
        .await
        .expect_err("expired");
    assert_eq!(gone.code(), tonic::Code::FailedPrecondition, "{gone:?}");
    let listed = invitations
        .list_invitations(bearer(
            &admin,
            pb::ListInvitationsRequest {
                states: vec![pb::InvitationState::Expired as i32],
                ..Default::default()
            },
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.invitations.len(), 1);
    assert_eq!(listed.invitations[0].id, late_id);
    // Published once only.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let channel = amqp.channel().await.expect("channel");
    let again = channel
        .basic_get(
            "it.expired".into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic_get");
    assert!(again.is_none(), "invitation.expired published twice");
    amqp.close().await;
}

/// An HTTP/1.1 exchange with a text body.
async fn page(
    gateway: &Service,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let (status, headers, body) = http(gateway, method, target, headers, body.as_bytes()).await;
    (
        status,
        headers,
        String::from_utf8(body).expect("utf-8 page"),
    )
}

fn form(fields: &[(&str, &str)]) -> String {
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in fields {
        out.append_pair(name, value);
    }
    out.finish()
}

#[tokio::test]
async fn the_invitation_page_shows_accepts_and_speaks_french() {
    let Setup {
        gateway,
        amqp,
        admin,
        user_role,
        slug,
        // Bound (not `..`) so the processes and the vhost live to the end.
        _isolation,
        _identity,
        _invitation,
    } = setup(DAY).await;
    let mut invitations = InvitationServiceClient::new(gateway.channel());
    invitations
        .create_invitations(bearer(
            &admin,
            pb::CreateInvitationsRequest {
                raw_text: "Ivy <ivy@invite.example>, Fred <fred@invite.example>".into(),
                role_id: user_role,
                ..Default::default()
            },
        ))
        .await
        .expect("created");
    let mut tokens = std::collections::HashMap::new();
    for _ in 0..2 {
        let job = next_job(&amqp).await;
        tokens.insert(job.recipient_email.clone(), token_of(&job));
    }
    let ivy = tokens["ivy@invite.example"].clone();
    let fred = tokens["fred@invite.example"].clone();
    let url = |token: &str| format!("/invite?token={token}");

    // Opening the link shows who invited whom, and consumes nothing.
    for _ in 0..2 {
        let (status, headers, body) = page(&gateway, "GET", &url(&ivy), &[], "").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("Oona Owner invited you to join Invite Co."),
            "{body}"
        );
        assert!(body.contains("ivy@invite.example"));
        assert!(body.contains("value=\"Ivy\""), "the name is prefilled");
        assert!(header(&headers, "content-type").starts_with("text/html"));
        assert!(header(&headers, "content-security-policy").starts_with("default-src 'none'"));
        assert_eq!(header(&headers, "referrer-policy"), "no-referrer");
        assert_eq!(header(&headers, "cache-control"), "no-store");
    }
    // A password outside the policy: the form again, with the reason, and
    // the link still works.
    let weak = form(&[
        ("token", &ivy),
        ("lang", "en"),
        ("action", "accept"),
        ("display_name", "Ivy Invitee"),
        ("password", "short"),
    ]);
    let content_type = [("content-type", "application/x-www-form-urlencoded")];
    let (status, _, body) = page(&gateway, "POST", "/invite", &content_type, &weak).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("Choose a password within the length shown."),
        "{body}"
    );
    // Accept: the welcome page, then the new member signs in.
    let good = form(&[
        ("token", &ivy),
        ("lang", "en"),
        ("action", "accept"),
        ("display_name", "Ivy Invitee"),
        ("password", "a long enough passphrase"),
    ]);
    let (status, _, body) = page(&gateway, "POST", "/invite", &content_type, &good).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("You are now a member of Invite Co."),
        "{body}"
    );
    AuthServiceClient::new(gateway.channel())
        .sign_in(SignInRequest {
            account_slug: slug.clone(),
            login: Some(Login::Email("ivy@invite.example".into())),
            password: "a long enough passphrase".into(),
        })
        .await
        .expect("the new member signs in");
    // The used link: the one generic failure page.
    let (status, _, body) = page(&gateway, "GET", &url(&ivy), &[], "").await;
    assert_eq!(status, 410);
    assert!(body.contains("This link cannot be used"), "{body}");
    let (status, _, _) = page(&gateway, "GET", "/invite?token=made-up", &[], "").await;
    assert_eq!(status, 410);

    // The invitation's locale (the account's default, English) outranks the
    // browser's preference; the page's switch outranks both. Then accepted
    // in French.
    let french = [("accept-language", "fr-FR,fr;q=0.9,en;q=0.5")];
    let (status, headers, _) = page(&gateway, "GET", &url(&fred), &french, "").await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-language"), "en");
    let switched = format!("{}&lang=fr", url(&fred));
    let (status, headers, body) = page(&gateway, "GET", &switched, &french, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "content-language"), "fr");
    assert!(
        body.contains("Oona Owner vous invite à rejoindre Invite Co."),
        "{body}"
    );
    let accept_fr = form(&[
        ("token", &fred),
        ("lang", "fr"),
        ("action", "accept"),
        ("display_name", "Frédéric"),
        ("password", "une phrase de passe assez longue"),
    ]);
    let (status, _, body) = page(&gateway, "POST", "/invite", &content_type, &accept_fr).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("Vous êtes maintenant membre de Invite Co."),
        "{body}"
    );
    AuthServiceClient::new(gateway.channel())
        .sign_in(SignInRequest {
            account_slug: slug,
            login: Some(Login::Email("fred@invite.example".into())),
            password: "une phrase de passe assez longue".into(),
        })
        .await
        .expect("the French member signs in");
    amqp.close().await;
}

#[tokio::test]
async fn the_audit_log_shows_invitations_created_resent_accepted_and_revoked() {
    use usher_proto::identity::v1::{
        ActorKind, AuditEvent, GetCurrentUserRequest, ListAuditEventsRequest,
        audit_service_client::AuditServiceClient,
    };
    let Setup {
        gateway,
        amqp,
        admin,
        user_role,
        _isolation,
        _identity,
        _invitation,
        ..
    } = setup(DAY).await;
    let owner = AuthServiceClient::new(gateway.channel())
        .get_current_user(bearer(&admin, GetCurrentUserRequest {}))
        .await
        .expect("me")
        .into_inner()
        .user
        .expect("user");
    let mut invitations = InvitationServiceClient::new(gateway.channel());
    let created = invitations
        .create_invitations(bearer(
            &admin,
            pb::CreateInvitationsRequest {
                raw_text: "ivy@invite.example, rex@invite.example".into(),
                role_id: user_role.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("created")
        .into_inner();
    assert_eq!(created.invited_count, 2, "{created:?}");
    let id_of = |email: &str| {
        created
            .results
            .iter()
            .filter_map(|r| r.invitation.clone())
            .find(|i| i.email == email)
            .expect("invited")
            .id
    };
    let (ivy, rex) = (id_of("ivy@invite.example"), id_of("rex@invite.example"));
    for _ in 0..2 {
        next_job(&amqp).await;
    }
    invitations
        .resend_invitations(bearer(
            &admin,
            pb::ResendInvitationsRequest {
                request_id: String::new(),
                invitation_ids: vec![ivy.clone()],
            },
        ))
        .await
        .expect("resent");
    let token = token_of(&next_job(&amqp).await);
    invitations
        .accept_invitation(pb::AcceptInvitationRequest {
            token,
            display_name: "Ivy Invitee".into(),
            password: "a long enough passphrase".into(),
            locale: String::new(),
        })
        .await
        .expect("accepted");
    invitations
        .revoke_invitations(bearer(
            &admin,
            pb::RevokeInvitationsRequest {
                invitation_ids: vec![rex.clone()],
            },
        ))
        .await
        .expect("revoked");

    // Identity ingests the events a moment later.
    let mut audit = AuditServiceClient::new(gateway.channel());
    let expected = [
        ("invitation.created", &ivy),
        ("invitation.created", &rex),
        ("invitation.resent", &ivy),
        ("invitation.accepted", &ivy),
        ("invitation.revoked", &rex),
    ];
    let mut entries: Vec<AuditEvent> = Vec::new();
    for _ in 0..150 {
        entries = audit
            .list_audit_events(bearer(
                &admin,
                ListAuditEventsRequest {
                    action: "invitation.".into(),
                    ..Default::default()
                },
            ))
            .await
            .expect("audit log")
            .into_inner()
            .audit_events;
        if entries.len() >= expected.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(entries.len(), expected.len(), "{entries:#?}");
    for (action, target) in expected {
        let entry = entries
            .iter()
            .find(|e| e.action == action && &e.target_id == target)
            .unwrap_or_else(|| panic!("no {action} on {target}: {entries:#?}"));
        assert_eq!(entry.target_type, "invitation");
        let email = if target == &ivy {
            "ivy@invite.example"
        } else {
            "rex@invite.example"
        };
        assert_eq!(entry.target_display_name, email);
        let actor = entry.actor.clone().expect("actor");
        if action == "invitation.accepted" {
            assert_eq!(actor.kind(), ActorKind::Anonymous, "{entry:?}");
            assert_eq!(actor.display_name, "Ivy Invitee");
        } else {
            assert_eq!(actor.kind(), ActorKind::User, "{entry:?}");
            assert_eq!(actor.id, owner.id);
            assert_eq!(actor.display_name, "Oona Owner", "{entry:?}");
        }
    }
    amqp.close().await;
}
