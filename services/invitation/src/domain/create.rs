//! The rules of CreateInvitations, in the order the saga applies them
//! (`crate::app::create`): the request becomes a [`CreateCommand`] (every
//! entry parsed); [`triage`] gives the verdicts that need no one else
//! (invalid and repeated addresses); [`Triage::limit`] applies the hourly
//! quota in request order; [`Triage::apply_reservation`] takes identity's
//! verdicts; [`new_invitation`] makes the row of each reserved invitee;
//! [`respond`] counts the answer.

use std::collections::HashSet;

use chrono::{DateTime, Duration, Utc};
use sha2::{Digest, Sha256};
use usher_kit::{
    convert::struct_to_json,
    email::{self, EmailAddress},
    error::{ApiError, ApiResult, Violations},
};
use usher_proto::{
    identity::{internal::v1 as internal, v1 as identity},
    invitation::v1 as pb,
    notification::v1 as notification,
};
use uuid::Uuid;

use super::{
    Invitation, StoredState,
    actors::actor_kind_name,
    input::{parse_id, parse_optional_id},
};

/// Most invitees in one call (list entries or pasted entries).
pub const MAX_INVITEES: usize = 1_000;
/// Longest pasted text.
pub const MAX_RAW_TEXT_BYTES: usize = 512 * 1024;
/// Longest display name given by the admin.
pub const MAX_DISPLAY_NAME_CHARS: usize = 200;
/// Most products granted by one call.
pub const MAX_PRODUCTS: usize = 50;

/// One entry of the request, parsed.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The entry as given.
    pub input: String,
    /// The invitee's name (given, or found in the pasted text).
    pub display_name: String,
    /// The address, or why it is not one.
    pub parsed: Result<EmailAddress, String>,
}

/// A CreateInvitations request, checked.
#[derive(Clone, Debug)]
pub struct CreateCommand {
    /// The role the invitees get.
    pub role_id: Uuid,
    /// The team they join, if any.
    pub team_id: Option<Uuid>,
    /// Every entry, in request order.
    pub entries: Vec<Entry>,
}

impl CreateCommand {
    /// Checks `request`: a role, an optional team, at most 50 products, and
    /// exactly one of an invitee list and a pasted text.
    pub fn parse(request: &pb::CreateInvitationsRequest) -> ApiResult<Self> {
        let role_id = if request.role_id.trim().is_empty() {
            return Err(ApiError::invalid("role_id", "a role is required"));
        } else {
            parse_id("role_id", &request.role_id)?
        };
        let team_id = parse_optional_id("team_id", &request.team_id)?;
        if request.products.len() > MAX_PRODUCTS {
            return Err(ApiError::invalid("products", "at most 50 products"));
        }
        Ok(Self {
            role_id,
            team_id,
            entries: entries(request)?,
        })
    }
}

