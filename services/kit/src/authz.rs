//! Deny-by-default authorization from the contracts (P13). The table maps each
//! gRPC path to the `usher.auth.v1.rule` of its RPC; a path not in the table,
//! or an RPC without a rule, is refused. The gateway and every service check
//! the same table, so a call that slipped past one is still refused by the other.

use std::{collections::HashMap, sync::Arc};

use usher_proto::policy::{self, Access, MethodRule};

use crate::{
    error::{ApiError, Reason},
    principal::{Principal, PrincipalKind},
};

/// Paths that carry no `usher.auth.v1.rule` and are open to anyone:
/// health checks and reflection (which can be switched off, P23).
pub fn is_infrastructure_path(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// The policy table, built once from the compiled descriptors.
#[derive(Clone, Debug)]
pub struct Policy {
    rules: Arc<HashMap<String, MethodRule>>,
}

impl Policy {
    /// The table of every Usher RPC.
    pub fn from_contracts() -> Result<Self, policy::PolicyError> {
        let rules = policy::method_rules()?;
        Ok(Self {
            rules: Arc::new(rules.into_iter().map(|r| (r.path.clone(), r)).collect()),
        })
    }

    /// The rule of `path`, if the path is an Usher RPC.
    pub fn rule(&self, path: &str) -> Option<&MethodRule> {
        self.rules.get(path)
    }

    /// Every rule.
    pub fn rules(&self) -> impl Iterator<Item = &MethodRule> {
        self.rules.values()
    }

    /// Decides whether `principal` may call `path`.
    pub fn authorize(&self, path: &str, principal: &Principal) -> Result<(), ApiError> {
        let rule = self.rule(path).ok_or_else(|| {
            ApiError::rejected(Reason::PermissionDenied, "no access rule for this method")
        })?;
        authorize(rule, principal)
    }
}

/// Decides whether `principal` may call the RPC with `rule`. A principal that
/// must change its password gets `PASSWORD_CHANGE_REQUIRED` from every MEMBER
/// and PERMISSION RPC whose rule is not `allowed_before_password_change`.
pub fn authorize(rule: &MethodRule, principal: &Principal) -> Result<(), ApiError> {
    let unauthenticated =
        || ApiError::rejected(Reason::Unauthenticated, "a valid credential is required");
    let denied = || ApiError::rejected(Reason::PermissionDenied, "permission denied");
    match rule.access {
        Access::Unspecified => Err(denied()),
        Access::Public => Ok(()),
        Access::Member | Access::Permission => {
            if principal.kind == PrincipalKind::Anonymous {
                return Err(unauthenticated());
            }
            if !principal.is_member() {
                return Err(denied());
            }
            // Before the permission: a session that must change its password
            // learns that first, whatever it holds.
            if principal.password_change_required && !rule.allowed_before_password_change {
                return Err(ApiError::rejected(
                    Reason::PasswordChangeRequired,
                    "choose a new password first (AuthService.ChangePassword)",
                ));
            }
            if rule.access == Access::Permission && !principal.has_permission(&rule.permission) {
                return Err(ApiError::rejected(
                    Reason::PermissionDenied,
                    format!("permission {} is required", rule.permission),
                ));
            }
            Ok(())
        }
        Access::Platform => match principal.kind {
            PrincipalKind::Platform => Ok(()),
            PrincipalKind::Anonymous => Err(unauthenticated()),
            _ => Err(denied()),
        },
        Access::Internal => match principal.kind {
            PrincipalKind::Service => Ok(()),
            PrincipalKind::Anonymous => Err(unauthenticated()),
            _ => Err(denied()),
        },
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn principal(kind: PrincipalKind, permissions: &[&str]) -> Principal {
        let account = matches!(kind, PrincipalKind::User | PrincipalKind::ApiKey);
        Principal {
            kind,
            account_id: account.then(Uuid::new_v4),
            user_id: (kind == PrincipalKind::User).then(Uuid::new_v4),
            credential_id: None,
            permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
            service: (kind == PrincipalKind::Service).then(|| "usher-invitation".to_owned()),
            password_change_required: false,
        }
    }

    #[test]
    fn every_contract_rpc_follows_its_rule_for_every_kind_of_caller() {
        let policy = Policy::from_contracts().expect("contracts");
        let admin_permissions = [
            "users.read",
            "users.invite",
            "users.manage",
            "roles.manage",
            "teams.manage",
            "account.manage",
            "audit.read",
        ];
        for rule in policy.rules() {
            let anonymous = policy.authorize(&rule.path, &Principal::anonymous());
            let member = policy.authorize(&rule.path, &principal(PrincipalKind::User, &[]));
            let admin = policy.authorize(
                &rule.path,
                &principal(PrincipalKind::User, &admin_permissions),
            );
            let platform = policy.authorize(&rule.path, &principal(PrincipalKind::Platform, &[]));
            let service = policy.authorize(&rule.path, &principal(PrincipalKind::Service, &[]));
            let ok = |r: &Result<(), ApiError>| r.is_ok();
            let expected = match rule.access {
                Access::Public => [true, true, true, true, true],
                Access::Member => [false, true, true, false, false],
                Access::Permission => [false, false, true, false, false],
                Access::Platform => [false, false, false, true, false],
                Access::Internal => [false, false, false, false, true],
                Access::Unspecified => [false; 5],
            };
            assert_eq!(
                [
                    ok(&anonymous),
                    ok(&member),
                    ok(&admin),
                    ok(&platform),
                    ok(&service)
                ],
                expected,
                "{}",
                rule.path
            );
            if rule.access != Access::Public {
                assert_eq!(
                    anonymous.expect_err("refused").reason(),
                    Reason::Unauthenticated
                );
            }
        }
    }

    #[test]
    fn a_pending_password_change_allows_only_the_rpcs_its_rule_exempts() {
        let policy = Policy::from_contracts().expect("contracts");
        let mut pending = principal(
            PrincipalKind::User,
            &["users.read", "users.manage", "account.manage"],
        );
        pending.password_change_required = true;
        let mut exempt = Vec::new();
        for rule in policy.rules() {
            let decision = policy.authorize(&rule.path, &pending);
            match rule.access {
                Access::Member | Access::Permission if rule.allowed_before_password_change => {
                    assert!(decision.is_ok(), "{}", rule.path);
                    exempt.push(rule.method.as_str());
                }
                Access::Member | Access::Permission => assert_eq!(
                    decision.expect_err("refused").reason(),
                    Reason::PasswordChangeRequired,
                    "{}",
                    rule.path
                ),
                Access::Public => assert!(decision.is_ok(), "{}", rule.path),
                _ => assert_eq!(
                    decision.expect_err("refused").reason(),
                    Reason::PermissionDenied,
                    "{}",
                    rule.path
                ),
            }
        }
        exempt.sort_unstable();
        assert_eq!(exempt, ["ChangePassword", "GetCurrentUser", "SignOut"]);
        // Refused before the permission check: even an RPC it lacks the
        // permission for says what to do first.
        let err = policy
            .authorize("/usher.identity.v1.RoleService/CreateRole", &pending)
            .expect_err("refused");
        assert_eq!(err.reason(), Reason::PasswordChangeRequired);
        assert_eq!(err.reason().code(), tonic::Code::FailedPrecondition);
    }

    #[test]
    fn unknown_paths_are_denied() {
        let policy = Policy::from_contracts().expect("contracts");
        let admin = principal(PrincipalKind::User, &["users.manage"]);
        let err = policy.authorize("/usher.identity.v1.UserService/NoSuchRpc", &admin);
        assert_eq!(err.expect_err("denied").reason(), Reason::PermissionDenied);
    }
}
