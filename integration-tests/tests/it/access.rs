//! The access matrix, generated from the contracts: every RPC of the
//! descriptor set is called through the real gateway (with every service
//! behind it) anonymously, as a plain member, as an admin, as the admin of
//! another account and as the platform, and each outcome is checked against
//! the RPC's `usher.auth.v1.rule`. A new RPC is covered the day it is added;
//! one without a rule already fails `usher-proto`'s descriptor test.
//!
//! Requests are empty (every field at its default) except for the
//! cross-account round: there, every top-level id field naming a user, role,
//! team, invitation or API key — and every bulk call's id list — is set to
//! the first account's, and the second account's admin must never succeed
//! (a bulk call must answer every item as failed).

use std::{collections::BTreeMap, time::Duration};

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, Value};
use tonic::{
    Code, Request,
    client::Grpc,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::MetadataValue,
    transport::Channel,
};
use usher_kit::authz::Policy;
use usher_proto::{
    auth::v1::Access,
    identity::v1::{
        CreateApiKeyRequest, CreateTeamRequest, CreateUserRequest, ListRolesRequest, SignInRequest,
        auth_service_client::AuthServiceClient, role_service_client::RoleServiceClient,
        sign_in_request::Login, team_service_client::TeamServiceClient,
        user_service_client::UserServiceClient,
    },
    invitation::v1::{
        CreateInvitationsRequest, invitation_service_client::InvitationServiceClient,
    },
};

use crate::{
    gateway::create_platform_key,
    harness::{Isolation, MatrixStack, OWNER_PASSWORD, bearer, create_account, sign_in},
};

/// Raw protobuf bytes in and out: any RPC, without its generated types.
#[derive(Clone, Copy, Default)]
pub(crate) struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Self::Error> {
        use bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// The status code of `path` called with `body` and `token`.
async fn call(channel: &Channel, path: &str, token: Option<&str>, body: Vec<u8>) -> Code {
    answer(channel, path, token, body)
        .await
        .err()
        .unwrap_or(Code::Ok)
}

/// The answer of `path` called with `body` and `token`: its bytes, or the
/// refusal's code.
async fn answer(
    channel: &Channel,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<Vec<u8>, Code> {
    let mut grpc = Grpc::new(channel.clone());
    grpc.ready().await.expect("gateway ready");
    let mut request = Request::new(body);
    request.set_timeout(Duration::from_secs(10));
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {token}")).expect("ascii"),
        );
    }
    let path = http::uri::PathAndQuery::try_from(path).expect("path");
    grpc.unary(request, path, Raw)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| status.code())
}

