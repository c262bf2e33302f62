//! Service tests of UserService: list, search, create, edit, bulk change,
//! deactivate, reactivate and delete users against PostgreSQL and Redis.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use prost_types::FieldMask;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryFilter, Set, Statement, TransactionTrait, sea_query::Expr,
};
use serde_json::json;
use tonic::{Code, Status};
use usher_identity::{
    api::{convert, validate::MAX_METADATA_BYTES},
    domain::users::{ListFilter, MAX_BATCH, SortKey, UserOrder},
    domain::{Origin, USERS_MANAGE, UserStatus},
    store::{
        accounts,
        entities::{role, team, user},
        users,
    },
    testing::{TestIdentity, admin_permissions, member, new_account_request, platform, request},
};
use usher_kit::{clock::ManualClock, principal::Principal, sessions::SessionMeta};
use usher_proto::identity::v1::{
    self as pb, account_service_server::AccountService, user_service_server::UserService,
};
use uuid::Uuid;

use crate::common::{fields, reason};

// -- harness ----------------------------------------------------------

/// An account created through AccountService, with its built-in roles.
#[derive(Clone, Debug)]
struct Acct {
    id: Uuid,
    owner: Uuid,
    admin_role: Uuid,
    user_role: Uuid,
}

impl Acct {
    fn owner(&self) -> Principal {
        member(self.id, self.owner, &admin_permissions())
    }

    /// An API key of the account holding every permission: an admin
    /// who is none of the users a test changes.
    fn key(&self) -> Principal {
        Principal {
            kind: usher_kit::principal::PrincipalKind::ApiKey,
            user_id: None,
            credential_id: Some(Uuid::new_v4().to_string()),
            ..self.owner()
        }
    }

    fn admin(&self, user: &pb::User) -> Principal {
        member(self.id, id_of(user), &admin_permissions())
    }
}

async fn start() -> TestIdentity {
    let clock = ManualClock::new(DateTime::from_timestamp(1_800_000_000, 0).expect("time"));
    TestIdentity::start(clock).await
}

async fn account_with(test: &TestIdentity, mut create: pb::CreateAccountRequest) -> Acct {
    create.owner_password = "correct horse battery".into();
    let created = AccountService::create_account(&test.api, request(&platform(), create))
        .await
        .expect("account")
        .into_inner();
    let id: Uuid = created.account.expect("account").id.parse().expect("uuid");
    let owner = id_of(&created.owner.expect("owner"));
    let roles = users::roles_of(&test.state.db, id).await.expect("roles");
    let named = |name: &str| {
        roles
            .values()
            .find(|r| r.name == name)
            .expect("built-in role")
            .id
    };
    Acct {
        id,
        owner,
        admin_role: named("Admin"),
        user_role: named("User"),
    }
}

async fn account(test: &TestIdentity, seats: i32) -> Acct {
    account_with(test, new_account_request(seats)).await
}

fn id_of(user: &pb::User) -> Uuid {
    user.id.parse().expect("uuid")
}

fn new_user(username: &str, email: &str, role: Uuid) -> pb::CreateUserRequest {
    pb::CreateUserRequest {
        username: username.into(),
        email: email.into(),
        display_name: format!("{username} name"),
        role_id: role.to_string(),
        ..Default::default()
    }
}

async fn create(
    test: &TestIdentity,
    caller: &Principal,
    message: pb::CreateUserRequest,
) -> Result<pb::User, Status> {
    UserService::create_user(&test.api, request(caller, message))
        .await
        .map(|r| r.into_inner().user.expect("user"))
}

/// A plain member (User role, email, no password: no hashing).
async fn member_user(test: &TestIdentity, acct: &Acct, username: &str) -> pb::User {
    create(
        test,
        &acct.owner(),
        new_user(
            username,
            &format!("{username}@acme.example"),
            acct.user_role,
        ),
    )
    .await
    .expect("member created")
}

/// An Admin with a password.
async fn admin_user(test: &TestIdentity, acct: &Acct, username: &str) -> pb::User {
    let mut message = new_user(
        username,
        &format!("{username}@acme.example"),
        acct.admin_role,
    );
    message.password = "a long enough password".into();
    create(test, &acct.owner(), message)
        .await
        .expect("admin created")
}

/// Makes the owner a plain member in the database, so that the admins
/// the test creates are the only managers (the owner's role cannot change
/// through the API).
async fn owner_not_a_manager(test: &TestIdentity, acct: &Acct) {
    user::Entity::update_many()
        .col_expr(user::Column::RoleId, Expr::val(acct.user_role))
        .filter(user::Column::Id.eq(acct.owner))
        .exec(&test.state.db)
        .await
        .expect("owner demoted");
}

/// An INVITED user, as the invitation service's reservation leaves it.
async fn invited(test: &TestIdentity, acct: &Acct, email: &str) -> Uuid {
    let id = Uuid::new_v4();
    let now = test.state.clock.now();
    let model = row(
        acct,
        id,
        "Invited Person",
        Some(email),
        None,
        acct.user_role,
        None,
        now,
    );
    let mut model = model.into_active_model();
    model.status = Set(UserStatus::Invited);
    model.origin = Set(Origin::Invitation);
    model.invitation_id = Set(Some(Uuid::new_v4()));
    model.insert(&test.state.db).await.expect("invited user");
    id
}

async fn make_team(test: &TestIdentity, acct: &Acct, name: &str) -> Uuid {
    let id = Uuid::new_v4();
    let now = test.state.clock.now();
    team::ActiveModel {
        id: Set(id),
        account_id: Set(acct.id),
        name: Set(name.into()),
        description: Set(String::new()),
        create_time: Set(now),
        update_time: Set(now),
    }
    .insert(&test.state.db)
    .await
    .expect("team");
    id
}

#[allow(clippy::too_many_arguments)]
fn row(
    acct: &Acct,
    id: Uuid,
    name: &str,
    email: Option<&str>,
    username: Option<&str>,
    role: Uuid,
    team: Option<Uuid>,
    created: DateTime<Utc>,
) -> user::Model {
    user::Model {
        id,
        account_id: acct.id,
        email: email.map(str::to_owned),
        email_canonical: email.map(str::to_lowercase),
        username: username.map(str::to_owned),
        display_name: name.into(),
        search_text: usher_identity::store::users::search_text(
            name,
            email.map(str::to_lowercase).as_deref(),
            username,
        ),
        status: UserStatus::Active,
        role_id: role,
        team_id: team,
        products: json!([]),
        locale: String::new(),
        metadata: None,
        owner: false,
        origin: Origin::Direct,
        password_hash: None,
        password_change_required: false,
        invitation_id: None,
        invited_by: None,
        create_time: created,
        update_time: created,
        activate_time: Some(created),
        deactivate_time: None,
        last_sign_in_time: None,
    }
}

async fn stored(test: &TestIdentity, id: Uuid) -> Option<user::Model> {
    user::Entity::find_by_id(id)
        .one(&test.state.db)
        .await
        .expect("query")
}

async fn audit_count(test: &TestIdentity, action: &str, target: Uuid) -> u64 {
    usher_identity::store::entities::audit_event::Entity::find()
        .filter(usher_identity::store::entities::audit_event::Column::Action.eq(action))
        .filter(
            usher_identity::store::entities::audit_event::Column::TargetId.eq(target.to_string()),
        )
        .count(&test.state.db)
        .await
        .expect("audit")
}

async fn events(test: &TestIdentity, routing_key: &str, subject: Uuid) -> i64 {
    let statement = Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT count(*) AS n FROM usher_outbox WHERE message->>'routing_key' = $1 \
         AND message->'headers'->>'cloudEvents_subject' = $2",
        [routing_key.into(), subject.to_string().into()],
    );
    let found = test
        .state
        .db
        .query_one_raw(statement)
        .await
        .expect("outbox")
        .expect("row");
    found.try_get::<i64>("", "n").expect("count")
}

async fn list(
    test: &TestIdentity,
    caller: &Principal,
    message: pb::ListUsersRequest,
) -> Result<pb::ListUsersResponse, Status> {
    UserService::list_users(&test.api, request(caller, message))
        .await
        .map(|r| r.into_inner())
}

async fn get(test: &TestIdentity, caller: &Principal, id: Uuid) -> Result<pb::User, Status> {
    UserService::get_user(
        &test.api,
        request(
            caller,
            pb::GetUserRequest {
                user_id: id.to_string(),
            },
        ),
    )
    .await
    .map(|r| r.into_inner().user.expect("user"))
}

async fn update(
    test: &TestIdentity,
    caller: &Principal,
    message: pb::UpdateUserRequest,
) -> Result<pb::User, Status> {
    UserService::update_user(&test.api, request(caller, message))
        .await
        .map(|r| r.into_inner().user.expect("user"))
}

fn set_role(user: Uuid, role: Uuid) -> pb::UpdateUserRequest {
    pb::UpdateUserRequest {
        user_id: user.to_string(),
        role_id: role.to_string(),
        update_mask: Some(FieldMask {
            paths: vec!["role_id".into()],
        }),
        ..Default::default()
    }
}

async fn batch(
    test: &TestIdentity,
    caller: &Principal,
    message: pb::BatchUpdateUsersRequest,
) -> Result<pb::BatchUpdateUsersResponse, Status> {
    UserService::batch_update_users(&test.api, request(caller, message))
        .await
        .map(|r| r.into_inner())
}

async fn deactivate(test: &TestIdentity, caller: &Principal, id: Uuid) -> Result<pb::User, Status> {
    UserService::deactivate_user(
        &test.api,
        request(
            caller,
            pb::DeactivateUserRequest {
                user_id: id.to_string(),
            },
        ),
    )
    .await
    .map(|r| r.into_inner().user.expect("user"))
}

async fn reactivate(test: &TestIdentity, caller: &Principal, id: Uuid) -> Result<pb::User, Status> {
    UserService::reactivate_user(
        &test.api,
        request(
            caller,
            pb::ReactivateUserRequest {
                user_id: id.to_string(),
            },
        ),
    )
    .await
    .map(|r| r.into_inner().user.expect("user"))
}

