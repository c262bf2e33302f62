//! The two readings of an invitation's state agree: the Rust one
//! (`InvitationState::read`, `Invitation::usable`) and its SQL twin in the
//! store (`state_condition`, `usable_condition`), on every stored state and
//! claim, at times on both sides of every boundary (to the microsecond),
//! on PostgreSQL and on SQLite (`usher dev`).

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, TimeZone, Utc};
use sea_orm::{Database, DatabaseConnection};
use sea_orm_migration::MigratorTrait;
use usher_invitation::{
    domain::{
        Invitation, InvitationState, StoredState,
        list::{ListFilter, Order, SortKey},
        ports::RepositoryPort,
    },
    migration::Migrator,
    store::{Repository, entities::invitation},
};
use usher_kit::testing::TestDatabase;
use uuid::Uuid;

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap()
}

fn at(millis: i64) -> DateTime<Utc> {
    start() + Duration::milliseconds(millis)
}

/// Expiry at +100 s; claims ending before it, after it, or never set.
const EXPIRE: i64 = 100_000;
const CLAIMS: [Option<i64>; 4] = [None, Some(50_000), Some(150_000), Some(100_000)];

/// Every instant next to a boundary, and some far from any.
fn instants() -> Vec<DateTime<Utc>> {
    let mut instants = vec![at(0), at(200_000)];
    for boundary in [50_000, EXPIRE, 150_000] {
        let exact = at(boundary);
        instants.extend([
            exact - Duration::microseconds(1),
            exact,
            exact + Duration::microseconds(1),
            exact - Duration::milliseconds(1),
            exact + Duration::milliseconds(1),
        ]);
    }
    instants
}

fn row(account_id: Uuid, stored: StoredState, claim: Option<i64>, version: i64) -> Invitation {
    Invitation {
        id: Uuid::now_v7(),
        account_id,
        email: format!("{}@acme.example", Uuid::new_v4().simple()),
        display_name: String::new(),
        state: stored,
        role_id: Uuid::from_u128(3),
        role_name: "User".into(),
        team_id: None,
        team_name: String::new(),
        products: Vec::new(),
        metadata: None,
        inviter_kind: "user".into(),
        inviter_id: "inviter".into(),
        inviter_name: String::new(),
        user_id: Uuid::new_v4(),
        locale: String::new(),
        token_version: version,
        token_hash: Uuid::new_v4().to_string(),
        create_time: start(),
        update_time: start(),
        expire_time: at(EXPIRE),
        accept_time: None,
        revoke_time: None,
        decline_time: None,
        claim_until: claim.map(at),
        resend_count: 0,
        last_send_time: start(),
        delivery_job_id: String::new(),
        delivery_status: 0,
        delivery_reason: String::new(),
        delivery_attempts: 0,
        delivery_update_time: None,
        expiry_published: false,
    }
}

/// Every stored state with every claim.
fn rows(account_id: Uuid) -> Vec<Invitation> {
    StoredState::ALL
        .into_iter()
        .flat_map(|stored| CLAIMS.into_iter().map(move |claim| (stored, claim)))
        .map(|(stored, claim)| row(account_id, stored, claim, 1))
        .collect()
}

async fn insert(repo: &Repository, rows: &[Invitation]) {
    repo.insert_created::<usher_proto::invitation::v1::CreateInvitationsResponse>(
        rows.to_vec(),
        Vec::new(),
        None,
        start(),
    )
    .await
    .expect("insert");
}

/// Lists the account's invitations reading as `state` at `now` through the
/// store, and compares with the Rust reading of every row.
async fn readings_agree(db: &DatabaseConnection, backend: &str) {
    let repo = Repository::new(db.clone());
    let account = Uuid::new_v4();
    let rows = rows(account);
    insert(&repo, &rows).await;
    let order = Order {
        key: SortKey::Create,
        ascending: true,
    };
    for now in instants() {
        for state in InvitationState::ALL {
            let filter = ListFilter {
                states: vec![state],
                ..ListFilter::default()
            };
            let sql: BTreeSet<Uuid> = repo
                .page(account, &filter, order, None, 1_000, now)
                .await
                .expect("page")
                .into_iter()
                .map(|r| r.id)
                .collect();
            let rust: BTreeSet<Uuid> = rows
                .iter()
                .filter(|r| r.state_at(now) == state)
                .map(|r| r.id)
                .collect();
            assert_eq!(
                sql, rust,
                "{backend}: {state:?} at {now}: the SQL and Rust readings differ"
            );
            let counted = repo
                .count_up_to(account, &filter, now, 1_000)
                .await
                .expect("count");
            assert_eq!(counted, rust.len() as u64, "{backend}: count of {state:?}");
            // Capped below the matches, it counts one past the cap.
            let capped = repo
                .count_up_to(account, &filter, now, 0)
                .await
                .expect("count");
            assert_eq!(
                capped,
                (rust.len() as u64).min(1),
                "{backend}: capped count"
            );
        }
    }
}

