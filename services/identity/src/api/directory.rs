//! DirectoryService: what the invitation service needs from identity —
//! the context of an invitation, seat reservations for invitees, activation
//! of an invited user on acceptance, releasing invitees, and the session of a
//! member who just joined.
//!
//! Every RPC is INTERNAL: the guard admits only a verified service assertion,
//! and each handler checks again that the caller is a service, because these
//! RPCs take the account from `account_id` (the invitation service got it
//! from its own caller's verified principal). Ids of another account answer
//! the same NOT_FOUND as unknown ones (P14).
//!
//! Seats: ReserveInvitees and ReleaseInvitees run in one transaction that
//! first locks the account row (`accounts::lock`), like every other change
//! that counts seats, so two concurrent reservations are counted one after the
//! other and never exceed the limit. The lookups and writes of a reservation
//! are batched: one query for the existing users of all invitees, one
//! multi-row insert each for the users, their audit entries and their events.
//!
//! Activation hashes the password before opening the transaction (argon2id
//! takes tens of milliseconds and must not hold locks), then moves the user
//! from INVITED to ACTIVE with one conditional update; the loser of a race, or
//! a retry after a crash, re-reads the user and answers `already_activated`.

use std::collections::{HashMap, HashSet};

use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QuerySelect, Set,
    TransactionTrait, sea_query::Expr,
};
use serde_json::json;
use tonic::{Request, Response, Status};
use unicode_normalization::UnicodeNormalization;
use usher_kit::{
    email::{EmailAddress, canonical_domain},
    error::{ApiError, ApiResult, Reason, Violations},
    events::DomainEvent,
    outbox,
    principal::{Principal, PrincipalKind},
    sessions::SessionMeta,
};
use usher_proto::{events::v1 as events, identity::v1 as pb};
use uuid::Uuid;

use super::{
    Call, IdentityApi, call, convert, internal, status,
    validate::{require_enabled, validate_metadata, validate_products},
};
use crate::{
    domain::{
        Origin, USERS_MANAGE, UserStatus,
        grants::{self, Grant, Grantor},
        parse_id, parse_optional_id, validate_locale, validate_name,
    },
    store::{
        accounts,
        audit::{self, Actor, AuditEntry},
        entities::{account, api_key, audit_event, role, team, user},
        events::emit,
        principals, scoped,
    },
};

/// Most invitees in one ReserveInvitees call.
const MAX_INVITEES: usize = 1_000;
/// Most targets in one ReleaseInvitees call.
const MAX_TARGETS: usize = 1_000;
/// Longest display name.
const MAX_DISPLAY_NAME: usize = 200;
/// Longest actor id or name kept from a request, for the audit log.
const MAX_ACTOR_CHARS: usize = 200;

// ---------------------------------------------------------------------------
// Validation

/// Refuses anyone but an Usher service. The guard already does for INTERNAL
/// RPCs; checked again here because these handlers trust `account_id`.
fn require_service(principal: &Principal) -> ApiResult<()> {
    if principal.kind == PrincipalKind::Service {
        Ok(())
    } else {
        Err(ApiError::rejected(
            Reason::PermissionDenied,
            "only Usher services may call the directory",
        ))
    }
}

/// A display name: trimmed, 1..=200 characters, no control characters, NFC.
fn display_name(field: &str, value: &str) -> ApiResult<String> {
    validate_name(field, value, MAX_DISPLAY_NAME).map(|name| name.nfc().collect())
}

/// An optional display name: empty stays empty.
fn optional_display_name(field: &str, value: &str) -> ApiResult<String> {
    if value.trim().is_empty() {
        Ok(String::new())
    } else {
        display_name(field, value)
    }
}

/// The actor of the audit log and events: the one the calling service names
/// (the inviter, the admin who revoked, the anonymous invitee who declined),
/// or the calling service itself when it names none.
fn actor_of(given: Option<&pb::Actor>, principal: &Principal) -> Actor {
    let calling_service = || {
        let name = principal.service.clone().unwrap_or_default();
        Actor::from_principal(principal, name)
    };
    let Some(given) = given else {
        return calling_service();
    };
    let kind = match pb::ActorKind::try_from(given.kind) {
        Ok(pb::ActorKind::User) => "user",
        Ok(pb::ActorKind::ApiKey) => "api_key",
        Ok(pb::ActorKind::Platform) => "platform",
        Ok(pb::ActorKind::Anonymous) => "anonymous",
        Ok(pb::ActorKind::System) => "system",
        Ok(pb::ActorKind::Unspecified) | Err(_) => return calling_service(),
    };
    Actor {
        kind,
        id: given.id.chars().take(MAX_ACTOR_CHARS).collect(),
        name: given
            .display_name
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_ACTOR_CHARS)
            .collect(),
    }
}

