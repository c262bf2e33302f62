//! The storage of roles, and the lookups every change shares: the actor of
//! a call, the caller's own role for the grant rule, and the
//! case-insensitive name comparison of roles and teams.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set,
    sea_query::{Expr, ExprTrait, Func, IntoColumnRef},
};
use usher_kit::{db::StoreResult, error::ApiResult, principal::Principal};
use uuid::Uuid;

use super::entities::{product, role, user};
use crate::domain::{
    UserStatus,
    effects::Actor,
    grants::{self, Grant, Grantor},
    roles::{self, Available, Role, RoleEdit},
};

/// `lower(column) = lower(value)`: names are unique case-insensitively.
pub fn same_name<C: IntoColumnRef>(column: C, name: &str) -> Expr {
    Expr::expr(Func::lower(Expr::col(column))).eq(Func::lower(Expr::val(name.to_owned())))
}

/// The actor of a call, named as it is now (audit entries and events keep
/// the snapshot).
pub async fn actor<C: ConnectionTrait>(db: &C, principal: &Principal) -> ApiResult<Actor> {
    let name = super::users::display_name(db, principal.user_id).await?;
    Ok(Actor::from_principal(principal, name))
}

/// The caller as a grantor (P26): for a signed-in user the role it holds
/// now (read in `db`, so inside the caller's transaction it is the role the
/// change is checked against).
pub async fn grantor_role<C: ConnectionTrait>(
    db: &C,
    principal: &Principal,
) -> ApiResult<Option<Uuid>> {
    let Some(user_id) = principal.user_id else {
        return Ok(None);
    };
    Ok(user::Entity::find_by_id(user_id)
        .select_only()
        .column(user::Column::RoleId)
        .into_tuple::<Uuid>()
        .one(db)
        .await?)
}

/// Applies the grant rule (domain::grants) for `principal`.
pub async fn check_grant<C: ConnectionTrait>(
    db: &C,
    principal: &Principal,
    grant: &Grant<'_>,
) -> ApiResult<()> {
    let role_id = match grant {
        // Only role edits and deletions need the caller's own role.
        Grant::RolePermissions { .. } | Grant::Reassign { .. } => {
            grantor_role(db, principal).await?
        }
        Grant::Role { .. } | Grant::Permissions(_) => None,
    };
    grants::check_grant(
        &Grantor {
            user_id: principal.user_id,
            role_id,
            permissions: &principal.permissions,
        },
        grant,
    )
}

/// A stored role as the rules see it.
pub fn facts(model: &role::Model) -> Role {
    Role {
        id: model.id,
        account_id: model.account_id,
        name: model.name.clone(),
        description: model.description.clone(),
        permissions: usher_kit::convert::strings(&model.permissions),
        built_in: model.built_in,
    }
}

/// The permissions the account may use: the catalogue and those of its
/// enabled products.
pub async fn available_permissions<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
) -> ApiResult<Vec<Available>> {
    let account = super::accounts::find(db, account_id).await?;
    let codes = usher_kit::convert::strings(&account.products);
    let products = if codes.is_empty() {
        Vec::new()
    } else {
        product::Entity::find()
            .filter(product::Column::Code.is_in(codes))
            .all(db)
            .await?
    };
    let products: Vec<(String, serde_json::Value)> = products
        .into_iter()
        .map(|p| (p.code, p.permissions))
        .collect();
    Ok(roles::available(&products))
}

/// Whether another role of the account has `name` (case-insensitively).
pub async fn name_taken<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    name: &str,
    except: Option<Uuid>,
) -> StoreResult<bool> {
    let mut select = role::Entity::find()
        .filter(role::Column::AccountId.eq(account_id))
        .filter(same_name((role::Entity, role::Column::Name), name));
    if let Some(except) = except {
        select = select.filter(role::Column::Id.ne(except));
    }
    Ok(select.count(db).await? > 0)
}

/// How many roles the account holds.
pub async fn count<C: ConnectionTrait>(db: &C, account_id: Uuid) -> StoreResult<u64> {
    Ok(role::Entity::find()
        .filter(role::Column::AccountId.eq(account_id))
        .count(db)
        .await?)
}

