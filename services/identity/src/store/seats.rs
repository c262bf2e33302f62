//! The seat counter: `account_seats.used` is the number of an account's
//! users whose status takes a seat (`active` or `invited`), kept by triggers
//! on `users` in the same transaction as the change, so no code path can
//! forget it and every reader sees the count of its own snapshot.
//!
//! Reading it is one primary-key lookup instead of counting the account's
//! users (which grows with the account: tens of milliseconds at 100,000
//! users, and it ran under the account lock on every invitation). Changes
//! that must not exceed the seat limit still lock the account row first
//! ([`super::accounts::lock`]), then read the counter.
//!
//! On PostgreSQL, inserts and deletes are counted once per statement (a
//! statement-level trigger over its transition table: a bulk of 1,000
//! invitees is one counter update); status changes once per row whose
//! status moves in or out of the counted set. On SQLite (`usher dev`) every
//! trigger is per row.

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use sea_orm_migration::{MigrationName, MigrationTrait, SchemaManager};
use uuid::Uuid;

use crate::domain::UserStatus;

/// The statuses that take a seat, as stored.
const COUNTED: &str = "('active', 'invited')";

/// The migration that creates `account_seats`, its triggers, and fills it
/// from the users already there.
#[derive(Debug)]
pub struct CreateSeatCounter;

impl MigrationName for CreateSeatCounter {
    fn name(&self) -> &str {
        "m20261206_000001_create_seat_counter"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateSeatCounter {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let backend = db.get_database_backend();
        db.execute_unprepared(
            "CREATE TABLE IF NOT EXISTS account_seats (account_id uuid PRIMARY KEY, used bigint NOT NULL)",
        )
        .await?;
        // Triggers first, then the count: on PostgreSQL creating a trigger
        // blocks writes to `users` until this migration commits, so no
        // change slips between the count and the triggers.
        let statements = match backend {
            DbBackend::Postgres => postgres_triggers(),
            _ => sqlite_triggers(),
        };
        for sql in statements {
            db.execute_unprepared(&sql).await?;
        }
        db.execute_unprepared("DELETE FROM account_seats").await?;
        db.execute_unprepared(&format!(
            "INSERT INTO account_seats (account_id, used)
             SELECT account_id, count(*) FROM users WHERE status IN {COUNTED} GROUP BY account_id"
        ))
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let backend = db.get_database_backend();
        let on = if backend == DbBackend::Postgres {
            " ON users"
        } else {
            ""
        };
        for name in [
            "users_seats_insert",
            "users_seats_delete",
            "users_seats_status",
        ] {
            db.execute_unprepared(&format!("DROP TRIGGER IF EXISTS {name}{on}"))
                .await?;
        }
        if backend == DbBackend::Postgres {
            db.execute_unprepared(
                "DROP FUNCTION IF EXISTS usher_seats_insert(); DROP FUNCTION IF EXISTS usher_seats_delete(); DROP FUNCTION IF EXISTS usher_seats_status()",
            )
            .await?;
        }
        db.execute_unprepared("DROP TABLE IF EXISTS account_seats")
            .await?;
        Ok(())
    }
}

/// Adds `delta` to the counter of `account` (an upsert: the first user of
/// an account creates its row).
fn upsert(account: &str, delta: &str) -> String {
    format!(
        "INSERT INTO account_seats (account_id, used) VALUES ({account}, {delta})
         ON CONFLICT (account_id) DO UPDATE SET used = account_seats.used + excluded.used"
    )
}

/// A PostgreSQL trigger function adding `delta` (an aggregate over the
/// transition table `rows`) to the counter of each account in `rows`.
fn per_statement(name: &str, rows: &str, delta: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO account_seats (account_id, used)
             SELECT account_id, {delta} FROM {rows} WHERE status IN {COUNTED} GROUP BY account_id
           ON CONFLICT (account_id) DO UPDATE SET used = account_seats.used + excluded.used;
           RETURN NULL;
         END $$"
    )
}

