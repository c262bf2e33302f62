//! Sign-in, sessions and the caller's own profile, as rules: who may sign in
//! (an ACTIVE user whose password verified), what a signed-in user may do
//! before choosing a new password, how failed attempts and reset requests are
//! throttled, and the audit entries and events these cause. Pure: the
//! counters live in Redis and the users in the database; the application
//! layer (`app::auth`) reads them and asks these functions.
//!
//! - **One answer per failure.** Every refusal of a sign-in is
//!   [`invalid_credentials`]; of a session, [`session_not_usable`].
//! - **Throttling.** A counter is keyed by [`throttle_key`] (a hash: no email
//!   in key names); a sign-in is refused once its failures reached the
//!   maximum ([`refuses_attempt`]), a reset request once it is past the
//!   maximum after being counted ([`over_limit`]); both answer
//!   [`rate_limited`] with the window's remaining time.

use chrono::{DateTime, Utc};
use prost_types::FieldMask;
use sha2::{Digest, Sha256};
use usher_kit::{
    error::{ApiError, ApiResult, Reason, Violations},
    principal::{Principal, PrincipalKind},
};
use usher_proto::events::v1 as events;
use uuid::Uuid;

use super::{
    UserStatus,
    effects::{Actor, Audit, Effects},
};

/// Longest account slug.
pub const MAX_SLUG_CHARS: usize = 63;
/// Longest email.
pub const MAX_EMAIL_CHARS: usize = 254;
/// Longest username.
pub const MAX_USERNAME_CHARS: usize = 64;
/// Longest refresh or reset token accepted.
pub const MAX_TOKEN_CHARS: usize = 128;
/// Longest display name.
pub const MAX_DISPLAY_NAME: usize = 200;
/// Longest user agent kept on a session (the store truncates further).
pub const MAX_USER_AGENT_BYTES: usize = 2_048;

/// The one answer to a refused sign-in or current password.
pub fn invalid_credentials() -> ApiError {
    ApiError::rejected(Reason::InvalidCredentials, "the credentials are not valid")
}

/// The one answer to a session whose user can no longer act.
pub fn session_not_usable() -> ApiError {
    ApiError::rejected(Reason::Unauthenticated, "session not usable")
}

/// The answer to a user who must choose a new password before anything else.
pub fn password_change_required() -> ApiError {
    ApiError::rejected(
        Reason::PasswordChangeRequired,
        "choose a new password first",
    )
}

/// RATE_LIMITED, retry after the window's remaining `pttl_ms` (at least 1 s).
pub fn rate_limited(pttl_ms: i64) -> ApiError {
    let after = std::time::Duration::from_millis(u64::try_from(pttl_ms).unwrap_or(0).max(1_000));
    ApiError::retry_later(Reason::RateLimited, "too many attempts, retry later", after)
}

/// `duration` in whole milliseconds.
pub fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Checks a required string of at most `max` characters into `violations`;
/// whether it passed.
pub fn bounded(violations: &mut Violations, field: &str, value: &str, max: usize) -> bool {
    if value.is_empty() {
        violations.add(field, "is required");
        false
    } else if value.chars().count() > max {
        violations.add(field, format!("must be at most {max} characters"));
        false
    } else {
        true
    }
}

// ---------------------------------------------------------------------------
// Throttling

/// The key of the counter `kind` for `subject` (hashed: no email in key
/// names), e.g. `rl:signin:<sha256>`.
pub fn throttle_key(kind: &str, subject: &[&str]) -> String {
    let mut digest = Sha256::new();
    for part in subject {
        digest.update(part.as_bytes());
        digest.update([0]);
    }
    format!("rl:{kind}:{}", hex::encode(digest.finalize()))
}

/// Whether an attempt is refused before it is made: its counter of failures
/// already reached `max`.
pub fn refuses_attempt(failures: u64, max: u32) -> bool {
    failures >= u64::from(max)
}

/// Whether a request, counted as the `count`-th of its window, is past `max`.
pub fn over_limit(count: u64, max: u32) -> bool {
    count > u64::from(max)
}

// ---------------------------------------------------------------------------
// Sign-in

/// Who signs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Login {
    /// The canonical email, or `None` when it does not parse (no user has it).
    Email(Option<String>),
    /// The lower-cased username.
    Username(String),
}

/// A sign-in, validated.
#[derive(Clone, Debug)]
pub struct SignIn {
    /// The account's slug, lower-cased.
    pub slug: String,
    /// Who signs in.
    pub login: Login,
    /// How: `email` or `username` (the audit entry's `login`).
    pub method: &'static str,
    /// The login as throttled: the canonical email, else the lower-cased
    /// text given, or the username.
    pub login_key: String,
    /// The password given.
    pub password: String,
}

impl SignIn {
    /// The key of this sign-in's failure counter: per account and login,
    /// whether they exist or not.
    pub fn throttle_key(&self) -> String {
        throttle_key("signin", &[&self.slug, self.method, &self.login_key])
    }
}

