//! Hostile text, generated from the contracts: every RPC the gateway routes
//! is called, as a caller its rule admits, with each of its string fields
//! (nested messages, lists, oneofs and the keys and values of
//! `google.protobuf.Struct` fields included) set in turn to a value holding
//! NUL, another C0 control character or DEL, 10,000 characters, or nothing.
//! No answer may be INTERNAL, UNKNOWN, UNAVAILABLE or
//! DEADLINE_EXCEEDED (nothing is down: those are a panic or a hang); a control character in a
//! field the kit's text rule checks is INVALID_ARGUMENT naming that field;
//! and a mutating call that failed changed nothing stored (every table of
//! every service's database is compared before and after).
//!
//! The rest of each request is filled with plausible values (the first
//! account's ids, a fresh email, the field under test in `update_mask`) so
//! that the value under test reaches the deeper checks and the stores.

use std::{collections::BTreeMap, time::Duration};

use prost::Message;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value,
};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use tonic::{Code, Request, Status, client::Grpc, metadata::MetadataValue, transport::Channel};
use tonic_types::StatusExt;
use usher_kit::{
    authz::Policy,
    text::{self, TextRule},
};
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
    access::Raw,
    gateway::create_platform_key,
    harness::{Isolation, MatrixStack, OWNER_PASSWORD, bearer, create_account, sign_in},
};

/// The hostile values, each with a label for the report.
fn hostile_values() -> Vec<(&'static str, String)> {
    vec![
        ("NUL", "probe\u{0}value".to_owned()),
        ("SOH", "probe\u{1}value".to_owned()),
        ("ESC", "probe\u{1b}[31mvalue".to_owned()),
        ("DEL", "probe\u{7f}value".to_owned()),
        ("10,000 characters", "a".repeat(10_000)),
        ("empty", String::new()),
    ]
}

/// Whether `value` holds a character a text rule may refuse.
fn has_control(value: &str) -> bool {
    value.chars().any(char::is_control)
}

/// The answer of `path` called with `body` and `token`.
async fn answer(
    channel: &Channel,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = Grpc::new(channel.clone());
    grpc.ready().await.expect("gateway ready");
    let mut request = Request::new(body);
    request.set_timeout(Duration::from_secs(20));
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
}

/// One way to put a hostile value into a request.
#[derive(Clone, Debug)]
enum Spot {
    /// A string field, reached through the fields before it (a repeated
    /// field or message gets one element).
    Text(Vec<FieldDescriptor>),
    /// In a `Struct` field: as the value of key `probe`, as a key, or as the
    /// value of a nested struct's key.
    StructValue(Vec<FieldDescriptor>),
    /// As a key of the `Struct` field.
    StructKey(Vec<FieldDescriptor>),
    /// As a value nested one struct deep.
    StructNested(Vec<FieldDescriptor>),
}

impl Spot {
    fn fields(&self) -> &[FieldDescriptor] {
        match self {
            Self::Text(f) | Self::StructValue(f) | Self::StructKey(f) | Self::StructNested(f) => f,
        }
    }

    /// The request path the services name in their field violation.
    fn path(&self) -> String {
        let mut path = String::new();
        for field in self.fields() {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(field.name());
            if field.is_list() {
                path.push_str("[0]");
            }
        }
        match self {
            Self::Text(_) => path,
            Self::StructValue(_) => format!("{path}.probe"),
            Self::StructKey(_) => format!("{path}.<key>"),
            Self::StructNested(_) => format!("{path}.probe.inner"),
        }
    }

    /// The kit's rule for the value, to know what the answer must be.
    fn rule(&self) -> TextRule {
        match self {
            Self::Text(fields) => text::rule(fields.last().expect("a field")),
            Self::StructKey(_) => TextRule::SingleLine,
            Self::StructValue(_) | Self::StructNested(_) => TextRule::MultiLine,
        }
    }
}

/// Every spot of `message` for a hostile string, two messages deep.
fn spots(message: &MessageDescriptor, prefix: &[FieldDescriptor], out: &mut Vec<Spot>) {
    for field in message.fields() {
        if field.is_map() {
            continue;
        }
        let mut path = prefix.to_vec();
        path.push(field.clone());
        match field.kind() {
            Kind::String => out.push(Spot::Text(path)),
            Kind::Message(inner) if inner.full_name() == "google.protobuf.Struct" => {
                out.push(Spot::StructValue(path.clone()));
                out.push(Spot::StructKey(path.clone()));
                out.push(Spot::StructNested(path));
            }
            Kind::Message(inner) if prefix.len() < 2 => spots(&inner, &path, out),
            _ => {}
        }
    }
}

