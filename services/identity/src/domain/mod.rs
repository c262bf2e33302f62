//! The identity domain: the permission catalogue, built-in roles, user
//! statuses and the validation rules of names, slugs and locales. Pure: no
//! I/O, no tonic, no queries (the status enums carry sea-orm's derive only so
//! the user entity stores them typed).

use sea_orm::sea_query::StringLen;
use usher_kit::error::{ApiError, ApiResult};

pub mod accounts;
pub mod api_keys;
pub mod auth;
pub mod effects;
pub mod grants;
pub mod managers;
pub mod password_links;
pub mod reservations;
pub mod roles;
pub mod seats;
pub mod teams;
pub mod users;

/// Read users, invitations and deliveries.
pub const USERS_READ: &str = "users.read";
/// Invite, resend, revoke and delete invitations.
pub const USERS_INVITE: &str = "users.invite";
/// Create, edit, deactivate and delete users. Its active holders are "managers".
pub const USERS_MANAGE: &str = "users.manage";
/// Manage custom roles.
pub const ROLES_MANAGE: &str = "roles.manage";
/// Manage teams.
pub const TEAMS_MANAGE: &str = "teams.manage";
/// Manage account settings and API keys.
pub const ACCOUNT_MANAGE: &str = "account.manage";
/// Read the audit log.
pub const AUDIT_READ: &str = "audit.read";

/// The built-in permission catalogue, with descriptions.
pub const CATALOGUE: &[(&str, &str)] = &[
    (
        USERS_READ,
        "List and read users, invitations and email deliveries",
    ),
    (
        USERS_INVITE,
        "Invite people, resend, withdraw and delete invitations",
    ),
    (
        USERS_MANAGE,
        "Create, edit, deactivate, reactivate and delete users",
    ),
    (ROLES_MANAGE, "Create, edit and delete custom roles"),
    (TEAMS_MANAGE, "Create, rename and delete teams"),
    (
        ACCOUNT_MANAGE,
        "Change account settings and manage API keys",
    ),
    (AUDIT_READ, "Read the audit log"),
];

/// Name of the built-in role holding every permission.
pub const ADMIN_ROLE: &str = "Admin";
/// Name of the built-in role of ordinary members.
pub const USER_ROLE: &str = "User";

/// Languages Usher's emails and pages exist in.
pub const SUPPORTED_LOCALES: &[&str] = &["en", "fr"];

/// The permissions of the built-in Admin role: the catalogue plus every
/// permission of the account's enabled products.
pub fn admin_permissions(product_permissions: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut all: Vec<String> = CATALOGUE.iter().map(|(p, _)| (*p).to_owned()).collect();
    all.extend(product_permissions);
    all.sort();
    all.dedup();
    all
}

/// The permissions of the built-in User role.
pub fn user_permissions() -> Vec<String> {
    vec![USERS_READ.to_owned()]
}

/// Where a user is in their life. Stored as its text (`invited`, `active`,
/// `inactive`): the derive lets the user entity hold it typed, so no code
/// parses the stored string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, sea_orm::EnumIter, sea_orm::DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum UserStatus {
    /// An invitation is pending (or expired, awaiting a reinvite).
    #[sea_orm(string_value = "invited")]
    Invited,
    /// Can sign in.
    #[sea_orm(string_value = "active")]
    Active,
    /// Deactivated by an admin: cannot sign in, keeps history, frees its seat.
    #[sea_orm(string_value = "inactive")]
    Inactive,
}

impl UserStatus {
    /// The stored form.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Invited => "invited",
            Self::Active => "active",
            Self::Inactive => "inactive",
        }
    }

    /// Parses the stored form.
    pub fn parse(stored: &str) -> Option<Self> {
        match stored {
            "invited" => Some(Self::Invited),
            "active" => Some(Self::Active),
            "inactive" => Some(Self::Inactive),
            _ => None,
        }
    }

    /// Whether the user takes a seat (ACTIVE and INVITED do).
    pub const fn uses_seat(self) -> bool {
        matches!(self, Self::Invited | Self::Active)
    }
}

/// How a user came to be (stored as its text, like [`UserStatus`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, sea_orm::EnumIter, sea_orm::DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum Origin {
    /// Signed the account up.
    #[sea_orm(string_value = "owner")]
    Owner,
    /// Accepted an invitation.
    #[sea_orm(string_value = "invitation")]
    Invitation,
    /// Created directly (shared devices).
    #[sea_orm(string_value = "direct")]
    Direct,
}

