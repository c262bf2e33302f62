//! Service tests of AccountService: sign-up, account settings and products
//! against PostgreSQL and Redis.

use std::sync::Arc;

use prost_types::FieldMask;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use tonic::Code;
use usher_identity::{
    api::convert,
    store::entities::user,
    testing::{TestIdentity, member, new_account_request, platform, request},
};
use usher_kit::clock::SystemClock;
use usher_proto::identity::v1::{self as pb, account_service_server::AccountService};
use uuid::Uuid;

use crate::common::{fields, reason};

#[tokio::test]
async fn create_account_makes_owner_roles_audit_and_events_and_is_idempotent() {
    let test = TestIdentity::start(Arc::new(SystemClock)).await;
    let mut create = new_account_request(5);
    create.request_id = "signup-1".into();
    let created = test
        .api
        .create_account(request(&platform(), create.clone()))
        .await
        .expect("created")
        .into_inner();
    let account = created.account.expect("account");
    let owner = created.owner.expect("owner");
    assert_eq!(account.slug, create.slug);
    assert_eq!(account.seats_used, 1);
    assert_eq!(owner.email, "owner@acme.example", "stored canonicalised");
    assert!(owner.owner);
    assert_eq!(owner.role_name, "Admin");
    assert_eq!(owner.status, pb::UserStatus::Active as i32);

    let stored = user::Entity::find_by_id(owner.id.parse::<Uuid>().expect("uuid"))
        .one(&test.state.db)
        .await
        .expect("query")
        .expect("row");
    assert_eq!(
        stored.email_canonical.as_deref(),
        Some("owner@acme.example")
    );
    assert!(
        stored
            .password_hash
            .as_deref()
            .expect("hash")
            .starts_with("$argon2id$v=19$m=19456,t=2,p=1$")
    );
    let roles = usher_identity::store::entities::role::Entity::find()
        .filter(
            usher_identity::store::entities::role::Column::AccountId
                .eq(account.id.parse::<Uuid>().expect("uuid")),
        )
        .all(&test.state.db)
        .await
        .expect("roles");
    assert_eq!(roles.len(), 2);
    assert_eq!(
        usher_kit::outbox::pending(&test.state.db)
            .await
            .expect("outbox"),
        2,
        "account.created and user.created"
    );

    // Same request id, same request: the same answer, nothing new.
    let again = test
        .api
        .create_account(request(&platform(), create.clone()))
        .await
        .expect("replayed")
        .into_inner();
    assert_eq!(again.account.expect("account").id, account.id);
    assert_eq!(
        usher_kit::outbox::pending(&test.state.db)
            .await
            .expect("outbox"),
        2
    );
    // Same request id, different request.
    let mut other = create.clone();
    other.name = "Other".into();
    let err = test
        .api
        .create_account(request(&platform(), other))
        .await
        .expect_err("conflict");
    assert_eq!(reason(&err), "IDEMPOTENCY_CONFLICT");
    // Slug taken.
    let mut taken = create;
    taken.request_id = String::new();
    let err = test
        .api
        .create_account(request(&platform(), taken))
        .await
        .expect_err("taken");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::AlreadyExists, "ALREADY_EXISTS")
    );
    test.stop().await;
}

#[tokio::test]
async fn create_account_reports_every_bad_field() {
    let test = TestIdentity::start(Arc::new(SystemClock)).await;
    let mut bad = new_account_request(0);
    bad.name = " ".into();
    bad.slug = "-Bad".into();
    bad.owner_email = "not an email".into();
    bad.owner_password = "short".into();
    bad.default_locale = "de".into();
    bad.products = vec!["nope".into()];
    let err = test
        .api
        .create_account(request(&platform(), bad))
        .await
        .expect_err("invalid");
    assert_eq!(err.code(), Code::InvalidArgument);
    let at_fault = fields(&err);
    for field in [
        "name",
        "slug",
        "owner_email",
        "owner_password",
        "default_locale",
        "seat_limit",
    ] {
        assert!(
            at_fault.iter().any(|f| f == field),
            "{field} missing from {at_fault:?}"
        );
    }
    let mut unknown_product = new_account_request(3);
    unknown_product.products = vec!["meter".into()];
    let err = test
        .api
        .create_account(request(&platform(), unknown_product))
        .await
        .expect_err("product");
    assert_eq!(fields(&err), ["products[0]"]);
    test.stop().await;
}

