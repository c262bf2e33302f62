//! The holder counters: `holder_counts.n` is the number of users (any
//! status) holding a role (`users.role_id`) or belonging to a team
//! (`users.team_id`), keyed by the role's or team's id. Triggers on `users`
//! keep it in the same transaction as the change, as [`super::seats`] does
//! for seats, so `Role.user_count` and `Team.member_count` are primary-key
//! lookups instead of counts of the account's users (a count grows with the
//! account: 3.3 ms of database time per ListRoles in the bench's quick run).
//!
//! Every change that adds, removes or moves users takes the account lock
//! first, so two transactions never update one account's counters at once
//! and their lock order cannot deadlock; each statement still updates its
//! counters in id order.
//!
//! On PostgreSQL inserts and deletes are counted once per statement (over
//! the transition table); a change of role or team once per row whose role
//! or team changed. On SQLite (`usher dev`) every trigger is per row. A
//! deleted role or team leaves a counter at zero behind (nobody holds it any
//! more), read by nobody.

use std::collections::HashMap;

use sea_orm::{
    ConnectionTrait, DbBackend, DbErr,
    sea_query::{Alias, Expr, ExprTrait, Query},
};
use sea_orm_migration::{MigrationName, MigrationTrait, SchemaManager};
use uuid::Uuid;

/// The migration that creates `holder_counts`, its triggers, and fills it
/// from the users already there.
#[derive(Debug)]
pub struct CreateHolderCounts;

impl MigrationName for CreateHolderCounts {
    fn name(&self) -> &str {
        "m20261206_000003_create_holder_counts"
    }
}

const TRIGGERS: [&str; 3] = [
    "users_holders_insert",
    "users_holders_delete",
    "users_holders_move",
];

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateHolderCounts {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(
            "CREATE TABLE IF NOT EXISTS holder_counts (holder_id uuid PRIMARY KEY, n bigint NOT NULL)",
        )
        .await?;
        // Triggers first, then the count: on PostgreSQL creating a trigger
        // blocks writes to `users` until this migration commits.
        let statements = match db.get_database_backend() {
            DbBackend::Postgres => postgres_triggers(),
            _ => sqlite_triggers(),
        };
        for sql in statements {
            db.execute_unprepared(&sql).await?;
        }
        db.execute_unprepared("DELETE FROM holder_counts").await?;
        db.execute_unprepared(
            "INSERT INTO holder_counts (holder_id, n)
             SELECT holder_id, count(*) FROM (
               SELECT role_id AS holder_id FROM users
               UNION ALL SELECT team_id FROM users WHERE team_id IS NOT NULL
             ) AS held GROUP BY holder_id",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let postgres = db.get_database_backend() == DbBackend::Postgres;
        for name in TRIGGERS {
            let on = if postgres { " ON users" } else { "" };
            db.execute_unprepared(&format!("DROP TRIGGER IF EXISTS {name}{on}"))
                .await?;
            if postgres {
                db.execute_unprepared(&format!("DROP FUNCTION IF EXISTS usher_{name}()"))
                    .await?;
            }
        }
        db.execute_unprepared("DROP TABLE IF EXISTS holder_counts")
            .await?;
        Ok(())
    }
}

/// Adds, per holder, the sum of `d` over `changes` (rows `(h, d)`; null
/// holders skipped), in holder order.
fn add(changes: &str) -> String {
    format!(
        "INSERT INTO holder_counts (holder_id, n)
         SELECT h, sum(d) FROM ({changes}) AS changed
         WHERE h IS NOT NULL GROUP BY h HAVING sum(d) <> 0 ORDER BY h
         ON CONFLICT (holder_id) DO UPDATE SET n = holder_counts.n + excluded.n"
    )
}

/// The `(h, d)` rows of every role and team held by the rows of `table`,
/// each counted `d`.
fn held(table: &str, d: &str) -> String {
    format!("SELECT role_id AS h, {d} AS d FROM {table} UNION ALL SELECT team_id, {d} FROM {table}")
}

/// The `(h, d)` rows of one row's move from `OLD` to `NEW`.
const MOVED: &str = "SELECT OLD.role_id AS h, -1 AS d UNION ALL SELECT NEW.role_id, 1 \
                     UNION ALL SELECT OLD.team_id, -1 UNION ALL SELECT NEW.team_id, 1";

/// Fires when a row's role or team changed.
const WHEN_MOVED: &str =
    "OLD.role_id IS DISTINCT FROM NEW.role_id OR OLD.team_id IS DISTINCT FROM NEW.team_id";

fn postgres_function(name: &str, body: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION usher_{name}() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           {body};
           RETURN NULL;
         END $$"
    )
}

fn postgres_triggers() -> Vec<String> {
    let [insert, delete, moved] = TRIGGERS;
    vec![
        postgres_function(insert, &add(&held("added", "1"))),
        postgres_function(delete, &add(&held("removed", "-1"))),
        postgres_function(moved, &add(MOVED)),
        format!("DROP TRIGGER IF EXISTS {insert} ON users"),
        format!(
            "CREATE TRIGGER {insert} AFTER INSERT ON users REFERENCING NEW TABLE AS added
             FOR EACH STATEMENT EXECUTE FUNCTION usher_{insert}()"
        ),
        format!("DROP TRIGGER IF EXISTS {delete} ON users"),
        format!(
            "CREATE TRIGGER {delete} AFTER DELETE ON users REFERENCING OLD TABLE AS removed
             FOR EACH STATEMENT EXECUTE FUNCTION usher_{delete}()"
        ),
        format!("DROP TRIGGER IF EXISTS {moved} ON users"),
        format!(
            "CREATE TRIGGER {moved} AFTER UPDATE OF role_id, team_id ON users FOR EACH ROW
             WHEN ({WHEN_MOVED}) EXECUTE FUNCTION usher_{moved}()"
        ),
    ]
}

fn sqlite_triggers() -> Vec<String> {
    let [insert, delete, moved] = TRIGGERS;
    let one = |row: &str, d: &str| {
        add(&format!(
            "SELECT {row}.role_id AS h, {d} AS d UNION ALL SELECT {row}.team_id, {d}"
        ))
    };
    vec![
        format!(
            "CREATE TRIGGER IF NOT EXISTS {insert} AFTER INSERT ON users FOR EACH ROW
             BEGIN {}; END",
            one("NEW", "1")
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS {delete} AFTER DELETE ON users FOR EACH ROW
             BEGIN {}; END",
            one("OLD", "-1")
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS {moved} AFTER UPDATE OF role_id, team_id ON users
             FOR EACH ROW WHEN {WHEN_MOVED}
             BEGIN {}; END",
            add(MOVED)
        ),
    ]
}

/// How many users hold each of `ids` (roles or teams), read from the
/// counters; ids nobody holds are absent.
pub async fn counts<C: ConnectionTrait>(
    db: &C,
    ids: Vec<Uuid>,
) -> Result<HashMap<Uuid, u64>, DbErr> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let select = Query::select()
        .columns([Alias::new("holder_id"), Alias::new("n")])
        .from(Alias::new("holder_counts"))
        .and_where(Expr::col(Alias::new("holder_id")).is_in(ids))
        .and_where(Expr::col(Alias::new("n")).gt(0))
        .to_owned();
    let mut counted = HashMap::new();
    for row in db.query_all(&select).await? {
        let id: Uuid = row.try_get("", "holder_id")?;
        let n: i64 = row.try_get("", "n")?;
        counted.insert(id, u64::try_from(n).unwrap_or(0));
    }
    Ok(counted)
}
