//! Seat reservations for invitees, and what becomes of an invited user: the
//! rules of the DirectoryService RPCs the invitation service calls.
//!
//! - [`reserve`] gives one verdict per invitee (a retry of the same
//!   invitation keeps its seat; someone already invited or a member is
//!   reported; an address outside the account's allowed domains, or a
//!   reservation beyond the seat limit, is refused; the seat and domain
//!   rules themselves are `domain::seats`') and returns the invited
//!   users to write with the audit entries and `user.created` events they
//!   cause.
//! - [`release`] decides which invited users a ReleaseInvitees call deletes
//!   (never a member, never a user that moved on to a newer invitation).
//! - [`activation`] decides what an accepted invitation changes on the
//!   invited user, and [`activated`] what that activation causes.
//!
//! Pure: the caller loads the users concerned (in one query for all the
//! invitees) inside a transaction that locked the account row, and writes
//! the result in one statement each.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::{Value as Json, json};
use usher_kit::{
    email::EmailAddress,
    error::{ApiError, ApiResult, Reason, Violations},
};
use usher_proto::{events::v1 as events, identity::v1 as pb};
use uuid::Uuid;

use super::{
    Origin, UserStatus,
    effects::{Actor, Audit, Effects},
    seats,
};

/// One invitee of a reservation, validated.
#[derive(Clone, Debug)]
pub struct Invitee {
    /// The address, in canonical form.
    pub email: EmailAddress,
    /// The display name (may be empty).
    pub display_name: String,
    /// The invitation that reserves the seat (unique across accounts).
    pub invitation_id: Uuid,
}

/// What the rules need to know of an existing user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The user's id.
    pub id: Uuid,
    /// Its account.
    pub account_id: Uuid,
    /// Its canonical address, if it has one.
    pub email: Option<String>,
    /// Its display name.
    pub display_name: String,
    /// Where it is in its life.
    pub status: UserStatus,
    /// The invitation it came (or is coming) through.
    pub invitation_id: Option<Uuid>,
}

/// The verdict on one invitee.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The seat is held: by a new invited user, or by this very invitation
    /// already (a retry).
    Reserved,
    /// Already invited by another invitation.
    AlreadyInvited,
    /// Already a member (active or inactive).
    AlreadyMember,
    /// The address is outside the account's allowed domains.
    DomainNotAllowed,
    /// No seat is left.
    SeatLimitReached,
}

/// The answer for one invitee.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InviteeResult {
    /// The invitee's canonical address.
    pub email: String,
    /// The verdict.
    pub verdict: Verdict,
    /// The user holding the address: the existing one, or the new one
    /// (`None` for a new one in a dry run, and for refusals).
    pub user_id: Option<Uuid>,
    /// For [`Verdict::AlreadyInvited`]: the invitation holding the seat.
    pub existing_invitation_id: Option<Uuid>,
}

/// An invited user to write.
#[derive(Clone, Debug, PartialEq)]
pub struct NewInvitee {
    /// The new user's id.
    pub id: Uuid,
    /// Its canonical address.
    pub email: String,
    /// Its display name (may be empty).
    pub display_name: String,
    /// The invitation it comes through.
    pub invitation_id: Uuid,
}

/// What every user of one reservation gets, and the facts the rules judge.
#[derive(Clone, Debug)]
pub struct Reservation<'a> {
    /// The account.
    pub account_id: Uuid,
    /// Its seat limit.
    pub seat_limit: i32,
    /// Seats in use before the reservation.
    pub seats_used: u64,
    /// Its allowed email domains, canonical; empty allows every domain.
    pub allowed_domains: &'a HashSet<String>,
    /// The role the invitees get.
    pub role_id: Uuid,
    /// The team they join, if any.
    pub team_id: Option<Uuid>,
    /// The products they are granted.
    pub products: &'a [String],
    /// A dry run writes nothing and names no new user.
    pub dry_run: bool,
}

