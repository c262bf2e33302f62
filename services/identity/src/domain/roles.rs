//! The rules of roles: which permissions an account may use, which of them
//! a role may list, the built-in roles that never change, the facts the
//! "at least one active manager" rule judges when a role's holders lose
//! `users.manage`, what an edit changes, and the audit entries and events of
//! each change. Pure: the caller reads the facts under the account lock.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use prost_types::FieldMask;
use serde_json::{Map, Value as Json, json};
use usher_kit::error::{ApiError, ApiResult, Reason, Violations};
use usher_proto::events::v1 as events;
use uuid::Uuid;

use super::{
    ADMIN_ROLE, CATALOGUE, USERS_MANAGE,
    effects::{Actor, Audit, Effects},
    managers::{self, ManagerChange},
};

/// Most roles an account may hold, built-in ones included (so one page of
/// ListRoles always holds them all).
pub const MAX_ROLES: u64 = 100;
/// Most permissions in one role.
pub const MAX_ROLE_PERMISSIONS: usize = 200;

/// One permission the account may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Available {
    /// Its name.
    pub name: String,
    /// What it allows.
    pub description: String,
    /// Empty for core permissions.
    pub product_code: String,
}

/// The core catalogue, then the permissions of the enabled `products`
/// (code, `[{"name", "description"}]`), each group ordered by name, a
/// product permission listed once.
pub fn available(products: &[(String, Json)]) -> Vec<Available> {
    let mut core: Vec<Available> = CATALOGUE
        .iter()
        .map(|(name, description)| Available {
            name: (*name).to_owned(),
            description: (*description).to_owned(),
            product_code: String::new(),
        })
        .collect();
    core.sort_by(|a, b| a.name.cmp(&b.name));
    let mut of_products: Vec<Available> = products
        .iter()
        .flat_map(|(code, permissions)| {
            permissions
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
                        product_code: code.clone(),
                    })
                })
        })
        .collect();
    of_products.sort_by(|a, b| a.name.cmp(&b.name));
    of_products.dedup_by(|a, b| a.name == b.name);
    core.extend(of_products);
    core
}

/// Validates requested permission names: trimmed, deduplicated, at most
/// [`MAX_ROLE_PERMISSIONS`], each from the catalogue or an enabled product
/// (INVALID_ARGUMENT on `permissions[i]`). Returns them sorted.
pub fn validate_permissions(
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

/// A role as the rules see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    /// Its id.
    pub id: Uuid,
    /// Its account.
    pub account_id: Uuid,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// The permissions it lists.
    pub permissions: Vec<String>,
    /// Built-in (Admin, User).
    pub built_in: bool,
}

impl Role {
    /// Whether it is the built-in Admin, whose permissions are the whole
    /// catalogue available to the account.
    pub fn is_admin(&self) -> bool {
        is_admin(self.built_in, &self.name)
    }

    /// Whether it holds `users.manage`.
    pub fn manages_users(&self) -> bool {
        manages_users(self.built_in, &self.name, &self.permissions)
    }
}

/// Whether a role named `name` is the built-in Admin.
pub fn is_admin(built_in: bool, name: &str) -> bool {
    built_in && name == ADMIN_ROLE
}

/// Whether a role holds `users.manage`.
pub fn manages_users(built_in: bool, name: &str, permissions: &[String]) -> bool {
    is_admin(built_in, name) || permissions.iter().any(|p| p == USERS_MANAGE)
}

/// The refusal of a name another role of the account has.
pub fn name_taken() -> ApiError {
    ApiError::rejected(Reason::AlreadyExists, "a role with this name exists")
}

/// Refuses a new role when the account holds `count` already.
pub fn check_room(count: u64) -> ApiResult<()> {
    if count >= MAX_ROLES {
        return Err(ApiError::invalid(
            "name",
            format!("the account already has the maximum of {MAX_ROLES} roles"),
        ));
    }
    Ok(())
}

/// Refuses changing (`deleted` false) or deleting a built-in role.
pub fn check_not_built_in(role: &Role, deleted: bool) -> ApiResult<()> {
    if !role.built_in {
        return Ok(());
    }
    Err(ApiError::rejected(
        Reason::BuiltInRole,
        if deleted {
            "built-in roles cannot be deleted"
        } else {
            "built-in roles cannot be changed"
        },
    ))
}

/// Refuses moving every active holder of a role off `users.manage` when
/// that would leave the account without an active manager: `holders` tells
/// for each active holder whether it is the owner, `managers_now` counts the
/// account's active managers.
pub fn check_holders_may_lose_manage(holders: &[bool], managers_now: u64) -> ApiResult<()> {
    let changes: Vec<ManagerChange> = holders
        .iter()
        .map(|owner| ManagerChange {
            owner: *owner,
            manager_before: true,
            manager_after: false,
        })
        .collect();
    managers::check_managers_remain(managers_now, &changes)
}