/// The entries of `request`: its invitee list (each display name checked)
/// or its pasted text (parsed by the one address-list parser).
pub fn entries(request: &pb::CreateInvitationsRequest) -> ApiResult<Vec<Entry>> {
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
        let mut violations = Violations::new();
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
pub fn invitation_id(account: Uuid, request_id: Option<&str>, email: &str) -> Uuid {
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

/// The invitee's verdict for identity's reservation verdict.
pub fn verdict_of(reservation: internal::ReservationVerdict) -> pb::InviteeVerdict {
    match reservation {
        internal::ReservationVerdict::Reserved => pb::InviteeVerdict::Invited,
        internal::ReservationVerdict::AlreadyMember => pb::InviteeVerdict::AlreadyMember,
        internal::ReservationVerdict::AlreadyInvited => pb::InviteeVerdict::AlreadyInvited,
        internal::ReservationVerdict::SeatLimitReached => pb::InviteeVerdict::SeatLimitReached,
        internal::ReservationVerdict::DomainNotAllowed => pb::InviteeVerdict::DomainNotAllowed,
        internal::ReservationVerdict::Unspecified => pb::InviteeVerdict::Unspecified,
    }
}

/// The verdicts so far, one per entry, and which entries are still
/// candidates (valid, first of their address), in request order.
#[derive(Clone, Debug, Default)]
pub struct Triage {
    /// One result per entry, in request order.
    pub results: Vec<pb::InviteeResult>,
    /// Indexes into `results` of the entries still to be invited.
    pub candidates: Vec<usize>,
}

/// One invitee identity reserved a user for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reserved {
    /// Index into the results.
    pub index: usize,
    /// The invitation id sent to identity.
    pub invitation_id: Uuid,
    /// The INVITED user.
    pub user_id: Uuid,
}

/// The verdicts that need no one else: an entry that is no address is
/// INVALID_ADDRESS, a repeated address DUPLICATE_IN_REQUEST; the first of
/// each address is a candidate.
pub fn triage(entries: &[Entry]) -> Triage {
    let mut triage = Triage {
        results: Vec::with_capacity(entries.len()),
        candidates: Vec::new(),
    };
    let mut seen: HashSet<String> = HashSet::new();
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
                if seen.insert(address.canonical().to_owned()) {
                    triage.candidates.push(i);
                } else {
                    result.verdict = pb::InviteeVerdict::DuplicateInRequest as i32;
                }
            }
        }
        triage.results.push(result);
    }
    triage
}

impl Triage {
    /// Keeps the first `granted` candidates (the hourly quota grants sends
    /// in request order); the others are QUOTA_EXCEEDED.
    pub fn limit(&mut self, granted: usize) {
        let granted = granted.min(self.candidates.len());
        for &i in &self.candidates[granted..] {
            self.results[i].verdict = pb::InviteeVerdict::QuotaExceeded as i32;
        }
        self.candidates.truncate(granted);
    }

    /// The invitees to reserve in identity, with the invitation ids `ids`
    /// (one per candidate).
    pub fn invitees(&self, ids: &[Uuid]) -> Vec<internal::Invitee> {
        self.candidates
            .iter()
            .zip(ids)
            .map(|(&i, id)| internal::Invitee {
                email: self.results[i].email.clone(),
                display_name: self.results[i].display_name.clone(),
                invitation_id: id.to_string(),
            })
            .collect()
    }

    /// Takes identity's verdict for each candidate (whose invitation ids are
    /// `ids`) and returns those identity reserved a user for; none on a dry
    /// run. A reservation without a user id is identity's bug.
    pub fn apply_reservation(
        &mut self,
        ids: &[Uuid],
        reservation: &internal::ReserveInviteesResponse,
        dry_run: bool,
    ) -> ApiResult<Vec<Reserved>> {
        let mut reserved = Vec::new();
        for ((&i, id), answer) in self.candidates.iter().zip(ids).zip(&reservation.results) {
            let verdict = internal::ReservationVerdict::try_from(answer.verdict)
                .unwrap_or(internal::ReservationVerdict::Unspecified);
            self.results[i].verdict = verdict_of(verdict) as i32;
            self.results[i].existing_invitation_id = answer.existing_invitation_id.clone();
            if verdict != internal::ReservationVerdict::Reserved || dry_run {
                continue;
            }
            let Ok(user_id) = Uuid::parse_str(&answer.user_id) else {
                return Err(ApiError::Internal(anyhow::anyhow!(
                    "identity reserved no user id"
                )));
            };
            reserved.push(Reserved {
                index: i,
                invitation_id: *id,
                user_id,
            });
        }
        Ok(reserved)
    }
}