/// The hash a sign-in verified when it may go on: the user is ACTIVE, has a
/// password, and `verified` says the password matched it. `None` is the one
/// INVALID_CREDENTIALS (no such user, wrong password, INVITED, INACTIVE).
pub fn may_sign_in(
    status: UserStatus,
    password_hash: Option<&str>,
    verified: bool,
) -> Option<&str> {
    password_hash.filter(|_| verified && status == UserStatus::Active)
}

/// The actor of a user acting on themselves.
pub fn user_actor(id: Uuid, display_name: &str) -> Actor {
    Actor {
        kind: "user",
        id: id.to_string(),
        name: display_name.to_owned(),
    }
}

/// The audit entry of a successful sign-in of user `id` (named `name`) of
/// `account_id` into `session_id` by `method`.
pub fn signed_in(
    account_id: Uuid,
    id: Uuid,
    name: &str,
    session_id: Uuid,
    method: &str,
) -> Effects {
    let mut effects = Effects::new();
    effects.audit(Audit {
        account_id,
        action: "auth.signed_in",
        target_type: "user",
        target_id: id.to_string(),
        target_name: name.to_owned(),
        details: Some(serde_json::json!({"session_id": session_id.to_string(), "login": method})),
    });
    effects
}

/// The audit entry of a sign-out of user `id` (named `name`) that ended
/// `revoked` sessions (every one of them when `all_sessions`).
pub fn signed_out(
    account_id: Uuid,
    id: Uuid,
    name: &str,
    all_sessions: bool,
    revoked: usize,
) -> Effects {
    let mut effects = Effects::new();
    effects.audit(Audit {
        account_id,
        action: "auth.signed_out",
        target_type: "user",
        target_id: id.to_string(),
        target_name: name.to_owned(),
        details: Some(
            serde_json::json!({"all_sessions": all_sessions, "revoked_sessions": revoked}),
        ),
    });
    effects
}

/// The signed-in user of a MEMBER call: `(account, user, session)`. API keys
/// have no session or password: PERMISSION_DENIED.
pub fn session_caller(principal: &Principal) -> ApiResult<(Uuid, Uuid, Uuid)> {
    if principal.kind != PrincipalKind::User {
        return Err(ApiError::rejected(
            Reason::PermissionDenied,
            "only a signed-in user can do this; API keys have no session or password",
        ));
    }
    let account_id = principal.account()?;
    let user_id = principal.user()?;
    let session_id = principal
        .credential_id
        .as_deref()
        .and_then(|id| Uuid::parse_str(id).ok())
        .ok_or_else(session_not_usable)?;
    Ok((account_id, user_id, session_id))
}

// ---------------------------------------------------------------------------
// The caller's own profile

/// UpdateCurrentUser, validated: the fields of its mask and their new values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProfileUpdate {
    /// The mask's paths, as given.
    pub paths: Vec<String>,
    /// The new display name, when in the mask.
    pub display_name: Option<String>,
    /// The new locale (empty: unset), when in the mask.
    pub locale: Option<String>,
}

/// The caller's profile as it is.
#[derive(Clone, Copy, Debug)]
pub struct Profile<'a> {
    /// The user.
    pub id: Uuid,
    /// Their account.
    pub account_id: Uuid,
    /// Their status.
    pub status: UserStatus,
    /// Whether they must choose a new password first.
    pub password_change_required: bool,
    /// Their display name.
    pub display_name: &'a str,
    /// Their locale (empty: unset).
    pub locale: &'a str,
}

/// What UpdateCurrentUser changes: the new display name and locale, the
/// actor (the user, under their new name) and the `user.updated` audit entry
/// and event.
#[derive(Clone, Debug)]
pub struct ProfileChange {
    /// The display name after the change.
    pub display_name: String,
    /// The locale after the change.
    pub locale: String,
    /// The user, as they are named after the change.
    pub actor: Actor,
    /// The audit entry and event.
    pub effects: Effects,
}