/// What the inviter holds now (P26), read by the store: nothing for no
/// inviter, a malformed id or another kind of actor.
async fn inviter_permissions<C: ConnectionTrait>(
    db: &C,
    account: &account::Model,
    inviter: Option<&pb::Actor>,
    now: chrono::DateTime<chrono::Utc>,
) -> ApiResult<Vec<String>> {
    let holder = inviter.and_then(|actor| {
        let id = Uuid::parse_str(actor.id.trim()).ok()?;
        match pb::ActorKind::try_from(actor.kind) {
            Ok(pb::ActorKind::User) => Some(accounts::Holder::User(id)),
            Ok(pb::ActorKind::ApiKey) => Some(accounts::Holder::ApiKey(id)),
            _ => None,
        }
    });
    match holder {
        Some(holder) => accounts::held_permissions(db, account, holder, now).await,
        None => Ok(Vec::new()),
    }
}

/// The release reason as recorded in the audit log.
fn reason_name(reason: i32) -> &'static str {
    match internal::ReleaseReason::try_from(reason) {
        Ok(internal::ReleaseReason::Revoked) => "revoked",
        Ok(internal::ReleaseReason::Deleted) => "deleted",
        Ok(internal::ReleaseReason::Declined) => "declined",
        Ok(internal::ReleaseReason::Rollback) => "rollback",
        Ok(internal::ReleaseReason::Unspecified) | Err(_) => "unspecified",
    }
}

fn seats(count: u64) -> i32 {
    i32::try_from(count).unwrap_or(i32::MAX)
}

fn invalid_state(message: &str) -> ApiError {
    ApiError::rejected(Reason::InvalidState, message)
}

// ---------------------------------------------------------------------------
// Store access (always scoped to one account)

/// The account, share-locked until the end of the transaction: changes of
/// its subscription (which strip disabled products from every user under
/// `accounts::lock`) wait, and so does this reader, but two activations do
/// not wait for each other.
async fn share_account<C: ConnectionTrait>(db: &C, id: Uuid) -> ApiResult<account::Model> {
    let query = account::Entity::find_by_id(id);
    let query = if db.get_database_backend() == DbBackend::Postgres {
        query.lock_shared()
    } else {
        query
    };
    query
        .one(db)
        .await?
        .ok_or_else(|| ApiError::not_found("account"))
}

/// A user as the API shows it, with the names of its role and team.
async fn user_view<C: ConnectionTrait>(db: &C, model: &user::Model) -> ApiResult<pb::User> {
    let role_name: Option<String> = role::Entity::find_by_id(model.role_id)
        .select_only()
        .column(role::Column::Name)
        .into_tuple()
        .one(db)
        .await?;
    let team_name: Option<String> = match model.team_id {
        Some(team_id) => {
            team::Entity::find_by_id(team_id)
                .select_only()
                .column(team::Column::Name)
                .into_tuple()
                .one(db)
                .await?
        }
        None => None,
    };
    Ok(convert::user(
        model,
        role_name.as_deref().unwrap_or_default(),
        team_name.as_deref(),
    ))
}

// ---------------------------------------------------------------------------
// Handlers

/// One invitee of a reservation, validated.
struct Invitee {
    email: EmailAddress,
    display_name: String,
    invitation_id: Uuid,
}

/// One target of a release, validated.
enum ReleaseKey {
    Id(Uuid),
    Email(String),
}

