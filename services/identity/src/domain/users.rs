//! The rules of UserService: what a valid username is, how a listing is
//! ordered and paged, and the decisions of CreateUser, UpdateUser,
//! BatchUpdateUsers (its per-item partial failures), DeactivateUser,
//! ReactivateUser and DeleteUser. Each decision takes the rows and facts the
//! caller loaded in its transaction and returns the row to write and the
//! audit entries and events it causes ([`Effects`]), so a rule and its audit
//! and event are decided, and unit-tested, together without a database.
//!
//! The seat rule and the domain allow-list are in [`super::seats`]; the
//! owner and last-manager protection in [`super::managers`].

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use prost_types::FieldMask;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use usher_kit::{
    convert::{json_strings, strings},
    email::EmailAddress,
    error::{ApiError, ApiResult, Reason},
};
use usher_proto::{events::v1 as events, identity::v1 as pb};
use uuid::Uuid;

use super::{
    Origin, UserStatus,
    effects::{Actor, Audit, Effects},
    grants::{self, Grant, Grantor},
    managers::{ManagerChange, OwnerAction, check_managers_remain, check_owner},
};
use crate::store::entities::user;

/// Longest display name.
pub const MAX_DISPLAY_NAME: usize = 200;
/// Shortest search term (trigrams need three characters).
pub const MIN_QUERY_CHARS: usize = 3;
/// Longest search term.
pub const MAX_QUERY_CHARS: usize = 200;
/// Most users in one BatchUpdateUsers call.
pub const MAX_BATCH: usize = 1_000;
/// The mask paths of UpdateUser.
pub const UPDATE_PATHS: &[&str] = &[
    "display_name",
    "role_id",
    "team_id",
    "products",
    "locale",
    "metadata",
];
/// The mask paths of BatchUpdateUsers.
pub const BATCH_PATHS: &[&str] = &["role_id", "team_id"];

/// A sign-in name: 3..=64 of `[a-z0-9._-]`, upper case lower-cased.
pub fn validate_username(field: &str, value: &str) -> ApiResult<String> {
    let username = value.trim().to_ascii_lowercase();
    let ok = (3..=64).contains(&username.len())
        && username
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if !ok {
        return Err(ApiError::invalid(
            field,
            "must be 3 to 64 characters of a-z, 0-9, '.', '_' and '-'",
        ));
    }
    Ok(username)
}

// ---------------------------------------------------------------------------
// Listing

/// The order of ListUsers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserOrder {
    /// By display name, case-insensitively (the default).
    DisplayName,
    /// By email, falling back to the username.
    Email,
    /// Newest first.
    Newest,
}

/// Where a ListUsers page starts, inside the page token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SortKey {
    /// The text sort key of the name and email orders.
    Text(String),
    /// The creation time of the newest-first order.
    Time(DateTime<Utc>),
}

/// The most matching users a listing counts: beyond it, `total_size` says
/// [`COUNT_CAP`] and `total_size_capped` that more match. Counting every
/// match of a large account on its first page (a scan of all its users)
/// is what made that page slow; counting up to the cap reads at most
/// `COUNT_CAP + 1` matches, in the same keyset query as the page.
pub const COUNT_CAP: u64 = 1_000;

/// The count a listing shows, `(total_size, total_size_capped)`, for
/// `matched` users counted up to `COUNT_CAP + 1`.
pub fn capped_count(matched: u64) -> (u64, bool) {
    if matched > COUNT_CAP {
        (COUNT_CAP, true)
    } else {
        (matched, false)
    }
}

/// The page token: `after` is the last non-owner user of the previous page
/// (`None`: from the first non-owner user). Any token means the owner was
/// already shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    /// The sort key and id of the last user shown.
    pub after: Option<(SortKey, Uuid)>,
    /// The matching users counted for the first page (up to
    /// [`COUNT_CAP`]), carried so later pages do not count them again.
    /// Absent in the oldest tokens; tokens made before the cap carry the
    /// exact count, shown as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Whether more users matched than `total` (counting stopped at
    /// [`COUNT_CAP`]). Absent (false) in tokens made before the cap.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub capped: bool,
}

/// The answer to a page token that does not belong to the query.
pub fn invalid_token() -> ApiError {
    ApiError::invalid("page_token", "is not a token of this query")
}

