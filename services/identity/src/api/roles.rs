//! RoleService: the roles of the caller's account (built-in `Admin` and
//! `User`, and custom roles) and the permission catalogue available to it.
//!
//! Every query is scoped to the account of the verified principal (P14): a
//! role id of another account answers the same NOT_FOUND as an unknown id.
//! Changes that could break "at least one active user can manage users" lock
//! the account row first, so concurrent changes are checked one after the
//! other.

use std::collections::BTreeSet;

use prost_types::FieldMask;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set, SqlErr, TransactionTrait,
    sea_query::{Expr, Func},
};
use tonic::{Request, Response, Status};
use usher_kit::{
    error::{ApiError, ApiResult, Reason, Violations},
    pagination,
    principal::Principal,
};
use usher_proto::{events::v1 as events, identity::v1 as pb};
use uuid::Uuid;

use super::{Call, IdentityApi, call, convert, mask_paths, status};
use crate::store::scoped;
use crate::{
    domain::{
        self, ADMIN_ROLE, CATALOGUE, USERS_MANAGE, UserStatus,
        grants::{self, Grant, Grantor},
        rules::{self, ManagerChange},
        validate_name, validate_text,
    },
    store::{
        accounts,
        audit::{self, Actor, AuditEntry},
        entities::{product, role, user},
        events::emit,
        idempotency::IdempotencyKey,
    },
};

/// Most roles an account may hold, built-in ones included (so one page of
/// ListRoles always holds them all).
pub const MAX_ROLES: u64 = 100;
/// Most permissions in one role.
pub const MAX_ROLE_PERMISSIONS: usize = 200;
/// Longest role name.
const MAX_NAME_CHARS: usize = 100;
/// Longest role description.
const MAX_DESCRIPTION_CHARS: usize = 500;
/// ListRoles page size when the caller sends 0, and the largest one.
const ROLES_PAGE_SIZE: u64 = 100;
/// ListPermissions page size when the caller sends 0, and the largest one.
const PERMISSIONS_PAGE_SIZE: u64 = 500;

/// A page size: negative is INVALID_ARGUMENT on `page_size`, 0 is `default`,
/// anything above `max` is `max`.
pub(crate) fn page_size(requested: i32, default: u64, max: u64) -> ApiResult<u64> {
    if requested == 0 {
        return Ok(default);
    }
    Ok(pagination::page_size(requested)?.min(max))
}

/// The actor of a call, named as it is now (audit entries and events keep
/// the snapshot).
pub(crate) async fn actor<C: ConnectionTrait>(db: &C, principal: &Principal) -> ApiResult<Actor> {
    let name = crate::store::users::display_name(db, principal.user_id).await?;
    Ok(Actor::from_principal(principal, name))
}

/// `lower(column) = lower(value)`: names are unique case-insensitively.
pub(crate) fn same_name<C: sea_orm::sea_query::IntoColumnRef>(column: C, name: &str) -> Expr {
    use sea_orm::sea_query::ExprTrait;
    Expr::expr(Func::lower(Expr::col(column))).eq(Func::lower(Expr::val(name.to_owned())))
}

/// The value of a validator's result, its field violations added to
/// `violations` instead (so a request reports every bad field at once).
pub(crate) fn checked<T>(
    violations: &mut Violations,
    result: ApiResult<T>,
) -> ApiResult<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(ApiError::InvalidArgument(list)) => {
            for violation in list {
                violations.add(violation.field, violation.description);
            }
            Ok(None)
        }
        Err(other) => Err(other),
    }
}

/// Whether an error is a unique-constraint violation (a name taken by a
/// concurrent writer).
pub(crate) fn is_unique_violation(err: &sea_orm::DbErr) -> bool {
    matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// One permission the account may use.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Available {
    name: String,
    description: String,
    /// Empty for core permissions.
    product_code: String,
}

