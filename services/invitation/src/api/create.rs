//! CreateInvitations: parse, de-duplicate, reserve seats in identity, then
//! create the invitations, their tokens and their emails.
//!
//! Order of effects, chosen so that a failure at any step leaves nothing
//! half-done that matters:
//! 1. identity reserves an INVITED user per eligible invitee (idempotent per
//!    invitation id; with a `request_id` the ids are derived from it, so a
//!    retry after a crash reserves the same users again instead of leaking
//!    seats);
//! 2. the token keys are written to Redis (a key whose invitation never
//!    commits points at nothing: PostgreSQL is the guard);
//! 3. one PostgreSQL transaction inserts the invitations, their email jobs and
//!    `invitation.created` events (outbox) and the idempotent answer.
//!
//! If step 2 or 3 fails, the reserved users are released (reason ROLLBACK)
//! and the quota given back, best effort.

use std::collections::HashMap;

use sea_orm::{ActiveModelTrait, EntityTrait, IntoActiveModel, TransactionTrait};
use sha2::{Digest, Sha256};
use usher_kit::{
    convert::{json_strings, struct_to_json},
    email::{self, EmailAddress},
    error::{ApiError, ApiResult},
    idempotency::IdempotencyKey,
    outbox,
    principal::Principal,
    tokens::Token,
};
use usher_proto::{
    identity::internal::v1 as internal, invitation::v1 as pb, notification::v1 as notification,
};
use uuid::Uuid;

use super::{InvitationApi, convert, lifetime, messages, parse_id, parse_optional_id};
use crate::store::{entities::invitation, tokens::TokenEntry};

/// Most invitees in one call (list entries or pasted entries).
pub const MAX_INVITEES: usize = 1_000;
/// Longest pasted text.
pub const MAX_RAW_TEXT_BYTES: usize = 512 * 1024;
/// Longest display name given by the admin.
pub const MAX_DISPLAY_NAME_CHARS: usize = 200;

/// One entry of the request, parsed.
struct Entry {
    input: String,
    display_name: String,
    parsed: Result<EmailAddress, String>,
}

fn entries(request: &pb::CreateInvitationsRequest) -> ApiResult<Vec<Entry>> {
    let has_list = !request.invitees.is_empty();
    let has_text = !request.raw_text.trim().is_empty();
    if has_list == has_text {
        return Err(ApiError::invalid(
            if has_list { "raw_text" } else { "invitees" },
            "give exactly one of invitees and raw_text",
        ));
    }
    if has_list {
        if request.invitees.len() > MAX_INVITEES {
            return Err(ApiError::invalid(
                "invitees",
                format!("at most {MAX_INVITEES} invitees per call"),
            ));
        }
        let mut violations = usher_kit::error::Violations::new();
        let entries = request
            .invitees
            .iter()
            .enumerate()
            .map(|(i, invitee)| {
                let display_name = invitee.display_name.trim().to_owned();
                if display_name.chars().count() > MAX_DISPLAY_NAME_CHARS
                    || display_name.chars().any(char::is_control)
                {
                    violations.add(
                        format!("invitees[{i}].display_name"),
                        "at most 200 characters, no control characters",
                    );
                }
                Entry {
                    input: invitee.email.clone(),
                    display_name,
                    parsed: EmailAddress::parse(invitee.email.trim()).map_err(|e| e.to_string()),
                }
            })
            .collect();
        violations.into_result()?;
        return Ok(entries);
    }
    if request.raw_text.len() > MAX_RAW_TEXT_BYTES {
        return Err(ApiError::invalid("raw_text", "must be at most 512 KiB"));
    }
    let listed = email::parse_list(&request.raw_text)
        .map_err(|e| ApiError::invalid("raw_text", e.to_string()))?;
    if listed.len() > MAX_INVITEES {
        return Err(ApiError::invalid(
            "raw_text",
            format!("at most {MAX_INVITEES} entries per call"),
        ));
    }
    Ok(listed
        .into_iter()
        .map(|entry| Entry {
            display_name: entry
                .display_name
                .unwrap_or_default()
                .chars()
                .take(MAX_DISPLAY_NAME_CHARS)
                .collect(),
            input: entry.input,
            parsed: entry.result.map_err(|e| e.to_string()),
        })
        .collect())
}