async fn delete(
    test: &TestIdentity,
    caller: &Principal,
    id: Uuid,
) -> Result<pb::DeleteUserResponse, Status> {
    UserService::delete_user(
        &test.api,
        request(
            caller,
            pb::DeleteUserRequest {
                user_id: id.to_string(),
            },
        ),
    )
    .await
    .map(|r| r.into_inner())
}

/// Every page of a listing, following the tokens.
async fn all_pages(
    test: &TestIdentity,
    caller: &Principal,
    mut message: pb::ListUsersRequest,
) -> (Vec<pb::User>, usize) {
    let mut users = Vec::new();
    let mut pages = 0;
    loop {
        let page = list(test, caller, message.clone()).await.expect("page");
        pages += 1;
        assert!(page.users.len() <= usize::try_from(message.page_size).expect("size"));
        users.extend(page.users);
        if page.next_page_token.is_empty() {
            return (users, pages);
        }
        message.page_token = page.next_page_token;
    }
}

// -- tests ------------------------------------------------------------

#[tokio::test]
async fn create_user_makes_an_active_direct_user_with_audit_event_and_snapshot() {
    let test = start().await;
    let acct = account(&test, 10).await;
    let mut message = new_user("Kiosk-01", "", acct.user_role);
    message.password = "shared device pass".into();
    message.require_password_change = true;
    message.locale = "FR".into();
    message.metadata = Some(convert::json_to_struct(&json!({"lines": ["+33 1 23"]})));
    let kiosk = create(&test, &acct.owner(), message)
        .await
        .expect("created");
    assert_eq!(kiosk.username, "kiosk-01");
    assert_eq!(kiosk.email, "");
    assert_eq!(kiosk.status, pb::UserStatus::Active as i32);
    assert_eq!(kiosk.origin, pb::UserOrigin::Direct as i32);
    assert_eq!(kiosk.role_name, "User");
    assert_eq!(kiosk.locale, "fr");
    assert!(kiosk.password_change_required);
    assert!(kiosk.activate_time.is_some());
    assert_eq!(
        kiosk.metadata.as_ref().map(convert::struct_to_json),
        Some(json!({"lines": ["+33 1 23"]}))
    );
    let row = stored(&test, id_of(&kiosk)).await.expect("row");
    assert!(
        row.password_hash
            .as_deref()
            .is_some_and(|h| h.starts_with("$argon2id$"))
    );
    assert_eq!(
        get(&test, &acct.owner(), id_of(&kiosk)).await.expect("get"),
        kiosk
    );
    assert_eq!(audit_count(&test, "user.created", id_of(&kiosk)).await, 1);
    assert_eq!(events(&test, "user.created", id_of(&kiosk)).await, 1);
    let snapshot = test
        .state
        .sessions
        .get_principal(id_of(&kiosk))
        .await
        .expect("redis")
        .expect("snapshot");
    assert_eq!(snapshot.permissions, vec!["users.read".to_owned()]);
    assert!(snapshot.password_change_required);

    // An email user without a password: stored canonical, no password yet.
    let jane = create(
        &test,
        &acct.owner(),
        new_user("jane", "  Jane.Doe@ACME.example ", acct.user_role),
    )
    .await
    .expect("email user");
    assert_eq!(jane.email, "jane.doe@acme.example");
    assert!(
        stored(&test, id_of(&jane))
            .await
            .expect("row")
            .password_hash
            .is_none()
    );
    test.stop().await;
}

#[tokio::test]
async fn create_user_refuses_bad_input_conflicts_and_missing_seats() {
    let test = start().await;
    let mut with_domains = new_account_request(4);
    with_domains.allowed_email_domains = vec!["acme.example".into()];
    let acct = account_with(&test, with_domains).await;
    let other = account(&test, 5).await;
    let owner = acct.owner();

    let cases = [
        (new_user("ab", "", acct.user_role), "username"),
        (
            new_user("has space", "x@acme.example", acct.user_role),
            "username",
        ),
        (new_user("okname", "not-an-email", acct.user_role), "email"),
        (new_user("okname", "", acct.user_role), "password"),
        (
            new_user("okname", "admin@acme.example", acct.admin_role),
            "password",
        ),
        (
            pb::CreateUserRequest {
                password: "short".into(),
                ..new_user("okname", "", acct.user_role)
            },
            "password",
        ),
        (
            pb::CreateUserRequest {
                role_id: "nope".into(),
                ..new_user("okname", "o@acme.example", acct.user_role)
            },
            "role_id",
        ),
        (
            pb::CreateUserRequest {
                display_name: " ".into(),
                ..new_user("okname", "o@acme.example", acct.user_role)
            },
            "display_name",
        ),
        (
            pb::CreateUserRequest {
                locale: "de".into(),
                ..new_user("okname", "o@acme.example", acct.user_role)
            },
            "locale",
        ),
        (
            pb::CreateUserRequest {
                metadata: Some(convert::json_to_struct(
                    &json!({"blob": "x".repeat(MAX_METADATA_BYTES)}),
                )),
                ..new_user("okname", "o@acme.example", acct.user_role)
            },
            "metadata",
        ),
    ];
    for (message, field) in cases {
        let err = create(&test, &owner, message).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert_eq!(fields(&err), vec![field.to_owned()], "{field}");
    }

    let not_found = [
        new_user("okname", "o@acme.example", other.user_role),
        new_user("okname", "o@acme.example", Uuid::new_v4()),
        pb::CreateUserRequest {
            team_id: Uuid::new_v4().to_string(),
            ..new_user("okname", "o@acme.example", acct.user_role)
        },
    ];
    for message in not_found {
        assert_eq!(
            reason(&create(&test, &owner, message).await.expect_err("not found")),
            "NOT_FOUND"
        );
    }
    let product = pb::CreateUserRequest {
        products: vec!["meter".into()],
        ..new_user("okname", "o@acme.example", acct.user_role)
    };
    assert_eq!(
        reason(&create(&test, &owner, product).await.expect_err("product")),
        "PRODUCT_NOT_ENABLED"
    );
    let domain = new_user("okname", "o@elsewhere.example", acct.user_role);
    assert_eq!(
        reason(&create(&test, &owner, domain).await.expect_err("domain")),
        "DOMAIN_NOT_ALLOWED"
    );

    member_user(&test, &acct, "taken").await;
    invited(&test, &acct, "pending@acme.example").await;
    for message in [
        new_user("TAKEN", "fresh@acme.example", acct.user_role),
        new_user("fresh", "Taken@ACME.example", acct.user_role),
        new_user("fresh", "PENDING@acme.example", acct.user_role),
    ] {
        let err = create(&test, &owner, message).await.expect_err("conflict");
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::AlreadyExists, "ALREADY_EXISTS")
        );
    }
    // Owner + taken + pending = 3 of 4 seats.
    member_user(&test, &acct, "last-seat").await;
    let err = create(&test, &owner, new_user("one-too-many", "", acct.user_role))
        .await
        .expect_err("full");
    assert_eq!(reason(&err), "INVALID_ARGUMENT", "validation comes first");
    let err = member_user_result(&test, &acct, "one-too-many")
        .await
        .expect_err("full");
    assert_eq!(reason(&err), "SEAT_LIMIT_REACHED");

    let single = account(&test, 1).await;
    let err = member_user_result(&test, &single, "solo")
        .await
        .expect_err("single");
    assert_eq!(reason(&err), "SINGLE_USER_PLAN");
    test.stop().await;
}

