//! Users: the one constructor of each kind of user row (owner, direct,
//! invited), the row lock, the listing and search queries, and the counts
//! the rules need (managers). Every query is scoped to one account (P14).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, DbBackend, DbErr, EntityTrait,
    FromQueryResult, JoinType, Order, PaginatorTrait, QueryFilter, QueryOrder, QueryResult,
    QuerySelect, QueryTrait, RelationDef, Select, Statement,
    sea_query::{Expr, ExprTrait, Func, LikeExpr},
};
use serde_json::Value as Json;
use usher_kit::{
    convert::{json_strings, strings},
    db::{StoreError, StoreResult},
    error::ApiResult,
};
use uuid::Uuid;

use super::{
    contains_pattern,
    entities::{role, team, user},
};
use crate::domain::{
    Origin, UserStatus, managers,
    users::{ListFilter, MAX_BATCH, SortKey, UserOrder},
};

/// The text the substring search runs on: display name, email and username,
/// lower-cased.
pub fn search_text(display_name: &str, email: Option<&str>, username: Option<&str>) -> String {
    [Some(display_name), email, username]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The display name of a user, for audit entries (empty when unknown).
pub async fn display_name<C: ConnectionTrait>(db: &C, user_id: Option<Uuid>) -> ApiResult<String> {
    let Some(user_id) = user_id else {
        return Ok(String::new());
    };
    Ok(user::Entity::find_by_id(user_id)
        .select_only()
        .column(user::Column::DisplayName)
        .into_tuple::<String>()
        .one(db)
        .await?
        .unwrap_or_default())
}

/// A user of the account, locked until the end of the transaction on
/// PostgreSQL (writers that do not take the account lock, such as sign-in,
/// wait for the change), or NOT_FOUND.
pub async fn lock_user<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    user_id: Uuid,
) -> StoreResult<user::Model> {
    let query = user::Entity::find_by_id(user_id).filter(user::Column::AccountId.eq(account_id));
    super::for_update(query, db.get_database_backend())
        .one(db)
        .await?
        .ok_or(StoreError::NotFound("user"))
}

/// The users `ids` of the account that exist, locked like [`lock_user`].
pub async fn lock_users<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    ids: &[Uuid],
) -> StoreResult<HashMap<Uuid, user::Model>> {
    let query = user::Entity::find()
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::Id.is_in(ids.iter().copied()));
    Ok(super::for_update(query, db.get_database_backend())
        .all(db)
        .await?
        .into_iter()
        .map(|row| (row.id, row))
        .collect())
}

// ---------------------------------------------------------------------------
// The kinds of user rows

/// Who a new user is; each kind of row fills the rest the same way.
#[derive(Clone, Debug)]
pub struct NewUser {
    /// The account.
    pub account_id: Uuid,
    /// The canonical email, if any.
    pub email: Option<String>,
    /// The sign-in name, if any.
    pub username: Option<String>,
    /// The display name.
    pub display_name: String,
    /// The role.
    pub role_id: Uuid,
    /// The team, if any.
    pub team_id: Option<Uuid>,
    /// The products, as stored.
    pub products: Vec<String>,
    /// The locale (empty: the account's).
    pub locale: String,
    /// The platform's metadata.
    pub metadata: Option<Json>,
}

/// A row of `new` with every field that differs between kinds at its base
/// value: ACTIVE since `now`, created directly, no password, not the owner.
fn base_row(id: Uuid, new: NewUser, now: DateTime<Utc>) -> user::Model {
    user::Model {
        id,
        account_id: new.account_id,
        search_text: search_text(
            &new.display_name,
            new.email.as_deref(),
            new.username.as_deref(),
        ),
        email_canonical: new.email.clone(),
        email: new.email,
        username: new.username,
        display_name: new.display_name,
        status: UserStatus::Active,
        role_id: new.role_id,
        team_id: new.team_id,
        products: json_strings(new.products),
        locale: new.locale,
        metadata: new.metadata,
        owner: false,
        origin: Origin::Direct,
        password_hash: None,
        password_change_required: false,
        invitation_id: None,
        invited_by: None,
        create_time: now,
        update_time: now,
        activate_time: Some(now),
        deactivate_time: None,
        last_sign_in_time: None,
    }
}