impl IdentityApi {
    async fn inner_get_invitation_context(
        &self,
        call: Call,
        request: internal::GetInvitationContextRequest,
    ) -> ApiResult<internal::GetInvitationContextResponse> {
        require_service(&call.principal)?;
        let mut violations = Violations::new();
        let account_id = parse_id("account_id", &request.account_id)
            .map_err(|e| violations.absorb(e))
            .ok();
        let role_id = parse_optional_id("role_id", &request.role_id)
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        let team_id = parse_optional_id("team_id", &request.team_id)
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        let inviter = match request.inviter.as_ref() {
            None => None,
            Some(actor) => match pb::ActorKind::try_from(actor.kind) {
                Ok(pb::ActorKind::Unspecified) if actor.id.is_empty() => None,
                Ok(kind @ (pb::ActorKind::User | pb::ActorKind::ApiKey)) => {
                    parse_id("inviter.id", &actor.id)
                        .map_err(|e| violations.absorb(e))
                        .ok()
                        .map(|id| (kind, id))
                }
                _ => {
                    violations.add("inviter.kind", "must be USER or API_KEY");
                    None
                }
            },
        };
        violations.into_result()?;
        let Some(account_id) = account_id else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "validated fields missing"
            )));
        };

        let db = &self.state.db;
        let account = accounts::find(db, account_id).await?;
        let policy = &self.state.password_policy;
        let mut response = internal::GetInvitationContextResponse {
            password_policy: Some(pb::PasswordPolicy {
                min_length: i32::try_from(policy.min_length()).unwrap_or(i32::MAX),
                max_length: i32::try_from(policy.max_length()).unwrap_or(i32::MAX),
            }),
            ..Default::default()
        };
        match inviter {
            Some((pb::ActorKind::User, id)) => {
                let inviter = scoped::user(db, account_id, id).await?;
                response.inviter_email = inviter
                    .email
                    .clone()
                    .or_else(|| inviter.email_canonical.clone())
                    .unwrap_or_default();
                response.inviter_active = inviter.status == UserStatus::Active;
                response.inviter_display_name = inviter.display_name;
                response.inviter_locale = inviter.locale;
            }
            Some((_, id)) => {
                let key = api_key::Entity::find_by_id(id)
                    .filter(api_key::Column::AccountId.eq(account_id))
                    .one(db)
                    .await?
                    .ok_or_else(|| ApiError::not_found("inviter"))?;
                let now = self.state.clock.now();
                response.inviter_active =
                    key.revoke_time.is_none() && key.expire_time.is_none_or(|at| at > now);
                response.inviter_display_name = key.name;
            }
            None => {}
        }
        if let Some(role_id) = role_id {
            let role = scoped::role(db, account_id, role_id).await?;
            response.role_manages_users = convert::strings(&role.permissions)
                .iter()
                .any(|p| p == USERS_MANAGE);
            if inviter.is_some() {
                // The rule of ReserveInvitees (P26), for callers that hand the
                // role out again (ResendInvitations).
                let granted = accounts::effective_permissions(db, &role).await?;
                let now = self.state.clock.now();
                let held = inviter_permissions(db, &account, request.inviter.as_ref(), now).await?;
                response.inviter_may_grant_role = grants::check_grant(
                    &Grantor {
                        user_id: None,
                        role_id: None,
                        permissions: &held,
                    },
                    &Grant::Role {
                        user: None,
                        role_id,
                        permissions: &granted,
                    },
                )
                .is_ok();
            }
            response.role_name = role.name;
        }
        if let Some(team_id) = team_id {
            response.team_name = scoped::team(db, account_id, team_id).await?.name;
        }
        // With the effective lifetime: the account's, or the deployment default.
        response.account = Some(convert::account(
            &account,
            accounts::seats_used(db, account_id).await?,
            self.state.settings.default_invitation_lifetime,
        ));
        Ok(response)
    }

    async fn inner_reserve_invitees(
        &self,
        call: Call,
        request: internal::ReserveInviteesRequest,
    ) -> ApiResult<internal::ReserveInviteesResponse> {
        require_service(&call.principal)?;
        let mut violations = Violations::new();
        let account_id = parse_id("account_id", &request.account_id)
            .map_err(|e| violations.absorb(e))
            .ok();
        let role_id = parse_id("role_id", &request.role_id)
            .map_err(|e| violations.absorb(e))
            .ok();
        let team_id = parse_optional_id("team_id", &request.team_id)
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        let products = validate_products("products", &request.products)
            .map_err(|e| violations.absorb(e))
            .ok();
        let metadata = validate_metadata("metadata", request.metadata.as_ref())
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        let locale = validate_locale("locale", &request.locale)
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten()
            .unwrap_or_default();
        if request.invitees.is_empty() || request.invitees.len() > MAX_INVITEES {
            // Refused before looking at any invitee: the work stays bounded.
            violations.add(
                "invitees",
                format!("must hold 1 to {MAX_INVITEES} invitees"),
            );
        }
        let given_invitees = if request.invitees.len() > MAX_INVITEES {
            &[][..]
        } else {
            &request.invitees[..]
        };
        let mut invitees = Vec::with_capacity(given_invitees.len());
        let mut emails_seen = HashSet::with_capacity(given_invitees.len());
        let mut invitations_seen = HashSet::with_capacity(given_invitees.len());
        for (index, given) in given_invitees.iter().enumerate() {
            let field = |name: &str| format!("invitees[{index}].{name}");
            // The invitation service canonicalises addresses; identity parses
            // them again and refuses anything else, so a bug upstream cannot
            // create two seats for one person.
            let email = match EmailAddress::parse(&given.email) {
                Ok(email) if email.canonical() == given.email => {
                    if emails_seen.insert(given.email.as_str()) {
                        Some(email)
                    } else {
                        violations.add(field("email"), "is listed twice");
                        None
                    }
                }
                Ok(_) => {
                    violations.add(field("email"), "must be in canonical form");
                    None
                }
                Err(err) => {
                    violations.add(field("email"), err.to_string());
                    None
                }
            };
            let name = optional_display_name(&field("display_name"), &given.display_name)
                .map_err(|e| violations.absorb(e))
                .ok();
            let invitation_id = if given.invitation_id.trim().is_empty() {
                violations.add(field("invitation_id"), "is required");
                None
            } else {
                match parse_id(&field("invitation_id"), &given.invitation_id) {
                    Ok(id) if !invitations_seen.insert(id) => {
                        violations.add(field("invitation_id"), "is listed twice");
                        None
                    }
                    Ok(id) => Some(id),
                    Err(err) => {
                        violations.absorb(err);
                        None
                    }
                }
            };
            if let (Some(email), Some(display_name), Some(invitation_id)) =
                (email, name, invitation_id)
            {
                invitees.push(Invitee {
                    email,
                    display_name,
                    invitation_id,
                });
            }
        }
        violations.into_result()?;
        let (Some(account_id), Some(role_id), Some(products)) = (account_id, role_id, products)
        else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "validated fields missing"
            )));
        };

        let now = self.state.clock.now();
        let actor = actor_of(request.inviter.as_ref(), &call.principal);
        let txn = self.state.db.begin().await?;
        // Every change that counts seats takes this lock first: concurrent
        // reservations are counted one after the other.
        let account = accounts::lock(&txn, account_id).await?;
        let role = scoped::role(&txn, account_id, role_id).await?;
        // No escalation (P26): the invitees' role carries nothing the inviter
        // lacks. The inviter's permissions are read here, where the role is
        // resolved, not taken from the calling service.
        let granted = accounts::effective_permissions(&txn, &role).await?;
        let held = inviter_permissions(&txn, &account, request.inviter.as_ref(), now).await?;
        grants::check_grant(
            &Grantor {
                user_id: None,
                role_id: None,
                permissions: &held,
            },
            &Grant::Role {
                user: None,
                role_id,
                permissions: &granted,
            },
        )?;
        let team = match team_id {
            Some(team_id) => Some(scoped::team(&txn, account_id, team_id).await?),
            None => None,
        };
        require_enabled(&account, &products)?;
        if account.seat_limit <= 1 {
            return Err(ApiError::rejected(
                Reason::SingleUserPlan,
                "the account's plan has a single seat: inviting is off",
            ));
        }

        // One query for every invitee: users of the account with one of the
        // emails, and users anywhere holding one of the invitation ids (the
        // ids are unique across accounts).
        let emails: Vec<String> = invitees
            .iter()
            .map(|i| i.email.canonical().to_owned())
            .collect();
        let invitation_ids: Vec<Uuid> = invitees.iter().map(|i| i.invitation_id).collect();
        let existing = user::Entity::find()
            .filter(
                Condition::any()
                    .add(
                        Condition::all()
                            .add(user::Column::AccountId.eq(account_id))
                            .add(user::Column::EmailCanonical.is_in(emails)),
                    )
                    .add(user::Column::InvitationId.is_in(invitation_ids)),
            )
            .all(&txn)
            .await?;
        let by_email: HashMap<&str, &user::Model> = existing
            .iter()
            .filter(|u| u.account_id == account_id)
            .filter_map(|u| u.email_canonical.as_deref().map(|e| (e, u)))
            .collect();
        let by_invitation: HashMap<Uuid, &user::Model> = existing
            .iter()
            .filter_map(|u| u.invitation_id.map(|i| (i, u)))
            .collect();
        let mut conflicts = Violations::new();
        for (index, invitee) in invitees.iter().enumerate() {
            if let Some(holder) = by_invitation.get(&invitee.invitation_id)
                && (holder.account_id != account_id
                    || holder.email_canonical.as_deref() != Some(invitee.email.canonical()))
            {
                conflicts.add(
                    format!("invitees[{index}].invitation_id"),
                    "is already used by another invitee",
                );
            }
        }
        conflicts.into_result()?;

        let allowed: HashSet<String> = convert::strings(&account.allowed_email_domains)
            .iter()
            .filter_map(|d| canonical_domain(d).ok())
            .collect();
        let seats_before = accounts::seats_used(&txn, account_id).await?;
        let limit = u64::try_from(account.seat_limit).unwrap_or_default();
        let mut free = limit.saturating_sub(seats_before);
        let products_json = convert::json_strings(products.clone());
        let invited_by = format!("{}:{}", actor.kind, actor.id);
        let team_id = team.as_ref().map(|t| t.id);
        let mut results = Vec::with_capacity(invitees.len());
        let mut new_users = Vec::new();
        for invitee in &invitees {
            use internal::ReservationVerdict as Verdict;
            let email = invitee.email.canonical();
            let mut result = internal::ReservationResult {
                email: email.to_owned(),
                ..Default::default()
            };
            let verdict = if let Some(found) = by_email.get(email) {
                result.user_id = found.id.to_string();
                match Some(found.status) {
                    // A retry of this very reservation: the seat is held.
                    Some(UserStatus::Invited)
                        if found.invitation_id == Some(invitee.invitation_id) =>
                    {
                        Verdict::Reserved
                    }
                    Some(UserStatus::Invited) => {
                        result.existing_invitation_id = found
                            .invitation_id
                            .map(|i| i.to_string())
                            .unwrap_or_default();
                        Verdict::AlreadyInvited
                    }
                    _ => Verdict::AlreadyMember,
                }
            } else if !allowed.is_empty() && !allowed.contains(invitee.email.domain()) {
                Verdict::DomainNotAllowed
            } else if free == 0 {
                Verdict::SeatLimitReached
            } else {
                free -= 1;
                let user_id = Uuid::new_v4();
                if !request.dry_run {
                    result.user_id = user_id.to_string();
                }
                new_users.push(user::ActiveModel {
                    id: Set(user_id),
                    account_id: Set(account_id),
                    email: Set(Some(email.to_owned())),
                    email_canonical: Set(Some(email.to_owned())),
                    username: Set(None),
                    display_name: Set(invitee.display_name.clone()),
                    search_text: Set(crate::store::users::search_text(
                        &invitee.display_name,
                        Some(email),
                        None,
                    )),
                    status: Set(UserStatus::Invited),
                    role_id: Set(role.id),
                    team_id: Set(team_id),
                    products: Set(products_json.clone()),
                    locale: Set(locale.clone()),
                    metadata: Set(metadata.clone()),
                    owner: Set(false),
                    origin: Set(Origin::Invitation),
                    password_hash: Set(None),
                    password_change_required: Set(false),
                    invitation_id: Set(Some(invitee.invitation_id)),
                    invited_by: Set(Some(invited_by.clone())),
                    create_time: Set(now),
                    update_time: Set(now),
                    activate_time: Set(None),
                    deactivate_time: Set(None),
                    last_sign_in_time: Set(None),
                });
                Verdict::Reserved
            };
            result.verdict = verdict as i32;
            results.push(result);
        }
        let reserved = new_users.len() as u64;
        let response = internal::ReserveInviteesResponse {
            results,
            seat_limit: account.seat_limit,
            seats_used: seats(seats_before + reserved),
            role_name: role.name.clone(),
            team_name: team.as_ref().map(|t| t.name.clone()).unwrap_or_default(),
        };
        if request.dry_run || new_users.is_empty() {
            txn.rollback().await?;
            return Ok(response);
        }

        // One audit entry and one `user.created` per reserved user, each
        // written with one multi-row insert.
        let actor_pb = actor.to_proto();
        let mut audit_rows = Vec::with_capacity(new_users.len());
        let mut messages = Vec::with_capacity(new_users.len());
        for (invitee, result) in invitees.iter().zip(&response.results) {
            if result.verdict != internal::ReservationVerdict::Reserved as i32
                || by_email.contains_key(invitee.email.canonical())
            {
                continue;
            }
            let email = invitee.email.canonical();
            audit_rows.push(audit::row(
                AuditEntry {
                    account_id,
                    actor: &actor,
                    action: "user.created",
                    target_type: "user",
                    target_id: result.user_id.clone(),
                    target_name: if invitee.display_name.is_empty() {
                        email.to_owned()
                    } else {
                        invitee.display_name.clone()
                    },
                    details: Some(json!({
                        "email": email,
                        "status": UserStatus::Invited.as_str(),
                        "origin": Origin::Invitation.as_str(),
                        "invitation_id": invitee.invitation_id.to_string(),
                        "role_id": role.id.to_string(),
                        "team_id": team_id.map(|t| t.to_string()),
                        "products": products,
                    })),
                    request_id: &call.request_id,
                },
                now,
            ));
            messages.push(
                DomainEvent {
                    routing_key: "user.created",
                    service: "identity",
                    subject: result.user_id.clone(),
                    account_id: Some(account_id),
                    time: now,
                }
                .into_message(
                    "UserCreated",
                    &events::UserCreated {
                        user_id: result.user_id.clone(),
                        account_id: account_id.to_string(),
                        actor: Some(actor_pb.clone()),
                        email: email.to_owned(),
                        username: String::new(),
                        display_name: invitee.display_name.clone(),
                        status: pb::UserStatus::Invited as i32,
                        origin: pb::UserOrigin::Invitation as i32,
                        role_id: role.id.to_string(),
                        team_id: team_id.map(|t| t.to_string()).unwrap_or_default(),
                        products: products.clone(),
                        invitation_id: invitee.invitation_id.to_string(),
                    },
                ),
            );
        }
        user::Entity::insert_many(new_users)
            .exec_without_returning(&txn)
            .await?;
        audit_event::Entity::insert_many(audit_rows)
            .exec_without_returning(&txn)
            .await?;
        outbox::enqueue(&txn, &messages).await?;
        txn.commit().await?;
        Ok(response)
    }

    /// The answer to a retry: `Some` when `model` is ACTIVE through
    /// `invitation_id`. Rewrites the principal snapshot, in case the first
    /// attempt committed and then failed before doing it.
    async fn already_activated(
        &self,
        model: &user::Model,
        invitation_id: Uuid,
    ) -> ApiResult<Option<internal::ActivateInvitedUserResponse>> {
        if model.status != UserStatus::Active || model.invitation_id != Some(invitation_id) {
            return Ok(None);
        }
        principals::refresh_user(&self.state, model.id).await?;
        Ok(Some(internal::ActivateInvitedUserResponse {
            user: Some(user_view(&self.state.db, model).await?),
            already_activated: true,
        }))
    }

    async fn inner_activate_invited_user(
        &self,
        call: Call,
        request: internal::ActivateInvitedUserRequest,
    ) -> ApiResult<internal::ActivateInvitedUserResponse> {
        require_service(&call.principal)?;
        let mut violations = Violations::new();
        let invitation_id = parse_id("invitation_id", &request.invitation_id)
            .map_err(|e| violations.absorb(e))
            .ok();
        let account_id = parse_id("account_id", &request.account_id)
            .map_err(|e| violations.absorb(e))
            .ok();
        let user_id = parse_id("user_id", &request.user_id)
            .map_err(|e| violations.absorb(e))
            .ok();
        let name = display_name("display_name", &request.display_name)
            .map_err(|e| violations.absorb(e))
            .ok();
        let password = self
            .state
            .password_policy
            .check(&request.password, "password")
            .map_err(|e| violations.absorb(e))
            .ok();
        let metadata = validate_metadata("metadata", request.metadata.as_ref())
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        let locale = validate_locale("locale", &request.locale)
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        violations.into_result()?;
        let (Some(invitation_id), Some(account_id), Some(user_id), Some(name), Some(password)) =
            (invitation_id, account_id, user_id, name, password)
        else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "validated fields missing"
            )));
        };
        let not_invited = || invalid_state("the user is not invited for this invitation");

        let current = scoped::user(&self.state.db, account_id, user_id).await?;
        if let Some(done) = self.already_activated(&current, invitation_id).await? {
            return Ok(done);
        }
        if current.status != UserStatus::Invited || current.invitation_id != Some(invitation_id) {
            return Err(not_invited());
        }
        // Outside the transaction: hashing takes tens of milliseconds.
        let password_hash = self.state.passwords.hash(password).await?;

        let now = self.state.clock.now();
        let txn = self.state.db.begin().await?;
        let account = share_account(&txn, account_id).await?;
        let current = scoped::user(&txn, account_id, user_id).await?;
        let mut update = user::Entity::update_many()
            .col_expr(
                user::Column::Status,
                Expr::value(UserStatus::Active.as_str()),
            )
            .col_expr(user::Column::DisplayName, Expr::value(name.clone()))
            .col_expr(
                user::Column::SearchText,
                Expr::value(crate::store::users::search_text(
                    &name,
                    current.email_canonical.as_deref(),
                    current.username.as_deref(),
                )),
            )
            .col_expr(user::Column::PasswordHash, Expr::value(Some(password_hash)))
            .col_expr(user::Column::ActivateTime, Expr::value(Some(now)))
            .col_expr(user::Column::UpdateTime, Expr::value(now));
        let mut changed = vec!["status", "display_name", "password"];
        if let Some(locale) = locale {
            update = update.col_expr(user::Column::Locale, Expr::value(locale));
            changed.push("locale");
        }
        if let Some(metadata) = metadata {
            update = update.col_expr(user::Column::Metadata, Expr::value(Some(metadata)));
            changed.push("metadata");
        }
        // Only the grants still enabled on the account (normally all of
        // them: disabling a product strips it from every user).
        let enabled = convert::strings(&account.products);
        let granted = convert::strings(&current.products);
        let kept: Vec<String> = granted
            .iter()
            .filter(|p| enabled.contains(p))
            .cloned()
            .collect();
        if kept.len() != granted.len() {
            update = update.col_expr(
                user::Column::Products,
                Expr::value(convert::json_strings(kept)),
            );
            changed.push("products");
        }
        // The one conditional update that makes activation single-use: of two
        // concurrent activations, the second finds the user ACTIVE.
        let done = update
            .filter(user::Column::Id.eq(user_id))
            .filter(user::Column::AccountId.eq(account_id))
            .filter(user::Column::Status.eq(UserStatus::Invited.as_str()))
            .filter(user::Column::InvitationId.eq(invitation_id))
            .exec(&txn)
            .await?;
        if done.rows_affected != 1 {
            txn.rollback().await?;
            let current = scoped::user(&self.state.db, account_id, user_id).await?;
            return match self.already_activated(&current, invitation_id).await? {
                Some(done) => Ok(done),
                None => Err(not_invited()),
            };
        }
        let activated = scoped::user(&txn, account_id, user_id).await?;
        let actor = Actor {
            kind: "anonymous",
            id: user_id.to_string(),
            name: name.clone(),
        };
        audit::record(
            &txn,
            AuditEntry {
                account_id,
                actor: &actor,
                action: "user.activated",
                target_type: "user",
                target_id: user_id.to_string(),
                target_name: name.clone(),
                details: Some(json!({
                    "invitation_id": invitation_id.to_string(),
                    "email": activated.email_canonical,
                    "fields": changed,
                })),
                request_id: &call.request_id,
            },
            now,
        )
        .await?;
        emit(
            &txn,
            "user.activated",
            "UserActivated",
            user_id.to_string(),
            Some(account_id),
            &events::UserActivated {
                user_id: user_id.to_string(),
                account_id: account_id.to_string(),
                actor: Some(actor.to_proto()),
                invitation_id: invitation_id.to_string(),
                email: activated.email_canonical.clone().unwrap_or_default(),
                display_name: name,
                role_id: activated.role_id.to_string(),
                team_id: activated.team_id.map(|t| t.to_string()).unwrap_or_default(),
                products: convert::strings(&activated.products),
            },
            now,
        )
        .await?;
        let user = user_view(&txn, &activated).await?;
        txn.commit().await?;
        // The user may act from the next call on.
        principals::refresh_user(&self.state, user_id).await?;
        Ok(internal::ActivateInvitedUserResponse {
            user: Some(user),
            already_activated: false,
        })
    }

    async fn inner_release_invitees(
        &self,
        call: Call,
        request: internal::ReleaseInviteesRequest,
    ) -> ApiResult<internal::ReleaseInviteesResponse> {
        require_service(&call.principal)?;
        let mut violations = Violations::new();
        let account_id = parse_id("account_id", &request.account_id)
            .map_err(|e| violations.absorb(e))
            .ok();
        if request.targets.is_empty() || request.targets.len() > MAX_TARGETS {
            violations.add("targets", format!("must hold 1 to {MAX_TARGETS} targets"));
        }
        let given_targets = if request.targets.len() > MAX_TARGETS {
            &[][..]
        } else {
            &request.targets[..]
        };
        let mut targets = Vec::with_capacity(given_targets.len());
        for (index, target) in given_targets.iter().enumerate() {
            let field = |name: &str| format!("targets[{index}].{name}");
            let key = match (target.user_id.is_empty(), target.email.is_empty()) {
                (false, true) => parse_id(&field("user_id"), &target.user_id)
                    .map(ReleaseKey::Id)
                    .map_err(|e| violations.absorb(e))
                    .ok(),
                (true, false) => match EmailAddress::parse(&target.email) {
                    Ok(email) => Some(ReleaseKey::Email(email.into_canonical())),
                    Err(err) => {
                        violations.add(field("email"), err.to_string());
                        None
                    }
                },
                _ => {
                    violations.add(
                        format!("targets[{index}]"),
                        "must give exactly one of user_id and email",
                    );
                    None
                }
            };
            let guard = parse_optional_id(&field("invitation_id"), &target.invitation_id)
                .map_err(|e| violations.absorb(e))
                .ok();
            if let (Some(key), Some(guard)) = (key, guard) {
                targets.push((key, guard));
            }
        }
        violations.into_result()?;
        let Some(account_id) = account_id else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "validated fields missing"
            )));
        };

        let now = self.state.clock.now();
        let actor = actor_of(request.actor.as_ref(), &call.principal);
        let reason = reason_name(request.reason);
        let txn = self.state.db.begin().await?;
        accounts::lock(&txn, account_id).await?;
        let (ids, emails): (Vec<Uuid>, Vec<String>) = targets.iter().fold(
            (Vec::new(), Vec::new()),
            |(mut ids, mut emails), (key, _)| {
                match key {
                    ReleaseKey::Id(id) => ids.push(*id),
                    ReleaseKey::Email(email) => emails.push(email.clone()),
                }
                (ids, emails)
            },
        );
        let found = user::Entity::find()
            .filter(user::Column::AccountId.eq(account_id))
            .filter(
                Condition::any()
                    .add(user::Column::Id.is_in(ids))
                    .add(user::Column::EmailCanonical.is_in(emails)),
            )
            .all(&txn)
            .await?;
        let by_id: HashMap<Uuid, &user::Model> = found.iter().map(|u| (u.id, u)).collect();
        let by_email: HashMap<&str, &user::Model> = found
            .iter()
            .filter_map(|u| u.email_canonical.as_deref().map(|e| (e, u)))
            .collect();

        let mut released: Vec<&user::Model> = Vec::new();
        let mut released_ids = HashSet::new();
        let mut results = Vec::with_capacity(targets.len());
        for ((key, guard), given) in targets.iter().zip(&request.targets) {
            use internal::ReleaseOutcome as Outcome;
            let holder = match key {
                ReleaseKey::Id(id) => by_id.get(id),
                ReleaseKey::Email(email) => by_email.get(email.as_str()),
            };
            let (outcome, user_id) = match holder {
                None => (Outcome::NotFound, String::new()),
                // Listed twice: the first one released it.
                Some(u) if released_ids.contains(&u.id) => (Outcome::NotFound, String::new()),
                Some(u) if u.status != UserStatus::Invited => {
                    (Outcome::NotInvited, u.id.to_string())
                }
                // A stale retry: the user now belongs to a newer invitation.
                Some(u) if guard.is_some() && u.invitation_id != *guard => {
                    (Outcome::NotFound, String::new())
                }
                Some(u) => {
                    released_ids.insert(u.id);
                    released.push(u);
                    (Outcome::Released, u.id.to_string())
                }
            };
            results.push(internal::ReleaseResult {
                target: Some(given.clone()),
                outcome: outcome as i32,
                user_id,
            });
        }

        if !released.is_empty() {
            user::Entity::delete_many()
                .filter(user::Column::AccountId.eq(account_id))
                .filter(user::Column::Status.eq(UserStatus::Invited.as_str()))
                .filter(user::Column::Id.is_in(released_ids.iter().copied()))
                .exec(&txn)
                .await?;
            let actor_pb = actor.to_proto();
            let mut audit_rows = Vec::with_capacity(released.len());
            let mut messages = Vec::with_capacity(released.len());
            for model in &released {
                let invitation_id = model
                    .invitation_id
                    .map(|i| i.to_string())
                    .unwrap_or_default();
                let email = model.email_canonical.clone().unwrap_or_default();
                audit_rows.push(audit::row(
                    AuditEntry {
                        account_id,
                        actor: &actor,
                        action: "user.deleted",
                        target_type: "user",
                        target_id: model.id.to_string(),
                        target_name: if model.display_name.is_empty() {
                            email.clone()
                        } else {
                            model.display_name.clone()
                        },
                        details: Some(json!({
                            "email": email,
                            "previous_status": model.status.as_str(),
                            "invitation_id": invitation_id,
                            "reason": reason,
                        })),
                        request_id: &call.request_id,
                    },
                    now,
                ));
                messages.push(
                    DomainEvent {
                        routing_key: "user.deleted",
                        service: "identity",
                        subject: model.id.to_string(),
                        account_id: Some(account_id),
                        time: now,
                    }
                    .into_message(
                        "UserDeleted",
                        &events::UserDeleted {
                            user_id: model.id.to_string(),
                            account_id: account_id.to_string(),
                            actor: Some(actor_pb.clone()),
                            previous_status: pb::UserStatus::Invited as i32,
                            email,
                            invitation_id,
                        },
                    ),
                );
            }
            audit_event::Entity::insert_many(audit_rows)
                .exec_without_returning(&txn)
                .await?;
            outbox::enqueue(&txn, &messages).await?;
        }
        let seats_used = accounts::seats_used(&txn, account_id).await?;
        txn.commit().await?;
        Ok(internal::ReleaseInviteesResponse {
            results,
            seats_used: seats(seats_used),
        })
    }

    async fn inner_create_session(
        &self,
        call: Call,
        request: internal::CreateSessionRequest,
    ) -> ApiResult<internal::CreateSessionResponse> {
        require_service(&call.principal)?;
        let mut violations = Violations::new();
        let account_id = parse_id("account_id", &request.account_id)
            .map_err(|e| violations.absorb(e))
            .ok();
        let user_id = parse_id("user_id", &request.user_id)
            .map_err(|e| violations.absorb(e))
            .ok();
        let invitation_id = parse_id("invitation_id", &request.invitation_id)
            .map_err(|e| violations.absorb(e))
            .ok();
        violations.into_result()?;
        let (Some(account_id), Some(user_id), Some(invitation_id)) =
            (account_id, user_id, invitation_id)
        else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "validated fields missing"
            )));
        };

        let db = &self.state.db;
        let member = scoped::user(db, account_id, user_id).await?;
        if member.status != UserStatus::Active {
            return Err(invalid_state("the user is not active"));
        }
        if member.invitation_id != Some(invitation_id) {
            return Err(invalid_state("the user did not join by this invitation"));
        }
        let now = self.state.clock.now();
        user::Entity::update_many()
            .col_expr(user::Column::LastSignInTime, Expr::value(Some(now)))
            .filter(user::Column::Id.eq(user_id))
            .filter(user::Column::AccountId.eq(account_id))
            .exec(db)
            .await?;
        // The gateway builds the principal of every call from this snapshot.
        principals::refresh_user(&self.state, user_id).await?;
        let optional = |value: &str| (!value.is_empty()).then(|| value.to_owned());
        let issued = self
            .state
            .sessions
            .create(
                account_id,
                user_id,
                SessionMeta {
                    client_ip: optional(&request.client_ip),
                    user_agent: optional(&request.user_agent),
                    password_change_required: member.password_change_required,
                },
            )
            .await?;
        tracing::info!(
            session_id = %issued.record.id,
            %user_id,
            %account_id,
            %invitation_id,
            "session opened for an accepted invitation"
        );
        Ok(internal::CreateSessionResponse {
            session: Some(pb::Session {
                id: issued.record.id.to_string(),
                access_token: issued.access_token.as_str().to_owned(),
                access_token_expire_time: Some(convert::timestamp(issued.access_expiry)),
                refresh_token: issued.refresh_token.as_str().to_owned(),
                expire_time: Some(convert::timestamp(issued.record.absolute_expiry)),
                user_id: user_id.to_string(),
                account_id: account_id.to_string(),
                password_change_required: issued.record.password_change_required,
            }),
        })
    }
}

