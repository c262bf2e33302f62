//! The rules of teams: how many an account may hold, what an edit changes,
//! and the audit entries and events each change causes. Pure: the caller
//! reads the facts under the account lock and writes the answer.

use chrono::{DateTime, Utc};
use prost_types::FieldMask;
use serde_json::{Map, Value as Json, json};
use usher_kit::error::{ApiError, ApiResult, Reason};
use usher_proto::events::v1 as events;
use uuid::Uuid;

use super::effects::{Actor, Audit, Effects};

/// Most teams an account may hold.
pub const MAX_TEAMS: u64 = 1_000;

/// The refusal of a name another team of the account has.
pub fn name_taken() -> ApiError {
    ApiError::rejected(Reason::AlreadyExists, "a team with this name exists")
}

/// Refuses a new team when the account holds `count` already.
pub fn check_room(count: u64) -> ApiResult<()> {
    if count >= MAX_TEAMS {
        return Err(ApiError::invalid(
            "name",
            format!("the account already has the maximum of {MAX_TEAMS} teams"),
        ));
    }
    Ok(())
}

/// A team as the rules see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Team {
    /// Its id.
    pub id: Uuid,
    /// Its account.
    pub account_id: Uuid,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
}

/// What an UpdateTeam changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TeamEdit {
    /// The new name, if it differs.
    pub name: Option<String>,
    /// The new description, if it differs.
    pub description: Option<String>,
    /// The fields changed, in order.
    pub changed: Vec<String>,
    /// Old and new value of each, for the audit log.
    pub details: Map<String, Json>,
}

impl TeamEdit {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty()
    }
}

/// What setting `name` and `description` (when named) changes on `current`.
pub fn edit(current: &Team, name: Option<String>, description: Option<String>) -> TeamEdit {
    let mut edit = TeamEdit::default();
    if let Some(name) = name.filter(|n| *n != current.name) {
        edit.details
            .insert("name".into(), json!({"old": current.name, "new": name}));
        edit.changed.push("name".into());
        edit.name = Some(name);
    }
    if let Some(description) = description.filter(|d| *d != current.description) {
        edit.details.insert(
            "description".into(),
            json!({"old": current.description, "new": description}),
        );
        edit.changed.push("description".into());
        edit.description = Some(description);
    }
    edit
}

/// The audit entry and event of a created team.
pub fn created(team: &Team, actor: &Actor, now: DateTime<Utc>) -> Effects {
    let mut effects = Effects::new();
    effects.audit(Audit {
        account_id: team.account_id,
        action: "team.created",
        target_type: "team",
        target_id: team.id.to_string(),
        target_name: team.name.clone(),
        details: Some(json!({"description": team.description})),
    });
    effects.event(
        "team.created",
        "TeamCreated",
        team.id.to_string(),
        Some(team.account_id),
        &events::TeamCreated {
            team_id: team.id.to_string(),
            account_id: team.account_id.to_string(),
            actor: Some(actor.to_proto()),
            name: team.name.clone(),
        },
        now,
    );
    effects
}

/// The audit entry and event of `edit` on the team now `updated`.
pub fn updated(updated: &Team, edit: TeamEdit, actor: &Actor, now: DateTime<Utc>) -> Effects {
    let mut effects = Effects::new();
    effects.audit(Audit {
        account_id: updated.account_id,
        action: "team.updated",
        target_type: "team",
        target_id: updated.id.to_string(),
        target_name: updated.name.clone(),
        details: Some(Json::Object(edit.details)),
    });
    effects.event(
        "team.updated",
        "TeamUpdated",
        updated.id.to_string(),
        Some(updated.account_id),
        &events::TeamUpdated {
            team_id: updated.id.to_string(),
            account_id: updated.account_id.to_string(),
            actor: Some(actor.to_proto()),
            changed_fields: Some(FieldMask {
                paths: edit.changed,
            }),
            name: updated.name.clone(),
        },
        now,
    );
    effects
}

/// The events of the `members` left team-less, then the audit entry and
/// event of the deleted team.
pub fn deleted(team: &Team, members: &[Uuid], actor: &Actor, now: DateTime<Utc>) -> Effects {
    let mut effects = Effects::new();
    for member in members {
        effects.event(
            "user.updated",
            "UserUpdated",
            member.to_string(),
            Some(team.account_id),
            &events::UserUpdated {
                user_id: member.to_string(),
                account_id: team.account_id.to_string(),
                actor: Some(actor.to_proto()),
                changed_fields: Some(FieldMask {
                    paths: vec!["team_id".into()],
                }),
                team_id: String::new(),
                ..Default::default()
            },
            now,
        );
    }
    let released = released_count(members.len());
    effects.audit(Audit {
        account_id: team.account_id,
        action: "team.deleted",
        target_type: "team",
        target_id: team.id.to_string(),
        target_name: team.name.clone(),
        details: Some(json!({"released_member_count": released})),
    });
    effects.event(
        "team.deleted",
        "TeamDeleted",
        team.id.to_string(),
        Some(team.account_id),
        &events::TeamDeleted {
            team_id: team.id.to_string(),
            account_id: team.account_id.to_string(),
            actor: Some(actor.to_proto()),
            name: team.name.clone(),
            released_member_count: released,
        },
        now,
    );
    effects
}

/// A member count as the API reports it.
pub fn released_count(members: usize) -> i32 {
    i32::try_from(members).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn team() -> Team {
        Team {
            id: Uuid::new_v4(),
            account_id: Uuid::new_v4(),
            name: "Ops".into(),
            description: "Night shift".into(),
        }
    }

    #[test]
    fn an_edit_names_only_what_differs() {
        let current = team();
        let same = edit(&current, Some("Ops".into()), Some("Night shift".into()));
        assert!(same.is_empty());
        let renamed = edit(&current, Some("Support".into()), None);
        assert_eq!(renamed.changed, ["name"]);
        assert_eq!(
            renamed.details["name"],
            json!({"old": "Ops", "new": "Support"})
        );
        assert_eq!(renamed.description, None);
    }

    #[test]
    fn an_account_holds_at_most_the_maximum_of_teams() {
        check_room(MAX_TEAMS - 1).expect("room");
        assert_eq!(
            check_room(MAX_TEAMS).expect_err("full").reason(),
            Reason::InvalidArgument
        );
    }

    #[test]
    fn a_deletion_publishes_each_released_member_then_the_team() {
        let now = DateTime::from_timestamp(1_900_000_000, 0).expect("time");
        let members = [Uuid::new_v4(), Uuid::new_v4()];
        let effects = deleted(&team(), &members, &Actor::system(), now);
        assert_eq!(effects.events.len(), 3);
        assert_eq!(effects.actions(), ["team.deleted"]);
        assert_eq!(
            effects.audit[0].details,
            Some(json!({"released_member_count": 2}))
        );
    }
}