impl Origin {
    /// The stored form.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Invitation => "invitation",
            Self::Direct => "direct",
        }
    }

    /// Parses the stored form.
    pub fn parse(stored: &str) -> Option<Self> {
        match stored {
            "owner" => Some(Self::Owner),
            "invitation" => Some(Self::Invitation),
            "direct" => Some(Self::Direct),
            _ => None,
        }
    }
}

/// Whether `c` may appear in a name: no control or bidi-override characters
/// (they reorder text in emails and pages).
fn is_forbidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}')
}

/// A human-readable name (account, display name, role, team): trimmed,
/// 1..=`max` characters, no control or bidi characters.
pub fn validate_name(field: &str, value: &str, max: usize) -> ApiResult<String> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    if trimmed.chars().count() > max {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if trimmed.chars().any(is_forbidden) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(trimmed.to_owned())
}

/// An optional free text (descriptions): at most `max` characters, no control
/// characters other than newlines.
pub fn validate_text(field: &str, value: &str, max: usize) -> ApiResult<String> {
    let trimmed = value.trim();
    if trimmed.chars().count() > max {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if trimmed.chars().any(|c| c != '\n' && is_forbidden(c)) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(trimmed.to_owned())
}

/// An account slug: 3..=63 characters of `[a-z0-9-]`, not starting or ending
/// with `-`.
pub fn validate_slug(field: &str, value: &str) -> ApiResult<String> {
    let ok_chars = value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !(3..=63).contains(&value.len())
        || !ok_chars
        || value.starts_with('-')
        || value.ends_with('-')
    {
        return Err(ApiError::invalid(
            field,
            "must be 3 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-'",
        ));
    }
    Ok(value.to_owned())
}

/// A locale Usher supports; empty means "unset" and is returned as `None`.
pub fn validate_locale(field: &str, value: &str) -> ApiResult<Option<String>> {
    let value = value.trim().to_ascii_lowercase();
    if value.is_empty() {
        return Ok(None);
    }
    if SUPPORTED_LOCALES.contains(&value.as_str()) {
        Ok(Some(value))
    } else {
        Err(ApiError::invalid(
            field,
            format!("must be one of {}", SUPPORTED_LOCALES.join(", ")),
        ))
    }
}

/// A UUID given as a string.
pub fn parse_id(field: &str, value: &str) -> ApiResult<uuid::Uuid> {
    uuid::Uuid::parse_str(value.trim()).map_err(|_| ApiError::invalid(field, "must be a UUID"))
}

/// An optional UUID: empty means none.
pub fn parse_optional_id(field: &str, value: &str) -> ApiResult<Option<uuid::Uuid>> {
    if value.trim().is_empty() {
        Ok(None)
    } else {
        parse_id(field, value).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_bounded_and_free_of_controls() {
        assert_eq!(validate_name("name", "  Ada  ", 200).expect("ok"), "Ada");
        assert!(validate_name("name", "   ", 200).is_err());
        assert!(validate_name("name", &"é".repeat(201), 200).is_err());
        assert!(validate_name("name", &"é".repeat(200), 200).is_ok());
        for bad in ["a\r\nBcc: x", "a\0b", "evil\u{202E}gpj.exe"] {
            let err = validate_name("display_name", bad, 200).expect_err(bad);
            assert!(
                matches!(err, ApiError::InvalidArgument(ref v) if v[0].field == "display_name")
            );
        }
        // Markup is text, not a control character: kept, escaped where shown.
        assert!(validate_name("name", "<b>Ada</b> {{x}}", 200).is_ok());
    }

    #[test]
    fn slugs_follow_the_rule() {
        for ok in ["acme", "acme-co", "a1b", &"a".repeat(63)] {
            assert!(validate_slug("slug", ok).is_ok(), "{ok}");
        }
        for bad in [
            "ab",
            "-acme",
            "acme-",
            "Acme",
            "ac me",
            "acmé",
            &"a".repeat(64),
        ] {
            assert!(validate_slug("slug", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn locales_and_statuses() {
        assert_eq!(
            validate_locale("locale", "FR").expect("ok").as_deref(),
            Some("fr")
        );
        assert_eq!(validate_locale("locale", "").expect("ok"), None);
        assert!(validate_locale("locale", "de").is_err());
        for status in [
            UserStatus::Invited,
            UserStatus::Active,
            UserStatus::Inactive,
        ] {
            assert_eq!(UserStatus::parse(status.as_str()), Some(status));
        }
        assert!(!UserStatus::Inactive.uses_seat());
        assert_eq!(
            admin_permissions(["meter.refill".to_owned(), USERS_READ.to_owned()]).len(),
            CATALOGUE.len() + 1
        );
    }
}
