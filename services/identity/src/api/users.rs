//! UserService: list, search, read, create (shared devices), edit, bulk role
//! or team change, deactivate, reactivate and delete the users of the
//! caller's account.
//!
//! Every query is scoped to the caller's account (P14): a user id of another
//! account answers the same NOT_FOUND as an unknown one. Every change runs in
//! one transaction that first locks the account row (`accounts::lock`), so
//! the seat limit and the at-least-one-manager rule hold under concurrency
//! (two admins demoting each other: one of them is refused), and writes its
//! audit entry and domain event in that transaction. After the commit the
//! user's principal snapshot is rewritten, so a role change or a
//! deactivation applies on the user's next call.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use prost_types::FieldMask;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, DatabaseTransaction, DbBackend,
    DbErr, EntityTrait, FromQueryResult, IntoActiveModel, JoinType, Order, PaginatorTrait,
    QueryFilter, QueryOrder, QueryResult, QuerySelect, RelationDef, Select, Set, TransactionTrait,
    sea_query::{Expr, ExprTrait, Func, LikeExpr, extension::postgres::PgExpr},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use tonic::{Request, Response, Status};
use usher_kit::{
    email::EmailAddress,
    error::{ApiError, ApiResult, Reason, Violations},
    events::DomainEvent,
    outbox, pagination,
};
use usher_proto::{events::v1 as events, identity::v1 as pb};
use uuid::Uuid;

use super::{
    Call, IdentityApi, call, convert, mask_paths,
    roles::check_grant,
    status,
    validate::{require_enabled, validate_metadata, validate_products},
};
use crate::{
    domain::{
        Origin, USERS_MANAGE, UserStatus,
        grants::{self, Grant, Grantor},
        parse_id, parse_optional_id,
        rules::{ManagerChange, OwnerAction, check_managers_remain, check_owner},
        validate_locale, validate_name,
    },
    store::{
        accounts,
        audit::{self, Actor, AuditEntry},
        entities::{account, role, team, user},
        events::emit,
        idempotency::IdempotencyKey,
        principals, scoped,
    },
};

/// Longest display name.
const MAX_DISPLAY_NAME: usize = 200;
/// Shortest search term (trigrams need three characters).
const MIN_QUERY_CHARS: usize = 3;
/// Longest search term.
const MAX_QUERY_CHARS: usize = 200;
/// Most users in one BatchUpdateUsers call.
const MAX_BATCH: usize = 1_000;
/// The mask paths of UpdateUser.
const UPDATE_PATHS: &[&str] = &[
    "display_name",
    "role_id",
    "team_id",
    "products",
    "locale",
    "metadata",
];
/// The mask paths of BatchUpdateUsers.
const BATCH_PATHS: &[&str] = &["role_id", "team_id"];

// ---------------------------------------------------------------------------
// Validation

/// A sign-in name: 3..=64 of `[a-z0-9._-]`, upper case lower-cased.
fn validate_username(field: &str, value: &str) -> ApiResult<String> {
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

/// Refuses an email outside the account's allowed domains (when it has any).
fn require_allowed_domain(account: &account::Model, email: &EmailAddress) -> ApiResult<()> {
    let allowed = convert::strings(&account.allowed_email_domains);
    if allowed.is_empty() || allowed.iter().any(|d| email.domain_matches(d)) {
        Ok(())
    } else {
        Err(ApiError::rejected(
            Reason::DomainNotAllowed,
            "the email's domain is not allowed in this account",
        ))
    }
}

/// Whether a database error is a unique-index violation.
fn is_unique_violation(err: &DbErr) -> bool {
    let text = err.to_string();
    str::contains(&text, "unique") || str::contains(&text, "UNIQUE")
}

// ---------------------------------------------------------------------------
// Store access (always scoped to one account)

/// Users joined with the names of their role and team (one query).
fn joined() -> Select<user::Entity> {
    let role_join: RelationDef = user::Entity::belongs_to(role::Entity)
        .from(user::Column::RoleId)
        .to(role::Column::Id)
        .into();
    let team_join: RelationDef = user::Entity::belongs_to(team::Entity)
        .from(user::Column::TeamId)
        .to(team::Column::Id)
        .into();
    user::Entity::find()
        .join(JoinType::InnerJoin, role_join)
        .join(JoinType::LeftJoin, team_join)
        .expr_as(Expr::col((role::Entity, role::Column::Name)), "role_name")
        .expr_as(Expr::col((team::Entity, team::Column::Name)), "team_name")
}

/// A user row with the names of its role and team, and its sort key.
#[derive(Clone, Debug)]
struct Listed {
    user: user::Model,
    role_name: String,
    team_name: Option<String>,
    sort_key: Option<String>,
}

impl FromQueryResult for Listed {
    fn from_query_result(res: &QueryResult, pre: &str) -> Result<Self, DbErr> {
        Ok(Self {
            user: user::Model::from_query_result(res, pre)?,
            role_name: res.try_get(pre, "role_name")?,
            team_name: res.try_get(pre, "team_name")?,
            sort_key: res
                .try_get::<Option<String>>(pre, "sort_key")
                .ok()
                .flatten(),
        })
    }
}

impl Listed {
    fn view(&self) -> pb::User {
        convert::user(&self.user, &self.role_name, self.team_name.as_deref())
    }
}

/// The users `ids` of the account as the API shows them, keyed by id.
async fn views<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    ids: &[Uuid],
) -> ApiResult<HashMap<Uuid, pb::User>> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(MAX_BATCH) {
        let rows = joined()
            .filter(user::Column::AccountId.eq(account_id))
            .filter(user::Column::Id.is_in(chunk.iter().copied()))
            .into_model::<Listed>()
            .all(db)
            .await?;
        out.extend(rows.iter().map(|row| (row.user.id, row.view())));
    }
    Ok(out)
}

/// One user of the account as the API shows it, or NOT_FOUND.
async fn view<C: ConnectionTrait>(db: &C, account_id: Uuid, user_id: Uuid) -> ApiResult<pb::User> {
    views(db, account_id, &[user_id])
        .await?
        .remove(&user_id)
        .ok_or_else(|| ApiError::not_found("user"))
}

/// A user of the account, locked until the end of the transaction on
/// PostgreSQL (writers that do not take the account lock, such as sign-in,
/// wait for the change), or NOT_FOUND.
async fn lock_user(
    txn: &DatabaseTransaction,
    account_id: Uuid,
    user_id: Uuid,
) -> ApiResult<user::Model> {
    let query = user::Entity::find_by_id(user_id).filter(user::Column::AccountId.eq(account_id));
    let query = if txn.get_database_backend() == DbBackend::Postgres {
        query.lock_exclusive()
    } else {
        query
    };
    query
        .one(txn)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))
}

/// The optional team of the account.
async fn find_optional_team<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    team_id: Option<Uuid>,
) -> ApiResult<Option<team::Model>> {
    match team_id {
        Some(team_id) => scoped::team(db, account_id, team_id).await.map(Some),
        None => Ok(None),
    }
}

/// Whether a role holds `users.manage`.
fn manages(role: &role::Model) -> bool {
    convert::strings(&role.permissions)
        .iter()
        .any(|p| p == USERS_MANAGE)
}

/// The account's roles, by id.
async fn roles_of<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
) -> ApiResult<HashMap<Uuid, role::Model>> {
    Ok(role::Entity::find()
        .filter(role::Column::AccountId.eq(account_id))
        .all(db)
        .await?
        .into_iter()
        .map(|r| (r.id, r))
        .collect())
}

/// Active users of the account whose role holds `users.manage`.
async fn count_managers<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    roles: &HashMap<Uuid, role::Model>,
) -> ApiResult<u64> {
    let manager_roles: Vec<Uuid> = roles
        .values()
        .filter(|r| manages(r))
        .map(|r| r.id)
        .collect();
    if manager_roles.is_empty() {
        return Ok(0);
    }
    Ok(user::Entity::find()
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::Status.eq(UserStatus::Active.as_str()))
        .filter(user::Column::RoleId.is_in(manager_roles))
        .count(db)
        .await?)
}

/// Refuses removing the last active manager: `user` (ACTIVE or not) goes from
/// its current role to `manager_after`.
async fn check_manager_left(
    txn: &DatabaseTransaction,
    account_id: Uuid,
    target: &user::Model,
    manager_after: bool,
) -> ApiResult<()> {
    let roles = roles_of(txn, account_id).await?;
    let active = target.status == UserStatus::Active;
    let change = ManagerChange {
        owner: target.owner,
        manager_before: active && roles.get(&target.role_id).is_some_and(manages),
        manager_after: active && manager_after,
    };
    if !change.manager_before || change.manager_after {
        return Ok(());
    }
    check_managers_remain(count_managers(txn, account_id, &roles).await?, &[change])
}

/// The caller as an audit actor (the user's display name when a user calls).
async fn actor<C: ConnectionTrait>(db: &C, call: &Call) -> ApiResult<Actor> {
    let name = crate::store::users::display_name(db, call.principal.user_id).await?;
    Ok(Actor::from_principal(&call.principal, name))
}

fn proto_status(status: UserStatus) -> i32 {
    convert::user_status(status) as i32
}

// ---------------------------------------------------------------------------
// Listing

/// Where a ListUsers page starts, inside the page token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum SortKey {
    Text(String),
    Time(DateTime<Utc>),
}

/// The page token: `after` is the last non-owner user of the previous page
/// (`None`: from the first non-owner user). Any token means the owner was
/// already shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Cursor {
    after: Option<(SortKey, Uuid)>,
    /// The matching users counted for the first page, carried so later
    /// pages do not count them again (a full count at every page is what
    /// makes deep pages of a large account slow). Absent in older tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    total: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListOrder {
    DisplayName,
    Email,
    Newest,
}

impl ListOrder {
    fn parse(value: i32) -> ApiResult<Self> {
        match pb::UserOrderBy::try_from(value) {
            Ok(pb::UserOrderBy::Unspecified | pb::UserOrderBy::DisplayName) => {
                Ok(Self::DisplayName)
            }
            Ok(pb::UserOrderBy::Email) => Ok(Self::Email),
            Ok(pb::UserOrderBy::CreateTimeDesc) => Ok(Self::Newest),
            Err(_) => Err(ApiError::invalid("order_by", "is not a known order")),
        }
    }

    /// The text sort expression (case-insensitive name, or email falling back
    /// to the username); `None` for time order.
    fn text_expr(self) -> Option<Expr> {
        match self {
            Self::DisplayName => {
                Some(Func::lower(Expr::col((user::Entity, user::Column::DisplayName))).into())
            }
            Self::Email => Some(
                Func::coalesce([
                    Expr::col((user::Entity, user::Column::EmailCanonical)),
                    Expr::col((user::Entity, user::Column::Username)),
                    Expr::val(""),
                ])
                .into(),
            ),
            Self::Newest => None,
        }
    }

    /// Orders `select` and, after a cursor, keeps the rows behind it.
    fn apply(
        self,
        mut select: Select<user::Entity>,
        after: Option<&(SortKey, Uuid)>,
    ) -> ApiResult<Select<user::Entity>> {
        let id = Expr::col((user::Entity, user::Column::Id));
        match self.text_expr() {
            Some(key) => {
                if let Some((sort, last)) = after {
                    let SortKey::Text(text) = sort else {
                        return Err(invalid_token());
                    };
                    select = select.filter(
                        Expr::tuple([key.clone(), id.clone()])
                            .gt(Expr::tuple([Expr::val(text.clone()), Expr::val(*last)])),
                    );
                }
                Ok(select
                    .expr_as(key.clone(), "sort_key")
                    .order_by(key, Order::Asc)
                    .order_by(id, Order::Asc))
            }
            None => {
                let time = Expr::col((user::Entity, user::Column::CreateTime));
                if let Some((sort, last)) = after {
                    let SortKey::Time(at) = sort else {
                        return Err(invalid_token());
                    };
                    select = select.filter(
                        Expr::tuple([time.clone(), id.clone()])
                            .lt(Expr::tuple([Expr::val(*at), Expr::val(*last)])),
                    );
                }
                Ok(select.order_by(time, Order::Desc).order_by(id, Order::Desc))
            }
        }
    }

    /// The cursor of the last row of a page.
    fn key_of(self, row: &Listed) -> (SortKey, Uuid) {
        let key = match self {
            Self::Newest => SortKey::Time(row.user.create_time),
            Self::DisplayName | Self::Email => {
                SortKey::Text(row.sort_key.clone().unwrap_or_default())
            }
        };
        (key, row.user.id)
    }
}

fn invalid_token() -> ApiError {
    ApiError::invalid("page_token", "is not a token of this query")
}

// ---------------------------------------------------------------------------
// The handlers' bodies

/// One item of BatchUpdateUsers once checked.
struct BatchItem {
    target: user::Model,
    change: ManagerChange,
    role_changes: bool,
    team_changes: bool,
}

