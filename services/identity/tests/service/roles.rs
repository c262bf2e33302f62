//! Service tests of RoleService, and the helpers the team tests share: real
//! PostgreSQL and Redis through `TestIdentity`.

use chrono::Duration;
use prost::Message;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel, QueryFilter, Set,
    Statement,
};
use usher_kit::principal::Principal;
use usher_proto::{events::v1 as events, identity::v1 as pb};
use uuid::Uuid;

use pb::{account_service_server::AccountService, role_service_server::RoleService};

use usher_identity::{
    domain::{Origin, UserStatus},
    store::entities::{audit_event, role, user},
    testing::{TestIdentity, admin_permissions, member, platform, request},
};

pub(crate) use crate::common::{fields, invalid, reason, refused, start, tenant};

/// Registers the product `meter` with `meter.refill` and `meter.read`.
pub(crate) async fn register_meter(test: &TestIdentity) {
    let permission = |name: &str| pb::Permission {
        name: name.into(),
        description: format!("Allows {name}"),
        product_code: String::new(),
    };
    AccountService::register_product(
        &test.api,
        request(
            &platform(),
            pb::RegisterProductRequest {
                code: "meter".into(),
                display_name: "Postage meter".into(),
                permissions: vec![permission("meter.refill"), permission("meter.read")],
            },
        ),
    )
    .await
    .expect("product");
}

/// A user of `account` written directly (the tests of this file do not
/// depend on UserService).
pub(crate) async fn add_user(
    test: &TestIdentity,
    account: Uuid,
    role_id: Uuid,
    team_id: Option<Uuid>,
    status: UserStatus,
) -> Uuid {
    let id = Uuid::new_v4();
    let now = test.state.clock.now();
    let email = format!("{}@acme.example", id.simple());
    user::ActiveModel {
        id: Set(id),
        account_id: Set(account),
        email: Set(Some(email.clone())),
        email_canonical: Set(Some(email.clone())),
        username: Set(None),
        display_name: Set(format!("User {}", &id.simple().to_string()[..6])),
        search_text: Set(email),
        status: Set(status),
        role_id: Set(role_id),
        team_id: Set(team_id),
        products: Set(serde_json::json!([])),
        locale: Set(String::new()),
        metadata: Set(None),
        owner: Set(false),
        origin: Set(Origin::Direct),
        password_hash: Set(None),
        password_change_required: Set(false),
        invitation_id: Set(None),
        invited_by: Set(None),
        create_time: Set(now),
        update_time: Set(now),
        activate_time: Set(None),
        deactivate_time: Set(None),
        last_sign_in_time: Set(None),
    }
    .insert(&test.state.db)
    .await
    .expect("user");
    id
}

pub(crate) async fn user_row(test: &TestIdentity, id: Uuid) -> user::Model {
    user::Entity::find_by_id(id)
        .one(&test.state.db)
        .await
        .expect("query")
        .expect("user")
}

/// Routing keys of the outbox rows, oldest first.
pub(crate) async fn outbox_keys(test: &TestIdentity) -> Vec<String> {
    let db = &test.state.db;
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT message->>'routing_key' AS k FROM usher_outbox ORDER BY id",
        ))
        .await
        .expect("outbox");
    let keys: Vec<String> = rows
        .iter()
        .map(|r| r.try_get("", "k").expect("key"))
        .collect();
    assert_eq!(
        keys.len() as u64,
        usher_kit::outbox::pending(db).await.expect("pending")
    );
    keys
}

/// Payloads of the outbox rows with `routing_key`, decoded as `M`.
pub(crate) async fn outbox_events<M: Message + Default>(
    test: &TestIdentity,
    routing_key: &str,
) -> Vec<M> {
    let db = &test.state.db;
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "SELECT payload FROM usher_outbox WHERE message->>'routing_key' = $1 ORDER BY id",
            [routing_key.into()],
        ))
        .await
        .expect("outbox");
    rows.iter()
        .map(|r| {
            M::decode(
                r.try_get::<Vec<u8>>("", "payload")
                    .expect("payload")
                    .as_slice(),
            )
            .expect("decodes")
        })
        .collect()
}

/// The audit entries of `account`, oldest first.
pub(crate) async fn audit_rows(test: &TestIdentity, account: Uuid) -> Vec<audit_event::Model> {
    use sea_orm::QueryOrder;
    audit_event::Entity::find()
        .filter(audit_event::Column::AccountId.eq(account))
        .order_by_asc(audit_event::Column::EventTime)
        .order_by_asc(audit_event::Column::Id)
        .all(&test.state.db)
        .await
        .expect("audit")
}