async fn member_user_result(
    test: &TestIdentity,
    acct: &Acct,
    username: &str,
) -> Result<pb::User, Status> {
    create(
        test,
        &acct.owner(),
        new_user(
            username,
            &format!("{username}@acme.example"),
            acct.user_role,
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_user_is_idempotent_per_request_id() {
    let test = start().await;
    let acct = account(&test, 10).await;
    let message = pb::CreateUserRequest {
        request_id: "create-1".into(),
        ..new_user("idem", "idem@acme.example", acct.user_role)
    };
    let first = create(&test, &acct.owner(), message.clone())
        .await
        .expect("first");
    let again = create(&test, &acct.owner(), message.clone())
        .await
        .expect("retry");
    assert_eq!(first, again);
    let changed = pb::CreateUserRequest {
        display_name: "Someone else".into(),
        ..message
    };
    let err = create(&test, &acct.owner(), changed)
        .await
        .expect_err("conflict");
    assert_eq!(reason(&err), "IDEMPOTENCY_CONFLICT");

    // Two identical retries at once: one user, the same answer twice.
    let message = pb::CreateUserRequest {
        request_id: "create-2".into(),
        ..new_user("racer", "racer@acme.example", acct.user_role)
    };
    let calls = (0..2).map(|_| {
        let api = test.api.clone();
        let caller = acct.owner();
        let message = message.clone();
        tokio::spawn(async move { UserService::create_user(&api, request(&caller, message)).await })
    });
    let mut ids = BTreeSet::new();
    for call in calls.collect::<Vec<_>>() {
        ids.insert(
            call.await
                .expect("task")
                .expect("created")
                .into_inner()
                .user
                .expect("user")
                .id,
        );
    }
    assert_eq!(ids.len(), 1);
    let users = user::Entity::find()
        .filter(user::Column::AccountId.eq(acct.id))
        .count(&test.state.db)
        .await
        .expect("count");
    assert_eq!(users, 3);
    test.stop().await;
}

#[tokio::test]
async fn create_user_keys_are_per_caller_and_never_cut() {
    let test = start().await;
    let acct = account(&test, 10).await;
    let other_admin = admin_user(&test, &acct, "second-admin").await;
    // The same request_id from two callers: two calls, two users.
    let ada = create(
        &test,
        &acct.owner(),
        pb::CreateUserRequest {
            request_id: "shared-key".into(),
            ..new_user("ada", "ada@acme.example", acct.user_role)
        },
    )
    .await
    .expect("the owner's call");
    let bob = create(
        &test,
        &acct.admin(&other_admin),
        pb::CreateUserRequest {
            request_id: "shared-key".into(),
            ..new_user("bob", "bob@acme.example", acct.user_role)
        },
    )
    .await
    .expect("another caller's call is not a conflict");
    assert_ne!(ada.id, bob.id);
    // Each caller's retry replays its own answer.
    let again = create(
        &test,
        &acct.admin(&other_admin),
        pb::CreateUserRequest {
            request_id: "shared-key".into(),
            ..new_user("bob", "bob@acme.example", acct.user_role)
        },
    )
    .await
    .expect("replayed");
    assert_eq!(again, bob);

    // Too long a request_id is refused, not cut (its first 128
    // characters would otherwise replay another call).
    let long = format!("{}-tail", "k".repeat(128));
    let err = create(
        &test,
        &acct.owner(),
        pb::CreateUserRequest {
            request_id: long,
            ..new_user("carol", "carol@acme.example", acct.user_role)
        },
    )
    .await
    .expect_err("too long");
    assert_eq!(fields(&err), ["request_id"]);
    test.stop().await;
}

#[tokio::test]
async fn control_characters_in_text_are_invalid_arguments_and_store_nothing() {
    let test = start().await;
    let acct = account(&test, 10).await;
    let nul = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue("a\0b".into())),
    };
    let message = pb::CreateUserRequest {
        request_id: "nul\0key".into(),
        metadata: Some(prost_types::Struct {
            fields: [("line".to_owned(), nul)].into(),
        }),
        ..new_user("nul", "nul@acme.example", acct.user_role)
    };
    let err = create(&test, &acct.owner(), message)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(fields(&err), ["request_id", "metadata.line"]);
    let err = UserService::list_users(
        &test.api,
        request(
            &acct.owner(),
            pb::ListUsersRequest {
                query: "ad\0a".into(),
                ..Default::default()
            },
        ),
    )
    .await
    .expect_err("refused");
    assert_eq!(fields(&err), ["query"]);
    let users = user::Entity::find()
        .filter(user::Column::AccountId.eq(acct.id))
        .count(&test.state.db)
        .await
        .expect("count");
    assert_eq!(users, 1, "only the owner");
    test.stop().await;
}

#[tokio::test]
async fn update_user_changes_only_masked_fields_and_protects_the_owner() {
    let test = start().await;
    let mut create_account = new_account_request(10);
    create_account.products = Vec::new();
    let acct = account(&test, 10).await;
    let owner = acct.owner();
    let team = make_team(&test, &acct, "Night shift").await;
    let user = member_user(&test, &acct, "mallory").await;
    let id = id_of(&user);

    // P15: role and locale are in the message but not in the mask.
    let renamed = update(
        &test,
        &owner,
        pb::UpdateUserRequest {
            user_id: id.to_string(),
            display_name: "Mallory Renamed".into(),
            role_id: acct.admin_role.to_string(),
            locale: "fr".into(),
            update_mask: Some(FieldMask {
                paths: vec!["display_name".into()],
            }),
            ..Default::default()
        },
    )
    .await
    .expect("renamed");
    assert_eq!(renamed.display_name, "Mallory Renamed");
    assert_eq!(
        (renamed.role_id.as_str(), renamed.locale.as_str()),
        (user.role_id.as_str(), "")
    );
    let row = stored(&test, id).await.expect("row");
    assert!(str::contains(&row.search_text, "mallory renamed"));
    assert_eq!(audit_count(&test, "user.updated", id).await, 1);
    assert_eq!(events(&test, "user.updated", id).await, 1);

    // Role and team; the snapshot follows the role at once.
    test.state
        .sessions
        .delete_principal(id)
        .await
        .expect("redis");
    let promoted = update(
        &test,
        &owner,
        pb::UpdateUserRequest {
            team_id: team.to_string(),
            update_mask: Some(FieldMask {
                paths: vec!["role_id".into(), "team_id".into()],
            }),
            ..set_role(id, acct.admin_role)
        },
    )
    .await
    .expect("promoted");
    assert_eq!(
        (promoted.role_name.as_str(), promoted.team_name.as_str()),
        ("Admin", "Night shift")
    );
    let snapshot = test
        .state
        .sessions
        .get_principal(id)
        .await
        .expect("redis")
        .expect("snapshot");
    assert!(snapshot.permissions.iter().any(|p| p == USERS_MANAGE));
    update(&test, &owner, set_role(id, acct.user_role))
        .await
        .expect("demoted");
    let snapshot = test
        .state
        .sessions
        .get_principal(id)
        .await
        .expect("redis")
        .expect("snapshot");
    assert!(
        !snapshot.permissions.iter().any(|p| p == USERS_MANAGE),
        "the demotion applies on the next call"
    );
    let left_team = update(
        &test,
        &owner,
        pb::UpdateUserRequest {
            user_id: id.to_string(),
            update_mask: Some(FieldMask {
                paths: vec!["team_id".into()],
            }),
            ..Default::default()
        },
    )
    .await
    .expect("left team");
    assert_eq!(
        (left_team.team_id.as_str(), left_team.team_name.as_str()),
        ("", "")
    );

    // Bad masks and values.
    for (message, field) in [
        (
            pb::UpdateUserRequest {
                user_id: id.to_string(),
                ..Default::default()
            },
            "update_mask",
        ),
        (
            pb::UpdateUserRequest {
                user_id: id.to_string(),
                update_mask: Some(FieldMask {
                    paths: vec!["status".into()],
                }),
                ..Default::default()
            },
            "update_mask.paths[0]",
        ),
        (
            pb::UpdateUserRequest {
                user_id: id.to_string(),
                update_mask: Some(FieldMask {
                    paths: vec!["display_name".into()],
                }),
                ..Default::default()
            },
            "display_name",
        ),
        (
            pb::UpdateUserRequest {
                user_id: "x".into(),
                ..set_role(id, acct.user_role)
            },
            "user_id",
        ),
    ] {
        let err = update(&test, &owner, message).await.expect_err(field);
        assert_eq!(fields(&err), vec![field.to_owned()]);
    }
    let products = pb::UpdateUserRequest {
        user_id: id.to_string(),
        products: vec!["meter".into()],
        update_mask: Some(FieldMask {
            paths: vec!["products".into()],
        }),
        ..Default::default()
    };
    assert_eq!(
        reason(&update(&test, &owner, products).await.expect_err("product")),
        "PRODUCT_NOT_ENABLED"
    );
    assert_eq!(
        reason(
            &update(&test, &owner, set_role(Uuid::new_v4(), acct.user_role))
                .await
                .expect_err("user")
        ),
        "NOT_FOUND"
    );
    assert_eq!(
        reason(
            &update(&test, &owner, set_role(id, Uuid::new_v4()))
                .await
                .expect_err("role")
        ),
        "NOT_FOUND"
    );

    // INVITED users are changed through their invitation.
    let pending = invited(&test, &acct, "pending@acme.example").await;
    assert_eq!(
        reason(
            &update(&test, &owner, set_role(pending, acct.admin_role))
                .await
                .expect_err("invited")
        ),
        "INVALID_STATE"
    );

    // The owner: only the owner edits the owner, and never its role.
    let other_admin = admin_user(&test, &acct, "second-admin").await;
    let rename_owner = pb::UpdateUserRequest {
        user_id: acct.owner.to_string(),
        display_name: "Hijacked".into(),
        update_mask: Some(FieldMask {
            paths: vec!["display_name".into()],
        }),
        ..Default::default()
    };
    let err = update(&test, &acct.admin(&other_admin), rename_owner.clone())
        .await
        .expect_err("protected");
    assert_eq!(reason(&err), "OWNER_PROTECTED");
    assert_eq!(
        update(&test, &owner, rename_owner)
            .await
            .expect("own name")
            .display_name,
        "Hijacked"
    );
    let err = update(&test, &owner, set_role(acct.owner, acct.user_role))
        .await
        .expect_err("own role");
    assert_eq!(reason(&err), "OWNER_PROTECTED");
    test.stop().await;
}

#[tokio::test]
async fn later_pages_carry_the_first_pages_count_instead_of_counting_again() {
    let test = start().await;
    let acct = account(&test, 100).await;
    let owner = acct.owner();
    let insert = |from: usize, to: usize| {
        let now = test.state.clock.now();
        let rows: Vec<user::ActiveModel> = (from..to)
            .map(|i| {
                row(
                    &acct,
                    Uuid::new_v4(),
                    &format!("Member {i:02}"),
                    Some(&format!("m{i:02}@acme.example")),
                    None,
                    acct.user_role,
                    None,
                    now,
                )
                .into_active_model()
            })
            .collect();
        user::Entity::insert_many(rows).exec(&test.state.db)
    };
    insert(0, 10).await.expect("members");
    let message = pb::ListUsersRequest {
        page_size: 4,
        ..Default::default()
    };
    let first = list(&test, &owner, message.clone()).await.expect("page");
    assert_eq!(first.total_size, 11, "ten members and the owner");
    assert!(!first.total_size_capped, "11 is the exact count");
    // Two more arrive while the caller pages.
    insert(10, 12).await.expect("more");
    let second = list(
        &test,
        &owner,
        pb::ListUsersRequest {
            page_token: first.next_page_token.clone(),
            ..message.clone()
        },
    )
    .await
    .expect("page 2");
    assert_eq!(second.total_size, 11, "the listing's count, not a recount");
    let fresh = list(&test, &owner, message).await.expect("page 1 again");
    assert_eq!(fresh.total_size, 13, "a new listing counts again");
    test.stop().await;
}

#[tokio::test]
async fn a_first_page_answers_its_own_rows_with_the_count_of_its_walk() {
    let test = start().await;
    let acct = account(&test, 100).await;
    bench_like_users(&test, &acct, 30).await;
    let filter = |term: &str| ListFilter {
        account_id: acct.id,
        status: None,
        role_id: None,
        team_id: None,
        term: term.into(),
    };
    let db = &test.state.db;
    let first = |term: &'static str, order: UserOrder| {
        let filter = filter(term);
        async move {
            users::page(db, &filter, order, None, 5, Some(10))
                .await
                .expect("page")
                .expect("no cursor")
        }
    };
    // 30 others match (the owner is never among them): the walk stops
    // after cap + 1 = 11 of them, and only the 5 asked for are answered,
    // each with its row and role name.
    let listed = first("", UserOrder::DisplayName).await;
    assert_eq!(listed.matched, 11, "counted up to the cap and one more");
    let names: Vec<_> = listed
        .users
        .iter()
        .map(|(key, row)| {
            assert_eq!(key.id, row.user.id, "each key with its own row");
            assert_eq!(row.role_name, "User");
            row.user.display_name.clone()
        })
        .collect();
    assert_eq!(
        names,
        [
            "Person 0000001",
            "Person 0000002",
            "Person 0000003",
            "Person 0000004",
            "Person 0000005"
        ],
        "the first five in name order"
    );
    // Fewer matches than the cap: the exact count; the newest order too.
    let listed = first("son 000001", UserOrder::Newest).await;
    assert_eq!(
        (listed.users.len(), listed.matched),
        (5, 10),
        "Person 0000010…0000019"
    );
    let listed = first("nobody", UserOrder::Email).await;
    assert_eq!((listed.users.len(), listed.matched), (0, 0));
    // A later page (a cursor, no count) goes on after the last key, as one
    // longer page would.
    let ids = |listed: &users::ListedPage| -> Vec<Uuid> {
        listed.users.iter().map(|(key, _)| key.id).collect()
    };
    let page = |after: Option<(SortKey, Uuid)>, limit: u64| {
        let filter = filter("");
        async move {
            users::page(db, &filter, UserOrder::Email, after.as_ref(), limit, None)
                .await
                .expect("page")
                .expect("a cursor of this order")
        }
    };
    let eight = page(None, 8).await;
    let five = page(None, 5).await;
    let next = page(Some(listed_key(&five)), 3).await;
    assert_eq!([ids(&five), ids(&next)].concat(), ids(&eight));
    assert_eq!(next.matched, 0, "not counted");
    test.stop().await;
}

