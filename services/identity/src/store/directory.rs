//! The storage of DirectoryService (the invitation service's view of
//! identity): the invitees of a reservation loaded in one query and written
//! in one multi-row statement, the targets of a release loaded and deleted
//! in one statement each, and the one conditional update of an activation.
//! Every query is scoped to one account (P14).

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, DbBackend, EntityTrait, QueryFilter,
    QuerySelect, sea_query::Expr,
};
use serde_json::Value as Json;
use usher_kit::db::{StoreError, StoreResult};
use uuid::Uuid;

use super::entities::{account, api_key, role, team, user};
use crate::domain::{
    UserStatus,
    reservations::{ActivatedUser, Activation, Member, NewInvitee},
};

/// What the rules of a reservation or release need of a stored user.
pub fn member(model: &user::Model) -> Member {
    Member {
        id: model.id,
        account_id: model.account_id,
        email: model.email_canonical.clone(),
        display_name: model.display_name.clone(),
        status: model.status,
        invitation_id: model.invitation_id,
    }
}

/// An activated user as its audit entry and event tell it.
pub fn activated_user(model: &user::Model) -> ActivatedUser {
    ActivatedUser {
        id: model.id,
        account_id: model.account_id,
        email: model.email_canonical.clone(),
        display_name: model.display_name.clone(),
        role_id: model.role_id,
        team_id: model.team_id,
        products: usher_kit::convert::strings(&model.products),
    }
}

/// The account, share-locked until the end of the transaction: changes of
/// its subscription (which strip disabled products from every user under
/// `accounts::lock`) wait, and so does this reader, but two activations do
/// not wait for each other.
pub async fn share_account<C: ConnectionTrait>(db: &C, id: Uuid) -> StoreResult<account::Model> {
    let query = account::Entity::find_by_id(id);
    let query = if db.get_database_backend() == DbBackend::Postgres {
        query.lock_shared()
    } else {
        query
    };
    query.one(db).await?.ok_or(StoreError::NotFound("account"))
}

/// The API key `id` of `account_id` (an inviter), or NOT_FOUND `inviter`.
pub async fn inviter_key<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    id: Uuid,
) -> StoreResult<api_key::Model> {
    api_key::Entity::find_by_id(id)
        .filter(api_key::Column::AccountId.eq(account_id))
        .one(db)
        .await?
        .ok_or(StoreError::NotFound("inviter"))
}

/// What the reservations of one batch name, read for all its accounts at
/// once (by id; each caller checks the account of what it finds).
#[derive(Debug, Default)]
pub struct Named {
    /// The roles named, and the roles of the users named.
    pub roles: std::collections::HashMap<Uuid, role::Model>,
    /// The teams named.
    pub teams: std::collections::HashMap<Uuid, team::Model>,
    /// The users named (inviters).
    pub users: std::collections::HashMap<Uuid, user::Model>,
    /// The API keys named (inviters).
    pub keys: std::collections::HashMap<Uuid, api_key::Model>,
    /// The registered products among `product_codes`, read when a role
    /// found is the built-in Admin (whose permissions they extend).
    pub products: Vec<super::entities::product::Model>,
}

/// Reads what a batch names in at most six queries, whatever the number of
/// its accounts: the roles, teams, users and keys by id, the roles of those
/// users not named already, and (for the built-in Admin) the products among
/// `product_codes`.
pub async fn read_named<C: ConnectionTrait>(
    db: &C,
    role_ids: Vec<Uuid>,
    team_ids: Vec<Uuid>,
    user_ids: Vec<Uuid>,
    key_ids: Vec<Uuid>,
    product_codes: Vec<String>,
) -> StoreResult<Named> {
    let mut named = Named {
        roles: by_ids::<role::Entity, _>(db, role::Column::Id, role_ids, |m| m.id).await?,
        teams: by_ids::<team::Entity, _>(db, team::Column::Id, team_ids, |m| m.id).await?,
        users: by_ids::<user::Entity, _>(db, user::Column::Id, user_ids, |m| m.id).await?,
        keys: by_ids::<api_key::Entity, _>(db, api_key::Column::Id, key_ids, |m| m.id).await?,
        products: Vec::new(),
    };
    let missing: Vec<Uuid> = named
        .users
        .values()
        .map(|u| u.role_id)
        .filter(|id| !named.roles.contains_key(id))
        .collect::<std::collections::HashSet<Uuid>>()
        .into_iter()
        .collect();
    let roles = by_ids::<role::Entity, _>(db, role::Column::Id, missing, |m| m.id).await?;
    named.roles.extend(roles);
    if !product_codes.is_empty() && named.roles.values().any(super::accounts::is_admin_role) {
        named.products = super::entities::product::Entity::find()
            .filter(super::entities::product::Column::Code.is_in(product_codes))
            .all(db)
            .await?;
    }
    Ok(named)
}

