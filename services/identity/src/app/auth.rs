//! Sign-in and sessions, the caller's own profile and password, and password
//! links, as load → decide → persist: each function takes a validated
//! command, loads what it needs (`store::auth`, the session store, the
//! Redis counters), asks `domain::auth` or `domain::password_links`, and
//! writes the change with its audit entries, events and emails in one
//! transaction (`store::effects`).
//!
//! - **One answer per failure.** Sign-in answers INVALID_CREDENTIALS for an
//!   unknown account, an unknown user, a wrong password, and an INVITED or
//!   INACTIVE user, and runs an argon2id verification in every case (a dummy
//!   one when there is no hash to check). A reset request answers the same
//!   whether or not the email exists, doing the same work (a token, its hash,
//!   a seal, a transaction) in both cases (`decoy_reset`). A reset token
//!   answers RESET_TOKEN_NOT_USABLE for every cause, and the new password is
//!   hashed before the token is looked at.
//! - **Throttling.** Failed sign-ins are counted per account and login in
//!   Redis (`<prefix>rl:signin:<sha256>`), reset emails per account and email
//!   (`rl:reset:…`) and per user (`rl:reset-user:…`); past the configured
//!   number in the window the answer is RATE_LIMITED with a RetryInfo. Per-IP
//!   limits are the gateway's job: identity never sees the client address.
//! - **Password links.** 256 bits from the OS CSPRNG, stored only as their
//!   keyed hash, hashed for their purpose; the raw token exists only in the
//!   sealed link of the email job (see `usher_kit::seal`) and in the email.
//! - **Sessions.** A sign-in creates a new session; a password change or
//!   reset revokes every session of the user (before the commit, failing
//!   closed, and again after it) and returns a new one.

use anyhow::anyhow;
use chrono::{DateTime, Duration, Utc};
use usher_kit::{
    amqp::email_job_message,
    error::{ApiError, ApiResult, Reason},
    outbox,
    principal::{Principal, PrincipalKind},
    sessions::{IssuedSession, SessionMeta},
    tokens::{Token, TokenPurpose},
};
use usher_proto::{events::v1 as events, notification::v1 as notification};
use uuid::Uuid;

use crate::{
    app::Call,
    domain::{
        auth::{self as rules, ProfileUpdate, SignIn},
        effects::Actor,
        password_links as links,
    },
    state::Identity,
    store::{
        accounts, api_keys,
        auth::{self as store, NamedUser},
        effects,
        entities::{account, user},
        principals,
    },
};

fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(anyhow!("{error}"))
}

// ---------------------------------------------------------------------------
// Throttling

/// RATE_LIMITED when the counter at `key` reached `max`.
async fn refuse_if_throttled(state: &Identity, key: &str, max: u32) -> ApiResult<()> {
    let count = state
        .keys
        .get(key)
        .await?
        .and_then(|value| value.parse::<u64>().ok())
        .unwrap_or(0);
    if rules::refuses_attempt(count, max) {
        let left = state.keys.ttl(key).await?.unwrap_or_default();
        return Err(rules::rate_limited(rules::millis(left)));
    }
    Ok(())
}

/// Adds one to the counter at `key`, which lives `window` from its first
/// hit (a fixed window); returns the count and the milliseconds left.
async fn count_attempt(state: &Identity, key: &str, window: Duration) -> ApiResult<(u64, i64)> {
    let window = window
        .to_std()
        .unwrap_or_default()
        .max(std::time::Duration::from_millis(1));
    let (count, left) = state.keys.add_in_window(key, 1, window).await?;
    Ok((u64::try_from(count).unwrap_or(0), rules::millis(left)))
}

/// Counts one request at `key` and refuses it past `max` in the window.
async fn limit_requests(state: &Identity, key: &str, max: u32, window: Duration) -> ApiResult<()> {
    let (count, pttl) = count_attempt(state, key, window).await?;
    if rules::over_limit(count, max) {
        return Err(rules::rate_limited(pttl));
    }
    Ok(())
}

async fn clear_attempts(state: &Identity, key: &str) -> ApiResult<()> {
    state.keys.delete(vec![key.to_owned()]).await?;
    Ok(())
}

/// A new session of `user_id`, with no password change pending.
async fn new_session(
    state: &Identity,
    account_id: Uuid,
    user_id: Uuid,
    user_agent: Option<String>,
) -> ApiResult<IssuedSession> {
    let meta = SessionMeta {
        client_ip: None,
        user_agent,
        password_change_required: false,
    };
    state.sessions.create(account_id, user_id, meta).await
}