/// The core catalogue, then the permissions of the products enabled on the
/// account, each group ordered by name.
async fn available_permissions<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
) -> ApiResult<Vec<Available>> {
    let mut core: Vec<Available> = CATALOGUE
        .iter()
        .map(|(name, description)| Available {
            name: (*name).to_owned(),
            description: (*description).to_owned(),
            product_code: String::new(),
        })
        .collect();
    core.sort_by(|a, b| a.name.cmp(&b.name));
    let account = accounts::find(db, account_id).await?;
    let codes = convert::strings(&account.products);
    let products = if codes.is_empty() {
        Vec::new()
    } else {
        product::Entity::find()
            .filter(product::Column::Code.is_in(codes))
            .all(db)
            .await?
    };
    let mut of_products: Vec<Available> = products
        .iter()
        .flat_map(|product| {
            product
                .permissions
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    let name = p.get("name").and_then(|n| n.as_str())?;
                    Some(Available {
                        name: name.to_owned(),
                        description: p
                            .get("description")
                            .and_then(|d| d.as_str())
                            .unwrap_or_default()
                            .to_owned(),
                        product_code: product.code.clone(),
                    })
                })
        })
        .collect();
    of_products.sort_by(|a, b| a.name.cmp(&b.name));
    of_products.dedup_by(|a, b| a.name == b.name);
    core.extend(of_products);
    Ok(core)
}

/// The names of the permissions of the products enabled on the account.
async fn enabled_product_permissions<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
) -> ApiResult<Vec<String>> {
    Ok(available_permissions(db, account_id)
        .await?
        .into_iter()
        .filter(|p| !p.product_code.is_empty())
        .map(|p| p.name)
        .collect())
}

/// Whether a stored role is the built-in Admin, whose permissions are the
/// whole catalogue available to the account.
fn is_admin(model: &role::Model) -> bool {
    model.built_in && model.name == ADMIN_ROLE
}

/// Whether a stored role holds `users.manage`.
fn manages_users(model: &role::Model) -> bool {
    is_admin(model)
        || convert::strings(&model.permissions)
            .iter()
            .any(|p| p == USERS_MANAGE)
}

/// A role as the API shows it: the built-in Admin lists the permissions of
/// the enabled products too.
fn role_view(model: &role::Model, user_count: u64, product_permissions: &[String]) -> pb::Role {
    let mut view = convert::role(model, user_count);
    if is_admin(model) {
        view.permissions = domain::admin_permissions(product_permissions.iter().cloned());
        view.manages_users = true;
    }
    view
}

/// Whether another role of the account has `name` (case-insensitively).
async fn role_name_taken<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    name: &str,
    except: Option<Uuid>,
) -> ApiResult<bool> {
    let mut select = role::Entity::find()
        .filter(role::Column::AccountId.eq(account_id))
        .filter(same_name((role::Entity, role::Column::Name), name));
    if let Some(except) = except {
        select = select.filter(role::Column::Id.ne(except));
    }
    Ok(select.count(db).await? > 0)
}

/// Active users of the account who can manage users now.
async fn active_managers<C: ConnectionTrait>(db: &C, account_id: Uuid) -> ApiResult<u64> {
    let roles = role::Entity::find()
        .filter(role::Column::AccountId.eq(account_id))
        .all(db)
        .await?;
    let manager_roles: Vec<Uuid> = roles
        .iter()
        .filter(|r| manages_users(r))
        .map(|r| r.id)
        .collect();
    if manager_roles.is_empty() {
        return Ok(0);
    }
    Ok(user::Entity::find()
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::Status.eq(UserStatus::Active.as_str()))
        .filter(user::Column::RoleId.is_in(manager_roles))
        .count(db)
        .await?)
}

