//! The access rule of every RPC, read from the `usher.auth.v1.rule` method
//! option in the compiled descriptor set. The gateway builds its policy table
//! from [`method_rules`]; a method without a rule is reported with
//! [`Access::Unspecified`], which every consumer must treat as "deny".

use prost_reflect::{DescriptorPool, DynamicMessage, Value};

pub use crate::auth::v1::Access;

/// Name of the method option that carries an RPC's rule.
pub const RULE_EXTENSION: &str = "usher.auth.v1.rule";

/// The access rule of one RPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodRule {
    /// The gRPC path, `/<package>.<Service>/<Method>`.
    pub path: String,
    /// Fully qualified service name, e.g. `usher.invitation.v1.InvitationService`.
    pub service: String,
    /// The method name, e.g. `CreateInvitations`.
    pub method: String,
    /// Who may call it; `Unspecified` when the RPC has no rule (deny).
    pub access: Access,
    /// The permission required when `access` is `Permission`.
    pub permission: String,
    /// Whether a session that must change its password may still call it
    /// (`Rule.allowed_before_password_change`; only on `Member` RPCs).
    pub allowed_before_password_change: bool,
}

/// Why the descriptor set could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The embedded descriptor set does not decode.
    #[error("descriptor set does not decode: {0}")]
    Decode(#[from] prost_reflect::DescriptorError),
    /// The descriptor set does not define the rule option.
    #[error("descriptor set has no extension {RULE_EXTENSION}")]
    MissingExtension,
}

/// The descriptor pool of every Usher proto file.
pub fn descriptor_pool() -> Result<DescriptorPool, PolicyError> {
    Ok(DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET)?)
}

/// The rule of every RPC of every Usher service, in descriptor order.
pub fn method_rules() -> Result<Vec<MethodRule>, PolicyError> {
    let pool = descriptor_pool()?;
    let extension = pool
        .get_extension_by_name(RULE_EXTENSION)
        .ok_or(PolicyError::MissingExtension)?;
    let mut rules = Vec::new();
    for service in pool.services() {
        if !service.full_name().starts_with("usher.") {
            continue;
        }
        for method in service.methods() {
            let options = method.options();
            let (access, permission, allowed_before_password_change) =
                if options.has_extension(&extension) {
                    read_rule(&options.get_extension(&extension))
                } else {
                    (Access::Unspecified, String::new(), false)
                };
            rules.push(MethodRule {
                path: format!("/{}/{}", service.full_name(), method.name()),
                service: service.full_name().to_owned(),
                method: method.name().to_owned(),
                access,
                permission,
                allowed_before_password_change,
            });
        }
    }
    Ok(rules)
}

fn read_rule(value: &Value) -> (Access, String, bool) {
    let Some(rule) = value.as_message() else {
        return (Access::Unspecified, String::new(), false);
    };
    let access = field_i32(rule, "access")
        .and_then(|n| Access::try_from(n).ok())
        .unwrap_or(Access::Unspecified);
    let permission = rule
        .get_field_by_name("permission")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let allowed_before_password_change = rule
        .get_field_by_name("allowed_before_password_change")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    (access, permission, allowed_before_password_change)
}

fn field_i32(message: &DynamicMessage, name: &str) -> Option<i32> {
    message
        .get_field_by_name(name)
        .and_then(|v| v.as_enum_number())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The permission catalogue: a `PERMISSION` rule must name one of these.
    const CATALOGUE: &[&str] = &[
        "users.read",
        "users.invite",
        "users.manage",
        "roles.manage",
        "teams.manage",
        "account.manage",
        "audit.read",
    ];

    #[test]
    fn every_rpc_has_a_valid_rule() {
        let rules = method_rules().expect("descriptor set decodes");
        assert!(
            rules.len() > 20,
            "expected the full contract, found {} RPCs",
            rules.len()
        );
        let mut problems = Vec::new();
        for rule in &rules {
            match rule.access {
                Access::Unspecified => problems.push(format!("{}: no rule", rule.path)),
                Access::Permission if !CATALOGUE.contains(&rule.permission.as_str()) => problems
                    .push(format!(
                        "{}: unknown permission {:?}",
                        rule.path, rule.permission
                    )),
                Access::Permission => {}
                _ if !rule.permission.is_empty() => problems.push(format!(
                    "{}: permission {:?} given with access {:?}",
                    rule.path, rule.permission, rule.access
                )),
                _ => {}
            }
            if rule.allowed_before_password_change && rule.access != Access::Member {
                problems.push(format!(
                    "{}: allowed_before_password_change given with access {:?}",
                    rule.path, rule.access
                ));
            }
        }
        assert!(
            problems.is_empty(),
            "RPCs with a missing or bad rule:\n{}",
            problems.join("\n")
        );
    }

    #[test]
    fn internal_package_is_internal_only() {
        let rules = method_rules().expect("descriptor set decodes");
        for rule in rules.iter().filter(|r| r.service.contains(".internal.")) {
            assert_eq!(
                rule.access,
                Access::Internal,
                "{} must be INTERNAL",
                rule.path
            );
        }
        assert!(rules.iter().any(|r| r.access == Access::Internal));
    }

    #[test]
    fn only_reading_oneself_changing_the_password_and_signing_out_precede_a_password_change() {
        let rules = method_rules().expect("descriptor set decodes");
        let mut allowed: Vec<_> = rules
            .iter()
            .filter(|r| r.allowed_before_password_change)
            .map(|r| r.path.as_str())
            .collect();
        allowed.sort_unstable();
        assert_eq!(
            allowed,
            [
                "/usher.identity.v1.AuthService/ChangePassword",
                "/usher.identity.v1.AuthService/GetCurrentUser",
                "/usher.identity.v1.AuthService/SignOut",
            ]
        );
    }

    #[test]
    fn architecture_outline_rules_hold() {
        let rules = method_rules().expect("descriptor set decodes");
        let find = |path: &str| {
            rules
                .iter()
                .find(|r| r.path == path)
                .unwrap_or_else(|| panic!("missing RPC {path}"))
        };
        let expect = [
            (
                "/usher.identity.v1.AccountService/CreateAccount",
                Access::Platform,
                "",
            ),
            ("/usher.identity.v1.AuthService/SignIn", Access::Public, ""),
            (
                "/usher.identity.v1.UserService/ListUsers",
                Access::Permission,
                "users.read",
            ),
            (
                "/usher.identity.v1.UserService/DeleteUser",
                Access::Permission,
                "users.manage",
            ),
            (
                "/usher.invitation.v1.InvitationService/CreateInvitations",
                Access::Permission,
                "users.invite",
            ),
            (
                "/usher.invitation.v1.InvitationService/AcceptInvitation",
                Access::Public,
                "",
            ),
            (
                "/usher.identity.internal.v1.DirectoryService/ReserveInvitees",
                Access::Internal,
                "",
            ),
            (
                "/usher.identity.v1.AuditService/ListAuditEvents",
                Access::Permission,
                "audit.read",
            ),
        ];
        for (path, access, permission) in expect {
            let rule = find(path);
            assert_eq!(
                (rule.access, rule.permission.as_str()),
                (access, permission),
                "{path}"
            );
        }
    }
}
