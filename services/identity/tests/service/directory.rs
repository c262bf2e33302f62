//! Service tests of DirectoryService (the invitation service's view of
//! identity): real PostgreSQL and Redis through `TestIdentity`.

use std::{sync::Arc, time::Instant};

use serde_json::json;

use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, PaginatorTrait, QueryFilter, Set,
};
use tonic::{Code, Response, Status};
use tonic_types::StatusExt;
use usher_kit::{clock::SystemClock, principal::Principal};
use usher_proto::identity::{
    internal::v1::{
        self as internal, ReleaseOutcome as Outcome, ReservationVerdict as Verdict,
        directory_service_server::DirectoryService,
    },
    v1::{self as pb, account_service_server::AccountService},
};
use uuid::Uuid;

use usher_identity::{
    api::convert,
    domain::{Origin, UserStatus},
    store::{
        accounts,
        entities::{api_key, audit_event, role, team, user},
    },
    testing::{TestIdentity, admin_permissions, member, new_account_request, platform, request},
};

// -- harness ----------------------------------------------------------

/// An account created through AccountService, with its built-in roles.
#[derive(Clone, Debug)]
struct Acct {
    id: Uuid,
    owner: Uuid,
    admin_role: Uuid,
    user_role: Uuid,
}

fn svc() -> Principal {
    Principal::service("usher-invitation")
}

async fn start() -> TestIdentity {
    TestIdentity::start(Arc::new(SystemClock)).await
}

async fn account_with(test: &TestIdentity, create: pb::CreateAccountRequest) -> Acct {
    let created = AccountService::create_account(&test.api, request(&platform(), create))
        .await
        .expect("account")
        .into_inner();
    let id: Uuid = created.account.expect("account").id.parse().expect("uuid");
    let owner: Uuid = created.owner.expect("owner").id.parse().expect("uuid");
    let roles = role::Entity::find()
        .filter(role::Column::AccountId.eq(id))
        .all(&test.state.db)
        .await
        .expect("roles");
    let named = |name: &str| roles.iter().find(|r| r.name == name).expect("role").id;
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

async fn register_product(test: &TestIdentity, code: &str) {
    AccountService::register_product(
        &test.api,
        request(
            &platform(),
            pb::RegisterProductRequest {
                code: code.into(),
                display_name: code.into(),
                permissions: vec![],
            },
        ),
    )
    .await
    .expect("product");
}

async fn make_team(test: &TestIdentity, acct: &Acct, name: &str) -> Uuid {
    let now = test.state.clock.now();
    team::ActiveModel {
        id: Set(Uuid::new_v4()),
        account_id: Set(acct.id),
        name: Set(name.into()),
        description: Set(String::new()),
        create_time: Set(now),
        update_time: Set(now),
    }
    .insert(&test.state.db)
    .await
    .expect("team")
    .id
}

fn reason(status: &Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

fn fields(status: &Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|f| f.field.clone()).collect())
        .unwrap_or_default()
}

fn invitee(email: &str) -> internal::Invitee {
    internal::Invitee {
        email: email.into(),
        display_name: String::new(),
        invitation_id: Uuid::new_v4().to_string(),
    }
}

fn inviter(acct: &Acct) -> pb::Actor {
    pb::Actor {
        kind: pb::ActorKind::User as i32,
        id: acct.owner.to_string(),
        display_name: "Olive Owner".into(),
    }
}

fn reservation(acct: &Acct, invitees: Vec<internal::Invitee>) -> internal::ReserveInviteesRequest {
    internal::ReserveInviteesRequest {
        account_id: acct.id.to_string(),
        inviter: Some(inviter(acct)),
        role_id: acct.user_role.to_string(),
        team_id: String::new(),
        products: vec![],
        metadata: None,
        invitees,
        dry_run: false,
        locale: String::new(),
    }
}

async fn reserve(
    test: &TestIdentity,
    message: internal::ReserveInviteesRequest,
) -> Result<internal::ReserveInviteesResponse, Status> {
    test.api
        .reserve_invitees(request(&svc(), message))
        .await
        .map(Response::into_inner)
}

fn verdicts(response: &internal::ReserveInviteesResponse) -> Vec<Verdict> {
    response
        .results
        .iter()
        .map(|r| Verdict::try_from(r.verdict).expect("verdict"))
        .collect()
}

fn activation(
    acct: &Acct,
    invitee: &internal::Invitee,
    user_id: &str,
    password: &str,
) -> internal::ActivateInvitedUserRequest {
    internal::ActivateInvitedUserRequest {
        invitation_id: invitee.invitation_id.clone(),
        account_id: acct.id.to_string(),
        user_id: user_id.into(),
        display_name: "Ada Lovelace".into(),
        password: password.into(),
        metadata: None,
        locale: String::new(),
    }
}

async fn activate(
    test: &TestIdentity,
    message: internal::ActivateInvitedUserRequest,
) -> Result<internal::ActivateInvitedUserResponse, Status> {
    test.api
        .activate_invited_user(request(&svc(), message))
        .await
        .map(Response::into_inner)
}

async fn release(
    test: &TestIdentity,
    acct: &Acct,
    targets: Vec<internal::ReleaseTarget>,
) -> Result<internal::ReleaseInviteesResponse, Status> {
    test.api
        .release_invitees(request(
            &svc(),
            internal::ReleaseInviteesRequest {
                account_id: acct.id.to_string(),
                actor: Some(inviter(acct)),
                targets,
                reason: internal::ReleaseReason::Revoked as i32,
            },
        ))
        .await
        .map(Response::into_inner)
}

fn by_id(user_id: &str, invitation_id: &str) -> internal::ReleaseTarget {
    internal::ReleaseTarget {
        user_id: user_id.into(),
        email: String::new(),
        invitation_id: invitation_id.into(),
    }
}

fn outcomes(response: &internal::ReleaseInviteesResponse) -> Vec<Outcome> {
    response
        .results
        .iter()
        .map(|r| Outcome::try_from(r.outcome).expect("outcome"))
        .collect()
}

async fn users_of(test: &TestIdentity, acct: &Acct) -> u64 {
    user::Entity::find()
        .filter(user::Column::AccountId.eq(acct.id))
        .count(&test.state.db)
        .await
        .expect("count")
}

async fn audit_of(test: &TestIdentity, acct: &Acct, action: &str) -> u64 {
    audit_event::Entity::find()
        .filter(audit_event::Column::AccountId.eq(acct.id))
        .filter(audit_event::Column::Action.eq(action))
        .count(&test.state.db)
        .await
        .expect("count")
}

async fn outbox(test: &TestIdentity) -> u64 {
    usher_kit::outbox::pending(&test.state.db)
        .await
        .expect("outbox")
}

