//! ListInvitations: which filters a request may set, how a list is ordered,
//! and what its page tokens carry (the sort key of the last invitation of
//! a page, fingerprinted with the filters so a token serves only its own
//! query).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use usher_kit::{
    error::{ApiError, ApiResult},
    pagination,
};
use usher_proto::invitation::v1 as pb;
use uuid::Uuid;

use super::{
    Invitation, InvitationState,
    input::{parse_id, parse_optional_id},
};

/// Shortest and longest email search.
pub const QUERY_CHARS: std::ops::RangeInclusive<usize> = 3..=254;

/// Which invitations of an account a list shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Any of these states as read now (all when empty).
    pub states: Vec<InvitationState>,
    /// Emails containing this, lower-cased (none when empty).
    pub email_contains: String,
    /// Invited by this id, lower-cased (none when empty).
    pub inviter_id: String,
    /// With this role.
    pub role_id: Option<Uuid>,
    /// Into this team.
    pub team_id: Option<Uuid>,
}

/// What a list is sorted by (then by id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    /// Creation time.
    Create,
    /// Expiry time.
    Expire,
    /// Email address.
    Email,
}

/// A list's order: its key and direction (ties broken by id, the same way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Order {
    /// The key.
    pub key: SortKey,
    /// Ascending (else descending).
    pub ascending: bool,
}

impl From<pb::InvitationOrderBy> for Order {
    fn from(order: pb::InvitationOrderBy) -> Self {
        let (key, ascending) = match order {
            pb::InvitationOrderBy::Unspecified | pb::InvitationOrderBy::CreateTimeDesc => {
                (SortKey::Create, false)
            }
            pb::InvitationOrderBy::CreateTimeAsc => (SortKey::Create, true),
            pb::InvitationOrderBy::ExpireTimeAsc => (SortKey::Expire, true),
            pb::InvitationOrderBy::Email => (SortKey::Email, true),
        };
        Self { key, ascending }
    }
}

/// ListInvitations counts the matches of its first page up to this many;
/// beyond, it answers this many and says the count is capped.
pub const COUNT_CAP: u64 = 1_000;

/// The sort key of the last invitation of a page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    time: Option<DateTime<Utc>>,
    email: Option<String>,
    id: Uuid,
    /// The matching invitations counted for the first page, carried so
    /// later pages do not count again. Absent in older tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// The value of the sort key a page continues after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SortValue {
    /// A creation or expiry time.
    Time(DateTime<Utc>),
    /// An email.
    Email(String),
}

/// Where the next page starts: after this sort value and id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct After {
    /// The last sort value shown.
    pub value: SortValue,
    /// The last id shown.
    pub id: Uuid,
}

impl Cursor {
    /// Where the page after this cursor starts.
    pub fn after(&self) -> ApiResult<After> {
        let value = match (&self.time, &self.email) {
            (Some(time), _) => SortValue::Time(*time),
            (None, Some(email)) => SortValue::Email(email.clone()),
            (None, None) => {
                return Err(ApiError::invalid(
                    "page_token",
                    "is not a token of this query",
                ));
            }
        };
        Ok(After { value, id: self.id })
    }
}

/// The filters of a list, fingerprinted into its page tokens.
#[derive(Serialize)]
struct Fingerprinted<'a> {
    states: Vec<i32>,
    query: &'a str,
    inviter: &'a str,
    role: Option<Uuid>,
    team: Option<Uuid>,
    order: i32,
}

/// A ListInvitations request, checked.
#[derive(Clone, Debug)]
pub struct ListCommand {
    /// Most invitations on the page.
    pub page_size: u64,
    /// Which invitations.
    pub filter: ListFilter,
    /// In which order.
    pub order: Order,
    /// Where the page starts, from the page token.
    pub cursor: Option<Cursor>,
    fingerprint: String,
}

