//! The invitation service's rules, pure: no database, no Redis, no gRPC.
//! Each rule takes what was loaded (an [`Invitation`], a request, what
//! identity answered) and returns its decision: the rows to write, the
//! messages to emit, the users to release, the links that die. The
//! application layer (`crate::app`) loads, asks the rule and persists.
//!
//! - [`state`]: the state machine's states and how a row reads at `now`;
//! - [`transitions`]: revoke, delete, resend, claim, accept, decline and
//!   expire, each returning its [`transitions::Transition`];
//! - [`create`]: the rules of CreateInvitations (entries, verdicts, ids,
//!   the rows of new invitations, the answer);
//! - [`list`]: the filters and order of ListInvitations;
//! - [`input`]: ids, tokens and the invitee's answer, checked;
//! - [`delivery`]: which delivery results are recorded, and how;
//! - [`events`]: the email jobs and `invitation.*` events a decision emits;
//! - [`actors`]: who acted, as events and identity's audit log show it;
//! - [`ports`]: what the create saga needs from identity, the token keys
//!   and the database, as traits (declarations only).

pub mod actors;
pub mod create;
pub mod delivery;
pub mod events;
pub mod input;
pub mod list;
pub mod ports;
pub mod state;
pub mod transitions;

use chrono::{DateTime, Duration, Utc};
use serde_json::Value as Json;
use uuid::Uuid;

pub use state::{InvitationState, StoredState};

/// One invitation as stored: the record every rule reads and every
/// transition returns changed.
#[derive(Clone, Debug, PartialEq)]
pub struct Invitation {
    /// Its id.
    pub id: Uuid,
    /// The inviting account.
    pub account_id: Uuid,
    /// The invitee's canonical address.
    pub email: String,
    /// The invitee's name as the admin gave it.
    pub display_name: String,
    /// The stored state (see [`Invitation::state_at`] for what it reads as).
    pub state: StoredState,
    /// The role the invitee gets.
    pub role_id: Uuid,
    /// The role's name when invited.
    pub role_name: String,
    /// The team the invitee joins, if any.
    pub team_id: Option<Uuid>,
    /// The team's name when invited.
    pub team_name: String,
    /// The products granted.
    pub products: Vec<String>,
    /// Free metadata carried to the user.
    pub metadata: Option<Json>,
    /// The inviter's kind, as [`actors::actor_kind_name`] names it.
    pub inviter_kind: String,
    /// The inviter's id.
    pub inviter_id: String,
    /// The inviter's name when invited.
    pub inviter_name: String,
    /// The INVITED user identity reserved.
    pub user_id: Uuid,
    /// The invitee's locale, if the admin chose one.
    pub locale: String,
    /// The version of the current link (a resend increments it).
    pub token_version: i64,
    /// HMAC of the current link's token (never the token).
    pub token_hash: String,
    /// Created.
    pub create_time: DateTime<Utc>,
    /// Last changed.
    pub update_time: DateTime<Utc>,
    /// When the current link stops working.
    pub expire_time: DateTime<Utc>,
    /// Accepted.
    pub accept_time: Option<DateTime<Utc>>,
    /// Revoked.
    pub revoke_time: Option<DateTime<Utc>>,
    /// Declined.
    pub decline_time: Option<DateTime<Utc>>,
    /// Until when an accept holds the claim (ACCEPTING).
    pub claim_until: Option<DateTime<Utc>>,
    /// Resends so far.
    pub resend_count: i32,
    /// The last time a link was sent.
    pub last_send_time: DateTime<Utc>,
    /// The latest email job.
    pub delivery_job_id: String,
    /// Its delivery status (`notification.v1.DeliveryStatus`).
    pub delivery_status: i32,
    /// Why it failed, if it did.
    pub delivery_reason: String,
    /// Delivery attempts so far.
    pub delivery_attempts: i32,
    /// When the delivery status last changed.
    pub delivery_update_time: Option<DateTime<Utc>>,
    /// Whether `invitation.expired` was published for the current link.
    pub expiry_published: bool,
}

