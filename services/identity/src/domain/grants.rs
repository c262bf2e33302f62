//! Nobody grants what they do not hold (RELIABILITY P26). One rule for every
//! RPC that assigns a role or permissions: CreateUser, UpdateUser,
//! BatchUpdateUsers, the invitation service's reservation (CreateInvitations),
//! CreateRole, UpdateRole, DeleteRole with a reassignment, and CreateApiKey.
//!
//! - What is granted (the effective permissions of the role assigned, the
//!   permissions added to a role, the permissions of a new key or role) must
//!   be a subset of what the caller holds.
//! - Nobody changes their own grants: a user cannot move itself to another
//!   role, nor change the permissions of the role it holds (that would change
//!   its own grants, and those of everyone sharing the role), nor delete the
//!   role it holds.
//!
//! Every refusal is PERMISSION_DENIED with the reason `PERMISSION_DENIED`,
//! the one CreateRole and CreateApiKey have always answered for a grant
//! beyond the caller's. Pure: the callers look the permissions up.

use std::collections::BTreeSet;

use usher_kit::error::{ApiError, ApiResult, Reason};
use uuid::Uuid;

/// Who grants: the caller of the RPC.
#[derive(Clone, Copy, Debug)]
pub struct Grantor<'a> {
    /// The signed-in user; `None` for an API key.
    pub user_id: Option<Uuid>,
    /// The role the signed-in user holds now; `None` for an API key.
    pub role_id: Option<Uuid>,
    /// Every permission the caller holds (core and product permissions).
    pub permissions: &'a [String],
}

/// What a call grants.
#[derive(Clone, Copy, Debug)]
pub enum Grant<'a> {
    /// Gives the role `role_id`, whose effective permissions are
    /// `permissions`, to a user. `user` is `None` for a user being created
    /// (CreateUser, an invitee), or the existing user and the role it holds.
    Role {
        /// The existing user and its current role; `None` for a new user.
        user: Option<(Uuid, Uuid)>,
        /// The role assigned.
        role_id: Uuid,
        /// The effective permissions of that role.
        permissions: &'a [String],
    },
    /// Sets the permissions of role `role_id` from `before` to `after`
    /// (UpdateRole).
    RolePermissions {
        /// The role edited.
        role_id: Uuid,
        /// Its permissions now.
        before: &'a [String],
        /// Its permissions after the call.
        after: &'a [String],
    },
    /// Moves the holders of role `role_id` (deleted) to a role whose
    /// effective permissions are `permissions` (DeleteRole with
    /// `reassign_to_role_id`).
    Reassign {
        /// The role deleted.
        role_id: Uuid,
        /// The effective permissions of the role its holders move to.
        permissions: &'a [String],
    },
    /// Permissions of a new credential or role (CreateApiKey, CreateRole).
    Permissions(&'a [String]),
}

/// The one answer of a refused grant.
fn refused(message: impl Into<String>) -> ApiError {
    ApiError::rejected(Reason::PermissionDenied, message)
}

/// Refuses `granted` unless the caller holds every permission in it; the
/// message names the first one missing.
fn check_subset<'a>(
    grantor: &Grantor<'_>,
    granted: impl IntoIterator<Item = &'a String>,
) -> ApiResult<()> {
    let held: BTreeSet<&str> = grantor.permissions.iter().map(String::as_str).collect();
    let missing: BTreeSet<&str> = granted
        .into_iter()
        .map(String::as_str)
        .filter(|p| !held.contains(p))
        .collect();
    match missing.first() {
        None => Ok(()),
        Some(first) => Err(refused(format!(
            "cannot grant {first}, which the caller does not hold"
        ))),
    }
}