/// Refuses moving every active holder of `role_id` off `users.manage` when
/// that would leave the account without an active manager. The caller holds
/// the account lock.
async fn check_holders_may_lose_manage<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    role_id: Uuid,
) -> ApiResult<()> {
    let holders = user::Entity::find()
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::RoleId.eq(role_id))
        .filter(user::Column::Status.eq(UserStatus::Active.as_str()))
        .all(db)
        .await?;
    let changes: Vec<ManagerChange> = holders
        .iter()
        .map(|holder| ManagerChange {
            owner: holder.owner,
            manager_before: true,
            manager_after: false,
        })
        .collect();
    let managers = active_managers(db, account_id).await?;
    rules::check_managers_remain(managers, &changes)
}

/// Validates requested permission names: trimmed, deduplicated, at most
/// [`MAX_ROLE_PERMISSIONS`], each from the catalogue or an enabled product
/// (INVALID_ARGUMENT on `permissions[i]`). Returns them sorted.
fn validate_permissions(
    requested: &[String],
    available: &[Available],
    violations: &mut Violations,
) -> Vec<String> {
    if requested.len() > MAX_ROLE_PERMISSIONS {
        violations.add(
            "permissions",
            format!("must hold at most {MAX_ROLE_PERMISSIONS} permissions"),
        );
        return Vec::new();
    }
    let mut chosen = BTreeSet::new();
    for (index, name) in requested.iter().enumerate() {
        let name = name.trim();
        if available.iter().any(|p| p.name == name) {
            chosen.insert(name.to_owned());
        } else {
            violations.add(
                format!("permissions[{index}]"),
                "is not a permission of the catalogue or of a product enabled on the account",
            );
        }
    }
    chosen.into_iter().collect()
}

