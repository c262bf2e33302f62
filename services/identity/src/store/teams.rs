//! The storage of teams, always scoped to one account (P14). A name taken
//! by a concurrent writer answers `StoreError::Taken`.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set,
    sea_query::{Expr, ExprTrait, Func},
};
use usher_kit::db::StoreResult;
use uuid::Uuid;

use super::{
    entities::{team, user},
    roles::same_name,
};
use crate::domain::teams::{Team, TeamEdit};

/// A stored team as the rules see it.
pub fn facts(model: &team::Model) -> Team {
    Team {
        id: model.id,
        account_id: model.account_id,
        name: model.name.clone(),
        description: model.description.clone(),
    }
}

/// Whether another team of the account has `name` (case-insensitively).
pub async fn name_taken<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    name: &str,
    except: Option<Uuid>,
) -> StoreResult<bool> {
    let mut select = team::Entity::find()
        .filter(team::Column::AccountId.eq(account_id))
        .filter(same_name((team::Entity, team::Column::Name), name));
    if let Some(except) = except {
        select = select.filter(team::Column::Id.ne(except));
    }
    Ok(select.count(db).await? > 0)
}

/// How many teams the account holds.
pub async fn count<C: ConnectionTrait>(db: &C, account_id: Uuid) -> StoreResult<u64> {
    Ok(team::Entity::find()
        .filter(team::Column::AccountId.eq(account_id))
        .count(db)
        .await?)
}

/// Writes a new team.
pub async fn insert<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    name: &str,
    description: &str,
    now: DateTime<Utc>,
) -> StoreResult<team::Model> {
    Ok(team::ActiveModel {
        id: Set(Uuid::new_v4()),
        account_id: Set(account_id),
        name: Set(name.to_owned()),
        description: Set(description.to_owned()),
        create_time: Set(now),
        update_time: Set(now),
    }
    .insert(db)
    .await?)
}

/// Writes `edit` on `current`.
pub async fn update<C: ConnectionTrait>(
    db: &C,
    current: team::Model,
    edit: &TeamEdit,
    now: DateTime<Utc>,
) -> StoreResult<team::Model> {
    let mut active = current.into_active_model();
    if let Some(name) = &edit.name {
        active.name = Set(name.clone());
    }
    if let Some(description) = &edit.description {
        active.description = Set(description.clone());
    }
    active.update_time = Set(now);
    Ok(active.update(db).await?)
}

/// One page of ListTeams: the teams of the account whose lower-cased name
/// contains `query` (all for an empty one), by name then id, after
/// `cursor`; at most `limit` rows, and the total matching `query`.
pub async fn page<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    query: &str,
    cursor: Option<(String, Uuid)>,
    limit: u64,
) -> StoreResult<(Vec<team::Model>, u64)> {
    let mut select = team::Entity::find().filter(team::Column::AccountId.eq(account_id));
    if !query.is_empty() {
        select = select.filter(
            Expr::expr(Func::lower(Expr::col((team::Entity, team::Column::Name))))
                .like(super::contains_pattern(query)),
        );
    }
    let total = select.clone().count(db).await?;
    if let Some((name, id)) = cursor {
        select = select.filter(
            Condition::any()
                .add(team::Column::Name.gt(name.clone()))
                .add(
                    Condition::all()
                        .add(team::Column::Name.eq(name))
                        .add(team::Column::Id.gt(id)),
                ),
        );
    }
    let rows = select
        .order_by_asc(team::Column::Name)
        .order_by_asc(team::Column::Id)
        .limit(limit)
        .all(db)
        .await?;
    Ok((rows, total))
}

/// The members of the team, by id.
pub async fn members<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    team_id: Uuid,
) -> StoreResult<Vec<Uuid>> {
    Ok(user::Entity::find()
        .select_only()
        .column(user::Column::Id)
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::TeamId.eq(team_id))
        .order_by_asc(user::Column::Id)
        .into_tuple()
        .all(db)
        .await?)
}

/// Leaves the members of the team team-less, in one statement.
pub async fn release_members<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    team_id: Uuid,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    user::Entity::update_many()
        .col_expr(user::Column::TeamId, Expr::value(Option::<Uuid>::None))
        .col_expr(user::Column::UpdateTime, Expr::value(now))
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::TeamId.eq(team_id))
        .exec(db)
        .await?;
    Ok(())
}

/// Deletes the team.
pub async fn delete<C: ConnectionTrait>(db: &C, team_id: Uuid) -> StoreResult<()> {
    team::Entity::delete_by_id(team_id).exec(db).await?;
    Ok(())
}

/// How many users (any status) belong to the team (its counter).
pub async fn member_count<C: ConnectionTrait>(db: &C, team_id: Uuid) -> StoreResult<u64> {
    Ok(super::holders::counts(db, vec![team_id])
        .await?
        .get(&team_id)
        .copied()
        .unwrap_or(0))
}

/// How many users (any status) belong to each of `teams` (their counters);
/// teams nobody belongs to are absent.
pub async fn member_counts<C: ConnectionTrait>(
    db: &C,
    teams: Vec<Uuid>,
) -> StoreResult<std::collections::HashMap<Uuid, u64>> {
    Ok(super::holders::counts(db, teams).await?)
}