/// The cursor after the last user of `listed`, in email order.
fn listed_key(listed: &users::ListedPage) -> (SortKey, Uuid) {
    listed.users.last().expect("a user").0.key(UserOrder::Email)
}

/// Inserts `n` users "Person 0000001"… with emails p1@bench.example…, the
/// shape of the benchmark's big account.
async fn bench_like_users(test: &TestIdentity, acct: &Acct, n: usize) {
    let now = test.state.clock.now();
    let rows: Vec<user::ActiveModel> = (1..=n)
        .map(|g| {
            row(
                acct,
                Uuid::new_v4(),
                &format!("Person {g:07}"),
                Some(&format!("p{g}@bench.example")),
                None,
                acct.user_role,
                None,
                now,
            )
            .into_active_model()
        })
        .collect();
    for chunk in rows.chunks(500) {
        user::Entity::insert_many(chunk.to_vec())
            .exec(&test.state.db)
            .await
            .expect("users");
    }
}

#[tokio::test]
async fn a_listing_counts_up_to_a_thousand_and_says_when_more_match() {
    let test = start().await;
    let acct = account(&test, 5_000).await;
    let owner = acct.owner();
    bench_like_users(&test, &acct, 1_000).await;
    let message = pb::ListUsersRequest {
        page_size: 50,
        ..Default::default()
    };
    // 1,001 match (the owner and 1,000 others): more than are counted.
    let first = list(&test, &owner, message.clone()).await.expect("page 1");
    assert_eq!(first.users.len(), 50);
    assert_eq!(
        (first.total_size, first.total_size_capped),
        (1_000, true),
        "1,000 and more"
    );
    let second = list(
        &test,
        &owner,
        pb::ListUsersRequest {
            page_token: first.next_page_token.clone(),
            ..message.clone()
        },
    )
    .await
    .expect("page 2");
    assert_eq!((second.total_size, second.total_size_capped), (1_000, true));
    assert_eq!(second.users[0].display_name, "Person 0000050");
    // The cap changes the count only: every user is still listed once.
    let (everyone, _) = all_pages(
        &test,
        &owner,
        pb::ListUsersRequest {
            page_size: 500,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(everyone.len(), 1_001);
    // Exactly 1,000 matches is the exact count, not "more".
    let search = |query: &str| pb::ListUsersRequest {
        query: query.into(),
        ..message.clone()
    };
    let exact = list(&test, &owner, search("person")).await.expect("search");
    assert_eq!((exact.total_size, exact.total_size_capped), (1_000, false));
    // Fewer: the exact count.
    let few = list(&test, &owner, search("son 000005"))
        .await
        .expect("search");
    assert_eq!((few.total_size, few.total_size_capped), (10, false));
    assert_eq!(few.users.len(), 10);
    // A page of one: the owner alone, then the others from the first.
    let one = list(
        &test,
        &owner,
        pb::ListUsersRequest {
            page_size: 1,
            ..Default::default()
        },
    )
    .await
    .expect("page of one");
    assert!(one.users[0].owner);
    let next = list(
        &test,
        &owner,
        pb::ListUsersRequest {
            page_size: 1,
            page_token: one.next_page_token,
            ..Default::default()
        },
    )
    .await
    .expect("second page of one");
    assert_eq!(next.users[0].display_name, "Person 0000001");
    assert_eq!((next.total_size, next.total_size_capped), (1_000, true));
    test.stop().await;
}

#[tokio::test]
async fn page_tokens_made_before_the_cap_keep_working() {
    let test = start().await;
    let acct = account(&test, 5_000).await;
    let owner = acct.owner();
    bench_like_users(&test, &acct, 1_000).await;
    let message = pb::ListUsersRequest {
        page_size: 50,
        ..Default::default()
    };
    let first = list(&test, &owner, message.clone()).await.expect("page 1");
    // The same cursor as tokens were written before the cap: with the
    // exact count and no `capped`, or (older still) with no count at all.
    let fingerprint = usher_kit::pagination::fingerprint(&(
        acct.id,
        None::<&str>,
        None::<Uuid>,
        None::<Uuid>,
        "",
        0i32,
    ));
    let cursor: serde_json::Value =
        usher_kit::pagination::decode_token(&fingerprint, &first.next_page_token)
            .expect("decodes")
            .expect("a cursor");
    assert_eq!(
        cursor["capped"], true,
        "the test builds the right fingerprint"
    );
    let mut exact = cursor.clone();
    exact["total"] = json!(1_001);
    exact.as_object_mut().expect("object").remove("capped");
    let mut uncounted = exact.clone();
    uncounted.as_object_mut().expect("object").remove("total");
    for (old, expected) in [(exact, (1_001, false)), (uncounted, (1_000, true))] {
        let page = list(
            &test,
            &owner,
            pb::ListUsersRequest {
                page_token: usher_kit::pagination::encode_token(&fingerprint, &old),
                ..message.clone()
            },
        )
        .await
        .expect("an older token");
        assert_eq!(page.users[0].display_name, "Person 0000050");
        assert_eq!((page.total_size, page.total_size_capped), expected);
    }
    test.stop().await;
}

#[tokio::test]
async fn search_finds_terms_with_at_signs_digits_and_spaces() {
    let test = start().await;
    let acct = account(&test, 5_000).await;
    let owner = acct.owner();
    bench_like_users(&test, &acct, 300).await;
    let names = |page: &pb::ListUsersResponse| -> Vec<String> {
        page.users.iter().map(|u| u.display_name.clone()).collect()
    };
    let search = |query: &str| pb::ListUsersRequest {
        query: query.into(),
        page_size: 500,
        ..Default::default()
    };
    for (query, expected) in [
        // An email's local part and `@`: p12@, not p120@ or p212@.
        ("P12@", vec!["Person 0000012".to_owned()]),
        ("p300@bench", vec!["Person 0000300".to_owned()]),
        // Digits only.
        ("0000123", vec!["Person 0000123".to_owned()]),
        // Across a space, as in the benchmark's "son 001".
        (
            "son 000001",
            (10..=19).map(|g| format!("Person {g:07}")).collect(),
        ),
        ("person 0000299 p299@", vec!["Person 0000299".to_owned()]),
    ] {
        let page = list(&test, &owner, search(query)).await.expect("search");
        assert_eq!(names(&page), expected, "query {query}");
        assert_eq!(
            (page.total_size, page.total_size_capped),
            (i32::try_from(expected.len()).expect("small"), false),
            "query {query}"
        );
    }
    // The owner, found by its name or email in any case, first; a term of
    // both the owner and members lists the owner, then the members.
    for query in ["OLIVE OW", "owner@acme.ex"] {
        let page = list(&test, &owner, search(query)).await.expect("search");
        assert_eq!(names(&page), ["Olive Owner"], "query {query}");
        assert_eq!(page.total_size, 1, "query {query}");
    }
    let page = list(&test, &owner, search(".example"))
        .await
        .expect("search");
    assert_eq!(page.total_size, 301);
    assert_eq!(names(&page)[..2], ["Olive Owner", "Person 0000001"]);
    // A term all 300 hold (the owner does not), in pages: all, in order.
    let message = pb::ListUsersRequest {
        query: "@bench.example".into(),
        page_size: 7,
        ..Default::default()
    };
    let (found, _) = all_pages(&test, &owner, message).await;
    let want: Vec<String> = (1..=300).map(|g| format!("Person {g:07}")).collect();
    assert_eq!(
        found
            .iter()
            .map(|u| u.display_name.clone())
            .collect::<Vec<_>>(),
        want
    );
    test.stop().await;
}

#[tokio::test]
async fn the_search_index_keeps_a_short_pending_list() {
    let test = start().await;
    let found = test
        .state
        .db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT array_to_string(reloptions, ',') AS options FROM pg_class WHERE relname = 'users_search_trgm'",
        ))
        .await
        .expect("query")
        .expect("the index");
    let options: Option<String> = found.try_get("", "options").expect("options");
    assert_eq!(options.as_deref(), Some("gin_pending_list_limit=64"));
    test.stop().await;
}

