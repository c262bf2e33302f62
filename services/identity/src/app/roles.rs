//! RoleService as load → decide → persist. Changes that could break "at
//! least one active user can manage users", and creates and renames (the
//! name check), lock the account row first, so concurrent changes are
//! checked one after the other; a name taken by a concurrent writer anyway
//! (`StoreError::Taken`) answers the same ALREADY_EXISTS.

use usher_kit::{
    db::StoreError,
    error::{ApiError, ApiResult, Reason},
    idempotency::IdempotencyKey,
    principal::Principal,
};
use uuid::Uuid;

use crate::{
    domain::{
        grants::Grant,
        roles::{self, Available},
    },
    state::Identity,
    store::{
        accounts, effects,
        entities::role,
        principals,
        roles::{self as store, actor, check_grant},
        scoped,
    },
};

/// A name taken by a concurrent writer is the name rule's refusal.
fn taken(err: StoreError) -> ApiError {
    if err.is_taken() {
        roles::name_taken()
    } else {
        err.into()
    }
}

/// The permissions the account may use.
pub async fn available(state: &Identity, account_id: Uuid) -> ApiResult<Vec<Available>> {
    store::available_permissions(&state.db, account_id).await
}

/// A page of roles with their holder counts, and the permissions of the
/// enabled products when the page shows the built-in Admin.
pub async fn list(
    state: &Identity,
    account_id: Uuid,
    cursor: Option<(bool, String, Uuid)>,
    limit: u64,
) -> ApiResult<(
    Vec<role::Model>,
    std::collections::HashMap<Uuid, u64>,
    Vec<String>,
)> {
    let db = &state.db;
    let rows = store::page(db, account_id, cursor, limit).await?;
    let counts = store::holder_counts(db, rows.iter().map(|r| r.id).collect()).await?;
    let product_permissions = if rows.iter().any(|r| roles::is_admin(r.built_in, &r.name)) {
        store::available_permissions(db, account_id)
            .await?
            .into_iter()
            .filter(|p| !p.product_code.is_empty())
            .map(|p| p.name)
            .collect()
    } else {
        Vec::new()
    };
    Ok((rows, counts, product_permissions))
}

/// A validated CreateRole.
#[derive(Clone, Debug)]
pub struct NewRole {
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Its permissions, sorted.
    pub permissions: Vec<String>,
}

/// Creates a custom role; a replay of `idempotency` answers the first
/// response.
pub async fn create<R: prost::Message + Default>(
    state: &Identity,
    principal: &Principal,
    request_id: &str,
    idempotency: Option<&IdempotencyKey>,
    new: NewRole,
    respond: impl FnOnce(&role::Model) -> R,
) -> ApiResult<R> {
    let account_id = principal.account()?;
    check_grant(&state.db, principal, &Grant::Permissions(&new.permissions)).await?;
    let now = state.clock.now();
    let txn = usher_kit::db::begin(&state.db).await?;
    // Serialises creates of one account: the name check, the role count
    // and a concurrent retry with the same request_id.
    accounts::lock(&txn, account_id).await?;
    if let Some(key) = idempotency
        && let Some(done) = key.replay(&txn).await?
    {
        return Ok(done);
    }
    if store::name_taken(&txn, account_id, &new.name, None).await? {
        return Err(roles::name_taken());
    }
    roles::check_room(store::count(&txn, account_id).await?)?;
    let created = store::insert(
        &txn,
        account_id,
        &new.name,
        &new.description,
        &new.permissions,
        now,
    )
    .await
    .map_err(taken)?;
    let actor = actor(&txn, principal).await?;
    let caused = roles::created(&store::facts(&created), &actor, now);
    effects::apply(&txn, caused, &actor, request_id, now).await?;
    let response = respond(&created);
    if let Some(key) = idempotency {
        key.remember(&txn, &response, now).await?;
    }
    txn.commit().await?;
    Ok(response)
}

/// A validated UpdateRole: the fields named by its mask.
#[derive(Clone, Debug)]
pub struct RoleChange {
    /// The role.
    pub role_id: Uuid,
    /// Its new name, if named.
    pub name: Option<String>,
    /// Its new description, if named.
    pub description: Option<String>,
    /// Its new permissions, if named.
    pub permissions: Option<Vec<String>>,
}