#[tokio::test]
async fn accounts_show_the_effective_invitation_lifetime() {
    let test = TestIdentity::start(Arc::new(SystemClock)).await;
    let day = Some(prost_types::Duration {
        seconds: 24 * 3600,
        nanos: 0,
    });
    assert_eq!(
        test.state
            .settings
            .default_invitation_lifetime
            .num_seconds(),
        24 * 3600,
        "the deployment default resources.proto names"
    );
    let created = test
        .api
        .create_account(request(&platform(), new_account_request(2)))
        .await
        .expect("created")
        .into_inner();
    let account = created.account.expect("account");
    assert_eq!(account.invitation_lifetime, day, "CreateAccount");
    let account_id: Uuid = account.id.parse().expect("uuid");
    let owner_id: Uuid = created.owner.expect("owner").id.parse().expect("uuid");
    let admin = member(
        account_id,
        owner_id,
        &usher_identity::testing::admin_permissions(),
    );
    let get = |admin: usher_kit::principal::Principal| {
        let api = test.api.clone();
        async move {
            api.get_account(request(&admin, pb::GetAccountRequest {}))
                .await
                .expect("get")
                .into_inner()
                .account
                .expect("account")
                .invitation_lifetime
        }
    };
    assert_eq!(get(admin.clone()).await, day, "GetAccount, no setting");
    let listed = test
        .api
        .list_accounts(request(&platform(), pb::ListAccountsRequest::default()))
        .await
        .expect("listed")
        .into_inner();
    let mine = listed
        .accounts
        .iter()
        .find(|a| a.id == account.id)
        .expect("listed");
    assert_eq!(mine.invitation_lifetime, day, "ListAccounts");

    // An account setting wins; clearing it returns to the default.
    let set = |seconds: Option<i64>| pb::UpdateAccountRequest {
        invitation_lifetime: seconds.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
        update_mask: Some(FieldMask {
            paths: vec!["invitation_lifetime".into()],
        }),
        ..Default::default()
    };
    let two_hours = Some(prost_types::Duration {
        seconds: 7200,
        nanos: 0,
    });
    let updated = test
        .api
        .update_account(request(&admin, set(Some(7200))))
        .await
        .expect("set")
        .into_inner();
    assert_eq!(
        updated.account.expect("account").invitation_lifetime,
        two_hours
    );
    assert_eq!(get(admin.clone()).await, two_hours);
    let cleared = test
        .api
        .update_account(request(&admin, set(None)))
        .await
        .expect("cleared")
        .into_inner();
    assert_eq!(cleared.account.expect("account").invitation_lifetime, day);
    assert_eq!(get(admin.clone()).await, day, "back to the default");
    test.stop().await;
}

