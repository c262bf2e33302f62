//! Accounts, their subscription and the product catalogue.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set,
    sea_query::{Expr, ExprTrait, Func},
};
use serde_json::Value as Json;
use usher_kit::{
    convert::{json_strings, strings},
    db::StoreResult,
    error::{ApiError, ApiResult},
};
use uuid::Uuid;

use super::entities::{account, product, role, user};
use crate::domain::{ADMIN_ROLE, USER_ROLE, UserStatus, admin_permissions, user_permissions};

/// The account `id`, or the one `NOT_FOUND`.
pub async fn find<C: ConnectionTrait>(db: &C, id: Uuid) -> ApiResult<account::Model> {
    account::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or_else(|| ApiError::not_found("account"))
}

/// The account `id`, locked until the end of the caller's transaction: every
/// change that counts seats or managers takes this lock first, so concurrent
/// changes to one account are checked one after the other (no-op on SQLite,
/// whose writers are serialised anyway).
pub async fn lock<C: ConnectionTrait>(db: &C, id: Uuid) -> ApiResult<account::Model> {
    super::for_update(account::Entity::find_by_id(id), db.get_database_backend())
        .one(db)
        .await?
        .ok_or_else(|| ApiError::not_found("account"))
}

/// The accounts `ids` that exist, each locked as [`lock`] locks one, in
/// ascending id order in one statement (two transactions that lock several
/// accounts this way never wait for each other in a cycle).
pub async fn lock_all<C: ConnectionTrait>(
    db: &C,
    mut ids: Vec<Uuid>,
) -> ApiResult<std::collections::HashMap<Uuid, account::Model>> {
    ids.sort_unstable();
    ids.dedup();
    let query = account::Entity::find()
        .filter(account::Column::Id.is_in(ids))
        .order_by_asc(account::Column::Id);
    Ok(super::for_update(query, db.get_database_backend())
        .all(db)
        .await?
        .into_iter()
        .map(|account| (account.id, account))
        .collect())
}

/// Seats in use: ACTIVE and INVITED users.
pub async fn seats_used<C: ConnectionTrait>(db: &C, account_id: Uuid) -> ApiResult<u64> {
    Ok(super::seats::used(db, account_id).await?)
}

/// The seats `account_id` uses, counted from its users (what the counter of
/// [`super::seats`] must always equal; for tests and repairs).
pub async fn seats_counted<C: ConnectionTrait>(db: &C, account_id: Uuid) -> ApiResult<u64> {
    Ok(user::Entity::find()
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::Status.is_in(super::seats::COUNTED_STATUSES.map(|s| s.as_str())))
        .count(db)
        .await?)
}

/// The registered products among `codes`, in the order given; the first
/// unknown code is an error on `field[i]`.
pub async fn require_products<C: ConnectionTrait>(
    db: &C,
    field: &str,
    codes: &[String],
) -> ApiResult<Vec<product::Model>> {
    let found = product::Entity::find()
        .filter(product::Column::Code.is_in(codes.iter().cloned()))
        .all(db)
        .await?;
    let mut ordered = Vec::with_capacity(codes.len());
    for (index, code) in codes.iter().enumerate() {
        match found.iter().find(|p| &p.code == code) {
            Some(product) => ordered.push(product.clone()),
            None => {
                return Err(ApiError::invalid(
                    format!("{field}[{index}]"),
                    "is not a registered product",
                ));
            }
        }
    }
    Ok(ordered)
}