/// Which users ListUsers shows (all filters optional).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListFilter {
    /// The caller's account.
    pub account_id: Uuid,
    /// Only users in this status.
    pub status: Option<UserStatus>,
    /// Only holders of this role.
    pub role_id: Option<Uuid>,
    /// Only members of this team.
    pub team_id: Option<Uuid>,
    /// A lower-cased substring of name, email or username (empty: any).
    pub term: String,
}

// ---------------------------------------------------------------------------
// Create

/// A validated CreateUser.
#[derive(Clone, Debug)]
pub struct CreateUser {
    /// The sign-in name.
    pub username: String,
    /// The email, if any.
    pub email: Option<EmailAddress>,
    /// The display name.
    pub display_name: String,
    /// The locale (empty: the account's).
    pub locale: String,
    /// The role given.
    pub role_id: Uuid,
    /// The team, if any.
    pub team_id: Option<Uuid>,
    /// The products the user uses.
    pub products: Vec<String>,
    /// The platform's metadata.
    pub metadata: Option<Json>,
    /// Whether the user must change the password at the first sign-in.
    pub require_password_change: bool,
}

impl CreateUser {
    /// The canonical email, if any (what is stored and shown).
    pub fn canonical_email(&self) -> Option<String> {
        self.email.as_ref().map(|e| e.canonical().to_owned())
    }
}

/// Refuses a user who could never sign in or who manages users without a
/// password: a role that manages users needs one, and so does a user without
/// an email (who cannot receive the set-password link).
pub fn check_password_needed(
    has_password: bool,
    role_manages: bool,
    has_email: bool,
) -> ApiResult<()> {
    if has_password {
        return Ok(());
    }
    if role_manages {
        return Err(ApiError::invalid(
            "password",
            "is required for a role that manages users",
        ));
    }
    if !has_email {
        return Err(ApiError::invalid(
            "password",
            "is required for a user without an email",
        ));
    }
    Ok(())
}

/// The refusal of a username or email another user of the account holds
/// (`existing`).
pub fn already_used(existing: &user::Model, username: &str) -> ApiError {
    let what = if existing.username.as_deref() == Some(username) {
        "username"
    } else {
        "email"
    };
    ApiError::rejected(
        Reason::AlreadyExists,
        format!("the {what} is already used in the account"),
    )
}

/// The refusal of a write a unique index turned down (a concurrent create).
pub fn taken_by_a_concurrent_create() -> ApiError {
    ApiError::rejected(
        Reason::AlreadyExists,
        "the username or email is already used in the account",
    )
}

/// The audit entry and event of `created` (a direct user made by
/// `command`); `set_password_link` is when the emailed link expires, for a
/// user created without a password.
pub fn created(
    created: &user::Model,
    command: &CreateUser,
    set_password_link: Option<DateTime<Utc>>,
    actor: &Actor,
    now: DateTime<Utc>,
) -> Effects {
    let mut effects = Effects::new();
    let user_id = created.id.to_string();
    effects.audit(Audit {
        account_id: created.account_id,
        action: "user.created",
        target_type: "user",
        target_id: user_id.clone(),
        target_name: created.display_name.clone(),
        details: Some(json!({
            "username": command.username,
            "email": command.canonical_email(),
            "role_id": command.role_id.to_string(),
            "team_id": command.team_id.map(|t| t.to_string()),
            "products": command.products,
            "origin": Origin::Direct.as_str(),
            "password_set": created.password_hash.is_some(),
            "set_password_link_expire_time": set_password_link,
            "require_password_change": command.require_password_change,
        })),
    });
    effects.event(
        "user.created",
        "UserCreated",
        user_id.clone(),
        Some(created.account_id),
        &events::UserCreated {
            user_id,
            account_id: created.account_id.to_string(),
            actor: Some(actor.to_proto()),
            email: command.canonical_email().unwrap_or_default(),
            username: command.username.clone(),
            display_name: created.display_name.clone(),
            status: pb::UserStatus::Active as i32,
            origin: pb::UserOrigin::Direct as i32,
            role_id: command.role_id.to_string(),
            team_id: command.team_id.map(|t| t.to_string()).unwrap_or_default(),
            products: command.products.clone(),
            invitation_id: String::new(),
        },
        now,
    );
    effects
}

// ---------------------------------------------------------------------------
// Update

