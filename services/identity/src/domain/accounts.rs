//! The rules of AccountService: allowed email domains, the subscription's
//! bounds, and the audit entries and events of creating an account (and its
//! owner), editing its settings, changing its subscription and registering
//! a product. Pure: the caller loads and writes the rows.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use prost_types::FieldMask;
use serde_json::json;
use usher_kit::{
    convert::strings,
    email::canonical_domain,
    error::{ApiError, ApiResult},
};
use usher_proto::{events::v1 as events, identity::v1 as pb};

use super::effects::{Actor, Audit, Effects};
use crate::store::entities::{account, user};

/// Most products an account enables.
pub const MAX_PRODUCTS: usize = 50;
/// Most allowed email domains.
pub const MAX_DOMAINS: usize = 100;
/// Most permissions a product defines.
pub const MAX_PRODUCT_PERMISSIONS: usize = 100;
/// Product codes the core permissions use.
pub const CORE_NAMESPACES: &[&str] = &["users", "roles", "teams", "account", "audit"];
/// The seat limits a subscription may have.
pub const SEAT_LIMITS: std::ops::RangeInclusive<i32> = 1..=1_000_000;

/// Canonical allowed domains (lower case, punycode), deduplicated.
pub fn validate_domains(field: &str, domains: &[String]) -> ApiResult<Vec<String>> {
    if domains.len() > MAX_DOMAINS {
        return Err(ApiError::invalid(
            field,
            format!("must hold at most {MAX_DOMAINS} domains"),
        ));
    }
    let mut canonical = BTreeSet::new();
    for (index, domain) in domains.iter().enumerate() {
        let domain = canonical_domain(domain).map_err(|e| {
            ApiError::invalid(
                format!("{field}[{index}]"),
                format!("is not a valid domain: {e}"),
            )
        })?;
        canonical.insert(domain);
    }
    Ok(canonical.into_iter().collect())
}