// ---------------------------------------------------------------------------
// Sign-in and sessions

/// A session and its user, as signing in or using a password link answers.
#[derive(Debug)]
pub struct SignedIn {
    /// The new session.
    pub session: IssuedSession,
    /// Its user.
    pub user: NamedUser,
}

/// Signs in: throttled per account and login, one verification whatever is
/// found, a new session recorded with its audit entry if the user is still
/// ACTIVE with that password when it commits.
pub async fn sign_in(
    state: &Identity,
    call: &Call,
    user_agent: Option<String>,
    command: SignIn,
) -> ApiResult<SignedIn> {
    // Throttled per account and login, whether they exist or not.
    let throttle = command.throttle_key();
    let settings = &state.settings;
    refuse_if_throttled(state, &throttle, settings.sign_in_max_failures).await?;

    let found = store::sign_in_user(&state.db, &command.slug, &command.login).await?;
    let password = command.password;
    let verified = match found.as_ref().and_then(|u| u.password_hash.clone()) {
        Some(hash) => state.passwords.verify(password.clone(), &hash).await?,
        None => {
            state.passwords.verify_dummy(password.clone()).await?;
            false
        }
    };
    let stored_hash = found
        .as_ref()
        .and_then(|u| rules::may_sign_in(u.status, u.password_hash.as_deref(), verified))
        .map(str::to_owned);
    let (Some(found), Some(stored_hash)) = (found, stored_hash) else {
        count_attempt(state, &throttle, settings.sign_in_window).await?;
        return Err(rules::invalid_credentials());
    };
    clear_attempts(state, &throttle).await?;
    let new_hash = if state.passwords.needs_rehash(&stored_hash) {
        Some(state.passwords.hash(password).await?)
    } else {
        None
    };

    // The session first, so its id goes into the audit entry; it is
    // revoked again if the user changed meanwhile.
    let meta = SessionMeta {
        client_ip: None,
        user_agent,
        password_change_required: found.password_change_required,
    };
    let issued = state
        .sessions
        .create(found.account_id, found.id, meta)
        .await?;
    match record_sign_in(
        state,
        call,
        &found,
        &stored_hash,
        new_hash,
        &issued,
        command.method,
    )
    .await
    {
        Ok(true) => {}
        outcome => {
            // Deactivated, deleted or given a new password since it was
            // read: no session (nor on a failed commit).
            if let Err(error) = state.sessions.revoke(issued.record.id).await {
                tracing::warn!(%error, session_id = %issued.record.id, "cannot revoke an unused session");
            }
            return match outcome {
                Ok(_) => Err(rules::invalid_credentials()),
                Err(error) => Err(error),
            };
        }
    }
    principals::refresh_user(state, found.id).await?;
    // The user as now stored, with their role's and team's names (one query).
    let user = match store::named_by_id(&state.db, found.account_id, found.id).await? {
        Some(current) => current,
        None => store::named(&state.db, found).await?,
    };
    Ok(SignedIn {
        session: issued,
        user,
    })
}

/// Records a successful sign-in if the user is still ACTIVE with the
/// password just verified; `false` otherwise.
async fn record_sign_in(
    state: &Identity,
    call: &Call,
    found: &user::Model,
    verified_hash: &str,
    new_hash: Option<String>,
    issued: &IssuedSession,
    method: &str,
) -> ApiResult<bool> {
    let now = state.clock.now();
    let txn = usher_kit::db::begin(&state.db).await?;
    if !store::record_sign_in(&txn, found.id, verified_hash, new_hash, now).await? {
        return Ok(false);
    }
    let decided = rules::signed_in(
        found.account_id,
        found.id,
        &found.display_name,
        issued.record.id,
        method,
    );
    let actor = rules::user_actor(found.id, &found.display_name);
    effects::apply(&txn, decided, &actor, &call.request_id, now).await?;
    txn.commit().await?;
    Ok(true)
}

/// Rotates a refresh token; the session ends when its user is no longer
/// ACTIVE in its account. Returns the new session and whether its user must
/// change their password.
pub async fn refresh_session(
    state: &Identity,
    refresh_token: &str,
) -> ApiResult<(IssuedSession, bool)> {
    let issued = state.sessions.refresh(refresh_token).await?;
    let record = &issued.record;
    let current = store::find_user(&state.db, record.user_id).await?;
    let Some(current) = current.filter(|u| {
        u.status == crate::domain::UserStatus::Active && u.account_id == record.account_id
    }) else {
        state.sessions.revoke(record.id).await?;
        return Err(rules::session_not_usable());
    };
    let required = current.password_change_required;
    Ok((issued, required))
}