/// Whether going from `before` to `after` drops `users.manage`.
pub fn loses_manage(before: &[String], after: &[String]) -> bool {
    before.iter().any(|p| p == USERS_MANAGE) && !after.iter().any(|p| p == USERS_MANAGE)
}

/// Old and new value of a changed field, for the audit log.
fn change(old: impl Into<Json>, new: impl Into<Json>) -> Json {
    json!({"old": old.into(), "new": new.into()})
}

/// What an UpdateRole changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoleEdit {
    /// The new name, if it differs.
    pub name: Option<String>,
    /// The new description, if it differs.
    pub description: Option<String>,
    /// The new permissions, if they differ.
    pub permissions: Option<Vec<String>>,
    /// The fields changed, in order.
    pub changed: Vec<String>,
    /// Old and new value of each, for the audit log.
    pub details: Map<String, Json>,
}

impl RoleEdit {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty()
    }
}

/// What setting the named fields changes on `current` (the grant and
/// last-manager rules are the caller's to apply to `permissions`).
pub fn edit(
    current: &Role,
    name: Option<String>,
    description: Option<String>,
    permissions: Option<Vec<String>>,
) -> RoleEdit {
    let mut edit = RoleEdit::default();
    if let Some(name) = name.filter(|n| *n != current.name) {
        edit.details
            .insert("name".into(), change(current.name.clone(), name.clone()));
        edit.changed.push("name".into());
        edit.name = Some(name);
    }
    if let Some(description) = description.filter(|d| *d != current.description) {
        edit.details.insert(
            "description".into(),
            change(current.description.clone(), description.clone()),
        );
        edit.changed.push("description".into());
        edit.description = Some(description);
    }
    if let Some(permissions) = permissions.filter(|p| *p != current.permissions) {
        edit.details.insert(
            "permissions".into(),
            change(current.permissions.clone(), permissions.clone()),
        );
        edit.changed.push("permissions".into());
        edit.permissions = Some(permissions);
    }
    edit
}

/// The audit entry and event of a created role.
pub fn created(role: &Role, actor: &Actor, now: DateTime<Utc>) -> Effects {
    let mut effects = Effects::new();
    effects.audit(Audit {
        account_id: role.account_id,
        action: "role.created",
        target_type: "role",
        target_id: role.id.to_string(),
        target_name: role.name.clone(),
        details: Some(json!({"description": role.description, "permissions": role.permissions})),
    });
    effects.event(
        "role.created",
        "RoleCreated",
        role.id.to_string(),
        Some(role.account_id),
        &events::RoleCreated {
            role_id: role.id.to_string(),
            account_id: role.account_id.to_string(),
            actor: Some(actor.to_proto()),
            name: role.name.clone(),
            permissions: role.permissions.clone(),
        },
        now,
    );
    effects
}

/// The audit entry and event of `edit` on the role now `updated`.
pub fn updated(updated: &Role, edit: RoleEdit, actor: &Actor, now: DateTime<Utc>) -> Effects {
    let mut effects = Effects::new();
    effects.audit(Audit {
        account_id: updated.account_id,
        action: "role.updated",
        target_type: "role",
        target_id: updated.id.to_string(),
        target_name: updated.name.clone(),
        details: Some(Json::Object(edit.details)),
    });
    effects.event(
        "role.updated",
        "RoleUpdated",
        updated.id.to_string(),
        Some(updated.account_id),
        &events::RoleUpdated {
            role_id: updated.id.to_string(),
            account_id: updated.account_id.to_string(),
            actor: Some(actor.to_proto()),
            changed_fields: Some(FieldMask {
                paths: edit.changed,
            }),
            name: updated.name.clone(),
            permissions: updated.permissions.clone(),
        },
        now,
    );
    effects
}

/// The events of the `holders` moved to `target`, then the audit entry and
/// event of the deleted role.
pub fn deleted(
    doomed: &Role,
    target: Option<&Role>,
    holders: &[Uuid],
    actor: &Actor,
    now: DateTime<Utc>,
) -> Effects {
    let mut effects = Effects::new();
    let account_id = doomed.account_id;
    if let Some(target) = target {
        for holder in holders {
            effects.event(
                "user.updated",
                "UserUpdated",
                holder.to_string(),
                Some(account_id),
                &events::UserUpdated {
                    user_id: holder.to_string(),
                    account_id: account_id.to_string(),
                    actor: Some(actor.to_proto()),
                    changed_fields: Some(FieldMask {
                        paths: vec!["role_id".into()],
                    }),
                    role_id: target.id.to_string(),
                    ..Default::default()
                },
                now,
            );
        }
    }
    let reassigned = reassigned_count(holders.len());
    let target_id = target.map(|t| t.id.to_string()).unwrap_or_default();
    effects.audit(Audit {
        account_id,
        action: "role.deleted",
        target_type: "role",
        target_id: doomed.id.to_string(),
        target_name: doomed.name.clone(),
        details: Some(json!({
            "permissions": doomed.permissions,
            "reassigned_to_role_id": target_id,
            "reassigned_to_role_name": target.map(|t| t.name.clone()).unwrap_or_default(),
            "reassigned_user_count": reassigned,
        })),
    });
    effects.event(
        "role.deleted",
        "RoleDeleted",
        doomed.id.to_string(),
        Some(account_id),
        &events::RoleDeleted {
            role_id: doomed.id.to_string(),
            account_id: account_id.to_string(),
            actor: Some(actor.to_proto()),
            name: doomed.name.clone(),
            reassigned_to_role_id: target_id,
            reassigned_user_count: reassigned,
        },
        now,
    );
    effects
}

