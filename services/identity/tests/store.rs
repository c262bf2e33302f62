//! The identity store's conformance suite: the same cases run on PostgreSQL
//! (production) and on SQLite (`usher dev`'s embedded backend), so the
//! store boundary answers alike on both — one classification of database
//! errors (`StoreError`), the typed status and origin columns, the one
//! constructor per kind of user row, the batched invited-user insert, and
//! the effects (audit rows and outbox events) written with a change.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, Database, DatabaseConnection, EntityTrait, PaginatorTrait,
    QueryFilter, Statement, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use usher_identity::{
    domain::{
        Origin, UserStatus,
        effects::{Actor, Audit, Effects},
        reservations::NewInvitee,
    },
    migration::Migrator,
    store::{
        accounts, directory, effects,
        entities::{account, audit_event, role, user},
        holders, teams,
        users::{self, NewUser},
    },
};
use usher_kit::{db::StoreError, testing::TestDatabase};
use uuid::Uuid;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap()
}

/// An account with its built-in roles; returns (account, User role).
async fn account(db: &DatabaseConnection) -> (Uuid, Uuid) {
    let id = Uuid::new_v4();
    accounts::insert(
        db,
        account::Model {
            id,
            name: "Acme".into(),
            slug: format!("acme-{}", &Uuid::new_v4().simple().to_string()[..8]),
            default_locale: "en".into(),
            owner_user_id: None,
            seat_limit: 10,
            products: serde_json::json!([]),
            allowed_email_domains: serde_json::json!([]),
            invitation_lifetime_secs: None,
            create_time: now(),
            update_time: now(),
        },
    )
    .await
    .expect("account");
    let (_, member) = accounts::create_built_in_roles(db, id, now())
        .await
        .expect("roles");
    (id, member.id)
}

fn new_user(
    account_id: Uuid,
    role_id: Uuid,
    email: Option<&str>,
    username: Option<&str>,
) -> NewUser {
    NewUser {
        account_id,
        email: email.map(str::to_owned),
        username: username.map(str::to_owned),
        display_name: "Ada Lovelace".into(),
        role_id,
        team_id: None,
        products: Vec::new(),
        locale: String::new(),
        metadata: None,
    }
}

/// Each kind of user row reads back typed: status, origin and the fields
/// its constructor sets.
async fn each_kind_of_row_round_trips(db: &DatabaseConnection) {
    let (account_id, role) = account(db).await;
    let owner = users::new_owner_row(
        Uuid::new_v4(),
        new_user(account_id, role, Some("owner@acme.example"), None),
        "$argon2id$stored".into(),
        now(),
    );
    let direct = users::new_direct_row(
        Uuid::new_v4(),
        new_user(account_id, role, None, Some("kiosk")),
        None,
        false,
        now(),
    );
    let invited = users::new_invited_row(
        Uuid::new_v4(),
        new_user(account_id, role, Some("ada@acme.example"), None),
        Uuid::new_v4(),
        "user:someone".into(),
        now(),
    );
    for row in [owner, direct, invited] {
        let written = users::insert(db, row.clone()).await.expect("insert");
        let read = user::Entity::find_by_id(row.id)
            .one(db)
            .await
            .expect("read")
            .expect("row");
        assert_eq!(read, written);
        assert_eq!((read.status, read.origin), (row.status, row.origin));
    }
    let kinds: Vec<(UserStatus, Origin)> = user::Entity::find()
        .all(db)
        .await
        .expect("all")
        .into_iter()
        .filter(|u| u.account_id == account_id)
        .map(|u| (u.status, u.origin))
        .collect();
    for expected in [
        (UserStatus::Active, Origin::Owner),
        (UserStatus::Invited, Origin::Invitation),
    ] {
        assert!(kinds.contains(&expected), "{kinds:?} lacks {expected:?}");
    }
}