/// Claims fresh copies of every row with the current and another link
/// version at every instant: the store's guarded update claims exactly
/// the rows whose link the Rust rule finds usable.
async fn claims_agree(db: &DatabaseConnection, backend: &str) {
    let repo = Repository::new(db.clone());
    let account = Uuid::new_v4();
    for now in instants() {
        let fresh = rows(account);
        insert(&repo, &fresh).await;
        for row in &fresh {
            for version in [1, 2] {
                let until = now + Duration::seconds(30);
                let claimed = repo
                    .claim(row.id, version, until, now)
                    .await
                    .expect("claim");
                assert_eq!(
                    claimed.is_some(),
                    row.usable(version, now),
                    "{backend}: claim of {:?} (claim {:?}) with version {version} at {now}",
                    row.state,
                    row.claim_until
                );
                if let Some(claimed) = claimed {
                    let stored = repo.find_by_id(row.id).await.unwrap().unwrap();
                    assert_eq!(
                        claimed, stored,
                        "{backend}: the claim answers the row stored"
                    );
                    assert_eq!(
                        Some(stored.clone()),
                        row.claim(version, until, now),
                        "{backend}"
                    );
                    assert_eq!(stored.state_at(now), InvitationState::Accepting);
                }
            }
        }
    }
}

/// Every row round-trips through the store unchanged (the typed state
/// column included).
async fn rows_round_trip(db: &DatabaseConnection, backend: &str) {
    let repo = Repository::new(db.clone());
    let account = Uuid::new_v4();
    let mut rows = rows(account);
    rows[0].products = vec!["chat".into(), "video".into()];
    rows[0].metadata = Some(serde_json::json!({"team": "blue"}));
    insert(&repo, &rows).await;
    for row in &rows {
        let stored = repo.find(account, row.id).await.unwrap().unwrap();
        assert_eq!(&stored, row, "{backend}");
        let model = invitation::Model::from(row);
        assert_eq!(model.state, row.state);
    }
    assert_eq!(repo.find(Uuid::new_v4(), rows[0].id).await.unwrap(), None);
}

/// Concurrent creates are committed together, and each still all or
/// nothing: 24 calls at once each find their rows stored, except the one
/// that repeats a stored id, which fails alone and leaves none of its rows.
async fn concurrent_creates_commit_together_and_fail_alone(db: &DatabaseConnection, backend: &str) {
    let repo = Repository::new(db.clone());
    let account = Uuid::new_v4();
    let stored = row(account, StoredState::Pending, None, 1);
    insert(&repo, std::slice::from_ref(&stored)).await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(24));
    let calls: Vec<_> = (0..24)
        .map(|call| {
            let (repo, barrier) = (repo.clone(), barrier.clone());
            let mut rows = vec![row(account, StoredState::Pending, None, 1)];
            if call == 5 {
                rows.push(stored.clone());
            }
            tokio::spawn(async move {
                barrier.wait().await;
                let outcome = repo
                    .insert_created::<usher_proto::invitation::v1::CreateInvitationsResponse>(
                        rows.clone(),
                        Vec::new(),
                        None,
                        start(),
                    )
                    .await;
                (rows, outcome)
            })
        })
        .collect();
    for (call, task) in calls.into_iter().enumerate() {
        let (rows, outcome) = task.await.expect("task");
        let found = repo.find(account, rows[0].id).await.unwrap();
        if call == 5 {
            assert!(outcome.is_err(), "{backend}: a stored id is refused");
            assert_eq!(found, None, "{backend}: none of the refused call's rows");
        } else {
            outcome.unwrap_or_else(|err| panic!("{backend}: call {call}: {err}"));
            assert_eq!(found.as_ref(), Some(&rows[0]), "{backend}: call {call}");
        }
    }
}