/// The permission names a product adds.
pub fn product_permission_names(product: &product::Model) -> Vec<String> {
    product
        .permissions
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|p| p.get("name").and_then(|n| n.as_str()).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Creates the built-in roles of a new account; returns (admin, user).
pub async fn create_built_in_roles<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    now: DateTime<Utc>,
) -> ApiResult<(role::Model, role::Model)> {
    let make = |name: &str, description: &str, permissions: Vec<String>| role::ActiveModel {
        id: Set(Uuid::new_v4()),
        account_id: Set(account_id),
        name: Set(name.to_owned()),
        description: Set(description.to_owned()),
        permissions: Set(usher_kit::convert::json_strings(permissions)),
        built_in: Set(true),
        create_time: Set(now),
        update_time: Set(now),
    };
    let admin = make(
        ADMIN_ROLE,
        "Manages users, roles, teams and account settings",
        admin_permissions(std::iter::empty()),
    )
    .insert(db)
    .await?;
    let user = make(USER_ROLE, "Uses the product", user_permissions())
        .insert(db)
        .await?;
    Ok((admin, user))
}

/// Whether a slug is taken.
pub async fn slug_taken<C: ConnectionTrait>(db: &C, slug: &str) -> ApiResult<bool> {
    Ok(account::Entity::find()
        .filter(account::Column::Slug.eq(slug))
        .select_only()
        .column(account::Column::Id)
        .into_tuple::<Uuid>()
        .one(db)
        .await?
        .is_some())
}

/// The permissions `role` grants in its account: the built-in Admin holds
/// the catalogue plus every permission of the account's enabled products
/// (computed, so enabling a product needs no role rewrite); any other role
/// holds what it lists.
pub async fn effective_permissions<C: ConnectionTrait>(
    db: &C,
    role: &role::Model,
) -> ApiResult<Vec<String>> {
    if !is_admin_role(role) {
        return Ok(usher_kit::convert::strings(&role.permissions));
    }
    let account = find(db, role.account_id).await?;
    effective_permissions_in(db, role, &account).await
}

/// [`effective_permissions`] of a role of `account`, already loaded.
pub async fn effective_permissions_in<C: ConnectionTrait>(
    db: &C,
    role: &role::Model,
    account: &account::Model,
) -> ApiResult<Vec<String>> {
    if !is_admin_role(role) {
        return Ok(usher_kit::convert::strings(&role.permissions));
    }
    let products = enabled_products(db, account).await?;
    Ok(effective_permissions_with(role, account, &products))
}

/// The registered products `account` enables.
async fn enabled_products<C: ConnectionTrait>(
    db: &C,
    account: &account::Model,
) -> ApiResult<Vec<product::Model>> {
    Ok(product::Entity::find()
        .filter(product::Column::Code.is_in(usher_kit::convert::strings(&account.products)))
        .all(db)
        .await?)
}

/// Whether `role` is the built-in Admin, whose permissions depend on the
/// account's products.
pub fn is_admin_role(role: &role::Model) -> bool {
    crate::domain::roles::is_admin(role.built_in, &role.name)
}

/// [`effective_permissions_in`] with the products read already: `catalogue`
/// holds (at least) every registered product the account enables.
pub fn effective_permissions_with(
    role: &role::Model,
    account: &account::Model,
    catalogue: &[product::Model],
) -> Vec<String> {
    let listed = usher_kit::convert::strings(&role.permissions);
    if !is_admin_role(role) {
        return listed;
    }
    let codes = usher_kit::convert::strings(&account.products);
    let mut all = admin_permissions(
        catalogue
            .iter()
            .filter(|product| codes.contains(&product.code))
            .flat_map(product_permission_names),
    );
    all.extend(listed);
    all.sort();
    all.dedup();
    all
}

/// A user or an API key whose permissions are asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Holder {
    /// A user of the account.
    User(Uuid),
    /// An API key of the account.
    ApiKey(Uuid),
}