/// A validated UpdateUser: `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct UpdateUser {
    /// The user changed.
    pub user_id: Uuid,
    /// A new display name.
    pub display_name: Option<String>,
    /// A new role.
    pub role_id: Option<Uuid>,
    /// A new team, or none.
    pub team_id: Option<Option<Uuid>>,
    /// New products.
    pub products: Option<Vec<String>>,
    /// A new locale (empty: the account's).
    pub locale: Option<String>,
    /// New metadata, or none.
    pub metadata: Option<Option<Json>>,
}

/// Refuses editing an invited user (its invitation is what changes) and the
/// owner's details by anyone else.
pub fn check_editable(target: &user::Model, actor_is_target: bool) -> ApiResult<()> {
    if target.status == UserStatus::Invited {
        return Err(ApiError::rejected(
            Reason::InvalidState,
            "the user is invited: change the invitation instead",
        ));
    }
    check_owner(target.owner, actor_is_target, OwnerAction::Edit)
}

/// Refuses giving `target` the role `role_id` (whose effective permissions
/// are `granted`): the owner's role never changes, and nobody grants more
/// than they hold or changes their own role.
pub fn check_role_change(
    target: &user::Model,
    grantor: &Grantor<'_>,
    role_id: Uuid,
    granted: &[String],
) -> ApiResult<()> {
    check_owner(
        target.owner,
        grantor.user_id == Some(target.id),
        OwnerAction::ChangeRole,
    )?;
    grants::check_grant(
        grantor,
        &Grant::Role {
            user: Some((target.id, target.role_id)),
            role_id,
            permissions: granted,
        },
    )
}

/// The row `target` becomes under `command` at `now`, and the audit entry and
/// event of the change; `None` when nothing changes. The caller checked the
/// role (`check_role_change`, the managers rule), the team and the products.
pub fn updated(
    target: &user::Model,
    command: &UpdateUser,
    search_text: impl Fn(&str) -> String,
    actor: &Actor,
    now: DateTime<Utc>,
) -> Option<(user::Model, Effects)> {
    let mut row = target.clone();
    let mut changed: Vec<String> = Vec::new();
    let mut details = serde_json::Map::new();
    let mut note = |field: &str, old: Json, new: Json| {
        changed.push(field.to_owned());
        details.insert(field.to_owned(), json!({"old": old, "new": new}));
    };
    if let Some(name) = command
        .display_name
        .as_ref()
        .filter(|n| **n != target.display_name)
    {
        note("display_name", json!(target.display_name), json!(name));
        row.search_text = search_text(name);
        row.display_name = name.clone();
    }
    if let Some(role_id) = command.role_id.filter(|r| *r != target.role_id) {
        note(
            "role_id",
            json!(target.role_id.to_string()),
            json!(role_id.to_string()),
        );
        row.role_id = role_id;
    }
    if let Some(team_id) = command.team_id.filter(|t| *t != target.team_id) {
        note(
            "team_id",
            json!(target.team_id.map(|t| t.to_string())),
            json!(team_id.map(|t| t.to_string())),
        );
        row.team_id = team_id;
    }
    if let Some(products) = &command.products {
        let old = strings(&target.products);
        if old.iter().collect::<BTreeSet<_>>() != products.iter().collect::<BTreeSet<_>>() {
            note("products", json!(old), json!(products));
            row.products = json_strings(products.clone());
        }
    }
    if let Some(locale) = command.locale.as_ref().filter(|l| **l != target.locale) {
        note("locale", json!(target.locale), json!(locale));
        row.locale = locale.clone();
    }
    if let Some(metadata) = command.metadata.as_ref().filter(|m| **m != target.metadata) {
        // The content is the platform's: the log says that it changed.
        note(
            "metadata",
            json!({"changed": true}),
            json!({"changed": true}),
        );
        row.metadata = metadata.clone();
    }
    if changed.is_empty() {
        return None;
    }
    row.update_time = now;

    let mut effects = Effects::new();
    let user_id = row.id.to_string();
    effects.audit(Audit {
        account_id: row.account_id,
        action: "user.updated",
        target_type: "user",
        target_id: user_id.clone(),
        target_name: row.display_name.clone(),
        details: Some(json!({ "changes": Json::Object(details) })),
    });
    let has = |field: &str| changed.iter().any(|c| c == field);
    let payload = events::UserUpdated {
        user_id: user_id.clone(),
        account_id: row.account_id.to_string(),
        actor: Some(actor.to_proto()),
        display_name: if has("display_name") {
            row.display_name.clone()
        } else {
            String::new()
        },
        role_id: if has("role_id") {
            row.role_id.to_string()
        } else {
            String::new()
        },
        team_id: if has("team_id") {
            row.team_id.map(|t| t.to_string()).unwrap_or_default()
        } else {
            String::new()
        },
        products: if has("products") {
            strings(&row.products)
        } else {
            Vec::new()
        },
        locale: if has("locale") {
            row.locale.clone()
        } else {
            String::new()
        },
        changed_fields: Some(FieldMask {
            paths: changed.clone(),
        }),
    };
    effects.event(
        "user.updated",
        "UserUpdated",
        user_id,
        Some(row.account_id),
        &payload,
        now,
    );
    Some((row, effects))
}

