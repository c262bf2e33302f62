//! Password links: the reset link a user asks for (or an admin sends), and
//! the set-password link of a user created with an email and no password.
//! Pure rules and what they cause:
//!
//! - **Purpose.** A token is hashed for its purpose
//!   (`TokenPurpose::PasswordReset` or `TokenPurpose::SetPassword`), so a link
//!   of one kind never works as the other; [`method_of`] names the change each
//!   causes.
//! - **Expiry and single use.** A link is usable until its expiry and until
//!   used ([`usable_at`]); PostgreSQL is the guard (one conditional
//!   `UPDATE … WHERE use_time IS NULL AND expire_time > now`, the SQL twin
//!   of [`usable_at`] in `store::auth::consume_link`), so exactly one of any
//!   number of concurrent uses wins. A spent link whose user is no longer
//!   ACTIVE stays spent ([`reset_not_usable`] for every cause).
//! - **Emails.** [`email_job`] and [`page_link`] build the email job and its
//!   link; [`issued`] and [`password_changed`] the audit entries, events and
//!   emails a new link and a new password cause.

use chrono::{DateTime, Utc};
use usher_kit::{amqp::email_job_message, error::ApiError, error::Reason, tokens::Token};
use usher_proto::{events::v1 as events, notification::v1 as notification};
use uuid::Uuid;

use super::effects::{Actor, Audit, Effects};
use crate::store::entities::{account, password_reset, user};

/// The one answer to a reset or set-password token that cannot be used
/// (unknown, used, expired, of the other kind, or of a user no longer ACTIVE).
pub fn reset_not_usable() -> ApiError {
    ApiError::rejected(
        Reason::ResetTokenNotUsable,
        "this password reset link cannot be used; ask for a new one",
    )
}

/// Whether `link` can be used at `now`: not used, not expired (what the
/// store's conditional update checks).
pub fn usable_at(link: &password_reset::Model, now: DateTime<Utc>) -> bool {
    link.use_time.is_none() && link.expire_time > now
}

/// The way a password changes when a link of `purpose` is used.
pub fn method_of(purpose: usher_kit::tokens::TokenPurpose) -> events::PasswordChangeMethod {
    if purpose == usher_kit::tokens::TokenPurpose::SetPassword {
        events::PasswordChangeMethod::SetLink
    } else {
        events::PasswordChangeMethod::Reset
    }
}

/// The actor of someone holding a password link: anonymous, naming the user.
pub fn link_actor(target: &user::Model) -> Actor {
    Actor {
        kind: "anonymous",
        id: target.id.to_string(),
        name: target.display_name.clone(),
    }
}

/// The common fields of an email job to `recipient` of `account`: in the
/// recipient's locale, else `locale` (the request's).
pub fn email_job(
    template: notification::EmailTemplate,
    account: &account::Model,
    recipient: &user::Model,
    locale: &str,
    request_id: &str,
    now: DateTime<Utc>,
) -> notification::EmailJob {
    notification::EmailJob {
        job_id: Uuid::new_v4().to_string(),
        account_id: account.id.to_string(),
        template: template as i32,
        recipient_email: recipient.email_canonical.clone().unwrap_or_default(),
        recipient_name: recipient.display_name.clone(),
        locale: if recipient.locale.is_empty() {
            locale.to_owned()
        } else {
            recipient.locale.clone()
        },
        account_default_locale: account.default_locale.clone(),
        variables: Some(notification::EmailVariables {
            account_name: account.name.clone(),
            ..Default::default()
        }),
        sealed_link: Vec::new(),
        seal_key_id: String::new(),
        source: notification::EmailSource::Identity as i32,
        invitation_id: String::new(),
        user_id: recipient.id.to_string(),
        token_version: 0,
        create_time: Some(usher_kit::convert::timestamp(now)),
        request_id: request_id.to_owned(),
    }
}