/// The id of the invitation for `email` in the call `request_id` of
/// `account`: derived when the call is idempotent (a retry reserves the same
/// users in identity), random otherwise.
fn invitation_id(account: Uuid, request_id: Option<&str>, email: &str) -> Uuid {
    match request_id {
        None => Uuid::now_v7(),
        Some(request_id) => {
            let digest = Sha256::new()
                .chain_update(account.as_bytes())
                .chain_update(request_id.as_bytes())
                .chain_update([0])
                .chain_update(email.as_bytes())
                .finalize();
            let mut bytes = [0u8; 16];
            bytes.copy_from_slice(&digest[..16]);
            uuid::Builder::from_random_bytes(bytes).into_uuid()
        }
    }
}

fn verdict_of(reservation: internal::ReservationVerdict) -> pb::InviteeVerdict {
    match reservation {
        internal::ReservationVerdict::Reserved => pb::InviteeVerdict::Invited,
        internal::ReservationVerdict::AlreadyMember => pb::InviteeVerdict::AlreadyMember,
        internal::ReservationVerdict::AlreadyInvited => pb::InviteeVerdict::AlreadyInvited,
        internal::ReservationVerdict::SeatLimitReached => pb::InviteeVerdict::SeatLimitReached,
        internal::ReservationVerdict::DomainNotAllowed => pb::InviteeVerdict::DomainNotAllowed,
        internal::ReservationVerdict::Unspecified => pb::InviteeVerdict::Unspecified,
    }
}

impl InvitationApi {
    /// CreateInvitations.
    pub(super) async fn create(
        &self,
        caller: &Principal,
        mut request: pb::CreateInvitationsRequest,
        call_id: &str,
    ) -> ApiResult<pb::CreateInvitationsResponse> {
        let account_id = caller.account()?;
        let role_id = if request.role_id.trim().is_empty() {
            return Err(ApiError::invalid("role_id", "a role is required"));
        } else {
            parse_id("role_id", &request.role_id)?
        };
        let team_id = parse_optional_id("team_id", &request.team_id)?;
        if request.products.len() > 50 {
            return Err(ApiError::invalid("products", "at most 50 products"));
        }
        let entries = entries(&request)?;
        let request_id = std::mem::take(&mut request.request_id);
        let idempotency = if request.dry_run {
            None
        } else {
            IdempotencyKey::new(
                caller,
                "usher.invitation.v1.InvitationService/CreateInvitations",
                &request_id,
                &request,
            )?
        };
        if let Some(key) = &idempotency
            && let Some(answer) = key.replay(&self.state.db).await?
        {
            return Ok(answer);
        }

        let now = self.now();
        let inviter = convert::actor(caller);
        let context = self
            .context(
                account_id,
                Some(inviter.clone()),
                Some(role_id),
                team_id,
                call_id,
            )
            .await?;
        let account = context.account.clone().unwrap_or_default();
        // Named from here on: the events and identity's audit log show who.
        let inviter = usher_proto::identity::v1::Actor {
            display_name: context.inviter_display_name.clone(),
            ..inviter
        };

        // Verdicts that need no one else: invalid and repeated addresses.
        let mut results: Vec<pb::InviteeResult> = Vec::with_capacity(entries.len());
        let mut first_of: HashMap<String, usize> = HashMap::new();
        let mut candidates: Vec<usize> = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let mut result = pb::InviteeResult {
                input: entry.input.clone(),
                display_name: entry.display_name.clone(),
                ..Default::default()
            };
            match &entry.parsed {
                Err(reason) => {
                    result.verdict = pb::InviteeVerdict::InvalidAddress as i32;
                    result.reason = reason.chars().take(200).collect();
                }
                Ok(address) => {
                    result.email = address.canonical().to_owned();
                    if first_of.contains_key(address.canonical()) {
                        result.verdict = pb::InviteeVerdict::DuplicateInRequest as i32;
                    } else {
                        first_of.insert(address.canonical().to_owned(), i);
                        candidates.push(i);
                    }
                }
            }
            results.push(result);
        }

        // The hourly quota, in request order.
        let quota = self.state.rules.hourly_quota;
        let granted = if request.dry_run {
            candidates.len()
        } else {
            let wanted = u32::try_from(candidates.len()).unwrap_or(u32::MAX);
            usize::try_from(
                self.state
                    .tokens
                    .take_quota(account_id, wanted, quota, now)
                    .await?,
            )
            .unwrap_or(0)
        };
        for &i in &candidates[granted..] {
            results[i].verdict = pb::InviteeVerdict::QuotaExceeded as i32;
        }
        let candidates = &candidates[..granted];