/// A `google.protobuf.Value` holding `text`.
fn json_string(text: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(text.to_owned())),
    }
}

/// The `Struct` of a spot holding `value`.
fn hostile_struct(spot: &Spot, value: &str) -> prost_types::Struct {
    let fields = match spot {
        Spot::StructKey(_) => [(value.to_owned(), json_string("v"))].into(),
        Spot::StructNested(_) => [(
            "probe".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                    fields: [("inner".to_owned(), json_string(value))].into(),
                })),
            },
        )]
        .into(),
        _ => [("probe".to_owned(), json_string(value))].into(),
    };
    prost_types::Struct { fields }
}

/// Sets `value` at the end of `fields` in `message`, creating the messages
/// on the way (one element for a repeated field).
fn set_at(message: &mut DynamicMessage, fields: &[FieldDescriptor], value: Value) {
    let (field, rest) = fields.split_first().expect("a field");
    let leaf = if rest.is_empty() {
        value
    } else {
        let Kind::Message(inner) = field.kind() else {
            unreachable!("only messages have fields");
        };
        let mut child = DynamicMessage::new(inner);
        set_at(&mut child, rest, value);
        Value::Message(child)
    };
    if field.is_list() {
        message.set_field(field, Value::List(vec![leaf]));
    } else {
        message.set_field(field, leaf);
    }
}

/// A plausible request of `input`: the first account's ids, a fresh email,
/// and the top-level field under test in `update_mask`.
fn baseline(
    input: &MessageDescriptor,
    ids: &BTreeMap<&str, String>,
    slug: &str,
    under_test: &FieldDescriptor,
) -> DynamicMessage {
    let mut message = DynamicMessage::new(input.clone());
    for field in input.fields() {
        let singular = field.name().strip_suffix('s').unwrap_or(field.name());
        let text = match field.name() {
            name if ids.contains_key(name) => Some(ids[name].clone()),
            _ if field.is_list() && ids.contains_key(singular) => {
                message.set_field(
                    &field,
                    Value::List(vec![Value::String(ids[singular].clone())]),
                );
                None
            }
            "account_slug" => Some(slug.to_owned()),
            "email" | "owner_email" => Some("probe@first.example".to_owned()),
            "name" | "display_name" | "owner_display_name" => Some("Probe".to_owned()),
            "username" => Some("probe-user".to_owned()),
            "slug" => Some("probe-account".to_owned()),
            "update_mask" => {
                let mask = prost_types::FieldMask {
                    paths: vec![under_test.name().to_owned()],
                };
                message.set_field(
                    &field,
                    Value::Message(
                        DynamicMessage::decode(
                            field.kind().as_message().expect("a FieldMask").clone(),
                            mask.encode_to_vec().as_slice(),
                        )
                        .expect("a FieldMask"),
                    ),
                );
                None
            }
            _ => None,
        };
        if let (Some(text), Kind::String, false) = (text, field.kind(), field.is_list()) {
            message.set_field(&field, Value::String(text));
        }
    }
    message
}

/// Every row of every table of `db`, one digest per table: the migration
/// log left out, and the delivery state of invitations, which the email
/// results the notification service sends update in the background.
async fn snapshot(db: &DatabaseConnection) -> BTreeMap<String, String> {
    let backend = db.get_database_backend();
    let tables: Vec<String> = db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT table_name::text AS name FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_type = 'BASE TABLE' \
             AND table_name <> 'seaql_migrations' ORDER BY 1",
        ))
        .await
        .expect("tables")
        .iter()
        .map(|row| row.try_get::<String>("", "name").expect("name"))
        .collect();
    let mut digests = BTreeMap::new();
    for table in tables {
        let row_text = if table == "invitations" {
            "(to_jsonb(t) - '{delivery_status,delivery_reason,delivery_attempts,\
             delivery_update_time,update_time}'::text[])::text"
        } else {
            "t::text"
        };
        let row = db
            .query_one_raw(Statement::from_string(
                backend,
                format!(
                    "SELECT md5(coalesce(string_agg({row_text}, '|' ORDER BY {row_text}), '')) \
                     AS d FROM \"{table}\" t"
                ),
            ))
            .await
            .expect("digest")
            .expect("a row");
        digests.insert(table, row.try_get::<String>("", "d").expect("digest"));
    }
    digests
}

async fn snapshots(dbs: &[DatabaseConnection]) -> Vec<BTreeMap<String, String>> {
    let mut all = Vec::new();
    for db in dbs {
        all.push(snapshot(db).await);
    }
    all
}

