//! The invitation state machine's states: what a row stores
//! ([`StoredState`]) and what it reads as at a given time
//! ([`InvitationState`]).
//!
//! Two states are never stored: EXPIRED is PENDING past its expiry, and an
//! ACCEPTING claim that ran out reads as the state it would return to
//! (PENDING, or EXPIRED if the invitation expired meanwhile). The reading is
//! done by [`InvitationState::read`] here and, for list filters and the
//! claim, by its SQL twin in `store::invitations::state_condition`; a store
//! test proves the two agree.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::StringLen;
use usher_proto::invitation::v1 as pb;

/// What the `state` column holds. Stored as its upper-case text; the derive
/// lets the entity hold it typed, so no code parses the stored string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, sea_orm::EnumIter, sea_orm::DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum StoredState {
    /// Waiting for the invitee (EXPIRED once past `expire_time`).
    #[sea_orm(string_value = "PENDING")]
    Pending,
    /// An accept holds the claim until `claim_until`.
    #[sea_orm(string_value = "ACCEPTING")]
    Accepting,
    /// The invitee accepted.
    #[sea_orm(string_value = "ACCEPTED")]
    Accepted,
    /// An admin revoked it.
    #[sea_orm(string_value = "REVOKED")]
    Revoked,
    /// The invitee declined it.
    #[sea_orm(string_value = "DECLINED")]
    Declined,
}

impl StoredState {
    /// The stored form.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Accepting => "ACCEPTING",
            Self::Accepted => "ACCEPTED",
            Self::Revoked => "REVOKED",
            Self::Declined => "DECLINED",
        }
    }

    /// Every stored state.
    pub const ALL: [Self; 5] = [
        Self::Pending,
        Self::Accepting,
        Self::Accepted,
        Self::Revoked,
        Self::Declined,
    ];
}

/// The state of an invitation as read at a given time: what the API shows
/// and what every rule decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InvitationState {
    /// The link works.
    Pending,
    /// The link's lifetime ended; a resend opens it again.
    Expired,
    /// An accept holds the claim right now.
    Accepting,
    /// The invitee accepted.
    Accepted,
    /// An admin revoked it.
    Revoked,
    /// The invitee declined it.
    Declined,
}

impl InvitationState {
    /// Every state an invitation can read as.
    pub const ALL: [Self; 6] = [
        Self::Pending,
        Self::Expired,
        Self::Accepting,
        Self::Accepted,
        Self::Revoked,
        Self::Declined,
    ];

    /// The state of a row holding `stored`, `expire_time` and `claim_until`,
    /// as of `now`: PENDING past its expiry reads EXPIRED; an ACCEPTING claim
    /// that ran out reads as the state it would return to. A time equal to
    /// `expire_time` (or `claim_until`) is already past it.
    pub fn read(
        stored: StoredState,
        expire_time: DateTime<Utc>,
        claim_until: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Self {
        let open = if expire_time > now {
            Self::Pending
        } else {
            Self::Expired
        };
        match stored {
            StoredState::Pending => open,
            StoredState::Accepting if claim_until.is_some_and(|until| until > now) => {
                Self::Accepting
            }
            StoredState::Accepting => open,
            StoredState::Accepted => Self::Accepted,
            StoredState::Revoked => Self::Revoked,
            StoredState::Declined => Self::Declined,
        }
    }

    /// Whether the invitation is open (PENDING or EXPIRED): it holds a seat
    /// and a link, and may be resent or revoked.
    pub const fn is_open(self) -> bool {
        matches!(self, Self::Pending | Self::Expired)
    }
}

impl From<InvitationState> for pb::InvitationState {
    fn from(state: InvitationState) -> Self {
        match state {
            InvitationState::Pending => Self::Pending,
            InvitationState::Expired => Self::Expired,
            InvitationState::Accepting => Self::Accepting,
            InvitationState::Accepted => Self::Accepted,
            InvitationState::Revoked => Self::Revoked,
            InvitationState::Declined => Self::Declined,
        }
    }
}

impl TryFrom<pb::InvitationState> for InvitationState {
    /// UNSPECIFIED names no state.
    type Error = ();

    fn try_from(state: pb::InvitationState) -> Result<Self, ()> {
        Ok(match state {
            pb::InvitationState::Unspecified => return Err(()),
            pb::InvitationState::Pending => Self::Pending,
            pb::InvitationState::Expired => Self::Expired,
            pb::InvitationState::Accepting => Self::Accepting,
            pb::InvitationState::Accepted => Self::Accepted,
            pb::InvitationState::Revoked => Self::Revoked,
            pb::InvitationState::Declined => Self::Declined,
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone};

    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap() + Duration::seconds(seconds)
    }

    #[test]
    fn pending_reads_expired_from_its_expiry_on() {
        let expire = at(100);
        let read = |now| InvitationState::read(StoredState::Pending, expire, None, now);
        assert_eq!(read(at(99)), InvitationState::Pending);
        assert_eq!(
            read(expire - Duration::milliseconds(1)),
            InvitationState::Pending
        );
        assert_eq!(read(expire), InvitationState::Expired);
        assert_eq!(read(at(101)), InvitationState::Expired);
    }

    #[test]
    fn an_accepting_claim_holds_until_it_runs_out() {
        let expire = at(100);
        let read = |claim, now| InvitationState::read(StoredState::Accepting, expire, claim, now);
        assert_eq!(read(Some(at(50)), at(49)), InvitationState::Accepting);
        assert_eq!(read(Some(at(50)), at(50)), InvitationState::Pending);
        assert_eq!(read(None, at(10)), InvitationState::Pending);
        // A claim that outlives the invitation still holds; once over, the
        // invitation reads expired.
        assert_eq!(read(Some(at(150)), at(120)), InvitationState::Accepting);
        assert_eq!(read(Some(at(150)), at(150)), InvitationState::Expired);
    }

    #[test]
    fn final_states_ignore_time() {
        for (stored, read) in [
            (StoredState::Accepted, InvitationState::Accepted),
            (StoredState::Revoked, InvitationState::Revoked),
            (StoredState::Declined, InvitationState::Declined),
        ] {
            for now in [at(0), at(100), at(1_000)] {
                assert_eq!(
                    InvitationState::read(stored, at(100), Some(at(500)), now),
                    read
                );
            }
        }
    }

    #[test]
    fn only_pending_and_expired_are_open() {
        let open: Vec<_> = InvitationState::ALL
            .into_iter()
            .filter(|s| s.is_open())
            .collect();
        assert_eq!(open, [InvitationState::Pending, InvitationState::Expired]);
    }

    #[test]
    fn api_states_map_both_ways_and_unspecified_names_none() {
        for state in InvitationState::ALL {
            let shown = pb::InvitationState::from(state);
            assert_eq!(InvitationState::try_from(shown), Ok(state));
        }
        assert_eq!(
            InvitationState::try_from(pb::InvitationState::Unspecified),
            Err(())
        );
        let stored: Vec<_> = StoredState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            stored,
            ["PENDING", "ACCEPTING", "ACCEPTED", "REVOKED", "DECLINED"]
        );
    }
}