/// The locale a link opens its page in: the job's (the user's or the
/// request's), else the account's default; empty when neither is set.
pub fn link_locale(job: &notification::EmailJob) -> &str {
    if job.locale.is_empty() {
        &job.account_default_locale
    } else {
        &job.locale
    }
}

/// A link to the gateway page `path` carrying `token`, and the locale the
/// page opens in (after its own language switch, before the browser's).
pub fn page_link(base: &str, path: &str, token: &Token, locale: &str) -> String {
    if locale.is_empty() {
        format!("{base}{path}?token={}", token.as_str())
    } else {
        format!("{base}{path}?token={}&locale={locale}", token.as_str())
    }
}

/// What issuing a reset link to `target` causes: the email `job` (with its
/// sealed link) and the audit entry `action` (`user.password_reset_requested`
/// or `user.password_reset_sent`) saying when the link expires.
pub fn issued(
    account: &account::Model,
    target: &user::Model,
    action: &'static str,
    job: &notification::EmailJob,
    expire_time: DateTime<Utc>,
) -> Effects {
    let mut effects = Effects::new();
    effects.events.push(email_job_message(job));
    effects.audit(Audit {
        account_id: account.id,
        action,
        target_type: "user",
        target_id: target.id.to_string(),
        target_name: target.display_name.clone(),
        details: Some(serde_json::json!({"expire_time": expire_time})),
    });
    effects
}