/// Product codes trimmed, sorted and deduplicated.
pub fn product_codes(codes: &[String]) -> Vec<String> {
    codes
        .iter()
        .map(|p| p.trim().to_owned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The audit entry and events of a new account and its owner (ACTIVE,
/// holding the built-in Admin role), created by `actor`.
pub fn created(
    account: &account::Model,
    owner: &user::Model,
    products: &[String],
    actor: &Actor,
    now: DateTime<Utc>,
) -> Effects {
    let account_id = account.id.to_string();
    let actor_pb = actor.to_proto();
    let mut effects = Effects::new();
    effects.audit(Audit {
        account_id: account.id,
        action: "account.created",
        target_type: "account",
        target_id: account_id.clone(),
        target_name: account.name.clone(),
        details: Some(
            json!({"slug": account.slug, "seat_limit": account.seat_limit, "products": products}),
        ),
    });
    effects.event(
        "account.created",
        "AccountCreated",
        account_id.clone(),
        Some(account.id),
        &events::AccountCreated {
            account_id: account_id.clone(),
            actor: Some(actor_pb.clone()),
            name: account.name.clone(),
            slug: account.slug.clone(),
            default_locale: account.default_locale.clone(),
            owner_user_id: owner.id.to_string(),
            seat_limit: account.seat_limit,
            products: products.to_vec(),
        },
        now,
    );
    effects.event(
        "user.created",
        "UserCreated",
        owner.id.to_string(),
        Some(account.id),
        &events::UserCreated {
            user_id: owner.id.to_string(),
            account_id,
            actor: Some(actor_pb),
            email: owner.email.clone().unwrap_or_default(),
            username: String::new(),
            display_name: owner.display_name.clone(),
            status: pb::UserStatus::Active as i32,
            origin: pb::UserOrigin::AccountOwner as i32,
            role_id: owner.role_id.to_string(),
            team_id: String::new(),
            products: products.to_vec(),
            invitation_id: String::new(),
        },
        now,
    );
    effects
}

/// The audit entry and event of editing the settings `paths` of an account,
/// shown afterwards as `view`.
pub fn updated(
    updated: &account::Model,
    paths: &[String],
    view: &pb::Account,
    actor: &Actor,
    now: DateTime<Utc>,
) -> Effects {
    let mut effects = Effects::new();
    effects.audit(Audit {
        account_id: updated.id,
        action: "account.updated",
        target_type: "account",
        target_id: updated.id.to_string(),
        target_name: updated.name.clone(),
        details: Some(json!({ "fields": paths })),
    });
    effects.event(
        "account.updated",
        "AccountUpdated",
        updated.id.to_string(),
        Some(updated.id),
        &events::AccountUpdated {
            account_id: updated.id.to_string(),
            actor: Some(actor.to_proto()),
            changed_fields: Some(FieldMask {
                paths: paths.to_vec(),
            }),
            name: view.name.clone(),
            default_locale: view.default_locale.clone(),
            allowed_email_domains: view.allowed_email_domains.clone(),
            invitation_lifetime: view.invitation_lifetime,
        },
        now,
    );
    effects
}

/// The audit entry and event of changing the subscription `paths` of an
/// account, which now uses `seats_used` seats.
pub fn subscription_updated(
    updated: &account::Model,
    paths: Vec<String>,
    seats_used: u64,
    actor: &Actor,
    now: DateTime<Utc>,
) -> Effects {
    let products = strings(&updated.products);
    let mut effects = Effects::new();
    effects.audit(Audit {
        account_id: updated.id,
        action: "account.subscription_updated",
        target_type: "account",
        target_id: updated.id.to_string(),
        target_name: updated.name.clone(),
        details: Some(json!({"seat_limit": updated.seat_limit, "products": products})),
    });
    effects.event(
        "account.subscription_updated",
        "SubscriptionUpdated",
        updated.id.to_string(),
        Some(updated.id),
        &events::SubscriptionUpdated {
            account_id: updated.id.to_string(),
            actor: Some(actor.to_proto()),
            changed_fields: Some(FieldMask { paths }),
            seat_limit: updated.seat_limit,
            products,
            seats_used: i32::try_from(seats_used).unwrap_or(i32::MAX),
        },
        now,
    );
    effects
}

/// The event of registering (or redefining, `created` false) the product
/// `code` with the permissions `names`.
pub fn product_registered(
    code: &str,
    display_name: &str,
    names: Vec<String>,
    created: bool,
    actor: &Actor,
    now: DateTime<Utc>,
) -> Effects {
    let mut effects = Effects::new();
    effects.event(
        "product.registered",
        "ProductRegistered",
        code.to_owned(),
        None,
        &events::ProductRegistered {
            code: code.to_owned(),
            actor: Some(actor.to_proto()),
            display_name: display_name.to_owned(),
            permissions: names,
            created,
        },
        now,
    );
    effects
}

/// Refuses products the account has not enabled.
pub fn require_enabled(
    account: &crate::store::entities::account::Model,
    products: &[String],
) -> usher_kit::error::ApiResult<()> {
    let enabled = usher_kit::convert::strings(&account.products);
    match products.iter().find(|p| !enabled.contains(p)) {
        Some(missing) => Err(usher_kit::error::ApiError::rejected(
            usher_kit::error::Reason::ProductNotEnabled,
            format!("product {missing} is not enabled on the account"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    #[test]
    fn allowed_domains_are_canonical_unique_and_bounded() {
        let domains = validate_domains(
            "d",
            &[
                "Acme.example".into(),
                "@acme.EXAMPLE".into(),
                "b.example".into(),
            ],
        )
        .expect("valid");
        assert_eq!(domains, ["acme.example", "b.example"]);
        let err = validate_domains("d", &["not a domain".into()]).expect_err("invalid");
        assert!(matches!(err, ApiError::InvalidArgument(ref v) if v[0].field == "d[0]"));
        assert!(validate_domains("d", &vec!["a.example".to_owned(); MAX_DOMAINS + 1]).is_err());
        assert_eq!(
            product_codes(&[" meter".into(), "meter".into(), "atlas".into()]),
            ["atlas", "meter"]
        );
    }

    #[test]
    fn a_new_account_audits_once_and_announces_account_and_owner() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let account = account::Model {
            id: Uuid::new_v4(),
            name: "Acme".into(),
            slug: "acme".into(),
            default_locale: "en".into(),
            owner_user_id: None,
            seat_limit: 5,
            products: json!([]),
            allowed_email_domains: json!([]),
            invitation_lifetime_secs: None,
            create_time: now,
            update_time: now,
        };
        let owner = user::Model {
            id: Uuid::new_v4(),
            account_id: account.id,
            email: Some("olive@acme.example".into()),
            email_canonical: Some("olive@acme.example".into()),
            username: None,
            display_name: "Olive".into(),
            search_text: String::new(),
            status: crate::domain::UserStatus::Active,
            role_id: Uuid::new_v4(),
            team_id: None,
            products: json!([]),
            locale: String::new(),
            metadata: None,
            owner: true,
            origin: crate::domain::Origin::Owner,
            password_hash: None,
            password_change_required: false,
            invitation_id: None,
            invited_by: None,
            create_time: now,
            update_time: now,
            activate_time: Some(now),
            deactivate_time: None,
            last_sign_in_time: None,
        };
        let effects = created(&account, &owner, &[], &Actor::system(), now);
        assert_eq!(effects.actions(), ["account.created"]);
        assert_eq!(effects.events.len(), 2, "account.created and user.created");
        let registered = product_registered("meter", "Meter", vec![], true, &Actor::system(), now);
        assert!(registered.audit.is_empty() && registered.events.len() == 1);
    }
}