// ---------------------------------------------------------------------------
// Batch

/// A validated BatchUpdateUsers.
#[derive(Clone, Debug, Default)]
pub struct BatchUpdate {
    /// The users changed, in the order asked, each once.
    pub user_ids: Vec<Uuid>,
    /// The role given to every user, when the mask names `role_id`.
    pub role_id: Option<Uuid>,
    /// Whether the mask names `team_id`.
    pub set_team: bool,
    /// The team given when `set_team` (`None`: no team).
    pub team_id: Option<Uuid>,
}

/// The role a batch gives, as the rules judge it.
#[derive(Clone, Copy, Debug)]
pub struct NewRole<'a> {
    /// Its id.
    pub id: Uuid,
    /// Whether it holds `users.manage`.
    pub manages: bool,
    /// Its effective permissions.
    pub granted: &'a [String],
}

/// What a batch looked at: the users found (locked), whether each role of
/// the account manages users, and how many active managers there are.
#[derive(Debug)]
pub struct BatchFacts<'a> {
    /// The users of the batch that exist in the account, by id.
    pub found: HashMap<Uuid, user::Model>,
    /// For each role of the account, whether it holds `users.manage`.
    pub role_manages: HashMap<Uuid, bool>,
    /// The active managers of the account now.
    pub managers_now: u64,
    /// The role given, if any.
    pub new_role: Option<NewRole<'a>>,
}

/// One user of a batch that passed every rule.
#[derive(Clone, Debug)]
pub struct BatchItem {
    /// The user as it was.
    pub target: user::Model,
    /// Whether its role changes.
    pub role_changes: bool,
    /// Whether its team changes.
    pub team_changes: bool,
}

/// The verdict of a batch: the items that fail with their error, those that
/// pass (changed or not), and the audit entries and events of the changes.
#[derive(Debug)]
pub struct BatchDecision {
    /// Failed items, by user id.
    pub errors: HashMap<Uuid, ApiError>,
    /// Passing items, in the order asked.
    pub items: Vec<BatchItem>,
    /// One audit entry and one event per changed user.
    pub effects: Effects,
}

impl BatchDecision {
    /// The passing items whose role or team changes (the rows to write).
    pub fn changed(&self) -> impl Iterator<Item = &BatchItem> {
        self.items
            .iter()
            .filter(|i| i.role_changes || i.team_changes)
    }
}