/// What a reservation decided.
#[derive(Clone, Debug)]
pub struct Reserved {
    /// One answer per invitee, in the order given.
    pub results: Vec<InviteeResult>,
    /// The invited users to write (counted even in a dry run).
    pub new_users: Vec<NewInvitee>,
    /// Seats in use once they are written.
    pub seats_used: u64,
    /// One `user.created` audit entry and event per new user.
    pub effects: Effects,
}

pub use super::seats::check_inviting_allowed;

/// Refuses invitation ids already held by another invitee (another address,
/// or another account): `existing` are the users holding one of the
/// invitees' addresses in `account_id` or one of their invitation ids.
pub fn check_invitation_ids(
    account_id: Uuid,
    invitees: &[Invitee],
    existing: &[Member],
) -> ApiResult<()> {
    let by_invitation: HashMap<Uuid, &Member> = existing
        .iter()
        .filter_map(|u| u.invitation_id.map(|i| (i, u)))
        .collect();
    let mut conflicts = Violations::new();
    for (index, invitee) in invitees.iter().enumerate() {
        if let Some(holder) = by_invitation.get(&invitee.invitation_id)
            && (holder.account_id != account_id
                || holder.email.as_deref() != Some(invitee.email.canonical()))
        {
            conflicts.add(
                format!("invitees[{index}].invitation_id"),
                "is already used by another invitee",
            );
        }
    }
    conflicts.into_result()
}

/// The verdict on each invitee, the invited users to write and what they
/// cause (audited and published as done by `actor` at `now`; the event
/// names the invitees' `products`). `existing` as for
/// [`check_invitation_ids`]; `new_id` names each new user.
pub fn reserve(
    reservation: &Reservation<'_>,
    invitees: &[Invitee],
    existing: &[Member],
    actor: &Actor,
    now: DateTime<Utc>,
    mut new_id: impl FnMut() -> Uuid,
) -> Reserved {
    let account_id = reservation.account_id;
    let by_email: HashMap<&str, &Member> = existing
        .iter()
        .filter(|u| u.account_id == account_id)
        .filter_map(|u| u.email.as_deref().map(|e| (e, u)))
        .collect();
    let mut free = seats::free_seats(reservation.seat_limit, reservation.seats_used);
    let mut results = Vec::with_capacity(invitees.len());
    let mut new_users = Vec::new();
    for invitee in invitees {
        let email = invitee.email.canonical();
        let mut result = InviteeResult {
            email: email.to_owned(),
            verdict: Verdict::Reserved,
            user_id: None,
            existing_invitation_id: None,
        };
        result.verdict = if let Some(found) = by_email.get(email) {
            result.user_id = Some(found.id);
            match found.status {
                // A retry of this very reservation: the seat is held.
                UserStatus::Invited if found.invitation_id == Some(invitee.invitation_id) => {
                    Verdict::Reserved
                }
                UserStatus::Invited => {
                    result.existing_invitation_id = found.invitation_id;
                    Verdict::AlreadyInvited
                }
                _ => Verdict::AlreadyMember,
            }
        } else if !seats::domain_in(reservation.allowed_domains, invitee.email.domain()) {
            Verdict::DomainNotAllowed
        } else if free == 0 {
            Verdict::SeatLimitReached
        } else {
            free -= 1;
            let id = new_id();
            if !reservation.dry_run {
                result.user_id = Some(id);
            }
            new_users.push(NewInvitee {
                id,
                email: email.to_owned(),
                display_name: invitee.display_name.clone(),
                invitation_id: invitee.invitation_id,
            });
            Verdict::Reserved
        };
        results.push(result);
    }
    let mut effects = Effects::new();
    if !reservation.dry_run {
        for user in &new_users {
            created(reservation, user, actor, now, &mut effects);
        }
    }
    Reserved {
        seats_used: reservation.seats_used + new_users.len() as u64,
        results,
        new_users,
        effects,
    }
}

