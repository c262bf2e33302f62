//! A user created by an admin with an email and no password: the "choose
//! your password" email arrives over SMTP with a link to the gateway's
//! `/set-password` page, in the user's language; the page sets the password
//! once; only then can the user sign in. And the pages' language: the
//! switch, then the invitation's (or link's) locale, then the browser.

use std::time::Duration;

use tonic::Code;
use usher_proto::{
    identity::v1::{
        CreateUserRequest, RequestPasswordResetRequest, SignInRequest,
        auth_service_client::AuthServiceClient, sign_in_request::Login,
        user_service_client::UserServiceClient,
    },
    invitation::v1::{
        CreateInvitationsRequest, invitation_service_client::InvitationServiceClient,
    },
    notification::v1::{
        DeliveryStatus, EmailTemplate, ListDeliveriesRequest,
        notification_service_client::NotificationServiceClient,
    },
};

use crate::{
    harness::{OWNER_PASSWORD, bearer, create_account, http, role_id, sign_in},
    journey::{BASE_URL, MailStack, link_token},
};

const PASSWORD: &str = "a long enough passphrase";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

/// An account with its owner signed in: (slug, owner's access token).
async fn account(stack: &MailStack, name: &str) -> (String, String) {
    let slug = format!("{name}-{}", stack.isolation.id);
    let owner = format!("owner@{name}.example");
    create_account(&stack.identity, &slug, "Setpw Co", &owner, "Sol Owner", 5).await;
    let admin = sign_in(&stack.gateway, &slug, Login::Email(owner), OWNER_PASSWORD).await;
    (slug, admin)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .unwrap_or_default()
}

fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        form.append_pair(k, v);
    }
    form.finish().into_bytes()
}