/// Judges every item of `command` on its own (NOT_FOUND, INVALID_STATE,
/// OWNER_PROTECTED, PERMISSION_DENIED: a role beyond the caller's, or its own
/// role), then across the batch: if the remaining items together would leave
/// no active manager, every item that removes one fails. Returns the partial
/// failures and the effects of what passes.
pub fn decide_batch(
    command: &BatchUpdate,
    mut facts: BatchFacts<'_>,
    grantor: &Grantor<'_>,
    actor: &Actor,
    now: DateTime<Utc>,
) -> BatchDecision {
    let mut errors: HashMap<Uuid, ApiError> = HashMap::new();
    let mut items: Vec<(BatchItem, ManagerChange)> = Vec::new();
    for id in &command.user_ids {
        let Some(target) = facts.found.remove(id) else {
            errors.insert(*id, ApiError::not_found("user"));
            continue;
        };
        if target.status == UserStatus::Invited {
            errors.insert(
                *id,
                ApiError::rejected(
                    Reason::InvalidState,
                    "the user is invited: change the invitation instead",
                ),
            );
            continue;
        }
        let role_changes = facts.new_role.is_some_and(|r| r.id != target.role_id);
        let team_changes = command.set_team && target.team_id != command.team_id;
        let actor_is_target = grantor.user_id == Some(target.id);
        let owner_check = if role_changes {
            check_owner(target.owner, actor_is_target, OwnerAction::ChangeRole)
        } else if team_changes {
            check_owner(target.owner, actor_is_target, OwnerAction::Edit)
        } else {
            Ok(())
        };
        let grant_check = match &facts.new_role {
            Some(role) if role_changes => grants::check_grant(
                grantor,
                &Grant::Role {
                    user: Some((target.id, target.role_id)),
                    role_id: role.id,
                    permissions: role.granted,
                },
            ),
            _ => Ok(()),
        };
        if let Err(err) = owner_check.and(grant_check) {
            errors.insert(*id, err);
            continue;
        }
        let before = facts
            .role_manages
            .get(&target.role_id)
            .copied()
            .unwrap_or(false);
        let after = facts.new_role.map_or(before, |r| r.manages);
        let change = ManagerChange::of(target.owner, target.status, before, after);
        items.push((
            BatchItem {
                target,
                role_changes,
                team_changes,
            },
            change,
        ));
    }
    // Across the batch.
    let changes: Vec<ManagerChange> = items.iter().map(|(_, c)| *c).collect();
    if let Err(err) = check_managers_remain(facts.managers_now, &changes) {
        let reason = err.reason();
        items.retain(|(item, change)| {
            let removes = change.removes_manager();
            if removes {
                errors.insert(
                    item.target.id,
                    ApiError::rejected(
                        reason,
                        "the account must keep at least one active user who can manage users",
                    ),
                );
            }
            !removes
        });
    }
    let items: Vec<BatchItem> = items.into_iter().map(|(item, _)| item).collect();

    let mut effects = Effects::new();
    let actor_pb = actor.to_proto();
    for item in items.iter().filter(|i| i.role_changes || i.team_changes) {
        let target = &item.target;
        let mut paths = Vec::new();
        let mut details = serde_json::Map::new();
        if item.role_changes {
            paths.push("role_id".to_owned());
            details.insert(
                "role_id".into(),
                json!({"old": target.role_id.to_string(), "new": command.role_id.map(|r| r.to_string())}),
            );
        }
        if item.team_changes {
            paths.push("team_id".to_owned());
            details.insert(
                "team_id".into(),
                json!({"old": target.team_id.map(|t| t.to_string()), "new": command.team_id.map(|t| t.to_string())}),
            );
        }
        effects.audit(Audit {
            account_id: target.account_id,
            action: "user.updated",
            target_type: "user",
            target_id: target.id.to_string(),
            target_name: target.display_name.clone(),
            details: Some(json!({ "changes": Json::Object(details), "batch": true })),
        });
        let payload = events::UserUpdated {
            user_id: target.id.to_string(),
            account_id: target.account_id.to_string(),
            actor: Some(actor_pb.clone()),
            role_id: if item.role_changes {
                command.role_id.map(|r| r.to_string()).unwrap_or_default()
            } else {
                String::new()
            },
            team_id: if item.team_changes {
                command.team_id.map(|t| t.to_string()).unwrap_or_default()
            } else {
                String::new()
            },
            changed_fields: Some(FieldMask { paths }),
            ..Default::default()
        };
        effects.event(
            "user.updated",
            "UserUpdated",
            target.id.to_string(),
            Some(target.account_id),
            &payload,
            now,
        );
    }
    BatchDecision {
        errors,
        items,
        effects,
    }
}

/// The message of a per-item error (never internals).
pub fn item_message(err: &ApiError) -> String {
    match err {
        ApiError::Rejected { message, .. } => message.clone(),
        other => other.reason().as_str().to_lowercase().replace('_', " "),
    }
}

// ---------------------------------------------------------------------------
// Deactivate, reactivate, delete

/// Refuses deactivating the owner or a user who is not active.
pub fn check_deactivate(target: &user::Model, actor_is_target: bool) -> ApiResult<()> {
    check_owner(target.owner, actor_is_target, OwnerAction::Deactivate)?;
    if target.status != UserStatus::Active {
        return Err(ApiError::rejected(
            Reason::InvalidState,
            "the user is not active",
        ));
    }
    Ok(())
}

