//! The SQL of sign-in, sessions, the caller's own profile and password
//! links. Each function runs on the connection or transaction it is given;
//! `app::auth` opens the transactions and asks `domain::auth` and
//! `domain::password_links` what to write.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel, JoinType,
    QueryFilter, QuerySelect, RelationDef, Set, sea_query::Expr,
};
use usher_kit::db::StoreResult;
use uuid::Uuid;

use super::entities::{account, password_reset, role, team, user};
use crate::domain::{UserStatus, auth::Login};

/// A user with the names of their role and team, as views show it.
#[derive(Clone, Debug)]
pub struct NamedUser {
    /// The user.
    pub user: user::Model,
    /// Their role's name (empty when the role is gone).
    pub role_name: String,
    /// Their team's name, if in a team.
    pub team_name: Option<String>,
}

/// `model` with the names of its role and team.
pub async fn named<C: ConnectionTrait>(db: &C, model: user::Model) -> StoreResult<NamedUser> {
    let role_name = role::Entity::find_by_id(model.role_id)
        .one(db)
        .await?
        .map(|r| r.name)
        .unwrap_or_default();
    let team_name = match model.team_id {
        Some(team_id) => team::Entity::find_by_id(team_id)
            .one(db)
            .await?
            .map(|t| t.name),
        None => None,
    };
    Ok(NamedUser {
        user: model,
        role_name,
        team_name,
    })
}

/// The user `user_id` of `account_id` with the names of their role and team,
/// in one query; `None` when the user (or their role) is gone.
pub async fn named_by_id<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    user_id: Uuid,
) -> StoreResult<Option<NamedUser>> {
    Ok(super::users::rows(db, account_id, &[user_id])
        .await?
        .remove(&user_id)
        .map(|row| NamedUser {
            user: row.user,
            role_name: row.role_name,
            team_name: row.team_name,
        }))
}

/// The permissions of role `role_id`, empty when it is gone.
pub async fn role_permissions<C: ConnectionTrait>(
    db: &C,
    role_id: Uuid,
) -> StoreResult<Vec<String>> {
    Ok(role::Entity::find_by_id(role_id)
        .one(db)
        .await?
        .map(|r| usher_kit::convert::strings(&r.permissions))
        .unwrap_or_default())
}

/// The user `user_id`, of any account.
pub async fn find_user<C: ConnectionTrait>(
    db: &C,
    user_id: Uuid,
) -> StoreResult<Option<user::Model>> {
    Ok(user::Entity::find_by_id(user_id).one(db).await?)
}

/// The user `user_id` of `account_id`.
pub async fn find_member<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    user_id: Uuid,
) -> StoreResult<Option<user::Model>> {
    Ok(user::Entity::find_by_id(user_id)
        .filter(user::Column::AccountId.eq(account_id))
        .one(db)
        .await?)
}

pub use super::users::lock_user;

/// The account whose slug is `slug`.
pub async fn account_by_slug<C: ConnectionTrait>(
    db: &C,
    slug: &str,
) -> StoreResult<Option<account::Model>> {
    Ok(account::Entity::find()
        .filter(account::Column::Slug.eq(slug))
        .one(db)
        .await?)
}

/// The user of `account_id` whose canonical email is `canonical`, in any
/// status.
pub async fn user_by_email<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    canonical: &str,
) -> StoreResult<Option<user::Model>> {
    Ok(user::Entity::find()
        .filter(user::Column::AccountId.eq(account_id))
        .filter(user::Column::EmailCanonical.eq(canonical))
        .one(db)
        .await?)
}

/// The user a sign-in names, in any status: by the account's slug, then the
/// canonical email or the username.
pub async fn sign_in_user<C: ConnectionTrait>(
    db: &C,
    slug: &str,
    login: &Login,
) -> StoreResult<Option<user::Model>> {
    // One query: the account by its slug, joined.
    let account_join: RelationDef = user::Entity::belongs_to(account::Entity)
        .from(user::Column::AccountId)
        .to(account::Column::Id)
        .into();
    let select = user::Entity::find()
        .join(JoinType::InnerJoin, account_join)
        .filter(account::Column::Slug.eq(slug));
    let select = match login {
        Login::Email(Some(canonical)) => {
            select.filter(user::Column::EmailCanonical.eq(canonical.as_str()))
        }
        Login::Email(None) => return Ok(None),
        Login::Username(username) => select.filter(user::Column::Username.eq(username.as_str())),
    };
    Ok(select.one(db).await?)
}

/// Records the sign-in time of `user_id` (and `new_hash`, a rehash of the
/// password) if the user is still ACTIVE with the password `verified_hash`;
/// whether it was.
pub async fn record_sign_in<C: ConnectionTrait>(
    db: &C,
    user_id: Uuid,
    verified_hash: &str,
    new_hash: Option<String>,
    now: DateTime<Utc>,
) -> StoreResult<bool> {
    let mut update =
        user::Entity::update_many().col_expr(user::Column::LastSignInTime, Expr::value(Some(now)));
    if let Some(new_hash) = new_hash {
        update = update.col_expr(user::Column::PasswordHash, Expr::value(Some(new_hash)));
    }
    let updated = update
        .filter(user::Column::Id.eq(user_id))
        .filter(user::Column::Status.eq(UserStatus::Active.as_str()))
        .filter(user::Column::PasswordHash.eq(verified_hash))
        .exec(db)
        .await?;
    Ok(updated.rows_affected == 1)
}