/// Delivery reports recorded in one batch land as if recorded one after the
/// other: a second report of one invitation after its first, a late QUEUED
/// never over a final status, a report of an older email (another job id)
/// ignored.
async fn delivery_reports_of_a_batch_apply_in_order(db: &DatabaseConnection, backend: &str) {
    use usher_invitation::domain::delivery::DeliveryReport;
    use usher_proto::notification::v1::DeliveryStatus;
    let repo = Repository::new(db.clone());
    let account = Uuid::new_v4();
    let mut rows: Vec<Invitation> = (0..4)
        .map(|_| row(account, StoredState::Pending, None, 1))
        .collect();
    for (index, row) in rows.iter_mut().enumerate() {
        row.delivery_job_id = format!("job-{index}");
    }
    insert(&repo, &rows).await;
    let report = |index: usize, status: DeliveryStatus, attempts: i32| DeliveryReport {
        invitation_id: rows[index].id,
        job_id: format!("job-{index}"),
        status: status as i32,
        reason: if status == DeliveryStatus::Failed {
            "mailbox full".into()
        } else {
            String::new()
        },
        attempts,
        unless_status_in: if status == DeliveryStatus::Queued {
            vec![DeliveryStatus::Sent as i32, DeliveryStatus::Failed as i32]
        } else {
            Vec::new()
        },
    };
    let mut older = report(2, DeliveryStatus::Failed, 9);
    older.job_id = "an-older-job".into();
    let reports = vec![
        report(0, DeliveryStatus::Queued, 0),
        report(1, DeliveryStatus::Sent, 1),
        report(0, DeliveryStatus::Sent, 2),
        report(1, DeliveryStatus::Queued, 0),
        older,
        report(3, DeliveryStatus::Failed, 3),
    ];
    let updated = repo
        .record_deliveries(&reports, at(1_000))
        .await
        .expect("record");
    assert_eq!(updated, 4, "{backend}: the rows each report changed");
    let stored = |index: usize| {
        let repo = repo.clone();
        let id = rows[index].id;
        async move { repo.find(account, id).await.unwrap().unwrap() }
    };
    let first = stored(0).await;
    assert_eq!(
        (first.delivery_status, first.delivery_attempts),
        (DeliveryStatus::Sent as i32, 2),
        "{backend}: QUEUED then SENT"
    );
    assert_eq!(first.delivery_update_time, Some(at(1_000)), "{backend}");
    let second = stored(1).await;
    assert_eq!(
        (second.delivery_status, second.delivery_attempts),
        (DeliveryStatus::Sent as i32, 1),
        "{backend}: a late QUEUED keeps SENT"
    );
    let third = stored(2).await;
    assert_eq!(
        (third.delivery_status, third.delivery_update_time),
        (0, None),
        "{backend}: an older email's report is ignored"
    );
    let fourth = stored(3).await;
    assert_eq!(
        (
            fourth.delivery_status,
            fourth.delivery_reason.as_str(),
            fourth.delivery_attempts
        ),
        (DeliveryStatus::Failed as i32, "mailbox full", 3),
        "{backend}"
    );
}

#[tokio::test]
async fn the_rust_and_sql_readings_agree_on_postgresql() {
    let database = TestDatabase::create("invitation-store")
        .await
        .expect("database");
    let db = database.migrated::<Migrator>().await.expect("migrations");
    readings_agree(&db, "postgres").await;
    claims_agree(&db, "postgres").await;
    rows_round_trip(&db, "postgres").await;
    concurrent_creates_commit_together_and_fail_alone(&db, "postgres").await;
    delivery_reports_of_a_batch_apply_in_order(&db, "postgres").await;
    database.drop_database().await.expect("drop");
}

#[tokio::test]
async fn the_rust_and_sql_readings_agree_on_sqlite() {
    let path = std::env::temp_dir().join(format!("usher-invitation-{}.db", Uuid::new_v4()));
    let db = Database::connect(format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .expect("sqlite");
    Migrator::up(&db, None).await.expect("migrations");
    readings_agree(&db, "sqlite").await;
    claims_agree(&db, "sqlite").await;
    rows_round_trip(&db, "sqlite").await;
    concurrent_creates_commit_together_and_fail_alone(&db, "sqlite").await;
    delivery_reports_of_a_batch_apply_in_order(&db, "sqlite").await;
    db.close().await.expect("close");
    std::fs::remove_file(&path).expect("remove");
}