#[tokio::test]
async fn the_last_active_manager_cannot_be_demoted_deactivated_or_deleted() {
    let test = start().await;
    let acct = account(&test, 10).await;
    let alice = admin_user(&test, &acct, "alice").await;
    owner_not_a_manager(&test, &acct).await;
    let as_alice = acct.admin(&alice);
    // Alice may not change her own role at all (P26); an admin's key
    // demotes her.
    let key = acct.key();
    let id = id_of(&alice);
    assert_eq!(
        reason(
            &update(&test, &key, set_role(id, acct.user_role))
                .await
                .expect_err("demote")
        ),
        "LAST_MANAGER"
    );
    assert_eq!(
        reason(
            &deactivate(&test, &as_alice, id)
                .await
                .expect_err("deactivate")
        ),
        "LAST_MANAGER"
    );
    assert_eq!(
        reason(&delete(&test, &as_alice, id).await.expect_err("delete")),
        "LAST_MANAGER"
    );
    // An inactive admin does not count.
    let bob = admin_user(&test, &acct, "bob").await;
    deactivate(&test, &as_alice, id_of(&bob))
        .await
        .expect("bob deactivated");
    assert_eq!(
        reason(
            &update(&test, &key, set_role(id, acct.user_role))
                .await
                .expect_err("demote")
        ),
        "LAST_MANAGER"
    );
    reactivate(&test, &as_alice, id_of(&bob))
        .await
        .expect("bob back");
    assert_eq!(
        reason(
            &update(&test, &as_alice, set_role(id, acct.user_role))
                .await
                .expect_err("her own role")
        ),
        "PERMISSION_DENIED"
    );
    update(&test, &key, set_role(id, acct.user_role))
        .await
        .expect("now alice may go");
    assert_eq!(
        stored(&test, id).await.expect("row").role_id,
        acct.user_role
    );
    test.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_admins_demoting_each_other_at_once_never_both_succeed() {
    let test = start().await;
    let acct = account(&test, 10).await;
    let alice = id_of(&admin_user(&test, &acct, "alice").await);
    let bob = id_of(&admin_user(&test, &acct, "bob").await);
    owner_not_a_manager(&test, &acct).await;
    for round in 0..20 {
        let demote = |actor: Uuid, target: Uuid| {
            let api = test.api.clone();
            let caller = member(acct.id, actor, &admin_permissions());
            let message = set_role(target, acct.user_role);
            tokio::spawn(
                async move { UserService::update_user(&api, request(&caller, message)).await },
            )
        };
        let (a, b) = (demote(alice, bob), demote(bob, alice));
        let outcomes = [a.await.expect("task"), b.await.expect("task")];
        let won: Vec<_> = outcomes.iter().filter(|o| o.is_ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: exactly one demotion wins");
        let lost = outcomes
            .iter()
            .find_map(|o| o.as_ref().err())
            .expect("one refused");
        assert_eq!(reason(lost), "LAST_MANAGER", "round {round}");
        let roles = users::roles_of(&test.state.db, acct.id)
            .await
            .expect("roles");
        assert_eq!(
            users::count_managers(&test.state.db, acct.id, &roles)
                .await
                .expect("count"),
            1,
            "round {round}"
        );
        // The survivor promotes the other back for the next round.
        let survivor = if stored(&test, alice).await.expect("row").role_id == acct.admin_role {
            alice
        } else {
            bob
        };
        let demoted = if survivor == alice { bob } else { alice };
        update(
            &test,
            &member(acct.id, survivor, &admin_permissions()),
            set_role(demoted, acct.admin_role),
        )
        .await
        .expect("promoted back");
    }
    test.stop().await;
}

/// A custom role of `acct` holding `permissions`, written directly.
async fn custom_role(test: &TestIdentity, acct: &Acct, name: &str, permissions: &[&str]) -> Uuid {
    let now = test.state.clock.now();
    role::ActiveModel {
        id: Set(Uuid::new_v4()),
        account_id: Set(acct.id),
        name: Set(name.into()),
        description: Set(String::new()),
        permissions: Set(convert::json_strings(
            permissions
                .iter()
                .map(|p| (*p).to_owned())
                .collect::<Vec<_>>(),
        )),
        built_in: Set(false),
        create_time: Set(now),
        update_time: Set(now),
    }
    .insert(&test.state.db)
    .await
    .expect("role")
    .id
}

#[tokio::test]
async fn a_manager_grants_no_role_beyond_its_own_and_never_changes_its_own() {
    let test = start().await;
    let acct = account(&test, 20).await;
    // A manager whose role holds users.read + users.manage only.
    let managers = custom_role(&test, &acct, "Managers", &["users.read", "users.manage"]).await;
    let mut message = new_user("max", "max@acme.example", managers);
    message.password = "a long enough passphrase".into();
    let max = id_of(&create(&test, &acct.owner(), message).await.expect("max"));
    let as_max = member(acct.id, max, &["users.read", "users.manage"]);
    let carol = id_of(&member_user(&test, &acct, "carol").await);
    let dave = id_of(&member_user(&test, &acct, "dave").await);
    let users_before = user::Entity::find()
        .count(&test.state.db)
        .await
        .expect("count");

    // CreateUser with the Admin role: refused, nothing written.
    let mut admin = new_user("eve", "eve@acme.example", acct.admin_role);
    admin.password = "a long enough passphrase".into();
    let err = create(&test, &as_max, admin.clone())
        .await
        .expect_err("admin");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(reason(&err), "PERMISSION_DENIED");
    assert_eq!(
        user::Entity::find()
            .count(&test.state.db)
            .await
            .expect("count"),
        users_before
    );
    // Within the manager's permissions: its own role, or User.
    admin.role_id = managers.to_string();
    create(&test, &as_max, admin).await.expect("a role within");
    create(
        &test,
        &as_max,
        new_user("fay", "fay@acme.example", acct.user_role),
    )
    .await
    .expect("User");

    // UpdateUser: itself to Admin, or even down to User; others to Admin.
    for role in [acct.admin_role, acct.user_role] {
        let err = update(&test, &as_max, set_role(max, role))
            .await
            .expect_err("its own role");
        assert_eq!(reason(&err), "PERMISSION_DENIED");
    }
    assert_eq!(stored(&test, max).await.expect("row").role_id, managers);
    let err = update(&test, &as_max, set_role(carol, acct.admin_role))
        .await
        .expect_err("promote carol");
    assert_eq!(reason(&err), "PERMISSION_DENIED");
    assert_eq!(
        stored(&test, carol).await.expect("row").role_id,
        acct.user_role
    );
    // Its own role named unchanged with other details is no change.
    let mut rename = set_role(max, managers);
    rename.display_name = "Max M".into();
    rename.update_mask = Some(FieldMask {
        paths: vec!["role_id".into(), "display_name".into()],
    });
    update(&test, &as_max, rename).await.expect("details");
    update(&test, &as_max, set_role(carol, managers))
        .await
        .expect("a role within");

    // BatchUpdateUsers: a verdict per item.
    let to = |role: Uuid, ids: &[Uuid]| pb::BatchUpdateUsersRequest {
        user_ids: ids.iter().map(Uuid::to_string).collect(),
        role_id: role.to_string(),
        update_mask: Some(FieldMask {
            paths: vec!["role_id".into()],
        }),
        ..Default::default()
    };
    let done = batch(&test, &as_max, to(acct.admin_role, &[dave, max, carol]))
        .await
        .expect("batch");
    let reasons: Vec<&str> = done
        .results
        .iter()
        .map(|r| r.error.as_ref().map_or("", |e| e.reason.as_str()))
        .collect();
    assert_eq!(reasons, ["PERMISSION_DENIED"; 3]);
    assert_eq!((done.updated_count, done.failed_count), (0, 3));
    let done = batch(&test, &as_max, to(acct.user_role, &[carol, max, dave]))
        .await
        .expect("batch");
    let reasons: Vec<&str> = done
        .results
        .iter()
        .map(|r| r.error.as_ref().map_or("", |e| e.reason.as_str()))
        .collect();
    assert_eq!(reasons, ["", "PERMISSION_DENIED", ""]);
    for (id, role) in [
        (max, managers),
        (carol, acct.user_role),
        (dave, acct.user_role),
    ] {
        assert_eq!(stored(&test, id).await.expect("row").role_id, role);
    }

    // An API key holding users.manage alone cannot hand out users.read.
    let key = Principal {
        kind: usher_kit::principal::PrincipalKind::ApiKey,
        user_id: None,
        credential_id: Some(Uuid::new_v4().to_string()),
        ..member(acct.id, max, &["users.manage"])
    };
    let err = create(
        &test,
        &key,
        new_user("gus", "gus@acme.example", acct.user_role),
    )
    .await
    .expect_err("User holds users.read");
    assert_eq!(reason(&err), "PERMISSION_DENIED");
    test.stop().await;
}

#[tokio::test]
async fn batch_update_gives_per_item_results_and_keeps_a_manager_across_the_batch() {
    let test = start().await;
    let acct = account(&test, 20).await;
    let other = account(&test, 5).await;
    let team = make_team(&test, &acct, "Depot").await;
    let alice = id_of(&admin_user(&test, &acct, "alice").await);
    let bob = id_of(&admin_user(&test, &acct, "bob").await);
    let carol = id_of(&member_user(&test, &acct, "carol").await);
    let dave = id_of(&member_user(&test, &acct, "dave").await);
    let pending = invited(&test, &acct, "pending@acme.example").await;
    let stranger = id_of(&member_user(&test, &other, "stranger").await);
    let owner = acct.owner();

    // Team change for many, with every per-item failure kind.
    let unknown = Uuid::new_v4();
    let message = pb::BatchUpdateUsersRequest {
        user_ids: [carol, dave, pending, unknown, stranger]
            .iter()
            .map(Uuid::to_string)
            .collect(),
        team_id: team.to_string(),
        update_mask: Some(FieldMask {
            paths: vec!["team_id".into()],
        }),
        ..Default::default()
    };
    let done = batch(&test, &owner, message).await.expect("batch");
    let reasons: Vec<&str> = done
        .results
        .iter()
        .map(|r| r.error.as_ref().map_or("", |e| e.reason.as_str()))
        .collect();
    assert_eq!(reasons, ["", "", "INVALID_STATE", "NOT_FOUND", "NOT_FOUND"]);
    assert_eq!((done.updated_count, done.failed_count), (2, 3));
    assert_eq!(
        done.results[0].user.as_ref().map(|u| u.team_name.as_str()),
        Some("Depot")
    );
    assert_eq!(done.results[0].user_id, carol.to_string());
    assert_eq!(
        stored(&test, stranger).await.expect("row").team_id,
        None,
        "other accounts untouched"
    );
    assert_eq!(events(&test, "user.updated", carol).await, 1);
    assert_eq!(audit_count(&test, "user.updated", dave).await, 1);

    // The owner's role never changes in bulk.
    let message = pb::BatchUpdateUsersRequest {
        user_ids: vec![acct.owner.to_string(), carol.to_string()],
        role_id: acct.user_role.to_string(),
        update_mask: Some(FieldMask {
            paths: vec!["role_id".into()],
        }),
        ..Default::default()
    };
    let done = batch(&test, &owner, message).await.expect("batch");
    assert_eq!(
        done.results[0].error.as_ref().map(|e| e.reason.as_str()),
        Some("OWNER_PROTECTED")
    );
    assert!(done.results[1].error.is_none());
    assert_eq!(
        stored(&test, acct.owner).await.expect("row").role_id,
        acct.admin_role
    );

    // Alice and Bob are the only managers: demoting both (with Carol) in
    // one batch keeps them both, and Carol's item succeeds.
    owner_not_a_manager(&test, &acct).await;
    let demote_all = pb::BatchUpdateUsersRequest {
        user_ids: vec![alice.to_string(), bob.to_string(), carol.to_string()],
        role_id: acct.user_role.to_string(),
        update_mask: Some(FieldMask {
            paths: vec!["role_id".into()],
        }),
        ..Default::default()
    };
    let done = batch(&test, &acct.key(), demote_all).await.expect("batch");
    let reasons: Vec<&str> = done
        .results
        .iter()
        .map(|r| r.error.as_ref().map_or("", |e| e.reason.as_str()))
        .collect();
    assert_eq!(reasons, ["LAST_MANAGER", "LAST_MANAGER", ""]);
    for id in [alice, bob] {
        assert_eq!(
            stored(&test, id).await.expect("row").role_id,
            acct.admin_role
        );
    }
    // One of them alone may go.
    let demote_bob = pb::BatchUpdateUsersRequest {
        user_ids: vec![bob.to_string()],
        role_id: acct.user_role.to_string(),
        update_mask: Some(FieldMask {
            paths: vec!["role_id".into()],
        }),
        ..Default::default()
    };
    let done = batch(
        &test,
        &member(acct.id, alice, &admin_permissions()),
        demote_bob,
    )
    .await
    .expect("batch");
    assert_eq!((done.updated_count, done.failed_count), (1, 0));
    let snapshot = test
        .state
        .sessions
        .get_principal(bob)
        .await
        .expect("redis")
        .expect("snapshot");
    assert!(!snapshot.permissions.iter().any(|p| p == USERS_MANAGE));

    // Errors of the whole call.
    let too_many: Vec<String> = (0..=MAX_BATCH)
        .map(|_| Uuid::new_v4().to_string())
        .collect();
    for (ids, mask, role, field) in [
        (
            vec![],
            vec!["role_id"],
            acct.user_role.to_string(),
            "user_ids",
        ),
        (
            too_many,
            vec!["role_id"],
            acct.user_role.to_string(),
            "user_ids",
        ),
        (
            vec![carol.to_string(), carol.to_string()],
            vec!["role_id"],
            acct.user_role.to_string(),
            "user_ids[1]",
        ),
        (
            vec!["nope".into()],
            vec!["role_id"],
            acct.user_role.to_string(),
            "user_ids[0]",
        ),
        (
            vec![carol.to_string()],
            vec![],
            acct.user_role.to_string(),
            "update_mask",
        ),
        (
            vec![carol.to_string()],
            vec!["display_name"],
            acct.user_role.to_string(),
            "update_mask.paths[0]",
        ),
    ] {
        let message = pb::BatchUpdateUsersRequest {
            user_ids: ids,
            role_id: role,
            update_mask: Some(FieldMask {
                paths: mask.into_iter().map(str::to_owned).collect(),
            }),
            ..Default::default()
        };
        let err = batch(&test, &owner, message).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            fields(&err).iter().any(|f| f == field),
            "{field}: {:?}",
            fields(&err)
        );
    }
    let foreign_role = pb::BatchUpdateUsersRequest {
        user_ids: vec![carol.to_string()],
        role_id: other.admin_role.to_string(),
        update_mask: Some(FieldMask {
            paths: vec!["role_id".into()],
        }),
        ..Default::default()
    };
    assert_eq!(
        reason(&batch(&test, &owner, foreign_role).await.expect_err("role")),
        "NOT_FOUND"
    );
    test.stop().await;
}

#[tokio::test]
async fn deactivation_revokes_sessions_and_reactivation_needs_a_free_seat() {
    let test = start().await;
    let acct = account(&test, 3).await;
    let owner = acct.owner();
    let worker = id_of(&member_user(&test, &acct, "worker").await);
    let session = test
        .state
        .sessions
        .create(acct.id, worker, SessionMeta::default())
        .await
        .expect("session");
    let token = session.access_token.as_str().to_owned();
    assert!(
        test.state
            .sessions
            .resolve_access(&token)
            .await
            .expect("redis")
            .is_some()
    );
    assert!(
        test.state
            .sessions
            .get_principal(worker)
            .await
            .expect("redis")
            .is_some()
    );

    let inactive = deactivate(&test, &owner, worker)
        .await
        .expect("deactivated");
    assert_eq!(inactive.status, pb::UserStatus::Inactive as i32);
    assert!(inactive.deactivate_time.is_some());
    assert!(
        test.state
            .sessions
            .resolve_access(&token)
            .await
            .expect("redis")
            .is_none(),
        "sessions revoked"
    );
    assert!(
        test.state
            .sessions
            .get_principal(worker)
            .await
            .expect("redis")
            .is_none(),
        "snapshot gone"
    );
    assert_eq!(audit_count(&test, "user.deactivated", worker).await, 1);
    assert_eq!(events(&test, "user.deactivated", worker).await, 1);
    assert_eq!(
        reason(&deactivate(&test, &owner, worker).await.expect_err("again")),
        "INVALID_STATE"
    );
    assert_eq!(
        reason(
            &deactivate(&test, &owner, acct.owner)
                .await
                .expect_err("owner")
        ),
        "OWNER_PROTECTED"
    );
    assert_eq!(
        reason(
            &deactivate(&test, &owner, Uuid::new_v4())
                .await
                .expect_err("unknown")
        ),
        "NOT_FOUND"
    );
    let err = deactivate_raw(&test, &owner, "not-a-uuid")
        .await
        .expect_err("malformed");
    assert_eq!(fields(&err), vec!["user_id".to_owned()]);
    let pending = invited(&test, &acct, "pending@acme.example").await;
    assert_eq!(
        reason(
            &deactivate(&test, &owner, pending)
                .await
                .expect_err("invited")
        ),
        "INVALID_STATE"
    );

    // Its seat was freed: owner + pending + one more fill the 3 seats.
    let filler = member_user(&test, &acct, "filler").await;
    assert_eq!(
        reason(&reactivate(&test, &owner, worker).await.expect_err("full")),
        "SEAT_LIMIT_REACHED"
    );
    deactivate(&test, &owner, id_of(&filler))
        .await
        .expect("seat freed");
    let back = reactivate(&test, &owner, worker)
        .await
        .expect("reactivated");
    assert_eq!(back.status, pb::UserStatus::Active as i32);
    assert!(back.deactivate_time.is_none());
    assert!(
        test.state
            .sessions
            .get_principal(worker)
            .await
            .expect("redis")
            .is_some()
    );
    assert_eq!(events(&test, "user.reactivated", worker).await, 1);
    assert_eq!(
        reason(&reactivate(&test, &owner, worker).await.expect_err("active")),
        "INVALID_STATE"
    );
    test.stop().await;
}

async fn deactivate_raw(
    test: &TestIdentity,
    caller: &Principal,
    id: &str,
) -> Result<pb::User, Status> {
    UserService::deactivate_user(
        &test.api,
        request(caller, pb::DeactivateUserRequest { user_id: id.into() }),
    )
    .await
    .map(|r| r.into_inner().user.expect("user"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_seat_goes_to_exactly_one_of_two_concurrent_callers() {
    let test = start().await;
    for round in 0..5 {
        // Creations: owner + 1 of 3 seats used, then two at once for the last one.
        let acct = account(&test, 3).await;
        member_user(&test, &acct, "first").await;
        let calls: Vec<_> = ["racer-a", "racer-b"]
            .into_iter()
            .map(|name| {
                let api = test.api.clone();
                let caller = acct.owner();
                let message = new_user(name, &format!("{name}@acme.example"), acct.user_role);
                tokio::spawn(async move {
                    UserService::create_user(&api, request(&caller, message)).await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for call in calls {
            outcomes.push(call.await.expect("task"));
        }
        assert_eq!(
            outcomes.iter().filter(|o| o.is_ok()).count(),
            1,
            "round {round}: creations"
        );
        let err = outcomes
            .iter()
            .find_map(|o| o.as_ref().err())
            .expect("refused");
        assert_eq!(reason(err), "SEAT_LIMIT_REACHED");

        // Reactivations: two inactive users, one free seat.
        let acct = account(&test, 2).await;
        let a = id_of(&member_user(&test, &acct, "sleeper-a").await);
        deactivate(&test, &acct.owner(), a).await.expect("a off");
        let b = id_of(&member_user(&test, &acct, "sleeper-b").await);
        deactivate(&test, &acct.owner(), b).await.expect("b off");
        let calls: Vec<_> = [a, b]
            .into_iter()
            .map(|id| {
                let api = test.api.clone();
                let caller = acct.owner();
                tokio::spawn(async move {
                    UserService::reactivate_user(
                        &api,
                        request(
                            &caller,
                            pb::ReactivateUserRequest {
                                user_id: id.to_string(),
                            },
                        ),
                    )
                    .await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for call in calls {
            outcomes.push(call.await.expect("task"));
        }
        assert_eq!(
            outcomes.iter().filter(|o| o.is_ok()).count(),
            1,
            "round {round}: reactivations"
        );
        let err = outcomes
            .iter()
            .find_map(|o| o.as_ref().err())
            .expect("refused");
        assert_eq!(reason(err), "SEAT_LIMIT_REACHED");
        assert_eq!(
            accounts::seats_used(&test.state.db, acct.id)
                .await
                .expect("seats"),
            2
        );
    }
    test.stop().await;
}

#[tokio::test]
async fn delete_user_removes_the_user_and_its_sessions_but_not_the_owner_or_invited() {
    let test = start().await;
    let acct = account(&test, 10).await;
    let owner = acct.owner();
    let leaver = member_user(&test, &acct, "leaver").await;
    let id = id_of(&leaver);
    let session = test
        .state
        .sessions
        .create(acct.id, id, SessionMeta::default())
        .await
        .expect("session");
    assert_eq!(
        delete(&test, &owner, id).await.expect("deleted").user_id,
        id.to_string()
    );
    assert!(stored(&test, id).await.is_none());
    assert!(
        test.state
            .sessions
            .resolve_access(session.access_token.as_str())
            .await
            .expect("redis")
            .is_none()
    );
    assert!(
        test.state
            .sessions
            .get_principal(id)
            .await
            .expect("redis")
            .is_none()
    );
    assert_eq!(
        reason(&get(&test, &owner, id).await.expect_err("gone")),
        "NOT_FOUND"
    );
    assert_eq!(
        reason(&delete(&test, &owner, id).await.expect_err("gone")),
        "NOT_FOUND"
    );
    assert_eq!(audit_count(&test, "user.deleted", id).await, 1);
    assert_eq!(events(&test, "user.deleted", id).await, 1);

    // Inactive users can be deleted too.
    let sleeper = id_of(&member_user(&test, &acct, "sleeper").await);
    deactivate(&test, &owner, sleeper)
        .await
        .expect("deactivated");
    delete(&test, &owner, sleeper)
        .await
        .expect("inactive deleted");

    assert_eq!(
        reason(&delete(&test, &owner, acct.owner).await.expect_err("owner")),
        "OWNER_PROTECTED"
    );
    let second = admin_user(&test, &acct, "second").await;
    assert_eq!(
        reason(
            &delete(&test, &acct.admin(&second), acct.owner)
                .await
                .expect_err("owner")
        ),
        "OWNER_PROTECTED"
    );
    let pending = invited(&test, &acct, "pending@acme.example").await;
    assert_eq!(
        reason(&delete(&test, &owner, pending).await.expect_err("invited")),
        "INVALID_STATE"
    );
    assert!(stored(&test, acct.owner).await.is_some());
    test.stop().await;
}

#[tokio::test]
async fn search_matches_any_part_of_name_or_email_case_insensitively_and_literally() {
    let test = start().await;
    let acct = account(&test, 50).await;
    let owner = acct.owner();
    let people = [
        ("zoe", "Zoë Martin", "zoe@acme.example"),
        ("bob", "Bob Stone", "MARy.b@acme.example"),
        ("anna-lee", "Anna_Lee", "anna@acme.example"),
        ("annax", "AnnaXLee", "annax@acme.example"),
        ("half", "Half 100% Sure", "half@acme.example"),
        ("h1000", "Half 1000 Sure", "h1000@acme.example"),
        ("back", "Back\\slash", "back@acme.example"),
    ];
    for (username, name, email) in people {
        let message = pb::CreateUserRequest {
            display_name: name.into(),
            ..new_user(username, email, acct.user_role)
        };
        create(&test, &owner, message).await.expect("created");
    }
    let names = |page: &pb::ListUsersResponse| {
        page.users
            .iter()
            .map(|u| u.display_name.clone())
            .collect::<Vec<_>>()
    };
    let search = |query: &str| pb::ListUsersRequest {
        query: query.into(),
        ..Default::default()
    };
    for (query, expected) in [
        ("MAR", vec!["Bob Stone", "Zoë Martin"]),
        ("zoë m", vec!["Zoë Martin"]),
        ("a_l", vec!["Anna_Lee"]),
        ("0% s", vec!["Half 100% Sure"]),
        ("k\\s", vec!["Back\\slash"]),
        (
            "ACME.EXAMPLE",
            vec![
                "Olive Owner",
                "Anna_Lee",
                "AnnaXLee",
                "Back\\slash",
                "Bob Stone",
                "Half 100% Sure",
                "Half 1000 Sure",
                "Zoë Martin",
            ],
        ),
        ("olive", vec!["Olive Owner"]),
        ("nobody-at-all", vec![]),
    ] {
        let page = list(&test, &owner, search(query)).await.expect("search");
        assert_eq!(names(&page), expected, "query {query}");
        assert_eq!(
            page.total_size,
            i32::try_from(expected.len()).expect("small"),
            "query {query}"
        );
    }
    // Whitespace only is no search.
    assert_eq!(
        list(&test, &owner, search("   "))
            .await
            .expect("all")
            .total_size,
        8
    );
    for query in ["ab".to_owned(), "x".repeat(201)] {
        let err = list(&test, &owner, search(&query))
            .await
            .expect_err("bounds");
        assert_eq!(fields(&err), vec!["query".to_owned()]);
    }
    for message in [
        pb::ListUsersRequest {
            page_size: -1,
            ..Default::default()
        },
        pb::ListUsersRequest {
            role_id: "nope".into(),
            ..Default::default()
        },
        pb::ListUsersRequest {
            team_id: "nope".into(),
            ..Default::default()
        },
        pb::ListUsersRequest {
            page_token: "garbage".into(),
            ..Default::default()
        },
    ] {
        let err = list(&test, &owner, message).await.expect_err("invalid");
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    test.stop().await;
}

#[tokio::test]
async fn pagination_returns_every_matching_user_once_in_a_stable_order() {
    let test = start().await;
    let acct = account(&test, 5_000).await;
    let owner = acct.owner();
    let team = make_team(&test, &acct, "Warehouse").await;
    let start_time = test.state.clock.now();
    // 1,200 users in one multi-row insert: duplicate names in mixed case
    // (the id breaks ties), some without email, some sharing a creation
    // time.
    let rows: Vec<user::Model> = (0..1_200)
        .map(|i| {
            let name = if i % 2 == 0 {
                format!("Person {:02}", i % 37)
            } else {
                format!("person {:02}", i % 37)
            };
            let (email, username) = if i % 10 == 0 {
                (None, Some(format!("kiosk{i:04}")))
            } else {
                (Some(format!("p{i:04}@acme.example")), None)
            };
            let mut model = row(
                &acct,
                Uuid::new_v4(),
                &name,
                email.as_deref(),
                username.as_deref(),
                if i % 5 == 0 {
                    acct.admin_role
                } else {
                    acct.user_role
                },
                (i % 3 == 0).then_some(team),
                start_time + Duration::seconds(i / 2),
            );
            if i % 7 == 0 {
                model.status = UserStatus::Inactive;
            }
            model
        })
        .collect();
    user::Entity::insert_many(rows.iter().cloned().map(IntoActiveModel::into_active_model))
        .exec(&test.state.db)
        .await
        .expect("bulk insert");

    // Team filter, default order, pages of 100.
    let mut expected: Vec<&user::Model> = rows.iter().filter(|r| r.team_id == Some(team)).collect();
    expected.sort_by(|a, b| {
        (a.display_name.to_lowercase(), a.id).cmp(&(b.display_name.to_lowercase(), b.id))
    });
    let message = pb::ListUsersRequest {
        page_size: 100,
        team_id: team.to_string(),
        ..Default::default()
    };
    let first = list(&test, &owner, message.clone()).await.expect("page");
    assert_eq!(first.total_size, 400);
    let (users, pages) = all_pages(&test, &owner, message).await;
    assert_eq!(pages, 4);
    let got: Vec<String> = users.iter().map(|u| u.id.clone()).collect();
    let want: Vec<String> = expected.iter().map(|r| r.id.to_string()).collect();
    assert_eq!(got, want);

    // Everything by name: the owner first, then 1,200 + the owner's
    // account has nobody else.
    let (users, _) = all_pages(
        &test,
        &owner,
        pb::ListUsersRequest {
            page_size: 500,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(users.len(), 1_201);
    assert!(users[0].owner);
    assert_eq!(users.iter().filter(|u| u.owner).count(), 1);

    // By email (username when none), active admins only, odd page size.
    let mut expected: Vec<&user::Model> = rows
        .iter()
        .filter(|r| r.role_id == acct.admin_role && r.status == UserStatus::Active)
        .collect();
    let key = |r: &user::Model| {
        r.email_canonical
            .clone()
            .or_else(|| r.username.clone())
            .unwrap_or_default()
    };
    expected.sort_by_key(|r| (key(r), r.id));
    let message = pb::ListUsersRequest {
        page_size: 33,
        role_id: acct.admin_role.to_string(),
        status: pb::UserStatus::Active as i32,
        order_by: pb::UserOrderBy::Email as i32,
        ..Default::default()
    };
    let (users, _) = all_pages(&test, &owner, message).await;
    assert!(
        users[0].owner,
        "the owner is an active admin and comes first"
    );
    let got: Vec<String> = users[1..].iter().map(|u| u.id.clone()).collect();
    let want: Vec<String> = expected.iter().map(|r| r.id.to_string()).collect();
    assert_eq!(got, want);

    // Newest first, ties on the creation time broken by id.
    let mut expected: Vec<&user::Model> = rows.iter().filter(|r| r.team_id.is_none()).collect();
    expected.sort_by_key(|r| std::cmp::Reverse((r.create_time, r.id)));
    let message = pb::ListUsersRequest {
        page_size: 77,
        query: "person".into(),
        order_by: pb::UserOrderBy::CreateTimeDesc as i32,
        ..Default::default()
    };
    let (users, _) = all_pages(&test, &owner, message.clone()).await;
    let no_team: Vec<String> = users
        .iter()
        .filter(|u| u.team_id.is_empty())
        .map(|u| u.id.clone())
        .collect();
    assert_eq!(
        no_team,
        expected
            .iter()
            .map(|r| r.id.to_string())
            .collect::<Vec<_>>()
    );

    // A token is bound to its query.
    let page = list(&test, &owner, message.clone()).await.expect("page");
    let other_query = pb::ListUsersRequest {
        page_token: page.next_page_token,
        query: "kiosk".into(),
        ..message
    };
    let err = list(&test, &owner, other_query)
        .await
        .expect_err("foreign token");
    assert_eq!(fields(&err), vec!["page_token".to_owned()]);

    // Page size 1: the owner alone, then the others.
    let one = pb::ListUsersRequest {
        page_size: 1,
        status: pb::UserStatus::Active as i32,
        ..Default::default()
    };
    let page = list(&test, &owner, one.clone()).await.expect("page");
    assert!(page.users[0].owner && !page.next_page_token.is_empty());
    let next = list(
        &test,
        &owner,
        pb::ListUsersRequest {
            page_token: page.next_page_token,
            ..one
        },
    )
    .await
    .expect("page");
    assert!(!next.users[0].owner);
    test.stop().await;
}

#[tokio::test]
async fn another_accounts_users_answer_not_found_and_stay_unchanged() {
    let test = start().await;
    let ours = account(&test, 10).await;
    let theirs = account(&test, 10).await;
    let victim = member_user(&test, &theirs, "victim").await;
    let id = id_of(&victim);
    let attacker = ours.owner();

    assert_eq!(
        reason(&get(&test, &attacker, id).await.expect_err("get")),
        "NOT_FOUND"
    );
    let rename = pb::UpdateUserRequest {
        user_id: id.to_string(),
        display_name: "Pwned".into(),
        update_mask: Some(FieldMask {
            paths: vec!["display_name".into()],
        }),
        ..Default::default()
    };
    assert_eq!(
        reason(&update(&test, &attacker, rename).await.expect_err("update")),
        "NOT_FOUND"
    );
    assert_eq!(
        reason(
            &deactivate(&test, &attacker, id)
                .await
                .expect_err("deactivate")
        ),
        "NOT_FOUND"
    );
    assert_eq!(
        reason(&delete(&test, &attacker, id).await.expect_err("delete")),
        "NOT_FOUND"
    );
    let done = batch(
        &test,
        &attacker,
        pb::BatchUpdateUsersRequest {
            user_ids: vec![id.to_string()],
            role_id: ours.admin_role.to_string(),
            update_mask: Some(FieldMask {
                paths: vec!["role_id".into()],
            }),
            ..Default::default()
        },
    )
    .await
    .expect("batch");
    assert_eq!(
        done.results[0].error.as_ref().map(|e| e.reason.as_str()),
        Some("NOT_FOUND")
    );
    // Their role and team ids are unknown here as well.
    let err = update(&test, &attacker, set_role(ours.owner, theirs.admin_role))
        .await
        .expect_err("foreign role");
    assert!(["NOT_FOUND", "OWNER_PROTECTED"].contains(&reason(&err).as_str()));
    let listed = list(&test, &attacker, pb::ListUsersRequest::default())
        .await
        .expect("list");
    assert_eq!(listed.total_size, 1);
    assert!(
        listed
            .users
            .iter()
            .all(|u| u.account_id == ours.id.to_string())
    );
    let filtered = list(
        &test,
        &attacker,
        pb::ListUsersRequest {
            role_id: theirs.user_role.to_string(),
            ..Default::default()
        },
    )
    .await
    .expect("list");
    assert!(filtered.users.is_empty());

    deactivate(&test, &theirs.owner(), id)
        .await
        .expect("their own admin may");
    assert_eq!(
        reason(
            &reactivate(&test, &attacker, id)
                .await
                .expect_err("reactivate")
        ),
        "NOT_FOUND"
    );
    let row = stored(&test, id).await.expect("row");
    assert_eq!(
        (row.display_name.as_str(), row.status),
        ("victim name", UserStatus::Inactive)
    );
    test.stop().await;
}

#[tokio::test]
async fn send_password_reset_queues_a_reset_email_for_active_users_only() {
    let test = start().await;
    let acct = account(&test, 5).await;
    let before = usher_kit::outbox::pending(&test.state.db)
        .await
        .expect("outbox");
    let message = pb::SendPasswordResetRequest {
        user_id: acct.owner.to_string(),
    };
    let sent = UserService::send_password_reset(&test.api, request(&acct.owner(), message))
        .await
        .expect("sent")
        .into_inner();
    assert_eq!(sent.email, "owner@acme.example");
    assert!(
        usher_kit::outbox::pending(&test.state.db)
            .await
            .expect("outbox")
            > before
    );
    let unknown = pb::SendPasswordResetRequest {
        user_id: Uuid::new_v4().to_string(),
    };
    let err = UserService::send_password_reset(&test.api, request(&acct.owner(), unknown))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    test.stop().await;
}

/// A search plans for its own term on every call: PostgreSQL never switches
/// the listing's prepared statements to a generic plan (which guessed a
/// term's matches from nothing and read and sorted every match of a common
/// term: 30–60 ms at 100,000 users instead of a walk of the name index).
#[tokio::test]
async fn searches_are_planned_for_their_own_term_every_time() {
    let test = start().await;
    let acct = account(&test, 100_000).await;
    // 20,000 users straight into the table, as an account that grew.
    test.state
        .db
        .execute_unprepared(&format!(
            "INSERT INTO users (id, account_id, email, email_canonical, display_name, search_text, status, role_id, \
               products, locale, owner, origin, password_change_required, create_time, update_time, activate_time) \
             SELECT gen_random_uuid(), '{account}', 'p' || g || '@big.example', 'p' || g || '@big.example', \
               'Person ' || lpad(g::text, 7, '0'), 'person ' || lpad(g::text, 7, '0') || ' p' || g || '@big.example', \
               'active', '{role}', '[]'::jsonb, '', false, 'direct', false, now(), now(), now() \
             FROM generate_series(1, 20000) AS g; ANALYZE users",
            account = acct.id,
            role = acct.user_role,
        ))
        .await
        .expect("seed");
    // One connection, so every call's prepared statements are on it.
    let pool = test
        .state
        .db
        .get_postgres_connection_pool()
        .connect_options();
    let one = sea_orm::sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*pool).clone())
        .await
        .expect("one connection");
    let db = sea_orm::SqlxPostgresConnector::from_sqlx_postgres_pool(one);
    let api = usher_identity::api::IdentityApi::new(std::sync::Arc::new(
        usher_identity::state::Identity {
            db: db.clone(),
            ..(*test.state).clone()
        },
    ));
    for (n, query) in ["son 0010", "p1234@", "son 0010", "son 001"]
        .iter()
        .cycle()
        .take(12)
        .enumerate()
    {
        let page = UserService::list_users(
            &api,
            request(
                &acct.owner(),
                pb::ListUsersRequest {
                    query: (*query).into(),
                    page_size: 10,
                    ..Default::default()
                },
            ),
        )
        .await
        .expect("search")
        .into_inner();
        assert!(!page.users.is_empty(), "call {n}: {query} found nobody");
    }
    let plans = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT COALESCE(SUM(generic_plans), 0)::bigint AS generic, \
               COALESCE(SUM(custom_plans), 0)::bigint AS custom, \
               string_agg(statement || ' g=' || generic_plans || ' c=' || custom_plans, ' | ') AS what \
             FROM pg_prepared_statements WHERE statement LIKE '%\"search_text\" LIKE%' \
               AND statement NOT LIKE '%pg_prepared_statements%'",
        ))
        .await
        .expect("plans")
        .expect("one row");
    let generic: i64 = plans.try_get("", "generic").expect("generic");
    let custom: i64 = plans.try_get("", "custom").expect("custom");
    let what: String = plans.try_get("", "what").unwrap_or_default();
    assert_eq!(generic, 0, "a search ran a generic plan: {what}");
    assert!(custom >= 12, "{custom} custom plans for 12 searches");
    db.close().await.expect("close");
    test.stop().await;
}

#[tokio::test]
async fn a_search_in_name_order_walks_its_index_without_reading_the_table() {
    let test = start().await;
    let acct = account(&test, 1_000).await;
    bench_like_users(&test, &acct, 500).await;
    let db = &test.state.db;
    // As autovacuum leaves the table after inserts: pages all-visible.
    db.execute_unprepared("VACUUM (ANALYZE) users")
        .await
        .expect("vacuum");
    let filter = ListFilter {
        account_id: acct.id,
        status: None,
        role_id: None,
        team_id: None,
        term: "son 00001".into(),
    };
    let walk = users::first_walk(DbBackend::Postgres, &filter, UserOrder::DisplayName, 11)
        .expect("a first page has no cursor");
    // 500 users are few enough for any plan: only the order's index may
    // answer, as at 1,000,000 users for a term many hold.
    let txn = db.begin().await.expect("begin");
    for setting in ["enable_seqscan", "enable_bitmapscan", "enable_sort"] {
        txn.execute_unprepared(&format!("SET LOCAL {setting} = off"))
            .await
            .expect("set");
    }
    let explained = txn
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("EXPLAIN (ANALYZE, COSTS OFF) {}", walk.sql),
            walk.values.expect("values").0,
        ))
        .await
        .expect("explain");
    txn.rollback().await.expect("rollback");
    let plan: Vec<String> = explained
        .iter()
        .map(|row| row.try_get_by_index::<String>(0).expect("plan line"))
        .collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Only Scan using users_account_name"),
        "the term is checked on the index's entries:\n{plan}"
    );
    assert!(
        plan.contains("Heap Fetches: 0"),
        "no user read from the table:\n{plan}"
    );
}