fn postgres_triggers() -> Vec<String> {
    vec![
        per_statement("usher_seats_insert", "added", "count(*)"),
        per_statement("usher_seats_delete", "removed", "-count(*)"),
        format!(
            "CREATE OR REPLACE FUNCTION usher_seats_status() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               {};
               RETURN NULL;
             END $$",
            upsert(
                "NEW.account_id",
                &format!(
                    "(CASE WHEN NEW.status IN {COUNTED} THEN 1 ELSE 0 END) - (CASE WHEN OLD.status IN {COUNTED} THEN 1 ELSE 0 END)"
                )
            )
        ),
        "DROP TRIGGER IF EXISTS users_seats_insert ON users".to_owned(),
        "CREATE TRIGGER users_seats_insert AFTER INSERT ON users REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION usher_seats_insert()".to_owned(),
        "DROP TRIGGER IF EXISTS users_seats_delete ON users".to_owned(),
        "CREATE TRIGGER users_seats_delete AFTER DELETE ON users REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION usher_seats_delete()".to_owned(),
        "DROP TRIGGER IF EXISTS users_seats_status ON users".to_owned(),
        format!(
            "CREATE TRIGGER users_seats_status AFTER UPDATE OF status ON users FOR EACH ROW
             WHEN ((OLD.status IN {COUNTED}) IS DISTINCT FROM (NEW.status IN {COUNTED}))
             EXECUTE FUNCTION usher_seats_status()"
        ),
    ]
}

fn sqlite_triggers() -> Vec<String> {
    vec![
        format!(
            "CREATE TRIGGER IF NOT EXISTS users_seats_insert AFTER INSERT ON users
             FOR EACH ROW WHEN NEW.status IN {COUNTED}
             BEGIN {}; END",
            upsert("NEW.account_id", "1")
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS users_seats_delete AFTER DELETE ON users
             FOR EACH ROW WHEN OLD.status IN {COUNTED}
             BEGIN {}; END",
            upsert("OLD.account_id", "-1")
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS users_seats_status AFTER UPDATE OF status ON users
             FOR EACH ROW WHEN (OLD.status IN {COUNTED}) <> (NEW.status IN {COUNTED})
             BEGIN {}; END",
            upsert(
                "NEW.account_id",
                &format!("(NEW.status IN {COUNTED}) - (OLD.status IN {COUNTED})")
            )
        ),
    ]
}

/// The seats `account_id` uses: its `active` and `invited` users, read from
/// the counter.
pub async fn used<C: ConnectionTrait>(db: &C, account_id: Uuid) -> Result<u64, DbErr> {
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            match backend {
                DbBackend::Postgres => "SELECT used FROM account_seats WHERE account_id = $1",
                _ => "SELECT used FROM account_seats WHERE account_id = ?",
            },
            [account_id.into()],
        ))
        .await?;
    let used: i64 = match row {
        Some(row) => row.try_get("", "used")?,
        None => 0,
    };
    Ok(u64::try_from(used).unwrap_or(0))
}

/// [`used`] of each of `account_ids`, in one query (none for no ids).
pub async fn used_by<C: ConnectionTrait>(
    db: &C,
    account_ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, u64>, DbErr> {
    if account_ids.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let backend = db.get_database_backend();
    let placeholders: Vec<String> = (1..=account_ids.len())
        .map(|n| match backend {
            DbBackend::Postgres => format!("${n}"),
            _ => "?".to_owned(),
        })
        .collect();
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            format!(
                "SELECT account_id, used FROM account_seats WHERE account_id IN ({})",
                placeholders.join(", ")
            ),
            account_ids.iter().map(|id| (*id).into()),
        ))
        .await?;
    let mut used: std::collections::HashMap<Uuid, u64> =
        account_ids.iter().map(|id| (*id, 0)).collect();
    for row in rows {
        let account_id: Uuid = row.try_get("", "account_id")?;
        let count: i64 = row.try_get("", "used")?;
        used.insert(account_id, u64::try_from(count).unwrap_or(0));
    }
    Ok(used)
}

/// The statuses counted, for the tests that compare the counter with a count.
pub const COUNTED_STATUSES: [UserStatus; 2] = [UserStatus::Active, UserStatus::Invited];
