//! Nobody grants what they do not hold (RELIABILITY P26), generated from the
//! contracts like the access matrix: every member RPC whose request has a
//! field naming a role (`role_id`, `reassign_to_role_id`, …) or a
//! `permissions` list is called through the real gateway by members holding
//! each single permission of the catalogue (plus the one the RPC requires),
//! signed in or with an API key, with every role of the account in each
//! role field — the built-in Admin, User, the caller's own role, a victim's
//! role — and every permission in `permissions`, on another user and on the
//! caller itself. Before and after each call the account is read as its
//! admin (roles, users, API keys, invitations): whatever holds a permission
//! it did not hold before holds only permissions of the caller, and the
//! caller's own role and that role's permissions never change. A new RPC
//! with such a field is covered the day it is added.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use prost::Message;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value,
};
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
        CreateApiKeyRequest, CreateRoleRequest, CreateUserRequest, ListApiKeysRequest,
        ListPermissionsRequest, ListRolesRequest, ListUsersRequest,
        auth_service_client::AuthServiceClient, role_service_client::RoleServiceClient,
        sign_in_request::Login, user_service_client::UserServiceClient,
    },
    invitation::v1::{ListInvitationsRequest, invitation_service_client::InvitationServiceClient},
};

use crate::harness::{Isolation, MatrixStack, OWNER_PASSWORD, bearer, create_account, sign_in};

/// Raw protobuf bytes in and out: any RPC, without its generated types.
#[derive(Clone, Copy, Default)]
struct Raw;

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

/// The code `path` answers to `body` sent with `token`, and the bytes of an
/// OK answer.
async fn call(channel: &Channel, path: &str, token: &str, body: Vec<u8>) -> (Code, Vec<u8>) {
    let mut grpc = Grpc::new(channel.clone());
    grpc.ready().await.expect("gateway ready");
    let mut request = Request::new(body);
    request.set_timeout(Duration::from_secs(20));
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).expect("ascii"),
    );
    let path = http::uri::PathAndQuery::try_from(path).expect("path");
    match grpc.unary(request, path, Raw).await {
        Ok(response) => (Code::Ok, response.into_inner()),
        Err(status) => (status.code(), Vec::new()),
    }
}

/// The answer of a read, retried while a dependency is briefly unavailable
/// (reads change nothing; the machine may be busy).
async fn read<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut tries = 0;
    loop {
        match attempt().await {
            Ok(response) => return response.into_inner(),
            Err(status) if status.code() == Code::Unavailable && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(status) => panic!("{what}: {status:?}"),
        }
    }
}

/// Who holds which permission in an account: `role:<id>`, `user:<id>`,
/// `key:<id>`, `invitation:<id>` → permissions; plus each user's role.
#[derive(Clone, Debug, Default)]
struct Grants {
    held: BTreeMap<String, BTreeSet<String>>,
    user_roles: BTreeMap<String, String>,
}

