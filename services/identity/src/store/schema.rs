//! The identity schema. Written with sea-orm-migration's builder so it runs on
//! PostgreSQL and, for `usher dev`, SQLite; the substring-search index
//! (`pg_trgm`) is PostgreSQL only.

use sea_orm_migration::{prelude::*, schema::*, sea_orm::DbBackend};

/// Creates every identity table.
#[derive(Debug)]
pub struct CreateIdentitySchema;

impl MigrationName for CreateIdentitySchema {
    fn name(&self) -> &str {
        "m20260102_000001_create_identity_schema"
    }
}

#[derive(DeriveIden)]
enum Accounts {
    Table,
    Id,
    Name,
    Slug,
    DefaultLocale,
    OwnerUserId,
    SeatLimit,
    Products,
    AllowedEmailDomains,
    InvitationLifetimeSecs,
    CreateTime,
    UpdateTime,
}

#[derive(DeriveIden)]
enum Products {
    Table,
    Code,
    DisplayName,
    Permissions,
    CreateTime,
    UpdateTime,
}

#[derive(DeriveIden)]
enum Roles {
    Table,
    Id,
    AccountId,
    Name,
    Description,
    Permissions,
    BuiltIn,
    CreateTime,
    UpdateTime,
}

#[derive(DeriveIden)]
enum Teams {
    Table,
    Id,
    AccountId,
    Name,
    Description,
    CreateTime,
    UpdateTime,
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    AccountId,
    Email,
    EmailCanonical,
    Username,
    DisplayName,
    SearchText,
    Status,
    RoleId,
    TeamId,
    Products,
    Locale,
    Metadata,
    Owner,
    Origin,
    PasswordHash,
    PasswordChangeRequired,
    InvitationId,
    InvitedBy,
    CreateTime,
    UpdateTime,
    ActivateTime,
    DeactivateTime,
    LastSignInTime,
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    AccountId,
    Name,
    SecretHash,
    SecretPrefix,
    Permissions,
    Platform,
    CreatorUserId,
    CreateTime,
    ExpireTime,
    LastUseTime,
    RevokeTime,
}

#[derive(DeriveIden)]
enum PasswordResets {
    Table,
    Id,
    AccountId,
    UserId,
    TokenHash,
    ExpireTime,
    UseTime,
    CreateTime,
}

#[derive(DeriveIden)]
enum AuditEvents {
    Table,
    Id,
    AccountId,
    EventTime,
    ActorKind,
    ActorId,
    ActorName,
    Action,
    TargetType,
    TargetId,
    TargetName,
    Details,
    RequestId,
    ClientIp,
}