/// Checks that `grant` gives nothing beyond what `grantor` holds and does
/// not change the grantor's own grants.
pub fn check_grant(grantor: &Grantor<'_>, grant: &Grant<'_>) -> ApiResult<()> {
    match *grant {
        Grant::Role {
            user,
            role_id,
            permissions,
        } => {
            if let Some((user_id, current_role)) = user {
                if current_role == role_id {
                    // Not a change: nothing is granted.
                    return Ok(());
                }
                if grantor.user_id == Some(user_id) {
                    return Err(refused("nobody can change their own role"));
                }
            }
            check_subset(grantor, permissions)
        }
        Grant::RolePermissions {
            role_id,
            before,
            after,
        } => {
            let old: BTreeSet<&String> = before.iter().collect();
            let new: BTreeSet<&String> = after.iter().collect();
            if old == new {
                return Ok(());
            }
            if grantor.role_id == Some(role_id) {
                return Err(refused(
                    "nobody can change the permissions of the role they hold",
                ));
            }
            check_subset(grantor, new.difference(&old).copied())
        }
        Grant::Reassign {
            role_id,
            permissions,
        } => {
            if grantor.role_id == Some(role_id) {
                return Err(refused(
                    "nobody can delete the role they hold: it would change their own role",
                ));
            }
            check_subset(grantor, permissions)
        }
        Grant::Permissions(permissions) => check_subset(grantor, permissions),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ACCOUNT_MANAGE, CATALOGUE, USERS_INVITE, USERS_MANAGE, USERS_READ};

    fn perms(list: &[&str]) -> Vec<String> {
        list.iter().map(|p| (*p).to_owned()).collect()
    }

    fn all() -> Vec<String> {
        CATALOGUE.iter().map(|(p, _)| (*p).to_owned()).collect()
    }

    fn denied(result: ApiResult<()>) -> String {
        let err = result.expect_err("refused");
        assert_eq!(err.reason(), Reason::PermissionDenied);
        err.to_string()
    }

    #[test]
    fn a_role_beyond_the_caller_is_refused_for_new_and_existing_users() {
        let me = Uuid::new_v4();
        let held = perms(&[USERS_READ, USERS_INVITE]);
        let grantor = Grantor {
            user_id: Some(me),
            role_id: Some(Uuid::new_v4()),
            permissions: &held,
        };
        let admin = all();
        let admin_role = Uuid::new_v4();
        // An invitee or a created user given the Admin role.
        let message = denied(check_grant(
            &grantor,
            &Grant::Role {
                user: None,
                role_id: admin_role,
                permissions: &admin,
            },
        ));
        assert!(message.contains(ACCOUNT_MANAGE), "{message}");
        // Another user promoted.
        denied(check_grant(
            &grantor,
            &Grant::Role {
                user: Some((Uuid::new_v4(), Uuid::new_v4())),
                role_id: admin_role,
                permissions: &admin,
            },
        ));
        // A role within the caller's permissions is fine, also a subset.
        for within in [perms(&[USERS_READ]), held.clone(), Vec::new()] {
            check_grant(
                &grantor,
                &Grant::Role {
                    user: None,
                    role_id: Uuid::new_v4(),
                    permissions: &within,
                },
            )
            .expect("within the caller's permissions");
        }
        // A user who already holds the role: nothing granted.
        check_grant(
            &grantor,
            &Grant::Role {
                user: Some((Uuid::new_v4(), admin_role)),
                role_id: admin_role,
                permissions: &admin,
            },
        )
        .expect("no change");
    }

    #[test]
    fn nobody_changes_their_own_role_even_downwards_or_as_admin() {
        let me = Uuid::new_v4();
        let mine = Uuid::new_v4();
        let admin = all();
        let grantor = Grantor {
            user_id: Some(me),
            role_id: Some(mine),
            permissions: &admin,
        };
        let lower = perms(&[USERS_READ]);
        let message = denied(check_grant(
            &grantor,
            &Grant::Role {
                user: Some((me, mine)),
                role_id: Uuid::new_v4(),
                permissions: &lower,
            },
        ));
        assert!(message.contains("own role"), "{message}");
        // Keeping one's own role is not a change.
        check_grant(
            &grantor,
            &Grant::Role {
                user: Some((me, mine)),
                role_id: mine,
                permissions: &admin,
            },
        )
        .expect("same role");
        // An API key has no role of its own.
        let key = Grantor {
            user_id: None,
            role_id: None,
            permissions: &admin,
        };
        check_grant(
            &key,
            &Grant::Role {
                user: Some((me, mine)),
                role_id: Uuid::new_v4(),
                permissions: &lower,
            },
        )
        .expect("a key changes a user's role within its permissions");
    }

    #[test]
    fn role_edits_add_only_what_the_caller_holds_and_never_to_its_own_role() {
        let mine = Uuid::new_v4();
        let other = Uuid::new_v4();
        let held = perms(&[USERS_READ, crate::domain::ROLES_MANAGE]);
        let grantor = Grantor {
            user_id: Some(Uuid::new_v4()),
            role_id: Some(mine),
            permissions: &held,
        };
        let before = perms(&[USERS_READ, USERS_MANAGE]);
        // Adding a permission the caller lacks.
        let message = denied(check_grant(
            &grantor,
            &Grant::RolePermissions {
                role_id: other,
                before: &before,
                after: &perms(&[USERS_READ, USERS_MANAGE, ACCOUNT_MANAGE]),
            },
        ));
        assert!(message.contains(ACCOUNT_MANAGE), "{message}");
        // Keeping a permission the caller lacks, removing one, adding one it holds.
        check_grant(
            &grantor,
            &Grant::RolePermissions {
                role_id: other,
                before: &before,
                after: &perms(&[USERS_MANAGE, crate::domain::ROLES_MANAGE]),
            },
        )
        .expect("adds only what the caller holds");
        // Its own role: no change at all, not even a removal.
        for after in [
            perms(&[USERS_READ]),
            perms(&[crate::domain::ROLES_MANAGE]),
            Vec::new(),
        ] {
            denied(check_grant(
                &grantor,
                &Grant::RolePermissions {
                    role_id: mine,
                    before: &held,
                    after: &after,
                },
            ));
        }
        // The same set in another order is not a change.
        check_grant(
            &grantor,
            &Grant::RolePermissions {
                role_id: mine,
                before: &held,
                after: &[held[1].clone(), held[0].clone()],
            },
        )
        .expect("unchanged");
    }

    #[test]
    fn reassignments_and_new_credentials_follow_the_same_rule() {
        let mine = Uuid::new_v4();
        let held = perms(&[USERS_READ, crate::domain::ROLES_MANAGE]);
        let grantor = Grantor {
            user_id: Some(Uuid::new_v4()),
            role_id: Some(mine),
            permissions: &held,
        };
        let admin = all();
        denied(check_grant(
            &grantor,
            &Grant::Reassign {
                role_id: Uuid::new_v4(),
                permissions: &admin,
            },
        ));
        denied(check_grant(
            &grantor,
            &Grant::Reassign {
                role_id: mine,
                permissions: &perms(&[USERS_READ]),
            },
        ));
        check_grant(
            &grantor,
            &Grant::Reassign {
                role_id: Uuid::new_v4(),
                permissions: &perms(&[USERS_READ]),
            },
        )
        .expect("within");
        denied(check_grant(
            &grantor,
            &Grant::Permissions(&perms(&[USERS_READ, "ledger.post"])),
        ));
        check_grant(&grantor, &Grant::Permissions(&held)).expect("within");
    }
}
