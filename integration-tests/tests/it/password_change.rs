//! The forced password change through the real binaries. A user created with
//! `require_password_change` signs in; every MEMBER and PERMISSION RPC of the
//! descriptor set, except those whose rule is `allowed_before_password_change`
//! (GetCurrentUser, ChangePassword, SignOut), answers PASSWORD_CHANGE_REQUIRED
//! at the gateway; each service refuses an assertion carrying the flag by
//! itself; after ChangePassword the new session reaches everything again.

use tonic::Code;
use usher_kit::{
    authz::Policy,
    principal::{Principal, PrincipalKind},
};
use usher_proto::{
    auth::v1::Access,
    identity::v1::{
        ChangePasswordRequest, CreateUserRequest, SignInRequest,
        auth_service_client::AuthServiceClient, sign_in_request::Login,
        user_service_client::UserServiceClient,
    },
};

use crate::{
    harness::{self, Isolation, OWNER_PASSWORD, Service, create_account, reason, role_id, sign_in},
    raw,
};

/// The three services and a gateway without rate limits (every RPC is
/// called from one address), all serving.
pub async fn stack(isolation: &mut Isolation) -> [Service; 4] {
    let stack = harness::MatrixStack::start(isolation).await;
    [
        stack.identity,
        stack.invitation,
        stack.notification,
        stack.gateway,
    ]
}

/// Every MEMBER or PERMISSION RPC, sorted by path.
fn member_rules(policy: &Policy) -> Vec<&usher_proto::policy::MethodRule> {
    let mut rules: Vec<_> = policy
        .rules()
        .filter(|r| matches!(r.access, Access::Member | Access::Permission))
        .collect();
    rules.sort_by(|a, b| a.path.cmp(&b.path));
    rules
}