/// Whether the user `user_id` must choose a new password first (`false` for
/// an unknown user).
pub async fn password_change_required<C: ConnectionTrait>(
    db: &C,
    user_id: Uuid,
) -> StoreResult<bool> {
    Ok(user::Entity::find_by_id(user_id)
        .select_only()
        .column(user::Column::PasswordChangeRequired)
        .into_tuple::<bool>()
        .one(db)
        .await?
        .unwrap_or(false))
}

/// Writes the display name (and its search text) and locale of `current`.
pub async fn update_profile<C: ConnectionTrait>(
    db: &C,
    current: &user::Model,
    display_name: Option<&str>,
    locale: Option<&str>,
    now: DateTime<Utc>,
) -> StoreResult<user::Model> {
    let mut active = current.clone().into_active_model();
    if let Some(name) = display_name {
        active.display_name = Set(name.to_owned());
        active.search_text = Set(super::users::search_text(
            name,
            current.email_canonical.as_deref(),
            current.username.as_deref(),
        ));
    }
    if let Some(locale) = locale {
        active.locale = Set(locale.to_owned());
    }
    active.update_time = Set(now);
    Ok(active.update(db).await?)
}

/// Replaces the password of `user_id` with `new_hash` (and clears "must
/// change password") if the user is still ACTIVE with `old_hash`; whether it
/// was.
pub async fn replace_password<C: ConnectionTrait>(
    db: &C,
    user_id: Uuid,
    old_hash: &str,
    new_hash: String,
    now: DateTime<Utc>,
) -> StoreResult<bool> {
    let updated = user::Entity::update_many()
        .col_expr(user::Column::PasswordHash, Expr::value(Some(new_hash)))
        .col_expr(user::Column::PasswordChangeRequired, Expr::value(false))
        .col_expr(user::Column::UpdateTime, Expr::value(now))
        .filter(user::Column::Id.eq(user_id))
        .filter(user::Column::Status.eq(UserStatus::Active.as_str()))
        .filter(user::Column::PasswordHash.eq(old_hash))
        .exec(db)
        .await?;
    Ok(updated.rows_affected == 1)
}

/// Sets the password of `target` (locked by the caller) to `new_hash` and
/// clears "must change password".
pub async fn set_password<C: ConnectionTrait>(
    db: &C,
    target: &user::Model,
    new_hash: String,
    now: DateTime<Utc>,
) -> StoreResult<user::Model> {
    let mut active = target.clone().into_active_model();
    active.password_hash = Set(Some(new_hash));
    active.password_change_required = Set(false);
    active.update_time = Set(now);
    Ok(active.update(db).await?)
}

/// Ends the pending reset and set-password links of a user (a new link, a
/// new password).
pub async fn expire_links<C: ConnectionTrait>(
    db: &C,
    user_id: Uuid,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    password_reset::Entity::update_many()
        .col_expr(password_reset::Column::ExpireTime, Expr::value(now))
        .filter(password_reset::Column::UserId.eq(user_id))
        .filter(password_reset::Column::UseTime.is_null())
        .filter(password_reset::Column::ExpireTime.gt(now))
        .exec(db)
        .await?;
    Ok(())
}

/// Stores a new password link of `user_id` by the keyed hash of its token.
pub async fn insert_link<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    user_id: Uuid,
    token_hash: String,
    expire_time: DateTime<Utc>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    password_reset::ActiveModel {
        id: Set(Uuid::now_v7()),
        account_id: Set(account_id),
        user_id: Set(user_id),
        token_hash: Set(token_hash),
        expire_time: Set(expire_time),
        use_time: Set(None),
        create_time: Set(now),
    }
    .insert(db)
    .await?;
    Ok(())
}

/// Uses the link whose token hashes to `token_hash` if it is usable at `now`
/// (the SQL twin of `domain::password_links::usable_at`): one conditional
/// update, so of concurrent uses exactly one gets the link, the others
/// `None`.
pub async fn consume_link<C: ConnectionTrait>(
    db: &C,
    token_hash: &str,
    now: DateTime<Utc>,
) -> StoreResult<Option<password_reset::Model>> {
    let consumed = password_reset::Entity::update_many()
        .col_expr(password_reset::Column::UseTime, Expr::value(Some(now)))
        .filter(password_reset::Column::TokenHash.eq(token_hash))
        .filter(password_reset::Column::UseTime.is_null())
        .filter(password_reset::Column::ExpireTime.gt(now))
        .exec(db)
        .await?;
    if consumed.rows_affected != 1 {
        return Ok(None);
    }
    Ok(password_reset::Entity::find()
        .filter(password_reset::Column::TokenHash.eq(token_hash))
        .one(db)
        .await?)
}
