//! API keys, as rules: what a new key may be (a name, 1 to
//! [`MAX_KEY_PERMISSIONS`] permissions the account can grant, an expiry in
//! the future), when a key is usable, which of its permissions still apply
//! once its account lost a product, how the secret of an idempotent answer is
//! kept (sealed, never in clear), and the audit entries and events of a
//! creation and a revocation. Pure: the store reads and writes the keys.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use usher_kit::{
    error::{ApiError, ApiResult, Violations},
    idempotency::IdempotencyKey,
    tokens::API_KEY_PREFIX,
};
use usher_proto::events::v1 as events;
use uuid::Uuid;

use super::{
    CATALOGUE,
    effects::{Actor, Audit, Effects},
    validate_name,
};
use crate::store::entities::api_key;

/// Longest API key name.
pub const MAX_KEY_NAME: usize = 100;
/// Most permissions on one API key.
pub const MAX_KEY_PERMISSIONS: usize = 200;
/// Prefix of the sealed secret kept in an idempotent CreateApiKey answer.
pub const SEALED_SECRET_PREFIX: &str = "sealed:";
/// Characters of the secret shown in lists (`usk_` and 4 random characters,
/// 24 of its 256 bits).
const SHOWN_PREFIX_CHARS: usize = API_KEY_PREFIX.len() + 4;

/// The non-secret beginning of `secret` shown in lists.
pub fn secret_prefix(secret: &str) -> String {
    secret.chars().take(SHOWN_PREFIX_CHARS).collect()
}

/// Whether a key is usable at `now`: not revoked, not expired.
pub fn is_active(key: &api_key::Model, now: DateTime<Utc>) -> bool {
    key.revoke_time.is_none() && key.expire_time.is_none_or(|at| at > now)
}

/// `permissions` without those of products not in `products` (core
/// permissions always stay).
pub fn enabled_permissions(permissions: Vec<String>, products: &[String]) -> Vec<String> {
    permissions
        .into_iter()
        .filter(|permission| {
            CATALOGUE.iter().any(|(core, _)| core == permission)
                || permission
                    .split_once('.')
                    .is_some_and(|(product, _)| products.iter().any(|p| p == product))
        })
        .collect()
}

/// The context the secret of an idempotent answer is sealed under: the key's
/// scope and request id, so a stored answer opens only for its own retry.
pub fn seal_context(key: &IdempotencyKey) -> String {
    format!("{}\u{0}{}", key.scope, key.request_id)
}

/// A CreateApiKey as given.
#[derive(Clone, Debug, Default)]
pub struct NewKeyRequest {
    /// The name.
    pub name: String,
    /// The permissions asked for.
    pub permissions: Vec<String>,
    /// When it expires (`None`: never); `Some(None)` when the time given is
    /// not a time at all.
    pub expire_time: Option<Option<DateTime<Utc>>>,
}

/// A new key, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewKey {
    /// The trimmed name.
    pub name: String,
    /// The permissions, sorted and without duplicates.
    pub permissions: Vec<String>,
    /// When it expires.
    pub expire_time: Option<DateTime<Utc>>,
}

/// Checks a new key against the permissions its account can grant (`known`)
/// at `now`, every violation at once.
pub fn validate_new_key(
    request: &NewKeyRequest,
    known: &BTreeSet<String>,
    now: DateTime<Utc>,
) -> ApiResult<NewKey> {
    let mut violations = Violations::new();
    let name = validate_name("name", &request.name, MAX_KEY_NAME)
        .map_err(|e| violations.absorb(e))
        .ok();
    if request.permissions.is_empty() || request.permissions.len() > MAX_KEY_PERMISSIONS {
        violations.add(
            "permissions",
            format!("must hold 1 to {MAX_KEY_PERMISSIONS} permissions"),
        );
    }
    let mut permissions = BTreeSet::new();
    for (index, permission) in request.permissions.iter().enumerate() {
        let permission = permission.trim();
        if known.contains(permission) {
            permissions.insert(permission.to_owned());
        } else {
            violations.add(
                format!("permissions[{index}]"),
                "is not a permission of this account",
            );
        }
    }
    let expire_time = match request.expire_time {
        None => None,
        Some(Some(at)) if at > now => Some(at),
        Some(_) => {
            violations.add("expire_time", "must be in the future");
            None
        }
    };
    violations.into_result()?;
    let Some(name) = name else {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "validated name missing"
        )));
    };
    Ok(NewKey {
        name,
        permissions: permissions.into_iter().collect(),
        expire_time,
    })
}

