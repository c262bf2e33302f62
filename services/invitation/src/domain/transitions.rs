//! The invitation state machine's transitions. Each takes the invitation as
//! loaded and the time, and returns its decision: the row to write (or
//! delete), the messages to emit with it, the INVITED user identity must
//! release first, and the link that dies. Nothing here writes anything.
//!
//! ```text
//!             resend (new link)          claim           accept
//!   PENDING ───────────────▶ PENDING ─────────▶ ACCEPTING ───────▶ ACCEPTED
//!     │  ▲ time passes          ▲                  │ claim runs out /
//!     ▼  │ resend               └──────────────────┘ activation fails
//!   EXPIRED
//!   PENDING / EXPIRED ── revoke ──▶ REVOKED       PENDING ── decline ──▶ DECLINED
//!   any state but ACCEPTING ── delete ──▶ (row gone)
//! ```

use chrono::{DateTime, Duration, Utc};
use usher_kit::{
    amqp::OutgoingMessage,
    error::{ApiError, ApiResult, Reason},
    tokens::Token,
};
use usher_proto::{identity::v1 as identity, notification::v1 as notification};
use uuid::Uuid;

use super::{
    Invitation, InvitationState, StoredState,
    events::{self, EmailContext, InviterAddress, Links},
    input::not_usable,
};

/// What a transition does to the invitation's row.
#[derive(Clone, Debug, PartialEq)]
pub enum RowChange {
    /// The row stays as it is.
    Keep,
    /// The row becomes this.
    Update(Box<Invitation>),
    /// The row is deleted.
    Delete(Uuid),
}

/// The decision of one transition.
#[derive(Clone, Debug)]
pub struct Transition {
    /// What happens to the row.
    pub row: RowChange,
    /// What is written to the outbox in the same transaction.
    pub emit: Vec<OutgoingMessage>,
    /// `(user, invitation)`: the INVITED user identity must release before
    /// the change commits (it frees the seat).
    pub release: Option<(Uuid, Uuid)>,
    /// The token hash of a link that stops working: its key is forgotten
    /// after the commit.
    pub dead_token: Option<String>,
}

impl Transition {
    fn keep() -> Self {
        Self {
            row: RowChange::Keep,
            emit: Vec::new(),
            release: None,
            dead_token: None,
        }
    }
}

/// Which removal an admin asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// RevokeInvitations: the row stays, REVOKED.
    Revoke,
    /// DeleteInvitations: the row goes.
    Delete,
}

/// The resend rules of the deployment.
#[derive(Clone, Copy, Debug)]
pub struct ResendRules {
    /// Shortest time between two sends of one invitation.
    pub cooldown: Duration,
    /// Most resends of one invitation.
    pub max_resends: u32,
}

/// What a resend needs beyond the invitation: the new link and how its
/// email is made.
#[derive(Clone, Copy, Debug)]
pub struct Resend<'a> {
    /// The new link's token (goes into the email, sealed).
    pub token: &'a Token,
    /// Its hash (goes into the row).
    pub token_hash: &'a str,
    /// How long the new link lives.
    pub lifetime: Duration,
    /// Whether identity says the caller may grant the invitation's role now.
    pub may_grant: bool,
    /// Who resends.
    pub actor: &'a identity::Actor,
    /// Where links point and how they are sealed.
    pub links: Links<'a>,
    /// What the email shows beyond the invitation.
    pub email: &'a EmailContext,
}

/// The time until the hourly quota window of `now` ends.
pub fn quota_retry_after(now: DateTime<Utc>) -> std::time::Duration {
    let into_hour = u64::try_from(now.timestamp().rem_euclid(3600)).unwrap_or(0);
    std::time::Duration::from_secs(3600 - into_hour)
}

/// The refusal of a send once the account's hourly quota is used up.
pub fn quota_used_up(now: DateTime<Utc>) -> ApiError {
    ApiError::retry_later(
        Reason::QuotaExceeded,
        "the account's hourly invitation quota is used up",
        quota_retry_after(now),
    )
}

/// Until when a claim taken at `now` holds, `claim_for` later.
pub fn claim_until(claim_for: Duration, now: DateTime<Utc>) -> DateTime<Utc> {
    now + claim_for
}