/// The audit entry and `user.created` event of one new invited user.
fn created(
    reservation: &Reservation<'_>,
    user: &NewInvitee,
    actor: &Actor,
    now: DateTime<Utc>,
    effects: &mut Effects,
) {
    let account_id = reservation.account_id;
    let user_id = user.id.to_string();
    let team_id = reservation.team_id.map(|t| t.to_string());
    effects.audit(Audit {
        account_id,
        action: "user.created",
        target_type: "user",
        target_id: user_id.clone(),
        target_name: if user.display_name.is_empty() {
            user.email.clone()
        } else {
            user.display_name.clone()
        },
        details: Some(json!({
            "email": user.email,
            "status": UserStatus::Invited.as_str(),
            "origin": Origin::Invitation.as_str(),
            "invitation_id": user.invitation_id.to_string(),
            "role_id": reservation.role_id.to_string(),
            "team_id": team_id,
            "products": reservation.products,
        })),
    });
    effects.event(
        "user.created",
        "UserCreated",
        user_id.clone(),
        Some(account_id),
        &events::UserCreated {
            user_id,
            account_id: account_id.to_string(),
            actor: Some(actor.to_proto()),
            email: user.email.clone(),
            username: String::new(),
            display_name: user.display_name.clone(),
            status: pb::UserStatus::Invited as i32,
            origin: pb::UserOrigin::Invitation as i32,
            role_id: reservation.role_id.to_string(),
            team_id: team_id.unwrap_or_default(),
            products: reservation.products.to_vec(),
            invitation_id: user.invitation_id.to_string(),
        },
        now,
    );
}

// ---------------------------------------------------------------------------
// Release

/// Who a release names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseKey {
    /// A user id.
    Id(Uuid),
    /// A canonical address.
    Email(String),
}

/// One target of a release: who, and the invitation it must still hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseTarget {
    /// Who.
    pub key: ReleaseKey,
    /// When given, the user is released only if it still holds this
    /// invitation (a stale retry finds nothing).
    pub invitation_id: Option<Uuid>,
}

/// What became of one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The invited user is deleted.
    Released,
    /// Nobody (or a user of a newer invitation, or one listed twice).
    NotFound,
    /// The user is a member, not invited: kept.
    NotInvited,
}

/// What a release decided.
#[derive(Clone, Debug)]
pub struct Released {
    /// One outcome per target, in order, with the user concerned.
    pub results: Vec<(ReleaseOutcome, Option<Uuid>)>,
    /// The ids of the users to delete (INVITED ones only).
    pub deleted: Vec<Uuid>,
    /// One `user.deleted` audit entry and event per deleted user.
    pub effects: Effects,
}

/// The outcome of each of `targets` given the users `found` among them (in
/// `account_id`), released for `reason` by `actor` at `now`.
pub fn release(
    account_id: Uuid,
    targets: &[ReleaseTarget],
    found: &[Member],
    reason: &str,
    actor: &Actor,
    now: DateTime<Utc>,
) -> Released {
    let by_id: HashMap<Uuid, &Member> = found.iter().map(|u| (u.id, u)).collect();
    let by_email: HashMap<&str, &Member> = found
        .iter()
        .filter_map(|u| u.email.as_deref().map(|e| (e, u)))
        .collect();
    let mut released: Vec<&Member> = Vec::new();
    let mut released_ids = HashSet::new();
    let mut results = Vec::with_capacity(targets.len());
    for target in targets {
        let holder = match &target.key {
            ReleaseKey::Id(id) => by_id.get(id),
            ReleaseKey::Email(email) => by_email.get(email.as_str()),
        };
        let result = match holder {
            None => (ReleaseOutcome::NotFound, None),
            // Listed twice: the first one released it.
            Some(u) if released_ids.contains(&u.id) => (ReleaseOutcome::NotFound, None),
            Some(u) if u.status != UserStatus::Invited => (ReleaseOutcome::NotInvited, Some(u.id)),
            // A stale retry: the user now belongs to a newer invitation.
            Some(u)
                if target.invitation_id.is_some() && u.invitation_id != target.invitation_id =>
            {
                (ReleaseOutcome::NotFound, None)
            }
            Some(u) => {
                released_ids.insert(u.id);
                released.push(u);
                (ReleaseOutcome::Released, Some(u.id))
            }
        };
        results.push(result);
    }
    let mut effects = Effects::new();
    for user in &released {
        deleted(account_id, user, reason, actor, now, &mut effects);
    }
    Released {
        results,
        deleted: released.iter().map(|u| u.id).collect(),
        effects,
    }
}