/// Ends the caller's session (or all of theirs) and records it; how many
/// ended.
pub async fn sign_out(state: &Identity, call: &Call, all_sessions: bool) -> ApiResult<usize> {
    let (account_id, user_id, session_id) = rules::session_caller(&call.principal)?;
    let revoked = if all_sessions {
        state.sessions.revoke_user(user_id).await?
    } else {
        usize::from(state.sessions.revoke(session_id).await?)
    };
    let now = state.clock.now();
    let name = crate::store::users::display_name(&state.db, Some(user_id)).await?;
    let decided = rules::signed_out(account_id, user_id, &name, all_sessions, revoked);
    let actor = Actor::from_principal(&call.principal, name);
    effects::apply(&state.db, decided, &actor, &call.request_id, now).await?;
    Ok(revoked)
}

/// Who the caller is: their account and, for a signed-in user, their
/// profile and session; for an API key, the key.
#[derive(Debug)]
pub struct CurrentUser {
    /// The caller's account.
    pub account: account::Model,
    /// Seats the account uses.
    pub seats_used: u64,
    /// What the caller may do.
    pub permissions: Vec<String>,
    /// The signed-in user.
    pub user: Option<NamedUser>,
    /// The session, for a signed-in user.
    pub session_id: Option<Uuid>,
    /// When the session ends at the latest.
    pub session_expire_time: Option<DateTime<Utc>>,
    /// The API key, for a key.
    pub api_key_id: Option<Uuid>,
}

/// The caller as GetCurrentUser shows them.
pub async fn current_user(state: &Identity, principal: &Principal) -> ApiResult<CurrentUser> {
    let account_id = principal.account()?;
    let db = &state.db;
    let account = accounts::find(db, account_id).await?;
    let seats_used = accounts::seats_used(db, account_id).await?;
    let mut current = CurrentUser {
        account,
        seats_used,
        permissions: Vec::new(),
        user: None,
        session_id: None,
        session_expire_time: None,
        api_key_id: None,
    };
    match principal.kind {
        PrincipalKind::User => {
            let (_, user_id, session_id) = rules::session_caller(principal)?;
            let found = store::find_member(db, account_id, user_id)
                .await?
                .filter(|u| u.status == crate::domain::UserStatus::Active)
                .ok_or_else(rules::session_not_usable)?;
            current.permissions = store::role_permissions(db, found.role_id).await?;
            current.user = Some(store::named(db, found).await?);
            current.session_id = Some(session_id);
            current.session_expire_time = state
                .sessions
                .get(session_id)
                .await?
                .map(|record| record.absolute_expiry);
        }
        PrincipalKind::ApiKey => {
            let key_id = principal
                .credential_id
                .as_deref()
                .and_then(|id| Uuid::parse_str(id).ok())
                .ok_or_else(rules::session_not_usable)?;
            let key = api_keys::find_in_account(db, account_id, key_id)
                .await
                .map_err(|_| rules::session_not_usable())?;
            current.permissions = principal.permissions.clone();
            current.api_key_id = Some(key.id);
        }
        _ => {
            return Err(ApiError::rejected(
                Reason::PermissionDenied,
                "an account member is required",
            ));
        }
    }
    Ok(current)
}

/// Changes the display name and locale of the caller (`(account, user)`,
/// see `domain::auth::session_caller`), with its audit entry and event.
pub async fn update_current_user(
    state: &Identity,
    call: &Call,
    (account_id, user_id): (Uuid, Uuid),
    update: ProfileUpdate,
) -> ApiResult<NamedUser> {
    let now = state.clock.now();
    let txn = usher_kit::db::begin(&state.db).await?;
    let current = store::lock_user(&txn, account_id, user_id)
        .await
        .map_err(|_| rules::session_not_usable())?;
    let change = rules::update_profile(
        &rules::Profile {
            id: current.id,
            account_id,
            status: current.status,
            password_change_required: current.password_change_required,
            display_name: &current.display_name,
            locale: &current.locale,
        },
        &update,
        now,
    )?;
    let updated = store::update_profile(
        &txn,
        &current,
        update.display_name.as_deref(),
        update.locale.as_deref(),
        now,
    )
    .await?;
    effects::apply(&txn, change.effects, &change.actor, &call.request_id, now).await?;
    let view = store::named(&txn, updated).await?;
    txn.commit().await?;
    Ok(view)
}

