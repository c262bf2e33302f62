//! Requests that do not decode are the caller's fault: INVALID_ARGUMENT with
//! reason INVALID_ARGUMENT, never INTERNAL, through the gateway and straight
//! at each service. For every RPC of the descriptor set: a string field
//! holding bytes that are not UTF-8 (the first string field of the request),
//! a message whose field length runs past its end, and a gRPC frame cut
//! short.

use prost_reflect::{DescriptorPool, Kind};
use tonic::{Code, Status};
use usher_kit::{
    authz::Policy,
    principal::{Principal, PrincipalKind},
};
use usher_proto::{auth::v1::Access, identity::v1::sign_in_request::Login};

use crate::{
    harness::{Isolation, OWNER_PASSWORD, create_account, reason, sign_in},
    password_change::stack,
    raw,
};

/// `field` (length-delimited) holding `bytes`.
fn length_delimited(field: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_varint(u64::from(field << 3 | 2), &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// The malformed bodies for an RPC whose request is `input`: (what, body).
fn malformed_bodies(input: &prost_reflect::MessageDescriptor) -> Vec<(&'static str, Vec<u8>)> {
    let mut bodies = Vec::new();
    if let Some(field) = input.fields().find(|f| f.kind() == Kind::String) {
        bodies.push((
            "a string that is not UTF-8",
            raw::frame(&length_delimited(field.number(), &[b'o', 0xc3, 0x28, 0xff])),
        ));
    }
    // Field 1, length 5, one byte: the message ends inside the field.
    bodies.push(("a truncated message", raw::frame(&[0x0a, 0x05, b'a'])));
    // A frame announcing 10 bytes that carries 3.
    let mut cut = raw::frame(&[0; 10]);
    cut.truncate(5 + 3);
    bodies.push(("a truncated frame", cut));
    bodies
}

fn check(problems: &mut Vec<String>, at: &str, path: &str, what: &str, status: &Status) {
    if status.code() != Code::InvalidArgument || reason(status) != "INVALID_ARGUMENT" {
        problems.push(format!("{path} at {at} with {what}: {status:?}"));
    }
}

#[tokio::test]
async fn requests_that_do_not_decode_answer_invalid_argument_everywhere() {
    let mut isolation = Isolation::new();
    let [identity, invitation, notification, gateway] = stack(&mut isolation).await;
    let slug = format!("bad-{}", isolation.id);
    create_account(
        &identity,
        &slug,
        "Bad Bytes",
        "owner@bad.example",
        "Owner",
        5,
    )
    .await;
    let owner = sign_in(
        &gateway,
        &slug,
        Login::Email("owner@bad.example".into()),
        OWNER_PASSWORD,
    )
    .await;

    // The case of the report: SignIn with an account slug that is not UTF-8.
    let status = raw::call(
        &gateway.channel(),
        "/usher.identity.v1.AuthService/SignIn",
        &[],
        raw::frame(&length_delimited(1, &[0xc3, 0x28])),
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    {
        use tonic_types::StatusExt;
        let details = status.get_error_details();
        let fields: Vec<_> = details
            .bad_request()
            .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
            .unwrap_or_default();
        assert_eq!(fields, ["account_slug"], "{status:?}");
    }

    let pool = DescriptorPool::decode(usher_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let policy = Policy::from_contracts().expect("policy");
    let mut rules: Vec<_> = policy.rules().collect();
    rules.sort_by(|a, b| a.path.cmp(&b.path));
    let admin = Principal {
        kind: PrincipalKind::User,
        account_id: Some(uuid::Uuid::new_v4()),
        user_id: Some(uuid::Uuid::new_v4()),
        credential_id: Some("malformed".into()),
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
        password_change_required: false,
    };
    let platform = Principal {
        kind: PrincipalKind::Platform,
        credential_id: Some("malformed".into()),
        ..Principal::anonymous()
    };
    let service = Principal::service("usher-invitation");
    let mut problems = Vec::new();
    let (mut through_gateway, mut direct) = (0, 0);
    for rule in rules {
        let input = pool
            .get_service_by_name(&rule.service)
            .and_then(|s| s.methods().find(|m| m.name() == rule.method))
            .expect("method")
            .input();
        let upstream = if rule.service.starts_with("usher.identity.") {
            &identity
        } else if rule.service.starts_with("usher.invitation.") {
            &invitation
        } else {
            &notification
        };
        let caller = match rule.access {
            Access::Public => Principal::anonymous(),
            Access::Member | Access::Permission => admin.clone(),
            Access::Platform => platform.clone(),
            Access::Internal | Access::Unspecified => service.clone(),
        };
        for (what, body) in malformed_bodies(&input) {
            // Straight at the service, with a valid assertion.
            let status = raw::call(
                &upstream.channel(),
                &rule.path,
                &raw::asserted(&rule.path, &caller),
                body.clone(),
            )
            .await;
            check(&mut problems, "the service", &rule.path, what, &status);
            direct += 1;
            // Through the gateway, for what an outside caller may reach.
            let token = match rule.access {
                Access::Public => None,
                Access::Member | Access::Permission => Some(owner.as_str()),
                _ => continue,
            };
            if rule.service.contains(".internal.") {
                continue;
            }
            let metadata = token.map(raw::bearer).unwrap_or_default();
            let status = raw::call(&gateway.channel(), &rule.path, &metadata, body).await;
            check(&mut problems, "the gateway", &rule.path, what, &status);
            through_gateway += 1;
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        direct > 60 && through_gateway > 50,
        "{direct} / {through_gateway}"
    );
}