/// A holder count as the API reports it.
pub fn reassigned_count(holders: usize) -> i32 {
    i32::try_from(holders).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{USERS_READ, effects::Actor};

    fn role(permissions: &[&str]) -> Role {
        Role {
            id: Uuid::new_v4(),
            account_id: Uuid::new_v4(),
            name: "Support".into(),
            description: String::new(),
            permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
            built_in: false,
        }
    }

    #[test]
    fn the_catalogue_comes_first_then_each_product_permission_once() {
        let products = vec![
            (
                "meter".to_owned(),
                json!([{"name": "meter.refill", "description": "Refill"}, {"name": "meter.read"}]),
            ),
            ("copy".to_owned(), json!([{"name": "meter.read"}])),
        ];
        let all = available(&products);
        assert_eq!(all.len(), CATALOGUE.len() + 2);
        assert!(
            all[..CATALOGUE.len()]
                .iter()
                .all(|p| p.product_code.is_empty())
        );
        assert_eq!(all[CATALOGUE.len()].name, "meter.read");
        assert_eq!(all[CATALOGUE.len() + 1].description, "Refill");
    }

    #[test]
    fn unknown_and_too_many_permissions_are_field_violations() {
        let all = available(&[]);
        let mut violations = Violations::new();
        let chosen = validate_permissions(
            &[
                " users.read ".into(),
                "users.read".into(),
                "ledger.post".into(),
            ],
            &all,
            &mut violations,
        );
        assert_eq!(chosen, [USERS_READ]);
        let err = violations.into_result().expect_err("unknown");
        assert!(err.to_string().contains("permissions[2]"), "{err}");
        let mut violations = Violations::new();
        validate_permissions(
            &vec![USERS_READ.to_owned(); MAX_ROLE_PERMISSIONS + 1],
            &all,
            &mut violations,
        );
        assert!(violations.into_result().is_err());
    }

    #[test]
    fn built_in_roles_never_change_and_the_admin_manages_users() {
        let mut admin = role(&[]);
        admin.built_in = true;
        admin.name = ADMIN_ROLE.into();
        assert!(admin.is_admin() && admin.manages_users());
        assert_eq!(
            check_not_built_in(&admin, true)
                .expect_err("built-in")
                .reason(),
            Reason::BuiltInRole
        );
        check_not_built_in(&role(&[]), false).expect("custom");
        assert!(role(&[USERS_MANAGE]).manages_users());
        assert!(!role(&[USERS_READ]).manages_users());
        check_room(MAX_ROLES - 1).expect("room");
        assert!(check_room(MAX_ROLES).is_err());
    }

    #[test]
    fn the_last_managers_role_keeps_users_manage() {
        let with = vec![USERS_MANAGE.to_owned(), USERS_READ.to_owned()];
        let without = vec![USERS_READ.to_owned()];
        assert!(loses_manage(&with, &without));
        assert!(!loses_manage(&without, &with));
        // Two holders, the only managers of the account.
        let err = check_holders_may_lose_manage(&[true, false], 2).expect_err("last");
        assert_eq!(err.reason(), Reason::LastManager);
        check_holders_may_lose_manage(&[false], 2).expect("another manager remains");
    }

    #[test]
    fn an_edit_names_what_differs_and_a_deletion_tells_the_reassignment() {
        let current = role(&[USERS_READ]);
        let same = edit(
            &current,
            Some("Support".into()),
            Some(String::new()),
            Some(vec![USERS_READ.to_owned()]),
        );
        assert!(same.is_empty());
        let more = edit(&current, None, None, Some(vec![USERS_MANAGE.to_owned()]));
        assert_eq!(more.changed, ["permissions"]);
        let now = DateTime::from_timestamp(1_900_000_000, 0).expect("time");
        let target = role(&[]);
        let effects = deleted(
            &current,
            Some(&target),
            &[Uuid::new_v4()],
            &Actor::system(),
            now,
        );
        assert_eq!(effects.events.len(), 2);
        let details = effects.audit[0].details.clone().expect("details");
        assert_eq!(details["reassigned_user_count"], 1);
        assert_eq!(details["reassigned_to_role_id"], target.id.to_string());
    }
}