impl ListCommand {
    /// Checks `request`: page size, search text, ids, order, states and the
    /// page token (which must be one of this very query).
    pub fn parse(request: &pb::ListInvitationsRequest) -> ApiResult<Self> {
        let page_size = pagination::page_size(request.page_size)?;
        let query = request.query.trim();
        if !query.is_empty() && !QUERY_CHARS.contains(&query.chars().count()) {
            return Err(ApiError::invalid("query", "must be 3 to 254 characters"));
        }
        let inviter = request.inviter_id.trim();
        if !inviter.is_empty() {
            parse_id("inviter_id", inviter)?;
        }
        let role_id = parse_optional_id("role_id", &request.role_id)?;
        let team_id = parse_optional_id("team_id", &request.team_id)?;
        let order = pb::InvitationOrderBy::try_from(request.order_by)
            .map_err(|_| ApiError::invalid("order_by", "unknown order"))?;
        let mut states = Vec::with_capacity(request.states.len());
        for (i, state) in request.states.iter().enumerate() {
            let state = pb::InvitationState::try_from(*state)
                .ok()
                .and_then(|s| InvitationState::try_from(s).ok())
                .ok_or_else(|| ApiError::invalid(format!("states[{i}]"), "unknown state"))?;
            states.push(state);
        }
        let fingerprint = pagination::fingerprint(&Fingerprinted {
            states: states
                .iter()
                .map(|s| pb::InvitationState::from(*s) as i32)
                .collect(),
            query,
            inviter,
            role: role_id,
            team: team_id,
            order: order as i32,
        });
        let cursor = pagination::decode_token(&fingerprint, &request.page_token)?;
        Ok(Self {
            page_size,
            filter: ListFilter {
                states,
                email_contains: query.to_lowercase(),
                inviter_id: inviter.to_lowercase(),
                role_id,
                team_id,
            },
            order: order.into(),
            cursor,
            fingerprint,
        })
    }

    /// The token of the page after the one ending with `last`, carrying
    /// the `total` counted.
    pub fn next_page_token(&self, last: &Invitation, total: u64) -> String {
        let key = self.order.key;
        pagination::encode_token(
            &self.fingerprint,
            &Cursor {
                time: match key {
                    SortKey::Create => Some(last.create_time),
                    SortKey::Expire => Some(last.expire_time),
                    SortKey::Email => None,
                },
                email: (key == SortKey::Email).then(|| last.email.clone()),
                id: last.id,
                total: Some(total),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::fixtures::{fields, invitation};

    fn field(err: ApiError) -> String {
        fields(err).remove(0)
    }

    #[test]
    fn filters_are_checked_field_by_field() {
        let bad =
            |request: pb::ListInvitationsRequest| field(ListCommand::parse(&request).unwrap_err());
        assert_eq!(
            bad(pb::ListInvitationsRequest {
                query: " ab ".into(),
                ..Default::default()
            }),
            "query"
        );
        assert_eq!(
            bad(pb::ListInvitationsRequest {
                inviter_id: "x".into(),
                ..Default::default()
            }),
            "inviter_id"
        );
        assert_eq!(
            bad(pb::ListInvitationsRequest {
                order_by: 99,
                ..Default::default()
            }),
            "order_by"
        );
        assert_eq!(
            bad(pb::ListInvitationsRequest {
                states: vec![pb::InvitationState::Pending as i32, 0],
                ..Default::default()
            }),
            "states[1]"
        );
        assert_eq!(
            bad(pb::ListInvitationsRequest {
                page_token: "nope".into(),
                ..Default::default()
            }),
            "page_token"
        );
    }

    #[test]
    fn a_page_token_serves_only_its_own_query() {
        let request = pb::ListInvitationsRequest {
            query: "ACME".into(),
            states: vec![pb::InvitationState::Expired as i32],
            order_by: pb::InvitationOrderBy::Email as i32,
            ..Default::default()
        };
        let first = ListCommand::parse(&request).unwrap();
        assert_eq!(first.filter.email_contains, "acme");
        assert_eq!(first.filter.states, [InvitationState::Expired]);
        assert_eq!(
            first.order,
            Order {
                key: SortKey::Email,
                ascending: true
            }
        );
        let last = invitation();
        let token = first.next_page_token(&last, 7);
        let next = ListCommand::parse(&pb::ListInvitationsRequest {
            page_token: token.clone(),
            ..request.clone()
        })
        .unwrap();
        let cursor = next.cursor.expect("cursor");
        assert_eq!(cursor.total, Some(7));
        assert_eq!(
            cursor.after().unwrap(),
            After {
                value: SortValue::Email(last.email.clone()),
                id: last.id
            }
        );
        let other = pb::ListInvitationsRequest {
            query: "other".into(),
            page_token: token,
            ..request
        };
        assert!(ListCommand::parse(&other).is_err());
    }

    #[test]
    fn the_default_order_is_newest_first_and_times_page_by_time() {
        let command = ListCommand::parse(&pb::ListInvitationsRequest::default()).unwrap();
        assert_eq!(
            command.order,
            Order {
                key: SortKey::Create,
                ascending: false
            }
        );
        let last = invitation();
        let token = command.next_page_token(&last, 3);
        let next = ListCommand::parse(&pb::ListInvitationsRequest {
            page_token: token,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            next.cursor.unwrap().after().unwrap().value,
            SortValue::Time(last.create_time)
        );
        let forged = Cursor {
            time: None,
            email: None,
            id: last.id,
            total: None,
        };
        assert_eq!(field(forged.after().unwrap_err()), "page_token");
    }
}