#[tokio::test]
async fn a_forced_password_change_blocks_every_rpc_but_the_allowed_ones_until_done() {
    let mut isolation = Isolation::new();
    let [identity, invitation, notification, gateway] = stack(&mut isolation).await;
    let channel = gateway.channel();
    let slug = format!("pcr-{}", isolation.id);
    create_account(
        &identity,
        &slug,
        "Pending Co",
        "owner@pcr.example",
        "Owner",
        10,
    )
    .await;
    let owner = sign_in(
        &gateway,
        &slug,
        Login::Email("owner@pcr.example".into()),
        OWNER_PASSWORD,
    )
    .await;
    // An admin (every permission), so only the pending change can refuse.
    let admin_role = role_id(&gateway, &owner, "Admin").await;
    UserServiceClient::new(channel.clone())
        .create_user(harness::bearer(
            &owner,
            CreateUserRequest {
                username: "kiosk".into(),
                display_name: "Kiosk".into(),
                password: "a first temporary passphrase".into(),
                role_id: admin_role,
                require_password_change: true,
                ..Default::default()
            },
        ))
        .await
        .expect("user created");
    let login = SignInRequest {
        account_slug: slug.clone(),
        login: Some(Login::Username("kiosk".into())),
        password: "a first temporary passphrase".into(),
    };
    let mut auth = AuthServiceClient::new(channel.clone());
    let session = auth
        .sign_in(login.clone())
        .await
        .expect("signs in")
        .into_inner()
        .session
        .expect("session");
    assert!(session.password_change_required);
    let pending = session.access_token;

    let policy = Policy::from_contracts().expect("policy");
    let rules = member_rules(&policy);
    let mut problems = Vec::new();
    let mut allowed = Vec::new();
    for rule in &rules {
        if rule.method == "SignOut" {
            continue; // would end the session; checked below on a second one.
        }
        let status = raw::call(
            &channel,
            &rule.path,
            &raw::bearer(&pending),
            raw::frame(&[]),
        )
        .await;
        let refused = reason(&status) == "PASSWORD_CHANGE_REQUIRED";
        if rule.allowed_before_password_change {
            allowed.push(rule.method.clone());
            if refused {
                problems.push(format!("{}: refused although allowed", rule.path));
            }
        } else if !refused || status.code() != Code::FailedPrecondition {
            problems.push(format!("{}: got {status:?}", rule.path));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    allowed.sort();
    assert_eq!(allowed, ["ChangePassword", "GetCurrentUser"]);
    // The pending session reads itself; the user says a change is required.
    let current = raw::call(
        &channel,
        "/usher.identity.v1.AuthService/GetCurrentUser",
        &raw::bearer(&pending),
        raw::frame(&[]),
    )
    .await;
    assert_eq!(current.code(), Code::Ok, "{current:?}");

    // Defence in depth: each service refuses an assertion carrying the flag,
    // however the call reached it.
    let mut flagged = Principal {
        kind: PrincipalKind::User,
        account_id: Some(uuid::Uuid::new_v4()),
        user_id: Some(uuid::Uuid::new_v4()),
        credential_id: Some("pending-session".into()),
        permissions: [
            "users.read",
            "users.invite",
            "users.manage",
            "roles.manage",
            "teams.manage",
            "account.manage",
            "audit.read",
        ]
        .map(str::to_owned)
        .to_vec(),
        service: None,
        password_change_required: true,
    };
    let mut checked = 0;
    for (service, package) in [
        (&identity, "usher.identity.v1."),
        (&invitation, "usher.invitation.v1."),
        (&notification, "usher.notification.v1."),
    ] {
        let direct = service.channel();
        for rule in rules.iter().filter(|r| r.service.starts_with(package)) {
            if rule.allowed_before_password_change {
                continue;
            }
            let status = raw::call(
                &direct,
                &rule.path,
                &raw::asserted(&rule.path, &flagged),
                raw::frame(&[]),
            )
            .await;
            assert_eq!(
                (status.code(), reason(&status).as_str()),
                (Code::FailedPrecondition, "PASSWORD_CHANGE_REQUIRED"),
                "{} straight at the service: {status:?}",
                rule.path
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} RPCs checked");
    // The same principal without the flag passes the services' policy.
    flagged.password_change_required = false;
    let path = "/usher.identity.v1.RoleService/ListRoles";
    let status = raw::call(
        &identity.channel(),
        path,
        &raw::asserted(path, &flagged),
        raw::frame(&[]),
    )
    .await;
    assert_ne!(reason(&status), "PASSWORD_CHANGE_REQUIRED", "{status:?}");

    // SignOut works before the change (on a second session).
    let second = auth
        .sign_in(login)
        .await
        .expect("signs in again")
        .into_inner()
        .session
        .expect("session")
        .access_token;
    let signed_out = raw::call(
        &channel,
        "/usher.identity.v1.AuthService/SignOut",
        &raw::bearer(&second),
        raw::frame(&[]),
    )
    .await;
    assert_eq!(signed_out.code(), Code::Ok, "{signed_out:?}");

    // ChangePassword; the new session reaches every RPC again.
    let changed = auth
        .change_password(harness::bearer(
            &pending,
            ChangePasswordRequest {
                current_password: "a first temporary passphrase".into(),
                new_password: "a passphrase of my own".into(),
            },
        ))
        .await
        .expect("password changed")
        .into_inner()
        .session
        .expect("session");
    assert!(!changed.password_change_required);
    let settled = changed.access_token;
    for rule in &rules {
        if rule.method == "SignOut" {
            continue;
        }
        let status = raw::call(
            &channel,
            &rule.path,
            &raw::bearer(&settled),
            raw::frame(&[]),
        )
        .await;
        assert_ne!(
            reason(&status),
            "PASSWORD_CHANGE_REQUIRED",
            "{} after the change: {status:?}",
            rule.path
        );
        assert!(
            !matches!(
                status.code(),
                Code::Unauthenticated | Code::PermissionDenied
            ),
            "{} after the change: {status:?}",
            rule.path
        );
    }
    let users = raw::call(
        &channel,
        "/usher.identity.v1.UserService/ListUsers",
        &raw::bearer(&settled),
        raw::frame(&[]),
    )
    .await;
    assert_eq!(users.code(), Code::Ok, "{users:?}");
}