async fn try_sign_in(
    stack: &MailStack,
    slug: &str,
    email: &str,
    password: &str,
) -> Result<(), tonic::Status> {
    AuthServiceClient::new(stack.gateway.channel())
        .sign_in(SignInRequest {
            account_slug: slug.into(),
            login: Some(Login::Email(email.into())),
            password: password.into(),
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn created_without_password_the_user_sets_it_from_the_emailed_link_once() {
    let stack = MailStack::start().await;
    let (slug, admin) = account(&stack, "setpw").await;
    let user_role = role_id(&stack.gateway, &admin, "User").await;

    let created = UserServiceClient::new(stack.gateway.channel())
        .create_user(bearer(
            &admin,
            CreateUserRequest {
                username: "sam".into(),
                email: "sam@setpw.example".into(),
                display_name: "Sam Setpw".into(),
                role_id: user_role,
                locale: "fr".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("created")
        .into_inner()
        .user
        .expect("user");

    // Before the link is used: the generic sign-in failure.
    let err = try_sign_in(&stack, &slug, "sam@setpw.example", PASSWORD)
        .await
        .expect_err("no password yet");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // The email, in French, with the link to the page in French.
    let (subject, text) = stack.emails_to("sam@setpw.example", 1).await.remove(0);
    assert!(
        subject.contains("Choisissez votre mot de passe"),
        "{subject}"
    );
    assert!(text.contains("Setpw Co"), "{text}");
    let token = link_token(&text, "/set-password");
    assert!(
        text.contains(&format!("{BASE_URL}/set-password?token={token}&locale=fr")),
        "{text}"
    );

    // Its delivery shows to the admin, like a reset email's.
    let mut notifications = NotificationServiceClient::new(stack.gateway.channel());
    let mut sent = false;
    for _ in 0..100 {
        let deliveries = notifications
            .list_deliveries(bearer(
                &admin,
                ListDeliveriesRequest {
                    user_id: created.id.clone(),
                    template: EmailTemplate::SetPassword as i32,
                    ..Default::default()
                },
            ))
            .await
            .expect("deliveries")
            .into_inner()
            .deliveries;
        if deliveries
            .iter()
            .any(|d| d.status() == DeliveryStatus::Sent && d.recipient_email == "sam@setpw.example")
        {
            sent = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sent, "the set-password email shows SENT");

    // The page, opened from the link with no Accept-Language: French, hardened.
    let path = format!("/set-password?token={token}&locale=fr");
    let (status, headers, page) = http(&stack.gateway, "GET", &path, &[], b"").await;
    let page = String::from_utf8_lossy(&page).into_owned();
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<html lang=\"fr\">"), "{page}");
    assert!(page.contains("Choisissez votre mot de passe"), "{page}");
    assert!(page.contains("action=\"/set-password\""), "{page}");
    let csp = header(&headers, "content-security-policy");
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert_eq!(header(&headers, "referrer-policy"), "no-referrer");
    assert_eq!(header(&headers, "cache-control"), "no-store");
    assert_eq!(header(&headers, "content-language"), "fr");
    // The switch wins over the link's locale.
    let (_, _, english) = http(&stack.gateway, "GET", &format!("{path}&lang=en"), &[], b"").await;
    assert!(String::from_utf8_lossy(&english).contains("Choose your password"));

    // A password breaking the policy: the form again, the link kept.
    let short = form(&[("token", &token), ("lang", "fr"), ("password", "short")]);
    let (status, _, _) = http(&stack.gateway, "POST", "/set-password", &[FORM], &short).await;
    assert_eq!(status, 422);

    // The page sets the password; the user signs in.
    let good = form(&[("token", &token), ("lang", "fr"), ("password", PASSWORD)]);
    let (status, _, page) = http(&stack.gateway, "POST", "/set-password", &[FORM], &good).await;
    let page = String::from_utf8_lossy(&page).into_owned();
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Mot de passe enregistré"), "{page}");
    assert!(page.contains("sam@setpw.example"), "{page}");
    try_sign_in(&stack, &slug, "sam@setpw.example", PASSWORD)
        .await
        .expect("the first sign-in works");

    // The link works once.
    let again = form(&[
        ("token", &token),
        ("lang", "fr"),
        ("password", "another long passphrase"),
    ]);
    let (status, _, page) = http(&stack.gateway, "POST", "/set-password", &[FORM], &again).await;
    assert_eq!(status, 410);
    assert!(String::from_utf8_lossy(&page).contains("Ce lien ne peut pas être utilisé"));
    try_sign_in(
        &stack,
        &slug,
        "sam@setpw.example",
        "another long passphrase",
    )
    .await
    .expect_err("the second use changed nothing");

    // P24: the user is told the password was set.
    let (subject, _) = stack.emails_to("sam@setpw.example", 2).await.remove(1);
    assert!(!subject.contains("Choisissez"), "{subject}");
}

#[tokio::test]
async fn pages_open_in_the_invitation_or_link_locale_without_accept_language() {
    let stack = MailStack::start().await;
    let (slug, admin) = account(&stack, "pagelang").await;
    let user_role = role_id(&stack.gateway, &admin, "User").await;

    // A French invitation of an English account.
    InvitationServiceClient::new(stack.gateway.channel())
        .create_invitations(bearer(
            &admin,
            CreateInvitationsRequest {
                raw_text: "Fleur <fleur@pagelang.example>".into(),
                role_id: user_role,
                locale: "fr".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("invited");
    let token = link_token(&stack.email_to("fleur@pagelang.example").await, "/invite");
    let invite = format!("/invite?token={token}");
    let lang_of = |page: &[u8]| {
        let page = String::from_utf8_lossy(page);
        if page.contains("<html lang=\"fr\">") {
            "fr"
        } else if page.contains("<html lang=\"en\">") {
            "en"
        } else {
            panic!("no language in {page}")
        }
    };
    // No Accept-Language: the invitation's locale.
    let (status, _, page) = http(&stack.gateway, "GET", &invite, &[], b"").await;
    assert_eq!(status, 200);
    assert_eq!(lang_of(&page), "fr");
    assert!(String::from_utf8_lossy(&page).contains("vous invite à rejoindre"));
    // It outranks the browser; the switch outranks it.
    let english_browser = [("accept-language", "en-US,en;q=0.9")];
    let (_, _, page) = http(&stack.gateway, "GET", &invite, &english_browser, b"").await;
    assert_eq!(lang_of(&page), "fr");
    let (_, _, page) = http(
        &stack.gateway,
        "GET",
        &format!("{invite}&lang=en"),
        &[],
        b"",
    )
    .await;
    assert_eq!(lang_of(&page), "en");
    // An unusable link has no invitation: the browser, then English.
    let french_browser = [("accept-language", "fr")];
    let (status, _, page) = http(
        &stack.gateway,
        "GET",
        "/invite?token=made-up",
        &french_browser,
        b"",
    )
    .await;
    assert_eq!(status, 410);
    assert_eq!(lang_of(&page), "fr");
    let (_, _, page) = http(&stack.gateway, "GET", "/invite?token=made-up", &[], b"").await;
    assert_eq!(lang_of(&page), "en");

    // A reset link carries the user's locale (here the account's default,
    // English): the reset page opens in it even for a French browser, and
    // sets the password.
    AuthServiceClient::new(stack.gateway.channel())
        .request_password_reset(RequestPasswordResetRequest {
            account_slug: slug.clone(),
            email: "owner@pagelang.example".into(),
            locale: String::new(),
        })
        .await
        .expect("requested");
    let text = stack.email_to("owner@pagelang.example").await;
    let token = link_token(&text, "/reset");
    assert!(
        text.contains(&format!("/reset?token={token}&locale=en")),
        "{text}"
    );
    let reset = format!("/reset?token={token}&locale=en");
    let (status, _, page) = http(&stack.gateway, "GET", &reset, &french_browser, b"").await;
    assert_eq!(status, 200);
    assert_eq!(lang_of(&page), "en");
    assert!(String::from_utf8_lossy(&page).contains("Choose a new password"));
    let (_, _, page) = http(&stack.gateway, "GET", &format!("{reset}&lang=fr"), &[], b"").await;
    assert_eq!(lang_of(&page), "fr");
    let body = form(&[("token", &token), ("lang", "en"), ("password", PASSWORD)]);
    let (status, _, page) = http(&stack.gateway, "POST", "/reset", &[FORM], &body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&page));
    try_sign_in(&stack, &slug, "owner@pagelang.example", PASSWORD)
        .await
        .expect("the reset password works");
}