        let idempotent_id = idempotency.as_ref().map(|key| key.request_id.as_str());
        let ids: Vec<Uuid> = candidates
            .iter()
            .map(|&i| invitation_id(account_id, idempotent_id, &results[i].email))
            .collect();
        let mut seats_used = account.seats_used;
        let mut reservation = internal::ReserveInviteesResponse::default();
        if !candidates.is_empty() {
            let reserve = internal::ReserveInviteesRequest {
                account_id: account_id.to_string(),
                inviter: Some(inviter.clone()),
                role_id: role_id.to_string(),
                team_id: team_id.map(|id| id.to_string()).unwrap_or_default(),
                products: request.products.clone(),
                metadata: request.metadata.clone(),
                invitees: candidates
                    .iter()
                    .zip(&ids)
                    .map(|(&i, id)| internal::Invitee {
                        email: results[i].email.clone(),
                        display_name: results[i].display_name.clone(),
                        invitation_id: id.to_string(),
                    })
                    .collect(),
                dry_run: request.dry_run,
                locale: request.locale.clone(),
            };
            reservation = match self
                .state
                .directory
                .clone()
                .reserve_invitees(usher_kit::client::with_request_id(reserve, call_id))
                .await
            {
                Ok(answer) => answer.into_inner(),
                Err(status) => {
                    self.give_back(account_id, granted, now).await;
                    return Err(status.into());
                }
            };
            seats_used = reservation.seats_used;
        }

        let expire_time = now + lifetime(&context);
        let mut created: Vec<(usize, invitation::Model, Token)> = Vec::new();
        for ((&i, id), reserved) in candidates.iter().zip(&ids).zip(&reservation.results) {
            let verdict = internal::ReservationVerdict::try_from(reserved.verdict)
                .unwrap_or(internal::ReservationVerdict::Unspecified);
            results[i].verdict = verdict_of(verdict) as i32;
            results[i].existing_invitation_id = reserved.existing_invitation_id.clone();
            if verdict != internal::ReservationVerdict::Reserved || request.dry_run {
                continue;
            }
            let Ok(user_id) = Uuid::parse_str(&reserved.user_id) else {
                return Err(ApiError::Internal(anyhow::anyhow!(
                    "identity reserved no user id"
                )));
            };
            let (token, hash) = self.state.tokens.generate();
            let model = invitation::Model {
                id: *id,
                account_id,
                email: results[i].email.clone(),
                display_name: results[i].display_name.clone(),
                state: convert::PENDING.to_owned(),
                role_id,
                role_name: reservation.role_name.clone(),
                team_id,
                team_name: reservation.team_name.clone(),
                products: json_strings(request.products.iter().map(|p| p.trim())),
                metadata: request
                    .metadata
                    .as_ref()
                    .filter(|m| !m.fields.is_empty())
                    .map(struct_to_json),
                inviter_kind: convert::actor_kind_name(
                    usher_proto::identity::v1::ActorKind::try_from(inviter.kind)
                        .unwrap_or_default(),
                )
                .to_owned(),
                inviter_id: inviter.id.clone(),
                inviter_name: context.inviter_display_name.clone(),
                user_id,
                locale: request.locale.trim().to_owned(),
                token_version: 1,
                token_hash: hash,
                create_time: now,
                update_time: now,
                expire_time,
                accept_time: None,
                revoke_time: None,
                decline_time: None,
                claim_until: None,
                resend_count: 0,
                last_send_time: now,
                delivery_job_id: String::new(),
                delivery_status: notification::DeliveryStatus::Queued as i32,
                delivery_reason: String::new(),
                delivery_attempts: 0,
                delivery_update_time: Some(now),
                expiry_published: false,
            };
            created.push((i, model, token));
        }
        let not_invited = granted - created.len();