impl Invitation {
    /// What the invitation reads as at `now`.
    pub fn state_at(&self, now: DateTime<Utc>) -> InvitationState {
        InvitationState::read(self.state, self.expire_time, self.claim_until, now)
    }
}

/// How long a new (or resent) link lives: the account's invitation
/// lifetime when identity gives a positive one, else 24 hours.
pub fn lifetime(account_lifetime: Option<Duration>) -> Duration {
    account_lifetime
        .filter(|d| *d > Duration::zero())
        .unwrap_or_else(|| Duration::hours(24))
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! An invitation for the rule tests.

    use chrono::TimeZone;

    use super::*;

    /// 2026-03-02 09:00 UTC plus `seconds`.
    pub fn at(seconds: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap() + Duration::seconds(seconds)
    }

    /// The fields an INVALID_ARGUMENT names, in order.
    pub fn fields(err: usher_kit::error::ApiError) -> Vec<String> {
        match err {
            usher_kit::error::ApiError::InvalidArgument(violations) => {
                violations.into_iter().map(|v| v.field).collect()
            }
            other => panic!("not invalid: {other}"),
        }
    }

    /// A CreateInvitations request for `emails` with role 3.
    pub fn create_request(
        emails: &[&str],
    ) -> usher_proto::invitation::v1::CreateInvitationsRequest {
        use usher_proto::invitation::v1 as pb;
        pb::CreateInvitationsRequest {
            invitees: emails
                .iter()
                .map(|email| pb::InviteeInput {
                    email: (*email).to_owned(),
                    ..Default::default()
                })
                .collect(),
            role_id: Uuid::from_u128(3).to_string(),
            ..Default::default()
        }
    }

    /// A PENDING invitation created at `at(0)`, expiring a day later.
    pub fn invitation() -> Invitation {
        Invitation {
            id: Uuid::from_u128(1),
            account_id: Uuid::from_u128(2),
            email: "ann@acme.example".into(),
            display_name: "Ann".into(),
            state: StoredState::Pending,
            role_id: Uuid::from_u128(3),
            role_name: "User".into(),
            team_id: None,
            team_name: String::new(),
            products: vec!["chat".into()],
            metadata: None,
            inviter_kind: "user".into(),
            inviter_id: Uuid::from_u128(4).to_string(),
            inviter_name: "Olga Owner".into(),
            user_id: Uuid::from_u128(5),
            locale: String::new(),
            token_version: 1,
            token_hash: "hash-1".into(),
            create_time: at(0),
            update_time: at(0),
            expire_time: at(86_400),
            accept_time: None,
            revoke_time: None,
            decline_time: None,
            claim_until: None,
            resend_count: 0,
            last_send_time: at(0),
            delivery_job_id: "job-1".into(),
            delivery_status: 1,
            delivery_reason: String::new(),
            delivery_attempts: 0,
            delivery_update_time: Some(at(0)),
            expiry_published: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    #[test]
    fn the_lifetime_is_the_accounts_when_positive() {
        assert_eq!(lifetime(None), Duration::hours(24));
        assert_eq!(lifetime(Some(Duration::zero())), Duration::hours(24));
        assert_eq!(lifetime(Some(Duration::seconds(-5))), Duration::hours(24));
        assert_eq!(lifetime(Some(Duration::hours(2))), Duration::hours(2));
    }

    #[test]
    fn an_invitation_reads_its_state_from_its_own_times() {
        let mut invitation = invitation();
        assert_eq!(invitation.state_at(at(10)), InvitationState::Pending);
        assert_eq!(invitation.state_at(at(86_400)), InvitationState::Expired);
        invitation.state = StoredState::Accepting;
        invitation.claim_until = Some(at(30));
        assert_eq!(invitation.state_at(at(10)), InvitationState::Accepting);
        assert_eq!(invitation.state_at(at(30)), InvitationState::Pending);
    }
}
