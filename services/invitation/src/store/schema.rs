//! The invitation schema, written with sea-orm-migration's builder so it runs
//! on PostgreSQL and, for `usher dev`, SQLite; the substring-search index
//! (`pg_trgm`) is PostgreSQL only.

use sea_orm_migration::{prelude::*, schema::*, sea_orm::DbBackend};

/// Creates the invitation tables.
#[derive(Debug)]
pub struct CreateInvitationSchema;

impl MigrationName for CreateInvitationSchema {
    fn name(&self) -> &str {
        "m20260201_000001_create_invitation_schema"
    }
}

#[derive(DeriveIden)]
enum Invitations {
    Table,
    Id,
    AccountId,
    Email,
    DisplayName,
    State,
    RoleId,
    RoleName,
    TeamId,
    TeamName,
    Products,
    Metadata,
    InviterKind,
    InviterId,
    InviterName,
    UserId,
    Locale,
    TokenVersion,
    TokenHash,
    CreateTime,
    UpdateTime,
    ExpireTime,
    AcceptTime,
    RevokeTime,
    DeclineTime,
    ClaimUntil,
    ResendCount,
    LastSendTime,
    DeliveryJobId,
    DeliveryStatus,
    DeliveryReason,
    DeliveryAttempts,
    DeliveryUpdateTime,
    ExpiryPublished,
}

/// Indexes the token hashes of PENDING invitations, so a link whose Redis
/// key was lost is still found (`find_pending_by_token_hash`).
#[derive(Debug)]
pub struct IndexPendingTokens;

impl MigrationName for IndexPendingTokens {
    fn name(&self) -> &str {
        "m20261207_000001_index_pending_token_hash"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for IndexPendingTokens {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX IF NOT EXISTS invitations_pending_token \
                 ON invitations (token_hash) WHERE state = 'PENDING'",
            )
            .await
            .map(|_| ())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP INDEX IF EXISTS invitations_pending_token")
            .await
            .map(|_| ())
    }
}

#[derive(DeriveIden)]
enum IdempotencyKeys {
    Table,
}

fn now() -> Expr {
    Expr::current_timestamp()
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateInvitationSchema {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Invitations::Table)
                    .if_not_exists()
                    .col(pk_uuid(Invitations::Id))
                    .col(uuid(Invitations::AccountId))
                    .col(string(Invitations::Email))
                    .col(string(Invitations::DisplayName).default(""))
                    .col(string(Invitations::State))
                    .col(uuid(Invitations::RoleId))
                    .col(string(Invitations::RoleName).default(""))
                    .col(uuid_null(Invitations::TeamId))
                    .col(string(Invitations::TeamName).default(""))
                    .col(json_binary(Invitations::Products))
                    .col(json_binary_null(Invitations::Metadata))
                    .col(string(Invitations::InviterKind))
                    .col(string(Invitations::InviterId))
                    .col(string(Invitations::InviterName).default(""))
                    .col(uuid(Invitations::UserId))
                    .col(string(Invitations::Locale).default(""))
                    .col(big_integer(Invitations::TokenVersion))
                    // HMAC of the current link's token (never the token).
                    .col(string(Invitations::TokenHash))
                    .col(timestamp_with_time_zone(Invitations::CreateTime).default(now()))
                    .col(timestamp_with_time_zone(Invitations::UpdateTime).default(now()))
                    .col(timestamp_with_time_zone(Invitations::ExpireTime))
                    .col(timestamp_with_time_zone_null(Invitations::AcceptTime))
                    .col(timestamp_with_time_zone_null(Invitations::RevokeTime))
                    .col(timestamp_with_time_zone_null(Invitations::DeclineTime))
                    .col(timestamp_with_time_zone_null(Invitations::ClaimUntil))
                    .col(integer(Invitations::ResendCount).default(0))
                    .col(timestamp_with_time_zone(Invitations::LastSendTime).default(now()))
                    .col(string(Invitations::DeliveryJobId).default(""))
                    .col(integer(Invitations::DeliveryStatus).default(0))
                    .col(string(Invitations::DeliveryReason).default(""))
                    .col(integer(Invitations::DeliveryAttempts).default(0))
                    .col(timestamp_with_time_zone_null(
                        Invitations::DeliveryUpdateTime,
                    ))
                    .col(boolean(Invitations::ExpiryPublished).default(false))
                    .to_owned(),
            )
            .await?;
        let db = manager.get_connection();
        for sql in [
            "CREATE INDEX IF NOT EXISTS invitations_account_create ON invitations (account_id, create_time, id)",
            "CREATE INDEX IF NOT EXISTS invitations_account_email ON invitations (account_id, email)",
            "CREATE INDEX IF NOT EXISTS invitations_pending_expire ON invitations (expire_time) WHERE state = 'PENDING' AND NOT expiry_published",
        ] {
            db.execute_unprepared(sql).await?;
        }
        manager
            .create_table(usher_kit::idempotency::create_table())
            .await?;
        if db.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared("CREATE EXTENSION IF NOT EXISTS pg_trgm")
                .await?;
            db.execute_unprepared(
                "CREATE INDEX IF NOT EXISTS invitations_email_trgm \
                 ON invitations USING gin (email gin_trgm_ops)",
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(IdempotencyKeys::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Invitations::Table).to_owned())
            .await
    }
}
