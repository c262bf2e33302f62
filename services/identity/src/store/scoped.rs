//! Lookups scoped to one account (P14): an id of another account answers the
//! same NOT_FOUND as an unknown id.

use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};
use usher_kit::error::{ApiError, ApiResult};
use uuid::Uuid;

use super::entities::{role, team, user};

/// The user `id` of `account_id`, or NOT_FOUND.
pub async fn user<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    id: Uuid,
) -> ApiResult<user::Model> {
    user::Entity::find_by_id(id)
        .filter(user::Column::AccountId.eq(account_id))
        .one(db)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))
}

/// The role `id` of `account_id`, or NOT_FOUND.
pub async fn role<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    id: Uuid,
) -> ApiResult<role::Model> {
    role::Entity::find_by_id(id)
        .filter(role::Column::AccountId.eq(account_id))
        .one(db)
        .await?
        .ok_or_else(|| ApiError::not_found("role"))
}

/// The team `id` of `account_id`, or NOT_FOUND.
pub async fn team<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    id: Uuid,
) -> ApiResult<team::Model> {
    team::Entity::find_by_id(id)
        .filter(team::Column::AccountId.eq(account_id))
        .one(db)
        .await?
        .ok_or_else(|| ApiError::not_found("team"))
}