/// A second user with the same email or username in one account is
/// `StoreError::Taken`; the same email in another account is not.
async fn a_taken_email_or_username_is_taken(db: &DatabaseConnection) {
    let (account_id, role) = account(db).await;
    let first = users::new_direct_row(
        Uuid::new_v4(),
        new_user(account_id, role, Some("ada@acme.example"), Some("ada")),
        None,
        false,
        now(),
    );
    users::insert(db, first).await.expect("first");
    for (email, username) in [(Some("ada@acme.example"), None), (None, Some("ada"))] {
        let again = users::new_direct_row(
            Uuid::new_v4(),
            new_user(account_id, role, email, username),
            None,
            false,
            now(),
        );
        let err = users::insert(db, again).await.expect_err("taken");
        assert!(matches!(err, StoreError::Taken(_)), "{err:?}");
    }
    let (other, other_role) = account(db).await;
    let elsewhere = users::new_direct_row(
        Uuid::new_v4(),
        new_user(other, other_role, Some("ada@acme.example"), Some("ada")),
        None,
        false,
        now(),
    );
    users::insert(db, elsewhere).await.expect("another account");
}

/// `lock_user` finds the user of its account only: another account's id is
/// NOT_FOUND, like an unknown one.
async fn lock_user_is_scoped_to_its_account(db: &DatabaseConnection) {
    let (account_id, role) = account(db).await;
    let (other, _) = account(db).await;
    let row = users::new_direct_row(
        Uuid::new_v4(),
        new_user(account_id, role, Some("ada@acme.example"), None),
        None,
        false,
        now(),
    );
    users::insert(db, row.clone()).await.expect("insert");
    let txn = db.begin().await.expect("begin");
    let locked = users::lock_user(&txn, account_id, row.id)
        .await
        .expect("locked");
    assert_eq!(locked.id, row.id);
    for (account, id) in [(other, row.id), (account_id, Uuid::new_v4())] {
        let err = users::lock_user(&txn, account, id)
            .await
            .expect_err("scoped");
        assert!(matches!(err, StoreError::NotFound("user")), "{err:?}");
    }
    txn.commit().await.expect("commit");
}

/// The invited users of one reservation are written in one statement, each
/// as `new_invited_row` makes it; an invitation id already holding a user
/// is `StoreError::Taken` and writes none of the batch.
async fn the_batched_invited_insert_writes_every_row(db: &DatabaseConnection) {
    let (account_id, role) = account(db).await;
    let invitees: Vec<NewInvitee> = (0..250)
        .map(|i| NewInvitee {
            id: Uuid::new_v4(),
            email: format!("p{i}@acme.example"),
            display_name: format!("Person {i}"),
            invitation_id: Uuid::new_v4(),
        })
        .collect();
    let rows = directory::InvitedRows {
        account_id,
        role_id: role,
        team_id: None,
        products: &[],
        locale: "fr",
        metadata: None,
        invited_by: "user:inviter",
    };
    directory::insert_invited(db, &rows, &invitees, now())
        .await
        .expect("batch");
    let written = user::Entity::find()
        .all(db)
        .await
        .expect("all")
        .into_iter()
        .filter(|u| u.account_id == account_id)
        .collect::<Vec<_>>();
    assert_eq!(written.len(), invitees.len());
    let sample = written
        .iter()
        .find(|u| u.id == invitees[7].id)
        .expect("invitee 7");
    let expected = users::new_invited_row(
        invitees[7].id,
        NewUser {
            locale: "fr".into(),
            display_name: "Person 7".into(),
            ..new_user(account_id, role, Some("p7@acme.example"), None)
        },
        invitees[7].invitation_id,
        "user:inviter".into(),
        now(),
    );
    assert_eq!(sample, &expected);

    let clash = [
        NewInvitee {
            id: Uuid::new_v4(),
            email: "new@acme.example".into(),
            display_name: String::new(),
            invitation_id: Uuid::new_v4(),
        },
        NewInvitee {
            id: Uuid::new_v4(),
            email: "other@acme.example".into(),
            display_name: String::new(),
            invitation_id: invitees[0].invitation_id,
        },
    ];
    let txn = db.begin().await.expect("begin");
    let err = directory::insert_invited(&txn, &rows, &clash, now())
        .await
        .expect_err("invitation id taken");
    assert!(matches!(err, StoreError::Taken(_)), "{err:?}");
    txn.rollback().await.expect("rollback");
    let count = user::Entity::find().count(db).await.expect("count");
    let accounts_users = user::Entity::find()
        .all(db)
        .await
        .expect("all")
        .into_iter()
        .filter(|u| u.account_id == account_id)
        .count();
    assert_eq!(accounts_users, invitees.len(), "of {count} rows");
}