impl IdentityApi {
    async fn list_users(
        &self,
        call: Call,
        request: pb::ListUsersRequest,
    ) -> ApiResult<pb::ListUsersResponse> {
        let account_id = call.principal.account()?;
        let mut violations = Violations::new();
        let size = pagination::page_size(request.page_size)
            .map_err(|e| violations.absorb(e))
            .ok();
        let status = match pb::UserStatus::try_from(request.status) {
            Ok(pb::UserStatus::Unspecified) => None,
            Ok(pb::UserStatus::Invited) => Some(UserStatus::Invited),
            Ok(pb::UserStatus::Active) => Some(UserStatus::Active),
            Ok(pb::UserStatus::Inactive) => Some(UserStatus::Inactive),
            Err(_) => {
                violations.add("status", "is not a known status");
                None
            }
        };
        let role_id = parse_optional_id("role_id", &request.role_id)
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        let team_id = parse_optional_id("team_id", &request.team_id)
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        let term = request.query.trim();
        if !term.is_empty() && !(MIN_QUERY_CHARS..=MAX_QUERY_CHARS).contains(&term.chars().count())
        {
            violations.add(
                "query",
                format!("must be {MIN_QUERY_CHARS} to {MAX_QUERY_CHARS} characters"),
            );
        }
        let order = ListOrder::parse(request.order_by)
            .map_err(|e| violations.absorb(e))
            .ok();
        violations.into_result()?;
        let term = term.to_lowercase();
        let (Some(size), Some(order)) = (size, order) else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "validated fields missing"
            )));
        };

        let fingerprint = pagination::fingerprint(&(
            account_id,
            status.map(UserStatus::as_str),
            role_id,
            team_id,
            &term,
            request.order_by,
        ));
        let cursor: Option<Cursor> = pagination::decode_token(&fingerprint, &request.page_token)?;

        let db = &self.state.db;
        let mut filter = Condition::all().add(user::Column::AccountId.eq(account_id));
        if let Some(status) = status {
            filter = filter.add(user::Column::Status.eq(status.as_str()));
        }
        if let Some(role_id) = role_id {
            filter = filter.add(user::Column::RoleId.eq(role_id));
        }
        if let Some(team_id) = team_id {
            filter = filter.add(user::Column::TeamId.eq(team_id));
        }
        if !term.is_empty() {
            // `search_text` is stored lower-cased. PostgreSQL: ILIKE, served
            // by the trigram index, with `\` as its default escape (sea-query
            // cannot render ILIKE … ESCAPE). SQLite: LIKE (case-insensitive
            // for ASCII), whose escape must be named.
            let column = Expr::col((user::Entity, user::Column::SearchText));
            let pattern = crate::store::contains_pattern(&term);
            filter = filter.add(if db.get_database_backend() == DbBackend::Postgres {
                column.ilike(LikeExpr::new(pattern))
            } else {
                column.like(LikeExpr::new(pattern).escape('\\'))
            });
        }
        let total = match cursor.as_ref().and_then(|c| c.total) {
            Some(total) => total,
            None => {
                user::Entity::find()
                    .filter(filter.clone())
                    .count(db)
                    .await?
            }
        };

        // The owner heads the first page when it matches the filters; the
        // keyset then walks the other users.
        let mut page: Vec<pb::User> = Vec::new();
        if cursor.is_none()
            && let Some(owner) = joined()
                .filter(filter.clone())
                .filter(user::Column::Owner.eq(true))
                .into_model::<Listed>()
                .one(db)
                .await?
        {
            page.push(owner.view());
        }
        let wanted = size.saturating_sub(page.len() as u64);
        let after = cursor.and_then(|c| c.after);
        let rows = order
            .apply(
                joined()
                    .filter(filter)
                    .filter(user::Column::Owner.eq(false)),
                after.as_ref(),
            )?
            .limit(wanted + 1)
            .into_model::<Listed>()
            .all(db)
            .await?;
        let more = rows.len() as u64 > wanted;
        let rows: Vec<Listed> = rows
            .into_iter()
            .take(usize::try_from(wanted).unwrap_or(usize::MAX))
            .collect();
        let next_page_token = if more {
            pagination::encode_token(
                &fingerprint,
                &Cursor {
                    after: rows.last().map(|row| order.key_of(row)),
                    total: Some(total),
                },
            )
        } else {
            String::new()
        };
        page.extend(rows.iter().map(Listed::view));
        Ok(pb::ListUsersResponse {
            users: page,
            next_page_token,
            total_size: i32::try_from(total).unwrap_or(i32::MAX),
        })
    }

    async fn get_user(
        &self,
        call: Call,
        request: pb::GetUserRequest,
    ) -> ApiResult<pb::GetUserResponse> {
        let account_id = call.principal.account()?;
        let user_id = parse_id("user_id", &request.user_id)?;
        Ok(pb::GetUserResponse {
            user: Some(view(&self.state.db, account_id, user_id).await?),
        })
    }

    async fn create_user(
        &self,
        call: Call,
        mut request: pb::CreateUserRequest,
    ) -> ApiResult<pb::CreateUserResponse> {
        let account_id = call.principal.account()?;
        let request_id = std::mem::take(&mut request.request_id);
        let idempotency = IdempotencyKey::new(
            &call.principal,
            "usher.identity.v1.UserService/CreateUser",
            &request_id,
            &request,
        )?;
        if let Some(key) = &idempotency
            && let Some(done) = key.replay(&self.state.db).await?
        {
            return Ok(done);
        }

        let mut violations = Violations::new();
        let username = validate_username("username", &request.username)
            .map_err(|e| violations.absorb(e))
            .ok();
        let email = if request.email.trim().is_empty() {
            None
        } else {
            EmailAddress::parse(&request.email)
                .map_err(|e| violations.add("email", e.to_string()))
                .ok()
        };
        let display_name = validate_name("display_name", &request.display_name, MAX_DISPLAY_NAME)
            .map_err(|e| violations.absorb(e))
            .ok();
        let locale = validate_locale("locale", &request.locale)
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        let role_id = parse_id("role_id", &request.role_id)
            .map_err(|e| violations.absorb(e))
            .ok();
        let team_id = parse_optional_id("team_id", &request.team_id)
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        let products = validate_products("products", &request.products)
            .map_err(|e| violations.absorb(e))
            .ok();
        let metadata = validate_metadata("metadata", request.metadata.as_ref())
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        let password = if request.password.is_empty() {
            None
        } else {
            self.state
                .password_policy
                .check(&request.password, "password")
                .map_err(|e| violations.absorb(e))
                .ok()
        };
        violations.into_result()?;
        let (Some(username), Some(display_name), Some(role_id), Some(products)) =
            (username, display_name, role_id, products)
        else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "validated fields missing"
            )));
        };

        // Read outside the account lock so that hashing (tens of ms) never
        // holds it; a role edited meanwhile changes nothing here (adding a user
        // can only add managers).
        let role = scoped::role(&self.state.db, account_id, role_id).await?;
        // No escalation (P26): the new user's role carries nothing the
        // caller lacks.
        let granted = accounts::effective_permissions(&self.state.db, &role).await?;
        check_grant(
            &self.state.db,
            &call.principal,
            &Grant::Role {
                user: None,
                role_id,
                permissions: &granted,
            },
        )
        .await?;
        find_optional_team(&self.state.db, account_id, team_id).await?;
        let password_hash = match password {
            Some(password) => Some(self.state.passwords.hash(password).await?),
            None if manages(&role) => {
                return Err(ApiError::invalid(
                    "password",
                    "is required for a role that manages users",
                ));
            }
            None if email.is_none() => {
                return Err(ApiError::invalid(
                    "password",
                    "is required for a user without an email",
                ));
            }
            // The user has an email and cannot sign in until they choose a
            // password with the link emailed below (AuthService.SetPassword).
            None => None,
        };

        let now = self.state.clock.now();
        let txn = self.state.db.begin().await?;
        let account = accounts::lock(&txn, account_id).await?;
        // A concurrent retry with the same key waited for the lock: answer it
        // the stored response.
        if let Some(key) = &idempotency
            && let Some(done) = key.replay(&txn).await?
        {
            return Ok(done);
        }
        if account.seat_limit <= 1 {
            return Err(ApiError::rejected(
                Reason::SingleUserPlan,
                "the account's plan has a single seat",
            ));
        }
        if accounts::seats_used(&txn, account_id).await?
            >= u64::try_from(account.seat_limit).unwrap_or_default()
        {
            return Err(ApiError::rejected(
                Reason::SeatLimitReached,
                "every seat of the account is taken",
            ));
        }
        require_enabled(&account, &products)?;
        if let Some(email) = &email {
            require_allowed_domain(&account, email)?;
        }
        let taken = user::Entity::find()
            .filter(user::Column::AccountId.eq(account_id))
            .filter(
                Condition::any()
                    .add(user::Column::Username.eq(username.clone()))
                    .add(
                        user::Column::EmailCanonical
                            .is_in(email.iter().map(|e| e.canonical().to_owned())),
                    ),
            )
            .one(&txn)
            .await?;
        if let Some(taken) = taken {
            let what = if taken.username.as_deref() == Some(username.as_str()) {
                "username"
            } else {
                "email"
            };
            return Err(ApiError::rejected(
                Reason::AlreadyExists,
                format!("the {what} is already used in the account"),
            ));
        }

        let canonical = email.as_ref().map(|e| e.canonical().to_owned());
        let user_id = Uuid::new_v4();
        let inserted = user::ActiveModel {
            id: Set(user_id),
            account_id: Set(account_id),
            email: Set(canonical.clone()),
            email_canonical: Set(canonical.clone()),
            username: Set(Some(username.clone())),
            display_name: Set(display_name.clone()),
            search_text: Set(crate::store::users::search_text(
                &display_name,
                canonical.as_deref(),
                Some(&username),
            )),
            status: Set(UserStatus::Active),
            role_id: Set(role_id),
            team_id: Set(team_id),
            products: Set(convert::json_strings(products.clone())),
            locale: Set(locale.unwrap_or_default()),
            metadata: Set(metadata),
            owner: Set(false),
            origin: Set(Origin::Direct),
            password_hash: Set(password_hash.clone()),
            password_change_required: Set(request.require_password_change),
            invitation_id: Set(None),
            invited_by: Set(None),
            create_time: Set(now),
            update_time: Set(now),
            activate_time: Set(Some(now)),
            deactivate_time: Set(None),
            last_sign_in_time: Set(None),
        }
        .insert(&txn)
        .await;
        let inserted = match inserted {
            Ok(inserted) => inserted,
            Err(err) if is_unique_violation(&err) => {
                return Err(ApiError::rejected(
                    Reason::AlreadyExists,
                    "the username or email is already used in the account",
                ));
            }
            Err(err) => return Err(err.into()),
        };
        // No password: the "choose your password" email, in this
        // transaction (the outbox), so a committed user always gets it.
        let set_password_link = match (&password_hash, &canonical) {
            (None, Some(_)) => Some(
                self.queue_set_password_link(&txn, &account, &inserted, &call.request_id, now)
                    .await?,
            ),
            _ => None,
        };

        let actor = actor(&txn, &call).await?;
        audit::record(
            &txn,
            AuditEntry {
                account_id,
                actor: &actor,
                action: "user.created",
                target_type: "user",
                target_id: user_id.to_string(),
                target_name: display_name.clone(),
                details: Some(json!({
                    "username": username,
                    "email": canonical,
                    "role_id": role_id.to_string(),
                    "team_id": team_id.map(|t| t.to_string()),
                    "products": products,
                    "origin": Origin::Direct.as_str(),
                    "password_set": password_hash.is_some(),
                    "set_password_link_expire_time": set_password_link,
                    "require_password_change": request.require_password_change,
                })),
                request_id: &call.request_id,
            },
            now,
        )
        .await?;
        emit(
            &txn,
            "user.created",
            "UserCreated",
            user_id.to_string(),
            Some(account_id),
            &events::UserCreated {
                user_id: user_id.to_string(),
                account_id: account_id.to_string(),
                actor: Some(actor.to_proto()),
                email: canonical.unwrap_or_default(),
                username: username.clone(),
                display_name,
                status: pb::UserStatus::Active as i32,
                origin: pb::UserOrigin::Direct as i32,
                role_id: role_id.to_string(),
                team_id: team_id.map(|t| t.to_string()).unwrap_or_default(),
                products,
                invitation_id: String::new(),
            },
            now,
        )
        .await?;
        let response = pb::CreateUserResponse {
            user: Some(view(&txn, account_id, user_id).await?),
        };
        if let Some(key) = &idempotency {
            key.remember(&txn, &response, now).await?;
        }
        txn.commit().await?;
        principals::refresh_user(&self.state, user_id).await?;
        Ok(response)
    }

    async fn update_user(
        &self,
        call: Call,
        request: pb::UpdateUserRequest,
    ) -> ApiResult<pb::UpdateUserResponse> {
        let account_id = call.principal.account()?;
        let mut violations = Violations::new();
        let user_id = parse_id("user_id", &request.user_id)
            .map_err(|e| violations.absorb(e))
            .ok();
        let paths: BTreeSet<String> = mask_paths(request.update_mask.as_ref(), UPDATE_PATHS)
            .map_err(|e| violations.absorb(e))
            .unwrap_or_default()
            .into_iter()
            .collect();
        let masked = |path: &str| paths.contains(path);
        let display_name = if masked("display_name") {
            validate_name("display_name", &request.display_name, MAX_DISPLAY_NAME)
                .map_err(|e| violations.absorb(e))
                .ok()
        } else {
            None
        };
        let role_id = if masked("role_id") {
            parse_id("role_id", &request.role_id)
                .map_err(|e| violations.absorb(e))
                .ok()
        } else {
            None
        };
        let team_id = if masked("team_id") {
            parse_optional_id("team_id", &request.team_id)
                .map_err(|e| violations.absorb(e))
                .ok()
        } else {
            None
        };
        let products = if masked("products") {
            validate_products("products", &request.products)
                .map_err(|e| violations.absorb(e))
                .ok()
        } else {
            None
        };
        let locale = if masked("locale") {
            validate_locale("locale", &request.locale)
                .map_err(|e| violations.absorb(e))
                .ok()
                .map(Option::unwrap_or_default)
        } else {
            None
        };
        let metadata = if masked("metadata") {
            validate_metadata("metadata", request.metadata.as_ref())
                .map_err(|e| violations.absorb(e))
                .ok()
        } else {
            None
        };
        violations.into_result()?;
        let Some(user_id) = user_id else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "validated fields missing"
            )));
        };

        let now = self.state.clock.now();
        let txn = self.state.db.begin().await?;
        let account = accounts::lock(&txn, account_id).await?;
        let target = lock_user(&txn, account_id, user_id).await?;
        if target.status == UserStatus::Invited {
            return Err(ApiError::rejected(
                Reason::InvalidState,
                "the user is invited: change the invitation instead",
            ));
        }
        let actor_is_target = call.principal.user_id == Some(target.id);
        check_owner(target.owner, actor_is_target, OwnerAction::Edit)?;

        let mut active = target.clone().into_active_model();
        let mut changed: Vec<String> = Vec::new();
        let mut details = serde_json::Map::new();
        let mut note = |field: &str, old: Json, new: Json| {
            changed.push(field.to_owned());
            details.insert(field.to_owned(), json!({"old": old, "new": new}));
        };
        if let Some(name) = display_name.filter(|n| *n != target.display_name) {
            note("display_name", json!(target.display_name), json!(name));
            active.search_text = Set(crate::store::users::search_text(
                &name,
                target.email_canonical.as_deref(),
                target.username.as_deref(),
            ));
            active.display_name = Set(name);
        }
        if let Some(role_id) = role_id.filter(|r| *r != target.role_id) {
            let role = scoped::role(&txn, account_id, role_id).await?;
            check_owner(target.owner, actor_is_target, OwnerAction::ChangeRole)?;
            let granted = accounts::effective_permissions(&txn, &role).await?;
            check_grant(
                &txn,
                &call.principal,
                &Grant::Role {
                    user: Some((target.id, target.role_id)),
                    role_id,
                    permissions: &granted,
                },
            )
            .await?;
            check_manager_left(&txn, account_id, &target, manages(&role)).await?;
            note(
                "role_id",
                json!(target.role_id.to_string()),
                json!(role_id.to_string()),
            );
            active.role_id = Set(role_id);
        }
        if let Some(team_id) = team_id.filter(|t| *t != target.team_id) {
            find_optional_team(&txn, account_id, team_id).await?;
            note(
                "team_id",
                json!(target.team_id.map(|t| t.to_string())),
                json!(team_id.map(|t| t.to_string())),
            );
            active.team_id = Set(team_id);
        }
        if let Some(products) = products {
            require_enabled(&account, &products)?;
            let old = convert::strings(&target.products);
            if old.iter().collect::<BTreeSet<_>>() != products.iter().collect::<BTreeSet<_>>() {
                note("products", json!(old), json!(products));
                active.products = Set(convert::json_strings(products));
            }
        }
        if let Some(locale) = locale.filter(|l| *l != target.locale) {
            note("locale", json!(target.locale), json!(locale));
            active.locale = Set(locale);
        }
        if let Some(metadata) = metadata.filter(|m| *m != target.metadata) {
            // The content is the platform's: the log says that it changed.
            note(
                "metadata",
                json!({"changed": true}),
                json!({"changed": true}),
            );
            active.metadata = Set(metadata);
        }

        if !changed.is_empty() {
            active.update_time = Set(now);
            let updated = active.update(&txn).await?;
            let actor = actor(&txn, &call).await?;
            audit::record(
                &txn,
                AuditEntry {
                    account_id,
                    actor: &actor,
                    action: "user.updated",
                    target_type: "user",
                    target_id: user_id.to_string(),
                    target_name: updated.display_name.clone(),
                    details: Some(json!({ "changes": Json::Object(details) })),
                    request_id: &call.request_id,
                },
                now,
            )
            .await?;
            let has = |field: &str| changed.iter().any(|c| c == field);
            emit(
                &txn,
                "user.updated",
                "UserUpdated",
                user_id.to_string(),
                Some(account_id),
                &events::UserUpdated {
                    user_id: user_id.to_string(),
                    account_id: account_id.to_string(),
                    actor: Some(actor.to_proto()),
                    display_name: if has("display_name") {
                        updated.display_name.clone()
                    } else {
                        String::new()
                    },
                    role_id: if has("role_id") {
                        updated.role_id.to_string()
                    } else {
                        String::new()
                    },
                    team_id: if has("team_id") {
                        updated.team_id.map(|t| t.to_string()).unwrap_or_default()
                    } else {
                        String::new()
                    },
                    products: if has("products") {
                        convert::strings(&updated.products)
                    } else {
                        Vec::new()
                    },
                    locale: if has("locale") {
                        updated.locale.clone()
                    } else {
                        String::new()
                    },
                    changed_fields: Some(FieldMask {
                        paths: changed.clone(),
                    }),
                },
                now,
            )
            .await?;
        }
        let user = view(&txn, account_id, user_id).await?;
        txn.commit().await?;
        // Also after an update that changed nothing: a retry after a failed
        // refresh repairs the snapshot.
        principals::refresh_user(&self.state, user_id).await?;
        Ok(pb::UpdateUserResponse { user: Some(user) })
    }

    async fn batch_update_users(
        &self,
        call: Call,
        request: pb::BatchUpdateUsersRequest,
    ) -> ApiResult<pb::BatchUpdateUsersResponse> {
        let account_id = call.principal.account()?;
        let mut violations = Violations::new();
        if request.user_ids.is_empty() || request.user_ids.len() > MAX_BATCH {
            violations.add("user_ids", format!("must hold 1 to {MAX_BATCH} ids"));
        }
        let mut ids = Vec::with_capacity(request.user_ids.len());
        let mut seen = HashSet::with_capacity(request.user_ids.len());
        for (index, raw) in request.user_ids.iter().enumerate().take(MAX_BATCH) {
            let field = format!("user_ids[{index}]");
            match parse_id(&field, raw) {
                Ok(id) if !seen.insert(id) => violations.add(field, "is listed twice"),
                Ok(id) => ids.push(id),
                Err(e) => violations.absorb(e),
            }
        }
        let paths = mask_paths(request.update_mask.as_ref(), BATCH_PATHS)
            .map_err(|e| violations.absorb(e))
            .unwrap_or_default();
        let set_role = paths.iter().any(|p| p == "role_id");
        let set_team = paths.iter().any(|p| p == "team_id");
        let role_id = if set_role {
            parse_id("role_id", &request.role_id)
                .map_err(|e| violations.absorb(e))
                .ok()
        } else {
            None
        };
        let team_id = if set_team {
            parse_optional_id("team_id", &request.team_id)
                .map_err(|e| violations.absorb(e))
                .ok()
                .flatten()
        } else {
            None
        };
        violations.into_result()?;

        let now = self.state.clock.now();
        let txn = self.state.db.begin().await?;
        accounts::lock(&txn, account_id).await?;
        let roles = roles_of(&txn, account_id).await?;
        let new_role = match role_id {
            Some(role_id) => Some(
                roles
                    .get(&role_id)
                    .cloned()
                    .ok_or_else(|| ApiError::not_found("role"))?,
            ),
            None => None,
        };
        if set_team {
            find_optional_team(&txn, account_id, team_id).await?;
        }
        let granted = match &new_role {
            Some(role) => accounts::effective_permissions(&txn, role).await?,
            None => Vec::new(),
        };
        let grantor = Grantor {
            user_id: call.principal.user_id,
            role_id: None,
            permissions: &call.principal.permissions,
        };
        let mut found: HashMap<Uuid, user::Model> = HashMap::with_capacity(ids.len());
        let query = user::Entity::find()
            .filter(user::Column::AccountId.eq(account_id))
            .filter(user::Column::Id.is_in(ids.iter().copied()));
        let query = if txn.get_database_backend() == DbBackend::Postgres {
            query.lock_exclusive()
        } else {
            query
        };
        for row in query.all(&txn).await? {
            found.insert(row.id, row);
        }

        // Item by item: NOT_FOUND, INVALID_STATE, OWNER_PROTECTED,
        // PERMISSION_DENIED (a role beyond the caller's, or its own role).
        let mut errors: HashMap<Uuid, ApiError> = HashMap::new();
        let mut items: Vec<BatchItem> = Vec::new();
        for id in &ids {
            let Some(target) = found.remove(id) else {
                errors.insert(*id, ApiError::not_found("user"));
                continue;
            };
            let status = Some(target.status);
            if status == Some(UserStatus::Invited) {
                errors.insert(
                    *id,
                    ApiError::rejected(
                        Reason::InvalidState,
                        "the user is invited: change the invitation instead",
                    ),
                );
                continue;
            }
            let role_changes = new_role.as_ref().is_some_and(|r| r.id != target.role_id);
            let team_changes = set_team && target.team_id != team_id;
            let actor_is_target = call.principal.user_id == Some(target.id);
            let owner_check = if role_changes {
                check_owner(target.owner, actor_is_target, OwnerAction::ChangeRole)
            } else if team_changes {
                check_owner(target.owner, actor_is_target, OwnerAction::Edit)
            } else {
                Ok(())
            };
            let grant_check = match &new_role {
                Some(role) if role_changes => grants::check_grant(
                    &grantor,
                    &Grant::Role {
                        user: Some((target.id, target.role_id)),
                        role_id: role.id,
                        permissions: &granted,
                    },
                ),
                _ => Ok(()),
            };
            if let Err(err) = owner_check.and(grant_check) {
                errors.insert(*id, err);
                continue;
            }
            let active = status == Some(UserStatus::Active);
            let before = active && roles.get(&target.role_id).is_some_and(manages);
            let after = match &new_role {
                Some(role) => active && manages(role),
                None => before,
            };
            items.push(BatchItem {
                change: ManagerChange {
                    owner: target.owner,
                    manager_before: before,
                    manager_after: after,
                },
                target,
                role_changes,
                team_changes,
            });
        }
        // Across the batch: if the remaining items together would leave no
        // active manager, every item that removes one fails.
        let changes: Vec<ManagerChange> = items.iter().map(|i| i.change).collect();
        if let Err(err) =
            check_managers_remain(count_managers(&txn, account_id, &roles).await?, &changes)
        {
            let reason = err.reason();
            items.retain(|item| {
                let removes = item.change.manager_before && !item.change.manager_after;
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

        let changed: Vec<&BatchItem> = items
            .iter()
            .filter(|i| i.role_changes || i.team_changes)
            .collect();
        if !changed.is_empty() {
            let mut update = user::Entity::update_many()
                .col_expr(user::Column::UpdateTime, Expr::val(now))
                .filter(user::Column::AccountId.eq(account_id))
                .filter(user::Column::Id.is_in(changed.iter().map(|i| i.target.id)));
            if let Some(role_id) = role_id {
                update = update.col_expr(user::Column::RoleId, Expr::val(role_id));
            }
            if set_team {
                update = update.col_expr(user::Column::TeamId, Expr::val(team_id));
            }
            update.exec(&txn).await?;

            let actor = actor(&txn, &call).await?;
            let actor_pb = actor.to_proto();
            let mut messages = Vec::with_capacity(changed.len());
            for item in &changed {
                let target = &item.target;
                let mut paths = Vec::new();
                let mut details = serde_json::Map::new();
                if item.role_changes {
                    paths.push("role_id".to_owned());
                    details.insert(
                        "role_id".into(),
                        json!({"old": target.role_id.to_string(), "new": role_id.map(|r| r.to_string())}),
                    );
                }
                if item.team_changes {
                    paths.push("team_id".to_owned());
                    details.insert(
                        "team_id".into(),
                        json!({"old": target.team_id.map(|t| t.to_string()), "new": team_id.map(|t| t.to_string())}),
                    );
                }
                audit::record(
                    &txn,
                    AuditEntry {
                        account_id,
                        actor: &actor,
                        action: "user.updated",
                        target_type: "user",
                        target_id: target.id.to_string(),
                        target_name: target.display_name.clone(),
                        details: Some(json!({ "changes": Json::Object(details), "batch": true })),
                        request_id: &call.request_id,
                    },
                    now,
                )
                .await?;
                let payload = events::UserUpdated {
                    user_id: target.id.to_string(),
                    account_id: account_id.to_string(),
                    actor: Some(actor_pb.clone()),
                    role_id: if item.role_changes {
                        role_id.map(|r| r.to_string()).unwrap_or_default()
                    } else {
                        String::new()
                    },
                    team_id: if item.team_changes {
                        team_id.map(|t| t.to_string()).unwrap_or_default()
                    } else {
                        String::new()
                    },
                    changed_fields: Some(FieldMask { paths }),
                    ..Default::default()
                };
                messages.push(
                    DomainEvent {
                        routing_key: "user.updated",
                        service: "identity",
                        subject: target.id.to_string(),
                        account_id: Some(account_id),
                        time: now,
                    }
                    .into_message("UserUpdated", &payload),
                );
            }
            // One multi-row insert for the whole batch.
            outbox::enqueue(&txn, &messages).await?;
        }
        let ok_ids: Vec<Uuid> = items.iter().map(|i| i.target.id).collect();
        let mut shown = views(&txn, account_id, &ok_ids).await?;
        txn.commit().await?;

        let refresh: Vec<Uuid> = changed
            .iter()
            .filter(|i| i.role_changes)
            .map(|i| i.target.id)
            .collect();
        principals::refresh_users(&self.state, &refresh).await?;

        let mut results = Vec::with_capacity(request.user_ids.len());
        let (mut updated_count, mut failed_count) = (0, 0);
        for (raw, id) in request.user_ids.iter().zip(&ids) {
            let result = match errors.remove(id) {
                Some(err) => {
                    failed_count += 1;
                    pb::BatchUpdateUsersResult {
                        user_id: raw.clone(),
                        user: None,
                        error: Some(pb::ItemError {
                            reason: err.reason().as_str().to_owned(),
                            message: item_message(&err),
                        }),
                    }
                }
                None => {
                    updated_count += 1;
                    pb::BatchUpdateUsersResult {
                        user_id: raw.clone(),
                        user: shown.remove(id),
                        error: None,
                    }
                }
            };
            results.push(result);
        }
        Ok(pb::BatchUpdateUsersResponse {
            results,
            updated_count,
            failed_count,
        })
    }

    async fn deactivate_user(
        &self,
        call: Call,
        request: pb::DeactivateUserRequest,
    ) -> ApiResult<pb::DeactivateUserResponse> {
        let account_id = call.principal.account()?;
        let user_id = parse_id("user_id", &request.user_id)?;
        let now = self.state.clock.now();
        let txn = self.state.db.begin().await?;
        accounts::lock(&txn, account_id).await?;
        let target = lock_user(&txn, account_id, user_id).await?;
        check_owner(
            target.owner,
            call.principal.user_id == Some(target.id),
            OwnerAction::Deactivate,
        )?;
        if target.status != UserStatus::Active {
            return Err(ApiError::rejected(
                Reason::InvalidState,
                "the user is not active",
            ));
        }
        check_manager_left(&txn, account_id, &target, false).await?;
        let mut active = target.clone().into_active_model();
        active.status = Set(UserStatus::Inactive);
        active.deactivate_time = Set(Some(now));
        active.update_time = Set(now);
        active.update(&txn).await?;
        let actor = actor(&txn, &call).await?;
        audit::record(
            &txn,
            AuditEntry {
                account_id,
                actor: &actor,
                action: "user.deactivated",
                target_type: "user",
                target_id: user_id.to_string(),
                target_name: target.display_name.clone(),
                details: None,
                request_id: &call.request_id,
            },
            now,
        )
        .await?;
        emit(
            &txn,
            "user.deactivated",
            "UserDeactivated",
            user_id.to_string(),
            Some(account_id),
            &events::UserDeactivated {
                user_id: user_id.to_string(),
                account_id: account_id.to_string(),
                actor: Some(actor.to_proto()),
            },
            now,
        )
        .await?;
        let user = view(&txn, account_id, user_id).await?;
        self.sign_out_everywhere(user_id).await?;
        txn.commit().await?;
        self.sign_out_after_commit(user_id).await?;
        Ok(pb::DeactivateUserResponse { user: Some(user) })
    }

    async fn reactivate_user(
        &self,
        call: Call,
        request: pb::ReactivateUserRequest,
    ) -> ApiResult<pb::ReactivateUserResponse> {
        let account_id = call.principal.account()?;
        let user_id = parse_id("user_id", &request.user_id)?;
        let now = self.state.clock.now();
        let txn = self.state.db.begin().await?;
        let account = accounts::lock(&txn, account_id).await?;
        let target = lock_user(&txn, account_id, user_id).await?;
        if target.status != UserStatus::Inactive {
            return Err(ApiError::rejected(
                Reason::InvalidState,
                "the user is not inactive",
            ));
        }
        if accounts::seats_used(&txn, account_id).await?
            >= u64::try_from(account.seat_limit).unwrap_or_default()
        {
            return Err(ApiError::rejected(
                Reason::SeatLimitReached,
                "every seat of the account is taken",
            ));
        }
        let mut active = target.clone().into_active_model();
        active.status = Set(UserStatus::Active);
        active.deactivate_time = Set(None);
        active.update_time = Set(now);
        active.update(&txn).await?;
        let actor = actor(&txn, &call).await?;
        audit::record(
            &txn,
            AuditEntry {
                account_id,
                actor: &actor,
                action: "user.reactivated",
                target_type: "user",
                target_id: user_id.to_string(),
                target_name: target.display_name.clone(),
                details: None,
                request_id: &call.request_id,
            },
            now,
        )
        .await?;
        emit(
            &txn,
            "user.reactivated",
            "UserReactivated",
            user_id.to_string(),
            Some(account_id),
            &events::UserReactivated {
                user_id: user_id.to_string(),
                account_id: account_id.to_string(),
                actor: Some(actor.to_proto()),
            },
            now,
        )
        .await?;
        let user = view(&txn, account_id, user_id).await?;
        txn.commit().await?;
        principals::refresh_user(&self.state, user_id).await?;
        Ok(pb::ReactivateUserResponse { user: Some(user) })
    }

    async fn delete_user(
        &self,
        call: Call,
        request: pb::DeleteUserRequest,
    ) -> ApiResult<pb::DeleteUserResponse> {
        let account_id = call.principal.account()?;
        let user_id = parse_id("user_id", &request.user_id)?;
        let now = self.state.clock.now();
        let txn = self.state.db.begin().await?;
        accounts::lock(&txn, account_id).await?;
        let target = lock_user(&txn, account_id, user_id).await?;
        let previous = Some(target.status);
        if previous == Some(UserStatus::Invited) {
            return Err(ApiError::rejected(
                Reason::InvalidState,
                "the user is invited: revoke or delete the invitation instead",
            ));
        }
        check_owner(
            target.owner,
            call.principal.user_id == Some(target.id),
            OwnerAction::Delete,
        )?;
        check_manager_left(&txn, account_id, &target, false).await?;
        user::Entity::delete_many()
            .filter(user::Column::AccountId.eq(account_id))
            .filter(user::Column::Id.eq(user_id))
            .exec(&txn)
            .await?;
        let actor = actor(&txn, &call).await?;
        audit::record(
            &txn,
            AuditEntry {
                account_id,
                actor: &actor,
                action: "user.deleted",
                target_type: "user",
                target_id: user_id.to_string(),
                target_name: target.display_name.clone(),
                details: Some(json!({
                    "email": target.email_canonical,
                    "username": target.username,
                    "previous_status": target.status.as_str(),
                })),
                request_id: &call.request_id,
            },
            now,
        )
        .await?;
        emit(
            &txn,
            "user.deleted",
            "UserDeleted",
            user_id.to_string(),
            Some(account_id),
            &events::UserDeleted {
                user_id: user_id.to_string(),
                account_id: account_id.to_string(),
                actor: Some(actor.to_proto()),
                previous_status: proto_status(target.status),
                email: target.email_canonical.clone().unwrap_or_default(),
                invitation_id: String::new(),
            },
            now,
        )
        .await?;
        self.sign_out_everywhere(user_id).await?;
        txn.commit().await?;
        self.sign_out_after_commit(user_id).await?;
        Ok(pb::DeleteUserResponse {
            user_id: user_id.to_string(),
        })
    }

    /// Ends every session of a user who may no longer act; called before the
    /// commit, so that if the session store is down the change is not made
    /// (fail closed).
    async fn sign_out_everywhere(&self, user_id: Uuid) -> ApiResult<()> {
        self.state.sessions.revoke_user(user_id).await?;
        self.state.sessions.delete_principal(user_id).await?;
        Ok(())
    }

    /// Again after the commit: a sign-in that read the user before the commit
    /// may have created a session meanwhile; and the snapshot follows the
    /// committed state.
    async fn sign_out_after_commit(&self, user_id: Uuid) -> ApiResult<()> {
        self.state.sessions.revoke_user(user_id).await?;
        principals::refresh_user(&self.state, user_id).await
    }
}

/// The message of a per-item error (never internals).
fn item_message(err: &ApiError) -> String {
    match err {
        ApiError::Rejected { message, .. } => message.clone(),
        other => other.reason().as_str().to_lowercase().replace('_', " "),
    }
}

#[tonic::async_trait]
impl pb::user_service_server::UserService for IdentityApi {
    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let call = call(&request)?;
        self.list_users(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let call = call(&request)?;
        self.get_user(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let call = call(&request)?;
        self.create_user(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        let call = call(&request)?;
        self.update_user(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn batch_update_users(
        &self,
        request: Request<pb::BatchUpdateUsersRequest>,
    ) -> Result<Response<pb::BatchUpdateUsersResponse>, Status> {
        let call = call(&request)?;
        self.batch_update_users(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn deactivate_user(
        &self,
        request: Request<pb::DeactivateUserRequest>,
    ) -> Result<Response<pb::DeactivateUserResponse>, Status> {
        let call = call(&request)?;
        self.deactivate_user(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn reactivate_user(
        &self,
        request: Request<pb::ReactivateUserRequest>,
    ) -> Result<Response<pb::ReactivateUserResponse>, Status> {
        let call = call(&request)?;
        self.reactivate_user(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let call = call(&request)?;
        self.delete_user(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn send_password_reset(
        &self,
        request: Request<pb::SendPasswordResetRequest>,
    ) -> Result<Response<pb::SendPasswordResetResponse>, Status> {
        let call = call(&request)?;
        let user_id = parse_id("user_id", &request.get_ref().user_id).map_err(status)?;
        // The same single-use link as AuthService.RequestPasswordReset.
        IdentityApi::send_password_reset(self, &call, user_id)
            .await
            .map(Response::new)
            .map_err(status)
    }
}

#[cfg(test)]
mod tests {
    use crate::api::validate::MAX_METADATA_BYTES;
    use chrono::Duration;
    use sea_orm::Statement;
    use tonic::Code;
    use tonic_types::StatusExt;
    use usher_kit::{clock::ManualClock, principal::Principal, sessions::SessionMeta};
    use usher_proto::identity::v1::{
        account_service_server::AccountService, user_service_server::UserService,
    };

    use super::*;
    use crate::testing::{
        TestIdentity, admin_permissions, member, new_account_request, platform, request,
    };

    // -- harness ----------------------------------------------------------

    /// An account created through AccountService, with its built-in roles.
    #[derive(Clone, Debug)]
    struct Acct {
        id: Uuid,
        owner: Uuid,
        admin_role: Uuid,
        user_role: Uuid,
    }

    impl Acct {
        fn owner(&self) -> Principal {
            member(self.id, self.owner, &admin_permissions())
        }

        /// An API key of the account holding every permission: an admin
        /// who is none of the users a test changes.
        fn key(&self) -> Principal {
            Principal {
                kind: usher_kit::principal::PrincipalKind::ApiKey,
                user_id: None,
                credential_id: Some(Uuid::new_v4().to_string()),
                ..self.owner()
            }
        }

        fn admin(&self, user: &pb::User) -> Principal {
            member(self.id, id_of(user), &admin_permissions())
        }
    }

    async fn start() -> TestIdentity {
        let clock = ManualClock::new(DateTime::from_timestamp(1_800_000_000, 0).expect("time"));
        TestIdentity::start(clock).await
    }

    async fn account_with(test: &TestIdentity, mut create: pb::CreateAccountRequest) -> Acct {
        create.owner_password = "correct horse battery".into();
        let created = AccountService::create_account(&test.api, request(&platform(), create))
            .await
            .expect("account")
            .into_inner();
        let id: Uuid = created.account.expect("account").id.parse().expect("uuid");
        let owner = id_of(&created.owner.expect("owner"));
        let roles = roles_of(&test.state.db, id).await.expect("roles");
        let named = |name: &str| {
            roles
                .values()
                .find(|r| r.name == name)
                .expect("built-in role")
                .id
        };
        Acct {
            id,
            owner,
            admin_role: named("Admin"),
            user_role: named("User"),
        }
    }

    async fn account(test: &TestIdentity, seats: i32) -> Acct {
        account_with(test, new_account_request(seats)).await
    }

    fn id_of(user: &pb::User) -> Uuid {
        user.id.parse().expect("uuid")
    }

    fn reason(status: &Status) -> String {
        status
            .get_error_details()
            .error_info()
            .map(|i| i.reason.clone())
            .unwrap_or_default()
    }

    fn fields(status: &Status) -> Vec<String> {
        status
            .get_error_details()
            .bad_request()
            .map(|b| b.field_violations.iter().map(|f| f.field.clone()).collect())
            .unwrap_or_default()
    }

    fn new_user(username: &str, email: &str, role: Uuid) -> pb::CreateUserRequest {
        pb::CreateUserRequest {
            username: username.into(),
            email: email.into(),
            display_name: format!("{username} name"),
            role_id: role.to_string(),
            ..Default::default()
        }
    }

    async fn create(
        test: &TestIdentity,
        caller: &Principal,
        message: pb::CreateUserRequest,
    ) -> Result<pb::User, Status> {
        UserService::create_user(&test.api, request(caller, message))
            .await
            .map(|r| r.into_inner().user.expect("user"))
    }

    /// A plain member (User role, email, no password: no hashing).
    async fn member_user(test: &TestIdentity, acct: &Acct, username: &str) -> pb::User {
        create(
            test,
            &acct.owner(),
            new_user(
                username,
                &format!("{username}@acme.example"),
                acct.user_role,
            ),
        )
        .await
        .expect("member created")
    }

    /// An Admin with a password.
    async fn admin_user(test: &TestIdentity, acct: &Acct, username: &str) -> pb::User {
        let mut message = new_user(
            username,
            &format!("{username}@acme.example"),
            acct.admin_role,
        );
        message.password = "a long enough password".into();
        create(test, &acct.owner(), message)
            .await
            .expect("admin created")
    }

    /// Makes the owner a plain member in the database, so that the admins
    /// the test creates are the only managers (the owner's role cannot change
    /// through the API).
    async fn owner_not_a_manager(test: &TestIdentity, acct: &Acct) {
        user::Entity::update_many()
            .col_expr(user::Column::RoleId, Expr::val(acct.user_role))
            .filter(user::Column::Id.eq(acct.owner))
            .exec(&test.state.db)
            .await
            .expect("owner demoted");
    }

    /// An INVITED user, as the invitation service's reservation leaves it.
    async fn invited(test: &TestIdentity, acct: &Acct, email: &str) -> Uuid {
        let id = Uuid::new_v4();
        let now = test.state.clock.now();
        let model = row(
            acct,
            id,
            "Invited Person",
            Some(email),
            None,
            acct.user_role,
            None,
            now,
        );
        let mut model = model.into_active_model();
        model.status = Set(UserStatus::Invited);
        model.origin = Set(Origin::Invitation);
        model.invitation_id = Set(Some(Uuid::new_v4()));
        model.insert(&test.state.db).await.expect("invited user");
        id
    }

    async fn make_team(test: &TestIdentity, acct: &Acct, name: &str) -> Uuid {
        let id = Uuid::new_v4();
        let now = test.state.clock.now();
        team::ActiveModel {
            id: Set(id),
            account_id: Set(acct.id),
            name: Set(name.into()),
            description: Set(String::new()),
            create_time: Set(now),
            update_time: Set(now),
        }
        .insert(&test.state.db)
        .await
        .expect("team");
        id
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        acct: &Acct,
        id: Uuid,
        name: &str,
        email: Option<&str>,
        username: Option<&str>,
        role: Uuid,
        team: Option<Uuid>,
        created: DateTime<Utc>,
    ) -> user::Model {
        user::Model {
            id,
            account_id: acct.id,
            email: email.map(str::to_owned),
            email_canonical: email.map(str::to_lowercase),
            username: username.map(str::to_owned),
            display_name: name.into(),
            search_text: crate::store::users::search_text(
                name,
                email.map(str::to_lowercase).as_deref(),
                username,
            ),
            status: UserStatus::Active,
            role_id: role,
            team_id: team,
            products: json!([]),
            locale: String::new(),
            metadata: None,
            owner: false,
            origin: Origin::Direct,
            password_hash: None,
            password_change_required: false,
            invitation_id: None,
            invited_by: None,
            create_time: created,
            update_time: created,
            activate_time: Some(created),
            deactivate_time: None,
            last_sign_in_time: None,
        }
    }

    async fn stored(test: &TestIdentity, id: Uuid) -> Option<user::Model> {
        user::Entity::find_by_id(id)
            .one(&test.state.db)
            .await
            .expect("query")
    }

    async fn audit_count(test: &TestIdentity, action: &str, target: Uuid) -> u64 {
        crate::store::entities::audit_event::Entity::find()
            .filter(crate::store::entities::audit_event::Column::Action.eq(action))
            .filter(crate::store::entities::audit_event::Column::TargetId.eq(target.to_string()))
            .count(&test.state.db)
            .await
            .expect("audit")
    }

    async fn events(test: &TestIdentity, routing_key: &str, subject: Uuid) -> i64 {
        let statement = Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM usher_outbox WHERE message->>'routing_key' = $1 \
             AND message->'headers'->>'cloudEvents_subject' = $2",
            [routing_key.into(), subject.to_string().into()],
        );
        let found = test
            .state
            .db
            .query_one_raw(statement)
            .await
            .expect("outbox")
            .expect("row");
        found.try_get::<i64>("", "n").expect("count")
    }

    async fn list(
        test: &TestIdentity,
        caller: &Principal,
        message: pb::ListUsersRequest,
    ) -> Result<pb::ListUsersResponse, Status> {
        UserService::list_users(&test.api, request(caller, message))
            .await
            .map(|r| r.into_inner())
    }

    async fn get(test: &TestIdentity, caller: &Principal, id: Uuid) -> Result<pb::User, Status> {
        UserService::get_user(
            &test.api,
            request(
                caller,
                pb::GetUserRequest {
                    user_id: id.to_string(),
                },
            ),
        )
        .await
        .map(|r| r.into_inner().user.expect("user"))
    }

    async fn update(
        test: &TestIdentity,
        caller: &Principal,
        message: pb::UpdateUserRequest,
    ) -> Result<pb::User, Status> {
        UserService::update_user(&test.api, request(caller, message))
            .await
            .map(|r| r.into_inner().user.expect("user"))
    }

    fn set_role(user: Uuid, role: Uuid) -> pb::UpdateUserRequest {
        pb::UpdateUserRequest {
            user_id: user.to_string(),
            role_id: role.to_string(),
            update_mask: Some(FieldMask {
                paths: vec!["role_id".into()],
            }),
            ..Default::default()
        }
    }

    async fn batch(
        test: &TestIdentity,
        caller: &Principal,
        message: pb::BatchUpdateUsersRequest,
    ) -> Result<pb::BatchUpdateUsersResponse, Status> {
        UserService::batch_update_users(&test.api, request(caller, message))
            .await
            .map(|r| r.into_inner())
    }

    async fn deactivate(
        test: &TestIdentity,
        caller: &Principal,
        id: Uuid,
    ) -> Result<pb::User, Status> {
        UserService::deactivate_user(
            &test.api,
            request(
                caller,
                pb::DeactivateUserRequest {
                    user_id: id.to_string(),
                },
            ),
        )
        .await
        .map(|r| r.into_inner().user.expect("user"))
    }

    async fn reactivate(
        test: &TestIdentity,
        caller: &Principal,
        id: Uuid,
    ) -> Result<pb::User, Status> {
        UserService::reactivate_user(
            &test.api,
            request(
                caller,
                pb::ReactivateUserRequest {
                    user_id: id.to_string(),
                },
            ),
        )
        .await
        .map(|r| r.into_inner().user.expect("user"))
    }

    async fn delete(
        test: &TestIdentity,
        caller: &Principal,
        id: Uuid,
    ) -> Result<pb::DeleteUserResponse, Status> {
        UserService::delete_user(
            &test.api,
            request(
                caller,
                pb::DeleteUserRequest {
                    user_id: id.to_string(),
                },
            ),
        )
        .await
        .map(|r| r.into_inner())
    }

    /// Every page of a listing, following the tokens.
    async fn all_pages(
        test: &TestIdentity,
        caller: &Principal,
        mut message: pb::ListUsersRequest,
    ) -> (Vec<pb::User>, usize) {
        let mut users = Vec::new();
        let mut pages = 0;
        loop {
            let page = list(test, caller, message.clone()).await.expect("page");
            pages += 1;
            assert!(page.users.len() <= usize::try_from(message.page_size).expect("size"));
            users.extend(page.users);
            if page.next_page_token.is_empty() {
                return (users, pages);
            }
            message.page_token = page.next_page_token;
        }
    }

    // -- tests ------------------------------------------------------------

    #[tokio::test]
    async fn create_user_makes_an_active_direct_user_with_audit_event_and_snapshot() {
        let test = start().await;
        let acct = account(&test, 10).await;
        let mut message = new_user("Kiosk-01", "", acct.user_role);
        message.password = "shared device pass".into();
        message.require_password_change = true;
        message.locale = "FR".into();
        message.metadata = Some(convert::json_to_struct(&json!({"lines": ["+33 1 23"]})));
        let kiosk = create(&test, &acct.owner(), message)
            .await
            .expect("created");
        assert_eq!(kiosk.username, "kiosk-01");
        assert_eq!(kiosk.email, "");
        assert_eq!(kiosk.status, pb::UserStatus::Active as i32);
        assert_eq!(kiosk.origin, pb::UserOrigin::Direct as i32);
        assert_eq!(kiosk.role_name, "User");
        assert_eq!(kiosk.locale, "fr");
        assert!(kiosk.password_change_required);
        assert!(kiosk.activate_time.is_some());
        assert_eq!(
            kiosk.metadata.as_ref().map(convert::struct_to_json),
            Some(json!({"lines": ["+33 1 23"]}))
        );
        let row = stored(&test, id_of(&kiosk)).await.expect("row");
        assert!(
            row.password_hash
                .as_deref()
                .is_some_and(|h| h.starts_with("$argon2id$"))
        );
        assert_eq!(
            get(&test, &acct.owner(), id_of(&kiosk)).await.expect("get"),
            kiosk
        );
        assert_eq!(audit_count(&test, "user.created", id_of(&kiosk)).await, 1);
        assert_eq!(events(&test, "user.created", id_of(&kiosk)).await, 1);
        let snapshot = test
            .state
            .sessions
            .get_principal(id_of(&kiosk))
            .await
            .expect("redis")
            .expect("snapshot");
        assert_eq!(snapshot.permissions, vec!["users.read".to_owned()]);
        assert!(snapshot.password_change_required);

        // An email user without a password: stored canonical, no password yet.
        let jane = create(
            &test,
            &acct.owner(),
            new_user("jane", "  Jane.Doe@ACME.example ", acct.user_role),
        )
        .await
        .expect("email user");
        assert_eq!(jane.email, "jane.doe@acme.example");
        assert!(
            stored(&test, id_of(&jane))
                .await
                .expect("row")
                .password_hash
                .is_none()
        );
        test.stop().await;
    }

    #[tokio::test]
    async fn create_user_refuses_bad_input_conflicts_and_missing_seats() {
        let test = start().await;
        let mut with_domains = new_account_request(4);
        with_domains.allowed_email_domains = vec!["acme.example".into()];
        let acct = account_with(&test, with_domains).await;
        let other = account(&test, 5).await;
        let owner = acct.owner();

        let cases = [
            (new_user("ab", "", acct.user_role), "username"),
            (
                new_user("has space", "x@acme.example", acct.user_role),
                "username",
            ),
            (new_user("okname", "not-an-email", acct.user_role), "email"),
            (new_user("okname", "", acct.user_role), "password"),
            (
                new_user("okname", "admin@acme.example", acct.admin_role),
                "password",
            ),
            (
                pb::CreateUserRequest {
                    password: "short".into(),
                    ..new_user("okname", "", acct.user_role)
                },
                "password",
            ),
            (
                pb::CreateUserRequest {
                    role_id: "nope".into(),
                    ..new_user("okname", "o@acme.example", acct.user_role)
                },
                "role_id",
            ),
            (
                pb::CreateUserRequest {
                    display_name: " ".into(),
                    ..new_user("okname", "o@acme.example", acct.user_role)
                },
                "display_name",
            ),
            (
                pb::CreateUserRequest {
                    locale: "de".into(),
                    ..new_user("okname", "o@acme.example", acct.user_role)
                },
                "locale",
            ),
            (
                pb::CreateUserRequest {
                    metadata: Some(convert::json_to_struct(
                        &json!({"blob": "x".repeat(MAX_METADATA_BYTES)}),
                    )),
                    ..new_user("okname", "o@acme.example", acct.user_role)
                },
                "metadata",
            ),
        ];
        for (message, field) in cases {
            let err = create(&test, &owner, message).await.expect_err(field);
            assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
            assert_eq!(fields(&err), vec![field.to_owned()], "{field}");
        }

        let not_found = [
            new_user("okname", "o@acme.example", other.user_role),
            new_user("okname", "o@acme.example", Uuid::new_v4()),
            pb::CreateUserRequest {
                team_id: Uuid::new_v4().to_string(),
                ..new_user("okname", "o@acme.example", acct.user_role)
            },
        ];
        for message in not_found {
            assert_eq!(
                reason(&create(&test, &owner, message).await.expect_err("not found")),
                "NOT_FOUND"
            );
        }
        let product = pb::CreateUserRequest {
            products: vec!["meter".into()],
            ..new_user("okname", "o@acme.example", acct.user_role)
        };
        assert_eq!(
            reason(&create(&test, &owner, product).await.expect_err("product")),
            "PRODUCT_NOT_ENABLED"
        );
        let domain = new_user("okname", "o@elsewhere.example", acct.user_role);
        assert_eq!(
            reason(&create(&test, &owner, domain).await.expect_err("domain")),
            "DOMAIN_NOT_ALLOWED"
        );

        member_user(&test, &acct, "taken").await;
        invited(&test, &acct, "pending@acme.example").await;
        for message in [
            new_user("TAKEN", "fresh@acme.example", acct.user_role),
            new_user("fresh", "Taken@ACME.example", acct.user_role),
            new_user("fresh", "PENDING@acme.example", acct.user_role),
        ] {
            let err = create(&test, &owner, message).await.expect_err("conflict");
            assert_eq!(
                (err.code(), reason(&err).as_str()),
                (Code::AlreadyExists, "ALREADY_EXISTS")
            );
        }
        // Owner + taken + pending = 3 of 4 seats.
        member_user(&test, &acct, "last-seat").await;
        let err = create(&test, &owner, new_user("one-too-many", "", acct.user_role))
            .await
            .expect_err("full");
        assert_eq!(reason(&err), "INVALID_ARGUMENT", "validation comes first");
        let err = member_user_result(&test, &acct, "one-too-many")
            .await
            .expect_err("full");
        assert_eq!(reason(&err), "SEAT_LIMIT_REACHED");

        let single = account(&test, 1).await;
        let err = member_user_result(&test, &single, "solo")
            .await
            .expect_err("single");
        assert_eq!(reason(&err), "SINGLE_USER_PLAN");
        test.stop().await;
    }

    async fn member_user_result(
        test: &TestIdentity,
        acct: &Acct,
        username: &str,
    ) -> Result<pb::User, Status> {
        create(
            test,
            &acct.owner(),
            new_user(
                username,
                &format!("{username}@acme.example"),
                acct.user_role,
            ),
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_user_is_idempotent_per_request_id() {
        let test = start().await;
        let acct = account(&test, 10).await;
        let message = pb::CreateUserRequest {
            request_id: "create-1".into(),
            ..new_user("idem", "idem@acme.example", acct.user_role)
        };
        let first = create(&test, &acct.owner(), message.clone())
            .await
            .expect("first");
        let again = create(&test, &acct.owner(), message.clone())
            .await
            .expect("retry");
        assert_eq!(first, again);
        let changed = pb::CreateUserRequest {
            display_name: "Someone else".into(),
            ..message
        };
        let err = create(&test, &acct.owner(), changed)
            .await
            .expect_err("conflict");
        assert_eq!(reason(&err), "IDEMPOTENCY_CONFLICT");

        // Two identical retries at once: one user, the same answer twice.
        let message = pb::CreateUserRequest {
            request_id: "create-2".into(),
            ..new_user("racer", "racer@acme.example", acct.user_role)
        };
        let calls = (0..2).map(|_| {
            let api = test.api.clone();
            let caller = acct.owner();
            let message = message.clone();
            tokio::spawn(
                async move { UserService::create_user(&api, request(&caller, message)).await },
            )
        });
        let mut ids = BTreeSet::new();
        for call in calls.collect::<Vec<_>>() {
            ids.insert(
                call.await
                    .expect("task")
                    .expect("created")
                    .into_inner()
                    .user
                    .expect("user")
                    .id,
            );
        }
        assert_eq!(ids.len(), 1);
        let users = user::Entity::find()
            .filter(user::Column::AccountId.eq(acct.id))
            .count(&test.state.db)
            .await
            .expect("count");
        assert_eq!(users, 3);
        test.stop().await;
    }

    #[tokio::test]
    async fn create_user_keys_are_per_caller_and_never_cut() {
        let test = start().await;
        let acct = account(&test, 10).await;
        let other_admin = admin_user(&test, &acct, "second-admin").await;
        // The same request_id from two callers: two calls, two users.
        let ada = create(
            &test,
            &acct.owner(),
            pb::CreateUserRequest {
                request_id: "shared-key".into(),
                ..new_user("ada", "ada@acme.example", acct.user_role)
            },
        )
        .await
        .expect("the owner's call");
        let bob = create(
            &test,
            &acct.admin(&other_admin),
            pb::CreateUserRequest {
                request_id: "shared-key".into(),
                ..new_user("bob", "bob@acme.example", acct.user_role)
            },
        )
        .await
        .expect("another caller's call is not a conflict");
        assert_ne!(ada.id, bob.id);
        // Each caller's retry replays its own answer.
        let again = create(
            &test,
            &acct.admin(&other_admin),
            pb::CreateUserRequest {
                request_id: "shared-key".into(),
                ..new_user("bob", "bob@acme.example", acct.user_role)
            },
        )
        .await
        .expect("replayed");
        assert_eq!(again, bob);

        // Too long a request_id is refused, not cut (its first 128
        // characters would otherwise replay another call).
        let long = format!("{}-tail", "k".repeat(128));
        let err = create(
            &test,
            &acct.owner(),
            pb::CreateUserRequest {
                request_id: long,
                ..new_user("carol", "carol@acme.example", acct.user_role)
            },
        )
        .await
        .expect_err("too long");
        assert_eq!(fields(&err), ["request_id"]);
        test.stop().await;
    }

    #[tokio::test]
    async fn control_characters_in_text_are_invalid_arguments_and_store_nothing() {
        let test = start().await;
        let acct = account(&test, 10).await;
        let nul = prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue("a\0b".into())),
        };
        let message = pb::CreateUserRequest {
            request_id: "nul\0key".into(),
            metadata: Some(prost_types::Struct {
                fields: [("line".to_owned(), nul)].into(),
            }),
            ..new_user("nul", "nul@acme.example", acct.user_role)
        };
        let err = create(&test, &acct.owner(), message)
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(fields(&err), ["request_id", "metadata.line"]);
        let err = UserService::list_users(
            &test.api,
            request(
                &acct.owner(),
                pb::ListUsersRequest {
                    query: "ad\0a".into(),
                    ..Default::default()
                },
            ),
        )
        .await
        .expect_err("refused");
        assert_eq!(fields(&err), ["query"]);
        let users = user::Entity::find()
            .filter(user::Column::AccountId.eq(acct.id))
            .count(&test.state.db)
            .await
            .expect("count");
        assert_eq!(users, 1, "only the owner");
        test.stop().await;
    }

    #[tokio::test]
    async fn update_user_changes_only_masked_fields_and_protects_the_owner() {
        let test = start().await;
        let mut create_account = new_account_request(10);
        create_account.products = Vec::new();
        let acct = account(&test, 10).await;
        let owner = acct.owner();
        let team = make_team(&test, &acct, "Night shift").await;
        let user = member_user(&test, &acct, "mallory").await;
        let id = id_of(&user);

        // P15: role and locale are in the message but not in the mask.
        let renamed = update(
            &test,
            &owner,
            pb::UpdateUserRequest {
                user_id: id.to_string(),
                display_name: "Mallory Renamed".into(),
                role_id: acct.admin_role.to_string(),
                locale: "fr".into(),
                update_mask: Some(FieldMask {
                    paths: vec!["display_name".into()],
                }),
                ..Default::default()
            },
        )
        .await
        .expect("renamed");
        assert_eq!(renamed.display_name, "Mallory Renamed");
        assert_eq!(
            (renamed.role_id.as_str(), renamed.locale.as_str()),
            (user.role_id.as_str(), "")
        );
        let row = stored(&test, id).await.expect("row");
        assert!(str::contains(&row.search_text, "mallory renamed"));
        assert_eq!(audit_count(&test, "user.updated", id).await, 1);
        assert_eq!(events(&test, "user.updated", id).await, 1);

        // Role and team; the snapshot follows the role at once.
        test.state
            .sessions
            .delete_principal(id)
            .await
            .expect("redis");
        let promoted = update(
            &test,
            &owner,
            pb::UpdateUserRequest {
                team_id: team.to_string(),
                update_mask: Some(FieldMask {
                    paths: vec!["role_id".into(), "team_id".into()],
                }),
                ..set_role(id, acct.admin_role)
            },
        )
        .await
        .expect("promoted");
        assert_eq!(
            (promoted.role_name.as_str(), promoted.team_name.as_str()),
            ("Admin", "Night shift")
        );
        let snapshot = test
            .state
            .sessions
            .get_principal(id)
            .await
            .expect("redis")
            .expect("snapshot");
        assert!(snapshot.permissions.iter().any(|p| p == USERS_MANAGE));
        update(&test, &owner, set_role(id, acct.user_role))
            .await
            .expect("demoted");
        let snapshot = test
            .state
            .sessions
            .get_principal(id)
            .await
            .expect("redis")
            .expect("snapshot");
        assert!(
            !snapshot.permissions.iter().any(|p| p == USERS_MANAGE),
            "the demotion applies on the next call"
        );
        let left_team = update(
            &test,
            &owner,
            pb::UpdateUserRequest {
                user_id: id.to_string(),
                update_mask: Some(FieldMask {
                    paths: vec!["team_id".into()],
                }),
                ..Default::default()
            },
        )
        .await
        .expect("left team");
        assert_eq!(
            (left_team.team_id.as_str(), left_team.team_name.as_str()),
            ("", "")
        );

        // Bad masks and values.
        for (message, field) in [
            (
                pb::UpdateUserRequest {
                    user_id: id.to_string(),
                    ..Default::default()
                },
                "update_mask",
            ),
            (
                pb::UpdateUserRequest {
                    user_id: id.to_string(),
                    update_mask: Some(FieldMask {
                        paths: vec!["status".into()],
                    }),
                    ..Default::default()
                },
                "update_mask.paths[0]",
            ),
            (
                pb::UpdateUserRequest {
                    user_id: id.to_string(),
                    update_mask: Some(FieldMask {
                        paths: vec!["display_name".into()],
                    }),
                    ..Default::default()
                },
                "display_name",
            ),
            (
                pb::UpdateUserRequest {
                    user_id: "x".into(),
                    ..set_role(id, acct.user_role)
                },
                "user_id",
            ),
        ] {
            let err = update(&test, &owner, message).await.expect_err(field);
            assert_eq!(fields(&err), vec![field.to_owned()]);
        }
        let products = pb::UpdateUserRequest {
            user_id: id.to_string(),
            products: vec!["meter".into()],
            update_mask: Some(FieldMask {
                paths: vec!["products".into()],
            }),
            ..Default::default()
        };
        assert_eq!(
            reason(&update(&test, &owner, products).await.expect_err("product")),
            "PRODUCT_NOT_ENABLED"
        );
        assert_eq!(
            reason(
                &update(&test, &owner, set_role(Uuid::new_v4(), acct.user_role))
                    .await
                    .expect_err("user")
            ),
            "NOT_FOUND"
        );
        assert_eq!(
            reason(
                &update(&test, &owner, set_role(id, Uuid::new_v4()))
                    .await
                    .expect_err("role")
            ),
            "NOT_FOUND"
        );

        // INVITED users are changed through their invitation.
        let pending = invited(&test, &acct, "pending@acme.example").await;
        assert_eq!(
            reason(
                &update(&test, &owner, set_role(pending, acct.admin_role))
                    .await
                    .expect_err("invited")
            ),
            "INVALID_STATE"
        );

        // The owner: only the owner edits the owner, and never its role.
        let other_admin = admin_user(&test, &acct, "second-admin").await;
        let rename_owner = pb::UpdateUserRequest {
            user_id: acct.owner.to_string(),
            display_name: "Hijacked".into(),
            update_mask: Some(FieldMask {
                paths: vec!["display_name".into()],
            }),
            ..Default::default()
        };
        let err = update(&test, &acct.admin(&other_admin), rename_owner.clone())
            .await
            .expect_err("protected");
        assert_eq!(reason(&err), "OWNER_PROTECTED");
        assert_eq!(
            update(&test, &owner, rename_owner)
                .await
                .expect("own name")
                .display_name,
            "Hijacked"
        );
        let err = update(&test, &owner, set_role(acct.owner, acct.user_role))
            .await
            .expect_err("own role");
        assert_eq!(reason(&err), "OWNER_PROTECTED");
        test.stop().await;
    }

    #[tokio::test]
    async fn later_pages_carry_the_first_pages_count_instead_of_counting_again() {
        let test = start().await;
        let acct = account(&test, 100).await;
        let owner = acct.owner();
        let insert = |from: usize, to: usize| {
            let now = test.state.clock.now();
            let rows: Vec<user::ActiveModel> = (from..to)
                .map(|i| {
                    row(
                        &acct,
                        Uuid::new_v4(),
                        &format!("Member {i:02}"),
                        Some(&format!("m{i:02}@acme.example")),
                        None,
                        acct.user_role,
                        None,
                        now,
                    )
                    .into_active_model()
                })
                .collect();
            user::Entity::insert_many(rows).exec(&test.state.db)
        };
        insert(0, 10).await.expect("members");
        let message = pb::ListUsersRequest {
            page_size: 4,
            ..Default::default()
        };
        let first = list(&test, &owner, message.clone()).await.expect("page");
        assert_eq!(first.total_size, 11, "ten members and the owner");
        // Two more arrive while the caller pages.
        insert(10, 12).await.expect("more");
        let second = list(
            &test,
            &owner,
            pb::ListUsersRequest {
                page_token: first.next_page_token.clone(),
                ..message.clone()
            },
        )
        .await
        .expect("page 2");
        assert_eq!(second.total_size, 11, "the listing's count, not a recount");
        let fresh = list(&test, &owner, message).await.expect("page 1 again");
        assert_eq!(fresh.total_size, 13, "a new listing counts again");
        test.stop().await;
    }

    #[tokio::test]
    async fn the_last_active_manager_cannot_be_demoted_deactivated_or_deleted() {
        let test = start().await;
        let acct = account(&test, 10).await;
        let alice = admin_user(&test, &acct, "alice").await;
        owner_not_a_manager(&test, &acct).await;
        let as_alice = acct.admin(&alice);
        // Alice may not change her own role at all (P26); an admin's key
        // demotes her.
        let key = acct.key();
        let id = id_of(&alice);
        assert_eq!(
            reason(
                &update(&test, &key, set_role(id, acct.user_role))
                    .await
                    .expect_err("demote")
            ),
            "LAST_MANAGER"
        );
        assert_eq!(
            reason(
                &deactivate(&test, &as_alice, id)
                    .await
                    .expect_err("deactivate")
            ),
            "LAST_MANAGER"
        );
        assert_eq!(
            reason(&delete(&test, &as_alice, id).await.expect_err("delete")),
            "LAST_MANAGER"
        );
        // An inactive admin does not count.
        let bob = admin_user(&test, &acct, "bob").await;
        deactivate(&test, &as_alice, id_of(&bob))
            .await
            .expect("bob deactivated");
        assert_eq!(
            reason(
                &update(&test, &key, set_role(id, acct.user_role))
                    .await
                    .expect_err("demote")
            ),
            "LAST_MANAGER"
        );
        reactivate(&test, &as_alice, id_of(&bob))
            .await
            .expect("bob back");
        assert_eq!(
            reason(
                &update(&test, &as_alice, set_role(id, acct.user_role))
                    .await
                    .expect_err("her own role")
            ),
            "PERMISSION_DENIED"
        );
        update(&test, &key, set_role(id, acct.user_role))
            .await
            .expect("now alice may go");
        assert_eq!(
            stored(&test, id).await.expect("row").role_id,
            acct.user_role
        );
        test.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_admins_demoting_each_other_at_once_never_both_succeed() {
        let test = start().await;
        let acct = account(&test, 10).await;
        let alice = id_of(&admin_user(&test, &acct, "alice").await);
        let bob = id_of(&admin_user(&test, &acct, "bob").await);
        owner_not_a_manager(&test, &acct).await;
        for round in 0..20 {
            let demote = |actor: Uuid, target: Uuid| {
                let api = test.api.clone();
                let caller = member(acct.id, actor, &admin_permissions());
                let message = set_role(target, acct.user_role);
                tokio::spawn(async move {
                    UserService::update_user(&api, request(&caller, message)).await
                })
            };
            let (a, b) = (demote(alice, bob), demote(bob, alice));
            let outcomes = [a.await.expect("task"), b.await.expect("task")];
            let won: Vec<_> = outcomes.iter().filter(|o| o.is_ok()).collect();
            assert_eq!(won.len(), 1, "round {round}: exactly one demotion wins");
            let lost = outcomes
                .iter()
                .find_map(|o| o.as_ref().err())
                .expect("one refused");
            assert_eq!(reason(lost), "LAST_MANAGER", "round {round}");
            let roles = roles_of(&test.state.db, acct.id).await.expect("roles");
            assert_eq!(
                count_managers(&test.state.db, acct.id, &roles)
                    .await
                    .expect("count"),
                1,
                "round {round}"
            );
            // The survivor promotes the other back for the next round.
            let survivor = if stored(&test, alice).await.expect("row").role_id == acct.admin_role {
                alice
            } else {
                bob
            };
            let demoted = if survivor == alice { bob } else { alice };
            update(
                &test,
                &member(acct.id, survivor, &admin_permissions()),
                set_role(demoted, acct.admin_role),
            )
            .await
            .expect("promoted back");
        }
        test.stop().await;
    }

    /// A custom role of `acct` holding `permissions`, written directly.
    async fn custom_role(
        test: &TestIdentity,
        acct: &Acct,
        name: &str,
        permissions: &[&str],
    ) -> Uuid {
        let now = test.state.clock.now();
        role::ActiveModel {
            id: Set(Uuid::new_v4()),
            account_id: Set(acct.id),
            name: Set(name.into()),
            description: Set(String::new()),
            permissions: Set(convert::json_strings(
                permissions
                    .iter()
                    .map(|p| (*p).to_owned())
                    .collect::<Vec<_>>(),
            )),
            built_in: Set(false),
            create_time: Set(now),
            update_time: Set(now),
        }
        .insert(&test.state.db)
        .await
        .expect("role")
        .id
    }

    #[tokio::test]
    async fn a_manager_grants_no_role_beyond_its_own_and_never_changes_its_own() {
        let test = start().await;
        let acct = account(&test, 20).await;
        // A manager whose role holds users.read + users.manage only.
        let managers = custom_role(&test, &acct, "Managers", &["users.read", "users.manage"]).await;
        let mut message = new_user("max", "max@acme.example", managers);
        message.password = "a long enough passphrase".into();
        let max = id_of(&create(&test, &acct.owner(), message).await.expect("max"));
        let as_max = member(acct.id, max, &["users.read", "users.manage"]);
        let carol = id_of(&member_user(&test, &acct, "carol").await);
        let dave = id_of(&member_user(&test, &acct, "dave").await);
        let users_before = user::Entity::find()
            .count(&test.state.db)
            .await
            .expect("count");

        // CreateUser with the Admin role: refused, nothing written.
        let mut admin = new_user("eve", "eve@acme.example", acct.admin_role);
        admin.password = "a long enough passphrase".into();
        let err = create(&test, &as_max, admin.clone())
            .await
            .expect_err("admin");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(reason(&err), "PERMISSION_DENIED");
        assert_eq!(
            user::Entity::find()
                .count(&test.state.db)
                .await
                .expect("count"),
            users_before
        );
        // Within the manager's permissions: its own role, or User.
        admin.role_id = managers.to_string();
        create(&test, &as_max, admin).await.expect("a role within");
        create(
            &test,
            &as_max,
            new_user("fay", "fay@acme.example", acct.user_role),
        )
        .await
        .expect("User");

        // UpdateUser: itself to Admin, or even down to User; others to Admin.
        for role in [acct.admin_role, acct.user_role] {
            let err = update(&test, &as_max, set_role(max, role))
                .await
                .expect_err("its own role");
            assert_eq!(reason(&err), "PERMISSION_DENIED");
        }
        assert_eq!(stored(&test, max).await.expect("row").role_id, managers);
        let err = update(&test, &as_max, set_role(carol, acct.admin_role))
            .await
            .expect_err("promote carol");
        assert_eq!(reason(&err), "PERMISSION_DENIED");
        assert_eq!(
            stored(&test, carol).await.expect("row").role_id,
            acct.user_role
        );
        // Its own role named unchanged with other details is no change.
        let mut rename = set_role(max, managers);
        rename.display_name = "Max M".into();
        rename.update_mask = Some(FieldMask {
            paths: vec!["role_id".into(), "display_name".into()],
        });
        update(&test, &as_max, rename).await.expect("details");
        update(&test, &as_max, set_role(carol, managers))
            .await
            .expect("a role within");

        // BatchUpdateUsers: a verdict per item.
        let to = |role: Uuid, ids: &[Uuid]| pb::BatchUpdateUsersRequest {
            user_ids: ids.iter().map(Uuid::to_string).collect(),
            role_id: role.to_string(),
            update_mask: Some(FieldMask {
                paths: vec!["role_id".into()],
            }),
            ..Default::default()
        };
        let done = batch(&test, &as_max, to(acct.admin_role, &[dave, max, carol]))
            .await
            .expect("batch");
        let reasons: Vec<&str> = done
            .results
            .iter()
            .map(|r| r.error.as_ref().map_or("", |e| e.reason.as_str()))
            .collect();
        assert_eq!(reasons, ["PERMISSION_DENIED"; 3]);
        assert_eq!((done.updated_count, done.failed_count), (0, 3));
        let done = batch(&test, &as_max, to(acct.user_role, &[carol, max, dave]))
            .await
            .expect("batch");
        let reasons: Vec<&str> = done
            .results
            .iter()
            .map(|r| r.error.as_ref().map_or("", |e| e.reason.as_str()))
            .collect();
        assert_eq!(reasons, ["", "PERMISSION_DENIED", ""]);
        for (id, role) in [
            (max, managers),
            (carol, acct.user_role),
            (dave, acct.user_role),
        ] {
            assert_eq!(stored(&test, id).await.expect("row").role_id, role);
        }

        // An API key holding users.manage alone cannot hand out users.read.
        let key = Principal {
            kind: usher_kit::principal::PrincipalKind::ApiKey,
            user_id: None,
            credential_id: Some(Uuid::new_v4().to_string()),
            ..member(acct.id, max, &["users.manage"])
        };
        let err = create(
            &test,
            &key,
            new_user("gus", "gus@acme.example", acct.user_role),
        )
        .await
        .expect_err("User holds users.read");
        assert_eq!(reason(&err), "PERMISSION_DENIED");
        test.stop().await;
    }

    #[tokio::test]
    async fn batch_update_gives_per_item_results_and_keeps_a_manager_across_the_batch() {
        let test = start().await;
        let acct = account(&test, 20).await;
        let other = account(&test, 5).await;
        let team = make_team(&test, &acct, "Depot").await;
        let alice = id_of(&admin_user(&test, &acct, "alice").await);
        let bob = id_of(&admin_user(&test, &acct, "bob").await);
        let carol = id_of(&member_user(&test, &acct, "carol").await);
        let dave = id_of(&member_user(&test, &acct, "dave").await);
        let pending = invited(&test, &acct, "pending@acme.example").await;
        let stranger = id_of(&member_user(&test, &other, "stranger").await);
        let owner = acct.owner();

        // Team change for many, with every per-item failure kind.
        let unknown = Uuid::new_v4();
        let message = pb::BatchUpdateUsersRequest {
            user_ids: [carol, dave, pending, unknown, stranger]
                .iter()
                .map(Uuid::to_string)
                .collect(),
            team_id: team.to_string(),
            update_mask: Some(FieldMask {
                paths: vec!["team_id".into()],
            }),
            ..Default::default()
        };
        let done = batch(&test, &owner, message).await.expect("batch");
        let reasons: Vec<&str> = done
            .results
            .iter()
            .map(|r| r.error.as_ref().map_or("", |e| e.reason.as_str()))
            .collect();
        assert_eq!(reasons, ["", "", "INVALID_STATE", "NOT_FOUND", "NOT_FOUND"]);
        assert_eq!((done.updated_count, done.failed_count), (2, 3));
        assert_eq!(
            done.results[0].user.as_ref().map(|u| u.team_name.as_str()),
            Some("Depot")
        );
        assert_eq!(done.results[0].user_id, carol.to_string());
        assert_eq!(
            stored(&test, stranger).await.expect("row").team_id,
            None,
            "other accounts untouched"
        );
        assert_eq!(events(&test, "user.updated", carol).await, 1);
        assert_eq!(audit_count(&test, "user.updated", dave).await, 1);

        // The owner's role never changes in bulk.
        let message = pb::BatchUpdateUsersRequest {
            user_ids: vec![acct.owner.to_string(), carol.to_string()],
            role_id: acct.user_role.to_string(),
            update_mask: Some(FieldMask {
                paths: vec!["role_id".into()],
            }),
            ..Default::default()
        };
        let done = batch(&test, &owner, message).await.expect("batch");
        assert_eq!(
            done.results[0].error.as_ref().map(|e| e.reason.as_str()),
            Some("OWNER_PROTECTED")
        );
        assert!(done.results[1].error.is_none());
        assert_eq!(
            stored(&test, acct.owner).await.expect("row").role_id,
            acct.admin_role
        );

        // Alice and Bob are the only managers: demoting both (with Carol) in
        // one batch keeps them both, and Carol's item succeeds.
        owner_not_a_manager(&test, &acct).await;
        let demote_all = pb::BatchUpdateUsersRequest {
            user_ids: vec![alice.to_string(), bob.to_string(), carol.to_string()],
            role_id: acct.user_role.to_string(),
            update_mask: Some(FieldMask {
                paths: vec!["role_id".into()],
            }),
            ..Default::default()
        };
        let done = batch(&test, &acct.key(), demote_all).await.expect("batch");
        let reasons: Vec<&str> = done
            .results
            .iter()
            .map(|r| r.error.as_ref().map_or("", |e| e.reason.as_str()))
            .collect();
        assert_eq!(reasons, ["LAST_MANAGER", "LAST_MANAGER", ""]);
        for id in [alice, bob] {
            assert_eq!(
                stored(&test, id).await.expect("row").role_id,
                acct.admin_role
            );
        }
        // One of them alone may go.
        let demote_bob = pb::BatchUpdateUsersRequest {
            user_ids: vec![bob.to_string()],
            role_id: acct.user_role.to_string(),
            update_mask: Some(FieldMask {
                paths: vec!["role_id".into()],
            }),
            ..Default::default()
        };
        let done = batch(
            &test,
            &member(acct.id, alice, &admin_permissions()),
            demote_bob,
        )
        .await
        .expect("batch");
        assert_eq!((done.updated_count, done.failed_count), (1, 0));
        let snapshot = test
            .state
            .sessions
            .get_principal(bob)
            .await
            .expect("redis")
            .expect("snapshot");
        assert!(!snapshot.permissions.iter().any(|p| p == USERS_MANAGE));

        // Errors of the whole call.
        let too_many: Vec<String> = (0..=MAX_BATCH)
            .map(|_| Uuid::new_v4().to_string())
            .collect();
        for (ids, mask, role, field) in [
            (
                vec![],
                vec!["role_id"],
                acct.user_role.to_string(),
                "user_ids",
            ),
            (
                too_many,
                vec!["role_id"],
                acct.user_role.to_string(),
                "user_ids",
            ),
            (
                vec![carol.to_string(), carol.to_string()],
                vec!["role_id"],
                acct.user_role.to_string(),
                "user_ids[1]",
            ),
            (
                vec!["nope".into()],
                vec!["role_id"],
                acct.user_role.to_string(),
                "user_ids[0]",
            ),
            (
                vec![carol.to_string()],
                vec![],
                acct.user_role.to_string(),
                "update_mask",
            ),
            (
                vec![carol.to_string()],
                vec!["display_name"],
                acct.user_role.to_string(),
                "update_mask.paths[0]",
            ),
        ] {
            let message = pb::BatchUpdateUsersRequest {
                user_ids: ids,
                role_id: role,
                update_mask: Some(FieldMask {
                    paths: mask.into_iter().map(str::to_owned).collect(),
                }),
                ..Default::default()
            };
            let err = batch(&test, &owner, message).await.expect_err(field);
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(
                fields(&err).iter().any(|f| f == field),
                "{field}: {:?}",
                fields(&err)
            );
        }
        let foreign_role = pb::BatchUpdateUsersRequest {
            user_ids: vec![carol.to_string()],
            role_id: other.admin_role.to_string(),
            update_mask: Some(FieldMask {
                paths: vec!["role_id".into()],
            }),
            ..Default::default()
        };
        assert_eq!(
            reason(&batch(&test, &owner, foreign_role).await.expect_err("role")),
            "NOT_FOUND"
        );
        test.stop().await;
    }

    #[tokio::test]
    async fn deactivation_revokes_sessions_and_reactivation_needs_a_free_seat() {
        let test = start().await;
        let acct = account(&test, 3).await;
        let owner = acct.owner();
        let worker = id_of(&member_user(&test, &acct, "worker").await);
        let session = test
            .state
            .sessions
            .create(acct.id, worker, SessionMeta::default())
            .await
            .expect("session");
        let token = session.access_token.as_str().to_owned();
        assert!(
            test.state
                .sessions
                .resolve_access(&token)
                .await
                .expect("redis")
                .is_some()
        );
        assert!(
            test.state
                .sessions
                .get_principal(worker)
                .await
                .expect("redis")
                .is_some()
        );

        let inactive = deactivate(&test, &owner, worker)
            .await
            .expect("deactivated");
        assert_eq!(inactive.status, pb::UserStatus::Inactive as i32);
        assert!(inactive.deactivate_time.is_some());
        assert!(
            test.state
                .sessions
                .resolve_access(&token)
                .await
                .expect("redis")
                .is_none(),
            "sessions revoked"
        );
        assert!(
            test.state
                .sessions
                .get_principal(worker)
                .await
                .expect("redis")
                .is_none(),
            "snapshot gone"
        );
        assert_eq!(audit_count(&test, "user.deactivated", worker).await, 1);
        assert_eq!(events(&test, "user.deactivated", worker).await, 1);
        assert_eq!(
            reason(&deactivate(&test, &owner, worker).await.expect_err("again")),
            "INVALID_STATE"
        );
        assert_eq!(
            reason(
                &deactivate(&test, &owner, acct.owner)
                    .await
                    .expect_err("owner")
            ),
            "OWNER_PROTECTED"
        );
        assert_eq!(
            reason(
                &deactivate(&test, &owner, Uuid::new_v4())
                    .await
                    .expect_err("unknown")
            ),
            "NOT_FOUND"
        );
        let err = deactivate_raw(&test, &owner, "not-a-uuid")
            .await
            .expect_err("malformed");
        assert_eq!(fields(&err), vec!["user_id".to_owned()]);
        let pending = invited(&test, &acct, "pending@acme.example").await;
        assert_eq!(
            reason(
                &deactivate(&test, &owner, pending)
                    .await
                    .expect_err("invited")
            ),
            "INVALID_STATE"
        );

        // Its seat was freed: owner + pending + one more fill the 3 seats.
        let filler = member_user(&test, &acct, "filler").await;
        assert_eq!(
            reason(&reactivate(&test, &owner, worker).await.expect_err("full")),
            "SEAT_LIMIT_REACHED"
        );
        deactivate(&test, &owner, id_of(&filler))
            .await
            .expect("seat freed");
        let back = reactivate(&test, &owner, worker)
            .await
            .expect("reactivated");
        assert_eq!(back.status, pb::UserStatus::Active as i32);
        assert!(back.deactivate_time.is_none());
        assert!(
            test.state
                .sessions
                .get_principal(worker)
                .await
                .expect("redis")
                .is_some()
        );
        assert_eq!(events(&test, "user.reactivated", worker).await, 1);
        assert_eq!(
            reason(&reactivate(&test, &owner, worker).await.expect_err("active")),
            "INVALID_STATE"
        );
        test.stop().await;
    }

    async fn deactivate_raw(
        test: &TestIdentity,
        caller: &Principal,
        id: &str,
    ) -> Result<pb::User, Status> {
        UserService::deactivate_user(
            &test.api,
            request(caller, pb::DeactivateUserRequest { user_id: id.into() }),
        )
        .await
        .map(|r| r.into_inner().user.expect("user"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_last_seat_goes_to_exactly_one_of_two_concurrent_callers() {
        let test = start().await;
        for round in 0..5 {
            // Creations: owner + 1 of 3 seats used, then two at once for the last one.
            let acct = account(&test, 3).await;
            member_user(&test, &acct, "first").await;
            let calls: Vec<_> = ["racer-a", "racer-b"]
                .into_iter()
                .map(|name| {
                    let api = test.api.clone();
                    let caller = acct.owner();
                    let message = new_user(name, &format!("{name}@acme.example"), acct.user_role);
                    tokio::spawn(async move {
                        UserService::create_user(&api, request(&caller, message)).await
                    })
                })
                .collect();
            let mut outcomes = Vec::new();
            for call in calls {
                outcomes.push(call.await.expect("task"));
            }
            assert_eq!(
                outcomes.iter().filter(|o| o.is_ok()).count(),
                1,
                "round {round}: creations"
            );
            let err = outcomes
                .iter()
                .find_map(|o| o.as_ref().err())
                .expect("refused");
            assert_eq!(reason(err), "SEAT_LIMIT_REACHED");

            // Reactivations: two inactive users, one free seat.
            let acct = account(&test, 2).await;
            let a = id_of(&member_user(&test, &acct, "sleeper-a").await);
            deactivate(&test, &acct.owner(), a).await.expect("a off");
            let b = id_of(&member_user(&test, &acct, "sleeper-b").await);
            deactivate(&test, &acct.owner(), b).await.expect("b off");
            let calls: Vec<_> = [a, b]
                .into_iter()
                .map(|id| {
                    let api = test.api.clone();
                    let caller = acct.owner();
                    tokio::spawn(async move {
                        UserService::reactivate_user(
                            &api,
                            request(
                                &caller,
                                pb::ReactivateUserRequest {
                                    user_id: id.to_string(),
                                },
                            ),
                        )
                        .await
                    })
                })
                .collect();
            let mut outcomes = Vec::new();
            for call in calls {
                outcomes.push(call.await.expect("task"));
            }
            assert_eq!(
                outcomes.iter().filter(|o| o.is_ok()).count(),
                1,
                "round {round}: reactivations"
            );
            let err = outcomes
                .iter()
                .find_map(|o| o.as_ref().err())
                .expect("refused");
            assert_eq!(reason(err), "SEAT_LIMIT_REACHED");
            assert_eq!(
                accounts::seats_used(&test.state.db, acct.id)
                    .await
                    .expect("seats"),
                2
            );
        }
        test.stop().await;
    }

    #[tokio::test]
    async fn delete_user_removes_the_user_and_its_sessions_but_not_the_owner_or_invited() {
        let test = start().await;
        let acct = account(&test, 10).await;
        let owner = acct.owner();
        let leaver = member_user(&test, &acct, "leaver").await;
        let id = id_of(&leaver);
        let session = test
            .state
            .sessions
            .create(acct.id, id, SessionMeta::default())
            .await
            .expect("session");
        assert_eq!(
            delete(&test, &owner, id).await.expect("deleted").user_id,
            id.to_string()
        );
        assert!(stored(&test, id).await.is_none());
        assert!(
            test.state
                .sessions
                .resolve_access(session.access_token.as_str())
                .await
                .expect("redis")
                .is_none()
        );
        assert!(
            test.state
                .sessions
                .get_principal(id)
                .await
                .expect("redis")
                .is_none()
        );
        assert_eq!(
            reason(&get(&test, &owner, id).await.expect_err("gone")),
            "NOT_FOUND"
        );
        assert_eq!(
            reason(&delete(&test, &owner, id).await.expect_err("gone")),
            "NOT_FOUND"
        );
        assert_eq!(audit_count(&test, "user.deleted", id).await, 1);
        assert_eq!(events(&test, "user.deleted", id).await, 1);

        // Inactive users can be deleted too.
        let sleeper = id_of(&member_user(&test, &acct, "sleeper").await);
        deactivate(&test, &owner, sleeper)
            .await
            .expect("deactivated");
        delete(&test, &owner, sleeper)
            .await
            .expect("inactive deleted");

        assert_eq!(
            reason(&delete(&test, &owner, acct.owner).await.expect_err("owner")),
            "OWNER_PROTECTED"
        );
        let second = admin_user(&test, &acct, "second").await;
        assert_eq!(
            reason(
                &delete(&test, &acct.admin(&second), acct.owner)
                    .await
                    .expect_err("owner")
            ),
            "OWNER_PROTECTED"
        );
        let pending = invited(&test, &acct, "pending@acme.example").await;
        assert_eq!(
            reason(&delete(&test, &owner, pending).await.expect_err("invited")),
            "INVALID_STATE"
        );
        assert!(stored(&test, acct.owner).await.is_some());
        test.stop().await;
    }

    #[tokio::test]
    async fn search_matches_any_part_of_name_or_email_case_insensitively_and_literally() {
        let test = start().await;
        let acct = account(&test, 50).await;
        let owner = acct.owner();
        let people = [
            ("zoe", "Zoë Martin", "zoe@acme.example"),
            ("bob", "Bob Stone", "MARy.b@acme.example"),
            ("anna-lee", "Anna_Lee", "anna@acme.example"),
            ("annax", "AnnaXLee", "annax@acme.example"),
            ("half", "Half 100% Sure", "half@acme.example"),
            ("h1000", "Half 1000 Sure", "h1000@acme.example"),
            ("back", "Back\\slash", "back@acme.example"),
        ];
        for (username, name, email) in people {
            let message = pb::CreateUserRequest {
                display_name: name.into(),
                ..new_user(username, email, acct.user_role)
            };
            create(&test, &owner, message).await.expect("created");
        }
        let names = |page: &pb::ListUsersResponse| {
            page.users
                .iter()
                .map(|u| u.display_name.clone())
                .collect::<Vec<_>>()
        };
        let search = |query: &str| pb::ListUsersRequest {
            query: query.into(),
            ..Default::default()
        };
        for (query, expected) in [
            ("MAR", vec!["Bob Stone", "Zoë Martin"]),
            ("zoë m", vec!["Zoë Martin"]),
            ("a_l", vec!["Anna_Lee"]),
            ("0% s", vec!["Half 100% Sure"]),
            ("k\\s", vec!["Back\\slash"]),
            (
                "ACME.EXAMPLE",
                vec![
                    "Olive Owner",
                    "Anna_Lee",
                    "AnnaXLee",
                    "Back\\slash",
                    "Bob Stone",
                    "Half 100% Sure",
                    "Half 1000 Sure",
                    "Zoë Martin",
                ],
            ),
            ("olive", vec!["Olive Owner"]),
            ("nobody-at-all", vec![]),
        ] {
            let page = list(&test, &owner, search(query)).await.expect("search");
            assert_eq!(names(&page), expected, "query {query}");
            assert_eq!(
                page.total_size,
                i32::try_from(expected.len()).expect("small"),
                "query {query}"
            );
        }
        // Whitespace only is no search.
        assert_eq!(
            list(&test, &owner, search("   "))
                .await
                .expect("all")
                .total_size,
            8
        );
        for query in ["ab".to_owned(), "x".repeat(201)] {
            let err = list(&test, &owner, search(&query))
                .await
                .expect_err("bounds");
            assert_eq!(fields(&err), vec!["query".to_owned()]);
        }
        for message in [
            pb::ListUsersRequest {
                page_size: -1,
                ..Default::default()
            },
            pb::ListUsersRequest {
                role_id: "nope".into(),
                ..Default::default()
            },
            pb::ListUsersRequest {
                team_id: "nope".into(),
                ..Default::default()
            },
            pb::ListUsersRequest {
                page_token: "garbage".into(),
                ..Default::default()
            },
        ] {
            let err = list(&test, &owner, message).await.expect_err("invalid");
            assert_eq!(err.code(), Code::InvalidArgument);
        }
        test.stop().await;
    }

    #[tokio::test]
    async fn pagination_returns_every_matching_user_once_in_a_stable_order() {
        let test = start().await;
        let acct = account(&test, 5_000).await;
        let owner = acct.owner();
        let team = make_team(&test, &acct, "Warehouse").await;
        let start_time = test.state.clock.now();
        // 1,200 users in one multi-row insert: duplicate names in mixed case
        // (the id breaks ties), some without email, some sharing a creation
        // time.
        let rows: Vec<user::Model> = (0..1_200)
            .map(|i| {
                let name = if i % 2 == 0 {
                    format!("Person {:02}", i % 37)
                } else {
                    format!("person {:02}", i % 37)
                };
                let (email, username) = if i % 10 == 0 {
                    (None, Some(format!("kiosk{i:04}")))
                } else {
                    (Some(format!("p{i:04}@acme.example")), None)
                };
                let mut model = row(
                    &acct,
                    Uuid::new_v4(),
                    &name,
                    email.as_deref(),
                    username.as_deref(),
                    if i % 5 == 0 {
                        acct.admin_role
                    } else {
                        acct.user_role
                    },
                    (i % 3 == 0).then_some(team),
                    start_time + Duration::seconds(i / 2),
                );
                if i % 7 == 0 {
                    model.status = UserStatus::Inactive;
                }
                model
            })
            .collect();
        user::Entity::insert_many(rows.iter().cloned().map(IntoActiveModel::into_active_model))
            .exec(&test.state.db)
            .await
            .expect("bulk insert");

        // Team filter, default order, pages of 100.
        let mut expected: Vec<&user::Model> =
            rows.iter().filter(|r| r.team_id == Some(team)).collect();
        expected.sort_by(|a, b| {
            (a.display_name.to_lowercase(), a.id).cmp(&(b.display_name.to_lowercase(), b.id))
        });
        let message = pb::ListUsersRequest {
            page_size: 100,
            team_id: team.to_string(),
            ..Default::default()
        };
        let first = list(&test, &owner, message.clone()).await.expect("page");
        assert_eq!(first.total_size, 400);
        let (users, pages) = all_pages(&test, &owner, message).await;
        assert_eq!(pages, 4);
        let got: Vec<String> = users.iter().map(|u| u.id.clone()).collect();
        let want: Vec<String> = expected.iter().map(|r| r.id.to_string()).collect();
        assert_eq!(got, want);

        // Everything by name: the owner first, then 1,200 + the owner's
        // account has nobody else.
        let (users, _) = all_pages(
            &test,
            &owner,
            pb::ListUsersRequest {
                page_size: 500,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(users.len(), 1_201);
        assert!(users[0].owner);
        assert_eq!(users.iter().filter(|u| u.owner).count(), 1);

        // By email (username when none), active admins only, odd page size.
        let mut expected: Vec<&user::Model> = rows
            .iter()
            .filter(|r| r.role_id == acct.admin_role && r.status == UserStatus::Active)
            .collect();
        let key = |r: &user::Model| {
            r.email_canonical
                .clone()
                .or_else(|| r.username.clone())
                .unwrap_or_default()
        };
        expected.sort_by_key(|r| (key(r), r.id));
        let message = pb::ListUsersRequest {
            page_size: 33,
            role_id: acct.admin_role.to_string(),
            status: pb::UserStatus::Active as i32,
            order_by: pb::UserOrderBy::Email as i32,
            ..Default::default()
        };
        let (users, _) = all_pages(&test, &owner, message).await;
        assert!(
            users[0].owner,
            "the owner is an active admin and comes first"
        );
        let got: Vec<String> = users[1..].iter().map(|u| u.id.clone()).collect();
        let want: Vec<String> = expected.iter().map(|r| r.id.to_string()).collect();
        assert_eq!(got, want);

        // Newest first, ties on the creation time broken by id.
        let mut expected: Vec<&user::Model> = rows.iter().filter(|r| r.team_id.is_none()).collect();
        expected.sort_by_key(|r| std::cmp::Reverse((r.create_time, r.id)));
        let message = pb::ListUsersRequest {
            page_size: 77,
            query: "person".into(),
            order_by: pb::UserOrderBy::CreateTimeDesc as i32,
            ..Default::default()
        };
        let (users, _) = all_pages(&test, &owner, message.clone()).await;
        let no_team: Vec<String> = users
            .iter()
            .filter(|u| u.team_id.is_empty())
            .map(|u| u.id.clone())
            .collect();
        assert_eq!(
            no_team,
            expected
                .iter()
                .map(|r| r.id.to_string())
                .collect::<Vec<_>>()
        );

        // A token is bound to its query.
        let page = list(&test, &owner, message.clone()).await.expect("page");
        let other_query = pb::ListUsersRequest {
            page_token: page.next_page_token,
            query: "kiosk".into(),
            ..message
        };
        let err = list(&test, &owner, other_query)
            .await
            .expect_err("foreign token");
        assert_eq!(fields(&err), vec!["page_token".to_owned()]);

        // Page size 1: the owner alone, then the others.
        let one = pb::ListUsersRequest {
            page_size: 1,
            status: pb::UserStatus::Active as i32,
            ..Default::default()
        };
        let page = list(&test, &owner, one.clone()).await.expect("page");
        assert!(page.users[0].owner && !page.next_page_token.is_empty());
        let next = list(
            &test,
            &owner,
            pb::ListUsersRequest {
                page_token: page.next_page_token,
                ..one
            },
        )
        .await
        .expect("page");
        assert!(!next.users[0].owner);
        test.stop().await;
    }

    #[tokio::test]
    async fn another_accounts_users_answer_not_found_and_stay_unchanged() {
        let test = start().await;
        let ours = account(&test, 10).await;
        let theirs = account(&test, 10).await;
        let victim = member_user(&test, &theirs, "victim").await;
        let id = id_of(&victim);
        let attacker = ours.owner();

        assert_eq!(
            reason(&get(&test, &attacker, id).await.expect_err("get")),
            "NOT_FOUND"
        );
        let rename = pb::UpdateUserRequest {
            user_id: id.to_string(),
            display_name: "Pwned".into(),
            update_mask: Some(FieldMask {
                paths: vec!["display_name".into()],
            }),
            ..Default::default()
        };
        assert_eq!(
            reason(&update(&test, &attacker, rename).await.expect_err("update")),
            "NOT_FOUND"
        );
        assert_eq!(
            reason(
                &deactivate(&test, &attacker, id)
                    .await
                    .expect_err("deactivate")
            ),
            "NOT_FOUND"
        );
        assert_eq!(
            reason(&delete(&test, &attacker, id).await.expect_err("delete")),
            "NOT_FOUND"
        );
        let done = batch(
            &test,
            &attacker,
            pb::BatchUpdateUsersRequest {
                user_ids: vec![id.to_string()],
                role_id: ours.admin_role.to_string(),
                update_mask: Some(FieldMask {
                    paths: vec!["role_id".into()],
                }),
                ..Default::default()
            },
        )
        .await
        .expect("batch");
        assert_eq!(
            done.results[0].error.as_ref().map(|e| e.reason.as_str()),
            Some("NOT_FOUND")
        );
        // Their role and team ids are unknown here as well.
        let err = update(&test, &attacker, set_role(ours.owner, theirs.admin_role))
            .await
            .expect_err("foreign role");
        assert!(["NOT_FOUND", "OWNER_PROTECTED"].contains(&reason(&err).as_str()));
        let listed = list(&test, &attacker, pb::ListUsersRequest::default())
            .await
            .expect("list");
        assert_eq!(listed.total_size, 1);
        assert!(
            listed
                .users
                .iter()
                .all(|u| u.account_id == ours.id.to_string())
        );
        let filtered = list(
            &test,
            &attacker,
            pb::ListUsersRequest {
                role_id: theirs.user_role.to_string(),
                ..Default::default()
            },
        )
        .await
        .expect("list");
        assert!(filtered.users.is_empty());

        deactivate(&test, &theirs.owner(), id)
            .await
            .expect("their own admin may");
        assert_eq!(
            reason(
                &reactivate(&test, &attacker, id)
                    .await
                    .expect_err("reactivate")
            ),
            "NOT_FOUND"
        );
        let row = stored(&test, id).await.expect("row");
        assert_eq!(
            (row.display_name.as_str(), row.status),
            ("victim name", UserStatus::Inactive)
        );
        test.stop().await;
    }

    #[tokio::test]
    async fn send_password_reset_queues_a_reset_email_for_active_users_only() {
        let test = start().await;
        let acct = account(&test, 5).await;
        let before = usher_kit::outbox::pending(&test.state.db)
            .await
            .expect("outbox");
        let message = pb::SendPasswordResetRequest {
            user_id: acct.owner.to_string(),
        };
        let sent = UserService::send_password_reset(&test.api, request(&acct.owner(), message))
            .await
            .expect("sent")
            .into_inner();
        assert_eq!(sent.email, "owner@acme.example");
        assert!(
            usher_kit::outbox::pending(&test.state.db)
                .await
                .expect("outbox")
                > before
        );
        let unknown = pb::SendPasswordResetRequest {
            user_id: Uuid::new_v4().to_string(),
        };
        let err = UserService::send_password_reset(&test.api, request(&acct.owner(), unknown))
            .await
            .expect_err("unknown");
        assert_eq!(err.code(), Code::NotFound);
        test.stop().await;
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
}