/// The audit entry and `user.deleted` event of one released invited user.
fn deleted(
    account_id: Uuid,
    user: &Member,
    reason: &str,
    actor: &Actor,
    now: DateTime<Utc>,
    effects: &mut Effects,
) {
    let invitation_id = user
        .invitation_id
        .map(|i| i.to_string())
        .unwrap_or_default();
    let email = user.email.clone().unwrap_or_default();
    effects.audit(Audit {
        account_id,
        action: "user.deleted",
        target_type: "user",
        target_id: user.id.to_string(),
        target_name: if user.display_name.is_empty() {
            email.clone()
        } else {
            user.display_name.clone()
        },
        details: Some(json!({
            "email": email,
            "previous_status": user.status.as_str(),
            "invitation_id": invitation_id,
            "reason": reason,
        })),
    });
    effects.event(
        "user.deleted",
        "UserDeleted",
        user.id.to_string(),
        Some(account_id),
        &events::UserDeleted {
            user_id: user.id.to_string(),
            account_id: account_id.to_string(),
            actor: Some(actor.to_proto()),
            previous_status: pb::UserStatus::Invited as i32,
            email,
            invitation_id,
        },
        now,
    );
}

// ---------------------------------------------------------------------------
// Activation and the first session

/// The refusal of an activation or session for a user not in the state the
/// invitation expects.
pub fn invalid_state(message: &str) -> ApiError {
    ApiError::rejected(Reason::InvalidState, message)
}

/// The refusal of an activation of a user that is not invited by
/// `invitation_id`.
pub fn not_invited() -> ApiError {
    invalid_state("the user is not invited for this invitation")
}

/// Whether `user` is already ACTIVE through `invitation_id` (the answer to a
/// retry of the activation).
pub fn already_activated(status: UserStatus, held: Option<Uuid>, invitation_id: Uuid) -> bool {
    status == UserStatus::Active && held == Some(invitation_id)
}

/// Refuses activating a user that is not INVITED by `invitation_id`.
pub fn check_invited(status: UserStatus, held: Option<Uuid>, invitation_id: Uuid) -> ApiResult<()> {
    if status != UserStatus::Invited || held != Some(invitation_id) {
        return Err(not_invited());
    }
    Ok(())
}

/// What the invitee chose when accepting.
#[derive(Clone, Debug, Default)]
pub struct Acceptance {
    /// The display name (always set).
    pub display_name: String,
    /// A locale, when chosen.
    pub locale: Option<String>,
    /// Platform metadata, when given.
    pub metadata: Option<Json>,
}

/// What an activation writes besides the status, password and times.
#[derive(Clone, Debug, PartialEq)]
pub struct Activation {
    /// The new display name.
    pub display_name: String,
    /// The new locale, if chosen.
    pub locale: Option<String>,
    /// The new metadata, if given.
    pub metadata: Option<Json>,
    /// The products still enabled on the account, when some are not.
    pub products: Option<Vec<String>>,
    /// The fields changed, for the audit entry.
    pub changed: Vec<&'static str>,
}