#[tokio::test]
async fn products_subscription_and_account_settings() {
    let test = TestIdentity::start(Arc::new(SystemClock)).await;
    let registered = test
        .api
        .register_product(request(
            &platform(),
            pb::RegisterProductRequest {
                code: "meter".into(),
                display_name: "Postage meter".into(),
                permissions: vec![pb::Permission {
                    name: "meter.refill".into(),
                    description: "Refill the meter".into(),
                    product_code: String::new(),
                }],
            },
        ))
        .await
        .expect("registered")
        .into_inner();
    assert!(registered.created);
    let err = test
        .api
        .register_product(request(
            &platform(),
            pb::RegisterProductRequest {
                code: "users".into(),
                display_name: "x".into(),
                permissions: vec![],
            },
        ))
        .await
        .expect_err("core namespace");
    assert_eq!(fields(&err), ["code"]);

    let mut create = new_account_request(2);
    create.products = vec!["meter".into()];
    let created = test
        .api
        .create_account(request(&platform(), create))
        .await
        .expect("created")
        .into_inner();
    let account = created.account.expect("account");
    let account_id: Uuid = account.id.parse().expect("uuid");
    let owner_id: Uuid = created.owner.expect("owner").id.parse().expect("uuid");
    let admin = member(
        account_id,
        owner_id,
        &usher_identity::testing::admin_permissions(),
    );

    let view = test
        .api
        .get_account(request(&admin, pb::GetAccountRequest {}))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(view.products.len(), 1);
    assert_eq!(view.products[0].permissions[0].name, "meter.refill");
    assert_eq!(view.password_policy.expect("policy").min_length, 8);

    let updated = test
        .api
        .update_account(request(
            &admin,
            pb::UpdateAccountRequest {
                name: "Acme SAS".into(),
                default_locale: "fr".into(),
                allowed_email_domains: vec!["Acme.Example".into()],
                invitation_lifetime: Some(prost_types::Duration {
                    seconds: 7200,
                    nanos: 0,
                }),
                update_mask: Some(FieldMask {
                    paths: vec![
                        "name".into(),
                        "allowed_email_domains".into(),
                        "invitation_lifetime".into(),
                    ],
                }),
            },
        ))
        .await
        .expect("updated")
        .into_inner()
        .account
        .expect("account");
    assert_eq!(updated.name, "Acme SAS");
    assert_eq!(updated.default_locale, "en", "not in the mask, unchanged");
    assert_eq!(updated.allowed_email_domains, ["acme.example"]);
    let err = test
        .api
        .update_account(request(
            &admin,
            pb::UpdateAccountRequest {
                invitation_lifetime: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                update_mask: Some(FieldMask {
                    paths: vec!["invitation_lifetime".into()],
                }),
                ..Default::default()
            },
        ))
        .await
        .expect_err("too short");
    assert_eq!(fields(&err), ["invitation_lifetime"]);
    let err = test
        .api
        .update_account(request(
            &admin,
            pb::UpdateAccountRequest {
                update_mask: Some(FieldMask {
                    paths: vec!["slug".into()],
                }),
                ..Default::default()
            },
        ))
        .await
        .expect_err("immutable");
    assert_eq!(fields(&err), ["update_mask.paths[0]"]);

    let subscription = test
        .api
        .update_subscription(request(
            &platform(),
            pb::UpdateSubscriptionRequest {
                account_id: account.id.clone(),
                seat_limit: 10,
                products: vec![],
                update_mask: Some(FieldMask {
                    paths: vec!["seat_limit".into(), "products".into()],
                }),
            },
        ))
        .await
        .expect("subscription")
        .into_inner()
        .account
        .expect("account");
    assert_eq!(subscription.subscription.expect("sub").seat_limit, 10);
    let owner = user::Entity::find_by_id(owner_id)
        .one(&test.state.db)
        .await
        .expect("query")
        .expect("owner");
    assert!(
        convert::strings(&owner.products).is_empty(),
        "disabled product left the owner's grants"
    );
    let err = test
        .api
        .update_subscription(request(
            &platform(),
            pb::UpdateSubscriptionRequest {
                account_id: Uuid::new_v4().to_string(),
                seat_limit: 3,
                products: vec![],
                update_mask: Some(FieldMask {
                    paths: vec!["seat_limit".into()],
                }),
            },
        ))
        .await
        .expect_err("unknown account");
    assert_eq!(err.code(), Code::NotFound);

    let listed = test
        .api
        .list_accounts(request(
            &platform(),
            pb::ListAccountsRequest {
                slug: account.slug.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.accounts.len(), 1);
    assert_eq!(listed.total_size, 1);
    test.stop().await;
}