/// The owner of a new account: ACTIVE, with the password it signed up with.
pub fn new_owner_row(
    id: Uuid,
    new: NewUser,
    password_hash: String,
    now: DateTime<Utc>,
) -> user::Model {
    user::Model {
        owner: true,
        origin: Origin::Owner,
        password_hash: Some(password_hash),
        ..base_row(id, new, now)
    }
}

/// A user created directly (CreateUser, shared devices): ACTIVE, with a
/// password or waiting for the set-password link.
pub fn new_direct_row(
    id: Uuid,
    new: NewUser,
    password_hash: Option<String>,
    password_change_required: bool,
    now: DateTime<Utc>,
) -> user::Model {
    user::Model {
        password_hash,
        password_change_required,
        ..base_row(id, new, now)
    }
}

/// An invitee reserved by the invitation service: INVITED by `invited_by`
/// under `invitation_id`, not active yet.
pub fn new_invited_row(
    id: Uuid,
    new: NewUser,
    invitation_id: Uuid,
    invited_by: String,
    now: DateTime<Utc>,
) -> user::Model {
    user::Model {
        status: UserStatus::Invited,
        origin: Origin::Invitation,
        invitation_id: Some(invitation_id),
        invited_by: Some(invited_by),
        activate_time: None,
        ..base_row(id, new, now)
    }
}

/// Inserts `row`; a username or email another user holds is
/// [`StoreError::Taken`].
pub async fn insert<C: ConnectionTrait>(db: &C, row: user::Model) -> StoreResult<user::Model> {
    Ok(user::ActiveModel::from(row).reset_all().insert(db).await?)
}

/// Writes every column of `row` (a user the caller locked and changed).
pub async fn save<C: ConnectionTrait>(db: &C, row: user::Model) -> StoreResult<user::Model> {
    Ok(user::ActiveModel::from(row).reset_all().update(db).await?)
}

/// Deletes the user `user_id` of the account.
pub async fn delete<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    user_id: Uuid,
) -> StoreResult<()> {
    user::Entity::delete_many()
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::Id.eq(user_id))
        .exec(db)
        .await?;
    Ok(())
}

/// Sets the role (when `role_id` is given) and the team (when `team_id` is
/// given, `Some(None)` for none) of the users `ids` of the account at `now`,
/// in one statement.
pub async fn set_role_and_team<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    ids: &[Uuid],
    role_id: Option<Uuid>,
    team_id: Option<Option<Uuid>>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let mut update = user::Entity::update_many()
        .col_expr(user::Column::UpdateTime, Expr::val(now))
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::Id.is_in(ids.iter().copied()));
    if let Some(role_id) = role_id {
        update = update.col_expr(user::Column::RoleId, Expr::val(role_id));
    }
    if let Some(team_id) = team_id {
        update = update.col_expr(user::Column::TeamId, Expr::val(team_id));
    }
    update.exec(db).await?;
    Ok(())
}

/// A user of the account holding `username` or the canonical `email`.
pub async fn holding_name_or_email<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    username: &str,
    email: Option<&str>,
) -> StoreResult<Option<user::Model>> {
    Ok(user::Entity::find()
        .filter(user::Column::AccountId.eq(account_id))
        .filter(
            Condition::any()
                .add(user::Column::Username.eq(username))
                .add(user::Column::EmailCanonical.is_in(email.map(str::to_owned))),
        )
        .one(db)
        .await?)
}

// ---------------------------------------------------------------------------
// Roles and managers

/// The account's roles, by id.
pub async fn roles_of<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
) -> StoreResult<HashMap<Uuid, role::Model>> {
    Ok(role::Entity::find()
        .filter(role::Column::AccountId.eq(account_id))
        .all(db)
        .await?
        .into_iter()
        .map(|r| (r.id, r))
        .collect())
}

/// Whether each role of `roles` holds `users.manage`.
pub fn role_manages(roles: &HashMap<Uuid, role::Model>) -> HashMap<Uuid, bool> {
    roles
        .iter()
        .map(|(id, r)| (*id, managers::manages(&strings(&r.permissions))))
        .collect()
}

/// Active users of the account whose role (among `roles`) holds
/// `users.manage`.
pub async fn count_managers<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    roles: &HashMap<Uuid, role::Model>,
) -> StoreResult<u64> {
    let manager_roles: Vec<Uuid> = role_manages(roles)
        .into_iter()
        .filter_map(|(id, manages)| manages.then_some(id))
        .collect();
    count_active_in_roles(db, account_id, manager_roles).await
}