/// What accepting changes on an invited user granted `granted` products, in
/// an account that has `enabled` ones: the choices of the invitee, and only
/// the grants still enabled (normally all of them: disabling a product
/// strips it from every user).
pub fn activation(acceptance: Acceptance, granted: &[String], enabled: &[String]) -> Activation {
    let mut changed = vec!["status", "display_name", "password"];
    if acceptance.locale.is_some() {
        changed.push("locale");
    }
    if acceptance.metadata.is_some() {
        changed.push("metadata");
    }
    let kept: Vec<String> = granted
        .iter()
        .filter(|p| enabled.contains(p))
        .cloned()
        .collect();
    let products = (kept.len() != granted.len()).then_some(kept);
    if products.is_some() {
        changed.push("products");
    }
    Activation {
        display_name: acceptance.display_name,
        locale: acceptance.locale,
        metadata: acceptance.metadata,
        products,
        changed,
    }
}

/// The activated user, as the audit entry and event tell it.
#[derive(Clone, Debug)]
pub struct ActivatedUser {
    /// The user.
    pub id: Uuid,
    /// Its account.
    pub account_id: Uuid,
    /// Its canonical address.
    pub email: Option<String>,
    /// Its display name.
    pub display_name: String,
    /// Its role.
    pub role_id: Uuid,
    /// Its team.
    pub team_id: Option<Uuid>,
    /// Its products.
    pub products: Vec<String>,
}

/// The actor of an activation: the invitee, anonymous until now.
pub fn invitee_actor(user_id: Uuid, display_name: &str) -> Actor {
    Actor {
        kind: "anonymous",
        id: user_id.to_string(),
        name: display_name.to_owned(),
    }
}