impl Invitation {
    /// Whether a link of `version` works at `now`: the current link, and the
    /// invitation reads PENDING (not expired, not claimed, not final).
    pub fn usable(&self, version: i64, now: DateTime<Utc>) -> bool {
        self.token_version == version
            && self.expire_time > now
            && self.state_at(now) == InvitationState::Pending
    }

    /// Whether an admin may act on the invitation as an open one (PENDING
    /// or EXPIRED: `Ok(true)`), may not (`Ok(false)`), or must wait because
    /// the invitee is accepting it right now.
    fn open_or_busy(&self, now: DateTime<Utc>) -> ApiResult<bool> {
        match self.state_at(now) {
            InvitationState::Pending | InvitationState::Expired => Ok(true),
            InvitationState::Accepting => Err(ApiError::rejected(
                Reason::InvitationBeingAccepted,
                "the invitee is accepting this invitation right now",
            )),
            _ => Ok(false),
        }
    }

    /// Revoke or delete, by `actor`. An open invitation releases its user
    /// and kills its link; a revoked one releases again (a no-op unless an
    /// earlier release was lost) and revoking it again changes nothing;
    /// accepted and declined invitations can only be deleted; one being
    /// accepted waits.
    pub fn remove(
        &self,
        how: Removal,
        actor: &identity::Actor,
        now: DateTime<Utc>,
    ) -> ApiResult<Transition> {
        let previous = self.state_at(now);
        let open = self.open_or_busy(now)?;
        let mut transition = Transition::keep();
        match (open, previous, how) {
            (true, ..) => {
                transition.release = Some((self.user_id, self.id));
                transition.dead_token = Some(self.token_hash.clone());
            }
            (false, InvitationState::Revoked, _) => {
                transition.release = Some((self.user_id, self.id));
                if how == Removal::Revoke {
                    return Ok(transition);
                }
            }
            (false, _, Removal::Delete) => {}
            (false, _, Removal::Revoke) => {
                return Err(ApiError::rejected(
                    Reason::InvalidState,
                    "accepted or declined invitations cannot be revoked",
                ));
            }
        }
        transition.row = match how {
            Removal::Delete => RowChange::Delete(self.id),
            Removal::Revoke => RowChange::Update(Box::new(Invitation {
                state: StoredState::Revoked,
                revoke_time: Some(now),
                update_time: now,
                claim_until: None,
                ..self.clone()
            })),
        };
        transition.emit.push(events::removed(
            self,
            actor,
            previous,
            how == Removal::Delete,
            now,
        ));
        Ok(transition)
    }

    /// Whether the invitation may be resent at all: it must be open.
    pub fn check_resendable(&self, now: DateTime<Utc>) -> ApiResult<()> {
        if self.open_or_busy(now)? {
            Ok(())
        } else {
            Err(ApiError::rejected(
                Reason::InvalidState,
                "only pending or expired invitations can be resent",
            ))
        }
    }

    /// Resend: a new link (new token, next version, a fresh lifetime), the
    /// reinvitation email and `invitation.resent`; the old link dies. A
    /// resend hands the invitation's role out again, so the caller must be
    /// able to grant it; then the cooldown and the resend limit apply.
    pub fn resend(
        &self,
        rules: ResendRules,
        resend: Resend<'_>,
        now: DateTime<Utc>,
    ) -> ApiResult<Transition> {
        self.check_resendable(now)?;
        if !resend.may_grant {
            return Err(ApiError::rejected(
                Reason::PermissionDenied,
                "the invitation's role carries a permission you do not hold",
            ));
        }
        let since = now - self.last_send_time;
        if since < rules.cooldown {
            return Err(ApiError::retry_later(
                Reason::ResendCooldown,
                "this invitation was sent moments ago; wait before resending",
                (rules.cooldown - since).to_std().unwrap_or_default(),
            ));
        }
        if self.resend_count >= i32::try_from(rules.max_resends).unwrap_or(i32::MAX) {
            return Err(ApiError::rejected(
                Reason::ResendLimitReached,
                "this invitation was resent too many times; revoke it and invite again",
            ));
        }
        let mut resent = Invitation {
            state: StoredState::Pending,
            claim_until: None,
            token_version: self.token_version + 1,
            token_hash: resend.token_hash.to_owned(),
            expire_time: now + resend.lifetime,
            resend_count: self.resend_count + 1,
            last_send_time: now,
            update_time: now,
            expiry_published: false,
            ..self.clone()
        };
        let (job, job_id) = events::invitation_email(
            resend.links,
            &resent,
            resend.token,
            notification::EmailTemplate::Reinvitation,
            resend.email,
            now,
        )?;
        resent.delivery_job_id = job_id;
        resent.delivery_status = notification::DeliveryStatus::Queued as i32;
        resent.delivery_reason = String::new();
        resent.delivery_attempts = 0;
        resent.delivery_update_time = Some(now);
        let event = events::resent(&resent, resend.actor, now);
        Ok(Transition {
            row: RowChange::Update(Box::new(resent)),
            emit: vec![job, event],
            release: None,
            dead_token: Some(self.token_hash.clone()),
        })
    }