/// The rows of `E` whose `column` is one of `ids`, by `key`; no query for
/// no ids.
async fn by_ids<E, C>(
    db: &C,
    column: E::Column,
    ids: Vec<Uuid>,
    key: fn(&E::Model) -> Uuid,
) -> StoreResult<std::collections::HashMap<Uuid, E::Model>>
where
    E: EntityTrait,
    C: ConnectionTrait,
{
    if ids.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let rows = E::find().filter(column.is_in(ids)).all(db).await?;
    Ok(rows.into_iter().map(|m| (key(&m), m)).collect())
}

/// In one query, the users of each account holding one of its `emails`
/// (canonical) and the users anywhere holding one of `invitation_ids` (the
/// ids are unique across accounts).
pub async fn existing_invitees<C: ConnectionTrait>(
    db: &C,
    emails: Vec<(Uuid, Vec<String>)>,
    invitation_ids: Vec<Uuid>,
) -> StoreResult<Vec<Member>> {
    let mut any = Condition::any();
    for (account_id, emails) in emails {
        if !emails.is_empty() {
            any = any.add(
                Condition::all()
                    .add(user::Column::AccountId.eq(account_id))
                    .add(user::Column::EmailCanonical.is_in(emails)),
            );
        }
    }
    if !invitation_ids.is_empty() {
        any = any.add(user::Column::InvitationId.is_in(invitation_ids));
    }
    if any.is_empty() {
        return Ok(Vec::new());
    }
    let found = user::Entity::find().filter(any).all(db).await?;
    Ok(found.iter().map(member).collect())
}

/// What every invited user of one reservation gets.
#[derive(Clone, Debug)]
pub struct InvitedRows<'a> {
    /// The account.
    pub account_id: Uuid,
    /// The role.
    pub role_id: Uuid,
    /// The team.
    pub team_id: Option<Uuid>,
    /// The products granted.
    pub products: &'a [String],
    /// The locale (empty: the account's).
    pub locale: &'a str,
    /// Platform metadata.
    pub metadata: Option<&'a Json>,
    /// `kind:id` of the inviter.
    pub invited_by: &'a str,
}

/// The rows of the invited users `new` of one reservation.
pub fn invited_rows(
    rows: &InvitedRows<'_>,
    new: &[NewInvitee],
    now: DateTime<Utc>,
) -> Vec<user::ActiveModel> {
    new.iter()
        .map(|invitee| {
            let row = super::users::new_invited_row(
                invitee.id,
                super::users::NewUser {
                    account_id: rows.account_id,
                    email: Some(invitee.email.clone()),
                    username: None,
                    display_name: invitee.display_name.clone(),
                    role_id: rows.role_id,
                    team_id: rows.team_id,
                    products: rows.products.to_vec(),
                    locale: rows.locale.to_owned(),
                    metadata: rows.metadata.cloned(),
                },
                invitee.invitation_id,
                rows.invited_by.to_owned(),
                now,
            );
            user::ActiveModel::from(row).reset_all()
        })
        .collect()
}

/// Writes the invited users `new` of one reservation.
pub async fn insert_invited<C: ConnectionTrait>(
    db: &C,
    rows: &InvitedRows<'_>,
    new: &[NewInvitee],
    now: DateTime<Utc>,
) -> StoreResult<()> {
    insert_users(db, invited_rows(rows, new, now)).await
}

/// Users per INSERT statement (about twenty bind parameters each). sqlx
/// keeps every statement text it prepared on its connection, with a type
/// per parameter, and each row count is a text of its own: at 1,000 rows a
/// batch's users insert kept about half a MiB on each connection that ran
/// it. At 250, a batch of 1,000 is four statements of one text, and
/// identity's peak under bulk invitations fell by about 9 MiB
/// (bench/README.md) for about 1 ms more per 1,000 invitees.
const USERS_PER_INSERT: usize = 250;