/// The caller as a grantor (P26): its permissions, and for a signed-in user
/// the role it holds now (read in `db`, so inside the caller's transaction
/// it is the role the change is checked against).
pub(crate) async fn grantor_role<C: ConnectionTrait>(
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
pub(crate) async fn check_grant<C: ConnectionTrait>(
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

/// Old and new value of a changed field, for the audit log.
fn change(
    old: impl Into<serde_json::Value>,
    new: impl Into<serde_json::Value>,
) -> serde_json::Value {
    serde_json::json!({"old": old.into(), "new": new.into()})
}

impl IdentityApi {
    async fn list_roles(
        &self,
        call: Call,
        request: pb::ListRolesRequest,
    ) -> ApiResult<pb::ListRolesResponse> {
        let account_id = call.principal.account()?;
        let size = page_size(request.page_size, ROLES_PAGE_SIZE, ROLES_PAGE_SIZE)?;
        let fingerprint = pagination::fingerprint(&"roles");
        let cursor: Option<(bool, String, Uuid)> =
            pagination::decode_token(&fingerprint, &request.page_token)?;
        let db = &self.state.db;
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
        let rows = select
            .order_by_desc(role::Column::BuiltIn)
            .order_by_asc(role::Column::Name)
            .order_by_asc(role::Column::Id)
            .limit(size + 1)
            .all(db)
            .await?;
        let more = rows.len() as u64 > size;
        let rows: Vec<_> = rows
            .into_iter()
            .take(usize::try_from(size).unwrap_or(usize::MAX))
            .collect();
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => {
                pagination::encode_token(&fingerprint, &(last.built_in, &last.name, last.id))
            }
            _ => String::new(),
        };
        let counts = crate::store::users::count_by(
            db,
            account_id,
            user::Column::RoleId,
            rows.iter().map(|r| r.id).collect(),
        )
        .await?;
        let product_permissions = if rows.iter().any(is_admin) {
            enabled_product_permissions(db, account_id).await?
        } else {
            Vec::new()
        };
        Ok(pb::ListRolesResponse {
            roles: rows
                .iter()
                .map(|r| {
                    role_view(
                        r,
                        counts.get(&r.id).copied().unwrap_or(0),
                        &product_permissions,
                    )
                })
                .collect(),
            next_page_token,
        })
    }

    async fn list_permissions(
        &self,
        call: Call,
        request: pb::ListPermissionsRequest,
    ) -> ApiResult<pb::ListPermissionsResponse> {
        let account_id = call.principal.account()?;
        let size = page_size(
            request.page_size,
            PERMISSIONS_PAGE_SIZE,
            PERMISSIONS_PAGE_SIZE,
        )?;
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let fingerprint = pagination::fingerprint(&"permissions");
        // The catalogue is small (core + at most 50 products of 100 each):
        // the keyset runs over the ordered list in memory.
        let cursor: Option<(bool, String)> =
            pagination::decode_token(&fingerprint, &request.page_token)?;
        let all = available_permissions(&self.state.db, account_id).await?;
        let start = match &cursor {
            None => 0,
            Some((of_product, name)) => all
                .iter()
                .position(|p| {
                    let key = (!p.product_code.is_empty(), p.name.as_str());
                    key > (*of_product, name.as_str())
                })
                .unwrap_or(all.len()),
        };
        let page: Vec<&Available> = all.iter().skip(start).take(size).collect();
        let next_page_token = match page.last() {
            Some(last) if start + page.len() < all.len() => {
                pagination::encode_token(&fingerprint, &(!last.product_code.is_empty(), &last.name))
            }
            _ => String::new(),
        };
        Ok(pb::ListPermissionsResponse {
            permissions: page
                .into_iter()
                .map(|p| pb::Permission {
                    name: p.name.clone(),
                    description: p.description.clone(),
                    product_code: p.product_code.clone(),
                })
                .collect(),
            next_page_token,
        })
    }

    async fn create_role(
        &self,
        call: Call,
        mut request: pb::CreateRoleRequest,
    ) -> ApiResult<pb::CreateRoleResponse> {
        let account_id = call.principal.account()?;
        let request_id = std::mem::take(&mut request.request_id);
        let idempotency = IdempotencyKey::new(
            &call.principal,
            "usher.identity.v1.RoleService/CreateRole",
            &request_id,
            &request,
        )?;
        if let Some(key) = &idempotency
            && let Some(done) = key.replay(&self.state.db).await?
        {
            return Ok(done);
        }

        let available = available_permissions(&self.state.db, account_id).await?;
        let mut violations = Violations::new();
        let name = checked(
            &mut violations,
            validate_name("name", &request.name, MAX_NAME_CHARS),
        )?;
        let description = checked(
            &mut violations,
            validate_text("description", &request.description, MAX_DESCRIPTION_CHARS),
        )?;
        let permissions = validate_permissions(&request.permissions, &available, &mut violations);
        violations.into_result()?;
        let (Some(name), Some(description)) = (name, description) else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "validated fields missing"
            )));
        };
        check_grant(
            &self.state.db,
            &call.principal,
            &Grant::Permissions(&permissions),
        )
        .await?;

        let now = self.state.clock.now();
        let txn = self.state.db.begin().await?;
        // Serialises creates of one account: the name check, the role count
        // and a concurrent retry with the same request_id.
        accounts::lock(&txn, account_id).await?;
        if let Some(key) = &idempotency
            && let Some(done) = key.replay(&txn).await?
        {
            return Ok(done);
        }
        if role_name_taken(&txn, account_id, &name, None).await? {
            return Err(ApiError::rejected(
                Reason::AlreadyExists,
                "a role with this name exists",
            ));
        }
        let count = role::Entity::find()
            .filter(role::Column::AccountId.eq(account_id))
            .count(&txn)
            .await?;
        if count >= MAX_ROLES {
            return Err(ApiError::invalid(
                "name",
                format!("the account already has the maximum of {MAX_ROLES} roles"),
            ));
        }
        let inserted = role::ActiveModel {
            id: Set(Uuid::new_v4()),
            account_id: Set(account_id),
            name: Set(name.clone()),
            description: Set(description.clone()),
            permissions: Set(convert::json_strings(permissions.clone())),
            built_in: Set(false),
            create_time: Set(now),
            update_time: Set(now),
        }
        .insert(&txn)
        .await;
        let created = match inserted {
            Ok(created) => created,
            Err(err) if is_unique_violation(&err) => {
                return Err(ApiError::rejected(
                    Reason::AlreadyExists,
                    "a role with this name exists",
                ));
            }
            Err(err) => return Err(err.into()),
        };
        let actor = actor(&txn, &call.principal).await?;
        audit::record(
            &txn,
            AuditEntry {
                account_id,
                actor: &actor,
                action: "role.created",
                target_type: "role",
                target_id: created.id.to_string(),
                target_name: name.clone(),
                details: Some(
                    serde_json::json!({"description": description, "permissions": permissions}),
                ),
                request_id: &call.request_id,
            },
            now,
        )
        .await?;
        emit(
            &txn,
            "role.created",
            "RoleCreated",
            created.id.to_string(),
            Some(account_id),
            &events::RoleCreated {
                role_id: created.id.to_string(),
                account_id: account_id.to_string(),
                actor: Some(actor.to_proto()),
                name,
                permissions,
            },
            now,
        )
        .await?;
        let response = pb::CreateRoleResponse {
            role: Some(role_view(&created, 0, &[])),
        };
        if let Some(key) = &idempotency {
            key.remember(&txn, &response, now).await?;
        }
        txn.commit().await?;
        Ok(response)
    }

    async fn update_role(
        &self,
        call: Call,
        request: pb::UpdateRoleRequest,
    ) -> ApiResult<pb::UpdateRoleResponse> {
        let account_id = call.principal.account()?;
        let role_id = domain::parse_id("role_id", &request.role_id)?;
        let paths = mask_paths(
            request.update_mask.as_ref(),
            &["name", "description", "permissions"],
        )?;
        let available = available_permissions(&self.state.db, account_id).await?;
        let mut violations = Violations::new();
        let mut name = None;
        let mut description = None;
        let mut permissions = None;
        for path in &paths {
            match path.as_str() {
                "name" => {
                    name = checked(
                        &mut violations,
                        validate_name("name", &request.name, MAX_NAME_CHARS),
                    )?;
                }
                "description" => {
                    description = checked(
                        &mut violations,
                        validate_text("description", &request.description, MAX_DESCRIPTION_CHARS),
                    )?;
                }
                _ => {
                    permissions = Some(validate_permissions(
                        &request.permissions,
                        &available,
                        &mut violations,
                    ))
                }
            }
        }
        violations.into_result()?;

        let now = self.state.clock.now();
        let txn = self.state.db.begin().await?;
        accounts::lock(&txn, account_id).await?;
        let current = scoped::role(&txn, account_id, role_id).await?;
        if current.built_in {
            return Err(ApiError::rejected(
                Reason::BuiltInRole,
                "built-in roles cannot be changed",
            ));
        }
        let old_permissions = convert::strings(&current.permissions);
        let mut changed: Vec<String> = Vec::new();
        let mut details = serde_json::Map::new();
        let mut active = current.clone().into_active_model();
        if let Some(name) = name.filter(|n| *n != current.name) {
            if role_name_taken(&txn, account_id, &name, Some(role_id)).await? {
                return Err(ApiError::rejected(
                    Reason::AlreadyExists,
                    "a role with this name exists",
                ));
            }
            details.insert("name".into(), change(current.name.clone(), name.clone()));
            changed.push("name".into());
            active.name = Set(name);
        }
        if let Some(description) = description.filter(|d| *d != current.description) {
            details.insert(
                "description".into(),
                change(current.description.clone(), description.clone()),
            );
            changed.push("description".into());
            active.description = Set(description);
        }
        let permissions_named = permissions.is_some();
        if let Some(permissions) = permissions.filter(|p| *p != old_permissions) {
            check_grant(
                &txn,
                &call.principal,
                &Grant::RolePermissions {
                    role_id,
                    before: &old_permissions,
                    after: &permissions,
                },
            )
            .await?;
            let loses_manage = old_permissions.iter().any(|p| p == USERS_MANAGE)
                && !permissions.iter().any(|p| p == USERS_MANAGE);
            if loses_manage {
                check_holders_may_lose_manage(&txn, account_id, role_id).await?;
            }
            details.insert(
                "permissions".into(),
                change(old_permissions.clone(), permissions.clone()),
            );
            changed.push("permissions".into());
            active.permissions = Set(convert::json_strings(permissions));
        }
        let updated = if changed.is_empty() {
            current
        } else {
            active.update_time = Set(now);
            let updated = match active.update(&txn).await {
                Ok(updated) => updated,
                Err(err) if is_unique_violation(&err) => {
                    return Err(ApiError::rejected(
                        Reason::AlreadyExists,
                        "a role with this name exists",
                    ));
                }
                Err(err) => return Err(err.into()),
            };
            let actor = actor(&txn, &call.principal).await?;
            audit::record(
                &txn,
                AuditEntry {
                    account_id,
                    actor: &actor,
                    action: "role.updated",
                    target_type: "role",
                    target_id: role_id.to_string(),
                    target_name: updated.name.clone(),
                    details: Some(serde_json::Value::Object(details)),
                    request_id: &call.request_id,
                },
                now,
            )
            .await?;
            emit(
                &txn,
                "role.updated",
                "RoleUpdated",
                role_id.to_string(),
                Some(account_id),
                &events::RoleUpdated {
                    role_id: role_id.to_string(),
                    account_id: account_id.to_string(),
                    actor: Some(actor.to_proto()),
                    changed_fields: Some(FieldMask { paths: changed }),
                    name: updated.name.clone(),
                    permissions: convert::strings(&updated.permissions),
                },
                now,
            )
            .await?;
            updated
        };
        let count =
            crate::store::users::count_by(&txn, account_id, user::Column::RoleId, vec![role_id])
                .await?
                .get(&role_id)
                .copied()
                .unwrap_or(0);
        txn.commit().await?;
        // Even when nothing changed: a retry after a failed refresh heals the
        // snapshots of the role's holders.
        if permissions_named {
            crate::store::principals::refresh_role(&self.state, role_id).await?;
        }
        Ok(pb::UpdateRoleResponse {
            role: Some(role_view(&updated, count, &[])),
        })
    }

    async fn delete_role(
        &self,
        call: Call,
        request: pb::DeleteRoleRequest,
    ) -> ApiResult<pb::DeleteRoleResponse> {
        let account_id = call.principal.account()?;
        let role_id = domain::parse_id("role_id", &request.role_id)?;
        let reassign_to =
            domain::parse_optional_id("reassign_to_role_id", &request.reassign_to_role_id)?;
        if reassign_to == Some(role_id) {
            return Err(ApiError::invalid(
                "reassign_to_role_id",
                "must be another role than the one deleted",
            ));
        }

        let now = self.state.clock.now();
        let txn = self.state.db.begin().await?;
        accounts::lock(&txn, account_id).await?;
        let doomed = scoped::role(&txn, account_id, role_id).await?;
        if doomed.built_in {
            return Err(ApiError::rejected(
                Reason::BuiltInRole,
                "built-in roles cannot be deleted",
            ));
        }
        let holders = user::Entity::find()
            .filter(user::Column::AccountId.eq(account_id))
            .filter(user::Column::RoleId.eq(role_id))
            .order_by_asc(user::Column::Id)
            .all(&txn)
            .await?;
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
                &call.principal,
                &Grant::Reassign {
                    role_id,
                    permissions: &granted,
                },
            )
            .await?;
            if manages_users(&doomed) && !manages_users(&target) {
                check_holders_may_lose_manage(&txn, account_id, role_id).await?;
            }
            Some(target)
        };
        let actor = actor(&txn, &call.principal).await?;
        if let Some(target) = &target {
            user::Entity::update_many()
                .col_expr(user::Column::RoleId, Expr::value(target.id))
                .col_expr(user::Column::UpdateTime, Expr::value(now))
                .filter(user::Column::AccountId.eq(account_id))
                .filter(user::Column::RoleId.eq(role_id))
                .exec(&txn)
                .await?;
            for holder in &holders {
                emit(
                    &txn,
                    "user.updated",
                    "UserUpdated",
                    holder.id.to_string(),
                    Some(account_id),
                    &events::UserUpdated {
                        user_id: holder.id.to_string(),
                        account_id: account_id.to_string(),
                        actor: Some(actor.to_proto()),
                        changed_fields: Some(FieldMask {
                            paths: vec!["role_id".into()],
                        }),
                        role_id: target.id.to_string(),
                        ..Default::default()
                    },
                    now,
                )
                .await?;
            }
        }
        role::Entity::delete_by_id(role_id).exec(&txn).await?;
        let reassigned = i32::try_from(holders.len()).unwrap_or(i32::MAX);
        let target_id = target
            .as_ref()
            .map(|t| t.id.to_string())
            .unwrap_or_default();
        audit::record(
            &txn,
            AuditEntry {
                account_id,
                actor: &actor,
                action: "role.deleted",
                target_type: "role",
                target_id: role_id.to_string(),
                target_name: doomed.name.clone(),
                details: Some(serde_json::json!({
                    "permissions": convert::strings(&doomed.permissions),
                    "reassigned_to_role_id": target_id,
                    "reassigned_to_role_name": target.as_ref().map(|t| t.name.clone()).unwrap_or_default(),
                    "reassigned_user_count": reassigned,
                })),
                request_id: &call.request_id,
            },
            now,
        )
        .await?;
        emit(
            &txn,
            "role.deleted",
            "RoleDeleted",
            role_id.to_string(),
            Some(account_id),
            &events::RoleDeleted {
                role_id: role_id.to_string(),
                account_id: account_id.to_string(),
                actor: Some(actor.to_proto()),
                name: doomed.name.clone(),
                reassigned_to_role_id: target_id,
                reassigned_user_count: reassigned,
            },
            now,
        )
        .await?;
        txn.commit().await?;
        if target.is_some() {
            // The moved users now hold the target role's permissions.
            let moved: Vec<Uuid> = holders.iter().map(|h| h.id).collect();
            crate::store::principals::refresh_users(&self.state, &moved).await?;
        }
        Ok(pb::DeleteRoleResponse {
            role_id: role_id.to_string(),
            reassigned_user_count: reassigned,
        })
    }
}