/// The seat counter equals a count of the account's active and invited
/// users after every kind of change: a batched invite, single inserts,
/// status changes in and out of the counted set (and within it), a bulk
/// status change and deletes — and other accounts are left alone.
async fn the_seat_counter_follows_every_change(db: &DatabaseConnection) {
    async fn agree(db: &DatabaseConnection, account_id: Uuid, expected: u64) {
        let counted = accounts::seats_counted(db, account_id)
            .await
            .expect("count");
        let counter = accounts::seats_used(db, account_id).await.expect("counter");
        assert_eq!((counter, counted), (expected, expected));
    }
    async fn set_status(db: &DatabaseConnection, ids: &[Uuid], status: UserStatus) {
        user::Entity::update_many()
            .col_expr(
                user::Column::Status,
                sea_orm::sea_query::Expr::value(status.as_str()),
            )
            .filter(user::Column::Id.is_in(ids.iter().copied()))
            .exec(db)
            .await
            .expect("status");
    }
    let (account_id, role) = account(db).await;
    let (other, other_role) = account(db).await;
    agree(db, account_id, 0).await;
    let invitees: Vec<NewInvitee> = (0..40)
        .map(|i| NewInvitee {
            id: Uuid::new_v4(),
            email: format!("s{i}@acme.example"),
            display_name: String::new(),
            invitation_id: Uuid::new_v4(),
        })
        .collect();
    let rows = directory::InvitedRows {
        account_id,
        role_id: role,
        team_id: None,
        products: &[],
        locale: "",
        metadata: None,
        invited_by: "user:inviter",
    };
    let txn = db.begin().await.expect("begin");
    directory::insert_invited(&txn, &rows, &invitees, now())
        .await
        .expect("batch");
    txn.commit().await.expect("commit");
    agree(db, account_id, 40).await;
    // A rolled-back change counts nothing.
    let txn = db.begin().await.expect("begin");
    let more = [NewInvitee {
        id: Uuid::new_v4(),
        email: "gone@acme.example".into(),
        display_name: String::new(),
        invitation_id: Uuid::new_v4(),
    }];
    directory::insert_invited(&txn, &rows, &more, now())
        .await
        .expect("one more");
    txn.rollback().await.expect("rollback");
    agree(db, account_id, 40).await;

    let direct = users::insert(
        db,
        users::new_direct_row(
            Uuid::new_v4(),
            new_user(other, other_role, Some("d@acme.example"), None),
            None,
            false,
            now(),
        ),
    )
    .await
    .expect("direct user");
    agree(db, other, u64::from(direct.status == UserStatus::Active)).await;
    let other_seats = accounts::seats_used(db, other).await.expect("other");

    let ids: Vec<Uuid> = invitees.iter().map(|i| i.id).collect();
    set_status(db, &ids[..10], UserStatus::Active).await; // within the set
    agree(db, account_id, 40).await;
    set_status(db, &ids[..5], UserStatus::Inactive).await; // out of it
    agree(db, account_id, 35).await;
    set_status(db, &ids[..3], UserStatus::Active).await; // back in
    agree(db, account_id, 38).await;
    user::Entity::delete_many()
        .filter(user::Column::Id.is_in(ids[..8].iter().copied()))
        .exec(db)
        .await
        .expect("delete");
    // ids 0..3 active, 3..5 inactive, 5..8 active: 6 counted rows deleted.
    agree(db, account_id, 32).await;
    assert_eq!(
        accounts::seats_used(db, other).await.expect("other"),
        other_seats
    );
}