async fn stored(test: &TestIdentity, id: &str) -> Option<user::Model> {
    user::Entity::find_by_id(id.parse::<Uuid>().expect("uuid"))
        .one(&test.state.db)
        .await
        .expect("query")
}

async fn seats_of(test: &TestIdentity, acct: &Acct) -> u64 {
    accounts::seats_used(&test.state.db, acct.id)
        .await
        .expect("seats")
}

/// An INACTIVE member, written directly.
async fn inactive_member(test: &TestIdentity, acct: &Acct, email: &str) -> Uuid {
    let now = test.state.clock.now();
    let id = Uuid::new_v4();
    user::ActiveModel {
        id: Set(id),
        account_id: Set(acct.id),
        email: Set(Some(email.into())),
        email_canonical: Set(Some(email.into())),
        username: Set(None),
        display_name: Set("Idle".into()),
        search_text: Set(String::new()),
        status: Set(UserStatus::Inactive),
        role_id: Set(acct.user_role),
        team_id: Set(None),
        products: Set(convert::json_strings(Vec::<String>::new())),
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
        activate_time: Set(Some(now)),
        deactivate_time: Set(Some(now)),
        last_sign_in_time: Set(None),
    }
    .insert(&test.state.db)
    .await
    .expect("inactive user");
    id
}

// -- ReserveInvitees: nobody grants what they do not hold (P26) --------

#[tokio::test]
async fn the_invitees_role_carries_nothing_the_inviter_lacks() {
    let test = start().await;
    let acct = account(&test, 20).await;
    let now = test.state.clock.now();
    // An inviter whose role holds users.read + users.invite only.
    let inviters = role::ActiveModel {
        id: Set(Uuid::new_v4()),
        account_id: Set(acct.id),
        name: Set("Inviters".into()),
        description: Set(String::new()),
        permissions: Set(convert::json_strings(["users.invite", "users.read"])),
        built_in: Set(false),
        create_time: Set(now),
        update_time: Set(now),
    }
    .insert(&test.state.db)
    .await
    .expect("role");
    let ivy = inactive_member(&test, &acct, "ivy@acme.example").await;
    let mut row = user::Entity::find_by_id(ivy)
        .one(&test.state.db)
        .await
        .expect("query")
        .expect("ivy")
        .into_active_model();
    row.role_id = Set(inviters.id);
    row.status = Set(UserStatus::Active);
    row.update(&test.state.db).await.expect("ivy active");
    let key_with = |permissions: &[&str]| api_key::ActiveModel {
        id: Set(Uuid::new_v4()),
        account_id: Set(Some(acct.id)),
        name: Set(format!("key {}", Uuid::new_v4())),
        secret_hash: Set(Uuid::new_v4().to_string()),
        secret_prefix: Set("usk_abcd".into()),
        permissions: Set(convert::json_strings(permissions.to_vec())),
        platform: Set(false),
        creator_user_id: Set(Some(acct.owner)),
        create_time: Set(now),
        expire_time: Set(None),
        last_use_time: Set(None),
        revoke_time: Set(None),
    };
    let invite_only = key_with(&["users.invite"])
        .insert(&test.state.db)
        .await
        .expect("key");
    let reader = key_with(&["users.invite", "users.read"])
        .insert(&test.state.db)
        .await
        .expect("key");
    let actor = |kind: pb::ActorKind, id: Uuid| {
        Some(pb::Actor {
            kind: kind as i32,
            id: id.to_string(),
            display_name: String::new(),
        })
    };
    let users_before = users_of(&test, &acct).await;

    let mut n = 0;
    let mut attempt = |inviter: Option<pb::Actor>, role: Uuid, dry_run: bool| {
        n += 1;
        let mut message = reservation(&acct, vec![invitee(&format!("p{n}@acme.example"))]);
        message.inviter = inviter;
        message.role_id = role.to_string();
        message.dry_run = dry_run;
        message
    };
    // Refused, dry run or not: the Admin role from Ivy, the User role
    // (users.read) from a key holding users.invite only, anything from
    // no inviter, an unknown or inactive one.
    for (inviter, role) in [
        (actor(pb::ActorKind::User, ivy), acct.admin_role),
        (actor(pb::ActorKind::ApiKey, reader.id), acct.admin_role),
        (actor(pb::ActorKind::ApiKey, invite_only.id), acct.user_role),
        (None, acct.user_role),
        (actor(pb::ActorKind::User, Uuid::new_v4()), acct.user_role),
        (
            actor(pb::ActorKind::Platform, Uuid::new_v4()),
            acct.user_role,
        ),
    ] {
        for dry_run in [true, false] {
            let err = reserve(&test, attempt(inviter.clone(), role, dry_run))
                .await
                .expect_err("beyond the inviter");
            assert_eq!(err.code(), Code::PermissionDenied, "{inviter:?} {role}");
            assert_eq!(reason(&err), "PERMISSION_DENIED");
        }
    }
    assert_eq!(users_of(&test, &acct).await, users_before);

    // Within: Ivy and the reading key invite as Ivy's role or User; the
    // owner (Admin) as Admin.
    for (inviter, role) in [
        (actor(pb::ActorKind::User, ivy), acct.user_role),
        (actor(pb::ActorKind::User, ivy), inviters.id),
        (actor(pb::ActorKind::ApiKey, reader.id), acct.user_role),
        (Some(inviter(&acct)), acct.admin_role),
    ] {
        let answer = reserve(&test, attempt(inviter, role, false))
            .await
            .expect("within the inviter");
        assert_eq!(verdicts(&answer), [Verdict::Reserved]);
    }

    // Once Ivy is deactivated she grants nothing.
    let mut row = user::Entity::find_by_id(ivy)
        .one(&test.state.db)
        .await
        .expect("query")
        .expect("ivy")
        .into_active_model();
    row.status = Set(UserStatus::Inactive);
    row.update(&test.state.db).await.expect("ivy inactive");
    let err = reserve(
        &test,
        attempt(actor(pb::ActorKind::User, ivy), acct.user_role, false),
    )
    .await
    .expect_err("inactive inviter");
    assert_eq!(reason(&err), "PERMISSION_DENIED");
    test.stop().await;
}

// -- GetInvitationContext ----------------------------------------------