/// What a new password of `target` causes: the "password changed" email
/// (when the user has an email), the `user.password_changed` event and its
/// audit entry, naming `method`.
pub fn password_changed(
    account: &account::Model,
    target: &user::Model,
    actor: &Actor,
    method: events::PasswordChangeMethod,
    request_id: &str,
    now: DateTime<Utc>,
) -> Effects {
    let method_name = match method {
        events::PasswordChangeMethod::Reset => "reset",
        events::PasswordChangeMethod::SetLink => "set_link",
        _ => "change",
    };
    let mut effects = Effects::new();
    if target.email_canonical.is_some() {
        let mut job = email_job(
            notification::EmailTemplate::PasswordChanged,
            account,
            target,
            "",
            request_id,
            now,
        );
        if let Some(variables) = job.variables.as_mut() {
            variables.event_time = Some(usher_kit::convert::timestamp(now));
        }
        effects.events.push(email_job_message(&job));
    }
    effects.event(
        "user.password_changed",
        "PasswordChanged",
        target.id.to_string(),
        Some(account.id),
        &events::PasswordChanged {
            user_id: target.id.to_string(),
            account_id: account.id.to_string(),
            actor: Some(actor.to_proto()),
            method: method as i32,
        },
        now,
    );
    effects.audit(Audit {
        account_id: account.id,
        action: "user.password_changed",
        target_type: "user",
        target_id: target.id.to_string(),
        target_name: target.display_name.clone(),
        details: Some(serde_json::json!({ "method": method_name })),
    });
    effects
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use usher_kit::tokens::TokenPurpose;

    use super::*;
    use crate::domain::{Origin, UserStatus};

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("time")
    }

    fn account() -> account::Model {
        account::Model {
            id: Uuid::nil(),
            name: "Acme".into(),
            slug: "acme".into(),
            default_locale: "fr".into(),
            owner_user_id: None,
            seat_limit: 10,
            products: serde_json::json!([]),
            allowed_email_domains: serde_json::json!([]),
            invitation_lifetime_secs: None,
            create_time: now(),
            update_time: now(),
        }
    }

    fn user(email: Option<&str>, locale: &str) -> user::Model {
        user::Model {
            id: Uuid::now_v7(),
            account_id: Uuid::nil(),
            email: email.map(str::to_owned),
            email_canonical: email.map(str::to_owned),
            username: None,
            display_name: "Ada".into(),
            password_hash: None,
            status: UserStatus::Active,
            role_id: Uuid::nil(),
            team_id: None,
            products: serde_json::json!([]),
            locale: locale.into(),
            metadata: None,
            owner: false,
            origin: Origin::Direct,
            password_change_required: false,
            invitation_id: None,
            invited_by: None,
            search_text: String::new(),
            create_time: now(),
            update_time: now(),
            activate_time: None,
            deactivate_time: None,
            last_sign_in_time: None,
        }
    }

    #[test]
    fn links_are_usable_once_and_until_they_expire() {
        let link = password_reset::Model {
            id: Uuid::nil(),
            account_id: Uuid::nil(),
            user_id: Uuid::nil(),
            token_hash: "h".into(),
            expire_time: now() + Duration::hours(1),
            use_time: None,
            create_time: now(),
        };
        assert!(usable_at(&link, now()));
        assert!(!usable_at(&link, now() + Duration::hours(1)));
        let used = password_reset::Model {
            use_time: Some(now()),
            ..link
        };
        assert!(!usable_at(&used, now()));
        assert_eq!(
            method_of(TokenPurpose::SetPassword),
            events::PasswordChangeMethod::SetLink
        );
        assert_eq!(
            method_of(TokenPurpose::PasswordReset),
            events::PasswordChangeMethod::Reset
        );
        assert_eq!(reset_not_usable().reason(), Reason::ResetTokenNotUsable);
    }

    #[test]
    fn jobs_speak_the_users_language_else_the_requests_else_the_accounts() {
        let account = account();
        let template = notification::EmailTemplate::PasswordReset;
        let job = email_job(
            template,
            &account,
            &user(Some("a@x.example"), "en"),
            "fr",
            "r",
            now(),
        );
        assert_eq!((job.locale.as_str(), link_locale(&job)), ("en", "en"));
        let job = email_job(
            template,
            &account,
            &user(Some("a@x.example"), ""),
            "",
            "r",
            now(),
        );
        assert_eq!((job.locale.as_str(), link_locale(&job)), ("", "fr"));
        let token = Token::try_generate().expect("token");
        let link = page_link("https://u.example", "/reset", &token, "");
        assert_eq!(
            link,
            format!("https://u.example/reset?token={}", token.as_str())
        );
        let link = page_link("https://u.example", "/reset", &token, "fr");
        assert!(link.ends_with("&locale=fr"), "{link}");
    }

    #[test]
    fn a_new_password_notifies_only_users_with_an_email() {
        let account = account();
        let actor = link_actor(&user(None, ""));
        assert_eq!(actor.kind, "anonymous");
        let with_email = user(Some("a@x.example"), "");
        let effects = password_changed(
            &account,
            &with_email,
            &actor,
            events::PasswordChangeMethod::SetLink,
            "r",
            now(),
        );
        assert_eq!(effects.actions(), ["user.password_changed"]);
        assert_eq!(effects.events.len(), 2, "the email, then the event");
        assert_eq!(
            effects.audit[0].details,
            Some(serde_json::json!({"method": "set_link"}))
        );
        let without = password_changed(
            &account,
            &user(None, ""),
            &actor,
            events::PasswordChangeMethod::Change,
            "r",
            now(),
        );
        assert_eq!(without.events.len(), 1, "the event only");
        assert_eq!(
            without.audit[0].details,
            Some(serde_json::json!({"method": "change"}))
        );
    }

    #[test]
    fn an_issued_link_queues_its_email_and_says_when_it_expires() {
        let account = account();
        let target = user(Some("a@x.example"), "");
        let job = email_job(
            notification::EmailTemplate::PasswordReset,
            &account,
            &target,
            "",
            "r",
            now(),
        );
        let at = now() + Duration::hours(1);
        let effects = issued(&account, &target, "user.password_reset_sent", &job, at);
        assert_eq!(effects.actions(), ["user.password_reset_sent"]);
        assert_eq!(effects.events.len(), 1);
        assert_eq!(
            effects.audit[0].details,
            Some(serde_json::json!({"expire_time": at}))
        );
    }
}