/// The row of `target` deactivated at `now`, with its audit entry and event.
pub fn deactivated(
    target: &user::Model,
    actor: &Actor,
    now: DateTime<Utc>,
) -> (user::Model, Effects) {
    let mut row = target.clone();
    row.status = UserStatus::Inactive;
    row.deactivate_time = Some(now);
    row.update_time = now;
    let effects = plain_change(
        target,
        ("user.deactivated", "UserDeactivated"),
        &events::UserDeactivated {
            user_id: target.id.to_string(),
            account_id: target.account_id.to_string(),
            actor: Some(actor.to_proto()),
        },
        now,
    );
    (row, effects)
}

/// Refuses reactivating a user who is not inactive.
pub fn check_reactivate(target: &user::Model) -> ApiResult<()> {
    if target.status != UserStatus::Inactive {
        return Err(ApiError::rejected(
            Reason::InvalidState,
            "the user is not inactive",
        ));
    }
    Ok(())
}

/// The row of `target` reactivated at `now`, with its audit entry and event
/// (the caller checked a seat is free).
pub fn reactivated(
    target: &user::Model,
    actor: &Actor,
    now: DateTime<Utc>,
) -> (user::Model, Effects) {
    let mut row = target.clone();
    row.status = UserStatus::Active;
    row.deactivate_time = None;
    row.update_time = now;
    let effects = plain_change(
        target,
        ("user.reactivated", "UserReactivated"),
        &events::UserReactivated {
            user_id: target.id.to_string(),
            account_id: target.account_id.to_string(),
            actor: Some(actor.to_proto()),
        },
        now,
    );
    (row, effects)
}

/// Refuses deleting an invited user (its invitation is what goes) or the
/// owner.
pub fn check_delete(target: &user::Model, actor_is_target: bool) -> ApiResult<()> {
    if target.status == UserStatus::Invited {
        return Err(ApiError::rejected(
            Reason::InvalidState,
            "the user is invited: revoke or delete the invitation instead",
        ));
    }
    check_owner(target.owner, actor_is_target, OwnerAction::Delete)
}

/// The audit entry and event of deleting `target`.
pub fn deleted(target: &user::Model, actor: &Actor, now: DateTime<Utc>) -> Effects {
    let mut effects = Effects::new();
    effects.audit(Audit {
        account_id: target.account_id,
        action: "user.deleted",
        target_type: "user",
        target_id: target.id.to_string(),
        target_name: target.display_name.clone(),
        details: Some(json!({
            "email": target.email_canonical,
            "username": target.username,
            "previous_status": target.status.as_str(),
        })),
    });
    effects.event(
        "user.deleted",
        "UserDeleted",
        target.id.to_string(),
        Some(target.account_id),
        &events::UserDeleted {
            user_id: target.id.to_string(),
            account_id: target.account_id.to_string(),
            actor: Some(actor.to_proto()),
            previous_status: status_proto(target.status) as i32,
            email: target.email_canonical.clone().unwrap_or_default(),
            invitation_id: String::new(),
        },
        now,
    );
    effects
}