#[tonic::async_trait]
impl internal::directory_service_server::DirectoryService for IdentityApi {
    async fn get_invitation_context(
        &self,
        request: Request<internal::GetInvitationContextRequest>,
    ) -> Result<Response<internal::GetInvitationContextResponse>, Status> {
        let call = call(&request)?;
        self.inner_get_invitation_context(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn reserve_invitees(
        &self,
        request: Request<internal::ReserveInviteesRequest>,
    ) -> Result<Response<internal::ReserveInviteesResponse>, Status> {
        let call = call(&request)?;
        self.inner_reserve_invitees(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn activate_invited_user(
        &self,
        request: Request<internal::ActivateInvitedUserRequest>,
    ) -> Result<Response<internal::ActivateInvitedUserResponse>, Status> {
        let call = call(&request)?;
        self.inner_activate_invited_user(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn release_invitees(
        &self,
        request: Request<internal::ReleaseInviteesRequest>,
    ) -> Result<Response<internal::ReleaseInviteesResponse>, Status> {
        let call = call(&request)?;
        self.inner_release_invitees(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn create_session(
        &self,
        request: Request<internal::CreateSessionRequest>,
    ) -> Result<Response<internal::CreateSessionResponse>, Status> {
        let call = call(&request)?;
        self.inner_create_session(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }
}