/// The holder counters equal a count of the users holding each role and
/// belonging to each team after every kind of change: a batched invite,
/// a single insert, role and team moves (one row, many rows, to no team),
/// a rolled-back insert, deletes and a released team — and another
/// account's counters are left alone.
async fn the_holder_counters_follow_every_change(db: &DatabaseConnection) {
    /// Every holder's counter against a count of the users table.
    async fn agree(db: &DatabaseConnection, holders: &[Uuid]) -> HashMap<Uuid, u64> {
        let mut counted: HashMap<Uuid, u64> = HashMap::new();
        for row in user::Entity::find().all(db).await.expect("users") {
            for held in [Some(row.role_id), row.team_id].into_iter().flatten() {
                if holders.contains(&held) {
                    *counted.entry(held).or_default() += 1;
                }
            }
        }
        let counters = holders::counts(db, holders.to_vec())
            .await
            .expect("counters");
        assert_eq!(counters, counted);
        counters
    }
    async fn set(db: &DatabaseConnection, ids: &[Uuid], column: user::Column, to: Option<Uuid>) {
        user::Entity::update_many()
            .col_expr(column, sea_orm::sea_query::Expr::value(to))
            .filter(user::Column::Id.is_in(ids.iter().copied()))
            .exec(db)
            .await
            .expect("move");
    }
    let (account_id, member) = account(db).await;
    let admin = role::Entity::find()
        .filter(role::Column::AccountId.eq(account_id))
        .filter(role::Column::Name.eq("Admin"))
        .one(db)
        .await
        .expect("admin")
        .expect("admin")
        .id;
    let red = teams::insert(db, account_id, "Red", "", now())
        .await
        .expect("red")
        .id;
    let blue = teams::insert(db, account_id, "Blue", "", now())
        .await
        .expect("blue")
        .id;
    let (other, other_member) = account(db).await;
    let holders = [member, admin, red, blue];
    assert!(agree(db, &holders).await.is_empty());

    let invitees: Vec<NewInvitee> = (0..30)
        .map(|i| NewInvitee {
            id: Uuid::new_v4(),
            email: format!("h{i}@acme.example"),
            display_name: String::new(),
            invitation_id: Uuid::new_v4(),
        })
        .collect();
    let rows = directory::InvitedRows {
        account_id,
        role_id: member,
        team_id: Some(red),
        products: &[],
        locale: "",
        metadata: None,
        invited_by: "user:inviter",
    };
    directory::insert_invited(db, &rows, &invitees, now())
        .await
        .expect("batch");
    let counters = agree(db, &holders).await;
    assert_eq!((counters[&member], counters[&red]), (30, 30));
    let other_user = users::insert(
        db,
        users::new_direct_row(
            Uuid::new_v4(),
            new_user(other, other_member, Some("o@acme.example"), None),
            None,
            false,
            now(),
        ),
    )
    .await
    .expect("other user");
    agree(db, &[other_member]).await;

    // A rolled-back insert counts nothing.
    let txn = db.begin().await.expect("begin");
    let rolled_back = [NewInvitee {
        id: Uuid::new_v4(),
        email: "gone@acme.example".into(),
        display_name: String::new(),
        invitation_id: Uuid::new_v4(),
    }];
    directory::insert_invited(&txn, &rows, &rolled_back, now())
        .await
        .expect("one more");
    txn.rollback().await.expect("rollback");
    agree(db, &holders).await;

    let ids: Vec<Uuid> = invitees.iter().map(|i| i.id).collect();
    set(db, &ids[..5], user::Column::RoleId, Some(admin)).await;
    set(db, &ids[..3], user::Column::TeamId, Some(blue)).await;
    set(db, &ids[5..7], user::Column::TeamId, None).await;
    set(db, &ids[7..8], user::Column::RoleId, Some(member)).await; // no move
    let counters = agree(db, &holders).await;
    assert_eq!(
        [
            counters[&member],
            counters[&admin],
            counters[&red],
            counters[&blue]
        ],
        [25, 5, 25, 3]
    );
    // Role and team of one row at once, then back.
    user::Entity::update_many()
        .col_expr(user::Column::RoleId, sea_orm::sea_query::Expr::value(admin))
        .col_expr(user::Column::TeamId, sea_orm::sea_query::Expr::value(blue))
        .filter(user::Column::Id.eq(ids[10]))
        .exec(db)
        .await
        .expect("both");
    agree(db, &holders).await;
    user::Entity::delete_many()
        .filter(user::Column::Id.is_in(ids[..4].iter().copied()))
        .exec(db)
        .await
        .expect("delete");
    let counters = agree(db, &holders).await;
    assert_eq!(counters[&admin], 2);
    // A team released and deleted: nobody left in it.
    set(db, &ids, user::Column::TeamId, None).await;
    teams::delete(db, blue).await.expect("delete team");
    let counters = agree(db, &holders).await;
    assert!(!counters.contains_key(&blue) && !counters.contains_key(&red));
    assert_eq!(
        holders::counts(db, vec![other_member])
            .await
            .expect("other")[&other_member],
        1,
        "{other_user:?}"
    );
}