/// Writes a new custom role.
pub async fn insert<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    name: &str,
    description: &str,
    permissions: &[String],
    now: DateTime<Utc>,
) -> StoreResult<role::Model> {
    Ok(role::ActiveModel {
        id: Set(Uuid::new_v4()),
        account_id: Set(account_id),
        name: Set(name.to_owned()),
        description: Set(description.to_owned()),
        permissions: Set(usher_kit::convert::json_strings(permissions.to_vec())),
        built_in: Set(false),
        create_time: Set(now),
        update_time: Set(now),
    }
    .insert(db)
    .await?)
}

/// Writes `edit` on `current`.
pub async fn update<C: ConnectionTrait>(
    db: &C,
    current: role::Model,
    edit: &RoleEdit,
    now: DateTime<Utc>,
) -> StoreResult<role::Model> {
    let mut active = current.into_active_model();
    if let Some(name) = &edit.name {
        active.name = Set(name.clone());
    }
    if let Some(description) = &edit.description {
        active.description = Set(description.clone());
    }
    if let Some(permissions) = &edit.permissions {
        active.permissions = Set(usher_kit::convert::json_strings(permissions.clone()));
    }
    active.update_time = Set(now);
    Ok(active.update(db).await?)
}

/// One page of ListRoles: built-in roles first, then by name and id, after
/// `cursor` (built-in, name, id); at most `limit` rows.
pub async fn page<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    cursor: Option<(bool, String, Uuid)>,
    limit: u64,
) -> StoreResult<Vec<role::Model>> {
    let mut select = role::Entity::find().filter(role::Column::AccountId.eq(account_id));
    if let Some((built_in, name, id)) = cursor {
        let after_in_group = Condition::any()
            .add(role::Column::Name.gt(name.clone()))
            .add(
                Condition::all()
                    .add(role::Column::Name.eq(name))
                    .add(role::Column::Id.gt(id)),
            );
        let group = Condition::all()
            .add(role::Column::BuiltIn.eq(built_in))
            .add(after_in_group);
        select = if built_in {
            select.filter(
                Condition::any()
                    .add(role::Column::BuiltIn.eq(false))
                    .add(group),
            )
        } else {
            select.filter(group)
        };
    }
    Ok(select
        .order_by_desc(role::Column::BuiltIn)
        .order_by_asc(role::Column::Name)
        .order_by_asc(role::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// How many users (any status) hold each of `roles` (their counters); roles
/// nobody holds are absent.
pub async fn holder_counts<C: ConnectionTrait>(
    db: &C,
    roles: Vec<Uuid>,
) -> StoreResult<HashMap<Uuid, u64>> {
    Ok(super::holders::counts(db, roles).await?)
}

/// Active users of the account who can manage users now.
pub async fn active_managers<C: ConnectionTrait>(db: &C, account_id: Uuid) -> StoreResult<u64> {
    let roles = role::Entity::find()
        .filter(role::Column::AccountId.eq(account_id))
        .all(db)
        .await?;
    let manager_roles: Vec<Uuid> = roles
        .iter()
        .filter(|r| facts(r).manages_users())
        .map(|r| r.id)
        .collect();
    super::users::count_active_in_roles(db, account_id, manager_roles).await
}

/// For each active holder of the role: whether it is the owner.
pub async fn active_holders<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    role_id: Uuid,
) -> StoreResult<Vec<bool>> {
    Ok(user::Entity::find()
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::RoleId.eq(role_id))
        .filter(user::Column::Status.eq(UserStatus::Active.as_str()))
        .all(db)
        .await?
        .iter()
        .map(|u| u.owner)
        .collect())
}

/// Every holder of the role (any status), by id.
pub async fn holders<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    role_id: Uuid,
) -> StoreResult<Vec<Uuid>> {
    Ok(user::Entity::find()
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::RoleId.eq(role_id))
        .order_by_asc(user::Column::Id)
        .all(db)
        .await?
        .iter()
        .map(|u| u.id)
        .collect())
}

/// Moves every holder of `role_id` to `target`, in one statement.
pub async fn reassign<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    role_id: Uuid,
    target: Uuid,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    user::Entity::update_many()
        .col_expr(user::Column::RoleId, Expr::value(target))
        .col_expr(user::Column::UpdateTime, Expr::value(now))
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::RoleId.eq(role_id))
        .exec(db)
        .await?;
    Ok(())
}

/// Deletes the role.
pub async fn delete<C: ConnectionTrait>(db: &C, role_id: Uuid) -> StoreResult<()> {
    role::Entity::delete_by_id(role_id).exec(db).await?;
    Ok(())
}