/// Active users of the account holding one of `role_ids`.
pub async fn count_active_in_roles<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    role_ids: Vec<Uuid>,
) -> StoreResult<u64> {
    if role_ids.is_empty() {
        return Ok(0);
    }
    Ok(user::Entity::find()
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::Status.eq(UserStatus::Active.as_str()))
        .filter(user::Column::RoleId.is_in(role_ids))
        .count(db)
        .await?)
}

// ---------------------------------------------------------------------------
// Listing

/// A user row with the names of its role and team.
#[derive(Clone, Debug)]
pub struct UserRow {
    /// The user.
    pub user: user::Model,
    /// The name of its role.
    pub role_name: String,
    /// The name of its team, if any.
    pub team_name: Option<String>,
}

impl FromQueryResult for UserRow {
    fn from_query_result(res: &QueryResult, pre: &str) -> Result<Self, DbErr> {
        Ok(Self {
            user: user::Model::from_query_result(res, pre)?,
            role_name: res.try_get(pre, "role_name")?,
            team_name: res.try_get(pre, "team_name")?,
        })
    }
}

/// A user's role, to join.
pub fn role_join() -> RelationDef {
    user::Entity::belongs_to(role::Entity)
        .from(user::Column::RoleId)
        .to(role::Column::Id)
        .into()
}

/// Users joined with the names of their role and team (one query).
fn joined() -> Select<user::Entity> {
    let team_join: RelationDef = user::Entity::belongs_to(team::Entity)
        .from(user::Column::TeamId)
        .to(team::Column::Id)
        .into();
    user::Entity::find()
        .join(JoinType::InnerJoin, role_join())
        .join(JoinType::LeftJoin, team_join)
        .expr_as(Expr::col((role::Entity, role::Column::Name)), "role_name")
        .expr_as(Expr::col((team::Entity, team::Column::Name)), "team_name")
}

/// The users `ids` of the account with their role and team names, by id
/// (in chunks of [`MAX_BATCH`]).
pub async fn rows<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    ids: &[Uuid],
) -> StoreResult<HashMap<Uuid, UserRow>> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(MAX_BATCH) {
        let rows = joined()
            .filter(user::Column::AccountId.eq(account_id))
            .filter(user::Column::Id.is_in(chunk.iter().copied()))
            .into_model::<UserRow>()
            .all(db)
            .await?;
        out.extend(rows.into_iter().map(|row| (row.user.id, row)));
    }
    Ok(out)
}

/// One user of the account with its role and team names, or NOT_FOUND.
pub async fn row<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    user_id: Uuid,
) -> StoreResult<UserRow> {
    rows(db, account_id, &[user_id])
        .await?
        .remove(&user_id)
        .ok_or(StoreError::NotFound("user"))
}

/// The condition of `filter` but its search term.
fn attributes(filter: &ListFilter) -> Condition {
    let mut condition = Condition::all().add(user::Column::AccountId.eq(filter.account_id));
    if let Some(status) = filter.status {
        condition = condition.add(user::Column::Status.eq(status.as_str()));
    }
    if let Some(role_id) = filter.role_id {
        condition = condition.add(user::Column::RoleId.eq(role_id));
    }
    if let Some(team_id) = filter.team_id {
        condition = condition.add(user::Column::TeamId.eq(team_id));
    }
    condition
}

/// The condition of `filter`.
fn condition(filter: &ListFilter) -> Condition {
    let mut condition = attributes(filter);
    if !filter.term.is_empty() {
        // `search_text` and the term are both lower-cased by
        // [`search_text`] and the decoder, so a case-sensitive LIKE finds
        // what ILIKE would: served by the trigram index the same way, and
        // about three times cheaper on each row a walk of the order's index
        // checks (ILIKE lower-cases every row it reads). `\` escapes `%`,
        // `_` and itself in the pattern. SQLite's LIKE ignores ASCII case.
        let column = Expr::col((user::Entity, user::Column::SearchText));
        let pattern = contains_pattern(&filter.term);
        condition = condition.add(column.like(LikeExpr::new(pattern).escape('\\')));
    }
    condition
}