/// The effects of a decision: every audit entry as a row with the call's
/// actor and request id, every event in the outbox.
async fn effects_write_audit_rows_and_outbox_events(db: &DatabaseConnection) {
    let (account_id, _) = account(db).await;
    let mut decided = Effects::new();
    for action in ["user.created", "user.role_changed"] {
        decided.audit(Audit {
            account_id,
            action,
            target_type: "user",
            target_id: "u1".into(),
            target_name: "Ada".into(),
            details: Some(serde_json::json!({"field": action})),
        });
    }
    decided.event(
        "identity.user.created",
        "usher.events.v1.UserCreated",
        "u1",
        Some(account_id),
        &prost_types::Timestamp::default(),
        now(),
    );
    let outbox_before = outbox_rows(db).await;
    let txn = db.begin().await.expect("begin");
    effects::apply(&txn, decided, &Actor::system(), "req-1", now())
        .await
        .expect("apply");
    txn.commit().await.expect("commit");
    let audited: Vec<audit_event::Model> = audit_event::Entity::find()
        .all(db)
        .await
        .expect("audit")
        .into_iter()
        .filter(|a| a.account_id == account_id)
        .collect();
    let mut actions: Vec<&str> = audited.iter().map(|a| a.action.as_str()).collect();
    actions.sort_unstable();
    assert_eq!(actions, ["user.created", "user.role_changed"]);
    assert!(
        audited
            .iter()
            .all(|a| a.request_id == "req-1" && a.actor_kind == "system")
    );
    assert_eq!(outbox_rows(db).await, outbox_before + 1);
}

async fn outbox_rows(db: &DatabaseConnection) -> i64 {
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(Statement::from_string(
            backend,
            "SELECT COUNT(*) AS n FROM usher_outbox",
        ))
        .await
        .expect("count")
        .expect("row");
    row.try_get("", "n").expect("n")
}