/// Writes the invited users `rows` (of one reservation or of a whole batch)
/// in multi-row inserts of at most [`USERS_PER_INSERT`].
pub async fn insert_users<C: ConnectionTrait>(
    db: &C,
    mut rows: Vec<user::ActiveModel>,
) -> StoreResult<()> {
    while !rows.is_empty() {
        let chunk: Vec<_> = rows.drain(..rows.len().min(USERS_PER_INSERT)).collect();
        user::Entity::insert_many(chunk)
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

/// In one query, the users of `account_id` with one of `ids` or `emails`.
pub async fn release_targets<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    ids: Vec<Uuid>,
    emails: Vec<String>,
) -> StoreResult<Vec<Member>> {
    let found = user::Entity::find()
        .filter(user::Column::AccountId.eq(account_id))
        .filter(
            Condition::any()
                .add(user::Column::Id.is_in(ids))
                .add(user::Column::EmailCanonical.is_in(emails)),
        )
        .all(db)
        .await?;
    Ok(found.iter().map(member).collect())
}

/// Deletes the users `ids` of `account_id` that are still INVITED, in one
/// statement.
pub async fn delete_invited<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    ids: &[Uuid],
) -> StoreResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    user::Entity::delete_many()
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::Status.eq(UserStatus::Invited.as_str()))
        .filter(user::Column::Id.is_in(ids.iter().copied()))
        .exec(db)
        .await?;
    Ok(())
}

/// The one conditional update that makes activation single-use: moves the
/// user `user_id` from INVITED by `invitation_id` to ACTIVE with `change`
/// and answers the activated row; `None` when it is not (any more) in that
/// state (of two concurrent activations, the second finds the user ACTIVE).
#[allow(clippy::too_many_arguments)]
pub async fn activate<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    user_id: Uuid,
    invitation_id: Uuid,
    change: &Activation,
    search_text: String,
    password_hash: String,
    now: DateTime<Utc>,
) -> StoreResult<Option<user::Model>> {
    let mut update = user::Entity::update_many()
        .col_expr(
            user::Column::Status,
            Expr::value(UserStatus::Active.as_str()),
        )
        .col_expr(
            user::Column::DisplayName,
            Expr::value(change.display_name.clone()),
        )
        .col_expr(user::Column::SearchText, Expr::value(search_text))
        .col_expr(user::Column::PasswordHash, Expr::value(Some(password_hash)))
        .col_expr(user::Column::ActivateTime, Expr::value(Some(now)))
        .col_expr(user::Column::UpdateTime, Expr::value(now));
    if let Some(locale) = &change.locale {
        update = update.col_expr(user::Column::Locale, Expr::value(locale.clone()));
    }
    if let Some(metadata) = &change.metadata {
        update = update.col_expr(user::Column::Metadata, Expr::value(Some(metadata.clone())));
    }
    if let Some(products) = &change.products {
        update = update.col_expr(
            user::Column::Products,
            Expr::value(usher_kit::convert::json_strings(products.clone())),
        );
    }
    let mut activated = update
        .filter(user::Column::Id.eq(user_id))
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::Status.eq(UserStatus::Invited.as_str()))
        .filter(user::Column::InvitationId.eq(invitation_id))
        .exec_with_returning(db)
        .await?;
    Ok(activated.pop())
}

/// Records that the user `user_id` of `account_id`, ACTIVE since joining by
/// `invitation_id`, signed in at `now`, and answers the row; `None` (and
/// nothing recorded) when the user is not in that state.
pub async fn touch_joined<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    user_id: Uuid,
    invitation_id: Uuid,
    now: DateTime<Utc>,
) -> StoreResult<Option<user::Model>> {
    let mut touched = user::Entity::update_many()
        .col_expr(user::Column::LastSignInTime, Expr::value(Some(now)))
        .filter(user::Column::Id.eq(user_id))
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::Status.eq(UserStatus::Active.as_str()))
        .filter(user::Column::InvitationId.eq(invitation_id))
        .exec_with_returning(db)
        .await?;
    Ok(touched.pop())
}

/// The names of the role and team of a user, for its view (`None` when
/// gone).
pub async fn role_and_team_names<C: ConnectionTrait>(
    db: &C,
    role_id: Uuid,
    team_id: Option<Uuid>,
) -> StoreResult<(Option<String>, Option<String>)> {
    let role_name: Option<String> = role::Entity::find_by_id(role_id)
        .select_only()
        .column(role::Column::Name)
        .into_tuple()
        .one(db)
        .await?;
    let team_name: Option<String> = match team_id {
        Some(team_id) => {
            team::Entity::find_by_id(team_id)
                .select_only()
                .column(team::Column::Name)
                .into_tuple()
                .one(db)
                .await?
        }
        None => None,
    };
    Ok((role_name, team_name))
}
