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
    //! Service tests of RoleService, and the helpers the team and audit tests
    //! share: real PostgreSQL and Redis through [`TestIdentity`].

    use std::sync::Arc;

    use chrono::{DateTime, Duration};
    use prost::Message;
    use sea_orm::{
        ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel, QueryFilter,
        Set, Statement,
    };
    use tonic::{Response, Status};
    use usher_kit::{clock::ManualClock, principal::Principal};
    use usher_proto::{events::v1 as events, identity::v1 as pb};
    use uuid::Uuid;

    use pb::{account_service_server::AccountService, role_service_server::RoleService};

    use crate::{
        domain::{Origin, UserStatus},
        store::entities::{audit_event, role, user},
        testing::{
            TestIdentity, admin_permissions, member, new_account_request, platform, request,
        },
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

    /// An account made by CreateAccount, with its owner and built-in roles.
    #[derive(Clone, Debug)]
    pub(crate) struct Tenant {
        pub(crate) account: Uuid,
        pub(crate) owner: Uuid,
        /// The owner as a caller, holding every catalogue permission.
        pub(crate) admin: Principal,
        pub(crate) admin_role: Uuid,
        pub(crate) user_role: Uuid,
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
        let roles = role::Entity::find()
            .filter(role::Column::AccountId.eq(account))
            .all(&test.state.db)
            .await
            .expect("roles");
        let id_of = |name: &str| {
            roles
                .iter()
                .find(|r| r.name == name)
                .expect("built-in role")
                .id
        };
        Tenant {
            account,
            owner,
            admin: member(account, owner, &admin_permissions()),
            admin_role: id_of("Admin"),
            user_role: id_of("User"),
        }
    }

    /// Registers the product `meter` with `meter.refill` and `meter.read`.
    pub(crate) async fn register_meter(test: &TestIdentity) {
        let permission = |name: &str| pb::Permission {
            name: name.into(),
            description: format!("Allows {name}"),
            product_code: String::new(),
        };
        AccountService::register_product(
            &test.api,
            request(
                &platform(),
                pb::RegisterProductRequest {
                    code: "meter".into(),
                    display_name: "Postage meter".into(),
                    permissions: vec![permission("meter.refill"), permission("meter.read")],
                },
            ),
        )
        .await
        .expect("product");
    }

    /// A user of `account` written directly (the tests of this file do not
    /// depend on UserService).
    pub(crate) async fn add_user(
        test: &TestIdentity,
        account: Uuid,
        role_id: Uuid,
        team_id: Option<Uuid>,
        status: UserStatus,
    ) -> Uuid {
        let id = Uuid::new_v4();
        let now = test.state.clock.now();
        let email = format!("{}@acme.example", id.simple());
        user::ActiveModel {
            id: Set(id),
            account_id: Set(account),
            email: Set(Some(email.clone())),
            email_canonical: Set(Some(email.clone())),
            username: Set(None),
            display_name: Set(format!("User {}", &id.simple().to_string()[..6])),
            search_text: Set(email),
            status: Set(status),
            role_id: Set(role_id),
            team_id: Set(team_id),
            products: Set(serde_json::json!([])),
            locale: Set(String::new()),
            metadata: Set(None),
            owner: Set(false),
            origin: Set(Origin::Direct),
            password_hash: Set(None),
            password_change_required: Set(false),
            invitation_id: Set(None),
            invited_by: Set(None),
            create_time: Set(now),
            update_time: Set(now),
            activate_time: Set(None),
            deactivate_time: Set(None),
            last_sign_in_time: Set(None),
        }
        .insert(&test.state.db)
        .await
        .expect("user");
        id
    }

    pub(crate) async fn user_row(test: &TestIdentity, id: Uuid) -> user::Model {
        user::Entity::find_by_id(id)
            .one(&test.state.db)
            .await
            .expect("query")
            .expect("user")
    }

    /// Routing keys of the outbox rows, oldest first.
    pub(crate) async fn outbox_keys(test: &TestIdentity) -> Vec<String> {
        let db = &test.state.db;
        let rows = db
            .query_all_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT message->>'routing_key' AS k FROM usher_outbox ORDER BY id",
            ))
            .await
            .expect("outbox");
        let keys: Vec<String> = rows
            .iter()
            .map(|r| r.try_get("", "k").expect("key"))
            .collect();
        assert_eq!(
            keys.len() as u64,
            usher_kit::outbox::pending(db).await.expect("pending")
        );
        keys
    }

    /// Payloads of the outbox rows with `routing_key`, decoded as `M`.
    pub(crate) async fn outbox_events<M: Message + Default>(
        test: &TestIdentity,
        routing_key: &str,
    ) -> Vec<M> {
        let db = &test.state.db;
        let rows = db
            .query_all_raw(Statement::from_sql_and_values(
                db.get_database_backend(),
                "SELECT payload FROM usher_outbox WHERE message->>'routing_key' = $1 ORDER BY id",
                [routing_key.into()],
            ))
            .await
            .expect("outbox");
        rows.iter()
            .map(|r| {
                M::decode(
                    r.try_get::<Vec<u8>>("", "payload")
                        .expect("payload")
                        .as_slice(),
                )
                .expect("decodes")
            })
            .collect()
    }

    /// The audit entries of `account`, oldest first.
    pub(crate) async fn audit_rows(test: &TestIdentity, account: Uuid) -> Vec<audit_event::Model> {
        use sea_orm::QueryOrder;
        audit_event::Entity::find()
            .filter(audit_event::Column::AccountId.eq(account))
            .order_by_asc(audit_event::Column::EventTime)
            .order_by_asc(audit_event::Column::Id)
            .all(&test.state.db)
            .await
            .expect("audit")
    }

    fn create(name: &str, permissions: &[&str]) -> pb::CreateRoleRequest {
        pb::CreateRoleRequest {
            request_id: String::new(),
            name: name.into(),
            description: format!("The {name}"),
            permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    async fn create_role(
        test: &TestIdentity,
        caller: &Principal,
        name: &str,
        permissions: &[&str],
    ) -> pb::Role {
        RoleService::create_role(&test.api, request(caller, create(name, permissions)))
            .await
            .expect("role created")
            .into_inner()
            .role
            .expect("role")
    }

    fn update(role_id: &str, paths: &[&str]) -> pb::UpdateRoleRequest {
        pb::UpdateRoleRequest {
            role_id: role_id.into(),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            }),
            ..Default::default()
        }
    }

    fn delete(role_id: impl ToString, reassign: impl ToString) -> pb::DeleteRoleRequest {
        pb::DeleteRoleRequest {
            role_id: role_id.to_string(),
            reassign_to_role_id: reassign.to_string(),
        }
    }

    async fn list_roles(
        test: &TestIdentity,
        caller: &Principal,
        page_size: i32,
        token: &str,
    ) -> pb::ListRolesResponse {
        RoleService::list_roles(
            &test.api,
            request(
                caller,
                pb::ListRolesRequest {
                    page_size,
                    page_token: token.into(),
                },
            ),
        )
        .await
        .expect("roles")
        .into_inner()
    }

    #[tokio::test]
    async fn roles_are_listed_built_in_first_then_by_name_with_user_counts() {
        let (test, _clock) = start().await;
        register_meter(&test).await;
        let a = tenant(&test, &["meter"]).await;
        let beta = create_role(&test, &a.admin, "beta", &["users.read"]).await;
        let alpha = create_role(&test, &a.admin, "Alpha", &["users.read", "users.manage"]).await;
        for _ in 0..2 {
            add_user(
                &test,
                a.account,
                Uuid::parse_str(&alpha.id).expect("uuid"),
                None,
                UserStatus::Active,
            )
            .await;
        }
        add_user(
            &test,
            a.account,
            Uuid::parse_str(&alpha.id).expect("uuid"),
            None,
            UserStatus::Invited,
        )
        .await;
        add_user(&test, a.account, a.user_role, None, UserStatus::Inactive).await;

        let page = list_roles(&test, &a.admin, 0, "").await;
        let names: Vec<&str> = page.roles.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["Admin", "User", "Alpha", "beta"]);
        assert!(page.next_page_token.is_empty());
        let counts: Vec<i32> = page.roles.iter().map(|r| r.user_count).collect();
        assert_eq!(counts, [1, 1, 3, 0]);
        let admin = &page.roles[0];
        assert!(admin.built_in && admin.manages_users);
        // The built-in Admin holds the catalogue and the enabled product's permissions.
        for permission in admin_permissions()
            .into_iter()
            .chain(["meter.refill", "meter.read"])
        {
            assert!(
                admin.permissions.iter().any(|p| p == permission),
                "{permission}"
            );
        }
        assert_eq!(page.roles[1].permissions, ["users.read"]);
        assert!(!page.roles[1].manages_users);
        assert!(page.roles[2].manages_users && !page.roles[2].built_in);
        assert_eq!(page.roles[3].id, beta.id);

        // Keyset pages of one: the same order, no gaps, no duplicates.
        let mut token = String::new();
        let mut walked = Vec::new();
        loop {
            let page = list_roles(&test, &a.admin, 1, &token).await;
            walked.extend(page.roles.into_iter().map(|r| r.name));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(walked, ["Admin", "User", "Alpha", "beta"]);

        // Any member may list (MEMBER access); bad paging is INVALID_ARGUMENT.
        let reader = member(a.account, a.owner, &["users.read"]);
        assert_eq!(list_roles(&test, &reader, 500, "").await.roles.len(), 4);
        invalid(
            RoleService::list_roles(
                &test.api,
                request(
                    &a.admin,
                    pb::ListRolesRequest {
                        page_size: -1,
                        page_token: String::new(),
                    },
                ),
            )
            .await,
            "page_size",
        );
        invalid(
            RoleService::list_roles(
                &test.api,
                request(
                    &a.admin,
                    pb::ListRolesRequest {
                        page_size: 1,
                        page_token: "garbage!".into(),
                    },
                ),
            )
            .await,
            "page_token",
        );
        test.stop().await;
    }

    #[tokio::test]
    async fn permissions_are_the_catalogue_then_the_enabled_products() {
        let (test, _clock) = start().await;
        register_meter(&test).await;
        let with_meter = tenant(&test, &["meter"]).await;
        let without = tenant(&test, &[]).await;
        let list = |caller: Principal, page_size: i32, page_token: String| {
            let api = test.api.clone();
            async move {
                RoleService::list_permissions(
                    &api,
                    request(
                        &caller,
                        pb::ListPermissionsRequest {
                            page_size,
                            page_token,
                        },
                    ),
                )
                .await
            }
        };

        let all = list(with_meter.admin.clone(), 0, String::new())
            .await
            .expect("permissions")
            .into_inner();
        let names: Vec<&str> = all.permissions.iter().map(|p| p.name.as_str()).collect();
        let mut core: Vec<&str> = crate::domain::CATALOGUE.iter().map(|(p, _)| *p).collect();
        core.sort_unstable();
        let mut expected = core.clone();
        expected.extend(["meter.read", "meter.refill"]);
        assert_eq!(names, expected);
        assert!(all.permissions.iter().all(|p| !p.description.is_empty()));
        assert_eq!(
            all.permissions.last().map(|p| p.product_code.as_str()),
            Some("meter")
        );
        assert!(all.permissions[0].product_code.is_empty());
        assert!(all.next_page_token.is_empty());

        // Pages of 3 walk the same list.
        let mut token = String::new();
        let mut walked = Vec::new();
        loop {
            let page = list(with_meter.admin.clone(), 3, token)
                .await
                .expect("page")
                .into_inner();
            assert!(page.permissions.len() <= 3);
            walked.extend(page.permissions.into_iter().map(|p| p.name));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(walked, expected);

        // An account without the product sees the core catalogue only.
        let core_only = list(without.admin.clone(), 0, String::new())
            .await
            .expect("permissions")
            .into_inner();
        assert_eq!(
            core_only
                .permissions
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            core
        );

        invalid(
            list(without.admin.clone(), -5, String::new()).await,
            "page_size",
        );
        invalid(
            list(without.admin.clone(), 0, "%%%".into()).await,
            "page_token",
        );
        test.stop().await;
    }

    #[tokio::test]
    async fn creating_a_role_is_validated_audited_published_and_idempotent() {
        let (test, _clock) = start().await;
        register_meter(&test).await;
        let a = tenant(&test, &["meter"]).await;
        let before = outbox_keys(&test).await.len();

        let role = create_role(
            &test,
            &a.admin,
            "Shipping clerks",
            &["users.read", " users.invite", "users.read"],
        )
        .await;
        assert_eq!(role.name, "Shipping clerks");
        assert_eq!(role.description, "The Shipping clerks");
        assert_eq!(
            role.permissions,
            ["users.invite", "users.read"],
            "trimmed, deduplicated, sorted"
        );
        assert!(!role.built_in && !role.manages_users);
        assert_eq!(role.user_count, 0);

        let keys = outbox_keys(&test).await;
        assert_eq!(keys[before..], ["role.created"]);
        let created: Vec<events::RoleCreated> = outbox_events(&test, "role.created").await;
        assert_eq!(created[0].role_id, role.id);
        assert_eq!(created[0].account_id, a.account.to_string());
        assert_eq!(created[0].permissions, ["users.invite", "users.read"]);
        let actor = created[0].actor.clone().expect("actor");
        assert_eq!(
            (actor.id.as_str(), actor.display_name.as_str()),
            (a.owner.to_string().as_str(), "Olive Owner")
        );
        let entry = audit_rows(&test, a.account)
            .await
            .pop()
            .expect("audit entry");
        assert_eq!(
            (entry.action.as_str(), entry.target_type.as_str()),
            ("role.created", "role")
        );
        assert_eq!(
            (entry.target_id.clone(), entry.target_name.as_str()),
            (role.id.clone(), "Shipping clerks")
        );
        assert_eq!(
            (entry.actor_kind.as_str(), entry.actor_name.as_str()),
            ("user", "Olive Owner")
        );
        assert_eq!(entry.actor_id, a.owner.to_string());

        // The same request_id: the original answer, nothing written twice.
        let mut keyed = create("Auditors", &["audit.read"]);
        keyed.request_id = "0b0e8f9e-retry".into();
        let first = RoleService::create_role(&test.api, request(&a.admin, keyed.clone()))
            .await
            .expect("first")
            .into_inner();
        let pending = outbox_keys(&test).await.len();
        let again = RoleService::create_role(&test.api, request(&a.admin, keyed.clone()))
            .await
            .expect("retry")
            .into_inner();
        assert_eq!(first, again);
        assert_eq!(outbox_keys(&test).await.len(), pending);
        let mut changed = keyed.clone();
        changed.name = "Other auditors".into();
        refused(
            RoleService::create_role(&test.api, request(&a.admin, changed)).await,
            "IDEMPOTENCY_CONFLICT",
        );

        // Names are unique case-insensitively.
        refused(
            RoleService::create_role(&test.api, request(&a.admin, create("SHIPPING CLERKS", &[])))
                .await,
            "ALREADY_EXISTS",
        );
        refused(
            RoleService::create_role(&test.api, request(&a.admin, create("admin", &[]))).await,
            "ALREADY_EXISTS",
        );

        // Bad input: every field at fault is named.
        let mut bad = create(" ", &["users.read", "users.fly", "billing.pay"]);
        bad.description = "x".repeat(501);
        let status = refused(
            RoleService::create_role(&test.api, request(&a.admin, bad)).await,
            "INVALID_ARGUMENT",
        );
        assert_eq!(
            fields(&status),
            ["name", "description", "permissions[1]", "permissions[2]"]
        );
        invalid(
            RoleService::create_role(&test.api, request(&a.admin, create(&"n".repeat(101), &[])))
                .await,
            "name",
        );
        invalid(
            RoleService::create_role(&test.api, request(&a.admin, create("Bidi\u{202E}", &[])))
                .await,
            "name",
        );
        let too_many: Vec<String> = (0..201).map(|_| "users.read".to_owned()).collect();
        let mut many = create("Many", &[]);
        many.permissions = too_many;
        invalid(
            RoleService::create_role(&test.api, request(&a.admin, many)).await,
            "permissions",
        );
        let mut long_key = create("Long key", &[]);
        long_key.request_id = "k".repeat(129);
        invalid(
            RoleService::create_role(&test.api, request(&a.admin, long_key)).await,
            "request_id",
        );

        // Product permissions: only of enabled products, only if the caller holds them.
        let no_meter = tenant(&test, &[]).await;
        invalid(
            RoleService::create_role(
                &test.api,
                request(&no_meter.admin, create("Refillers", &["meter.refill"])),
            )
            .await,
            "permissions[0]",
        );
        refused(
            RoleService::create_role(
                &test.api,
                request(&a.admin, create("Refillers", &["meter.refill"])),
            )
            .await,
            "PERMISSION_DENIED",
        );
        let mut with_meter = admin_permissions();
        with_meter.push("meter.refill");
        let product_admin = member(a.account, a.owner, &with_meter);
        let refillers = create_role(&test, &product_admin, "Refillers", &["meter.refill"]).await;
        assert_eq!(refillers.permissions, ["meter.refill"]);

        // No privilege escalation: a role manager without users.manage cannot grant it.
        let role_manager = member(a.account, a.owner, &["roles.manage", "users.read"]);
        refused(
            RoleService::create_role(
                &test.api,
                request(&role_manager, create("Managers", &["users.manage"])),
            )
            .await,
            "PERMISSION_DENIED",
        );
        create_role(&test, &role_manager, "Readers", &["users.read"]).await;
        test.stop().await;
    }

    #[tokio::test]
    async fn nobody_edits_or_deletes_the_role_it_holds_nor_reassigns_beyond_itself() {
        let (test, _clock) = start().await;
        let a = tenant(&test, &[]).await;
        let held = ["roles.manage", "users.read"];
        let keepers = create_role(&test, &a.admin, "Keepers", &held).await;
        let keepers_id = Uuid::parse_str(&keepers.id).expect("uuid");
        let kim = add_user(&test, a.account, keepers_id, None, UserStatus::Active).await;
        let as_kim = member(a.account, kim, &held);

        // Its own role: no permission change, not even a removal; the name
        // and description stay editable.
        for permissions in [
            vec!["users.read"],
            vec!["roles.manage", "users.read", "audit.read"],
        ] {
            let mut change = update(&keepers.id, &["permissions"]);
            change.permissions = permissions.iter().map(|p| (*p).to_owned()).collect();
            refused(
                RoleService::update_role(&test.api, request(&as_kim, change)).await,
                "PERMISSION_DENIED",
            );
        }
        let mut rename = update(&keepers.id, &["name", "permissions"]);
        rename.name = "Key keepers".into();
        rename.permissions = vec!["users.read".into(), "roles.manage".into()];
        RoleService::update_role(&test.api, request(&as_kim, rename))
            .await
            .expect("renamed, permissions unchanged");
        let stored = role::Entity::find_by_id(keepers_id)
            .one(&test.state.db)
            .await
            .expect("query")
            .expect("role");
        assert_eq!(crate::api::convert::strings(&stored.permissions), held);

        // DeleteRole: moving holders to a role beyond the caller, or
        // deleting the caller's own role, is refused and moves nobody.
        let clerks = create_role(&test, &a.admin, "Clerks", &["users.read"]).await;
        let clerks_id = Uuid::parse_str(&clerks.id).expect("uuid");
        let clerk = add_user(&test, a.account, clerks_id, None, UserStatus::Active).await;
        refused(
            RoleService::delete_role(&test.api, request(&as_kim, delete(clerks_id, a.admin_role)))
                .await,
            "PERMISSION_DENIED",
        );
        assert_eq!(user_row(&test, clerk).await.role_id, clerks_id);
        refused(
            RoleService::delete_role(&test.api, request(&as_kim, delete(keepers_id, a.user_role)))
                .await,
            "PERMISSION_DENIED",
        );
        assert_eq!(user_row(&test, kim).await.role_id, keepers_id);
        // Within the caller's permissions, another role's holders may move.
        RoleService::delete_role(&test.api, request(&as_kim, delete(clerks_id, a.user_role)))
            .await
            .expect("reassigned to User");
        assert_eq!(user_row(&test, clerk).await.role_id, a.user_role);
        test.stop().await;
    }

    #[tokio::test]
    async fn an_account_holds_at_most_100_roles() {
        let (test, _clock) = start().await;
        let a = tenant(&test, &[]).await;
        let now = test.state.clock.now();
        // Two built-in roles + 98 custom ones.
        let rows: Vec<role::ActiveModel> = (0..98)
            .map(|i| role::ActiveModel {
                id: Set(Uuid::new_v4()),
                account_id: Set(a.account),
                name: Set(format!("Role {i:03}")),
                description: Set(String::new()),
                permissions: Set(serde_json::json!([])),
                built_in: Set(false),
                create_time: Set(now),
                update_time: Set(now),
            })
            .collect();
        role::Entity::insert_many(rows)
            .exec(&test.state.db)
            .await
            .expect("roles");
        invalid(
            RoleService::create_role(&test.api, request(&a.admin, create("One too many", &[])))
                .await,
            "name",
        );
        let page = list_roles(&test, &a.admin, 1_000, "").await;
        assert_eq!(page.roles.len(), 100);
        assert!(page.next_page_token.is_empty());
        test.stop().await;
    }

    #[tokio::test]
    async fn updating_a_role_changes_only_the_named_fields_and_refreshes_holders() {
        let (test, clock) = start().await;
        let a = tenant(&test, &[]).await;
        let role = create_role(&test, &a.admin, "Clerks", &["users.read"]).await;
        let role_id = Uuid::parse_str(&role.id).expect("uuid");
        let holder = add_user(&test, a.account, role_id, None, UserStatus::Active).await;
        let inactive = add_user(&test, a.account, role_id, None, UserStatus::Inactive).await;
        clock.advance(Duration::minutes(5));

        // Only the masked field changes (P15): the name is sent but not named.
        let mut message = update(&role.id, &["description"]);
        message.name = "Ignored".into();
        message.description = "  Counter staff  ".into();
        let updated = RoleService::update_role(&test.api, request(&a.admin, message))
            .await
            .expect("updated")
            .into_inner()
            .role
            .expect("role");
        assert_eq!(
            (updated.name.as_str(), updated.description.as_str()),
            ("Clerks", "Counter staff")
        );
        assert_eq!(updated.user_count, 2);
        assert!(
            updated.update_time.expect("time").seconds > role.update_time.expect("time").seconds
        );

        let mut message = update(&role.id, &["name", "permissions"]);
        message.name = "Senior clerks".into();
        message.permissions = vec!["users.read".into(), "users.invite".into()];
        let updated = RoleService::update_role(&test.api, request(&a.admin, message))
            .await
            .expect("updated")
            .into_inner()
            .role
            .expect("role");
        assert_eq!(updated.name, "Senior clerks");
        assert_eq!(updated.permissions, ["users.invite", "users.read"]);

        // The new permissions apply on the holder's next call.
        let snapshot = test
            .state
            .sessions
            .get_principal(holder)
            .await
            .expect("redis")
            .expect("snapshot");
        assert_eq!(snapshot.permissions, ["users.invite", "users.read"]);
        assert_eq!(snapshot.role_id, role_id);
        assert!(
            test.state
                .sessions
                .get_principal(inactive)
                .await
                .expect("redis")
                .is_none()
        );

        let published: Vec<events::RoleUpdated> = outbox_events(&test, "role.updated").await;
        assert_eq!(published.len(), 2);
        assert_eq!(
            published[0].changed_fields.clone().expect("mask").paths,
            ["description"]
        );
        assert_eq!(
            published[1].changed_fields.clone().expect("mask").paths,
            ["name", "permissions"]
        );
        assert_eq!(published[1].name, "Senior clerks");
        let entry = audit_rows(&test, a.account).await.pop().expect("entry");
        assert_eq!(
            (entry.action.as_str(), entry.target_name.as_str()),
            ("role.updated", "Senior clerks")
        );
        let details = entry.details.expect("details");
        assert_eq!(details["name"]["old"], "Clerks");
        assert_eq!(
            details["permissions"]["new"],
            serde_json::json!(["users.invite", "users.read"])
        );

        // Errors, as documented.
        invalid(
            RoleService::update_role(
                &test.api,
                request(&a.admin, update("not-a-uuid", &["name"])),
            )
            .await,
            "role_id",
        );
        invalid(
            RoleService::update_role(&test.api, request(&a.admin, update(&role.id, &[]))).await,
            "update_mask",
        );
        invalid(
            RoleService::update_role(
                &test.api,
                request(&a.admin, update(&role.id, &["built_in"])),
            )
            .await,
            "update_mask.paths[0]",
        );
        invalid(
            RoleService::update_role(&test.api, request(&a.admin, update(&role.id, &["name"])))
                .await,
            "name",
        );
        let mut unknown = update(&role.id, &["permissions"]);
        unknown.permissions = vec!["users.read".into(), "teleport".into()];
        invalid(
            RoleService::update_role(&test.api, request(&a.admin, unknown)).await,
            "permissions[1]",
        );
        refused(
            RoleService::update_role(
                &test.api,
                request(
                    &a.admin,
                    update(&Uuid::new_v4().to_string(), &["description"]),
                ),
            )
            .await,
            "NOT_FOUND",
        );
        for built_in in [a.admin_role, a.user_role] {
            let mut message = update(&built_in.to_string(), &["description"]);
            message.description = "Mine now".into();
            refused(
                RoleService::update_role(&test.api, request(&a.admin, message)).await,
                "BUILT_IN_ROLE",
            );
        }
        create_role(&test, &a.admin, "Auditors", &["audit.read"]).await;
        let mut taken = update(&role.id, &["name"]);
        taken.name = "auditors".into();
        refused(
            RoleService::update_role(&test.api, request(&a.admin, taken)).await,
            "ALREADY_EXISTS",
        );
        // Renaming to another case of its own name is fine.
        let mut recase = update(&role.id, &["name"]);
        recase.name = "SENIOR CLERKS".into();
        RoleService::update_role(&test.api, request(&a.admin, recase))
            .await
            .expect("recased");
        // Granting a permission the caller lacks is refused; keeping one is not.
        let limited = member(a.account, a.owner, &["roles.manage", "users.read"]);
        let mut escalate = update(&role.id, &["permissions"]);
        escalate.permissions = vec![
            "users.read".into(),
            "users.invite".into(),
            "account.manage".into(),
        ];
        refused(
            RoleService::update_role(&test.api, request(&limited, escalate)).await,
            "PERMISSION_DENIED",
        );
        let mut shrink = update(&role.id, &["permissions"]);
        shrink.permissions = vec!["users.invite".into()];
        RoleService::update_role(&test.api, request(&limited, shrink))
            .await
            .expect("shrunk");
        test.stop().await;
    }

    #[tokio::test]
    async fn removing_users_manage_from_the_only_managers_role_is_refused() {
        let (test, _clock) = start().await;
        let a = tenant(&test, &[]).await;
        let supervisors = create_role(
            &test,
            &a.admin,
            "Supervisors",
            &["users.read", "users.manage"],
        )
        .await;
        let supervisors_id = Uuid::parse_str(&supervisors.id).expect("uuid");
        assert!(supervisors.manages_users);
        // The owner moved to Supervisors (written directly: the API protects
        // the owner's role), so the role's holders are the only managers.
        let mut owner = user_row(&test, a.owner).await.into_active_model();
        owner.role_id = Set(supervisors_id);
        owner.update(&test.state.db).await.expect("owner moved");
        add_user(&test, a.account, a.admin_role, None, UserStatus::Inactive).await;
        // The owner now holds Supervisors and may not edit it (P26): an
        // admin's API key makes the changes.
        let key = Principal {
            kind: usher_kit::principal::PrincipalKind::ApiKey,
            user_id: None,
            credential_id: Some(Uuid::new_v4().to_string()),
            ..a.admin.clone()
        };

        let mut demote = update(&supervisors.id, &["permissions"]);
        demote.permissions = vec!["users.read".into()];
        refused(
            RoleService::update_role(&test.api, request(&a.admin, demote.clone())).await,
            "PERMISSION_DENIED",
        );
        refused(
            RoleService::update_role(&test.api, request(&key, demote.clone())).await,
            "LAST_MANAGER",
        );
        refused(
            RoleService::delete_role(
                &test.api,
                request(&key, delete(supervisors_id, a.user_role)),
            )
            .await,
            "LAST_MANAGER",
        );
        let still = list_roles(&test, &a.admin, 0, "")
            .await
            .roles
            .into_iter()
            .find(|r| r.id == supervisors.id)
            .expect("role");
        assert!(still.manages_users);

        // With another active manager (on Admin) the change goes through.
        add_user(&test, a.account, a.admin_role, None, UserStatus::Active).await;
        let updated = RoleService::update_role(&test.api, request(&key, demote))
            .await
            .expect("demoted")
            .into_inner()
            .role
            .expect("role");
        assert!(!updated.manages_users);
        test.stop().await;
    }

    #[tokio::test]
    async fn deleting_a_role_in_use_needs_a_reassignment() {
        let (test, _clock) = start().await;
        let a = tenant(&test, &[]).await;
        let clerks = create_role(&test, &a.admin, "Clerks", &["users.read", "users.invite"]).await;
        let clerks_id = Uuid::parse_str(&clerks.id).expect("uuid");
        let holders = [
            add_user(&test, a.account, clerks_id, None, UserStatus::Active).await,
            add_user(&test, a.account, clerks_id, None, UserStatus::Invited).await,
            add_user(&test, a.account, clerks_id, None, UserStatus::Inactive).await,
        ];

        for built_in in [a.admin_role, a.user_role] {
            refused(
                RoleService::delete_role(&test.api, request(&a.admin, delete(built_in, ""))).await,
                "BUILT_IN_ROLE",
            );
        }
        invalid(
            RoleService::delete_role(&test.api, request(&a.admin, delete("nope", ""))).await,
            "role_id",
        );
        invalid(
            RoleService::delete_role(&test.api, request(&a.admin, delete(clerks_id, "nope"))).await,
            "reassign_to_role_id",
        );
        invalid(
            RoleService::delete_role(&test.api, request(&a.admin, delete(clerks_id, clerks_id)))
                .await,
            "reassign_to_role_id",
        );
        refused(
            RoleService::delete_role(&test.api, request(&a.admin, delete(Uuid::new_v4(), "")))
                .await,
            "NOT_FOUND",
        );
        refused(
            RoleService::delete_role(&test.api, request(&a.admin, delete(clerks_id, ""))).await,
            "ROLE_IN_USE",
        );
        refused(
            RoleService::delete_role(
                &test.api,
                request(&a.admin, delete(clerks_id, Uuid::new_v4())),
            )
            .await,
            "NOT_FOUND",
        );
        assert_eq!(
            user_row(&test, holders[0]).await.role_id,
            clerks_id,
            "nothing moved"
        );

        let before = outbox_keys(&test).await.len();
        let done =
            RoleService::delete_role(&test.api, request(&a.admin, delete(clerks_id, a.user_role)))
                .await
                .expect("deleted")
                .into_inner();
        assert_eq!(
            (done.role_id.as_str(), done.reassigned_user_count),
            (clerks.id.as_str(), 3)
        );
        for holder in holders {
            assert_eq!(user_row(&test, holder).await.role_id, a.user_role);
        }
        let snapshot = test
            .state
            .sessions
            .get_principal(holders[0])
            .await
            .expect("redis")
            .expect("snapshot");
        assert_eq!(snapshot.permissions, ["users.read"]);
        assert!(
            role::Entity::find_by_id(clerks_id)
                .one(&test.state.db)
                .await
                .expect("query")
                .is_none()
        );
        let keys = outbox_keys(&test).await;
        assert_eq!(
            keys[before..],
            [
                "user.updated",
                "user.updated",
                "user.updated",
                "role.deleted"
            ]
        );
        let deleted: Vec<events::RoleDeleted> = outbox_events(&test, "role.deleted").await;
        assert_eq!(deleted[0].reassigned_to_role_id, a.user_role.to_string());
        assert_eq!(deleted[0].reassigned_user_count, 3);
        let moved: Vec<events::UserUpdated> = outbox_events(&test, "user.updated").await;
        assert!(moved.iter().all(|e| e.role_id == a.user_role.to_string()));
        let entry = audit_rows(&test, a.account).await.pop().expect("entry");
        assert_eq!(
            (entry.action.as_str(), entry.target_name.as_str()),
            ("role.deleted", "Clerks")
        );
        assert_eq!(entry.details.expect("details")["reassigned_user_count"], 3);

        // An unused role goes without a reassignment (a given one is ignored).
        let unused = create_role(&test, &a.admin, "Unused", &[]).await;
        let done = RoleService::delete_role(
            &test.api,
            request(&a.admin, delete(&unused.id, Uuid::new_v4())),
        )
        .await
        .expect("deleted")
        .into_inner();
        assert_eq!(done.reassigned_user_count, 0);
        refused(
            RoleService::delete_role(&test.api, request(&a.admin, delete(&unused.id, ""))).await,
            "NOT_FOUND",
        );
        test.stop().await;
    }

    #[tokio::test]
    async fn another_accounts_roles_answer_not_found() {
        let (test, _clock) = start().await;
        let a = tenant(&test, &[]).await;
        let b = tenant(&test, &[]).await;
        let a_role = create_role(&test, &a.admin, "Clerks", &["users.read"]).await;
        let a_role_id = Uuid::parse_str(&a_role.id).expect("uuid");
        add_user(&test, a.account, a_role_id, None, UserStatus::Active).await;
        let b_role = create_role(&test, &b.admin, "Clerks", &["users.read"]).await;
        add_user(
            &test,
            b.account,
            Uuid::parse_str(&b_role.id).expect("uuid"),
            None,
            UserStatus::Active,
        )
        .await;
        let before = outbox_keys(&test).await.len();

        let mut rename = update(&a_role.id, &["name"]);
        rename.name = "Hijacked".into();
        let foreign = refused(
            RoleService::update_role(&test.api, request(&b.admin, rename)).await,
            "NOT_FOUND",
        );
        let unknown = refused(
            RoleService::update_role(
                &test.api,
                request(
                    &b.admin,
                    update(&Uuid::new_v4().to_string(), &["description"]),
                ),
            )
            .await,
            "NOT_FOUND",
        );
        assert_eq!(
            (foreign.code(), foreign.message()),
            (unknown.code(), unknown.message()),
            "indistinguishable"
        );
        refused(
            RoleService::delete_role(&test.api, request(&b.admin, delete(a_role_id, b.user_role)))
                .await,
            "NOT_FOUND",
        );
        refused(
            RoleService::delete_role(&test.api, request(&b.admin, delete(a.admin_role, ""))).await,
            "NOT_FOUND",
        );
        // Reassigning B's users to A's role is refused the same way.
        refused(
            RoleService::delete_role(&test.api, request(&b.admin, delete(&b_role.id, a_role_id)))
                .await,
            "NOT_FOUND",
        );

        let a_roles = list_roles(&test, &a.admin, 0, "").await.roles;
        assert!(a_roles.iter().all(|r| r.id != b_role.id));
        assert_eq!(
            a_roles
                .iter()
                .find(|r| r.id == a_role.id)
                .expect("kept")
                .name,
            "Clerks"
        );
        assert_eq!(outbox_keys(&test).await.len(), before, "nothing published");
        test.stop().await;
    }
}