/// The codes the gateway answers itself when it refuses a call.
fn refused(code: Code) -> bool {
    matches!(
        code,
        Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Caller {
    Anonymous,
    Member,
    Admin,
    OtherAdmin,
    Platform,
}

/// What `caller` must get from an RPC with `rule`, given the member's
/// permissions: `None` means "reaches the service" (any code but a refusal).
fn expected(access: Access, permission: &str, member: &[String], caller: Caller) -> Option<Code> {
    use Caller::*;
    match (access, caller) {
        (Access::Public, _) => None,
        (Access::Unspecified | Access::Internal, _) => Some(Code::Unimplemented),
        (_, Anonymous) => Some(Code::Unauthenticated),
        (Access::Member, Platform) => Some(Code::PermissionDenied),
        (Access::Member, _) => None,
        (Access::Permission, Member) if !member.iter().any(|p| p == permission) => {
            Some(Code::PermissionDenied)
        }
        (Access::Permission, Platform) => Some(Code::PermissionDenied),
        (Access::Permission, _) => None,
        (Access::Platform, Platform) => None,
        (Access::Platform, _) => Some(Code::PermissionDenied),
    }
}

#[tokio::test]
async fn every_rpc_answers_each_kind_of_caller_as_its_rule_says() {
    let mut isolation = Isolation::new();
    let MatrixStack {
        identity,
        invitation: _invitation,
        notification: _notification,
        gateway,
        identity_env,
        invitation_env: _,
    } = MatrixStack::start(&mut isolation).await;
    let channel = gateway.channel();

    // Two accounts, their owners signed in; a plain member of the first.
    let mut auth = AuthServiceClient::new(channel.clone());
    let mut owners = Vec::new();
    for name in ["first", "second"] {
        let slug = format!("{name}-{}", isolation.id);
        let owner = format!("owner@{name}.example");
        create_account(&identity, &slug, name, &owner, "Owner", 10).await;
        let token = sign_in(&gateway, &slug, Login::Email(owner), OWNER_PASSWORD).await;
        owners.push((slug, token));
    }
    let (slug, admin) = owners[0].clone();
    let other_admin = owners[1].1.clone();
    let roles = RoleServiceClient::new(channel.clone())
        .list_roles(bearer(&admin, ListRolesRequest::default()))
        .await
        .expect("roles")
        .into_inner()
        .roles;
    let user_role = roles.iter().find(|r| r.name == "User").expect("User");
    let member_permissions = user_role.permissions.clone();
    let member_user = UserServiceClient::new(channel.clone())
        .create_user(bearer(
            &admin,
            CreateUserRequest {
                username: "plain-member".into(),
                display_name: "Plain Member".into(),
                password: "a long enough passphrase".into(),
                role_id: user_role.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("member created")
        .into_inner()
        .user
        .expect("user");
    let member = auth
        .sign_in(SignInRequest {
            account_slug: slug,
            login: Some(Login::Username("plain-member".into())),
            password: "a long enough passphrase".into(),
        })
        .await
        .expect("member signs in")
        .into_inner()
        .session
        .expect("session")
        .access_token;
    let platform_key = create_platform_key(&identity_env, "Access matrix");
    // Some RPCs end the caller's own session when called (SignOut): each
    // user caller signs in again whenever its token stopped working.
    let logins: BTreeMap<Caller, SignInRequest> = [
        (
            Caller::Member,
            (
                "first",
                Login::Username("plain-member".into()),
                "a long enough passphrase",
            ),
        ),
        (
            Caller::Admin,
            (
                "first",
                Login::Email("owner@first.example".into()),
                "correct horse battery",
            ),
        ),
        (
            Caller::OtherAdmin,
            (
                "second",
                Login::Email("owner@second.example".into()),
                "correct horse battery",
            ),
        ),
    ]
    .into_iter()
    .map(|(caller, (name, login, password))| {
        (
            caller,
            SignInRequest {
                account_slug: format!("{name}-{}", isolation.id),
                login: Some(login),
                password: password.into(),
            },
        )
    })
    .collect();
    let mut tokens: BTreeMap<Caller, String> = [
        (Caller::Member, member.clone()),
        (Caller::Admin, admin.clone()),
        (Caller::OtherAdmin, other_admin.clone()),
        (Caller::Platform, platform_key.clone()),
    ]
    .into();

    // Resources of the first account, for the cross-account round.
    let team = TeamServiceClient::new(channel.clone())
        .create_team(bearer(
            &admin,
            CreateTeamRequest {
                name: "Support".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("team")
        .into_inner()
        .team
        .expect("team");
    let api_key = auth
        .create_api_key(bearer(
            &admin,
            CreateApiKeyRequest {
                name: "Key".into(),
                permissions: vec!["users.read".into()],
                ..Default::default()
            },
        ))
        .await
        .expect("api key")
        .into_inner()
        .api_key
        .expect("api key");
    let invited = InvitationServiceClient::new(channel.clone())
        .create_invitations(bearer(
            &admin,
            CreateInvitationsRequest {
                raw_text: "someone@first.example".into(),
                role_id: user_role.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("invitation")
        .into_inner();
    let first_ids: BTreeMap<&str, String> = [
        ("user_id", member_user.id.clone()),
        ("role_id", user_role.id.clone()),
        ("team_id", team.id.clone()),
        ("api_key_id", api_key.id.clone()),
        (
            "invitation_id",
            invited.results[0].invitation.clone().expect("invited").id,
        ),
    ]
    .into();

    let pool = DescriptorPool::decode(usher_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let policy = Policy::from_contracts().expect("policy");
    let mut rules: Vec<_> = policy.rules().collect();
    rules.sort_by(|a, b| a.path.cmp(&b.path));
    let mut problems = Vec::new();
    let mut calls = 0;
    let mut cross_checked = 0;
    let mut bulk_checked = 0;
    for rule in rules {
        for caller in [
            Caller::Anonymous,
            Caller::Member,
            Caller::Admin,
            Caller::OtherAdmin,
            Caller::Platform,
        ] {
            let token = tokens.get(&caller).map(String::as_str);
            let code = call(&channel, &rule.path, token, Vec::new()).await;
            calls += 1;
            let want = expected(rule.access, &rule.permission, &member_permissions, caller);
            let ok = match want {
                Some(refusal) => code == refusal,
                None => !refused(code),
            };
            if !ok {
                problems.push(format!(
                    "{} as {caller:?}: got {code:?}, want {}",
                    rule.path,
                    want.map_or("the service's answer".to_owned(), |c| format!("{c:?}"))
                ));
            }
        }

        for (caller, login) in &logins {
            let alive = call(
                &channel,
                "/usher.identity.v1.AuthService/GetCurrentUser",
                tokens.get(caller).map(String::as_str),
                Vec::new(),
            )
            .await;
            if alive == Code::Unauthenticated {
                let session = auth
                    .sign_in(login.clone())
                    .await
                    .expect("signs in again")
                    .into_inner()
                    .session
                    .expect("session");
                tokens.insert(*caller, session.access_token);
            }
        }
        let other_admin = tokens[&Caller::OtherAdmin].clone();

        // Cross-account: the second admin names the first account's things.
        if !matches!(rule.access, Access::Member | Access::Permission)
            || rule.method.starts_with("List")
        {
            continue;
        }
        let Some(method) = pool
            .get_service_by_name(&rule.service)
            .and_then(|s| s.methods().find(|m| m.name() == rule.method))
        else {
            continue;
        };
        let input = method.input();
        let mut message = DynamicMessage::new(input.clone());
        let mut named = false;
        for field in input.fields() {
            // `user_id`, or a bulk call's `user_ids`.
            let singular = field.name().strip_suffix('s').unwrap_or(field.name());
            let id = if field.is_list() {
                first_ids
                    .get(singular)
                    .map(|id| Value::List(vec![Value::String(id.clone())]))
            } else {
                first_ids
                    .get(field.name())
                    .map(|id| Value::String(id.clone()))
            };
            if let Some(id) = id {
                message.set_field(&field, id);
                named = true;
            }
        }
        if !named {
            continue;
        }
        cross_checked += 1;
        let answered = answer(
            &channel,
            &rule.path,
            Some(&other_admin),
            message.encode_to_vec(),
        )
        .await;
        let code = answered.as_ref().err().copied().unwrap_or(Code::Ok);
        // A bulk call answers OK with a result per item: every item must
        // have failed.
        let output = method.output();
        let bulk_failed_all = output.get_field_by_name("failed_count").map(|failed| {
            let response =
                DynamicMessage::decode(output.clone(), answered.as_deref().unwrap_or_default())
                    .expect("a response");
            let count = |field: &prost_reflect::FieldDescriptor| {
                response.get_field(field).as_i32().unwrap_or_default()
            };
            let succeeded: i32 = output
                .fields()
                .filter(|f| f.name().ends_with("_count") && f.name() != "failed_count")
                .map(|f| count(&f))
                .sum();
            count(&failed) >= 1 && succeeded == 0
        });
        if code == Code::Ok && bulk_failed_all.is_some() {
            bulk_checked += 1;
        }
        if code == Code::Ok && bulk_failed_all != Some(true) {
            problems.push(format!(
                "{}: the second account's admin succeeded on the first account's ids",
                rule.path
            ));
        }
        if rule.method.starts_with("Get") && code != Code::NotFound {
            problems.push(format!(
                "{}: another account's resource answered {code:?}, not NOT_FOUND",
                rule.path
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(calls > 250, "every RPC was called ({calls} calls)");
    assert!(
        cross_checked >= 10,
        "cross-account checks ran ({cross_checked})"
    );
    assert!(
        bulk_checked >= 3,
        "bulk calls answered per item ({bulk_checked})"
    );
}