#[tonic::async_trait]
impl pb::role_service_server::RoleService for IdentityApi {
    async fn list_roles(
        &self,
        request: Request<pb::ListRolesRequest>,
    ) -> Result<Response<pb::ListRolesResponse>, Status> {
        let call = call(&request)?;
        self.list_roles(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn list_permissions(
        &self,
        request: Request<pb::ListPermissionsRequest>,
    ) -> Result<Response<pb::ListPermissionsResponse>, Status> {
        let call = call(&request)?;
        self.list_permissions(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn create_role(
        &self,
        request: Request<pb::CreateRoleRequest>,
    ) -> Result<Response<pb::CreateRoleResponse>, Status> {
        let call = call(&request)?;
        self.create_role(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn update_role(
        &self,
        request: Request<pb::UpdateRoleRequest>,
    ) -> Result<Response<pb::UpdateRoleResponse>, Status> {
        let call = call(&request)?;
        self.update_role(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn delete_role(
        &self,
        request: Request<pb::DeleteRoleRequest>,
    ) -> Result<Response<pb::DeleteRoleResponse>, Status> {
        let call = call(&request)?;
        self.delete_role(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The helpers the in-crate audit tests share (the role tests themselves
    //! are in `tests/service/roles.rs`).
    // TODO(lead): drop once the audit tests move to tests/service (they can
    // use `super::roles::{invalid, start, tenant}` there).

    use std::sync::Arc;

    use chrono::DateTime;
    use prost::Message;
    use tonic::{Response, Status};
    use usher_kit::{clock::ManualClock, principal::Principal};
    use uuid::Uuid;

    use usher_proto::identity::v1::account_service_server::AccountService;

    use crate::testing::{
        TestIdentity, admin_permissions, member, new_account_request, platform, request,
    };

    #[derive(Clone, PartialEq, prost::Message)]
    struct RpcStatus {
        #[prost(int32, tag = "1")]
        code: i32,
        #[prost(string, tag = "2")]
        message: String,
        #[prost(message, repeated, tag = "3")]
        details: Vec<prost_types::Any>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct ErrorInfo {
        #[prost(string, tag = "1")]
        reason: String,
        #[prost(string, tag = "2")]
        domain: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct BadRequest {
        #[prost(message, repeated, tag = "1")]
        field_violations: Vec<FieldViolation>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct FieldViolation {
        #[prost(string, tag = "1")]
        field: String,
        #[prost(string, tag = "2")]
        description: String,
    }

    fn details(status: &Status) -> Vec<prost_types::Any> {
        RpcStatus::decode(status.details())
            .expect("google.rpc.Status details")
            .details
    }

    /// The `ErrorInfo.reason` of a failed call.
    pub(crate) fn reason(status: &Status) -> String {
        details(status)
            .iter()
            .find(|any| any.type_url.ends_with("google.rpc.ErrorInfo"))
            .map(|any| ErrorInfo::decode(any.value.as_slice()).expect("error info"))
            .map(|info| {
                assert_eq!(info.domain, "usher.dev");
                info.reason
            })
            .unwrap_or_default()
    }

    /// The fields of the `BadRequest` of a failed call.
    pub(crate) fn fields(status: &Status) -> Vec<String> {
        details(status)
            .iter()
            .filter(|any| any.type_url.ends_with("google.rpc.BadRequest"))
            .flat_map(|any| {
                BadRequest::decode(any.value.as_slice())
                    .expect("bad request")
                    .field_violations
            })
            .map(|v| v.field)
            .collect()
    }

    /// The error of a call that must fail with `expected`.
    pub(crate) fn refused<T: std::fmt::Debug>(
        result: Result<Response<T>, Status>,
        expected: &str,
    ) -> Status {
        let status = result.expect_err(expected);
        assert_eq!(reason(&status), expected, "{status:?}");
        status
    }

    /// The error of a call that must fail with INVALID_ARGUMENT on `field`.
    pub(crate) fn invalid<T: std::fmt::Debug>(result: Result<Response<T>, Status>, field: &str) {
        let status = refused(result, "INVALID_ARGUMENT");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            fields(&status).iter().any(|f| f == field),
            "{field} not in {status:?}"
        );
    }

    /// A started service with a manual clock.
    pub(crate) async fn start() -> (TestIdentity, Arc<ManualClock>) {
        let clock = ManualClock::new(DateTime::from_timestamp(1_900_000_000, 0).expect("valid"));
        (TestIdentity::start(clock.clone()).await, clock)
    }

    /// An account made by CreateAccount, with its owner.
    #[derive(Clone, Debug)]
    pub(crate) struct Tenant {
        pub(crate) account: Uuid,
        pub(crate) owner: Uuid,
        /// The owner as a caller, holding every catalogue permission.
        pub(crate) admin: Principal,
    }

    pub(crate) async fn tenant(test: &TestIdentity, products: &[&str]) -> Tenant {
        let mut message = new_account_request(50);
        message.products = products.iter().map(|p| (*p).to_owned()).collect();
        let created = AccountService::create_account(&test.api, request(&platform(), message))
            .await
            .expect("account")
            .into_inner();
        let account = Uuid::parse_str(&created.account.expect("account").id).expect("uuid");
        let owner = Uuid::parse_str(&created.owner.expect("owner").id).expect("uuid");
        Tenant {
            account,
            owner,
            admin: member(account, owner, &admin_permissions()),
        }
    }
}
