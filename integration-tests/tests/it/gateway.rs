//! The gateway end to end: identity and the gateway share one Redis key
//! prefix (the gateway resolves the sessions identity issues). A platform
//! creates an account straight at identity; everything after goes through the
//! gateway: public sign-in, a member call with the bearer token, refusals the
//! gateway answers itself, forged identity metadata stripped, internal RPCs not
//! routable, and sign-out ending the token. API keys (account and platform)
//! work as bearer credentials, and a revoked one fails on its next call.

use std::time::Duration;

use tonic::{Code, Request, metadata::MetadataValue};
use usher_kit::principal::{Principal, PrincipalKind};
use usher_proto::identity::{
    internal::v1::{GetInvitationContextRequest, directory_service_client::DirectoryServiceClient},
    v1::{
        CreateAccountRequest, CreateApiKeyRequest, GetCurrentUserRequest, ListAccountsRequest,
        ListUsersRequest, RevokeApiKeyRequest, SignInRequest, SignOutRequest, UpdateUserRequest,
        account_service_client::AccountServiceClient, auth_service_client::AuthServiceClient,
        sign_in_request::Login, user_service_client::UserServiceClient,
    },
};

use crate::harness::{Isolation, bearer, binary, identity_and_gateway, signed_request};

#[tokio::test]
async fn the_gateway_authenticates_authorizes_and_forwards() {
    let mut isolation = Isolation::new();
    let (identity, _, gateway) = identity_and_gateway(&mut isolation, &[], &[]).await;

    // The account, created by a platform straight at identity.
    let platform = Principal {
        kind: PrincipalKind::Platform,
        credential_id: Some("it-platform".into()),
        ..Principal::anonymous()
    };
    let slug = format!("gw-{}", isolation.id);
    let created = AccountServiceClient::new(identity.channel())
        .create_account(signed_request(
            "/usher.identity.v1.AccountService/CreateAccount",
            &platform,
            CreateAccountRequest {
                name: "Gateway Co".into(),
                slug: slug.clone(),
                owner_email: "owner@gateway.example".into(),
                owner_display_name: "Gail Gateway".into(),
                owner_password: "correct horse battery".into(),
                seat_limit: 5,
                ..Default::default()
            },
        ))
        .await
        .expect("account created")
        .into_inner();
    let owner = created.owner.expect("owner");

    // Public: sign in through the gateway, no credential.
    let mut auth = AuthServiceClient::new(gateway.channel());
    let signed_in = auth
        .sign_in(SignInRequest {
            account_slug: slug.clone(),
            login: Some(Login::Email("owner@gateway.example".into())),
            password: "correct horse battery".into(),
        })
        .await
        .expect("sign-in through the gateway")
        .into_inner();
    let token = signed_in.session.expect("session").access_token;
    assert_eq!(signed_in.user.expect("user").id, owner.id);

    // An upstream's error status and details come back as it sent them
    // (trailers pass through): INVALID_ARGUMENT is never the gateway's own.
    let invalid = auth
        .sign_in(SignInRequest::default())
        .await
        .expect_err("empty sign-in");
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    assert!(
        !invalid.details().is_empty(),
        "details forwarded: {invalid:?}"
    );

    // Member: the bearer token resolves to the owner.
    let me = auth
        .get_current_user(bearer(&token, GetCurrentUserRequest {}))
        .await
        .expect("current user through the gateway");
    assert!(
        me.metadata().get("x-request-id").is_some(),
        "the request id comes back"
    );
    let me = me.into_inner();
    assert_eq!(me.user.expect("user").id, owner.id);

    // No credential on a member RPC: refused by the gateway.
    let anonymous = auth
        .get_current_user(GetCurrentUserRequest {})
        .await
        .expect_err("no credential");
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");

    // A token that is not a session, and an API key identity never issued.
    for bad in ["not-a-session-token", "usk_notyetsupported"] {
        let refused = auth
            .get_current_user(bearer(bad, GetCurrentUserRequest {}))
            .await
            .expect_err("bad token");
        assert_eq!(refused.code(), Code::Unauthenticated, "{bad}: {refused:?}");
    }

    // A member on a platform RPC: the owner lacks what it needs.
    let mut accounts = AccountServiceClient::new(gateway.channel());
    let denied = accounts
        .list_accounts(bearer(&token, ListAccountsRequest::default()))
        .await
        .expect_err("platform only");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // Forged identity metadata is stripped: an assertion claiming a platform
    // caller and a made-up account change nothing.
    let forged_assertion = signed_request(
        "/usher.identity.v1.AuthService/GetCurrentUser",
        &platform,
        GetCurrentUserRequest {},
    )
    .metadata()
    .get("x-usher-assertion")
    .cloned()
    .expect("assertion");
    let mut forged = bearer(&token, GetCurrentUserRequest {});
    forged
        .metadata_mut()
        .insert("x-usher-assertion", forged_assertion.clone());
    forged.metadata_mut().insert(
        "x-usher-account-id",
        MetadataValue::try_from(uuid::Uuid::new_v4().to_string()).expect("ascii"),
    );
    let me = auth
        .get_current_user(forged)
        .await
        .expect("forged headers are ignored")
        .into_inner();
    assert_eq!(me.user.expect("user").id, owner.id);
    // Without a token the forged assertion grants nothing either.
    let mut forged = Request::new(ListAccountsRequest::default());
    let platform_assertion = signed_request(
        "/usher.identity.v1.AccountService/ListAccounts",
        &platform,
        (),
    )
    .metadata()
    .get("x-usher-assertion")
    .cloned()
    .expect("assertion");
    forged
        .metadata_mut()
        .insert("x-usher-assertion", platform_assertion);
    let refused = accounts
        .list_accounts(forged)
        .await
        .expect_err("forged assertion stripped");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // An internal RPC is not routable, with or without a credential.
    let mut directory = DirectoryServiceClient::new(gateway.channel());
    for request in [
        Request::new(GetInvitationContextRequest {
            account_id: created
                .account
                .as_ref()
                .map(|a| a.id.clone())
                .unwrap_or_default(),
            ..Default::default()
        }),
        bearer(
            &token,
            GetInvitationContextRequest {
                account_id: created
                    .account
                    .as_ref()
                    .map(|a| a.id.clone())
                    .unwrap_or_default(),
                ..Default::default()
            },
        ),
    ] {
        let refused = directory
            .get_invitation_context(request)
            .await
            .expect_err("internal");
        assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    }

    // A second session, to use once identity is gone.
    let second = auth
        .sign_in(SignInRequest {
            account_slug: slug.clone(),
            login: Some(Login::Email("owner@gateway.example".into())),
            password: "correct horse battery".into(),
        })
        .await
        .expect("second sign-in")
        .into_inner()
        .session
        .expect("session")
        .access_token;

    // Sign out through the gateway; the token is dead on the next call.
    auth.sign_out(bearer(&token, SignOutRequest::default()))
        .await
        .expect("signed out");
    let after = auth
        .get_current_user(bearer(&token, GetCurrentUserRequest {}))
        .await
        .expect_err("signed out");
    assert_eq!(after.code(), Code::Unauthenticated, "{after:?}");

    // With identity stopped, the gateway's refusals are unchanged (they
    // never reached identity), while an allowed call finds it unavailable.
    identity.terminate().await;
    let refused = auth
        .get_current_user(GetCurrentUserRequest {})
        .await
        .expect_err("no credential");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = accounts
        .list_accounts(bearer(&second, ListAccountsRequest::default()))
        .await
        .expect_err("platform only");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = directory
        .get_invitation_context(bearer(&second, GetInvitationContextRequest::default()))
        .await
        .expect_err("internal");
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    let unavailable = auth
        .get_current_user(bearer(&second, GetCurrentUserRequest {}))
        .await
        .expect_err("identity is down");
    assert_eq!(unavailable.code(), Code::Unavailable, "{unavailable:?}");

    gateway.terminate().await;
}