/// How many users match `filter`, counted up to `cap + 1` (a larger
/// answer than `cap` means "more than `cap`"): the count of listings
/// whose page token predates the count in the token.
pub async fn count_up_to<C: ConnectionTrait>(
    db: &C,
    filter: &ListFilter,
    cap: u64,
) -> StoreResult<u64> {
    let matches = user::Entity::find()
        .select_only()
        .expr(Expr::val(1))
        .filter(condition(filter))
        .limit(cap.saturating_add(1))
        .into_query();
    let count = sea_orm::sea_query::Query::select()
        .expr_as(Expr::cust("COUNT(*)"), "n")
        .from_subquery(matches, "matches")
        .to_owned();
    let row = db
        .query_one(&count)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("count".into()))?;
    let n: i64 = row.try_get("", "n")?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The owner, when it matches `filter`.
///
/// The owner is read by the account's owner index and the search term
/// checked here, on its one row: in SQL the term would let PostgreSQL's
/// generic plan of this prepared statement read the trigram index's matches
/// of the whole account to find one row (29 ms for `son 001` at 1,000,000
/// users). `search_text` and the term are both lower-cased, so `contains`
/// is the `LIKE '%term%'` of [`condition`].
pub async fn matching_owner<C: ConnectionTrait>(
    db: &C,
    filter: &ListFilter,
) -> StoreResult<Option<UserRow>> {
    let owner = joined()
        .filter(attributes(filter))
        .filter(user::Column::Owner.eq(true))
        .into_model::<UserRow>()
        .one(db)
        .await?;
    Ok(owner.filter(|row| row.user.search_text.contains(filter.term.as_str())))
}

/// The text sort expression of `order` (case-insensitive name, or email
/// falling back to the username); `None` for time order.
fn text_expr(order: UserOrder) -> Option<Expr> {
    match order {
        UserOrder::DisplayName => {
            Some(Func::lower(Expr::col((user::Entity, user::Column::DisplayName))).into())
        }
        UserOrder::Email => Some(
            Func::coalesce([
                Expr::col((user::Entity, user::Column::EmailCanonical)),
                Expr::col((user::Entity, user::Column::Username)),
                Expr::val(""),
            ])
            .into(),
        ),
        UserOrder::Newest => None,
    }
}

/// Where a listed user sits in its order: its id and sort key.
#[derive(Clone, Debug)]
pub struct PageKey {
    /// The user.
    pub id: Uuid,
    /// Its creation time (the key of the newest-first order).
    pub create_time: DateTime<Utc>,
    /// The text it sorts by in a listing by name or email.
    pub sort_key: Option<String>,
}

impl FromQueryResult for PageKey {
    fn from_query_result(res: &QueryResult, pre: &str) -> Result<Self, DbErr> {
        Ok(Self {
            id: res.try_get(pre, "id")?,
            create_time: res.try_get(pre, "create_time")?,
            sort_key: res
                .try_get::<Option<String>>(pre, "sort_key")
                .ok()
                .flatten(),
        })
    }
}

impl PageKey {
    /// The cursor after this user in `order`.
    pub fn key(&self, order: UserOrder) -> (SortKey, Uuid) {
        let key = match order {
            UserOrder::Newest => SortKey::Time(self.create_time),
            UserOrder::DisplayName | UserOrder::Email => {
                SortKey::Text(self.sort_key.clone().unwrap_or_default())
            }
        };
        (key, self.id)
    }
}