/// The account as its admin sees it.
async fn grants_of(channel: &Channel, admin: &str) -> Grants {
    let roles: BTreeMap<String, BTreeSet<String>> = read("roles", || {
        let mut client = RoleServiceClient::new(channel.clone());
        let admin = admin.to_owned();
        async move {
            client
                .list_roles(bearer(&admin, ListRolesRequest::default()))
                .await
        }
    })
    .await
    .roles
    .into_iter()
    .map(|r| (r.id, r.permissions.into_iter().collect()))
    .collect();
    let mut grants = Grants::default();
    for (id, permissions) in &roles {
        grants
            .held
            .insert(format!("role:{id}"), permissions.clone());
    }
    let of_role = |id: &str| roles.get(id).cloned().unwrap_or_default();
    let users = UserServiceClient::new(channel.clone());
    let mut token = String::new();
    loop {
        let page = read("users", || {
            let mut client = users.clone();
            let (admin, page_token) = (admin.to_owned(), token.clone());
            async move {
                client
                    .list_users(bearer(
                        &admin,
                        ListUsersRequest {
                            page_size: 500,
                            page_token,
                            ..Default::default()
                        },
                    ))
                    .await
            }
        })
        .await;
        for user in page.users {
            grants
                .held
                .insert(format!("user:{}", user.id), of_role(&user.role_id));
            grants.user_roles.insert(user.id, user.role_id);
        }
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let keys = AuthServiceClient::new(channel.clone());
    let mut token = String::new();
    loop {
        let page = read("keys", || {
            let mut client = keys.clone();
            let (admin, page_token) = (admin.to_owned(), token.clone());
            async move {
                client
                    .list_api_keys(bearer(
                        &admin,
                        ListApiKeysRequest {
                            page_size: 500,
                            page_token,
                            ..Default::default()
                        },
                    ))
                    .await
            }
        })
        .await;
        for key in page.api_keys {
            grants.held.insert(
                format!("key:{}", key.id),
                key.permissions.into_iter().collect(),
            );
        }
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let invitations = InvitationServiceClient::new(channel.clone());
    let mut token = String::new();
    loop {
        let page = read("invitations", || {
            let mut client = invitations.clone();
            let (admin, page_token) = (admin.to_owned(), token.clone());
            async move {
                client
                    .list_invitations(bearer(
                        &admin,
                        ListInvitationsRequest {
                            page_size: 500,
                            page_token,
                            ..Default::default()
                        },
                    ))
                    .await
            }
        })
        .await;
        for invitation in page.invitations {
            grants.held.insert(
                format!("invitation:{}", invitation.id),
                of_role(&invitation.role_id),
            );
        }
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    grants
}

/// Whether `field` names a role (`role_id`, `reassign_to_role_id`).
fn names_role(field: &FieldDescriptor) -> bool {
    field.name().ends_with("role_id") && !field.is_list() && field.kind() == Kind::String
}

/// Whether `field` is a list of permission names.
fn lists_permissions(field: &FieldDescriptor) -> bool {
    field.name() == "permissions" && field.is_list() && field.kind() == Kind::String
}

/// Whether a request of this type assigns a role or permissions.
fn assigns(input: &MessageDescriptor) -> bool {
    input
        .fields()
        .any(|f| names_role(&f) || lists_permissions(&f))
}

/// Every combination of `choices` (one value per field).
fn combinations(choices: &[(FieldDescriptor, Vec<Value>)]) -> Vec<Vec<(FieldDescriptor, Value)>> {
    let mut all: Vec<Vec<(FieldDescriptor, Value)>> = vec![Vec::new()];
    for (field, values) in choices {
        let mut next = Vec::with_capacity(all.len() * values.len());
        for partial in &all {
            for value in values {
                let mut grown = partial.clone();
                grown.push((field.clone(), value.clone()));
                next.push(grown);
            }
        }
        all = next;
    }
    all
}

/// One caller of the round: a signed-in member or an API key holding `held`.
struct Caller {
    label: String,
    token: String,
    held: BTreeSet<String>,
    /// The member itself (none for a key).
    user_id: Option<String>,
    /// The member's own role (none for a key).
    role_id: Option<String>,
    /// Another user, on the caller's `victim_role`.
    victim: String,
    victim_role: String,
}

#[tokio::test]
async fn no_rpc_hands_out_a_permission_its_caller_lacks() {
    let mut isolation = Isolation::new();
    let MatrixStack {
        identity,
        invitation: _invitation,
        notification: _notification,
        gateway,
        identity_env: _,
        invitation_env: _,
    } = MatrixStack::start(&mut isolation).await;
    let channel = gateway.channel();

    let pool = DescriptorPool::decode(usher_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let policy = Policy::from_contracts().expect("policy");
    let mut rules: Vec<_> = policy
        .rules()
        .filter(|rule| matches!(rule.access, Access::Member | Access::Permission))
        .filter_map(|rule| {
            let method = pool
                .get_service_by_name(&rule.service)
                .and_then(|s| s.methods().find(|m| m.name() == rule.method))?;
            assigns(&method.input()).then_some((rule, method))
        })
        .collect();
    rules.sort_by(|a, b| a.0.path.cmp(&b.0.path));
    let covered: BTreeSet<&str> = rules.iter().map(|(r, _)| r.method.as_str()).collect();
    for must in [
        "CreateInvitations",
        "CreateUser",
        "UpdateUser",
        "BatchUpdateUsers",
        "CreateRole",
        "UpdateRole",
        "DeleteRole",
        "CreateApiKey",
    ] {
        assert!(covered.contains(must), "{must} is covered: {covered:?}");
    }

    let mut problems = Vec::new();
    let mut unique = 0_u32;
    for (index, (rule, method)) in rules.iter().enumerate() {
        // A fresh account per RPC, so what one RPC changes never hides
        // another's outcome.
        let slug = format!("grants{index}-{}", isolation.id);
        let owner = format!("owner{index}@grants.example");
        create_account(&identity, &slug, "Grants", &owner, "Owner", 1_000).await;
        let admin = sign_in(&gateway, &slug, Login::Email(owner), OWNER_PASSWORD).await;
        let mut roles = RoleServiceClient::new(channel.clone());
        let mut users = UserServiceClient::new(channel.clone());
        let mut auth = AuthServiceClient::new(channel.clone());
        let listed = roles
            .list_roles(bearer(&admin, ListRolesRequest::default()))
            .await
            .expect("roles")
            .into_inner()
            .roles;
        let built_in = |name: &str| {
            listed
                .iter()
                .find(|r| r.name == name)
                .expect("built-in role")
                .id
                .clone()
        };
        let (admin_role, user_role) = (built_in("Admin"), built_in("User"));
        let catalogue: Vec<String> = roles
            .list_permissions(bearer(&admin, ListPermissionsRequest::default()))
            .await
            .expect("catalogue")
            .into_inner()
            .permissions
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert!(catalogue.len() >= 7, "the catalogue: {catalogue:?}");

        let mut make_role = async |name: String, permissions: Vec<String>| {
            roles
                .create_role(bearer(
                    &admin,
                    CreateRoleRequest {
                        name,
                        permissions,
                        ..Default::default()
                    },
                ))
                .await
                .expect("role")
                .into_inner()
                .role
                .expect("role")
                .id
        };
        let mut callers = Vec::new();
        for permission in &catalogue {
            let mut held: BTreeSet<String> = BTreeSet::from([permission.clone()]);
            if !rule.permission.is_empty() {
                held.insert(rule.permission.clone());
            }
            let own = make_role(
                format!("Holds {permission}"),
                held.iter().cloned().collect(),
            )
            .await;
            for kind in ["member", "key"] {
                let victim_role = make_role(
                    format!("Victim of {kind} {permission}"),
                    vec!["users.read".into()],
                )
                .await;
                let mut new_user = async |username: String, role_id: String| {
                    users
                        .create_user(bearer(
                            &admin,
                            CreateUserRequest {
                                username: username.clone(),
                                display_name: username,
                                password: "a long enough passphrase".into(),
                                role_id,
                                ..Default::default()
                            },
                        ))
                        .await
                        .expect("user")
                        .into_inner()
                        .user
                        .expect("user")
                        .id
                };
                let victim =
                    new_user(format!("victim-{kind}-{permission}"), victim_role.clone()).await;
                let caller = if kind == "member" {
                    let username = format!("holder-{permission}");
                    let user_id = new_user(username.clone(), own.clone()).await;
                    let token = sign_in(
                        &gateway,
                        &slug,
                        Login::Username(username),
                        "a long enough passphrase",
                    )
                    .await;
                    Caller {
                        label: format!("member holding {held:?}"),
                        token,
                        held: held.clone(),
                        user_id: Some(user_id),
                        role_id: Some(own.clone()),
                        victim,
                        victim_role,
                    }
                } else {
                    let secret = auth
                        .create_api_key(bearer(
                            &admin,
                            CreateApiKeyRequest {
                                name: format!("Holds {permission}"),
                                permissions: held.iter().cloned().collect(),
                                ..Default::default()
                            },
                        ))
                        .await
                        .expect("key")
                        .into_inner()
                        .secret;
                    Caller {
                        label: format!("API key holding {held:?}"),
                        token: secret,
                        held: held.clone(),
                        user_id: None,
                        role_id: None,
                        victim,
                        victim_role,
                    }
                };
                callers.push(caller);
            }
        }

        eprintln!("{}: {} callers", rule.path, callers.len());
        let input = method.input();
        let mut answered: std::collections::HashMap<Code, u32> = std::collections::HashMap::new();
        let mut refused_items = 0_u32;
        let mut before = grants_of(&channel, &admin).await;
        for caller in &callers {
            // The values each interesting field takes, in every combination.
            let mut choices: Vec<(FieldDescriptor, Vec<Value>)> = Vec::new();
            let mut role_candidates = vec![
                admin_role.clone(),
                user_role.clone(),
                caller.victim_role.clone(),
            ];
            role_candidates.extend(caller.role_id.clone());
            let mut users_of_caller = vec![caller.victim.clone()];
            users_of_caller.extend(caller.user_id.clone());
            let mut mask_paths = Vec::new();
            for field in input.fields() {
                if names_role(&field) {
                    choices.push((
                        field.clone(),
                        role_candidates.iter().cloned().map(Value::String).collect(),
                    ));
                    if field.name() == "role_id" {
                        mask_paths.push("role_id");
                    }
                } else if lists_permissions(&field) {
                    // Everything, or exactly what the caller holds.
                    choices.push((
                        field.clone(),
                        vec![
                            Value::List(catalogue.iter().cloned().map(Value::String).collect()),
                            Value::List(caller.held.iter().cloned().map(Value::String).collect()),
                        ],
                    ));
                    mask_paths.push("permissions");
                } else if field.name() == "user_id" && field.kind() == Kind::String {
                    choices.push((
                        field.clone(),
                        users_of_caller.iter().cloned().map(Value::String).collect(),
                    ));
                } else if field.name() == "user_ids" && field.is_list() {
                    choices.push((
                        field.clone(),
                        vec![Value::List(
                            users_of_caller.iter().cloned().map(Value::String).collect(),
                        )],
                    ));
                }
            }
            if let Some(mask) = input.get_field_by_name("update_mask") {
                let Kind::Message(mask_type) = mask.kind() else {
                    panic!("update_mask is a FieldMask");
                };
                let paths = mask_type.get_field_by_name("paths").expect("paths");
                let values = mask_paths
                    .iter()
                    .map(|path| {
                        let mut value = DynamicMessage::new(mask_type.clone());
                        value.set_field(&paths, Value::List(vec![Value::String((*path).into())]));
                        Value::Message(value)
                    })
                    .collect();
                choices.push((mask, values));
            }
            for combination in combinations(&choices) {
                unique += 1;
                let mut message = DynamicMessage::new(input.clone());
                // What any create needs: a name, a username and a password,
                // an address to invite.
                for field in input.fields() {
                    let text = match field.name() {
                        "name" | "display_name" | "username" => format!("grant-{unique}"),
                        "password" => "a long enough passphrase".into(),
                        "raw_text" => format!("invitee{unique}@grants.example"),
                        _ => continue,
                    };
                    if field.kind() == Kind::String && !field.is_list() {
                        message.set_field(&field, Value::String(text));
                    }
                }
                let mut shown = Vec::new();
                for (field, value) in combination {
                    shown.push(format!("{}={value:?}", field.name()));
                    message.set_field(&field, value);
                }
                let (code, bytes) =
                    call(&channel, &rule.path, &caller.token, message.encode_to_vec()).await;
                *answered.entry(code).or_default() += 1;
                // A bulk call refuses per item: count its failed items.
                let output = method.output();
                if code == Code::Ok
                    && let Some(failed) = output.get_field_by_name("failed_count")
                {
                    let response =
                        DynamicMessage::decode(output.clone(), bytes.as_slice()).expect("response");
                    if response.get_field(&failed).as_i32().unwrap_or_default() > 0 {
                        refused_items += 1;
                    }
                }
                let after = grants_of(&channel, &admin).await;
                for (holder, permissions) in &after.held {
                    let had = before.held.get(holder).cloned().unwrap_or_default();
                    let beyond: Vec<&String> = permissions
                        .iter()
                        .filter(|p| !had.contains(*p) && !caller.held.contains(*p))
                        .collect();
                    if !beyond.is_empty() {
                        problems.push(format!(
                            "{} by a {} ({}) answered {code:?} and gave {holder} {beyond:?}",
                            rule.path,
                            caller.label,
                            shown.join(", "),
                        ));
                    }
                }
                if let (Some(user), Some(own)) = (&caller.user_id, &caller.role_id) {
                    if after.user_roles.get(user) != Some(own) {
                        problems.push(format!(
                            "{} by a {} ({}) changed the caller's own role",
                            rule.path,
                            caller.label,
                            shown.join(", "),
                        ));
                    }
                    let own_role = format!("role:{own}");
                    if after.held.get(&own_role) != before.held.get(&own_role) {
                        problems.push(format!(
                            "{} by a {} ({}) changed the permissions of the caller's own role",
                            rule.path,
                            caller.label,
                            shown.join(", "),
                        ));
                    }
                }
                before = after;
            }
        }
        eprintln!("{}: answers {answered:?}", rule.path);
        // The round did something: some calls went through, and an RPC
        // that changes anything refused some escalation.
        if answered.get(&Code::Ok).copied().unwrap_or(0) == 0 {
            problems.push(format!("{}: no call succeeded ({answered:?})", rule.path));
        }
        let reads = rule.method.starts_with("List") || rule.method.starts_with("Get");
        if !reads
            && answered.get(&Code::PermissionDenied).copied().unwrap_or(0) + refused_items == 0
        {
            problems.push(format!(
                "{}: no escalation was refused ({answered:?})",
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
    assert!(unique > 300, "enough calls were made ({unique})");
}