/// What `holder` holds now, as identity knows it (P26): the effective
/// permissions of an ACTIVE user's role, or those of an active API key still
/// enabled on the account. Anyone else (a user or key of another account, an
/// inactive user, a revoked or expired key) holds nothing, so it can grant
/// nothing.
pub async fn held_permissions<C: ConnectionTrait>(
    db: &C,
    account: &account::Model,
    holder: Holder,
    now: DateTime<Utc>,
) -> ApiResult<Vec<String>> {
    let record = match holder {
        Holder::User(id) => user::Entity::find_by_id(id)
            .filter(user::Column::AccountId.eq(account.id))
            .one(db)
            .await?
            .map(HolderRecord::User),
        Holder::ApiKey(id) => super::entities::api_key::Entity::find_by_id(id)
            .filter(super::entities::api_key::Column::AccountId.eq(account.id))
            .one(db)
            .await?
            .map(HolderRecord::ApiKey),
    };
    let role = match &record {
        Some(HolderRecord::User(found)) if found.status == UserStatus::Active => {
            role::Entity::find_by_id(found.role_id).one(db).await?
        }
        _ => None,
    };
    let catalogue = match &role {
        Some(role) if role.account_id == account.id && is_admin_role(role) => {
            enabled_products(db, account).await?
        }
        _ => Vec::new(),
    };
    held_with(db, account, record.as_ref(), role.as_ref(), &catalogue, now).await
}

/// The record of a user or an API key of the account.
#[derive(Clone, Debug)]
pub enum HolderRecord {
    /// A user of the account.
    User(user::Model),
    /// An API key of the account.
    ApiKey(super::entities::api_key::Model),
}

/// [`held_permissions`] of a holder's record, with the user's role (by its
/// `role_id`) and the products the account enables read already
/// (`catalogue`, needed for the built-in Admin); only a role of another
/// account is read here.
pub async fn held_with<C: ConnectionTrait>(
    db: &C,
    account: &account::Model,
    record: Option<&HolderRecord>,
    role: Option<&role::Model>,
    catalogue: &[product::Model],
    now: DateTime<Utc>,
) -> ApiResult<Vec<String>> {
    match record {
        None => Ok(Vec::new()),
        Some(HolderRecord::User(found)) => {
            if found.status != UserStatus::Active {
                return Ok(Vec::new());
            }
            match role {
                Some(role) if role.account_id == account.id => {
                    Ok(effective_permissions_with(role, account, catalogue))
                }
                Some(role) => effective_permissions(db, role).await,
                None => Ok(Vec::new()),
            }
        }
        Some(HolderRecord::ApiKey(key)) => {
            if !super::api_keys::is_active(key, now) {
                return Ok(Vec::new());
            }
            Ok(super::api_keys::enabled_permissions(
                usher_kit::convert::strings(&key.permissions),
                &usher_kit::convert::strings(&account.products),
            ))
        }
    }
}

/// Inserts a new account; a slug another account holds is
/// [`StoreError::Taken`](usher_kit::db::StoreError::Taken).
pub async fn insert<C: ConnectionTrait>(
    db: &C,
    row: account::Model,
) -> StoreResult<account::Model> {
    Ok(account::ActiveModel::from(row)
        .reset_all()
        .insert(db)
        .await?)
}

/// Writes every column of `row` (an account the caller locked and changed).
pub async fn save<C: ConnectionTrait>(db: &C, row: account::Model) -> StoreResult<account::Model> {
    Ok(account::ActiveModel::from(row)
        .reset_all()
        .update(db)
        .await?)
}

/// The products `codes`, by code.
pub async fn products_by_code<C: ConnectionTrait>(
    db: &C,
    codes: Vec<String>,
) -> StoreResult<Vec<product::Model>> {
    Ok(product::Entity::find()
        .filter(product::Column::Code.is_in(codes))
        .order_by_asc(product::Column::Code)
        .all(db)
        .await?)
}

/// Takes the products not in `enabled` out of every user of the account at
/// `now` (a disabled product leaves every user's grants).
pub async fn keep_user_products<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    enabled: &[String],
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let members = user::Entity::find()
        .filter(user::Column::AccountId.eq(account_id))
        .all(db)
        .await?;
    for member in members {
        let grants = strings(&member.products);
        let kept: Vec<String> = grants
            .iter()
            .filter(|g| enabled.contains(g))
            .cloned()
            .collect();
        if kept.len() != grants.len() {
            let mut member = member.into_active_model();
            member.products = Set(json_strings(kept));
            member.update_time = Set(now);
            member.update(db).await?;
        }
    }
    Ok(())
}

