//! Users: lookups shared by the handlers.

use std::collections::HashMap;

use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect,
    sea_query::{Expr, Func},
};
use usher_kit::error::ApiResult;
use uuid::Uuid;

use super::entities::user;

/// The text the substring search runs on: display name, email and username,
/// lower-cased.
pub fn search_text(display_name: &str, email: Option<&str>, username: Option<&str>) -> String {
    [Some(display_name), email, username]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The display name of a user, for audit entries (empty when unknown).
pub async fn display_name<C: ConnectionTrait>(db: &C, user_id: Option<Uuid>) -> ApiResult<String> {
    let Some(user_id) = user_id else {
        return Ok(String::new());
    };
    Ok(user::Entity::find_by_id(user_id)
        .select_only()
        .column(user::Column::DisplayName)
        .into_tuple::<String>()
        .one(db)
        .await?
        .unwrap_or_default())
}

/// How many users (any status) of `account_id` hold each of `ids` in
/// `column` (`RoleId` or `TeamId`); ids nobody holds are absent.
pub async fn count_by<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    column: user::Column,
    ids: Vec<Uuid>,
) -> ApiResult<HashMap<Uuid, u64>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(Uuid, i64)> = user::Entity::find()
        .select_only()
        .column(column)
        .column_as(
            Expr::expr(Func::count(Expr::col((user::Entity, user::Column::Id)))),
            "n",
        )
        .filter(user::Column::AccountId.eq(account_id))
        .filter(column.is_in(ids))
        .group_by(column)
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, n)| (id, u64::try_from(n).unwrap_or(0)))
        .collect())
}