/// A page of the non-owner users matching `filter` in `order` after the
/// cursor `after`: up to `limit` users with their keys and the names of
/// their role and team, in one query; `None` for a cursor of the other kind
/// of order.
///
/// With `count_cap`, the matches are also counted up to `cap + 1` in the
/// same walk (a first page): the walk of the order's index reads the keys
/// of up to `cap + 1` matches and PostgreSQL joins only the first `limit`
/// of them to their rows, each answered with the count of the walk
/// (`COUNT(*) OVER ()`), instead of sending every key read for the count.
/// One plan decides the walk: the order's index walked with the filters
/// (the search term checked on each row), or the trigram index's matches
/// sorted.
pub async fn page<C: ConnectionTrait>(
    db: &C,
    filter: &ListFilter,
    order: UserOrder,
    after: Option<&(SortKey, Uuid)>,
    limit: u64,
    count_cap: Option<u64>,
) -> StoreResult<Option<ListedPage>> {
    let Some(select) = ordered_keys(filter, order, after) else {
        return Ok(None);
    };
    let text = text_expr(order).is_some();
    let keys = match count_cap {
        None => select.limit(limit).into_query(),
        Some(cap) => {
            let walked = select
                .limit(Ord::max(limit, cap.saturating_add(1)))
                .into_query();
            let mut counted = sea_orm::sea_query::Query::select();
            counted
                .column(("walked", "id"))
                .column(("walked", "create_time"))
                .expr_as(Expr::cust("COUNT(*) OVER ()"), "matched")
                .from_subquery(walked, "walked");
            if text {
                counted.column(("walked", "sort_key"));
            }
            order_keys(&mut counted, "walked", text);
            counted.limit(limit);
            counted
        }
    };
    let mut query = joined().into_query();
    query.join_subquery(
        JoinType::InnerJoin,
        keys,
        "page",
        Expr::col((user::Entity, user::Column::Id)).equals(("page", "id")),
    );
    if text {
        query.expr_as(Expr::col(("page", "sort_key")), "sort_key");
    }
    if count_cap.is_some() {
        query.expr_as(Expr::col(("page", "matched")), "matched");
    }
    order_keys(&mut query, "page", text);
    let found = db.query_all(&query).await?;
    let mut listed = ListedPage {
        users: Vec::with_capacity(found.len()),
        matched: 0,
    };
    for row in &found {
        if count_cap.is_some() {
            let matched: i64 = row.try_get("", "matched")?;
            listed.matched = u64::try_from(matched).unwrap_or(0);
        }
        listed.users.push((
            PageKey::from_query_result(row, "")?,
            UserRow::from_query_result(row, "")?,
        ));
    }
    Ok(Some(listed))
}

/// The walk of a first page's keys as [`page`] nests it: the matches of
/// `filter` in `order`, up to `limit` (the cap and one more, for a counted
/// page). For `EXPLAIN`: which index answers it, and whether from the index
/// alone.
pub fn first_walk(
    backend: DbBackend,
    filter: &ListFilter,
    order: UserOrder,
    limit: u64,
) -> Option<Statement> {
    ordered_keys(filter, order, None).map(|select| select.limit(limit).build(backend))
}

/// A page of listed users, from [`page`].
#[derive(Debug)]
pub struct ListedPage {
    /// The users in order, each with its key.
    pub users: Vec<(PageKey, UserRow)>,
    /// The matches counted up to the cap (0 when not counted).
    pub matched: u64,
}

/// Orders `select` by the key columns of the table `from`: the sort key
/// (`text`) or the creation time, then the id.
fn order_keys(select: &mut sea_orm::sea_query::SelectStatement, from: &'static str, text: bool) {
    if text {
        select
            .order_by((from, "sort_key"), Order::Asc)
            .order_by((from, "id"), Order::Asc);
    } else {
        select
            .order_by((from, "create_time"), Order::Desc)
            .order_by((from, "id"), Order::Desc);
    }
}

/// The non-owner users matching `filter`, ids and sort keys, in `order`
/// after the cursor `after`; `None` for a cursor of the other kind of order.
fn ordered_keys(
    filter: &ListFilter,
    order: UserOrder,
    after: Option<&(SortKey, Uuid)>,
) -> Option<Select<user::Entity>> {
    let mut select = user::Entity::find()
        .select_only()
        .column(user::Column::Id)
        .column(user::Column::CreateTime)
        .filter(condition(filter))
        .filter(user::Column::Owner.eq(false));
    let id = Expr::col((user::Entity, user::Column::Id));
    Some(match text_expr(order) {
        Some(key) => {
            if let Some((sort, last)) = after {
                let SortKey::Text(text) = sort else {
                    return None;
                };
                select = select.filter(
                    Expr::tuple([key.clone(), id.clone()])
                        .gt(Expr::tuple([Expr::val(text.clone()), Expr::val(*last)])),
                );
            }
            select
                .expr_as(key.clone(), "sort_key")
                .order_by(key, Order::Asc)
                .order_by(id, Order::Asc)
        }
        None => {
            let time = Expr::col((user::Entity, user::Column::CreateTime));
            if let Some((sort, last)) = after {
                let SortKey::Time(at) = sort else {
                    return None;
                };
                select = select.filter(
                    Expr::tuple([time.clone(), id.clone()])
                        .lt(Expr::tuple([Expr::val(*at), Expr::val(*last)])),
                );
            }
            select.order_by(time, Order::Desc).order_by(id, Order::Desc)
        }
    })
}
