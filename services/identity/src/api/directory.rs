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

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Instant};

    use sea_orm::{ActiveModelTrait, IntoActiveModel, PaginatorTrait};
    use tonic::Code;
    use tonic_types::StatusExt;
    use usher_kit::clock::SystemClock;
    use usher_proto::identity::v1::account_service_server::AccountService;

    use super::{
        internal::{
            ReleaseOutcome as Outcome, ReservationVerdict as Verdict,
            directory_service_server::DirectoryService,
        },
        *,
    };
    use crate::testing::{
        TestIdentity, admin_permissions, member, new_account_request, platform, request,
    };

    // -- harness ----------------------------------------------------------

    /// An account created through AccountService, with its built-in roles.
    #[derive(Clone, Debug)]
    struct Acct {
        id: Uuid,
        owner: Uuid,
        admin_role: Uuid,
        user_role: Uuid,
    }

    fn svc() -> Principal {
        Principal::service("usher-invitation")
    }

    async fn start() -> TestIdentity {
        TestIdentity::start(Arc::new(SystemClock)).await
    }

    async fn account_with(test: &TestIdentity, create: pb::CreateAccountRequest) -> Acct {
        let created = AccountService::create_account(&test.api, request(&platform(), create))
            .await
            .expect("account")
            .into_inner();
        let id: Uuid = created.account.expect("account").id.parse().expect("uuid");
        let owner: Uuid = created.owner.expect("owner").id.parse().expect("uuid");
        let roles = role::Entity::find()
            .filter(role::Column::AccountId.eq(id))
            .all(&test.state.db)
            .await
            .expect("roles");
        let named = |name: &str| roles.iter().find(|r| r.name == name).expect("role").id;
        Acct {
            id,
            owner,
            admin_role: named("Admin"),
            user_role: named("User"),
        }
    }

    async fn account(test: &TestIdentity, seats: i32) -> Acct {
        account_with(test, new_account_request(seats)).await
    }

    async fn register_product(test: &TestIdentity, code: &str) {
        AccountService::register_product(
            &test.api,
            request(
                &platform(),
                pb::RegisterProductRequest {
                    code: code.into(),
                    display_name: code.into(),
                    permissions: vec![],
                },
            ),
        )
        .await
        .expect("product");
    }

    async fn make_team(test: &TestIdentity, acct: &Acct, name: &str) -> Uuid {
        let now = test.state.clock.now();
        team::ActiveModel {
            id: Set(Uuid::new_v4()),
            account_id: Set(acct.id),
            name: Set(name.into()),
            description: Set(String::new()),
            create_time: Set(now),
            update_time: Set(now),
        }
        .insert(&test.state.db)
        .await
        .expect("team")
        .id
    }

    fn reason(status: &Status) -> String {
        status
            .get_error_details()
            .error_info()
            .map(|i| i.reason.clone())
            .unwrap_or_default()
    }

    fn fields(status: &Status) -> Vec<String> {
        status
            .get_error_details()
            .bad_request()
            .map(|b| b.field_violations.iter().map(|f| f.field.clone()).collect())
            .unwrap_or_default()
    }

    fn invitee(email: &str) -> internal::Invitee {
        internal::Invitee {
            email: email.into(),
            display_name: String::new(),
            invitation_id: Uuid::new_v4().to_string(),
        }
    }

    fn inviter(acct: &Acct) -> pb::Actor {
        pb::Actor {
            kind: pb::ActorKind::User as i32,
            id: acct.owner.to_string(),
            display_name: "Olive Owner".into(),
        }
    }

    fn reservation(
        acct: &Acct,
        invitees: Vec<internal::Invitee>,
    ) -> internal::ReserveInviteesRequest {
        internal::ReserveInviteesRequest {
            account_id: acct.id.to_string(),
            inviter: Some(inviter(acct)),
            role_id: acct.user_role.to_string(),
            team_id: String::new(),
            products: vec![],
            metadata: None,
            invitees,
            dry_run: false,
            locale: String::new(),
        }
    }

    async fn reserve(
        test: &TestIdentity,
        message: internal::ReserveInviteesRequest,
    ) -> Result<internal::ReserveInviteesResponse, Status> {
        test.api
            .reserve_invitees(request(&svc(), message))
            .await
            .map(Response::into_inner)
    }

    fn verdicts(response: &internal::ReserveInviteesResponse) -> Vec<Verdict> {
        response
            .results
            .iter()
            .map(|r| Verdict::try_from(r.verdict).expect("verdict"))
            .collect()
    }

    fn activation(
        acct: &Acct,
        invitee: &internal::Invitee,
        user_id: &str,
        password: &str,
    ) -> internal::ActivateInvitedUserRequest {
        internal::ActivateInvitedUserRequest {
            invitation_id: invitee.invitation_id.clone(),
            account_id: acct.id.to_string(),
            user_id: user_id.into(),
            display_name: "Ada Lovelace".into(),
            password: password.into(),
            metadata: None,
            locale: String::new(),
        }
    }

    async fn activate(
        test: &TestIdentity,
        message: internal::ActivateInvitedUserRequest,
    ) -> Result<internal::ActivateInvitedUserResponse, Status> {
        test.api
            .activate_invited_user(request(&svc(), message))
            .await
            .map(Response::into_inner)
    }

    async fn release(
        test: &TestIdentity,
        acct: &Acct,
        targets: Vec<internal::ReleaseTarget>,
    ) -> Result<internal::ReleaseInviteesResponse, Status> {
        test.api
            .release_invitees(request(
                &svc(),
                internal::ReleaseInviteesRequest {
                    account_id: acct.id.to_string(),
                    actor: Some(inviter(acct)),
                    targets,
                    reason: internal::ReleaseReason::Revoked as i32,
                },
            ))
            .await
            .map(Response::into_inner)
    }

    fn by_id(user_id: &str, invitation_id: &str) -> internal::ReleaseTarget {
        internal::ReleaseTarget {
            user_id: user_id.into(),
            email: String::new(),
            invitation_id: invitation_id.into(),
        }
    }

    fn outcomes(response: &internal::ReleaseInviteesResponse) -> Vec<Outcome> {
        response
            .results
            .iter()
            .map(|r| Outcome::try_from(r.outcome).expect("outcome"))
            .collect()
    }

    async fn users_of(test: &TestIdentity, acct: &Acct) -> u64 {
        user::Entity::find()
            .filter(user::Column::AccountId.eq(acct.id))
            .count(&test.state.db)
            .await
            .expect("count")
    }

    async fn audit_of(test: &TestIdentity, acct: &Acct, action: &str) -> u64 {
        audit_event::Entity::find()
            .filter(audit_event::Column::AccountId.eq(acct.id))
            .filter(audit_event::Column::Action.eq(action))
            .count(&test.state.db)
            .await
            .expect("count")
    }

    async fn outbox(test: &TestIdentity) -> u64 {
        usher_kit::outbox::pending(&test.state.db)
            .await
            .expect("outbox")
    }

    async fn stored(test: &TestIdentity, id: &str) -> Option<user::Model> {
        user::Entity::find_by_id(id.parse::<Uuid>().expect("uuid"))
            .one(&test.state.db)
            .await
            .expect("query")
    }

    async fn seats_of(test: &TestIdentity, acct: &Acct) -> u64 {
        accounts::seats_used(&test.state.db, acct.id)
            .await
            .expect("seats")
    }

    /// An INACTIVE member, written directly.
    async fn inactive_member(test: &TestIdentity, acct: &Acct, email: &str) -> Uuid {
        let now = test.state.clock.now();
        let id = Uuid::new_v4();
        user::ActiveModel {
            id: Set(id),
            account_id: Set(acct.id),
            email: Set(Some(email.into())),
            email_canonical: Set(Some(email.into())),
            username: Set(None),
            display_name: Set("Idle".into()),
            search_text: Set(String::new()),
            status: Set(UserStatus::Inactive),
            role_id: Set(acct.user_role),
            team_id: Set(None),
            products: Set(convert::json_strings(Vec::<String>::new())),
            locale: Set(String::new()),
            metadata: Set(None),
            owner: Set(false),
            origin: Set(Origin::Direct),
            password_hash: Set(None),
            password_change_required: Set(false),
            invitation_id: Set(None),
            invited_by: Set(None),
            create_time: Set(now),
            update_time: Set(now),
            activate_time: Set(Some(now)),
            deactivate_time: Set(Some(now)),
            last_sign_in_time: Set(None),
        }
        .insert(&test.state.db)
        .await
        .expect("inactive user");
        id
    }

    // -- ReserveInvitees: nobody grants what they do not hold (P26) --------

    #[tokio::test]
    async fn the_invitees_role_carries_nothing_the_inviter_lacks() {
        let test = start().await;
        let acct = account(&test, 20).await;
        let now = test.state.clock.now();
        // An inviter whose role holds users.read + users.invite only.
        let inviters = role::ActiveModel {
            id: Set(Uuid::new_v4()),
            account_id: Set(acct.id),
            name: Set("Inviters".into()),
            description: Set(String::new()),
            permissions: Set(convert::json_strings(["users.invite", "users.read"])),
            built_in: Set(false),
            create_time: Set(now),
            update_time: Set(now),
        }
        .insert(&test.state.db)
        .await
        .expect("role");
        let ivy = inactive_member(&test, &acct, "ivy@acme.example").await;
        let mut row = user::Entity::find_by_id(ivy)
            .one(&test.state.db)
            .await
            .expect("query")
            .expect("ivy")
            .into_active_model();
        row.role_id = Set(inviters.id);
        row.status = Set(UserStatus::Active);
        row.update(&test.state.db).await.expect("ivy active");
        let key_with = |permissions: &[&str]| api_key::ActiveModel {
            id: Set(Uuid::new_v4()),
            account_id: Set(Some(acct.id)),
            name: Set(format!("key {}", Uuid::new_v4())),
            secret_hash: Set(Uuid::new_v4().to_string()),
            secret_prefix: Set("usk_abcd".into()),
            permissions: Set(convert::json_strings(permissions.to_vec())),
            platform: Set(false),
            creator_user_id: Set(Some(acct.owner)),
            create_time: Set(now),
            expire_time: Set(None),
            last_use_time: Set(None),
            revoke_time: Set(None),
        };
        let invite_only = key_with(&["users.invite"])
            .insert(&test.state.db)
            .await
            .expect("key");
        let reader = key_with(&["users.invite", "users.read"])
            .insert(&test.state.db)
            .await
            .expect("key");
        let actor = |kind: pb::ActorKind, id: Uuid| {
            Some(pb::Actor {
                kind: kind as i32,
                id: id.to_string(),
                display_name: String::new(),
            })
        };
        let users_before = users_of(&test, &acct).await;

        let mut n = 0;
        let mut attempt = |inviter: Option<pb::Actor>, role: Uuid, dry_run: bool| {
            n += 1;
            let mut message = reservation(&acct, vec![invitee(&format!("p{n}@acme.example"))]);
            message.inviter = inviter;
            message.role_id = role.to_string();
            message.dry_run = dry_run;
            message
        };
        // Refused, dry run or not: the Admin role from Ivy, the User role
        // (users.read) from a key holding users.invite only, anything from
        // no inviter, an unknown or inactive one.
        for (inviter, role) in [
            (actor(pb::ActorKind::User, ivy), acct.admin_role),
            (actor(pb::ActorKind::ApiKey, reader.id), acct.admin_role),
            (actor(pb::ActorKind::ApiKey, invite_only.id), acct.user_role),
            (None, acct.user_role),
            (actor(pb::ActorKind::User, Uuid::new_v4()), acct.user_role),
            (
                actor(pb::ActorKind::Platform, Uuid::new_v4()),
                acct.user_role,
            ),
        ] {
            for dry_run in [true, false] {
                let err = reserve(&test, attempt(inviter.clone(), role, dry_run))
                    .await
                    .expect_err("beyond the inviter");
                assert_eq!(err.code(), Code::PermissionDenied, "{inviter:?} {role}");
                assert_eq!(reason(&err), "PERMISSION_DENIED");
            }
        }
        assert_eq!(users_of(&test, &acct).await, users_before);

        // Within: Ivy and the reading key invite as Ivy's role or User; the
        // owner (Admin) as Admin.
        for (inviter, role) in [
            (actor(pb::ActorKind::User, ivy), acct.user_role),
            (actor(pb::ActorKind::User, ivy), inviters.id),
            (actor(pb::ActorKind::ApiKey, reader.id), acct.user_role),
            (Some(inviter(&acct)), acct.admin_role),
        ] {
            let answer = reserve(&test, attempt(inviter, role, false))
                .await
                .expect("within the inviter");
            assert_eq!(verdicts(&answer), [Verdict::Reserved]);
        }

        // Once Ivy is deactivated she grants nothing.
        let mut row = user::Entity::find_by_id(ivy)
            .one(&test.state.db)
            .await
            .expect("query")
            .expect("ivy")
            .into_active_model();
        row.status = Set(UserStatus::Inactive);
        row.update(&test.state.db).await.expect("ivy inactive");
        let err = reserve(
            &test,
            attempt(actor(pb::ActorKind::User, ivy), acct.user_role, false),
        )
        .await
        .expect_err("inactive inviter");
        assert_eq!(reason(&err), "PERMISSION_DENIED");
        test.stop().await;
    }

    // -- GetInvitationContext ----------------------------------------------

    #[tokio::test]
    async fn invitation_context_names_account_inviter_role_and_team() {
        let test = start().await;
        let acct = account(&test, 5).await;
        let team_id = make_team(&test, &acct, "Shipping").await;
        let answer = test
            .api
            .get_invitation_context(request(
                &svc(),
                internal::GetInvitationContextRequest {
                    account_id: acct.id.to_string(),
                    inviter: Some(inviter(&acct)),
                    role_id: acct.admin_role.to_string(),
                    team_id: team_id.to_string(),
                },
            ))
            .await
            .expect("context")
            .into_inner();
        let account = answer.account.expect("account");
        assert_eq!(account.id, acct.id.to_string());
        assert_eq!(account.seats_used, 1);
        assert_eq!(account.subscription.expect("subscription").seat_limit, 5);
        assert_eq!(
            account
                .invitation_lifetime
                .expect("effective lifetime")
                .seconds,
            24 * 3600
        );
        assert_eq!(answer.inviter_display_name, "Olive Owner");
        assert_eq!(answer.inviter_email.to_lowercase(), "owner@acme.example");
        assert!(answer.inviter_active);
        assert_eq!(answer.role_name, "Admin");
        assert!(answer.role_manages_users);
        assert_eq!(answer.team_name, "Shipping");

        // An API key inviter, then nothing asked but the account.
        let now = test.state.clock.now();
        let key = api_key::ActiveModel {
            id: Set(Uuid::new_v4()),
            account_id: Set(Some(acct.id)),
            name: Set("CRM sync".into()),
            secret_hash: Set(Uuid::new_v4().to_string()),
            secret_prefix: Set("usk_abcd".into()),
            permissions: Set(convert::json_strings(["users.invite"])),
            platform: Set(false),
            creator_user_id: Set(Some(acct.owner)),
            create_time: Set(now),
            expire_time: Set(None),
            last_use_time: Set(None),
            revoke_time: Set(Some(now)),
        }
        .insert(&test.state.db)
        .await
        .expect("key");
        let answer = test
            .api
            .get_invitation_context(request(
                &svc(),
                internal::GetInvitationContextRequest {
                    account_id: acct.id.to_string(),
                    inviter: Some(pb::Actor {
                        kind: pb::ActorKind::ApiKey as i32,
                        id: key.id.to_string(),
                        display_name: String::new(),
                    }),
                    role_id: acct.user_role.to_string(),
                    team_id: String::new(),
                },
            ))
            .await
            .expect("context")
            .into_inner();
        assert_eq!(answer.inviter_display_name, "CRM sync");
        assert!(!answer.inviter_active, "revoked key");
        assert_eq!(answer.inviter_email, "");
        assert_eq!(answer.role_name, "User");
        assert!(!answer.role_manages_users);
        assert_eq!(answer.team_name, "");

        // Unknown ids answer NOT_FOUND; malformed ones INVALID_ARGUMENT.
        for (inviter_id, role_id, team_id) in [
            (Uuid::new_v4().to_string(), String::new(), String::new()),
            (String::new(), Uuid::new_v4().to_string(), String::new()),
            (String::new(), String::new(), Uuid::new_v4().to_string()),
        ] {
            let err = test
                .api
                .get_invitation_context(request(
                    &svc(),
                    internal::GetInvitationContextRequest {
                        account_id: acct.id.to_string(),
                        inviter: (!inviter_id.is_empty()).then(|| pb::Actor {
                            kind: pb::ActorKind::User as i32,
                            id: inviter_id.clone(),
                            display_name: String::new(),
                        }),
                        role_id,
                        team_id,
                    },
                ))
                .await
                .expect_err("unknown");
            assert_eq!(err.code(), Code::NotFound);
        }
        let err = test
            .api
            .get_invitation_context(request(
                &svc(),
                internal::GetInvitationContextRequest {
                    account_id: "nope".into(),
                    role_id: "nope".into(),
                    ..Default::default()
                },
            ))
            .await
            .expect_err("malformed");
        assert_eq!(fields(&err), ["account_id", "role_id"]);
        let err = test
            .api
            .get_invitation_context(request(
                &member(acct.id, acct.owner, &admin_permissions()),
                internal::GetInvitationContextRequest {
                    account_id: acct.id.to_string(),
                    ..Default::default()
                },
            ))
            .await
            .expect_err("members may not call the directory");
        assert_eq!(err.code(), Code::PermissionDenied);
        test.stop().await;
    }

    // -- ReserveInvitees ----------------------------------------------------

    #[tokio::test]
    async fn reservation_gives_a_verdict_per_invitee_and_writes_invited_users() {
        let test = start().await;
        register_product(&test, "meter").await;
        let mut create = new_account_request(5);
        create.products = vec!["meter".into()];
        create.allowed_email_domains = vec!["acme.example".into(), "partner.example".into()];
        let acct = account_with(&test, create).await;
        let team_id = make_team(&test, &acct, "Shipping").await;
        let idle = inactive_member(&test, &acct, "idle@acme.example").await;
        // An earlier invitation of pat@: holds a seat (owner + pat = 2 of 5).
        let pat = invitee("pat@acme.example");
        let earlier = reserve(&test, reservation(&acct, vec![pat.clone()]))
            .await
            .expect("earlier");
        assert_eq!(verdicts(&earlier), [Verdict::Reserved]);
        let pat_id = earlier.results[0].user_id.clone();
        let (outbox_before, users_before) = (outbox(&test).await, users_of(&test, &acct).await);

        let mut message = reservation(
            &acct,
            vec![
                invitee("owner@acme.example"),
                invitee("idle@acme.example"),
                invitee("pat@acme.example"),
                invitee("eve@elsewhere.example"),
                internal::Invitee {
                    display_name: " Ada  Lovelace ".into(),
                    ..invitee("ada@acme.example")
                },
                invitee("bob@partner.example"),
                invitee("cy@acme.example"),
                invitee("dee@acme.example"),
            ],
        );
        message.team_id = team_id.to_string();
        message.products = vec!["meter".into()];
        message.locale = "FR".into();
        message.metadata = Some(convert::json_to_struct(&json!({"lines": ["+33 1 23"]})));
        let answer = reserve(&test, message.clone()).await.expect("reserved");
        assert_eq!(
            verdicts(&answer),
            [
                Verdict::AlreadyMember,
                Verdict::AlreadyMember,
                Verdict::AlreadyInvited,
                Verdict::DomainNotAllowed,
                Verdict::Reserved,
                Verdict::Reserved,
                Verdict::Reserved,
                Verdict::SeatLimitReached,
            ]
        );
        assert_eq!(answer.results[0].user_id, acct.owner.to_string());
        assert_eq!(answer.results[1].user_id, idle.to_string());
        assert_eq!(answer.results[2].user_id, pat_id);
        assert_eq!(answer.results[2].existing_invitation_id, pat.invitation_id);
        assert_eq!(answer.results[3].user_id, "");
        assert_eq!(answer.results[7].user_id, "");
        assert_eq!((answer.seat_limit, answer.seats_used), (5, 5));
        assert_eq!(answer.role_name, "User");
        assert_eq!(answer.team_name, "Shipping");
        assert_eq!(seats_of(&test, &acct).await, 5);
        assert_eq!(users_of(&test, &acct).await, users_before + 3);

        let ada = stored(&test, &answer.results[4].user_id)
            .await
            .expect("ada reserved");
        assert_eq!(ada.status, crate::domain::UserStatus::Invited);
        assert_eq!(ada.display_name, "Ada  Lovelace");
        assert_eq!(ada.email_canonical.as_deref(), Some("ada@acme.example"));
        assert_eq!(ada.role_id, acct.user_role);
        assert_eq!(ada.team_id, Some(team_id));
        assert_eq!(convert::strings(&ada.products), ["meter"]);
        assert_eq!(ada.locale, "fr");
        assert_eq!(ada.metadata, Some(json!({"lines": ["+33 1 23"]})));
        assert_eq!(ada.origin, crate::domain::Origin::Invitation);
        assert_eq!(
            ada.invitation_id.map(|i| i.to_string()),
            Some(message.invitees[4].invitation_id.clone())
        );
        assert_eq!(ada.invited_by, Some(format!("user:{}", acct.owner)));
        assert!(ada.password_hash.is_none());
        assert_eq!(outbox(&test).await, outbox_before + 3, "user.created x3");
        assert_eq!(
            audit_of(&test, &acct, "user.created").await,
            1 + 3,
            "pat, then three"
        );
        test.stop().await;
    }

    #[tokio::test]
    async fn dry_run_gives_the_same_verdicts_and_writes_nothing() {
        let test = start().await;
        let acct = account(&test, 3).await;
        reserve(&test, reservation(&acct, vec![invitee("pat@acme.example")]))
            .await
            .expect("earlier");
        let mut message = reservation(
            &acct,
            vec![
                invitee("pat@acme.example"),
                invitee("ada@acme.example"),
                invitee("bob@acme.example"),
            ],
        );
        message.dry_run = true;
        let before = (
            users_of(&test, &acct).await,
            outbox(&test).await,
            audit_of(&test, &acct, "user.created").await,
        );
        let preview = reserve(&test, message.clone()).await.expect("dry run");
        assert_eq!(
            verdicts(&preview),
            [
                Verdict::AlreadyInvited,
                Verdict::Reserved,
                Verdict::SeatLimitReached
            ]
        );
        assert_eq!(preview.results[1].user_id, "", "no user for a dry run");
        assert_eq!(preview.seats_used, 3, "as they would be");
        let after = (
            users_of(&test, &acct).await,
            outbox(&test).await,
            audit_of(&test, &acct, "user.created").await,
        );
        assert_eq!(before, after);
        assert_eq!(seats_of(&test, &acct).await, 2);

        message.dry_run = false;
        let done = reserve(&test, message).await.expect("real run");
        assert_eq!(verdicts(&done), verdicts(&preview));
        assert_eq!(users_of(&test, &acct).await, before.0 + 1);
        test.stop().await;
    }

    #[tokio::test]
    async fn a_retry_with_the_same_invitation_ids_reserves_nothing_twice() {
        let test = start().await;
        let acct = account(&test, 10).await;
        let message = reservation(
            &acct,
            vec![invitee("ada@acme.example"), invitee("bob@acme.example")],
        );
        let first = reserve(&test, message.clone()).await.expect("first");
        let (users, events) = (users_of(&test, &acct).await, outbox(&test).await);
        let again = reserve(&test, message.clone()).await.expect("retry");
        assert_eq!(verdicts(&again), [Verdict::Reserved, Verdict::Reserved]);
        assert_eq!(first.results, again.results, "same users");
        assert_eq!(again.seats_used, 3);
        assert_eq!(users_of(&test, &acct).await, users);
        assert_eq!(outbox(&test).await, events, "no second user.created");

        // The same person under a new invitation: already invited.
        let other = reserve(&test, reservation(&acct, vec![invitee("ada@acme.example")]))
            .await
            .expect("other");
        assert_eq!(verdicts(&other), [Verdict::AlreadyInvited]);
        assert_eq!(
            other.results[0].existing_invitation_id,
            message.invitees[0].invitation_id
        );
        // An invitation id already held by another person is a caller bug.
        let stolen = internal::Invitee {
            invitation_id: message.invitees[0].invitation_id.clone(),
            ..invitee("cy@acme.example")
        };
        let err = reserve(&test, reservation(&acct, vec![stolen]))
            .await
            .expect_err("reused invitation id");
        assert_eq!(fields(&err), ["invitees[0].invitation_id"]);
        test.stop().await;
    }

    #[tokio::test]
    async fn whole_call_errors_follow_the_contract() {
        let test = start().await;
        register_product(&test, "meter").await;
        let acct = account(&test, 10).await;
        let other = account(&test, 10).await;
        let other_team = make_team(&test, &other, "Theirs").await;

        let err = reserve(&test, reservation(&acct, vec![]))
            .await
            .expect_err("empty");
        assert_eq!(fields(&err), ["invitees"]);
        let many = (0..1_001)
            .map(|i| invitee(&format!("u{i}@acme.example")))
            .collect();
        let err = reserve(&test, reservation(&acct, many))
            .await
            .expect_err("too many");
        assert_eq!(fields(&err), ["invitees"]);

        let mut no_id = invitee("cy@acme.example");
        no_id.invitation_id = String::new();
        let err = reserve(
            &test,
            reservation(
                &acct,
                vec![
                    invitee("Ada@acme.example"),
                    invitee(" bob@acme.example"),
                    invitee("not an email"),
                    invitee("dup@acme.example"),
                    invitee("dup@acme.example"),
                    no_id,
                ],
            ),
        )
        .await
        .expect_err("bad invitees");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            fields(&err),
            [
                "invitees[0].email",
                "invitees[1].email",
                "invitees[2].email",
                "invitees[4].email",
                "invitees[5].invitation_id",
            ]
        );

        let one = || vec![invitee("ada@acme.example")];
        let mut unknown_account = reservation(&acct, one());
        unknown_account.account_id = Uuid::new_v4().to_string();
        let mut foreign_role = reservation(&acct, one());
        foreign_role.role_id = other.user_role.to_string();
        let mut foreign_team = reservation(&acct, one());
        foreign_team.team_id = other_team.to_string();
        for message in [unknown_account, foreign_role, foreign_team] {
            let err = reserve(&test, message).await.expect_err("not found");
            assert_eq!(
                (err.code(), reason(&err).as_str()),
                (Code::NotFound, "NOT_FOUND")
            );
        }
        let mut product = reservation(&acct, one());
        product.products = vec!["meter".into()];
        let err = reserve(&test, product).await.expect_err("not enabled");
        assert_eq!(reason(&err), "PRODUCT_NOT_ENABLED");

        let single = account(&test, 1).await;
        let err = reserve(&test, reservation(&single, one()))
            .await
            .expect_err("single user plan");
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::FailedPrecondition, "SINGLE_USER_PLAN")
        );
        let err = test
            .api
            .reserve_invitees(request(
                &member(acct.id, acct.owner, &admin_permissions()),
                reservation(&acct, one()),
            ))
            .await
            .expect_err("members may not reserve");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(users_of(&test, &acct).await, 1, "nothing written");
        test.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reservations_never_exceed_the_seat_limit() {
        let test = start().await;
        // Six seats, the owner holds one: five free.
        let acct = account(&test, 6).await;
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let calls: Vec<_> = (0..8)
            .map(|call| {
                let api = test.api.clone();
                let barrier = barrier.clone();
                let message = reservation(
                    &acct,
                    vec![
                        invitee(&format!("a{call}@acme.example")),
                        invitee(&format!("b{call}@acme.example")),
                    ],
                );
                tokio::spawn(async move {
                    barrier.wait().await;
                    api.reserve_invitees(request(&svc(), message))
                        .await
                        .map(Response::into_inner)
                })
            })
            .collect();
        let mut reserved = 0;
        let mut refused = 0;
        for call in calls {
            let answer = call.await.expect("task").expect("reserve");
            assert!(answer.seats_used <= 6, "seats used {}", answer.seats_used);
            for verdict in verdicts(&answer) {
                match verdict {
                    Verdict::Reserved => reserved += 1,
                    Verdict::SeatLimitReached => refused += 1,
                    other => panic!("unexpected verdict {other:?}"),
                }
            }
        }
        assert_eq!((reserved, refused), (5, 11));
        assert_eq!(seats_of(&test, &acct).await, 6);
        assert_eq!(users_of(&test, &acct).await, 6);
        test.stop().await;
    }

    #[tokio::test]
    async fn a_thousand_invitees_in_one_call() {
        let test = start().await;
        let acct = account(&test, 5_000).await;
        let invitees: Vec<_> = (0..1_000)
            .map(|i| invitee(&format!("person{i:04}@acme.example")))
            .collect();
        let mut message = reservation(&acct, invitees);
        message.dry_run = true;
        let started = Instant::now();
        let preview = reserve(&test, message.clone()).await.expect("dry run");
        let dry = started.elapsed();
        assert!(verdicts(&preview).iter().all(|v| *v == Verdict::Reserved));

        message.dry_run = false;
        let started = Instant::now();
        let answer = reserve(&test, message.clone()).await.expect("reserved");
        let real = started.elapsed();
        assert_eq!(answer.results.len(), 1_000);
        assert!(verdicts(&answer).iter().all(|v| *v == Verdict::Reserved));
        assert_eq!(answer.seats_used, 1_001);
        assert_eq!(users_of(&test, &acct).await, 1_001);
        assert_eq!(audit_of(&test, &acct, "user.created").await, 1_000);

        let started = Instant::now();
        let retry = reserve(&test, message).await.expect("retry");
        let retried = started.elapsed();
        assert_eq!(retry.results, answer.results);
        let build = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        eprintln!(
            "ReserveInvitees x1000 ({build} build): dry run {dry:?}, reserve {real:?}, idempotent retry {retried:?}"
        );
        assert!(real.as_secs() < 10, "took {real:?}");
        test.stop().await;
    }

    // -- ActivateInvitedUser -------------------------------------------------

    #[tokio::test]
    async fn activation_sets_only_the_chosen_fields_and_is_idempotent() {
        let test = start().await;
        let acct = account(&test, 5).await;
        let ada = invitee("ada@acme.example");
        let mut message = reservation(&acct, vec![ada.clone()]);
        message.metadata = Some(convert::json_to_struct(&json!({"lines": ["1"]})));
        message.locale = "fr".into();
        let user_id = reserve(&test, message).await.expect("reserved").results[0]
            .user_id
            .clone();
        let reserved = stored(&test, &user_id).await.expect("row");

        // Bad input: every field at fault, nothing changed.
        let mut bad = activation(&acct, &ada, &user_id, "short");
        bad.display_name = " ".into();
        bad.locale = "de".into();
        let err = activate(&test, bad).await.expect_err("invalid");
        assert_eq!(fields(&err), ["display_name", "password", "locale"]);
        // Another invitation, another account, an unknown user.
        let mut wrong = activation(&acct, &ada, &user_id, "correct horse battery");
        wrong.invitation_id = Uuid::new_v4().to_string();
        let err = activate(&test, wrong).await.expect_err("other invitation");
        assert_eq!(reason(&err), "INVALID_STATE");
        let other = account(&test, 5).await;
        let err = activate(
            &test,
            activation(&other, &ada, &user_id, "correct horse battery"),
        )
        .await
        .expect_err("other account");
        assert_eq!(err.code(), Code::NotFound);
        assert_eq!(stored(&test, &user_id).await, Some(reserved.clone()));

        let mut accept = activation(&acct, &ada, &user_id, "correct horse battery");
        accept.metadata = Some(convert::json_to_struct(&json!({"lines": ["2"]})));
        let done = activate(&test, accept.clone()).await.expect("activated");
        assert!(!done.already_activated);
        let user = done.user.expect("user");
        assert_eq!(user.status, pb::UserStatus::Active as i32);
        assert_eq!(user.display_name, "Ada Lovelace");
        assert_eq!(user.role_name, "User");
        assert_eq!(user.invitation_id, ada.invitation_id);
        let row = stored(&test, &user_id).await.expect("row");
        let hash = row.password_hash.clone().expect("hash");
        assert!(hash.starts_with("$argon2id$"));
        assert!(
            test.state
                .passwords
                .verify("correct horse battery".into(), &hash)
                .await
                .expect("verify")
        );
        assert_eq!(row.locale, "fr", "kept: none chosen");
        assert_eq!(row.metadata, Some(json!({"lines": ["2"]})), "replaced");
        assert!(row.activate_time.is_some());
        // Nothing else moved (P15).
        assert_eq!(
            (
                &row.email,
                &row.role_id,
                &row.team_id,
                &row.products,
                &row.owner,
                &row.origin
            ),
            (
                &reserved.email,
                &reserved.role_id,
                &reserved.team_id,
                &reserved.products,
                &reserved.owner,
                &reserved.origin
            )
        );
        assert_eq!(audit_of(&test, &acct, "user.activated").await, 1);
        let snapshot = test
            .state
            .sessions
            .get_principal(row.id)
            .await
            .expect("redis")
            .expect("snapshot written");
        assert_eq!(snapshot.account_id, acct.id);

        // A retry, even with another password: the same user, untouched.
        let events = outbox(&test).await;
        accept.password = "another password entirely".into();
        let again = activate(&test, accept).await.expect("retry");
        assert!(again.already_activated);
        assert_eq!(again.user.expect("user").id, user_id);
        assert_eq!(
            stored(&test, &user_id).await.expect("row").password_hash,
            Some(hash)
        );
        assert_eq!(outbox(&test).await, events, "no second user.activated");
        test.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_activations_of_one_invitation_agree() {
        let test = start().await;
        let acct = account(&test, 5).await;
        let ada = invitee("ada@acme.example");
        let user_id = reserve(&test, reservation(&acct, vec![ada.clone()]))
            .await
            .expect("reserved")
            .results[0]
            .user_id
            .clone();
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let passwords = ["first password here", "second password here"];
        let calls: Vec<_> = passwords
            .iter()
            .map(|password| {
                let api = test.api.clone();
                let barrier = barrier.clone();
                let message = activation(&acct, &ada, &user_id, password);
                tokio::spawn(async move {
                    barrier.wait().await;
                    api.activate_invited_user(request(&svc(), message))
                        .await
                        .map(Response::into_inner)
                })
            })
            .collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.expect("task").expect("activated"));
        }
        let ids: Vec<_> = answers
            .iter()
            .map(|a| a.user.as_ref().expect("user").id.clone())
            .collect();
        assert_eq!(ids, [user_id.clone(), user_id.clone()]);
        let winners: Vec<usize> = answers
            .iter()
            .enumerate()
            .filter(|(_, a)| !a.already_activated)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(winners.len(), 1, "exactly one activation");
        let hash = stored(&test, &user_id)
            .await
            .expect("row")
            .password_hash
            .expect("hash");
        for (i, password) in passwords.iter().enumerate() {
            let verifies = test
                .state
                .passwords
                .verify((*password).into(), &hash)
                .await
                .expect("verify");
            assert_eq!(verifies, i == winners[0], "only the winner's password");
        }
        assert_eq!(users_of(&test, &acct).await, 2);
        assert_eq!(audit_of(&test, &acct, "user.activated").await, 1);
        test.stop().await;
    }

    // -- ReleaseInvitees -----------------------------------------------------

    #[tokio::test]
    async fn release_frees_the_seat_and_never_touches_members() {
        let test = start().await;
        let acct = account(&test, 3).await;
        let (ada, bob) = (invitee("ada@acme.example"), invitee("bob@acme.example"));
        let full = reserve(&test, reservation(&acct, vec![ada.clone(), bob.clone()]))
            .await
            .expect("reserved");
        let ada_id = full.results[0].user_id.clone();
        let cy = invitee("cy@acme.example");
        let refused = reserve(&test, reservation(&acct, vec![cy.clone()]))
            .await
            .expect("full");
        assert_eq!(verdicts(&refused), [Verdict::SeatLimitReached]);

        let events = outbox(&test).await;
        let answer = release(
            &test,
            &acct,
            vec![
                // A stale retry naming an older invitation: nothing happens.
                by_id(&ada_id, &Uuid::new_v4().to_string()),
                by_id(&ada_id, &ada.invitation_id),
                by_id(&ada_id, ""),
                internal::ReleaseTarget {
                    email: "Owner@Acme.example".into(),
                    ..Default::default()
                },
                by_id(&Uuid::new_v4().to_string(), ""),
            ],
        )
        .await
        .expect("released");
        assert_eq!(
            outcomes(&answer),
            [
                Outcome::NotFound,
                Outcome::Released,
                Outcome::NotFound,
                Outcome::NotInvited,
                Outcome::NotFound
            ]
        );
        assert_eq!(answer.results[1].user_id, ada_id);
        assert_eq!(answer.results[3].user_id, acct.owner.to_string());
        assert_eq!(
            answer.results[3].target.as_ref().expect("target").email,
            "Owner@Acme.example"
        );
        assert_eq!(answer.seats_used, 2);
        assert!(stored(&test, &ada_id).await.is_none());
        assert!(stored(&test, &acct.owner.to_string()).await.is_some());
        assert_eq!(outbox(&test).await, events + 1, "one user.deleted");
        let audit = audit_event::Entity::find()
            .filter(audit_event::Column::AccountId.eq(acct.id))
            .filter(audit_event::Column::Action.eq("user.deleted"))
            .one(&test.state.db)
            .await
            .expect("query")
            .expect("audit");
        assert_eq!(audit.target_id, ada_id);
        assert_eq!(audit.details.expect("details")["reason"], "revoked");

        // The freed seat goes to the next invitee.
        let now_reserved = reserve(&test, reservation(&acct, vec![cy]))
            .await
            .expect("reserved");
        assert_eq!(verdicts(&now_reserved), [Verdict::Reserved]);
        // By email, and idempotent.
        let by_email = || internal::ReleaseTarget {
            email: "bob@acme.example".into(),
            invitation_id: bob.invitation_id.clone(),
            ..Default::default()
        };
        let answer = release(&test, &acct, vec![by_email()]).await.expect("bob");
        assert_eq!(outcomes(&answer), [Outcome::Released]);
        let answer = release(&test, &acct, vec![by_email()])
            .await
            .expect("again");
        assert_eq!(outcomes(&answer), [Outcome::NotFound]);

        let err = release(
            &test,
            &acct,
            vec![
                internal::ReleaseTarget {
                    user_id: ada_id.clone(),
                    email: "ada@acme.example".into(),
                    invitation_id: String::new(),
                },
                internal::ReleaseTarget::default(),
                by_id("nope", ""),
            ],
        )
        .await
        .expect_err("invalid");
        assert_eq!(
            fields(&err),
            ["targets[0]", "targets[1]", "targets[2].user_id"]
        );
        let err = release(&test, &acct, vec![]).await.expect_err("empty");
        assert_eq!(fields(&err), ["targets"]);
        test.stop().await;
    }

    // -- Tenant isolation ----------------------------------------------------

    #[tokio::test]
    async fn another_accounts_ids_answer_not_found() {
        let test = start().await;
        let a = account(&test, 5).await;
        let b = account(&test, 5).await;
        let b_invitee = invitee("bea@acme.example");
        let b_user = reserve(&test, reservation(&b, vec![b_invitee.clone()]))
            .await
            .expect("b reserved")
            .results[0]
            .user_id
            .clone();

        let err = test
            .api
            .get_invitation_context(request(
                &svc(),
                internal::GetInvitationContextRequest {
                    account_id: a.id.to_string(),
                    inviter: Some(inviter(&b)),
                    ..Default::default()
                },
            ))
            .await
            .expect_err("b's inviter");
        assert_eq!(err.code(), Code::NotFound);
        let err = test
            .api
            .get_invitation_context(request(
                &svc(),
                internal::GetInvitationContextRequest {
                    account_id: a.id.to_string(),
                    role_id: b.admin_role.to_string(),
                    ..Default::default()
                },
            ))
            .await
            .expect_err("b's role");
        assert_eq!(err.code(), Code::NotFound);
        let mut message = reservation(&a, vec![invitee("x@acme.example")]);
        message.role_id = b.admin_role.to_string();
        let err = reserve(&test, message).await.expect_err("b's role");
        assert_eq!(err.code(), Code::NotFound);
        let err = activate(
            &test,
            activation(&a, &b_invitee, &b_user, "correct horse battery"),
        )
        .await
        .expect_err("b's user");
        assert_eq!(err.code(), Code::NotFound);
        let answer = release(&test, &a, vec![by_id(&b_user, "")])
            .await
            .expect("release");
        assert_eq!(outcomes(&answer), [Outcome::NotFound]);
        let answer = release(
            &test,
            &a,
            vec![internal::ReleaseTarget {
                email: "bea@acme.example".into(),
                ..Default::default()
            }],
        )
        .await
        .expect("release");
        assert_eq!(outcomes(&answer), [Outcome::NotFound]);
        assert_eq!(
            stored(&test, &b_user).await.expect("b untouched").status,
            crate::domain::UserStatus::Invited
        );
        // The same email may be invited in both accounts.
        let answer = reserve(&test, reservation(&a, vec![invitee("bea@acme.example")]))
            .await
            .expect("a reserved");
        assert_eq!(verdicts(&answer), [Verdict::Reserved]);
        let err = test
            .api
            .create_session(request(
                &svc(),
                internal::CreateSessionRequest {
                    account_id: a.id.to_string(),
                    user_id: b.owner.to_string(),
                    invitation_id: Uuid::new_v4().to_string(),
                    ..Default::default()
                },
            ))
            .await
            .expect_err("b's owner");
        assert_eq!(err.code(), Code::NotFound);
        test.stop().await;
    }

    // -- CreateSession -------------------------------------------------------

    #[tokio::test]
    async fn create_session_signs_in_the_new_member() {
        let test = start().await;
        let acct = account(&test, 5).await;
        let ada = invitee("ada@acme.example");
        let user_id = reserve(&test, reservation(&acct, vec![ada.clone()]))
            .await
            .expect("reserved")
            .results[0]
            .user_id
            .clone();
        let session_request = |invitation_id: &str| internal::CreateSessionRequest {
            account_id: acct.id.to_string(),
            user_id: user_id.clone(),
            invitation_id: invitation_id.into(),
            client_ip: "203.0.113.7".into(),
            user_agent: "Mozilla/5.0".into(),
        };
        let err = test
            .api
            .create_session(request(&svc(), session_request(&ada.invitation_id)))
            .await
            .expect_err("still invited");
        assert_eq!(reason(&err), "INVALID_STATE");

        activate(
            &test,
            activation(&acct, &ada, &user_id, "correct horse battery"),
        )
        .await
        .expect("activated");
        let err = test
            .api
            .create_session(request(
                &svc(),
                session_request(&Uuid::new_v4().to_string()),
            ))
            .await
            .expect_err("another invitation");
        assert_eq!(reason(&err), "INVALID_STATE");
        let err = test
            .api
            .create_session(request(&svc(), session_request("nope")))
            .await
            .expect_err("malformed");
        assert_eq!(fields(&err), ["invitation_id"]);

        let session = test
            .api
            .create_session(request(&svc(), session_request(&ada.invitation_id)))
            .await
            .expect("session")
            .into_inner()
            .session
            .expect("session");
        assert_eq!(session.user_id, user_id);
        assert_eq!(session.account_id, acct.id.to_string());
        assert!(!session.access_token.is_empty() && !session.refresh_token.is_empty());
        assert!(session.access_token_expire_time.is_some() && session.expire_time.is_some());
        let record = test
            .state
            .sessions
            .resolve_access(&session.access_token)
            .await
            .expect("redis")
            .expect("access token resolves");
        assert_eq!(record.id.to_string(), session.id);
        assert_eq!(record.user_id.to_string(), user_id);
        assert_eq!(record.client_ip.as_deref(), Some("203.0.113.7"));
        let snapshot = test
            .state
            .sessions
            .get_principal(record.user_id)
            .await
            .expect("redis")
            .expect("snapshot");
        assert!(
            snapshot.principal_for(&record).is_some(),
            "the gateway admits it"
        );
        assert!(
            stored(&test, &user_id)
                .await
                .expect("row")
                .last_sign_in_time
                .is_some()
        );
        test.stop().await;
    }
}