    /// The claim of an accept with a link of `version`: ACCEPTING until
    /// `until`, if the link is usable at `now` (one claim wins; a claim that
    /// ran out may be taken again). The store takes it with one guarded
    /// update whose condition is this rule's SQL twin.
    pub fn claim(
        &self,
        version: i64,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Option<Invitation> {
        self.usable(version, now).then(|| Invitation {
            state: StoredState::Accepting,
            claim_until: Some(until),
            ..self.clone()
        })
    }

    /// Accept, by the invitee who chose `name`, once identity activated the
    /// user: ACCEPTED, `invitation.accepted`, and the "invitation accepted"
    /// email to the inviter when the inviter is a user who is still active
    /// and has an address; the link dies.
    pub fn accept(
        &self,
        name: &str,
        inviter: Option<&InviterAddress>,
        email: &EmailContext,
        now: DateTime<Utc>,
    ) -> Transition {
        let mut emit = vec![events::accepted(self, name, now)];
        if let Some(inviter) = inviter.filter(|_| self.inviter_kind == "user") {
            emit.push(events::accepted_email(self, inviter, name, email, now));
        }
        Transition {
            row: RowChange::Update(Box::new(Invitation {
                state: StoredState::Accepted,
                accept_time: Some(now),
                update_time: now,
                claim_until: None,
                ..self.clone()
            })),
            emit,
            release: None,
            dead_token: Some(self.token_hash.clone()),
        }
    }

    /// Decline with a link of `version`: only a usable link declines; the
    /// INVITED user is released, `invitation.declined` emitted, the link
    /// dies.
    pub fn decline(&self, version: i64, now: DateTime<Utc>) -> ApiResult<Transition> {
        if !self.usable(version, now) {
            return Err(not_usable());
        }
        Ok(Transition {
            row: RowChange::Update(Box::new(Invitation {
                state: StoredState::Declined,
                decline_time: Some(now),
                update_time: now,
                ..self.clone()
            })),
            emit: vec![events::declined(self, now)],
            release: Some((self.user_id, self.id)),
            dead_token: Some(self.token_hash.clone()),
        })
    }

    /// The expiry sweep: an invitation that reads EXPIRED and was not
    /// published yet is marked and `invitation.expired` emitted, once per
    /// link (a resend clears the mark).
    pub fn expire(&self, now: DateTime<Utc>) -> Option<Transition> {
        if self.expiry_published || self.state_at(now) != InvitationState::Expired {
            return None;
        }
        Some(Transition {
            row: RowChange::Update(Box::new(Invitation {
                expiry_published: true,
                ..self.clone()
            })),
            emit: vec![events::expired(self, now)],
            release: None,
            dead_token: None,
        })
    }
}

/// Whom to tell that their invitation was accepted: the inviter, if
/// identity says they are still active and have an address.
pub fn inviter_to_notify(active: bool, inviter: InviterAddress) -> Option<InviterAddress> {
    (active && !inviter.email.is_empty()).then_some(inviter)
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use usher_kit::seal::Sealer;
    use usher_proto::{events::v1 as ev, invitation::v1 as pb};

    use super::*;
    use crate::domain::fixtures::{at, invitation};

    fn admin() -> identity::Actor {
        identity::Actor {
            kind: identity::ActorKind::User as i32,
            id: "admin".into(),
            display_name: "Ada".into(),
        }
    }

    fn keys(transition: &Transition) -> Vec<&str> {
        transition
            .emit
            .iter()
            .map(|m| m.routing_key.as_str())
            .collect()
    }

    fn with_state(stored: StoredState) -> Invitation {
        Invitation {
            state: stored,
            ..invitation()
        }
    }

    fn reason(err: &ApiError) -> Reason {
        err.reason()
    }

    #[test]
    fn a_link_is_usable_while_current_pending_and_unexpired() {
        let invitation = invitation();
        assert!(invitation.usable(1, at(10)));
        assert!(!invitation.usable(2, at(10)), "an older or newer link");
        assert!(!invitation.usable(1, invitation.expire_time));
        for stored in [
            StoredState::Accepted,
            StoredState::Revoked,
            StoredState::Declined,
        ] {
            assert!(!with_state(stored).usable(1, at(10)), "{stored:?}");
        }
        let claimed = invitation.claim(1, at(40), at(10)).expect("claimed");
        assert!(!claimed.usable(1, at(39)), "held by the claim");
        assert!(claimed.usable(1, at(40)), "the claim ran out");
    }

    #[test]
    fn one_claim_wins_until_it_runs_out() {
        let invitation = invitation();
        let claimed = invitation.claim(1, at(40), at(10)).expect("claim");
        assert_eq!(claimed.state, StoredState::Accepting);
        assert_eq!(claimed.claim_until, Some(at(40)));
        assert_eq!(claimed.state_at(at(20)), InvitationState::Accepting);
        assert_eq!(claimed.claim(1, at(50), at(20)), None, "taken");
        let retaken = claimed.claim(1, at(70), at(40)).expect("ran out");
        assert_eq!(retaken.claim_until, Some(at(70)));
        assert_eq!(invitation.claim(2, at(40), at(10)), None, "old link");
        assert_eq!(invitation.claim(1, at(86_500), at(86_400)), None, "expired");
        assert_eq!(claim_until(Duration::seconds(30), at(10)), at(40));
    }

    #[test]
    fn revoking_an_open_invitation_releases_its_user_and_kills_its_link() {
        for (now, previous) in [
            (at(10), InvitationState::Pending),
            (at(90_000), InvitationState::Expired),
        ] {
            let invitation = invitation();
            let done = invitation.remove(Removal::Revoke, &admin(), now).unwrap();
            assert_eq!(done.release, Some((invitation.user_id, invitation.id)));
            assert_eq!(done.dead_token.as_deref(), Some("hash-1"));
            let RowChange::Update(row) = &done.row else {
                panic!("revoked row expected: {:?}", done.row)
            };
            assert_eq!(row.state, StoredState::Revoked);
            assert_eq!(row.revoke_time, Some(now));
            assert_eq!(row.update_time, now);
            assert_eq!(row.state_at(now), InvitationState::Revoked);
            assert_eq!(keys(&done), ["invitation.revoked"]);
            let event = ev::InvitationRevoked::decode(done.emit[0].payload.as_slice()).unwrap();
            assert_eq!(event.previous_state(), pb::InvitationState::from(previous));
            assert_eq!(event.actor.unwrap().id, "admin");
        }
    }

    #[test]
    fn deleting_removes_the_row_in_any_state_but_accepting() {
        for stored in [
            StoredState::Pending,
            StoredState::Accepted,
            StoredState::Declined,
            StoredState::Revoked,
        ] {
            let invitation = with_state(stored);
            let done = invitation
                .remove(Removal::Delete, &admin(), at(10))
                .unwrap();
            assert_eq!(done.row, RowChange::Delete(invitation.id), "{stored:?}");
            assert_eq!(keys(&done), ["invitation.deleted"]);
            let open = stored == StoredState::Pending;
            assert_eq!(done.dead_token.is_some(), open, "{stored:?}");
            // A revoked invitation is released again (a no-op unless an
            // earlier release was lost); final ones hold no user.
            let releases = matches!(stored, StoredState::Pending | StoredState::Revoked);
            assert_eq!(done.release.is_some(), releases, "{stored:?}");
        }
    }

    #[test]
    fn revoking_twice_changes_nothing_and_final_states_refuse() {
        let revoked = with_state(StoredState::Revoked);
        let again = revoked.remove(Removal::Revoke, &admin(), at(10)).unwrap();
        assert_eq!(again.row, RowChange::Keep);
        assert!(again.emit.is_empty());
        assert!(again.dead_token.is_none());
        assert_eq!(again.release, Some((revoked.user_id, revoked.id)));
        for stored in [StoredState::Accepted, StoredState::Declined] {
            let err = with_state(stored)
                .remove(Removal::Revoke, &admin(), at(10))
                .unwrap_err();
            assert_eq!(reason(&err), Reason::InvalidState, "{stored:?}");
        }
    }

    #[test]
    fn an_invitation_being_accepted_cannot_be_removed_or_resent() {
        let claimed = invitation().claim(1, at(40), at(10)).unwrap();
        for how in [Removal::Revoke, Removal::Delete] {
            let err = claimed.remove(how, &admin(), at(20)).unwrap_err();
            assert_eq!(reason(&err), Reason::InvitationBeingAccepted);
        }
        let err = claimed.check_resendable(at(20)).unwrap_err();
        assert_eq!(reason(&err), Reason::InvitationBeingAccepted);
        assert!(claimed.check_resendable(at(40)).is_ok(), "claim ran out");
    }

    fn sealer() -> Sealer {
        Sealer::new(&[9u8; 32], "k1")
    }

    const RULES: ResendRules = ResendRules {
        cooldown: Duration::seconds(60),
        max_resends: 2,
    };

    fn resend_with<'a>(
        token: &'a Token,
        sealer: &'a Sealer,
        actor: &'a identity::Actor,
        email: &'a EmailContext,
        may_grant: bool,
    ) -> Resend<'a> {
        Resend {
            token,
            token_hash: "hash-2",
            lifetime: Duration::hours(2),
            may_grant,
            actor,
            links: Links {
                sealer,
                base: "https://usher.example",
            },
            email,
        }
    }

    #[test]
    fn a_resend_issues_the_next_link_and_kills_the_old_one() {
        let (token, sealer, actor, email) = (
            Token::generate(),
            sealer(),
            admin(),
            EmailContext::default(),
        );
        let mut expired = invitation();
        expired.expiry_published = true;
        let now = at(90_000);
        let done = expired
            .resend(
                RULES,
                resend_with(&token, &sealer, &actor, &email, true),
                now,
            )
            .unwrap();
        let RowChange::Update(row) = &done.row else {
            panic!("row expected")
        };
        assert_eq!(row.token_version, 2);
        assert_eq!(row.token_hash, "hash-2");
        assert_eq!(row.expire_time, now + Duration::hours(2));
        assert_eq!(row.resend_count, 1);
        assert_eq!(row.last_send_time, now);
        assert!(
            !row.expiry_published,
            "an expiry of the new link is published again"
        );
        assert_eq!(row.state_at(now), InvitationState::Pending);
        assert_eq!(
            row.delivery_status,
            notification::DeliveryStatus::Queued as i32
        );
        assert_ne!(row.delivery_job_id, expired.delivery_job_id);
        assert_eq!(done.dead_token.as_deref(), Some("hash-1"));
        assert_eq!(done.release, None);
        assert_eq!(done.emit.len(), 2);
        let job = notification::EmailJob::decode(done.emit[0].payload.as_slice()).unwrap();
        assert_eq!(job.job_id, row.delivery_job_id);
        assert_eq!(job.template(), notification::EmailTemplate::Reinvitation);
        assert_eq!(job.token_version, 2);
        let link = sealer.open(&job.job_id, &job.sealed_link).unwrap();
        assert_eq!(
            link,
            format!("https://usher.example/invite?token={}", token.as_str())
        );
        assert_eq!(done.emit[1].routing_key, "invitation.resent");
    }

    #[test]
    fn a_resend_needs_the_grant_then_waits_the_cooldown_then_stops_at_the_limit() {
        let (token, sealer, actor, email) = (
            Token::generate(),
            sealer(),
            admin(),
            EmailContext::default(),
        );
        let invitation = invitation();
        let resend = |inv: &Invitation, may_grant, now| {
            inv.resend(
                RULES,
                resend_with(&token, &sealer, &actor, &email, may_grant),
                now,
            )
        };
        let err = resend(&invitation, false, at(3_600)).unwrap_err();
        assert_eq!(reason(&err), Reason::PermissionDenied);
        let err = resend(&invitation, true, at(59)).unwrap_err();
        assert_eq!(reason(&err), Reason::ResendCooldown);
        let ApiError::Rejected { retry_after, .. } = err else {
            panic!()
        };
        assert_eq!(retry_after, Some(std::time::Duration::from_secs(1)));
        assert!(resend(&invitation, true, at(60)).is_ok());
        let worn = Invitation {
            resend_count: 2,
            ..invitation.clone()
        };
        let err = resend(&worn, true, at(3_600)).unwrap_err();
        assert_eq!(reason(&err), Reason::ResendLimitReached);
        let accepted = with_state(StoredState::Accepted);
        let err = resend(&accepted, true, at(3_600)).unwrap_err();
        assert_eq!(reason(&err), Reason::InvalidState);
    }

    #[test]
    fn the_quota_refusal_says_when_the_hour_ends() {
        let err = quota_used_up(at(59 * 60));
        assert_eq!(reason(&err), Reason::QuotaExceeded);
        let ApiError::Rejected { retry_after, .. } = err else {
            panic!()
        };
        assert_eq!(retry_after, Some(std::time::Duration::from_secs(60)));
        assert_eq!(
            quota_retry_after(at(0)),
            std::time::Duration::from_secs(3600)
        );
    }

    fn inviter() -> InviterAddress {
        InviterAddress {
            user_id: "olga".into(),
            email: "olga@acme.example".into(),
            name: "Olga".into(),
            locale: "de".into(),
        }
    }

    #[test]
    fn accepting_tells_an_active_user_inviter_who_has_an_address() {
        let claimed = invitation().claim(1, at(40), at(10)).unwrap();
        let email = EmailContext::default();
        let tell = inviter_to_notify(true, inviter());
        let done = claimed.accept("Ivy", tell.as_ref(), &email, at(20));
        assert_eq!(
            keys(&done),
            [
                "invitation.accepted",
                usher_kit::amqp::EMAIL_SEND_ROUTING_KEY
            ]
        );
        let job = notification::EmailJob::decode(done.emit[1].payload.as_slice()).unwrap();
        assert_eq!(
            job.template(),
            notification::EmailTemplate::InvitationAccepted
        );
        assert_eq!(job.recipient_email, "olga@acme.example");
        assert_eq!(job.variables.unwrap().invitee_name, "Ivy");
        let RowChange::Update(row) = &done.row else {
            panic!()
        };
        assert_eq!(row.state, StoredState::Accepted);
        assert_eq!(row.accept_time, Some(at(20)));
        assert_eq!(row.claim_until, None);
        assert_eq!(done.dead_token.as_deref(), Some("hash-1"));

        assert!(inviter_to_notify(false, inviter()).is_none());
        let no_address = InviterAddress {
            email: String::new(),
            ..inviter()
        };
        assert!(inviter_to_notify(true, no_address).is_none());
        let by_key = Invitation {
            inviter_kind: "api_key".into(),
            ..claimed
        };
        let done = by_key.accept("Ivy", tell.as_ref(), &email, at(20));
        assert_eq!(keys(&done), ["invitation.accepted"]);
    }

    #[test]
    fn declining_needs_a_usable_link_and_releases_the_user() {
        let invitation = invitation();
        let done = invitation.decline(1, at(10)).unwrap();
        assert_eq!(done.release, Some((invitation.user_id, invitation.id)));
        assert_eq!(keys(&done), ["invitation.declined"]);
        let RowChange::Update(row) = &done.row else {
            panic!()
        };
        assert_eq!(row.state, StoredState::Declined);
        assert_eq!(row.decline_time, Some(at(10)));
        for (version, now) in [(2, at(10)), (1, at(86_400))] {
            let err = invitation.decline(version, now).unwrap_err();
            assert_eq!(reason(&err), Reason::InvitationNotUsable);
        }
    }

    #[test]
    fn an_expiry_is_published_once_per_link() {
        let invitation = invitation();
        assert!(invitation.expire(at(86_399)).is_none(), "not yet");
        let done = invitation.expire(at(86_400)).expect("expired");
        assert_eq!(keys(&done), ["invitation.expired"]);
        let RowChange::Update(marked) = done.row else {
            panic!()
        };
        assert!(marked.expiry_published);
        assert!(marked.expire(at(90_000)).is_none(), "published already");
        assert!(
            with_state(StoredState::Revoked)
                .expire(at(90_000))
                .is_none()
        );
    }
}
