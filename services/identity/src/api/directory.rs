//! DirectoryService: what the invitation service needs from identity —
//! the context of an invitation, seat reservations for invitees, activation
//! of an invited user on acceptance, releasing invitees, and the session of a
//! member who just joined. Each handler decodes its request into a command
//! (every violation at once), calls one function of `app::directory` and
//! maps the answer; the rules are in `domain::reservations`, the SQL in
//! `store::directory`.
//!
//! Every RPC is INTERNAL: the guard admits only a verified service assertion,
//! and each handler checks again that the caller is a service, because these
//! RPCs take the account from `account_id` (the invitation service got it
//! from its own caller's verified principal). Ids of another account answer
//! the same NOT_FOUND as unknown ones (P14).

use std::collections::HashSet;

use tonic::{Request, Response, Status};
use unicode_normalization::UnicodeNormalization;
use usher_kit::{
    email::EmailAddress,
    error::{ApiError, ApiResult, Reason, Violations},
    principal::{Principal, PrincipalKind},
};
use usher_proto::identity::v1 as pb;
use uuid::Uuid;

use super::{
    Call, IdentityApi, call, convert, internal, status,
    validate::{validate_metadata, validate_products},
};
use crate::{
    app::directory::{self as app, Inviter},
    domain::{
        effects::Actor,
        parse_id, parse_optional_id,
        reservations::{Acceptance, Invitee, ReleaseKey, ReleaseOutcome, ReleaseTarget, Verdict},
        validate_locale, validate_name,
    },
    store::accounts::Holder,
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
// Decoding

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

/// Whose permissions bound what a call grants (P26): nobody for no inviter,
/// a malformed id or another kind of actor.
fn holder_of(inviter: Option<&pb::Actor>) -> Option<Holder> {
    inviter.and_then(|actor| {
        let id = Uuid::parse_str(actor.id.trim()).ok()?;
        match pb::ActorKind::try_from(actor.kind) {
            Ok(pb::ActorKind::User) => Some(Holder::User(id)),
            Ok(pb::ActorKind::ApiKey) => Some(Holder::ApiKey(id)),
            _ => None,
        }
    })
}

fn verdict(verdict: Verdict) -> internal::ReservationVerdict {
    use internal::ReservationVerdict as Wire;
    match verdict {
        Verdict::Reserved => Wire::Reserved,
        Verdict::AlreadyInvited => Wire::AlreadyInvited,
        Verdict::AlreadyMember => Wire::AlreadyMember,
        Verdict::DomainNotAllowed => Wire::DomainNotAllowed,
        Verdict::SeatLimitReached => Wire::SeatLimitReached,
    }
}

fn outcome(outcome: ReleaseOutcome) -> internal::ReleaseOutcome {
    use internal::ReleaseOutcome as Wire;
    match outcome {
        ReleaseOutcome::Released => Wire::Released,
        ReleaseOutcome::NotFound => Wire::NotFound,
        ReleaseOutcome::NotInvited => Wire::NotInvited,
    }
}

fn id_text(id: Option<Uuid>) -> String {
    id.map(|i| i.to_string()).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Handlers

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
            return Err(app::missing());
        };

        let inviter = inviter.map(|(kind, id)| match kind {
            pb::ActorKind::User => Inviter::User(id),
            _ => Inviter::ApiKey(id),
        });
        app::invitation_context(
            &self.state,
            app::ContextQuery {
                account_id,
                role_id,
                team_id,
                inviter,
                holder: holder_of(request.inviter.as_ref()),
            },
        )
        .await
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
            return Err(app::missing());
        };

        let command = app::ReserveInvitees {
            account_id,
            role_id,
            team_id,
            products,
            metadata,
            locale,
            invitees,
            dry_run: request.dry_run,
            holder: holder_of(request.inviter.as_ref()),
            actor: actor_of(request.inviter.as_ref(), &call.principal),
        };
        let answer = app::reserve_invitees(&self.state, &call.request_id, command).await?;
        Ok(internal::ReserveInviteesResponse {
            results: answer
                .reserved
                .results
                .into_iter()
                .map(|r| internal::ReservationResult {
                    email: r.email,
                    verdict: verdict(r.verdict) as i32,
                    user_id: id_text(r.user_id),
                    existing_invitation_id: id_text(r.existing_invitation_id),
                })
                .collect(),
            seat_limit: answer.seat_limit,
            seats_used: seats(answer.reserved.seats_used),
            role_name: answer.role_name,
            team_name: answer.team_name,
            context: Some(answer.context),
        })
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
            return Err(app::missing());
        };
        let command = app::ActivateInvitedUser {
            invitation_id,
            account_id,
            user_id,
            password,
            acceptance: Acceptance {
                display_name: name,
                locale,
                metadata,
            },
        };
        app::activate_invited_user(&self.state, &call.request_id, command).await
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
                targets.push(ReleaseTarget {
                    key,
                    invitation_id: guard,
                });
            }
        }
        violations.into_result()?;
        let Some(account_id) = account_id else {
            return Err(app::missing());
        };

        let command = app::ReleaseInvitees {
            account_id,
            targets,
            reason: reason_name(request.reason),
            actor: actor_of(request.actor.as_ref(), &call.principal),
        };
        let (released, seats_used) =
            app::release_invitees(&self.state, &call.request_id, command).await?;
        Ok(internal::ReleaseInviteesResponse {
            results: released
                .results
                .into_iter()
                .zip(&request.targets)
                .map(|((done, user_id), given)| internal::ReleaseResult {
                    target: Some(given.clone()),
                    outcome: outcome(done) as i32,
                    user_id: id_text(user_id),
                })
                .collect(),
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
            return Err(app::missing());
        };

        let optional = |value: &str| (!value.is_empty()).then(|| value.to_owned());
        let command = app::CreateSession {
            account_id,
            user_id,
            invitation_id,
            meta_client_ip: optional(&request.client_ip),
            meta_user_agent: optional(&request.user_agent),
        };
        let issued = app::create_session(&self.state, command).await?;
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