/// One page of accounts, newest first, after `after` (create time and id),
/// with the slug `slug` (empty: any) and whose lower-cased name or slug holds
/// `query` (empty: any); and how many match in all.
pub async fn page<C: ConnectionTrait>(
    db: &C,
    slug: &str,
    query: &str,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: u64,
) -> StoreResult<(Vec<account::Model>, u64)> {
    let mut select = account::Entity::find();
    if !slug.is_empty() {
        select = select.filter(account::Column::Slug.eq(slug));
    }
    if !query.is_empty() {
        let pattern = super::contains_pattern(query);
        select = select.filter(
            Condition::any()
                .add(
                    Expr::expr(Func::lower(Expr::col(account::Column::Name))).like(pattern.clone()),
                )
                .add(account::Column::Slug.like(pattern)),
        );
    }
    let total = select.clone().count(db).await?;
    if let Some((time, id)) = after {
        select = select.filter(
            Condition::any()
                .add(account::Column::CreateTime.lt(time))
                .add(
                    Condition::all()
                        .add(account::Column::CreateTime.eq(time))
                        .add(account::Column::Id.lt(id)),
                ),
        );
    }
    let rows = select
        .order_by_desc(account::Column::CreateTime)
        .order_by_desc(account::Column::Id)
        .limit(limit)
        .all(db)
        .await?;
    Ok((rows, total))
}

/// Creates or redefines the product `code` at `now`; answers the product and
/// whether it is new.
pub async fn upsert_product<C: ConnectionTrait>(
    db: &C,
    code: &str,
    display_name: &str,
    permissions: Json,
    now: DateTime<Utc>,
) -> StoreResult<(product::Model, bool)> {
    let existing = product::Entity::find_by_id(code.to_owned()).one(db).await?;
    Ok(match existing {
        Some(existing) => {
            let mut active = existing.into_active_model();
            active.display_name = Set(display_name.to_owned());
            active.permissions = Set(permissions);
            active.update_time = Set(now);
            (active.update(db).await?, false)
        }
        None => {
            let created = product::ActiveModel {
                code: Set(code.to_owned()),
                display_name: Set(display_name.to_owned()),
                permissions: Set(permissions),
                create_time: Set(now),
                update_time: Set(now),
            }
            .insert(db)
            .await?;
            (created, true)
        }
    })
}

/// Takes the permissions of product `code` that are not in `names` out of
/// every custom role at `now`.
pub async fn keep_product_permissions<C: ConnectionTrait>(
    db: &C,
    code: &str,
    names: &[String],
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let prefix = format!("{code}.");
    let roles = role::Entity::find()
        .filter(role::Column::BuiltIn.eq(false))
        .all(db)
        .await?;
    for role in roles {
        let held = strings(&role.permissions);
        let kept: Vec<String> = held
            .iter()
            .filter(|p| !p.starts_with(&prefix) || names.contains(p))
            .cloned()
            .collect();
        if kept.len() != held.len() {
            let mut active = role.into_active_model();
            active.permissions = Set(json_strings(kept));
            active.update_time = Set(now);
            active.update(db).await?;
        }
    }
    Ok(())
}

/// Up to `limit` products by code, after the code `after`.
pub async fn products_page<C: ConnectionTrait>(
    db: &C,
    after: Option<String>,
    limit: u64,
) -> StoreResult<Vec<product::Model>> {
    let mut select = product::Entity::find();
    if let Some(after) = after {
        select = select.filter(product::Column::Code.gt(after));
    }
    Ok(select
        .order_by_asc(product::Column::Code)
        .limit(limit)
        .all(db)
        .await?)
}