/// A database at the schema before the holder counters, with users in two
/// accounts, then migrated: the migration counts what was already there.
async fn holder_counters_are_backfilled(db: &DatabaseConnection) {
    let before = Migrator::migrations()
        .iter()
        .position(|m| m.name() == "m20261206_000003_create_holder_counts")
        .expect("the holder counters' migration");
    Migrator::up(db, Some(u32::try_from(before).expect("few")))
        .await
        .expect("the migrations before the holder counters");
    assert!(
        holders::counts(db, vec![Uuid::new_v4()]).await.is_err(),
        "no counters yet: their migration creates them"
    );
    let (account_id, member) = account(db).await;
    let red = teams::insert(db, account_id, "Red", "", now())
        .await
        .expect("red")
        .id;
    let (other, other_member) = account(db).await;
    for (i, (account_id, role, team)) in [
        (account_id, member, Some(red)),
        (account_id, member, Some(red)),
        (account_id, member, None),
        (other, other_member, None),
    ]
    .into_iter()
    .enumerate()
    {
        let mut user = new_user(account_id, role, Some(&format!("b{i}@acme.example")), None);
        user.team_id = team;
        users::insert(
            db,
            users::new_direct_row(Uuid::new_v4(), user, None, false, now()),
        )
        .await
        .expect("user");
    }
    Migrator::up(db, None).await.expect("the holder counters");
    let counters = holders::counts(db, vec![member, red, other_member])
        .await
        .expect("counters");
    assert_eq!(
        counters,
        HashMap::from([(member, 3), (red, 2), (other_member, 1)])
    );
}

#[tokio::test]
async fn holder_counters_are_backfilled_on_postgresql() {
    let database = TestDatabase::create("identity_backfill").await.expect("db");
    let db = database.connect().await.expect("connect");
    holder_counters_are_backfilled(&db).await;
    db.close().await.expect("close");
    database.drop_database().await.expect("drop");
}

#[tokio::test]
async fn holder_counters_are_backfilled_on_sqlite() {
    let (db, dir) = fresh_sqlite().await;
    holder_counters_are_backfilled(&db).await;
    db.close().await.expect("close");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_search_text_keeps_a_finer_histogram_on_postgresql() {
    let database = TestDatabase::create("identity_stats").await.expect("db");
    let db = database.migrated::<Migrator>().await.expect("migrations");
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT attstattarget::int AS n FROM pg_attribute \
             WHERE attrelid = 'users'::regclass AND attname = 'search_text'",
        ))
        .await
        .expect("query")
        .expect("the column");
    let target: i32 = row.try_get("", "n").expect("n");
    assert_eq!(target, 1000, "1,000 histogram buckets for search estimates");
    db.close().await.expect("close");
    database.drop_database().await.expect("drop");
}

async fn on_postgresql(case: impl AsyncFnOnce(&DatabaseConnection)) {
    let database = TestDatabase::create("identity_store").await.expect("db");
    let db = database.migrated::<Migrator>().await.expect("migrations");
    case(&db).await;
    db.close().await.expect("close");
    database.drop_database().await.expect("drop");
}

/// An empty SQLite database in a directory of its own (removed by the
/// caller), with no migration applied.
async fn fresh_sqlite() -> (DatabaseConnection, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("usher-identity-store-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let db = Database::connect(format!(
        "sqlite://{}?mode=rwc",
        dir.join("identity.db").display()
    ))
    .await
    .expect("sqlite");
    (db, dir)
}

async fn on_sqlite(case: impl AsyncFnOnce(&DatabaseConnection)) {
    let (db, dir) = fresh_sqlite().await;
    Migrator::up(&db, None).await.expect("migrations");
    case(&db).await;
    db.close().await.expect("close");
    let _ = std::fs::remove_dir_all(dir);
}

/// One test per case and backend: `postgresql::<case>`, `sqlite::<case>`.
macro_rules! conformance_suite {
    ($($case:ident),* $(,)?) => {
        mod postgresql {
            $(
                #[tokio::test]
                async fn $case() {
                    super::on_postgresql(super::$case).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::on_sqlite(super::$case).await;
                }
            )*
        }
    };
}

conformance_suite!(
    each_kind_of_row_round_trips,
    a_taken_email_or_username_is_taken,
    lock_user_is_scoped_to_its_account,
    the_batched_invited_insert_writes_every_row,
    effects_write_audit_rows_and_outbox_events,
    the_seat_counter_follows_every_change,
    the_holder_counters_follow_every_change,
);