/// The audit entry and event of the creation of `key` by `actor`.
pub fn created(
    account_id: Uuid,
    key: &api_key::Model,
    new: &NewKey,
    actor: &Actor,
    now: DateTime<Utc>,
) -> Effects {
    let mut effects = Effects::new();
    effects.audit(Audit {
        account_id,
        action: "api_key.created",
        target_type: "api_key",
        target_id: key.id.to_string(),
        target_name: new.name.clone(),
        details: Some(
            serde_json::json!({"permissions": new.permissions, "expire_time": new.expire_time}),
        ),
    });
    effects.event(
        "api_key.created",
        "ApiKeyCreated",
        key.id.to_string(),
        Some(account_id),
        &events::ApiKeyCreated {
            api_key_id: key.id.to_string(),
            account_id: account_id.to_string(),
            actor: Some(actor.to_proto()),
            name: new.name.clone(),
            permissions: new.permissions.clone(),
            expire_time: usher_kit::convert::optional_timestamp(new.expire_time),
        },
        now,
    );
    effects
}

/// The audit entry and event of the revocation of `key` by `actor` (only
/// the call that revoked it records one).
pub fn revoked(
    account_id: Uuid,
    key: &api_key::Model,
    actor: &Actor,
    now: DateTime<Utc>,
) -> Effects {
    let mut effects = Effects::new();
    effects.audit(Audit {
        account_id,
        action: "api_key.revoked",
        target_type: "api_key",
        target_id: key.id.to_string(),
        target_name: key.name.clone(),
        details: None,
    });
    effects.event(
        "api_key.revoked",
        "ApiKeyRevoked",
        key.id.to_string(),
        Some(account_id),
        &events::ApiKeyRevoked {
            api_key_id: key.id.to_string(),
            account_id: account_id.to_string(),
            actor: Some(actor.to_proto()),
            name: key.name.clone(),
        },
        now,
    );
    effects
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use usher_kit::error::Reason;

    use super::*;
    use crate::domain::{USERS_MANAGE, USERS_READ};

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("time")
    }

    fn key(
        revoke_time: Option<DateTime<Utc>>,
        expire_time: Option<DateTime<Utc>>,
    ) -> api_key::Model {
        api_key::Model {
            id: Uuid::nil(),
            account_id: Some(Uuid::nil()),
            name: "CI".into(),
            secret_hash: "h".into(),
            secret_prefix: "usk_abcd".into(),
            permissions: serde_json::json!([]),
            platform: false,
            creator_user_id: None,
            create_time: now(),
            expire_time,
            last_use_time: None,
            revoke_time,
        }
    }

    fn known() -> BTreeSet<String> {
        [USERS_READ, USERS_MANAGE, "meter.read"]
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn keys_are_usable_until_revoked_or_expired() {
        assert!(is_active(&key(None, None), now()));
        assert!(is_active(
            &key(None, Some(now() + Duration::seconds(1))),
            now()
        ));
        assert!(!is_active(&key(None, Some(now())), now()));
        assert!(!is_active(&key(Some(now()), None), now()));
        assert_eq!(secret_prefix("usk_abcdefgh"), "usk_abcd");
    }

    #[test]
    fn lost_products_take_their_permissions_with_them() {
        let held = vec![
            USERS_READ.to_owned(),
            "meter.read".to_owned(),
            "fleet.read".to_owned(),
        ];
        assert_eq!(
            enabled_permissions(held, &["meter".to_owned()]),
            [USERS_READ, "meter.read"]
        );
    }

    #[test]
    fn new_keys_are_named_bounded_known_and_expire_later() {
        let request = NewKeyRequest {
            name: "  CI  ".into(),
            permissions: vec![USERS_READ.into(), " meter.read".into(), USERS_READ.into()],
            expire_time: Some(Some(now() + Duration::hours(1))),
        };
        let new = validate_new_key(&request, &known(), now()).expect("valid");
        assert_eq!(new.name, "CI");
        assert_eq!(new.permissions, ["meter.read", USERS_READ]);

        let bad = NewKeyRequest {
            name: " ".into(),
            permissions: vec!["nope".into()],
            expire_time: Some(Some(now())),
        };
        let err = validate_new_key(&bad, &known(), now()).expect_err("invalid");
        let ApiError::InvalidArgument(violations) = err else {
            panic!("{err:?}");
        };
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["name", "permissions[0]", "expire_time"]);

        let none = NewKeyRequest {
            name: "CI".into(),
            permissions: Vec::new(),
            expire_time: Some(None),
        };
        let err = validate_new_key(&none, &known(), now()).expect_err("invalid");
        assert_eq!(err.reason(), Reason::InvalidArgument);
    }

    #[test]
    fn creation_and_revocation_are_audited_with_their_event() {
        let request = NewKeyRequest {
            name: "CI".into(),
            permissions: vec![USERS_READ.into()],
            expire_time: None,
        };
        let new = validate_new_key(&request, &known(), now()).expect("valid");
        let model = key(None, None);
        let effects = created(Uuid::nil(), &model, &new, &Actor::system(), now());
        assert_eq!(effects.actions(), ["api_key.created"]);
        assert_eq!(
            effects.audit[0].details,
            Some(serde_json::json!({"permissions": [USERS_READ], "expire_time": null}))
        );
        assert_eq!(effects.events.len(), 1);
        let effects = revoked(Uuid::nil(), &model, &Actor::system(), now());
        assert_eq!(effects.actions(), ["api_key.revoked"]);
        assert_eq!(effects.audit[0].details, None);
    }
}