#[tokio::test]
async fn invitation_context_names_account_inviter_role_and_team() {
    let test = start().await;
    let acct = account(&test, 5).await;
    let team_id = make_team(&test, &acct, "Shipping").await;
    let answer = test
        .api
        .get_invitation_context(request(
            &svc(),
            internal::GetInvitationContextRequest {
                account_id: acct.id.to_string(),
                inviter: Some(inviter(&acct)),
                role_id: acct.admin_role.to_string(),
                team_id: team_id.to_string(),
            },
        ))
        .await
        .expect("context")
        .into_inner();
    let account = answer.account.expect("account");
    assert_eq!(account.id, acct.id.to_string());
    assert_eq!(account.seats_used, 1);
    assert_eq!(account.subscription.expect("subscription").seat_limit, 5);
    assert_eq!(
        account
            .invitation_lifetime
            .expect("effective lifetime")
            .seconds,
        24 * 3600
    );
    assert_eq!(answer.inviter_display_name, "Olive Owner");
    assert_eq!(answer.inviter_email.to_lowercase(), "owner@acme.example");
    assert!(answer.inviter_active);
    assert_eq!(answer.role_name, "Admin");
    assert!(answer.role_manages_users);
    assert_eq!(answer.team_name, "Shipping");

    // An API key inviter, then nothing asked but the account.
    let now = test.state.clock.now();
    let key = api_key::ActiveModel {
        id: Set(Uuid::new_v4()),
        account_id: Set(Some(acct.id)),
        name: Set("CRM sync".into()),
        secret_hash: Set(Uuid::new_v4().to_string()),
        secret_prefix: Set("usk_abcd".into()),
        permissions: Set(convert::json_strings(["users.invite"])),
        platform: Set(false),
        creator_user_id: Set(Some(acct.owner)),
        create_time: Set(now),
        expire_time: Set(None),
        last_use_time: Set(None),
        revoke_time: Set(Some(now)),
    }
    .insert(&test.state.db)
    .await
    .expect("key");
    let answer = test
        .api
        .get_invitation_context(request(
            &svc(),
            internal::GetInvitationContextRequest {
                account_id: acct.id.to_string(),
                inviter: Some(pb::Actor {
                    kind: pb::ActorKind::ApiKey as i32,
                    id: key.id.to_string(),
                    display_name: String::new(),
                }),
                role_id: acct.user_role.to_string(),
                team_id: String::new(),
            },
        ))
        .await
        .expect("context")
        .into_inner();
    assert_eq!(answer.inviter_display_name, "CRM sync");
    assert!(!answer.inviter_active, "revoked key");
    assert_eq!(answer.inviter_email, "");
    assert_eq!(answer.role_name, "User");
    assert!(!answer.role_manages_users);
    assert_eq!(answer.team_name, "");

    // Unknown ids answer NOT_FOUND; malformed ones INVALID_ARGUMENT.
    for (inviter_id, role_id, team_id) in [
        (Uuid::new_v4().to_string(), String::new(), String::new()),
        (String::new(), Uuid::new_v4().to_string(), String::new()),
        (String::new(), String::new(), Uuid::new_v4().to_string()),
    ] {
        let err = test
            .api
            .get_invitation_context(request(
                &svc(),
                internal::GetInvitationContextRequest {
                    account_id: acct.id.to_string(),
                    inviter: (!inviter_id.is_empty()).then(|| pb::Actor {
                        kind: pb::ActorKind::User as i32,
                        id: inviter_id.clone(),
                        display_name: String::new(),
                    }),
                    role_id,
                    team_id,
                },
            ))
            .await
            .expect_err("unknown");
        assert_eq!(err.code(), Code::NotFound);
    }
    let err = test
        .api
        .get_invitation_context(request(
            &svc(),
            internal::GetInvitationContextRequest {
                account_id: "nope".into(),
                role_id: "nope".into(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("malformed");
    assert_eq!(fields(&err), ["account_id", "role_id"]);
    let err = test
        .api
        .get_invitation_context(request(
            &member(acct.id, acct.owner, &admin_permissions()),
            internal::GetInvitationContextRequest {
                account_id: acct.id.to_string(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("members may not call the directory");
    assert_eq!(err.code(), Code::PermissionDenied);
    test.stop().await;
}

// -- ReserveInvitees ----------------------------------------------------

#[tokio::test]
async fn reservation_gives_a_verdict_per_invitee_and_writes_invited_users() {
    let test = start().await;
    register_product(&test, "meter").await;
    let mut create = new_account_request(5);
    create.products = vec!["meter".into()];
    create.allowed_email_domains = vec!["acme.example".into(), "partner.example".into()];
    let acct = account_with(&test, create).await;
    let team_id = make_team(&test, &acct, "Shipping").await;
    let idle = inactive_member(&test, &acct, "idle@acme.example").await;
    // An earlier invitation of pat@: holds a seat (owner + pat = 2 of 5).
    let pat = invitee("pat@acme.example");
    let earlier = reserve(&test, reservation(&acct, vec![pat.clone()]))
        .await
        .expect("earlier");
    assert_eq!(verdicts(&earlier), [Verdict::Reserved]);
    let pat_id = earlier.results[0].user_id.clone();
    let (outbox_before, users_before) = (outbox(&test).await, users_of(&test, &acct).await);

    let mut message = reservation(
        &acct,
        vec![
            invitee("owner@acme.example"),
            invitee("idle@acme.example"),
            invitee("pat@acme.example"),
            invitee("eve@elsewhere.example"),
            internal::Invitee {
                display_name: " Ada  Lovelace ".into(),
                ..invitee("ada@acme.example")
            },
            invitee("bob@partner.example"),
            invitee("cy@acme.example"),
            invitee("dee@acme.example"),
        ],
    );
    message.team_id = team_id.to_string();
    message.products = vec!["meter".into()];
    message.locale = "FR".into();
    message.metadata = Some(convert::json_to_struct(&json!({"lines": ["+33 1 23"]})));
    let answer = reserve(&test, message.clone()).await.expect("reserved");
    assert_eq!(
        verdicts(&answer),
        [
            Verdict::AlreadyMember,
            Verdict::AlreadyMember,
            Verdict::AlreadyInvited,
            Verdict::DomainNotAllowed,
            Verdict::Reserved,
            Verdict::Reserved,
            Verdict::Reserved,
            Verdict::SeatLimitReached,
        ]
    );
    assert_eq!(answer.results[0].user_id, acct.owner.to_string());
    assert_eq!(answer.results[1].user_id, idle.to_string());
    assert_eq!(answer.results[2].user_id, pat_id);
    assert_eq!(answer.results[2].existing_invitation_id, pat.invitation_id);
    assert_eq!(answer.results[3].user_id, "");
    assert_eq!(answer.results[7].user_id, "");
    assert_eq!((answer.seat_limit, answer.seats_used), (5, 5));
    assert_eq!(answer.role_name, "User");
    assert_eq!(answer.team_name, "Shipping");
    assert_eq!(seats_of(&test, &acct).await, 5);
    assert_eq!(users_of(&test, &acct).await, users_before + 3);

    let ada = stored(&test, &answer.results[4].user_id)
        .await
        .expect("ada reserved");
    assert_eq!(ada.status, usher_identity::domain::UserStatus::Invited);
    assert_eq!(ada.display_name, "Ada  Lovelace");
    assert_eq!(ada.email_canonical.as_deref(), Some("ada@acme.example"));
    assert_eq!(ada.role_id, acct.user_role);
    assert_eq!(ada.team_id, Some(team_id));
    assert_eq!(convert::strings(&ada.products), ["meter"]);
    assert_eq!(ada.locale, "fr");
    assert_eq!(ada.metadata, Some(json!({"lines": ["+33 1 23"]})));
    assert_eq!(ada.origin, usher_identity::domain::Origin::Invitation);
    assert_eq!(
        ada.invitation_id.map(|i| i.to_string()),
        Some(message.invitees[4].invitation_id.clone())
    );
    assert_eq!(ada.invited_by, Some(format!("user:{}", acct.owner)));
    assert!(ada.password_hash.is_none());
    assert_eq!(outbox(&test).await, outbox_before + 3, "user.created x3");
    assert_eq!(
        audit_of(&test, &acct, "user.created").await,
        1 + 3,
        "pat, then three"
    );
    test.stop().await;
}

#[tokio::test]
async fn dry_run_gives_the_same_verdicts_and_writes_nothing() {
    let test = start().await;
    let acct = account(&test, 3).await;
    reserve(&test, reservation(&acct, vec![invitee("pat@acme.example")]))
        .await
        .expect("earlier");
    let mut message = reservation(
        &acct,
        vec![
            invitee("pat@acme.example"),
            invitee("ada@acme.example"),
            invitee("bob@acme.example"),
        ],
    );
    message.dry_run = true;
    let before = (
        users_of(&test, &acct).await,
        outbox(&test).await,
        audit_of(&test, &acct, "user.created").await,
    );
    let preview = reserve(&test, message.clone()).await.expect("dry run");
    assert_eq!(
        verdicts(&preview),
        [
            Verdict::AlreadyInvited,
            Verdict::Reserved,
            Verdict::SeatLimitReached
        ]
    );
    assert_eq!(preview.results[1].user_id, "", "no user for a dry run");
    assert_eq!(preview.seats_used, 3, "as they would be");
    let after = (
        users_of(&test, &acct).await,
        outbox(&test).await,
        audit_of(&test, &acct, "user.created").await,
    );
    assert_eq!(before, after);
    assert_eq!(seats_of(&test, &acct).await, 2);

    message.dry_run = false;
    let done = reserve(&test, message).await.expect("real run");
    assert_eq!(verdicts(&done), verdicts(&preview));
    assert_eq!(users_of(&test, &acct).await, before.0 + 1);
    test.stop().await;
}

#[tokio::test]
async fn a_retry_with_the_same_invitation_ids_reserves_nothing_twice() {
    let test = start().await;
    let acct = account(&test, 10).await;
    let message = reservation(
        &acct,
        vec![invitee("ada@acme.example"), invitee("bob@acme.example")],
    );
    let first = reserve(&test, message.clone()).await.expect("first");
    let (users, events) = (users_of(&test, &acct).await, outbox(&test).await);
    let again = reserve(&test, message.clone()).await.expect("retry");
    assert_eq!(verdicts(&again), [Verdict::Reserved, Verdict::Reserved]);
    assert_eq!(first.results, again.results, "same users");
    assert_eq!(again.seats_used, 3);
    assert_eq!(users_of(&test, &acct).await, users);
    assert_eq!(outbox(&test).await, events, "no second user.created");

    // The same person under a new invitation: already invited.
    let other = reserve(&test, reservation(&acct, vec![invitee("ada@acme.example")]))
        .await
        .expect("other");
    assert_eq!(verdicts(&other), [Verdict::AlreadyInvited]);
    assert_eq!(
        other.results[0].existing_invitation_id,
        message.invitees[0].invitation_id
    );
    // An invitation id already held by another person is a caller bug.
    let stolen = internal::Invitee {
        invitation_id: message.invitees[0].invitation_id.clone(),
        ..invitee("cy@acme.example")
    };
    let err = reserve(&test, reservation(&acct, vec![stolen]))
        .await
        .expect_err("reused invitation id");
    assert_eq!(fields(&err), ["invitees[0].invitation_id"]);
    test.stop().await;
}

#[tokio::test]
async fn whole_call_errors_follow_the_contract() {
    let test = start().await;
    register_product(&test, "meter").await;
    let acct = account(&test, 10).await;
    let other = account(&test, 10).await;
    let other_team = make_team(&test, &other, "Theirs").await;

    let err = reserve(&test, reservation(&acct, vec![]))
        .await
        .expect_err("empty");
    assert_eq!(fields(&err), ["invitees"]);
    let many = (0..1_001)
        .map(|i| invitee(&format!("u{i}@acme.example")))
        .collect();
    let err = reserve(&test, reservation(&acct, many))
        .await
        .expect_err("too many");
    assert_eq!(fields(&err), ["invitees"]);

    let mut no_id = invitee("cy@acme.example");
    no_id.invitation_id = String::new();
    let err = reserve(
        &test,
        reservation(
            &acct,
            vec![
                invitee("Ada@acme.example"),
                invitee(" bob@acme.example"),
                invitee("not an email"),
                invitee("dup@acme.example"),
                invitee("dup@acme.example"),
                no_id,
            ],
        ),
    )
    .await
    .expect_err("bad invitees");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        fields(&err),
        [
            "invitees[0].email",
            "invitees[1].email",
            "invitees[2].email",
            "invitees[4].email",
            "invitees[5].invitation_id",
        ]
    );

    let one = || vec![invitee("ada@acme.example")];
    let mut unknown_account = reservation(&acct, one());
    unknown_account.account_id = Uuid::new_v4().to_string();
    let mut foreign_role = reservation(&acct, one());
    foreign_role.role_id = other.user_role.to_string();
    let mut foreign_team = reservation(&acct, one());
    foreign_team.team_id = other_team.to_string();
    for message in [unknown_account, foreign_role, foreign_team] {
        let err = reserve(&test, message).await.expect_err("not found");
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::NotFound, "NOT_FOUND")
        );
    }
    let mut product = reservation(&acct, one());
    product.products = vec!["meter".into()];
    let err = reserve(&test, product).await.expect_err("not enabled");
    assert_eq!(reason(&err), "PRODUCT_NOT_ENABLED");

    let single = account(&test, 1).await;
    let err = reserve(&test, reservation(&single, one()))
        .await
        .expect_err("single user plan");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "SINGLE_USER_PLAN")
    );
    let err = test
        .api
        .reserve_invitees(request(
            &member(acct.id, acct.owner, &admin_permissions()),
            reservation(&acct, one()),
        ))
        .await
        .expect_err("members may not reserve");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(users_of(&test, &acct).await, 1, "nothing written");
    test.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_never_exceed_the_seat_limit() {
    let test = start().await;
    // Six seats, the owner holds one: five free.
    let acct = account(&test, 6).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let calls: Vec<_> = (0..8)
        .map(|call| {
            let api = test.api.clone();
            let barrier = barrier.clone();
            let message = reservation(
                &acct,
                vec![
                    invitee(&format!("a{call}@acme.example")),
                    invitee(&format!("b{call}@acme.example")),
                ],
            );
            tokio::spawn(async move {
                barrier.wait().await;
                api.reserve_invitees(request(&svc(), message))
                    .await
                    .map(Response::into_inner)
            })
        })
        .collect();
    let mut reserved = 0;
    let mut refused = 0;
    for call in calls {
        let answer = call.await.expect("task").expect("reserve");
        assert!(answer.seats_used <= 6, "seats used {}", answer.seats_used);
        for verdict in verdicts(&answer) {
            match verdict {
                Verdict::Reserved => reserved += 1,
                Verdict::SeatLimitReached => refused += 1,
                other => panic!("unexpected verdict {other:?}"),
            }
        }
    }
    assert_eq!((reserved, refused), (5, 11));
    assert_eq!(seats_of(&test, &acct).await, 6);
    assert_eq!(users_of(&test, &acct).await, 6);
    test.stop().await;
}

/// A reservation answers the context GetInvitationContext would: the
/// account with the seats used before the call, the inviter (named from its
/// record when the caller gives no name), the role and the team.
#[tokio::test]
async fn a_reservation_answers_the_invitation_context() {
    let test = start().await;
    let acct = account(&test, 10).await;
    let mut message = reservation(&acct, vec![invitee("ctx1@acme.example")]);
    if let Some(inviter) = message.inviter.as_mut() {
        inviter.display_name = String::new();
    }
    let first = reserve(&test, message).await.expect("first");
    let context = first.context.expect("context");
    let account = context.account.expect("account");
    assert_eq!(account.id, acct.id.to_string());
    assert_eq!(account.seats_used, 1, "the owner, before this call");
    assert_eq!(account.subscription.expect("plan").seat_limit, 10);
    assert_eq!(context.inviter_display_name, "Olive Owner");
    assert!(context.inviter_active);
    assert!(context.inviter_may_grant_role);
    assert_eq!(context.role_name, "User");
    assert_eq!(first.seats_used, 2);
    let second = reserve(
        &test,
        reservation(&acct, vec![invitee("ctx2@acme.example")]),
    )
    .await
    .expect("second");
    let seats = second.context.and_then(|c| c.account).map(|a| a.seats_used);
    assert_eq!(seats, Some(2), "seats before the second call");
    test.stop().await;
}

/// Concurrent reservations of one account are written in batches: each
/// call is still decided as if alone, in some order — one address asked for
/// by every call gets one seat, the others learn it is invited; a call
/// refused (an invitation id another address holds) fails alone; audit
/// entries and the seat counter match the rows written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_of_one_account_are_each_decided_as_if_alone() {
    let test = start().await;
    let acct = account(&test, 1_000).await;
    let taken = invitee("holder@acme.example");
    reserve(&test, reservation(&acct, vec![taken.clone()]))
        .await
        .expect("first holder");
    let barrier = Arc::new(tokio::sync::Barrier::new(24));
    let calls: Vec<_> = (0..24)
        .map(|call| {
            let api = test.api.clone();
            let barrier = barrier.clone();
            let mut invitees = vec![
                invitee("everyone@acme.example"),
                invitee(&format!("own{call}@acme.example")),
            ];
            if call == 7 {
                // Another address's invitation id: this call alone is refused.
                invitees[1].invitation_id = taken.invitation_id.clone();
            }
            let message = reservation(&acct, invitees);
            tokio::spawn(async move {
                barrier.wait().await;
                api.reserve_invitees(request(&svc(), message))
                    .await
                    .map(Response::into_inner)
            })
        })
        .collect();
    let mut shared = Vec::new();
    for (call, task) in calls.into_iter().enumerate() {
        let answer = task.await.expect("task");
        if call == 7 {
            let err = answer.expect_err("an invitation id held by another address");
            assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
            continue;
        }
        let answer = answer.expect("reserve");
        let got = verdicts(&answer);
        assert_eq!(got[1], Verdict::Reserved, "call {call}: its own invitee");
        shared.push(got[0]);
    }
    let winners = shared.iter().filter(|v| **v == Verdict::Reserved).count();
    let invited = shared
        .iter()
        .filter(|v| **v == Verdict::AlreadyInvited)
        .count();
    assert_eq!((winners, invited), (1, 22), "{shared:?}");
    // Owner + the first holder + one shared + 23 own invitees.
    assert_eq!(users_of(&test, &acct).await, 26);
    assert_eq!(seats_of(&test, &acct).await, 26);
    let counted = accounts::seats_counted(&test.state.db, acct.id)
        .await
        .expect("count");
    assert_eq!(counted, 26, "the counter agrees with the rows");
    assert_eq!(audit_of(&test, &acct, "user.created").await, 25);
    test.stop().await;
}

/// The checks of a call (its role and team exist in the account, its
/// inviter may grant the role) run inside its batch: a call naming an
/// unknown role or team is refused alone, and the others of the same
/// batch are reserved, counted and audited as if it had not been there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_call_in_a_batch_of_reservations_fails_alone() {
    let test = start().await;
    let acct = account(&test, 1_000).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let calls: Vec<_> = (0..16)
        .map(|call| {
            let api = test.api.clone();
            let barrier = barrier.clone();
            let mut message = reservation(&acct, vec![invitee(&format!("p{call}@acme.example"))]);
            match call {
                3 => message.role_id = Uuid::new_v4().to_string(),
                9 => message.team_id = Uuid::new_v4().to_string(),
                _ => {}
            }
            tokio::spawn(async move {
                barrier.wait().await;
                api.reserve_invitees(request(&svc(), message))
                    .await
                    .map(Response::into_inner)
            })
        })
        .collect();
    for (call, task) in calls.into_iter().enumerate() {
        let answer = task.await.expect("task");
        match call {
            3 | 9 => {
                let err = answer.expect_err("an unknown role or team");
                assert_eq!(err.code(), Code::NotFound, "call {call}: {err:?}");
                let field = if call == 3 { "role" } else { "team" };
                assert!(err.message().contains(field), "call {call}: {err:?}");
            }
            _ => {
                let answer = answer.expect("reserve");
                assert_eq!(verdicts(&answer), [Verdict::Reserved], "call {call}");
                assert_eq!(answer.role_name, "User", "call {call}");
            }
        }
    }
    // The owner and the 14 accepted calls' invitees.
    assert_eq!(users_of(&test, &acct).await, 15);
    assert_eq!(seats_of(&test, &acct).await, 15);
    assert_eq!(audit_of(&test, &acct, "user.created").await, 14);
    test.stop().await;
}

/// Reservations of many accounts at once share batches and commits (one
/// lane holds several accounts): each account's seats are still counted
/// exactly, each answer names its own account, and the calls of an unknown
/// account or with another account's role are refused alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_of_many_accounts_are_each_counted_for_their_own() {
    let test = start().await;
    // Three seats each, the owner holds one: two free in every account.
    let mut accts = Vec::new();
    for _ in 0..12 {
        accts.push(account(&test, 3).await);
    }
    let ghost = Acct {
        id: Uuid::new_v4(),
        ..accts[0].clone()
    };
    let mut messages = Vec::new();
    for (index, acct) in accts.iter().enumerate() {
        for call in 0..4 {
            messages.push((
                Some(index),
                reservation(acct, vec![invitee(&format!("m{call}@acme.example"))]),
            ));
        }
    }
    // A role of another account of the batch: read with that account's
    // calls, still unknown in this one.
    let mut foreign_role = reservation(&accts[5], vec![invitee("x@acme.example")]);
    foreign_role.role_id = accts[6].user_role.to_string();
    messages.push((None, foreign_role));
    for call in 0..3 {
        messages.push((
            None,
            reservation(&ghost, vec![invitee(&format!("g{call}@acme.example"))]),
        ));
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(messages.len()));
    let calls: Vec<_> = messages
        .into_iter()
        .map(|(index, message)| {
            let api = test.api.clone();
            let barrier = barrier.clone();
            let account = message.account_id.clone();
            let role = message.role_id.clone();
            let task = tokio::spawn(async move {
                barrier.wait().await;
                api.reserve_invitees(request(&svc(), message))
                    .await
                    .map(Response::into_inner)
            });
            (index, account, role, task)
        })
        .collect();
    let mut reserved = vec![0; accts.len()];
    let mut refused = vec![0; accts.len()];
    for (index, account, role, task) in calls {
        let answer = task.await.expect("task");
        let Some(index) = index else {
            let err = answer.expect_err("an unknown account or role");
            assert_eq!(err.code(), Code::NotFound, "{err:?}");
            let field = if account == ghost.id.to_string() {
                "account"
            } else {
                assert_ne!(role, accts[5].user_role.to_string());
                "role"
            };
            assert!(err.message().contains(field), "{err:?}");
            continue;
        };
        let answer = answer.expect("reserve");
        let context = answer.context.clone().expect("context");
        assert_eq!(context.account.expect("account").id, account);
        assert!(answer.seats_used <= 3, "seats used {}", answer.seats_used);
        for verdict in verdicts(&answer) {
            match verdict {
                Verdict::Reserved => reserved[index] += 1,
                Verdict::SeatLimitReached => refused[index] += 1,
                other => panic!("unexpected verdict {other:?}"),
            }
        }
    }
    for (index, acct) in accts.iter().enumerate() {
        assert_eq!((reserved[index], refused[index]), (2, 2), "account {index}");
        assert_eq!(seats_of(&test, acct).await, 3, "account {index}");
        let counted = accounts::seats_counted(&test.state.db, acct.id)
            .await
            .expect("count");
        assert_eq!(
            counted, 3,
            "account {index}: the counter agrees with the rows"
        );
        assert_eq!(
            audit_of(&test, acct, "user.created").await,
            2,
            "account {index}"
        );
    }
    test.stop().await;
}

#[tokio::test]
async fn a_thousand_invitees_in_one_call() {
    let test = start().await;
    let acct = account(&test, 5_000).await;
    let invitees: Vec<_> = (0..1_000)
        .map(|i| invitee(&format!("person{i:04}@acme.example")))
        .collect();
    let mut message = reservation(&acct, invitees);
    message.dry_run = true;
    let started = Instant::now();
    let preview = reserve(&test, message.clone()).await.expect("dry run");
    let dry = started.elapsed();
    assert!(verdicts(&preview).iter().all(|v| *v == Verdict::Reserved));

    message.dry_run = false;
    let started = Instant::now();
    let answer = reserve(&test, message.clone()).await.expect("reserved");
    let real = started.elapsed();
    assert_eq!(answer.results.len(), 1_000);
    assert!(verdicts(&answer).iter().all(|v| *v == Verdict::Reserved));
    assert_eq!(answer.seats_used, 1_001);
    assert_eq!(users_of(&test, &acct).await, 1_001);
    assert_eq!(audit_of(&test, &acct, "user.created").await, 1_000);

    let started = Instant::now();
    let retry = reserve(&test, message).await.expect("retry");
    let retried = started.elapsed();
    assert_eq!(retry.results, answer.results);
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    eprintln!(
        "ReserveInvitees x1000 ({build} build): dry run {dry:?}, reserve {real:?}, idempotent retry {retried:?}"
    );
    assert!(real.as_secs() < 10, "took {real:?}");
    test.stop().await;
}

// -- ActivateInvitedUser -------------------------------------------------

#[tokio::test]
async fn activation_sets_only_the_chosen_fields_and_is_idempotent() {
    let test = start().await;
    let acct = account(&test, 5).await;
    let ada = invitee("ada@acme.example");
    let mut message = reservation(&acct, vec![ada.clone()]);
    message.metadata = Some(convert::json_to_struct(&json!({"lines": ["1"]})));
    message.locale = "fr".into();
    let user_id = reserve(&test, message).await.expect("reserved").results[0]
        .user_id
        .clone();
    let reserved = stored(&test, &user_id).await.expect("row");

    // Bad input: every field at fault, nothing changed.
    let mut bad = activation(&acct, &ada, &user_id, "short");
    bad.display_name = " ".into();
    bad.locale = "de".into();
    let err = activate(&test, bad).await.expect_err("invalid");
    assert_eq!(fields(&err), ["display_name", "password", "locale"]);
    // Another invitation, another account, an unknown user.
    let mut wrong = activation(&acct, &ada, &user_id, "correct horse battery");
    wrong.invitation_id = Uuid::new_v4().to_string();
    let err = activate(&test, wrong).await.expect_err("other invitation");
    assert_eq!(reason(&err), "INVALID_STATE");
    let other = account(&test, 5).await;
    let err = activate(
        &test,
        activation(&other, &ada, &user_id, "correct horse battery"),
    )
    .await
    .expect_err("other account");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(stored(&test, &user_id).await, Some(reserved.clone()));

    let mut accept = activation(&acct, &ada, &user_id, "correct horse battery");
    accept.metadata = Some(convert::json_to_struct(&json!({"lines": ["2"]})));
    let done = activate(&test, accept.clone()).await.expect("activated");
    assert!(!done.already_activated);
    let user = done.user.expect("user");
    assert_eq!(user.status, pb::UserStatus::Active as i32);
    assert_eq!(user.display_name, "Ada Lovelace");
    assert_eq!(user.role_name, "User");
    assert_eq!(user.invitation_id, ada.invitation_id);
    let row = stored(&test, &user_id).await.expect("row");
    let hash = row.password_hash.clone().expect("hash");
    assert!(hash.starts_with("$argon2id$"));
    assert!(
        test.state
            .passwords
            .verify("correct horse battery".into(), &hash)
            .await
            .expect("verify")
    );
    assert_eq!(row.locale, "fr", "kept: none chosen");
    assert_eq!(row.metadata, Some(json!({"lines": ["2"]})), "replaced");
    assert!(row.activate_time.is_some());
    // Nothing else moved (P15).
    assert_eq!(
        (
            &row.email,
            &row.role_id,
            &row.team_id,
            &row.products,
            &row.owner,
            &row.origin
        ),
        (
            &reserved.email,
            &reserved.role_id,
            &reserved.team_id,
            &reserved.products,
            &reserved.owner,
            &reserved.origin
        )
    );
    assert_eq!(audit_of(&test, &acct, "user.activated").await, 1);
    let snapshot = test
        .state
        .sessions
        .get_principal(row.id)
        .await
        .expect("redis")
        .expect("snapshot written");
    assert_eq!(snapshot.account_id, acct.id);

    // A retry, even with another password: the same user, untouched.
    let events = outbox(&test).await;
    accept.password = "another password entirely".into();
    let again = activate(&test, accept).await.expect("retry");
    assert!(again.already_activated);
    assert_eq!(again.user.expect("user").id, user_id);
    assert_eq!(
        stored(&test, &user_id).await.expect("row").password_hash,
        Some(hash)
    );
    assert_eq!(outbox(&test).await, events, "no second user.activated");
    test.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_activations_of_one_invitation_agree() {
    let test = start().await;
    let acct = account(&test, 5).await;
    let ada = invitee("ada@acme.example");
    let user_id = reserve(&test, reservation(&acct, vec![ada.clone()]))
        .await
        .expect("reserved")
        .results[0]
        .user_id
        .clone();
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let passwords = ["first password here", "second password here"];
    let calls: Vec<_> = passwords
        .iter()
        .map(|password| {
            let api = test.api.clone();
            let barrier = barrier.clone();
            let message = activation(&acct, &ada, &user_id, password);
            tokio::spawn(async move {
                barrier.wait().await;
                api.activate_invited_user(request(&svc(), message))
                    .await
                    .map(Response::into_inner)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("task").expect("activated"));
    }
    let ids: Vec<_> = answers
        .iter()
        .map(|a| a.user.as_ref().expect("user").id.clone())
        .collect();
    assert_eq!(ids, [user_id.clone(), user_id.clone()]);
    let winners: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(_, a)| !a.already_activated)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one activation");
    let hash = stored(&test, &user_id)
        .await
        .expect("row")
        .password_hash
        .expect("hash");
    for (i, password) in passwords.iter().enumerate() {
        let verifies = test
            .state
            .passwords
            .verify((*password).into(), &hash)
            .await
            .expect("verify");
        assert_eq!(verifies, i == winners[0], "only the winner's password");
    }
    assert_eq!(users_of(&test, &acct).await, 2);
    assert_eq!(audit_of(&test, &acct, "user.activated").await, 1);
    test.stop().await;
}

// -- ReleaseInvitees -----------------------------------------------------

#[tokio::test]
async fn release_frees_the_seat_and_never_touches_members() {
    let test = start().await;
    let acct = account(&test, 3).await;
    let (ada, bob) = (invitee("ada@acme.example"), invitee("bob@acme.example"));
    let full = reserve(&test, reservation(&acct, vec![ada.clone(), bob.clone()]))
        .await
        .expect("reserved");
    let ada_id = full.results[0].user_id.clone();
    let cy = invitee("cy@acme.example");
    let refused = reserve(&test, reservation(&acct, vec![cy.clone()]))
        .await
        .expect("full");
    assert_eq!(verdicts(&refused), [Verdict::SeatLimitReached]);

    let events = outbox(&test).await;
    let answer = release(
        &test,
        &acct,
        vec![
            // A stale retry naming an older invitation: nothing happens.
            by_id(&ada_id, &Uuid::new_v4().to_string()),
            by_id(&ada_id, &ada.invitation_id),
            by_id(&ada_id, ""),
            internal::ReleaseTarget {
                email: "Owner@Acme.example".into(),
                ..Default::default()
            },
            by_id(&Uuid::new_v4().to_string(), ""),
        ],
    )
    .await
    .expect("released");
    assert_eq!(
        outcomes(&answer),
        [
            Outcome::NotFound,
            Outcome::Released,
            Outcome::NotFound,
            Outcome::NotInvited,
            Outcome::NotFound
        ]
    );
    assert_eq!(answer.results[1].user_id, ada_id);
    assert_eq!(answer.results[3].user_id, acct.owner.to_string());
    assert_eq!(
        answer.results[3].target.as_ref().expect("target").email,
        "Owner@Acme.example"
    );
    assert_eq!(answer.seats_used, 2);
    assert!(stored(&test, &ada_id).await.is_none());
    assert!(stored(&test, &acct.owner.to_string()).await.is_some());
    assert_eq!(outbox(&test).await, events + 1, "one user.deleted");
    let audit = audit_event::Entity::find()
        .filter(audit_event::Column::AccountId.eq(acct.id))
        .filter(audit_event::Column::Action.eq("user.deleted"))
        .one(&test.state.db)
        .await
        .expect("query")
        .expect("audit");
    assert_eq!(audit.target_id, ada_id);
    assert_eq!(audit.details.expect("details")["reason"], "revoked");

    // The freed seat goes to the next invitee.
    let now_reserved = reserve(&test, reservation(&acct, vec![cy]))
        .await
        .expect("reserved");
    assert_eq!(verdicts(&now_reserved), [Verdict::Reserved]);
    // By email, and idempotent.
    let by_email = || internal::ReleaseTarget {
        email: "bob@acme.example".into(),
        invitation_id: bob.invitation_id.clone(),
        ..Default::default()
    };
    let answer = release(&test, &acct, vec![by_email()]).await.expect("bob");
    assert_eq!(outcomes(&answer), [Outcome::Released]);
    let answer = release(&test, &acct, vec![by_email()])
        .await
        .expect("again");
    assert_eq!(outcomes(&answer), [Outcome::NotFound]);

    let err = release(
        &test,
        &acct,
        vec![
            internal::ReleaseTarget {
                user_id: ada_id.clone(),
                email: "ada@acme.example".into(),
                invitation_id: String::new(),
            },
            internal::ReleaseTarget::default(),
            by_id("nope", ""),
        ],
    )
    .await
    .expect_err("invalid");
    assert_eq!(
        fields(&err),
        ["targets[0]", "targets[1]", "targets[2].user_id"]
    );
    let err = release(&test, &acct, vec![]).await.expect_err("empty");
    assert_eq!(fields(&err), ["targets"]);
    test.stop().await;
}

// -- Tenant isolation ----------------------------------------------------

#[tokio::test]
async fn another_accounts_ids_answer_not_found() {
    let test = start().await;
    let a = account(&test, 5).await;
    let b = account(&test, 5).await;
    let b_invitee = invitee("bea@acme.example");
    let b_user = reserve(&test, reservation(&b, vec![b_invitee.clone()]))
        .await
        .expect("b reserved")
        .results[0]
        .user_id
        .clone();

    let err = test
        .api
        .get_invitation_context(request(
            &svc(),
            internal::GetInvitationContextRequest {
                account_id: a.id.to_string(),
                inviter: Some(inviter(&b)),
                ..Default::default()
            },
        ))
        .await
        .expect_err("b's inviter");
    assert_eq!(err.code(), Code::NotFound);
    let err = test
        .api
        .get_invitation_context(request(
            &svc(),
            internal::GetInvitationContextRequest {
                account_id: a.id.to_string(),
                role_id: b.admin_role.to_string(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("b's role");
    assert_eq!(err.code(), Code::NotFound);
    let mut message = reservation(&a, vec![invitee("x@acme.example")]);
    message.role_id = b.admin_role.to_string();
    let err = reserve(&test, message).await.expect_err("b's role");
    assert_eq!(err.code(), Code::NotFound);
    let err = activate(
        &test,
        activation(&a, &b_invitee, &b_user, "correct horse battery"),
    )
    .await
    .expect_err("b's user");
    assert_eq!(err.code(), Code::NotFound);
    let answer = release(&test, &a, vec![by_id(&b_user, "")])
        .await
        .expect("release");
    assert_eq!(outcomes(&answer), [Outcome::NotFound]);
    let answer = release(
        &test,
        &a,
        vec![internal::ReleaseTarget {
            email: "bea@acme.example".into(),
            ..Default::default()
        }],
    )
    .await
    .expect("release");
    assert_eq!(outcomes(&answer), [Outcome::NotFound]);
    assert_eq!(
        stored(&test, &b_user).await.expect("b untouched").status,
        usher_identity::domain::UserStatus::Invited
    );
    // The same email may be invited in both accounts.
    let answer = reserve(&test, reservation(&a, vec![invitee("bea@acme.example")]))
        .await
        .expect("a reserved");
    assert_eq!(verdicts(&answer), [Verdict::Reserved]);
    let err = test
        .api
        .create_session(request(
            &svc(),
            internal::CreateSessionRequest {
                account_id: a.id.to_string(),
                user_id: b.owner.to_string(),
                invitation_id: Uuid::new_v4().to_string(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("b's owner");
    assert_eq!(err.code(), Code::NotFound);
    test.stop().await;
}

// -- CreateSession -------------------------------------------------------

#[tokio::test]
async fn create_session_signs_in_the_new_member() {
    let test = start().await;
    let acct = account(&test, 5).await;
    let ada = invitee("ada@acme.example");
    let user_id = reserve(&test, reservation(&acct, vec![ada.clone()]))
        .await
        .expect("reserved")
        .results[0]
        .user_id
        .clone();
    let session_request = |invitation_id: &str| internal::CreateSessionRequest {
        account_id: acct.id.to_string(),
        user_id: user_id.clone(),
        invitation_id: invitation_id.into(),
        client_ip: "203.0.113.7".into(),
        user_agent: "Mozilla/5.0".into(),
    };
    let err = test
        .api
        .create_session(request(&svc(), session_request(&ada.invitation_id)))
        .await
        .expect_err("still invited");
    assert_eq!(reason(&err), "INVALID_STATE");

    activate(
        &test,
        activation(&acct, &ada, &user_id, "correct horse battery"),
    )
    .await
    .expect("activated");
    let err = test
        .api
        .create_session(request(
            &svc(),
            session_request(&Uuid::new_v4().to_string()),
        ))
        .await
        .expect_err("another invitation");
    assert_eq!(reason(&err), "INVALID_STATE");
    assert_eq!(
        stored(&test, &user_id)
            .await
            .expect("row")
            .last_sign_in_time,
        None,
        "a refused session records no sign-in"
    );
    let err = test
        .api
        .create_session(request(&svc(), session_request("nope")))
        .await
        .expect_err("malformed");
    assert_eq!(fields(&err), ["invitation_id"]);

    let session = test
        .api
        .create_session(request(&svc(), session_request(&ada.invitation_id)))
        .await
        .expect("session")
        .into_inner()
        .session
        .expect("session");
    assert_eq!(session.user_id, user_id);
    assert_eq!(session.account_id, acct.id.to_string());
    assert!(!session.access_token.is_empty() && !session.refresh_token.is_empty());
    assert!(session.access_token_expire_time.is_some() && session.expire_time.is_some());
    let record = test
        .state
        .sessions
        .resolve_access(&session.access_token)
        .await
        .expect("redis")
        .expect("access token resolves");
    assert_eq!(record.id.to_string(), session.id);
    assert_eq!(record.user_id.to_string(), user_id);
    assert_eq!(record.client_ip.as_deref(), Some("203.0.113.7"));
    let snapshot = test
        .state
        .sessions
        .get_principal(record.user_id)
        .await
        .expect("redis")
        .expect("snapshot");
    assert!(
        snapshot.principal_for(&record).is_some(),
        "the gateway admits it"
    );
    assert!(
        stored(&test, &user_id)
            .await
            .expect("row")
            .last_sign_in_time
            .is_some()
    );
    test.stop().await;
}

#[tokio::test]
async fn reservations_are_written_on_a_pool_of_their_own() {
    let test = start().await;
    let acct = account(&test, 400).await;
    // Every connection of the calls' pool (20 in tests) busy in another
    // transaction: a reservation batch still gets a connection at once.
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(
            sea_orm::TransactionTrait::begin(&test.state.db)
                .await
                .expect("begin"),
        );
    }
    let invitees: Vec<_> = (0..300)
        .map(|n| invitee(&format!("bulk{n}@acme.example")))
        .collect();
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        reserve(&test, reservation(&acct, invitees)),
    )
    .await
    .expect("the batch did not wait for the calls' pool")
    .expect("reserved");
    assert_eq!(
        verdicts(&answer),
        vec![Verdict::Reserved; 300],
        "every invitee reserved"
    );
    for txn in held {
        txn.rollback().await.expect("rollback");
    }
    let invited = user::Entity::find()
        .filter(user::Column::AccountId.eq(acct.id))
        .filter(user::Column::Status.eq(UserStatus::Invited.as_str()))
        .count(&test.state.db)
        .await
        .expect("count");
    assert_eq!(invited, 300, "written and committed");
    test.stop().await;
}