fn create(name: &str, permissions: &[&str]) -> pb::CreateRoleRequest {
    pb::CreateRoleRequest {
        request_id: String::new(),
        name: name.into(),
        description: format!("The {name}"),
        permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
    }
}

async fn create_role(
    test: &TestIdentity,
    caller: &Principal,
    name: &str,
    permissions: &[&str],
) -> pb::Role {
    RoleService::create_role(&test.api, request(caller, create(name, permissions)))
        .await
        .expect("role created")
        .into_inner()
        .role
        .expect("role")
}

fn update(role_id: &str, paths: &[&str]) -> pb::UpdateRoleRequest {
    pb::UpdateRoleRequest {
        role_id: role_id.into(),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
        ..Default::default()
    }
}

fn delete(role_id: impl ToString, reassign: impl ToString) -> pb::DeleteRoleRequest {
    pb::DeleteRoleRequest {
        role_id: role_id.to_string(),
        reassign_to_role_id: reassign.to_string(),
    }
}

async fn list_roles(
    test: &TestIdentity,
    caller: &Principal,
    page_size: i32,
    token: &str,
) -> pb::ListRolesResponse {
    RoleService::list_roles(
        &test.api,
        request(
            caller,
            pb::ListRolesRequest {
                page_size,
                page_token: token.into(),
            },
        ),
    )
    .await
    .expect("roles")
    .into_inner()
}