/// The audit entry without details and the event `routing_key`/`kind` of a
/// change to `target`.
fn plain_change<M: prost::Message>(
    target: &user::Model,
    (routing_key, kind): (&'static str, &str),
    payload: &M,
    now: DateTime<Utc>,
) -> Effects {
    let mut effects = Effects::new();
    effects.audit(Audit {
        account_id: target.account_id,
        action: routing_key,
        target_type: "user",
        target_id: target.id.to_string(),
        target_name: target.display_name.clone(),
        details: None,
    });
    effects.event(
        routing_key,
        kind,
        target.id.to_string(),
        Some(target.account_id),
        payload,
        now,
    );
    effects
}

/// The protobuf form of a status.
fn status_proto(status: UserStatus) -> pb::UserStatus {
    match status {
        UserStatus::Invited => pb::UserStatus::Invited,
        UserStatus::Active => pb::UserStatus::Active,
        UserStatus::Inactive => pb::UserStatus::Inactive,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("time")
    }

    fn user(status: UserStatus, owner: bool, role_id: Uuid) -> user::Model {
        user::Model {
            id: Uuid::new_v4(),
            account_id: Uuid::nil(),
            email: Some("ada@acme.example".into()),
            email_canonical: Some("ada@acme.example".into()),
            username: None,
            display_name: "Ada".into(),
            search_text: "ada ada@acme.example".into(),
            status,
            role_id,
            team_id: None,
            products: json!([]),
            locale: String::new(),
            metadata: None,
            owner,
            origin: if owner { Origin::Owner } else { Origin::Direct },
            password_hash: None,
            password_change_required: false,
            invitation_id: None,
            invited_by: None,
            create_time: now(),
            update_time: now(),
            activate_time: Some(now()),
            deactivate_time: None,
            last_sign_in_time: None,
        }
    }

    fn key_grantor(permissions: &[String]) -> Grantor<'_> {
        Grantor {
            user_id: None,
            role_id: None,
            permissions,
        }
    }

    #[test]
    fn search_patterns_escape_wildcards() {
        assert_eq!(
            crate::store::contains_pattern("a_b%c\\d"),
            "%a\\_b\\%c\\\\d%"
        );
        assert_eq!(
            validate_username("u", " Kiosk.01_a-b ").expect("ok"),
            "kiosk.01_a-b"
        );
        for bad in ["ab", "a b c", "é-name", &"a".repeat(65)] {
            assert!(validate_username("u", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_password_is_needed_by_managers_and_users_without_email() {
        assert!(check_password_needed(true, true, false).is_ok());
        assert!(check_password_needed(false, false, true).is_ok());
        for (manages, email) in [(true, true), (false, false)] {
            let err = check_password_needed(false, manages, email).expect_err("needed");
            assert_eq!(err.reason(), Reason::InvalidArgument);
        }
    }

    #[test]
    fn a_taken_username_or_email_names_what_is_taken() {
        let mut existing = user(UserStatus::Active, false, Uuid::nil());
        existing.username = Some("kiosk".into());
        assert!(
            already_used(&existing, "kiosk")
                .to_string()
                .contains("username")
        );
        assert!(
            already_used(&existing, "other")
                .to_string()
                .contains("email")
        );
    }

    #[test]
    fn an_update_writes_only_what_changes_and_says_so() {
        let target = user(UserStatus::Active, false, Uuid::new_v4());
        let actor = Actor::system();
        let same = UpdateUser {
            user_id: target.id,
            display_name: Some("Ada".into()),
            locale: Some(String::new()),
            ..UpdateUser::default()
        };
        assert!(updated(&target, &same, |_| unreachable!(), &actor, now()).is_none());
        let renamed = UpdateUser {
            display_name: Some("Ada L".into()),
            metadata: Some(Some(json!({"k": 1}))),
            ..same
        };
        let (row, effects) =
            updated(&target, &renamed, |n| n.to_lowercase(), &actor, now()).expect("changed");
        assert_eq!(row.display_name, "Ada L");
        assert_eq!(row.search_text, "ada l");
        assert_eq!(effects.actions(), ["user.updated"]);
        assert_eq!(effects.events.len(), 1);
        let details = effects.audit[0].details.clone().expect("details");
        assert_eq!(details["changes"]["display_name"]["old"], "Ada");
        assert_eq!(
            details["changes"]["metadata"]["new"],
            json!({"changed": true})
        );
    }

    #[test]
    fn invited_users_and_the_owner_are_not_edited_like_others() {
        let invited = user(UserStatus::Invited, false, Uuid::nil());
        assert_eq!(
            check_editable(&invited, false)
                .expect_err("invited")
                .reason(),
            Reason::InvalidState
        );
        let owner = user(UserStatus::Active, true, Uuid::nil());
        assert!(check_editable(&owner, true).is_ok());
        assert_eq!(
            check_editable(&owner, false).expect_err("owner").reason(),
            Reason::OwnerProtected
        );
        let all = vec!["users.manage".to_owned()];
        let err = check_role_change(&owner, &key_grantor(&all), Uuid::new_v4(), &[])
            .expect_err("owner role");
        assert_eq!(err.reason(), Reason::OwnerProtected);
    }

    #[test]
    fn a_batch_fails_item_by_item_and_keeps_a_manager_across_the_batch() {
        let admin_role = Uuid::new_v4();
        let user_role = Uuid::new_v4();
        let manager_a = user(UserStatus::Active, false, admin_role);
        let manager_b = user(UserStatus::Active, false, admin_role);
        let owner = user(UserStatus::Active, true, admin_role);
        let invited = user(UserStatus::Invited, false, user_role);
        let missing = Uuid::new_v4();
        let command = BatchUpdate {
            user_ids: vec![manager_a.id, manager_b.id, owner.id, invited.id, missing],
            role_id: Some(user_role),
            ..BatchUpdate::default()
        };
        let held = vec!["users.manage".to_owned(), "users.read".to_owned()];
        let granted = vec!["users.read".to_owned()];
        let facts = BatchFacts {
            found: [&manager_a, &manager_b, &owner, &invited]
                .into_iter()
                .map(|u| (u.id, u.clone()))
                .collect(),
            role_manages: HashMap::from([(admin_role, true), (user_role, false)]),
            managers_now: 2,
            new_role: Some(NewRole {
                id: user_role,
                manages: false,
                granted: &granted,
            }),
        };
        let decision = decide_batch(
            &command,
            facts,
            &key_grantor(&held),
            &Actor::system(),
            now(),
        );
        let reason = |id: Uuid| decision.errors.get(&id).map(ApiError::reason);
        assert_eq!(reason(missing), Some(Reason::NotFound));
        assert_eq!(reason(invited.id), Some(Reason::InvalidState));
        assert_eq!(reason(owner.id), Some(Reason::OwnerProtected));
        // Demoting both managers would leave none: both fail.
        assert_eq!(reason(manager_a.id), Some(Reason::LastManager));
        assert_eq!(reason(manager_b.id), Some(Reason::LastManager));
        assert!(decision.items.is_empty() && decision.effects.is_empty());
        let internal = ApiError::Internal(anyhow::anyhow!("secret table name"));
        assert!(!item_message(&internal).contains("secret"), "no internals");
    }

    #[test]
    fn a_batch_audits_each_changed_user_once() {
        let team = Uuid::new_v4();
        let a = user(UserStatus::Active, false, Uuid::nil());
        let mut b = user(UserStatus::Inactive, false, Uuid::nil());
        b.team_id = Some(team);
        let command = BatchUpdate {
            user_ids: vec![a.id, b.id],
            set_team: true,
            team_id: Some(team),
            ..BatchUpdate::default()
        };
        let facts = BatchFacts {
            found: HashMap::from([(a.id, a.clone()), (b.id, b.clone())]),
            role_manages: HashMap::new(),
            managers_now: 1,
            new_role: None,
        };
        let decision = decide_batch(&command, facts, &key_grantor(&[]), &Actor::system(), now());
        assert!(decision.errors.is_empty());
        assert_eq!(decision.items.len(), 2);
        let changed: Vec<Uuid> = decision.changed().map(|i| i.target.id).collect();
        assert_eq!(changed, [a.id], "b is already in the team");
        assert_eq!(decision.effects.actions(), ["user.updated"]);
        let details = decision.effects.audit[0].details.clone().expect("details");
        assert_eq!(details["batch"], true);
    }

    #[test]
    fn deactivation_reactivation_and_deletion_follow_the_status() {
        let active = user(UserStatus::Active, false, Uuid::nil());
        let actor = Actor::system();
        assert!(check_deactivate(&active, false).is_ok());
        let (inactive, effects) = deactivated(&active, &actor, now());
        assert_eq!(inactive.status, UserStatus::Inactive);
        assert_eq!(inactive.deactivate_time, Some(now()));
        assert_eq!(effects.actions(), ["user.deactivated"]);
        assert_eq!(
            check_deactivate(&inactive, false)
                .expect_err("again")
                .reason(),
            Reason::InvalidState
        );
        assert!(check_reactivate(&active).is_err());
        let (back, effects) = reactivated(&inactive, &actor, now());
        assert_eq!(
            (back.status, back.deactivate_time),
            (UserStatus::Active, None)
        );
        assert_eq!(effects.actions(), ["user.reactivated"]);

        let owner = user(UserStatus::Active, true, Uuid::nil());
        assert_eq!(
            check_deactivate(&owner, true).expect_err("owner").reason(),
            Reason::OwnerProtected
        );
        assert_eq!(
            check_delete(&owner, true).expect_err("owner").reason(),
            Reason::OwnerProtected
        );
        let invited = user(UserStatus::Invited, false, Uuid::nil());
        assert_eq!(
            check_delete(&invited, false).expect_err("invited").reason(),
            Reason::InvalidState
        );
        let effects = deleted(&inactive, &actor, now());
        let details = effects.audit[0].details.clone().expect("details");
        assert_eq!(details["previous_status"], "inactive");
        assert_eq!(effects.events.len(), 1);
    }
}