/// The `user.activated` audit entry and event of `user`, activated through
/// `invitation_id` with `changed` fields by `actor` at `now`.
pub fn activated(
    user: &ActivatedUser,
    invitation_id: Uuid,
    changed: &[&'static str],
    actor: &Actor,
    now: DateTime<Utc>,
) -> Effects {
    let mut effects = Effects::new();
    effects.audit(Audit {
        account_id: user.account_id,
        action: "user.activated",
        target_type: "user",
        target_id: user.id.to_string(),
        target_name: user.display_name.clone(),
        details: Some(json!({
            "invitation_id": invitation_id.to_string(),
            "email": user.email,
            "fields": changed,
        })),
    });
    effects.event(
        "user.activated",
        "UserActivated",
        user.id.to_string(),
        Some(user.account_id),
        &events::UserActivated {
            user_id: user.id.to_string(),
            account_id: user.account_id.to_string(),
            actor: Some(actor.to_proto()),
            invitation_id: invitation_id.to_string(),
            email: user.email.clone().unwrap_or_default(),
            display_name: user.display_name.clone(),
            role_id: user.role_id.to_string(),
            team_id: user.team_id.map(|t| t.to_string()).unwrap_or_default(),
            products: user.products.clone(),
        },
        now,
    );
    effects
}

/// Refuses a session for a user that is not ACTIVE through `invitation_id`.
pub fn check_joined(status: UserStatus, held: Option<Uuid>, invitation_id: Uuid) -> ApiResult<()> {
    if status != UserStatus::Active {
        return Err(invalid_state("the user is not active"));
    }
    if held != Some(invitation_id) {
        return Err(invalid_state("the user did not join by this invitation"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_900_000_000, 0).expect("time")
    }

    fn invitee(email: &str) -> Invitee {
        Invitee {
            email: EmailAddress::parse(email).expect("email"),
            display_name: String::new(),
            invitation_id: Uuid::new_v4(),
        }
    }

    fn member(
        account_id: Uuid,
        email: &str,
        status: UserStatus,
        invitation: Option<Uuid>,
    ) -> Member {
        Member {
            id: Uuid::new_v4(),
            account_id,
            email: Some(email.to_owned()),
            display_name: String::new(),
            status,
            invitation_id: invitation,
        }
    }

    fn plan<'a>(
        account_id: Uuid,
        limit: i32,
        used: u64,
        domains: &'a HashSet<String>,
    ) -> Reservation<'a> {
        Reservation {
            account_id,
            seat_limit: limit,
            seats_used: used,
            allowed_domains: domains,
            role_id: Uuid::new_v4(),
            team_id: None,
            products: &[],
            dry_run: false,
        }
    }

    #[test]
    fn each_invitee_gets_a_verdict_and_new_ones_take_the_free_seats() {
        let account = Uuid::new_v4();
        let retry = invitee("retry@acme.example");
        let invitees = vec![
            invitee("ada@acme.example"),
            retry.clone(),
            invitee("ivy@acme.example"),
            invitee("mo@acme.example"),
            invitee("eve@other.example"),
            invitee("bob@acme.example"),
            invitee("cy@acme.example"),
        ];
        let existing = vec![
            member(
                account,
                "retry@acme.example",
                UserStatus::Invited,
                Some(retry.invitation_id),
            ),
            member(
                account,
                "ivy@acme.example",
                UserStatus::Invited,
                Some(Uuid::new_v4()),
            ),
            member(account, "mo@acme.example", UserStatus::Inactive, None),
        ];
        let domains: HashSet<String> = ["acme.example".to_owned()].into();
        // 3 seats used, 5 in all: two new invitees fit.
        let decided = reserve(
            &plan(account, 5, 3, &domains),
            &invitees,
            &existing,
            &Actor::system(),
            now(),
            Uuid::new_v4,
        );
        let verdicts: Vec<Verdict> = decided.results.iter().map(|r| r.verdict).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Reserved,
                Verdict::Reserved,
                Verdict::AlreadyInvited,
                Verdict::AlreadyMember,
                Verdict::DomainNotAllowed,
                Verdict::Reserved,
                Verdict::SeatLimitReached,
            ]
        );
        assert_eq!(decided.results[1].user_id, Some(existing[0].id));
        assert_eq!(
            decided.results[2].existing_invitation_id,
            existing[1].invitation_id
        );
        assert_eq!(decided.new_users.len(), 2);
        assert_eq!(decided.seats_used, 5);
        assert_eq!(decided.effects.actions(), ["user.created", "user.created"]);
        assert_eq!(decided.effects.events.len(), 2);
        assert_eq!(decided.results[0].user_id, Some(decided.new_users[0].id));
    }

    #[test]
    fn a_dry_run_counts_seats_but_names_and_causes_nothing() {
        let account = Uuid::new_v4();
        let domains = HashSet::new();
        let mut reservation = plan(account, 10, 1, &domains);
        reservation.dry_run = true;
        let decided = reserve(
            &reservation,
            &[invitee("ada@acme.example")],
            &[],
            &Actor::system(),
            now(),
            Uuid::new_v4,
        );
        assert_eq!(decided.results[0].verdict, Verdict::Reserved);
        assert_eq!(decided.results[0].user_id, None);
        assert_eq!(decided.seats_used, 2);
        assert!(decided.effects.is_empty());
    }

    #[test]
    fn invitation_ids_of_other_invitees_and_single_seat_plans_are_refused() {
        let account = Uuid::new_v4();
        let ada = invitee("ada@acme.example");
        let elsewhere = member(
            Uuid::new_v4(),
            "ada@acme.example",
            UserStatus::Invited,
            Some(ada.invitation_id),
        );
        let err = check_invitation_ids(account, std::slice::from_ref(&ada), &[elsewhere])
            .expect_err("taken");
        assert_eq!(err.reason(), Reason::InvalidArgument);
        let same = member(
            account,
            "ada@acme.example",
            UserStatus::Invited,
            Some(ada.invitation_id),
        );
        check_invitation_ids(account, &[ada], &[same]).expect("a retry");
        assert_eq!(
            check_inviting_allowed(1).expect_err("single").reason(),
            Reason::SingleUserPlan
        );
        check_inviting_allowed(2).expect("two seats");
    }

    #[test]
    fn release_deletes_invited_users_only_once_and_never_members() {
        let account = Uuid::new_v4();
        let invited = member(
            account,
            "ada@acme.example",
            UserStatus::Invited,
            Some(Uuid::new_v4()),
        );
        let active = member(account, "bob@acme.example", UserStatus::Active, None);
        let moved = member(
            account,
            "cy@acme.example",
            UserStatus::Invited,
            Some(Uuid::new_v4()),
        );
        let targets = vec![
            ReleaseTarget {
                key: ReleaseKey::Id(invited.id),
                invitation_id: invited.invitation_id,
            },
            ReleaseTarget {
                key: ReleaseKey::Email("ada@acme.example".into()),
                invitation_id: None,
            },
            ReleaseTarget {
                key: ReleaseKey::Id(active.id),
                invitation_id: None,
            },
            ReleaseTarget {
                key: ReleaseKey::Id(moved.id),
                invitation_id: Some(Uuid::new_v4()),
            },
            ReleaseTarget {
                key: ReleaseKey::Id(Uuid::new_v4()),
                invitation_id: None,
            },
        ];
        let decided = release(
            account,
            &targets,
            &[invited.clone(), active.clone(), moved],
            "revoked",
            &Actor::system(),
            now(),
        );
        let outcomes: Vec<ReleaseOutcome> = decided.results.iter().map(|r| r.0).collect();
        assert_eq!(
            outcomes,
            [
                ReleaseOutcome::Released,
                ReleaseOutcome::NotFound,
                ReleaseOutcome::NotInvited,
                ReleaseOutcome::NotFound,
                ReleaseOutcome::NotFound,
            ]
        );
        assert_eq!(decided.results[2].1, Some(active.id));
        assert_eq!(decided.deleted, [invited.id]);
        assert_eq!(decided.effects.actions(), ["user.deleted"]);
        let details = decided.effects.audit[0].details.clone().expect("details");
        assert_eq!(details["reason"], "revoked");
        assert_eq!(details["previous_status"], "invited");
    }

    #[test]
    fn activation_keeps_only_enabled_products_and_names_the_changed_fields() {
        let granted = vec!["meter".to_owned(), "ledger".to_owned()];
        let chosen = Acceptance {
            display_name: "Ada".into(),
            locale: Some("fr".into()),
            metadata: None,
        };
        let decided = activation(chosen.clone(), &granted, &["meter".to_owned()]);
        assert_eq!(decided.products, Some(vec!["meter".to_owned()]));
        assert_eq!(
            decided.changed,
            ["status", "display_name", "password", "locale", "products"]
        );
        let all = activation(chosen, &granted, &granted);
        assert_eq!(all.products, None);
        assert_eq!(
            all.changed,
            ["status", "display_name", "password", "locale"]
        );
    }

    #[test]
    fn only_the_invitation_of_a_user_activates_it_and_opens_its_first_session() {
        let invitation = Uuid::new_v4();
        assert!(check_invited(UserStatus::Invited, Some(invitation), invitation).is_ok());
        assert!(check_invited(UserStatus::Invited, Some(Uuid::new_v4()), invitation).is_err());
        assert!(check_invited(UserStatus::Active, Some(invitation), invitation).is_err());
        assert!(already_activated(
            UserStatus::Active,
            Some(invitation),
            invitation
        ));
        assert!(!already_activated(
            UserStatus::Invited,
            Some(invitation),
            invitation
        ));
        assert!(check_joined(UserStatus::Active, Some(invitation), invitation).is_ok());
        let err = check_joined(UserStatus::Invited, Some(invitation), invitation).expect_err("no");
        assert_eq!(err.reason(), Reason::InvalidState);
        assert!(check_joined(UserStatus::Active, None, invitation).is_err());
        let user = ActivatedUser {
            id: Uuid::new_v4(),
            account_id: Uuid::new_v4(),
            email: Some("ada@acme.example".into()),
            display_name: "Ada".into(),
            role_id: Uuid::new_v4(),
            team_id: None,
            products: Vec::new(),
        };
        let actor = invitee_actor(user.id, "Ada");
        let effects = activated(&user, invitation, &["status"], &actor, now());
        assert_eq!(effects.actions(), ["user.activated"]);
        assert_eq!(effects.events.len(), 1);
    }
}