/// The gateway's Prometheus text, scraped from its metrics port.
async fn scrape_metrics(metrics: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(metrics)
        .await
        .expect("metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("read");
    body
}

/// `SignInRequest::default()` from `ip` (the gateway trusts
/// `x-forwarded-for` in this test).
fn sign_in_from(ip: &str) -> Request<SignInRequest> {
    let mut request = Request::new(SignInRequest::default());
    request.metadata_mut().insert(
        "x-forwarded-for",
        MetadataValue::try_from(format!("10.9.8.7, {ip}")).expect("ascii"),
    );
    request
}

#[tokio::test]
async fn public_calls_are_rate_limited_per_ip_by_the_gateway() {
    const LIMIT: usize = 3;
    let mut isolation = Isolation::new();
    // A tiny public limit in a long window (so the test never straddles two
    // windows), client IPs from x-forwarded-for so two clients can be told
    // apart from one test process.
    let (identity, _, gateway) = identity_and_gateway(
        &mut isolation,
        &[],
        &[
            ("USHER_RATE_LIMITS__PUBLIC__LIMIT", LIMIT.to_string()),
            ("USHER_RATE_LIMITS__PUBLIC__WINDOW_SECS", "3600".to_owned()),
            ("USHER_RATE_LIMITS__TRUST_FORWARDED_FOR", "true".to_owned()),
        ],
    )
    .await;

    let mut auth = AuthServiceClient::new(gateway.channel());
    // LIMIT attempts reach identity (which refuses the empty sign-in itself).
    for attempt in 0..LIMIT {
        let answer = auth
            .sign_in(sign_in_from("203.0.113.7"))
            .await
            .expect_err("empty sign-in");
        assert_eq!(
            answer.code(),
            Code::InvalidArgument,
            "attempt {attempt}: {answer:?}"
        );
    }
    // The next one is refused by the gateway, with a reason and a delay.
    let check_limited = |refused: tonic::Status| {
        use tonic_types::StatusExt;
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        let details = refused.get_error_details();
        let info = details.error_info().expect("error info");
        assert_eq!(info.reason, "RATE_LIMITED", "{refused:?}");
        let delay = details
            .retry_info()
            .and_then(|r| r.retry_delay)
            .expect("retry delay");
        assert!(
            delay > Duration::ZERO && delay <= Duration::from_secs(3600),
            "{delay:?}"
        );
    };
    check_limited(
        auth.sign_in(sign_in_from("203.0.113.7"))
            .await
            .expect_err("limited"),
    );
    // Another client IP has its own budget.
    let other = auth
        .sign_in(sign_in_from("203.0.113.8"))
        .await
        .expect_err("empty sign-in");
    assert_eq!(other.code(), Code::InvalidArgument, "{other:?}");
    // Counted once per refusal, by class.
    let metrics = scrape_metrics(gateway.metrics).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("usher_gateway_rate_limited_total{class=\"public\"} 1")),
        "{metrics}"
    );

    // With identity stopped, the limited client still gets RESOURCE_EXHAUSTED
    // (the refusal never reached identity) while the other one, forwarded,
    // finds identity unavailable.
    identity.terminate().await;
    check_limited(
        auth.sign_in(sign_in_from("203.0.113.7"))
            .await
            .expect_err("still limited"),
    );
    let unavailable = auth
        .sign_in(sign_in_from("203.0.113.8"))
        .await
        .expect_err("identity is down");
    assert_eq!(unavailable.code(), Code::Unavailable, "{unavailable:?}");

    gateway.terminate().await;
}