// ---------------------------------------------------------------------------
// Passwords

/// ChangePassword, validated.
#[derive(Debug)]
pub struct ChangePassword {
    /// The current password given.
    pub current_password: String,
    /// The new password, checked against the policy and normalized.
    pub new_password: String,
}

/// Changes the password of the caller (`(account, user)`) (throttled like
/// sign-ins): every session
/// ends, pending links end, the user is notified, and a new session is
/// returned.
pub async fn change_password(
    state: &Identity,
    call: &Call,
    (account_id, user_id): (Uuid, Uuid),
    user_agent: Option<String>,
    command: ChangePassword,
) -> ApiResult<IssuedSession> {
    let settings = &state.settings;
    let throttle = rules::throttle_key("chpw", &[&user_id.to_string()]);
    refuse_if_throttled(state, &throttle, settings.sign_in_max_failures).await?;
    let db = &state.db;
    let current = store::find_member(db, account_id, user_id)
        .await?
        .filter(|u| u.status == crate::domain::UserStatus::Active)
        .ok_or_else(rules::session_not_usable)?;
    let verified = match current.password_hash.as_deref() {
        Some(hash) => {
            state
                .passwords
                .verify(command.current_password, hash)
                .await?
        }
        None => {
            state
                .passwords
                .verify_dummy(command.current_password)
                .await?;
            false
        }
    };
    let (true, Some(old_hash)) = (verified, current.password_hash.clone()) else {
        count_attempt(state, &throttle, settings.sign_in_window).await?;
        return Err(rules::invalid_credentials());
    };
    clear_attempts(state, &throttle).await?;
    let new_hash = state.passwords.hash(command.new_password).await?;

    let now = state.clock.now();
    let account = accounts::find(db, account_id).await?;
    // Every session ends before the commit (if the store is down, the
    // password does not change), and again after it.
    state.sessions.revoke_user(user_id).await?;
    let txn = usher_kit::db::begin(&state.db).await?;
    if !store::replace_password(&txn, user_id, &old_hash, new_hash, now).await? {
        // Changed concurrently: the current password given is no longer it.
        return Err(rules::invalid_credentials());
    }
    store::expire_links(&txn, user_id, now).await?;
    let actor = rules::user_actor(current.id, &current.display_name);
    let decided = links::password_changed(
        &account,
        &current,
        &actor,
        events::PasswordChangeMethod::Change,
        &call.request_id,
        now,
    );
    effects::apply(&txn, decided, &actor, &call.request_id, now).await?;
    txn.commit().await?;
    state.sessions.revoke_user(user_id).await?;
    let issued = new_session(state, account_id, user_id, user_agent).await?;
    principals::refresh_user(state, user_id).await?;
    Ok(issued)
}

/// RequestPasswordReset, validated.
#[derive(Debug)]
pub struct ResetRequest {
    /// The account's slug, lower-cased.
    pub slug: String,
    /// The email as given (trimmed).
    pub email: String,
    /// Its canonical form, `None` when it does not parse (nobody has it).
    pub canonical: Option<String>,
    /// The locale of the request (empty: the user's, else the account's).
    pub locale: String,
}

/// Sends a reset link to an ACTIVE user with that email, or does the same
/// work for nothing: the caller cannot tell which.
pub async fn request_password_reset(
    state: &Identity,
    call: &Call,
    request: ResetRequest,
) -> ApiResult<()> {
    let login_key = request
        .canonical
        .clone()
        .unwrap_or_else(|| request.email.to_lowercase());
    let settings = &state.settings;
    let throttle = rules::throttle_key("reset", &[&request.slug, &login_key]);
    limit_requests(
        state,
        &throttle,
        settings.reset_max_requests,
        settings.reset_window,
    )
    .await?;

    let db = &state.db;
    let account = store::account_by_slug(db, &request.slug).await?;
    let target = match (&account, &request.canonical) {
        (Some(account), Some(canonical)) => store::user_by_email(db, account.id, canonical)
            .await?
            .filter(|u| u.status == crate::domain::UserStatus::Active),
        _ => None,
    };
    match (account, target) {
        (Some(account), Some(target)) => {
            let actor = links::link_actor(&target);
            issue_reset(
                state,
                call,
                &account,
                &target,
                &request.locale,
                &actor,
                "user.password_reset_requested",
            )
            .await?;
        }
        _ => decoy_reset(state).await?,
    }
    Ok(())
}