/// Decides an update of the caller's own profile: refused when the user is no
/// longer ACTIVE (the session is not usable) or must choose a new password
/// first.
pub fn update_profile(
    current: &Profile<'_>,
    update: &ProfileUpdate,
    now: DateTime<Utc>,
) -> ApiResult<ProfileChange> {
    if current.status != UserStatus::Active {
        return Err(session_not_usable());
    }
    if current.password_change_required {
        return Err(password_change_required());
    }
    let display_name = update
        .display_name
        .clone()
        .unwrap_or_else(|| current.display_name.to_owned());
    let locale = update
        .locale
        .clone()
        .unwrap_or_else(|| current.locale.to_owned());
    let actor = user_actor(current.id, &display_name);
    let mut effects = Effects::new();
    effects.audit(Audit {
        account_id: current.account_id,
        action: "user.updated",
        target_type: "user",
        target_id: current.id.to_string(),
        target_name: display_name.clone(),
        details: Some(serde_json::json!({
            "fields": update.paths,
            "display_name": {"old": current.display_name, "new": display_name},
            "locale": {"old": current.locale, "new": locale},
        })),
    });
    effects.event(
        "user.updated",
        "UserUpdated",
        current.id.to_string(),
        Some(current.account_id),
        &events::UserUpdated {
            user_id: current.id.to_string(),
            account_id: current.account_id.to_string(),
            actor: Some(actor.to_proto()),
            changed_fields: Some(FieldMask {
                paths: update.paths.clone(),
            }),
            display_name: update.display_name.clone().unwrap_or_default(),
            locale: update.locale.clone().unwrap_or_default(),
            ..Default::default()
        },
        now,
    );
    Ok(ProfileChange {
        display_name,
        locale,
        actor,
        effects,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("time")
    }

    #[test]
    fn only_active_users_with_a_verified_password_sign_in() {
        let hash = Some("$argon2id$x");
        assert_eq!(may_sign_in(UserStatus::Active, hash, true), hash);
        assert_eq!(may_sign_in(UserStatus::Active, hash, false), None);
        assert_eq!(may_sign_in(UserStatus::Active, None, true), None);
        for status in [UserStatus::Invited, UserStatus::Inactive] {
            assert_eq!(may_sign_in(status, hash, true), None, "{status:?}");
        }
    }

    #[test]
    fn throttles_refuse_at_the_maximum_and_count_past_it() {
        assert!(!refuses_attempt(4, 5));
        assert!(refuses_attempt(5, 5));
        assert!(!over_limit(5, 5));
        assert!(over_limit(6, 5));
        let key = throttle_key("signin", &["acme", "email", "ada@acme.example"]);
        assert!(key.starts_with("rl:signin:"));
        assert!(!key.contains("ada"), "no email in key names: {key}");
        assert_ne!(
            key,
            throttle_key("signin", &["acme", "email", "ada@acme.exampl"])
        );
        // Parts are separated: "ab" + "c" is not "a" + "bc".
        assert_ne!(
            throttle_key("x", &["ab", "c"]),
            throttle_key("x", &["a", "bc"])
        );
        let limited = rate_limited(10);
        assert_eq!(limited.reason(), Reason::RateLimited);
        assert_eq!(millis(std::time::Duration::from_secs(2)), 2_000);
    }

    #[test]
    fn bounded_fields_are_required_and_limited() {
        let mut violations = Violations::new();
        assert!(bounded(&mut violations, "a", "ok", 2));
        assert!(!bounded(&mut violations, "b", "", 2));
        assert!(!bounded(&mut violations, "c", "ééé", 2));
        let err = violations.into_result().expect_err("two violations");
        assert!(matches!(err, ApiError::InvalidArgument(ref v) if v.len() == 2));
    }

    #[test]
    fn api_keys_have_no_session() {
        let err = session_caller(&Principal::anonymous()).expect_err("anonymous");
        assert_eq!(err.reason(), Reason::PermissionDenied);
    }

    fn profile(status: UserStatus, password_change_required: bool) -> Profile<'static> {
        Profile {
            id: Uuid::nil(),
            account_id: Uuid::nil(),
            status,
            password_change_required,
            display_name: "Ada",
            locale: "en",
        }
    }

    #[test]
    fn profile_updates_need_an_active_user_with_a_settled_password() {
        let update = ProfileUpdate {
            paths: vec!["display_name".into()],
            display_name: Some("Ada L.".into()),
            locale: None,
        };
        let change =
            update_profile(&profile(UserStatus::Active, false), &update, now()).expect("ok");
        assert_eq!(
            (change.display_name.as_str(), change.locale.as_str()),
            ("Ada L.", "en")
        );
        assert_eq!(change.actor.name, "Ada L.");
        assert_eq!(change.effects.actions(), ["user.updated"]);
        assert_eq!(change.effects.events.len(), 1);
        let details = change.effects.audit[0].details.clone().expect("details");
        assert_eq!(details["display_name"]["old"], "Ada");
        assert_eq!(details["locale"]["new"], "en");

        let err = update_profile(&profile(UserStatus::Inactive, false), &update, now())
            .expect_err("inactive");
        assert_eq!(err.reason(), Reason::Unauthenticated);
        let err = update_profile(&profile(UserStatus::Active, true), &update, now())
            .expect_err("must change password");
        assert_eq!(err.reason(), Reason::PasswordChangeRequired);
    }

    #[test]
    fn sign_in_and_out_are_audited() {
        let id = Uuid::now_v7();
        let signed = signed_in(Uuid::nil(), id, "Ada", id, "username");
        assert_eq!(signed.actions(), ["auth.signed_in"]);
        assert_eq!(
            signed.audit[0].details,
            Some(serde_json::json!({"session_id": id.to_string(), "login": "username"}))
        );
        let out = signed_out(Uuid::nil(), id, "Ada", true, 3);
        assert_eq!(
            out.audit[0].details,
            Some(serde_json::json!({"all_sessions": true, "revoked_sessions": 3}))
        );
        assert!(out.events.is_empty());
    }
}