        let committed = if request.dry_run {
            Ok(())
        } else {
            self.commit_created(
                &mut created,
                &mut results,
                &inviter,
                &account,
                idempotency.as_ref(),
                seats_used,
                call_id,
            )
            .await
        };
        let response = respond(results, request.dry_run, seats_used, seat_limit(&account));
        if let Err(err) = committed {
            self.roll_back(account_id, &created, granted, now, call_id)
                .await;
            return Err(err);
        }
        if !request.dry_run {
            self.give_back(account_id, not_invited, now).await;
        }
        Ok(response)
    }

    /// Writes the token keys, then the invitations, outbox and idempotent
    /// answer in one transaction.
    #[allow(clippy::too_many_arguments)]
    async fn commit_created(
        &self,
        created: &mut [(usize, invitation::Model, Token)],
        results: &mut [pb::InviteeResult],
        inviter: &usher_proto::identity::v1::Actor,
        account: &usher_proto::identity::v1::Account,
        idempotency: Option<&IdempotencyKey>,
        seats_used: i32,
        call_id: &str,
    ) -> ApiResult<()> {
        let now = self.now();
        let context = messages::EmailContext {
            account_name: account.name.clone(),
            account_locale: account.default_locale.clone(),
            request_id: call_id.to_owned(),
        };
        let mut outgoing = Vec::with_capacity(created.len() * 2);
        for (_, model, token) in created.iter_mut() {
            let (job, job_id) = messages::invitation_email(
                &self.state,
                model,
                token,
                notification::EmailTemplate::Invitation,
                &context,
                now,
            )?;
            model.delivery_job_id = job_id;
            outgoing.push(job);
            outgoing.push(messages::created(
                model,
                inviter,
                idempotency.map_or("", |key| key.request_id.as_str()),
                now,
            ));
        }
        for (i, model, _) in created.iter() {
            results[*i].invitation = Some(convert::invitation(model, now));
        }
        let entries: Vec<TokenEntry> = created
            .iter()
            .map(|(_, model, _)| TokenEntry {
                hash: model.token_hash.clone(),
                invitation_id: model.id,
                version: model.token_version,
                expire_time: model.expire_time,
            })
            .collect();
        self.state.tokens.put(&entries, now).await?;

        let txn = self.state.db.begin().await?;
        for chunk in created.chunks(200) {
            let rows = chunk.iter().map(|(_, model, _)| active(model));
            invitation::Entity::insert_many(rows).exec(&txn).await?;
        }
        outbox::enqueue(&txn, &outgoing).await?;
        if let Some(key) = idempotency {
            let answer = respond(results.to_vec(), false, seats_used, seat_limit(account));
            key.remember(&txn, &answer, now).await?;
        }
        txn.commit().await?;
        metrics::counter!("usher_invitations_created_total").increment(created.len() as u64);
        Ok(())
    }

    /// Undoes what a failed create did outside PostgreSQL, best effort.
    async fn roll_back(
        &self,
        account_id: Uuid,
        created: &[(usize, invitation::Model, Token)],
        granted: usize,
        now: chrono::DateTime<chrono::Utc>,
        call_id: &str,
    ) {
        let hashes: Vec<String> = created
            .iter()
            .map(|(_, m, _)| m.token_hash.clone())
            .collect();
        self.state.tokens.forget(&hashes, "rolled back").await;
        let targets: Vec<(Uuid, Uuid)> =
            created.iter().map(|(_, m, _)| (m.user_id, m.id)).collect();
        if let Err(err) = self
            .release(
                account_id,
                convert::actor(&Principal::service(crate::SERVICE)),
                &targets,
                internal::ReleaseReason::Rollback,
                call_id,
            )
            .await
        {
            tracing::warn!(error = %err, "rollback: reserved invitees not released");
        }
        self.give_back(account_id, granted, now).await;
    }

    pub(super) async fn give_back(
        &self,
        account_id: Uuid,
        count: usize,
        now: chrono::DateTime<chrono::Utc>,
    ) {
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        if let Err(err) = self
            .state
            .tokens
            .give_back_quota(account_id, count, self.state.rules.hourly_quota, now)
            .await
        {
            tracing::warn!(error = %err, "quota not given back");
        }
    }
}

/// The account's seat limit (0 when identity did not say).
fn seat_limit(account: &usher_proto::identity::v1::Account) -> i32 {
    account.subscription.as_ref().map_or(0, |s| s.seat_limit)
}

/// The response for `results`.
fn respond(
    results: Vec<pb::InviteeResult>,
    dry_run: bool,
    seats_used: i32,
    seat_limit: i32,
) -> pb::CreateInvitationsResponse {
    let invited = results
        .iter()
        .filter(|r| r.verdict == pb::InviteeVerdict::Invited as i32)
        .count();
    let invited = i32::try_from(invited).unwrap_or(i32::MAX);
    let total = i32::try_from(results.len()).unwrap_or(i32::MAX);
    pb::CreateInvitationsResponse {
        results,
        invited_count: invited,
        not_invited_count: total - invited,
        dry_run,
        seats_used,
        seat_limit,
    }
}

/// The row to insert for `model`: every column set.
pub(super) fn active(model: &invitation::Model) -> invitation::ActiveModel {
    model.clone().into_active_model().reset_all()
}