/// Edits a custom role; answers it with its holder count. Refreshes the
/// principals of its holders whenever the permissions are named (even
/// unchanged: a retry after a failed refresh heals their snapshots).
pub async fn update(
    state: &Identity,
    principal: &Principal,
    request_id: &str,
    change: RoleChange,
) -> ApiResult<(role::Model, u64)> {
    let account_id = principal.account()?;
    let role_id = change.role_id;
    let permissions_named = change.permissions.is_some();
    let now = state.clock.now();
    let txn = usher_kit::db::begin(&state.db).await?;
    accounts::lock(&txn, account_id).await?;
    let current = scoped::role(&txn, account_id, role_id).await?;
    let facts = store::facts(&current);
    roles::check_not_built_in(&facts, false)?;
    let edit = roles::edit(&facts, change.name, change.description, change.permissions);
    if let Some(name) = &edit.name
        && store::name_taken(&txn, account_id, name, Some(role_id)).await?
    {
        return Err(roles::name_taken());
    }
    if let Some(permissions) = &edit.permissions {
        check_grant(
            &txn,
            principal,
            &Grant::RolePermissions {
                role_id,
                before: &facts.permissions,
                after: permissions,
            },
        )
        .await?;
        if roles::loses_manage(&facts.permissions, permissions) {
            let holders = store::active_holders(&txn, account_id, role_id).await?;
            let managers = store::active_managers(&txn, account_id).await?;
            roles::check_holders_may_lose_manage(&holders, managers)?;
        }
    }
    let updated = if edit.is_empty() {
        current
    } else {
        let updated = store::update(&txn, current, &edit, now)
            .await
            .map_err(taken)?;
        let actor = actor(&txn, principal).await?;
        let caused = roles::updated(&store::facts(&updated), edit, &actor, now);
        effects::apply(&txn, caused, &actor, request_id, now).await?;
        updated
    };
    let count = store::holder_counts(&txn, vec![role_id])
        .await?
        .get(&role_id)
        .copied()
        .unwrap_or(0);
    txn.commit().await?;
    if permissions_named {
        principals::refresh_role(state, role_id).await?;
    }
    Ok((updated, count))
}

/// Deletes a custom role, moving its holders to `reassign_to`; answers how
/// many moved.
pub async fn delete(
    state: &Identity,
    principal: &Principal,
    request_id: &str,
    role_id: Uuid,
    reassign_to: Option<Uuid>,
) -> ApiResult<i32> {
    let account_id = principal.account()?;
    let now = state.clock.now();
    let txn = usher_kit::db::begin(&state.db).await?;
    accounts::lock(&txn, account_id).await?;
    let doomed = store::facts(&scoped::role(&txn, account_id, role_id).await?);
    roles::check_not_built_in(&doomed, true)?;
    let holders = store::holders(&txn, account_id, role_id).await?;
    let target = if holders.is_empty() {
        None
    } else {
        let Some(target_id) = reassign_to else {
            return Err(ApiError::rejected(
                Reason::RoleInUse,
                format!(
                    "{} users hold the role; give reassign_to_role_id",
                    holders.len()
                ),
            ));
        };
        let target = scoped::role(&txn, account_id, target_id).await?;
        let granted = accounts::effective_permissions(&txn, &target).await?;
        check_grant(
            &txn,
            principal,
            &Grant::Reassign {
                role_id,
                permissions: &granted,
            },
        )
        .await?;
        let target = store::facts(&target);
        if doomed.manages_users() && !target.manages_users() {
            let active = store::active_holders(&txn, account_id, role_id).await?;
            let managers = store::active_managers(&txn, account_id).await?;
            roles::check_holders_may_lose_manage(&active, managers)?;
        }
        Some(target)
    };
    let actor = actor(&txn, principal).await?;
    if let Some(target) = &target {
        store::reassign(&txn, account_id, role_id, target.id, now).await?;
    }
    store::delete(&txn, role_id).await?;
    let caused = roles::deleted(&doomed, target.as_ref(), &holders, &actor, now);
    effects::apply(&txn, caused, &actor, request_id, now).await?;
    txn.commit().await?;
    if target.is_some() {
        // The moved users now hold the target role's permissions.
        principals::refresh_users(state, &holders).await?;
    }
    Ok(roles::reassigned_count(holders.len()))
}