/// Issues a reset link to `target` (ACTIVE, with an email): a new token
/// whose hash is stored, every earlier pending link of the user ended,
/// and a PASSWORD_RESET email job with the sealed link, in one
/// transaction.
async fn issue_reset(
    state: &Identity,
    call: &Call,
    account: &account::Model,
    target: &user::Model,
    locale: &str,
    actor: &Actor,
    action: &'static str,
) -> ApiResult<()> {
    let token = Token::try_generate().map_err(internal)?;
    let token_hash = state
        .tokens
        .hash(TokenPurpose::PasswordReset, token.as_str());
    let now = state.clock.now();
    let expire_time = now + state.settings.reset_token_lifetime;
    let job = password_link_job(
        state,
        notification::EmailTemplate::PasswordReset,
        "/reset",
        (account, target),
        (locale, &call.request_id),
        &token,
        (now, expire_time),
    )?;

    let txn = usher_kit::db::begin(&state.db).await?;
    store::expire_links(&txn, target.id, now).await?;
    store::insert_link(&txn, account.id, target.id, token_hash, expire_time, now).await?;
    let decided = links::issued(account, target, action, &job, expire_time);
    effects::apply(&txn, decided, actor, &call.request_id, now).await?;
    txn.commit().await?;
    Ok(())
}

/// The email job of a password link (reset or set-password) to
/// `target`: the link to the gateway's `path` page with `token`, in the
/// job's locale, sealed for the notification service, and when it
/// expires. `locale` overrides the user's (empty: theirs, else the
/// account's).
fn password_link_job(
    state: &Identity,
    template: notification::EmailTemplate,
    path: &str,
    (account, target): (&account::Model, &user::Model),
    (locale, request_id): (&str, &str),
    token: &Token,
    (now, expire_time): (DateTime<Utc>, DateTime<Utc>),
) -> ApiResult<notification::EmailJob> {
    let mut job = links::email_job(template, account, target, locale, request_id, now);
    let link = links::page_link(
        &state.settings.public_base_url,
        path,
        token,
        links::link_locale(&job),
    );
    job.sealed_link = state
        .sealer
        .try_seal(&job.job_id, &link)
        .map_err(internal)?;
    job.seal_key_id = state.sealer.key_id().to_owned();
    if let Some(variables) = job.variables.as_mut() {
        variables.expire_time = Some(usher_kit::convert::timestamp(expire_time));
    }
    Ok(job)
}

/// Queues, in the caller's transaction, the "choose your password" email
/// of `target` (just created with an email and no password): a new
/// set-password token whose hash is stored with the reset lifetime, and a
/// SET_PASSWORD email job with the sealed link to the gateway's
/// `/set-password` page in the user's locale. Returns when the link
/// expires.
pub async fn queue_set_password_link(
    state: &Identity,
    txn: &sea_orm::DatabaseTransaction,
    account: &account::Model,
    target: &user::Model,
    request_id: &str,
    now: DateTime<Utc>,
) -> ApiResult<DateTime<Utc>> {
    let token = Token::try_generate().map_err(internal)?;
    let token_hash = state.tokens.hash(TokenPurpose::SetPassword, token.as_str());
    let expire_time = now + state.settings.reset_token_lifetime;
    let job = password_link_job(
        state,
        notification::EmailTemplate::SetPassword,
        "/set-password",
        (account, target),
        ("", request_id),
        &token,
        (now, expire_time),
    )?;
    store::insert_link(txn, account.id, target.id, token_hash, expire_time, now).await?;
    outbox::enqueue(txn, &[email_job_message(&job)]).await?;
    Ok(expire_time)
}

/// What [`issue_reset`] costs, without its effects: a token, its hash, a
/// seal and a transaction that changes nothing, so a request for an unknown
/// email takes about as long as one for a known email.
async fn decoy_reset(state: &Identity) -> ApiResult<()> {
    let token = Token::try_generate().map_err(internal)?;
    let _hash = state
        .tokens
        .hash(TokenPurpose::PasswordReset, token.as_str());
    let job_id = Uuid::new_v4().to_string();
    let link = links::page_link(&state.settings.public_base_url, "/reset", &token, "en");
    let sealed = state.sealer.try_seal(&job_id, &link).map_err(internal)?;
    let decoy = notification::EmailJob {
        job_id,
        sealed_link: sealed,
        ..Default::default()
    };
    // The writes of a real request, rolled back: nothing is kept or
    // published (a NOTIFY is only delivered at commit).
    let txn = usher_kit::db::begin(&state.db).await?;
    store::expire_links(&txn, Uuid::new_v4(), state.clock.now()).await?;
    outbox::enqueue(&txn, &[email_job_message(&decoy)]).await?;
    txn.rollback().await?;
    Ok(())
}