/// Waits until what a successful call set going has landed: every outbox
/// relayed (emptied), then a moment for the consumers of its events.
async fn settle(dbs: &[DatabaseConnection]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    for db in dbs {
        loop {
            let row = db
                .query_one_raw(Statement::from_string(
                    db.get_database_backend(),
                    "SELECT count(*) AS n FROM usher_outbox",
                ))
                .await
                .expect("outbox")
                .expect("a row");
            if row.try_get::<i64>("", "n").expect("count") == 0
                || tokio::time::Instant::now() > deadline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Whether `method` may change something stored.
fn mutating(method: &str) -> bool {
    !["Get", "List", "Preview"]
        .iter()
        .any(|read| method.starts_with(read))
}

#[tokio::test]
async fn hostile_text_in_any_field_is_refused_and_changes_nothing() {
    let mut isolation = Isolation::new();
    let MatrixStack {
        identity,
        invitation: _invitation,
        notification: _notification,
        gateway,
        identity_env,
        invitation_env,
    } = MatrixStack::start(&mut isolation).await;
    let channel = gateway.channel();
    // The stores RPCs change (the notification service's RPCs only read;
    // its deliveries change on their own as emails are retried).
    let mut dbs = Vec::new();
    for env in [&identity_env, &invitation_env] {
        let url = env
            .iter()
            .find(|(k, _)| *k == "USHER_DATABASE__URL")
            .map(|(_, v)| v.clone())
            .expect("a database");
        dbs.push(sea_orm::Database::connect(url).await.expect("database"));
    }

    // An account, its owner signed in, a member, a team, a key, an invitation.
    let slug = format!("first-{}", isolation.id);
    create_account(
        &identity,
        &slug,
        "First",
        "owner@first.example",
        "Owner",
        10,
    )
    .await;
    let owner_login = SignInRequest {
        account_slug: slug.clone(),
        login: Some(Login::Email("owner@first.example".into())),
        password: OWNER_PASSWORD.into(),
    };
    let mut admin = sign_in(
        &gateway,
        &slug,
        Login::Email("owner@first.example".into()),
        OWNER_PASSWORD,
    )
    .await;
    let roles = RoleServiceClient::new(channel.clone())
        .list_roles(bearer(&admin, ListRolesRequest::default()))
        .await
        .expect("roles")
        .into_inner()
        .roles;
    let user_role = roles.iter().find(|r| r.name == "User").expect("User");
    let member = UserServiceClient::new(channel.clone())
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
    let api_key = AuthServiceClient::new(channel.clone())
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
    let ids: BTreeMap<&str, String> = [
        ("user_id", member.id.clone()),
        ("role_id", user_role.id.clone()),
        ("team_id", team.id.clone()),
        ("api_key_id", api_key.id.clone()),
        (
            "invitation_id",
            invited.results[0].invitation.clone().expect("invited").id,
        ),
    ]
    .into();
    let platform_key = create_platform_key(&identity_env, "Hostile text");

    let pool = DescriptorPool::decode(usher_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let policy = Policy::from_contracts().expect("policy");
    let mut rules: Vec<_> = policy.rules().collect();
    rules.sort_by(|a, b| a.path.cmp(&b.path));
    let mut problems = Vec::new();
    let (mut calls, mut refused_controls, mut unchanged_checks) = (0, 0, 0);
    let mut rpcs = 0;
    let mut dirty = true;
    for rule in rules {
        let token = match rule.access {
            Access::Public => None,
            Access::Member | Access::Permission => Some(Caller::Admin),
            Access::Platform => Some(Caller::Platform),
            // Never routed by the gateway.
            Access::Internal | Access::Unspecified => continue,
        };
        let method = pool
            .get_service_by_name(&rule.service)
            .and_then(|s| s.methods().find(|m| m.name() == rule.method))
            .expect("the rule's method");
        let input = method.input();
        let mut found = Vec::new();
        spots(&input, &[], &mut found);
        rpcs += 1;
        for spot in found {
            for (label, value) in hostile_values() {
                let top = &spot.fields()[0];
                let mut message = baseline(&input, &ids, &slug, top);
                let hostile = match &spot {
                    Spot::Text(_) => Value::String(value.clone()),
                    _ => {
                        let json = hostile_struct(&spot, &value);
                        let Kind::Message(descriptor) =
                            spot.fields().last().expect("a field").kind()
                        else {
                            unreachable!("a Struct field");
                        };
                        Value::Message(
                            DynamicMessage::decode(descriptor, json.encode_to_vec().as_slice())
                                .expect("a Struct"),
                        )
                    }
                };
                set_at(&mut message, spot.fields(), hostile);
                let before = if mutating(&rule.method) {
                    if dirty {
                        settle(&dbs).await;
                        dirty = false;
                    }
                    Some(snapshots(&dbs).await)
                } else {
                    None
                };
                let credential = match token {
                    None => None,
                    Some(Caller::Admin) => Some(admin.as_str()),
                    Some(Caller::Platform) => Some(platform_key.as_str()),
                };
                let mut answered =
                    answer(&channel, &rule.path, credential, message.encode_to_vec()).await;
                // A dependency slow to answer on this busy machine: once more.
                if answered
                    .as_ref()
                    .is_err_and(|status| status.code() == Code::Unavailable)
                {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    answered =
                        answer(&channel, &rule.path, credential, message.encode_to_vec()).await;
                }
                calls += 1;
                let what = format!("{} {} = {label}", rule.path, spot.path());
                let failed = match &answered {
                    Ok(_) => false,
                    Err(status) => {
                        // Nothing is down here: UNAVAILABLE or a deadline
                        // would be a service that broke (a panic resets
                        // the stream) or hung on the value.
                        if matches!(
                            status.code(),
                            Code::Internal
                                | Code::Unknown
                                | Code::Unavailable
                                | Code::DeadlineExceeded
                        ) {
                            problems.push(format!(
                                "{what}: {:?} {}",
                                status.code(),
                                status.message()
                            ));
                        }
                        true
                    }
                };
                if has_control(&value) && text::refused_char(&value, spot.rule()).is_some() {
                    let named = answered.as_ref().err().and_then(|status| {
                        let details = status.get_error_details();
                        let fields: Vec<String> = details
                            .bad_request()
                            .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
                            .unwrap_or_default();
                        (status.code() == Code::InvalidArgument).then_some(fields)
                    });
                    let want = spot.path();
                    let ok = named.as_ref().is_some_and(|fields| match spot {
                        // A hostile key names itself: any field under the struct.
                        Spot::StructKey(_) => fields
                            .iter()
                            .any(|f| f.starts_with(want.trim_end_matches(".<key>"))),
                        _ => fields.contains(&want),
                    });
                    if ok {
                        refused_controls += 1;
                    } else {
                        problems.push(format!(
                            "{what}: want INVALID_ARGUMENT on {want}, got {:?}",
                            answered
                                .as_ref()
                                .err()
                                .map(|s| (s.code(), s.message().to_owned()))
                        ));
                    }
                }
                if let Some(before) = before {
                    dirty |= !failed;
                    if failed {
                        unchanged_checks += 1;
                        let after = snapshots(&dbs).await;
                        for (db, (was, is)) in before.iter().zip(&after).enumerate() {
                            let changed: Vec<&String> = was
                                .iter()
                                .filter(|(table, digest)| is.get(*table) != Some(digest))
                                .map(|(table, _)| table)
                                .collect();
                            if !changed.is_empty() {
                                problems.push(format!(
                                    "{what}: failed ({:?}) but changed {changed:?} of database {db}",
                                    answered.as_ref().err().map(Status::code)
                                ));
                            }
                        }
                    }
                    // A call may end the admin's session (SignOut): sign in again.
                    if rule.service == "usher.identity.v1.AuthService" {
                        let alive = answer(
                            &channel,
                            "/usher.identity.v1.AuthService/GetCurrentUser",
                            Some(&admin),
                            Vec::new(),
                        )
                        .await;
                        if alive.is_err() {
                            dirty = true;
                            admin = AuthServiceClient::new(channel.clone())
                                .sign_in(owner_login.clone())
                                .await
                                .expect("signs in again")
                                .into_inner()
                                .session
                                .expect("session")
                                .access_token;
                        }
                    }
                }
            }
        }
    }
    for db in dbs {
        db.close().await.expect("close");
    }
    eprintln!(
        "{rpcs} RPCs, {calls} calls, {refused_controls} control characters refused by field, \
         {unchanged_checks} failed mutating calls compared"
    );
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(rpcs >= 45, "every routed RPC was probed ({rpcs})");
    assert!(calls > 600, "every string field was probed ({calls} calls)");
    assert!(
        refused_controls > 300,
        "control characters were refused by field ({refused_controls})"
    );
    assert!(
        unchanged_checks > 300,
        "failed mutating calls were compared ({unchanged_checks})"
    );
}

#[derive(Clone, Copy, Debug)]
enum Caller {
    Admin,
    Platform,
}
