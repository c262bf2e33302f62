//! The account's standing rules: the owner is protected, and every account
//! keeps at least one active user who can manage users (holds
//! `users.manage`). They are pure functions: the caller reads the facts they
//! judge (who is the owner, how many active managers there are, what each
//! change does to a user) inside a transaction that has locked the account
//! row (`store::accounts::lock`) and passes them in, so two concurrent
//! changes (two admins demoting each other) are checked one after the other.

use usher_kit::error::{ApiError, ApiResult, Reason};

use super::{USERS_MANAGE, UserStatus};

/// Whether a role listing `permissions` makes its active holders managers.
pub fn manages(permissions: &[String]) -> bool {
    permissions.iter().any(|p| p == USERS_MANAGE)
}

/// What a change does to a user, as far as the rules care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManagerChange {
    /// The user is the account's owner.
    pub owner: bool,
    /// Before the change: active and holding `users.manage`.
    pub manager_before: bool,
    /// After the change: active and holding `users.manage` (false when deleted).
    pub manager_after: bool,
}

impl ManagerChange {
    /// What moving a user with `status` from a role that manages
    /// (`role_manages_before`) to one that manages or not
    /// (`role_manages_after`) does; an inactive or invited user is no
    /// manager on either side.
    pub fn of(
        owner: bool,
        status: UserStatus,
        role_manages_before: bool,
        role_manages_after: bool,
    ) -> Self {
        let active = status == UserStatus::Active;
        Self {
            owner,
            manager_before: active && role_manages_before,
            manager_after: active && role_manages_after,
        }
    }

    /// Whether the change takes a manager away.
    pub fn removes_manager(&self) -> bool {
        self.manager_before && !self.manager_after
    }
}

/// The kind of change an admin makes to another user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerAction {
    /// Editing details (name, locale, products, metadata, team).
    Edit,
    /// Changing the role.
    ChangeRole,
    /// Deactivating.
    Deactivate,
    /// Deleting.
    Delete,
}

/// Refuses actions on the owner by someone else; the owner may edit their own
/// details but never demote, deactivate or delete themselves.
pub fn check_owner(
    target_is_owner: bool,
    actor_is_target: bool,
    action: OwnerAction,
) -> ApiResult<()> {
    if !target_is_owner {
        return Ok(());
    }
    match action {
        OwnerAction::Edit if actor_is_target => Ok(()),
        OwnerAction::Edit => Err(ApiError::rejected(
            Reason::OwnerProtected,
            "the account owner's details can only be changed by the owner",
        )),
        OwnerAction::ChangeRole => Err(ApiError::rejected(
            Reason::OwnerProtected,
            "the account owner's role cannot change",
        )),
        OwnerAction::Deactivate => Err(ApiError::rejected(
            Reason::OwnerProtected,
            "the account owner cannot be deactivated",
        )),
        OwnerAction::Delete => Err(ApiError::rejected(
            Reason::OwnerProtected,
            "the account owner cannot be deleted",
        )),
    }
}

/// Refuses a set of changes that would leave the account with no active
/// manager, given how many there are now.
pub fn check_managers_remain(managers_now: u64, changes: &[ManagerChange]) -> ApiResult<()> {
    let lost = changes.iter().filter(|c| c.removes_manager()).count() as u64;
    let gained = changes
        .iter()
        .filter(|c| !c.manager_before && c.manager_after)
        .count() as u64;
    if managers_now + gained <= lost {
        return Err(ApiError::rejected(
            Reason::LastManager,
            "the account must keep at least one active user who can manage users",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(before: bool, after: bool) -> ManagerChange {
        ManagerChange {
            owner: false,
            manager_before: before,
            manager_after: after,
        }
    }

    #[test]
    fn the_last_manager_cannot_be_removed_alone_or_in_bulk() {
        assert!(check_managers_remain(1, &[change(true, false)]).is_err());
        assert!(check_managers_remain(2, &[change(true, false)]).is_ok());
        assert!(check_managers_remain(2, &[change(true, false), change(true, false)]).is_err());
        // Promoting one while demoting another in the same batch keeps one.
        assert!(check_managers_remain(1, &[change(true, false), change(false, true)]).is_ok());
        assert!(check_managers_remain(1, &[change(false, false)]).is_ok());
        let err = check_managers_remain(1, &[change(true, false)]).expect_err("last");
        assert_eq!(err.reason(), Reason::LastManager);
    }

    #[test]
    fn only_active_holders_of_users_manage_are_managers() {
        assert!(manages(&["users.read".into(), USERS_MANAGE.into()]));
        assert!(!manages(&["users.read".into()]));
        let demoted = ManagerChange::of(false, UserStatus::Active, true, false);
        assert!(demoted.removes_manager());
        let inactive = ManagerChange::of(false, UserStatus::Inactive, true, false);
        assert!(!inactive.manager_before && !inactive.removes_manager());
        let promoted = ManagerChange::of(false, UserStatus::Active, false, true);
        assert!(promoted.manager_after && !promoted.removes_manager());
    }

    #[test]
    fn the_owner_is_protected_from_others() {
        for action in [
            OwnerAction::Edit,
            OwnerAction::ChangeRole,
            OwnerAction::Deactivate,
            OwnerAction::Delete,
        ] {
            let err = check_owner(true, false, action).expect_err("refused");
            assert_eq!(err.reason(), Reason::OwnerProtected);
            assert!(check_owner(false, false, action).is_ok());
        }
        assert!(check_owner(true, true, OwnerAction::Edit).is_ok());
        assert!(check_owner(true, true, OwnerAction::Delete).is_err());
    }
}