/// ResetPassword or SetPassword, validated.
#[derive(Debug)]
pub struct UseLink {
    /// The token of the link.
    pub token: String,
    /// The new password, checked against the policy and normalized.
    pub new_password: String,
    /// Which kind of link it must be.
    pub purpose: TokenPurpose,
}

/// Consumes a reset link (`PasswordReset`) or a set-password link
/// (`SetPassword`): the token is hashed for that purpose only, so a link
/// of one kind never works as the other. Sets the password, ends
/// every session and every other pending link of the user, notifies
/// and returns a new session.
pub async fn use_password_link(
    state: &Identity,
    call: &Call,
    user_agent: Option<String>,
    command: UseLink,
) -> ApiResult<SignedIn> {
    let method = links::method_of(command.purpose);
    // Hashed before the token is looked at: every answer costs one argon2id
    // run, and a failed hash never burns the link.
    let new_hash = state.passwords.hash(command.new_password).await?;
    let token_hash = state.tokens.hash(command.purpose, &command.token);

    let now = state.clock.now();
    let txn = usher_kit::db::begin(&state.db).await?;
    // The guard: one conditional update, one winner.
    let reset = store::consume_link(&txn, &token_hash, now)
        .await?
        .ok_or_else(links::reset_not_usable)?;
    let target = match store::lock_user(&txn, reset.account_id, reset.user_id).await {
        Ok(target) if target.status == crate::domain::UserStatus::Active => target,
        Ok(_) | Err(usher_kit::db::StoreError::NotFound(_)) => {
            // The link is spent all the same: a reactivated user asks anew.
            txn.commit().await?;
            return Err(links::reset_not_usable());
        }
        Err(error) => return Err(error.into()),
    };
    let account = accounts::find(&txn, reset.account_id).await?;
    state.sessions.revoke_user(target.id).await?;
    let updated = store::set_password(&txn, &target, new_hash, now).await?;
    store::expire_links(&txn, target.id, now).await?;
    let actor = links::link_actor(&target);
    let decided = links::password_changed(&account, &target, &actor, method, &call.request_id, now);
    effects::apply(&txn, decided, &actor, &call.request_id, now).await?;
    let view = store::named(&txn, updated).await?;
    txn.commit().await?;
    state.sessions.revoke_user(target.id).await?;
    let issued = new_session(state, account.id, target.id, user_agent).await?;
    principals::refresh_user(state, target.id).await?;
    Ok(SignedIn {
        session: issued,
        user: view,
    })
}

/// Sends a reset link to a user of the caller's account (an admin's
/// UserService.SendPasswordReset): NOT_FOUND for an unknown user or one
/// of another account, INVALID_STATE unless ACTIVE with an email,
/// RATE_LIMITED past the per-user limit. Returns the email it went to.
pub async fn send_password_reset(
    state: &Identity,
    call: &Call,
    user_id: Uuid,
) -> ApiResult<String> {
    let account_id = call.principal.account()?;
    let db = &state.db;
    let target = store::find_member(db, account_id, user_id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    let Some(email) = target
        .email_canonical
        .clone()
        .filter(|_| target.status == crate::domain::UserStatus::Active)
    else {
        return Err(ApiError::rejected(
            Reason::InvalidState,
            "the user is not active or has no email",
        ));
    };
    let settings = &state.settings;
    let throttle = rules::throttle_key("reset-user", &[&user_id.to_string()]);
    limit_requests(
        state,
        &throttle,
        settings.reset_max_requests,
        settings.reset_window,
    )
    .await?;
    let account = accounts::find(db, account_id).await?;
    let name = crate::store::users::display_name(db, call.principal.user_id).await?;
    let actor = Actor::from_principal(&call.principal, name);
    issue_reset(
        state,
        call,
        &account,
        &target,
        "",
        &actor,
        "user.password_reset_sent",
    )
    .await?;
    Ok(email)
}

/// PASSWORD_CHANGE_REQUIRED for a signed-in user who must change their
/// password first (API keys have no password).
pub async fn require_settled_password(state: &Identity, principal: &Principal) -> ApiResult<()> {
    if principal.kind != PrincipalKind::User {
        return Ok(());
    }
    if store::password_change_required(&state.db, principal.user()?).await? {
        return Err(rules::password_change_required());
    }
    Ok(())
}