fn now() -> Expr {
    Expr::current_timestamp()
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateIdentitySchema {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Accounts::Table)
                    .if_not_exists()
                    .col(pk_uuid(Accounts::Id))
                    .col(string(Accounts::Name))
                    .col(string_uniq(Accounts::Slug))
                    .col(string(Accounts::DefaultLocale))
                    .col(uuid_null(Accounts::OwnerUserId))
                    .col(integer(Accounts::SeatLimit))
                    .col(json_binary(Accounts::Products))
                    .col(json_binary(Accounts::AllowedEmailDomains))
                    .col(integer_null(Accounts::InvitationLifetimeSecs))
                    .col(timestamp_with_time_zone(Accounts::CreateTime).default(now()))
                    .col(timestamp_with_time_zone(Accounts::UpdateTime).default(now()))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Products::Table)
                    .if_not_exists()
                    .col(string(Products::Code).primary_key())
                    .col(string(Products::DisplayName))
                    .col(json_binary(Products::Permissions))
                    .col(timestamp_with_time_zone(Products::CreateTime).default(now()))
                    .col(timestamp_with_time_zone(Products::UpdateTime).default(now()))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Roles::Table)
                    .if_not_exists()
                    .col(pk_uuid(Roles::Id))
                    .col(uuid(Roles::AccountId))
                    .col(string(Roles::Name))
                    .col(string(Roles::Description).default(""))
                    .col(json_binary(Roles::Permissions))
                    .col(boolean(Roles::BuiltIn).default(false))
                    .col(timestamp_with_time_zone(Roles::CreateTime).default(now()))
                    .col(timestamp_with_time_zone(Roles::UpdateTime).default(now()))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Roles::Table, Roles::AccountId)
                            .to(Accounts::Table, Accounts::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Teams::Table)
                    .if_not_exists()
                    .col(pk_uuid(Teams::Id))
                    .col(uuid(Teams::AccountId))
                    .col(string(Teams::Name))
                    .col(string(Teams::Description).default(""))
                    .col(timestamp_with_time_zone(Teams::CreateTime).default(now()))
                    .col(timestamp_with_time_zone(Teams::UpdateTime).default(now()))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Teams::Table, Teams::AccountId)
                            .to(Accounts::Table, Accounts::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Users::Table)
                    .if_not_exists()
                    .col(pk_uuid(Users::Id))
                    .col(uuid(Users::AccountId))
                    .col(string_null(Users::Email))
                    .col(string_null(Users::EmailCanonical))
                    .col(string_null(Users::Username))
                    .col(string(Users::DisplayName).default(""))
                    // Lower-cased display name, email and username: the
                    // substring search runs on it (trigram index).
                    .col(text(Users::SearchText).default(""))
                    .col(string(Users::Status))
                    .col(uuid(Users::RoleId))
                    .col(uuid_null(Users::TeamId))
                    .col(json_binary(Users::Products))
                    .col(string(Users::Locale).default(""))
                    .col(json_binary_null(Users::Metadata))
                    .col(boolean(Users::Owner).default(false))
                    .col(string(Users::Origin))
                    .col(text_null(Users::PasswordHash))
                    .col(boolean(Users::PasswordChangeRequired).default(false))
                    .col(uuid_null(Users::InvitationId))
                    .col(string_null(Users::InvitedBy))
                    .col(timestamp_with_time_zone(Users::CreateTime).default(now()))
                    .col(timestamp_with_time_zone(Users::UpdateTime).default(now()))
                    .col(timestamp_with_time_zone_null(Users::ActivateTime))
                    .col(timestamp_with_time_zone_null(Users::DeactivateTime))
                    .col(timestamp_with_time_zone_null(Users::LastSignInTime))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Users::Table, Users::AccountId)
                            .to(Accounts::Table, Accounts::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(Users::Table, Users::RoleId)
                            .to(Roles::Table, Roles::Id)
                            .on_delete(ForeignKeyAction::Restrict),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(Users::Table, Users::TeamId)
                            .to(Teams::Table, Teams::Id)
                            .on_delete(ForeignKeyAction::SetNull),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ApiKeys::Table)
                    .if_not_exists()
                    .col(pk_uuid(ApiKeys::Id))
                    .col(uuid_null(ApiKeys::AccountId))
                    .col(string(ApiKeys::Name))
                    .col(string_uniq(ApiKeys::SecretHash))
                    .col(string(ApiKeys::SecretPrefix))
                    .col(json_binary(ApiKeys::Permissions))
                    .col(boolean(ApiKeys::Platform).default(false))
                    .col(uuid_null(ApiKeys::CreatorUserId))
                    .col(timestamp_with_time_zone(ApiKeys::CreateTime).default(now()))
                    .col(timestamp_with_time_zone_null(ApiKeys::ExpireTime))
                    .col(timestamp_with_time_zone_null(ApiKeys::LastUseTime))
                    .col(timestamp_with_time_zone_null(ApiKeys::RevokeTime))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(PasswordResets::Table)
                    .if_not_exists()
                    .col(pk_uuid(PasswordResets::Id))
                    .col(uuid(PasswordResets::AccountId))
                    .col(uuid(PasswordResets::UserId))
                    .col(string_uniq(PasswordResets::TokenHash))
                    .col(timestamp_with_time_zone(PasswordResets::ExpireTime))
                    .col(timestamp_with_time_zone_null(PasswordResets::UseTime))
                    .col(timestamp_with_time_zone(PasswordResets::CreateTime).default(now()))
                    .foreign_key(
                        ForeignKey::create()
                            .from(PasswordResets::Table, PasswordResets::UserId)
                            .to(Users::Table, Users::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuditEvents::Table)
                    .if_not_exists()
                    .col(pk_uuid(AuditEvents::Id))
                    .col(uuid(AuditEvents::AccountId))
                    .col(timestamp_with_time_zone(AuditEvents::EventTime))
                    .col(string(AuditEvents::ActorKind))
                    .col(string(AuditEvents::ActorId))
                    .col(string(AuditEvents::ActorName))
                    .col(string(AuditEvents::Action))
                    .col(string(AuditEvents::TargetType))
                    .col(string(AuditEvents::TargetId))
                    .col(string(AuditEvents::TargetName))
                    .col(json_binary_null(AuditEvents::Details))
                    .col(string(AuditEvents::RequestId).default(""))
                    .col(string(AuditEvents::ClientIp).default(""))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(usher_kit::idempotency::create_table())
            .await?;

        let db = manager.get_connection();
        // Partial unique indexes and keyset-pagination indexes; the same SQL
        // runs on PostgreSQL and SQLite.
        for sql in [
            "CREATE UNIQUE INDEX IF NOT EXISTS users_account_email ON users (account_id, email_canonical) WHERE email_canonical IS NOT NULL",
            "CREATE UNIQUE INDEX IF NOT EXISTS users_account_username ON users (account_id, username) WHERE username IS NOT NULL",
            // One index per ListUsers order, matching its keyset exactly.
            "CREATE INDEX IF NOT EXISTS users_account_name ON users (account_id, owner, lower(display_name), id)",
            "CREATE INDEX IF NOT EXISTS users_account_email_order ON users (account_id, owner, coalesce(email_canonical, username, ''), id)",
            "CREATE INDEX IF NOT EXISTS users_account_created ON users (account_id, owner, create_time, id)",
            "CREATE INDEX IF NOT EXISTS users_account_status ON users (account_id, status)",
            "CREATE INDEX IF NOT EXISTS users_role ON users (role_id)",
            "CREATE INDEX IF NOT EXISTS users_team ON users (team_id)",
            "CREATE UNIQUE INDEX IF NOT EXISTS users_invitation ON users (invitation_id) WHERE invitation_id IS NOT NULL",
            "CREATE UNIQUE INDEX IF NOT EXISTS roles_account_name ON roles (account_id, lower(name))",
            "CREATE UNIQUE INDEX IF NOT EXISTS teams_account_name ON teams (account_id, lower(name))",
            "CREATE INDEX IF NOT EXISTS api_keys_account ON api_keys (account_id, create_time)",
            "CREATE INDEX IF NOT EXISTS audit_events_account_time ON audit_events (account_id, event_time, id)",
            "CREATE INDEX IF NOT EXISTS password_resets_user ON password_resets (user_id)",
        ] {
            db.execute_unprepared(sql).await?;
        }
        if db.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared("CREATE EXTENSION IF NOT EXISTS pg_trgm")
                .await?;
            db.execute_unprepared(
                "CREATE INDEX IF NOT EXISTS users_search_trgm ON users USING gin (search_text gin_trgm_ops)",
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            "idempotency_keys",
            "audit_events",
            "password_resets",
            "api_keys",
            "users",
            "teams",
            "roles",
            "products",
            "accounts",
        ] {
            manager
                .drop_table(
                    Table::drop()
                        .table(Alias::new(table))
                        .if_exists()
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

/// Keeps the user search's trigram index free of a long pending list.
///
/// A GIN index first appends new entries to a pending list (4 MB by
/// default, `gin_pending_list_limit`) and merges them into the index only
/// when the list is full or a vacuum runs; every search reads the whole
/// list. After 1,000,000 users were added that was ≈ 440 pages, read by
/// every search whatever it matched: a one-match search spent 7.6 ms in
/// the index instead of 0.7 ms. A 64 kB limit (the least PostgreSQL
/// allows, ≈ 8 pages) keeps that read small while inserts still merge in
/// batches; the entries pending now are merged at once. PostgreSQL only
/// (SQLite has no trigram index).
#[derive(Debug)]
pub struct ShortSearchPendingList;

impl MigrationName for ShortSearchPendingList {
    fn name(&self) -> &str {
        "m20261206_000002_short_search_pending_list"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for ShortSearchPendingList {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared(
                "ALTER INDEX users_search_trgm SET (gin_pending_list_limit = 64)",
            )
            .await?;
            db.execute_unprepared("SELECT gin_clean_pending_list('users_search_trgm')")
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared("ALTER INDEX users_search_trgm RESET (gin_pending_list_limit)")
                .await?;
        }
        Ok(())
    }
}

/// Keeps the planner's estimate of how many users a search matches steady.
///
/// A `LIKE '%term%'` is estimated from the column's histogram: with the
/// default 100 buckets a term held by 1 % of the users lands in zero, one or
/// two of them, so from one ANALYZE to the next the estimate moved between
/// 100 and 20,000 rows at 1,000,000 users, and with the low estimate the
/// planner read the term's trigram matches and sorted them (20 ms for
/// `son 001`) instead of walking the order's index (1.8 ms). With 1,000
/// buckets it stayed within 9,000–10,000 in ten ANALYZEs out of ten; an
/// ANALYZE of the table then samples 300,000 rows instead of 30,000 (2 s at
/// 1,000,000 users, in the background). It takes effect at the next
/// ANALYZE (autovacuum's, or `ANALYZE users`). PostgreSQL only.
#[derive(Debug)]
pub struct SearchTextStatistics;

impl MigrationName for SearchTextStatistics {
    fn name(&self) -> &str {
        "m20261206_000004_search_text_statistics"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for SearchTextStatistics {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared("ALTER TABLE users ALTER COLUMN search_text SET STATISTICS 1000")
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared("ALTER TABLE users ALTER COLUMN search_text SET STATISTICS -1")
                .await?;
        }
        Ok(())
    }
}

/// Lets a search in name order walk its index without reading the table.
///
/// A common term (`son 001`, 10,000 matches among 1,000,000 users) is
/// answered by walking `users_account_name` in order and checking the term
/// on each user until the page and its capped count are found: past more
/// than 10,000 users that match nothing, each read from the table to check
/// its `search_text` (3.3–5.5 ms a query). The index now carries
/// `search_text`, with `display_name` and `create_time` (the walk's other
/// columns), so PostgreSQL answers the walk from the index alone
/// (index-only scan) wherever the table's pages are marked all-visible,
/// which autovacuum does after inserts and updates; until then it reads
/// the table as before. The index roughly doubles in size (65 to 136 MB
/// at 1,000,000 users); bench/README.md has the figures. Built while the
/// migration's transaction locks the table against writes (1.0–1.2 s at
/// 1,000,000 users, against 0.9 s for the plain index). PostgreSQL only:
/// SQLite keeps the plain index.
#[derive(Debug)]
pub struct CoveringNameIndex;

impl MigrationName for CoveringNameIndex {
    fn name(&self) -> &str {
        "m20261207_000001_covering_name_index"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CoveringNameIndex {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared(
                "CREATE INDEX IF NOT EXISTS users_account_name_covering ON users \
                 (account_id, owner, lower(display_name), id) \
                 INCLUDE (display_name, search_text, create_time)",
            )
            .await?;
            db.execute_unprepared("DROP INDEX IF EXISTS users_account_name")
                .await?;
            db.execute_unprepared(
                "ALTER INDEX users_account_name_covering RENAME TO users_account_name",
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared(
                "CREATE INDEX IF NOT EXISTS users_account_name_plain ON users \
                 (account_id, owner, lower(display_name), id)",
            )
            .await?;
            db.execute_unprepared("DROP INDEX IF EXISTS users_account_name")
                .await?;
            db.execute_unprepared(
                "ALTER INDEX users_account_name_plain RENAME TO users_account_name",
            )
            .await?;
        }
        Ok(())
    }
}