#[tokio::test]
async fn roles_are_listed_built_in_first_then_by_name_with_user_counts() {
    let (test, _clock) = start().await;
    register_meter(&test).await;
    let a = tenant(&test, &["meter"]).await;
    let beta = create_role(&test, &a.admin, "beta", &["users.read"]).await;
    let alpha = create_role(&test, &a.admin, "Alpha", &["users.read", "users.manage"]).await;
    for _ in 0..2 {
        add_user(
            &test,
            a.account,
            Uuid::parse_str(&alpha.id).expect("uuid"),
            None,
            UserStatus::Active,
        )
        .await;
    }
    add_user(
        &test,
        a.account,
        Uuid::parse_str(&alpha.id).expect("uuid"),
        None,
        UserStatus::Invited,
    )
    .await;
    add_user(&test, a.account, a.user_role, None, UserStatus::Inactive).await;

    let page = list_roles(&test, &a.admin, 0, "").await;
    let names: Vec<&str> = page.roles.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["Admin", "User", "Alpha", "beta"]);
    assert!(page.next_page_token.is_empty());
    let counts: Vec<i32> = page.roles.iter().map(|r| r.user_count).collect();
    assert_eq!(counts, [1, 1, 3, 0]);
    let admin = &page.roles[0];
    assert!(admin.built_in && admin.manages_users);
    // The built-in Admin holds the catalogue and the enabled product's permissions.
    for permission in admin_permissions()
        .into_iter()
        .chain(["meter.refill", "meter.read"])
    {
        assert!(
            admin.permissions.iter().any(|p| p == permission),
            "{permission}"
        );
    }
    assert_eq!(page.roles[1].permissions, ["users.read"]);
    assert!(!page.roles[1].manages_users);
    assert!(page.roles[2].manages_users && !page.roles[2].built_in);
    assert_eq!(page.roles[3].id, beta.id);

    // Keyset pages of one: the same order, no gaps, no duplicates.
    let mut token = String::new();
    let mut walked = Vec::new();
    loop {
        let page = list_roles(&test, &a.admin, 1, &token).await;
        walked.extend(page.roles.into_iter().map(|r| r.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(walked, ["Admin", "User", "Alpha", "beta"]);

    // Any member may list (MEMBER access); bad paging is INVALID_ARGUMENT.
    let reader = member(a.account, a.owner, &["users.read"]);
    assert_eq!(list_roles(&test, &reader, 500, "").await.roles.len(), 4);
    invalid(
        RoleService::list_roles(
            &test.api,
            request(
                &a.admin,
                pb::ListRolesRequest {
                    page_size: -1,
                    page_token: String::new(),
                },
            ),
        )
        .await,
        "page_size",
    );
    invalid(
        RoleService::list_roles(
            &test.api,
            request(
                &a.admin,
                pb::ListRolesRequest {
                    page_size: 1,
                    page_token: "garbage!".into(),
                },
            ),
        )
        .await,
        "page_token",
    );
    test.stop().await;
}

#[tokio::test]
async fn permissions_are_the_catalogue_then_the_enabled_products() {
    let (test, _clock) = start().await;
    register_meter(&test).await;
    let with_meter = tenant(&test, &["meter"]).await;
    let without = tenant(&test, &[]).await;
    let list = |caller: Principal, page_size: i32, page_token: String| {
        let api = test.api.clone();
        async move {
            RoleService::list_permissions(
                &api,
                request(
                    &caller,
                    pb::ListPermissionsRequest {
                        page_size,
                        page_token,
                    },
                ),
            )
            .await
        }
    };

    let all = list(with_meter.admin.clone(), 0, String::new())
        .await
        .expect("permissions")
        .into_inner();
    let names: Vec<&str> = all.permissions.iter().map(|p| p.name.as_str()).collect();
    let mut core: Vec<&str> = usher_identity::domain::CATALOGUE
        .iter()
        .map(|(p, _)| *p)
        .collect();
    core.sort_unstable();
    let mut expected = core.clone();
    expected.extend(["meter.read", "meter.refill"]);
    assert_eq!(names, expected);
    assert!(all.permissions.iter().all(|p| !p.description.is_empty()));
    assert_eq!(
        all.permissions.last().map(|p| p.product_code.as_str()),
        Some("meter")
    );
    assert!(all.permissions[0].product_code.is_empty());
    assert!(all.next_page_token.is_empty());

    // Pages of 3 walk the same list.
    let mut token = String::new();
    let mut walked = Vec::new();
    loop {
        let page = list(with_meter.admin.clone(), 3, token)
            .await
            .expect("page")
            .into_inner();
        assert!(page.permissions.len() <= 3);
        walked.extend(page.permissions.into_iter().map(|p| p.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(walked, expected);

    // An account without the product sees the core catalogue only.
    let core_only = list(without.admin.clone(), 0, String::new())
        .await
        .expect("permissions")
        .into_inner();
    assert_eq!(
        core_only
            .permissions
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        core
    );

    invalid(
        list(without.admin.clone(), -5, String::new()).await,
        "page_size",
    );
    invalid(
        list(without.admin.clone(), 0, "%%%".into()).await,
        "page_token",
    );
    test.stop().await;
}

#[tokio::test]
async fn creating_a_role_is_validated_audited_published_and_idempotent() {
    let (test, _clock) = start().await;
    register_meter(&test).await;
    let a = tenant(&test, &["meter"]).await;
    let before = outbox_keys(&test).await.len();

    let role = create_role(
        &test,
        &a.admin,
        "Shipping clerks",
        &["users.read", " users.invite", "users.read"],
    )
    .await;
    assert_eq!(role.name, "Shipping clerks");
    assert_eq!(role.description, "The Shipping clerks");
    assert_eq!(
        role.permissions,
        ["users.invite", "users.read"],
        "trimmed, deduplicated, sorted"
    );
    assert!(!role.built_in && !role.manages_users);
    assert_eq!(role.user_count, 0);

    let keys = outbox_keys(&test).await;
    assert_eq!(keys[before..], ["role.created"]);
    let created: Vec<events::RoleCreated> = outbox_events(&test, "role.created").await;
    assert_eq!(created[0].role_id, role.id);
    assert_eq!(created[0].account_id, a.account.to_string());
    assert_eq!(created[0].permissions, ["users.invite", "users.read"]);
    let actor = created[0].actor.clone().expect("actor");
    assert_eq!(
        (actor.id.as_str(), actor.display_name.as_str()),
        (a.owner.to_string().as_str(), "Olive Owner")
    );
    let entry = audit_rows(&test, a.account)
        .await
        .pop()
        .expect("audit entry");
    assert_eq!(
        (entry.action.as_str(), entry.target_type.as_str()),
        ("role.created", "role")
    );
    assert_eq!(
        (entry.target_id.clone(), entry.target_name.as_str()),
        (role.id.clone(), "Shipping clerks")
    );
    assert_eq!(
        (entry.actor_kind.as_str(), entry.actor_name.as_str()),
        ("user", "Olive Owner")
    );
    assert_eq!(entry.actor_id, a.owner.to_string());

    // The same request_id: the original answer, nothing written twice.
    let mut keyed = create("Auditors", &["audit.read"]);
    keyed.request_id = "0b0e8f9e-retry".into();
    let first = RoleService::create_role(&test.api, request(&a.admin, keyed.clone()))
        .await
        .expect("first")
        .into_inner();
    let pending = outbox_keys(&test).await.len();
    let again = RoleService::create_role(&test.api, request(&a.admin, keyed.clone()))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(first, again);
    assert_eq!(outbox_keys(&test).await.len(), pending);
    let mut changed = keyed.clone();
    changed.name = "Other auditors".into();
    refused(
        RoleService::create_role(&test.api, request(&a.admin, changed)).await,
        "IDEMPOTENCY_CONFLICT",
    );

    // Names are unique case-insensitively.
    refused(
        RoleService::create_role(&test.api, request(&a.admin, create("SHIPPING CLERKS", &[])))
            .await,
        "ALREADY_EXISTS",
    );
    refused(
        RoleService::create_role(&test.api, request(&a.admin, create("admin", &[]))).await,
        "ALREADY_EXISTS",
    );

    // Bad input: every field at fault is named.
    let mut bad = create(" ", &["users.read", "users.fly", "billing.pay"]);
    bad.description = "x".repeat(501);
    let status = refused(
        RoleService::create_role(&test.api, request(&a.admin, bad)).await,
        "INVALID_ARGUMENT",
    );
    assert_eq!(
        fields(&status),
        ["name", "description", "permissions[1]", "permissions[2]"]
    );
    invalid(
        RoleService::create_role(&test.api, request(&a.admin, create(&"n".repeat(101), &[]))).await,
        "name",
    );
    invalid(
        RoleService::create_role(&test.api, request(&a.admin, create("Bidi\u{202E}", &[]))).await,
        "name",
    );
    let too_many: Vec<String> = (0..201).map(|_| "users.read".to_owned()).collect();
    let mut many = create("Many", &[]);
    many.permissions = too_many;
    invalid(
        RoleService::create_role(&test.api, request(&a.admin, many)).await,
        "permissions",
    );
    let mut long_key = create("Long key", &[]);
    long_key.request_id = "k".repeat(129);
    invalid(
        RoleService::create_role(&test.api, request(&a.admin, long_key)).await,
        "request_id",
    );

    // Product permissions: only of enabled products, only if the caller holds them.
    let no_meter = tenant(&test, &[]).await;
    invalid(
        RoleService::create_role(
            &test.api,
            request(&no_meter.admin, create("Refillers", &["meter.refill"])),
        )
        .await,
        "permissions[0]",
    );
    refused(
        RoleService::create_role(
            &test.api,
            request(&a.admin, create("Refillers", &["meter.refill"])),
        )
        .await,
        "PERMISSION_DENIED",
    );
    let mut with_meter = admin_permissions();
    with_meter.push("meter.refill");
    let product_admin = member(a.account, a.owner, &with_meter);
    let refillers = create_role(&test, &product_admin, "Refillers", &["meter.refill"]).await;
    assert_eq!(refillers.permissions, ["meter.refill"]);

    // No privilege escalation: a role manager without users.manage cannot grant it.
    let role_manager = member(a.account, a.owner, &["roles.manage", "users.read"]);
    refused(
        RoleService::create_role(
            &test.api,
            request(&role_manager, create("Managers", &["users.manage"])),
        )
        .await,
        "PERMISSION_DENIED",
    );
    create_role(&test, &role_manager, "Readers", &["users.read"]).await;
    test.stop().await;
}

#[tokio::test]
async fn nobody_edits_or_deletes_the_role_it_holds_nor_reassigns_beyond_itself() {
    let (test, _clock) = start().await;
    let a = tenant(&test, &[]).await;
    let held = ["roles.manage", "users.read"];
    let keepers = create_role(&test, &a.admin, "Keepers", &held).await;
    let keepers_id = Uuid::parse_str(&keepers.id).expect("uuid");
    let kim = add_user(&test, a.account, keepers_id, None, UserStatus::Active).await;
    let as_kim = member(a.account, kim, &held);

    // Its own role: no permission change, not even a removal; the name
    // and description stay editable.
    for permissions in [
        vec!["users.read"],
        vec!["roles.manage", "users.read", "audit.read"],
    ] {
        let mut change = update(&keepers.id, &["permissions"]);
        change.permissions = permissions.iter().map(|p| (*p).to_owned()).collect();
        refused(
            RoleService::update_role(&test.api, request(&as_kim, change)).await,
            "PERMISSION_DENIED",
        );
    }
    let mut rename = update(&keepers.id, &["name", "permissions"]);
    rename.name = "Key keepers".into();
    rename.permissions = vec!["users.read".into(), "roles.manage".into()];
    RoleService::update_role(&test.api, request(&as_kim, rename))
        .await
        .expect("renamed, permissions unchanged");
    let stored = role::Entity::find_by_id(keepers_id)
        .one(&test.state.db)
        .await
        .expect("query")
        .expect("role");
    assert_eq!(
        usher_identity::api::convert::strings(&stored.permissions),
        held
    );

    // DeleteRole: moving holders to a role beyond the caller, or
    // deleting the caller's own role, is refused and moves nobody.
    let clerks = create_role(&test, &a.admin, "Clerks", &["users.read"]).await;
    let clerks_id = Uuid::parse_str(&clerks.id).expect("uuid");
    let clerk = add_user(&test, a.account, clerks_id, None, UserStatus::Active).await;
    refused(
        RoleService::delete_role(&test.api, request(&as_kim, delete(clerks_id, a.admin_role)))
            .await,
        "PERMISSION_DENIED",
    );
    assert_eq!(user_row(&test, clerk).await.role_id, clerks_id);
    refused(
        RoleService::delete_role(&test.api, request(&as_kim, delete(keepers_id, a.user_role)))
            .await,
        "PERMISSION_DENIED",
    );
    assert_eq!(user_row(&test, kim).await.role_id, keepers_id);
    // Within the caller's permissions, another role's holders may move.
    RoleService::delete_role(&test.api, request(&as_kim, delete(clerks_id, a.user_role)))
        .await
        .expect("reassigned to User");
    assert_eq!(user_row(&test, clerk).await.role_id, a.user_role);
    test.stop().await;
}

#[tokio::test]
async fn an_account_holds_at_most_100_roles() {
    let (test, _clock) = start().await;
    let a = tenant(&test, &[]).await;
    let now = test.state.clock.now();
    // Two built-in roles + 98 custom ones.
    let rows: Vec<role::ActiveModel> = (0..98)
        .map(|i| role::ActiveModel {
            id: Set(Uuid::new_v4()),
            account_id: Set(a.account),
            name: Set(format!("Role {i:03}")),
            description: Set(String::new()),
            permissions: Set(serde_json::json!([])),
            built_in: Set(false),
            create_time: Set(now),
            update_time: Set(now),
        })
        .collect();
    role::Entity::insert_many(rows)
        .exec(&test.state.db)
        .await
        .expect("roles");
    invalid(
        RoleService::create_role(&test.api, request(&a.admin, create("One too many", &[]))).await,
        "name",
    );
    let page = list_roles(&test, &a.admin, 1_000, "").await;
    assert_eq!(page.roles.len(), 100);
    assert!(page.next_page_token.is_empty());
    test.stop().await;
}

#[tokio::test]
async fn updating_a_role_changes_only_the_named_fields_and_refreshes_holders() {
    let (test, clock) = start().await;
    let a = tenant(&test, &[]).await;
    let role = create_role(&test, &a.admin, "Clerks", &["users.read"]).await;
    let role_id = Uuid::parse_str(&role.id).expect("uuid");
    let holder = add_user(&test, a.account, role_id, None, UserStatus::Active).await;
    let inactive = add_user(&test, a.account, role_id, None, UserStatus::Inactive).await;
    clock.advance(Duration::minutes(5));

    // Only the masked field changes (P15): the name is sent but not named.
    let mut message = update(&role.id, &["description"]);
    message.name = "Ignored".into();
    message.description = "  Counter staff  ".into();
    let updated = RoleService::update_role(&test.api, request(&a.admin, message))
        .await
        .expect("updated")
        .into_inner()
        .role
        .expect("role");
    assert_eq!(
        (updated.name.as_str(), updated.description.as_str()),
        ("Clerks", "Counter staff")
    );
    assert_eq!(updated.user_count, 2);
    assert!(updated.update_time.expect("time").seconds > role.update_time.expect("time").seconds);

    let mut message = update(&role.id, &["name", "permissions"]);
    message.name = "Senior clerks".into();
    message.permissions = vec!["users.read".into(), "users.invite".into()];
    let updated = RoleService::update_role(&test.api, request(&a.admin, message))
        .await
        .expect("updated")
        .into_inner()
        .role
        .expect("role");
    assert_eq!(updated.name, "Senior clerks");
    assert_eq!(updated.permissions, ["users.invite", "users.read"]);

    // The new permissions apply on the holder's next call.
    let snapshot = test
        .state
        .sessions
        .get_principal(holder)
        .await
        .expect("redis")
        .expect("snapshot");
    assert_eq!(snapshot.permissions, ["users.invite", "users.read"]);
    assert_eq!(snapshot.role_id, role_id);
    assert!(
        test.state
            .sessions
            .get_principal(inactive)
            .await
            .expect("redis")
            .is_none()
    );

    let published: Vec<events::RoleUpdated> = outbox_events(&test, "role.updated").await;
    assert_eq!(published.len(), 2);
    assert_eq!(
        published[0].changed_fields.clone().expect("mask").paths,
        ["description"]
    );
    assert_eq!(
        published[1].changed_fields.clone().expect("mask").paths,
        ["name", "permissions"]
    );
    assert_eq!(published[1].name, "Senior clerks");
    let entry = audit_rows(&test, a.account).await.pop().expect("entry");
    assert_eq!(
        (entry.action.as_str(), entry.target_name.as_str()),
        ("role.updated", "Senior clerks")
    );
    let details = entry.details.expect("details");
    assert_eq!(details["name"]["old"], "Clerks");
    assert_eq!(
        details["permissions"]["new"],
        serde_json::json!(["users.invite", "users.read"])
    );

    // Errors, as documented.
    invalid(
        RoleService::update_role(
            &test.api,
            request(&a.admin, update("not-a-uuid", &["name"])),
        )
        .await,
        "role_id",
    );
    invalid(
        RoleService::update_role(&test.api, request(&a.admin, update(&role.id, &[]))).await,
        "update_mask",
    );
    invalid(
        RoleService::update_role(
            &test.api,
            request(&a.admin, update(&role.id, &["built_in"])),
        )
        .await,
        "update_mask.paths[0]",
    );
    invalid(
        RoleService::update_role(&test.api, request(&a.admin, update(&role.id, &["name"]))).await,
        "name",
    );
    let mut unknown = update(&role.id, &["permissions"]);
    unknown.permissions = vec!["users.read".into(), "teleport".into()];
    invalid(
        RoleService::update_role(&test.api, request(&a.admin, unknown)).await,
        "permissions[1]",
    );
    refused(
        RoleService::update_role(
            &test.api,
            request(
                &a.admin,
                update(&Uuid::new_v4().to_string(), &["description"]),
            ),
        )
        .await,
        "NOT_FOUND",
    );
    for built_in in [a.admin_role, a.user_role] {
        let mut message = update(&built_in.to_string(), &["description"]);
        message.description = "Mine now".into();
        refused(
            RoleService::update_role(&test.api, request(&a.admin, message)).await,
            "BUILT_IN_ROLE",
        );
    }
    create_role(&test, &a.admin, "Auditors", &["audit.read"]).await;
    let mut taken = update(&role.id, &["name"]);
    taken.name = "auditors".into();
    refused(
        RoleService::update_role(&test.api, request(&a.admin, taken)).await,
        "ALREADY_EXISTS",
    );
    // Renaming to another case of its own name is fine.
    let mut recase = update(&role.id, &["name"]);
    recase.name = "SENIOR CLERKS".into();
    RoleService::update_role(&test.api, request(&a.admin, recase))
        .await
        .expect("recased");
    // Granting a permission the caller lacks is refused; keeping one is not.
    let limited = member(a.account, a.owner, &["roles.manage", "users.read"]);
    let mut escalate = update(&role.id, &["permissions"]);
    escalate.permissions = vec![
        "users.read".into(),
        "users.invite".into(),
        "account.manage".into(),
    ];
    refused(
        RoleService::update_role(&test.api, request(&limited, escalate)).await,
        "PERMISSION_DENIED",
    );
    let mut shrink = update(&role.id, &["permissions"]);
    shrink.permissions = vec!["users.invite".into()];
    RoleService::update_role(&test.api, request(&limited, shrink))
        .await
        .expect("shrunk");
    test.stop().await;
}

#[tokio::test]
async fn removing_users_manage_from_the_only_managers_role_is_refused() {
    let (test, _clock) = start().await;
    let a = tenant(&test, &[]).await;
    let supervisors = create_role(
        &test,
        &a.admin,
        "Supervisors",
        &["users.read", "users.manage"],
    )
    .await;
    let supervisors_id = Uuid::parse_str(&supervisors.id).expect("uuid");
    assert!(supervisors.manages_users);
    // The owner moved to Supervisors (written directly: the API protects
    // the owner's role), so the role's holders are the only managers.
    let mut owner = user_row(&test, a.owner).await.into_active_model();
    owner.role_id = Set(supervisors_id);
    owner.update(&test.state.db).await.expect("owner moved");
    add_user(&test, a.account, a.admin_role, None, UserStatus::Inactive).await;
    // The owner now holds Supervisors and may not edit it (P26): an
    // admin's API key makes the changes.
    let key = Principal {
        kind: usher_kit::principal::PrincipalKind::ApiKey,
        user_id: None,
        credential_id: Some(Uuid::new_v4().to_string()),
        ..a.admin.clone()
    };

    let mut demote = update(&supervisors.id, &["permissions"]);
    demote.permissions = vec!["users.read".into()];
    refused(
        RoleService::update_role(&test.api, request(&a.admin, demote.clone())).await,
        "PERMISSION_DENIED",
    );
    refused(
        RoleService::update_role(&test.api, request(&key, demote.clone())).await,
        "LAST_MANAGER",
    );
    refused(
        RoleService::delete_role(
            &test.api,
            request(&key, delete(supervisors_id, a.user_role)),
        )
        .await,
        "LAST_MANAGER",
    );
    let still = list_roles(&test, &a.admin, 0, "")
        .await
        .roles
        .into_iter()
        .find(|r| r.id == supervisors.id)
        .expect("role");
    assert!(still.manages_users);

    // With another active manager (on Admin) the change goes through.
    add_user(&test, a.account, a.admin_role, None, UserStatus::Active).await;
    let updated = RoleService::update_role(&test.api, request(&key, demote))
        .await
        .expect("demoted")
        .into_inner()
        .role
        .expect("role");
    assert!(!updated.manages_users);
    test.stop().await;
}

#[tokio::test]
async fn deleting_a_role_in_use_needs_a_reassignment() {
    let (test, _clock) = start().await;
    let a = tenant(&test, &[]).await;
    let clerks = create_role(&test, &a.admin, "Clerks", &["users.read", "users.invite"]).await;
    let clerks_id = Uuid::parse_str(&clerks.id).expect("uuid");
    let holders = [
        add_user(&test, a.account, clerks_id, None, UserStatus::Active).await,
        add_user(&test, a.account, clerks_id, None, UserStatus::Invited).await,
        add_user(&test, a.account, clerks_id, None, UserStatus::Inactive).await,
    ];

    for built_in in [a.admin_role, a.user_role] {
        refused(
            RoleService::delete_role(&test.api, request(&a.admin, delete(built_in, ""))).await,
            "BUILT_IN_ROLE",
        );
    }
    invalid(
        RoleService::delete_role(&test.api, request(&a.admin, delete("nope", ""))).await,
        "role_id",
    );
    invalid(
        RoleService::delete_role(&test.api, request(&a.admin, delete(clerks_id, "nope"))).await,
        "reassign_to_role_id",
    );
    invalid(
        RoleService::delete_role(&test.api, request(&a.admin, delete(clerks_id, clerks_id))).await,
        "reassign_to_role_id",
    );
    refused(
        RoleService::delete_role(&test.api, request(&a.admin, delete(Uuid::new_v4(), ""))).await,
        "NOT_FOUND",
    );
    refused(
        RoleService::delete_role(&test.api, request(&a.admin, delete(clerks_id, ""))).await,
        "ROLE_IN_USE",
    );
    refused(
        RoleService::delete_role(
            &test.api,
            request(&a.admin, delete(clerks_id, Uuid::new_v4())),
        )
        .await,
        "NOT_FOUND",
    );
    assert_eq!(
        user_row(&test, holders[0]).await.role_id,
        clerks_id,
        "nothing moved"
    );

    let before = outbox_keys(&test).await.len();
    let done =
        RoleService::delete_role(&test.api, request(&a.admin, delete(clerks_id, a.user_role)))
            .await
            .expect("deleted")
            .into_inner();
    assert_eq!(
        (done.role_id.as_str(), done.reassigned_user_count),
        (clerks.id.as_str(), 3)
    );
    for holder in holders {
        assert_eq!(user_row(&test, holder).await.role_id, a.user_role);
    }
    let snapshot = test
        .state
        .sessions
        .get_principal(holders[0])
        .await
        .expect("redis")
        .expect("snapshot");
    assert_eq!(snapshot.permissions, ["users.read"]);
    assert!(
        role::Entity::find_by_id(clerks_id)
            .one(&test.state.db)
            .await
            .expect("query")
            .is_none()
    );
    let keys = outbox_keys(&test).await;
    assert_eq!(
        keys[before..],
        [
            "user.updated",
            "user.updated",
            "user.updated",
            "role.deleted"
        ]
    );
    let deleted: Vec<events::RoleDeleted> = outbox_events(&test, "role.deleted").await;
    assert_eq!(deleted[0].reassigned_to_role_id, a.user_role.to_string());
    assert_eq!(deleted[0].reassigned_user_count, 3);
    let moved: Vec<events::UserUpdated> = outbox_events(&test, "user.updated").await;
    assert!(moved.iter().all(|e| e.role_id == a.user_role.to_string()));
    let entry = audit_rows(&test, a.account).await.pop().expect("entry");
    assert_eq!(
        (entry.action.as_str(), entry.target_name.as_str()),
        ("role.deleted", "Clerks")
    );
    assert_eq!(entry.details.expect("details")["reassigned_user_count"], 3);

    // An unused role goes without a reassignment (a given one is ignored).
    let unused = create_role(&test, &a.admin, "Unused", &[]).await;
    let done = RoleService::delete_role(
        &test.api,
        request(&a.admin, delete(&unused.id, Uuid::new_v4())),
    )
    .await
    .expect("deleted")
    .into_inner();
    assert_eq!(done.reassigned_user_count, 0);
    refused(
        RoleService::delete_role(&test.api, request(&a.admin, delete(&unused.id, ""))).await,
        "NOT_FOUND",
    );
    test.stop().await;
}

#[tokio::test]
async fn another_accounts_roles_answer_not_found() {
    let (test, _clock) = start().await;
    let a = tenant(&test, &[]).await;
    let b = tenant(&test, &[]).await;
    let a_role = create_role(&test, &a.admin, "Clerks", &["users.read"]).await;
    let a_role_id = Uuid::parse_str(&a_role.id).expect("uuid");
    add_user(&test, a.account, a_role_id, None, UserStatus::Active).await;
    let b_role = create_role(&test, &b.admin, "Clerks", &["users.read"]).await;
    add_user(
        &test,
        b.account,
        Uuid::parse_str(&b_role.id).expect("uuid"),
        None,
        UserStatus::Active,
    )
    .await;
    let before = outbox_keys(&test).await.len();

    let mut rename = update(&a_role.id, &["name"]);
    rename.name = "Hijacked".into();
    let foreign = refused(
        RoleService::update_role(&test.api, request(&b.admin, rename)).await,
        "NOT_FOUND",
    );
    let unknown = refused(
        RoleService::update_role(
            &test.api,
            request(
                &b.admin,
                update(&Uuid::new_v4().to_string(), &["description"]),
            ),
        )
        .await,
        "NOT_FOUND",
    );
    assert_eq!(
        (foreign.code(), foreign.message()),
        (unknown.code(), unknown.message()),
        "indistinguishable"
    );
    refused(
        RoleService::delete_role(&test.api, request(&b.admin, delete(a_role_id, b.user_role)))
            .await,
        "NOT_FOUND",
    );
    refused(
        RoleService::delete_role(&test.api, request(&b.admin, delete(a.admin_role, ""))).await,
        "NOT_FOUND",
    );
    // Reassigning B's users to A's role is refused the same way.
    refused(
        RoleService::delete_role(&test.api, request(&b.admin, delete(&b_role.id, a_role_id))).await,
        "NOT_FOUND",
    );

    let a_roles = list_roles(&test, &a.admin, 0, "").await.roles;
    assert!(a_roles.iter().all(|r| r.id != b_role.id));
    assert_eq!(
        a_roles
            .iter()
            .find(|r| r.id == a_role.id)
            .expect("kept")
            .name,
        "Clerks"
    );
    assert_eq!(outbox_keys(&test).await.len(), before, "nothing published");
    test.stop().await;
}