/// Runs `usher platform-keys create` with identity's environment and returns
/// the printed secret.
pub fn create_platform_key(identity_env: &[(&str, String)], name: &str) -> String {
    let output = std::process::Command::new(binary("usher"))
        .args(["platform-keys", "create", "--name", name])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(identity_env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("usher runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "usher platform-keys create failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("secret (shown once): "))
        .expect("the secret is printed")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn the_gateway_accepts_api_keys_until_they_are_revoked() {
    let mut isolation = Isolation::new();
    // Same key prefix as identity: the gateway reads identity's snapshots.
    let (identity, identity_env, gateway) = identity_and_gateway(&mut isolation, &[], &[]).await;

    // A platform key made by the operator's CLI creates the account through
    // the gateway (a PLATFORM rule).
    let platform_key = create_platform_key(&identity_env, "Back office");
    assert!(platform_key.starts_with("usk_"));
    let slug = format!("keys-{}", isolation.id);
    let mut accounts = AccountServiceClient::new(gateway.channel());
    let created = accounts
        .create_account(bearer(
            &platform_key,
            CreateAccountRequest {
                name: "Keys Co".into(),
                slug: slug.clone(),
                owner_email: "owner@keys.example".into(),
                owner_display_name: "Kim Keys".into(),
                owner_password: "correct horse battery".into(),
                seat_limit: 5,
                ..Default::default()
            },
        ))
        .await
        .expect("account created with the platform key through the gateway")
        .into_inner();
    let owner = created.owner.expect("owner");

    // The owner signs in and creates a read-only key, all through the gateway.
    let mut auth = AuthServiceClient::new(gateway.channel());
    let session = auth
        .sign_in(SignInRequest {
            account_slug: slug.clone(),
            login: Some(Login::Email("owner@keys.example".into())),
            password: "correct horse battery".into(),
        })
        .await
        .expect("sign-in")
        .into_inner()
        .session
        .expect("session")
        .access_token;
    let key = auth
        .create_api_key(bearer(
            &session,
            CreateApiKeyRequest {
                name: "reporting".into(),
                permissions: vec!["users.read".into()],
                ..Default::default()
            },
        ))
        .await
        .expect("api key created through the gateway")
        .into_inner();
    let key_id = key.api_key.expect("key").id;
    let secret = key.secret;

    // The key reads users...
    let mut users = UserServiceClient::new(gateway.channel());
    let listed = users
        .list_users(bearer(&secret, ListUsersRequest::default()))
        .await
        .expect("users.read with the api key")
        .into_inner();
    assert!(listed.users.iter().any(|u| u.id == owner.id), "{listed:?}");
    // ...but cannot manage them, nor act as a platform.
    let denied = users
        .update_user(bearer(
            &secret,
            UpdateUserRequest {
                user_id: owner.id.clone(),
                display_name: "Mallory".into(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("users.manage is not the key's");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = accounts
        .list_accounts(bearer(&secret, ListAccountsRequest::default()))
        .await
        .expect_err("platform only");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    // The platform key holds no account permission.
    let denied = users
        .list_users(bearer(&platform_key, ListUsersRequest::default()))
        .await
        .expect_err("no account permission");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // Revoked through the gateway: the very next call is refused, with the
    // same answer as any unknown credential.
    auth.revoke_api_key(bearer(&session, RevokeApiKeyRequest { api_key_id: key_id }))
        .await
        .expect("revoked");
    let refused = users
        .list_users(bearer(&secret, ListUsersRequest::default()))
        .await
        .expect_err("revoked key");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let unknown = users
        .list_users(bearer("usk_neverissued", ListUsersRequest::default()))
        .await
        .expect_err("unknown key");
    assert_eq!(unknown.code(), Code::Unauthenticated, "{unknown:?}");
    assert_eq!(refused.message(), unknown.message(), "one generic answer");

    identity.terminate().await;
    gateway.terminate().await;
}

/// Sign-ins beyond what identity's hashing pool and its queue hold are shed
/// at once with UNAVAILABLE and a retry delay, and that answer reaches the
/// caller through the gateway whole (reason and `RetryInfo`); the ones
/// admitted sign in.
#[tokio::test]
async fn sign_ins_beyond_the_hashing_queue_are_shed_through_the_gateway() {
    use tonic_types::StatusExt;
    let mut isolation = Isolation::new();
    // One hashing thread and one place in its queue.
    let (identity, _, gateway) = identity_and_gateway(
        &mut isolation,
        &[
            ("USHER_PASSWORDS__POOL_SIZE", "1".to_owned()),
            ("USHER_PASSWORDS__QUEUE_SIZE", "1".to_owned()),
        ],
        &[],
    )
    .await;
    let slug = format!("shed-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    crate::harness::create_account(&identity, &slug, "Shed", "owner@shed.example", "Owner", 5)
        .await;
    // 16 at once (within the gateway's 30 public calls a minute): one
    // hashes, one waits, the others find the queue full.
    let calls = (0..16).map(|_| {
        let mut auth = AuthServiceClient::new(gateway.channel());
        let slug = slug.clone();
        async move {
            auth.sign_in(SignInRequest {
                account_slug: slug,
                login: Some(Login::Email("owner@shed.example".into())),
                password: crate::harness::OWNER_PASSWORD.into(),
            })
            .await
        }
    });
    let answers = futures::future::join_all(calls).await;
    let mut signed_in = 0;
    let mut shed = 0;
    for answer in answers {
        match answer {
            Ok(answer) => {
                assert!(answer.into_inner().session.is_some());
                signed_in += 1;
            }
            Err(refused) => {
                assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
                assert_eq!(crate::harness::reason(&refused), "UNAVAILABLE");
                let delay = refused
                    .get_error_details()
                    .retry_info()
                    .and_then(|r| r.retry_delay)
                    .expect("retry delay");
                assert!(delay > Duration::ZERO, "{delay:?}");
                shed += 1;
            }
        }
    }
    assert!(signed_in >= 1 && shed >= 1, "{signed_in} in, {shed} shed");
    // Once the pool is free again, the next sign-in goes through.
    crate::harness::sign_in(
        &gateway,
        &slug,
        Login::Email("owner@shed.example".into()),
        crate::harness::OWNER_PASSWORD,
    )
    .await;
}