/// What every invitation of one call shares.
#[derive(Clone, Debug)]
pub struct Batch<'a> {
    /// The inviting account.
    pub account_id: Uuid,
    /// The role, with its name as identity gave it.
    pub role: (Uuid, &'a str),
    /// The team, if any, and its name.
    pub team: (Option<Uuid>, &'a str),
    /// The request (products, metadata, locale).
    pub request: &'a pb::CreateInvitationsRequest,
    /// The inviter, named.
    pub inviter: &'a identity::Actor,
    /// When the links stop working.
    pub expire_time: DateTime<Utc>,
}

/// The new PENDING invitation of `reserved`, whose result is `result`, with
/// the link whose hash is `token_hash`.
pub fn new_invitation(
    batch: &Batch<'_>,
    reserved: Reserved,
    result: &pb::InviteeResult,
    token_hash: String,
    now: DateTime<Utc>,
) -> Invitation {
    let request = batch.request;
    Invitation {
        id: reserved.invitation_id,
        account_id: batch.account_id,
        email: result.email.clone(),
        display_name: result.display_name.clone(),
        state: StoredState::Pending,
        role_id: batch.role.0,
        role_name: batch.role.1.to_owned(),
        team_id: batch.team.0,
        team_name: batch.team.1.to_owned(),
        products: request
            .products
            .iter()
            .map(|p| p.trim().to_owned())
            .collect(),
        metadata: request
            .metadata
            .as_ref()
            .filter(|m| !m.fields.is_empty())
            .map(struct_to_json),
        inviter_kind: actor_kind_name(
            identity::ActorKind::try_from(batch.inviter.kind).unwrap_or_default(),
        )
        .to_owned(),
        inviter_id: batch.inviter.id.clone(),
        inviter_name: batch.inviter.display_name.clone(),
        user_id: reserved.user_id,
        locale: request.locale.trim().to_owned(),
        token_version: 1,
        token_hash,
        create_time: now,
        update_time: now,
        expire_time: batch.expire_time,
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
    }
}

/// The account's seat limit (0 when identity did not say).
pub fn seat_limit(account: &identity::Account) -> i32 {
    account.subscription.as_ref().map_or(0, |s| s.seat_limit)
}

/// How long the account's links live, as identity tells it (see
/// [`super::lifetime`]).
pub fn link_lifetime(context: &internal::GetInvitationContextResponse) -> Duration {
    super::lifetime(
        context
            .account
            .as_ref()
            .and_then(|account| account.invitation_lifetime)
            .map(|d| Duration::seconds(d.seconds)),
    )
}

/// The answer for `results`: the invited and the others counted.
pub fn respond(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::fixtures::{at, create_request as listed, fields};

    fn verdicts(results: &[pb::InviteeResult]) -> Vec<pb::InviteeVerdict> {
        results.iter().map(|r| r.verdict()).collect()
    }

    #[test]
    fn a_command_needs_a_role_and_one_kind_of_list() {
        let ok = CreateCommand::parse(&listed(&["a@x.example"])).unwrap();
        assert_eq!(ok.role_id, Uuid::from_u128(3));
        assert_eq!(ok.team_id, None);
        let no_role = pb::CreateInvitationsRequest {
            role_id: " ".into(),
            ..listed(&["a@x.example"])
        };
        assert_eq!(
            fields(CreateCommand::parse(&no_role).unwrap_err()),
            ["role_id"]
        );
        let bad_team = pb::CreateInvitationsRequest {
            team_id: "x".into(),
            ..listed(&["a@x.example"])
        };
        assert_eq!(
            fields(CreateCommand::parse(&bad_team).unwrap_err()),
            ["team_id"]
        );
        let products = pb::CreateInvitationsRequest {
            products: vec!["p".into(); 51],
            ..listed(&["a@x.example"])
        };
        assert_eq!(
            fields(CreateCommand::parse(&products).unwrap_err()),
            ["products"]
        );
        assert_eq!(
            fields(CreateCommand::parse(&listed(&[])).unwrap_err()),
            ["invitees"]
        );
        let both = pb::CreateInvitationsRequest {
            raw_text: "b@x.example".into(),
            ..listed(&["a@x.example"])
        };
        assert_eq!(
            fields(CreateCommand::parse(&both).unwrap_err()),
            ["raw_text"]
        );
    }

    #[test]
    fn entries_check_every_display_name_and_bound_the_list() {
        let mut request = listed(&["a@x.example", "b@x.example", "c@x.example"]);
        request.invitees[0].display_name = "n".repeat(201);
        request.invitees[2].display_name = "a\u{0}b".into();
        assert_eq!(
            fields(entries(&request).unwrap_err()),
            ["invitees[0].display_name", "invitees[2].display_name"]
        );
        let many: Vec<String> = (0..=MAX_INVITEES)
            .map(|i| format!("u{i}@x.example"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(fields(entries(&listed(&many)).unwrap_err()), ["invitees"]);
        let pasted = pb::CreateInvitationsRequest {
            raw_text: "x".repeat(MAX_RAW_TEXT_BYTES + 1),
            ..Default::default()
        };
        assert_eq!(fields(entries(&pasted).unwrap_err()), ["raw_text"]);
    }

    #[test]
    fn pasted_text_keeps_names_and_bad_entries() {
        let request = pb::CreateInvitationsRequest {
            raw_text: "Ann Lee <ann@x.example>, not an address".into(),
            ..Default::default()
        };
        let entries = entries(&request).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].display_name, "Ann Lee");
        assert!(entries[0].parsed.is_ok());
        assert!(entries[1].parsed.is_err());
    }

    #[test]
    fn triage_rejects_invalid_and_repeated_addresses_in_request_order() {
        let request = listed(&["Ann@X.example", "nope", "ann@x.example", "bob@x.example"]);
        let triage = triage(&entries(&request).unwrap());
        assert_eq!(
            verdicts(&triage.results),
            [
                pb::InviteeVerdict::Unspecified,
                pb::InviteeVerdict::InvalidAddress,
                pb::InviteeVerdict::DuplicateInRequest,
                pb::InviteeVerdict::Unspecified,
            ]
        );
        assert_eq!(triage.candidates, [0, 3]);
        assert_eq!(triage.results[0].email, "ann@x.example");
        assert!(!triage.results[1].reason.is_empty());
    }

    #[test]
    fn the_quota_keeps_the_first_candidates() {
        let request = listed(&["a@x.example", "b@x.example", "c@x.example"]);
        let mut triage = triage(&entries(&request).unwrap());
        triage.limit(1);
        assert_eq!(triage.candidates, [0]);
        assert_eq!(
            verdicts(&triage.results)[1..],
            [
                pb::InviteeVerdict::QuotaExceeded,
                pb::InviteeVerdict::QuotaExceeded
            ]
        );
        let ids = [Uuid::from_u128(10)];
        let invitees = triage.invitees(&ids);
        assert_eq!(invitees.len(), 1);
        assert_eq!(invitees[0].email, "a@x.example");
        assert_eq!(invitees[0].invitation_id, ids[0].to_string());
    }

    fn answer(verdict: internal::ReservationVerdict, user: &str) -> internal::ReservationResult {
        internal::ReservationResult {
            verdict: verdict as i32,
            user_id: user.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn identity_verdicts_are_taken_and_reserved_users_returned() {
        let request = listed(&["a@x.example", "b@x.example", "c@x.example"]);
        let base = triage(&entries(&request).unwrap());
        let ids = [
            Uuid::from_u128(10),
            Uuid::from_u128(11),
            Uuid::from_u128(12),
        ];
        let user = Uuid::from_u128(20);
        let reservation = internal::ReserveInviteesResponse {
            results: vec![
                answer(internal::ReservationVerdict::Reserved, &user.to_string()),
                answer(internal::ReservationVerdict::AlreadyMember, ""),
                answer(internal::ReservationVerdict::SeatLimitReached, ""),
            ],
            ..Default::default()
        };
        let mut triage = base.clone();
        let reserved = triage.apply_reservation(&ids, &reservation, false).unwrap();
        assert_eq!(
            reserved,
            [Reserved {
                index: 0,
                invitation_id: ids[0],
                user_id: user
            }]
        );
        assert_eq!(
            verdicts(&triage.results),
            [
                pb::InviteeVerdict::Invited,
                pb::InviteeVerdict::AlreadyMember,
                pb::InviteeVerdict::SeatLimitReached,
            ]
        );
        let mut dry = base.clone();
        assert!(
            dry.apply_reservation(&ids, &reservation, true)
                .unwrap()
                .is_empty()
        );
        assert_eq!(dry.results[0].verdict(), pb::InviteeVerdict::Invited);
        let mut broken = base;
        let no_user = internal::ReserveInviteesResponse {
            results: vec![answer(internal::ReservationVerdict::Reserved, "")],
            ..Default::default()
        };
        assert!(matches!(
            broken.apply_reservation(&ids, &no_user, false),
            Err(ApiError::Internal(_))
        ));
    }

    #[test]
    fn idempotent_calls_derive_their_ids() {
        let account = Uuid::from_u128(1);
        let id = invitation_id(account, Some("r1"), "a@x.example");
        assert_eq!(id, invitation_id(account, Some("r1"), "a@x.example"));
        assert_ne!(id, invitation_id(account, Some("r1"), "b@x.example"));
        assert_ne!(id, invitation_id(account, Some("r2"), "a@x.example"));
        assert_ne!(
            id,
            invitation_id(Uuid::from_u128(2), Some("r1"), "a@x.example")
        );
        assert_ne!(
            invitation_id(account, None, "a@x.example"),
            invitation_id(account, None, "a@x.example")
        );
    }

    #[test]
    fn a_new_invitation_is_pending_with_its_first_link() {
        let mut request = listed(&["a@x.example"]);
        request.products = vec![" chat ".into()];
        request.locale = " fr ".into();
        let inviter = identity::Actor {
            kind: identity::ActorKind::ApiKey as i32,
            id: "key-1".into(),
            display_name: "CI key".into(),
        };
        let batch = Batch {
            account_id: Uuid::from_u128(1),
            role: (Uuid::from_u128(3), "User"),
            team: (None, ""),
            request: &request,
            inviter: &inviter,
            expire_time: at(86_400),
        };
        let reserved = Reserved {
            index: 0,
            invitation_id: Uuid::from_u128(10),
            user_id: Uuid::from_u128(20),
        };
        let result = pb::InviteeResult {
            email: "a@x.example".into(),
            ..Default::default()
        };
        let row = new_invitation(&batch, reserved, &result, "h".into(), at(0));
        assert_eq!(row.state, StoredState::Pending);
        assert_eq!(row.token_version, 1);
        assert_eq!(row.products, ["chat"]);
        assert_eq!(row.locale, "fr");
        assert_eq!(row.inviter_kind, "api_key");
        assert_eq!(row.inviter_name, "CI key");
        assert_eq!(row.metadata, None);
        assert_eq!(
            row.state_at(at(10)),
            crate::domain::InvitationState::Pending
        );
    }

    #[test]
    fn the_answer_counts_the_invited() {
        let results = vec![
            pb::InviteeResult {
                verdict: pb::InviteeVerdict::Invited as i32,
                ..Default::default()
            },
            pb::InviteeResult {
                verdict: pb::InviteeVerdict::QuotaExceeded as i32,
                ..Default::default()
            },
        ];
        let answer = respond(results, false, 4, 10);
        assert_eq!((answer.invited_count, answer.not_invited_count), (1, 1));
        assert_eq!((answer.seats_used, answer.seat_limit), (4, 10));
        assert_eq!(seat_limit(&identity::Account::default()), 0);
        let context = internal::GetInvitationContextResponse::default();
        assert_eq!(link_lifetime(&context), Duration::hours(24));
    }
}
